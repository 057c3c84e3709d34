//! The commit point of one partition: the offset below which every message
//! this consumer was handed has finished (handler and store commit, a
//! duplicate, or a dead letter).
//!
//! Kafka keeps one committed offset per partition and group, not one ack per
//! message, while idem runs the messages of a partition concurrently. So the
//! offset committed is the lowest unfinished offset (or one past the highest
//! offset seen when none is unfinished), and it only ever moves forward. A
//! plain synchronous type, so the rule can be tested on its own.

use std::collections::BTreeSet;

/// Offsets handed out and not yet finished on one partition, and what was
/// committed last.
#[derive(Debug, Default, Clone)]
pub(crate) struct Watermark {
    unfinished: BTreeSet<i64>,
    highest: Option<i64>,
    committed: Option<i64>,
    finished_since_commit: usize,
}

impl Watermark {
    /// A partition as assigned: nothing seen yet, nothing committed by this
    /// consumer.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Records that the message at `offset` was received and is not finished.
    /// False when it already was unfinished (a second copy of a message that
    /// is still queued or running: the caller drops the copy).
    pub(crate) fn register(&mut self, offset: i64) -> bool {
        if offset < 0 {
            return false;
        }
        self.highest = Some(self.highest.map_or(offset, |h| h.max(offset)));
        self.unfinished.insert(offset)
    }

    /// Records that the message at `offset` finished. False when it was not
    /// unfinished (never registered, or finished already).
    pub(crate) fn finish(&mut self, offset: i64) -> bool {
        let was = self.unfinished.remove(&offset);
        if was {
            self.finished_since_commit += 1;
        }
        was
    }

    /// The offset Kafka should hold for this partition now: the lowest
    /// unfinished offset, or one past the highest seen; `None` before the
    /// first message.
    pub(crate) fn commit_point(&self) -> Option<i64> {
        match self.unfinished.first() {
            Some(lowest) => Some(*lowest),
            None => self.highest.map(|h| h + 1),
        }
    }

    /// The commit point, when it is ahead of what was committed last.
    pub(crate) fn to_commit(&self) -> Option<i64> {
        let point = self.commit_point()?;
        match self.committed {
            Some(c) if c >= point => None,
            _ => Some(point),
        }
    }

    /// Records a successful commit of `offset` (never moves backwards).
    pub(crate) fn committed(&mut self, offset: i64) {
        if self.committed.is_none_or(|c| c < offset) {
            self.committed = Some(offset);
        }
        self.finished_since_commit = 0;
    }

    /// Records that a commit was sent (asynchronously): what finishes from
    /// now on counts toward the next one.
    pub(crate) fn commit_sent(&mut self) {
        self.finished_since_commit = 0;
    }

    /// What was committed last by this consumer.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn last_committed(&self) -> Option<i64> {
        self.committed
    }

    /// Messages finished since the last commit.
    pub(crate) fn finished_since_commit(&self) -> usize {
        self.finished_since_commit
    }

    /// Registered messages not finished.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn unfinished(&self) -> usize {
        self.unfinished.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn commit_point_is_the_lowest_unfinished_offset() {
        let mut w = Watermark::new();
        assert_eq!(w.commit_point(), None);
        assert_eq!(w.to_commit(), None);
        for o in 10..15 {
            assert!(w.register(o));
        }
        assert!(!w.register(12), "a second copy of an unfinished message");
        assert_eq!(w.commit_point(), Some(10));
        assert!(w.finish(12) && w.finish(11));
        assert!(!w.finish(11), "finished twice");
        assert!(!w.finish(99), "never registered");
        assert_eq!(w.commit_point(), Some(10), "10 still runs");
        assert!(w.finish(10));
        assert_eq!(w.to_commit(), Some(13));
        w.committed(13);
        assert_eq!(w.to_commit(), None);
        assert!(w.finish(14) && w.finish(13));
        assert_eq!(w.to_commit(), Some(15), "one past the highest seen");
        w.committed(15);
        w.committed(12);
        assert_eq!(w.last_committed(), Some(15), "never backwards");
    }

    #[test]
    fn gaps_in_offsets_do_not_hold_the_commit_back() {
        // Compacted topics and transaction markers leave holes.
        let mut w = Watermark::new();
        for o in [3, 7, 8, 20] {
            w.register(o);
        }
        w.finish(3);
        assert_eq!(w.commit_point(), Some(7));
        for o in [7, 8, 20] {
            w.finish(o);
        }
        assert_eq!(w.commit_point(), Some(21));
    }

    #[test]
    fn a_redelivered_finished_offset_does_not_move_the_commit_back() {
        let mut w = Watermark::new();
        w.register(0);
        w.register(1);
        w.finish(0);
        w.finish(1);
        w.committed(2);
        assert!(w.register(1), "the broker handed it out again");
        assert_eq!(w.to_commit(), None);
        w.finish(1);
        assert_eq!(w.to_commit(), None);
        assert_eq!(w.commit_point(), Some(2));
    }

    proptest! {
        /// For any order of completions, interleaved with commits at any
        /// moment, no commit passes an unfinished offset, commits never go
        /// backwards, and the last one is one past the last offset.
        #[test]
        fn commits_never_pass_an_unfinished_offset(
            gaps in proptest::collection::vec(1i64..4, 1..200),
            seed in any::<u64>(),
            commit_every in 1usize..10,
        ) {
            // Offsets with random gaps, registered in order, finished in a
            // random order (a seeded shuffle).
            let mut offsets = Vec::with_capacity(gaps.len());
            let mut o = 0i64;
            for g in &gaps {
                o += g;
                offsets.push(o);
            }
            let mut w = Watermark::new();
            let mut finished = std::collections::HashSet::new();
            let mut pending: Vec<i64> = Vec::new();
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut last_commit = None;
            let mut step = 0usize;
            let mut next = offsets.iter().copied().peekable();
            while next.peek().is_some() || !pending.is_empty() {
                // Register one more or finish one, at random.
                if next.peek().is_some() && (pending.is_empty() || rng.bool()) {
                    let off = next.next().unwrap();
                    prop_assert!(w.register(off));
                    pending.push(off);
                } else {
                    let i = rng.usize(..pending.len());
                    let off = pending.swap_remove(i);
                    prop_assert!(w.finish(off));
                    finished.insert(off);
                }
                step += 1;
                if step.is_multiple_of(commit_every) && let Some(c) = w.to_commit() {
                    for off in offsets.iter().filter(|x| **x < c) {
                        prop_assert!(
                            finished.contains(off),
                            "commit {} passes unfinished offset {}", c, off
                        );
                    }
                    prop_assert!(last_commit.is_none_or(|l| l < c));
                    w.committed(c);
                    last_commit = Some(c);
                }
            }
            prop_assert_eq!(w.to_commit().or(last_commit), Some(o + 1));
            prop_assert_eq!(w.unfinished(), 0);
        }
    }
}
