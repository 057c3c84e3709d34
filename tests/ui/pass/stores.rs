//! Built-in stores, no store, and a custom store type.
use serde::Deserialize;

use idem::store::{Claim, ClaimRequest, Claimed};
use idem::{LeaseStore, StoreError, TxStore};

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
async fn with_sqlite(order: OrderPlaced, tx: &mut idem::Tx<'_>) -> Result<(), AppError> {
    let _ = (order, tx);
    Ok(())
}

#[idem::idempotent(topic = "orders", key = "order_id", store = "memory")]
async fn with_memory(order: OrderPlaced) -> Result<(), AppError> {
    let _ = order;
    Ok(())
}

/// No store: at-least-once effects, no key needed.
#[idem::idempotent(topic = "orders")]
async fn without_store(order: OrderPlaced) -> Result<(), AppError> {
    let _ = order;
    Ok(())
}

/// No store, but a key (used in logs and for ordering).
#[idem::idempotent(topic = "orders", key = "order_id")]
async fn without_store_with_key(order: OrderPlaced) -> Result<(), AppError> {
    let _ = order;
    Ok(())
}

/// A do-nothing lease store.
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

/// A custom transactional store with a transaction type of its own.
#[derive(Default)]
struct MyTxStore;

/// Its transaction.
struct MyTx;

impl TxStore for MyTxStore {
    type Tx<'c> = MyTx;

    fn kind(&self) -> &'static str {
        "mine-tx"
    }
    async fn begin(&self) -> Result<MyTx, StoreError> {
        Ok(MyTx)
    }
    async fn claim(
        &self,
        _tx: &mut Self::Tx<'_>,
        requests: &[ClaimRequest<'_>],
    ) -> Result<Vec<Claim>, StoreError> {
        Ok(requests.iter().map(|_| Claim::New { token: 0 }).collect())
    }
    async fn commit(&self, _tx: MyTx, _done: &[Claimed<'_>]) -> Result<(), StoreError> {
        Ok(())
    }
    async fn rollback(&self, _tx: MyTx) -> Result<(), StoreError> {
        Ok(())
    }
    async fn savepoint<'t>(&self, _tx: &'t mut Self::Tx<'_>) -> Result<Self::Tx<'t>, StoreError> {
        Ok(MyTx)
    }
    async fn end_savepoint(&self, _tx: Self::Tx<'_>, _keep: bool) -> Result<(), StoreError> {
        Ok(())
    }
    async fn unclaim(
        &self,
        _tx: &mut Self::Tx<'_>,
        _claimed: &[Claimed<'_>],
    ) -> Result<(), StoreError> {
        Ok(())
    }
}

#[idem::idempotent(topic = "orders", key = "order_id", store = MyStore)]
async fn with_custom_store(order: OrderPlaced) -> Result<(), AppError> {
    let _ = order;
    Ok(())
}

mod stores {
    pub(crate) use super::MyStore as Custom;
}

#[idem::idempotent(topic = "orders", key = "order_id", store = stores::Custom)]
async fn with_custom_store_path(order: OrderPlaced) -> Result<(), AppError> {
    let _ = order;
    Ok(())
}

#[idem::idempotent(topic = "orders", key = "order_id", store = MyTxStore)]
async fn with_custom_transactional_store(
    order: OrderPlaced,
    tx: &mut MyTx,
) -> Result<(), AppError> {
    let _ = (order, tx);
    Ok(())
}

fn main() {}
