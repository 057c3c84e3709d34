//! Property test: whatever the broker does (duplicates, reordering, lost
//! acks, any concurrency), every key's effect is applied exactly once with
//! the SQLite store.

mod common;

use common::{effect_counts, order, run_until_idle, sqlite};
use idem::source::memory::{Faults, MemoryBroker};
use idem::{Runtime, Tx, idempotent};
use proptest::prelude::*;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Order {
    order_id: String,
    seq: u32,
}

#[idempotent(
    topic = "prop",
    key = "order_id",
    store = "sqlite",
    name = "prop-sqlite",
    backoff = "1ms..2ms"
)]
async fn prop_sqlite(o: Order, tx: &mut Tx<'_>) -> Result<(), sqlx::Error> {
    common::insert_effect(tx, "prop-sqlite", &o.order_id, o.seq).await
}

#[idempotent(
    topic = "prop",
    key = "order_id",
    store = "sqlite",
    name = "prop-batch",
    ack = "batch",
    backoff = "1ms..2ms"
)]
async fn prop_batch(o: Order, tx: &mut Tx<'_>) -> Result<(), sqlx::Error> {
    common::insert_effect(tx, "prop-batch", &o.order_id, o.seq).await
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn effect_count_per_key_is_exactly_one(
        keys in 1usize..40,
        resends in proptest::collection::vec(0u32..3, 40),
        duplicate in 0.0f64..0.6,
        lose_ack in 0.0f64..0.6,
        reorder in any::<bool>(),
        seed in any::<u64>(),
        concurrency in 1usize..16,
        batch in any::<bool>(),
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let counts = rt.block_on(async {
            let store = sqlite().await;
            let broker = MemoryBroker::with_faults(Faults { duplicate, lose_ack, reorder, seed, max_lost_acks_per_message: 3 });
            for (k, extra) in resends.iter().take(keys).enumerate() {
                // Producer retries: the same business key under new message ids.
                for r in 0..=*extra {
                    broker.publish("prop", order(&format!("k{k}"), r).id(format!("m{k}-{r}")));
                }
            }
            let handler = if batch { "prop-batch" } else { "prop-sqlite" };
            let runtime = Runtime::builder(broker.clone())
                .store(store.clone())
                .concurrency(concurrency)
                .handlers([handler])
                .build()
                .unwrap();
            run_until_idle(&runtime, &broker).await;
            effect_counts(&store, handler).await
        });
        prop_assert_eq!(counts.len(), keys);
        prop_assert!(counts.values().all(|&n| n == 1), "{:?}", counts);
    }
}
