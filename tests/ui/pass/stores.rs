//! Built-in stores, no store, and a custom store type.
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

/// A do-nothing store, implemented for several types below.
macro_rules! store {
    ($name:ident) => {
        #[derive(Default)]
        struct $name;

        impl DedupStore for $name {
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
            async fn rollback(
                &self,
                _tx: NoTx,
                _claimed: &[Claimed<'_>],
            ) -> Result<(), StoreError> {
                Ok(())
            }
            async fn unclaim(
                &self,
                _tx: &mut Self::Tx<'_>,
                _claimed: &[Claimed<'_>],
            ) -> Result<(), StoreError> {
                Ok(())
            }
            async fn nested<'t>(
                &self,
                _tx: &'t mut Self::Tx<'_>,
            ) -> Result<Self::Tx<'t>, StoreError> {
                Ok(NoTx)
            }
            async fn end_nested(&self, _tx: Self::Tx<'_>, _commit: bool) -> Result<(), StoreError> {
                Ok(())
            }
        }
    };
}

store!(MyStore);
store!(MyTxStore);

/// A custom store that hands the handler its transaction.
impl idem::TransactionalStore for MyTxStore {}

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
    tx: &mut NoTx,
) -> Result<(), AppError> {
    let _ = (order, tx);
    Ok(())
}

fn main() {}
