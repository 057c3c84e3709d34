//! The claims of one unit of work, from `begin` to the end: the one place
//! where claims are committed (transactional) or completed (lease), given
//! up, or released after a failure.

use std::marker::PhantomData;

use crate::store::{Claim, ClaimRequest, Claimed, DedupStore, StoreError};

/// An open unit of work on a store.
pub(crate) struct ClaimGuard<'s, S: DedupStore<M>, M> {
    store: &'s S,
    tx: S::Tx<'static>,
    mode: PhantomData<fn() -> M>,
}

/// A batch item's savepoint, ended by [`Savepoint::end`].
pub(crate) struct Savepoint<'t, 's, S: DedupStore<M>, M> {
    store: &'s S,
    pub(crate) tx: S::Tx<'t>,
    mode: PhantomData<fn() -> M>,
}

impl<S: DedupStore<M>, M> Savepoint<'_, '_, S, M> {
    /// Keeps the item's writes, or undoes them.
    pub(crate) async fn end(self, keep: bool) -> Result<(), StoreError> {
        self.store.end_savepoint(self.tx, keep).await
    }
}

impl<'s, S: DedupStore<M>, M> ClaimGuard<'s, S, M> {
    pub(crate) async fn begin(store: &'s S) -> Result<Self, StoreError> {
        Ok(ClaimGuard {
            store,
            tx: store.begin().await?,
            mode: PhantomData,
        })
    }

    /// Claims every key in one store call; one answer per request.
    pub(crate) async fn claim(
        &mut self,
        requests: &[ClaimRequest<'_>],
    ) -> Result<Vec<Claim>, StoreError> {
        let claims = self.store.claim(&mut self.tx, requests).await?;
        super::check_claim_count(self.store.kind(), claims.len(), requests.len())?;
        Ok(claims)
    }

    /// The transaction the handler writes through.
    pub(crate) fn tx(&mut self) -> &mut S::Tx<'static> {
        &mut self.tx
    }

    /// A savepoint for one batch item.
    pub(crate) async fn savepoint(&mut self) -> Result<Savepoint<'_, 's, S, M>, StoreError> {
        let store = self.store;
        Ok(Savepoint {
            store,
            tx: store.savepoint(&mut self.tx).await?,
            mode: PhantomData,
        })
    }

    /// Ends the unit: gives up the claims of the items that failed, then
    /// commits (or completes) the rest. On `Err` nothing of `done` is known to
    /// be durable, except what [`abort_keeping`](Self::abort_keeping) reports.
    pub(crate) async fn settle(
        mut self,
        done: &[Claimed<'_>],
        failed: &[Claimed<'_>],
    ) -> Result<(), Unsettled> {
        if !failed.is_empty()
            && let Err(error) = self.store.unclaim(&mut self.tx, failed).await
        {
            let mut taken = done.to_vec();
            taken.extend_from_slice(failed);
            let kept = self.abort_keeping(&taken, done).await;
            return Err(Unsettled { error, kept });
        }
        self.store
            .finish(self.tx, done)
            .await
            .map_err(|error| Unsettled { error, kept: false })
    }

    /// Gives up before any handler ran (the claim failed): rolls back, or
    /// leaves the leases, whose state is unknown, to expire.
    pub(crate) async fn abort(self) {
        self.release(&[]).await;
    }

    /// Undoes the whole unit: rolls back (the handlers' writes and the
    /// claims), or releases these leases.
    pub(crate) async fn release(self, claimed: &[Claimed<'_>]) {
        if let Err(e) = self.store.abort(self.tx, claimed).await {
            tracing::warn!(error = %e, "rollback failed; the store discards the open transaction, leases expire on their own");
        }
    }

    /// Gives up after a store failure part-way through the unit. A
    /// transactional store rolls everything back: nothing is durable. With
    /// a lease store the items in `done` have already applied their effects,
    /// so their done-records are written (best effort) and only the other
    /// leases of `taken` are released: releasing theirs would run them again.
    /// Returns whether `done` is recorded.
    pub(crate) async fn abort_keeping(
        mut self,
        taken: &[Claimed<'_>],
        done: &[Claimed<'_>],
    ) -> bool {
        if S::TRANSACTIONAL {
            let _ = self.store.abort(self.tx, taken).await;
            return false;
        }
        let rest: Vec<Claimed<'_>> = taken
            .iter()
            .filter(|c| !done.iter().any(|d| std::ptr::eq(d.request, c.request)))
            .copied()
            .collect();
        if let Err(e) = self.store.unclaim(&mut self.tx, &rest).await {
            tracing::warn!(error = %e, "could not release the batch's leases; they expire on their own");
        }
        self.store.finish(self.tx, done).await.is_ok()
    }
}

/// The end of a unit failed.
pub(crate) struct Unsettled {
    pub(crate) error: StoreError,
    /// Whether the succeeded items' records were kept anyway (lease stores).
    pub(crate) kept: bool,
}
