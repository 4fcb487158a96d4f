//! Test harness: a real `redis-server` per test (own port, own data dir,
//! killable and restartable), the real `dispatchd` binary, real `sipp`.
#![allow(dead_code)]

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const ADMIN_TOKEN: &str = "test-admin-token";
pub const CALLER_KEY: &str = "test-caller-key-0123456789";

pub fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

/// A port free for both TCP and UDP on 127.0.0.1.
pub fn free_port() -> u16 {
    loop {
        let t = TcpListener::bind("127.0.0.1:0").expect("bind tcp");
        let port = t.local_addr().unwrap().port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

/// A redis-server of the test's own: AOF on, fsync always, so nothing it
/// acknowledged is lost even when it is killed.
pub struct Redis {
    pub port: u16,
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    /// More arguments of redis-server (`--replicaof …`), kept for restarts.
    args: Vec<String>,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_with(&[])
    }

    /// A redis-server with more arguments (`["--replicaof", "127.0.0.1", "6379"]`).
    pub fn start_with(args: &[&str]) -> Redis {
        let mut r = Redis {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            // A replica that must copy its primary in full (after a failover) gets it at once.
            .args(["--repl-diskless-sync-delay", "0"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (run ./deploy/test)");
        self.child = Some(child);
        wait_until("redis", Duration::from_secs(10), || self.cli(&["PING"]).trim() == "PONG");
    }

    /// SIGKILL: no goodbye, like a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Every key whose name or value (any type, any field or member) holds `needle`.
    pub fn keys_holding(&self, needle: &str) -> Vec<String> {
        const SCRIPT: &str = r#"
local needle, found, cursor = ARGV[1], {}, '0'
local function has(v) return v and string.find(v, needle, 1, true) ~= nil end
repeat
  local r = redis.call('SCAN', cursor, 'COUNT', 1000)
  cursor = r[1]
  for _, k in ipairs(r[2]) do
    local t = redis.call('TYPE', k).ok
    local vals = {k}
    if t == 'string' then vals[2] = redis.call('GET', k)
    elseif t == 'hash' then for _, v in ipairs(redis.call('HGETALL', k)) do vals[#vals + 1] = v end
    elseif t == 'list' then for _, v in ipairs(redis.call('LRANGE', k, 0, -1)) do vals[#vals + 1] = v end
    elseif t == 'set' then for _, v in ipairs(redis.call('SMEMBERS', k)) do vals[#vals + 1] = v end
    elseif t == 'zset' then for _, v in ipairs(redis.call('ZRANGE', k, 0, -1)) do vals[#vals + 1] = v end
    end
    for _, v in ipairs(vals) do if has(v) then found[#found + 1] = k; break end end
  end
until cursor == '0'
return found
"#;
        let mut keys: Vec<String> = self
            .cli(&["EVAL", SCRIPT, "0", needle])
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        keys.sort();
        keys
    }

    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "--raw"])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Settings a test may change before starting the daemon.
#[derive(Clone)]
pub struct Options {
    pub mode: &'static str,
    pub allow: Vec<String>,
    pub max_ring: &'static str,
    pub tcp_idle_timeout: &'static str,
    pub heartbeat: &'static str,
    /// More keys of the `[sip]` table (`rate_limit = 5`, …).
    pub sip: String,
    /// More keys of the `[http]` table, and of `[responders]`.
    pub http: String,
    pub responders: String,
    /// More TOML: `[[responder]]` tables (see [`roster`]), `[escalation.*]`…
    pub extra: String,
    /// More keys of the `[redis]` table (`sentinels = […]`, …).
    pub redis: String,
    /// `[correlation.*]` tables. By default the repeat and surge rules are off
    /// ([`CORRELATION_OFF`]): most tests call from one number and open many
    /// incidents of one category. Tests of the rules set their own ("" = the
    /// daemon's defaults).
    pub correlation: String,
    pub env: Vec<(String, String)>,
}

/// The repeat and surge rules off (the other rules need ACD events to fire).
pub const CORRELATION_OFF: &str = "
[correlation.repeat]
enabled = false

[correlation.surge]
enabled = false
";

impl Default for Options {
    fn default() -> Self {
        Options {
            mode: "decline",
            allow: vec!["127.0.0.0/8".into()],
            max_ring: "10m",
            tcp_idle_timeout: "5s",
            heartbeat: "2s",
            sip: String::new(),
            http: String::new(),
            responders: String::new(),
            extra: String::new(),
            redis: String::new(),
            correlation: CORRELATION_OFF.to_string(),
            env: Vec::new(),
        }
    }
}

pub const IVR_TABLE: &str = r#"
[[ivr]]
path = "2"
category = "outage"
severity = "high"
instructions = "Confirm the affected area."

[[ivr]]
path = "2,1"
category = "outage"
severity = "critical"
instructions = "Isolate the affected feeder."

[[ivr]]
path = "2,1,3"
category = "gas"
severity = "critical"

[[ivr]]
path = "9"
category = "enquiry"
severity = "low"

[ivr_default]
category = "triage"
severity = "medium"

[categories]
security = "high"
"#;

/// The real binary, with its own config, ports and log file.
pub struct Daemon {
    pub sip_port: u16,
    pub http_port: u16,
    pub ws_port: u16,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    child: Option<Child>,
    opts: Options,
    redis_url: String,
}

/// `dispatchd check-config` on a file holding `toml`: its exit code and output
/// (stdout then stderr).
#[allow(dead_code)]
pub fn check_config(toml: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(bin())
        .args(["check-config", "--config"])
        .arg(&path)
        .env("DISPATCHD__PRIVACY__CALLER_KEY", CALLER_KEY)
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// `check-config` refuses each `(file, key)`: exit 78, one line naming the key.
pub fn assert_refused(cases: impl IntoIterator<Item = (String, &'static str)>) {
    for (toml, key) in cases {
        let (code, text) = check_config(&toml);
        assert_eq!(code, 78, "{toml}: {text}");
        assert!(text.contains(key), "{toml}: expected {key} in {text}");
        assert_eq!(text.trim().lines().count(), 1, "one line: {text}");
    }
}

/// One call a [`Callers`] placed: Call-ID, final status (0: none in time),
/// X-Incident-Id, Retry-After.
pub type Placed = (String, u16, Option<String>, Option<String>);

/// Callers over UDP, each placing one call after another (an INVITE, the
/// ACK of its final answer, then `pause`) until [`Callers::finish`].
pub struct Callers {
    placed: std::sync::Arc<std::sync::Mutex<Vec<Placed>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Callers {
    /// `n` callers whose Call-IDs are `{tag}-{caller}-{call}`, each waiting
    /// `wait` for a final answer.
    pub fn start(d: &Daemon, tag: &str, n: usize, wait: Duration, pause: Duration) -> Callers {
        use std::sync::atomic::Ordering;
        let placed: std::sync::Arc<std::sync::Mutex<Vec<Placed>>> = Default::default();
        let stop: std::sync::Arc<std::sync::atomic::AtomicBool> = Default::default();
        let threads = (0..n)
            .map(|t| {
                let (placed, stop, to, tag) = (placed.clone(), stop.clone(), d.sip_addr(), tag.to_string());
                std::thread::spawn(move || {
                    let p = UdpPeer { sock: UdpSocket::bind("127.0.0.1:0").unwrap(), to };
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let call_id = format!("{tag}-{t}-{i}");
                        p.send(invite(p.port(), &call_id, "").as_bytes());
                        let call = match p.recv_final(wait) {
                            Some(r) => {
                                p.send(ack_for(&r, p.port(), &call_id).as_bytes());
                                let header = |h| header_of(&r, h).map(str::to_string);
                                (call_id, status_of(&r), header("X-Incident-Id"), header("Retry-After"))
                            }
                            None => (call_id, 0, None, None),
                        };
                        placed.lock().unwrap().push(call);
                        std::thread::sleep(pause);
                    }
                })
            })
            .collect();
        Callers { placed, stop, threads }
    }

    /// How many calls so far were answered `status`.
    pub fn answered(&self, status: u16) -> usize {
        self.placed.lock().unwrap().iter().filter(|c| c.1 == status).count()
    }

    /// The calls placed so far, in the order their answers came.
    pub fn placed(&self) -> Vec<Placed> {
        self.placed.lock().unwrap().clone()
    }

    /// Stops the callers and returns every call placed.
    pub fn finish(self) -> Vec<Placed> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        std::mem::take(&mut *self.placed.lock().unwrap())
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_dispatchd")
}

impl Daemon {
    /// A second daemon on the same Redis (and the same prefix), with its own ports.
    pub fn start_another(redis: &Redis, opts: Options) -> Daemon {
        Daemon::start(redis, opts)
    }

    /// Starts the daemon; retried with fresh ports when one was taken in the
    /// meantime (ports are chosen free, then bound by the daemon a moment later).
    pub fn start(redis: &Redis, opts: Options) -> Daemon {
        for attempt in 1..=3 {
            let mut d = Daemon::try_start(redis, opts.clone());
            if d.wait_ready_or_exit() {
                return d;
            }
            let log = d.log();
            if attempt == 3 || !log.contains("Address already in use") {
                panic!("dispatchd did not become ready:\n{log}");
            }
        }
        unreachable!()
    }

    fn try_start(redis: &Redis, opts: Options) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("dispatchd.toml");
        let mut d = Daemon {
            sip_port: free_port(),
            http_port: free_port(),
            ws_port: free_port(),
            dir,
            config,
            child: None,
            opts,
            redis_url: redis.url(),
        };
        d.write_config();
        d.spawn();
        d
    }

    /// True once this process's own log says it is ready (every listener
    /// bound, Redis answering); false as soon as it exits. Not `/readyz`: when
    /// the port chosen for it was taken meanwhile, another test's daemon
    /// answers there while this one has failed to bind it.
    fn wait_ready_or_exit(&mut self) -> bool {
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            if self.log().contains("\"dispatchd ready\"") {
                return true;
            }
            if !self.alive() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Starts the same daemon again (same config and ports) after a kill or stop.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.spawn();
        self.wait_ready();
    }

    fn write_config(&self) {
        let o = &self.opts;
        let allow: Vec<String> = o.allow.iter().map(|a| format!("{a:?}")).collect();
        let text = format!(
            r#"
[sip]
udp = "127.0.0.1:{sip}"
tcp = "127.0.0.1:{sip}"
allow = [{allow}]
mode = "{mode}"
max_ring = "{max_ring}"
tcp_idle_timeout = "{idle}"
tcp_max_connections = 32
{sip_extra}

[redis]
url = "{redis}"
prefix = "t"
timeout = "2s"
{redis_extra}

[responders]
listen = "127.0.0.1:{ws}"
heartbeat = "{heartbeat}"
{responders_extra}

[http]
listen = "127.0.0.1:{http}"
admin_token_sha256 = "{admin}"
{http_extra}

[privacy]
caller_key = "{key}"

[log]
format = "json"
level = "info"

[shutdown]
drain = "5s"
{ivr}
{correlation}
{extra}
"#,
            sip = self.sip_port,
            allow = allow.join(", "),
            mode = o.mode,
            max_ring = o.max_ring,
            idle = o.tcp_idle_timeout,
            redis = self.redis_url,
            ws = self.ws_port,
            http = self.http_port,
            admin = sha256_hex(ADMIN_TOKEN),
            key = CALLER_KEY,
            ivr = IVR_TABLE,
            extra = o.extra,
            correlation = o.correlation,
            heartbeat = o.heartbeat,
            sip_extra = o.sip,
            http_extra = o.http,
            responders_extra = o.responders,
            redis_extra = o.redis,
        );
        std::fs::write(&self.config, text).unwrap();
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("dispatchd.log")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path()).unwrap();
        let child = Command::new(bin())
            .args(["run", "--config"])
            .arg(&self.config)
            .envs(self.opts.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env_remove("RUST_LOG")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn dispatchd");
        self.child = Some(child);
    }

    pub fn wait_ready(&self) {
        let http = self.http_port;
        wait_until("dispatchd /readyz", Duration::from_secs(20), || http_get(http, "/readyz", None).0 == 200);
    }

    pub fn sip_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.sip_port))
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code();
            }
            if Instant::now() > end {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends a signal (`-HUP`, `-TERM`, …) to the daemon.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.pid().to_string()]).status().unwrap().success();
        assert!(ok, "kill {sig}");
    }

    /// Rewrites its configuration file with `edit`, sends SIGHUP and waits
    /// until the log says the reload happened (or was refused).
    pub fn reload_with(&self, edit: impl FnOnce(String) -> String) {
        let text = std::fs::read_to_string(&self.config).unwrap();
        std::fs::write(&self.config, edit(text)).unwrap();
        let before = self.log().matches("configuration reloaded").count();
        self.signal("-HUP");
        wait_until("the reload", Duration::from_secs(10), || {
            self.log().matches("configuration reloaded").count() > before
        });
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn incident(&self, id: &str) -> Value {
        let (status, body) = http_get(self.http_port, &format!("/v1/incidents/{id}"), Some(ADMIN_TOKEN));
        assert_eq!(status, 200, "GET incident {id}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    pub fn incidents(&self, query: &str) -> Vec<Value> {
        let (status, body) = http_get(self.http_port, &format!("/v1/incidents{query}"), Some(ADMIN_TOKEN));
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v["incidents"].as_array().cloned().unwrap_or_default()
    }

    pub fn metrics(&self) -> String {
        http_get(self.http_port, "/metrics", None).1
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- dispatchd log ----\n{}", self.log());
        }
        self.kill9();
    }
}

/// Sum of a metric's samples whose label set contains `labels` (e.g. `method="INVITE"`).
pub fn metric_value(metrics: &str, name: &str, labels: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.is_empty() || l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A minimal HTTP/1.1 GET (status, body), so tests need no HTTP client crate.
pub fn http_get(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    http(port, "GET", path, token, None)
}

pub fn http(port: u16, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return (0, String::new()) };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    if s.write_all(req.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut out = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    // Undo chunked transfer encoding when present.
    let body =
        if head.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(body) } else { body.to_string() };
    (status, body)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

// ---- sipp ------------------------------------------------------------------

pub fn scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/sipp").join(name)
}

/// The result of one sipp run.
pub struct SippRun {
    pub ok: bool,
    pub output: String,
    pub dir: tempfile::TempDir,
}

/// Runs sipp as a UAC against the daemon; `transport` is "u1" (UDP) or "t1" (TCP).
/// `extra` are more sipp arguments (e.g. `-inf file`, `-m 3`). Returns when sipp exits.
pub fn sipp(d: &Daemon, scenario_file: &str, transport: &str, extra: &[&str]) -> SippRun {
    // The local port is chosen free and then bound by sipp a moment later;
    // when another process took it meanwhile, sipp exits at once: try again.
    for _ in 0..2 {
        let run = sipp_once(d, scenario_file, transport, extra);
        let lost_port = !run.ok && (run.output.contains("already in use") || run.output.contains("bind"));
        if !lost_port {
            return run;
        }
    }
    sipp_once(d, scenario_file, transport, extra)
}

fn sipp_once(d: &Daemon, scenario_file: &str, transport: &str, extra: &[&str]) -> SippRun {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let target = format!("127.0.0.1:{}", d.sip_port);
    let out = Command::new("sipp")
        .arg(&target)
        .arg("-sf")
        .arg(scenario(scenario_file))
        .args([
            "-t",
            transport,
            "-i",
            "127.0.0.1",
            "-p",
            &port,
            "-nostdin",
            "-timeout",
            "30s",
            "-trace_err",
            "-trace_logs",
        ])
        .args(["-m", "1"])
        .args(extra)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("sipp must be installed (run ./deploy/test)");
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stderr));
    for e in std::fs::read_dir(dir.path()).unwrap().flatten() {
        if e.file_name().to_string_lossy().contains("error") {
            output.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    SippRun { ok: out.status.success(), output, dir }
}

/// The `X-Incident-Id` values sipp captured into `ids.log` (scenarios log them with `<log>`).
pub fn logged_ids(run: &SippRun) -> Vec<String> {
    let mut ids = Vec::new();
    for e in std::fs::read_dir(run.dir.path()).unwrap().flatten() {
        if e.file_name().to_string_lossy().ends_with("_logs.log") {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            ids.extend(text.lines().filter_map(|l| l.trim().strip_prefix("incident=")).map(str::to_string));
        }
    }
    ids
}

// ---- raw SIP over UDP / TCP -----------------------------------------------

/// A raw UDP SIP peer on its own port.
pub struct UdpPeer {
    pub sock: UdpSocket,
    pub to: SocketAddr,
}

impl UdpPeer {
    pub fn new(d: &Daemon) -> UdpPeer {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        UdpPeer { sock, to: d.sip_addr() }
    }

    pub fn port(&self) -> u16 {
        self.sock.local_addr().unwrap().port()
    }

    pub fn send(&self, data: &[u8]) {
        self.sock.send_to(data, self.to).unwrap();
    }

    /// Responses received within `wait` (each one whole datagram as text).
    pub fn recv_all(&self, wait: Duration) -> Vec<String> {
        let end = Instant::now() + wait;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 70_000];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return out;
            }
            self.sock.set_read_timeout(Some(left)).unwrap();
            match self.sock.recv_from(&mut buf) {
                Ok((n, _)) => out.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(_) => return out,
            }
        }
    }

    /// Waits for the first response whose status is not 100.
    pub fn recv_final(&self, wait: Duration) -> Option<String> {
        let end = Instant::now() + wait;
        let mut buf = vec![0u8; 70_000];
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.sock.set_read_timeout(Some(left)).unwrap();
            let (n, _) = self.sock.recv_from(&mut buf).ok()?;
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            if !text.starts_with("SIP/2.0 100 ") {
                return Some(text);
            }
        }
    }
}

/// A request of the test caller's call `call_id` from `port` (one branch per
/// call, as an INVITE and its ACK/CANCEL share it), with `to` and extra headers.
pub fn caller_request(method: &str, port: u16, call_id: &str, to: &str, extra: &str) -> String {
    format!(
        "{method} sip:incident@127.0.0.1 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-{call_id}\r\n\
         Max-Forwards: 70\r\n\
         From: \"Test Caller\" <sip:+15550001234@127.0.0.1>;tag=t-{call_id}\r\n\
         To: {to}\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 {method}\r\n\
         {extra}Content-Length: 0\r\n\r\n"
    )
}

/// A well-formed INVITE from `port` with the given Call-ID and extra headers.
pub fn invite(port: u16, call_id: &str, extra: &str) -> String {
    caller_request("INVITE", port, call_id, "<sip:incident@127.0.0.1>", extra)
}

/// Status code of a response text.
pub fn status_of(resp: &str) -> u16 {
    resp.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// A header value of a response text (case-insensitive name).
pub fn header_of<'a>(resp: &'a str, name: &str) -> Option<&'a str> {
    resp.split("\r\n").find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// Sends a well-formed INVITE and returns its final answer: proof the daemon still serves.
pub fn assert_still_serving(d: &Daemon, call_id: &str) -> String {
    let p = UdpPeer::new(d);
    p.send(invite(p.port(), call_id, "").as_bytes());
    let resp = p.recv_final(Duration::from_secs(5)).expect("the daemon no longer answers a good INVITE");
    assert_eq!(status_of(&resp), 603, "{resp}");
    let id = header_of(&resp, "X-Incident-Id").expect("X-Incident-Id").to_string();
    // ACK it, so it is not retransmitted.
    p.send(ack_for(&resp, p.port(), call_id).as_bytes());
    id
}

/// A SIP MESSAGE call event (`X-Event: …` and its headers) from a fresh
/// UDP socket; returns the final answer.
pub fn call_event(d: &Daemon, call_id: &str, headers: &str) -> String {
    let p = UdpPeer::new(d);
    let port = p.port();
    let msg = format!(
        "MESSAGE sip:incident@127.0.0.1 SIP/2.0\r\n\
         Via: SIP/2.0/UDP 127.0.0.1:{port};branch=z9hG4bK-{call_id}\r\n\
         Max-Forwards: 70\r\n\
         From: <sip:dialplan@127.0.0.1>;tag=m-{call_id}\r\n\
         To: <sip:incident@127.0.0.1>\r\n\
         Call-ID: {call_id}\r\n\
         CSeq: 1 MESSAGE\r\n\
         {headers}Content-Length: 0\r\n\r\n"
    );
    p.send(msg.as_bytes());
    p.recv_final(Duration::from_secs(5)).expect("answer to MESSAGE")
}

/// The ACK for a non-2xx final response to [`invite`] (its To, with the tag).
pub fn ack_for(resp: &str, port: u16, call_id: &str) -> String {
    let to = header_of(resp, "To").unwrap_or("<sip:incident@127.0.0.1>");
    caller_request("ACK", port, call_id, to, "")
}

// ---- responders over websockets --------------------------------------------

/// `[[responder]]` tables: (id, tier, skills). Each one's token is `token-<id>`.
pub fn roster(members: &[(&str, u32, &[&str])]) -> String {
    let mut out = String::new();
    for (id, tier, skills) in members {
        let skills: Vec<String> = skills.iter().map(|s| format!("{s:?}")).collect();
        out.push_str(&format!(
            "[[responder]]\nid = \"{id}\"\nname = \"{id}\"\ntoken_sha256 = \"{}\"\nskills = [{}]\ntier = {tier}\n\n",
            sha256_hex(&format!("token-{id}")),
            skills.join(", ")
        ));
    }
    out
}

/// Short acknowledgement deadlines for every severity.
pub fn escalation(ack_timeout: &str, max_rounds: u32) -> String {
    ["critical", "high", "medium", "low"]
        .iter()
        .map(|s| format!("[escalation.{s}]\nack_timeout = \"{ack_timeout}\"\nmax_rounds = {max_rounds}\n\n"))
        .collect()
}

pub type Ws = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>;

/// A responder's client: a real websocket to the daemon.
pub struct Responder {
    pub id: String,
    pub ws: Ws,
}

impl Responder {
    /// Connects with `Authorization: Bearer token-<id>` and reads the welcome.
    pub fn connect(d: &Daemon, id: &str) -> Responder {
        let mut r = Responder::connect_raw(d, Some(&format!("token-{id}")));
        let w = r.recv(Duration::from_secs(5)).expect("welcome");
        assert_eq!(w["type"], "welcome", "{w}");
        assert_eq!(w["responder_id"], id);
        r.id = id.to_string();
        r
    }

    /// Connects with an optional bearer token, without reading anything.
    pub fn connect_raw(d: &Daemon, token: Option<&str>) -> Responder {
        use tungstenite::client::IntoClientRequest;
        let mut req = format!("ws://127.0.0.1:{}/v1/responders/ws", d.ws_port).into_client_request().unwrap();
        if let Some(t) = token {
            req.headers_mut().insert("Authorization", format!("Bearer {t}").parse().unwrap());
        }
        let (ws, _) = tungstenite::connect(req).expect("websocket connect");
        Responder { id: String::new(), ws }
    }

    fn set_timeout(&mut self, t: Duration) {
        if let tungstenite::stream::MaybeTlsStream::Plain(s) = self.ws.get_mut() {
            s.set_read_timeout(Some(t.max(Duration::from_millis(1)))).unwrap();
        }
    }

    pub fn send(&mut self, v: Value) {
        self.send_text(&v.to_string());
    }

    pub fn send_text(&mut self, t: &str) {
        self.ws.send(tungstenite::Message::text(t)).expect("send");
    }

    /// The next message within `wait`: `Ok(None)` on timeout, `Err(code)` when
    /// the connection ended (the close code, 1005 without one, 1006 without a close).
    fn read_within(&mut self, wait: Duration) -> Result<Option<tungstenite::Message>, u16> {
        if wait.is_zero() {
            return Ok(None);
        }
        self.set_timeout(wait);
        match self.ws.read() {
            Ok(tungstenite::Message::Close(Some(f))) => Err(u16::from(f.code)),
            Ok(tungstenite::Message::Close(None)) => Err(1005),
            Ok(m) => Ok(Some(m)),
            Err(tungstenite::Error::Io(e))
                if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                Ok(None)
            }
            Err(_) => Err(1006),
        }
    }

    /// The next JSON frame within `wait` (pings are answered by tungstenite).
    pub fn recv(&mut self, wait: Duration) -> Option<Value> {
        let end = Instant::now() + wait;
        loop {
            match self.read_within(end.saturating_duration_since(Instant::now())) {
                Ok(Some(tungstenite::Message::Text(t))) => return serde_json::from_str(t.as_str()).ok(),
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Waits for a frame of the given type, skipping others.
    pub fn recv_type(&mut self, kind: &str, wait: Duration) -> Option<Value> {
        let end = Instant::now() + wait;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let v = self.recv(left)?;
            if v["type"] == kind {
                return Some(v);
            }
        }
    }

    /// Reads until the server closes; returns the close code.
    pub fn close_code(&mut self, wait: Duration) -> Option<u16> {
        let end = Instant::now() + wait;
        loop {
            match self.read_within(end.saturating_duration_since(Instant::now())) {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(code) => return Some(code),
            }
        }
    }

    /// Sends a request with an id and returns the reply echoing it.
    pub fn request(&mut self, mut v: Value, id: &str) -> Value {
        v["id"] = Value::from(id);
        self.send(v);
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let left = end.saturating_duration_since(Instant::now());
            let r = self.recv(left).unwrap_or_else(|| panic!("no reply to {id}"));
            if r["ref"] == id {
                return r;
            }
        }
    }
}

/// Places a call over UDP (decline mode) with the IVR path; returns the incident id.
pub fn place_call(d: &Daemon, call_id: &str, ivr_path: &str) -> String {
    let p = UdpPeer::new(d);
    p.send(invite(p.port(), call_id, &format!("X-IVR-Path: {ivr_path}\r\n")).as_bytes());
    let resp = p.recv_final(Duration::from_secs(5)).expect("answer to INVITE");
    p.send(ack_for(&resp, p.port(), call_id).as_bytes());
    header_of(&resp, "X-Incident-Id").unwrap_or_else(|| panic!("no incident id: {resp}")).to_string()
}

/// The timeline's event names.
pub fn events(incident: &Value) -> Vec<String> {
    incident["timeline"]
        .as_array()
        .map(|t| t.iter().map(|e| e["event"].as_str().unwrap_or("").to_string()).collect())
        .unwrap_or_default()
}
