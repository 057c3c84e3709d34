//! Soak: a million messages through one runtime with the TTL purge running,
//! sampling this process's resident memory (`VmRSS`, and the peak `VmHWM`
//! from `/proc/self/status`) as the messages go by. Memory must stay flat:
//! the peak at 1,000,000 within 10 % of the peak at 100,000 (checked and
//! printed here, never in a test).
//!
//! ```text
//! cargo run --release --example bench_soak --features postgres -- \
//!   [--messages 1000000] [--store memory|postgres]
//! ```
//!
//! Messages come from the in-process generator of `support/bench.rs`
//! (it forgets each message once acked, unlike the test broker that keeps
//! them all). Handler: `ttl = "100ms"`; `purge_expired_every(50 ms,
//! 10,000)`: short, so that the live records (about throughput × (ttl +
//! purge period) with the memory store) reach their steady state well before
//! the first mark at 100,000 and the marks compare like with like. With
//! PostgreSQL the records live in the database, and the batch handler inserts
//! one effect row per message. Samples go to `$BENCH_CSV` (default
//! `target/bench/soak.csv`).

#[path = "support/bench.rs"]
mod bench;

use std::error::Error;
use std::time::{Duration, Instant};

use bench::{Csv, Generator, rss_kib};
use idem::store::memory::MemoryStore;
use idem::store::postgres::PostgresStore;
use idem::{CancellationToken, DedupStore, Runtime, Tx, idempotent};
use serde::Deserialize;
use sqlx::{AssertSqlSafe, Executor};

type BoxResult<T> = Result<T, Box<dyn Error>>;

#[derive(Debug, Deserialize)]
struct Event {
    id: String,
    amount: i64,
}

#[idempotent(
    topic = "bench",
    key = "id",
    store = "memory",
    name = "soak-memory",
    ttl = "100ms"
)]
async fn soak_memory(e: Event) -> Result<(), String> {
    std::hint::black_box(e);
    Ok(())
}

#[idempotent(
    topic = "bench",
    key = "id",
    store = "postgres",
    name = "soak-postgres",
    ttl = "100ms",
    ack = "batch"
)]
async fn soak_postgres(e: Event, tx: &mut Tx<'_>) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO effects (id, amount) VALUES ($1, $2)")
        .bind(&e.id)
        .bind(e.amount)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn soak<D: DedupStore<M>, M>(
    store: D,
    handler: &str,
    concurrency: usize,
    n: u64,
    csv: &mut Csv,
    store_name: &str,
) -> BoxResult<bool> {
    let source = Generator::new("soak", n);
    let rt = Runtime::builder(source.clone())
        .store(store)
        .handlers([handler])
        .concurrency(concurrency)
        .purge_expired_every(Duration::from_millis(50), 10_000)
        .build()?;
    let stop = CancellationToken::new();
    let started = Instant::now();
    let step = (n / 20).max(1);
    let marks = [n / 10, n / 2, n];
    let mut at_marks = Vec::new();
    let (_, hwm0) = rss_kib();
    println!("{store_name}: start VmHWM {} MiB", hwm0 / 1024);
    tokio::join!(rt.run(stop.clone()), async {
        let mut next = step;
        loop {
            let done = source.settled();
            if done >= next.min(n) {
                let (rss, hwm) = rss_kib();
                let t = started.elapsed().as_secs_f64();
                csv.row(&[
                    &store_name,
                    &done,
                    &format!("{t:.2}"),
                    &rss,
                    &hwm,
                    &rt.purged(),
                ]);
                for m in marks {
                    if done >= m && at_marks.iter().all(|(mm, _, _)| *mm != m) {
                        at_marks.push((m, rss, hwm));
                        println!(
                            "{store_name}: {done:>8} settled  {t:>6.1} s  {:>7.0} msg/s  VmRSS {:>4} MiB  VmHWM {:>4} MiB  purged {}",
                            done as f64 / t,
                            rss / 1024,
                            hwm / 1024,
                            rt.purged()
                        );
                    }
                }
                next += step;
            }
            if done >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
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
    let first = at_marks.first().map_or(0, |m| m.2) as f64;
    let last = at_marks.last().map_or(0, |m| m.2) as f64;
    let growth = last / first - 1.0;
    let flat = growth <= 0.10;
    println!(
        "{store_name}: peak RSS {:.0} MiB at {} → {:.0} MiB at {}: {:+.1} % ({}), {:.0} msg/s, {} records purged",
        first / 1024.0,
        marks[0],
        last / 1024.0,
        n,
        growth * 100.0,
        if flat {
            "flat, within 10 %"
        } else {
            "NOT flat"
        },
        n as f64 / started.elapsed().as_secs_f64(),
        rt.purged()
    );
    Ok(flat)
}

#[tokio::main]
async fn main() -> BoxResult<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let n: u64 = arg("--messages").map_or(Ok(1_000_000), |s| s.parse())?;
    let store = arg("--store").unwrap_or_else(|| "memory".into());
    let mut csv = Csv::open(
        "target/bench/soak.csv",
        "store,settled,seconds,vm_rss_kib,vm_hwm_kib,purged",
    )?;
    let flat = match store.as_str() {
        "memory" => soak(MemoryStore::new(), "soak-memory", 64, n, &mut csv, "memory").await?,
        "postgres" => {
            let url = std::env::var("DATABASE_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
            let schema = format!("idem_soak_{}", std::process::id());
            let admin = PostgresStore::connect(&url).await?;
            admin
                .pool()
                .execute(sqlx::raw_sql(AssertSqlSafe(format!(
                    "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
                ))))
                .await?;
            let options: sqlx::postgres::PgConnectOptions = url.parse()?;
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(8)
                .connect_with(options.options([("search_path", schema.as_str())]))
                .await?;
            let store = PostgresStore::new(pool).with_schema(&schema)?;
            store.migrate().await?;
            store
                .pool()
                .execute("CREATE TABLE effects (id text NOT NULL, amount bigint NOT NULL)")
                .await?;
            let flat = soak(store, "soak-postgres", 256, n, &mut csv, "postgres").await;
            admin
                .pool()
                .execute(sqlx::raw_sql(AssertSqlSafe(format!(
                    "DROP SCHEMA {schema} CASCADE"
                ))))
                .await?;
            flat?
        }
        other => return Err(format!("unknown store {other:?}: memory or postgres").into()),
    };
    if !flat {
        std::process::exit(2);
    }
    Ok(())
}
