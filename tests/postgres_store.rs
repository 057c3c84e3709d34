//! The PostgreSQL store against a real server (`DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`). Each test works in its
//! own schema, so the tests run in parallel; a test that cannot reach the
//! server fails.

mod common;
#[path = "common/pg.rs"]
mod pg;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use common::{order, run_until_idle};
use idem::source::memory::{Faults, MemoryBroker};
use idem::store::postgres::PostgresStore;
use idem::store::{Claim, ClaimRequest, Claimed, TxStore};
use idem::{Fingerprint, Key, Runtime, StoreError, Tx, idempotent};
use pg::Db;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Order {
    order_id: String,
    seq: u32,
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct AppError(String);

async fn apply(tx: &mut Tx<'_, sqlx::Postgres>, handler: &str, o: &Order) -> Result<(), AppError> {
    pg::insert_effect(tx, handler, &o.order_id, o.seq)
        .await
        .map_err(|e| AppError(e.to_string()))
}

fn assert_exactly_once(counts: &std::collections::BTreeMap<String, i64>, keys: usize) {
    assert_eq!(counts.len(), keys, "every key has an effect");
    let doubled: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        doubled.is_empty(),
        "keys applied more than once: {doubled:?}"
    );
}

// --- exactly once under redelivery ---------------------------------------

// `tx: &mut Tx<'_>` names no database: the macro completes it for postgres.
#[idempotent(
    topic = "dup",
    key = "order_id",
    store = "postgres",
    name = "pg-dup",
    ttl = "7d"
)]
async fn pg_dup(o: Order, tx: &mut Tx<'_>) -> Result<(), AppError> {
    apply(tx, "pg-dup", &o).await
}

#[tokio::test]
async fn redelivered_messages_apply_once() {
    let db = Db::new().await;
    let broker = MemoryBroker::with_faults(Faults {
        duplicate: 0.5,
        lose_ack: 0.3,
        reorder: true,
        seed: 11,
        ..Faults::default()
    });
    for i in 0..200 {
        broker.publish("dup", order(&format!("k{i}"), i).id(format!("m{i}")));
    }
    // Producer retries: same key, new message id.
    for i in (0..200).step_by(7) {
        broker.publish("dup", order(&format!("k{i}"), i).id(format!("retry-{i}")));
    }
    let rt = Runtime::builder(broker.clone())
        .store(db.store.clone())
        .handlers(["pg-dup"])
        .concurrency(16)
        .build()
        .unwrap();
    run_until_idle(&rt, &broker).await;

    assert_exactly_once(&db.effect_counts("pg-dup").await, 200);
    assert_eq!(db.dedup_rows("pg-dup").await, 200);
    let stats = rt.stats_of("pg-dup").unwrap();
    assert_eq!(stats.processed, 200);
    assert!(stats.duplicate >= 29, "{stats:?}");
    assert_eq!(stats.failed, 0, "{stats:?}");
    // ttl = "7d" sets the expiry from the server's clock.
    let ttl: f64 = sqlx::query_scalar(
        "SELECT EXTRACT(EPOCH FROM expires_at - created_at)::float8 FROM idem_dedup WHERE handler = 'pg-dup' LIMIT 1",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(ttl, 7.0 * 86400.0);
}

// --- rollback on error and on panic ---------------------------------------

static FLAKY: AtomicU32 = AtomicU32::new(0);

#[idempotent(
    topic = "flaky",
    key = "order_id",
    store = "postgres",
    name = "pg-flaky",
    retries = 3,
    backoff = "1ms..5ms"
)]
async fn pg_flaky(o: Order, tx: &mut Tx<'_>) -> Result<(), AppError> {
    apply(tx, "pg-flaky", &o).await?;
    // The effect is written, then the first attempt fails (error for k-err,
    // panic for k-panic): the rollback must take effect and dedup row along.
    if o.order_id == "k-err" && FLAKY.fetch_or(1, Ordering::SeqCst) & 1 == 0 {
        return Err(AppError("transient failure".into()));
    }
    if o.order_id == "k-panic" && FLAKY.fetch_or(2, Ordering::SeqCst) & 2 == 0 {
        panic!("handler bug");
    }
    Ok(())
}

#[tokio::test]
async fn error_and_panic_roll_back_effect_and_dedup_row() {
    let db = Db::new().await;
    let broker = MemoryBroker::new();
    broker.publish("flaky", order("k-err", 1));
    broker.publish("flaky", order("k-panic", 2));
    let rt = Runtime::builder(broker.clone())
        .store(db.store.clone())
        .handlers(["pg-flaky"])
        .build()
        .unwrap();
    run_until_idle(&rt, &broker).await;

    assert_eq!(FLAKY.load(Ordering::SeqCst), 3, "both failures happened");
    assert_exactly_once(&db.effect_counts("pg-flaky").await, 2);
    assert_eq!(db.dedup_rows("pg-flaky").await, 2);
    let stats = rt.stats_of("pg-flaky").unwrap();
    assert_eq!((stats.failed, stats.retried, stats.processed), (2, 2, 2));
}

// --- two runtimes race on the same keys -------------------------------------

#[idempotent(topic = "race", key = "order_id", store = "postgres", name = "pg-race")]
async fn pg_race(o: Order, tx: &mut Tx<'_>) -> Result<(), AppError> {
    apply(tx, "pg-race", &o).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_runtimes_racing_on_1000_keys_apply_each_once() {
    let db = Db::new().await;
    let other = db.second_store(16).await;
    let (a, b) = (MemoryBroker::new(), MemoryBroker::new());
    let mut rng = fastrand::Rng::with_seed(3);
    for i in 0..1000 {
        // Three deliveries per key, spread over both consumers, with
        // message ids of their own (replays): only the key identifies them.
        for copy in 0..3 {
            let broker = if rng.bool() { &a } else { &b };
            broker.publish(
                "race",
                order(&format!("k{i}"), i).id(format!("m{i}-{copy}")),
            );
        }
    }
    let rt_a = Runtime::builder(a.clone())
        .store(db.store.clone())
        .handlers(["pg-race"])
        .concurrency(16)
        .build()
        .unwrap();
    let rt_b = Runtime::builder(b.clone())
        .store(other)
        .handlers(["pg-race"])
        .concurrency(16)
        .build()
        .unwrap();
    tokio::join!(run_until_idle(&rt_a, &a), run_until_idle(&rt_b, &b));

    assert_exactly_once(&db.effect_counts("pg-race").await, 1000);
    let (sa, sb) = (
        rt_a.stats_of("pg-race").unwrap(),
        rt_b.stats_of("pg-race").unwrap(),
    );
    assert_eq!(sa.processed + sb.processed, 1000, "{sa:?} {sb:?}");
    assert_eq!(sa.duplicate + sb.duplicate, 2000, "{sa:?} {sb:?}");
    // No unique violation (or anything else) reached a handler.
    assert_eq!(
        sa.failed + sb.failed + sa.dead_lettered + sb.dead_lettered,
        0
    );
}

// --- the same key on two connections at once ----------------------------------

fn request<'a>(key: &'a Key, fp: u64, ttl: Option<Duration>) -> ClaimRequest<'a> {
    ClaimRequest {
        handler: "direct",
        key,
        fingerprint: Some(Fingerprint::new(fp)),
        message_id: "m",
        lease: Duration::from_secs(30),
        ttl,
    }
}

/// Waits until some backend of the schema's pool waits on a lock.
async fn wait_for_lock_wait(db: &Db) {
    for _ in 0..500 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the second claim never waited on the first one's row lock");
}

#[tokio::test]
async fn concurrent_claim_waits_then_sees_commit_or_rollback() {
    for commit_first in [true, false] {
        let db = Db::new().await;
        let store = db.store.clone();
        let key = Key::new("k1").unwrap();
        let mut first = store.begin().await.unwrap();
        let got = store
            .claim(&mut first, &[request(&key, 1, None)])
            .await
            .unwrap();
        assert_eq!(got, vec![Claim::New { token: 0 }]);

        let second = tokio::spawn({
            let store = db.store.clone();
            async move {
                let key = Key::new("k1").unwrap();
                let mut tx = store.begin().await.unwrap();
                let claim = store.claim(&mut tx, &[request(&key, 1, None)]).await;
                let _ = store.rollback(tx).await;
                claim
            }
        });
        wait_for_lock_wait(&db).await;
        let r = request(&key, 1, None);
        let claimed = [Claimed {
            request: &r,
            token: 0,
            result: Some("\"receipt-1\""),
        }];
        if commit_first {
            store.commit(first, &claimed).await.unwrap();
        } else {
            store.rollback(first).await.unwrap();
        }
        let second = second.await.unwrap().expect("no error reaches the caller");
        let want = if commit_first {
            Claim::Done {
                cached: Some("\"receipt-1\"".into()),
            }
        } else {
            Claim::New { token: 0 }
        };
        assert_eq!(second, vec![want], "commit_first = {commit_first}");
    }
}

// --- conflict: same key, other payload -------------------------------------------

#[idempotent(
    topic = "conflict",
    key = "order_id",
    store = "postgres",
    name = "pg-conflict",
    fingerprint = ["seq"]
)]
async fn pg_conflict(o: Order, tx: &mut Tx<'_>) -> Result<(), AppError> {
    apply(tx, "pg-conflict", &o).await
}

#[tokio::test]
async fn same_key_with_other_payload_is_dead_lettered_as_conflict() {
    let db = Db::new().await;
    let broker = MemoryBroker::new();
    broker.publish("conflict", order("k1", 1).id("first"));
    let rt = Runtime::builder(broker.clone())
        .store(db.store.clone())
        .handlers(["pg-conflict"])
        .build()
        .unwrap();
    run_until_idle(&rt, &broker).await;
    // The producer reuses the key for another order.
    broker.publish("conflict", order("k1", 2).id("second"));
    run_until_idle(&rt, &broker).await;

    assert_exactly_once(&db.effect_counts("pg-conflict").await, 1);
    let seq: i32 = sqlx::query_scalar("SELECT seq FROM effects WHERE handler = 'pg-conflict'")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(seq, 1, "the first payload's effect stays");
    let letters = broker.dead_letters("conflict.dlq");
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(&*letters[0].delivery.id, "second");
    let reason = &letters[0].letter.reason;
    assert!(reason.contains("key conflict"), "{reason}");
}

// --- TTL expiry and garbage collection ---------------------------------------------

#[idempotent(
    topic = "ttl",
    key = "order_id",
    store = "postgres",
    name = "pg-ttl",
    ttl = "1h"
)]
async fn pg_ttl(o: Order, tx: &mut Tx<'_>) -> Result<(), AppError> {
    apply(tx, "pg-ttl", &o).await
}

#[tokio::test]
async fn expired_record_is_forgotten_and_purged_in_bounded_batches() {
    let db = Db::new().await;
    let broker = MemoryBroker::new();
    let rt = Runtime::builder(broker.clone())
        .store(db.store.clone())
        .handlers(["pg-ttl"])
        .build()
        .unwrap();
    broker.publish("ttl", order("k1", 1).id("m1"));
    run_until_idle(&rt, &broker).await;
    broker.publish("ttl", order("k1", 1).id("m1"));
    run_until_idle(&rt, &broker).await;
    assert_exactly_once(&db.effect_counts("pg-ttl").await, 1);

    // Expire the record (instead of waiting an hour): a replay after the
    // retention period is a new message.
    sqlx::query("UPDATE idem_dedup SET expires_at = now() - interval '1 second'")
        .execute(db.pool())
        .await
        .unwrap();
    broker.publish("ttl", order("k1", 1).id("m1"));
    run_until_idle(&rt, &broker).await;
    assert_eq!(db.effect_counts("pg-ttl").await.get("k1"), Some(&2));

    // 2,500 expired rows and 10 live ones; purge 1,000 per statement.
    sqlx::query(
        "INSERT INTO idem_dedup (handler, key, fingerprint, message_id, expires_at) \
         SELECT 'gc', 'e' || i, 0, 'm', now() - interval '1 minute' FROM generate_series(1, 2500) i \
         UNION ALL \
         SELECT 'gc', 'l' || i, 0, 'm', now() + interval '1 hour' FROM generate_series(1, 10) i",
    )
    .execute(db.pool())
    .await
    .unwrap();
    assert_eq!(db.store.purge_expired(1000).await.unwrap(), 1000, "bounded");
    assert_eq!(idem::store::purge_all(&db.store, 1000).await.unwrap(), 1500);
    assert_eq!(db.dedup_rows("gc").await, 10, "live rows stay");

    // The runtime's periodic purge reports what it deleted.
    sqlx::query(
        "UPDATE idem_dedup SET expires_at = now() - interval '1 second' WHERE handler = 'gc'",
    )
    .execute(db.pool())
    .await
    .unwrap();
    let rt = Runtime::builder(MemoryBroker::new())
        .store(db.store.clone())
        .handlers(["pg-ttl"])
        .purge_expired_every(Duration::from_millis(20), 4)
        .build()
        .unwrap();
    let stop = idem::CancellationToken::new();
    let watch = async {
        for _ in 0..500 {
            if rt.purged() >= 10 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
    };
    tokio::join!(rt.run(stop.clone()), watch);
    assert_eq!(rt.purged(), 10);
    assert_eq!(db.dedup_rows("gc").await, 0);
}

// --- batch: one claim round trip per batch ------------------------------------------

#[tokio::test]
async fn a_batch_of_64_keys_is_claimed_in_one_round_trip() {
    let db = Db::new().await;
    let (url, wire) = pg::counting_proxy(&pg::url()).await;
    let pool = pg::connect(&url, Some(&db.schema), 1).await;
    let store = PostgresStore::new(pool).with_schema(&db.schema).unwrap();
    // Half of the keys are already done, one of them with another payload.
    let keys: Vec<Key> = (0..64)
        .map(|i| Key::new(format!("k{i}")).unwrap())
        .collect();
    let fp = |i: usize| if i == 1 { 99 } else { i as u64 };
    let mut tx = store.begin().await.unwrap();
    let first: Vec<ClaimRequest<'_>> = keys[..32]
        .iter()
        .enumerate()
        .map(|(i, k)| request(k, i as u64, None))
        .collect();
    store.claim(&mut tx, &first).await.unwrap();
    store.commit(tx, &[]).await.unwrap();

    let all: Vec<ClaimRequest<'_>> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| request(k, fp(i), None))
        .collect();
    let mut tx = store.begin().await.unwrap();
    let before = wire.snapshot();
    let claims = store.claim(&mut tx, &all).await.unwrap();
    let after = wire.snapshot();
    store.commit(tx, &[]).await.unwrap();

    assert_eq!(
        after.round_trips - before.round_trips,
        1,
        "one round trip for 64 keys"
    );
    let statements: u64 =
        after.executions.values().sum::<u64>() - before.executions.values().sum::<u64>();
    assert_eq!(statements, 1, "one statement for 64 keys");
    for (i, c) in claims.iter().enumerate() {
        let want = match i {
            1 => Claim::Conflict {
                stored: Fingerprint::new(1),
            },
            0..32 => Claim::Done { cached: None },
            _ => Claim::New { token: 0 },
        };
        assert_eq!(c, &want, "key k{i}");
    }
}

#[derive(Debug, Deserialize)]
struct Item {
    order_id: String,
    seq: u32,
}

#[idempotent(
    topic = "batch",
    key = "order_id",
    store = "postgres",
    name = "pg-batch",
    ack = "batch"
)]
async fn pg_batch(i: Item, tx: &mut Tx<'_>) -> Result<(), AppError> {
    let o = Order {
        order_id: i.order_id,
        seq: i.seq,
    };
    if o.order_id == "poison" {
        return Err(AppError("cannot apply".into()));
    }
    apply(tx, "pg-batch", &o).await
}

#[tokio::test]
async fn batch_mode_claims_once_per_batch_and_isolates_a_failing_item() {
    let db = Db::new().await;
    let (url, wire) = pg::counting_proxy(&pg::url()).await;
    let store = PostgresStore::new(pg::connect(&url, Some(&db.schema), 4).await)
        .with_schema(&db.schema)
        .unwrap();
    let broker = MemoryBroker::new();
    for i in 0..640 {
        broker.publish("batch", order(&format!("k{i}"), i));
    }
    broker.publish("batch", order("poison", 0));
    // The same key twice in the stream (a producer retry).
    broker.publish("batch", order("k5", 5).id("k5-again"));
    let rt = Runtime::builder(broker.clone())
        .store(store)
        .handlers(["pg-batch"])
        .concurrency(64)
        .build()
        .unwrap();
    run_until_idle(&rt, &broker).await;

    assert_exactly_once(&db.effect_counts("pg-batch").await, 640);
    assert_eq!(broker.dead_letters("batch.dlq").len(), 1);
    let claims = wire.executions_of("unnest($1::text[], $2::text[], $3::int8[]");
    let stats = rt.stats_of("pg-batch").unwrap();
    // All 642 messages wait in the broker and a batch holds all 64 permits
    // until it is done, so the loop fetches 11 batches (10 × 64 + 2). Each
    // is claimed with one statement; each retry of the poison item runs
    // alone, with one claim of its own.
    assert_eq!(stats.received, 642);
    assert_eq!(
        claims,
        642_u64.div_ceil(64) + stats.retried,
        "claim statements: one per batch plus one per retry ({stats:?})"
    );
}

// --- the server goes away mid-run ---------------------------------------------------

static OUTAGE_EFFECTS: AtomicU32 = AtomicU32::new(0);
static OUTAGE_STARTED: AtomicBool = AtomicBool::new(false);

#[idempotent(
    topic = "outage",
    key = "order_id",
    store = "postgres",
    name = "pg-outage"
)]
async fn pg_outage(o: Order, tx: &mut Tx<'_>) -> Result<(), AppError> {
    apply(tx, "pg-outage", &o).await?;
    OUTAGE_EFFECTS.fetch_add(1, Ordering::SeqCst);
    // Slow enough that the server stops while handlers are in flight.
    tokio::time::sleep(Duration::from_millis(2)).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_restart_mid_run_loses_nothing_and_doubles_nothing() {
    let server = tokio::task::spawn_blocking(pg::PrivateServer::start)
        .await
        .unwrap();
    let db = Db::at(&server.url(), 8).await;
    let broker = MemoryBroker::new();
    for i in 0..400 {
        broker.publish("outage", order(&format!("k{i}"), i));
    }
    let rt = Runtime::builder(broker.clone())
        .store(db.store.clone())
        .handlers(["pg-outage"])
        .concurrency(8)
        .outage_backoff(idem::Backoff {
            min: Duration::from_millis(20),
            max: Duration::from_millis(200),
        })
        .build()
        .unwrap();
    let chaos = async {
        while OUTAGE_EFFECTS.load(Ordering::SeqCst) < 100 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let server = &server;
        tokio::task::block_in_place(|| {
            server.kill();
            OUTAGE_STARTED.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_secs(2));
            server.up();
        });
    };
    tokio::join!(run_until_idle(&rt, &broker), chaos);

    assert!(OUTAGE_STARTED.load(Ordering::SeqCst));
    assert_exactly_once(&db.effect_counts("pg-outage").await, 400);
    assert!(
        broker.dead_letters("outage.dlq").is_empty(),
        "an outage dead-letters nothing"
    );
    let stats = rt.stats_of("pg-outage").unwrap();
    assert!(stats.processed + stats.duplicate >= 400, "{stats:?}");
}

// --- names that end up in SQL text are validated ---------------------------------------

#[tokio::test]
async fn malicious_schema_or_table_name_is_rejected_before_any_sql() {
    let db = Db::new().await;
    for bad in [
        "idem_dedup; DROP TABLE effects; --",
        "x\"y",
        "",
        "1abc",
        "a.b",
        "ünïcode",
    ] {
        let e = db.store.clone().with_table(bad).unwrap_err();
        assert!(matches!(e, StoreError::Config { .. }), "{bad:?}: {e}");
        assert!(e.to_string().contains("invalid table name"), "{e}");
        let e = db.store.clone().with_schema(bad).unwrap_err();
        assert!(matches!(e, StoreError::Config { .. }), "{bad:?}: {e}");
    }
    // The effects table is still there.
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM effects")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(n, 0);
}

#[tokio::test]
async fn migrations_are_versioned_idempotent_and_safe_concurrently() {
    let db = Db::new().await;
    // Db::new ran the first migration; running again applies nothing.
    assert_eq!(db.store.migrate().await.unwrap(), Vec::<i64>::new());
    // Four processes migrate a new table at once: exactly one applies v1.
    let store = db.store.clone().with_table("other_dedup").unwrap();
    let runs = futures_util::future::join_all((0..4).map(|_| {
        let s = store.clone();
        async move { s.migrate().await.unwrap() }
    }))
    .await;
    let applied: Vec<i64> = runs.into_iter().flatten().collect();
    assert_eq!(applied, vec![1]);
    let versions: Vec<i64> = sqlx::query_scalar("SELECT version FROM other_dedup_migrations")
        .fetch_all(db.pool())
        .await
        .unwrap();
    assert_eq!(versions, vec![1]);
}

#[tokio::test]
async fn missing_table_is_a_config_error_naming_migrate() {
    let db = Db::new().await;
    let store = db.store.clone().with_table("never_migrated").unwrap();
    let key = Key::new("k").unwrap();
    let mut tx = store.begin().await.unwrap();
    let e = store
        .claim(&mut tx, &[request(&key, 1, None)])
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Config { .. }), "{e}");
    assert!(e.to_string().contains("migrate()"), "{e}");
}

#[tokio::test]
async fn connect_errors_do_not_show_the_password() {
    let e = PostgresStore::connect("postgres://app:hunter2-secret@127.0.0.1:1/db")
        .await
        .unwrap_err();
    let text = format!("{e} {e:?}");
    assert!(!text.contains("hunter2-secret"), "{text}");
    assert!(text.contains("app:***@127.0.0.1:1"), "{text}");
}

/// A prepared claim statement must not keep a generic plan made while the
/// dedup table was empty (a sequential scan that gets slower with every row):
/// claim transactions force custom plans.
#[tokio::test]
async fn claim_transactions_plan_with_the_current_table_size() {
    let db = Db::new().await;
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
