//! What a SQL error means for the consumer, decided by error codes (each
//! dialect's table: SQLSTATE, driver error numbers), never by message text,
//! except where SQLite gives nothing else (see its dialect).

use sqlx::error::DatabaseError;

use crate::store::StoreError;

/// The meaning of a database error, as a dialect classifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The dedup table (or its schema) does not exist: `migrate()` was not
    /// run. [`StoreError::Config`] naming `migrate()`.
    MissingTable,
    /// The connection, the server or a lock failed, and the same work can
    /// succeed when tried again: lost connection, server shutting down,
    /// too many connections, deadlock, serialization failure, lock wait
    /// timeout, out of disk or memory. [`StoreError::Unavailable`]: idem
    /// backs off and retries.
    Transient,
    /// Anything retrying cannot fix (permissions, a value that does not fit,
    /// a syntax error): [`StoreError::Config`] with the database's message.
    Permanent,
}

/// Maps a driver error of `store` on `table`. Errors from the database are
/// classified by the dialect; the driver's own are transient when they are
/// about the connection (I/O, TLS, pool, protocol), permanent otherwise
/// (decoding, encoding, configuration).
pub(super) fn map_err(
    store: &'static str,
    table: &str,
    classify: fn(&dyn DatabaseError) -> Failure,
    e: sqlx::Error,
) -> StoreError {
    let failure = match &e {
        sqlx::Error::Database(db) => classify(&**db),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::BeginFailed => Failure::Transient,
        _ => Failure::Permanent,
    };
    match failure {
        Failure::Transient => StoreError::unavailable(store, e),
        Failure::MissingTable => StoreError::Config {
            store,
            message: format!(
                "dedup table {table:?} does not exist: call the store's `migrate()` once at start-up ({e})"
            ),
        },
        Failure::Permanent => StoreError::Config {
            store,
            message: format!("{e} (on dedup table {table:?})"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Fake(Failure);
    impl std::fmt::Display for Fake {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "fake {:?}", self.0)
        }
    }
    impl std::error::Error for Fake {}
    impl DatabaseError for Fake {
        fn message(&self) -> &str {
            "fake"
        }
        fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn by_fake(e: &dyn DatabaseError) -> Failure {
        e.try_downcast_ref::<Fake>()
            .map_or(Failure::Permanent, |f| f.0)
    }

    fn map(e: sqlx::Error) -> StoreError {
        map_err("test", "t", by_fake, e)
    }

    #[test]
    fn each_failure_maps_to_its_store_error() {
        let e = map(sqlx::Error::Database(Box::new(Fake(Failure::MissingTable))));
        assert!(
            matches!(&e, StoreError::Config { message, .. } if message.contains("migrate()")),
            "{e}"
        );
        let e = map(sqlx::Error::Database(Box::new(Fake(Failure::Transient))));
        assert!(matches!(e, StoreError::Unavailable { .. }), "{e}");
        let e = map(sqlx::Error::Database(Box::new(Fake(Failure::Permanent))));
        assert!(
            matches!(&e, StoreError::Config { message, .. } if message.contains("fake Permanent")),
            "{e}"
        );
    }

    #[test]
    fn driver_errors_about_the_connection_are_transient() {
        for e in [
            sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
            sqlx::Error::Protocol("unexpected packet".into()),
        ] {
            assert!(matches!(map(e), StoreError::Unavailable { .. }));
        }
        for e in [
            sqlx::Error::RowNotFound,
            sqlx::Error::ColumnNotFound("result".into()),
            sqlx::Error::Decode("not a number".into()),
        ] {
            assert!(matches!(map(e), StoreError::Config { .. }));
        }
    }
}
