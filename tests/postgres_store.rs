//! The PostgreSQL store against a real server (`DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`): the SQL store suite
//! (`common/sql_suite.rs`) plus what only PostgreSQL has (schemas, plan
//! caching). Each test works in its own schema, so the tests run in
//! parallel; a test that cannot reach the server fails.

mod common;
#[path = "common/pg.rs"]
mod pg;
#[macro_use]
#[path = "common/sql_suite.rs"]
mod sql_suite;

// `tx: &mut Tx<'_>` names no database: the macro completes it for postgres.
sql_store_suite!(
    db = pg,
    store = ["postgres"],
    tx = [Tx<'_>],
    wire,
    row_locks,
    server
);

#[tokio::test]
async fn malicious_schema_name_is_rejected_before_any_sql() {
    let db = pg::Db::new().await;
    for bad in [
        "idem_dedup; DROP TABLE effects; --",
        "x\"y",
        "",
        "1abc",
        "a.b",
        "ünïcode",
    ] {
        let e = db.store.clone().with_schema(bad).unwrap_err();
        assert!(matches!(e, StoreError::Config { .. }), "{bad:?}: {e}");
    }
    assert_eq!(db.effect_rows().await, 0);
}

/// A prepared claim statement must not keep a generic plan made while the
/// dedup table was empty (a sequential scan that gets slower with every row):
/// claim transactions force custom plans.
#[tokio::test]
async fn claim_transactions_plan_with_the_current_table_size() {
    let db = pg::Db::new().await;
    let mut tx = db.store.begin().await.unwrap();
    let mode: String = sqlx::query_scalar("SHOW plan_cache_mode")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(mode, "force_custom_plan");
    db.store.rollback(tx).await.unwrap();
    // Outside idem's transactions the application's setting is untouched.
    let mode: String = sqlx::query_scalar("SHOW plan_cache_mode")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(mode, "auto");
}
