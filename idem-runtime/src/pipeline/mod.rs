//! The pipeline: one unit of work — a delivery, or a fetched batch in
//! `ack = "batch"` mode — through decode → key → claim → call → settle, for a
//! concrete handler type. It answers with an [`Outcome`] per attempt and
//! never talks to a broker, so every source gets the same semantics.
//!
//! - [`steps`]: decode and key one delivery, call the handler once.
//! - [`guard`]: the claims of a unit, from `begin` to commit or release, in
//!   one place.
//! - [`policy`]: what a failure means (retry after how long, or give up).
//! - [`layers`]: the built-in layers around every handler: tracing and counters.

pub(crate) mod batch;
pub(crate) mod guard;
pub(crate) mod layers;
pub(crate) mod policy;
pub(crate) mod steps;

use std::collections::HashSet;
use std::time::Duration;

use smallvec::SmallVec;
use tracing::Instrument;

use self::guard::{ClaimGuard, Unsettled};
use self::policy::RetryPolicy;
use self::steps::{Called, Item, Stage};
use crate::ack::AckMode;
use crate::binding::Bound;
use crate::handler::{Handler, HandlerFn, HandlerMeta};
use crate::service::{Attempt, Outcome, Service};
use crate::store::{Claim, ClaimRequest, Claimed, DedupStore, StoreError};

impl<H: HandlerFn<M>, M: 'static> Service for Bound<H, M> {
    fn meta(&self) -> &'static HandlerMeta {
        self.meta
    }

    async fn call<'a, 'd: 'a>(&'a self, attempts: &'a mut [Attempt<'d>]) {
        self.run(attempts).await;
        let policy = RetryPolicy::of(self.meta);
        for attempt in attempts.iter_mut() {
            policy.apply(attempt);
        }
    }
}

impl<H: HandlerFn<M>, M: 'static> Bound<H, M> {
    /// One unit of work: every attempt gets an outcome.
    async fn run(&self, attempts: &mut [Attempt<'_>]) {
        let mut items = prepare_all(&self.handler, self.meta, attempts);
        if items.is_empty() {
            return;
        }
        if let Err(e) = self.claim_and_call(attempts, &mut items).await {
            store_down(attempts, &items, &e);
        }
    }

    /// Runs the unit's items. A batch on a transactional store first runs
    /// optimistically: every item in the one transaction, no savepoints (a
    /// savepoint costs a round trip per item). When an item fails, that
    /// transaction is rolled back, the failed item keeps its outcome, and
    /// the others are run again, each in a savepoint, so that only what
    /// succeeds commits. Their handlers then run twice; their effects commit
    /// once.
    async fn claim_and_call(
        &self,
        attempts: &mut [Attempt<'_>],
        items: &mut [Item<H::Payload>],
    ) -> Result<(), StoreError> {
        let batch = self.meta.ack == AckMode::Batch;
        let mode = match (batch, <H::Store as DedupStore<M>>::TRANSACTIONAL) {
            (true, true) => Pass::Optimistic,
            // A lease store has nothing to roll back: its items are isolated
            // as they are.
            (true, false) => Pass::Isolated,
            (false, _) => Pass::Whole,
        };
        match self.pass(attempts, items, mode).await? {
            Ran::Settled => Ok(()),
            Ran::Redo => {
                // Their payloads went into the first run: decode them again.
                for item in items.iter_mut() {
                    if matches!(item.stage, Stage::Ready) && item.payload.is_none() {
                        let again =
                            steps::prepare(&self.handler, self.meta, attempts[item.at].delivery());
                        match again {
                            Ok(fresh) => item.payload = fresh.payload,
                            Err(outcome) => {
                                attempts[item.at].set_outcome(outcome);
                                item.stage = Stage::Settled;
                            }
                        }
                    }
                }
                match self.pass(attempts, items, Pass::Isolated).await? {
                    Ran::Settled => Ok(()),
                    Ran::Redo => unreachable!("an isolated pass settles every item"),
                }
            }
        }
    }

    /// One transaction over the unit's `Ready` items: claims their keys,
    /// runs the new ones, and settles the claims. `Err`: the store failed;
    /// items still unsettled are `StoreDown`.
    async fn pass(
        &self,
        attempts: &mut [Attempt<'_>],
        items: &mut [Item<H::Payload>],
        mode: Pass,
    ) -> Result<Ran, StoreError> {
        if !items.iter().any(|i| matches!(i.stage, Stage::Ready)) {
            return Ok(Ran::Settled);
        }
        let mut guard = ClaimGuard::begin(&*self.store).await?;
        let claims = {
            let requests = self.requests(attempts, items, Stage::is_ready);
            guard.claim(&requests).await
        };
        let claims = match claims {
            Ok(claims) => claims,
            Err(e) => {
                guard.abort().await;
                return Err(e);
            }
        };
        let ready = items.iter_mut().filter(|i| matches!(i.stage, Stage::Ready));
        for (item, claim) in ready.zip(claims) {
            match claim {
                Claim::New { token } => item.stage = Stage::Claimed { token },
                other => {
                    attempts[item.at].set_outcome(not_new(self.meta, other, item));
                    item.stage = Stage::Settled;
                }
            }
        }
        let isolate = mode == Pass::Isolated;
        for i in 0..items.len() {
            let Stage::Claimed { token } = items[i].stage else {
                continue;
            };
            let at = items[i].at;
            let payload = items[i]
                .payload
                .take()
                .expect("a claimed item has its payload");
            let called = if isolate {
                self.call_isolated(&mut guard, payload, &mut attempts[at], &items[i].key)
                    .await
            } else {
                let tx = guard.tx();
                Ok(steps::call(&self.handler, self.meta, payload, tx, &mut attempts[at]).await)
            };
            match called {
                Ok(called) if mode == Pass::Optimistic && !called.is_ok() => {
                    // Undo the whole transaction; this item keeps its
                    // outcome, the others go again, isolated.
                    {
                        let requests = self.requests(attempts, items, Stage::holds_claim);
                        let taken: Vec<Claimed<'_>> = requests
                            .iter()
                            .zip(items.iter().filter(|i| i.stage.holds_claim()))
                            .filter_map(|(request, item)| item.claimed(request))
                            .collect();
                        guard.release(&taken).await;
                    }
                    attempts[at].set_outcome(called.outcome());
                    items[i].stage = Stage::Settled;
                    for item in items.iter_mut() {
                        if item.stage.holds_claim() {
                            item.stage = Stage::Ready;
                        }
                    }
                    return Ok(Ran::Redo);
                }
                Ok(called) => items[i].stage = Stage::Called { token, called },
                Err((called, e)) => {
                    if let Some(called) = called {
                        items[i].stage = Stage::Called { token, called };
                    }
                    return Err(self.abort(guard, attempts, items, e).await);
                }
            }
        }
        let settled = {
            let requests = self.requests(attempts, items, Stage::holds_claim);
            let (done, failed) = claimed(&requests, items);
            if done.is_empty() {
                // Nothing to keep: undo the whole unit (the handler's partial
                // writes with it) in one step.
                guard.release(&failed).await;
                Ok(())
            } else {
                debug_assert!(
                    isolate || failed.is_empty(),
                    "a unit without savepoints cannot keep part of its writes"
                );
                guard.settle(&done, &failed).await
            }
        };
        // On failure a succeeded item's effect is not known to be durable,
        // unless a lease store kept its done-record: it goes back as
        // `StoreDown`. A failed item failed either way.
        let (kept, error) = match settled {
            Ok(()) => (true, None),
            Err(Unsettled { error, kept }) => (kept, Some(error)),
        };
        for item in items.iter_mut() {
            if let Stage::Called { called, .. } = &item.stage
                && (kept || !called.is_ok())
            {
                attempts[item.at].set_outcome(called.outcome());
                item.stage = Stage::Settled;
            }
        }
        error.map_or(Ok(Ran::Settled), Err)
    }

    /// Runs one batch item in its own savepoint. `Err` carries how the
    /// handler ended, if it ran, and the store's error.
    async fn call_isolated(
        &self,
        guard: &mut ClaimGuard<'_, H::Store, M>,
        payload: H::Payload,
        attempt: &mut Attempt<'_>,
        key: &crate::key::Key,
    ) -> Result<Called, (Option<Called>, StoreError)> {
        let span =
            tracing::info_span!("idem.item", message_id = %attempt.delivery().id, key = %key);
        let mut savepoint = guard.savepoint().await.map_err(|e| (None, e))?;
        let call = steps::call(
            &self.handler,
            self.meta,
            payload,
            &mut savepoint.tx,
            attempt,
        );
        // Without a subscriber that wants it, the span is not entered on
        // every poll and dropped per item.
        let called = if span.is_disabled() {
            call.await
        } else {
            call.instrument(span).await
        };
        match savepoint.end(called.is_ok()).await {
            Ok(()) => Ok(called),
            Err(e) => Err((Some(called), e)),
        }
    }

    /// A store failure part-way through a unit. A transactional store rolls
    /// everything back: nothing of the unit is durable. With a lease store
    /// the items whose handler succeeded have already applied their effects,
    /// so their done-records are written (best effort) and only the other
    /// leases are released: releasing theirs would run them again.
    async fn abort(
        &self,
        guard: ClaimGuard<'_, H::Store, M>,
        attempts: &mut [Attempt<'_>],
        items: &mut [Item<H::Payload>],
        error: StoreError,
    ) -> StoreError {
        let recorded = {
            let requests = self.requests(attempts, items, Stage::holds_claim);
            let (done, _) = claimed(&requests, items);
            let taken: Vec<Claimed<'_>> = requests
                .iter()
                .zip(items.iter().filter(|i| i.stage.holds_claim()))
                .filter_map(|(request, item)| item.claimed(request))
                .collect();
            guard.abort_keeping(&taken, &done).await
        };
        for item in items.iter_mut() {
            if let Stage::Called { called, .. } = &item.stage
                && (recorded || !called.is_ok())
            {
                attempts[item.at].set_outcome(called.outcome());
                item.stage = Stage::Settled;
            }
        }
        error
    }

    /// The claim requests of the items in `stage`, in order.
    fn requests<'r>(
        &self,
        attempts: &'r [Attempt<'_>],
        items: &'r [Item<H::Payload>],
        stage: fn(&Stage) -> bool,
    ) -> Few<ClaimRequest<'r>> {
        items
            .iter()
            .filter(|item| stage(&item.stage))
            .map(|item| request(self.meta, attempts, item))
            .collect()
    }
}

/// Decode and key every attempt; an attempt that fails here gets its
/// outcome. A key twice in one unit (a producer retry fetched together with
/// its original): only the first copy goes on. The others wait for it like
/// for any claim in progress, and then find the key done, or free again if
/// the first copy failed.
pub(crate) fn prepare_all<H: Handler<M>, M>(
    handler: &H,
    meta: &HandlerMeta,
    attempts: &mut [Attempt<'_>],
) -> Few<Item<H::Payload>> {
    let mut items: Few<Item<H::Payload>> = Few::with_capacity(attempts.len());
    for (at, attempt) in attempts.iter_mut().enumerate() {
        match steps::prepare(handler, meta, attempt.delivery()) {
            Ok(item) => items.push(item.at(at)),
            Err(outcome) => attempt.set_outcome(outcome),
        }
    }
    if items.len() > 1 {
        // Borrowed keys: no copy of each key per batch.
        let mut seen = HashSet::with_capacity(items.len());
        let twins: Vec<usize> = (0..items.len())
            .filter(|&i| !seen.insert(items[i].key.as_str()))
            .collect();
        if !twins.is_empty() {
            for i in twins {
                attempts[items[i].at].set_outcome(Outcome::Busy {
                    retry_after: Duration::ZERO,
                });
                items[i].stage = Stage::Settled;
            }
            items.retain(|i| !matches!(i.stage, Stage::Settled));
        }
    }
    items
}

/// A unit's items, claim requests or claims: inline for one delivery, so
/// a message on its own costs no heap allocation for them; on the heap for
/// a batch (one allocation per batch).
pub(crate) type Few<T> = SmallVec<[T; 1]>;

/// Sets `StoreDown` on every item without an outcome.
pub(crate) fn store_down<P>(attempts: &mut [Attempt<'_>], items: &[Item<P>], e: &StoreError) {
    for item in items {
        if !matches!(item.stage, Stage::Settled) {
            attempts[item.at].set_outcome(Outcome::StoreDown {
                error: e.to_string(),
            });
        }
    }
}

/// One item's claim request.
fn request<'r, P>(
    meta: &HandlerMeta,
    attempts: &'r [Attempt<'_>],
    item: &'r Item<P>,
) -> ClaimRequest<'r> {
    ClaimRequest {
        handler: meta.name,
        key: &item.key,
        fingerprint: item.fingerprint,
        message_id: &attempts[item.at].delivery().id,
        lease: meta.lease,
        ttl: meta.ttl,
    }
}

/// The claim requests of the items at `idx`, in that order.
pub(crate) fn requests_of<'r, P>(
    meta: &HandlerMeta,
    attempts: &'r [Attempt<'_>],
    items: &'r [Item<P>],
    idx: &[usize],
) -> Few<ClaimRequest<'r>> {
    idx.iter()
        .map(|&i| request(meta, attempts, &items[i]))
        .collect()
}

/// The outcome of a claim that did not make the key ours.
pub(crate) fn not_new<P>(meta: &HandlerMeta, claim: Claim, item: &Item<P>) -> Outcome {
    match claim {
        Claim::New { .. } => unreachable!("handled by the caller"),
        Claim::Done { cached } => Outcome::Duplicate { cached },
        Claim::InProgress { retry_after } => Outcome::Busy { retry_after },
        Claim::Conflict { stored } => Outcome::Rejected {
            reason: steps::conflict_reason(meta, &item.key, stored, item.fingerprint),
        },
    }
}

/// The claims of the called items: those whose handler succeeded (with
/// their results), and the others. `requests` are those of the items that
/// hold a claim, in order.
fn claimed<'r, P>(
    requests: &'r [ClaimRequest<'r>],
    items: &'r [Item<P>],
) -> (Few<Claimed<'r>>, Few<Claimed<'r>>) {
    let mut done = Few::new();
    let mut failed = Few::new();
    let holding = items.iter().filter(|i| i.stage.holds_claim());
    for (request, item) in requests.iter().zip(holding) {
        if let Stage::Called { token, called } = &item.stage {
            match called {
                Called::Succeeded(result) => done.push(Claimed {
                    request,
                    token: *token,
                    result: result.as_deref(),
                }),
                _ => failed.push(Claimed {
                    request,
                    token: *token,
                    result: None,
                }),
            }
        }
    }
    (done, failed)
}

/// How a pass runs its items.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// One delivery: the transaction is the item's.
    Whole,
    /// A batch in one transaction without savepoints; the first failure
    /// ends the pass ([`Ran::Redo`]).
    Optimistic,
    /// A batch with each item in its own savepoint.
    Isolated,
}

/// How a pass ended.
enum Ran {
    /// Every item it ran has its outcome.
    Settled,
    /// An optimistic pass failed at one item and was rolled back: run the
    /// rest again, isolated.
    Redo,
}

/// Checks a store's answer count against the contract.
pub(crate) fn check_claim_count(
    store: &'static str,
    got: usize,
    want: usize,
) -> Result<(), StoreError> {
    if got == want {
        return Ok(());
    }
    Err(StoreError::Config {
        store,
        message: format!(
            "claim returned {got} results for {want} keys: the store violates the LeaseStore/TxStore contract (one Claim per request, in order)"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_count_mismatch_names_the_contract() {
        let e = check_claim_count("custom", 1, 2).unwrap_err().to_string();
        assert!(e.contains("one Claim per request"), "{e}");
        assert!(check_claim_count("custom", 2, 2).is_ok());
    }
}
