//! Redis helpers of the integration tests: the shared server (`REDIS_URL`,
//! unique key prefixes per test), private `redis-server` processes on free
//! loopback ports (to kill and restart, or to read exact command counts), a
//! three-master Redis Cluster, and a proxy that counts round trips.
//!
//! Nothing here skips: a missing server or binary is a test failure whose
//! message names the fix.
#![allow(dead_code, unreachable_pub)]

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use idem::store::redis::{RedisStore, RedisStoreBuilder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The shared server's URL.
pub fn shared_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A key prefix no other test (or run) uses.
pub fn unique_prefix(test: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("idem-test:{test}:{}-{nanos:x}", std::process::id())
}

/// A store on the shared server; panics with the fix if it is unreachable.
pub async fn shared_store(builder: RedisStoreBuilder) -> RedisStore {
    match builder.connect().await {
        Ok(s) => s,
        Err(e) => panic!(
            "cannot reach the shared Redis at {} ({e}): start it with ./scripts/services.sh or point REDIS_URL at one; Redis tests fail instead of skipping",
            shared_url()
        ),
    }
}

/// A connection for looking at keys directly: one server or a cluster.
#[derive(Clone)]
pub enum Inspect {
    /// One server.
    Single(redis::aio::MultiplexedConnection),
    /// A cluster.
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Inspect {
    /// Connects to one server.
    pub async fn single(url: &str) -> Inspect {
        let client = redis::Client::open(url).expect("redis url");
        let conn = client
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| {
                panic!("cannot reach Redis at {url} ({e}): start it with ./scripts/services.sh")
            });
        Inspect::Single(conn)
    }

    /// Connects to a cluster.
    pub async fn cluster(nodes: &[String]) -> Inspect {
        let client = redis::cluster::ClusterClient::new(nodes.to_vec()).expect("cluster nodes");
        Inspect::Cluster(client.get_async_connection().await.expect("cluster"))
    }

    /// Runs one command.
    pub async fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> T {
        let r = match self {
            Inspect::Single(c) => cmd.query_async(&mut c.clone()).await,
            Inspect::Cluster(c) => cmd.query_async(&mut c.clone()).await,
        };
        r.unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
    }

    /// `GET key` as text.
    pub async fn get(&self, key: &str) -> Option<String> {
        self.run(redis::cmd("GET").arg(key)).await
    }

    /// `PTTL key`.
    pub async fn pttl(&self, key: &str) -> i64 {
        self.run(redis::cmd("PTTL").arg(key)).await
    }

    /// Deletes every key under `prefix` (tests end with this so the shared
    /// server stays clean; records also carry TTLs in case a test fails).
    pub async fn cleanup(&self, prefix: &str) {
        let pattern = format!("{prefix}:*");
        match self {
            Inspect::Single(c) => {
                let mut c = c.clone();
                let mut cursor = 0u64;
                loop {
                    let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut c)
                        .await
                        .expect("scan");
                    if !keys.is_empty() {
                        let _: () = redis::cmd("DEL")
                            .arg(&keys)
                            .query_async(&mut c)
                            .await
                            .expect("del");
                    }
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
            // Private clusters are thrown away whole.
            Inspect::Cluster(_) => {}
        }
    }
}

fn free_port(with_bus: bool) -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let port = l.local_addr().expect("local addr").port();
        if !with_bus || (port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()) {
            return port;
        }
    }
}

/// A `redis-server` process of this test on a free loopback port, without
/// persistence, in its own temp dir. Killed (SIGKILL) and removed on drop.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a server with extra arguments (`["--requirepass", "x"]`, …).
    pub async fn start(extra: &[&str]) -> RedisServer {
        Self::start_with(extra, false).await
    }

    async fn start_with(extra: &[&str], cluster: bool) -> RedisServer {
        for _ in 0..5 {
            let port = free_port(cluster);
            let dir = std::env::temp_dir().join(format!(
                "idem-redis-{}-{port}-{}",
                std::process::id(),
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos())
            ));
            std::fs::create_dir_all(&dir).expect("temp dir for redis-server");
            let mut server = RedisServer {
                port,
                dir,
                args: extra.iter().map(|s| s.to_string()).collect(),
                child: None,
            };
            if server.spawn().await {
                return server;
            }
        }
        panic!("could not start a private redis-server on a free port after 5 tries");
    }

    async fn spawn(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-server ({e}): install it (./scripts/services.sh does); Redis tests fail instead of skipping")
            });
        self.child = Some(child);
        for _ in 0..100 {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(_)) = c.try_wait()
            {
                self.child = None;
                return false; // exited: port taken meanwhile
            }
            if ping(self.port).await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill();
        false
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server with SIGKILL (a crash: no shutdown, no save).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, empty (no persistence).
    pub async fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn().await,
            "redis-server did not come back on port {}",
            self.port
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether something on the port answers like Redis (`+PONG`, or an auth
/// error from a password-protected server).
async fn ping(port: u16) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if s.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await,
        Ok(Ok(n)) if n > 0 && (buf[0] == b'+' || buf.starts_with(b"-NOAUTH"))
    )
}

/// A Redis Cluster of three masters (no replicas) on loopback ports, made
/// of private `redis-server` processes and `redis-cli --cluster create`.
pub struct RedisCluster {
    /// The three nodes.
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts the nodes, creates the cluster and waits until every node
    /// reports `cluster_state:ok`.
    pub async fn start() -> RedisCluster {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            nodes.push(
                RedisServer::start_with(
                    &["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"],
                    true,
                )
                .await,
            );
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = tokio::process::Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .await
            .unwrap_or_else(|e| {
                panic!("cannot run redis-cli ({e}): install redis-tools (./scripts/services.sh installs redis-server, which brings it)")
            });
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        for node in &cluster.nodes {
            let inspect = Inspect::single(&node.url()).await;
            let mut ok = false;
            for _ in 0..200 {
                let info: String = inspect.run(redis::cmd("CLUSTER").arg("INFO")).await;
                if info.contains("cluster_state:ok") {
                    ok = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(
                ok,
                "cluster node {} never reached cluster_state:ok",
                node.url()
            );
        }
        cluster
    }

    /// The nodes' URLs.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

/// A TCP proxy in front of a Redis server that counts round trips: a
/// "turn" is client data arriving after the server last spoke, so a
/// pipeline (written at once) is one turn however many commands it holds.
pub struct TurnCounter {
    /// Where clients connect.
    pub addr: SocketAddr,
    turns: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl TurnCounter {
    /// Starts a proxy to `127.0.0.1:<port>`.
    pub async fn start(upstream_port: u16) -> TurnCounter {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let turns = Arc::new(AtomicU64::new(0));
        let counted = turns.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream_port)).await
                else {
                    continue;
                };
                let turns = counted.clone();
                tokio::spawn(async move {
                    let client_spoke_last = Arc::new(AtomicBool::new(false));
                    let (mut cr, mut cw) = client.into_split();
                    let (mut sr, mut sw) = server.into_split();
                    let flag = client_spoke_last.clone();
                    let up = async move {
                        let mut buf = vec![0u8; 1 << 18];
                        while let Ok(n) = cr.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            if !flag.swap(true, Ordering::SeqCst) {
                                turns.fetch_add(1, Ordering::SeqCst);
                            }
                            if sw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    };
                    let down = async move {
                        let mut buf = vec![0u8; 1 << 18];
                        while let Ok(n) = sr.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            client_spoke_last.store(false, Ordering::SeqCst);
                            if cw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    };
                    tokio::join!(up, down);
                });
            }
        });
        TurnCounter { addr, turns, task }
    }

    /// `redis://<proxy addr>`.
    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// Round trips so far.
    pub fn turns(&self) -> u64 {
        self.turns.load(Ordering::SeqCst)
    }
}

impl Drop for TurnCounter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `calls` of one command in `INFO commandstats` (0 if never called).
pub async fn command_calls(inspect: &Inspect, command: &str) -> u64 {
    let info: String = inspect.run(redis::cmd("INFO").arg("commandstats")).await;
    let needle = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(needle.as_str()))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}
