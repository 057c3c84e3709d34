//! Every ack mode; the manual ones take an `Ack`.
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

#[idem::idempotent(topic = "orders", key = "order_id", store = "memory", ack = "before")]
async fn ack_before(order: OrderPlaced) -> Result<(), AppError> {
    let _ = order.order_id;
    Ok(())
}

#[idem::idempotent(topic = "orders", key = "order_id", store = "sqlite", ack = "auto")]
async fn ack_auto(order: OrderPlaced, tx: &mut idem::Tx<'_>) -> Result<(), AppError> {
    let _ = (order, tx);
    Ok(())
}

#[idem::idempotent(topic = "orders", key = "order_id", store = "sqlite", ack = "manual")]
async fn ack_manual(
    order: OrderPlaced,
    tx: &mut idem::Tx<'_>,
    ack: idem::Ack,
) -> Result<(), AppError> {
    let _ = (order, tx);
    ack.ack();
    Ok(())
}

#[idem::idempotent(
    topic = "orders",
    key = "order_id",
    store = "memory",
    ack = "manual_immediate"
)]
async fn ack_manual_immediate(ack: idem::Ack, order: OrderPlaced) -> Result<(), AppError> {
    if order.order_id == 0 {
        ack.nack();
    } else {
        ack.ack();
    }
    Ok(())
}

#[idem::idempotent(topic = "orders", key = "order_id", store = "sqlite", ack = "batch")]
async fn ack_batch(order: OrderPlaced, tx: &mut idem::Tx<'_>) -> Result<(), AppError> {
    let _ = (order, tx);
    Ok(())
}

fn main() {}
