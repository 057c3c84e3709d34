//! The MySQL store against a real MariaDB (`MYSQL_URL`, default
//! `mysql://root@127.0.0.1:3306/test`): the SQL store suite
//! (`common/sql_suite.rs`) plus what only this store has (its column
//! limits and collation). Each test works in its own database, so the tests
//! run in parallel; a test that cannot reach the server fails.

mod common;
#[path = "common/mysql.rs"]
mod mysql;
#[macro_use]
#[path = "common/sql_suite.rs"]
mod sql_suite;

// `tx: &mut Tx<'_>` names no database: it is the store's transaction.
sql_store_suite!(
    db = mysql,
    store = ["mysql"],
    tx = [Tx<'_>],
    wire,
    row_locks,
    server
);

/// Keys are compared byte for byte: case, trailing spaces, accents and
/// JSON-special characters make different keys, in single and batch claims.
#[tokio::test]
async fn keys_are_byte_exact() {
    let db = mysql::Db::new().await;
    let store = db.store.clone();
    let texts = [
        "k", "K", "k ", " k", "é", "e\u{301}", "k\"q", "k\\", "k\u{1}", "😀", "k'", "ß", "ss",
    ];
    let keys: Vec<Key> = texts.iter().map(|k| Key::new(*k).unwrap()).collect();
    let requests: Vec<ClaimRequest<'_>> = keys.iter().map(|k| request(k, 1, None)).collect();
    let mut tx = store.begin().await.unwrap();
    let first = store.claim(&mut tx, &requests[..1]).await.unwrap();
    let rest = store.claim(&mut tx, &requests[1..]).await.unwrap();
    store.commit(tx, &[]).await.unwrap();
    assert!(
        first
            .iter()
            .chain(&rest)
            .all(|c| *c == Claim::New { token: 0 }),
        "{first:?} {rest:?}"
    );
    let stored: Vec<String> = sqlx::query_scalar("SELECT `key` FROM idem_dedup ORDER BY `key`")
        .fetch_all(db.pool())
        .await
        .unwrap();
    let mut want: Vec<String> = texts.iter().map(|k| (*k).to_owned()).collect();
    want.sort();
    assert_eq!(stored, want, "stored as given, sorted bytewise");
    // Claimed again, one by one: each is its own record.
    for r in &requests {
        let mut tx = store.begin().await.unwrap();
        let got = store.claim(&mut tx, std::slice::from_ref(r)).await.unwrap();
        store.rollback(tx).await.unwrap();
        assert_eq!(got, vec![Claim::Done { cached: None }], "{:?}", r.key);
    }
}

/// The longest key idem accepts by default (512 bytes, here 128 four-byte
/// characters and 512 one-byte ones) fits; a longer one is refused before
/// any SQL, never cut into another key.
#[tokio::test]
async fn longest_keys_fit_and_longer_ones_are_refused() {
    let db = mysql::Db::new().await;
    let store = db.store.clone();
    let long = [
        "😀".repeat(128),
        "k".repeat(512),
        "é".repeat(256),
        format!("{}{}", "a".repeat(511), "é"),
    ];
    let keys: Vec<Key> = long.iter().map(|k| Key::new(k.clone()).unwrap()).collect();
    let requests: Vec<ClaimRequest<'_>> = keys.iter().map(|k| request(k, 1, None)).collect();
    let mut tx = store.begin().await.unwrap();
    let got = store.claim(&mut tx, &requests).await.unwrap();
    store.commit(tx, &[]).await.unwrap();
    assert!(got.iter().all(|c| *c == Claim::New { token: 0 }), "{got:?}");
    let lengths: Vec<i64> = sqlx::query_scalar("SELECT LENGTH(`key`) FROM idem_dedup ORDER BY 1")
        .fetch_all(db.pool())
        .await
        .unwrap();
    assert_eq!(lengths, vec![512, 512, 512, 513]);

    let too_long = Key::new("k".repeat(513)).unwrap();
    let mut tx = store.begin().await.unwrap();
    let e = store
        .claim(&mut tx, &[request(&too_long, 1, None)])
        .await
        .unwrap_err();
    store.rollback(tx).await.unwrap();
    assert!(matches!(e, StoreError::Config { .. }), "{e}");
    assert!(e.to_string().contains("512 characters"), "{e}");
}

/// The store keeps its own clock: `created_at` is the server's UTC time,
/// whatever the session's time zone.
#[tokio::test]
async fn times_are_the_servers_utc_clock() {
    let db = mysql::Db::new().await;
    let mut tx = db.store.begin().await.unwrap();
    sqlx::query("SET time_zone = '+05:00'")
        .execute(&mut *tx)
        .await
        .unwrap();
    let key = Key::new("k").unwrap();
    db.store
        .claim(&mut tx, &[request(&key, 1, Some(Duration::from_secs(60)))])
        .await
        .unwrap();
    db.store.commit(tx, &[]).await.unwrap();
    let (skew, ttl): (i64, i64) = sqlx::query_as(
        "SELECT ABS(TIMESTAMPDIFF(SECOND, created_at, UTC_TIMESTAMP(6))), \
                TIMESTAMPDIFF(SECOND, created_at, expires_at) FROM idem_dedup",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert!(skew < 5, "created_at is UTC ({skew} s off)");
    assert_eq!(ttl, 60);
}
