//! One backoff for every retry loop (PBX feeds, Redis at startup, pub/sub,
//! the roster write): exponential from `first`, doubling up to `max`, over
//! the `backon` crate. Shared by reference (a feed's loop and its session use
//! one, and the session resets it after a login).

use std::sync::Mutex;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

pub struct Backoff {
    builder: ExponentialBuilder,
    delays: Mutex<ExponentialBackoff>,
}

impl Backoff {
    /// `first`, then twice as long each time, at most `max` (never below `first`).
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff::of(ExponentialBuilder::default().with_min_delay(first).with_max_delay(max.max(first)))
    }

    /// The same with each delay up to twice as long at random, so that many
    /// clients that lost one server do not come back in step.
    pub fn jittered(first: Duration, max: Duration) -> Backoff {
        Backoff::of(ExponentialBuilder::default().with_min_delay(first).with_max_delay(max.max(first)).with_jitter())
    }

    fn of(builder: ExponentialBuilder) -> Backoff {
        let builder = builder.with_factor(2.0).without_max_times();
        Backoff { delays: Mutex::new(builder.build()), builder }
    }

    /// Starts again from `first`.
    pub fn reset(&self) {
        *self.delays.lock().unwrap_or_else(|p| p.into_inner()) = self.builder.build();
    }

    /// The delay to wait now; the following one is twice as long (capped).
    pub fn next_delay(&self) -> Duration {
        let mut d = self.delays.lock().unwrap_or_else(|p| p.into_inner());
        d.next().unwrap_or_default()
    }

    /// Waits the next delay; true when `token` was cancelled first.
    pub async fn wait(&self, token: &CancellationToken) -> bool {
        cancelled_during(self.next_delay(), token).await
    }
}

/// Sleeps `d`; true when `token` was cancelled first.
pub async fn cancelled_during(d: Duration, token: &CancellationToken) -> bool {
    tokio::select! {
        _ = token.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_the_cap_and_resets() {
        let ms = |d: Duration| d.as_millis() as u64;
        let b = Backoff::new(Duration::from_millis(250), Duration::from_secs(2));
        let seen: Vec<u64> = (0..6).map(|_| ms(b.next_delay())).collect();
        assert_eq!(seen, [250, 500, 1000, 2000, 2000, 2000]);
        b.reset();
        assert_eq!(ms(b.next_delay()), 250);
        let tiny = Backoff::new(Duration::from_millis(250), Duration::from_millis(1));
        assert_eq!(ms(tiny.next_delay()), 250);
        assert_eq!(ms(tiny.next_delay()), 250);
        let j = Backoff::jittered(Duration::from_millis(100), Duration::from_secs(1));
        for _ in 0..20 {
            let d = ms(j.next_delay());
            assert!((100..=2000).contains(&d), "{d}");
        }
    }
}
