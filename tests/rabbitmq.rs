//! RabbitMQ end to end against a real broker: the shared scenarios of
//! `common/brokers.rs`, plus what only AMQP has (a batch ack with
//! `multiple`). The shared broker is `AMQP_URL` (default
//! `amqp://guest:guest@127.0.0.1:5672/%2f`); the restart test runs a private
//! RabbitMQ node of its own.

#[path = "common/brokers.rs"]
mod brokers;
mod common;

use std::time::Duration;

use brokers::{Broker, PrivateServer, Process, SeenDeadLetter, TempDir, TestMessage};
use idem::source::dead_letter_headers as dlh;
use idem::source::rabbitmq::{DEFAULT_URL, RabbitMq, URL_ENV};
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

/// The dead-letter exchange idem declares by default.
const DLX: &str = "idem.dead-letter";

struct Rabbit {
    url: String,
}

impl Rabbit {
    async fn channel(&self) -> (Connection, Channel) {
        let mut last = None;
        // A restarted node may need a moment before it accepts clients.
        for _ in 0..300 {
            match Connection::connect(&self.url, ConnectionProperties::default()).await {
                Ok(c) => {
                    let ch = c.create_channel().await.expect("channel");
                    return (c, ch);
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "RabbitMQ at {} does not answer ({last:?}): start it with ./scripts/services.sh or set {URL_ENV}",
            self.url
        );
    }

    /// Declares `queue` the way idem does (quorum, dead letters to `<queue>.dlq`).
    async fn declare(&self, ch: &Channel, queue: &str) {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(DLX.into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(format!("{queue}.dlq").into()),
        );
        ch.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .expect("declare queue");
    }
}

fn header(h: &FieldTable, k: &str) -> String {
    match h.inner().get(k) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

struct RabbitNode {
    process: Process,
    port: u16,
    _dir: TempDir,
}

impl PrivateServer for RabbitNode {
    fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }
    fn kill(&mut self) {
        self.process.kill();
    }
    async fn restart(&mut self) {
        self.process.start();
        brokers::wait_port(self.port, Duration::from_secs(90)).await;
    }
}

impl Broker for Rabbit {
    type Source = RabbitMq;
    type Server = RabbitNode;
    const NAME: &'static str = "rabbitmq";
    const KEEPS_PRODUCER_ID: bool = true;

    async fn shared() -> Self {
        let url = std::env::var(URL_ENV).unwrap_or_else(|_| DEFAULT_URL.into());
        if let Err(e) = Connection::connect(&url, ConnectionProperties::default()).await {
            panic!(
                "RabbitMQ at {url} does not answer ({e}): start it with ./scripts/services.sh or set {URL_ENV}"
            );
        }
        Rabbit { url }
    }

    /// A private node: its own name, ports, data and log directories, no
    /// plugins (the shared node's management port stays untouched).
    async fn private() -> (Self, RabbitNode) {
        let port = brokers::free_port();
        let dist = brokers::free_port();
        let dir = TempDir::new("idem-rabbit");
        let base = dir.0.display().to_string();
        std::fs::write(
            dir.0.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\n"),
        )
        .expect("write config");
        std::fs::write(dir.0.join("enabled_plugins"), "[].\n").expect("write plugins");
        let env = [
            ("RABBITMQ_NODENAME", format!("idem-test-{port}@localhost")),
            ("RABBITMQ_NODE_PORT", port.to_string()),
            ("RABBITMQ_DIST_PORT", dist.to_string()),
            ("RABBITMQ_MNESIA_BASE", format!("{base}/mnesia")),
            ("RABBITMQ_LOG_BASE", format!("{base}/log")),
            ("RABBITMQ_CONFIG_FILE", format!("{base}/rabbitmq.conf")),
            (
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                format!("{base}/enabled_plugins"),
            ),
            ("RABBITMQ_PID_FILE", format!("{base}/pid")),
            ("HOME", base.clone()),
        ]
        .map(|(k, v)| (k.to_owned(), v))
        .to_vec();
        let process = Process::spawn_with_env(
            "/usr/lib/rabbitmq/bin/rabbitmq-server",
            Vec::new(),
            env,
            Some(dir.0.join("pid")),
        );
        brokers::wait_port(port, Duration::from_secs(90)).await;
        let node = RabbitNode {
            process,
            port,
            _dir: dir,
        };
        (Rabbit { url: node.url() }, node)
    }

    fn source(&self) -> RabbitMq {
        RabbitMq::new(&self.url)
            .expect("source")
            .fetch_wait(Duration::from_millis(200))
    }

    async fn publish(&self, topic: &str, messages: &[TestMessage]) {
        let (_conn, ch) = self.channel().await;
        self.declare(&ch, topic).await;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm.select");
        for chunk in messages.chunks(200) {
            let mut confirms = Vec::with_capacity(chunk.len());
            for m in chunk {
                let mut headers = FieldTable::default();
                for (k, v) in &m.headers {
                    headers.insert(k.as_str().into(), AMQPValue::LongString(v.as_str().into()));
                }
                let props = BasicProperties::default()
                    .with_message_id(ShortString::from(m.id.as_str()))
                    .with_headers(headers)
                    .with_delivery_mode(2);
                confirms.push(
                    ch.basic_publish(
                        "".into(),
                        topic.into(),
                        BasicPublishOptions::default(),
                        &m.payload,
                        props,
                    )
                    .await
                    .expect("publish"),
                );
            }
            for c in confirms {
                assert!(c.await.expect("confirm").is_ack(), "publish not confirmed");
            }
        }
    }

    async fn dead_letters(&self, destination: &str) -> Vec<SeenDeadLetter> {
        let (_conn, ch) = self.channel().await;
        let mut out = Vec::new();
        while let Some(m) = ch
            .basic_get(destination.into(), BasicGetOptions { no_ack: true })
            .await
            .expect("basic.get")
        {
            let h = m.properties.headers().clone().unwrap_or_default();
            out.push(SeenDeadLetter {
                payload: m.data.clone(),
                reason: header(&h, dlh::REASON),
                attempts: header(&h, dlh::ATTEMPTS),
                handler: header(&h, dlh::HANDLER),
                original_id: header(&h, dlh::ORIGINAL_ID),
            });
        }
        out
    }

    async fn settled(&self, topic: &str, _group: &str) -> Result<(), String> {
        let (_conn, ch) = self.channel().await;
        let q = ch
            .queue_declare(
                topic.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| format!("queue {topic}: {e}"))?;
        // Unacked deliveries of a closed channel are back in the ready count.
        match q.message_count() {
            0 => Ok(()),
            n => Err(format!("{n} messages ready")),
        }
    }

    async fn cleanup(&self, topic: &str) {
        let (_conn, ch) = self.channel().await;
        for q in [topic.to_owned(), format!("{topic}.dlq")] {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
}

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
