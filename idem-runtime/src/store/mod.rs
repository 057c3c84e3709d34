//! Dedup stores: where idem remembers which messages already took effect.
//!
//! [`DedupStore`] is the one contract; the built-in stores (memory, SQLite,
//! later PostgreSQL and Redis) and user stores implement it, and the consumer
//! loop drives them all the same way. Transactional stores (SQL) claim keys
//! inside the handler's transaction, so the record and the business writes
//! commit together; lease stores (memory, Redis) hold a lease while the
//! handler runs and write a done-record after it.

use std::future::Future;
use std::time::Duration;

use crate::fingerprint::Fingerprint;
use crate::key::Key;

pub mod memory;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
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
    /// Nobody has processed this key: run the handler. The token proves
    /// ownership of a lease (lease stores); SQL stores use 0.
    New {
        /// Ownership token, handed back on commit or rollback.
        token: u64,
    },
    /// Already processed: ack as a duplicate, do not run the handler.
    Done {
        /// The handler's cached result (JSON), if it returned one.
        cached: Option<String>,
    },
    /// Another consumer holds the lease right now.
    InProgress {
        /// When the lease runs out at the latest.
        retry_after: Duration,
    },
    /// The key was processed with a different payload: same key, other
    /// message. Only when both the record and the request carry a
    /// fingerprint ([`ClaimRequest::conflict_with`]).
    Conflict {
        /// The stored fingerprint.
        stored: Fingerprint,
    },
}

/// A claimed record, handed back when the transaction ends.
#[derive(Debug, Clone, Copy)]
pub struct Claimed<'a> {
    /// What was claimed.
    pub request: &'a ClaimRequest<'a>,
    /// The token from [`Claim::New`].
    pub token: u64,
    /// The handler's result to cache (JSON), on commit.
    pub result: Option<&'a str>,
}

/// A dedup store.
///
/// The consumer loop calls, per message or per batch:
/// `begin` → `claim` (all keys in one round trip) → handler(s) → `commit`
/// (or `rollback`). In batch mode each item's handler runs in a `nested`
/// transaction (a savepoint) so one failing item rolls back alone, and
/// `unclaim` removes the failed items' claims before the batch commits.
///
/// Lease stores (no transaction) use [`NoTx`] and implement `claim` as
/// "take a lease", `commit` as "write done-records", `rollback` and
/// `unclaim` as "release my leases".
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an idem dedup store",
    label = "not a dedup store",
    note = "built-in stores: `store = \"sqlite\"`, `\"postgres\"`, `\"redis\"`, `\"memory\"` (each behind the idem cargo feature of the same name); a custom store type must implement `idem::DedupStore`"
)]
pub trait DedupStore: Send + Sync + 'static {
    /// The handle the handler receives as `tx: &mut …`; [`NoTx`] for stores
    /// without transactions.
    type Tx<'c>: Send
    where
        Self: 'c;

    /// Whether the handler's effects commit together with the store's
    /// record (SQL stores: the handler writes through `tx`). Then an ack
    /// never reaches the broker before [`commit`](Self::commit) returned,
    /// even in `manual_immediate` mode. Stores that only hold leases set
    /// `false`: the handler's effects are already applied when it calls
    /// `ack.ack()`, so `manual_immediate` sends the ack at that moment.
    /// The default (`true`) is the safe one for a custom store.
    const COMMITS_WITH_HANDLER: bool = true;

    /// Short name for listings and logs (`"sqlite"`, `"memory"`, …).
    fn kind(&self) -> &'static str;

    /// Starts a transaction (lease stores: returns [`NoTx`]).
    fn begin(&self) -> impl Future<Output = Result<Self::Tx<'static>, StoreError>> + Send;

    /// Claims all keys in one round trip; one [`Claim`] per request, in order.
    fn claim(
        &self,
        tx: &mut Self::Tx<'_>,
        requests: &[ClaimRequest<'_>],
    ) -> impl Future<Output = Result<Vec<Claim>, StoreError>> + Send;

    /// Records results and makes everything durable.
    fn commit(
        &self,
        tx: Self::Tx<'static>,
        done: &[Claimed<'_>],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Undoes everything since `begin`, including the claims.
    fn rollback(
        &self,
        tx: Self::Tx<'static>,
        claimed: &[Claimed<'_>],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Removes these claims within a transaction that will still commit
    /// (batch items whose handler failed).
    fn unclaim(
        &self,
        tx: &mut Self::Tx<'_>,
        claimed: &[Claimed<'_>],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Opens a nested transaction (savepoint) for one batch item.
    fn nested<'t>(
        &self,
        tx: &'t mut Self::Tx<'_>,
    ) -> impl Future<Output = Result<Self::Tx<'t>, StoreError>> + Send;

    /// Ends a nested transaction: keep (`commit = true`) or undo its writes.
    fn end_nested(
        &self,
        tx: Self::Tx<'_>,
        commit: bool,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes up to `limit` expired records; returns how many it deleted.
    /// Stores whose records expire on their own return `Ok(0)`.
    fn purge_expired(&self, limit: u32) -> impl Future<Output = Result<u64, StoreError>> + Send {
        let _ = limit;
        async { Ok(0) }
    }
}

/// Deletes expired records in batches of `batch` until a batch comes back
/// short; returns how many it deleted. Each batch is its own short statement
/// (SQL stores skip rows a consumer has locked), so no long lock is held.
/// The runtime calls this periodically when
/// [`RuntimeBuilder::purge_expired_every`](crate::RuntimeBuilder::purge_expired_every)
/// is set; call it yourself from a maintenance job otherwise.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idem_runtime::StoreError> {
/// let store = idem_runtime::store::memory::MemoryStore::new();
/// assert_eq!(idem_runtime::store::purge_all(&store, 1000).await?, 0);
/// # Ok(()) }
/// ```
pub async fn purge_all<S: DedupStore>(store: &S, batch: u32) -> Result<u64, StoreError> {
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

/// A store that can hand the handler a transaction (`tx: &mut …`).
/// Implemented by the SQL stores; a custom transactional store implements it
/// to allow a `tx` parameter.
#[diagnostic::on_unimplemented(
    message = "store `{Self}` has no transaction to give the handler",
    label = "this handler takes a `tx` parameter",
    note = "remove the `tx` parameter, or use `store = \"sqlite\"` / `store = \"postgres\"`, whose dedup record commits in the handler's transaction"
)]
pub trait TransactionalStore: DedupStore {}

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

impl DedupStore for NoStore {
    type Tx<'c> = NoTx;
    const COMMITS_WITH_HANDLER: bool = false;

    fn kind(&self) -> &'static str {
        "none"
    }
    async fn begin(&self) -> Result<NoTx, StoreError> {
        Ok(NoTx)
    }
    async fn claim(
        &self,
        _tx: &mut Self::Tx<'_>,
        requests: &[ClaimRequest<'_>],
    ) -> Result<Vec<Claim>, StoreError> {
        Ok(requests.iter().map(|_| Claim::New { token: 0 }).collect())
    }
    async fn commit(&self, _tx: NoTx, _done: &[Claimed<'_>]) -> Result<(), StoreError> {
        Ok(())
    }
    async fn rollback(&self, _tx: NoTx, _claimed: &[Claimed<'_>]) -> Result<(), StoreError> {
        Ok(())
    }
    async fn unclaim(
        &self,
        _tx: &mut Self::Tx<'_>,
        _claimed: &[Claimed<'_>],
    ) -> Result<(), StoreError> {
        Ok(())
    }
    async fn nested<'t>(&self, _tx: &'t mut Self::Tx<'_>) -> Result<Self::Tx<'t>, StoreError> {
        Ok(NoTx)
    }
    async fn end_nested(&self, _tx: Self::Tx<'_>, _commit: bool) -> Result<(), StoreError> {
        Ok(())
    }
}
