//! A per-source rate limit on new transactions that cost a Redis write
//! (INVITE, MESSAGE): a token bucket per source address, refilled at `rate`
//! per second and holding at most one second's worth.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct RateLimit {
    /// Tokens per second; 0 = no limit.
    rate: f64,
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl RateLimit {
    pub fn new(per_second: u32) -> RateLimit {
        RateLimit { rate: f64::from(per_second), buckets: Mutex::default() }
    }

    /// Takes a token for a request from `ip` at `now`; false when its bucket is empty.
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = b.entry(ip).or_insert((self.rate, now));
        *tokens = (*tokens + now.saturating_duration_since(*last).as_secs_f64() * self.rate).min(self.rate);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forgets sources not heard from for a while (their buckets are full again).
    pub fn sweep(&self, now: Instant) {
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        b.retain(|_, (_, last)| now.saturating_duration_since(*last) < Duration::from_secs(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_of_one_second_then_the_rate() {
        let r = RateLimit::new(10);
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let t0 = Instant::now();
        assert_eq!((0..15).filter(|_| r.allow(a, t0)).count(), 10, "one second's worth at once");
        assert!(r.allow(b, t0), "another source has its own bucket");
        assert!(!r.allow(a, t0 + Duration::from_millis(50)));
        assert!(r.allow(a, t0 + Duration::from_millis(100)), "refilled at the rate");
        r.sweep(t0 + Duration::from_secs(11));
        assert!(r.buckets.lock().unwrap().is_empty());
        let off = RateLimit::new(0);
        assert!((0..10_000).all(|_| off.allow(a, t0)));
    }
}
