//! Reaching a responder on every channel (contract §11), through the real
//! binary and a real Redis: page calls through an in-test Asterisk (AMI) and
//! FreeSWITCH (ESL) speaking the real wire formats, SIP MESSAGE to sipp as the
//! responder's phone, a local HTTP receiver for the webhook that checks the
//! signature; reminders and release; two daemons making each attempt once.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const S10: Duration = Duration::from_secs(10);
const SECRET: &str = "webhook-secret-0123456789";

fn hmac_hex(body: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    m.update(body);
    hex::encode(m.finalize().into_bytes())
}

/// A `[[responder]]` with contact details (token `token-<id>`).
fn responder(id: &str, tier: u32, contact: &str) -> String {
    format!(
        "[[responder]]\nid = \"{id}\"\nname = \"{id}\"\ntoken_sha256 = \"{}\"\nskills = [\"*\"]\ntier = {tier}\n{contact}\n",
        sha256_hex(&format!("token-{id}"))
    )
}

fn fallback(after: &str, order: &str) -> String {
    format!(
        "[fallback]\nafter = \"{after}\"\norder = [{order}]\nwebhook_secret = \"{SECRET}\"\nmessage_timeout = \"1s\"\nwebhook_timeout = \"1s\"\nwebhook_retries = 1\n"
    )
}

fn put_available(d: &Daemon, id: &str) {
    let (status, body) = http(
        d.http_port,
        "PUT",
        &format!("/v1/responders/{id}/availability"),
        Some(ADMIN_TOKEN),
        Some(r#"{"status":"available"}"#),
    );
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["availability"], "available", "{v}");
}

/// The `contacted` entries of an incident: (channel, outcome).
fn contacted(d: &Daemon, id: &str) -> Vec<(String, String)> {
    d.incident(id)["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "contacted")
        .map(|e| {
            (e["detail"]["channel"].as_str().unwrap_or("").into(), e["detail"]["outcome"].as_str().unwrap_or("").into())
        })
        .collect()
}

fn wait_contacted(d: &Daemon, id: &str, channel: &str, outcome: &str) {
    let end = Instant::now() + S10;
    while !contacted(d, id).iter().any(|(c, o)| c == channel && o == outcome) {
        assert!(Instant::now() < end, "no {channel} {outcome} on {id}: {:?}", contacted(d, id));
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---- a webhook receiver ----------------------------------------------------------

enum Reply {
    Status(u16),
    Slow,
    /// Bytes that are not HTTP, then close.
    Garbage,
    /// A status line, then header lines without end.
    EndlessHeaders,
    /// Close without a word.
    Close,
}

struct Hook {
    port: u16,
    got: mpsc::Receiver<(Value, bool, Instant)>,
    replies: Arc<Mutex<Vec<Reply>>>,
    count: Arc<Mutex<usize>>,
}

impl Hook {
    fn start() -> Hook {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let (tx, got) = mpsc::channel();
        let replies: Arc<Mutex<Vec<Reply>>> = Arc::default();
        let count: Arc<Mutex<usize>> = Arc::default();
        let (r2, c2) = (replies.clone(), count.clone());
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let (tx, r2, c2) = (tx.clone(), r2.clone(), c2.clone());
                std::thread::spawn(move || serve_hook(s, tx, r2, c2));
            }
        });
        Hook { port, got, replies, count }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/crew", self.port)
    }

    fn next(&self) -> (Value, bool, Instant) {
        self.got.recv_timeout(S10).expect("a webhook POST")
    }
}

fn serve_hook(
    s: TcpStream,
    tx: mpsc::Sender<(Value, bool, Instant)>,
    replies: Arc<Mutex<Vec<Reply>>>,
    count: Arc<Mutex<usize>>,
) {
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut len = 0;
    let mut sig = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => len = v.trim().parse().unwrap_or(0),
                "x-dispatchd-signature" => sig = v.trim().to_string(),
                _ => {}
            }
        }
    }
    let mut body = vec![0u8; len];
    let _ = r.read_exact(&mut body);
    *count.lock().unwrap() += 1;
    let ok = sig == hmac_hex(&body);
    let _ = tx.send((serde_json::from_slice(&body).unwrap_or(Value::Null), ok, Instant::now()));
    let reply = { replies.lock().unwrap().pop() }.unwrap_or(Reply::Status(200));
    let mut s = s;
    let status = match reply {
        Reply::Status(s) => s,
        Reply::Slow => {
            std::thread::sleep(Duration::from_secs(3));
            200
        }
        Reply::Garbage => {
            let _ = s.write_all(b"\x00\xffNOT HTTP \xc3\x28 at all\r\n\r\n");
            return;
        }
        Reply::EndlessHeaders => {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n");
            let line = format!("X-Pad: {}\r\n", "a".repeat(1000));
            for _ in 0..20_000 {
                if s.write_all(line.as_bytes()).is_err() {
                    return;
                }
            }
            return;
        }
        Reply::Close => return,
    };
    let _ = write!(s, "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
}

// ---- an in-test Asterisk (AMI) ----------------------------------------------------

/// What the in-test PBX does with the next Originate.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Page {
    Digit(char),
    Busy,
    NoAnswer,
    NoDigit,
    /// Rings until dispatchd hangs it up.
    Ring,
}

struct Ami {
    port: u16,
    plan: Arc<Mutex<Vec<Page>>>,
    originates: mpsc::Receiver<HashMap<String, Vec<String>>>,
    hangups: mpsc::Receiver<String>,
}

fn read_block(r: &mut BufReader<TcpStream>) -> Option<HashMap<String, Vec<String>>> {
    let mut m: HashMap<String, Vec<String>> = HashMap::new();
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let l = line.trim_end();
        if l.is_empty() {
            if m.is_empty() {
                continue;
            }
            return Some(m);
        }
        if let Some((k, v)) = l.split_once(':') {
            m.entry(k.trim().to_string()).or_default().push(v.trim().to_string());
        }
    }
}

impl Ami {
    fn start() -> Ami {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let plan: Arc<Mutex<Vec<Page>>> = Arc::default();
        let (otx, originates) = mpsc::channel();
        let (htx, hangups) = mpsc::channel();
        let p2 = plan.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let (p2, otx, htx) = (p2.clone(), otx.clone(), htx.clone());
                std::thread::spawn(move || ami_session(s, p2, otx, htx));
            }
        });
        Ami { port, plan, originates, hangups }
    }

    fn then(&self, p: Page) {
        self.plan.lock().unwrap().insert(0, p);
    }
}

fn ami_session(
    s: TcpStream,
    plan: Arc<Mutex<Vec<Page>>>,
    originates: mpsc::Sender<HashMap<String, Vec<String>>>,
    hangups: mpsc::Sender<String>,
) {
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let _ = w.write_all(b"Asterisk Call Manager/5.0.2\r\n");
    while let Some(a) = read_block(&mut r) {
        let get = |k: &str| a.get(k).and_then(|v| v.first()).cloned().unwrap_or_default();
        let (action, id) = (get("Action"), get("ActionID"));
        let mut out = format!("Response: Success\r\nActionID: {id}\r\nMessage: ok\r\n\r\n");
        match action.as_str() {
            "Originate" => {
                let ch = get("ChannelId");
                let name = format!("{}-00000001", get("Channel"));
                let _ = originates.send(a.clone());
                let page = plan.lock().unwrap().pop().unwrap_or(Page::NoDigit);
                let newchannel =
                    format!("Event: Newchannel\r\nChannel: {name}\r\nUniqueid: {ch}\r\nLinkedid: {ch}\r\n\r\n");
                let answered = format!(
                    "Event: OriginateResponse\r\nActionID: {id}\r\nResponse: Success\r\nChannel: {name}\r\nReason: 4\r\nUniqueid: {ch}\r\n\r\n"
                );
                let hangup = format!(
                    "Event: Hangup\r\nChannel: {name}\r\nUniqueid: {ch}\r\nLinkedid: {ch}\r\nCause: 16\r\n\r\n"
                );
                let failed = |cause: u8, reason: u8| {
                    format!(
                        "{newchannel}Event: Hangup\r\nChannel: {name}\r\nUniqueid: {ch}\r\nLinkedid: {ch}\r\nCause: {cause}\r\n\r\n\
                         Event: OriginateResponse\r\nActionID: {id}\r\nResponse: Failure\r\nChannel: {}\r\nReason: {reason}\r\nUniqueid: <null>\r\n\r\n",
                        get("Channel")
                    )
                };
                // The order Asterisk writes them in: the failed channel hangs
                // up before the OriginateResponse says why.
                out += &match page {
                    Page::Digit(d) => format!(
                        "{newchannel}{answered}Event: UserEvent\r\nUserEvent: DispatchdPage\r\nUniqueid: {ch}\r\nIncident: {}\r\nDispatch: {}\r\nChoice: {d}\r\n\r\n{hangup}",
                        var(&a, "DISPATCHD_INCIDENT"),
                        var(&a, "DISPATCHD_DISPATCH")
                    ),
                    Page::Busy => failed(17, 5),
                    Page::NoAnswer => failed(19, 3),
                    Page::NoDigit => format!("{newchannel}{answered}{hangup}"),
                    Page::Ring => newchannel,
                };
            }
            "Hangup" => {
                let _ = hangups.send(get("Channel"));
            }
            "Ping" => out = format!("Response: Success\r\nActionID: {id}\r\nPing: Pong\r\n\r\n"),
            _ => {}
        }
        if w.write_all(out.as_bytes()).is_err() {
            return;
        }
    }
}

/// A channel variable of an Originate.
fn var(a: &HashMap<String, Vec<String>>, name: &str) -> String {
    a.get("Variable")
        .into_iter()
        .flatten()
        .find_map(|v| v.strip_prefix(&format!("{name}=")).map(str::to_string))
        .unwrap_or_default()
}

fn ami_toml(ami: &Ami) -> String {
    format!(
        "[acd]\nmax_backoff = \"500ms\"\n[acd.asterisk]\naddress = \"127.0.0.1:{}\"\nusername = \"dispatchd\"\nsecret = \"s\"\n",
        ami.port
    )
}

fn short_escalation(ack: &str) -> String {
    escalation(ack, 3)
}

// ---- the tests --------------------------------------------------------------------

/// A responder with no websocket but a webhook, put on call by a supervisor:
/// offered like any other, reached at once with a signed POST; a 500 is
/// tried again, a slow receiver times out, and every attempt is in the
/// timeline. The figure: offer → the POST arriving.
#[test]
fn a_responder_without_a_websocket_is_reached_at_once_by_webhook() {
    let redis = Redis::start();
    let hook = Hook::start();
    let extra = responder("r-hook", 1, &format!("webhook = \"{}\"", hook.url()))
        + &fallback("15s", "\"webhook\"")
        + &short_escalation("30s");
    let d = Daemon::start(&redis, Options { extra, ..Options::default() });
    // Never opened a console: off duty until a supervisor puts it on call.
    let id0 = place_call(&d, "hook-0", "2,1");
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(d.incident(&id0)["state"], "queued", "not on call yet");
    put_available(&d, "r-hook");

    let (body, signed, arrived) = hook.next();
    assert!(signed, "the signature checks: {body}");
    assert_eq!((body["type"].as_str(), body["incident_id"].as_str()), (Some("dispatch"), Some(id0.as_str())));
    assert_eq!(body["severity"], "critical");
    assert!(body["caller"].as_str().unwrap().starts_with('•'), "masked: {body}");
    wait_contacted(&d, &id0, "webhook", "delivered");
    let inc = d.incident(&id0);
    assert_eq!((inc["state"].as_str(), inc["assigned_to"].as_str()), (Some("offered"), Some("r-hook")));
    let offered_at =
        inc["timeline"].as_array().unwrap().iter().find(|e| e["event"] == "offered").unwrap()["at"].clone();
    eprintln!("offer {offered_at} → webhook received {:?} after the PUT", arrived);

    // A receiver that fails once, then takes it; then a slow one (times out).
    r#impl_close(&d, &id0);
    hook.replies.lock().unwrap().extend([Reply::Status(200), Reply::Status(500)]);
    let id1 = place_call(&d, "hook-1", "2");
    let (first, ..) = hook.next();
    let (second, ..) = hook.next();
    assert_eq!(
        (first["incident_id"].as_str(), second["incident_id"].as_str()),
        (Some(id1.as_str()), Some(id1.as_str()))
    );
    wait_contacted(&d, &id1, "webhook", "delivered");
    r#impl_close(&d, &id1);
    hook.replies.lock().unwrap().extend([Reply::Slow, Reply::Slow]);
    let id2 = place_call(&d, "hook-2", "2");
    wait_contacted(&d, &id2, "webhook", "timeout");
}

/// Resolves an incident by hand, so the responder is free for the next one.
fn r#impl_close(d: &Daemon, id: &str) {
    let (status, body) =
        http(d.http_port, "POST", &format!("/v1/incidents/{id}/resolve"), Some(ADMIN_TOKEN), Some("{}"));
    assert_eq!(status, 200, "{body}");
}

/// Whether a UDP socket is bound to `port` (/proc/net/udp): sipp is listening.
fn udp_bound(port: u16) -> bool {
    let needle = format!(":{port:04X} ");
    ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .any(|t| t.lines().any(|l| l.split_whitespace().nth(1).is_some_and(|a| format!("{a} ").ends_with(&needle))))
}

fn sipp_phone(status: u16, dir: &std::path::Path) -> (Child, u16) {
    let port = free_port();
    // sipp reads a response's status code when it loads the scenario, before
    // any -key substitution: write this phone's copy with the code in place.
    let text = std::fs::read_to_string(scenario("message_phone_uas.xml")).unwrap();
    let file = dir.join(format!("message_phone_{status}.xml"));
    std::fs::write(&file, text.replace("[status]", &status.to_string())).unwrap();
    let child = Command::new("sipp")
        .args(["-sf"])
        .arg(&file)
        .args(["-i", "127.0.0.1", "-p", &port.to_string(), "-m", "1", "-nostdin", "-timeout", "20s"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("sipp");
    wait_until("sipp listening", S10, || udp_bound(port));
    (child, port)
}

/// SIP MESSAGE to sipp as the responder's phone: a 200 is delivered (not an
/// acknowledgement); a 404 is a failure and the next channel (the webhook)
/// goes at once; a phone that never answers times out, then the webhook.
#[test]
fn sip_message_delivered_refused_and_unanswered() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start();
    let hook = Hook::start();
    let (mut ok_phone, ok_port) = sipp_phone(200, dir.path());
    let (mut no_phone, no_port) = sipp_phone(404, dir.path());
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let contact = |port: u16| format!("sip_uri = \"sip:crew@127.0.0.1:{port}\"\nwebhook = \"{}\"", hook.url());
    let extra = responder("r-ok", 1, &contact(ok_port))
        + &responder("r-404", 1, &contact(no_port))
        + &responder("r-silent", 1, &contact(silent_port))
        + &fallback("15s", "\"sip_message\", \"webhook\"")
        + &short_escalation("60s");
    let d = Daemon::start(&redis, Options { extra, ..Options::default() });
    for id in ["r-ok", "r-404", "r-silent"] {
        put_available(&d, id);
    }
    let ids: Vec<String> = (0..3).map(|i| place_call(&d, &format!("msg-{i}"), "2,1")).collect();
    let who = |id: &str| d.incident(id)["assigned_to"].as_str().unwrap_or("").to_string();
    wait_until("all offered", S10, || ids.iter().all(|i| !who(i).is_empty()));
    let by = |rid: &str| ids.iter().find(|i| who(i) == rid).unwrap().clone();
    let (ok, refused, silent_inc) = (by("r-ok"), by("r-404"), by("r-silent"));

    wait_contacted(&d, &ok, "sip_message", "delivered");
    assert_eq!(d.incident(&ok)["state"], "offered", "delivered is not acknowledged");
    wait_contacted(&d, &refused, "sip_message", "404");
    wait_contacted(&d, &refused, "webhook", "delivered");
    wait_contacted(&d, &silent_inc, "sip_message", "timeout");
    wait_contacted(&d, &silent_inc, "webhook", "delivered");
    // The MESSAGE the phone got named the incident (the scenario checks X-Incident-Id).
    assert!(ok_phone.wait().unwrap().success(), "sipp phone (200)");
    assert!(no_phone.wait().unwrap().success(), "sipp phone (404)");
    drop(silent);
}

/// A phone that answers everything but a proper answer to the MESSAGE: garbage,
/// someone else's 200, a 200 to another method, a non-UTF-8 status line and
/// an oversized datagram. None of them counts: the MESSAGE times out.
fn lying_phone() -> (UdpSocket, u16) {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = sock.local_addr().unwrap().port();
    let s2 = sock.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = s2.recv_from(&mut buf) {
            let req = String::from_utf8_lossy(&buf[..n]).into_owned();
            let h = |name: &str| header_of(&req, name).unwrap_or_default().to_string();
            let answer = |call_id: &str, cseq: &str| {
                format!(
                    "SIP/2.0 200 OK\r\nVia: {}\r\nFrom: {}\r\nTo: {};tag=x\r\nCall-ID: {call_id}\r\nCSeq: {cseq}\r\nContent-Length: 0\r\n\r\n",
                    h("Via"),
                    h("From"),
                    h("To")
                )
                .into_bytes()
            };
            let mut not_utf8 = answer(&h("Call-ID"), "1 MESSAGE");
            not_utf8.splice(8..10, [0xc3, 0x28]);
            for reply in [
                b"garbage\r\n\r\n".to_vec(),
                answer("someone-else@x", "1 MESSAGE"),
                answer(&h("Call-ID"), "1 INVITE"),
                not_utf8,
                vec![0xff; 65_000],
            ] {
                let _ = s2.send_to(&reply, from);
            }
        }
    });
    (sock, port)
}

/// Hostile far ends and bodies: a phone that answers anything but a proper
/// answer (the MESSAGE times out, the webhook goes at once); webhook
/// receivers that answer bytes that are not HTTP, endless headers, or close
/// at once (`bad_answer`, tried again); the supervisor's availability
/// endpoint with bad tokens, ids and bodies. The daemon keeps serving.
#[test]
fn hostile_far_ends_and_availability_bodies() {
    let redis = Redis::start();
    let hook = Hook::start();
    let (phone, phone_port) = lying_phone();
    let extra =
        responder("r-x", 1, &format!("sip_uri = \"sip:crew@127.0.0.1:{phone_port}\"\nwebhook = \"{}\"", hook.url()))
            + &fallback("15s", "\"sip_message\", \"webhook\"")
            + &short_escalation("60s");
    let d = Daemon::start(&redis, Options { extra, ..Options::default() });

    // The availability endpoint refuses what is not for it.
    let put = |id: &str, token: Option<&str>, body: &str| {
        http(d.http_port, "PUT", &format!("/v1/responders/{id}/availability"), token, Some(body))
    };
    assert_eq!(put("r-x", None, r#"{"status":"available"}"#).0, 401);
    assert_eq!(put("r-x", Some("wrong"), r#"{"status":"available"}"#).0, 401);
    assert_eq!(put("nobody", Some(ADMIN_TOKEN), r#"{"status":"available"}"#).0, 404);
    assert_eq!(put("r-%C3%BC%00", Some(ADMIN_TOKEN), r#"{"status":"available"}"#).0, 404);
    for bad in [
        "",
        "not json",
        "[]",
        "null",
        r#"{"status":"maybe"}"#,
        r#"{"status":7}"#,
        r#"{"status":"AVAILABLE"}"#,
        "{\"status\":\"availablé\"}",
    ] {
        let (status, body) = put("r-x", Some(ADMIN_TOKEN), bad);
        assert_eq!(status, 400, "{bad:?}: {body}");
        assert!(body.contains("\"error\""), "{body}");
    }
    let huge = format!(r#"{{"status":"available","pad":"{}"}}"#, "x".repeat(2 << 20));
    assert_eq!(put("r-x", Some(ADMIN_TOKEN), &huge).0, 413);
    let (_, list) = http(d.http_port, "GET", "/v1/responders", Some(ADMIN_TOKEN), None);
    assert!(list.contains("\"availability\":\"off_duty\""), "nothing set by a bad request: {list}");
    put_available(&d, "r-x");

    // The lying phone: timeout; the receiver lies twice (one try and one retry).
    hook.replies.lock().unwrap().extend([Reply::Close, Reply::Garbage]);
    let id = place_call(&d, "hostile-1", "2,1");
    wait_contacted(&d, &id, "sip_message", "timeout");
    wait_contacted(&d, &id, "webhook", "bad_answer");
    r#impl_close(&d, &id);
    hook.replies.lock().unwrap().extend([Reply::EndlessHeaders, Reply::EndlessHeaders]);
    let id = place_call(&d, "hostile-2", "2,1");
    wait_contacted(&d, &id, "webhook", "bad_answer");
    r#impl_close(&d, &id);

    // Still serving, and an honest receiver is reached.
    let id = place_call(&d, "hostile-3", "2,1");
    wait_contacted(&d, &id, "webhook", "delivered");
    assert_eq!(http(d.http_port, "GET", "/readyz", None, None).0, 200);
    let m = d.metrics();
    assert!(metric_value(&m, "dispatchd_contact_outcomes_total", "failed") >= 3.0, "{m}");
    drop(phone);
}

/// Page calls through an in-test Asterisk: the Originate carries the
/// incident, the dispatch and the text; digit 1 acknowledges, digit 2
/// declines (the next responder is offered), busy and no digit go on.
#[test]
fn ami_page_calls_digit_one_two_busy_and_no_digit() {
    let redis = Redis::start();
    let ami = Ami::start();
    let extra = responder("r-phone", 1, "phone = \"PJSIP/1001\"")
        + &responder("r-next", 2, "phone = \"PJSIP/1002\"")
        + &fallback("15s", "\"pbx_call\"")
        + &short_escalation("60s")
        + &ami_toml(&ami);
    let d = Daemon::start(&redis, Options { extra, ..Options::default() });
    put_available(&d, "r-phone");

    // Digit 1: acknowledged through the call.
    ami.then(Page::Digit('1'));
    let id = place_call(&d, "page-1", "2,1");
    let o = ami.originates.recv_timeout(S10).expect("an Originate");
    let get = |k: &str| o.get(k).and_then(|v| v.first()).cloned().unwrap_or_default();
    assert_eq!(
        (get("Channel").as_str(), get("Context").as_str(), get("Exten").as_str()),
        ("PJSIP/1001", "dispatchd-page", "s")
    );
    assert_eq!(get("Async"), "true");
    assert!(!get("ChannelId").is_empty() && get("ActionID").contains(&get("ChannelId")));
    assert_eq!(var(&o, "DISPATCHD_INCIDENT"), id);
    assert_eq!(var(&o, "DISPATCHD_DISPATCH"), format!("{id}.1"));
    assert!(var(&o, "DISPATCHD_TEXT").contains("CRITICAL outage"), "{o:?}");
    wait_until("acknowledged by digit", S10, || d.incident(&id)["state"] == "acknowledged");
    let ack =
        d.incident(&id)["timeline"].as_array().unwrap().iter().find(|e| e["event"] == "acknowledged").unwrap().clone();
    assert_eq!(ack["detail"]["channel"], "pbx_call", "{ack}");
    wait_contacted(&d, &id, "pbx_call", "acknowledged");
    r#impl_close(&d, &id);

    // Digit 2: declined; the next tier is offered.
    put_available(&d, "r-next");
    ami.then(Page::Digit('2'));
    ami.then(Page::Busy); // r-next's line is busy
    let id = place_call(&d, "page-2", "2,1");
    wait_until("declined, then offered to r-next", S10, || d.incident(&id)["assigned_to"] == "r-next");
    wait_contacted(&d, &id, "pbx_call", "declined");
    wait_contacted(&d, &id, "pbx_call", "busy");
    r#impl_close(&d, &id);

    // An answered call without a digit: no_digit, and nothing acknowledged.
    ami.then(Page::NoDigit);
    let id = place_call(&d, "page-3", "2,1");
    wait_contacted(&d, &id, "pbx_call", "no_digit");
    assert_eq!(d.incident(&id)["state"], "offered");
    r#impl_close(&d, &id);

    // Rang out unanswered.
    ami.then(Page::NoAnswer);
    let id = place_call(&d, "page-4", "2,1");
    wait_contacted(&d, &id, "pbx_call", "no_answer");
    assert_eq!(d.incident(&id)["state"], "offered");
}

// ---- an in-test FreeSWITCH (event socket, inbound) ---------------------------------

/// An event on the ESL wire: `text/event-plain`, values URL-encoded, an
/// optional body of the event's own (a `BACKGROUND_JOB`'s result).
fn esl_event(fields: &[(&str, &str)], body: Option<&str>) -> String {
    let enc = |v: &str| v.replace('%', "%25").replace(' ', "%20").replace(':', "%3A").replace('\n', "%0A");
    let mut b: String = fields.iter().map(|(k, v)| format!("{k}: {}\n", enc(v))).collect();
    match body {
        Some(x) => b += &format!("Content-Length: {}\n\n{x}", x.len()),
        None => b.push('\n'),
    }
    format!("Content-Length: {}\nContent-Type: text/event-plain\n\n{b}", b.len())
}

struct Esl {
    port: u16,
    plan: Arc<Mutex<Vec<Page>>>,
    originates: mpsc::Receiver<String>,
    kills: mpsc::Receiver<String>,
}

impl Esl {
    fn start() -> Esl {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let plan: Arc<Mutex<Vec<Page>>> = Arc::default();
        let (otx, originates) = mpsc::channel();
        let (ktx, kills) = mpsc::channel();
        let p2 = plan.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let (p2, otx, ktx) = (p2.clone(), otx.clone(), ktx.clone());
                std::thread::spawn(move || esl_session(s, p2, otx, ktx));
            }
        });
        Esl { port, plan, originates, kills }
    }

    fn then(&self, p: Page) {
        self.plan.lock().unwrap().insert(0, p);
    }
}

/// Reads one ESL command (up to its blank line).
fn esl_command(r: &mut BufReader<TcpStream>) -> Option<String> {
    let mut cmd = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if line.trim_end().is_empty() {
            if cmd.is_empty() {
                continue;
            }
            return Some(cmd);
        }
        cmd.push_str(&line);
    }
}

/// mod_event_socket as FreeSWITCH speaks it: the greeting, `auth`, the
/// subscription, then `bgapi` jobs. An originate answers `+OK Job-UUID`, then
/// plays its page: the channel's events and the job's result, in the order
/// FreeSWITCH writes them (a failed call hangs up before the job says why).
fn esl_session(
    s: TcpStream,
    plan: Arc<Mutex<Vec<Page>>>,
    originates: mpsc::Sender<String>,
    kills: mpsc::Sender<String>,
) {
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let _ = w.write_all(b"Content-Type: auth/request\n\n");
    while let Some(cmd) = esl_command(&mut r) {
        let first = cmd.lines().next().unwrap_or("").to_string();
        let reply = |text: &str| format!("Content-Type: command/reply\nReply-Text: {text}\n\n");
        let out = if first.starts_with("auth ") {
            reply("+OK accepted")
        } else if first.starts_with("event plain") {
            reply("+OK event listener enabled plain")
        } else if first.starts_with("api ") {
            let body = "UP 0 years, 0 days\n";
            format!("Content-Type: api/response\nContent-Length: {}\n\n{body}", body.len())
        } else if let Some(arg) = first.strip_prefix("bgapi originate ") {
            let job = cmd.lines().find_map(|l| l.strip_prefix("Job-UUID: ")).unwrap_or("").trim().to_string();
            let mut out = format!("Content-Type: command/reply\nReply-Text: +OK Job-UUID: {job}\nJob-UUID: {job}\n\n");
            let _ = originates.send(arg.to_string());
            let uuid = arg
                .split("origination_uuid=")
                .nth(1)
                .and_then(|x| x.split([',', '}']).next())
                .unwrap_or("")
                .to_string();
            let var = |name: &str| {
                arg.split(&format!("{name}='")).nth(1).and_then(|x| x.split('\'').next()).unwrap_or("").to_string()
            };
            let job_done = |result: &str| {
                esl_event(
                    &[("Event-Name", "BACKGROUND_JOB"), ("Job-UUID", &job), ("Job-Command", "originate")],
                    Some(&format!("{result}\n")),
                )
            };
            let hangup = |cause: &str| {
                esl_event(&[("Event-Name", "CHANNEL_HANGUP"), ("Unique-ID", &uuid), ("Hangup-Cause", cause)], None)
            };
            let ok = job_done(&format!("+OK {uuid}"));
            let page = plan.lock().unwrap().pop().unwrap_or(Page::NoDigit);
            out += &match page {
                Page::Digit(d) => {
                    let choice = d.to_string();
                    let digit = esl_event(
                        &[
                            ("Event-Name", "CUSTOM"),
                            ("Event-Subclass", "dispatchd::page"),
                            ("Unique-ID", &uuid),
                            ("Incident", &var("dispatchd_incident")),
                            ("Dispatch", &var("dispatchd_dispatch")),
                            ("Choice", &choice),
                        ],
                        None,
                    );
                    format!("{ok}{digit}{}", hangup("NORMAL_CLEARING"))
                }
                Page::Busy => hangup("USER_BUSY") + &job_done("-ERR USER_BUSY"),
                Page::NoAnswer => hangup("NO_ANSWER") + &job_done("-ERR NO_ANSWER"),
                Page::NoDigit => format!("{ok}{}", hangup("NORMAL_CLEARING")),
                Page::Ring => String::new(),
            };
            out
        } else if let Some(uuid) = first.strip_prefix("bgapi uuid_kill ") {
            let _ = kills.send(uuid.trim().to_string());
            reply("+OK Job-UUID: 00000000-0000-0000-0000-000000000000")
        } else {
            reply("-ERR command not found")
        };
        if w.write_all(out.as_bytes()).is_err() {
            return;
        }
    }
}

/// Page calls through an in-test FreeSWITCH: `bgapi originate` with the
/// call's uuid and the variables; digit 1, digit 2, busy, no answer and an
/// answered call without a digit; a ringing call killed when the responder
/// acknowledges on the websocket.
#[test]
fn esl_page_calls_digit_one_two_busy_no_answer_and_no_digit() {
    let redis = Redis::start();
    let esl = Esl::start();
    let extra = responder("r-fs", 1, "phone = \"user/1001\"")
        + &responder("r-fs2", 2, "phone = \"user/1002\"")
        + &fallback("1s", "\"pbx_call\"")
        + &short_escalation("60s")
        + &format!(
            "[acd]\nmax_backoff = \"500ms\"\n[acd.freeswitch]\naddress = \"127.0.0.1:{}\"\npassword = \"ClueCon\"\n",
            esl.port
        );
    let d = Daemon::start(&redis, Options { extra, ..Options::default() });
    put_available(&d, "r-fs");

    esl.then(Page::Digit('1'));
    let id = place_call(&d, "fs-1", "2,1");
    let o = esl.originates.recv_timeout(S10).expect("a bgapi originate");
    assert!(o.starts_with("{origination_uuid="), "{o}");
    assert!(o.ends_with("}user/1001 s XML dispatchd-page"), "{o}");
    assert!(
        o.contains(&format!("dispatchd_incident='{id}'")) && o.contains(&format!("dispatchd_dispatch='{id}.1'")),
        "{o}"
    );
    assert!(o.contains("dispatchd_text='") && o.contains("CRITICAL outage"), "{o}");
    wait_until("acknowledged by digit", S10, || d.incident(&id)["state"] == "acknowledged");
    wait_contacted(&d, &id, "pbx_call", "acknowledged");
    r#impl_close(&d, &id);

    put_available(&d, "r-fs2");
    esl.then(Page::Digit('2'));
    esl.then(Page::Busy);
    let id = place_call(&d, "fs-2", "2,1");
    wait_until("declined, then offered to r-fs2", S10, || d.incident(&id)["assigned_to"] == "r-fs2");
    wait_contacted(&d, &id, "pbx_call", "declined");
    wait_contacted(&d, &id, "pbx_call", "busy");
    r#impl_close(&d, &id);

    esl.then(Page::NoAnswer);
    let id = place_call(&d, "fs-3", "2,1");
    wait_contacted(&d, &id, "pbx_call", "no_answer");
    r#impl_close(&d, &id);

    esl.then(Page::NoDigit);
    let id = place_call(&d, "fs-4", "2,1");
    wait_contacted(&d, &id, "pbx_call", "no_digit");
    assert_eq!(d.incident(&id)["state"], "offered");
    r#impl_close(&d, &id);

    // Acknowledged on the websocket while the call rings: uuid_kill.
    while esl.originates.try_recv().is_ok() {}
    let mut r = Responder::connect(&d, "r-fs");
    esl.then(Page::Ring);
    let id = place_call(&d, "fs-5", "2,1");
    let offer = r.recv_type("dispatch", S10).expect("the dispatch frame");
    let o = esl.originates.recv_timeout(S10).expect("an originate after fallback.after");
    let uuid = o.split("origination_uuid=").nth(1).unwrap().split(',').next().unwrap().to_string();
    assert_eq!(r.request(json!({"type": "ack", "dispatch_id": offer["dispatch_id"]}), "a")["type"], "ok");
    assert_eq!(esl.kills.recv_timeout(S10).expect("the ringing call killed"), uuid);
    wait_contacted(&d, &id, "pbx_call", "stopped");
}

/// An acknowledgement on the websocket while the page call rings: the call
/// is hung up, and one acknowledgement counts.
#[test]
fn a_websocket_ack_hangs_up_the_ringing_page_call() {
    let redis = Redis::start();
    let ami = Ami::start();
    let extra = responder("r-both", 1, "phone = \"PJSIP/1001\"")
        + &fallback("1s", "\"pbx_call\"")
        + &short_escalation("60s")
        + &ami_toml(&ami);
    let d = Daemon::start(&redis, Options { extra, ..Options::default() });
    let mut r = Responder::connect(&d, "r-both");
    wait_until("the AMI feed", S10, || metric_value(&d.metrics(), "dispatchd_acd_connected", "ami") == 1.0);
    ami.then(Page::Ring);
    let id = place_call(&d, "ring-1", "2,1");
    let offer = r.recv_type("dispatch", S10).expect("the dispatch frame");
    // fallback.after passes without an ack: the call goes out, and rings.
    let _ = ami.originates.recv_timeout(S10).expect("an Originate after fallback.after");
    let reply = r.request(json!({"type": "ack", "dispatch_id": offer["dispatch_id"]}), "a1");
    assert_eq!(reply["type"], "ok");
    let hung = ami.hangups.recv_timeout(S10).expect("the ringing call hung up");
    assert_eq!(hung, "PJSIP/1001-00000001");
    wait_contacted(&d, &id, "pbx_call", "stopped");
    let inc = d.incident(&id);
    assert_eq!(events(&inc).iter().filter(|e| *e == "acknowledged").count(), 1);
}

/// Acknowledged is not done: without `en_route` a reminder (frame and
/// timeline), then a release (`ack_expired`, cancel `released`) and the
/// incident is offered again; after `resolved`, no reminder.
#[test]
fn reminders_then_release_and_none_after_resolve() {
    let redis = Redis::start();
    let esc: String = ["critical", "high", "medium", "low"]
        .iter()
        .map(|s| format!("[escalation.{s}]\nack_timeout = \"60s\"\nen_route_within = \"1s\"\non_scene_within = \"1s\"\nrelease_after = 1\n"))
        .collect();
    let d = Daemon::start(
        &redis,
        Options { extra: roster(&[("r-a", 1, &["*"]), ("r-b", 2, &["*"])]) + &esc, ..Options::default() },
    );
    let mut a = Responder::connect(&d, "r-a");
    let mut b = Responder::connect(&d, "r-b");
    let id = place_call(&d, "rem-1", "2,1");
    let offer = a.recv_type("dispatch", S10).unwrap();
    assert_eq!(a.request(json!({"type": "ack", "dispatch_id": offer["dispatch_id"]}), "a")["type"], "ok");
    let reminder = a.recv_type("reminder", S10).expect("a reminder frame");
    assert_eq!((reminder["incident_id"].as_str(), reminder["due"].as_str()), (Some(id.as_str()), Some("en_route")));
    assert!(reminder["since"].as_str().is_some_and(|s| s.ends_with('Z')), "{reminder}");
    let cancel = a.recv_type("cancel", S10).expect("released");
    assert_eq!(cancel["reason"], "released");
    let again = b.recv_type("dispatch", S10).expect("offered again");
    assert_eq!(again["incident_id"], id.as_str());
    let ev = events(&d.incident(&id));
    assert!(ev.contains(&"reminded".to_string()) && ev.contains(&"ack_expired".to_string()), "{ev:?}");
    let m = d.metrics();
    assert!(
        metric_value(&m, "dispatchd_reminders_total", "en_route") >= 1.0
            && metric_value(&m, "dispatchd_releases_total", "") >= 1.0
    );

    // Resolved at once: no reminder ever.
    assert_eq!(b.request(json!({"type": "ack", "dispatch_id": again["dispatch_id"]}), "b1")["type"], "ok");
    assert_eq!(b.request(json!({"type": "status", "incident_id": id, "status": "resolved"}), "b2")["type"], "ok");
    std::thread::sleep(Duration::from_secs(3));
    let reminded = events(&d.incident(&id)).iter().filter(|e| *e == "reminded").count();
    assert_eq!(reminded, 1, "the one before the release, none after resolved");
    drop(a);
}

/// Two daemons on one Redis: each attempt is made once, not once per daemon.
#[test]
fn two_daemons_make_each_attempt_once() {
    let redis = Redis::start();
    let hook = Hook::start();
    let extra = responder("r-hook", 1, &format!("webhook = \"{}\"", hook.url()))
        + &fallback("15s", "\"webhook\"")
        + &short_escalation("60s");
    let d1 = Daemon::start(&redis, Options { extra: extra.clone(), ..Options::default() });
    let _d2 = Daemon::start_another(&redis, Options { extra, ..Options::default() });
    put_available(&d1, "r-hook");
    let id = place_call(&d1, "two-1", "2,1");
    let (body, ..) = hook.next();
    assert_eq!(body["incident_id"], id.as_str());
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(*hook.count.lock().unwrap(), 1, "one POST for one attempt");
    assert_eq!(contacted(&d1, &id).iter().filter(|(_, o)| o == "delivered").count(), 1);
}

/// A channel the daemon cannot use is refused at start, naming the key.
#[test]
fn channels_without_their_means_are_refused() {
    let cases = [
        (responder("r", 1, "phone = \"PJSIP/1001\""), "responder[0].phone"),
        (responder("r", 1, "webhook = \"http://127.0.0.1:1/x\""), "fallback.webhook_secret"),
        (responder("r", 1, "webhook = \"ftp://x\"") + &fallback("15s", "\"webhook\""), "responder[0].webhook"),
        (responder("r", 1, "sip_uri = \"tel:+4412345\""), "responder[0].sip_uri"),
        (fallback("15s", "\"webhook\", \"webhook\""), "fallback.order"),
        (fallback("15s", "\"carrier_pigeon\""), "fallback.order"),
    ];
    assert_refused(cases);
}
