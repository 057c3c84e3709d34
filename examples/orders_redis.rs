//! An order service whose dedup records live in Redis: the shape of a
//! service scaled out over many consumer processes that share one Redis.
//!
//! The handler charges a (simulated) payment provider and returns a
//! receipt. idem claims each order in Redis before the charge and writes a
//! done-record with the receipt after it, so a redelivered order is acked
//! as a duplicate and the cached receipt is returned instead of charging
//! twice. The in-memory broker duplicates messages and loses acks on
//! purpose; at the end the example counts the charges.
//!
//! ```text
//! REDIS_URL=redis://127.0.0.1:6379 cargo run --example orders_redis --features redis
//! ```
//!
//! Redis cannot commit together with the payment provider: if this process
//! died between a charge and its done-record, the order would be charged
//! again after the lease (`lease = "10s"`) ran out. The store's module docs
//! list every such window; a SQL store closes them when the effect is a
//! database write.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use idem::source::memory::{Faults, MemoryBroker, Message};
use idem::store::redis::RedisStore;
use idem::{CancellationToken, Runtime, idempotent};
use serde::{Deserialize, Serialize};

const ORDERS: u32 = 500;

#[derive(Debug, Deserialize)]
struct OrderPlaced {
    order_id: String,
    amount_cents: i64,
}

/// Cached with the done-record; a duplicate gets it back without a charge.
#[derive(Debug, Serialize)]
struct Receipt {
    order_id: String,
    charge_id: String,
}

#[derive(Debug, thiserror::Error)]
enum PaymentError {
    #[error("amount {0} is not chargeable: must be positive")]
    InvalidAmount(i64),
}

/// The payment provider's ledger: charges per order.
static CHARGES: Mutex<Option<HashMap<String, u32>>> = Mutex::new(None);

fn charge(order_id: &str, amount_cents: i64) -> Result<String, PaymentError> {
    if amount_cents <= 0 {
        return Err(PaymentError::InvalidAmount(amount_cents));
    }
    let mut ledger = CHARGES.lock().unwrap_or_else(|e| e.into_inner());
    let n = ledger
        .get_or_insert_with(HashMap::new)
        .entry(order_id.to_owned())
        .or_default();
    *n += 1;
    Ok(format!("ch_{order_id}_{n}"))
}

#[idempotent(
    topic = "orders",
    key = "order_id",
    store = "redis",
    name = "charge-order",
    ttl = "7d",
    lease = "10s",
    backoff = "5ms..100ms"
)]
async fn charge_order(order: OrderPlaced) -> Result<Receipt, PaymentError> {
    let charge_id = charge(&order.order_id, order.amount_cents)?;
    Ok(Receipt {
        order_id: order.order_id,
        charge_id,
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    // One prefix per run, so the example can run again on the same Redis.
    let prefix = format!("orders-example-{}", std::process::id());
    let store = match RedisStore::builder(&url).prefix(&prefix).connect().await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}\nstart Redis (./scripts/services.sh does) or set REDIS_URL");
            return ExitCode::FAILURE;
        }
    };
    println!("dedup store: {store:?}");

    let broker = MemoryBroker::with_faults(Faults {
        duplicate: 0.3,
        lose_ack: 0.2,
        seed: 11,
        ..Faults::default()
    });
    for i in 0..ORDERS {
        let order = serde_json::json!({ "order_id": format!("o-{i}"), "amount_cents": 100 + i });
        broker.publish(
            "orders",
            Message::new(order.to_string()).id(format!("m-{i}")),
        );
    }
    // A producer retry: the same order published again under a new message id.
    let retry = serde_json::json!({ "order_id": "o-7", "amount_cents": 107 });
    broker.publish("orders", Message::new(retry.to_string()).id("m-7-retry"));
    // A poison message: dead-lettered after its retries, never charged.
    let bad = serde_json::json!({ "order_id": "o-bad", "amount_cents": -5 });
    broker.publish("orders", Message::new(bad.to_string()).id("m-bad"));

    let runtime = match Runtime::builder(broker.clone())
        .store(store.clone())
        .handlers(["charge-order"])
        .concurrency(32)
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let stop = CancellationToken::new();
    let idle = async {
        if tokio::time::timeout(Duration::from_secs(120), broker.wait_idle())
            .await
            .is_err()
        {
            eprintln!("the broker did not become idle within 120 s");
        }
        stop.cancel();
    };
    tokio::join!(runtime.run(stop.clone()), idle);

    let stats = runtime.stats_of("charge-order").unwrap_or_default();
    println!("handler: {stats:?}");
    println!("store:   {:?}", store.stats());
    println!(
        "dead letters: {:?}",
        broker
            .dead_letters("orders.dlq")
            .iter()
            .map(|d| d.letter.reason.as_str())
            .collect::<Vec<_>>()
    );
    if let Err(e) = show_and_clean(&url, &store).await {
        eprintln!("could not read or clean the example's keys: {e}");
    }
    let ledger = CHARGES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .unwrap_or_default();
    let charged_once = (0..ORDERS)
        .filter(|i| ledger.get(&format!("o-{i}")) == Some(&1))
        .count();
    let twice: Vec<_> = ledger.iter().filter(|(_, n)| **n > 1).collect();
    println!(
        "{charged_once}/{ORDERS} orders charged exactly once; {} charged more than once; {} duplicate deliveries acked without a charge",
        twice.len(),
        stats.duplicate
    );
    if charged_once == ORDERS as usize && twice.is_empty() && !ledger.contains_key("o-bad") {
        println!("effectively-once: OK");
        ExitCode::SUCCESS
    } else {
        println!("effectively-once: FAILED {twice:?}");
        ExitCode::FAILURE
    }
}

/// Prints one done-record as Redis holds it, then deletes this run's keys.
async fn show_and_clean(url: &str, store: &RedisStore) -> redis::RedisResult<()> {
    let mut conn = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    let key = store.record_key("charge-order", "o-7");
    let value: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut conn).await?;
    let ttl: i64 = redis::cmd("PTTL").arg(&key).query_async(&mut conn).await?;
    println!("{key} = {value:?} (expires in {} s)", ttl / 1000);
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{}:*", store.prefix()))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        if !keys.is_empty() {
            redis::cmd("DEL")
                .arg(&keys)
                .query_async::<()>(&mut conn)
                .await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}
