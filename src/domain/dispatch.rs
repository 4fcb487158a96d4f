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

/// A way to reach a responder besides its websocket (contract §11).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// A call through the PBX (AMI Originate / ESL originate) that speaks the
    /// offer and reads one digit: 1 acknowledges, 2 declines.
    PbxCall,
    /// A SIP MESSAGE (RFC 3428) to the responder's `sip_uri`.
    SipMessage,
    /// A signed JSON POST to the responder's `webhook`.
    Webhook,
}

impl Channel {
    pub const ALL: [Channel; 3] = [Channel::SipMessage, Channel::PbxCall, Channel::Webhook];

    pub fn as_str(self) -> &'static str {
        match self {
            Channel::PbxCall => "pbx_call",
            Channel::SipMessage => "sip_message",
            Channel::Webhook => "webhook",
        }
    }

    pub fn parse(s: &str) -> Option<Channel> {
        Channel::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// Why an attempt on a channel is made: an offer waiting for its
/// acknowledgement, or a reminder of an acknowledged incident without progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    Offer,
    Reminder,
}

/// One attempt to reach a responder on one channel, as the rules claimed it
/// (made once, by one daemon).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Attempt {
    #[serde(flatten)]
    pub offer: Offer,
    pub channel: Channel,
    pub purpose: Purpose,
}

/// What became of an attempt: the `outcome` of its `contacted` timeline entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The channel took it (a 2xx to the MESSAGE or the webhook): not an answer.
    Delivered,
    /// The responder pressed 1 on the page call.
    Acknowledged,
    /// The responder pressed 2 on the page call.
    Declined,
    /// The call was answered but no digit came.
    NoDigit,
    NoAnswer,
    Busy,
    /// The attempt was stopped: the offer was answered elsewhere or moved on.
    Stopped,
    /// Anything else that went wrong, in a word or two (`404`, `timeout`, `500`, …).
    Failed(String),
}

impl Outcome {
    /// What the timeline says: a failure's own reason.
    pub fn as_str(&self) -> &str {
        match self {
            Outcome::Failed(why) => why,
            o => o.label(),
        }
    }

    /// The outcome's kind, a failure of any reason being `failed` (the
    /// `outcome` label of `dispatchd_contact_outcomes_total`).
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Acknowledged => "acknowledged",
            Outcome::Declined => "declined",
            Outcome::NoDigit => "no_digit",
            Outcome::NoAnswer => "no_answer",
            Outcome::Busy => "busy",
            Outcome::Stopped => "stopped",
            Outcome::Failed(_) => "failed",
        }
    }

    /// Whether the chain goes on to the next channel at once (a failure, or a
    /// call that brought no answer) rather than after `fallback.after`.
    pub fn next_at_once(&self) -> bool {
        matches!(self, Outcome::NoDigit | Outcome::NoAnswer | Outcome::Busy | Outcome::Failed(_))
    }
}

/// A reminder of an acknowledged incident that makes no progress (contract §11).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Reminder {
    pub incident_id: String,
    pub responder: String,
    /// The daemon the responder is connected to ("" when none).
    #[serde(default)]
    pub daemon: String,
    /// `en_route` or `on_scene`: what is overdue.
    pub due: String,
    /// Since when (ms): the acknowledgement, or the `en_route`.
    pub since_ms: i64,
}
