//! Post-incident review: service figures over a set of incidents.
//!
//! This file is pure — values in, values out, no I/O. The incidents come from
//! `store::report` (`GET /v1/report`, `dispatchd report`); the commands that
//! print reports and single timelines are in `crate::cli`.
//!
//! Definitions (every time is an exact millisecond value from the record and
//! its timeline):
//!
//! - **call → offer**: `opened_ms` of the record → the first `offered` entry.
//! - **offer → ack**: the first `acknowledged` entry minus the `offered` entry
//!   *with the same `dispatch_id`* — the offer that was actually answered, so
//!   earlier offers that timed out or were declined do not count against the
//!   responder who took it (their wait shows in call → offer and in the
//!   target below). Without a matching id, the last `offered` before the ack.
//! - **ack → on scene**: the first `acknowledged` → the first `on_scene`.
//! - **open → resolved**: `opened_ms` → the first `resolved` (by a responder or the API).
//! - A step that never happened (never acknowledged, never on scene…) is left
//!   out of that interval's percentiles but the incident is still counted:
//!   each interval reports `n` (measured) and `missing`.
//! - **Percentiles** are nearest-rank: of the n sorted values, the p-th
//!   percentile is the value of rank ⌈p·n/100⌉ (1-based). Always one of the
//!   measured values, never interpolated, so known inputs give exact outputs.
//! - **Rates** are shares of the group's incidents: `escalation_rate` (≥ 1
//!   `escalated` entry), `exhausted_rate` (an `exhausted` entry);
//!   `abandon_rate` is of shadow-mode calls only: incidents with `abandoned`
//!   over those whose ringing leg ended (`abandoned`, `answered_elsewhere` or
//!   `caller_hangup`). A rate with nothing to divide by is `null`.
//! - **Targets** (`[targets.<severity>]`): the share of that severity's
//!   incidents acknowledged within `ack_within` *of the call* (`opened_ms` →
//!   first `acknowledged`; queueing and escalation count, which is what a
//!   caller waits for). Incidents never acknowledged count as missing it.
//!   `met` when `within · 100 ≥ percent · count`.
//! - Incidents are grouped by their final severity and category (a call
//!   reclassified by IVR digits counts where it ended up): `all`, then every
//!   severity (always all four, most severe first), then each category present.
//! - A negative interval (clocks of two daemons disagreeing) counts as 0.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::TargetsSettings;
use crate::domain::incident::{Incident, Severity};
use crate::domain::timeline::{Event, TimelineEntry, timestamp_ms};

/// The widest range a report may cover.
pub const MAX_RANGE_MS: i64 = 366 * 86_400_000;

/// What the report needs of one incident.
#[derive(Debug, Clone)]
pub struct Facts {
    pub id: String,
    pub severity: Severity,
    pub category: String,
    pub opened_ms: i64,
    pub timeline: Vec<TimelineEntry>,
}

impl Facts {
    /// From a record read with its timeline (`Store::get`).
    pub fn from_incident(inc: &Incident) -> Facts {
        Facts {
            id: inc.id.clone(),
            severity: inc.severity,
            category: inc.category.clone(),
            opened_ms: parse_ms(&inc.opened_at).unwrap_or(0),
            timeline: inc.timeline.clone().unwrap_or_default(),
        }
    }
}

/// An RFC 3339 timestamp in ms since the epoch.
pub fn parse_ms(at: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(at.trim()).ok().map(|t| t.with_timezone(&Utc).timestamp_millis())
}

/// Opening times `[since_ms, until_ms)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub since_ms: i64,
    pub until_ms: i64,
}

/// Checks `since` and `until` (RFC 3339, both required, since < until, at most 366 days).
pub fn parse_range(since: Option<&str>, until: Option<&str>) -> Result<Range, String> {
    let one = |name: &str, v: Option<&str>| -> Result<i64, String> {
        let v = v.map(str::trim).filter(|v| !v.is_empty()).ok_or_else(|| format!("{name} is required"))?;
        // A `+` of an offset arrives as a space when a query string was not encoded.
        parse_ms(v)
            .or_else(|| v.rfind(' ').and_then(|i| parse_ms(&format!("{}+{}", &v[..i], &v[i + 1..]))))
            .ok_or_else(|| format!("{name} must be an RFC 3339 timestamp like 2026-11-23T00:00:00Z"))
    };
    let (since_ms, until_ms) = (one("since", since)?, one("until", until)?);
    if since_ms >= until_ms {
        return Err("since must be before until".into());
    }
    if until_ms - since_ms > MAX_RANGE_MS {
        return Err("the range may cover 366 days at most".into());
    }
    Ok(Range { since_ms, until_ms })
}

/// The key intervals of one incident, ms; `None` for a step not reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Intervals {
    pub call_to_offer: Option<i64>,
    pub offer_to_ack: Option<i64>,
    pub ack_to_on_scene: Option<i64>,
    pub open_to_resolved: Option<i64>,
    /// For the targets.
    pub open_to_ack: Option<i64>,
}

fn dispatch_id(e: &TimelineEntry) -> Option<&str> {
    e.detail.get("dispatch_id").and_then(|v| v.as_str())
}

impl Intervals {
    pub fn of(f: &Facts) -> Intervals {
        // (position, entry, ms); entries whose time does not parse are ignored.
        let entries: Vec<(usize, &TimelineEntry, i64)> =
            f.timeline.iter().enumerate().filter_map(|(i, e)| Some((i, e, parse_ms(&e.at)?))).collect();
        let first = |event: Event| entries.iter().find(|(_, e, _)| e.is(event));
        let span = |from: i64, to: i64| (to - from).max(0);

        let offered = first(Event::Offered);
        let ack = first(Event::Acknowledged);
        let on_scene = first(Event::OnScene);
        let resolved = first(Event::Resolved);
        let answered_offer = ack.and_then(|&(ack_pos, ack_e, _)| {
            let offers = || entries.iter().filter(|(i, e, _)| *i < ack_pos && e.is(Event::Offered));
            match dispatch_id(ack_e) {
                Some(d) => offers().find(|(_, e, _)| dispatch_id(e) == Some(d)).or_else(|| offers().next_back()),
                None => offers().next_back(),
            }
        });
        Intervals {
            call_to_offer: offered.map(|o| span(f.opened_ms, o.2)),
            offer_to_ack: ack.zip(answered_offer).map(|(a, o)| span(o.2, a.2)),
            ack_to_on_scene: ack.zip(on_scene).map(|(a, s)| span(a.2, s.2)),
            open_to_resolved: resolved.map(|r| span(f.opened_ms, r.2)),
            open_to_ack: ack.map(|a| span(f.opened_ms, a.2)),
        }
    }
}

/// The nearest-rank percentile of sorted values: rank ⌈p·n/100⌉, 1-based.
pub fn nearest_rank(sorted: &[i64], p: u32) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p as usize * sorted.len()).div_ceil(100).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// One interval over a group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stat {
    /// Incidents that reached both steps (the percentiles are of these).
    pub n: usize,
    /// Incidents of the group that did not.
    pub missing: usize,
    pub p50_ms: Option<i64>,
    pub p90_ms: Option<i64>,
    pub p95_ms: Option<i64>,
}

impl Stat {
    fn of(values: impl Iterator<Item = Option<i64>>) -> Stat {
        let mut missing = 0;
        let mut v: Vec<i64> = values
            .filter_map(|x| {
                x.or_else(|| {
                    missing += 1;
                    None
                })
            })
            .collect();
        v.sort_unstable();
        Stat {
            n: v.len(),
            missing,
            p50_ms: nearest_rank(&v, 50),
            p90_ms: nearest_rank(&v, 90),
            p95_ms: nearest_rank(&v, 95),
        }
    }
}

/// The target of a severity and how it went.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TargetResult {
    pub ack_within_ms: u64,
    pub percent: u32,
    /// Incidents acknowledged within `ack_within` of the call.
    pub within: usize,
    /// `within / count · 100`; null without incidents.
    pub achieved_percent: Option<f64>,
    pub met: Option<bool>,
}

/// The figures of one group of incidents.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Group {
    /// `all`, `severity` or `category`.
    pub group: &'static str,
    /// `all`, the severity, or the category.
    pub key: String,
    pub count: usize,
    pub call_to_offer: Stat,
    pub offer_to_ack: Stat,
    pub ack_to_on_scene: Stat,
    pub open_to_resolved: Stat,
    pub escalated: usize,
    pub escalation_rate: Option<f64>,
    pub exhausted: usize,
    pub exhausted_rate: Option<f64>,
    /// Acknowledged incidents that made no progress in time (contract §11):
    /// reminded at least once, and released back to the queue at least once.
    pub reminded: usize,
    pub released: usize,
    /// Shadow-mode calls: ringing legs the caller abandoned, of those that ended.
    pub abandoned: usize,
    pub ring_ended: usize,
    pub abandon_rate: Option<f64>,
    /// Severity groups with a `[targets.<severity>]` table only.
    pub target: Option<TargetResult>,
}

/// The report: `GET /v1/report` answers exactly this, `dispatchd report --format json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub since: String,
    pub until: String,
    pub incidents: usize,
    pub groups: Vec<Group>,
}

/// One incident, digested.
struct Row<'a> {
    facts: &'a Facts,
    iv: Intervals,
    escalated: bool,
    exhausted: bool,
    reminded: bool,
    released: bool,
    abandoned: bool,
    ring_ended: bool,
}

fn share(part: usize, whole: usize) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

fn group(group: &'static str, key: &str, rows: &[&Row], target: Option<&crate::config::TargetPolicy>) -> Group {
    let count = rows.len();
    let stat = |f: fn(&Intervals) -> Option<i64>| Stat::of(rows.iter().map(|r| f(&r.iv)));
    let n = |f: fn(&Row) -> bool| rows.iter().filter(|r| f(r)).count();
    let (escalated, exhausted, abandoned, ring_ended) =
        (n(|r| r.escalated), n(|r| r.exhausted), n(|r| r.abandoned), n(|r| r.ring_ended));
    let (reminded, released) = (n(|r| r.reminded), n(|r| r.released));
    let target = target.map(|t| {
        let limit = t.ack_within.as_millis() as i64;
        let within = rows.iter().filter(|r| r.iv.open_to_ack.is_some_and(|ms| ms <= limit)).count();
        TargetResult {
            ack_within_ms: limit as u64,
            percent: t.percent,
            within,
            achieved_percent: share(within * 100, count),
            met: (count > 0).then(|| within * 100 >= t.percent as usize * count),
        }
    });
    Group {
        group,
        key: key.to_string(),
        count,
        call_to_offer: stat(|i| i.call_to_offer),
        offer_to_ack: stat(|i| i.offer_to_ack),
        ack_to_on_scene: stat(|i| i.ack_to_on_scene),
        open_to_resolved: stat(|i| i.open_to_resolved),
        escalated,
        escalation_rate: share(escalated, count),
        exhausted,
        exhausted_rate: share(exhausted, count),
        reminded,
        released,
        abandoned,
        ring_ended,
        abandon_rate: share(abandoned, ring_ended),
        target,
    }
}

/// The report over `incidents` (already selected by opening time within `range`).
pub fn compute(range: &Range, incidents: &[Facts], targets: &TargetsSettings) -> Report {
    let rows: Vec<Row> = incidents
        .iter()
        .map(|f| {
            let has = |ev: Event| f.timeline.iter().any(|e| e.is(ev));
            let abandoned = has(Event::Abandoned);
            Row {
                facts: f,
                iv: Intervals::of(f),
                escalated: has(Event::Escalated),
                exhausted: has(Event::Exhausted),
                reminded: has(Event::Reminded),
                released: has(Event::AckExpired),
                abandoned,
                ring_ended: abandoned || has(Event::AnsweredElsewhere) || has(Event::CallerHangup),
            }
        })
        .collect();
    let all: Vec<&Row> = rows.iter().collect();
    let mut groups = vec![group("all", "all", &all, None)];
    for s in Severity::ALL {
        let of: Vec<&Row> = rows.iter().filter(|r| r.facts.severity == s).collect();
        groups.push(group("severity", s.as_str(), &of, targets.for_severity(s)));
    }
    let mut by_category: BTreeMap<&str, Vec<&Row>> = BTreeMap::new();
    for r in &rows {
        by_category.entry(r.facts.category.as_str()).or_default().push(r);
    }
    for (c, of) in by_category {
        groups.push(group("category", c, &of, None));
    }
    Report { since: timestamp_ms(range.since_ms), until: timestamp_ms(range.until_ms), incidents: rows.len(), groups }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::config::TargetPolicy;

    const T0: i64 = 1_800_000_000_000;

    fn e(ms: i64, event: &str, detail: serde_json::Value) -> TimelineEntry {
        TimelineEntry { at: timestamp_ms(T0 + ms), event: event.into(), actor: "t".into(), detail }
    }

    /// Opened at T0 + `open`; `steps` are (ms after T0, event, dispatch id).
    fn inc(sev: Severity, cat: &str, open: i64, steps: &[(i64, &str, &str)]) -> Facts {
        let mut timeline = vec![e(open, "opened", json!({})), e(open, "queued", json!({}))];
        for (ms, ev, d) in steps {
            let detail = if d.is_empty() { json!({}) } else { json!({"dispatch_id": d}) };
            timeline.push(e(*ms, ev, detail));
        }
        Facts { id: format!("x{open}"), severity: sev, category: cat.into(), opened_ms: T0 + open, timeline }
    }

    /// Offered after `offer` ms, acknowledged `ack` ms after that (when given).
    fn acked(sev: Severity, cat: &str, offer: i64, ack: Option<i64>) -> Facts {
        let mut steps = vec![(offer, "offered", "d.1")];
        if let Some(a) = ack {
            steps.push((offer + a, "acknowledged", "d.1"));
        }
        inc(sev, cat, 0, &steps)
    }

    fn range() -> Range {
        Range { since_ms: T0, until_ms: T0 + 86_400_000 }
    }

    fn find<'a>(r: &'a Report, group: &str, key: &str) -> &'a Group {
        r.groups.iter().find(|g| g.group == group && g.key == key).unwrap()
    }

    #[test]
    fn reminded_and_released_are_counted_per_incident() {
        let incs = vec![
            inc(Severity::High, "a", 0, &[(1_000, "offered", "d.1"), (2_000, "acknowledged", "d.1")]),
            inc(
                Severity::High,
                "a",
                0,
                &[
                    (1_000, "offered", "d.1"),
                    (2_000, "acknowledged", "d.1"),
                    (9_000, "reminded", ""),
                    (12_000, "reminded", ""),
                ],
            ),
            inc(
                Severity::High,
                "b",
                0,
                &[
                    (1_000, "offered", "d.1"),
                    (2_000, "acknowledged", "d.1"),
                    (9_000, "reminded", ""),
                    (12_000, "ack_expired", "d.1"),
                ],
            ),
        ];
        let r = compute(&range(), &incs, &TargetsSettings::default());
        let g = find(&r, "severity", "high");
        assert_eq!((g.count, g.reminded, g.released), (3, 2, 1));
        let b = find(&r, "category", "b");
        assert_eq!((b.reminded, b.released), (1, 1));
        assert_eq!(find(&r, "severity", "low").reminded, 0);
    }

    #[test]
    fn nearest_rank_on_exact_values() {
        let v = [10_000, 20_000, 30_000, 40_000, 50_000];
        assert_eq!(nearest_rank(&v, 50), Some(30_000));
        assert_eq!(nearest_rank(&v, 90), Some(50_000));
        assert_eq!(nearest_rank(&v, 95), Some(50_000));
        assert_eq!(nearest_rank(&v, 20), Some(10_000));
        assert_eq!(nearest_rank(&v, 21), Some(20_000));
        let ten: Vec<i64> = (1..=10).collect();
        assert_eq!(nearest_rank(&ten, 50), Some(5));
        assert_eq!(nearest_rank(&ten, 90), Some(9));
        assert_eq!(nearest_rank(&ten, 95), Some(10));
        assert_eq!(nearest_rank(&[7], 50), Some(7));
        assert_eq!(nearest_rank(&[], 50), None);
    }

    #[test]
    fn acks_at_10_to_50s_give_p50_30s() {
        let incs: Vec<Facts> =
            [10, 20, 30, 40, 50].iter().map(|s| acked(Severity::High, "outage", 1_000, Some(s * 1000))).collect();
        let r = compute(&range(), &incs, &TargetsSettings::default());
        let g = find(&r, "severity", "high");
        assert_eq!(
            g.offer_to_ack,
            Stat { n: 5, missing: 0, p50_ms: Some(30_000), p90_ms: Some(50_000), p95_ms: Some(50_000) }
        );
        assert_eq!(g.call_to_offer.p50_ms, Some(1_000));
        assert_eq!(find(&r, "all", "all").offer_to_ack, g.offer_to_ack);
        assert_eq!(find(&r, "category", "outage").count, 5);
        assert!(g.target.is_none());
    }

    #[test]
    fn missing_steps_are_counted_not_measured() {
        let incs = vec![
            acked(Severity::Low, "a", 2_000, Some(4_000)),
            acked(Severity::Low, "a", 3_000, None),
            inc(Severity::Low, "a", 0, &[(9_000, "cancelled", "")]),
        ];
        let r = compute(&range(), &incs, &TargetsSettings::default());
        let g = find(&r, "severity", "low");
        assert_eq!(g.count, 3);
        assert_eq!(
            g.call_to_offer,
            Stat { n: 2, missing: 1, p50_ms: Some(2_000), p90_ms: Some(3_000), p95_ms: Some(3_000) }
        );
        assert_eq!(
            g.offer_to_ack,
            Stat { n: 1, missing: 2, p50_ms: Some(4_000), p90_ms: Some(4_000), p95_ms: Some(4_000) }
        );
        assert_eq!(g.ack_to_on_scene, Stat { n: 0, missing: 3, p50_ms: None, p90_ms: None, p95_ms: None });
        // Empty groups are reported, with nothing to divide by.
        let m = find(&r, "severity", "medium");
        assert_eq!((m.count, m.escalation_rate, m.abandon_rate), (0, None, None));
    }

    #[test]
    fn offer_to_ack_uses_the_offer_that_was_answered() {
        // Offered to one responder at 1s (timed out at 31s), to another at 31s, acked at 36s.
        let f = inc(
            Severity::Critical,
            "outage",
            0,
            &[
                (1_000, "offered", "d.1"),
                (31_000, "ack_timeout", "d.1"),
                (31_000, "withdrawn", "d.1"),
                (31_000, "escalated", ""),
                (31_000, "offered", "d.2"),
                (36_000, "acknowledged", "d.2"),
                (40_000, "en_route", ""),
                (96_000, "on_scene", ""),
                (500_000, "resolved", ""),
            ],
        );
        let iv = Intervals::of(&f);
        assert_eq!(
            iv,
            Intervals {
                call_to_offer: Some(1_000),
                offer_to_ack: Some(5_000),
                ack_to_on_scene: Some(60_000),
                open_to_resolved: Some(500_000),
                open_to_ack: Some(36_000),
            }
        );
        // Without a dispatch id: the last offer before the ack.
        let g = inc(
            Severity::Critical,
            "outage",
            0,
            &[(1_000, "offered", ""), (20_000, "offered", ""), (21_000, "acknowledged", "")],
        );
        assert_eq!(Intervals::of(&g).offer_to_ack, Some(1_000));
        // Timestamps before the opening (another daemon's clock) count as 0.
        let h = inc(Severity::Critical, "outage", 0, &[(-5, "offered", "")]);
        assert_eq!(Intervals::of(&h).call_to_offer, Some(0));
    }

    #[test]
    fn rates_and_shadow_mode_abandons() {
        let incs = vec![
            inc(Severity::High, "a", 0, &[(1, "escalated", ""), (2, "escalated", ""), (3, "abandoned", "")]),
            inc(Severity::High, "a", 0, &[(1, "exhausted", ""), (2, "answered_elsewhere", "")]),
            inc(Severity::High, "b", 0, &[(1, "caller_hangup", "")]),
            inc(Severity::High, "b", 0, &[]),
        ];
        let r = compute(&range(), &incs, &TargetsSettings::default());
        let g = find(&r, "severity", "high");
        assert_eq!((g.escalated, g.escalation_rate), (1, Some(0.25)));
        assert_eq!((g.exhausted, g.exhausted_rate), (1, Some(0.25)));
        assert_eq!((g.abandoned, g.ring_ended), (1, 3));
        assert_eq!(g.abandon_rate, Some(1.0 / 3.0));
        let b = find(&r, "category", "b");
        assert_eq!((b.abandoned, b.ring_ended, b.abandon_rate), (0, 1, Some(0.0)));
        assert_eq!(b.escalation_rate, Some(0.0));
    }

    #[test]
    fn targets_count_acks_within_of_the_call() {
        // Acknowledged 11s, 22s, 60s, 61s after the call; one never.
        let incs = vec![
            acked(Severity::Critical, "o", 1_000, Some(10_000)),
            acked(Severity::Critical, "o", 2_000, Some(20_000)),
            acked(Severity::Critical, "o", 30_000, Some(30_000)),
            acked(Severity::Critical, "o", 31_000, Some(30_000)),
            acked(Severity::Critical, "o", 1_000, None),
            acked(Severity::Low, "o", 1_000, Some(1_000)),
        ];
        let policy = |s, p| Some(TargetPolicy { ack_within: Duration::from_secs(s), percent: p });
        let targets = TargetsSettings { critical: policy(60, 60), medium: policy(60, 90), ..Default::default() };
        let r = compute(&range(), &incs, &targets);
        let t = find(&r, "severity", "critical").target.clone().unwrap();
        assert_eq!(
            t,
            TargetResult {
                ack_within_ms: 60_000,
                percent: 60,
                within: 3,
                achieved_percent: Some(60.0),
                met: Some(true)
            }
        );
        let t = find(&r, "severity", "medium").target.clone().unwrap();
        assert_eq!((t.within, t.achieved_percent, t.met), (0, None, None));
        assert!(find(&r, "severity", "low").target.is_none());
        assert!(find(&r, "all", "all").target.is_none());
        let strict = TargetsSettings { critical: policy(60, 61), ..Default::default() };
        let r = compute(&range(), &incs, &strict);
        assert_eq!(find(&r, "severity", "critical").target.as_ref().unwrap().met, Some(false));
    }

    #[test]
    fn groups_are_all_then_severities_then_categories() {
        let incs = vec![acked(Severity::Low, "zeta", 1, None), acked(Severity::Critical, "alpha", 1, None)];
        let r = compute(&range(), &incs, &TargetsSettings::default());
        let keys: Vec<(&str, &str)> = r.groups.iter().map(|g| (g.group, g.key.as_str())).collect();
        assert_eq!(
            keys,
            [
                ("all", "all"),
                ("severity", "critical"),
                ("severity", "high"),
                ("severity", "medium"),
                ("severity", "low"),
                ("category", "alpha"),
                ("category", "zeta")
            ]
        );
        assert_eq!(r.incidents, 2);
        assert_eq!(r.since, "2027-01-15T08:00:00.000Z");
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v["groups"][0]["offer_to_ack"],
            json!({"n": 0, "missing": 2, "p50_ms": null, "p90_ms": null, "p95_ms": null})
        );
    }

    #[test]
    fn ranges_are_checked() {
        let r = parse_range(Some("2026-11-23T00:00:00Z"), Some("2026-11-24T00:00:00.000+00:00")).unwrap();
        assert_eq!(r.until_ms - r.since_ms, 86_400_000);
        // An unencoded `+` arrives as a space.
        let r2 = parse_range(Some("2026-11-23T01:00:00 01:00"), Some("2026-11-24T00:00:00Z")).unwrap();
        assert_eq!(r2, r);
        for (s, u) in [
            (None, Some("2026-11-24T00:00:00Z")),
            (Some("2026-11-23T00:00:00Z"), None),
            (Some(""), Some("2026-11-24T00:00:00Z")),
            (Some("yesterday"), Some("2026-11-24T00:00:00Z")),
            (Some("2026-11-23"), Some("2026-11-24T00:00:00Z")),
            (Some("2026-11-24T00:00:00Z"), Some("2026-11-24T00:00:00Z")),
            (Some("2026-11-25T00:00:00Z"), Some("2026-11-24T00:00:00Z")),
            (Some("2025-01-01T00:00:00Z"), Some("2026-01-02T00:00:01Z")),
        ] {
            assert!(parse_range(s, u).is_err(), "{s:?} {u:?}");
        }
        assert!(parse_range(Some("2025-01-01T00:00:00Z"), Some("2026-01-02T00:00:00Z")).is_ok(), "366 days exactly");
    }
}
