//! `codec = "json"` (the default, spelled out) and a codec type of one's own.
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

#[idem::idempotent(topic = "orders", key = "order_id", store = "memory", codec = "json")]
async fn json(order: OrderPlaced) -> Result<(), AppError> {
    let _ = order;
    Ok(())
}

/// One line of `id,amount` text: no serde.
struct Row {
    id: String,
    amount: u64,
}

mod csv {
    use super::*;

    pub struct Csv;

    impl Codec<Row> for Csv {
        const NAME: &'static str = "csv";
        const CONTENT_TYPES: &'static [&'static str] = &["text/csv"];
        fn decode(bytes: &[u8]) -> Result<Row, DecodeError> {
            let text = std::str::from_utf8(bytes).map_err(DecodeError::new)?;
            let (id, amount) = text
                .split_once(',')
                .ok_or_else(|| DecodeError::msg("expected `id,amount`"))?;
            Ok(Row {
                id: id.to_owned(),
                amount: amount.trim().parse().map_err(DecodeError::new)?,
            })
        }
    }
}

#[idem::idempotent(topic = "rows", key = "id", store = "memory", codec = csv::Csv)]
async fn rows(row: Row) -> Result<u64, AppError> {
    Ok(row.amount)
}

fn main() {}
