//! SQLite as one of the databases the SQL store suite (`sql_suite.rs`) is
//! stamped with: a database file per test (so a second pool, "another
//! process", can share it), with the dedup table and an `effects` table.
//! Loaded with `#[path = "common/sqlite_db.rs"] mod sqlite_db;`.
#![allow(dead_code, unreachable_pub)]

use std::path::PathBuf;
use std::time::Duration;

use idem::store::sqlite::SqliteStore;
use sqlx::SqlitePool;

/// Suite: the sqlx database and the store.
pub type Database = sqlx::Sqlite;
pub type Store = SqliteStore;

pub struct Db {
    pub store: SqliteStore,
    dir: PathBuf,
}

/// Milliseconds since the Unix epoch: the store's clock.
fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

impl Db {
    pub async fn new() -> Db {
        let dir = std::env::temp_dir().join(format!("idem-sqlite-{:016x}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).expect("create the database's directory");
        let store = SqliteStore::open(&dir.join("db").display().to_string())
            .await
            .expect("open sqlite");
        store.migrate().await.expect("migrate");
        sqlx::query(
            "CREATE TABLE effects (handler TEXT NOT NULL, key TEXT NOT NULL, seq INTEGER NOT NULL)",
        )
        .execute(store.pool())
        .await
        .expect("create effects");
        Db { store, dir }
    }

    /// A second, independent pool on the same file (another "process").
    pub async fn second_store(&self, _max_connections: u32) -> SqliteStore {
        SqliteStore::open(&self.dir.join("db").display().to_string())
            .await
            .expect("open sqlite")
    }

    pub fn pool(&self) -> &SqlitePool {
        self.store.pool()
    }

    /// Effect rows per key of one handler.
    pub async fn effect_counts(&self, handler: &str) -> std::collections::BTreeMap<String, i64> {
        sqlx::query_as::<_, (String, i64)>(
            "SELECT key, COUNT(*) FROM effects WHERE handler = ? GROUP BY key",
        )
        .bind(handler)
        .fetch_all(self.pool())
        .await
        .expect("count effects")
        .into_iter()
        .collect()
    }

    /// Dedup rows of one handler.
    pub async fn dedup_rows(&self, handler: &str) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM idem_dedup WHERE handler = ?")
            .bind(handler)
            .fetch_one(self.pool())
            .await
            .expect("count dedup rows")
    }

    /// Suite: all effect rows.
    pub async fn effect_rows(&self) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM effects")
            .fetch_one(self.pool())
            .await
            .expect("count effects")
    }

    /// Suite: the `seq` of the one effect row of a handler.
    pub async fn effect_seq(&self, handler: &str) -> i64 {
        sqlx::query_scalar("SELECT seq FROM effects WHERE handler = ?")
            .bind(handler)
            .fetch_one(self.pool())
            .await
            .expect("read effect")
    }

    /// Suite: `expires_at - created_at` of a handler's row, in seconds.
    pub async fn ttl_seconds(&self, handler: &str) -> f64 {
        sqlx::query_scalar(
            "SELECT (expires_at - created_at) / 1000.0 FROM idem_dedup WHERE handler = ? LIMIT 1",
        )
        .bind(handler)
        .fetch_one(self.pool())
        .await
        .expect("read ttl")
    }

    /// Suite: makes rows expired a second ago (all, or one handler's).
    pub async fn expire(&self, handler: Option<&str>) {
        sqlx::query("UPDATE idem_dedup SET expires_at = ?1 WHERE ?2 IS NULL OR handler = ?2")
            .bind(now_millis() - 1000)
            .bind(handler)
            .execute(self.pool())
            .await
            .expect("expire rows");
    }

    /// Suite: `n` rows of `handler` with keys `<prefix><i>`, expired a
    /// minute ago or live for an hour.
    pub async fn insert_rows(&self, handler: &str, prefix: &str, n: i32, expired: bool) {
        let now = now_millis();
        sqlx::query(
            "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < ?3) \
             INSERT INTO idem_dedup (handler, key, fingerprint, message_id, created_at, expires_at) \
             SELECT ?1, ?2 || i, 0, 'm', ?4, ?5 FROM s",
        )
        .bind(handler)
        .bind(prefix)
        .bind(n)
        .bind(now)
        .bind(if expired { now - 60_000 } else { now + 3_600_000 })
        .execute(self.pool())
        .await
        .expect("insert rows");
    }

    /// Suite: the versions recorded in a migrations table.
    pub async fn versions(&self, log: &str) -> Vec<i64> {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT version FROM {log}")))
            .fetch_all(self.pool())
            .await
            .expect("read versions")
    }

    /// Suite: SQLite shows no lock waits; a competing `BEGIN IMMEDIATE`
    /// waits (busy timeout) while the first transaction is open, so give it
    /// the time to start waiting.
    pub async fn wait_for_lock_wait(&self) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Drop for Db {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Suite: the handlers' effect, one row in `effects`, in the handler's
/// transaction.
pub async fn insert_effect(
    tx: &mut idem::Tx<'_, sqlx::Sqlite>,
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
