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

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::primary::Primary;
use super::{Result, StoreError};
use crate::telemetry::metric;

/// Writes sent in one pipeline at most.
const BATCH: usize = 256;

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

async fn commit_loop(primary: Arc<Primary>, mut rx: mpsc::Receiver<Job>, replicas: u32, timeout: Duration) {
    let mut jobs: Vec<Job> = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut jobs, BATCH).await > 0 {
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
                    let _ = j.reply.send(Err(StoreError::Corrupt("pipeline".into(), "answers do not match the writes")));
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
