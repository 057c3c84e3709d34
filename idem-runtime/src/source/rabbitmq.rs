//! RabbitMQ as a source: one queue per topic, manual acks, prefetch
//! (`basic.qos`) tied to the loop's concurrency, `basic.ack` with `multiple`
//! where a batch allows it, `basic.nack` with requeue for redelivery, and
//! dead letters published under publisher confirms to a dead-letter exchange.
//!
//! Not a topology manager beyond what idem needs: by default it declares a
//! durable quorum queue per topic (so RabbitMQ counts deliveries in
//! `x-delivery-count`), a direct dead-letter exchange and a dead-letter queue
//! bound to it. Queues that already exist with other arguments are reported,
//! not changed: declare them yourself and turn declaring off with
//! [`declare(false)`](RabbitMq::declare).
//!
//! How idem's operations map to AMQP:
//!
//! | operation | AMQP |
//! |---|---|
//! | subscribe | a connection, a channel with `basic.qos(prefetch)`, `basic.consume` on the topic's queue (competing consumers share it) |
//! | content type | the `content_type` property, as the `content-type` header the codec step checks (kept as the property on a dead letter) |
//! | message id | the `message_id` property (empty when the producer set none: `key = message_id` then dead-letters it as a missing key) |
//! | attempt | `x-delivery-count + 1` (quorum queues); on other queues 2 when `redelivered`, else 1 |
//! | ack | `basic.ack(tag)` |
//! | batch ack | one `basic.ack(tag, multiple)` for the acked tags that are the oldest unsettled ones of the channel, single acks for the rest |
//! | nack(delay) | the message is held for `delay`, then `basic.nack(tag, requeue)` |
//! | close (shutdown) | `basic.cancel`, its `cancel-ok` awaited, then `channel.close` of both channels, then `connection.close` |
//! | dead letter | `basic.publish` to the dead-letter exchange (routing key: the dead-letter queue), wait for the confirm, then `basic.ack` |

use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind};

use super::plumbing::{
    self, Connector, DeadLetterSink, Header, Live, Reconnecting, write_dead_letter,
};
use super::{DeadLetter, SourceError, SubscribeSpec, Subscription};
use crate::delivery::{Delivery, Headers, Receipt};
use crate::handler::Backoff;
use crate::redact::RedactedUrl;

const NAME: &str = "rabbitmq";

/// The environment variable [`RabbitMq::from_env`] reads.
pub const URL_ENV: &str = "AMQP_URL";
/// The URL used when [`URL_ENV`] is unset.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The longest AMQP short string (queue, exchange, consumer tag, header name).
const MAX_NAME: usize = 255;

/// How long a graceful close waits for the broker's confirmations.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The header quorum queues count returned deliveries in.
const DELIVERY_COUNT: &str = "x-delivery-count";

/// The header the AMQP `content_type` property becomes on a [`Delivery`]
/// (what the codec step checks), and is taken from on a dead letter.
const CONTENT_TYPE: &str = "content-type";

/// [`CONTENT_TYPE`], allocated once rather than per message.
static CONTENT_TYPE_NAME: std::sync::LazyLock<Arc<str>> =
    std::sync::LazyLock::new(|| Arc::from(CONTENT_TYPE));

/// The kind of queue idem declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    /// Replicated, and counts deliveries (`x-delivery-count`). The default.
    #[default]
    Quorum,
    /// A classic queue: attempts are only known as "first" or "redelivered".
    Classic,
}

#[derive(Debug, Clone)]
struct Options {
    declare: bool,
    queue_type: QueueType,
    dead_letter_exchange: Arc<str>,
    fetch_wait: Duration,
    reconnect: Backoff,
}

/// RabbitMQ source: competing consumers on one queue per topic.
///
/// ```no_run
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use idem_runtime::source::rabbitmq::RabbitMq;
///
/// // AMQP_URL, default amqp://guest:guest@127.0.0.1:5672/%2f
/// let source = RabbitMq::from_env()?.dead_letter_exchange("orders.dlx");
/// source.ping().await?;
/// // idem_runtime::Runtime::builder(source).store(…).build()?.run_until(…).await;
/// # Ok(()) }
/// ```
pub struct RabbitMq {
    url: Arc<str>,
    opts: Options,
}

impl fmt::Debug for RabbitMq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMq")
            .field("url", &RedactedUrl(&self.url))
            .field("declare", &self.opts.declare)
            .field("queue_type", &self.opts.queue_type)
            .field("dead_letter_exchange", &self.opts.dead_letter_exchange)
            .finish_non_exhaustive()
    }
}

impl RabbitMq {
    /// A source for the broker at `url`
    /// (`amqp://user:password@host:port/vhost`, vhost `/` written `%2f`).
    /// Connects lazily, once per subscription.
    pub fn new(url: &str) -> Result<Self, SourceError> {
        url.parse::<lapin::uri::AMQPUri>()
            .map_err(|e| SourceError::Config {
                source_name: NAME,
                message: format!(
                    "invalid AMQP URL {}: {}; expected amqp://user:password@host:5672/%2f",
                    RedactedUrl(url),
                    plumbing::redacted(&e, url)
                ),
            })?;
        Ok(RabbitMq {
            url: url.into(),
            opts: Options {
                declare: true,
                queue_type: QueueType::Quorum,
                dead_letter_exchange: "idem.dead-letter".into(),
                fetch_wait: Duration::from_secs(1),
                reconnect: plumbing::RECONNECT_BACKOFF,
            },
        })
    }

    /// A source for the URL in `AMQP_URL` (default
    /// `amqp://guest:guest@127.0.0.1:5672/%2f`).
    pub fn from_env() -> Result<Self, SourceError> {
        Self::new(&plumbing::url_from_env(URL_ENV, DEFAULT_URL))
    }

    /// Whether idem declares the topic's queue, the dead-letter exchange and
    /// the dead-letter queue (default true). Off: they must exist.
    pub fn declare(mut self, declare: bool) -> Self {
        self.opts.declare = declare;
        self
    }

    /// The kind of queue idem declares (default [`QueueType::Quorum`]).
    pub fn queue_type(mut self, queue_type: QueueType) -> Self {
        self.opts.queue_type = queue_type;
        self
    }

    /// The exchange dead letters are published to (default
    /// `idem.dead-letter`, a direct exchange; the routing key is the
    /// dead-letter queue's name). `""` publishes through the default
    /// exchange straight to the dead-letter queue.
    pub fn dead_letter_exchange(mut self, exchange: impl Into<String>) -> Self {
        self.opts.dead_letter_exchange = exchange.into().into();
        self
    }

    /// How long one fetch waits for deliveries before returning an empty
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

    /// Checks that the broker accepts a connection, with an error that names the fix.
    pub async fn ping(&self) -> Result<(), SourceError> {
        let conn = connect(&self.url).await?;
        let _ = conn.close(200, "OK".into()).await;
        Ok(())
    }
}

async fn connect(url: &str) -> Result<Connection, SourceError> {
    let props = ConnectionProperties::default().with_connection_name("idem".into());
    Connection::connect(url, props)
        .await
        .map_err(|e| SourceError::Unavailable {
            source_name: NAME,
            message: format!(
                "cannot connect to {}: {}; is RabbitMQ running there, with these credentials? (set {URL_ENV} to its URL)",
                RedactedUrl(url),
                plumbing::redacted(&e, url)
            ),
        })
}

fn unavailable(what: &str, e: &dyn fmt::Display) -> SourceError {
    plumbing::unavailable(NAME, what, e)
}

/// A declaration the broker refused: retrying the same will not help.
fn refused(what: &str, e: &lapin::Error) -> SourceError {
    let text = e.to_string();
    let fix = if text.contains("PRECONDITION_FAILED") {
        "it exists with other arguments: delete it, or declare it yourself and use declare(false)"
    } else if text.contains("ACCESS_REFUSED") {
        "grant the user configure/write/read permissions on it"
    } else if text.contains("NOT_FOUND") {
        "create it, or use declare(true)"
    } else {
        return unavailable(what, e);
    };
    SourceError::Refused {
        source_name: NAME,
        message: format!("{what}: {text}; {fix}"),
    }
}

/// One subscription's connection: a consuming channel and a channel in
/// confirm mode for dead letters.
struct Session {
    connection: Connection,
    channel: Channel,
    publisher: Channel,
    consumer: tokio::sync::Mutex<Consumer>,
    /// Delivery tags handed out and not settled yet. Settling happens under
    /// this lock, so a `multiple` ack never overtakes a single one.
    unsettled: tokio::sync::Mutex<BTreeSet<u64>>,
    /// Set once [`Session::close`] ran (or began): dropping it then does nothing more.
    closed: std::sync::atomic::AtomicBool,
}

/// Closes a session in order: `basic.cancel` first and its `cancel-ok`
/// awaited, then the channels, then (when the caller owns it) the
/// connection, so nothing of the session is still talking to the broker
/// when this returns.
///
/// Dropping lapin's `Consumer` instead only queues the cancel: if the broker
/// cancels the consumer itself meanwhile (its queue deleted, as
/// `bench_brokers` does right after a run), lapin forgets the reply it was
/// waiting for, takes the `cancel-ok` that follows for a protocol violation
/// (`AMQP hard error: UNEXPECTED-FRAME: unexpected basic cancel-ok received
/// on channel 1, was awaiting for None`), logs it as an error and drops the
/// connection. `tests/rabbitmq.rs` reproduces it.
async fn close_in_order(
    channel: &Channel,
    publisher: &Channel,
    tag: ShortString,
    connection: Option<&Connection>,
) -> Result<(), lapin::Error> {
    channel
        .basic_cancel(tag, BasicCancelOptions { nowait: false })
        .await?;
    publisher.close(200, "OK".into()).await?;
    channel.close(200, "OK".into()).await?;
    if let Some(c) = connection {
        c.close(200, "OK".into()).await?;
    }
    Ok(())
}

impl Session {
    /// Stops the consumer and closes everything, gracefully (see
    /// [`close_in_order`]). Deliveries not acked yet go back to the queue.
    async fn close(&self) {
        use std::sync::atomic::Ordering;
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let tag = self.consumer.lock().await.tag();
        let closing = close_in_order(&self.channel, &self.publisher, tag, Some(&self.connection));
        match tokio::time::timeout(CLOSE_TIMEOUT, closing).await {
            Ok(Ok(())) => {}
            // The connection is gone already: the broker requeued everything.
            Ok(Err(e)) => tracing::debug!(source = NAME, error = %e, "closing the session"),
            Err(_) => tracing::warn!(
                source = NAME,
                timeout = ?CLOSE_TIMEOUT,
                "the broker did not confirm the close in time; dropping the connection (it requeues what was unacked)"
            ),
        }
    }
}

impl Drop for Session {
    /// A session dropped without [`Session::close`] (a lost connection, an
    /// aborted runtime): the same ordered close, in a task of its own. The
    /// clones it holds keep the connection open until its channels closed.
    fn drop(&mut self) {
        if *self.closed.get_mut() || !self.connection.status().connected() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (channel, publisher) = (self.channel.clone(), self.publisher.clone());
        let consumer = self.consumer.get_mut().clone();
        runtime.spawn(async move {
            if let Err(e) = close_in_order(&channel, &publisher, consumer.tag(), None).await {
                tracing::debug!(source = NAME, error = %e, "closing a dropped session");
            }
            drop(consumer);
        });
    }
}

struct SessionConnector {
    url: Arc<str>,
    queue: Arc<str>,
    dead_letter: Arc<str>,
    tag: String,
    prefetch: u16,
    opts: Options,
}

impl SessionConnector {
    fn queue_args(&self, dead_letter_to: Option<&str>) -> FieldTable {
        let mut args = FieldTable::default();
        if self.opts.queue_type == QueueType::Quorum {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(LongString::from("quorum")),
            );
        }
        if let Some(dlq) = dead_letter_to {
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(LongString::from(&*self.opts.dead_letter_exchange)),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(LongString::from(dlq)),
            );
        }
        args
    }

    async fn declare(&self, ch: &Channel) -> Result<(), SourceError> {
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let dlx = &*self.opts.dead_letter_exchange;
        if !dlx.is_empty() {
            ch.exchange_declare(
                dlx.into(),
                ExchangeKind::Direct,
                ExchangeDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| refused(&format!("declaring exchange {dlx:?}"), &e))?;
        }
        ch.queue_declare((&*self.dead_letter).into(), durable, self.queue_args(None))
            .await
            .map_err(|e| refused(&format!("declaring queue {:?}", self.dead_letter), &e))?;
        if !dlx.is_empty() {
            ch.queue_bind(
                (&*self.dead_letter).into(),
                dlx.into(),
                (&*self.dead_letter).into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| refused(&format!("binding queue {:?}", self.dead_letter), &e))?;
        }
        // Messages the broker itself dead-letters (a quorum queue's
        // delivery-limit, a TTL) end in the same place.
        ch.queue_declare(
            (&*self.queue).into(),
            durable,
            self.queue_args(Some(&self.dead_letter)),
        )
        .await
        .map_err(|e| refused(&format!("declaring queue {:?}", self.queue), &e))?;
        Ok(())
    }
}

impl Connector for SessionConnector {
    type Conn = Arc<Session>;
    const SOURCE: &'static str = NAME;

    async fn connect(&self) -> Result<Arc<Session>, SourceError> {
        let connection = connect(&self.url).await?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| unavailable("open a channel", &e))?;
        if self.opts.declare {
            self.declare(&channel).await?;
        }
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| unavailable("basic.qos", &e))?;
        let consumer = channel
            .basic_consume(
                (&*self.queue).into(),
                self.tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| refused(&format!("consuming from queue {:?}", self.queue), &e))?;
        let publisher = connection
            .create_channel()
            .await
            .map_err(|e| unavailable("open the dead-letter channel", &e))?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| unavailable("confirm.select", &e))?;
        Ok(Arc::new(Session {
            connection,
            channel,
            publisher,
            consumer: tokio::sync::Mutex::new(consumer),
            unsettled: tokio::sync::Mutex::new(BTreeSet::new()),
            closed: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    async fn close(&self, session: Arc<Session>) {
        session.close().await;
    }
}

impl super::Source for RabbitMq {
    type Subscription = RabbitSubscription;

    async fn subscribe(&self, spec: SubscribeSpec<'_>) -> Result<RabbitSubscription, SourceError> {
        let dead_letter: Arc<str> = spec
            .dead_letter
            .map_or_else(|| format!("{}.dlq", spec.topic), str::to_owned)
            .into();
        // AMQP names are short strings: check them here rather than fail
        // (or panic in the client) on every reconnection.
        for (what, name) in [
            ("queue", spec.topic),
            ("dead-letter queue", &*dead_letter),
            ("dead-letter exchange", &*self.opts.dead_letter_exchange),
        ] {
            if name.len() > MAX_NAME {
                return Err(SourceError::Config {
                    source_name: NAME,
                    message: format!(
                        "{what} name {name:?} is {} bytes; AMQP allows {MAX_NAME}: use a shorter topic or dead_letter name",
                        name.len()
                    ),
                });
            }
        }
        let group: String = spec.group.chars().take(200).collect();
        let session = Reconnecting::new(
            SessionConnector {
                url: self.url.clone(),
                queue: spec.topic.into(),
                dead_letter: dead_letter.clone(),
                tag: format!("idem-{group}-{:08x}", fastrand::u32(..)),
                prefetch: u16::try_from(spec.prefetch.max(1)).unwrap_or(u16::MAX),
                opts: self.opts.clone(),
            },
            self.opts.reconnect,
        );
        // Connect now, so a misconfiguration shows at startup.
        session.get().await?;
        Ok(RabbitSubscription {
            inner: Arc::new(SubInner {
                topic: spec.topic.into(),
                dead_letter,
                session,
                opts: self.opts.clone(),
            }),
        })
    }
}

/// One handler's consumer on its topic's queue (see the [module docs](self)).
pub struct RabbitSubscription {
    inner: Arc<SubInner>,
}

impl fmt::Debug for RabbitSubscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitSubscription")
            .field("queue", &self.inner.topic)
            .field("dead_letter", &self.inner.dead_letter)
            .finish_non_exhaustive()
    }
}

struct SubInner {
    topic: Arc<str>,
    dead_letter: Arc<str>,
    session: Reconnecting<SessionConnector>,
    opts: Options,
}

/// Renders an AMQP header value as bytes (numbers and flags as text).
fn value_bytes(v: &AMQPValue) -> Vec<u8> {
    match v {
        AMQPValue::LongString(s) => s.as_bytes().to_vec(),
        AMQPValue::ShortString(s) => s.as_str().as_bytes().to_vec(),
        AMQPValue::ByteArray(b) => b.as_slice().to_vec(),
        AMQPValue::Boolean(b) => b.to_string().into_bytes(),
        AMQPValue::ShortShortInt(n) => n.to_string().into_bytes(),
        AMQPValue::ShortShortUInt(n) => n.to_string().into_bytes(),
        AMQPValue::ShortInt(n) => n.to_string().into_bytes(),
        AMQPValue::ShortUInt(n) => n.to_string().into_bytes(),
        AMQPValue::LongInt(n) => n.to_string().into_bytes(),
        AMQPValue::LongUInt(n) => n.to_string().into_bytes(),
        AMQPValue::LongLongInt(n) => n.to_string().into_bytes(),
        AMQPValue::Timestamp(n) => n.to_string().into_bytes(),
        AMQPValue::Float(n) => n.to_string().into_bytes(),
        AMQPValue::Double(n) => n.to_string().into_bytes(),
        AMQPValue::Void => Vec::new(),
        other => format!("{other:?}").into_bytes(),
    }
}

fn value_u32(v: &AMQPValue) -> Option<u32> {
    let n: i128 = match v {
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        AMQPValue::Timestamp(n) => (*n).into(),
        _ => return None,
    };
    u32::try_from(n).ok()
}

/// How to ack `tags` on a channel whose unsettled tags are `unsettled`: one
/// `basic.ack(tag, multiple)` for the oldest unsettled tags when they are all
/// in `tags` (`multiple` would ack any unsettled tag below it, so only that
/// prefix qualifies), single acks for the rest. Tags no longer unsettled are
/// left out: acking a tag twice closes the channel. Removes what it plans
/// from `unsettled`.
fn plan_acks(
    unsettled: &mut BTreeSet<u64>,
    tags: &BTreeSet<u64>,
) -> (Option<(u64, bool)>, Vec<u64>) {
    let mut prefix = 0usize;
    let mut upto = None;
    for t in unsettled.iter() {
        if !tags.contains(t) {
            break;
        }
        upto = Some(*t);
        prefix += 1;
    }
    let mut singles = Vec::new();
    for t in tags {
        if unsettled.remove(t) && upto.is_none_or(|u| *t > u) {
            singles.push(*t);
        }
    }
    (upto.map(|u| (u, prefix > 1)), singles)
}

/// The receipt of a delivery: the connection generation and the delivery tag.
fn receipt_of(d: &Delivery) -> Result<(u64, u64), SourceError> {
    d.receipt
        .as_pair()
        .and_then(|(g, t)| Some((u64::try_from(g).ok()?, u64::try_from(t).ok()?)))
        .ok_or_else(|| SourceError::Refused {
            source_name: NAME,
            message: format!(
                "delivery {} carries no AMQP delivery tag; it was not fetched from this source",
                d.id
            ),
        })
}

impl SubInner {
    fn delivery(&self, generation: u64, m: lapin::message::Delivery) -> Delivery {
        let props = &m.properties;
        let mut headers = Headers::default();
        let mut count = None;
        if let Some(table) = props.headers() {
            for (k, v) in table.inner() {
                if k.as_str() == DELIVERY_COUNT {
                    count = value_u32(v);
                }
                headers.insert(k.as_str(), value_bytes(v));
            }
        }
        // The property, not a header, is where AMQP producers say what the
        // payload is; it wins over a header of the same name.
        if let Some(content_type) = props.content_type() {
            headers.insert(CONTENT_TYPE_NAME.clone(), content_type.as_str());
        }
        let attempt = match count {
            Some(c) => c.saturating_add(1),
            None if m.redelivered => 2,
            None => 1,
        };
        let id: Arc<str> = props
            .message_id()
            .as_ref()
            .map_or_else(|| Arc::from(""), |s| Arc::from(s.as_str()));
        Delivery {
            id,
            topic: self.topic.clone(),
            payload: m.data.into(),
            headers,
            ordering_key: None,
            attempt,
            receipt: Receipt::pair(generation as i64, m.delivery_tag as i64),
        }
    }

    /// The live session a receipt belongs to, or an error when its channel
    /// is gone (the broker already put the message back).
    fn session_of(&self, generation: u64) -> Result<Live<Arc<Session>>, SourceError> {
        match self.session.current() {
            Some(live) if live.generation == generation => Ok(live),
            _ => Err(unavailable(
                "settle",
                &"the channel this message came on is closed; RabbitMQ requeued it and redelivers it",
            )),
        }
    }

    fn lost(&self, live: &Live<Arc<Session>>, e: &lapin::Error) -> SourceError {
        let err = unavailable(
            "channel",
            &plumbing::redacted(e, &self.session.connector().url),
        );
        self.session.lost(live.generation, &err);
        err
    }

    async fn nack_now(&self, live: &Live<Arc<Session>>, tag: u64) -> Result<(), SourceError> {
        let mut unsettled = live.conn.unsettled.lock().await;
        if !unsettled.remove(&tag) {
            return Ok(());
        }
        live.conn
            .channel
            .basic_nack(
                tag,
                BasicNackOptions {
                    multiple: false,
                    requeue: true,
                },
            )
            .await
            .map_err(|e| self.lost(live, &e))
    }
}

impl DeadLetterSink for SubInner {
    fn reserved(&self, name: &str) -> bool {
        // The broker's count, and the property the content type travels in.
        name.eq_ignore_ascii_case(DELIVERY_COUNT) || name.eq_ignore_ascii_case(CONTENT_TYPE)
    }

    /// `basic.publish` to the dead-letter exchange, the confirm awaited,
    /// then `basic.ack` of the original.
    async fn publish_and_settle(
        &self,
        d: &Delivery,
        headers: Vec<Header<'_>>,
    ) -> Result<(), SourceError> {
        let (generation, tag) = receipt_of(d)?;
        let live = self.session_of(generation)?;
        let mut table = FieldTable::default();
        for (k, v) in headers {
            if let Ok(name) = ShortString::try_new(k) {
                table.insert(name, AMQPValue::LongString(LongString::from(&*v)));
            }
        }
        let mut props = BasicProperties::default()
            .with_headers(table)
            .with_delivery_mode(2);
        if let Some(content_type) = d
            .header(CONTENT_TYPE)
            .and_then(|c| std::str::from_utf8(c).ok())
            .and_then(|c| ShortString::try_new(c).ok())
        {
            props = props.with_content_type(content_type);
        }
        if let Ok(id) = ShortString::try_new(&*d.id)
            && !d.id.is_empty()
        {
            props = props.with_message_id(id);
        }
        let exchange = &*self.opts.dead_letter_exchange;
        let confirm = live
            .conn
            .publisher
            .basic_publish(
                exchange.into(),
                (&*self.dead_letter).into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &d.payload,
                props,
            )
            .await
            .map_err(|e| self.lost(&live, &e))?
            .await
            .map_err(|e| self.lost(&live, &e))?;
        if !confirm.is_ack() || confirm.take_message().is_some() {
            return Err(SourceError::Refused {
                source_name: NAME,
                message: format!(
                    "the dead letter was not routed: exchange {exchange:?} has no queue bound with routing key {:?}; declare one, or use declare(true)",
                    self.dead_letter
                ),
            });
        }
        let mut unsettled = live.conn.unsettled.lock().await;
        unsettled.remove(&tag);
        live.conn
            .channel
            .basic_ack(tag, BasicAckOptions { multiple: false })
            .await
            .map_err(|e| self.lost(&live, &e))
    }
}

impl Subscription for RabbitSubscription {
    async fn fetch(&self, max: usize) -> Result<Vec<Delivery>, SourceError> {
        let me = &*self.inner;
        let max = max.max(1);
        let live = me.session.get().await?;
        let mut consumer = live.conn.consumer.lock().await;
        let mut out = Vec::new();
        let mut next = match tokio::time::timeout(me.opts.fetch_wait, consumer.next()).await {
            Err(_) => return Ok(out),
            Ok(first) => Some(first),
        };
        let mut failure = None;
        while let Some(item) = next.take() {
            match item {
                Some(Ok(m)) => out.push(me.delivery(live.generation, m)),
                Some(Err(e)) => failure = Some(plumbing::redacted(&e, &me.session.connector().url)),
                None => failure = Some("the broker cancelled the consumer".to_owned()),
            }
            if failure.is_none() && out.len() < max {
                next = consumer.next().now_or_never();
            }
        }
        drop(consumer);
        if !out.is_empty() {
            let mut unsettled = live.conn.unsettled.lock().await;
            for d in &out {
                if let Some((_, tag)) = d.receipt.as_pair() {
                    unsettled.insert(tag as u64);
                }
            }
        }
        if let Some(why) = failure {
            me.session.lost(live.generation, &why);
            // Deliveries of a dead channel cannot be acked: the broker requeues them.
            return Err(unavailable("consumer", &why));
        }
        Ok(out)
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), SourceError> {
        self.ack_many(&[delivery]).await
    }

    async fn ack_many(&self, deliveries: &[&Delivery]) -> Result<(), SourceError> {
        let me = &*self.inner;
        let Some(first) = deliveries.first() else {
            return Ok(());
        };
        let (generation, _) = receipt_of(first)?;
        let live = me.session_of(generation)?;
        let mut tags = BTreeSet::new();
        for d in deliveries {
            let (g, t) = receipt_of(d)?;
            if g == generation {
                tags.insert(t);
            }
        }
        let mut unsettled = live.conn.unsettled.lock().await;
        let (upto, singles) = plan_acks(&mut unsettled, &tags);
        let channel = &live.conn.channel;
        if let Some((u, multiple)) = upto {
            channel
                .basic_ack(u, BasicAckOptions { multiple })
                .await
                .map_err(|e| me.lost(&live, &e))?;
        }
        for t in singles {
            channel
                .basic_ack(t, BasicAckOptions { multiple: false })
                .await
                .map_err(|e| me.lost(&live, &e))?;
        }
        drop(unsettled);
        if deliveries.len() != tags.len() {
            return Err(unavailable(
                "ack",
                &"some deliveries came on a closed channel; RabbitMQ redelivers them",
            ));
        }
        Ok(())
    }

    async fn nack(&self, delivery: &Delivery, delay: Duration) -> Result<(), SourceError> {
        let me = &self.inner;
        let (generation, tag) = receipt_of(delivery)?;
        let live = me.session_of(generation)?;
        if delay.is_zero() {
            return me.nack_now(&live, tag).await;
        }
        // AMQP has no delayed requeue: hold the message, then requeue it.
        // If the subscription goes away first, its connection closes and the
        // broker requeues the message anyway.
        let inner: Weak<SubInner> = Arc::downgrade(me);
        drop(live);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let Some(me) = inner.upgrade() else { return };
            if let Ok(live) = me.session_of(generation)
                && let Err(e) = me.nack_now(&live, tag).await
            {
                tracing::warn!(error = %e, "delayed nack failed; the broker requeues the message when the channel closes");
            }
        });
        Ok(())
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery,
        letter: &DeadLetter,
    ) -> Result<(), SourceError> {
        write_dead_letter(&*self.inner, delivery, letter).await
    }

    async fn close(&self) {
        self.inner.session.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_render_as_bytes_and_counts_as_numbers() {
        assert_eq!(value_bytes(&AMQPValue::LongString("k".into())), b"k");
        assert_eq!(value_bytes(&AMQPValue::LongLongInt(-3)), b"-3");
        assert_eq!(value_u32(&AMQPValue::LongLongInt(4)), Some(4));
        assert_eq!(value_u32(&AMQPValue::LongLongInt(-4)), None);
        assert_eq!(value_u32(&AMQPValue::LongString("4".into())), None);
    }

    #[test]
    fn batch_acks_use_multiple_only_for_the_oldest_unsettled_tags() {
        let set = |v: &[u64]| v.iter().copied().collect::<BTreeSet<u64>>();
        let mut unsettled = set(&[1, 2, 3, 5, 6]);
        // 1 and 2 are the oldest: one multiple ack; 5 is behind the
        // unsettled 3, so it goes alone.
        assert_eq!(
            plan_acks(&mut unsettled, &set(&[1, 2, 5])),
            (Some((2, true)), vec![5])
        );
        assert_eq!(unsettled, set(&[3, 6]));
        // 6 alone, behind 3; 9 is not unsettled (already acked): left out.
        assert_eq!(plan_acks(&mut unsettled, &set(&[6, 9])), (None, vec![6]));
        // The oldest tag alone: a plain ack.
        assert_eq!(
            plan_acks(&mut unsettled, &set(&[3])),
            (Some((3, false)), vec![])
        );
        assert!(unsettled.is_empty());
    }

    #[tokio::test]
    async fn names_too_long_for_amqp_are_config_errors_not_panics() {
        use crate::source::Source;
        let source = RabbitMq::new("amqp://u:p@127.0.0.1:1/%2f").unwrap();
        let topic = "t".repeat(300);
        let e = source
            .subscribe(SubscribeSpec {
                topic: &topic,
                group: "g",
                dead_letter: None,
                prefetch: 1,
            })
            .await
            .unwrap_err();
        assert!(matches!(e, SourceError::Config { .. }), "{e}");
    }

    #[test]
    fn bad_urls_are_config_errors_without_the_password() {
        let e = RabbitMq::new("amqp://u:hunter2@host:notaport/%2f").unwrap_err();
        assert!(matches!(e, SourceError::Config { .. }), "{e}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
}
