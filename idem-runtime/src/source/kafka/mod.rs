//! Kafka (and Kafka-compatible brokers) as a source, through `rdkafka`:
//! one consumer group per handler, offsets committed by idem only
//! (`enable.auto.commit=false`), never past a message that has not finished.
//!
//! Not a producer for the application's own messages (use [`rdkafka`], which
//! this module re-exports so the versions match), and not a topic manager:
//! idem creates only the dead-letter topic when it is missing.
//!
//! How idem's operations map to Kafka:
//!
//! | operation | Kafka |
//! |---|---|
//! | subscribe | a consumer in group `<handler name>` on the topic, polled by a thread of its own; the dead-letter topic is created (as many partitions as the topic) when missing |
//! | fetch | messages the poll thread received, handed over in chunks (up to `max_buffered` wait; at that bound the poll thread takes no more until `fetch` makes room and only keeps serving the group's events, pausing the partitions if a stalled consumer lets twice the bound pile up), and nacked messages that are due again |
//! | message id | `topic/partition/offset`; record headers are headers; the record key is the ordering key |
//! | ack | marks the offset finished; the partition's commit point is its lowest unfinished offset (see below) |
//! | ack_many (`ack = "batch"`, `"manual"`) | marks them finished and asks for a commit soon (coalesced with the one in flight) |
//! | nack(delay) | the message stays unfinished (the commit point stays behind it) and is handed out again from this process after `delay`, attempt + 1: Kafka has no per-message redelivery |
//! | dead letter | produced to `<topic>.dlq` (or the handler's `dead_letter`) with the same key, payload and headers plus `idem-dead-letter-reason`, `idem-attempts`, `idem-handler`, `idem-original-id`, `idem-original-topic`, `idem-original-partition`, `idem-original-offset`; once the broker confirmed it (`acks=all`) the offset is finished |
//! | commit | asynchronous, from the poll thread (never on the async runtime), at most one in flight (acks meanwhile join the next): when [`commit_interval`](Kafka::commit_interval) passed or [`commit_every`](Kafka::commit_every) messages finished since the last one, or after `ack_many`; synchronous on partition revoke and on shutdown |
//! | rebalance (revoke) | the partitions' queued and nacked messages are dropped, in-flight ones get [`revoke_timeout`](Kafka::revoke_timeout) to finish, their commit point is committed, then they are released; an ack that arrives later is ignored (the new owner gets the message again and the store finds it done) |
//!
//! The committed offset of a partition is the per-partition watermark: the
//! lowest offset this consumer received that has not finished (handler and
//! store commit, a duplicate, or a dead letter), or one past the highest
//! received when all have finished. Messages run concurrently; the commit
//! never passes one that is still running or waiting for a retry. A crash
//! therefore redelivers everything from the commit point on, and the dedup
//! store acks what already committed as duplicates.

mod watermark;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

pub use rdkafka;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers as _, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::Notify;
use tokio::time::Instant;

use self::watermark::Watermark;
use super::plumbing;
use super::{DeadLetter, SourceError, SubscribeSpec, Subscription};
use crate::delivery::{Delivery, Headers, Receipt};
use crate::sync::lock;

const NAME: &str = "kafka";

/// The environment variable [`Kafka::from_env`] reads: the bootstrap
/// servers, `host:port[,host:port…]`.
pub const BROKERS_ENV: &str = "KAFKA_BROKERS";
/// The bootstrap servers used when [`BROKERS_ENV`] is unset.
pub const DEFAULT_BROKERS: &str = "127.0.0.1:9092";

/// The extra dead-letter headers of Kafka: where the message was.
pub mod dead_letter_headers {
    /// The topic the message was consumed from.
    pub const ORIGINAL_TOPIC: &str = "idem-original-topic";
    /// Its partition.
    pub const ORIGINAL_PARTITION: &str = "idem-original-partition";
    /// Its offset.
    pub const ORIGINAL_OFFSET: &str = "idem-original-offset";
}

/// One offset commit idem is about to send, as seen by
/// [`Kafka::observe_commits`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitEvent {
    /// The consumer group.
    pub group: String,
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The offset committed: the next one the group reads.
    pub offset: i64,
    /// Why: `watermark` (it moved), `flush` (after `ack_many`), `revoke` or
    /// `shutdown`.
    pub reason: &'static str,
}

type CommitObserver = Arc<dyn Fn(&CommitEvent) + Send + Sync>;

#[derive(Clone)]
struct Options {
    extra: Vec<(String, String)>,
    commit_interval: Duration,
    commit_every: usize,
    revoke_timeout: Duration,
    max_buffered: usize,
    poll_timeout: Duration,
    fetch_wait: Duration,
    produce_timeout: Duration,
    observer: Option<CommitObserver>,
}

/// Kafka source (see the [module docs](self)). Cheap to clone: clones share
/// their subscriptions' bookkeeping, so a clone can [`closed`](Kafka::closed)
/// for them.
///
/// ```no_run
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use idem_runtime::source::kafka::Kafka;
///
/// let source = Kafka::from_env()? // KAFKA_BROKERS, default 127.0.0.1:9092
///     .set("client.id", "orders-pod-1")
///     .commit_interval(Duration::from_millis(200));
/// source.ping().await?;
/// // idem_runtime::Runtime::builder(source).store(…).build()?.run_until(…).await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Kafka {
    brokers: Arc<str>,
    opts: Options,
    threads: Arc<Mutex<Vec<Arc<Closed>>>>,
}

impl fmt::Debug for Kafka {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kafka")
            .field("brokers", &self.brokers)
            .field("commit_interval", &self.opts.commit_interval)
            .field("commit_every", &self.opts.commit_every)
            .field("revoke_timeout", &self.opts.revoke_timeout)
            .finish_non_exhaustive()
    }
}

/// Settings idem owns; [`Kafka::set`] refuses to change them.
const OWNED_SETTINGS: [&str; 4] = [
    "enable.auto.commit",
    "enable.auto.offset.store",
    "group.id",
    "bootstrap.servers",
];

impl Kafka {
    /// A source for the brokers `brokers` (`host:port[,host:port…]`).
    /// Connects lazily, on the first subscription.
    pub fn new(brokers: &str) -> Result<Self, SourceError> {
        let brokers = brokers.trim();
        if brokers.is_empty() || brokers.split(',').any(|b| !b.trim().contains(':')) {
            return Err(SourceError::Config {
                source_name: NAME,
                message: format!(
                    "invalid Kafka bootstrap servers {brokers:?}: expected host:port[,host:port…] (set {BROKERS_ENV})"
                ),
            });
        }
        Ok(Kafka {
            brokers: brokers.into(),
            opts: Options {
                extra: Vec::new(),
                commit_interval: Duration::from_millis(200),
                commit_every: 500,
                revoke_timeout: Duration::from_secs(10),
                max_buffered: 1000,
                poll_timeout: Duration::from_millis(50),
                fetch_wait: Duration::from_millis(500),
                produce_timeout: Duration::from_secs(30),
                observer: None,
            },
            threads: Arc::default(),
        })
    }

    /// A source for the brokers in `KAFKA_BROKERS` (default `127.0.0.1:9092`).
    pub fn from_env() -> Result<Self, SourceError> {
        Self::new(&plumbing::url_from_env(BROKERS_ENV, DEFAULT_BROKERS))
    }

    /// Sets a librdkafka property on the consumers and the dead-letter
    /// producer (`security.protocol`, `sasl.*`, `session.timeout.ms`, …).
    /// The properties idem owns (`enable.auto.commit`,
    /// `enable.auto.offset.store`, `group.id`, `bootstrap.servers`) are
    /// ignored with a warning: auto-commit would commit offsets of messages
    /// that have not finished.
    pub fn set(mut self, key: &str, value: &str) -> Self {
        if OWNED_SETTINGS.contains(&key) {
            tracing::warn!(
                key,
                "idem sets this Kafka property itself; the value is ignored"
            );
            return self;
        }
        self.opts.extra.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Commit the watermark at most this often while it moves (default 200 ms).
    pub fn commit_interval(mut self, every: Duration) -> Self {
        self.opts.commit_interval = every;
        self
    }

    /// Or sooner, once this many messages finished since the last commit
    /// (default 500).
    pub fn commit_every(mut self, messages: usize) -> Self {
        self.opts.commit_every = messages.max(1);
        self
    }

    /// How long in-flight messages of revoked partitions may take to finish
    /// before the partitions are released anyway (default 10 s). Keep it
    /// well below the group's `max.poll.interval.ms`.
    pub fn revoke_timeout(mut self, timeout: Duration) -> Self {
        self.opts.revoke_timeout = timeout;
        self
    }

    /// How many received messages may wait in this process before the
    /// partitions are paused (default 1,000).
    pub fn max_buffered(mut self, messages: usize) -> Self {
        self.opts.max_buffered = messages.max(1);
        self
    }

    /// How long a `fetch` waits for messages before it returns an empty
    /// batch (default 500 ms).
    pub fn fetch_wait(mut self, wait: Duration) -> Self {
        self.opts.fetch_wait = wait.max(Duration::from_millis(1));
        self
    }

    /// How long a dead letter may wait for the broker's confirmation before
    /// the dead-lettering fails and the message comes back (default 30 s).
    pub fn produce_timeout(mut self, timeout: Duration) -> Self {
        self.opts.produce_timeout = timeout;
        self
    }

    /// Calls `f` with every offset commit just before it is sent: for
    /// metrics, audits and tests that check commits never pass an
    /// unfinished message. `f` runs on the poll thread and must be quick.
    pub fn observe_commits(mut self, f: impl Fn(&CommitEvent) + Send + Sync + 'static) -> Self {
        self.opts.observer = Some(Arc::new(f));
        self
    }

    /// The bootstrap servers.
    pub fn brokers(&self) -> &str {
        &self.brokers
    }

    /// Checks that the brokers answer (a metadata request), with an error
    /// that names the fix.
    pub async fn ping(&self) -> Result<(), SourceError> {
        let config = self.client_config();
        let brokers = self.brokers.clone();
        blocking(move || {
            let consumer: BaseConsumer = config.create().map_err(|e| config_error(&e))?;
            consumer
                .fetch_metadata(None, Duration::from_secs(5))
                .map(drop)
                .map_err(|e| unavailable(&brokers, &e))
        })
        .await
    }

    /// Waits until every subscription this source (or a clone) opened and
    /// then dropped has made its last commit and left its group.
    pub async fn closed(&self) {
        let threads: Vec<Arc<Closed>> = lock(&self.threads).clone();
        for t in threads {
            t.wait().await;
        }
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &*self.brokers);
        for (k, v) in &self.opts.extra {
            c.set(k, v);
        }
        c
    }
}

/// Runs blocking librdkafka calls off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SourceError> + Send + 'static,
) -> Result<T, SourceError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(SourceError::Unavailable {
            source_name: NAME,
            message: format!("a blocking Kafka call failed: {e}"),
        })
    })
}

fn config_error(e: &KafkaError) -> SourceError {
    SourceError::Config {
        source_name: NAME,
        message: format!("{e}; check the properties given to Kafka::set"),
    }
}

fn unavailable(brokers: &str, e: &KafkaError) -> SourceError {
    SourceError::Unavailable {
        source_name: NAME,
        message: format!(
            "{e} (bootstrap servers {brokers}); is the broker running there? (set {BROKERS_ENV})"
        ),
    }
}

/// Signals that a subscription's poll thread has finished.
#[derive(Default)]
struct Closed {
    done: AtomicBool,
    notify: Notify,
}

impl Closed {
    fn set(&self) {
        self.done.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    async fn wait(&self) {
        loop {
            let n = self.notify.notified();
            if self.done.load(Ordering::SeqCst) {
                return;
            }
            // Bounded, in case the notification raced the check above.
            let _ = tokio::time::timeout(Duration::from_millis(50), n).await;
        }
    }
}

// --- the shared state of one subscription ---------------------------------------

/// An assigned partition.
struct Part {
    /// Changes each time the partition is assigned to this consumer again:
    /// receipts of an older assignment are void.
    epoch: u32,
    watermark: Watermark,
    /// Handed to the loop and not settled yet.
    in_flight: usize,
    last_commit: Instant,
}

#[derive(Default)]
struct State {
    parts: HashMap<i32, Part>,
    next_epoch: u32,
    queue: VecDeque<Delivery>,
    retries: Vec<(Instant, Delivery)>,
    flush: bool,
    stop: bool,
    /// The partitions are paused (a stalled consumer let the queue grow to
    /// twice `max_buffered`); newly assigned ones are paused too.
    paused: bool,
    /// The poll thread waits for `fetch` to make room.
    poll_waiting: bool,
    /// Revoke handlers waiting for in-flight messages to settle.
    revoking: usize,
    /// When the asynchronous commit in flight was sent.
    commit_pending: Option<Instant>,
}

impl State {
    fn waiting(&self) -> usize {
        self.queue.len() + self.retries.len()
    }
}

/// Records the poll thread takes from librdkafka before it hands them over
/// (one lock, one wake-up) at most.
const CHUNK: usize = 256;

/// An asynchronous commit whose result has not come back in this long no
/// longer holds the next one back.
const COMMIT_PENDING_TIMEOUT: Duration = Duration::from_secs(5);

struct Shared {
    topic: Arc<str>,
    group: Arc<str>,
    dead_letter: Arc<str>,
    opts: Options,
    state: Mutex<State>,
    /// Wakes the revoke handler when in-flight messages settle.
    settled: Condvar,
    /// Wakes the poll thread when `fetch` made room.
    room: Condvar,
    /// Wakes `fetch` when messages arrive.
    arrived: Notify,
    /// Counts assignments and revokes (the poll thread refreshes its copy of
    /// the partitions' epochs when it moves).
    rebalances: AtomicU64,
}

/// The receipt of a delivery: partition and epoch in one number, and the offset.
fn receipt(partition: i32, epoch: u32, offset: i64) -> Receipt {
    let packed = (u64::from(epoch) << 32) | u64::from(partition as u32);
    Receipt::pair(packed as i64, offset)
}

fn parse_receipt(r: &Receipt) -> Option<(i32, u32, i64)> {
    let (packed, offset) = r.as_pair()?;
    let packed = packed as u64;
    Some((
        (packed & 0xffff_ffff) as u32 as i32,
        (packed >> 32) as u32,
        offset,
    ))
}

impl Shared {
    /// Settles a delivery: finished (`finish`) or handed back. None when its
    /// partition was revoked since it was handed out.
    fn settle(&self, d: &Delivery, finish: bool) -> Option<()> {
        let (partition, epoch, offset) = parse_receipt(&d.receipt)?;
        let mut st = lock(&self.state);
        let part = st.parts.get_mut(&partition).filter(|p| p.epoch == epoch)?;
        part.in_flight = part.in_flight.saturating_sub(1);
        if finish {
            part.watermark.finish(offset);
        }
        let revoking = st.revoking > 0;
        drop(st);
        if revoking {
            self.settled.notify_all();
        }
        Some(())
    }

    fn still_owned(&self, d: &Delivery) -> bool {
        parse_receipt(&d.receipt).is_some_and(|(p, e, _)| {
            lock(&self.state)
                .parts
                .get(&p)
                .is_some_and(|part| part.epoch == e)
        })
    }

    fn moved_away(&self, d: &Delivery, what: &str) {
        tracing::info!(
            topic = %self.topic,
            group = %self.group,
            message_id = %d.id,
            "{what} ignored: the partition was revoked since the message was handed out; its new owner gets it again and the dedup store finds its effect"
        );
    }

    /// Offsets due for a commit, as (partition, offset); with `force`, every
    /// partition whose watermark moved.
    /// Without `force`, nothing while an asynchronous commit is in flight:
    /// what finished meanwhile joins the next one.
    fn due_commits(&self, force: bool, only: Option<&[i32]>) -> Vec<(i32, i64)> {
        let mut st = lock(&self.state);
        let now = Instant::now();
        if !force
            && st
                .commit_pending
                .is_some_and(|sent| now.duration_since(sent) < COMMIT_PENDING_TIMEOUT)
        {
            return Vec::new();
        }
        // A forced (revoke, shutdown) commit leaves a pending flush for the
        // partitions it did not cover.
        let flush = !force && std::mem::take(&mut st.flush);
        let mut out = Vec::new();
        for (p, part) in &st.parts {
            if only.is_some_and(|o| !o.contains(p)) {
                continue;
            }
            let Some(offset) = part.watermark.to_commit() else {
                continue;
            };
            if force
                || flush
                || part.watermark.finished_since_commit() >= self.opts.commit_every
                || now.duration_since(part.last_commit) >= self.opts.commit_interval
            {
                out.push((*p, offset));
            }
        }
        out
    }

    /// Commits from the poll thread: `Sync` waits for the broker and records
    /// the result; `Async` only sends, and [`Shared::commit_done`] records
    /// the result when librdkafka reports it (from a later `poll`).
    fn commit<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        offsets: &[(i32, i64)],
        reason: &'static str,
        mode: CommitMode,
    ) {
        if offsets.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::with_capacity(offsets.len());
        for (p, o) in offsets {
            if let Err(e) = tpl.add_partition_offset(&self.topic, *p, Offset::Offset(*o)) {
                tracing::error!(error = %e, "cannot build the offset commit");
                return;
            }
            if let Some(f) = &self.opts.observer {
                f(&CommitEvent {
                    group: self.group.to_string(),
                    topic: self.topic.to_string(),
                    partition: *p,
                    offset: *o,
                    reason,
                });
            }
        }
        let sync = matches!(mode, CommitMode::Sync);
        match consumer.commit(&tpl, mode) {
            Ok(()) => {
                let mut st = lock(&self.state);
                let now = Instant::now();
                if !sync {
                    st.commit_pending = Some(now);
                }
                for (p, o) in offsets {
                    if let Some(part) = st.parts.get_mut(p) {
                        if sync {
                            part.watermark.committed(*o);
                        } else {
                            part.watermark.commit_sent();
                        }
                        part.last_commit = now;
                    }
                }
                tracing::debug!(topic = %self.topic, group = %self.group, ?offsets, reason, sync, "offsets committed");
            }
            Err(e) => {
                // The watermark stays ahead of `committed`: the next round retries.
                tracing::warn!(topic = %self.topic, group = %self.group, error = %e, reason, "offset commit failed; retrying on the next round (a crash now redelivers from the last commit, and the store dedups)");
            }
        }
    }

    /// The result of an asynchronous commit, reported by librdkafka.
    fn commit_done(&self, result: &Result<(), KafkaError>, offsets: &TopicPartitionList) {
        let mut st = lock(&self.state);
        st.commit_pending = None;
        if let Err(e) = result {
            // The watermark stays ahead of `committed`: a later round retries.
            tracing::warn!(topic = %self.topic, group = %self.group, error = %e, "asynchronous offset commit failed; retrying on a later round (a crash now redelivers from the last commit, and the store dedups)");
            return;
        }
        for e in offsets.elements_for_topic(&self.topic) {
            if let (Offset::Offset(o), Ok(())) = (e.offset(), e.error())
                && let Some(part) = st.parts.get_mut(&e.partition())
            {
                part.watermark.committed(o);
            }
        }
    }

    /// Hands over the records the poll thread received: each is registered
    /// in its partition's watermark and queued, under one lock, unless its
    /// partition was revoked (or assigned again) since it was received.
    fn hand_over(&self, chunk: &mut Vec<(u32, Delivery)>) {
        if chunk.is_empty() {
            return;
        }
        let mut st = lock(&self.state);
        let mut queued = false;
        for (epoch, d) in chunk.drain(..) {
            let Some((partition, _, offset)) = parse_receipt(&d.receipt) else {
                continue;
            };
            let Some(part) = st.parts.get_mut(&partition).filter(|p| p.epoch == epoch) else {
                tracing::debug!(
                    partition,
                    offset,
                    "record of a partition not assigned (any more); dropped"
                );
                continue;
            };
            if part.watermark.register(offset) {
                st.queue.push_back(d);
                queued = true;
            }
        }
        drop(st);
        if queued {
            self.arrived.notify_one();
        }
    }

    /// The partitions' epochs as the poll thread stamps records with them.
    fn epochs(&self, into: &mut HashMap<i32, u32>) {
        let st = lock(&self.state);
        into.clear();
        into.extend(st.parts.iter().map(|(p, part)| (*p, part.epoch)));
    }

    fn assign(&self, partitions: &[i32]) {
        let mut st = lock(&self.state);
        let now = Instant::now();
        for p in partitions {
            if st.parts.contains_key(p) {
                continue;
            }
            st.next_epoch = st.next_epoch.wrapping_add(1);
            let epoch = st.next_epoch;
            st.parts.insert(
                *p,
                Part {
                    epoch,
                    watermark: Watermark::new(),
                    in_flight: 0,
                    last_commit: now,
                },
            );
        }
        drop(st);
        self.rebalances.fetch_add(1, Ordering::SeqCst);
        tracing::info!(topic = %self.topic, group = %self.group, ?partitions, "partitions assigned");
    }

    /// Revoke: drop what did not start, let in-flight messages finish within
    /// the timeout, commit, release.
    fn revoke<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>, partitions: &[i32]) {
        let deadline = std::time::Instant::now() + self.opts.revoke_timeout;
        self.rebalances.fetch_add(1, Ordering::SeqCst);
        let mut st = lock(&self.state);
        st.revoking += 1;
        st.queue
            .retain(|d| parse_receipt(&d.receipt).is_none_or(|(p, _, _)| !partitions.contains(&p)));
        st.retries.retain(|(_, d)| {
            parse_receipt(&d.receipt).is_none_or(|(p, _, _)| !partitions.contains(&p))
        });
        loop {
            let running: usize = partitions
                .iter()
                .filter_map(|p| st.parts.get(p))
                .map(|p| p.in_flight)
                .sum();
            if running == 0 {
                break;
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                tracing::warn!(topic = %self.topic, group = %self.group, running, timeout = ?self.opts.revoke_timeout, "revoke timeout: releasing partitions with messages still running; their acks will be ignored and the new owner redelivers them");
                break;
            }
            st = self
                .settled
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.revoking -= 1;
        drop(st);
        let due = self.due_commits(true, Some(partitions));
        self.commit(consumer, &due, "revoke", CommitMode::Sync);
        let mut st = lock(&self.state);
        for p in partitions {
            st.parts.remove(p);
        }
        drop(st);
        tracing::info!(topic = %self.topic, group = %self.group, ?partitions, "partitions revoked");
    }
}

// --- the consumer context: rebalance callbacks ------------------------------------

struct Context {
    shared: Arc<Shared>,
}

impl ClientContext for Context {}

/// Builds the delivery of a received record (outside the state's lock),
/// stamped with its partition's epoch; `None` when the partition is not
/// assigned (any more).
fn delivery_of(
    topic: &Arc<str>,
    epochs: &HashMap<i32, u32>,
    m: &BorrowedMessage<'_>,
) -> Option<(u32, Delivery)> {
    let partition = m.partition();
    let offset = m.offset();
    let Some(epoch) = epochs.get(&partition).copied() else {
        tracing::debug!(
            partition,
            offset,
            "record of a partition not assigned (any more); dropped"
        );
        return None;
    };
    let mut headers = Headers::default();
    if let Some(h) = m.headers() {
        for Header { key, value } in h.iter() {
            headers.insert(key, value.unwrap_or_default());
        }
    }
    let d = Delivery {
        id: format!("{topic}/{partition}/{offset}").into(),
        topic: topic.clone(),
        payload: m.payload().unwrap_or_default().into(),
        headers,
        ordering_key: m
            .key()
            .map(|k| Arc::<str>::from(String::from_utf8_lossy(k))),
        attempt: 1,
        receipt: receipt(partition, epoch, offset),
    };
    Some((epoch, d))
}

fn partitions_of(topic: &str, tpl: &TopicPartitionList) -> Vec<i32> {
    tpl.elements()
        .iter()
        .filter(|e| e.topic() == topic)
        .map(|e| e.partition())
        .collect()
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let parts = partitions_of(&self.shared.topic, tpl);
                self.shared.revoke(consumer, &parts);
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => {
                tracing::warn!(topic = %self.shared.topic, group = %self.shared.group, error = %e, "rebalance error");
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.shared.assign(&partitions_of(&self.shared.topic, tpl));
            // A rebalance hands partitions out unpaused.
            if lock(&self.shared.state).paused
                && let Err(e) = consumer.pause(tpl)
            {
                tracing::warn!(error = %e, "cannot pause the assigned partitions");
            }
        }
    }

    fn commit_callback(&self, result: Result<(), KafkaError>, offsets: &TopicPartitionList) {
        self.shared.commit_done(&result, offsets);
    }
}

// --- subscribing ------------------------------------------------------------------

impl super::Source for Kafka {
    type Subscription = KafkaSubscription;

    async fn subscribe(&self, spec: SubscribeSpec<'_>) -> Result<KafkaSubscription, SourceError> {
        let shared = Arc::new(Shared {
            topic: spec.topic.into(),
            group: spec.group.into(),
            dead_letter: spec
                .dead_letter
                .map_or_else(|| format!("{}.dlq", spec.topic), str::to_owned)
                .into(),
            opts: self.opts.clone(),
            state: Mutex::new(State::default()),
            settled: Condvar::new(),
            room: Condvar::new(),
            arrived: Notify::new(),
            rebalances: AtomicU64::new(0),
        });
        let mut producer_config = self.client_config();
        producer_config
            .set("acks", "all")
            .set("enable.idempotence", "false");
        let producer: FutureProducer = producer_config.create().map_err(|e| config_error(&e))?;
        self.ensure_dead_letter_topic(&shared).await;

        let mut config = self.client_config();
        config
            .set("group.id", &*shared.group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false");
        if !self
            .opts
            .extra
            .iter()
            .any(|(k, _)| k == "auto.offset.reset")
        {
            config.set("auto.offset.reset", "earliest");
        }
        let context = Context {
            shared: shared.clone(),
        };
        let brokers = self.brokers.clone();
        let topic = shared.topic.clone();
        let consumer: BaseConsumer<Context> = blocking(move || {
            let c: BaseConsumer<Context> = config
                .create_with_context(context)
                .map_err(|e| config_error(&e))?;
            c.subscribe(&[&topic])
                .map_err(|e| unavailable(&brokers, &e))?;
            Ok(c)
        })
        .await?;
        let closed = Arc::new(Closed::default());
        {
            let mut threads = lock(&self.threads);
            threads.retain(|t| !t.done.load(Ordering::SeqCst));
            threads.push(closed.clone());
        }
        let thread_shared = shared.clone();
        let thread_closed = closed.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("idem-kafka-{}", shared.group))
            .spawn(move || {
                poll_loop(&thread_shared, consumer);
                thread_closed.set();
            });
        if let Err(e) = spawned {
            closed.set();
            return Err(SourceError::Unavailable {
                source_name: NAME,
                message: format!("cannot start the Kafka poll thread: {e}"),
            });
        }
        Ok(KafkaSubscription {
            shared,
            producer,
            closed,
        })
    }
}

impl Kafka {
    /// Creates the dead-letter topic with the topic's partition count when
    /// it is missing. Failures are logged: dead-lettering then fails (and
    /// retries) with the broker's error.
    async fn ensure_dead_letter_topic(&self, shared: &Shared) {
        let config = self.client_config();
        let topic = shared.topic.to_string();
        let dlq = shared.dead_letter.to_string();
        let counts = blocking(move || {
            let c: BaseConsumer = config.create().map_err(|e| config_error(&e))?;
            let md = c
                .fetch_metadata(None, Duration::from_secs(5))
                .map_err(|e| SourceError::Unavailable {
                    source_name: NAME,
                    message: e.to_string(),
                })?;
            let count = |name: &str| {
                md.topics()
                    .iter()
                    .find(|t| t.name() == name && t.error().is_none())
                    .map(|t| t.partitions().len())
            };
            Ok((count(&topic), count(&dlq)))
        })
        .await;
        let partitions = match counts {
            Ok((_, Some(_))) => return,
            Ok((Some(n), None)) => n.max(1),
            Ok((None, None)) => 1,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read topic metadata; not creating the dead-letter topic");
                return;
            }
        };
        let admin: AdminClient<DefaultClientContext> = match self.client_config().create() {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "cannot create a Kafka admin client");
                return;
            }
        };
        let new = NewTopic::new(
            &shared.dead_letter,
            i32::try_from(partitions).unwrap_or(1),
            TopicReplication::Fixed(-1),
        );
        match admin.create_topics([&new], &AdminOptions::new()).await {
            Ok(results) => {
                for r in results {
                    match r {
                        Ok(name) => {
                            tracing::info!(topic = %name, partitions, "dead-letter topic created")
                        }
                        Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                        Err((name, code)) => {
                            tracing::warn!(topic = %name, error = %code, "cannot create the dead-letter topic; create it by hand")
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot create the dead-letter topic; create it by hand")
            }
        }
    }
}

/// The poll thread: receives records and hands them over in chunks, waits
/// for room when `max_buffered` wait, commits watermarks (asynchronously),
/// and runs the rebalance and commit callbacks (librdkafka calls them from
/// `poll`). On stop: a last synchronous commit, then the consumer is closed
/// (leaving the group, with a last revoke).
fn poll_loop(shared: &Shared, consumer: BaseConsumer<Context>) {
    let max = shared.opts.max_buffered;
    let mut epochs: HashMap<i32, u32> = HashMap::new();
    let mut seen_rebalances = u64::MAX;
    let mut chunk: Vec<(u32, Delivery)> = Vec::with_capacity(CHUNK.min(max));
    loop {
        let (stop, waiting, paused) = {
            let st = lock(&shared.state);
            (st.stop, st.waiting(), st.paused)
        };
        if stop {
            break;
        }
        let room = max.saturating_sub(waiting);
        if room == 0 {
            // Full: wait until `fetch` makes room, then poll once without
            // waiting, to serve the group's events (rebalances, commit
            // results, the poll interval); a record it returns is taken
            // over the bound. A consumer that stalls long enough to double
            // the bound gets its partitions paused (librdkafka drops what it
            // prefetched and fetches again on resume: kept for stalls).
            if waiting >= max.saturating_mul(2) && !paused {
                set_paused(shared, &consumer, true);
            }
            let mut st = lock(&shared.state);
            if st.waiting() >= max && !st.stop {
                st.poll_waiting = true;
                st = shared
                    .room
                    .wait_timeout(st, shared.opts.poll_timeout)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                st.poll_waiting = false;
            }
            drop(st);
        } else if paused && waiting <= max / 2 {
            set_paused(shared, &consumer, false);
        }
        // The first record within `poll_timeout`, then what librdkafka
        // already holds, up to the room there is.
        let mut timeout = if room == 0 {
            Duration::ZERO
        } else {
            shared.opts.poll_timeout
        };
        let want = room.clamp(1, CHUNK);
        while chunk.len() < want {
            let Some(r) = consumer.poll(timeout) else {
                break;
            };
            timeout = Duration::ZERO;
            let m = match r {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(topic = %shared.topic, group = %shared.group, error = %e, "Kafka consumer error");
                    break;
                }
            };
            let now = shared.rebalances.load(Ordering::SeqCst);
            if now != seen_rebalances {
                shared.epochs(&mut epochs);
                seen_rebalances = now;
            }
            chunk.extend(delivery_of(&shared.topic, &epochs, &m));
        }
        shared.hand_over(&mut chunk);
        let due = shared.due_commits(false, None);
        shared.commit(&consumer, &due, "watermark", CommitMode::Async);
    }
    let due = shared.due_commits(true, None);
    shared.commit(&consumer, &due, "shutdown", CommitMode::Sync);
    // Dropping the consumer closes it: librdkafka revokes the assignment
    // (our revoke handler commits again if anything finished meanwhile) and
    // leaves the group.
    drop(consumer);
    tracing::debug!(topic = %shared.topic, group = %shared.group, "Kafka consumer closed");
}

/// Pauses or resumes the assigned partitions (only the poll thread does).
fn set_paused(shared: &Shared, consumer: &BaseConsumer<Context>, pause: bool) {
    let assigned = match consumer.assignment() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the assignment to pause/resume it");
            return;
        }
    };
    let r = if pause {
        consumer.pause(&assigned)
    } else {
        consumer.resume(&assigned)
    };
    match r {
        Ok(()) => {
            lock(&shared.state).paused = pause;
            tracing::debug!(topic = %shared.topic, group = %shared.group, pause, "partitions paused/resumed");
        }
        Err(e) => tracing::warn!(error = %e, "cannot pause/resume the partitions"),
    }
}

/// One handler's consumer in its group (see the [module docs](self)).
pub struct KafkaSubscription {
    shared: Arc<Shared>,
    producer: FutureProducer,
    /// Set by the poll thread once it made its last commit and left.
    closed: Arc<Closed>,
}

impl fmt::Debug for KafkaSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = lock(&self.shared.state);
        f.debug_struct("KafkaSubscription")
            .field("topic", &self.shared.topic)
            .field("group", &self.shared.group)
            .field("dead_letter", &self.shared.dead_letter)
            .field("partitions", &st.parts.keys().collect::<Vec<_>>())
            .field("queued", &st.queue.len())
            .finish()
    }
}

impl Drop for KafkaSubscription {
    fn drop(&mut self) {
        // The poll thread commits and closes the consumer on its own; it is
        // not joined here, to keep the async runtime free. `close` and
        // `Kafka::closed` wait for it.
        self.stop();
    }
}

impl KafkaSubscription {
    /// Tells the poll thread to make its last commit and leave the group.
    fn stop(&self) {
        lock(&self.shared.state).stop = true;
        self.shared.room.notify_one();
    }

    fn take(&self, max: usize) -> Vec<Delivery> {
        let mut st = lock(&self.shared.state);
        let now = Instant::now();
        let mut out = Vec::new();
        let mut due = Vec::new();
        st.retries.retain(|(at, d)| {
            if *at <= now && due.len() < max {
                due.push(d.clone());
                false
            } else {
                true
            }
        });
        out.extend(due);
        while out.len() < max {
            match st.queue.pop_front() {
                Some(d) => out.push(d),
                None => break,
            }
        }
        out.retain(|d| {
            parse_receipt(&d.receipt)
                .and_then(|(p, e, _)| st.parts.get_mut(&p).filter(|part| part.epoch == e))
                .map(|part| part.in_flight += 1)
                .is_some()
        });
        let wake = st.poll_waiting && !out.is_empty();
        drop(st);
        if wake {
            self.shared.room.notify_one();
        }
        out
    }

    fn next_retry(&self) -> Option<Instant> {
        lock(&self.shared.state)
            .retries
            .iter()
            .map(|(at, _)| *at)
            .min()
    }

    fn finish_many(&self, deliveries: &[&Delivery]) {
        for d in deliveries {
            if self.shared.settle(d, true).is_none() {
                self.shared.moved_away(d, "ack");
            }
        }
    }
}

impl Subscription for KafkaSubscription {
    async fn fetch(&self, max: usize) -> Result<Vec<Delivery>, SourceError> {
        let max = max.max(1);
        let until = Instant::now() + self.shared.opts.fetch_wait;
        loop {
            let batch = self.take(max);
            if !batch.is_empty() {
                return Ok(batch);
            }
            let now = Instant::now();
            if now >= until {
                return Ok(Vec::new());
            }
            let wake = self.next_retry().map_or(until, |r| r.min(until));
            let _ = tokio::time::timeout_at(wake.max(now), self.shared.arrived.notified()).await;
        }
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), SourceError> {
        self.finish_many(&[delivery]);
        Ok(())
    }

    async fn ack_many(&self, deliveries: &[&Delivery]) -> Result<(), SourceError> {
        self.finish_many(deliveries);
        // Batch and manual acks commit soon (from the poll thread, coalesced
        // with the commit in flight).
        lock(&self.shared.state).flush = true;
        Ok(())
    }

    async fn nack(&self, delivery: &Delivery, delay: Duration) -> Result<(), SourceError> {
        if self.shared.settle(delivery, false).is_none() {
            self.shared.moved_away(delivery, "nack");
            return Ok(());
        }
        let again = delivery
            .clone()
            .with_attempt(delivery.attempt.saturating_add(1));
        lock(&self.shared.state)
            .retries
            .push((Instant::now() + delay, again));
        self.shared.arrived.notify_one();
        Ok(())
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery,
        letter: &DeadLetter,
    ) -> Result<(), SourceError> {
        if !self.shared.still_owned(delivery) {
            // The new owner gets it from the committed offset and decides.
            self.shared.moved_away(delivery, "dead letter");
            return Ok(());
        }
        plumbing::write_dead_letter(self, delivery, letter).await
    }

    async fn close(&self) {
        self.stop();
        // Bounded: a broker that never answers the last commit or the
        // group leave cannot hold shutdown (librdkafka gives up on its own).
        if tokio::time::timeout(CLOSE_TIMEOUT, self.closed.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                topic = %self.shared.topic,
                group = %self.shared.group,
                "the Kafka consumer did not leave its group within {CLOSE_TIMEOUT:?}; it goes on closing in the background"
            );
        }
    }
}

/// How long [`Subscription::close`] waits for the poll thread's last
/// commit and group leave.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A Kafka dead letter: the record's key, payload and headers plus where it
/// came from (topic, partition, offset), confirmed with `acks=all` before
/// the offset is finished.
impl plumbing::DeadLetterSink for KafkaSubscription {
    fn reserved(&self, name: &str) -> bool {
        [
            dead_letter_headers::ORIGINAL_TOPIC,
            dead_letter_headers::ORIGINAL_PARTITION,
            dead_letter_headers::ORIGINAL_OFFSET,
        ]
        .iter()
        .any(|n| n.eq_ignore_ascii_case(name))
    }

    async fn publish_and_settle(
        &self,
        delivery: &Delivery,
        headers: Vec<plumbing::Header<'_>>,
    ) -> Result<(), SourceError> {
        let (partition, _, offset) = parse_receipt(&delivery.receipt).unwrap_or((-1, 0, -1));
        let (partition, offset) = (partition.to_string(), offset.to_string());
        let origin = [
            (
                dead_letter_headers::ORIGINAL_TOPIC,
                delivery.topic.as_bytes(),
            ),
            (
                dead_letter_headers::ORIGINAL_PARTITION,
                partition.as_bytes(),
            ),
            (dead_letter_headers::ORIGINAL_OFFSET, offset.as_bytes()),
        ];
        let headers = headers.iter().map(|(k, v)| (*k, &**v)).chain(origin).fold(
            OwnedHeaders::new(),
            |h, (key, value)| {
                h.insert(Header {
                    key,
                    value: Some(value),
                })
            },
        );
        let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(&self.shared.dead_letter)
            .payload(&*delivery.payload)
            .headers(headers);
        if let Some(key) = &delivery.ordering_key {
            record = record.key(&**key);
        }
        match self
            .producer
            .send(record, self.shared.opts.produce_timeout)
            .await
        {
            Ok(_) => {
                if self.shared.settle(delivery, true).is_none() {
                    self.shared.moved_away(delivery, "dead letter settle");
                }
                Ok(())
            }
            Err((e, _)) => {
                // Not settled: hand it back so it is dead-lettered again.
                let _ = self.nack(delivery, Duration::from_secs(1)).await;
                Err(SourceError::Unavailable {
                    source_name: NAME,
                    message: format!(
                        "dead letter to {} not confirmed: {e}; the message comes back and is dead-lettered again",
                        self.shared.dead_letter
                    ),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        Shared {
            topic: "t".into(),
            group: "g".into(),
            dead_letter: "t.dlq".into(),
            opts: Kafka::new("a:1").unwrap().opts,
            state: Mutex::new(State::default()),
            settled: Condvar::new(),
            room: Condvar::new(),
            arrived: Notify::new(),
            rebalances: AtomicU64::new(0),
        }
    }

    /// A delivery of `offset` on partition 0 as the poll thread queues it.
    fn queue(s: &Shared, offset: i64) -> Delivery {
        let mut st = lock(&s.state);
        let part = st.parts.get_mut(&0).unwrap();
        assert!(part.watermark.register(offset));
        let d = Delivery::new(format!("t/0/{offset}"), "t", b"{}".to_vec())
            .with_receipt(receipt(0, part.epoch, offset));
        part.in_flight += 1;
        d
    }

    fn commit_point(s: &Shared) -> Option<i64> {
        lock(&s.state).parts[&0].watermark.commit_point()
    }

    #[test]
    fn an_ack_from_before_a_revoke_does_not_finish_the_new_owners_message() {
        let s = shared();
        s.assign(&[0]);
        let old = queue(&s, 5);
        // Revoked while the handler ran, then assigned back: offset 5 comes
        // again from the committed offset, under a new epoch.
        lock(&s.state).parts.remove(&0);
        s.assign(&[0]);
        let new = queue(&s, 5);
        assert_ne!(old.receipt, new.receipt);
        assert!(s.settle(&old, true).is_none(), "the old ack is ignored");
        assert!(!s.still_owned(&old));
        assert_eq!(commit_point(&s), Some(5), "5 is still unfinished");
        assert!(s.settle(&new, true).is_some());
        assert_eq!(commit_point(&s), Some(6));
    }

    #[test]
    fn a_nacked_message_holds_the_commit_point_back() {
        let s = shared();
        s.assign(&[0]);
        let a = queue(&s, 0);
        let b = queue(&s, 1);
        assert!(
            s.settle(&a, false).is_some(),
            "nack: handed back, unfinished"
        );
        assert!(s.settle(&b, true).is_some());
        assert_eq!(commit_point(&s), Some(0));
        assert_eq!(s.due_commits(true, None), vec![(0, 0)]);
        assert_eq!(lock(&s.state).parts[&0].in_flight, 0);
    }

    /// A record of partition 0 as the poll thread stamps it.
    fn received(s: &Shared, offset: i64) -> (u32, Delivery) {
        let epoch = lock(&s.state).parts[&0].epoch;
        let d = Delivery::new(format!("t/0/{offset}"), "t", b"{}".to_vec())
            .with_receipt(receipt(0, epoch, offset));
        (epoch, d)
    }

    #[test]
    fn a_chunk_is_handed_over_at_once_and_drops_records_of_an_older_assignment() {
        let s = shared();
        s.assign(&[0]);
        let mut chunk = vec![received(&s, 0), received(&s, 1)];
        s.hand_over(&mut chunk);
        assert!(chunk.is_empty());
        assert_eq!(lock(&s.state).queue.len(), 2);
        // Received, then the partition was revoked and assigned again
        // before the hand-over: the new assignment fetches from the
        // committed offset itself.
        let mut chunk = vec![received(&s, 2)];
        lock(&s.state).parts.remove(&0);
        s.assign(&[0]);
        s.hand_over(&mut chunk);
        let st = lock(&s.state);
        assert_eq!(st.queue.len(), 2, "the stale record is dropped");
        assert_eq!(st.parts[&0].watermark.commit_point(), None);
    }

    #[test]
    fn an_async_commit_in_flight_holds_the_next_one_back_until_its_result() {
        let s = shared();
        s.assign(&[0]);
        let a = queue(&s, 0);
        assert!(s.settle(&a, true).is_some());
        lock(&s.state).flush = true;
        assert_eq!(s.due_commits(false, None), vec![(0, 1)]);
        // Sent: what finishes meanwhile waits for the result.
        lock(&s.state).commit_pending = Some(Instant::now());
        lock(&s.state)
            .parts
            .get_mut(&0)
            .unwrap()
            .watermark
            .commit_sent();
        let b = queue(&s, 1);
        assert!(s.settle(&b, true).is_some());
        lock(&s.state).flush = true;
        assert_eq!(s.due_commits(false, None), vec![], "one commit in flight");
        assert_eq!(
            s.due_commits(true, None),
            vec![(0, 2)],
            "revoke/shutdown do not wait"
        );
        // The result: offset 1 committed; 2 is next.
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("t", 0, Offset::Offset(1)).unwrap();
        s.commit_done(&Ok(()), &tpl);
        assert_eq!(lock(&s.state).parts[&0].watermark.last_committed(), Some(1));
        assert_eq!(s.due_commits(false, None), vec![(0, 2)], "the flush waited");
    }

    #[test]
    fn a_failed_async_commit_is_retried() {
        let s = shared();
        s.assign(&[0]);
        let a = queue(&s, 0);
        assert!(s.settle(&a, true).is_some());
        lock(&s.state).commit_pending = Some(Instant::now());
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("t", 0, Offset::Offset(1)).unwrap();
        s.commit_done(
            &Err(KafkaError::ConsumerCommit(
                RDKafkaErrorCode::RequestTimedOut,
            )),
            &tpl,
        );
        let st = lock(&s.state);
        assert!(st.commit_pending.is_none());
        assert_eq!(st.parts[&0].watermark.last_committed(), None);
        assert_eq!(st.parts[&0].watermark.to_commit(), Some(1));
    }

    #[test]
    fn receipts_round_trip_partition_epoch_and_offset() {
        for (p, e, o) in [(0, 1, 0), (3, u32::MAX, i64::MAX), (i32::MAX, 7, 42)] {
            assert_eq!(parse_receipt(&receipt(p, e, o)), Some((p, e, o)));
        }
        assert_eq!(parse_receipt(&Receipt::text("x")), None);
    }

    #[test]
    fn bootstrap_servers_are_checked() {
        assert!(Kafka::new("").is_err());
        assert!(Kafka::new("localhost").is_err());
        assert!(Kafka::new("a:1,b:2").is_ok());
    }

    #[test]
    fn owned_settings_cannot_be_overridden() {
        let k = Kafka::new("a:1")
            .unwrap()
            .set("enable.auto.commit", "true")
            .set("client.id", "x");
        assert_eq!(k.opts.extra, vec![("client.id".to_owned(), "x".to_owned())]);
    }
}
