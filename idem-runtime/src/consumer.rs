//! The consumer loop of one handler over one subscription: fetch, dispatch
//! (bounded concurrency, per-key lanes or batches), act on each attempt's
//! [`Outcome`] (retry, wait, redeliver, dead-letter), settle with the broker
//! as the ack mode says, and shut down gracefully.
//!
//! It is generic over the subscription and the handler's [`Service`], and
//! knows nothing of stores: what a delivery came to arrives as an outcome.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;
use std::hash::{Hash, Hasher};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::ack::AckMode;
use crate::delivery::Delivery;
use crate::handler::{Backoff, HandlerMeta, OnInProgress};
use crate::metrics::HandlerMetrics;
use crate::service::{Attempt, Outcome, Service};
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

/// When the broker learns that a delivery is done: the ack mode, as the
/// loop carries it out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Settle {
    /// `before`: acked as it is taken up; what follows is only logged.
    Before,
    /// `auto`, and `manual_immediate` on a transactional store: each
    /// delivery is acked after its commit.
    Each,
    /// `manual_immediate` on a lease store: acked the moment the handler
    /// calls `ack.ack()` (its effects are applied by then).
    AtCall,
    /// `manual`: the acks of one fetched batch go out together when its
    /// last delivery is finished.
    Grouped,
    /// `batch`: a fetched batch is one unit of work; its successes are
    /// acked with one call, its failures go on alone.
    Batch,
}

impl Settle {
    fn of(ack: AckMode, transactional: bool) -> Self {
        match ack {
            AckMode::Before => Settle::Before,
            AckMode::Auto => Settle::Each,
            AckMode::ManualImmediate if transactional => Settle::Each,
            AckMode::ManualImmediate => Settle::AtCall,
            AckMode::Manual => Settle::Grouped,
            AckMode::Batch => Settle::Batch,
        }
    }
}

struct Ctx<Sub, Svc> {
    sub: Sub,
    service: Svc,
    meta: &'static HandlerMeta,
    metrics: Arc<HandlerMetrics>,
    settle: Settle,
    stop: CancellationToken,
    store_backoff: Backoff,
    /// Deliveries handed to tasks and not yet settled, to hand back to the
    /// broker if a shutdown has to abort their tasks.
    unsettled: Mutex<HashMap<u64, Delivery, BySeq>>,
    next_seq: AtomicU64,
}

/// Hashes the loop's own sequence numbers: unique, made here, never chosen by
/// anyone else, so a multiplication spreads them well enough and SipHash's
/// protection against chosen keys buys nothing.
#[derive(Default)]
struct SeqHasher(u64);

impl Hasher for SeqHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type BySeq = BuildHasherDefault<SeqHasher>;

/// A delivery on its way through the loop.
struct Job {
    seq: u64,
    delivery: Delivery,
    group: Option<Arc<AckGroup>>,
    /// Its slot; `None` in a batch, whose slots are given back together.
    _permit: Option<OwnedSemaphorePermit>,
}

/// Jobs waiting for a worker: one queue all workers take from, or one per
/// worker (`ordered`: a lane). A lock and a notification per job; cheaper
/// than a channel behind an async mutex.
#[derive(Default)]
struct Queue {
    jobs: Mutex<VecDeque<Job>>,
    ready: Notify,
    closed: AtomicBool,
}

impl Queue {
    fn push(&self, job: Job) {
        lock(&self.jobs).push_back(job);
        self.ready.notify_one();
    }

    /// No more jobs: the workers finish what is queued, then end.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ready.notify_waiters();
    }

    /// The next job; `None` once the queue is closed and empty.
    async fn next(&self) -> Option<Job> {
        loop {
            if let Some(job) = lock(&self.jobs).pop_front() {
                return Some(job);
            }
            // Registered before looking again, so that neither a push nor
            // the close between the look and the wait is missed.
            let ready = self.ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            if let Some(job) = lock(&self.jobs).pop_front() {
                return Some(job);
            }
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            ready.await;
        }
    }
}

/// `ack = "manual"`: the acks of one fetched batch, sent together when the
/// last message of the batch is finished.
struct AckGroup {
    remaining: AtomicUsize,
    acks: Mutex<Vec<Delivery>>,
}

impl<Sub: Subscription, Svc: Service> Ctx<Sub, Svc> {
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

    /// One call of the service for one attempt. With [`Settle::AtCall`] the
    /// ack goes to the broker the moment the handler calls `ack.ack()`;
    /// `true` when that happened (the delivery is settled, whatever the
    /// outcome).
    async fn call(&self, seq: u64, attempt: &mut Attempt<'_>) -> bool {
        if self.settle != Settle::AtCall {
            self.service.call(std::slice::from_mut(attempt)).await;
            return false;
        }
        let d = attempt.delivery();
        let probe = attempt.ack_at_call();
        let run = self.service.call(std::slice::from_mut(attempt));
        tokio::pin!(run);
        tokio::select! {
            biased;
            () = &mut run => return false,
            () = probe.acked() => {}
        }
        self.ack(seq, d, None).await;
        run.await;
        true
    }

    /// Takes one delivery to a settled state. `attempt` may carry the
    /// outcome of a first try already (a batch item that did not succeed).
    async fn drive(&self, seq: u64, mut attempt: Attempt<'_>, group: Option<&AckGroup>) {
        let meta = self.meta;
        let d = attempt.delivery();
        let mut outages = 0u32;
        if self.settle == Settle::Before {
            self.ack(seq, d, None).await;
        }
        loop {
            if attempt.outcome().is_none() && self.call(seq, &mut attempt).await {
                report_acked_at_call(attempt.outcome());
                return;
            }
            let outcome = attempt
                .take_outcome()
                .expect("the handler's service sets every attempt's outcome");
            match outcome {
                Outcome::Processed | Outcome::Duplicate { .. } => {
                    if let Outcome::Duplicate { cached } = &outcome {
                        tracing::debug!(
                            cached_result = cached.as_deref().unwrap_or("none"),
                            "duplicate: already processed, acked without running the handler"
                        );
                    }
                    if self.settle != Settle::Before {
                        self.ack(seq, d, group).await;
                    }
                }
                Outcome::Rejected { reason } if self.settle == Settle::Before => {
                    tracing::error!(reason = %reason, "message dropped: `ack = \"before\"` already acked it (at most once)");
                }
                Outcome::Rejected { reason } => {
                    self.dead_letter(seq, d, reason, attempt.number()).await;
                }
                Outcome::Failed { reason, .. } if self.settle == Settle::Before => {
                    tracing::error!(reason = %reason, "handler failed; `ack = \"before\"` already acked: the message is lost (at most once)");
                }
                Outcome::Failed {
                    reason,
                    retry_in: Some(delay),
                } => {
                    tracing::warn!(reason = %reason, attempt = attempt.number(), "handler failed; retrying");
                    if !self.pause(delay).await {
                        self.nack(seq, d, Duration::ZERO).await;
                        return;
                    }
                    attempt.retry();
                    continue;
                }
                Outcome::Failed {
                    reason,
                    retry_in: None,
                } => {
                    let n = attempt.number();
                    let reason = format!("{reason} (gave up after {n} attempts)");
                    self.dead_letter(seq, d, reason, n).await;
                }
                // The holder may finish long before its lease runs out: look
                // again in short steps rather than after the whole lease.
                Outcome::Busy { retry_after } => match meta.on_in_progress {
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
                Outcome::StoreDown { error } => {
                    outages += 1;
                    tracing::warn!(error = %error, "dedup store unavailable: handler not run, message not acked; backing off");
                    if self.settle == Settle::Before {
                        return;
                    }
                    if self.pause(self.store_backoff.delay(outages)).await {
                        continue;
                    }
                    self.nack(seq, d, Duration::ZERO).await;
                }
            }
            return;
        }
    }

    /// A worker: runs the jobs of `queue`, one after another, until the
    /// loop closes it. A job that panics (a bug: handler panics are caught
    /// by the pipeline) is logged; the worker goes on, and the delivery,
    /// still unsettled, goes back to the broker at shutdown.
    async fn work(&self, queue: &Queue) {
        while let Some(job) = queue.next().await {
            if let Err(panic) = AssertUnwindSafe(self.run_job(job)).catch_unwind().await {
                tracing::error!(
                    handler = self.meta.name,
                    "a consumer task panicked: {}",
                    crate::pipeline::steps::panic_message(&*panic)
                );
            }
        }
    }

    async fn run_job(&self, job: Job) {
        self.drive(job.seq, Attempt::new(&job.delivery), job.group.as_deref())
            .await;
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

    /// `ack = "batch"`: the fetched batch as one unit of work.
    async fn run_batch(&self, jobs: Vec<Job>) {
        let mut attempts: Vec<Attempt<'_>> =
            jobs.iter().map(|j| Attempt::new(&j.delivery)).collect();
        let mut outages = 0u32;
        loop {
            self.service.call(&mut attempts).await;
            let down = attempts.iter().find_map(|a| match a.outcome() {
                Some(Outcome::StoreDown { error }) => Some(error.clone()),
                _ => None,
            });
            let Some(error) = down else { break };
            outages += 1;
            tracing::warn!(handler = self.meta.name, error = %error, "dedup store unavailable: batch not run, not acked; backing off");
            if !self.pause(self.store_backoff.delay(outages)).await {
                for j in &jobs {
                    self.nack(j.seq, &j.delivery, Duration::ZERO).await;
                }
                return;
            }
            for a in &mut attempts {
                a.take_outcome();
            }
        }
        let mut acks = Vec::with_capacity(jobs.len());
        let mut rest = Vec::new();
        for (job, attempt) in jobs.iter().zip(attempts) {
            if attempt.outcome().is_some_and(Outcome::is_success) {
                self.forget(job.seq);
                acks.push(&job.delivery);
            } else {
                rest.push((job.seq, attempt));
            }
        }
        if !acks.is_empty()
            && let Err(e) = self.sub.ack_many(&acks).await
        {
            tracing::warn!(handler = self.meta.name, error = %e, "batch ack failed; the broker will redeliver and idem will ack them as duplicates");
        }
        // The others go on alone: retried with backoff, then dead-lettered;
        // their neighbours are already committed and acked.
        for (seq, attempt) in rest {
            self.drive(seq, attempt, None).await;
        }
    }
}

/// `manual_immediate` on a lease store: the handler acked its message and
/// the ack went out; what came after is only reported.
fn report_acked_at_call(outcome: Option<&Outcome>) {
    match outcome {
        Some(Outcome::Processed) => {}
        Some(Outcome::StoreDown { error }) => {
            tracing::warn!(error = %error, "the handler acked its message, then the done-record could not be written: a replay of the same key (new message id) would run again")
        }
        other => {
            tracing::warn!(outcome = ?other, "the handler called ack.ack() and then did not succeed; the broker already has the ack and will not redeliver")
        }
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
pub(crate) async fn consume<Sub: Subscription, Svc: Service>(
    sub: Sub,
    service: Svc,
    transactional: bool,
    metrics: Arc<HandlerMetrics>,
    cfg: LoopConfig,
    stop: CancellationToken,
) {
    let meta = service.meta();
    let concurrency = cfg.concurrency.max(1);
    let settle = Settle::of(meta.ack, transactional);
    let ctx = Arc::new(Ctx {
        sub,
        service,
        meta,
        metrics,
        settle,
        stop: stop.clone(),
        store_backoff: cfg.store_backoff,
        unsettled: Mutex::new(HashMap::default()),
        next_seq: AtomicU64::new(0),
    });
    let semaphore = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    // One delivery at a time goes to `concurrency` long-lived workers
    // rather than to a task of its own: spawning a task per message costs
    // an allocation and several copies of the task's state. `ordered`:
    // a queue per worker (a lane), by ordering key; otherwise one queue
    // all workers take from. `batch`: a task per fetched batch.
    let mut lanes: Vec<Arc<Queue>> = Vec::new();
    if settle != Settle::Batch {
        let queues = if meta.ordered { concurrency } else { 1 };
        lanes.extend((0..queues).map(|_| Arc::new(Queue::default())));
        for worker in 0..concurrency {
            let (ctx, queue) = (ctx.clone(), lanes[worker % queues].clone());
            tasks.spawn(async move { ctx.work(&queue).await });
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
        HandlerMetrics::add(&ctx.metrics.received, n as u64);
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
        let group = (settle == Settle::Grouped).then(|| {
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
                let _permit = (settle != Settle::Batch).then(|| {
                    permit
                        .split(1)
                        .unwrap_or_else(|| unreachable!("one permit per delivery"))
                });
                jobs.push(Job {
                    seq,
                    delivery,
                    group: group.clone(),
                    _permit,
                });
            }
        }
        if settle == Settle::Batch {
            let ctx = ctx.clone();
            // The batch's slots go back in one step when it is done: given
            // back one by one, the loop could wake at the first and fetch
            // a batch of one.
            tasks.spawn(async move {
                ctx.run_batch(jobs).await;
                drop(permit);
            });
        } else {
            for job in jobs {
                let lane = match lanes.len() {
                    1 => 0,
                    n => lane_of(&job.delivery, n),
                };
                lanes[lane].push(job);
            }
        }
        // Reap finished tasks so the set does not grow without bound.
        while tasks.try_join_next().is_some() {}
    }
    for lane in &lanes {
        lane.close();
    }
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
    ctx.sub.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(seq: u64) -> Job {
        let permit = Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap();
        Job {
            seq,
            delivery: Delivery::new(format!("m-{seq}"), "t", &b"{}"[..]),
            group: None,
            _permit: Some(permit),
        }
    }

    #[tokio::test]
    async fn a_queue_hands_out_its_jobs_in_order_then_ends_when_closed() {
        let queue = Queue::default();
        queue.push(job(1));
        queue.push(job(2));
        queue.close();
        assert_eq!(queue.next().await.map(|j| j.seq), Some(1));
        assert_eq!(queue.next().await.map(|j| j.seq), Some(2));
        assert!(queue.next().await.is_none());
    }

    #[tokio::test]
    async fn waiting_workers_get_a_pushed_job_and_end_at_close() {
        let queue = Arc::new(Queue::default());
        let waiting = |queue: &Arc<Queue>| {
            let queue = queue.clone();
            tokio::spawn(async move { queue.next().await.map(|j| j.seq) })
        };
        let (a, b) = (waiting(&queue), waiting(&queue));
        // Both are parked on an empty queue before anything arrives.
        tokio::task::yield_now().await;
        queue.push(job(7));
        tokio::task::yield_now().await;
        queue.close();
        let mut got = [a.await.unwrap(), b.await.unwrap()];
        got.sort();
        assert_eq!(got, [None, Some(7)]);
    }
}
