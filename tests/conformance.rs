//! RFC 4475 torture messages against the real daemon, over UDP and over TCP.
//!
//! Every file of `shared/conformance/rfc4475` is sent as it is, except that its
//! Call-ID values are replaced by fresh ones (so runs never share Redis state).
//! The expected answer of each file is written down in [`EXPECTED`] with the
//! reason, so a reader sees why; a file without an entry fails the test.
//!
//! What is checked per message:
//! - the final responses seen (in order, UDP retransmissions folded) are one of the
//!   outcomes allowed for the file on that transport; silence is `[]`;
//! - a 1xx is only ever a `100`, only for a valid INVITE, and an accepted INVITE
//!   gets its `100` before the `603`;
//! - `X-Incident-Id` appears on the `603` and on nothing else; the incident it names
//!   exists and carries the Call-ID of the request that was answered;
//! - `405` and `200` to OPTIONS carry `Allow`; `420` carries `Unsupported`;
//! - a response carries the Call-ID of the request it answers, or — RFC 3261 §17.2.3 —
//!   that of an earlier message with the same top-Via branch, sent-by and method
//!   (several RFC 4475 messages share a Via, so for an RFC 3261 UAS they are
//!   retransmissions of one another's transaction);
//! - the daemon process is still alive.
//!
//! At the end: no incident exists for any Call-ID that was not answered 603, and
//! a fresh well-formed INVITE is still answered (`assert_still_serving`).

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/conformance/rfc4475");

/// Allowed outcomes: each is the list of final statuses seen, in order (`[]` = silence).
/// `603` stands for "the INVITE was accepted": 100, then 603 with `X-Incident-Id`.
type Outcomes = &'static [&'static [u16]];

/// Accepted INVITE: 100, then 603 + X-Incident-Id (decline mode).
const INVITE: Outcomes = &[&[603]];
/// Invalid message: 400 when it can be answered, else silence.
const REJECT: Outcomes = &[&[400], &[]];
/// A response: a UAS drops it.
const SILENT: Outcomes = &[&[]];
/// OPTIONS: 200 with Allow.
const OK: Outcomes = &[&[200]];
/// A method this UAS does not do (REGISTER, unknown): 405 with Allow.
const NOT_ALLOWED: Outcomes = &[&[405]];

struct Expect {
    file: &'static str,
    udp: Outcomes,
    tcp: Outcomes,
    why: &'static str,
}

const fn e(file: &'static str, udp: Outcomes, tcp: Outcomes, why: &'static str) -> Expect {
    Expect { file, udp, tcp, why }
}

/// The expectation table: file → allowed answers over UDP and over TCP, and why.
const EXPECTED: &[Expect] = &[
    // ---- RFC 4475 §3.1.2: invalid messages — 400 when answerable, else silence ----
    e("invalid__badaspec.sip", REJECT, REJECT, "§3.1.2.14: SP inside the <> of To's addr-spec"),
    e(
        "invalid__baddate.sip",
        REJECT,
        REJECT,
        "§3.1.2.12: Date with a non-GMT zone (the contract rejects what RFC 4475 calls invalid)",
    ),
    e("invalid__baddn.sip", REJECT, REJECT, "§3.1.2.15: unquoted display names with a comma"),
    e("invalid__badinv01.sip", REJECT, REJECT, "§3.1.2.1: empty Via/Contact params ';;,;,,'"),
    e(
        "invalid__badvers.sip",
        &[&[400], &[505], &[]],
        &[&[400], &[505], &[]],
        "§3.1.2.16: SIP/7.0 (RFC 4475 suggests 505, 400 also rejects it)",
    ),
    e("invalid__bigcode.sip", SILENT, SILENT, "§3.1.2.19: a response with code 4294967301: dropped"),
    e(
        "invalid__clerr.sip",
        REJECT,
        REJECT,
        "§3.1.2.2: Content-Length 9999 > body (TCP: waits for the body; closed after 1 s)",
    ),
    e("invalid__escruri.sip", REJECT, REJECT, "§3.1.2.11: escaped headers in the Request-URI"),
    e("invalid__ltgtruri.sip", REJECT, REJECT, "§3.1.2.7: Request-URI in <>, Via without branch"),
    e("invalid__lwsruri.sip", REJECT, REJECT, "§3.1.2.8: LWS inside the Request-URI"),
    e("invalid__lwsstart.sip", REJECT, REJECT, "§3.1.2.9: several SP between Request-Line elements"),
    e("invalid__mismatch01.sip", REJECT, REJECT, "§3.1.2.17: OPTIONS with CSeq method INVITE"),
    e("invalid__mismatch02.sip", REJECT, REJECT, "§3.1.2.18: NEWMETHOD with CSeq method INVITE"),
    e("invalid__ncl.sip", REJECT, REJECT, "§3.1.2.3: negative Content-Length (TCP: unframeable, closed)"),
    e("invalid__quotbal.sip", REJECT, REJECT, "§3.1.2.6: unterminated quoted display name in To"),
    e("invalid__regbadct.sip", REJECT, REJECT, "§3.1.2.13: Contact URI with ?headers not in <>"),
    e("invalid__scalar02.sip", REJECT, REJECT, "§3.1.2.4: CSeq 2^65 and an overlarge Expires"),
    e("invalid__scalarlg.sip", SILENT, SILENT, "§3.1.2.5: a response with overlarge scalars: dropped"),
    e("invalid__trws.sip", REJECT, REJECT, "§3.1.2.10: SP after SIP/2.0 on the Request-Line"),
    // ---- RFC 4475 §3.1.1 (valid), §3.2–§3.3 (transaction/application semantics), §3.4 (RFC 2543) ----
    e(
        "valid__badbranch.sip",
        &[&[200], &[400]],
        &[&[200], &[400]],
        "§3.2.1: branch is only the magic cookie: 400 is allowed, or fall back to RFC 2543 matching; OPTIONS → 200",
    ),
    e("valid__bcast.sip", SILENT, SILENT, "§3.3.10: a 200 response (broadcast Via): a UAS drops responses"),
    e(
        "valid__bext01.sip",
        &[&[420]],
        &[&[420]],
        "§3.3.5: Require with unknown option tags: RFC 3261 §8.2.2.3 MUST 420 + Unsupported",
    ),
    e("valid__cparam01.sip", NOT_ALLOWED, NOT_ALLOWED, "§3.3.12: REGISTER: this UAS is no registrar → 405"),
    e(
        "valid__cparam02.sip",
        NOT_ALLOWED,
        NOT_ALLOWED,
        "§3.3.13: REGISTER → 405 (same Via as cparam01: its retransmission)",
    ),
    e(
        "valid__dblreq.sip",
        NOT_ALLOWED,
        &[&[405, 603]],
        "§3.1.1.8: UDP: bytes after Content-Length 0 are discarded, the inner INVITE is not processed; TCP: two messages, both answered",
    ),
    e("valid__esc01.sip", INVITE, INVITE, "§3.1.1.3: escaped characters in URIs: a valid INVITE"),
    e(
        "valid__esc02.sip",
        NOT_ALLOWED,
        NOT_ALLOWED,
        "§3.1.1.5: method RE%47IST%45R is an unknown method (not REGISTER) → 405",
    ),
    e("valid__escnull.sip", NOT_ALLOWED, NOT_ALLOWED, "§3.1.1.4: REGISTER with %00 in URIs → 405"),
    e("valid__insuf.sip", &[&[400]], &[&[400]], "§3.3.1: INVITE without Call-ID, From, To, Max-Forwards: MUST 400"),
    e(
        "valid__inv2543.sip",
        INVITE,
        &[&[603], &[400], &[]],
        "§3.4.1: RFC 2543 INVITE (no branch, no tags, no Max-Forwards); TCP: no Content-Length on a stream (RFC 3261 §18.3 MUST) — accept, 400 or close",
    ),
    e(
        "valid__invut.sip",
        &[&[603], &[415]],
        &[&[603], &[415]],
        "§3.3.6: unknown body type: RFC 3261 §8.2.3 SHOULD 415; declining it (603) never uses the body",
    ),
    e("valid__longreq.sip", INVITE, INVITE, "§3.1.1.7: long values, 34 Vias in every form: a valid INVITE"),
    e("valid__lwsdisp.sip", OK, OK, "§3.1.1.6: display name without LWS before <: OPTIONS → 200"),
    e("valid__mcl01.sip", &[&[400]], REJECT, "§3.3.9: two Content-Length values: 400 (TCP: unframeable, close)"),
    e("valid__multi01.sip", &[&[400]], REJECT, "§3.3.8: several Call-ID/CSeq/To/From: 400 (TCP: l: 154 > body, waits)"),
    e("valid__noreason.sip", SILENT, SILENT, "§3.1.1.13: a 100 response without reason phrase: dropped"),
    e(
        "valid__novelsc.sip",
        &[&[416], &[200]],
        &[&[416], &[200]],
        "§3.3.3: soap.beep Request-URI: RFC 3261 §8.2.2.1 SHOULD 416; an OPTIONS 200 is tolerated",
    ),
    e("valid__regaut01.sip", NOT_ALLOWED, NOT_ALLOWED, "§3.3.7: REGISTER with an unknown auth scheme → 405"),
    e(
        "valid__regescrt.sip",
        NOT_ALLOWED,
        NOT_ALLOWED,
        "§3.3.14: REGISTER with an escaped header in Contact → 405 (same Via as escnull)",
    ),
    e(
        "valid__sdp01.sip",
        &[&[603], &[406]],
        &[&[603], &[406]],
        "§3.3.15: Accept: text/nobodyKnowsThis: 406 only matters for a body; 603 has none",
    ),
    e("valid__semiuri.sip", OK, OK, "§3.1.1.9: ';' in the Request-URI user part: OPTIONS → 200"),
    e("valid__transports.sip", OK, OK, "§3.1.1.10: Vias with SCTP/TLS/UNKNOWN transports: OPTIONS → 200"),
    e(
        "valid__unkscm.sip",
        &[&[416], &[200]],
        &[&[416], &[200]],
        "§3.3.2: unknown Request-URI scheme: SHOULD 416 (same Via as novelsc: its retransmission)",
    ),
    e(
        "valid__unksm2.sip",
        &[&[405], &[400], &[416]],
        &[&[405], &[400], &[416]],
        "§3.3.4: REGISTER with isbn:/http: URIs: 405 (no REGISTER here), a registrar's 400, or 416",
    ),
    e(
        "valid__wsinv.sip",
        &[&[481]],
        &[&[481]],
        "§3.1.1.1: odd whitespace, but To carries a tag: an INVITE in an unknown dialog → 481 (RFC 3261 §12.2.2)",
    ),
    e(
        "valid__zeromf.sip",
        OK,
        OK,
        "§3.3.11: OPTIONS with Max-Forwards 0: an endpoint processes it (only proxies answer 483)",
    ),
];

// ---------------------------------------------------------------------------
// Messages
// ---------------------------------------------------------------------------

struct Sample {
    file: String,
    bytes: Vec<u8>,
    /// The Call-ID values put in, in order of appearance.
    call_ids: Vec<String>,
    /// RFC 3261 §17.2.3 transaction identity of the first request (magic-cookie branch only).
    tx_key: Option<(String, String, String)>,
    /// Request-URI and method of the first request line, if a request.
    ruri: Option<String>,
    method: Option<String>,
}

fn corpus() -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(CORPUS)
        .expect("the RFC 4475 corpus")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".sip"))
        .map(|n| {
            let bytes = std::fs::read(std::path::Path::new(CORPUS).join(&n)).unwrap();
            (n, bytes)
        })
        .collect();
    files.sort();
    assert!(files.len() >= 40, "corpus too small: {}", files.len());
    files
}

/// Replaces every Call-ID header value (`Call-ID`, compact `i`) with a unique one;
/// every other byte is kept.
fn with_fresh_call_ids(bytes: &[u8], prefix: &str) -> (Vec<u8>, Vec<String>) {
    let text = std::str::from_utf8(bytes).expect("corpus files are ASCII");
    let mut out = String::with_capacity(text.len() + 64);
    let mut ids = Vec::new();
    for line in text.split_inclusive("\r\n") {
        let is_call_id = line.split_once(':').is_some_and(|(name, _)| {
            let n = name.trim_end_matches([' ', '\t']);
            !n.contains([' ', '\t']) && (n.eq_ignore_ascii_case("call-id") || n.eq_ignore_ascii_case("i"))
        });
        if !is_call_id {
            out.push_str(line);
            continue;
        }
        let (name, rest) = line.split_once(':').unwrap();
        let ws = rest.len() - rest.trim_start_matches([' ', '\t']).len();
        let id = format!("{prefix}-{}", ids.len() + 1);
        out.push_str(name);
        out.push(':');
        out.push_str(&rest[..ws]);
        out.push_str(&id);
        out.push_str(if line.ends_with("\r\n") { "\r\n" } else { "" });
        ids.push(id);
    }
    (out.into_bytes(), ids)
}

/// (branch, sent-by, method) of the top Via of the first request, when the branch
/// carries the RFC 3261 magic cookie and sits on the first Via line.
fn rfc3261_tx_key(text: &str) -> Option<(String, String, String)> {
    let mut lines = text.split("\r\n");
    let method = lines.next()?.split(' ').next()?.to_string();
    if method.starts_with("SIP/") {
        return None;
    }
    let via = lines.take_while(|l| !l.is_empty()).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        let n = n.trim();
        (n.eq_ignore_ascii_case("via") || n.eq_ignore_ascii_case("v")).then_some(v)
    })?;
    let top = via.split(',').next()?.trim();
    let (_proto, rest) = top.split_once([' ', '\t'])?;
    let sent_by = rest.split(';').next()?.trim().to_ascii_lowercase();
    let branch = rest.split(';').skip(1).find_map(|p| p.trim().strip_prefix("branch="))?.trim().to_string();
    branch.starts_with("z9hG4bK").then_some((branch, sent_by, method))
}

fn samples(transport: &str) -> Vec<Sample> {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    let run = format!("cf-{transport}-{}-{nanos}", std::process::id());
    corpus()
        .into_iter()
        .map(|(file, raw)| {
            let stem = file.trim_end_matches(".sip").replace("__", "-");
            let (bytes, call_ids) = with_fresh_call_ids(&raw, &format!("{run}-{stem}"));
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let first = text.split("\r\n").next().unwrap_or("");
            let (method, ruri) = if first.starts_with("SIP/") {
                (None, None)
            } else {
                let mut w = first.split(' ');
                (w.next().map(str::to_string), w.next().map(str::to_string))
            };
            Sample { tx_key: rfc3261_tx_key(&text), file, bytes, call_ids, ruri, method }
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Exchanges
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Transport {
    Udp,
    Tcp,
}

/// How long to listen: until `want` finals arrived (then a short grace for
/// unexpected extras), or — when fewer finals are also acceptable — about a
/// second of silence; once a 100 was seen, a final must follow, so wait long.
struct Wait {
    want: usize,
    short: bool,
}

impl Wait {
    fn of(outcomes: Outcomes) -> Wait {
        let want = outcomes.iter().map(|o| o.len()).max().unwrap_or(0);
        let least = outcomes.iter().map(|o| o.len()).min().unwrap_or(0);
        Wait { want, short: least < want || want == 0 }
    }
}

const SHORT: Duration = Duration::from_millis(1200);
const LONG: Duration = Duration::from_secs(20);
const GRACE: Duration = Duration::from_millis(200);

struct Collected {
    responses: Vec<String>,
    closed: bool,
}

fn is_final(r: &str) -> bool {
    !(100..200).contains(&status_of(r))
}

fn finals_of(responses: &[String]) -> Vec<&String> {
    // UDP retransmissions of a final response are byte-identical: fold them.
    let mut seen: Vec<&String> = Vec::new();
    for r in responses.iter().filter(|r| is_final(r)) {
        if !seen.contains(&r) {
            seen.push(r);
        }
    }
    seen
}

struct Clock {
    start: Instant,
    last_final: Option<Instant>,
}

impl Clock {
    /// When to stop listening, given what was collected so far.
    fn deadline(&self, wait: &Wait, responses: &[String]) -> Instant {
        let finals = finals_of(responses).len();
        let provisional = responses.iter().any(|r| !is_final(r));
        if finals >= wait.want && wait.want > 0 {
            return self.last_final.unwrap_or(self.start) + GRACE;
        }
        if provisional || !wait.short {
            return self.start + LONG;
        }
        self.start + SHORT
    }
}

fn udp_exchange(d: &Daemon, s: &Sample, wait: &Wait) -> Collected {
    let p = UdpPeer::new(d);
    p.send(&s.bytes);
    let mut clock = Clock { start: Instant::now(), last_final: None };
    let mut responses: Vec<String> = Vec::new();
    let mut buf = vec![0u8; 70_000];
    loop {
        let left = clock.deadline(wait, &responses).saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        p.sock.set_read_timeout(Some(left)).unwrap();
        let Ok((n, _)) = p.sock.recv_from(&mut buf) else { break };
        let r = String::from_utf8_lossy(&buf[..n]).into_owned();
        if is_final(&r) {
            let new = !responses.contains(&r);
            if new {
                clock.last_final = Some(Instant::now());
            }
            // ACK a final answer of an INVITE transaction so it is not retransmitted
            // (400 comes from the syntax checks, 481/483 are not INVITE transactions).
            let st = status_of(&r);
            if new
                && st >= 300
                && ![400, 481, 483].contains(&st)
                && s.method.as_deref() == Some("INVITE")
                && let Some(ack) = ack_from_response(&r, s.ruri.as_deref().unwrap_or("sip:x@127.0.0.1"))
            {
                p.send(ack.as_bytes());
            }
        }
        responses.push(r);
    }
    Collected { responses, closed: false }
}

fn tcp_exchange(d: &Daemon, s: &Sample, wait: &Wait) -> Collected {
    let mut c = TcpStream::connect(d.sip_addr()).expect("connect to the SIP TCP port");
    let _ = c.set_nodelay(true);
    let _ = c.write_all(&s.bytes);
    let mut clock = Clock { start: Instant::now(), last_final: None };
    let mut stream: Vec<u8> = Vec::new();
    let mut responses: Vec<String> = Vec::new();
    let mut closed = false;
    let mut buf = vec![0u8; 70_000];
    loop {
        let left = clock.deadline(wait, &responses).saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        c.set_read_timeout(Some(left)).unwrap();
        match c.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => {
                stream.extend_from_slice(&buf[..n]);
                for r in split_stream(&mut stream) {
                    if is_final(&r) {
                        clock.last_final = Some(Instant::now());
                    }
                    responses.push(r);
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    assert!(
        stream.iter().all(|b| *b == b'\r' || *b == b'\n'),
        "{}: unframed bytes from the daemon: {:?}",
        s.file,
        String::from_utf8_lossy(&stream)
    );
    Collected { responses, closed }
}

/// Takes whole responses (framed by their Content-Length) off the front of a TCP stream.
fn split_stream(stream: &mut Vec<u8>) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let skip = stream.iter().take_while(|b| **b == b'\r' || **b == b'\n').count();
        if skip == stream.len() {
            return out;
        }
        let Some(end) = stream.windows(4).position(|w| w == b"\r\n\r\n") else { return out };
        if end < skip {
            stream.drain(..skip);
            continue;
        }
        let head = String::from_utf8_lossy(&stream[skip..end]).into_owned();
        let len: usize = header_of(&head, "Content-Length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let total = end + 4 + len;
        if stream.len() < total {
            return out;
        }
        out.push(String::from_utf8_lossy(&stream[skip..total]).into_owned());
        stream.drain(..total);
    }
}

/// The ACK for a non-2xx final answer: the response's top Via, From, To, Call-ID, CSeq number.
fn ack_from_response(resp: &str, ruri: &str) -> Option<String> {
    let via = header_of(resp, "Via")?;
    let cseq = header_of(resp, "CSeq")?.split_whitespace().next()?.to_string();
    Some(format!(
        "ACK {ruri} SIP/2.0\r\nVia: {via}\r\nMax-Forwards: 70\r\nFrom: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {cseq} ACK\r\nContent-Length: 0\r\n\r\n",
        header_of(resp, "From")?,
        header_of(resp, "To")?,
        header_of(resp, "Call-ID")?,
    ))
}

// ---------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------

fn run(transport: Transport) {
    let tname = if transport == Transport::Udp { "udp" } else { "tcp" };
    let redis = Redis::start();
    let mut d = Daemon::start(&redis, Options::default());
    let samples = samples(tname);

    let table: HashMap<&str, &Expect> = EXPECTED.iter().map(|e| (e.file, e)).collect();
    let files: HashSet<&str> = samples.iter().map(|s| s.file.as_str()).collect();
    for e in EXPECTED {
        assert!(files.contains(e.file), "the table names {} but the corpus has no such file", e.file);
    }

    let mut failures: Vec<String> = Vec::new();
    let mut report: Vec<String> = Vec::new();
    // RFC 3261 transaction identity → the Call-IDs of messages sent with it so far.
    let mut by_tx: HashMap<(String, String, String), Vec<String>> = HashMap::new();
    // Call-IDs an incident may legitimately exist for (answered 603).
    let mut opened: HashSet<String> = HashSet::new();
    let mut incident_ids: HashMap<String, String> = HashMap::new();

    for s in &samples {
        let Some(exp) = table.get(s.file.as_str()) else {
            failures.push(format!("{}: no expectation in the table; add one", s.file));
            continue;
        };
        let outcomes = if transport == Transport::Udp { exp.udp } else { exp.tcp };
        let wait = Wait::of(outcomes);
        let got = match transport {
            Transport::Udp => udp_exchange(&d, s, &wait),
            Transport::Tcp => tcp_exchange(&d, s, &wait),
        };
        let finals = finals_of(&got.responses);
        let statuses: Vec<u16> = finals.iter().map(|r| status_of(r)).collect();
        let all: Vec<u16> = got.responses.iter().map(|r| status_of(r)).collect();
        let mut fail =
            |why: String| failures.push(format!("{tname} {}: {why}\n    answers: {:#?}", s.file, got.responses));

        // 1. The outcome is one of the allowed ones.
        if !outcomes.contains(&statuses.as_slice()) {
            fail(format!("final statuses {statuses:?}, expected one of {outcomes:?} ({})", exp.why));
        }
        // 2. Provisionals: only 100, only for a valid INVITE; an accepted INVITE gets one first.
        let valid_invite = s.file.starts_with("valid__") && String::from_utf8_lossy(&s.bytes).contains("INVITE sip:");
        for r in got.responses.iter().filter(|r| !is_final(r)) {
            if status_of(r) != 100 || !valid_invite {
                fail(format!("unexpected provisional {}", r.lines().next().unwrap_or("")));
            }
        }
        let retransmission = s.tx_key.as_ref().is_some_and(|k| by_tx.contains_key(k));
        if let Some(pos603) = got.responses.iter().position(|r| status_of(r) == 603).filter(|_| !retransmission)
            && !got.responses[..pos603].iter().any(|r| status_of(r) == 100)
        {
            fail("603 without a 100 Trying before it: not a new INVITE transaction".into());
        }
        // 3. Headers that must (not) be there.
        for r in &finals {
            let st = status_of(r);
            let id = header_of(r, "X-Incident-Id");
            if (st == 603) != id.is_some() {
                fail(format!("{st} with X-Incident-Id {id:?}: only a 603 may say an incident exists"));
            }
            if (st == 405 || (st == 200 && s.method.as_deref() == Some("OPTIONS"))) && header_of(r, "Allow").is_none() {
                fail(format!("{st} without Allow"));
            }
            if st == 420 && header_of(r, "Unsupported").is_none() {
                fail("420 without Unsupported".into());
            }
            if !r.starts_with("SIP/2.0 ") {
                fail(format!("not a SIP/2.0 status line: {:?}", r.lines().next()));
            }
        }
        // 4. Whose answer is it?
        let mut allowed_ids: HashSet<String> = s.call_ids.iter().cloned().collect();
        if let Some(k) = &s.tx_key {
            allowed_ids.extend(by_tx.get(k).cloned().unwrap_or_default());
        }
        for r in &got.responses {
            if let Some(cid) = header_of(r, "Call-ID")
                && !s.call_ids.is_empty()
                && !allowed_ids.contains(cid)
            {
                let other = samples.iter().find(|o| o.call_ids.iter().any(|c| c == cid)).map(|o| o.file.as_str());
                fail(format!(
                    "{} carries Call-ID {cid} (of {other:?}), not this request's {:?}; \
                         RFC 3261 §17.2.3 matches a transaction by branch AND sent-by AND method",
                    r.lines().next().unwrap_or(""),
                    s.call_ids
                ));
            }
        }
        // 5. An incident named by a 603 exists and is this request's.
        for r in finals.iter().filter(|r| status_of(r) == 603) {
            let Some(id) = header_of(r, "X-Incident-Id") else { continue };
            let (code, body) = http_get(d.http_port, &format!("/v1/incidents/{id}"), Some(ADMIN_TOKEN));
            if code != 200 {
                fail(format!("incident {id} of the 603: GET answered {code} {body}"));
                continue;
            }
            let rec: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let cid = rec["call_id"].as_str().unwrap_or("").to_string();
            if !allowed_ids.contains(&cid) {
                fail(format!("603 names incident {id} whose call_id is {cid:?}, not this request's {:?}", s.call_ids));
            }
            if let Some(prev) = incident_ids.insert(id.to_string(), s.file.clone())
                && !retransmission
            {
                fail(format!("incident {id} was already given to {prev}"));
            }
            opened.insert(cid);
        }
        if let Some(k) = &s.tx_key {
            by_tx.entry(k.clone()).or_default().extend(s.call_ids.iter().cloned());
        }
        // 6. Still running.
        if !d.alive() {
            failures.push(format!("{tname} {}: the daemon died", s.file));
            break;
        }
        let line = format!(
            "{tname}  {:<26} {:<14} finals {:<12} {}",
            s.file,
            format!("{all:?}"),
            format!("{statuses:?}"),
            if got.closed { "(connection closed by daemon)" } else { "" }
        );
        report.push(line);
    }

    // No incident for anything that was not answered 603.
    let ours: HashSet<&String> = samples.iter().flat_map(|s| s.call_ids.iter()).collect();
    for inc in d.incidents("?limit=500") {
        let cid = inc["call_id"].as_str().unwrap_or("").to_string();
        if ours.contains(&cid) && !opened.contains(&cid) {
            let file = samples.iter().find(|s| s.call_ids.contains(&cid)).map(|s| s.file.as_str());
            failures.push(format!(
                "{tname}: incident {} exists for {file:?} (Call-ID {cid}) which was never answered 603",
                inc["id"]
            ));
        }
        if cid.is_empty() {
            failures.push(format!("{tname}: incident {} has an empty call_id: {inc}", inc["id"]));
        }
    }

    eprintln!("\n---- {tname} summary ----\n{}", report.join("\n"));
    assert!(d.alive(), "the daemon died");
    assert_still_serving(&d, &format!("cf-{tname}-after-{}", std::process::id()));
    assert!(failures.is_empty(), "{} problem(s):\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn rfc4475_over_udp() {
    run(Transport::Udp);
}

#[test]
fn rfc4475_over_tcp() {
    run(Transport::Tcp);
}

#[test]
fn call_id_replacement_keeps_everything_else() {
    let (out, ids) =
        with_fresh_call_ids(b"INVITE sip:a@b SIP/2.0\r\nCall-ID:  x@y\r\ni: z\r\nVia: v\r\n\r\nbody i: not\r\n", "N");
    assert_eq!(ids, ["N-1", "N-2"]);
    assert_eq!(out, b"INVITE sip:a@b SIP/2.0\r\nCall-ID:  N-1\r\ni: N-2\r\nVia: v\r\n\r\nbody i: not\r\n");
    assert_eq!(
        rfc3261_tx_key("OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/UDP Host:5060;branch=z9hG4bKa\r\n\r\n"),
        Some(("z9hG4bKa".into(), "host:5060".into(), "OPTIONS".into()))
    );
    assert_eq!(rfc3261_tx_key("OPTIONS sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=abc\r\n\r\n"), None);
}
