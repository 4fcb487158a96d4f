//! Checks of the deployment and monitoring files (deploy/, systemd/) against the
//! code and the contract. No Docker engine, Prometheus or Grafana runs here:
//!
//! - the Grafana dashboard is parsed (serde_json); every metric its PromQL uses
//!   must be a constant of `src/telemetry.rs` (read as text), and every metric the
//!   contract (§6) requires must be on it;
//! - the alert rules are read line by line (no YAML crate) for the required
//!   alerts, their `for`, severity label and annotations;
//! - when `promtool` is on PATH: `promtool check rules` on the alerts,
//!   `promtool check config` on prometheus.yml (which loads the rules relative to
//!   itself), `promtool test rules` on alerts_test.yml, and every dashboard query
//!   parsed as a recording rule. Without promtool these print a note and pass;
//! - when `systemd-analyze` is on PATH: `systemd-analyze verify` on a copy of
//!   systemd/dispatchd.service whose /usr/local/bin/dispatchd paths point at the
//!   binary cargo built (User=/Group= are dropped when that user or group does
//!   not exist here, so the check does not depend on the machine's accounts);
//! - the Dockerfile and compose file by string checks;
//! - when python3 with PyYAML is there, every YAML file parses and compose.yaml
//!   has the expected structure.
//!
//! deploy/test installs promtool (Debian package `prometheus`) and systemd when
//! they are missing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let p = root().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

/// `pub const NAME: &str = "value";` inside `pub mod metric { … }` of src/telemetry.rs.
fn telemetry_metrics() -> BTreeMap<String, String> {
    let text = read("src/telemetry.rs");
    let start = text.find("pub mod metric").expect("src/telemetry.rs has a `pub mod metric`");
    let body = &text[start..];
    let end = body.find("\n}").expect("end of `mod metric`");
    let mut out = BTreeMap::new();
    for line in body[..end].lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("pub const ") else { continue };
        let Some((name, rest)) = rest.split_once(':') else { continue };
        let Some(q1) = rest.find('"') else { continue };
        let Some(q2) = rest[q1 + 1..].find('"') else { continue };
        out.insert(name.trim().to_string(), rest[q1 + 1..q1 + 1 + q2].to_string());
    }
    assert!(out.len() >= 10, "too few metric constants found in src/telemetry.rs: {out:?}");
    out
}

fn metric_names() -> BTreeSet<String> {
    telemetry_metrics().into_values().collect()
}

/// Histograms: the recorder gives buckets to every metric ending in `_seconds`.
fn is_histogram(name: &str) -> bool {
    name.ends_with("_seconds")
}

/// Contract §6 "Metrics that must exist". Used when ../shared is not beside the repo.
const CONTRACT_METRICS_FALLBACK: &[&str] = &[
    "dispatchd_sip_requests_total",
    "dispatchd_sip_responses_total",
    "dispatchd_incidents_opened_total",
    "dispatchd_queue_depth",
    "dispatchd_dispatch_offers_total",
    "dispatchd_call_to_offer_seconds",
    "dispatchd_offer_to_ack_seconds",
    "dispatchd_escalations_total",
    "dispatchd_responders_connected",
    "dispatchd_redis_errors_total",
];

fn contract_metrics() -> BTreeSet<String> {
    let path = root().join("../shared/design/contract.md");
    let Ok(text) = std::fs::read_to_string(&path) else {
        eprintln!("note: {} not found; using the contract's metric list as of v1", path.display());
        return CONTRACT_METRICS_FALLBACK.iter().map(|s| s.to_string()).collect();
    };
    let start = text.find("Metrics that must exist").expect("contract §6 lists the metrics that must exist");
    let section = &text[start..];
    let end = section.find("\n## ").unwrap_or(section.len());
    let names: BTreeSet<String> = promql_names(&section[..end]).into_iter().collect();
    for m in CONTRACT_METRICS_FALLBACK {
        assert!(names.contains(*m), "the contract no longer lists {m}: update this test");
    }
    names
}

/// Every identifier starting with `dispatchd_` in a text (PromQL or prose).
fn promql_names(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_alphabetic() || c == b'_' {
            let s = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b':') {
                i += 1;
            }
            let word = &text[s..i];
            if word.starts_with("dispatchd_") {
                out.push(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    out
}

/// The metric a series name belongs to: `x_seconds_bucket` → `x_seconds`.
fn base_metric(series: &str, known: &BTreeSet<String>) -> String {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = series.strip_suffix(suffix)
            && known.contains(base)
            && is_histogram(base)
        {
            return base.to_string();
        }
    }
    series.to_string()
}

// ---------------------------------------------------------------- dashboard

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read("deploy/grafana/dispatchd-dashboard.json")).expect("the dashboard is valid JSON")
}

/// All panels, rows' nested panels included.
fn all_panels(dash: &serde_json::Value) -> Vec<&serde_json::Value> {
    fn walk<'a>(panels: &'a serde_json::Value, out: &mut Vec<&'a serde_json::Value>) {
        for p in panels.as_array().into_iter().flatten() {
            out.push(p);
            if let Some(inner) = p.get("panels") {
                walk(inner, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dash["panels"], &mut out);
    out
}

/// Every `expr` of every panel target.
fn dashboard_exprs(dash: &serde_json::Value) -> Vec<String> {
    all_panels(dash)
        .into_iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect()
}

/// Grafana's variables replaced so that promtool can parse the query.
fn concrete(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace("$instance", ".*")
}

#[test]
fn dashboard_uses_only_metrics_that_exist_and_covers_the_contract() {
    let dash = dashboard();
    let known = metric_names();
    let exprs = dashboard_exprs(&dash);
    assert!(exprs.len() >= 15, "the dashboard has only {} queries", exprs.len());

    let mut used = BTreeSet::new();
    for e in &exprs {
        for series in promql_names(e) {
            let base = base_metric(&series, &known);
            assert!(
                known.contains(&base),
                "dashboard query uses {series}, which is not a metric of src/telemetry.rs:\n  {e}"
            );
            if series != base {
                assert!(series.ends_with("_bucket") || series.ends_with("_sum") || series.ends_with("_count"));
            } else {
                assert!(!is_histogram(&base) || e.contains("histogram_quantile"), "histogram {base} used raw: {e}");
            }
            if base.ends_with("_total") {
                assert!(e.contains("rate(") || e.contains("increase("), "counter {base} without rate/increase: {e}");
            }
            used.insert(base);
        }
    }
    // Variables' queries must name real metrics too.
    for v in dash["templating"]["list"].as_array().into_iter().flatten() {
        for field in [&v["definition"], &v["query"]["query"]] {
            for series in field.as_str().map(promql_names).unwrap_or_default() {
                assert!(known.contains(&series), "dashboard variable uses unknown metric {series}");
            }
        }
    }

    for m in contract_metrics() {
        assert!(used.contains(&m), "contract metric {m} is not on the dashboard");
    }
    let unused: Vec<_> = known.difference(&used).collect();
    if !unused.is_empty() {
        eprintln!("note: metrics of src/telemetry.rs not on the dashboard: {unused:?}");
    }
}

#[test]
fn dashboard_has_the_views_ops_asked_for() {
    let dash = dashboard();
    let exprs = dashboard_exprs(&dash);
    let has = |needles: &[&str]| exprs.iter().any(|e| needles.iter().all(|n| e.contains(n)));
    let m = telemetry_metrics();
    let name = |k: &str| m.get(k).unwrap_or_else(|| panic!("no metric::{k}")).clone();

    for (metric, label) in [
        ("SIP_REQUESTS", "method"),
        ("SIP_RESPONSES", "status"),
        ("INCIDENTS_OPENED", "severity"),
        ("INCIDENTS_OPENED", "category"),
        ("QUEUE_DEPTH", "severity"),
        ("DISPATCH_OFFERS", "outcome"),
        ("ESCALATIONS", "severity"),
        ("SIP_DROPPED", "reason"),
    ] {
        let n = name(metric);
        assert!(has(&[&n, &format!("by ({label})")]), "no panel of {n} by {label}");
    }
    for metric in ["CALL_TO_OFFER", "OFFER_TO_ACK"] {
        let bucket = format!("{}_bucket", name(metric));
        for q in ["histogram_quantile(0.5,", "histogram_quantile(0.99,"] {
            assert!(has(&[q, &bucket, "by (le)"]), "no {q} over {bucket}");
        }
    }
    for metric in ["RESPONDERS_CONNECTED", "REDIS_ERRORS", "REDIS_UP"] {
        let n = name(metric);
        assert!(has(&[&n]), "{n} is not on the dashboard");
    }
    // Queue depth comes from the shared Redis: every daemon reports the same value.
    let depth = name("QUEUE_DEPTH");
    for e in exprs.iter().filter(|e| e.contains(&depth)) {
        assert!(!e.contains("sum"), "summing {depth} over daemons counts each incident once per daemon: {e}");
    }
}

#[test]
fn dashboard_panels_are_well_formed() {
    let dash = dashboard();
    assert_eq!(dash["uid"], "dispatchd");
    assert!(dash["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36));
    let vars: Vec<&str> =
        dash["templating"]["list"].as_array().unwrap().iter().filter_map(|v| v["name"].as_str()).collect();
    assert!(vars.contains(&"datasource") && vars.contains(&"instance"), "variables: {vars:?}");

    let mut ids = BTreeSet::new();
    for p in all_panels(&dash) {
        let id = p["id"].as_u64().expect("every panel has an id");
        assert!(ids.insert(id), "panel id {id} used twice");
        let kind = p["type"].as_str().expect("panel type");
        let title = p["title"].as_str().expect("panel title");
        let g = &p["gridPos"];
        for k in ["h", "w", "x", "y"] {
            assert!(g[k].is_u64(), "panel {title}: gridPos.{k}");
        }
        assert!(g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24, "panel {title} is wider than the grid");
        if kind == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {title} does not use the datasource variable");
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("panel {title} has no targets"));
        assert!(!targets.is_empty(), "panel {title} has no targets");
        let mut refs = BTreeSet::new();
        for t in targets {
            let expr = t["expr"].as_str().unwrap_or_else(|| panic!("panel {title}: target without expr"));
            assert!(
                expr.contains("job=\"dispatchd\""),
                "panel {title}: query not limited to job=\"dispatchd\": {expr}"
            );
            assert!(refs.insert(t["refId"].as_str().unwrap().to_string()), "panel {title}: refId twice");
        }
    }
}

// ---------------------------------------------------------------- alert rules

/// `- alert: Name` blocks of alerts.yml: name → the block's lines.
fn alert_blocks(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let t = line.trim_start();
        if let Some(name) = t.strip_prefix("- alert:") {
            let name = name.trim().to_string();
            assert!(!out.contains_key(&name), "alert {name} defined twice");
            out.insert(name.clone(), Vec::new());
            current = Some(name);
        } else if t.starts_with("- record:") || t.starts_with("- name:") {
            current = None;
        } else if let Some(c) = &current {
            out.get_mut(c).unwrap().push(line.to_string());
        }
    }
    out
}

fn block_value<'a>(block: &'a [String], key: &str) -> Option<&'a str> {
    block.iter().find_map(|l| l.trim_start().strip_prefix(key).map(str::trim))
}

#[test]
fn alert_rules_cover_the_required_conditions() {
    let text = read("deploy/prometheus/alerts.yml");
    assert!(text.lines().any(|l| l.trim_end() == "groups:"), "alerts.yml has no groups:");
    assert!(!text.contains('\t'), "tabs in YAML");
    let blocks = alert_blocks(&text);
    assert!(blocks.len() >= 5, "alerts: {:?}", blocks.keys());

    for (name, block) in &blocks {
        let body = block.join("\n");
        assert!(block_value(block, "expr:").is_some(), "{name}: no expr");
        let sev = block_value(block, "severity:").unwrap_or_else(|| panic!("{name}: no severity label"));
        assert!(["critical", "warning", "info"].contains(&sev), "{name}: severity {sev}");
        assert!(body.contains("labels:") && body.contains("annotations:"), "{name}: labels and annotations");
        for a in ["summary:", "description:"] {
            assert!(block_value(block, a).is_some(), "{name}: no {a} annotation");
        }
    }

    // (what the expression must contain, its `for`) for each required condition.
    let required: &[(&str, &[&str], Option<&str>)] = &[
        ("no responder connected", &["dispatchd_responders_connected", "== 0"], Some("5m")),
        ("critical queued", &["dispatchd_queue_depth", "severity=\"critical\"", "> 0"], Some("1m")),
        (
            "offers exhausted",
            &["increase(dispatchd_dispatch_offers_total", "outcome=\"exhausted\"", "[10m]", "> 0"],
            None,
        ),
        ("redis errors", &["rate(dispatchd_redis_errors_total", "[5m]", "> 0"], None),
        ("redis down", &["dispatchd_redis_up", "== 0"], None),
        ("readiness: scrape down", &["up{job=\"dispatchd\"} == 0"], None),
        ("readiness: /readyz probe", &["probe_success", "== 0"], None),
    ];
    for (what, needles, want_for) in required {
        let found = blocks.iter().find(|(_, b)| {
            let body = b.join("\n");
            needles.iter().all(|n| body.contains(n))
        });
        let (name, block) = found.unwrap_or_else(|| panic!("no alert for {what} (needs {needles:?})"));
        if let Some(f) = want_for {
            assert_eq!(block_value(block, "for:"), Some(*f), "{name} ({what}) must wait {f}");
        }
    }

    let known = metric_names();
    for series in promql_names(&text) {
        assert!(known.contains(&base_metric(&series, &known)), "alerts.yml uses unknown metric {series}");
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().map(|o| o.status.success()).unwrap_or(false)
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{text}", out.status);
    text
}

#[test]
fn alert_rules_and_prometheus_config_pass_promtool() {
    if !have("promtool") {
        eprintln!("note: promtool not installed (Debian package `prometheus`); skipping promtool checks");
        return;
    }
    let dir = root().join("deploy/prometheus");
    let out = run_ok(Command::new("promtool").arg("check").arg("rules").arg(dir.join("alerts.yml")));
    assert!(out.contains("SUCCESS"), "{out}");
    // rule_files in prometheus.yml are relative to the file itself: check from elsewhere.
    let out =
        run_ok(Command::new("promtool").arg("check").arg("config").arg(dir.join("prometheus.yml")).current_dir("/"));
    assert!(out.contains("alerts.yml") && out.contains("SUCCESS"), "the config did not load alerts.yml:\n{out}");
    let out = run_ok(Command::new("promtool").arg("test").arg("rules").arg(dir.join("alerts_test.yml")));
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn dashboard_queries_parse_with_promtool() {
    if !have("promtool") {
        eprintln!("note: promtool not installed; dashboard queries not parsed");
        return;
    }
    let dash = dashboard();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in dashboard_exprs(&dash).iter().enumerate() {
        let expr = concrete(e).replace('\'', "''");
        rules.push_str(&format!("      - record: dashboard:query_{i}\n        expr: '{expr}'\n"));
    }
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("dashboard_rules.yml");
    std::fs::write(&file, rules).unwrap();
    run_ok(Command::new("promtool").arg("check").arg("rules").arg(&file));
}

// ---------------------------------------------------------------- systemd

fn account_exists(file: &str, name: &str) -> bool {
    std::fs::read_to_string(file).map(|t| t.lines().any(|l| l.split(':').next() == Some(name))).unwrap_or(false)
}

#[test]
fn systemd_unit_has_the_required_directives() {
    let unit = read("systemd/dispatchd.service");
    let has = |line: &str| unit.lines().any(|l| l.trim() == line);
    let starts = |prefix: &str| unit.lines().any(|l| l.trim().starts_with(prefix));
    for line in ["[Service]", "Type=notify", "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes"] {
        assert!(has(line), "dispatchd.service lacks {line}");
    }
    for prefix in ["WatchdogSec=", "User=", "ExecStart=", "ExecStartPre=", "ExecReload="] {
        assert!(starts(prefix), "dispatchd.service lacks {prefix}");
    }
    let pre = unit.lines().find(|l| l.starts_with("ExecStartPre=")).unwrap();
    assert!(pre.contains("dispatchd check-config"), "{pre}");
    let reload = unit.lines().find(|l| l.starts_with("ExecReload=")).unwrap();
    assert!(reload.contains("HUP"), "{reload}");
    let start = unit.lines().find(|l| l.starts_with("ExecStart=")).unwrap();
    assert!(start.contains("dispatchd run"), "{start}");
}

#[test]
fn systemd_unit_verifies() {
    if !have("systemd-analyze") {
        eprintln!("note: systemd-analyze not installed; the unit is not verified");
        return;
    }
    let bin = env!("CARGO_BIN_EXE_dispatchd");
    let unit = read("systemd/dispatchd.service");
    let mut copy = String::new();
    let mut notes = Vec::new();
    for line in unit.lines() {
        let key = line.split('=').next().unwrap_or("").trim();
        // The machine's accounts are not the unit's business here.
        if key == "User" || key == "Group" {
            let name = line.split_once('=').map(|(_, v)| v.trim()).unwrap_or("");
            let file = if key == "User" { "/etc/passwd" } else { "/etc/group" };
            if !account_exists(file, name) {
                notes.push(format!("dropped {line} (no such account here)"));
                continue;
            }
        }
        let mut line = line.replace("/usr/local/bin/dispatchd", bin);
        // Other absolute executables (ExecReload=/bin/kill) must exist for verify;
        // where one does not, it is replaced by the binary (verify only checks
        // that it is executable).
        if key.starts_with("Exec") {
            let value = line.split_once('=').map(|(_, v)| v.to_string()).unwrap_or_default();
            let exe =
                value.trim_start_matches(['-', '@', ':', '+', '!']).split_whitespace().next().unwrap_or("").to_string();
            if exe.starts_with('/') && !Path::new(&exe).exists() {
                notes.push(format!("{exe} does not exist here; {key} points at the binary for the check"));
                line = line.replacen(&exe, bin, 1);
            }
        }
        copy.push_str(&line);
        copy.push('\n');
    }
    for n in &notes {
        eprintln!("note: {n}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("dispatchd.service");
    std::fs::write(&path, &copy).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().expect("run systemd-analyze");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "systemd-analyze verify failed:\n{text}\n--- unit as verified:\n{copy}");
    // Unknown keys and unparsable values are only warnings ("…:LINE: …, ignoring"): fail on them too.
    let prefix = format!("{}:", path.display());
    let complaints: Vec<&str> = text.lines().filter(|l| l.starts_with(&prefix)).collect();
    assert!(complaints.is_empty(), "systemd-analyze verify complains about the unit:\n{}", complaints.join("\n"));
}

// ---------------------------------------------------------------- Dockerfile

/// Dockerfile instructions with line continuations joined, comments dropped.
fn dockerfile_instructions(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if cur.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if let Some(stripped) = t.strip_suffix('\\') {
            cur.push_str(stripped);
            cur.push(' ');
        } else {
            cur.push_str(t);
            out.push(std::mem::take(&mut cur));
        }
    }
    out
}

fn keyword(instr: &str) -> String {
    instr.split_whitespace().next().unwrap_or("").to_ascii_uppercase()
}

#[test]
fn dockerfile_is_multistage_nonroot_with_a_working_healthcheck() {
    let instrs = dockerfile_instructions(&read("deploy/Dockerfile"));
    let froms: Vec<(usize, &String)> = instrs.iter().enumerate().filter(|(_, i)| keyword(i) == "FROM").collect();
    assert!(froms.len() >= 2, "not multi-stage: {froms:?}");
    let first = froms[0].1.to_ascii_lowercase();
    assert!(first.contains("rust:") && first.ends_with(" as builder"), "first stage: {first}");
    let (last_at, last) = *froms.last().unwrap();
    let last = last.to_ascii_lowercase();
    assert!(last.contains("debian:") && last.contains("-slim"), "runtime stage is not slim Debian: {last}");
    let runtime: Vec<&String> = instrs[last_at..].iter().collect();
    let find = |kw: &str| runtime.iter().filter(|i| keyword(i) == kw).map(|s| s.as_str()).collect::<Vec<_>>();

    // Only the binary comes from the builder.
    let from_builder = find("COPY").into_iter().filter(|c| c.contains("--from=")).collect::<Vec<_>>();
    assert!(!from_builder.is_empty() && from_builder.iter().all(|c| c.contains("--from=builder")), "{from_builder:?}");
    assert!(from_builder.iter().any(|c| c.ends_with("/usr/local/bin/dispatchd")), "{from_builder:?}");
    assert!(
        find("COPY").iter().any(|c| c.ends_with("/etc/dispatchd/dispatchd.toml")),
        "no configuration at /etc/dispatchd/dispatchd.toml"
    );

    let users = find("USER");
    let user = users.last().expect("no USER in the runtime stage");
    let who = user.split_whitespace().nth(1).unwrap().split(':').next().unwrap();
    assert!(who != "root" && who != "0", "runs as root: {user}");

    let expose: BTreeSet<&str> = find("EXPOSE").iter().flat_map(|e| e.split_whitespace().skip(1)).collect();
    for port in ["5060/udp", "5060/tcp", "8080", "9090"] {
        assert!(expose.contains(port), "EXPOSE lacks {port}: {expose:?}");
    }
    let entry = find("ENTRYPOINT").last().copied().expect("no ENTRYPOINT").to_string();
    assert!(entry.contains("dispatchd\"") && entry.contains("\"run\""), "{entry}");

    // HEALTHCHECK on /readyz with a tool the runtime image has.
    let hc = find("HEALTHCHECK").last().copied().expect("no HEALTHCHECK").to_string();
    assert!(hc.contains("/readyz"), "{hc}");
    let cmd = hc.split_once(" CMD ").map(|(_, c)| c.trim()).expect("HEALTHCHECK … CMD …");
    let tool = if let Some(exec) = cmd.strip_prefix('[') {
        exec.split('"').nth(1).unwrap_or("").to_string()
    } else {
        cmd.split_whitespace().next().unwrap_or("").to_string()
    };
    let in_slim = ["bash", "sh", "/bin/sh", "/bin/bash"].contains(&tool.as_str());
    let installed = find("RUN").iter().any(|r| r.contains("apt-get install") && r.contains(tool.as_str()));
    assert!(in_slim || installed, "HEALTHCHECK uses {tool}, which the runtime stage does not have");
    // The probe's port is the ops plane's port in the image.
    let env = find("ENV").join(" ");
    assert!(env.contains("DISPATCHD__HTTP__LISTEN=0.0.0.0:9090"), "{env}");
    assert!(hc.contains("/dev/tcp/127.0.0.1/9090") || hc.contains("127.0.0.1:9090"), "{hc}");

    // What it copies exists, and the ignore file lets it through.
    let ignore = read("deploy/Dockerfile.dockerignore");
    for c in instrs.iter().filter(|i| keyword(i) == "COPY" && !i.contains("--from=")) {
        let parts: Vec<&str> = c.split_whitespace().skip(1).filter(|p| !p.starts_with("--")).collect();
        for src in &parts[..parts.len() - 1] {
            assert!(root().join(src).exists(), "COPY source {src} does not exist");
            let top = src.split('/').next().unwrap();
            assert!(
                ignore.lines().any(|l| l.trim() == format!("!{top}") || l.trim() == format!("!{top}/")),
                "Dockerfile.dockerignore does not let {top} into the context"
            );
        }
    }

    // The ports match the example configuration it ships.
    let config = read("config/dispatchd.toml");
    for (key, port) in [("udp = \"0.0.0.0:5060\"", "5060"), ("listen = \"0.0.0.0:8080\"", "8080")] {
        assert!(config.contains(key), "config/dispatchd.toml no longer has {key}: update EXPOSE {port}");
    }
}

// ---------------------------------------------------------------- compose

#[test]
fn compose_file_runs_redis_with_aof_and_loads_the_monitoring_files() {
    let compose = read("deploy/compose.yaml");
    assert!(!compose.contains('\t'), "tabs in YAML");
    for needle in [
        "services:",
        "  redis:",
        "  dispatchd:",
        "  prometheus:",
        "  grafana:",
        "\"--appendonly\", \"yes\"",
        "\"--appendfsync\", \"everysec\"",
        "redis-data:/data",
        "dockerfile: deploy/Dockerfile",
        "DISPATCHD__REDIS__URL: redis://redis:6379/0",
        "./prometheus:/etc/prometheus",
        "./grafana/dispatchd-dashboard.json:",
        "./grafana/provisioning:/etc/grafana/provisioning",
        "\"5060:5060/udp\"",
        "\"5060:5060/tcp\"",
    ] {
        assert!(compose.contains(needle), "compose.yaml lacks {needle:?}");
    }
    // Every host path it mounts exists (relative to deploy/).
    let deploy = root().join("deploy");
    for line in compose.lines() {
        let t = line.trim().trim_start_matches("- ").trim_matches('"');
        if t.starts_with("./") || t.starts_with("../") {
            let host = t.split(':').next().unwrap();
            assert!(deploy.join(host).exists(), "compose.yaml mounts {host}, which does not exist");
        }
    }
    // prometheus.yml scrapes the compose service and loads the rules beside it.
    let prom = read("deploy/prometheus/prometheus.yml");
    for needle in
        ["rule_files:", "- alerts.yml", "job_name: dispatchd", "\"dispatchd:9090\"", "job_name: dispatchd-readyz"]
    {
        assert!(prom.contains(needle), "prometheus.yml lacks {needle:?}");
    }
    let ds = read("deploy/grafana/provisioning/datasources/prometheus.yml");
    assert!(ds.contains("url: http://prometheus:9090") && ds.contains("uid: prometheus"), "{ds}");
    let dash = dashboard();
    let default_ds = dash["templating"]["list"][0]["current"]["value"].as_str();
    assert_eq!(default_ds, Some("prometheus"), "the dashboard's default data source is the provisioned one");
}

#[test]
fn yaml_files_parse_and_compose_has_the_expected_shape() {
    let probe = Command::new("python3").args(["-c", "import yaml"]).output();
    if !probe.map(|o| o.status.success()).unwrap_or(false) {
        eprintln!("note: python3 with PyYAML not available; YAML files checked by string only");
        return;
    }
    let script = r#"
import sys, yaml
root = sys.argv[1]
def load(p):
    with open(root + "/" + p) as f:
        return yaml.safe_load(f)
for p in ["deploy/prometheus/alerts.yml", "deploy/prometheus/alerts_test.yml",
          "deploy/prometheus/prometheus.yml",
          "deploy/grafana/provisioning/datasources/prometheus.yml",
          "deploy/grafana/provisioning/dashboards/dispatchd.yml"]:
    assert load(p), p
c = load("deploy/compose.yaml")
s = c["services"]
assert set(["redis", "dispatchd", "prometheus", "grafana"]) <= set(s), s.keys()
cmd = s["redis"]["command"]
assert cmd[cmd.index("--appendonly") + 1] == "yes", cmd
assert cmd[cmd.index("--appendfsync") + 1] == "everysec", cmd
assert any(v.endswith(":/data") for v in s["redis"]["volumes"]), s["redis"]["volumes"]
named = set(c.get("volumes") or {})
for name, svc in s.items():
    for v in svc.get("volumes", []):
        src = v.split(":")[0]
        if not src.startswith("."):
            assert src in named, (name, src)
d = s["dispatchd"]
assert d["build"]["dockerfile"] == "deploy/Dockerfile"
assert d["depends_on"]["redis"]["condition"] == "service_healthy"
for opt in ("prometheus", "grafana"):
    assert "monitoring" in s[opt].get("profiles", []), opt
ha = load("deploy/compose.ha.yaml")["services"]
assert set(["redis", "redis-replica-1", "redis-replica-2", "sentinel-1", "sentinel-2", "sentinel-3", "dispatchd"]) <= set(ha), ha.keys()
for r in ("redis-replica-1", "redis-replica-2"):
    cmd = ha[r]["command"]
    assert cmd[cmd.index("--replicaof") + 1] == "redis", cmd
for r in ("redis", "redis-replica-1", "redis-replica-2"):
    cmd = ha[r]["command"]
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction", cmd
    assert cmd[cmd.index("--appendonly") + 1] == "yes", cmd
for s_ in ("sentinel-1", "sentinel-2", "sentinel-3"):
    script = " ".join(ha[s_]["command"])
    assert "sentinel monitor dispatchd redis 6379 2" in script and "--sentinel" in script, script
env = ha["dispatchd"]["environment"]
assert env["DISPATCHD__REDIS__SENTINELS"] == "sentinel-1:26379,sentinel-2:26379,sentinel-3:26379", env
assert env["DISPATCHD__REDIS__MASTER_NAME"] == "dispatchd" and env["DISPATCHD__REDIS__MIN_REPLICAS_ACK"] == "1", env
rules = load("deploy/prometheus/alerts.yml")
for g in rules["groups"]:
    for r in g["rules"]:
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r
        assert r["annotations"]["summary"] and r["annotations"]["description"], r
print("yaml ok")
"#;
    let out = Command::new("python3").args(["-c", script, root().to_str().unwrap()]).output().expect("python3");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("yaml ok"), "{text}");
}
