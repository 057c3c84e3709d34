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

use std::sync::Arc;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Executor, Postgres, Row};

use super::sql::{Tx, map_err, validate_identifier};
use super::{Claim, ClaimRequest, Claimed, StoreError, TxStore};
use crate::fingerprint::Fingerprint;

const STORE: &str = "postgres";

/// How a claim transaction starts. `force_custom_plan`: the claim joins the
/// keys with the dedup table, and a prepared statement's cached *generic*
/// plan is made while the table is still small (a fresh deployment): the
/// planner then picks a sequential scan and keeps it as the table grows,
/// and every claim slows down with the table's size (measured: 10× slower
/// after 50,000 rows). Custom plans are made with the table's current size,
/// so they use the primary key. Same message as the `BEGIN`: no extra round
/// trip; `LOCAL` ends with the transaction.
const BEGIN: &str = "BEGIN; SET LOCAL plan_cache_mode = force_custom_plan";

/// The schema and table when none are configured.
pub const DEFAULT_SCHEMA: &str = "public";
/// The dedup table when none is configured.
pub const DEFAULT_TABLE: &str = "idem_dedup";

/// The PostgreSQL dedup store. Cheap to clone (a pool and shared statements).
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    sql: Arc<Statements>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The pool's options hold the password: print the table only.
        f.debug_struct("PostgresStore")
            .field("table", &self.sql.qualified)
            .finish_non_exhaustive()
    }
}

/// The store's SQL, built once per (schema, table) from validated names.
struct Statements {
    schema: String,
    table: String,
    qualified: String,
    claim: Arc<str>,
    lookup: Arc<str>,
    save_results: Arc<str>,
    unclaim: Arc<str>,
    purge: Arc<str>,
}

impl Statements {
    fn new(schema: &str, table: &str) -> Self {
        let t = format!("{schema}.{table}");
        Statements {
            schema: schema.to_owned(),
            table: table.to_owned(),
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
            qualified: t,
        }
    }
}

/// The store's versioned migrations: `(version, description, SQL)`. The SQL
/// is built for the configured schema and table; versions only ever get
/// appended. Applied versions are recorded in `<table>_migrations`.
fn migrations(schema: &str, table: &str) -> [(i64, &'static str, String); 1] {
    let t = format!("{schema}.{table}");
    [(
        1,
        "create the dedup table",
        format!(
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
    )]
}

/// Creates or upgrades the dedup table `public.idem_dedup` on `pool`;
/// returns the migration versions it applied.
/// Equivalent to `PostgresStore::new(pool.clone()).migrate()`; see
/// [`PostgresStore::migrate`].
///
/// ```no_run
/// # async fn f(pool: sqlx::PgPool) -> Result<(), idem_runtime::StoreError> {
/// idem_runtime::postgres::migrate(&pool).await?;
/// # Ok(()) }
/// ```
pub async fn migrate(pool: &PgPool) -> Result<Vec<i64>, StoreError> {
    PostgresStore::new(pool.clone()).migrate().await
}

impl PostgresStore {
    /// A store on an existing pool, with table `public.idem_dedup`.
    pub fn new(pool: PgPool) -> Self {
        PostgresStore {
            pool,
            sql: Arc::new(Statements::new(DEFAULT_SCHEMA, DEFAULT_TABLE)),
        }
    }

    /// Connects a pool to `url` (`postgres://user:pass@host:port/db`). The
    /// pool has 32 connections: a claim that waits on another consumer's
    /// claim of the same key holds its connection while it waits, so give
    /// the pool at least the runtime's concurrency. For other settings build
    /// the pool yourself and use [`PostgresStore::new`]. Errors never contain
    /// the password.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(32)
            .connect(url)
            .await
            .map_err(|e| StoreError::Unavailable {
                store: STORE,
                source: format!(
                    "cannot connect to {}: {}",
                    crate::redact::RedactedUrl(url),
                    crate::redact::redact_text(&e.to_string(), url)
                )
                .into(),
            })?;
        Ok(Self::new(pool))
    }

    /// Uses another schema (validated: ASCII letters, digits, `_`).
    /// [`migrate`](Self::migrate) creates it if missing.
    pub fn with_schema(self, schema: &str) -> Result<Self, StoreError> {
        validate_identifier(STORE, schema)?;
        let table = self.sql.table.clone();
        Ok(self.with_names(schema, &table))
    }

    /// Uses another table name (validated: ASCII letters, digits, `_`).
    pub fn with_table(self, table: &str) -> Result<Self, StoreError> {
        validate_identifier(STORE, table)?;
        // `<table>_migrations` must be a valid name too.
        validate_identifier(STORE, &format!("{table}_migrations"))?;
        let schema = self.sql.schema.clone();
        Ok(self.with_names(&schema, table))
    }

    fn with_names(mut self, schema: &str, table: &str) -> Self {
        self.sql = Arc::new(Statements::new(schema, table));
        self
    }

    /// The pool, for the application's own queries.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The claim statement as the store issues it (for benchmarks that
    /// compare idem with a hand-written loop running the same SQL).
    #[doc(hidden)]
    pub fn claim_statement(&self) -> &str {
        &self.sql.claim
    }

    /// The dedup table, schema-qualified (`public.idem_dedup`).
    pub fn qualified_table(&self) -> &str {
        &self.sql.qualified
    }

    /// Creates the schema if missing and applies the migrations not applied
    /// yet, each in its own transaction, recording them in
    /// `<table>_migrations`. Safe to call from several processes at once (a
    /// transaction-scoped advisory lock serialises them) and on every
    /// start-up. Returns the versions it applied.
    pub async fn migrate(&self) -> Result<Vec<i64>, StoreError> {
        let (schema, table) = (&self.sql.schema, &self.sql.table);
        let log = format!("{schema}.{table}_migrations");
        let setup = format!(
            "CREATE SCHEMA IF NOT EXISTS {schema}; \
             CREATE TABLE IF NOT EXISTS {log} ( \
               version bigint PRIMARY KEY, description text NOT NULL, \
               applied_at timestamptz NOT NULL DEFAULT now())"
        );
        let mut applied = Vec::new();
        let mut tx = self.pool.begin().await.map_err(|e| self.err(e))?;
        // One lock per table name; concurrent migrators wait here.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
            .bind(&log)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
        (&mut *tx)
            .execute(sqlx::raw_sql(AssertSqlSafe(setup)))
            .await
            .map_err(|e| self.err(e))?;
        let done: Vec<i64> =
            sqlx::query_scalar(AssertSqlSafe(format!("SELECT version FROM {log}")))
                .fetch_all(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
        for (version, description, ddl) in migrations(schema, table) {
            if done.contains(&version) {
                continue;
            }
            (&mut *tx)
                .execute(sqlx::raw_sql(AssertSqlSafe(ddl)))
                .await
                .map_err(|e| self.err(e))?;
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {log} (version, description) VALUES ($1, $2)"
            )))
            .bind(version)
            .bind(description)
            .execute(&mut *tx)
            .await
            .map_err(|e| self.err(e))?;
            applied.push(version);
        }
        tx.commit().await.map_err(|e| self.err(e))?;
        Ok(applied)
    }

    fn err(&self, e: sqlx::Error) -> StoreError {
        map_err(STORE, &self.sql.qualified, e)
    }

    /// Reads one committed record (the slow path of a claim that waited on
    /// another transaction: its row was committed after our statement's
    /// snapshot, so the claim statement could not see it).
    async fn lookup(
        &self,
        tx: &mut Tx<'_, Postgres>,
        r: &ClaimRequest<'_>,
    ) -> Result<Claim, StoreError> {
        let row = sqlx::query(AssertSqlSafe(self.sql.lookup.clone()))
            .bind(r.handler)
            .bind(r.key.as_str())
            .fetch_optional(&mut **tx)
            .await
            .map_err(|e| self.err(e))?;
        Ok(match row {
            Some(row) => done_or_conflict(r, row.get(0), row.get(1)),
            // Deleted meanwhile (purged, or the other claim was undone by a
            // batch's unclaim): let the message come back and claim again.
            None => Claim::InProgress {
                retry_after: std::time::Duration::ZERO,
            },
        })
    }
}

fn done_or_conflict(r: &ClaimRequest<'_>, stored: i64, cached: Option<String>) -> Claim {
    r.conflict_with(Fingerprint::from_stored(stored))
        .unwrap_or(Claim::Done { cached })
}

impl TxStore for PostgresStore {
    type Tx<'c> = Tx<'c, Postgres>;

    fn kind(&self) -> &'static str {
        STORE
    }

    async fn begin(&self) -> Result<Tx<'static, Postgres>, StoreError> {
        let tx = self.pool.begin_with(BEGIN).await.map_err(|e| self.err(e))?;
        Ok(Tx::new(tx))
    }

    async fn claim(
        &self,
        tx: &mut Self::Tx<'_>,
        requests: &[ClaimRequest<'_>],
    ) -> Result<Vec<Claim>, StoreError> {
        let n = requests.len();
        let mut handlers = Vec::with_capacity(n);
        let mut keys = Vec::with_capacity(n);
        let mut fingerprints = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        let mut ttls = Vec::with_capacity(n);
        for r in requests {
            handlers.push(r.handler);
            keys.push(r.key.as_str());
            fingerprints.push(Fingerprint::stored(r.fingerprint));
            ids.push(r.message_id);
            ttls.push(
                r.ttl
                    .map(|t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX)),
            );
        }
        let rows = sqlx::query(AssertSqlSafe(self.sql.claim.clone()))
            .bind(&handlers)
            .bind(&keys)
            .bind(&fingerprints)
            .bind(&ids)
            .bind(&ttls)
            .fetch_all(&mut **tx)
            .await
            .map_err(|e| self.err(e))?;
        if rows.len() != n {
            return Err(StoreError::Config {
                store: STORE,
                message: format!("claim statement returned {} rows for {n} keys", rows.len()),
            });
        }
        let mut out = Vec::with_capacity(n);
        for (row, r) in rows.iter().zip(requests) {
            let first: bool = row.get(0);
            let new: bool = row.get(1);
            let stored: Option<i64> = row.get(2);
            out.push(match (first, new, stored) {
                (false, _, _) => Claim::InProgress {
                    retry_after: std::time::Duration::ZERO,
                },
                (true, true, _) => Claim::New { token: 0 },
                (true, false, Some(fp)) => done_or_conflict(r, fp, row.get(3)),
                (true, false, None) => self.lookup(tx, r).await?,
            });
        }
        Ok(out)
    }

    async fn commit(
        &self,
        mut tx: Tx<'static, Postgres>,
        done: &[Claimed<'_>],
    ) -> Result<(), StoreError> {
        let with_result = done.iter().filter(|c| c.result.is_some()).count();
        if with_result > 0 {
            let mut handlers = Vec::with_capacity(with_result);
            let mut keys = Vec::with_capacity(with_result);
            let mut results = Vec::with_capacity(with_result);
            for c in done {
                if let Some(result) = c.result {
                    handlers.push(c.request.handler);
                    keys.push(c.request.key.as_str());
                    results.push(result);
                }
            }
            sqlx::query(AssertSqlSafe(self.sql.save_results.clone()))
                .bind(&handlers)
                .bind(&keys)
                .bind(&results)
                .execute(&mut *tx)
                .await
                .map_err(|e| self.err(e))?;
        }
        tx.into_inner().commit().await.map_err(|e| self.err(e))
    }

    async fn rollback(&self, tx: Tx<'static, Postgres>) -> Result<(), StoreError> {
        super::sql::rollback(tx).await.map_err(|e| self.err(e))
    }

    async fn unclaim(
        &self,
        tx: &mut Self::Tx<'_>,
        claimed: &[Claimed<'_>],
    ) -> Result<(), StoreError> {
        if claimed.is_empty() {
            return Ok(());
        }
        let handlers: Vec<&str> = claimed.iter().map(|c| c.request.handler).collect();
        let keys: Vec<&str> = claimed.iter().map(|c| c.request.key.as_str()).collect();
        sqlx::query(AssertSqlSafe(self.sql.unclaim.clone()))
            .bind(&handlers)
            .bind(&keys)
            .execute(&mut **tx)
            .await
            .map_err(|e| self.err(e))?;
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
            .bind(i64::from(limit))
            .execute(&self.pool)
            .await
            .map_err(|e| self.err(e))?;
        Ok(done.rows_affected())
    }
}
