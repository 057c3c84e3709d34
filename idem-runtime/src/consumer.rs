//! The consumer loop of one handler over one subscription: fetch, dispatch
//! (bounded concurrency, per-key lanes or batches), retry with backoff,
//! dead-letter, settle, and shut down gracefully.
//!
//! It is generic over the subscription and knows nothing of stores: what a
//! delivery's fate is comes from `process` as an `Outcome`.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::ack::AckMode;
use crate::delivery::Delivery;
use crate::handler::{Backoff, HandlerMeta, OnInProgress};
use crate::metrics::HandlerMetrics;
use crate::process::{ErasedHandler, Outcome};
use crate::source::{DeadLetter, Subscription};
use crate::sync::lock;

/// `on_in_progress = "wait"`: how often a message whose key another
/// consumer holds looks again.
const BUSY_POLL: Duration = Duration::from_millis(100);
/// `on_in_progress = "retry"`: the longest redelivery delay of such a message.
const BUSY_REDELIVERY: Duration = Duration::from_secs(1);

/// Settings of the loop that are not per handler.
#[derive(Debug, Clone)]
pub(crate) struct LoopConfig {
    pub(crate) concurrency: usize,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) store_backoff: Backoff,
}

struct Ctx<Sub> {
    sub: Sub,
    handler: Arc<dyn ErasedHandler>,
    meta: &'static HandlerMeta,
    metrics: Arc<HandlerMetrics>,
    stop: CancellationToken,
    store_backoff: Backoff,
    /// Deliveries handed to tasks and not yet settled, to hand back to the
    /// broker if a shutdown has to abort their tasks.
    unsettled: Mutex<HashMap<u64, Delivery>>,
    next_seq: AtomicU64,
}

/// A delivery on its way through the loop.
struct Job {
    seq: u64,
    delivery: Delivery,
    group: Option<Arc<AckGroup>>,
    _permit: OwnedSemaphorePermit,
}

/// A message the handler acked before it finished, and how it finished.
struct AckedEarly(Outcome);

impl AckedEarly {
    fn report(self, metrics: &HandlerMetrics) {
        match self.0 {
            Outcome::Processed => HandlerMetrics::inc(&metrics.processed),
            Outcome::StoreDown(error) => {
                HandlerMetrics::inc(&metrics.processed);
                tracing::warn!(error = %error, "the handler acked its message, then the done-record could not be written: a replay of the same key (new message id) would run again");
            }
            other => {
                HandlerMetrics::inc(&metrics.failed);
                tracing::warn!(outcome = ?other, "the handler called ack.ack() and then did not succeed; the broker already has the ack and will not redeliver");
            }
        }
    }
}

/// `ack = "manual"`: the acks of one fetched batch, sent together when the
/// last message of the batch is finished.
struct AckGroup {
    remaining: AtomicUsize,
    acks: Mutex<Vec<Delivery>>,
}

impl<Sub: Subscription> Ctx<Sub> {
    fn forget(&self, seq: u64) {
        lock(&self.unsettled).remove(&seq);
    }

    async fn ack(&self, seq: u64, d: &Delivery, group: Option<&AckGroup>) {
        self.forget(seq);
        if let Some(group) = group {
            lock(&group.acks).push(d.clone());
            return;
        }
        if let Err(e) = self.sub.ack(d).await {
            tracing::warn!(error = %e, "ack failed; the broker will redeliver and idem will ack it as a duplicate");
        }
    }

    async fn nack(&self, seq: u64, d: &Delivery, delay: Duration) {
        self.forget(seq);
        if let Err(e) = self.sub.nack(d, delay).await {
            tracing::warn!(error = %e, "nack failed; the broker redelivers on its own timeout");
        }
    }

    async fn dead_letter(&self, seq: u64, d: &Delivery, reason: String, attempts: u32) {
        self.forget(seq);
        HandlerMetrics::inc(&self.metrics.dead_lettered);
        tracing::error!(handler = self.meta.name, message_id = %d.id, reason = %reason, attempts, "dead-lettered");
        let letter = DeadLetter {
            reason,
            attempts,
            handler: self.meta.name.to_owned(),
        };
        if let Err(e) = self.sub.dead_letter(d, &letter).await {
            // Not settled: the broker redelivers it and it is dead-lettered again.
            tracing::error!(error = %e, "dead-letter publish failed; the message stays unacked and comes back");
        }
    }

    /// Waits `delay`, or returns false at once when the loop is stopping.
    async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            _ = self.stop.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }

    /// Takes one delivery to a settled state, starting from `first` if the
    /// first attempt already ran (batch mode).
    async fn drive(
        &self,
        seq: u64,
        d: &Delivery,
        group: Option<&AckGroup>,
        mut first: Option<Outcome>,
    ) {
        let meta = self.meta;
        let mut attempt = d.attempt;
        let mut store_failures = 0u32;
        if meta.ack == AckMode::Before {
            self.ack(seq, d, None).await;
        }
        loop {
            let outcome = match first.take() {
                Some(o) => o,
                None if self.handler.acks_at_call() => {
                    match self.process_acking_at_call(seq, d).await {
                        Ok(outcome) => outcome,
                        Err(settled) => {
                            settled.report(&self.metrics);
                            return;
                        }
                    }
                }
                None => self.handler.process(d, None).await,
            };
            match outcome {
                Outcome::Processed => {
                    HandlerMetrics::inc(&self.metrics.processed);
                    if meta.ack != AckMode::Before {
                        self.ack(seq, d, group).await;
                    }
                }
                Outcome::Duplicate(cached) => {
                    HandlerMetrics::inc(&self.metrics.duplicate);
                    tracing::debug!(
                        cached_result = cached.as_deref().unwrap_or("none"),
                        "duplicate: already processed, acked without running the handler"
                    );
                    if meta.ack != AckMode::Before {
                        self.ack(seq, d, group).await;
                    }
                }
                Outcome::DeadLetter(reason) => {
                    if meta.ack == AckMode::Before {
                        HandlerMetrics::inc(&self.metrics.failed);
                        tracing::error!(reason = %reason, "message dropped: `ack = \"before\"` already acked it (at most once)");
                    } else {
                        self.dead_letter(seq, d, reason, attempt).await;
                    }
                }
                Outcome::Failed(reason) => {
                    HandlerMetrics::inc(&self.metrics.failed);
                    if meta.ack == AckMode::Before {
                        tracing::error!(reason = %reason, "handler failed; `ack = \"before\"` already acked: the message is lost (at most once)");
                    } else if attempt < meta.max_attempts() {
                        tracing::warn!(reason = %reason, attempt, "handler failed; retrying");
                        HandlerMetrics::inc(&self.metrics.retried);
                        if !self.pause(meta.backoff.delay(attempt)).await {
                            self.nack(seq, d, Duration::ZERO).await;
                            return;
                        }
                        attempt += 1;
                        continue;
                    } else {
                        let reason = format!("{reason} (gave up after {attempt} attempts)");
                        self.dead_letter(seq, d, reason, attempt).await;
                    }
                }
                // The holder may finish long before its lease runs out: look
                // again in short steps rather than after the whole lease.
                Outcome::Busy(retry_after) => match meta.on_in_progress {
                    OnInProgress::Wait => {
                        let wait = retry_after.clamp(Duration::from_millis(10), BUSY_POLL);
                        if self.pause(wait).await {
                            continue;
                        }
                        self.nack(seq, d, Duration::ZERO).await;
                    }
                    OnInProgress::Retry => {
                        self.nack(seq, d, retry_after.min(BUSY_REDELIVERY)).await
                    }
                },
                Outcome::Nacked => self.nack(seq, d, meta.backoff.min).await,
                Outcome::StoreDown(error) => {
                    store_failures += 1;
                    tracing::warn!(error = %error, "dedup store unavailable: handler not run, message not acked; backing off");
                    if meta.ack != AckMode::Before
                        && self.pause(self.store_backoff.delay(store_failures)).await
                    {
                        continue;
                    }
                    if meta.ack != AckMode::Before {
                        self.nack(seq, d, Duration::ZERO).await;
                    }
                }
            }
            return;
        }
    }

    /// `manual_immediate` with a lease store: the ack goes to the broker the
    /// moment the handler calls `ack.ack()`. `Err` when that happened: the
    /// message is settled, whatever the handler did afterwards.
    async fn process_acking_at_call(&self, seq: u64, d: &Delivery) -> Result<Outcome, AckedEarly> {
        let (ack, probe) = crate::ack::Ack::new();
        let run = self.handler.process(d, Some((ack, probe.clone())));
        tokio::pin!(run);
        tokio::select! {
            biased;
            outcome = &mut run => return Ok(outcome),
            _ = probe.acked() => {}
        }
        self.ack(seq, d, None).await;
        Err(AckedEarly(run.await))
    }

    fn span(&self, d: &Delivery) -> tracing::Span {
        tracing::info_span!(
            "idem.message",
            handler = self.meta.name,
            message_id = %d.id,
            attempt = d.attempt,
            key = tracing::field::Empty,
        )
    }

    async fn run_job(&self, job: Job) {
        HandlerMetrics::inc(&self.metrics.in_flight);
        let span = self.span(&job.delivery);
        self.drive(job.seq, &job.delivery, job.group.as_deref(), None)
            .instrument(span)
            .await;
        HandlerMetrics::dec(&self.metrics.in_flight);
        if let Some(group) = &job.group {
            self.finish_group_member(group).await;
        }
    }

    async fn finish_group_member(&self, group: &AckGroup) {
        if group.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let acks = std::mem::take(&mut *lock(&group.acks));
            let refs: Vec<&Delivery> = acks.iter().collect();
            if !refs.is_empty()
                && let Err(e) = self.sub.ack_many(&refs).await
            {
                tracing::warn!(error = %e, "batch ack failed; the broker will redeliver and idem will ack them as duplicates");
            }
        }
    }

    async fn run_batch(&self, jobs: Vec<Job>) {
        let deliveries: Vec<Delivery> = jobs.iter().map(|j| j.delivery.clone()).collect();
        let n = deliveries.len() as u64;
        self.metrics.in_flight.fetch_add(n, Ordering::Relaxed);
        let span = tracing::info_span!(
            "idem.batch",
            handler = self.meta.name,
            size = deliveries.len()
        );
        let mut store_failures = 0u32;
        let outcomes = loop {
            let outcomes = self
                .handler
                .process_batch(&deliveries)
                .instrument(span.clone())
                .await;
            let down = outcomes.iter().find_map(|o| match o {
                Outcome::StoreDown(e) => Some(e.clone()),
                _ => None,
            });
            let Some(error) = down else { break outcomes };
            store_failures += 1;
            tracing::warn!(parent: &span, error = %error, "dedup store unavailable: batch not run, not acked; backing off");
            if !self.pause(self.store_backoff.delay(store_failures)).await {
                for j in &jobs {
                    self.nack(j.seq, &j.delivery, Duration::ZERO).await;
                }
                self.metrics.in_flight.fetch_sub(n, Ordering::Relaxed);
                return;
            }
        };
        let mut acks = Vec::new();
        let mut rest = Vec::new();
        for (job, outcome) in jobs.iter().zip(outcomes) {
            match outcome {
                Outcome::Processed => {
                    HandlerMetrics::inc(&self.metrics.processed);
                    self.forget(job.seq);
                    acks.push(&job.delivery);
                }
                Outcome::Duplicate(_) => {
                    HandlerMetrics::inc(&self.metrics.duplicate);
                    self.forget(job.seq);
                    acks.push(&job.delivery);
                }
                other => rest.push((job, other)),
            }
        }
        if !acks.is_empty()
            && let Err(e) = self.sub.ack_many(&acks).await
        {
            tracing::warn!(parent: &span, error = %e, "batch ack failed; the broker will redeliver and idem will ack them as duplicates");
        }
        // Failed items go on alone: retried with backoff, then dead-lettered;
        // their neighbours are already committed and acked.
        for (job, outcome) in rest {
            let item_span = self.span(&job.delivery);
            self.drive(job.seq, &job.delivery, None, Some(outcome))
                .instrument(item_span)
                .await;
        }
        self.metrics.in_flight.fetch_sub(n, Ordering::Relaxed);
    }
}

fn lane_of(d: &Delivery, lanes: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match &d.ordering_key {
        Some(k) => k.hash(&mut h),
        None => d.id.hash(&mut h),
    }
    (h.finish() % lanes as u64) as usize
}

/// Runs one handler's loop until `stop` fires, then shuts down: no new
/// fetches, in-flight work finishes within the timeout, and whatever is
/// still unsettled after it is handed back to the broker.
pub(crate) async fn consume<Sub: Subscription>(
    sub: Sub,
    handler: Arc<dyn ErasedHandler>,
    cfg: LoopConfig,
    stop: CancellationToken,
) {
    let meta = handler.meta();
    let concurrency = cfg.concurrency.max(1);
    let ctx = Arc::new(Ctx {
        sub,
        metrics: handler.metrics().clone(),
        handler,
        meta,
        stop: stop.clone(),
        store_backoff: cfg.store_backoff,
        unsettled: Mutex::new(HashMap::new()),
        next_seq: AtomicU64::new(0),
    });
    let semaphore = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    let mut lanes = Vec::new();
    if meta.ordered && meta.ack != AckMode::Batch {
        for _ in 0..concurrency {
            let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
            let ctx = ctx.clone();
            tasks.spawn(async move {
                while let Some(job) = rx.recv().await {
                    ctx.run_job(job).await;
                }
            });
            lanes.push(tx);
        }
    }
    let mut fetch_failures = 0u32;
    loop {
        let first = tokio::select! {
            _ = stop.cancelled() => break,
            p = semaphore.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let max = 1 + semaphore.available_permits();
        let fetched = tokio::select! {
            _ = stop.cancelled() => break,
            r = ctx.sub.fetch(max) => r,
        };
        let deliveries = match fetched {
            Ok(d) => {
                fetch_failures = 0;
                d
            }
            Err(e) => {
                fetch_failures += 1;
                tracing::warn!(handler = meta.name, error = %e, "fetch failed; backing off");
                let delay = cfg.store_backoff.delay(fetch_failures);
                tokio::select! { _ = stop.cancelled() => break, _ = tokio::time::sleep(delay) => continue }
            }
        };
        if deliveries.is_empty() {
            continue;
        }
        let n = deliveries.len();
        ctx.metrics.received.fetch_add(n as u64, Ordering::Relaxed);
        let mut permit = first;
        if n > 1 {
            match semaphore.clone().try_acquire_many_owned((n - 1) as u32) {
                Ok(more) => permit.merge(more),
                // Only this loop takes permits, and it asked for at most what
                // was free, so this cannot happen; hand the deliveries back if it does.
                Err(_) => {
                    for d in &deliveries {
                        let _ = ctx.sub.nack(d, Duration::ZERO).await;
                    }
                    continue;
                }
            }
        }
        let group = (meta.ack == AckMode::Manual).then(|| {
            Arc::new(AckGroup {
                remaining: AtomicUsize::new(n),
                acks: Mutex::new(Vec::with_capacity(n)),
            })
        });
        let mut jobs = Vec::with_capacity(n);
        {
            let mut unsettled = lock(&ctx.unsettled);
            for delivery in deliveries {
                let seq = ctx.next_seq.fetch_add(1, Ordering::Relaxed);
                unsettled.insert(seq, delivery.clone());
                let _permit = permit
                    .split(1)
                    .unwrap_or_else(|| unreachable!("one permit per delivery"));
                jobs.push(Job {
                    seq,
                    delivery,
                    group: group.clone(),
                    _permit,
                });
            }
        }
        if meta.ack == AckMode::Batch {
            let ctx = ctx.clone();
            tasks.spawn(async move { ctx.run_batch(jobs).await });
        } else if !lanes.is_empty() {
            for job in jobs {
                let lane = lane_of(&job.delivery, lanes.len());
                // A lane only ends when its sender is dropped below.
                let _ = lanes[lane].send(job);
            }
        } else {
            for job in jobs {
                let ctx = ctx.clone();
                tasks.spawn(async move { ctx.run_job(job).await });
            }
        }
        // Reap finished tasks so the set does not grow without bound.
        while tasks.try_join_next().is_some() {}
    }
    drop(lanes);
    let drained = tokio::time::timeout(cfg.shutdown_timeout, async {
        while let Some(r) = tasks.join_next().await {
            if let Err(e) = r
                && e.is_panic()
            {
                tracing::error!(handler = meta.name, "a consumer task panicked: {e}");
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            handler = meta.name,
            timeout = ?cfg.shutdown_timeout,
            "shutdown timeout: aborting in-flight handlers; their messages go back to the broker (uncommitted work is rolled back)"
        );
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    let left: Vec<Delivery> = lock(&ctx.unsettled).drain().map(|(_, d)| d).collect();
    for d in &left {
        if let Err(e) = ctx.sub.nack(d, Duration::ZERO).await {
            tracing::warn!(error = %e, "could not hand a message back; the broker redelivers it on its own timeout");
        }
    }
}
