//! The ops plane: health, metrics, the two GET endpoints behind the admin
//! token, and the caller-data rule of contract §7 in the logs.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

fn call(d: &Daemon, call_id: &str, extra: &str) -> String {
    let p = UdpPeer::new(d);
    p.send(invite(p.port(), call_id, extra).as_bytes());
    let resp = p.recv_final(Duration::from_secs(5)).expect("answer");
    p.send(ack_for(&resp, p.port(), call_id).as_bytes());
    header_of(&resp, "X-Incident-Id").expect("id").to_string()
}

#[test]
fn health_metrics_and_auth() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, Options::default());
    assert_eq!(http_get(d.http_port, "/livez", None).0, 200);
    assert_eq!(http_get(d.http_port, "/readyz", None).0, 200);
    let id = call(&d, "api-1", "X-IVR-Path: 2\r\n");

    // No token, wrong token, wrong scheme: 401 with a JSON body.
    for token in [None, Some("wrong"), Some("")] {
        let (status, body) = http_get(d.http_port, "/v1/incidents", token);
        assert_eq!(status, 401, "{token:?}");
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap(), serde_json::json!({"error": "unauthorized"}));
        assert_eq!(http_get(d.http_port, &format!("/v1/incidents/{id}"), token).0, 401);
    }

    let inc = d.incident(&id);
    assert_eq!(inc["id"], id.as_str());
    assert_eq!(inc["severity"], "high");
    assert_eq!(inc["caller"], "+15550001234", "the record keeps the number");
    assert_eq!(inc["caller_name"], "Test Caller");
    assert_eq!(inc["assigned_to"], Value::Null);
    assert_eq!(inc["exhausted"], false);
    assert_eq!(inc["attempts"], 0);
    // Ids are case- and typo-tolerant the way Crockford base32 is.
    assert_eq!(d.incident(&id.to_lowercase())["id"], id.as_str());

    let (status, body) = http_get(d.http_port, "/v1/incidents/INC-ZZZZZZ", Some(ADMIN_TOKEN));
    assert_eq!((status, body.as_str()), (404, r#"{"error":"not_found"}"#));
    for bad in ["..%2F..%2Fetc", "%00", "%FF", &"A".repeat(5000)] {
        let (status, body) = http_get(d.http_port, &format!("/v1/incidents/{bad}"), Some(ADMIN_TOKEN));
        assert_eq!((status, body.as_str()), (404, r#"{"error":"not_found"}"#), "{bad}");
    }
    // A wrong method is JSON too.
    let (status, body) = http(d.http_port, "PUT", "/v1/incidents", Some(ADMIN_TOKEN), Some("{}"));
    assert_eq!((status, body.as_str()), (405, r#"{"error":"method_not_allowed"}"#));

    let m = http_get(d.http_port, "/metrics", None).1;
    for name in [
        "dispatchd_sip_requests_total",
        "dispatchd_sip_responses_total",
        "dispatchd_incidents_opened_total",
        "dispatchd_queue_depth",
        "dispatchd_redis_errors_total",
    ] {
        assert!(m.contains(name), "{name} missing from /metrics");
    }
    assert_eq!(metric_value(&m, "dispatchd_incidents_opened_total", "severity=\"high\""), 1.0);
    wait_until("queue depth gauge", Duration::from_secs(5), || {
        metric_value(&d.metrics(), "dispatchd_queue_depth", "severity=\"high\"") == 1.0
    });
}

#[test]
fn every_contract_metric_exists_from_the_start() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, Options::default());
    let m = d.metrics();
    for name in [
        "dispatchd_sip_requests_total{",
        "dispatchd_sip_responses_total{",
        "dispatchd_incidents_opened_total{",
        "dispatchd_queue_depth{",
        "dispatchd_dispatch_offers_total{",
        "dispatchd_call_to_offer_seconds_bucket{",
        "dispatchd_offer_to_ack_seconds_bucket{",
        "dispatchd_escalations_total{",
        "dispatchd_responders_connected ",
        "dispatchd_redis_errors_total ",
    ] {
        assert!(m.lines().any(|l| l.starts_with(name)), "{name} missing from a fresh daemon's /metrics:\n{m}");
    }
    assert_eq!(metric_value(&m, "dispatchd_incidents_opened_total", "category=\"outage\""), 0.0);
}

#[test]
fn list_filters_and_order() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, Options::default());
    let a = call(&d, "list-a", "X-IVR-Path: 9\r\n"); // low
    let b = call(&d, "list-b", "X-IVR-Path: 2,1\r\n"); // critical
    let c = call(&d, "list-c", "X-IVR-Path: 9\r\n"); // low

    let all = d.incidents("");
    let ids: Vec<&str> = all.iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [c.as_str(), b.as_str(), a.as_str()], "newest first");
    assert!(all.iter().all(|i| i.get("timeline").is_none()), "lists carry no timeline");

    let low = d.incidents("?severity=low");
    assert_eq!(low.iter().map(|i| i["id"].as_str().unwrap()).collect::<Vec<_>>(), [c.as_str(), a.as_str()]);
    assert_eq!(d.incidents("?severity=critical&state=queued&limit=10").len(), 1);
    assert_eq!(d.incidents("?state=resolved").len(), 0);
    assert_eq!(d.incidents("?limit=1").len(), 1);

    for q in ["?state=bogus", "?severity=urgent", "?limit=0", "?limit=abc", "?limit=100000", "?limit=-1"] {
        let (status, body) = http_get(d.http_port, &format!("/v1/incidents{q}"), Some(ADMIN_TOKEN));
        assert_eq!(status, 400, "{q}: {body}");
        assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].is_string(), "{q}");
    }
}

#[test]
fn caller_number_never_in_logs() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, Options::default());
    let extra = "P-Asserted-Identity: \"Jane Roe\" <sip:+442079460123@pbx.example>\r\n";
    let id = call(&d, "privacy-1", extra);
    assert_eq!(d.incident(&id)["caller"], "+442079460123");
    std::thread::sleep(Duration::from_millis(300));
    let log = d.log();
    assert!(log.contains(&id), "the log should mention the incident");
    for needle in ["+442079460123", "442079460123", "+15550001234", "15550001234"] {
        assert!(!log.contains(needle), "caller number {needle} appears in the log");
    }
    // The pseudonym is there instead: HMAC-SHA256(caller_key, number), first 16 hex.
    let pseudonym = {
        use hmac::{KeyInit, Mac};
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(CALLER_KEY.as_bytes()).unwrap();
        mac.update(b"+442079460123");
        hex::encode(mac.finalize().into_bytes())[..16].to_string()
    };
    assert!(log.contains(&pseudonym), "pseudonym {pseudonym} not logged");
    // Every log line is one JSON object.
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        assert!(serde_json::from_str::<Value>(line).is_ok(), "not JSON: {line}");
    }
}
