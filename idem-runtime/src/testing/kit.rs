//! [`TestKit`]: one handler, the in-memory broker, your store, and the
//! delivery schedules that break naive consumers.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::crash::{CrashSwitch, KitBroker};
use crate::binding::BuildError;
use crate::handler::HandlerMeta;
use crate::metrics::Stats;
use crate::runtime::{Registry, Runtime, RuntimeBuilder};
use crate::source::memory::{BrokerEvent, DeadLetterRecord, Faults, MemoryBroker, Message};
use crate::store::DedupStore;
use crate::store::memory::MemoryStore;

/// How long a scenario may take before the kit fails it, unless
/// [`TestKitBuilder::deadline`] says otherwise.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);

type Register = Box<dyn FnOnce(RuntimeBuilder<KitBroker>) -> RuntimeBuilder<KitBroker> + Send>;

/// Runs one `#[idempotent]` handler against the in-memory broker and a
/// store, one delivery scenario at a time, and reports what happened.
///
/// The kit finds the handler by its `name = "…"` among the handlers linked
/// into the test binary. An integration test (`tests/*.rs`) links your
/// library crate only if it uses an item of it: one that only names its
/// handlers needs `use my_crate as _;` (the kit's error says so).
///
/// Each scenario publishes its messages, runs the handler's consumer until
/// the broker has settled all of them (or the deadline passes: then it
/// panics with what happened so far), and returns a [`Report`]. Scenarios
/// on one kit run one after another and share the store, so give each its
/// own key unless a scenario is about a key already done.
///
/// ```standalone_crate
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idem_runtime::testing::KitError> {
/// use std::sync::atomic::{AtomicU32, Ordering};
/// use idem::idempotent;
/// use idem::testing::{Message, TestKit};
///
/// static SENT: AtomicU32 = AtomicU32::new(0);
///
/// #[derive(serde::Deserialize)]
/// struct Invoice { invoice_id: String }
///
/// #[idempotent(topic = "invoices", key = "invoice_id", store = "memory", name = "send-invoice")]
/// async fn send_invoice(_invoice: Invoice) -> Result<(), String> {
///     SENT.fetch_add(1, Ordering::SeqCst);
///     Ok(())
/// }
///
/// let kit = TestKit::new("send-invoice")?; // `store = "memory"`: the kit brings a MemoryStore
/// kit.deliver_twice(Message::new(r#"{"invoice_id": "i-1"}"#))
///     .await
///     .assert_effect_once()
///     .assert_duplicates(1);
/// assert_eq!(SENT.load(Ordering::SeqCst), 1);
/// # Ok(()) }
/// ```
pub struct TestKit {
    meta: &'static HandlerMeta,
    runtime: Runtime<KitBroker>,
    broker: MemoryBroker,
    crash: Arc<CrashSwitch>,
    dead_letter: String,
    deadline: Duration,
    next_id: AtomicU64,
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl fmt::Debug for TestKit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestKit")
            .field("handler", &self.meta.name)
            .finish_non_exhaustive()
    }
}

/// Builds a [`TestKit`]: [`TestKit::builder`].
pub struct TestKitBuilder {
    handler: String,
    stores: Vec<Register>,
    faults: Faults,
    deadline: Duration,
    concurrency: Option<usize>,
}

impl fmt::Debug for TestKitBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestKitBuilder")
            .field("handler", &self.handler)
            .field("stores", &self.stores.len())
            .field("faults", &self.faults)
            .field("deadline", &self.deadline)
            .finish()
    }
}

impl TestKit {
    /// A kit for the handler named `handler` (its `name = "…"`, or its fn
    /// name), with a fresh [`MemoryStore`] and nothing else: enough for
    /// handlers on `store = "memory"` or without a store. Other stores go
    /// through [`TestKit::builder`].
    pub fn new(handler: &str) -> Result<TestKit, KitError> {
        Self::builder(handler).build()
    }

    /// Starts a kit for the handler named `handler`.
    ///
    /// ```standalone_crate
    /// # #[cfg(feature = "sqlite")]
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use idem::{Tx, idempotent};
    /// use idem::store::sqlite::SqliteStore;
    /// use idem::testing::{Message, TestKit};
    ///
    /// #[derive(serde::Deserialize)]
    /// struct OrderPlaced { order_id: String, amount_cents: i64 }
    ///
    /// #[idempotent(topic = "orders", key = "order_id", store = "sqlite", name = "place-order")]
    /// async fn place_order(order: OrderPlaced, tx: &mut Tx<'_>) -> Result<(), sqlx::Error> {
    ///     sqlx::query("INSERT INTO orders (id, amount_cents) VALUES (?, ?)")
    ///         .bind(&order.order_id)
    ///         .bind(order.amount_cents)
    ///         .execute(&mut **tx)
    ///         .await?;
    ///     Ok(())
    /// }
    ///
    /// let store = SqliteStore::open("sqlite::memory:").await?;
    /// store.migrate().await?;
    /// sqlx::query("CREATE TABLE orders (id TEXT PRIMARY KEY, amount_cents INTEGER)")
    ///     .execute(store.pool())
    ///     .await?;
    /// let kit = TestKit::builder("place-order").store(store.clone()).build()?;
    ///
    /// let order = |id: &str| Message::new(format!(r#"{{"order_id": "{id}", "amount_cents": 1250}}"#));
    /// kit.deliver_twice(order("o-1")).await.assert_effect_once();
    /// kit.deliver_with_lost_ack(order("o-2")).await.assert_effect_once();
    /// kit.deliver_with_crash_before_ack(order("o-3")).await.assert_effect_once();
    /// kit.deliver(Message::new("{not json")).await.assert_dead_lettered("undecodable payload");
    ///
    /// let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM orders").fetch_one(store.pool()).await?;
    /// assert_eq!(rows, 3);
    /// # Ok(()) }
    /// # #[cfg(not(feature = "sqlite"))] fn main() {}
    /// ```
    pub fn builder(handler: &str) -> TestKitBuilder {
        TestKitBuilder {
            handler: handler.to_owned(),
            stores: Vec::new(),
            faults: Faults::default(),
            deadline: DEFAULT_DEADLINE,
            concurrency: None,
        }
    }

    /// The handler's settings (topic, store, ack mode, retries, …).
    pub fn handler(&self) -> &'static HandlerMeta {
        self.meta
    }

    /// The broker, with every event of every scenario so far
    /// ([`MemoryBroker::events`]) and the dead letters.
    pub fn broker(&self) -> &MemoryBroker {
        &self.broker
    }

    /// The handler's counters over all scenarios so far.
    pub fn stats(&self) -> Stats {
        self.runtime.stats_of(self.meta.name).unwrap_or_default()
    }

    /// The registered store of type `S`, e.g. the kit's own `MemoryStore`.
    pub fn store<S: Send + Sync + 'static>(&self) -> Option<Arc<S>> {
        self.runtime.store::<S>()
    }

    /// Delivers `message` once.
    pub async fn deliver(&self, message: Message) -> Report {
        self.scenario(Scenario::Once, vec![message]).await
    }

    /// Delivers `message` twice, with one message id: a broker duplicate.
    /// Exactly once: the first delivery is processed, the second acked as a
    /// duplicate without running the handler.
    pub async fn deliver_twice(&self, message: Message) -> Report {
        let message = self.with_id(message);
        self.scenario(Scenario::Twice, vec![message.clone(), message])
            .await
    }

    /// Delivers `message`; the ack after its processing is lost on the
    /// wire, so the broker delivers it again to the same consumer.
    pub async fn deliver_with_lost_ack(&self, message: Message) -> Report {
        self.scenario(Scenario::LostAck, vec![message]).await
    }

    /// Delivers `message`; the consumer dies after the store committed and
    /// before the broker got the ack. The kit stops the runtime, the broker
    /// takes the delivery back (a `Nacked` event), and a restarted runtime
    /// (a new consumer loop on the same store) gets the message again.
    pub async fn deliver_with_crash_before_ack(&self, message: Message) -> Report {
        self.scenario(Scenario::CrashBeforeAck, vec![message]).await
    }

    /// Delivers several messages in one run: a producer's retries (same
    /// key, new message id, a re-serialised payload), poison among good
    /// messages, a batch.
    pub async fn deliver_all(&self, messages: impl IntoIterator<Item = Message>) -> Report {
        self.scenario(Scenario::All, messages.into_iter().collect())
            .await
    }

    fn with_id(&self, mut message: Message) -> Message {
        if message.id.is_none() {
            let n = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
            message.id = Some(format!("{}-{n}", self.meta.name));
        }
        message
    }

    async fn scenario(&self, scenario: Scenario, messages: Vec<Message>) -> Report {
        let _one = self.one_at_a_time.lock().await;
        let (stats, events, dead_letters) = (
            self.stats(),
            self.broker.events().len(),
            self.broker.dead_letters(&self.dead_letter).len(),
        );
        let mut ids = Vec::with_capacity(messages.len());
        for message in messages {
            let message = self.with_id(message);
            let id = message.id.clone().unwrap_or_default();
            self.broker.publish(self.meta.topic, message);
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        let first = ids.first().cloned().unwrap_or_default();
        let mut restarts = 0;
        match scenario {
            Scenario::LostAck => self.broker.lose_next_acks(self.meta.topic, &first, 1),
            Scenario::CrashBeforeAck => {
                self.crash.arm(&first);
                self.run_until(
                    scenario,
                    "the consumer acked the message",
                    self.crash.fired(),
                )
                .await;
                if let Err(e) = self.crash.hand_back().await {
                    panic!("the in-memory broker refused to take the delivery back: {e}");
                }
                restarts = 1;
            }
            Scenario::Once | Scenario::Twice | Scenario::All => {}
        }
        self.run_until(
            scenario,
            "the broker settled every message",
            self.broker.wait_idle(),
        )
        .await;
        let after = self.stats();
        Report {
            handler: self.meta.name,
            scenario,
            ids,
            stats: Stats {
                received: after.received - stats.received,
                processed: after.processed - stats.processed,
                duplicate: after.duplicate - stats.duplicate,
                failed: after.failed - stats.failed,
                retried: after.retried - stats.retried,
                dead_lettered: after.dead_lettered - stats.dead_lettered,
                in_flight: after.in_flight,
            },
            events: self.broker.events().split_off(events),
            dead_letters: self
                .broker
                .dead_letters(&self.dead_letter)
                .split_off(dead_letters),
            restarts,
        }
    }

    /// Runs the consumer until `done`, or fails the scenario at the deadline.
    async fn run_until(&self, scenario: Scenario, what: &str, done: impl Future<Output = ()>) {
        let stop = CancellationToken::new();
        let mut in_time = true;
        let watch = async {
            in_time = tokio::time::timeout(self.deadline, done).await.is_ok();
            stop.cancel();
        };
        tokio::join!(self.runtime.run(stop.clone()), watch);
        if !in_time {
            panic!(
                "idem test kit: handler {:?}, scenario \"{scenario}\": not done within {:?} (waiting until {what}); stats {:?}; broker events: {:#?}",
                self.meta.name,
                self.deadline,
                self.stats(),
                self.broker.events()
            );
        }
    }
}

impl TestKitBuilder {
    /// Registers the store the handler uses (any [`LeaseStore`] or
    /// [`TxStore`]; keep a clone to look at your tables afterwards). A
    /// handler on `store = "memory"` gets a fresh [`MemoryStore`] unless you
    /// register one.
    ///
    /// [`LeaseStore`]: crate::store::LeaseStore
    /// [`TxStore`]: crate::store::TxStore
    pub fn store<T: DedupStore<M>, M>(mut self, store: T) -> Self {
        self.stores.push(Box::new(move |b| b.store(store)));
        self
    }

    /// Lets the broker misbehave on its own as well: random duplicates, lost
    /// acks, reordering, from a seed ([`Faults`]).
    pub fn faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }

    /// How long one scenario may take (default 30 s) before the kit fails it
    /// with the broker's events so far.
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Deliveries processed at once (the runtime's default otherwise).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = Some(n);
        self
    }

    /// Binds the handler to its store, as `Runtime::build` does (a missing
    /// store or an unknown handler name is an error that says so).
    pub fn build(self) -> Result<TestKit, KitError> {
        let handler = self.handler.clone();
        self.try_build()
            .map_err(|source| KitError { source, handler })
    }

    fn try_build(self) -> Result<TestKit, BuildError> {
        let broker = MemoryBroker::with_faults(self.faults);
        let crash = Arc::new(CrashSwitch::default());
        let source = KitBroker {
            broker: broker.clone(),
            crash: crash.clone(),
        };
        let mut builder = Runtime::builder(source)
            .store(MemoryStore::new())
            .handlers([self.handler.as_str()])
            .shutdown_timeout(Duration::from_secs(5));
        if let Some(n) = self.concurrency {
            builder = builder.concurrency(n);
        }
        for register in self.stores {
            builder = register(builder);
        }
        let runtime = builder.build()?;
        let registry = Registry::from_inventory()?;
        let meta = registry
            .get(&self.handler)
            .ok_or_else(|| BuildError::UnknownHandler {
                name: self.handler.clone(),
                known: registry
                    .handlers()
                    .map(|m| m.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        Ok(TestKit {
            meta,
            runtime,
            broker,
            crash,
            dead_letter: meta
                .dead_letter
                .map_or_else(|| format!("{}.dlq", meta.topic), str::to_owned),
            deadline: self.deadline,
            next_id: AtomicU64::new(0),
            one_at_a_time: tokio::sync::Mutex::new(()),
        })
    }
}

/// A [`TestKit`] could not be built: the runtime's [`BuildError`], and what
/// to change in the test. Its `Debug` is its message, so that `unwrap()` and
/// a test returning `Result` show the fix.
pub struct KitError {
    source: BuildError,
    handler: String,
}

impl KitError {
    /// The runtime's error.
    pub fn build_error(&self) -> &BuildError {
        &self.source
    }
}

impl fmt::Display for KitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source)?;
        match &self.source {
            BuildError::MissingStore { store_type, .. } => write!(
                f,
                "; in a test, register it on the kit: `TestKit::builder({:?}).store(store).build()`, `store` being a `{store_type}`",
                self.handler
            ),
            BuildError::UnknownHandler { known, .. } if known.is_empty() => f.write_str(
                "; no handler at all is linked into this test binary: a test links a library crate only when it uses an item of it, so add `use my_crate as _;` (your crate's name) to the test file",
            ),
            BuildError::UnknownHandler { .. } => f.write_str(
                "; the kit finds handlers by their `name = \"…\"` (the fn name when there is none) among those linked into the test binary",
            ),
            _ => Ok(()),
        }
    }
}

impl fmt::Debug for KitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for KitError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Once,
    Twice,
    LostAck,
    CrashBeforeAck,
    All,
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scenario::Once => "delivered once",
            Scenario::Twice => "delivered twice",
            Scenario::LostAck => "ack lost, delivered again",
            Scenario::CrashBeforeAck => {
                "crash after commit, before ack; delivered again after a restart"
            }
            Scenario::All => "several messages",
        })
    }
}

/// What one scenario of a [`TestKit`] did: the handler's counters over the
/// scenario, the broker's events and the dead letters, with assertions that
/// print all of it when they fail.
#[derive(Debug, Clone)]
#[must_use = "a report asserts nothing until one of its `assert_*` methods is called"]
pub struct Report {
    handler: &'static str,
    scenario: Scenario,
    ids: Vec<String>,
    stats: Stats,
    events: Vec<BrokerEvent>,
    dead_letters: Vec<DeadLetterRecord>,
    restarts: u32,
}

impl Report {
    /// The handler's counters over this scenario: `processed` (the handler
    /// ran and its effect committed), `duplicate` (acked without running),
    /// `failed` (attempts that failed), `dead_lettered`, …
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The broker's events during this scenario, in order.
    pub fn events(&self) -> &[BrokerEvent] {
        &self.events
    }

    /// The messages of this scenario that went to the dead letters.
    pub fn dead_letters(&self) -> &[DeadLetterRecord] {
        &self.dead_letters
    }

    /// The message ids of this scenario, in publishing order.
    pub fn message_ids(&self) -> &[String] {
        &self.ids
    }

    /// How many deliveries the broker made (redeliveries included).
    pub fn deliveries(&self) -> usize {
        self.events
            .iter()
            .filter(|e| matches!(e, BrokerEvent::Delivered { .. }))
            .count()
    }

    /// How many times the runtime was restarted (1 after a crash).
    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    /// Asserts that the handler's effect committed exactly once and nothing
    /// was dead-lettered, whatever the deliveries.
    #[track_caller]
    pub fn assert_effect_once(&self) -> &Self {
        if self.stats.processed != 1 || self.stats.dead_lettered != 0 {
            self.fail(format_args!(
                "expected the effect once (processed = 1, nothing dead-lettered), got processed = {}, dead_lettered = {}",
                self.stats.processed, self.stats.dead_lettered
            ));
        }
        self
    }

    /// Asserts that `n` deliveries were recognised as duplicates (acked
    /// without running the handler).
    #[track_caller]
    pub fn assert_duplicates(&self, n: u64) -> &Self {
        if self.stats.duplicate != n {
            self.fail(format_args!(
                "expected {n} duplicate(s), got {}",
                self.stats.duplicate
            ));
        }
        self
    }

    /// Asserts that the scenario's first message went to the dead letters
    /// with a reason containing `reason`, and that nothing was processed;
    /// returns its dead letter (owned, so that
    /// `let letter = kit.deliver(m).await.assert_dead_lettered("…")` works).
    #[track_caller]
    pub fn assert_dead_lettered(&self, reason: &str) -> DeadLetterRecord {
        let Some(first) = self.ids.first() else {
            self.fail("the scenario had no message");
        };
        let Some(record) = self.dead_letter(first) else {
            self.fail(format_args!(
                "expected message {first:?} in the dead letters (reason containing {reason:?}), but it is not there"
            ));
        };
        if !record.letter.reason.contains(reason) {
            self.fail(format_args!(
                "message {first:?} was dead-lettered with reason {:?}, which does not contain {reason:?}",
                record.letter.reason
            ));
        }
        if self.stats.processed != 0 {
            self.fail(format_args!(
                "expected nothing processed, got processed = {}",
                self.stats.processed
            ));
        }
        record.clone()
    }

    /// The dead letter of message `id`, if it went there in this scenario.
    pub fn dead_letter(&self, id: &str) -> Option<&DeadLetterRecord> {
        self.dead_letters.iter().find(|r| &*r.delivery.id == id)
    }

    #[track_caller]
    fn fail(&self, what: impl fmt::Display) -> ! {
        panic!(
            "idem test kit: handler {:?}, scenario \"{}\": {what}\n  stats: {:?}\n  restarts: {}\n  dead letters: {:?}\n  broker events: {:#?}",
            self.handler,
            self.scenario,
            self.stats,
            self.restarts,
            self.dead_letters
                .iter()
                .map(|r| (&*r.delivery.id, &r.letter.reason))
                .collect::<Vec<_>>(),
            self.events
        )
    }
}
