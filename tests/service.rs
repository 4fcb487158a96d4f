//! Running as a service (contract §1, issue 4): the systemd notify protocol
//! against a test `NOTIFY_SOCKET`, the drain on SIGTERM under load, SIGHUP
//! reloads with a good and a broken file, and the unit file.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const S5: Duration = Duration::from_secs(5);

// ---- the notify socket -------------------------------------------------------

/// A stand-in for systemd's notify socket.
struct Notify {
    sock: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Notify {
    fn new() -> Notify {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        Notify { sock, path, _dir: dir }
    }

    /// The environment that makes the daemon talk to this socket.
    fn env(&self, watchdog_usec: Option<u64>) -> Vec<(String, String)> {
        let mut env = vec![("NOTIFY_SOCKET".to_string(), self.path.to_string_lossy().into_owned())];
        if let Some(us) = watchdog_usec {
            env.push(("WATCHDOG_USEC".into(), us.to_string()));
        }
        env
    }

    /// The next datagram within `wait`.
    fn recv(&self, wait: Duration) -> Option<String> {
        self.sock.set_read_timeout(Some(wait.max(Duration::from_millis(1)))).unwrap();
        let mut buf = [0u8; 4096];
        let n = self.sock.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Every datagram received within `wait`, with when it arrived.
    fn collect(&self, wait: Duration) -> Vec<(Instant, String)> {
        let end = Instant::now() + wait;
        let mut out = Vec::new();
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return out;
            }
            if let Some(m) = self.recv(left) {
                out.push((Instant::now(), m));
            }
        }
    }

    /// Waits for a datagram with this line; returns it and everything before it.
    fn wait_for(&self, line: &str, wait: Duration) -> (String, Vec<String>) {
        let end = Instant::now() + wait;
        let mut before = Vec::new();
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Some(m) if has_line(&m, line) => return (m, before),
                Some(m) => before.push(m),
                None => panic!("no {line} within {wait:?}; got {before:?}"),
            }
        }
    }
}

fn has_line(msg: &str, line: &str) -> bool {
    msg.lines().any(|l| l == line)
}

// ---- processes ---------------------------------------------------------------

/// The pid of a harness daemon: the process running with its config file.
fn pid_of(d: &Daemon) -> u32 {
    let needle = d.config.to_string_lossy().into_owned();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        let args: Vec<String> = cmd.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if args.first().is_some_and(|a| a.ends_with("dispatchd")) && args.contains(&needle) {
            return pid;
        }
    }
    panic!("no dispatchd process with {needle}");
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill").args([sig, &pid.to_string()]).status().unwrap().success();
    assert!(ok, "kill {sig} {pid}");
}

/// The binary started by hand (not through the harness), so the test can
/// watch the notify socket from the very first instant.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(config: &Path, env: &[(String, String)], log: PathBuf) -> Proc {
        let f = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = Command::new(bin())
            .args(["run", "--config"])
            .arg(config)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env_remove("RUST_LOG")
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        Proc { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the exit; its code (None when it had to be killed).
    fn wait(&mut self, wait: Duration) -> Option<i32> {
        let end = Instant::now() + wait;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- dispatchd log ----\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- SIP helpers -------------------------------------------------------------

fn options(port: u16, call_id: &str) -> String {
    format!(
        "OPTIONS sip:incident@127.0.0.1 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-{call_id}\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:probe@127.0.0.1>;tag=p-{call_id}\r\n\
         To: <sip:incident@127.0.0.1>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 OPTIONS\r\n\
         Content-Length: 0\r\n\r\n"
    )
}

/// The CANCEL of an [`invite`] (same branch, no To tag).
fn cancel(port: u16, call_id: &str) -> String {
    caller_request("CANCEL", port, call_id, "<sip:incident@127.0.0.1>", "")
}

/// A shadow-mode call left ringing: its peer and the incident id from the 180.
fn ring(d: &Daemon, call_id: &str, ivr_path: &str) -> (UdpPeer, String) {
    let p = UdpPeer::new(d);
    p.send(invite(p.port(), call_id, &format!("X-IVR-Path: {ivr_path}\r\n")).as_bytes());
    let resp = p.recv_final(S5).expect("180 to INVITE");
    assert_eq!(status_of(&resp), 180, "{resp}");
    let id = header_of(&resp, "X-Incident-Id").expect("X-Incident-Id on the 180").to_string();
    (p, id)
}

/// CANCELs a ringing call: 200 to the CANCEL and 487 to the INVITE, which is ACKed.
fn hang_up(p: &UdpPeer, call_id: &str) {
    p.send(cancel(p.port(), call_id).as_bytes());
    let got = p.recv_all(Duration::from_millis(1500));
    let statuses: Vec<u16> = got.iter().map(|r| status_of(r)).collect();
    assert!(statuses.contains(&200), "CANCEL answered {statuses:?}");
    let r487 = got.iter().find(|r| status_of(r) == 487).unwrap_or_else(|| panic!("no 487: {statuses:?}"));
    p.send(ack_for(r487, p.port(), call_id).as_bytes());
}

/// category and severity of an incident, as the API reports them.
fn classified(d: &Daemon, id: &str) -> (String, String) {
    let inc = d.incident(id);
    (inc["category"].as_str().unwrap_or("").to_string(), inc["severity"].as_str().unwrap_or("").to_string())
}

/// JSON log lines of the daemon.
fn log_lines(log: &str) -> Vec<Value> {
    log.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).collect()
}

fn append_to(path: &Path, text: &str) {
    let mut s = std::fs::read_to_string(path).unwrap();
    s.push_str(text);
    std::fs::write(path, s).unwrap();
}

/// Sends SIGHUP and waits for RELOADING=1 (with MONOTONIC_USEC) then READY=1.
fn reload(d: &Daemon, n: &Notify) {
    signal(pid_of(d), "-HUP");
    let (reloading, _) = n.wait_for("RELOADING=1", S5);
    assert!(reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")), "{reloading:?}");
    let (ready, between) = n.wait_for("READY=1", S5);
    assert!(between.iter().all(|m| !has_line(m, "STOPPING=1")), "{between:?}");
    assert!(ready.lines().any(|l| l.starts_with("STATUS=")), "{ready:?}");
}

// ---- the notify protocol -----------------------------------------------------

#[test]
fn notify_ready_only_when_serving_watchdog_repeats_stopping_on_sigterm() {
    let mut redis = Redis::start();
    // The harness picks the ports and writes the config; run it once, stop
    // it, then start the same config by hand against the test's notify socket.
    let mut d = Daemon::start(&redis, Options::default());
    assert_eq!(d.stop(), Some(0));
    let (sip, http, ws) = (d.sip_port, d.http_port, d.ws_port);

    // Redis is down at startup: no READY=1 while it does not answer.
    redis.kill();
    let n = Notify::new();
    let mut p = Proc::spawn(&d.config, &n.env(Some(1_000_000)), d.dir.path().join("by-hand.log"));
    let early = n.collect(Duration::from_millis(1500));
    assert!(early.iter().all(|(_, m)| !has_line(m, "READY=1")), "READY=1 before Redis answered: {early:?}");
    assert_eq!(http_get(http, "/readyz", None).0, 0, "nothing listens before Redis answers");
    assert!(p.child.try_wait().unwrap().is_none(), "it waits for Redis instead of exiting");
    assert!(early.iter().any(|(_, m)| m.lines().any(|l| l.starts_with("STATUS=starting"))), "{early:?}");
    // A SIGHUP while starting neither kills it nor reloads early: it waits for READY.
    signal(p.child.id(), "-HUP");
    let more = n.collect(Duration::from_millis(300));
    assert!(more.iter().all(|(_, m)| !has_line(m, "RELOADING=1") && !has_line(m, "READY=1")), "{more:?}");
    assert!(p.child.try_wait().unwrap().is_none(), "SIGHUP during startup is not fatal");

    redis.restart();
    let (ready, _) = n.wait_for("READY=1", Duration::from_secs(15));
    // At the moment READY=1 arrives, everything answers.
    let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = probe.local_addr().unwrap().port();
    probe.send_to(options(port, "ready-probe").as_bytes(), ("127.0.0.1", sip)).unwrap();
    probe.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 4096];
    let len = probe.recv(&mut buf).expect("SIP UDP answers at READY=1");
    assert_eq!(status_of(&String::from_utf8_lossy(&buf[..len])), 200);
    assert!(std::net::TcpStream::connect(("127.0.0.1", sip)).is_ok(), "SIP TCP listens at READY=1");
    assert!(std::net::TcpStream::connect(("127.0.0.1", ws)).is_ok(), "websocket listens at READY=1");
    let (status, body) = http_get(http, "/readyz", None);
    assert_eq!(status, 200, "/readyz at READY=1: {body}");
    assert!(ready.lines().any(|l| l.starts_with("STATUS=ready")), "{ready:?}");

    // WATCHDOG=1 repeats, never further apart than WATCHDOG_USEC (1 s).
    let start = Instant::now();
    let msgs = n.collect(Duration::from_secs(3));
    let pings: Vec<Instant> = msgs.iter().filter(|(_, m)| has_line(m, "WATCHDOG=1")).map(|(t, _)| *t).collect();
    // The SIGHUP of the startup is handled now: RELOADING=1, then READY=1.
    let reloading = msgs.iter().position(|(_, m)| has_line(m, "RELOADING=1")).expect("the queued SIGHUP reloads");
    assert!(msgs[reloading..].iter().any(|(_, m)| has_line(m, "READY=1")), "{msgs:?}");
    assert!(pings.len() >= 4, "{} WATCHDOG=1 in 3 s", pings.len());
    let mut last = start;
    for t in &pings {
        assert!(
            t.duration_since(last) < Duration::from_millis(1000),
            "a gap of {:?} between pings",
            t.duration_since(last)
        );
        last = *t;
    }

    // SIGTERM: STOPPING=1, then exit 0.
    signal(p.child.id(), "-TERM");
    let (_, before) = n.wait_for("STOPPING=1", S5);
    assert!(before.iter().all(|m| !has_line(m, "READY=1")), "{before:?}");
    assert_eq!(p.wait(Duration::from_secs(10)), Some(0), "{}", p.log());
}

// ---- SIGTERM under load ------------------------------------------------------

#[derive(Default)]
struct Outcomes {
    /// (call id, incident id) of every call answered 603.
    declined: Vec<(String, String)>,
    unavailable: usize,
    unanswered: usize,
    other: Vec<String>,
}

/// Places calls in bursts of `BURST` until `stop`, recording every answer.
fn caller(d_addr: std::net::SocketAddr, thread: usize, stop: Arc<AtomicBool>, out: Arc<Mutex<Outcomes>>) {
    const BURST: usize = 8;
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let p = UdpPeer { sock, to: d_addr };
    let started = Instant::now();
    let mut buf = vec![0u8; 70_000];
    for round in 0.. {
        if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(30) {
            return;
        }
        let mut waiting: Vec<String> = (0..BURST).map(|i| format!("load-{thread}-{round}-{i}")).collect();
        for call_id in &waiting {
            p.send(invite(p.port(), call_id, "X-IVR-Path: 2,1\r\n").as_bytes());
        }
        let end = Instant::now() + Duration::from_millis(1500);
        while !waiting.is_empty() {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            p.sock.set_read_timeout(Some(left)).unwrap();
            let Ok(n) = p.sock.recv(&mut buf) else { break };
            let r = String::from_utf8_lossy(&buf[..n]).into_owned();
            let status = status_of(&r);
            let call_id = header_of(&r, "Call-ID").unwrap_or("").to_string();
            if status == 100 || !waiting.contains(&call_id) {
                continue; // 100 Trying, or a retransmission of an answer already counted
            }
            waiting.retain(|c| *c != call_id);
            let mut o = out.lock().unwrap();
            match status {
                603 => o.declined.push((call_id.clone(), header_of(&r, "X-Incident-Id").unwrap_or("").to_string())),
                503 => o.unavailable += 1,
                _ => o.other.push(r.clone()),
            }
            p.send(ack_for(&r, p.port(), &call_id).as_bytes());
        }
        out.lock().unwrap().unanswered += waiting.len();
    }
}

/// Incidents (of `ids`, or every one in Redis when empty) lacking a record
/// with `opened`, `classified` and `queued` in its timeline.
fn incomplete(redis: &Redis, ids: &[String]) -> Vec<String> {
    const SCRIPT: &str = r#"
local ids = ARGV
if #ids == 0 then ids = redis.call('ZRANGE', '{t}:incidents', 0, -1) end
local bad = {}
for _, id in ipairs(ids) do
  local k = '{t}:inc:' .. id
  local f = redis.call('HMGET', k, 'id', 'severity', 'category', 'state')
  if not f[1] or not f[2] or not f[3] or not f[4] then
    bad[#bad + 1] = id .. ' record'
  else
    local seen = {}
    for _, e in ipairs(redis.call('LRANGE', k .. ':tl', 0, -1)) do
      local ok, v = pcall(cjson.decode, e)
      if ok then seen[v.event] = true end
    end
    if not (seen.opened and seen.classified and seen.queued) then bad[#bad + 1] = id .. ' timeline' end
  end
end
return bad
"#;
    let mut args = vec!["EVAL", SCRIPT, "0"];
    args.extend(ids.iter().map(String::as_str));
    redis.cli(&args).lines().filter(|l| !l.trim().is_empty()).map(str::to_string).collect()
}

#[test]
fn sigterm_under_load_drains_and_exits_zero() {
    let redis = Redis::start();
    let n = Notify::new();
    let mut d = Daemon::start(
        &redis,
        Options {
            // Long enough that the responders need not answer pings during the test.
            heartbeat: "10s",
            extra: roster(&[("r-alpha", 1, &["*"]), ("r-bravo", 2, &["*"])]) + &escalation("60s", 3),
            env: n.env(Some(2_000_000)),
            ..Options::default()
        },
    );
    let mut responders = vec![Responder::connect(&d, "r-alpha"), Responder::connect(&d, "r-bravo")];

    let stop = Arc::new(AtomicBool::new(false));
    let out = Arc::new(Mutex::new(Outcomes::default()));
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let (stop, out, addr) = (stop.clone(), out.clone(), d.sip_addr());
            std::thread::spawn(move || caller(addr, t, stop, out))
        })
        .collect();
    wait_until("calls under way", Duration::from_secs(20), || out.lock().unwrap().declined.len() >= 1000);

    let t0 = Instant::now();
    let code = d.stop();
    let took = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(code, Some(0), "exit code after SIGTERM under load\n{}", d.log());
    assert!(took < Duration::from_secs(5), "the drain took {took:?}, over shutdown.drain (5s)");
    let (_, before) = n.wait_for("STOPPING=1", S5);
    assert!(before.iter().any(|m| has_line(m, "READY=1")));

    let o = out.lock().unwrap();
    eprintln!(
        "SIGTERM after {} calls answered 603; {} answered 503 during the drain; {} unanswered; exit in {took:?}",
        o.declined.len(),
        o.unavailable,
        o.unanswered
    );
    assert!(o.other.is_empty(), "unexpected answers: {:?}", o.other);
    // Every 603 named a distinct incident…
    let ids: Vec<String> = o.declined.iter().map(|(_, id)| id.clone()).collect();
    assert!(ids.iter().all(|i| i.starts_with("INC-")), "603 without X-Incident-Id");
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "two calls got the same incident");
    // …that is in Redis whole, and nothing in Redis is half-written.
    assert_eq!(incomplete(&redis, &ids), Vec::<String>::new());
    assert_eq!(incomplete(&redis, &[]), Vec::<String>::new());
    let stored: usize = redis.cli(&["ZCARD", "{t}:incidents"]).trim().parse().unwrap();
    assert!(stored >= ids.len(), "{stored} incidents stored, {} acknowledged", ids.len());

    // Responders were told the daemon is going away.
    for r in &mut responders {
        assert_eq!(r.close_code(S5), Some(1001), "{}", r.id);
    }
    let log = log_lines(&d.log());
    assert!(log.iter().any(|l| l["message"] == "dispatchd stopped"), "the drain finished in time");
}

/// During the drain the SIP socket still reads: a new INVITE gets 503 (not
/// silence), a ringing call ends with 503, and an incident still being written
/// is finished and answered before the exit.
#[test]
fn during_the_drain_new_invites_get_503_and_writes_in_flight_finish() {
    let redis = Redis::start();
    let mut d = Daemon::start(
        &redis,
        Options { mode: "shadow", heartbeat: "10s", extra: roster(&[("r-alpha", 1, &["*"])]), ..Options::default() },
    );
    let mut alpha = Responder::connect(&d, "r-alpha");
    let (ringing, ringing_id) = ring(&d, "drain-ring", "9");

    // Redis holds every write for 1.2 s (under the 2 s command timeout): an
    // INVITE sent now is still being written when SIGTERM comes.
    assert_eq!(redis.cli(&["CLIENT", "PAUSE", "1200", "WRITE"]).trim(), "OK");
    let slow = UdpPeer::new(&d);
    slow.send(invite(slow.port(), "drain-slow", "X-IVR-Path: 2\r\n").as_bytes());
    std::thread::sleep(Duration::from_millis(200));
    let so_far: Vec<u16> = slow.recv_all(Duration::from_millis(10)).iter().map(|r| status_of(r)).collect();
    assert!(so_far.iter().all(|s| *s == 100), "the INVITE is still being stored: {so_far:?}");
    let t0 = Instant::now();
    signal(pid_of(&d), "-TERM");

    // The ringing call ends at once with 503.
    let end = ringing.recv_final(S5).expect("the ringing call ends");
    assert_eq!(status_of(&end), 503, "{end}");
    ringing.send(ack_for(&end, ringing.port(), "drain-ring").as_bytes());
    // A new INVITE is refused at once with 503 + Retry-After, while Redis still sleeps.
    let late = UdpPeer::new(&d);
    late.send(invite(late.port(), "drain-late", "").as_bytes());
    let refused = late.recv_final(Duration::from_secs(1)).expect("a new INVITE during the drain is answered");
    assert_eq!(status_of(&refused), 503, "{refused}");
    assert!(header_of(&refused, "Retry-After").is_some(), "{refused}");
    assert!(t0.elapsed() < Duration::from_millis(800), "answered before Redis woke up");
    late.send(ack_for(&refused, late.port(), "drain-late").as_bytes());
    // The responder is told the daemon goes away.
    assert_eq!(alpha.close_code(S5), Some(1001));

    // The INVITE in flight is finished: stored, 180 with its id, then 503 (no
    // leg rings on after the exit).
    let answers = slow.recv_all(Duration::from_secs(3));
    let statuses: Vec<u16> = answers.iter().map(|r| status_of(r)).filter(|s| *s != 100).collect();
    assert_eq!(statuses.first(), Some(&180), "{answers:?}");

    assert!(statuses.contains(&503), "{answers:?}");
    let slow_id =
        header_of(answers.iter().find(|r| status_of(r) == 180).unwrap(), "X-Incident-Id").unwrap().to_string();

    // The exit is clean.
    assert_eq!(d.stop(), Some(0), "{}", d.log());
    assert_eq!(incomplete(&redis, &[ringing_id, slow_id]), Vec::<String>::new());
    assert_eq!(incomplete(&redis, &[]), Vec::<String>::new());
    assert_eq!(redis.cli(&["ZCARD", "{t}:incidents"]).trim(), "2", "the refused INVITE opened nothing");
}

// ---- SIGHUP ------------------------------------------------------------------

#[test]
fn sighup_with_a_good_file_changes_ivr_and_roster_without_dropping_anything() {
    let redis = Redis::start();
    let n = Notify::new();
    let d = Daemon::start(
        &redis,
        Options {
            mode: "shadow",
            heartbeat: "10s",
            extra: roster(&[("r-alpha", 1, &["outage"])]) + &escalation("60s", 3),
            env: n.env(None),
            ..Options::default()
        },
    );
    n.wait_for("READY=1", S5);
    let mut alpha = Responder::connect(&d, "r-alpha");
    let (ringing, ringing_id) = ring(&d, "hup-ringing", "2,1");

    // Before: "7" is no IVR row, and r-bravo is nobody.
    let (p7, id7) = ring(&d, "hup-before-7", "7");
    assert_eq!(classified(&d, &id7), ("triage".into(), "medium".into()));
    hang_up(&p7, "hup-before-7");
    let mut stranger = Responder::connect_raw(&d, Some("token-r-bravo"));
    assert_eq!(stranger.close_code(S5), Some(4401));

    // The new file: one more IVR row, one more responder, and a change that
    // needs a restart (sip.mode), which must not take effect.
    let text = std::fs::read_to_string(&d.config).unwrap().replace("mode = \"shadow\"", "mode = \"decline\"");
    std::fs::write(&d.config, text).unwrap();
    append_to(
        &d.config,
        &format!(
            "\n[[ivr]]\npath = \"7\"\ncategory = \"flood\"\nseverity = \"critical\"\ninstructions = \"Sandbags.\"\n\n{}",
            roster(&[("r-bravo", 2, &["flood", "outage"])])
        ),
    );
    reload(&d, &n);

    // The IVR map is the new one; the mode is still shadow (the call rings).
    let (p7, id7) = ring(&d, "hup-after-7", "7");
    assert_eq!(classified(&d, &id7), ("flood".into(), "critical".into()));
    assert_eq!(redis.cli(&["HGET", &format!("{{t}}:inc:{id7}"), "instructions"]).trim(), "Sandbags.");
    hang_up(&p7, "hup-after-7");
    // Old rows still apply.
    let (p21, id21) = ring(&d, "hup-after-21", "2,1");
    assert_eq!(classified(&d, &id21), ("outage".into(), "critical".into()));
    hang_up(&p21, "hup-after-21");

    // The new responder can connect, and Redis knows its tier and skills.
    let mut bravo = Responder::connect(&d, "r-bravo");
    assert_eq!(redis.cli(&["SISMEMBER", "{t}:roster", "r-bravo"]).trim(), "1");
    assert_eq!(redis.cli(&["HGET", "{t}:resp:r-bravo", "tier"]).trim(), "2");
    assert_eq!(redis.cli(&["HGET", "{t}:resp:r-bravo", "skills"]).trim(), ",flood,outage,");
    assert_eq!(bravo.request(json!({"type": "availability", "status": "available"}), "b1")["type"], "ok");

    // Nothing was dropped: r-alpha's connection still works…
    let reply = alpha.request(json!({"type": "availability", "status": "available"}), "a1");
    assert_eq!(reply["type"], "ok", "{reply}");
    // …and the call that was ringing through the reload still rings: no
    // final answer came, and a CANCEL now ends it as abandoned.
    let during: Vec<u16> = ringing.recv_all(Duration::from_millis(200)).iter().map(|r| status_of(r)).collect();
    assert!(during.iter().all(|s| *s < 200), "the ringing call got {during:?}");
    hang_up(&ringing, "hup-ringing");
    wait_until("abandoned on the timeline", S5, || events(&d.incident(&ringing_id)).contains(&"abandoned".to_string()));

    let log = log_lines(&d.log());
    let reloaded = log.iter().find(|l| l["message"] == "configuration reloaded").expect("an info line on reload");
    assert_eq!(reloaded["level"], "INFO");
    assert_eq!(reloaded["responders_added"], 1);
    assert_eq!(reloaded["ivr_rules"], 5);
    assert!(
        log.iter().any(|l| l["level"] == "WARN" && l["key"] == "sip.mode"),
        "a warning that sip.mode needs a restart"
    );
    assert!(!d.log().contains("token_sha256"), "no secrets in the log");
}

#[test]
fn sighup_with_a_broken_file_keeps_the_old_configuration() {
    let redis = Redis::start();
    let n = Notify::new();
    let mut d = Daemon::start(
        &redis,
        Options { heartbeat: "10s", extra: roster(&[("r-alpha", 1, &["*"])]), env: n.env(None), ..Options::default() },
    );
    n.wait_for("READY=1", S5);
    let mut alpha = Responder::connect(&d, "r-alpha");
    let good = std::fs::read_to_string(&d.config).unwrap();
    let flood = "\n[[ivr]]\npath = \"7\"\ncategory = \"flood\"\nseverity = \"critical\"\n";

    // An unknown key in an otherwise fine new row: refused, named, nothing changes.
    std::fs::write(&d.config, format!("{good}{flood}colour = \"red\"\n{}", roster(&[("r-bravo", 1, &["*"])]))).unwrap();
    reload(&d, &n);
    assert!(d.alive(), "a broken file does not stop the daemon");
    let log = log_lines(&d.log());
    let refused = log.iter().find(|l| l["level"] == "ERROR").expect("an error line");
    assert!(refused["key"].as_str().unwrap_or("").contains("colour"), "{refused}");
    assert!(refused["message"].as_str().unwrap_or("").contains("refused"), "{refused}");
    let id = place_call(&d, "broken-7", "7");
    assert_eq!(classified(&d, &id), ("triage".into(), "medium".into()), "the old IVR map is in force");
    let id = place_call(&d, "broken-21", "2,1");
    assert_eq!(classified(&d, &id), ("outage".into(), "critical".into()));
    let mut stranger = Responder::connect_raw(&d, Some("token-r-bravo"));
    assert_eq!(stranger.close_code(S5), Some(4401), "the roster did not change");

    // Not TOML at all: refused too.
    std::fs::write(&d.config, format!("{good}\n[[ivr\n")).unwrap();
    reload(&d, &n);
    assert_eq!(log_lines(&d.log()).iter().filter(|l| l["level"] == "ERROR").count(), 2);
    let id = place_call(&d, "broken-7b", "7");
    assert_eq!(classified(&d, &id).0, "triage");

    // Fixed: the next SIGHUP applies it.
    std::fs::write(&d.config, format!("{good}{flood}")).unwrap();
    reload(&d, &n);
    let id = place_call(&d, "fixed-7", "7");
    assert_eq!(classified(&d, &id), ("flood".into(), "critical".into()));

    // Through all of it the responder stayed connected.
    assert_eq!(alpha.request(json!({"type": "availability", "status": "available"}), "a1")["type"], "ok");
    assert_eq!(d.stop(), Some(0));
}

// ---- the unit file -----------------------------------------------------------

fn unit_text() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/dispatchd.service")).unwrap()
}

fn unit_values(text: &str, key: &str) -> Vec<String> {
    text.lines().filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('=').map(|v| v.trim().to_string())).collect()
}

#[test]
fn unit_file_has_what_ops_need() {
    let text = unit_text();
    let one = |k: &str| {
        let v = unit_values(&text, k);
        assert_eq!(v.len(), 1, "{k}: {v:?}");
        v[0].clone()
    };
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("NotifyAccess"), "main");
    assert!(one("WatchdogSec").ends_with('s'));
    assert!(one("ExecStartPre").contains("dispatchd check-config --config "));
    assert!(one("ExecStart").contains("dispatchd run --config "));
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    let user = one("User");
    assert!(!user.is_empty() && user != "root");
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("PrivateTmp"), "yes");
    assert_eq!(one("AmbientCapabilities"), "CAP_NET_BIND_SERVICE");
    assert_eq!(one("CapabilityBoundingSet"), "CAP_NET_BIND_SERVICE");
    assert_eq!(one("RestartPreventExitStatus"), "78");
    // The same config file for check-config and run.
    let cfg = |cmd: String| cmd.rsplit(' ').next().unwrap().to_string();
    assert_eq!(cfg(one("ExecStartPre")), cfg(one("ExecStart")));
}

#[test]
fn unit_file_passes_systemd_analyze_verify() {
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        eprintln!(
            "note: systemd-analyze is not installed; skipping `systemd-analyze verify` of systemd/dispatchd.service"
        );
        return;
    }
    // verify wants the executables to exist: point them at the real binary.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dispatchd.toml");
    std::fs::write(&config, "").unwrap();
    let text = unit_text()
        .replace("/usr/local/bin/dispatchd", bin())
        .replace("/etc/dispatchd/dispatchd.toml", &config.to_string_lossy());
    let unit = dir.path().join("dispatchd.service");
    std::fs::write(&unit, text).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&unit).stdin(Stdio::null()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // verify exits 0 on unknown keys and bad values too; it only says so on stderr.
    let about_ours: Vec<&str> = stderr.lines().filter(|l| l.contains("dispatchd")).collect();
    assert!(out.status.success() && about_ours.is_empty(), "systemd-analyze verify:\n{stderr}");

    // The hardening, as systemd rates it (lower is better; 1.6 when written).
    let sec = Command::new("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager", "--threshold=30"])
        .arg(&unit)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&sec.stdout).into_owned() + &String::from_utf8_lossy(&sec.stderr);
    if text.contains("nrecognized option") || text.contains("unknown option") {
        eprintln!("note: this systemd-analyze has no `security --offline`; skipping the exposure check");
        return;
    }
    let exposure = text.lines().find(|l| l.contains("Overall exposure level")).unwrap_or("");
    assert!(sec.status.success(), "exposure above 3.0: {exposure}\n{text}");
}
