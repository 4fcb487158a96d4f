//! The incident: its severity, state, timeline entries and identifiers.
//!
//! Pure values, no I/O. The store turns these into Redis hashes and lists.

use std::fmt;

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use hmac::{KeyInit, Mac};
use serde::{Deserialize, Serialize};

/// How bad it is. Ordered most severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Critical,
    High,
    Medium,
    Low,
}

impl Severity {
    pub const ALL: [Severity; 4] = [Severity::Critical, Severity::High, Severity::Medium, Severity::Low];

    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::High => "high",
            Severity::Medium => "medium",
            Severity::Low => "low",
        }
    }

    /// 0 = most severe; the queue orders by this first.
    pub fn rank(self) -> u8 {
        self as u8
    }

    pub fn parse(s: &str) -> Option<Severity> {
        Severity::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an incident is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Queued,
    Offered,
    Acknowledged,
    EnRoute,
    OnScene,
    Resolved,
    Cancelled,
}

impl State {
    pub const ALL: [State; 7] = [
        State::Queued,
        State::Offered,
        State::Acknowledged,
        State::EnRoute,
        State::OnScene,
        State::Resolved,
        State::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Offered => "offered",
            State::Acknowledged => "acknowledged",
            State::EnRoute => "en_route",
            State::OnScene => "on_scene",
            State::Resolved => "resolved",
            State::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// Where the incident came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Sip,
    Ami,
    Esl,
    Api,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Sip => "sip",
            Source::Ami => "ami",
            Source::Esl => "esl",
            Source::Api => "api",
        }
    }
}

/// One line of the append-only timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelineEntry {
    pub at: String,
    pub event: String,
    pub actor: String,
    pub detail: serde_json::Value,
}

impl TimelineEntry {
    pub fn new(at: DateTime<Utc>, event: &str, actor: &str, detail: serde_json::Value) -> Self {
        TimelineEntry { at: timestamp(at), event: event.to_string(), actor: actor.to_string(), detail }
    }

    /// The JSON text stored in Redis (one list element per entry).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }
}

/// RFC 3339, UTC, milliseconds: `2026-11-23T10:15:02.113Z`.
pub fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Milliseconds since the epoch back to a timestamp string.
pub fn timestamp_ms(ms: i64) -> String {
    match Utc.timestamp_millis_opt(ms) {
        chrono::LocalResult::Single(t) => timestamp(t),
        _ => String::new(),
    }
}

/// The incident record as served by `GET /v1/incidents/{id}` (contract §5).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Incident {
    pub id: String,
    pub state: State,
    pub severity: Severity,
    pub category: String,
    pub summary: String,
    pub source: Source,
    pub call_id: String,
    pub caller: String,
    pub caller_name: String,
    pub ivr_path: Vec<String>,
    pub queue: String,
    pub wait_seconds: Option<u32>,
    pub opened_at: String,
    pub assigned_to: Option<String>,
    pub attempts: u32,
    pub exhausted: bool,
    /// Extension (issue 5): a major incident, declared by a surge or an abandon storm.
    pub major: bool,
    /// Extension: the major incident this one is a member of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub major_incident: Option<String>,
    /// Extension: a major incident's members (only in `GET /v1/incidents/{id}`).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub members: Vec<String>,
    /// Extension: calls of the same caller attached to this incident (repeat rule).
    pub repeat_calls: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeline: Option<Vec<TimelineEntry>>,
}

// ---- identifiers ----------------------------------------------------------

/// Crockford base32: no I, L, O, U, so an id read aloud is hard to mishear.
const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// Crockford's check symbols (value mod 37).
const CHECK: &[u8; 37] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ*~$=U";

/// `INC-` + the sequence number in Crockford base32 (at least 4 symbols) + a check symbol.
/// The sequence comes from one Redis counter, so ids are unique across daemons.
/// The same function is implemented in `store/scripts/intake.lua`; a unit test pins both.
pub fn incident_id(seq: u64) -> String {
    let mut digits = Vec::new();
    let mut n = seq;
    loop {
        digits.push(CROCKFORD[(n % 32) as usize]);
        n /= 32;
        if n == 0 {
            break;
        }
    }
    while digits.len() < 4 {
        digits.push(b'0');
    }
    digits.reverse();
    let mut s = String::from("INC-");
    s.extend(digits.iter().map(|&b| b as char));
    s.push(CHECK[(seq % 37) as usize] as char);
    s
}

/// Normalises an id typed or heard by a person: case-insensitive, `O`→`0`,
/// `I`/`L`→`1`, dashes and spaces ignored; checks the check symbol.
/// Returns the canonical id, or None when it cannot be one.
pub fn normalize_id(input: &str) -> Option<String> {
    let mut s: String =
        input.chars().filter(|c| !c.is_whitespace() && *c != '-').map(|c| c.to_ascii_uppercase()).collect();
    if let Some(rest) = s.strip_prefix("INC") {
        s = rest.to_string();
    }
    if s.len() < 5 || s.len() > 14 {
        return None;
    }
    let (body, check) = s.split_at(s.len() - 1);
    let mut seq: u64 = 0;
    for c in body.chars() {
        let c = match c {
            'O' => '0',
            'I' | 'L' => '1',
            c => c,
        };
        let v = CROCKFORD.iter().position(|&b| b as char == c)? as u64;
        seq = seq.checked_mul(32)?.checked_add(v)?;
    }
    let id = incident_id(seq);
    id.ends_with(check).then_some(id)
}

// ---- caller data (contract §7) ---------------------------------------------

/// `HMAC-SHA256(caller_key, number)`, hex, first 16 characters: the only form
/// of a caller number allowed in logs and metrics.
pub fn pseudonym(caller_key: &str, number: &str) -> String {
    let Ok(mut mac) = hmac::Hmac::<sha2::Sha256>::new_from_slice(caller_key.as_bytes()) else {
        return String::new();
    };
    mac.update(number.as_bytes());
    let out = mac.finalize().into_bytes();
    let mut h = hex::encode(out);
    h.truncate(16);
    h
}

/// The form responders see: every character but the last three replaced by `•`.
pub fn mask(number: &str) -> String {
    let n = number.chars().count();
    number.chars().enumerate().map(|(i, c)| if i + 3 < n { '•' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_short_and_round_trip() {
        assert_eq!(incident_id(1), "INC-00011");
        for seq in [0u64, 1, 31, 32, 1023, 1_048_575, 1_048_576, 987_654_321] {
            let id = incident_id(seq);
            assert_eq!(normalize_id(&id).as_deref(), Some(id.as_str()));
            assert_eq!(normalize_id(&id.to_lowercase()).as_deref(), Some(id.as_str()));
        }
        assert_eq!(incident_id(1_048_575).len(), "INC-ZZZZ".len() + 1);
    }

    #[test]
    fn misheard_ids_normalise_or_fail_the_check() {
        let id = incident_id(40); // INC-0018 + check
        let spoken = id.replace('0', "o").replace('1', "l");
        assert_eq!(normalize_id(&spoken).as_deref(), Some(id.as_str()));
        // A wrong symbol breaks the check symbol.
        let mut wrong = id.clone().into_bytes();
        wrong[6] = b'9';
        assert_eq!(normalize_id(std::str::from_utf8(&wrong).unwrap()), None);
        assert_eq!(normalize_id("INC-"), None);
        assert_eq!(normalize_id("../../etc/passwd"), None);
    }

    #[test]
    fn caller_is_masked_and_pseudonymised() {
        assert_eq!(mask("+442071234890"), "••••••••••890");
        assert_eq!(mask("12"), "12");
        let p = pseudonym("k", "+442071234890");
        assert_eq!(p.len(), 16);
        assert_ne!(p, pseudonym("other", "+442071234890"));
        assert!(!p.contains("890"));
    }

    #[test]
    fn severity_orders_most_severe_first() {
        assert!(Severity::Critical < Severity::Low);
        assert_eq!(Severity::parse("high"), Some(Severity::High));
        assert_eq!(State::parse("en_route"), Some(State::EnRoute));
    }
}
