//! Payload fingerprints: how a store tells "the same message again" from
//! "a different message that reuses a key" (`Claim::Conflict`).
//!
//! The hash is persisted in dedup records, so it must never change between
//! releases or processes: FNV-1a 64 is fixed by its definition, unlike
//! `std`'s `DefaultHasher`. It is not a cryptographic hash; it only has to
//! make accidental collisions between two payloads of one key unlikely.

use std::io;

use serde::Serialize;

const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0100_0000_01b3;

/// A stable 64-bit fingerprint of a payload or of chosen payload fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub u64);

impl Fingerprint {
    /// The fingerprint of raw bytes (the default: the whole payload).
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

    /// The value as stored: an `i64` with the same bits (SQL has no `u64`).
    pub fn as_i64(self) -> i64 {
        self.0 as i64
    }

    /// Back from the stored `i64`.
    pub fn from_i64(v: i64) -> Fingerprint {
        Fingerprint(v as u64)
    }
}

/// Builds a fingerprint from several fields without allocating: each field is
/// serialized as JSON straight into the hash.
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

    /// Adds one field, as its JSON serialization followed by a separator.
    pub fn field<T: Serialize + ?Sized>(&mut self, value: &T) {
        // Writing into the hasher cannot fail; a Serialize impl that fails on
        // its own still contributes what it wrote, which is deterministic.
        let _ = serde_json::to_writer(&mut *self, value);
        self.bytes(&[0x1f]);
    }

    /// The fingerprint.
    pub fn finish(&self) -> Fingerprint {
        Fingerprint(self.0)
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
        assert_eq!(Fingerprint::of_bytes(b"a").0, 0xaf63_dc4c_8601_ec8c);
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
}
