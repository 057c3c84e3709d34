//! Held deliveries and their keep-alive: for brokers that hand a message to
//! another consumer when it is held too long (not RabbitMQ, whose consumer
//! timeout is a misconfiguration guard, not a redelivery timer).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::lock;

/// The deliveries a subscription holds (fetched, not yet settled), by a
/// broker handle (stream entry id, ack subject), with the time each was last
/// fetched or kept alive.
#[derive(Default)]
pub(crate) struct InFlight {
    map: Mutex<HashMap<Arc<str>, Instant>>,
}

impl InFlight {
    pub(crate) fn insert_all<'a>(&self, handles: impl IntoIterator<Item = &'a Arc<str>>) {
        let now = Instant::now();
        let mut map = lock(&self.map);
        for h in handles {
            map.insert(h.clone(), now);
        }
    }

    pub(crate) fn remove(&self, handle: &str) -> bool {
        lock(&self.map).remove(handle).is_some()
    }

    pub(crate) fn len(&self) -> usize {
        lock(&self.map).len()
    }

    /// The handles not touched for `older_than`, marked as touched now.
    pub(super) fn take_stale(&self, older_than: Duration) -> Vec<Arc<str>> {
        let now = Instant::now();
        let mut out = Vec::new();
        for (h, touched) in lock(&self.map).iter_mut() {
            if now.duration_since(*touched) >= older_than {
                *touched = now;
                out.push(h.clone());
            }
        }
        out
    }
}

/// Tells the broker that held deliveries are still being worked on, so it
/// does not hand them to another consumer (JetStream `+WPI`, Redis `XCLAIM
/// … JUSTID`).
pub(crate) trait KeepAlive: Send + Sync + 'static {
    fn keep_alive(&self, handles: Vec<Arc<str>>) -> impl Future<Output = ()> + Send;
}

/// A background task that lives as long as its subscription.
pub(crate) struct Ticker(tokio::task::AbortHandle);

impl Drop for Ticker {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Every `every`, keeps alive the deliveries of `in_flight` that were not
/// touched for `older_than`. Stops when `target` is dropped.
pub(crate) fn spawn_keep_alive<K: KeepAlive>(
    target: Weak<K>,
    in_flight: Arc<InFlight>,
    every: Duration,
    older_than: Duration,
) -> Ticker {
    let every = every.max(Duration::from_millis(50));
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(target) = target.upgrade() else {
                return;
            };
            let stale = in_flight.take_stale(older_than);
            if !stale.is_empty() {
                tracing::debug!(count = stale.len(), "keeping long-running deliveries alive");
                target.keep_alive(stale).await;
            }
        }
    });
    Ticker(task.abort_handle())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_hands_out_only_stale_handles() {
        let f = InFlight::default();
        f.insert_all([&Arc::<str>::from("a")]);
        assert!(f.take_stale(Duration::from_secs(60)).is_empty());
        assert_eq!(f.take_stale(Duration::ZERO).len(), 1);
        assert!(f.remove("a"));
        assert!(!f.remove("a"));
        assert_eq!(f.len(), 0);
    }
}
