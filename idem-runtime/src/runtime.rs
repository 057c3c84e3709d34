//! The runtime: collects the annotated handlers, binds each to its store,
//! opens a subscription per handler and runs their consumer loops until
//! told to stop.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::ack::AckMode;
use crate::binding::{Binding, BuildError, HandlerDescriptor, Purger, Stores};
use crate::consumer::{LoopConfig, consume};
use crate::handler::{Backoff, HandlerMeta};
use crate::metrics::{HandlerMetrics, Stats};
use crate::pipeline::layers::{CountLayer, TraceLayer};
use crate::service::{BoxService, Layer, Service};
use crate::source::{Source, SubscribeSpec};
use crate::store::DedupStore;

/// A user layer, type-erased: wraps a handler's service in another.
type LayerFn = Arc<dyn Fn(BoxService) -> BoxService + Send + Sync>;

/// Every handler annotated with `#[idempotent]` in this binary.
///
/// ```
/// let registry = idem_runtime::Registry::from_inventory().unwrap();
/// println!("{registry}"); // a table: name, topic, key, store, ack
/// ```
#[derive(Debug, Clone)]
pub struct Registry {
    handlers: Vec<&'static HandlerDescriptor>,
}

impl Registry {
    /// Collects the handlers; rejects two with the same name.
    pub fn from_inventory() -> Result<Registry, BuildError> {
        let mut handlers: Vec<&'static HandlerDescriptor> =
            inventory::iter::<HandlerDescriptor>.into_iter().collect();
        handlers.sort_by_key(|h| (h.meta.name, h.meta.path));
        for pair in handlers.windows(2) {
            if pair[0].meta.name == pair[1].meta.name {
                return Err(BuildError::DuplicateName {
                    name: pair[0].meta.name.to_owned(),
                    first: pair[0].meta.path.to_owned(),
                    second: pair[1].meta.path.to_owned(),
                });
            }
        }
        Ok(Registry { handlers })
    }

    /// The handlers' settings, sorted by name.
    pub fn handlers(&self) -> impl Iterator<Item = &'static HandlerMeta> + '_ {
        self.handlers.iter().map(|h| &h.meta)
    }

    /// One handler's settings.
    pub fn get(&self, name: &str) -> Option<&'static HandlerMeta> {
        self.handlers
            .iter()
            .find(|h| h.meta.name == name)
            .map(|h| &h.meta)
    }

    fn names(&self) -> String {
        self.handlers
            .iter()
            .map(|h| h.meta.name)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: Vec<[&str; 5]> = self
            .handlers()
            .map(|m| [m.name, m.topic, m.key, m.store, m.ack.as_str()])
            .collect();
        let header = ["handler", "topic", "key", "store", "ack"];
        let mut width = header.map(str::len);
        for r in &rows {
            for (w, c) in width.iter_mut().zip(r) {
                *w = (*w).max(c.len());
            }
        }
        for r in std::iter::once(&header).chain(&rows) {
            let line: Vec<String> = r
                .iter()
                .zip(width)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            writeln!(f, "{}", line.join("  ").trim_end())?;
        }
        Ok(())
    }
}

/// Builds a [`Runtime`].
pub struct RuntimeBuilder<S> {
    source: S,
    stores: Stores,
    only: Option<Vec<String>>,
    cfg: LoopConfig,
    gc: Option<(Duration, u32)>,
    layers: Vec<LayerFn>,
}

impl<S: Source> RuntimeBuilder<S> {
    /// Registers a dedup store; handlers with `store = …` of its type use it.
    /// Any [`LeaseStore`](crate::store::LeaseStore) or
    /// [`TxStore`](crate::store::TxStore) (`M` is inferred).
    pub fn store<T: DedupStore<M>, M>(mut self, store: T) -> Self {
        self.stores.insert(store);
        self
    }

    /// Runs only these handlers (by name) instead of all in the binary.
    pub fn handlers<I, N>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = N>,
        N: Into<String>,
    {
        self.only = Some(names.into_iter().map(Into::into).collect());
        self
    }

    /// Deliveries processed at once per handler (default 16); also the
    /// prefetch (twice that with `ack = "batch"`: the next batch arrives
    /// while one commits).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.cfg.concurrency = n.max(1);
        self
    }

    /// How long shutdown waits for in-flight handlers before handing their
    /// messages back (default 30 s).
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.cfg.shutdown_timeout = timeout;
        self
    }

    /// Delays between attempts while a store or the broker is unreachable
    /// (default 50 ms doubling to 5 s).
    pub fn outage_backoff(mut self, backoff: Backoff) -> Self {
        self.cfg.store_backoff = backoff;
        self
    }

    /// Every `every`, deletes the expired dedup records (`ttl = …`) of each
    /// registered store, `batch` rows per statement until none are left, and
    /// logs how many (`Runtime::purged` counts them). Off by default; with
    /// several processes, enabling it in one or all is both fine (SQL stores
    /// skip rows another purge holds).
    pub fn purge_expired_every(mut self, every: Duration, batch: u32) -> Self {
        self.gc = Some((every, batch.max(1)));
        self
    }

    /// Wraps every handler's service in `layer` (outside the built-in
    /// tracing and counters layers; the last added is the outermost). Each
    /// user layer costs one boxed future per call.
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<BoxService> + Send + Sync + 'static,
    {
        self.layers
            .push(Arc::new(move |inner| BoxService::new(layer.layer(inner))));
        self
    }

    /// Binds every handler to its store.
    pub fn build(self) -> Result<Runtime<S>, BuildError> {
        let registry = Registry::from_inventory()?;
        let chosen: Vec<&'static HandlerDescriptor> = match &self.only {
            None => registry.handlers.clone(),
            Some(names) => names
                .iter()
                .map(|n| {
                    registry
                        .handlers
                        .iter()
                        .copied()
                        .find(|h| h.meta.name == n)
                        .ok_or_else(|| BuildError::UnknownHandler {
                            name: n.clone(),
                            known: registry.names(),
                        })
                })
                .collect::<Result<_, _>>()?,
        };
        if chosen.is_empty() {
            return Err(BuildError::NoHandlers);
        }
        let mut handlers = Vec::with_capacity(chosen.len());
        for desc in chosen {
            if desc.meta.name_is_default {
                tracing::warn!(
                    handler = desc.meta.name,
                    "handler has no explicit `name = \"…\"`: its dedup records are namespaced by the fn name, so renaming the fn reprocesses every message; set a stable name"
                );
            }
            handlers.push(Handler {
                meta: &desc.meta,
                binding: desc.bind(&self.stores)?,
                metrics: Arc::default(),
            });
        }
        let gc = self.gc.map(|(every, batch)| Gc {
            every,
            batch,
            purgers: self.stores.purgers().collect(),
        });
        Ok(Runtime {
            source: Arc::new(self.source),
            handlers,
            stores: self.stores,
            layers: self.layers,
            cfg: self.cfg,
            gc,
            purged: Arc::new(AtomicU64::new(0)),
        })
    }
}

/// One bound handler and its counters.
struct Handler {
    meta: &'static HandlerMeta,
    binding: Binding,
    metrics: Arc<HandlerMetrics>,
}

/// Runs handlers against a source until stopped.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use idem_runtime::source::memory::MemoryBroker;
/// // No handler in this doctest binary: building reports it.
/// let err = idem_runtime::Runtime::builder(MemoryBroker::new()).build().unwrap_err();
/// assert!(err.to_string().contains("no handlers"));
/// # }
/// ```
pub struct Runtime<S> {
    source: Arc<S>,
    handlers: Vec<Handler>,
    stores: Stores,
    layers: Vec<LayerFn>,
    cfg: LoopConfig,
    gc: Option<Gc>,
    purged: Arc<AtomicU64>,
}

struct Gc {
    every: Duration,
    batch: u32,
    purgers: Vec<(&'static str, Purger)>,
}

impl<S> fmt::Debug for Runtime<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field(
                "handlers",
                &self
                    .handlers
                    .iter()
                    .map(|h| h.meta.name)
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Runtime<()> {
    /// Starts building a runtime over a source.
    pub fn builder<S: Source>(source: S) -> RuntimeBuilder<S> {
        RuntimeBuilder {
            source,
            stores: Stores::default(),
            only: None,
            gc: None,
            layers: Vec::new(),
            cfg: LoopConfig {
                concurrency: 16,
                shutdown_timeout: Duration::from_secs(30),
                store_backoff: Backoff {
                    min: Duration::from_millis(50),
                    max: Duration::from_secs(5),
                },
            },
        }
    }
}

impl<S: Source> Runtime<S> {
    /// Counters of every handler, by name.
    pub fn stats(&self) -> Vec<(&'static str, Stats)> {
        self.handlers
            .iter()
            .map(|h| (h.meta.name, h.metrics.snapshot()))
            .collect()
    }

    /// Counters of one handler.
    pub fn stats_of(&self, name: &str) -> Option<Stats> {
        self.handlers
            .iter()
            .find(|h| h.meta.name == name)
            .map(|h| h.metrics.snapshot())
    }

    /// The registered store of type `T`, e.g. to look at its records in a
    /// test: `runtime.store::<MemoryStore>()`.
    pub fn store<T: Send + Sync + 'static>(&self) -> Option<Arc<T>> {
        self.stores.get::<T>()
    }

    /// Expired dedup records deleted by the periodic purge so far.
    pub fn purged(&self) -> u64 {
        self.purged.load(Ordering::Relaxed)
    }

    /// Runs until `stop` is cancelled, then shuts down gracefully.
    pub async fn run(&self, stop: CancellationToken) {
        let mut loops = tokio::task::JoinSet::new();
        if let Some(gc) = &self.gc {
            for (kind, purge) in &gc.purgers {
                let (kind, purge, stop) = (*kind, purge.clone(), stop.clone());
                let (every, batch, purged) = (gc.every, gc.batch, self.purged.clone());
                loops.spawn(async move {
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(every) => {}
                        }
                        match purge(batch).await {
                            Ok(0) => tracing::debug!(store = kind, "no expired dedup records"),
                            Ok(n) => {
                                purged.fetch_add(n, Ordering::Relaxed);
                                tracing::info!(store = kind, deleted = n, "purged expired dedup records");
                            }
                            Err(e) => tracing::warn!(store = kind, error = %e, "purging expired dedup records failed; trying again next period"),
                        }
                    }
                });
            }
        }
        for handler in &self.handlers {
            // The built-in layers are composed statically; user layers wrap
            // the result, each erased.
            let counted = CountLayer(handler.metrics.clone())
                .layer(TraceLayer.layer(handler.binding.service.clone()));
            let transactional = handler.binding.transactional;
            let (meta, metrics) = (handler.meta, handler.metrics.clone());
            let (source, cfg, stop) = (self.source.clone(), self.cfg.clone(), stop.clone());
            if self.layers.is_empty() {
                loops.spawn(serve(
                    source,
                    meta,
                    counted,
                    transactional,
                    metrics,
                    cfg,
                    stop,
                ));
            } else {
                let layered = self
                    .layers
                    .iter()
                    .fold(BoxService::new(counted), |inner, layer| layer(inner));
                loops.spawn(serve(
                    source,
                    meta,
                    layered,
                    transactional,
                    metrics,
                    cfg,
                    stop,
                ));
            }
        }
        while let Some(r) = loops.join_next().await {
            if let Err(e) = r {
                tracing::error!("a consumer loop ended abnormally: {e}");
            }
        }
    }

    /// Runs until `signal` completes (e.g. `tokio::signal::ctrl_c()`), then
    /// shuts down gracefully.
    pub async fn run_until<F: Future + Send>(&self, signal: F) {
        let stop = CancellationToken::new();
        let trigger = stop.clone();
        tokio::join!(self.run(stop), async move {
            signal.await;
            trigger.cancel();
        });
    }
}

/// How many unacked deliveries the broker may hand a handler's consumer:
/// its concurrency; in `ack = "batch"` twice that, so that the next batch is
/// already delivered while one commits (the acks of a batch go out after its
/// commit: with a window of one batch the broker would send nothing during
/// it, and every batch would wait a broker round trip).
fn prefetch(ack: AckMode, concurrency: usize) -> usize {
    match ack {
        AckMode::Batch => concurrency.saturating_mul(2),
        _ => concurrency,
    }
}

/// One handler's subscription (retried until it opens) and its loop.
async fn serve<S: Source, Svc: Service>(
    source: Arc<S>,
    meta: &'static HandlerMeta,
    service: Svc,
    transactional: bool,
    metrics: Arc<HandlerMetrics>,
    cfg: LoopConfig,
    stop: CancellationToken,
) {
    let spec = SubscribeSpec {
        topic: meta.topic,
        group: meta.name,
        dead_letter: meta.dead_letter,
        prefetch: prefetch(meta.ack, cfg.concurrency),
    };
    let mut failures = 0u32;
    let sub = loop {
        match source.subscribe(spec).await {
            Ok(sub) => break sub,
            Err(e) => {
                failures += 1;
                tracing::warn!(handler = meta.name, error = %e, "subscribe failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(cfg.store_backoff.delay(failures)) => {}
                }
            }
        }
    };
    tracing::info!(handler = meta.name, topic = meta.topic, "consuming");
    consume(sub, service, transactional, metrics, cfg, stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_handler_has_the_next_batch_delivered_while_one_commits() {
        assert_eq!(prefetch(AckMode::Batch, 64), 128);
        assert_eq!(prefetch(AckMode::Auto, 16), 16);
        assert_eq!(prefetch(AckMode::Manual, 16), 16);
        assert_eq!(prefetch(AckMode::Batch, usize::MAX), usize::MAX);
    }
}
