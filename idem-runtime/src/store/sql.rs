//! What the SQL stores share: the handler's transaction handle and the
//! validation of table names that end up in SQL text.

use std::ops::{Deref, DerefMut};

use super::StoreError;

/// The database `Tx<'_>` means when none is named: SQLite when the `sqlite`
/// feature is on, PostgreSQL otherwise. `#[idempotent(store = "postgres")]`
/// fills in `Postgres` for a `&mut idem::Tx<'_>` parameter, so handlers need
/// not name it; outside handlers, write `Tx<'_, sqlx::Postgres>`.
#[cfg(feature = "sqlite")]
pub type DefaultDb = sqlx::Sqlite;
/// The database `Tx<'_>` means when none is named: SQLite when the `sqlite`
/// feature is on, PostgreSQL otherwise.
#[cfg(not(feature = "sqlite"))]
pub type DefaultDb = sqlx::Postgres;

/// The handler's transaction: its writes and the dedup record commit together.
///
/// Derefs to the database connection, so sqlx queries run on it directly:
///
/// ```no_run
/// # async fn f(tx: &mut idem_runtime::Tx<'_>) -> Result<(), sqlx::Error> {
/// sqlx::query("INSERT INTO shipments (order_id) VALUES (?)")
///     .bind(7_i64)
///     .execute(&mut **tx)
///     .await?;
/// # Ok(()) }
/// ```
///
/// Do not commit or roll back yourself: idem commits after the handler
/// returns `Ok` (and only then acks), and rolls back on `Err` or panic.
pub struct Tx<'c, DB: sqlx::Database = DefaultDb> {
    inner: sqlx::Transaction<'c, DB>,
}

impl<'c, DB: sqlx::Database> Tx<'c, DB> {
    pub(crate) fn new(inner: sqlx::Transaction<'c, DB>) -> Self {
        Tx { inner }
    }

    pub(crate) fn into_inner(self) -> sqlx::Transaction<'c, DB> {
        self.inner
    }

    /// The connection the transaction runs on (same as `&mut **tx`).
    pub fn conn(&mut self) -> &mut DB::Connection {
        &mut self.inner
    }

    /// The underlying sqlx transaction, e.g. to open a savepoint with
    /// `sqlx::Acquire::begin(tx.transaction())`.
    pub fn transaction(&mut self) -> &mut sqlx::Transaction<'c, DB> {
        &mut self.inner
    }
}

impl<DB: sqlx::Database> Deref for Tx<'_, DB> {
    type Target = DB::Connection;
    fn deref(&self) -> &DB::Connection {
        &self.inner
    }
}

impl<DB: sqlx::Database> DerefMut for Tx<'_, DB> {
    fn deref_mut(&mut self) -> &mut DB::Connection {
        &mut self.inner
    }
}

impl<DB: sqlx::Database> std::fmt::Debug for Tx<'_, DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tx")
            .field("database", &DB::NAME)
            .finish_non_exhaustive()
    }
}

/// Rolls the transaction back (both SQL stores).
pub(crate) async fn rollback<DB: sqlx::Database>(tx: Tx<'_, DB>) -> Result<(), sqlx::Error> {
    tx.into_inner().rollback().await
}

/// Opens a savepoint for one batch item (both SQL stores).
pub(crate) async fn nested<'t, DB: sqlx::Database>(
    tx: &'t mut Tx<'_, DB>,
) -> Result<Tx<'t, DB>, sqlx::Error> {
    let inner = sqlx::Acquire::begin(&mut tx.inner).await?;
    Ok(Tx::new(inner))
}

/// Releases (`commit`) or rolls back to the item's savepoint.
pub(crate) async fn end_nested<DB: sqlx::Database>(
    tx: Tx<'_, DB>,
    commit: bool,
) -> Result<(), sqlx::Error> {
    let inner = tx.into_inner();
    if commit {
        inner.commit().await
    } else {
        inner.rollback().await
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

/// Maps a driver error: a missing table is a setup mistake with a known fix,
/// anything else counts as "unavailable" (retried with backoff).
pub(crate) fn map_err(store: &'static str, table: &str, e: sqlx::Error) -> StoreError {
    let text = e.to_string();
    if text.contains("no such table")
        || (text.contains("relation") && text.contains("does not exist"))
    {
        return StoreError::Config {
            store,
            message: format!(
                "dedup table {table:?} does not exist: call the store's `migrate()` once at start-up ({text})"
            ),
        };
    }
    StoreError::unavailable(store, e)
}
