//! The keys of one claim call in the order rows are locked.

use crate::store::ClaimRequest;

/// The keys of a claim call, each once, sorted by (handler, key): every
/// claimer takes row locks in this order, so two batches sharing keys wait
/// for one another instead of deadlocking. A later copy of a key is left
/// out; it answers [`TWIN`](super::TWIN).
pub(crate) struct LockOrder {
    firsts: Vec<usize>,
}

fn id<'a>(r: &'a ClaimRequest<'_>) -> (&'a str, &'a str) {
    (r.handler, r.key.as_str())
}

impl LockOrder {
    pub(crate) fn of(requests: &[ClaimRequest<'_>]) -> Self {
        let mut firsts: Vec<usize> = (0..requests.len()).collect();
        // Stable: copies of a key stay in request order, the first one leads.
        firsts.sort_by(|&a, &b| id(&requests[a]).cmp(&id(&requests[b])));
        firsts.dedup_by(|later, first| id(&requests[*later]) == id(&requests[*first]));
        LockOrder { firsts }
    }

    /// Indices into the requests, in lock order.
    pub(crate) fn indices(&self) -> &[usize] {
        &self.firsts
    }

    /// The request claiming `(handler, key)`.
    #[cfg(feature = "mysql")]
    pub(crate) fn find(
        &self,
        requests: &[ClaimRequest<'_>],
        handler: &str,
        key: &str,
    ) -> Option<usize> {
        self.firsts
            .binary_search_by(|&i| id(&requests[i]).cmp(&(handler, key)))
            .ok()
            .map(|at| self.firsts[at])
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::Key;

    #[test]
    fn keys_are_sorted_once_with_the_first_copy_leading() {
        let keys: Vec<Key> = ["b", "a", "b", "c", "a"]
            .iter()
            .map(|k| Key::new(*k).unwrap())
            .collect();
        let requests: Vec<ClaimRequest<'_>> = keys
            .iter()
            .map(|key| ClaimRequest {
                handler: "h",
                key,
                fingerprint: None,
                message_id: "m",
                lease: Duration::ZERO,
                ttl: None,
            })
            .collect();
        let order = LockOrder::of(&requests);
        assert_eq!(order.indices(), &[1, 0, 3]);
        #[cfg(feature = "mysql")]
        for (handler, key, want) in [
            ("h", "b", Some(0)),
            ("h", "c", Some(3)),
            ("h", "d", None),
            ("g", "a", None),
        ] {
            assert_eq!(order.find(&requests, handler, key), want);
        }
    }
}
