//! MariaDB test helpers: a private database per test on the shared server
//! (`MYSQL_URL`, default `mysql://root@127.0.0.1:3306/test`), a wire-level
//! statement counter, and a private server that a test may kill and start.
//! Loaded with `#[path = "common/mysql.rs"] mod mysql;`; one of the database
//! modules the SQL store suite (`sql_suite.rs`) is stamped with (items
//! marked "suite", beside the reads of `sql_db.rs`).
#![allow(dead_code, unreachable_pub)]

#[path = "sql_db.rs"]
mod sql_db;
#[path = "wire.rs"]
mod wire;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use idem::store::mysql::{MysqlDialect, MysqlStore};
use sqlx::mysql::{MySqlConnectOptions, MySqlPoolOptions};
use sqlx::{Executor, MySqlPool};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
pub use wire::Wire;

/// Suite: the sqlx database, the store and the test database.
pub type Database = sqlx::MySql;
pub type Store = MysqlStore;
/// A fresh database `idem_t_<random>` holding the dedup table and an
/// `effects` table; the pool connects to it, so handlers write `effects`
/// unqualified. Panics (the test fails) when the server is down.
pub type Db = sql_db::Db<MysqlDialect>;

/// Suite: what the claim statements contain (to count them on the wire).
pub const CLAIM_SQL: &str = "INSERT INTO idem_dedup (handler, `key`";

/// Suite: a URL with a password that cannot connect, and how it must show.
pub const SECRET_URL: &str = "mysql://app:hunter2-secret@127.0.0.1:1/db";
pub const REDACTED: &str = "app:***@127.0.0.1:1";

impl sql_db::TestSql for MysqlDialect {
    const EFFECT_COUNTS: &'static str =
        "SELECT `key`, COUNT(*) FROM effects WHERE handler = ? GROUP BY `key`";
    const DEDUP_ROWS: &'static str = "SELECT COUNT(*) FROM idem_dedup WHERE handler = ?";
    const EFFECT_SEQ: &'static str = "SELECT CAST(seq AS SIGNED) FROM effects WHERE handler = ?";
    const TTL_SECONDS: &'static str = "SELECT CAST(TIMESTAMPDIFF(MICROSECOND, created_at, expires_at) / 1000000 AS DOUBLE) \
         FROM idem_dedup WHERE handler = ? LIMIT 1";
    const INSERT_EFFECT: &'static str =
        "INSERT INTO effects (handler, `key`, seq) VALUES (?, ?, ?)";
    // InnoDB refreshes INNODB_TRX only when it was not read for 100 ms.
    const LOCK_WAITS: Option<(&'static str, Duration)> = Some((
        "SELECT COUNT(*) FROM information_schema.INNODB_TRX t \
         JOIN information_schema.PROCESSLIST p ON p.ID = t.trx_mysql_thread_id \
         WHERE t.trx_state = 'LOCK WAIT' AND p.DB = DATABASE()",
        Duration::from_millis(150),
    ));
    const EFFECTS_TABLE: &'static str = "CREATE TABLE effects (handler VARCHAR(64) NOT NULL, \
         `key` VARCHAR(512) NOT NULL, seq INT NOT NULL)";
}

/// `MYSQL_URL`, default `mysql://root@127.0.0.1:3306/test`.
pub fn url() -> String {
    std::env::var("MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

impl Db {
    pub async fn new() -> Db {
        Self::at(&url(), 16).await
    }

    /// Like [`Db::new`] on another server and pool size.
    pub async fn at(url: &str, max_connections: u32) -> Db {
        let database = format!("idem_t_{:016x}", fastrand::u64(..));
        let admin = connect(url, None, 1).await;
        admin
            .execute(sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "CREATE DATABASE {database} CHARACTER SET utf8mb4"
            ))))
            .await
            .expect("create database");
        admin.close().await;
        let store = MysqlStore::new(connect(url, Some(&database), max_connections).await);
        Db::create(store, database, url, None).await
    }

    /// A second, independent pool on the same database (another "process").
    pub async fn second_store(&self, max_connections: u32) -> MysqlStore {
        MysqlStore::new(connect(&self.server, Some(&self.schema), max_connections).await)
    }

    /// Suite: makes rows expired a second ago (all, or one handler's).
    pub async fn expire(&self, handler: Option<&str>) {
        sqlx::query(
            "UPDATE idem_dedup SET expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND \
             WHERE ? IS NULL OR handler = ?",
        )
        .bind(handler)
        .bind(handler)
        .execute(self.pool())
        .await
        .expect("expire rows");
    }

    /// Suite: `n` rows of `handler` with keys `<prefix><i>`, expired a
    /// minute ago or live for an hour.
    pub async fn insert_rows(&self, handler: &str, prefix: &str, n: i32, expired: bool) {
        // seq_1_to_<n>: MariaDB's sequence engine.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO idem_dedup (handler, `key`, fingerprint, message_id, expires_at) \
             SELECT ?, CONCAT(?, seq), 0, 'm', UTC_TIMESTAMP(6) + INTERVAL IF(?, -60, 3600) SECOND \
             FROM seq_1_to_{n}"
        )))
        .bind(handler)
        .bind(prefix)
        .bind(expired)
        .execute(self.pool())
        .await
        .expect("insert rows");
    }

    /// Suite: a store on this database whose pool of `max_connections` goes
    /// through a counting proxy.
    pub async fn counting_store(&self, max_connections: u32) -> (MysqlStore, Wire) {
        let (url, wire) = counting_proxy(&self.server).await;
        let store = MysqlStore::new(connect(&url, Some(&self.schema), max_connections).await);
        (store, wire)
    }
}

/// A pool on `url`, on `database` instead of the URL's when given.
pub async fn connect(url: &str, database: Option<&str>, max_connections: u32) -> MySqlPool {
    let mut options = MySqlConnectOptions::from_str(url).expect("MYSQL_URL is a mysql URL");
    if let Some(database) = database {
        options = options.database(database);
    }
    MySqlPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "MariaDB at {url} is not reachable ({e}): start it (./scripts/services.sh) or set MYSQL_URL"
            )
        })
}

/// Suite: the handlers' effect, one row in `effects`.
pub async fn insert_effect(
    tx: &mut idem::Tx<'_, sqlx::MySql>,
    handler: &str,
    key: &str,
    seq: u32,
) -> Result<(), sqlx::Error> {
    sql_db::insert_effect::<MysqlDialect>(tx, handler, key, seq).await
}

// ---------------------------------------------------------------------------
// Wire-level counting: a loopback proxy that reads the MySQL protocol. A
// client packet with sequence id 0 starts a command; every command but
// COM_QUIT, COM_STMT_SEND_LONG_DATA and COM_STMT_CLOSE (which get no answer)
// is a round trip. COM_QUERY (0x03) executes its text; COM_STMT_EXECUTE
// (0x17) a prepared statement, whose SQL the proxy learnt from the
// COM_STMT_PREPARE (0x16) and whose id from the server's answer to it.

const COM_QUIT: u8 = 0x01;
const COM_QUERY: u8 = 0x03;
const COM_STMT_PREPARE: u8 = 0x16;
const COM_STMT_EXECUTE: u8 = 0x17;
const COM_STMT_SEND_LONG_DATA: u8 = 0x18;
const COM_STMT_CLOSE: u8 = 0x19;

/// Starts a counting proxy to the server of `url`; returns the URL to use
/// instead (TLS off, so the proxy can read) and the counter.
pub async fn counting_proxy(url: &str) -> (String, Wire) {
    let options = MySqlConnectOptions::from_str(url).expect("mysql URL");
    let upstream = format!("{}:{}", options.get_host(), options.get_port());
    let (port, wire) = wire::proxy::<MysqlWire>(upstream).await;
    let user = options.get_username();
    let db = options.get_database().unwrap_or("test");
    (
        format!("mysql://{user}@127.0.0.1:{port}/{db}?ssl-mode=disabled"),
        wire,
    )
}

/// What the two directions of one connection share.
#[derive(Default)]
struct Prepared {
    /// The SQL of a COM_STMT_PREPARE the server has not answered yet.
    pending: Mutex<Option<String>>,
    /// Statement id → SQL.
    statements: Mutex<HashMap<u32, String>>,
}

struct MysqlWire;

/// Reads one packet: (sequence id, the whole frame).
async fn packet(from: &mut OwnedReadHalf) -> std::io::Result<(u8, Vec<u8>)> {
    let mut header = [0u8; 4];
    from.read_exact(&mut header).await?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], 0]) as usize;
    let mut frame = header.to_vec();
    frame.resize(4 + len, 0);
    from.read_exact(&mut frame[4..]).await?;
    Ok((header[3], frame))
}

impl wire::Protocol for MysqlWire {
    type Conn = Prepared;

    async fn client_to_server(
        mut from: OwnedReadHalf,
        mut to: OwnedWriteHalf,
        wire: Wire,
        conn: Arc<Prepared>,
    ) -> std::io::Result<()> {
        loop {
            let (seq, frame) = packet(&mut from).await?;
            let body = &frame[4..];
            if seq == 0 && !body.is_empty() {
                let command = body[0];
                if ![COM_QUIT, COM_STMT_SEND_LONG_DATA, COM_STMT_CLOSE].contains(&command) {
                    wire.round_trip();
                }
                match command {
                    COM_QUERY => wire.executed(&String::from_utf8_lossy(&body[1..])),
                    COM_STMT_PREPARE => {
                        *conn.pending.lock().unwrap() =
                            Some(String::from_utf8_lossy(&body[1..]).into_owned());
                    }
                    COM_STMT_EXECUTE if body.len() >= 5 => {
                        let id = u32::from_le_bytes(body[1..5].try_into().unwrap());
                        if let Some(sql) = conn.statements.lock().unwrap().get(&id) {
                            wire.executed(sql);
                        }
                    }
                    _ => {}
                }
            }
            to.write_all(&frame).await?;
        }
    }

    async fn server_to_client(
        mut from: OwnedReadHalf,
        mut to: OwnedWriteHalf,
        conn: Arc<Prepared>,
    ) -> std::io::Result<()> {
        loop {
            let (seq, frame) = packet(&mut from).await?;
            let body = &frame[4..];
            // The first packet of the answer to a COM_STMT_PREPARE: OK
            // (0x00, then the statement id) or an error.
            if seq == 1 && !body.is_empty() {
                let mut pending = conn.pending.lock().unwrap();
                if let Some(sql) = pending.take()
                    && body[0] == 0x00
                    && body.len() >= 5
                {
                    let id = u32::from_le_bytes(body[1..5].try_into().unwrap());
                    conn.statements.lock().unwrap().insert(id, sql);
                }
            }
            to.write_all(&frame).await?;
        }
    }
}

// ---------------------------------------------------------------------------
// A private server the test owns: `mariadb-install-db` into a temp dir, then
// `mariadbd` on a free port (no grant tables: any user, no password), killed
// with SIGKILL (a crash) and started again. The shared server is never
// touched.

pub struct PrivateServer {
    pub port: u16,
    dir: PathBuf,
    process: Mutex<Option<Child>>,
}

impl PrivateServer {
    pub fn start() -> PrivateServer {
        let port = sql_db::free_port();
        let dir =
            std::env::temp_dir().join(format!("idem-mariadb-{port}-{:08x}", fastrand::u32(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let server = PrivateServer {
            port,
            dir,
            process: Mutex::new(None),
        };
        let mut install = Command::new("mariadb-install-db");
        install
            .arg("--no-defaults")
            .arg(format!("--datadir={}", server.data()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"]);
        if sql_db::is_root() {
            install.arg("--user=root");
        }
        let out = install.output().expect(
            "mariadb-install-db (Debian package mariadb-server; ./scripts/services.sh installs it)",
        );
        assert!(
            out.status.success(),
            "mariadb-install-db failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        server.up();
        server
    }

    pub fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/mysql", self.port)
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    /// Starts the server and waits until it accepts connections.
    pub fn up(&self) {
        let mut command = Command::new("mariadbd");
        command
            .arg("--no-defaults")
            .arg(format!("--datadir={}", self.data()))
            .arg(format!("--socket={}", self.dir.join("sock").display()))
            .arg(format!("--pid-file={}", self.dir.join("pid").display()))
            .arg(format!("--log-error={}", self.dir.join("log").display()))
            .arg(format!("--port={}", self.port))
            .args([
                "--bind-address=127.0.0.1",
                "--skip-grant-tables",
                "--innodb-buffer-pool-size=32M",
                "--max-connections=200",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if sql_db::is_root() {
            command.arg("--user=root");
        }
        let child = command
            .spawn()
            .expect("mariadbd (Debian package mariadb-server)");
        *self.process.lock().unwrap() = Some(child);
        for _ in 0..600 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "the private MariaDB did not open port {} within 60 s: {}",
            self.port,
            std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
        );
    }

    /// Kills it the hard way (SIGKILL): no shutdown, connections cut.
    pub fn kill(&self) {
        if let Some(mut child) = self.process.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
