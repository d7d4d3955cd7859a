//! The clock the CA reads: the wall clock in the server, a hand-moved one in tests, so the
//! rotation policy and certificate lifetimes are tested without sleeping.

use std::sync::atomic::{AtomicI64, Ordering};

/// Unix seconds, now.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time in Unix seconds.
    fn now(&self) -> i64;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> i64 {
        tessera_identity::unix_now()
    }
}

/// A clock that moves only when told to (tests). It may be set backwards, as a wall clock
/// corrected by NTP can be.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicI64);

impl ManualClock {
    /// A clock showing `now`.
    pub fn new(now: i64) -> Self {
        Self(AtomicI64::new(now))
    }

    /// Moves the clock by `secs` (negative: backwards).
    pub fn advance(&self, secs: i64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }

    /// Sets the clock.
    pub fn set(&self, now: i64) {
        self.0.store(now, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}
