//! The dispatch rules end to end (contract §4, §5, §8): deadlines, declines,
//! escalation across tiers, `max_rounds`, the waiting queue, skills,
//! availability, disconnects and status rules — each with real websocket
//! responders against the real binary and its own Redis.
//!
//! Timing: every wait has a generous upper bound; nothing fails because the
//! machine is slow except a responder that needs several seconds between
//! reading a frame and answering it.

mod common;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::*;
use serde_json::{Value, json};

const HEARTBEAT: &str = "5s";

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// Roster plus the same deadline and max_rounds for every severity.
fn opts(members: &[(&str, u32, &[&str])], ack_timeout: &str, max_rounds: u32) -> Options {
    Options {
        extra: format!("{}{}", roster(members), escalation(ack_timeout, max_rounds)),
        heartbeat: HEARTBEAT,
        ..Default::default()
    }
}

fn ts(v: &Value) -> DateTime<Utc> {
    let s = v.as_str().unwrap_or_else(|| panic!("not a timestamp: {v}"));
    DateTime::parse_from_rfc3339(s).unwrap_or_else(|e| panic!("{s}: {e}")).with_timezone(&Utc)
}

// ---- a responder client that keeps every frame -------------------------------

/// A responder whose frames are buffered, so waiting for one kind of frame
/// never throws another away (e.g. an `ok` and a `cancel` in either order).
struct Client {
    id: String,
    r: Responder,
    backlog: VecDeque<Value>,
    /// Every frame received on this connection, in order.
    seen: Vec<Value>,
    closed: bool,
}

impl Client {
    fn connect(d: &Daemon, id: &str) -> Client {
        Client {
            id: id.to_string(),
            r: Responder::connect(d, id),
            backlog: VecDeque::new(),
            seen: Vec::new(),
            closed: false,
        }
    }

    /// Reads at most one frame within `wait`. Pings are answered by tungstenite.
    fn pump(&mut self, wait: Duration) -> bool {
        if self.closed {
            std::thread::sleep(wait.min(Duration::from_millis(20)));
            return false;
        }
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = self.r.ws.get_mut() {
            s.set_read_timeout(Some(wait.max(Duration::from_millis(1)))).unwrap();
        }
        match self.r.ws.read() {
            Ok(tungstenite::Message::Text(t)) => {
                let v: Value = serde_json::from_str(t.as_str())
                    .unwrap_or_else(|_| json!({"type": "<not json>", "text": t.as_str()}));
                self.seen.push(v.clone());
                self.backlog.push_back(v);
                true
            }
            Ok(tungstenite::Message::Close(f)) => {
                self.closed = true;
                self.seen.push(json!({"type": "<closed>", "frame": format!("{f:?}")}));
                false
            }
            Ok(_) => false,
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                false
            }
            Err(e) => {
                self.closed = true;
                self.seen.push(json!({"type": "<closed>", "error": e.to_string()}));
                false
            }
        }
    }

    /// The first buffered or incoming frame matching `pred`, within `wait`.
    fn wait_for(&mut self, wait: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        let end = Instant::now() + wait;
        loop {
            if let Some(pos) = self.backlog.iter().position(&pred) {
                return self.backlog.remove(pos);
            }
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.pump(left.min(Duration::from_millis(100)));
        }
    }

    fn send(&mut self, v: Value) {
        self.r.send(v);
    }

    /// Sends `v` with `"id": reference` and returns the reply echoing it.
    fn request(&mut self, mut v: Value, reference: &str) -> Value {
        v["id"] = Value::from(reference);
        self.send(v.clone());
        self.wait_for(secs(10), |f| f["ref"] == reference)
            .unwrap_or_else(|| panic!("{}: no reply to {v}; frames so far: {:?}", self.id, self.seen))
    }

    fn dispatches(&self, incident: &str) -> Vec<Value> {
        self.seen.iter().filter(|f| f["type"] == "dispatch" && f["incident_id"] == incident).cloned().collect()
    }

    /// Dispatch ids of `incident` this connection received and was not sent a `cancel` for.
    fn holds(&self, incident: &str) -> Vec<String> {
        let prefix = format!("{incident}.");
        let mut open: Vec<String> = Vec::new();
        for f in &self.seen {
            let Some(did) = f["dispatch_id"].as_str() else { continue };
            if !did.starts_with(&prefix) {
                continue;
            }
            if f["type"] == "dispatch" && !open.iter().any(|o| o == did) {
                open.push(did.to_string());
            } else if f["type"] == "cancel" {
                open.retain(|o| o != did);
            }
        }
        open
    }

    /// Closes the websocket properly and waits for the socket to end.
    fn close(mut self) {
        let _ = self.r.ws.close(None);
        let end = Instant::now() + secs(5);
        while Instant::now() < end {
            if let tungstenite::stream::MaybeTlsStream::Plain(s) = self.r.ws.get_mut() {
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
            }
            match self.r.ws.read() {
                Ok(_) => continue,
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
                {
                    continue;
                }
                Err(_) => return,
            }
        }
    }
}

/// Several responders read in turn, with the "one holder at a time" check.
struct Crew {
    cs: Vec<Client>,
}

impl Crew {
    fn new(cs: Vec<Client>) -> Crew {
        Crew { cs }
    }

    fn get(&mut self, id: &str) -> &mut Client {
        self.cs.iter_mut().find(|c| c.id == id).unwrap_or_else(|| panic!("no client {id}"))
    }

    fn add(&mut self, c: Client) {
        self.cs.push(c);
    }

    /// Reads from every client for `dur` (keeps the sockets answering pings).
    fn pump_for(&mut self, dur: Duration) {
        let end = Instant::now() + dur;
        while Instant::now() < end {
            for c in &mut self.cs {
                c.pump(Duration::from_millis(20));
            }
        }
    }

    fn holders(&self, incident: &str) -> Vec<(String, Vec<String>)> {
        self.cs.iter().map(|c| (c.id.clone(), c.holds(incident))).filter(|(_, h)| !h.is_empty()).collect()
    }

    /// At most one responder holds an un-cancelled dispatch of `incident`, and
    /// that one holds a single dispatch id. A `cancel` the daemon already
    /// decided on may still be in flight on another socket: wait up to 3 s for it.
    fn assert_one_holder(&mut self, incident: &str) {
        self.pump_for(Duration::from_millis(150));
        let end = Instant::now() + secs(3);
        loop {
            let h = self.holders(incident);
            let ok = h.len() <= 1 && h.iter().all(|(_, ids)| ids.len() == 1);
            if ok {
                return;
            }
            if Instant::now() >= end {
                let seen: Vec<_> = self.cs.iter().map(|c| (c.id.clone(), c.seen.clone())).collect();
                panic!("{incident} held by more than one responder (or twice): {h:?}\nframes: {seen:#?}");
            }
            self.pump_for(Duration::from_millis(100));
        }
    }

    /// Waits for a `dispatch` of `incident` to any client; returns (responder, frame).
    /// Checks the one-holder rule whenever a dispatch arrives.
    fn wait_dispatch(&mut self, incident: &str, wait: Duration) -> (String, Value) {
        let end = Instant::now() + wait;
        loop {
            for i in 0..self.cs.len() {
                let c = &mut self.cs[i];
                if let Some(pos) =
                    c.backlog.iter().position(|f| f["type"] == "dispatch" && f["incident_id"] == incident)
                {
                    let f = c.backlog.remove(pos).unwrap();
                    let id = c.id.clone();
                    self.assert_one_holder(incident);
                    return (id, f);
                }
            }
            if Instant::now() >= end {
                let seen: Vec<_> = self.cs.iter().map(|c| (c.id.clone(), c.seen.clone())).collect();
                panic!("no dispatch of {incident} within {wait:?}; frames: {seen:#?}");
            }
            for c in &mut self.cs {
                c.pump(Duration::from_millis(20));
            }
        }
    }

    /// No client receives a `dispatch` (of anything) for `dur`.
    fn assert_no_dispatch_for(&mut self, dur: Duration, why: &str) {
        let before: Vec<usize> = self.cs.iter().map(|c| c.seen.len()).collect();
        self.pump_for(dur);
        for (c, n) in self.cs.iter().zip(before) {
            let new: Vec<&Value> = c.seen[n..].iter().filter(|f| f["type"] == "dispatch").collect();
            assert!(new.is_empty(), "{why}: {} was sent {new:?}", c.id);
        }
    }
}

// ---- the incident record -------------------------------------------------------

fn timeline(inc: &Value) -> Vec<Value> {
    inc["timeline"].as_array().cloned().unwrap_or_default()
}

/// The events of the dispatch rules, in order, without `delivered` and the intake ones.
fn rule_events(inc: &Value) -> Vec<String> {
    const RULES: [&str; 7] =
        ["offered", "ack_timeout", "declined", "withdrawn", "acknowledged", "escalated", "exhausted"];
    events(inc).into_iter().filter(|e| RULES.contains(&e.as_str())).collect()
}

fn entries<'a>(tl: &'a [Value], event: &str) -> Vec<&'a Value> {
    tl.iter().filter(|e| e["event"] == event).collect()
}

/// Offers alternate with their end: `offered` only when no offer is open,
/// `withdrawn` / `acknowledged` only for the open one, by the same responder
/// and dispatch id. Returns the responders offered, in order.
fn assert_alternation(inc: &Value) -> Vec<String> {
    let mut open: Option<(String, String)> = None;
    let mut acked = false;
    let mut offered = Vec::new();
    for e in timeline(inc) {
        let rid = e["detail"]["responder"].as_str().unwrap_or("").to_string();
        let did = e["detail"]["dispatch_id"].as_str().unwrap_or("").to_string();
        match e["event"].as_str().unwrap_or("") {
            "offered" => {
                assert!(open.is_none(), "offered while {open:?} was open: {:#?}", inc["timeline"]);
                assert!(!acked, "offered after an acknowledgement: {:#?}", inc["timeline"]);
                offered.push(rid.clone());
                open = Some((rid, did));
            }
            "withdrawn" | "acknowledged" => {
                let o = open
                    .take()
                    .unwrap_or_else(|| panic!("{} without an open offer: {:#?}", e["event"], inc["timeline"]));
                assert_eq!((rid, did), o, "{} does not match the open offer: {:#?}", e["event"], inc["timeline"]);
                if e["event"] == "acknowledged" {
                    acked = true;
                }
            }
            _ => {}
        }
    }
    offered
}

fn wait_state(d: &Daemon, id: &str, state: &str, crew: Option<&mut Crew>) -> Value {
    let end = Instant::now() + secs(10);
    let mut crew = crew;
    loop {
        let inc = d.incident(id);
        if inc["state"] == state {
            return inc;
        }
        assert!(Instant::now() < end, "{id} never reached {state}: {inc:#}");
        match crew.as_deref_mut() {
            Some(c) => c.pump_for(Duration::from_millis(100)),
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// A call to `sip:<ruri_user>@…` (category from the Request-URI), no IVR path.
fn place_call_to(d: &Daemon, call_id: &str, ruri_user: &str) -> String {
    let p = UdpPeer::new(d);
    let fix =
        |s: String| s.replacen("sip:incident@127.0.0.1 SIP/2.0", &format!("sip:{ruri_user}@127.0.0.1 SIP/2.0"), 1);
    p.send(fix(invite(p.port(), call_id, "")).as_bytes());
    let resp = p.recv_final(secs(5)).expect("answer to INVITE");
    p.send(fix(ack_for(&resp, p.port(), call_id)).as_bytes());
    header_of(&resp, "X-Incident-Id").unwrap_or_else(|| panic!("no incident id: {resp}")).to_string()
}

fn other(ids: &[&str], one: &str) -> String {
    ids.iter().find(|i| **i != one).unwrap().to_string()
}

// ---- 1. deadline -------------------------------------------------------------

#[test]
fn no_ack_is_withdrawn_and_offered_to_the_next_in_tier() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, opts(&[("r-a", 1, &["outage"]), ("r-b", 1, &["outage"])], "3s", 3));
    let mut crew = Crew::new(vec![Client::connect(&d, "r-a"), Client::connect(&d, "r-b")]);
    let id = place_call(&d, "rules-timeout-1", "2,1");

    let (first, offer1) = crew.wait_dispatch(&id, secs(10));
    let second = other(&["r-a", "r-b"], &first);
    let d1 = offer1["dispatch_id"].as_str().unwrap().to_string();
    assert_eq!(d1, format!("{id}.1"));
    assert_eq!(offer1["attempt"], 1);
    let inc = d.incident(&id);
    assert_eq!(
        (inc["state"].as_str(), inc["assigned_to"].as_str()),
        (Some("offered"), Some(first.as_str())),
        "{inc:#}"
    );

    // The first never answers: cancel (ack_timeout), then the second is offered it.
    let cancel = crew
        .get(&first)
        .wait_for(secs(3 + 10), |f| f["type"] == "cancel")
        .unwrap_or_else(|| panic!("no cancel to {first}"));
    assert_eq!(cancel, json!({"type": "cancel", "dispatch_id": d1, "reason": "ack_timeout"}));
    let (got, offer2) = crew.wait_dispatch(&id, secs(10));
    assert_eq!(got, second, "the second responder of the tier is next");
    let d2 = offer2["dispatch_id"].as_str().unwrap().to_string();
    assert_eq!(d2, format!("{id}.2"));
    assert_eq!(offer2["attempt"], 2);

    // The late ack of the first is refused; the second acks.
    let r = crew.get(&first).request(json!({"type": "ack", "dispatch_id": d1}), "late");
    assert_eq!(r["type"], "error", "{r}");
    assert_eq!(r["code"], "stale_dispatch", "{r}");
    let r = crew.get(&second).request(json!({"type": "ack", "dispatch_id": d2}), "ack2");
    assert_eq!(r, json!({"type": "ok", "ref": "ack2"}));
    crew.assert_one_holder(&id);
    assert_eq!(crew.get(&second).holds(&id), vec![d2.clone()]);
    assert!(crew.get(&first).holds(&id).is_empty());

    let inc = d.incident(&id);
    assert_eq!(inc["state"], "acknowledged");
    assert_eq!(inc["assigned_to"], second.as_str());
    assert_eq!(rule_events(&inc), ["offered", "ack_timeout", "withdrawn", "offered", "acknowledged"], "{inc:#}");
    assert_eq!(assert_alternation(&inc), [first.clone(), second.clone()]);
    let tl = timeline(&inc);
    let timeout = entries(&tl, "ack_timeout")[0];
    assert_eq!(timeout["detail"]["responder"], first.as_str());
    assert!(ts(&timeout["at"]) >= ts(&offer1["ack_by"]), "withdrawn before its deadline: {timeout} vs {offer1}");
    assert_eq!(entries(&tl, "withdrawn")[0]["detail"]["reason"], "ack_timeout");
    assert!(!events(&inc).contains(&"escalated".to_string()), "same tier: no escalation");

    // Nothing more for the first one.
    crew.assert_no_dispatch_for(secs(1), "after the acknowledgement");
    let m = d.metrics();
    assert!(metric_value(&m, "dispatchd_dispatch_offers_total", "outcome=\"ack_timeout\"") >= 1.0, "{m}");
}

// ---- 2. decline --------------------------------------------------------------

#[test]
fn decline_moves_on_at_once() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, opts(&[("r-a", 1, &["outage"]), ("r-b", 1, &["outage"])], "30s", 3));
    let mut crew = Crew::new(vec![Client::connect(&d, "r-a"), Client::connect(&d, "r-b")]);
    let id = place_call(&d, "rules-decline-1", "2,1");

    let (first, offer1) = crew.wait_dispatch(&id, secs(10));
    let second = other(&["r-a", "r-b"], &first);
    let d1 = offer1["dispatch_id"].as_str().unwrap().to_string();
    let deadline = ts(&offer1["ack_by"]);

    let r = crew.get(&first).request(json!({"type": "decline", "dispatch_id": d1, "reason": "too far"}), "dec");
    assert_eq!(r, json!({"type": "ok", "ref": "dec"}));
    let cancel = crew.get(&first).wait_for(secs(5), |f| f["type"] == "cancel").expect("cancel after decline");
    assert_eq!(cancel, json!({"type": "cancel", "dispatch_id": d1, "reason": "declined"}));

    let (got, offer2) = crew.wait_dispatch(&id, secs(15));
    assert!(Utc::now() < deadline, "the next offer waited for the first deadline");
    assert_eq!(got, second);
    assert_eq!(offer2["dispatch_id"], format!("{id}.2"));
    let r = crew.get(&second).request(json!({"type": "ack", "dispatch_id": offer2["dispatch_id"]}), "ack2");
    assert_eq!(r["type"], "ok", "{r}");

    let inc = d.incident(&id);
    assert_eq!(rule_events(&inc), ["offered", "declined", "withdrawn", "offered", "acknowledged"], "{inc:#}");
    assert_eq!(assert_alternation(&inc), [first.clone(), second.clone()]);
    let tl = timeline(&inc);
    let declined = entries(&tl, "declined")[0];
    assert_eq!(declined["actor"], first.as_str(), "{declined}");
    assert_eq!(declined["detail"]["reason"], "too far", "{declined}");
    assert_eq!(declined["detail"]["dispatch_id"], d1.as_str(), "{declined}");
    assert_eq!(entries(&tl, "withdrawn")[0]["detail"]["reason"], "declined");
    crew.assert_one_holder(&id);
    let m = d.metrics();
    assert!(metric_value(&m, "dispatchd_dispatch_offers_total", "outcome=\"declined\"") >= 1.0, "{m}");
}

// ---- 3. escalation -------------------------------------------------------------

#[test]
fn silent_tier_escalates_to_the_next() {
    let redis = Redis::start();
    let members: &[(&str, u32, &[&str])] = &[("r-a", 1, &["outage"]), ("r-b", 1, &["outage"]), ("r-c", 2, &["outage"])];
    let d = Daemon::start(&redis, opts(members, "3s", 3));
    let mut crew = Crew::new(vec![Client::connect(&d, "r-a"), Client::connect(&d, "r-b"), Client::connect(&d, "r-c")]);
    let id = place_call(&d, "rules-escalate-1", "2,1");

    // Tier 1, one after the other, both silent.
    let (t1a, o1) = crew.wait_dispatch(&id, secs(10));
    assert_ne!(t1a, "r-c", "tier 2 offered before tier 1");
    let (t1b, o2) = crew.wait_dispatch(&id, secs(3 + 10));
    assert_ne!(t1b, "r-c", "tier 2 offered before the whole of tier 1 was tried");
    assert_ne!(t1b, t1a);
    assert_eq!(crew.get(&t1a).wait_for(secs(5), |f| f["type"] == "cancel").unwrap()["dispatch_id"], o1["dispatch_id"]);

    // Then tier 2.
    let (t2, o3) = crew.wait_dispatch(&id, secs(3 + 10));
    assert_eq!(t2, "r-c");
    assert_eq!(o3["attempt"], 3);
    let c2 =
        crew.get(&t1b).wait_for(secs(5), |f| f["type"] == "cancel").expect("cancel to the second tier-1 responder");
    assert_eq!(c2, json!({"type": "cancel", "dispatch_id": o2["dispatch_id"], "reason": "ack_timeout"}));
    let r = crew.get("r-c").request(json!({"type": "ack", "dispatch_id": o3["dispatch_id"]}), "ack3");
    assert_eq!(r["type"], "ok", "{r}");

    let inc = d.incident(&id);
    assert_eq!(
        rule_events(&inc),
        [
            "offered",
            "ack_timeout",
            "withdrawn",
            "offered",
            "ack_timeout",
            "withdrawn",
            "escalated",
            "offered",
            "acknowledged"
        ],
        "{inc:#}"
    );
    assert_eq!(assert_alternation(&inc), [t1a, t1b, "r-c".to_string()]);
    let tl = timeline(&inc);
    let esc = entries(&tl, "escalated");
    assert_eq!(esc.len(), 1, "{esc:?}");
    assert_eq!(esc[0]["detail"]["from_tier"], 1, "{}", esc[0]);
    assert_eq!(esc[0]["detail"]["to_tier"], 2, "{}", esc[0]);
    let m = d.metrics();
    assert!(metric_value(&m, "dispatchd_escalations_total", "severity=\"critical\"") > 0.0, "{m}");
}

// ---- 4. max_rounds ---------------------------------------------------------------

#[test]
fn max_rounds_exhausts_then_waits_for_someone_becoming_available() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, opts(&[("r-a", 1, &["outage"])], "3s", 2));
    let mut crew = Crew::new(vec![Client::connect(&d, "r-a")]);
    let id = place_call(&d, "rules-rounds-1", "2,1");

    // Two rounds of one offer each, never answered.
    for attempt in 1..=2 {
        let (_, o) = crew.wait_dispatch(&id, secs(3 + 10));
        assert_eq!(o["attempt"], attempt);
        assert_eq!(o["dispatch_id"], format!("{id}.{attempt}"));
        let c = crew.get("r-a").wait_for(secs(3 + 10), |f| f["type"] == "cancel").expect("cancel");
        assert_eq!(c, json!({"type": "cancel", "dispatch_id": o["dispatch_id"], "reason": "ack_timeout"}));
    }
    let inc = wait_state(&d, &id, "queued", Some(&mut crew));
    let end = Instant::now() + secs(10);
    let inc = {
        let mut inc = inc;
        while !events(&inc).contains(&"exhausted".to_string()) && Instant::now() < end {
            crew.pump_for(Duration::from_millis(200));
            inc = d.incident(&id);
        }
        inc
    };
    assert_eq!(inc["state"], "queued", "{inc:#}");
    assert_eq!(inc["exhausted"], true, "{inc:#}");
    assert_eq!(
        rule_events(&inc),
        ["offered", "ack_timeout", "withdrawn", "offered", "ack_timeout", "withdrawn", "exhausted"],
        "{inc:#}"
    );
    assert_eq!(entries(&timeline(&inc), "exhausted")[0]["detail"]["rounds"], 2);
    assert_alternation(&inc);

    // A WARN log line names the incident.
    let warn = d
        .log()
        .lines()
        .any(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| v["level"] == "WARN") && l.contains(id.as_str()));
    assert!(warn, "no WARN line mentioning {id}:\n{}", d.log());

    // Not offered again to the same responder on its own.
    crew.assert_no_dispatch_for(secs(5), "after exhaustion, the same responder without becoming available");
    assert_eq!(d.incident(&id)["state"], "queued");

    // Becoming available (busy → available) makes it eligible again.
    let r = crew.get("r-a").request(json!({"type": "availability", "status": "busy"}), "busy");
    assert_eq!(r, json!({"type": "ok", "ref": "busy"}));
    crew.assert_no_dispatch_for(secs(1), "while busy");
    let r = crew.get("r-a").request(json!({"type": "availability", "status": "available"}), "avail");
    assert_eq!(r, json!({"type": "ok", "ref": "avail"}));
    let (_, o) = crew.wait_dispatch(&id, secs(10));
    assert_eq!(o["attempt"], 3);
    let r = crew.get("r-a").request(json!({"type": "ack", "dispatch_id": o["dispatch_id"]}), "ack3");
    assert_eq!(r["type"], "ok", "{r}");
    let inc = d.incident(&id);
    assert_eq!(inc["state"], "acknowledged");
    assert_eq!(inc["assigned_to"], "r-a");
    assert_alternation(&inc);
}

// ---- 5. the queue ------------------------------------------------------------------

#[test]
fn nobody_available_queue_is_served_by_severity() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, opts(&[("r-a", 1, &["*"])], "30s", 3));
    let low = place_call(&d, "rules-queue-low", "9");
    let critical = place_call(&d, "rules-queue-critical", "2,1");
    for (id, sev) in [(&low, "low"), (&critical, "critical")] {
        let inc = wait_state(&d, id, "queued", None);
        assert_eq!(inc["severity"], sev);
    }
    wait_until("queue depth gauges", secs(10), || {
        let m = d.metrics();
        metric_value(&m, "dispatchd_queue_depth", "severity=\"low\"") == 1.0
            && metric_value(&m, "dispatchd_queue_depth", "severity=\"critical\"") == 1.0
    });
    std::thread::sleep(secs(1));
    for id in [&low, &critical] {
        let inc = d.incident(id);
        assert_eq!(inc["state"], "queued", "{inc:#}");
        assert!(!events(&inc).contains(&"offered".to_string()), "{inc:#}");
    }

    // The first to come online gets the critical one, although it is newer.
    let mut crew = Crew::new(vec![Client::connect(&d, "r-a")]);
    let (_, o) = crew.wait_dispatch(&critical, secs(10));
    assert_eq!(o["severity"], "critical");
    assert!(crew.get("r-a").dispatches(&low).is_empty(), "low offered before critical");
    let r = crew.get("r-a").request(json!({"type": "ack", "dispatch_id": o["dispatch_id"]}), "ack-c");
    assert_eq!(r["type"], "ok", "{r}");

    // Busy with it: the low one waits.
    crew.assert_no_dispatch_for(secs(2), "while assigned to the critical incident");
    assert_eq!(d.incident(&low)["state"], "queued");

    let r = crew.get("r-a").request(json!({"type": "status", "incident_id": critical, "status": "resolved"}), "res");
    assert_eq!(r, json!({"type": "ok", "ref": "res"}));
    let (_, o) = crew.wait_dispatch(&low, secs(10));
    assert_eq!(o["severity"], "low");
    assert_eq!(o["attempt"], 1);
    let inc = d.incident(&low);
    assert_eq!(inc["state"], "offered");
    assert_eq!(inc["assigned_to"], "r-a");
    assert_eq!(d.incident(&critical)["state"], "resolved");
}

// ---- 6. skills ---------------------------------------------------------------------

#[test]
fn skills_decide_who_is_offered() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, opts(&[("r-sec", 1, &["security"]), ("r-any", 2, &["*"])], "30s", 3));
    let mut crew = Crew::new(vec![Client::connect(&d, "r-sec")]);
    let outage = place_call(&d, "rules-skills-outage", "2,1");

    // Tier 1 but the wrong skill: never offered it.
    crew.assert_no_dispatch_for(secs(3), "security-only responder and an outage incident");
    let inc = d.incident(&outage);
    assert_eq!(inc["state"], "queued", "{inc:#}");
    assert_eq!(inc["category"], "outage");

    crew.add(Client::connect(&d, "r-any"));
    let (got, o) = crew.wait_dispatch(&outage, secs(10));
    assert_eq!(got, "r-any");
    let r = crew.get("r-any").request(json!({"type": "ack", "dispatch_id": o["dispatch_id"]}), "ack");
    assert_eq!(r["type"], "ok", "{r}");
    assert!(crew.get("r-sec").dispatches(&outage).is_empty());
    let inc = d.incident(&outage);
    assert_eq!(assert_alternation(&inc), ["r-any"]);

    // Its own category does reach it.
    let sec = place_call_to(&d, "rules-skills-security", "incident-security");
    let (got, o) = crew.wait_dispatch(&sec, secs(10));
    assert_eq!(got, "r-sec");
    assert_eq!(o["category"], "security");
}

// ---- 7. availability -------------------------------------------------------------

#[test]
fn busy_and_off_duty_are_not_offered_anything() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, opts(&[("r-a", 1, &["outage"])], "30s", 3));
    let mut crew = Crew::new(vec![Client::connect(&d, "r-a")]);
    let r = crew.get("r-a").request(json!({"type": "availability", "status": "busy"}), "b");
    assert_eq!(r, json!({"type": "ok", "ref": "b"}));
    let id = place_call(&d, "rules-avail-1", "2,1");

    crew.assert_no_dispatch_for(secs(3), "busy");
    assert_eq!(d.incident(&id)["state"], "queued");

    let r = crew.get("r-a").request(json!({"type": "availability", "status": "off_duty"}), "o");
    assert_eq!(r, json!({"type": "ok", "ref": "o"}));
    crew.assert_no_dispatch_for(secs(3), "off_duty");
    assert_eq!(d.incident(&id)["state"], "queued");

    let r = crew.get("r-a").request(json!({"type": "availability", "status": "available"}), "a");
    assert_eq!(r, json!({"type": "ok", "ref": "a"}));
    let (_, o) = crew.wait_dispatch(&id, secs(10));
    assert_eq!(o["attempt"], 1);
    let inc = d.incident(&id);
    assert_eq!(inc["state"], "offered");
    assert_eq!(inc["assigned_to"], "r-a");
}

// ---- 8. disconnects ------------------------------------------------------------------

#[test]
fn reconnect_before_the_deadline_gets_the_same_dispatch() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, opts(&[("r-a", 1, &["outage"]), ("r-b", 1, &["outage"])], "30s", 3));
    let mut crew = Crew::new(vec![Client::connect(&d, "r-a"), Client::connect(&d, "r-b")]);
    let id = place_call(&d, "rules-reconnect-1", "2,1");
    let (first, o1) = crew.wait_dispatch(&id, secs(10));
    let second = other(&["r-a", "r-b"], &first);

    // Gone (a proper close) before answering.
    let pos = crew.cs.iter().position(|c| c.id == first).unwrap();
    crew.cs.remove(pos).close();
    crew.assert_no_dispatch_for(secs(3), "while the offered responder is away");
    let inc = d.incident(&id);
    assert_eq!(
        (inc["state"].as_str(), inc["assigned_to"].as_str()),
        (Some("offered"), Some(first.as_str())),
        "{inc:#}"
    );

    // Back: the same dispatch again, before its deadline.
    crew.add(Client::connect(&d, &first));
    let (got, o2) = crew.wait_dispatch(&id, secs(10));
    assert_eq!(got, first);
    assert!(Utc::now() < ts(&o1["ack_by"]));
    assert_eq!(o2["dispatch_id"], o1["dispatch_id"]);
    assert_eq!(o2["attempt"], 1);
    assert_eq!(o2["ack_by"], o1["ack_by"]);
    let r = crew.get(&first).request(json!({"type": "ack", "dispatch_id": o2["dispatch_id"]}), "ack");
    assert_eq!(r, json!({"type": "ok", "ref": "ack"}));

    assert!(crew.get(&second).dispatches(&id).is_empty(), "offered to the other responder as well");
    let inc = d.incident(&id);
    assert_eq!(inc["state"], "acknowledged");
    assert_eq!(inc["assigned_to"], first.as_str());
    assert_eq!(inc["attempts"], 1);
    assert_eq!(rule_events(&inc), ["offered", "acknowledged"], "{inc:#}");
    assert_eq!(assert_alternation(&inc), [first]);
}

#[test]
fn responder_gone_for_good_loses_the_offer_at_the_deadline() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, opts(&[("r-a", 1, &["outage"]), ("r-b", 1, &["outage"])], "3s", 3));
    let mut crew = Crew::new(vec![Client::connect(&d, "r-a"), Client::connect(&d, "r-b")]);
    let id = place_call(&d, "rules-gone-1", "2,1");
    let (first, o1) = crew.wait_dispatch(&id, secs(10));
    let second = other(&["r-a", "r-b"], &first);

    // The socket just drops (no close frame) and never comes back.
    let pos = crew.cs.iter().position(|c| c.id == first).unwrap();
    drop(crew.cs.remove(pos));

    // Watch the record while waiting: first, then nobody, then the second; never back.
    let mut seen: Vec<(String, String)> = Vec::new();
    let end = Instant::now() + secs(3 + 15);
    let o2 = loop {
        let inc = d.incident(&id);
        let now =
            (inc["state"].as_str().unwrap_or("").to_string(), inc["assigned_to"].as_str().unwrap_or("").to_string());
        if seen.last() != Some(&now) {
            seen.push(now);
        }
        let c = crew.get(&second);
        if let Some(o) = c.wait_for(Duration::from_millis(100), |f| f["type"] == "dispatch" && f["incident_id"] == id) {
            break o;
        }
        assert!(Instant::now() < end, "never offered to {second}; record went {seen:?}");
    };
    let inc = d.incident(&id);
    seen.push((inc["state"].as_str().unwrap_or("").to_string(), inc["assigned_to"].as_str().unwrap_or("").to_string()));
    let owners: Vec<&str> = seen.iter().map(|(_, a)| a.as_str()).filter(|a| !a.is_empty()).collect();
    let switches = owners.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(
        owners.first() == Some(&first.as_str()) && owners.last() == Some(&second.as_str()) && switches == 1,
        "{seen:?}"
    );
    for (state, who) in &seen {
        assert!(
            (state == "queued" && who.is_empty()) || (state == "offered" && !who.is_empty()),
            "state {state} assigned to {who:?}: {seen:?}"
        );
    }

    assert_eq!(o2["dispatch_id"], format!("{id}.2"));
    let r = crew.get(&second).request(json!({"type": "ack", "dispatch_id": o2["dispatch_id"]}), "ack");
    assert_eq!(r["type"], "ok", "{r}");
    let inc = d.incident(&id);
    assert_eq!(inc["assigned_to"], second.as_str());
    assert_eq!(rule_events(&inc), ["offered", "ack_timeout", "withdrawn", "offered", "acknowledged"], "{inc:#}");
    assert_eq!(assert_alternation(&inc), [first.clone(), second.clone()]);
    let timeout = entries(&timeline(&inc), "ack_timeout")[0].clone();
    assert!(ts(&timeout["at"]) >= ts(&o1["ack_by"]), "withdrawn before the deadline: {timeout} vs {o1}");
}

// ---- 9. status rules ---------------------------------------------------------------

#[test]
fn status_only_from_the_assigned_responder() {
    let redis = Redis::start();
    let d = Daemon::start(&redis, opts(&[("r-a", 1, &["outage"]), ("r-b", 1, &["outage"])], "30s", 3));
    let mut crew = Crew::new(vec![Client::connect(&d, "r-a"), Client::connect(&d, "r-b")]);

    let one = place_call(&d, "rules-status-1", "2,1");
    let (x, o) = crew.wait_dispatch(&one, secs(10));
    let r = crew.get(&x).request(json!({"type": "ack", "dispatch_id": o["dispatch_id"]}), "ack1");
    assert_eq!(r["type"], "ok", "{r}");
    let y = other(&["r-a", "r-b"], &x);
    let two = place_call(&d, "rules-status-2", "2");
    let (got, o) = crew.wait_dispatch(&two, secs(10));
    assert_eq!(got, y, "{x} is busy with {one}");
    let r = crew.get(&y).request(json!({"type": "ack", "dispatch_id": o["dispatch_id"]}), "ack2");
    assert_eq!(r["type"], "ok", "{r}");

    let step = |crew: &mut Crew, who: &str, id: &str, status: &str, reference: &str| {
        crew.get(who).request(json!({"type": "status", "incident_id": id, "status": status, "note": "n"}), reference)
    };

    let r = step(&mut crew, &x, &one, "en_route", "x1");
    assert_eq!(r, json!({"type": "ok", "ref": "x1"}));
    assert_eq!(d.incident(&one)["state"], "en_route");

    // Someone else's incident: not_allowed, ref echoed, nothing changes, the socket carries on.
    let before = d.incident(&one);
    let r = step(&mut crew, &y, &one, "on_scene", "y-wrong");
    assert_eq!(r["type"], "error", "{r}");
    assert_eq!(r["code"], "not_allowed", "{r}");
    assert_eq!(r["ref"], "y-wrong", "{r}");
    let after = d.incident(&one);
    assert_eq!(after["state"], "en_route");
    assert_eq!(timeline(&after).len(), timeline(&before).len(), "a refused status wrote to the timeline");
    let r = step(&mut crew, &y, &two, "en_route", "y-own");
    assert_eq!(r, json!({"type": "ok", "ref": "y-own"}));
    assert_eq!(d.incident(&two)["state"], "en_route");

    // Made-up dispatch ids.
    let r = crew.get(&y).request(json!({"type": "ack", "dispatch_id": "INC-99999999.1"}), "bogus1");
    assert_eq!(
        (r["type"].as_str(), r["code"].as_str(), r["ref"].as_str()),
        (Some("error"), Some("unknown_dispatch"), Some("bogus1")),
        "{r}"
    );
    let r = crew.get(&y).request(json!({"type": "ack", "dispatch_id": format!("{two}.7")}), "bogus2");
    assert_eq!(r["code"], "unknown_dispatch", "{r}");

    let r = step(&mut crew, &x, &one, "on_scene", "x2");
    assert_eq!(r["type"], "ok", "{r}");
    assert_eq!(d.incident(&one)["state"], "on_scene");
    let r = step(&mut crew, &x, &one, "resolved", "x3");
    assert_eq!(r["type"], "ok", "{r}");
    let inc = d.incident(&one);
    assert_eq!(inc["state"], "resolved");
    let ev = events(&inc);
    let pos = |e: &str| ev.iter().position(|x| x == e).unwrap_or_else(|| panic!("{e} missing: {ev:?}"));
    assert!(
        pos("acknowledged") < pos("en_route") && pos("en_route") < pos("on_scene") && pos("on_scene") < pos("resolved"),
        "{ev:?}"
    );
    for e in ["en_route", "on_scene", "resolved"] {
        let entry = entries(&timeline(&inc), e)[0].clone();
        assert_eq!(entry["actor"], x.as_str(), "{entry}");
    }

    // Resolved is final: the one who resolved it saying so again (a retry
    // after a lost answer) is answered ok, with nothing written twice; going
    // back is not allowed; and the other one still cannot touch it.
    let r = step(&mut crew, &x, &one, "resolved", "x4");
    assert_eq!(r["type"], "ok", "{r}");
    assert_eq!(events(&d.incident(&one)).iter().filter(|e| *e == "resolved").count(), 1);
    let r = step(&mut crew, &x, &one, "on_scene", "x5");
    assert_eq!(r["code"], "not_allowed", "{r}");
    let r = step(&mut crew, &y, &one, "resolved", "y-wrong2");
    assert_eq!(r["code"], "not_allowed", "{r}");
    assert_eq!(r["ref"], "y-wrong2");
    let r = crew.get(&y).request(json!({"type": "availability", "status": "available"}), "y-after");
    assert_eq!(r, json!({"type": "ok", "ref": "y-after"}));
}
