//! Ack modes and the `Ack` token handed to manual-mode handlers.
//!
//! The token is taken by value and `#[must_use]`: acking twice does not
//! compile. With a transactional store an ack never reaches the broker before
//! the store transaction committed, whatever the mode: an ack that runs ahead
//! of the commit is how a crash loses a message.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use tokio::sync::Notify;

/// When the broker learns that a message is done (`ack = …`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AckMode {
    /// `before`: ack, then run the handler. At most once: a failure loses the message.
    Before,
    /// `auto`: ack after the handler succeeded and the store committed. The default.
    Auto,
    /// `manual`: the handler calls `ack.ack()`; acks are sent together when
    /// every message of the fetched batch is finished.
    Manual,
    /// `manual_immediate`: the handler calls `ack.ack()`. With a
    /// transactional (SQL) store the ack is sent as soon as this message's
    /// transaction committed (never before); with a lease store (memory,
    /// Redis) or no store it is sent at the moment `ack.ack()` is called.
    ManualImmediate,
    /// `batch`: claim a fetched batch in one store round trip, run each item
    /// in its own savepoint, commit once, ack all successes in one call.
    Batch,
}

impl AckMode {
    /// The attribute spelling (`"manual_immediate"`, …).
    pub const fn as_str(self) -> &'static str {
        match self {
            AckMode::Before => "before",
            AckMode::Auto => "auto",
            AckMode::Manual => "manual",
            AckMode::ManualImmediate => "manual_immediate",
            AckMode::Batch => "batch",
        }
    }

    /// Whether the handler decides with an [`Ack`] token.
    pub const fn is_manual(self) -> bool {
        matches!(self, AckMode::Manual | AckMode::ManualImmediate)
    }
}

impl std::fmt::Display for AckMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

const UNDECIDED: u8 = 0;
const ACKED: u8 = 1;
const NACKED: u8 = 2;

/// The handler's say on its message, in `manual` and `manual_immediate` modes.
///
/// Call [`ack`](Ack::ack) when the message's work is done; idem sends the ack
/// after the store committed. Call [`nack`](Ack::nack) (or drop the token)
/// to have the transaction rolled back and the message redelivered.
///
/// ```
/// let ack = idem_runtime::Ack::detached();
/// ack.ack();
/// // ack.ack(); // does not compile: the token was moved
/// ```
#[must_use = "an Ack that is neither acked nor nacked rolls the message back and has it redelivered"]
#[derive(Debug)]
pub struct Ack {
    slot: Option<Arc<Slot>>,
}

/// The decision, and a signal for whoever sends the ack at once.
#[derive(Debug)]
struct Slot {
    state: AtomicU8,
    decided: Notify,
}

impl Ack {
    pub(crate) fn new() -> (Ack, AckProbe) {
        let slot = Arc::new(Slot {
            state: AtomicU8::new(UNDECIDED),
            decided: Notify::new(),
        });
        (
            Ack {
                slot: Some(slot.clone()),
            },
            AckProbe(Some(slot)),
        )
    }

    /// A token not tied to any delivery, for calling a handler in a unit test.
    pub fn detached() -> Ack {
        Ack { slot: None }
    }

    /// The message is done: commit the handler's transaction, then ack.
    pub fn ack(self) {
        self.set(ACKED)
    }

    /// The message is not done: roll back and redeliver it.
    pub fn nack(self) {
        self.set(NACKED)
    }

    fn set(&self, v: u8) {
        if let Some(slot) = &self.slot {
            slot.state.store(v, Ordering::Release);
            slot.decided.notify_one();
        }
    }
}

/// What the runtime reads back after the handler returned.
#[derive(Debug, Clone)]
pub(crate) struct AckProbe(Option<Arc<Slot>>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AckDecision {
    /// The handler acked (or the mode is not manual).
    Acked,
    /// The handler nacked.
    Nacked,
    /// The handler dropped the token without deciding.
    Dropped,
}

impl AckProbe {
    /// The probe of a non-manual mode: always "acked".
    pub(crate) fn automatic() -> AckProbe {
        AckProbe(None)
    }

    pub(crate) fn decision(&self) -> AckDecision {
        match self.0.as_ref().map(|s| s.state.load(Ordering::Acquire)) {
            None | Some(ACKED) => AckDecision::Acked,
            Some(NACKED) => AckDecision::Nacked,
            Some(_) => AckDecision::Dropped,
        }
    }

    /// Completes when the handler calls `ack.ack()`; never for a nack or a
    /// dropped token (the caller races it against the handler's end).
    pub(crate) async fn acked(&self) {
        let Some(slot) = &self.0 else {
            return std::future::pending().await;
        };
        loop {
            if slot.state.load(Ordering::Acquire) == ACKED {
                return;
            }
            slot.decided.notified().await;
        }
    }
}
