//! A broker connection opened lazily, re-opened with backoff when an
//! operation reports it lost, and closed for good on shutdown.

use std::fmt;
use std::future::Future;
use std::sync::Mutex;

use tokio::time::Instant;

use super::lock;
use crate::handler::Backoff;
use crate::source::SourceError;

/// Opens one broker connection (with whatever channels, consumers or
/// streams ride on it). [`Reconnecting`] calls it again after a loss.
pub(crate) trait Connector: Send + Sync + 'static {
    /// What the source uses; cheap to clone (handles to shared state).
    type Conn: Clone + Send + Sync + 'static;
    /// The source's name in errors and logs.
    const SOURCE: &'static str;
    /// Connects; the error says what failed and how to fix it.
    fn connect(&self) -> impl Future<Output = Result<Self::Conn, SourceError>> + Send;

    /// Closes a connection for good, gracefully (what
    /// [`Subscription::close`](crate::source::Subscription::close) promises);
    /// by default it is dropped.
    fn close(&self, conn: Self::Conn) -> impl Future<Output = ()> + Send {
        async move { drop(conn) }
    }
}

/// A live connection and its generation: a receipt made on generation `n`
/// means nothing to generation `n + 1` (AMQP delivery tags, say).
#[derive(Clone)]
pub(crate) struct Live<T> {
    pub(crate) generation: u64,
    pub(crate) conn: T,
}

struct State<T> {
    current: Option<Live<T>>,
    generation: u64,
    failures: u32,
    retry_at: Option<Instant>,
    closed: bool,
}

/// A connection that is opened lazily, dropped when an operation reports it
/// lost, and opened again with exponential backoff.
///
/// `get` never sleeps: before the next allowed attempt it answers
/// [`SourceError::Unavailable`] at once, and the consumer loop backs off on
/// its side. One caller connects at a time; the others wait for its result.
pub(crate) struct Reconnecting<C: Connector> {
    connector: C,
    backoff: Backoff,
    state: Mutex<State<C::Conn>>,
    connecting: tokio::sync::Mutex<()>,
}

impl<C: Connector> Reconnecting<C> {
    pub(crate) fn new(connector: C, backoff: Backoff) -> Self {
        Reconnecting {
            connector,
            backoff,
            state: Mutex::new(State {
                current: None,
                generation: 0,
                failures: 0,
                retry_at: None,
                closed: false,
            }),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    #[cfg_attr(
        not(any(feature = "redis-streams", feature = "rabbitmq")),
        allow(dead_code)
    )]
    pub(crate) fn connector(&self) -> &C {
        &self.connector
    }

    /// The live connection, if there is one; never connects.
    #[cfg_attr(not(feature = "rabbitmq"), allow(dead_code))]
    pub(crate) fn current(&self) -> Option<Live<C::Conn>> {
        lock(&self.state).current.clone()
    }

    /// The live connection, connecting first if there is none.
    pub(crate) async fn get(&self) -> Result<Live<C::Conn>, SourceError> {
        if let Some(live) = self.current() {
            return Ok(live);
        }
        let _gate = self.connecting.lock().await;
        {
            let st = lock(&self.state);
            if let Some(live) = &st.current {
                return Ok(live.clone());
            }
            if st.closed {
                return Err(SourceError::Closed {
                    source_name: C::SOURCE,
                });
            }
            if let Some(at) = st.retry_at {
                let now = Instant::now();
                if now < at {
                    return Err(SourceError::Unavailable {
                        source_name: C::SOURCE,
                        message: format!(
                            "not connected; next connection attempt in {:?} (after {} failed attempts)",
                            at - now,
                            st.failures
                        ),
                    });
                }
            }
        }
        match self.connector.connect().await {
            Ok(conn) => {
                let mut st = lock(&self.state);
                if st.closed {
                    // Closed while connecting: the new connection is dropped.
                    return Err(SourceError::Closed {
                        source_name: C::SOURCE,
                    });
                }
                st.generation += 1;
                if st.generation > 1 || st.failures > 0 {
                    tracing::info!(
                        source = C::SOURCE,
                        generation = st.generation,
                        "reconnected"
                    );
                }
                st.failures = 0;
                st.retry_at = None;
                let live = Live {
                    generation: st.generation,
                    conn,
                };
                st.current = Some(live.clone());
                Ok(live)
            }
            Err(e) => {
                let mut st = lock(&self.state);
                st.failures = st.failures.saturating_add(1);
                let delay = self.backoff.delay(st.failures);
                st.retry_at = Some(Instant::now() + delay);
                tracing::warn!(source = C::SOURCE, error = %e, retry_in = ?delay, "connection attempt failed");
                Err(e)
            }
        }
    }

    /// Ends it for good: closes the live connection (if any) with
    /// [`Connector::close`]; every later `get` fails with
    /// [`SourceError::Closed`] and nothing reconnects.
    pub(crate) async fn close(&self) {
        let live = {
            let mut st = lock(&self.state);
            st.closed = true;
            st.current.take()
        };
        if let Some(live) = live {
            self.connector.close(live.conn).await;
        }
    }

    /// Reports generation `generation` lost; the next `get` reconnects.
    /// A report about an older generation is ignored.
    pub(crate) fn lost(&self, generation: u64, why: &dyn fmt::Display) {
        let mut st = lock(&self.state);
        if st
            .current
            .as_ref()
            .is_some_and(|l| l.generation == generation)
        {
            st.current = None;
            tracing::warn!(source = C::SOURCE, error = %why, "connection lost; reconnecting with backoff");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    struct Flaky {
        fail_first: u32,
        calls: AtomicU32,
        closed: AtomicU32,
    }

    impl Connector for Flaky {
        type Conn = u32;
        const SOURCE: &'static str = "test";
        async fn connect(&self) -> Result<u32, SourceError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            if n < self.fail_first {
                Err(SourceError::Unavailable {
                    source_name: "test",
                    message: "refused".into(),
                })
            } else {
                Ok(n)
            }
        }
        async fn close(&self, _: u32) {
            self.closed.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn reconnects_after_backoff_and_ignores_stale_loss_reports() {
        let r = Reconnecting::new(
            Flaky {
                fail_first: 1,
                calls: AtomicU32::new(0),
                closed: AtomicU32::new(0),
            },
            Backoff {
                min: Duration::from_secs(1),
                max: Duration::from_secs(1),
            },
        );
        assert!(r.get().await.is_err());
        // Before the backoff ran out: no new attempt.
        assert!(r.get().await.is_err());
        assert_eq!(r.connector().calls.load(Ordering::SeqCst), 1);
        tokio::time::advance(Duration::from_secs(1)).await;
        let live = r.get().await.unwrap();
        assert_eq!((live.generation, live.conn), (1, 1));
        r.lost(0, &"stale");
        assert_eq!(r.get().await.unwrap().generation, 1);
        r.lost(1, &"reset by peer");
        let live = r.get().await.unwrap();
        assert_eq!((live.generation, live.conn), (2, 2));
        // Closed: the live connection is closed once, nothing reconnects.
        r.close().await;
        r.close().await;
        assert_eq!(r.connector().closed.load(Ordering::SeqCst), 1);
        assert!(matches!(r.get().await, Err(SourceError::Closed { .. })));
        assert_eq!(r.connector().calls.load(Ordering::SeqCst), 3);
    }
}
