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
//! rule the [`LeaseStore`] and [`TxStore`] docs state. The `MapStore` of the
//! [`LeaseStore`] docs, written from those rules alone, passes; so should
//! yours, in a `#[tokio::test]`:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! # use std::collections::HashMap;
//! # use std::sync::Mutex;
//! # use std::sync::atomic::{AtomicU64, Ordering};
//! # use std::time::Instant;
//! # use idem::store::{Claim, ClaimRequest, Claimed, LeaseStore, StoreError};
//! # use idem::Fingerprint;
//! #
//! # enum Record {
//! #     Lease { token: u64, until: Instant, fingerprint: Option<Fingerprint> },
//! #     Done { expires: Option<Instant>, fingerprint: Option<Fingerprint>, result: Option<String> },
//! # }
//! #
//! # #[derive(Default)]
//! # struct MapStore {
//! #     records: Mutex<HashMap<(String, String), Record>>,
//! #     tokens: AtomicU64,
//! # }
//! #
//! # fn id(r: &ClaimRequest<'_>) -> (String, String) {
//! #     (r.handler.to_owned(), r.key.as_str().to_owned())
//! # }
//! #
//! # impl LeaseStore for MapStore {
//! #     fn kind(&self) -> &'static str { "map" }
//! #
//! #     async fn claim(&self, r: &ClaimRequest<'_>) -> Result<Claim, StoreError> {
//! #         let now = Instant::now();
//! #         let mut records = self.records.lock().unwrap();
//! #         let live = match records.get(&id(r)) {
//! #             Some(Record::Lease { until, fingerprint, .. }) if *until > now => {
//! #                 Some((*fingerprint, Claim::InProgress { retry_after: *until - now }))
//! #             }
//! #             Some(Record::Done { expires, fingerprint, result }) if expires.is_none_or(|e| e > now) => {
//! #                 Some((*fingerprint, Claim::Done { cached: result.clone() }))
//! #             }
//! #             _ => None, // free, or expired
//! #         };
//! #         if let Some((stored, answer)) = live {
//! #             return Ok(r.conflict_with(stored).unwrap_or(answer));
//! #         }
//! #         let token = self.tokens.fetch_add(1, Ordering::Relaxed) + 1;
//! #         records.insert(id(r), Record::Lease { token, until: now + r.lease, fingerprint: r.fingerprint });
//! #         Ok(Claim::New { token })
//! #     }
//! #
//! #     async fn complete(&self, c: &Claimed<'_>) -> Result<(), StoreError> {
//! #         let mut records = self.records.lock().unwrap();
//! #         // Over our own lease (even one that ran out) or nothing; never over
//! #         // another consumer's lease or record.
//! #         let ours = match records.get(&id(c.request)) {
//! #             Some(Record::Lease { token, .. }) => *token == c.token,
//! #             Some(Record::Done { .. }) => false,
//! #             None => true,
//! #         };
//! #         if ours {
//! #             let expires = c.request.ttl.map(|ttl| Instant::now() + ttl);
//! #             let result = c.result.map(str::to_owned);
//! #             records.insert(id(c.request), Record::Done { expires, fingerprint: c.request.fingerprint, result });
//! #         }
//! #         Ok(())
//! #     }
//! #
//! #     async fn release(&self, c: &Claimed<'_>) -> Result<(), StoreError> {
//! #         let mut records = self.records.lock().unwrap();
//! #         if matches!(records.get(&id(c.request)), Some(Record::Lease { token, .. }) if *token == c.token) {
//! #             records.remove(&id(c.request));
//! #         }
//! #         Ok(())
//! #     }
//! #
//! #     async fn purge_expired(&self, limit: u32) -> Result<u64, StoreError> {
//! #         let now = Instant::now();
//! #         let mut records = self.records.lock().unwrap();
//! #         let expired: Vec<_> = records
//! #             .iter()
//! #             .filter(|(_, r)| matches!(r, Record::Done { expires: Some(e), .. } if *e <= now))
//! #             .map(|(k, _)| k.clone())
//! #             .take(limit as usize)
//! #             .collect();
//! #         for k in &expired {
//! #             records.remove(k);
//! #         }
//! #         Ok(expired.len() as u64)
//! #     }
//! # }
//! #
//! // The store of the LeaseStore docs (hidden here):
//! idem::testing::conformance::lease_store(MapStore::default).await;
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
