//! The order service on Kafka with the SQLite store: one consumer group per
//! handler, offsets committed as the per-partition watermark of finished
//! messages (never past one still running), dead letters produced to
//! `idem-example-orders.dlq` with `acks=all` before the offset moves on.
//! Prints `exactly-once: OK` when every order is in SQLite once and both
//! poison messages are dead letters.
//!
//! ```text
//! KAFKA_BROKERS=127.0.0.1:9092 cargo run --example orders_kafka --features kafka
//! ```

#[path = "support/orders.rs"]
mod orders;
#[path = "support/producers.rs"]
mod producers;

use std::process::ExitCode;

use idem::source::kafka::Kafka;

#[tokio::main]
async fn main() -> ExitCode {
    orders::main("Kafka", async {
        let source = Kafka::from_env()?;
        source.ping().await?;
        let producer = producers::KafkaProducer::connect(source.brokers())?;
        Ok((source, producer))
    })
    .await
}
