//! Payload codecs end to end through a real broker (NATS JetStream, whose
//! headers carry the producer's content type): MessagePack and Protocol
//! Buffers orders decoded by `codec = "msgpack"` / `codec = "protobuf"`
//! handlers, each effect once although the producer re-encodes its retry;
//! an undecodable payload and a payload of another content type are
//! dead-lettered once, with the codec and the payload type in the reason.
//! The same content-type check through RabbitMQ, whose content type is the
//! AMQP `content_type` property, not a header.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use idem::source::dead_letter_headers as dlh;
use idem::source::namespaced::Namespaced;
use idem::source::nats::{DEFAULT_URL, NatsJetStream, URL_ENV};
use idem::store::memory::MemoryStore;
use idem::{CancellationToken, Runtime, Source, idempotent};

static EFFECTS: Mutex<BTreeMap<(&'static str, String), u32>> = Mutex::new(BTreeMap::new());

fn apply(handler: &'static str, order_id: &str) {
    *EFFECTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry((handler, order_id.to_owned()))
        .or_default() += 1;
}

fn effects(handler: &str) -> BTreeMap<String, u32> {
    EFFECTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|((h, _), _)| *h == handler)
        .map(|((_, k), n)| (k.clone(), *n))
        .collect()
}

// --- MessagePack ---------------------------------------------------------------

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct PaymentCaptured {
    order_id: String,
    amount_cents: u64,
    currency: String,
}

#[idempotent(
    topic = "payments",
    key = "order_id",
    store = "memory",
    codec = "msgpack",
    name = "codec-msgpack"
)]
async fn capture(p: PaymentCaptured) -> Result<(), String> {
    apply("codec-msgpack", &p.order_id);
    Ok(())
}

/// The same handler for the RabbitMQ case (its own effects: the tests run
/// side by side).
#[idempotent(
    topic = "payments",
    key = "order_id",
    store = "memory",
    codec = "msgpack",
    name = "codec-msgpack-amqp"
)]
async fn capture_amqp(p: PaymentCaptured) -> Result<(), String> {
    apply("codec-msgpack-amqp", &p.order_id);
    Ok(())
}

// --- Protocol Buffers ------------------------------------------------------------

#[derive(Clone, PartialEq, prost::Message)]
struct ShipmentRequested {
    #[prost(string, tag = "1")]
    order_id: String,
    #[prost(string, tag = "2")]
    warehouse: String,
    #[prost(uint32, tag = "3")]
    parcels: u32,
}

#[idempotent(
    topic = "shipments",
    key = "order_id",
    store = "memory",
    codec = "protobuf",
    name = "codec-protobuf"
)]
async fn ship(s: ShipmentRequested) -> Result<(), String> {
    apply("codec-protobuf", &s.order_id);
    Ok(())
}

// --- the broker ---------------------------------------------------------------------

struct Nats {
    js: jetstream::Context,
    prefix: String,
}

impl Nats {
    async fn connect(test: &str) -> Nats {
        let url = std::env::var(URL_ENV).unwrap_or_else(|_| DEFAULT_URL.into());
        let client = async_nats::connect(url.as_str()).await.unwrap_or_else(|e| {
            panic!("NATS at {url} does not answer ({e}): start nats-server -js with ./scripts/services.sh or set {URL_ENV}")
        });
        Nats {
            js: jetstream::new(client),
            prefix: format!("codec-{test}-{:08x}.", fastrand::u32(..)),
        }
    }

    fn subject(&self, topic: &str) -> String {
        format!("{}{topic}", self.prefix)
    }

    async fn stream(&self, subject: &str) {
        self.js
            .get_or_create_stream(stream::Config {
                name: subject.replace(['.', '*', '>'], "_"),
                subjects: vec![subject.to_owned()],
                ..Default::default()
            })
            .await
            .expect("create stream");
    }

    async fn publish(&self, topic: &str, id: &str, content_type: &str, payload: Vec<u8>) {
        let subject = self.subject(topic);
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", id);
        headers.insert("content-type", content_type);
        self.js
            .publish_with_headers(subject, headers, payload.into())
            .await
            .expect("publish")
            .await
            .expect("publish ack");
    }

    /// The dead letters' payloads and reasons so far.
    async fn dead_letters(&self, topic: &str) -> Vec<(Vec<u8>, String)> {
        let subject = format!("{}.dlq", self.subject(topic));
        let mut out = Vec::new();
        // None yet: the source creates it when it subscribes.
        let Ok(name) = self.js.stream_by_subject(&subject).await else {
            return out;
        };
        let mut stream = self.js.get_stream(&name).await.expect("dlq stream");
        let state = stream.info().await.expect("stream info").state.clone();
        for seq in state.first_sequence..=state.last_sequence {
            if state.messages == 0 {
                break;
            }
            if let Ok(m) = stream.get_raw_message(seq).await {
                let reason = m
                    .headers
                    .get(dlh::REASON)
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default();
                out.push((m.payload.to_vec(), reason));
            }
        }
        out
    }

    async fn cleanup(&self, topic: &str) {
        let subject = self.subject(topic);
        for s in [subject.clone(), format!("{subject}.dlq")] {
            let _ = self.js.delete_stream(s.replace(['.', '*', '>'], "_")).await;
        }
    }
}

/// Runs `handler` until it has `applied` effects and `topic` has `dead`
/// dead letters, then stops it.
async fn run_until(nats: &Nats, handler: &str, topic: &str, applied: usize, dead: usize) {
    let source = Namespaced::new(
        NatsJetStream::from_env()
            .expect("NATS source")
            .fetch_wait(Duration::from_millis(100)),
        nats.prefix.clone(),
    );
    run_while(source, handler, async || {
        !(effects(handler).len() >= applied && nats.dead_letters(topic).await.len() >= dead)
    })
    .await;
}

/// Runs `handler` on `source` while `more` says so (asked every 20 ms, 30 s
/// at most), then stops it; returns once it shut down.
async fn run_while<S: Source>(source: S, handler: &str, mut more: impl AsyncFnMut() -> bool) {
    let rt = Runtime::builder(source)
        .store(MemoryStore::new())
        .handlers([handler])
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let watch = async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::time::Instant::now() < deadline && more().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
    };
    tokio::join!(rt.run(stop.clone()), watch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msgpack_orders_are_decoded_deduplicated_and_bad_ones_dead_lettered() {
    let nats = Nats::connect("msgpack").await;
    nats.stream(&nats.subject("payments")).await;
    let order = |id: &str, amount: u64| PaymentCaptured {
        order_id: id.into(),
        amount_cents: amount,
        currency: "EUR".into(),
    };
    for (i, id) in ["ord-1001", "ord-1002", "ord-1003"].iter().enumerate() {
        let bytes = rmp_serde::to_vec_named(&order(id, 1_000 + i as u64)).unwrap();
        nats.publish("payments", &format!("m-{i}"), "application/msgpack", bytes)
            .await;
    }
    // The producer's retry of ord-1002, encoded by another client library:
    // fields as an array instead of a map. Still the same order.
    let retry = rmp_serde::to_vec(&order("ord-1002", 1_001)).unwrap();
    nats.publish("payments", "m-retry", "application/x-msgpack", retry)
        .await;
    nats.publish(
        "payments",
        "m-garbled",
        "application/msgpack",
        vec![0xc1, 0xff, 0x00],
    )
    .await;
    let json = br#"{"order_id":"ord-1004","amount_cents":5,"currency":"EUR"}"#.to_vec();
    nats.publish("payments", "m-json", "application/json", json.clone())
        .await;

    run_until(&nats, "codec-msgpack", "payments", 3, 2).await;
    let letters = nats.dead_letters("payments").await;
    nats.cleanup("payments").await;

    let effects = effects("codec-msgpack");
    assert_eq!(effects.len(), 3, "{effects:?}");
    assert!(effects.values().all(|&n| n == 1), "{effects:?}");
    assert_eq!(letters.len(), 2, "{letters:?}");
    let reason_of = |payload: &[u8]| {
        letters
            .iter()
            .find(|(p, _)| p == payload)
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| panic!("{payload:?} is not in the dead letters: {letters:?}"))
    };
    let garbled = reason_of(&[0xc1, 0xff, 0x00]);
    assert!(garbled.starts_with("undecodable payload"), "{garbled}");
    assert!(garbled.contains("codec msgpack"), "{garbled}");
    assert!(garbled.contains("PaymentCaptured"), "{garbled}");
    let wrong = reason_of(&json);
    assert!(wrong.contains("wrong content type"), "{wrong}");
    assert!(wrong.contains("application/json"), "{wrong}");
    assert!(wrong.contains("codec msgpack"), "{wrong}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_orders_are_decoded_deduplicated_and_bad_ones_dead_lettered() {
    let nats = Nats::connect("protobuf").await;
    nats.stream(&nats.subject("shipments")).await;
    let shipment = |id: &str| ShipmentRequested {
        order_id: id.into(),
        warehouse: "DE-HAM-2".into(),
        parcels: 2,
    };
    for (i, id) in ["ord-2001", "ord-2002", "ord-2003"].iter().enumerate() {
        let bytes = prost::Message::encode_to_vec(&shipment(id));
        nats.publish(
            "shipments",
            &format!("s-{i}"),
            "application/x-protobuf",
            bytes,
        )
        .await;
    }
    // A retry of ord-2003, sent without a specific content type.
    let retry = prost::Message::encode_to_vec(&shipment("ord-2003"));
    nats.publish("shipments", "s-retry", "application/octet-stream", retry)
        .await;
    // A truncated message: a length-delimited field that claims 200 bytes.
    let truncated = vec![0x0a, 0xc8, 0x01, b'o', b'r', b'd'];
    nats.publish(
        "shipments",
        "s-truncated",
        "application/protobuf",
        truncated.clone(),
    )
    .await;
    let json = br#"{"order_id":"ord-2004"}"#.to_vec();
    nats.publish(
        "shipments",
        "s-json",
        "application/json; charset=utf-8",
        json.clone(),
    )
    .await;

    run_until(&nats, "codec-protobuf", "shipments", 3, 2).await;
    let letters = nats.dead_letters("shipments").await;
    nats.cleanup("shipments").await;

    let effects = effects("codec-protobuf");
    assert_eq!(effects.len(), 3, "{effects:?}");
    assert!(effects.values().all(|&n| n == 1), "{effects:?}");
    assert_eq!(letters.len(), 2, "{letters:?}");
    let reason_of = |payload: &[u8]| {
        letters
            .iter()
            .find(|(p, _)| p == payload)
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| panic!("{payload:?} is not in the dead letters: {letters:?}"))
    };
    let bad = reason_of(&truncated);
    assert!(bad.starts_with("undecodable payload"), "{bad}");
    assert!(bad.contains("codec protobuf"), "{bad}");
    assert!(bad.contains("ShipmentRequested"), "{bad}");
    let wrong = reason_of(&json);
    assert!(wrong.contains("wrong content type"), "{wrong}");
}

// --- RabbitMQ: the content type is the AMQP property ------------------------------

mod amqp {
    use super::*;
    use idem::source::rabbitmq::{DEFAULT_URL, RabbitMq, URL_ENV};
    use idem::source::{SubscribeSpec, Subscription as _};
    use lapin::options::QueueDeleteOptions;
    use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
    use lapin::types::{AMQPValue, ShortString};
    use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

    struct Rabbit {
        conn: Connection,
        ch: Channel,
        prefix: String,
    }

    impl Rabbit {
        async fn connect(test: &str) -> Rabbit {
            let url = std::env::var(URL_ENV).unwrap_or_else(|_| DEFAULT_URL.into());
            let conn = Connection::connect(&url, ConnectionProperties::default())
                .await
                .unwrap_or_else(|e| {
                    panic!("RabbitMQ at {url} does not answer ({e}): start it with ./scripts/services.sh or set {URL_ENV}")
                });
            let ch = conn.create_channel().await.expect("channel");
            ch.confirm_select(ConfirmSelectOptions::default())
                .await
                .expect("confirm.select");
            Rabbit {
                conn,
                ch,
                prefix: format!("codec-{test}-{:08x}.", fastrand::u32(..)),
            }
        }

        fn queue(&self, topic: &str) -> String {
            format!("{}{topic}", self.prefix)
        }

        /// Publishes to the queue (declared by the source).
        async fn publish(&self, topic: &str, id: &str, content_type: &str, payload: &[u8]) {
            let queue = self.queue(topic);
            let props = BasicProperties::default()
                .with_message_id(ShortString::from(id))
                .with_content_type(ShortString::from(content_type));
            let confirm = self
                .ch
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    payload,
                    props,
                )
                .await
                .expect("publish")
                .await
                .expect("confirm");
            assert!(
                confirm.is_ack() && confirm.take_message().is_none(),
                "publish not confirmed, or not routed to {queue}"
            );
        }

        /// Takes the dead letters off `<queue>.dlq`: payloads, reasons and content types.
        async fn dead_letters(&self, topic: &str) -> Vec<(Vec<u8>, String, String)> {
            let dlq = format!("{}.dlq", self.queue(topic));
            let mut out = Vec::new();
            // A channel of its own: until the source declared the queue,
            // basic.get fails and the broker closes the channel.
            let ch = self.conn.create_channel().await.expect("channel");
            while let Ok(Some(m)) = ch
                .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true })
                .await
            {
                let reason = match m
                    .properties
                    .headers()
                    .as_ref()
                    .and_then(|h| h.inner().get(dlh::REASON))
                {
                    Some(AMQPValue::LongString(s)) => {
                        String::from_utf8_lossy(s.as_bytes()).into_owned()
                    }
                    _ => String::new(),
                };
                let content_type = m
                    .properties
                    .content_type()
                    .as_ref()
                    .map(|c| c.to_string())
                    .unwrap_or_default();
                out.push((m.data.clone(), reason, content_type));
            }
            let _ = ch.close(200, "OK".into()).await;
            out
        }

        async fn cleanup(&self, topic: &str) {
            let queue = self.queue(topic);
            for q in [queue.clone(), format!("{queue}.dlq")] {
                let _ = self
                    .ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
            let _ = self.ch.close(200, "OK".into()).await;
            let _ = self.conn.close(200, "OK".into()).await;
        }
    }

    /// A msgpack handler on RabbitMQ: the message whose `content_type` is
    /// msgpack is processed, the one that says JSON is dead-lettered once,
    /// the reason naming the codec and the type (and the dead letter keeps
    /// the original content type).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn amqp_content_type_is_checked_against_the_codec() {
        let handler = "codec-msgpack-amqp";
        let rabbit = Rabbit::connect("amqp").await;
        let source = || {
            Namespaced::new(
                RabbitMq::from_env()
                    .expect("RabbitMQ source")
                    .fetch_wait(Duration::from_millis(100)),
                rabbit.prefix.clone(),
            )
        };
        // The source declares the queue and its dead letters its own way.
        source()
            .subscribe(SubscribeSpec {
                topic: "payments",
                group: handler,
                dead_letter: None,
                prefetch: 1,
            })
            .await
            .expect("declare the queues")
            .close()
            .await;
        let order = PaymentCaptured {
            order_id: "ord-3001".into(),
            amount_cents: 700,
            currency: "EUR".into(),
        };
        let msgpack = rmp_serde::to_vec_named(&order).unwrap();
        rabbit
            .publish("payments", "a-1", "application/msgpack", &msgpack)
            .await;
        let json = br#"{"order_id":"ord-3002","amount_cents":5,"currency":"EUR"}"#.to_vec();
        rabbit
            .publish("payments", "a-json", "application/json", &json)
            .await;

        let mut letters = Vec::new();
        run_while(source(), handler, async || {
            letters.extend(rabbit.dead_letters("payments").await);
            effects(handler).is_empty() || letters.is_empty()
        })
        .await;
        // The runtime closed its subscription: a second dead letter of the
        // same message would be in the queue by now.
        letters.extend(rabbit.dead_letters("payments").await);
        rabbit.cleanup("payments").await;

        let effects = effects(handler);
        assert_eq!(
            effects,
            BTreeMap::from([("ord-3001".to_owned(), 1)]),
            "the msgpack message is processed once, the JSON one never"
        );
        assert_eq!(letters.len(), 1, "dead-lettered once: {letters:?}");
        let (payload, reason, content_type) = &letters[0];
        assert_eq!(payload, &json);
        assert!(reason.contains("wrong content type"), "{reason}");
        assert!(reason.contains("application/json"), "{reason}");
        assert!(reason.contains("codec msgpack"), "{reason}");
        assert_eq!(content_type, "application/json");
    }
}
