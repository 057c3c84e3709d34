//! Batch handlers: `Vec<T>` or `idem::Batch<T>`, with or without a
//! transaction, on any store; the key names a field of `T`.
use serde::Deserialize;

#[derive(Deserialize)]
struct OrderPlaced {
    order_id: u64,
}

#[derive(Debug)]
struct AppError;
impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("app")
    }
}

#[idem::idempotent(topic = "orders", key = "order_id", store = "sqlite")]
async fn rows(orders: Vec<OrderPlaced>, tx: &mut idem::Tx<'_>) -> Result<(), AppError> {
    let _ = (orders, tx);
    Ok(())
}

#[idem::idempotent(topic = "orders", key = "order_id", store = "postgres", ack = "batch")]
async fn with_deliveries(
    tx: &mut idem::Tx<'_>,
    orders: idem::Batch<OrderPlaced>,
) -> Result<(), idem::BatchError> {
    for (order, delivery) in orders.iter() {
        let _ = (order.order_id, &delivery.id);
    }
    let _ = tx;
    Err(idem::BatchError::at(0, "refused"))
}

#[idem::idempotent(topic = "orders", key = "order_id", store = "memory", name = "leased-batch")]
async fn leased(orders: Vec<OrderPlaced>) -> Result<(), AppError> {
    let _ = orders;
    Ok(())
}

fn main() {}
