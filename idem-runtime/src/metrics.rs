//! Per-handler counters the runtime keeps and users read.
//!
//! Plain atomics: cheap on the hot path, readable at any time through
//! `Runtime::stats`. An exporter to the `metrics` crate can be layered on top.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters of one handler.
#[derive(Debug, Default)]
pub struct HandlerMetrics {
    pub(crate) received: AtomicU64,
    pub(crate) processed: AtomicU64,
    pub(crate) duplicate: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) in_flight: AtomicU64,
}

impl HandlerMetrics {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Ordering::Relaxed);
    }

    /// A consistent-enough copy of the counters.
    pub fn snapshot(&self) -> Stats {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            received: r(&self.received),
            processed: r(&self.processed),
            duplicate: r(&self.duplicate),
            failed: r(&self.failed),
            retried: r(&self.retried),
            dead_lettered: r(&self.dead_lettered),
            in_flight: r(&self.in_flight),
        }
    }
}

/// Counters of one handler at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Deliveries fetched.
    pub received: u64,
    /// Deliveries whose handler ran and committed.
    pub processed: u64,
    /// Deliveries recognised as already processed (acked without running).
    pub duplicate: u64,
    /// Handler runs that failed (each failed attempt counts).
    pub failed: u64,
    /// Attempts retried after a failure.
    pub retried: u64,
    /// Deliveries sent to the dead letters.
    pub dead_lettered: u64,
    /// Deliveries being processed right now.
    pub in_flight: u64,
}
