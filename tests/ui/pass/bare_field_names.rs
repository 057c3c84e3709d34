//! Field names may be written bare, as rustc's "a field with a similar name
//! exists" suggestion writes them: `key = order_id`, `fingerprint = [amount]`.
use serde::Deserialize;

#[derive(Deserialize)]
struct OrderPlaced {
    tenant: String,
    order_id: u64,
    amount: u64,
}

#[derive(Debug)]
struct AppError;
impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("app")
    }
}

#[idem::idempotent(topic = "orders", key = order_id, store = "memory", fingerprint = [amount])]
async fn bare(order: OrderPlaced) -> Result<(), AppError> {
    let _ = order;
    Ok(())
}

#[idem::idempotent(topic = "orders", key = (tenant, "order_id"), store = "memory", name = "composite")]
async fn composite(order: OrderPlaced) -> Result<(), AppError> {
    let _ = (order.tenant, order.order_id, order.amount);
    Ok(())
}

fn main() {}
