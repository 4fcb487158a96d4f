//! The correlation rules of issue 5, each at its threshold and one below it,
//! end to end (real binary, real Redis): repeat callers, callbacks, abandon
//! storms, surges (major incidents offered to the highest tier first) — and
//! the caller status endpoint through an incident's whole life.

mod common;

use std::time::Duration;

use common::call_event as event;
use common::*;
use serde_json::{Value, json};

const S5: Duration = Duration::from_secs(5);

/// One correlation configuration: the rules named on, every other rule off.
fn rules(repeat: &str, callback: &str, storm: &str, surge: &str) -> String {
    let table = |name: &str, body: &str| {
        if body.is_empty() {
            format!("[correlation.{name}]\nenabled = false\n\n")
        } else {
            format!("[correlation.{name}]\n{body}\n\n")
        }
    };
    [table("repeat", repeat), table("callback", callback), table("abandon_storm", storm), table("surge", surge)]
        .concat()
}

fn daemon(redis: &Redis, correlation: String, extra: String) -> Daemon {
    Daemon::start(redis, Options { correlation, extra, ..Default::default() })
}

/// A call from `caller` (P-Asserted-Identity) on the incident line; returns its incident id.
fn call_from(d: &Daemon, caller: &str, call_id: &str, ivr_path: &str) -> String {
    let p = UdpPeer::new(d);
    let extra = format!("P-Asserted-Identity: <sip:{caller}@pbx.example>\r\nX-IVR-Path: {ivr_path}\r\n");
    p.send(invite(p.port(), call_id, &extra).as_bytes());
    let resp = p.recv_final(S5).expect("answer to INVITE");
    p.send(ack_for(&resp, p.port(), call_id).as_bytes());
    assert_eq!(status_of(&resp), 603, "{resp}");
    header_of(&resp, "X-Incident-Id").unwrap_or_else(|| panic!("no incident id: {resp}")).to_string()
}

/// An abandon of `queue` by `caller` after `wait` seconds, for call `call_ref`.
fn abandon(d: &Daemon, call_ref: &str, caller: &str, queue: &str, wait: u32) -> String {
    let resp = event(
        d,
        &format!("ab-{call_ref}"),
        &format!(
            "X-Event: queue-abandon\r\nX-Call-Ref: {call_ref}\r\nX-Queue: {queue}\r\nX-Wait-Seconds: {wait}\r\n\
             P-Asserted-Identity: <sip:{caller}@pbx.example>\r\n"
        ),
    );
    assert_eq!(status_of(&resp), 202, "{resp}");
    resp
}

fn timeline_of<'a>(inc: &'a Value, event: &str) -> Vec<&'a Value> {
    inc["timeline"].as_array().unwrap().iter().filter(|e| e["event"] == event).collect()
}

#[test]
fn repeat_caller_attaches_and_every_second_repeat_raises_severity() {
    let redis = Redis::start();
    let d = daemon(&redis, rules("window = \"30m\"\nraise_after = 2", "", "", ""), String::new());
    let caller = "+15550007001";
    let first = call_from(&d, caller, "rep-1", "9"); // enquiry / low
    assert_eq!(d.incident(&first)["severity"], "low");

    // One below the threshold: a first repeat attaches, the severity stays.
    let again = call_from(&d, caller, "rep-2", "9");
    assert_eq!(again, first, "the repeat call is answered with the open incident");
    let inc = d.incident(&first);
    assert_eq!(inc["severity"], "low");
    assert_eq!(inc["repeat_calls"], 1);
    let reps = timeline_of(&inc, "repeat_call");
    assert_eq!(reps.len(), 1);
    assert_eq!(reps[0]["detail"]["call_id"], "rep-2");

    // At the threshold: the second repeat raises it one level, on the timeline.
    assert_eq!(call_from(&d, caller, "rep-3", "9"), first);
    let inc = d.incident(&first);
    assert_eq!(inc["severity"], "medium");
    assert_eq!(inc["repeat_calls"], 2);
    let raised: Vec<_> =
        timeline_of(&inc, "classified").into_iter().filter(|e| e["detail"]["rule"] == "repeat_call").collect();
    assert_eq!(raised.len(), 1, "{inc}");
    assert_eq!(raised[0]["detail"]["from"], "low");
    // The third repeat does not; the fourth raises again.
    call_from(&d, caller, "rep-4", "9");
    assert_eq!(d.incident(&first)["severity"], "medium");
    call_from(&d, caller, "rep-5", "9");
    assert_eq!(d.incident(&first)["severity"], "high");
    assert_eq!(d.incidents("").len(), 1, "no incident was opened for the repeats");

    // Another caller opens their own; a closed incident takes no repeats.
    let other = call_from(&d, "+15550007002", "rep-6", "9");
    assert_ne!(other, first);
    let (code, _) = http(d.http_port, "POST", &format!("/v1/incidents/{first}/resolve"), Some(ADMIN_TOKEN), None);
    assert_eq!(code, 200);
    let after = call_from(&d, caller, "rep-7", "9");
    assert_ne!(after, first, "a new incident once the old one is closed");
    assert_eq!(d.incident(&after)["repeat_calls"], 0);
    let m = d.metrics();
    assert_eq!(metric_value(&m, "dispatchd_correlations_total", "rule=\"repeat_call\""), 4.0);
    assert_eq!(metric_value(&m, "dispatchd_correlations_total", "rule=\"severity_raised\""), 2.0);
    assert!(!d.log().contains(caller), "caller number in the log");
}

#[test]
fn repeat_window_is_counted_from_the_last_call() {
    let redis = Redis::start();
    let d = daemon(&redis, rules("window = \"1500ms\"\nraise_after = 0", "", "", ""), String::new());
    let caller = "+15550007101";
    let first = call_from(&d, caller, "win-1", "2");
    std::thread::sleep(Duration::from_millis(900));
    assert_eq!(call_from(&d, caller, "win-2", "2"), first, "within the window");
    std::thread::sleep(Duration::from_millis(900));
    // 1.8 s after the first call, 0.9 s after the last: still a repeat.
    assert_eq!(call_from(&d, caller, "win-3", "2"), first, "the window slides with each call");
    assert_eq!(d.incident(&first)["severity"], "high", "raise_after = 0 never raises");
    std::thread::sleep(Duration::from_millis(2000));
    assert_ne!(call_from(&d, caller, "win-4", "2"), first, "past the window: a new incident");
}

#[test]
fn long_abandon_opens_a_callback_incident_short_one_does_not() {
    let redis = Redis::start();
    let d = daemon(&redis, rules("", "abandon_after = \"60s\"\nseverity = \"low\"", "", ""), String::new());
    // One below: waited exactly 60 s, not longer.
    let resp = abandon(&d, "cb-1", "+15550007201", "support", 60);
    assert!(header_of(&resp, "X-Incident-Id").is_none(), "{resp}");
    assert!(d.incidents("").is_empty());

    // At the threshold: 61 s.
    let resp = abandon(&d, "cb-2", "+15550007202", "support", 61);
    let id = header_of(&resp, "X-Incident-Id").expect("callback incident id").to_string();
    let inc = d.incident(&id);
    assert_eq!(inc["category"], "callback");
    assert_eq!(inc["severity"], "low");
    assert_eq!(inc["source"], "sip");
    assert_eq!(inc["caller"], "+15550007202", "the number to call back is in the record");
    assert_eq!(inc["queue"], "support");
    assert_eq!(inc["wait_seconds"], 61);
    let opened = &timeline_of(&inc, "opened")[0]["detail"];
    assert_eq!(opened["rule"], "callback");
    assert_eq!(d.incidents("").len(), 1);

    // A call that already has an incident gets `abandoned` on it, not a callback.
    // (The INVITE's call key is its Call-ID.)
    let own = call_from(&d, "+15550007203", "cb-3", "2");
    abandon(&d, "cb-3", "+15550007203", "support", 300);
    let inc = d.incident(&own);
    let ab = timeline_of(&inc, "abandoned");
    assert_eq!(ab.len(), 1, "{inc}");
    assert_eq!(ab[0]["detail"]["wait_seconds"], 300);
    assert_eq!(d.incidents("").len(), 2, "no callback for a call with an incident");
    assert_eq!(metric_value(&d.metrics(), "dispatchd_correlations_total", "rule=\"callback\""), 1.0);
}

#[test]
fn abandon_storm_opens_one_major_incident_per_queue() {
    let redis = Redis::start();
    let storm = "count = 3\nwindow = \"5m\"\nseverity = \"high\"";
    let d = daemon(&redis, rules("", "", storm, ""), String::new());
    // One below: two abandons on "billing", one on another queue.
    abandon(&d, "st-1", "+15550007301", "billing", 5);
    abandon(&d, "st-2", "+15550007302", "billing", 5);
    abandon(&d, "st-x", "+15550007309", "sales", 5);
    assert!(d.incidents("").is_empty(), "below the threshold nothing opens");

    // At the threshold.
    let resp = abandon(&d, "st-3", "+15550007303", "billing", 5);
    let list = d.incidents("");
    assert_eq!(list.len(), 1, "{list:?}");
    let id = list[0]["id"].as_str().unwrap().to_string();
    assert!(header_of(&resp, "X-Incident-Id").is_none(), "the abandoning call itself has no incident");
    let inc = d.incident(&id);
    assert_eq!(inc["major"], true);
    assert_eq!(inc["category"], "abandon_storm");
    assert_eq!(inc["severity"], "high");
    assert_eq!(inc["queue"], "billing");
    assert_eq!(timeline_of(&inc, "opened")[0]["detail"]["count"], 3);

    // More abandons go onto the storm's timeline; no second storm incident.
    for i in 4..=6 {
        abandon(&d, &format!("st-{i}"), &format!("+1555000731{i}"), "billing", 5);
    }
    assert_eq!(d.incidents("").len(), 1);
    assert_eq!(timeline_of(&d.incident(&id), "abandoned").len(), 3);
    assert_eq!(metric_value(&d.metrics(), "dispatchd_correlations_total", "rule=\"abandon_storm\""), 1.0);
    // The storm's caller data: none (it is about a queue, not a caller).
    assert_eq!(inc["caller"], "");
}

#[test]
fn surge_declares_a_major_incident_offered_to_the_highest_tier_first() {
    let redis = Redis::start();
    let surge = "count = 2\nwindow = \"10m\"\nseverity = \"critical\"";
    let members: &[(&str, u32, &[&str])] =
        &[("r-one-a", 1, &["outage"]), ("r-one-b", 1, &["outage"]), ("r-two", 2, &["outage"])];
    let d = daemon(&redis, rules("", "", "", surge), format!("{}{}", roster(members), escalation("30s", 3)));
    let mut one_a = Responder::connect(&d, "r-one-a");
    let mut one_b = Responder::connect(&d, "r-one-b");
    let mut two = Responder::connect(&d, "r-two");

    // One below the threshold: an ordinary incident, offered to a tier-1 responder.
    let first = call_from(&d, "+15550007401", "sg-1", "2");
    let (tier1_first, tier1_other) = match one_a.recv_type("dispatch", Duration::from_secs(2)) {
        Some(f) => (f, &mut one_b),
        None => (one_b.recv_type("dispatch", S5).expect("offer to tier 1"), &mut one_a),
    };
    assert_eq!(tier1_first["incident_id"], first.as_str());
    assert_eq!(tier1_first["major"], false);
    assert!(d.incidents("").iter().all(|i| i["major"] == false));

    // At the threshold: the second outage declares the major incident.
    let second = call_from(&d, "+15550007402", "sg-2", "2");
    let majors: Vec<Value> = d.incidents("").into_iter().filter(|i| i["major"] == true).collect();
    assert_eq!(majors.len(), 1);
    let major = majors[0]["id"].as_str().unwrap().to_string();
    let inc = d.incident(&major);
    assert_eq!(inc["severity"], "critical");
    assert_eq!(inc["category"], "outage");
    let mut both = vec![first.clone(), second.clone()];
    both.sort();
    assert_eq!(inc["members"], json!(both));
    for m in [&first, &second] {
        assert_eq!(d.incident(m)["major_incident"], major.as_str());
    }
    // With a tier-1 and a tier-2 responder free, the major goes to tier 2 and
    // the ordinary incident to tier 1.
    let offer = two.recv_type("dispatch", S5).expect("the major incident offered to tier 2");
    assert_eq!(offer["incident_id"], major.as_str());
    assert_eq!(offer["major"], true);
    let other = tier1_other.recv_type("dispatch", S5).expect("the second incident offered to tier 1");
    assert_eq!(other["incident_id"], second.as_str());

    // A later incident of the category joins the open major incident.
    let third = call_from(&d, "+15550007403", "sg-3", "2");
    assert_eq!(d.incident(&third)["major_incident"], major.as_str());
    assert_eq!(d.incident(&major)["members"].as_array().unwrap().len(), 3);
    assert_eq!(d.incidents("").iter().filter(|i| i["major"] == true).count(), 1, "one major, not one per incident");
    assert_eq!(metric_value(&d.metrics(), "dispatchd_correlations_total", "rule=\"surge\""), 1.0);
}

#[test]
fn caller_status_follows_the_incident_through_its_life() {
    let redis = Redis::start();
    let d = daemon(
        &redis,
        rules("", "", "", ""),
        format!("{}{}", roster(&[("r-alpha", 1, &["outage"])]), escalation("30s", 3)),
    );
    let caller = "+15550007501";
    let path = format!("/v1/callers/{}/status", caller.replace('+', "%2B"));
    let status = || {
        let (code, body) = http_get(d.http_port, &path, Some(ADMIN_TOKEN));
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<Value>(&body).unwrap()
    };
    assert_eq!(status()["state"], "none");
    assert_eq!(http_get(d.http_port, &path, None).0, 401);
    assert_eq!(http_get(d.http_port, "/v1/callers/%0A/status", Some(ADMIN_TOKEN)).0, 400);

    let id = call_from(&d, caller, "cs-1", "2");
    let s = status();
    assert_eq!(s["state"], "queued");
    assert_eq!(s["incident_id"], id.as_str());
    assert!(s["message"].as_str().unwrap().contains("waiting for a responder"), "{s}");
    assert!(s.get("eta_s").is_none());

    let mut alpha = Responder::connect(&d, "r-alpha");
    let offer = alpha.recv_type("dispatch", S5).expect("dispatch");
    assert_eq!(status()["state"], "offered");
    let r = alpha.request(json!({"type": "ack", "dispatch_id": offer["dispatch_id"]}), "a");
    assert_eq!(r["type"], "ok");
    assert_eq!(status()["state"], "acknowledged");

    let r = alpha.request(json!({"type": "status", "incident_id": id, "status": "en_route", "eta_s": 600}), "e");
    assert_eq!(r["type"], "ok", "{r}");
    let s = status();
    assert_eq!(s["state"], "en_route");
    let eta = s["eta_s"].as_i64().expect("eta_s while en route");
    assert!((590..=600).contains(&eta), "{s}");
    assert_eq!(s["message"], "A responder is on the way and should be with you in about 10 minutes.");
    let inc = d.incident(&id);
    assert_eq!(timeline_of(&inc, "en_route")[0]["detail"]["eta_s"], 600);

    let r = alpha.request(json!({"type": "status", "incident_id": id, "status": "on_scene"}), "o");
    assert_eq!(r["type"], "ok");
    let s = status();
    assert_eq!(s["state"], "on_scene");
    assert!(s.get("eta_s").is_none(), "{s}");

    let r = alpha.request(json!({"type": "status", "incident_id": id, "status": "resolved"}), "r");
    assert_eq!(r["type"], "ok");
    assert_eq!(status()["state"], "none", "no open incident once resolved");
    assert!(!d.log().contains(caller), "caller number in the log");
    // A bad eta is refused and changes nothing.
    let r = alpha.request(json!({"type": "status", "incident_id": id, "status": "en_route", "eta_s": "soon"}), "b");
    assert_eq!(r["code"], "bad_request");
}

#[test]
fn erasure_forgets_callers_known_only_from_call_events() {
    let redis = Redis::start();
    let d = daemon(&redis, rules("", "", "", ""), String::new());
    let caller = "+15550007601";
    let join = format!(
        "X-Event: queue-join\r\nX-Call-Ref: er-1\r\nX-Queue: support\r\nP-Asserted-Identity: <sip:{caller}@pbx.example>\r\n"
    );
    assert_eq!(status_of(&event(&d, "er-join", &join)), 202);
    assert!(d.incidents("").is_empty(), "a join of an ordinary queue opens nothing");
    // Remembered for the call's later events by pseudonym only, never the number (issue 10).
    assert_eq!(redis.cli(&["HGET", "{t}:acall:er-1", "caller"]).trim(), "");
    assert_eq!(redis.cli(&["HGET", "{t}:acall:er-1", "caller_pseudonym"]).trim().len(), 16);

    let path = format!("/v1/callers/{}", caller.replace('+', "%2B"));
    let (code, body) = http(d.http_port, "DELETE", &path, Some(ADMIN_TOKEN), None);
    assert_eq!(code, 200, "{body}");
    assert_eq!(redis.cli(&["EXISTS", "{t}:acall:er-1"]).trim(), "0", "what was remembered of the call is gone");
    let keys = redis.cli(&["--scan", "--pattern", "t:*"]);
    assert!(!keys.contains(caller), "{keys}");
}

#[test]
fn a_repeat_calls_ivr_input_is_recorded_but_does_not_reclassify() {
    let redis = Redis::start();
    let d = daemon(&redis, rules("window = \"30m\"\nraise_after = 0", "", "", ""), String::new());
    let caller = "+15550007701";
    let first = call_from(&d, caller, "rc-own", "2,1"); // outage / critical
    // A repeat of the same category (issue 10: another category opens its own incident).
    assert_eq!(call_from(&d, caller, "rc-repeat", "2"), first);
    let classified = |inc: &Value| timeline_of(inc, "classified").len();
    let before = d.incident(&first);

    // The repeat call's menu choice (general enquiry) must not downgrade a critical outage.
    let ivr = |call_ref: &str, path: &str| {
        let resp = event(
            &d,
            &format!("ivr-{call_ref}-{}", path.replace(',', "-")),
            &format!("X-Event: ivr\r\nX-Call-Ref: {call_ref}\r\nX-IVR-Path: {path}\r\n"),
        );
        assert_eq!(status_of(&resp), 202, "{resp}");
        assert_eq!(header_of(&resp, "X-Incident-Id"), Some(first.as_str()));
    };
    ivr("rc-repeat", "9");
    let inc = d.incident(&first);
    assert_eq!((inc["severity"].as_str(), inc["category"].as_str()), (Some("critical"), Some("outage")));
    assert_eq!(classified(&inc), classified(&before));
    assert_eq!(timeline_of(&inc, "ivr_input").len(), 1, "the input is on the timeline");

    // The incident's own call still reclassifies it.
    ivr("rc-own", "2,1,3");
    let inc = d.incident(&first);
    assert_eq!(inc["category"], "gas");
    assert_eq!(classified(&inc), classified(&before) + 1);
}
