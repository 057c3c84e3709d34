//! The handler contract between generated code and the runtime.
//!
//! `#[idempotent]` turns the user's fn into a unit type implementing
//! [`HandlerFn`] and submits a [`HandlerDescriptor`] through `inventory`.
//! Everything the runtime does with a handler goes through this trait; the
//! generated code stays a thin adapter.

use std::future::Future;
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::ack::{Ack, AckMode};
use crate::delivery::Delivery;
use crate::fingerprint::Fingerprint;
use crate::key::{Key, KeyError};
use crate::store::DedupStore;

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
    /// Attempts in all: the first plus `retries`.
    pub const fn max_attempts(&self) -> u32 {
        self.retries.saturating_add(1)
    }
}

/// A payload type: anything serde can decode (JSON on the wire).
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a message payload",
    label = "payload type must implement `serde::Deserialize`",
    note = "add `#[derive(serde::Deserialize)]` to `{Self}` (idem decodes payloads as JSON)"
)]
pub trait Payload: DeserializeOwned + Send + Sync + 'static {}
impl<T: DeserializeOwned + Send + Sync + 'static> Payload for T {}

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

/// A handler, as the macro generates it. Implemented by hand only for
/// handlers built without the macro.
pub trait HandlerFn: Send + Sync + 'static {
    /// The decoded payload.
    type Payload: Payload;
    /// The dedup store.
    type Store: DedupStore;
    /// What the user fn returns.
    type Result: HandlerResult;
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

    /// Runs the user fn.
    fn call<'a, 'c: 'a>(
        &'a self,
        payload: Self::Payload,
        tx: &'a mut <Self::Store as DedupStore>::Tx<'c>,
        delivery: &'a Delivery,
        ack: Ack,
    ) -> impl Future<Output = Self::Result> + Send + 'a;
}

/// What `inventory` collects: one per annotated handler.
#[derive(Debug)]
pub struct HandlerDescriptor {
    /// The attribute's settings.
    pub meta: HandlerMeta,
    pub(crate) bind: crate::runtime::BindFn,
}

impl HandlerDescriptor {
    /// The descriptor of handler `H` (used by generated code).
    pub const fn of<H: HandlerFn + Default>() -> Self {
        HandlerDescriptor {
            meta: H::META,
            bind: crate::process::bind::<H>,
        }
    }
}

inventory::collect!(HandlerDescriptor);
