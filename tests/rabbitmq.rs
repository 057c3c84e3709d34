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

use fixture::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_messages_with_300_redeliveries_auto() {
    brokers::thousand_with_redeliveries::<Rabbit>("bk-auto").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_messages_with_300_redeliveries_manual() {
    brokers::thousand_with_redeliveries::<Rabbit>("bk-manual").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_messages_with_300_redeliveries_manual_immediate() {
    brokers::thousand_with_redeliveries::<Rabbit>("bk-immediate").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_messages_with_300_redeliveries_batch() {
    brokers::thousand_with_redeliveries::<Rabbit>("bk-batch").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_after_commit_before_ack_is_redelivered_and_acked_as_duplicate() {
    brokers::crash_before_ack::<Rabbit>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_consumers_on_one_queue_split_the_work() {
    brokers::two_consumers_share_a_group::<Rabbit>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_messages_go_to_the_dead_letter_queue() {
    brokers::poison_goes_to_dead_letters::<Rabbit>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconnects_after_the_node_restarts() {
    brokers::reconnect_after_restart::<Rabbit>().await;
}
