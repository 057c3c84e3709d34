//! Crash torture: three real OS processes of the idem service in
//! `service.rs` (this test binary, re-run with `TORTURE_ROLE=service`) consume one Redis Streams group while a
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
//! `TORTURE_STORES=postgres` (or `redis`) runs one store only.

#[path = "../common/pg.rs"]
mod pg;
#[path = "../common/redis.rs"]
mod redis_server;
mod service;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::{Duration, Instant};

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

/// One run: its names, servers and processes.
struct Harness {
    store: StoreKind,
    run: String,
    schema: String,
    db_url: String,
    redis_url: String,
    pool: PgPool,
    redis: redis::aio::MultiplexedConnection,
    children: Vec<Option<Child>>,
    logs: std::path::PathBuf,
    kills: usize,
}

impl Harness {
    async fn new(store: StoreKind, db_url: &str, redis_url: &str) -> Harness {
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
        let redis = redis::Client::open(redis_url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| {
                panic!("Redis at {redis_url} is not reachable ({e}): start it (./scripts/services.sh) or set REDIS_URL")
            });
        let logs = std::env::temp_dir().join(format!("idem-torture-{run}logs"));
        std::fs::create_dir_all(&logs).unwrap();
        Harness {
            store,
            run,
            schema,
            db_url: db_url.to_owned(),
            redis_url: redis_url.to_owned(),
            pool,
            redis,
            children: (0..PROCESSES).map(|_| None).collect(),
            logs,
            kills: 0,
        }
    }

    fn stream(&self) -> String {
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
            .env("TORTURE_CLAIM_IDLE_MS", "400")
            .env("DATABASE_URL", &self.db_url)
            .env("REDIS_URL", &self.redis_url)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start idem-torture-service");
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

    async fn xadd(&mut self, payload: &str) {
        let stream = self.stream();
        let _: String = self
            .redis
            .xadd(&stream, "*", &[("payload", payload)])
            .await
            .expect("XADD");
    }

    /// (pending entries, entries not yet delivered to the group).
    async fn backlog(&mut self) -> (u64, u64) {
        let summary: redis::Value = redis::cmd("XPENDING")
            .arg(self.stream())
            .arg(self.group())
            .query_async(&mut self.redis)
            .await
            .unwrap_or(redis::Value::Nil);
        let pending = match summary {
            redis::Value::Array(v) if !v.is_empty() => {
                redis::from_redis_value::<u64>(v[0].clone()).unwrap_or(0)
            }
            _ => 0,
        };
        let groups: Vec<BTreeMap<String, redis::Value>> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(self.stream())
            .query_async(&mut self.redis)
            .await
            .unwrap_or_default();
        let group = self.group();
        let lag = groups
            .iter()
            .find(|g| {
                g.get("name")
                    .and_then(|n| redis::from_redis_value::<String>(n.clone()).ok())
                    .is_some_and(|n| n == group)
            })
            .and_then(|g| g.get("lag"))
            .and_then(|l| redis::from_redis_value::<u64>(l.clone()).ok())
            .unwrap_or(u64::MAX);
        (pending, lag)
    }

    /// Waits until the group has consumed and settled everything.
    async fn wait_settled(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut quiet = 0;
        while quiet < 3 {
            let (pending, lag) = self.backlog().await;
            quiet = if pending == 0 && lag == 0 {
                quiet + 1
            } else {
                0
            };
            assert!(
                Instant::now() < deadline,
                "not settled after {timeout:?}: {pending} pending, lag {lag} (logs in {})",
                self.logs.display()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
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

    /// The dead-letter stream's original keys / payloads.
    async fn dead_letters(&mut self) -> Vec<String> {
        let entries: redis::streams::StreamRangeReply = self
            .redis
            .xrange_all(format!("{}.dlq", self.stream()))
            .await
            .unwrap();
        entries
            .ids
            .iter()
            .map(|e| e.get::<String>("payload").unwrap_or_default())
            .collect()
    }

    /// Counters the processes reported (killed ones: their last report).
    async fn reported(&mut self) -> [u64; 5] {
        let all: BTreeMap<String, String> = self
            .redis
            .hgetall(format!("{}stats", self.run))
            .await
            .unwrap();
        let mut sum = [0u64; 5];
        for line in all.values() {
            for (s, v) in sum.iter_mut().zip(line.split(' ')) {
                *s += v.parse::<u64>().unwrap_or(0);
            }
        }
        sum
    }

    async fn stream_len(&mut self) -> u64 {
        self.redis.xlen(self.stream()).await.unwrap()
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

/// The torture proper: publish while killing, then settle and count.
async fn torture(h: &mut Harness, messages: usize, kills: usize) -> Verdict {
    for i in 0..PROCESSES {
        h.spawn(i);
    }
    let mut rng = fastrand::Rng::with_seed(messages as u64 ^ kills as u64);
    // Kills are spread over the publishing: one kill every `messages / kills`
    // publishes on average, at a random process.
    let kill_every = (messages / kills.max(1)).max(1);
    let mut next_kill = rng.usize(1..=2 * kill_every);
    let mut retries = 0;
    for i in 0..messages {
        h.xadd(&format!(r#"{{"key":"k{i}"}}"#)).await;
        if rng.u8(..) < 26 {
            // Producer retry: same business key, a new entry (new id).
            let k = rng.usize(0..=i);
            h.xadd(&format!(r#"{{"key":"k{k}"}}"#)).await;
            retries += 1;
        }
        if i % 250 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if i + 1 == next_kill && h.kills < kills {
            h.kill_and_restart(rng.usize(0..PROCESSES)).await;
            next_kill += rng.usize(1..=2 * kill_every);
        }
    }
    for p in 0..POISON_REFUSED {
        h.xadd(&format!(r#"{{"key":"poison{p}","poison":true}}"#))
            .await;
    }
    for p in 0..POISON_GARBLED {
        h.xadd(&format!(r#"{{"key":"garbled{p}""#)).await;
    }
    // A replay of a slice of the stream (an operator re-publishing).
    for i in (0..messages).step_by(20) {
        h.xadd(&format!(r#"{{"key":"k{i}"}}"#)).await;
    }
    // Whatever kills are left happen while the backlog drains.
    while h.kills < kills {
        tokio::time::sleep(Duration::from_millis(rng.u64(20..200))).await;
        h.kill_and_restart(rng.usize(0..PROCESSES)).await;
    }
    h.wait_settled(Duration::from_secs(180)).await;
    h.stop_all().await;

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
    let entries = h.stream_len().await;
    let [received, processed, duplicate, failed, dead] = h.reported().await;
    println!(
        "torture ({:?} store): messages {messages} (+{retries} producer retries, +{} replays, +{} poison), \
         stream entries {entries}, kills {}, deliveries ≥ {received} (redeliveries ≥ {}), handler commits ≥ {processed}, \
         duplicates skipped ≥ {duplicate}, failures ≥ {failed}, dead-lettered {dead}, effects {}, lost = {}, doubled = {}",
        h.store,
        messages.div_ceil(20),
        POISON_REFUSED + POISON_GARBLED,
        h.kills,
        received.saturating_sub(entries),
        effects.len(),
        lost.len(),
        doubled.len(),
    );
    // The planted poison, and only that, is in the dead letters (a poison
    // entry may be dead-lettered twice if two consumers gave up on it in the
    // same instant; each is still one of ours).
    let planted: BTreeSet<String> = (0..POISON_REFUSED)
        .map(|p| format!(r#"{{"key":"poison{p}","poison":true}}"#))
        .chain((0..POISON_GARBLED).map(|p| format!(r#"{{"key":"garbled{p}""#)))
        .collect();
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

async fn postgres_store_loses_nothing_and_doubles_nothing(messages: usize, kills: usize) {
    let mut h = Harness::new(StoreKind::Postgres, &pg::url(), &redis_url()).await;
    let v = torture(&mut h, messages, kills).await;
    assert_eq!(v.kills, kills);
    assert!(v.lost.is_empty(), "lost effects: {:?}", v.lost);
    assert!(v.doubled.is_empty(), "doubled effects: {:?}", v.doubled);
    assert!(v.unexpected.is_empty(), "{:?}", v.unexpected);
    assert!(v.dead_letters >= POISON_REFUSED + POISON_GARBLED);
    assert_eq!(v.keys, messages);
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
    let mut h = Harness::new(StoreKind::Redis, &pg::url(), &redis_url()).await;
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
    let mut broker =
        redis_server::RedisServer::start(&["--appendonly", "yes", "--appendfsync", "always"]).await;
    let mut h = Harness::new(StoreKind::Postgres, &db.url(), &broker.url()).await;
    for i in 0..PROCESSES {
        h.spawn(i);
    }
    // The producer publishes at a steady pace all through the outages, and
    // retries while the broker is down (as a real producer would; a retry
    // whose first try did land is a producer duplicate, deduplicated).
    let stream = h.stream();
    let producer_conn = redis::Client::open(broker.url())
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap();
    let producer = tokio::spawn(async move {
        let mut conn = producer_conn;
        for i in 0..messages {
            let payload = format!(r#"{{"key":"k{i}"}}"#);
            while conn
                .xadd::<_, _, _, _, String>(&stream, "*", &[("payload", payload.as_str())])
                .await
                .is_err()
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::time::sleep(Duration::from_millis(4)).await;
        }
    });
    let effects = |h: &Harness| {
        let pool = h.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM effects")
                .fetch_one(&pool)
                .await
                .unwrap_or(-1)
        }
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let at_first = effects(&h).await;
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
    let at_second = effects(&h).await;
    let started = Instant::now();
    broker.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.restart().await;
    println!(
        "outages: Redis (broker) down and back after {:.1?}",
        started.elapsed()
    );
    producer.await.unwrap();
    // The harness's own connection went down with the server.
    h.redis = redis::Client::open(broker.url())
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
    let stores =
        std::env::var("TORTURE_STORES").unwrap_or_else(|_| "postgres,redis,outages".into());
    for store in stores.split(',') {
        println!("test torture::{store} ({messages} messages, {kills} SIGKILLs, or outages) ...");
        match store.trim() {
            "postgres" => rt.block_on(postgres_store_loses_nothing_and_doubles_nothing(
                messages, kills,
            )),
            "redis" => rt.block_on(
                redis_store_loses_nothing_and_doubles_only_in_the_lease_window(messages, kills),
            ),
            "outages" => rt.block_on(outages_are_ridden_out(messages.min(2_000))),
            other => {
                panic!("TORTURE_STORES: unknown scenario {other:?} (postgres, redis, outages)")
            }
        }
        println!("test torture::{store} ... ok");
    }
}
