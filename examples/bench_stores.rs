//! The store matrix and the concurrency / batch-size sweep, in one run:
//! per store (memory, SQLite, PostgreSQL, Redis, MySQL/MariaDB) and per mode
//! (single message, per-item batch `ack = "batch"`, batch handler
//! `Vec<T>`), idem beside a hand-written loop doing the same work on the same
//! store, and the store's own limit (`pgbench`, `redis-benchmark`,
//! `mysqlslap`) at the same client count and batch size, rounds interleaved,
//! medians reported. Latency per message (p50/p99) is fetch→ack: from the
//! moment the source hands the message out to its ack (claim, handler,
//! commit included).
//!
//! ```text
//! cargo run --release --example bench_stores \
//!   --features sqlite,postgres,mysql,redis -- [--quick] [--stores a,b] [--no-sweep] [--no-matrix]
//! ```
//!
//! Messages come from an in-process generator (`support/bench.rs`), not a
//! broker: this measures idem and the store. `bench_brokers` measures real
//! brokers. Each message is `{"id":"…","amount":n}`; the handler inserts one
//! row `(id, amount)` into `effects` in the store's transaction (SQL
//! stores) or does nothing (memory, Redis: lease stores have no
//! transaction). The hand loop claims the key in a plain table of its own
//! (`INSERT … ON CONFLICT DO NOTHING` / `INSERT IGNORE`; on PostgreSQL the
//! very claim statement the store issues), inserts the same effect row, and
//! commits: the floor an application would write without idem. CSV rows go
//! to `$BENCH_CSV` (default `target/bench/stores.csv`).

#[path = "support/bench.rs"]
mod bench;

use std::error::Error;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bench::{Csv, Generator, Histogram, median};
use idem::store::memory::MemoryStore;
use idem::store::mysql::MysqlStore;
use idem::store::postgres::PostgresStore;
use idem::store::redis::RedisStore;
use idem::store::sqlite::SqliteStore;
use idem::{CancellationToken, DedupStore, Runtime, Tx, idempotent};
use serde::Deserialize;
use sqlx::{AssertSqlSafe, Executor, QueryBuilder};

type BoxResult<T> = Result<T, Box<dyn Error>>;

#[derive(Debug, Deserialize)]
struct Event {
    id: String,
    amount: i64,
}

#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct DbError(#[from] sqlx::Error);

/// Three handlers per SQL store: single, per-item batch, batch handler.
macro_rules! sql_handlers {
    ($store:literal, $single:ident, $item:ident, $vec:ident, $n1:literal, $n2:literal, $n3:literal, $insert:literal) => {
        #[rustfmt::skip]
        #[idempotent(topic = "bench", key = "id", store = $store, name = $n1)]
        async fn $single(e: Event, tx: &mut Tx<'_>) -> Result<(), DbError> {
            sqlx::query($insert).bind(&e.id).bind(e.amount).execute(&mut **tx).await?;
            Ok(())
        }

        #[rustfmt::skip]
        #[idempotent(topic = "bench", key = "id", store = $store, name = $n2, ack = "batch")]
        async fn $item(e: Event, tx: &mut Tx<'_>) -> Result<(), DbError> {
            sqlx::query($insert).bind(&e.id).bind(e.amount).execute(&mut **tx).await?;
            Ok(())
        }

        #[rustfmt::skip]
        #[idempotent(topic = "bench", key = "id", store = $store, name = $n3)]
        async fn $vec(es: Vec<Event>, tx: &mut Tx<'_>) -> Result<(), DbError> {
            let mut q = QueryBuilder::new("INSERT INTO effects (id, amount) ");
            q.push_values(&es, |mut row, e| { row.push_bind(&e.id).push_bind(e.amount); });
            q.build().execute(&mut **tx).await?;
            Ok(())
        }
    };
}

/// Three handlers per lease store (no transaction: the handler does nothing).
macro_rules! lease_handlers {
    ($store:literal, $single:ident, $item:ident, $vec:ident, $n1:literal, $n2:literal, $n3:literal) => {
        #[rustfmt::skip]
        #[idempotent(topic = "bench", key = "id", store = $store, name = $n1, ttl = "10m")]
        async fn $single(e: Event) -> Result<(), String> {
            std::hint::black_box(e);
            Ok(())
        }

        #[rustfmt::skip]
        #[idempotent(topic = "bench", key = "id", store = $store, name = $n2, ttl = "10m", ack = "batch")]
        async fn $item(e: Event) -> Result<(), String> {
            std::hint::black_box(e);
            Ok(())
        }

        #[rustfmt::skip]
        #[idempotent(topic = "bench", key = "id", store = $store, name = $n3, ttl = "10m")]
        async fn $vec(es: Vec<Event>) -> Result<(), String> {
            std::hint::black_box(es);
            Ok(())
        }
    };
}

sql_handlers!(
    "sqlite",
    sqlite_single,
    sqlite_item,
    sqlite_vec,
    "sqlite-single",
    "sqlite-item",
    "sqlite-vec",
    "INSERT INTO effects (id, amount) VALUES (?, ?)"
);
sql_handlers!(
    "postgres",
    pg_single,
    pg_item,
    pg_vec,
    "postgres-single",
    "postgres-item",
    "postgres-vec",
    "INSERT INTO effects (id, amount) VALUES ($1, $2)"
);
sql_handlers!(
    "mysql",
    my_single,
    my_item,
    my_vec,
    "mysql-single",
    "mysql-item",
    "mysql-vec",
    "INSERT INTO effects (id, amount) VALUES (?, ?)"
);
lease_handlers!(
    "memory",
    mem_single,
    mem_item,
    mem_vec,
    "memory-single",
    "memory-item",
    "memory-vec"
);
lease_handlers!(
    "redis",
    redis_single,
    redis_item,
    redis_vec,
    "redis-single",
    "redis-item",
    "redis-vec"
);

/// How a fetched group of messages is processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// One message per transaction, `concurrency` at once.
    Single,
    /// A batch per transaction, a savepoint per item.
    Item,
    /// A batch per transaction, one multi-row insert.
    Vec,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Single => "single",
            Mode::Item => "per-item batch",
            Mode::Vec => "batch handler",
        }
    }
    fn suffix(self) -> &'static str {
        match self {
            Mode::Single => "single",
            Mode::Item => "item",
            Mode::Vec => "vec",
        }
    }
}

/// The effect rows of the hand loop on SQLite and MySQL (same per mode as
/// on PostgreSQL above).
macro_rules! sql_effects {
    ($tx:ident, $mode:expr, $events:expr, $insert:literal) => {
        match $mode {
            Mode::Single | Mode::Item => {
                for e in $events {
                    if $mode == Mode::Item {
                        let mut sp = sqlx::Acquire::begin(&mut $tx).await.expect("savepoint");
                        sqlx::query($insert)
                            .bind(&e.id)
                            .bind(e.amount)
                            .execute(&mut *sp)
                            .await
                            .expect("effect");
                        sp.commit().await.expect("release");
                    } else {
                        sqlx::query($insert)
                            .bind(&e.id)
                            .bind(e.amount)
                            .execute(&mut *$tx)
                            .await
                            .expect("effect");
                    }
                }
            }
            Mode::Vec => {
                let mut q = QueryBuilder::new("INSERT INTO effects (id, amount) ");
                q.push_values($events, |mut r, e| {
                    r.push_bind(&e.id).push_bind(e.amount);
                });
                q.build().execute(&mut *$tx).await.expect("effects");
            }
        }
    };
}

/// One store under test, with what the hand loop needs.
#[derive(Clone)]
enum Store {
    /// (`MemoryStore` is not `Clone`: each idem run gets a fresh one.)
    Memory(Arc<Mutex<std::collections::HashSet<String>>>),
    Sqlite(SqliteStore),
    Postgres(PostgresStore, Arc<str>),
    Mysql(MysqlStore),
    Redis(RedisStore, redis::aio::ConnectionManager),
}

impl Store {
    fn name(&self) -> &'static str {
        match self {
            Store::Memory(..) => "memory",
            Store::Sqlite(_) => "sqlite",
            Store::Postgres(..) => "postgres",
            Store::Mysql(_) => "mysql",
            Store::Redis(..) => "redis",
        }
    }

    /// idem over `n` generated messages; (msg/s, p50 ms, p99 ms).
    async fn idem(&self, mode: Mode, concurrency: usize, prefix: &str, n: u64) -> BoxResult<Row> {
        let handler = format!("{}-{}", self.name(), mode.suffix());
        match self {
            Store::Memory(_) => {
                run_idem(MemoryStore::new(), &handler, concurrency, prefix, n).await
            }
            Store::Sqlite(s) => run_idem(s.clone(), &handler, concurrency, prefix, n).await,
            Store::Postgres(s, _) => run_idem(s.clone(), &handler, concurrency, prefix, n).await,
            Store::Mysql(s) => run_idem(s.clone(), &handler, concurrency, prefix, n).await,
            Store::Redis(s, _) => run_idem(s.clone(), &handler, concurrency, prefix, n).await,
        }
    }

    /// The hand-written loop: `workers` loops of `batch` messages.
    async fn hand(&self, mode: Mode, workers: usize, batch: usize, prefix: &str, n: u64) -> Row {
        let source = Generator::new(prefix, n);
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..workers {
            let (store, source) = (self.clone(), source.clone());
            tasks.spawn(async move {
                // Every message handed out: this worker is done (the hand
                // loop never nacks).
                while !source.exhausted() {
                    let ds = source.take(batch).await;
                    if ds.is_empty() {
                        continue;
                    }
                    let events: Vec<Event> = ds
                        .iter()
                        .map(|d| serde_json::from_slice(&d.payload).expect("valid JSON"))
                        .collect();
                    store.process(mode, &events).await;
                    for d in &ds {
                        source.settle(d);
                    }
                }
            });
        }
        while tasks.join_next().await.is_some() {}
        row(n, started, source.latency())
    }

    async fn process(&self, mode: Mode, events: &[Event]) {
        const HAND: &str = "hand";
        match self {
            Store::Memory(seen) => {
                let mut seen = seen.lock().unwrap();
                for e in events {
                    assert!(seen.insert(e.id.clone()));
                }
            }
            Store::Redis(_, conn) => {
                let mut conn = conn.clone();
                let mut claim = redis::pipe();
                for e in events {
                    claim
                        .cmd("SET")
                        .arg(format!("hand:{}", e.id))
                        .arg("in-flight")
                        .arg("NX")
                        .arg("PX")
                        .arg(600_000);
                }
                let _: Vec<Option<String>> = claim.query_async(&mut conn).await.expect("claim");
                let mut done = redis::pipe();
                for e in events {
                    done.cmd("SET")
                        .arg(format!("hand:{}", e.id))
                        .arg("done")
                        .arg("XX")
                        .arg("PX")
                        .arg(600_000)
                        .ignore();
                }
                let _: () = done.query_async(&mut conn).await.expect("complete");
            }
            Store::Postgres(s, claim) => {
                let mut tx = s.pool().begin().await.expect("begin");
                let keys: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
                let handlers = vec![HAND; keys.len()];
                let fps: Vec<i64> = events.iter().map(|e| e.amount).collect();
                let ttls: Vec<Option<i64>> = vec![None; keys.len()];
                let rows = sqlx::query(AssertSqlSafe(claim.clone()))
                    .bind(&handlers)
                    .bind(&keys)
                    .bind(&fps)
                    .bind(&keys)
                    .bind(&ttls)
                    .fetch_all(&mut *tx)
                    .await
                    .expect("claim");
                assert_eq!(rows.len(), events.len());
                sql_effects!(
                    tx,
                    mode,
                    events,
                    "INSERT INTO effects (id, amount) VALUES ($1, $2)"
                );
                tx.commit().await.expect("commit");
            }
            Store::Sqlite(s) => {
                let mut tx = s.pool().begin().await.expect("begin");
                let mut q = QueryBuilder::new("INSERT INTO hand_keys (k) ");
                q.push_values(events, |mut r, e| {
                    r.push_bind(&e.id);
                });
                q.push(" ON CONFLICT DO NOTHING");
                q.build().execute(&mut *tx).await.expect("claim");
                sql_effects!(
                    tx,
                    mode,
                    events,
                    "INSERT INTO effects (id, amount) VALUES (?, ?)"
                );
                tx.commit().await.expect("commit");
            }
            Store::Mysql(s) => {
                let mut tx = s.pool().begin().await.expect("begin");
                let mut q = QueryBuilder::new("INSERT IGNORE INTO hand_keys (k) ");
                q.push_values(events, |mut r, e| {
                    r.push_bind(&e.id);
                });
                q.build().execute(&mut *tx).await.expect("claim");
                sql_effects!(
                    tx,
                    mode,
                    events,
                    "INSERT INTO effects (id, amount) VALUES (?, ?)"
                );
                tx.commit().await.expect("commit");
            }
        }
    }
}

/// One measurement.
#[derive(Debug, Clone, Copy, Default)]
struct Row {
    rate: f64,
    p50: f64,
    p99: f64,
}

fn row(n: u64, started: Instant, latency: &Histogram) -> Row {
    Row {
        rate: n as f64 / started.elapsed().as_secs_f64(),
        p50: latency.quantile_ms(0.5),
        p99: latency.quantile_ms(0.99),
    }
}

async fn run_idem<D: DedupStore<M>, M>(
    store: D,
    handler: &str,
    concurrency: usize,
    prefix: &str,
    n: u64,
) -> BoxResult<Row> {
    let source = Generator::new(prefix, n);
    let rt = Runtime::builder(source.clone())
        .store(store)
        .handlers([handler])
        .concurrency(concurrency)
        .build()?;
    let stop = CancellationToken::new();
    let started = Instant::now();
    let mut elapsed = None;
    tokio::join!(rt.run(stop.clone()), async {
        source.wait_done().await;
        elapsed = Some(row(n, started, source.latency()));
        stop.cancel();
    });
    let stats = rt.stats_of(handler).unwrap_or_default();
    if stats.processed != n {
        return Err(format!(
            "{handler}: {} of {n} processed ({stats:?})",
            stats.processed
        )
        .into());
    }
    Ok(elapsed.unwrap_or_default())
}

fn env(var: &str, default: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| default.into())
}

fn bench_id() -> String {
    format!("idem_bench_{}", std::process::id())
}

/// Connects (and prepares the tables of) one store.
async fn open(name: &str) -> BoxResult<Store> {
    let id = bench_id();
    Ok(match name {
        "memory" => Store::Memory(Arc::default()),
        "sqlite" => {
            let path = std::env::temp_dir().join(format!("{id}.db"));
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
            let store = SqliteStore::open(&path.display().to_string()).await?;
            store.migrate().await?;
            store
                .pool()
                .execute(sqlx::raw_sql(
                    "CREATE TABLE effects (id TEXT NOT NULL, amount INTEGER NOT NULL);
                     CREATE TABLE hand_keys (k TEXT PRIMARY KEY)",
                ))
                .await?;
            Store::Sqlite(store)
        }
        "postgres" => {
            let url = env(
                "DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/postgres",
            );
            let admin = PostgresStore::connect(&url).await?;
            admin
                .pool()
                .execute(sqlx::raw_sql(AssertSqlSafe(format!(
                    "DROP SCHEMA IF EXISTS {id} CASCADE; CREATE SCHEMA {id}"
                ))))
                .await?;
            let options: sqlx::postgres::PgConnectOptions = url.parse()?;
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(66)
                .min_connections(0)
                .idle_timeout(std::time::Duration::from_millis(500))
                .connect_with(options.options([("search_path", id.as_str())]))
                .await?;
            let store = PostgresStore::new(pool).with_schema(&id)?;
            store.migrate().await?;
            store
                .pool()
                .execute(sqlx::raw_sql(AssertSqlSafe(format!(
                    "CREATE TABLE effects (id text NOT NULL, amount bigint NOT NULL); {}",
                    bench::PGBENCH_TABLES
                ))))
                .await?;
            let claim: Arc<str> = store.claim_statement().into();
            Store::Postgres(store, claim)
        }
        "mysql" => {
            let url = env("MYSQL_URL", "mysql://root@127.0.0.1:3306/test");
            let server = MysqlStore::connect(&url).await?;
            server
                .pool()
                .execute(sqlx::raw_sql(AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {id}; CREATE DATABASE {id}"
                ))))
                .await?;
            let options: sqlx::mysql::MySqlConnectOptions = url.parse()?;
            let pool = sqlx::mysql::MySqlPoolOptions::new()
                .max_connections(72)
                .connect_with(options.database(&id))
                .await?;
            let store = MysqlStore::new(pool);
            store.migrate().await?;
            store
                .pool()
                .execute(sqlx::raw_sql(
                    "CREATE TABLE effects (id VARCHAR(64) NOT NULL, amount BIGINT NOT NULL);
                     CREATE TABLE hand_keys (k VARCHAR(64) PRIMARY KEY)",
                ))
                .await?;
            Store::Mysql(store)
        }
        "redis" => {
            let url = env("REDIS_URL", "redis://127.0.0.1:6379");
            let store = RedisStore::builder(&url)
                .prefix(format!("{id}:"))
                .connect()
                .await?;
            let conn = redis::Client::open(url.as_str())?
                .get_connection_manager()
                .await?;
            Store::Redis(store, conn)
        }
        other => {
            return Err(
                format!("unknown store {other:?}: memory, sqlite, postgres, mysql, redis").into(),
            );
        }
    })
}

/// Drops what `open` created.
async fn close(store: &Store) -> BoxResult<()> {
    let id = bench_id();
    match store {
        Store::Postgres(s, _) => {
            s.pool()
                .execute(sqlx::raw_sql(AssertSqlSafe(format!(
                    "DROP SCHEMA {id} CASCADE"
                ))))
                .await?;
        }
        Store::Mysql(s) => {
            s.pool()
                .execute(sqlx::raw_sql(AssertSqlSafe(format!("DROP DATABASE {id}"))))
                .await?;
        }
        Store::Sqlite(_) => {
            let path = std::env::temp_dir().join(format!("{id}.db"));
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
        }
        Store::Redis(_, conn) => {
            // The keys expire on their own (PX 10 min); drop them now.
            let mut conn = conn.clone();
            for pattern in [format!("{id}:*"), "hand:*".to_string()] {
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(&pattern)
                    .query_async(&mut conn)
                    .await?;
                for chunk in keys.chunks(1000) {
                    let _: () = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await?;
                }
            }
        }
        Store::Memory(..) => {}
    }
    Ok(())
}

/// The store's own limit at `clients` × `batch`: msg/s, or `None` when the
/// tool is missing or fails (said on stderr).
fn native(store: &Store, clients: usize, batch: usize, n: u64) -> Option<(&'static str, f64)> {
    let per_client = (n / (clients as u64 * batch as u64)).max(1);
    let (tool, output) = match store {
        Store::Postgres(..) => {
            let url = env(
                "DATABASE_URL",
                "postgres://postgres@127.0.0.1:5432/postgres",
            );
            return match bench::pgbench(&url, &bench_id(), clients, batch, per_client) {
                Ok(rate) => Some(("pgbench", rate)),
                Err(e) => {
                    eprintln!("  {e}");
                    None
                }
            };
        }
        Store::Redis(..) => {
            let out = Command::new("redis-benchmark")
                .args(["-q", "-r", "1000000000", "-c", clients.to_string().as_str()])
                .args([
                    "-P",
                    batch.to_string().as_str(),
                    "-n",
                    (n * 2).to_string().as_str(),
                ])
                .args(["SET", "rb:__rand_int__", "x", "NX", "PX", "60000"])
                .output();
            ("redis-benchmark", out)
        }
        Store::Mysql(_) => {
            let url = env("MYSQL_URL", "mysql://root@127.0.0.1:3306/test");
            let host_port = url
                .trim_start_matches("mysql://")
                .split('@')
                .next_back()
                .and_then(|s| s.split('/').next())
                .unwrap_or("127.0.0.1:3306")
                .to_string();
            let (host, port) = host_port.split_once(':').unwrap_or((&host_port, "3306"));
            let values: Vec<String> = (0..batch).map(|_| "(uuid(), 1)".to_string()).collect();
            let keys: Vec<String> = (0..batch).map(|_| "(uuid())".to_string()).collect();
            let query = format!(
                "START TRANSACTION; INSERT IGNORE INTO hand_keys (k) VALUES {}; INSERT INTO effects (id, amount) VALUES {}; COMMIT;",
                keys.join(","),
                values.join(",")
            );
            let out = Command::new("mysqlslap")
                .args(["-h", host, "-P", port, "-u", "root"])
                .args(["--create-schema", bench_id().as_str(), "--delimiter", ";"])
                .args(["--concurrency", clients.to_string().as_str()])
                .arg("--number-of-queries")
                .arg((per_client * clients as u64 * 4).to_string())
                .args(["--query", query.as_str()])
                .output();
            ("mysqlslap", out)
        }
        _ => return None,
    };
    let out = match bench::tool_output(tool, output) {
        Ok(out) => out,
        Err(e) => {
            eprintln!("  {e}");
            return None;
        }
    };
    let number_after = |marker: &str| bench::number_after(&out, marker);
    let rate = match tool {
        // one SET per message
        "redis-benchmark" => number_after("SET rb:__rand_int__ x NX PX 60000:")?,
        // seconds for all the queries: 4 statements per transaction
        _ => {
            let secs = number_after("Average number of seconds to run all queries:")?;
            (per_client * clients as u64 * batch as u64) as f64 / secs
        }
    };
    Some((tool, rate))
}

struct Plan {
    rounds: usize,
    single_n: u64,
    batch_n: u64,
}

#[tokio::main]
async fn main() -> BoxResult<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let stores: Vec<String> = args
        .iter()
        .position(|a| a == "--stores")
        .and_then(|i| args.get(i + 1))
        .map_or("memory,sqlite,postgres,redis,mysql", String::as_str)
        .split(',')
        .map(String::from)
        .collect();
    let plan = if quick {
        Plan {
            rounds: 3,
            single_n: 2_000,
            batch_n: 64 * 40,
        }
    } else {
        Plan {
            rounds: 5,
            single_n: 8_000,
            batch_n: 64 * 150,
        }
    };
    let mut csv = Csv::open(
        "target/bench/stores.csv",
        "bench,store,mode,impl,concurrency,batch,messages,msg_per_s,p50_ms,p99_ms",
    )?;
    println!(
        "idem store matrix: median of {} interleaved rounds, {} CPUs, {}",
        plan.rounds,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if quick { "quick" } else { "full" }
    );
    let mut failed = Vec::new();
    for name in &stores {
        // A store that fails is reported and the others still run.
        if let Err(e) = one_store(name, &args, &plan, &mut csv).await {
            eprintln!("{name}: {e}");
            failed.push(name.as_str());
        }
    }
    if !failed.is_empty() {
        return Err(format!("failed: {}", failed.join(", ")).into());
    }
    Ok(())
}

/// The matrix, and the sweep or the serial row where they apply, on one store.
async fn one_store(name: &str, args: &[String], plan: &Plan, csv: &mut Csv) -> BoxResult<()> {
    let store = open(name).await?;
    let result = async {
        if !args.iter().any(|a| a == "--no-matrix") {
            matrix(&store, plan, csv).await?;
        }
        if !args.iter().any(|a| a == "--no-sweep") && matches!(name, "postgres" | "memory") {
            sweep(&store, plan, csv).await?;
        }
        if name == "redis" {
            // Serial, as the Python peer runs (benches/powertools/).
            let n = plan.single_n / 2;
            point(&store, "peer", Mode::Single, 1, 1, n, plan.rounds, csv).await?;
        }
        Ok::<_, Box<dyn Error>>(())
    }
    .await;
    close(&store).await?;
    result
}

#[allow(clippy::too_many_arguments)]
/// Runs `rounds` of idem / hand / native at one point; prints and records
/// the medians.
async fn point(
    store: &Store,
    bench: &str,
    mode: Mode,
    concurrency: usize,
    batch: usize,
    n: u64,
    rounds: usize,
    csv: &mut Csv,
) -> BoxResult<()> {
    let (mut idem, mut hand, mut nat) = (Vec::new(), Vec::new(), Vec::new());
    let mut tool = "";
    let name = store.name();
    // Warm-up (connections, prepared statements).
    let warm = (batch as u64 * 4).max(100);
    store
        .idem(
            mode,
            concurrency.max(batch),
            &format!("w-{bench}-{concurrency}-{batch}"),
            warm,
        )
        .await?;
    for round in 0..rounds {
        let prefix = format!("{bench}-{}-{concurrency}-{batch}-{round}", mode.suffix());
        // idem: `concurrency` slots; in batch modes a batch is one fetch of
        // up to `concurrency` messages, so the slots are the batch size.
        let slots = if mode == Mode::Single {
            concurrency
        } else {
            batch
        };
        idem.push(store.idem(mode, slots, &format!("i-{prefix}"), n).await?);
        let (workers, per) = if mode == Mode::Single {
            (concurrency, 1)
        } else {
            (1, batch)
        };
        hand.push(
            store
                .hand(mode, workers, per, &format!("h-{prefix}"), n)
                .await,
        );
        {
            // Let the pool's idle connections close: pgbench at 64 clients
            // and a full pool would pass PostgreSQL's 100 connections.
            if matches!(store, Store::Postgres(..)) && workers > 16 {
                tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
            }
            if let Some((t, rate)) = native(store, workers, per, n) {
                tool = t;
                nat.push(rate);
            }
        }
    }
    let med = |v: &[Row], f: fn(&Row) -> f64| median(v.iter().map(f).collect());
    let (i, h) = (med(&idem, |r| r.rate), med(&hand, |r| r.rate));
    let nat = median(nat);
    print!(
        "{bench:<6} {name:<9} {:<15} c={concurrency:<3} b={batch:<4} idem {i:>8.0}/s p50 {:>7.3} p99 {:>7.3} ms | hand {h:>8.0}/s p50 {:>7.3} p99 {:>7.3} ms | idem/hand {:.2}",
        mode.name(),
        med(&idem, |r| r.p50),
        med(&idem, |r| r.p99),
        med(&hand, |r| r.p50),
        med(&hand, |r| r.p99),
        i / h
    );
    if nat > 0.0 {
        print!(" | {tool} {nat:>8.0}/s idem/{tool} {:.2}", i / nat);
        csv.row(&[
            &bench,
            &name,
            &mode.suffix(),
            &tool,
            &concurrency,
            &batch,
            &n,
            &format!("{nat:.0}"),
            &"",
            &"",
        ]);
    }
    println!();
    csv.row(&[
        &bench,
        &name,
        &mode.suffix(),
        &"idem",
        &concurrency,
        &batch,
        &n,
        &format!("{i:.0}"),
        &format!("{:.3}", med(&idem, |r| r.p50)),
        &format!("{:.3}", med(&idem, |r| r.p99)),
    ]);
    csv.row(&[
        &bench,
        &name,
        &mode.suffix(),
        &"hand",
        &concurrency,
        &batch,
        &n,
        &format!("{h:.0}"),
        &format!("{:.3}", med(&hand, |r| r.p50)),
        &format!("{:.3}", med(&hand, |r| r.p99)),
    ]);
    Ok(())
}

/// single at 16, per-item batch and batch handler at 64.
async fn matrix(store: &Store, plan: &Plan, csv: &mut Csv) -> BoxResult<()> {
    point(
        store,
        "matrix",
        Mode::Single,
        16,
        1,
        plan.single_n,
        plan.rounds,
        csv,
    )
    .await?;
    point(
        store,
        "matrix",
        Mode::Item,
        64,
        64,
        plan.batch_n,
        plan.rounds,
        csv,
    )
    .await?;
    point(
        store,
        "matrix",
        Mode::Vec,
        64,
        64,
        plan.batch_n,
        plan.rounds,
        csv,
    )
    .await?;
    Ok(())
}

/// Throughput and latency against concurrency (single) and batch size
/// (batch handler).
async fn sweep(store: &Store, plan: &Plan, csv: &mut Csv) -> BoxResult<()> {
    let rounds = plan.rounds.div_ceil(2);
    for c in [1, 4, 16, 64] {
        let n = (plan.single_n / 16 * c as u64).clamp(500, plan.single_n * 2);
        point(store, "sweep", Mode::Single, c, 1, n, rounds, csv).await?;
    }
    for b in [1, 16, 64, 256] {
        let n = (plan.batch_n / 64 * b as u64).clamp(500, plan.batch_n * 2);
        point(store, "sweep", Mode::Vec, b, b, n, rounds, csv).await?;
    }
    Ok(())
}
