//! The order service of the broker examples (`orders_redis_streams`,
//! `orders_nats`, `orders_rabbitmq`): one idempotent handler on SQLite, fed
//! by a real broker. The producer sends every tenth order twice (a retry
//! with a new message id) plus two poison messages; at the end the example
//! counts the rows and prints `exactly-once: OK` only if every order is
//! there once and both poison messages are in the dead letters.
//!
//! Loaded with `#[path = "support/orders.rs"] mod orders;`.
#![allow(unreachable_pub)]

use std::error::Error;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use idem::source::SubscribeSpec;
use idem::store::sqlite::SqliteStore;
use idem::{CancellationToken, Runtime, Source, Subscription, Tx, idempotent};
use serde::Deserialize;

use crate::producers::{Outgoing, Producer};

/// The topic (stream, subject, queue) of the examples.
pub const TOPIC: &str = "idem-example-orders";
const HANDLER: &str = "place-order";
const ORDERS: u32 = 500;

#[derive(Debug, Deserialize)]
struct OrderPlaced {
    order_id: String,
    customer: String,
    amount_cents: i64,
}

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("invalid amount {0}: must be positive")]
    InvalidAmount(i64),
}

/// One row per order, in the same SQLite transaction as idem's dedup row.
#[idempotent(
    topic = "idem-example-orders",
    key = "order_id",
    store = "sqlite",
    name = "place-order",
    retries = 2,
    backoff = "10ms..100ms"
)]
async fn place_order(order: OrderPlaced, tx: &mut Tx<'_>) -> Result<(), AppError> {
    if order.amount_cents <= 0 {
        return Err(AppError::InvalidAmount(order.amount_cents));
    }
    sqlx::query("INSERT INTO orders (order_id, customer, amount_cents) VALUES (?, ?, ?)")
        .bind(&order.order_id)
        .bind(&order.customer)
        .bind(order.amount_cents)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

fn messages() -> Vec<Outgoing> {
    let mut out = Vec::new();
    for i in 1..=ORDERS {
        let order_id = format!("order-{i:04}");
        let payload = serde_json::json!({
            "order_id": order_id,
            "customer": format!("c{}", i % 17),
            "amount_cents": 1_000 + i64::from(i),
        })
        .to_string()
        .into_bytes();
        if i % 10 == 0 {
            // The producer timed out and sent it again: a new message id,
            // the same order.
            out.push(Outgoing {
                id: format!("{order_id}-retry"),
                payload: payload.clone(),
            });
        }
        out.push(Outgoing {
            id: order_id,
            payload,
        });
    }
    out.push(Outgoing {
        id: "poison-truncated".into(),
        payload: b"{\"order_id\": \"order-9999\", \"customer\": ".to_vec(),
    });
    out.push(Outgoing {
        id: "poison-negative".into(),
        payload: br#"{"order_id":"order-bad","customer":"c0","amount_cents":-5}"#.to_vec(),
    });
    out
}

async fn count(store: &SqliteStore, sql: &'static str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(sql).fetch_one(store.pool()).await
}

/// Runs the example; prints the outcome and returns the exit code.
pub async fn main<S: Source, P: Producer>(
    broker: &str,
    connect: impl std::future::Future<Output = Result<(S, P), Box<dyn Error>>>,
) -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_target(false)
        .init();
    let outcome = async {
        let (source, producer) = connect.await?;
        run(broker, source, producer).await
    };
    match outcome.await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("the {broker} example failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run<S: Source, P: Producer>(
    broker: &str,
    source: S,
    producer: P,
) -> Result<bool, Box<dyn Error>> {
    let db = std::env::temp_dir().join(format!("idem-orders-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&db);
    let store = SqliteStore::open(&db.display().to_string()).await?;
    store.migrate().await?;
    sqlx::raw_sql(
        "CREATE TABLE orders (order_id TEXT NOT NULL, customer TEXT NOT NULL, amount_cents INTEGER NOT NULL)",
    )
    .execute(store.pool())
    .await?;
    println!(
        "idem on {broker}: topic {TOPIC}, SQLite at {}",
        db.display()
    );

    // A fresh topic; subscribing once declares the stream/queue and the
    // consumer group before the producer writes to it.
    producer.reset(TOPIC).await?;
    // Closed, not dropped: the consumer leaves its group (and RabbitMQ
    // confirms the cancel) before the runtime subscribes again.
    source
        .subscribe(SubscribeSpec {
            topic: TOPIC,
            group: HANDLER,
            dead_letter: None,
            prefetch: 16,
        })
        .await?
        .close()
        .await;
    let outgoing = messages();
    producer.publish(TOPIC, &outgoing).await?;
    println!("published {} messages", outgoing.len());

    let runtime = Runtime::builder(source)
        .store(store.clone())
        .handlers([HANDLER])
        .concurrency(16)
        .build()?;
    let stop = CancellationToken::new();
    let total = outgoing.len() as u64;
    let started = Instant::now();
    let settled = async {
        let deadline = started + Duration::from_secs(120);
        loop {
            let s = runtime.stats_of(HANDLER).unwrap_or_default();
            if s.processed + s.duplicate + s.dead_lettered >= total || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
    };
    tokio::join!(runtime.run(stop.clone()), settled);
    let elapsed = started.elapsed();
    let stats = runtime.stats_of(HANDLER).unwrap_or_default();

    let rows = count(&store, "SELECT COUNT(*) FROM orders").await?;
    let distinct = count(&store, "SELECT COUNT(DISTINCT order_id) FROM orders").await?;
    let dead = producer.dead_letters(TOPIC).await?;
    println!(
        "\n{} deliveries in {elapsed:.2?} ({:.0} messages/s end to end)",
        stats.received,
        total as f64 / elapsed.as_secs_f64()
    );
    println!(
        "handler runs committed: {}, duplicates acked without running: {}, dead-lettered: {}",
        stats.processed, stats.duplicate, stats.dead_lettered
    );
    println!("orders in SQLite: {rows} rows, {distinct} distinct");
    for d in &dead {
        println!(
            "dead letter {:?} after {} attempt(s): {}",
            d.id, d.attempts, d.reason
        );
    }
    producer.reset(TOPIC).await?;
    let _ = std::fs::remove_file(&db);

    let want = i64::from(ORDERS);
    let dead_ok = dead.len() == 2
        && dead
            .iter()
            .any(|d| d.reason.starts_with("undecodable payload"))
        && dead.iter().any(|d| d.reason.contains("invalid amount -5"));
    if rows == want && distinct == want && dead_ok {
        println!("\nexactly-once: OK ({want} orders, each placed once)");
        Ok(true)
    } else {
        println!(
            "\nexactly-once: FAILED (rows {rows}, distinct {distinct}, dead letters ok: {dead_ok})"
        );
        Ok(false)
    }
}
