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

#[idem::idempotent(topic = "orders", key = "order", store = "memory")]
async fn handle(orders: Vec<OrderPlaced>) -> Result<(), AppError> {
    let _ = orders;
    Ok(())
}

fn main() {}
