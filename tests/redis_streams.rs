//! Redis Streams end to end against a real redis-server: the shared scenarios
//! of `common/brokers.rs`, plus what only Redis has (an entry without a
//! payload field). The shared server is `REDIS_URL` (default
//! `redis://127.0.0.1:6379`); the restart test runs its own redis-server.

#[path = "common/brokers.rs"]
mod brokers;
mod common;

use std::collections::HashSet;
use std::time::Duration;

use brokers::{Broker, PrivateServer, Probe, Process, SeenDeadLetter, TempDir, TestMessage};
use idem::source::dead_letter_headers as dlh;
use idem::source::redis_streams::{DEFAULT_URL, RedisStreams, URL_ENV};
use redis::AsyncCommands;
use redis::streams::{StreamPendingReply, StreamRangeReply};

struct Redis {
    url: String,
}

impl Redis {
    async fn conn(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(self.url.as_str()).expect("redis url");
        let mut last = None;
        // A restarted server may need a moment before it accepts commands.
        for _ in 0..100 {
            match client.get_multiplexed_async_connection().await {
                Ok(c) => return c,
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "Redis at {} does not answer ({last:?}): start it with ./scripts/services.sh or set {URL_ENV}",
            self.url
        );
    }
}

fn text(v: &redis::Value) -> String {
    match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        other => format!("{other:?}"),
    }
}

fn bytes(v: &redis::Value) -> Vec<u8> {
    match v {
        redis::Value::BulkString(b) => b.clone(),
        _ => Vec::new(),
    }
}

struct RedisServer {
    process: Process,
    port: u16,
    _dir: TempDir,
}

impl PrivateServer for RedisServer {
    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
    fn kill(&mut self) {
        self.process.kill();
    }
    async fn restart(&mut self) {
        self.process.start();
        brokers::wait_port(self.port, Duration::from_secs(20)).await;
    }
}

impl Broker for Redis {
    type Source = RedisStreams;
    type Server = RedisServer;
    const NAME: &'static str = "redis streams";
    const KEEPS_PRODUCER_ID: bool = false;

    async fn shared() -> Self {
        let url = std::env::var(URL_ENV).unwrap_or_else(|_| DEFAULT_URL.into());
        let me = Redis { url };
        let client = redis::Client::open(me.url.as_str()).expect("redis url");
        if let Err(e) = client.get_multiplexed_async_connection().await {
            panic!(
                "Redis at {} does not answer ({e}): start it with ./scripts/services.sh or set {URL_ENV}",
                me.url
            );
        }
        me
    }

    async fn private() -> (Self, RedisServer) {
        let port = brokers::free_port();
        let dir = TempDir::new("idem-redis");
        // Append-only file, fsync on every write: a SIGKILL loses nothing
        // the server acknowledged, as on a production Redis with AOF.
        let process = Process::spawn(
            "redis-server",
            [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                &dir.0.display().to_string(),
            ]
            .map(String::from)
            .to_vec(),
        );
        brokers::wait_port(port, Duration::from_secs(20)).await;
        let server = RedisServer {
            process,
            port,
            _dir: dir,
        };
        (Redis { url: server.url() }, server)
    }

    fn source(&self) -> RedisStreams {
        RedisStreams::new(&self.url)
            .expect("source")
            .claim_idle(Duration::from_millis(800))
            .block(Duration::from_millis(200))
    }

    async fn publish(&self, topic: &str, messages: &[TestMessage]) {
        let mut conn = self.conn().await;
        for chunk in messages.chunks(200) {
            let mut pipe = redis::pipe();
            for m in chunk {
                let cmd = pipe
                    .cmd("XADD")
                    .arg(topic)
                    .arg("*")
                    .arg("payload")
                    .arg(&m.payload);
                for (k, v) in &m.headers {
                    cmd.arg(k).arg(v);
                }
            }
            let _: () = pipe.query_async(&mut conn).await.expect("XADD");
        }
    }

    async fn dead_letters(&self, destination: &str) -> Vec<SeenDeadLetter> {
        let mut conn = self.conn().await;
        let reply: StreamRangeReply = conn.xrange_all(destination).await.expect("XRANGE");
        reply
            .ids
            .iter()
            .map(|e| {
                let f = |k: &str| e.map.get(k).map(text).unwrap_or_default();
                SeenDeadLetter {
                    payload: e.map.get("payload").map(bytes).unwrap_or_default(),
                    reason: f(dlh::REASON),
                    attempts: f(dlh::ATTEMPTS),
                    handler: f(dlh::HANDLER),
                    original_id: f(dlh::ORIGINAL_ID),
                }
            })
            .collect()
    }

    async fn settled(&self, topic: &str, group: &str) -> Result<(), String> {
        let mut conn = self.conn().await;
        let pending: StreamPendingReply = conn.xpending(topic, group).await.expect("XPENDING");
        if pending.count() != 0 {
            return Err(format!("{} entries pending", pending.count()));
        }
        // Every entry was read by the group: its last delivered id is the
        // stream's last id.
        let info: redis::Value = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(topic)
            .query_async(&mut conn)
            .await
            .expect("XINFO GROUPS");
        let last: Vec<redis::Value> = conn
            .xrevrange_count(topic, "+", "-", 1)
            .await
            .expect("XREVRANGE");
        let last_id = match last.first() {
            Some(redis::Value::Array(e)) => text(&e[0]),
            _ => String::new(),
        };
        let groups = match info {
            redis::Value::Array(g) => g,
            other => panic!("XINFO GROUPS: {other:?}"),
        };
        let ours = groups
            .iter()
            .find_map(|g| {
                let redis::Value::Array(kv) = g else {
                    return None;
                };
                let get = |k: &str| kv.chunks(2).find(|c| text(&c[0]) == k).map(|c| text(&c[1]));
                (get("name")? == group).then(|| get("last-delivered-id").unwrap_or_default())
            })
            .ok_or_else(|| format!("group {group} not found on {topic}"))?;
        if ours != last_id {
            return Err(format!(
                "the group read up to {ours}, the stream ends at {last_id}"
            ));
        }
        Ok(())
    }

    async fn cleanup(&self, topic: &str) {
        let mut conn = self.conn().await;
        let _: () = conn
            .del(&[topic.to_owned(), format!("{topic}.dlq")])
            .await
            .expect("DEL");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_messages_with_300_redeliveries_auto() {
    brokers::thousand_with_redeliveries::<Redis>("bk-auto").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_messages_with_300_redeliveries_manual() {
    brokers::thousand_with_redeliveries::<Redis>("bk-manual").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_messages_with_300_redeliveries_manual_immediate() {
    brokers::thousand_with_redeliveries::<Redis>("bk-immediate").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousand_messages_with_300_redeliveries_batch() {
    brokers::thousand_with_redeliveries::<Redis>("bk-batch").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_after_commit_before_ack_is_redelivered_and_acked_as_duplicate() {
    brokers::crash_before_ack::<Redis>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_consumers_in_one_group_split_the_work() {
    brokers::two_consumers_share_a_group::<Redis>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_messages_go_to_the_dead_letter_stream() {
    brokers::poison_goes_to_dead_letters::<Redis>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconnects_after_the_server_restarts() {
    brokers::reconnect_after_restart::<Redis>().await;
}

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
