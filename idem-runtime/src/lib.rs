//! Runtime of [idem](https://docs.rs/idem): the consumer loop, dedup stores
//! and sources behind `#[idempotent]`. Users depend on the `idem` facade,
//! which re-exports this crate and the macro.
//!
//! # Layers
//!
//! Modules depend one way, each only on the layers above it:
//!
//! 1. **Handler contract** — [`handler`] (what the macro generates:
//!    [`HandlerFn`], [`HandlerMeta`]), [`key`], [`delivery`], [`ack`],
//!    [`codec`], [`fingerprint`], and [`service`] (the message path as a
//!    [`Service`](service::Service) of attempts and outcomes, with
//!    [`Layer`](service::Layer)s around it). Beside it, the two extension
//!    points with their implementations: [`store`] ([`LeaseStore`],
//!    [`TxStore`]) and [`source`] ([`Source`], [`Subscription`]).
//! 2. **Binding** — `binding`: a handler's descriptor bound to its store,
//!    type-erased; the store registry ([`Stores`]); [`BuildError`].
//! 3. **Pipeline** — `pipeline`: decode → key → claim → call → settle for one
//!    unit of work, the claim guard, the retry policy, and the built-in
//!    tracing and counters layers.
//! 4. **Consumer loop** — `consumer`: fetch, lanes, concurrency, and the
//!    ack mode as a settle strategy.
//! 5. **Runtime** — [`runtime`]: builder, registry, shutdown.
#![forbid(unsafe_code)]

pub mod ack;
mod binding;
pub mod codec;
mod consumer;
pub mod delivery;
pub mod fingerprint;
pub mod handler;
pub mod key;
pub mod metrics;
mod pipeline;
pub mod redact;
pub mod runtime;
pub mod service;
pub mod source;
pub mod store;
mod sync;
#[cfg(feature = "testing")]
pub mod testing;

pub use ack::{Ack, AckMode};
pub use binding::{BuildError, HandlerDescriptor, Stores};
pub use codec::{Codec, Json};
pub use delivery::{Delivery, Headers, Receipt};
pub use fingerprint::{Fingerprint, Fingerprinter};
pub use handler::{
    Backoff, Batch, BatchError, BatchHandlerFn, BatchResult, Handler, HandlerFn, HandlerMeta,
    HandlerResult, OnInProgress, OnMissingKey, Payload,
};
pub use key::{Key, KeyError, KeyExtractor};
pub use metrics::Stats;
pub use runtime::{Registry, Runtime, RuntimeBuilder};
pub use source::{DeadLetter, Source, SourceError, Subscription};
#[cfg(feature = "mysql")]
pub use store::mysql;
#[cfg(feature = "postgres")]
pub use store::postgres;
#[cfg(any(feature = "sqlite", feature = "postgres", feature = "mysql"))]
pub use store::sql::Tx;
pub use store::{DedupStore, LeaseStore, NoStore, NoTx, StoreError, TxStore};
pub use tokio_util::sync::CancellationToken;

/// What generated code refers to. Not a public API: it changes without notice.
#[doc(hidden)]
pub mod __private {
    pub use crate::binding::HandlerDescriptor;
    pub use crate::key::{Absent, Field, Header, KeyPart, MessageId, OptionalKeyPart};
    pub use crate::store::mode::Transactional;
    pub use inventory;
    pub use serde;
    pub use std::sync::LazyLock;
    pub use std::time::Duration;

    /// `T` itself: lets generated code spell a type with a span of its own.
    pub type This<T> = T;

    /// A `with = <expression>` extractor, evaluated once and kept.
    pub type BoxedExtractor<P> = Box<dyn crate::key::KeyExtractor<P>>;

    /// The built-in stores by attribute name. A store whose cargo feature is
    /// off is a placeholder type whose "not a dedup store" error names the feature.
    #[allow(non_camel_case_types)]
    pub mod stores {
        pub use crate::store::memory::MemoryStore as Memory;
        #[cfg(feature = "sqlite")]
        pub use crate::store::sqlite::SqliteStore as Sqlite;
        /// Placeholder: enable the `sqlite` feature of idem.
        #[cfg(not(feature = "sqlite"))]
        pub struct Sqlite_RequiresIdemFeature_sqlite;
        #[cfg(feature = "postgres")]
        pub use crate::store::postgres::PostgresStore as Postgres;
        #[cfg(not(feature = "sqlite"))]
        pub use Sqlite_RequiresIdemFeature_sqlite as Sqlite;
        /// Placeholder: enable the `postgres` feature of idem.
        #[cfg(not(feature = "postgres"))]
        pub struct Postgres_RequiresIdemFeature_postgres;
        #[cfg(feature = "mysql")]
        pub use crate::store::mysql::MysqlStore as Mysql;
        #[cfg(not(feature = "postgres"))]
        pub use Postgres_RequiresIdemFeature_postgres as Postgres;
        /// Placeholder: enable the `mysql` feature of idem.
        #[cfg(not(feature = "mysql"))]
        pub struct Mysql_RequiresIdemFeature_mysql;
        #[cfg(not(feature = "mysql"))]
        pub use Mysql_RequiresIdemFeature_mysql as Mysql;

        #[cfg(feature = "redis")]
        pub use crate::store::redis::RedisStore as Redis;
        #[cfg(not(feature = "redis"))]
        pub use Redis_RequiresIdemFeature_redis as Redis;
        /// Placeholder: enable the `redis` feature of idem.
        #[cfg(not(feature = "redis"))]
        pub struct Redis_RequiresIdemFeature_redis;
    }

    /// The built-in codecs by attribute name (`codec = "msgpack"`). A codec
    /// whose cargo feature is off is a placeholder type whose "cannot decode"
    /// error names the feature.
    #[allow(non_camel_case_types)]
    pub mod codecs {
        pub use crate::codec::Json;
        #[cfg(feature = "msgpack")]
        pub use crate::codec::MsgPack;
        /// Placeholder: enable the `msgpack` feature of idem.
        #[cfg(not(feature = "msgpack"))]
        pub struct MsgPack_RequiresIdemFeature_msgpack;
        #[cfg(feature = "protobuf")]
        pub use crate::codec::Protobuf;
        #[cfg(not(feature = "msgpack"))]
        pub use MsgPack_RequiresIdemFeature_msgpack as MsgPack;
        /// Placeholder: enable the `protobuf` feature of idem.
        #[cfg(not(feature = "protobuf"))]
        pub struct Protobuf_RequiresIdemFeature_protobuf;
        #[cfg(not(feature = "protobuf"))]
        pub use Protobuf_RequiresIdemFeature_protobuf as Protobuf;
    }

    /// Compile-time check that a store hands the handler a transaction.
    pub const fn assert_transactional<S: crate::store::TxStore>() {}
    /// Compile-time check of the payload type (serde codecs).
    pub const fn assert_payload<P: crate::handler::Payload>() {}
    /// Compile-time check that codec `C` decodes payload type `P`.
    pub const fn assert_codec<P, C: crate::codec::Codec<P>>() {}
    /// Compile-time check of the store type.
    pub const fn assert_store<S: crate::store::DedupStore<M>, M>() {}
}
