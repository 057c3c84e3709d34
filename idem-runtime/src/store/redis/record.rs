//! How dedup records are laid out in Redis: key names, the two value
//! formats, and the cluster slot of a key. Pure functions, no I/O, so the
//! format is tested without a server.
//!
//! Key: `<prefix>:{<handler>:<key>}`. The hash tag covers the whole record
//! id, so every command about one message goes to one Redis Cluster slot,
//! and records spread over the slots by key (not all of a handler's records
//! in one slot). `:` and `\` in the handler name are escaped with `\`, so
//! handler `a:b` + key `c` and handler `a` + key `b:c` are different keys.
//!
//! Values (plain strings, one per record):
//! - lease:  `p|<token>|<fingerprint>` (16 lowercase hex digits each, 35 bytes)
//! - done:   `d|<fingerprint>|<token>` and, if the handler returned one,
//!   `|<result JSON>` — the token lets a retried completion recognise its own
//!   record.

use crate::fingerprint::Fingerprint;

/// Length of a lease value.
pub(super) const LEASE_LEN: usize = 35;
/// Length of a done value without a cached result.
const DONE_LEN: usize = 35;

/// Appends `n` as 16 lowercase hex digits.
fn push_hex(out: &mut Vec<u8>, n: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for shift in (0..16).rev() {
        out.push(DIGITS[((n >> (shift * 4)) & 0xf) as usize]);
    }
}

fn parse_hex(s: &[u8]) -> Option<u64> {
    if s.len() != 16 {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &c| {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        Some(acc << 4 | u64::from(d))
    })
}

/// Appends the record key of (`handler`, `key`) under `prefix`.
pub(super) fn push_key(out: &mut String, prefix: &str, handler: &str, key: &str) {
    out.reserve(prefix.len() + handler.len() + key.len() + 4);
    out.push_str(prefix);
    out.push_str(":{");
    for c in handler.chars() {
        if c == ':' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push(':');
    out.push_str(key);
    out.push('}');
}

/// The lease value of a claim, on the stack.
pub(super) fn lease_value(token: u64, fingerprint: Option<Fingerprint>) -> [u8; LEASE_LEN] {
    let mut v = Vec::with_capacity(LEASE_LEN);
    v.extend_from_slice(b"p|");
    push_hex(&mut v, token);
    v.push(b'|');
    push_hex(&mut v, Fingerprint::stored(fingerprint) as u64);
    let mut out = [0u8; LEASE_LEN];
    out.copy_from_slice(&v);
    out
}

/// Appends the done value of a completed claim.
pub(super) fn push_done_value(
    out: &mut Vec<u8>,
    fingerprint: Option<Fingerprint>,
    token: u64,
    result: Option<&str>,
) {
    out.reserve(DONE_LEN + result.map_or(0, |r| r.len() + 1));
    out.extend_from_slice(b"d|");
    push_hex(out, Fingerprint::stored(fingerprint) as u64);
    out.push(b'|');
    push_hex(out, token);
    if let Some(r) = result {
        out.push(b'|');
        out.extend_from_slice(r.as_bytes());
    }
}

/// A record as read back from Redis.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Stored<'a> {
    /// Someone holds the lease.
    Lease {
        /// Its owner's token.
        token: u64,
        /// The fingerprint of the payload being processed (0 on the wire: none).
        fingerprint: Option<Fingerprint>,
    },
    /// The key was processed.
    Done {
        /// The processed payload's fingerprint (0 on the wire: none).
        fingerprint: Option<Fingerprint>,
        /// The token of the consumer that completed it.
        token: u64,
        /// The cached result, if any.
        result: Option<&'a str>,
    },
}

/// Parses a stored value; `None` if idem did not write it.
pub(super) fn parse(v: &[u8]) -> Option<Stored<'_>> {
    match v {
        [b'p', b'|', rest @ ..] if v.len() == LEASE_LEN && rest[16] == b'|' => {
            Some(Stored::Lease {
                token: parse_hex(&rest[..16])?,
                fingerprint: Fingerprint::from_stored(parse_hex(&rest[17..])? as i64),
            })
        }
        [b'd', b'|', rest @ ..] if v.len() >= DONE_LEN && rest[16] == b'|' => {
            let result = match &rest[33..] {
                [] => None,
                [b'|', json @ ..] => Some(std::str::from_utf8(json).ok()?),
                _ => return None,
            };
            Some(Stored::Done {
                fingerprint: Fingerprint::from_stored(parse_hex(&rest[..16])? as i64),
                token: parse_hex(&rest[17..33])?,
                result,
            })
        }
        _ => None,
    }
}

/// The Redis Cluster slot of a key (CRC16/XMODEM of its hash tag, mod 16384),
/// used to split a batch into per-slot pipelines on a cluster.
pub(super) fn slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let close = key[open + 1..].iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &key[open + 1..open + 1 + close])
        })
        .unwrap_or(key);
    crc16(tagged) % 16384
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(prefix: &str, handler: &str, k: &str) -> String {
        let mut out = String::new();
        push_key(&mut out, prefix, handler, k);
        out
    }

    #[test]
    fn keys_are_hash_tagged_and_unambiguous() {
        assert_eq!(key("idem", "place-order", "o-1"), "idem:{place-order:o-1}");
        assert_ne!(key("idem", "a:b", "c"), key("idem", "a", "b:c"));
        assert_eq!(key("idem", "a:b", "c"), r"idem:{a\:b:c}");
        assert_eq!(key("idem", r"a\", "b"), r"idem:{a\\:b}");
        // The slot depends on handler and key only, not on the prefix.
        assert_eq!(
            slot(key("idem", "h", "k").as_bytes()),
            slot(key("other", "h", "k").as_bytes())
        );
    }

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT`.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"123456789"), 0x31c3); // the CRC16/XMODEM check value
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}")); // empty tag: whole key
        assert_ne!(slot(b"foo{}{bar}"), slot(b"bar"));
    }

    #[test]
    fn values_round_trip() {
        let fp = Some(Fingerprint::new(0x0123_4567_89ab_cdef));
        let lease = lease_value(42, fp);
        assert_eq!(&lease[..], b"p|000000000000002a|0123456789abcdef");
        assert_eq!(
            parse(&lease),
            Some(Stored::Lease {
                token: 42,
                fingerprint: fp
            })
        );
        let none = lease_value(42, None);
        assert_eq!(&none[..], b"p|000000000000002a|0000000000000000");
        assert_eq!(
            parse(&none),
            Some(Stored::Lease {
                token: 42,
                fingerprint: None
            })
        );
        for result in [None, Some(r#"{"id":7,"s":"a|b"}"#), Some("")] {
            let mut done = Vec::new();
            push_done_value(&mut done, fp, u64::MAX, result);
            assert_eq!(
                parse(&done),
                Some(Stored::Done {
                    fingerprint: fp,
                    token: u64::MAX,
                    result
                })
            );
        }
    }

    #[test]
    fn foreign_values_are_rejected() {
        for v in [
            &b""[..],
            b"1",
            b"p|xyz",
            b"p|000000000000002a|0123456789abcdeg",
            b"d|0123456789abcdef|000000000000002a#",
            b"d|0123456789ABCDEF|000000000000002a",
        ] {
            assert_eq!(parse(v), None, "{:?}", String::from_utf8_lossy(v));
        }
    }
}
