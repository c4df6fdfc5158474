//! The record in PostgreSQL (`recorder.postgres`): one record shared by every instance of a
//! clustered HQ (docs/scaling.md), beside SQLite, which stays the embedded default.
//!
//! ```sql
//! renkei_meta (key PK, value)                              -- 'schema_version'
//! origins     (id PK, key UNIQUE)                          -- 'site:{ward}/{site}' or 'hq:{node}'
//! messages    (id PK, received_at, origin_id, boot, seq, topic, kind, mode, ward, site,
//!              payload BYTEA, via, UNIQUE (origin_id, boot, seq))
//! quarantine  (id PK, received_at, topic, reason, detail, payload BYTEA)   -- bounded
//! ```
//!
//! The tables are those of the SQLite record (`crate::db`), and mean the same. Users stay in
//! each instance's own SQLite file (`crate::auth`).
//!
//! - **Every instance records everything**, and the key `(origin_id, boot, seq)` with
//!   `ON CONFLICT DO NOTHING` keeps one row per message: the second instance to write a
//!   message finds it there and only confirms it (its receipt goes out all the same).
//! - **Writers take turns**: each batch's transaction first takes one transaction-level
//!   advisory lock ([`WRITE_LOCK`]). Row ids then grow in commit order across instances, so an
//!   integrator reading `GET /api/v1/events?since=` never passes a row that commits later with
//!   a smaller id; and two instances writing the same messages in different orders cannot
//!   deadlock on the key. A batch is one statement per table (arrays through `unnest`), so
//!   the lock is held for a few milliseconds.
//! - **Senders' ids** are added before the batch's transaction, in sorted order and committed
//!   at once: an `origins` row is never removed, so one added for a batch that then fails
//!   costs nothing.
//! - **The schema** is created and upgraded by the first instance to start, under a second
//!   advisory lock ([`SCHEMA_LOCK`]); `renkei_meta.schema_version` says which it is, and an
//!   instance refuses a record written by a newer one.
//!
//! The recorder's thread writes through the blocking client ([`Writer`]); a batch that fails
//! (PostgreSQL restarting, a lost connection) is not stored, sends no receipt, and the next
//! batch connects again. The start-up restore and the HTTP API read through the async client,
//! the API through a small [`Pool`].

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use futures::StreamExt as _;

use crate::recorder::{QUARANTINE_PAYLOAD_BYTES, Record, site_columns, write_origin_key};

/// The schema `SCHEMA` makes, as `renkei_meta.schema_version`.
pub const SCHEMA_VERSION: i64 = 1;

/// The advisory lock every batch's transaction holds: writers take turns.
pub const WRITE_LOCK: i64 = 0x7265_6e6b_6569_0001;
/// The advisory lock of the schema's creation and upgrades.
pub const SCHEMA_LOCK: i64 = 0x7265_6e6b_6569_0002;

/// Connections the HTTP API reads through at most.
const READERS: usize = 4;

/// How long a connection attempt waits (unless `connect_timeout` is in the connection string).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS origins (
    id  BIGSERIAL PRIMARY KEY,
    key TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS messages (
    id          BIGSERIAL PRIMARY KEY,
    received_at BIGINT NOT NULL,
    origin_id   BIGINT NOT NULL REFERENCES origins (id),
    boot        BIGINT NOT NULL,
    seq         BIGINT NOT NULL,
    topic       TEXT NOT NULL,
    kind        TEXT NOT NULL,
    mode        TEXT NOT NULL,
    ward        BIGINT,
    site        TEXT,
    payload     BYTEA NOT NULL,
    via         TEXT,
    UNIQUE (origin_id, boot, seq)
);
CREATE INDEX IF NOT EXISTS messages_by_time ON messages (received_at);
CREATE INDEX IF NOT EXISTS messages_commands ON messages (id)
    WHERE kind IN ('command', 'command_result');
CREATE TABLE IF NOT EXISTS quarantine (
    id          BIGSERIAL PRIMARY KEY,
    received_at BIGINT NOT NULL,
    topic       TEXT NOT NULL,
    reason      TEXT NOT NULL,
    detail      TEXT NOT NULL,
    payload     BYTEA NOT NULL
);
";

/// Why the PostgreSQL record cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The connection string does not parse (it is not shown: it may hold a password).
    #[error("recorder.postgres: not a PostgreSQL connection string: {0}")]
    Config(String),
    #[error("PostgreSQL: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("cannot read recorder.postgres_password_file {path}: {source}")]
    Password {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("PostgreSQL: no connection from the pool: {0}")]
    Pool(String),
    #[error(
        "PostgreSQL: the record's schema is version {found}, newer than this broker's \
         {SCHEMA_VERSION}: upgrade the broker"
    )]
    Newer { found: i64 },
}

/// Parses a connection string (`postgresql://user@host:port/db` or `host=… user=… dbname=…`),
/// with a connect timeout and the application name set when it names none.
pub fn parse(conninfo: &str) -> Result<tokio_postgres::Config, PgError> {
    let mut config =
        tokio_postgres::Config::from_str(conninfo).map_err(|e| PgError::Config(e.to_string()))?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    if config.get_application_name().is_none() {
        config.application_name("renkei-broker");
    }
    Ok(config)
}

/// Connects with the async client; its connection is driven by a task on the current runtime.
async fn connect(config: &tokio_postgres::Config) -> Result<tokio_postgres::Client, PgError> {
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// Creates the schema, or checks it, under [`SCHEMA_LOCK`] (instances starting together
/// create it once).
pub async fn migrate(config: &tokio_postgres::Config) -> Result<(), PgError> {
    let mut client = connect(config).await?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS renkei_meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL)",
    )
    .await?;
    let found: Option<i64> = tx
        .query_opt(
            "SELECT value FROM renkei_meta WHERE key = 'schema_version'",
            &[],
        )
        .await?
        .map(|row| row.get(0));
    match found {
        Some(v) if v > SCHEMA_VERSION => return Err(PgError::Newer { found: v }),
        Some(v) if v == SCHEMA_VERSION => {}
        _ => {
            // Version 1 is the first: there is nothing older to upgrade from yet.
            tx.batch_execute(SCHEMA).await?;
            tx.execute(
                "INSERT INTO renkei_meta (key, value) VALUES ('schema_version', $1)
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                &[&SCHEMA_VERSION],
            )
            .await?;
            tracing::info!(version = SCHEMA_VERSION, "PostgreSQL record: schema made");
        }
    }
    tx.commit().await?;
    Ok(())
}

/// Every recorded message, in the order recorded: `(topic, payload, received_at)` to `each`.
pub async fn replay(
    config: &tokio_postgres::Config,
    mut each: impl FnMut(String, Vec<u8>, i64),
) -> Result<(), PgError> {
    let client = connect(config).await?;
    let rows = client
        .query_raw(
            "SELECT topic, payload, received_at FROM messages ORDER BY id",
            std::iter::empty::<i64>(),
        )
        .await?;
    let mut rows = std::pin::pin!(rows);
    while let Some(row) = rows.next().await {
        let row = row?;
        each(row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
    }
    Ok(())
}

/// The HTTP API's connections to the record.
#[derive(Clone)]
pub struct Pool(deadpool_postgres::Pool);

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the connection string: it may hold a password.
        f.debug_struct("Pool")
            .field("status", &self.0.status())
            .finish()
    }
}

impl Pool {
    /// A pool of up to `READERS` (4) connections, opened as they are needed.
    pub fn new(config: tokio_postgres::Config) -> Result<Pool, PgError> {
        let manager = deadpool_postgres::Manager::from_config(
            config,
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig {
                // A connection that broke (PostgreSQL restarted) is found out and replaced.
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        deadpool_postgres::Pool::builder(manager)
            .max_size(READERS)
            .build()
            .map(Pool)
            .map_err(|e| PgError::Pool(e.to_string()))
    }

    /// Runs one query and returns its rows.
    pub async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, PgError> {
        let client = self
            .0
            .get()
            .await
            .map_err(|e| PgError::Pool(e.to_string()))?;
        let statement = client.prepare_cached(sql).await?;
        Ok(client.query(&statement, params).await?)
    }
}

/// The recorder thread's connection: writes batches, connecting again after a failure.
pub struct Writer {
    config: postgres::Config,
    client: Option<postgres::Client>,
    /// `origins.id` by key, for every sender already in the table.
    origins: HashMap<String, i64>,
    /// When [`Writer::bytes`] last asked the server.
    size_read: Option<std::time::Instant>,
}

/// How often [`Writer::bytes`] asks the server at most (it walks the database's files).
const SIZE_EVERY: Duration = Duration::from_secs(1);

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("connected", &self.client.is_some())
            .finish_non_exhaustive()
    }
}

/// One batch as columns, for `unnest`.
#[derive(Default)]
struct Columns {
    received_at: Vec<i64>,
    origin_id: Vec<i64>,
    boot: Vec<i64>,
    seq: Vec<i64>,
    topic: Vec<String>,
    kind: Vec<&'static str>,
    mode: Vec<&'static str>,
    ward: Vec<Option<i64>>,
    site: Vec<Option<String>>,
    payload: Vec<Vec<u8>>,
    via: Vec<Option<String>>,
}

/// Refused payloads as columns.
#[derive(Default)]
struct Quarantine<'a> {
    received_at: Vec<i64>,
    topic: Vec<&'a str>,
    reason: Vec<&'static str>,
    detail: Vec<&'a str>,
    payload: Vec<&'a [u8]>,
}

impl Writer {
    /// Must be called off any async runtime (the blocking client runs its own).
    pub fn new(config: tokio_postgres::Config) -> Writer {
        Writer {
            config: postgres::Config::from(config),
            client: None,
            origins: HashMap::new(),
            size_read: None,
        }
    }

    /// The connection, made again if there is none or it broke.
    fn client(&mut self) -> Result<&mut postgres::Client, postgres::Error> {
        let client = match self.client.take() {
            Some(client) if !client.is_closed() => client,
            _ => {
                // A new connection may meet a record another instance has added to since.
                self.origins.clear();
                self.config.connect(postgres::NoTls)?
            }
        };
        Ok(self.client.insert(client))
    }

    /// Writes one batch in one transaction; returns the rows new to `messages`. After an
    /// error the connection is dropped, and the next batch connects again.
    pub fn write_batch(
        &mut self,
        batch: &[Record],
        quarantine_rows: usize,
    ) -> Result<usize, postgres::Error> {
        let written = self.try_write(batch, quarantine_rows);
        if written.is_err() {
            self.client = None;
            self.origins.clear();
        }
        written
    }

    fn try_write(
        &mut self,
        batch: &[Record],
        quarantine_rows: usize,
    ) -> Result<usize, postgres::Error> {
        let mut key = String::new();
        let mut keys = Vec::new();
        for record in batch {
            if let Record::Accepted { envelope, .. } = record {
                key.clear();
                write_origin_key(&mut key, &envelope.header.origin);
                if !self.origins.contains_key(key.as_str()) {
                    keys.push(key.clone());
                }
            }
        }
        keys.sort_unstable();
        keys.dedup();
        let client = self.client()?;
        let mut new_origins = Vec::new();
        if !keys.is_empty() {
            // Sorted, and committed at once: two instances adding the same senders wait for
            // each other at most, never deadlock.
            client.execute(
                "INSERT INTO origins (key) SELECT k FROM unnest($1::text[]) AS k ORDER BY k
                 ON CONFLICT (key) DO NOTHING",
                &[&keys],
            )?;
            for row in client.query(
                "SELECT key, id FROM origins WHERE key = ANY($1::text[])",
                &[&keys],
            )? {
                new_origins.push((row.try_get::<_, String>(0)?, row.try_get::<_, i64>(1)?));
            }
        }
        self.origins.extend(new_origins);

        let mut columns = Columns::default();
        let mut quarantine = Quarantine::default();
        for record in batch {
            match record {
                Record::Accepted {
                    received_at,
                    topic,
                    envelope,
                    payload,
                    via,
                } => {
                    let h = &envelope.header;
                    key.clear();
                    write_origin_key(&mut key, &h.origin);
                    let Some(origin_id) = self.origins.get(key.as_str()) else {
                        // Every key was added above; a row missing would be a bug, not input.
                        tracing::error!(origin = %key, "PostgreSQL record: sender has no id");
                        continue;
                    };
                    let (ward, site) = site_columns(&h.origin);
                    columns.received_at.push(received_at.0);
                    columns.origin_id.push(*origin_id);
                    columns.boot.push(i64::from(h.boot));
                    // As in SQLite: a seq beyond i64 is kept as its bits.
                    columns.seq.push(h.seq as i64);
                    columns.topic.push(topic.to_string());
                    columns.kind.push(envelope.body.kind().as_str());
                    columns.mode.push(h.mode.as_str());
                    columns.ward.push(ward.map(i64::from));
                    columns.site.push(site.map(str::to_owned));
                    columns.payload.push(payload.clone());
                    columns.via.push(via.clone());
                }
                Record::Rejected {
                    received_at,
                    topic,
                    reason,
                    detail,
                    payload,
                } => {
                    quarantine.received_at.push(received_at.0);
                    quarantine.topic.push(topic.as_str());
                    quarantine.reason.push(*reason);
                    quarantine.detail.push(detail.as_str());
                    quarantine
                        .payload
                        .push(&payload[..payload.len().min(QUARANTINE_PAYLOAD_BYTES)]);
                }
            }
        }

        let client = self.client()?;
        let mut tx = client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])?;
        let mut inserted = 0;
        if !columns.seq.is_empty() {
            let c = &columns;
            inserted = tx.execute(
                "INSERT INTO messages
                 (received_at, origin_id, boot, seq, topic, kind, mode, ward, site, payload, via)
                 SELECT * FROM unnest($1::int8[], $2::int8[], $3::int8[], $4::int8[],
                     $5::text[], $6::text[], $7::text[], $8::int8[], $9::text[], $10::bytea[],
                     $11::text[])
                 ON CONFLICT (origin_id, boot, seq) DO NOTHING",
                &[
                    &c.received_at,
                    &c.origin_id,
                    &c.boot,
                    &c.seq,
                    &c.topic,
                    &c.kind,
                    &c.mode,
                    &c.ward,
                    &c.site,
                    &c.payload,
                    &c.via,
                ],
            )?;
        }
        if !quarantine.received_at.is_empty() {
            let q = &quarantine;
            tx.execute(
                "INSERT INTO quarantine (received_at, topic, reason, detail, payload)
                 SELECT * FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[],
                     $5::bytea[])",
                &[&q.received_at, &q.topic, &q.reason, &q.detail, &q.payload],
            )?;
            tx.execute(
                "DELETE FROM quarantine WHERE id <= (SELECT MAX(id) FROM quarantine) - $1",
                &[&i64::try_from(quarantine_rows).unwrap_or(i64::MAX)],
            )?;
        }
        tx.commit()?;
        Ok(usize::try_from(inserted).unwrap_or(usize::MAX))
    }

    /// The database's size on disk, if it can be read now: at most once a second
    /// (`SIZE_EVERY`), and
    /// only over a connection the last batch left open (never a new one: after a failed batch
    /// that would wait out the connect timeout a second time).
    pub fn bytes(&mut self) -> Option<u64> {
        if self.size_read.is_some_and(|at| at.elapsed() < SIZE_EVERY) {
            return None;
        }
        let client = self.client.as_mut().filter(|c| !c.is_closed())?;
        self.size_read = Some(std::time::Instant::now());
        let row = client
            .query_one("SELECT pg_database_size(current_database())", &[])
            .ok()?;
        row.try_get::<_, i64>(0)
            .ok()
            .and_then(|b| u64::try_from(b).ok())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use renkei_shared::{State, sample};
    use renkei_testkit::postgres::Postgres;

    use crate::config::RecorderConfig;
    use crate::http::history::tests::postgres_archive;
    use crate::metrics::Metrics;
    use crate::recorder::tests::accepted;
    use crate::recorder::{Archive, Record, Recorder, restore};

    fn rejected(i: u8) -> Record {
        Record::Rejected {
            received_at: sample::SENT_AT,
            topic: "renkei/v1/131041/x/status".into(),
            reason: "malformed",
            detail: format!("bad {i}"),
            payload: vec![i; 10_000],
        }
    }

    /// Waits until the recorder has finished with everything handed to it; how many hand-offs
    /// were not stored.
    fn settled(recorder: &Recorder) -> u64 {
        let progress = recorder.tx().unwrap().progress();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (done, not_stored) = progress.done();
            if done == progress.sent() {
                return not_stored;
            }
            assert!(Instant::now() < deadline, "the recorder did not finish");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_instances_record_each_message_once_and_restore_the_same_state() {
        let pg = Postgres::start();
        let archive = postgres_archive(&pg).await;
        // The second instance finds the schema made.
        let again = postgres_archive(&pg).await;
        let config = RecorderConfig {
            quarantine_rows: 3,
            batch_size: 4,
            ..RecorderConfig::default()
        };
        let (a, b) = (Arc::new(Metrics::new()), Arc::new(Metrics::new()));
        let first = Recorder::start(&archive, config.clone(), a.clone()).unwrap();
        let second = Recorder::start(&again, config, b.clone()).unwrap();
        let (tx_a, tx_b) = (first.tx().unwrap(), second.tx().unwrap());
        // Both get every message, in opposite orders, a hand-off at a time, at once.
        let one = std::thread::spawn(move || {
            for env in sample::all() {
                assert!(tx_a.send(accepted(env)));
            }
            assert!(tx_a.send(accepted(sample::status())), "a redelivery");
            for i in 0..5 {
                assert!(tx_a.send(rejected(i)));
            }
        });
        for env in sample::all().into_iter().rev() {
            assert!(tx_b.send(accepted(env)));
        }
        one.join().unwrap();
        assert_eq!(settled(&first), 0);
        assert_eq!(settled(&second), 0);
        drop(tx_b);
        first.stop();
        second.stop();

        let n = sample::all().len() as i64;
        assert_eq!(pg.count("SELECT COUNT(*) FROM messages"), n, "one row each");
        assert_eq!(
            pg.count("SELECT COUNT(DISTINCT (origin_id, boot, seq)) FROM messages"),
            n
        );
        assert_eq!(pg.count("SELECT COUNT(*) FROM quarantine"), 3);
        assert_eq!(
            pg.count("SELECT MAX(length(payload)) FROM quarantine"),
            crate::recorder::QUARANTINE_PAYLOAD_BYTES as i64
        );
        assert_eq!(
            pg.query("SELECT detail FROM quarantine ORDER BY id LIMIT 1"),
            "bad 2",
            "the oldest went first"
        );
        let inserted = |m: &Metrics| {
            let text = m.render();
            text.lines()
                .find_map(|l| l.strip_prefix("renkei_recorder_messages_inserted_total "))
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(0)
        };
        assert_eq!(
            inserted(&a) + inserted(&b),
            n,
            "between them the instances inserted each message once"
        );

        let restored = restore(&archive).await.unwrap();
        assert_eq!(restored.messages, n as u64);
        let mut live = State::new();
        for env in sample::all() {
            live.apply(&env);
        }
        assert_eq!(restored.state, live);
        assert!(!restored.retained.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_lost_with_the_server_is_not_stored_and_the_next_after_its_restart_is() {
        let mut pg = Postgres::start();
        let archive = postgres_archive(&pg).await;
        let metrics = Arc::new(Metrics::new());
        let config = RecorderConfig {
            batch_time: crate::config::HumanDuration(Duration::from_millis(10)),
            ..RecorderConfig::default()
        };
        let recorder = Recorder::start(&archive, config, metrics.clone()).unwrap();
        let tx = recorder.tx().unwrap();
        let all = sample::all();
        let (before, after) = all.split_at(all.len() / 2);
        for env in before {
            assert!(tx.send(accepted(env.clone())));
        }
        assert_eq!(settled(&recorder), 0);

        pg.crash();
        for env in after {
            assert!(tx.send(accepted(env.clone())));
        }
        assert!(
            settled(&recorder) > 0,
            "nothing is stored while the server is down"
        );
        assert!(
            metrics
                .render()
                .contains(&format!("renkei_recorder_failed_total {}", after.len())),
            "{}",
            metrics.render()
        );

        pg.start_again();
        // The senders had no receipt, so they send again.
        let failed_before = settled(&recorder);
        for env in after {
            assert!(tx.send(accepted(env.clone())));
        }
        assert_eq!(
            settled(&recorder),
            failed_before,
            "stored after the restart"
        );
        drop(tx);
        recorder.stop();
        assert_eq!(pg.count("SELECT COUNT(*) FROM messages"), all.len() as i64);
        let restored = restore(&archive).await.unwrap();
        assert_eq!(restored.messages, all.len() as u64);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_from_a_newer_broker_is_refused_and_a_bad_string_names_no_secret() {
        let pg = Postgres::start();
        let _ = postgres_archive(&pg).await;
        pg.query("UPDATE renkei_meta SET value = 99 WHERE key = 'schema_version'");
        let config = RecorderConfig {
            postgres: Some(pg.url()),
            ..Default::default()
        };
        let error = Archive::open(&config, std::path::Path::new("/nonexistent"))
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("version 99"), "{error}");

        let error = super::parse("postgresql://renkei:hunter2@[bad")
            .unwrap_err()
            .to_string();
        assert!(error.contains("recorder.postgres"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
    }
}
