//! End-to-end SIP flows (contract §3 and §5): real `sipp` against the real
//! daemon and a real Redis, each flow over UDP and over TCP.
//!
//! Every test starts its own Redis and daemon, so tests may run in parallel.
//! Nothing here depends on timing: whatever the daemon records after it has
//! answered (CANCEL/BYE outcomes) is polled for with a generous timeout.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// How long to wait for something the daemon records after answering.
const SETTLE: Duration = Duration::from_secs(10);

/// A daemon and the Redis it uses; the daemon is dropped (killed) first.
struct Line {
    d: Daemon,
    _redis: Redis,
}

fn line(mode: &'static str) -> Line {
    let redis = Redis::start();
    let d = Daemon::start(&redis, Options { mode, ..Default::default() });
    Line { d, _redis: redis }
}

/// Runs a scenario that must succeed and must log exactly one incident id.
fn run_call(d: &Daemon, scenario_file: &str, transport: &str) -> String {
    let run = sipp(d, scenario_file, transport, &[]);
    assert!(run.ok, "sipp {scenario_file} over {transport} failed:\n{}", run.output);
    let ids = logged_ids(&run);
    assert_eq!(ids.len(), 1, "{scenario_file} over {transport}: expected one logged id, got {ids:?}\n{}", run.output);
    let id = ids.into_iter().next().unwrap();
    assert!(id.starts_with("INC-"), "incident id {id:?}");
    id
}

/// Lines `<prefix><value>` that a scenario wrote with `<log>`, as values.
fn logged(run: &SippRun, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(run.dir.path()).unwrap().flatten() {
        if e.file_name().to_string_lossy().ends_with("_logs.log") {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            out.extend(text.lines().filter_map(|l| l.trim().strip_prefix(prefix)).map(str::to_string));
        }
    }
    out
}

fn timeline(rec: &Value) -> &Vec<Value> {
    rec["timeline"].as_array().unwrap_or_else(|| panic!("record without a timeline: {rec:#}"))
}

fn events(rec: &Value) -> Vec<String> {
    timeline(rec).iter().map(|e| e["event"].as_str().unwrap_or("").to_string()).collect()
}

/// Index of the first timeline entry named `event`.
fn position(rec: &Value, event: &str) -> Option<usize> {
    timeline(rec).iter().position(|e| e["event"] == event)
}

fn entry<'a>(rec: &'a Value, event: &str) -> &'a Value {
    let i = position(rec, event).unwrap_or_else(|| panic!("no {event:?} in timeline {:?}\n{rec:#}", events(rec)));
    &timeline(rec)[i]
}

/// Polls the record until its timeline has `event`; returns that record.
fn wait_for_event(d: &Daemon, id: &str, event: &str) -> Value {
    let end = Instant::now() + SETTLE;
    loop {
        let rec = d.incident(id);
        if position(&rec, event).is_some() {
            return rec;
        }
        if Instant::now() > end {
            panic!("timeline of {id} never got {event:?}; it has {:?}\n{rec:#}", events(&rec));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ivr_path(rec: &Value) -> Vec<String> {
    rec["ivr_path"]
        .as_array()
        .unwrap_or_else(|| panic!("ivr_path is not an array: {rec:#}"))
        .iter()
        .map(|s| s.as_str().expect("ivr_path entries are strings").to_string())
        .collect()
}

/// RFC 3339, UTC, milliseconds: `2026-11-23T10:15:02.113Z`.
fn assert_timestamp(what: &str, v: &Value) {
    let s = v.as_str().unwrap_or_else(|| panic!("{what} is not a string: {v}"));
    let pattern = "dddd-dd-ddTdd:dd:dd.dddZ";
    let shape_ok = s.len() == pattern.len()
        && s.bytes().zip(pattern.bytes()).all(|(c, p)| if p == b'd' { c.is_ascii_digit() } else { c == p });
    assert!(shape_ok, "{what} {s:?} is not an RFC 3339 UTC timestamp with milliseconds");
    assert!(chrono::DateTime::parse_from_rfc3339(s).is_ok(), "{what} {s:?} does not parse as RFC 3339");
}

/// The entry `end` (abandoned, answered_elsewhere, caller_hangup) carries the seconds rung.
fn assert_call_end(rec: &Value, end: &str) {
    let e = entry(rec, end);
    assert_eq!(e["actor"], "sip", "{e}");
    let rung = e["detail"]["rung_s"].as_f64().unwrap_or_else(|| panic!("{end} without a numeric rung_s: {e}"));
    assert!((0.0..120.0).contains(&rung), "{end}: implausible rung_s {rung}");
    assert_timestamp(&format!("{end}.at"), &e["at"]);
    for other in ["abandoned", "answered_elsewhere", "caller_hangup"] {
        if other != end {
            assert!(position(rec, other).is_none(), "{end} and {other} both recorded: {:?}", events(rec));
        }
    }
}

/// The INFO digit 3 after X-IVR-Path 2,1: path 2,1,3, reclassified as gas/critical,
/// with `ivr_input` (digit 3) followed by a `classified` entry.
fn assert_digit_applied(rec: &Value) {
    assert_eq!(ivr_path(rec), ["2", "1", "3"], "{rec:#}");
    assert_eq!(rec["category"], "gas", "{rec:#}");
    assert_eq!(rec["severity"], "critical", "{rec:#}");
    let tl = timeline(rec);
    let input = position(rec, "ivr_input").unwrap_or_else(|| panic!("no ivr_input: {:?}", events(rec)));
    assert_eq!(tl[input]["detail"]["digit"], "3", "{}", tl[input]);
    assert_eq!(tl[input]["actor"], "sip", "{}", tl[input]);
    let reclassified = tl[input + 1..]
        .iter()
        .find(|e| e["event"] == "classified")
        .unwrap_or_else(|| panic!("no classified after ivr_input: {:?}", events(rec)));
    assert_eq!(reclassified["detail"]["category"], "gas", "{reclassified}");
    assert_eq!(reclassified["detail"]["severity"], "critical", "{reclassified}");
}

fn assert_opened_queued(rec: &Value) {
    let ev = events(rec);
    assert!(ev.len() >= 3 && ev[..3] == ["opened", "classified", "queued"], "timeline starts {ev:?}");
    for (i, e) in timeline(rec).iter().enumerate() {
        assert_timestamp(&format!("timeline[{i}].at"), &e["at"]);
    }
    assert_timestamp("opened_at", &rec["opened_at"]);
}

// ---- 1. decline ------------------------------------------------------------

fn decline(transport: &str) {
    let l = line("decline");
    let id = run_call(&l.d, "decline_uac.xml", transport);
    let rec = l.d.incident(&id);
    assert_eq!(rec["id"], id.as_str());
    assert_eq!(rec["state"], "queued", "{rec:#}");
    assert_eq!(rec["severity"], "critical", "{rec:#}");
    assert_eq!(rec["category"], "outage", "{rec:#}");
    assert_eq!(ivr_path(&rec), ["2", "1"], "{rec:#}");
    assert_eq!(rec["queue"], "support", "{rec:#}");
    assert_eq!(rec["wait_seconds"], 45, "{rec:#}");
    assert_eq!(rec["caller"], "+442071234890", "{rec:#}");
    assert_eq!(rec["caller_name"], "Alice Smith", "{rec:#}");
    assert_eq!(rec["source"], "sip", "{rec:#}");
    assert!(rec["call_id"].as_str().is_some_and(|c| !c.is_empty()), "{rec:#}");
    assert!(rec["summary"].as_str().is_some_and(|s| !s.is_empty()), "{rec:#}");
    assert!(rec["assigned_to"].is_null(), "{rec:#}");
    assert_eq!(rec["attempts"], 0, "{rec:#}");
    assert_eq!(rec["exhausted"], false, "{rec:#}");
    assert_opened_queued(&rec);
    assert_eq!(entry(&rec, "opened")["actor"], "sip");

    let m = l.d.metrics();
    assert!(metric_value(&m, "dispatchd_sip_requests_total", "method=\"INVITE\"") >= 1.0, "{m}");
    assert!(metric_value(&m, "dispatchd_sip_requests_total", "method=\"ACK\"") >= 1.0, "{m}");
    assert!(metric_value(&m, "dispatchd_sip_responses_total", "status=\"603\"") >= 1.0, "{m}");
    assert!(metric_value(&m, "dispatchd_incidents_opened_total", "severity=\"critical\"") >= 1.0, "{m}");
}

#[test]
fn decline_udp() {
    decline("u1");
}

#[test]
fn decline_tcp() {
    decline("t1");
}

// ---- 2. shadow: INFO (dtmf-relay) then CANCEL without Reason → abandoned ----

fn shadow_relay_cancel(transport: &str) {
    let l = line("shadow");
    let id = run_call(&l.d, "shadow_relay_cancel_uac.xml", transport);
    let rec = wait_for_event(&l.d, &id, "abandoned");
    assert_opened_queued(&rec);
    assert_digit_applied(&rec);
    assert_call_end(&rec, "abandoned");
    assert!(position(&rec, "ivr_input") < position(&rec, "abandoned"), "{:?}", events(&rec));

    let m = l.d.metrics();
    assert!(metric_value(&m, "dispatchd_sip_requests_total", "method=\"INVITE\"") >= 1.0, "{m}");
    assert!(metric_value(&m, "dispatchd_sip_requests_total", "method=\"INFO\"") >= 1.0, "{m}");
    assert!(metric_value(&m, "dispatchd_sip_requests_total", "method=\"CANCEL\"") >= 1.0, "{m}");
    assert!(metric_value(&m, "dispatchd_sip_responses_total", "status=\"180\"") >= 1.0, "{m}");
    assert!(metric_value(&m, "dispatchd_sip_responses_total", "status=\"487\"") >= 1.0, "{m}");
    assert!(metric_value(&m, "dispatchd_incidents_opened_total", "severity=\"critical\"") >= 1.0, "{m}");
}

#[test]
fn shadow_info_relay_then_cancel_is_abandoned_udp() {
    shadow_relay_cancel("u1");
}

#[test]
fn shadow_info_relay_then_cancel_is_abandoned_tcp() {
    shadow_relay_cancel("t1");
}

// ---- 3. shadow: INFO (application/dtmf) then CANCEL with Reason cause=200 ----

fn shadow_dtmf_elsewhere(transport: &str) {
    let l = line("shadow");
    let id = run_call(&l.d, "shadow_dtmf_elsewhere_uac.xml", transport);
    let rec = wait_for_event(&l.d, &id, "answered_elsewhere");
    assert_opened_queued(&rec);
    assert_digit_applied(&rec);
    assert_call_end(&rec, "answered_elsewhere");
    assert_eq!(rec["queue"], "support", "{rec:#}");
}

#[test]
fn shadow_info_dtmf_then_cancel_answered_elsewhere_udp() {
    shadow_dtmf_elsewhere("u1");
}

#[test]
fn shadow_info_dtmf_then_cancel_answered_elsewhere_tcp() {
    shadow_dtmf_elsewhere("t1");
}

// ---- 4. shadow: BYE in the early dialog → caller_hangup ----------------------

fn shadow_bye(transport: &str) {
    let l = line("shadow");
    let id = run_call(&l.d, "shadow_bye_uac.xml", transport);
    let rec = wait_for_event(&l.d, &id, "caller_hangup");
    assert_opened_queued(&rec);
    assert_call_end(&rec, "caller_hangup");
    assert_eq!(ivr_path(&rec), ["2", "1"], "{rec:#}");
    assert_eq!(rec["category"], "outage", "{rec:#}");
    assert!(position(&rec, "ivr_input").is_none(), "{:?}", events(&rec));

    let m = l.d.metrics();
    assert!(metric_value(&m, "dispatchd_sip_requests_total", "method=\"BYE\"") >= 1.0, "{m}");
}

#[test]
fn shadow_bye_is_caller_hangup_udp() {
    shadow_bye("u1");
}

#[test]
fn shadow_bye_is_caller_hangup_tcp() {
    shadow_bye("t1");
}

// ---- 5. OPTIONS ---------------------------------------------------------------

fn options(transport: &str) {
    let l = line("decline");
    // The scenario itself fails unless Allow lists INVITE and INFO (ereg check_it).
    let run = sipp(&l.d, "options_uac.xml", transport, &[]);
    assert!(run.ok, "sipp options_uac.xml over {transport} failed:\n{}", run.output);
    let allow = logged(&run, "allow=");
    assert_eq!(allow.len(), 1, "{allow:?}\n{}", run.output);
    let methods: Vec<&str> = allow[0].split(',').map(str::trim).collect();
    for m in ["INVITE", "ACK", "CANCEL", "BYE", "INFO", "OPTIONS"] {
        assert!(methods.contains(&m), "Allow {:?} lacks {m}", allow[0]);
    }
    // A keep-alive opens nothing.
    assert!(l.d.incidents("?limit=10").is_empty(), "OPTIONS opened an incident");
    let m = l.d.metrics();
    assert!(metric_value(&m, "dispatchd_sip_requests_total", "method=\"OPTIONS\"") >= 1.0, "{m}");
}

#[test]
fn options_lists_allow_udp() {
    options("u1");
}

#[test]
fn options_lists_allow_tcp() {
    options("t1");
}

// ---- 6. P-Asserted-Identity wins over From -------------------------------------

fn pai_wins(transport: &str) {
    let l = line("decline");
    let id = run_call(&l.d, "decline_pai_uac.xml", transport);
    let rec = l.d.incident(&id);
    assert_eq!(rec["caller"], "+441632960001", "{rec:#}");
    assert_eq!(rec["caller_name"], "Night Desk", "{rec:#}");
    assert_eq!(rec["severity"], "critical", "{rec:#}");
    assert_opened_queued(&rec);
}

#[test]
fn p_asserted_identity_wins_over_from_udp() {
    pai_wins("u1");
}

#[test]
fn p_asserted_identity_wins_over_from_tcp() {
    pai_wins("t1");
}

// ---- 7. Request-URI incident-<category> without an IVR path ----------------------

fn ruri_category(transport: &str) {
    let l = line("decline");
    let id = run_call(&l.d, "decline_ruri_category_uac.xml", transport);
    let rec = l.d.incident(&id);
    assert_eq!(rec["category"], "security", "{rec:#}");
    assert_eq!(rec["severity"], "high", "{rec:#}");
    assert!(ivr_path(&rec).is_empty(), "{rec:#}");
    assert_eq!(rec["caller"], "+442079460000", "{rec:#}");
    assert_eq!(rec["caller_name"], "Bob Jones", "{rec:#}");
    assert_opened_queued(&rec);
    let m = l.d.metrics();
    assert!(
        metric_value(&m, "dispatchd_incidents_opened_total", "category=\"security\"") >= 1.0,
        "no security sample in dispatchd_incidents_opened_total:\n{m}"
    );
}

#[test]
fn request_uri_category_without_ivr_path_udp() {
    ruri_category("u1");
}

#[test]
fn request_uri_category_without_ivr_path_tcp() {
    ruri_category("t1");
}

// ---- 8. in-dialog INFO with an unknown To-tag → 481 ------------------------------

fn info_unknown_tag(transport: &str) {
    let l = line("shadow");
    // The scenario expects 481 to the INFO, then CANCELs the ringing INVITE.
    let id = run_call(&l.d, "shadow_info_unknown_tag_uac.xml", transport);
    let rec = wait_for_event(&l.d, &id, "abandoned");
    assert_opened_queued(&rec);
    assert_call_end(&rec, "abandoned");
    assert_eq!(ivr_path(&rec), ["2", "1"], "the digit of a 481'd INFO was applied: {rec:#}");
    assert_eq!(rec["category"], "outage", "{rec:#}");
    assert!(position(&rec, "ivr_input").is_none(), "{:?}", events(&rec));
    let m = l.d.metrics();
    assert!(metric_value(&m, "dispatchd_sip_responses_total", "status=\"481\"") >= 1.0, "{m}");
}

#[test]
fn info_with_unknown_to_tag_is_481_udp() {
    info_unknown_tag("u1");
}

#[test]
fn info_with_unknown_to_tag_is_481_tcp() {
    info_unknown_tag("t1");
}
