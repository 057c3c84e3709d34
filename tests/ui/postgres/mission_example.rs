//! The mission's handler, word for word: with `store = "postgres"` the
//! macro completes `idem::Tx<'_>` to a PostgreSQL transaction.
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

#[idem::idempotent(topic = "orders", key = "order_id", store = "postgres", ack = "manual_immediate")]
async fn place_order(order: OrderPlaced, tx: &mut idem::Tx<'_>, ack: idem::Ack) -> Result<(), AppError> {
    let conn: &mut sqlx::PgConnection = &mut **tx;
    let _ = (order, conn);
    ack.ack();
    Ok(())
}

/// A helper outside the handler names the database itself.
async fn helper(tx: &mut idem::Tx<'_, sqlx::Postgres>) {
    let _ = tx;
}

fn main() {
    let _ = helper;
}
