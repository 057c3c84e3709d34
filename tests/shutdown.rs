//! Graceful shutdown: stop fetching, finish in-flight work, hand back what
//! cannot finish within the timeout.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{dedup_rows, effect_counts, order, sqlite};
use idem::source::memory::{BrokerEvent, MemoryBroker};
use idem::{CancellationToken, Runtime, Tx, idempotent};
use serde::Deserialize;
use tokio::sync::{Notify, Semaphore};

#[derive(Debug, Deserialize)]
struct Order {
    order_id: String,
    seq: u32,
}

static STARTED: AtomicU32 = AtomicU32::new(0);
static STARTED_SIGNAL: Notify = Notify::const_new();
static GATE: Semaphore = Semaphore::const_new(0);

static SLOW_EFFECTS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

// The memory store: four handlers in flight at once (SQLite has one writer,
// so its transactions would run one after another).
#[idempotent(topic = "slow", key = "order_id", store = "memory", name = "sd-slow")]
async fn sd_slow(o: Order) -> Result<(), std::convert::Infallible> {
    STARTED.fetch_add(1, Ordering::SeqCst);
    STARTED_SIGNAL.notify_one();
    GATE.acquire().await.expect("gate open").forget();
    SLOW_EFFECTS.lock().unwrap().push(o.order_id);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_in_flight_messages_and_fetches_no_more() {
    let broker = MemoryBroker::new();
    for i in 0..4 {
        broker.publish("slow", order(&format!("k{i}"), i).id(format!("m{i}")));
    }
    let rt = Runtime::builder(broker.clone())
        .store(idem::store::memory::MemoryStore::new())
        .concurrency(4)
        .shutdown_timeout(Duration::from_secs(30))
        .handlers(["sd-slow"])
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let rt = std::sync::Arc::new(rt);
    let running = tokio::spawn({
        let (rt, stop) = (rt.clone(), stop.clone());
        async move { rt.run(stop).await }
    });
    tokio::time::timeout(Duration::from_secs(30), async {
        while STARTED.load(Ordering::SeqCst) < 4 {
            STARTED_SIGNAL.notified().await;
        }
    })
    .await
    .expect("four handlers in flight");
    stop.cancel();
    // Published after the stop: must not be fetched.
    broker.publish("slow", order("late", 9).id("late"));
    GATE.add_permits(4);
    tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("shutdown finishes")
        .unwrap();

    let mut done = SLOW_EFFECTS.lock().unwrap().clone();
    done.sort();
    assert_eq!(
        done,
        ["k0", "k1", "k2", "k3"],
        "every in-flight message finished"
    );
    let ev = broker.events();
    for i in 0..4 {
        assert!(
            ev.contains(&BrokerEvent::Acked {
                id: format!("m{i}")
            }),
            "m{i} acked: {ev:?}"
        );
    }
    assert!(
        !ev.iter()
            .any(|e| matches!(e, BrokerEvent::Delivered { id, .. } if id == "late"))
    );
}

#[idempotent(topic = "stuck", key = "order_id", store = "sqlite", name = "sd-stuck")]
async fn sd_stuck(o: Order, tx: &mut Tx<'_>) -> Result<(), sqlx::Error> {
    common::insert_effect(tx, "sd-stuck", &o.order_id, o.seq).await?;
    STARTED_STUCK.notify_one();
    std::future::pending::<()>().await;
    Ok(())
}

static STARTED_STUCK: Notify = Notify::const_new();

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_timeout_hands_unfinished_messages_back() {
    let store = sqlite().await;
    let broker = MemoryBroker::new();
    broker.publish("stuck", order("k1", 1).id("m1"));
    let rt = Runtime::builder(broker.clone())
        .store(store.clone())
        .shutdown_timeout(Duration::from_millis(200))
        .handlers(["sd-stuck"])
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let run = rt.run(stop.clone());
    let trigger = async {
        tokio::time::timeout(Duration::from_secs(30), STARTED_STUCK.notified())
            .await
            .expect("handler starts");
        stop.cancel();
    };
    tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(run, trigger)
    })
    .await
    .expect("shutdown ends");

    let ev = broker.events();
    assert_eq!(
        ev.last(),
        Some(&BrokerEvent::Nacked { id: "m1".into() }),
        "handed back: {ev:?}"
    );
    assert!(!broker.is_idle(), "the message waits for the next consumer");
    // The aborted handler's transaction never committed.
    assert!(effect_counts(&store, "sd-stuck").await.is_empty());
    assert_eq!(dedup_rows(&store, "sd-stuck").await, 0);
}
