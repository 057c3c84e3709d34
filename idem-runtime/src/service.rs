//! The message path as a service: what the consumer loop hands a handler
//! (an [`Attempt`] per delivery, a slice of them per call) and what comes
//! back (an [`Outcome`] in each). Cross-cutting steps — tracing, counters,
//! and later metrics export, trace context — are [`Layer`]s around it, so
//! they plug in without touching the loop or the pipeline.
//!
//! Part of the contract layer: it names no store, broker or loop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use crate::ack::{Ack, AckProbe};
use crate::delivery::Delivery;
use crate::handler::HandlerMeta;

/// What became of one attempt at one delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// The handler ran and its effect committed: ack.
    Processed,
    /// Already processed: ack without running the handler.
    Duplicate {
        /// The result the first run cached (JSON), if any.
        cached: Option<String>,
    },
    /// The handler failed (error, panic, a rejected key). `retry_in` is the
    /// retry policy's answer: try again after that long, or give up
    /// (dead letter; with `ack = "before"` the message is lost).
    Failed {
        /// Why, for logs and the dead letter.
        reason: String,
        /// When to try again; `None`: no attempts left.
        retry_in: Option<Duration>,
    },
    /// Retrying cannot help (undecodable payload, missing key, key
    /// conflict): dead-letter at once.
    Rejected {
        /// Why, for logs and the dead letter.
        reason: String,
    },
    /// Another consumer holds the key right now.
    Busy {
        /// When its lease runs out at the latest.
        retry_after: Duration,
    },
    /// The handler nacked (or dropped its `Ack`): redeliver, no attempt counted.
    Nacked,
    /// The dedup store failed: the handler did not run, nothing is acked;
    /// back off and try again.
    StoreDown {
        /// The store's error.
        error: String,
    },
}

impl Outcome {
    /// Whether the delivery is done and is acked (processed or duplicate).
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Processed | Outcome::Duplicate { .. })
    }
}

/// One attempt at one delivery, on its way through the services.
#[derive(Debug)]
pub struct Attempt<'d> {
    delivery: &'d Delivery,
    number: u32,
    outcome: Option<Outcome>,
    ack: Option<(Ack, AckProbe)>,
    /// The loop's side of an `Ack` it handed out, when it sends the ack the
    /// moment the handler calls `ack.ack()` (`manual_immediate` on a lease store).
    acks_at_call: Option<AckProbe>,
}

impl<'d> Attempt<'d> {
    /// The first attempt in this process at `delivery` (numbered as the
    /// broker counts deliveries).
    pub fn new(delivery: &'d Delivery) -> Self {
        Attempt {
            delivery,
            number: delivery.attempt,
            outcome: None,
            ack: None,
            acks_at_call: None,
        }
    }

    /// The delivery.
    pub fn delivery(&self) -> &'d Delivery {
        self.delivery
    }

    /// The attempt number: the broker's delivery count plus the retries made
    /// in this process (1 on the first try).
    pub fn number(&self) -> u32 {
        self.number
    }

    /// The outcome, once the handler's service has answered.
    pub fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }

    /// Sets the outcome (the innermost service does; a layer may override).
    pub fn set_outcome(&mut self, outcome: Outcome) {
        self.outcome = Some(outcome);
    }

    pub(crate) fn outcome_mut(&mut self) -> Option<&mut Outcome> {
        self.outcome.as_mut()
    }

    pub(crate) fn take_outcome(&mut self) -> Option<Outcome> {
        self.outcome.take()
    }

    /// The next attempt after a retry.
    pub(crate) fn retry(&mut self) {
        self.number = self.number.saturating_add(1);
        self.outcome = None;
    }

    /// Hands the handler an `Ack` whose `ack.ack()` the loop sends to the
    /// broker at once, while the handler still runs.
    pub(crate) fn ack_at_call(&mut self) -> AckProbe {
        let (ack, probe) = Ack::new();
        self.ack = Some((ack, probe.clone()));
        self.acks_at_call = Some(probe.clone());
        probe
    }

    /// Whether the handler acked and the loop already sent that ack: the
    /// message is settled with the broker, whatever the outcome says.
    pub fn acked_at_call(&self) -> bool {
        self.acks_at_call
            .as_ref()
            .is_some_and(|p| p.decision() == crate::ack::AckDecision::Acked)
    }

    pub(crate) fn take_ack(&mut self) -> Option<(Ack, AckProbe)> {
        self.ack.take()
    }
}

/// A handler bound to its store, seen from the loop: it fills in the
/// outcome of every attempt it is given. One attempt per call, except in
/// `ack = "batch"` mode, where a call is a fetched batch.
pub trait Service: Send + Sync + 'static {
    /// The handler's settings.
    fn meta(&self) -> &'static HandlerMeta;

    /// Processes the attempts and sets each one's [`Outcome`].
    fn call<'a, 'd: 'a>(
        &'a self,
        attempts: &'a mut [Attempt<'d>],
    ) -> impl Future<Output = ()> + Send + 'a;
}

/// Wraps a service in another (tower's `Layer`, for idem's [`Service`]).
///
/// A layer added with
/// [`RuntimeBuilder::layer`](crate::runtime::RuntimeBuilder::layer) wraps every
/// handler's service, outside the built-in tracing and counters layers.
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use idem_runtime::service::{Attempt, BoxService, Layer, Service};
/// use idem_runtime::HandlerMeta;
///
/// /// Counts attempts per process, whatever the handler.
/// struct CountAttempts(Arc<AtomicU64>);
/// struct Counted<S> { inner: S, count: Arc<AtomicU64> }
///
/// impl<S: Service> Layer<S> for CountAttempts {
///     type Service = Counted<S>;
///     fn layer(&self, inner: S) -> Counted<S> {
///         Counted { inner, count: self.0.clone() }
///     }
/// }
///
/// impl<S: Service> Service for Counted<S> {
///     fn meta(&self) -> &'static HandlerMeta {
///         self.inner.meta()
///     }
///     async fn call<'a, 'd: 'a>(&'a self, attempts: &'a mut [Attempt<'d>]) {
///         self.count.fetch_add(attempts.len() as u64, Ordering::Relaxed);
///         self.inner.call(attempts).await
///     }
/// }
/// # fn takes<L: Layer<BoxService>>(_: L) {}
/// # takes(CountAttempts(Arc::default()));
/// ```
pub trait Layer<S> {
    /// The wrapped service.
    type Service: Service;
    /// Wraps `inner`.
    fn layer(&self, inner: S) -> Self::Service;
}

/// The object-safe form of [`Service`], for type-erased stacks.
trait DynService: Send + Sync + 'static {
    fn meta(&self) -> &'static HandlerMeta;
    fn call_boxed<'a, 'd: 'a>(&'a self, attempts: &'a mut [Attempt<'d>]) -> BoxFuture<'a, ()>;
}

impl<S: Service> DynService for S {
    fn meta(&self) -> &'static HandlerMeta {
        Service::meta(self)
    }
    fn call_boxed<'a, 'd: 'a>(&'a self, attempts: &'a mut [Attempt<'d>]) -> BoxFuture<'a, ()> {
        Box::pin(self.call(attempts))
    }
}

/// A type-erased, cheaply cloned service: what the loop drives, and what
/// user layers wrap.
#[derive(Clone)]
pub struct BoxService(Arc<dyn DynService>);

impl BoxService {
    /// Erases a service's type.
    pub fn new(service: impl Service) -> Self {
        BoxService(Arc::new(service))
    }
}

impl std::fmt::Debug for BoxService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("BoxService")
            .field(&self.0.meta().name)
            .finish()
    }
}

impl Service for BoxService {
    fn meta(&self) -> &'static HandlerMeta {
        self.0.meta()
    }
    fn call<'a, 'd: 'a>(
        &'a self,
        attempts: &'a mut [Attempt<'d>],
    ) -> impl Future<Output = ()> + Send + 'a {
        self.0.call_boxed(attempts)
    }
}
