//! The broker's SQLite database (`renkei.db` in the data directory): users, the record of every
//! accepted message, the quarantine of refused ones, and a few counters.
//!
//! ```sql
//! users      (name PK, role, ward, site, password_hash, created_at)
//! messages   (id PK, received_at, origin, boot, seq, topic, kind, mode, ward, site,
//!             payload BLOB, UNIQUE (origin, boot, seq))
//! quarantine (id PK, received_at, topic, reason, detail, payload BLOB)   -- bounded
//! meta       (key PK, value)                                           -- e.g. broker_boot
//! ```
//!
//! `messages.origin` is `site:{ward}/{site}` or `hq:{node}`, so a site's history, in the order
//! it sent it, is one range of the `(origin, boot, seq)` key; `ward`/`site` repeat the sending
//! site (NULL for HQ messages) for filtering. The only other index is `received_at`'s, for
//! integrators catching up from a time. Every index is a B-tree insert per recorded message on
//! the hot path, so there are no more. Times are Unix milliseconds from the broker's clock. WAL
//! mode lets HTTP read while the recorder writes. `payload` is the message as it arrived
//! (postcard); readers that want JSON decode it.
//!
//! `PRAGMA user_version` is the schema's version; [`open`] upgrades an older database:
//! version 0 stored a `json` copy of every message too, which [`open`] drops; versions 0 and 1
//! kept an index `messages_by_site (ward, site, kind, id)`, which [`open`] drops.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::Connection;

/// The database file inside the data directory.
pub const FILE_NAME: &str = "renkei.db";

/// Why the database cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("database {path}: {source}")]
pub struct DbError {
    pub path: PathBuf,
    pub source: rusqlite::Error,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users (
    name          TEXT PRIMARY KEY,
    role          TEXT NOT NULL CHECK (role IN ('agent', 'ward', 'hq', 'integrator', 'admin')),
    ward          INTEGER,
    site          TEXT,
    password_hash TEXT NOT NULL,
    created_at    INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id          INTEGER PRIMARY KEY,
    received_at INTEGER NOT NULL,
    origin      TEXT NOT NULL,
    boot        INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    topic       TEXT NOT NULL,
    kind        TEXT NOT NULL,
    mode        TEXT NOT NULL,
    ward        INTEGER,
    site        TEXT,
    payload     BLOB NOT NULL,
    UNIQUE (origin, boot, seq)
);
CREATE INDEX IF NOT EXISTS messages_by_time ON messages (received_at);
CREATE TABLE IF NOT EXISTS quarantine (
    id          INTEGER PRIMARY KEY,
    received_at INTEGER NOT NULL,
    topic       TEXT NOT NULL,
    reason      TEXT NOT NULL,
    detail      TEXT NOT NULL,
    payload     BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
";

/// The schema [`SCHEMA`] makes, as `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 2;

/// The database path for a data directory.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// Opens (creating if needed) the database in `data_dir`, in WAL mode, with the schema.
pub fn open(data_dir: &Path) -> Result<Connection, DbError> {
    let path = path(data_dir);
    let wrap = |source| DbError {
        path: path.clone(),
        source,
    };
    let conn = Connection::open(&path).map_err(wrap)?;
    // Readers (HTTP, `user` commands) and the recorder share the file; a writer holding the
    // lock for one batch must not fail them.
    conn.busy_timeout(Duration::from_secs(5)).map_err(wrap)?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(wrap)?;
    // WAL + FULL: every commit is on disk before it returns, so a receipt sent after it holds
    // through a power cut too (NORMAL would only survive a crash of the process). The recorder
    // commits in batches, so this is one fsync per batch.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(wrap)?;
    upgrade(&conn).map_err(wrap)?;
    conn.execute_batch(SCHEMA).map_err(wrap)?;
    Ok(conn)
}

/// Brings a database written by an older broker to [`SCHEMA_VERSION`], in one transaction.
///
/// Version 0 kept a JSON copy of every message in `messages.json`, built on the recorder's
/// thread for every row (a third of its time) and read only by the history API, which now
/// decodes `payload` instead. Dropping the column rewrites the table once.
///
/// Versions 0 and 1 kept `messages_by_site`, which a site's history now reads from the
/// `(origin, boot, seq)` key instead: one B-tree fewer to update for every recorded message
/// (the recorder wrote about a quarter more messages a second without it).
fn upgrade(conn: &Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version >= SCHEMA_VERSION {
        return Ok(());
    }
    let has_json: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('messages') WHERE name = 'json'",
        [],
        |r| r.get(0),
    )?;
    if has_json {
        tracing::info!("database: dropping messages.json (schema version 0 to 1)");
        conn.execute_batch("BEGIN; ALTER TABLE messages DROP COLUMN json; COMMIT;")?;
    }
    conn.execute_batch("DROP INDEX IF EXISTS messages_by_site")?;
    conn.pragma_update(None, "user_version", SCHEMA_VERSION)
}

/// Raises the counter `key` by one and returns the new value (the broker's boot counter).
pub fn bump_counter(conn: &Connection, key: &str) -> rusqlite::Result<u32> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, 1)
         ON CONFLICT (key) DO UPDATE SET value = value + 1",
        [key],
    )?;
    let value: i64 =
        conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))?;
    Ok(u32::try_from(value).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_twice_and_counts_boots() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(dir.path()).unwrap();
        assert_eq!(bump_counter(&conn, "broker_boot").unwrap(), 1);
        drop(conn);
        let conn = open(dir.path()).unwrap();
        assert_eq!(bump_counter(&conn, "broker_boot").unwrap(), 2);
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn a_version_0_database_loses_its_json_column_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        {
            let old = Connection::open(path(dir.path())).unwrap();
            old.execute_batch(
                "CREATE TABLE messages (
                    id INTEGER PRIMARY KEY, received_at INTEGER NOT NULL, origin TEXT NOT NULL,
                    boot INTEGER NOT NULL, seq INTEGER NOT NULL, topic TEXT NOT NULL,
                    kind TEXT NOT NULL, mode TEXT NOT NULL, ward INTEGER, site TEXT,
                    payload BLOB NOT NULL, json TEXT NOT NULL, UNIQUE (origin, boot, seq));
                 INSERT INTO messages VALUES
                    (1, 5, 'site:131041/es-1', 1, 1, 't', 'status', 'actual', 131041, 'es-1',
                     x'0102', '{}');",
            )
            .unwrap();
        }
        let conn = open(dir.path()).unwrap();
        let columns: Vec<String> = conn
            .prepare("SELECT name FROM pragma_table_info('messages')")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(!columns.contains(&"json".to_owned()), "{columns:?}");
        let payload: Vec<u8> = conn
            .query_row("SELECT payload FROM messages WHERE id = 1", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(payload, [1, 2]);
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        drop(conn);
        // Opening again finds nothing to do.
        open(dir.path()).unwrap();
    }

    #[test]
    fn a_version_1_database_loses_its_site_index() {
        let dir = tempfile::tempdir().unwrap();
        {
            let conn = open(dir.path()).unwrap();
            conn.execute_batch(
                "CREATE INDEX messages_by_site ON messages (ward, site, kind, id);
                 PRAGMA user_version = 1;",
            )
            .unwrap();
        }
        let conn = open(dir.path()).unwrap();
        let indexes: Vec<String> = conn
            .prepare(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'messages'",
            )
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            !indexes.contains(&"messages_by_site".to_owned()),
            "{indexes:?}"
        );
        assert!(
            indexes.contains(&"messages_by_time".to_owned()),
            "{indexes:?}"
        );
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }
}
