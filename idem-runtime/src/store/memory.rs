//! `store = "memory"`: a lease store in process memory.
//!
//! For tests, prototypes and single-process consumers whose effects live in
//! memory too. Nothing survives a restart, and it shares no transaction with
//! anything: a crash after the handler's effect and before `commit` leaves a
//! lease that expires and lets the message run again (at-least-once inside
//! that window), exactly like the Redis store.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use super::{Claim, ClaimRequest, Claimed, LeaseStore, StoreError};
use crate::fingerprint::Fingerprint;

/// An in-memory dedup store with leases and TTLs.
///
/// ```
/// use idem_runtime::store::memory::MemoryStore;
/// let store = MemoryStore::new();
/// assert!(store.is_empty());
/// ```
#[derive(Debug, Default)]
pub struct MemoryStore {
    records: Mutex<Records>,
    next_token: AtomicU64,
}

/// Records by handler, then by key: looked up with borrowed `&str`s, so a
/// claim of a known key allocates nothing.
type Records = HashMap<Box<str>, HashMap<Box<str>, Record>>;

#[derive(Debug, Clone)]
enum Record {
    InProgress {
        token: u64,
        fingerprint: Option<Fingerprint>,
        until: Instant,
    },
    Done {
        fingerprint: Option<Fingerprint>,
        result: Option<String>,
        expires: Option<Instant>,
    },
}

impl Record {
    /// Whether it still counts: a lease not run out, a done-record not expired.
    fn live(&self, now: Instant) -> bool {
        match self {
            Record::InProgress { until, .. } => *until > now,
            Record::Done { expires, .. } => expires.is_none_or(|e| e > now),
        }
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of records (in progress or done, expired ones included until
    /// they are touched or purged).
    pub fn len(&self) -> usize {
        self.lock().values().map(HashMap::len).sum()
    }

    /// Whether the store holds no records.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a done-record exists for this handler and key.
    pub fn is_done(&self, handler: &str, key: &str) -> bool {
        matches!(
            self.lock().get(handler).and_then(|keys| keys.get(key)),
            Some(Record::Done { .. })
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Records> {
        // A panic while holding this lock cannot leave a record half-written
        // (every update is one insert/remove), so a poisoned lock is safe to use.
        crate::sync::lock(&self.records)
    }

    fn claim_one(&self, map: &mut Records, req: &ClaimRequest<'_>, now: Instant) -> Claim {
        let keys = match map.get_mut(req.handler) {
            Some(keys) => keys,
            None => map.entry(req.handler.into()).or_default(),
        };
        if let Some(record) = keys.get(req.key.as_str()).filter(|r| r.live(now)) {
            let (Record::InProgress { fingerprint, .. } | Record::Done { fingerprint, .. }) =
                record;
            if let Some(conflict) = req.conflict_with(*fingerprint) {
                return conflict;
            }
            return match record {
                Record::InProgress { until, .. } => Claim::InProgress {
                    retry_after: *until - now,
                },
                Record::Done { result, .. } => Claim::Done {
                    cached: result.clone(),
                },
            };
        }
        let token = self.next_token.fetch_add(1, Ordering::Relaxed) + 1;
        let lease = Record::InProgress {
            token,
            fingerprint: req.fingerprint,
            until: now + req.lease,
        };
        match keys.get_mut(req.key.as_str()) {
            Some(expired) => *expired = lease,
            None => {
                keys.insert(req.key.as_str().into(), lease);
            }
        }
        Claim::New { token }
    }

    fn complete_one(map: &mut Records, c: &Claimed<'_>, now: Instant) {
        let done = Record::Done {
            fingerprint: c.request.fingerprint,
            result: c.result.map(str::to_owned),
            expires: c.request.ttl.map(|ttl| now + ttl),
        };
        let keys = match map.get_mut(c.request.handler) {
            Some(keys) => keys,
            None => map.entry(c.request.handler.into()).or_default(),
        };
        let Some(record) = keys.get_mut(c.request.key.as_str()) else {
            keys.insert(c.request.key.as_str().into(), done);
            return;
        };
        let ours = matches!(record, Record::InProgress { token, .. } if *token == c.token);
        if ours {
            *record = done;
        } else if record.live(now) {
            // Our lease ran out and another consumer holds the key, or has
            // finished it: its record stays.
            tracing::warn!(
                handler = c.request.handler,
                key = %c.request.key,
                "lease lost before completion: another consumer took the key over and may have processed it too; raise `lease` above the handler's run time"
            );
        } else {
            // Ran out and nobody took it: the effect is applied, record it.
            tracing::warn!(
                handler = c.request.handler,
                key = %c.request.key,
                "the lease ran out before completion; raise `lease` above the handler's run time"
            );
            *record = done;
        }
    }

    fn release_leases(&self, claimed: &[Claimed<'_>]) {
        let mut map = self.lock();
        for c in claimed {
            let Some(keys) = map.get_mut(c.request.handler) else {
                continue;
            };
            if matches!(keys.get(c.request.key.as_str()), Some(Record::InProgress { token, .. }) if *token == c.token)
            {
                keys.remove(c.request.key.as_str());
            }
        }
    }
}

impl LeaseStore for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn claim(&self, request: &ClaimRequest<'_>) -> Result<Claim, StoreError> {
        let now = Instant::now();
        Ok(self.claim_one(&mut self.lock(), request, now))
    }

    async fn claim_all(&self, requests: &[ClaimRequest<'_>]) -> Result<Vec<Claim>, StoreError> {
        let now = Instant::now();
        let mut map = self.lock();
        Ok(requests
            .iter()
            .map(|r| self.claim_one(&mut map, r, now))
            .collect())
    }

    async fn complete(&self, done: &Claimed<'_>) -> Result<(), StoreError> {
        Self::complete_one(&mut self.lock(), done, Instant::now());
        Ok(())
    }

    async fn complete_all(&self, done: &[Claimed<'_>]) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut map = self.lock();
        for c in done {
            Self::complete_one(&mut map, c, now);
        }
        Ok(())
    }

    async fn release(&self, claimed: &Claimed<'_>) -> Result<(), StoreError> {
        self.release_leases(std::slice::from_ref(claimed));
        Ok(())
    }

    async fn release_all(&self, claimed: &[Claimed<'_>]) -> Result<(), StoreError> {
        self.release_leases(claimed);
        Ok(())
    }

    async fn purge_expired(&self, limit: u32) -> Result<u64, StoreError> {
        let now = Instant::now();
        let mut map = self.lock();
        let mut left = limit as usize;
        for keys in map.values_mut() {
            let expired: Vec<Box<str>> = keys
                .iter()
                .filter(|(_, r)| matches!(r, Record::Done { expires: Some(e), .. } if *e <= now))
                .map(|(k, _)| k.clone())
                .take(left)
                .collect();
            for k in &expired {
                keys.remove(k);
            }
            left -= expired.len();
            if left == 0 {
                break;
            }
        }
        Ok(u64::from(limit) - left as u64)
    }
}
