//! The delivery semantics of DESIGN.md §1 with the SQLite store (dedup row
//! and business writes in one transaction) and the in-memory broker.

mod common;

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use common::{dedup_rows, effect_counts, order, run_until_idle, sqlite};
use idem::source::memory::{BrokerEvent, Faults, MemoryBroker, Message};
use idem::{Runtime, Tx, idempotent};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Order {
    order_id: String,
    seq: u32,
}

#[derive(Debug)]
struct AppError(String);
impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

async fn apply(tx: &mut Tx<'_>, handler: &str, o: &Order) -> Result<(), AppError> {
    common::insert_effect(tx, handler, &o.order_id, o.seq)
        .await
        .map_err(|e| AppError(e.to_string()))
}

// --- a message delivered many times applies its effect once -------------

#[idempotent(topic = "dup", key = "order_id", store = "sqlite", name = "sq-dup")]
async fn sq_dup(o: Order, tx: &mut Tx<'_>) -> Result<(), AppError> {
    apply(tx, "sq-dup", &o).await
}

#[tokio::test]
async fn redelivered_message_applies_once() {
    let store = sqlite().await;
    let broker = MemoryBroker::with_faults(Faults {
        lose_ack: 0.3,
        seed: 7,
        ..Faults::default()
    });
    for i in 0..40 {
        // Each message three times with the same id: broker duplicates.
        for _ in 0..3 {
            broker.publish("dup", order(&format!("k{i}"), 0).id(format!("m{i}")));
        }
    }
    let rt = Runtime::builder(broker.clone())
        .store(store.clone())
        .handlers(["sq-dup"])
        .build()
        .unwrap();
    run_until_idle(&rt, &broker).await;

    let counts = effect_counts(&store, "sq-dup").await;
    assert_eq!(counts.len(), 40);
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    let stats = rt.stats_of("sq-dup").unwrap();
    assert_eq!(stats.processed, 40);
    assert!(stats.duplicate >= 80, "{stats:?}");
    assert!(
        broker
            .events()
            .iter()
            .any(|e| matches!(e, BrokerEvent::AckLost { .. }))
    );
}

// --- a handler error rolls back effect and dedup row; the retry succeeds --

static FLAKY_CALLS: AtomicU32 = AtomicU32::new(0);

#[idempotent(
    topic = "flaky",
    key = "order_id",
    store = "sqlite",
    name = "sq-flaky",
    retries = 3,
    backoff = "1ms..5ms"
)]
async fn sq_flaky(o: Order, tx: &mut Tx<'_>) -> Result<(), AppError> {
    apply(tx, "sq-flaky", &o).await?;
    // The effect row is written, then the handler fails: the rollback must
    // take the row and the dedup record with it.
    if FLAKY_CALLS.fetch_add(1, Ordering::SeqCst) == 0 {
        return Err(AppError("transient failure".into()));
    }
    Ok(())
}

#[tokio::test]
async fn handler_error_rolls_back_effect_and_dedup_row_then_retry_succeeds() {
    let store = sqlite().await;
    let broker = MemoryBroker::new();
    broker.publish("flaky", order("k1", 0));
    let rt = Runtime::builder(broker.clone())
        .store(store.clone())
        .handlers(["sq-flaky"])
        .build()
        .unwrap();
    run_until_idle(&rt, &broker).await;

    assert_eq!(
        FLAKY_CALLS.load(Ordering::SeqCst),
        2,
        "one failed attempt, one retry"
    );
    assert_eq!(effect_counts(&store, "sq-flaky").await.get("k1"), Some(&1));
    assert_eq!(dedup_rows(&store, "sq-flaky").await, 1);
    let stats = rt.stats_of("sq-flaky").unwrap();
    assert_eq!((stats.failed, stats.retried, stats.processed), (1, 1, 1));
}

// --- a panic rolls back too ------------------------------------------------

static PANIC_CALLS: AtomicU32 = AtomicU32::new(0);

#[idempotent(
    topic = "panics",
    key = "order_id",
    store = "sqlite",
    name = "sq-panic",
    retries = 2,
    backoff = "1ms..2ms"
)]
async fn sq_panic(o: Order, tx: &mut Tx<'_>) -> Result<(), AppError> {
    apply(tx, "sq-panic", &o).await?;
    if PANIC_CALLS.fetch_add(1, Ordering::SeqCst) == 0 {
        panic!("boom in the handler");
    }
    Ok(())
}

#[tokio::test]
async fn handler_panic_rolls_back_and_retries() {
    let store = sqlite().await;
    let broker = MemoryBroker::new();
    broker.publish("panics", order("k1", 0));
    let rt = Runtime::builder(broker.clone())
        .store(store.clone())
        .handlers(["sq-panic"])
        .build()
        .unwrap();
    run_until_idle(&rt, &broker).await;
    assert_eq!(PANIC_CALLS.load(Ordering::SeqCst), 2);
    assert_eq!(effect_counts(&store, "sq-panic").await.get("k1"), Some(&1));
}

// --- crash between commit and ack: redelivery acked without running -------

static CRASH_CALLS: AtomicU32 = AtomicU32::new(0);

#[idempotent(topic = "crash", key = "order_id", store = "sqlite", name = "sq-crash")]
async fn sq_crash(o: Order, tx: &mut Tx<'_>) -> Result<u32, AppError> {
    CRASH_CALLS.fetch_add(1, Ordering::SeqCst);
    apply(tx, "sq-crash", &o).await?;
    Ok(o.seq)
}

#[tokio::test]
async fn crash_between_commit_and_ack_is_acked_as_duplicate() {
    let store = sqlite().await;
    let broker = MemoryBroker::new();
    broker.publish("crash", order("k1", 42).id("m1"));
    broker.lose_next_acks("crash", "m1", 1);
    let rt = Runtime::builder(broker.clone())
        .store(store.clone())
        .handlers(["sq-crash"])
        .build()
        .unwrap();
    run_until_idle(&rt, &broker).await;

    assert_eq!(
        CRASH_CALLS.load(Ordering::SeqCst),
        1,
        "the redelivery must not run the handler"
    );
    assert_eq!(effect_counts(&store, "sq-crash").await.get("k1"), Some(&1));
    let ev = broker.events();
    let delivered = ev
        .iter()
        .filter(|e| matches!(e, BrokerEvent::Delivered { .. }))
        .count();
    assert_eq!(delivered, 2);
    assert!(
        matches!(ev.last(), Some(BrokerEvent::Acked { id }) if id == "m1"),
        "{ev:?}"
    );
    assert_eq!(rt.stats_of("sq-crash").unwrap().duplicate, 1);
    // The cached result is stored with the dedup row.
    let cached: Option<String> =
        sqlx::query_scalar("SELECT result FROM idem_dedup WHERE handler = 'sq-crash'")
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(cached.as_deref(), Some("42"));
}

// --- ack = "before": at most once -----------------------------------------

#[idempotent(
    topic = "before",
    key = "order_id",
    store = "sqlite",
    name = "sq-before",
    ack = "before"
)]
async fn sq_before(o: Order, tx: &mut Tx<'_>) -> Result<(), AppError> {
    apply(tx, "sq-before", &o).await?;
    Err(AppError("always fails".into()))
}

#[tokio::test]
async fn ack_before_loses_the_message_on_failure() {
    let store = sqlite().await;
    let broker = MemoryBroker::new();
    broker.publish("before", order("k1", 0).id("m1"));
    let rt = Runtime::builder(broker.clone())
        .store(store.clone())
        .handlers(["sq-before"])
        .build()
        .unwrap();
    run_until_idle(&rt, &broker).await;

    let ev = broker.events();
    assert_eq!(
        ev,
        vec![
            BrokerEvent::Published { id: "m1".into() },
            BrokerEvent::Delivered {
                id: "m1".into(),
                attempt: 1
            },
            BrokerEvent::Acked { id: "m1".into() },
        ],
        "acked before the handler ran, never redelivered, never dead-lettered"
    );
    assert!(effect_counts(&store, "sq-before").await.is_empty());
    assert_eq!(rt.stats_of("sq-before").unwrap().failed, 1);
}

// --- per-key ordering under concurrency 16 --------------------------------

static ORDER_LOG: Mutex<Vec<(String, u32)>> = Mutex::new(Vec::new());
static IN_PROGRESS: Mutex<Vec<String>> = Mutex::new(Vec::new());
static OVERLAPS: AtomicU32 = AtomicU32::new(0);

#[idempotent(topic = "ordered", key = ("order_id", "seq"), store = "memory", name = "mem-ordered", ordered = true)]
async fn mem_ordered(o: Order) -> Result<(), AppError> {
    {
        let mut busy = IN_PROGRESS.lock().unwrap();
        if busy.contains(&o.order_id) {
            OVERLAPS.fetch_add(1, Ordering::SeqCst);
        }
        busy.push(o.order_id.clone());
    }
    // Give other messages every chance to overtake this one.
    for _ in 0..(10 - o.seq) {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(u64::from(
        5 - o.seq.min(5),
    )))
    .await;
    ORDER_LOG.lock().unwrap().push((o.order_id.clone(), o.seq));
    let mut busy = IN_PROGRESS.lock().unwrap();
    let at = busy.iter().position(|k| *k == o.order_id).unwrap();
    busy.remove(at);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_key_ordering_holds_under_concurrency_16() {
    let broker = MemoryBroker::new();
    for seq in 0..10 {
        for k in 0..16 {
            let key = format!("c{k}");
            broker.publish("ordered", order(&key, seq).ordering_key(key.clone()));
        }
    }
    let rt = Runtime::builder(broker.clone())
        .store(idem::store::memory::MemoryStore::new())
        .concurrency(16)
        .handlers(["mem-ordered"])
        .build()
        .unwrap();
    run_until_idle(&rt, &broker).await;

    assert_eq!(
        OVERLAPS.load(Ordering::SeqCst),
        0,
        "two messages of one key ran at once"
    );
    let log = ORDER_LOG.lock().unwrap();
    assert_eq!(log.len(), 160);
    let mut per_key: HashMap<&str, Vec<u32>> = HashMap::new();
    for (k, s) in log.iter() {
        per_key.entry(k).or_default().push(*s);
    }
    for (k, seqs) in per_key {
        assert_eq!(seqs, (0..10).collect::<Vec<_>>(), "order of {k}");
    }
}

// --- poison messages reach the dead letters with their reason -------------

#[idempotent(
    topic = "poison",
    key = "order_id",
    store = "sqlite",
    name = "sq-poison",
    retries = 2,
    backoff = "1ms..2ms"
)]
async fn sq_poison(o: Order, tx: &mut Tx<'_>) -> Result<(), AppError> {
    if o.order_id == "bad" {
        return Err(AppError("cannot ship to the moon".into()));
    }
    apply(tx, "sq-poison", &o).await
}

#[tokio::test]
async fn poison_messages_are_dead_lettered_with_reason() {
    let store = sqlite().await;
    let broker = MemoryBroker::new();
    broker.publish("poison", Message::new("{not json").id("garbage"));
    broker.publish(
        "poison",
        Message::new(r#"{"order_id": 5, "seq": 0}"#).id("wrong-type"),
    );
    broker.publish("poison", order("bad", 0).id("fails"));
    broker.publish("poison", order("good", 0).id("fine"));
    let rt = Runtime::builder(broker.clone())
        .store(store.clone())
        .handlers(["sq-poison"])
        .build()
        .unwrap();
    run_until_idle(&rt, &broker).await;

    let dl = broker.dead_letters("poison.dlq");
    let by_id: HashMap<&str, &idem::DeadLetter> =
        dl.iter().map(|r| (&*r.delivery.id, &r.letter)).collect();
    assert_eq!(by_id.len(), 3, "{dl:?}");
    assert!(
        by_id["garbage"].reason.starts_with("undecodable payload"),
        "{:?}",
        by_id["garbage"]
    );
    assert!(
        by_id["wrong-type"].reason.contains("invalid type"),
        "{:?}",
        by_id["wrong-type"]
    );
    assert!(
        by_id["fails"].reason.contains("cannot ship to the moon"),
        "{:?}",
        by_id["fails"]
    );
    assert!(
        by_id["fails"].reason.contains("after 3 attempts"),
        "{:?}",
        by_id["fails"]
    );
    assert_eq!(by_id["fails"].attempts, 3);
    assert_eq!(by_id["fails"].handler, "sq-poison");
    assert_eq!(
        effect_counts(&store, "sq-poison").await.get("good"),
        Some(&1),
        "the neighbour is processed"
    );
}

// --- a missing key is never an (empty) key --------------------------------

#[derive(Debug, Deserialize)]
struct MaybeOrder {
    order_id: Option<String>,
}

#[idempotent(
    topic = "nokey",
    key = "order_id",
    store = "sqlite",
    name = "sq-nokey",
    on_missing_key = "dead_letter"
)]
async fn sq_nokey(o: MaybeOrder, tx: &mut Tx<'_>) -> Result<(), AppError> {
    let key = o.order_id.unwrap_or_default();
    apply(
        tx,
        "sq-nokey",
        &Order {
            order_id: key,
            seq: 0,
        },
    )
    .await
}

#[idempotent(topic = "nohdr", key = header("Idempotency-Key"), store = "sqlite", name = "sq-nohdr")]
async fn sq_nohdr(o: Order, tx: &mut Tx<'_>) -> Result<(), AppError> {
    apply(tx, "sq-nohdr", &o).await
}

#[tokio::test]
async fn missing_keys_are_dead_lettered_never_shared() {
    let store = sqlite().await;
    let broker = MemoryBroker::new();
    broker.publish("nokey", Message::new(r#"{"order_id": null}"#).id("a"));
    broker.publish("nokey", Message::new(r#"{}"#).id("b"));
    broker.publish("nokey", Message::new(r#"{"order_id": ""}"#).id("c"));
    broker.publish("nohdr", order("x", 0).id("d"));
    broker.publish("nohdr", order("y", 0).id("e").header("Idempotency-Key", ""));
    broker.publish(
        "nohdr",
        order("z", 0).id("f").header("Idempotency-Key", "idem-1"),
    );
    let rt = Runtime::builder(broker.clone())
        .store(store.clone())
        .handlers(["sq-nokey", "sq-nohdr"])
        .build()
        .unwrap();
    run_until_idle(&rt, &broker).await;

    let nokey = broker.dead_letters("nokey.dlq");
    assert_eq!(nokey.len(), 3);
    assert!(
        nokey
            .iter()
            .all(|r| r.letter.reason.starts_with("missing key")),
        "{nokey:?}"
    );
    let nohdr = broker.dead_letters("nohdr.dlq");
    assert_eq!(nohdr.len(), 2);
    assert!(
        nohdr
            .iter()
            .all(|r| r.letter.reason.contains("header Idempotency-Key")),
        "{nohdr:?}"
    );
    assert_eq!(dedup_rows(&store, "sq-nokey").await, 0);
    assert_eq!(dedup_rows(&store, "sq-nohdr").await, 1);
    assert!(effect_counts(&store, "sq-nokey").await.is_empty());
}

// --- batch: one failing item is retried alone ------------------------------
//
// A batch runs in one transaction without savepoints; when an item fails,
// the transaction is rolled back and the batch runs again without it, each
// item in a savepoint. The items before the failing one therefore run twice
// (their first run was rolled back); every effect commits once, and the
// failing item alone is retried.

static BATCH_CALLS: Mutex<Vec<String>> = Mutex::new(Vec::new());

#[idempotent(
    topic = "batch",
    key = "order_id",
    store = "sqlite",
    name = "sq-batch",
    ack = "batch",
    retries = 3,
    backoff = "1ms..2ms"
)]
async fn sq_batch(o: Order, tx: &mut Tx<'_>) -> Result<(), AppError> {
    let first_time = {
        let mut calls = BATCH_CALLS.lock().unwrap();
        let first = !calls.contains(&o.order_id);
        calls.push(o.order_id.clone());
        first
    };
    apply(tx, "sq-batch", &o).await?;
    if o.order_id == "k3" && first_time {
        return Err(AppError("k3 fails once".into()));
    }
    Ok(())
}

#[tokio::test]
async fn batch_item_failure_retries_only_that_item() {
    let store = sqlite().await;
    let broker = MemoryBroker::new();
    for i in 1..=6 {
        broker.publish("batch", order(&format!("k{i}"), 0).id(format!("m{i}")));
    }
    let rt = Runtime::builder(broker.clone())
        .store(store.clone())
        .concurrency(8)
        .handlers(["sq-batch"])
        .build()
        .unwrap();
    run_until_idle(&rt, &broker).await;

    let calls = BATCH_CALLS.lock().unwrap().clone();
    let runs = |k: &str| calls.iter().filter(|c| *c == k).count();
    // Before the failure: the rolled-back run and the one that committed.
    for k in ["k1", "k2"] {
        assert_eq!(runs(k), 2, "{k}: {calls:?}");
    }
    // After it: never run before the redo.
    for k in ["k4", "k5", "k6"] {
        assert_eq!(runs(k), 1, "{k} ran more than once: {calls:?}");
    }
    // The failing item is not run again in the redo, only retried alone.
    assert_eq!(runs("k3"), 2, "{calls:?}");
    let counts = effect_counts(&store, "sq-batch").await;
    assert_eq!(counts.len(), 6);
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    assert_eq!(dedup_rows(&store, "sq-batch").await, 6);
}
