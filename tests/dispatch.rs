//! Dispatch end to end: calls on the incident line become `dispatch` frames to
//! responders over real websockets; acks, declines, deadlines and escalation
//! follow contract §4.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const S5: Duration = Duration::from_secs(5);

fn opts(members: &[(&str, u32, &[&str])], ack_timeout: &str, max_rounds: u32) -> Options {
    Options { extra: format!("{}{}", roster(members), escalation(ack_timeout, max_rounds)), ..Default::default() }
}

#[test]
fn call_reaches_responder_ack_and_status_follow() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, opts(&[("r-alpha", 1, &["outage"])], "30s", 3));
    let mut alpha = Responder::connect(&d, "r-alpha");
    let id = place_call(&d, "dispatch-1", "2,1");

    let offer = alpha.recv_type("dispatch", S5).expect("dispatch frame");
    assert_eq!(offer["incident_id"], id.as_str());
    assert_eq!(offer["severity"], "critical");
    assert_eq!(offer["category"], "outage");
    assert_eq!(offer["attempt"], 1);
    assert_eq!(offer["caller"], "•••••••••234", "masked: all but the last three");
    assert_eq!(offer["instructions"], "Isolate the affected feeder.");
    assert!(offer["ack_by"].as_str().unwrap().ends_with('Z'));
    let inc = d.incident(&id);
    assert_eq!(inc["state"], "offered");
    assert_eq!(inc["assigned_to"], "r-alpha");

    let dispatch_id = offer["dispatch_id"].as_str().unwrap().to_string();
    let r = alpha.request(json!({"type": "ack", "dispatch_id": dispatch_id}), "a1");
    assert_eq!(r, json!({"type": "ok", "ref": "a1"}));
    assert_eq!(d.incident(&id)["state"], "acknowledged");

    for (status, state) in [("en_route", "en_route"), ("on_scene", "on_scene"), ("resolved", "resolved")] {
        let r = alpha.request(json!({"type": "status", "incident_id": id, "status": status, "note": "ok"}), status);
        assert_eq!(r["type"], "ok", "{r}");
        assert_eq!(d.incident(&id)["state"], state);
    }
    let inc = d.incident(&id);
    let ev = events(&inc);
    for e in
        ["opened", "classified", "queued", "offered", "delivered", "acknowledged", "en_route", "on_scene", "resolved"]
    {
        assert!(ev.contains(&e.to_string()), "{e} missing from {ev:?}");
    }
    let ack = inc["timeline"].as_array().unwrap().iter().find(|e| e["event"] == "acknowledged").unwrap();
    assert_eq!(ack["actor"], "r-alpha");
    // Going backwards is not allowed.
    let r = alpha.request(json!({"type": "status", "incident_id": id, "status": "en_route"}), "back");
    assert_eq!(r["code"], "not_allowed");

    let m = d.metrics();
    assert_eq!(metric_value(&m, "dispatchd_responders_connected", ""), 1.0);
    assert!(metric_value(&m, "dispatchd_call_to_offer_seconds_count", "") >= 1.0, "{m}");
    assert!(metric_value(&m, "dispatchd_offer_to_ack_seconds_count", "") >= 1.0);
    assert!(metric_value(&m, "dispatchd_dispatch_offers_total", "outcome=\"acknowledged\"") >= 1.0);
}
