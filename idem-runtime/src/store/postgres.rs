//! `store = "postgres"`: the dedup row is inserted in the handler's own
//! transaction, so the record and the business writes commit together, or
//! neither does (error, panic, crash, lost connection before `COMMIT`).
//!
//! # How a claim works
//!
//! One statement per claim call, whatever the number of keys: the keys go in
//! as arrays and `unnest` turns them into rows for
//! `INSERT … ON CONFLICT (handler, key) DO UPDATE … WHERE expired RETURNING`,
//! joined with the rows already there. New keys are claimed; committed keys
//! come back with their fingerprint and cached result (`Done`, or `Conflict`
//! when the payload differs); expired rows are taken over.
//!
//! Two consumers claiming the same key at once: PostgreSQL makes the second
//! `INSERT` wait on the first transaction's row lock. If the first commits,
//! the second sees the committed row and acks its message as a duplicate; if
//! it rolls back, the second claims the key and runs the handler. No unique
//! violation reaches the handler, and no effect is applied twice. (While it
//! waits, the second holds a pool connection; size the pool for the
//! runtime's concurrency.)
//!
//! Times (`created_at`, `expires_at`) are the server's clock, so consumers
//! on machines with skewed clocks agree on expiry.
//!
//! Migrations run in one transaction holding a transaction-scoped advisory
//! lock per table, so concurrent migrators wait for one another.
//!
//! Errors are classified by SQLSTATE: `42P01` (undefined table) and `3F000`
//! (undefined schema) mean `migrate()` was not run; classes `08`
//! (connection), `53` (insufficient resources), `57` (operator
//! intervention: shutdown, cancel) and `58` (system / I/O), and `40001`
//! (serialization failure), `40P01` (deadlock), `40003`, `55P03` (lock not
//! available) and `25006` (read-only transaction: a standby after a
//! failover) are transient; everything else is permanent.
//!
//! # Setup
//!
//! ```no_run
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use idem_runtime::store::postgres::PostgresStore;
//! let store = PostgresStore::connect("postgres://postgres@127.0.0.1:5432/postgres")
//!     .await?
//!     .with_schema("billing")?
//!     .with_table("idem_dedup")?;
//! store.migrate().await?; // versioned, idempotent, safe to run from many processes
//! # Ok(()) }
//! ```

use sqlx::error::DatabaseError;
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::{Postgres, Row};

use super::sql::{
    Dialect, Failure, Migration, MigrationLog, Migrator, Names, SqlStore, Statement, TWIN, connect,
    settled, ttl_millis, validate_identifier,
};
use super::{Claim, ClaimRequest, Claimed, StoreError};
use crate::fingerprint::Fingerprint;

/// The schema and table when none are configured.
pub const DEFAULT_SCHEMA: &str = "public";
/// The dedup table when none is configured.
pub const DEFAULT_TABLE: &str = super::sql::DEFAULT_TABLE;

/// The PostgreSQL dedup store (see the [module](self) docs). Cheap to clone
/// (a pool and shared statements).
pub type PostgresStore = SqlStore<PostgresDialect>;

/// PostgreSQL's [`Dialect`]: see the [module](self) docs.
#[derive(Debug)]
pub enum PostgresDialect {}

/// The store's SQL, built once per (schema, table) from validated names.
#[doc(hidden)]
pub struct Statements {
    claim: Statement,
    lookup: Statement,
    save_results: Statement,
    unclaim: Statement,
    purge: Statement,
}

/// Creates or upgrades the dedup table `public.idem_dedup` on `pool`;
/// returns the migration versions it applied.
/// Equivalent to `PostgresStore::new(pool.clone()).migrate()`; see
/// [`SqlStore::migrate`].
///
/// ```no_run
/// # async fn f(pool: sqlx::PgPool) -> Result<(), idem_runtime::StoreError> {
/// idem_runtime::postgres::migrate(&pool).await?;
/// # Ok(()) }
/// ```
pub async fn migrate(pool: &PgPool) -> Result<Vec<i64>, StoreError> {
    PostgresStore::new(pool.clone()).migrate().await
}

impl SqlStore<PostgresDialect> {
    /// Connects a pool to `url` (`postgres://user:pass@host:port/db`). The
    /// pool has 32 connections: a claim that waits on another consumer's
    /// claim of the same key holds its connection while it waits, so give
    /// the pool at least the runtime's concurrency. For other settings build
    /// the pool yourself and use [`SqlStore::new`]. Errors never contain
    /// the password.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Ok(Self::new(connect::<PostgresDialect>(url, 32).await?))
    }

    /// Uses another schema (validated: ASCII letters, digits, `_`).
    /// [`migrate`](SqlStore::migrate) creates it if missing.
    pub fn with_schema(self, schema: &str) -> Result<Self, StoreError> {
        validate_identifier(PostgresDialect::STORE, schema)?;
        let table = self.names().table.clone();
        Ok(self.with_names(Some(schema), &table))
    }

    /// The claim statement as the store issues it (for benchmarks that
    /// compare idem with a hand-written loop running the same SQL). It binds
    /// five arrays: handlers, keys, fingerprints, message ids, TTLs in ms.
    #[doc(hidden)]
    pub fn claim_statement(&self) -> &str {
        self.statements().claim.as_str()
    }

    /// Reads one committed record (the slow path of a claim that waited on
    /// another transaction: its row was committed after our statement's
    /// snapshot, so the claim statement could not see it).
    async fn lookup(
        &self,
        conn: &mut PgConnection,
        r: &ClaimRequest<'_>,
    ) -> Result<Claim, StoreError> {
        let row = sqlx::query(self.statements().lookup.sql())
            .bind(r.handler)
            .bind(r.key.as_str())
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| self.err(e))?;
        Ok(match row {
            Some(row) => settled(r, row.get(0), row.get(1)),
            // Deleted meanwhile (purged, or the other claim was undone by a
            // batch's unclaim): let the message come back and claim again.
            None => TWIN,
        })
    }
}

/// How a claim transaction starts. `force_custom_plan`: the claim joins the
/// keys with the dedup table, and a prepared statement's cached *generic*
/// plan is made while the table is still small (a fresh deployment): the
/// planner then picks a sequential scan and keeps it as the table grows,
/// and every claim slows down with the table's size (measured: 10× slower
/// after 50,000 rows). Custom plans are made with the table's current size,
/// so they use the primary key. Same message as the `BEGIN`: no extra round
/// trip; `LOCAL` ends with the transaction.
const BEGIN: &str = "BEGIN; SET LOCAL plan_cache_mode = force_custom_plan";

impl super::sql::sealed::Sealed for PostgresDialect {}

impl Dialect for PostgresDialect {
    type Db = Postgres;
    type Statements = Statements;
    const STORE: &'static str = "postgres";
    const TYPE_NAME: &'static str = "PostgresStore";
    const BEGIN: Option<&'static str> = Some(BEGIN);
    const DEFAULT_SCHEMA: Option<&'static str> = Some(DEFAULT_SCHEMA);

    fn statements(names: &Names) -> Statements {
        let t = &names.qualified;
        Statements {
            // `first`: a key given twice in one call is claimed once; the
            // later copies report InProgress (their twin holds the claim).
            // `ins`: the claim proper, in key order so that two batches lock
            // rows in the same order. The outer join reads the rows that were
            // committed before this statement began.
            claim: format!(
                "WITH req AS ( \
                   SELECT r.*, row_number() OVER (PARTITION BY r.handler, r.key ORDER BY r.ord) = 1 AS first \
                   FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[], $5::int8[]) \
                        WITH ORDINALITY AS r(handler, key, fingerprint, message_id, ttl_ms, ord) \
                 ), ins AS ( \
                   INSERT INTO {t} AS d (handler, key, fingerprint, message_id, created_at, expires_at) \
                   SELECT handler, key, fingerprint, message_id, now(), now() + ttl_ms * interval '1 millisecond' \
                   FROM req WHERE first ORDER BY handler, key \
                   ON CONFLICT (handler, key) DO UPDATE SET fingerprint = EXCLUDED.fingerprint, \
                     message_id = EXCLUDED.message_id, result = NULL, created_at = EXCLUDED.created_at, \
                     expires_at = EXCLUDED.expires_at \
                   WHERE d.expires_at IS NOT NULL AND d.expires_at <= now() \
                   RETURNING d.handler, d.key \
                 ) \
                 SELECT r.first, (i.key IS NOT NULL) AS new, d.fingerprint, d.result \
                 FROM req r \
                 LEFT JOIN ins i ON r.first AND i.handler = r.handler AND i.key = r.key \
                 LEFT JOIN {t} d ON d.handler = r.handler AND d.key = r.key \
                 ORDER BY r.ord"
            )
            .into(),
            lookup: format!("SELECT fingerprint, result FROM {t} WHERE handler = $1 AND key = $2")
                .into(),
            save_results: format!(
                "UPDATE {t} AS d SET result = r.result \
                 FROM unnest($1::text[], $2::text[], $3::text[]) AS r(handler, key, result) \
                 WHERE d.handler = r.handler AND d.key = r.key"
            )
            .into(),
            unclaim: format!(
                "DELETE FROM {t} AS d USING unnest($1::text[], $2::text[]) AS r(handler, key) \
                 WHERE d.handler = r.handler AND d.key = r.key"
            )
            .into(),
            // SKIP LOCKED: never wait on (or block) a consumer's claim.
            purge: format!(
                "DELETE FROM {t} WHERE ctid = ANY(ARRAY( \
                   SELECT ctid FROM {t} WHERE expires_at IS NOT NULL AND expires_at <= now() \
                   LIMIT $1 FOR UPDATE SKIP LOCKED))"
            )
            .into(),
        }
    }

    /// One transaction: a transaction-scoped advisory lock per table (the
    /// concurrent migrators wait on it), the schema, then the migrations.
    async fn migrate(store: &PostgresStore) -> Result<Vec<i64>, StoreError> {
        let names = store.names();
        let (schema, table, t) = (
            names.schema.as_deref().unwrap_or(DEFAULT_SCHEMA),
            &names.table,
            &names.qualified,
        );
        let log_table = names.migrations_log();
        let create = format!(
            "CREATE SCHEMA IF NOT EXISTS {schema}; \
             CREATE TABLE IF NOT EXISTS {log_table} ( \
               version bigint PRIMARY KEY, description text NOT NULL, \
               applied_at timestamptz NOT NULL DEFAULT now())"
        );
        // Versions only ever get appended.
        let migrations = vec![Migration {
            version: 1,
            description: "create the dedup table",
            sql: format!(
                "CREATE TABLE IF NOT EXISTS {t} ( \
                   handler     text        NOT NULL, \
                   key         text        NOT NULL, \
                   fingerprint bigint      NOT NULL, \
                   message_id  text        NOT NULL, \
                   result      text, \
                   created_at  timestamptz NOT NULL DEFAULT now(), \
                   expires_at  timestamptz, \
                   PRIMARY KEY (handler, key)); \
                 CREATE INDEX IF NOT EXISTS {table}_expires ON {t} (expires_at) WHERE expires_at IS NOT NULL;"
            ),
        }];
        let log = MigrationLog::new(&log_table, create, ["$1", "$2"]);
        // One lock per table name; concurrent migrators wait here.
        let lock = (
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            log_table.as_str(),
        );
        Migrator::<Postgres>::in_transaction(store.pool(), None, Some(lock), &log, migrations)
            .await
            .map_err(|e| store.err(e))
    }

    async fn claim(
        store: &PostgresStore,
        conn: &mut PgConnection,
        requests: &[ClaimRequest<'_>],
    ) -> Result<Vec<Claim>, StoreError> {
        let n = requests.len();
        let query = sqlx::query(store.statements().claim.sql());
        // One key (the common case) binds arrays on the stack.
        let query = if let [r] = requests {
            query
                .bind([r.handler])
                .bind([r.key.as_str()])
                .bind([Fingerprint::stored(r.fingerprint)])
                .bind([r.message_id])
                .bind([ttl_millis(r)])
        } else {
            query
                .bind(requests.iter().map(|r| r.handler).collect::<Vec<_>>())
                .bind(requests.iter().map(|r| r.key.as_str()).collect::<Vec<_>>())
                .bind(
                    requests
                        .iter()
                        .map(|r| Fingerprint::stored(r.fingerprint))
                        .collect::<Vec<_>>(),
                )
                .bind(requests.iter().map(|r| r.message_id).collect::<Vec<_>>())
                .bind(requests.iter().map(ttl_millis).collect::<Vec<_>>())
        };
        let rows = query
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| store.err(e))?;
        if rows.len() != n {
            return Err(store.config(format!(
                "claim statement returned {} rows for {n} keys",
                rows.len()
            )));
        }
        let mut out = Vec::with_capacity(n);
        for (row, r) in rows.iter().zip(requests) {
            let first: bool = row.get(0);
            let new: bool = row.get(1);
            let stored: Option<i64> = row.get(2);
            out.push(match (first, new, stored) {
                (false, _, _) => TWIN,
                (true, true, _) => Claim::New { token: 0 },
                (true, false, Some(fp)) => settled(r, fp, row.get(3)),
                (true, false, None) => store.lookup(conn, r).await?,
            });
        }
        Ok(out)
    }

    async fn save_results(
        store: &PostgresStore,
        conn: &mut PgConnection,
        done: &[&Claimed<'_>],
    ) -> Result<(), StoreError> {
        sqlx::query(store.statements().save_results.sql())
            .bind(done.iter().map(|c| c.request.handler).collect::<Vec<_>>())
            .bind(
                done.iter()
                    .map(|c| c.request.key.as_str())
                    .collect::<Vec<_>>(),
            )
            .bind(done.iter().map(|c| c.result).collect::<Vec<_>>())
            .execute(conn)
            .await
            .map_err(|e| store.err(e))?;
        Ok(())
    }

    async fn unclaim(
        store: &PostgresStore,
        conn: &mut PgConnection,
        claimed: &[Claimed<'_>],
    ) -> Result<(), StoreError> {
        sqlx::query(store.statements().unclaim.sql())
            .bind(
                claimed
                    .iter()
                    .map(|c| c.request.handler)
                    .collect::<Vec<_>>(),
            )
            .bind(
                claimed
                    .iter()
                    .map(|c| c.request.key.as_str())
                    .collect::<Vec<_>>(),
            )
            .execute(conn)
            .await
            .map_err(|e| store.err(e))?;
        Ok(())
    }

    async fn purge(store: &PostgresStore, limit: u32) -> Result<u64, StoreError> {
        let done = sqlx::query(store.statements().purge.sql())
            .bind(i64::from(limit))
            .execute(store.pool())
            .await
            .map_err(|e| store.err(e))?;
        Ok(done.rows_affected())
    }

    fn classify(error: &dyn DatabaseError) -> Failure {
        classify(error.code().as_deref().unwrap_or(""))
    }
}

/// PostgreSQL's table, by SQLSTATE (see the [module](self) docs).
fn classify(sqlstate: &str) -> Failure {
    match sqlstate {
        "42P01" | "3F000" => Failure::MissingTable,
        "40001" | "40P01" | "40003" | "55P03" | "25006" => Failure::Transient,
        s if ["08", "53", "57", "58"]
            .iter()
            .any(|class| s.starts_with(class)) =>
        {
            Failure::Transient
        }
        _ => Failure::Permanent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified_by_sqlstate() {
        for (state, want) in [
            ("42P01", Failure::MissingTable), // undefined_table
            ("3F000", Failure::MissingTable), // invalid_schema_name
            ("08006", Failure::Transient),    // connection_failure
            ("08001", Failure::Transient),    // sqlclient_unable_to_establish_sqlconnection
            ("40001", Failure::Transient),    // serialization_failure
            ("40P01", Failure::Transient),    // deadlock_detected
            ("53300", Failure::Transient),    // too_many_connections
            ("57P01", Failure::Transient),    // admin_shutdown
            ("57014", Failure::Transient),    // query_canceled
            ("58030", Failure::Transient),    // io_error
            ("55P03", Failure::Transient),    // lock_not_available
            ("25006", Failure::Transient),    // read_only_sql_transaction
            ("42501", Failure::Permanent),    // insufficient_privilege
            ("42601", Failure::Permanent),    // syntax_error
            ("23505", Failure::Permanent),    // unique_violation
            ("22001", Failure::Permanent),    // string_data_right_truncation
            ("", Failure::Permanent),
        ] {
            assert_eq!(classify(state), want, "{state}");
        }
    }
}
