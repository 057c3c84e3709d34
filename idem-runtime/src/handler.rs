//! The handler contract: what `#[idempotent]` generates and the runtime
//! calls. Everything the runtime does with a handler goes through
//! [`HandlerFn`] and its [`HandlerMeta`]; the generated code stays a thin
//! adapter. This is the top layer: it imports no other part of the runtime
//! but the contract types (keys, deliveries, acks, codecs, store traits).

use std::future::Future;
use std::time::Duration;

use serde::Serialize;

use crate::ack::{Ack, AckMode};
use crate::codec::Codec;
use crate::delivery::Delivery;
use crate::fingerprint::Fingerprint;
use crate::key::{DEFAULT_MAX_KEY_LEN, Key, KeyError};
use crate::store::DedupStore;

pub use crate::codec::Payload;

/// What to do with a message whose key is missing (`on_missing_key = …`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnMissingKey {
    /// `dead_letter`: send it to the dead letters with the reason (default).
    DeadLetter,
    /// `reject`: nack it; after the last attempt it is dead-lettered.
    Reject,
}

/// What to do when another consumer holds the key's lease (`on_in_progress = …`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnInProgress {
    /// `retry`: nack with a delay of the remaining lease (default).
    Retry,
    /// `wait`: keep the message and poll the store until the lease ends.
    Wait,
}

/// Retry delays: exponential from `min` to `max`, with jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// First delay.
    pub min: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Backoff {
    /// The delay before retry number `retry` (1-based): `min·2^(retry-1)`
    /// capped at `max`, with "equal jitter" (half fixed, half random) so
    /// consumers that failed together do not retry together.
    ///
    /// ```
    /// use std::time::Duration;
    /// let b = idem_runtime::Backoff { min: Duration::from_millis(100), max: Duration::from_secs(1) };
    /// let d = b.delay(3);
    /// assert!(d >= Duration::from_millis(200) && d <= Duration::from_millis(400));
    /// assert!(b.delay(30) <= Duration::from_secs(1));
    /// ```
    pub fn delay(&self, retry: u32) -> Duration {
        let exp = 2u32.saturating_pow(retry.saturating_sub(1).min(31));
        let full = self.min.saturating_mul(exp).min(self.max);
        let half = full / 2;
        half + half.mul_f64(fastrand::f64())
    }
}

/// Everything the attribute said about a handler, as constants.
#[derive(Debug, Clone, Copy)]
pub struct HandlerMeta {
    /// Stable name: namespace of its dedup records and consumer group.
    pub name: &'static str,
    /// Whether `name` was defaulted from the fn name (renaming the fn then
    /// changes the namespace: the runtime warns).
    pub name_is_default: bool,
    /// The fn's path (`module::fn`).
    pub path: &'static str,
    /// Topic to consume.
    pub topic: &'static str,
    /// The key spec as written.
    pub key: &'static str,
    /// The store as written.
    pub store: &'static str,
    /// Ack mode.
    pub ack: AckMode,
    /// Dedup record retention; `None` = forever.
    pub ttl: Option<Duration>,
    /// In-progress lease.
    pub lease: Duration,
    /// Retries after the first attempt.
    pub retries: u32,
    /// Retry delays.
    pub backoff: Backoff,
    /// Dead-letter destination; `None` = the source's default (`<topic>.dlq`).
    pub dead_letter: Option<&'static str>,
    /// Per-ordering-key sequential processing.
    pub ordered: bool,
    /// Missing key policy.
    pub on_missing_key: OnMissingKey,
    /// Lease held elsewhere policy.
    pub on_in_progress: OnInProgress,
    /// Longest accepted key, in bytes.
    pub max_key_len: usize,
    /// What the conflict check compares, as written (`["amount", "currency"]`,
    /// or the key extractor's fingerprint); `None`: no conflict detection, a
    /// done key is a duplicate whatever the payload.
    pub fingerprint: Option<&'static str>,
}

impl HandlerMeta {
    /// Every default of the attribute, in one place. Generated code fills in
    /// what the attribute set and takes the rest from here
    /// (`HandlerMeta { topic: "orders", …, ..HandlerMeta::DEFAULTS }`); the
    /// names are empty here and always set by the attribute.
    pub const DEFAULTS: HandlerMeta = HandlerMeta {
        name: "",
        name_is_default: true,
        path: "",
        topic: "",
        key: "message_id",
        store: "none",
        ack: AckMode::Auto,
        ttl: None,
        lease: Duration::from_secs(30),
        retries: 3,
        backoff: Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_secs(30),
        },
        dead_letter: None,
        ordered: false,
        on_missing_key: OnMissingKey::DeadLetter,
        on_in_progress: OnInProgress::Retry,
        max_key_len: DEFAULT_MAX_KEY_LEN,
        fingerprint: None,
    };

    /// Attempts in all: the first plus `retries`.
    pub const fn max_attempts(&self) -> u32 {
        self.retries.saturating_add(1)
    }
}

/// What a handler may return: `Result<T, E>` with a serializable `T` (cached
/// and handed to later duplicates) and a displayable `E` (logged, and the
/// dead-letter reason after the last attempt).
#[diagnostic::on_unimplemented(
    message = "an idempotent handler must return `Result<T, E>`, not `{Self}`",
    label = "change the return type to `Result<T, E>`",
    note = "T: serde::Serialize (use `()` for nothing), E: std::fmt::Display"
)]
pub trait HandlerResult: Send {
    /// The success value.
    type Output: Serialize + Send;
    /// The error.
    type Error: std::fmt::Display + Send;
    /// As a plain `Result`.
    fn into_result(self) -> Result<Self::Output, Self::Error>;
}

impl<T: Serialize + Send, E: std::fmt::Display + Send> HandlerResult for Result<T, E> {
    type Output = T;
    type Error = E;
    fn into_result(self) -> Result<T, E> {
        self
    }
}

/// What a handler's messages are: payload type and codec, key, store and
/// settings. The part of a handler the pipeline needs before the call;
/// [`HandlerFn`] (one message per call) and [`BatchHandlerFn`] (a batch per
/// call) add the call. Generated by the macro.
///
/// `M` is the store's mode ([`store::mode`](crate::store::mode)): a handler
/// without a `tx` parameter works with any store (`impl<M> Handler<M>`), one
/// with a `tx` parameter only with a [`TxStore`](crate::store::TxStore)
/// (`Handler<mode::Transactional>`).
pub trait Handler<M>: Send + Sync + 'static {
    /// The decoded payload (of one message).
    type Payload: Send + 'static;
    /// The dedup store.
    type Store: DedupStore<M>;
    /// How payloads are decoded (`codec = …`; JSON by default).
    type Codec: Codec<Self::Payload>;
    /// The attribute's settings.
    const META: HandlerMeta;

    /// Extracts the idempotency key.
    fn key(&self, delivery: &Delivery, payload: &Self::Payload) -> Result<Key, KeyError>;

    /// The fingerprint compared with a done key's record to detect "same
    /// key, different message" (see [`HandlerMeta::fingerprint`]). Default:
    /// none, so that producer retries which re-serialise their payload are
    /// duplicates, not conflicts.
    fn fingerprint(&self, delivery: &Delivery, payload: &Self::Payload) -> Option<Fingerprint> {
        let _ = (delivery, payload);
        None
    }
}

/// A handler of one message per call, as the macro generates it.
pub trait HandlerFn<M>: Handler<M> {
    /// What the user fn returns.
    type Result: HandlerResult;

    /// Runs the user fn.
    fn call<'a, 'c: 'a>(
        &'a self,
        payload: Self::Payload,
        tx: &'a mut <Self::Store as DedupStore<M>>::Tx<'c>,
        delivery: &'a Delivery,
        ack: Ack,
    ) -> impl Future<Output = Self::Result> + Send + 'a;
}

/// A handler of a whole batch per call (`orders: Vec<OrderPlaced>` or
/// `orders: idem::Batch<OrderPlaced>`), as the macro generates it. It sees
/// only the new messages of a fetched batch; duplicates are acked without it.
pub trait BatchHandlerFn<M>: Handler<M> {
    /// What the user fn returns.
    type Result: BatchResult;

    /// Runs the user fn on the batch.
    fn call<'a, 'c: 'a>(
        &'a self,
        batch: Batch<Self::Payload>,
        tx: &'a mut <Self::Store as DedupStore<M>>::Tx<'c>,
    ) -> impl Future<Output = Self::Result> + Send + 'a;
}

/// The new messages of a fetched batch, in order, each with its delivery.
///
/// ```
/// use idem_runtime::{Batch, Delivery};
/// let batch = Batch::from_items(vec![
///     ("a".to_owned(), Delivery::new("m-1", "orders", b"{}".to_vec())),
///     ("b".to_owned(), Delivery::new("m-2", "orders", b"{}".to_vec())),
/// ]);
/// assert_eq!(batch.len(), 2);
/// assert_eq!(batch.iter().map(|(p, d)| format!("{p}@{}", d.id)).collect::<Vec<_>>(), ["a@m-1", "b@m-2"]);
/// assert_eq!(batch.into_payloads(), ["a", "b"]);
/// ```
#[derive(Debug)]
pub struct Batch<P> {
    items: Vec<(P, Delivery)>,
}

impl<P> Batch<P> {
    /// A batch of payloads with their deliveries (for calling a batch
    /// handler in a unit test).
    pub fn from_items(items: Vec<(P, Delivery)>) -> Self {
        Batch { items }
    }

    /// How many messages.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there are none (never, when the runtime calls).
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The payloads with their deliveries.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&P, &Delivery)> {
        self.items.iter().map(|(p, d)| (p, d))
    }

    /// The payloads.
    pub fn payloads(&self) -> impl ExactSizeIterator<Item = &P> {
        self.items.iter().map(|(p, _)| p)
    }

    /// The payloads, without their deliveries.
    pub fn into_payloads(self) -> Vec<P> {
        self.items.into_iter().map(|(p, _)| p).collect()
    }
}

impl<P> IntoIterator for Batch<P> {
    type Item = (P, Delivery);
    type IntoIter = std::vec::IntoIter<(P, Delivery)>;
    fn into_iter(self) -> Self::IntoIter {
        self.items.into_iter()
    }
}

/// A batch handler's error that says which message failed (Spring Kafka's
/// `BatchListenerFailedException(index)`): `Err(BatchError::at(i, e))`.
/// Then, on a transactional store, the batch is rolled back and the messages
/// before and after `i` run again as batches of their own, while message `i`
/// is retried alone; on a lease store the messages before `i` count as done
/// (their effects are applied), the ones after it run again. Any other error
/// (`?` converts every `std::error::Error` into a `BatchError` without an
/// index) makes the runtime find the failing message by halving the batch.
///
/// ```
/// let e = idem_runtime::BatchError::at(3, std::io::Error::other("row 3 violates a constraint"));
/// assert_eq!(e.index(), Some(3));
/// assert_eq!(e.to_string(), "message 3 of the batch: row 3 violates a constraint");
/// ```
#[derive(Debug)]
pub struct BatchError {
    index: Option<usize>,
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl BatchError {
    /// Message `index` of the batch (0-based, in the order handed over) failed.
    pub fn at(index: usize, error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        BatchError {
            index: Some(index),
            source: error.into(),
        }
    }

    /// The batch failed; which message is not known.
    pub fn whole(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        BatchError {
            index: None,
            source: error.into(),
        }
    }

    /// The failing message's index, if known.
    pub fn index(&self) -> Option<usize> {
        self.index
    }
}

impl std::fmt::Display for BatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.index {
            Some(i) => write!(f, "message {i} of the batch: {}", self.source),
            None => std::fmt::Display::fmt(&self.source, f),
        }
    }
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for BatchError {
    fn from(e: E) -> Self {
        BatchError::whole(e)
    }
}

/// What a batch handler may return: `Result<(), E>` with a displayable `E`;
/// [`BatchError::at`] says which message failed.
#[diagnostic::on_unimplemented(
    message = "a batch handler must return `Result<(), E>`, not `{Self}`",
    label = "change the return type to `Result<(), E>`",
    note = "E: std::fmt::Display; return `Err(idem::BatchError::at(index, e))` to say which message failed"
)]
pub trait BatchResult: Send {
    /// The error.
    type Error: std::fmt::Display + Send + 'static;
    /// As a plain `Result`.
    fn into_result(self) -> Result<(), Self::Error>;
}

impl<E: std::fmt::Display + Send + 'static> BatchResult for Result<(), E> {
    type Error = E;
    fn into_result(self) -> Result<(), E> {
        self
    }
}

/// The index of the failing message, if `error` is a [`BatchError`] that
/// knows it.
pub(crate) fn failed_index<E: 'static>(error: &E) -> Option<usize> {
    (error as &dyn std::any::Any)
        .downcast_ref::<BatchError>()
        .and_then(BatchError::index)
}
