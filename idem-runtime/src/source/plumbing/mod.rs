//! What the network sources (Redis Streams, RabbitMQ, NATS JetStream, Kafka) share,
//! in one place, so that a broker only implements its primitives:
//!
//! | concern | here | what a broker supplies |
//! |---|---|---|
//! | connect, reconnect with backoff, close for good on shutdown | [`Reconnecting`] | [`Connector::connect`], [`Connector::close`] (graceful; default: drop) |
//! | deliveries held by a subscription, kept alive while a long handler runs | [`InFlight`], [`spawn_keep_alive`] | [`KeepAlive::keep_alive`] (touch held deliveries) |
//! | what a dead letter carries, and in what order it is written | [`write_dead_letter`] | [`DeadLetterSink`] (publish a copy, then settle the original) |
//! | passwords out of errors and logs, broker URLs from the environment | [`redacted`], [`url_from_env`] | its URL |
//! | errors of a lost broker | [`unavailable`] | its name |
//! | locks that survive a panicked holder | [`lock`] | |
//!
//! Fetch, ack and nack stay with each broker: they are what differs.

mod dead_letter;
#[cfg(any(feature = "redis-streams", feature = "nats"))]
mod keep_alive;
#[cfg(any(feature = "redis-streams", feature = "rabbitmq", feature = "nats"))]
mod reconnect;

pub(crate) use dead_letter::{DeadLetterSink, Header, write_dead_letter};
#[cfg(any(feature = "redis-streams", feature = "nats"))]
pub(crate) use keep_alive::{InFlight, KeepAlive, Ticker, spawn_keep_alive};
#[cfg(any(feature = "redis-streams", feature = "rabbitmq"))]
pub(crate) use reconnect::Live;
#[cfg(any(feature = "redis-streams", feature = "rabbitmq", feature = "nats"))]
pub(crate) use {
    connection::{RECONNECT_BACKOFF, redacted, unavailable},
    reconnect::{Connector, Reconnecting},
};

#[cfg(any(feature = "redis-streams", feature = "rabbitmq", feature = "nats"))]
pub(crate) use crate::sync::lock;

/// The broker URL from `var`, or `default` when it is unset or empty.
pub(crate) fn url_from_env(var: &str, default: &str) -> String {
    match std::env::var(var) {
        Ok(v) if !v.trim().is_empty() => v.trim().to_owned(),
        _ => default.to_owned(),
    }
}

/// What the sources that hold a connection of their own share (Kafka's
/// client, librdkafka, reconnects by itself).
#[cfg(any(feature = "redis-streams", feature = "rabbitmq", feature = "nats"))]
mod connection {
    use std::fmt;
    use std::time::Duration;

    use crate::handler::Backoff;
    use crate::source::SourceError;

    /// The default delays between reconnection attempts.
    pub(crate) const RECONNECT_BACKOFF: Backoff = Backoff {
        min: Duration::from_millis(100),
        max: Duration::from_secs(5),
    };

    /// A short text for logs from any error, with `url`'s password removed.
    pub(crate) fn redacted(error: &dyn fmt::Display, url: &str) -> String {
        crate::redact::redact_text(&error.to_string(), url)
    }

    /// The broker `source` failed at `what`: the loop backs off and retries.
    pub(crate) fn unavailable(
        source: &'static str,
        what: &str,
        e: &dyn fmt::Display,
    ) -> SourceError {
        SourceError::Unavailable {
            source_name: source,
            message: format!("{what}: {e}"),
        }
    }
}
