//! SIP MESSAGE call events on the incident line (issue 5): the real daemon, a
//! real Redis, raw UDP/TCP peers and sipp.
//!
//! A MESSAGE is answered `202` only after intake stored the event, so what the
//! record holds is read right after the answer; nothing here waits on timing
//! except the silence checks (no answer within a few seconds).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const CALLER: &str = "+15550001234";
const ANSWER: Duration = Duration::from_secs(15);

struct Line {
    d: Daemon,
    redis: Redis,
}

fn line(opts: Options) -> Line {
    let redis = Redis::start();
    let d = Daemon::start(&redis, opts);
    Line { d, redis }
}

static BRANCH: AtomicU64 = AtomicU64::new(1);

fn next_branch() -> String {
    format!("m{}", BRANCH.fetch_add(1, Ordering::Relaxed))
}

/// A MESSAGE from `port` over `via` ("UDP"/"TCP") with the given Call-ID, CSeq number, branch and headers.
fn message(via: &str, port: u16, call_id: &str, cseq: u32, branch: &str, extra: &str) -> String {
    format!(
        "MESSAGE sip:incident@127.0.0.1 SIP/2.0\r\n\
         Via: SIP/2.0/{via} 127.0.0.1:{port};branch=z9hG4bK-{branch}\r\n\
         Max-Forwards: 70\r\n\
         From: \"Test Caller\" <sip:{CALLER}@127.0.0.1>;tag=m-{call_id}\r\n\
         To: <sip:incident@127.0.0.1>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: {cseq} MESSAGE\r\n\
         {extra}Content-Type: text/plain\r\nContent-Length: 4\r\n\r\nbody"
    )
}

/// One SIP peer, over UDP or one TCP connection.
enum Conn {
    Udp(UdpPeer),
    Tcp { s: TcpStream, buf: Vec<u8> },
}

/// Takes one whole SIP message (framed by Content-Length) off the front of `buf`.
fn take_frame(buf: &mut Vec<u8>) -> Option<String> {
    let pos = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..pos]).into_owned();
    let len: usize =
        header_of(&head, "Content-Length").or(header_of(&head, "l")).and_then(|l| l.parse().ok()).unwrap_or(0);
    let total = pos + 4 + len;
    if buf.len() < total {
        return None;
    }
    let frame: Vec<u8> = buf.drain(..total).collect();
    Some(String::from_utf8_lossy(&frame).into_owned())
}

impl Conn {
    fn open(d: &Daemon, transport: &str) -> Conn {
        match transport {
            "udp" => Conn::Udp(UdpPeer::new(d)),
            _ => Conn::Tcp { s: TcpStream::connect(d.sip_addr()).expect("connect"), buf: Vec::new() },
        }
    }

    fn via(&self) -> &'static str {
        match self {
            Conn::Udp(_) => "UDP",
            Conn::Tcp { .. } => "TCP",
        }
    }

    fn port(&self) -> u16 {
        match self {
            Conn::Udp(p) => p.port(),
            Conn::Tcp { s, .. } => s.local_addr().unwrap().port(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        match self {
            Conn::Udp(p) => p.send(bytes),
            Conn::Tcp { s, .. } => {
                if let Err(e) = s.write_all(bytes) {
                    eprintln!("TCP write failed: {e}");
                }
            }
        }
    }

    /// The next response that is not a 100, within `wait`.
    fn recv(&mut self, wait: Duration) -> Option<String> {
        match self {
            Conn::Udp(p) => p.recv_final(wait),
            Conn::Tcp { s, buf } => {
                let end = Instant::now() + wait;
                let mut tmp = [0u8; 16384];
                loop {
                    while let Some(m) = take_frame(buf) {
                        if !m.starts_with("SIP/2.0 100 ") {
                            return Some(m);
                        }
                    }
                    let left = end.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    s.set_read_timeout(Some(left)).unwrap();
                    match s.read(&mut tmp) {
                        Ok(0) => {
                            eprintln!("the daemon closed the TCP connection");
                            return None;
                        }
                        Ok(n) => buf.extend_from_slice(&tmp[..n]),
                        Err(e)
                            if matches!(
                                e.kind(),
                                ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                            ) => {}
                        Err(e) => {
                            eprintln!("TCP read failed: {e}");
                            return None;
                        }
                    }
                }
            }
        }
    }

    /// The MESSAGE text for this peer (fresh branch).
    fn text(&self, call_id: &str, cseq: u32, extra: &str) -> String {
        message(self.via(), self.port(), call_id, cseq, &next_branch(), extra)
    }

    /// Sends bytes and returns the answer; panics without one.
    fn ask_raw(&mut self, bytes: &[u8]) -> String {
        self.send(bytes);
        self.recv(ANSWER).expect("no answer to the MESSAGE")
    }

    /// Sends a MESSAGE (new branch) and returns its answer.
    fn ask(&mut self, call_id: &str, cseq: u32, extra: &str) -> String {
        let m = self.text(call_id, cseq, extra);
        self.ask_raw(m.as_bytes())
    }

    /// Sends a MESSAGE that must be accepted; returns the `X-Incident-Id` it carried, if any.
    fn accepted(&mut self, call_id: &str, extra: &str) -> Option<String> {
        let r = self.ask(call_id, 1, extra);
        assert_eq!(status_of(&r), 202, "{extra:?}: {r}");
        header_of(&r, "X-Incident-Id").map(str::to_string)
    }
}

fn timeline(rec: &Value) -> Vec<Value> {
    rec["timeline"].as_array().cloned().unwrap_or_default()
}

/// The timeline entries named `event`.
fn entries(rec: &Value, event: &str) -> Vec<Value> {
    timeline(rec).into_iter().filter(|e| e["event"] == event).collect()
}

fn one_entry(rec: &Value, event: &str) -> Value {
    let found = entries(rec, event);
    assert_eq!(found.len(), 1, "{event:?} entries in {:?}\n{rec:#}", events(rec));
    found.into_iter().next().unwrap()
}

fn queue_join_notes(rec: &Value) -> usize {
    entries(rec, "note").iter().filter(|e| e["detail"]["event"] == "queue_join").count()
}

fn readyz(d: &Daemon) -> u16 {
    http_get(d.http_port, "/readyz", None).0
}

// ---- every event kind, on one incident -------------------------------------

fn every_event_kind(transport: &str) {
    let l = line(Options::default());
    let d = &l.d;
    let mut c = Conn::open(d, transport);
    let r = format!("1700000000.{transport}");

    // An IVR choice before the incident: remembered, nothing opened yet.
    let none = c.accepted("ev-ivr-1", &format!("X-Event: ivr\r\nX-Call-Ref: {r}\r\nX-IVR-Path: 2\r\n"));
    assert_eq!(none, None, "an ivr event without an incident named one");
    assert!(d.incidents("").is_empty(), "ivr opened an incident: {:?}", d.incidents(""));

    // The incident: classified by the remembered path (2 → outage/high).
    let id = c.accepted("ev-inc", &format!("X-Event: incident\r\nX-Call-Ref: {r}\r\n")).expect("X-Incident-Id");
    let rec = d.incident(&id);
    assert_eq!(rec["source"], "sip", "{rec:#}");
    assert_eq!((rec["category"].as_str(), rec["severity"].as_str()), (Some("outage"), Some("high")), "{rec:#}");
    assert_eq!(rec["ivr_path"], serde_json::json!(["2"]), "{rec:#}");

    // An IVR choice after it reclassifies (2,1 → outage/critical).
    let ivr = format!("X-Event: ivr\r\nX-Call-Ref: {r}\r\nX-IVR-Path: 2,1\r\n");
    assert_eq!(c.accepted("ev-ivr-2", &ivr).as_deref(), Some(id.as_str()));
    let rec = d.incident(&id);
    assert_eq!(rec["severity"], "critical", "{rec:#}");
    let input = one_entry(&rec, "ivr_input");
    assert_eq!(input["detail"]["ivr_path"], serde_json::json!(["2", "1"]), "{input}");
    let last_classified = entries(&rec, "classified").pop().expect("classified");
    assert_eq!(last_classified["detail"]["severity"], "critical", "{last_classified}");

    let join = format!("X-Event: queue-join\r\nX-Call-Ref: {r}\r\nX-Queue: support\r\n");
    assert_eq!(c.accepted("ev-join", &join).as_deref(), Some(id.as_str()));
    let rec = d.incident(&id);
    assert_eq!(queue_join_notes(&rec), 1, "{rec:#}");

    let abandon = format!("X-Event: queue-abandon\r\nX-Call-Ref: {r}\r\nX-Queue: support\r\nX-Wait-Seconds: 45\r\n");
    assert_eq!(c.accepted("ev-abandon", &abandon).as_deref(), Some(id.as_str()));
    let e = one_entry(&d.incident(&id), "abandoned");
    assert_eq!(
        (e["detail"]["wait_seconds"].as_u64(), e["detail"]["queue"].as_str()),
        (Some(45), Some("support")),
        "{e}"
    );

    let agent = format!("X-Event: agent-connect\r\nX-Call-Ref: {r}\r\nX-Agent: agent-7\r\n");
    assert_eq!(c.accepted("ev-agent", &agent).as_deref(), Some(id.as_str()));
    let e = one_entry(&d.incident(&id), "answered_elsewhere");
    assert_eq!(e["detail"]["agent"], "agent-7", "{e}");

    let hangup = format!("X-Event: hangup\r\nX-Call-Ref: {r}\r\n");
    assert_eq!(c.accepted("ev-hangup", &hangup).as_deref(), Some(id.as_str()));
    let rec = d.incident(&id);
    let e = one_entry(&rec, "caller_hangup");
    assert_eq!(e["actor"], "sip", "{e}");

    // All of it on one incident.
    let all = d.incidents("");
    assert_eq!(all.len(), 1, "{all:?}");
    // Contract §7: the caller number is never logged.
    assert!(!d.log().contains(&CALLER[1..]), "the caller number reached the log");
    let m = d.metrics();
    assert!(metric_value(&m, "dispatchd_sip_requests_total", "method=\"MESSAGE\"") >= 7.0, "{m}");
}

#[test]
fn every_event_kind_over_udp() {
    every_event_kind("udp");
}

#[test]
fn every_event_kind_over_tcp() {
    every_event_kind("tcp");
}

#[test]
fn invite_and_message_with_one_call_ref_share_the_incident() {
    let l = line(Options::default());
    let d = &l.d;
    let p = UdpPeer::new(d);
    p.send(invite(p.port(), "inv-shared", "X-Call-Ref: 1700000000.77\r\nX-IVR-Path: 9\r\n").as_bytes());
    let resp = p.recv_final(ANSWER).expect("answer to INVITE");
    assert_eq!(status_of(&resp), 603, "{resp}");
    p.send(ack_for(&resp, p.port(), "inv-shared").as_bytes());
    let id = header_of(&resp, "X-Incident-Id").expect("X-Incident-Id").to_string();

    let mut tcp = Conn::open(d, "tcp");
    let join = "X-Event: queue-join\r\nX-Call-Ref: 1700000000.77\r\nX-Queue: billing\r\n";
    assert_eq!(tcp.accepted("msg-shared-1", join).as_deref(), Some(id.as_str()));
    let mut udp = Conn::open(d, "udp");
    // An `incident` event for a call that already has one returns it.
    let inc = "X-Event: incident\r\nX-Call-Ref: 1700000000.77\r\n";
    assert_eq!(udp.accepted("msg-shared-2", inc).as_deref(), Some(id.as_str()));
    let agent = "X-Event: agent-connect\r\nX-Call-Ref: 1700000000.77\r\nX-Agent: a-1\r\n";
    assert_eq!(udp.accepted("msg-shared-3", agent).as_deref(), Some(id.as_str()));

    let rec = d.incident(&id);
    assert_eq!(queue_join_notes(&rec), 1, "{rec:#}");
    one_entry(&rec, "answered_elsewhere");
    assert_eq!(d.incidents("").len(), 1, "{:?}", d.incidents(""));
}

// ---- refused MESSAGEs write nothing ------------------------------------------

fn refused_messages_write_nothing(transport: &str) {
    let l = line(Options::default());
    let d = &l.d;
    let mut c = Conn::open(d, transport);
    let id = c.accepted("bad-open", "X-Event: incident\r\nX-Call-Ref: R1\r\n").expect("X-Incident-Id");
    let before = timeline(&d.incident(&id)).len();

    let cases: &[(&str, &str, &str)] = &[
        ("X-Call-Ref: R1\r\n", "Missing X-Event", "missing header X-Event"),
        ("X-Event: \r\nX-Call-Ref: R1\r\n", "Missing X-Event", "missing header X-Event"),
        ("X-Event: bogus\r\nX-Call-Ref: R1\r\n", "Unknown X-Event", "unknown value of header X-Event"),
        ("X-Event: dtmf\r\nX-Call-Ref: R1\r\n", "Unknown X-Event", "unknown value of header X-Event"),
        ("X-Event: hangup\r\n", "Missing X-Call-Ref", "missing header X-Call-Ref"),
        ("X-Event: queue-join\r\nX-Queue: q\r\n", "Missing X-Call-Ref", "missing header X-Call-Ref"),
        ("X-Event: ivr\r\nX-Call-Ref: R1\r\n", "Missing X-IVR-Path", "missing header X-IVR-Path"),
        ("X-Event: ivr\r\nX-Call-Ref: R1\r\nX-IVR-Path: 2,x\r\n", "Bad X-IVR-Path", "bad value of header X-IVR-Path"),
        ("X-Event: queue-join\r\nX-Call-Ref: R1\r\n", "Missing X-Queue", "missing header X-Queue"),
        ("X-Event: queue-abandon\r\nX-Call-Ref: R1\r\n", "Missing X-Queue", "missing header X-Queue"),
        (
            "X-Event: queue-abandon\r\nX-Call-Ref: R1\r\nX-Queue: q\r\nX-Wait-Seconds: 1.5\r\n",
            "Bad X-Wait-Seconds",
            "bad value of header X-Wait-Seconds",
        ),
        // Would open a second incident if it were accepted.
        ("X-Event: incident\r\nX-Call-Ref: R2\r\nX-Wait-Seconds: soon\r\n", "Bad X-Wait-Seconds", "X-Wait-Seconds"),
    ];
    for (i, (extra, reason, warning)) in cases.iter().enumerate() {
        let r = c.ask(&format!("bad-{i}"), 1, extra);
        let first = r.lines().next().unwrap_or("");
        assert_eq!(first, format!("SIP/2.0 400 {reason}"), "{extra:?}: {r}");
        let w = header_of(&r, "Warning").unwrap_or_else(|| panic!("no Warning: {r}"));
        assert!(w.starts_with("399 dispatchd \"") && w.contains(warning), "{extra:?}: Warning {w:?}");
        assert!(header_of(&r, "X-Incident-Id").is_none(), "{r}");
    }
    // Exactly the format of the contract's example.
    let r = c.ask("bad-exact", 1, "X-Event: hangup\r\n");
    assert_eq!(header_of(&r, "Warning"), Some("399 dispatchd \"missing header X-Call-Ref\""), "{r}");

    // In a dialog we never established: 481.
    let in_dialog = c
        .text("bad-dialog", 1, "X-Event: hangup\r\nX-Call-Ref: R1\r\n")
        .replace("To: <sip:incident@127.0.0.1>\r\n", "To: <sip:incident@127.0.0.1>;tag=unknown\r\n");
    assert_eq!(status_of(&c.ask_raw(in_dialog.as_bytes())), 481);

    let rec = d.incident(&id);
    assert_eq!(timeline(&rec).len(), before, "a refused MESSAGE reached the timeline: {:?}", events(&rec));
    assert_eq!(d.incidents("").len(), 1, "a refused MESSAGE opened an incident: {:?}", d.incidents(""));
    // Nor any call state or dedup key of a refused MESSAGE.
    for pattern in ["*call:R2", "*bad-*"] {
        assert_eq!(l.redis.cli(&["KEYS", pattern]).trim(), "", "{pattern} written for a refused MESSAGE");
    }
}

#[test]
fn refused_messages_write_nothing_over_udp() {
    refused_messages_write_nothing("udp");
}

#[test]
fn refused_messages_write_nothing_over_tcp() {
    refused_messages_write_nothing("tcp");
}

// ---- duplicates --------------------------------------------------------------

fn duplicates_are_applied_once(transport: &str) {
    let l = line(Options::default());
    let d = &l.d;
    let mut c = Conn::open(d, transport);
    let id = c.accepted("dup-open", "X-Event: incident\r\nX-Call-Ref: D1\r\n").expect("X-Incident-Id");

    let join = "X-Event: queue-join\r\nX-Call-Ref: D1\r\nX-Queue: support\r\n";
    let first = message(c.via(), c.port(), "dup-1", 5, "dup-branch-1", join);
    let r = c.ask_raw(first.as_bytes());
    assert_eq!((status_of(&r), header_of(&r, "X-Incident-Id")), (202, Some(id.as_str())), "{r}");
    // The same request again (a retransmission): the same answer, nothing applied twice.
    let again = c.ask_raw(first.as_bytes());
    assert_eq!(status_of(&again), 202, "{again}");
    // Several at once, back to back.
    for _ in 0..3 {
        c.send(first.as_bytes());
    }
    // Re-sent with a new branch (same Call-ID and CSeq): accepted, applied once.
    let resent = message(c.via(), c.port(), "dup-1", 5, "dup-branch-2", join);
    let mut answers = Vec::new();
    c.send(resent.as_bytes());
    // Collect until the re-send's own answer (its Via names its branch).
    while let Some(r) = c.recv(ANSWER) {
        let done = r.contains("dup-branch-2");
        answers.push(r);
        if done {
            break;
        }
    }
    assert!(answers.iter().all(|a| status_of(a) == 202), "{answers:?}");
    let last = answers.last().expect("an answer to the re-send");
    assert!(last.contains("dup-branch-2"), "{answers:?}");
    assert_eq!(header_of(last, "X-Incident-Id"), Some(id.as_str()), "{last}");
    assert_eq!(queue_join_notes(&d.incident(&id)), 1, "{:?}", events(&d.incident(&id)));

    // A new CSeq is a new event.
    let next = message(c.via(), c.port(), "dup-1", 6, "dup-branch-3", join);
    assert_eq!(status_of(&c.ask_raw(next.as_bytes())), 202);
    assert_eq!(queue_join_notes(&d.incident(&id)), 2, "{:?}", events(&d.incident(&id)));
}

#[test]
fn duplicates_are_applied_once_over_udp() {
    duplicates_are_applied_once("udp");
}

#[test]
fn duplicates_are_applied_once_over_tcp() {
    duplicates_are_applied_once("tcp");
}

// ---- Redis down ----------------------------------------------------------------

#[test]
fn redis_down_means_503_then_202_again() {
    let mut l = line(Options::default());
    let inc = "X-Event: incident\r\nX-Call-Ref: O1\r\n";
    l.redis.kill();

    // Right away (the daemon may not know yet: the write fails) and once it knows.
    let mut udp = Conn::open(&l.d, "udp");
    let r = udp.ask("out-1", 1, inc);
    assert_eq!(status_of(&r), 503, "{r}");
    assert!(header_of(&r, "Retry-After").is_some_and(|v| v.parse::<u32>().is_ok()), "{r}");
    wait_until("/readyz to notice Redis is down", Duration::from_secs(30), || readyz(&l.d) != 200);
    let mut tcp = Conn::open(&l.d, "tcp");
    let r = tcp.ask("out-2", 1, "X-Event: hangup\r\nX-Call-Ref: O1\r\n");
    assert_eq!(status_of(&r), 503, "{r}");
    assert!(header_of(&r, "Retry-After").is_some(), "{r}");

    l.redis.restart();
    wait_until("/readyz 200 after Redis is back", Duration::from_secs(60), || readyz(&l.d) == 200);
    // The PBX re-sends (new branch, same Call-ID and CSeq): now it is stored.
    let id = udp.accepted("out-1", inc).expect("X-Incident-Id");
    assert_eq!(tcp.accepted("out-2", "X-Event: hangup\r\nX-Call-Ref: O1\r\n").as_deref(), Some(id.as_str()));
    one_entry(&l.d.incident(&id), "caller_hangup");
    assert_eq!(l.d.incidents("").len(), 1);
}

// ---- sipp -------------------------------------------------------------------------

fn sipp_message(transport: &str) {
    let l = line(Options::default());
    let d = &l.d;
    let r = format!("sipp-{transport}");
    let run = |event: &str, name: &str, value: &str| {
        let keys =
            ["-key", "event", event, "-key", "call_ref", &r, "-key", "extra_name", name, "-key", "extra_value", value];
        let run = sipp(d, "message_uac.xml", transport, &keys);
        assert!(run.ok, "sipp message_uac.xml {event} over {transport} failed:\n{}", run.output);
        let ids = logged_ids(&run);
        assert_eq!(ids.len(), 1, "{ids:?}\n{}", run.output);
        ids.into_iter().next().unwrap()
    };
    let id = run("incident", "X-Queue", "support");
    let rec = d.incident(&id);
    assert_eq!((rec["source"].as_str(), rec["queue"].as_str()), (Some("sip"), Some("support")), "{rec:#}");
    assert_eq!(run("queue-abandon", "X-Queue", "support"), id);
    let e = one_entry(&d.incident(&id), "abandoned");
    assert_eq!(e["detail"]["queue"], "support", "{e}");
    assert_eq!(run("hangup", "X-Agent", "none"), id);
    one_entry(&d.incident(&id), "caller_hangup");
    assert_eq!(d.incidents("").len(), 1);
}

#[test]
fn sipp_message_over_udp() {
    sipp_message("u1");
}

#[test]
fn sipp_message_over_tcp() {
    sipp_message("t1");
}

// ---- hostile ------------------------------------------------------------------------

/// One request on a fresh peer (TCP: a fresh connection, which the daemon may close).
fn ask_once(d: &Daemon, transport: &str, build: impl Fn(&str, u16) -> Vec<u8>) -> Option<String> {
    let mut c = Conn::open(d, transport);
    let bytes = build(c.via(), c.port());
    c.send(&bytes);
    c.recv(Duration::from_secs(5))
}

fn hostile_messages(transport: &str) {
    let l = line(Options::default());
    let d = &l.d;
    let big = "7".repeat(10 * 1024);
    let thousand = vec!["1"; 1000].join(",");
    // (headers, the reason of the 400 expected)
    let refused: Vec<(String, &str)> = vec![
        (format!("X-Event: {big}\r\nX-Call-Ref: H1\r\n"), "Unknown X-Event"),
        ("X-Event: incident;drop table\r\nX-Call-Ref: H1\r\n".into(), "Unknown X-Event"),
        (format!("X-Event: ivr\r\nX-Call-Ref: H1\r\nX-IVR-Path: {thousand}\r\n"), "Bad X-IVR-Path"),
        (format!("X-Event: ivr\r\nX-Call-Ref: H1\r\nX-IVR-Path: {big}\r\n"), "Bad X-IVR-Path"),
        (
            "X-Event: hangup\r\nX-Call-Ref: H1\r\nX-Wait-Seconds: 99999999999999999999999\r\n".into(),
            "Bad X-Wait-Seconds",
        ),
        ("X-Event: hangup\r\nX-Call-Ref: H1\r\nX-Wait-Seconds: -5\r\n".into(), "Bad X-Wait-Seconds"),
        ("X-Event: incident\r\nX-Call-Ref: H1\r\nX-Wait-Seconds: 4294967296\r\n".into(), "Bad X-Wait-Seconds"),
        (format!("X-Event: incident\r\nX-Call-Ref: H1\r\nX-Wait-Seconds: {big}\r\n"), "Bad X-Wait-Seconds"),
    ];
    for (i, (extra, reason)) in refused.iter().enumerate() {
        let r = ask_once(d, transport, |via, port| {
            message(via, port, &format!("h-{i}"), 1, &next_branch(), extra).into_bytes()
        });
        let r = r.unwrap_or_else(|| panic!("no answer, expected 400 {reason}"));
        assert_eq!(r.lines().next(), Some(format!("SIP/2.0 400 {reason}").as_str()), "{r}");
    }
    // Binary and control bytes in X-Event: a 400 (from the parser or from us) or silence.
    for (i, junk) in [&b"\x00\xff\xfe\x80"[..], b"\x1b[31mincident", b"\xc3\x28", b"inc\x7fident"].iter().enumerate() {
        let r = ask_once(d, transport, |via, port| {
            let text =
                message(via, port, &format!("junk-{i}"), 1, &next_branch(), "X-Event: @@@\r\nX-Call-Ref: H1\r\n");
            let at = text.find("@@@").unwrap();
            let mut b = text.as_bytes()[..at].to_vec();
            b.extend_from_slice(junk);
            b.extend_from_slice(&text.as_bytes()[at + 3..]);
            b
        });
        if let Some(r) = r {
            assert_eq!(status_of(&r), 400, "junk X-Event {junk:?}: {r}");
        }
    }
    assert!(d.incidents("").is_empty(), "a refused MESSAGE opened an incident: {:?}", d.incidents(""));

    // 10 KB values where they are only facts: accepted, and stored bounded.
    let long = format!("X-Event: incident\r\nX-Call-Ref: {big}\r\nX-Queue: {big}\r\nX-Agent: {big}\r\n");
    let r = ask_once(d, transport, |via, port| message(via, port, "h-long", 1, &next_branch(), &long).into_bytes())
        .expect("an answer to long values");
    assert_eq!(status_of(&r), 202, "{r}");
    let id = header_of(&r, "X-Incident-Id").expect("X-Incident-Id").to_string();
    let rec = d.incident(&id);
    assert!(rec["queue"].as_str().is_some_and(|q| q.len() <= 64), "{rec:#}");
    let agent = format!("X-Event: agent-connect\r\nX-Call-Ref: {big}\r\nX-Agent: {big}\r\n");
    let r = ask_once(d, transport, |via, port| message(via, port, "h-long-2", 1, &next_branch(), &agent).into_bytes())
        .expect("an answer to long values");
    assert_eq!((status_of(&r), header_of(&r, "X-Incident-Id")), (202, Some(id.as_str())), "{r}");
    let e = one_entry(&d.incident(&id), "answered_elsewhere");
    assert!(e["detail"]["agent"].as_str().is_some_and(|a| a.len() <= 64), "{e}");

    let mut d = l.d;
    assert!(d.alive(), "the daemon died");
    assert_still_serving(&d, &format!("after-hostile-{transport}"));
    assert_eq!(readyz(&d), 200);
}

#[test]
fn hostile_messages_over_udp() {
    hostile_messages("udp");
}

#[test]
fn hostile_messages_over_tcp() {
    hostile_messages("tcp");
}

#[test]
fn message_from_outside_the_allow_list_gets_nothing() {
    let l = line(Options { allow: vec!["10.0.0.0/8".into()], ..Default::default() });
    let mut d = l.d;
    let p = UdpPeer::new(&d);
    p.send(message("UDP", p.port(), "na-1", 1, "na-1", "X-Event: incident\r\nX-Call-Ref: NA\r\n").as_bytes());
    let answers = p.recv_all(Duration::from_secs(2));
    assert!(answers.is_empty(), "MESSAGE from outside the allow list answered: {answers:?}");

    let mut c = TcpStream::connect(d.sip_addr()).expect("connect");
    let _ = c.write_all(message("TCP", 9, "na-2", 1, "na-2", "X-Event: incident\r\nX-Call-Ref: NA\r\n").as_bytes());
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut said = Vec::new();
    let _ = c.read_to_end(&mut said);
    assert!(said.is_empty(), "bytes sent outside the allow list: {:?}", String::from_utf8_lossy(&said));

    assert!(d.incidents("").is_empty(), "{:?}", d.incidents(""));
    assert!(d.alive(), "the daemon died");
    assert_eq!(readyz(&d), 200);
}
