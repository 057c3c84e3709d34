//! The keys of one claim call in the order rows are locked, and what the
//! dialects that claim a batch through a list of rows share.

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

    /// The request claiming the `(handler, key)` of a row a batch statement
    /// returned; `Err(why)` for a key the statement was not given (a bug or
    /// a table that is not ours: never answered as some other key).
    pub(crate) fn returned(
        &self,
        requests: &[ClaimRequest<'_>],
        handler: &str,
        key: &str,
    ) -> Result<usize, String> {
        self.find(requests, handler, key).ok_or_else(|| {
            format!(
                "claim statement returned a row for a key it was not given ({handler:?}, {key:?})"
            )
        })
    }
}

/// Appends `(?, ?), (?, ?)`: `rows` rows of `columns` anonymous
/// parameters, the `VALUES` list of a statement over many keys.
#[cfg(feature = "sqlite")]
pub(crate) fn push_placeholders(sql: &mut String, rows: usize, columns: usize) {
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for column in 0..columns {
            sql.push_str(if column == 0 { "?" } else { ", ?" });
        }
        sql.push(')');
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
        for (handler, key, want) in [
            ("h", "b", Some(0)),
            ("h", "c", Some(3)),
            ("h", "d", None),
            ("g", "a", None),
        ] {
            assert_eq!(order.find(&requests, handler, key), want);
        }
        assert_eq!(order.returned(&requests, "h", "c"), Ok(3));
        assert!(
            order
                .returned(&requests, "h", "d")
                .unwrap_err()
                .contains("\"d\"")
        );
    }

    #[cfg(feature = "sqlite")]
    #[test]
    fn placeholders_make_rows_of_parameters() {
        let mut sql = String::from("VALUES ");
        push_placeholders(&mut sql, 3, 2);
        assert_eq!(sql, "VALUES (?, ?), (?, ?), (?, ?)");
        sql.clear();
        push_placeholders(&mut sql, 1, 1);
        assert_eq!(sql, "(?)");
    }
}
