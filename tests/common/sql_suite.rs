//! The SQL store scenarios, written once and stamped per database by
//! `sql_store_suite!` (`tests/postgres_store.rs`, `tests/mysql_store.rs`,
//! `tests/sqlite_store.rs`). Loaded with
//! `#[macro_use] #[path = "common/sql_suite.rs"] mod sql_suite;`.
//!
//! ```text
//! sql_store_suite!(db = pg, store = ["postgres"], tx = [Tx<'_>], wire, server);
//! ```
//!
//! - `db`: the database's helper module (`pg`, `mysql`, `sqlite_db`), which
//!   provides `Database`, `Store`, `Db` (a private schema or database per
//!   test, with `effects`), `insert_effect` and the methods marked "suite".
//! - `store`: the attribute's `store = …` value; `tx`: the handlers' `tx`
//!   parameter type.
//! - sections beyond the common scenarios: `wire` (round trips and
//!   statements counted by a protocol proxy: `counting_store`,
//!   `CLAIM_SQL`), `server` (a private server killed mid-run:
//!   `PrivateServer`; connect errors without the password: `SECRET_URL`,
//!   `REDACTED`), `row_locks` (a purge skips the rows consumers hold).
//!   SQLite runs in-process with one writer: no wire, no server, and a
//!   purge waits for the writer like everyone else.
#![allow(unused_macros)]

macro_rules! sql_store_suite {
    (db = $db:ident, store = $store:tt, tx = $tx:tt $(, $section:ident)* $(,)?) => {
        sql_store_suite!(@common $db $store $tx);
        $( sql_store_suite!(@$section $db $store $tx); )*
    };

    (@common $db:ident [$($store:tt)+] [$($tx:tt)+]) => {
        use std::sync::atomic::{AtomicU32, Ordering};
        use std::time::Duration;

        use common::{order, run_until_idle};
        use idem::source::memory::{Faults, MemoryBroker};
        use idem::store::{Claim, ClaimRequest, Claimed, TxStore};
        use idem::{Fingerprint, Key, Runtime, StoreError, Tx, idempotent};
        use serde::Deserialize;

        #[derive(Debug, Deserialize)]
        struct Order {
            order_id: String,
            seq: u32,
        }

        #[derive(Debug, thiserror::Error)]
        #[error("{0}")]
        struct AppError(String);

        async fn apply(tx: &mut Tx<'_, $db::Database>, handler: &str, o: &Order) -> Result<(), AppError> {
            $db::insert_effect(tx, handler, &o.order_id, o.seq)
                .await
                .map_err(|e| AppError(e.to_string()))
        }

        fn assert_exactly_once(counts: &std::collections::BTreeMap<String, i64>, keys: usize) {
            assert_eq!(counts.len(), keys, "every key has an effect");
            let doubled: Vec<_> = counts.iter().filter(|(_, n)| **n != 1).collect();
            assert!(doubled.is_empty(), "keys applied more than once: {doubled:?}");
        }

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

        // --- exactly once under redelivery ---------------------------------

        #[idempotent(topic = "dup", key = "order_id", store = $($store)+, name = "sql-dup", ttl = "7d")]
        async fn sql_dup(o: Order, tx: &mut $($tx)+) -> Result<(), AppError> {
            apply(tx, "sql-dup", &o).await
        }

        #[tokio::test]
        async fn redelivered_messages_apply_once() {
            let db = $db::Db::new().await;
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
                .handlers(["sql-dup"])
                .concurrency(16)
                .build()
                .unwrap();
            run_until_idle(&rt, &broker).await;

            assert_exactly_once(&db.effect_counts("sql-dup").await, 200);
            assert_eq!(db.dedup_rows("sql-dup").await, 200);
            let stats = rt.stats_of("sql-dup").unwrap();
            assert_eq!(stats.processed, 200);
            assert!(stats.duplicate >= 29, "{stats:?}");
            assert_eq!(stats.failed, 0, "{stats:?}");
            // ttl = "7d" sets the expiry from the store's clock.
            assert_eq!(db.ttl_seconds("sql-dup").await, 7.0 * 86400.0);
        }

        // --- rollback on error and on panic ---------------------------------

        static FLAKY: AtomicU32 = AtomicU32::new(0);

        #[idempotent(
            topic = "flaky",
            key = "order_id",
            store = $($store)+,
            name = "sql-flaky",
            retries = 3,
            backoff = "1ms..5ms"
        )]
        async fn sql_flaky(o: Order, tx: &mut $($tx)+) -> Result<(), AppError> {
            apply(tx, "sql-flaky", &o).await?;
            // The effect is written, then the first attempt fails (error for
            // k-err, panic for k-panic): the rollback must take effect and
            // dedup row along.
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
            let db = $db::Db::new().await;
            let broker = MemoryBroker::new();
            broker.publish("flaky", order("k-err", 1));
            broker.publish("flaky", order("k-panic", 2));
            let rt = Runtime::builder(broker.clone())
                .store(db.store.clone())
                .handlers(["sql-flaky"])
                .build()
                .unwrap();
            run_until_idle(&rt, &broker).await;

            assert_eq!(FLAKY.load(Ordering::SeqCst), 3, "both failures happened");
            assert_exactly_once(&db.effect_counts("sql-flaky").await, 2);
            assert_eq!(db.dedup_rows("sql-flaky").await, 2);
            let stats = rt.stats_of("sql-flaky").unwrap();
            assert_eq!((stats.failed, stats.retried, stats.processed), (2, 2, 2));
        }

        // --- two runtimes race on the same keys -------------------------------

        #[idempotent(topic = "race", key = "order_id", store = $($store)+, name = "sql-race")]
        async fn sql_race(o: Order, tx: &mut $($tx)+) -> Result<(), AppError> {
            apply(tx, "sql-race", &o).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn two_runtimes_racing_on_1000_keys_apply_each_once() {
            let db = $db::Db::new().await;
            let other = db.second_store(16).await;
            let (a, b) = (MemoryBroker::new(), MemoryBroker::new());
            let mut rng = fastrand::Rng::with_seed(3);
            for i in 0..1000 {
                // Three deliveries per key, spread over both consumers, with
                // message ids of their own (replays): only the key identifies them.
                for copy in 0..3 {
                    let broker = if rng.bool() { &a } else { &b };
                    broker.publish("race", order(&format!("k{i}"), i).id(format!("m{i}-{copy}")));
                }
            }
            let rt_a = Runtime::builder(a.clone())
                .store(db.store.clone())
                .handlers(["sql-race"])
                .concurrency(16)
                .build()
                .unwrap();
            let rt_b = Runtime::builder(b.clone())
                .store(other)
                .handlers(["sql-race"])
                .concurrency(16)
                .build()
                .unwrap();
            tokio::join!(run_until_idle(&rt_a, &a), run_until_idle(&rt_b, &b));

            assert_exactly_once(&db.effect_counts("sql-race").await, 1000);
            let (sa, sb) = (rt_a.stats_of("sql-race").unwrap(), rt_b.stats_of("sql-race").unwrap());
            assert_eq!(sa.processed + sb.processed, 1000, "{sa:?} {sb:?}");
            assert_eq!(sa.duplicate + sb.duplicate, 2000, "{sa:?} {sb:?}");
            // No unique violation (or anything else) reached a handler.
            assert_eq!(sa.failed + sb.failed + sa.dead_lettered + sb.dead_lettered, 0);
        }

        // --- the same key on two connections at once ----------------------------

        #[tokio::test]
        async fn concurrent_claim_waits_then_sees_commit_or_rollback() {
            for commit_first in [true, false] {
                let db = $db::Db::new().await;
                let store = db.store.clone();
                let key = Key::new("k1").unwrap();
                let mut first = store.begin().await.unwrap();
                let got = store.claim(&mut first, &[request(&key, 1, None)]).await.unwrap();
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
                db.wait_for_lock_wait().await;
                assert!(!second.is_finished(), "the second claim waits for the first");
                let r = request(&key, 1, None);
                let claimed = [Claimed { request: &r, token: 0, result: Some("\"receipt-1\"") }];
                if commit_first {
                    store.commit(first, &claimed).await.unwrap();
                } else {
                    store.rollback(first).await.unwrap();
                }
                let second = second.await.unwrap().expect("no error reaches the caller");
                let want = if commit_first {
                    Claim::Done { cached: Some("\"receipt-1\"".into()) }
                } else {
                    Claim::New { token: 0 }
                };
                assert_eq!(second, vec![want], "commit_first = {commit_first}");
            }
        }

        /// A key given twice in one claim is claimed once; a record expired
        /// is taken over; a live one answers with its result.
        #[tokio::test]
        async fn one_claim_takes_each_key_once_and_expired_records_over() {
            let db = $db::Db::new().await;
            let store = db.store.clone();
            let keys: Vec<Key> = ["live", "gone", "new"].iter().map(|k| Key::new(*k).unwrap()).collect();
            let mut tx = store.begin().await.unwrap();
            let first: Vec<ClaimRequest<'_>> = keys[..2].iter().map(|k| request(k, 1, None)).collect();
            store.claim(&mut tx, &first).await.unwrap();
            let done: Vec<Claimed<'_>> = first
                .iter()
                .map(|r| Claimed { request: r, token: 0, result: Some("7") })
                .collect();
            store.commit(tx, &done).await.unwrap();
            db.expire(None).await;
            // Re-live "live" (expire() expired both).
            let mut tx = store.begin().await.unwrap();
            let again = [request(&keys[0], 2, Some(Duration::from_secs(3600)))];
            assert_eq!(store.claim(&mut tx, &again).await.unwrap(), vec![Claim::New { token: 0 }]);
            store.commit(tx, &[Claimed { request: &again[0], token: 0, result: Some("8") }]).await.unwrap();

            let mut tx = store.begin().await.unwrap();
            let all = [
                request(&keys[2], 3, None),
                request(&keys[0], 2, None),
                request(&keys[2], 3, None),
                request(&keys[1], 4, None),
                request(&keys[0], 2, None),
            ];
            let got = store.claim(&mut tx, &all).await.unwrap();
            store.commit(tx, &[]).await.unwrap();
            let twin = Claim::InProgress { retry_after: Duration::ZERO };
            assert_eq!(
                got,
                vec![
                    Claim::New { token: 0 },
                    Claim::Done { cached: Some("8".into()) },
                    twin.clone(),
                    Claim::New { token: 0 },
                    twin,
                ]
            );
        }

        /// A TTL too long for the database's timestamps is kept 1,000
        /// years, not refused.
        #[tokio::test]
        async fn a_very_long_ttl_is_capped_not_refused() {
            let db = $db::Db::new().await;
            let key = Key::new("k").unwrap();
            let forever = Some(Duration::from_secs(u64::MAX / 4));
            let mut tx = db.store.begin().await.unwrap();
            let got = db.store.claim(&mut tx, &[request(&key, 1, forever)]).await.unwrap();
            db.store.commit(tx, &[]).await.unwrap();
            assert_eq!(got, vec![Claim::New { token: 0 }]);
            let years = db.ttl_seconds("direct").await / (366.0 * 86400.0);
            assert!((999.0..=1000.0).contains(&years), "{years} years");
        }

        // --- conflict: same key, other payload ---------------------------------

        #[idempotent(
            topic = "conflict",
            key = "order_id",
            store = $($store)+,
            name = "sql-conflict",
            fingerprint = ["seq"]
        )]
        async fn sql_conflict(o: Order, tx: &mut $($tx)+) -> Result<(), AppError> {
            apply(tx, "sql-conflict", &o).await
        }

        #[tokio::test]
        async fn same_key_with_other_payload_is_dead_lettered_as_conflict() {
            let db = $db::Db::new().await;
            let broker = MemoryBroker::new();
            broker.publish("conflict", order("k1", 1).id("first"));
            let rt = Runtime::builder(broker.clone())
                .store(db.store.clone())
                .handlers(["sql-conflict"])
                .build()
                .unwrap();
            run_until_idle(&rt, &broker).await;
            // The producer reuses the key for another order.
            broker.publish("conflict", order("k1", 2).id("second"));
            run_until_idle(&rt, &broker).await;

            assert_exactly_once(&db.effect_counts("sql-conflict").await, 1);
            assert_eq!(db.effect_seq("sql-conflict").await, 1, "the first payload's effect stays");
            let letters = broker.dead_letters("conflict.dlq");
            assert_eq!(letters.len(), 1, "{letters:?}");
            assert_eq!(&*letters[0].delivery.id, "second");
            let reason = &letters[0].letter.reason;
            assert!(reason.contains("key conflict"), "{reason}");
        }

        // --- TTL expiry and garbage collection ------------------------------------

        #[idempotent(topic = "ttl", key = "order_id", store = $($store)+, name = "sql-ttl", ttl = "1h")]
        async fn sql_ttl(o: Order, tx: &mut $($tx)+) -> Result<(), AppError> {
            apply(tx, "sql-ttl", &o).await
        }

        #[tokio::test]
        async fn expired_record_is_forgotten_and_purged_in_bounded_batches() {
            let db = $db::Db::new().await;
            let broker = MemoryBroker::new();
            let rt = Runtime::builder(broker.clone())
                .store(db.store.clone())
                .handlers(["sql-ttl"])
                .build()
                .unwrap();
            broker.publish("ttl", order("k1", 1).id("m1"));
            run_until_idle(&rt, &broker).await;
            broker.publish("ttl", order("k1", 1).id("m1"));
            run_until_idle(&rt, &broker).await;
            assert_exactly_once(&db.effect_counts("sql-ttl").await, 1);

            // Expire the record (instead of waiting an hour): a replay after
            // the retention period is a new message.
            db.expire(None).await;
            broker.publish("ttl", order("k1", 1).id("m1"));
            run_until_idle(&rt, &broker).await;
            assert_eq!(db.effect_counts("sql-ttl").await.get("k1"), Some(&2));

            // 2,500 expired rows and 10 live ones; purge 1,000 per statement.
            db.insert_rows("gc", "e", 2500, true).await;
            db.insert_rows("gc", "l", 10, false).await;
            assert_eq!(db.store.purge_expired(1000).await.unwrap(), 1000, "bounded");
            assert_eq!(idem::store::purge_all(&db.store, 1000).await.unwrap(), 1500);
            assert_eq!(db.dedup_rows("gc").await, 10, "live rows stay");

            // The runtime's periodic purge reports what it deleted.
            db.expire(Some("gc")).await;
            let rt = Runtime::builder(MemoryBroker::new())
                .store(db.store.clone())
                .handlers(["sql-ttl"])
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

        // --- names that end up in SQL text are validated ----------------------------

        #[tokio::test]
        async fn malicious_table_name_is_rejected_before_any_sql() {
            let db = $db::Db::new().await;
            for bad in ["idem_dedup; DROP TABLE effects; --", "x\"y", "", "1abc", "a.b", "ünïcode"] {
                let e = db.store.clone().with_table(bad).unwrap_err();
                assert!(matches!(e, StoreError::Config { .. }), "{bad:?}: {e}");
                assert!(e.to_string().contains("invalid table name"), "{e}");
            }
            // The effects table is still there.
            assert_eq!(db.effect_rows().await, 0);
        }

        #[tokio::test]
        async fn migrations_are_versioned_idempotent_and_safe_concurrently() {
            let db = $db::Db::new().await;
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
            assert_eq!(db.versions("other_dedup_migrations").await, vec![1]);
        }

        #[tokio::test]
        async fn missing_table_is_a_config_error_naming_migrate() {
            let db = $db::Db::new().await;
            let store = db.store.clone().with_table("never_migrated").unwrap();
            let key = Key::new("k").unwrap();
            let mut tx = store.begin().await.unwrap();
            let e = store.claim(&mut tx, &[request(&key, 1, None)]).await.unwrap_err();
            assert!(matches!(e, StoreError::Config { .. }), "{e}");
            assert!(e.to_string().contains("migrate()"), "{e}");
        }
    };

    (@wire $db:ident [$($store:tt)+] [$($tx:tt)+]) => {
        // --- batch: one claim round trip per batch ----------------------------------

        #[tokio::test]
        async fn a_batch_of_64_keys_is_claimed_in_one_round_trip() {
            let db = $db::Db::new().await;
            let (store, wire) = db.counting_store(1).await;
            // Half of the keys are already done, one of them with another payload.
            let keys: Vec<Key> = (0..64).map(|i| Key::new(format!("k{i}")).unwrap()).collect();
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

            assert_eq!(after.round_trips - before.round_trips, 1, "one round trip for 64 keys");
            let statements: u64 =
                after.executions.values().sum::<u64>() - before.executions.values().sum::<u64>();
            assert_eq!(statements, 1, "one statement for 64 keys");
            for (i, c) in claims.iter().enumerate() {
                let want = match i {
                    1 => Claim::Conflict { stored: Fingerprint::new(1) },
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

        #[idempotent(topic = "batch", key = "order_id", store = $($store)+, name = "sql-batch", ack = "batch")]
        async fn sql_batch(i: Item, tx: &mut $($tx)+) -> Result<(), AppError> {
            let o = Order { order_id: i.order_id, seq: i.seq };
            if o.order_id == "poison" {
                return Err(AppError("cannot apply".into()));
            }
            apply(tx, "sql-batch", &o).await
        }

        #[tokio::test]
        async fn batch_mode_claims_once_per_batch_and_isolates_a_failing_item() {
            let db = $db::Db::new().await;
            let (store, wire) = db.counting_store(4).await;
            let broker = MemoryBroker::new();
            for i in 0..640 {
                broker.publish("batch", order(&format!("k{i}"), i));
            }
            broker.publish("batch", order("poison", 0));
            // The same key twice in the stream (a producer retry).
            broker.publish("batch", order("k5", 5).id("k5-again"));
            let rt = Runtime::builder(broker.clone())
                .store(store)
                .handlers(["sql-batch"])
                .concurrency(64)
                .build()
                .unwrap();
            run_until_idle(&rt, &broker).await;

            assert_exactly_once(&db.effect_counts("sql-batch").await, 640);
            assert_eq!(broker.dead_letters("batch.dlq").len(), 1);
            let claims = wire.executions_of($db::CLAIM_SQL);
            let stats = rt.stats_of("sql-batch").unwrap();
            // All 642 messages wait in the broker and a batch holds all 64
            // permits until it is done, so the loop fetches 11 batches
            // (10 × 64 + 2). Each is claimed with one statement; each retry
            // of the poison item runs alone, with one claim of its own.
            assert_eq!(stats.received, 642);
            assert_eq!(
                claims,
                642_u64.div_ceil(64) + stats.retried,
                "claim statements: one per batch plus one per retry ({stats:?})"
            );
        }
    };

    (@row_locks $db:ident [$($store:tt)+] [$($tx:tt)+]) => {
        /// A purge never waits on (nor deletes) an expired row a consumer is
        /// taking over right now.
        #[tokio::test]
        async fn purge_skips_rows_a_consumer_holds() {
            let db = $db::Db::new().await;
            let store = db.store.clone();
            db.insert_rows("direct", "k", 3, true).await;
            let key = Key::new("k1").unwrap();
            let mut tx = store.begin().await.unwrap();
            let r = [request(&key, 1, Some(Duration::from_secs(60)))];
            assert_eq!(store.claim(&mut tx, &r).await.unwrap(), vec![Claim::New { token: 0 }]);
            let purged = tokio::time::timeout(Duration::from_secs(20), store.purge_expired(100))
                .await
                .expect("the purge does not wait on the consumer");
            store.commit(tx, &[]).await.unwrap();
            assert_eq!(purged.unwrap(), 2, "the two other expired rows");
            assert_eq!(db.dedup_rows("direct").await, 1, "the claimed row stays");
        }
    };

    (@server $db:ident [$($store:tt)+] [$($tx:tt)+]) => {
        // --- the server goes away mid-run -------------------------------------------

        use std::sync::atomic::AtomicBool;

        static OUTAGE_EFFECTS: AtomicU32 = AtomicU32::new(0);
        static OUTAGE_STARTED: AtomicBool = AtomicBool::new(false);

        #[idempotent(topic = "outage", key = "order_id", store = $($store)+, name = "sql-outage")]
        async fn sql_outage(o: Order, tx: &mut $($tx)+) -> Result<(), AppError> {
            apply(tx, "sql-outage", &o).await?;
            OUTAGE_EFFECTS.fetch_add(1, Ordering::SeqCst);
            // Slow enough that the server stops while handlers are in flight.
            tokio::time::sleep(Duration::from_millis(2)).await;
            Ok(())
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn server_restart_mid_run_loses_nothing_and_doubles_nothing() {
            let server = tokio::task::spawn_blocking($db::PrivateServer::start).await.unwrap();
            let db = $db::Db::at(&server.url(), 8).await;
            let broker = MemoryBroker::new();
            for i in 0..400 {
                broker.publish("outage", order(&format!("k{i}"), i));
            }
            let rt = Runtime::builder(broker.clone())
                .store(db.store.clone())
                .handlers(["sql-outage"])
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
            assert_exactly_once(&db.effect_counts("sql-outage").await, 400);
            assert!(broker.dead_letters("outage.dlq").is_empty(), "an outage dead-letters nothing");
            let stats = rt.stats_of("sql-outage").unwrap();
            assert!(stats.processed + stats.duplicate >= 400, "{stats:?}");
        }

        #[tokio::test]
        async fn connect_errors_do_not_show_the_password() {
            let e = $db::Store::connect($db::SECRET_URL).await.unwrap_err();
            let text = format!("{e} {e:?}");
            assert!(!text.contains("hunter2-secret"), "{text}");
            assert!(text.contains($db::REDACTED), "{text}");
        }
    };
}
