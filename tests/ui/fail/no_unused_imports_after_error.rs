//! After a macro error, what the attribute names (the extractor, the store
//! type) and the `Tx` import are still used: the error comes alone, without
//! "unused import" warnings.
#![deny(unused_imports)]

use serde::Deserialize;

use idem::Tx;

use keys::by_order;
use stores::MyStore;

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

mod keys {
    pub fn by_order(
        _d: &idem::Delivery,
        p: &super::OrderPlaced,
    ) -> Result<idem::Key, idem::KeyError> {
        idem::Key::new(p.order_id.to_string())
    }
}

mod stores {
    pub struct MyStore;
}

#[idem::idempotent(topic = "orders", with = by_order, store = "sqlite", ack = "sometimes")]
async fn place(order: OrderPlaced, tx: &mut Tx<'_>) -> Result<(), AppError> {
    let _ = (order, tx);
    Ok(())
}

#[idem::idempotent(topic = "orders", key = "order_id", store = MyStore, retries = -1)]
async fn refund(order: OrderPlaced) -> Result<(), AppError> {
    let _ = order;
    Ok(())
}

fn main() {}
