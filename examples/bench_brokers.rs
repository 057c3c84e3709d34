//! End-to-end throughput of the real brokers, with the SQLite and the
//! PostgreSQL store: messages/s from "the backlog is in the broker" to "every
//! effect committed and acked".
//!
//! ```text
//! cargo run --release --example bench_brokers \
//!   --features redis-streams,nats,rabbitmq,postgres -- [messages] [broker …]
//! ```
//!
//! Per broker and store, on a topic and consumer groups of the stage's own
//! (no group is re-joined, no topic re-created): declare the topic (one
//! subscription; Kafka's producer creates it), publish `messages` orders
//! (default 10,000; not timed), then run one
//! `ack = "auto"` handler with `concurrency(16)` until it has committed them
//! all, and check the effect rows. Per message the handler does what a real
//! one does: decode JSON, claim the key, insert one row, commit, ack.
//! Brokers: `redis`, `nats`, `rabbitmq` (default: all three), and `kafka`
//! when built with `--features kafka`. URLs come from `REDIS_URL`,
//! `NATS_URL`, `AMQP_URL`, `KAFKA_BROKERS` and `DATABASE_URL`.
//!
//! Then the PostgreSQL batch stage: the batch handler, `concurrency(64)`
//! (batches of up to 64). Beside them, per broker, the broker's and the
//! store's own limits, measured in the same run:
//!
//! - `hand single` / `hand batch` (store `none`): a hand loop through idem's
//!   adapter for the broker (`Subscription::fetch` / `ack` / `ack_many`).
//! - `raw batch` (store `none`, CSV `impl = raw`): a hand-written
//!   consume-and-ack loop on the broker's client crate, without idem
//!   (`support/raw_brokers.rs`): `XREADGROUP … COUNT 64` + one `XACK`;
//!   JetStream `fetch` of 64 + `+ACK` each; RabbitMQ `basic.qos(64)`,
//!   `basic.consume`, one `basic.ack(multiple)` per 64; Kafka: an rdkafka
//!   consumer in a fresh group polling the backlog, committing the consumed
//!   offsets asynchronously every 64 messages and synchronously at the end.
//! - `pgbench batch` (store `PostgreSQL`, CSV `impl = pgbench`), right after
//!   the broker's PostgreSQL batch stage: `benches/pgbench/batch.sql` with
//!   64 rows per transaction and 1 client (the batch stage's: one batch at
//!   a time), as `bench_stores` runs it.
//! - `target`: idem batch → PostgreSQL ÷ min(raw loop, pgbench batched), to
//!   hold ≥ 0.5.

#[path = "support/producers.rs"]
mod producers;
#[path = "support/raw_brokers.rs"]
mod raw_brokers;
// Not `mod bench`: `bench` is this file's per-broker stage function.
#[path = "support/bench.rs"]
mod bench_support;

use std::error::Error;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use idem::source::SubscribeSpec;
use idem::source::namespaced::Namespaced;
use idem::source::nats::NatsJetStream;
use idem::source::rabbitmq::RabbitMq;
use idem::source::redis_streams::RedisStreams;
use idem::store::postgres::PostgresStore;
use idem::store::sqlite::SqliteStore;
use idem::{CancellationToken, DedupStore, Runtime, Source, Subscription, Tx, idempotent};
use producers::{Outgoing, Producer};
use raw_brokers::Backlog;
use serde::Deserialize;
use sqlx::{AssertSqlSafe, Executor};

const TOPIC: &str = "idem-bench";
const CONCURRENCY: usize = 16;

#[derive(Debug, Deserialize)]
struct Order {
    order_id: String,
    amount: i64,
}

#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct DbError(#[from] sqlx::Error);

#[idempotent(
    topic = "idem-bench",
    key = "order_id",
    store = "sqlite",
    name = "bench-sqlite"
)]
async fn bench_sqlite(o: Order, tx: &mut Tx<'_>) -> Result<(), DbError> {
    sqlx::query("INSERT INTO bench_effects (order_id, amount) VALUES (?, ?)")
        .bind(&o.order_id)
        .bind(o.amount)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[idempotent(
    topic = "idem-bench",
    key = "order_id",
    store = "postgres",
    name = "bench-postgres"
)]
async fn bench_postgres(o: Order, tx: &mut Tx<'_>) -> Result<(), DbError> {
    sqlx::query("INSERT INTO bench_effects (order_id, amount) VALUES ($1, $2)")
        .bind(&o.order_id)
        .bind(o.amount)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The batch handler: the new messages of a fetched batch (up to
/// [`BATCH`]) in one multi-row insert, one commit with their dedup rows.
#[idempotent(
    topic = "idem-bench",
    key = "order_id",
    store = "postgres",
    name = "bench-postgres-batch"
)]
async fn bench_postgres_batch(orders: Vec<Order>, tx: &mut Tx<'_>) -> Result<(), DbError> {
    BATCH_CALLS.fetch_add(1, Ordering::Relaxed);
    let mut q = sqlx::QueryBuilder::new("INSERT INTO bench_effects (order_id, amount) ");
    q.push_values(&orders, |mut row, o| {
        row.push_bind(&o.order_id).push_bind(o.amount);
    });
    q.build().execute(&mut **tx).await?;
    Ok(())
}

/// Batch size of the batch handler and of the hand-written loop's batches.
const BATCH: usize = 64;

/// Calls of the batch handler: messages ÷ calls is the batch size the
/// source's fetches made (64 at most).
static BATCH_CALLS: AtomicU64 = AtomicU64::new(0);
/// The raw loops' topic (a stage of its own).
const RAW_TOPIC: &str = "idem-bench-raw";
/// pgbench's clients beside the batch stage: the batch handler runs one
/// fetched batch at a time (`bench_stores` runs its batch points so too).
const PGBENCH_CLIENTS: usize = 1;
/// The target: idem batch → PostgreSQL ≥ this × min(raw loop, pgbench batched).
const TARGET: f64 = 0.5;

type BoxResult<T> = std::result::Result<T, Box<dyn Error>>;

fn env(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.into())
}

/// A fresh SQLite file (WAL, synchronous = NORMAL: idem's defaults).
async fn sqlite(path: &std::path::Path) -> BoxResult<SqliteStore> {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let store = SqliteStore::open(&path.display().to_string()).await?;
    store.migrate().await?;
    sqlx::raw_sql("CREATE TABLE bench_effects (order_id TEXT NOT NULL, amount INTEGER NOT NULL)")
        .execute(store.pool())
        .await?;
    Ok(store)
}

/// A PostgreSQL store in a schema of its own, dropped by [`drop_schema`].
async fn postgres(schema: &str) -> BoxResult<PostgresStore> {
    let url = env(
        "DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/postgres",
    );
    let admin = PostgresStore::connect(&url).await?;
    admin
        .pool()
        .execute(sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
        ))))
        .await?;
    let options: sqlx::postgres::PgConnectOptions = url.parse()?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(CONCURRENCY as u32 + 4)
        .connect_with(options.options([("search_path", schema)]))
        .await?;
    let store = PostgresStore::new(pool).with_schema(schema)?;
    store.migrate().await?;
    store
        .pool()
        .execute("CREATE TABLE bench_effects (order_id text NOT NULL, amount bigint NOT NULL)")
        .await?;
    Ok(store)
}

async fn drop_schema(store: &PostgresStore, schema: &str) -> BoxResult<()> {
    store
        .pool()
        .execute(sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP SCHEMA {schema} CASCADE"
        ))))
        .await?;
    Ok(())
}

fn orders(n: usize) -> Vec<Outgoing> {
    (0..n)
        .map(|i| Outgoing {
            id: format!("m-{i}"),
            payload: serde_json::json!({ "order_id": format!("order-{i:07}"), "amount": i })
                .to_string()
                .into_bytes(),
        })
        .collect()
}

/// The broker's own limit as a consumer sees it: a hand-written
/// consume-and-ack loop, no store, over the same backlog: fetch up to
/// `batch`, decode each payload as the handler would, then ack: one call for
/// the batch (`batch` mode) or one ack per message, all at once (`single`
/// mode: what `ack = "auto"` with `concurrency(16)` sends).
/// It goes through idem's adapter for the broker ([`Subscription`]), the
/// same client calls idem's consumer makes, without dedup or a handler.
async fn hand_loop<S: Source, P: Producer>(
    source: S,
    producer: &P,
    n: usize,
    batch: usize,
    one_by_one: bool,
) -> BoxResult<Duration> {
    let topic = format!("{}{TOPIC}", stage_prefix());
    producer.reset(&topic).await?;
    let sub = source
        .subscribe(SubscribeSpec {
            topic: &topic,
            group: &format!("{topic}-hand"),
            dead_letter: None,
            prefetch: batch,
        })
        .await?;
    producer.publish(&topic, &orders(n)).await?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    let mut settled = 0;
    while settled < n && Instant::now() < deadline {
        let deliveries = sub.fetch(batch).await?;
        for d in &deliveries {
            let _: Order = serde_json::from_slice(&d.payload)?;
        }
        if one_by_one {
            for r in futures_util::future::join_all(deliveries.iter().map(|d| sub.ack(d))).await {
                r?;
            }
        } else {
            let refs: Vec<&idem::Delivery> = deliveries.iter().collect();
            sub.ack_many(&refs).await?;
        }
        settled += deliveries.len();
    }
    let elapsed = started.elapsed();
    sub.close().await;
    producer.delete(&topic).await?;
    if settled < n {
        return Err(format!("hand loop: {settled} of {n} in {elapsed:?}").into());
    }
    Ok(elapsed)
}

/// A name prefix of its own for each stage: every stage publishes to a new
/// topic read by new consumer groups, so no group is re-joined and no topic
/// is re-created under a name it had (tansu 0.6 hangs in the first case and
/// has crashed in the second).
fn stage_prefix() -> String {
    use std::sync::atomic::AtomicUsize;
    static STAGE: AtomicUsize = AtomicUsize::new(0);
    format!(
        "s{}-{}-",
        std::process::id(),
        STAGE.fetch_add(1, Ordering::Relaxed)
    )
}

/// One timed run through a [`Namespaced`] source (see [`stage_prefix`]);
/// returns the time to the last message processed.
async fn measure<S: Source, P: Producer, D: DedupStore<M>, M>(
    source: S,
    producer: &P,
    store: D,
    handler: &'static str,
    n: usize,
    concurrency: usize,
) -> BoxResult<Duration> {
    let prefix = stage_prefix();
    let topic = format!("{prefix}{TOPIC}");
    let source = Namespaced::new(source, prefix);
    producer.reset(&topic).await?;
    if !producer.creates_topic() {
        // Closed, not dropped: the consumer leaves its group (and RabbitMQ
        // confirms the cancel) before the runtime subscribes again.
        source
            .subscribe(SubscribeSpec {
                topic: TOPIC,
                group: handler,
                dead_letter: None,
                prefetch: concurrency,
            })
            .await?
            .close()
            .await;
    }
    producer.publish(&topic, &orders(n)).await?;
    let runtime = Runtime::builder(source)
        .store(store)
        .handlers([handler])
        .concurrency(concurrency)
        .build()?;
    let stop = CancellationToken::new();
    let started = Instant::now();
    let mut elapsed = Duration::ZERO;
    let done = async {
        let deadline = started + Duration::from_secs(600);
        loop {
            let s = runtime.stats_of(handler).unwrap_or_default();
            if s.processed + s.duplicate >= n as u64 {
                elapsed = started.elapsed();
                break;
            }
            if Instant::now() > deadline {
                elapsed = started.elapsed();
                eprintln!("  gave up after {elapsed:?}: {s:?}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.cancel();
    };
    tokio::join!(runtime.run(stop.clone()), done);
    let s = runtime.stats_of(handler).unwrap_or_default();
    if s.processed != n as u64 {
        return Err(format!("{handler}: {} of {n} processed ({s:?})", s.processed).into());
    }
    producer.delete(&topic).await?;
    Ok(elapsed)
}

/// What the target line compares a broker's raw loop with, msgs/s.
struct Limits {
    /// idem, the batch handler into PostgreSQL.
    idem_batch: f64,
    /// pgbench batched, run right after it (`None`: it did not run).
    pgbench: Option<f64>,
}

async fn bench<S: Source, P: Producer>(
    broker: &str,
    source: impl Fn() -> BoxResult<S>,
    producer: &P,
    n: usize,
) -> BoxResult<Limits> {
    let db = std::env::temp_dir().join(format!("idem-bench-{}.db", std::process::id()));
    let store = sqlite(&db).await?;
    let t = measure(
        source()?,
        producer,
        store.clone(),
        "bench-sqlite",
        n,
        CONCURRENCY,
    )
    .await?;
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(DISTINCT order_id) FROM bench_effects")
        .fetch_one(store.pool())
        .await?;
    report(broker, "SQLite", "single", n, t, rows);
    drop(store);
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }

    let schema = format!("idem_bench_{}", std::process::id());
    let store = postgres(&schema).await?;
    let t = measure(
        source()?,
        producer,
        store.clone(),
        "bench-postgres",
        n,
        CONCURRENCY,
    )
    .await?;
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(DISTINCT order_id) FROM bench_effects")
        .fetch_one(store.pool())
        .await?;
    report(broker, "PostgreSQL", "single", n, t, rows);
    store.pool().execute("TRUNCATE bench_effects").await?;
    let t = measure(
        source()?,
        producer,
        store.clone(),
        "bench-postgres-batch",
        n,
        BATCH,
    )
    .await?;
    let rows: i64 = sqlx::query_scalar("SELECT COUNT(DISTINCT order_id) FROM bench_effects")
        .fetch_one(store.pool())
        .await?;
    report(broker, "PostgreSQL", "batch", n, t, rows);
    let calls = BATCH_CALLS.swap(0, Ordering::Relaxed).max(1);
    println!(
        "{broker:<15} {:<11} {:<13} {calls} handler calls, {:.1} messages per batch on average, {:.2} ms per batch",
        "",
        "",
        n as f64 / calls as f64,
        t.as_secs_f64() * 1e3 / calls as f64
    );
    let idem_batch = n as f64 / t.as_secs_f64();
    let pgbench = pgbench_batched(broker, &store, &schema, n).await?;
    drop_schema(&store, &schema).await?;
    for (mode, batch) in [("single", CONCURRENCY), ("batch", BATCH)] {
        let t = hand_loop(source()?, producer, n, batch, mode == "single").await?;
        report(broker, "none", &format!("hand {mode}"), n, t, n as i64);
    }
    Ok(Limits {
        idem_batch,
        pgbench,
    })
}

/// PostgreSQL's own limit for the batch stage: pgbench batched
/// ([`BATCH`] rows per transaction, [`PGBENCH_CLIENTS`]), in the stage's
/// schema, about `n` messages (at least 600 transactions). A missing or failing pgbench is said, not
/// fatal (`None`).
async fn pgbench_batched(
    broker: &str,
    store: &PostgresStore,
    schema: &str,
    n: usize,
) -> BoxResult<Option<f64>> {
    store
        .pool()
        .execute(sqlx::raw_sql(bench_support::PGBENCH_TABLES))
        .await?;
    let url = env(
        "DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/postgres",
    );
    // At least ~40,000 rows: a run of a fraction of a second measures the
    // machine's mood of that moment (rates doubled between runs).
    let transactions = (n / (PGBENCH_CLIENTS * BATCH)).max(600) as u64;
    let schema = schema.to_owned();
    let result = tokio::task::spawn_blocking(move || {
        bench_support::pgbench(&url, &schema, PGBENCH_CLIENTS, BATCH, transactions)
    })
    .await?;
    match result {
        Ok(rate) => {
            let messages = transactions as usize * PGBENCH_CLIENTS * BATCH;
            print_rate(
                broker,
                "PostgreSQL",
                "pgbench batch",
                messages,
                rate,
                &format!("{PGBENCH_CLIENTS} client, {transactions} transactions of {BATCH} rows"),
            );
            Ok(Some(rate))
        }
        Err(e) => {
            eprintln!("{broker}: {e}");
            Ok(None)
        }
    }
}

/// The raw loop's backlog: `n` orders on [`RAW_TOPIC`], batches of [`BATCH`].
fn backlog<'a, P>(producer: &'a P, messages: &'a [Outgoing]) -> Backlog<'a, P> {
    Backlog {
        producer,
        topic: RAW_TOPIC,
        messages,
        batch: BATCH,
    }
}

/// The raw loop's row, then the target line: idem batch → PostgreSQL ÷
/// min(raw loop, pgbench batched).
fn raw_and_target(broker: &str, n: usize, limits: &Limits, raw: Duration) {
    report(broker, "none", "raw batch", n, raw, n as i64);
    let raw = n as f64 / raw.as_secs_f64();
    let (floor, of) = match limits.pgbench {
        Some(pg) => (raw.min(pg), format!("min(raw {raw:.0}, pgbench {pg:.0})")),
        None => (raw, format!("raw {raw:.0} (no pgbench)")),
    };
    let ratio = limits.idem_batch / floor;
    println!(
        "{broker:<15} {:<11} {:<13} idem batch {:.0} / {of} = {ratio:.2}   target {TARGET} ({})",
        "target",
        "",
        limits.idem_batch,
        if ratio >= TARGET { "met" } else { "NOT met" },
    );
}

fn report(broker: &str, store: &str, mode: &str, n: usize, t: Duration, rows: i64) {
    let ok = if rows == n as i64 { "ok" } else { "WRONG" };
    print_rate(
        broker,
        store,
        mode,
        n,
        n as f64 / t.as_secs_f64(),
        &format!("effects {rows} ({ok})"),
    );
}

/// One measurement: printed, and a row in `$BENCH_CSV` (`mode` "hand
/// batch" is impl `hand`, mode `batch`; a one-word mode is idem's).
fn print_rate(broker: &str, store: &str, mode: &str, n: usize, rate: f64, note: &str) {
    println!(
        "{broker:<15} {store:<11} {mode:<13} {n:>7} msgs {:>8.2} s {rate:>8.0} msgs/s   {note}",
        n as f64 / rate,
    );
    // `$BENCH_CSV` (scripts/bench.sh): one row per measurement.
    if let Ok(path) = std::env::var("BENCH_CSV") {
        use std::io::Write;
        let new = std::fs::metadata(&path).map_or(true, |m| m.len() == 0);
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            if new {
                let _ = writeln!(f, "broker,store,mode,impl,messages,msg_per_s");
            }
            let (imp, mode) = mode.split_once(' ').unwrap_or(("idem", mode));
            let _ = writeln!(f, "{broker},{store},{mode},{imp},{n},{rate:.0}");
        }
    }
}

#[tokio::main]
async fn main() -> BoxResult<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .init();
    let mut args = std::env::args().skip(1).peekable();
    let n: usize = match args.peek().and_then(|a| a.parse().ok()) {
        Some(n) => {
            args.next();
            n
        }
        None => 10_000,
    };
    let mut brokers: Vec<String> = args.collect();
    if brokers.is_empty() {
        brokers = ["redis", "nats", "rabbitmq"].map(String::from).to_vec();
    }
    println!(
        "idem end to end: single (ack = auto, concurrency {CONCURRENCY}), batch (batch handler, {BATCH}); hand loop (idem's adapter) and raw loop (the client crate): fetch, decode, ack, no store; pgbench batched ({PGBENCH_CLIENTS} client × {BATCH}); {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for b in &brokers {
        match b.as_str() {
            "redis" => {
                let url = env("REDIS_URL", "redis://127.0.0.1:6379");
                let producer = producers::RedisProducer::connect(&url).await?;
                let limits = bench(
                    "Redis Streams",
                    || Ok(RedisStreams::new(&url)?),
                    &producer,
                    n,
                )
                .await?;
                let raw =
                    raw_brokers::redis::<Order>(&url, &backlog(&producer, &orders(n))).await?;
                raw_and_target("Redis Streams", n, &limits, raw);
            }
            "nats" => {
                let url = env("NATS_URL", "nats://127.0.0.1:4222");
                let producer = producers::NatsProducer::connect(&url).await?;
                let limits = bench(
                    "NATS JetStream",
                    || Ok(NatsJetStream::new(&url)?),
                    &producer,
                    n,
                )
                .await?;
                let raw = raw_brokers::nats::<Order>(&url, &backlog(&producer, &orders(n))).await?;
                raw_and_target("NATS JetStream", n, &limits, raw);
            }
            "rabbitmq" => {
                let url = env("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f");
                let producer = producers::RabbitProducer::connect(&url).await?;
                let limits = bench("RabbitMQ", || Ok(RabbitMq::new(&url)?), &producer, n).await?;
                let raw =
                    raw_brokers::rabbitmq::<Order>(&url, &backlog(&producer, &orders(n))).await?;
                raw_and_target("RabbitMQ", n, &limits, raw);
            }
            #[cfg(feature = "kafka")]
            "kafka" => {
                let brokers = env("KAFKA_BROKERS", "127.0.0.1:9092");
                let producer = producers::KafkaProducer::connect(&brokers)?;
                let limits = bench(
                    "Kafka",
                    || Ok(idem::source::kafka::Kafka::new(&brokers)?),
                    &producer,
                    n,
                )
                .await?;
                let raw = kafka_raw::run(&brokers, &producer, n).await?;
                raw_and_target("Kafka", n, &limits, raw);
            }
            other => {
                return Err(format!(
                    "unknown broker {other:?}: redis, nats, rabbitmq or kafka (with --features kafka)"
                )
                .into());
            }
        }
    }
    Ok(())
}

/// Kafka's raw loop: the broker's own limit, through rdkafka directly.
#[cfg(feature = "kafka")]
mod kafka_raw {
    use super::*;
    use idem::source::kafka::rdkafka::config::ClientConfig;
    use idem::source::kafka::rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use idem::source::kafka::rdkafka::message::Message;

    /// A hand-written rdkafka loop: one consumer in a fresh group reads the
    /// backlog (timed from the subscription, as idem is), committing the
    /// consumed offsets asynchronously every 64 messages and synchronously
    /// at the end.
    pub(crate) async fn run(
        brokers: &str,
        producer: &impl Producer,
        n: usize,
    ) -> BoxResult<Duration> {
        let topic = format!("{}{TOPIC}", stage_prefix());
        producer.reset(&topic).await?;
        producer.publish(&topic, &orders(n)).await?;
        let group = format!("{topic}-raw");
        let (brokers, t_topic) = (brokers.to_owned(), topic.clone());
        let t = tokio::task::spawn_blocking(move || -> Result<_, String> {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", &group)
                .set("enable.auto.commit", "false")
                .set("auto.offset.reset", "earliest")
                .create()
                .map_err(|e| e.to_string())?;
            let started = Instant::now();
            c.subscribe(&[&t_topic]).map_err(|e| e.to_string())?;
            let mut seen = 0usize;
            while seen < n {
                if started.elapsed() > Duration::from_secs(600) {
                    return Err(format!("gave up after 600 s: {seen} of {n}"));
                }
                match c.poll(Duration::from_millis(100)) {
                    Some(Ok(m)) => {
                        seen += 1;
                        let _: Order = serde_json::from_slice(m.payload().unwrap_or_default())
                            .map_err(|e| format!("Kafka raw loop: decode: {e}"))?;
                        if seen.is_multiple_of(BATCH) {
                            c.commit_consumer_state(CommitMode::Async)
                                .map_err(|e| e.to_string())?;
                        }
                    }
                    Some(Err(e)) => return Err(e.to_string()),
                    None => {}
                }
            }
            c.commit_consumer_state(CommitMode::Sync)
                .map_err(|e| e.to_string())?;
            Ok(started.elapsed())
        })
        .await??;
        producer.delete(&topic).await?;
        Ok(t)
    }
}
