use serde::Deserialize;

#[derive(Deserialize)]
struct OrderPlaced {
    customer: Customer,
}

#[derive(Deserialize)]
struct Customer {
    id: String,
}

#[derive(Debug)]
struct AppError;
impl std::fmt::Display for AppError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("app")
    }
}

#[idem::idempotent(topic = "orders", key = "customer.email", store = "memory")]
async fn handle(order: OrderPlaced) -> Result<(), AppError> {
    let _ = order.customer.id;
    Ok(())
}

fn main() {}
