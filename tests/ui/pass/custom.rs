//! The delivery parameter, a cached result, and parameters in any order.
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

#[idem::idempotent(topic = "orders", key = "order_id", store = "memory")]
async fn with_delivery(order: OrderPlaced, delivery: &idem::Delivery) -> Result<(), AppError> {
    let _ = (
        order.order_id,
        delivery.attempt,
        delivery.header("traceparent"),
    );
    Ok(())
}

/// The `u64` is cached and handed to later duplicates.
#[idem::idempotent(topic = "orders", key = "order_id", store = "sqlite")]
async fn cached_result(order: OrderPlaced, tx: &mut idem::Tx<'_>) -> Result<u64, AppError> {
    let _ = tx;
    Ok(order.order_id * 2)
}

#[idem::idempotent(topic = "orders", key = "order_id", store = "sqlite", ack = "manual")]
async fn every_parameter(
    delivery: &idem::Delivery,
    ack: idem::Ack,
    tx: &mut idem::Tx<'_>,
    order: OrderPlaced,
) -> Result<String, AppError> {
    let _ = (delivery, tx);
    ack.ack();
    Ok(order.order_id.to_string())
}

/// Handlers stay plain async fns: callable from a unit test.
#[allow(dead_code)]
async fn call_directly() {
    let d = idem::Delivery::new("m-1", "orders", b"{}".to_vec());
    let _ = with_delivery(OrderPlaced { order_id: 1 }, &d).await;
}

fn main() {}
