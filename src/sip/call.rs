//! SIP → call facts: who called, what they chose in the IVR, which queue,
//! how long they waited (contract §3, "Where the incident's fields come from").
//!
//! Everything here is caller-controlled input, so every value is bounded and
//! cleaned before it goes anywhere else.

use rsipstack::sip::typed::From as NameAddr;

use super::wire::Message;
use crate::domain::call::{CallFacts, MAX_CALL_ID, MAX_NAME, MAX_SHORT, call_key, clean};
use crate::domain::ivr::{IvrPath, is_dtmf_key};

/// User and display name of a name-addr header (`P-Asserted-Identity`, `From`).
fn identity(value: &str) -> Option<(String, String)> {
    // P-Asserted-Identity may list several identities; the first is the one we want.
    let first = value.split(',').next().unwrap_or(value);
    let na = NameAddr::parse(first.trim()).ok()?;
    let user = na.uri.auth.as_ref().map(|a| a.user.clone()).unwrap_or_default();
    let name = na.display_name.unwrap_or_default();
    let name = name.trim().trim_matches('"').to_string();
    Some((clean(&user, MAX_SHORT), clean(&name, MAX_NAME)))
}

/// The user part of a SIP Request-URI, if any.
fn ruri_user(uri: &str) -> Option<String> {
    let rest = uri.strip_prefix("sip:").or_else(|| uri.strip_prefix("sips:"))?;
    let at = rest.find('@')?;
    let user = &rest[..at];
    let user = user.split(';').next().unwrap_or(user);
    (!user.is_empty()).then(|| clean(user, MAX_SHORT).to_ascii_lowercase())
}

/// The host[:port] part of a SIP Request-URI, if it is a plain one.
fn ruri_host(uri: &str) -> Option<String> {
    let rest = uri.strip_prefix("sip:").or_else(|| uri.strip_prefix("sips:"))?;
    let rest = rest.rsplit_once('@').map(|(_, h)| h).unwrap_or(rest);
    let host = rest.split([';', '?']).next()?;
    let ok = !host.is_empty()
        && host.len() <= 255
        && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'));
    ok.then(|| host.to_string())
}

/// The facts of an INVITE (or of a MESSAGE, which carries the same headers).
pub fn facts_of_invite(msg: &Message) -> CallFacts {
    {
        let call_id = msg.call_id().to_string();
        let (caller, caller_name) = msg
            .header("p-asserted-identity")
            .and_then(identity)
            .filter(|(u, _)| !u.is_empty())
            .or_else(|| msg.header("from").and_then(identity))
            .unwrap_or_default();
        let call_ref = msg.header("x-call-ref").map(str::trim).filter(|s| !s.is_empty());
        let uri = match &msg.start {
            super::wire::StartLine::Request { uri, .. } => uri.as_str(),
            _ => "",
        };
        CallFacts {
            call_key: call_key(call_ref.unwrap_or(&call_id)),
            call_id: clean(&call_id, MAX_CALL_ID),
            caller,
            caller_name,
            ivr_path: msg.header("x-ivr-path").map(IvrPath::lenient).unwrap_or_default(),
            queue: msg.header("x-queue").map(|q| clean(q, MAX_SHORT)).unwrap_or_default(),
            wait_seconds: msg.header("x-wait-seconds").and_then(|w| w.trim().parse().ok()),
            ruri_user: ruri_user(uri),
            ruri_host: ruri_host(uri),
        }
    }
}

/// Why a DTMF INFO body could not be used.
#[derive(Debug, PartialEq, Eq)]
pub enum DtmfError {
    /// Not a DTMF content type: 415.
    UnsupportedType,
    /// A DTMF type, but no valid key in it: 400.
    BadBody,
}

/// The key pressed, from an INFO body: `application/dtmf-relay` (`Signal=5`)
/// or `application/dtmf` (`5`). `Ok(None)` for an empty INFO (a keep-alive).
pub fn dtmf_digit(content_type: Option<&str>, body: &[u8]) -> Result<Option<char>, DtmfError> {
    let text = std::str::from_utf8(body).map_err(|_| DtmfError::BadBody)?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    let ctype = content_type.map(|c| c.split(';').next().unwrap_or(c).trim().to_ascii_lowercase()).unwrap_or_default();
    let value = match ctype.as_str() {
        "application/dtmf-relay" => text
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once('=')?;
                k.trim().eq_ignore_ascii_case("signal").then(|| v.trim())
            })
            .ok_or(DtmfError::BadBody)?,
        "application/dtmf" => text.trim(),
        _ => return Err(DtmfError::UnsupportedType),
    };
    // RFC 2833 events 10 and 11 are * and #.
    let key = match value {
        "10" => '*',
        "11" => '#',
        v if v.len() == 1 && is_dtmf_key(v.as_bytes()[0].to_ascii_uppercase()) => {
            v.as_bytes()[0].to_ascii_uppercase() as char
        }
        _ => return Err(DtmfError::BadBody),
    };
    Ok(Some(key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::wire::{Verdict, parse_datagram};

    fn invite(extra: &str) -> Message {
        let raw = format!(
            "INVITE sip:incident-outage@192.0.2.1 SIP/2.0\r\n\
             Via: SIP/2.0/UDP 192.0.2.9;branch=z9hG4bK1\r\n\
             From: \"Alice Smith\" <sip:+442071234890@pbx>;tag=a\r\n\
             To: <sip:incident-outage@192.0.2.1>\r\n\
             Call-ID: abc@pbx\r\nCSeq: 1 INVITE\r\nMax-Forwards: 70\r\n{extra}Content-Length: 0\r\n\r\n"
        );
        match parse_datagram(raw.as_bytes()) {
            Verdict::Ok(m) => m,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn facts_from_from_header() {
        let f = facts_of_invite(&invite("X-IVR-Path: 2, 1,x\r\nX-Queue: support\r\nX-Wait-Seconds: 45\r\n"));
        assert_eq!(f.caller, "+442071234890");
        assert_eq!(f.caller_name, "Alice Smith");
        assert_eq!(f.ivr_path.selections(), ["2", "1"]);
        assert_eq!(f.queue, "support");
        assert_eq!(f.wait_seconds, Some(45));
        assert_eq!(f.call_key, "abc@pbx");
        assert_eq!(f.ruri_user.as_deref(), Some("incident-outage"));
        assert_eq!(f.ruri_host.as_deref(), Some("192.0.2.1"));
        assert_eq!(ruri_host("sip:a@h.example:5070;transport=tcp").as_deref(), Some("h.example:5070"));
        assert_eq!(ruri_host("sip:a@<evil>"), None);
    }

    #[test]
    fn pai_and_call_ref_win() {
        let f = facts_of_invite(&invite(
            "P-Asserted-Identity: \"Bob\" <sip:alice.smith@pbx>\r\nX-Call-Ref: 1700000000.42\r\n",
        ));
        assert_eq!(f.caller, "alice.smith");
        assert_eq!(f.caller_name, "Bob");
        assert_eq!(f.call_key, "1700000000.42");
        assert_eq!(f.call_id, "abc@pbx");
    }

    #[test]
    fn hostile_values_are_bounded() {
        let long = "9".repeat(5000);
        let f = facts_of_invite(&invite(&format!(
            "X-Call-Ref: {long}\r\nX-Queue: {long}\r\nX-Wait-Seconds: -3\r\nX-IVR-Path: {}\r\n",
            "1,".repeat(500)
        )));
        assert!(f.call_key.starts_with("h:") && f.call_key.len() == 66);
        assert_eq!(f.queue.len(), 64);
        assert_eq!(f.wait_seconds, None);
        assert_eq!(f.ivr_path.len(), crate::domain::ivr::MAX_IVR_SELECTIONS);
    }

    #[test]
    fn dtmf_bodies() {
        let relay = Some("application/dtmf-relay");
        assert_eq!(dtmf_digit(relay, b"Signal=5\r\nDuration=160\r\n"), Ok(Some('5')));
        assert_eq!(dtmf_digit(relay, b"Signal= 11\r\n"), Ok(Some('#')));
        assert_eq!(dtmf_digit(Some("application/dtmf"), b"*"), Ok(Some('*')));
        assert_eq!(dtmf_digit(relay, b""), Ok(None));
        assert_eq!(dtmf_digit(relay, b"Signal=55"), Err(DtmfError::BadBody));
        assert_eq!(dtmf_digit(relay, b"Duration=1"), Err(DtmfError::BadBody));
        assert_eq!(dtmf_digit(Some("text/plain"), b"5"), Err(DtmfError::UnsupportedType));
        assert_eq!(dtmf_digit(relay, &[0xff, 0xfe]), Err(DtmfError::BadBody));
    }
}
