//! A test database for the SQL store suite (`sql_suite.rs`), written once
//! over `SqlStore<D>`: a store on a private schema, database or file with an
//! `effects` table, and the reads the scenarios check. Each database's
//! module (`pg.rs`, `mysql.rs`, `sqlite_db.rs`) loads it with
//! `#[path = "sql_db.rs"] mod sql_db;`, supplies its SQL ([`TestSql`]) and
//! adds how to create the database and what only it can do.
#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use idem::Tx;
use idem::store::sql::{Dialect, SqlStore};
use sqlx::{Database, Executor, FromRow, IntoArguments, Pool};

/// The queries that differ between databases (placeholders, quoting, time
/// arithmetic). Each takes the handler name as its one bind, except
/// `INSERT_EFFECT` (handler, key, seq).
pub trait TestSql: Dialect {
    /// `(key, count)` of a handler's effect rows.
    const EFFECT_COUNTS: &'static str;
    /// The handler's dedup rows.
    const DEDUP_ROWS: &'static str;
    /// The `seq` (as a 64-bit integer) of the handler's one effect row.
    const EFFECT_SEQ: &'static str;
    /// `expires_at - created_at` in seconds (a double) of a handler's row.
    const TTL_SECONDS: &'static str;
    /// One effect row.
    const INSERT_EFFECT: &'static str;
    /// How many transactions of the test's namespace wait on a lock, and
    /// how often that may be asked; `None` where the database cannot tell.
    const LOCK_WAITS: Option<(&'static str, Duration)>;
    /// The `effects` table.
    const EFFECTS_TABLE: &'static str;
}

/// A store on a private namespace of a server (or a private file).
pub struct Db<D: Dialect> {
    pub store: SqlStore<D>,
    /// The namespace the test owns: a PostgreSQL schema, a MariaDB database
    /// (a schema there), the SQLite file.
    pub schema: String,
    /// The server's URL.
    pub server: String,
    /// A directory removed with the `Db`.
    pub dir: Option<OwnedDir>,
}

/// A directory removed when dropped.
pub struct OwnedDir(pub PathBuf);

impl Drop for OwnedDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl<D> Db<D>
where
    D: TestSql,
    for<'c> &'c mut <D::Db as Database>::Connection: Executor<'c, Database = D::Db>,
    <D::Db as Database>::Arguments: IntoArguments<D::Db>,
    for<'s> &'s str: sqlx::Type<D::Db> + sqlx::Encode<'s, D::Db>,
    (i64,): for<'r> FromRow<'r, <D::Db as Database>::Row>,
    (f64,): for<'r> FromRow<'r, <D::Db as Database>::Row>,
    (String, i64): for<'r> FromRow<'r, <D::Db as Database>::Row>,
{
    /// Migrates `store` and creates its `effects` table.
    pub async fn create(
        store: SqlStore<D>,
        schema: String,
        server: &str,
        dir: Option<OwnedDir>,
    ) -> Self {
        store.migrate().await.expect("migrate");
        sqlx::raw_sql(D::EFFECTS_TABLE)
            .execute(store.pool())
            .await
            .expect("create effects");
        Db {
            store,
            schema,
            server: server.to_owned(),
            dir,
        }
    }

    pub fn pool(&self) -> &Pool<D::Db> {
        self.store.pool()
    }

    /// Waits until a transaction of this namespace waits on a lock (a
    /// competing claim on another connection).
    pub async fn wait_for_lock_wait(&self) {
        let Some((query, every)) = D::LOCK_WAITS else {
            // Give the competitor the time to start waiting.
            return tokio::time::sleep(Duration::from_millis(200)).await;
        };
        for _ in 0..(10_000 / every.as_millis().max(1)) {
            if self.scalar::<i64>(query, None).await > 0 {
                return;
            }
            tokio::time::sleep(every).await;
        }
        panic!("the second claim never waited on the first one's row lock");
    }

    /// Effect rows per key of one handler.
    pub async fn effect_counts(&self, handler: &str) -> BTreeMap<String, i64> {
        sqlx::query_as::<_, (String, i64)>(D::EFFECT_COUNTS)
            .bind(handler)
            .fetch_all(self.pool())
            .await
            .expect("count effects")
            .into_iter()
            .collect()
    }

    /// Dedup rows of one handler.
    pub async fn dedup_rows(&self, handler: &str) -> i64 {
        self.scalar(D::DEDUP_ROWS, Some(handler)).await
    }

    /// All effect rows.
    pub async fn effect_rows(&self) -> i64 {
        self.scalar("SELECT COUNT(*) FROM effects", None).await
    }

    /// The `seq` of the one effect row of a handler.
    pub async fn effect_seq(&self, handler: &str) -> i64 {
        self.scalar(D::EFFECT_SEQ, Some(handler)).await
    }

    /// `expires_at - created_at` of a handler's row, in seconds.
    pub async fn ttl_seconds(&self, handler: &str) -> f64 {
        self.scalar(D::TTL_SECONDS, Some(handler)).await
    }

    /// The versions recorded in a migrations table.
    pub async fn versions(&self, log: &str) -> Vec<i64> {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT version FROM {log}")))
            .fetch_all(self.pool())
            .await
            .expect("read versions")
    }

    async fn scalar<T>(&self, sql: &'static str, handler: Option<&str>) -> T
    where
        (T,): for<'r> FromRow<'r, <D::Db as Database>::Row>,
        T: Send + Unpin,
    {
        let query = sqlx::query_scalar(sql);
        let query = match handler {
            Some(handler) => query.bind(handler),
            None => query,
        };
        query.fetch_one(self.pool()).await.expect(sql)
    }
}

/// The handlers' effect: one row in `effects`, in the handler's transaction.
pub async fn insert_effect<D>(
    tx: &mut Tx<'_, D::Db>,
    handler: &str,
    key: &str,
    seq: u32,
) -> Result<(), sqlx::Error>
where
    D: TestSql,
    for<'c> &'c mut <D::Db as Database>::Connection: Executor<'c, Database = D::Db>,
    <D::Db as Database>::Arguments: IntoArguments<D::Db>,
    for<'s> &'s str: sqlx::Type<D::Db> + sqlx::Encode<'s, D::Db>,
    i32: sqlx::Type<D::Db> + for<'q> sqlx::Encode<'q, D::Db>,
{
    sqlx::query(D::INSERT_EFFECT)
        .bind(handler)
        .bind(key)
        .bind(seq as i32)
        .execute(tx.conn())
        .await
        .map(|_| ())
}

/// A free port on the loopback interface.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().unwrap().port()
}

/// Whether the tests run as root (servers then drop to a user of their own).
pub fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}
