//! A call's life as the core sees it, whichever adapter heard it: its facts
//! (who called, what they chose, which queue, how long they waited) and its
//! events (IVR choices, queue joins and abandons, agents answering, hang-ups).
//!
//! Everything here is caller- or PBX-controlled input, so every value is
//! bounded by the constructors and [`CallEvent::clean`] before it goes further.

use super::incident::Source;
use super::ivr::IvrPath;

/// The facts of one call, as an adapter hands them to intake.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallFacts {
    pub call_id: String,
    /// `X-Call-Ref` when present (the PBX's linked call id), else Call-ID.
    pub call_key: String,
    pub caller: String,
    pub caller_name: String,
    pub ivr_path: IvrPath,
    pub queue: String,
    pub wait_seconds: Option<u32>,
    /// The user part of the Request-URI (`incident-<category>`).
    pub ruri_user: Option<String>,
    /// The `host[:port]` of the Request-URI: where the PBX reached us.
    pub ruri_host: Option<String>,
}

/// How a ringing call ended without being answered by us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallEnd {
    /// CANCEL with `Reason: SIP;cause=200`: someone else answered.
    AnsweredElsewhere,
    /// CANCEL without it: the caller gave up.
    Abandoned,
    /// BYE in the dialog.
    CallerHangup,
    /// We ended the ring after `sip.max_ring` (480).
    RingLimit,
}

/// What happened to a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The caller reported an incident (`X-Event: incident`, or a join of one of
    /// `acd.incident_queues`): opens the call's incident, or finds it.
    Incident,
    /// The IVR path chosen so far (`X-Event: ivr`, `X-IVR-Path`); replaces the call's path.
    Ivr,
    /// One key pressed (AMI `DTMFEnd`, ESL `DTMF`); appended to the call's path.
    Dtmf,
    /// The caller entered an ACD queue.
    QueueJoin,
    /// The caller left the queue without reaching an agent.
    QueueAbandon,
    /// An agent answered the caller.
    AgentConnect,
    /// The agent's conversation ended (AMI `AgentComplete`).
    AgentComplete,
    /// The caller's channel hung up.
    Hangup,
}

impl EventKind {
    /// The `X-Event` name, also the `event` label of `dispatchd_call_events_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Incident => "incident",
            EventKind::Ivr => "ivr",
            EventKind::Dtmf => "dtmf",
            EventKind::QueueJoin => "queue-join",
            EventKind::QueueAbandon => "queue-abandon",
            EventKind::AgentConnect => "agent-connect",
            EventKind::AgentComplete => "agent-complete",
            EventKind::Hangup => "hangup",
        }
    }

    /// The kinds a SIP MESSAGE may name in `X-Event` (issue 5 lists six).
    pub fn from_x_event(s: &str) -> Option<EventKind> {
        let s = s.trim();
        [
            EventKind::Incident,
            EventKind::Ivr,
            EventKind::QueueJoin,
            EventKind::QueueAbandon,
            EventKind::AgentConnect,
            EventKind::Hangup,
        ]
        .into_iter()
        .find(|k| k.as_str().eq_ignore_ascii_case(s))
    }

    pub const ALL: [EventKind; 8] = [
        EventKind::Incident,
        EventKind::Ivr,
        EventKind::Dtmf,
        EventKind::QueueJoin,
        EventKind::QueueAbandon,
        EventKind::AgentConnect,
        EventKind::AgentComplete,
        EventKind::Hangup,
    ];
}

/// One event of one call. Adapters fill what their protocol carries and
/// leave the rest empty; every string is bounded by [`CallEvent::clean`]
/// before intake sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct CallEvent {
    pub source: Source,
    pub kind: EventKind,
    /// The call's correlation key: `X-Call-Ref`, AMI `Linkedid`, the FreeSWITCH
    /// caller's UUID. Events with the same key belong to one call and one incident.
    pub call_ref: String,
    /// The protocol's own id of the message (SIP Call-ID) for the record; may be empty.
    pub call_id: String,
    pub caller: String,
    pub caller_name: String,
    pub queue: String,
    /// `Ivr`: the whole path; `Dtmf`: the one key.
    pub ivr_path: IvrPath,
    pub wait_seconds: Option<u32>,
    /// `AgentConnect`: who answered (agent name or interface).
    pub agent: String,
    /// Free detail from the PBX: hang-up cause, abandon reason, completion reason.
    pub reason: String,
    /// The Request-URI user of a SIP MESSAGE (`incident-<category>`), as for an INVITE.
    pub ruri_user: Option<String>,
    /// Set by sources that may deliver one message twice (SIP MESSAGE: Call-ID
    /// and CSeq): an event whose key was applied before is not applied again.
    pub dedup: Option<String>,
}

/// Longest caller number, queue, agent or reason kept.
pub const MAX_SHORT: usize = 64;
/// Longest display name kept.
pub const MAX_NAME: usize = 128;
/// Longest call reference kept as it is; longer ones are hashed.
const MAX_REF: usize = 128;
/// Longest Call-ID kept.
pub const MAX_CALL_ID: usize = 256;

/// Printable characters only, at most `max` of them, trimmed.
pub fn clean(s: &str, max: usize) -> String {
    s.chars().filter(|c| !c.is_control()).take(max).collect::<String>().trim().to_string()
}

/// A call reference fit for a Redis key: printable ASCII up to 128 bytes, else its SHA-256.
pub fn call_key(raw: &str) -> String {
    let raw = raw.trim();
    if !raw.is_empty() && raw.len() <= MAX_REF && raw.bytes().all(|b| b.is_ascii_graphic()) {
        raw.to_string()
    } else {
        use sha2::Digest;
        format!("h:{}", hex::encode(sha2::Sha256::digest(raw.as_bytes())))
    }
}

impl CallEvent {
    /// An event with only its kind, source and call reference set.
    pub fn new(source: Source, kind: EventKind, call_ref: &str) -> CallEvent {
        CallEvent {
            source,
            kind,
            call_ref: call_ref.to_string(),
            call_id: String::new(),
            caller: String::new(),
            caller_name: String::new(),
            queue: String::new(),
            ivr_path: IvrPath::default(),
            wait_seconds: None,
            agent: String::new(),
            reason: String::new(),
            ruri_user: None,
            dedup: None,
        }
    }

    /// Bounds every field (all of them come from the PBX, some from the caller).
    pub fn clean(mut self) -> CallEvent {
        self.call_ref = call_key(&self.call_ref);
        self.call_id = clean(&self.call_id, MAX_CALL_ID);
        self.caller = clean(&self.caller, MAX_SHORT);
        self.caller_name = clean(self.caller_name.trim_matches('"'), MAX_NAME);
        self.queue = clean(&self.queue, MAX_SHORT);
        self.agent = clean(&self.agent, MAX_SHORT);
        self.reason = clean(&self.reason, MAX_SHORT);
        self.dedup = self.dedup.map(|d| call_key(&d));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x_event_names() {
        assert_eq!(EventKind::from_x_event("Queue-Abandon"), Some(EventKind::QueueAbandon));
        assert_eq!(EventKind::from_x_event(" incident "), Some(EventKind::Incident));
        assert_eq!(EventKind::from_x_event("dtmf"), None, "not one of the MESSAGE kinds");
        assert_eq!(EventKind::from_x_event("bogus"), None);
    }

    #[test]
    fn hostile_fields_are_bounded() {
        let mut e = CallEvent::new(Source::Ami, EventKind::QueueJoin, &"x".repeat(500));
        e.caller = format!("+44\r\n{}", "9".repeat(500));
        e.caller_name = "\"Jane\"".into();
        e.ivr_path = IvrPath::from_selections(["2", "evil", "1"]);
        e.dedup = Some("a b".into());
        let e = e.clean();
        assert!(e.call_ref.starts_with("h:") && e.call_ref.len() == 66);
        assert_eq!(e.caller.len(), MAX_SHORT);
        assert!(!e.caller.contains('\n'));
        assert_eq!(e.caller_name, "Jane");
        assert_eq!(e.ivr_path.selections(), ["2", "1"]);
        assert!(e.dedup.unwrap().starts_with("h:"));
        assert_eq!(call_key("1700000000.42"), "1700000000.42");
        assert!(call_key("").starts_with("h:"));
    }
}
