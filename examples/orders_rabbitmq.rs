//! The order service on RabbitMQ with the SQLite store: a quorum queue per
//! topic, manual acks after the commit, dead letters published under
//! publisher confirms to the `idem.dead-letter` exchange and its
//! `idem-example-orders.dlq` queue. Prints `exactly-once: OK` when every
//! order is in SQLite once and both poison messages are dead letters.
//!
//! ```text
//! AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
//!   cargo run --example orders_rabbitmq --features rabbitmq
//! ```

#[path = "support/orders.rs"]
mod orders;
#[path = "support/producers.rs"]
mod producers;

use std::process::ExitCode;

use idem::source::rabbitmq::{DEFAULT_URL, RabbitMq, URL_ENV};

#[tokio::main]
async fn main() -> ExitCode {
    orders::main("RabbitMQ", async {
        let url = std::env::var(URL_ENV).unwrap_or_else(|_| DEFAULT_URL.into());
        let source = RabbitMq::new(&url)?;
        source.ping().await?;
        let producer = producers::RabbitProducer::connect(&url).await?;
        Ok((source, producer))
    })
    .await
}
