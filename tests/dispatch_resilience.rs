//! Responder dispatch under stress and failure (contract §4 and §8): hostile
//! and broken websocket clients, silent peers, two daemons on one Redis,
//! kill -9 with offers in flight, SIGTERM with responders connected.
//!
//! No assertion here depends on speed: every wait is a generous upper bound.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use tungstenite::Message;

const S5: Duration = Duration::from_secs(5);
const S10: Duration = Duration::from_secs(10);
const ALL: &[&str] = &["*"];

fn opts(members: &[(&str, u32, &[&str])], ack_timeout: &str, max_rounds: u32) -> Options {
    Options { extra: format!("{}{}", roster(members), escalation(ack_timeout, max_rounds)), ..Default::default() }
}

// ---- low-level websocket reading ---------------------------------------------

/// What the next read on a socket gave.
#[derive(Debug)]
enum Next {
    Msg(Message),
    Timeout,
    /// The connection is gone (error text).
    Gone(String),
}

fn read_next(ws: &mut Ws, wait: Duration) -> Next {
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_mut() {
        s.set_read_timeout(Some(wait.max(Duration::from_millis(1)))).unwrap();
    }
    match ws.read() {
        Ok(m) => Next::Msg(m),
        Err(tungstenite::Error::Io(e))
            if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
        {
            Next::Timeout
        }
        Err(e) => Next::Gone(e.to_string()),
    }
}

/// The first data or close frame the server sends (pings/pongs skipped), within `wait`.
fn first_frame(ws: &mut Ws, wait: Duration) -> Option<Message> {
    let end = Instant::now() + wait;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        match read_next(ws, left) {
            Next::Msg(Message::Ping(_) | Message::Pong(_)) => continue,
            Next::Msg(m) => return Some(m),
            Next::Timeout => return None,
            Next::Gone(e) => panic!("connection dropped without a close frame: {e}"),
        }
    }
}

/// Asserts the server's very first frame is a close with `code`.
fn expect_first_close(r: &mut Responder, code: u16, wait: Duration, what: &str) {
    match first_frame(&mut r.ws, wait) {
        Some(Message::Close(Some(f))) => assert_eq!(u16::from(f.code), code, "{what}: close {f:?}"),
        other => panic!("{what}: expected close {code} as the first frame, got {other:?}"),
    }
}

fn ws_url(d: &Daemon, path: &str) -> String {
    format!("ws://127.0.0.1:{}{path}", d.ws_port)
}

// ---- a responder that acknowledges and resolves everything ----------------------

/// What the responder workers saw, shared so that a dispatch for an incident
/// another responder already acknowledged is caught the moment it arrives.
#[derive(Default)]
struct Board {
    /// incident → (responder, dispatch id) of the acknowledgement the server accepted.
    acked: HashMap<String, (String, String)>,
    violations: Vec<String>,
}

#[derive(Default, Debug)]
struct Seen {
    /// (incident, dispatch id) of every dispatch frame received.
    dispatches: Vec<(String, String)>,
    acked: Vec<String>,
    /// Acks refused (e.g. the offer had already been withdrawn): (dispatch id, code).
    refused: Vec<(String, String)>,
    resolved: Vec<String>,
    cancels: Vec<Value>,
    /// Replies that were not expected at all.
    odd: Vec<Value>,
    closed: Option<String>,
}

fn incident_of(dispatch_id: &str) -> &str {
    dispatch_id.rsplit_once('.').map(|(i, _)| i).unwrap_or(dispatch_id)
}

fn attempt_of(dispatch_id: &str) -> u64 {
    dispatch_id.rsplit_once('.').and_then(|(_, a)| a.parse().ok()).unwrap_or(0)
}

/// Acks every dispatch at once, then sends status `resolved`, until `stop`.
fn ack_and_resolve(mut r: Responder, stop: &AtomicBool, board: &Mutex<Board>) -> (Responder, Seen) {
    let mut seen = Seen::default();
    let rid = r.id.clone();
    while !stop.load(Ordering::Relaxed) {
        let v: Value = match read_next(&mut r.ws, Duration::from_millis(200)) {
            Next::Msg(Message::Text(t)) => serde_json::from_str(t.as_str()).unwrap_or(Value::Null),
            Next::Msg(Message::Close(f)) => {
                seen.closed = Some(format!("{f:?}"));
                break;
            }
            Next::Msg(_) | Next::Timeout => continue,
            Next::Gone(e) => {
                seen.closed = Some(e);
                break;
            }
        };
        let reference = v["ref"].as_str().unwrap_or("").to_string();
        match v["type"].as_str().unwrap_or("") {
            "dispatch" => {
                let did = v["dispatch_id"].as_str().unwrap_or("").to_string();
                let inc = v["incident_id"].as_str().unwrap_or("").to_string();
                {
                    let mut b = board.lock().unwrap();
                    if incident_of(&did) != inc {
                        b.violations.push(format!("{rid}: dispatch id {did} does not name incident {inc}"));
                    }
                    if let Some((who, acked_did)) = b.acked.get(&inc).cloned() {
                        b.violations.push(format!(
                            "{rid} received dispatch {did} for {inc}, which {who} had already acknowledged ({acked_did})"
                        ));
                    }
                }
                seen.dispatches.push((inc, did.clone()));
                r.send(json!({"type": "ack", "dispatch_id": did, "id": format!("ack|{did}")}));
            }
            "ok" if reference.starts_with("ack|") => {
                let did = reference["ack|".len()..].to_string();
                let inc = incident_of(&did).to_string();
                {
                    let mut b = board.lock().unwrap();
                    if let Some((who, other)) = b.acked.insert(inc.clone(), (rid.clone(), did.clone())) {
                        b.violations.push(format!("{inc} acknowledged twice: {who} ({other}) and {rid} ({did})"));
                    }
                }
                seen.acked.push(did);
                r.send(json!({"type": "status", "incident_id": inc, "status": "resolved", "id": format!("res|{inc}")}));
            }
            "error" if reference.starts_with("ack|") => {
                seen.refused
                    .push((reference["ack|".len()..].to_string(), v["code"].as_str().unwrap_or("").to_string()));
            }
            "ok" if reference.starts_with("res|") => seen.resolved.push(reference["res|".len()..].to_string()),
            "cancel" => seen.cancels.push(v),
            "welcome" => {}
            _ => seen.odd.push(v),
        }
    }
    (r, seen)
}

/// Offers in a timeline never overlap: every `offered` closes with `withdrawn`
/// or `acknowledged` before the next one; exactly one `acknowledged`, of the
/// dispatch offered last. Returns the problems found.
fn offer_problems(inc: &Value) -> Vec<String> {
    let id = inc["id"].as_str().unwrap_or("?");
    let mut problems = Vec::new();
    let mut open: Option<String> = None;
    let mut acks = 0;
    for e in inc["timeline"].as_array().cloned().unwrap_or_default() {
        let did = e["detail"]["dispatch_id"].as_str().unwrap_or("").to_string();
        match e["event"].as_str().unwrap_or("") {
            "offered" => {
                if let Some(prev) = &open {
                    problems.push(format!("{id}: {did} offered while {prev} was still open"));
                }
                if acks > 0 {
                    problems.push(format!("{id}: {did} offered after the incident was acknowledged"));
                }
                open = Some(did);
            }
            "withdrawn" => {
                if open.as_deref() != Some(did.as_str()) {
                    problems.push(format!("{id}: withdrawn {did} but the open offer was {open:?}"));
                }
                open = None;
            }
            "acknowledged" => {
                acks += 1;
                if open.as_deref() != Some(did.as_str()) {
                    problems.push(format!("{id}: acknowledged {did} but the open offer was {open:?}"));
                }
                open = None;
            }
            _ => {}
        }
    }
    if acks != 1 {
        problems.push(format!("{id}: {acks} acknowledged entries in {:?}", events(inc)));
    }
    problems
}

fn states(d: &Daemon) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for i in d.incidents("?limit=500") {
        *m.entry(i["state"].as_str().unwrap_or("?").to_string()).or_insert(0) += 1;
    }
    m
}

// ---- 1. authentication -----------------------------------------------------------

#[test]
fn authentication_header_hello_and_refusals() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, opts(&[("r-a", 1, ALL), ("r-b", 1, ALL)], "3s", 3));

    // Bearer header: welcome straight away.
    let mut a = Responder::connect(&d, "r-a");
    let r = a.request(json!({"type": "availability", "status": "available"}), "h1");
    assert_eq!(r, json!({"type": "ok", "ref": "h1"}));

    // No header, then a hello frame with the token: welcome.
    let mut b = Responder::connect_raw(&d, None);
    b.send(json!({"type": "hello", "token": "token-r-b"}));
    let w = b.recv(S5).expect("welcome after hello");
    assert_eq!(w["type"], "welcome", "{w}");
    assert_eq!(w["responder_id"], "r-b");
    assert_eq!(w["heartbeat_s"], 2);
    let r = b.request(json!({"type": "availability", "status": "available"}), "h2");
    assert_eq!(r["type"], "ok", "{r}");

    // A wrong header token: close 4401, nothing before it.
    let mut bad = Responder::connect_raw(&d, Some("token-nobody"));
    expect_first_close(&mut bad, 4401, S10, "wrong header token");

    // An empty Bearer value is a wrong token too.
    let mut empty = Responder::connect_raw(&d, Some(""));
    expect_first_close(&mut empty, 4401, S10, "empty bearer token");

    // A hello with a wrong token: 4401.
    let mut wrong_hello = Responder::connect_raw(&d, None);
    wrong_hello.send(json!({"type": "hello", "token": "token-r-zzz"}));
    expect_first_close(&mut wrong_hello, 4401, S10, "hello with a wrong token");

    // A first frame that is not a hello: missing token, 4401.
    let mut no_hello = Responder::connect_raw(&d, None);
    no_hello.send(json!({"type": "availability", "status": "available", "id": "x"}));
    expect_first_close(&mut no_hello, 4401, S10, "first frame not a hello");

    // Junk as the first frame: 4401 as well.
    let mut junk_hello = Responder::connect_raw(&d, None);
    junk_hello.send_text("hello?");
    expect_first_close(&mut junk_hello, 4401, S10, "junk first frame");

    // The good sessions were not disturbed. (Checked now: they do not read
    // while the test waits below, so they would be dropped as silent peers.)
    for (r, id) in [(&mut a, "z1"), (&mut b, "z2")] {
        let reply = r.request(json!({"type": "availability", "status": "available"}), id);
        assert_eq!(reply["type"], "ok", "{reply}");
    }
    let m = d.metrics();
    assert_eq!(metric_value(&m, "dispatchd_responders_connected", ""), 2.0, "{m}");
    drop((a, b));

    // Silence: no hello within 5 s → 4401 (allow plenty more than 5 s).
    let started = Instant::now();
    let mut silent = Responder::connect_raw(&d, None);
    expect_first_close(&mut silent, 4401, Duration::from_secs(20), "no hello");
    assert!(started.elapsed() >= Duration::from_secs(4), "closed before the 5 s hello window: {:?}", started.elapsed());

    // Another path: the upgrade itself is refused.
    let res = tungstenite::connect(ws_url(&d, "/nope"));
    match res {
        Err(tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 404),
        Err(e) => panic!("unexpected error for /nope: {e}"),
        Ok(_) => panic!("/nope accepted a websocket"),
    }
    let res = tungstenite::connect(ws_url(&d, "/v1/responders/ws/extra"));
    assert!(res.is_err(), "a longer path must not be accepted");
    assert!(
        Responder::connect(&d, "r-a").request(json!({"type": "availability", "status": "busy"}), "end")["type"] == "ok"
    );
}

// ---- 2. junk frames -------------------------------------------------------------

#[test]
fn junk_frames_get_bad_request_and_never_close() {
    let redis = Redis::start();
    let mut d = Daemon::start(&redis, opts(&[("r-a", 1, ALL)], "30s", 3));
    let mut a = Responder::connect(&d, "r-a");

    let big =
        format!(r#"{{"type":"availability","status":"available","id":"big","pad":"{}"}}"#, "x".repeat(100 * 1024));
    let cases: Vec<(&str, Message, Option<&str>)> = vec![
        ("not JSON", Message::text("this is not json {"), None),
        ("array", Message::text("[]"), None),
        ("number", Message::text("42"), None),
        ("empty object", Message::text("{}"), None),
        ("unknown type", Message::text(r#"{"type":"nope","id":"x"}"#), Some("x")),
        ("type not a string", Message::text(r#"{"type":7,"id":"t7"}"#), Some("t7")),
        ("ack without dispatch_id", Message::text(r#"{"type":"ack","id":"a1"}"#), Some("a1")),
        ("ack with numeric dispatch_id", Message::text(r#"{"type":"ack","dispatch_id":5,"id":"a2"}"#), Some("a2")),
        ("status without incident", Message::text(r#"{"type":"status","status":"resolved","id":"s1"}"#), Some("s1")),
        ("bad availability", Message::text(r#"{"type":"availability","status":"asleep","id":"v1"}"#), Some("v1")),
        ("100 KB text", Message::text(big), None),
        ("binary", Message::binary(vec![0u8, 159, 146, 150, 1, 2, 3]), None),
        ("raw control character", Message::text("{\"type\":\"ack\",\"dispatch_id\":\"\u{0}\"}"), None),
    ];
    for (what, msg, reference) in cases {
        a.ws.send(msg).unwrap_or_else(|e| panic!("{what}: send failed: {e}"));
        let v = a.recv(S5).unwrap_or_else(|| panic!("{what}: no reply (socket closed or silent)"));
        assert_eq!(v["type"], "error", "{what}: {v}");
        assert_eq!(v["code"], "bad_request", "{what}: {v}");
        match reference {
            Some(r) => assert_eq!(v["ref"], r, "{what}: {v}"),
            None => assert!(v.get("ref").is_none(), "{what}: {v}"),
        }
    }

    // Still open and serving.
    let r = a.request(json!({"type": "availability", "status": "available"}), "last");
    assert_eq!(r, json!({"type": "ok", "ref": "last"}));
    assert!(d.alive(), "the daemon died on junk frames:\n{}", d.log());

    // And it still takes calls and dispatches them to this very connection.
    let id = place_call(&d, "junk-after-1", "2,1");
    let offer = a.recv_type("dispatch", S10).expect("dispatch after the junk");
    assert_eq!(offer["incident_id"], id.as_str());
    let r = a.request(json!({"type": "ack", "dispatch_id": offer["dispatch_id"]}), "ack");
    assert_eq!(r["type"], "ok", "{r}");
    let inc = d.incident(&id);
    assert_eq!(inc["state"], "acknowledged");
    assert_eq!(inc["assigned_to"], "r-a");
    assert_eq!(metric_value(&d.metrics(), "dispatchd_responders_connected", ""), 1.0);
}

// ---- 3. someone else's incident -----------------------------------------------------

#[test]
fn another_responders_incident_is_not_allowed_and_untouched() {
    let redis = Redis::start();
    // r-b is tier 2, so the offer goes to r-a first.
    let d = Daemon::start(&redis, opts(&[("r-a", 1, ALL), ("r-b", 2, ALL)], "30s", 3));
    let mut a = Responder::connect(&d, "r-a");
    let mut b = Responder::connect(&d, "r-b");

    let id = place_call(&d, "other-1", "2");
    let offer = a.recv_type("dispatch", S10).expect("dispatch to r-a");
    assert_eq!(offer["incident_id"], id.as_str());
    let did = offer["dispatch_id"].as_str().unwrap().to_string();
    let r = a.request(json!({"type": "ack", "dispatch_id": did}), "a-ack");
    assert_eq!(r["type"], "ok", "{r}");
    // `delivered` is recorded after the frame is written, so it can land after
    // the ack: wait for it before taking the snapshot.
    wait_until("delivered recorded", S10, || events(&d.incident(&id)).contains(&"delivered".to_string()));
    let before = d.incident(&id);
    assert_eq!(before["state"], "acknowledged");
    assert_eq!(before["assigned_to"], "r-a");

    for (i, status) in ["en_route", "on_scene", "resolved"].iter().enumerate() {
        let reply = b.request(
            json!({"type": "status", "incident_id": id, "status": status, "note": "mine now"}),
            &format!("b{i}"),
        );
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(reply["code"], "not_allowed", "{status}: {reply}");
    }
    // Nor can r-b answer r-a's dispatch.
    let reply = b.request(json!({"type": "ack", "dispatch_id": did}), "b-ack");
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "stale_dispatch", "{reply}");
    let reply = b.request(json!({"type": "decline", "dispatch_id": did, "reason": "no"}), "b-decline");
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "stale_dispatch", "{reply}");
    // r-b got no dispatch for it at any point.
    assert!(b.recv_type("dispatch", Duration::from_millis(500)).is_none());

    let after = d.incident(&id);
    assert_eq!(after, before, "the record changed after refused frames from another responder");

    // r-a can still move it on.
    let r = a.request(json!({"type": "status", "incident_id": id, "status": "en_route"}), "a-en");
    assert_eq!(r["type"], "ok", "{r}");
    let inc = d.incident(&id);
    assert_eq!(inc["state"], "en_route");
    let en = inc["timeline"].as_array().unwrap().iter().filter(|e| e["event"] == "en_route").collect::<Vec<_>>();
    assert_eq!(en.len(), 1, "{:?}", events(&inc));
    assert_eq!(en[0]["actor"], "r-a");
}

// ---- 4. heartbeat -------------------------------------------------------------

#[test]
fn silent_peer_is_dropped_after_two_heartbeats() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, opts(&[("r-live", 1, ALL), ("r-mute", 1, ALL)], "30s", 3));
    let connected = |d: &Daemon| metric_value(&d.metrics(), "dispatchd_responders_connected", "");

    // A responder that keeps reading (and so answers pings) next to one that never reads.
    let live = Responder::connect(&d, "r-live");
    let stop = AtomicBool::new(false);
    let _mute = Responder::connect_raw(&d, Some("token-r-mute"));
    wait_until("both responders connected", S10, || connected(&d) == 2.0);

    let live = std::thread::scope(|s| {
        let reader = s.spawn(|| {
            let mut live = live;
            let mut gone = None;
            while !stop.load(Ordering::Relaxed) {
                match read_next(&mut live.ws, Duration::from_millis(200)) {
                    Next::Msg(Message::Close(f)) => {
                        gone = Some(format!("close {f:?}"));
                        break;
                    }
                    Next::Gone(e) => {
                        gone = Some(e);
                        break;
                    }
                    _ => {}
                }
            }
            (live, gone)
        });
        let started = Instant::now();
        let waited = (|| {
            while started.elapsed() < S10 {
                if connected(&d) == 1.0 {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            false
        })();
        // Keep the live one reading past a few more heartbeats.
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::Relaxed);
        let (live, gone) = reader.join().unwrap();
        assert!(waited, "the silent peer was not dropped within 10 s; metrics:\n{}", d.metrics());
        assert!(gone.is_none(), "the responder that answers pings was dropped too: {gone:?}");
        live
    });
    let mut live = live;
    let r = live.request(json!({"type": "availability", "status": "available"}), "still");
    assert_eq!(r["type"], "ok", "{r}");
    assert_eq!(connected(&d), 1.0);
    assert!(d.log().contains("silent for two heartbeats"), "no log line for the dropped peer");

    // Closing the last one brings the gauge back to 0.
    live.ws.close(None).unwrap();
    let _ = live.close_code(S5);
    wait_until("gauge back to 0", S10, || connected(&d) == 0.0);
}

// ---- 5. two daemons, one Redis -----------------------------------------------------

#[test]
fn two_daemons_one_redis_offer_each_incident_to_one_responder_at_a_time() {
    const RESPONDERS: usize = 20;
    const CALLS: usize = 500;
    const CALLERS: usize = 4;
    let redis = Redis::start();
    let ids: Vec<String> = (0..RESPONDERS).map(|i| format!("r-{i:02}")).collect();
    let members: Vec<(&str, u32, &[&str])> = ids.iter().map(|id| (id.as_str(), 1, ALL)).collect();
    let o = opts(&members, "3s", 3);
    let d1 = Daemon::start(&redis, o.clone());
    let d2 = Daemon::start(&redis, o);
    let daemons = [&d1, &d2];

    let responders: Vec<Responder> =
        ids.iter().enumerate().map(|(i, id)| Responder::connect(daemons[i % 2], id)).collect();
    wait_until("10 responders on each daemon", S10, || {
        daemons.iter().all(|d| metric_value(&d.metrics(), "dispatchd_responders_connected", "") == 10.0)
    });

    let stop = AtomicBool::new(false);
    let board = Mutex::new(Board::default());
    let paths = ["2,1", "2", "9", "5"];
    let started = Instant::now();

    let (incidents, seen) = std::thread::scope(|s| {
        let workers: Vec<_> = responders.into_iter().map(|r| s.spawn(|| ack_and_resolve(r, &stop, &board))).collect();
        let callers: Vec<_> = (0..CALLERS)
            .map(|t| {
                s.spawn(move || {
                    (t..CALLS)
                        .step_by(CALLERS)
                        .map(|n| place_call(daemons[n % 2], &format!("two-daemons-{n}"), paths[n % paths.len()]))
                        .collect::<Vec<String>>()
                })
            })
            .collect();
        let incidents: Vec<String> = callers.into_iter().flat_map(|c| c.join().unwrap()).collect();
        eprintln!("{} calls placed in {:?}", incidents.len(), started.elapsed());

        let end = Instant::now() + Duration::from_secs(60);
        let mut done = false;
        while Instant::now() < end {
            if d1.incidents("?state=resolved&limit=500").len() == CALLS {
                done = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let unresolved = if done { None } else { Some(states(&d1)) };
        stop.store(true, Ordering::Relaxed);
        let seen: Vec<(Responder, Seen)> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        if let Some(states) = unresolved {
            let b = board.lock().unwrap();
            panic!("not every incident resolved within 60 s: {states:?}; violations so far: {:?}", b.violations);
        }
        (incidents, seen)
    });
    eprintln!("all {CALLS} resolved {:?} after the start", started.elapsed());

    let unique: HashSet<&String> = incidents.iter().collect();
    assert_eq!(unique.len(), CALLS, "every call opened its own incident");

    let board = board.into_inner().unwrap();
    assert!(board.violations.is_empty(), "responder-side violations:\n{}", board.violations.join("\n"));

    // Client side: every incident acknowledged by exactly one responder, and no
    // other responder ever held a dispatch of the same or a later attempt.
    let mut acked_by: HashMap<String, (String, String)> = HashMap::new();
    let mut problems = Vec::new();
    let (mut n_dispatch, mut n_refused, mut n_cancel) = (0, 0, 0);
    for (r, s) in &seen {
        assert!(s.closed.is_none(), "{} was disconnected: {:?}", r.id, s.closed);
        assert!(s.odd.is_empty(), "{}: unexpected frames {:?}", r.id, s.odd);
        n_dispatch += s.dispatches.len();
        n_refused += s.refused.len();
        n_cancel += s.cancels.len();
        for did in &s.acked {
            if let Some(prev) = acked_by.insert(incident_of(did).to_string(), (r.id.clone(), did.clone())) {
                problems.push(format!("{did} acked by {} after {prev:?}", r.id));
            }
        }
        for (_, code) in &s.refused {
            if code != "stale_dispatch" {
                problems.push(format!("{}: ack refused with {code}", r.id));
            }
        }
        let resolved: HashSet<&String> = s.resolved.iter().collect();
        for did in &s.acked {
            if !resolved.contains(&incident_of(did).to_string()) {
                problems.push(format!("{}: acked {did} but its resolve was not ok", r.id));
            }
        }
    }
    for (r, s) in &seen {
        for (inc, did) in &s.dispatches {
            match acked_by.get(inc) {
                Some((who, acked)) if who != &r.id && attempt_of(did) >= attempt_of(acked) => {
                    problems.push(format!("{} got {did} although {who} acknowledged {acked}", r.id))
                }
                None => problems.push(format!("{inc} was dispatched to {} but nobody acknowledged it", r.id)),
                _ => {}
            }
        }
    }
    assert_eq!(acked_by.len(), CALLS, "acknowledged incidents");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    eprintln!("{n_dispatch} dispatch frames, {n_cancel} cancels, {n_refused} late acks refused");

    // Server side: every timeline resolved, one acknowledged, offers never overlapping.
    let mut problems = Vec::new();
    let mut late_delivered = 0;
    for (n, id) in incidents.iter().enumerate() {
        let inc = daemons[n % 2].incident(id);
        let ev = events(&inc);
        // Not asserted (the contract only says append-only): `delivered` is
        // written after the frame, so it may follow the `acknowledged` it preceded.
        if ev.iter().position(|e| e == "delivered") > ev.iter().position(|e| e == "acknowledged") {
            late_delivered += 1;
        }
        if inc["state"] != "resolved" || !ev.contains(&"resolved".to_string()) {
            problems.push(format!("{id}: state {} timeline {ev:?}", inc["state"]));
        }
        problems.extend(offer_problems(&inc));
        if let Some((who, _)) = acked_by.get(id)
            && inc["assigned_to"] != who.as_str()
        {
            problems.push(format!("{id}: assigned_to {} but acked by {who}", inc["assigned_to"]));
        }
    }
    assert!(problems.is_empty(), "{} timeline problems:\n{}", problems.len(), problems.join("\n"));
    eprintln!("{late_delivered} of {CALLS} timelines list `delivered` after `acknowledged`");
}

// ---- 6. kill -9 with offers in flight ------------------------------------------------

#[test]
fn kill9_with_offers_in_flight_loses_nothing() {
    let redis = Redis::start();
    // Long deadlines for everything but `low`, so the offer to r-a is still
    // open after the restart (redelivery) and the one to r-b runs out while no
    // daemon but the new one is alive (deadline pickup).
    let extra = format!(
        "{}{}",
        roster(&[("r-a", 1, ALL), ("r-b", 1, ALL)]),
        ["critical", "high", "medium"]
            .iter()
            .map(|s| format!("[escalation.{s}]\nack_timeout = \"60s\"\nmax_rounds = 3\n\n"))
            .collect::<String>()
            + "[escalation.low]\nack_timeout = \"4s\"\nmax_rounds = 3\n\n"
    );
    let o = Options { extra, ..Default::default() };
    let mut d1 = Daemon::start(&redis, o.clone());
    let mut a = Responder::connect(&d1, "r-a");
    let mut b = Responder::connect(&d1, "r-b");

    // First a critical call: offered to one responder; then a low one: offered to the other.
    let crit = place_call(&d1, "kill-0", "2,1");
    let (first, first_rid) = {
        let mut got = None;
        let end = Instant::now() + S10;
        while got.is_none() && Instant::now() < end {
            if let Some(v) = a.recv_type("dispatch", Duration::from_millis(100)) {
                got = Some((v, "r-a"));
            } else if let Some(v) = b.recv_type("dispatch", Duration::from_millis(100)) {
                got = Some((v, "r-b"));
            }
        }
        let (v, who) = got.expect("the first call was dispatched");
        assert_eq!(v["incident_id"], crit.as_str());
        (v, who)
    };
    let (crit_holder, low_holder) = if first_rid == "r-a" { (&mut a, &mut b) } else { (&mut b, &mut a) };
    let low = place_call(&d1, "kill-1", "9");
    let low_offer = low_holder.recv_type("dispatch", S10).expect("the low call went to the other responder");
    assert_eq!(low_offer["incident_id"], low.as_str());
    let crit_did = first["dispatch_id"].as_str().unwrap().to_string();
    let crit_rid = crit_holder.id.clone();
    let low_rid = low_holder.id.clone();

    // Four more: nobody is free, they queue.
    let mut all = vec![crit.clone(), low.clone()];
    for (n, path) in ["2,1", "2", "9", "5"].iter().enumerate() {
        all.push(place_call(&d1, &format!("kill-{}", n + 2), path));
    }
    wait_until("2 offered, 4 queued", S10, || {
        let s = states(&d1);
        s.get("offered") == Some(&2) && s.get("queued") == Some(&4)
    });
    let low_before = d1.incident(&low);

    d1.kill9();
    drop(a);
    drop(b);

    let d2 = Daemon::start(&redis, o);
    for id in &all {
        let ev = events(&d2.incident(id));
        assert!(ev.len() >= 3, "{id} lost its timeline: {ev:?}");
    }

    // The responder whose offer is still open reconnects and gets the same dispatch again.
    let mut first_back = Responder::connect(&d2, &crit_rid);
    let again = first_back.recv_type("dispatch", S10).expect("the unanswered dispatch sent again on reconnect");
    assert_eq!(again["dispatch_id"], crit_did.as_str(), "{again}");
    assert_eq!(again["incident_id"], crit.as_str());

    // The other stays away until the new daemon has taken its lapsed offer back.
    // (Nobody can answer that offer now, so only a deadline can end it.)
    let low_did = low_offer["dispatch_id"].clone();
    let has = |inc: &Value, event: &str| {
        inc["timeline"].as_array().unwrap().iter().any(|e| e["event"] == event && e["detail"]["dispatch_id"] == low_did)
    };
    let low_was_open = low_before["state"] == "offered" && !has(&low_before, "withdrawn");
    // Keep reading `first_back` meanwhile: a client that never reads never
    // answers pings, and the server drops it after two heartbeats.
    let mut unexpected = Vec::new();
    wait_until("the lapsed offer withdrawn by the new daemon", Duration::from_secs(30), || {
        if let Some(v) = first_back.recv(Duration::from_millis(50)) {
            unexpected.push(v);
        }
        has(&d2.incident(&low), "withdrawn")
    });
    assert!(
        unexpected.iter().all(|v| v["type"] != "dispatch" || v["dispatch_id"] == crit_did.as_str()),
        "{unexpected:?}"
    );
    let inc = d2.incident(&low);
    assert!(has(&inc, "ack_timeout"), "withdrawn for another reason: {}", inc["timeline"]);
    eprintln!("low offer still open at the kill: {low_was_open}");

    // Answer the re-sent dispatch here (it was read above), then both work
    // everything else through.
    let stop = AtomicBool::new(false);
    let board = Mutex::new(Board::default());
    let r = first_back.request(json!({"type": "ack", "dispatch_id": crit_did}), "ack-crit");
    assert_eq!(r["type"], "ok", "{r}");
    let r = first_back.request(json!({"type": "status", "incident_id": crit, "status": "resolved"}), "res-crit");
    assert_eq!(r["type"], "ok", "{r}");
    let second_back = Responder::connect(&d2, &low_rid);
    let done = std::thread::scope(|s| {
        let wa = s.spawn(|| ack_and_resolve(first_back, &stop, &board));
        let wb = s.spawn(|| ack_and_resolve(second_back, &stop, &board));
        let end = Instant::now() + Duration::from_secs(40);
        let mut done = false;
        while Instant::now() < end {
            if all.iter().all(|id| d2.incident(id)["state"] == "resolved") {
                done = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        stop.store(true, Ordering::Relaxed);
        let _ = (wa.join().unwrap(), wb.join().unwrap());
        done
    });
    let board = board.into_inner().unwrap();
    assert!(board.violations.is_empty(), "{:?}", board.violations);
    let mut problems = Vec::new();
    for id in &all {
        let inc = d2.incident(id);
        let ev = events(&inc);
        if ev.len() < 3 || ev[..3] != ["opened", "classified", "queued"] {
            problems.push(format!("{id}: timeline does not begin opened, classified, queued: {ev:?}"));
        }
        if !matches!(inc["state"].as_str(), Some("acknowledged" | "resolved")) {
            problems.push(format!("{id}: ended {} {ev:?}", inc["state"]));
        }
        problems.extend(offer_problems(&inc));
    }
    assert!(done && problems.is_empty(), "done={done}\n{}\nnew daemon log:\n{}", problems.join("\n"), d2.log());
}

// ---- 7. SIGTERM with responders connected --------------------------------------------

#[test]
fn sigterm_closes_responders_with_1001_and_exits_0() {
    let redis = Redis::start();
    let mut d = Daemon::start(&redis, opts(&[("r-a", 1, ALL), ("r-b", 1, ALL)], "30s", 3));
    let a = Responder::connect(&d, "r-a");
    let b = Responder::connect(&d, "r-b");
    // One of them holds an acknowledged incident: shutdown must not disturb it.
    let id = place_call(&d, "term-1", "2,1");
    wait_until("offered", S10, || d.incident(&id)["state"] == "offered");

    let codes = std::thread::scope(|s| {
        let readers: Vec<_> = [a, b]
            .into_iter()
            .map(|mut r| {
                s.spawn(move || {
                    let end = Instant::now() + Duration::from_secs(20);
                    let mut frames = Vec::new();
                    while Instant::now() < end {
                        match read_next(&mut r.ws, Duration::from_millis(200)) {
                            Next::Msg(Message::Close(f)) => {
                                return (r.id.clone(), f.map(|f| u16::from(f.code)), frames);
                            }
                            Next::Msg(Message::Text(t)) => {
                                let v: Value = serde_json::from_str(t.as_str()).unwrap_or(Value::Null);
                                if v["type"] == "dispatch" {
                                    r.send(json!({"type": "ack", "dispatch_id": v["dispatch_id"], "id": "ack"}));
                                }
                                frames.push(v);
                            }
                            Next::Msg(_) | Next::Timeout => {}
                            Next::Gone(e) => return (r.id.clone(), Some(9999), vec![json!(e)]),
                        }
                    }
                    (r.id.clone(), None, frames)
                })
            })
            .collect();
        wait_until("acknowledged", S10, || d.incident(&id)["state"] == "acknowledged");
        let code = d.stop();
        assert_eq!(code, Some(0), "exit code on SIGTERM; log:\n{}", d.log());
        readers.into_iter().map(|r| r.join().unwrap()).collect::<Vec<_>>()
    });
    for (rid, code, frames) in codes {
        assert_eq!(code, Some(1001), "{rid}: close code; frames before it: {frames:?}");
    }
    // The record survives the shutdown as it was.
    let d2 = Daemon::start(&redis, opts(&[("r-a", 1, ALL), ("r-b", 1, ALL)], "30s", 3));
    let inc = d2.incident(&id);
    assert_eq!(inc["state"], "acknowledged", "{inc}");
    assert_eq!(events(&inc).iter().filter(|e| *e == "acknowledged").count(), 1);
}

// ---- the timeline checker itself ------------------------------------------------

#[test]
fn offer_checker_flags_overlapping_offers() {
    let tl = |entries: &[(&str, &str)]| {
        json!({"id": "INC-T", "timeline": entries.iter()
            .map(|(e, d)| json!({"event": e, "detail": {"dispatch_id": d}})).collect::<Vec<_>>()})
    };
    let good = tl(&[
        ("opened", ""),
        ("queued", ""),
        ("offered", "x.1"),
        ("withdrawn", "x.1"),
        ("offered", "x.2"),
        ("acknowledged", "x.2"),
    ]);
    assert!(offer_problems(&good).is_empty(), "{:?}", offer_problems(&good));
    let overlap = tl(&[("offered", "x.1"), ("offered", "x.2"), ("acknowledged", "x.2")]);
    assert!(!offer_problems(&overlap).is_empty());
    let twice = tl(&[("offered", "x.1"), ("acknowledged", "x.1"), ("offered", "x.2"), ("acknowledged", "x.2")]);
    assert!(!offer_problems(&twice).is_empty());
    let none = tl(&[("offered", "x.1"), ("withdrawn", "x.1")]);
    assert!(!offer_problems(&none).is_empty());
}
