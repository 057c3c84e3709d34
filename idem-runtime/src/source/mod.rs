//! Sources: where deliveries come from and where acks go back to.
//!
//! A [`Source`] opens one [`Subscription`] per handler (a consumer group,
//! queue consumer or durable consumer named after the handler). The consumer
//! loop is the same for every broker; a broker adds a source, never a special
//! case in the loop.

use std::future::Future;
use std::time::Duration;

use crate::delivery::Delivery;

#[cfg(feature = "kafka")]
pub mod kafka;
pub mod memory;
pub mod namespaced;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(any(
    feature = "redis-streams",
    feature = "rabbitmq",
    feature = "nats",
    feature = "kafka"
))]
mod plumbing;

#[cfg(feature = "rabbitmq")]
pub mod rabbitmq;
#[cfg(feature = "redis-streams")]
pub mod redis_streams;

/// What a handler subscribes to.
#[derive(Debug, Clone, Copy)]
pub struct SubscribeSpec<'a> {
    /// The topic / stream / queue / subject.
    pub topic: &'a str,
    /// The consumer group (the handler's stable name): processes with the
    /// same group share the work.
    pub group: &'a str,
    /// Where dead letters go (`dead_letter = …`), if the handler named one.
    pub dead_letter: Option<&'a str>,
    /// How many deliveries may be unacked at once (prefetch).
    pub prefetch: usize,
}

/// Why a message goes to the dead letters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The reason, human-readable (`undecodable payload: …`, `missing key: …`).
    pub reason: String,
    /// Deliveries and retries it had.
    pub attempts: u32,
    /// The handler that gave up on it.
    pub handler: String,
}

/// The header (or stream field) names idem writes on every dead letter,
/// whatever the broker: tools that read a dead-letter queue can rely on them.
pub mod dead_letter_headers {
    /// Why the message was given up on (`undecodable payload: …`).
    pub const REASON: &str = "idem-dead-letter-reason";
    /// How many deliveries and retries it had.
    pub const ATTEMPTS: &str = "idem-attempts";
    /// The handler (consumer group) that gave up on it.
    pub const HANDLER: &str = "idem-handler";
    /// The message id it had on the original topic.
    pub const ORIGINAL_ID: &str = "idem-original-id";
}

/// A broker connection that can open subscriptions.
pub trait Source: Send + Sync + 'static {
    /// One handler's subscription.
    type Subscription: Subscription;

    /// Opens the subscription (declares the group/queue/consumer if needed).
    fn subscribe(
        &self,
        spec: SubscribeSpec<'_>,
    ) -> impl Future<Output = Result<Self::Subscription, SourceError>> + Send;
}

/// A stream of deliveries with the operations that settle them.
///
/// Settling is at-least-once by contract: a delivery that is neither acked
/// nor dead-lettered must come back (nack, crash, lost connection).
pub trait Subscription: Send + Sync + 'static {
    /// Waits for deliveries and returns between 1 and `max` of them. May
    /// return an empty batch after a broker-side timeout.
    fn fetch(&self, max: usize) -> impl Future<Output = Result<Vec<Delivery>, SourceError>> + Send;

    /// Acknowledges: the message is done and must not come back.
    fn ack(&self, delivery: &Delivery) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// Acknowledges several at once (one broker call where the broker has one).
    fn ack_many(
        &self,
        deliveries: &[&Delivery],
    ) -> impl Future<Output = Result<(), SourceError>> + Send {
        async move {
            for d in deliveries {
                self.ack(d).await?;
            }
            Ok(())
        }
    }

    /// Gives the message back for redelivery after `delay` (or as soon as the
    /// broker can, where it has no delayed redelivery).
    fn nack(
        &self,
        delivery: &Delivery,
        delay: Duration,
    ) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// Moves the message to the dead letters with the reason, and settles it.
    fn dead_letter(
        &self,
        delivery: &Delivery,
        letter: &DeadLetter,
    ) -> impl Future<Output = Result<(), SourceError>> + Send;

    /// Ends the subscription gracefully; the consumer loop calls it once,
    /// after its last settle, and nothing else afterwards. When it returns,
    /// the broker stopped delivering and confirmed it, and the
    /// subscription's channels and connections are released, so neither side
    /// logs an error (and deleting the queue right after cannot race it);
    /// deliveries still unsettled go back to the broker. Dropping a
    /// subscription without closing it is safe (the broker redelivers what
    /// was unsettled) but abrupt. The default does nothing.
    fn close(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// A source failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The broker cannot be reached; the loop backs off and retries.
    #[error("{source_name} unavailable: {message}")]
    Unavailable {
        /// Which source.
        source_name: &'static str,
        /// What happened.
        message: String,
    },
    /// The subscription was closed (source shut down).
    #[error("{source_name} subscription closed")]
    Closed {
        /// Which source.
        source_name: &'static str,
    },
    /// The broker refused an operation that retrying will not fix as is (a
    /// queue declared with other arguments, a missing permission, …). The
    /// message names the fix; the loop still backs off and retries, so the
    /// fix takes effect without a restart.
    #[error("{source_name} refused: {message}")]
    Refused {
        /// Which source.
        source_name: &'static str,
        /// What was refused, and how to fix it.
        message: String,
    },
    /// The source is configured wrongly (an unparsable URL, an invalid name).
    #[error("{source_name} misconfigured: {message}")]
    Config {
        /// Which source.
        source_name: &'static str,
        /// What is wrong, and how to fix it.
        message: String,
    },
}
