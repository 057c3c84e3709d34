//! Payload codecs: how a delivery's bytes become the handler's payload type.
//!
//! Chosen per handler with `codec = "json" | "msgpack" | "protobuf" | path`
//! (JSON by default). A codec also names the content types it reads: when a
//! broker says what a message is (AMQP `content_type`, a `content-type`
//! header), a mismatch is dead-lettered with both named instead of being
//! decoded as garbage. Not here: what happens to an undecodable message (the
//! pipeline dead-letters it once, with the codec and the type in the reason).

use std::fmt;

/// Decodes payloads of type `P`.
///
/// Implement it for a format idem does not ship, and name it in the
/// attribute: `codec = my::Csv`.
///
/// ```
/// use idem_runtime::codec::{Codec, DecodeError};
///
/// /// One line of `id,amount` text.
/// struct Csv;
/// struct Row { id: String, amount: u64 }
///
/// impl Codec<Row> for Csv {
///     const NAME: &'static str = "csv";
///     const CONTENT_TYPES: &'static [&'static str] = &["text/csv"];
///     fn decode(bytes: &[u8]) -> Result<Row, DecodeError> {
///         let text = std::str::from_utf8(bytes).map_err(DecodeError::new)?;
///         let (id, amount) = text.trim().split_once(',').ok_or_else(|| DecodeError::msg("expected `id,amount`"))?;
///         Ok(Row { id: id.to_owned(), amount: amount.parse().map_err(DecodeError::new)? })
///     }
/// }
///
/// let row = Csv::decode(b"o-7,1250").unwrap();
/// assert_eq!((row.id.as_str(), row.amount), ("o-7", 1250));
/// assert!(Csv::decode(b"nonsense").is_err());
/// ```
#[diagnostic::on_unimplemented(
    message = "codec `{Self}` cannot decode `{P}`",
    label = "the payload type of this handler",
    note = "`codec = \"json\"` and `\"msgpack\"` need `#[derive(serde::Deserialize)]` on the payload, `\"protobuf\"` a `prost::Message`; a custom codec implements `idem::codec::Codec<{P}>`"
)]
pub trait Codec<P>: Send + Sync + 'static {
    /// The name in logs and dead-letter reasons (`"json"`).
    const NAME: &'static str;
    /// Content types this codec reads (compared without parameters and
    /// case-insensitively: `application/json; charset=utf-8` is
    /// `application/json`). Empty: any.
    const CONTENT_TYPES: &'static [&'static str];

    /// Decodes one payload.
    fn decode(bytes: &[u8]) -> Result<P, DecodeError>;

    /// Whether a delivery that says it is `content_type` is for this codec:
    /// one of [`CONTENT_TYPES`](Self::CONTENT_TYPES), or a type that says
    /// nothing about the format (`application/octet-stream`, `text/plain`,
    /// empty), which many producers send by default.
    fn accepts(content_type: &str) -> bool {
        let essence = content_type.split(';').next().unwrap_or("").trim();
        Self::CONTENT_TYPES.is_empty()
            || UNSPECIFIC.iter().any(|t| t.eq_ignore_ascii_case(essence))
            || Self::CONTENT_TYPES
                .iter()
                .any(|t| t.eq_ignore_ascii_case(essence))
    }
}

/// Content types that do not say what format the bytes are in.
const UNSPECIFIC: &[&str] = &[
    "",
    "application/octet-stream",
    "binary/octet-stream",
    "text/plain",
];

/// Why a payload could not be decoded.
#[derive(Debug)]
pub struct DecodeError(Box<dyn std::error::Error + Send + Sync>);

impl DecodeError {
    /// Wraps the decoder's own error.
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        DecodeError(Box::new(e))
    }

    /// An error from a message.
    pub fn msg(message: impl Into<String>) -> Self {
        DecodeError(message.into().into())
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for DecodeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// A payload type for the serde codecs (JSON, MessagePack): anything serde
/// can decode.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a message payload",
    label = "payload type must implement `serde::Deserialize`",
    note = "add `#[derive(serde::Deserialize)]` to `{Self}` (idem decodes payloads as JSON unless `codec = …` says otherwise)"
)]
pub trait Payload: serde::de::DeserializeOwned + Send + 'static {}
impl<T: serde::de::DeserializeOwned + Send + 'static> Payload for T {}

/// `codec = "json"`, the default: `serde_json`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl<P: Payload> Codec<P> for Json {
    const NAME: &'static str = "json";
    const CONTENT_TYPES: &'static [&'static str] = &["application/json", "text/json"];
    fn decode(bytes: &[u8]) -> Result<P, DecodeError> {
        serde_json::from_slice(bytes).map_err(DecodeError::new)
    }
}

/// `codec = "msgpack"` (feature `msgpack`): MessagePack through `rmp-serde`,
/// for payload types that implement `serde::Deserialize`. Structs may arrive
/// as maps (named fields, `rmp_serde::to_vec_named`) or as arrays (fields in
/// order, `rmp_serde::to_vec`).
///
/// ```
/// # #[derive(serde::Serialize)] struct Out { order_id: String, amount: u64 }
/// #[derive(serde::Deserialize, Debug, PartialEq)]
/// struct OrderPlaced { order_id: String, amount: u64 }
/// use idem_runtime::codec::{Codec, MsgPack};
/// let bytes = rmp_serde::to_vec_named(&Out { order_id: "o-7".into(), amount: 1250 }).unwrap();
/// let order: OrderPlaced = MsgPack::decode(&bytes).unwrap();
/// assert_eq!(order, OrderPlaced { order_id: "o-7".into(), amount: 1250 });
/// ```
#[cfg(feature = "msgpack")]
#[derive(Debug, Clone, Copy, Default)]
pub struct MsgPack;

#[cfg(feature = "msgpack")]
impl<P: Payload> Codec<P> for MsgPack {
    const NAME: &'static str = "msgpack";
    const CONTENT_TYPES: &'static [&'static str] = &[
        "application/msgpack",
        "application/x-msgpack",
        "application/vnd.msgpack",
    ];
    fn decode(bytes: &[u8]) -> Result<P, DecodeError> {
        rmp_serde::from_slice(bytes).map_err(DecodeError::new)
    }
}

/// `codec = "protobuf"` (feature `protobuf`): Protocol Buffers through
/// `prost`, for payload types that implement `prost::Message` (generated by
/// `prost-build`, or written with `#[derive(prost::Message)]`).
///
/// ```
/// #[derive(Clone, PartialEq, prost::Message)]
/// struct OrderPlaced {
///     #[prost(string, tag = "1")]
///     order_id: String,
///     #[prost(uint64, tag = "2")]
///     amount: u64,
/// }
/// use idem_runtime::codec::{Codec, Protobuf};
/// let bytes = prost::Message::encode_to_vec(&OrderPlaced { order_id: "o-7".into(), amount: 1250 });
/// let order: OrderPlaced = Protobuf::decode(&bytes).unwrap();
/// assert_eq!(order.order_id, "o-7");
/// assert!(<Protobuf as Codec<OrderPlaced>>::decode(b"\xff\xff").is_err());
/// ```
#[cfg(feature = "protobuf")]
#[derive(Debug, Clone, Copy, Default)]
pub struct Protobuf;

#[cfg(feature = "protobuf")]
impl<P: prost::Message + Default + Send + 'static> Codec<P> for Protobuf {
    const NAME: &'static str = "protobuf";
    const CONTENT_TYPES: &'static [&'static str] = &[
        "application/protobuf",
        "application/x-protobuf",
        "application/vnd.google.protobuf",
    ];
    fn decode(bytes: &[u8]) -> Result<P, DecodeError> {
        P::decode(bytes).map_err(DecodeError::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Order {
        #[allow(dead_code)]
        id: String,
    }

    #[test]
    fn content_types_compare_without_parameters_and_case() {
        assert!(<Json as Codec<Order>>::accepts(
            "application/json; charset=utf-8"
        ));
        assert!(<Json as Codec<Order>>::accepts("Application/JSON"));
        // Producers that say nothing about the format are not turned away.
        assert!(<Json as Codec<Order>>::accepts("application/octet-stream"));
        assert!(<Json as Codec<Order>>::accepts(""));
        assert!(!<Json as Codec<Order>>::accepts("application/x-protobuf"));
    }
}
