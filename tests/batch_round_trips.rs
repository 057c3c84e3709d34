//! What a batch costs on the wire (PostgreSQL, counted by a proxy between
//! the store and the server): one round trip to begin, one claim for every
//! key, the handlers' own statements, one commit. No savepoint on the happy
//! path; only a batch with a failing item pays for isolation, and only once.
//!
//! `cargo test --test batch_round_trips -- --nocapture` prints the figures.

mod common;
#[path = "common/pg.rs"]
mod pg;

use std::sync::atomic::{AtomicBool, Ordering};

use common::run_until_idle;
use idem::source::memory::{MemoryBroker, Message};
use idem::store::postgres::PostgresStore;
use idem::{Runtime, Tx, idempotent};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Order {
    order_id: String,
    seq: u32,
}

static FAIL_ONCE: AtomicBool = AtomicBool::new(true);

#[idempotent(
    topic = "rt-batch",
    key = "order_id",
    store = "postgres",
    name = "rt-batch",
    ack = "batch",
    retries = 2,
    backoff = "1ms..2ms"
)]
async fn rt_batch(o: Order, tx: &mut Tx<'_>) -> Result<(), String> {
    pg::insert_effect(tx, "rt-batch", &o.order_id, o.seq)
        .await
        .map_err(|e| e.to_string())?;
    if o.order_id == "fails-once" && FAIL_ONCE.swap(false, Ordering::SeqCst) {
        return Err("refused once".into());
    }
    Ok(())
}

#[idempotent(
    topic = "rt-handler",
    key = "order_id",
    store = "postgres",
    name = "rt-handler"
)]
async fn rt_handler(orders: Vec<Order>, tx: &mut Tx<'_>) -> Result<(), sqlx::Error> {
    let mut q = sqlx::QueryBuilder::new("INSERT INTO effects (handler, key, seq) ");
    q.push_values(&orders, |mut row, o| {
        row.push_bind("rt-handler")
            .push_bind(&o.order_id)
            .push_bind(o.seq as i32);
    });
    q.build().execute(&mut **tx).await.map(|_| ())
}

fn order(key: &str, seq: u32) -> Message {
    Message::new(serde_json::json!({ "order_id": key, "seq": seq }).to_string())
}

/// Round trips of one batch of 64 through the runtime.
async fn batch_of_64(
    rt: &Runtime<MemoryBroker>,
    broker: &MemoryBroker,
    wire: &pg::Wire,
    topic: &str,
    keys: impl Iterator<Item = String>,
) -> u64 {
    for (i, key) in keys.enumerate() {
        broker.publish(topic, order(&key, i as u32));
    }
    let before = wire.round_trips();
    run_until_idle(rt, broker).await;
    wire.round_trips() - before
}

#[tokio::test]
async fn a_batch_costs_its_statements_and_a_few_round_trips_more() {
    let db = pg::Db::new().await;
    let (url, wire) = pg::counting_proxy(&pg::url()).await;
    // One connection: every statement is prepared once, on the warm-up.
    let store = PostgresStore::new(pg::connect(&url, Some(&db.schema), 1).await)
        .with_schema(&db.schema)
        .unwrap();
    let broker = MemoryBroker::new();
    let rt = Runtime::builder(broker.clone())
        .store(store)
        .handlers(["rt-batch"])
        .concurrency(64)
        .build()
        .unwrap();

    batch_of_64(
        &rt,
        &broker,
        &wire,
        "rt-batch",
        (0..64).map(|i| format!("warm-{i}")),
    )
    .await;
    let happy = batch_of_64(
        &rt,
        &broker,
        &wire,
        "rt-batch",
        (0..64).map(|i| format!("k-{i}")),
    )
    .await;
    // One in the middle fails once: rolled back, the rest redone isolated,
    // the failing item retried alone.
    let with_failure = batch_of_64(
        &rt,
        &broker,
        &wire,
        "rt-batch",
        (0..64).map(|i| {
            if i == 32 {
                "fails-once".to_owned()
            } else {
                format!("f-{i}")
            }
        }),
    )
    .await;
    println!("round trips per batch of 64: {happy} (all succeed), {with_failure} (one fails once)");

    // BEGIN, the claim, 64 effect inserts, COMMIT, and the pool's own
    // check of the connection it hands out; no savepoints (isolating each
    // item costs two more round trips per item: 197 for this batch).
    assert!(
        happy <= 64 + 5,
        "a batch of 64 took {happy} round trips: more than its 64 statements, begin, claim, commit and the pool's checks"
    );
    let effects = db.effect_counts("rt-batch").await;
    assert_eq!(effects.len(), 3 * 64, "{effects:?}");
    assert!(effects.values().all(|&n| n == 1), "{effects:?}");
}

#[tokio::test]
async fn a_batch_handler_costs_a_handful_of_round_trips_per_batch() {
    let db = pg::Db::new().await;
    let (url, wire) = pg::counting_proxy(&pg::url()).await;
    let store = PostgresStore::new(pg::connect(&url, Some(&db.schema), 1).await)
        .with_schema(&db.schema)
        .unwrap();
    let broker = MemoryBroker::new();
    let rt = Runtime::builder(broker.clone())
        .store(store)
        .handlers(["rt-handler"])
        .concurrency(64)
        .build()
        .unwrap();
    batch_of_64(
        &rt,
        &broker,
        &wire,
        "rt-handler",
        (0..64).map(|i| format!("warm-{i}")),
    )
    .await;
    let trips = batch_of_64(
        &rt,
        &broker,
        &wire,
        "rt-handler",
        (0..64).map(|i| format!("k-{i}")),
    )
    .await;
    println!("round trips per batch of 64 with a batch handler: {trips}");
    // BEGIN, the claim, the one INSERT of 64 rows, COMMIT, the pool's check.
    assert!(trips <= 1 + 5, "a batch of 64 took {trips} round trips");
    let effects = db.effect_counts("rt-handler").await;
    assert_eq!(effects.len(), 2 * 64, "{effects:?}");
    assert!(effects.values().all(|&n| n == 1), "{effects:?}");
}
