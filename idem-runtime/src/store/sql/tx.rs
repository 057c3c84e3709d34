//! The handler's transaction handle, the same for every SQL database.

use std::ops::{Deref, DerefMut};

/// The database `Tx<'_>` means when none is named: SQLite when the `sqlite`
/// feature is on, else PostgreSQL when `postgres` is, else MySQL/MariaDB.
/// In a handler, `#[idempotent]` makes a `&mut idem::Tx<'_>` parameter the
/// handler's store's transaction, so handlers need not name the database;
/// outside handlers, write `Tx<'_, sqlx::Postgres>` (or `sqlx::MySql`).
#[cfg(feature = "sqlite")]
pub type DefaultDb = sqlx::Sqlite;
/// The database `Tx<'_>` means when none is named: SQLite when the `sqlite`
/// feature is on, else PostgreSQL when `postgres` is, else MySQL/MariaDB.
#[cfg(all(not(feature = "sqlite"), feature = "postgres"))]
pub type DefaultDb = sqlx::Postgres;
/// The database `Tx<'_>` means when none is named: SQLite when the `sqlite`
/// feature is on, else PostgreSQL when `postgres` is, else MySQL/MariaDB.
#[cfg(all(not(feature = "sqlite"), not(feature = "postgres")))]
pub type DefaultDb = sqlx::MySql;

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

/// Rolls the transaction back.
pub(super) async fn rollback<DB: sqlx::Database>(tx: Tx<'_, DB>) -> Result<(), sqlx::Error> {
    tx.into_inner().rollback().await
}

/// Opens a savepoint for one batch item.
pub(super) async fn savepoint<'t, DB: sqlx::Database>(
    tx: &'t mut Tx<'_, DB>,
) -> Result<Tx<'t, DB>, sqlx::Error> {
    let inner = sqlx::Acquire::begin(&mut tx.inner).await?;
    Ok(Tx::new(inner))
}

/// Releases (`keep`) or rolls back to the item's savepoint.
pub(super) async fn end_savepoint<DB: sqlx::Database>(
    tx: Tx<'_, DB>,
    keep: bool,
) -> Result<(), sqlx::Error> {
    let inner = tx.into_inner();
    if keep {
        inner.commit().await
    } else {
        inner.rollback().await
    }
}
