//! Throughput of the PostgreSQL store: idem vs a hand-written consumer loop
//! that issues the same SQL on the same kind of pool, side by side in one
//! run (rounds interleaved, median of the rounds reported).
//!
//! ```text
//! cargo run --release --example bench_postgres --features postgres
//! ```
//!
//! Per message, both do: decode JSON, `BEGIN`, claim the key with the same
//! `unnest … INSERT … ON CONFLICT … RETURNING` statement, insert the effect
//! row, `COMMIT`, ack. Batched (64): one `BEGIN`, one claim statement for
//! the 64 keys, a savepoint per item around its effect row, one `COMMIT`.
//! Both run 16 workers (idem: `concurrency(16)`); the hand loop reads from an
//! in-process queue, idem from the in-memory broker.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idem::source::memory::{MemoryBroker, Message};
use idem::store::postgres::PostgresStore;
use idem::{CancellationToken, Runtime, Tx, idempotent};
use serde::Deserialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{AssertSqlSafe, Executor, PgPool};

const WORKERS: usize = 16;
const SINGLE: usize = 4_000;
const BATCHED: usize = 64 * 100;
const ROUNDS: usize = 5;

#[derive(Debug, Deserialize)]
struct Event {
    id: String,
    amount: i64,
}

#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct Error(#[from] sqlx::Error);

const EFFECT: &str = "INSERT INTO effects (id, amount) VALUES ($1, $2)";

#[idempotent(
    topic = "single",
    key = "id",
    store = "postgres",
    name = "bench-single"
)]
async fn single(e: Event, tx: &mut Tx<'_>) -> Result<(), Error> {
    sqlx::query(EFFECT)
        .bind(&e.id)
        .bind(e.amount)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[idempotent(
    topic = "batched",
    key = "id",
    store = "postgres",
    name = "bench-batch",
    ack = "batch"
)]
async fn batched(e: Event, tx: &mut Tx<'_>) -> Result<(), Error> {
    sqlx::query(EFFECT)
        .bind(&e.id)
        .bind(e.amount)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn payload(round: usize, i: usize) -> Vec<u8> {
    format!("{{\"id\":\"r{round}-{i}\",\"amount\":{i}}}").into_bytes()
}

async fn idem_run(
    store: &PostgresStore,
    handler: &str,
    topic: &str,
    round: usize,
    n: usize,
) -> f64 {
    let broker = MemoryBroker::new();
    for i in 0..n {
        broker.publish(topic, Message::new(payload(round, i)));
    }
    let rt = Runtime::builder(broker.clone())
        .store(store.clone())
        .handlers([handler])
        .concurrency(if topic == "batched" { 64 } else { WORKERS })
        .build()
        .expect("runtime");
    let stop = CancellationToken::new();
    let started = Instant::now();
    tokio::join!(rt.run(stop.clone()), async {
        broker.wait_idle().await;
        stop.cancel();
    });
    let elapsed = started.elapsed();
    let stats = rt.stats_of(handler).unwrap();
    assert_eq!(stats.processed as usize, n, "{stats:?}");
    n as f64 / elapsed.as_secs_f64()
}

/// The hand-written consumer: `batch` messages per transaction.
async fn hand_run(pool: &PgPool, claim: &Arc<str>, round: usize, n: usize, batch: usize) -> f64 {
    let queue: Arc<Mutex<VecDeque<Vec<u8>>>> =
        Arc::new(Mutex::new((0..n).map(|i| payload(round, i)).collect()));
    let handler = if batch == 1 {
        "hand-single"
    } else {
        "hand-batch"
    };
    let workers = if batch == 1 { WORKERS } else { 1 };
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..workers {
        let (pool, claim, queue) = (pool.clone(), claim.clone(), queue.clone());
        tasks.spawn(async move {
            loop {
                let items: Vec<Vec<u8>> = {
                    let mut q = queue.lock().unwrap();
                    let k = batch.min(q.len());
                    q.drain(..k).collect()
                };
                if items.is_empty() {
                    return;
                }
                let events: Vec<Event> = items
                    .iter()
                    .map(|p| serde_json::from_slice(p).expect("valid JSON"))
                    .collect();
                let mut tx = pool.begin().await.expect("begin");
                let keys: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
                let handlers = vec![handler; keys.len()];
                let fps: Vec<i64> = events.iter().map(|e| e.amount).collect();
                let ttls: Vec<Option<i64>> = vec![None; keys.len()];
                let rows = sqlx::query(AssertSqlSafe(claim.clone()))
                    .bind(&handlers)
                    .bind(&keys)
                    .bind(&fps)
                    .bind(&keys)
                    .bind(&ttls)
                    .fetch_all(&mut *tx)
                    .await
                    .expect("claim");
                assert_eq!(rows.len(), events.len());
                if batch == 1 {
                    sqlx::query(EFFECT)
                        .bind(&events[0].id)
                        .bind(events[0].amount)
                        .execute(&mut *tx)
                        .await
                        .expect("effect");
                } else {
                    for e in &events {
                        let mut item = sqlx::Acquire::begin(&mut tx).await.expect("savepoint");
                        sqlx::query(EFFECT)
                            .bind(&e.id)
                            .bind(e.amount)
                            .execute(&mut *item)
                            .await
                            .expect("effect");
                        item.commit().await.expect("release");
                    }
                }
                tx.commit().await.expect("commit");
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    n as f64 / started.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let schema = format!("idem_bench_{}", std::process::id());
    let options: PgConnectOptions = url.parse()?;
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options.clone())
        .await?;
    admin
        .execute(sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE SCHEMA {schema}"
        ))))
        .await?;
    let pool = PgPoolOptions::new()
        .max_connections(WORKERS as u32)
        .connect_with(options.options([("search_path", schema.as_str())]))
        .await?;
    let store = PostgresStore::new(pool.clone()).with_schema(&schema)?;
    store.migrate().await?;
    pool.execute("CREATE TABLE effects (id text NOT NULL, amount bigint NOT NULL)")
        .await?;
    // The very statement the store issues.
    let claim: Arc<str> = store.claim_statement().into();

    // Warm up both paths (prepared statements, connections).
    idem_run(&store, "bench-single", "single", 1000, 200).await;
    hand_run(&pool, &claim, 1000, 200, 1).await;

    let (mut idem_single, mut hand_single, mut idem_batch, mut hand_batch) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        idem_single.push(idem_run(&store, "bench-single", "single", round, SINGLE).await);
        hand_single.push(hand_run(&pool, &claim, round, SINGLE, 1).await);
        idem_batch.push(idem_run(&store, "bench-batch", "batched", round, BATCHED).await);
        hand_batch.push(hand_run(&pool, &claim, round, BATCHED, 64).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let report = |name: &str, idem: Vec<f64>, hand: Vec<f64>| {
        let (i, h) = (median(idem.clone()), median(hand.clone()));
        println!(
            "{name:<12} idem {i:>8.0} msg/s   hand-written {h:>8.0} msg/s   ratio {:.3}   (rounds idem {:?}, hand {:?})",
            i / h,
            idem.iter().map(|x| x.round()).collect::<Vec<_>>(),
            hand.iter().map(|x| x.round()).collect::<Vec<_>>(),
        );
    };
    println!("PostgreSQL store, {WORKERS} workers, median of {ROUNDS} interleaved rounds");
    report("single", idem_single, hand_single);
    report("batch of 64", idem_batch, hand_batch);
    admin
        .execute(sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP SCHEMA {schema} CASCADE"
        ))))
        .await?;
    Ok(())
}
