//! `tx: &mut Tx<'_>` after `use idem::Tx;`: the attribute gives the parameter
//! the store's own transaction type, and the import stays used.
#![deny(unused_imports)]

use serde::Deserialize;

use idem::Tx;

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

#[idem::idempotent(topic = "orders", key = "order_id", store = "sqlite")]
async fn place(order: OrderPlaced, tx: &mut Tx<'_>) -> Result<(), AppError> {
    let conn: &mut sqlx::SqliteConnection = &mut **tx;
    let _ = (order.order_id, conn);
    Ok(())
}

fn main() {}
