//! Opening the incidents of concurrent calls in one script call.
//!
//! Every INVITE (and every incident opened through the API or by a PBX
//! feed) is opened by the `open` operation of `intake.lua`. One task here
//! takes every opening waiting at that moment, waits `redis.batch_wait` for
//! more (0 by default: the first call's answer would wait with it), and sends
//! them as one `FCALL`: one command, one round trip, one `WAIT` with
//! `min_replicas_ack`, instead of one each. The script opens them
//! one after the other exactly as separate calls would, so a call's outcome
//! never depends on its batch. The batch succeeds or fails as a whole: a call
//! in a failed batch is told its incident was not stored (503), and its retry
//! finds the incident if the script had written it (idempotent per call key).
//!
//! One batch is in Redis at a time while the next one fills (a few with
//! `min_replicas_ack`, whose cycle includes the replicas' ack), so under load
//! batches grow by themselves and the wait adds nothing: at 2,000 calls/s
//! about four calls share a script call, and a call waits at most for the
//! batch ahead of it (`deploy/bench cost`: 158 → 145 µs of CPU per call,
//! dispatchd and Redis, against four batches at once).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::intake::{OpenArgs, Opened};
use super::{At, Result, Store, StoreError};

/// Calls opened in one script call at most. With `min_replicas_ack` a
/// batch's cycle (the script, then the replica's ack) is several ms on a busy
/// machine, and the line's rate is at most this many calls per cycle. A
/// batch this size keeps Redis busy for about 15 ms, which only happens
/// under a flood.
pub const MAX_BATCH: usize = 256;

struct Job {
    args: OpenArgs,
    queued: Instant,
    reply: oneshot::Sender<Result<Opened>>,
}

/// The door to the batching task.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Job>,
}

impl Batcher {
    /// Starts the task (in the current runtime) on `store`.
    pub fn start(store: Store, wait: Duration, in_flight: usize) -> Batcher {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        tokio::spawn(batch_loop(store, rx, wait, in_flight));
        Batcher { tx }
    }

    /// Opens one call's incident with whatever else is being opened now.
    pub(super) async fn open(&self, args: OpenArgs) -> Result<Opened> {
        let (reply, answer) = oneshot::channel();
        let job = Job { args, queued: Instant::now(), reply };
        self.tx.send(job).await.map_err(|_| StoreError::NoPrimary)?;
        answer.await.unwrap_or(Err(StoreError::NoPrimary))
    }
}

/// Batches in Redis at once with `min_replicas_ack`: while one runs the next
/// ones are already queued behind it on the connection (in the same pipeline
/// as its `WAIT`), so Redis never waits for a batch to be sent; another fills
/// meanwhile. Two held the line with a replica at 4,000 calls/s, four at
/// 5,000 (`deploy/bench ha`, one run each).
pub const IN_FLIGHT_ACKED: usize = 4;

async fn batch_loop(store: Store, mut rx: mpsc::Receiver<Job>, wait: Duration, in_flight: usize) {
    let slots = Arc::new(Semaphore::new(in_flight));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let mut jobs: Vec<Job> = Vec::with_capacity(MAX_BATCH);
        if rx.recv_many(&mut jobs, MAX_BATCH).await == 0 {
            return;
        }
        if jobs.len() < MAX_BATCH && !wait.is_zero() {
            let until = tokio::time::sleep(wait);
            tokio::pin!(until);
            while jobs.len() < MAX_BATCH {
                let room = MAX_BATCH - jobs.len();
                tokio::select! {
                    biased;
                    n = rx.recv_many(&mut jobs, room) => if n == 0 { break },
                    _ = &mut until => break,
                }
            }
        }
        metrics::histogram!(crate::telemetry::metric::INTAKE_BATCH).record(jobs.len() as f64);
        // The time a call waited here counts in its age (its incident was opened when it came).
        for j in &mut jobs {
            let waited = j.queued.elapsed();
            j.args.add_age(waited);
        }
        tokio::spawn(run_batch(store.clone(), jobs, slot));
    }
}

/// One batch's script call, and each call's answer.
async fn run_batch(store: Store, jobs: Vec<Job>, _slot: OwnedSemaphorePermit) {
    let args: Vec<&OpenArgs> = jobs.iter().map(|j| &j.args).collect();
    match store.open_batch(&args, At::Server).await {
        Ok(outs) => {
            for (j, o) in jobs.into_iter().zip(outs) {
                let _ = j.reply.send(Ok(o));
            }
        }
        Err(e) => {
            for j in jobs {
                let _ = j.reply.send(Err(e.clone()));
            }
        }
    }
}
