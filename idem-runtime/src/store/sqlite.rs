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
//! Times are the process's clock (SQLite runs in it).
//!
//! A batch is claimed with one `INSERT … ON CONFLICT … DO UPDATE … WHERE
//! expired RETURNING` over all its keys (each once), then one `SELECT` of
//! the records of the keys it did not take; results are saved with one
//! `UPDATE … FROM (VALUES …)` and a batch is undone with one `DELETE`. No
//! round trip to save, but every statement is a hand-off to the
//! connection's worker thread. A statement holds at most 500 keys (3,000
//! parameters, within SQLite's 32,766); a larger batch takes one per 500.
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
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{Row, Sqlite};

use super::sql::{
    Dialect, Failure, LockOrder, Migration, MigrationLog, Migrator, Names, SqlStore, Statement,
    TWIN, push_placeholders, settled, ttl_millis,
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
    /// The statements over many keys, around their `VALUES` list.
    many: Many,
}

/// The text of the statements over many keys, before and after their
/// `VALUES` list (whose length is the batch's).
struct Many {
    claim: (String, String),
    lookup: (String, String),
    save_results: (String, String),
    delete: (String, String),
}

impl Many {
    fn sql(
        (head, tail): &(String, String),
        rows: usize,
        columns: usize,
    ) -> sqlx::AssertSqlSafe<String> {
        // `(?, ?, ?), `: 3 bytes a column, 4 a row.
        let values = rows * (columns * 3 + 4);
        let mut sql = String::with_capacity(head.len() + values + tail.len());
        sql.push_str(head);
        push_placeholders(&mut sql, rows, columns);
        sql.push_str(tail);
        sqlx::AssertSqlSafe(sql)
    }
}

/// The most keys one statement takes: 6 parameters each, within SQLite's
/// 32,766 (a larger batch takes several statements).
const KEYS_PER_STATEMENT: usize = 500;

/// The claim: insert, or take over a row whose record has expired at
/// `now` (an expression); `values` are the rows to insert.
fn claim_sql(t: &str, values: &str, now: &str, returning: &str) -> String {
    format!(
        "INSERT INTO {t} (handler, key, fingerprint, message_id, created_at, expires_at) \
         VALUES {values} \
         ON CONFLICT (handler, key) DO UPDATE SET fingerprint = excluded.fingerprint, \
         message_id = excluded.message_id, result = NULL, created_at = excluded.created_at, \
         expires_at = excluded.expires_at \
         WHERE {t}.expires_at IS NOT NULL AND {t}.expires_at <= {now} \
         RETURNING {returning}"
    )
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

    /// Claims many keys: one statement inserts (or takes over) those it
    /// can and returns them, one more reads the records of the others.
    async fn claim_many(
        &self,
        conn: &mut SqliteConnection,
        requests: &[ClaimRequest<'_>],
        now: i64,
    ) -> Result<Vec<Claim>, StoreError> {
        let many = &self.statements().many;
        let order = LockOrder::of(requests);
        let mut out = vec![TWIN; requests.len()];
        for keys in order.indices().chunks(KEYS_PER_STATEMENT) {
            let mut query = sqlx::query(Many::sql(&many.claim, keys.len(), 6));
            for &i in keys {
                let r = &requests[i];
                query = query
                    .bind(r.handler)
                    .bind(r.key.as_str())
                    .bind(Fingerprint::stored(r.fingerprint))
                    .bind(r.message_id)
                    .bind(now)
                    .bind(ttl_millis(r).map(|ttl| now.saturating_add(ttl)));
            }
            let taken = query.fetch_all(&mut *conn).await.map_err(|e| self.err(e))?;
            for row in &taken {
                let i = self.returned(&order, requests, row)?;
                out[i] = Claim::New { token: 0 };
            }
        }
        // The keys whose record is there and live: what it says.
        let present: Vec<usize> = order
            .indices()
            .iter()
            .copied()
            .filter(|&i| !matches!(out[i], Claim::New { .. }))
            .collect();
        for keys in present.chunks(KEYS_PER_STATEMENT) {
            let mut query = sqlx::query(Many::sql(&many.lookup, keys.len(), 2));
            for &i in keys {
                query = query
                    .bind(requests[i].handler)
                    .bind(requests[i].key.as_str());
            }
            let records = query.fetch_all(&mut *conn).await.map_err(|e| self.err(e))?;
            // Each key has one row (the primary key), kept by our write lock
            // since it conflicted; one missing is what `claim_one` reports.
            if records.len() != keys.len() {
                return Err(self.err(sqlx::Error::RowNotFound));
            }
            for row in &records {
                let i = self.returned(&order, requests, row)?;
                out[i] = settled(&requests[i], row.get(2), row.get(3));
            }
        }
        Ok(out)
    }

    /// The request of a row that starts with `handler, key`.
    fn returned(
        &self,
        order: &LockOrder,
        requests: &[ClaimRequest<'_>],
        row: &SqliteRow,
    ) -> Result<usize, StoreError> {
        order
            .returned(requests, row.get(0), row.get(1))
            .map_err(|why| self.config(why))
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
            claim: claim_sql(t, "(?1, ?2, ?3, ?4, ?5, ?6)", "?5", "1").into(),
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
            // `IN (SELECT … FROM (VALUES …))`, not `IN (VALUES …)`: older
            // SQLite (3.40, a system library with sqlx's `sqlite-unbundled`)
            // plans the latter as a scan of the whole table. Each row of the
            // claim has the same `created_at`: the claim's now.
            many: Many {
                claim: split(claim_sql(t, "\0", "excluded.created_at", "handler, key")),
                lookup: split(format!(
                    "SELECT handler, key, fingerprint, result FROM {t} \
                     WHERE (handler, key) IN (SELECT column1, column2 FROM (VALUES \0))"
                )),
                save_results: split(format!(
                    "UPDATE {t} SET result = v.column3 FROM (VALUES \0) AS v \
                     WHERE {t}.handler = v.column1 AND {t}.key = v.column2"
                )),
                delete: split(format!(
                    "DELETE FROM {t} \
                     WHERE (handler, key) IN (SELECT column1, column2 FROM (VALUES \0))"
                )),
            },
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
        store.claim_many(conn, requests, now).await
    }

    async fn save_results(
        store: &SqliteStore,
        conn: &mut SqliteConnection,
        done: &[&Claimed<'_>],
    ) -> Result<(), StoreError> {
        if let [c] = done {
            sqlx::query(store.statements().save_result.sql())
                .bind(c.request.handler)
                .bind(c.request.key.as_str())
                .bind(c.result)
                .execute(&mut *conn)
                .await
                .map_err(|e| store.err(e))?;
            return Ok(());
        }
        let many = &store.statements().many;
        for done in done.chunks(KEYS_PER_STATEMENT) {
            let mut query = sqlx::query(Many::sql(&many.save_results, done.len(), 3));
            for c in done {
                query = query
                    .bind(c.request.handler)
                    .bind(c.request.key.as_str())
                    .bind(c.result);
            }
            query.execute(&mut *conn).await.map_err(|e| store.err(e))?;
        }
        Ok(())
    }

    async fn unclaim(
        store: &SqliteStore,
        conn: &mut SqliteConnection,
        claimed: &[Claimed<'_>],
    ) -> Result<(), StoreError> {
        if let [c] = claimed {
            sqlx::query(store.statements().delete.sql())
                .bind(c.request.handler)
                .bind(c.request.key.as_str())
                .execute(&mut *conn)
                .await
                .map_err(|e| store.err(e))?;
            return Ok(());
        }
        let many = &store.statements().many;
        for claimed in claimed.chunks(KEYS_PER_STATEMENT) {
            let mut query = sqlx::query(Many::sql(&many.delete, claimed.len(), 2));
            for c in claimed {
                query = query.bind(c.request.handler).bind(c.request.key.as_str());
            }
            query.execute(&mut *conn).await.map_err(|e| store.err(e))?;
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

/// A statement's text around the `\0` that stands for its `VALUES` list.
fn split(sql: String) -> (String, String) {
    let (head, tail) = sql.split_once('\0').unwrap_or((&sql, ""));
    (head.to_owned(), tail.to_owned())
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

    /// Every statement over many keys reaches the table's rows through its
    /// primary key, never by scanning the table.
    #[tokio::test]
    async fn statements_over_many_keys_use_the_primary_key() {
        let store = SqliteStore::open("sqlite::memory:").await.unwrap();
        store.migrate().await.unwrap();
        let many = &store.statements().many;
        let t = &store.names().qualified;
        for (statement, columns) in [
            (&many.claim, 6),
            (&many.lookup, 2),
            (&many.save_results, 3),
            (&many.delete, 2),
        ] {
            let sqlx::AssertSqlSafe(sql) = Many::sql(statement, 3, columns);
            let mut explain = sqlx::query(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")));
            for _ in 0..3 * columns {
                explain = explain.bind("x");
            }
            let plan: Vec<String> = explain
                .fetch_all(store.pool())
                .await
                .unwrap()
                .iter()
                .map(|row| row.get(3))
                .collect();
            assert!(
                !plan
                    .iter()
                    .any(|step| step.starts_with(&format!("SCAN {t}"))),
                "{sql}: {plan:#?}"
            );
        }
    }

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
