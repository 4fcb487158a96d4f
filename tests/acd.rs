//! The PBX event feeds end to end (issue 5): the real binary connects to an
//! in-test Asterisk Manager Interface or FreeSWITCH event socket server that
//! speaks the real wire format and replays transcripts (`tests/acd/*.txt`);
//! results are read back through the HTTP API and `/metrics`, with a real Redis.
//!
//! Transcript files: blocks separated by a blank line, one message each;
//! lines starting with `;;` are comments. AMI blocks are sent with CRLF line
//! endings and a closing blank line; ESL blocks are event bodies, wrapped in a
//! `text/event-plain` envelope with their Content-Length.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(10);
const AMI_SECRET: &str = "Ami-S3cret-never-logged";
const ESL_PASSWORD: &str = "Esl-Pa55word-never-logged";
const AMI_CALLER: &str = "+441632960123";
const ESL_CALLER: &str = "+4930123456";
const ESL_SUBSCRIPTION: &str = "event plain CHANNEL_HANGUP DTMF BACKGROUND_JOB CUSTOM callcenter::info dispatchd::page";

// ---- transcripts -----------------------------------------------------------

fn blocks(name: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/acd").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    let mut cur: Vec<&str> = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with(";;")) {
        if line.trim().is_empty() {
            if !cur.is_empty() {
                out.push(cur.join("\n"));
                cur.clear();
            }
        } else {
            cur.push(line);
        }
    }
    if !cur.is_empty() {
        out.push(cur.join("\n"));
    }
    out
}

/// An AMI message on the wire: CRLF lines and the closing blank line.
fn ami_wire(block: &str) -> String {
    let mut s: String = block.lines().map(|l| format!("{l}\r\n")).collect();
    s.push_str("\r\n");
    s
}

/// A FreeSWITCH event on the wire: the envelope, then the body with its blank line.
fn esl_wire(body: &str) -> String {
    let mut b: String = body.lines().map(|l| format!("{l}\n")).collect();
    b.push('\n');
    format!("Content-Length: {}\nContent-Type: text/event-plain\n\n{b}", b.len())
}

// ---- the in-test PBX ---------------------------------------------------------

/// A listening socket the daemon's feed connects to; each test drives the
/// connections it accepts.
struct Pbx {
    listener: TcpListener,
}

impl Pbx {
    fn new() -> Pbx {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        Pbx { listener }
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.listener.local_addr().expect("addr").port())
    }

    /// The daemon's next connection, if it comes within `wait`.
    fn try_accept(&self, wait: Duration) -> Option<TcpStream> {
        let end = Instant::now() + wait;
        while Instant::now() < end {
            match self.listener.accept() {
                Ok((s, _)) => {
                    s.set_nonblocking(false).expect("blocking");
                    s.set_read_timeout(Some(WAIT)).expect("timeout");
                    return Some(s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => panic!("accept: {e}"),
            }
        }
        None
    }

    fn accept(&self) -> TcpStream {
        self.try_accept(WAIT).expect("the daemon did not connect")
    }
}

/// Reads from `s` until `buf` holds `end`; returns the text before it.
fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, end: &[u8]) -> String {
    loop {
        if let Some(i) = buf.windows(end.len()).position(|w| w == end) {
            let text = String::from_utf8_lossy(&buf[..i]).into_owned();
            buf.drain(..i + end.len());
            return text;
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).expect("read from the daemon");
        assert!(n > 0, "the daemon closed the connection; had {:?}", String::from_utf8_lossy(buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// One AMI connection, server side.
struct Ami {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Ami {
    /// Accepts and sends the banner.
    fn accept(pbx: &Pbx) -> Ami {
        Ami::accept_within(pbx, WAIT).expect("the daemon did not connect")
    }

    /// Accepts a connection that comes within `wait`, and sends the banner.
    fn accept_within(pbx: &Pbx, wait: Duration) -> Option<Ami> {
        let mut a = Ami { s: pbx.try_accept(wait)?, buf: Vec::new() };
        a.send_raw(b"Asterisk Call Manager/5.0.2\r\n");
        Some(a)
    }

    /// The next action, as `(key, value)` pairs.
    fn action(&mut self) -> Vec<(String, String)> {
        let text = read_until(&mut self.s, &mut self.buf, b"\r\n\r\n");
        text.split("\r\n")
            .filter_map(|l| l.split_once(':').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())))
            .collect()
    }

    /// Reads the Login action and answers it; Asterisk closes after a refusal.
    fn login(mut self, accept: bool) -> Option<Ami> {
        let action = self.action();
        let get = |k: &str| action.iter().find(|(key, _)| key.eq_ignore_ascii_case(k)).map(|(_, v)| v.clone());
        assert_eq!(get("Action").as_deref(), Some("Login"), "{action:?}");
        assert_eq!(get("Username").as_deref(), Some("dispatchd"));
        let events = get("Events").unwrap_or_default();
        for class in ["call", "agent", "dtmf"] {
            assert!(events.contains(class), "Events: {events}");
        }
        let id = get("ActionID").expect("the Login has an ActionID");
        if accept {
            assert_eq!(get("Secret").as_deref(), Some(AMI_SECRET));
            self.send_raw(
                format!("Response: Success\r\nActionID: {id}\r\nMessage: Authentication accepted\r\n\r\n").as_bytes(),
            );
            self.send_raw(b"Event: FullyBooted\r\nPrivilege: system,all\r\nStatus: Fully Booted\r\n\r\n");
            Some(self)
        } else {
            self.send_raw(
                format!("Response: Error\r\nActionID: {id}\r\nMessage: Authentication failed\r\n\r\n").as_bytes(),
            );
            None
        }
    }

    fn send(&mut self, block: &str) {
        self.send_raw(ami_wire(block).as_bytes());
    }

    fn send_all(&mut self, blocks: &[String]) {
        for b in blocks {
            self.send(b);
        }
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("write to the daemon");
    }
}

/// One ESL connection, server side.
struct Esl {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Esl {
    /// Accepts and sends the greeting.
    fn accept(pbx: &Pbx) -> Esl {
        let mut e = Esl { s: pbx.accept(), buf: Vec::new() };
        e.send_raw(b"Content-Type: auth/request\n\n");
        e
    }

    fn command(&mut self) -> String {
        read_until(&mut self.s, &mut self.buf, b"\n\n")
    }

    /// Reads `auth …` and answers it, then (accepted) the subscription.
    fn login(mut self, accept: bool) -> Option<Esl> {
        let auth = self.command();
        assert!(auth.starts_with("auth "), "{auth:?}");
        if !accept {
            self.send_raw(b"Content-Type: command/reply\nReply-Text: -ERR invalid\n\n");
            let bye = "Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n";
            self.send_raw(
                format!("Content-Type: text/disconnect-notice\nContent-Length: {}\n\n{bye}", bye.len()).as_bytes(),
            );
            return None;
        }
        assert_eq!(auth, format!("auth {ESL_PASSWORD}"));
        self.send_raw(b"Content-Type: command/reply\nReply-Text: +OK accepted\n\n");
        assert_eq!(self.command(), ESL_SUBSCRIPTION);
        self.send_raw(b"Content-Type: command/reply\nReply-Text: +OK event listener enabled plain\n\n");
        Some(self)
    }

    fn send(&mut self, body: &str) {
        self.send_raw(esl_wire(body).as_bytes());
    }

    fn send_all(&mut self, blocks: &[String]) {
        for b in blocks {
            self.send(b);
        }
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).expect("write to the daemon");
    }
}

// ---- the daemon -------------------------------------------------------------

fn ami_daemon(redis: &Redis, pbx: &Pbx) -> Daemon {
    let extra = format!(
        "[acd]\nincident_queues = [\"incident\"]\nmax_backoff = \"500ms\"\n\n\
         [acd.asterisk]\naddress = \"{}\"\nusername = \"dispatchd\"\nsecret = \"{AMI_SECRET}\"\n",
        pbx.address()
    );
    Daemon::start(redis, Options { extra, ..Default::default() })
}

fn esl_daemon(redis: &Redis, pbx: &Pbx) -> Daemon {
    let extra = format!(
        "[acd]\nincident_queues = [\"incident\", \"incident@default\"]\nmax_backoff = \"500ms\"\n\n\
         [acd.freeswitch]\naddress = \"{}\"\npassword = \"{ESL_PASSWORD}\"\n",
        pbx.address()
    );
    Daemon::start(redis, Options { extra, ..Default::default() })
}

fn connected(d: &Daemon, source: &str) -> f64 {
    metric_value(&d.metrics(), "dispatchd_acd_connected", &format!("source=\"{source}\""))
}

fn errors(d: &Daemon, source: &str, reason: &str) -> f64 {
    metric_value(&d.metrics(), "dispatchd_acd_errors_total", &format!("source=\"{source}\",reason=\"{reason}\""))
        + metric_value(&d.metrics(), "dispatchd_acd_errors_total", &format!("reason=\"{reason}\",source=\"{source}\""))
}

/// Waits until exactly `n` incidents exist; returns them.
fn wait_incidents(d: &Daemon, n: usize) -> Vec<Value> {
    wait_until(&format!("{n} incident(s)"), WAIT, || d.incidents("").len() >= n);
    let all = d.incidents("");
    assert_eq!(all.len(), n, "{all:#?}");
    all
}

fn count(inc: &Value, event: &str) -> usize {
    events(inc).iter().filter(|e| *e == event).count()
}

/// Waits until the incident's timeline has `event`; returns the incident.
fn wait_event(d: &Daemon, id: &str, event: &str) -> Value {
    wait_until(&format!("{event} on {id}"), WAIT, || count(&d.incident(id), event) > 0);
    d.incident(id)
}

fn assert_clean_log(d: &Daemon, caller: &str) {
    let log = d.log();
    assert!(!log.contains(AMI_SECRET) && !log.contains(ESL_PASSWORD), "a secret is in the log:\n{log}");
    assert!(!log.contains(caller), "the caller's number is in the log:\n{log}");
}

/// The whole life of the call of `ami_queue_call.txt` / `esl_callcenter.txt`.
fn assert_call_life(d: &Daemon, redis: &Redis, source: &str, caller: &str, queue: &str) {
    let all = wait_incidents(d, 1);
    let id = all[0]["id"].as_str().expect("id").to_string();
    let inc = wait_event(d, &id, "caller_hangup");
    // After every event of the call (digits and hang-ups included), the
    // caller's number is in the incident record and nowhere else (contract §7).
    assert_eq!(redis.keys_holding(caller), [format!("{{t}}:inc:{id}")]);
    assert_eq!(inc["source"], source, "{inc:#}");
    assert_eq!(inc["caller"], caller);
    assert_eq!(inc["queue"], queue);
    // Two digits: "2" (outage/high), then "2,1" (outage/critical).
    assert_eq!(inc["ivr_path"], serde_json::json!(["2", "1"]), "{inc:#}");
    assert_eq!(inc["category"], "outage");
    assert_eq!(inc["severity"], "critical");
    assert_eq!(count(&inc, "ivr_input"), 2, "{inc:#}");
    let classified: Vec<&str> = inc["timeline"]
        .as_array()
        .map(|t| {
            t.iter().filter(|e| e["event"] == "classified").filter_map(|e| e["detail"]["severity"].as_str()).collect()
        })
        .unwrap_or_default();
    assert_eq!(classified, ["medium", "high", "critical"], "triage, then 2, then 2,1: {inc:#}");
    assert_eq!(count(&inc, "answered_elsewhere"), 1, "{inc:#}");
    // The agent leg hung up before the caller: only the caller's hang-up counts.
    assert_eq!(count(&inc, "caller_hangup"), 1, "{inc:#}");
    let timeline = inc["timeline"].as_array().cloned().unwrap_or_default();
    let answered = timeline.iter().find(|e| e["event"] == "answered_elsewhere").expect("answered_elsewhere");
    assert_eq!(answered["actor"], source, "{answered}");
    assert!(answered["detail"]["agent"].as_str().is_some_and(|a| !a.is_empty()), "{answered}");
    let order: Vec<String> = events(&inc);
    let pos = |e: &str| order.iter().position(|x| x == e).unwrap_or(usize::MAX);
    assert!(
        pos("ivr_input") < pos("answered_elsewhere") && pos("answered_elsewhere") < pos("caller_hangup"),
        "{order:?}"
    );
}

// ---- Asterisk AMI -----------------------------------------------------------

#[test]
fn ami_call_life_opens_reclassifies_answers_and_hangs_up() {
    let redis = Redis::start();
    let pbx = Pbx::new();
    let d = ami_daemon(&redis, &pbx);
    let mut ami = Ami::accept(&pbx).login(true).expect("logged in");
    wait_until("ami connected", WAIT, || connected(&d, "ami") == 1.0);

    ami.send_all(&blocks("ami_queue_call.txt"));
    assert_call_life(&d, &redis, "ami", AMI_CALLER, "incident");
    let m = d.metrics();
    // Join, two digits, connect, complete, the caller's hang-up (not the agent leg's digit or hang-up).
    assert_eq!(metric_value(&m, "dispatchd_call_events_total", "source=\"ami\""), 6.0, "{m}");
    assert_clean_log(&d, AMI_CALLER);
}

#[test]
fn ami_login_failure_is_retried_until_a_login_works() {
    let redis = Redis::start();
    let pbx = Pbx::new();
    let d = ami_daemon(&redis, &pbx);
    assert!(Ami::accept(&pbx).login(false).is_none());
    // Asterisk closes after a refusal; the daemon comes back (250 ms later).
    assert!(Ami::accept(&pbx).login(false).is_none());
    let mut ami = Ami::accept(&pbx).login(true).expect("logged in");
    wait_until("ami connected", WAIT, || connected(&d, "ami") == 1.0);
    assert!(errors(&d, "ami", "login") >= 2.0, "{}", d.metrics());

    ami.send_all(&blocks("ami_queue_call.txt")[..2]);
    let all = wait_incidents(&d, 1);
    assert_eq!(all[0]["source"], "ami");
    assert!(d.log().contains("login refused"), "{}", d.log());
    assert_clean_log(&d, AMI_CALLER);
}

#[test]
fn ami_torn_event_is_not_applied_and_events_after_reconnect_are() {
    let redis = Redis::start();
    let pbx = Pbx::new();
    let d = ami_daemon(&redis, &pbx);
    let mut ami = Ami::accept(&pbx).login(true).expect("logged in");
    let call = blocks("ami_queue_call.txt");
    // Half a QueueCallerJoin, then the connection drops.
    let join = ami_wire(&call[1]);
    ami.send_raw(&join.as_bytes()[..join.len() / 2]);
    drop(ami);
    wait_until("ami disconnect counted", WAIT, || errors(&d, "ami", "disconnect") >= 1.0);
    // Not logged in again until this test answers the next Login.
    wait_until("ami disconnected", WAIT, || connected(&d, "ami") == 0.0);

    let mut ami = Ami::accept(&pbx).login(true).expect("logged in again");
    wait_until("ami connected", WAIT, || connected(&d, "ami") == 1.0);
    // Another caller's call, whole.
    let other = call[1].replace("1700000000.18", "1700000500.7").replace(AMI_CALLER, "+441632960999");
    ami.send(&other);
    let all = wait_incidents(&d, 1);
    assert_eq!(all[0]["caller"], "+441632960999", "the torn event was not applied");
    // The rest of the first call (without its join) opens nothing.
    ami.send_all(&call[2..]);
    ami.send(&other.replace("QueueCallerJoin", "DTMFEnd").replace("Queue: incident", "Digit: 9\nDirection: Received"));
    let id = all[0]["id"].as_str().expect("id");
    wait_event(&d, id, "ivr_input");
    assert_eq!(d.incidents("").len(), 1);
}

#[test]
fn ami_garbage_does_not_stop_the_feed() {
    let redis = Redis::start();
    let pbx = Pbx::new();
    let d = ami_daemon(&redis, &pbx);
    let mut ami = Ami::accept(&pbx).login(true).expect("logged in");
    wait_until("ami connected", WAIT, || connected(&d, "ami") == 1.0);

    // Binary junk, with and without line ends.
    ami.send_raw(b"\x00\x01\x02\xff\xfe\r\n\x7f\x80garbage:\xc3\x28\r\n\r\n");
    ami.send_raw(&[0xAAu8; 3000]);
    ami.send_raw(b"\r\n\r\n");
    // A 100 KB line inside an event, and an event of 80 KB.
    let mut big = b"Event: QueueCallerJoin\r\nUniqueid: 9.9\r\nQueue: incident\r\nVariable: ".to_vec();
    big.extend(std::iter::repeat_n(b'x', 100 * 1024));
    big.extend_from_slice(b"\r\n\r\n");
    ami.send_raw(&big);
    let mut many = b"Event: QueueCallerJoin\r\nUniqueid: 9.8\r\nQueue: incident\r\n".to_vec();
    for i in 0..20 {
        many.extend_from_slice(format!("Variable{i}: {}\r\n", "v".repeat(4000)).as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    ami.send_raw(&many);
    // Events missing fields, unknown events, responses nobody asked for.
    ami.send("Event: QueueCallerJoin\nQueue: incident");
    ami.send("Event: QueueCallerAbandon\nHoldTime: 900");
    ami.send("Event: DTMFEnd\nUniqueid: 1.2\nDirection: Received");
    ami.send("Event: Hangup\nCause: 16");
    ami.send("Event: Reload\nModule: manager\nStatus: 0");
    ami.send("Event: VarSet\nChannel: PJSIP/x\nVariable: FOO\nValue: bar\nUniqueid: 5.5\nLinkedid: 5.5");
    ami.send("Response: Success\nActionID: nobody\nPing: Pong");
    ami.send("no colon at all\nstill none");

    // The feed is still reading the same connection.
    ami.send_all(&blocks("ami_queue_call.txt"));
    assert_call_life(&d, &redis, "ami", AMI_CALLER, "incident");
    assert!(errors(&d, "ami", "framing") >= 2.0, "{}", d.metrics());
    assert!(pbx.try_accept(Duration::from_millis(300)).is_none(), "garbage must not cost the connection");
    assert!(d.alive_check());
}

#[test]
fn ami_abandon_after_61s_opens_a_callback_and_59s_does_not() {
    let redis = Redis::start();
    let pbx = Pbx::new();
    let d = ami_daemon(&redis, &pbx);
    let mut ami = Ami::accept(&pbx).login(true).expect("logged in");
    ami.send_all(&blocks("ami_abandon.txt"));
    // The 59 s caller hangs up last: once that is stored, everything before it is.
    wait_until("all events applied", WAIT, || {
        metric_value(&d.metrics(), "dispatchd_call_events_total", "source=\"ami\"") >= 5.0
    });
    let all = wait_incidents(&d, 1);
    assert_eq!(all[0]["category"], "callback", "{all:#?}");
    assert_eq!(all[0]["caller"], "+441632960201");
    assert_eq!(all[0]["source"], "ami");
    assert_eq!(all[0]["wait_seconds"], 61);
}

#[test]
fn ami_events_arriving_while_redis_is_down_are_applied_after_it_returns() {
    let mut redis = Redis::start();
    let pbx = Pbx::new();
    let d = ami_daemon(&redis, &pbx);
    let mut ami = Ami::accept(&pbx).login(true).expect("logged in");
    wait_until("ami connected", WAIT, || connected(&d, "ami") == 1.0);

    redis.kill();
    ami.send_all(&blocks("ami_queue_call.txt"));
    wait_until("the feed noticed Redis is away", Duration::from_secs(20), || d.log().contains("PBX feed paused"));
    redis.restart();
    assert_call_life(&d, &redis, "ami", AMI_CALLER, "incident");
}

// ---- FreeSWITCH ESL -----------------------------------------------------------

#[test]
fn esl_call_life_opens_reclassifies_answers_and_hangs_up() {
    let redis = Redis::start();
    let pbx = Pbx::new();
    let d = esl_daemon(&redis, &pbx);
    let mut esl = Esl::accept(&pbx).login(true).expect("logged in");
    wait_until("esl connected", WAIT, || connected(&d, "esl") == 1.0);

    esl.send_all(&blocks("esl_callcenter.txt"));
    assert_call_life(&d, &redis, "esl", ESL_CALLER, "incident@default");
    let inc = d.incident(d.incidents("")[0]["id"].as_str().expect("id"));
    assert_eq!(inc["caller_name"], "Jane Döe", "URL-decoded");
    assert_clean_log(&d, ESL_CALLER);
}

#[test]
fn esl_login_failure_is_retried_until_a_login_works() {
    let redis = Redis::start();
    let pbx = Pbx::new();
    let d = esl_daemon(&redis, &pbx);
    assert!(Esl::accept(&pbx).login(false).is_none());
    assert!(Esl::accept(&pbx).login(false).is_none());
    let mut esl = Esl::accept(&pbx).login(true).expect("logged in");
    wait_until("esl connected", WAIT, || connected(&d, "esl") == 1.0);
    assert!(errors(&d, "esl", "login") >= 2.0, "{}", d.metrics());

    esl.send_all(&blocks("esl_callcenter.txt")[..1]);
    let all = wait_incidents(&d, 1);
    assert_eq!(all[0]["source"], "esl");
    assert_clean_log(&d, ESL_CALLER);
}

#[test]
fn esl_torn_event_is_not_applied_and_events_after_reconnect_are() {
    let redis = Redis::start();
    let pbx = Pbx::new();
    let d = esl_daemon(&redis, &pbx);
    let mut esl = Esl::accept(&pbx).login(true).expect("logged in");
    let call = blocks("esl_callcenter.txt");
    let join = esl_wire(&call[0]);
    esl.send_raw(&join.as_bytes()[..join.len() - 40]);
    drop(esl);
    wait_until("esl disconnect counted", WAIT, || errors(&d, "esl", "disconnect") >= 1.0);
    wait_until("esl disconnected", WAIT, || connected(&d, "esl") == 0.0);

    let mut esl = Esl::accept(&pbx).login(true).expect("logged in again");
    let other = call[0]
        .replace("5c4bd4f6-2b6b-4b2c-9a53-6f0f4b3f1c11", "aaaaaaaa-0000-4000-8000-000000000001")
        .replace("%2B4930123456", "%2B4930999999");
    esl.send(&other);
    let all = wait_incidents(&d, 1);
    assert_eq!(all[0]["caller"], "+4930999999", "the torn event was not applied");
    esl.send_all(&call[1..]);
    wait_until("rest of the first call applied", WAIT, || {
        metric_value(&d.metrics(), "dispatchd_call_events_total", "source=\"esl\",event=\"hangup\"")
            + metric_value(&d.metrics(), "dispatchd_call_events_total", "event=\"hangup\",source=\"esl\"")
            >= 2.0
    });
    assert_eq!(d.incidents("").len(), 1, "a call whose join was torn opens nothing later");
}

#[test]
fn esl_garbage_does_not_stop_the_feed() {
    let redis = Redis::start();
    let pbx = Pbx::new();
    let d = esl_daemon(&redis, &pbx);
    let mut esl = Esl::accept(&pbx).login(true).expect("logged in");
    wait_until("esl connected", WAIT, || connected(&d, "esl") == 1.0);

    // Inside a well-framed body junk costs only that line: these keep the connection.
    esl.send("Event-Name: CUSTOM\nEvent-Subclass: callcenter%3A%3Ainfo\nCC-Action: member-queue-start");
    esl.send("Event-Name: DTMF\nUnique-ID: x\nno colon here\n\u{1}\u{2}: junk");
    esl.send("Event-Name: HEARTBEAT\nUp-Time: 0%20years");
    esl.send("Event-Name: CUSTOM\nEvent-Subclass: sofia%3A%3Aregister\nUnique-ID: y");
    esl.send(&format!("Event-Name: CHANNEL_HANGUP\nVariable-Huge: {}", "x".repeat(100 * 1024)));
    esl.send_raw(b"Content-Type: log/data\nContent-Length: 5\n\nhello");
    // Binary junk where an envelope should be: the stream cannot be framed any more.
    esl.send_raw(b"\x00\x01\x02\xff\xfe junk\n\n");
    wait_until("esl framing error counted", WAIT, || errors(&d, "esl", "framing") >= 1.0);

    // It reconnects; a 100 KB envelope line is the same story.
    let mut esl = Esl::accept(&pbx).login(true).expect("logged in again");
    let mut long = b"Content-Type: text/event-plain\nX-Filler: ".to_vec();
    long.extend(std::iter::repeat_n(b'z', 100 * 1024));
    // FreeSWITCH-side write errors are fine: the daemon may hang up before the end.
    let _ = esl.s.write_all(&long);
    wait_until("esl framing error counted twice", WAIT, || errors(&d, "esl", "framing") >= 2.0);

    let mut esl2 = Esl::accept(&pbx).login(true).expect("logged in a third time");
    drop(esl);
    esl2.send_all(&blocks("esl_callcenter.txt"));
    assert_call_life(&d, &redis, "esl", ESL_CALLER, "incident@default");
    assert!(d.alive_check());
}

#[test]
fn esl_abandon_after_61s_opens_a_callback_and_59s_does_not() {
    let redis = Redis::start();
    let pbx = Pbx::new();
    let d = esl_daemon(&redis, &pbx);
    let mut esl = Esl::accept(&pbx).login(true).expect("logged in");
    esl.send_all(&blocks("esl_abandon.txt"));
    wait_until("all events applied", WAIT, || {
        metric_value(&d.metrics(), "dispatchd_call_events_total", "source=\"esl\"") >= 4.0
    });
    let all = wait_incidents(&d, 1);
    assert_eq!(all[0]["category"], "callback", "{all:#?}");
    assert_eq!(all[0]["caller"], "+4930555061");
    assert_eq!(all[0]["source"], "esl");
    assert_eq!(all[0]["wait_seconds"], 61);
}

trait AliveCheck {
    fn alive_check(&self) -> bool;
}

impl AliveCheck for Daemon {
    /// The daemon still answers HTTP (it did not crash on the input).
    fn alive_check(&self) -> bool {
        http_get(self.http_port, "/readyz", None).0 == 200
    }
}

#[test]
fn ami_digits_reclassify_an_incident_the_invite_opened() {
    // The dialplan sends the INVITE with X-Call-Ref: ${CHANNEL(linkedid)}; the AMI
    // events of that call (same Linkedid) land on its incident, and the IVR path
    // goes on from where the INVITE left it.
    let redis = Redis::start();
    let pbx = Pbx::new();
    let d = ami_daemon(&redis, &pbx);
    let mut ami = Ami::accept(&pbx).login(true).expect("logged in");
    let p = UdpPeer::new(&d);
    p.send(invite(p.port(), "inv-ami-1", "X-Call-Ref: 1700000099.7\r\nX-IVR-Path: 2\r\n").as_bytes());
    let resp = p.recv_final(WAIT).expect("answer to the INVITE");
    let id = header_of(&resp, "X-Incident-Id").expect("incident id").to_string();
    assert_eq!(d.incident(&id)["severity"], "high");
    ami.send(
        "Event: DTMFEnd\nPrivilege: dtmf,all\nChannel: PJSIP/trunk-00000031\nCallerIDNum: +441632960777\n\
         Uniqueid: 1700000099.7\nLinkedid: 1700000099.7\nDigit: 1\nDurationMs: 120\nDirection: Received",
    );
    let inc = wait_event(&d, &id, "ivr_input");
    assert_eq!(inc["ivr_path"], json!(["2", "1"]), "{inc}");
    assert_eq!(inc["severity"], "critical");
    assert_eq!(d.incidents("").len(), 1, "no second incident for the AMI events");
}

// ---- several daemons, one feed ---------------------------------------------------

/// Two daemons configured with the same PBX: one reads the feed (a lease in
/// Redis), so each event is applied once; when it dies, the other takes the
/// feed over within ten seconds and the events after that are applied once too.
#[test]
fn two_daemons_one_ami_feed_apply_each_event_once_and_fail_over() {
    let redis = Redis::start();
    let pbx = Pbx::new();
    let mut daemons = [ami_daemon(&redis, &pbx), ami_daemon(&redis, &pbx)];
    let mut ami = Ami::accept(&pbx).login(true).expect("logged in");
    assert!(pbx.try_accept(Duration::from_secs(3)).is_none(), "a second daemon connected to the same feed");
    wait_until("the holder to say so", WAIT, || daemons.iter().any(|d| connected(d, "ami") == 1.0));
    let holder = daemons.iter().position(|d| connected(d, "ami") == 1.0).unwrap();
    let standby = 1 - holder;
    assert_eq!(connected(&daemons[standby], "ami"), 0.0);

    ami.send_all(&blocks("ami_queue_call.txt"));
    assert_call_life(&daemons[holder], &redis, "ami", AMI_CALLER, "incident");
    let applied = |d: &Daemon| metric_value(&d.metrics(), "dispatchd_call_events_total", "source=\"ami\"");
    assert_eq!(applied(&daemons[holder]) + applied(&daemons[standby]), 6.0, "each event applied by one daemon");

    // The holder dies without a word: the other connects within ten seconds (and a little slack).
    daemons[holder].kill9();
    let taken = Ami::accept_within(&pbx, Duration::from_secs(15)).expect("the standby took the feed over");
    let mut taken = taken.login(true).expect("logged in");
    wait_until("the standby to say so", WAIT, || connected(&daemons[standby], "ami") == 1.0);
    drop(ami);
    taken.send_all(&blocks("ami_abandon.txt"));
    let d = &daemons[standby];
    // Two calls' joins and abandons, and a hang-up (a queue leave is not a call event).
    wait_until("the abandons applied", WAIT, || applied(d) >= 5.0);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(applied(d), 5.0, "each once");
    let incidents = d.incidents("");
    assert_eq!(incidents.iter().filter(|i| i["category"] == "callback").count(), 1, "{incidents:#?}");
}
