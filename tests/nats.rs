//! NATS JetStream end to end against a real nats-server: the shared
//! scenarios of `common/brokers.rs`, plus what only JetStream has (progress
//! for long handlers, `max_deliver`). The shared server is `NATS_URL`
//! (default `nats://127.0.0.1:4222`); the restart test runs its own server.

#[path = "common/brokers.rs"]
mod brokers;
mod common;

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use brokers::{Broker, PrivateServer, Process, SeenDeadLetter, TempDir, TestMessage};
use idem::source::dead_letter_headers as dlh;
use idem::source::nats::{DEFAULT_URL, NatsJetStream, URL_ENV};

struct Nats {
    url: String,
}

/// The stream name idem gives a subject it creates a stream for.
fn stream_name(subject: &str) -> String {
    subject.replace(['.', '*', '>'], "_")
}

impl Nats {
    async fn js(&self) -> jetstream::Context {
        let mut last = None;
        // A restarted server may need a moment before it accepts clients.
        for _ in 0..100 {
            match async_nats::connect(self.url.as_str()).await {
                Ok(c) => return jetstream::new(c),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "NATS at {} does not answer ({last:?}): start nats-server -js with ./scripts/services.sh or set {URL_ENV}",
            self.url
        );
    }

    async fn stream(&self, js: &jetstream::Context, subject: &str) -> stream::Stream {
        js.get_or_create_stream(stream::Config {
            name: stream_name(subject),
            subjects: vec![subject.to_owned()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .expect("create stream")
    }
}

struct NatsServer {
    process: Process,
    port: u16,
    _dir: TempDir,
}

impl PrivateServer for NatsServer {
    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
    fn kill(&mut self) {
        self.process.kill();
    }
    async fn restart(&mut self) {
        self.process.start();
        brokers::wait_port(self.port, Duration::from_secs(20)).await;
    }
}

impl Broker for Nats {
    type Source = NatsJetStream;
    type Server = NatsServer;
    const NAME: &'static str = "nats jetstream";
    const KEEPS_PRODUCER_ID: bool = true;

    async fn shared() -> Self {
        let url = std::env::var(URL_ENV).unwrap_or_else(|_| DEFAULT_URL.into());
        if let Err(e) = async_nats::connect(url.as_str()).await {
            panic!(
                "NATS at {url} does not answer ({e}): start nats-server -js with ./scripts/services.sh or set {URL_ENV}"
            );
        }
        Nats { url }
    }

    async fn private() -> (Self, NatsServer) {
        let port = brokers::free_port();
        let dir = TempDir::new("idem-nats");
        let process = Process::spawn(
            "nats-server",
            [
                "-a",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-js",
                "-sd",
                &dir.0.display().to_string(),
            ]
            .map(String::from)
            .to_vec(),
        );
        brokers::wait_port(port, Duration::from_secs(20)).await;
        let server = NatsServer {
            process,
            port,
            _dir: dir,
        };
        (Nats { url: server.url() }, server)
    }

    fn source(&self) -> NatsJetStream {
        NatsJetStream::new(&self.url)
            .expect("source")
            .ack_wait(Duration::from_secs(2))
            .fetch_wait(Duration::from_millis(200))
    }

    async fn publish(&self, topic: &str, messages: &[TestMessage]) {
        let js = self.js().await;
        self.stream(&js, topic).await;
        for chunk in messages.chunks(200) {
            let mut acks = Vec::with_capacity(chunk.len());
            for m in chunk {
                let mut headers = HeaderMap::new();
                headers.insert("Nats-Msg-Id", m.id.as_str());
                for (k, v) in &m.headers {
                    headers.insert(k.as_str(), v.as_str());
                }
                acks.push(
                    js.publish_with_headers(topic.to_owned(), headers, m.payload.clone().into())
                        .await
                        .expect("publish"),
                );
            }
            for a in acks {
                a.await.expect("publish ack");
            }
        }
    }

    async fn dead_letters(&self, destination: &str) -> Vec<SeenDeadLetter> {
        let js = self.js().await;
        // None yet: the source creates it when it subscribes.
        let Ok(name) = js.stream_by_subject(destination).await else {
            return Vec::new();
        };
        let mut stream = js.get_stream(&name).await.expect("get stream");
        let info = stream.info().await.expect("stream info").state.clone();
        let mut out = Vec::new();
        for seq in info.first_sequence..=info.last_sequence {
            if info.messages == 0 {
                break;
            }
            let Ok(m) = stream.get_raw_message(seq).await else {
                continue;
            };
            let h = |k: &str| {
                m.headers
                    .get(k)
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default()
            };
            out.push(SeenDeadLetter {
                payload: m.payload.to_vec(),
                reason: h(dlh::REASON),
                attempts: h(dlh::ATTEMPTS),
                handler: h(dlh::HANDLER),
                original_id: h(dlh::ORIGINAL_ID),
            });
        }
        out
    }

    async fn settled(&self, topic: &str, group: &str) -> Result<(), String> {
        let js = self.js().await;
        let name = js
            .stream_by_subject(topic)
            .await
            .map_err(|e| format!("no stream for {topic}: {e}"))?;
        let stream = js.get_stream(&name).await.map_err(|e| e.to_string())?;
        let info = stream
            .consumer_info(group)
            .await
            .map_err(|e| format!("consumer {group}: {e}"))?;
        if info.num_ack_pending != 0 || info.num_pending != 0 {
            return Err(format!(
                "{} unacked, {} not yet delivered",
                info.num_ack_pending, info.num_pending
            ));
        }
        Ok(())
    }

    async fn cleanup(&self, topic: &str) {
        let js = self.js().await;
        for s in [topic.to_owned(), format!("{topic}.dlq")] {
            let _ = js.delete_stream(stream_name(&s)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_messages_with_300_redeliveries_auto() {
    brokers::thousand_with_redeliveries::<Nats>("bk-auto").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_messages_with_300_redeliveries_manual() {
    brokers::thousand_with_redeliveries::<Nats>("bk-manual").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_messages_with_300_redeliveries_manual_immediate() {
    brokers::thousand_with_redeliveries::<Nats>("bk-immediate").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_messages_with_300_redeliveries_batch() {
    brokers::thousand_with_redeliveries::<Nats>("bk-batch").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_after_commit_before_ack_is_redelivered_and_acked_as_duplicate() {
    brokers::crash_before_ack::<Nats>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_consumers_in_one_group_split_the_work() {
    brokers::two_consumers_share_a_group::<Nats>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_messages_go_to_the_dead_letter_subject() {
    brokers::poison_goes_to_dead_letters::<Nats>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconnects_after_the_server_restarts() {
    brokers::reconnect_after_restart::<Nats>().await;
}

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
