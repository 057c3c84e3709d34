//! Shared pieces of the benchmark examples (`bench_stores`, `bench_soak`):
//!
//! - [`Generator`]: an in-process [`Source`] that makes `total` messages on
//!   demand and forgets each one once it is acked, so that a run of a
//!   million messages holds no broker state (the test broker,
//!   `MemoryBroker`, keeps every message and event for its assertions). Each
//!   delivery's receipt carries the instant it was fetched; the ack records
//!   fetch→ack into a [`Histogram`]: the latency per message through the
//!   whole pipeline (claim, handler, commit, ack).
//! - [`Histogram`]: log buckets (2 % wide), fixed size: p50/p99 without a
//!   per-message allocation.
//! - [`rss_kib`]: `VmRSS`/`VmHWM` of this process from `/proc/self/status`;
//!   [`cpu_time`]: its CPU time from `/proc/self/stat`.
//! - [`Csv`]: appends rows to the CSV `scripts/bench.sh` plots.
//! - [`pgbench`]: PostgreSQL's own limit (`benches/pgbench/*.sql`), and
//!   [`tool_output`] / [`number_after`] to run such a tool and read its
//!   figure.
//!
//! Loaded with `#[path = "support/bench.rs"] mod bench;` (`bench_brokers`:
//! `mod bench_support`).
#![allow(dead_code, unreachable_pub)]

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use idem::source::{DeadLetter, Source, SourceError, SubscribeSpec, Subscription};
use idem::{Delivery, Receipt};
use tokio::sync::Notify;

/// Log-bucketed latency histogram: bucket `i` holds values in
/// `[1.02^i, 1.02^(i+1))` microseconds.
pub struct Histogram {
    buckets: Mutex<Vec<u64>>,
}

const BUCKETS: usize = 1200; // 1.02^1200 µs ≈ 2e10 µs: more than enough

fn bucket_of(us: f64) -> usize {
    ((us.max(1.0).ln() / 1.02f64.ln()) as usize).min(BUCKETS - 1)
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: Mutex::new(vec![0; BUCKETS]),
        }
    }
}

impl Histogram {
    pub fn record(&self, d: Duration) {
        let i = bucket_of(d.as_secs_f64() * 1e6);
        self.buckets.lock().unwrap()[i] += 1;
    }

    pub fn record_n(&self, d: Duration, n: u64) {
        let i = bucket_of(d.as_secs_f64() * 1e6);
        self.buckets.lock().unwrap()[i] += n;
    }

    /// The `q` quantile (0..=1) in milliseconds (the bucket's midpoint).
    pub fn quantile_ms(&self, q: f64) -> f64 {
        let b = self.buckets.lock().unwrap();
        let total: u64 = b.iter().sum();
        if total == 0 {
            return 0.0;
        }
        let target = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in b.iter().enumerate() {
            seen += n;
            if seen >= target {
                return 1.02f64.powf(i as f64 + 0.5) / 1000.0;
            }
        }
        0.0
    }

    pub fn reset(&self) {
        self.buckets.lock().unwrap().iter_mut().for_each(|n| *n = 0);
    }
}

/// The payload of message `i`: `{"id":"<prefix>-<i>","amount":<i>}`.
pub fn payload(prefix: &str, i: u64) -> Vec<u8> {
    format!("{{\"id\":\"{prefix}-{i}\",\"amount\":{i}}}").into_bytes()
}

struct Inner {
    prefix: String,
    total: u64,
    next: AtomicU64,
    redo: Mutex<VecDeque<u64>>,
    settled: AtomicU64,
    dead: AtomicU64,
    base: Instant,
    latency: Histogram,
    more: Notify,
    done: Notify,
}

/// A source of `total` generated messages on one topic (any topic name is
/// accepted); cheap to clone.
#[derive(Clone)]
pub struct Generator(Arc<Inner>);

impl Generator {
    /// `total` messages with ids `<prefix>-0 …`.
    pub fn new(prefix: impl Into<String>, total: u64) -> Self {
        Generator(Arc::new(Inner {
            prefix: prefix.into(),
            total,
            next: AtomicU64::new(0),
            redo: Mutex::new(VecDeque::new()),
            settled: AtomicU64::new(0),
            dead: AtomicU64::new(0),
            base: Instant::now(),
            latency: Histogram::default(),
            more: Notify::new(),
            done: Notify::new(),
        }))
    }

    /// Messages acked or dead-lettered so far.
    pub fn settled(&self) -> u64 {
        self.0.settled.load(Ordering::Acquire)
    }

    /// Whether every message has been handed out once and none waits for
    /// redelivery.
    pub fn exhausted(&self) -> bool {
        self.0.next.load(Ordering::Acquire) >= self.0.total
            && self.0.redo.lock().unwrap().is_empty()
    }

    /// Messages dead-lettered so far.
    pub fn dead(&self) -> u64 {
        self.0.dead.load(Ordering::Acquire)
    }

    /// fetch→ack latencies.
    pub fn latency(&self) -> &Histogram {
        &self.0.latency
    }

    /// Resolves once every message is settled.
    pub async fn wait_done(&self) {
        loop {
            let notified = self.0.done.notified();
            if self.settled() >= self.0.total {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(20), notified).await;
        }
    }

    /// Up to `max` deliveries (empty after 20 ms when nothing is left to hand out).
    pub async fn take(&self, max: usize) -> Vec<Delivery> {
        let inner = &*self.0;
        loop {
            let mut out = Vec::with_capacity(max);
            {
                let mut redo = inner.redo.lock().unwrap();
                while out.len() < max {
                    let Some(i) = redo.pop_front() else { break };
                    out.push(self.delivery(i));
                }
            }
            while out.len() < max {
                let i = inner.next.fetch_add(1, Ordering::AcqRel);
                if i >= inner.total {
                    inner.next.store(inner.total, Ordering::Release);
                    break;
                }
                out.push(self.delivery(i));
            }
            if !out.is_empty() {
                return out;
            }
            let notified = inner.more.notified();
            if tokio::time::timeout(Duration::from_millis(20), notified)
                .await
                .is_err()
            {
                return out;
            }
        }
    }

    fn delivery(&self, i: u64) -> Delivery {
        let fetched = self.0.base.elapsed().as_nanos() as i64;
        Delivery::new(i.to_string(), "bench", payload(&self.0.prefix, i))
            .with_receipt(Receipt::pair(i as i64, fetched))
    }

    /// Settles one delivery: records its latency.
    pub fn settle(&self, d: &Delivery) {
        if let Some((_, fetched)) = d.receipt.as_pair() {
            let now = self.0.base.elapsed().as_nanos() as i64;
            self.0
                .latency
                .record(Duration::from_nanos((now - fetched).max(0) as u64));
        }
        let n = self.0.settled.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= self.0.total {
            self.0.done.notify_waiters();
        }
    }
}

impl Source for Generator {
    type Subscription = Generator;

    async fn subscribe(&self, _spec: SubscribeSpec<'_>) -> Result<Generator, SourceError> {
        Ok(self.clone())
    }
}

impl Subscription for Generator {
    async fn fetch(&self, max: usize) -> Result<Vec<Delivery>, SourceError> {
        Ok(self.take(max.max(1)).await)
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), SourceError> {
        self.settle(delivery);
        Ok(())
    }

    async fn ack_many(&self, deliveries: &[&Delivery]) -> Result<(), SourceError> {
        for d in deliveries {
            self.settle(d);
        }
        Ok(())
    }

    async fn nack(&self, delivery: &Delivery, _delay: Duration) -> Result<(), SourceError> {
        if let Some((i, _)) = delivery.receipt.as_pair() {
            self.0.redo.lock().unwrap().push_back(i as u64);
            self.0.more.notify_waiters();
        }
        Ok(())
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery,
        letter: &DeadLetter,
    ) -> Result<(), SourceError> {
        eprintln!("dead letter {}: {}", delivery.id, letter.reason);
        self.0.dead.fetch_add(1, Ordering::AcqRel);
        self.settle(delivery);
        Ok(())
    }
}

/// `(VmRSS, VmHWM)` of this process in KiB (0 where `/proc` is absent).
pub fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU time (user + system, all threads) this process has used so far, from
/// `/proc/self/stat` (in clock ticks of 10 ms; zero where `/proc` is absent).
/// Over a run of seconds the resolution is a fraction of a percent.
pub fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name, in parentheses, may hold spaces: count from after it
    // (field 3 onwards); utime and stime are fields 14 and 15.
    let mut fields = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .skip(11)
        .map(|f| f.parse::<u64>().unwrap_or(0));
    let ticks = fields.next().unwrap_or(0) + fields.next().unwrap_or(0);
    // USER_HZ is 100 on every Linux architecture we run.
    Duration::from_millis(ticks * 10)
}

/// The median of `v` (empty: 0).
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Appends rows to a CSV file (header written when the file is new). The
/// path comes from the `BENCH_CSV` env var, or `default`.
pub struct Csv {
    file: std::fs::File,
}

impl Csv {
    pub fn open(default: &str, header: &str) -> std::io::Result<Csv> {
        let path = std::env::var("BENCH_CSV").unwrap_or_else(|_| default.into());
        if let Some(dir) = std::path::Path::new(&path).parent() {
            std::fs::create_dir_all(dir)?;
        }
        let new = std::fs::metadata(&path).map_or(true, |m| m.len() == 0);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        if new {
            writeln!(file, "{header}")?;
        }
        Ok(Csv { file })
    }

    pub fn row(&mut self, fields: &[&dyn std::fmt::Display]) {
        let line: Vec<String> = fields.iter().map(|f| f.to_string()).collect();
        let _ = writeln!(self.file, "{}", line.join(","));
    }
}

/// The tables `benches/pgbench/*.sql` write, in the schema pgbench runs in.
pub const PGBENCH_TABLES: &str = "CREATE TABLE pgb_keys (k text PRIMARY KEY);
     CREATE TABLE pgb_effects (id text NOT NULL, amount bigint NOT NULL)";

/// The stdout of a finished `tool` run, or why there is none.
pub fn tool_output(
    tool: &str,
    output: std::io::Result<std::process::Output>,
) -> Result<String, String> {
    match output {
        Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).into_owned()),
        Ok(o) => Err(format!(
            "{tool} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("{tool} not run: {e}")),
    }
}

/// The number after the last `marker` in `out`.
pub fn number_after(out: &str, marker: &str) -> Option<f64> {
    let at = out.rfind(marker)? + marker.len();
    out[at..]
        .trim_start()
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()?
        .parse()
        .ok()
}

/// PostgreSQL's own limit in messages/s: `pgbench` with
/// `benches/pgbench/single.sql` (`batch` 1) or `batch.sql` (`batch` rows per
/// transaction), `clients` connections, `transactions` per client, in
/// `schema` (which must hold [`PGBENCH_TABLES`]), on `url`. tps × `batch`.
pub fn pgbench(
    url: &str,
    schema: &str,
    clients: usize,
    batch: usize,
    transactions: u64,
) -> Result<f64, String> {
    let root = env!("CARGO_MANIFEST_DIR");
    let script = if batch == 1 {
        format!("{root}/benches/pgbench/single.sql")
    } else {
        format!("{root}/benches/pgbench/batch.sql")
    };
    let output = std::process::Command::new("pgbench")
        .env("PGOPTIONS", format!("-c search_path={schema}"))
        .args([
            "-n",
            "-f",
            script.as_str(),
            "-D",
            format!("batch={batch}").as_str(),
        ])
        .args(["-c", clients.to_string().as_str()])
        .args(["-j", clients.min(2).to_string().as_str()])
        .args(["-t", transactions.to_string().as_str(), url])
        .output();
    let out = tool_output("pgbench", output)?;
    let tps = number_after(&out, "tps = ").ok_or_else(|| format!("pgbench: no tps in {out:?}"))?;
    Ok(tps * batch as f64)
}
