//! idem in five minutes: an order service with three idempotent handlers on
//! an embedded SQLite database, fed by an in-memory broker that duplicates
//! messages, loses acks (so committed messages come back) and carries a
//! poison message. At the end it counts the effects in SQLite and prints
//! `exactly-once: OK` only if every business effect is there exactly once.
//!
//! ```text
//! cargo run --example quickstart
//! ```

use std::process::ExitCode;
use std::time::Duration;

use idem::source::memory::{BrokerEvent, Faults, MemoryBroker, Message};
use idem::store::sqlite::SqliteStore;
use idem::{Ack, CancellationToken, Registry, Runtime, Tx, idempotent};
use serde::Deserialize;

const ORDERS: u32 = 200;

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

/// One row per order, written in the same transaction as idem's dedup row.
#[idempotent(
    topic = "orders",
    key = "order_id",
    store = "sqlite",
    name = "place-order"
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

/// Manual ack: the handler says when the payment is booked; idem still
/// sends the ack only after the transaction committed.
#[idempotent(
    topic = "payments",
    key = "order_id",
    store = "sqlite",
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

/// Batch mode, keyed by the producer's Idempotency-Key header: a batch is
/// claimed at once and committed once; each item runs in its own savepoint.
#[idempotent(topic = "shipments", key = header("Idempotency-Key"), store = "sqlite", name = "ship-order", ack = "batch")]
async fn ship_order(s: ShipmentRequested, tx: &mut Tx<'_>) -> Result<(), AppError> {
    sqlx::query("INSERT INTO shipments (order_id) VALUES (?)")
        .bind(&s.order_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn setup(path: &std::path::Path) -> Result<SqliteStore, Box<dyn std::error::Error>> {
    let _ = std::fs::remove_file(path);
    let store = SqliteStore::open(&path.display().to_string()).await?;
    store.migrate().await?;
    sqlx::raw_sql(
        "CREATE TABLE orders (order_id TEXT NOT NULL, customer TEXT NOT NULL, amount_cents INTEGER NOT NULL);
         CREATE TABLE payments (order_id TEXT NOT NULL, amount_cents INTEGER NOT NULL);
         CREATE TABLE shipments (order_id TEXT NOT NULL);",
    )
    .execute(store.pool())
    .await?;
    Ok(store)
}

fn publish_all(broker: &MemoryBroker) {
    for i in 1..=ORDERS {
        let id = format!("order-{i:04}");
        let amount = 1_000 + i64::from(i);
        let placed = serde_json::json!({ "order_id": id, "customer": format!("c{}", i % 17), "amount_cents": amount });
        broker.publish("orders", Message::new(placed.to_string()));
        let paid = serde_json::json!({ "order_id": id, "amount_cents": amount });
        broker.publish("payments", Message::new(paid.to_string()));
        let ship = serde_json::json!({ "order_id": id });
        broker.publish(
            "shipments",
            Message::new(ship.to_string()).header("Idempotency-Key", format!("ship-{id}")),
        );
        if i % 10 == 0 {
            // The producer timed out and sent the order again: a new message
            // id for the same business key.
            broker.publish("orders", Message::new(placed.to_string()));
        }
    }
    // Poison: not JSON, and a JSON order that the handler refuses.
    broker.publish(
        "orders",
        Message::new("{\"order_id\": \"order-9999\", \"customer\": ").id("poison-truncated"),
    );
    let bad = serde_json::json!({ "order_id": "order-bad", "customer": "c0", "amount_cents": -5 });
    broker.publish(
        "orders",
        Message::new(bad.to_string()).id("poison-negative"),
    );
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_target(false)
        .init();
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("quickstart failed: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn count(store: &SqliteStore, sql: &'static str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(sql).fetch_one(store.pool()).await
}

async fn run() -> Result<bool, Box<dyn std::error::Error>> {
    let db = std::env::temp_dir().join(format!("idem-quickstart-{}.db", std::process::id()));
    let store = setup(&db).await?;
    println!("idem quickstart: SQLite at {}\n", db.display());
    println!("{}", Registry::from_inventory()?);

    // The broker misbehaves on purpose: 20% of messages are stored twice,
    // 15% of acks are lost (the committed message comes back).
    let broker = MemoryBroker::with_faults(Faults {
        duplicate: 0.2,
        lose_ack: 0.15,
        seed: 2026,
        ..Faults::default()
    });
    publish_all(&broker);

    let runtime = Runtime::builder(broker.clone())
        .store(store.clone())
        .concurrency(16)
        .handlers(["place-order", "capture-payment", "ship-order"])
        .build()?;
    let stop = CancellationToken::new();
    let progress = async {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = broker.wait_idle() => break,
                _ = tick.tick() => {
                    let line: Vec<String> = runtime
                        .stats()
                        .iter()
                        .map(|(name, s)| format!("{name}: {} done, {} dup", s.processed, s.duplicate))
                        .collect();
                    println!("  … {}", line.join(" | "));
                }
            }
        }
        stop.cancel();
    };
    let started = std::time::Instant::now();
    tokio::join!(runtime.run(stop.clone()), progress);
    let elapsed = started.elapsed();

    let events = broker.events();
    let delivered = events
        .iter()
        .filter(|e| matches!(e, BrokerEvent::Delivered { .. }))
        .count();
    let lost_acks = events
        .iter()
        .filter(|e| matches!(e, BrokerEvent::AckLost { .. }))
        .count();
    let published = events
        .iter()
        .filter(|e| matches!(e, BrokerEvent::Published { .. }))
        .count();
    let stats = runtime.stats();
    let duplicates: u64 = stats.iter().map(|(_, s)| s.duplicate).sum();
    let processed: u64 = stats.iter().map(|(_, s)| s.processed).sum();
    let dead = broker.dead_letters("orders.dlq");

    let orders = count(&store, "SELECT COUNT(*) FROM orders").await?;
    let distinct_orders = count(&store, "SELECT COUNT(DISTINCT order_id) FROM orders").await?;
    let payments = count(&store, "SELECT COUNT(*) FROM payments").await?;
    let distinct_payments = count(&store, "SELECT COUNT(DISTINCT order_id) FROM payments").await?;
    let shipments = count(&store, "SELECT COUNT(*) FROM shipments").await?;
    let distinct_shipments =
        count(&store, "SELECT COUNT(DISTINCT order_id) FROM shipments").await?;
    // Every order paid exactly its amount: a double payment or a missing one shows here.
    let wrongly_paid = count(
        &store,
        "SELECT COUNT(*) FROM orders o WHERE o.amount_cents <> \
         (SELECT COALESCE(SUM(p.amount_cents), 0) FROM payments p WHERE p.order_id = o.order_id)",
    )
    .await?;

    println!("\nfinished in {elapsed:.2?}");
    println!("messages published (with broker duplicates): {published}");
    println!("deliveries handed to handlers:               {delivered}");
    println!("acks lost on purpose (redelivered):          {lost_acks}");
    println!("handler runs committed:                      {processed}");
    println!("duplicates skipped (acked, handler not run): {duplicates}");
    println!("effects applied: orders {orders}, payments {payments}, shipments {shipments}");
    println!("dead-lettered: {}", dead.len());
    for d in &dead {
        println!("  {} — {}", d.delivery.id, d.letter.reason);
    }

    let want = i64::from(ORDERS);
    let dead_ok = dead.len() == 2
        && dead.iter().any(|d| &*d.delivery.id == "poison-truncated")
        && dead.iter().any(|d| &*d.delivery.id == "poison-negative");
    let exactly_once = orders == want
        && distinct_orders == want
        && payments == want
        && distinct_payments == want
        && shipments == want
        && distinct_shipments == want
        && wrongly_paid == 0
        && duplicates > 0;
    let _ = std::fs::remove_file(&db);
    if exactly_once && dead_ok {
        println!("\nexactly-once: OK ({want} orders, each placed, paid and shipped once)");
        Ok(true)
    } else {
        println!(
            "\nexactly-once: FAILED (orders {orders}/{distinct_orders}, payments {payments}/{distinct_payments}, \
             shipments {shipments}/{distinct_shipments}, wrongly paid {wrongly_paid}, dead letters ok: {dead_ok})"
        );
        Ok(false)
    }
}
