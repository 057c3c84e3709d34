//! What a source hands the consumer loop: one delivery of one message.
//!
//! A [`Delivery`] is broker-neutral. Sources build it; key extractors and
//! handlers read it. It is not a place for broker-specific behaviour: the
//! [`Receipt`] is the only part a source needs back to ack or nack.

use std::fmt;
use std::sync::Arc;

/// One delivery of one message, as a source handed it over.
///
/// The same message can be delivered many times (that is why idem exists);
/// each delivery has its own [`Receipt`], while [`Delivery::id`] stays the
/// broker's id of the message.
#[derive(Clone)]
pub struct Delivery {
    /// The broker's id of the message (stream entry id, AMQP `message_id`,
    /// `topic/partition/offset`, …). Stable across redeliveries.
    pub id: Arc<str>,
    /// The topic, stream, queue or subject it came from.
    pub topic: Arc<str>,
    /// The raw payload bytes, decoded by the handler's payload type.
    pub payload: Arc<[u8]>,
    /// Headers (AMQP headers, Kafka record headers, NATS headers, …).
    pub headers: Headers,
    /// The broker's ordering key (Kafka record key, …), if any. Handlers with
    /// `ordered = true` run messages with equal ordering keys one after another.
    pub ordering_key: Option<Arc<str>>,
    /// How many times this message has been delivered, this time included
    /// (1 on the first delivery), as far as the broker knows.
    pub attempt: u32,
    /// What the source needs to ack, nack or dead-letter this delivery.
    pub receipt: Receipt,
}

impl Delivery {
    /// A delivery with an id, a topic and a payload; no headers, no ordering
    /// key, first attempt. Sources fill in the rest with the `with_*` methods.
    ///
    /// ```
    /// use idem_runtime::Delivery;
    /// let d = Delivery::new("m-1", "orders", br#"{"order_id":7}"#.to_vec())
    ///     .with_header("Idempotency-Key", "abc")
    ///     .with_ordering_key("customer-9");
    /// assert_eq!(d.header("idempotency-key"), Some(&b"abc"[..]));
    /// assert_eq!(d.attempt, 1);
    /// ```
    pub fn new(
        id: impl Into<Arc<str>>,
        topic: impl Into<Arc<str>>,
        payload: impl Into<Arc<[u8]>>,
    ) -> Self {
        Delivery {
            id: id.into(),
            topic: topic.into(),
            payload: payload.into(),
            headers: Headers::default(),
            ordering_key: None,
            attempt: 1,
            receipt: Receipt::none(),
        }
    }

    /// Adds a header.
    pub fn with_header(mut self, name: impl Into<Arc<str>>, value: impl AsRef<[u8]>) -> Self {
        self.headers.insert(name, value);
        self
    }

    /// Sets the ordering key.
    pub fn with_ordering_key(mut self, key: impl Into<Arc<str>>) -> Self {
        self.ordering_key = Some(key.into());
        self
    }

    /// Sets the attempt number (1 = first delivery).
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt.max(1);
        self
    }

    /// Sets the receipt the source needs back.
    pub fn with_receipt(mut self, receipt: Receipt) -> Self {
        self.receipt = receipt;
        self
    }

    /// The value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.get(name)
    }
}

impl fmt::Debug for Delivery {
    // The payload can be large and can hold personal data: show its size only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("id", &self.id)
            .field("topic", &self.topic)
            .field("payload_len", &self.payload.len())
            .field("headers", &self.headers)
            .field("ordering_key", &self.ordering_key)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

/// Message headers: a small list of name/value pairs; names compare
/// case-insensitively, values are bytes (not every broker promises UTF-8).
#[derive(Clone, Default)]
pub struct Headers(Vec<(Arc<str>, Arc<[u8]>)>);

impl Headers {
    /// Adds or replaces a header.
    pub fn insert(&mut self, name: impl Into<Arc<str>>, value: impl AsRef<[u8]>) {
        let name = name.into();
        let value: Arc<[u8]> = value.as_ref().into();
        match self
            .0
            .iter_mut()
            .find(|(n, _)| n.eq_ignore_ascii_case(&name))
        {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }

    /// The value of a header, by case-insensitive name.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| &**v)
    }

    /// All headers, in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.0.iter().map(|(n, v)| (&**n, &**v))
    }

    /// Number of headers.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no headers.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(n, v)| (n, String::from_utf8_lossy(v))))
            .finish()
    }
}

/// What a source needs back to settle a delivery: an opaque handle that only
/// the source that made it interprets (a delivery tag, a stream entry id, a
/// partition and offset, …).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Receipt(ReceiptRepr);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum ReceiptRepr {
    None,
    Number(u64),
    Pair(i64, i64),
    Text(Arc<str>),
}

impl Receipt {
    /// No receipt (a delivery made by hand, e.g. in a unit test).
    pub const fn none() -> Self {
        Receipt(ReceiptRepr::None)
    }
    /// A numeric receipt (AMQP delivery tag, in-memory sequence number).
    pub const fn number(n: u64) -> Self {
        Receipt(ReceiptRepr::Number(n))
    }
    /// A receipt of two numbers (partition and offset).
    pub const fn pair(a: i64, b: i64) -> Self {
        Receipt(ReceiptRepr::Pair(a, b))
    }
    /// A textual receipt (stream entry id, reply subject).
    pub fn text(s: impl Into<Arc<str>>) -> Self {
        Receipt(ReceiptRepr::Text(s.into()))
    }
    /// The number, if this is a numeric receipt.
    pub fn as_number(&self) -> Option<u64> {
        match self.0 {
            ReceiptRepr::Number(n) => Some(n),
            _ => None,
        }
    }
    /// The pair, if this is a two-number receipt.
    pub fn as_pair(&self) -> Option<(i64, i64)> {
        match self.0 {
            ReceiptRepr::Pair(a, b) => Some((a, b)),
            _ => None,
        }
    }
    /// The text, if this is a textual receipt.
    pub fn as_text(&self) -> Option<&str> {
        match &self.0 {
            ReceiptRepr::Text(s) => Some(s),
            _ => None,
        }
    }
}
