//! The policies of a deployment as values: the escalation matrix (how long a
//! responder has to acknowledge, how many passes over the tiers) and the
//! correlation rules (repeat caller, callback, abandon storm, surge). The
//! configuration deserialises into these; the store hands them to its scripts.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

use super::incident::Severity;

/// Longest duration any setting takes: ten years (a retention is the
/// longest there is). Anything longer is a typo, and would overflow the
/// arithmetic of deadlines and timestamps.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 366 * 86_400);

/// Parses `"2s"`, `"500ms"`, `"10m"`, `"90d"`, at most ten years.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration {s:?}: {e}"))?;
    if d > MAX_DURATION {
        return Err(format!("duration {s:?} is longer than ten years"));
    }
    Ok(d)
}

/// Serde: a duration written as text (`"30s"`).
pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

/// Serde: an optional duration written as text.
pub fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EscalationPolicy {
    #[serde(deserialize_with = "duration")]
    pub ack_timeout: Duration,
    #[serde(default = "three")]
    pub max_rounds: u32,
    /// Contract §11: acknowledged but not en route this long after → a reminder
    /// (default by severity: 5m, 10m, 20m, 60m).
    #[serde(default, deserialize_with = "opt_duration")]
    pub en_route_within: Option<Duration>,
    /// En route but not on scene this long after → a reminder (30m, 1h, 2h, 4h).
    #[serde(default, deserialize_with = "opt_duration")]
    pub on_scene_within: Option<Duration>,
    /// Reminders without progress before the incident is released and offered again (2).
    #[serde(default = "two")]
    pub release_after: u32,
}

fn two() -> u32 {
    2
}

fn three() -> u32 {
    3
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EscalationSettings {
    pub critical: EscalationPolicy,
    pub high: EscalationPolicy,
    pub medium: EscalationPolicy,
    pub low: EscalationPolicy,
}

impl Default for EscalationSettings {
    fn default() -> Self {
        let p = |s| EscalationPolicy {
            ack_timeout: Duration::from_secs(s),
            max_rounds: 3,
            en_route_within: None,
            on_scene_within: None,
            release_after: 2,
        };
        EscalationSettings { critical: p(30), high: p(60), medium: p(120), low: p(300) }
    }
}

impl EscalationSettings {
    pub fn for_severity(&self, s: Severity) -> &EscalationPolicy {
        match s {
            Severity::Critical => &self.critical,
            Severity::High => &self.high,
            Severity::Medium => &self.medium,
            Severity::Low => &self.low,
        }
    }
}

impl EscalationSettings {
    /// Per severity, most severe first (index = `Severity::rank`): the
    /// acknowledgement deadline in ms and the passes over all tiers.
    pub fn matrix(&self) -> Escalation {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let p = Severity::ALL.map(|s| (s, self.for_severity(s)));
        Escalation {
            ack_timeout_ms: p.map(|(_, p)| ms(p.ack_timeout)),
            max_rounds: p.map(|(_, p)| p.max_rounds),
            en_route_within_ms: p.map(|(s, p)| ms(p.en_route_within.unwrap_or(default_en_route(s)))),
            on_scene_within_ms: p.map(|(s, p)| ms(p.on_scene_within.unwrap_or(default_on_scene(s)))),
            release_after: p.map(|(_, p)| p.release_after),
        }
    }
}

/// How long an acknowledged incident of this severity may wait for `en_route`.
pub fn default_en_route(s: Severity) -> Duration {
    Duration::from_secs([5, 10, 20, 60][usize::from(s.rank())] * 60)
}

/// How long an incident en route may wait for `on_scene`.
pub fn default_on_scene(s: Severity) -> Duration {
    Duration::from_secs([30, 60, 120, 240][usize::from(s.rank())] * 60)
}

/// The escalation matrix as the dispatcher's script takes it (index = `Severity::rank`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Escalation {
    pub ack_timeout_ms: [u64; 4],
    pub max_rounds: [u32; 4],
    /// Acknowledged is not done (contract §11): reminders, then release.
    pub en_route_within_ms: [u64; 4],
    pub on_scene_within_ms: [u64; 4],
    pub release_after: [u32; 4],
}

/// `[correlation.repeat]`: a caller calling again while their incident is open.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RepeatRule {
    pub enabled: bool,
    /// A call within this long of the caller's previous call counts as a repeat.
    #[serde(deserialize_with = "duration")]
    pub window: Duration,
    /// Every `raise_after`-th repeat raises the severity one level (0 = never).
    pub raise_after: u32,
}

impl Default for RepeatRule {
    fn default() -> Self {
        RepeatRule { enabled: true, window: Duration::from_secs(30 * 60), raise_after: 2 }
    }
}

/// `[correlation.callback]`: a caller who gave up in a queue after waiting long.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallbackRule {
    pub enabled: bool,
    /// A caller who abandoned after waiting longer than this gets a `callback` incident.
    #[serde(deserialize_with = "duration")]
    pub abandon_after: Duration,
    pub severity: Severity,
}

impl Default for CallbackRule {
    fn default() -> Self {
        CallbackRule { enabled: true, abandon_after: Duration::from_secs(60), severity: Severity::Low }
    }
}

/// `[correlation.abandon_storm]` and `[correlation.surge]`: `count` within
/// `window` declare a major incident of `severity`. Two types with one shape,
/// so that each table's keys default on their own.
macro_rules! burst_rule {
    ($(#[$doc:meta])* $name:ident, $count:expr, $window_s:expr, $severity:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name {
            pub enabled: bool,
            pub count: u32,
            #[serde(deserialize_with = "duration")]
            pub window: Duration,
            /// Severity of the major incident this rule declares.
            pub severity: Severity,
        }

        impl Default for $name {
            fn default() -> Self {
                $name { enabled: true, count: $count, window: Duration::from_secs($window_s), severity: $severity }
            }
        }
    };
}

burst_rule!(
    /// Abandons on one queue (default 10 within 5 minutes → one `high` major incident).
    StormRule, 10, 300, Severity::High
);
burst_rule!(
    /// New incidents of one category (default 5 within 10 minutes → one `critical` major incident).
    SurgeRule, 5, 600, Severity::Critical
);

/// Extension of issue 5: `[correlation.*]`, every rule on by default.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorrelationSettings {
    pub repeat: RepeatRule,
    pub callback: CallbackRule,
    pub abandon_storm: StormRule,
    pub surge: SurgeRule,
}
