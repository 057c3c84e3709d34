//! The Redis store against real servers: the shared one (`REDIS_URL`, one
//! key prefix per test so tests run in parallel), private `redis-server`
//! processes for crashes, restarts, passwords and exact command counts, and
//! a private three-master Redis Cluster. A missing server fails the test.
//!
//! The rules of the `LeaseStore` contract (release frees only our own
//! lease, conflicts, expiry, …) and the delivery scenarios every store
//! shares run for Redis in `tests/store_conformance.rs`; the cluster test
//! below runs the conformance suite on a cluster too.

mod common;
#[path = "common/redis.rs"]
mod rh;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{order, run_until_idle};
use idem::source::memory::{Faults, MemoryBroker};
use idem::store::redis::{Fallback, RedisStore, RedisStoreBuilder};
use idem::store::{Claim, ClaimRequest, Claimed, LeaseStore};
use idem::{Backoff, CancellationToken, Fingerprint, Key, Runtime, StoreError, idempotent};
use rh::{Inspect, RedisCluster, RedisServer, TurnCounter, command_calls, shared_store};
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize)]
struct Order {
    order_id: String,
    #[serde(default)]
    seq: u32,
}

#[derive(Debug, Serialize)]
struct Receipt {
    order_id: String,
    seq: u32,
}

type Effects = Mutex<Option<HashMap<String, u32>>>;

fn record(effects: &Effects, key: &str) {
    *effects
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .entry(key.to_owned())
        .or_default() += 1;
}

fn count(effects: &Effects, key: &str) -> u32 {
    effects
        .lock()
        .unwrap()
        .as_ref()
        .and_then(|m| m.get(key).copied())
        .unwrap_or(0)
}

fn total(effects: &Effects, prefix: &str) -> u32 {
    effects.lock().unwrap().as_ref().map_or(0, |m| {
        m.iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, n)| n)
            .sum()
    })
}

/// A store on the shared server with its own prefix, and a connection to
/// look at its keys.
async fn shared(test: &str) -> (RedisStore, Inspect) {
    let store =
        shared_store(RedisStore::builder(&rh::shared_url()).prefix(rh::unique_prefix(test))).await;
    (store, Inspect::single(&rh::shared_url()).await)
}

fn request<'a>(key: &'a Key, fp: u64, lease: Duration, ttl: Option<Duration>) -> ClaimRequest<'a> {
    ClaimRequest {
        handler: "store-level",
        key,
        fingerprint: Some(Fingerprint::new(fp)),
        message_id: "m",
        lease,
        ttl,
    }
}

async fn claim_one(store: &RedisStore, req: &ClaimRequest<'_>) -> Claim {
    let mut claims = store
        .claim_all(std::slice::from_ref(req))
        .await
        .expect("claim");
    assert_eq!(claims.len(), 1);
    claims.remove(0)
}

fn token(claim: &Claim) -> u64 {
    match claim {
        Claim::New { token } => *token,
        other => panic!("expected a new claim, got {other:?}"),
    }
}

async fn commit(store: &RedisStore, req: &ClaimRequest<'_>, token: u64, result: Option<&str>) {
    store
        .complete_all(&[Claimed {
            request: req,
            token,
            result,
        }])
        .await
        .expect("commit");
}

const SEC: Duration = Duration::from_secs(1);
const MIN10: Duration = Duration::from_secs(600);

// --- duplicates are skipped and the cached result comes back ------------

static DUP: Effects = Mutex::new(None);

#[idempotent(
    topic = "dup",
    key = "order_id",
    store = "redis",
    name = "redis-dup",
    ttl = "10m",
    lease = "200ms",
    backoff = "1ms..5ms"
)]
async fn redis_dup(o: Order) -> Result<Receipt, String> {
    record(&DUP, &o.order_id);
    Ok(Receipt {
        order_id: o.order_id,
        seq: o.seq,
    })
}

async fn duplicates_are_skipped(store: RedisStore, inspect: Inspect, run: &str) {
    let broker = MemoryBroker::with_faults(Faults {
        duplicate: 0.5,
        lose_ack: 0.3,
        seed: 5,
        ..Faults::default()
    });
    for i in 0..40 {
        broker.publish("dup", order(&format!("{run}-{i}"), i).id(format!("m{i}")));
    }
    let rt = Runtime::builder(broker.clone())
        .store(store.clone())
        .handlers(["redis-dup"])
        .build()
        .unwrap();
    run_until_idle(&rt, &broker).await;
    for i in 0..40 {
        assert_eq!(count(&DUP, &format!("{run}-{i}")), 1, "key {run}-{i}");
    }
    let stats = rt.stats_of("redis-dup").unwrap();
    assert!(stats.duplicate > 0, "{stats:?}");
    assert_eq!(stats.processed, 40, "{stats:?}");

    // The record holds the handler's result; a claim returns it.
    let key = store.record_key("redis-dup", &format!("{run}-7"));
    let json = format!(r#"{{"order_id":"{run}-7","seq":7}}"#);
    let stored = inspect.get(&key).await.expect("done record");
    assert!(
        stored.starts_with("d|") && stored.ends_with(&format!("|{json}")),
        "{stored}"
    );
    let payload = serde_json::json!({ "order_id": format!("{run}-7"), "seq": 7 }).to_string();
    let k = Key::new(format!("{run}-7")).unwrap();
    let req = ClaimRequest {
        handler: "redis-dup",
        key: &k,
        fingerprint: Some(Fingerprint::of_bytes(payload.as_bytes())),
        message_id: "again",
        lease: SEC,
        ttl: Some(MIN10),
    };
    assert_eq!(
        claim_one(&store, &req).await,
        Claim::Done { cached: Some(json) }
    );
}

#[tokio::test]
async fn duplicates_are_skipped_with_the_cached_result() {
    let (store, inspect) = shared("dup").await;
    duplicates_are_skipped(store.clone(), inspect.clone(), "s-dup").await;
    inspect.cleanup(store.prefix()).await;
}

// --- TTL and lease expiry are set on the records ---------------------------

async fn ttl_and_lease_are_set(store: RedisStore, inspect: Inspect) {
    let k = Key::new("ttl-1").unwrap();
    let req = request(
        &k,
        1,
        Duration::from_secs(30),
        Some(Duration::from_secs(3600)),
    );
    let t = token(&claim_one(&store, &req).await);
    let key = store.record_key("store-level", "ttl-1");
    let lease = inspect.pttl(&key).await;
    assert!((29_000..=30_000).contains(&lease), "lease PTTL {lease}");
    assert!(inspect.get(&key).await.unwrap().starts_with("p|"));
    commit(&store, &req, t, None).await;
    let ttl = inspect.pttl(&key).await;
    assert!((3_599_000..=3_600_000).contains(&ttl), "done PTTL {ttl}");
    assert!(inspect.get(&key).await.unwrap().starts_with("d|"));

    // No `ttl`: the done-record has no expiry.
    let k = Key::new("ttl-none").unwrap();
    let req = request(&k, 1, Duration::from_secs(30), None);
    let t = token(&claim_one(&store, &req).await);
    commit(&store, &req, t, None).await;
    let key = store.record_key("store-level", "ttl-none");
    assert_eq!(inspect.pttl(&key).await, -1);

    // Another consumer's lease: in progress for what is left of it.
    let k = Key::new("busy-1").unwrap();
    let req = request(&k, 1, Duration::from_secs(2), Some(MIN10));
    let t = token(&claim_one(&store, &req).await);
    match claim_one(&store, &req).await {
        Claim::InProgress { retry_after } => assert!(
            retry_after > Duration::from_millis(1500) && retry_after <= Duration::from_secs(2),
            "{retry_after:?}"
        ),
        other => panic!("expected in progress, got {other:?}"),
    }
    commit(&store, &req, t, None).await;
    assert_eq!(claim_one(&store, &req).await, Claim::Done { cached: None });
}

#[tokio::test]
async fn ttl_and_lease_expiry_are_set() {
    let (store, inspect) = shared("ttl").await;
    ttl_and_lease_are_set(store.clone(), inspect.clone()).await;
    inspect.cleanup(store.prefix()).await;
}

// --- a crashed consumer's lease expires and another consumer takes over ---

static TAKEOVER: Effects = Mutex::new(None);
static TAKEOVER_AT: Mutex<Option<Instant>> = Mutex::new(None);

#[idempotent(
    topic = "takeover",
    key = "order_id",
    store = "redis",
    name = "redis-takeover",
    ttl = "10m",
    lease = "300ms",
    on_in_progress = "retry"
)]
async fn redis_takeover(o: Order) -> Result<(), String> {
    TAKEOVER_AT.lock().unwrap().get_or_insert_with(Instant::now);
    record(&TAKEOVER, &o.order_id);
    Ok(())
}

#[tokio::test]
async fn lease_expiry_after_a_crash_lets_another_consumer_process() {
    let (store, inspect) = shared("takeover").await;
    let broker = MemoryBroker::new();
    let message = order("t-1", 0);
    let payload = message.payload.clone();
    broker.publish("takeover", message);

    // Consumer A claims the key with the handler's lease and "crashes":
    // it never completes nor releases.
    let crashed = shared_store(RedisStore::builder(&rh::shared_url()).prefix(store.prefix())).await;
    let k = Key::new("t-1").unwrap();
    let req = ClaimRequest {
        handler: "redis-takeover",
        key: &k,
        fingerprint: Some(Fingerprint::of_bytes(&payload)),
        message_id: "m",
        lease: Duration::from_millis(300),
        ttl: Some(MIN10),
    };
    let claimed_at = Instant::now();
    token(&claim_one(&crashed, &req).await);

    // Consumer B gets the redelivered message: in progress until the lease
    // runs out, then it processes it.
    let rt = Runtime::builder(broker.clone())
        .store(store.clone())
        .handlers(["redis-takeover"])
        .build()
        .unwrap();
    run_until_idle(&rt, &broker).await;
    assert_eq!(count(&TAKEOVER, "t-1"), 1);
    let ran_at = TAKEOVER_AT.lock().unwrap().expect("handler ran");
    assert!(
        ran_at.duration_since(claimed_at) >= Duration::from_millis(290),
        "the handler ran {:?} after the crashed consumer's claim, inside its 300 ms lease",
        ran_at.duration_since(claimed_at)
    );
    let key = store.record_key("redis-takeover", "t-1");
    assert!(inspect.get(&key).await.unwrap().starts_with("d|"));
    inspect.cleanup(store.prefix()).await;
}

// --- a slow handler whose lease expired cannot overwrite the new owner ---

async fn late_completion_cannot_overwrite(builder: RedisStoreBuilder, inspect: Inspect) {
    let a = builder.clone().connect().await.expect("consumer a");
    let b = builder.connect().await.expect("consumer b");
    let k = Key::new("slow-1").unwrap();
    let req = request(&k, 9, Duration::from_millis(150), Some(MIN10));
    let key = a.record_key("store-level", "slow-1");

    let ta = token(&claim_one(&a, &req).await);
    tokio::time::sleep(Duration::from_millis(200)).await; // past A's lease
    let tb = token(&claim_one(&b, &req).await);
    let b_lease = inspect.get(&key).await.unwrap();

    // A finishes late, while B runs: B's lease stays.
    commit(&a, &req, ta, Some(r#""from a""#)).await;
    assert_eq!(a.lost_leases(), 1);
    assert_eq!(inspect.get(&key).await.unwrap(), b_lease);
    assert_eq!(&b_lease[2..18], format!("{tb:016x}"), "{b_lease}");

    // B completes; A's retried completion still does not touch it.
    commit(&b, &req, tb, Some(r#""from b""#)).await;
    commit(&a, &req, ta, Some(r#""from a""#)).await;
    assert_eq!(a.lost_leases(), 2);
    assert_eq!(b.lost_leases(), 0);
    let done = inspect.get(&key).await.unwrap();
    assert!(done.ends_with(r#"|"from b""#), "{done}");
    assert_eq!(
        claim_one(&a, &req).await,
        Claim::Done {
            cached: Some(r#""from b""#.into())
        }
    );

    // A late completion that nobody overtook is written (and counted).
    let k = Key::new("slow-2").unwrap();
    let req = request(&k, 9, Duration::from_millis(100), Some(MIN10));
    let t = token(&claim_one(&a, &req).await);
    tokio::time::sleep(Duration::from_millis(150)).await;
    commit(&a, &req, t, None).await;
    assert_eq!(a.stats().late_completions, 1);
    assert_eq!(claim_one(&b, &req).await, Claim::Done { cached: None });
}

#[tokio::test]
async fn a_late_completion_cannot_overwrite_the_new_owner() {
    let prefix = rh::unique_prefix("slow");
    let builder = RedisStore::builder(&rh::shared_url()).prefix(&prefix);
    let inspect = Inspect::single(&rh::shared_url()).await;
    late_completion_cannot_overwrite(builder, inspect.clone()).await;
    inspect.cleanup(&prefix).await;
}

static GATE_CALLS: AtomicU32 = AtomicU32::new(0);
static GATE: tokio::sync::Notify = tokio::sync::Notify::const_new();
static STARTED: tokio::sync::Notify = tokio::sync::Notify::const_new();
static SLOW: Effects = Mutex::new(None);

#[idempotent(
    topic = "slow",
    key = "order_id",
    store = "redis",
    name = "redis-slow",
    ttl = "10m",
    lease = "200ms"
)]
async fn redis_slow(o: Order) -> Result<String, String> {
    let call = GATE_CALLS.fetch_add(1, Ordering::SeqCst);
    record(&SLOW, &o.order_id);
    if call == 0 {
        STARTED.notify_one();
        GATE.notified().await;
        return Ok("first".into());
    }
    Ok("second".into())
}

#[tokio::test]
async fn a_slow_handler_overtaken_after_failover_leaves_the_new_record() {
    let (store, inspect) = shared("failover").await;
    let broker = MemoryBroker::new();
    broker.publish("slow", order("f-1", 0));
    let rt = Runtime::builder(broker.clone())
        .store(store.clone())
        .handlers(["redis-slow"])
        .build()
        .unwrap();
    let key = store.record_key("redis-slow", "f-1");
    let stop = CancellationToken::new();
    let drive = async {
        STARTED.notified().await;
        tokio::time::sleep(Duration::from_millis(250)).await; // the lease ran out
        broker.redeliver_in_flight("slow"); // a failover hands it to "another consumer"
        let deadline = Instant::now() + Duration::from_secs(10);
        while !inspect.get(&key).await.is_some_and(|v| v.starts_with("d|")) {
            assert!(Instant::now() < deadline, "the second run never completed");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        GATE.notify_one(); // the first run finishes late
        tokio::time::timeout(Duration::from_secs(30), broker.wait_idle())
            .await
            .expect("idle");
        stop.cancel();
    };
    tokio::join!(rt.run(stop.clone()), drive);
    assert_eq!(count(&SLOW, "f-1"), 2, "both runs applied the effect");
    assert_eq!(store.lost_leases(), 1);
    let done = inspect.get(&key).await.unwrap();
    assert!(done.ends_with(r#"|"second""#), "{done}");
    inspect.cleanup(store.prefix()).await;
}

// --- a batch is one pipeline to claim and one to complete -----------------

static BATCH: Effects = Mutex::new(None);

#[idempotent(
    topic = "batch",
    key = "order_id",
    store = "redis",
    name = "redis-batch",
    ack = "batch",
    ttl = "10m"
)]
async fn redis_batch(o: Order) -> Result<(), String> {
    record(&BATCH, &o.order_id);
    Ok(())
}

#[tokio::test]
async fn a_batch_is_one_pipeline_to_claim_and_one_to_complete() {
    // A private server, so `INFO commandstats` counts only this test, and
    // a proxy that counts round trips on the wire.
    let server = RedisServer::start(&[]).await;
    let proxy = TurnCounter::start(server.port()).await;
    let inspect = Inspect::single(&server.url()).await;
    let store = RedisStore::builder(&proxy.url())
        .prefix("batch")
        .connect()
        .await
        .expect("connect through the proxy");
    let keys: Vec<Key> = (0..64)
        .map(|i| Key::new(format!("b-{i}")).unwrap())
        .collect();
    let requests: Vec<ClaimRequest<'_>> = keys
        .iter()
        .map(|k| request(k, 5, Duration::from_secs(30), Some(MIN10)))
        .collect();

    let _: () = inspect.run(redis::cmd("CONFIG").arg("RESETSTAT")).await;
    let (turns, trips) = (proxy.turns(), store.stats().round_trips);
    let claims = store.claim_all(&requests).await.unwrap();
    assert_eq!(
        proxy.turns() - turns,
        1,
        "claiming 64 keys took more than one round trip"
    );
    assert_eq!(store.stats().round_trips - trips, 1);
    assert_eq!(command_calls(&inspect, "set").await, 64);
    assert_eq!(command_calls(&inspect, "pttl").await, 0);
    let done: Vec<Claimed<'_>> = requests
        .iter()
        .zip(&claims)
        .map(|(r, c)| Claimed {
            request: r,
            token: token(c),
            result: None,
        })
        .collect();
    let turns = proxy.turns();
    store.complete_all(&done).await.unwrap();
    assert_eq!(
        proxy.turns() - turns,
        1,
        "completing 64 keys took more than one round trip"
    );
    assert_eq!(
        command_calls(&inspect, "evalsha").await,
        1,
        "one script call for the batch"
    );
    let again = store.claim_all(&requests).await.unwrap();
    assert!(again.iter().all(|c| *c == Claim::Done { cached: None }));

    // Through the runtime: 256 messages in batches of 64 (the broker hands
    // out as many as there are free permits) = 4 claims + 4 completions.
    let broker = MemoryBroker::new();
    for i in 0..256 {
        broker.publish("batch", order(&format!("rb-{i}"), 0));
    }
    let rt = Runtime::builder(broker.clone())
        .store(store.clone())
        .handlers(["redis-batch"])
        .concurrency(64)
        .build()
        .unwrap();
    let _: () = inspect.run(redis::cmd("CONFIG").arg("RESETSTAT")).await;
    let turns = proxy.turns();
    run_until_idle(&rt, &broker).await;
    assert_eq!(total(&BATCH, "rb-"), 256);
    assert_eq!(
        proxy.turns() - turns,
        8,
        "4 batches of 64: one claim and one completion each"
    );
    // Commands run by scripts count too: 256 `SET NX` claims + 256 `SET`s
    // of the completion script (after its `GET`), in 4 script calls.
    assert_eq!(command_calls(&inspect, "set").await, 512);
    assert_eq!(command_calls(&inspect, "get").await, 256);
    assert_eq!(command_calls(&inspect, "pttl").await, 0);
    assert_eq!(command_calls(&inspect, "evalsha").await, 4);
    assert_eq!(rt.stats_of("redis-batch").unwrap().processed, 256);
}

// --- the in-process cache tier answers hot duplicates without Redis ---------

#[tokio::test]
async fn the_cache_tier_answers_hot_duplicates_without_a_round_trip() {
    let prefix = rh::unique_prefix("cache");
    let store = shared_store(
        RedisStore::builder(&rh::shared_url())
            .prefix(&prefix)
            .local_cache(2, Duration::from_secs(60)),
    )
    .await;
    let inspect = Inspect::single(&rh::shared_url()).await;
    let k = Key::new("hot").unwrap();
    let req = request(&k, 4, SEC, Some(MIN10));
    let t = token(&claim_one(&store, &req).await);
    commit(&store, &req, t, Some("42")).await;
    let trips = store.stats().round_trips;
    for _ in 0..100 {
        assert_eq!(
            claim_one(&store, &req).await,
            Claim::Done {
                cached: Some("42".into())
            }
        );
    }
    assert_eq!(
        store.stats().round_trips,
        trips,
        "hot duplicates went to Redis"
    );
    assert_eq!(store.stats().cache_hits, 100);
    // Another payload with the key is a conflict, from the cache too.
    let other = request(&k, 5, SEC, Some(MIN10));
    assert_eq!(
        claim_one(&store, &other).await,
        Claim::Conflict {
            stored: Fingerprint::new(4)
        }
    );
    // Off by default.
    let plain = shared_store(RedisStore::builder(&rh::shared_url()).prefix(&prefix)).await;
    let trips = plain.stats().round_trips;
    claim_one(&plain, &req).await;
    assert_eq!(plain.stats().round_trips, trips + 1);
    assert_eq!(plain.stats().cache_hits, 0);
    inspect.cleanup(&prefix).await;
}

// --- Redis restarts in the middle of a run ----------------------------------

static RESTART: Effects = Mutex::new(None);
/// While set, handlers park after their effect until `GO` has permits: the
/// test kills Redis with every slot between effect and completion.
static HOLD: AtomicBool = AtomicBool::new(false);
static HOLDING: AtomicU32 = AtomicU32::new(0);
static GO: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(0);

#[idempotent(
    topic = "restart",
    key = "order_id",
    store = "redis",
    name = "redis-restart",
    ttl = "10m",
    lease = "5s",
    backoff = "1ms..5ms"
)]
async fn redis_restart(o: Order) -> Result<(), String> {
    record(&RESTART, &o.order_id);
    if HOLD.load(Ordering::SeqCst) {
        HOLDING.fetch_add(1, Ordering::SeqCst);
        GO.acquire().await.map_err(|e| e.to_string())?.forget();
    }
    Ok(())
}

#[tokio::test]
async fn a_redis_restart_mid_run_fails_closed_then_resumes_without_rerunning() {
    const N: u32 = 300;
    const CONCURRENCY: u32 = 8;
    let mut server = RedisServer::start(&[]).await;
    let store = RedisStore::builder(&server.url())
        .prefix("restart")
        .timeout(Duration::from_millis(300))
        .connect()
        .await
        .unwrap();
    let broker = MemoryBroker::new();
    for i in 0..N {
        broker.publish("restart", order(&format!("rs-{i}"), i));
    }
    let rt = Runtime::builder(broker.clone())
        .store(store.clone())
        .handlers(["redis-restart"])
        .concurrency(CONCURRENCY as usize)
        .outage_backoff(Backoff {
            min: Duration::from_millis(20),
            max: Duration::from_millis(200),
        })
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let drive = async {
        while total(&RESTART, "rs-") < 50 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        HOLD.store(true, Ordering::SeqCst);
        // Every slot holds a handler whose effect is applied and whose
        // done-record is not written yet: the worst moment for a crash.
        while HOLDING.load(Ordering::SeqCst) < CONCURRENCY {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        server.kill();
        let during = total(&RESTART, "rs-");
        HOLD.store(false, Ordering::SeqCst);
        GO.add_permits(CONCURRENCY as usize);
        // Their completions fail; they back off. Nothing runs while Redis is down.
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(
            total(&RESTART, "rs-"),
            during,
            "handlers ran while Redis was down (must fail closed)"
        );
        assert!(during < N, "the run finished before the kill");
        server.restart().await; // empty: no persistence
        tokio::time::timeout(Duration::from_secs(60), broker.wait_idle())
            .await
            .expect("the runtime did not resume after Redis came back");
        stop.cancel();
    };
    tokio::join!(rt.run(stop.clone()), drive);
    for i in 0..N {
        assert_eq!(count(&RESTART, &format!("rs-{i}")), 1, "rs-{i}");
    }
    // The parked messages were not run again: their remembered completions
    // were written when they came back, and they were acked as duplicates.
    let s = rt.stats_of("redis-restart").unwrap();
    assert_eq!(
        (s.processed, s.duplicate),
        (u64::from(N - CONCURRENCY), u64::from(CONCURRENCY))
    );
    let r = store.stats();
    assert_eq!(r.recovered, u64::from(CONCURRENCY), "{r:?}");
    assert_eq!((r.lost_leases, r.late_completions), (0, 0), "{r:?}");
}

// --- Redis down: fail closed by default, opt-in fallback ---------------------

static FALLBACK: Effects = Mutex::new(None);

#[idempotent(
    topic = "fallback",
    key = "order_id",
    store = "redis",
    name = "redis-fallback",
    ttl = "10m"
)]
async fn redis_fallback(o: Order) -> Result<(), String> {
    record(&FALLBACK, &o.order_id);
    Ok(())
}

#[tokio::test]
async fn redis_down_fails_closed_unless_the_fallback_is_chosen() {
    let mut server = RedisServer::start(&[]).await;
    let closed = RedisStore::builder(&server.url())
        .timeout(Duration::from_millis(300))
        .connect()
        .await
        .unwrap();
    let open = RedisStore::builder(&server.url())
        .timeout(Duration::from_millis(300))
        .on_unavailable(Fallback::RunWithoutDedup)
        .connect()
        .await
        .unwrap();
    server.kill();
    let k = Key::new("down-1").unwrap();
    let req = request(&k, 1, SEC, Some(MIN10));
    let err = closed
        .claim_all(std::slice::from_ref(&req))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");
    assert_eq!(
        open.claim_all(std::slice::from_ref(&req)).await.unwrap(),
        vec![Claim::New { token: 0 }]
    );
    commit(&open, &req, 0, None).await; // best effort, not an error
    assert_eq!(open.stats().fallback_claims, 1);

    // Through the runtime: fail closed runs nothing, the fallback runs it.
    let broker = MemoryBroker::new();
    broker.publish("fallback", order("fb-1", 0));
    let rt = Runtime::builder(broker.clone())
        .store(closed.clone())
        .handlers(["redis-fallback"])
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let wait = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop.cancel();
    };
    tokio::join!(rt.run(stop.clone()), wait);
    assert_eq!(count(&FALLBACK, "fb-1"), 0);
    assert!(!broker.is_idle(), "the message must stay unacked");
    let rt = Runtime::builder(broker.clone())
        .store(open.clone())
        .handlers(["redis-fallback"])
        .build()
        .unwrap();
    run_until_idle(&rt, &broker).await;
    assert_eq!(count(&FALLBACK, "fb-1"), 1);
}

// --- the password never shows ------------------------------------------------

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

/// Every log line of this test binary, from all threads: a global
/// subscriber (a thread-local one misses events whose callsite another
/// test's thread registered first).
fn captured_logs() -> Captured {
    static LOGS: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Captured::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only global subscriber");
        logs
    })
    .clone()
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_password_never_appears_in_logs_errors_or_debug() {
    const SECRET: &str = "s3cr3t-Pa55";
    let logs = captured_logs();

    let mut server = RedisServer::start(&["--requirepass", SECRET]).await;
    let port = server.port();
    let url = format!("redis://:{SECRET}@127.0.0.1:{}", server.port());
    let store = RedisStore::builder(&url)
        .timeout(Duration::from_millis(300))
        .connect()
        .await
        .expect("connect with the password");
    let k = Key::new("pw-1").unwrap();
    let req = request(&k, 1, SEC, Some(MIN10));
    token(&claim_one(&store, &req).await);
    let mut shown = vec![format!("{store:?}")];

    // The password percent-encoded works too, and does not show either.
    let encoded = format!(
        "redis://default:{}@127.0.0.1:{}",
        SECRET.replace('-', "%2D"),
        server.port()
    );
    let store2 = RedisStore::connect(&encoded)
        .await
        .expect("encoded password");
    shown.push(format!("{store2:?}"));
    // A wrong password, then an unreachable server.
    let bad = format!("redis://:wrong-{SECRET}@127.0.0.1:{}", server.port());
    let err = RedisStore::connect(&bad).await.expect_err("wrong password");
    shown.push(format!("{err} {err:?}"));
    server.kill();
    let err = store
        .claim_all(std::slice::from_ref(&req))
        .await
        .unwrap_err();
    shown.push(format!("{err} {err:?}"));
    let err = RedisStore::connect(&url).await.unwrap_err();
    shown.push(format!("{err} {err:?}"));

    // The runtime logs the store errors while it backs off.
    let broker = MemoryBroker::new();
    broker.publish("fallback", order("pw-2", 0));
    let rt = Runtime::builder(broker.clone())
        .store(store.clone())
        .handlers(["redis-fallback"])
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let read = || String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let wait = async {
        let deadline = Instant::now() + Duration::from_secs(20);
        let needle = format!("redis store unavailable: Redis at redis://:***@127.0.0.1:{port}");
        while !read().contains(&needle) {
            assert!(
                Instant::now() < deadline,
                "no store error was logged: {}",
                read()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.cancel();
    };
    tokio::join!(rt.run(stop.clone()), wait);
    shown.push(read());

    for text in &shown {
        assert!(!text.contains(SECRET), "password leaked: {text}");
        assert!(!text.contains("s3cr3t"), "password leaked: {text}");
    }
    assert!(shown[0].contains(":***@127.0.0.1"), "{}", shown[0]);
}

// --- everything again on a Redis Cluster of three masters ----------------------

#[tokio::test]
async fn the_store_works_on_a_redis_cluster() {
    let cluster = RedisCluster::start().await;
    let urls = cluster.urls();
    let inspect = Inspect::cluster(&urls).await;
    let builder = RedisStore::cluster_builder(&urls).prefix("c");
    let store = builder.clone().connect().await.expect("cluster store");

    duplicates_are_skipped(store.clone(), inspect.clone(), "c-dup").await;
    ttl_and_lease_are_set(store.clone(), inspect.clone()).await;
    late_completion_cannot_overwrite(builder.clone().prefix("c2"), inspect.clone()).await;
    // Every LeaseStore rule on the cluster (records spread over the slots).
    idem::testing::conformance::lease_store(|| store.clone()).await;

    // A batch spreads over the slots (one pipeline per slot) and nodes.
    let keys: Vec<Key> = (0..64)
        .map(|i| Key::new(format!("cb-{i}")).unwrap())
        .collect();
    let requests: Vec<ClaimRequest<'_>> = keys
        .iter()
        .map(|k| request(k, 5, Duration::from_secs(30), Some(MIN10)))
        .collect();
    let mut slots = BTreeSet::new();
    for k in &keys {
        let record_key = store.record_key("store-level", k.as_str());
        let slot: u16 = inspect
            .run(redis::cmd("CLUSTER").arg("KEYSLOT").arg(&record_key))
            .await;
        // The hash tag: the slot is that of `<handler>:<key>`, whatever the prefix.
        let tag: u16 = inspect
            .run(
                redis::cmd("CLUSTER")
                    .arg("KEYSLOT")
                    .arg(format!("store-level:{}", k.as_str())),
            )
            .await;
        assert_eq!(slot, tag, "{record_key}");
        slots.insert(slot);
    }
    let trips = store.stats().round_trips;
    let claims = store.claim_all(&requests).await.unwrap();
    assert_eq!(store.stats().round_trips - trips, slots.len() as u64);
    let done: Vec<Claimed<'_>> = requests
        .iter()
        .zip(&claims)
        .map(|(r, c)| Claimed {
            request: r,
            token: token(c),
            result: Some("1"),
        })
        .collect();
    store.complete_all(&done).await.unwrap();
    let again = store.claim_all(&requests).await.unwrap();
    assert!(
        again.iter().all(|c| *c
            == Claim::Done {
                cached: Some("1".into())
            }),
        "{again:?}"
    );
    let mut nodes_with_keys = 0;
    for node in &cluster.nodes {
        let n: u64 = Inspect::single(&node.url())
            .await
            .run(&redis::cmd("DBSIZE"))
            .await;
        nodes_with_keys += u32::from(n > 0);
    }
    assert_eq!(
        nodes_with_keys, 3,
        "the records should spread over all masters"
    );
}
