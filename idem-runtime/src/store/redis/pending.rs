//! Operations this process owes Redis: completions and releases that could
//! not be written (Redis down, timeout), sent ahead of the next claim of the
//! same key. This is what keeps a Redis restart from re-running handlers
//! whose effects were applied: the message comes back, the owed completion
//! is written first, and the claim finds the done-record.
//!
//! Bounded and best effort: entries expire, and beyond the capacity new
//! ones are dropped (leases then expire on their own).

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use super::record::LEASE_LEN;

/// One owed operation, replayed with the store's scripts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum PendingOp {
    /// Delete our lease (if it is still ours).
    Release {
        /// Our lease value.
        lease: [u8; LEASE_LEN],
    },
    /// Replace our lease (or nothing) with the done-record.
    Complete {
        /// Our lease value; empty for a fallback run that held no lease.
        lease: Vec<u8>,
        /// The done value.
        done: Vec<u8>,
        /// TTL of the done-record in ms, 0 = none.
        ttl_ms: u64,
    },
}

#[derive(Debug)]
struct Entry {
    op: PendingOp,
    until: Instant,
}

/// The owed operations by record key.
#[derive(Debug)]
pub(super) struct PendingOps {
    map: Mutex<HashMap<Box<str>, Entry>>,
    /// `map.len()`, read without the lock on the hot path.
    len: AtomicUsize,
    capacity: usize,
}

impl PendingOps {
    pub(super) fn new(capacity: usize) -> Self {
        PendingOps {
            map: Mutex::new(HashMap::new()),
            len: AtomicUsize::new(0),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Entry>> {
        // Each update is one insert or remove: a poisoned map is consistent.
        crate::sync::lock(&self.map)
    }

    /// Remembers `op` for `key` until `until`. A completion still owed is
    /// never replaced by a release: the effect is applied, and writing its
    /// done-record is what keeps it from running again (and no later lease
    /// of ours can exist on the key meanwhile: the claim pipeline sends the
    /// completion first, and its `SET NX` fails whenever the completion ran).
    /// Returns false if the operation was dropped (capacity).
    pub(super) fn remember(&self, key: &str, op: PendingOp, until: Instant, now: Instant) -> bool {
        let mut map = self.lock();
        let owed = matches!(
            map.get(key),
            Some(Entry { op: PendingOp::Complete { .. }, until }) if *until > now
        );
        if owed && matches!(op, PendingOp::Release { .. }) {
            return true;
        }
        if map.len() >= self.capacity && !map.contains_key(key) {
            map.retain(|_, e| e.until > now);
        }
        let kept = map.len() < self.capacity || map.contains_key(key);
        if kept {
            map.insert(key.into(), Entry { op, until });
        }
        self.len.store(map.len(), Ordering::Relaxed);
        kept
    }

    /// Takes the live operations of these keys, in order; `None` (without
    /// locking) when nothing is owed for any of them.
    pub(super) fn take<'k>(
        &self,
        keys: impl Iterator<Item = &'k str>,
        now: Instant,
    ) -> Option<Vec<Option<PendingOp>>> {
        if self.len.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let mut map = self.lock();
        let taken: Vec<Option<PendingOp>> = keys
            .map(|k| map.remove(k).filter(|e| e.until > now).map(|e| e.op))
            .collect();
        self.len.store(map.len(), Ordering::Relaxed);
        taken.iter().any(Option::is_some).then_some(taken)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn release(n: u8) -> PendingOp {
        PendingOp::Release {
            lease: [n; LEASE_LEN],
        }
    }

    fn complete(n: u8) -> PendingOp {
        PendingOp::Complete {
            lease: vec![n],
            done: vec![n],
            ttl_ms: 0,
        }
    }

    #[test]
    fn an_owed_completion_is_not_replaced_by_a_release() {
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let p = PendingOps::new(10);
        assert!(p.remember("k", complete(1), later, now));
        assert!(p.remember("k", release(2), later, now));
        assert_eq!(
            p.take(["k"].into_iter(), now),
            Some(vec![Some(complete(1))])
        );
        // Once taken (sent), a release may be remembered again.
        assert!(p.remember("k", release(3), later, now));
        assert_eq!(p.take(["k"].into_iter(), now), Some(vec![Some(release(3))]));
        // A newer completion replaces an older one; an expired one counts for nothing.
        assert!(p.remember("k", complete(4), now, now));
        assert!(p.remember("k", release(5), later, now));
        assert_eq!(p.take(["k"].into_iter(), now), Some(vec![Some(release(5))]));
    }

    #[test]
    fn take_is_free_when_nothing_is_owed_and_skips_expired_entries() {
        let now = Instant::now();
        let p = PendingOps::new(10);
        assert_eq!(p.take(["a", "b"].into_iter(), now), None);
        p.remember("a", release(1), now + Duration::from_secs(1), now);
        p.remember("b", release(2), now, now); // already expired
        assert_eq!(
            p.take(["b", "a", "c"].into_iter(), now),
            Some(vec![None, Some(release(1)), None])
        );
        assert_eq!(p.take(["a"].into_iter(), now), None);
    }

    #[test]
    fn capacity_bounds_the_map() {
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        let p = PendingOps::new(2);
        assert!(p.remember("a", release(1), later, now));
        assert!(p.remember("b", release(2), now, now)); // expired: purged when full
        assert!(p.remember("c", release(3), later, now));
        assert!(!p.remember("d", release(4), later, now));
        assert!(p.remember("a", release(5), later, now)); // an existing key is updated
        assert_eq!(
            p.take(["a", "c", "d"].into_iter(), now),
            Some(vec![Some(release(5)), Some(release(3)), None])
        );
    }
}
