//! Batch handlers: a handler that takes the new messages of a fetched batch
//! at once (`Vec<T>` or `idem::Batch<T>`), e.g. to insert all rows in one
//! statement. Duplicates never reach it; its writes and the batch's dedup
//! rows commit in one transaction; a failing message is isolated so that its
//! neighbours commit once and it alone is retried, then dead-lettered.

mod common;

use std::collections::BTreeMap;
use std::sync::Mutex;

use common::{dedup_rows, effect_counts, order, run_until_idle, sqlite};
use idem::source::memory::MemoryBroker;
use idem::store::memory::MemoryStore;
use idem::{Batch, BatchError, Runtime, Tx, idempotent};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
struct Order {
    order_id: String,
    seq: u32,
}

/// What each call of a handler received, in order.
type Calls = Mutex<Vec<Vec<String>>>;

fn record(calls: &Calls, keys: impl IntoIterator<Item = String>) {
    calls
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(keys.into_iter().collect());
}

fn calls(calls: &Calls) -> Vec<Vec<String>> {
    calls.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// All the rows in one multi-row `INSERT`.
async fn insert_all(tx: &mut Tx<'_>, handler: &str, orders: &[Order]) -> Result<(), sqlx::Error> {
    let mut q = sqlx::QueryBuilder::new("INSERT INTO effects (handler, key, seq) ");
    q.push_values(orders, |mut row, o| {
        row.push_bind(handler)
            .push_bind(&o.order_id)
            .push_bind(o.seq);
    });
    q.build().execute(&mut **tx).await.map(|_| ())
}

// --- Vec<T>: only new messages, one statement, one commit -------------------

static PLAIN: Calls = Mutex::new(Vec::new());

#[idempotent(topic = "plain", key = "order_id", store = "sqlite", name = "bh-plain")]
async fn bh_plain(orders: Vec<Order>, tx: &mut Tx<'_>) -> Result<(), sqlx::Error> {
    record(&PLAIN, orders.iter().map(|o| o.order_id.clone()));
    insert_all(tx, "bh-plain", &orders).await
}

#[tokio::test]
async fn a_batch_handler_sees_only_new_messages_and_commits_once() {
    let store = sqlite().await;
    let broker = MemoryBroker::new();
    for i in 0..10 {
        broker.publish("plain", order(&format!("k{i}"), i));
    }
    let rt = Runtime::builder(broker.clone())
        .store(store.clone())
        .handlers(["bh-plain"])
        .concurrency(64)
        .build()
        .unwrap();
    run_until_idle(&rt, &broker).await;
    // Redeliveries of four of them (new message ids, same keys), and two new.
    for i in [1, 3, 5, 7] {
        broker.publish("plain", order(&format!("k{i}"), i).id(format!("again-{i}")));
    }
    broker.publish("plain", order("k10", 10));
    broker.publish("plain", order("k11", 11));
    run_until_idle(&rt, &broker).await;

    let calls = calls(&PLAIN);
    assert_eq!(calls.len(), 2, "one call per fetched batch: {calls:?}");
    assert_eq!(calls[0].len(), 10, "{calls:?}");
    assert_eq!(
        calls[1],
        ["k10", "k11"],
        "duplicates never reach the handler"
    );
    let counts = effect_counts(&store, "bh-plain").await;
    assert_eq!(counts.len(), 12);
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    assert_eq!(dedup_rows(&store, "bh-plain").await, 12);
    let stats = rt.stats_of("bh-plain").unwrap();
    assert_eq!((stats.processed, stats.duplicate), (12, 4), "{stats:?}");
}

// --- Batch<T> naming the failing message -------------------------------------

static NAMED: Calls = Mutex::new(Vec::new());

#[idempotent(
    topic = "named",
    key = "order_id",
    store = "sqlite",
    name = "bh-named",
    retries = 2,
    backoff = "1ms..2ms"
)]
async fn bh_named(orders: Batch<Order>, tx: &mut Tx<'_>) -> Result<(), BatchError> {
    record(&NAMED, orders.payloads().map(|o| o.order_id.clone()));
    // The deliveries are there too.
    assert!(
        orders
            .iter()
            .all(|(o, d)| !d.id.is_empty() && !o.order_id.is_empty())
    );
    let orders = orders.into_payloads();
    insert_all(tx, "bh-named", &orders).await?;
    if let Some(i) = orders.iter().position(|o| o.order_id == "poison") {
        return Err(BatchError::at(i, "poison is refused by the business rules"));
    }
    Ok(())
}

#[tokio::test]
async fn a_named_failure_isolates_that_message_and_its_neighbours_commit_once() {
    let store = sqlite().await;
    let broker = MemoryBroker::new();
    for i in 0..8 {
        let key = if i == 3 {
            "poison".to_owned()
        } else {
            format!("k{i}")
        };
        broker.publish("named", order(&key, i));
    }
    let rt = Runtime::builder(broker.clone())
        .store(store.clone())
        .handlers(["bh-named"])
        .concurrency(64)
        .build()
        .unwrap();
    run_until_idle(&rt, &broker).await;

    let calls = calls(&NAMED);
    // The whole batch (rolled back; the poison's first attempt), then the
    // part before and the part after the poison, then the poison alone on
    // each of its two retries.
    assert_eq!(calls[0].len(), 8, "{calls:?}");
    assert_eq!(calls[1], ["k0", "k1", "k2"], "{calls:?}");
    assert_eq!(calls[2], ["k4", "k5", "k6", "k7"], "{calls:?}");
    assert!(calls[3..].iter().all(|c| c == &["poison"]), "{calls:?}");
    assert_eq!(calls.len(), 3 + 2, "{calls:?}");
    let counts = effect_counts(&store, "bh-named").await;
    assert_eq!(counts.len(), 7, "{counts:?}");
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    let letters = broker.dead_letters("named.dlq");
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(
        letters[0]
            .letter
            .reason
            .contains("message 0 of the batch: poison is refused"),
        "{letters:?}"
    );
    assert_eq!(rt.stats_of("bh-named").unwrap().processed, 7);
}

// --- an error that names nothing: the batch is halved ----------------------

static HALVED: Calls = Mutex::new(Vec::new());

#[idempotent(
    topic = "halved",
    key = "order_id",
    store = "sqlite",
    name = "bh-halved",
    retries = 0
)]
async fn bh_halved(orders: Vec<Order>, tx: &mut Tx<'_>) -> Result<(), String> {
    record(&HALVED, orders.iter().map(|o| o.order_id.clone()));
    insert_all(tx, "bh-halved", &orders)
        .await
        .map_err(|e| e.to_string())?;
    if orders.iter().any(|o| o.order_id == "poison") {
        return Err("something in this batch is refused".into());
    }
    Ok(())
}

#[tokio::test]
async fn an_anonymous_failure_is_found_by_halving_the_batch() {
    let store = sqlite().await;
    let broker = MemoryBroker::new();
    for i in 0..8 {
        let key = if i == 5 {
            "poison".to_owned()
        } else {
            format!("k{i}")
        };
        broker.publish("halved", order(&key, i));
    }
    let rt = Runtime::builder(broker.clone())
        .store(store.clone())
        .handlers(["bh-halved"])
        .concurrency(64)
        .build()
        .unwrap();
    run_until_idle(&rt, &broker).await;

    let calls = calls(&HALVED);
    // 8 → [0..4) ok, [4..8) fails → [4,5] fails, [6,7] ok → [4] ok, [5] fails alone.
    let sizes: Vec<usize> = calls.iter().map(Vec::len).collect();
    assert_eq!(sizes, [8, 4, 4, 2, 2, 1, 1], "{calls:?}");
    assert_eq!(calls.last().unwrap(), &["poison"]);
    let counts = effect_counts(&store, "bh-halved").await;
    assert_eq!(counts.len(), 7, "{counts:?}");
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    assert_eq!(broker.dead_letters("halved.dlq").len(), 1);
}

// --- a lease store: what came before a named failure took effect -----------

static LEASED: Mutex<BTreeMap<String, u32>> = Mutex::new(BTreeMap::new());

#[idempotent(
    topic = "leased",
    key = "order_id",
    store = "memory",
    name = "bh-leased",
    retries = 0
)]
async fn bh_leased(orders: Vec<Order>) -> Result<(), BatchError> {
    let mut effects = LEASED.lock().unwrap_or_else(|e| e.into_inner());
    // Applies in order and stops at the poison, as the contract says.
    for (i, o) in orders.iter().enumerate() {
        if o.order_id == "poison" {
            return Err(BatchError::at(i, "poison"));
        }
        *effects.entry(o.order_id.clone()).or_default() += 1;
    }
    Ok(())
}

#[tokio::test]
async fn on_a_lease_store_the_messages_before_a_named_failure_count_as_done() {
    let broker = MemoryBroker::new();
    for i in 0..6 {
        let key = if i == 2 {
            "poison".to_owned()
        } else {
            format!("k{i}")
        };
        broker.publish("leased", order(&key, i));
    }
    let rt = Runtime::builder(broker.clone())
        .store(MemoryStore::new())
        .handlers(["bh-leased"])
        .concurrency(64)
        .build()
        .unwrap();
    run_until_idle(&rt, &broker).await;

    let effects = LEASED.lock().unwrap().clone();
    assert_eq!(effects.len(), 5, "{effects:?}");
    assert!(
        effects.values().all(|&n| n == 1),
        "every effect once: {effects:?}"
    );
    let store = rt.store::<MemoryStore>().unwrap();
    for k in ["k0", "k1", "k3", "k4", "k5"] {
        assert!(store.is_done("bh-leased", k), "{k} has no done-record");
    }
    assert!(!store.is_done("bh-leased", "poison"));
    assert_eq!(broker.dead_letters("leased.dlq").len(), 1);
}
