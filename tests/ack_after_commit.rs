//! With a transactional store no ack reaches the broker before the store
//! transaction committed, in every ack mode that acks after processing
//! (`before` is at-most-once by definition and excluded).
//!
//! `Recording` is also the test of a user-defined store: it wraps the SQLite
//! store and writes a `Committed` event into the broker's log after each commit.

mod common;

use common::{effect_counts, order, run_until_idle, sqlite};
use idem::source::memory::{BrokerEvent, Faults, MemoryBroker};
use idem::store::sqlite::SqliteStore;
use idem::store::{Claim, ClaimRequest, Claimed};
use idem::{Ack, Runtime, StoreError, Tx, TxStore, idempotent};
use serde::Deserialize;

struct Recording {
    inner: SqliteStore,
    broker: MemoryBroker,
}

impl TxStore for Recording {
    type Tx<'c> = Tx<'c>;

    fn kind(&self) -> &'static str {
        "recording-sqlite"
    }
    async fn begin(&self) -> Result<Self::Tx<'static>, StoreError> {
        self.inner.begin().await
    }
    async fn claim(
        &self,
        tx: &mut Self::Tx<'_>,
        requests: &[ClaimRequest<'_>],
    ) -> Result<Vec<Claim>, StoreError> {
        self.inner.claim(tx, requests).await
    }
    async fn commit(&self, tx: Self::Tx<'static>, done: &[Claimed<'_>]) -> Result<(), StoreError> {
        self.inner.commit(tx, done).await?;
        let ids = done
            .iter()
            .map(|c| c.request.message_id.to_owned())
            .collect();
        self.broker.record(BrokerEvent::Committed { ids });
        Ok(())
    }
    async fn rollback(&self, tx: Self::Tx<'static>) -> Result<(), StoreError> {
        self.inner.rollback(tx).await
    }
    async fn unclaim(
        &self,
        tx: &mut Self::Tx<'_>,
        claimed: &[Claimed<'_>],
    ) -> Result<(), StoreError> {
        self.inner.unclaim(tx, claimed).await
    }
    async fn savepoint<'t>(&self, tx: &'t mut Self::Tx<'_>) -> Result<Self::Tx<'t>, StoreError> {
        self.inner.savepoint(tx).await
    }
    async fn end_savepoint(&self, tx: Self::Tx<'_>, keep: bool) -> Result<(), StoreError> {
        self.inner.end_savepoint(tx, keep).await
    }
}

#[derive(Debug, Deserialize)]
struct Order {
    order_id: String,
    seq: u32,
}

async fn apply(tx: &mut Tx<'_>, handler: &str, o: &Order) -> Result<(), sqlx::Error> {
    common::insert_effect(tx, handler, &o.order_id, o.seq).await
}

#[idempotent(topic = "auto", key = "order_id", store = Recording, name = "rec-auto", ack = "auto")]
async fn rec_auto(o: Order, tx: &mut Tx<'_>) -> Result<(), sqlx::Error> {
    apply(tx, "rec-auto", &o).await
}

#[idempotent(topic = "manual", key = "order_id", store = Recording, name = "rec-manual", ack = "manual")]
async fn rec_manual(o: Order, tx: &mut Tx<'_>, ack: Ack) -> Result<(), sqlx::Error> {
    apply(tx, "rec-manual", &o).await?;
    ack.ack();
    Ok(())
}

#[idempotent(topic = "immediate", key = "order_id", store = Recording, name = "rec-immediate", ack = "manual_immediate")]
async fn rec_immediate(o: Order, tx: &mut Tx<'_>, ack: Ack) -> Result<(), sqlx::Error> {
    // Acking first: idem must still hold the ack back until the commit.
    ack.ack();
    apply(tx, "rec-immediate", &o).await
}

#[idempotent(topic = "batch", key = "order_id", store = Recording, name = "rec-batch", ack = "batch")]
async fn rec_batch(o: Order, tx: &mut Tx<'_>) -> Result<(), sqlx::Error> {
    apply(tx, "rec-batch", &o).await
}

/// Every `Acked` event has a `Committed` event naming its message earlier in the log.
fn assert_commit_precedes_ack(events: &[BrokerEvent]) {
    let mut committed = std::collections::HashSet::new();
    let mut acks = 0;
    for e in events {
        match e {
            BrokerEvent::Committed { ids } => committed.extend(ids.iter().cloned()),
            BrokerEvent::Acked { id } => {
                acks += 1;
                assert!(
                    committed.contains(id),
                    "ack of {id} before its commit: {events:#?}"
                );
            }
            _ => {}
        }
    }
    assert!(acks > 0, "no acks at all");
}

async fn check_mode(topic: &str, handler: &str) {
    let store = sqlite().await;
    let broker = MemoryBroker::with_faults(Faults {
        duplicate: 0.3,
        lose_ack: 0.3,
        seed: 11,
        ..Faults::default()
    });
    for i in 0..30 {
        broker.publish(topic, order(&format!("k{i}"), i).id(format!("{topic}-{i}")));
    }
    let rt = Runtime::builder(broker.clone())
        .store(Recording {
            inner: store.clone(),
            broker: broker.clone(),
        })
        .handlers([handler])
        .build()
        .unwrap();
    run_until_idle(&rt, &broker).await;
    let counts = effect_counts(&store, handler).await;
    assert_eq!(counts.len(), 30);
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    assert_commit_precedes_ack(&broker.events());
}

#[tokio::test]
async fn auto_acks_after_commit() {
    check_mode("auto", "rec-auto").await;
}

#[tokio::test]
async fn manual_acks_after_commit() {
    check_mode("manual", "rec-manual").await;
}

#[tokio::test]
async fn manual_immediate_acks_after_commit() {
    check_mode("immediate", "rec-immediate").await;
}

#[tokio::test]
async fn batch_acks_after_commit() {
    check_mode("batch", "rec-batch").await;
}
