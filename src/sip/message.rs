//! Out-of-dialog SIP MESSAGE from the dialplan → a [`CallEvent`] (issue 5).
//!
//! The PBX reports a call's life with `MESSAGE` requests carrying
//! `X-Event: incident | ivr | queue-join | queue-abandon | agent-connect | hangup`
//! and the call's facts in the same headers an INVITE uses (`X-Call-Ref`,
//! `X-Queue`, `X-IVR-Path`, `X-Wait-Seconds`, the caller in
//! `P-Asserted-Identity`/`From`), plus `X-Agent` for `agent-connect`. The body
//! is ignored.
//!
//! Pure: no I/O. Every value is caller- or PBX-controlled, so what is required
//! is checked here (a 400 naming the header) and the rest is bounded by
//! [`CallEvent::clean`] in intake.

use super::wire::Message;
use crate::domain::call::{CallEvent, EventKind};
use crate::domain::incident::Source;
use crate::domain::ivr::IvrPath;

/// Why a MESSAGE cannot be applied; answered `400 <reason>` with a `Warning`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// A header the event needs is absent or empty.
    Missing(&'static str),
    /// `X-Event` names no event we know.
    Unknown(&'static str),
    /// A header is present but its value is unusable.
    Bad(&'static str),
}

impl Invalid {
    /// The header at fault.
    pub fn header(self) -> &'static str {
        match self {
            Invalid::Missing(h) | Invalid::Unknown(h) | Invalid::Bad(h) => h,
        }
    }

    /// The reason phrase of the 400: `Missing X-Call-Ref`, `Unknown X-Event`, `Bad X-Wait-Seconds`.
    pub fn reason(self) -> String {
        match self {
            Invalid::Missing(h) => format!("Missing {h}"),
            Invalid::Unknown(h) => format!("Unknown {h}"),
            Invalid::Bad(h) => format!("Bad {h}"),
        }
    }

    /// The value of the `Warning` header (RFC 3261 §20.43, code 399: miscellaneous).
    pub fn warning(self) -> String {
        let what = match self {
            Invalid::Missing(_) => "missing header",
            Invalid::Unknown(_) => "unknown value of header",
            Invalid::Bad(_) => "bad value of header",
        };
        format!("399 dispatchd \"{what} {}\"", self.header())
    }
}

/// A header's value, trimmed; `None` when absent or empty.
fn present<'a>(msg: &'a Message, name: &str) -> Option<&'a str> {
    msg.header(name).map(str::trim).filter(|v| !v.is_empty())
}

/// `X-IVR-Path` of an `ivr` event: 1..=32 comma-separated DTMF selections, all valid.
fn ivr_path(value: &str) -> Result<IvrPath, Invalid> {
    IvrPath::strict(value).ok_or(Invalid::Bad("X-IVR-Path"))
}

/// `X-Wait-Seconds`: a whole number of seconds (digits only, fits in u32).
fn wait_seconds(value: &str) -> Result<u32, Invalid> {
    const BAD: Invalid = Invalid::Bad("X-Wait-Seconds");
    if value.is_empty() || value.len() > 10 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(BAD);
    }
    value.parse().map_err(|_| BAD)
}

/// Reads the event of a MESSAGE (any request works; the method is not checked here).
pub fn event_of(msg: &Message) -> Result<CallEvent, Invalid> {
    let x_event = present(msg, "x-event").ok_or(Invalid::Missing("X-Event"))?;
    let kind = EventKind::from_x_event(x_event).ok_or(Invalid::Unknown("X-Event"))?;
    let call_ref = match present(msg, "x-call-ref") {
        Some(r) => r.to_string(),
        // An incident without a reference is correlated by its Call-ID, as an INVITE is.
        None if kind == EventKind::Incident => msg.call_id().trim().to_string(),
        None => return Err(Invalid::Missing("X-Call-Ref")),
    };
    if call_ref.is_empty() {
        return Err(Invalid::Missing("X-Call-Ref"));
    }
    let ivr = match (kind, present(msg, "x-ivr-path")) {
        (EventKind::Ivr, None) => return Err(Invalid::Missing("X-IVR-Path")),
        (EventKind::Ivr, Some(v)) => ivr_path(v)?,
        // Elsewhere the path is a fact like on an INVITE: kept when valid, else left out.
        (_, Some(v)) => ivr_path(v).unwrap_or_default(),
        (_, None) => IvrPath::default(),
    };
    let queue = present(msg, "x-queue");
    if matches!(kind, EventKind::QueueJoin | EventKind::QueueAbandon) && queue.is_none() {
        return Err(Invalid::Missing("X-Queue"));
    }
    let wait = present(msg, "x-wait-seconds").map(wait_seconds).transpose()?;

    let facts = super::call::facts_of_invite(msg);
    let mut ev = CallEvent::new(Source::Sip, kind, &call_ref);
    ev.call_id = msg.call_id().to_string();
    ev.caller = facts.caller;
    ev.caller_name = facts.caller_name;
    ev.queue = queue.unwrap_or_default().to_string();
    ev.ivr_path = ivr;
    ev.wait_seconds = wait;
    ev.agent = present(msg, "x-agent").unwrap_or_default().to_string();
    ev.ruri_user = facts.ruri_user;
    // A re-sent MESSAGE (new branch, same Call-ID and CSeq) is applied once.
    ev.dedup = Some(format!("{}|{}", msg.call_id(), msg.cseq().0));
    Ok(ev.clean())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ivr::MAX_IVR_SELECTIONS;
    use crate::sip::wire::{Verdict, parse_datagram};

    fn message(extra: &str) -> Message {
        let raw = format!(
            "MESSAGE sip:incident-security@192.0.2.1 SIP/2.0\r\n\
             Via: SIP/2.0/UDP 192.0.2.9;branch=z9hG4bK1\r\n\
             From: \"Alice Smith\" <sip:+442071234890@pbx>;tag=a\r\n\
             To: <sip:incident-security@192.0.2.1>\r\n\
             Call-ID: msg-1@pbx\r\nCSeq: 7 MESSAGE\r\nMax-Forwards: 70\r\n{extra}\
             Content-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
        );
        match parse_datagram(raw.as_bytes()) {
            Verdict::Ok(m) => m,
            other => panic!("{other:?}"),
        }
    }

    fn ev(extra: &str) -> Result<CallEvent, Invalid> {
        event_of(&message(extra))
    }

    #[test]
    fn incident_falls_back_to_call_id() {
        let e = ev("X-Event: incident\r\nX-IVR-Path: 2,1\r\nX-Queue: support\r\nX-Wait-Seconds: 45\r\n").unwrap();
        assert_eq!(e.kind, EventKind::Incident);
        assert_eq!(e.source, Source::Sip);
        assert_eq!(e.call_ref, "msg-1@pbx");
        assert_eq!(e.call_id, "msg-1@pbx");
        assert_eq!(e.caller, "+442071234890");
        assert_eq!(e.caller_name, "Alice Smith");
        assert_eq!(e.ivr_path.selections(), ["2", "1"]);
        assert_eq!(e.queue, "support");
        assert_eq!(e.wait_seconds, Some(45));
        assert_eq!(e.ruri_user.as_deref(), Some("incident-security"));
        assert_eq!(e.dedup.as_deref(), Some("msg-1@pbx|7"));
    }

    #[test]
    fn every_kind_with_its_headers() {
        let e =
            ev("X-Event: Queue-Abandon\r\nX-Call-Ref: 1700.42\r\nX-Queue: support\r\nX-Wait-Seconds: 0\r\n").unwrap();
        assert_eq!((e.kind, e.call_ref.as_str(), e.wait_seconds), (EventKind::QueueAbandon, "1700.42", Some(0)));
        let e = ev("X-Event: agent-connect\r\nX-Call-Ref: r\r\nX-Agent: SIP/agent-7\r\n").unwrap();
        assert_eq!((e.kind, e.agent.as_str()), (EventKind::AgentConnect, "SIP/agent-7"));
        let e = ev("X-Event: ivr\r\nX-Call-Ref: r\r\nX-IVR-Path: 2, 1 ,#\r\n").unwrap();
        assert_eq!(e.ivr_path.selections(), ["2", "1", "#"]);
        assert_eq!(ev("X-Event: hangup\r\nX-Call-Ref: r\r\n").unwrap().kind, EventKind::Hangup);
        assert_eq!(ev("X-Event: queue-join\r\nX-Call-Ref: r\r\nX-Queue: q\r\n").unwrap().kind, EventKind::QueueJoin);
        let pai = ev("X-Event: hangup\r\nX-Call-Ref: r\r\nP-Asserted-Identity: <sip:+15550009999@pbx>\r\n").unwrap();
        assert_eq!(pai.caller, "+15550009999");
    }

    #[test]
    fn missing_headers_are_named() {
        assert_eq!(ev(""), Err(Invalid::Missing("X-Event")));
        assert_eq!(ev("X-Event:  \r\n"), Err(Invalid::Missing("X-Event")));
        assert_eq!(ev("X-Event: dtmf\r\nX-Call-Ref: r\r\n"), Err(Invalid::Unknown("X-Event")));
        assert_eq!(ev("X-Event: hangup\r\n"), Err(Invalid::Missing("X-Call-Ref")));
        assert_eq!(ev("X-Event: ivr\r\nX-Call-Ref: r\r\n"), Err(Invalid::Missing("X-IVR-Path")));
        assert_eq!(ev("X-Event: queue-join\r\nX-Call-Ref: r\r\n"), Err(Invalid::Missing("X-Queue")));
        assert_eq!(ev("X-Event: queue-abandon\r\nX-Call-Ref: r\r\nX-Queue: \r\n"), Err(Invalid::Missing("X-Queue")));
        let m = Invalid::Missing("X-Call-Ref");
        assert_eq!(m.reason(), "Missing X-Call-Ref");
        assert_eq!(m.warning(), "399 dispatchd \"missing header X-Call-Ref\"");
        assert_eq!(Invalid::Unknown("X-Event").reason(), "Unknown X-Event");
        assert_eq!(Invalid::Bad("X-Wait-Seconds").reason(), "Bad X-Wait-Seconds");
    }

    #[test]
    fn bad_values_are_refused() {
        for w in ["-3", "4294967296", "99999999999999999999", "1.5", "12s", "+5", "0x10"] {
            let got = ev(&format!("X-Event: hangup\r\nX-Call-Ref: r\r\nX-Wait-Seconds: {w}\r\n"));
            assert_eq!(got, Err(Invalid::Bad("X-Wait-Seconds")), "{w}");
        }
        let max = ev("X-Event: hangup\r\nX-Call-Ref: r\r\nX-Wait-Seconds: 4294967295\r\n").unwrap();
        assert_eq!(max.wait_seconds, Some(u32::MAX));
        let thousand = vec!["1"; 1000].join(",");
        for p in ["2,x", "2,,1", ",", "123456789", &thousand] {
            let got = ev(&format!("X-Event: ivr\r\nX-Call-Ref: r\r\nX-IVR-Path: {p}\r\n"));
            assert_eq!(got, Err(Invalid::Bad("X-IVR-Path")), "{p}");
        }
        let most = vec!["1"; MAX_IVR_SELECTIONS].join(",");
        assert_eq!(ev(&format!("X-Event: ivr\r\nX-Call-Ref: r\r\nX-IVR-Path: {most}\r\n")).unwrap().ivr_path.len(), 32);
        // On other kinds a bad path is just not a fact.
        assert!(ev("X-Event: incident\r\nX-IVR-Path: evil\r\n").unwrap().ivr_path.is_empty());
        // (Control bytes never get here: the wire parser answers 400 first.)
        assert_eq!(ev("X-Event: incident;drop ~junk\u{e9}\r\n"), Err(Invalid::Unknown("X-Event")));
    }

    #[test]
    fn hostile_values_are_bounded() {
        let long = "9".repeat(10_000);
        let e = ev(&format!("X-Event: agent-connect\r\nX-Call-Ref: {long}\r\nX-Queue: {long}\r\nX-Agent: {long}\r\n"))
            .unwrap();
        assert!(e.call_ref.starts_with("h:") && e.call_ref.len() == 66);
        assert_eq!(e.queue.len(), 64);
        assert_eq!(e.agent.len(), 64);
        assert!(e.dedup.unwrap().len() <= 128);
    }
}
