//! RabbitMQ end to end against a real broker: the shared scenarios of
//! `common/brokers.rs`, plus what only AMQP has (a batch ack with
//! `multiple`). The shared broker is `AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`); the restart test runs a private
//! RabbitMQ node of its own.

#[path = "common/brokers.rs"]
mod brokers;
mod common;
#[path = "common/fixtures/rabbitmq.rs"]
mod fixture;

use brokers::Broker as _;
use fixture::*;

brokers::broker_suite!(Rabbit);

/// A subscription closed while a burst of deliveries arrives, and its
/// queue deleted the moment `close` returned (as `bench_brokers` resets its
/// queue after a run): the consumer's cancel was confirmed before the
/// channel closed, so nothing logs an error; and a subscription dropped
/// without `close` (as `bench_brokers` drops the one it opens to declare the
/// queue) cancels its consumer in the same order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_deleted_right_after_close_logs_no_warning_or_error() {
    use idem::Source as _;
    use idem::source::{SubscribeSpec, Subscription as _};
    use lapin::options::QueueDeleteOptions;

    let test = concat!(
        module_path!(),
        "::queue_deleted_right_after_close_logs_no_warning_or_error"
    );
    if !brokers::alone(test).await {
        return;
    }
    let logs = brokers::init_logs().expect("the log capture is the global subscriber");
    let b = Rabbit::shared().await;
    let probe = brokers::Probe::new();
    let topic = probe.name(brokers::TOPIC);
    let (_conn, ch) = b.channel().await;
    for round in 0..20 {
        let source = b.source();
        let spec = SubscribeSpec {
            topic: &topic,
            group: "closed",
            dead_letter: None,
            prefetch: 64,
        };
        if round % 2 == 1 {
            // Dropped at once: its session closes in a task of its own.
            drop(source.subscribe(spec).await.expect("subscribe"));
        }
        let sub = source.subscribe(spec).await.expect("subscribe");
        b.publish(&topic, &brokers::orders(300)).await;
        let first = sub.fetch(10).await.expect("fetch");
        assert!(!first.is_empty(), "round {round}: nothing delivered");
        sub.close().await;
        drop(sub);
        ch.queue_delete(topic.as_str().into(), QueueDeleteOptions::default())
            .await
            .expect("delete the queue");
    }
    b.cleanup(&topic).await;
    let lines = std::mem::take(&mut *logs.lock().unwrap());
    assert!(
        lines.is_empty(),
        "warnings or errors:\n{}",
        lines.join("\n")
    );
}
