//! Orders and invoices on MariaDB (`store = "mysql"`): each handler's rows
//! and its dedup record commit in one InnoDB transaction, so a broker that
//! duplicates messages and loses acks still leaves one order row and one
//! invoice row per order. Prints `exactly-once: OK` when it does.
//!
//! ```text
//! MYSQL_URL=mysql://root@127.0.0.1:3306/test \
//!   cargo run --example orders_mysql --features mysql
//! ```
//!
//! Needs MariaDB 10.6 or later. It works in a database of its own
//! (`idem_example_<pid>`), dropped at the end.

use std::process::ExitCode;

use idem::source::memory::{Faults, MemoryBroker, Message};
use idem::store::mysql::MysqlStore;
use idem::{Runtime, Tx, idempotent};
use serde::Deserialize;
use sqlx::Executor;
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};

const ORDERS: i64 = 300;

#[derive(Debug, Deserialize)]
struct Order {
    order_id: String,
    amount_cents: i64,
}

/// One message at a time: claim, insert, commit, ack.
#[idempotent(
    topic = "orders",
    key = "order_id",
    store = "mysql",
    name = "book-order",
    ttl = "7d"
)]
async fn book_order(order: Order, tx: &mut Tx<'_>) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO booked (order_id, amount_cents) VALUES (?, ?)")
        .bind(&order.order_id)
        .bind(order.amount_cents)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// A batch at a time: its keys are claimed in one round trip.
#[idempotent(
    topic = "invoices",
    key = "order_id",
    store = "mysql",
    name = "invoice",
    ack = "batch"
)]
async fn invoice(order: Order, tx: &mut Tx<'_>) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO invoiced (order_id) VALUES (?)")
        .bind(&order.order_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
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
    let server = MysqlStore::connect(&url).await?;
    let ddl = |sql: String| sqlx::raw_sql(sqlx::AssertSqlSafe(sql));
    server
        .pool()
        .execute(ddl(format!("CREATE DATABASE {database}")))
        .await?;

    // The dedup table and the business tables in the example's database.
    let options: MySqlConnectOptions = url.parse()?;
    let pool = MySqlPoolOptions::new()
        .max_connections(32)
        .connect_with(options.database(&database))
        .await?;
    let store = MysqlStore::new(pool);
    println!("migrations applied: {:?}", store.migrate().await?);
    store
        .pool()
        .execute(
            "CREATE TABLE booked (order_id VARCHAR(64) NOT NULL, amount_cents BIGINT NOT NULL)",
        )
        .await?;
    store
        .pool()
        .execute("CREATE TABLE invoiced (order_id VARCHAR(64) NOT NULL)")
        .await?;

    let broker = MemoryBroker::with_faults(Faults {
        duplicate: 0.25,
        lose_ack: 0.2,
        seed: 7,
        ..Faults::default()
    });
    for i in 0..ORDERS {
        let body = format!(r#"{{"order_id": "o-{i}", "amount_cents": {}}}"#, 100 + i);
        broker.publish("orders", Message::new(body.clone()));
        broker.publish("invoices", Message::new(body));
    }
    let runtime = Runtime::builder(broker.clone())
        .store(store.clone())
        .concurrency(32)
        .build()?;
    runtime.run_until(broker.wait_idle()).await;

    let mut ok = true;
    for table in ["booked", "invoiced"] {
        let (rows, distinct): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*), COUNT(DISTINCT order_id) FROM {table}"
        )))
        .fetch_one(store.pool())
        .await?;
        println!("{table}: {rows} rows for {distinct} orders");
        ok &= rows == ORDERS && distinct == ORDERS;
    }
    for (handler, stats) in runtime.stats() {
        println!(
            "{handler}: processed {}, duplicates acked without running {}",
            stats.processed, stats.duplicate
        );
    }
    server
        .pool()
        .execute(ddl(format!("DROP DATABASE {database}")))
        .await?;
    println!("exactly-once: {}", if ok { "OK" } else { "FAILED" });
    Ok(ok)
}
