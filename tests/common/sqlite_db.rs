//! SQLite as one of the databases the SQL store suite (`sql_suite.rs`) is
//! stamped with: a database file per test (so a second pool, "another
//! process", can share it), with the dedup table and an `effects` table.
//! Loaded with `#[path = "common/sqlite_db.rs"] mod sqlite_db;`; the items
//! marked "suite" are what every such module provides, beside the reads of
//! `sql_db.rs`.
#![allow(dead_code, unreachable_pub)]

#[path = "sql_db.rs"]
mod sql_db;

use std::time::Duration;

use idem::store::sqlite::{SqliteDialect, SqliteStore};

/// Suite: the sqlx database, the store and the test database.
pub type Database = sqlx::Sqlite;
pub type Store = SqliteStore;
pub type Db = sql_db::Db<SqliteDialect>;

impl sql_db::TestSql for SqliteDialect {
    const EFFECT_COUNTS: &'static str =
        "SELECT key, COUNT(*) FROM effects WHERE handler = ? GROUP BY key";
    const DEDUP_ROWS: &'static str = "SELECT COUNT(*) FROM idem_dedup WHERE handler = ?";
    const EFFECT_SEQ: &'static str = "SELECT seq FROM effects WHERE handler = ?";
    const TTL_SECONDS: &'static str =
        "SELECT (expires_at - created_at) / 1000.0 FROM idem_dedup WHERE handler = ? LIMIT 1";
    const INSERT_EFFECT: &'static str = "INSERT INTO effects (handler, key, seq) VALUES (?, ?, ?)";
    // A competing `BEGIN IMMEDIATE` waits (busy timeout) unseen.
    const LOCK_WAITS: Option<(&'static str, Duration)> = None;
    const EFFECTS_TABLE: &'static str =
        "CREATE TABLE effects (handler TEXT NOT NULL, key TEXT NOT NULL, seq INTEGER NOT NULL)";
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
        let file = dir.join("db").display().to_string();
        let store = SqliteStore::open(&file).await.expect("open sqlite");
        Db::create(store, file.clone(), &file, Some(sql_db::OwnedDir(dir))).await
    }

    /// A second, independent pool on the same file (another "process").
    pub async fn second_store(&self, _max_connections: u32) -> SqliteStore {
        SqliteStore::open(&self.schema).await.expect("open sqlite")
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
}

/// Suite: the handlers' effect, one row in `effects`.
pub async fn insert_effect(
    tx: &mut idem::Tx<'_, sqlx::Sqlite>,
    handler: &str,
    key: &str,
    seq: u32,
) -> Result<(), sqlx::Error> {
    sql_db::insert_effect::<SqliteDialect>(tx, handler, key, seq).await
}
