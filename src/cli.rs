//! `dispatchd report` and `dispatchd review`: read the records through intake
//! (with the daemon's `redis.url` and `redis.prefix`) and print. Errors come
//! back as one line for `main` to print (exit 1).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::config::Settings;
use crate::domain::ids::{mask, normalize_id};
use crate::domain::incident::Incident;
use crate::domain::timeline::Event;
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

async fn intake(settings: &Settings) -> Result<Intake, String> {
    Intake::connect(settings).await.map_err(|e| format!("redis: {e}"))
}

/// `dispatchd report`: the report of incidents opened in `[since, until)`.
pub fn report(settings: &Settings, since: &str, until: &str, format: Format) -> Result<String, String> {
    let range = parse_range(Some(since), Some(until))?;
    let facts = block_on(async {
        let intake = intake(settings).await?;
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
        let intake = intake(settings).await?;
        intake.incident(&id).await.map_err(|e| format!("reading {id}: {e}"))
    })?;
    match inc {
        Some(inc) => Ok(review_text(&inc)),
        None => Err(format!("{id}: not found")),
    }
}

/// The configuration file when `--config` is not given: `$DISPATCHD_CONFIG`,
/// else `/etc/dispatchd/dispatchd.toml` (where the unit file and the README put
/// it), else `config/dispatchd.toml` in a checkout; None: defaults and
/// environment only.
pub fn default_config() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("DISPATCHD_CONFIG").filter(|p| !p.is_empty()) {
        return Some(p.into());
    }
    ["/etc/dispatchd/dispatchd.toml", "config/dispatchd.toml"]
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.is_file())
}

/// `report` without `--since`/`--until`: the last 24 hours, up to now (the
/// next whole second, so that what opened this very second is in).
pub fn default_range(since: Option<String>, until: Option<String>) -> (String, String) {
    let now = chrono::Utc::now() + chrono::Duration::seconds(1);
    let iso = |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let until = until.unwrap_or_else(|| iso(now));
    let since = since.unwrap_or_else(|| {
        let end = parse_ms(&until).and_then(chrono::DateTime::<chrono::Utc>::from_timestamp_millis).unwrap_or(now);
        iso(end - chrono::Duration::hours(24))
    });
    (since, until)
}

// ---- token new --------------------------------------------------------------

/// `dispatchd token new <id>`: a fresh token (192 random bits, hex), the
/// roster line with its SHA-256, and the console link `BASE/#token=…`
/// (with `qr`, also as a QR code for a phone's camera).
pub fn token_new(id: &str, base: &str, qr: bool) -> Result<String, String> {
    if id.is_empty() || id.len() > 64 || id.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(format!("{id:?} is not a responder id (1 to 64 visible characters)"));
    }
    use sha2::Digest;
    let token = hex::encode(rand::random::<[u8; 24]>());
    let hash = hex::encode(sha2::Sha256::digest(token.as_bytes()));
    let link = format!("{}/#token={token}", base.trim_end_matches('/'));
    let mut out = String::new();
    let _ = writeln!(out, "responder: {id}");
    let _ = writeln!(out, "token:     {token}");
    let _ = writeln!(out, "roster:    token_sha256 = \"{hash}\"   # in the [[responder]] table with id = \"{id}\"");
    let _ = writeln!(out, "link:      {link}");
    let _ = writeln!(out, "Give the link (or the token) to this responder only; dispatchd keeps only the hash.");
    if qr {
        let code = qrcode::QrCode::new(link.as_bytes()).map_err(|e| format!("QR code: {e}"))?;
        use qrcode::render::unicode::Dense1x2;
        let art = code.render::<Dense1x2>().dark_color(Dense1x2::Light).light_color(Dense1x2::Dark).build();
        let _ = writeln!(out, "\n{art}");
    }
    Ok(out)
}

/// The console's address when `--url` is not given: the responders' listener
/// of the configuration (this host's name for a wildcard address), https when
/// it speaks TLS.
pub fn console_base(settings: &Settings) -> String {
    let scheme = if settings.responders_tls() { "https" } else { "http" };
    let listen = &settings.responders.listen;
    let (host, port) = listen.rsplit_once(':').unwrap_or((listen.as_str(), "8080"));
    let host = match host.trim_matches(['[', ']']) {
        "0.0.0.0" | "::" | "" => std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into()),
        h if h.contains(':') => format!("[{h}]"),
        h => h.to_string(),
    };
    format!("{scheme}://{host}:{port}")
}

// ---- simulate call -----------------------------------------------------------

/// What `dispatchd simulate call` sends.
#[derive(Debug, Clone)]
pub struct SimulatedCall {
    /// Where the incident line is (`host:port`, UDP).
    pub to: String,
    pub ivr: String,
    pub caller: String,
    pub queue: String,
}

impl SimulatedCall {
    /// The configured incident line (a wildcard address means this host).
    pub fn line_of(settings: &Settings) -> Result<String, String> {
        let udp = &settings.sip.udp;
        if udp.is_empty() {
            return Err("sip.udp is disabled: give --to HOST:PORT".into());
        }
        Ok(udp.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]"))
    }
}

/// `dispatchd simulate call`: places one call to the incident line over UDP,
/// as a PBX would (INVITE with `X-IVR-Path`, `X-Queue` and the caller in
/// `P-Asserted-Identity`), and prints the incident id it gets. In decline mode
/// the 603 is acknowledged; in shadow mode the 180 is read and the call
/// cancelled (the caller hung up after hearing the id).
pub fn simulate_call(call: &SimulatedCall) -> Result<String, String> {
    use std::net::UdpSocket;
    use std::time::{Duration, Instant};
    let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| format!("UDP socket: {e}"))?;
    sock.connect(&call.to).map_err(|e| format!("{}: {e}", call.to))?;
    let local = sock.local_addr().map_err(|e| e.to_string())?;
    let port = local.port();
    let tag = format!("{:08x}", rand::random::<u32>());
    let call_id = format!("sim-{:016x}@dispatchd", rand::random::<u64>());
    let branch = format!("z9hG4bK-sim-{:08x}", rand::random::<u32>());
    let request = |method: &str, cseq_method: &str, to: &str, extra: &str| {
        format!(
            "{method} sip:incident@{dst} SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:{port};branch={branch}\r\n\
             Max-Forwards: 70\r\nFrom: \"Simulated caller\" <sip:{caller}@127.0.0.1>;tag={tag}\r\nTo: {to}\r\n\
             Call-ID: {call_id}\r\nCSeq: 1 {cseq_method}\r\n{extra}Content-Length: 0\r\n\r\n",
            dst = call.to,
            caller = call.caller,
        )
    };
    let to_uri = format!("<sip:incident@{}>", call.to);
    let mut extra = format!("P-Asserted-Identity: <sip:{}@127.0.0.1>\r\n", call.caller);
    if !call.ivr.is_empty() {
        let _ = write!(extra, "X-IVR-Path: {}\r\n", call.ivr);
    }
    if !call.queue.is_empty() {
        let _ = write!(extra, "X-Queue: {}\r\n", call.queue);
    }
    let invite = request("INVITE", "INVITE", &to_uri, &extra);
    let end = Instant::now() + Duration::from_secs(5);
    let mut resend = Instant::now();
    let mut buf = vec![0u8; 65_536];
    loop {
        if Instant::now() >= resend {
            sock.send(invite.as_bytes()).map_err(|e| format!("sending the INVITE: {e}"))?;
            resend = Instant::now() + Duration::from_millis(500);
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no answer from {} within 5 s (is dispatchd running, and 127.0.0.1 in sip.allow?)",
                call.to
            ));
        }
        let _ = sock.set_read_timeout(Some(left.min(Duration::from_millis(500))));
        let Ok(n) = sock.recv(&mut buf) else { continue };
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let status: u16 = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let header = |name: &str| {
            text.split("\r\n").find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
        };
        if status < 180 {
            continue;
        }
        let id = header("X-Incident-Id");
        let to = header("To").unwrap_or_else(|| to_uri.clone());
        if status >= 300 {
            let _ = sock.send(request("ACK", "ACK", &to, "").as_bytes());
        } else {
            let _ = sock.send(request("CANCEL", "CANCEL", &to_uri, "").as_bytes());
        }
        let reason = text.lines().next().unwrap_or("").trim().to_string();
        return match id {
            Some(id) => Ok(format!("incident {id} ({reason}); see it with: dispatchd review {id}\n")),
            None => Err(format!("answered without an incident: {reason}")),
        };
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
        "reminded / released".into(),
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
            format!("{} / {}", g.reminded, g.released),
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
        "reminded",
        "released",
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
            g.reminded.to_string(),
            g.released.to_string(),
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
    out.push_str(&follow_up(&facts));
    out
}

/// The review's account of reaching the responders and keeping them going
/// (contract §11): attempts per channel and outcome, reminders, releases.
fn follow_up(facts: &Facts) -> String {
    let count = |ev: Event| facts.timeline.iter().filter(|e| e.is(ev)).count();
    let mut attempts: BTreeMap<String, usize> = BTreeMap::new();
    for e in facts.timeline.iter().filter(|e| e.is(Event::Contacted)) {
        let field = |k: &str| e.detail.get(k).and_then(|v| v.as_str()).unwrap_or("?").to_string();
        *attempts.entry(format!("{} {}", field("channel"), field("outcome"))).or_default() += 1;
    }
    let contacts = if attempts.is_empty() {
        "none".to_string()
    } else {
        attempts.iter().map(|(k, n)| format!("{k} ×{n}")).collect::<Vec<_>>().join(", ")
    };
    format!(
        "\nfollow-up\n  other channels   {contacts}\n  reminders        {}\n  released         {}\n",
        count(Event::Reminded),
        count(Event::AckExpired)
    )
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
