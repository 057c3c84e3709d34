use serde::Deserialize;

use idem::store::{Claim, ClaimRequest, Claimed};
use idem::{DedupStore, NoTx, StoreError};

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

impl DedupStore for MyStore {
    type Tx<'c> = NoTx;

    fn kind(&self) -> &'static str {
        "mine"
    }
    async fn begin(&self) -> Result<NoTx, StoreError> {
        Ok(NoTx)
    }
    async fn claim(
        &self,
        _tx: &mut Self::Tx<'_>,
        requests: &[ClaimRequest<'_>],
    ) -> Result<Vec<Claim>, StoreError> {
        Ok(requests.iter().map(|_| Claim::New { token: 0 }).collect())
    }
    async fn commit(&self, _tx: NoTx, _done: &[Claimed<'_>]) -> Result<(), StoreError> {
        Ok(())
    }
    async fn rollback(&self, _tx: NoTx, _claimed: &[Claimed<'_>]) -> Result<(), StoreError> {
        Ok(())
    }
    async fn unclaim(
        &self,
        _tx: &mut Self::Tx<'_>,
        _claimed: &[Claimed<'_>],
    ) -> Result<(), StoreError> {
        Ok(())
    }
    async fn nested<'t>(&self, _tx: &'t mut Self::Tx<'_>) -> Result<Self::Tx<'t>, StoreError> {
        Ok(NoTx)
    }
    async fn end_nested(&self, _tx: Self::Tx<'_>, _commit: bool) -> Result<(), StoreError> {
        Ok(())
    }
}

#[idem::idempotent(topic = "orders", key = "order_id", store = MyStore)]
async fn handle(order: OrderPlaced, tx: &mut idem::NoTx) -> Result<(), AppError> {
    let _ = (order, tx);
    Ok(())
}

fn main() {}
