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

/// One mistake in the attribute, one in the key field: one error each. The
/// handler fn still exists for its callers.
#[idem::idempotent(topic = "orders", key = "orderid", store = "memory", ack = "sometimes")]
async fn handle(order: OrderPlaced) -> Result<(), AppError> {
    let _ = order;
    Ok(())
}

fn main() {
    let _ = handle(OrderPlaced { order_id: 1 });
}
