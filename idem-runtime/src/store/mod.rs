//! Dedup stores: where idem remembers which messages already took effect.
//!
//! A store implements one of two traits, and that choice is the one place
//! where "transactional or not" is stated:
//!
//! - [`LeaseStore`]: claim a key with a lease, run the handler, then
//!   [`complete`](LeaseStore::complete) (write the done-record) or
//!   [`release`](LeaseStore::release). The handler's effects and the record
//!   are not atomic. The memory and Redis stores, and most stores users write.
//! - [`TxStore`]: the claim is a row written inside a transaction that the
//!   handler writes through (`tx: &mut …`), so the record and the effects
//!   commit together or not at all. The SQL stores.
//!
//! The runtime drives both through [`DedupStore`], which every `LeaseStore`
//! and every `TxStore` implements on its own (it cannot be implemented by
//! hand). What a failed handler means for the broker is not decided here but
//! in the pipeline.

use std::future::Future;
use std::time::Duration;

use crate::fingerprint::Fingerprint;
use crate::key::Key;

pub mod memory;
#[cfg(feature = "mysql")]
pub mod mysql;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
pub mod sql;
#[cfg(feature = "sqlite")]
pub mod sqlite;

/// One key to claim.
#[derive(Debug, Clone)]
pub struct ClaimRequest<'a> {
    /// The handler's stable name: the namespace of its records.
    pub handler: &'a str,
    /// The idempotency key.
    pub key: &'a Key,
    /// The payload fingerprint, compared with the stored one; `None` when
    /// the handler detects no conflicts (the default): then a done key is a
    /// duplicate whatever the payload.
    pub fingerprint: Option<Fingerprint>,
    /// The broker's message id (kept for diagnostics).
    pub message_id: &'a str,
    /// How long an in-progress claim holds (lease stores).
    pub lease: Duration,
    /// How long the done-record is kept; `None` = forever.
    pub ttl: Option<Duration>,
}

impl ClaimRequest<'_> {
    /// The answer for a key whose record was made with fingerprint `stored`,
    /// when the two disagree: `Some(Claim::Conflict)`. `None` when they match
    /// or either side has no fingerprint (conflict detection is opt-in per
    /// handler, and records made before it was turned on carry none).
    ///
    /// ```
    /// use idem_runtime::{Fingerprint, Key};
    /// use idem_runtime::store::{Claim, ClaimRequest};
    /// let key = Key::new("o-1").unwrap();
    /// let req = ClaimRequest {
    ///     handler: "h", key: &key, fingerprint: Some(Fingerprint::new(1)), message_id: "m",
    ///     lease: std::time::Duration::from_secs(30), ttl: None,
    /// };
    /// assert_eq!(req.conflict_with(Some(Fingerprint::new(2))), Some(Claim::Conflict { stored: Fingerprint::new(2) }));
    /// assert_eq!(req.conflict_with(Some(Fingerprint::new(1))), None);
    /// assert_eq!(req.conflict_with(None), None);
    /// ```
    pub fn conflict_with(&self, stored: Option<Fingerprint>) -> Option<Claim> {
        match (stored, self.fingerprint) {
            (Some(stored), Some(this)) if stored != this => Some(Claim::Conflict { stored }),
            _ => None,
        }
    }
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Nobody has processed this key, and this claim now holds it: run the
    /// handler. A lease store's `token` proves the lease is ours when it is
    /// completed or released (so a consumer whose lease expired cannot undo
    /// the next owner's); transactional stores use 0.
    New {
        /// Ownership token, handed back in [`Claimed::token`].
        token: u64,
    },
    /// Already processed, and the record has not expired: the delivery is a
    /// duplicate, acked without running the handler.
    Done {
        /// The handler's cached result (JSON), if it returned one.
        cached: Option<String>,
    },
    /// Another consumer holds the key right now (a live lease, or a row
    /// another transaction inserted and has not committed). The delivery
    /// waits or comes back later; it is never run alongside.
    InProgress {
        /// When the lease runs out at the latest (`ZERO` if unknown).
        retry_after: Duration,
    },
    /// The key was processed (or is held) with a different payload: same
    /// key, other message. Only when both the record and the request carry a
    /// fingerprint ([`ClaimRequest::conflict_with`]). Dead-lettered.
    Conflict {
        /// The stored fingerprint.
        stored: Fingerprint,
    },
}

/// A claimed key, handed back to complete or release it.
#[derive(Debug, Clone, Copy)]
pub struct Claimed<'a> {
    /// What was claimed.
    pub request: &'a ClaimRequest<'a>,
    /// The token from [`Claim::New`].
    pub token: u64,
    /// The handler's result to cache (JSON), on completion.
    pub result: Option<&'a str>,
}

/// A dedup store that holds a **lease** while the handler runs and writes a
/// **done-record** after it: memory, Redis, and the simple stores users write.
///
/// The runtime calls, per message: [`claim`](Self::claim) → handler →
/// [`complete`](Self::complete) on success or [`release`](Self::release) on
/// failure; in batch mode the `_all` forms, one call per batch (their
/// defaults loop over the single forms; override them when the store can do
/// a batch in one round trip).
///
/// Records are per `(request.handler, request.key)`. What each method must do:
/// - `claim`: no record, or an expired one (a lease past its `lease`, a
///   done-record past its `ttl`) → take a lease until now + `request.lease`
///   and answer [`Claim::New`] with a token no other claim got (a counter or a
///   random `u64`); a live lease → [`Claim::InProgress`] with the time it has
///   left; a live done-record → [`Claim::Done`] with the result it was
///   completed with; either of those when the record and the request both
///   carry a fingerprint and they differ → [`Claim::Conflict`] instead (decide
///   with [`ClaimRequest::conflict_with`]: a `None` on either side never
///   conflicts). An **expired lease** (its holder crashed or is too slow) is
///   free again: claim it, with a new token.
/// - `complete`: over the caller's own lease (same token, even one that ran
///   out) or no record, write a done-record kept for `request.ttl` (forever
///   when `None`) with `result` cached. If the lease was **lost** meanwhile
///   (it ran out and another consumer claimed the key, or completed it), do
///   not overwrite that consumer's lease or record: the handler ran twice,
///   which is what a lease store cannot rule out; log it and return `Ok`.
/// - `release`: delete the lease if it is still the caller's (same token),
///   so that the message can run again at once; otherwise (another token's
///   lease, a done-record) leave the record alone.
/// - `claim_all`, `complete_all`, `release_all`: as the single forms, one
///   answer per request, in request order; a key given twice in one
///   `claim_all` is claimed once ([`Claim::InProgress`] for the later copy,
///   which the default loop does by itself).
/// - `purge_expired(limit)`: delete at most `limit` expired done-records, and
///   nothing live; return how many. Stores whose records expire on their own
///   (Redis) keep the default, `Ok(0)`.
///
/// The handler's effect and the done-record are not atomic: a crash between
/// them lets the lease expire and the message run again. Stores that can put
/// the record into the handler's own transaction implement [`TxStore`].
///
/// With the `testing` feature, `idem::testing::conformance::lease_store(||
/// MyStore::new()).await` checks every one of these rules and names the one
/// a store breaks, with the fix. This store, written from the rules above,
/// passes it:
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::Mutex;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use std::time::Instant;
/// use idem_runtime::store::{Claim, ClaimRequest, Claimed, LeaseStore, StoreError};
/// use idem_runtime::Fingerprint;
///
/// enum Record {
///     Lease { token: u64, until: Instant, fingerprint: Option<Fingerprint> },
///     Done { expires: Option<Instant>, fingerprint: Option<Fingerprint>, result: Option<String> },
/// }
///
/// /// Records by (handler, key), in process memory.
/// #[derive(Default)]
/// struct MapStore {
///     records: Mutex<HashMap<(String, String), Record>>,
///     tokens: AtomicU64,
/// }
///
/// fn id(r: &ClaimRequest<'_>) -> (String, String) {
///     (r.handler.to_owned(), r.key.as_str().to_owned())
/// }
///
/// impl LeaseStore for MapStore {
///     fn kind(&self) -> &'static str {
///         "map"
///     }
///
///     async fn claim(&self, r: &ClaimRequest<'_>) -> Result<Claim, StoreError> {
///         let now = Instant::now();
///         let mut records = self.records.lock().unwrap();
///         let live = match records.get(&id(r)) {
///             Some(Record::Lease { until, fingerprint, .. }) if *until > now => {
///                 Some((*fingerprint, Claim::InProgress { retry_after: *until - now }))
///             }
///             Some(Record::Done { expires, fingerprint, result }) if expires.is_none_or(|e| e > now) => {
///                 Some((*fingerprint, Claim::Done { cached: result.clone() }))
///             }
///             _ => None, // no record, or an expired one
///         };
///         if let Some((stored, answer)) = live {
///             return Ok(r.conflict_with(stored).unwrap_or(answer));
///         }
///         let token = self.tokens.fetch_add(1, Ordering::Relaxed) + 1;
///         records.insert(id(r), Record::Lease { token, until: now + r.lease, fingerprint: r.fingerprint });
///         Ok(Claim::New { token })
///     }
///
///     async fn complete(&self, c: &Claimed<'_>) -> Result<(), StoreError> {
///         let mut records = self.records.lock().unwrap();
///         let ours = match records.get(&id(c.request)) {
///             Some(Record::Lease { token, .. }) => *token == c.token,
///             Some(Record::Done { .. }) => false, // another consumer completed it
///             None => true,
///         };
///         if ours {
///             let expires = c.request.ttl.map(|ttl| Instant::now() + ttl);
///             let result = c.result.map(str::to_owned);
///             records.insert(id(c.request), Record::Done { expires, fingerprint: c.request.fingerprint, result });
///         }
///         Ok(())
///     }
///
///     async fn release(&self, c: &Claimed<'_>) -> Result<(), StoreError> {
///         let mut records = self.records.lock().unwrap();
///         if matches!(records.get(&id(c.request)), Some(Record::Lease { token, .. }) if *token == c.token) {
///             records.remove(&id(c.request));
///         }
///         Ok(())
///     }
///
///     async fn purge_expired(&self, limit: u32) -> Result<u64, StoreError> {
///         let now = Instant::now();
///         let mut records = self.records.lock().unwrap();
///         let expired: Vec<_> = records
///             .iter()
///             .filter(|(_, r)| matches!(r, Record::Done { expires: Some(e), .. } if *e <= now))
///             .map(|(k, _)| k.clone())
///             .take(limit as usize)
///             .collect();
///         for k in &expired {
///             records.remove(k);
///         }
///         Ok(expired.len() as u64)
///     }
/// }
///
/// # #[cfg(feature = "testing")]
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// // In a test of your crate (dev-dependency `idem` with feature "testing"):
/// idem_runtime::testing::conformance::lease_store(MapStore::default).await;
/// # }
/// # #[cfg(not(feature = "testing"))]
/// # fn main() { let _ = MapStore::default(); }
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an idem lease store",
    label = "not a LeaseStore",
    note = "implement `idem::store::LeaseStore` (claim, complete, release) for it; see its docs for a complete example"
)]
pub trait LeaseStore: Send + Sync + 'static {
    /// Short name for listings and logs (`"memory"`, `"redis"`, …).
    fn kind(&self) -> &'static str;

    /// Claims one key (see the trait docs for each answer).
    fn claim(
        &self,
        request: &ClaimRequest<'_>,
    ) -> impl Future<Output = Result<Claim, StoreError>> + Send;

    /// Replaces our lease with the done-record (see the trait docs for a
    /// lost lease).
    fn complete(&self, done: &Claimed<'_>) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes our lease, if it is still ours.
    fn release(&self, claimed: &Claimed<'_>)
    -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Claims several keys; one [`Claim`] per request, in order. The default
    /// claims them one by one; override it to claim in one round trip.
    fn claim_all(
        &self,
        requests: &[ClaimRequest<'_>],
    ) -> impl Future<Output = Result<Vec<Claim>, StoreError>> + Send {
        async move {
            let mut out = Vec::with_capacity(requests.len());
            for r in requests {
                out.push(self.claim(r).await?);
            }
            Ok(out)
        }
    }

    /// Completes several claims. The default completes each (all of them,
    /// even after a failure: every done-record written saves a re-run) and
    /// returns the first error.
    fn complete_all(
        &self,
        done: &[Claimed<'_>],
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        async move {
            let mut first = None;
            for c in done {
                if let Err(e) = self.complete(c).await {
                    first.get_or_insert(e);
                }
            }
            first.map_or(Ok(()), Err)
        }
    }

    /// Releases several claims. The default releases each and returns the
    /// first error (a lease not released expires on its own).
    fn release_all(
        &self,
        claimed: &[Claimed<'_>],
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        async move {
            let mut first = None;
            for c in claimed {
                if let Err(e) = self.release(c).await {
                    first.get_or_insert(e);
                }
            }
            first.map_or(Ok(()), Err)
        }
    }

    /// Deletes up to `limit` expired records; returns how many it deleted.
    /// Stores whose records expire on their own keep the default (`Ok(0)`).
    fn purge_expired(&self, limit: u32) -> impl Future<Output = Result<u64, StoreError>> + Send {
        let _ = limit;
        async { Ok(0) }
    }
}

/// A dedup store whose claim joins the handler's **transaction**: the record
/// and the handler's writes (through `tx: &mut Self::Tx<'_>`) commit
/// together, so a crash at any point leaves both or neither. The SQL stores.
///
/// The runtime calls, per message: [`begin`](Self::begin) →
/// [`claim`](Self::claim) → handler(tx) → [`commit`](Self::commit) (or
/// [`rollback`](Self::rollback)). In batch mode one transaction holds the
/// batch: one `claim` for every key (one round trip), the handlers, one
/// `commit`; when an item fails, the batch is redone with each item in a
/// [`savepoint`](Self::savepoint) and the failed items' claims
/// [`unclaim`](Self::unclaim)ed before the commit.
///
/// Records are per `(request.handler, request.key)`. What each method must do:
/// - `claim`: answers as for [`LeaseStore`], without leases: no record, or
///   one past its `ttl` → write the record (fingerprint, expiry now +
///   `request.ttl`, none for `None`) **through the transaction** and answer
///   [`Claim::New`] (token 0); a committed record → [`Claim::Done`] with its
///   cached result, or [`Claim::Conflict`] per [`ClaimRequest::conflict_with`].
///   An uncommitted claim of another transaction is waited for (the
///   database's row lock) and then read as committed ([`Claim::Done`]) or
///   gone ([`Claim::New`]), never answered early and never as a unique
///   violation. A key given twice in one call is claimed once
///   ([`Claim::InProgress`] for the later copies). One answer per request,
///   in request order.
/// - `commit`: save each `done.result` with its record, then commit.
/// - `rollback`: undo everything since `begin`, the claims included.
/// - `savepoint` / `end_savepoint(keep)`: a nested transaction whose claims
///   are kept (`true`) or undone (`false`).
/// - `unclaim`: delete these claims inside a transaction that will still
///   commit.
/// - `purge_expired(limit)`: as for [`LeaseStore`].
///
/// With the `testing` feature, `idem::testing::conformance::tx_store(||
/// my_store.clone()).await` checks every one of these rules. A store of your
/// own can wrap a built-in one, here to record which messages committed:
///
/// ```
/// # #[cfg(feature = "sqlite")] mod example {
/// use std::sync::Mutex;
/// use idem_runtime::store::sqlite::SqliteStore;
/// use idem_runtime::store::{Claim, ClaimRequest, Claimed, StoreError, TxStore};
/// use idem_runtime::Tx;
///
/// pub struct Audited {
///     pub inner: SqliteStore,
///     pub committed: Mutex<Vec<String>>,
/// }
///
/// // Keep `Self::Tx<'_>` in the signatures, as the trait has them.
/// impl TxStore for Audited {
///     type Tx<'c> = Tx<'c>;
///
///     fn kind(&self) -> &'static str {
///         "audited"
///     }
///     async fn begin(&self) -> Result<Self::Tx<'static>, StoreError> {
///         self.inner.begin().await
///     }
///     async fn claim(&self, tx: &mut Self::Tx<'_>, requests: &[ClaimRequest<'_>]) -> Result<Vec<Claim>, StoreError> {
///         self.inner.claim(tx, requests).await
///     }
///     async fn commit(&self, tx: Self::Tx<'static>, done: &[Claimed<'_>]) -> Result<(), StoreError> {
///         self.inner.commit(tx, done).await?;
///         let ids = done.iter().map(|c| c.request.message_id.to_owned());
///         self.committed.lock().unwrap().extend(ids);
///         Ok(())
///     }
///     async fn rollback(&self, tx: Self::Tx<'static>) -> Result<(), StoreError> {
///         self.inner.rollback(tx).await
///     }
///     async fn savepoint<'t>(&self, tx: &'t mut Self::Tx<'_>) -> Result<Self::Tx<'t>, StoreError> {
///         self.inner.savepoint(tx).await
///     }
///     async fn end_savepoint(&self, savepoint: Self::Tx<'_>, keep: bool) -> Result<(), StoreError> {
///         self.inner.end_savepoint(savepoint, keep).await
///     }
///     async fn unclaim(&self, tx: &mut Self::Tx<'_>, claimed: &[Claimed<'_>]) -> Result<(), StoreError> {
///         self.inner.unclaim(tx, claimed).await
///     }
///     async fn purge_expired(&self, limit: u32) -> Result<u64, StoreError> {
///         TxStore::purge_expired(&self.inner, limit).await
///     }
/// }
/// # }
///
/// # #[cfg(all(feature = "sqlite", feature = "testing"))]
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), idem_runtime::StoreError> {
/// # use example::Audited;
/// # use idem_runtime::store::sqlite::SqliteStore;
/// let inner = SqliteStore::open("sqlite::memory:").await?;
/// inner.migrate().await?;
/// idem_runtime::testing::conformance::tx_store(|| Audited { inner: inner.clone(), committed: Default::default() }).await;
/// # Ok(()) }
/// # #[cfg(not(all(feature = "sqlite", feature = "testing")))]
/// # fn main() {}
/// ```
#[diagnostic::on_unimplemented(
    message = "store `{Self}` has no transaction to give the handler",
    label = "this handler takes a `tx` parameter",
    note = "remove the `tx` parameter, or use a store whose dedup record commits in the handler's transaction: `store = \"sqlite\"`, `\"postgres\"` or `\"mysql\"`, or a type implementing `idem::store::TxStore`"
)]
pub trait TxStore: Send + Sync + 'static {
    /// The transaction the handler receives as `tx: &mut Self::Tx<'_>`.
    type Tx<'c>: Send
    where
        Self: 'c;

    /// Short name for listings and logs (`"sqlite"`, `"postgres"`, …).
    fn kind(&self) -> &'static str;

    /// Starts a transaction.
    fn begin(&self) -> impl Future<Output = Result<Self::Tx<'static>, StoreError>> + Send;

    /// Claims all keys in one round trip; one [`Claim`] per request, in order.
    fn claim(
        &self,
        tx: &mut Self::Tx<'_>,
        requests: &[ClaimRequest<'_>],
    ) -> impl Future<Output = Result<Vec<Claim>, StoreError>> + Send;

    /// Saves the results of `done` with their records and commits.
    fn commit(
        &self,
        tx: Self::Tx<'static>,
        done: &[Claimed<'_>],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Undoes everything since `begin`, the claims included.
    fn rollback(
        &self,
        tx: Self::Tx<'static>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Opens a savepoint for one batch item.
    fn savepoint<'t>(
        &self,
        tx: &'t mut Self::Tx<'_>,
    ) -> impl Future<Output = Result<Self::Tx<'t>, StoreError>> + Send;

    /// Ends a savepoint: keep its writes (`keep = true`) or undo them.
    fn end_savepoint(
        &self,
        savepoint: Self::Tx<'_>,
        keep: bool,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes these claims inside a transaction that will still commit
    /// (batch items whose handler failed).
    fn unclaim(
        &self,
        tx: &mut Self::Tx<'_>,
        claimed: &[Claimed<'_>],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes up to `limit` expired records; returns how many it deleted.
    fn purge_expired(&self, limit: u32) -> impl Future<Output = Result<u64, StoreError>> + Send {
        let _ = limit;
        async { Ok(0) }
    }
}

/// Which of the two store traits a store implements: the `M` of
/// [`DedupStore<M>`], inferred by the compiler.
pub mod mode {
    /// The store is a [`LeaseStore`](super::LeaseStore).
    #[derive(Debug)]
    pub enum Lease {}
    /// The store is a [`TxStore`](super::TxStore).
    #[derive(Debug)]
    pub enum Transactional {}
}

mod sealed {
    pub trait Sealed<M> {}
    impl<T: super::LeaseStore> Sealed<super::mode::Lease> for T {}
    impl<T: super::TxStore> Sealed<super::mode::Transactional> for T {}
}

/// How the runtime drives any store: implemented for every [`LeaseStore`]
/// (`M` = [`mode::Lease`]) and every [`TxStore`] (`M` =
/// [`mode::Transactional`]), and nothing else. Implement one of those two;
/// the compiler picks `M`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an idem dedup store",
    label = "not a dedup store",
    note = "built-in stores: `store = \"sqlite\"`, `\"postgres\"`, `\"mysql\"`, `\"redis\"`, `\"memory\"` (each behind the idem cargo feature of the same name); a custom store type implements `idem::store::LeaseStore` or `idem::store::TxStore`"
)]
pub trait DedupStore<M>: sealed::Sealed<M> + Send + Sync + 'static {
    /// The handle handlers receive: the store's transaction, or [`NoTx`].
    type Tx<'c>: Send
    where
        Self: 'c;
    /// Whether the record commits together with the handler's writes. Then
    /// no ack ever reaches the broker before the commit; otherwise a
    /// `manual_immediate` ack goes out the moment the handler calls
    /// `ack.ack()` (its effects are applied by then).
    const TRANSACTIONAL: bool;

    #[doc(hidden)]
    fn kind(&self) -> &'static str;
    #[doc(hidden)]
    fn begin(&self) -> impl Future<Output = Result<Self::Tx<'static>, StoreError>> + Send;
    #[doc(hidden)]
    fn claim(
        &self,
        tx: &mut Self::Tx<'_>,
        requests: &[ClaimRequest<'_>],
    ) -> impl Future<Output = Result<Vec<Claim>, StoreError>> + Send;
    /// Commits (transactional) or writes the done-records (lease).
    #[doc(hidden)]
    fn finish(
        &self,
        tx: Self::Tx<'static>,
        done: &[Claimed<'_>],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Rolls back (transactional) or releases the leases (lease).
    #[doc(hidden)]
    fn abort(
        &self,
        tx: Self::Tx<'static>,
        claimed: &[Claimed<'_>],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Gives up these claims while the rest of the batch goes on.
    #[doc(hidden)]
    fn unclaim(
        &self,
        tx: &mut Self::Tx<'_>,
        claimed: &[Claimed<'_>],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// A savepoint (transactional); lease stores have nothing to isolate.
    #[doc(hidden)]
    fn savepoint<'t>(
        &self,
        tx: &'t mut Self::Tx<'_>,
    ) -> impl Future<Output = Result<Self::Tx<'t>, StoreError>> + Send;
    #[doc(hidden)]
    fn end_savepoint(
        &self,
        savepoint: Self::Tx<'_>,
        keep: bool,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    #[doc(hidden)]
    fn purge_expired(&self, limit: u32) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

impl<T: LeaseStore> DedupStore<mode::Lease> for T {
    type Tx<'c>
        = NoTx
    where
        T: 'c;
    const TRANSACTIONAL: bool = false;

    fn kind(&self) -> &'static str {
        LeaseStore::kind(self)
    }
    async fn begin(&self) -> Result<NoTx, StoreError> {
        Ok(NoTx)
    }
    async fn claim(
        &self,
        _tx: &mut Self::Tx<'_>,
        requests: &[ClaimRequest<'_>],
    ) -> Result<Vec<Claim>, StoreError> {
        match requests {
            [one] => Ok(vec![LeaseStore::claim(self, one).await?]),
            many => self.claim_all(many).await,
        }
    }
    async fn finish(&self, _tx: NoTx, done: &[Claimed<'_>]) -> Result<(), StoreError> {
        match done {
            [] => Ok(()),
            [one] => self.complete(one).await,
            many => self.complete_all(many).await,
        }
    }
    async fn abort(&self, _tx: NoTx, claimed: &[Claimed<'_>]) -> Result<(), StoreError> {
        release_some(self, claimed).await
    }
    async fn unclaim(
        &self,
        _tx: &mut Self::Tx<'_>,
        claimed: &[Claimed<'_>],
    ) -> Result<(), StoreError> {
        release_some(self, claimed).await
    }
    async fn savepoint<'t>(&self, _tx: &'t mut Self::Tx<'_>) -> Result<Self::Tx<'t>, StoreError> {
        Ok(NoTx)
    }
    async fn end_savepoint(&self, _savepoint: Self::Tx<'_>, _keep: bool) -> Result<(), StoreError> {
        Ok(())
    }
    fn purge_expired(&self, limit: u32) -> impl Future<Output = Result<u64, StoreError>> + Send {
        LeaseStore::purge_expired(self, limit)
    }
}

/// `release` or `release_all` by count; nothing for none.
async fn release_some<T: LeaseStore>(store: &T, claimed: &[Claimed<'_>]) -> Result<(), StoreError> {
    match claimed {
        [] => Ok(()),
        [one] => store.release(one).await,
        many => store.release_all(many).await,
    }
}

impl<T: TxStore> DedupStore<mode::Transactional> for T {
    type Tx<'c>
        = T::Tx<'c>
    where
        T: 'c;
    const TRANSACTIONAL: bool = true;

    fn kind(&self) -> &'static str {
        TxStore::kind(self)
    }
    fn begin(&self) -> impl Future<Output = Result<Self::Tx<'static>, StoreError>> + Send {
        TxStore::begin(self)
    }
    fn claim(
        &self,
        tx: &mut Self::Tx<'_>,
        requests: &[ClaimRequest<'_>],
    ) -> impl Future<Output = Result<Vec<Claim>, StoreError>> + Send {
        TxStore::claim(self, tx, requests)
    }
    fn finish(
        &self,
        tx: Self::Tx<'static>,
        done: &[Claimed<'_>],
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.commit(tx, done)
    }
    fn abort(
        &self,
        tx: Self::Tx<'static>,
        _claimed: &[Claimed<'_>],
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        self.rollback(tx)
    }
    fn unclaim(
        &self,
        tx: &mut Self::Tx<'_>,
        claimed: &[Claimed<'_>],
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        TxStore::unclaim(self, tx, claimed)
    }
    fn savepoint<'t>(
        &self,
        tx: &'t mut Self::Tx<'_>,
    ) -> impl Future<Output = Result<Self::Tx<'t>, StoreError>> + Send {
        TxStore::savepoint(self, tx)
    }
    fn end_savepoint(
        &self,
        savepoint: Self::Tx<'_>,
        keep: bool,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        TxStore::end_savepoint(self, savepoint, keep)
    }
    fn purge_expired(&self, limit: u32) -> impl Future<Output = Result<u64, StoreError>> + Send {
        TxStore::purge_expired(self, limit)
    }
}

/// Deletes expired records in batches of `batch` until a batch comes back
/// short; returns how many it deleted. Each batch is its own short statement
/// (SQL stores skip rows a consumer has locked), so no long lock is held.
/// The runtime calls this periodically when
/// [`RuntimeBuilder::purge_expired_every`](crate::runtime::RuntimeBuilder::purge_expired_every)
/// is set; call it yourself from a maintenance job otherwise.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idem_runtime::StoreError> {
/// let store = idem_runtime::store::memory::MemoryStore::new();
/// assert_eq!(idem_runtime::store::purge_all(&store, 1000).await?, 0);
/// # Ok(()) }
/// ```
pub async fn purge_all<S: DedupStore<M>, M>(store: &S, batch: u32) -> Result<u64, StoreError> {
    let batch = batch.max(1);
    let mut total = 0;
    loop {
        let n = store.purge_expired(batch).await?;
        total += n;
        if n < u64::from(batch) {
            return Ok(total);
        }
        // Let consumers in between batches.
        tokio::task::yield_now().await;
    }
}

/// The transaction handle of stores without transactions.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoTx;

/// A dedup store failed. The consumer loop fails closed: it does not run the
/// handler, does not ack, backs off and tries again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The store cannot be reached or failed mid-operation.
    #[error(
        "{store} store unavailable: {source}; idem keeps the message unacked and retries with backoff"
    )]
    Unavailable {
        /// Which store.
        store: &'static str,
        /// The driver's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The store is set up wrongly (bad table name, missing migration…).
    #[error("{store} store misconfigured: {message}")]
    Config {
        /// Which store.
        store: &'static str,
        /// What is wrong and how to fix it.
        message: String,
    },
}

impl StoreError {
    /// Wraps a driver error as "unavailable".
    pub fn unavailable(
        store: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        StoreError::Unavailable {
            store,
            source: Box::new(source),
        }
    }
}

/// No dedup store (`store` omitted): every delivery runs the handler. The
/// broker's at-least-once becomes at-least-once effects.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoStore;

impl LeaseStore for NoStore {
    fn kind(&self) -> &'static str {
        "none"
    }
    async fn claim(&self, _request: &ClaimRequest<'_>) -> Result<Claim, StoreError> {
        Ok(Claim::New { token: 0 })
    }
    async fn complete(&self, _done: &Claimed<'_>) -> Result<(), StoreError> {
        Ok(())
    }
    async fn release(&self, _claimed: &Claimed<'_>) -> Result<(), StoreError> {
        Ok(())
    }
}
