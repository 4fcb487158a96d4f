//! The binary's command line: `check-config` (exit 78 naming the key), `--version`.

mod common;

use std::process::Command;

use common::{assert_refused, check_config};

#[test]
fn example_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/dispatchd.toml");
    let out = Command::new(common::bin()).args(["check-config", "--config", path]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn unknown_key_exits_78_naming_it() {
    let (code, text) = check_config("[sip]\nmode = \"decline\"\nmax_rign = \"1m\"\n");
    assert_eq!(code, 78, "{text}");
    assert!(text.contains("sip.max_rign"), "{text}");
    assert_eq!(text.trim().lines().count(), 1, "one line: {text}");
}

#[test]
fn bad_severity_exits_78_naming_it() {
    let (code, text) = check_config("[[ivr]]\npath = \"2,1\"\ncategory = \"outage\"\nseverity = \"catastrophic\"\n");
    assert_eq!(code, 78, "{text}");
    assert!(text.contains("ivr") && text.contains("severity") || text.contains("catastrophic"), "{text}");
    let (code, text) = check_config("[ivr_default]\nseverity = \"urgent\"\n");
    assert_eq!(code, 78, "{text}");
    assert!(text.contains("ivr_default"), "{text}");
}

#[test]
fn bad_values_exit_78() {
    for (toml, key) in [
        ("[sip]\nallow = [\"10.0.0.0/40\"]\n", "sip.allow[0]"),
        ("[sip]\nmax_ring = \"forever\"\n", "sip.max_ring"),
        ("[sip]\ndecline_status = 200\n", "sip.decline_status"),
        ("[[ivr]]\npath = \"2;1\"\ncategory = \"a\"\nseverity = \"low\"\n", "ivr[0].path"),
        ("[http]\nadmin_token_sha256 = \"abc\"\n", "http.admin_token_sha256"),
        ("[escalation.critical]\nack_timeout = \"0s\"\n", "escalation.critical.ack_timeout"),
        ("[redis]\nprefix = \"a{b}\"\n", "redis.prefix"),
        ("[redis]\nsentinels = [\"10.0.0.41\"]\n", "redis.sentinels[0]"),
        ("[redis]\nsentinels = [\"10.0.0.41:26379\"]\nmaster_name = \"\"\n", "redis.master_name"),
        ("[redis]\nmin_replicas_ack = 1\nreplicas_timeout = \"5s\"\n", "redis.replicas_timeout"),
        ("[redis]\nmin_replicas_ack = -1\n", "redis.min_replicas_ack"),
        ("[redis]\nbatch_wait = \"50ms\"\n", "redis.batch_wait"),
        ("[runtime]\nworker_threads = 0\n", "runtime.worker_threads"),
        ("this is not toml", "config"),
    ] {
        let (code, text) = check_config(toml);
        assert_eq!(code, 78, "{toml}: {text}");
        assert!(text.contains(key), "{toml}: expected {key} in {text}");
    }
}

/// The keys of contract §12 and `[runtime]`, `redis.batch_wait`: malformed,
/// oversized and non-ASCII values are refused naming the key (exit 78), never
/// a crash; a non-ASCII Sentinel master name is a name like any other.
#[test]
fn redis_ha_and_runtime_keys_refuse_bad_values() {
    let long_host = format!("{}:26379", "h".repeat(300));
    let many: Vec<String> = (0..33).map(|i| format!("\"10.0.0.{i}:26379\"")).collect();
    let many = format!("[redis]\nsentinels = [{}]\n", many.join(", "));
    let cases: Vec<(String, &str)> = vec![
        ("[redis]\nsentinels = \"10.0.0.41:26379\"\n".into(), "redis.sentinels"),
        ("[redis]\nsentinels = [\"hôst.example:26379\"]\n".into(), "redis.sentinels[0]"),
        ("[redis]\nsentinels = [\"10.0.0.41:２６３７９\"]\n".into(), "redis.sentinels[0]"),
        ("[redis]\nsentinels = [\"10.0.0.41:99999\"]\n".into(), "redis.sentinels[0]"),
        ("[redis]\nsentinels = [\"10.0.0.41:0\"]\n".into(), "redis.sentinels[0]"),
        (format!("[redis]\nsentinels = [\"{long_host}\"]\n"), "redis.sentinels[0]"),
        (many, "redis.sentinels"),
        (
            format!("[redis]\nsentinels = [\"10.0.0.41:26379\"]\nmaster_name = \"{}\"\n", "m".repeat(200)),
            "redis.master_name",
        ),
        ("[redis]\nsentinels = [\"10.0.0.41:26379\"]\nmaster_name = \"a b\"\n".into(), "redis.master_name"),
        ("[redis]\nmin_replicas_ack = \"one\"\n".into(), "redis.min_replicas_ack"),
        ("[redis]\nmin_replicas_ack = 99999999999999999999\n".into(), "redis.min_replicas_ack"),
        ("[redis]\nmin_replicas_ack = 65\n".into(), "redis.min_replicas_ack"),
        ("[redis]\nmin_replicas_ack = 1\nreplicas_timeout = \"250мс\"\n".into(), "redis.replicas_timeout"),
        ("[redis]\nreplicas_timeout = \"99999999999999h\"\n".into(), "redis.replicas_timeout"),
        ("[redis]\nbatch_wait = \"soon\"\n".into(), "redis.batch_wait"),
        ("[redis]\nbatch_wait = \"１ms\"\n".into(), "redis.batch_wait"),
        ("[redis]\nbatch_wait = \"99999999999999999999999ms\"\n".into(), "redis.batch_wait"),
        ("[runtime]\nworker_threads = \"two\"\n".into(), "runtime.worker_threads"),
        ("[runtime]\nworker_threads = 65\n".into(), "runtime.worker_threads"),
        ("[runtime]\nworker_threads = 99999999999999999999999\n".into(), "runtime.worker_threads"),
        ("[runtime]\nthreads = 2\n".into(), "runtime.threads"),
    ];
    assert_refused(cases);
    let (code, text) = check_config("[redis]\nsentinels = [\"10.0.0.41:26379\"]\nmaster_name = \"調度\"\n");
    assert_eq!(code, 0, "{text}");
}

#[test]
fn environment_is_a_layer_and_is_checked_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.toml");
    std::fs::write(&path, "").unwrap();
    let out = Command::new(common::bin())
        .args(["check-config", "--config"])
        .arg(&path)
        .env("DISPATCHD__PRIVACY__CALLER_KEY", common::CALLER_KEY)
        .env("DISPATCHD__SIP__MODE", "loud")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("sip.mode"));
}

#[test]
fn run_refuses_a_bad_config_with_78() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.toml");
    std::fs::write(&path, "[redis]\nurll = \"x\"\n").unwrap();
    let out = Command::new(common::bin()).args(["run", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(78));
}

#[test]
fn version_prints() {
    let out = Command::new(common::bin()).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

/// A Redis without function libraries (as before 7.0: here the FUNCTION
/// command is renamed away): the daemon stops at start and says why, rather
/// than answering calls it could not store.
#[test]
fn redis_without_functions_is_refused_at_start() {
    let port = common::free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--rename-command", "FUNCTION", ""])
        .arg("--dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server");
    common::wait_until("redis", std::time::Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let (sip, http, ws) = (common::free_port(), common::free_port(), common::free_port());
    let path = dir.path().join("d.toml");
    let toml = format!(
        "[sip]\nudp = \"127.0.0.1:{sip}\"\ntcp = \"\"\n[redis]\nurl = \"redis://127.0.0.1:{port}/0\"\n\
         [responders]\nlisten = \"127.0.0.1:{ws}\"\n[http]\nlisten = \"127.0.0.1:{http}\"\n"
    );
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(common::bin())
        .args(["run", "--config"])
        .arg(&path)
        .env("DISPATCHD__PRIVACY__CALLER_KEY", common::CALLER_KEY)
        .output()
        .unwrap();
    let _ = redis.kill();
    let _ = redis.wait();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_ne!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("Redis 7.0 or later"), "{text}");
}

/// Secrets an operator could get wrong while rotating them, and durations so
/// long they would overflow: each refused, naming the key.
#[test]
fn unsafe_tokens_and_absurd_durations_exit_78() {
    let hash = |t: &str| common::sha256_hex(t);
    let responder = |id: &str, token: &str| {
        format!("[[responder]]\nid = \"{id}\"\ntoken_sha256 = \"{}\"\nskills = [\"*\"]\n", hash(token))
    };
    let cases = [
        (responder("r-a", "same") + &responder("r-b", "same"), "responder[1].token_sha256"),
        (
            format!("[http]\nadmin_token_sha256 = \"{}\"\n", hash("shared")) + &responder("r-a", "shared"),
            "responder[0].token_sha256",
        ),
        (responder("r-a", ""), "responder[0].token_sha256"),
        (format!("[http]\nadmin_token_sha256 = \"{}\"\n", hash("")), "http.admin_token_sha256"),
        ("[escalation.critical]\nack_timeout = \"100000000y\"\n".to_string(), "escalation.critical.ack_timeout"),
        ("[privacy]\nretention = \"11y\"\n".to_string(), "privacy.retention"),
        ("[sip]\nmax_ring = \"18446744073709551615s\"\n".to_string(), "sip.max_ring"),
    ];
    assert_refused(cases);
    // Upper case hex is the same hash.
    let upper = responder("r-a", "x") + &responder("r-b", "x").replace(&hash("x"), &hash("x").to_uppercase());
    assert_eq!(check_config(&upper).0, 78);
}

/// `token new`: a fresh token of at least 128 bits, its roster line and the
/// console link (and a QR code); two tokens are never the same.
#[test]
fn token_new_prints_token_roster_line_and_link() {
    let run = |args: &[&str]| {
        let out = Command::new(common::bin()).args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let (code, text) = run(&["token", "new", "r-alpha", "--url", "https://console.example.net:8080/", "--qr"]);
    assert_eq!(code, Some(0), "{text}");
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("{name} in {text}"))
    };
    let token = field("token:");
    assert!(token.len() >= 32 && token.bytes().all(|b| b.is_ascii_hexdigit()), "≥ 128 bits: {token}");
    let roster = field("roster:");
    assert!(roster.starts_with(&format!("token_sha256 = \"{}\"", common::sha256_hex(&token))), "{roster}");
    assert_eq!(field("link:"), format!("https://console.example.net:8080/#token={token}"));
    assert!(text.contains('█') || text.contains('▀'), "a QR code: {text}");
    let (_, again) = run(&["token", "new", "r-alpha", "--url", "http://x"]);
    assert!(!again.contains(&token), "a fresh token each time");
    let (code, err) = run(&["token", "new", "bad id", "--url", "http://x"]);
    assert_eq!(code, Some(1), "{err}");
}

/// `simulate call` places a real SIP call to the running daemon and prints
/// its incident; `report` without --since/--until covers the last 24 hours.
#[test]
fn simulate_call_and_report_defaults() {
    let redis = common::Redis::start();
    let d = common::Daemon::start(&redis, common::Options::default());
    let to = format!("127.0.0.1:{}", d.sip_port);
    let out = Command::new(common::bin()).args(["simulate", "call", "--ivr", "2,1", "--to", &to]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let id = text.split_whitespace().find(|w| w.starts_with("INC-")).expect("an incident id").to_string();
    let inc = d.incident(&id);
    assert_eq!((inc["category"].as_str(), inc["severity"].as_str()), (Some("outage"), Some("critical")));
    let report =
        Command::new(common::bin()).args(["report", "--format", "json", "--config"]).arg(&d.config).output().unwrap();
    let body = String::from_utf8_lossy(&report.stdout).into_owned();
    assert!(report.status.success(), "{body}{}", String::from_utf8_lossy(&report.stderr));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["incidents"], 1, "the call just placed is within the last 24 hours: {v}");
    // Nothing answers: a clear error, exit 1.
    let dead = Command::new(common::bin()).args(["simulate", "call", "--to", "127.0.0.1:9"]).output().unwrap();
    assert_eq!(dead.status.code(), Some(1));
}
