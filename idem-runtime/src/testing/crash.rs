//! The kit's broker: the in-memory broker, except that the consumer can be
//! made to die between its commit and its ack.
//!
//! The ack of an armed message is swallowed (the consumer loop believes it
//! acked) and the delivery held; the kit then stops the runtime, and hands
//! the held delivery back to the broker as the broker would when the dead
//! consumer's connection closes, so that the restarted runtime gets it again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::delivery::Delivery;
use crate::source::memory::{MemoryBroker, MemorySubscription};
use crate::source::{DeadLetter, Source, SourceError, SubscribeSpec, Subscription};

/// Which ack to swallow, and what was swallowed.
#[derive(Debug, Default)]
pub(crate) struct CrashSwitch {
    /// The message id whose next ack is swallowed.
    armed: Mutex<Option<Arc<str>>>,
    /// Deliveries whose ack was swallowed, with the subscription they came from.
    held: Mutex<Vec<(Arc<MemorySubscription>, Delivery)>>,
    fired: Notify,
}

impl CrashSwitch {
    /// Swallows the next ack of message `id`.
    pub(crate) fn arm(&self, id: &str) {
        *crate::sync::lock(&self.armed) = Some(id.into());
    }

    /// Waits until an armed ack was swallowed.
    pub(crate) async fn fired(&self) {
        self.fired.notified().await;
    }

    /// Disarms, and gives the held deliveries back to the broker (as a nack
    /// without delay: the broker redelivers what a dead consumer held).
    pub(crate) async fn hand_back(&self) -> Result<(), SourceError> {
        crate::sync::lock(&self.armed).take();
        let held = std::mem::take(&mut *crate::sync::lock(&self.held));
        for (subscription, delivery) in held {
            subscription.nack(&delivery, Duration::ZERO).await?;
        }
        Ok(())
    }

    /// Whether this delivery's ack is the one to swallow; holds it if so.
    fn swallow(&self, subscription: &Arc<MemorySubscription>, delivery: &Delivery) -> bool {
        let mut armed = crate::sync::lock(&self.armed);
        if armed.as_deref() != Some(&*delivery.id) {
            return false;
        }
        armed.take();
        crate::sync::lock(&self.held).push((subscription.clone(), delivery.clone()));
        self.fired.notify_one();
        true
    }
}

/// The in-memory broker with a [`CrashSwitch`] on its acks.
#[derive(Debug, Clone)]
pub(crate) struct KitBroker {
    pub(crate) broker: MemoryBroker,
    pub(crate) crash: Arc<CrashSwitch>,
}

impl Source for KitBroker {
    type Subscription = KitSubscription;

    async fn subscribe(&self, spec: SubscribeSpec<'_>) -> Result<KitSubscription, SourceError> {
        Ok(KitSubscription {
            inner: Arc::new(self.broker.subscribe(spec).await?),
            crash: self.crash.clone(),
        })
    }
}

#[derive(Debug)]
pub(crate) struct KitSubscription {
    inner: Arc<MemorySubscription>,
    crash: Arc<CrashSwitch>,
}

impl Subscription for KitSubscription {
    async fn fetch(&self, max: usize) -> Result<Vec<Delivery>, SourceError> {
        self.inner.fetch(max).await
    }

    async fn ack(&self, delivery: &Delivery) -> Result<(), SourceError> {
        if self.crash.swallow(&self.inner, delivery) {
            return Ok(());
        }
        self.inner.ack(delivery).await
    }

    async fn ack_many(&self, deliveries: &[&Delivery]) -> Result<(), SourceError> {
        let rest: Vec<&Delivery> = deliveries
            .iter()
            .copied()
            .filter(|d| !self.crash.swallow(&self.inner, d))
            .collect();
        self.inner.ack_many(&rest).await
    }

    async fn nack(&self, delivery: &Delivery, delay: Duration) -> Result<(), SourceError> {
        self.inner.nack(delivery, delay).await
    }

    async fn dead_letter(
        &self,
        delivery: &Delivery,
        letter: &DeadLetter,
    ) -> Result<(), SourceError> {
        self.inner.dead_letter(delivery, letter).await
    }
}
