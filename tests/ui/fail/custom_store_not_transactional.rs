use serde::Deserialize;

use idem::store::{Claim, ClaimRequest, Claimed};
use idem::{LeaseStore, StoreError};

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

/// A lease store: it has no transaction to share with the handler.
#[derive(Default)]
struct MyStore;

impl LeaseStore for MyStore {
    fn kind(&self) -> &'static str {
        "mine"
    }
    async fn claim(&self, _request: &ClaimRequest<'_>) -> Result<Claim, StoreError> {
        Ok(Claim::New { token: 1 })
    }
    async fn complete(&self, _done: &Claimed<'_>) -> Result<(), StoreError> {
        Ok(())
    }
    async fn release(&self, _claimed: &Claimed<'_>) -> Result<(), StoreError> {
        Ok(())
    }
}

#[idem::idempotent(topic = "orders", key = "order_id", store = MyStore)]
async fn handle(order: OrderPlaced, tx: &mut idem::Tx<'_>) -> Result<(), AppError> {
    let _ = (order, tx);
    Ok(())
}

fn main() {}
