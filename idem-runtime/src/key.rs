//! Idempotency keys: what makes two deliveries "the same message" for a handler.
//!
//! A [`KeyExtractor`] turns a delivery and its decoded payload into a [`Key`].
//! The `key = …` argument of `#[idempotent]` picks a built-in extractor; users
//! write their own by implementing the trait (or passing a plain function).
//! This module does not decide what happens with a missing key: the consumer
//! loop dead-letters or rejects it, never hashes "nothing" into a key.

use std::fmt::{self, Write as _};

use crate::delivery::Delivery;
use crate::fingerprint::{Fingerprint, Fingerprinter};

/// The longest key accepted by default, in bytes. Longer keys are an error
/// (`KeyError::TooLong`), not truncated: truncation would merge distinct keys.
pub const DEFAULT_MAX_KEY_LEN: usize = 512;

/// An idempotency key: the identity of a message's effect within one handler.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(String);

impl Key {
    /// A key from one part. Fails on an empty part: an empty string is no
    /// identity, and two messages "without key" must never share a record.
    ///
    /// ```
    /// use idem_runtime::Key;
    /// assert_eq!(Key::new("order-7").unwrap().as_str(), "order-7");
    /// assert!(Key::new("").is_err());
    /// ```
    pub fn new(part: impl Into<String>) -> Result<Key, KeyError> {
        let s = part.into();
        if s.is_empty() {
            return Err(KeyError::Empty { what: "key".into() });
        }
        Ok(Key(s))
    }

    /// The key as text (as stored in the dedup store).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: keys are never empty (see [`Key::new`]).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Checks the key against a maximum length in bytes.
    pub fn check_len(self, max: usize) -> Result<Key, KeyError> {
        if self.0.len() > max {
            return Err(KeyError::TooLong {
                len: self.0.len(),
                max,
            });
        }
        Ok(self)
    }

    /// Joins the keys of a composite extractor. Each part is escaped so that
    /// `("a/b", "c")` and `("a", "b/c")` give different keys.
    pub fn composite<'a>(parts: impl IntoIterator<Item = &'a Key>) -> Key {
        let mut out = String::new();
        for (i, part) in parts.into_iter().enumerate() {
            if i > 0 {
                out.push('/');
            }
            for c in part.0.chars() {
                if c == '/' || c == '\\' {
                    out.push('\\');
                }
                out.push(c);
            }
        }
        Key(out)
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({:?})", self.0)
    }
}

/// Why no key could be extracted. Every variant sends the message to the
/// dead letters (or rejects it, per `on_missing_key`); none is ever replaced
/// by a default key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The field, header or id that holds the key is absent (`None`, no such header).
    #[error(
        "missing key: {what} is absent; the producer must set it (or choose another `key = …`)"
    )]
    Missing {
        /// What was looked for, e.g. `field customer.id` or `header Idempotency-Key`.
        what: String,
    },
    /// The key is present but empty.
    #[error("missing key: {what} is empty; an empty key cannot identify a message")]
    Empty {
        /// What was looked at.
        what: String,
    },
    /// The key is longer than the handler's maximum.
    #[error(
        "key too long: {len} bytes, the maximum is {max}; use a shorter business key or raise `max_key_len = …` on the handler"
    )]
    TooLong {
        /// Its length in bytes.
        len: usize,
        /// The maximum.
        max: usize,
    },
    /// The key is not valid text (a header with invalid UTF-8, …).
    #[error("invalid key: {what} is not valid UTF-8")]
    NotUtf8 {
        /// What was looked at.
        what: String,
    },
    /// A user extractor's own error.
    #[error("key extractor failed: {0}")]
    Custom(String),
}

/// Turns a delivery and its decoded payload into a [`Key`].
///
/// Implement it for your own key schemes; tuples of extractors compose into
/// a composite key, and any `Fn(&Delivery, &P) -> Result<Key, KeyError>` is an
/// extractor too.
///
/// ```
/// use idem_runtime::{Delivery, Key, KeyError, KeyExtractor};
///
/// struct TenantAndOrder;
/// struct Order { tenant: String, id: u64 }
///
/// impl KeyExtractor<Order> for TenantAndOrder {
///     fn extract(&self, _d: &Delivery, p: &Order) -> Result<Key, KeyError> {
///         Key::new(format!("{}:{}", p.tenant, p.id))
///     }
/// }
///
/// let d = Delivery::new("m-1", "orders", b"{}".to_vec());
/// let k = TenantAndOrder.extract(&d, &Order { tenant: "acme".into(), id: 7 }).unwrap();
/// assert_eq!(k.as_str(), "acme:7");
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot extract an idempotency key from `{P}`",
    label = "not a key extractor for `{P}`",
    note = "implement `idem::KeyExtractor<{P}>` for it, or pass a fn(&idem::Delivery, &{P}) -> Result<idem::Key, idem::KeyError>"
)]
pub trait KeyExtractor<P>: Send + Sync + 'static {
    /// Extracts the key.
    fn extract(&self, delivery: &Delivery, payload: &P) -> Result<Key, KeyError>;

    /// A fingerprint of the payload, compared with the one stored with a
    /// done key: a mismatch is a key conflict (dead-lettered). Default: none,
    /// so a done key is a duplicate whatever the payload. An extractor that
    /// normalises the key can normalise what it fingerprints the same way
    /// (see [`Fingerprint::of`](crate::fingerprint::Fingerprint::of)). The attribute's
    /// `fingerprint = [...]` takes precedence over this.
    fn fingerprint(&self, delivery: &Delivery, payload: &P) -> Option<Fingerprint> {
        let _ = (delivery, payload);
        None
    }
}

impl<P, F> KeyExtractor<P> for F
where
    F: Fn(&Delivery, &P) -> Result<Key, KeyError> + Send + Sync + 'static,
{
    fn extract(&self, delivery: &Delivery, payload: &P) -> Result<Key, KeyError> {
        self(delivery, payload)
    }
}

macro_rules! tuple_extractors {
    ($($name:ident $idx:tt),+) => {
        impl<P, $($name: KeyExtractor<P>),+> KeyExtractor<P> for ($($name,)+) {
            fn extract(&self, delivery: &Delivery, payload: &P) -> Result<Key, KeyError> {
                let parts = [$(self.$idx.extract(delivery, payload)?),+];
                Ok(Key::composite(&parts))
            }

            /// The parts' fingerprints combined, if any part has one.
            fn fingerprint(&self, delivery: &Delivery, payload: &P) -> Option<Fingerprint> {
                let parts = [$(self.$idx.fingerprint(delivery, payload)),+];
                if parts.iter().all(Option::is_none) {
                    return None;
                }
                let mut f = Fingerprinter::new();
                for part in parts {
                    f.bytes(&Fingerprint::stored(part).to_le_bytes());
                }
                Some(f.finish())
            }
        }
    };
}
tuple_extractors!(A 0);
tuple_extractors!(A 0, B 1);
tuple_extractors!(A 0, B 1, C 2);
tuple_extractors!(A 0, B 1, C 2, D 3);
tuple_extractors!(A 0, B 1, C 2, D 3, E 4);
tuple_extractors!(A 0, B 1, C 2, D 3, E 4, F 5);

/// `key = message_id`: the broker's message id.
///
/// Survives broker redelivery, but not a producer retry (a new message id
/// for the same business event); prefer a business key where there is one.
#[derive(Debug, Clone, Copy, Default)]
pub struct MessageId;

impl<P> KeyExtractor<P> for MessageId {
    fn extract(&self, delivery: &Delivery, _payload: &P) -> Result<Key, KeyError> {
        if delivery.id.is_empty() {
            return Err(KeyError::Empty {
                what: "the message id".into(),
            });
        }
        Ok(Key(delivery.id.to_string()))
    }
}

/// `key = header("Idempotency-Key")`: a header's value (UTF-8).
#[derive(Debug, Clone, Copy)]
pub struct Header(pub &'static str);

impl<P> KeyExtractor<P> for Header {
    fn extract(&self, delivery: &Delivery, _payload: &P) -> Result<Key, KeyError> {
        let what = || format!("header {}", self.0);
        let raw = delivery
            .header(self.0)
            .ok_or_else(|| KeyError::Missing { what: what() })?;
        let text = std::str::from_utf8(raw).map_err(|_| KeyError::NotUtf8 { what: what() })?;
        if text.is_empty() {
            return Err(KeyError::Empty { what: what() });
        }
        Ok(Key(text.to_owned()))
    }
}

/// `key = "field"`: a payload field, read by a function the macro generates.
/// `name` is the path as written (`customer.id`), for error messages.
pub struct Field<F> {
    /// The field path as written in the attribute.
    pub name: &'static str,
    /// Reads the field and renders it as a key part.
    pub read: F,
}

impl<P, F> KeyExtractor<P> for Field<F>
where
    F: Fn(&P, &mut String) -> Result<(), Absent> + Send + Sync + 'static,
{
    fn extract(&self, _delivery: &Delivery, payload: &P) -> Result<Key, KeyError> {
        let mut out = String::new();
        (self.read)(payload, &mut out).map_err(|Absent| KeyError::Missing {
            what: format!("field {}", self.name),
        })?;
        if out.is_empty() {
            return Err(KeyError::Empty {
                what: format!("field {}", self.name),
            });
        }
        Ok(Key(out))
    }
}

/// A key field whose value is absent (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Absent;

/// A value that can be (part of) an idempotency key: text and integers.
///
/// `Option<T>` is deliberately not a `KeyPart`: a key field that can be
/// absent needs an explicit `on_missing_key` (see [`OptionalKeyPart`]).
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be used as an idempotency key",
    label = "this key field has type `{Self}`",
    note = "key fields must be text or integers (String, &str, u64, i64, uuid as String, …); for `Option<T>` add `on_missing_key = \"dead_letter\"` or `\"reject\"`"
)]
pub trait KeyPart {
    /// Appends the key text.
    fn write_key(&self, out: &mut String);
}

impl KeyPart for str {
    fn write_key(&self, out: &mut String) {
        out.push_str(self);
    }
}
impl KeyPart for String {
    fn write_key(&self, out: &mut String) {
        out.push_str(self);
    }
}
impl KeyPart for std::sync::Arc<str> {
    fn write_key(&self, out: &mut String) {
        out.push_str(self);
    }
}
impl KeyPart for char {
    fn write_key(&self, out: &mut String) {
        out.push(*self);
    }
}
impl<T: KeyPart + ?Sized> KeyPart for &T {
    fn write_key(&self, out: &mut String) {
        (**self).write_key(out)
    }
}
impl<T: KeyPart + ?Sized> KeyPart for Box<T> {
    fn write_key(&self, out: &mut String) {
        (**self).write_key(out)
    }
}
macro_rules! int_key_parts {
    ($($t:ty),*) => {$(
        impl KeyPart for $t {
            fn write_key(&self, out: &mut String) {
                let _ = write!(out, "{self}");
            }
        }
    )*};
}
int_key_parts!(
    u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize
);

/// A key field that may be absent: every [`KeyPart`], plus `Option<T>`.
/// Used only when the handler says what to do with a missing key.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be used as an idempotency key",
    note = "key fields must be text or integers, or an Option of those"
)]
pub trait OptionalKeyPart {
    /// Appends the key text, or reports the value absent.
    fn write_optional_key(&self, out: &mut String) -> Result<(), Absent>;
}

impl<T: KeyPart + ?Sized> OptionalKeyPart for T {
    fn write_optional_key(&self, out: &mut String) -> Result<(), Absent> {
        self.write_key(out);
        Ok(())
    }
}

impl<T: KeyPart> OptionalKeyPart for Option<T> {
    fn write_optional_key(&self, out: &mut String) -> Result<(), Absent> {
        match self {
            Some(v) => {
                v.write_key(out);
                Ok(())
            }
            None => Err(Absent),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> Delivery {
        Delivery::new("m-1", "t", b"{}".to_vec())
    }

    #[test]
    fn composite_keys_escape_their_separator() {
        let a = Key::composite(&[Key::new("a/b").unwrap(), Key::new("c").unwrap()]);
        let b = Key::composite(&[Key::new("a").unwrap(), Key::new("b/c").unwrap()]);
        assert_ne!(a, b);
        assert_eq!(a.as_str(), "a\\/b/c");
    }

    #[test]
    fn missing_header_is_an_error_not_an_empty_key() {
        let err = KeyExtractor::<()>::extract(&Header("X-Key"), &d(), &()).unwrap_err();
        assert!(matches!(err, KeyError::Missing { .. }), "{err:?}");
        let d = d().with_header("x-key", "");
        let err = KeyExtractor::<()>::extract(&Header("X-Key"), &d, &()).unwrap_err();
        assert!(matches!(err, KeyError::Empty { .. }), "{err:?}");
    }

    #[test]
    fn optional_field_none_is_absent() {
        let mut s = String::new();
        assert_eq!(None::<u64>.write_optional_key(&mut s), Err(Absent));
        assert_eq!(Some(5u64).write_optional_key(&mut s), Ok(()));
        assert_eq!(s, "5");
    }

    #[test]
    fn too_long_keys_are_rejected() {
        let k = Key::new("x".repeat(10)).unwrap();
        assert!(matches!(
            k.check_len(4),
            Err(KeyError::TooLong { len: 10, max: 4 })
        ));
    }
}
