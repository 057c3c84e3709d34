//! The runtime's own cost per message, without I/O: the in-memory broker,
//! the memory store and a handler that does nothing, one message at a time
//! (`ack = "auto"`, 16 in flight) or in batches of 64 (`ack = "batch"`).
//!
//! ```text
//! cargo run --release --example bench_overhead -- <single|batch|publish> <messages>
//! ```
//!
//! `publish` only publishes the messages (no runtime): the baseline that
//! the other two modes are measured against.
//!
//! Prints messages/s, which is noisy on a shared machine. The stable figure
//! is the instruction count: `scripts/callgrind.sh` runs this binary under
//! `valgrind --tool=callgrind` at two message counts per mode and prints
//! instructions per message (the difference of the two runs divided by the
//! difference of the counts, so start-up costs cancel out), then the same
//! for `publish`, and the runtime's share as the difference of the two:
//! whole-process counts only, so no figure depends on what the compiler
//! inlined where.

use std::process::ExitCode;
use std::time::Instant;

use idem::source::memory::{MemoryBroker, Message};
use idem::store::memory::MemoryStore;
use idem::{Runtime, idempotent};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct OrderPlaced {
    order_id: String,
    #[allow(dead_code)]
    amount_cents: u64,
}

#[idempotent(
    topic = "single",
    key = "order_id",
    store = "memory",
    name = "overhead-single"
)]
async fn single(order: OrderPlaced) -> Result<(), String> {
    std::hint::black_box(order);
    Ok(())
}

#[idempotent(
    topic = "batch",
    key = "order_id",
    store = "memory",
    name = "overhead-batch",
    ack = "batch"
)]
async fn batch(order: OrderPlaced) -> Result<(), String> {
    std::hint::black_box(order);
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (mode, n) = match (
        args.get(1).map(String::as_str),
        args.get(2).and_then(|n| n.parse::<usize>().ok()),
    ) {
        (Some(mode @ ("single" | "batch" | "publish")), Some(n)) => (mode.to_owned(), n),
        _ => {
            eprintln!("usage: bench_overhead <single|batch|publish> <messages>");
            return ExitCode::FAILURE;
        }
    };
    let (handler, concurrency) = match mode.as_str() {
        "single" => ("overhead-single", 16),
        _ => ("overhead-batch", 64),
    };
    let broker = MemoryBroker::new();
    for i in 0..n {
        let body = format!(
            r#"{{"order_id":"ord-{i:08}","amount_cents":{}}}"#,
            100 + i % 9_900
        );
        broker.publish(&mode, Message::new(body).id(format!("m-{i}")));
    }
    if mode == "publish" {
        std::hint::black_box(&broker);
        return ExitCode::SUCCESS;
    }
    let runtime = Runtime::builder(broker.clone())
        .store(MemoryStore::new())
        .handlers([handler])
        .concurrency(concurrency)
        .build()
        .expect("runtime");
    let started = Instant::now();
    runtime.run_until(broker.wait_idle()).await;
    let elapsed = started.elapsed();
    let stats = runtime.stats_of(handler).expect("stats");
    if stats.processed != n as u64 {
        eprintln!("processed {} of {n}: {stats:?}", stats.processed);
        return ExitCode::FAILURE;
    }
    println!(
        "{mode}: {n} messages in {:.3} s, {:.0} msg/s",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64()
    );
    ExitCode::SUCCESS
}
