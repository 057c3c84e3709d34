//! Binding: a handler's descriptor (what `inventory` collects from
//! `#[idempotent]`) bound at build time to the store of its type, and erased
//! into a [`BoxService`] the consumer loop can drive whatever the handler's
//! types. Also the registry of stores and what can go wrong while binding.
//!
//! Imports the contract only. The pipeline implements [`Service`] for
//! [`Bound`]; this module relies on that impl without naming the pipeline.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::handler::{BatchHandlerFn, Handler, HandlerFn, HandlerMeta};
use crate::service::{BoxService, Service};
use crate::store::{DedupStore, NoStore, StoreError};

/// A handler bound to its store: what the pipeline runs. `K` says how it
/// is called: [`One`] message or a batch of [`Many`].
pub struct Bound<H: Handler<M>, M, K = One> {
    pub(crate) handler: H,
    pub(crate) meta: &'static HandlerMeta,
    pub(crate) store: Arc<<H as Handler<M>>::Store>,
    // `fn() -> _`: the mode and the shape are type-level tags, never values,
    // and must not make the handler !Send or !Sync.
    tags: PhantomData<fn() -> (M, K)>,
}

/// A [`HandlerFn`]: one message per call.
#[derive(Debug)]
pub enum One {}

/// A [`BatchHandlerFn`]: a batch per call.
#[derive(Debug)]
pub enum Many {}

/// A handler ready to run: its service, and the facts the loop settles by.
pub(crate) struct Binding {
    pub(crate) service: BoxService,
    /// Whether the store's record commits with the handler's writes.
    pub(crate) transactional: bool,
}

type BindFn = fn(&'static HandlerMeta, &Stores) -> Result<Binding, BuildError>;

/// What `inventory` collects: one per annotated handler.
pub struct HandlerDescriptor {
    /// The attribute's settings.
    pub meta: HandlerMeta,
    bind: BindFn,
}

impl fmt::Debug for HandlerDescriptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerDescriptor")
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

impl HandlerDescriptor {
    /// The descriptor of handler `H` in store mode `M` (used by generated
    /// code, which leaves `M` to the compiler).
    pub const fn of<H, M>() -> Self
    where
        H: HandlerFn<M> + Default,
        M: 'static,
        Bound<H, M, One>: Service,
    {
        HandlerDescriptor {
            meta: H::META,
            bind: bind::<H, M, One>,
        }
    }

    /// The descriptor of batch handler `H` in store mode `M`.
    pub const fn of_batch<H, M>() -> Self
    where
        H: BatchHandlerFn<M> + Default,
        M: 'static,
        Bound<H, M, Many>: Service,
    {
        HandlerDescriptor {
            meta: H::META,
            bind: bind::<H, M, Many>,
        }
    }

    pub(crate) fn bind(&'static self, stores: &Stores) -> Result<Binding, BuildError> {
        (self.bind)(&self.meta, stores)
    }
}

inventory::collect!(HandlerDescriptor);

fn bind<H, M, K>(meta: &'static HandlerMeta, stores: &Stores) -> Result<Binding, BuildError>
where
    H: Handler<M> + Default,
    M: 'static,
    K: 'static,
    Bound<H, M, K>: Service,
{
    let store = stores
        .get::<H::Store>()
        .ok_or_else(|| BuildError::MissingStore {
            handler: meta.name.to_owned(),
            store: meta.store.to_owned(),
            store_type: std::any::type_name::<H::Store>(),
        })?;
    Ok(Binding {
        service: BoxService::new(Bound {
            handler: H::default(),
            meta,
            store,
            tags: PhantomData,
        }),
        transactional: <H::Store as DedupStore<M>>::TRANSACTIONAL,
    })
}

/// Deletes up to one batch of expired records of one store (type-erased).
pub(crate) type Purger =
    Arc<dyn Fn(u32) -> BoxFuture<'static, Result<u64, StoreError>> + Send + Sync>;

/// The dedup stores handlers can use, one per store type.
#[derive(Default)]
pub struct Stores {
    map: HashMap<TypeId, Arc<dyn Any + Send + Sync>>,
    purgers: HashMap<TypeId, (&'static str, Purger)>,
}

impl Stores {
    /// Adds (or replaces) the store of type `S`.
    pub fn insert<S: DedupStore<M>, M>(&mut self, store: S) {
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

    /// The registered store of type `S` (the built-in "no store" is always there).
    pub fn get<S: Send + Sync + 'static>(&self) -> Option<Arc<S>> {
        if let Some(store) = self.map.get(&TypeId::of::<S>()) {
            return store.clone().downcast().ok();
        }
        (TypeId::of::<S>() == TypeId::of::<NoStore>())
            .then(|| Arc::new(NoStore) as Arc<dyn Any + Send + Sync>)
            .and_then(|s| s.downcast().ok())
    }

    /// The periodic purges of every store, by store kind.
    pub(crate) fn purgers(&self) -> impl Iterator<Item = (&'static str, Purger)> + '_ {
        self.purgers.values().map(|(k, p)| (*k, p.clone()))
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
