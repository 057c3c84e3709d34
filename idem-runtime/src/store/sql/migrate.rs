//! Versioned migrations, applied the same way on every database: the
//! dialect takes its lock and hands over a connection; this applies what is
//! missing and records it.

use sqlx::{AssertSqlSafe, Database, Executor, FromRow, IntoArguments};

/// One schema change: its version (only ever appended), what it does, and
/// its SQL (one or more statements).
pub(crate) struct Migration {
    pub(crate) version: i64,
    pub(crate) description: &'static str,
    pub(crate) sql: String,
}

/// The table recording applied versions, in the dialect's SQL.
pub(crate) struct MigrationLog {
    /// `CREATE TABLE IF NOT EXISTS <log> (version, description, applied_at)`
    /// (and whatever must exist before it, such as the schema).
    pub(crate) create: String,
    /// `SELECT version FROM <log>`.
    pub(crate) applied: String,
    /// `INSERT INTO <log> (version, description) VALUES (<1>, <2>)`.
    pub(crate) record: String,
}

impl MigrationLog {
    /// The log `table`, created by `create` (which makes whatever must exist
    /// before it too), with bind parameters one and two written
    /// `placeholders`.
    pub(crate) fn new(table: &str, create: String, placeholders: [&str; 2]) -> Self {
        let [version, description] = placeholders;
        MigrationLog {
            create,
            applied: format!("SELECT version FROM {table}"),
            record: format!(
                "INSERT INTO {table} (version, description) VALUES ({version}, {description})"
            ),
        }
    }
}

/// Applies migrations on database `DB`.
pub(crate) struct Migrator<DB>(std::marker::PhantomData<DB>);

impl<DB> Migrator<DB>
where
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    (i64,): for<'r> FromRow<'r, DB::Row>,
    i64: sqlx::Type<DB> + for<'q> sqlx::Encode<'q, DB>,
    for<'s> &'s str: sqlx::Type<DB> + sqlx::Encode<'s, DB>,
{
    /// For databases with transactional DDL: one transaction, started with
    /// `begin` (`None`: `BEGIN`), then `lock` (a statement taking a
    /// transaction-scoped lock, with its one bind), then the migrations,
    /// then the commit.
    #[cfg(any(feature = "sqlite", feature = "postgres"))]
    pub(crate) async fn in_transaction(
        pool: &sqlx::Pool<DB>,
        begin: Option<&'static str>,
        lock: Option<(&'static str, &str)>,
        log: &MigrationLog,
        migrations: Vec<Migration>,
    ) -> Result<Vec<i64>, sqlx::Error> {
        let mut tx = match begin {
            Some(begin) => pool.begin_with(begin).await?,
            None => pool.begin().await?,
        };
        if let Some((lock, key)) = lock {
            sqlx::query(lock).bind(key).execute(&mut *tx).await?;
        }
        let applied = Self::apply(&mut tx, log, migrations).await?;
        tx.commit().await?;
        Ok(applied)
    }

    /// Creates the log if missing and applies the migrations whose versions
    /// it does not hold, in order, recording each. The caller holds the
    /// lock that keeps other migrators out, and commits when the database
    /// has transactional DDL. Returns the versions applied.
    pub(crate) async fn apply(
        conn: &mut DB::Connection,
        log: &MigrationLog,
        migrations: Vec<Migration>,
    ) -> Result<Vec<i64>, sqlx::Error> {
        conn.execute(sqlx::raw_sql(AssertSqlSafe(log.create.clone())))
            .await?;
        let done: Vec<i64> = sqlx::query_scalar(AssertSqlSafe(log.applied.clone()))
            .fetch_all(&mut *conn)
            .await?;
        let mut applied = Vec::new();
        for m in migrations {
            if done.contains(&m.version) {
                continue;
            }
            conn.execute(sqlx::raw_sql(AssertSqlSafe(m.sql))).await?;
            sqlx::query(AssertSqlSafe(log.record.clone()))
                .bind(m.version)
                .bind(m.description)
                .execute(&mut *conn)
                .await?;
            applied.push(m.version);
        }
        Ok(applied)
    }
}
