//! One message (or one batch) through decode → key → claim → handler →
//! commit, for a concrete handler type. The consumer loop sees the result as
//! an [`Outcome`] and settles it with the source; this module never talks to
//! a broker, so every source gets the same semantics.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tracing::Instrument;

use crate::ack::{Ack, AckDecision, AckProbe};
use crate::delivery::Delivery;
use crate::fingerprint::Fingerprint;
use crate::handler::{HandlerFn, HandlerMeta, HandlerResult, OnMissingKey};
use crate::key::Key;
use crate::metrics::HandlerMetrics;
use crate::runtime::{BuildError, Stores};
use crate::store::{Claim, ClaimRequest, Claimed, DedupStore, StoreError};

/// What became of one delivery.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The handler ran and its effect committed: ack.
    Processed,
    /// Already processed before: ack without running the handler. Carries
    /// the result the first run cached (JSON), if any.
    Duplicate(Option<String>),
    /// The handler failed (error, panic, or a rejected key): retry, and
    /// dead-letter after the last attempt.
    Failed(String),
    /// Retrying cannot help (undecodable, missing key, key conflict).
    DeadLetter(String),
    /// Another consumer holds the key's lease.
    Busy(Duration),
    /// The handler nacked (or dropped its `Ack`): redeliver, no attempt counted.
    Nacked,
    /// The store failed: do not ack, back off, try again.
    StoreDown(String),
}

/// A handler bound to its store: what the consumer loop drives.
pub(crate) trait ErasedHandler: Send + Sync {
    fn meta(&self) -> &'static HandlerMeta;
    fn metrics(&self) -> &Arc<HandlerMetrics>;
    /// Whether `ack.ack()` goes to the broker at once (`manual_immediate`
    /// with a store whose record does not commit with the handler's effects).
    fn acks_at_call(&self) -> bool;
    /// Runs one delivery; `ack` is the handler's token and its probe when the
    /// caller wants to see the handler's `ack.ack()` as it happens.
    fn process<'a>(
        &'a self,
        delivery: &'a Delivery,
        ack: Option<(Ack, AckProbe)>,
    ) -> BoxFuture<'a, Outcome>;
    fn process_batch<'a>(&'a self, deliveries: &'a [Delivery]) -> BoxFuture<'a, Vec<Outcome>>;
}

pub(crate) struct Bound<H: HandlerFn> {
    handler: H,
    meta: &'static HandlerMeta,
    store: Arc<H::Store>,
    metrics: Arc<HandlerMetrics>,
}

/// Binds handler `H` to the store of its type among `stores`.
pub(crate) fn bind<H: HandlerFn + Default>(
    meta: &'static HandlerMeta,
    stores: &Stores,
) -> Result<Arc<dyn ErasedHandler>, BuildError> {
    let store = stores
        .get::<H::Store>()
        .ok_or_else(|| BuildError::MissingStore {
            handler: meta.name.to_owned(),
            store: meta.store.to_owned(),
            store_type: std::any::type_name::<H::Store>(),
        })?;
    Ok(Arc::new(Bound {
        handler: H::default(),
        meta,
        store,
        metrics: Arc::default(),
    }))
}

/// A decoded message with its key, ready to claim.
struct Prepared<P> {
    payload: P,
    key: Key,
    fingerprint: Option<Fingerprint>,
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-string panic payload)")
}

impl<H: HandlerFn> Bound<H> {
    fn prepare(&self, d: &Delivery) -> Result<Prepared<H::Payload>, Outcome> {
        let payload: H::Payload = serde_json::from_slice(&d.payload).map_err(|e| {
            Outcome::DeadLetter(format!(
                "undecodable payload: {e} (expected JSON for {})",
                std::any::type_name::<H::Payload>()
            ))
        })?;
        let key = self
            .handler
            .key(d, &payload)
            .and_then(|k| k.check_len(self.meta.max_key_len))
            .map_err(|e| match self.meta.on_missing_key {
                OnMissingKey::DeadLetter => Outcome::DeadLetter(e.to_string()),
                OnMissingKey::Reject => Outcome::Failed(e.to_string()),
            })?;
        tracing::Span::current().record("key", key.as_str());
        let fingerprint = self.handler.fingerprint(d, &payload);
        Ok(Prepared {
            payload,
            key,
            fingerprint,
        })
    }

    fn not_new(&self, claim: Claim, key: &Key, fingerprint: Option<Fingerprint>) -> Outcome {
        match claim {
            Claim::New { .. } => unreachable!("handled by the caller"),
            Claim::Done { cached } => Outcome::Duplicate(cached),
            Claim::InProgress { retry_after } => Outcome::Busy(retry_after),
            Claim::Conflict { stored } => {
                Outcome::DeadLetter(conflict_reason(self.meta, key, stored, fingerprint))
            }
        }
    }

    fn result_json(&self, output: &<H::Result as HandlerResult>::Output) -> Option<String> {
        match serde_json::to_string(output) {
            Ok(s) if s == "null" => None,
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "handler result could not be serialized; it is not cached");
                None
            }
        }
    }

    async fn run_one(&self, d: &Delivery, given: Option<(Ack, AckProbe)>) -> Outcome {
        let prepared = match self.prepare(d) {
            Ok(p) => p,
            Err(outcome) => return outcome,
        };
        let store = &*self.store;
        let mut tx = match store.begin().await {
            Ok(tx) => tx,
            Err(e) => return Outcome::StoreDown(e.to_string()),
        };
        let Prepared {
            payload,
            key,
            fingerprint,
        } = prepared;
        let request = ClaimRequest {
            handler: self.meta.name,
            key: &key,
            fingerprint,
            message_id: &d.id,
            lease: self.meta.lease,
            ttl: self.meta.ttl,
        };
        let claim = match store.claim(&mut tx, std::slice::from_ref(&request)).await {
            Ok(mut c) if c.len() == 1 => c.remove(0),
            Ok(c) => {
                let _ = store.rollback(tx, &[]).await;
                return Outcome::StoreDown(
                    claim_count_mismatch(store.kind(), c.len(), 1).to_string(),
                );
            }
            Err(e) => {
                let _ = store.rollback(tx, &[]).await;
                return Outcome::StoreDown(e.to_string());
            }
        };
        let token = match claim {
            Claim::New { token } => token,
            other => {
                let _ = store.rollback(tx, &[]).await;
                return self.not_new(other, &key, fingerprint);
            }
        };
        let mut claimed = Claimed {
            request: &request,
            token,
            result: None,
        };
        let (ack, probe) = match given {
            Some(pair) => pair,
            None if self.meta.ack.is_manual() => Ack::new(),
            None => (Ack::detached(), AckProbe::automatic()),
        };
        let run = AssertUnwindSafe(self.handler.call(payload, &mut tx, d, ack))
            .catch_unwind()
            .await;
        let failure = match run {
            Ok(result) => match result.into_result() {
                Ok(output) => match probe.decision() {
                    AckDecision::Acked => {
                        let json = self.result_json(&output);
                        claimed.result = json.as_deref();
                        return match store.commit(tx, &[claimed]).await {
                            Ok(()) => Outcome::Processed,
                            Err(e) => Outcome::StoreDown(e.to_string()),
                        };
                    }
                    AckDecision::Nacked => None,
                    AckDecision::Dropped => {
                        tracing::warn!(
                            "handler returned without calling ack.ack() or ack.nack() in `{}` mode: rolled back, the message will be redelivered",
                            self.meta.ack
                        );
                        None
                    }
                },
                Err(e) => Some(format!("handler error: {e}")),
            },
            Err(panic) => Some(format!("handler panicked: {}", panic_message(&*panic))),
        };
        if let Err(e) = store.rollback(tx, &[claimed]).await {
            tracing::warn!(error = %e, "rollback failed; the store discards the open transaction");
        }
        match failure {
            Some(reason) => Outcome::Failed(reason),
            None => Outcome::Nacked,
        }
    }

    /// Runs one batch item in its own savepoint. `Ok((true, result))` when
    /// it succeeded, `Ok((false, reason))` when it failed and was rolled back.
    async fn run_item(
        &self,
        tx: &mut <H::Store as DedupStore>::Tx<'static>,
        payload: H::Payload,
        d: &Delivery,
        key: &Key,
    ) -> Result<(bool, Option<String>), StoreError> {
        let store = &*self.store;
        let mut nested = store.nested(tx).await?;
        let span = tracing::info_span!("idem.item", message_id = %d.id, key = %key);
        let run = AssertUnwindSafe(self.handler.call(payload, &mut nested, d, Ack::detached()))
            .catch_unwind()
            .instrument(span)
            .await;
        let (ok, detail) = match run {
            Ok(result) => match result.into_result() {
                Ok(output) => (true, self.result_json(&output)),
                Err(e) => (false, Some(format!("handler error: {e}"))),
            },
            Err(panic) => (
                false,
                Some(format!("handler panicked: {}", panic_message(&*panic))),
            ),
        };
        store.end_nested(nested, ok).await?;
        Ok((ok, detail))
    }

    /// A store failure part-way through a batch. A transactional store
    /// rolls everything back: nothing of the batch is durable. With a lease
    /// store the items whose handler succeeded have already applied their
    /// effects, so their done-records are written (best effort) and only the
    /// other leases are released: releasing theirs would run them again.
    /// Returns whether the succeeded items are recorded.
    async fn abort_batch(
        &self,
        mut tx: <H::Store as DedupStore>::Tx<'static>,
        taken: &[Claimed<'_>],
        done: &[Claimed<'_>],
    ) -> bool {
        let store = &*self.store;
        if <H::Store as DedupStore>::COMMITS_WITH_HANDLER {
            let _ = store.rollback(tx, taken).await;
            return false;
        }
        let rest: Vec<Claimed<'_>> = taken
            .iter()
            .filter(|c| !done.iter().any(|d| std::ptr::eq(d.request, c.request)))
            .copied()
            .collect();
        if let Err(e) = store.unclaim(&mut tx, &rest).await {
            tracing::warn!(error = %e, "could not release the batch's leases; they expire on their own");
        }
        store.commit(tx, done).await.is_ok()
    }

    async fn run_batch(&self, ds: &[Delivery]) -> Vec<Outcome> {
        let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(ds.len());
        let mut prepared = Vec::with_capacity(ds.len());
        for d in ds {
            match self.prepare(d) {
                Ok(p) => {
                    outcomes.push(None);
                    prepared.push(Some(p));
                }
                Err(o) => {
                    outcomes.push(Some(o));
                    prepared.push(None);
                }
            }
        }
        // Take the payloads out; the requests borrow only keys and ids.
        let mut payloads: Vec<Option<H::Payload>> = Vec::with_capacity(ds.len());
        let mut keys = Vec::with_capacity(ds.len());
        for p in prepared {
            match p {
                Some(Prepared {
                    payload,
                    key,
                    fingerprint,
                }) => {
                    payloads.push(Some(payload));
                    keys.push(Some((key, fingerprint)));
                }
                None => {
                    payloads.push(None);
                    keys.push(None);
                }
            }
        }
        // A key twice in one batch (a producer retry fetched together with
        // its original): only the first copy is claimed and run. The others
        // wait for it like for any claim in progress, and then find the key
        // done, or free again if the first copy failed.
        let mut seen = std::collections::HashSet::with_capacity(ds.len());
        let idx: Vec<usize> = (0..ds.len())
            .filter(|&i| match &keys[i] {
                Some((key, _)) if seen.insert(key.as_str()) => true,
                Some(_) => {
                    outcomes[i] = Some(Outcome::Busy(Duration::ZERO));
                    false
                }
                None => false,
            })
            .collect();
        if idx.is_empty() {
            return outcomes
                .into_iter()
                .map(|o| o.expect("every item has an outcome"))
                .collect();
        }
        let store = &*self.store;
        let store_down = |e: &StoreError, outcomes: Vec<Option<Outcome>>| -> Vec<Outcome> {
            outcomes
                .into_iter()
                .map(|o| o.unwrap_or_else(|| Outcome::StoreDown(e.to_string())))
                .collect()
        };
        let mut tx = match store.begin().await {
            Ok(tx) => tx,
            Err(e) => return store_down(&e, outcomes),
        };
        let requests: Vec<ClaimRequest<'_>> = idx
            .iter()
            .map(|&i| {
                let (key, fingerprint) = keys[i].as_ref().expect("prepared");
                ClaimRequest {
                    handler: self.meta.name,
                    key,
                    fingerprint: *fingerprint,
                    message_id: &ds[i].id,
                    lease: self.meta.lease,
                    ttl: self.meta.ttl,
                }
            })
            .collect();
        let claims = match store.claim(&mut tx, &requests).await {
            Ok(c) if c.len() == requests.len() => c,
            Ok(c) => {
                let _ = store.rollback(tx, &[]).await;
                let e = claim_count_mismatch(store.kind(), c.len(), requests.len());
                return store_down(&e, outcomes);
            }
            Err(e) => {
                let _ = store.rollback(tx, &[]).await;
                return store_down(&e, outcomes);
            }
        };
        // Every claim taken, so that a store failure part-way releases them
        // all (a lease store would otherwise hold them until they expire).
        let taken: Vec<Claimed<'_>> = claims
            .iter()
            .enumerate()
            .filter_map(|(r, c)| match c {
                Claim::New { token } => Some(Claimed {
                    request: &requests[r],
                    token: *token,
                    result: None,
                }),
                _ => None,
            })
            .collect();
        let mut done_results: Vec<(usize, u64, Option<String>)> = Vec::new();
        let mut failed: Vec<(usize, u64)> = Vec::new();
        for (r, claim) in claims.into_iter().enumerate() {
            let i = idx[r];
            let token = match claim {
                Claim::New { token } => token,
                other => {
                    outcomes[i] =
                        Some(self.not_new(other, requests[r].key, requests[r].fingerprint));
                    continue;
                }
            };
            let payload = payloads[i].take().expect("payload of a prepared item");
            let item = self
                .run_item(&mut tx, payload, &ds[i], requests[r].key)
                .await;
            let (ok, detail) = match item {
                Ok(v) => v,
                Err(e) => {
                    let done = claimed_of(&requests, &done_results);
                    if self.abort_batch(tx, &taken, &done).await {
                        for (r, _, _) in &done_results {
                            outcomes[idx[*r]] = Some(Outcome::Processed);
                        }
                    }
                    return store_down(&e, outcomes);
                }
            };
            if ok {
                done_results.push((r, token, detail));
            } else {
                outcomes[i] = Some(Outcome::Failed(detail.unwrap_or_default()));
                failed.push((r, token));
            }
        }
        let failed_claims: Vec<Claimed<'_>> = failed
            .iter()
            .map(|&(r, token)| Claimed {
                request: &requests[r],
                token,
                result: None,
            })
            .collect();
        if !failed_claims.is_empty() {
            let unclaimed = store.unclaim(&mut tx, &failed_claims).await;
            if let Err(e) = unclaimed {
                let done = claimed_of(&requests, &done_results);
                if self.abort_batch(tx, &taken, &done).await {
                    for (r, _, _) in &done_results {
                        outcomes[idx[*r]] = Some(Outcome::Processed);
                    }
                }
                return store_down(&e, outcomes);
            }
        }
        let done = claimed_of(&requests, &done_results);
        match store.commit(tx, &done).await {
            Ok(()) => {
                for (r, _, _) in &done_results {
                    outcomes[idx[*r]] = Some(Outcome::Processed);
                }
                outcomes
                    .into_iter()
                    .map(|o| o.expect("every item has an outcome"))
                    .collect()
            }
            Err(e) => {
                // Nothing of the batch is known to be durable: undo the
                // per-item verdicts of the new items too.
                for (r, _, _) in &done_results {
                    outcomes[idx[*r]] = None;
                }
                store_down(&e, outcomes)
            }
        }
    }
}

/// The claims of the batch items whose handler succeeded, with their results.
fn claimed_of<'a>(
    requests: &'a [ClaimRequest<'a>],
    done: &'a [(usize, u64, Option<String>)],
) -> Vec<Claimed<'a>> {
    done.iter()
        .map(|(r, token, result)| Claimed {
            request: &requests[*r],
            token: *token,
            result: result.as_deref(),
        })
        .collect()
}

/// The dead-letter reason of a key conflict: the handler, the key, what was
/// compared, and the setting to change when the "conflict" is a retry.
fn conflict_reason(
    meta: &HandlerMeta,
    key: &Key,
    stored: Fingerprint,
    this: Option<Fingerprint>,
) -> String {
    let compared = meta
        .fingerprint
        .unwrap_or("the key extractor's fingerprint");
    let this = this.map_or_else(|| "none".to_owned(), |f| format!("{f:016x}"));
    format!(
        "key conflict in handler {:?}: key {key} was already processed with a different payload \
         (compared: fingerprint = {compared}; stored {stored:016x}, this one {this}). \
         If this is another message, its producer reused the key: give it a key of its own. \
         If it is a retry of the same message whose compared fields changed between sends, \
         take those fields out of `fingerprint = …` on the handler (without `fingerprint`, \
         every delivery of a done key is a duplicate)",
        meta.name
    )
}

fn claim_count_mismatch(store: &'static str, got: usize, want: usize) -> StoreError {
    StoreError::Config {
        store,
        message: format!(
            "claim returned {got} results for {want} keys: the store violates the DedupStore contract"
        ),
    }
}

impl<H: HandlerFn> ErasedHandler for Bound<H> {
    fn meta(&self) -> &'static HandlerMeta {
        self.meta
    }

    fn metrics(&self) -> &Arc<HandlerMetrics> {
        &self.metrics
    }

    fn acks_at_call(&self) -> bool {
        self.meta.ack == crate::ack::AckMode::ManualImmediate
            && !<H::Store as DedupStore>::COMMITS_WITH_HANDLER
    }

    fn process<'a>(
        &'a self,
        delivery: &'a Delivery,
        ack: Option<(Ack, AckProbe)>,
    ) -> BoxFuture<'a, Outcome> {
        Box::pin(self.run_one(delivery, ack))
    }

    fn process_batch<'a>(&'a self, deliveries: &'a [Delivery]) -> BoxFuture<'a, Vec<Outcome>> {
        Box::pin(self.run_batch(deliveries))
    }
}
