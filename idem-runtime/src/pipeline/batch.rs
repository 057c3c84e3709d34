//! A batch handler's unit of work: the new messages of a fetched batch go to
//! the handler in one call, inside one transaction, after one claim of every
//! key; duplicates never reach it. When the call fails, the failing message
//! is isolated: by the index the handler gave ([`BatchError::at`]), or by
//! halving the batch, each part its own transaction, until it stands alone.
//!
//! [`BatchError::at`]: crate::handler::BatchError::at

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;

use super::guard::{ClaimGuard, Unsettled};
use super::policy::RetryPolicy;
use super::steps::{self, Called, Item, Stage};
use crate::binding::{Bound, Many};
use crate::handler::{Batch, BatchHandlerFn, BatchResult, HandlerMeta, failed_index};
use crate::service::{Attempt, Outcome, Service};
use crate::store::{Claimed, DedupStore, StoreError};

impl<H: BatchHandlerFn<M>, M: 'static> Service for Bound<H, M, Many> {
    fn meta(&self) -> &'static HandlerMeta {
        self.meta
    }

    async fn call<'a, 'd: 'a>(&'a self, attempts: &'a mut [Attempt<'d>]) {
        let mut items = super::prepare_all(&self.handler, self.meta, attempts);
        let mut parts = VecDeque::from([(0..items.len()).collect::<Vec<_>>()]);
        while let Some(part) = parts.pop_front() {
            match self.part(attempts, &mut items, &part).await {
                Ok(split) => parts.extend(split),
                Err(e) => {
                    super::store_down(attempts, &items, &e);
                    break;
                }
            }
        }
        let policy = RetryPolicy::of(self.meta);
        for attempt in attempts.iter_mut() {
            policy.apply(attempt);
        }
    }
}

impl<H: BatchHandlerFn<M>, M: 'static> Bound<H, M, Many> {
    /// One transaction over the `Ready` items of `part`: claim, call the
    /// handler with the new ones, settle. Returns the parts to run next
    /// when the call failed and its failing message is not isolated yet.
    async fn part(
        &self,
        attempts: &mut [Attempt<'_>],
        items: &mut [Item<H::Payload>],
        part: &[usize],
    ) -> Result<Vec<Vec<usize>>, StoreError> {
        // A part that ran before was rolled back: decode its payloads again.
        for &i in part {
            if items[i].stage.is_ready() && items[i].payload.is_none() {
                match steps::prepare(&self.handler, self.meta, attempts[items[i].at].delivery()) {
                    Ok(fresh) => items[i].payload = fresh.payload,
                    Err(outcome) => {
                        attempts[items[i].at].set_outcome(outcome);
                        items[i].stage = Stage::Settled;
                    }
                }
            }
        }
        let ready: Vec<usize> = part
            .iter()
            .copied()
            .filter(|&i| items[i].stage.is_ready())
            .collect();
        if ready.is_empty() {
            return Ok(Vec::new());
        }
        let mut guard = ClaimGuard::begin(&*self.store).await?;
        let claims = {
            let requests = super::requests_of(self.meta, attempts, items, &ready);
            guard.claim(&requests).await
        };
        let claims = match claims {
            Ok(claims) => claims,
            Err(e) => {
                guard.abort().await;
                return Err(e);
            }
        };
        let mut new = Vec::with_capacity(ready.len());
        for (&i, claim) in ready.iter().zip(claims) {
            match claim {
                crate::store::Claim::New { token } => {
                    items[i].stage = Stage::Claimed { token };
                    new.push(i);
                }
                other => {
                    let outcome = super::not_new(self.meta, other, &items[i]);
                    attempts[items[i].at].set_outcome(outcome);
                    items[i].stage = Stage::Settled;
                }
            }
        }
        if new.is_empty() {
            guard.abort().await;
            return Ok(Vec::new());
        }
        let batch = Batch::from_items(
            new.iter()
                .map(|&i| {
                    let payload = items[i]
                        .payload
                        .take()
                        .expect("a claimed item has its payload");
                    (payload, attempts[items[i].at].delivery().clone())
                })
                .collect(),
        );
        let run = AssertUnwindSafe(self.handler.call(batch, guard.tx()))
            .catch_unwind()
            .await;
        let failure = match run {
            Ok(result) => match result.into_result() {
                Ok(()) => None,
                Err(e) => Some((format!("handler error: {e}"), failed_index(&e))),
            },
            Err(panic) => Some((
                format!("handler panicked: {}", steps::panic_message(&*panic)),
                None,
            )),
        };
        match failure {
            None => {
                for &i in &new {
                    let Stage::Claimed { token } = items[i].stage else {
                        unreachable!("every new item is claimed")
                    };
                    items[i].stage = Stage::Called {
                        token,
                        called: Called::Succeeded(None),
                    };
                }
                self.settle(guard, attempts, items, &new).await?;
                Ok(Vec::new())
            }
            Some((reason, index)) => {
                let index = index.filter(|&i| {
                    let known = i < new.len();
                    if !known {
                        tracing::warn!(index = i, size = new.len(), "the batch handler named a message the batch does not have; finding the failing one by halving the batch");
                    }
                    known
                });
                self.fail(guard, attempts, items, &new, reason, index).await
            }
        }
    }

    /// Commits (or completes) the claims of the items in `done`.
    async fn settle(
        &self,
        guard: ClaimGuard<'_, H::Store, M>,
        attempts: &mut [Attempt<'_>],
        items: &mut [Item<H::Payload>],
        done: &[usize],
    ) -> Result<(), StoreError> {
        let settled = {
            let requests = super::requests_of(self.meta, attempts, items, done);
            let claimed: Vec<Claimed<'_>> = requests
                .iter()
                .zip(done)
                .filter_map(|(request, &i)| items[i].claimed(request))
                .collect();
            guard.settle(&claimed, &[]).await
        };
        match settled {
            Ok(()) | Err(Unsettled { kept: true, .. }) => {
                for &i in done {
                    attempts[items[i].at].set_outcome(Outcome::Processed);
                    items[i].stage = Stage::Settled;
                }
                settled.map_err(|u| u.error)
            }
            Err(Unsettled { error, .. }) => Err(error),
        }
    }

    /// The call failed. Rolls the part back (or, on a lease store, keeps
    /// what the handler said took effect), settles the failing message when
    /// it is known, and returns what must run again.
    async fn fail(
        &self,
        guard: ClaimGuard<'_, H::Store, M>,
        attempts: &mut [Attempt<'_>],
        items: &mut [Item<H::Payload>],
        new: &[usize],
        reason: String,
        index: Option<usize>,
    ) -> Result<Vec<Vec<usize>>, StoreError> {
        let transactional = <H::Store as DedupStore<M>>::TRANSACTIONAL;
        // On a lease store the messages before a named failure took effect.
        let (kept, rest) = match index {
            Some(i) if !transactional => new.split_at(i),
            _ => (&[][..], new),
        };
        if kept.is_empty() {
            let requests = super::requests_of(self.meta, attempts, items, new);
            let taken: Vec<Claimed<'_>> = requests
                .iter()
                .zip(new)
                .filter_map(|(request, &i)| items[i].claimed(request))
                .collect();
            guard.release(&taken).await;
        } else {
            let settled = {
                let requests = super::requests_of(self.meta, attempts, items, new);
                let claimed: Vec<Claimed<'_>> = requests
                    .iter()
                    .zip(new)
                    .filter_map(|(request, &i)| items[i].claimed(request))
                    .collect();
                let (done, released) = claimed.split_at(kept.len());
                guard.settle(done, released).await
            };
            if let Err(Unsettled { error, .. }) = settled {
                return Err(error);
            }
            for &i in kept {
                attempts[items[i].at].set_outcome(Outcome::Processed);
                items[i].stage = Stage::Settled;
            }
        }
        for &i in rest {
            items[i].stage = Stage::Ready;
        }
        let failed = |items: &mut [Item<H::Payload>], attempts: &mut [Attempt<'_>], i: usize| {
            attempts[items[i].at].set_outcome(Outcome::Failed {
                reason: reason.clone(),
                retry_in: None,
            });
            items[i].stage = Stage::Settled;
        };
        let split = match (index, rest) {
            (_, [one]) => {
                failed(items, attempts, *one);
                Vec::new()
            }
            (Some(i), _) if transactional => {
                failed(items, attempts, new[i]);
                vec![new[..i].to_vec(), new[i + 1..].to_vec()]
            }
            (Some(_), [first, after @ ..]) => {
                failed(items, attempts, *first);
                vec![after.to_vec()]
            }
            (_, rest) => {
                let (a, b) = rest.split_at(rest.len() / 2);
                vec![a.to_vec(), b.to_vec()]
            }
        };
        Ok(split.into_iter().filter(|p| !p.is_empty()).collect())
    }
}
