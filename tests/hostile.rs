//! Hostile input against the real daemon: fuzzed and oversized datagrams, TCP
//! clients that lie about lengths, never finish or hold connections open, and
//! sources outside the allow list. After each, a well-formed INVITE is still
//! answered (contract §8: bad input gets an error or silence, never a crash,
//! and never corrupts an incident).
//!
//! No timing assertions: waits are generous and only bound how long the test
//! is willing to wait for something that must happen.

mod common;

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/conformance/rfc4475");
/// The largest UDP payload over IPv4.
const MAX_UDP: usize = 65_507;

// ---------------------------------------------------------------------------
// A tiny deterministic PRNG (xorshift64*), so every run sends the same bytes.
// ---------------------------------------------------------------------------

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
    /// 0..n (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }
    fn pct(&mut self, p: usize) -> bool {
        self.below(100) < p
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn corpus() -> Vec<Vec<u8>> {
    let mut names: Vec<_> = std::fs::read_dir(CORPUS)
        .expect("the RFC 4475 corpus")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sip"))
        .collect();
    names.sort();
    names.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// Header lines of a message as (start, end) byte ranges, end including CRLF;
/// the start line excluded, stopping at the blank line.
fn header_lines(buf: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = match buf.windows(2).position(|w| w == b"\r\n") {
        Some(p) => p + 2,
        None => return out,
    };
    while let Some(p) = buf[i..].windows(2).position(|w| w == b"\r\n") {
        if p == 0 {
            break;
        }
        out.push((i, i + p + 2));
        i += p + 2;
    }
    out
}

const NASTY: &[&[u8]] = &[
    b"\0",
    b"\0\0\0\0",
    b"\xff",
    b"\xfe\xff",
    b"\xc3\x28",
    b"\xed\xa0\x80",
    b"\xf0\x28\x8c\x28",
    b"\x80\x80\x80",
    b"\r",
    b"\n",
    b"\r\n",
    b"\r\n\r\n",
    b"\r\n ",
    b"\t",
    b";;,;,,",
    b"<",
    b">",
    b"\"",
    b"\\",
    b"%",
    b"%00",
    b"%ZZ",
    b":",
    b"@",
    b"[::1",
    b"]",
    b"sip:",
    b"Content-Length: 99999999999999999999999\r\n",
    b"Content-Length: -1\r\n",
    b"l: 70000\r\n",
    b"Via: SIP/2.0/UDP\r\n",
    b"Via: \r\n",
    b"CSeq: 4294967296 INVITE\r\n",
    b"Max-Forwards: 0\r\n",
    b"To: <sip:x@y>;tag=abc\r\n",
];

/// Applies one random mutation.
fn mutate(rng: &mut Rng, buf: &mut Vec<u8>) {
    let len = buf.len();
    match rng.below(12) {
        // Random byte flips.
        0 => {
            for _ in 0..rng.range(1, 8) {
                if !buf.is_empty() {
                    let i = rng.below(buf.len());
                    buf[i] ^= 1 << rng.below(8);
                }
            }
        }
        // Random bytes overwritten.
        1 => {
            for _ in 0..rng.range(1, 16) {
                if !buf.is_empty() {
                    let i = rng.below(buf.len());
                    buf[i] = rng.next() as u8;
                }
            }
        }
        // Truncation.
        2 => buf.truncate(rng.below(len.max(1))),
        // Duplicated header line(s).
        3 => {
            let lines = header_lines(buf);
            if !lines.is_empty() {
                let (a, b) = lines[rng.below(lines.len())];
                let line = buf[a..b].to_vec();
                let times = if rng.pct(20) { rng.range(2, 200) } else { 1 };
                for _ in 0..times {
                    buf.splice(b..b, line.iter().copied());
                }
            }
        }
        // Deleted header line.
        4 => {
            let lines = header_lines(buf);
            if !lines.is_empty() {
                let (a, b) = lines[rng.below(lines.len())];
                buf.drain(a..b);
            }
        }
        // A huge header value (the datagram stays sendable).
        5 => {
            let room = MAX_UDP.saturating_sub(buf.len() + 64);
            let n = rng.range(1, room.clamp(1, 60_000));
            let fill = [b'a', b'%', b' ', b',', b';', b'"', b'<'][rng.below(7)];
            let mut line = b"X-Huge: ".to_vec();
            line.extend(std::iter::repeat_n(fill, n));
            line.extend_from_slice(b"\r\n");
            let at = header_lines(buf).first().map(|l| l.0).unwrap_or(0);
            buf.splice(at..at, line);
        }
        // A huge value appended to an existing header.
        6 => {
            let lines = header_lines(buf);
            if !lines.is_empty() {
                let (_, b) = lines[rng.below(lines.len())];
                let room = MAX_UDP.saturating_sub(buf.len() + 8);
                let n = rng.range(1, room.clamp(1, 30_000));
                let pad = rng.bytes(n).into_iter().map(|c| b'!' + c % 90);
                buf.splice(b - 2..b - 2, pad);
            }
        }
        // NULs, non-UTF-8 and structural characters inserted.
        7 | 8 => {
            for _ in 0..rng.range(1, 4) {
                let at = rng.below(buf.len() + 1);
                let what = NASTY[rng.below(NASTY.len())];
                buf.splice(at..at, what.iter().copied());
            }
        }
        // CRLF → LF or CR.
        9 => {
            let crlfs: Vec<usize> = buf.windows(2).enumerate().filter(|(_, w)| *w == b"\r\n").map(|(i, _)| i).collect();
            if !crlfs.is_empty() {
                let i = crlfs[rng.below(crlfs.len())];
                if rng.pct(50) {
                    buf.remove(i);
                } else {
                    buf.remove(i + 1);
                }
            }
        }
        // A deleted byte range.
        10 => {
            if len > 1 {
                let a = rng.below(len);
                let b = (a + rng.range(1, 64)).min(len);
                buf.drain(a..b);
            }
        }
        // The method or start line replaced.
        _ => {
            let end = buf.iter().position(|b| *b == b' ').unwrap_or(0);
            let word: &[u8] = [
                &b"INVITE"[..],
                b"OPTIONS",
                b"ACK",
                b"CANCEL",
                b"BYE",
                b"INFO",
                b"REGISTER",
                b"X",
                b"SIP/2.0",
                b"invite",
                b"",
            ][rng.below(11)];
            buf.splice(0..end, word.iter().copied());
        }
    }
    buf.truncate(MAX_UDP);
}

/// A response datagram from the daemon must be a well-formed SIP response.
fn check_response(r: &[u8]) -> Result<u16, String> {
    let text =
        std::str::from_utf8(r).map_err(|_| format!("response is not UTF-8: {:?}", String::from_utf8_lossy(r)))?;
    if !text.starts_with("SIP/2.0 ") || !text.contains("\r\n\r\n") {
        return Err(format!("not a SIP response: {text:?}"));
    }
    let st = status_of(text);
    if !(100..=699).contains(&st) {
        return Err(format!("bad status: {text:?}"));
    }
    if (st == 603) != header_of(text, "X-Incident-Id").is_some() {
        return Err(format!("X-Incident-Id on a {st} (or missing on a 603): {text:?}"));
    }
    Ok(st)
}

/// The ACK for a non-2xx final answer, built from the answer itself.
fn ack_from(resp: &str) -> Option<String> {
    let cseq = header_of(resp, "CSeq")?.split_whitespace().next()?.to_string();
    Some(format!(
        "ACK sip:incident@127.0.0.1 SIP/2.0\r\nVia: {}\r\nMax-Forwards: 70\r\nFrom: {}\r\nTo: {}\r\nCall-ID: {}\r\nCSeq: {cseq} ACK\r\nContent-Length: 0\r\n\r\n",
        header_of(resp, "Via")?,
        header_of(resp, "From")?,
        header_of(resp, "To")?,
        header_of(resp, "Call-ID")?,
    ))
}

fn readyz(d: &Daemon) -> u16 {
    http_get(d.http_port, "/readyz", None).0
}

/// Waits until the UDP side answers an OPTIONS (the daemon may still be working off
/// a flood), then proves an INVITE is answered with 603 + X-Incident-Id.
fn still_serving(d: &mut Daemon, call_id: &str) -> String {
    assert!(d.alive(), "the daemon died");
    let p = UdpPeer::new(d);
    let opt = format!(
        "OPTIONS sip:incident@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-o-{call_id}\r\n\
         Max-Forwards: 70\r\nFrom: <sip:probe@127.0.0.1>;tag=o\r\nTo: <sip:incident@127.0.0.1>\r\n\
         Call-ID: o-{call_id}\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
        port = p.port()
    );
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        p.send(opt.as_bytes());
        if p.recv_all(Duration::from_secs(1)).iter().any(|r| status_of(r) == 200) {
            break;
        }
        assert!(Instant::now() < end, "OPTIONS no longer answered");
        assert!(d.alive(), "the daemon died");
    }
    assert_eq!(readyz(d), 200, "/readyz");
    assert_still_serving(d, call_id)
}

/// Checks every incident the API lists is whole: an id, a known state and severity.
fn assert_incidents_sane(d: &Daemon) -> usize {
    let list = d.incidents("?limit=500");
    let states = ["queued", "offered", "acknowledged", "en_route", "on_scene", "resolved", "cancelled"];
    let severities = ["critical", "high", "medium", "low"];
    let mut empty_call_id = 0;
    for inc in &list {
        let id = inc["id"].as_str().unwrap_or("");
        assert!(!id.is_empty(), "incident without an id: {inc}");
        assert!(states.contains(&inc["state"].as_str().unwrap_or("?")), "bad state: {inc}");
        assert!(severities.contains(&inc["severity"].as_str().unwrap_or("?")), "bad severity: {inc}");
        assert!(inc["category"].as_str().is_some_and(|c| !c.is_empty()), "no category: {inc}");
        if inc["call_id"].as_str().unwrap_or("").is_empty() {
            empty_call_id += 1;
        }
    }
    // A sample in full, timeline included.
    for inc in list.iter().step_by((list.len() / 20).max(1)) {
        let full = d.incident(inc["id"].as_str().unwrap());
        let tl = full["timeline"].as_array().unwrap_or_else(|| panic!("no timeline: {full}"));
        assert_eq!(tl.first().and_then(|e| e["event"].as_str()), Some("opened"), "{full}");
        assert_eq!(full["id"], inc["id"]);
    }
    if empty_call_id > 0 {
        eprintln!("note: {empty_call_id} incident(s) have an empty call_id (INVITEs without a Call-ID were accepted)");
    }
    list.len()
}

fn dropped_by_reason(d: &Daemon) -> String {
    let m = d.metrics();
    m.lines().filter(|l| l.starts_with("dispatchd_sip_dropped_total{")).collect::<Vec<_>>().join("\n")
}

// ---------------------------------------------------------------------------
// 1. Ten thousand random and mutated datagrams
// ---------------------------------------------------------------------------

#[test]
fn ten_thousand_fuzzed_datagrams() {
    let redis = Redis::start();
    let mut d = Daemon::start(&redis, Options::default());
    let seeds = corpus();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let p = UdpPeer::new(&d);
    p.sock.set_nonblocking(true).unwrap();
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let mut bad: Vec<String> = Vec::new();
    let mut buf = vec![0u8; 70_000];
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();

    let mut drain = |statuses: &mut BTreeMap<u16, usize>, bad: &mut Vec<String>| {
        while let Ok((n, _)) = p.sock.recv_from(&mut buf) {
            match check_response(&buf[..n]) {
                Ok(st) => {
                    *statuses.entry(st).or_default() += 1;
                    if st >= 300 && st != 400 {
                        // Stop Timer G retransmissions of final answers.
                        if let Some(ack) = ack_from(&String::from_utf8_lossy(&buf[..n])) {
                            let _ = p.sock.send_to(ack.as_bytes(), p.to);
                        }
                    }
                }
                Err(e) if bad.len() < 20 => bad.push(e),
                Err(_) => {}
            }
        }
    };

    for i in 0..10_000usize {
        let kind = rng.below(100);
        let msg: Vec<u8> = if kind < 20 {
            *kinds.entry("random").or_default() += 1;
            let n = rng.range(1, 2000);
            rng.bytes(n)
        } else if kind < 28 {
            // Random bytes behind a plausible start line reach the header parser.
            *kinds.entry("random with a start line").or_default() += 1;
            let start: &[u8] = [
                &b"INVITE sip:incident@127.0.0.1 SIP/2.0\r\n"[..],
                b"SIP/2.0 200 OK\r\n",
                b"OPTIONS * SIP/2.0\r\nVia: ",
            ][rng.below(3)];
            let mut m = start.to_vec();
            let n = rng.range(0, 2000);
            m.extend(rng.bytes(n));
            m
        } else if kind < 65 {
            // A well-formed INVITE of its own (unique Call-ID and branch), mutated.
            *kinds.entry("mutated INVITE").or_default() += 1;
            let mut m = invite(p.port(), &format!("fuzz-{i}"), "X-IVR-Path: 2,1\r\n").into_bytes();
            for _ in 0..rng.range(1, 3) {
                mutate(&mut rng, &mut m);
            }
            m
        } else {
            *kinds.entry("mutated RFC 4475").or_default() += 1;
            let mut m = seeds[rng.below(seeds.len())].clone();
            for _ in 0..rng.range(1, 4) {
                mutate(&mut rng, &mut m);
            }
            m
        };
        if msg.is_empty() {
            continue;
        }
        let _ = p.sock.send_to(&msg, p.to);
        if i % 50 == 49 {
            std::thread::sleep(Duration::from_millis(5));
            drain(&mut statuses, &mut bad);
            assert!(i % 1000 != 999 || d.alive(), "the daemon died after {} datagrams", i + 1);
        }
    }
    // Let the answers to the last ones arrive.
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(50));
        drain(&mut statuses, &mut bad);
    }
    eprintln!("sent: {kinds:?}\nanswers by status: {statuses:?}\ndropped:\n{}", dropped_by_reason(&d));

    assert!(d.alive(), "the daemon died");
    assert!(bad.is_empty(), "malformed answers from the daemon:\n{}", bad.join("\n"));
    assert!(statuses.get(&400).copied().unwrap_or(0) > 0, "not one 400 for 10,000 bad datagrams: {statuses:?}");
    wait_until("/readyz 200", Duration::from_secs(30), || readyz(&d) == 200);
    still_serving(&mut d, "after-fuzz");
    let n = assert_incidents_sane(&d);
    eprintln!("{n} incident(s) listed, all sane");
}

// ---------------------------------------------------------------------------
// 2. Datagrams as large as UDP allows
// ---------------------------------------------------------------------------

/// Sends one datagram and returns every answer within a few seconds (ACKing finals).
fn send_and_collect(p: &UdpPeer, msg: &[u8]) -> Vec<String> {
    p.sock.send_to(msg, p.to).expect("a datagram this size can be sent on loopback");
    let mut out = Vec::new();
    let end = Instant::now() + Duration::from_secs(3);
    let mut buf = vec![0u8; 70_000];
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        p.sock.set_read_timeout(Some(left.max(Duration::from_millis(1)))).unwrap();
        let Ok((n, _)) = p.sock.recv_from(&mut buf) else { break };
        let r = String::from_utf8_lossy(&buf[..n]).into_owned();
        if status_of(&r) >= 300
            && status_of(&r) != 400
            && !out.contains(&r)
            && let Some(ack) = ack_from(&r)
        {
            p.send(ack.as_bytes());
        }
        out.push(r);
    }
    out
}

#[test]
fn oversized_datagrams() {
    let redis = Redis::start();
    let mut d = Daemon::start(&redis, Options::default());
    let p = UdpPeer::new(&d);

    // A valid INVITE padded with one huge header, to 65,000 bytes and to the UDP maximum.
    for (k, size) in [65_000usize, MAX_UDP].into_iter().enumerate() {
        let call_id = format!("huge-invite-{k}");
        let base = invite(p.port(), &call_id, "X-Pad: \r\n");
        let pad = size - base.len();
        let msg = base.replace("X-Pad: \r\n", &format!("X-Pad: {}\r\n", "p".repeat(pad)));
        assert_eq!(msg.len(), size);
        let answers = send_and_collect(&p, msg.as_bytes());
        let finals: Vec<u16> = answers.iter().map(|r| status_of(r)).filter(|s| *s != 100).collect();
        eprintln!("{size}-byte INVITE: answers {:?}", answers.iter().map(|r| status_of(r)).collect::<Vec<_>>());
        // Under the 64 KiB message limit, so it may be processed as the valid INVITE it is;
        // otherwise refused (400/513) or dropped. Never anything else.
        for r in &answers {
            match status_of(r) {
                100 | 400 | 513 => assert!(header_of(r, "X-Incident-Id").is_none(), "{r}"),
                603 => {
                    let id = header_of(r, "X-Incident-Id").expect("603 without X-Incident-Id");
                    assert_eq!(d.incident(id)["call_id"], call_id.as_str());
                }
                s => panic!("{size}-byte INVITE answered {s}: {r}"),
            }
        }
        assert!(finals.iter().all(|s| *s == finals[0]), "conflicting answers {finals:?}");
        assert!(d.alive());
        still_serving(&mut d, &format!("after-huge-invite-{k}"));
    }

    // Pure junk, and junk behind a request line, at 65,000 bytes: dropped or 400.
    let mut rng = Rng(42);
    let junk = rng.bytes(65_000);
    let mut junk_req =
        b"INVITE sip:incident@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKj\r\n".to_vec();
    junk_req.extend(rng.bytes(65_000 - junk_req.len()));
    // A 65,000-byte header section of 8,000 tiny headers.
    let mut many = invite(p.port(), "many-headers", "").into_bytes();
    let at = header_lines(&many)[0].0;
    let room = 65_000 - many.len();
    let mut filler: Vec<u8> = b"X-h: v\r\n".repeat((room - 16) / 8);
    filler.extend_from_slice(format!("X-p: {}\r\n", "p".repeat(room - filler.len() - 7)).as_bytes());
    many.splice(at..at, filler);
    assert_eq!(many.len(), 65_000);
    // Content-Length promising 65,000 bytes the datagram does not have.
    let short_body = invite(p.port(), "short-body", "").replace("Content-Length: 0", "Content-Length: 65000");
    for (name, msg) in
        [("junk", junk), ("junk request", junk_req), ("8,000 headers", many), ("short body", short_body.into_bytes())]
    {
        let answers = send_and_collect(&p, &msg);
        let st: Vec<u16> = answers.iter().map(|r| status_of(r)).collect();
        eprintln!("{} bytes of {name}: answers {st:?}", msg.len());
        match name {
            "junk" => assert!(answers.is_empty(), "junk answered: {answers:?}"),
            "8,000 headers" => assert!(st.iter().all(|s| [100, 400, 513, 603].contains(s)), "{name}: {st:?}"),
            _ => assert!(st.iter().all(|s| [400, 513].contains(s)), "{name}: {st:?}"),
        }
        assert!(d.alive(), "the daemon died after {name}");
        still_serving(&mut d, &format!("after-{}", name.replace([' ', ','], "-")));
    }
}

// ---------------------------------------------------------------------------
// 3. TCP clients that misbehave
// ---------------------------------------------------------------------------

/// Reads until the daemon closes the connection; returns what it sent, or panics
/// when the connection is still open after `within`.
fn read_until_closed(c: &mut TcpStream, within: Duration, what: &str) -> Vec<u8> {
    let end = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "{what}: the daemon kept the connection open for {within:?}");
        c.set_read_timeout(Some(left)).unwrap();
        match c.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            // Reset: closed with our bytes unread.
            Err(_) => return got,
        }
    }
}

/// What a daemon may say before closing on a broken stream: nothing, or errors.
fn assert_only_errors(bytes: &[u8], what: &str) {
    let text = String::from_utf8_lossy(bytes);
    for part in text.split("SIP/2.0 ").skip(1) {
        let st: u16 = part.split(' ').next().and_then(|s| s.parse().ok()).unwrap_or(0);
        assert!((400..=599).contains(&st), "{what}: answered {st}: {text}");
    }
    assert!(!text.contains("X-Incident-Id"), "{what}: {text}");
}

fn tcp_invite_text(call_id: &str) -> String {
    invite(9, call_id, "").replace("SIP/2.0/UDP 127.0.0.1:9", "SIP/2.0/TCP 127.0.0.1:9")
}

/// Sends a good INVITE on a new TCP connection and returns the responses up to the final.
fn tcp_invite(d: &Daemon, call_id: &str) -> Result<Vec<String>, String> {
    let mut c = TcpStream::connect(d.sip_addr()).map_err(|e| e.to_string())?;
    c.write_all(tcp_invite_text(call_id).as_bytes()).map_err(|e| e.to_string())?;
    let mut got = String::new();
    let end = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 8192];
    loop {
        let responses: Vec<&str> = got.split("SIP/2.0 ").skip(1).collect();
        if responses.iter().any(|r| !r.starts_with("100 ") && r.contains("\r\n\r\n")) {
            return Ok(got.split_inclusive("\r\n\r\n").map(str::to_string).collect());
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no final answer within 10 s: {got:?}"));
        }
        c.set_read_timeout(Some(left)).unwrap();
        match c.read(&mut buf) {
            Ok(0) => return Err(format!("closed by the daemon after {got:?}")),
            Ok(n) => got.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => return Err(format!("{e} after {got:?}")),
        }
    }
}

#[test]
fn tcp_lying_slow_and_endless_clients() {
    let redis = Redis::start();
    let mut d = Daemon::start(&redis, Options::default());

    // a) Content-Length: 100000000, a few body bytes, then nothing.
    let mut c = TcpStream::connect(d.sip_addr()).unwrap();
    let head = tcp_invite_text("cl-huge").replace("Content-Length: 0", "Content-Length: 100000000");
    c.write_all(head.as_bytes()).unwrap();
    let _ = c.write_all(b"v=0\r\n");
    // Meanwhile the line is open for everyone else.
    still_serving(&mut d, "during-cl-huge");
    let said = read_until_closed(&mut c, Duration::from_secs(30), "Content-Length 100000000");
    assert_only_errors(&said, "Content-Length 100000000");
    still_serving(&mut d, "after-cl-huge");

    // b) 70 KB of header bytes without the blank line.
    let mut c = TcpStream::connect(d.sip_addr()).unwrap();
    let mut sent = 0;
    let _ = c.write_all(b"INVITE sip:incident@127.0.0.1 SIP/2.0\r\n");
    while sent < 70_000 {
        let line = format!("X-Endless-{sent}: {}\r\n", "e".repeat(200));
        if c.write_all(line.as_bytes()).is_err() {
            break; // already closed on us
        }
        sent += line.len();
    }
    let said = read_until_closed(&mut c, Duration::from_secs(30), "70 KB without CRLFCRLF");
    assert_only_errors(&said, "70 KB without CRLFCRLF");
    still_serving(&mut d, "after-endless-headers");

    // c) Half a message, then silence: closed by the idle timeout (5 s here).
    let mut c = TcpStream::connect(d.sip_addr()).unwrap();
    let msg = tcp_invite_text("half");
    c.write_all(&msg.as_bytes()[..msg.len() / 2]).unwrap();
    let said = read_until_closed(&mut c, Duration::from_secs(60), "half a message");
    assert_only_errors(&said, "half a message");
    assert!(
        metric_value(&d.metrics(), "dispatchd_sip_dropped_total", "reason=\"tcp_idle\"") >= 1.0,
        "{}",
        dropped_by_reason(&d)
    );
    still_serving(&mut d, "after-half-message");

    // The stalled clients opened no incident.
    let list = d.incidents("?limit=500");
    for cid in ["cl-huge", "half"] {
        assert!(!list.iter().any(|i| i["call_id"] == cid), "incident for {cid}: {list:?}");
    }
    // And a TCP INVITE on a new connection is answered.
    let r = tcp_invite(&d, "tcp-after-abuse").expect("TCP INVITE");
    let last = r.last().unwrap();
    assert_eq!(status_of(last), 603, "{r:?}");
    assert!(header_of(last, "X-Incident-Id").is_some(), "{last}");
    eprintln!("dropped:\n{}", dropped_by_reason(&d));
}

#[test]
fn tcp_connection_limit() {
    let redis = Redis::start();
    // A long idle timeout, so the 32 held connections are not closed while we look.
    let mut d = Daemon::start(&redis, Options { tcp_idle_timeout: "120s", ..Default::default() });
    let limit = 32;
    let conns: Vec<TcpStream> = (0..40).map(|_| TcpStream::connect(d.sip_addr()).expect("connect")).collect();
    wait_until("8 connections refused", Duration::from_secs(30), || {
        metric_value(&d.metrics(), "dispatchd_sip_dropped_total", "reason=\"tcp_connection_limit\"") >= 8.0
    });
    for c in &conns {
        c.set_nonblocking(true).unwrap();
    }
    let closed = |conns: &[TcpStream]| -> Vec<usize> {
        let mut b = [0u8; 64];
        conns
            .iter()
            .enumerate()
            .filter(|(_, c)| match (&**c).read(&mut b) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => e.kind() != ErrorKind::WouldBlock,
            })
            .map(|(i, _)| i)
            .collect()
    };
    wait_until("8 connections closed", Duration::from_secs(30), || closed(&conns).len() >= 8);
    let shut = closed(&conns);
    eprintln!("closed by the daemon: {shut:?}");
    assert_eq!(shut.len(), 40 - limit, "exactly the connections over the limit are closed: {shut:?}");

    // A held connection still works.
    let held = (0..40).find(|i| !shut.contains(i)).unwrap();
    let mut h = &conns[held];
    h.set_nonblocking(false).unwrap();
    let opt = "OPTIONS sip:incident@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:9;branch=z9hG4bK-held\r\n\
               Max-Forwards: 70\r\nFrom: <sip:p@127.0.0.1>;tag=h\r\nTo: <sip:incident@127.0.0.1>\r\n\
               Call-ID: held-options\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n";
    h.write_all(opt.as_bytes()).unwrap();
    h.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut b = [0u8; 4096];
    let n = h.read(&mut b).expect("answer on a held connection");
    assert!(String::from_utf8_lossy(&b[..n]).starts_with("SIP/2.0 200 "), "{}", String::from_utf8_lossy(&b[..n]));

    // UDP is unaffected while TCP is full.
    still_serving(&mut d, "during-tcp-full");

    // Once they are gone, a new TCP connection is served.
    drop(conns);
    let end = Instant::now() + Duration::from_secs(30);
    let answer = loop {
        let err = match tcp_invite(&d, "tcp-after-limit") {
            Ok(r) => break r,
            Err(e) => e,
        };
        assert!(Instant::now() < end, "no TCP INVITE served after the connections closed: {err}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let last = answer.last().unwrap();
    assert_eq!(status_of(last), 603, "{answer:?}");
    assert!(header_of(last, "X-Incident-Id").is_some(), "{last}");
    still_serving(&mut d, "after-tcp-limit");
}

// ---------------------------------------------------------------------------
// 4. Sources outside the allow list get nothing at all
// ---------------------------------------------------------------------------

#[test]
fn outside_the_allow_list_gets_nothing() {
    let redis = Redis::start();
    let mut d = Daemon::start(&redis, Options { allow: vec!["10.0.0.0/8".into()], ..Default::default() });

    let p = UdpPeer::new(&d);
    p.send(invite(p.port(), "not-allowed-1", "").as_bytes());
    let answers = p.recv_all(Duration::from_secs(2));
    assert!(answers.is_empty(), "INVITE from outside the allow list answered: {answers:?}");

    let opt = format!(
        "OPTIONS sip:incident@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{};branch=z9hG4bK-na\r\n\
         Max-Forwards: 70\r\nFrom: <sip:p@127.0.0.1>;tag=n\r\nTo: <sip:incident@127.0.0.1>\r\n\
         Call-ID: not-allowed-options\r\nCSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n",
        p.port()
    );
    p.send(opt.as_bytes());
    let answers = p.recv_all(Duration::from_secs(2));
    assert!(answers.is_empty(), "OPTIONS from outside the allow list answered: {answers:?}");

    // A malformed request would get a 400 from an allowed source; here, nothing.
    p.send(b"INVITE sip:x SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:9;branch=z9hG4bKx\r\nCSeq: 1 OPTIONS\r\n\r\n");
    let answers = p.recv_all(Duration::from_secs(2));
    assert!(answers.is_empty(), "malformed request from outside the allow list answered: {answers:?}");

    // TCP: accepted, then closed without a byte, even after we sent an INVITE.
    let mut c = TcpStream::connect(d.sip_addr()).expect("connect");
    let _ = c.write_all(tcp_invite_text("not-allowed-tcp").as_bytes());
    let said = read_until_closed(&mut c, Duration::from_secs(30), "TCP from outside the allow list");
    assert!(said.is_empty(), "bytes sent to a source outside the allow list: {:?}", String::from_utf8_lossy(&said));

    let m = d.metrics();
    assert!(metric_value(&m, "dispatchd_sip_dropped_total", "reason=\"not_allowed\"") > 0.0, "{m}");
    assert!(d.incidents("").is_empty(), "incidents opened for a source outside the allow list: {:?}", d.incidents(""));
    assert!(d.alive(), "the daemon died");
    assert_eq!(readyz(&d), 200);
}
