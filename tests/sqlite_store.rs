//! The SQLite store through the SQL store suite (`common/sql_suite.rs`):
//! the scenarios that apply in-process (no wire to count, no server to
//! kill), on a database file per test.

mod common;
#[path = "common/sqlite_db.rs"]
mod sqlite_db;
#[macro_use]
#[path = "common/sql_suite.rs"]
mod sql_suite;

sql_store_suite!(db = sqlite_db, store = ["sqlite"], tx = [Tx<'_>]);
