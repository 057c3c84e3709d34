//! Redis Streams end to end against a real redis-server: the shared scenarios
//! of `common/brokers.rs`, plus what only Redis has (an entry without a
//! payload field). The shared server is `REDIS_URL` (default
//! `redis://127.0.0.1:6379`); the restart test runs its own redis-server.

#[path = "common/brokers.rs"]
mod brokers;
mod common;
#[path = "common/fixtures/redis_streams.rs"]
mod fixture;

use std::collections::HashSet;
use std::time::Duration;

use brokers::{Broker, Probe};
use redis::AsyncCommands;
use redis::streams::{StreamPendingReply, StreamRangeReply};

use fixture::*;

brokers::broker_suite!(Redis);

/// An entry without the payload field is dead-lettered by the source with
/// the reason (no panic, no handler run); its neighbours are processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn entry_without_payload_field_is_dead_lettered_with_the_reason() {
    let b = Redis::shared().await;
    let probe = Probe::new();
    let topic = probe.name(brokers::TOPIC);
    let mut conn = b.conn().await;
    let odd: String = conn
        .xadd(
            &topic,
            "*",
            &[
                ("body", "{\"order_id\":\"k-odd\",\"seq\":1}"),
                ("x-trace", "t1"),
            ],
        )
        .await
        .expect("XADD");
    b.publish(&topic, &[brokers::order("k-good", 2)]).await;
    let store = common::sqlite().await;
    let run = brokers::start(
        brokers::TestSource::new(b.source(), probe.clone()),
        &store,
        "bk-auto",
    );
    probe
        .wait_settled(
            &HashSet::from(["k-good".to_owned()]),
            Duration::from_secs(60),
        )
        .await;
    // The source settles the odd entry on its own: wait until nothing is pending.
    let group = probe.name("bk-auto");
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let p: StreamPendingReply = conn.xpending(&topic, &group).await.expect("XPENDING");
            let dl: usize = conn.xlen(format!("{topic}.dlq")).await.expect("XLEN");
            if p.count() == 0 && dl == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the odd entry was not dead-lettered within 60 s");
    let stats = run.stop("bk-auto").await;
    assert_eq!(stats.processed, 1, "{stats:?}");
    let letters = b.dead_letters(&format!("{topic}.dlq")).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let l = &letters[0];
    assert!(
        l.reason.contains("no `payload` field") && l.reason.contains("body"),
        "{l:?}"
    );
    assert_eq!(
        (l.original_id.as_str(), l.attempts.as_str()),
        (odd.as_str(), "1")
    );
    assert_eq!(l.handler, group);
    // The original fields travel with the dead letter.
    let raw: StreamRangeReply = conn
        .xrange_all(format!("{topic}.dlq"))
        .await
        .expect("XRANGE");
    assert_eq!(
        raw.ids[0].map.get("x-trace").map(text).as_deref(),
        Some("t1")
    );
    b.assert_settled(&topic, &group).await;
    b.cleanup(&topic).await;
}

/// A handler running 2.5 s with a claim idle time of 0.8 s keeps its entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_handler_keeps_its_entry() {
    brokers::long_handler_is_kept_alive::<Redis>(Duration::from_millis(2500)).await;
}
