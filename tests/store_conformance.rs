//! Every store, one suite: the public conformance suite
//! (`idem::testing::conformance`, one test per rule) and the delivery
//! scenarios every store must survive (through `idem::testing::TestKit`),
//! stamped per store by `store_suite!`.
//!
//! Stores: memory, SQLite, PostgreSQL (`DATABASE_URL`, a schema per test),
//! MariaDB/MySQL (`MYSQL_URL`, a database per test),
//! Redis (`REDIS_URL`, a key prefix per test), and `Audited`, a store of the
//! test's own (a `TxStore` wrapping SQLite's). A missing server fails its
//! tests with the fix in the message; nothing skips.
//!
//! A rule a built-in store is known to break is listed in its `known`
//! list with the reason: its test then checks that the suite still catches
//! it, and fails once the store is fixed, so the entry gets removed.

// `my` and `pg` each carry their own copy of the shared SQL test helpers.
#![allow(clippy::duplicate_mod)]

mod common;
#[path = "common/mysql.rs"]
mod my;
#[path = "common/pg.rs"]
mod pg;
#[path = "common/redis.rs"]
mod rh;

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use idem::source::memory::{BrokerEvent, Faults, Message};
use idem::store::memory::MemoryStore;
use idem::store::mysql::MysqlStore;
use idem::store::postgres::PostgresStore;
use idem::store::redis::RedisStore;
use idem::store::sqlite::SqliteStore;
use idem::store::{Claim, ClaimRequest, Claimed};
use idem::testing::TestKit;
use idem::testing::conformance::{LeaseRule, TxRule};
use idem::{LeaseStore, StoreError, Tx, TxStore, idempotent};
use serde::Deserialize;

// --- the stores -----------------------------------------------------------------

/// What a test deletes on a shared server when it is done.
type Cleanup = std::pin::Pin<Box<dyn Future<Output = ()>>>;

/// How a test gets a fresh store, and what it deletes afterwards on a
/// shared server.
trait Fixture: Sized + Send + Sync + 'static {
    async fn new() -> Self;

    /// Cleans up after the test (taken before the store moves into it).
    fn cleanup(&self) -> Cleanup {
        Box::pin(async {})
    }
}

impl Fixture for MemoryStore {
    async fn new() -> Self {
        MemoryStore::new()
    }
}

impl Fixture for SqliteStore {
    async fn new() -> Self {
        common::sqlite().await
    }
}

impl Fixture for PostgresStore {
    async fn new() -> Self {
        pg::Db::new().await.store
    }

    fn cleanup(&self) -> Cleanup {
        let (pool, table) = (self.pool().clone(), self.qualified_table().to_owned());
        Box::pin(async move {
            let schema = table.split('.').next().unwrap_or_default();
            let drop = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
            sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
                .execute(&pool)
                .await
                .expect("drop the test's schema");
        })
    }
}

impl Fixture for MysqlStore {
    async fn new() -> Self {
        my::Db::new().await.store
    }

    fn cleanup(&self) -> Cleanup {
        let pool = self.pool().clone();
        Box::pin(async move {
            let database: String = sqlx::query_scalar("SELECT DATABASE()")
                .fetch_one(&pool)
                .await
                .expect("the test's database");
            let drop = format!("DROP DATABASE IF EXISTS {database}");
            sqlx::raw_sql(sqlx::AssertSqlSafe(drop))
                .execute(&pool)
                .await
                .expect("drop the test's database");
        })
    }
}

impl Fixture for RedisStore {
    async fn new() -> Self {
        let prefix = rh::unique_prefix("conformance");
        rh::shared_store(RedisStore::builder(&rh::shared_url()).prefix(prefix)).await
    }

    fn cleanup(&self) -> Cleanup {
        let prefix = self.prefix().to_owned();
        Box::pin(async move {
            rh::Inspect::single(&rh::shared_url())
                .await
                .cleanup(&prefix)
                .await
        })
    }
}

/// A store of the test's own: SQLite's, counting its commits.
struct Audited {
    inner: SqliteStore,
    commits: AtomicU64,
}

impl Fixture for Audited {
    async fn new() -> Self {
        Audited {
            inner: common::sqlite().await,
            commits: AtomicU64::new(0),
        }
    }
}

impl TxStore for Audited {
    type Tx<'c> = Tx<'c>;

    fn kind(&self) -> &'static str {
        "audited-sqlite"
    }
    async fn begin(&self) -> Result<Self::Tx<'static>, StoreError> {
        self.inner.begin().await
    }
    async fn claim(
        &self,
        tx: &mut Self::Tx<'_>,
        requests: &[ClaimRequest<'_>],
    ) -> Result<Vec<Claim>, StoreError> {
        self.inner.claim(tx, requests).await
    }
    async fn commit(&self, tx: Self::Tx<'static>, done: &[Claimed<'_>]) -> Result<(), StoreError> {
        self.inner.commit(tx, done).await?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
    async fn rollback(&self, tx: Self::Tx<'static>) -> Result<(), StoreError> {
        self.inner.rollback(tx).await
    }
    async fn savepoint<'t>(&self, tx: &'t mut Self::Tx<'_>) -> Result<Self::Tx<'t>, StoreError> {
        self.inner.savepoint(tx).await
    }
    async fn end_savepoint(&self, tx: Self::Tx<'_>, keep: bool) -> Result<(), StoreError> {
        self.inner.end_savepoint(tx, keep).await
    }
    async fn unclaim(
        &self,
        tx: &mut Self::Tx<'_>,
        claimed: &[Claimed<'_>],
    ) -> Result<(), StoreError> {
        self.inner.unclaim(tx, claimed).await
    }
    async fn purge_expired(&self, limit: u32) -> Result<u64, StoreError> {
        TxStore::purge_expired(&self.inner, limit).await
    }
}

// --- running one rule -------------------------------------------------------------

/// Runs `check` (one rule, written as `rule`'s Debug name); a rule listed
/// in `known` must fail with its own statement in the message.
async fn rule(
    check: impl Future<Output = ()>,
    rule: &str,
    statement: &str,
    known: &[(&str, &str)],
    cleanup: impl Future<Output = ()>,
) {
    let outcome = AssertUnwindSafe(check).catch_unwind().await;
    cleanup.await;
    match (outcome, known.iter().find(|(r, _)| *r == rule)) {
        (Ok(()), None) => {}
        (Err(panic), None) => std::panic::resume_unwind(panic),
        (Err(panic), Some((_, why))) => {
            let text = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .unwrap_or_default();
            assert!(
                text.contains(statement),
                "rule {rule} is known broken ({why}), but it failed otherwise: {text}"
            );
        }
        (Ok(()), Some((_, why))) => panic!(
            "this store now keeps rule {rule} ({statement}), listed as known broken ({why}): remove it from the store's `known` list"
        ),
    }
}

async fn lease_rule<S: Fixture + LeaseStore>(r: LeaseRule, known: &[(&str, &str)]) {
    let store = S::new().await;
    let cleanup = store.cleanup();
    rule(
        r.check(store),
        &format!("{r:?}"),
        r.statement(),
        known,
        cleanup,
    )
    .await;
}

async fn tx_rule<S: Fixture + TxStore>(r: TxRule, known: &[(&str, &str)]) {
    let store = S::new().await;
    let cleanup = store.cleanup();
    rule(
        r.check(store),
        &format!("{r:?}"),
        r.statement(),
        known,
        cleanup,
    )
    .await;
}

/// One test per `LeaseRule`, on the module's `Store` (skipping `KNOWN`).
macro_rules! lease_rules {
    () => {
        lease_rules! {
            new_claims_have_unique_tokens: NewClaimsHaveUniqueTokens,
            done_returns_the_cached_result: DoneReturnsTheCachedResult,
            in_progress_while_the_lease_lives: InProgressWhileTheLeaseLives,
            expired_lease_is_claimable_again: ExpiredLeaseIsClaimableAgain,
            release_frees_only_our_own_lease: ReleaseFreesOnlyOurOwnLease,
            lost_lease_completion_keeps_the_new_owner: LostLeaseCompletionKeepsTheNewOwner,
            late_completion_of_an_untaken_key_is_recorded: LateCompletionOfAnUntakenKeyIsRecorded,
            done_records_expire_after_ttl: DoneRecordsExpireAfterTtl,
            conflict_only_when_both_fingerprints_differ: ConflictOnlyWhenBothFingerprintsDiffer,
            batch_forms_agree_and_keep_order: BatchFormsAgreeAndKeepOrder,
            key_twice_in_one_batch: KeyTwiceInOneBatch,
            purge_deletes_only_expired_records: PurgeDeletesOnlyExpiredRecords,
            records_are_per_handler: RecordsArePerHandler,
        }
        #[test]
        fn every_lease_rule_has_a_test() {
            assert_eq!(LeaseRule::ALL.len(), 13, "stamp the new LeaseRule in lease_rules!");
        }
    };
    ($($test:ident: $rule:ident),* $(,)?) => {
        mod rules {
            use super::*;
            $(
                #[tokio::test]
                async fn $test() {
                    crate::lease_rule::<Store>(LeaseRule::$rule, KNOWN).await;
                }
            )*
        }
    };
}

/// One test per `TxRule`, on the module's `Store` (skipping `KNOWN`).
macro_rules! tx_rules {
    () => {
        tx_rules! {
            committed_claim_is_done_with_the_cached_result: CommittedClaimIsDoneWithTheCachedResult,
            rollback_undoes_the_claim: RollbackUndoesTheClaim,
            concurrent_claim_waits_then_sees_the_commit: ConcurrentClaimWaitsThenSeesTheCommit,
            concurrent_claim_waits_then_sees_the_rollback: ConcurrentClaimWaitsThenSeesTheRollback,
            savepoints_keep_or_undo_their_claims: SavepointsKeepOrUndoTheirClaims,
            unclaim_in_a_committing_transaction: UnclaimInACommittingTransaction,
            done_records_expire_after_ttl: DoneRecordsExpireAfterTtl,
            conflict_only_when_both_fingerprints_differ: ConflictOnlyWhenBothFingerprintsDiffer,
            batch_claims_keep_order: BatchClaimsKeepOrder,
            key_twice_in_one_call: KeyTwiceInOneCall,
            purge_deletes_only_expired_records: PurgeDeletesOnlyExpiredRecords,
            records_are_per_handler: RecordsArePerHandler,
        }
        #[test]
        fn every_tx_rule_has_a_test() {
            assert_eq!(TxRule::ALL.len(), 12, "stamp the new TxRule in tx_rules!");
        }
    };
    ($($test:ident: $rule:ident),* $(,)?) => {
        mod rules {
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    crate::tx_rule::<Store>(TxRule::$rule, KNOWN).await;
                }
            )*
        }
    };
}

// --- the delivery scenarios ---------------------------------------------------------

#[derive(Debug, Deserialize)]
struct Order {
    order_id: String,
    #[serde(default)]
    seq: u32,
}

fn order(key: &str, seq: u32) -> Message {
    common::order(key, seq)
}

/// Handler runs and effects, by handler name and `key:seq`.
static RUNS: Mutex<Option<HashMap<(String, String), u32>>> = Mutex::new(None);
static EFFECTS: Mutex<Option<HashMap<(String, String), u32>>> = Mutex::new(None);

fn bump(map: &Mutex<Option<HashMap<(String, String), u32>>>, handler: &str, key: &str) -> u32 {
    let mut map = map.lock().unwrap();
    let n = map
        .get_or_insert_with(HashMap::new)
        .entry((handler.to_owned(), key.to_owned()))
        .or_default();
    *n += 1;
    *n
}

fn read(map: &Mutex<Option<HashMap<(String, String), u32>>>, handler: &str, key: &str) -> u32 {
    map.lock()
        .unwrap()
        .as_ref()
        .and_then(|m| m.get(&(handler.to_owned(), key.to_owned())).copied())
        .unwrap_or(0)
}

/// Every scenario handler's body: a key starting with `fail-once` fails its
/// first run; the effect is counted per `key:seq`.
fn run(handler: &str, o: &Order) -> Result<(), String> {
    if bump(&RUNS, handler, &o.order_id) == 1 && o.order_id.starts_with("fail-once") {
        return Err(format!("{} fails once", o.order_id));
    }
    bump(&EFFECTS, handler, &format!("{}:{}", o.order_id, o.seq));
    Ok(())
}

/// A kit for `handler` on a fresh `S`, and the store's cleanup.
async fn kit<S: Fixture + idem::DedupStore<M>, M>(
    handler: &str,
    faults: Faults,
) -> (TestKit, Cleanup) {
    let store = S::new().await;
    let cleanup = store.cleanup();
    let kit = TestKit::builder(handler)
        .store(store)
        .faults(faults)
        // The failure scenario's lease is 1 h: a retry that waited for it
        // instead of finding it released would miss this deadline.
        .deadline(Duration::from_secs(30))
        .build()
        .expect("the kit builds");
    (kit, cleanup)
}

/// The delivery scenarios, on the module's `Store` and two handlers:
/// `$one` (one message at a time) and `$batch` (`ack = "batch"`).
macro_rules! scenarios {
    ($one:tt, $batch:tt) => {
        mod scenarios {
            use super::*;

            #[tokio::test]
            async fn redelivered_messages_apply_once() {
                let faults = Faults {
                    duplicate: 0.5,
                    lose_ack: 0.3,
                    seed: 3,
                    ..Faults::default()
                };
                let (kit, cleanup) = crate::kit::<Store, _>($one, faults).await;
                let report = kit
                    .deliver_all((0..40).map(|i| order(&format!("dup-{i}"), 0).id(format!("m{i}"))))
                    .await;
                for i in 0..40 {
                    assert_eq!(read(&EFFECTS, $one, &format!("dup-{i}:0")), 1, "dup-{i}");
                }
                let stats = report.stats();
                assert_eq!(stats.processed, 40, "{stats:?}");
                assert!(stats.duplicate > 0, "{stats:?}");
                cleanup.await;
            }

            #[tokio::test]
            async fn lost_acks_redeliver_and_are_acked_as_duplicates() {
                let (kit, cleanup) = crate::kit::<Store, _>($one, Faults::default()).await;
                kit.broker().lose_next_acks("orders", "lost-m1", 2);
                let report = kit.deliver(order("lost-1", 0).id("lost-m1")).await;
                assert_eq!(read(&EFFECTS, $one, "lost-1:0"), 1);
                report.assert_effect_once().assert_duplicates(2);
                let lost = report
                    .events()
                    .iter()
                    .filter(|e| matches!(e, BrokerEvent::AckLost { .. }))
                    .count();
                assert_eq!(lost, 2, "{:?}", report.events());
                cleanup.await;
            }

            #[tokio::test]
            async fn crash_between_commit_and_ack_is_acked_as_duplicate_after_restart() {
                let (kit, cleanup) = crate::kit::<Store, _>($one, Faults::default()).await;
                let report = kit
                    .deliver_with_crash_before_ack(order("crash-1", 42).id("crash-m1"))
                    .await;
                assert_eq!(read(&RUNS, $one, "crash-1"), 1, "the redelivery must not run the handler");
                report.assert_effect_once().assert_duplicates(1);
                assert_eq!(report.restarts(), 1);
                assert_eq!(report.deliveries(), 2);
                assert!(
                    matches!(report.events().last(), Some(BrokerEvent::Acked { id }) if id == "crash-m1"),
                    "{:?}",
                    report.events()
                );
                cleanup.await;
            }

            #[tokio::test]
            async fn failure_releases_the_claim_so_the_retry_runs_at_once() {
                // The handler's lease is 1 h: the retry can only run within
                // the kit's 30 s deadline because the failed attempt released
                // its lease (or rolled back its claim).
                let (kit, cleanup) = crate::kit::<Store, _>($one, Faults::default()).await;
                let report = kit.deliver(order("fail-once-1", 0)).await;
                assert_eq!(read(&RUNS, $one, "fail-once-1"), 2);
                let s = report.stats();
                assert_eq!((s.failed, s.processed), (1, 1), "{s:?}");
                cleanup.await;
            }

            #[tokio::test]
            async fn same_key_with_another_payload_is_dead_lettered_as_conflict() {
                let (kit, cleanup) = crate::kit::<Store, _>($one, Faults::default()).await;
                kit.deliver(order("conflict-9", 1)).await.assert_effect_once();
                let report = kit.deliver(order("conflict-9", 2)).await;
                assert_eq!(read(&EFFECTS, $one, "conflict-9:1"), 1);
                assert_eq!(read(&EFFECTS, $one, "conflict-9:2"), 0);
                report.assert_dead_lettered("key conflict");
                cleanup.await;
            }

            #[tokio::test]
            async fn batch_item_failure_retries_only_that_item() {
                let (kit, cleanup) = crate::kit::<Store, _>($batch, Faults::default()).await;
                let keys = ["batch-1", "fail-once-batch-2", "batch-3", "batch-4"];
                let messages = || keys.iter().map(|k| order(k, 0).id(format!("{}-{k}", $batch)));
                let poison = Message::new("not json").id("poison");
                let report = kit.deliver_all(messages().chain([poison])).await;
                assert_eq!(report.stats().processed, 4, "{:?}", report.stats());
                assert_eq!(read(&RUNS, $batch, "fail-once-batch-2"), 2);
                assert_eq!(report.dead_letters().len(), 1, "{:?}", report.dead_letters());
                assert!(report.dead_letter("poison").is_some());
                if TRANSACTIONAL {
                    // One transaction for the batch, redone with a savepoint
                    // per item after the failure: a neighbour's handler may
                    // run twice, its effect commits once.
                    assert!(read(&RUNS, $batch, "batch-1") <= 2);
                } else {
                    // A lease store isolates each item: neighbours run once.
                    for k in keys {
                        assert_eq!(read(&EFFECTS, $batch, &format!("{k}:0")), 1, "{k}");
                    }
                    assert_eq!(read(&RUNS, $batch, "batch-1"), 1);
                }
                // Each item committed exactly once: all four come back as duplicates.
                let again = kit.deliver_all(messages()).await;
                assert_eq!((again.stats().processed, again.stats().duplicate), (0, 4), "{:?}", again.stats());
                cleanup.await;
            }
        }
    };
}

/// Everything, for one store: its conformance rules (`lease_rules` or
/// `tx_rules`), the two scenario handlers on `store = $attr`, and the
/// scenarios.
macro_rules! store_suite {
    (
        $module:ident: $store:ty,
        attribute = $attr:tt,
        rules = $rules:ident,
        transactional = $transactional:literal,
        handlers = ($one:tt, $batch:tt),
        known = [$($rule:ident: $why:literal),* $(,)?] $(,)?
    ) => {
        mod $module {
            use super::*;

            type Store = $store;

            /// Whether the store's record commits with the handler's writes.
            const TRANSACTIONAL: bool = $transactional;

            /// Rules this store is known to break, with the reason.
            const KNOWN: &[(&str, &str)] = &[$((stringify!($rule), $why)),*];

            #[idempotent(
                topic = "orders",
                key = "order_id",
                store = $attr,
                name = $one,
                lease = "1h",
                ttl = "10m",
                backoff = "1ms..2ms",
                fingerprint = ["seq"]
            )]
            async fn one(o: Order) -> Result<(), String> {
                run($one, &o)
            }

            #[idempotent(
                topic = "batch",
                key = "order_id",
                store = $attr,
                name = $batch,
                ack = "batch",
                ttl = "10m",
                backoff = "1ms..2ms"
            )]
            async fn batch(o: Order) -> Result<(), String> {
                run($batch, &o)
            }

            $rules!();
            scenarios!($one, $batch);
        }
    };
}

store_suite! {
    memory: MemoryStore,
    attribute = "memory",
    rules = lease_rules,
    transactional = false,
    handlers = ("memory-one", "memory-batch"),
    known = [],
}

store_suite! {
    redis: RedisStore,
    attribute = "redis",
    rules = lease_rules,
    transactional = false,
    handlers = ("redis-one", "redis-batch"),
    known = [],
}

store_suite! {
    sqlite: SqliteStore,
    attribute = "sqlite",
    rules = tx_rules,
    transactional = true,
    handlers = ("sqlite-one", "sqlite-batch"),
    known = [],
}

store_suite! {
    postgres: PostgresStore,
    attribute = "postgres",
    rules = tx_rules,
    transactional = true,
    handlers = ("postgres-one", "postgres-batch"),
    known = [],
}

store_suite! {
    mysql: MysqlStore,
    attribute = "mysql",
    rules = tx_rules,
    transactional = true,
    handlers = ("mysql-one", "mysql-batch"),
    known = [],
}

store_suite! {
    audited: Audited,
    attribute = Audited,
    rules = tx_rules,
    transactional = true,
    handlers = ("audited-one", "audited-batch"),
    known = [],
}

/// The custom store's own counter sees the kit's commits.
#[tokio::test]
async fn the_kit_runs_handlers_on_a_store_of_the_users_own() {
    let kit = TestKit::builder("audited-one")
        .store(Audited::new().await)
        .build()
        .unwrap();
    kit.deliver_twice(order("own-1", 0))
        .await
        .assert_effect_once();
    let audited = kit.store::<Audited>().expect("the registered store");
    assert_eq!(audited.commits.load(Ordering::Relaxed), 1);
}
