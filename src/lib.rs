//! # idem — idempotent message handlers
//!
//! Brokers deliver at least once. idem makes the *effect* of each message
//! happen once: annotate an async fn with [`#[idempotent]`](idempotent), and
//! the runtime decodes each delivery, extracts its idempotency key, claims it
//! in a dedup store, runs the handler inside the store's transaction, commits,
//! and only then acks. A redelivered message finds its record and is acked
//! without running the handler again.
//!
//! ```
//! use idem::source::memory::{MemoryBroker, Message};
//! use idem::store::sqlite::SqliteStore;
//! use idem::{idempotent, Runtime, Tx};
//!
//! #[derive(serde::Deserialize)]
//! struct OrderPlaced { order_id: String, amount_cents: i64 }
//!
//! #[idempotent(topic = "orders", key = "order_id", store = "sqlite", name = "place-order")]
//! async fn place_order(order: OrderPlaced, tx: &mut Tx<'_>) -> Result<(), sqlx::Error> {
//!     sqlx::query("INSERT INTO orders (id, amount_cents) VALUES (?, ?)")
//!         .bind(&order.order_id)
//!         .bind(order.amount_cents)
//!         .execute(&mut **tx)
//!         .await?;
//!     Ok(())
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = SqliteStore::open("sqlite::memory:").await?;
//! store.migrate().await?;
//! sqlx::query("CREATE TABLE orders (id TEXT, amount_cents INTEGER)").execute(store.pool()).await?;
//!
//! let broker = MemoryBroker::new();
//! let msg = r#"{"order_id": "o-1", "amount_cents": 1250}"#;
//! broker.publish("orders", Message::new(msg).id("m-1"));
//! broker.publish("orders", Message::new(msg).id("m-1")); // delivered twice
//!
//! let runtime = Runtime::builder(broker.clone()).store(store.clone()).build()?;
//! runtime.run_until(broker.wait_idle()).await;
//!
//! let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM orders").fetch_one(store.pool()).await?;
//! assert_eq!(rows, 1);
//! assert_eq!(runtime.stats_of("place-order").unwrap().duplicate, 1);
//! # Ok(()) }
//! ```
//!
//! Every argument of the attribute, its values and default, and the rules for
//! the handler's parameters are on [`idempotent`]. The delivery semantics per
//! ack mode and store, and how to plug in your own key extractor, store or
//! source are described in the README. Set `IDEM_MACROS_DEBUG=1` while
//! compiling to print what the macro generates.
#![forbid(unsafe_code)]

pub use idem_macros::idempotent;
pub use idem_runtime::*;

/// The examples of [`idempotent`]'s documentation, run as doctests here
/// (the macro crate has no `idem` to run them with).
#[cfg(doctest)]
#[doc = include_str!("../idem-macros/src/idempotent.md")]
pub struct IdempotentDocExamples;
