//! The quickstart's order service on MariaDB (the `mysql` store): the dedup
//! row and the business rows commit in one InnoDB transaction. The in-memory broker
//! duplicates messages and loses acks; at the end the example counts the
//! rows and prints `exactly-once: OK` only if every effect is there once.
//!
//! ```text
//! MYSQL_URL=mysql://root@127.0.0.1:3306/test \
//!   cargo run --example orders_mysql --features mysql
//! ```
//!
//! It works in a database of its own (`idem_example_<pid>`), dropped at the
//! end.

use std::process::ExitCode;

use idem::source::memory::{Faults, MemoryBroker, Message};
use idem::store::mysql::MysqlStore;
use idem::{Ack, CancellationToken, Runtime, Tx, idempotent};
use serde::Deserialize;
use sqlx::Executor;

const ORDERS: u32 = 500;

#[derive(Debug, Deserialize)]
struct OrderPlaced {
    order_id: String,
    customer: String,
    amount_cents: i64,
}

#[derive(Debug, Deserialize)]
struct PaymentCaptured {
    order_id: String,
    amount_cents: i64,
}

#[derive(Debug, Deserialize)]
struct ShipmentRequested {
    order_id: String,
}

#[derive(Debug, thiserror::Error)]
enum AppError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("invalid amount {0}: must be positive")]
    InvalidAmount(i64),
}

/// The mission's handler: `tx: &mut idem::Tx<'_>` is a MariaDB transaction
/// here, because the store is `mysql`.
#[idempotent(
    topic = "orders",
    key = "order_id",
    store = "mysql",
    name = "place-order",
    ttl = "7d"
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

#[idempotent(
    topic = "payments",
    key = "order_id",
    store = "mysql",
    name = "capture-payment",
    ack = "manual_immediate"
)]
async fn capture_payment(p: PaymentCaptured, tx: &mut Tx<'_>, ack: Ack) -> Result<(), AppError> {
    sqlx::query("INSERT INTO payments (order_id, amount_cents) VALUES (?, ?)")
        .bind(&p.order_id)
        .bind(p.amount_cents)
        .execute(&mut **tx)
        .await?;
    ack.ack();
    Ok(())
}

/// Batch mode: one claim statement per fetched batch.
#[idempotent(topic = "shipments", key = header("Idempotency-Key"), store = "mysql", name = "ship-order", ack = "batch")]
async fn ship_order(s: ShipmentRequested, tx: &mut Tx<'_>) -> Result<(), AppError> {
    sqlx::query("INSERT INTO shipments (order_id) VALUES (?)")
        .bind(&s.order_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .init();
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("orders_mysql failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<bool, Box<dyn std::error::Error>> {
    let url =
        std::env::var("MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into());
    let database = format!("idem_example_{}", std::process::id());
    let admin = MysqlStore::connect(&url).await?;
    admin
        .pool()
        .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE DATABASE IF NOT EXISTS {database}"
        ))))
        .await?;
    // The store's table and the handlers' tables live in the example's
    // database: connect the pool there.
    let options: sqlx::mysql::MySqlConnectOptions = url.parse()?;
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(32)
        .connect_with(options.database(&database))
        .await?;
    let store = MysqlStore::new(pool);
    let applied = store.migrate().await?;
    println!(
        "idem on MariaDB: {database}.{} (migrations applied: {applied:?})",
        store.qualified_table()
    );
    for table in [
        "CREATE TABLE orders (order_id VARCHAR(64) NOT NULL, customer VARCHAR(64) NOT NULL, amount_cents BIGINT NOT NULL)",
        "CREATE TABLE payments (order_id VARCHAR(64) NOT NULL, amount_cents BIGINT NOT NULL)",
        "CREATE TABLE shipments (order_id VARCHAR(64) NOT NULL)",
    ] {
        store.pool().execute(table).await?;
    }

    let broker = MemoryBroker::with_faults(Faults {
        duplicate: 0.2,
        lose_ack: 0.15,
        seed: 2026,
        ..Faults::default()
    });
    for i in 1..=ORDERS {
        let id = format!("order-{i:04}");
        let amount = 1_000 + i64::from(i);
        let placed = serde_json::json!({ "order_id": id, "customer": format!("c{}", i % 17), "amount_cents": amount });
        broker.publish("orders", Message::new(placed.to_string()));
        if i % 10 == 0 {
            broker.publish("orders", Message::new(placed.to_string()));
        }
        let paid = serde_json::json!({ "order_id": id, "amount_cents": amount });
        broker.publish("payments", Message::new(paid.to_string()));
        let ship = serde_json::json!({ "order_id": id });
        broker.publish(
            "shipments",
            Message::new(ship.to_string()).header("Idempotency-Key", format!("ship-{id}")),
        );
    }
    let bad = serde_json::json!({ "order_id": "order-bad", "customer": "c0", "amount_cents": -5 });
    broker.publish(
        "orders",
        Message::new(bad.to_string()).id("poison-negative"),
    );

    let runtime = Runtime::builder(broker.clone())
        .store(store.clone())
        .concurrency(16)
        .handlers(["place-order", "capture-payment", "ship-order"])
        .build()?;
    let stop = CancellationToken::new();
    let started = std::time::Instant::now();
    tokio::join!(runtime.run(stop.clone()), async {
        broker.wait_idle().await;
        stop.cancel();
    });
    let elapsed = started.elapsed();

    let count = |sql: &'static str| sqlx::query_scalar::<_, i64>(sql).fetch_one(store.pool());
    let orders = count("SELECT COUNT(DISTINCT order_id) FROM orders").await?;
    let order_rows = count("SELECT COUNT(*) FROM orders").await?;
    let payments = count("SELECT COUNT(*) FROM payments").await?;
    let shipments = count("SELECT COUNT(*) FROM shipments").await?;
    let doubled = count(
        "SELECT COUNT(*) FROM (SELECT order_id FROM payments GROUP BY order_id HAVING COUNT(*) > 1 \
         UNION ALL SELECT order_id FROM shipments GROUP BY order_id HAVING COUNT(*) > 1) d",
    )
    .await?;
    let stats = runtime.stats();
    let duplicates: u64 = stats.iter().map(|(_, s)| s.duplicate).sum();
    let dead = broker.dead_letters("orders.dlq");
    println!("finished in {elapsed:.2?}");
    println!(
        "effects: orders {order_rows}, payments {payments}, shipments {shipments}; duplicates skipped: {duplicates}"
    );
    for d in &dead {
        println!("dead letter {} — {}", d.delivery.id, d.letter.reason);
    }
    admin
        .pool()
        .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE {database}"
        ))))
        .await?;

    let want = i64::from(ORDERS);
    let ok = orders == want
        && order_rows == want
        && payments == want
        && shipments == want
        && doubled == 0
        && duplicates > 0
        // The broker may have stored the poison message twice.
        && !dead.is_empty()
        && dead.iter().all(|d| &*d.delivery.id == "poison-negative");
    if ok {
        println!("exactly-once: OK ({want} orders, each placed, paid and shipped once)");
    } else {
        println!("exactly-once: FAILED");
    }
    Ok(ok)
}
