//! Fuzzing every parser that takes network input, on stable Rust: a
//! mutation fuzzer over seed corpora (the RFC 4475 torture messages, the PBX
//! transcripts of tests/acd, the frames of contract §4, ids and query
//! strings), with a deterministic generator so a failure repeats.
//!
//! Each target must never panic, and keeps its own invariants (framing a
//! stream in pieces agrees with framing it whole; a normalised id is a fixed
//! point; readers stay within their buffer bounds).
//!
//! `./deploy/test` runs each target for up to 20,000 inputs or 3 seconds,
//! whichever comes first (`FUZZ_ITERATIONS`, `FUZZ_SECONDS`). The long run of
//! the README (1,000,000 inputs per target, no time limit):
//!
//! ```sh
//! FUZZ_ITERATIONS=1000000 FUZZ_SECONDS=0 cargo test --release --test fuzz -- --nocapture --test-threads 1
//! ```
//!
//! A crashing input is written to `target/fuzz-crashes/<target>-<seed>.bin`
//! and the test fails naming it; `FUZZ_SEED` changes the generator's seed.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::time::Instant;

use dispatchd::acd::{ami, esl};
use dispatchd::domain::ids::normalize_id;
use dispatchd::sip::wire::{self, Frame, Framer, Verdict};

const MAX_INPUT: usize = 96 * 1024;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Tokens worth splicing into any input: separators, encodings, numbers at
/// the edges, non-ASCII (including characters that straddle a split).
const DICT: &[&[u8]] = &[
    b"\r\n",
    b"\r\n\r\n",
    b"\n\n",
    b":",
    b";",
    b",",
    b"=",
    b" ",
    b"\t",
    b"\0",
    b"%",
    b"%25",
    b"%0A",
    b"\"",
    b"\\",
    b"<",
    b">",
    b"{",
    b"}",
    b"[",
    b"]",
    b"0",
    b"-1",
    b"18446744073709551616",
    b"99999999999999999999999",
    "é".as_bytes(),
    "\u{200b}".as_bytes(),
    "\u{1F6A8}".as_bytes(),
    b"\xff\xfe",
    b"\xc3",
    b"Content-Length: ",
    b"l: 0",
    b"Via: SIP/2.0/UDP x;branch=z9hG4bK",
    b"INC-",
    b"&",
    b"?",
];

/// One mutated input from the seeds.
fn mutate(rng: &mut Rng, seeds: &[Vec<u8>]) -> Vec<u8> {
    let mut v = seeds[rng.below(seeds.len())].clone();
    for _ in 0..1 + rng.below(8) {
        let len = v.len();
        match rng.below(10) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = rng.next() as u8;
            }
            2 => {
                let i = rng.below(len + 1);
                v.insert(i, rng.next() as u8);
            }
            3 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(64));
                v.drain(i..i + n);
            }
            4 if len > 0 => {
                let i = rng.below(len);
                let n = 1 + rng.below((len - i).min(256));
                let chunk = v[i..i + n].to_vec();
                let most = if rng.below(50) == 0 { 400 } else { 4 };
                let times = 1 + rng.below(most);
                for _ in 0..times {
                    let at = rng.below(v.len() + 1);
                    v.splice(at..at, chunk.iter().copied());
                }
            }
            5 | 6 => {
                let t = DICT[rng.below(DICT.len())];
                let i = rng.below(len + 1);
                v.splice(i..i, t.iter().copied());
            }
            7 => {
                let other = &seeds[rng.below(seeds.len())];
                if !other.is_empty() {
                    let a = rng.below(other.len());
                    let b = a + rng.below(other.len() - a);
                    let i = rng.below(len + 1);
                    v.splice(i..i, other[a..=b.min(other.len() - 1)].iter().copied());
                }
            }
            8 if len > 0 => v.truncate(rng.below(len)),
            _ => {
                // A long run of one byte (oversized fields, endless headers).
                let i = rng.below(len + 1);
                let b = b"a \r\n:0,%"[rng.below(8)];
                v.splice(i..i, std::iter::repeat_n(b, 1 + rng.below(70_000)));
            }
        }
        v.truncate(MAX_INPUT);
    }
    v
}

/// Inputs per target (`FUZZ_ITERATIONS`, default 20,000), and at most
/// `FUZZ_SECONDS` of it (default 3; 0 = no time limit).
fn budget() -> (u64, Option<std::time::Duration>) {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let secs = env("FUZZ_SECONDS").unwrap_or(3);
    (env("FUZZ_ITERATIONS").unwrap_or(20_000), (secs > 0).then(|| std::time::Duration::from_secs(secs)))
}

/// Runs `target` over `iterations()` mutated inputs; panics (after saving the
/// input) on the first input that makes it panic.
fn fuzz(name: &str, seeds: Vec<Vec<u8>>, target: impl Fn(&[u8])) {
    assert!(!seeds.is_empty(), "{name}: no seeds");
    let base: u64 = std::env::var("FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed);
    let seed = name.bytes().fold(base, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b))) | 1;
    let mut rng = Rng(seed);
    for s in &seeds {
        target(s);
    }
    let (most, time) = budget();
    let started = Instant::now();
    let mut n = 0;
    for i in 0..most {
        if time.is_some_and(|t| started.elapsed() > t) {
            break;
        }
        n += 1;
        let state = rng.0;
        let input = mutate(&mut rng, &seeds);
        if catch_unwind(AssertUnwindSafe(|| target(&input))).is_err() {
            let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-crashes");
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join(format!("{name}-{state:016x}.bin"));
            let _ = std::fs::write(&path, &input);
            panic!("{name}: input {i} panicked; saved to {}", path.display());
        }
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!("fuzz {name}: {n} inputs, {secs:.1} s, {:.0} inputs/s, no panic", n as f64 / secs.max(1e-9));
}

fn read_dir(dir: &str, ext: &str) -> Vec<Vec<u8>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

// ---- SIP wire ----------------------------------------------------------------------

fn sip_seeds() -> Vec<Vec<u8>> {
    let mut seeds = read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/conformance/rfc4475"), "sip");
    seeds.push(
        b"INFO sip:dispatchd@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:5070;branch=z9hG4bK-1\r\n\
          From: <sip:+15550001234@127.0.0.1>;tag=a\r\nTo: <sip:incident@127.0.0.1>;tag=b\r\nCall-ID: c\r\n\
          CSeq: 2 INFO\r\nContent-Type: application/dtmf-relay\r\nContent-Length: 24\r\n\r\nSignal=5\r\nDuration=160\r\n"
            .to_vec(),
    );
    seeds.push(
        b"MESSAGE sip:incident@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bK-2\r\n\
          From: <sip:d@127.0.0.1>;tag=m\r\nTo: <sip:incident@127.0.0.1>\r\nCall-ID: m1\r\nCSeq: 1 MESSAGE\r\n\
          X-Event: queue-abandon\r\nX-Call-Ref: 1700000000.1\r\nX-Queue: support\r\nX-Wait-Seconds: 95\r\n\
          X-IVR-Path: 2,1\r\nP-Asserted-Identity: <sip:+442071234890@pbx>\r\nContent-Length: 0\r\n\r\n"
            .to_vec(),
    );
    seeds
}

/// Everything the line does with a parsed request, short of Redis.
fn use_message(v: Verdict) {
    match v {
        Verdict::Ok(msg) => {
            let reply = msg.reply();
            assert!(reply.vias.len() <= wire::MAX_VIAS, "Vias copied beyond the bound");
            let _ = wire::response(&reply, 400, "Bad Request\r\nInjected: x", Some("t\r\n"), &[("X", "a\nb")], b"");
            let _ = msg.defect();
            match msg.method() {
                Some("INVITE") => {
                    let _ = dispatchd::sip::call::facts_of_invite(&msg);
                }
                Some("MESSAGE") => {
                    let _ = dispatchd::sip::message::event_of(&msg);
                }
                Some("INFO") => {
                    let _ = dispatchd::sip::call::dtmf_digit(msg.header("content-type"), &msg.body);
                }
                _ => {}
            }
        }
        Verdict::Reject { reply, .. } => assert!(!reply.vias.is_empty(), "a reject must be addressable"),
        Verdict::Drop(_) => {}
    }
}

#[test]
fn fuzz_sip_wire() {
    fuzz("sip_wire", sip_seeds(), |input| {
        use_message(wire::parse_datagram(input));
        // Framing in pieces (split points from the input) agrees with framing whole.
        let whole = wire::frame_stream(input);
        let mut f = Framer::default();
        let step = 1 + input.first().map_or(7, |b| usize::from(*b) % 97);
        let mut seen = None;
        let mut end = 0;
        while end < input.len() {
            end = (end + step).min(input.len());
            match f.next(&input[..end]) {
                Ok(None) => continue,
                other => {
                    seen = Some(other.map_err(|_| ()));
                    break;
                }
            }
        }
        let whole = whole.map_err(|_| ());
        match (seen, whole) {
            // In pieces, a keep-alive can be seen before the rest of it arrives.
            (Some(Ok(Some(Frame::KeepAlive(_)))), _) | (_, Ok(Some(Frame::KeepAlive(_)))) => {}
            (Some(Ok(Some(a))), Ok(Some(b))) => assert_eq!(a, b, "framed in pieces {a:?}, whole {b:?}"),
            (Some(Err(())), Err(())) | (None, Ok(None)) => {}
            (a, b) => panic!("framed in pieces {a:?}, whole {b:?}"),
        }
        if let Ok(Some(Frame::Message(n))) = wire::frame_stream(input) {
            use_message(wire::parse_stream_message(&input[..n]));
        }
    });
}

// ---- responder frames ----------------------------------------------------------------

#[test]
fn fuzz_responder_frames() {
    let seeds = [
        r#"{"type":"hello","token":"tok"}"#,
        r#"{"type":"ack","dispatch_id":"INC-00011.1","id":"1"}"#,
        r#"{"type":"decline","dispatch_id":"INC-00011.1","reason":"busy","id":2}"#,
        r#"{"type":"status","incident_id":"INC-00011","status":"en_route","note":"on my way","eta_s":600}"#,
        r#"{"type":"status","incident_id":"inc-0001l","status":"resolved"}"#,
        r#"{"type":"availability","status":"off_duty"}"#,
        r#"[{"type":"ack"}]"#,
    ];
    fuzz("responder_frames", seeds.iter().map(|s| s.as_bytes().to_vec()).collect(), |input| {
        let text = String::from_utf8_lossy(input);
        if let Ok((_, dispatchd::responders::wire::Inbound::Status { incident_id, .. })) =
            dispatchd::responders::wire::parse(&text)
        {
            let _ = normalize_id(&incident_id);
        }
    });
}

// ---- PBX feeds -------------------------------------------------------------------------

/// The blocks of a tests/acd transcript (comments dropped), as one byte stream.
fn transcript(name: &str, crlf: bool) -> Vec<u8> {
    let path = format!("{}/tests/acd/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(path).unwrap();
    let eol = if crlf { "\r\n" } else { "\n" };
    text.lines().filter(|l| !l.starts_with(";;")).map(|l| format!("{l}{eol}")).collect::<String>().into_bytes()
}

#[test]
fn fuzz_ami() {
    let mut seeds = vec![
        b"Asterisk Call Manager/5.0.2\r\nResponse: Success\r\nActionID: dispatchd-login-1\r\nMessage: Authentication accepted\r\n\r\n"
            .to_vec(),
    ];
    seeds.push(transcript("ami_queue_call.txt", true));
    seeds.push(transcript("ami_abandon.txt", true));
    // A page call's events (contract §11).
    seeds.push(
        b"Event: OriginateResponse\r\nActionID: dispatchd-page-u1\r\nResponse: Failure\r\nReason: 5\r\n\r\n\
          Event: UserEvent\r\nUserEvent: DispatchdPage\r\nUniqueid: u1\r\nChoice: 1\r\n\r\n\
          Event: Hangup\r\nUniqueid: u1\r\nCause: 17\r\n\r\n"
            .to_vec(),
    );
    fuzz("ami", seeds, |input| {
        let mut r = ami::AmiReader::new();
        let step = 1 + input.last().map_or(512, |b| usize::from(*b) * 37);
        for chunk in input.chunks(step) {
            r.push(chunk);
            while let Some(m) = r.next_message() {
                if let Ok(msg) = m {
                    let _ = ami::login_response(&msg, "dispatchd-login-1");
                    let _ = ami::map_event(&msg).map(|e| e.clean());
                    let _ = (ami::page_report(&msg), ami::page_channel(&msg));
                }
            }
        }
        let _ = r.banner_version();
    });
}

#[test]
fn fuzz_esl() {
    fn envelope(body: &[u8]) -> Vec<u8> {
        let mut v = format!("Content-Length: {}\nContent-Type: text/event-plain\n\n", body.len()).into_bytes();
        v.extend_from_slice(body);
        v
    }
    let mut seeds = vec![
        b"Content-Type: auth/request\n\n".to_vec(),
        b"Content-Type: command/reply\nReply-Text: +OK accepted\n\n".to_vec(),
    ];
    for name in ["esl_callcenter.txt", "esl_abandon.txt"] {
        let stream = transcript(name, false);
        let text = String::from_utf8_lossy(&stream).into_owned();
        let events: Vec<u8> = text
            .split("\n\n")
            .filter(|b| !b.trim().is_empty())
            .flat_map(|b| envelope(format!("{b}\n\n").as_bytes()))
            .collect();
        seeds.push(events);
    }
    // A page call's events (contract §11): the digit, the job's result.
    let mut page = envelope(b"Event-Name: CUSTOM\nEvent-Subclass: dispatchd%3A%3Apage\nUnique-ID: u1\nChoice: 2\n\n");
    page.extend(envelope(b"Event-Name: BACKGROUND_JOB\nJob-UUID: u1\nContent-Length: 15\n\n-ERR USER_BUSY\n"));
    seeds.push(page);
    fuzz("esl", seeds, |input| {
        let mut r = esl::EslReader::new();
        let step = 1 + input.last().map_or(512, |b| usize::from(*b) * 41).min(esl::MAX_PUSH - 1);
        'feed: for chunk in input.chunks(step) {
            if r.push(chunk).is_err() {
                break;
            }
            loop {
                match r.next_message() {
                    Ok(Some(m)) => {
                        let _ = esl::auth_result(&m);
                        if let esl::EslMessage::Event(ev) = &m {
                            let _ = esl::map_event(ev).map(|e| e.clean());
                            let _ = esl::page_report(ev);
                        }
                    }
                    Ok(None) => break,
                    Err(_) => break 'feed,
                }
            }
            assert!(r.buffered() <= esl::MAX_BUFFERED);
        }
    });
}

// ---- incident ids and query strings ------------------------------------------------------

#[test]
fn fuzz_incident_ids() {
    let seeds = ["INC-00011", "inc-0001l", "INC 0O1I L", "0000é", "INC-0001\u{200b}", "INC-ZZZZZZZZZZZZ", ""];
    fuzz("incident_ids", seeds.iter().map(|s| s.as_bytes().to_vec()).collect(), |input| {
        let text = String::from_utf8_lossy(input);
        if let Some(id) = normalize_id(&text) {
            assert!(id.starts_with("INC-") && id.is_ascii(), "{id}");
            assert_eq!(normalize_id(&id).as_deref(), Some(id.as_str()), "a normalised id is its own normal form");
        }
    });
}

#[test]
fn fuzz_http_query() {
    let seeds = [
        "state=queued&severity=critical&limit=10",
        "limit=500",
        "state=&severity=&limit=",
        "since=2026-11-23T00:00:00Z&until=2026-11-24T00:00:00%2B01:00",
        "since=2026-11-23T00:00:00 01:00&until=2026-11-24T00:00:00Z",
        "limit=1&limit=2&state=%FF",
    ];
    fuzz("http_query", seeds.iter().map(|s| s.as_bytes().to_vec()).collect(), |input| {
        let text = String::from_utf8_lossy(input);
        if let Ok(f) = dispatchd::api::list_filter(Some(&text)) {
            assert!((1..=500).contains(&f.limit));
        }
        if let Ok(r) = dispatchd::api::report::report_range(Some(&text)) {
            assert!(r.since_ms < r.until_ms);
        }
    });
}
