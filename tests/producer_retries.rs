//! Producer retries are duplicates, not conflicts, on every store.
//!
//! A real producer that retries does not resend the bytes it sent: it
//! serialises its event again, maybe with another library (keys in another
//! order), pretty-printed, or with a fresh `sent_at`. All of that is the same
//! message, and idem must ack it as a duplicate without running the handler.
//! Only a handler that opts in with `fingerprint = [...]` sees a change of
//! the named fields as "same key, other message" (a key conflict).

// `mysql` and `pg` each carry their own copy of the shared SQL test helpers.
#![allow(clippy::duplicate_mod)]

mod common;
#[path = "common/mysql.rs"]
mod mysql;
#[path = "common/pg.rs"]
mod pg;
#[path = "common/redis.rs"]
mod redis_common;

use std::collections::BTreeMap;
use std::sync::Mutex;

use common::run_until_idle;
use idem::source::memory::{MemoryBroker, Message};
use idem::{Runtime, idempotent};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Customer {
    email: String,
    country: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Item {
    sku: String,
    quantity: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: String,
    customer: Customer,
    items: Vec<Item>,
    amount: u64,
    currency: String,
    sent_at: String,
}

fn order() -> OrderPlaced {
    OrderPlaced {
        order_id: "ord-2026-11-26-0042".into(),
        customer: Customer {
            email: "ada@example.com".into(),
            country: "DE".into(),
        },
        items: vec![
            Item {
                sku: "SKU-1001".into(),
                quantity: 2,
            },
            Item {
                sku: "SKU-2040".into(),
                quantity: 1,
            },
        ],
        amount: 45_90,
        currency: "EUR".into(),
        sent_at: "2026-11-26T10:15:03.118Z".into(),
    }
}

/// The first send: the struct's own field order, compact.
fn original() -> String {
    serde_json::to_string(&order()).unwrap()
}

/// The retries a producer really sends for the same order, each a new
/// message (its own message id).
fn retries() -> Vec<(&'static str, String)> {
    let o = order();
    // Another serialiser: object members in alphabetical order.
    let reordered = serde_json::to_string(&serde_json::to_value(&o).unwrap()).unwrap();
    let pretty = serde_json::to_string_pretty(&o).unwrap();
    let mut later = o.clone();
    later.sent_at = "2026-11-26T10:15:09.502Z".into();
    let resent = serde_json::to_string(&later).unwrap();
    for (what, text) in [
        ("reordered", &reordered),
        ("pretty", &pretty),
        ("resent", &resent),
    ] {
        assert_ne!(text, &original(), "the {what} retry must differ in bytes");
    }
    vec![
        ("retry-reordered", reordered),
        ("retry-pretty", pretty),
        ("retry-resent", resent),
    ]
}

/// Not a retry: the producer reused the order's key for another amount.
fn changed_amount() -> String {
    let mut o = order();
    o.amount = 99_00;
    serde_json::to_string(&o).unwrap()
}

static EFFECTS: Mutex<BTreeMap<(String, String), u32>> = Mutex::new(BTreeMap::new());

fn apply(handler: &str, o: &OrderPlaced) {
    let mut effects = EFFECTS.lock().unwrap_or_else(|e| e.into_inner());
    *effects
        .entry((handler.to_owned(), o.order_id.clone()))
        .or_default() += 1;
}

fn effects_of(handler: &str) -> BTreeMap<String, u32> {
    EFFECTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|((h, _), _)| h == handler)
        .map(|((_, k), n)| (k.clone(), *n))
        .collect()
}

/// Publishes the original, lets it commit, then the retries (and, for the
/// handler that fingerprints `amount`, the changed amount).
async fn deliver(
    rt: &Runtime<MemoryBroker>,
    broker: &MemoryBroker,
    topic: &str,
    also: Option<String>,
) {
    broker.publish(topic, Message::new(original()).id("first-send"));
    run_until_idle(rt, broker).await;
    for (id, text) in retries() {
        broker.publish(topic, Message::new(text).id(id));
    }
    if let Some(text) = also {
        broker.publish(topic, Message::new(text).id("changed-amount"));
    }
    run_until_idle(rt, broker).await;
}

async fn retries_are_duplicates<S: idem::DedupStore<M>, M>(store: S, handler: &str, topic: &str) {
    let broker = MemoryBroker::new();
    let rt = Runtime::builder(broker.clone())
        .store(store)
        .handlers([handler])
        .build()
        .unwrap();
    deliver(&rt, &broker, topic, None).await;

    let effects = effects_of(handler);
    assert_eq!(effects.get("ord-2026-11-26-0042"), Some(&1), "{effects:?}");
    let stats = rt.stats_of(handler).unwrap();
    assert_eq!(
        (stats.processed, stats.duplicate, stats.dead_lettered),
        (1, 3, 0),
        "{stats:?}"
    );
    let letters = broker.dead_letters(&format!("{topic}.dlq"));
    assert!(
        letters.is_empty(),
        "retries were dead-lettered: {letters:?}"
    );
}

async fn changed_amount_is_a_conflict<S: idem::DedupStore<M>, M>(
    store: S,
    handler: &str,
    topic: &str,
) {
    let broker = MemoryBroker::new();
    let rt = Runtime::builder(broker.clone())
        .store(store)
        .handlers([handler])
        .build()
        .unwrap();
    deliver(&rt, &broker, topic, Some(changed_amount())).await;

    let effects = effects_of(handler);
    assert_eq!(effects.get("ord-2026-11-26-0042"), Some(&1), "{effects:?}");
    let stats = rt.stats_of(handler).unwrap();
    // The re-serialised retry and the one with a new `sent_at` are
    // duplicates: `sent_at` is not compared.
    assert_eq!(
        (stats.processed, stats.duplicate, stats.dead_lettered),
        (1, 3, 1),
        "{stats:?}"
    );
    let letters = broker.dead_letters(&format!("{topic}.dlq"));
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(&*letters[0].delivery.id, "changed-amount");
    let reason = &letters[0].letter.reason;
    for part in [
        "key conflict",
        &format!("handler {handler:?}"),
        "key ord-2026-11-26-0042",
        r#"fingerprint = ["amount"]"#,
    ] {
        assert!(reason.contains(part), "{part:?} missing from: {reason}");
    }
}

/// The two handlers of one store, and its two tests. (rustfmt re-indents an
/// attribute inside `macro_rules!` on every run: it is kept away.)
#[rustfmt::skip]
macro_rules! store_suite {
    ($module:ident, $store:literal, $default:literal, $by_amount:literal, $open:expr) => {
        mod $module {
            use super::*;

            #[idempotent(topic = "orders", key = "order_id", store = $store, name = $default)]
            async fn by_key(o: OrderPlaced) -> Result<(), String> {
                apply($default, &o);
                Ok(())
            }

            #[idempotent(topic = "orders-by-amount", key = "order_id", store = $store,
                          name = $by_amount, fingerprint = ["amount"])]
            async fn by_amount(o: OrderPlaced) -> Result<(), String> {
                apply($by_amount, &o);
                Ok(())
            }

            #[tokio::test]
            async fn producer_retries_are_acked_as_duplicates() {
                retries_are_duplicates($open, $default, "orders").await;
            }

            #[tokio::test]
            async fn with_fingerprint_a_changed_amount_is_a_conflict_and_a_new_timestamp_is_not() {
                changed_amount_is_a_conflict($open, $by_amount, "orders-by-amount").await;
            }
        }
    };
}

store_suite!(
    memory,
    "memory",
    "retries-memory",
    "retries-memory-amount",
    idem::store::memory::MemoryStore::new()
);
store_suite!(
    sqlite,
    "sqlite",
    "retries-sqlite",
    "retries-sqlite-amount",
    common::sqlite().await
);
store_suite!(
    postgres,
    "postgres",
    "retries-postgres",
    "retries-postgres-amount",
    pg::Db::new().await.store
);
store_suite!(
    mysql_store,
    "mysql",
    "retries-mysql",
    "retries-mysql-amount",
    mysql::Db::new().await.store
);
store_suite!(
    redis,
    "redis",
    "retries-redis",
    "retries-redis-amount",
    redis_common::shared_store(
        idem::store::redis::RedisStore::builder(&redis_common::shared_url())
            .prefix(redis_common::unique_prefix("producer-retries"))
    )
    .await
);
