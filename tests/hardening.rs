//! Issue 10: dispatchd tried as a hostile peer and as an operator rotating
//! secrets would. Each test here failed before its fix, through the real
//! binary: nothing crashes, nothing is folded away, nobody stays connected
//! who was let out, and work from the network is bounded.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const S5: Duration = Duration::from_secs(5);

fn responders(d: &Daemon) -> Vec<Value> {
    let (status, body) = http_get(d.http_port, "/v1/responders", Some(ADMIN_TOKEN));
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<Value>(&body).unwrap()["responders"].as_array().cloned().unwrap()
}

fn connected(d: &Daemon, id: &str) -> bool {
    responders(d).iter().any(|r| r["id"] == id && r["connected"] == true)
}

// ---- 1. a 30-byte frame ----------------------------------------------------------

/// An incident id ending in a non-ASCII character (or a zero-width space
/// pasted with it) used to panic the session task, which then never left the
/// registry: a phantom responder, connected for ever. Now: an error reply,
/// the session goes on, and it leaves when the client does.
#[test]
fn non_ascii_incident_ids_get_an_error_and_leave_no_phantom() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, Options { extra: roster(&[("r-a", 1, &["*"])]), ..Options::default() });
    let mut a = Responder::connect(&d, "r-a");
    for (i, id) in ["0000é", "INC-0001\u{200b}", "\u{1F6A8}", "é"].iter().enumerate() {
        let reply = a.request(json!({"type": "status", "incident_id": id, "status": "en_route"}), &format!("s{i}"));
        assert_eq!(reply["type"], "error", "{id:?}: {reply}");
    }
    // Still in service on the same socket.
    let ok = a.request(json!({"type": "availability", "status": "available"}), "alive");
    assert_eq!(ok["type"], "ok", "{ok}");
    // The same ids on the ops plane: a JSON 404, not a dropped connection.
    for path in ["/v1/incidents/0000%C3%A9", "/v1/incidents/INC-0001%E2%80%8B", "/v1/incidents/%F0%9F%9A%A8"] {
        let (status, body) = http_get(d.http_port, path, Some(ADMIN_TOKEN));
        assert_eq!((status, body.contains("not_found")), (404, true), "{path}: {status} {body}");
    }
    assert!(connected(&d, "r-a"));
    drop(a);
    wait_until("the responder to leave", S5, || !connected(&d, "r-a"));
    assert_still_serving(&d, "after-ids");
}

// ---- 3. revoked tokens -----------------------------------------------------------

/// A token taken away by a reload closes the connection that signed in with
/// it (4401); a responder whose token did not change stays.
#[test]
fn a_token_revoked_by_a_reload_closes_its_connection() {
    let redis = Redis::start();
    let d = Daemon::start(
        &redis,
        Options { heartbeat: "10s", extra: roster(&[("r-a", 1, &["*"]), ("r-b", 1, &["*"])]), ..Options::default() },
    );
    let mut a = Responder::connect(&d, "r-a");
    let mut b = Responder::connect(&d, "r-b");
    let old = sha256_hex("token-r-a");
    d.reload_with(|text| text.replace(&old, &sha256_hex("rotated-token-r-a")));
    assert_eq!(a.close_code(S5), Some(4401), "the old token's connection is closed");
    assert_eq!(b.request(json!({"type": "availability", "status": "busy"}), "b")["type"], "ok");
    // The old token no longer signs in; the new one does.
    assert_eq!(Responder::connect_raw(&d, Some("token-r-a")).close_code(S5), Some(4401));
    let mut again = Responder::connect_raw(&d, Some("rotated-token-r-a"));
    assert_eq!(again.recv(S5).expect("welcome")["responder_id"], "r-a");
}

// ---- 4. bounded work before signing in ---------------------------------------------

fn upgrade_request(port: u16) -> String {
    format!(
        "GET /v1/responders/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// Reads until EOF or an error; true when the server closed within `wait`.
fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let end = Instant::now() + wait;
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
    false
}

/// Before `welcome`, a connection cannot make the daemon read a big frame,
/// nor can one address hold more than a few such connections; a responder
/// still signs in once they are gone.
#[test]
fn unauthenticated_connections_are_capped_and_cannot_send_much() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, Options { extra: roster(&[("r-a", 1, &["*"])]), ..Options::default() });

    // A 1 MiB frame where `hello` belongs: the connection is dropped, not read.
    let mut s = TcpStream::connect(("127.0.0.1", d.ws_port)).unwrap();
    s.write_all(upgrade_request(d.ws_port).as_bytes()).unwrap();
    let mut head = [0u8; 1024];
    let n = s.read(&mut head).unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 101"), "upgraded");
    // A masked text frame header announcing 1 MiB, then the data.
    let len: u64 = 1 << 20;
    let mut frame = vec![0x81, 0xFF];
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    let _ = s.write_all(&frame);
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0;
    for _ in 0..16 {
        match s.write_all(&chunk) {
            Ok(()) => sent += chunk.len(),
            Err(_) => break,
        }
    }
    assert!(closed_within(&mut s, S5), "dropped after {sent} bytes");

    // Many idle connections from one address: only a few are kept waiting.
    let idle: Vec<TcpStream> = (0..40).map(|_| TcpStream::connect(("127.0.0.1", d.ws_port)).unwrap()).collect();
    let mut refused = 0;
    for mut c in idle {
        if closed_within(&mut c, Duration::from_millis(300)) {
            refused += 1;
        }
    }
    assert!(refused >= 40 - 16, "at most 16 unauthenticated connections per address: {refused} of 40 refused");
    let m = d.metrics();
    assert!(metric_value(&m, "dispatchd_connections_refused_total", "preauth_limit") >= 24.0, "counted");
    // Those are gone now; a responder signs in as usual.
    wait_until("room for a responder", S5, || {
        let mut r = Responder::connect_raw(&d, Some("token-r-a"));
        r.recv(Duration::from_secs(1)).is_some_and(|w| w["type"] == "welcome")
    });
}

/// A connection that upgrades and then says nothing is closed within the
/// 5 s of contract §4; one that never finishes its upgrade request too.
#[test]
fn silent_unauthenticated_connections_are_closed_within_five_seconds() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, Options::default());
    let mut upgraded = TcpStream::connect(("127.0.0.1", d.ws_port)).unwrap();
    upgraded.write_all(upgrade_request(d.ws_port).as_bytes()).unwrap();
    let mut half = TcpStream::connect(("127.0.0.1", d.ws_port)).unwrap();
    half.write_all(b"GET /v1/responders/ws HTTP/1.1\r\nHost: x\r\n").unwrap();
    // 5 s, and 2 s of slack for a loaded machine.
    assert!(closed_within(&mut upgraded, Duration::from_secs(7)), "silent after the upgrade");
    assert!(closed_within(&mut half, Duration::from_secs(7)), "an upgrade request never finished");
}

// ---- 2. a repeat caller reporting another kind of incident ---------------------------

/// Calls from one number; the Request-URI user and IVR path choose the kind.
fn call_as(d: &Daemon, call_id: &str, uri_user: &str, ivr: Option<&str>) -> String {
    let p = UdpPeer::new(d);
    let extra = ivr.map(|i| format!("X-IVR-Path: {i}\r\n")).unwrap_or_default();
    let inv = invite(p.port(), call_id, &extra).replacen("INVITE sip:incident@", &format!("INVITE sip:{uri_user}@"), 1);
    p.send(inv.as_bytes());
    let resp = p.recv_final(S5).expect("answer");
    p.send(ack_for(&resp, p.port(), call_id).as_bytes());
    header_of(&resp, "X-Incident-Id").unwrap_or_else(|| panic!("{resp}")).to_string()
}

/// A caller with an open outage who calls again about a security matter gets
/// a security incident of its own (dispatched like any other), linked to the
/// outage both ways; a repeat of the outage, or a call that chose nothing,
/// still joins an open incident.
#[test]
fn a_repeat_caller_of_another_category_gets_its_own_incident() {
    let redis = Redis::start();
    let d = Daemon::start(
        &redis,
        Options {
            correlation: String::new(),
            extra: roster(&[("r-a", 1, &["*"]), ("r-b", 1, &["*"])]),
            ..Options::default()
        },
    );
    let outage = call_as(&d, "rep-1", "incident", Some("2"));
    let security = call_as(&d, "rep-2", "incident-security", None);
    assert_ne!(outage, security, "another category is not folded into the open outage");
    let (o, s) = (d.incident(&outage), d.incident(&security));
    assert_eq!((o["category"].as_str(), s["category"].as_str()), (Some("outage"), Some("security")));
    assert_eq!(o["related"], json!([security.clone()]), "{o}");
    assert_eq!(s["related"], json!([outage.clone()]), "{s}");
    for (rec, other) in [(&o, &security), (&s, &outage)] {
        let note = rec["timeline"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["event"] == "note" && e["detail"]["related"] == *other);
        assert!(note, "a note naming the other on each timeline: {rec}");
    }
    assert_eq!(s["repeat_calls"], 0);
    // Both are dispatched, one to each responder.
    let mut offered: Vec<String> = ["r-a", "r-b"]
        .iter()
        .map(|id| {
            let mut r = Responder::connect(&d, id);
            r.recv_type("dispatch", S5).expect("a dispatch")["incident_id"].as_str().unwrap().to_string()
        })
        .collect();
    offered.sort();
    let mut both = vec![outage.clone(), security.clone()];
    both.sort();
    assert_eq!(offered, both);
    // A call that chose nothing joins the latest (security); a repeat of the outage joins the outage.
    assert_eq!(call_as(&d, "rep-3", "incident", None), security);
    assert_eq!(call_as(&d, "rep-4", "incident", Some("2,1")), outage);
    assert_eq!(d.incident(&outage)["repeat_calls"], 1);
    assert_eq!(d.incident(&security)["repeat_calls"], 1);
}

// ---- 4. bounded SIP work -----------------------------------------------------------

/// `sip.rate_limit` new INVITEs per second from one address: beyond a
/// second's worth, 503 with Retry-After; the line serves again a moment later.
#[test]
fn a_source_over_the_rate_limit_gets_503_with_retry_after() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, Options { sip: "rate_limit = 5".into(), ..Options::default() });
    let p = UdpPeer::new(&d);
    for i in 0..20 {
        p.send(invite(p.port(), &format!("rl-{i}"), "").as_bytes());
    }
    // One final answer per call (a 603 over UDP is retransmitted until ACKed).
    let mut finals = std::collections::BTreeMap::new();
    for r in p.recv_all(Duration::from_secs(2)).into_iter().filter(|r| !r.starts_with("SIP/2.0 100 ")) {
        finals.insert(header_of(&r, "Call-ID").unwrap_or("").to_string(), r);
    }
    let declined = finals.values().filter(|r| status_of(r) == 603).count();
    let limited: Vec<&String> = finals.values().filter(|r| status_of(r) == 503).collect();
    assert!((5..=6).contains(&declined), "a second's worth stored: {declined}");
    assert!(limited.len() >= 14, "{} of 20 got 503", limited.len());
    assert!(limited.iter().all(|r| header_of(r, "Retry-After").is_some()), "{limited:?}");
    assert!(metric_value(&d.metrics(), "dispatchd_sip_dropped_total", "rate_limit") >= 14.0);
    wait_until("the bucket to refill", S5, || {
        let q = UdpPeer::new(&d);
        q.send(invite(q.port(), &format!("rl-after-{}", q.port()), "").as_bytes());
        q.recv_final(Duration::from_secs(1)).is_some_and(|r| status_of(&r) == 603)
    });
}

/// A request with more Vias than any real path has: 400, and the response
/// copies a bounded number of them.
#[test]
fn too_many_vias_get_400() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, Options::default());
    let p = UdpPeer::new(&d);
    let vias: String =
        (0..200).map(|i| format!("Via: SIP/2.0/UDP 10.0.{}.{};branch=z9hG4bK{i}\r\n", i / 250, i % 250)).collect();
    let req = format!(
        "OPTIONS sip:incident@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{};branch=z9hG4bK-top\r\n{vias}\
         Max-Forwards: 70\r\nFrom: <sip:a@127.0.0.1>;tag=1\r\nTo: <sip:incident@127.0.0.1>\r\nCall-ID: vias\r\n\
         CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
        p.port()
    );
    p.send(req.as_bytes());
    let resp = p.recv_final(S5).expect("an answer");
    assert_eq!(status_of(&resp), 400, "{resp}");
    assert!(resp.contains("Too Many Via"), "{resp}");
    assert!(resp.matches("\r\nVia:").count() <= 70, "{resp}");
    assert_still_serving(&d, "after-vias");
}

/// An INVITE sent over TCP one byte per segment is framed and answered.
#[test]
fn tcp_one_byte_per_segment_is_answered() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, Options::default());
    let mut s = TcpStream::connect(("127.0.0.1", d.sip_port)).unwrap();
    s.set_nodelay(true).unwrap();
    let port = s.local_addr().unwrap().port();
    let pad = "p".repeat(8000);
    let inv = invite(port, "one-byte", &format!("X-Pad: {pad}\r\n")).replace("SIP/2.0/UDP", "SIP/2.0/TCP");
    for b in inv.as_bytes() {
        s.write_all(std::slice::from_ref(b)).unwrap();
    }
    s.set_read_timeout(Some(S5)).unwrap();
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    while !got.contains("SIP/2.0 603") {
        let n = s.read(&mut buf).expect("an answer");
        assert!(n > 0, "closed: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

/// An open storm incident takes an entry per abandon: its timeline is capped
/// and what is left out is counted in the record.
#[test]
fn a_storm_incident_timeline_is_capped() {
    let redis = Redis::start();
    let storm = "[correlation.abandon_storm]\ncount = 3\nwindow = \"1h\"\n[correlation.repeat]\nenabled = false\n[correlation.surge]\nenabled = false\n[correlation.callback]\nenabled = false\n";
    let d = Daemon::start(&redis, Options { correlation: storm.into(), ..Options::default() });
    let n = dispatchd::domain::timeline::TIMELINE_CAP + 100;
    let mut id = String::new();
    for i in 0..n {
        let resp = call_event(
            &d,
            &format!("ab-{i}"),
            &format!("X-Event: queue-abandon\r\nX-Call-Ref: ab-{i}\r\nX-Queue: support\r\nX-Wait-Seconds: 5\r\n"),
        );
        assert_eq!(status_of(&resp), 202, "{resp}");
        if i == 2 {
            id = d.incidents("").into_iter().find(|inc| inc["category"] == "abandon_storm").expect("storm")["id"]
                .as_str()
                .unwrap()
                .to_string();
        }
    }
    let inc = d.incident(&id);
    let tl = inc["timeline"].as_array().unwrap();
    assert!(tl.len() <= dispatchd::domain::timeline::TIMELINE_CAP, "{}", tl.len());
    let omitted = inc["timeline_omitted"]["abandoned"].as_u64().unwrap_or(0);
    let kept = tl.iter().filter(|e| e["event"] == "abandoned").count() as u64;
    assert_eq!(kept + omitted, (n - 3) as u64, "every later abandon is either on the timeline or counted");
}

// ---- 4. the ops plane --------------------------------------------------------------

/// A client that sends half a request head and stops is closed after
/// `http.idle_timeout` (so is an idle keep-alive); beyond `http.max_connections`
/// a connection is closed at once; the plane answers again when they are gone.
#[test]
fn slow_and_surplus_http_clients_are_closed() {
    let redis = Redis::start();
    let d = Daemon::start(
        &redis,
        Options { http: "idle_timeout = \"3s\"\nmax_connections = 8".into(), ..Options::default() },
    );
    let mut slow = TcpStream::connect(("127.0.0.1", d.http_port)).unwrap();
    slow.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n").unwrap();
    let mut idle = TcpStream::connect(("127.0.0.1", d.http_port)).unwrap();
    idle.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut first = [0u8; 512];
    assert!(idle.read(&mut first).unwrap() > 0, "answered, and kept alive");
    assert!(closed_within(&mut slow, S5), "a head never finished");
    assert!(closed_within(&mut idle, S5), "an idle keep-alive");

    let held: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(("127.0.0.1", d.http_port)).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut surplus = TcpStream::connect(("127.0.0.1", d.http_port)).unwrap();
    // Well before the 3 s a held connection gets.
    assert!(closed_within(&mut surplus, Duration::from_millis(1500)), "over the cap: closed at once");
    // The held connections say nothing: they are closed after the idle timeout, and the plane answers again.
    let mut m = String::new();
    wait_until("the ops plane to answer again", Duration::from_secs(10), || {
        m = d.metrics();
        !m.is_empty()
    });
    drop(held);
    assert!(metric_value(&m, "dispatchd_connections_refused_total", "listener=\"http\"") >= 1.0, "counted");
}
