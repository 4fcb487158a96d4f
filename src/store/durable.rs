//! Writes that an answer promises (contract §12): with `redis.min_replicas_ack
//! = N`, a write behind a 180/603/202 or the `ok` to an ack is followed by
//! `WAIT N replicas_timeout` on the same connection, in the same round trip,
//! and the answer is sent only when N replicas have it. Fewer in time: the
//! write is reported unavailable (503 + Retry-After, `error unavailable`) and
//! nothing was promised; the scripts are idempotent per call, so the retry
//! that follows does not open a second incident.
//!
//! Group commit: one task owns a connection of its own (a `WAIT` blocks the
//! connection it is sent on, so it must not be the shared one) and sends
//! every write waiting at that moment in one pipeline, followed by one
//! `WAIT`: concurrent calls share the round trip and the replicas' ack.
//!
//! How many replicas: at least `min_replicas_ack`, and as many as the
//! primary has had online in the last [`REMEMBER`]. A replica that has just
//! left may be the one a Sentinel is promoting (`SENTINEL FAILOVER` detaches
//! it first and moves the others over a moment later): in between, the old
//! primary still takes writes, its other replicas still acknowledge them,
//! and all of that is discarded when they follow the new primary. Waiting
//! for the replica that left fails instead (503, nothing promised) until the
//! failover is over and the new primary is in use. A replica that is simply
//! gone stops being waited for after [`REMEMBER`].

use std::time::Instant;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::primary::Primary;
use super::{Result, StoreError};
use crate::telemetry::metric;

/// Writes sent in one pipeline at most.
const BATCH: usize = 256;
/// How long a replica that was online is still waited for once it left.
pub const REMEMBER: Duration = Duration::from_secs(10);
/// How often the primary is asked how many replicas it has online.
const LOOK: Duration = Duration::from_millis(250);

/// The most replicas the primary in use had online lately.
struct Seen {
    epoch: u64,
    most: u32,
    since: Instant,
}

impl Seen {
    /// Takes a count of online replicas: a higher one at once, a lower one
    /// once the higher is older than [`REMEMBER`].
    fn note(&mut self, epoch: u64, online: u32, now: Instant) {
        if epoch != self.epoch {
            *self = Seen { epoch, most: online, since: now };
        } else if online >= self.most || now.duration_since(self.since) > REMEMBER {
            self.most = online;
            self.since = now;
        }
    }
}

/// Replicas with `state=online` in an `INFO replication` answer.
fn online_replicas(info: &str) -> u32 {
    info.lines().filter(|l| l.starts_with("slave") && l.contains("state=online")).count() as u32
}

struct Job {
    cmd: redis::Cmd,
    reply: oneshot::Sender<Result<redis::Value>>,
}

/// The door to the group-commit task.
#[derive(Clone)]
pub struct Durable {
    tx: mpsc::Sender<Job>,
}

impl Durable {
    /// Starts the task (in the current runtime) for `replicas` acks within `timeout`.
    pub fn start(primary: Arc<Primary>, replicas: u32, timeout: Duration) -> Durable {
        let (tx, rx) = mpsc::channel(4 * BATCH);
        tokio::spawn(commit_loop(primary, rx, replicas, timeout));
        Durable { tx }
    }

    /// Runs `cmd` and waits for the replicas; its answer, or why not.
    pub async fn run(&self, cmd: redis::Cmd) -> Result<redis::Value> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Job { cmd, reply }).await.map_err(|_| StoreError::NoPrimary)?;
        answer.await.unwrap_or(Err(StoreError::NoPrimary))
    }
}

async fn commit_loop(primary: Arc<Primary>, mut rx: mpsc::Receiver<Job>, min: u32, timeout: Duration) {
    let mut jobs: Vec<Job> = Vec::with_capacity(BATCH);
    let mut seen = Seen { epoch: u64::MAX, most: 0, since: Instant::now() };
    let mut look = tokio::time::interval(LOOK);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            n = rx.recv_many(&mut jobs, BATCH) => if n == 0 { return },
            _ = look.tick() => {
                if let Some(node) = primary.node() {
                    let mut c = node.conn.clone();
                    let info = redis::cmd("INFO").arg("replication").query_async::<String>(&mut c).await;
                    if let Ok(info) = info {
                        seen.note(node.epoch, online_replicas(&info), Instant::now());
                    }
                }
                continue;
            }
        }
        let Some(node) = primary.node() else {
            for j in jobs.drain(..) {
                let _ = j.reply.send(Err(StoreError::NoPrimary));
            }
            continue;
        };
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for j in &jobs {
            pipe.add_command(j.cmd.clone());
        }
        let replicas = if seen.epoch == node.epoch { min.max(seen.most) } else { min };
        pipe.cmd("WAIT").arg(replicas).arg(timeout.as_millis() as u64);
        let mut c = node.durable.clone();
        match pipe.query_async::<Vec<redis::RedisResult<redis::Value>>>(&mut c).await {
            Ok(mut answers) if answers.len() == jobs.len() + 1 => {
                let acked = answers.pop().and_then(|w| w.ok()).and_then(|v| redis::from_redis_value::<u32>(v).ok());
                if acked.unwrap_or(0) < replicas {
                    metrics::counter!(metric::REDIS_WAIT_SHORT).increment(jobs.len() as u64);
                    for j in jobs.drain(..) {
                        let _ = j.reply.send(Err(StoreError::ReplicasShort));
                    }
                    continue;
                }
                for (j, a) in jobs.drain(..).zip(answers) {
                    let _ = j.reply.send(a.map_err(|e| {
                        metrics::counter!(metric::REDIS_ERRORS).increment(1);
                        primary.saw(&e);
                        StoreError::Redis(e)
                    }));
                }
            }
            Ok(_) => {
                metrics::counter!(metric::REDIS_ERRORS).increment(1);
                for j in jobs.drain(..) {
                    let _ =
                        j.reply.send(Err(StoreError::Corrupt("pipeline".into(), "answers do not match the writes")));
                }
            }
            Err(e) => {
                // The connection failed: whether the writes were applied is
                // not known, and nothing was promised.
                metrics::counter!(metric::REDIS_ERRORS).increment(1);
                primary.saw(&e);
                let why = e.to_string();
                for j in jobs.drain(..) {
                    let _ = j.reply.send(Err(StoreError::Lost(why.clone())));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replica_that_left_is_waited_for_a_while() {
        let t0 = Instant::now();
        let mut s = Seen { epoch: u64::MAX, most: 0, since: t0 };
        s.note(1, 2, t0);
        assert_eq!(s.most, 2);
        s.note(1, 1, t0 + Duration::from_secs(3));
        assert_eq!(s.most, 2, "one left a moment ago: still waited for");
        s.note(1, 1, t0 + REMEMBER + Duration::from_secs(1));
        assert_eq!(s.most, 1, "gone for longer: no more");
        s.note(1, 2, t0 + REMEMBER + Duration::from_secs(2));
        assert_eq!(s.most, 2, "back: at once");
        s.note(2, 0, t0 + REMEMBER + Duration::from_secs(3));
        assert_eq!(s.most, 0, "another primary: counted afresh");
    }

    #[test]
    fn online_replicas_are_counted_from_info() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:3\r\n\
                    slave0:ip=127.0.0.1,port=1,state=online,offset=10,lag=0\r\n\
                    slave1:ip=127.0.0.1,port=2,state=wait_bgsave,offset=0,lag=0\r\n\
                    slave2:ip=127.0.0.1,port=3,state=online,offset=10,lag=1\r\nmaster_repl_offset:10\r\n";
        assert_eq!(online_replicas(info), 2);
        assert_eq!(online_replicas("role:master\r\nconnected_slaves:0\r\n"), 0);
    }
}
