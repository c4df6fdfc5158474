//! The broker's SQLite database (`renkei.db` in the data directory): users, the record of every
//! accepted message, the quarantine of refused ones, and a few counters.
//!
//! ```sql
//! users      (name PK, role, ward, site, password_hash, created_at)
//! origins    (id PK, key UNIQUE)                      -- 'site:{ward}/{site}' or 'hq:{node}'
//! messages   (id PK, received_at, origin_id, boot, seq, topic, kind, mode, ward, site,
//!             payload BLOB, via, UNIQUE (origin_id, boot, seq))
//! quarantine (id PK, received_at, topic, reason, detail, payload BLOB)   -- bounded
//! meta       (key PK, value)                                           -- e.g. broker_boot
//! ```
//!
//! Every sender is one row of `origins`, and `messages.origin_id` points at it, so a site's
//! history, in the order it sent it, is one range of the `(origin_id, boot, seq)` key, which
//! is also what keeps a redelivered message once. The key is three integers: with the
//! sender's name in it as text, inserting into it was a third of the recorder's time.
//! `ward`/`site` repeat the sending site (NULL for HQ messages) for filtering. `via` is the
//! client id of the connection that brought a site's message when it is not the site's own
//! agent (a ward broker's relay, or HQ's downlink at a ward broker), NULL when the site sent
//! it itself: a ward broker forwards only those (what came down never goes up again). The only other
//! index is `received_at`'s, for integrators catching up from a time. Every index is a B-tree
//! insert per recorded message on the hot path, so there are no more. Times are Unix
//! milliseconds from the broker's clock. WAL mode lets HTTP read while the recorder writes.
//! `payload` is the message as it arrived (postcard); readers that want JSON decode it.
//!
//! The database holds the users' password hashes and every recorded message: [`open`] creates
//! it readable and writable by its owner only (0600), and SQLite gives its `-wal` and `-shm`
//! files the mode of the database; [`create_dir`] makes the data directory 0700.
//!
//! `PRAGMA user_version` is the schema's version; [`open`] upgrades an older database:
//! version 0 stored a `json` copy of every message too, which [`open`] drops; versions 0 and 1
//! kept an index `messages_by_site (ward, site, kind, id)`, which [`open`] drops; versions 0 to
//! 2 kept the sender's name as text in `messages.origin`, which [`open`] moves to `origins`.

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

/// The columns of `origins`, for [`SCHEMA`] and the upgrade that creates it.
macro_rules! origins_columns {
    () => {
        "(
    id  INTEGER PRIMARY KEY,
    key TEXT NOT NULL UNIQUE
)"
    };
}

/// The columns of `messages`, for [`SCHEMA`] and the upgrade that rewrites it.
macro_rules! messages_columns {
    () => {
        "(
    id          INTEGER PRIMARY KEY,
    received_at INTEGER NOT NULL,
    origin_id   INTEGER NOT NULL REFERENCES origins (id),
    boot        INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    topic       TEXT NOT NULL,
    kind        TEXT NOT NULL,
    mode        TEXT NOT NULL,
    ward        INTEGER,
    site        TEXT,
    payload     BLOB NOT NULL,
    via         TEXT,
    UNIQUE (origin_id, boot, seq)
)"
    };
}

/// The columns of `users`, for [`SCHEMA`] and the upgrade that rewrites it.
macro_rules! users_columns {
    () => {
        "(
    name          TEXT PRIMARY KEY,
    role          TEXT NOT NULL
                  CHECK (role IN ('agent', 'ward', 'hq', 'integrator', 'admin', 'relay')),
    ward          INTEGER,
    site          TEXT,
    password_hash TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    cluster_hash  TEXT
)"
    };
}

const SCHEMA: &str = concat!(
    "
CREATE TABLE IF NOT EXISTS users ",
    users_columns!(),
    ";
CREATE TABLE IF NOT EXISTS origins ",
    origins_columns!(),
    ";
CREATE TABLE IF NOT EXISTS messages ",
    messages_columns!(),
    ";
CREATE INDEX IF NOT EXISTS messages_by_time ON messages (received_at);
CREATE INDEX IF NOT EXISTS messages_commands ON messages (id)
    WHERE kind IN ('command', 'command_result');
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
",
);

/// The schema `SCHEMA` makes, as `PRAGMA user_version`.
pub const SCHEMA_VERSION: i64 = 5;

/// The database path for a data directory.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// Creates the data directory if it is missing, readable by its owner only (0700); parents it
/// needs get the usual mode. A directory that exists is left as it is. Warns if the database
/// in it can be read by others (made so by hand, or by a broker from before its files were
/// created owner-only): it holds the password hashes.
pub fn create_dir(data_dir: &Path) -> std::io::Result<()> {
    if !data_dir.is_dir() {
        if let Some(parent) = data_dir.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent)?;
        }
        let mut builder = std::fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        match builder.create(data_dir) {
            // Made meanwhile by another process (`user add` next to a starting broker).
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && data_dir.is_dir() => {}
            other => other?,
        }
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let db = path(data_dir);
        if let Ok(meta) = std::fs::metadata(&db)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                path = %db.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "the database is readable by others (it holds password hashes): chmod 600 it \
                 and its -wal and -shm files"
            );
        }
    }
    Ok(())
}

/// Creates the database file, empty and owner-only, unless it exists: SQLite would create it
/// with 0644 (less the umask), and its `-wal` and `-shm` files take the database's mode.
/// Created here rather than narrowed after SQLite made it, so that nobody can open it in
/// between and keep the descriptor.
fn create_private(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Opens (creating if needed, owner-only) the database in `data_dir`, in WAL mode, with the
/// schema.
pub fn open(data_dir: &Path) -> Result<Connection, DbError> {
    let path = path(data_dir);
    let wrap = |source| DbError {
        path: path.clone(),
        source,
    };
    create_private(&path).map_err(|e| {
        wrap(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some(format!("cannot create it: {e}")),
        ))
    })?;
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

/// Brings a database written by an older broker to [`SCHEMA_VERSION`].
///
/// Version 0 kept a JSON copy of every message in `messages.json`, built on the recorder's
/// thread for every row (a third of its time) and read only by the history API, which now
/// decodes `payload` instead. Dropping the column rewrites the table once.
///
/// Versions 0 and 1 kept `messages_by_site`, which a site's history now reads from the
/// `(origin, boot, seq)` key instead: one B-tree fewer to update for every recorded message
/// (the recorder wrote about a quarter more messages a second without it).
///
/// Versions 0 to 2 kept the sender's name in `messages.origin` as text, in the unique key.
/// The names move to `origins` and the table is rewritten once with `origin_id`, keeping
/// every row and its id, in one transaction.
///
/// Versions 0 to 3 had no `messages.via` (added, NULL: every row so far came from its own
/// site) and no `relay` role in the check of `users.role` (the table is rewritten once).
///
/// Versions 0 to 4 had no `users.cluster_hash` (added, NULL: a user's bcrypt hash for a
/// clustered engine, kept only when it is asked for; docs/scaling.md) and no partial index of
/// commands (`messages_commands`, made by [`SCHEMA`]).
fn upgrade(conn: &Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version >= SCHEMA_VERSION {
        return Ok(());
    }
    let has_column = |name: &str| -> rusqlite::Result<bool> {
        conn.query_row(
            "SELECT COUNT(*) > 0 FROM pragma_table_info('messages') WHERE name = ?1",
            [name],
            |r| r.get(0),
        )
    };
    if has_column("json")? {
        tracing::info!("database: dropping messages.json (schema version 0 to 1)");
        conn.execute_batch("BEGIN; ALTER TABLE messages DROP COLUMN json; COMMIT;")?;
    }
    conn.execute_batch("DROP INDEX IF EXISTS messages_by_site")?;
    if has_column("origin")? {
        tracing::info!("database: moving sender names to origins (schema version 2 to 3)");
        conn.execute_batch(ORIGINS_UPGRADE)?;
    }
    let has_messages: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'messages'",
        [],
        |r| r.get(0),
    )?;
    if has_messages && !has_column("via")? {
        tracing::info!("database: adding messages.via (schema version 3 to 4)");
        conn.execute_batch("ALTER TABLE messages ADD COLUMN via TEXT")?;
    }
    let users: Option<String> = conn
        .query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'users'",
            [],
            |r| r.get(0),
        )
        .ok();
    if users.as_ref().is_some_and(|sql| !sql.contains("'relay'")) {
        tracing::info!("database: users may be relays (schema version 3 to 4)");
        conn.execute_batch(USERS_UPGRADE)?;
    }
    let users_have_cluster_hash: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('users') WHERE name = 'cluster_hash'",
        [],
        |r| r.get(0),
    )?;
    if users.is_some() && !users_have_cluster_hash {
        tracing::info!("database: adding users.cluster_hash (schema version 4 to 5)");
        conn.execute_batch("ALTER TABLE users ADD COLUMN cluster_hash TEXT")?;
    }
    conn.pragma_update(None, "user_version", SCHEMA_VERSION)
}

/// Version 2 to 3: `messages.origin` (text) becomes `origin_id`, a row of `origins`.
const ORIGINS_UPGRADE: &str = concat!(
    "
BEGIN;
CREATE TABLE origins ",
    origins_columns!(),
    ";
INSERT INTO origins (key) SELECT origin FROM messages GROUP BY origin ORDER BY MIN(id);
CREATE TABLE messages_v3 ",
    messages_columns!(),
    ";
INSERT INTO messages_v3
    (id, received_at, origin_id, boot, seq, topic, kind, mode, ward, site, payload)
    SELECT m.id, m.received_at, o.id, m.boot, m.seq, m.topic, m.kind, m.mode, m.ward, m.site,
           m.payload
    FROM messages m JOIN origins o ON o.key = m.origin ORDER BY m.id;
DROP TABLE messages;
ALTER TABLE messages_v3 RENAME TO messages;
CREATE INDEX messages_by_time ON messages (received_at);
COMMIT;
"
);

/// Version 3 to 4: `users.role` may be `relay`.
const USERS_UPGRADE: &str = concat!(
    "
BEGIN;
CREATE TABLE users_v4 ",
    users_columns!(),
    ";
INSERT INTO users_v4 (name, role, ward, site, password_hash, created_at)
    SELECT name, role, ward, site, password_hash, created_at FROM users;
DROP TABLE users;
ALTER TABLE users_v4 RENAME TO users;
COMMIT;
"
);

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
    use rusqlite::params;

    use super::*;

    /// `messages` as versions 0 to 2 made it, with `extra` columns.
    fn legacy_messages(extra: &str) -> String {
        format!(
            "CREATE TABLE messages (
                id INTEGER PRIMARY KEY, received_at INTEGER NOT NULL, origin TEXT NOT NULL,
                boot INTEGER NOT NULL, seq INTEGER NOT NULL, topic TEXT NOT NULL,
                kind TEXT NOT NULL, mode TEXT NOT NULL, ward INTEGER, site TEXT,
                payload BLOB NOT NULL{extra}, UNIQUE (origin, boot, seq));"
        )
    }

    fn message_indexes(conn: &Connection) -> Vec<String> {
        conn.prepare(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'messages'",
        )
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    }

    fn user_version(conn: &Connection) -> i64 {
        conn.query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap()
    }

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
            old.execute_batch(&format!(
                "{}
                 INSERT INTO messages VALUES
                    (1, 5, 'site:131041/es-1', 1, 1, 't', 'status', 'actual', 131041, 'es-1',
                     x'0102', '{{}}');",
                legacy_messages(", json TEXT NOT NULL")
            ))
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
        assert_eq!(user_version(&conn), SCHEMA_VERSION);
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
        let indexes = message_indexes(&conn);
        assert!(
            !indexes.contains(&"messages_by_site".to_owned()),
            "{indexes:?}"
        );
        assert!(
            indexes.contains(&"messages_by_time".to_owned()),
            "{indexes:?}"
        );
        assert_eq!(user_version(&conn), SCHEMA_VERSION);
    }

    #[test]
    fn a_version_3_database_gains_via_and_the_relay_role_and_keeps_every_row() {
        let dir = tempfile::tempdir().unwrap();
        {
            let old = Connection::open(path(dir.path())).unwrap();
            old.execute_batch(
                "CREATE TABLE users (
                    name TEXT PRIMARY KEY,
                    role TEXT NOT NULL
                         CHECK (role IN ('agent', 'ward', 'hq', 'integrator', 'admin')),
                    ward INTEGER, site TEXT, password_hash TEXT NOT NULL,
                    created_at INTEGER NOT NULL);
                 CREATE TABLE origins (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE);
                 CREATE TABLE messages (
                    id INTEGER PRIMARY KEY, received_at INTEGER NOT NULL,
                    origin_id INTEGER NOT NULL REFERENCES origins (id), boot INTEGER NOT NULL,
                    seq INTEGER NOT NULL, topic TEXT NOT NULL, kind TEXT NOT NULL,
                    mode TEXT NOT NULL, ward INTEGER, site TEXT, payload BLOB NOT NULL,
                    UNIQUE (origin_id, boot, seq));
                 INSERT INTO users VALUES ('sato', 'hq', NULL, NULL, 'h', 1);
                 INSERT INTO origins VALUES (1, 'site:131041/es-1');
                 INSERT INTO messages VALUES
                    (5, 5, 1, 1, 1, 't1', 'status', 'actual', 131041, 'es-1', x'01');
                 PRAGMA user_version = 3;",
            )
            .unwrap();
            let refused = old.execute(
                "INSERT INTO users VALUES ('relay-shinjuku', 'relay', 131041, NULL, 'h', 2)",
                [],
            );
            assert!(refused.is_err(), "the old check knows no relay");
        }
        let conn = open(dir.path()).unwrap();
        conn.execute(
            "INSERT INTO users (name, role, ward, site, password_hash, created_at)
             VALUES ('relay-shinjuku', 'relay', 131041, NULL, 'h', 2)",
            [],
        )
        .unwrap();
        let cluster_hash: Option<String> = conn
            .query_row(
                "SELECT cluster_hash FROM users WHERE name = 'sato'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(cluster_hash, None, "version 5 adds the column, empty");
        let users: i64 = conn
            .query_row("SELECT COUNT(*) FROM users", [], |r| r.get(0))
            .unwrap();
        assert_eq!(users, 2);
        let row: (i64, Vec<u8>, Option<String>) = conn
            .query_row("SELECT id, payload, via FROM messages", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap();
        assert_eq!(row, (5, vec![1], None));
        assert_eq!(user_version(&conn), SCHEMA_VERSION);
        drop(conn);
        open(dir.path()).unwrap();
    }

    #[test]
    fn a_version_2_database_moves_its_sender_names_to_origins_and_keeps_every_row() {
        let dir = tempfile::tempdir().unwrap();
        {
            let old = Connection::open(path(dir.path())).unwrap();
            old.execute_batch(&format!(
                "{}
                 CREATE INDEX messages_by_time ON messages (received_at);
                 INSERT INTO messages VALUES
                    (7, 5, 'site:131041/es-1', 1, 1, 't1', 'status', 'actual', 131041, 'es-1',
                     x'01'),
                    (8, 6, 'hq:hq-1', 2, 1, 't2', 'alert', 'actual', NULL, NULL, x'02'),
                    (9, 7, 'site:131041/es-1', 1, 2, 't3', 'shelter', 'actual', 131041, 'es-1',
                     x'03');
                 PRAGMA user_version = 2;",
                legacy_messages("")
            ))
            .unwrap();
        }
        let conn = open(dir.path()).unwrap();
        let rows: Vec<(i64, i64, String, i64, i64, Vec<u8>)> = conn
            .prepare(
                "SELECT m.id, m.received_at, o.key, m.boot, m.seq, m.payload
                 FROM messages m JOIN origins o ON o.id = m.origin_id ORDER BY m.id",
            )
            .unwrap()
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                ))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let site = "site:131041/es-1".to_owned();
        assert_eq!(
            rows,
            [
                (7, 5, site.clone(), 1, 1, vec![1]),
                (8, 6, "hq:hq-1".to_owned(), 2, 1, vec![2]),
                (9, 7, site, 1, 2, vec![3]),
            ]
        );
        // The key still keeps a message once, and new rows follow the old ids.
        let origin: i64 = conn
            .query_row("SELECT origin_id FROM messages WHERE id = 7", [], |r| {
                r.get(0)
            })
            .unwrap();
        let insert = "INSERT OR IGNORE INTO messages
            (received_at, origin_id, boot, seq, topic, kind, mode, payload)
            VALUES (8, ?1, 1, ?2, 't', 'status', 'actual', x'04')";
        assert_eq!(conn.execute(insert, params![origin, 1]).unwrap(), 0);
        assert_eq!(conn.execute(insert, params![origin, 3]).unwrap(), 1);
        assert_eq!(conn.last_insert_rowid(), 10);
        let indexes = message_indexes(&conn);
        assert!(
            indexes.contains(&"messages_by_time".to_owned()),
            "{indexes:?}"
        );
        assert_eq!(user_version(&conn), SCHEMA_VERSION);
        drop(conn);
        // Opening again finds nothing to do.
        open(dir.path()).unwrap();
    }

    #[test]
    fn a_version_4_database_gains_the_cluster_hash_column() {
        let dir = tempfile::tempdir().unwrap();
        {
            let old = Connection::open(path(dir.path())).unwrap();
            old.execute_batch(
                "CREATE TABLE users (
                    name TEXT PRIMARY KEY,
                    role TEXT NOT NULL
                         CHECK (role IN ('agent', 'ward', 'hq', 'integrator', 'admin', 'relay')),
                    ward INTEGER, site TEXT, password_hash TEXT NOT NULL,
                    created_at INTEGER NOT NULL);
                 INSERT INTO users VALUES ('sato', 'hq', NULL, NULL, 'h', 1);
                 PRAGMA user_version = 4;",
            )
            .unwrap();
        }
        let conn = open(dir.path()).unwrap();
        conn.execute(
            "UPDATE users SET cluster_hash = 'b' WHERE name = 'sato'",
            [],
        )
        .unwrap();
        assert_eq!(user_version(&conn), SCHEMA_VERSION);
        drop(conn);
        open(dir.path()).unwrap();
    }
}
