//! The `/v1` administration API (contract §6, §7): opening, resolving and
//! cancelling incidents by hand, the roster, caller erasure and retention —
//! against the real binary and a real Redis.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const S5: Duration = Duration::from_secs(5);

fn opts(members: &[(&str, u32, &[&str])]) -> Options {
    Options { extra: format!("{}{}", roster(members), escalation("5m", 3)), ..Default::default() }
}

fn req(d: &Daemon, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let (status, text) = http(d.http_port, method, path, Some(ADMIN_TOKEN), body);
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{method} {path}: not JSON ({status}): {text}"));
    (status, v)
}

fn open(d: &Daemon, category: &str, severity: &str, summary: &str) -> Value {
    let body = json!({"category": category, "severity": severity, "summary": summary}).to_string();
    let (status, v) = req(d, "POST", "/v1/incidents", Some(&body));
    assert_eq!(status, 201, "{v}");
    v
}

fn last_entry(inc: &Value) -> Value {
    inc["timeline"].as_array().and_then(|t| t.last()).cloned().unwrap_or(Value::Null)
}

fn call_from(d: &Daemon, call_id: &str, extra: &str) -> String {
    let p = UdpPeer::new(d);
    p.send(invite(p.port(), call_id, extra).as_bytes());
    let resp = p.recv_final(S5).expect("answer to INVITE");
    p.send(ack_for(&resp, p.port(), call_id).as_bytes());
    header_of(&resp, "X-Incident-Id").expect("X-Incident-Id").to_string()
}

#[test]
fn every_endpoint_needs_the_token_and_refuses_bad_input() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, opts(&[("r-alpha", 1, &["*"])]));
    let id = place_call(&d, "auth-1", "2");
    let good = r#"{"category":"outage","severity":"high","summary":"s"}"#;
    let endpoints = [
        ("GET", "/v1/incidents".to_string(), None),
        ("GET", format!("/v1/incidents/{id}"), None),
        ("POST", "/v1/incidents".to_string(), Some(good)),
        ("POST", format!("/v1/incidents/{id}/resolve"), None),
        ("POST", format!("/v1/incidents/{id}/cancel"), Some(r#"{"note":"x"}"#)),
        ("GET", "/v1/responders".to_string(), None),
        ("DELETE", "/v1/callers/%2B15550001234".to_string(), None),
    ];
    for (method, path, body) in &endpoints {
        for token in [None, Some("wrong"), Some("")] {
            let (status, text) = http(d.http_port, method, path, token, *body);
            assert_eq!(status, 401, "{method} {path} {token:?}: {text}");
            assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), json!({"error": "unauthorized"}));
        }
    }
    // Nothing was changed by the refused requests.
    assert_eq!(d.incident(&id)["state"], "queued");
    assert_eq!(d.incident(&id)["caller"], "+15550001234");
    assert_eq!(d.incidents("").len(), 1);

    let long = "x".repeat(501);
    let bad_new = [
        "",
        "not json",
        "[]",
        "null",
        r#"{"category":"outage","severity":"high"}"#,
        r#"{"category":"outage","summary":"s"}"#,
        r#"{"severity":"high","summary":"s"}"#,
        r#"{"category":"outage","severity":"urgent","summary":"s"}"#,
        r#"{"category":"Out Age","severity":"high","summary":"s"}"#,
        r#"{"category":"","severity":"high","summary":"s"}"#,
        r#"{"category":"outage","severity":"high","summary":""}"#,
        r#"{"category":"outage","severity":"high","summary":"   "}"#,
        r#"{"category":"outage","severity":"high","summary":5}"#,
        r#"{"category":null,"severity":"high","summary":"s"}"#,
        r#"{"category":"outage","severity":"high","summary":"s","caller":"+4412345"}"#,
        r#"{"category":"outage","severity":"high","summary":"s""#,
    ];
    let long_body = format!(r#"{{"category":"outage","severity":"high","summary":"{long}"}}"#);
    for body in bad_new.iter().copied().chain([long_body.as_str()]) {
        let (status, v) = req(&d, "POST", "/v1/incidents", Some(body));
        assert_eq!(status, 400, "{body}: {v}");
        assert!(v["error"].is_string(), "{body}: {v}");
    }
    // 500 characters (not bytes) is fine.
    open(&d, "outage", "low", &"é".repeat(500));

    // An oversized body is refused (or the connection dropped), never a crash.
    let huge = format!(r#"{{"category":"outage","severity":"high","summary":"{}"}}"#, "x".repeat(3 << 20));
    let (status, _) = http(d.http_port, "POST", "/v1/incidents", Some(ADMIN_TOKEN), Some(&huge));
    assert!(matches!(status, 413 | 400 | 0), "oversized body: {status}");

    // Ids: unknown, malformed, with a wrong check symbol → 404 as JSON.
    for bad in ["INC-ZZZZZZ", "..%2F..%2Fetc", "%00", "INC-00012", &"A".repeat(3000)] {
        for action in ["resolve", "cancel"] {
            let (status, v) = req(&d, "POST", &format!("/v1/incidents/{bad}/{action}"), None);
            assert_eq!((status, v), (404, json!({"error": "not_found"})), "{bad} {action}");
        }
    }
    // Bodies of resolve/cancel: optional, but JSON with only `note` (a string).
    for body in
        ["nope", "[1]", r#"{"note":5}"#, r#"{"reason":"x"}"#, "{", &format!(r#"{{"note":"{}"}}"#, "n".repeat(1001))]
    {
        for action in ["resolve", "cancel"] {
            let (status, v) = req(&d, "POST", &format!("/v1/incidents/{id}/{action}"), Some(body));
            assert_eq!(status, 400, "{action} {body}: {v}");
            assert!(v["error"].is_string());
        }
    }
    assert_eq!(d.incident(&id)["state"], "queued", "bad requests change nothing");

    // Caller numbers that cannot be one.
    for bad in ["%00", "%0A", &"1".repeat(200)] {
        let (status, v) = req(&d, "DELETE", &format!("/v1/callers/{bad}"), None);
        assert_eq!(status, 400, "{bad}: {v}");
    }
    assert_eq!(d.incident(&id)["caller"], "+15550001234");

    // Unknown endpoints and methods: JSON errors too.
    let (status, _) = http(d.http_port, "GET", "/v1/nothing", Some(ADMIN_TOKEN), None);
    assert_eq!(status, 404);
    assert_eq!(http_get(d.http_port, "/livez", None).0, 200, "still serving");
}

#[test]
fn open_by_hand_then_read_it_back() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, Options::default());
    let inc = open(&d, "outage", "critical", "  Substation 4 on fire  ");
    let id = inc["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("INC-"), "{inc}");
    assert_eq!(inc["source"], "api");
    assert_eq!(inc["state"], "queued");
    assert_eq!(inc["severity"], "critical");
    assert_eq!(inc["category"], "outage");
    assert_eq!(inc["summary"], "Substation 4 on fire");
    assert_eq!(inc["caller"], "");
    assert_eq!(inc["assigned_to"], Value::Null);
    assert_eq!(events(&inc), ["opened", "classified", "queued"]);
    assert_eq!(inc["timeline"][0]["actor"], "api");
    assert_eq!(inc["timeline"][1]["detail"]["category"], "outage");

    assert_eq!(d.incident(&id), inc, "GET shows what POST answered");
    assert_eq!(d.incident(&id.to_lowercase())["id"], id.as_str());
    // Queued like a call's incident, and counted.
    assert!(!redis.cli(&["ZSCORE", "{t}:queue", &id]).trim().is_empty());
    let listed = d.incidents("?severity=critical");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["id"], id.as_str());
    let m = d.metrics();
    assert_eq!(metric_value(&m, "dispatchd_incidents_opened_total", "category=\"outage\""), 1.0);

    // Each POST is a new incident (no call key to deduplicate on).
    let again = open(&d, "outage", "critical", "Substation 4 on fire");
    assert_ne!(again["id"], inc["id"]);
}

#[test]
fn resolve_cancel_and_conflicts() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, Options::default());
    let a = open(&d, "outage", "high", "a")["id"].as_str().unwrap().to_string();
    let b = place_call(&d, "close-b", "9");

    let (status, inc) = req(&d, "POST", &format!("/v1/incidents/{a}/resolve"), Some(r#"{"note":"fixed remotely"}"#));
    assert_eq!(status, 200, "{inc}");
    assert_eq!(inc["state"], "resolved");
    let e = last_entry(&inc);
    assert_eq!((e["event"].as_str(), e["actor"].as_str()), (Some("resolved"), Some("api")));
    assert_eq!(e["detail"]["note"], "fixed remotely");
    assert_eq!(d.incident(&a)["state"], "resolved");
    assert!(redis.cli(&["ZSCORE", "{t}:queue", &a]).trim().is_empty(), "out of the queue");
    // It expires `privacy.retention` (90 days by default) from now.
    let ttl: i64 = redis.cli(&["TTL", &format!("{{t}}:inc:{a}")]).trim().parse().unwrap();
    assert!(ttl > 89 * 86_400 && ttl <= 90 * 86_400, "{ttl}");

    // Closed is closed: 409 either way, and nothing is appended.
    let n = events(&d.incident(&a)).len();
    for action in ["resolve", "cancel"] {
        let (status, v) = req(&d, "POST", &format!("/v1/incidents/{a}/{action}"), None);
        assert_eq!((status, v), (409, json!({"error": "conflict"})), "{action}");
    }
    assert_eq!(events(&d.incident(&a)).len(), n);

    // Cancel without a body, id typed in lower case.
    let (status, inc) = req(&d, "POST", &format!("/v1/incidents/{}/cancel", b.to_lowercase()), None);
    assert_eq!(status, 200, "{inc}");
    assert_eq!(inc["state"], "cancelled");
    let e = last_entry(&inc);
    assert_eq!((e["event"].as_str(), e["actor"].as_str()), (Some("cancelled"), Some("api")));
    assert_eq!(e["detail"], json!({}));
    let (status, _) = req(&d, "POST", &format!("/v1/incidents/{b}/resolve"), Some("{}"));
    assert_eq!(status, 409);
    assert_eq!(d.incidents("?state=cancelled").len(), 1);
    assert_eq!(d.incidents("?state=resolved").len(), 1);
}

#[test]
fn cancel_and_resolve_free_the_responder() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, opts(&[("r-alpha", 1, &["*"]), ("r-beta", 2, &["gas"])]));

    // The roster: r-beta never connected.
    let (status, v) = req(&d, "GET", "/v1/responders", None);
    assert_eq!(status, 200);
    assert_eq!(
        v["responders"][1],
        json!({"id": "r-beta", "name": "r-beta", "tier": 2, "skills": ["gas"], "connected": false, "availability": "off_duty"})
    );
    assert_eq!(v["responders"][0]["connected"], false);

    let mut alpha = Responder::connect(&d, "r-alpha");
    wait_until("r-alpha connected", S5, || {
        let (_, v) = req(&d, "GET", "/v1/responders", None);
        v["responders"][0]["connected"] == true
    });
    let (_, v) = req(&d, "GET", "/v1/responders", None);
    assert_eq!(v["responders"][0]["availability"], "available");
    assert_eq!(v["responders"][0]["tier"], 1);
    assert_eq!(v["responders"][0]["skills"], json!(["*"]));
    assert_eq!(v["responders"][1]["connected"], false);

    // Offered, then cancelled by hand: the offer is withdrawn.
    let one = open(&d, "outage", "high", "one")["id"].as_str().unwrap().to_string();
    let offer = alpha.recv_type("dispatch", S5).expect("dispatch of one");
    assert_eq!(offer["incident_id"], one.as_str());
    let (status, inc) = req(&d, "POST", &format!("/v1/incidents/{one}/cancel"), Some(r#"{"note":"duplicate"}"#));
    assert_eq!(status, 200, "{inc}");
    assert_eq!(inc["state"], "cancelled");
    assert_eq!(inc["assigned_to"], Value::Null);
    let ev = events(&inc);
    assert_eq!(&ev[ev.len() - 2..], ["cancelled", "withdrawn"]);
    let cancel = alpha.recv_type("cancel", S5).expect("cancel frame");
    assert_eq!(cancel, json!({"type": "cancel", "dispatch_id": offer["dispatch_id"], "reason": "incident_cancelled"}));
    // A late ack of the cancelled offer is refused.
    let r = alpha.request(json!({"type": "ack", "dispatch_id": offer["dispatch_id"]}), "late");
    assert_eq!(r["type"], "error", "{r}");
    assert!(redis.cli(&["ZSCORE", "{t}:deadlines", &one]).trim().is_empty());

    // Free again: the next incident is offered to it.
    let two = open(&d, "outage", "high", "two")["id"].as_str().unwrap().to_string();
    let offer = alpha.recv_type("dispatch", S5).expect("dispatch of two");
    assert_eq!(offer["incident_id"], two.as_str());
    let r = alpha.request(json!({"type": "ack", "dispatch_id": offer["dispatch_id"]}), "a2");
    assert_eq!(r["type"], "ok");
    let r = alpha.request(json!({"type": "status", "incident_id": two, "status": "on_scene"}), "s2");
    assert_eq!(r["type"], "ok");

    // In hand, resolved by hand: the responder is told and freed.
    let three = open(&d, "outage", "low", "three")["id"].as_str().unwrap().to_string();
    assert!(alpha.recv_type("dispatch", Duration::from_millis(800)).is_none(), "busy with two");
    let (status, inc) = req(&d, "POST", &format!("/v1/incidents/{two}/resolve"), None);
    assert_eq!(status, 200);
    assert_eq!(inc["state"], "resolved");
    assert_eq!(inc["assigned_to"], "r-alpha", "who had it stays on the record");
    let cancel = alpha.recv_type("cancel", S5).expect("cancel frame for two");
    assert_eq!(cancel["dispatch_id"], offer["dispatch_id"]);
    assert_eq!(cancel["reason"], "incident_cancelled");
    let offer = alpha.recv_type("dispatch", S5).expect("dispatch of three");
    assert_eq!(offer["incident_id"], three.as_str());
    let r = alpha.request(json!({"type": "status", "incident_id": two, "status": "resolved"}), "s3");
    assert_eq!(r["code"], "not_allowed", "already resolved");

    // Resolved by the responder: closed, so the retention sweep will expire it.
    let r = alpha.request(json!({"type": "ack", "dispatch_id": offer["dispatch_id"]}), "a3");
    assert_eq!(r["type"], "ok");
    let r = alpha.request(json!({"type": "status", "incident_id": three, "status": "resolved"}), "s4");
    assert_eq!(r["type"], "ok");
    assert!(!redis.cli(&["ZSCORE", "{t}:closed", &three]).trim().is_empty());
    let (_, v) = req(&d, "GET", "/v1/responders", None);
    assert_eq!(v["responders"][0]["availability"], "available");
}

/// HMAC-SHA256(caller_key, number), first 16 hex digits.
fn pseudonym(number: &str) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(CALLER_KEY.as_bytes()).unwrap();
    mac.update(number.as_bytes());
    hex::encode(mac.finalize().into_bytes())[..16].to_string()
}

#[test]
fn erase_a_callers_number_and_name() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, Options::default());
    let jane = "P-Asserted-Identity: \"Jane Roe\" <sip:+442079460123@pbx.example>\r\n";
    let a = call_from(&d, "erase-a", jane);
    let b = call_from(&d, "erase-b", jane);
    let other = call_from(&d, "erase-c", "");
    // One of them already closed: its record is erased too.
    assert_eq!(req(&d, "POST", &format!("/v1/incidents/{b}/resolve"), None).0, 200);
    assert_eq!(d.incident(&a)["caller"], "+442079460123");
    // The caller index (keyed by pseudonym) as intake writes it: used, then dropped.
    let index = format!("{{t}}:caller:{}", pseudonym("+442079460123"));
    redis.cli(&["SADD", &index, &a, &b]);

    let (status, v) = req(&d, "DELETE", "/v1/callers/%2B442079460123", None);
    assert_eq!((status, v), (200, json!({"erased": 2})));
    for id in [&a, &b] {
        let inc = d.incident(id);
        assert_eq!(inc["caller"], "", "{id}");
        assert_eq!(inc["caller_name"], "", "{id}");
        let e = last_entry(&inc);
        assert_eq!(e["event"], "note");
        assert_eq!(e["actor"], "api");
        assert_eq!(e["detail"], json!({"caller": "erased"}));
        assert!(!redis.cli(&["HGETALL", &format!("{{t}}:inc:{id}")]).contains("442079460123"));
        assert!(!redis.cli(&["LRANGE", &format!("{{t}}:inc:{id}:tl"), "0", "-1"]).contains("442079460123"));
    }
    assert_eq!(redis.cli(&["EXISTS", &index]).trim(), "0");
    let inc = d.incident(&other);
    assert_eq!(inc["caller"], "+15550001234", "another caller is untouched");
    assert_eq!(inc["caller_name"], "Test Caller");
    assert!(!events(&inc).contains(&"note".to_string()));

    // Nothing left to erase; an unknown number erases nothing.
    assert_eq!(req(&d, "DELETE", "/v1/callers/%2B442079460123", None), (200, json!({"erased": 0})));
    assert_eq!(req(&d, "DELETE", "/v1/callers/+10000000000", None), (200, json!({"erased": 0})));
    assert_eq!(events(&d.incident(&a)).iter().filter(|e| *e == "note").count(), 1);

    std::thread::sleep(Duration::from_millis(300));
    let log = d.log();
    assert!(log.contains("caller erased"), "the erasure is logged");
    assert!(!log.contains("442079460123"), "the number appears in the log");
}

#[test]
fn closed_records_expire_after_the_retention() {
    let redis = Redis::start();
    let mut o = opts(&[("r-alpha", 1, &["*"])]);
    o.env.push(("DISPATCHD__PRIVACY__RETENTION".into(), "2s".into()));
    let d = Daemon::start(&redis, o);

    // Resolved by hand: the expiry is set at once, on the record and its timeline.
    let id = place_call(&d, "retention-1", "2");
    // Pretend intake indexed the caller: the index expires with its last record.
    redis.cli(&["HSET", &format!("{{t}}:inc:{id}"), "caller_pseudonym", "p-test"]);
    redis.cli(&["SADD", "{t}:caller:p-test", &id]);
    assert_eq!(req(&d, "POST", &format!("/v1/incidents/{id}/resolve"), None).0, 200);
    for key in [format!("{{t}}:inc:{id}"), format!("{{t}}:inc:{id}:tl"), "{t}:caller:p-test".to_string()] {
        let ttl: i64 = redis.cli(&["TTL", &key]).trim().parse().unwrap();
        assert!((1..=2).contains(&ttl), "{key}: TTL {ttl}");
    }
    wait_until("the record to expire", Duration::from_secs(6), || {
        http_get(d.http_port, &format!("/v1/incidents/{id}"), Some(ADMIN_TOKEN)).0 == 404
    });
    assert_eq!(redis.cli(&["EXISTS", &format!("{{t}}:inc:{id}:tl")]).trim(), "0");
    assert!(d.incidents("").is_empty());

    // Resolved by the responder: the sweep sets the expiry, then removes what is left.
    let mut alpha = Responder::connect(&d, "r-alpha");
    let two = open(&d, "outage", "high", "two")["id"].as_str().unwrap().to_string();
    let offer = alpha.recv_type("dispatch", S5).expect("dispatch");
    assert_eq!(alpha.request(json!({"type": "ack", "dispatch_id": offer["dispatch_id"]}), "a")["type"], "ok");
    let r = alpha.request(json!({"type": "status", "incident_id": two, "status": "resolved"}), "s");
    assert_eq!(r["type"], "ok");
    assert!(!redis.cli(&["ZSCORE", "{t}:closed", &two]).trim().is_empty());

    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = rt.block_on(async { dispatchd::store::Store::new(&redis.url(), "t", S5) }).unwrap();
    let retention = Duration::from_secs(2);
    // (The first record, closed over 2 s ago, goes from the lists now.)
    let mut removed = rt.block_on(store.expire_closed(retention)).unwrap();
    let ttl: i64 = redis.cli(&["PTTL", &format!("{{t}}:inc:{two}")]).trim().parse().unwrap();
    assert!(ttl > 0 && ttl <= 2000, "PTTL {ttl}");
    wait_until("the responder-resolved record to expire", Duration::from_secs(6), || {
        http_get(d.http_port, &format!("/v1/incidents/{two}"), Some(ADMIN_TOKEN)).0 == 404
    });
    removed += rt.block_on(store.expire_closed(retention)).unwrap();
    assert_eq!(removed, 2);
    for id in [&id, &two] {
        assert!(redis.cli(&["ZSCORE", "{t}:closed", id]).trim().is_empty());
        assert!(redis.cli(&["ZSCORE", "{t}:incidents", id]).trim().is_empty());
    }
    // Open incidents are not touched by the sweep.
    let open_one = open(&d, "outage", "low", "still open")["id"].as_str().unwrap().to_string();
    rt.block_on(store.expire_closed(retention)).unwrap();
    assert_eq!(redis.cli(&["TTL", &format!("{{t}}:inc:{open_one}")]).trim(), "-1");
    let state = d.incident(&open_one)["state"].clone();
    assert!(state == "queued" || state == "offered", "{state}");
}

/// A deployment whose keys are in the layout before the hash tag
/// (`<prefix>:…`) is moved to `{<prefix>}:…` at start: its incidents read
/// back, the counter goes on, nothing is left behind.
#[test]
fn keys_of_the_layout_before_the_hash_tag_are_moved_at_start() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, opts(&[("r-a", 1, &["*"])]));
    let first = open(&d, "outage", "high", "before the move")["id"].as_str().unwrap().to_string();
    drop(d);
    // Back to the old layout, as a daemon of the earlier version left it.
    let keys: Vec<String> = redis.cli(&["--scan", "--pattern", "{t}:*"]).lines().map(str::to_string).collect();
    assert!(keys.len() > 3, "{keys:?}");
    for k in &keys {
        redis.cli(&["RENAME", k, &format!("t:{}", &k["{t}:".len()..])]);
    }
    assert_eq!(redis.cli(&["EXISTS", "t:seq"]).trim(), "1");

    let d = Daemon::start(&redis, opts(&[("r-a", 1, &["*"])]));
    let (status, inc) = req(&d, "GET", &format!("/v1/incidents/{first}"), None);
    assert_eq!((status, inc["summary"].as_str()), (200, Some("before the move")), "{inc}");
    assert!(inc["timeline"].as_array().is_some_and(|t| !t.is_empty()), "{inc}");
    let second = open(&d, "outage", "high", "after the move")["id"].as_str().unwrap().to_string();
    assert_ne!(second, first, "the counter went on");
    assert_eq!(redis.cli(&["--scan", "--pattern", "t:*"]).trim(), "", "nothing left in the old layout");
    assert!(d.log().contains("moved the keys to the hash-tagged layout"), "a warn line says so");
}
