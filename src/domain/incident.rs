//! The incident: its severity, state and source, the record, and what an
//! incident is opened with.
//!
//! Pure values, no I/O. The store turns these into Redis hashes and lists.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::ivr::IvrPath;
use super::timeline::{Entry, TimelineEntry};

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

    /// Resolved or cancelled: nothing moves it any more.
    pub fn is_closed(self) -> bool {
        matches!(self, State::Resolved | State::Cancelled)
    }

    /// The moves of contract §4: the matcher offers a queued incident and takes
    /// an unanswered offer back; the responder acknowledges, then reports
    /// progress forward only (a step may be skipped); anything open may be
    /// resolved or cancelled by hand.
    pub fn can_move_to(self, to: State) -> bool {
        use State::*;
        match (self, to) {
            (Queued, Offered) | (Offered, Queued) | (Offered, Acknowledged) => true,
            (from, Cancelled | Resolved) if !from.is_closed() => true,
            (from, EnRoute | OnScene) => from.progress().zip(to.progress()).is_some_and(|(a, b)| b > a),
            _ => false,
        }
    }

    /// Where a responder's status reports stand: acknowledged, en route, on scene, resolved.
    pub fn progress(self) -> Option<u8> {
        match self {
            State::Acknowledged => Some(1),
            State::EnRoute => Some(2),
            State::OnScene => Some(3),
            State::Resolved => Some(4),
            _ => None,
        }
    }

    /// The states a responder may report in a `status` frame.
    pub const REPORTABLE: [State; 3] = [State::EnRoute, State::OnScene, State::Resolved];
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
    pub const ALL: [Source; 4] = [Source::Sip, Source::Ami, Source::Esl, Source::Api];

    pub fn parse(s: &str) -> Option<Source> {
        Source::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Sip => "sip",
            Source::Ami => "ami",
            Source::Esl => "esl",
            Source::Api => "api",
        }
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
    /// Extension: incidents of the same caller of another category, opened while
    /// this one was open (only in `GET /v1/incidents/{id}`).
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub related: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeline: Option<Vec<TimelineEntry>>,
    /// Extension: entries beyond the timeline's cap, counted by event (only
    /// with the timeline, and only when some were left out).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty", default)]
    pub timeline_omitted: std::collections::BTreeMap<String, u64>,
}

/// Filters of `GET /v1/incidents`.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub state: Option<State>,
    pub severity: Option<Severity>,
    pub limit: usize,
}

/// What an incident is opened with.
#[derive(Debug, Clone)]
pub struct NewIncident {
    pub call_key: String,
    pub call_id: String,
    pub source: Source,
    pub caller: String,
    pub caller_name: String,
    /// `ids::pseudonym` of the caller ("" when unknown): the key of the
    /// erasure index, so the number itself never appears in a key name.
    pub caller_pseudonym: String,
    pub ivr_path: IvrPath,
    pub queue: String,
    pub wait_seconds: Option<u32>,
    pub category: String,
    pub severity: Severity,
    pub summary: String,
    pub instructions: String,
    /// How long before it is written the report arrived (an INVITE waits for
    /// its permit and its round trip): the opening time is the store's now
    /// minus this, in the store's clock.
    pub age_ms: u64,
    /// The first timeline entries (opened, classified, queued), stamped with the opening time.
    pub timeline: Vec<Entry>,
    /// Classified by `[ivr_default]` alone (the caller chose nothing more
    /// specific): a repeat call of such joins the caller's latest open incident
    /// whatever its category.
    pub generic: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_move_forward_only() {
        use State::*;
        assert!(Queued.can_move_to(Offered) && Offered.can_move_to(Queued) && Offered.can_move_to(Acknowledged));
        assert!(Acknowledged.can_move_to(OnScene) && EnRoute.can_move_to(OnScene) && OnScene.can_move_to(Resolved));
        assert!(!OnScene.can_move_to(EnRoute) && !EnRoute.can_move_to(EnRoute) && !Queued.can_move_to(EnRoute));
        assert!(!Resolved.can_move_to(Cancelled) && !Cancelled.can_move_to(Queued) && Queued.can_move_to(Cancelled));
        assert!(State::REPORTABLE.iter().all(|s| s.progress().is_some()));
    }

    #[test]
    fn severity_orders_most_severe_first() {
        assert!(Severity::Critical < Severity::Low);
        assert_eq!(Severity::parse("high"), Some(Severity::High));
        assert_eq!(State::parse("en_route"), Some(State::EnRoute));
    }
}
