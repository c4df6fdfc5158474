//! The recorder: every message ingest accepted, and every payload it refused, into the record:
//! SQLite in the data directory (the default), or a PostgreSQL database that every instance of
//! a clustered HQ shares ([`Archive`], `crate::pg`).
//!
//! Ingest hands the outcomes to [`RecorderTx::send_all`], many at a time: a bounded channel to
//! one thread that writes in batches (up to `recorder.batch_size` rows, or whatever arrived within
//! `recorder.batch_time`), one transaction per batch. A full channel blocks ingest, and the
//! router then holds messages for it, so nothing is dropped while the disk catches up.
//!
//! - Accepted messages go to `messages` with `INSERT OR IGNORE` on the key
//!   `(origin, boot, seq)`: a redelivery, or the retained copies re-published at start-up,
//!   are recorded once.
//! - Refused payloads go to `quarantine` (at most `recorder.quarantine_rows`, the oldest
//!   deleted first; payloads cut to [`QUARANTINE_PAYLOAD_BYTES`]).
//!
//! At start-up [`restore`] replays `messages` in received order through the reducer, which
//! rebuilds the live state and finds the latest message of every retained topic, so that the
//! broker can publish them again (rumqttd keeps retained messages only in memory).
//! [`Recorder::stop`] drains the channel and commits before it returns (graceful shutdown).
//!
//! After every committed batch the recorder hands [`crate::receipts::Sender`] the receipts of
//! each site in it (`renkei_shared::receipt`): the `(boot, seq)` of every one of that site's
//! messages the batch holds, new or a redelivery; the sender publishes them at a steady pace.
//! Agents keep a record until a receipt names it, so a message acknowledged by MQTT but lost
//! with the process before its batch committed is sent again.
//! A batch that fails to commit sends no receipt.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use renkei_shared::{Change, Envelope, Origin, SiteRef, State, Timestamp, Topic, decode};
use rusqlite::{Connection, params};

use crate::config::RecorderConfig;
use crate::metrics::Metrics;
use crate::receipts::SenderTx;
use crate::{db, pg};

/// Where receipts go once the MQTT side is up; empty until then (nothing is received before).
type ReceiptSink = Arc<Mutex<Option<SenderTx>>>;

/// Longest payload kept in quarantine (a refused payload may be anything up to the MQTT limit).
pub const QUARANTINE_PAYLOAD_BYTES: usize = 4096;

/// One thing to write.
#[derive(Debug)]
pub enum Record {
    Accepted {
        received_at: Timestamp,
        topic: Topic,
        // Boxed: an envelope is several times the size of a refusal.
        envelope: Box<Envelope>,
        payload: Vec<u8>,
        /// The connection that brought a site's message when it was not the site's own
        /// agent (see `db`, `messages.via`).
        via: Option<String>,
    },
    Rejected {
        received_at: Timestamp,
        topic: String,
        reason: &'static str,
        detail: String,
        payload: Vec<u8>,
    },
}

/// Why the recorder did not start.
#[derive(Debug, thiserror::Error)]
pub enum RecorderError {
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error(transparent)]
    Pg(#[from] pg::PgError),
    #[error("PostgreSQL: {0}")]
    PgWrite(#[from] postgres::Error),
    #[error("cannot start the recorder thread: {0}")]
    Thread(std::io::Error),
}

/// Where the record is kept.
#[derive(Debug, Clone)]
pub enum Archive {
    /// `renkei.db` in this data directory (the embedded default).
    Sqlite(PathBuf),
    /// A PostgreSQL database every instance of a clustered HQ shares (`recorder.postgres`).
    Postgres {
        // Boxed: a connection's settings are several times the size of a path.
        config: Box<tokio_postgres::Config>,
        /// The HTTP API's connections.
        pool: pg::Pool,
    },
}

impl Archive {
    /// The record `recorder.postgres` names (its schema made or checked), or else the
    /// SQLite file in `data_dir`.
    pub async fn open(config: &RecorderConfig, data_dir: &Path) -> Result<Archive, RecorderError> {
        let Some(conninfo) = &config.postgres else {
            return Ok(Archive::Sqlite(data_dir.to_path_buf()));
        };
        let mut pg_config = pg::parse(conninfo)?;
        if let Some(path) = &config.postgres_password_file {
            let password = crate::config::read_password_file(path).map_err(|source| {
                pg::PgError::Password {
                    path: path.clone(),
                    source,
                }
            })?;
            pg_config.password(password);
        }
        let config = pg_config;
        pg::migrate(&config).await?;
        let pool = pg::Pool::new(config.clone())?;
        Ok(Archive::Postgres {
            config: Box::new(config),
            pool,
        })
    }

    /// What the logs call it.
    pub fn name(&self) -> &'static str {
        match self {
            Archive::Sqlite(_) => "SQLite",
            Archive::Postgres { .. } => "PostgreSQL",
        }
    }
}

/// Where the writer writes.
enum Store {
    Sqlite {
        conn: Connection,
        /// `origins.id` by key, for every sender already in the table.
        origins: HashMap<String, i64>,
        path: PathBuf,
    },
    // Boxed: its client and settings are several times the size of SQLite's connection.
    Postgres(Box<pg::Writer>),
}

impl Store {
    fn open(archive: &Archive) -> Result<Store, RecorderError> {
        Ok(match archive {
            Archive::Sqlite(data_dir) => Store::Sqlite {
                conn: db::open(data_dir)?,
                origins: HashMap::new(),
                path: db::path(data_dir),
            },
            Archive::Postgres { config, .. } => {
                Store::Postgres(Box::new(pg::Writer::new(config.as_ref().clone())))
            }
        })
    }

    /// Writes one batch in one transaction; returns the rows new to `messages`.
    fn write_batch(
        &mut self,
        batch: &[Record],
        quarantine_rows: usize,
    ) -> Result<usize, RecorderError> {
        match self {
            Store::Sqlite { conn, origins, .. } => {
                let written = write_batch(conn, origins, batch, quarantine_rows);
                if written.is_err() {
                    // Senders first seen in the batch are not in the table after all.
                    origins.clear();
                }
                Ok(written?)
            }
            Store::Postgres(writer) => Ok(writer.write_batch(batch, quarantine_rows)?),
        }
    }

    /// The record's size (database and write-ahead log); `None` when it cannot be read now, or
    /// (PostgreSQL) was read less than a second ago: the last size stands.
    fn bytes(&mut self) -> Option<u64> {
        match self {
            Store::Sqlite { path, .. } => Some(
                [path.clone(), path.with_extension("db-wal")]
                    .iter()
                    .filter_map(|p| std::fs::metadata(p).ok())
                    .map(|m| m.len())
                    .sum::<u64>(),
            ),
            Store::Postgres(writer) => writer.bytes(),
        }
    }

    /// Free space on the record's disk, where that disk is this machine's.
    fn free(&self) -> Option<u64> {
        match self {
            Store::Sqlite { path, .. } => path
                .parent()
                .and_then(|dir| rustix::fs::statvfs(dir).ok())
                .map(|v| v.f_bavail.saturating_mul(v.f_frsize)),
            // PostgreSQL's disk is its server's to watch.
            Store::Postgres(_) => None,
        }
    }
}

/// Most records in one hand-off from ingest (see [`RecorderTx::send_all`]).
pub const HANDOFF_RECORDS: usize = 256;

/// How far the recorder has got, counted in hand-offs ([`RecorderTx::send_all`]): for a
/// reader that acknowledges what it consumed only once it is stored (JetStream ingest).
#[derive(Debug, Default)]
pub struct Progress {
    /// Hand-offs queued so far.
    sent: AtomicU64,
    /// Hand-offs the writer has finished with, in order: stored, refused or failed.
    done: AtomicU64,
    /// Of those, hand-offs whose batch was not stored (refused for want of room, or failed).
    not_stored: AtomicU64,
}

impl Progress {
    /// Hand-offs queued so far: every record handed on before this call is in one of them.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Acquire)
    }

    /// Hand-offs finished with, and how many of them were not stored.
    pub fn done(&self) -> (u64, u64) {
        // `not_stored` is raised before `done`: read after it, it counts every one done.
        let done = self.done.load(Ordering::Acquire);
        (done, self.not_stored.load(Ordering::Acquire))
    }
}

/// The sending end, held by ingest.
#[derive(Debug, Clone)]
pub struct RecorderTx {
    tx: SyncSender<Vec<Record>>,
    queued: Arc<AtomicI64>,
    progress: Arc<Progress>,
}

impl RecorderTx {
    /// Queues a record, waiting while the queue is full. False if the recorder has stopped.
    pub fn send(&self, record: Record) -> bool {
        self.send_all(vec![record])
    }

    /// Queues records in order as one hand-off, waiting while the queue is full. False if the
    /// recorder has stopped.
    ///
    /// The queue holds hand-offs, so a sender handing over many records at once wakes the
    /// writer (or, when the queue is full, is woken by it) once for them all rather than once
    /// a record. Its bound, `recorder.queue_capacity` records, is kept in hand-offs of up to
    /// [`HANDOFF_RECORDS`].
    pub fn send_all(&self, records: Vec<Record>) -> bool {
        let n = records.len() as i64;
        if n == 0 {
            return true;
        }
        self.queued.fetch_add(n, Ordering::Relaxed);
        // Counted before the hand-off can reach the writer, so that `done` never passes `sent`.
        self.progress.sent.fetch_add(1, Ordering::AcqRel);
        let sent = match self.tx.try_send(records) {
            Ok(()) => true,
            Err(TrySendError::Full(records)) => self.tx.send(records).is_ok(),
            Err(TrySendError::Disconnected(_)) => false,
        };
        if !sent {
            self.queued.fetch_sub(n, Ordering::Relaxed);
            self.progress.sent.fetch_sub(1, Ordering::AcqRel);
        }
        sent
    }

    /// How far the recorder has got with what was handed to it.
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }
}

/// The running recorder thread.
#[derive(Debug)]
pub struct Recorder {
    tx: Option<RecorderTx>,
    thread: Option<JoinHandle<()>>,
    receipts: ReceiptSink,
    committed: Arc<tokio::sync::Notify>,
}

impl Recorder {
    /// Opens the record and starts the writer thread.
    pub fn start(
        archive: &Archive,
        config: RecorderConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Recorder, RecorderError> {
        let mut store = Store::open(archive)?;
        let handoffs = config.queue_capacity.div_ceil(HANDOFF_RECORDS).max(1);
        let (tx, rx) = std::sync::mpsc::sync_channel(handoffs);
        let queued = metrics.recorder_queue.clone();
        let receipts = ReceiptSink::default();
        let committed = Arc::new(tokio::sync::Notify::new());
        // PostgreSQL's is read on the writer's thread (its blocking client must not run here,
        // where an async runtime may be).
        let db_bytes = match store {
            Store::Sqlite { .. } => store.bytes().unwrap_or(0),
            Store::Postgres(_) => 0,
        };
        let progress = Arc::new(Progress::default());
        let writer = Writer {
            progress: progress.clone(),
            committed: committed.clone(),
            db_bytes,
            refusal_logged: None,
            store,
            config,
            metrics,
            queued: queued.clone(),
            receipts: receipts.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("renkei-recorder".into())
            .spawn(move || writer.run(rx))
            .map_err(RecorderError::Thread)?;
        Ok(Recorder {
            tx: Some(RecorderTx {
                tx,
                queued,
                progress,
            }),
            thread: Some(thread),
            receipts,
            committed,
        })
    }

    /// Notified after every commit that added rows to `messages` (a ward's uplink waits on
    /// it for new rows to forward).
    pub fn committed(&self) -> Arc<tokio::sync::Notify> {
        self.committed.clone()
    }

    /// From now on, the receipts of every commit go to `sender`.
    pub fn send_receipts(&self, sender: SenderTx) {
        *self.receipts.lock().unwrap_or_else(PoisonError::into_inner) = Some(sender);
    }

    pub fn tx(&self) -> Option<RecorderTx> {
        self.tx.clone()
    }

    /// Writes what is queued and stops. Every other [`RecorderTx`] must be dropped first (the
    /// thread ends when the last sender goes).
    pub fn stop(mut self) {
        self.tx = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Writer {
    store: Store,
    config: RecorderConfig,
    metrics: Arc<Metrics>,
    queued: Arc<AtomicI64>,
    receipts: ReceiptSink,
    committed: Arc<tokio::sync::Notify>,
    progress: Arc<Progress>,
    /// The record's size after the last batch (database and write-ahead log).
    db_bytes: u64,
    /// When a refusal was last logged (one line a minute at most).
    refusal_logged: Option<Instant>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Vec<Record>>) {
        let mut batch = Vec::with_capacity(self.config.batch_size + HANDOFF_RECORDS);
        // Wait for the first records, then gather more until the batch is full or its time is
        // up. A batch may pass `batch_size` by less than one hand-off.
        while let Ok(mut records) = rx.recv() {
            batch.append(&mut records);
            let mut handoffs = 1;
            let deadline = Instant::now() + self.config.batch_time.0;
            let mut closed = false;
            while batch.len() < self.config.batch_size {
                match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(mut records) => {
                        batch.append(&mut records);
                        handoffs += 1;
                    }
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            }
            let stored = self.write(&mut batch);
            if !stored {
                self.progress
                    .not_stored
                    .fetch_add(handoffs, Ordering::AcqRel);
            }
            self.progress.done.fetch_add(handoffs, Ordering::AcqRel);
            if closed {
                break;
            }
        }
        tracing::info!("recorder flushed and stopped");
    }

    /// Writes a batch; false if it was not stored (refused for want of room, or failed).
    fn write(&mut self, batch: &mut Vec<Record>) -> bool {
        let rows = batch.len();
        self.queued.fetch_sub(rows as i64, Ordering::Relaxed);
        let started = Instant::now();
        if let Err(reason) = self.room() {
            // Nothing of the batch is written and no receipt goes out: every sender keeps its
            // messages and sends them again, so they are counted here, never lost.
            self.metrics.recorder_refused(rows, reason);
            if self
                .refusal_logged
                .is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(60))
            {
                self.refusal_logged = Some(Instant::now());
                tracing::error!(
                    rows,
                    reason,
                    db_bytes = self.db_bytes,
                    "recorder: the record has no room: batch refused (its senders keep it and \
                     send again; free space or raise recorder.max_bytes)"
                );
            }
            batch.clear();
            return false;
        }
        let stored = match self.store.write_batch(batch, self.config.quarantine_rows) {
            Ok(inserted) => {
                self.metrics.recorder_batch(rows, inserted);
                self.send_receipts(batch);
                if inserted > 0 {
                    self.committed.notify_one();
                }
                true
            }
            Err(e) => {
                self.metrics.recorder_failed(rows);
                tracing::error!(error = %e, rows, "recorder: cannot write a batch");
                false
            }
        };
        batch.clear();
        if let Some(bytes) = self.store.bytes() {
            self.db_bytes = bytes;
        }
        self.metrics.recorder_db_bytes(self.db_bytes);
        tracing::trace!(rows, elapsed = ?started.elapsed(), "recorder batch");
        stored
    }
}

impl Writer {
    /// Whether the record may grow by a batch: within `recorder.max_bytes`, and leaving
    /// `recorder.min_free` on its disk. Also sets the budget and the 80 % alarm.
    fn room(&mut self) -> Result<(), &'static str> {
        let max = self.config.max_bytes.0 as u64;
        let min_free = self.config.min_free.0 as u64;
        let free = self.store.free();
        // What the record may take in all: up to max_bytes, and no more than the disk gives.
        let by_disk = free.map(|f| self.db_bytes.saturating_add(f.saturating_sub(min_free)));
        let budget = match (max, by_disk) {
            (0, Some(d)) => d,
            (0, None) => 0,
            (m, Some(d)) => m.min(d),
            (m, None) => m,
        };
        self.metrics.recorder_db_bytes(self.db_bytes);
        self.metrics.recorder_budget(budget, self.db_bytes);
        if max > 0 && self.db_bytes >= max {
            return Err("max_bytes");
        }
        if free.is_some_and(|f| f < min_free) {
            return Err("min_free");
        }
        Ok(())
    }

    /// Tells every site in a committed batch which of its messages are now stored.
    fn send_receipts(&self, batch: &[Record]) {
        let sink = self.receipts.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(sender) = sink.as_ref() else {
            return;
        };
        let mut keys: Vec<(&SiteRef, u32, u64)> = batch
            .iter()
            .filter_map(|record| match record {
                Record::Accepted { envelope, .. } => match &envelope.header.origin {
                    Origin::Site(site) => Some((site, envelope.header.boot, envelope.header.seq)),
                    Origin::Hq(_) => None,
                },
                Record::Rejected { .. } => None,
            })
            .collect();
        if keys.is_empty() {
            return;
        }
        // Grouped by site, each site's keys in the order received (a stable sort).
        keys.sort_by(|a, b| a.0.cmp(b.0));
        let committed = keys
            .chunk_by(|a, b| a.0 == b.0)
            .map(|run| (run[0].0.clone(), run.iter().map(|k| (k.1, k.2)).collect()))
            .collect();
        sender.committed(committed);
    }
}

/// The sending site's `ward` and `site` columns; none for HQ's own messages.
pub(crate) fn site_columns(origin: &Origin) -> (Option<u32>, Option<&str>) {
    match origin {
        Origin::Site(s) => (Some(s.ward.0), Some(s.site.as_str())),
        Origin::Hq(_) => (None, None),
    }
}

/// `site:{ward}/{site}` or `hq:{node}`.
pub fn origin_key(origin: &Origin) -> String {
    let mut key = String::new();
    write_origin_key(&mut key, origin);
    key
}

/// Appends [`origin_key`] to `out`.
pub(crate) fn write_origin_key(out: &mut String, origin: &Origin) {
    // Writing to a String cannot fail.
    let _ = match origin {
        Origin::Site(s) => write!(out, "site:{}/{}", s.ward, s.site),
        Origin::Hq(node) => write!(out, "hq:{node}"),
    };
}

/// Writes one batch in one transaction; returns the rows new to `messages`.
fn write_batch(
    conn: &mut Connection,
    origins: &mut HashMap<String, i64>,
    batch: &[Record],
    quarantine_rows: usize,
) -> rusqlite::Result<usize> {
    let tx = conn.transaction()?;
    let mut inserted = 0;
    let mut quarantined = false;
    // Written again for every row rather than allocated for each.
    let (mut origin, mut topic_name) = (String::new(), String::new());
    {
        let mut message = tx.prepare_cached(
            "INSERT OR IGNORE INTO messages
             (received_at, origin_id, boot, seq, topic, kind, mode, ward, site, payload, via)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?;
        let mut quarantine = tx.prepare_cached(
            "INSERT INTO quarantine (received_at, topic, reason, detail, payload)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
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
                    let (ward, site) = site_columns(&h.origin);
                    origin.clear();
                    write_origin_key(&mut origin, &h.origin);
                    let origin_id = match origins.get(origin.as_str()) {
                        Some(id) => *id,
                        None => {
                            let id = add_origin(&tx, &origin)?;
                            origins.insert(origin.clone(), id);
                            id
                        }
                    };
                    topic_name.clear();
                    // Writing to a String cannot fail.
                    let _ = write!(topic_name, "{topic}");
                    inserted += message.execute(params![
                        received_at.0,
                        origin_id,
                        h.boot,
                        // SQLite integers are signed: a seq beyond i64 is kept as its bits.
                        h.seq as i64,
                        topic_name,
                        envelope.body.kind().as_str(),
                        h.mode.as_str(),
                        ward,
                        site,
                        payload,
                        via,
                    ])?;
                }
                Record::Rejected {
                    received_at,
                    topic,
                    reason,
                    detail,
                    payload,
                } => {
                    let cut = &payload[..payload.len().min(QUARANTINE_PAYLOAD_BYTES)];
                    quarantine.execute(params![received_at.0, topic, reason, detail, cut])?;
                    quarantined = true;
                }
            }
        }
    }
    if quarantined {
        tx.execute(
            "DELETE FROM quarantine WHERE id <= (SELECT MAX(id) FROM quarantine) - ?1",
            [i64::try_from(quarantine_rows).unwrap_or(i64::MAX)],
        )?;
    }
    tx.commit()?;
    Ok(inserted)
}

/// The id of the sender `key` in `origins`, added if new.
fn add_origin(tx: &rusqlite::Transaction<'_>, key: &str) -> rusqlite::Result<i64> {
    tx.prepare_cached("INSERT INTO origins (key) VALUES (?1) ON CONFLICT (key) DO NOTHING")?
        .execute([key])?;
    tx.prepare_cached("SELECT id FROM origins WHERE key = ?1")?
        .query_row([key], |r| r.get(0))
}

/// What start-up found in the database.
#[derive(Debug, Default)]
pub struct Restored {
    pub state: State,
    /// The latest message of every retained topic, with its encoded payload.
    pub retained: Vec<Retained>,
    pub messages: u64,
    /// Rows that no longer decode (a schema change); counted and skipped.
    pub unreadable: u64,
}

/// The latest recorded message on a retained topic.
#[derive(Debug, Clone)]
pub struct Retained {
    pub topic: Topic,
    pub envelope: Envelope,
    /// As received (postcard).
    pub payload: Vec<u8>,
    pub received_at: Timestamp,
}

/// Replays every recorded message in received order through the reducer.
pub async fn restore(archive: &Archive) -> Result<Restored, RecorderError> {
    let mut replay = Replay::default();
    match archive {
        Archive::Sqlite(data_dir) => {
            let conn = db::open(data_dir)?;
            let mut stmt =
                conn.prepare("SELECT topic, payload, received_at FROM messages ORDER BY id")?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                replay.add(&row.get::<_, String>(0)?, row.get(1)?, row.get(2)?);
            }
        }
        Archive::Postgres { config, .. } => {
            pg::replay(config, |topic, payload, received_at| {
                replay.add(&topic, payload, received_at);
            })
            .await?;
        }
    }
    Ok(replay.finish())
}

/// The restore's progress through the record.
#[derive(Default)]
struct Replay {
    restored: Restored,
    latest: HashMap<Topic, (u64, Retained)>,
    order: u64,
}

impl Replay {
    fn add(&mut self, topic: &str, payload: Vec<u8>, received_at: i64) {
        let received_at = Timestamp(received_at);
        let (Ok(topic), Ok(envelope)) = (Topic::parse(topic), decode(&payload)) else {
            self.restored.unreadable += 1;
            return;
        };
        self.restored.messages += 1;
        self.order += 1;
        // As ingest applied it.
        let adjusted = crate::skew::for_state(&envelope, received_at);
        let change = self
            .restored
            .state
            .apply(adjusted.as_ref().unwrap_or(&envelope));
        if topic.retained() && matches!(change, Change::Updated { .. }) {
            let retained = Retained {
                topic: topic.clone(),
                envelope,
                payload,
                received_at,
            };
            self.latest.insert(topic, (self.order, retained));
        }
    }

    fn finish(mut self) -> Restored {
        let mut retained: Vec<_> = self.latest.into_iter().collect();
        // Publish in the order they arrived, as the original publishers did.
        retained.sort_by_key(|(_, (order, _))| *order);
        self.restored.retained = retained.into_iter().map(|(_, (_, r))| r).collect();
        self.restored
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use renkei_shared::{encode, sample};

    use super::*;

    /// An accepted record of `envelope`, as ingest hands it over.
    pub(crate) fn accepted(envelope: Envelope) -> Record {
        Record::Accepted {
            received_at: sample::SENT_AT,
            topic: Topic::of(&envelope).unwrap(),
            payload: encode(&envelope).unwrap(),
            envelope: Box::new(envelope),
            via: None,
        }
    }

    #[test]
    fn a_record_out_of_room_refuses_counts_and_receipts_nothing_and_takes_again_with_room() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        // No room at all: the empty database already holds more than a byte.
        let config = RecorderConfig {
            max_bytes: crate::config::ByteSize(1),
            ..RecorderConfig::default()
        };
        let recorder = Recorder::start(
            &Archive::Sqlite(dir.path().to_path_buf()),
            config,
            metrics.clone(),
        )
        .unwrap();
        let tx = recorder.tx().unwrap();
        for env in sample::all() {
            assert!(tx.send(accepted(env)));
        }
        drop(tx);
        recorder.stop();
        let (bytes, budget, alarm, refused) = metrics.record_room();
        assert_eq!(refused, sample::all().len() as u64, "every record counted");
        assert!(alarm && budget == 1 && bytes > 0);
        let text = metrics.render();
        assert!(
            text.contains(&format!(
                "renkei_recorder_refused_total{{reason=\"max_bytes\"}} {}",
                sample::all().len()
            )),
            "{text}"
        );
        assert!(text.contains("renkei_database_alarm 1"), "{text}");
        let conn = db::open(dir.path()).unwrap();
        let stored: i64 = conn
            .query_row("SELECT COUNT(*) FROM messages", [], |r| r.get(0))
            .unwrap();
        assert_eq!(stored, 0);
        drop(conn);

        // With room again (the budget raised), the same messages, sent again, are taken.
        let metrics = Arc::new(Metrics::new());
        let recorder = Recorder::start(
            &Archive::Sqlite(dir.path().to_path_buf()),
            RecorderConfig::default(),
            metrics.clone(),
        )
        .unwrap();
        let tx = recorder.tx().unwrap();
        for env in sample::all() {
            assert!(tx.send(accepted(env)));
        }
        drop(tx);
        recorder.stop();
        let (_, budget, alarm, refused) = metrics.record_room();
        assert_eq!((refused, alarm), (0, false));
        assert!(budget > 0, "the disk's room");
        let conn = db::open(dir.path()).unwrap();
        let stored: i64 = conn
            .query_row("SELECT COUNT(*) FROM messages", [], |r| r.get(0))
            .unwrap();
        assert_eq!(stored, sample::all().len() as i64);
    }

    #[test]
    fn records_once_quarantines_bounded_and_restores() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let config = RecorderConfig {
            quarantine_rows: 3,
            ..RecorderConfig::default()
        };
        let recorder = Recorder::start(
            &Archive::Sqlite(dir.path().to_path_buf()),
            config,
            metrics.clone(),
        )
        .unwrap();
        let tx = recorder.tx().unwrap();
        for env in sample::all() {
            assert!(tx.send(accepted(env)));
        }
        // A redelivery is recorded once.
        assert!(tx.send(accepted(sample::status())));
        for i in 0..5u8 {
            assert!(tx.send(Record::Rejected {
                received_at: sample::SENT_AT,
                topic: "renkei/v1/131041/x/status".into(),
                reason: "malformed",
                detail: format!("bad {i}"),
                payload: vec![i; 10_000],
            }));
        }
        drop(tx);
        recorder.stop();

        let conn = db::open(dir.path()).unwrap();
        let count = |sql: &str| -> i64 { conn.query_row(sql, [], |r| r.get(0)).unwrap() };
        assert_eq!(
            count("SELECT COUNT(*) FROM messages"),
            sample::all().len() as i64
        );
        assert_eq!(count("SELECT COUNT(*) FROM quarantine"), 3);
        assert_eq!(
            count("SELECT MAX(length(payload)) FROM quarantine"),
            QUARANTINE_PAYLOAD_BYTES as i64
        );
        let detail: String = conn
            .query_row(
                "SELECT detail FROM quarantine ORDER BY id LIMIT 1",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(detail, "bad 2", "the oldest went first");
        // Every sample once, and the six refusals (three trimmed since).
        let rows = sample::all().len() + 6;
        assert!(
            metrics
                .render()
                .contains(&format!("renkei_recorder_rows_total {rows}"))
        );

        let restored =
            futures::executor::block_on(restore(&Archive::Sqlite(dir.path().to_path_buf())))
                .unwrap();
        assert_eq!(restored.messages, sample::all().len() as u64);
        let mut live = State::new();
        for env in sample::all() {
            live.apply(&env);
        }
        assert_eq!(restored.state, live);
        // Every retained kind comes back once; commands and their answers are not retained.
        assert_eq!(
            restored.retained.len(),
            8,
            "birth and death share the life topic"
        );
        assert!(restored.retained.iter().all(|r| r.topic.retained()));
    }
}
