//! `store = "mysql"`: the PostgreSQL store's guarantees on **MariaDB**. The
//! dedup row is inserted in the handler's own transaction, so the record
//! and the business writes commit together, or neither does.
//!
//! # Supported servers
//!
//! MariaDB 10.6 or later (tested: MariaDB 10.11). The claim needs
//! `INSERT … RETURNING` (MariaDB 10.5) and `JSON_TABLE` (10.6).
//! [`migrate`](SqlStore::migrate) checks the server and refuses anything
//! else with a [`StoreError::Config`]. **MySQL is not supported**: MySQL 8
//! has `JSON_TABLE` but no `RETURNING`, so a claim there would take a second
//! round trip (`INSERT … ON DUPLICATE KEY UPDATE` then a locking `SELECT`),
//! or a multi-statement text query / stored procedure returning the rows;
//! none of that is implemented or tested.
//!
//! # How a claim works
//!
//! `INSERT … ON DUPLICATE KEY UPDATE … RETURNING` over all keys of the call:
//! one statement, one round trip. A single key binds its values; a batch
//! sends its keys as one JSON array that `JSON_TABLE` turns into rows, in
//! (handler, key) order, each key once (two batches sharing keys lock them
//! in the same order). The `UPDATE` part takes an expired row over and
//! leaves a live one alone; `RETURNING` answers for every key, inserted or
//! not, with the row's fingerprint, cached result and `claim_token`: a
//! random number per claim call, so the row is ours (`New`) exactly when it
//! carries our token, and a committed record otherwise (`Done`, or
//! `Conflict` when the payload differs).
//!
//! Two consumers claiming the same key at once: InnoDB makes the second
//! statement wait on the first transaction's lock on that key (the row is
//! read with a locking read, not from a snapshot). If the first commits, the
//! second finds the committed row (duplicate); if it rolls back, the second
//! inserts (runs the handler). No duplicate-key error reaches a handler. A
//! wait longer than `innodb_lock_wait_timeout` (50 s by default) and a
//! deadlock are reported as unavailable and the message is retried. Size
//! the pool for the runtime's concurrency: a waiting claim holds its
//! connection.
//!
//! Times (`created_at`, `expires_at`, `DATETIME(6)` in UTC) are the server's
//! clock (`UTC_TIMESTAMP(6)`), whatever the session's time zone.
//!
//! # The table
//!
//! In the connection's database. `handler` is `VARCHAR(255)` and `key`
//! `VARCHAR(512)`, both `utf8mb4` with the `utf8mb4_nopad_bin` collation:
//! byte-exact, case- and trailing-space-sensitive, like the other stores.
//! 512 characters hold any key of the default `max_key_len` (512 bytes);
//! the primary key is then at most 3,068 bytes, within InnoDB's 3,072-byte
//! limit (`ROW_FORMAT=DYNAMIC`). A longer key or handler name is refused
//! with [`StoreError::Config`] before any SQL runs (never truncated into
//! another key).
//!
//! Migrations run under a named lock (`GET_LOCK`) held by one connection,
//! so concurrent migrators wait for one another. MariaDB commits DDL
//! implicitly: a migrator that dies between a migration and its record
//! applies it again next time, which the migrations tolerate (`IF NOT
//! EXISTS`).
//!
//! Expired rows are purged in bounded batches, one short `READ COMMITTED`
//! statement each, that skips rows a consumer holds (`SKIP LOCKED`).
//!
//! Errors are classified by MariaDB's error numbers and SQLSTATE: `1146`
//! (`42S02`, no such table) means `migrate()` was not run; SQLSTATE class
//! `08` and `40001`, deadlock `1213`, lock wait timeout `1205`, too many
//! connections `1040` / `1203` / `1226`, shutdown `1053`, network errors
//! `1152`–`1161`, killed / interrupted `1927` / `1317`, statement timeout
//! `1969`, disk or memory `1021` / `1037` / `1038` / `1041` / `1114`, and
//! read-only `1290` / `1836` (a replica after a failover) are transient;
//! everything else is permanent.
//!
//! # Setup
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use idem_runtime::store::mysql::MysqlStore;
//! let store = MysqlStore::connect("mysql://root@127.0.0.1:3306/test")
//!     .await?
//!     .with_table("idem_dedup")?;
//! store.migrate().await?; // versioned, idempotent, safe to run from many processes
//! # Ok(()) }
//! ```

use sqlx::error::DatabaseError;
use sqlx::mysql::{MySqlConnection, MySqlDatabaseError, MySqlRow};
use sqlx::{Executor, MySql, Row};

use super::sql::{
    Dialect, Failure, LockOrder, Migration, MigrationLog, Migrator, Names, SqlStore, Statement,
    TWIN, connect, settled, ttl_millis,
};
use super::{Claim, ClaimRequest, Claimed, StoreError};
use crate::fingerprint::Fingerprint;

/// The longest key the `key` column holds, in characters.
pub const MAX_KEY_CHARS: usize = 512;
/// The longest handler name the `handler` column holds, in characters.
pub const MAX_HANDLER_CHARS: usize = 255;

/// The MariaDB dedup store (see the [module](self) docs). Cheap to clone
/// (a pool and shared statements).
pub type MysqlStore = SqlStore<MysqlDialect>;

/// MariaDB's [`Dialect`]: see the [module](self) docs.
#[derive(Debug)]
pub enum MysqlDialect {}

/// The store's SQL, built once per table from its validated name.
#[doc(hidden)]
pub struct Statements {
    claim_one: Statement,
    claim_many: Statement,
    save_results: Statement,
    unclaim: Statement,
    expired: Statement,
}

impl SqlStore<MysqlDialect> {
    /// Connects a pool to `url` (`mysql://user:pass@host:port/database`; the
    /// table lives in that database). The pool has 32 connections: a claim
    /// that waits on another consumer's claim of the same key holds its
    /// connection while it waits, so give the pool at least the runtime's
    /// concurrency. For other settings build the pool yourself and use
    /// [`SqlStore::new`]. Errors never contain the password.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Ok(Self::new(connect::<MysqlDialect>(url, 32).await?))
    }

    /// Refuses what the columns cannot hold, before it could be truncated
    /// into another key.
    fn check_fits(&self, r: &ClaimRequest<'_>) -> Result<(), StoreError> {
        let too_long = |s: &str, max: usize| s.len() > max && s.chars().count() > max;
        if too_long(r.key.as_str(), MAX_KEY_CHARS) {
            return Err(self.config(format!(
                "key of {} characters (handler {:?}) is longer than the mysql store's key column \
                 ({MAX_KEY_CHARS} characters): lower the handler's `max_key_len` to 512",
                r.key.as_str().chars().count(),
                r.handler
            )));
        }
        if too_long(r.handler, MAX_HANDLER_CHARS) {
            return Err(self.config(format!(
                "handler name {:?} is longer than the mysql store's handler column \
                 ({MAX_HANDLER_CHARS} characters): give it a shorter `name`",
                r.handler
            )));
        }
        Ok(())
    }

    async fn claim_one(
        &self,
        conn: &mut MySqlConnection,
        r: &ClaimRequest<'_>,
        token: i64,
    ) -> Result<Claim, StoreError> {
        let row = sqlx::query(self.statements().claim_one.sql())
            .bind(r.handler)
            .bind(r.key.as_str())
            .bind(Fingerprint::stored(r.fingerprint))
            .bind(r.message_id)
            .bind(token)
            .bind(ttl_micros(r))
            .fetch_one(conn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(answer(r, &row, 0, token))
    }

    async fn claim_many(
        &self,
        conn: &mut MySqlConnection,
        requests: &[ClaimRequest<'_>],
        token: i64,
    ) -> Result<Vec<Claim>, StoreError> {
        let order = LockOrder::of(requests);
        let mut keys = JsonRows::with_capacity(order.indices().len() * 64);
        for &i in order.indices() {
            let r = &requests[i];
            keys.row(|row| {
                row.text(r.handler);
                row.text(r.key.as_str());
                row.number(Some(Fingerprint::stored(r.fingerprint)));
                row.text(r.message_id);
                row.number(ttl_micros(r));
            });
        }
        let rows = sqlx::query(self.statements().claim_many.sql())
            .bind(token)
            .bind(keys.finish())
            .fetch_all(conn)
            .await
            .map_err(|e| self.err(e))?;
        if rows.len() != order.indices().len() {
            return Err(self.config(format!(
                "claim statement returned {} rows for {} keys",
                rows.len(),
                order.indices().len()
            )));
        }
        let mut out = vec![TWIN; requests.len()];
        for row in &rows {
            let (handler, key): (&str, &str) = (row.get(0), row.get(1));
            let i = order
                .returned(requests, handler, key)
                .map_err(|why| self.config(why))?;
            out[i] = answer(&requests[i], row, 2, token);
        }
        Ok(out)
    }
}

/// The claim's answer from a `RETURNING` row whose `claim_token`,
/// `fingerprint` and `result` start at column `at`.
fn answer(r: &ClaimRequest<'_>, row: &MySqlRow, at: usize, token: i64) -> Claim {
    if row.get::<i64, _>(at) == token {
        Claim::New { token: 0 }
    } else {
        settled(r, row.get(at + 1), row.get(at + 2))
    }
}

/// The TTL in microseconds (`INTERVAL … MICROSECOND`), `None` for forever.
fn ttl_micros(r: &ClaimRequest<'_>) -> Option<i64> {
    ttl_millis(r).map(|ms| ms.saturating_mul(1000))
}

/// A random claim token, never the column's default 0.
fn claim_token() -> i64 {
    fastrand::i64(1..)
}

/// The columns a claim writes, and what an expired row's columns become.
/// The `UPDATE` part runs its assignments left to right, each seeing the
/// ones before: `expires_at` comes last, so every condition reads the old
/// expiry.
fn claim_sql(t: &str, values: &str) -> String {
    let expired = "expires_at <= UTC_TIMESTAMP(6)";
    let take = |column: &str| format!("{column} = IF({expired}, VALUES({column}), {column})");
    format!(
        "INSERT INTO {t} (handler, `key`, fingerprint, message_id, claim_token, created_at, expires_at) \
         {values} \
         ON DUPLICATE KEY UPDATE {}, {}, result = IF({expired}, NULL, result), {}, {}, {} \
         RETURNING ",
        take("fingerprint"),
        take("message_id"),
        take("created_at"),
        take("claim_token"),
        take("expires_at"),
    )
}

/// Keys as a JSON array of arrays, the one parameter of a batch statement.
struct JsonRows {
    json: String,
    rows: usize,
}

/// One row of [`JsonRows`].
struct JsonRow<'a> {
    json: &'a mut String,
    fields: usize,
}

impl JsonRows {
    fn with_capacity(bytes: usize) -> Self {
        let mut json = String::with_capacity(bytes + 2);
        json.push('[');
        JsonRows { json, rows: 0 }
    }

    fn row(&mut self, fill: impl FnOnce(&mut JsonRow<'_>)) {
        if self.rows > 0 {
            self.json.push(',');
        }
        self.rows += 1;
        self.json.push('[');
        fill(&mut JsonRow {
            json: &mut self.json,
            fields: 0,
        });
        self.json.push(']');
    }

    fn finish(mut self) -> String {
        self.json.push(']');
        self.json
    }
}

impl JsonRow<'_> {
    fn next(&mut self) {
        if self.fields > 0 {
            self.json.push(',');
        }
        self.fields += 1;
    }

    fn text(&mut self, s: &str) {
        self.next();
        // A `&str` always serialises.
        let quoted = serde_json::to_string(s).unwrap_or_default();
        self.json.push_str(&quoted);
    }

    fn optional_text(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.text(s),
            None => {
                self.next();
                self.json.push_str("null");
            }
        }
    }

    fn number(&mut self, n: Option<i64>) {
        use std::fmt::Write;
        self.next();
        match n {
            Some(n) => {
                let _ = write!(self.json, "{n}");
            }
            None => self.json.push_str("null"),
        }
    }
}

/// The `JSON_TABLE` of a batch parameter: text columns `h`, `k`, … by
/// position.
fn json_table(columns: &str) -> String {
    format!("JSON_TABLE(?, '$[*]' COLUMNS ({columns})) AS j")
}

impl super::sql::sealed::Sealed for MysqlDialect {}

impl Dialect for MysqlDialect {
    type Db = MySql;
    type Statements = Statements;
    const STORE: &'static str = "mysql";
    const TYPE_NAME: &'static str = "MysqlStore";
    const BEGIN: Option<&'static str> = None;
    const DEFAULT_SCHEMA: Option<&'static str> = None;

    fn statements(names: &Names) -> Statements {
        let t = &names.qualified;
        let by_key = "d.handler = j.h AND d.`key` = j.k";
        Statements {
            claim_one: (claim_sql(
                t,
                "VALUES (?, ?, ?, ?, ?, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND)",
            ) + "claim_token, fingerprint, result")
                .into(),
            claim_many: (claim_sql(
                t,
                &format!(
                    "SELECT j.h, j.k, j.fp, j.mid, ?, UTC_TIMESTAMP(6), \
                       UTC_TIMESTAMP(6) + INTERVAL j.ttl MICROSECOND \
                     FROM {} ORDER BY j.ord",
                    json_table(
                        "ord FOR ORDINALITY, h TEXT PATH '$[0]', k TEXT PATH '$[1]', \
                         fp BIGINT PATH '$[2]', mid TEXT PATH '$[3]', ttl BIGINT PATH '$[4]'"
                    )
                ),
            ) + "handler, `key`, claim_token, fingerprint, result")
                .into(),
            // Keys first, then their rows by primary key: a table scan (the
            // optimizer's pick while the table is small) would lock, or wait
            // on, every row it reads.
            save_results: format!(
                "UPDATE {} STRAIGHT_JOIN {t} AS d FORCE INDEX (PRIMARY) ON {by_key} \
                 SET d.result = j.r",
                json_table("h TEXT PATH '$[0]', k TEXT PATH '$[1]', r LONGTEXT PATH '$[2]'")
            )
            .into(),
            unclaim: format!(
                "DELETE d FROM {} STRAIGHT_JOIN {t} AS d FORCE INDEX (PRIMARY) ON {by_key}",
                json_table("h TEXT PATH '$[0]', k TEXT PATH '$[1]'")
            )
            .into(),
            // SKIP LOCKED: never wait on (or block) a consumer's claim.
            // (A DELETE cannot skip locked rows itself, nor through a
            // subquery: MariaDB waits on them there.)
            expired: format!(
                "SELECT handler, `key` FROM {t} WHERE expires_at <= UTC_TIMESTAMP(6) \
                 LIMIT ? FOR UPDATE SKIP LOCKED"
            )
            .into(),
        }
    }

    /// A named lock (`GET_LOCK`) held by one connection around the
    /// migrations; released at the end, or with the connection if anything
    /// fails on the way.
    async fn migrate(store: &MysqlStore) -> Result<Vec<i64>, StoreError> {
        let names = store.names();
        let (t, table, log_table) = (&names.qualified, &names.table, names.migrations_log());
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {log_table} ( \
               version BIGINT NOT NULL PRIMARY KEY, description TEXT NOT NULL, \
               applied_at DATETIME(6) NOT NULL DEFAULT (UTC_TIMESTAMP(6))) ENGINE=InnoDB"
        );
        let log = MigrationLog::new(&log_table, create, ["?", "?"]);
        // Versions only ever get appended.
        let migrations = vec![Migration {
            version: 1,
            description: "create the dedup table",
            sql: format!(
                "CREATE TABLE IF NOT EXISTS {t} ( \
                   handler     VARCHAR({MAX_HANDLER_CHARS}) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin NOT NULL, \
                   `key`       VARCHAR({MAX_KEY_CHARS}) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin NOT NULL, \
                   fingerprint BIGINT NOT NULL, \
                   message_id  TEXT CHARACTER SET utf8mb4 NOT NULL, \
                   claim_token BIGINT NOT NULL DEFAULT 0, \
                   result      LONGTEXT CHARACTER SET utf8mb4, \
                   created_at  DATETIME(6) NOT NULL DEFAULT (UTC_TIMESTAMP(6)), \
                   expires_at  DATETIME(6), \
                   PRIMARY KEY (handler, `key`), \
                   KEY {table}_expires (expires_at) \
                 ) ENGINE=InnoDB ROW_FORMAT=DYNAMIC DEFAULT CHARSET=utf8mb4"
            ),
        }];
        let mut conn = store.pool().acquire().await.map_err(|e| store.err(e))?;
        let lock = "CONCAT('idem:', SHA1(CONCAT(DATABASE(), '.', ?)))";
        let outcome = async {
            let version: String = sqlx::query_scalar("SELECT VERSION()")
                .fetch_one(&mut *conn)
                .await
                .map_err(|e| store.err(e))?;
            check_server(&version).map_err(|message| store.config(message))?;
            let locked: Option<i64> =
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT GET_LOCK({lock}, 600)")))
                    .bind(&log_table)
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(|e| store.err(e))?;
            if locked != Some(1) {
                return Err(StoreError::Unavailable {
                    store: MysqlDialect::STORE,
                    source: format!(
                        "another process held the migration lock of {t:?} for 10 minutes"
                    )
                    .into(),
                });
            }
            let applied = Migrator::<MySql>::apply(&mut conn, &log, migrations)
                .await
                .map_err(|e| store.err(e))?;
            conn.execute(
                sqlx::query(sqlx::AssertSqlSafe(format!("DO RELEASE_LOCK({lock})")))
                    .bind(&log_table),
            )
            .await
            .map_err(|e| store.err(e))?;
            Ok(applied)
        }
        .await;
        if outcome.is_err() {
            // Ending the session is what surely frees a lock still held.
            conn.close_on_drop();
        }
        outcome
    }

    async fn claim(
        store: &MysqlStore,
        conn: &mut MySqlConnection,
        requests: &[ClaimRequest<'_>],
    ) -> Result<Vec<Claim>, StoreError> {
        for r in requests {
            store.check_fits(r)?;
        }
        let token = claim_token();
        if let [one] = requests {
            return Ok(vec![store.claim_one(conn, one, token).await?]);
        }
        store.claim_many(conn, requests, token).await
    }

    async fn save_results(
        store: &MysqlStore,
        conn: &mut MySqlConnection,
        done: &[&Claimed<'_>],
    ) -> Result<(), StoreError> {
        let mut rows = JsonRows::with_capacity(done.len() * 64);
        for c in done {
            rows.row(|row| {
                row.text(c.request.handler);
                row.text(c.request.key.as_str());
                row.optional_text(c.result);
            });
        }
        sqlx::query(store.statements().save_results.sql())
            .bind(rows.finish())
            .execute(conn)
            .await
            .map_err(|e| store.err(e))?;
        Ok(())
    }

    async fn unclaim(
        store: &MysqlStore,
        conn: &mut MySqlConnection,
        claimed: &[Claimed<'_>],
    ) -> Result<(), StoreError> {
        let keys = claimed
            .iter()
            .map(|c| (c.request.handler, c.request.key.as_str()));
        delete_keys(store, conn, keys, claimed.len()).await?;
        Ok(())
    }

    /// One short `READ COMMITTED` transaction (no gap locks, so consumers
    /// inserting new rows never wait on a purge): lock up to `limit` expired
    /// rows no consumer holds, delete them.
    async fn purge(store: &MysqlStore, limit: u32) -> Result<u64, StoreError> {
        let mut conn = store.pool().acquire().await.map_err(|e| store.err(e))?;
        conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            .await
            .map_err(|e| store.err(e))?;
        let mut tx = sqlx::Acquire::begin(&mut *conn)
            .await
            .map_err(|e| store.err(e))?;
        let expired = sqlx::query(store.statements().expired.sql())
            .bind(limit)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| store.err(e))?;
        if expired.is_empty() {
            tx.commit().await.map_err(|e| store.err(e))?;
            return Ok(0);
        }
        let done = delete_keys(
            store,
            &mut tx,
            expired.iter().map(|row| (row.get(0), row.get(1))),
            expired.len(),
        )
        .await?;
        tx.commit().await.map_err(|e| store.err(e))?;
        Ok(done)
    }

    fn classify(error: &dyn DatabaseError) -> Failure {
        let number = error
            .try_downcast_ref::<MySqlDatabaseError>()
            .map_or(0, MySqlDatabaseError::number);
        classify(number, error.code().as_deref().unwrap_or(""))
    }
}

/// Deletes the rows of these `(handler, key)`s in one statement; returns
/// how many it deleted.
async fn delete_keys<'k>(
    store: &MysqlStore,
    conn: &mut MySqlConnection,
    keys: impl Iterator<Item = (&'k str, &'k str)>,
    count: usize,
) -> Result<u64, StoreError> {
    let mut rows = JsonRows::with_capacity(count * 48);
    for (handler, key) in keys {
        rows.row(|row| {
            row.text(handler);
            row.text(key);
        });
    }
    let done = sqlx::query(store.statements().unclaim.sql())
        .bind(rows.finish())
        .execute(conn)
        .await
        .map_err(|e| store.err(e))?;
    Ok(done.rows_affected())
}

/// `Err(why)` unless `version` (`SELECT VERSION()`) is MariaDB 10.6 or later.
fn check_server(version: &str) -> Result<(), String> {
    // Old MariaDB servers prefix their version for MySQL 5 clients.
    let numbers: Vec<u32> = version
        .strip_prefix("5.5.5-")
        .unwrap_or(version)
        .split(|c: char| !c.is_ascii_digit())
        .take(2)
        .filter_map(|n| n.parse().ok())
        .collect();
    let mariadb = version.contains("MariaDB");
    match numbers[..] {
        [major, minor] if mariadb && (major, minor) >= (10, 6) => Ok(()),
        _ if !mariadb => Err(format!(
            "server {version} is MySQL: the mysql store runs on MariaDB 10.6 or later \
             (it claims with INSERT … RETURNING, which MySQL lacks)"
        )),
        _ => Err(format!(
            "server {version} is too old: the mysql store needs MariaDB 10.6 or later \
             (INSERT … RETURNING, JSON_TABLE)"
        )),
    }
}

/// MariaDB's table, by error number and SQLSTATE (see the [module](self) docs).
fn classify(number: u16, sqlstate: &str) -> Failure {
    const TRANSIENT: [u16; 25] = [
        1021, // ER_DISK_FULL
        1037, // ER_OUTOFMEMORY
        1038, // ER_OUT_OF_SORTMEMORY
        1040, // ER_CON_COUNT_ERROR
        1041, // ER_OUT_OF_RESOURCES
        1053, // ER_SERVER_SHUTDOWN
        1114, // ER_RECORD_FILE_FULL
        1152, // ER_ABORTING_CONNECTION
        1154, // ER_NET_READ_ERROR_FROM_PIPE
        1155, // ER_NET_FCNTL_ERROR
        1156, // ER_NET_PACKETS_OUT_OF_ORDER
        1157, // ER_NET_UNCOMPRESS_ERROR
        1158, // ER_NET_READ_ERROR
        1159, // ER_NET_READ_INTERRUPTED
        1160, // ER_NET_ERROR_ON_WRITE
        1161, // ER_NET_WRITE_INTERRUPTED
        1203, // ER_TOO_MANY_USER_CONNECTIONS
        1205, // ER_LOCK_WAIT_TIMEOUT
        1213, // ER_LOCK_DEADLOCK
        1226, // ER_USER_LIMIT_REACHED
        1290, // ER_OPTION_PREVENTS_STATEMENT (--read-only)
        1317, // ER_QUERY_INTERRUPTED
        1836, // ER_READ_ONLY_MODE
        1927, // ER_CONNECTION_KILLED
        1969, // ER_STATEMENT_TIMEOUT
    ];
    match number {
        1146 => Failure::MissingTable,
        // A packet over max_allowed_packet stays too large on every retry.
        1153 => Failure::Permanent,
        n if TRANSIENT.contains(&n) => Failure::Transient,
        _ if sqlstate.starts_with("08") || sqlstate == "40001" => Failure::Transient,
        _ => Failure::Permanent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified_by_number_and_sqlstate() {
        for (number, state, want) in [
            (1146, "42S02", Failure::MissingTable), // ER_NO_SUCH_TABLE
            (1213, "40001", Failure::Transient),    // ER_LOCK_DEADLOCK
            (1205, "HY000", Failure::Transient),    // ER_LOCK_WAIT_TIMEOUT
            (1040, "08004", Failure::Transient),    // ER_CON_COUNT_ERROR
            (1053, "08S01", Failure::Transient),    // ER_SERVER_SHUTDOWN
            (1927, "70100", Failure::Transient),    // ER_CONNECTION_KILLED
            (1290, "HY000", Failure::Transient),    // --read-only
            (9999, "08S01", Failure::Transient),    // any connection SQLSTATE
            (1153, "08S01", Failure::Permanent),    // packet too large
            (1406, "22001", Failure::Permanent),    // ER_DATA_TOO_LONG
            (1062, "23000", Failure::Permanent),    // ER_DUP_ENTRY
            (1064, "42000", Failure::Permanent),    // ER_PARSE_ERROR
            (1142, "42000", Failure::Permanent),    // ER_TABLEACCESS_DENIED_ERROR
            (1049, "42000", Failure::Permanent),    // ER_BAD_DB_ERROR
        ] {
            assert_eq!(classify(number, state), want, "{number} {state}");
        }
    }

    #[test]
    fn only_mariadb_10_6_or_later_is_supported() {
        assert!(check_server("10.11.19-MariaDB-0+deb12u1").is_ok());
        assert!(check_server("10.6.0-MariaDB").is_ok());
        assert!(check_server("11.4.2-MariaDB-log").is_ok());
        assert!(
            check_server("10.5.9-MariaDB")
                .unwrap_err()
                .contains("too old")
        );
        assert!(check_server("8.0.36").unwrap_err().contains("MySQL"));
        assert!(check_server("5.5.5-10.11.2-MariaDB").is_ok());
    }

    #[test]
    fn batch_parameters_are_json_arrays() {
        let mut rows = JsonRows::with_capacity(0);
        rows.row(|r| {
            r.text("h\"1");
            r.text("k\\😀\u{1}");
            r.number(Some(-5));
            r.number(None);
        });
        rows.row(|r| r.text(""));
        let json = rows.finish();
        assert_eq!(json, r#"[["h\"1","k\\😀\u0001",-5,null],[""]]"#);
        let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed[0][1], "k\\😀\u{1}");
    }
}
