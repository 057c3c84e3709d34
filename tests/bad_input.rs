//! Bad input: every kind of broken message gets a clear reason and a dead
//! letter, no panic, no hang, and its neighbours are processed once.

mod common;

use common::{effect_counts, run_until_idle, sqlite};
use idem::source::memory::{MemoryBroker, Message};
use idem::{Delivery, Runtime, StoreError, Tx, idempotent};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Order {
    order_id: String,
    #[serde(default)]
    blob: String,
}

async fn apply(tx: &mut Tx<'_>, handler: &str, key: &str) -> Result<(), String> {
    common::insert_effect(tx, handler, key, 0)
        .await
        .map_err(|e| e.to_string())
}

#[idempotent(
    topic = "bad-field",
    key = "order_id",
    store = "sqlite",
    name = "bad-field",
    max_key_len = 32
)]
async fn bad_field(o: Order, tx: &mut Tx<'_>) -> Result<(), String> {
    let key = if o.blob.is_empty() {
        o.order_id
    } else {
        format!("{}+blob{}", o.order_id, o.blob.len())
    };
    apply(tx, "bad-field", &key).await
}

#[idempotent(topic = "bad-header", key = header("Idempotency-Key"), store = "sqlite", name = "bad-header", max_key_len = 32)]
async fn bad_header(o: Order, tx: &mut Tx<'_>, d: &Delivery) -> Result<(), String> {
    let _ = o;
    let key = String::from_utf8(d.header("Idempotency-Key").unwrap_or_default().to_vec())
        .map_err(|e| e.to_string())?;
    apply(tx, "bad-header", &key).await
}

/// Publishes good neighbours around each bad message; returns the ids of
/// the bad ones with the reason fragment each must be dead-lettered with.
fn publish(
    broker: &MemoryBroker,
    topic: &str,
    bad: Vec<(Message, &'static str)>,
) -> Vec<(String, &'static str)> {
    let mut expected = Vec::new();
    for (i, (message, reason)) in bad.into_iter().enumerate() {
        broker.publish(topic, good(topic, &format!("before{i}")));
        expected.push((broker.publish(topic, message), reason));
        broker.publish(topic, good(topic, &format!("after{i}")));
    }
    expected
}

fn good(topic: &str, key: &str) -> Message {
    Message::new(format!(r#"{{"order_id":"{key}"}}"#))
        .header("Idempotency-Key", format!("{topic}-{key}"))
}

fn check(broker: &MemoryBroker, topic: &str, expected: &[(String, &str)]) {
    let letters = broker.dead_letters(&format!("{topic}.dlq"));
    assert_eq!(letters.len(), expected.len(), "{letters:#?}");
    for (id, fragment) in expected {
        let letter = letters
            .iter()
            .find(|l| &*l.delivery.id == id.as_str())
            .unwrap_or_else(|| panic!("{id} was not dead-lettered"));
        let reason = &letter.letter.reason;
        assert!(
            reason.contains(fragment),
            "{id}: reason {reason:?} lacks {fragment:?}"
        );
        assert!(
            reason.len() < 400,
            "{id}: reason is {} bytes long",
            reason.len()
        );
        assert_eq!(
            letter.letter.attempts, 1,
            "undecodable input is not retried: {id}"
        );
    }
}

#[tokio::test]
async fn broken_payloads_are_dead_lettered_with_reasons_and_neighbours_run() {
    let store = sqlite().await;
    let broker = MemoryBroker::new();
    let big_garbage = vec![b'x'; 10 << 20];
    let big_valid = format!(r#"{{"order_id":"big","blob":"{}"}}"#, "y".repeat(10 << 20));
    broker.publish("bad-field", Message::new(big_valid));
    let expected = publish(
        &broker,
        "bad-field",
        vec![
            (Message::new("not json at all"), "undecodable payload"),
            (Message::new(r#"{"order_id": 5}"#), "invalid type"),
            (Message::new(r#"{"order_id": "k"#), "EOF while parsing"),
            (Message::new(big_garbage), "undecodable payload"),
            (
                Message::new(&b"{\"order_id\": \"\xff\xfe\"}"[..]),
                "undecodable payload",
            ),
            (Message::new("{}"), "missing field `order_id`"),
            (Message::new(r#"{"order_id": ""}"#), "empty"),
            (
                Message::new(format!(r#"{{"order_id": "{}"}}"#, "k".repeat(100))),
                "key too long",
            ),
            (Message::new(""), "EOF while parsing"),
        ],
    );
    let rt = Runtime::builder(broker.clone())
        .store(store.clone())
        .handlers(["bad-field"])
        .build()
        .unwrap();
    run_until_idle(&rt, &broker).await;

    check(&broker, "bad-field", &expected);
    let effects = effect_counts(&store, "bad-field").await;
    assert_eq!(
        effects.get("big+blob10485760"),
        Some(&1),
        "a 10 MB valid payload is processed"
    );
    for i in 0..expected.len() {
        for k in [format!("before{i}"), format!("after{i}")] {
            assert_eq!(effects.get(&k), Some(&1), "neighbour {k}");
        }
    }
    assert_eq!(effects.len(), 1 + 2 * expected.len());
}

#[tokio::test]
async fn broken_header_keys_are_dead_lettered_with_reasons_and_neighbours_run() {
    let store = sqlite().await;
    let broker = MemoryBroker::new();
    let body = r#"{"order_id":"x"}"#;
    let expected = publish(
        &broker,
        "bad-header",
        vec![
            (
                Message::new(body).header("Idempotency-Key", &b"\xff\xfe\xfd"[..]),
                "not valid UTF-8",
            ),
            (Message::new(body).header("Idempotency-Key", ""), "empty"),
            (Message::new(body), "missing key"),
            (
                Message::new(body).header("Idempotency-Key", "h".repeat(33)),
                "key too long",
            ),
            (
                Message::new(body).header("idempotency-key-other", "v"),
                "missing key",
            ),
        ],
    );
    let rt = Runtime::builder(broker.clone())
        .store(store.clone())
        .handlers(["bad-header"])
        .build()
        .unwrap();
    run_until_idle(&rt, &broker).await;

    check(&broker, "bad-header", &expected);
    let effects = effect_counts(&store, "bad-header").await;
    assert_eq!(effects.len(), 2 * expected.len(), "{effects:?}");
    assert!(effects.values().all(|&n| n == 1));
}

#[tokio::test]
async fn a_table_name_with_sql_in_it_is_a_clear_error() {
    let store = sqlite().await;
    let e = store
        .clone()
        .with_table("idem_dedup; DROP TABLE effects")
        .unwrap_err();
    assert!(matches!(e, StoreError::Config { .. }));
    assert!(e.to_string().contains("invalid table name"), "{e}");
    assert!(
        e.to_string().contains("letters, digits"),
        "the fix is in the message: {e}"
    );
}
