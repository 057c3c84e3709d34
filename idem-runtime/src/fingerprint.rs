//! Payload fingerprints: how a store tells "the same message again" from
//! "a different message that reuses a key" (`Claim::Conflict`).
//!
//! Conflict detection is opt-in. By default a delivery whose key is done is a
//! duplicate whatever its bytes: a producer retry re-serialises its JSON (key
//! order, spacing, a fresh `sent_at`), and that retry is exactly the
//! duplicate idem exists to absorb. A handler opts in with
//! `fingerprint = ["amount", "currency"]` (a hash of those decoded fields)
//! or with a key extractor that supplies a fingerprint
//! ([`KeyExtractor::fingerprint`](crate::key::KeyExtractor::fingerprint)).
//!
//! The hash is persisted in dedup records, so it must never change between
//! releases or processes: FNV-1a 64 is fixed by its definition, unlike
//! `std`'s `DefaultHasher`. It is not a cryptographic hash; it only has to
//! make accidental collisions between two payloads of one key unlikely.

use std::io;
use std::num::NonZeroU64;

use serde::Serialize;

const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0100_0000_01b3;

/// A stable 64-bit fingerprint of a payload or of chosen payload fields.
///
/// Never zero: stores keep "no fingerprint" as 0 (see [`Fingerprint::stored`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(NonZeroU64);

impl Fingerprint {
    /// A fingerprint from a hash value you computed yourself. 0 is reserved
    /// for "no fingerprint" in storage and becomes 1.
    ///
    /// ```
    /// use idem_runtime::Fingerprint;
    /// assert_eq!(Fingerprint::new(7).get(), 7);
    /// assert_eq!(Fingerprint::new(0).get(), 1);
    /// ```
    pub const fn new(value: u64) -> Fingerprint {
        match NonZeroU64::new(value) {
            Some(v) => Fingerprint(v),
            None => Fingerprint(NonZeroU64::MIN),
        }
    }

    /// The hash value.
    pub const fn get(self) -> u64 {
        self.0.get()
    }

    /// The fingerprint of raw bytes.
    ///
    /// ```
    /// use idem_runtime::Fingerprint;
    /// assert_eq!(Fingerprint::of_bytes(b"a"), Fingerprint::of_bytes(b"a"));
    /// assert_ne!(Fingerprint::of_bytes(b"a"), Fingerprint::of_bytes(b"b"));
    /// ```
    pub fn of_bytes(bytes: &[u8]) -> Fingerprint {
        let mut h = Fingerprinter::new();
        h.bytes(bytes);
        h.finish()
    }

    /// The fingerprint of one decoded value (see [`Fingerprinter::field`]):
    /// the same value gives the same fingerprint however it was spelled on
    /// the wire.
    ///
    /// ```
    /// use idem_runtime::Fingerprint;
    /// let a: serde_json::Value = serde_json::from_str(r#"{"amount": 5, "currency": "EUR"}"#).unwrap();
    /// let b: serde_json::Value = serde_json::from_str(r#"{ "currency":"EUR","amount":5 }"#).unwrap();
    /// assert_eq!(Fingerprint::of(&a), Fingerprint::of(&b));
    /// ```
    pub fn of<T: Serialize + ?Sized>(value: &T) -> Fingerprint {
        let mut h = Fingerprinter::new();
        h.field(value);
        h.finish()
    }

    /// How stores keep an optional fingerprint in one integer column or
    /// field: the bits of the hash as an `i64` (SQL has no `u64`), 0 for
    /// none.
    ///
    /// ```
    /// use idem_runtime::Fingerprint;
    /// let fp = Fingerprint::new(u64::MAX);
    /// assert_eq!(Fingerprint::from_stored(Fingerprint::stored(Some(fp))), Some(fp));
    /// assert_eq!(Fingerprint::from_stored(Fingerprint::stored(None)), None);
    /// ```
    pub const fn stored(fingerprint: Option<Fingerprint>) -> i64 {
        match fingerprint {
            Some(fp) => fp.0.get() as i64,
            None => 0,
        }
    }

    /// Back from [`Fingerprint::stored`].
    pub const fn from_stored(value: i64) -> Option<Fingerprint> {
        match NonZeroU64::new(value as u64) {
            Some(v) => Some(Fingerprint(v)),
            None => None,
        }
    }
}

impl std::fmt::LowerHex for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::LowerHex::fmt(&self.0.get(), f)
    }
}

/// Builds a fingerprint from several fields.
#[derive(Debug, Clone)]
pub struct Fingerprinter(u64);

impl Default for Fingerprinter {
    fn default() -> Self {
        Self::new()
    }
}

impl Fingerprinter {
    /// An empty fingerprinter.
    pub fn new() -> Self {
        Fingerprinter(OFFSET)
    }

    /// Adds raw bytes.
    pub fn bytes(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(PRIME);
        }
    }

    /// Adds one decoded field, then a separator. The value is hashed as
    /// canonical JSON (object members sorted by name), so a map field hashes
    /// the same whatever order its entries came in or iterate in.
    pub fn field<T: Serialize + ?Sized>(&mut self, value: &T) {
        match serde_json::to_value(value) {
            // Writing into the hasher cannot fail.
            Ok(v) => {
                let _ = serde_json::to_writer(&mut *self, &v);
            }
            // Not representable as a JSON value (a map with non-text keys):
            // its own serialization, which is deterministic for everything
            // but hash maps.
            Err(_) => {
                let _ = serde_json::to_writer(&mut *self, value);
            }
        }
        self.bytes(&[0x1f]);
    }

    /// The fingerprint.
    pub fn finish(&self) -> Fingerprint {
        Fingerprint::new(self.0)
    }
}

impl io::Write for Fingerprinter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.bytes(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector() {
        // FNV-1a 64 of "a" from the reference test vectors.
        assert_eq!(Fingerprint::of_bytes(b"a").get(), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn field_order_and_boundaries_matter() {
        let mut a = Fingerprinter::new();
        a.field("ab");
        a.field("c");
        let mut b = Fingerprinter::new();
        b.field("a");
        b.field("bc");
        assert_ne!(a.finish(), b.finish());
    }

    #[test]
    fn maps_hash_the_same_in_any_order() {
        let mut a = std::collections::HashMap::new();
        let mut b = std::collections::HashMap::new();
        for i in 0..32 {
            a.insert(format!("k{i}"), i);
        }
        for i in (0..32).rev() {
            b.insert(format!("k{i}"), i);
        }
        assert_eq!(Fingerprint::of(&a), Fingerprint::of(&b));
        b.insert("k3".into(), 4);
        assert_ne!(Fingerprint::of(&a), Fingerprint::of(&b));
    }

    #[test]
    fn stored_form_round_trips_the_high_bit() {
        let fp = Fingerprint::new(0x8000_0000_0000_0001);
        assert!(Fingerprint::stored(Some(fp)) < 0);
        assert_eq!(
            Fingerprint::from_stored(Fingerprint::stored(Some(fp))),
            Some(fp)
        );
    }
}
