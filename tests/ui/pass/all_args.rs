//! Every argument at once.
use serde::Deserialize;

#[derive(Deserialize)]
struct OrderPlaced {
    order_id: u64,
    amount: i64,
}

#[derive(Debug)]
struct AppError;
impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("app")
    }
}

#[idem::idempotent(
    topic = "orders",
    key = "order_id",
    store = "sqlite",
    ack = "auto",
    ttl = "7d",
    lease = "30s",
    retries = 5,
    backoff = "100ms..30s",
    dead_letter = "orders.dlq",
    ordered = true,
    name = "place-order",
    fingerprint = ["order_id"],
    on_in_progress = "wait",
    max_key_len = 128,
    crate = "idem",
)]
async fn place(order: OrderPlaced, tx: &mut idem::Tx<'_>) -> Result<(), AppError> {
    let _ = (order.amount, tx);
    Ok(())
}

#[idem::idempotent(
    topic = "orders",
    key = "order_id",
    store = "memory",
    ack = "manual_immediate",
    ttl = "1h",
    lease = "500ms",
    retries = 0,
    backoff = "1s..1s",
    ordered = false,
    name = "refund-order",
    fingerprint = ["order_id", "amount"],
    on_in_progress = "retry",
    on_missing_key = "reject",
    max_key_len = 64,
    crate = "::idem",
)]
async fn refund(order: OrderPlaced, ack: idem::Ack) -> Result<i64, AppError> {
    ack.ack();
    Ok(order.amount)
}

fn main() {}
