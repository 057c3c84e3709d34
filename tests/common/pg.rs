//! PostgreSQL test helpers: a private schema per test on the shared server,
//! a wire-level statement counter, and a private server that a test may stop
//! and start. Loaded with `#[path = "common/pg.rs"] mod pg;`.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem::store::postgres::PostgresStore;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// `DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`.
pub fn url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A fresh schema `idem_t_<random>` holding the dedup table and an
/// `effects` table; the pool's `search_path` points at it, so handlers write
/// `effects` unqualified. Panics (the test fails) when the server is down.
pub struct Db {
    pub schema: String,
    pub store: PostgresStore,
}

impl Db {
    pub async fn new() -> Db {
        Self::at(&url(), 16).await
    }

    /// Like [`Db::new`] on another server and pool size.
    pub async fn at(url: &str, max_connections: u32) -> Db {
        let schema = format!("idem_t_{:016x}", fastrand::u64(..));
        let admin = connect(url, None, 1).await;
        admin
            .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "CREATE SCHEMA {schema}"
            ))))
            .await
            .expect("create schema");
        admin.close().await;
        let pool = connect(url, Some(&schema), max_connections).await;
        let store = PostgresStore::new(pool)
            .with_schema(&schema)
            .expect("valid schema name");
        store.migrate().await.expect("migrate");
        store
            .pool()
            .execute(
                "CREATE TABLE effects (handler text NOT NULL, key text NOT NULL, seq int NOT NULL)",
            )
            .await
            .expect("create effects");
        Db { schema, store }
    }

    /// A second, independent pool on the same schema (another "process").
    pub async fn second_store(&self, max_connections: u32) -> PostgresStore {
        PostgresStore::new(connect(&url(), Some(&self.schema), max_connections).await)
            .with_schema(&self.schema)
            .expect("valid schema name")
    }

    pub fn pool(&self) -> &PgPool {
        self.store.pool()
    }

    /// Effect rows per key of one handler.
    pub async fn effect_counts(&self, handler: &str) -> std::collections::BTreeMap<String, i64> {
        sqlx::query_as::<_, (String, i64)>(
            "SELECT key, COUNT(*) FROM effects WHERE handler = $1 GROUP BY key",
        )
        .bind(handler)
        .fetch_all(self.pool())
        .await
        .expect("count effects")
        .into_iter()
        .collect()
    }

    /// Dedup rows of one handler.
    pub async fn dedup_rows(&self, handler: &str) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM idem_dedup WHERE handler = $1")
            .bind(handler)
            .fetch_one(self.pool())
            .await
            .expect("count dedup rows")
    }
}

/// A pool on `url`, with `search_path` set to `schema` when given.
pub async fn connect(url: &str, schema: Option<&str>, max_connections: u32) -> PgPool {
    let mut options = PgConnectOptions::from_str(url).expect("DATABASE_URL is a postgres URL");
    if let Some(schema) = schema {
        options = options.options([("search_path", schema)]);
    }
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "PostgreSQL at {url} is not reachable ({e}): start it (./scripts/services.sh) or set DATABASE_URL"
            )
        })
}

/// The handlers' effect: one row in `effects`, in the handler's transaction.
pub async fn insert_effect(
    tx: &mut idem::Tx<'_, sqlx::Postgres>,
    handler: &str,
    key: &str,
    seq: u32,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO effects (handler, key, seq) VALUES ($1, $2, $3)")
        .bind(handler)
        .bind(key)
        .bind(seq as i32)
        .execute(&mut **tx)
        .await
        .map(|_| ())
}

// ---------------------------------------------------------------------------
// Wire-level counting: a loopback proxy in front of the server that reads the
// client's protocol messages. Every `Sync` ('S') or simple `Query` ('Q') is a
// round trip; every `Bind` ('B') executes a prepared statement, whose SQL the
// proxy learnt from the `Parse` ('P') before it.

/// Counts round trips and statement executions between a pool and the server.
#[derive(Clone, Default)]
pub struct Wire {
    inner: Arc<Mutex<WireCounts>>,
}

#[derive(Default, Debug, Clone)]
pub struct WireCounts {
    /// `Sync` + simple `Query` messages: round trips.
    pub round_trips: u64,
    /// Executions per SQL text (prepared: per `Bind`; simple: per `Query`).
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
}

/// Starts a counting proxy to the server of `url`; returns the URL to use
/// instead and the counter.
pub async fn counting_proxy(url: &str) -> (String, Wire) {
    let options = PgConnectOptions::from_str(url).expect("postgres URL");
    let upstream = format!("{}:{}", options.get_host(), options.get_port());
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
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let down = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                });
                let _ = client_to_server(&mut cr, &mut sw, &counts).await;
                down.abort();
            });
        }
    });
    let user = options.get_username();
    let db = options.get_database().unwrap_or("postgres");
    (
        format!("postgres://{user}@127.0.0.1:{port}/{db}?sslmode=disable"),
        wire,
    )
}

async fn client_to_server(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    wire: &Wire,
) -> std::io::Result<()> {
    // Untyped start-up messages (SSLRequest / StartupMessage): length first.
    loop {
        let len = from.read_i32().await?;
        let mut body = vec![0u8; (len - 4) as usize];
        from.read_exact(&mut body).await?;
        let mut frame = len.to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        to.write_all(&frame).await?;
        let code = i32::from_be_bytes(body[..4].try_into().unwrap());
        if code != 80877103 && code != 80877104 {
            break; // the StartupMessage; typed messages follow
        }
    }
    let mut statements: HashMap<String, String> = HashMap::new();
    loop {
        let tag = from.read_u8().await?;
        let len = from.read_i32().await?;
        let mut frame = Vec::with_capacity(len as usize + 1);
        frame.push(tag);
        frame.extend_from_slice(&len.to_be_bytes());
        frame.resize(len as usize + 1, 0);
        from.read_exact(&mut frame[5..]).await?;
        let body = &frame[5..];
        {
            let mut w = wire.inner.lock().unwrap();
            match tag {
                b'S' => w.round_trips += 1,
                b'Q' => {
                    w.round_trips += 1;
                    *w.executions.entry(cstr(body, 0).0).or_default() += 1;
                }
                b'P' => {
                    let (name, at) = cstr(body, 0);
                    let (sql, _) = cstr(body, at);
                    statements.insert(name, sql);
                }
                b'B' => {
                    let (_portal, at) = cstr(body, 0);
                    let (name, _) = cstr(body, at);
                    if let Some(sql) = statements.get(&name) {
                        *w.executions.entry(sql.clone()).or_default() += 1;
                    }
                }
                _ => {}
            }
        }
        to.write_all(&frame).await?;
    }
}

/// The NUL-terminated string at `at`, and the offset after it.
fn cstr(body: &[u8], at: usize) -> (String, usize) {
    let end = body[at..]
        .iter()
        .position(|&b| b == 0)
        .map_or(body.len(), |i| at + i);
    (
        String::from_utf8_lossy(&body[at..end]).into_owned(),
        end + 1,
    )
}

// ---------------------------------------------------------------------------
// A private server the test owns: `initdb` into a temp dir, started on a free
// port, stopped with `-m immediate` (like a crash) and started again. The
// shared server on 5432 is never touched.

pub struct PrivateServer {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
}

impl PrivateServer {
    pub fn start() -> PrivateServer {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries under /usr/lib/postgresql (./scripts/services.sh installs them)")
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("initdb").exists())
            .max()
            .expect("initdb under /usr/lib/postgresql/*/bin");
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let dir = std::env::temp_dir().join(format!("idem-pg-{port}-{:08x}", fastrand::u32(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let server = PrivateServer { port, dir, bin };
        server.chown();
        server.as_postgres(
            "initdb",
            &[
                "-D",
                &server.data(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
            ],
        );
        server.up();
        server
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    /// Starts the server and waits until it accepts connections.
    pub fn up(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("log").display().to_string();
        self.as_postgres(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &opts,
                "-l",
                &log,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// Stops it the hard way: no checkpoint, connections cut.
    pub fn kill(&self) {
        self.as_postgres(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
    }

    fn chown(&self) {
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&self.dir)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "chown of the private server's directory failed");
        }
    }

    /// A PostgreSQL tool, run as `postgres` when we are root (the server
    /// refuses to run as root).
    fn tool(&self, tool: &str) -> Command {
        let exe = self.bin.join(tool);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn as_postgres(&self, tool: &str, args: &[&str]) {
        let out = self
            .tool(tool)
            .args(args)
            .output()
            .expect("run a PostgreSQL tool");
        assert!(
            out.status.success(),
            "{tool} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        let _ = self
            .tool("pg_ctl")
            .args(["-D", &self.data(), "-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}
