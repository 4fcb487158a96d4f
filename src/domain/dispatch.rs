//! What the dispatcher decides and hands to a responder's channel.
//!
//! The rules that produce these (contract §4: tiers, skills, deadlines,
//! rounds) run in Redis so that daemons sharing it agree; these are the
//! values that come out, named once for the script, the dispatcher and
//! every channel.

use serde::Deserialize;

use super::incident::Severity;

/// An offer to deliver: what a `dispatch` frame (or any other channel) carries.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Offer {
    pub incident_id: String,
    pub dispatch_id: String,
    /// The responder it is offered to.
    pub responder: String,
    /// 1 for the first offer of the incident, 2 for the next, …
    pub attempt: u32,
    pub severity: Severity,
    pub category: String,
    pub summary: String,
    pub instructions: String,
    /// The caller's number, masked (`ids::mask`): the only form a responder sees.
    pub caller: String,
    pub queue: String,
    pub opened_ms: i64,
    pub ack_by_ms: i64,
    /// A major incident (surge or abandon storm): offered to the highest tier first.
    pub major: bool,
}

/// An offer taken back: tell `responder` (on `daemon`) with a `cancel`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Release {
    pub responder: String,
    pub dispatch_id: String,
    /// The daemon the responder was connected to ("" when none).
    #[serde(default)]
    pub daemon: String,
    /// `ack_timeout`, `declined`, `incident_cancelled`, …
    pub reason: String,
}

/// What became of an `ack` or `decline`.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Acknowledged now (`offer_age_ms`: how long the offer waited for it), or
    /// again (a repeated ack of the same dispatch).
    Acknowledged {
        offer_age_ms: Option<i64>,
        repeated: bool,
    },
    Declined(Release),
    /// `unknown_dispatch` or `stale_dispatch`.
    Refused(String),
}

/// A responder's availability, as it sets it (contract §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    Available,
    Busy,
    OffDuty,
}

impl Availability {
    pub const ALL: [Availability; 3] = [Availability::Available, Availability::Busy, Availability::OffDuty];

    pub fn as_str(self) -> &'static str {
        match self {
            Availability::Available => "available",
            Availability::Busy => "busy",
            Availability::OffDuty => "off_duty",
        }
    }

    pub fn parse(s: &str) -> Option<Availability> {
        Availability::ALL.into_iter().find(|a| a.as_str() == s)
    }
}
