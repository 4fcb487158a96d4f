//! The post-incident review (issue 4, item 2): `GET /v1/report`,
//! `dispatchd report` and `dispatchd review`, against a real Redis, the real
//! daemon and the real binary.
//!
//! The "test clock": a scripted day of incidents is written straight into Redis
//! in exactly the format the daemon writes (the `{t}:inc:<id>` hash with
//! `opened_ms`, the `{t}:inc:<id>:tl` list of JSON `{at, event, actor, detail}`
//! entries, `{t}:incidents` by opening ms — see `store/mod.rs` and the Lua
//! scripts), with timestamps chosen to the millisecond. So every count and
//! percentile below is known exactly, without waiting for real time to pass.
//! The records are left out of `{t}:queue`, `{t}:deadlines` and `{t}:closed`, so the
//! running daemon neither dispatches nor expires them. One more test drives a
//! real call through the daemon and checks the report counts it.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const S5: Duration = Duration::from_secs(5);
const DAY: &str = "2026-11-02T00:00:00Z";
const NEXT_DAY: &str = "2026-11-03T00:00:00Z";
const CALLER: &str = "+15550001234";

const TARGETS: &str = "
[targets.critical]
ack_within = \"60s\"
percent = 90

[targets.high]
ack_within = \"30s\"
percent = 30
";

fn ms(at: &str) -> i64 {
    dispatchd::report::parse_ms(at).unwrap()
}

fn iso(ms: i64) -> String {
    dispatchd::domain::timeline::timestamp_ms(ms)
}

/// One scripted incident: opened `open_ms` after midnight; `steps` are
/// (ms after opening, event, actor, detail), appended after opened/classified/queued.
struct Seed {
    seq: u64,
    severity: &'static str,
    category: &'static str,
    state: &'static str,
    open_ms: i64,
    steps: Vec<(i64, &'static str, &'static str, Value)>,
}

impl Seed {
    fn new(seq: u64, severity: &'static str, category: &'static str, state: &'static str, open_ms: i64) -> Seed {
        Seed { seq, severity, category, state, open_ms, steps: Vec::new() }
    }

    fn id(&self) -> String {
        dispatchd::domain::ids::incident_id(self.seq)
    }

    fn at(mut self, ms: i64, event: &'static str, actor: &'static str, detail: Value) -> Seed {
        self.steps.push((ms, event, actor, detail));
        self
    }

    /// Offered (and delivered) at `ms` to `rid` as attempt `n`.
    fn offer(self, ms: i64, rid: &'static str, n: u32) -> Seed {
        let d = format!("{}.{n}", self.id());
        self.at(
            ms,
            "offered",
            "dispatchd",
            json!({"responder": rid, "dispatch_id": d, "attempt": n, "tier": 1, "round": 1}),
        )
        .at(ms, "delivered", "dispatchd", json!({"responder": rid, "dispatch_id": d}))
    }

    fn ack(self, ms: i64, rid: &'static str, n: u32) -> Seed {
        let d = format!("{}.{n}", self.id());
        self.at(ms, "acknowledged", rid, json!({"responder": rid, "dispatch_id": d}))
    }

    fn timeout(self, ms: i64, rid: &'static str, n: u32) -> Seed {
        let d = format!("{}.{n}", self.id());
        self.at(ms, "ack_timeout", "dispatchd", json!({"responder": rid, "dispatch_id": d})).at(
            ms,
            "withdrawn",
            "dispatchd",
            json!({"responder": rid, "dispatch_id": d, "reason": "ack_timeout"}),
        )
    }

    fn status(self, ms: i64, rid: &'static str, status: &'static str) -> Seed {
        self.at(ms, status, rid, json!({"responder": rid}))
    }

    /// Writes it the way `intake.lua` and `dispatch.lua` do.
    fn write(&self, con: &mut redis::Connection, day_ms: i64) {
        let id = self.id();
        let opened = day_ms + self.open_ms;
        let rec = format!("{{t}}:inc:{id}");
        let exhausted = self.steps.iter().any(|s| s.1 == "exhausted");
        let mut pipe = redis::pipe();
        let hset = pipe.cmd("HSET").arg(&rec);
        for (k, v) in [
            ("id", id.clone()),
            ("state", self.state.into()),
            ("severity", self.severity.into()),
            ("category", self.category.into()),
            ("summary", format!("{} reported by phone, IVR 2,1", self.category)),
            ("instructions", String::new()),
            ("source", "sip".into()),
            ("call_id", format!("day-{}", self.seq)),
            ("call_key", format!("day-{}", self.seq)),
            ("caller", CALLER.into()),
            ("caller_name", "Test Caller".into()),
            ("ivr_path", "2,1".into()),
            ("queue", "support".into()),
            ("wait_seconds", "12".into()),
            ("opened_ms", opened.to_string()),
            ("attempts", self.steps.iter().filter(|s| s.1 == "offered").count().to_string()),
            ("exhausted", if exhausted { "1" } else { "0" }.into()),
        ] {
            hset.arg(k).arg(v);
        }
        let first = [
            (
                "opened",
                "sip",
                json!({"source": "sip", "transport": "udp", "queue": "support", "wait_seconds": 12, "ivr_path": ["2", "1"], "caller_known": true}),
            ),
            (
                "classified",
                "sip",
                json!({"category": self.category, "severity": self.severity, "rule": "ivr 2,1", "ivr_path": ["2", "1"]}),
            ),
            ("queued", "dispatchd", json!({"severity": self.severity})),
        ];
        let entries = first.into_iter().map(|(e, a, d)| (0, e, a, d)).chain(self.steps.iter().cloned());
        for (at, event, actor, detail) in entries {
            let entry = json!({"at": iso(opened + at), "event": event, "actor": actor, "detail": detail});
            pipe.cmd("RPUSH").arg(format!("{rec}:tl")).arg(entry.to_string());
        }
        pipe.cmd("ZADD").arg("{t}:incidents").arg(opened).arg(&id);
        pipe.query::<()>(con).unwrap();
    }
}

const H: i64 = 3_600_000;
const S: i64 = 1_000;

/// The scripted day. Expected figures are worked out next to the test.
fn scripted_day() -> Vec<Seed> {
    vec![
        // critical / outage and gas: call→offer 1..5 s, offer→ack 10, 20, 30, 40, 50.5 s.
        Seed::new(101, "critical", "outage", "resolved", 0) // exactly at `since`: included
            .offer(S, "r-a", 1)
            .ack(11 * S, "r-a", 1)
            .status(20 * S, "r-a", "en_route")
            .status(311 * S, "r-a", "on_scene")
            .status(3600 * S, "r-a", "resolved"),
        Seed::new(102, "critical", "outage", "resolved", H)
            .offer(2 * S, "r-a", 1)
            .ack(22 * S, "r-a", 1)
            .status(382 * S, "r-a", "on_scene")
            .status(4000 * S, "r-a", "resolved"),
        // Offered to r-a at 3 s, no ack; escalated to r-b at 33 s, acked at 63 s:
        // offer→ack is 30 s (the offer with the same dispatch id), ack within 60 s missed.
        Seed::new(103, "critical", "outage", "resolved", 2 * H)
            .offer(3 * S, "r-a", 1)
            .timeout(33 * S, "r-a", 1)
            .at(33 * S, "escalated", "dispatchd", json!({"from_tier": 1, "to_tier": 2}))
            .offer(33 * S, "r-b", 2)
            .ack(63 * S, "r-b", 2)
            .status(303 * S, "r-b", "on_scene")
            .at(400 * S, "note", "r-b", json!({"note": "caller +15550001234 met us"}))
            .status(4500 * S, "r-b", "resolved"),
        Seed::new(104, "critical", "gas", "en_route", 3 * H)
            .offer(4 * S, "r-a", 1)
            .ack(44 * S, "r-a", 1)
            .status(50 * S, "r-a", "en_route")
            .at(2000 * S, "reminded", "dispatchd", json!({"responder": "r-a", "due": "on_scene", "n": 1})),
        Seed::new(105, "critical", "outage", "resolved", 4 * H)
            .offer(5 * S, "r-a", 1)
            .ack(55_500, "r-a", 1)
            .status(475_500, "r-a", "on_scene")
            .status(5000 * S, "r-a", "resolved"),
        // high / security, shadow mode: the ringing legs end three ways.
        Seed::new(106, "high", "security", "resolved", 5 * H)
            .offer(10 * S, "r-a", 1)
            .at(20 * S, "answered_elsewhere", "sip", json!({"rung_s": 20.0}))
            .ack(25 * S, "r-a", 1)
            .status(625 * S, "r-a", "on_scene")
            .status(7200 * S, "r-a", "resolved"),
        Seed::new(107, "high", "security", "queued", 6 * H)
            .offer(20 * S, "r-a", 1)
            .at(30 * S, "abandoned", "sip", json!({"rung_s": 30.0}))
            .timeout(80 * S, "r-a", 1)
            .at(200 * S, "exhausted", "dispatchd", json!({"rounds": 3})),
        // Reached by webhook as well, acknowledged, then no progress: reminded, released.
        Seed::new(108, "high", "security", "resolved", 7 * H)
            .offer(30 * S, "r-a", 1)
            .at(
                35 * S,
                "contacted",
                "dispatchd",
                json!({"responder": "r-a", "channel": "webhook", "outcome": "delivered"}),
            )
            .at(40 * S, "caller_hangup", "sip", json!({"rung_s": 40.0}))
            .ack(75 * S, "r-a", 1)
            .at(375 * S, "reminded", "dispatchd", json!({"responder": "r-a", "due": "en_route", "n": 1}))
            .at(
                380 * S,
                "contacted",
                "dispatchd",
                json!({"responder": "r-a", "channel": "webhook", "outcome": "timeout"}),
            )
            .at(675 * S, "ack_expired", "dispatchd", json!({"responder": "r-a", "dispatch_id": "x.1", "reminders": 1}))
            .at(1000 * S, "resolved", "api", json!({"responder": "r-a"})),
        // low / enquiry: one resolved, one cancelled while offered.
        Seed::new(109, "low", "enquiry", "resolved", 8 * H)
            .offer(60 * S, "r-a", 1)
            .ack(160 * S, "r-a", 1)
            .status(1160 * S, "r-a", "on_scene")
            .status(10_000 * S, "r-a", "resolved"),
        Seed::new(110, "low", "enquiry", "cancelled", 9 * H)
            .offer(50 * S, "r-a", 1)
            .at(70 * S, "cancelled", "api", json!({}))
            .at(70 * S, "withdrawn", "dispatchd", json!({"responder": "r-a", "reason": "incident_cancelled"})),
        // Outside the range: a millisecond before `since`, and exactly at `until` (exclusive).
        Seed::new(111, "critical", "outage", "resolved", -1).offer(S, "r-a", 1),
        Seed::new(112, "critical", "outage", "queued", 24 * H),
    ]
}

fn seed(redis: &Redis) -> Vec<Seed> {
    let mut con = redis::Client::open(redis.url()).unwrap().get_connection().unwrap();
    let day = scripted_day();
    for s in &day {
        s.write(&mut con, ms(DAY));
    }
    // Indexed but expired (its record is gone): skipped.
    redis.cli(&["ZADD", "{t}:incidents", &(ms(DAY) + 10 * H).to_string(), &dispatchd::domain::ids::incident_id(113)]);
    day
}

type St = (u64, u64, Option<i64>, Option<i64>, Option<i64>);

/// (n, missing, p50, p90, p95) of one interval of a group.
fn stat(g: &Value, name: &str) -> St {
    let s = &g[name];
    (
        s["n"].as_u64().unwrap(),
        s["missing"].as_u64().unwrap(),
        s["p50_ms"].as_i64(),
        s["p90_ms"].as_i64(),
        s["p95_ms"].as_i64(),
    )
}

fn group<'a>(report: &'a Value, group: &str, key: &str) -> &'a Value {
    report["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["group"] == group && g["key"] == key)
        .unwrap_or_else(|| panic!("no group {group}/{key} in {report}"))
}

/// Every figure of the scripted day, worked out by hand (nearest rank: ⌈p·n/100⌉).
fn check_scripted_day(r: &Value) {
    assert_eq!(r["since"], "2026-11-02T00:00:00.000Z");
    assert_eq!(r["until"], "2026-11-03T00:00:00.000Z");
    assert_eq!(r["incidents"], 10, "{r}");

    let all = group(r, "all", "all");
    assert_eq!(all["count"], 10);
    // call→offer 1,2,3,4,5,10,20,30,50,60 s: rank 5, 9, 10.
    assert_eq!(stat(all, "call_to_offer"), (10, 0, Some(5_000), Some(50_000), Some(60_000)));
    // offer→ack 10,15,20,30,40,45,50.5,100 s: rank 4, 8, 8.
    assert_eq!(stat(all, "offer_to_ack"), (8, 2, Some(30_000), Some(100_000), Some(100_000)));
    // ack→on scene 240,300,360,420,600,1000 s: rank 3, 6, 6.
    assert_eq!(stat(all, "ack_to_on_scene"), (6, 4, Some(360_000), Some(1_000_000), Some(1_000_000)));
    // open→resolved 1000,3600,4000,4500,5000,7200,10000 s: rank 4, 7, 7.
    assert_eq!(stat(all, "open_to_resolved"), (7, 3, Some(4_500_000), Some(10_000_000), Some(10_000_000)));
    assert_eq!((all["escalated"].clone(), all["escalation_rate"].clone()), (json!(1), json!(0.1)));
    assert_eq!((all["exhausted"].clone(), all["exhausted_rate"].clone()), (json!(1), json!(0.1)));
    assert_eq!((all["abandoned"].clone(), all["ring_ended"].clone()), (json!(1), json!(3)));
    assert_eq!(all["abandon_rate"].as_f64().unwrap(), 1.0 / 3.0);
    assert_eq!(all["target"], Value::Null);
    assert_eq!((all["reminded"].clone(), all["released"].clone()), (json!(2), json!(1)));

    let c = group(r, "severity", "critical");
    assert_eq!(c["count"], 5);
    assert_eq!(stat(c, "call_to_offer"), (5, 0, Some(3_000), Some(5_000), Some(5_000)));
    assert_eq!(stat(c, "offer_to_ack"), (5, 0, Some(30_000), Some(50_500), Some(50_500)));
    assert_eq!(stat(c, "ack_to_on_scene"), (4, 1, Some(300_000), Some(420_000), Some(420_000)));
    assert_eq!(stat(c, "open_to_resolved"), (4, 1, Some(4_000_000), Some(5_000_000), Some(5_000_000)));
    assert_eq!((c["escalated"].clone(), c["escalation_rate"].clone()), (json!(1), json!(0.2)));
    assert_eq!((c["exhausted"].clone(), c["exhausted_rate"].clone()), (json!(0), json!(0.0)));
    assert_eq!((c["ring_ended"].clone(), c["abandon_rate"].clone()), (json!(0), Value::Null));
    assert_eq!((c["reminded"].clone(), c["released"].clone()), (json!(1), json!(0)));
    // Acknowledged 11, 22, 63, 44, 55.5 s after the call: 4 of 5 within 60 s < 90 %.
    assert_eq!(
        c["target"],
        json!({"ack_within_ms": 60_000, "percent": 90, "within": 4, "achieved_percent": 80.0, "met": false})
    );

    let h = group(r, "severity", "high");
    assert_eq!(h["count"], 3);
    assert_eq!(stat(h, "call_to_offer"), (3, 0, Some(20_000), Some(30_000), Some(30_000)));
    assert_eq!(stat(h, "offer_to_ack"), (2, 1, Some(15_000), Some(45_000), Some(45_000)));
    assert_eq!(stat(h, "ack_to_on_scene"), (1, 2, Some(600_000), Some(600_000), Some(600_000)));
    assert_eq!(stat(h, "open_to_resolved"), (2, 1, Some(1_000_000), Some(7_200_000), Some(7_200_000)));
    assert_eq!((h["escalated"].clone(), h["exhausted"].clone()), (json!(0), json!(1)));
    assert_eq!(h["exhausted_rate"].as_f64().unwrap(), 1.0 / 3.0);
    assert_eq!((h["abandoned"].clone(), h["ring_ended"].clone()), (json!(1), json!(3)));
    assert_eq!(h["abandon_rate"].as_f64().unwrap(), 1.0 / 3.0);
    assert_eq!((h["reminded"].clone(), h["released"].clone()), (json!(1), json!(1)));
    // Acknowledged 25 and 75 s after the call, one never: 1 of 3 within 30 s ≥ 30 %.
    let t = &h["target"];
    assert_eq!(
        (t["ack_within_ms"].clone(), t["percent"].clone(), t["within"].clone()),
        (json!(30_000), json!(30), json!(1))
    );
    assert_eq!(t["achieved_percent"].as_f64().unwrap(), 100.0 / 3.0);
    assert_eq!(t["met"], true);

    let m = group(r, "severity", "medium");
    assert_eq!(m["count"], 0);
    assert_eq!(stat(m, "offer_to_ack"), (0, 0, None, None, None));
    assert_eq!((m["escalation_rate"].clone(), m["target"].clone()), (Value::Null, Value::Null));

    let l = group(r, "severity", "low");
    assert_eq!(l["count"], 2);
    assert_eq!(stat(l, "call_to_offer"), (2, 0, Some(50_000), Some(60_000), Some(60_000)));
    assert_eq!(stat(l, "offer_to_ack"), (1, 1, Some(100_000), Some(100_000), Some(100_000)));
    assert_eq!(stat(l, "ack_to_on_scene"), (1, 1, Some(1_000_000), Some(1_000_000), Some(1_000_000)));
    assert_eq!(stat(l, "open_to_resolved"), (1, 1, Some(10_000_000), Some(10_000_000), Some(10_000_000)));
    assert_eq!(l["target"], Value::Null, "no [targets.low]");

    let keys: Vec<&str> = r["groups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["group"] == "category")
        .map(|g| g["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["enquiry", "gas", "outage", "security"]);
    let o = group(r, "category", "outage");
    assert_eq!(o["count"], 4);
    assert_eq!(stat(o, "call_to_offer"), (4, 0, Some(2_000), Some(5_000), Some(5_000)));
    assert_eq!(stat(o, "offer_to_ack"), (4, 0, Some(20_000), Some(50_500), Some(50_500)));
    assert_eq!(o["escalation_rate"], json!(0.25));
    let g = group(r, "category", "gas");
    assert_eq!(g["count"], 1);
    assert_eq!(stat(g, "call_to_offer"), (1, 0, Some(4_000), Some(4_000), Some(4_000)));
    assert_eq!(stat(g, "offer_to_ack"), (1, 0, Some(40_000), Some(40_000), Some(40_000)));
    assert_eq!(stat(g, "ack_to_on_scene"), (0, 1, None, None, None));
    assert_eq!(group(r, "category", "security")["count"], 3);
    assert_eq!(group(r, "category", "enquiry")["count"], 2);
}

fn report_path(since: &str, until: &str) -> String {
    format!("/v1/report?since={since}&until={until}")
}

fn get_report(d: &Daemon, since: &str, until: &str) -> Value {
    let (status, body) = http_get(d.http_port, &report_path(since, until), Some(ADMIN_TOKEN));
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Runs the binary; (exit code, stdout, stderr).
fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin()).args(args).env_remove("RUST_LOG").output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn cli_report(d: &Daemon, format: &str) -> String {
    let config = d.config.to_str().unwrap();
    let (code, out, err) =
        run(&["report", "--since", DAY, "--until", NEXT_DAY, "--format", format, "--config", config]);
    assert_eq!(code, 0, "report --format {format}: {err}");
    out
}

#[test]
fn scripted_day_gives_exact_figures_over_http_and_the_command_line() {
    let redis = Redis::start();
    let day = seed(&redis);
    let d = Daemon::start(&redis, Options { extra: TARGETS.into(), ..Default::default() });

    // The API.
    let api = get_report(&d, DAY, NEXT_DAY);
    check_scripted_day(&api);
    // An offset instead of Z, and another day with nothing in it.
    let shifted = get_report(&d, "2026-11-02T01:00:00%2B01:00", "2026-11-03T01:00:00%2B01:00");
    assert_eq!(shifted, api);
    let empty = get_report(&d, "2026-10-01T00:00:00Z", "2026-10-02T00:00:00Z");
    assert_eq!(empty["incidents"], 0);
    assert_eq!(group(&empty, "all", "all")["count"], 0);

    // `dispatchd report --format json` prints the API's body.
    let json_out = cli_report(&d, "json");
    let cli: Value = serde_json::from_str(&json_out).unwrap();
    assert_eq!(cli, api);
    check_scripted_day(&cli);

    // CSV: a header line, then one row per group with the same numbers.
    let csv_out = cli_report(&d, "csv");
    let mut lines = csv_out.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), api["groups"].as_array().unwrap().len(), "{csv_out}");
    assert!(rows.iter().all(|r| r.len() == header.len()), "{csv_out}");
    let cell = |group: &str, key: &str, col: &str| -> String {
        let row =
            rows.iter().find(|r| r[0] == group && r[1] == key).unwrap_or_else(|| panic!("{group}/{key}: {csv_out}"));
        let i = header.iter().position(|h| *h == col).unwrap_or_else(|| panic!("no column {col}: {csv_out}"));
        row[i].to_string()
    };
    assert_eq!(cell("all", "all", "count"), "10");
    assert_eq!(cell("all", "all", "call_to_offer_p50_ms"), "5000");
    assert_eq!(cell("all", "all", "call_to_offer_p90_ms"), "50000");
    assert_eq!(cell("all", "all", "call_to_offer_p95_ms"), "60000");
    assert_eq!(cell("severity", "critical", "offer_to_ack_p50_ms"), "30000");
    assert_eq!(cell("severity", "critical", "offer_to_ack_p90_ms"), "50500");
    assert_eq!(cell("severity", "critical", "ack_to_on_scene_missing"), "1");
    assert_eq!(cell("severity", "critical", "escalation_rate"), "0.2");
    assert_eq!(cell("severity", "critical", "target_within"), "4");
    assert_eq!(cell("severity", "critical", "target_achieved_percent"), "80");
    assert_eq!(cell("severity", "critical", "target_met"), "false");
    assert_eq!(cell("severity", "high", "target_met"), "true");
    assert_eq!(cell("severity", "high", "abandoned"), "1");
    assert_eq!(cell("severity", "high", "ring_ended"), "3");
    assert_eq!((cell("all", "all", "reminded"), cell("all", "all", "released")), ("2".into(), "1".into()));
    assert_eq!(cell("severity", "medium", "offer_to_ack_p50_ms"), "");
    assert_eq!(cell("severity", "low", "target_met"), "");
    assert_eq!(cell("category", "gas", "offer_to_ack_p95_ms"), "40000");

    // Table: aligned, human units, the same numbers.
    let table = cli_report(&d, "table");
    for needle in [
        "Incidents opened from 2026-11-02T00:00:00.000Z until 2026-11-03T00:00:00.000Z (exclusive): 10",
        "5.000s / 50.000s / 1m00.000s (10/10)",    // all: call → offer
        "30.000s / 50.500s / 50.500s (5/5)",       // critical: offer → ack
        "5m00.000s / 7m00.000s / 7m00.000s (4/5)", // critical: ack → on scene
        "1/5 20.0%",                               // critical: escalated
        "1/3 33.3%",                               // high: exhausted, abandoned
        "1 / 1",                                   // high: reminded / released
        "ack ≤ 1m00.000s for ≥ 90%: 4/5 = 80.0% MISSED",
        "ack ≤ 30.000s for ≥ 30%: 1/3 = 33.3% met",
    ] {
        assert!(table.contains(needle), "{needle:?} not in\n{table}");
    }
    let critical_rows: Vec<&str> = table.lines().filter(|l| l.starts_with("severity  critical")).collect();
    assert_eq!(critical_rows.len(), 2, "{table}");
    // Columns line up: every row of the first table has its count at the same position.
    let first_table: Vec<&str> = table.lines().skip(3).take_while(|l| !l.is_empty()).collect();
    let col = first_table[0].find("count").unwrap();
    assert!(
        first_table
            .iter()
            .all(|l| l.chars().nth(col - 1) == Some(' ') && l.chars().nth(col).is_some_and(|c| !c.is_whitespace())),
        "{table}"
    );

    // `dispatchd review`: the escalated incident, its id typed in lower case.
    let c3 = &day[2];
    let config = d.config.to_str().unwrap();
    let (code, out, err) = run(&["review", &c3.id().to_lowercase(), "--config", config]);
    assert_eq!(code, 0, "{err}");
    let head = out.lines().next().unwrap();
    assert_eq!(head, format!("{}  severity critical  category outage  state resolved", c3.id()));
    assert!(out.contains("summary: outage reported by phone, IVR 2,1"), "{out}");
    for event in [
        "opened",
        "classified",
        "queued",
        "offered",
        "delivered",
        "ack_timeout",
        "withdrawn",
        "escalated",
        "acknowledged",
        "on_scene",
        "note",
        "resolved",
    ] {
        assert!(out.lines().any(|l| l.split_whitespace().nth(3) == Some(event)), "{event} missing:\n{out}");
    }
    // One line per entry: timestamp, +since previous, +since opened, event, actor.
    let line = |event: &str| out.lines().find(|l| l.split_whitespace().nth(3) == Some(event)).unwrap().to_string();
    let timeout: Vec<String> = line("ack_timeout").split_whitespace().take(5).map(String::from).collect();
    assert_eq!(timeout, ["2026-11-02T02:00:33.000Z", "+30.000s", "+33.000s", "ack_timeout", "dispatchd"]);
    let ack: Vec<String> = line("acknowledged").split_whitespace().take(5).map(String::from).collect();
    assert_eq!(ack, ["2026-11-02T02:01:03.000Z", "+30.000s", "+1m03.000s", "acknowledged", "r-b"]);
    assert!(line("resolved").contains("+1h15m00s"), "{out}");
    let tail: Vec<&str> = out.lines().skip_while(|l| *l != "key intervals").collect();
    let interval = |name: &str| {
        tail.iter().find(|l| l.trim_start().starts_with(name)).map(|l| l.split_whitespace().last().unwrap())
    };
    assert_eq!(interval("call → offer"), Some("3.000s"), "{out}");
    assert_eq!(interval("offer → ack"), Some("30.000s"), "{out}");
    assert_eq!(interval("ack → on scene"), Some("4m00.000s"), "{out}");
    assert_eq!(interval("open → resolved"), Some("1h15m00s"), "{out}");
    // The caller's number never appears in clear, not even inside a note.
    assert!(!out.contains("5550001234"), "{out}");
    assert!(out.contains("caller •••••••••234"), "{out}");

    // The follow-up of the incident reached on another channel, reminded and released.
    let (code, out, err) = run(&["review", &day[7].id(), "--config", config]);
    assert_eq!(code, 0, "{err}");
    let follow: Vec<&str> = out.lines().skip_while(|l| *l != "follow-up").collect();
    assert_eq!(
        follow,
        [
            "follow-up",
            "  other channels   webhook delivered ×1, webhook timeout ×1",
            "  reminders        1",
            "  released         1"
        ],
        "{out}"
    );
    assert!(out.lines().any(|l| l.split_whitespace().nth(3) == Some("ack_expired")), "{out}");

    // Steps not reached are said so.
    let (code, out, _) = run(&["review", &day[3].id(), "--config", config]);
    assert_eq!(code, 0);
    assert!(
        out.lines().any(|l| l.trim_start().starts_with("ack → on scene") && l.ends_with("- (not reached)")),
        "{out}"
    );

    // Unknown ids: exit 1, one line.
    for id in
        [dispatchd::domain::ids::incident_id(999_999), "INC-nope".into(), dispatchd::domain::ids::incident_id(113)]
    {
        let (code, out, err) = run(&["review", &id, "--config", config]);
        assert_eq!(code, 1, "{id}: {out}{err}");
        assert!(err.contains("not found") && err.trim().lines().count() == 1, "{err}");
    }
}

#[test]
fn report_refuses_bad_ranges_and_strangers() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, Options::default());
    let good = report_path(DAY, NEXT_DAY);
    for token in [None, Some("wrong")] {
        let (status, body) = http_get(d.http_port, &good, token);
        assert_eq!(status, 401, "{body}");
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), json!({"error": "unauthorized"}));
    }
    for query in [
        "".to_string(),
        format!("?since={DAY}"),
        format!("?until={NEXT_DAY}"),
        format!("?since=&until={NEXT_DAY}"),
        format!("?since=yesterday&until={NEXT_DAY}"),
        format!("?since=2026-11-02&until={NEXT_DAY}"),
        format!("?since={NEXT_DAY}&until={DAY}"),
        format!("?since={DAY}&until={DAY}"),
        format!("?since=2025-11-01T00:00:00Z&until={NEXT_DAY}"),
        format!("?since={DAY}&until={NEXT_DAY}&since={DAY}"),
    ] {
        let (status, body) = http_get(d.http_port, &format!("/v1/report{query}"), Some(ADMIN_TOKEN));
        assert_eq!(status, 400, "{query}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{query}: not JSON: {body}"));
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{query}: {body}");
    }
    // 366 days is the most.
    let (status, body) = http_get(d.http_port, &report_path("2025-11-02T00:00:00Z", NEXT_DAY), Some(ADMIN_TOKEN));
    assert_eq!(status, 200, "{body}");

    // The command line: bad arguments exit 1 with one line; a bad config 78.
    let config = d.config.to_str().unwrap();
    for (since, until) in [("yesterday", NEXT_DAY), (NEXT_DAY, DAY), ("2024-01-01T00:00:00Z", NEXT_DAY)] {
        let (code, out, err) = run(&["report", "--since", since, "--until", until, "--config", config]);
        assert_eq!(code, 1, "{since} {until}: {out}{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(out.is_empty(), "{out}");
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    let key = format!("[privacy]\ncaller_key = \"{CALLER_KEY}\"\n");
    std::fs::write(&bad, format!("{key}[targets.critical]\nack_within = \"60s\"\npercent = 101\n")).unwrap();
    let bad = bad.to_str().unwrap();
    let (code, _, err) = run(&["report", "--since", DAY, "--until", NEXT_DAY, "--config", bad]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("targets.critical.percent") && err.trim().lines().count() == 1, "{err}");
    let (code, _, _) = run(&["review", "INC-00011", "--config", bad]);
    assert_eq!(code, 78);
    // Redis not answering: exit 1, one line.
    let away = dir.path().join("away.toml");
    std::fs::write(
        &away,
        format!("[redis]\nurl = \"redis://127.0.0.1:{}/0\"\ntimeout = \"300ms\"\n[privacy]\ncaller_key = \"{CALLER_KEY}\"\n", free_port()),
    )
    .unwrap();
    let (code, out, err) = run(&["report", "--since", DAY, "--until", NEXT_DAY, "--config", away.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn a_real_call_acknowledged_and_resolved_is_in_the_last_minutes_report() {
    let redis = Redis::start();
    let extra = format!("{}{}{TARGETS}", roster(&[("r-alpha", 1, &["*"])]), escalation("30s", 3));
    let d = Daemon::start(&redis, Options { extra, ..Default::default() });
    let mut r = Responder::connect(&d, "r-alpha");
    let start = chrono::Utc::now();
    let id = place_call(&d, "report-flow-1", "2,1");
    let offer = r.recv_type("dispatch", S5).expect("dispatch");
    assert_eq!(offer["incident_id"], id.as_str());
    let ok = r.request(json!({"type": "ack", "dispatch_id": offer["dispatch_id"]}), "a1");
    assert_eq!(ok["type"], "ok", "{ok}");
    std::thread::sleep(Duration::from_millis(20));
    let ok = r.request(json!({"type": "status", "incident_id": id, "status": "resolved"}), "s1");
    assert_eq!(ok["type"], "ok", "{ok}");
    let end = chrono::Utc::now();

    let since = iso(start.timestamp_millis() - 60_000);
    let until = iso(end.timestamp_millis() + 1_000);
    let report = get_report(&d, &since, &until);
    assert_eq!(report["incidents"], 1, "{report}");
    let elapsed = end.timestamp_millis() - start.timestamp_millis();
    for g in
        [group(&report, "all", "all"), group(&report, "severity", "critical"), group(&report, "category", "outage")]
    {
        assert_eq!(g["count"], 1, "{g}");
        for name in ["call_to_offer", "offer_to_ack", "open_to_resolved"] {
            let (n, missing, p50, p90, p95) = stat(g, name);
            assert_eq!((n, missing), (1, 0), "{name}: {g}");
            let v = p50.unwrap();
            assert!((0..=elapsed).contains(&v), "{name} = {v} ms, the whole flow took {elapsed} ms");
            assert_eq!((p90, p95), (p50, p50));
        }
        assert_eq!(stat(g, "ack_to_on_scene"), (0, 1, None, None, None), "resolved without on_scene");
        assert_eq!(
            (g["escalated"].clone(), g["exhausted"].clone(), g["ring_ended"].clone()),
            (json!(0), json!(0), json!(0))
        );
    }
    let c = group(&report, "severity", "critical");
    let (_, _, open_to_resolved, _, _) = stat(c, "open_to_resolved");
    let (_, _, offer_to_ack, _, _) = stat(c, "offer_to_ack");
    assert!(open_to_resolved.unwrap() >= offer_to_ack.unwrap());
    // Acknowledged well within a minute of the call.
    assert_eq!(c["target"]["within"], 1, "{c}");
    assert_eq!(c["target"]["met"], true, "{c}");

    // The review of that incident shows its real timeline.
    let (code, out, err) = run(&["review", &id, "--config", d.config.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    for event in ["opened", "classified", "queued", "offered", "delivered", "acknowledged", "resolved"] {
        assert!(out.lines().any(|l| l.split_whitespace().nth(3) == Some(event)), "{event}:\n{out}");
    }
    assert!(!out.contains("5550001234"), "{out}");
}
