//! NATS JetStream end to end against a real nats-server: the shared
//! scenarios of `common/brokers.rs`, plus what only JetStream has (progress
//! for long handlers, `max_deliver`). The shared server is `NATS_URL`
//! (default `nats://127.0.0.1:4222`); the restart test runs its own server.

#[path = "common/brokers.rs"]
mod brokers;
mod common;
#[path = "common/fixtures/nats.rs"]
mod fixture;

use std::time::Duration;

use brokers::Broker;

use fixture::*;

brokers::broker_suite!(Nats);

/// A handler running 5 s with `ack_wait` 2 s sends progress and keeps its message.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_handler_sends_progress_and_keeps_its_message() {
    brokers::long_handler_is_kept_alive::<Nats>(Duration::from_secs(5)).await;
}

/// With `max_deliver(2)`, a message nacked on its second delivery is
/// dead-lettered (and terminated) instead of silently dropped by the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_deliver_is_honoured_with_a_dead_letter() {
    let b = Nats::shared().await;
    let probe = brokers::Probe::new();
    let topic = probe.name(brokers::TOPIC);
    b.publish(
        &topic,
        &[brokers::order("nack-1", 1), brokers::order("k-ok", 2)],
    )
    .await;
    let store = common::sqlite().await;
    let source = b.source().max_deliver(2);
    let run = brokers::start(
        brokers::TestSource::new(source, probe.clone()),
        &store,
        "bk-nacker",
    );
    let dlq = format!("{topic}.dlq");
    let letters = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let letters = b.dead_letters(&dlq).await;
            if !letters.is_empty() {
                return letters;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("no dead letter within 60 s");
    probe
        .wait_settled(
            &std::collections::HashSet::from(["k-ok".to_owned()]),
            Duration::from_secs(60),
        )
        .await;
    let stats = run.stop("bk-nacker").await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let l = &letters[0];
    assert!(l.reason.contains("max_deliver (2)"), "{l:?}");
    assert_eq!(l.attempts, "2", "{l:?}");
    assert_eq!(l.original_id, "m-nack-1", "{l:?}");
    let attempts: Vec<u32> = probe
        .seen()
        .into_iter()
        .filter(|(k, _)| k == "nack-1")
        .map(|(_, a)| a)
        .collect();
    assert_eq!(
        attempts,
        vec![1, 2],
        "JetStream's delivery count is the attempt"
    );
    assert_eq!(stats.processed, 1, "{stats:?}");
    b.assert_settled(&topic, &probe.name("bk-nacker")).await;
    b.cleanup(&topic).await;
}
