//! Rate limits on the Agent API: token buckets keyed by the calling agent (one token per SVID
//! signed) and by the source IP of attestations (one per attempt). A bucket refills at the
//! configured rate up to its burst; a call that does not fit is refused whole with
//! `ResourceExhausted`, before any work, and counted.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::hash::Hash;
use std::time::Instant;

/// Buckets above this many keys are trimmed of full (idle) ones.
const TRIM_AT: usize = 10_000;

/// A token bucket per key.
#[derive(Debug)]
pub struct RateLimiter<K> {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<K, (f64, Instant)>>,
}

impl<K: Eq + Hash + Clone> RateLimiter<K> {
    /// `per_second` tokens a second, at most `burst` saved up; `per_second == 0` disables.
    pub fn new(per_second: f64, burst: f64) -> Self {
        Self { per_second, burst: burst.max(1.0), buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes `cost` tokens from `key`'s bucket; false (and nothing taken) when they are not
    /// there.
    pub fn check(&self, key: &K, cost: f64) -> bool {
        self.check_at(key, cost, Instant::now())
    }

    /// [`RateLimiter::check`] at `now` (tests pass their own clock).
    fn check_at(&self, key: &K, cost: f64, now: Instant) -> bool {
        if self.per_second <= 0.0 {
            return true;
        }
        let mut b = self.buckets.lock();
        if b.len() > TRIM_AT {
            let (rate, burst) = (self.per_second, self.burst);
            b.retain(|_, (tokens, at)| *tokens + now.duration_since(*at).as_secs_f64() * rate < burst);
        }
        let (tokens, at) = b.entry(key.clone()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second).min(self.burst);
        *at = now;
        if *tokens >= cost {
            *tokens -= cost;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        // The test's own clock: a thread descheduled between two checks must not refill
        // the bucket behind the test's back (it did, once, on a loaded CI machine).
        let t0 = Instant::now();
        let at = |ms: u64| t0 + std::time::Duration::from_millis(ms);
        let l = RateLimiter::new(1000.0, 10.0);
        assert!(l.check_at(&"a", 10.0, at(0)));
        assert!(!l.check_at(&"a", 1.0, at(0)), "the burst was spent");
        assert!(l.check_at(&"b", 5.0, at(0)), "buckets are per key");
        assert!(!l.check_at(&"a", 2.0, at(1)), "1 ms refills one token, not two");
        assert!(l.check_at(&"a", 1.0, at(1)), "refilled at 1000/s");
        assert!(l.check_at(&"a", 5.0, at(6)), "5 ms refill five");
        assert!(!l.check_at(&"a", 11.0, at(60)), "a cost above the burst never fits");
        assert!(l.check(&"a", 1.0), "check uses the real clock");
        assert!(RateLimiter::new(0.0, 0.0).check(&"a", 1e9), "rate 0 disables");
    }
}
