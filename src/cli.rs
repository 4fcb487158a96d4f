//! `dispatchd report` and `dispatchd review`: read the records through intake
//! (with the daemon's `redis.url` and `redis.prefix`) and print. Errors come
//! back as one line for `main` to print (exit 1).

use std::fmt::Write as _;

use crate::config::Settings;
use crate::domain::ids::{mask, normalize_id};
use crate::domain::incident::Incident;
use crate::intake::Intake;
use crate::report::{Facts, Group, Intervals, Report, Stat, compute, parse_ms, parse_range};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// Exactly the body of `GET /v1/report`.
    Json,
    /// One row per group, with a header line.
    Csv,
}

fn block_on<T>(f: impl std::future::Future<Output = Result<T, String>>) -> Result<T, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?
        .block_on(f)
}

fn intake(settings: &Settings) -> Result<Intake, String> {
    Intake::connect(settings).map_err(|e| format!("redis.url: {e}"))
}

/// `dispatchd report`: the report of incidents opened in `[since, until)`.
pub fn report(settings: &Settings, since: &str, until: &str, format: Format) -> Result<String, String> {
    let range = parse_range(Some(since), Some(until))?;
    let facts = block_on(async {
        let intake = intake(settings)?;
        intake.report_facts(range.since_ms, range.until_ms).await.map_err(|e| format!("reading incidents: {e}"))
    })?;
    let report = compute(&range, &facts, &settings.targets);
    Ok(match format {
        Format::Json => serde_json::to_string(&report).map_err(|e| e.to_string())? + "\n",
        Format::Csv => csv(&report),
        Format::Table => table(&report),
    })
}

/// `dispatchd review`: one incident's timeline with the time between steps.
pub fn review(settings: &Settings, id: &str) -> Result<String, String> {
    let Some(id) = normalize_id(id) else { return Err(format!("{}: not found", id.trim())) };
    let inc = block_on(async {
        let intake = intake(settings)?;
        intake.incident(&id).await.map_err(|e| format!("reading {id}: {e}"))
    })?;
    match inc {
        Some(inc) => Ok(review_text(&inc)),
        None => Err(format!("{id}: not found")),
    }
}

/// `12.345s`, `3m05.000s`, `2h03m05s`, `3d04h05m`.
pub fn fmt_ms(ms: i64) -> String {
    let sign = if ms < 0 { "-" } else { "" };
    let ms = ms.unsigned_abs();
    let (s, frac) = (ms / 1000, ms % 1000);
    let body = match s {
        0..60 => format!("{s}.{frac:03}s"),
        60..3600 => format!("{}m{:02}.{frac:03}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m{:02}s", s / 3600, s % 3600 / 60, s % 60),
        _ => format!("{}d{:02}h{:02}m", s / 86_400, s % 86_400 / 3600, s % 3600 / 60),
    };
    format!("{sign}{body}")
}

fn opt_ms(v: Option<i64>) -> String {
    v.map(fmt_ms).unwrap_or_else(|| "-".into())
}

fn pct(v: Option<f64>) -> String {
    v.map(|r| format!("{:.1}%", r * 100.0)).unwrap_or_else(|| "-".into())
}

/// Rows of cells → left-aligned columns, two spaces apart.
fn align(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let width: Vec<usize> =
        (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            line.push_str(cell);
            if c + 1 < r.len() {
                line.push_str(&" ".repeat(width[c] - cell.chars().count() + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn stat_cell(s: &Stat) -> String {
    if s.n == 0 {
        return format!("- (0/{})", s.n + s.missing);
    }
    format!("{} / {} / {} ({}/{})", opt_ms(s.p50_ms), opt_ms(s.p90_ms), opt_ms(s.p95_ms), s.n, s.n + s.missing)
}

fn target_cell(g: &Group) -> String {
    let Some(t) = &g.target else { return "-".into() };
    let verdict = match t.met {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "no incidents",
    };
    let achieved = t.achieved_percent.map(|p| format!(" = {p:.1}%")).unwrap_or_default();
    format!(
        "ack ≤ {} for ≥ {}%: {}/{}{achieved} {verdict}",
        fmt_ms(t.ack_within_ms as i64),
        t.percent,
        t.within,
        g.count
    )
}

/// The human-readable report.
pub fn table(r: &Report) -> String {
    let mut out = format!("Incidents opened from {} until {} (exclusive): {}\n\n", r.since, r.until, r.incidents);
    out.push_str("Intervals: p50 / p90 / p95 (measured/incidents), nearest rank\n");
    let mut rows = vec![vec![
        "group".to_string(),
        "key".into(),
        "count".into(),
        "call → offer".into(),
        "offer → ack".into(),
        "ack → on scene".into(),
        "open → resolved".into(),
    ]];
    for g in &r.groups {
        rows.push(vec![
            g.group.into(),
            g.key.clone(),
            g.count.to_string(),
            stat_cell(&g.call_to_offer),
            stat_cell(&g.offer_to_ack),
            stat_cell(&g.ack_to_on_scene),
            stat_cell(&g.open_to_resolved),
        ]);
    }
    out.push_str(&align(&rows));
    out.push_str("\nRates and targets\n");
    let mut rows = vec![vec![
        "group".to_string(),
        "key".into(),
        "count".into(),
        "escalated".into(),
        "exhausted".into(),
        "abandoned (shadow)".into(),
        "target".into(),
    ]];
    for g in &r.groups {
        rows.push(vec![
            g.group.into(),
            g.key.clone(),
            g.count.to_string(),
            format!("{}/{} {}", g.escalated, g.count, pct(g.escalation_rate)),
            format!("{}/{} {}", g.exhausted, g.count, pct(g.exhausted_rate)),
            format!("{}/{} {}", g.abandoned, g.ring_ended, pct(g.abandon_rate)),
            target_cell(g),
        ]);
    }
    out.push_str(&align(&rows));
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
}

/// One row per group, with a header line; empty cells for null.
pub fn csv(r: &Report) -> String {
    let opt = |v: Option<String>| v.unwrap_or_default();
    let mut header: Vec<String> = vec!["group".into(), "key".into(), "count".into()];
    for name in ["call_to_offer", "offer_to_ack", "ack_to_on_scene", "open_to_resolved"] {
        for col in ["n", "missing", "p50_ms", "p90_ms", "p95_ms"] {
            header.push(format!("{name}_{col}"));
        }
    }
    for h in [
        "escalated",
        "escalation_rate",
        "exhausted",
        "exhausted_rate",
        "abandoned",
        "ring_ended",
        "abandon_rate",
        "target_ack_within_ms",
        "target_percent",
        "target_within",
        "target_achieved_percent",
        "target_met",
    ] {
        header.push(h.into());
    }
    let mut out = header.join(",") + "\n";
    for g in &r.groups {
        let mut row: Vec<String> = vec![g.group.into(), csv_field(&g.key), g.count.to_string()];
        for s in [&g.call_to_offer, &g.offer_to_ack, &g.ack_to_on_scene, &g.open_to_resolved] {
            row.push(s.n.to_string());
            row.push(s.missing.to_string());
            for p in [s.p50_ms, s.p90_ms, s.p95_ms] {
                row.push(opt(p.map(|v| v.to_string())));
            }
        }
        let rate = |v: Option<f64>| opt(v.map(|v| v.to_string()));
        row.extend([
            g.escalated.to_string(),
            rate(g.escalation_rate),
            g.exhausted.to_string(),
            rate(g.exhausted_rate),
            g.abandoned.to_string(),
            g.ring_ended.to_string(),
            rate(g.abandon_rate),
        ]);
        let t = g.target.as_ref();
        row.extend([
            opt(t.map(|t| t.ack_within_ms.to_string())),
            opt(t.map(|t| t.percent.to_string())),
            opt(t.map(|t| t.within.to_string())),
            opt(t.and_then(|t| t.achieved_percent).map(|v| v.to_string())),
            opt(t.and_then(|t| t.met).map(|v| v.to_string())),
        ]);
        out.push_str(&row.join(","));
        out.push('\n');
    }
    out
}

/// A detail object on one line, at most ~80 characters, the caller's number masked.
fn short_detail(detail: &serde_json::Value, caller: &str) -> String {
    let mut s = match detail {
        serde_json::Value::Object(m) if m.is_empty() => String::new(),
        serde_json::Value::Object(m) => m
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => format!("{k}={s}"),
                v => format!("{k}={v}"),
            })
            .collect::<Vec<_>>()
            .join(" "),
        serde_json::Value::Null => String::new(),
        v => v.to_string(),
    };
    if !caller.is_empty() {
        s = s.replace(caller, &mask(caller));
    }
    s = s.replace(['\n', '\r'], " ");
    if s.chars().count() > 80 {
        s = s.chars().take(79).collect::<String>() + "…";
    }
    s
}

/// The review of one incident: header, timeline with the time between steps, key intervals.
pub fn review_text(inc: &Incident) -> String {
    let facts = Facts::from_incident(inc);
    let mut out = String::new();
    let _ =
        writeln!(out, "{}  severity {}  category {}  state {}", inc.id, inc.severity, inc.category, inc.state.as_str());
    let _ = writeln!(out, "summary: {}", inc.summary);
    let caller = if inc.caller.is_empty() { "-".to_string() } else { mask(&inc.caller) };
    let _ = writeln!(out, "opened {}  source {}  caller {caller}", inc.opened_at, inc.source.as_str());
    out.push('\n');
    let mut rows =
        vec![vec!["at".to_string(), "+prev".into(), "+open".into(), "event".into(), "actor".into(), "detail".into()]];
    let mut prev: Option<i64> = None;
    for e in &facts.timeline {
        let at = parse_ms(&e.at);
        let since = |from: Option<i64>| match (at, from) {
            (Some(a), Some(f)) => format!("+{}", fmt_ms(a - f)),
            _ => "-".into(),
        };
        rows.push(vec![
            e.at.clone(),
            since(prev.or(Some(facts.opened_ms))),
            since(Some(facts.opened_ms)),
            e.event.clone(),
            e.actor.clone(),
            short_detail(&e.detail, &inc.caller),
        ]);
        prev = at.or(prev);
    }
    out.push_str(&align(&rows));
    let iv = Intervals::of(&facts);
    out.push_str("\nkey intervals\n");
    let mut rows = Vec::new();
    for (name, v) in [
        ("call → offer", iv.call_to_offer),
        ("offer → ack", iv.offer_to_ack),
        ("ack → on scene", iv.ack_to_on_scene),
        ("open → resolved", iv.open_to_resolved),
    ] {
        rows.push(vec![format!("  {name}"), v.map(fmt_ms).unwrap_or_else(|| "- (not reached)".into())]);
    }
    out.push_str(&align(&rows));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_exactly() {
        assert_eq!(fmt_ms(0), "0.000s");
        assert_eq!(fmt_ms(30_000), "30.000s");
        assert_eq!(fmt_ms(50_500), "50.500s");
        assert_eq!(fmt_ms(65_300), "1m05.300s");
        assert_eq!(fmt_ms(7_385_000), "2h03m05s");
        assert_eq!(fmt_ms(-1_500), "-1.500s");
        assert_eq!(fmt_ms(90_000_000), "1d01h00m");
    }

    #[test]
    fn details_are_short_and_never_show_the_caller() {
        let d = serde_json::json!({"note": "call back +15550001234", "responder": "r-a", "x": null});
        assert_eq!(short_detail(&d, "+15550001234"), "note=call back •••••••••234 responder=r-a");
        let long = serde_json::json!({"note": "y".repeat(200)});
        assert_eq!(short_detail(&long, "").chars().count(), 80);
        assert_eq!(short_detail(&serde_json::json!({}), ""), "");
    }

    #[test]
    fn csv_quotes_only_when_needed() {
        assert_eq!(csv_field("outage"), "outage");
        assert_eq!(csv_field("a,\"b\""), "\"a,\"\"b\"\"\"");
    }
}
