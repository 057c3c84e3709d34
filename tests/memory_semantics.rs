//! What only the memory store (a lease store: no shared transaction, a
//! done-record written after the handler) is tested for here. The delivery
//! scenarios every store shares (duplicates, lost acks, a crash before the
//! ack, a failure releasing the lease, a failing batch item, conflicts) run
//! for it in `tests/store_conformance.rs`, with the conformance suite.

mod common;

use std::collections::HashMap;
use std::sync::Mutex;

use common::{order, run_until_idle};
use idem::source::memory::{BrokerEvent, MemoryBroker, Message};
use idem::store::memory::MemoryStore;
use idem::{Runtime, idempotent};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Order {
    order_id: String,
}

type Effects = Mutex<Option<HashMap<String, u32>>>;

fn record(effects: &Effects, key: &str) {
    *effects
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .entry(key.to_owned())
        .or_default() += 1;
}

fn counts(effects: &Effects) -> HashMap<String, u32> {
    effects.lock().unwrap().clone().unwrap_or_default()
}

// --- manual_immediate with a lease store: the ack goes out at ack.ack() ----

static IMMEDIATE: Effects = Mutex::new(None);
static RELEASE: tokio::sync::Notify = tokio::sync::Notify::const_new();

#[idempotent(
    topic = "imm",
    key = "order_id",
    store = "memory",
    name = "mem-immediate",
    ack = "manual_immediate"
)]
async fn mem_immediate(o: Order, ack: idem::Ack) -> Result<(), String> {
    record(&IMMEDIATE, &o.order_id);
    ack.ack();
    // Still running: the test only lets it finish once the broker has the ack.
    RELEASE.notified().await;
    Ok(())
}

#[tokio::test]
async fn manual_immediate_with_lease_store_acks_when_the_handler_says_so() {
    let broker = MemoryBroker::new();
    let id = broker.publish("imm", Message::new(r#"{"order_id":"k1"}"#));
    let rt = Runtime::builder(broker.clone())
        .store(MemoryStore::new())
        .handlers(["mem-immediate"])
        .build()
        .unwrap();
    let stop = idem::CancellationToken::new();
    let check = async {
        // The handler is parked after ack.ack(): the Acked event must arrive
        // while it is still running.
        tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                let acked = broker
                    .events()
                    .iter()
                    .any(|e| matches!(e, BrokerEvent::Acked { id: i } if *i == id));
                if acked {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the ack did not reach the broker while the handler was still running");
        assert_eq!(rt.stats_of("mem-immediate").unwrap().in_flight, 1);
        RELEASE.notify_one();
        broker.wait_idle().await;
        stop.cancel();
    };
    tokio::join!(rt.run(stop.clone()), check);
    assert_eq!(counts(&IMMEDIATE).get("k1"), Some(&1));
    assert_eq!(rt.stats_of("mem-immediate").unwrap().processed, 1);
}

// --- a lease store failing mid-batch keeps what already took effect --------

/// The memory store, except that releasing leases fails (the store went
/// away just then).
#[derive(Default)]
struct FlakyRelease(MemoryStore);

impl idem::LeaseStore for FlakyRelease {
    fn kind(&self) -> &'static str {
        "flaky-release"
    }
    async fn claim(
        &self,
        request: &idem::store::ClaimRequest<'_>,
    ) -> Result<idem::store::Claim, idem::StoreError> {
        self.0.claim(request).await
    }
    async fn claim_all(
        &self,
        requests: &[idem::store::ClaimRequest<'_>],
    ) -> Result<Vec<idem::store::Claim>, idem::StoreError> {
        self.0.claim_all(requests).await
    }
    async fn complete(&self, done: &idem::store::Claimed<'_>) -> Result<(), idem::StoreError> {
        self.0.complete(done).await
    }
    async fn complete_all(
        &self,
        done: &[idem::store::Claimed<'_>],
    ) -> Result<(), idem::StoreError> {
        self.0.complete_all(done).await
    }
    async fn release(&self, _claimed: &idem::store::Claimed<'_>) -> Result<(), idem::StoreError> {
        Err(idem::StoreError::unavailable(
            "flaky-release",
            std::io::Error::other("connection reset"),
        ))
    }
}

static FLAKY_BATCH: Effects = Mutex::new(None);

#[idempotent(topic = "flaky-batch", key = "order_id", store = FlakyRelease, name = "mem-flaky-batch", ack = "batch", retries = 0)]
async fn mem_flaky_batch(o: Order) -> Result<(), String> {
    if o.order_id == "bad" {
        return Err("refused".into());
    }
    record(&FLAKY_BATCH, &o.order_id);
    Ok(())
}

#[tokio::test]
async fn lease_store_failing_mid_batch_records_the_items_that_took_effect() {
    let broker = MemoryBroker::new();
    for k in ["a", "b", "bad", "c"] {
        broker.publish("flaky-batch", order(k, 0));
    }
    let rt = Runtime::builder(broker.clone())
        .store(FlakyRelease::default())
        .handlers(["mem-flaky-batch"])
        .build()
        .unwrap();
    run_until_idle(&rt, &broker).await;
    // Releasing the failed item's lease failed part-way through the batch:
    // the three that ran keep their done-records and are not run again.
    let counts = counts(&FLAKY_BATCH);
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    let stats = rt.stats_of("mem-flaky-batch").unwrap();
    assert_eq!(stats.processed, 3, "{stats:?}");
    assert_eq!(broker.dead_letters("flaky-batch.dlq").len(), 1);
}
