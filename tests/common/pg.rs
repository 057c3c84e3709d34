//! PostgreSQL test helpers: a private schema per test on the shared server,
//! a wire-level statement counter, and a private server that a test may stop
//! and start. Loaded with `#[path = "common/pg.rs"] mod pg;`. One of the
//! database modules the SQL store suite (`sql_suite.rs`) is stamped with:
//! the items marked "suite" are what every such module provides, beside
//! the reads of `sql_db.rs`.
#![allow(dead_code, unreachable_pub)]

#[path = "sql_db.rs"]
mod sql_db;
#[path = "wire.rs"]
mod wire;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use idem::store::postgres::{PostgresDialect, PostgresStore};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
pub use wire::Wire;
use wire::cstr;

/// Suite: the sqlx database, the store and the test database.
pub type Database = sqlx::Postgres;
pub type Store = PostgresStore;
/// A fresh schema `idem_t_<random>` holding the dedup table and an
/// `effects` table; the pool's `search_path` points at it, so handlers write
/// `effects` unqualified. Panics (the test fails) when the server is down.
pub type Db = sql_db::Db<PostgresDialect>;

/// Suite: what the claim statements contain (to count them on the wire).
pub const CLAIM_SQL: &str = "unnest($1::text[], $2::text[], $3::int8[]";

/// Suite: a URL with a password that cannot connect, and how it must show.
pub const SECRET_URL: &str = "postgres://app:hunter2-secret@127.0.0.1:1/db";
pub const REDACTED: &str = "app:***@127.0.0.1:1";

impl sql_db::TestSql for PostgresDialect {
    const EFFECT_COUNTS: &'static str =
        "SELECT key, COUNT(*) FROM effects WHERE handler = $1 GROUP BY key";
    const DEDUP_ROWS: &'static str = "SELECT COUNT(*) FROM idem_dedup WHERE handler = $1";
    const EFFECT_SEQ: &'static str = "SELECT seq::int8 FROM effects WHERE handler = $1";
    const TTL_SECONDS: &'static str = "SELECT EXTRACT(EPOCH FROM expires_at - created_at)::float8 \
         FROM idem_dedup WHERE handler = $1 LIMIT 1";
    const INSERT_EFFECT: &'static str =
        "INSERT INTO effects (handler, key, seq) VALUES ($1, $2, $3)";
    const LOCK_WAITS: Option<(&'static str, Duration)> = Some((
        "SELECT COUNT(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
        Duration::from_millis(10),
    ));
    const EFFECTS_TABLE: &'static str =
        "CREATE TABLE effects (handler text NOT NULL, key text NOT NULL, seq int NOT NULL)";
}

/// `DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`.
pub fn url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
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
        Db::create(store, schema, url, None).await
    }

    /// A second, independent pool on the same schema (another "process").
    pub async fn second_store(&self, max_connections: u32) -> PostgresStore {
        PostgresStore::new(connect(&self.server, Some(&self.schema), max_connections).await)
            .with_schema(&self.schema)
            .expect("valid schema name")
    }

    /// Suite: makes rows expired a second ago (all, or one handler's).
    pub async fn expire(&self, handler: Option<&str>) {
        sqlx::query(
            "UPDATE idem_dedup SET expires_at = now() - interval '1 second' WHERE $1::text IS NULL OR handler = $1",
        )
        .bind(handler)
        .execute(self.pool())
        .await
        .expect("expire rows");
    }

    /// Suite: `n` rows of `handler` with keys `<prefix><i>`, expired a
    /// minute ago or live for an hour.
    pub async fn insert_rows(&self, handler: &str, prefix: &str, n: i32, expired: bool) {
        sqlx::query(
            "INSERT INTO idem_dedup (handler, key, fingerprint, message_id, expires_at) \
             SELECT $1, $2 || i, 0, 'm', now() + CASE WHEN $4 THEN interval '-1 minute' ELSE interval '1 hour' END \
             FROM generate_series(1, $3) i",
        )
        .bind(handler)
        .bind(prefix)
        .bind(n)
        .bind(expired)
        .execute(self.pool())
        .await
        .expect("insert rows");
    }

    /// Suite: a store on this schema whose pool of `max_connections` goes
    /// through a counting proxy.
    pub async fn counting_store(&self, max_connections: u32) -> (PostgresStore, Wire) {
        let (url, wire) = counting_proxy(&self.server).await;
        let store = PostgresStore::new(connect(&url, Some(&self.schema), max_connections).await)
            .with_schema(&self.schema)
            .expect("valid schema name");
        (store, wire)
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

/// Suite: the handlers' effect, one row in `effects`.
pub async fn insert_effect(
    tx: &mut idem::Tx<'_, sqlx::Postgres>,
    handler: &str,
    key: &str,
    seq: u32,
) -> Result<(), sqlx::Error> {
    sql_db::insert_effect::<PostgresDialect>(tx, handler, key, seq).await
}

// ---------------------------------------------------------------------------
// Wire-level counting: a loopback proxy in front of the server that reads the
// client's protocol messages. Every `Sync` ('S') or simple `Query` ('Q') is a
// round trip; every `Bind` ('B') executes a prepared statement, whose SQL the
// proxy learnt from the `Parse` ('P') before it.

/// Starts a counting proxy to the server of `url`; returns the URL to use
/// instead and the counter.
pub async fn counting_proxy(url: &str) -> (String, Wire) {
    let options = PgConnectOptions::from_str(url).expect("postgres URL");
    let upstream = format!("{}:{}", options.get_host(), options.get_port());
    let (port, wire) = wire::proxy::<PgWire>(upstream).await;
    let user = options.get_username();
    let db = options.get_database().unwrap_or("postgres");
    (
        format!("postgres://{user}@127.0.0.1:{port}/{db}?sslmode=disable"),
        wire,
    )
}

/// The PostgreSQL protocol, client side: prepared statements are named.
struct PgWire;

impl wire::Protocol for PgWire {
    type Conn = ();

    async fn client_to_server(
        mut from: OwnedReadHalf,
        mut to: OwnedWriteHalf,
        wire: Wire,
        _conn: Arc<()>,
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
            match tag {
                b'S' => wire.round_trip(),
                b'Q' => {
                    wire.round_trip();
                    wire.executed(&cstr(body, 0).0);
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
                        wire.executed(sql);
                    }
                }
                _ => {}
            }
            to.write_all(&frame).await?;
        }
    }

    async fn server_to_client(
        mut from: OwnedReadHalf,
        mut to: OwnedWriteHalf,
        _conn: Arc<()>,
    ) -> std::io::Result<()> {
        tokio::io::copy(&mut from, &mut to).await.map(|_| ())
    }
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
        let port = sql_db::free_port();
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
        if sql_db::is_root() {
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
        if sql_db::is_root() {
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
