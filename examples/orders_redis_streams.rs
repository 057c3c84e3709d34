//! The order service on Redis Streams with the SQLite store: a consumer
//! group per handler, `XACK` after the commit, dead letters in
//! `idem-example-orders.dlq`. Prints `exactly-once: OK` when every order is
//! in SQLite once and both poison messages are dead letters.
//!
//! ```text
//! REDIS_URL=redis://127.0.0.1:6379 \
//!   cargo run --example orders_redis_streams --features redis-streams
//! ```

#[path = "support/orders.rs"]
mod orders;
#[path = "support/producers.rs"]
mod producers;

use std::process::ExitCode;

use idem::source::redis_streams::{DEFAULT_URL, RedisStreams, URL_ENV};

#[tokio::main]
async fn main() -> ExitCode {
    orders::main("Redis Streams", async {
        let url = std::env::var(URL_ENV).unwrap_or_else(|_| DEFAULT_URL.into());
        let source = RedisStreams::new(&url)?;
        source.ping().await?;
        let producer = producers::RedisProducer::connect(&url).await?;
        Ok((source, producer))
    })
    .await
}
