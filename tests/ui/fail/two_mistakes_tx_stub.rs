//! Two mistakes (a `tx` parameter with a store that has no transaction, an
//! unknown ack mode): one error each, also when the handler is not generated.
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

#[idem::idempotent(topic = "orders", key = "order_id", store = "redis", ack = "sometimes")]
async fn handle(order: OrderPlaced, tx: &mut idem::Tx<'_>) -> Result<(), AppError> {
    let _ = (order, tx);
    Ok(())
}

fn main() {}
