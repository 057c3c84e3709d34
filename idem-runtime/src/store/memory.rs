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
    records: Mutex<HashMap<(String, String), Record>>,
    next_token: AtomicU64,
}

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

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of records (in progress or done, expired ones included until
    /// they are touched or purged).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether the store holds no records.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a done-record exists for this handler and key.
    pub fn is_done(&self, handler: &str, key: &str) -> bool {
        matches!(
            self.lock().get(&(handler.to_owned(), key.to_owned())),
            Some(Record::Done { .. })
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Record>> {
        // A panic while holding this lock cannot leave a record half-written
        // (every update is one insert/remove), so a poisoned lock is safe to use.
        crate::sync::lock(&self.records)
    }

    fn claim_one(
        &self,
        map: &mut HashMap<(String, String), Record>,
        req: &ClaimRequest<'_>,
        now: Instant,
    ) -> Claim {
        let id = (req.handler.to_owned(), req.key.as_str().to_owned());
        let live = match map.get(&id) {
            Some(Record::InProgress { until, .. }) => *until > now,
            Some(Record::Done { expires, .. }) => expires.is_none_or(|e| e > now),
            None => false,
        };
        if live {
            let record = &map[&id];
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
        map.insert(
            id,
            Record::InProgress {
                token,
                fingerprint: req.fingerprint,
                until: now + req.lease,
            },
        );
        Claim::New { token }
    }

    fn release_leases(&self, claimed: &[Claimed<'_>]) {
        let mut map = self.lock();
        for c in claimed {
            let id = (
                c.request.handler.to_owned(),
                c.request.key.as_str().to_owned(),
            );
            if matches!(map.get(&id), Some(Record::InProgress { token, .. }) if *token == c.token) {
                map.remove(&id);
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
        self.complete_all(std::slice::from_ref(done)).await
    }

    async fn complete_all(&self, done: &[Claimed<'_>]) -> Result<(), StoreError> {
        let now = Instant::now();
        let mut map = self.lock();
        for c in done {
            let id = (
                c.request.handler.to_owned(),
                c.request.key.as_str().to_owned(),
            );
            let ours =
                matches!(map.get(&id), Some(Record::InProgress { token, .. }) if *token == c.token);
            if !ours {
                tracing::warn!(
                    handler = c.request.handler,
                    key = %c.request.key,
                    "lease lost before completion: another consumer may have processed this key too; raise `lease` above the handler's run time"
                );
            }
            map.insert(
                id,
                Record::Done {
                    fingerprint: c.request.fingerprint,
                    result: c.result.map(str::to_owned),
                    expires: c.request.ttl.map(|ttl| now + ttl),
                },
            );
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
        let expired: Vec<_> = map
            .iter()
            .filter(|(_, r)| matches!(r, Record::Done { expires: Some(e), .. } if *e <= now))
            .map(|(k, _)| k.clone())
            .take(limit as usize)
            .collect();
        for k in &expired {
            map.remove(k);
        }
        Ok(expired.len() as u64)
    }
}
