//! `store = "sqlite"`: the embedded default. The dedup row is inserted in the
//! handler's own transaction, so record and effect commit (or vanish) together.
//!
//! Transactions start with `BEGIN IMMEDIATE`: SQLite has one writer, and
//! taking the write lock up front avoids the deadlock of two deferred
//! transactions both trying to upgrade (SQLITE_BUSY mid-transaction).

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AssertSqlSafe, Row, Sqlite, SqlitePool};

use super::sql::{Tx, map_err, validate_identifier};
use super::{Claim, ClaimRequest, Claimed, StoreError, TxStore};
use crate::fingerprint::Fingerprint;

const STORE: &str = "sqlite";

/// The SQLite dedup store.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use idem_runtime::store::sqlite::SqliteStore;
/// let store = SqliteStore::open("sqlite::memory:").await?;
/// store.migrate().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    sql: Arc<Statements>,
}

struct Statements {
    table: String,
    claim: Arc<str>,
    lookup: Arc<str>,
    save_result: Arc<str>,
    delete: Arc<str>,
    purge: Arc<str>,
}

impl Statements {
    fn new(table: &str) -> Self {
        Statements {
            table: table.to_owned(),
            claim: format!(
                "INSERT INTO {table} (handler, key, fingerprint, message_id, created_at, expires_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT (handler, key) DO UPDATE SET fingerprint = excluded.fingerprint, \
                 message_id = excluded.message_id, result = NULL, created_at = excluded.created_at, \
                 expires_at = excluded.expires_at \
                 WHERE {table}.expires_at IS NOT NULL AND {table}.expires_at <= ?5 \
                 RETURNING 1"
            )
            .into(),
            lookup: format!("SELECT fingerprint, result FROM {table} WHERE handler = ?1 AND key = ?2").into(),
            save_result: format!("UPDATE {table} SET result = ?3 WHERE handler = ?1 AND key = ?2").into(),
            delete: format!("DELETE FROM {table} WHERE handler = ?1 AND key = ?2").into(),
            purge: format!(
                "DELETE FROM {table} WHERE rowid IN \
                 (SELECT rowid FROM {table} WHERE expires_at IS NOT NULL AND expires_at <= ?1 LIMIT ?2)"
            )
            .into(),
        }
    }
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("table", &self.sql.table)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// The default dedup table name.
    pub const DEFAULT_TABLE: &'static str = "idem_dedup";

    /// A store on an existing pool, with the default table.
    pub fn new(pool: SqlitePool) -> Self {
        SqliteStore {
            pool,
            sql: Arc::new(Statements::new(Self::DEFAULT_TABLE)),
        }
    }

    /// Opens (and creates if missing) a database at `url` (`sqlite://path`,
    /// `sqlite::memory:`, or a plain file path) with settings fit for a
    /// consumer: WAL journal, `synchronous = NORMAL`, a 30 s busy timeout.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let url = if url.starts_with("sqlite:") {
            url.to_owned()
        } else {
            format!("sqlite://{url}")
        };
        let memory = url.contains(":memory:");
        let options = SqliteConnectOptions::from_str(&url)
            .map_err(|e| StoreError::Config {
                store: STORE,
                message: format!("bad SQLite URL {url:?}: {e}"),
            })?
            .create_if_missing(true)
            .journal_mode(if memory {
                SqliteJournalMode::Memory
            } else {
                SqliteJournalMode::Wal
            })
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(30));
        // An in-memory database lives in one connection; a file can have a few
        // readers beside its one writer.
        let pool = SqlitePoolOptions::new()
            .max_connections(if memory { 1 } else { 4 })
            .connect_with(options)
            .await
            .map_err(|e| StoreError::unavailable(STORE, e))?;
        Ok(Self::new(pool))
    }

    /// Uses another table name (validated: letters, digits, `_`).
    pub fn with_table(mut self, table: &str) -> Result<Self, StoreError> {
        validate_identifier(STORE, table)?;
        self.sql = Arc::new(Statements::new(table));
        Ok(self)
    }

    /// The pool, for the application's own queries.
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Creates the dedup table if it does not exist. Idempotent; call once at start-up.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let t = &self.sql.table;
        let ddl = format!(
            "CREATE TABLE IF NOT EXISTS {t} (\
               handler TEXT NOT NULL, key TEXT NOT NULL, fingerprint INTEGER NOT NULL, \
               message_id TEXT NOT NULL, result TEXT, created_at INTEGER NOT NULL, expires_at INTEGER, \
               PRIMARY KEY (handler, key)); \
             CREATE INDEX IF NOT EXISTS {t}_expires ON {t} (expires_at) WHERE expires_at IS NOT NULL;"
        );
        sqlx::raw_sql(AssertSqlSafe(ddl))
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(())
    }

    fn err(&self, e: sqlx::Error) -> StoreError {
        map_err(STORE, &self.sql.table, e)
    }

    async fn claim_one(
        &self,
        tx: &mut Tx<'_, Sqlite>,
        r: &ClaimRequest<'_>,
        now: i64,
    ) -> Result<Claim, StoreError> {
        let expires = r.ttl.map(|ttl| now.saturating_add(ttl.as_millis() as i64));
        let inserted = sqlx::query(AssertSqlSafe(self.sql.claim.clone()))
            .bind(r.handler)
            .bind(r.key.as_str())
            .bind(Fingerprint::stored(r.fingerprint))
            .bind(r.message_id)
            .bind(now)
            .bind(expires)
            .fetch_optional(&mut **tx)
            .await
            .map_err(|e| self.err(e))?;
        if inserted.is_some() {
            return Ok(Claim::New { token: 0 });
        }
        let row = sqlx::query(AssertSqlSafe(self.sql.lookup.clone()))
            .bind(r.handler)
            .bind(r.key.as_str())
            .fetch_one(&mut **tx)
            .await
            .map_err(|e| self.err(e))?;
        if let Some(conflict) = r.conflict_with(Fingerprint::from_stored(row.get(0))) {
            return Ok(conflict);
        }
        Ok(Claim::Done { cached: row.get(1) })
    }
}

impl TxStore for SqliteStore {
    type Tx<'c> = Tx<'c, Sqlite>;

    fn kind(&self) -> &'static str {
        STORE
    }

    async fn begin(&self) -> Result<Tx<'static, Sqlite>, StoreError> {
        let tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(|e| self.err(e))?;
        Ok(Tx::new(tx))
    }

    // In-process: a statement costs no network round trip, so a batch is
    // claimed statement by statement on the already-prepared query.
    async fn claim(
        &self,
        tx: &mut Self::Tx<'_>,
        requests: &[ClaimRequest<'_>],
    ) -> Result<Vec<Claim>, StoreError> {
        let now = now_millis();
        let mut out = Vec::with_capacity(requests.len());
        for r in requests {
            out.push(self.claim_one(tx, r, now).await?);
        }
        Ok(out)
    }

    async fn commit(
        &self,
        mut tx: Tx<'static, Sqlite>,
        done: &[Claimed<'_>],
    ) -> Result<(), StoreError> {
        for c in done {
            if let Some(result) = c.result {
                sqlx::query(AssertSqlSafe(self.sql.save_result.clone()))
                    .bind(c.request.handler)
                    .bind(c.request.key.as_str())
                    .bind(result)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| self.err(e))?;
            }
        }
        tx.into_inner().commit().await.map_err(|e| self.err(e))
    }

    async fn rollback(&self, tx: Tx<'static, Sqlite>) -> Result<(), StoreError> {
        super::sql::rollback(tx).await.map_err(|e| self.err(e))
    }

    async fn unclaim(
        &self,
        tx: &mut Self::Tx<'_>,
        claimed: &[Claimed<'_>],
    ) -> Result<(), StoreError> {
        for c in claimed {
            sqlx::query(AssertSqlSafe(self.sql.delete.clone()))
                .bind(c.request.handler)
                .bind(c.request.key.as_str())
                .execute(&mut **tx)
                .await
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    async fn savepoint<'t>(&self, tx: &'t mut Self::Tx<'_>) -> Result<Self::Tx<'t>, StoreError> {
        super::sql::nested(tx).await.map_err(|e| self.err(e))
    }

    async fn end_savepoint(&self, tx: Self::Tx<'_>, keep: bool) -> Result<(), StoreError> {
        super::sql::end_nested(tx, keep)
            .await
            .map_err(|e| self.err(e))
    }

    async fn purge_expired(&self, limit: u32) -> Result<u64, StoreError> {
        let done = sqlx::query(AssertSqlSafe(self.sql.purge.clone()))
            .bind(now_millis())
            .bind(i64::from(limit))
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(done.rows_affected())
    }
}

/// Milliseconds since the Unix epoch, for `created_at` / `expires_at`.
pub(crate) fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
