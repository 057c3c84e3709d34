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

/// Configured, but not a key extractor.
struct Prefixed {
    prefix: String,
}

impl Prefixed {
    fn new(prefix: &str) -> Self {
        Prefixed {
            prefix: prefix.to_owned(),
        }
    }
}

#[idem::idempotent(topic = "orders", with = Prefixed::new("eu"), store = "memory")]
async fn handle(order: OrderPlaced) -> Result<(), AppError> {
    let _ = order;
    Ok(())
}

fn main() {
    let _ = Prefixed::new("us").prefix;
}
