//! NATS JetStream as a source: one durable pull consumer per handler with
//! explicit acks, `Nak(delay)` for redelivery, `+WPI` (in progress) while a
//! long handler runs, and dead letters published to a subject before the
//! original is terminated.
//!
//! Not a stream manager: by default idem creates a file-backed stream for a
//! topic no stream captures yet (and one for its dead-letter subject), which
//! suits development; in production create streams with your own limits and
//! turn that off with [`create_streams(false)`](NatsJetStream::create_streams).
//!
//! How idem's operations map to JetStream:
//!
//! | operation | JetStream |
//! |---|---|
//! | subscribe | durable pull consumer named after the handler, `ack_policy = explicit`, filtered on the topic |
//! | fetch | the consumer's pull stream (at most `prefetch` messages per pull request) |
//! | message id | the `Nats-Msg-Id` header, else the stream sequence |
//! | attempt | the delivery count of the ack subject (`info().delivered`) |
//! | ack / batch ack | `+ACK` to each message's ack subject, one flush for the batch |
//! | nack(delay) | `-NAK {"delay": …}`; on the last delivery `max_deliver` allows, a dead letter instead |
//! | long handler | `+WPI` when a held message gets past half of `ack_wait` |
//! | dead letter | publish to `<topic>.dlq` (awaiting the stream's ack), then `+TERM` |

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::pull::{Config as PullConfig, Stream as PullStream};
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{Config as StreamConfig, StorageType};
use async_nats::jetstream::{self, AckKind};
use futures_util::{FutureExt, StreamExt};

use super::plumbing::{
    self, Connector, DeadLetterSink, Header, InFlight, KeepAlive, Reconnecting, Ticker,
    write_dead_letter,
};
use super::{DeadLetter, SourceError, SubscribeSpec, Subscription};
use crate::delivery::{Delivery, Headers, Receipt};
use crate::handler::Backoff;

const NAME: &str = "nats jetstream";

/// The environment variable [`NatsJetStream::from_env`] reads.
pub const URL_ENV: &str = "NATS_URL";
/// The URL used when [`URL_ENV`] is unset.
pub const DEFAULT_URL: &str = "nats://127.0.0.1:4222";

/// The header JetStream deduplicates publishes by; idem reads it as the message id.
const MSG_ID: &str = "Nats-Msg-Id";

#[derive(Debug, Clone)]
struct Options {
    ack_wait: Duration,
    max_deliver: Option<u32>,
    create_streams: bool,
    fetch_wait: Duration,
    reconnect: Backoff,
}

/// NATS JetStream source: one durable pull consumer per handler (named after
/// it); processes with the same handlers share the consumer's messages.
///
/// ```no_run
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use idem_runtime::source::nats::NatsJetStream;
///
/// let source = NatsJetStream::from_env()? // NATS_URL, default nats://127.0.0.1:4222
///     .ack_wait(Duration::from_secs(60))
///     .max_deliver(10);
/// source.ping().await?;
/// // idem_runtime::Runtime::builder(source).store(…).build()?.run_until(…).await;
/// # Ok(()) }
/// ```
pub struct NatsJetStream {
    url: Arc<str>,
    opts: Options,
    client: OnceLock<Arc<Reconnecting<ClientConnector>>>,
}

impl fmt::Debug for NatsJetStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsJetStream")
            .field("url", &display_url(&self.url))
            .field("ack_wait", &self.opts.ack_wait)
            .field("max_deliver", &self.opts.max_deliver)
            .field("create_streams", &self.opts.create_streams)
            .finish_non_exhaustive()
    }
}

/// The URL without credentials: NATS puts tokens where other URLs put a user
/// name (`nats://s3cr3t@host`), so the whole user-info part goes.
fn display_url(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    match url[start..end].rfind('@') {
        Some(at) => format!("{}***@{}", &url[..start], &url[start + at + 1..]),
        None => url.to_owned(),
    }
}

/// A JetStream-safe name (streams, durable consumers): no `.`, `*`, `>`,
/// path separators or whitespace.
fn safe_name(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '.' | '*' | '>' | '/' | '\\' => '_',
            c if c.is_whitespace() || c.is_control() => '_',
            c => c,
        })
        .collect()
}

/// A header value NATS can carry: one line.
fn one_line(s: &str) -> String {
    s.replace(['\r', '\n'], " ")
}

impl NatsJetStream {
    /// A source for the NATS server at `url` (`nats://[user:pass@]host:port`,
    /// several comma-separated). Connects lazily, on the first subscription.
    pub fn new(url: &str) -> Result<Self, SourceError> {
        use async_nats::ToServerAddrs;
        url.to_server_addrs().map_err(|e| SourceError::Config {
            source_name: NAME,
            message: format!(
                "invalid NATS URL {}: {}; expected nats://host:port",
                display_url(url),
                plumbing::redacted(&e, url)
            ),
        })?;
        Ok(NatsJetStream {
            url: url.into(),
            opts: Options {
                ack_wait: Duration::from_secs(30),
                max_deliver: None,
                create_streams: true,
                fetch_wait: Duration::from_secs(1),
                reconnect: plumbing::RECONNECT_BACKOFF,
            },
            client: OnceLock::new(),
        })
    }

    /// A source for the URL in `NATS_URL` (default `nats://127.0.0.1:4222`).
    pub fn from_env() -> Result<Self, SourceError> {
        Self::new(&plumbing::url_from_env(URL_ENV, DEFAULT_URL))
    }

    /// How long JetStream waits for an ack before redelivering (default
    /// 30 s). Handlers that run longer send progress (`+WPI`) at half of it.
    pub fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.opts.ack_wait = ack_wait.max(Duration::from_millis(100));
        self
    }

    /// The consumer's `max_deliver` (default: unlimited). On the last
    /// allowed delivery a nack becomes a dead letter, so the server never
    /// silently stops delivering a message.
    pub fn max_deliver(mut self, max_deliver: u32) -> Self {
        self.opts.max_deliver = Some(max_deliver.max(1));
        self
    }

    /// Whether idem creates a file-backed stream for a topic (and a
    /// dead-letter subject) that no stream captures (default true).
    pub fn create_streams(mut self, create: bool) -> Self {
        self.opts.create_streams = create;
        self
    }

    /// How long one fetch waits for messages before returning an empty
    /// batch (default 1 s).
    pub fn fetch_wait(mut self, wait: Duration) -> Self {
        self.opts.fetch_wait = wait.max(Duration::from_millis(10));
        self
    }

    /// Delays between reconnection attempts (default 100 ms doubling to 5 s).
    pub fn reconnect_backoff(mut self, backoff: Backoff) -> Self {
        self.opts.reconnect = backoff;
        self
    }

    /// Checks that the server answers and has JetStream enabled, with an
    /// error that names the fix.
    pub async fn ping(&self) -> Result<(), SourceError> {
        let live = self.client().get().await?;
        let refused = |why: &dyn fmt::Display| SourceError::Refused {
            source_name: NAME,
            message: format!(
                "JetStream is not available on {}: {why}; start nats-server with -js",
                display_url(&self.url)
            ),
        };
        // The raw API call: its reply parses on every server version.
        let reply = live
            .conn
            .client
            .request("$JS.API.INFO", Vec::new().into())
            .await
            .map_err(|e| refused(&e))?;
        match std::str::from_utf8(&reply.payload) {
            Ok(text) if !text.contains("\"error\"") => Ok(()),
            Ok(text) => Err(refused(&text)),
            Err(_) => Err(refused(&"unreadable reply")),
        }
    }

    fn client(&self) -> Arc<Reconnecting<ClientConnector>> {
        self.client
            .get_or_init(|| {
                Arc::new(Reconnecting::new(
                    ClientConnector {
                        url: self.url.clone(),
                        reconnect: self.opts.reconnect,
                    },
                    self.opts.reconnect,
                ))
            })
            .clone()
    }
}

/// A NATS client and its JetStream context. The client reconnects by itself
/// once it was connected; [`Reconnecting`] covers the first connection.
#[derive(Clone)]
struct Nats {
    client: async_nats::Client,
    js: jetstream::Context,
}

struct ClientConnector {
    url: Arc<str>,
    reconnect: Backoff,
}

impl Connector for ClientConnector {
    type Conn = Nats;
    const SOURCE: &'static str = NAME;

    async fn connect(&self) -> Result<Nats, SourceError> {
        let backoff = self.reconnect;
        let client = async_nats::ConnectOptions::new()
            .name("idem")
            .connection_timeout(Duration::from_secs(3))
            .reconnect_delay_callback(move |attempt| {
                backoff.delay(u32::try_from(attempt).unwrap_or(u32::MAX))
            })
            .connect(&*self.url)
            .await
            .map_err(|e| SourceError::Unavailable {
                source_name: NAME,
                message: format!(
                    "cannot connect to {}: {}; is nats-server (with -js) running there? (set {URL_ENV} to its URL)",
                    display_url(&self.url),
                    plumbing::redacted(&e, &self.url)
                ),
            })?;
        let js = jetstream::new(client.clone());
        Ok(Nats { client, js })
    }
}

fn unavailable(what: &str, e: &dyn fmt::Display) -> SourceError {
    plumbing::unavailable(NAME, what, e)
}

/// Finds (or creates) the stream that captures `subject`.
async fn stream_for(
    js: &jetstream::Context,
    subject: &str,
    create: bool,
) -> Result<String, SourceError> {
    match js.stream_by_subject(subject).await {
        Ok(name) => return Ok(name),
        Err(e) if create => {
            tracing::debug!(subject, error = %e, "no stream captures the subject; creating one");
        }
        Err(e) => {
            return Err(SourceError::Refused {
                source_name: NAME,
                message: format!(
                    "no JetStream stream captures subject {subject:?} ({e}): create one (nats stream add --subjects {subject:?}) or let idem create it with create_streams(true)"
                ),
            });
        }
    }
    let name = safe_name(subject);
    js.get_or_create_stream(StreamConfig {
        name: name.clone(),
        subjects: vec![subject.to_owned()],
        storage: StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| SourceError::Refused {
        source_name: NAME,
        message: format!(
            "cannot create stream {name:?} for subject {subject:?}: {e}; another stream may overlap the subject, or the account lacks JetStream resources"
        ),
    })?;
    tracing::info!(stream = %name, subject, "created JetStream stream");
    Ok(name)
}

/// One subscription's consumer and its open pull stream.
struct ConsumerConnector {
    client: Arc<Reconnecting<ClientConnector>>,
    topic: Arc<str>,
    durable: String,
    prefetch: usize,
    opts: Options,
}

type Pull = Arc<tokio::sync::Mutex<PullStream>>;

impl Connector for ConsumerConnector {
    type Conn = Pull;
    const SOURCE: &'static str = NAME;

    async fn connect(&self) -> Result<Pull, SourceError> {
        let nats = self.client.get().await?.conn;
        let stream_name = stream_for(&nats.js, &self.topic, self.opts.create_streams).await?;
        let stream = nats
            .js
            .get_stream_no_info(&stream_name)
            .await
            .map_err(|e| unavailable("get stream", &e))?;
        let consumer = stream
            .get_or_create_consumer(
                &self.durable,
                PullConfig {
                    durable_name: Some(self.durable.clone()),
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: self.opts.ack_wait,
                    max_deliver: self.opts.max_deliver.map_or(-1, i64::from),
                    filter_subject: self.topic.to_string(),
                    deliver_policy: DeliverPolicy::All,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| unavailable("create durable consumer", &e))?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(self.prefetch.max(1))
            .messages()
            .await
            .map_err(|e| unavailable("open the pull stream", &e))?;
        Ok(Arc::new(tokio::sync::Mutex::new(messages)))
    }
}

impl super::Source for NatsJetStream {
    type Subscription = NatsSubscription;

    async fn subscribe(&self, spec: SubscribeSpec<'_>) -> Result<NatsSubscription, SourceError> {
        let client = self.client();
        let dead_letter: Arc<str> = spec
            .dead_letter
            .map_or_else(|| format!("{}.dlq", spec.topic), str::to_owned)
            .into();
        {
            let nats = client.get().await?.conn;
            stream_for(&nats.js, &dead_letter, self.opts.create_streams).await?;
        }
        let consumer = Reconnecting::new(
            ConsumerConnector {
                client: client.clone(),
                topic: spec.topic.into(),
                durable: safe_name(spec.group),
                prefetch: spec.prefetch,
                opts: self.opts.clone(),
            },
            self.opts.reconnect,
        );
        // Create the consumer now, so a misconfiguration shows at startup.
        consumer.get().await?;
        let inner = Arc::new(SubInner {
            topic: spec.topic.into(),
            group: spec.group.into(),
            dead_letter,
            client,
            consumer,
            opts: self.opts.clone(),
            in_flight: Arc::new(InFlight::default()),
        });
        let ack_wait = self.opts.ack_wait;
        let ticker = plumbing::spawn_keep_alive(
            Arc::downgrade(&inner),
            inner.in_flight.clone(),
            ack_wait / 4,
            ack_wait / 2,
        );
        Ok(NatsSubscription {
            inner,
            _keep_alive: ticker,
        })
    }
}

/// One handler's durable pull consumer (see the [module docs](self)).
pub struct NatsSubscription {
    inner: Arc<SubInner>,
    _keep_alive: Ticker,
}

impl fmt::Debug for NatsSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsSubscription")
            .field("topic", &self.inner.topic)
            .field("group", &self.inner.group)
            .field("dead_letter", &self.inner.dead_letter)
            .field("in_flight", &self.inner.in_flight.len())
            .finish()
    }
}

struct SubInner {
    topic: Arc<str>,
    group: Arc<str>,
    dead_letter: Arc<str>,
    client: Arc<Reconnecting<ClientConnector>>,
    consumer: Reconnecting<ConsumerConnector>,
    opts: Options,
    in_flight: Arc<InFlight>,
}

impl SubInner {
    /// The delivery of a pulled message, and its ack subject.
    fn delivery(&self, msg: jetstream::Message) -> Option<(Delivery, Arc<str>)> {
        let (delivered, stream_seq) = match msg.info() {
            Ok(info) => (info.delivered, info.stream_sequence),
            Err(e) => {
                tracing::warn!(error = %e, "message without a JetStream ack subject; skipped");
                return None;
            }
        };
        let msg = msg.message;
        let reply: Arc<str> = msg.reply.as_deref().unwrap_or_default().into();
        let mut headers = Headers::default();
        let mut id = None;
        if let Some(h) = &msg.headers {
            for (name, values) in h.iter() {
                let name: &str = name.as_ref();
                let Some(last) = values.last() else { continue };
                if name.eq_ignore_ascii_case(MSG_ID) {
                    id = Some(Arc::<str>::from(last.as_str()));
                }
                headers.insert(name, last.as_str());
            }
        }
        let id = id
            .filter(|i| !i.is_empty())
            .unwrap_or_else(|| stream_seq.to_string().into());
        let d = Delivery {
            id,
            topic: self.topic.clone(),
            payload: Arc::from(&msg.payload[..]),
            headers,
            ordering_key: None,
            attempt: u32::try_from(delivered).unwrap_or(u32::MAX).max(1),
            receipt: Receipt::text(reply.clone()),
        };
        Some((d, reply))
    }

    async fn send(&self, reply: &str, kind: AckKind, flush: bool) -> Result<(), SourceError> {
        let nats = self.client.get().await?.conn;
        nats.client
            .publish(reply.to_owned(), kind.into())
            .await
            .map_err(|e| unavailable("publish ack", &e))?;
        if flush {
            nats.client
                .flush()
                .await
                .map_err(|e| unavailable("flush acks", &e))?;
        }
        Ok(())
    }
}

impl DeadLetterSink for SubInner {
    fn reserved(&self, name: &str) -> bool {
        name.len() >= 5 && name[..5].eq_ignore_ascii_case("nats-")
    }

    /// Publish to the dead-letter subject, the stream's ack awaited, then
    /// `+TERM` of the original.
    async fn publish_and_settle(
        &self,
        d: &Delivery,
        fields: Vec<Header<'_>>,
    ) -> Result<(), SourceError> {
        let reply = receipt_of(d)?;
        // Settled or not, no more progress for it: if the publish fails, it
        // comes back after `ack_wait`.
        self.in_flight.remove(reply);
        let nats = self.client.get().await?.conn;
        let mut headers = HeaderMap::new();
        for (name, value) in fields {
            if let Ok(n) = async_nats::header::HeaderName::try_from(name) {
                headers.insert(n, one_line(&String::from_utf8_lossy(&value)));
            }
        }
        // The same dead letter published twice (the +TERM got lost) is
        // dropped by the stream's duplicate window.
        let dedup_id = format!("idem-dl:{}", reply);
        let publish = PublishMessage::build()
            .payload(d.payload.to_vec().into())
            .headers(headers)
            .message_id(dedup_id);
        let ack = nats
            .js
            .send_publish(self.dead_letter.to_string(), publish)
            .await
            .map_err(|e| unavailable("publish the dead letter", &e))?;
        ack.await
            .map_err(|e| unavailable("confirm the dead letter", &e))?;
        self.send(reply, AckKind::Term, true).await
    }
}

fn receipt_of(d: &Delivery) -> Result<&str, SourceError> {
    d.receipt.as_text().ok_or_else(|| SourceError::Refused {
        source_name: NAME,
        message: format!(
            "delivery {} carries no JetStream ack subject; it was not fetched from this source",
            d.id
        ),
    })
}

impl KeepAlive for SubInner {
    async fn keep_alive(&self, handles: Vec<Arc<str>>) {
        for h in &handles {
            if let Err(e) = self.send(h, AckKind::Progress, false).await {
                tracing::warn!(error = %e, "could not send in-progress; JetStream may redeliver a long-running message");
                return;
            }
        }
    }
}

impl Subscription for NatsSubscription {
    async fn fetch(&self, max: usize) -> Result<Vec<Delivery>, SourceError> {
        let me = &*self.inner;
        let max = max.max(1);
        let live = me.consumer.get().await?;
        let mut stream = live.conn.lock().await;
        let mut out = Vec::new();
        let mut held = Vec::new();
        let mut next = match tokio::time::timeout(me.opts.fetch_wait, stream.next()).await {
            Err(_) => return Ok(out),
            Ok(first) => Some(first),
        };
        let mut failure = None;
        while let Some(item) = next.take() {
            match item {
                Some(Ok(msg)) => {
                    if let Some((d, reply)) = me.delivery(msg) {
                        out.push(d);
                        held.push(reply);
                    }
                }
                Some(Err(e)) => failure = Some(e.to_string()),
                None => failure = Some("the pull stream ended".to_owned()),
            }
            if failure.is_none() && out.len() < max {
                next = stream.next().now_or_never();
            }
        }
        drop(stream);
        me.in_flight.insert_all(&held);
        if let Some(why) = failure {
            // Open a new pull stream (and consumer) on the next fetch.
            me.consumer.lost(live.generation, &why);
            if out.is_empty() {
                return Err(unavailable("pull stream", &why));
            }
        }
        Ok(out)
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), SourceError> {
        let reply = receipt_of(delivery)?;
        self.inner.in_flight.remove(reply);
        self.inner.send(reply, AckKind::Ack, false).await
    }

    async fn ack_many(&self, deliveries: &[&Delivery]) -> Result<(), SourceError> {
        let Some((last, rest)) = deliveries.split_last() else {
            return Ok(());
        };
        for d in rest {
            let reply = receipt_of(d)?;
            self.inner.in_flight.remove(reply);
            self.inner.send(reply, AckKind::Ack, false).await?;
        }
        let reply = receipt_of(last)?;
        self.inner.in_flight.remove(reply);
        self.inner.send(reply, AckKind::Ack, true).await
    }

    async fn nack(&self, delivery: &Delivery, delay: Duration) -> Result<(), SourceError> {
        let me = &*self.inner;
        let reply = receipt_of(delivery)?;
        if let Some(max) = me.opts.max_deliver
            && delivery.attempt >= max
        {
            let letter = DeadLetter {
                reason: format!(
                    "max_deliver ({max}) reached: JetStream would not deliver it again"
                ),
                attempts: delivery.attempt,
                handler: me.group.to_string(),
            };
            tracing::error!(message_id = %delivery.id, reason = %letter.reason, "dead-lettered by the source");
            return write_dead_letter(me, delivery, &letter).await;
        }
        me.in_flight.remove(reply);
        let kind = AckKind::Nak(Some(delay).filter(|d| !d.is_zero()));
        me.send(reply, kind, false).await
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery,
        letter: &DeadLetter,
    ) -> Result<(), SourceError> {
        write_dead_letter(&*self.inner, delivery, letter).await
    }

    /// Drops the pull stream for good (the client is the source's, shared);
    /// messages it pulled and idem did not take come back after `ack_wait`.
    async fn close(&self) {
        self.inner.consumer.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials_and_names_their_dots() {
        assert_eq!(display_url("nats://s3cr3t@h:4222"), "nats://***@h:4222");
        assert_eq!(display_url("nats://u:p@h:4222/x"), "nats://***@h:4222/x");
        assert_eq!(display_url("nats://h:4222"), "nats://h:4222");
        assert_eq!(safe_name("orders.created *>"), "orders_created___");
        assert_eq!(one_line("a\r\nb"), "a  b");
    }
}
