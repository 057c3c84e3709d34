//! The two layers every handler runs in: a tracing span per message (or
//! batch), and the counters `Runtime::stats` reads. Built on the public
//! [`Layer`] seam like any user layer.

use std::sync::Arc;

use tracing::Instrument;

use crate::ack::AckMode;
use crate::handler::HandlerMeta;
use crate::metrics::HandlerMetrics;
use crate::service::{Attempt, Layer, Outcome, Service};

/// A span per call: `idem.message{handler, message_id, attempt, key}` for
/// one delivery, `idem.batch{handler, size}` for a batch.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct TraceLayer;

pub(crate) struct Traced<S> {
    inner: S,
}

impl<S: Service> Layer<S> for TraceLayer {
    type Service = Traced<S>;
    fn layer(&self, inner: S) -> Traced<S> {
        Traced { inner }
    }
}

impl<S: Service> Service for Traced<S> {
    fn meta(&self) -> &'static HandlerMeta {
        self.inner.meta()
    }

    async fn call<'a, 'd: 'a>(&'a self, attempts: &'a mut [Attempt<'d>]) {
        let meta = self.inner.meta();
        let span = match &*attempts {
            [one] => tracing::info_span!(
                "idem.message",
                handler = meta.name,
                message_id = %one.delivery().id,
                attempt = one.number(),
                key = tracing::field::Empty,
            ),
            many => tracing::info_span!("idem.batch", handler = meta.name, size = many.len()),
        };
        if span.is_disabled() {
            self.inner.call(attempts).await
        } else {
            self.inner.call(attempts).instrument(span).await
        }
    }
}

/// Counts what the attempts came to: processed, duplicate, failed,
/// retried, dead-lettered, and how many are in flight. (Fetched deliveries,
/// `received`, are counted by the loop, before any service sees them.)
#[derive(Clone)]
pub(crate) struct CountLayer(pub(crate) Arc<HandlerMetrics>);

pub(crate) struct Counted<S> {
    inner: S,
    metrics: Arc<HandlerMetrics>,
}

impl<S: Service> Layer<S> for CountLayer {
    type Service = Counted<S>;
    fn layer(&self, inner: S) -> Counted<S> {
        Counted {
            inner,
            metrics: self.0.clone(),
        }
    }
}

impl<S: Service> Service for Counted<S> {
    fn meta(&self) -> &'static HandlerMeta {
        self.inner.meta()
    }

    async fn call<'a, 'd: 'a>(&'a self, attempts: &'a mut [Attempt<'d>]) {
        let m = &self.metrics;
        let n = attempts.len() as u64;
        HandlerMetrics::add(&m.in_flight, n);
        self.inner.call(attempts).await;
        HandlerMetrics::sub(&m.in_flight, n);
        let at_most_once = self.inner.meta().ack == AckMode::Before;
        for attempt in attempts.iter() {
            if attempt.acked_at_call() {
                // Settled with the broker already: a done-record that could
                // not be written is still a processed message.
                let processed = matches!(
                    attempt.outcome(),
                    Some(Outcome::Processed | Outcome::StoreDown { .. })
                );
                HandlerMetrics::inc(if processed { &m.processed } else { &m.failed });
                continue;
            }
            match attempt.outcome() {
                Some(Outcome::Processed) => HandlerMetrics::inc(&m.processed),
                Some(Outcome::Duplicate { .. }) => HandlerMetrics::inc(&m.duplicate),
                Some(Outcome::Failed { retry_in, .. }) => {
                    HandlerMetrics::inc(&m.failed);
                    match retry_in {
                        Some(_) => HandlerMetrics::inc(&m.retried),
                        None if !at_most_once => HandlerMetrics::inc(&m.dead_lettered),
                        None => {}
                    }
                }
                Some(Outcome::Rejected { .. }) if at_most_once => HandlerMetrics::inc(&m.failed),
                Some(Outcome::Rejected { .. }) => HandlerMetrics::inc(&m.dead_lettered),
                _ => {}
            }
        }
    }
}
