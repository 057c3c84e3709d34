//! Fuzzing decode + key extraction through the real runtime: random
//! payloads (arbitrary bytes, well-formed JSON with hostile values, JSON
//! with bytes flipped or cut off) and random headers (any name, any bytes)
//! go through handlers of every key shape. Property: every message ends
//! settled (acked, or dead-lettered with a reason), nothing panics or hangs,
//! and no key's effect is applied twice.
//!
//! CI runs it for `FUZZ_SECONDS` (default 10). The long run:
//!
//! ```text
//! FUZZ_SECONDS=3600 cargo test --release --test fuzz_input -- --nocapture
//! ```

mod common;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use idem::source::memory::{BrokerEvent, MemoryBroker, Message};
use idem::store::memory::MemoryStore;
use idem::{Runtime, idempotent};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde::Deserialize;

const TOPIC: &str = "fuzz";
const HANDLERS: [&str; 5] = [
    "fz-field",
    "fz-composite",
    "fz-header",
    "fz-nested",
    "fz-batch",
];

#[derive(Debug, Default, Deserialize)]
struct Customer {
    id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Order {
    order_id: String,
    tenant: u64,
    #[serde(default)]
    customer: Customer,
    #[serde(default)]
    fail: bool,
}

/// (handler, key) → times the effect was applied.
static EFFECTS: Mutex<Option<HashMap<(String, String), u32>>> = Mutex::new(None);

fn effect(handler: &str, key: String) -> Result<(), String> {
    let mut g = EFFECTS.lock().unwrap();
    *g.get_or_insert_with(HashMap::new)
        .entry((handler.to_owned(), key))
        .or_default() += 1;
    Ok(())
}

#[idempotent(
    topic = "fuzz",
    key = "order_id",
    store = "memory",
    name = "fz-field",
    retries = 1,
    backoff = "1ms..1ms"
)]
async fn fz_field(o: Order) -> Result<(), String> {
    if o.fail {
        return Err("refused".into());
    }
    effect("fz-field", o.order_id)
}

#[idempotent(topic = "fuzz", key = ("tenant", "order_id"), store = "memory", name = "fz-composite", max_key_len = 64)]
async fn fz_composite(o: Order) -> Result<(), String> {
    effect("fz-composite", format!("{}/{}", o.tenant, o.order_id))
}

#[idempotent(topic = "fuzz", key = header("Idempotency-Key"), store = "memory", name = "fz-header")]
async fn fz_header(o: Order, d: &idem::Delivery) -> Result<(), String> {
    let _ = o;
    // The raw bytes: two different invalid-UTF-8 keys must not look alike.
    let key = format!("{:?}", d.headers.get("Idempotency-Key").unwrap_or_default());
    effect("fz-header", key)
}

#[idempotent(
    topic = "fuzz",
    key = "customer.id",
    store = "memory",
    name = "fz-nested",
    on_missing_key = "dead_letter"
)]
async fn fz_nested(o: Order) -> Result<(), String> {
    let id = o.customer.id.unwrap_or_default();
    effect("fz-nested", id)
}

#[idempotent(
    topic = "fuzz",
    key = "order_id",
    store = "memory",
    name = "fz-batch",
    ack = "batch",
    retries = 1,
    backoff = "1ms..1ms"
)]
async fn fz_batch(o: Order) -> Result<(), String> {
    if o.fail {
        return Err("refused".into());
    }
    effect("fz-batch", o.order_id)
}

/// Hostile strings: empty, unicode, control characters, separators idem
/// uses in composite keys, very long.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9]{1,8}",
        ".{0,12}",
        "[/\\\\:|\\x00-\\x1f]{1,6}",
        "k{60,80}",
    ]
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::{Value, json};
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        text().prop_map(Value::String),
        Just(json!({"id": "nested"})),
        Just(json!([1, 2, 3])),
    ]
}

/// A payload: an order with every field maybe missing or of a wrong type.
fn payload() -> impl Strategy<Value = Vec<u8>> {
    let order = (
        prop::option::of(prop_oneof![
            text().prop_map(serde_json::Value::String),
            json_value()
        ]),
        prop::option::of(prop_oneof![
            any::<u64>().prop_map(|n| serde_json::json!(n)),
            json_value()
        ]),
        prop::option::of(prop_oneof![
            text().prop_map(|id| serde_json::json!({ "id": id })),
            json_value()
        ]),
        any::<u8>(),
    )
        .prop_map(|(order_id, tenant, customer, flags)| {
            let mut m = serde_json::Map::new();
            if let Some(v) = order_id {
                m.insert("order_id".into(), v);
            }
            if let Some(v) = tenant {
                m.insert("tenant".into(), v);
            }
            if let Some(v) = customer {
                m.insert("customer".into(), v);
            }
            if flags % 7 == 0 {
                m.insert("fail".into(), serde_json::Value::Bool(true));
            }
            serde_json::to_vec(&m).unwrap()
        });
    prop_oneof![
        4 => order.clone(),
        // Cut off or with one byte replaced.
        2 => (order.clone(), any::<prop::sample::Index>()).prop_map(|(p, i)| p[..i.index(p.len() + 1)].to_vec()),
        2 => (order, any::<prop::sample::Index>(), any::<u8>()).prop_map(|(mut p, i, b)| {
            if !p.is_empty() {
                let at = i.index(p.len());
                p[at] = b;
            }
            p
        }),
        1 => prop::collection::vec(any::<u8>(), 0..64),
    ]
}

fn headers() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    prop::collection::vec(
        (
            prop_oneof![Just("Idempotency-Key".to_owned()), ".{0,8}"],
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..24),
                text().prop_map(String::into_bytes),
            ],
        ),
        0..3,
    )
}

type Input = Vec<(Vec<u8>, Vec<(String, Vec<u8>)>)>;

fn run_case(rt: &tokio::runtime::Runtime, messages: &Input) -> Result<(), TestCaseError> {
    *EFFECTS.lock().unwrap() = None;
    let broker = MemoryBroker::new();
    let mut ids = Vec::with_capacity(messages.len());
    for (payload, headers) in messages {
        let mut m = Message::new(payload.clone());
        for (name, value) in headers {
            m = m.header(name.clone(), value.clone());
        }
        ids.push(broker.publish(TOPIC, m));
    }
    let runtime = Runtime::builder(broker.clone())
        .store(MemoryStore::new())
        .handlers(HANDLERS)
        .concurrency(8)
        .build()
        .expect("runtime");
    rt.block_on(async {
        let stop = idem::CancellationToken::new();
        let run = runtime.run(stop.clone());
        let idle = async {
            let idle = tokio::time::timeout(Duration::from_secs(30), broker.wait_idle()).await;
            stop.cancel();
            idle
        };
        let ((), idle) = tokio::join!(run, idle);
        prop_assert!(
            idle.is_ok(),
            "hang: the broker did not become idle within 30 s"
        );
        Ok(())
    })?;
    // Every message is settled once per handler: acked or dead-lettered.
    let events = broker.events();
    let mut settled: HashMap<&str, u32> = HashMap::new();
    for e in &events {
        match e {
            BrokerEvent::Acked { id } | BrokerEvent::DeadLettered { id, .. } => {
                *settled.entry(id.as_ref()).or_default() += 1;
            }
            _ => {}
        }
    }
    for id in &ids {
        prop_assert_eq!(
            settled.get(id.as_str()).copied().unwrap_or(0),
            HANDLERS.len() as u32,
            "message {} not settled by every handler",
            id
        );
    }
    for name in HANDLERS {
        let s = runtime.stats_of(name).unwrap();
        prop_assert_eq!(s.in_flight, 0);
        // Each message settles exactly once per handler; `received` may be
        // higher (a nacked delivery comes back).
        prop_assert_eq!(
            s.processed + s.duplicate + s.dead_lettered,
            ids.len() as u64,
            "{}: {:?}",
            name,
            s
        );
        prop_assert!(s.received >= ids.len() as u64);
    }
    let effects = EFFECTS.lock().unwrap().clone().unwrap_or_default();
    let doubled: Vec<_> = effects.iter().filter(|(_, n)| **n > 1).collect();
    prop_assert!(doubled.is_empty(), "effects applied twice: {:?}", doubled);
    // Dead letters carry a reason.
    for d in broker.dead_letters("fuzz.dlq") {
        prop_assert!(!d.letter.reason.is_empty());
    }
    Ok(())
}

#[test]
fn decode_and_key_extraction_never_lose_panic_or_double() {
    // Debug builds keep big futures on the stack; give the run room.
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(fuzz)
        .unwrap()
        .join()
        .unwrap();
}

fn fuzz() {
    let seconds: u64 = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let strategy = prop::collection::vec((payload(), headers()), 1..24);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let messages = std::cell::Cell::new(0u64);
    let (mut cases, mut rounds) = (0u64, 0u64);
    while Instant::now() < deadline {
        let mut runner = TestRunner::new(Config {
            cases: 64,
            failure_persistence: None,
            rng_seed: proptest::test_runner::RngSeed::Fixed(fastrand::u64(..)),
            ..Config::default()
        });
        runner
            .run(&strategy, |input| {
                messages.set(messages.get() + input.len() as u64);
                run_case(&rt, &input)
            })
            .unwrap_or_else(|e| panic!("{e}"));
        cases += 64;
        rounds += 1;
    }
    println!(
        "fuzz_input: {cases} cases, {} messages, {rounds} seeds, {seconds} s: no loss, no panic, no hang, no double",
        messages.get()
    );
}

/// Found by the long run (a wrong property, not an idem bug: the twin of a
/// key in the same batch is nacked and comes back, so `received` counts it
/// twice): a failing item and a later copy of its key in one batch, next to
/// an undecodable one. Each still settles exactly once.
#[test]
fn regression_batch_twin_of_a_failing_item() {
    let k = "k".repeat(80);
    let input: Input = vec![
        (
            format!(r#"{{"customer":{{"id":"0"}},"fail":true,"order_id":"{k}","tenant":0}}"#)
                .into_bytes(),
            vec![],
        ),
        (k.clone().into_bytes(), vec![]),
        (
            format!(r#"{{"order_id":"{k}","tenant":14401062536987764010}}"#).into_bytes(),
            vec![("Idempotency-Key".into(), vec![])],
        ),
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    run_case(&rt, &input).unwrap();
}
