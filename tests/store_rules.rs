//! The rules of the core, driven straight through the store's scripts against
//! a real redis-server with explicit times: no daemon, no sleeps. Every case
//! picks its own times (`At::Ms`), so a rule that is judged by the wrong clock,
//! or at the wrong moment, fails here in milliseconds.
//!
//! Dispatch (contract §4): tiers, least recently dispatched first, skills,
//! decline, timeout, escalation, rounds, exhaustion, leases, major incidents.
//! Intake: repeat caller, surge, abandon storm, callback. And the incident id:
//! the Lua implementation and `domain::ids::incident_id` agree.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::Redis;
use dispatchd::domain::dispatch::{Answer, Availability};
use dispatchd::domain::ids::incident_id;
use dispatchd::domain::incident::{NewIncident, Severity, Source, State};
use dispatchd::domain::policy::{CorrelationSettings, Escalation};
use dispatchd::domain::timeline::{Entry, Event};
use dispatchd::store::dispatch::{RosterRow, StepPolicy};
use dispatchd::store::intake::{EventWrite, Rules, Storm};
use dispatchd::store::{At, Store};
use serde_json::json;

/// 2026-11-23T10:00:00Z: every case starts here and moves time by hand.
const T0: i64 = 1_795_428_000_000;
const S: i64 = 1000;
const DAEMON: &str = "d1";
/// Leases outlast every case but the one about leases.
const LEASE_MS: u64 = 24 * 3_600_000;
/// Other channels after 15 s; this "daemon" places no PBX calls.
const MORE: StepPolicy = StepPolicy { after_ms: 15_000, pbx: false };

struct Rig {
    redis: Redis,
    store: Store,
    rt: tokio::runtime::Runtime,
}

fn rig() -> Rig {
    let redis = Redis::start();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let store = rt.block_on(async { Store::new(&redis.url(), "t", Duration::from_secs(5)) }).unwrap();
    Rig { redis, store, rt }
}

/// Ack timeouts 30/60/120/300 s and `rounds` passes for every severity.
fn policy(rounds: u32) -> Escalation {
    Escalation {
        ack_timeout_ms: [30_000, 60_000, 120_000, 300_000],
        max_rounds: [rounds; 4],
        en_route_within_ms: [300_000; 4],
        on_scene_within_ms: [1_800_000; 4],
        release_after: [2; 4],
    }
}

fn new_incident(call_key: &str, severity: Severity, category: &str, pseudonym: &str) -> NewIncident {
    NewIncident {
        call_key: call_key.into(),
        call_id: call_key.into(),
        source: Source::Sip,
        caller: if pseudonym.is_empty() { String::new() } else { format!("+4420{pseudonym}") },
        caller_name: String::new(),
        caller_pseudonym: pseudonym.into(),
        ivr_path: Default::default(),
        queue: String::new(),
        wait_seconds: None,
        category: category.into(),
        severity,
        summary: format!("{category} test"),
        instructions: String::new(),
        age_ms: 0,
        timeline: vec![
            Entry::new(Event::Opened, "sip", json!({})),
            Entry::new(Event::Queued, "dispatchd", json!({"severity": severity})),
        ],
        generic: false,
    }
}

impl Rig {
    fn block<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.rt.block_on(f)
    }

    fn roster(&self, rows: &[(&str, u32, &str)]) {
        let rows: Vec<RosterRow> = rows
            .iter()
            .map(|(id, tier, skills)| RosterRow {
                id: id.to_string(),
                tier: *tier,
                skills: skills.split(',').map(str::to_string).collect(),
                channels: Vec::new(),
            })
            .collect();
        self.block(self.store.sync_roster(&rows)).unwrap();
    }

    fn connect(&self, rid: &str, at: i64) {
        self.block(self.store.connect(rid, DAEMON, LEASE_MS, At::Ms(at))).unwrap();
    }

    fn open_with(&self, n: &NewIncident, rules: &Rules, at: i64) -> dispatchd::store::intake::Opened {
        self.block(self.store.open(n, rules, &[], At::Ms(at))).unwrap()
    }

    fn open(&self, key: &str, severity: Severity, category: &str, at: i64) -> String {
        let o = self.open_with(&new_incident(key, severity, category, ""), &Rules::none(), at);
        assert_eq!(o.created, 1, "{key} opened");
        o.id
    }

    fn step(&self, rounds: u32, at: i64) -> dispatchd::store::dispatch::Step {
        self.block(self.store.step(64, &policy(rounds), MORE, DAEMON, At::Ms(at))).unwrap()
    }

    /// `(incident, responder)` of each offer one pass makes.
    fn offers(&self, rounds: u32, at: i64) -> Vec<(String, String)> {
        self.step(rounds, at).offers.into_iter().map(|o| (o.offer.incident_id, o.offer.responder)).collect()
    }

    fn answer(&self, rid: &str, dispatch_id: &str, ack: bool, at: i64) -> Answer {
        self.block(self.store.answer(rid, dispatch_id, ack, "busy elsewhere", None, &policy(3), At::Ms(at))).unwrap()
    }

    fn record(&self, id: &str) -> dispatchd::domain::incident::Incident {
        self.block(self.store.get(id)).unwrap().expect("record")
    }

    fn events(&self, id: &str) -> Vec<String> {
        self.record(id).timeline.unwrap().into_iter().map(|e| e.event).collect()
    }

    fn field(&self, id: &str, name: &str) -> Option<String> {
        self.block(self.store.field(id, name)).unwrap()
    }
}

/// Every entry a script wrote is a name of the enum, stamped with the time
/// the operation was given.
fn assert_timeline_in_vocabulary(r: &Rig, id: &str) {
    for e in r.record(id).timeline.unwrap() {
        assert!(Event::parse(&e.event).is_some(), "{id}: {} is not a timeline event", e.event);
        assert!(e.at.starts_with("2026-11-23T"), "{id}: {} stamped {} (not the given time)", e.event, e.at);
    }
}

#[test]
fn lua_and_rust_incident_ids_agree() {
    let r = rig();
    // Every width of the base-32 body and every check symbol (mod 37) is crossed.
    let mut seqs: Vec<u64> = (1..=80).collect();
    seqs.extend([1023, 1024, 1_048_575, 1_048_576, 33_554_431, 987_654_321, 1 << 40, (1 << 53) - 1]);
    for (i, seq) in seqs.into_iter().enumerate() {
        r.redis.cli(&["SET", "{t}:seq", &(seq - 1).to_string()]);
        let id = r.open(&format!("ids-{i}"), Severity::Low, "triage", T0);
        assert_eq!(id, incident_id(seq), "seq {seq}");
        assert_eq!(dispatchd::domain::ids::normalize_id(&id).as_deref(), Some(id.as_str()));
    }
}

#[test]
fn lowest_tier_first_then_least_recently_dispatched() {
    let r = rig();
    r.roster(&[("t2", 2, "*"), ("a", 1, "*"), ("b", 1, "*")]);
    for rid in ["t2", "a", "b"] {
        r.connect(rid, T0);
    }
    let i1 = r.open("c1", Severity::High, "outage", T0);
    let first = r.offers(3, T0 + S);
    assert_eq!(first.len(), 1);
    let tier1_first = first[0].1.clone();
    assert!(tier1_first == "a" || tier1_first == "b", "a tier-1 responder first: {first:?}");
    // Acked and resolved: free again, but now the most recently dispatched of tier 1.
    assert!(matches!(r.answer(&tier1_first, &format!("{i1}.1"), true, T0 + 2 * S), Answer::Acknowledged { .. }));
    r.block(r.store.status(&tier1_first, &i1, State::Resolved, "", None, &policy(3), At::Ms(T0 + 3 * S)))
        .unwrap()
        .unwrap();
    let i2 = r.open("c2", Severity::High, "outage", T0 + 4 * S);
    let second = r.offers(3, T0 + 5 * S);
    let other = if tier1_first == "a" { "b" } else { "a" };
    assert_eq!(second, [(i2, other.to_string())], "the other tier-1 responder, who waited longer");
}

/// An opening says whether anyone could take an offer now: the daemon runs
/// a dispatch pass for it only then (a responder who becomes free runs one).
#[test]
fn an_opening_says_whether_a_responder_is_idle() {
    let r = rig();
    let open = |key: &str, at: i64| r.open_with(&new_incident(key, Severity::High, "outage", ""), &Rules::none(), at);
    assert!(!open("c1", T0).idle, "nobody on the roster");
    r.roster(&[("solo", 1, "*")]);
    assert!(!open("c2", T0 + S).idle, "on the roster but not connected");
    r.connect("solo", T0 + 2 * S);
    let o = open("c3", T0 + 3 * S);
    assert!(o.idle && o.created == 1, "connected and available");
    r.block(r.store.set_availability("solo", Availability::Busy.as_str(), At::Ms(T0 + 4 * S))).unwrap();
    assert!(!open("c4", T0 + 5 * S).idle, "busy");
    // The pass a free responder runs finds what was opened meanwhile, most severe and oldest first.
    r.block(r.store.set_availability("solo", Availability::Available.as_str(), At::Ms(T0 + 6 * S))).unwrap();
    let offers = r.offers(3, T0 + 7 * S);
    assert_eq!(offers.len(), 1);
    assert_eq!(r.field(&offers[0].0, "call_key").as_deref(), Some("c1"));
}

#[test]
fn skills_decide_who_may_take_it_and_severity_decides_the_order() {
    let r = rig();
    r.roster(&[("sec", 1, "security"), ("any", 2, "*")]);
    r.connect("sec", T0);
    r.connect("any", T0);
    let low = r.open("low", Severity::Low, "outage", T0);
    let crit = r.open("crit", Severity::Critical, "outage", T0 + S);
    let sec = r.open("sec", Severity::Medium, "security", T0 + 2 * S);
    let offers = r.offers(3, T0 + 3 * S);
    // The critical incident first, to the only responder with the skill; the
    // security one to its specialist; the low one waits (nobody left).
    assert_eq!(offers, [(crit.clone(), "any".to_string()), (sec, "sec".to_string())]);
    assert_eq!(r.record(&low).state, State::Queued);
    assert_eq!(r.record(&crit).state, State::Offered);
}

/// A pass reads the queue a page at a time (16): an incident further down is
/// still found, and incidents taken off the queue on the way (offered, or
/// found closed) make no later one be skipped.
#[test]
fn a_deep_queue_is_read_page_by_page_skipping_nothing() {
    let r = rig();
    r.roster(&[("w1", 1, "water"), ("w2", 1, "water"), ("w3", 1, "water"), ("w4", 1, "water")]);
    for rid in ["w1", "w2", "w3", "w4"] {
        r.connect(rid, T0);
    }
    // Queue order = opening order: water at 0, 1, 16 and 32 (the first of the
    // second and third pages), outages nobody can take elsewhere, and at 17
    // and 18 two closed by a path that left them queued.
    let mut water = Vec::new();
    for i in 0..33 {
        let at = T0 + 10 * i64::from(i);
        if [0, 1, 16, 32].contains(&i) {
            water.push(r.open(&format!("w{i}"), Severity::High, "water", at));
        } else {
            let id = r.open(&format!("o{i}"), Severity::High, "outage", at);
            if i == 17 || i == 18 {
                r.redis.cli(&["HSET", &format!("{{t}}:inc:{id}"), "state", "cancelled"]);
            }
        }
    }
    let mut offered: Vec<String> = r.offers(3, T0 + S).into_iter().map(|(i, _)| i).collect();
    offered.sort();
    water.sort();
    assert_eq!(offered, water, "every water incident offered, none skipped");
}

#[test]
fn decline_and_timeout_withdraw_and_escalate_to_the_next_tier() {
    let r = rig();
    r.roster(&[("one", 1, "*"), ("two", 2, "*"), ("three", 3, "*")]);
    for rid in ["one", "two", "three"] {
        r.connect(rid, T0);
    }
    let id = r.open("c", Severity::Critical, "outage", T0);
    assert_eq!(r.offers(3, T0), [(id.clone(), "one".to_string())]);
    assert_eq!(r.field(&id, "ack_by_ms").as_deref(), Some((T0 + 30 * S).to_string().as_str()));

    // Declined: withdrawn, and the next tier gets it on the next pass.
    match r.answer("one", &format!("{id}.1"), false, T0 + 5 * S) {
        Answer::Declined(rel) => assert_eq!((rel.responder.as_str(), rel.reason.as_str()), ("one", "declined")),
        other => panic!("{other:?}"),
    }
    let step = r.step(3, T0 + 5 * S);
    assert_eq!(step.offers.len(), 1);
    assert_eq!(step.offers[0].offer.responder, "two");
    assert!(step.offers[0].escalated);
    assert_eq!(step.next_deadline_ms, Some(T0 + 35 * S));

    // One millisecond before the deadline nothing moves; at it, the offer is withdrawn.
    let early = r.step(3, T0 + 35 * S - 1);
    assert!(early.releases.is_empty() && early.offers.is_empty());
    let late = r.step(3, T0 + 35 * S);
    assert_eq!(late.releases.len(), 1);
    assert_eq!((late.releases[0].responder.as_str(), late.releases[0].reason.as_str()), ("two", "ack_timeout"));
    assert_eq!(late.offers[0].offer.responder, "three");
    assert_eq!(late.offers[0].offer.attempt, 3);

    // A stale answer to an offer taken back is refused; the live one is taken.
    assert_eq!(r.answer("two", &format!("{id}.2"), true, T0 + 36 * S), Answer::Refused("stale_dispatch".into()));
    assert_eq!(r.answer("two", &format!("{id}.9"), true, T0 + 36 * S), Answer::Refused("unknown_dispatch".into()));
    assert!(matches!(
        r.answer("three", &format!("{id}.3"), true, T0 + 36 * S),
        Answer::Acknowledged { offer_age_ms: Some(1000), repeated: false }
    ));
    let rec = r.record(&id);
    assert_eq!((rec.state, rec.assigned_to.as_deref(), rec.attempts), (State::Acknowledged, Some("three"), 3));
    let ev = r.events(&id);
    for want in ["declined", "withdrawn", "escalated", "ack_timeout", "acknowledged", "delivered"] {
        assert!(ev.iter().any(|e| e == want), "{want} in {ev:?}");
    }
    assert_eq!(ev.iter().filter(|e| *e == "escalated").count(), 2);
    assert_timeline_in_vocabulary(&r, &id);
}

#[test]
fn rounds_then_exhaustion_until_someone_becomes_available() {
    let r = rig();
    r.roster(&[("solo", 1, "*")]);
    r.connect("solo", T0);
    let id = r.open("c", Severity::Critical, "outage", T0);
    let mut t = T0;
    // Two rounds over a tier of one: offered, timed out, offered again.
    for attempt in 1..=2 {
        let s = r.step(2, t);
        assert_eq!(s.offers.len(), 1, "round {attempt}");
        assert_eq!(s.offers[0].offer.attempt, attempt);
        t += 30 * S;
    }
    // The second round's deadline passes: no third round, exhausted.
    let s = r.step(2, t);
    assert_eq!(s.releases.len(), 1);
    assert!(s.offers.is_empty());
    assert_eq!(s.exhausted.len(), 1);
    assert_eq!(s.exhausted[0].incident_id, id);
    let rec = r.record(&id);
    assert!(rec.exhausted && rec.state == State::Queued);
    // Not offered round and round to the same silent responder…
    assert!(r.offers(2, t + 60 * S).is_empty());
    // …but again once it *becomes* available after the exhaustion.
    r.block(r.store.set_availability("solo", Availability::Busy.as_str(), At::Ms(t + 61 * S))).unwrap();
    assert!(r.offers(2, t + 62 * S).is_empty());
    r.block(r.store.set_availability("solo", Availability::Available.as_str(), At::Ms(t + 63 * S))).unwrap();
    assert_eq!(r.offers(2, t + 64 * S), [(id.clone(), "solo".to_string())]);
    assert!(r.events(&id).iter().any(|e| e == "exhausted"));
    assert_timeline_in_vocabulary(&r, &id);
}

#[test]
fn leases_are_judged_by_the_given_clock() {
    const LEASE_MS: u64 = 30_000;
    let r = rig();
    r.roster(&[("r", 1, "*")]);
    r.block(r.store.connect("r", DAEMON, LEASE_MS, At::Ms(T0))).unwrap(); // lease until T0 + 30 s
    let id = r.open("c", Severity::High, "outage", T0);
    // Its daemon died: the lease lapses and nothing is offered to it.
    assert!(r.offers(3, T0 + LEASE_MS as i64).is_empty());
    assert_eq!(r.record(&id).state, State::Queued);
    // A lease renewed by its daemon makes it eligible again; another daemon's renewal does not.
    let renew = |daemon: &str, at: i64| {
        r.block(r.store.refresh_leases(daemon, LEASE_MS, &["r".to_string()], At::Ms(at))).unwrap()
    };
    renew("another-daemon", T0 + 31 * S);
    assert!(r.offers(3, T0 + 32 * S).is_empty());
    renew(DAEMON, T0 + 33 * S);
    assert_eq!(r.offers(3, T0 + 34 * S), [(id.clone(), "r".to_string())]);
    // Disconnected: the offer stays until its deadline, then goes back to the queue.
    r.block(r.store.disconnect("r", DAEMON, At::Ms(T0 + 35 * S))).unwrap();
    let s = r.step(3, T0 + 34 * S + 60 * S);
    assert_eq!(s.releases.len(), 1);
    assert!(s.offers.is_empty());
}

#[test]
fn a_major_incident_goes_to_the_highest_tier_first() {
    let r = rig();
    r.roster(&[("line", 1, "*"), ("duty-manager", 3, "*"), ("senior", 2, "*")]);
    for rid in ["line", "duty-manager", "senior"] {
        r.connect(rid, T0);
    }
    let rules = Rules::new(&surge(3, 600));
    let mut ids = Vec::new();
    for i in 0..3 {
        let o = r.open_with(&new_incident(&format!("s{i}"), Severity::Medium, "outage", ""), &rules, T0 + i * S);
        ids.push(o.id);
    }
    let major = r.block(r.store.get(&ids[0])).unwrap().unwrap().major_incident.expect("linked to the major");
    let step = r.step(3, T0 + 10 * S);
    let of_major = step.offers.iter().find(|o| o.offer.incident_id == major).expect("major offered");
    assert_eq!(of_major.offer.responder, "duty-manager");
    assert!(of_major.offer.major && !of_major.escalated);
}

fn surge(count: u32, window_s: u64) -> CorrelationSettings {
    let mut c = CorrelationSettings::default();
    c.repeat.enabled = false;
    c.surge.count = count;
    c.surge.window = Duration::from_secs(window_s);
    c
}

#[test]
fn surge_declares_one_major_incident_within_the_window_only() {
    let r = rig();
    let rules = Rules::new(&surge(3, 600));
    let open = |key: &str, cat: &str, at: i64| r.open_with(&new_incident(key, Severity::Medium, cat, ""), &rules, at);
    // Two outages, then a third after the window of the first: 2 within 10 min, no surge.
    assert!(open("a", "outage", T0).major.is_none());
    assert!(open("b", "outage", T0 + 300 * S).major.is_none());
    assert!(open("c", "outage", T0 + 601 * S).major.is_none());
    // Another category does not count towards this one.
    assert!(open("x", "security", T0 + 602 * S).major.is_none());
    // The fourth: b, c, d within the window.
    let d = open("d", "outage", T0 + 700 * S);
    assert!(d.major_created);
    assert_eq!(d.members, 3);
    let major = d.major.clone().unwrap();
    let rec = r.record(&major);
    assert!(rec.major && rec.severity == Severity::Critical && rec.category == "outage");
    assert_eq!(rec.members.len(), 3);
    // While it is open, later incidents join it; none declares a second one.
    let e = open("e", "outage", T0 + 701 * S);
    assert_eq!((e.major.as_deref(), e.major_created), (Some(major.as_str()), false));
    assert_eq!(r.record(&major).members.len(), 4);
    assert_timeline_in_vocabulary(&r, &major);
}

#[test]
fn repeat_caller_joins_the_open_incident_and_raises_it() {
    let r = rig();
    let mut c = CorrelationSettings::default();
    c.surge.enabled = false;
    c.repeat.window = Duration::from_secs(30 * 60);
    c.repeat.raise_after = 2;
    let rules = Rules::new(&c);
    let call = |key: &str, at: i64| r.open_with(&new_incident(key, Severity::Medium, "outage", "caller-1"), &rules, at);

    let first = call("call-1", T0);
    assert_eq!(first.created, 1);
    let second = call("call-2", T0 + 10 * 60 * S);
    assert_eq!(
        (second.id.as_str(), second.created, second.repeat_calls, second.raised),
        (first.id.as_str(), 0, Some(1), None)
    );
    // The window runs from the caller's last call: 29 minutes after the second still repeats.
    let third = call("call-3", T0 + 39 * 60 * S);
    assert_eq!(
        (third.id.as_str(), third.repeat_calls, third.raised),
        (first.id.as_str(), Some(2), Some(Severity::High))
    );
    let rec = r.record(&first.id);
    assert_eq!((rec.severity, rec.repeat_calls), (Severity::High, 2));
    // The same call re-sent is the same incident, not a repeat.
    let again = call("call-3", T0 + 40 * 60 * S);
    assert_eq!((again.id.as_str(), again.repeat_calls), (first.id.as_str(), None));
    // The same caller about another category: its own incident, related both ways.
    let security =
        r.open_with(&new_incident("call-s", Severity::High, "security", "caller-1"), &rules, T0 + 40 * 60 * S);
    assert_eq!((security.created, security.related.as_deref()), (1, Some(first.id.as_str())));
    assert_eq!(r.record(&first.id).related, std::slice::from_ref(&security.id));
    assert_eq!(r.record(&security.id).related, std::slice::from_ref(&first.id));
    // A call that chose nothing joins the latest; the category's own repeat joins its incident.
    let mut generic = new_incident("call-g", Severity::Medium, "triage", "caller-1");
    generic.generic = true;
    assert_eq!(r.open_with(&generic, &rules, T0 + 40 * 60 * S).id, security.id);
    assert_eq!(call("call-o", T0 + 40 * 60 * S).id, first.id);
    // Another caller is not folded in.
    let other = r.open_with(&new_incident("call-9", Severity::Medium, "outage", "caller-2"), &rules, T0 + 40 * 60 * S);
    assert_eq!(other.created, 1);
    // After the window, a new incident.
    let late = call("call-4", T0 + 71 * 60 * S);
    assert_eq!(late.created, 1);
    assert_ne!(late.id, first.id);
    // Once the incident is closed, the next call opens a new one too.
    r.block(r.store.close(&late.id, State::Resolved, "", Duration::from_secs(3600), At::Ms(T0 + 72 * 60 * S))).unwrap();
    assert_eq!(call("call-5", T0 + 73 * 60 * S).created, 1);
    assert_timeline_in_vocabulary(&r, &first.id);
}

fn abandon(call: &str, queue: &str, count: u32, window_s: u64) -> EventWrite {
    EventWrite {
        call_key: call.into(),
        source: "ami".into(),
        state: vec![("queue", queue.to_string())],
        entries: vec![Entry::new(Event::Abandoned, "ami", json!({"queue": queue}))],
        storm: Some(Storm {
            queue: queue.into(),
            count,
            window_ms: window_s * 1000,
            severity: Severity::High,
            wait_seconds: Some(20),
        }),
        ..EventWrite::default()
    }
}

#[test]
fn abandon_storm_opens_one_major_incident_per_queue() {
    let r = rig();
    let apply = |w: &EventWrite, at: i64| r.block(r.store.apply_event(w, At::Ms(at))).unwrap();
    // Three abandons within 5 minutes declare it; one outside the window does not count.
    assert!(apply(&abandon("x0", "support", 3, 300), T0).storm.is_none());
    assert!(apply(&abandon("x1", "support", 3, 300), T0 + 301 * S).storm.is_none());
    assert!(apply(&abandon("x2", "sales", 3, 300), T0 + 302 * S).storm.is_none());
    let third = apply(&abandon("x3", "support", 3, 300), T0 + 400 * S);
    assert!(third.storm.is_none(), "x0 is outside the window: two of three");
    let fourth = apply(&abandon("x4", "support", 3, 300), T0 + 500 * S);
    assert!(fourth.storm_created);
    let storm = fourth.storm.clone().unwrap();
    let rec = r.record(&storm);
    assert!(rec.major && rec.category == "abandon_storm" && rec.queue == "support" && rec.severity == Severity::High);
    // Later abandons go onto its timeline; no second storm incident.
    let fifth = apply(&abandon("x5", "support", 3, 300), T0 + 501 * S);
    assert_eq!((fifth.storm.as_deref(), fifth.storm_created), (Some(storm.as_str()), false));
    assert_eq!(r.events(&storm).iter().filter(|e| *e == "abandoned").count(), 1);
    assert_timeline_in_vocabulary(&r, &storm);
}

#[test]
fn callback_incident_for_a_long_wait_without_an_incident() {
    let r = rig();
    let mut w = abandon("cb-1", "support", 100, 300);
    let mut new = new_incident("cb-1", Severity::Low, "callback", "caller-cb");
    new.summary = "callback: caller abandoned queue support after 95s".into();
    w.callback = Some((new, Rules::none()));
    let applied = r.block(r.store.apply_event(&w, At::Ms(T0))).unwrap();
    let cb = applied.callback.expect("callback opened");
    assert_eq!(cb.created, 1);
    assert_eq!(applied.id, cb.id);
    let rec = r.record(&cb.id);
    assert_eq!((rec.category.as_str(), rec.severity, rec.state), ("callback", Severity::Low, State::Queued));
    assert_eq!(rec.opened_at, "2026-11-23T10:00:00.000Z");
    // The same abandon delivered again finds the call's incident; no second callback.
    let again = r.block(r.store.apply_event(&w, At::Ms(T0 + S))).unwrap();
    assert!(again.callback.is_none());
    assert_eq!(again.id, cb.id);
    assert_timeline_in_vocabulary(&r, &cb.id);
}

#[test]
fn one_responder_at_a_time_under_concurrent_passes() {
    // Several daemons share one Redis: interleaved passes never offer one
    // incident to two responders, nor two incidents to one.
    let r = rig();
    let rids: Vec<String> = (0..8).map(|i| format!("r{i}")).collect();
    let rows: Vec<(&str, u32, &str)> = rids.iter().map(|id| (id.as_str(), 1, "*")).collect();
    r.roster(&rows);
    for rid in &rids {
        r.connect(rid, T0);
    }
    for i in 0..20 {
        r.open(&format!("k{i}"), Severity::ALL[i % 4], "outage", T0 + i as i64);
    }
    let stores: Vec<Store> = (0..4).map(|_| r.store.clone()).collect();
    let steps = r.block(async {
        let passes = stores.iter().enumerate().map(|(i, s)| {
            let daemon = format!("d{i}");
            async move { s.step(64, &policy(3), MORE, &daemon, At::Ms(T0 + 100 * S)).await.unwrap() }
        });
        futures_util::future::join_all(passes).await
    });
    let offers: Vec<_> = steps.into_iter().flat_map(|s| s.offers).collect();
    assert_eq!(offers.len(), 8, "one offer per free responder");
    let incidents: HashSet<_> = offers.iter().map(|o| &o.offer.incident_id).collect();
    let responders: HashSet<_> = offers.iter().map(|o| &o.offer.responder).collect();
    assert_eq!((incidents.len(), responders.len()), (8, 8));
    // The most severe were taken first.
    assert!(offers.iter().all(|o| o.offer.severity <= Severity::High), "critical and high first");
}

#[test]
fn a_storm_timeline_is_capped_and_what_is_left_out_is_counted() {
    let r = rig();
    let cap = dispatchd::domain::timeline::TIMELINE_CAP;
    let apply = |i: usize| {
        r.block(r.store.apply_event(&abandon(&format!("s{i}"), "support", 3, 3600), At::Ms(T0 + i as i64))).unwrap()
    };
    let storm = (0..3).map(apply).last().unwrap().storm.expect("declared");
    for i in 3..(cap + 200) {
        apply(i);
    }
    let rec = r.record(&storm);
    let tl = rec.timeline.clone().unwrap();
    assert_eq!(tl.len(), cap, "capped");
    let kept = tl.iter().filter(|e| e.event == "abandoned").count();
    assert_eq!(
        rec.timeline_omitted.get("abandoned").copied(),
        Some((cap + 197 - kept) as u64),
        "{:?}",
        rec.timeline_omitted
    );
    // The dispatch's own entries still go on: closing it is on the timeline.
    r.block(r.store.close(&storm, State::Cancelled, "", Duration::from_secs(60), At::Ms(T0 + 10 * S))).unwrap();
    assert_eq!(r.events(&storm).last().map(String::as_str), Some("cancelled"));
}

/// Closing one of a caller's incidents is O(1), however many the caller had:
/// no pass over the caller's whole history. The caller's index expires only
/// once none of their incidents is open.
#[test]
fn closing_does_not_read_the_callers_history() {
    let r = rig();
    let rules = Rules::none();
    let open = |key: &str| r.open_with(&new_incident(key, Severity::Low, "outage", "busy-caller"), &rules, T0).id;
    let ids: Vec<String> = (0..300).map(|i| open(&format!("h{i}"))).collect();
    let close = |id: &str| {
        r.block(r.store.close(id, State::Resolved, "", Duration::from_secs(3600), At::Ms(T0 + S))).unwrap();
    };
    for id in &ids[..299] {
        close(id);
    }
    assert_eq!(r.redis.cli(&["PTTL", "{t}:caller:busy-caller"]).trim(), "-1", "one is still open");
    r.redis.cli(&["CONFIG", "RESETSTAT"]);
    close(&ids[299]);
    let stats = r.redis.cli(&["INFO", "commandstats"]);
    assert!(!stats.contains("cmdstat_smembers"), "no read of the caller's incidents: {stats}");
    let ttl: i64 = r.redis.cli(&["PTTL", "{t}:caller:busy-caller"]).trim().parse().unwrap();
    assert!(ttl > 0, "the index expires with the last record: {ttl}");
}
