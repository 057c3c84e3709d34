//! The optional in-process tier: a bounded LRU of done records, so a hot
//! duplicate is answered without a round trip to Redis.
//!
//! Only done records are cached (they are final until their TTL), never
//! leases. An entry lives at most `max_age` and never past the record's
//! TTL, so a record deleted in Redis (an operator forcing a replay) is
//! honoured again after `max_age` at the latest.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::fingerprint::Fingerprint;

const NIL: u32 = u32::MAX;

/// A done record as cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct CachedDone {
    pub(super) fingerprint: Option<Fingerprint>,
    pub(super) result: Option<String>,
}

struct Node {
    key: Arc<str>,
    done: CachedDone,
    expires: Instant,
    prev: u32,
    next: u32,
}

/// Least-recently-used map from record key to done record, O(1) per
/// operation: a hash map into a slab of nodes on an intrusive list.
struct Lru {
    map: HashMap<Arc<str>, u32>,
    nodes: Vec<Node>,
    free: Vec<u32>,
    head: u32,
    tail: u32,
}

impl Lru {
    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let n = &self.nodes[i as usize];
            (n.prev, n.next)
        };
        match prev {
            NIL => self.head = next,
            p => self.nodes[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.nodes[n as usize].prev = prev,
        }
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        {
            let n = &mut self.nodes[i as usize];
            n.prev = NIL;
            n.next = old;
        }
        if old != NIL {
            self.nodes[old as usize].prev = i;
        }
        self.head = i;
        if self.tail == NIL {
            self.tail = i;
        }
    }

    fn remove(&mut self, i: u32) {
        self.unlink(i);
        let key = self.nodes[i as usize].key.clone();
        self.map.remove(&key);
        self.free.push(i);
    }
}

/// The cache tier: capacity, maximum age, and the LRU behind a mutex.
pub(super) struct DoneCache {
    capacity: usize,
    max_age: Duration,
    lru: Mutex<Lru>,
}

impl std::fmt::Debug for DoneCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DoneCache")
            .field("capacity", &self.capacity)
            .field("max_age", &self.max_age)
            .field("len", &self.len())
            .finish()
    }
}

impl DoneCache {
    /// A cache of at most `capacity` (≥ 1) entries, each kept at most `max_age`.
    pub(super) fn new(capacity: usize, max_age: Duration) -> Self {
        let capacity = capacity.clamp(1, NIL as usize - 1);
        DoneCache {
            capacity,
            max_age,
            lru: Mutex::new(Lru {
                map: HashMap::with_capacity(capacity.min(1 << 16)),
                nodes: Vec::new(),
                free: Vec::new(),
                head: NIL,
                tail: NIL,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        // Every mutation below keeps the list consistent before it can
        // panic (there is nothing in it that panics), so a poisoned lock is usable.
        crate::sync::lock(&self.lru)
    }

    pub(super) fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// The cached done record of `key`, refreshed as most recently used.
    pub(super) fn get(&self, key: &str, now: Instant) -> Option<CachedDone> {
        let mut lru = self.lock();
        let i = *lru.map.get(key)?;
        if lru.nodes[i as usize].expires <= now {
            lru.remove(i);
            return None;
        }
        lru.unlink(i);
        lru.push_front(i);
        Some(lru.nodes[i as usize].done.clone())
    }

    /// Remembers a done record for at most `max_age`, and never past `ttl`
    /// (the time the record has left in Redis; `None` = no expiry).
    pub(super) fn insert(&self, key: &str, done: CachedDone, ttl: Option<Duration>, now: Instant) {
        let life = ttl.map_or(self.max_age, |t| t.min(self.max_age));
        if life.is_zero() {
            return;
        }
        let expires = now + life;
        let mut lru = self.lock();
        if let Some(&i) = lru.map.get(key) {
            let n = &mut lru.nodes[i as usize];
            n.done = done;
            n.expires = expires;
            lru.unlink(i);
            lru.push_front(i);
            return;
        }
        if lru.map.len() >= self.capacity {
            let tail = lru.tail;
            lru.remove(tail);
        }
        let key: Arc<str> = Arc::from(key);
        let node = Node {
            key: key.clone(),
            done,
            expires,
            prev: NIL,
            next: NIL,
        };
        let i = match lru.free.pop() {
            Some(i) => {
                lru.nodes[i as usize] = node;
                i
            }
            None => {
                lru.nodes.push(node);
                (lru.nodes.len() - 1) as u32
            }
        };
        lru.map.insert(key, i);
        lru.push_front(i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(n: u64) -> CachedDone {
        CachedDone {
            fingerprint: Some(Fingerprint::new(n)),
            result: Some(n.to_string()),
        }
    }

    #[test]
    fn evicts_the_least_recently_used() {
        let now = Instant::now();
        let c = DoneCache::new(2, Duration::from_secs(60));
        c.insert("a", done(1), None, now);
        c.insert("b", done(2), None, now);
        assert_eq!(c.get("a", now), Some(done(1))); // a is now the most recent
        c.insert("c", done(3), None, now); // evicts b
        assert_eq!(c.get("b", now), None);
        assert_eq!(c.get("a", now), Some(done(1)));
        assert_eq!(c.get("c", now), Some(done(3)));
        assert_eq!(c.len(), 2);
        for i in 0..100 {
            c.insert(&format!("k{i}"), done(i), None, now);
        }
        assert_eq!(c.len(), 2);
        assert_eq!(c.get("k99", now), Some(done(99)));
        assert_eq!(c.get("k98", now), Some(done(98)));
    }

    #[test]
    fn entries_expire_at_the_record_ttl_or_max_age() {
        let now = Instant::now();
        let c = DoneCache::new(10, Duration::from_secs(60));
        c.insert("short", done(1), Some(Duration::from_secs(1)), now);
        c.insert("long", done(2), Some(Duration::from_secs(3600)), now);
        c.insert("gone", done(3), Some(Duration::ZERO), now);
        assert_eq!(c.get("gone", now), None);
        let later = now + Duration::from_secs(2);
        assert_eq!(c.get("short", later), None);
        assert_eq!(c.get("long", later), Some(done(2)));
        assert_eq!(c.get("long", now + Duration::from_secs(61)), None);
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn reinsert_updates_in_place() {
        let now = Instant::now();
        let c = DoneCache::new(1, Duration::from_secs(60));
        c.insert("a", done(1), None, now);
        c.insert("a", done(2), None, now);
        assert_eq!(c.len(), 1);
        assert_eq!(c.get("a", now), Some(done(2)));
    }
}
