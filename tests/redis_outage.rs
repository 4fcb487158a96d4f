//! Redis stopped mid-run: INVITEs get 503 + Retry-After and /readyz is 503;
//! Redis back: new calls succeed without restarting dispatchd, and no
//! incident that got a 603 is lost.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn redis_outage_gives_503_then_recovers_losing_nothing() {
    let mut redis = Redis::start();
    let d = Daemon::start(&redis, Options::default());

    // A caller that keeps calling through the whole outage.
    let caller = Callers::start(&d, "outage", 1, Duration::from_secs(3), Duration::from_millis(20));

    std::thread::sleep(Duration::from_millis(1500));
    redis.kill();
    wait_until("/readyz 503", Duration::from_secs(10), || http_get(d.http_port, "/readyz", None).0 == 503);
    // While Redis is away the API says so instead of hanging.
    assert_eq!(http_get(d.http_port, "/v1/incidents", Some(ADMIN_TOKEN)).0, 503);
    wait_until("a 503 to an INVITE", Duration::from_secs(10), || caller.answered(503) > 0);
    redis.restart();
    wait_until("/readyz 200", Duration::from_secs(10), || http_get(d.http_port, "/readyz", None).0 == 200);
    let before = caller.placed().len();
    wait_until("calls succeeding again", Duration::from_secs(10), || {
        caller.placed()[before..].iter().filter(|r| r.1 == 603).count() >= 5
    });
    let results = caller.finish();
    let declined: Vec<_> = results.iter().filter(|r| r.1 == 603).collect();
    let unavailable: Vec<_> = results.iter().filter(|r| r.1 == 503).collect();
    assert!(declined.len() >= 10, "{results:?}");
    assert!(!unavailable.is_empty());
    for r in &unavailable {
        assert!(r.2.is_none(), "a 503 must not name an incident: {r:?}");
        assert!(r.3.as_deref().is_some_and(|v| v.parse::<u32>().is_ok()), "503 without Retry-After: {r:?}");
    }
    // Every call that was told "incident INC-…" is in Redis, with its timeline.
    for (call_id, _, id, _) in &declined {
        let id = id.as_deref().expect("603 carries X-Incident-Id");
        let inc = d.incident(id);
        assert_eq!(inc["call_id"], call_id.as_str());
        let events: Vec<&str> =
            inc["timeline"].as_array().unwrap().iter().map(|e| e["event"].as_str().unwrap()).collect();
        assert_eq!(&events[..3], ["opened", "classified", "queued"]);
    }
    let m = d.metrics();
    assert!(metric_value(&m, "dispatchd_redis_errors_total", "") > 0.0, "{m}");
    assert!(metric_value(&m, "dispatchd_sip_responses_total", "status=\"503\"") > 0.0);
}

#[test]
fn daemon_waits_for_redis_before_ready() {
    let mut redis = Redis::start();
    redis.kill();
    // Start without Redis: not ready (the harness would wait forever), so start by hand.
    let dir = tempfile::tempdir().unwrap();
    let http_port = free_port();
    let sip_port = free_port();
    let cfg = dir.path().join("d.toml");
    std::fs::write(
        &cfg,
        format!(
            "[sip]\nudp = \"127.0.0.1:{sip_port}\"\ntcp = \"\"\n[redis]\nurl = \"{}\"\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n[responders]\nlisten = \"127.0.0.1:{}\"\n[privacy]\ncaller_key = \"{CALLER_KEY}\"\n",
            redis.url(),
            free_port()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(child.try_wait().unwrap().is_none(), "must keep waiting for Redis, not exit");
    assert_ne!(http_get(http_port, "/readyz", None).0, 200);
    redis.restart();
    wait_until("ready once Redis answers", Duration::from_secs(15), || http_get(http_port, "/readyz", None).0 == 200);
    let _ = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}
