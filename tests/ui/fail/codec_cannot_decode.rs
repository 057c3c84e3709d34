use serde::Deserialize;

use idem::codec::{Codec, DecodeError};

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

/// Decodes text, not orders.
struct Text;

impl Codec<String> for Text {
    const NAME: &'static str = "text";
    const CONTENT_TYPES: &'static [&'static str] = &["text/plain"];
    fn decode(bytes: &[u8]) -> Result<String, DecodeError> {
        String::from_utf8(bytes.to_vec()).map_err(DecodeError::new)
    }
}

#[idem::idempotent(topic = "orders", key = "order_id", store = "memory", codec = Text)]
async fn handle(order: OrderPlaced) -> Result<(), AppError> {
    let _ = order;
    Ok(())
}

fn main() {}
