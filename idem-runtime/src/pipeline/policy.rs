//! What a failed attempt means: retry after a backoff while attempts are
//! left, then give up. One place, so a later strategy (per-error policies,
//! a circuit breaker) replaces it without touching the loop.

use std::time::Duration;

use crate::ack::AckMode;
use crate::handler::{Backoff, HandlerMeta};
use crate::service::{Attempt, Outcome};

/// The handler's retry policy (`retries`, `backoff`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetryPolicy {
    max_attempts: u32,
    backoff: Backoff,
    /// `ack = "before"`: the message is acked already; nothing can be retried.
    at_most_once: bool,
}

impl RetryPolicy {
    pub(crate) fn of(meta: &HandlerMeta) -> Self {
        RetryPolicy {
            max_attempts: meta.max_attempts(),
            backoff: meta.backoff,
            at_most_once: meta.ack == AckMode::Before,
        }
    }

    /// The delay before the next attempt after attempt `number` failed, or
    /// `None` when it was the last.
    pub(crate) fn retry_in(&self, number: u32) -> Option<Duration> {
        (!self.at_most_once && number < self.max_attempts).then(|| self.backoff.delay(number))
    }

    /// Fills in a failure's retry delay. A message the handler acked before
    /// it failed (the ack already went to the broker) is not retried.
    pub(crate) fn apply(&self, attempt: &mut Attempt<'_>) {
        if attempt.acked_at_call() {
            return;
        }
        let number = attempt.number();
        if let Some(Outcome::Failed {
            retry_in: retry_in @ None,
            ..
        }) = attempt.outcome_mut()
        {
            *retry_in = self.retry_in(number);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_until_the_last_attempt_then_gives_up() {
        let meta = HandlerMeta {
            retries: 2,
            ..HandlerMeta::DEFAULTS
        };
        let p = RetryPolicy::of(&meta);
        assert!(p.retry_in(1).is_some());
        assert!(p.retry_in(2).is_some());
        assert_eq!(p.retry_in(3), None);
        let before = RetryPolicy::of(&HandlerMeta {
            ack: AckMode::Before,
            ..meta
        });
        assert_eq!(before.retry_in(1), None);
    }
}
