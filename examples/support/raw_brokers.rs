//! Hand-written consume-and-ack loops on the brokers' own client crates
//! (the ones idem uses: `redis`, `async-nats`, `lapin`), without idem: the
//! broker's own limit as a consumer sees it. `bench_brokers` runs them beside
//! idem and beside its hand loop through idem's adapters.
//!
//! One function per broker, the same shape: reset the topic, declare what
//! must exist before the publish, publish the backlog (not timed), then,
//! timed from the subscription to the last ack, fetch batches of up to
//! `batch`, decode each payload as JSON into `T`, ack the batch:
//!
//! | broker | subscribe | fetch | ack |
//! |---|---|---|---|
//! | Redis Streams | `XGROUP CREATE <topic> <group> 0` | `XREADGROUP … COUNT batch BLOCK 100 STREAMS <topic> >` | one `XACK` with the batch's ids |
//! | NATS JetStream | a durable pull consumer, `ack_policy = explicit`, filtered on the topic (as idem's) | `fetch` of up to `batch` (no wait: the backlog is there) | `+ACK` per message, fire and forget; the very last one is a double ack (the server confirms it, so every ack before it is in) |
//! | RabbitMQ | `basic.qos(batch)`, `basic.consume` on the topic's queue (durable quorum queue, as idem declares it) | up to `batch` deliveries of the consumer | one `basic.ack(last tag, multiple)` per batch |
//!
//! JetStream has no multi-ack on an explicit-ack consumer (`AckAll` needs an
//! `ack_policy = all` consumer, which is not the consumer idem runs), so the
//! NATS loop acks each message, as a plain hand-written consumer does.
//!
//! Loaded with `#[path = "support/raw_brokers.rs"] mod raw_brokers;`, beside
//! `producers.rs` (the publishing side).
#![allow(dead_code, unreachable_pub, async_fn_in_trait)]

use std::error::Error;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use crate::producers::{Outgoing, Producer};

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// A loop gives up after this long (as the bench's other stages do).
const DEADLINE: Duration = Duration::from_secs(600);
/// The consumer group / durable consumer / consumer tag of the raw loops.
const GROUP: &str = "bench-raw";

/// What one raw run consumes: the backlog, where it goes, the batch size.
pub struct Backlog<'a, P> {
    pub producer: &'a P,
    pub topic: &'a str,
    pub messages: &'a [Outgoing],
    pub batch: usize,
}

/// What differs per broker; [`run`] is the loop around it.
trait RawConsumer: Sized {
    const BROKER: &'static str;
    type Msg;
    /// Connects to the broker at `url`.
    async fn connect(url: &str) -> Result<Self>;
    /// What must exist before the publish (not timed).
    async fn declare(&mut self, _topic: &str) -> Result<()> {
        Ok(())
    }
    /// Starts consuming `topic` (timed).
    async fn subscribe(&mut self, topic: &str, batch: usize) -> Result<()>;
    /// Up to `max` messages (fewer, or none, when none come in time).
    async fn fetch(&mut self, max: usize) -> Result<Vec<Self::Msg>>;
    /// The payload, or `None` when the message carries none.
    fn payload(msg: &Self::Msg) -> Option<&[u8]>;
    /// Acks a fetched batch; `last`: the backlog's last batch.
    async fn ack(&mut self, batch: &[Self::Msg], last: bool) -> Result<()>;
    /// Stops consuming (after the timed part).
    async fn close(self) -> Result<()>;
}

/// Prefixes an error with the broker and the step it failed in.
fn context<C: RawConsumer>(step: &str) -> impl Fn(Box<dyn Error>) -> Box<dyn Error> + '_ {
    move |e| format!("{} raw loop: {step}: {e}", C::BROKER).into()
}

/// The loop the three brokers share; returns the time from the subscription
/// to the last ack.
async fn run<C: RawConsumer, T: DeserializeOwned>(
    url: &str,
    b: &Backlog<'_, impl Producer>,
) -> Result<Duration> {
    let n = b.messages.len();
    let mut c = C::connect(url).await.map_err(context::<C>("connect"))?;
    b.producer
        .reset(b.topic)
        .await
        .map_err(context::<C>("reset"))?;
    c.declare(b.topic).await.map_err(context::<C>("declare"))?;
    b.producer
        .publish(b.topic, b.messages)
        .await
        .map_err(context::<C>("publish"))?;
    let started = Instant::now();
    c.subscribe(b.topic, b.batch)
        .await
        .map_err(context::<C>("subscribe"))?;
    let mut settled = 0;
    while settled < n && started.elapsed() < DEADLINE {
        let batch = c
            .fetch(b.batch.min(n - settled))
            .await
            .map_err(context::<C>("fetch"))?;
        for m in &batch {
            let payload = C::payload(m)
                .ok_or_else(|| format!("{} raw loop: a message without payload", C::BROKER))?;
            serde_json::from_slice::<T>(payload)
                .map_err(|e| format!("{} raw loop: decode: {e}", C::BROKER))?;
        }
        settled += batch.len();
        c.ack(&batch, settled >= n)
            .await
            .map_err(context::<C>("ack"))?;
    }
    let elapsed = started.elapsed();
    c.close().await.map_err(context::<C>("close"))?;
    b.producer
        .reset(b.topic)
        .await
        .map_err(context::<C>("reset"))?;
    if settled < n {
        return Err(format!("{} raw loop: {settled} of {n} in {elapsed:?}", C::BROKER).into());
    }
    Ok(elapsed)
}

/// Redis Streams: `XREADGROUP` batches, one `XACK` per batch.
pub async fn redis<T: DeserializeOwned>(
    url: &str,
    backlog: &Backlog<'_, impl Producer>,
) -> Result<Duration> {
    run::<redis_raw::Consumer, T>(url, backlog).await
}

mod redis_raw {
    use super::*;
    use redis::AsyncCommands;
    use redis::Value;
    use redis::streams::{StreamId, StreamReadOptions, StreamReadReply};

    pub struct Consumer {
        conn: redis::aio::MultiplexedConnection,
        topic: String,
    }

    impl RawConsumer for Consumer {
        const BROKER: &'static str = "Redis Streams";
        type Msg = StreamId;

        async fn connect(url: &str) -> Result<Self> {
            let conn = redis::Client::open(url)?
                .get_multiplexed_async_connection()
                .await?;
            Ok(Consumer {
                conn,
                topic: String::new(),
            })
        }

        async fn subscribe(&mut self, topic: &str, _batch: usize) -> Result<()> {
            self.topic = topic.to_owned();
            let _: () = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(topic)
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut self.conn)
                .await?;
            Ok(())
        }

        async fn fetch(&mut self, max: usize) -> Result<Vec<StreamId>> {
            let opts = StreamReadOptions::default()
                .group(GROUP, "raw")
                .count(max)
                .block(100);
            let reply: Option<StreamReadReply> = self
                .conn
                .xread_options(&[self.topic.as_str()], &[">"], &opts)
                .await?;
            Ok(reply
                .into_iter()
                .flat_map(|r| r.keys)
                .flat_map(|k| k.ids)
                .collect())
        }

        fn payload(msg: &StreamId) -> Option<&[u8]> {
            match msg.map.get("payload") {
                Some(Value::BulkString(b)) => Some(b),
                _ => None,
            }
        }

        async fn ack(&mut self, batch: &[StreamId], _last: bool) -> Result<()> {
            if batch.is_empty() {
                return Ok(());
            }
            let ids: Vec<&str> = batch.iter().map(|m| m.id.as_str()).collect();
            let _: usize = self.conn.xack(&self.topic, GROUP, &ids).await?;
            Ok(())
        }

        async fn close(self) -> Result<()> {
            Ok(())
        }
    }
}

/// NATS JetStream: `fetch` batches from a durable pull consumer, `+ACK` each.
pub async fn nats<T: DeserializeOwned>(
    url: &str,
    backlog: &Backlog<'_, impl Producer>,
) -> Result<Duration> {
    run::<nats_raw::Consumer, T>(url, backlog).await
}

mod nats_raw {
    use super::*;
    use async_nats::jetstream::consumer::pull::Config;
    use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer};
    use async_nats::jetstream::{self, Message};
    use futures_util::StreamExt;

    /// async-nats' own error type (`Send + Sync`) as this module's.
    fn unsend(e: async_nats::Error) -> Box<dyn Error> {
        e
    }

    pub struct Consumer {
        js: jetstream::Context,
        consumer: Option<PullConsumer>,
    }

    impl RawConsumer for Consumer {
        const BROKER: &'static str = "NATS JetStream";
        type Msg = Message;

        async fn connect(url: &str) -> Result<Self> {
            Ok(Consumer {
                js: jetstream::new(async_nats::connect(url).await?),
                consumer: None,
            })
        }

        async fn subscribe(&mut self, topic: &str, _batch: usize) -> Result<()> {
            // The producer created the stream (as idem would have).
            let name = self.js.stream_by_subject(topic).await?;
            let stream = self.js.get_stream_no_info(&name).await?;
            let consumer = stream
                .get_or_create_consumer(
                    GROUP,
                    Config {
                        durable_name: Some(GROUP.into()),
                        ack_policy: AckPolicy::Explicit,
                        filter_subject: topic.into(),
                        deliver_policy: DeliverPolicy::All,
                        ..Default::default()
                    },
                )
                .await?;
            self.consumer = Some(consumer);
            Ok(())
        }

        async fn fetch(&mut self, max: usize) -> Result<Vec<Message>> {
            let consumer = self.consumer.as_ref().ok_or("fetch before subscribe")?;
            let mut batch = consumer.fetch().max_messages(max).messages().await?;
            let mut out = Vec::with_capacity(max);
            while let Some(m) = batch.next().await {
                out.push(m.map_err(unsend)?);
            }
            Ok(out)
        }

        fn payload(msg: &Message) -> Option<&[u8]> {
            Some(&msg.payload)
        }

        async fn ack(&mut self, batch: &[Message], last: bool) -> Result<()> {
            let Some((final_msg, rest)) = batch.split_last() else {
                return Ok(());
            };
            for m in rest {
                m.ack().await.map_err(unsend)?;
            }
            if last {
                final_msg.double_ack().await.map_err(unsend)?;
            } else {
                final_msg.ack().await.map_err(unsend)?;
            }
            Ok(())
        }

        async fn close(self) -> Result<()> {
            Ok(())
        }
    }
}

/// RabbitMQ: `basic.consume` with `basic.qos(batch)`, one
/// `basic.ack(multiple)` per batch.
pub async fn rabbitmq<T: DeserializeOwned>(
    url: &str,
    backlog: &Backlog<'_, impl Producer>,
) -> Result<Duration> {
    run::<rabbit_raw::Consumer, T>(url, backlog).await
}

mod rabbit_raw {
    use super::*;
    use futures_util::StreamExt;
    use lapin::message::Delivery;
    use lapin::options::{
        BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions,
        QueueDeclareOptions,
    };
    use lapin::types::{AMQPValue, FieldTable, LongString};
    use lapin::{Channel, Connection, ConnectionProperties};

    /// How long a fetch waits for the next delivery before it returns what
    /// it has.
    const WAIT: Duration = Duration::from_secs(1);

    pub struct Consumer {
        conn: Connection,
        channel: Channel,
        consumer: Option<lapin::Consumer>,
    }

    impl RawConsumer for Consumer {
        const BROKER: &'static str = "RabbitMQ";
        type Msg = Delivery;

        async fn connect(url: &str) -> Result<Self> {
            let conn = Connection::connect(url, ConnectionProperties::default()).await?;
            let channel = conn.create_channel().await?;
            Ok(Consumer {
                conn,
                channel,
                consumer: None,
            })
        }

        /// The queue idem declares for a topic: durable, quorum (the
        /// default exchange routes the publishes to it by name).
        async fn declare(&mut self, topic: &str) -> Result<()> {
            let mut args = FieldTable::default();
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(LongString::from("quorum")),
            );
            let durable = QueueDeclareOptions {
                durable: true,
                ..Default::default()
            };
            self.channel
                .queue_declare(topic.into(), durable, args)
                .await?;
            Ok(())
        }

        async fn subscribe(&mut self, topic: &str, batch: usize) -> Result<()> {
            let prefetch = u16::try_from(batch).map_err(|_| "batch above 65535")?;
            self.channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await?;
            let consumer = self
                .channel
                .basic_consume(
                    topic.into(),
                    GROUP.into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            self.consumer = Some(consumer);
            Ok(())
        }

        async fn fetch(&mut self, max: usize) -> Result<Vec<Delivery>> {
            let consumer = self.consumer.as_mut().ok_or("fetch before subscribe")?;
            let mut out = Vec::with_capacity(max);
            while out.len() < max {
                match tokio::time::timeout(WAIT, consumer.next()).await {
                    Err(_) => break,
                    Ok(None) => return Err("the broker cancelled the consumer".into()),
                    Ok(Some(d)) => out.push(d?),
                }
            }
            Ok(out)
        }

        fn payload(msg: &Delivery) -> Option<&[u8]> {
            Some(&msg.data)
        }

        async fn ack(&mut self, batch: &[Delivery], _last: bool) -> Result<()> {
            if let Some(d) = batch.last() {
                self.channel
                    .basic_ack(d.delivery_tag, BasicAckOptions { multiple: true })
                    .await?;
            }
            Ok(())
        }

        async fn close(self) -> Result<()> {
            self.channel
                .basic_cancel(GROUP.into(), BasicCancelOptions { nowait: false })
                .await?;
            self.channel.close(200, "OK".into()).await?;
            self.conn.close(200, "OK".into()).await?;
            Ok(())
        }
    }
}
