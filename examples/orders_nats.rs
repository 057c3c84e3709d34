//! The order service on NATS JetStream with the SQLite store: a durable pull
//! consumer per handler, explicit acks after the commit, dead letters
//! published to `idem-example-orders.dlq` before the original is terminated.
//! Prints `exactly-once: OK` when every order is in SQLite once and both
//! poison messages are dead letters.
//!
//! ```text
//! NATS_URL=nats://127.0.0.1:4222 cargo run --example orders_nats --features nats
//! ```

#[path = "support/orders.rs"]
mod orders;
#[path = "support/producers.rs"]
mod producers;

use std::process::ExitCode;

use idem::source::nats::{DEFAULT_URL, NatsJetStream, URL_ENV};

#[tokio::main]
async fn main() -> ExitCode {
    orders::main("NATS JetStream", async {
        let url = std::env::var(URL_ENV).unwrap_or_else(|_| DEFAULT_URL.into());
        let source = NatsJetStream::new(&url)?;
        source.ping().await?;
        let producer = producers::NatsProducer::connect(&url).await?;
        Ok((source, producer))
    })
    .await
}
