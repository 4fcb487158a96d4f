//! The durability promise (contract §8) with batched openings (issue 14):
//! concurrent INVITEs are opened by one script call, and a call is answered
//! 603 only after its batch is in Redis. Eight callers call as fast as they
//! are answered; then the daemon is killed (-9) mid-batch, or Redis is: every
//! call answered 603 is in Redis afterwards, and no call of a failed batch
//! was answered 603.

mod common;

use std::time::Duration;

use common::*;

/// `n` callers calling as fast as they are answered.
fn callers(d: &Daemon, tag: &str, n: usize) -> Callers {
    Callers::start(d, tag, n, Duration::from_secs(2), Duration::ZERO)
}

/// Every call answered 603 has its incident in Redis, under the id it was told.
fn assert_every_603_stored(redis: &Redis, answers: &[Placed]) -> usize {
    let mut n = 0;
    for (call_id, status, id, _) in answers {
        if *status != 603 {
            assert!(id.is_none() || *status == 0, "{call_id}: {status} must not name an incident");
            continue;
        }
        let id = id.as_deref().unwrap_or_else(|| panic!("{call_id}: 603 without X-Incident-Id"));
        let stored = redis.cli(&["HGET", &format!("{{t}}:inc:{id}"), "call_id"]);
        assert_eq!(stored.trim(), call_id, "{call_id} was answered 603 with {id}: its incident must be in Redis");
        assert_eq!(redis.cli(&["GET", &format!("{{t}}:call:{call_id}")]).trim(), id, "{call_id}: its call key");
        n += 1;
    }
    n
}

fn options() -> Options {
    // A wide batch window, so the kill lands with batches forming and in flight.
    Options { redis: "batch_wait = \"5ms\"\n".into(), ..Options::default() }
}

/// Batches of more than one call happened (the metric's sum over its count).
fn assert_batched(d: &Daemon) {
    let m = d.metrics();
    let (sum, count) = (
        metric_value(&m, "dispatchd_intake_batch_calls_sum", ""),
        metric_value(&m, "dispatchd_intake_batch_calls_count", ""),
    );
    assert!(count > 0.0 && sum > count, "concurrent calls share script calls: {sum} calls in {count}");
}

#[test]
fn a_daemon_killed_mid_batch_loses_no_call_it_answered() {
    let redis = Redis::start();
    let mut d = Daemon::start(&redis, options());
    let c = callers(&d, "kill", 8);
    wait_until("calls answered", Duration::from_secs(20), || c.answered(603) >= 300);
    assert_batched(&d);
    d.kill9();
    let answers = c.finish();
    let stored = assert_every_603_stored(&redis, &answers);
    assert!(stored >= 300, "{stored}");
    // The calls in flight at the kill got no answer (their PBX would retry):
    // nothing was promised to them.
    assert!(answers.iter().any(|a| a.1 == 0), "the kill landed with calls in flight");
    assert!(answers.iter().all(|a| a.1 == 603 || a.1 == 0), "{answers:?}");
}

#[test]
fn no_call_of_a_failed_batch_is_answered_603() {
    let mut redis = Redis::start();
    let d = Daemon::start(&redis, options());
    let c = callers(&d, "fail", 8);
    wait_until("calls answered", Duration::from_secs(20), || c.answered(603) >= 200);
    assert_batched(&d);
    redis.kill();
    wait_until("503 while Redis is away", Duration::from_secs(20), || c.answered(503) >= 20);
    redis.restart();
    let before = c.answered(603);
    wait_until("calls answered again", Duration::from_secs(20), || c.answered(603) >= before + 100);
    let answers = c.finish();
    let stored = assert_every_603_stored(&redis, &answers);
    assert!(stored >= before + 100, "{stored}");
    // Redis restarted from its AOF (appendfsync always): what it acknowledged
    // is there; what a failed batch held was answered 503, or was stored
    // without a promise, and the PBX's retry finds it (idempotent per call).
    let retry = answers.iter().find(|a| a.1 == 503).map(|a| a.0.clone()).expect("a 503");
    let p = UdpPeer::new(&d);
    p.send(invite(p.port(), &retry, "").as_bytes());
    let resp = p.recv_final(Duration::from_secs(5)).expect("the retry is answered");
    assert_eq!(status_of(&resp), 603, "{resp}");
    let id = header_of(&resp, "X-Incident-Id").expect("X-Incident-Id");
    assert_eq!(redis.cli(&["HGET", &format!("{{t}}:inc:{id}"), "call_id"]).trim(), retry);
    assert_eq!(records_of_call(&redis, &retry), 1, "one incident for the retried call");
}

/// How many incident records carry this Call-ID.
fn records_of_call(redis: &Redis, call_id: &str) -> usize {
    const COUNT: &str = r#"
local n, cursor = 0, '0'
repeat
  local r = redis.call('SCAN', cursor, 'MATCH', '{t}:inc:*', 'COUNT', 1000)
  cursor = r[1]
  for _, k in ipairs(r[2]) do
    if redis.call('TYPE', k).ok == 'hash' and redis.call('HGET', k, 'call_id') == ARGV[1] then n = n + 1 end
  end
until cursor == '0'
return n
"#;
    redis.cli(&["EVAL", COUNT, "0", call_id]).trim().parse().unwrap()
}
