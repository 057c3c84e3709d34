//! The end-to-end scenarios of issue 6, written once for every real broker.
//!
//! A per-broker test file (`tests/redis_streams.rs`, `tests/nats.rs`,
//! `tests/rabbitmq.rs`) implements [`Broker`] (publish, read dead letters,
//! prove nothing is pending, run a private server it can kill) and calls the
//! scenarios below. The runtime under test sees the broker's source through
//! [`TestSource`], which gives every test its own topic and group names, can
//! turn acks into nacks (a forced redelivery of a committed message) or hang
//! an ack forever (a crash between commit and ack), and records what the
//! loop did.
//!
//! Loaded with `#[path = "common/brokers.rs"] mod brokers;` next to
//! `mod common;`, so only the broker test binaries register its handlers.
#![allow(
    dead_code,
    unreachable_pub,
    async_fn_in_trait,
    unused_macros,
    unused_imports
)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem::source::{DeadLetter, SubscribeSpec, Subscription};
use idem::store::sqlite::SqliteStore;
use idem::{
    Ack, Backoff, CancellationToken, Delivery, Runtime, Source, SourceError, Tx, idempotent,
};
use serde::Deserialize;
use tokio::sync::{oneshot, watch};

use crate::common;

// --- the handlers under test --------------------------------------------------

#[derive(Debug, Deserialize)]
pub struct Order {
    pub order_id: String,
    pub seq: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("order {0} is refused by the business rules")]
    Refused(String),
}

async fn apply(tx: &mut Tx<'_>, handler: &str, o: &Order) -> Result<(), AppError> {
    if o.order_id.starts_with("refuse") {
        return Err(AppError::Refused(o.order_id.clone()));
    }
    common::insert_effect(tx, handler, &o.order_id, o.seq).await?;
    Ok(())
}

/// The topic every handler below names; [`TestSource`] makes it unique per test.
pub const TOPIC: &str = "bk-orders";

#[idempotent(
    topic = "bk-orders",
    key = "order_id",
    store = "sqlite",
    name = "bk-auto",
    retries = 2,
    backoff = "5ms..20ms"
)]
async fn bk_auto(o: Order, tx: &mut Tx<'_>) -> Result<(), AppError> {
    apply(tx, "bk-auto", &o).await
}

#[idempotent(
    topic = "bk-orders",
    key = "order_id",
    store = "sqlite",
    name = "bk-manual",
    ack = "manual",
    retries = 2,
    backoff = "5ms..20ms"
)]
async fn bk_manual(o: Order, tx: &mut Tx<'_>, ack: Ack) -> Result<(), AppError> {
    apply(tx, "bk-manual", &o).await?;
    ack.ack();
    Ok(())
}

#[idempotent(
    topic = "bk-orders",
    key = "order_id",
    store = "sqlite",
    name = "bk-immediate",
    ack = "manual_immediate",
    retries = 2,
    backoff = "5ms..20ms"
)]
async fn bk_immediate(o: Order, tx: &mut Tx<'_>, ack: Ack) -> Result<(), AppError> {
    apply(tx, "bk-immediate", &o).await?;
    ack.ack();
    Ok(())
}

#[idempotent(
    topic = "bk-orders",
    key = "order_id",
    store = "sqlite",
    name = "bk-batch",
    ack = "batch",
    retries = 2,
    backoff = "5ms..20ms"
)]
async fn bk_batch(o: Order, tx: &mut Tx<'_>) -> Result<(), AppError> {
    apply(tx, "bk-batch", &o).await
}

/// Runs `seq` milliseconds: longer than the broker lets a message sit unacked.
#[idempotent(
    topic = "bk-orders",
    key = "order_id",
    store = "sqlite",
    name = "bk-slow"
)]
async fn bk_slow(o: Order, tx: &mut Tx<'_>) -> Result<(), AppError> {
    tokio::time::sleep(Duration::from_millis(u64::from(o.seq))).await;
    apply(tx, "bk-slow", &o).await
}

/// Nacks every order whose key starts with `nack` (redelivery, no attempt
/// counted by the loop: the broker's delivery count decides).
#[idempotent(
    topic = "bk-orders",
    key = "order_id",
    store = "sqlite",
    name = "bk-nacker",
    ack = "manual",
    backoff = "5ms..20ms"
)]
async fn bk_nacker(o: Order, tx: &mut Tx<'_>, ack: Ack) -> Result<(), AppError> {
    if o.order_id.starts_with("nack") {
        ack.nack();
        return Ok(());
    }
    apply(tx, "bk-nacker", &o).await?;
    ack.ack();
    Ok(())
}

// --- what a broker fixture provides ------------------------------------------

/// A message to publish.
#[derive(Debug, Clone)]
pub struct TestMessage {
    /// The producer's message id (AMQP `message_id`, `Nats-Msg-Id`); Redis
    /// assigns entry ids itself and ignores it.
    pub id: String,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

/// `{"order_id": key, "seq": seq}` with message id `m-<key>`.
pub fn order(key: &str, seq: u32) -> TestMessage {
    TestMessage {
        id: format!("m-{key}"),
        payload: serde_json::json!({ "order_id": key, "seq": seq })
            .to_string()
            .into_bytes(),
        headers: vec![("x-test".into(), "1".into())],
    }
}

/// `n` orders keyed `k0000` … .
pub fn orders(n: u32) -> Vec<TestMessage> {
    (0..n).map(|i| order(&format!("k{i:04}"), i)).collect()
}

/// A dead letter as read back from the broker.
#[derive(Debug, Clone)]
pub struct SeenDeadLetter {
    pub payload: Vec<u8>,
    pub reason: String,
    pub attempts: String,
    pub handler: String,
    pub original_id: String,
}

/// A broker server the test owns and may kill.
pub trait PrivateServer: Send {
    /// Its URL.
    fn url(&self) -> String;
    /// Kills it (SIGKILL): no goodbye to clients.
    fn kill(&mut self);
    /// Starts it again on the same port with the same data directory.
    async fn restart(&mut self);
}

/// One real broker under test.
pub trait Broker: Sized + Send + Sync + 'static {
    type Source: Source;
    type Server: PrivateServer;
    const NAME: &'static str;
    /// Whether the message id idem sees is the producer's (AMQP
    /// `message_id`, `Nats-Msg-Id`) rather than one the broker assigns.
    const KEEPS_PRODUCER_ID: bool;
    /// Whether the broker counts deliveries, so a redelivery after a crash
    /// has attempt ≥ 2 (Kafka keeps offsets, not delivery counts).
    const COUNTS_DELIVERIES: bool = true;

    /// The fixture for the shared server (env var URL). Panics, naming the
    /// fix, when the server does not answer: the tests fail, never skip.
    async fn shared() -> Self;
    /// A fresh private server, and the fixture for it.
    async fn private() -> (Self, Self::Server);
    /// A new source (its own connections) on this fixture's server.
    fn source(&self) -> Self::Source;
    async fn publish(&self, topic: &str, messages: &[TestMessage]);
    async fn dead_letters(&self, destination: &str) -> Vec<SeenDeadLetter>;
    /// Whether the group has nothing pending or unconsumed on `topic`; the
    /// error says what is left.
    async fn settled(&self, topic: &str, group: &str) -> Result<(), String>;
    /// Proves the group has nothing pending or unconsumed on `topic`.
    async fn assert_settled(&self, topic: &str, group: &str) {
        if let Err(left) = self.settled(topic, group).await {
            panic!("{} {topic}/{group} is not settled: {left}", Self::NAME);
        }
    }
    /// Deletes what a test created on a shared server.
    async fn cleanup(&self, topic: &str);
}

// --- the source wrapper ----------------------------------------------------------

/// How the loop called ack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckCall {
    One(String),
    Many(Vec<String>),
}

#[derive(Default)]
struct ProbeState {
    lose: HashMap<String, u32>,
    lost: u32,
    acked: HashSet<String>,
    dead: HashSet<String>,
    ack_calls: Vec<AckCall>,
    fetched: Vec<Vec<String>>,
    seen: Vec<(String, u32)>,
    /// Deliveries whose `x-test: 1` header did not come through.
    headerless: u32,
    crash: Option<(String, oneshot::Sender<()>)>,
}

/// What a [`TestSource`] saw and is told to do; shared by the test and the wrapper.
pub struct Probe {
    pub suffix: String,
    state: Mutex<ProbeState>,
    changed: watch::Sender<u64>,
}

/// The order key of a delivery, or its id when the payload is not an order.
pub fn key_of(d: &Delivery) -> String {
    serde_json::from_slice::<serde_json::Value>(&d.payload)
        .ok()
        .and_then(|v| v.get("order_id")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| d.id.to_string())
}

impl Probe {
    pub fn new() -> Arc<Probe> {
        Arc::new(Probe {
            suffix: format!("{:08x}", fastrand::u32(..)),
            state: Mutex::new(ProbeState::default()),
            changed: watch::Sender::new(0),
        })
    }

    fn with<R>(&self, f: impl FnOnce(&mut ProbeState) -> R) -> R {
        let r = f(&mut self.state.lock().unwrap());
        self.changed.send_modify(|v| *v += 1);
        r
    }

    /// A second probe with the same topic and group names (a second
    /// consumer of the same group) and its own records.
    pub fn sharing(&self) -> Arc<Probe> {
        Arc::new(Probe {
            suffix: self.suffix.clone(),
            state: Mutex::new(ProbeState::default()),
            changed: watch::Sender::new(0),
        })
    }

    /// This test's name for `name` (topic or group).
    pub fn name(&self, name: &str) -> String {
        format!("{name}-{}", self.suffix)
    }

    /// The next ack of each of these keys becomes a nack: the broker
    /// redelivers a message whose effect already committed.
    pub fn lose_next_ack(&self, keys: impl IntoIterator<Item = String>) {
        self.with(|s| {
            for k in keys {
                *s.lose.entry(k).or_default() += 1;
            }
        });
    }

    /// The ack of `key` never completes; the receiver fires when it starts.
    pub fn hang_on_ack(&self, key: &str) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.with(|s| s.crash = Some((key.to_owned(), tx)));
        rx
    }

    pub fn acked(&self) -> HashSet<String> {
        self.state.lock().unwrap().acked.clone()
    }
    pub fn headerless(&self) -> u32 {
        self.state.lock().unwrap().headerless
    }
    pub fn lost_acks(&self) -> u32 {
        self.state.lock().unwrap().lost
    }
    pub fn ack_calls(&self) -> Vec<AckCall> {
        self.state.lock().unwrap().ack_calls.clone()
    }
    pub fn fetched(&self) -> Vec<Vec<String>> {
        self.state.lock().unwrap().fetched.clone()
    }
    /// (key, attempt) of every delivery, in order.
    pub fn seen(&self) -> Vec<(String, u32)> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Waits until `done` holds, failing the test after `timeout`.
    pub async fn wait_for(&self, what: &str, timeout: Duration, done: impl Fn(&Probe) -> bool) {
        let mut rx = self.changed.subscribe();
        let wait = async {
            loop {
                rx.borrow_and_update();
                if done(self) {
                    return;
                }
                // Also re-check now and then: some conditions are not about the probe.
                let _ = tokio::time::timeout(Duration::from_millis(200), rx.changed()).await;
            }
        };
        if tokio::time::timeout(timeout, wait).await.is_err() {
            let s = self.state.lock().unwrap();
            panic!(
                "timed out after {timeout:?} waiting for {what}: acked {}, dead-lettered {}, acks still to lose {}, deliveries seen {}",
                s.acked.len(),
                s.dead.len(),
                s.lose.values().sum::<u32>(),
                s.seen.len()
            );
        }
    }

    /// Waits until every key in `keys` was acked (or dead-lettered) and no
    /// ack is still to be lost.
    pub async fn wait_settled(&self, keys: &HashSet<String>, timeout: Duration) {
        self.wait_for("every message acked", timeout, |p| {
            let s = p.state.lock().unwrap();
            s.lose.values().all(|n| *n == 0)
                && keys
                    .iter()
                    .all(|k| s.acked.contains(k) || s.dead.contains(k))
        })
        .await;
    }
}

/// Wraps a broker's source for a test (see the module docs).
pub struct TestSource<S> {
    inner: S,
    probe: Arc<Probe>,
}

impl<S: Source> TestSource<S> {
    pub fn new(inner: S, probe: Arc<Probe>) -> Self {
        TestSource { inner, probe }
    }
}

impl<S: Source> Source for TestSource<S> {
    type Subscription = TestSubscription<S::Subscription>;

    async fn subscribe(&self, spec: SubscribeSpec<'_>) -> Result<Self::Subscription, SourceError> {
        let topic = self.probe.name(spec.topic);
        let group = self.probe.name(spec.group);
        let dead_letter = spec.dead_letter.map(|d| self.probe.name(d));
        let inner = self
            .inner
            .subscribe(SubscribeSpec {
                topic: &topic,
                group: &group,
                dead_letter: dead_letter.as_deref(),
                prefetch: spec.prefetch,
            })
            .await?;
        Ok(TestSubscription {
            inner,
            probe: self.probe.clone(),
        })
    }
}

pub struct TestSubscription<S> {
    inner: S,
    probe: Arc<Probe>,
}

impl<S: Subscription> TestSubscription<S> {
    /// Whether this ack must hang (the test crashes the consumer now).
    fn crash_here(&self, keys: &[String]) -> bool {
        let mut s = self.probe.state.lock().unwrap();
        let hit = s
            .crash
            .as_ref()
            .is_some_and(|(k, _)| keys.iter().any(|x| x == k));
        if hit && let Some((_, tx)) = s.crash.take() {
            let _ = tx.send(());
        }
        hit
    }

    fn take_lose(&self, key: &str) -> bool {
        self.probe.with(|s| match s.lose.get_mut(key) {
            Some(n) if *n > 0 => {
                *n -= 1;
                s.lost += 1;
                true
            }
            _ => false,
        })
    }
}

impl<S: Subscription> Subscription for TestSubscription<S> {
    async fn fetch(&self, max: usize) -> Result<Vec<Delivery>, SourceError> {
        let batch = self.inner.fetch(max).await?;
        if !batch.is_empty() {
            self.probe.with(|s| {
                let keys: Vec<String> = batch.iter().map(key_of).collect();
                s.seen
                    .extend(keys.iter().cloned().zip(batch.iter().map(|d| d.attempt)));
                s.headerless += batch
                    .iter()
                    .filter(|d| d.header("X-Test") != Some(&b"1"[..]))
                    .count() as u32;
                s.fetched.push(keys);
            });
        }
        Ok(batch)
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), SourceError> {
        let key = key_of(delivery);
        if self.crash_here(std::slice::from_ref(&key)) {
            std::future::pending::<()>().await;
        }
        if self.take_lose(&key) {
            return self.inner.nack(delivery, Duration::ZERO).await;
        }
        self.inner.ack(delivery).await?;
        self.probe.with(|s| {
            s.acked.insert(key.clone());
            s.ack_calls.push(AckCall::One(key));
        });
        Ok(())
    }

    async fn ack_many(&self, deliveries: &[&Delivery]) -> Result<(), SourceError> {
        let keys: Vec<String> = deliveries.iter().map(|d| key_of(d)).collect();
        if self.crash_here(&keys) {
            std::future::pending::<()>().await;
        }
        let mut rest = Vec::with_capacity(deliveries.len());
        let mut rest_keys = Vec::with_capacity(deliveries.len());
        for (d, k) in deliveries.iter().zip(keys) {
            if self.take_lose(&k) {
                self.inner.nack(d, Duration::ZERO).await?;
            } else {
                rest.push(*d);
                rest_keys.push(k);
            }
        }
        if rest.is_empty() {
            return Ok(());
        }
        self.inner.ack_many(&rest).await?;
        self.probe.with(|s| {
            s.acked.extend(rest_keys.iter().cloned());
            s.ack_calls.push(AckCall::Many(rest_keys));
        });
        Ok(())
    }

    async fn nack(&self, delivery: &Delivery, delay: Duration) -> Result<(), SourceError> {
        self.inner.nack(delivery, delay).await
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery,
        letter: &DeadLetter,
    ) -> Result<(), SourceError> {
        self.inner.dead_letter(delivery, letter).await?;
        self.probe.with(|s| {
            s.dead.insert(key_of(delivery));
        });
        Ok(())
    }

    async fn close(&self) {
        self.inner.close().await;
    }
}

// --- running ---------------------------------------------------------------------

/// A runtime running in its own task.
pub struct Running<S: Source> {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Runtime<TestSource<S>>>,
}

/// Builds a runtime over `source` for `handler` with a shared store and
/// starts it in a task.
pub fn start<S: Source>(source: TestSource<S>, store: &SqliteStore, handler: &str) -> Running<S> {
    init_logs();
    let runtime = Runtime::builder(source)
        .store(store.clone())
        .handlers([handler])
        .concurrency(16)
        .shutdown_timeout(Duration::from_secs(10))
        .outage_backoff(Backoff {
            min: Duration::from_millis(20),
            max: Duration::from_millis(500),
        })
        .build()
        .expect("build runtime");
    let stop = CancellationToken::new();
    let s = stop.clone();
    let task = tokio::spawn(async move {
        runtime.run(s).await;
        runtime
    });
    Running { stop, task }
}

impl<S: Source> Running<S> {
    /// Stops gracefully; returns the handler's counters.
    pub async fn stop(self, handler: &str) -> idem::Stats {
        self.stop.cancel();
        let runtime = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the runtime did not shut down within 30 s")
            .expect("runtime task");
        runtime.stats_of(handler).expect("handler stats")
    }

    /// Kills the runtime's task: no shutdown, no acks, connections dropped.
    pub async fn abort(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

async fn within<F: Future>(what: &str, timeout: Duration, f: F) -> F::Output {
    tokio::time::timeout(timeout, f)
        .await
        .unwrap_or_else(|_| panic!("timed out after {timeout:?}: {what}"))
}

fn assert_exactly_once(counts: &BTreeMap<String, i64>, keys: &HashSet<String>) {
    let wrong: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        wrong.is_empty(),
        "effects applied more than once: {wrong:?}"
    );
    let missing: Vec<_> = keys.iter().filter(|k| !counts.contains_key(*k)).collect();
    assert!(missing.is_empty(), "effects missing: {missing:?}");
    assert_eq!(counts.len(), keys.len(), "unexpected effects");
}

fn keys_of(messages: &[TestMessage]) -> HashSet<String> {
    messages
        .iter()
        .map(|m| {
            serde_json::from_slice::<serde_json::Value>(&m.payload).unwrap()["order_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

const LONG: Duration = Duration::from_secs(120);

// --- the scenarios ------------------------------------------------------------------

/// 1,000 messages, each delivered, plus 300 forced redeliveries of messages
/// whose effect already committed (their first ack turned into a nack):
/// 1,000 effects, 300 duplicates, and the ack calls the mode promises.
pub async fn thousand_with_redeliveries<B: Broker>(handler: &'static str) {
    let b = B::shared().await;
    let probe = Probe::new();
    let topic = probe.name(TOPIC);
    let messages = orders(1000);
    let keys = keys_of(&messages);
    // Three keys in every ten: 300 forced redeliveries.
    let forced: Vec<String> = messages
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 10 < 3)
        .map(|(i, _)| format!("k{i:04}"))
        .collect();
    assert_eq!(forced.len(), 300);
    probe.lose_next_ack(forced.iter().cloned());
    b.publish(&topic, &messages).await;

    let store = common::sqlite().await;
    let run = start(TestSource::new(b.source(), probe.clone()), &store, handler);
    probe.wait_settled(&keys, LONG).await;
    let stats = run.stop(handler).await;

    assert_exactly_once(&common::effect_counts(&store, handler).await, &keys);
    assert_eq!(probe.lost_acks(), 300);
    assert_eq!(
        probe.headerless(),
        0,
        "the producer's headers reach the handler"
    );
    assert_eq!(stats.processed, 1000, "{stats:?}");
    assert_eq!(stats.duplicate, 300, "{stats:?}");
    assert_eq!(stats.dead_lettered, 0, "{stats:?}");
    // Each forced redelivery came back as the broker's second delivery.
    let forced: HashSet<String> = forced.into_iter().collect();
    let mut attempts: HashMap<String, Vec<u32>> = HashMap::new();
    for (k, a) in probe.seen() {
        attempts.entry(k).or_default().push(a);
    }
    for k in &keys {
        let want: &[u32] = if forced.contains(k) { &[1, 2] } else { &[1] };
        assert_eq!(
            attempts.get(k).map(Vec::as_slice),
            Some(want),
            "attempts of {k}"
        );
    }
    // The ack calls match the mode.
    let calls = probe.ack_calls();
    match handler {
        "bk-auto" | "bk-immediate" => assert!(
            calls.iter().all(|c| matches!(c, AckCall::One(_))),
            "{handler}: every ack is sent alone, as soon as its message committed"
        ),
        "bk-manual" => {
            // Queued until the whole fetched batch is done, then sent together:
            // every ack call is a subset of one fetched batch.
            let batches: Vec<HashSet<String>> = probe
                .fetched()
                .into_iter()
                .map(|b| b.into_iter().collect())
                .collect();
            for c in &calls {
                let AckCall::Many(ks) = c else {
                    panic!("manual mode acked alone: {c:?}")
                };
                assert!(
                    batches.iter().any(|b| ks.iter().all(|k| b.contains(k))),
                    "an ack call mixes fetched batches: {ks:?}"
                );
            }
            assert!(
                calls
                    .iter()
                    .any(|c| matches!(c, AckCall::Many(ks) if ks.len() > 1)),
                "manual mode never acked a batch together"
            );
        }
        "bk-batch" => assert!(
            calls
                .iter()
                .any(|c| matches!(c, AckCall::Many(ks) if ks.len() > 1)),
            "batch mode never acked a batch in one call"
        ),
        _ => {}
    }
    b.assert_settled(&topic, &probe.name(handler)).await;
    b.cleanup(&topic).await;
}

/// The consumer dies after the store committed, before the ack reached the
/// broker: the broker redelivers, the new consumer acks it as a duplicate.
pub async fn crash_before_ack<B: Broker>() {
    let handler = "bk-auto";
    let b = B::shared().await;
    let probe = Probe::new();
    let topic = probe.name(TOPIC);
    let store = common::sqlite().await;
    let crashed = probe.hang_on_ack("k-crash");
    b.publish(&topic, &[order("k-crash", 7)]).await;

    let first = start(TestSource::new(b.source(), probe.clone()), &store, handler);
    within(
        "the first consumer to commit and start its ack",
        LONG,
        crashed,
    )
    .await
    .expect("crash signal");
    first.abort().await;
    // The effect committed before the crash.
    let counts = common::effect_counts(&store, handler).await;
    assert_eq!(counts.get("k-crash"), Some(&1), "{counts:?}");
    assert!(probe.acked().is_empty());

    let second = start(TestSource::new(b.source(), probe.clone()), &store, handler);
    probe
        .wait_settled(&HashSet::from(["k-crash".to_owned()]), LONG)
        .await;
    let stats = second.stop(handler).await;
    assert_eq!(
        (stats.processed, stats.duplicate),
        (0, 1),
        "the redelivery is acked as a duplicate without running the handler: {stats:?}"
    );
    let counts = common::effect_counts(&store, handler).await;
    assert_eq!(counts.get("k-crash"), Some(&1), "{counts:?}");
    let seen = probe.seen();
    assert_eq!(seen.len(), 2, "delivered twice: {seen:?}");
    if B::COUNTS_DELIVERIES {
        assert!(
            seen[1].1 >= 2,
            "the redelivery counts as attempt ≥ 2: {seen:?}"
        );
    }
    b.assert_settled(&topic, &probe.name(handler)).await;
    b.cleanup(&topic).await;
}

/// Two consumers in one group share the work; the union of their effects is
/// exactly once.
pub async fn two_consumers_share_a_group<B: Broker>() {
    let handler = "bk-auto";
    let b = B::shared().await;
    let probe_a = Probe::new();
    // Same names for both consumers: the suffix is the group's.
    let probe_b = Arc::new(Probe {
        suffix: probe_a.suffix.clone(),
        state: Mutex::new(ProbeState::default()),
        changed: watch::Sender::new(0),
    });
    let topic = probe_a.name(TOPIC);
    let messages = orders(1000);
    let keys = keys_of(&messages);
    let store = common::sqlite().await;
    // Both consumers join before the messages arrive, so neither gets them all.
    let a = start(
        TestSource::new(b.source(), probe_a.clone()),
        &store,
        handler,
    );
    let c = start(
        TestSource::new(b.source(), probe_b.clone()),
        &store,
        handler,
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    b.publish(&topic, &messages).await;
    let union_done = {
        let (pa, pb) = (probe_a.clone(), probe_b.clone());
        let keys = keys.clone();
        move || {
            let (x, y) = (pa.acked(), pb.acked());
            keys.iter().all(|k| x.contains(k) || y.contains(k))
        }
    };
    probe_a
        .wait_for("both consumers together acked every message", LONG, |_| {
            union_done()
        })
        .await;
    let sa = a.stop(handler).await;
    let sb = c.stop(handler).await;
    assert_exactly_once(&common::effect_counts(&store, handler).await, &keys);
    assert!(
        sa.processed > 0 && sb.processed > 0,
        "both consumers must get work: {} and {}",
        sa.processed,
        sb.processed
    );
    assert_eq!(sa.processed + sb.processed, 1000, "{sa:?} {sb:?}");
    b.assert_settled(&topic, &probe_a.name(handler)).await;
    b.cleanup(&topic).await;
}

/// An undecodable message and one the handler always refuses end in the dead
/// letters with reason, attempts, handler and original id; the good ones pass.
pub async fn poison_goes_to_dead_letters<B: Broker>() {
    let handler = "bk-auto";
    let b = B::shared().await;
    let probe = Probe::new();
    let topic = probe.name(TOPIC);
    let mut messages = orders(20);
    let mut undecodable = order("x", 0);
    undecodable.id = "m-undecodable".into();
    undecodable.payload = b"{\"order_id\": \"k-truncated\", \"seq\": ".to_vec();
    messages.push(undecodable.clone());
    messages.push(order("refuse-1", 1));
    let good = keys_of(&messages[..20]);
    b.publish(&topic, &messages).await;
    let store = common::sqlite().await;
    let run = start(TestSource::new(b.source(), probe.clone()), &store, handler);
    let dlq = format!("{topic}.dlq");
    probe.wait_settled(&good, LONG).await;
    probe
        .wait_for("both poison messages dead-lettered", LONG, |p| {
            p.state.lock().unwrap().dead.len() == 2
        })
        .await;
    let stats = run.stop(handler).await;
    assert_exactly_once(&common::effect_counts(&store, handler).await, &good);
    assert_eq!(stats.dead_lettered, 2, "{stats:?}");

    let letters = within("reading the dead letters", LONG, b.dead_letters(&dlq)).await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    let bad = letters
        .iter()
        .find(|l| l.payload == undecodable.payload)
        .unwrap_or_else(|| {
            panic!("the undecodable message is not in the dead letters: {letters:?}")
        });
    assert!(bad.reason.starts_with("undecodable payload"), "{bad:?}");
    assert_eq!(bad.attempts, "1", "{bad:?}");
    assert_eq!(bad.handler, handler, "{bad:?}");
    if B::KEEPS_PRODUCER_ID {
        assert_eq!(bad.original_id, "m-undecodable", "{bad:?}");
    } else {
        assert!(!bad.original_id.is_empty(), "{bad:?}");
    }
    let refused = letters
        .iter()
        .find(|l| l.payload == messages[21].payload)
        .unwrap_or_else(|| panic!("the refused order is not in the dead letters: {letters:?}"));
    assert!(
        refused.reason.contains("refused by the business rules")
            && refused.reason.contains("gave up after 3 attempts"),
        "{refused:?}"
    );
    assert_eq!(refused.attempts, "3", "{refused:?}");
    b.assert_settled(&topic, &probe.name(handler)).await;
    b.cleanup(&topic).await;
}

/// A handler that runs longer than the broker lets a message sit unacked
/// (Redis: the claim idle time; JetStream: `ack_wait`) keeps its message:
/// the source keeps it alive, so it is delivered once.
pub async fn long_handler_is_kept_alive<B: Broker>(runs_for: Duration) {
    let handler = "bk-slow";
    let b = B::shared().await;
    let probe = Probe::new();
    let topic = probe.name(TOPIC);
    let ms = u32::try_from(runs_for.as_millis()).unwrap();
    b.publish(&topic, &[order("k-slow", ms)]).await;
    let store = common::sqlite().await;
    let run = start(TestSource::new(b.source(), probe.clone()), &store, handler);
    probe
        .wait_settled(&HashSet::from(["k-slow".to_owned()]), LONG)
        .await;
    // Past the point where an unkept message would have come back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = run.stop(handler).await;
    assert_eq!(
        probe.seen(),
        vec![("k-slow".to_owned(), 1)],
        "delivered once, not taken back while the handler ran"
    );
    assert_eq!((stats.processed, stats.duplicate), (1, 0), "{stats:?}");
    b.assert_settled(&topic, &probe.name(handler)).await;
    b.cleanup(&topic).await;
}

/// The broker is killed mid-run and started again on the same port: the
/// source reconnects with backoff, nothing is lost, nothing applied twice.
pub async fn reconnect_after_restart<B: Broker>() {
    let handler = "bk-auto";
    let (b, mut server) = B::private().await;
    let probe = Probe::new();
    let topic = probe.name(TOPIC);
    let first = orders(400);
    let second: Vec<TestMessage> = (400..600).map(|i| order(&format!("k{i:04}"), i)).collect();
    let mut keys = keys_of(&first);
    keys.extend(keys_of(&second));
    b.publish(&topic, &first).await;
    let store = common::sqlite().await;
    let run = start(TestSource::new(b.source(), probe.clone()), &store, handler);
    probe
        .wait_for("the first 50 acks", LONG, |p| p.acked().len() >= 50)
        .await;
    server.kill();
    let acked_at_kill = probe.acked().len();
    eprintln!("killed the {} server after {acked_at_kill} acks", B::NAME);
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.restart().await;
    b.publish(&topic, &second).await;
    // An ack that reached the broker just before the kill may have lost its
    // reply, so the probe cannot be the judge here: wait for every effect
    // and for the broker to have nothing pending.
    let group = probe.name(handler);
    within("every effect applied and the broker settled", LONG, async {
        loop {
            let effects = common::effect_counts(&store, handler).await;
            if effects.len() == keys.len() && b.settled(&topic, &group).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let stats = run.stop(handler).await;
    assert!(
        acked_at_kill < 600,
        "the server must die mid-run (acked {acked_at_kill} of 600 before the kill)"
    );
    assert_exactly_once(&common::effect_counts(&store, handler).await, &keys);
    assert_eq!(stats.processed, 600, "{stats:?}");
    b.assert_settled(&topic, &probe.name(handler)).await;
}

/// A consumer is stopped in the middle of a burst (deliveries prefetched,
/// handlers running, acks in flight), a second one finishes the work and
/// stops: nothing is lost or applied twice, and neither shutdown logs a
/// warning or an error, from idem or from the broker's client. (RabbitMQ
/// used to, when its queue was deleted right after: lapin's `AMQP hard
/// error: UNEXPECTED-FRAME: unexpected basic cancel-ok`; `tests/rabbitmq.rs`
/// has that case.)
///
/// `test` is the calling test's path (`module_path!()::name`): the scenario
/// runs in a child process that runs that test alone (see [`alone`]), so the
/// captured log holds this scenario's lines only.
pub async fn clean_shutdown_logs_nothing<B: Broker>(test: &str) {
    if !alone(test).await {
        return;
    }
    let logs = init_logs().expect("the log capture is the global subscriber of this process");
    let handler = "bk-auto";
    let b = B::shared().await;
    let probe = Probe::new();
    let topic = probe.name(TOPIC);
    let messages = orders(1000);
    let keys = keys_of(&messages);
    let store = common::sqlite().await;
    b.publish(&topic, &messages).await;

    let first = start(TestSource::new(b.source(), probe.clone()), &store, handler);
    probe
        .wait_for("the first 50 acks", LONG, |p| p.acked().len() >= 50)
        .await;
    let s1 = first.stop(handler).await;
    let second = start(TestSource::new(b.source(), probe.clone()), &store, handler);
    probe.wait_settled(&keys, LONG).await;
    let s2 = second.stop(handler).await;
    // (Kafka's commits are only final once its consumers closed.)
    b.assert_settled(&topic, &probe.name(handler)).await;
    b.cleanup(&topic).await;

    assert!(
        s1.processed < 1000,
        "the first consumer must stop mid-burst (it processed all 1000)"
    );
    assert_exactly_once(&common::effect_counts(&store, handler).await, &keys);
    assert_eq!(s1.processed + s2.processed, 1000, "{s1:?} {s2:?}");
    let lines = std::mem::take(&mut *logs.lock().unwrap());
    assert!(
        lines.is_empty(),
        "{} logged warnings or errors around a clean shutdown:\n{}",
        B::NAME,
        lines.join("\n")
    );
}

// --- captured logs ---------------------------------------------------------------

/// Set in the child process [`alone`] starts.
const ALONE: &str = "IDEM_BROKER_TEST_ALONE";

/// Whether this process runs `test` alone. If not, runs this test binary
/// again with only `test` (libtest `--exact`) and `ALONE` set, fails when
/// that child fails or ran no test, and returns false.
///
/// Logs are process-wide (lapin logs from its own I/O thread), so a test
/// that asserts on them cannot share its process with other tests.
pub async fn alone(test: &str) -> bool {
    if std::env::var_os(ALONE).is_some() {
        return true;
    }
    // libtest names a test by its path without the crate.
    let name = test.split_once("::").map_or(test, |(_, n)| n);
    let exe = std::env::current_exe().expect("the path of this test binary");
    let out = tokio::process::Command::new(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(ALONE, "1")
        .output()
        .await
        .expect("run this test binary again");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{name}, run alone, failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    false
}

type Lines = std::sync::Mutex<Vec<String>>;

static CAPTURED: Lines = Mutex::new(Vec::new());
static LOGS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Installs the process's log subscriber once: `RUST_LOG` lines (e.g.
/// `RUST_LOG=idem=debug`) to the test output, and every WARN and ERROR
/// event, from any crate and any thread, `log` records included, into a
/// buffer. Returns the buffer, or `None` when another subscriber was
/// installed first (then nothing is captured).
pub fn init_logs() -> Option<&'static Lines> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let installed = *LOGS.get_or_init(|| {
        tracing_subscriber::registry()
            .with(
                tracing_subscriber::fmt::layer()
                    .with_test_writer()
                    .with_filter(tracing_subscriber::EnvFilter::from_default_env()),
            )
            .with(Capture(&CAPTURED).with_filter(tracing_subscriber::filter::LevelFilter::WARN))
            .try_init()
            .is_ok()
    });
    installed.then_some(&CAPTURED)
}

/// Writes each event it sees as one line: level, target, fields.
struct Capture(&'static Lines);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let meta = event.metadata();
        let mut line = format!("{} {}:", meta.level(), meta.target());
        event.record(&mut Fields(&mut line));
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
    }
}

struct Fields<'a>(&'a mut String);

impl tracing::field::Visit for Fields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        let _ = write!(self.0, " {}={value:?}", field.name());
    }
}

// --- stamping the scenarios --------------------------------------------------------

/// Stamps the shared scenarios as `#[tokio::test]` functions for one broker
/// (a [`Broker`] type; its `shared()`/`private()` are the setup):
/// `broker_suite!(Rabbit);` stamps them all, `broker_suite!(KafkaBroker:
/// thousand_with_redeliveries, poison_goes_to_dead_letters);` only those
/// named. Call it once per broker test file, at its root; tests only one
/// broker has stay beside it.
#[rustfmt::skip]
macro_rules! broker_suite {
    (@ thousand_with_redeliveries $b:ty) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn thousand_messages_with_300_redeliveries_auto() {
            $crate::brokers::thousand_with_redeliveries::<$b>("bk-auto").await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn thousand_messages_with_300_redeliveries_manual() {
            $crate::brokers::thousand_with_redeliveries::<$b>("bk-manual").await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn thousand_messages_with_300_redeliveries_manual_immediate() {
            $crate::brokers::thousand_with_redeliveries::<$b>("bk-immediate").await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn thousand_messages_with_300_redeliveries_batch() {
            $crate::brokers::thousand_with_redeliveries::<$b>("bk-batch").await;
        }
    };
    (@ crash_before_ack $b:ty) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn crash_after_commit_before_ack_is_redelivered_and_acked_as_duplicate() {
            $crate::brokers::crash_before_ack::<$b>().await;
        }
    };
    (@ two_consumers_share_a_group $b:ty) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn two_consumers_in_one_group_split_the_work() {
            $crate::brokers::two_consumers_share_a_group::<$b>().await;
        }
    };
    (@ poison_goes_to_dead_letters $b:ty) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn poison_messages_go_to_the_dead_letters() {
            $crate::brokers::poison_goes_to_dead_letters::<$b>().await;
        }
    };
    (@ reconnect_after_restart $b:ty) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn reconnects_after_the_server_restarts() {
            $crate::brokers::reconnect_after_restart::<$b>().await;
        }
    };
    (@ clean_shutdown_logs_nothing $b:ty) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn shutdown_mid_burst_logs_no_warning_or_error() {
            $crate::brokers::clean_shutdown_logs_nothing::<$b>(
                concat!(module_path!(), "::shutdown_mid_burst_logs_no_warning_or_error"),
            )
            .await;
        }
    };
    ($broker:ty) => {
        $crate::brokers::broker_suite!($broker:
            thousand_with_redeliveries,
            crash_before_ack,
            two_consumers_share_a_group,
            poison_goes_to_dead_letters,
            reconnect_after_restart,
            clean_shutdown_logs_nothing
        );
    };
    ($broker:ty: $($scenario:ident),+ $(,)?) => {
        $( $crate::brokers::broker_suite!(@ $scenario $broker); )+
    };
}
pub(crate) use broker_suite;

// --- helpers for fixtures ------------------------------------------------------------

/// A free TCP port on the loopback interface.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits until something accepts connections on 127.0.0.1:`port`.
pub async fn wait_port(port: u16, timeout: Duration) {
    within(
        &format!("a server to listen on port {port}"),
        timeout,
        async {
            while tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        },
    )
    .await
}

/// A fresh temporary directory (removed by [`TempDir`]'s drop).
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "{prefix}-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        ));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server process started by a test, killed on drop.
///
/// Never kill a process group with `kill -KILL -<pgid>` here: procps-ng
/// 4.0.2's `kill` turns that into `kill(-1, SIGKILL)` (every process of the
/// user). Servers behind a wrapper script name their real pid in a pid file.
pub struct Process {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Where the server writes its own pid (when `program` is a wrapper).
    pub pid_file: Option<std::path::PathBuf>,
    pub child: Option<std::process::Child>,
}

impl Process {
    pub fn spawn(program: &str, args: Vec<String>) -> Process {
        Self::spawn_with_env(program, args, Vec::new(), None)
    }

    pub fn spawn_with_env(
        program: &str,
        args: Vec<String>,
        env: Vec<(String, String)>,
        pid_file: Option<std::path::PathBuf>,
    ) -> Process {
        let mut p = Process {
            program: program.into(),
            args,
            env,
            pid_file,
            child: None,
        };
        p.start();
        p
    }

    pub fn start(&mut self) {
        if let Some(f) = &self.pid_file {
            let _ = std::fs::remove_file(f);
        }
        let child = std::process::Command::new(&self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {}: {e}; install it (scripts/services.sh does) or put it on PATH",
                    self.program
                )
            });
        self.child = Some(child);
    }

    /// SIGKILL: no goodbye to clients.
    pub fn kill(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        if let Some(pid) = self
            .pid_file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .and_then(|s| s.trim().parse::<u32>().ok())
            .filter(|pid| *pid > 1)
        {
            // The shell's builtin kill, with a positive pid.
            let _ = std::process::Command::new("sh")
                .args(["-c", &format!("kill -KILL {pid}")])
                .status();
            let proc_dir = std::path::PathBuf::from(format!("/proc/{pid}"));
            for _ in 0..100 {
                if !proc_dir.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}
