//! `store = "postgres"`. (Work in progress: issue 4.)

/// The PostgreSQL dedup store (being written).
#[derive(Debug, Clone)]
pub struct PostgresStore {
    _pool: sqlx::PgPool,
}
