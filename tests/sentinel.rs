//! Redis high availability (contract §12), on real servers: a primary, two
//! replicas and three Sentinels from Debian's redis-server on loopback, two
//! dispatchd processes, steady calls and connected responders. A graceful
//! `SENTINEL FAILOVER`, then `kill -9` of the primary: every call answered
//! 603 is on the primary in the end; the gap got 503 (and /readyz said so);
//! dispatch goes on, nothing is acknowledged twice, the responders stay
//! connected; the killed primary comes back as a replica with everything.
//! And `min_replicas_ack = 1` with both replicas away: 503 until one returns.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const NAME: &str = "dispatchd-test";
const S20: Duration = Duration::from_secs(20);

/// A Sentinel of the test's own (`redis-server <conf> --sentinel`).
struct Sentinel {
    port: u16,
    _dir: tempfile::TempDir,
    child: Child,
}

impl Sentinel {
    fn start(primary_port: u16) -> Sentinel {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {NAME} 127.0.0.1 {primary_port} 2\n\
                 sentinel down-after-milliseconds {NAME} 1000\n\
                 sentinel failover-timeout {NAME} 4000\n\
                 sentinel parallel-syncs {NAME} 2\n",
                dir.path().display()
            ),
        )
        .unwrap();
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server --sentinel");
        let s = Sentinel { port, _dir: dir, child };
        wait_until("sentinel", Duration::from_secs(10), || s.cli(&["PING"]).trim() == "PONG");
        s
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli").args(["-p", &self.port.to_string(), "--raw"]).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The primary's port as this Sentinel sees it.
    fn primary_port(&self) -> Option<u16> {
        self.cli(&["SENTINEL", "get-master-addr-by-name", NAME]).lines().nth(1)?.trim().parse().ok()
    }

    /// How many entries a `SENTINEL replicas|sentinels` listing has.
    fn count(&self, what: &str) -> usize {
        self.cli(&["SENTINEL", what, NAME]).lines().filter(|l| l.trim() == "name").count()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One primary, two replicas, three Sentinels.
struct Topology {
    nodes: Vec<Redis>,
    sentinels: Vec<Sentinel>,
}

impl Topology {
    fn start() -> Topology {
        let primary = Redis::start();
        let p = primary.port.to_string();
        let replicas: Vec<Redis> = (0..2).map(|_| Redis::start_with(&["--replicaof", "127.0.0.1", &p])).collect();
        let mut nodes = vec![primary];
        nodes.extend(replicas);
        let sentinels: Vec<Sentinel> = (0..3).map(|_| Sentinel::start(nodes[0].port)).collect();
        let t = Topology { nodes, sentinels };
        wait_until("the Sentinels to know the replicas and each other", S20, || {
            t.sentinels.iter().all(|s| s.count("replicas") == 2 && s.count("sentinels") == 2)
        });
        wait_until("the replicas in sync", S20, || t.online_replicas(&t.nodes[0]) == 2);
        t
    }

    fn sentinel_list(&self) -> String {
        self.sentinels.iter().map(|s| format!("\"127.0.0.1:{}\"", s.port)).collect::<Vec<_>>().join(", ")
    }

    /// The primary every Sentinel names, when they agree.
    fn agreed_primary(&self) -> Option<u16> {
        let ports: HashSet<Option<u16>> = self.sentinels.iter().map(|s| s.primary_port()).collect();
        if ports.len() == 1 { ports.into_iter().next().flatten() } else { None }
    }

    fn node(&self, port: u16) -> &Redis {
        self.nodes.iter().find(|n| n.port == port).expect("a node of the topology")
    }

    fn node_mut(&mut self, port: u16) -> &mut Redis {
        self.nodes.iter_mut().find(|n| n.port == port).expect("a node of the topology")
    }

    fn online_replicas(&self, primary: &Redis) -> usize {
        primary
            .cli(&["INFO", "replication"])
            .lines()
            .filter(|l| l.starts_with("slave") && l.contains("state=online"))
            .count()
    }

    /// Waits until the Sentinels agree on a primary other than `old` that says it is one.
    fn wait_new_primary(&self, old: u16) -> u16 {
        let mut found = 0;
        wait_until("a new primary", S20, || match self.agreed_primary() {
            Some(p) if p != old && self.node(p).cli(&["ROLE"]).starts_with("master") => {
                found = p;
                true
            }
            _ => false,
        });
        found
    }
}

fn ha_options(t: &Topology, extra: String) -> Options {
    Options {
        redis: format!(
            "sentinels = [{}]\nmaster_name = \"{NAME}\"\nmin_replicas_ack = 1\nreplicas_timeout = \"250ms\"\n",
            t.sentinel_list()
        ),
        extra,
        ..Options::default()
    }
}

/// A call's fate: its Call-ID, the final status (0: none), the incident.
#[derive(Debug, Clone)]
struct Call {
    call_id: String,
    status: u16,
    incident: Option<String>,
}

/// Calls to `d`, one after another with a short pause, until `stop`.
fn call_load(name: &'static str, d: std::net::SocketAddr, stop: Arc<AtomicBool>) -> JoinHandle<Vec<Call>> {
    std::thread::spawn(move || {
        let mut calls = Vec::new();
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let call_id = format!("ha-{name}-{n}");
            let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            let peer = UdpPeer { sock, to: d };
            peer.send(invite(peer.port(), &call_id, "X-IVR-Path: 2\r\n").as_bytes());
            let resp = peer.recv_final(Duration::from_secs(6));
            let status = resp.as_deref().map_or(0, status_of);
            let incident = resp.as_deref().and_then(|r| header_of(r, "X-Incident-Id")).map(str::to_string);
            if let Some(r) = &resp {
                peer.send(ack_for(r, peer.port(), &call_id).as_bytes());
            }
            calls.push(Call { call_id, status, incident });
            std::thread::sleep(Duration::from_millis(60));
        }
        calls
    })
}

/// A responder that acknowledges every dispatch and resolves it, trying again
/// while the store is unavailable; returns the incidents it acknowledged and
/// whether its one connection lasted to the end.
fn working_responder(d: &Daemon, id: &'static str, stop: Arc<AtomicBool>) -> JoinHandle<(Vec<String>, bool)> {
    let mut r = Responder::connect(d, id);
    std::thread::spawn(move || {
        let mut acked = Vec::new();
        let mut n = 0;
        let mut ask = |r: &mut Responder, v: serde_json::Value| -> Option<serde_json::Value> {
            for _ in 0..40 {
                n += 1;
                let reply = r.request(v.clone(), &format!("{id}-{n}"));
                if reply["type"] == "error" && reply["code"] == "unavailable" {
                    std::thread::sleep(Duration::from_millis(250));
                    continue;
                }
                return Some(reply);
            }
            None
        };
        while !stop.load(Ordering::Relaxed) {
            let Some(offer) = r.recv_type("dispatch", Duration::from_millis(500)) else { continue };
            let reply = ask(&mut r, json!({"type": "ack", "dispatch_id": offer["dispatch_id"]}));
            if reply.as_ref().is_some_and(|v| v["type"] == "ok") {
                // An offer may come again (a resync read from a primary
                // being demoted); its ack is then answered ok again.
                let incident = offer["incident_id"].as_str().unwrap_or_default().to_string();
                if !acked.contains(&incident) {
                    acked.push(incident.clone());
                }
                ask(&mut r, json!({"type": "status", "incident_id": incident, "status": "resolved"}));
            }
        }
        // Still the same connection: it answers.
        let alive =
            ask(&mut r, json!({"type": "availability", "status": "available"})).is_some_and(|v| v["type"] == "ok");
        (acked, alive)
    })
}

/// Polls `/readyz` until `stop`; whether it ever said 503.
fn readyz_watch(port: u16, stop: Arc<AtomicBool>) -> JoinHandle<bool> {
    std::thread::spawn(move || {
        let mut saw_503 = false;
        while !stop.load(Ordering::Relaxed) {
            saw_503 |= http_get(port, "/readyz", None).0 == 503;
            std::thread::sleep(Duration::from_millis(50));
        }
        saw_503
    })
}

/// Waits until `d` opens incidents again (a call answered 603).
/// A write on one connection, then `WAIT n 250`: did `n` replicas take it in time?
fn acknowledged_by(port: u16, n: u32) -> bool {
    use std::io::{Read, Write};
    let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
    if c.write_all(format!("SET settle 1\r\nWAIT {n} 250\r\n").as_bytes()).is_err() {
        return false;
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while !got.ends_with(b"\r\n") || got.iter().filter(|&&b| b == b'\n').count() < 2 {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(k) => got.extend_from_slice(&buf[..k]),
        }
    }
    got == format!("+OK\r\n:{n}\r\n").as_bytes()
}

fn wait_serving(d: &Daemon, tag: &str) {
    let mut n = 0;
    wait_until("calls answered 603 again", S20, || {
        n += 1;
        let p = UdpPeer::new(d);
        let call_id = format!("probe-{tag}-{n}");
        p.send(invite(p.port(), &call_id, "").as_bytes());
        match p.recv_final(Duration::from_secs(3)) {
            Some(r) => {
                p.send(ack_for(&r, p.port(), &call_id).as_bytes());
                status_of(&r) == 603
            }
            None => false,
        }
    });
}

#[test]
fn failover_and_kill_of_the_primary_lose_no_promised_incident() {
    let mut t = Topology::start();
    let first = t.nodes[0].port;
    let responders: &[(&str, u32, &[&str])] =
        &[("r-1", 1, &["*"]), ("r-2", 1, &["*"]), ("r-3", 1, &["*"]), ("r-4", 1, &["*"])];
    let extra = roster(responders) + &escalation("20s", 3);
    let a = Daemon::start(&t.nodes[0], ha_options(&t, extra.clone()));
    let b = Daemon::start_another(&t.nodes[0], ha_options(&t, extra));

    let stop = Arc::new(AtomicBool::new(false));
    let crews_off = Arc::new(AtomicBool::new(false));
    let workers = vec![
        working_responder(&a, "r-1", crews_off.clone()),
        working_responder(&a, "r-2", crews_off.clone()),
        working_responder(&b, "r-3", crews_off.clone()),
        working_responder(&b, "r-4", crews_off.clone()),
    ];
    let loads = vec![call_load("a", a.sip_addr(), stop.clone()), call_load("b", b.sip_addr(), stop.clone())];
    let ready = readyz_watch(a.http_port, stop.clone());
    std::thread::sleep(Duration::from_secs(2));

    // A graceful failover.
    assert_eq!(t.sentinels[0].cli(&["SENTINEL", "FAILOVER", NAME]).trim(), "OK");
    let second = t.wait_new_primary(first);
    wait_serving(&a, "a1");
    wait_serving(&b, "b1");
    std::thread::sleep(Duration::from_secs(1));

    // The primary killed: no goodbye.
    t.node_mut(second).kill();
    let third = t.wait_new_primary(second);
    wait_serving(&a, "a2");
    wait_serving(&b, "b2");
    std::thread::sleep(Duration::from_secs(2));

    stop.store(true, Ordering::Relaxed);
    let calls: Vec<Call> = loads.into_iter().flat_map(|h| h.join().unwrap()).collect();
    let saw_503_ready = ready.join().unwrap();

    // Every call had an answer; the gap got 503, never silence.
    let unanswered: Vec<&Call> = calls.iter().filter(|c| c.status != 603 && c.status != 503).collect();
    assert!(unanswered.is_empty(), "{unanswered:?}");
    let declined: Vec<&Call> = calls.iter().filter(|c| c.status == 603).collect();
    let refused = calls.iter().filter(|c| c.status == 503).count();
    eprintln!("calls: {} answered 603, {refused} answered 503; primaries {first} → {second} → {third}", declined.len());
    assert!(declined.len() > 50, "the load ran: {}", declined.len());
    assert!(saw_503_ready, "/readyz said 503 while no primary was known");

    // Every 603 is an incident on the primary in the end.
    let primary = t.node(third);
    let lost: Vec<String> = declined
        .iter()
        .filter_map(|c| c.incident.as_ref().map(|id| (id, &c.call_id)))
        .filter(|(id, _)| primary.cli(&["EXISTS", &format!("{{t}}:inc:{id}")]).trim() != "1")
        .map(|(id, call)| format!("{id} (call {call})"))
        .collect();
    assert!(lost.is_empty(), "603 answered but not on the new primary: {lost:?}");
    assert!(declined.iter().all(|c| c.incident.is_some()), "a 603 without X-Incident-Id");

    // Dispatch went on: every incident is acknowledged and resolved, once.
    let ids: HashSet<String> = declined.iter().filter_map(|c| c.incident.clone()).collect();
    let mut states: HashMap<String, String> = HashMap::new();
    let end = Instant::now() + S20;
    loop {
        for id in &ids {
            if states.get(id).is_some_and(|s| s == "resolved") {
                continue;
            }
            let inc = a.incident(id);
            states.insert(id.clone(), inc["state"].as_str().unwrap_or("").to_string());
        }
        if states.values().all(|s| s == "resolved") {
            break;
        }
        if Instant::now() > end {
            let open: Vec<(&String, &String)> = states.iter().filter(|(_, s)| *s != "resolved").collect();
            for (id, _) in open.iter().take(3) {
                eprintln!("{id}: {}", a.incident(id));
            }
            panic!("not resolved: {open:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    crews_off.store(true, Ordering::Relaxed);
    let mut acked: Vec<String> = Vec::new();
    for w in workers {
        let (mine, alive) = w.join().unwrap();
        assert!(alive, "a responder's connection did not last through the failovers");
        acked.extend(mine);
    }
    // (Each responder's list has an incident once: one seen twice was
    // acknowledged by two responders.)
    let mut seen = HashSet::new();
    let twice: Vec<&String> = acked.iter().filter(|i| !seen.insert(*i)).collect();
    for id in twice.iter().take(2) {
        eprintln!("TWICE {id}: {}", a.incident(id)["timeline"]);
    }
    assert!(twice.is_empty(), "acknowledged by two responders: {twice:?}");
    for id in ids.iter().take(300) {
        let inc = a.incident(id);
        let n = events(&inc).iter().filter(|e| *e == "acknowledged").count();
        assert_eq!(n, 1, "{id}: {inc}");
    }

    // Both daemons found the new primaries by themselves.
    for d in [&a, &b] {
        let m = d.metrics();
        assert!(metric_value(&m, "dispatchd_redis_failovers_total", "") >= 1.0, "{m}");
        assert_eq!(http_get(d.http_port, "/readyz", None).0, 200);
    }

    // The killed primary comes back as a replica, and nothing it held is lost.
    t.node_mut(second).restart();
    wait_until("the old primary back as a replica in sync", Duration::from_secs(30), || {
        let old = t.node(second);
        old.cli(&["ROLE"]).starts_with("slave") && old.cli(&["INFO", "replication"]).contains("master_link_status:up")
    });
    let primary = t.node(third);
    let on_primary: usize = primary.cli(&["ZCARD", "{t}:incidents"]).trim().parse().unwrap();
    assert!(on_primary >= ids.len(), "{on_primary} < {}", ids.len());
    wait_until("the old primary holds every incident", S20, || {
        t.node(second).cli(&["ZCARD", "{t}:incidents"]).trim() == on_primary.to_string()
    });
}

#[test]
fn without_the_replicas_min_replicas_ack_answers_503_until_one_returns() {
    let primary = Redis::start();
    let p = primary.port.to_string();
    let mut replicas: Vec<Redis> = (0..2).map(|_| Redis::start_with(&["--replicaof", "127.0.0.1", &p])).collect();
    let online = |n: usize| {
        primary
            .cli(&["INFO", "replication"])
            .lines()
            .filter(|l| l.starts_with("slave") && l.contains("state=online"))
            .count()
            >= n
    };
    wait_until("the replicas in sync", S20, || online(2));
    // A replica fresh from its first copy rewrites its AOF and may miss the
    // first WAITs: wait until a write of ours is acknowledged by both quickly.
    wait_until("the replicas acknowledging", S20, || acknowledged_by(primary.port, 2));
    let opts = Options {
        redis: "min_replicas_ack = 1\nreplicas_timeout = \"250ms\"\n".into(),
        extra: roster(&[("r-1", 1, &["*"])]) + &escalation("60s", 3),
        ..Options::default()
    };
    let d = Daemon::start(&primary, opts);
    let mut r = Responder::connect(&d, "r-1");
    assert_still_serving(&d, "rep-1");
    let offer = r.recv_type("dispatch", Duration::from_secs(5)).expect("offered");
    assert_eq!(r.request(json!({"type": "ack", "dispatch_id": offer["dispatch_id"]}), "a1")["type"], "ok");

    for rep in &mut replicas {
        rep.kill();
    }
    wait_until("the primary sees no replica", S20, || !online(1));
    let p2 = UdpPeer::new(&d);
    p2.send(invite(p2.port(), "rep-2", "").as_bytes());
    let resp = p2.recv_final(Duration::from_secs(5)).expect("an answer");
    assert_eq!(status_of(&resp), 503, "no replica took it: nothing promised\n{resp}");
    assert!(header_of(&resp, "Retry-After").is_some(), "{resp}");
    let reply = r.request(json!({"type": "status", "incident_id": offer["incident_id"], "status": "en_route"}), "s1");
    assert_eq!((reply["type"].as_str(), reply["code"].as_str()), (Some("error"), Some("unavailable")), "{reply}");
    assert!(metric_value(&d.metrics(), "dispatchd_redis_wait_short_total", "") >= 2.0);

    replicas[0].restart();
    wait_until("one replica back in sync", S20, || online(1));
    // (A replica that left is waited for a while yet: see store/durable.rs.)
    wait_serving(&d, "rep-3");
    // The same call again: the incident its write opened, not a second one.
    let p3 = UdpPeer::new(&d);
    p3.send(invite(p3.port(), "rep-2", "").as_bytes());
    let again = p3.recv_final(Duration::from_secs(5)).expect("an answer");
    assert_eq!(status_of(&again), 603, "{again}");
    let of_rep2 = d.incidents("?limit=500").iter().filter(|i| i["call_id"] == "rep-2").count();
    assert_eq!(of_rep2, 1, "one incident for the call, however many tries");
    // (A fresh connection: the old one went silent for two heartbeats while we waited.)
    let mut r = Responder::connect(&d, "r-1");
    let reply = r.request(json!({"type": "status", "incident_id": offer["incident_id"], "status": "en_route"}), "s2");
    assert_eq!(reply["type"], "ok", "the retry of a step its write made is answered ok: {reply}");
    let inc = d.incident(offer["incident_id"].as_str().unwrap());
    assert_eq!(events(&inc).iter().filter(|e| *e == "en_route").count(), 1, "{inc}");
}

/// A daemon pointed at Sentinels that know no such master is not ready,
/// and its log says why (it keeps asking).
#[test]
fn sentinels_that_know_no_primary_leave_the_daemon_unready() {
    let t = Topology::start();
    let opts = Options {
        redis: format!("sentinels = [{}]\nmaster_name = \"no-such-master\"\n", t.sentinel_list()),
        ..Options::default()
    };
    let mut d = DaemonUnready::spawn(&t.nodes[0], opts);
    wait_until("the log to say why", Duration::from_secs(10), || d.log().contains("no Redis primary known"));
    assert_ne!(http_get(d.http_port(), "/readyz", None).0, 200);
    d.kill();
}

/// A daemon started without waiting for it to become ready.
struct DaemonUnready {
    child: Child,
    dir: tempfile::TempDir,
    http: u16,
}

impl DaemonUnready {
    fn spawn(redis: &Redis, opts: Options) -> DaemonUnready {
        let dir = tempfile::tempdir().unwrap();
        let http = free_port();
        let config = dir.path().join("d.toml");
        std::fs::write(
            &config,
            format!(
                "[sip]\nudp = \"127.0.0.1:{}\"\ntcp = \"\"\n[redis]\nurl = \"{}\"\nprefix = \"t\"\ntimeout = \"1s\"\n{}\n\
                 [responders]\nlisten = \"127.0.0.1:{}\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n[privacy]\ncaller_key = \"{CALLER_KEY}\"\n",
                free_port(),
                redis.url(),
                opts.redis,
                free_port()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let child = Command::new(bin())
            .args(["run", "--config"])
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        DaemonUnready { child, dir, http }
    }

    fn http_port(&self) -> u16 {
        self.http
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
