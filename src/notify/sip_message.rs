//! The SIP MESSAGE channel (contract §11, RFC 3428): dispatchd as a UAC sends
//! the offer as a short text to the responder's `sip_uri` (its PBX or proxy
//! relays it to the phone). Over UDP it retransmits (Timer E: T1, doubling up
//! to T2) until a final response or `fallback.message_timeout` (Timer F is
//! 32 s, longer than an offer can wait); over TCP or TLS it sends once. A 2xx
//! is delivered (not an acknowledgement); a 3xx–6xx or the timeout is a
//! failure, and the next channel is tried at once.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;

use super::client;
use crate::domain::contact::{SipTarget, Transport, sip_target};
use crate::domain::dispatch::{Attempt, Outcome};
use crate::sip::wire::{Frame, Framer, StartLine, Verdict, parse_datagram};

const T1: Duration = Duration::from_millis(500);
const T2: Duration = Duration::from_secs(4);

pub struct SipMessage {
    timeout: Duration,
}

/// The MESSAGE request text, from `local` (our address as the peer sees it)
/// to `uri`, and its Call-ID. CR and LF are never taken from the data.
pub fn request(uri: &str, local: &str, transport: &str, a: &Attempt, text: &str) -> (String, String) {
    let one_line = |s: &str| s.chars().filter(|c| !c.is_control()).collect::<String>();
    let body = one_line(text);
    let (uri, incident, dispatch) = (one_line(uri), one_line(&a.offer.incident_id), one_line(&a.offer.dispatch_id));
    let call_id = format!("{:016x}@dispatchd", rand::random::<u64>());
    let msg = format!(
        "MESSAGE {uri} SIP/2.0\r\n\
         Via: SIP/2.0/{transport} {local};branch=z9hG4bK-dd-{branch:016x}\r\n\
         Max-Forwards: 70\r\n\
         From: \"dispatchd\" <sip:dispatchd@{local}>;tag={tag:08x}\r\n\
         To: <{uri}>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 MESSAGE\r\n\
         X-Incident-Id: {incident}\r\n\
         X-Dispatch-Id: {dispatch}\r\n\
         Content-Type: text/plain;charset=UTF-8\r\n\
         Content-Length: {len}\r\n\r\n{body}",
        branch = rand::random::<u64>(),
        tag = rand::random::<u32>(),
        len = body.len(),
    );
    (msg, call_id)
}

/// The status of a well-formed response to our request (`call_id`, CSeq
/// `1 MESSAGE`); `None` for anything else a peer sends.
fn status_of(resp: &[u8], call_id: &str) -> Option<u16> {
    let Verdict::Ok(m) = parse_datagram(resp) else { return None };
    match m.start {
        StartLine::Response { code } if m.call_id() == call_id && m.cseq() == (1, "MESSAGE") => Some(code),
        _ => None,
    }
}

fn outcome_of(status: u16) -> Outcome {
    if (200..300).contains(&status) { Outcome::Delivered } else { Outcome::Failed(status.to_string()) }
}

impl SipMessage {
    pub fn new(timeout: Duration) -> SipMessage {
        SipMessage { timeout }
    }

    pub async fn send(&self, uri: &str, a: &Attempt, text: &str) -> Outcome {
        let Some(target) = sip_target(uri) else { return Outcome::Failed("bad_uri".into()) };
        let sent = match target.transport {
            Transport::Udp => tokio::time::timeout(self.timeout, udp(&target, uri, a, text)).await,
            Transport::Tcp | Transport::Tls => tokio::time::timeout(self.timeout, stream(&target, uri, a, text)).await,
        };
        match sent {
            Ok(Ok(status)) => outcome_of(status),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "SIP MESSAGE not sent");
                Outcome::Failed("unreachable".into())
            }
            Err(_) => Outcome::Failed("timeout".into()),
        }
    }
}

/// Over UDP: retransmitted (Timer E) until a final response.
async fn udp(target: &SipTarget, uri: &str, a: &Attempt, text: &str) -> std::io::Result<u16> {
    let sock = UdpSocket::bind(if target.host.contains(':') { "[::]:0" } else { "0.0.0.0:0" }).await?;
    sock.connect(target.address()).await?;
    let local = sock.local_addr()?;
    let (msg, call_id) = request(uri, &local.to_string(), "UDP", a, text);
    let mut wait = T1;
    let mut buf = vec![0u8; 65_536];
    loop {
        sock.send(msg.as_bytes()).await?;
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(r) = tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            let n = r?;
            match status_of(&buf[..n], &call_id) {
                Some(s) if s >= 200 => return Ok(s),
                // A provisional answer: the request arrived; keep waiting (Timer E goes to T2).
                Some(_) => wait = T2,
                None => {}
            }
        }
        wait = (wait * 2).min(T2);
    }
}

/// Over TCP or TLS: sent once, the final response read from the stream.
async fn stream(target: &SipTarget, uri: &str, a: &Attempt, text: &str) -> std::io::Result<u16> {
    let tls = target.transport == Transport::Tls;
    let mut s = client::connect(&target.host, target.port, tls).await?;
    let (msg, call_id) = request(uri, "dispatchd.invalid", if tls { "TLS" } else { "TCP" }, a, text);
    s.write_all(msg.as_bytes()).await?;
    let mut buf = Vec::new();
    let mut framer = Framer::default();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "closed before a final answer"));
        }
        buf.extend_from_slice(&chunk[..n]);
        loop {
            match framer.next(&buf) {
                Ok(Some(Frame::Message(len))) => {
                    let status = status_of(&buf[..len], &call_id);
                    buf.drain(..len);
                    if let Some(s) = status.filter(|s| *s >= 200) {
                        return Ok(s);
                    }
                }
                Ok(Some(Frame::KeepAlive(k))) => {
                    buf.drain(..k);
                }
                Ok(None) => break,
                Err(_) => return Err(std::io::Error::other("unframeable answer")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::dispatch::{Channel, Offer, Purpose};
    use crate::domain::incident::Severity;

    fn attempt() -> Attempt {
        Attempt {
            offer: Offer {
                incident_id: "INC-00011".into(),
                dispatch_id: "INC-00011.1\r\nX-Evil: 1".into(),
                responder: "r-a".into(),
                attempt: 1,
                severity: Severity::High,
                category: "outage".into(),
                summary: String::new(),
                instructions: String::new(),
                caller: String::new(),
                queue: String::new(),
                opened_ms: 0,
                ack_by_ms: 0,
                major: false,
            },
            channel: Channel::SipMessage,
            purpose: Purpose::Offer,
        }
    }

    #[test]
    fn the_request_is_one_message_and_injects_nothing() {
        let (m, call_id) =
            request("sip:1001@10.0.0.30", "10.0.0.20:40000", "UDP", &attempt(), "line one\r\nX-Injected: yes");
        assert!(!m.contains("\r\nX-Injected") && !m.contains("\r\nX-Evil"), "{m}");
        match parse_datagram(m.as_bytes()) {
            Verdict::Ok(msg) => {
                assert_eq!(msg.method(), Some("MESSAGE"));
                assert_eq!(msg.call_id(), call_id);
                assert_eq!(msg.body.len(), "line oneX-Injected: yes".len());
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn only_a_well_formed_answer_to_our_request_counts() {
        let answer = |status: &str, call_id: &str, cseq: &str| {
            format!(
                "SIP/2.0 {status}\r\nVia: SIP/2.0/UDP 10.0.0.20:40000;branch=z9hG4bK-dd-1\r\nFrom: <sip:d@x>;tag=1\r\n\
                 To: <sip:1001@x>;tag=2\r\nCall-ID: {call_id}\r\nCSeq: {cseq}\r\nContent-Length: 0\r\n\r\n"
            )
        };
        let ours = "00ab@dispatchd";
        assert_eq!(status_of(answer("202 Accepted", ours, "1 MESSAGE").as_bytes(), ours), Some(202));
        assert_eq!(status_of(answer("404 Not Found", ours, "1 MESSAGE").as_bytes(), ours), Some(404));
        assert_eq!(status_of(answer("200 OK", "other@x", "1 MESSAGE").as_bytes(), ours), None);
        assert_eq!(status_of(answer("200 OK", ours, "1 INVITE").as_bytes(), ours), None);
        assert_eq!(status_of(answer("2000 OK", ours, "1 MESSAGE").as_bytes(), ours), None);
        assert_eq!(status_of(b"SIP/2.0 200 OK\r\n", ours), None);
        assert_eq!(status_of("SIP/2.0 200 ÖK \u{0}\r\n\r\n".as_bytes(), ours), None);
        assert_eq!(status_of(b"garbage", ours), None);
        assert_eq!(status_of(&[0xff; 70_000], ours), None);
        // A request is not an answer.
        let req = request("sip:1001@10.0.0.30", "10.0.0.20:40000", "UDP", &attempt(), "x");
        assert_eq!(status_of(req.0.as_bytes(), &req.1), None);
    }
}
