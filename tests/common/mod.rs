//! Shared helpers of the integration tests: a fresh SQLite store with an
//! effects table, payload builders, and "run until the broker is idle".
#![allow(dead_code, unreachable_pub)]

use std::time::Duration;

use idem::source::memory::{MemoryBroker, Message};
use idem::store::sqlite::SqliteStore;
use idem::{CancellationToken, Runtime, Source};

/// A private in-memory SQLite database with the dedup table and an
/// `effects` table (one row per applied effect).
pub async fn sqlite() -> SqliteStore {
    let store = SqliteStore::open("sqlite::memory:")
        .await
        .expect("open sqlite");
    store.migrate().await.expect("migrate");
    sqlx::query(
        "CREATE TABLE effects (handler TEXT NOT NULL, key TEXT NOT NULL, seq INTEGER NOT NULL)",
    )
    .execute(store.pool())
    .await
    .expect("create effects");
    store
}

/// Effect rows per key of one handler.
pub async fn effect_counts(
    store: &SqliteStore,
    handler: &str,
) -> std::collections::BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>(
        "SELECT key, COUNT(*) FROM effects WHERE handler = ? GROUP BY key",
    )
    .bind(handler)
    .fetch_all(store.pool())
    .await
    .expect("count effects")
    .into_iter()
    .collect()
}

/// Dedup rows of one handler.
pub async fn dedup_rows(store: &SqliteStore, handler: &str) -> i64 {
    sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM idem_dedup WHERE handler = ?")
        .bind(handler)
        .fetch_one(store.pool())
        .await
        .expect("count dedup rows")
}

/// `{"order_id": "<key>", "seq": <seq>}`
pub fn order(key: &str, seq: u32) -> Message {
    Message::new(serde_json::json!({ "order_id": key, "seq": seq }).to_string())
}

/// Runs the runtime until the broker has settled everything, then stops it
/// and waits for the shutdown. Fails the test after 60 s instead of hanging.
pub async fn run_until_idle<S: Source>(runtime: &Runtime<S>, broker: &MemoryBroker) {
    let stop = CancellationToken::new();
    let run = runtime.run(stop.clone());
    let idle = async {
        tokio::time::timeout(Duration::from_secs(60), broker.wait_idle())
            .await
            .expect("the broker did not become idle within 60 s");
        stop.cancel();
    };
    tokio::join!(run, idle);
}

/// The business effect of the test handlers: one row in `effects`, written
/// in the handler's transaction.
pub async fn insert_effect(
    tx: &mut idem::Tx<'_>,
    handler: &str,
    key: &str,
    seq: u32,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO effects (handler, key, seq) VALUES (?, ?, ?)")
        .bind(handler)
        .bind(key)
        .bind(seq)
        .execute(&mut **tx)
        .await
        .map(|_| ())
}
