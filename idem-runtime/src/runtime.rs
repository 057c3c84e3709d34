//! The runtime: collects the annotated handlers, binds each to its store,
//! opens a subscription per handler and runs their consumer loops until
//! told to stop.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::consumer::{LoopConfig, consume};
use crate::handler::{Backoff, HandlerDescriptor, HandlerMeta};
use crate::metrics::Stats;
use crate::process::ErasedHandler;
use crate::source::{Source, SubscribeSpec};
use crate::store::{DedupStore, NoStore, StoreError};
use futures_util::future::BoxFuture;
use std::sync::atomic::{AtomicU64, Ordering};

pub(crate) type BindFn =
    fn(&'static HandlerMeta, &Stores) -> Result<Arc<dyn ErasedHandler>, BuildError>;

/// Deletes up to one batch of expired records of one store (type-erased).
type Purger = Arc<dyn Fn(u32) -> BoxFuture<'static, Result<u64, StoreError>> + Send + Sync>;

/// The dedup stores handlers can use, one per store type.
#[derive(Default)]
pub struct Stores {
    map: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
    purgers: HashMap<TypeId, (&'static str, Purger)>,
}

impl Stores {
    /// Adds (or replaces) the store of type `S`.
    pub fn insert<S: DedupStore>(&mut self, store: S) {
        let store = Arc::new(store);
        let kind = store.kind();
        let for_gc = store.clone();
        let purger: Purger = Arc::new(move |batch| {
            let store = for_gc.clone();
            Box::pin(async move { crate::store::purge_all(&*store, batch).await })
        });
        self.purgers.insert(TypeId::of::<S>(), (kind, purger));
        self.map.insert(TypeId::of::<S>(), store);
    }

    pub(crate) fn get<S: DedupStore>(&self) -> Option<Arc<S>> {
        if TypeId::of::<S>() == TypeId::of::<NoStore>()
            && !self.map.contains_key(&TypeId::of::<S>())
        {
            return (Arc::new(NoStore) as Arc<dyn Any + Send + Sync>)
                .downcast()
                .ok();
        }
        self.map
            .get(&TypeId::of::<S>())
            .cloned()
            .and_then(|s| s.downcast().ok())
    }
}

impl fmt::Debug for Stores {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stores")
            .field("count", &self.map.len())
            .finish()
    }
}

/// The runtime could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// Two handlers share a name (the namespace of their dedup records).
    #[error(
        "two handlers are named {name:?}: `{first}` and `{second}`; names are the namespace of dedup records and must be unique: set `name = \"…\"` on one of them"
    )]
    DuplicateName {
        /// The shared name.
        name: String,
        /// One handler's path.
        first: String,
        /// The other's.
        second: String,
    },
    /// A handler's store was not registered on the builder.
    #[error(
        "handler {handler:?} uses `store = {store}` but no store of type `{store_type}` was registered: add `.store(…)` with one to the runtime builder"
    )]
    MissingStore {
        /// The handler.
        handler: String,
        /// The store as written in the attribute.
        store: String,
        /// The Rust type expected.
        store_type: &'static str,
    },
    /// `handlers([...])` named a handler that does not exist.
    #[error("no handler named {name:?}; known handlers: {known}")]
    UnknownHandler {
        /// The unknown name.
        name: String,
        /// The names that exist.
        known: String,
    },
    /// There is nothing to run.
    #[error(
        "no handlers to run: annotate an async fn with #[idem::idempotent(topic = \"…\", …)] in a crate that is linked into this binary"
    )]
    NoHandlers,
}

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
}

impl<S: Source> RuntimeBuilder<S> {
    /// Registers a dedup store; handlers with `store = …` of its type use it.
    pub fn store<T: DedupStore>(mut self, store: T) -> Self {
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

    /// Deliveries processed at once per handler (default 16); also the prefetch.
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
            handlers.push((desc.bind)(&desc.meta, &self.stores)?);
        }
        let purgers = match self.gc {
            Some(_) => self.stores.purgers.into_values().collect(),
            None => Vec::new(),
        };
        Ok(Runtime {
            source: Arc::new(self.source),
            handlers,
            cfg: self.cfg,
            gc: self.gc.map(|(every, batch)| Gc {
                every,
                batch,
                purgers,
            }),
            purged: Arc::new(AtomicU64::new(0)),
        })
    }
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
    handlers: Vec<Arc<dyn ErasedHandler>>,
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
                    .map(|h| h.meta().name)
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
            .map(|h| (h.meta().name, h.metrics().snapshot()))
            .collect()
    }

    /// Counters of one handler.
    pub fn stats_of(&self, name: &str) -> Option<Stats> {
        self.handlers
            .iter()
            .find(|h| h.meta().name == name)
            .map(|h| h.metrics().snapshot())
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
            let handler = handler.clone();
            let source = self.source.clone();
            let cfg = self.cfg.clone();
            let stop = stop.clone();
            loops.spawn(async move {
                let meta = handler.meta();
                let spec = SubscribeSpec {
                    topic: meta.topic,
                    group: meta.name,
                    dead_letter: meta.dead_letter,
                    prefetch: cfg.concurrency,
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
                consume(sub, handler, cfg, stop).await;
            });
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
