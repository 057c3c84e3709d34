//! Wire-level counting for the SQL store tests: a loopback proxy in front of
//! a database server that reads the protocol as it passes and counts round
//! trips and statement executions. Each database's helper (`pg.rs`,
//! `mysql.rs`) supplies the protocol; loaded from them with
//! `#[path = "wire.rs"] mod wire;`.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// Counts round trips and statement executions between a pool and the server.
#[derive(Clone, Default)]
pub struct Wire {
    inner: Arc<Mutex<WireCounts>>,
}

#[derive(Default, Debug, Clone)]
pub struct WireCounts {
    /// Client messages the server answers: round trips.
    pub round_trips: u64,
    /// Executions per SQL text (prepared: per execution; simple: per query).
    pub executions: HashMap<String, u64>,
}

impl Wire {
    pub fn snapshot(&self) -> WireCounts {
        self.inner.lock().unwrap().clone()
    }

    /// Executions of statements whose SQL contains `needle`.
    pub fn executions_of(&self, needle: &str) -> u64 {
        self.inner
            .lock()
            .unwrap()
            .executions
            .iter()
            .filter(|(sql, _)| sql.contains(needle))
            .map(|(_, n)| n)
            .sum()
    }

    pub fn round_trips(&self) -> u64 {
        self.inner.lock().unwrap().round_trips
    }

    pub fn round_trip(&self) {
        self.inner.lock().unwrap().round_trips += 1;
    }

    pub fn executed(&self, sql: &str) {
        *self
            .inner
            .lock()
            .unwrap()
            .executions
            .entry(sql.to_owned())
            .or_default() += 1;
    }
}

/// How one database's protocol is read. `Conn` is what the two directions
/// of one connection share (prepared statements by name or id).
pub trait Protocol: Send + Sync + 'static {
    type Conn: Default + Send + Sync + 'static;

    /// Copies client → server, counting as it goes.
    fn client_to_server(
        from: OwnedReadHalf,
        to: OwnedWriteHalf,
        wire: Wire,
        conn: Arc<Self::Conn>,
    ) -> impl Future<Output = std::io::Result<()>> + Send;

    /// Copies server → client, learning what the counting needs.
    fn server_to_client(
        from: OwnedReadHalf,
        to: OwnedWriteHalf,
        conn: Arc<Self::Conn>,
    ) -> impl Future<Output = std::io::Result<()>> + Send;
}

/// Starts a counting proxy to `upstream` (`host:port`); returns its port and
/// the counter.
pub async fn proxy<P: Protocol>(upstream: String) -> (u16, Wire) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let port = listener.local_addr().unwrap().port();
    let wire = Wire::default();
    let counts = wire.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            let counts = counts.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(&upstream).await else {
                    return;
                };
                // Without these, Nagle + delayed ACK add ~40 ms per message.
                let _ = server.set_nodelay(true);
                let _ = client.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let conn = Arc::new(P::Conn::default());
                let down = tokio::spawn(P::server_to_client(sr, cw, conn.clone()));
                let _ = P::client_to_server(cr, sw, counts, conn).await;
                down.abort();
            });
        }
    });
    (port, wire)
}

/// The NUL-terminated string at `at`, and the offset after it.
pub fn cstr(body: &[u8], at: usize) -> (String, usize) {
    let end = body[at..]
        .iter()
        .position(|&b| b == 0)
        .map_or(body.len(), |i| at + i);
    (
        String::from_utf8_lossy(&body[at..end]).into_owned(),
        end + 1,
    )
}
