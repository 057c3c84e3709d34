//! The idem service the crash-torture harness (`main.rs`) runs as real OS
//! processes (itself, with `TORTURE_ROLE=service`) and kills with SIGKILL: a consumer (Redis Streams, NATS JetStream or RabbitMQ) that
//! writes one effect row per business key into PostgreSQL, deduplicated by
//! the PostgreSQL store (effect and dedup row in one transaction) or by the
//! Redis store (a lease; the effect row written outside any transaction).
//!
//! Configured by the harness through the environment:
//! `TORTURE_BROKER` (`redis-streams` | `nats` | `rabbitmq`) and
//! `TORTURE_BROKER_URL`, `TORTURE_RUN` (prefix of topics and groups),
//! `TORTURE_STORE` (`postgres` | `redis`), `TORTURE_SCHEMA`,
//! `TORTURE_CONSUMER`, `TORTURE_RECLAIM_MS`, `DATABASE_URL`, `REDIS_URL`. Every 50 ms it
//! writes its counters to the Redis hash `<run>stats`, field
//! `<consumer>/<pid>`, so the harness can add up what killed processes did.

use std::sync::OnceLock;
use std::time::Duration;

use idem::Source;
use idem::source::namespaced::Namespaced;
use idem::source::nats::NatsJetStream;
use idem::source::rabbitmq::RabbitMq;
use idem::source::redis_streams::RedisStreams;
use idem::store::postgres::PostgresStore;
use idem::store::redis::RedisStore;
use idem::{Runtime, Tx, idempotent};
use serde::Deserialize;
use sqlx::PgPool;

#[derive(Debug, Deserialize)]
struct Event {
    key: String,
    #[serde(default)]
    poison: bool,
}

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("poison message {0}: the business rules refuse it")]
    Poison(String),
}

/// A little work inside the transaction, so kills land mid-handler too.
async fn work() {
    let micros = fastrand::u64(500..5_000);
    tokio::time::sleep(Duration::from_micros(micros)).await;
}

const EFFECT: &str = "INSERT INTO effects (key, pid) VALUES ($1, $2)";

#[idempotent(
    topic = "torture",
    key = "key",
    store = "postgres",
    name = "torture-pg",
    retries = 2,
    backoff = "5ms..20ms"
)]
async fn apply_pg(e: Event, tx: &mut Tx<'_>) -> Result<(), Error> {
    if e.poison {
        return Err(Error::Poison(e.key));
    }
    sqlx::query(EFFECT)
        .bind(&e.key)
        .bind(std::process::id() as i32)
        .execute(&mut **tx)
        .await?;
    work().await;
    Ok(())
}

static POOL: OnceLock<PgPool> = OnceLock::new();

#[idempotent(
    topic = "torture",
    key = "key",
    store = "redis",
    name = "torture-redis",
    lease = "2s",
    retries = 2,
    backoff = "5ms..20ms"
)]
async fn apply_redis(e: Event) -> Result<(), Error> {
    if e.poison {
        return Err(Error::Poison(e.key));
    }
    let pool = POOL.get().expect("pool set before the runtime starts");
    // No transaction shared with the dedup record: this is the lease store's
    // crash window (effect written, done-record not yet).
    sqlx::query(EFFECT)
        .bind(&e.key)
        .bind(std::process::id() as i32)
        .execute(pool)
        .await?;
    work().await;
    Ok(())
}

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// The service process: runs until SIGTERM.
pub(crate) async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    run().await
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let run = env("TORTURE_RUN", "torture-");
    let broker_url = env("TORTURE_BROKER_URL", "redis://127.0.0.1:6379");
    let consumer = env("TORTURE_CONSUMER", "c0");
    // A crashed consumer's messages come back after this long.
    let reclaim = Duration::from_millis(env("TORTURE_RECLAIM_MS", "500").parse()?);
    match env("TORTURE_BROKER", "redis-streams").as_str() {
        "redis-streams" => {
            let source = RedisStreams::new(&broker_url)?
                .consumer_name(consumer)
                .claim_idle(reclaim)
                .block(Duration::from_millis(100));
            serve(Namespaced::new(source, run)).await
        }
        "nats" => {
            let source = NatsJetStream::new(&broker_url)?
                .ack_wait(reclaim)
                .fetch_wait(Duration::from_millis(100));
            serve(Namespaced::new(source, run)).await
        }
        "rabbitmq" => {
            let source = RabbitMq::new(&broker_url)?.fetch_wait(Duration::from_millis(100));
            serve(Namespaced::new(source, run)).await
        }
        other => Err(format!("TORTURE_BROKER: unknown broker {other:?}").into()),
    }
}

/// Runs the chosen handler over `source` until SIGTERM, reporting counters.
async fn serve<S: Source>(source: Namespaced<S>) -> Result<(), Box<dyn std::error::Error>> {
    let run = source.prefix().to_owned();
    let store_kind = env("TORTURE_STORE", "postgres");
    let schema = env("TORTURE_SCHEMA", "public");
    let consumer = env("TORTURE_CONSUMER", "c0");
    let db_url = env(
        "DATABASE_URL",
        "postgres://postgres@127.0.0.1:5432/postgres",
    );
    let redis_url = env("REDIS_URL", "redis://127.0.0.1:6379");

    let options: sqlx::postgres::PgConnectOptions = db_url.parse()?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(16)
        .connect_with(options.options([("search_path", schema.as_str())]))
        .await?;
    let builder = Runtime::builder(source).concurrency(8);
    let (builder, handler) = if store_kind == "redis" {
        POOL.set(pool.clone()).expect("set once");
        let store = RedisStore::builder(&redis_url)
            .prefix(format!("{run}dedup"))
            .connect()
            .await?;
        (builder.store(store), "torture-redis")
    } else {
        let store = PostgresStore::new(pool.clone()).with_schema(&schema)?;
        (builder.store(store), "torture-pg")
    };
    let runtime = builder.handlers([handler]).build()?;

    // Counters go to REDIS_URL (the shared Redis, or the broker's own in the
    // outage run), so the harness can add up what killed processes did.
    let stats_key = format!("{run}stats");
    let field = format!("{consumer}/{}", std::process::id());
    let client = redis::Client::open(redis_url.as_str())?;
    // Reconnects by itself when that Redis restarts.
    let mut conn = client.get_connection_manager().await?;
    let report = |s: Option<idem::Stats>| {
        let s = s.unwrap_or_default();
        format!(
            "{} {} {} {} {}",
            s.received, s.processed, s.duplicate, s.failed, s.dead_lettered
        )
    };
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop = idem::CancellationToken::new();
    let reporter = async {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let _: Result<(), _> = redis::cmd("HSET")
                .arg(&stats_key)
                .arg(&field)
                .arg(report(runtime.stats_of(handler)))
                .query_async(&mut conn)
                .await;
        }
    };
    let signal = async {
        terminate.recv().await;
        stop.cancel();
    };
    tokio::join!(runtime.run(stop.clone()), reporter, signal);
    let last: Result<(), redis::RedisError> = redis::cmd("HSET")
        .arg(&stats_key)
        .arg(&field)
        .arg(report(runtime.stats_of(handler)))
        .query_async(&mut conn)
        .await;
    if let Err(e) = last {
        eprintln!("could not write the final counters: {e}");
    }
    Ok(())
}
