//! The producer side of the broker examples: publish orders, read the dead
//! letters back, delete what a run created. One small trait, one impl per
//! broker (each behind its cargo feature); the consumer side is idem's source.
//!
//! Loaded by the examples with `#[path = "support/producers.rs"] mod producers;`.
#![allow(dead_code, unused_imports, unreachable_pub, async_fn_in_trait)]

use std::error::Error;

/// A message to publish: the producer's message id and the payload.
pub struct Outgoing {
    pub id: String,
    pub payload: Vec<u8>,
}

/// A dead letter read back: the reason idem wrote, and its attempts.
pub struct DeadLetterSeen {
    pub id: String,
    pub reason: String,
    pub attempts: String,
}

type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// What an example needs from a broker besides idem's source.
pub trait Producer {
    /// Deletes `topic` and `<topic>.dlq` with their consumer state (Kafka
    /// then creates `topic` again, empty).
    async fn reset(&self, topic: &str) -> Result<()>;
    /// Deletes `topic` and `<topic>.dlq` with their consumer state, leaving
    /// nothing behind.
    async fn delete(&self, topic: &str) -> Result<()> {
        self.reset(topic).await
    }
    /// Whether [`reset`](Self::reset) leaves the topic in place, so that a
    /// consumer group joining after the publish still reads the backlog
    /// (Kafka: a new group starts at the earliest offset). Otherwise the
    /// topic is declared by subscribing once before publishing.
    fn creates_topic(&self) -> bool {
        false
    }
    /// Publishes in order, waiting for the broker to confirm.
    async fn publish(&self, topic: &str, messages: &[Outgoing]) -> Result<()>;
    /// The dead letters of `<topic>.dlq`.
    async fn dead_letters(&self, topic: &str) -> Result<Vec<DeadLetterSeen>>;
}

const REASON: &str = idem::source::dead_letter_headers::REASON;
const ATTEMPTS: &str = idem::source::dead_letter_headers::ATTEMPTS;
const ORIGINAL_ID: &str = idem::source::dead_letter_headers::ORIGINAL_ID;

#[cfg(feature = "redis-streams")]
pub use redis_producer::RedisProducer;

#[cfg(feature = "redis-streams")]
mod redis_producer {
    use super::*;
    use redis::AsyncCommands;
    use redis::streams::StreamRangeReply;

    /// `XADD <topic> * payload <bytes> message-id <id>`.
    pub struct RedisProducer {
        conn: redis::aio::MultiplexedConnection,
    }

    impl RedisProducer {
        pub async fn connect(url: &str) -> Result<Self> {
            let conn = redis::Client::open(url)?
                .get_multiplexed_async_connection()
                .await?;
            Ok(RedisProducer { conn })
        }
    }

    impl Producer for RedisProducer {
        async fn reset(&self, topic: &str) -> Result<()> {
            let _: () = self
                .conn
                .clone()
                .del(&[topic.to_owned(), format!("{topic}.dlq")])
                .await?;
            Ok(())
        }

        async fn publish(&self, topic: &str, messages: &[Outgoing]) -> Result<()> {
            let mut conn = self.conn.clone();
            for chunk in messages.chunks(500) {
                let mut pipe = redis::pipe();
                for m in chunk {
                    pipe.cmd("XADD")
                        .arg(topic)
                        .arg("*")
                        .arg("payload")
                        .arg(&m.payload)
                        .arg("message-id")
                        .arg(&m.id)
                        .ignore();
                }
                let _: () = pipe.query_async(&mut conn).await?;
            }
            Ok(())
        }

        async fn dead_letters(&self, topic: &str) -> Result<Vec<DeadLetterSeen>> {
            let reply: StreamRangeReply =
                self.conn.clone().xrange_all(format!("{topic}.dlq")).await?;
            Ok(reply
                .ids
                .iter()
                .map(|e| {
                    let f = |k: &str| e.get::<String>(k).unwrap_or_default();
                    DeadLetterSeen {
                        id: f(ORIGINAL_ID),
                        reason: f(REASON),
                        attempts: f(ATTEMPTS),
                    }
                })
                .collect())
        }
    }
}

#[cfg(feature = "nats")]
pub use nats_producer::NatsProducer;

#[cfg(feature = "nats")]
mod nats_producer {
    use super::*;
    use async_nats::jetstream::{self, stream};

    /// JetStream publish with `Nats-Msg-Id`, into a stream named after the topic.
    pub struct NatsProducer {
        js: jetstream::Context,
    }

    impl NatsProducer {
        pub async fn connect(url: &str) -> Result<Self> {
            Ok(NatsProducer {
                js: jetstream::new(async_nats::connect(url).await?),
            })
        }
    }

    impl Producer for NatsProducer {
        async fn reset(&self, topic: &str) -> Result<()> {
            for subject in [topic.to_owned(), format!("{topic}.dlq")] {
                if let Ok(name) = self.js.stream_by_subject(subject).await {
                    self.js.delete_stream(name).await?;
                }
            }
            Ok(())
        }

        async fn publish(&self, topic: &str, messages: &[Outgoing]) -> Result<()> {
            // idem creates missing streams when it subscribes; the producer
            // may come first.
            if self.js.stream_by_subject(topic).await.is_err() {
                self.js
                    .get_or_create_stream(stream::Config {
                        name: topic.replace(['.', '*', '>'], "_"),
                        subjects: vec![topic.to_owned()],
                        ..Default::default()
                    })
                    .await?;
            }
            for chunk in messages.chunks(500) {
                let mut acks = Vec::with_capacity(chunk.len());
                for m in chunk {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Nats-Msg-Id", m.id.as_str());
                    acks.push(
                        self.js
                            .publish_with_headers(
                                topic.to_owned(),
                                headers,
                                m.payload.clone().into(),
                            )
                            .await?,
                    );
                }
                for ack in acks {
                    ack.await?;
                }
            }
            Ok(())
        }

        async fn dead_letters(&self, topic: &str) -> Result<Vec<DeadLetterSeen>> {
            let Ok(name) = self.js.stream_by_subject(format!("{topic}.dlq")).await else {
                return Ok(Vec::new());
            };
            let mut stream = self.js.get_stream(name).await?;
            let state = stream.info().await?.state.clone();
            let mut out = Vec::new();
            if state.messages == 0 {
                return Ok(out);
            }
            for seq in state.first_sequence..=state.last_sequence {
                let Ok(m) = stream.get_raw_message(seq).await else {
                    continue;
                };
                let h = |k: &str| {
                    m.headers
                        .get(k)
                        .map(|v| v.as_str().to_owned())
                        .unwrap_or_default()
                };
                out.push(DeadLetterSeen {
                    id: h(ORIGINAL_ID),
                    reason: h(REASON),
                    attempts: h(ATTEMPTS),
                });
            }
            Ok(out)
        }
    }
}

#[cfg(feature = "rabbitmq")]
pub use rabbit_producer::RabbitProducer;

#[cfg(feature = "rabbitmq")]
mod rabbit_producer {
    use super::*;
    use lapin::options::{
        BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions,
    };
    use lapin::types::{AMQPValue, FieldTable, ShortString};
    use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

    /// Publishes through the default exchange with `message_id`, under
    /// publisher confirms. The queue must exist: subscribe first (idem
    /// declares it).
    pub struct RabbitProducer {
        _conn: Connection,
        channel: Channel,
    }

    impl RabbitProducer {
        pub async fn connect(url: &str) -> Result<Self> {
            let conn = Connection::connect(url, ConnectionProperties::default()).await?;
            let channel = conn.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            Ok(RabbitProducer {
                _conn: conn,
                channel,
            })
        }
    }

    fn text(h: &FieldTable, k: &str) -> String {
        match h.inner().get(k) {
            Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
            _ => String::new(),
        }
    }

    impl Producer for RabbitProducer {
        async fn reset(&self, topic: &str) -> Result<()> {
            for q in [topic.to_owned(), format!("{topic}.dlq")] {
                self.channel
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await?;
            }
            Ok(())
        }

        async fn publish(&self, topic: &str, messages: &[Outgoing]) -> Result<()> {
            for chunk in messages.chunks(500) {
                let mut confirms = Vec::with_capacity(chunk.len());
                for m in chunk {
                    let props = BasicProperties::default()
                        .with_message_id(ShortString::from(m.id.as_str()))
                        .with_delivery_mode(2);
                    confirms.push(
                        self.channel
                            .basic_publish(
                                "".into(),
                                topic.into(),
                                BasicPublishOptions::default(),
                                &m.payload,
                                props,
                            )
                            .await?,
                    );
                }
                for c in confirms {
                    if !c.await?.is_ack() {
                        return Err("the broker refused a publish".into());
                    }
                }
            }
            Ok(())
        }

        async fn dead_letters(&self, topic: &str) -> Result<Vec<DeadLetterSeen>> {
            let mut out = Vec::new();
            let queue = format!("{topic}.dlq");
            while let Some(m) = self
                .channel
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
                .await?
            {
                let h = m.properties.headers().clone().unwrap_or_default();
                out.push(DeadLetterSeen {
                    id: text(&h, ORIGINAL_ID),
                    reason: text(&h, REASON),
                    attempts: text(&h, ATTEMPTS),
                });
            }
            Ok(out)
        }
    }
}

#[cfg(feature = "kafka")]
pub use kafka_producer::KafkaProducer;

#[cfg(feature = "kafka")]
mod kafka_producer {
    use super::*;
    use std::time::Duration;

    use idem::source::kafka::rdkafka::admin::{
        AdminClient, AdminOptions, NewTopic, TopicReplication,
    };
    use idem::source::kafka::rdkafka::client::DefaultClientContext;
    use idem::source::kafka::rdkafka::config::ClientConfig;
    use idem::source::kafka::rdkafka::consumer::{BaseConsumer, Consumer};
    use idem::source::kafka::rdkafka::message::{Header, Headers, Message, OwnedHeaders};
    use idem::source::kafka::rdkafka::producer::{FutureProducer, FutureRecord};
    use idem::source::kafka::rdkafka::types::RDKafkaErrorCode;
    use idem::source::kafka::rdkafka::{Offset, TopicPartitionList};

    /// Keyed records (key = the message id's order, header `message-id`) on a
    /// topic of 4 partitions, confirmed with `acks=all`.
    pub struct KafkaProducer {
        brokers: String,
        producer: FutureProducer,
    }

    impl KafkaProducer {
        pub fn connect(brokers: &str) -> Result<Self> {
            let producer = ClientConfig::new()
                .set("bootstrap.servers", brokers)
                .set("acks", "all")
                .create()?;
            Ok(KafkaProducer {
                brokers: brokers.to_owned(),
                producer,
            })
        }

        fn admin(&self) -> Result<AdminClient<DefaultClientContext>> {
            Ok(ClientConfig::new()
                .set("bootstrap.servers", &self.brokers)
                .create()?)
        }
    }

    impl Producer for KafkaProducer {
        async fn reset(&self, topic: &str) -> Result<()> {
            self.delete(topic).await?;
            let admin = self.admin()?;
            let new = NewTopic::new(topic, 4, TopicReplication::Fixed(-1));
            for r in admin.create_topics([&new], &AdminOptions::new()).await? {
                match r {
                    Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((name, e)) => return Err(format!("create topic {name}: {e}").into()),
                }
            }
            Ok(())
        }

        async fn delete(&self, topic: &str) -> Result<()> {
            let dlq = format!("{topic}.dlq");
            // Missing topics are fine; the results are per topic.
            let _ = self
                .admin()?
                .delete_topics(&[topic, dlq.as_str()], &AdminOptions::new())
                .await?;
            Ok(())
        }

        fn creates_topic(&self) -> bool {
            true
        }

        async fn publish(&self, topic: &str, messages: &[Outgoing]) -> Result<()> {
            for chunk in messages.chunks(500) {
                let mut sends = Vec::with_capacity(chunk.len());
                for m in chunk {
                    // The order id is the record key: one order stays on one partition.
                    let key = m.id.trim_end_matches("-retry");
                    let headers = OwnedHeaders::new().insert(Header {
                        key: "message-id",
                        value: Some(m.id.as_str()),
                    });
                    let record = FutureRecord::to(topic)
                        .payload(&m.payload)
                        .key(key)
                        .headers(headers);
                    sends.push(self.producer.send(record, Duration::from_secs(30)));
                }
                for s in sends {
                    s.await.map_err(|(e, _)| e)?;
                }
            }
            Ok(())
        }

        async fn dead_letters(&self, topic: &str) -> Result<Vec<DeadLetterSeen>> {
            let dlq = format!("{topic}.dlq");
            let brokers = self.brokers.clone();
            let read = move || -> std::result::Result<Vec<DeadLetterSeen>, String> {
                let c: BaseConsumer = ClientConfig::new()
                    .set("bootstrap.servers", &brokers)
                    .set("group.id", "idem-example-dlq-reader")
                    .create()
                    .map_err(|e| e.to_string())?;
                let md = c
                    .fetch_metadata(Some(&dlq), Duration::from_secs(10))
                    .map_err(|e| e.to_string())?;
                let mut tpl = TopicPartitionList::new();
                for t in md.topics().iter().filter(|t| t.name() == dlq) {
                    for p in t.partitions() {
                        tpl.add_partition_offset(&dlq, p.id(), Offset::Beginning)
                            .map_err(|e| e.to_string())?;
                    }
                }
                if tpl.count() == 0 {
                    return Ok(Vec::new());
                }
                c.assign(&tpl).map_err(|e| e.to_string())?;
                let mut out = Vec::new();
                // Dead letters are confirmed before the message settles: read
                // until the topic has been quiet for two seconds.
                let mut quiet = std::time::Instant::now();
                while quiet.elapsed() < Duration::from_secs(2) {
                    if let Some(m) = c.poll(Duration::from_millis(100)) {
                        let m = m.map_err(|e| e.to_string())?;
                        quiet = std::time::Instant::now();
                        let h = |k: &str| {
                            m.headers()
                                .and_then(|hs| hs.iter().find(|x| x.key == k).and_then(|x| x.value))
                                .map(|v| String::from_utf8_lossy(v).into_owned())
                                .unwrap_or_default()
                        };
                        out.push(DeadLetterSeen {
                            id: h(ORIGINAL_ID),
                            reason: h(REASON),
                            attempts: h(ATTEMPTS),
                        });
                    }
                }
                Ok(out)
            };
            Ok(tokio::task::spawn_blocking(read).await??)
        }
    }
}
