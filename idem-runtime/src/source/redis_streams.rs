//! Redis Streams as a source: one consumer group per handler, blocking
//! `XREADGROUP`, `XACK` (many ids in one call), recovery of a crashed
//! consumer's pending entries with `XAUTOCLAIM`, and dead letters written to
//! a stream.
//!
//! Not a producer: publish with `XADD <topic> * payload <bytes> [name value …]`
//! (the fields other than `payload` become headers). Not a retention policy
//! either: trimming the stream (`XADD … MAXLEN ~ n`, `XTRIM`) stays with the
//! producer or the operator.
//!
//! How idem's operations map to Redis:
//!
//! | operation | Redis |
//! |---|---|
//! | subscribe | `XGROUP CREATE <topic> <group> 0 MKSTREAM` (an existing group is kept) |
//! | fetch | `XREADGROUP GROUP <group> <consumer> COUNT n BLOCK ms STREAMS <topic> >`, plus `XAUTOCLAIM` of entries idle longer than [`claim_idle`](RedisStreams::claim_idle) (a crashed consumer's) and `XCLAIM` of entries this consumer nacked |
//! | attempt | 1 for a new entry; the delivery count from `XPENDING` for a reclaimed one |
//! | ack / batch ack | `XACK <topic> <group> id…` (one call for the whole batch) |
//! | nack(delay) | the entry stays pending; this consumer claims it again after `delay` |
//! | long handler | `XCLAIM … JUSTID` every `claim_idle / 4` resets the idle time of held entries, so no other consumer claims them |
//! | dead letter | `MULTI; XADD <dead letter stream> * payload … idem-dead-letter-reason …; XACK; EXEC` |

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisError, Value};
use tokio::time::Instant;

use super::plumbing::{
    self, Connector, DeadLetterSink, Header, InFlight, KeepAlive, Live, Reconnecting, Ticker, lock,
    write_dead_letter,
};
use super::{DeadLetter, SourceError, SubscribeSpec, Subscription};
use crate::delivery::{Delivery, Headers, Receipt};
use crate::handler::Backoff;
use crate::redact::RedactedUrl;

const NAME: &str = "redis streams";

/// The environment variable [`RedisStreams::from_env`] reads.
pub const URL_ENV: &str = "REDIS_URL";
/// The URL used when [`URL_ENV`] is unset.
pub const DEFAULT_URL: &str = "redis://127.0.0.1:6379";

/// Where a consumer group that idem creates starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupStart {
    /// Every entry already in the stream (`XGROUP CREATE … 0`): nothing
    /// published before the first deployment is missed. The default.
    #[default]
    Beginning,
    /// Only entries added after the group was created (`XGROUP CREATE … $`).
    End,
}

#[derive(Debug, Clone)]
struct Options {
    consumer: Arc<str>,
    claim_idle: Duration,
    block: Duration,
    payload_field: Arc<str>,
    ordering_key_field: Option<Arc<str>>,
    group_start: GroupStart,
    reconnect: Backoff,
}

/// Redis Streams source: one consumer group per handler (the group is the
/// handler's name); processes with the same handlers share the work.
///
/// ```no_run
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use idem_runtime::source::redis_streams::RedisStreams;
///
/// let source = RedisStreams::from_env()? // REDIS_URL, default redis://127.0.0.1:6379
///     .consumer_name("orders-pod-1")
///     .claim_idle(Duration::from_secs(60));
/// source.ping().await?;
/// // idem_runtime::Runtime::builder(source).store(…).build()?.run_until(…).await;
/// # Ok(()) }
/// ```
pub struct RedisStreams {
    client: redis::Client,
    url: Arc<str>,
    opts: Options,
    control: OnceLock<Arc<Reconnecting<RedisConnector>>>,
}

impl fmt::Debug for RedisStreams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStreams")
            .field("url", &RedactedUrl(&self.url))
            .field("consumer", &self.opts.consumer)
            .field("claim_idle", &self.opts.claim_idle)
            .field("block", &self.opts.block)
            .finish_non_exhaustive()
    }
}

fn default_consumer_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    format!(
        "idem-{host}-{}-{:04x}",
        std::process::id(),
        fastrand::u16(..)
    )
}

impl RedisStreams {
    /// A source for the Redis at `url` (`redis://[:password@]host:port[/db]`,
    /// `rediss://` for TLS when the application enables the redis crate's TLS
    /// feature). Connects lazily, on the first subscription.
    pub fn new(url: &str) -> Result<Self, SourceError> {
        let client = redis::Client::open(url).map_err(|e| SourceError::Config {
            source_name: NAME,
            message: format!(
                "invalid Redis URL {}: {}; expected redis://[:password@]host:port[/db]",
                RedactedUrl(url),
                plumbing::redacted(&e, url)
            ),
        })?;
        Ok(RedisStreams {
            client,
            url: url.into(),
            opts: Options {
                consumer: default_consumer_name().into(),
                claim_idle: Duration::from_secs(30),
                block: Duration::from_secs(1),
                payload_field: "payload".into(),
                ordering_key_field: None,
                group_start: GroupStart::Beginning,
                reconnect: plumbing::RECONNECT_BACKOFF,
            },
            control: OnceLock::new(),
        })
    }

    /// A source for the URL in `REDIS_URL` (default `redis://127.0.0.1:6379`).
    pub fn from_env() -> Result<Self, SourceError> {
        Self::new(&plumbing::url_from_env(URL_ENV, DEFAULT_URL))
    }

    /// This process's consumer name inside each group (default
    /// `idem-<host>-<pid>-<random>`). Two live processes must not share one.
    pub fn consumer_name(mut self, name: impl Into<String>) -> Self {
        self.opts.consumer = name.into().into();
        self
    }

    /// How long an entry must sit unacked in another consumer's pending list
    /// before this consumer takes it over (`XAUTOCLAIM` min-idle-time;
    /// default 30 s). Handlers that run longer are kept alive and not taken
    /// over while their process lives.
    pub fn claim_idle(mut self, idle: Duration) -> Self {
        self.opts.claim_idle = idle.max(Duration::from_millis(10));
        self
    }

    /// How long one `XREADGROUP` blocks waiting for new entries (default 1 s).
    /// It also bounds how late a nacked entry comes back.
    pub fn block(mut self, block: Duration) -> Self {
        self.opts.block = block.max(Duration::from_millis(1));
        self
    }

    /// The entry field holding the payload (default `payload`). An entry
    /// without it is dead-lettered with that reason.
    pub fn payload_field(mut self, field: impl Into<String>) -> Self {
        self.opts.payload_field = field.into().into();
        self
    }

    /// The entry field whose value is the ordering key (`ordered = true`
    /// handlers run entries with equal keys one after another). None by default.
    pub fn ordering_key_field(mut self, field: impl Into<String>) -> Self {
        self.opts.ordering_key_field = Some(field.into().into());
        self
    }

    /// Where groups that idem creates start reading (default: the beginning).
    pub fn group_start(mut self, start: GroupStart) -> Self {
        self.opts.group_start = start;
        self
    }

    /// Delays between reconnection attempts (default 100 ms doubling to 5 s).
    pub fn reconnect_backoff(mut self, backoff: Backoff) -> Self {
        self.opts.reconnect = backoff;
        self
    }

    /// The consumer name this process uses in every group.
    pub fn consumer(&self) -> &str {
        &self.opts.consumer
    }

    /// Checks that Redis answers (`PING`), with an error that names the fix.
    pub async fn ping(&self) -> Result<(), SourceError> {
        let control = self.control();
        let reply: Result<String, _> = query(&control, &redis::cmd("PING")).await;
        reply.map(drop)
    }

    fn control(&self) -> Arc<Reconnecting<RedisConnector>> {
        self.control
            .get_or_init(|| {
                Arc::new(Reconnecting::new(
                    RedisConnector {
                        client: self.client.clone(),
                        url: self.url.clone(),
                        response_timeout: Duration::from_secs(5),
                    },
                    self.opts.reconnect,
                ))
            })
            .clone()
    }
}

struct RedisConnector {
    client: redis::Client,
    url: Arc<str>,
    response_timeout: Duration,
}

impl Connector for RedisConnector {
    type Conn = MultiplexedConnection;
    const SOURCE: &'static str = NAME;

    async fn connect(&self) -> Result<MultiplexedConnection, SourceError> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(3)))
            .set_response_timeout(Some(self.response_timeout));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| SourceError::Unavailable {
                source_name: NAME,
                message: format!(
                    "cannot connect to {}: {}; is redis-server running there? (set {URL_ENV} to its URL)",
                    RedactedUrl(&self.url),
                    plumbing::redacted(&e, &self.url)
                ),
            })
    }
}

fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
}

/// A Redis error as a source error; a lost connection is reported to `conn`.
fn source_error(
    conn: &Reconnecting<RedisConnector>,
    live: &Live<MultiplexedConnection>,
    e: &RedisError,
) -> SourceError {
    let url = &conn.connector().url;
    let text = plumbing::redacted(e, url);
    if is_connection_error(e) {
        conn.lost(live.generation, &text);
        return plumbing::unavailable(
            NAME,
            &format!("connection to {} failed", RedactedUrl(url)),
            &text,
        );
    }
    match e.code() {
        Some("NOGROUP") => SourceError::Unavailable {
            source_name: NAME,
            message: format!("{text} (the stream or its group was deleted; idem re-creates it)"),
        },
        Some("LOADING") | Some("BUSY") | Some("TRYAGAIN") | Some("MASTERDOWN") => {
            SourceError::Unavailable {
                source_name: NAME,
                message: text,
            }
        }
        Some("NOPERM") | Some("NOAUTH") | Some("WRONGPASS") => SourceError::Refused {
            source_name: NAME,
            message: format!(
                "{text}; grant the user the stream commands (XREADGROUP, XACK, XAUTOCLAIM, XCLAIM, XPENDING, XADD, XGROUP) or fix the credentials in {URL_ENV}"
            ),
        },
        Some("WRONGTYPE") => SourceError::Refused {
            source_name: NAME,
            message: format!(
                "{text}; the topic's key holds something other than a stream: pick another topic or delete the key"
            ),
        },
        _ => SourceError::Refused {
            source_name: NAME,
            message: text,
        },
    }
}

fn is_nogroup(e: &SourceError) -> bool {
    matches!(e, SourceError::Unavailable { message, .. } if message.contains("NOGROUP"))
}

async fn query<T: redis::FromRedisValue>(
    conn: &Reconnecting<RedisConnector>,
    cmd: &Cmd,
) -> Result<T, SourceError> {
    let live = conn.get().await?;
    let mut c = live.conn.clone();
    cmd.query_async(&mut c)
        .await
        .map_err(|e| source_error(conn, &live, &e))
}

async fn query_pipe<T: redis::FromRedisValue>(
    conn: &Reconnecting<RedisConnector>,
    pipe: &Pipeline,
) -> Result<T, SourceError> {
    let live = conn.get().await?;
    let mut c = live.conn.clone();
    pipe.query_async(&mut c)
        .await
        .map_err(|e| source_error(conn, &live, &e))
}

impl super::Source for RedisStreams {
    type Subscription = RedisSubscription;

    async fn subscribe(&self, spec: SubscribeSpec<'_>) -> Result<RedisSubscription, SourceError> {
        let control = self.control();
        let claim_idle = self.opts.claim_idle;
        let inner = Arc::new(SubInner {
            topic: spec.topic.into(),
            group: spec.group.into(),
            dead_letter: spec
                .dead_letter
                .map_or_else(|| format!("{}.dlq", spec.topic), str::to_owned)
                .into(),
            opts: self.opts.clone(),
            control,
            // Blocking reads get a connection of their own: a blocked
            // XREADGROUP holds up every command queued behind it.
            read: Reconnecting::new(
                RedisConnector {
                    client: self.client.clone(),
                    url: self.url.clone(),
                    response_timeout: self.opts.block + Duration::from_secs(5),
                },
                self.opts.reconnect,
            ),
            in_flight: Arc::new(InFlight::default()),
            sched: Mutex::new(Schedule {
                retries: Vec::new(),
                next_scan: Instant::now(),
                cursor: "0-0".into(),
            }),
        });
        inner.ensure_group().await?;
        let ticker = plumbing::spawn_keep_alive(
            Arc::downgrade(&inner),
            inner.in_flight.clone(),
            claim_idle / 4,
            claim_idle / 2,
        );
        Ok(RedisSubscription {
            inner,
            _keep_alive: ticker,
        })
    }
}

/// One handler's consumer in its group (see the [module docs](self)).
pub struct RedisSubscription {
    inner: Arc<SubInner>,
    _keep_alive: Ticker,
}

impl fmt::Debug for RedisSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSubscription")
            .field("topic", &self.inner.topic)
            .field("group", &self.inner.group)
            .field("consumer", &self.inner.opts.consumer)
            .field("dead_letter", &self.inner.dead_letter)
            .field("in_flight", &self.inner.in_flight.len())
            .finish()
    }
}

struct SubInner {
    topic: Arc<str>,
    group: Arc<str>,
    dead_letter: Arc<str>,
    opts: Options,
    control: Arc<Reconnecting<RedisConnector>>,
    read: Reconnecting<RedisConnector>,
    in_flight: Arc<InFlight>,
    sched: Mutex<Schedule>,
}

struct Schedule {
    /// Nacked entries (still pending under this consumer) and when to claim
    /// them again.
    retries: Vec<(Instant, Arc<str>)>,
    /// When to look for other consumers' stale entries next.
    next_scan: Instant,
    /// Where the last `XAUTOCLAIM` scan stopped.
    cursor: String,
}

/// One stream entry as Redis returned it.
struct Entry {
    id: Arc<str>,
    /// Field/value pairs; `None` for an entry deleted from the stream while
    /// it was pending.
    fields: Option<Vec<Value>>,
    /// Taken over with `XCLAIM`/`XAUTOCLAIM`: its delivery count is in `XPENDING`.
    reclaimed: bool,
}

fn unexpected(what: &str, v: &Value) -> SourceError {
    SourceError::Unavailable {
        source_name: NAME,
        message: format!("unexpected reply to {what}: {v:?}"),
    }
}

fn into_text(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        Value::VerbatimString { text, .. } => Some(text),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn into_bytes(v: Value) -> Vec<u8> {
    match v {
        Value::BulkString(b) => b,
        Value::SimpleString(s) => s.into_bytes(),
        Value::VerbatimString { text, .. } => text.into_bytes(),
        Value::Int(i) => i.to_string().into_bytes(),
        Value::Double(d) => d.to_string().into_bytes(),
        Value::Boolean(b) => b.to_string().into_bytes(),
        _ => Vec::new(),
    }
}

/// Parses `[[id, [field, value, …]], …]` (Nil items: entries Redis 6
/// reports as deleted).
fn parse_entries(
    v: Value,
    reclaimed: bool,
    what: &str,
    out: &mut Vec<Entry>,
) -> Result<(), SourceError> {
    let items = match v {
        Value::Nil => return Ok(()),
        Value::Array(items) => items,
        other => return Err(unexpected(what, &other)),
    };
    for item in items {
        match item {
            Value::Array(mut pair) if pair.len() == 2 => {
                let fields = match pair.pop() {
                    Some(Value::Array(f)) => Some(f),
                    Some(Value::Map(m)) => Some(m.into_iter().flat_map(|(k, v)| [k, v]).collect()),
                    _ => None,
                };
                let Some(id) = pair.pop().and_then(into_text) else {
                    return Err(unexpected(what, &Value::Array(pair)));
                };
                out.push(Entry {
                    id: id.into(),
                    fields,
                    reclaimed,
                });
            }
            Value::Nil => {}
            other => return Err(unexpected(what, &other)),
        }
    }
    Ok(())
}

/// Parses an `XREADGROUP` reply: `[[stream, entries]]` (RESP2) or
/// `{stream: entries}` (RESP3), or Nil after a timeout.
fn parse_read(v: Value, out: &mut Vec<Entry>) -> Result<(), SourceError> {
    match v {
        Value::Nil => Ok(()),
        Value::Array(streams) => {
            for s in streams {
                match s {
                    Value::Array(mut kv) if kv.len() == 2 => {
                        let entries = kv.pop().unwrap_or_default();
                        parse_entries(entries, false, "XREADGROUP", out)?;
                    }
                    other => return Err(unexpected("XREADGROUP", &other)),
                }
            }
            Ok(())
        }
        Value::Map(streams) => {
            for (_, entries) in streams {
                parse_entries(entries, false, "XREADGROUP", out)?;
            }
            Ok(())
        }
        other => Err(unexpected("XREADGROUP", &other)),
    }
}

/// What [`SubInner::build`] made of an entry.
enum Built {
    Delivery(Delivery),
    /// No payload field: dead-letter it at once, with this reason.
    Poison(Delivery, String),
}

impl SubInner {
    async fn ensure_group(&self) -> Result<(), SourceError> {
        let start = match self.opts.group_start {
            GroupStart::Beginning => "0",
            GroupStart::End => "$",
        };
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE")
            .arg(&*self.topic)
            .arg(&*self.group)
            .arg(start)
            .arg("MKSTREAM");
        match query::<()>(&self.control, &cmd).await {
            Ok(()) => {
                tracing::info!(topic = %self.topic, group = %self.group, "created consumer group");
                Ok(())
            }
            Err(SourceError::Refused { message, .. }) if message.contains("BUSYGROUP") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Runs `cmd` on the control connection; a missing group is re-created
    /// (the stream was deleted, or Redis restarted without persistence).
    async fn control_query<T: redis::FromRedisValue>(&self, cmd: &Cmd) -> Result<T, SourceError> {
        let r = query(&self.control, cmd).await;
        if let Err(e) = &r
            && is_nogroup(e)
        {
            self.ensure_group().await?;
        }
        r
    }

    fn xack(&self, ids: &[&str]) -> Cmd {
        let mut cmd = redis::cmd("XACK");
        cmd.arg(&*self.topic).arg(&*self.group).arg(ids);
        cmd
    }

    /// Nacked entries that are due, at most `max`.
    fn due_retries(&self, max: usize) -> Vec<Arc<str>> {
        let now = Instant::now();
        let mut sched = lock(&self.sched);
        let mut due = Vec::new();
        sched.retries.retain(|(at, id)| {
            if *at <= now && due.len() < max {
                due.push(id.clone());
                false
            } else {
                true
            }
        });
        due
    }

    /// How long a blocking read may wait before a retry or a scan is due.
    fn idle_budget(&self) -> Duration {
        let now = Instant::now();
        let sched = lock(&self.sched);
        let mut until = sched.next_scan;
        for (at, _) in &sched.retries {
            until = until.min(*at);
        }
        until.saturating_duration_since(now).min(self.opts.block)
    }

    async fn claim_due_retries(&self, max: usize, out: &mut Vec<Entry>) -> Result<(), SourceError> {
        let due = self.due_retries(max);
        if due.is_empty() {
            return Ok(());
        }
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(&*self.topic)
            .arg(&*self.group)
            .arg(&*self.opts.consumer)
            .arg(0);
        for id in &due {
            cmd.arg(&**id);
        }
        let reply: Value = match self.control_query(&cmd).await {
            Ok(v) => v,
            Err(e) => {
                // Try again on the next fetch.
                let now = Instant::now();
                lock(&self.sched)
                    .retries
                    .extend(due.into_iter().map(|id| (now, id)));
                return Err(e);
            }
        };
        let before = out.len();
        parse_entries(reply, true, "XCLAIM", out)?;
        // Entries not returned are no longer pending (acked elsewhere, or deleted).
        let returned: HashSet<&str> = out[before..].iter().map(|e| &*e.id).collect();
        for id in &due {
            if !returned.contains(&**id) {
                self.in_flight.remove(id);
            }
        }
        Ok(())
    }

    async fn scan_stale(&self, max: usize, out: &mut Vec<Entry>) -> Result<(), SourceError> {
        let cursor = {
            let sched = lock(&self.sched);
            if Instant::now() < sched.next_scan {
                return Ok(());
            }
            sched.cursor.clone()
        };
        let mut cmd = redis::cmd("XAUTOCLAIM");
        cmd.arg(&*self.topic)
            .arg(&*self.group)
            .arg(&*self.opts.consumer)
            .arg(self.opts.claim_idle.as_millis() as u64)
            .arg(&cursor)
            .arg("COUNT")
            .arg(max);
        let reply: Value = self.control_query(&cmd).await?;
        let Value::Array(mut parts) = reply else {
            return Err(unexpected("XAUTOCLAIM", &reply));
        };
        if parts.len() < 2 {
            return Err(unexpected("XAUTOCLAIM", &Value::Array(parts)));
        }
        let deleted = if parts.len() >= 3 { parts.pop() } else { None };
        let claimed = parts.pop().unwrap_or_default();
        let next = parts
            .pop()
            .and_then(into_text)
            .unwrap_or_else(|| "0-0".into());
        let before = out.len();
        parse_entries(claimed, true, "XAUTOCLAIM", out)?;
        {
            let mut sched = lock(&self.sched);
            let now = Instant::now();
            sched.next_scan = if next == "0-0" {
                now + self.opts.claim_idle / 2
            } else {
                now
            };
            sched.cursor = next;
            if out.len() > before {
                let taken: HashSet<&str> = out[before..].iter().map(|e| &*e.id).collect();
                sched.retries.retain(|(_, id)| !taken.contains(&**id));
            }
        }
        if out.len() > before {
            tracing::info!(
                topic = %self.topic,
                group = %self.group,
                count = out.len() - before,
                "took over entries another consumer left pending (crashed or too slow)"
            );
        }
        // Entries deleted from the stream while pending cannot be processed:
        // take them off the pending list.
        if let Some(Value::Array(ids)) = deleted
            && !ids.is_empty()
        {
            let ids: Vec<String> = ids.into_iter().filter_map(into_text).collect();
            let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
            tracing::warn!(topic = %self.topic, ids = ?refs, "pending entries were deleted from the stream; acking them away");
            self.control_query::<()>(&self.xack(&refs)).await?;
        }
        Ok(())
    }

    async fn read_new(
        &self,
        max: usize,
        block: Option<Duration>,
        out: &mut Vec<Entry>,
    ) -> Result<(), SourceError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&*self.group)
            .arg(&*self.opts.consumer)
            .arg("COUNT")
            .arg(max);
        if let Some(block) = block {
            cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS").arg(&*self.topic).arg(">");
        let r: Result<Value, _> = query(&self.read, &cmd).await;
        let reply = match r {
            Ok(v) => v,
            Err(e) => {
                if is_nogroup(&e) {
                    self.ensure_group().await?;
                }
                return Err(e);
            }
        };
        parse_read(reply, out)
    }

    /// Delivery counts of reclaimed entries, one `XPENDING` each, in one round trip.
    async fn delivery_counts(&self, entries: &[Entry]) -> Result<Vec<Option<u32>>, SourceError> {
        let mut pipe = redis::pipe();
        let mut n = 0;
        for e in entries.iter().filter(|e| e.reclaimed) {
            pipe.cmd("XPENDING")
                .arg(&*self.topic)
                .arg(&*self.group)
                .arg(&*e.id)
                .arg(&*e.id)
                .arg(1);
            n += 1;
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        let replies: Vec<Value> = query_pipe(&self.control, &pipe).await?;
        Ok(replies
            .into_iter()
            .map(|r| match r {
                // [[id, consumer, idle, count]]
                Value::Array(mut rows) if rows.len() == 1 => match rows.pop() {
                    Some(Value::Array(row)) if row.len() == 4 => match &row[3] {
                        Value::Int(c) => u32::try_from(*c).ok(),
                        _ => None,
                    },
                    _ => None,
                },
                _ => None,
            })
            .collect())
    }

    fn build(&self, entry: Entry, attempt: u32) -> Option<Built> {
        let fields = entry.fields?;
        let mut payload = None;
        let mut ordering_key = None;
        let mut headers = Headers::default();
        let mut it = fields.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            let name = into_bytes(k);
            let name = String::from_utf8_lossy(&name);
            if name == *self.opts.payload_field && payload.is_none() {
                payload = Some(into_bytes(v));
                continue;
            }
            let value = into_bytes(v);
            if let Some(f) = &self.opts.ordering_key_field
                && name == **f
            {
                ordering_key = Some(Arc::<str>::from(String::from_utf8_lossy(&value)));
            }
            headers.insert(name.into_owned(), value);
        }
        let mut d = Delivery {
            id: entry.id.clone(),
            topic: self.topic.clone(),
            payload: payload.as_deref().unwrap_or_default().into(),
            headers,
            ordering_key,
            attempt: attempt.max(1),
            receipt: Receipt::text(entry.id),
        };
        if payload.is_none() {
            let names: Vec<&str> = d.headers.iter().map(|(n, _)| n).collect();
            let reason = format!(
                "stream entry has no `{}` field (fields: {}); publish with XADD {} * {} <bytes>",
                self.opts.payload_field,
                names.join(", "),
                self.topic,
                self.opts.payload_field
            );
            d.payload = Arc::from(&[][..]);
            return Some(Built::Poison(d, reason));
        }
        Some(Built::Delivery(d))
    }

    /// Writes `d` to the dead-letter stream; without its payload field when
    /// it had none (`with_payload` false).
    async fn write_dead_letter(
        &self,
        d: &Delivery,
        letter: &DeadLetter,
        with_payload: bool,
    ) -> Result<(), SourceError> {
        write_dead_letter(
            &DeadLetters {
                sub: self,
                with_payload,
            },
            d,
            letter,
        )
        .await
    }
}

/// A subscription's dead-letter stream.
struct DeadLetters<'a> {
    sub: &'a SubInner,
    with_payload: bool,
}

impl DeadLetterSink for DeadLetters<'_> {
    /// `MULTI; XADD <dead letter stream> * …; XACK; EXEC`: written and
    /// settled in one step.
    async fn publish_and_settle(
        &self,
        d: &Delivery,
        fields: Vec<Header<'_>>,
    ) -> Result<(), SourceError> {
        let me = self.sub;
        // Settled or not, this consumer lets go of it: if the write fails,
        // the entry stays pending and is claimed again after `claim_idle`.
        me.in_flight.remove(&d.id);
        let mut pipe = redis::pipe();
        pipe.atomic();
        {
            let xadd = pipe.cmd("XADD").arg(&*me.dead_letter).arg("*");
            if self.with_payload {
                xadd.arg(&*me.opts.payload_field).arg(&*d.payload);
            }
            for (k, v) in &fields {
                xadd.arg(*k).arg(&**v);
            }
        }
        pipe.cmd("XACK")
            .arg(&*me.topic)
            .arg(&*me.group)
            .arg(&*d.id)
            .ignore();
        query_pipe::<()>(&me.control, &pipe).await
    }
}

impl KeepAlive for SubInner {
    async fn keep_alive(&self, handles: Vec<Arc<str>>) {
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(&*self.topic)
            .arg(&*self.group)
            .arg(&*self.opts.consumer)
            .arg(0);
        for h in &handles {
            cmd.arg(&**h);
        }
        cmd.arg("JUSTID");
        if let Err(e) = query::<Value>(&self.control, &cmd).await {
            tracing::warn!(error = %e, "could not reset the idle time of held entries; another consumer may take them over");
        }
    }
}

impl Subscription for RedisSubscription {
    async fn fetch(&self, max: usize) -> Result<Vec<Delivery>, SourceError> {
        let me = &*self.inner;
        let max = max.max(1);
        let mut entries = Vec::new();
        me.claim_due_retries(max, &mut entries).await?;
        if entries.len() < max {
            me.scan_stale(max - entries.len(), &mut entries).await?;
        }
        if entries.len() < max {
            let block = if entries.is_empty() {
                Some(me.idle_budget()).filter(|b| !b.is_zero())
            } else {
                None
            };
            me.read_new(max - entries.len(), block, &mut entries)
                .await?;
        }
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let counts = me.delivery_counts(&entries).await?;
        let mut counts = counts.into_iter();
        let mut out = Vec::with_capacity(entries.len());
        let mut gone = Vec::new();
        let mut poison = Vec::new();
        for entry in entries {
            let attempt = if entry.reclaimed {
                match counts.next().flatten() {
                    Some(c) => c,
                    // Acked by someone else since the claim: nothing to do.
                    None => continue,
                }
            } else {
                1
            };
            let id = entry.id.clone();
            match me.build(entry, attempt) {
                Some(Built::Delivery(d)) => out.push(d),
                Some(Built::Poison(d, reason)) => poison.push((d, reason)),
                None => gone.push(id),
            }
        }
        me.in_flight.insert_all(out.iter().map(|d| &d.id));
        if !gone.is_empty() {
            let refs: Vec<&str> = gone.iter().map(|id| &**id).collect();
            tracing::warn!(topic = %me.topic, ids = ?refs, "pending entries were deleted from the stream; acking them away");
            for id in &gone {
                me.in_flight.remove(id);
            }
            me.control_query::<()>(&me.xack(&refs)).await?;
        }
        for (d, reason) in poison {
            tracing::error!(topic = %me.topic, message_id = %d.id, reason = %reason, "dead-lettered by the source");
            let letter = DeadLetter {
                reason,
                attempts: d.attempt,
                handler: me.group.to_string(),
            };
            if let Err(e) = me.write_dead_letter(&d, &letter, false).await {
                // Still pending: taken over and dead-lettered again later.
                tracing::error!(error = %e, message_id = %d.id, "dead-letter write failed");
            }
        }
        Ok(out)
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), SourceError> {
        self.ack_many(&[delivery]).await
    }

    async fn ack_many(&self, deliveries: &[&Delivery]) -> Result<(), SourceError> {
        if deliveries.is_empty() {
            return Ok(());
        }
        let me = &*self.inner;
        let ids: Vec<&str> = deliveries.iter().map(|d| &*d.id).collect();
        for id in &ids {
            me.in_flight.remove(id);
        }
        me.control_query::<()>(&me.xack(&ids)).await
    }

    async fn nack(&self, delivery: &Delivery, delay: Duration) -> Result<(), SourceError> {
        // The entry stays pending under this consumer; claim it again when due.
        let me = &*self.inner;
        lock(&me.sched)
            .retries
            .push((Instant::now() + delay, delivery.id.clone()));
        Ok(())
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery,
        letter: &DeadLetter,
    ) -> Result<(), SourceError> {
        self.inner.write_dead_letter(delivery, letter, true).await
    }

    /// Closes the blocking-read connection for good (the command connection
    /// is the source's, shared); entries still pending under this consumer
    /// are claimed by another after `claim_idle`.
    async fn close(&self) {
        self.inner.read.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn read_reply_parses_entries_and_tolerates_odd_shapes() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk("orders"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk("1-0"),
                    Value::Array(vec![bulk("payload"), bulk("{}"), bulk("k"), bulk("v")]),
                ]),
                Value::Array(vec![bulk("2-0"), Value::Nil]),
            ]),
        ])]);
        let mut out = Vec::new();
        parse_read(reply, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(&*out[0].id, "1-0");
        assert!(out[1].fields.is_none());
        let mut out = Vec::new();
        assert!(parse_read(Value::Int(3), &mut out).is_err());
        assert!(parse_read(Value::Array(vec![Value::Int(1)]), &mut out).is_err());
        assert!(parse_read(Value::Nil, &mut out).is_ok());
    }
}
