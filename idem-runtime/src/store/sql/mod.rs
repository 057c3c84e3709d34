//! One SQL dedup store over three databases: [`SqlStore<D>`] holds what is
//! the same everywhere (the pool, the table names, the transaction the
//! handler writes through, commit / rollback / savepoints, versioned
//! migrations, error classification), and a small [`Dialect`] holds what
//! differs (SQL text, bind shapes, how a batch claim is one round trip, the
//! migration DDL and lock, which error codes are transient).
//!
//! Users name the dialects through their aliases:
//! [`SqliteStore`](super::sqlite::SqliteStore),
//! [`PostgresStore`](super::postgres::PostgresStore) and
//! [`MysqlStore`](super::mysql::MysqlStore). This module is not where a
//! database's behaviour is documented; each dialect's module is.

use std::future::Future;
use std::sync::Arc;

use sqlx::error::DatabaseError;
use sqlx::pool::Pool;

use super::{Claim, ClaimRequest, Claimed, StoreError, TxStore};
use crate::fingerprint::Fingerprint;

#[cfg(any(feature = "sqlite", feature = "mysql"))]
mod batch;
mod error;
mod migrate;
mod tx;

#[cfg(any(feature = "sqlite", feature = "mysql"))]
pub(crate) use batch::LockOrder;
#[cfg(feature = "sqlite")]
pub(crate) use batch::push_placeholders;
pub use error::Failure;
pub(crate) use migrate::{Migration, MigrationLog, Migrator};
pub use tx::{DefaultDb, Tx};

/// The dedup table when none is configured.
pub const DEFAULT_TABLE: &str = "idem_dedup";

/// What one database does differently. Implemented by
/// [`SqliteDialect`](super::sqlite::SqliteDialect),
/// [`PostgresDialect`](super::postgres::PostgresDialect) and
/// [`MysqlDialect`](super::mysql::MysqlDialect); sealed, because the store's
/// guarantees (one round trip per claim, waiting on a racing claim, no
/// unique violation reaching a handler) are tested per dialect.
///
/// The methods are the store's internals and hidden from the docs.
pub trait Dialect: sealed::Sealed + Send + Sync + Sized + 'static {
    /// The sqlx database.
    type Db: sqlx::Database;
    /// The SQL of one table, built once when the table is named.
    #[doc(hidden)]
    type Statements: Send + Sync + 'static;
    /// The store's name in listings, logs and errors (`"postgres"`, …).
    const STORE: &'static str;
    /// The store's type name, for `Debug`.
    #[doc(hidden)]
    const TYPE_NAME: &'static str;
    /// How a claim transaction starts (`None`: sqlx's `BEGIN`).
    #[doc(hidden)]
    const BEGIN: Option<&'static str>;
    /// The schema the table lives in unless configured (`None`: no schema
    /// prefix; the connection's database).
    #[doc(hidden)]
    const DEFAULT_SCHEMA: Option<&'static str>;

    #[doc(hidden)]
    fn statements(names: &Names) -> Self::Statements;

    /// Applies the migrations not applied yet, under the dialect's lock.
    #[doc(hidden)]
    fn migrate(store: &SqlStore<Self>)
    -> impl Future<Output = Result<Vec<i64>, StoreError>> + Send;

    /// Claims all keys in one round trip (SQLite: in-process, one statement
    /// claiming the keys and one reading the records already there). A key
    /// given twice is claimed once, the copies answer `InProgress`.
    #[doc(hidden)]
    fn claim(
        store: &SqlStore<Self>,
        conn: &mut <Self::Db as sqlx::Database>::Connection,
        requests: &[ClaimRequest<'_>],
    ) -> impl Future<Output = Result<Vec<Claim>, StoreError>> + Send;

    /// Stores the results of the claims that have one (never called empty).
    #[doc(hidden)]
    fn save_results(
        store: &SqlStore<Self>,
        conn: &mut <Self::Db as sqlx::Database>::Connection,
        done: &[&Claimed<'_>],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes these claims' rows (never called empty).
    #[doc(hidden)]
    fn unclaim(
        store: &SqlStore<Self>,
        conn: &mut <Self::Db as sqlx::Database>::Connection,
        claimed: &[Claimed<'_>],
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Deletes up to `limit` expired rows, skipping rows a consumer holds.
    #[doc(hidden)]
    fn purge(
        store: &SqlStore<Self>,
        limit: u32,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// What an error the database returned means (see [`Failure`]).
    #[doc(hidden)]
    fn classify(error: &dyn DatabaseError) -> Failure;
}

/// Seals [`Dialect`]: each dialect's module implements it beside its
/// `Dialect` impl, so this module names none of them.
pub(in crate::store) mod sealed {
    pub trait Sealed {}
}

/// The validated names a store's SQL is built from.
#[doc(hidden)]
#[derive(Debug, Clone)]
pub struct Names {
    /// The schema, for databases that have them in SQL text (PostgreSQL).
    pub schema: Option<String>,
    /// The dedup table.
    pub table: String,
    /// `schema.table`, or `table`.
    pub qualified: String,
}

impl Names {
    fn new(schema: Option<&str>, table: &str) -> Self {
        Names {
            schema: schema.map(str::to_owned),
            table: table.to_owned(),
            qualified: match schema {
                Some(schema) => format!("{schema}.{table}"),
                None => table.to_owned(),
            },
        }
    }

    /// `<schema>.<table>_migrations`: where applied versions are recorded.
    pub fn migrations_log(&self) -> String {
        format!("{}_migrations", self.qualified)
    }
}

/// A table's names and the SQL built from them, shared by clones.
struct Prepared<D: Dialect> {
    names: Names,
    statements: D::Statements,
}

/// The SQL dedup store: the dedup row is written in the handler's own
/// transaction, so the record and the handler's writes commit together or
/// not at all. Use it through its aliases
/// [`SqliteStore`](super::sqlite::SqliteStore),
/// [`PostgresStore`](super::postgres::PostgresStore) and
/// [`MysqlStore`](super::mysql::MysqlStore), whose modules document each
/// database's constructors and behaviour. Cheap to clone (a pool and shared
/// statements).
pub struct SqlStore<D: Dialect> {
    pool: Pool<D::Db>,
    sql: Arc<Prepared<D>>,
}

impl<D: Dialect> Clone for SqlStore<D> {
    fn clone(&self) -> Self {
        SqlStore {
            pool: self.pool.clone(),
            sql: self.sql.clone(),
        }
    }
}

impl<D: Dialect> std::fmt::Debug for SqlStore<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The pool's options hold the password: print the table only.
        f.debug_struct(D::TYPE_NAME)
            .field("table", &self.sql.names.qualified)
            .finish_non_exhaustive()
    }
}

impl<D: Dialect> SqlStore<D> {
    /// The default dedup table name, `idem_dedup`.
    pub const DEFAULT_TABLE: &'static str = DEFAULT_TABLE;

    /// A store on an existing pool, with the default table.
    pub fn new(pool: Pool<D::Db>) -> Self {
        SqlStore {
            pool,
            sql: Arc::new(Self::prepare(D::DEFAULT_SCHEMA, DEFAULT_TABLE)),
        }
    }

    fn prepare(schema: Option<&str>, table: &str) -> Prepared<D> {
        let names = Names::new(schema, table);
        Prepared {
            statements: D::statements(&names),
            names,
        }
    }

    /// Uses another table name (validated: ASCII letters, digits, `_`).
    /// Applied migrations are recorded in `<table>_migrations`.
    pub fn with_table(self, table: &str) -> Result<Self, StoreError> {
        validate_identifier(D::STORE, table)?;
        // `<table>_migrations` must be a valid name too.
        validate_identifier(D::STORE, &format!("{table}_migrations"))?;
        let schema = self.sql.names.schema.clone();
        Ok(self.with_names(schema.as_deref(), table))
    }

    pub(crate) fn with_names(mut self, schema: Option<&str>, table: &str) -> Self {
        self.sql = Arc::new(Self::prepare(schema, table));
        self
    }

    /// The pool, for the application's own queries.
    pub fn pool(&self) -> &Pool<D::Db> {
        &self.pool
    }

    /// The dedup table as it appears in SQL: `schema.table` on PostgreSQL
    /// (`public.idem_dedup`), the bare table elsewhere.
    pub fn qualified_table(&self) -> &str {
        &self.sql.names.qualified
    }

    /// Creates or upgrades the dedup table: applies the store's versioned
    /// migrations not applied yet and records them in `<table>_migrations`.
    /// Idempotent, and safe to call from several processes at once (they
    /// serialise on a lock: see the dialect's module). Call it once at
    /// start-up. Returns the versions it applied.
    pub async fn migrate(&self) -> Result<Vec<i64>, StoreError> {
        D::migrate(self).await
    }

    pub(crate) fn names(&self) -> &Names {
        &self.sql.names
    }

    pub(crate) fn statements(&self) -> &D::Statements {
        &self.sql.statements
    }

    /// Maps a driver error to a store error by its code (see [`Failure`]).
    pub(crate) fn err(&self, e: sqlx::Error) -> StoreError {
        error::map_err(D::STORE, &self.sql.names.qualified, D::classify, e)
    }

    /// A setup mistake that retrying cannot fix.
    pub(crate) fn config(&self, message: String) -> StoreError {
        StoreError::Config {
            store: D::STORE,
            message,
        }
    }
}

/// Connects a pool of `max_connections` to `url` for a server-backed
/// dialect; errors show the URL without its password.
#[cfg(any(feature = "postgres", feature = "mysql"))]
pub(crate) async fn connect<D: Dialect>(
    url: &str,
    max_connections: u32,
) -> Result<Pool<D::Db>, StoreError> {
    sqlx::pool::PoolOptions::<D::Db>::new()
        .max_connections(max_connections)
        .connect(url)
        .await
        .map_err(|e| StoreError::Unavailable {
            store: D::STORE,
            source: format!(
                "cannot connect to {}: {}",
                crate::redact::RedactedUrl(url),
                crate::redact::redact_text(&e.to_string(), url)
            )
            .into(),
        })
}

/// A statement's text, built once per table. Handing it to sqlx costs a
/// reference count, where a `&str` would be copied for every query.
#[derive(Clone)]
pub(crate) struct Statement(Arc<str>);

impl Statement {
    /// The statement, for `sqlx::query`.
    pub(crate) fn sql(&self) -> sqlx::AssertSqlSafe<Arc<str>> {
        sqlx::AssertSqlSafe(self.0.clone())
    }

    #[cfg(feature = "postgres")]
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<String> for Statement {
    fn from(sql: String) -> Self {
        Statement(sql.into())
    }
}

/// The answer for a key whose committed record has fingerprint `stored` and
/// result `cached`: `Done`, or `Conflict` when the payloads differ.
pub(crate) fn settled(r: &ClaimRequest<'_>, stored: i64, cached: Option<String>) -> Claim {
    r.conflict_with(Fingerprint::from_stored(stored))
        .unwrap_or(Claim::Done { cached })
}

/// The answer for a later copy of a key given twice in one claim: its twin
/// holds the claim.
pub(crate) const TWIN: Claim = Claim::InProgress {
    retry_after: std::time::Duration::ZERO,
};

/// The longest time to live a record gets: 1,000 years (longer ones would
/// overflow the databases' timestamps instead of meaning "very long").
const MAX_TTL_MILLIS: i64 = 1_000 * 366 * 24 * 3_600 * 1_000;

/// A record's time to live in milliseconds, `None` for "forever".
pub(crate) fn ttl_millis(r: &ClaimRequest<'_>) -> Option<i64> {
    r.ttl
        .map(|t| i64::try_from(t.as_millis()).map_or(MAX_TTL_MILLIS, |ms| ms.min(MAX_TTL_MILLIS)))
}

impl<D: Dialect> TxStore for SqlStore<D> {
    type Tx<'c> = Tx<'c, D::Db>;

    fn kind(&self) -> &'static str {
        D::STORE
    }

    async fn begin(&self) -> Result<Tx<'static, D::Db>, StoreError> {
        let tx = match D::BEGIN {
            Some(begin) => self.pool.begin_with(begin).await,
            None => self.pool.begin().await,
        };
        tx.map(Tx::new).map_err(|e| self.err(e))
    }

    async fn claim(
        &self,
        tx: &mut Self::Tx<'_>,
        requests: &[ClaimRequest<'_>],
    ) -> Result<Vec<Claim>, StoreError> {
        if requests.is_empty() {
            return Ok(Vec::new());
        }
        D::claim(self, tx.conn(), requests).await
    }

    async fn commit(
        &self,
        mut tx: Tx<'static, D::Db>,
        done: &[Claimed<'_>],
    ) -> Result<(), StoreError> {
        if done.iter().any(|c| c.result.is_some()) {
            let with_result: Vec<&Claimed<'_>> =
                done.iter().filter(|c| c.result.is_some()).collect();
            D::save_results(self, tx.conn(), &with_result).await?;
        }
        tx.into_inner().commit().await.map_err(|e| self.err(e))
    }

    async fn rollback(&self, tx: Tx<'static, D::Db>) -> Result<(), StoreError> {
        tx::rollback(tx).await.map_err(|e| self.err(e))
    }

    async fn unclaim(
        &self,
        tx: &mut Self::Tx<'_>,
        claimed: &[Claimed<'_>],
    ) -> Result<(), StoreError> {
        if claimed.is_empty() {
            return Ok(());
        }
        D::unclaim(self, tx.conn(), claimed).await
    }

    async fn savepoint<'t>(&self, tx: &'t mut Self::Tx<'_>) -> Result<Self::Tx<'t>, StoreError> {
        tx::savepoint(tx).await.map_err(|e| self.err(e))
    }

    async fn end_savepoint(&self, savepoint: Self::Tx<'_>, keep: bool) -> Result<(), StoreError> {
        tx::end_savepoint(savepoint, keep)
            .await
            .map_err(|e| self.err(e))
    }

    async fn purge_expired(&self, limit: u32) -> Result<u64, StoreError> {
        D::purge(self, limit.max(1)).await
    }
}

/// Checks a table (or schema) name before it is put into SQL text: ASCII
/// letters, digits and `_`, not starting with a digit, at most 63 bytes.
/// Anything else is rejected, not quoted: names come from configuration, and
/// a name with SQL in it is an attack or a typo either way.
///
/// ```
/// use idem_runtime::store::sql::validate_identifier;
/// assert!(validate_identifier("sqlite", "idem_dedup").is_ok());
/// assert!(validate_identifier("sqlite", "x; DROP TABLE orders").is_err());
/// ```
pub fn validate_identifier(store: &'static str, name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.as_bytes()[0].is_ascii_digit()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(StoreError::Config {
            store,
            message: format!(
                "invalid table name {name:?}: use 1 to 63 ASCII letters, digits or '_', not starting with a digit"
            ),
        })
    }
}
