//! A source adapter that puts a prefix in front of every topic and consumer
//! group: one binary, several environments (`staging.orders`,
//! `prod.orders`) or test runs on one broker, without touching the
//! handlers' `topic = "…"`.

use super::{Source, SourceError, SubscribeSpec};

/// Wraps a source so that a handler's `topic = "orders"` subscribes to
/// `<prefix>orders` (group `<prefix><handler>`, default dead letters
/// `<prefix>orders.dlq`; an explicit `dead_letter = "…"` is prefixed too).
///
/// ```
/// use idem_runtime::source::memory::MemoryBroker;
/// use idem_runtime::source::namespaced::Namespaced;
/// let source = Namespaced::new(MemoryBroker::new(), "staging.");
/// assert_eq!(source.prefix(), "staging.");
/// ```
#[derive(Debug, Clone)]
pub struct Namespaced<S> {
    inner: S,
    prefix: String,
}

impl<S: Source> Namespaced<S> {
    /// `inner` with `prefix` in front of every name.
    pub fn new(inner: S, prefix: impl Into<String>) -> Self {
        Namespaced {
            inner,
            prefix: prefix.into(),
        }
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The wrapped source.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S: Source> Source for Namespaced<S> {
    type Subscription = S::Subscription;

    async fn subscribe(&self, spec: SubscribeSpec<'_>) -> Result<S::Subscription, SourceError> {
        let p = &self.prefix;
        let topic = format!("{p}{}", spec.topic);
        let group = format!("{p}{}", spec.group);
        let dead_letter = spec.dead_letter.map(|d| format!("{p}{d}"));
        self.inner
            .subscribe(SubscribeSpec {
                topic: &topic,
                group: &group,
                dead_letter: dead_letter.as_deref(),
                prefetch: spec.prefetch,
            })
            .await
    }
}
