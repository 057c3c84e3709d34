//! Throughput of the Redis store, in one run:
//!
//! - idem: a `Runtime` over the in-memory broker with a no-op handler
//!   (`store = "redis"`), one message at a time per slot (`ack = "auto"`,
//!   16 in flight) and in batches of 64 (`ack = "batch"`);
//! - a hand-written loop sending the very same commands with `redis`
//!   directly (claim pipeline of `SET … NX GET PX`, then one completion
//!   `EVALSHA` over the same keys), at the same depths, and the store's
//!   API (`claim` + `commit`) without the runtime;
//! - `redis-benchmark` running `SET idem:bench:__rand_int__ x NX PX 30000`
//!   at the same depths (`-c 16 -P 1` and `-c 1 -P 64`);
//! - the in-process cache tier off and on, with hot duplicates.
//!
//! ```text
//! cargo run --release --example bench_redis --features redis [-- <messages> [<runs> [<row>]]]
//! ```
//!
//! `<row>` runs one row alone, to profile it (`perf record`): `single-hand`,
//! `single-store`, `single-idem`, `single-memory`, or the same with `batch-`.
//!
//! Reads `REDIS_URL` (default `redis://127.0.0.1:6379`). Prints messages/s
//! and the ratios; each figure is the best of `<runs>` (default 3)
//! interleaved runs, with the worst beside it (a shared machine is noisy),
//! and the idem / hand-loop ratio of the medians as well. One idem message is two round trips (claim, then
//! completion after the handler) and three Redis commands (`SET … NX GET PX`;
//! `GET` + `SET` inside the completion script, one script call per batch),
//! where `redis-benchmark` sends one `SET` per request.

#[path = "support/bench.rs"]
mod bench;

use std::future::Future;
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::{Duration, Instant};

use idem::source::memory::{MemoryBroker, Message};
use idem::store::memory::MemoryStore;
use idem::store::redis::RedisStore;
use idem::store::{Claim, ClaimRequest, Claimed, LeaseStore};
use idem::{CancellationToken, Fingerprint, Key, Runtime, idempotent};
use serde::Deserialize;

const SINGLE_DEPTH: usize = 16;
const BATCH: usize = 64;

#[derive(Debug, Deserialize)]
struct Msg {
    #[allow(dead_code)]
    id: String,
}

#[idempotent(
    topic = "single",
    key = "id",
    store = "redis",
    name = "bench-single",
    ttl = "10m"
)]
async fn bench_single(_m: Msg) -> Result<(), String> {
    Ok(())
}

#[idempotent(
    topic = "batch",
    key = "id",
    store = "redis",
    name = "bench-batch",
    ttl = "10m",
    ack = "batch"
)]
async fn bench_batch(_m: Msg) -> Result<(), String> {
    Ok(())
}

/// The same handlers on the in-memory store: what the runtime and the
/// in-memory broker cost without Redis (the ceiling for idem's rows).
#[idempotent(
    topic = "single",
    key = "id",
    store = "memory",
    name = "mem-single",
    ttl = "10m"
)]
async fn mem_single(_m: Msg) -> Result<(), String> {
    Ok(())
}

#[idempotent(
    topic = "batch",
    key = "id",
    store = "memory",
    name = "mem-batch",
    ttl = "10m",
    ack = "batch"
)]
async fn mem_batch(_m: Msg) -> Result<(), String> {
    Ok(())
}

#[idempotent(
    topic = "hot",
    key = "id",
    store = "redis",
    name = "bench-hot",
    ttl = "10m"
)]
async fn bench_hot(_m: Msg) -> Result<(), String> {
    Ok(())
}

fn msg(id: &str) -> Message {
    Message::new(format!(r#"{{"id":"{id}"}}"#))
}

/// Runs `handler` over `messages` until the broker is idle; messages/s.
async fn run_idem<S: idem::DedupStore<M>, M>(
    store: S,
    handler: &str,
    topic: &str,
    messages: impl Iterator<Item = Message>,
    depth: usize,
) -> f64 {
    let broker = MemoryBroker::new();
    let mut n = 0u64;
    for m in messages {
        broker.publish(topic, m);
        n += 1;
    }
    let rt = Runtime::builder(broker.clone())
        .store(store)
        .handlers([handler])
        .concurrency(depth)
        .build()
        .expect("runtime");
    let stop = CancellationToken::new();
    let started = Instant::now();
    let idle = async {
        broker.wait_idle().await;
        stop.cancel();
    };
    tokio::join!(rt.run(stop.clone()), idle);
    let rate = n as f64 / started.elapsed().as_secs_f64();
    let s = rt.stats_of(handler).unwrap_or_default();
    assert_eq!(
        s.processed + s.duplicate,
        n,
        "every message is processed or a duplicate: {s:?}"
    );
    rate
}

/// The store's completion script (see `idem_runtime::store::redis`).
const COMPLETE_LUA: &str = r"
local out = {}
for i = 1, #KEYS do
  local lease, done, ttl = ARGV[3 * i - 2], ARGV[3 * i - 1], ARGV[3 * i]
  local v = redis.call('GET', KEYS[i])
  if v == done then
    out[i] = 1
  elseif v and v ~= lease then
    out[i] = 0
  else
    if ttl == '0' then
      redis.call('SET', KEYS[i], done)
    else
      redis.call('SET', KEYS[i], done, 'PX', ttl)
    end
    out[i] = v and 1 or 2
  end
end
return out
";

/// The store's commands, hand-written: `depth` keys per claim pipeline and
/// per completion pipeline, `tasks` such loops at once.
async fn run_hand_loop(url: &str, prefix: &str, n: usize, depth: usize, tasks: usize) -> f64 {
    let client = redis::Client::open(url).expect("url");
    let conn = client
        .get_connection_manager()
        .await
        .expect("hand loop connection");
    let script = Arc::new(redis::Script::new(COMPLETE_LUA));
    script
        .prepare_invoke()
        .load_async(&mut conn.clone())
        .await
        .expect("load script");
    let per_task = n / tasks;
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let mut conn = conn.clone();
        let script = script.clone();
        let prefix = prefix.to_owned();
        set.spawn(async move {
            let mut done = 0;
            while done < per_task {
                let keys: Vec<String> = (done..(done + depth).min(per_task))
                    .map(|i| format!("{prefix}:{{h:{t}-{i}}}"))
                    .collect();
                let lease = "p|0000000000000001|0000000000000002";
                let mut claim = redis::pipe();
                for k in &keys {
                    claim
                        .cmd("SET")
                        .arg(k)
                        .arg(lease)
                        .arg("NX")
                        .arg("GET")
                        .arg("PX")
                        .arg(30_000);
                }
                let _: Vec<redis::Value> = claim.query_async(&mut conn).await.expect("claim");
                let mut complete = redis::cmd("EVALSHA");
                complete.arg(script.get_hash()).arg(keys.len()).arg(&keys);
                for _ in &keys {
                    complete
                        .arg(lease)
                        .arg("d|0000000000000002|0000000000000001")
                        .arg(600_000);
                }
                let _: redis::Value = complete.query_async(&mut conn).await.expect("complete");
                done += keys.len();
            }
        });
    }
    while set.join_next().await.is_some() {}
    (per_task * tasks) as f64 / started.elapsed().as_secs_f64()
}

/// The store's API without the runtime: `claim` then `commit`, `depth`
/// keys per call, `tasks` loops at once. Separates the store's own cost
/// from the runtime's (decode, key, spans, broker, acks).
async fn run_store_loop(
    store: &RedisStore,
    tag: &str,
    n: usize,
    depth: usize,
    tasks: usize,
) -> f64 {
    let per_task = n / tasks;
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for t in 0..tasks {
        let store = store.clone();
        let tag = tag.to_owned();
        set.spawn(async move {
            let mut done = 0;
            while done < per_task {
                let keys: Vec<Key> = (done..(done + depth).min(per_task))
                    .map(|i| Key::new(format!("{tag}{t}-{i}")).expect("key"))
                    .collect();
                let requests: Vec<ClaimRequest<'_>> = keys
                    .iter()
                    .map(|key| ClaimRequest {
                        handler: "bench-store",
                        key,
                        fingerprint: Some(Fingerprint::new(7)),
                        message_id: "m",
                        lease: Duration::from_secs(30),
                        ttl: Some(Duration::from_secs(600)),
                    })
                    .collect();
                let claims = store.claim_all(&requests).await.expect("claim");
                let claimed: Vec<Claimed<'_>> = requests
                    .iter()
                    .zip(&claims)
                    .filter_map(|(request, c)| match c {
                        Claim::New { token } => Some(Claimed {
                            request,
                            token: *token,
                            result: None,
                        }),
                        _ => None,
                    })
                    .collect();
                store.complete_all(&claimed).await.expect("commit");
                done += keys.len();
            }
        });
    }
    while set.join_next().await.is_some() {}
    (per_task * tasks) as f64 / started.elapsed().as_secs_f64()
}

/// `redis-benchmark` for `SET … NX PX` at a depth; requests/s.
fn redis_benchmark(url: &str, n: usize, clients: usize, pipeline: usize) -> Option<f64> {
    let info = redis::Client::open(url).ok()?.get_connection_info().clone();
    let (host, port) = match info.addr() {
        redis::ConnectionAddr::Tcp(h, p) => (h.clone(), *p),
        _ => return None,
    };
    let mut cmd = Command::new("redis-benchmark");
    cmd.args(["-h", &host, "-p", &port.to_string()])
        .args(["-n", &n.to_string(), "-c", &clients.to_string()])
        .args(["-P", &pipeline.to_string(), "-r", "1000000", "--csv"])
        .args(["SET", "idem:bench:__rand_int__", "x", "NX", "PX", "30000"]);
    if let Some(pw) = info.redis_settings().password() {
        // Not `-a`: the environment keeps it off the process list.
        cmd.env("REDISCLI_AUTH", pw);
    }
    let out = match cmd.output() {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            eprintln!(
                "redis-benchmark failed: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            return None;
        }
        Err(e) => {
            eprintln!("cannot run redis-benchmark ({e}): install redis-tools");
            return None;
        }
    };
    // `"SET idem:bench:…","<rps>",…` on the last line.
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()?
        .split(',')
        .nth(1)?
        .trim_matches('"')
        .parse()
        .ok()
}

async fn clean(url: &str, prefix: &str) {
    let Ok(client) = redis::Client::open(url) else {
        return;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return;
    };
    let mut cursor = 0u64;
    loop {
        let Ok((next, keys)): redis::RedisResult<(u64, Vec<String>)> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(5000)
            .query_async(&mut conn)
            .await
        else {
            return;
        };
        if !keys.is_empty() {
            let _: redis::RedisResult<()> =
                redis::cmd("UNLINK").arg(&keys).query_async(&mut conn).await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

/// `used_cpu_user + used_cpu_sys` of redis-server (`INFO cpu`), seconds.
async fn redis_cpu(url: &str) -> f64 {
    let Ok(client) = redis::Client::open(url) else {
        return 0.0;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return 0.0;
    };
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(&mut conn)
        .await
        .unwrap_or_default();
    info.lines()
        .filter(|l| l.starts_with("used_cpu_user:") || l.starts_with("used_cpu_sys:"))
        .filter_map(|l| l.split_once(':')?.1.trim().parse::<f64>().ok())
        .sum()
}

/// A measurement: its rate, and the CPU time it cost per message here and
/// in redis-server. On 2 CPUs with both processes busy, throughput is bound
/// by their sum: `CPUs / (client + server)`.
#[derive(Clone, Copy, Default)]
struct Figure {
    rate: f64,
    client_us: f64,
    server_us: f64,
}

async fn metered(url: &str, n: usize, run: impl Future<Output = f64>) -> Figure {
    let (client, server) = (bench::cpu_time(), redis_cpu(url).await);
    let rate = run.await;
    let client = bench::cpu_time().saturating_sub(client).as_secs_f64();
    let server = redis_cpu(url).await - server;
    Figure {
        rate,
        client_us: client * 1e6 / n as f64,
        server_us: server * 1e6 / n as f64,
    }
}

/// The median CPU cost of a row's runs, and how many CPUs it kept busy.
fn cpu_row(name: &str, figures: &[Figure]) -> f64 {
    let client = bench::median(figures.iter().map(|f| f.client_us).collect());
    let server = bench::median(figures.iter().map(|f| f.server_us).collect());
    let rate = bench::median(figures.iter().map(|f| f.rate).collect());
    println!(
        "    {name:<40} {client:>6.1} µs here + {server:>5.1} µs redis-server = {:>6.1} µs/msg, {:.2} CPUs busy",
        client + server,
        rate * (client + server) / 1e6
    );
    client + server
}

/// The best of several runs: on a shared machine the slow runs measure the
/// neighbours, not the code.
fn best(runs: &[f64]) -> f64 {
    runs.iter().copied().fold(0.0, f64::max)
}

fn median(runs: &[f64]) -> f64 {
    bench::median(runs.to_vec())
}

/// One row per figure: best rate, and the spread of the runs.
fn row(name: &str, runs: &[f64], base: Option<f64>, base_name: &str) {
    let rate = best(runs);
    let worst = runs.iter().copied().fold(f64::INFINITY, f64::min);
    let ratio = base.map_or(String::new(), |b| {
        format!("{:>6.1} % of {base_name}", 100.0 * rate / b)
    });
    println!("  {name:<44} {rate:>9.0} msg/s (worst {worst:>7.0})  {ratio}");
}

#[tokio::main]
async fn main() -> ExitCode {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(50_000);
    let reps: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3).max(1);
    // One row alone, to profile it (`perf record`): `single-idem`, `batch-hand`, …
    let only = args.next();
    let on = |mode: &str, row: &str| {
        only.as_deref()
            .is_none_or(|o| o.split_once('-') == Some((mode, row)))
    };
    let run = format!("idem-bench-{}", std::process::id());
    let store = match RedisStore::builder(&url).prefix(&run).connect().await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}\nstart Redis (./scripts/services.sh does) or set REDIS_URL");
            return ExitCode::FAILURE;
        }
    };
    let shown = format!("{store:?}");
    println!(
        "{n} messages per measurement (batch: {}), best of {reps} runs, Redis at {}, release build: {}",
        n * 2,
        shown.split('"').nth(1).unwrap_or("?"),
        !cfg!(debug_assertions)
    );

    // Warm up connections, scripts and allocators.
    run_idem(
        store.clone(),
        "bench-single",
        "single",
        (0..2_000).map(|i| msg(&format!("w{i}"))),
        SINGLE_DEPTH,
    )
    .await;

    // [redis-benchmark, hand loop, store API, idem, idem on memory] × (single, batch)
    let mut single: [Vec<Figure>; 5] = Default::default();
    let mut batch: [Vec<Figure>; 5] = Default::default();
    let rb_figure = |rate| Figure {
        rate,
        ..Figure::default()
    };
    for r in 0..reps {
        // Each step's rate; the runs are interleaved so that a noisy moment
        // does not hit one row only.
        if only.is_none()
            && let Some(rb) = redis_benchmark(&url, n, SINGLE_DEPTH, 1)
        {
            single[0].push(rb_figure(rb));
        }
        let u = url.as_str();
        if on("single", "hand") {
            single[1].push(
                metered(
                    u,
                    n,
                    run_hand_loop(u, &format!("{run}-hs{r}"), n, 1, SINGLE_DEPTH),
                )
                .await,
            );
        }
        if on("single", "store") {
            single[2].push(
                metered(
                    u,
                    n,
                    run_store_loop(&store, &format!("ss{r}-"), n, 1, SINGLE_DEPTH),
                )
                .await,
            );
        }
        if on("single", "idem") {
            single[3].push(
                metered(
                    u,
                    n,
                    run_idem(
                        store.clone(),
                        "bench-single",
                        "single",
                        (0..n).map(|i| msg(&format!("s{r}-{i}"))),
                        SINGLE_DEPTH,
                    ),
                )
                .await,
            );
        }
        if on("single", "memory") {
            single[4].push(
                metered(
                    u,
                    n,
                    run_idem(
                        MemoryStore::new(),
                        "mem-single",
                        "single",
                        (0..n).map(|i| msg(&format!("s{i}"))),
                        SINGLE_DEPTH,
                    ),
                )
                .await,
            );
        }
        if only.is_none()
            && let Some(rb) = redis_benchmark(&url, n * 2, 1, BATCH)
        {
            batch[0].push(rb_figure(rb));
        }
        if on("batch", "hand") {
            batch[1].push(
                metered(
                    u,
                    n * 2,
                    run_hand_loop(u, &format!("{run}-hb{r}"), n * 2, BATCH, 1),
                )
                .await,
            );
        }
        if on("batch", "store") {
            batch[2].push(
                metered(
                    u,
                    n * 2,
                    run_store_loop(&store, &format!("sb{r}-"), n * 2, BATCH, 1),
                )
                .await,
            );
        }
        if on("batch", "idem") {
            batch[3].push(
                metered(
                    u,
                    n * 2,
                    run_idem(
                        store.clone(),
                        "bench-batch",
                        "batch",
                        (0..n * 2).map(|i| msg(&format!("b{r}-{i}"))),
                        BATCH,
                    ),
                )
                .await,
            );
        }
        if on("batch", "memory") {
            batch[4].push(
                metered(
                    u,
                    n * 2,
                    run_idem(
                        MemoryStore::new(),
                        "mem-batch",
                        "batch",
                        (0..n * 2).map(|i| msg(&format!("b{i}"))),
                        BATCH,
                    ),
                )
                .await,
            );
        }
        clean(&url, &run).await;
    }

    if let Some(only) = &only {
        for (mode, figures) in [("single", &single), ("batch", &batch)] {
            for (i, name) in ["hand", "store", "idem", "memory"].iter().enumerate() {
                if on(mode, name) {
                    println!("{only}:");
                    cpu_row(name, &figures[i + 1]);
                }
            }
        }
        clean(&url, &run).await;
        return ExitCode::SUCCESS;
    }

    for (title, figures, rb_name) in [
        (
            format!("single (ack = \"auto\", {SINGLE_DEPTH} messages in flight)"),
            &single,
            "redis-benchmark SET NX PX (-c 16 -P 1)",
        ),
        (
            format!("batch (ack = \"batch\", {BATCH} per batch, one batch in flight)"),
            &batch,
            "redis-benchmark SET NX PX (-c 1 -P 64)",
        ),
    ] {
        println!("\n{title}");
        let rows: Vec<Vec<f64>> = figures
            .iter()
            .map(|f| f.iter().map(|f| f.rate).collect())
            .collect();
        let rb = (!rows[0].is_empty()).then(|| best(&rows[0]));
        if rb.is_some() {
            row(rb_name, &rows[0], None, "");
        }
        row(
            "hand-written loop, same commands",
            &rows[1],
            rb,
            "redis-benchmark",
        );
        row(
            "RedisStore claim + commit, no runtime",
            &rows[2],
            rb,
            "redis-benchmark",
        );
        row("idem", &rows[3], rb, "redis-benchmark");
        row(
            "idem vs hand-written loop",
            &rows[3],
            Some(best(&rows[1])),
            "hand loop",
        );
        println!(
            "  idem vs hand-written loop, median of the runs: {:.3} ({:.0} vs {:.0} msg/s)",
            median(&rows[3]) / median(&rows[1]),
            median(&rows[3]),
            median(&rows[1])
        );
        row(
            "idem on store = \"memory\" (no Redis: ceiling)",
            &rows[4],
            None,
            "",
        );
        if let Some(rb) = rb {
            let commands = best(&rows[3]) * 3.0;
            println!(
                "  Redis runs 3 commands per idem message (SET NX GET PX; GET + SET in the completion script): {commands:.0} commands/s = {:.1} % of redis-benchmark's SET rate",
                100.0 * commands / rb
            );
        }
        println!("  CPU per message (medians; /proc/self/stat and redis-server's INFO cpu):");
        let hand = cpu_row("hand-written loop", &figures[1]);
        cpu_row("RedisStore claim + commit, no runtime", &figures[2]);
        let idem = cpu_row("idem", &figures[3]);
        cpu_row("idem on store = \"memory\"", &figures[4]);
        println!(
            "  with the CPUs saturated, idem / hand loop is bound by their CPU per message: {:.3}",
            hand / idem
        );
    }

    // Hot duplicates: 1,000 keys processed once, then 20 copies of each
    // arrive again (the duplicates are done, never in progress).
    println!("\nhot duplicates (1,000 done keys seen 20 times each, {SINGLE_DEPTH} in flight)");
    let hot_keys = 1_000;
    let copies = 20;
    let mut rates = Vec::new();
    for (label, cache) in [
        ("cache tier off", false),
        ("cache tier on (10,000 entries)", true),
    ] {
        let prefix = format!("{run}-hot-{cache}");
        let mut b = RedisStore::builder(&url).prefix(&prefix);
        if cache {
            b = b.local_cache(10_000, Duration::from_secs(60));
        }
        let s = b.connect().await.expect("hot store");
        run_idem(
            s.clone(),
            "bench-hot",
            "hot",
            (0..hot_keys).map(|i| msg(&format!("h{i}"))),
            SINGLE_DEPTH,
        )
        .await;
        let before = s.stats();
        let mut runs = Vec::new();
        for _ in 0..reps {
            runs.push(
                run_idem(
                    s.clone(),
                    "bench-hot",
                    "hot",
                    (0..copies).flat_map(|_| (0..hot_keys).map(|i| msg(&format!("h{i}")))),
                    SINGLE_DEPTH,
                )
                .await,
            );
        }
        let after = s.stats();
        row(label, &runs, None, "");
        println!(
            "    round trips {}, cache hits {} (all runs)",
            after.round_trips - before.round_trips,
            after.cache_hits - before.cache_hits
        );
        rates.push(best(&runs));
        clean(&url, &prefix).await;
    }
    if let [off, on] = rates[..] {
        println!("  cache tier speed-up on hot duplicates: {:.1}x", on / off);
    }
    clean(&url, &run).await;
    ExitCode::SUCCESS
}
