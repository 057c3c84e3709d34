//! The SQLite store through the SQL store suite (`common/sql_suite.rs`):
//! the scenarios that apply in-process (no wire to count, no server to
//! kill), on a database file per test.

mod common;
#[path = "common/sqlite_db.rs"]
mod sqlite_db;
#[macro_use]
#[path = "common/sql_suite.rs"]
mod sql_suite;

sql_store_suite!(db = sqlite_db, store = ["sqlite"], tx = [Tx<'_>]);

// --- statements per batch ----------------------------------------------------
//
// SQLite has no wire to count round trips on; what a batch costs is its
// statements (each one a hand-off to the connection's worker thread).

/// The SQL of every statement sqlx runs, from every thread: SQLite's run on
/// the connection's worker thread, so the recorder is the process's
/// subscriber. The suite's tests beside these use the table `idem_dedup`;
/// a test here counts the statements naming a table of its own.
mod statements {
    use std::sync::{Mutex, Once};

    use tracing::field::{Field, Visit};
    use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

    static RAN: Mutex<Vec<String>> = Mutex::new(Vec::new());

    struct Recorder;

    /// sqlx logs a statement's first words as `summary` and, when those are
    /// not all of it, the whole text as `db.statement`.
    #[derive(Default)]
    struct Sql {
        summary: String,
        statement: String,
    }

    impl Visit for Sql {
        fn record_str(&mut self, field: &Field, value: &str) {
            match field.name() {
                "summary" => self.summary = value.to_owned(),
                "db.statement" => self.statement = value.trim().to_owned(),
                _ => {}
            }
        }

        fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
    }

    impl<S: tracing::Subscriber> Layer<S> for Recorder {
        fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
            if event.metadata().target() != "sqlx::query" {
                return;
            }
            let mut sql = Sql::default();
            event.record(&mut sql);
            let text = if sql.statement.is_empty() {
                sql.summary
            } else {
                sql.statement
            };
            RAN.lock().unwrap().push(text);
        }
    }

    pub(crate) fn record() {
        static INSTALL: Once = Once::new();
        INSTALL.call_once(|| {
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(Recorder))
                .expect("no other subscriber in this test binary");
        });
    }

    /// The statements run so far that name `table`.
    pub(crate) fn naming(table: &str) -> Vec<String> {
        let table = format!(" {table} ");
        RAN.lock()
            .unwrap()
            .iter()
            .filter(|sql| format!("{} ", sql.replace(['\n', '(', ')'], " ")).contains(&table))
            .cloned()
            .collect()
    }
}

/// The requests whose claim is new, as committed with `result`.
fn taken<'a>(
    claims: &[Claim],
    requests: &'a [ClaimRequest<'a>],
    result: &'a str,
) -> Vec<Claimed<'a>> {
    claims
        .iter()
        .zip(requests)
        .filter(|(c, _)| matches!(c, Claim::New { .. }))
        .map(|(_, request)| Claimed {
            request,
            token: 0,
            result: Some(result),
        })
        .collect()
}

/// Claims, one key per claim call, and commits each with `result`: the
/// single-key path, the reference the batch is compared with.
async fn claim_singly(
    store: &sqlite_db::Store,
    requests: &[ClaimRequest<'_>],
    result: &str,
) -> Vec<Claim> {
    let mut out = Vec::new();
    for r in requests {
        let mut tx = store.begin().await.unwrap();
        let got = store.claim(&mut tx, std::slice::from_ref(r)).await.unwrap();
        let done = taken(&got, std::slice::from_ref(r), result);
        store.commit(tx, &done).await.unwrap();
        out.push(got.into_iter().next().unwrap());
    }
    out
}

/// A store on its own table `table` of `db`'s file, holding records for
/// keys `d*` (done with result "1"), `c*` (done, claimed with fingerprint
/// 7: a conflict for a request with fingerprint 1) and `x*` (done, then
/// expired), `n` of each.
async fn seeded(db: &sqlite_db::Db, table: &str, n: usize) -> sqlite_db::Store {
    let store = db.store.clone().with_table(table).unwrap();
    store.migrate().await.unwrap();
    let keys: Vec<(Key, u64)> = (0..n)
        .flat_map(|i| {
            [
                (format!("d{i}"), 1),
                (format!("c{i}"), 7),
                (format!("x{i}"), 1),
            ]
        })
        .map(|(k, fp)| (Key::new(k).unwrap(), fp))
        .collect();
    let requests: Vec<ClaimRequest<'_>> =
        keys.iter().map(|(k, fp)| request(k, *fp, None)).collect();
    claim_singly(&store, &requests, "1").await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {table} SET expires_at = 1 WHERE key GLOB 'x*'"
    )))
    .execute(store.pool())
    .await
    .unwrap();
    store
}

/// Requests over the seeded keys and `n` new ones (`n*`), with `n{i}` and
/// `d{i}` asked twice for every fifth `i`: the second copy answers
/// `InProgress` (its twin holds the claim).
fn mixed(n: usize) -> Vec<(Key, u64)> {
    let mut out = Vec::new();
    for i in 0..n {
        for prefix in ["d", "c", "x", "n"] {
            out.push((Key::new(format!("{prefix}{i}")).unwrap(), 1));
        }
        if i % 5 == 0 {
            out.push((Key::new(format!("n{i}")).unwrap(), 1));
            out.push((Key::new(format!("d{i}")).unwrap(), 1));
        }
    }
    out
}

/// What a batch answers, key by key, when its keys are claimed one claim
/// call each (a later copy of a key answers `InProgress` in a batch).
fn as_in_a_batch(requests: &[ClaimRequest<'_>], single: Vec<Claim>) -> Vec<Claim> {
    single
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let twin = requests[..i].iter().any(|r| r.key == requests[i].key);
            if twin {
                Claim::InProgress {
                    retry_after: Duration::ZERO,
                }
            } else {
                c
            }
        })
        .collect()
}

/// A batch of 64 (new keys, done ones, a conflict, an expired record, a key
/// twice) costs one claim statement, at most one lookup and one statement
/// saving the results; undoing a batch, one statement.
#[tokio::test]
async fn a_batch_of_64_is_claimed_with_one_insert_and_one_lookup() {
    statements::record();
    let db = sqlite_db::Db::new().await;
    let table = "counted_dedup";
    let store = seeded(&db, table, 16).await;
    let keys: Vec<(Key, u64)> = mixed(16).into_iter().take(64).collect();
    let requests: Vec<ClaimRequest<'_>> =
        keys.iter().map(|(k, fp)| request(k, *fp, None)).collect();
    assert_eq!(requests.len(), 64);

    let before = statements::naming(table).len();
    let mut tx = store.begin().await.unwrap();
    let claims = store.claim(&mut tx, &requests).await.unwrap();
    let claimed = statements::naming(table).split_off(before);
    let done = taken(&claims, &requests, "2");
    store.commit(tx, &done).await.unwrap();
    let saved = statements::naming(table).split_off(before + claimed.len());

    let kinds = |sql: &[String], verb: &str| sql.iter().filter(|s| s.starts_with(verb)).count();
    assert_eq!(
        kinds(&claimed, "INSERT"),
        1,
        "one claim statement for 64 keys: {claimed:#?}"
    );
    assert!(
        kinds(&claimed, "SELECT") <= 1,
        "at most one lookup: {claimed:#?}"
    );
    assert_eq!(
        claimed.len(),
        kinds(&claimed, "INSERT") + kinds(&claimed, "SELECT"),
        "{claimed:#?}"
    );
    assert_eq!(saved.len(), 1, "one statement saves 64 results: {saved:#?}");
    assert!(saved[0].starts_with("UPDATE"), "{saved:#?}");

    // The answers are the single-key path's.
    let reference = seeded(&db, "reference_dedup", 16).await;
    let single = claim_singly(&reference, &requests, "2").await;
    assert_eq!(claims, as_in_a_batch(&requests, single));
    let twins = claims
        .iter()
        .filter(|c| matches!(c, Claim::InProgress { .. }))
        .count();
    let new = claims
        .iter()
        .filter(|c| matches!(c, Claim::New { .. }))
        .count();
    let conflicts = claims
        .iter()
        .filter(|c| matches!(c, Claim::Conflict { .. }))
        .count();
    assert!(
        twins >= 2 && new >= 20 && conflicts >= 12,
        "the mix: {claims:?}"
    );

    // Undoing a claimed batch: one statement.
    let fresh: Vec<Key> = (0..64)
        .map(|i| Key::new(format!("u{i}")).unwrap())
        .collect();
    let requests: Vec<ClaimRequest<'_>> = fresh.iter().map(|k| request(k, 1, None)).collect();
    let mut tx = store.begin().await.unwrap();
    store.claim(&mut tx, &requests).await.unwrap();
    let claimed: Vec<Claimed<'_>> = requests
        .iter()
        .map(|r| Claimed {
            request: r,
            token: 0,
            result: None,
        })
        .collect();
    let before = statements::naming(table).len();
    store.unclaim(&mut tx, &claimed).await.unwrap();
    let undone = statements::naming(table).split_off(before);
    store.commit(tx, &[]).await.unwrap();
    assert_eq!(
        undone.len(),
        1,
        "one statement undoes 64 claims: {undone:#?}"
    );
    let left: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(*) FROM {table} WHERE key GLOB 'u*'"
    )))
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(left, 0);
}

/// Batches larger than one statement holds (split in chunks) answer and
/// store what claiming key by key would: same answers, same rows.
#[tokio::test]
async fn a_large_batch_answers_and_stores_what_single_claims_do() {
    let db = sqlite_db::Db::new().await;
    let batch = seeded(&db, "batch_dedup", 300).await;
    let single = seeded(&db, "single_dedup", 300).await;
    let keys = mixed(300);
    let requests: Vec<ClaimRequest<'_>> =
        keys.iter().map(|(k, fp)| request(k, *fp, None)).collect();
    assert!(requests.len() > 1000);

    let mut tx = batch.begin().await.unwrap();
    let claims = batch.claim(&mut tx, &requests).await.unwrap();
    let done = taken(&claims, &requests, "2");
    batch.commit(tx, &done).await.unwrap();
    let reference = claim_singly(&single, &requests, "2").await;
    assert_eq!(claims, as_in_a_batch(&requests, reference));

    let rows = |table: &str| {
        let pool = db.pool().clone();
        let sql = format!(
            "SELECT handler, key, fingerprint, result, expires_at IS NULL FROM {table} ORDER BY handler, key"
        );
        async move {
            sqlx::query_as::<_, (String, String, i64, Option<String>, bool)>(sqlx::AssertSqlSafe(
                sql,
            ))
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    let (got, want) = (rows("batch_dedup").await, rows("single_dedup").await);
    assert_eq!(got.len(), 1200);
    assert_eq!(got, want);

    // Undone in chunks too.
    let mut tx = batch.begin().await.unwrap();
    let fresh: Vec<Key> = (0..1100)
        .map(|i| Key::new(format!("u{i}")).unwrap())
        .collect();
    let requests: Vec<ClaimRequest<'_>> = fresh.iter().map(|k| request(k, 1, None)).collect();
    assert!(
        batch
            .claim(&mut tx, &requests)
            .await
            .unwrap()
            .iter()
            .all(|c| matches!(c, Claim::New { .. }))
    );
    let claimed: Vec<Claimed<'_>> = requests
        .iter()
        .map(|r| Claimed {
            request: r,
            token: 0,
            result: None,
        })
        .collect();
    batch.unclaim(&mut tx, &claimed).await.unwrap();
    batch.commit(tx, &[]).await.unwrap();
    assert_eq!(rows("batch_dedup").await, want);
}
