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
async fn handle(orders: idem::Batch<OrderPlaced>, ack: idem::Ack) -> Result<(), AppError> {
    let _ = orders;
    ack.ack();
    Ok(())
}

fn main() {}
