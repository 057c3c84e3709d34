//! An in-memory broker that misbehaves on purpose.
//!
//! It delivers at least once, like a real broker, and can be told to
//! duplicate messages, reorder them, lose acks (the message comes back as if
//! the ack never arrived) and redeliver in-flight messages (a failover). It
//! records every publish, delivery, ack, nack and dead letter in order, so a
//! test can prove what happened. It is for tests, demos and the quickstart,
//! not for production: nothing survives the process.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::{DeadLetter, SourceError, SubscribeSpec, Subscription};
use crate::delivery::{Delivery, Headers, Receipt};

const NAME: &str = "memory broker";

/// Faults the broker injects, decided by a seeded random generator so a
/// failing schedule can be replayed.
#[derive(Debug, Clone)]
pub struct Faults {
    /// Probability that a published message is stored twice (broker or
    /// producer-side duplicate with the same message id).
    pub duplicate: f64,
    /// Probability that an ack is lost: the broker redelivers the message.
    pub lose_ack: f64,
    /// At most this many acks are lost per message, so every run ends.
    pub max_lost_acks_per_message: u32,
    /// Shuffle the ready messages before each fetch.
    pub reorder: bool,
    /// Seed of the fault generator.
    pub seed: u64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            duplicate: 0.0,
            lose_ack: 0.0,
            max_lost_acks_per_message: 2,
            reorder: false,
            seed: 0,
        }
    }
}

/// Something that happened in the broker, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerEvent {
    /// A message was published (stored once per copy).
    Published {
        /// Message id.
        id: String,
    },
    /// A delivery was handed to a consumer.
    Delivered {
        /// Message id.
        id: String,
        /// Delivery count.
        attempt: u32,
    },
    /// An ack arrived and settled the delivery.
    Acked {
        /// Message id.
        id: String,
    },
    /// An ack was lost on purpose; the message will come again.
    AckLost {
        /// Message id.
        id: String,
    },
    /// A nack arrived; the message will come again after the delay.
    Nacked {
        /// Message id.
        id: String,
    },
    /// The message went to the dead letters.
    DeadLettered {
        /// Message id.
        id: String,
        /// Why.
        reason: String,
    },
    /// Recorded by a test's store wrapper: these messages' store transaction committed.
    Committed {
        /// Message ids of the transaction.
        ids: Vec<String>,
    },
}

/// A message to publish.
#[derive(Debug, Clone, Default)]
pub struct Message {
    /// Message id; generated when `None`.
    pub id: Option<String>,
    /// Payload bytes.
    pub payload: Vec<u8>,
    /// Headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Ordering key.
    pub ordering_key: Option<String>,
}

impl Message {
    /// A message with this payload.
    pub fn new(payload: impl Into<Vec<u8>>) -> Self {
        Message {
            payload: payload.into(),
            ..Default::default()
        }
    }
    /// Sets the message id.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }
    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
    /// Sets the ordering key.
    pub fn ordering_key(mut self, key: impl Into<String>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }
}

/// A dead letter as the broker keeps it.
#[derive(Debug, Clone)]
pub struct DeadLetterRecord {
    /// The delivery that was given up on.
    pub delivery: Delivery,
    /// Why, and after how many attempts.
    pub letter: DeadLetter,
}

/// The in-memory broker. Cheap to clone (shared state).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use idem_runtime::source::memory::{MemoryBroker, Message};
/// use idem_runtime::source::{Source, Subscription, SubscribeSpec};
///
/// let broker = MemoryBroker::new();
/// broker.publish("orders", Message::new(r#"{"order_id":1}"#).id("m-1"));
/// let sub = broker
///     .subscribe(SubscribeSpec { topic: "orders", group: "g", dead_letter: None, prefetch: 8 })
///     .await
///     .unwrap();
/// let batch = sub.fetch(8).await.unwrap();
/// assert_eq!(&*batch[0].id, "m-1");
/// sub.ack(&batch[0]).await.unwrap();
/// assert!(broker.is_idle());
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
}

#[derive(Debug)]
struct State {
    faults: Faults,
    rng: fastrand::Rng,
    topics: HashMap<String, Topic>,
    events: Vec<BrokerEvent>,
    dead_letters: HashMap<String, Vec<DeadLetterRecord>>,
    next_id: u64,
    next_receipt: u64,
}

#[derive(Debug, Default)]
struct Topic {
    log: Vec<Arc<Stored>>,
    groups: HashMap<String, Group>,
    /// Acks to lose on purpose, by message id (every group).
    forced_lost_acks: HashMap<Arc<str>, u32>,
}

#[derive(Debug)]
struct Stored {
    id: Arc<str>,
    payload: Arc<[u8]>,
    headers: Headers,
    ordering_key: Option<Arc<str>>,
}

#[derive(Debug, Default)]
struct Group {
    cursor: usize,
    ready: VecDeque<usize>,
    delayed: Vec<(Instant, usize)>,
    in_flight: HashMap<u64, usize>,
    deliveries: HashMap<usize, u32>,
    lost_acks: HashMap<usize, u32>,
    dead_letter: Option<String>,
}

impl Group {
    fn is_idle(&self, log_len: usize) -> bool {
        self.cursor == log_len
            && self.ready.is_empty()
            && self.delayed.is_empty()
            && self.in_flight.is_empty()
    }
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBroker {
    /// A broker that behaves (no injected faults).
    pub fn new() -> Self {
        Self::with_faults(Faults::default())
    }

    /// A broker that injects these faults.
    pub fn with_faults(faults: Faults) -> Self {
        let rng = fastrand::Rng::with_seed(faults.seed);
        MemoryBroker {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    faults,
                    rng,
                    topics: HashMap::new(),
                    events: Vec::new(),
                    dead_letters: HashMap::new(),
                    next_id: 0,
                    next_receipt: 0,
                }),
                changed: watch::Sender::new(0),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every mutation below is completed before the guard drops, so a
        // poisoned lock (a panicking test thread) leaves consistent state.
        crate::sync::lock(&self.inner.state)
    }

    fn notify(&self) {
        self.inner.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Publishes a message; returns its id. With `Faults::duplicate`, the
    /// message may be stored twice.
    pub fn publish(&self, topic: &str, message: Message) -> String {
        let mut st = self.lock();
        let id = match message.id {
            Some(id) => id,
            None => {
                st.next_id += 1;
                format!("{topic}-{}", st.next_id)
            }
        };
        let mut headers = Headers::default();
        for (n, v) in message.headers {
            headers.insert(n, v);
        }
        let stored = Arc::new(Stored {
            id: id.as_str().into(),
            payload: message.payload.into(),
            headers,
            ordering_key: message.ordering_key.map(Into::into),
        });
        let copies = if st.faults.duplicate > 0.0 && st.rng.f64() < st.faults.duplicate {
            2
        } else {
            1
        };
        for _ in 0..copies {
            st.topics
                .entry(topic.to_owned())
                .or_default()
                .log
                .push(stored.clone());
            st.events.push(BrokerEvent::Published { id: id.clone() });
        }
        drop(st);
        self.notify();
        id
    }

    /// Makes the next `times` acks of this message id get lost: the message
    /// comes back as if the consumer died after its commit, before its ack.
    pub fn lose_next_acks(&self, topic: &str, id: &str, times: u32) {
        let mut st = self.lock();
        let t = st.topics.entry(topic.to_owned()).or_default();
        *t.forced_lost_acks.entry(id.into()).or_default() += times;
    }

    /// Hands every in-flight delivery of `topic` out again, as a failover or
    /// a rebalance would, while the first consumer may still be working on it.
    pub fn redeliver_in_flight(&self, topic: &str) {
        let mut st = self.lock();
        if let Some(t) = st.topics.get_mut(topic) {
            for g in t.groups.values_mut() {
                let idxs: Vec<usize> = g.in_flight.values().copied().collect();
                g.ready.extend(idxs);
            }
        }
        drop(st);
        self.notify();
    }

    /// Records an event from outside (a test store's commit).
    pub fn record(&self, event: BrokerEvent) {
        self.lock().events.push(event);
    }

    /// Everything that happened, in order.
    pub fn events(&self) -> Vec<BrokerEvent> {
        self.lock().events.clone()
    }

    /// The dead letters of a destination (`<topic>.dlq` unless the handler
    /// named another).
    pub fn dead_letters(&self, destination: &str) -> Vec<DeadLetterRecord> {
        self.lock()
            .dead_letters
            .get(destination)
            .cloned()
            .unwrap_or_default()
    }

    /// Whether every published message has been settled by every group and
    /// nothing waits for redelivery. A topic nobody subscribed to yet is not idle.
    pub fn is_idle(&self) -> bool {
        let st = self.lock();
        st.topics.values().all(|t| {
            (t.log.is_empty() || !t.groups.is_empty())
                && t.groups.values().all(|g| g.is_idle(t.log.len()))
        })
    }

    /// Waits until [`is_idle`](Self::is_idle): the deterministic "all done"
    /// signal for tests and demos.
    pub async fn wait_idle(&self) {
        let mut rx = self.inner.changed.subscribe();
        loop {
            if self.is_idle() {
                return;
            }
            // The sender lives as long as `self`, so this cannot fail.
            let _ = rx.changed().await;
        }
    }

    fn settle(
        &self,
        topic: &str,
        group: &str,
        receipt: &Receipt,
        ack: Option<&DeadLetter>,
        nack: Option<Duration>,
        dl_dest: &str,
    ) {
        let mut st = self.lock();
        let st = &mut *st;
        let Some(t) = st.topics.get_mut(topic) else {
            return;
        };
        let Some(g) = t.groups.get_mut(group) else {
            return;
        };
        let Some(idx) = receipt.as_number().and_then(|r| g.in_flight.remove(&r)) else {
            // A stale receipt (already settled, or handed out again): nothing to do.
            return;
        };
        let msg = t.log[idx].clone();
        let id = msg.id.to_string();
        if let Some(delay) = nack {
            g.delayed.push((Instant::now() + delay, idx));
            st.events.push(BrokerEvent::Nacked { id });
        } else if let Some(letter) = ack {
            let dest = g.dead_letter.clone().unwrap_or_else(|| dl_dest.to_owned());
            let delivery = delivery_of(
                &msg,
                topic,
                g.deliveries.get(&idx).copied().unwrap_or(1),
                Receipt::none(),
            );
            st.dead_letters
                .entry(dest)
                .or_default()
                .push(DeadLetterRecord {
                    delivery,
                    letter: letter.clone(),
                });
            st.events.push(BrokerEvent::DeadLettered {
                id,
                reason: letter.reason.clone(),
            });
        } else {
            let forced = t
                .forced_lost_acks
                .get_mut(&msg.id)
                .filter(|n| **n > 0)
                .map(|n| *n -= 1)
                .is_some();
            let lost = g.lost_acks.entry(idx).or_default();
            let random = !forced
                && *lost < st.faults.max_lost_acks_per_message
                && st.faults.lose_ack > 0.0
                && st.rng.f64() < st.faults.lose_ack;
            if random {
                *lost += 1;
            }
            if forced || random {
                g.ready.push_back(idx);
                st.events.push(BrokerEvent::AckLost { id });
            } else {
                st.events.push(BrokerEvent::Acked { id });
            }
        }
    }
}

fn delivery_of(msg: &Stored, topic: &str, attempt: u32, receipt: Receipt) -> Delivery {
    Delivery {
        id: msg.id.clone(),
        topic: topic.into(),
        payload: msg.payload.clone(),
        headers: msg.headers.clone(),
        ordering_key: msg.ordering_key.clone(),
        attempt,
        receipt,
    }
}

impl super::Source for MemoryBroker {
    type Subscription = MemorySubscription;

    async fn subscribe(&self, spec: SubscribeSpec<'_>) -> Result<MemorySubscription, SourceError> {
        let mut st = self.lock();
        let topic = st.topics.entry(spec.topic.to_owned()).or_default();
        let group = topic.groups.entry(spec.group.to_owned()).or_default();
        group.dead_letter = spec.dead_letter.map(str::to_owned);
        drop(st);
        self.notify();
        Ok(MemorySubscription {
            broker: self.clone(),
            topic: spec.topic.into(),
            group: spec.group.into(),
            dead_letter_default: format!("{}.dlq", spec.topic).into(),
        })
    }
}

/// One group's subscription to one topic of the [`MemoryBroker`].
#[derive(Debug)]
pub struct MemorySubscription {
    broker: MemoryBroker,
    topic: Arc<str>,
    group: Arc<str>,
    dead_letter_default: Arc<str>,
}

impl MemorySubscription {
    fn take(&self, max: usize) -> (Vec<Delivery>, Option<Instant>) {
        let mut st = self.broker.lock();
        let st = &mut *st;
        let Some(t) = st.topics.get_mut(&*self.topic) else {
            return (Vec::new(), None);
        };
        let Some(g) = t.groups.get_mut(&*self.group) else {
            return (Vec::new(), None);
        };
        while g.cursor < t.log.len() {
            g.ready.push_back(g.cursor);
            g.cursor += 1;
        }
        let now = Instant::now();
        let mut next_due = None;
        g.delayed.retain(|(due, idx)| {
            if *due <= now {
                g.ready.push_back(*idx);
                false
            } else {
                next_due = Some(next_due.map_or(*due, |n: Instant| n.min(*due)));
                true
            }
        });
        if st.faults.reorder && g.ready.len() > 1 {
            st.rng.shuffle(g.ready.make_contiguous());
        }
        let mut out = Vec::new();
        while out.len() < max {
            let Some(idx) = g.ready.pop_front() else {
                break;
            };
            st.next_receipt += 1;
            let receipt = st.next_receipt;
            g.in_flight.insert(receipt, idx);
            let attempt = g.deliveries.entry(idx).or_default();
            *attempt += 1;
            let msg = &t.log[idx];
            st.events.push(BrokerEvent::Delivered {
                id: msg.id.to_string(),
                attempt: *attempt,
            });
            out.push(delivery_of(
                msg,
                &self.topic,
                *attempt,
                Receipt::number(receipt),
            ));
        }
        (out, next_due)
    }
}

impl Subscription for MemorySubscription {
    async fn fetch(&self, max: usize) -> Result<Vec<Delivery>, SourceError> {
        let mut rx = self.broker.inner.changed.subscribe();
        loop {
            rx.borrow_and_update();
            let (batch, next_due) = self.take(max.max(1));
            if !batch.is_empty() {
                return Ok(batch);
            }
            let changed = rx.changed();
            match next_due {
                Some(due) => {
                    let _ = tokio::time::timeout_at(due, changed).await;
                }
                None => {
                    if changed.await.is_err() {
                        return Err(SourceError::Closed { source_name: NAME });
                    }
                }
            }
        }
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), SourceError> {
        self.broker.settle(
            &self.topic,
            &self.group,
            &delivery.receipt,
            None,
            None,
            &self.dead_letter_default,
        );
        self.broker.notify();
        Ok(())
    }

    async fn nack(&self, delivery: &Delivery, delay: Duration) -> Result<(), SourceError> {
        self.broker.settle(
            &self.topic,
            &self.group,
            &delivery.receipt,
            None,
            Some(delay),
            &self.dead_letter_default,
        );
        self.broker.notify();
        Ok(())
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery,
        letter: &DeadLetter,
    ) -> Result<(), SourceError> {
        self.broker.settle(
            &self.topic,
            &self.group,
            &delivery.receipt,
            Some(letter),
            None,
            &self.dead_letter_default,
        );
        self.broker.notify();
        Ok(())
    }
}
