//! `store = "redis"`: leases and done-records in Redis (standalone or
//! Redis Cluster), for consumers spread over many processes.
//!
//! This is a lease store, like `store = "memory"` but shared: it cannot
//! commit together with the handler's own database, so it does not promise
//! what the SQL stores promise. It is for handlers whose effects are
//! naturally idempotent or cheap to repeat in a rare crash, and for scaling
//! out without a SQL database.
//!
//! # What it guarantees, plainly
//!
//! **Effectively once while leases hold.** A message's effect happens once
//! as long as (a) no consumer process dies between the handler's effect and
//! the done-record write, (b) every handler run finishes within `lease`, and
//! (c) Redis keeps its data. The SQL stores (`sqlite`, `postgres`) insert the
//! dedup row in the handler's own transaction, so record and effect commit or
//! vanish together: exactly once, with none of those conditions.
//!
//! Per message, the store does:
//! 1. **claim**: `SET <key> p|<token>|<fingerprint> NX GET PX <lease>`, one
//!    round trip: nothing there → run the handler; a done-record →
//!    duplicate, ack without running (the cached result is returned); another
//!    consumer's lease → `InProgress` (a `PTTL` asks how long it still runs:
//!    the one case with a second round trip; the message is nacked for that
//!    long); another payload fingerprint → conflict (dead letter).
//! 2. **complete** (after the handler succeeded, before the ack): a Lua
//!    compare-and-set replaces *our* lease with `d|<fingerprint>|<token>|<result>`
//!    and the `ttl` expiry.
//! 3. **release** (the handler failed): a Lua compare-and-delete removes *our*
//!    lease, so the retry runs at once.
//!
//! A batch (`ack = "batch"`) claims all its keys in one pipeline of `SET`s
//! and completes them with one script call (`EVALSHA` over all its keys, up
//! to 256 per call). On Redis Cluster a pipeline and a script call must stay
//! in one slot, so a batch becomes one pipeline per slot, sent concurrently.
//!
//! # Crash windows
//!
//! | what happens | result |
//! |---|---|
//! | consumer dies after the handler's effect, before the done-record | the lease expires after `lease`, the broker redelivers, **the handler runs again** (effect twice) |
//! | the done-record write fails (Redis blip, restart), the process lives on | the message is not acked; this process remembers the completion (up to 15 min) and writes it when the message comes back to it, before claiming again, so the handler does not run again. Handed to another consumer instead, the message waits for the lease to run out and **runs again** |
//! | a handler runs longer than `lease` | another consumer may claim the key and run it too (**effect twice**); the late completion does not overwrite the new owner's record, it is counted in [`RedisStore::lost_leases`] and logged as a warning |
//! | done-record written, ack lost / consumer dies before the ack | redelivery finds the record: acked as a duplicate, not run (safe) |
//! | handler fails, the release does not reach Redis | the lease expires after `lease` (or this process releases it first when the message comes back); the retry waits, it never runs concurrently |
//! | Redis loses records: restart without persistence, failover to a replica that had not received them (replication is asynchronous), eviction | messages redelivered after that run again. Run Redis with `appendonly yes` (`appendfsync everysec` can lose the last second) and `maxmemory-policy noeviction` |
//! | a redelivery after `ttl` | processed again (as with the SQL stores) |
//!
//! Leases and TTLs run on the Redis server's clock (`PX`), so consumers'
//! clocks need not agree.
//!
//! # Redis down
//!
//! By default the store **fails closed**: a claim that cannot reach Redis is
//! an error, so the runtime does not run the handler, does not ack, backs off
//! and resumes when Redis answers again. [`Fallback::RunWithoutDedup`] trades
//! that for availability: during the outage handlers run without dedup
//! (at-least-once: duplicates that arrive in the outage run again).
//!
//! # Cache tier
//!
//! Off by default. [`RedisStoreBuilder::local_cache`] keeps recent
//! done-records in a bounded in-process LRU, so a hot duplicate is answered
//! without a round trip (`examples/bench_redis.rs` measures it). Only
//! done-records are cached, never leases, each for at most `max_age`.
//!
//! # Secrets
//!
//! The password of the URL never appears in `Debug` output, errors or logs:
//! URLs are shown as `redis://user:***@host`, and driver errors have the
//! password cut out before they are wrapped.
//!
//! Needs Redis 7.0 or newer (or Valkey) for `SET … NX GET`.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Pipeline, RedisError, Script, ServerErrorKind, Value};

use super::{Claim, ClaimRequest, Claimed, LeaseStore, StoreError};

mod cache;
mod pending;
mod record;

use crate::redact::{Secrets, redact_url};
use cache::{CachedDone, DoneCache};
use pending::{PendingOp, PendingOps};
use record::Stored;

const STORE: &str = "redis";

/// Completes many keys in one call. For each key `KEYS[i]` with
/// `ARGV[3i-2..3i]` = (our lease value, done value, TTL in ms or `0`):
/// replaces our lease (or nothing: the lease ran out and nobody took the key)
/// with the done-record; a record already ours counts as done, so a retried
/// completion is harmless. Codes: 1 = done under our lease, 2 = our lease had
/// run out but the key was free, 0 = someone else owns the key.
const COMPLETE_LUA: &str = r"
local out = {}
for i = 1, #KEYS do
  local lease, done, ttl = ARGV[3 * i - 2], ARGV[3 * i - 1], ARGV[3 * i]
  local v = redis.call('GET', KEYS[i])
  if v == done then
    out[i] = 1
  elseif v and v ~= lease then
    out[i] = 0
  else
    if ttl == '0' then
      redis.call('SET', KEYS[i], done)
    else
      redis.call('SET', KEYS[i], done, 'PX', ttl)
    end
    out[i] = v and 1 or 2
  end
end
return out
";

/// Deletes many leases in one call, each only if it is still ours
/// (`ARGV[i]` = our lease value of `KEYS[i]`). Codes: 1 = deleted, 0 = not ours.
const RELEASE_LUA: &str = r"
local out = {}
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[i] then
    out[i] = redis.call('DEL', KEYS[i])
  else
    out[i] = 0
  end
end
return out
";

/// Keys per script call: bounds how long one call blocks Redis.
const SCRIPT_CHUNK: usize = 256;

/// How long this process remembers a completion that could not be written,
/// to write it when the message comes back instead of running it again.
const PENDING_COMPLETE_FOR: Duration = Duration::from_secs(15 * 60);
/// At most this many remembered operations; beyond, leases expire on their own.
const PENDING_MAX: usize = 65_536;

/// What the store does while Redis cannot be reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fallback {
    /// Fail closed (default): claims fail, the runtime does not run the
    /// handler, does not ack, backs off and resumes when Redis is back.
    #[default]
    FailClosed,
    /// Run handlers without dedup while Redis is down: **at-least-once**
    /// during the outage (a duplicate arriving then runs again). Done-records
    /// are written on a best-effort basis; failures to write them are logged,
    /// not returned.
    RunWithoutDedup,
}

/// The store's own counters, read with [`RedisStore::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RedisStats {
    /// Pipelines sent to Redis (one per claim, complete or release call;
    /// on a cluster, one per slot touched).
    pub round_trips: u64,
    /// Completions that found another consumer's lease or record: the
    /// handler ran while another consumer could run it too.
    pub lost_leases: u64,
    /// Completions whose lease had run out but whose key nobody had taken:
    /// the record was written; `lease` is shorter than the handler's run.
    pub late_completions: u64,
    /// Claims answered by the in-process cache tier, without Redis.
    pub cache_hits: u64,
    /// Claims the cache tier could not answer (0 when the tier is off).
    pub cache_misses: u64,
    /// Claims answered `New` without Redis under [`Fallback::RunWithoutDedup`].
    pub fallback_claims: u64,
    /// Remembered completions and releases written on a later claim.
    pub recovered: u64,
}

#[derive(Debug, Default)]
struct Counters {
    round_trips: AtomicU64,
    lost_leases: AtomicU64,
    late_completions: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    fallback_claims: AtomicU64,
    recovered: AtomicU64,
}

/// A Redis failure, with any password cut out of the driver's message.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RedisStoreError {
    message: String,
    timed_out: bool,
}

impl RedisStoreError {
    /// Whether Redis did not answer within the store's timeout.
    pub fn is_timeout(&self) -> bool {
        self.timed_out
    }
}

/// Where the store connects.
#[derive(Clone)]
enum Target {
    Single(String),
    Cluster(Vec<String>),
}

/// Builds a [`RedisStore`]; see [`RedisStore::builder`].
///
/// ```
/// use std::time::Duration;
/// use idem_runtime::store::redis::{Fallback, RedisStore};
/// let builder = RedisStore::builder("redis://:s3cret@127.0.0.1:6379/0")
///     .prefix("orders-svc")
///     .timeout(Duration::from_millis(500))
///     .local_cache(10_000, Duration::from_secs(60))
///     .on_unavailable(Fallback::FailClosed);
/// // Debug output never shows the password.
/// assert!(!format!("{builder:?}").contains("s3cret"));
/// ```
#[derive(Clone)]
pub struct RedisStoreBuilder {
    target: Target,
    prefix: String,
    timeout: Duration,
    cache: Option<(usize, Duration)>,
    fallback: Fallback,
}

impl fmt::Debug for RedisStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreBuilder")
            .field("target", &display_target(&self.target))
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("cache", &self.cache)
            .field("fallback", &self.fallback)
            .finish()
    }
}

fn display_target(t: &Target) -> String {
    match t {
        Target::Single(url) => redact_url(url),
        Target::Cluster(nodes) => {
            let nodes: Vec<String> = nodes.iter().map(|u| redact_url(u)).collect();
            format!("cluster [{}]", nodes.join(", "))
        }
    }
}

impl RedisStoreBuilder {
    /// Namespace of the keys (default `"idem"`): records are
    /// `<prefix>:{<handler>:<key>}`. Must not contain `{` or `}` (the hash
    /// tag is idem's). Give each application or environment its own prefix
    /// when they share a Redis.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long one Redis operation may take, reconnect included
    /// (default 2 s); after it the operation fails as "unavailable".
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Turns on the in-process cache tier: up to `capacity` done-records
    /// kept for at most `max_age` (and never past their TTL), so hot
    /// duplicates are answered without a round trip. Off by default. A
    /// record deleted in Redis (to force a replay) is still honoured by the
    /// processes that cached it, for up to `max_age`.
    pub fn local_cache(mut self, capacity: usize, max_age: Duration) -> Self {
        self.cache = (capacity > 0 && !max_age.is_zero()).then_some((capacity, max_age));
        self
    }

    /// What to do while Redis is unreachable (default [`Fallback::FailClosed`]).
    pub fn on_unavailable(mut self, fallback: Fallback) -> Self {
        self.fallback = fallback;
        self
    }

    /// Connects, loads the Lua scripts and checks that the server supports
    /// `SET … NX GET` (Redis ≥ 7.0).
    pub async fn connect(self) -> Result<RedisStore, StoreError> {
        let secrets = match &self.target {
            Target::Single(url) => Secrets::of([url.as_str()]),
            Target::Cluster(nodes) => Secrets::of(nodes.iter().map(String::as_str)),
        };
        let shown = display_target(&self.target);
        let config = |message: String| StoreError::Config {
            store: STORE,
            message,
        };
        if self.prefix.is_empty() || self.prefix.contains(['{', '}']) {
            return Err(config(format!(
                "key prefix {:?} is not usable: it must be non-empty and contain no `{{` or `}}` (idem puts the hash tag after it); pass another to `.prefix(…)`",
                self.prefix
            )));
        }
        if self.timeout.is_zero() {
            return Err(config(
                "timeout is zero: every operation would fail; pass a positive duration to `.timeout(…)`".into(),
            ));
        }
        let bad_url = |e: RedisError| {
            config(format!(
                "bad Redis URL {shown}: {}; expected redis://[user:password@]host[:port][/db]",
                secrets.scrub(&e.to_string())
            ))
        };
        let unreachable = |e: String| {
            StoreError::unavailable(
                STORE,
                RedisStoreError {
                    message: format!("cannot connect to Redis at {shown}: {e}"),
                    timed_out: false,
                },
            )
        };
        let t = self.timeout;
        let connecting = async {
            match &self.target {
                Target::Single(url) => {
                    let client = ::redis::Client::open(url.as_str()).map_err(bad_url)?;
                    let cfg = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(t))
                        .set_response_timeout(Some(t))
                        .set_number_of_retries(1)
                        .set_min_delay(Duration::from_millis(20))
                        .set_max_delay(Duration::from_millis(500));
                    ConnectionManager::new_with_config(client, cfg)
                        .await
                        .map(Conn::Single)
                        .map_err(|e| unreachable(secrets.scrub(&e.to_string())))
                }
                Target::Cluster(nodes) => {
                    let client =
                        ::redis::cluster::ClusterClient::builder(nodes.iter().map(String::as_str))
                            .connection_timeout(t)
                            .response_timeout(t)
                            .retries(2)
                            .build()
                            .map_err(bad_url)?;
                    client
                        .get_async_connection()
                        .await
                        .map(|c| Conn::Cluster(Box::new(c)))
                        .map_err(|e| unreachable(secrets.scrub(&e.to_string())))
                }
            }
        };
        let conn = match tokio::time::timeout(t.saturating_mul(3), connecting).await {
            Ok(c) => c?,
            Err(_) => return Err(unreachable(format!("no answer within {:?}", t * 3))),
        };
        let store = RedisStore {
            inner: Arc::new(Inner {
                conn,
                prefix: self.prefix,
                shown,
                secrets,
                timeout: self.timeout,
                fallback: self.fallback,
                cache: self.cache.map(|(n, age)| DoneCache::new(n, age)),
                pending: PendingOps::new(PENDING_MAX),
                complete: Script::new(COMPLETE_LUA),
                release: Script::new(RELEASE_LUA),
                counters: Counters::default(),
            }),
        };
        store.check_server().await?;
        Ok(store)
    }
}

/// The connection: one server through a reconnecting manager, or a cluster.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(Box<ClusterConnection>),
}

impl Conn {
    async fn query(&self, pipe: &Pipeline) -> Result<Vec<Value>, RedisError> {
        match self {
            Conn::Single(c) => pipe.query_async(&mut c.clone()).await,
            Conn::Cluster(c) => pipe.query_async(&mut (**c).clone()).await,
        }
    }
}

struct Inner {
    conn: Conn,
    prefix: String,
    /// The target with passwords redacted.
    shown: String,
    secrets: Secrets,
    timeout: Duration,
    fallback: Fallback,
    cache: Option<DoneCache>,
    pending: PendingOps,
    complete: Script,
    release: Script,
    counters: Counters,
}

/// The Redis dedup store. Cheap to clone (clones share the connection,
/// cache and counters), so a test or a health endpoint can keep one.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use idem_runtime::store::redis::RedisStore;
/// let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
/// let store = RedisStore::builder(&url).prefix("orders-svc").connect().await?;
/// // runtime builder: `.store(store.clone())`; later:
/// println!("lost leases so far: {}", store.lost_leases());
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        f.debug_struct("RedisStore")
            .field("target", &i.shown)
            .field("prefix", &i.prefix)
            .field("timeout", &i.timeout)
            .field("fallback", &i.fallback)
            .field("cache", &i.cache)
            .field("stats", &self.stats())
            .finish()
    }
}

/// The record keys of one call, in one buffer.
struct Keys {
    buf: String,
    ends: Vec<usize>,
}

impl Keys {
    fn of<'r>(prefix: &str, requests: impl ExactSizeIterator<Item = &'r ClaimRequest<'r>>) -> Self {
        let mut keys = Keys {
            buf: String::new(),
            ends: Vec::with_capacity(requests.len()),
        };
        for r in requests {
            record::push_key(&mut keys.buf, prefix, r.handler, r.key.as_str());
            keys.ends.push(keys.buf.len());
        }
        keys
    }

    fn get(&self, i: usize) -> &str {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.buf[start..self.ends[i]]
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn fresh_token() -> u64 {
    // Random, not a counter: tokens must differ across processes. 0 is the
    // "no lease" token of fallback runs.
    fastrand::u64(1..)
}

/// A failed pipeline: the Redis error or our timeout.
enum ExecError {
    Redis(RedisError),
    Timeout,
}

impl RedisStore {
    /// Connects to one Redis server with the defaults (prefix `idem`,
    /// 2 s timeout, no cache tier, fail closed).
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idem_runtime::StoreError> {
    /// let store = idem_runtime::store::redis::RedisStore::connect("redis://127.0.0.1:6379").await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect(url: &str) -> Result<RedisStore, StoreError> {
        Self::builder(url).connect().await
    }

    /// A builder for one Redis server at `url`
    /// (`redis://[user:password@]host[:port][/db]`).
    pub fn builder(url: &str) -> RedisStoreBuilder {
        Self::with_target(Target::Single(url.to_owned()))
    }

    /// A builder for a Redis Cluster reached through any of `nodes`
    /// (`redis://host:port` each).
    ///
    /// ```no_run
    /// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), idem_runtime::StoreError> {
    /// use idem_runtime::store::redis::RedisStore;
    /// let store = RedisStore::cluster_builder(["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"])
    ///     .connect()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn cluster_builder<I, S>(nodes: I) -> RedisStoreBuilder
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::with_target(Target::Cluster(
            nodes.into_iter().map(|s| s.as_ref().to_owned()).collect(),
        ))
    }

    fn with_target(target: Target) -> RedisStoreBuilder {
        RedisStoreBuilder {
            target,
            prefix: "idem".into(),
            timeout: Duration::from_secs(2),
            cache: None,
            fallback: Fallback::FailClosed,
        }
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The Redis key of a handler's record for `key`:
    /// `<prefix>:{<handler>:<key>}` (`:` and `\` in the handler escaped).
    pub fn record_key(&self, handler: &str, key: &str) -> String {
        let mut out = String::new();
        record::push_key(&mut out, &self.inner.prefix, handler, key);
        out
    }

    /// Completions that found another consumer owning the key: each one is
    /// a message whose handler may have run twice (see the module docs).
    pub fn lost_leases(&self) -> u64 {
        self.inner.counters.lost_leases.load(Ordering::Relaxed)
    }

    /// The store's counters.
    pub fn stats(&self) -> RedisStats {
        let c = &self.inner.counters;
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RedisStats {
            round_trips: r(&c.round_trips),
            lost_leases: r(&c.lost_leases),
            late_completions: r(&c.late_completions),
            cache_hits: r(&c.cache_hits),
            cache_misses: r(&c.cache_misses),
            fallback_claims: r(&c.fallback_claims),
            recovered: r(&c.recovered),
        }
    }

    fn unavailable(&self, e: ExecError) -> StoreError {
        let (message, timed_out) = match e {
            ExecError::Redis(e) => (self.inner.secrets.scrub(&e.to_string()), false),
            ExecError::Timeout => (format!("no answer within {:?}", self.inner.timeout), true),
        };
        StoreError::unavailable(
            STORE,
            RedisStoreError {
                message: format!("Redis at {}: {message}", self.inner.shown),
                timed_out,
            },
        )
    }

    /// A per-command error Redis returned inside a pipeline.
    fn command_error(&self, key: &str, e: &::redis::ServerError) -> StoreError {
        let text = self.inner.secrets.scrub(&e.to_string());
        match e.code() {
            "WRONGTYPE" => StoreError::Config {
                store: STORE,
                message: format!(
                    "key {key} holds a value idem did not write ({text}): another application uses the prefix {:?}; give idem its own with `.prefix(…)`",
                    self.inner.prefix
                ),
            },
            "NOPERM" => StoreError::Config {
                store: STORE,
                message: format!(
                    "the Redis user may not run idem's commands ({text}): allow SET, PTTL, EVAL, EVALSHA and SCRIPT LOAD on keys `{}:*`",
                    self.inner.prefix
                ),
            },
            _ => StoreError::unavailable(
                STORE,
                RedisStoreError {
                    message: format!("Redis at {} failed on {key}: {text}", self.inner.shown),
                    timed_out: false,
                },
            ),
        }
    }

    async fn query(&self, pipe: &Pipeline) -> Result<Vec<Value>, ExecError> {
        self.inner
            .counters
            .round_trips
            .fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(self.inner.timeout, self.inner.conn.query(pipe)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(ExecError::Redis(e)),
            Err(_) => Err(ExecError::Timeout),
        }
    }

    /// Runs the commands of `items` (indices into `keys`; `build` appends an
    /// item's commands and returns how many) and returns the replies in
    /// item order. One pipeline, or on a cluster one per slot, concurrently.
    async fn exec(
        &self,
        keys: &Keys,
        items: &[usize],
        mut build: impl FnMut(usize, usize, &mut Pipeline) -> usize,
    ) -> Result<Vec<Value>, ExecError> {
        let mismatch = || {
            ExecError::Redis(RedisError::from((
                ::redis::ErrorKind::UnexpectedReturnType,
                "pipeline answered with the wrong number of replies",
            )))
        };
        if let Conn::Single(_) = self.inner.conn {
            let mut pipe = Pipeline::with_capacity(items.len() * 2);
            pipe.ignore_errors();
            let mut total = 0;
            for (pos, &i) in items.iter().enumerate() {
                total += build(pos, i, &mut pipe);
            }
            let values = self.query(&pipe).await?;
            return if values.len() == total {
                Ok(values)
            } else {
                Err(mismatch())
            };
        }
        // Cluster: a pipeline may only touch one slot.
        let mut by_slot: HashMap<u16, usize> = HashMap::new();
        let mut groups: Vec<(Pipeline, Vec<(usize, usize)>)> = Vec::new();
        let mut offsets = Vec::with_capacity(items.len());
        let mut total = 0;
        for (pos, &i) in items.iter().enumerate() {
            let slot = record::slot(keys.get(i).as_bytes());
            let g = *by_slot.entry(slot).or_insert_with(|| {
                let mut pipe = Pipeline::new();
                pipe.ignore_errors();
                groups.push((pipe, Vec::new()));
                groups.len() - 1
            });
            let (pipe, members) = &mut groups[g];
            let count = build(pos, i, pipe);
            members.push((total, count));
            offsets.push(total);
            total += count;
        }
        let replies =
            futures_util::future::join_all(groups.iter().map(|(pipe, _)| self.query(pipe))).await;
        let mut out = vec![Value::Nil; total];
        for ((_, members), reply) in groups.iter().zip(replies) {
            let values = reply?;
            if values.len() != members.iter().map(|m| m.1).sum::<usize>() {
                return Err(mismatch());
            }
            let mut values = values.into_iter();
            for &(offset, count) in members {
                for slot in &mut out[offset..offset + count] {
                    *slot = values.next().ok_or_else(mismatch)?;
                }
            }
        }
        Ok(out)
    }

    /// Runs one of the multi-key scripts over `items`: one call per chunk
    /// of keys (per slot on a cluster), all calls in one pipeline (one per
    /// slot on a cluster). `args` appends an item's `ARGV` entries. Returns
    /// one reply per item: its code, or the error of its call. If the server
    /// lost its script cache (restart, failover, `SCRIPT FLUSH`), the scripts
    /// are loaded and the calls sent once more, which is safe because both
    /// scripts are idempotent.
    async fn run_script(
        &self,
        script: &Script,
        keys: &Keys,
        items: &[usize],
        mut args: impl FnMut(usize, &mut Pipeline),
    ) -> Result<Vec<Value>, ExecError> {
        let mut chunks: Vec<Vec<usize>> = Vec::new();
        match self.inner.conn {
            Conn::Single(_) => chunks.extend(items.chunks(SCRIPT_CHUNK).map(<[usize]>::to_vec)),
            Conn::Cluster(_) => {
                let mut by_slot: HashMap<u16, Vec<usize>> = HashMap::new();
                for &i in items {
                    by_slot
                        .entry(record::slot(keys.get(i).as_bytes()))
                        .or_default()
                        .push(i);
                }
                for group in by_slot.into_values() {
                    chunks.extend(group.chunks(SCRIPT_CHUNK).map(<[usize]>::to_vec));
                }
            }
        }
        // `exec` groups by the slot of each chunk's first key.
        let firsts: Vec<usize> = chunks.iter().map(|c| c[0]).collect();
        let hash = script.get_hash();
        let mut build = |pos: usize, _: usize, pipe: &mut Pipeline| {
            let chunk = &chunks[pos];
            pipe.cmd("EVALSHA").arg(hash).arg(chunk.len());
            for &i in chunk {
                pipe.arg(keys.get(i));
            }
            for &i in chunk {
                args(i, pipe);
            }
            1
        };
        let mut replies = self.exec(keys, &firsts, &mut build).await?;
        let noscript = replies.iter().any(
            |v| matches!(v, Value::ServerError(e) if e.kind() == Some(ServerErrorKind::NoScript)),
        );
        if noscript {
            self.load_scripts().await?;
            replies = self.exec(keys, &firsts, &mut build).await?;
        }
        let mut out = vec![Value::Nil; keys.ends.len()];
        for (chunk, reply) in chunks.iter().zip(replies) {
            match reply {
                Value::Array(codes) if codes.len() == chunk.len() => {
                    for (&i, code) in chunk.iter().zip(codes) {
                        out[i] = code;
                    }
                }
                other => {
                    for &i in chunk {
                        out[i] = other.clone();
                    }
                }
            }
        }
        Ok(out)
    }

    async fn load_scripts(&self) -> Result<(), ExecError> {
        let mut pipe = Pipeline::new();
        pipe.cmd("SCRIPT").arg("LOAD").arg(COMPLETE_LUA);
        pipe.cmd("SCRIPT").arg("LOAD").arg(RELEASE_LUA);
        match &self.inner.conn {
            Conn::Single(_) => {
                self.query(&pipe).await?;
            }
            // `SCRIPT LOAD` goes to every primary on a cluster; send it alone.
            Conn::Cluster(c) => {
                for src in [COMPLETE_LUA, RELEASE_LUA] {
                    let load = ::redis::cmd("SCRIPT").arg("LOAD").arg(src).clone();
                    let mut c = (**c).clone();
                    match tokio::time::timeout(
                        self.inner.timeout,
                        load.query_async::<Value>(&mut c),
                    )
                    .await
                    {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(ExecError::Redis(e)),
                        Err(_) => return Err(ExecError::Timeout),
                    }
                }
            }
        }
        Ok(())
    }

    /// At connect: load the scripts and make sure `SET … NX GET` works.
    async fn check_server(&self) -> Result<(), StoreError> {
        self.load_scripts().await.map_err(|e| self.unavailable(e))?;
        let probe = format!("{}:{{idem-probe}}", self.inner.prefix);
        let keys = Keys {
            ends: vec![probe.len()],
            buf: probe,
        };
        let values = self
            .exec(&keys, &[0], |_, i, pipe| {
                pipe.cmd("SET")
                    .arg(keys.get(i))
                    .arg("1")
                    .arg("NX")
                    .arg("GET")
                    .arg("PX")
                    .arg(1);
                1
            })
            .await
            .map_err(|e| self.unavailable(e))?;
        match values.first() {
            Some(Value::ServerError(e)) if e.code() == "ERR" => Err(StoreError::Config {
                store: STORE,
                message: format!(
                    "Redis at {} rejects `SET … NX GET` ({}): the redis store needs Redis 7.0 or newer (or Valkey)",
                    self.inner.shown,
                    self.inner.secrets.scrub(&e.to_string())
                ),
            }),
            Some(Value::ServerError(e)) => Err(self.command_error(keys.get(0), e)),
            _ => Ok(()),
        }
    }

    fn remember(&self, key: &str, op: PendingOp, until: Instant) {
        if !self.inner.pending.remember(key, op, until, Instant::now()) {
            tracing::warn!(
                key,
                "too many Redis operations waiting for Redis to come back; this one is dropped, its lease expires on its own"
            );
        }
    }

    /// Takes the remembered operations of these keys (none, cheaply, when
    /// nothing is remembered).
    fn take_pending(&self, keys: &Keys, items: &[usize]) -> Option<Vec<Option<PendingOp>>> {
        self.inner
            .pending
            .take(items.iter().map(|&i| keys.get(i)), Instant::now())
    }

    async fn claim_keys(&self, requests: &[ClaimRequest<'_>]) -> Result<Vec<Claim>, StoreError> {
        let n = requests.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let keys = Keys::of(&self.inner.prefix, requests.iter());
        let now = Instant::now();
        let mut claims: Vec<Option<Claim>> = vec![None; n];
        let mut misses = Vec::with_capacity(n);
        match &self.inner.cache {
            None => misses.extend(0..n),
            Some(cache) => {
                for (i, r) in requests.iter().enumerate() {
                    match cache.get(keys.get(i), now) {
                        Some(d) => {
                            claims[i] = Some(
                                r.conflict_with(d.fingerprint)
                                    .unwrap_or(Claim::Done { cached: d.result }),
                            );
                        }
                        None => misses.push(i),
                    }
                }
                let c = &self.inner.counters;
                c.cache_hits
                    .fetch_add((n - misses.len()) as u64, Ordering::Relaxed);
                c.cache_misses
                    .fetch_add(misses.len() as u64, Ordering::Relaxed);
            }
        }
        if misses.is_empty() {
            return Ok(claims.into_iter().flatten().collect());
        }
        let mut pending = self.take_pending(&keys, &misses);
        let tokens: Vec<u64> = misses.iter().map(|_| fresh_token()).collect();
        // The cache tier needs a done-record's remaining TTL; without it the
        // claim is the `SET` alone, and only an `InProgress` answer costs a
        // second round trip (for the lease's remaining time).
        let with_pttl = self.inner.cache.is_some();
        let replies = self
            .exec(&keys, &misses, |pos, i, pipe| {
                let key = keys.get(i);
                let mut count = 1 + usize::from(with_pttl);
                if let Some(op) = pending.as_ref().and_then(|p| p[pos].as_ref()) {
                    add_pending_op(pipe, key, op);
                    count += 1;
                }
                let r = &requests[i];
                let lease = record::lease_value(tokens[pos], r.fingerprint);
                pipe.cmd("SET")
                    .arg(key)
                    .arg(&lease[..])
                    .arg("NX")
                    .arg("GET")
                    .arg("PX")
                    .arg(millis(r.lease));
                if with_pttl {
                    pipe.cmd("PTTL").arg(key);
                }
                count
            })
            .await;
        let values = match replies {
            Ok(v) => v,
            Err(e) => {
                self.claim_failed(requests, &keys, &misses, &tokens, pending.take());
                let err = self.unavailable(e);
                return self.fall_back(err, claims, &misses);
            }
        };
        let mut values = values.into_iter();
        let mut failure = None;
        let mut busy = Vec::new();
        for (pos, &i) in misses.iter().enumerate() {
            let r = &requests[i];
            let key = keys.get(i);
            let op = pending.as_mut().and_then(|p| p[pos].take());
            if let Some(op) = op {
                let reply = values.next().unwrap_or_default();
                self.pending_done(key, op, reply);
            }
            let set = values.next().unwrap_or_default();
            let remaining = match with_pttl.then(|| values.next()).flatten() {
                Some(Value::Int(ms)) if ms >= 0 => Some(Duration::from_millis(ms as u64)),
                _ => None,
            };
            let claim = match &set {
                Value::Nil => Claim::New { token: tokens[pos] },
                Value::BulkString(v) => {
                    match record::parse(v) {
                        Some(
                            Stored::Lease { fingerprint, .. } | Stored::Done { fingerprint, .. },
                        ) if r.conflict_with(fingerprint).is_some() => Claim::Conflict {
                            stored: fingerprint.expect("a conflict has a stored fingerprint"),
                        },
                        Some(Stored::Lease { .. }) => {
                            if remaining.is_none() {
                                busy.push(i);
                            }
                            Claim::InProgress {
                                retry_after: remaining.unwrap_or(r.lease),
                            }
                        }
                        Some(Stored::Done {
                            fingerprint,
                            result,
                            ..
                        }) => {
                            let cached = result.map(str::to_owned);
                            if let Some(cache) = &self.inner.cache {
                                let done = CachedDone {
                                    fingerprint,
                                    result: cached.clone(),
                                };
                                cache.insert(key, done, remaining, now);
                            }
                            Claim::Done { cached }
                        }
                        None => {
                            failure.get_or_insert(StoreError::Config {
                            store: STORE,
                            message: format!(
                                "key {key} holds a value idem did not write: another application uses the prefix {:?}; give idem its own with `.prefix(…)`",
                                self.inner.prefix
                            ),
                        });
                            continue;
                        }
                    }
                }
                Value::ServerError(e) => {
                    failure.get_or_insert_with(|| self.command_error(key, e));
                    continue;
                }
                other => {
                    failure.get_or_insert_with(|| StoreError::Config {
                        store: STORE,
                        message: format!(
                            "unexpected reply to SET on {key}: {other:?}; is this a Redis-compatible server ≥ 7.0?"
                        ),
                    });
                    continue;
                }
            };
            claims[i] = Some(claim);
        }
        if let Some(err) = failure {
            // Leases this call did take are released on the next claim.
            self.claim_failed(requests, &keys, &misses, &tokens, None);
            return match err {
                StoreError::Unavailable { .. } => self.fall_back(err, claims, &misses),
                other => Err(other),
            };
        }
        if !busy.is_empty() {
            self.lease_remaining(requests, &keys, &busy, &mut claims)
                .await;
        }
        Ok(claims.into_iter().flatten().collect())
    }

    /// Asks how long the leases found on `busy` keys still run, so an
    /// `InProgress` retries when the holder's lease ends, not a full `lease`
    /// later. If Redis does not answer, the full lease (an upper bound) stays.
    async fn lease_remaining(
        &self,
        requests: &[ClaimRequest<'_>],
        keys: &Keys,
        busy: &[usize],
        claims: &mut [Option<Claim>],
    ) {
        let Ok(values) = self
            .exec(keys, busy, |_, i, pipe| {
                pipe.cmd("GET").arg(keys.get(i));
                pipe.cmd("PTTL").arg(keys.get(i));
                2
            })
            .await
        else {
            return;
        };
        let mut values = values.into_iter();
        for &i in busy {
            let (value, pttl) = (values.next(), values.next());
            let Some(Claim::InProgress { retry_after }) = &mut claims[i] else {
                continue;
            };
            let still_a_lease = matches!(
                &value,
                Some(Value::BulkString(v)) if matches!(record::parse(v), Some(Stored::Lease { .. }))
            );
            *retry_after = match pttl {
                // The PTTL of a done-record (the holder finished meanwhile)
                // or of nothing says "retry now".
                Some(Value::Int(ms)) if still_a_lease && ms > 0 => {
                    Duration::from_millis(ms as u64).min(requests[i].lease)
                }
                _ => Duration::from_millis(1),
            };
        }
    }

    /// Outcome of a remembered operation sent ahead of a claim.
    fn pending_done(&self, key: &str, op: PendingOp, reply: Value) {
        let reply = match reply {
            Value::Array(mut codes) if codes.len() == 1 => codes.remove(0),
            other => other,
        };
        match (reply, &op) {
            (Value::Int(code), PendingOp::Complete { .. }) => {
                self.inner
                    .counters
                    .recovered
                    .fetch_add(1, Ordering::Relaxed);
                // 2 (the key was free) is expected here: the lease ran out
                // or Redis lost it meanwhile; only another owner matters.
                if code == 0 {
                    self.count_completion(key, code);
                }
            }
            (Value::Int(_), PendingOp::Release { .. }) => {
                self.inner
                    .counters
                    .recovered
                    .fetch_add(1, Ordering::Relaxed);
            }
            (reply, _) => {
                tracing::warn!(key, reply = ?reply, "remembered Redis operation failed again; keeping it for the next claim");
                let until = Instant::now() + PENDING_COMPLETE_FOR;
                self.remember(key, op, until);
            }
        }
    }

    /// After a failed claim: our `SET`s may have run, so release those leases
    /// on the next claim; put back the remembered operations not done.
    fn claim_failed(
        &self,
        requests: &[ClaimRequest<'_>],
        keys: &Keys,
        misses: &[usize],
        tokens: &[u64],
        mut pending: Option<Vec<Option<PendingOp>>>,
    ) {
        for (pos, &i) in misses.iter().enumerate() {
            let key = keys.get(i);
            let r = &requests[i];
            let op = match pending.as_mut().and_then(|p| p[pos].take()) {
                // A completion still owed wins: it also settles the key.
                Some(op @ PendingOp::Complete { .. }) => op,
                _ => PendingOp::Release {
                    lease: record::lease_value(tokens[pos], r.fingerprint),
                },
            };
            let until = match op {
                PendingOp::Complete { .. } => Instant::now() + PENDING_COMPLETE_FOR,
                PendingOp::Release { .. } => Instant::now() + r.lease,
            };
            self.remember(key, op, until);
        }
    }

    fn fall_back(
        &self,
        err: StoreError,
        mut claims: Vec<Option<Claim>>,
        misses: &[usize],
    ) -> Result<Vec<Claim>, StoreError> {
        match self.inner.fallback {
            Fallback::FailClosed => Err(err),
            Fallback::RunWithoutDedup => {
                tracing::warn!(error = %err, "Redis unavailable: running handlers without dedup (Fallback::RunWithoutDedup): at-least-once until Redis answers again");
                for &i in misses {
                    claims[i] = Some(Claim::New { token: 0 });
                }
                self.inner
                    .counters
                    .fallback_claims
                    .fetch_add(misses.len() as u64, Ordering::Relaxed);
                Ok(claims.into_iter().flatten().collect())
            }
        }
    }

    fn count_completion(&self, key: &str, code: i64) {
        let c = &self.inner.counters;
        match code {
            1 => {}
            2 => {
                c.late_completions.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    key,
                    "lease ran out before the handler finished; no other consumer had taken the key, so the done-record was written; raise `lease` above the handler's longest run"
                );
            }
            _ => {
                c.lost_leases.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    key,
                    "lease lost before completion: another consumer took the key after this one's lease ran out, so the effect may have been applied twice; its record was left as is; raise `lease` above the handler's longest run"
                );
            }
        }
    }

    async fn complete_keys(&self, done: &[Claimed<'_>]) -> Result<(), StoreError> {
        if done.is_empty() {
            return Ok(());
        }
        let keys = Keys::of(&self.inner.prefix, done.iter().map(|c| c.request));
        let items: Vec<usize> = (0..done.len()).collect();
        let mut value = Vec::new();
        let replies = self
            .run_script(&self.inner.complete, &keys, &items, |i, pipe| {
                let c = &done[i];
                let r = c.request;
                value.clear();
                record::push_done_value(&mut value, r.fingerprint, c.token, c.result);
                let lease = record::lease_value(c.token, r.fingerprint);
                let lease: &[u8] = if c.token == 0 { b"" } else { &lease[..] };
                pipe.arg(lease).arg(&value[..]).arg(r.ttl.map_or(0, millis));
            })
            .await;
        let remember = |i: usize| {
            let c = &done[i];
            let r = c.request;
            let mut value = Vec::new();
            record::push_done_value(&mut value, r.fingerprint, c.token, c.result);
            let op = PendingOp::Complete {
                lease: if c.token == 0 {
                    Vec::new()
                } else {
                    record::lease_value(c.token, r.fingerprint).to_vec()
                },
                done: value,
                ttl_ms: r.ttl.map_or(0, millis),
            };
            let until = Instant::now() + PENDING_COMPLETE_FOR;
            self.remember(keys.get(i), op, until);
        };
        let values = match replies {
            Ok(v) => v,
            Err(e) => {
                items.iter().for_each(|&i| remember(i));
                return self.settle_failure(self.unavailable(e), "done-records");
            }
        };
        let now = Instant::now();
        let mut failure = None;
        for (i, reply) in values.into_iter().enumerate() {
            let key = keys.get(i);
            match reply {
                Value::Int(code) => {
                    self.count_completion(key, code);
                    if let (Some(cache), 1 | 2) = (&self.inner.cache, code) {
                        let c = &done[i];
                        let entry = CachedDone {
                            fingerprint: c.request.fingerprint,
                            result: c.result.map(str::to_owned),
                        };
                        cache.insert(key, entry, c.request.ttl, now);
                    }
                }
                Value::ServerError(e) => {
                    remember(i);
                    failure.get_or_insert_with(|| self.command_error(key, &e));
                }
                other => {
                    remember(i);
                    failure.get_or_insert_with(|| StoreError::Config {
                        store: STORE,
                        message: format!("unexpected reply to the completion of {key}: {other:?}"),
                    });
                }
            }
        }
        match failure {
            None => Ok(()),
            Some(e @ StoreError::Unavailable { .. }) => self.settle_failure(e, "done-records"),
            Some(e) => Err(e),
        }
    }

    /// Fail closed, or under the fallback log and carry on.
    fn settle_failure(&self, err: StoreError, what: &str) -> Result<(), StoreError> {
        match self.inner.fallback {
            Fallback::FailClosed => Err(err),
            Fallback::RunWithoutDedup => {
                tracing::warn!(error = %err, "Redis unavailable: {what} not written (Fallback::RunWithoutDedup); this process writes them when the messages come back");
                Ok(())
            }
        }
    }

    async fn release_keys(&self, claimed: &[Claimed<'_>]) -> Result<(), StoreError> {
        let held: Vec<usize> = (0..claimed.len())
            .filter(|&i| claimed[i].token != 0)
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        let keys = Keys::of(&self.inner.prefix, claimed.iter().map(|c| c.request));
        let replies = self
            .run_script(&self.inner.release, &keys, &held, |i, pipe| {
                let c = &claimed[i];
                let lease = record::lease_value(c.token, c.request.fingerprint);
                pipe.arg(&lease[..]);
            })
            .await;
        let remember = |i: usize| {
            let c = &claimed[i];
            let op = PendingOp::Release {
                lease: record::lease_value(c.token, c.request.fingerprint),
            };
            let until = Instant::now() + c.request.lease;
            self.remember(keys.get(i), op, until);
        };
        let values = match replies {
            Ok(v) => v,
            Err(e) => {
                held.iter().for_each(|&i| remember(i));
                return self.settle_failure(self.unavailable(e), "lease releases");
            }
        };
        let mut failure = None;
        for &i in &held {
            if let Value::ServerError(e) = &values[i] {
                remember(i);
                failure.get_or_insert_with(|| self.command_error(keys.get(i), e));
            }
        }
        match failure {
            None => Ok(()),
            Some(e @ StoreError::Unavailable { .. }) => self.settle_failure(e, "lease releases"),
            Some(e) => Err(e),
        }
    }
}

/// Appends a remembered operation as a plain `EVAL` (no `NOSCRIPT` possible
/// inside a claim pipeline, which must not be re-run).
fn add_pending_op(pipe: &mut Pipeline, key: &str, op: &PendingOp) {
    match op {
        PendingOp::Release { lease } => {
            pipe.cmd("EVAL")
                .arg(RELEASE_LUA)
                .arg(1)
                .arg(key)
                .arg(&lease[..]);
        }
        PendingOp::Complete {
            lease,
            done,
            ttl_ms,
        } => {
            pipe.cmd("EVAL")
                .arg(COMPLETE_LUA)
                .arg(1)
                .arg(key)
                .arg(&lease[..])
                .arg(&done[..])
                .arg(*ttl_ms);
        }
    }
}

/// A lease store: `manual_immediate` acks when the handler calls
/// `ack.ack()`. Every form is one round trip (a batch is one pipeline).
impl LeaseStore for RedisStore {
    fn kind(&self) -> &'static str {
        STORE
    }

    async fn claim(&self, request: &ClaimRequest<'_>) -> Result<Claim, StoreError> {
        let mut claims = self.claim_keys(std::slice::from_ref(request)).await?;
        claims.pop().ok_or_else(|| StoreError::Config {
            store: STORE,
            message: "a claim of one key returned no answer".into(),
        })
    }

    async fn claim_all(&self, requests: &[ClaimRequest<'_>]) -> Result<Vec<Claim>, StoreError> {
        self.claim_keys(requests).await
    }

    async fn complete(&self, done: &Claimed<'_>) -> Result<(), StoreError> {
        self.complete_keys(std::slice::from_ref(done)).await
    }

    async fn complete_all(&self, done: &[Claimed<'_>]) -> Result<(), StoreError> {
        self.complete_keys(done).await
    }

    async fn release(&self, claimed: &Claimed<'_>) -> Result<(), StoreError> {
        self.release_keys(std::slice::from_ref(claimed)).await
    }

    async fn release_all(&self, claimed: &[Claimed<'_>]) -> Result<(), StoreError> {
        self.release_keys(claimed).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_debug_hides_the_password() {
        let b = RedisStore::cluster_builder(["redis://u:hunter2@a:1", "redis://:hunter2@b:2"]);
        let shown = format!("{b:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redis://u:***@a:1"), "{shown}");
    }

    #[tokio::test]
    async fn bad_settings_are_config_errors() {
        for b in [
            RedisStore::builder("redis://127.0.0.1:1").prefix("a{b"),
            RedisStore::builder("redis://127.0.0.1:1").prefix(""),
            RedisStore::builder("redis://127.0.0.1:1").timeout(Duration::ZERO),
            RedisStore::builder("http://:hunter2@nowhere"),
        ] {
            let err = b.connect().await.unwrap_err();
            assert!(matches!(err, StoreError::Config { .. }), "{err}");
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
    }

    #[tokio::test]
    async fn unreachable_server_is_unavailable_without_the_password() {
        // Port 1 on loopback: nothing listens there.
        let err = RedisStore::builder("redis://:hunter2@127.0.0.1:1")
            .timeout(Duration::from_millis(200))
            .connect()
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Unavailable { .. }), "{err}");
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("redis://:***@127.0.0.1:1"), "{shown}");
    }
}
