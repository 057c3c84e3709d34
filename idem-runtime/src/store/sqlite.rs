//! `store = "sqlite"`: the embedded default. The dedup row is inserted in the
//! handler's own transaction, so record and effect commit (or vanish) together.
//!
//! Transactions start with `BEGIN IMMEDIATE`: SQLite has one writer, and
//! taking the write lock up front avoids the deadlock of two deferred
//! transactions both trying to upgrade (SQLITE_BUSY mid-transaction). The
//! same lock serialises concurrent migrators, and makes a claim racing
//! another consumer's wait (up to the 30 s busy timeout of
//! [`open`](SqliteStore::open)) until that one has committed or rolled back.
//!
//! Times are the process's clock (SQLite runs in it). A batch is claimed
//! statement by statement: in-process, a statement costs no round trip.
//!
//! Errors are classified by SQLite's result codes: `SQLITE_BUSY`,
//! `SQLITE_LOCKED`, `SQLITE_IOERR`, `SQLITE_FULL`, `SQLITE_NOMEM`,
//! `SQLITE_CANTOPEN`, `SQLITE_PROTOCOL`, `SQLITE_SCHEMA` and
//! `SQLITE_INTERRUPT` are transient; everything else is permanent. A
//! missing table has no code of its own (it is the generic `SQLITE_ERROR`),
//! so for that one code the message `no such table` is what tells it apart.

use std::str::FromStr;
use std::time::Duration;

use sqlx::error::DatabaseError;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{Row, Sqlite};

use super::sql::{
    Dialect, Failure, LockOrder, Migration, MigrationLog, Migrator, Names, SqlStore, Statement,
    TWIN, settled, ttl_millis,
};
use super::{Claim, ClaimRequest, Claimed, StoreError};
use crate::fingerprint::Fingerprint;

/// The SQLite dedup store.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use idem_runtime::store::sqlite::SqliteStore;
/// let store = SqliteStore::open("sqlite::memory:").await?;
/// store.migrate().await?;
/// # Ok(()) }
/// ```
pub type SqliteStore = SqlStore<SqliteDialect>;

/// SQLite's [`Dialect`]: see the [module](self) docs.
#[derive(Debug)]
pub enum SqliteDialect {}

#[doc(hidden)]
pub struct Statements {
    claim: Statement,
    lookup: Statement,
    save_result: Statement,
    delete: Statement,
    purge: Statement,
}

impl SqlStore<SqliteDialect> {
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
                store: SqliteDialect::STORE,
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
            .map_err(|e| StoreError::unavailable(SqliteDialect::STORE, e))?;
        Ok(Self::new(pool))
    }

    /// Claims one key: insert, or take over an expired row; otherwise read
    /// the row that is there.
    async fn claim_one(
        &self,
        conn: &mut SqliteConnection,
        r: &ClaimRequest<'_>,
        now: i64,
    ) -> Result<Claim, StoreError> {
        let sql = self.statements();
        let expires = ttl_millis(r).map(|ttl| now.saturating_add(ttl));
        let inserted = sqlx::query(sql.claim.sql())
            .bind(r.handler)
            .bind(r.key.as_str())
            .bind(Fingerprint::stored(r.fingerprint))
            .bind(r.message_id)
            .bind(now)
            .bind(expires)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| self.err(e))?;
        if inserted.is_some() {
            return Ok(Claim::New { token: 0 });
        }
        let row = sqlx::query(sql.lookup.sql())
            .bind(r.handler)
            .bind(r.key.as_str())
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(settled(r, row.get(0), row.get(1)))
    }
}

impl super::sql::sealed::Sealed for SqliteDialect {}

impl Dialect for SqliteDialect {
    type Db = Sqlite;
    type Statements = Statements;
    const STORE: &'static str = "sqlite";
    const TYPE_NAME: &'static str = "SqliteStore";
    const BEGIN: Option<&'static str> = Some("BEGIN IMMEDIATE");
    const DEFAULT_SCHEMA: Option<&'static str> = None;

    fn statements(names: &Names) -> Statements {
        let t = &names.qualified;
        Statements {
            claim: format!(
                "INSERT INTO {t} (handler, key, fingerprint, message_id, created_at, expires_at) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
                 ON CONFLICT (handler, key) DO UPDATE SET fingerprint = excluded.fingerprint, \
                 message_id = excluded.message_id, result = NULL, created_at = excluded.created_at, \
                 expires_at = excluded.expires_at \
                 WHERE {t}.expires_at IS NOT NULL AND {t}.expires_at <= ?5 \
                 RETURNING 1"
            )
            .into(),
            lookup: format!("SELECT fingerprint, result FROM {t} WHERE handler = ?1 AND key = ?2")
                .into(),
            save_result: format!("UPDATE {t} SET result = ?3 WHERE handler = ?1 AND key = ?2")
                .into(),
            delete: format!("DELETE FROM {t} WHERE handler = ?1 AND key = ?2").into(),
            purge: format!(
                "DELETE FROM {t} WHERE rowid IN \
                 (SELECT rowid FROM {t} WHERE expires_at IS NOT NULL AND expires_at <= ?1 LIMIT ?2)"
            )
            .into(),
        }
    }

    /// `BEGIN IMMEDIATE` takes the database's write lock: concurrent
    /// migrators wait for it, and DDL is transactional.
    async fn migrate(store: &SqliteStore) -> Result<Vec<i64>, StoreError> {
        let names = store.names();
        let (t, table, log) = (&names.qualified, &names.table, names.migrations_log());
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {log} (version INTEGER PRIMARY KEY, description TEXT NOT NULL, \
             applied_at INTEGER NOT NULL DEFAULT (CAST(strftime('%s', 'now') AS INTEGER)))"
        );
        // Versions only ever get appended.
        let migrations = vec![Migration {
            version: 1,
            description: "create the dedup table",
            sql: format!(
                "CREATE TABLE IF NOT EXISTS {t} (\
                   handler TEXT NOT NULL, key TEXT NOT NULL, fingerprint INTEGER NOT NULL, \
                   message_id TEXT NOT NULL, result TEXT, created_at INTEGER NOT NULL, expires_at INTEGER, \
                   PRIMARY KEY (handler, key)); \
                 CREATE INDEX IF NOT EXISTS {table}_expires ON {t} (expires_at) WHERE expires_at IS NOT NULL;"
            ),
        }];
        let log = MigrationLog::new(&log, create, ["?1", "?2"]);
        Migrator::<Sqlite>::in_transaction(
            store.pool(),
            Some("BEGIN IMMEDIATE"),
            None,
            &log,
            migrations,
        )
        .await
        .map_err(|e| store.err(e))
    }

    async fn claim(
        store: &SqliteStore,
        conn: &mut SqliteConnection,
        requests: &[ClaimRequest<'_>],
    ) -> Result<Vec<Claim>, StoreError> {
        let now = now_millis();
        if let [one] = requests {
            return Ok(vec![store.claim_one(conn, one, now).await?]);
        }
        let mut out = vec![TWIN; requests.len()];
        for &i in LockOrder::of(requests).indices() {
            out[i] = store.claim_one(conn, &requests[i], now).await?;
        }
        Ok(out)
    }

    async fn save_results(
        store: &SqliteStore,
        conn: &mut SqliteConnection,
        done: &[&Claimed<'_>],
    ) -> Result<(), StoreError> {
        for c in done {
            sqlx::query(store.statements().save_result.sql())
                .bind(c.request.handler)
                .bind(c.request.key.as_str())
                .bind(c.result)
                .execute(&mut *conn)
                .await
                .map_err(|e| store.err(e))?;
        }
        Ok(())
    }

    async fn unclaim(
        store: &SqliteStore,
        conn: &mut SqliteConnection,
        claimed: &[Claimed<'_>],
    ) -> Result<(), StoreError> {
        for c in claimed {
            sqlx::query(store.statements().delete.sql())
                .bind(c.request.handler)
                .bind(c.request.key.as_str())
                .execute(&mut *conn)
                .await
                .map_err(|e| store.err(e))?;
        }
        Ok(())
    }

    async fn purge(store: &SqliteStore, limit: u32) -> Result<u64, StoreError> {
        let done = sqlx::query(store.statements().purge.sql())
            .bind(now_millis())
            .bind(i64::from(limit))
            .execute(store.pool())
            .await
            .map_err(|e| store.err(e))?;
        Ok(done.rows_affected())
    }

    fn classify(error: &dyn DatabaseError) -> Failure {
        let code = error.code().and_then(|c| c.parse().ok()).unwrap_or(0);
        classify(code, error.message())
    }
}

/// SQLite's table, by extended result code (its low byte is the primary
/// code). See the [module](self) docs.
fn classify(extended_code: i32, message: &str) -> Failure {
    const ERROR: i32 = 1; // SQLITE_ERROR: generic; a missing table is one
    const TRANSIENT: [i32; 9] = [
        5,  // SQLITE_BUSY
        6,  // SQLITE_LOCKED
        7,  // SQLITE_NOMEM
        9,  // SQLITE_INTERRUPT
        10, // SQLITE_IOERR
        13, // SQLITE_FULL
        14, // SQLITE_CANTOPEN
        15, // SQLITE_PROTOCOL
        17, // SQLITE_SCHEMA
    ];
    match extended_code & 0xff {
        ERROR if message.starts_with("no such table") => Failure::MissingTable,
        code if TRANSIENT.contains(&code) => Failure::Transient,
        _ => Failure::Permanent,
    }
}

/// Milliseconds since the Unix epoch, for `created_at` / `expires_at`.
pub(crate) fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified_by_result_code() {
        assert_eq!(
            classify(1, "no such table: idem_dedup"),
            Failure::MissingTable
        );
        assert_eq!(
            classify(1, "near \"SELEC\": syntax error"),
            Failure::Permanent
        );
        assert_eq!(classify(5, "database is locked"), Failure::Transient);
        assert_eq!(classify(517, "database is locked"), Failure::Transient); // BUSY_SNAPSHOT
        assert_eq!(classify(6, "database table is locked"), Failure::Transient);
        assert_eq!(classify(266, "disk I/O error"), Failure::Transient); // IOERR_READ
        assert_eq!(classify(13, "database or disk is full"), Failure::Transient);
        assert_eq!(
            classify(8, "attempt to write a readonly database"),
            Failure::Permanent
        );
        assert_eq!(
            classify(11, "database disk image is malformed"),
            Failure::Permanent
        );
        assert_eq!(
            classify(2067, "UNIQUE constraint failed"),
            Failure::Permanent
        );
        // The message decides only for the generic code.
        assert_eq!(classify(8, "no such table: x"), Failure::Permanent);
    }
}
