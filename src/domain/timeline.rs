//! The append-only timeline: every event name of contract §5 and the
//! extensions, once.
//!
//! Rust writes [`Entry`] values (event, actor, detail) without a time; the
//! store's scripts stamp them with Redis's clock as they append them, so the
//! timeline of an incident is in one clock whichever daemon wrote it. Entries
//! are read back as [`TimelineEntry`].

use std::fmt;

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde::{Deserialize, Serialize};

macro_rules! events {
    ($($(#[$doc:meta])* $variant:ident = $name:literal,)*) => {
        /// A timeline event name.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum Event {
            $($(#[$doc])* #[serde(rename = $name)] $variant,)*
        }

        impl Event {
            pub const ALL: &'static [Event] = &[$(Event::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(Event::$variant => $name,)*
                }
            }
        }
    };
}

events! {
    Opened = "opened",
    Classified = "classified",
    IvrInput = "ivr_input",
    Queued = "queued",
    Offered = "offered",
    Delivered = "delivered",
    Acknowledged = "acknowledged",
    Declined = "declined",
    AckTimeout = "ack_timeout",
    Escalated = "escalated",
    Withdrawn = "withdrawn",
    EnRoute = "en_route",
    OnScene = "on_scene",
    Resolved = "resolved",
    Cancelled = "cancelled",
    CallerHangup = "caller_hangup",
    Abandoned = "abandoned",
    AnsweredElsewhere = "answered_elsewhere",
    RepeatCall = "repeat_call",
    Note = "note",
    Exhausted = "exhausted",
    /// Extension (contract §11): an attempt to reach a responder on another channel, and its outcome.
    Contacted = "contacted",
    /// Extension (contract §11): an acknowledged incident without progress, reminded.
    Reminded = "reminded",
    /// Extension (contract §11): an acknowledgement released for want of progress.
    AckExpired = "ack_expired",
}

/// Entries of capped events kept on one timeline, at most (see [`Event::is_capped`]).
pub const TIMELINE_CAP: usize = 500;

impl Event {
    /// Events a caller or the PBX can repeat without end (a storm's abandons,
    /// repeat calls, IVR input and what follows it, notes, hang-ups): beyond
    /// [`TIMELINE_CAP`] entries they are counted, not appended. The dispatch's
    /// own events are bounded by the escalation matrix and always kept.
    pub fn is_capped(self) -> bool {
        matches!(
            self,
            Event::IvrInput
                | Event::Classified
                | Event::CallerHangup
                | Event::Abandoned
                | Event::AnsweredElsewhere
                | Event::RepeatCall
                | Event::Note
        )
    }

    pub fn parse(s: &str) -> Option<Event> {
        Event::ALL.iter().copied().find(|e| e.as_str() == s)
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An entry to append, without its time (the store stamps it).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    pub event: Event,
    pub actor: String,
    pub detail: serde_json::Value,
}

impl Entry {
    pub fn new(event: Event, actor: &str, detail: serde_json::Value) -> Entry {
        Entry { event, actor: actor.to_string(), detail }
    }

    /// The JSON text the scripts stamp: `{"event":…,"actor":…,"detail":…}`;
    /// the script makes it `{"at":…,"event":…}` by inserting the time first.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }
}

/// One line of the timeline as read back (contract §5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelineEntry {
    pub at: String,
    pub event: String,
    pub actor: String,
    pub detail: serde_json::Value,
}

impl TimelineEntry {
    pub fn is(&self, event: Event) -> bool {
        self.event == event.as_str()
    }
}

/// RFC 3339, UTC, milliseconds: `2026-11-23T10:15:02.113Z`.
pub fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Milliseconds since the epoch back to a timestamp string ("" when out of range).
pub fn timestamp_ms(ms: i64) -> String {
    match Utc.timestamp_millis_opt(ms) {
        chrono::LocalResult::Single(t) => timestamp(t),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_contract_names_and_unique() {
        let names: std::collections::HashSet<&str> = Event::ALL.iter().map(|e| e.as_str()).collect();
        assert_eq!(names.len(), Event::ALL.len());
        for e in Event::ALL {
            assert_eq!(Event::parse(e.as_str()), Some(*e));
            assert_eq!(serde_json::to_value(e).unwrap(), serde_json::json!(e.as_str()));
        }
        assert_eq!(Event::parse("bogus"), None);
    }

    #[test]
    fn entries_are_written_without_a_time() {
        let e = Entry::new(Event::AckTimeout, "dispatchd", serde_json::json!({"responder": "r"}));
        assert_eq!(e.to_json(), r#"{"event":"ack_timeout","actor":"dispatchd","detail":{"responder":"r"}}"#);
        assert_eq!(timestamp_ms(0), "1970-01-01T00:00:00.000Z");
    }
}
