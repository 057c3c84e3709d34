//! Crash torture: three real OS processes of the idem service in
//! `service.rs` (this test binary, re-run with `TORTURE_ROLE=service`)
//! consume one group (Redis Streams, NATS JetStream or RabbitMQ) while a
//! producer publishes unique business keys, producer retries (same key, new
//! message id), replays and poison messages, and the harness kills a random
//! process with SIGKILL at random moments and restarts it. At the end every
//! key's effect row must exist exactly once in PostgreSQL, nothing may be
//! pending, and the dead letters must be exactly the planted poison.
//!
//! CI size by default; the full run (see docs/RELIABILITY.md):
//!
//! ```text
//! TORTURE_MESSAGES=10000 TORTURE_KILLS=100 cargo test --release --all-features --test torture
//! ```
//!
//! `TORTURE_SCENARIOS=postgres,nats` runs some of the scenarios: `postgres`
//! (Redis Streams + PostgreSQL store), `redis` (Redis Streams + Redis store),
//! `nats` and `rabbitmq` (that broker + PostgreSQL store), `outages`.

#[path = "../common/brokers.rs"]
mod brokers;
#[path = "../common/mod.rs"]
mod common;
#[path = "../common/fixtures/nats.rs"]
mod nats_fixture;
#[path = "../common/pg.rs"]
mod pg;
#[path = "../common/fixtures/rabbitmq.rs"]
mod rabbitmq_fixture;
#[path = "../common/redis.rs"]
mod redis_server;
#[path = "../common/fixtures/redis_streams.rs"]
mod redis_streams_fixture;
mod service;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::{Duration, Instant};

use brokers::{Broker, TestMessage};
use idem::store::postgres::PostgresStore;
use redis::AsyncCommands;
use sqlx::PgPool;
use tokio::process::{Child, Command};

const PROCESSES: usize = 3;
/// Business keys whose handler refuses them (retried, then dead-lettered).
const POISON_REFUSED: usize = 5;
/// Entries that are not JSON at all (dead-lettered at once).
const POISON_GARBLED: usize = 5;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoreKind {
    Postgres,
    Redis,
}

/// A broker fixture the services can be pointed at.
trait TortureBroker: Broker {
    /// `TORTURE_BROKER` of the service.
    const SERVICE: &'static str;
    fn url(&self) -> String;
}

impl TortureBroker for redis_streams_fixture::Redis {
    const SERVICE: &'static str = "redis-streams";
    fn url(&self) -> String {
        self.url.clone()
    }
}

impl TortureBroker for nats_fixture::Nats {
    const SERVICE: &'static str = "nats";
    fn url(&self) -> String {
        self.url.clone()
    }
}

impl TortureBroker for rabbitmq_fixture::Rabbit {
    const SERVICE: &'static str = "rabbitmq";
    fn url(&self) -> String {
        self.url.clone()
    }
}

/// One run: its names, servers and processes.
struct Harness<B: TortureBroker> {
    broker: B,
    store: StoreKind,
    run: String,
    schema: String,
    db_url: String,
    stats_url: String,
    pool: PgPool,
    stats: redis::aio::MultiplexedConnection,
    children: Vec<Option<Child>>,
    logs: std::path::PathBuf,
    kills: usize,
    published: usize,
}

impl<B: TortureBroker> Harness<B> {
    async fn new(store: StoreKind, broker: B, db_url: &str, stats_url: &str) -> Harness<B> {
        let run = format!("t{:08x}-", fastrand::u32(..));
        let schema = format!("idem_torture_{}", run.trim_end_matches('-'));
        let admin = pg::connect(db_url, None, 1).await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&admin)
            .await
            .expect("create schema");
        let pool = pg::connect(db_url, Some(&schema), 4).await;
        PostgresStore::new(pool.clone())
            .with_schema(&schema)
            .unwrap()
            .migrate()
            .await
            .expect("migrate");
        // No unique constraint: a doubled effect must show as two rows.
        sqlx::query("CREATE TABLE effects (key text NOT NULL, pid int NOT NULL)")
            .execute(&pool)
            .await
            .unwrap();
        let stats = redis::Client::open(stats_url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| {
                panic!("Redis at {stats_url} is not reachable ({e}): start it (./scripts/services.sh) or set REDIS_URL")
            });
        let logs = std::env::temp_dir().join(format!("idem-torture-{run}logs"));
        std::fs::create_dir_all(&logs).unwrap();
        Harness {
            broker,
            store,
            run,
            schema,
            db_url: db_url.to_owned(),
            stats_url: stats_url.to_owned(),
            pool,
            stats,
            children: (0..PROCESSES).map(|_| None).collect(),
            logs,
            kills: 0,
            published: 0,
        }
    }

    fn topic(&self) -> String {
        format!("{}torture", self.run)
    }

    fn group(&self) -> String {
        let handler = match self.store {
            StoreKind::Postgres => "torture-pg",
            StoreKind::Redis => "torture-redis",
        };
        format!("{}{handler}", self.run)
    }

    fn spawn(&mut self, i: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("c{i}.log")))
            .unwrap();
        let child = Command::new(std::env::current_exe().expect("own path"))
            .env("TORTURE_ROLE", "service")
            .env("TORTURE_BROKER", B::SERVICE)
            .env("TORTURE_BROKER_URL", self.broker.url())
            .env("TORTURE_RUN", &self.run)
            .env(
                "TORTURE_STORE",
                match self.store {
                    StoreKind::Postgres => "postgres",
                    StoreKind::Redis => "redis",
                },
            )
            .env("TORTURE_SCHEMA", &self.schema)
            .env("TORTURE_CONSUMER", format!("c{i}"))
            .env("TORTURE_RECLAIM_MS", "500")
            .env("DATABASE_URL", &self.db_url)
            .env("REDIS_URL", &self.stats_url)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start the torture service (this binary)");
        self.children[i] = Some(child);
    }

    /// SIGKILL process `i` and start it again under the same consumer name.
    async fn kill_and_restart(&mut self, i: usize) {
        if let Some(mut child) = self.children[i].take() {
            child.start_kill().expect("SIGKILL");
            child.wait().await.expect("reap");
            self.kills += 1;
        }
        self.spawn(i);
    }

    /// SIGTERM everyone and wait for the graceful shutdowns.
    async fn stop_all(&mut self) {
        for child in self.children.iter_mut().flatten() {
            if let Some(pid) = child.id() {
                // A positive pid only: `kill -<n>` would mean a process group.
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
        }
        for child in self.children.iter_mut() {
            if let Some(mut c) = child.take() {
                match tokio::time::timeout(Duration::from_secs(30), c.wait()).await {
                    Ok(status) => assert!(
                        status.unwrap().success(),
                        "a service did not shut down cleanly (logs in {})",
                        self.logs.display()
                    ),
                    Err(_) => panic!("a service ignored SIGTERM for 30 s"),
                }
            }
        }
    }

    /// Publishes payloads, each as a new message (its own message id).
    async fn publish(&mut self, payloads: &[String]) {
        let messages: Vec<TestMessage> = payloads
            .iter()
            .map(|p| {
                self.published += 1;
                TestMessage {
                    id: format!("{}m{}", self.run, self.published),
                    payload: p.clone().into_bytes(),
                    headers: Vec::new(),
                }
            })
            .collect();
        let topic = self.topic();
        self.broker.publish(&topic, &messages).await;
    }

    async fn effect_rows(&self) -> i64 {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM effects")
            .fetch_one(&self.pool)
            .await
            .unwrap_or(-1)
    }

    /// Waits until the broker has nothing pending for the group and the
    /// effects stopped changing (three quiet polls in a row).
    async fn wait_settled(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let (mut quiet, mut last) = (0, -1);
        while quiet < 3 {
            let settled = self.broker.settled(&self.topic(), &self.group()).await;
            let rows = self.effect_rows().await;
            quiet = if settled.is_ok() && rows == last {
                quiet + 1
            } else {
                0
            };
            last = rows;
            assert!(
                Instant::now() < deadline,
                "not settled after {timeout:?}: {settled:?}, {rows} effect rows (logs in {})",
                self.logs.display()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn effects(&self) -> BTreeMap<String, i64> {
        sqlx::query_as::<_, (String, i64)>("SELECT key, COUNT(*) FROM effects GROUP BY key")
            .fetch_all(&self.pool)
            .await
            .unwrap()
            .into_iter()
            .collect()
    }

    /// The payloads in the dead letters.
    async fn dead_letters(&self) -> Vec<String> {
        self.broker
            .dead_letters(&format!("{}.dlq", self.topic()))
            .await
            .into_iter()
            .map(|l| String::from_utf8_lossy(&l.payload).into_owned())
            .collect()
    }

    /// Counters the processes reported (killed ones: their last report).
    async fn reported(&mut self) -> [u64; 5] {
        let all: BTreeMap<String, String> = self
            .stats
            .hgetall(format!("{}stats", self.run))
            .await
            .unwrap_or_default();
        let mut sum = [0u64; 5];
        for line in all.values() {
            for (s, v) in sum.iter_mut().zip(line.split(' ')) {
                *s += v.parse::<u64>().unwrap_or(0);
            }
        }
        sum
    }
}

/// What a run found.
#[derive(Debug)]
struct Verdict {
    keys: usize,
    lost: Vec<String>,
    doubled: Vec<(String, i64)>,
    unexpected: Vec<String>,
    dead_letters: usize,
    kills: usize,
}

/// Order `k<i>` as a producer serialises it on its `send`-th try. A retry
/// (`send` > 0) is the same event serialised again, the way real producers
/// resend: keys in another order, other spacing, a fresh `sent_at`. It must
/// be acked as a duplicate, never dead-lettered as a key conflict.
fn event(i: usize, send: u32) -> String {
    let amount = 100 + (i * 37) % 9_900;
    let sent_at = format!(
        "2026-11-26T10:{:02}:{:02}.{:03}Z",
        (i / 60) % 60,
        i % 60,
        send
    );
    match send % 3 {
        0 => format!(
            r#"{{"key":"k{i}","amount_cents":{amount},"currency":"EUR","sent_at":"{sent_at}"}}"#
        ),
        1 => format!(
            r#"{{ "sent_at": "{sent_at}", "currency": "EUR", "amount_cents": {amount}, "key": "k{i}" }}"#
        ),
        _ => format!(
            "{{\n  \"amount_cents\": {amount},\n  \"key\": \"k{i}\",\n  \"sent_at\": \"{sent_at}\",\n  \"currency\": \"EUR\"\n}}"
        ),
    }
}

/// The torture proper: publish while killing, then settle and count.
async fn torture<B: TortureBroker>(h: &mut Harness<B>, messages: usize, kills: usize) -> Verdict {
    for i in 0..PROCESSES {
        h.spawn(i);
    }
    let mut rng = fastrand::Rng::with_seed(messages as u64 ^ kills as u64);
    // Kills are spread over the publishing: one kill every `messages / kills`
    // publishes on average, at a random process.
    let kill_every = (messages / kills.max(1)).max(1);
    let mut next_kill = rng.usize(1..=2 * kill_every);
    let mut retries = 0;
    let mut chunk = Vec::new();
    for i in 0..messages {
        chunk.push(event(i, 0));
        if rng.u8(..) < 26 {
            // Producer retry: same business key, a new message, serialised
            // again (other key order, spacing, a fresh `sent_at`).
            chunk.push(event(rng.usize(0..=i), rng.u32(1..4)));
            retries += 1;
        }
        if chunk.len() >= 25 || i + 1 == messages {
            h.publish(&chunk).await;
            chunk.clear();
        }
        if i + 1 == next_kill && h.kills < kills {
            h.kill_and_restart(rng.usize(0..PROCESSES)).await;
            next_kill += rng.usize(1..=2 * kill_every);
        }
    }
    let mut poison: Vec<String> = (0..POISON_REFUSED)
        .map(|p| format!(r#"{{"key":"poison{p}","poison":true}}"#))
        .collect();
    poison.extend((0..POISON_GARBLED).map(|p| format!(r#"{{"key":"garbled{p}""#)));
    h.publish(&poison).await;
    // A replay of a slice of the stream (an operator re-publishing).
    let replay: Vec<String> = (0..messages).step_by(20).map(|i| event(i, 0)).collect();
    h.publish(&replay).await;
    // Whatever kills are left happen while the backlog drains.
    while h.kills < kills {
        tokio::time::sleep(Duration::from_millis(rng.u64(20..200))).await;
        h.kill_and_restart(rng.usize(0..PROCESSES)).await;
    }
    h.wait_settled(Duration::from_secs(180)).await;
    h.stop_all().await;
    // With every consumer gone, nothing may be left on the broker.
    if let Err(left) = h.broker.settled(&h.topic(), &h.group()).await {
        panic!("{} left after the run: {left}", B::NAME);
    }

    let effects = h.effects().await;
    let expected: BTreeSet<String> = (0..messages).map(|i| format!("k{i}")).collect();
    let lost: Vec<String> = expected
        .iter()
        .filter(|k| !effects.contains_key(*k))
        .cloned()
        .collect();
    let doubled: Vec<(String, i64)> = effects
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, n)| (k.clone(), *n))
        .collect();
    let unexpected: Vec<String> = effects
        .keys()
        .filter(|k| !expected.contains(*k))
        .cloned()
        .collect();
    let letters = h.dead_letters().await;
    let [received, processed, duplicate, failed, dead] = h.reported().await;
    println!(
        "torture ({}, {:?} store): messages {messages} (+{retries} producer retries, +{} replays, +{} poison; {} published), \
         kills {}, deliveries ≥ {received}, handler commits ≥ {processed}, duplicates skipped ≥ {duplicate}, \
         failures ≥ {failed}, dead-lettered {dead}, effects {}, lost = {}, doubled = {}",
        B::NAME,
        h.store,
        replay.len(),
        poison.len(),
        h.published,
        h.kills,
        effects.len(),
        lost.len(),
        doubled.len(),
    );
    // The planted poison, and only that, is in the dead letters (a poison
    // message may be dead-lettered twice if two consumers gave up on it in
    // the same instant; each is still one of ours).
    let planted: BTreeSet<String> = poison.into_iter().collect();
    let found: BTreeSet<String> = letters.iter().cloned().collect();
    assert_eq!(
        found, planted,
        "dead letters are exactly the planted poison"
    );
    Verdict {
        keys: expected.len(),
        lost,
        doubled,
        unexpected,
        dead_letters: letters.len(),
        kills: h.kills,
    }
}

/// SIGKILL torture with the PostgreSQL store: the run fails on any lost or
/// doubled effect.
async fn postgres_store_loses_nothing_and_doubles_nothing<B: TortureBroker>(
    messages: usize,
    kills: usize,
) {
    let mut h = Harness::new(
        StoreKind::Postgres,
        B::shared().await,
        &pg::url(),
        &redis_url(),
    )
    .await;
    let v = torture(&mut h, messages, kills).await;
    assert_eq!(v.kills, kills);
    assert!(v.lost.is_empty(), "lost effects: {:?}", v.lost);
    assert!(v.doubled.is_empty(), "doubled effects: {:?}", v.doubled);
    assert!(v.unexpected.is_empty(), "{:?}", v.unexpected);
    assert!(v.dead_letters >= POISON_REFUSED + POISON_GARBLED);
    assert_eq!(v.keys, messages);
    h.broker.cleanup(&h.topic()).await;
}

/// The Redis store holds a lease, not a transaction with the effect: a kill
/// after the effect row and before the done-record lets the lease expire and
/// the message run again. This run shows how often that happens; it fails on
/// a lost message, or on more doubles than the kills can explain (each kill
/// can double at most the handlers it interrupted: concurrency 8).
async fn redis_store_loses_nothing_and_doubles_only_in_the_lease_window(
    messages: usize,
    kills: usize,
) {
    let broker = redis_streams_fixture::Redis::shared().await;
    let mut h = Harness::new(StoreKind::Redis, broker, &pg::url(), &redis_url()).await;
    let v = torture(&mut h, messages, kills).await;
    assert!(v.lost.is_empty(), "lost effects: {:?}", v.lost);
    assert!(v.unexpected.is_empty(), "{:?}", v.unexpected);
    let doubled_rows: i64 = v.doubled.iter().map(|(_, n)| n - 1).sum();
    println!(
        "redis store: {} keys doubled ({} extra rows) over {} kills: the crash window between the effect and the done-record",
        v.doubled.len(),
        doubled_rows,
        v.kills
    );
    assert!(
        doubled_rows <= (v.kills * 8) as i64,
        "more doubles ({doubled_rows}) than {} kills × 8 in-flight handlers can explain: {:?}",
        v.kills,
        v.doubled
    );
    h.broker.cleanup(&h.topic()).await;
}

/// Store and broker outages: PostgreSQL (the store) and Redis (the broker)
/// are private servers of this run; each is killed for a few seconds while
/// the three services work, and started again. The services must ride it
/// out (back off, reconnect, resume) and the final count must be exact.
async fn outages_are_ridden_out(messages: usize) {
    let db = tokio::task::spawn_blocking(pg::PrivateServer::start)
        .await
        .unwrap();
    // The broker must keep what it acknowledged across a crash: AOF, fsync always.
    let mut server =
        redis_server::RedisServer::start(&["--appendonly", "yes", "--appendfsync", "always"]).await;
    let broker = redis_streams_fixture::Redis { url: server.url() };
    let mut h = Harness::new(StoreKind::Postgres, broker, &db.url(), &server.url()).await;
    for i in 0..PROCESSES {
        h.spawn(i);
    }
    // The producer publishes at a steady pace all through the outages, and
    // retries while the broker is down (as a real producer would; a retry
    // whose first try did land is a producer duplicate, deduplicated).
    let stream = h.topic();
    let producer_conn = redis::Client::open(server.url())
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap();
    let producer = tokio::spawn(async move {
        let mut conn = producer_conn;
        for i in 0..messages {
            let mut send = 0;
            // A retry serialises the event again, as real producers do.
            while conn
                .xadd::<_, _, _, _, String>(&stream, "*", &[("payload", event(i, send).as_str())])
                .await
                .is_err()
            {
                send += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(Duration::from_millis(4)).await;
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let at_first = h.effect_rows().await;
    let started = Instant::now();
    tokio::task::block_in_place(|| {
        db.kill();
        std::thread::sleep(Duration::from_secs(3));
        db.up();
    });
    println!(
        "outages: PostgreSQL down and back after {:.1?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let at_second = h.effect_rows().await;
    let started = Instant::now();
    server.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    server.restart().await;
    println!(
        "outages: Redis (broker) down and back after {:.1?}",
        started.elapsed()
    );
    producer.await.unwrap();
    // The harness's own stats connection went down with the server.
    h.stats = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for (i, child) in h.children.iter_mut().enumerate() {
        let alive = child.as_mut().map(|c| matches!(c.try_wait(), Ok(None)));
        assert_eq!(alive, Some(true), "service c{i} died during the outages");
    }
    h.wait_settled(Duration::from_secs(120)).await;
    h.stop_all().await;
    println!(
        "outages: the store went down at {at_first} effects, the broker at {at_second}, of {messages}"
    );
    assert!(
        (at_first as usize) < messages && (at_second as usize) < messages,
        "the outages came after the work was done: they tested nothing"
    );
    let effects = h.effects().await;
    let lost = (0..messages)
        .filter(|i| !effects.contains_key(&format!("k{i}")))
        .count();
    let doubled = effects.values().filter(|n| **n > 1).count();
    println!(
        "outages: messages {messages}, effects {}, lost = {lost}, doubled = {doubled}",
        effects.len()
    );
    assert_eq!((lost, doubled, effects.len()), (0, 0, messages));
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if std::env::var("TORTURE_ROLE").as_deref() == Ok("service") {
        if let Err(e) = rt.block_on(service::main()) {
            eprintln!("torture service failed: {e}");
            std::process::exit(1);
        }
        return;
    }
    let messages = env_usize("TORTURE_MESSAGES", 2_000);
    let kills = env_usize("TORTURE_KILLS", 20);
    let scenarios = std::env::var("TORTURE_SCENARIOS")
        .unwrap_or_else(|_| "postgres,redis,nats,rabbitmq,outages".into());
    for scenario in scenarios.split(',').map(str::trim) {
        println!(
            "test torture::{scenario} ({messages} messages, {kills} SIGKILLs or 2 outages) ..."
        );
        match scenario {
            "postgres" => rt.block_on(postgres_store_loses_nothing_and_doubles_nothing::<
                redis_streams_fixture::Redis,
            >(messages, kills)),
            "nats" => rt.block_on(postgres_store_loses_nothing_and_doubles_nothing::<
                nats_fixture::Nats,
            >(messages, kills)),
            "rabbitmq" => rt.block_on(postgres_store_loses_nothing_and_doubles_nothing::<
                rabbitmq_fixture::Rabbit,
            >(messages, kills)),
            "redis" => rt.block_on(
                redis_store_loses_nothing_and_doubles_only_in_the_lease_window(messages, kills),
            ),
            "outages" => rt.block_on(outages_are_ridden_out(messages.min(2_000))),
            other => panic!(
                "TORTURE_SCENARIOS: unknown scenario {other:?} (postgres, redis, nats, rabbitmq, outages)"
            ),
        }
        println!("test torture::{scenario} ... ok");
    }
}
