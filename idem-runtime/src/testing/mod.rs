//! Test tools for handler and store authors (cargo feature `testing`).
//!
//! - [`TestKit`]: run one `#[idempotent]` handler against the in-memory
//!   broker and your store, deliver a message the ways brokers do (twice,
//!   with a lost ack, with a crash between commit and ack, as poison), and
//!   assert what happened from its [`Report`].
//! - [`conformance`]: prove a store implements the [`LeaseStore`] or
//!   [`TxStore`] contract with one call; every built-in store passes it.
//!
//! Not for production: the kit runs the in-memory broker, and the suite
//! writes records under handler names of its own.
//!
//! Add the feature for tests only:
//!
//! ```toml
//! [dev-dependencies]
//! idem = { version = "…", features = ["testing"] }
//! tokio = { version = "1", features = ["macros", "rt-multi-thread"] }
//! ```
//!
//! # A handler
//!
//! ```standalone_crate
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idem_runtime::testing::KitError> {
//! use std::sync::Mutex;
//! use idem::idempotent;
//! use idem::testing::{Message, TestKit};
//!
//! static SHIPPED: Mutex<Vec<String>> = Mutex::new(Vec::new());
//!
//! #[derive(serde::Deserialize)]
//! struct OrderPaid { order_id: String }
//!
//! #[idempotent(topic = "paid", key = "order_id", store = "memory", name = "ship-order", retries = 0)]
//! async fn ship_order(order: OrderPaid) -> Result<(), String> {
//!     if order.order_id == "o-moon" {
//!         return Err("cannot ship to the moon".into());
//!     }
//!     SHIPPED.lock().unwrap().push(order.order_id);
//!     Ok(())
//! }
//!
//! let kit = TestKit::new("ship-order")?;
//! let paid = |id: &str| Message::new(format!(r#"{{"order_id": "{id}"}}"#));
//!
//! kit.deliver_twice(paid("o-1")).await.assert_effect_once();
//! kit.deliver_with_lost_ack(paid("o-2")).await.assert_effect_once();
//! let report = kit.deliver_with_crash_before_ack(paid("o-3")).await;
//! report.assert_effect_once().assert_duplicates(1);
//! assert_eq!(report.restarts(), 1);
//! kit.deliver(paid("o-moon")).await.assert_dead_lettered("cannot ship to the moon");
//! kit.deliver(Message::new(r#"{"order": 1}"#)).await.assert_dead_lettered("missing field `order_id`");
//!
//! assert_eq!(*SHIPPED.lock().unwrap(), ["o-1", "o-2", "o-3"]);
//! # Ok(()) }
//! ```
//!
//! With a SQL store, register it and count your rows afterwards
//! ([`TestKit::builder`] shows it with SQLite).
//!
//! # A store
//!
//! [`conformance::lease_store`] and [`conformance::tx_store`] check every
//! rule the [`LeaseStore`] and [`TxStore`] docs state, and name each rule a
//! store breaks, with the fix. Every built-in store passes, and so does the
//! `MapStore` the [`LeaseStore`] docs write from those rules alone. In a
//! `#[tokio::test]` of your store:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! # use idem::store::memory::MemoryStore as MyStore;
//! idem::testing::conformance::lease_store(|| MyStore::new()).await;
//! # }
//! ```
//!
//! [`LeaseStore`]: crate::store::LeaseStore
//! [`TxStore`]: crate::store::TxStore

mod crash;
mod kit;

pub mod conformance;

pub use kit::{KitError, Report, TestKit, TestKitBuilder};

pub use crate::source::memory::{BrokerEvent, DeadLetterRecord, Faults, MemoryBroker, Message};
