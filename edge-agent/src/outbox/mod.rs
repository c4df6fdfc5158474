//! The outbox: every message a site must deliver, on local disk before anyone is told "saved",
//! and removed only once delivered (HQ's receipt, or the PUBACK with `confirm = "puback"`).
//! The record and segment format is in `outbox/segment.rs`.
//!
//! Layout, under `{state_dir}/outbox/`:
//!
//! ```text
//! lock                          flock: the daemon and `renkei-agent report` take turns
//! daemon.lock                   flock held by a running daemon for its whole life
//! seq                           "boot seq": the last sequence number handed out
//! acked                         "boot seq": every record up to here reached the broker
//! latest                        the newest shelter and supplies reports (for the snapshot)
//! alarm                         present while reports are being refused (full, disk full)
//! {boot:010}-{seq:020}.seg      segments, named by their first record's key
//! quarantine/{segment}.{ms}     segments that failed their checksums, set aside
//! ```
//!
//! Why a segment log rather than SQLite: the outbox is a FIFO with one reader, appends at the
//! tail and deletes whole files at the head; a log does exactly that with two syscalls per
//! append, keeps the binary small (bundled SQLite is ~1 MB of the ≤ 6 MB budget), and its crash
//! behaviour fits in this file: a record is `[len u32 LE][crc32 u32 LE][frame]`, with the CRC
//! over the length and the frame; a record cut short at the end of the newest segment is a torn
//! append (never confirmed) and is cut off; a bad record anywhere else is corruption, and the
//! segment is copied to `quarantine/` and rewritten with its good records. The frame is the
//! wire frame (`renkei_shared::encode`), so a record is sent as it was stored.
//!
//! Every record's key is its `(boot, seq)`, handed out under the lock from the `seq` file, so
//! keys grow with the order of appends across the CLI and the daemon, and "delivered" is one
//! cursor (`acked`). The `seq` file is written without fsync: the page cache survives `kill -9`,
//! and after a power cut the next writer starts a new boot (the daemon at every start, the CLI
//! whenever no daemon holds `daemon.lock`), so a lost update can never hand out a key twice.
//!
//! Bounded by bytes: when an append would pass the budget, unsent heartbeats (status records)
//! are evicted oldest first; if that is not enough, a heartbeat is dropped and counted, and a
//! staff report is refused with [`OutboxError::Full`] and the alarm is raised — a confirmed
//! report is never dropped to make room.
//!
//! Bounded by free disk too: an append that would leave less than the disk reserve free on the
//! outbox's filesystem (statvfs) is refused with [`OutboxError::DiskLow`] before anything is
//! written, so the cursor, the alarm and the system keep room to work; a report refused this way
//! raises the alarm like a full outbox.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use renkei_shared::{BodyKind, CodecError, Envelope};
use tracing::{error, warn};

use crate::keys::{BOOT_ID_FILE, BootIdError, Key, allocate, next_boot_id};

mod budget;
mod segment;

use segment::{RECORD_HEADER, frame_record, parse_segment, sync_dir, write_atomic};

/// A segment is closed once it reaches this size: small enough that reading one to find the
/// next records, or rewriting one, is cheap on an SD card.
pub const SEGMENT_BYTES: u64 = 64 * 1024;
/// Default byte budget of the outbox: about a month of 30 s heartbeats offline.
pub const DEFAULT_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// Default free space kept on the outbox's disk: room for the cursor, the alarm, a segment
/// rewrite and whatever else the box must write to keep going.
pub const DEFAULT_DISK_RESERVE: u64 = 1024 * 1024;
const QUARANTINE_DIR: &str = "quarantine";

/// One stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub key: Key,
    pub kind: BodyKind,
    /// The wire frame, as `renkei_shared::encode` made it.
    pub frame: Vec<u8>,
}

impl Record {
    /// Staff reports are never dropped; heartbeats may be.
    pub fn is_heartbeat(&self) -> bool {
        self.kind == BodyKind::Status
    }
}

/// How hard an append works to survive a power cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsync before returning: staff reports, which someone is told are saved.
    Sync,
    /// Left to the page cache: heartbeats, which the next one replaces anyway.
    Lazy,
}

/// Why the outbox could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// A file of the outbox could not be read, written or synced.
    #[error("outbox {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// The disk (or its quota) is full: nothing more can be stored until space is freed.
    #[error("the disk holding {} is full: free some space (the report was NOT saved)", path.display())]
    DiskFull { path: PathBuf },
    /// The disk holding the outbox has less free space than the configured reserve.
    #[error(
        "the disk holding {} is nearly full ({available} bytes free, {reserve} kept in reserve): \
         free some space (the report was NOT saved)", path.display()
    )]
    DiskLow {
        path: PathBuf,
        available: u64,
        reserve: u64,
    },
    /// The outbox holds its whole byte budget of undelivered reports.
    #[error(
        "the outbox is full ({used} of {max} bytes, {depth} reports waiting for the link): \
         the report was NOT saved; nothing already saved was dropped"
    )]
    Full { used: u64, max: u64, depth: u64 },
    /// The message could not be encoded (a value beyond the protocol's limits).
    #[error("the report is not valid: {0}")]
    Invalid(#[from] CodecError),
    /// The boot id could not be raised.
    #[error(transparent)]
    BootId(#[from] BootIdError),
}

impl OutboxError {
    fn io(path: &Path, source: io::Error) -> OutboxError {
        // ENOSPC and EDQUOT: say what it is rather than an errno.
        if matches!(source.raw_os_error(), Some(28) | Some(122))
            || source.kind() == io::ErrorKind::StorageFull
        {
            OutboxError::DiskFull {
                path: path.to_owned(),
            }
        } else {
            OutboxError::Io {
                path: path.to_owned(),
                source,
            }
        }
    }

    /// Whether the store refused for lack of room (the alarm case).
    pub fn is_full(&self) -> bool {
        matches!(
            self,
            OutboxError::Full { .. } | OutboxError::DiskFull { .. } | OutboxError::DiskLow { .. }
        )
    }
}

type Result<T, E = OutboxError> = std::result::Result<T, E>;

/// The result of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub key: Key,
    /// Records waiting for delivery, this one included.
    pub depth: u64,
    /// Heartbeats evicted to make room for it.
    pub evicted: u64,
}

/// A summary of what the outbox holds, for `status`, heartbeats and logs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Records not yet acknowledged by the broker.
    pub depth: u64,
    /// Of which staff reports (not heartbeats).
    pub reports: u64,
    /// Bytes on disk in segments.
    pub bytes: u64,
    pub max_bytes: u64,
    /// The delivery cursor.
    pub acked: Key,
    /// Segments set aside as corrupt.
    pub quarantined: u64,
    /// Why reports are being refused, while they are.
    pub alarm: Option<String>,
    /// Free bytes on the outbox's disk, where statvfs could tell.
    pub disk_free: Option<u64>,
    /// Free bytes the outbox never uses.
    pub disk_reserve: u64,
}

impl Stats {
    /// Whether the site should be flagged to HQ: reports were refused, or the disk is below
    /// its reserve so the next one would be.
    pub fn alarming(&self) -> bool {
        self.alarm.is_some() || self.disk_free.is_some_and(|free| free < self.disk_reserve)
    }
}

/// What one segment holds, as its last scan found it.
#[derive(Debug, Clone, Copy)]
struct Summary {
    len: u64,
    first: Key,
    last: Key,
    count: u64,
    heartbeats: u64,
}

struct Inner {
    lock_file: File,
    /// Summaries by segment name, valid while the file keeps its length.
    summaries: HashMap<String, Summary>,
}

/// The outbox of one site, shared by the daemon's tasks (each operation takes the lock).
pub struct Outbox {
    state_dir: PathBuf,
    dir: PathBuf,
    max_bytes: u64,
    /// Free space left on the disk, never used (see the module notes).
    disk_reserve: u64,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("dir", &self.dir)
            .field("max_bytes", &self.max_bytes)
            .finish_non_exhaustive()
    }
}

/// Held while the daemon runs: `renkei-agent report` sees it and leaves the boot id alone.
#[derive(Debug)]
pub struct DaemonClaim {
    _file: File,
}

impl Outbox {
    /// Opens (creating) the outbox of the site whose state lives in `state_dir`, checking every
    /// segment: torn tails are cut, corrupt segments quarantined.
    pub fn open(state_dir: &Path, max_bytes: u64) -> Result<Outbox> {
        let dir = state_dir.join("outbox");
        fs::create_dir_all(&dir).map_err(|e| OutboxError::io(&dir, e))?;
        let lock_path = dir.join("lock");
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| OutboxError::io(&lock_path, e))?;
        let outbox = Outbox {
            state_dir: state_dir.to_owned(),
            dir,
            max_bytes,
            disk_reserve: DEFAULT_DISK_RESERVE,
            inner: Mutex::new(Inner {
                lock_file,
                summaries: HashMap::new(),
            }),
        };
        {
            let mut locked = outbox.lock()?;
            for name in locked.segment_names()? {
                locked.summary(&name, true)?;
            }
        }
        Ok(outbox)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// This outbox, keeping `bytes` free on its disk (0: up to the last byte).
    pub fn with_disk_reserve(mut self, bytes: u64) -> Outbox {
        self.disk_reserve = bytes;
        self
    }

    /// Takes the outbox for one operation: the in-process mutex, then the file lock; the
    /// newest segment's tail is checked, since a `report` killed mid-append leaves it torn.
    pub fn lock(&self) -> Result<Locked<'_>> {
        // A poisoned mutex only means another task panicked mid-operation; the files are
        // checked again below, so carry on.
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.dir.join("lock");
        inner
            .lock_file
            .lock()
            .map_err(|e| OutboxError::io(&path, e))?;
        let mut locked = Locked {
            outbox: self,
            inner,
        };
        if let Some(newest) = locked.segment_names()?.pop() {
            locked.summary(&newest, true)?;
        }
        Ok(locked)
    }

    /// Marks this process as the site's daemon for as long as the claim is held.
    pub fn claim_daemon(&self) -> Result<Option<DaemonClaim>> {
        let path = self.dir.join("daemon.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| OutboxError::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(DaemonClaim { _file: file })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(OutboxError::io(&path, e)),
        }
    }

    /// Whether a daemon holds its claim on this outbox now.
    pub fn daemon_running(&self) -> Result<bool> {
        let path = self.dir.join("daemon.lock");
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(OutboxError::io(&path, e)),
        };
        match file.try_lock_shared() {
            Ok(()) => Ok(false),
            Err(fs::TryLockError::WouldBlock) => Ok(true),
            Err(fs::TryLockError::Error(e)) => Err(OutboxError::io(&path, e)),
        }
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let _ = self.inner.lock_file.unlock();
    }
}

/// The outbox while this process holds its lock.
pub struct Locked<'a> {
    outbox: &'a Outbox,
    inner: MutexGuard<'a, Inner>,
}

impl std::fmt::Debug for Locked<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Locked")
            .field("dir", &self.outbox.dir)
            .finish_non_exhaustive()
    }
}

/// Newest shelter and supplies reports, re-sent after a birth so HQ can redraw the site.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Latest {
    pub shelter: Option<Envelope>,
    pub supplies: Option<Envelope>,
}

impl Locked<'_> {
    fn path(&self, name: &str) -> PathBuf {
        self.outbox.dir.join(name)
    }

    /// Segment file names, oldest first.
    fn segment_names(&self) -> Result<Vec<String>> {
        let dir = &self.outbox.dir;
        let mut names = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| OutboxError::io(dir, e))? {
            let entry = entry.map_err(|e| OutboxError::io(dir, e))?;
            if let Some(name) = entry.file_name().to_str()
                && segment::key_of_segment(name).is_some()
            {
                names.push(name.to_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Starts a new boot: the daemon at start-up, `report` when no daemon runs.
    pub fn new_boot(&mut self) -> Result<u32> {
        let boot = next_boot_id(&self.outbox.state_dir)?;
        self.write_key("seq", Key { boot, seq: 0 }, false)?;
        Ok(boot)
    }

    fn current_boot(&mut self) -> Result<u32> {
        let path = self.outbox.state_dir.join(BOOT_ID_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => match text.trim().parse::<u32>() {
                Ok(boot) => Ok(boot),
                Err(_) => Ok(next_boot_id(&self.outbox.state_dir)?),
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => self.new_boot(),
            Err(e) => Err(OutboxError::io(&path, e)),
        }
    }

    fn read_key(&self, name: &str) -> Result<Option<Key>> {
        let path = self.path(name);
        match fs::read_to_string(&path) {
            Ok(text) => Ok(Key::parse(&text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(OutboxError::io(&path, e)),
        }
    }

    fn write_key(&self, name: &str, key: Key, durable: bool) -> Result<()> {
        let path = self.path(name);
        if durable {
            write_atomic(&path, key.to_text().as_bytes())
        } else {
            fs::write(&path, key.to_text()).map_err(|e| OutboxError::io(&path, e))
        }
    }

    /// Hands out `count` consecutive sequence numbers of the current boot; returns the first.
    pub fn take_seqs(&mut self, count: u64) -> Result<Key> {
        let boot = self.current_boot()?;
        let acked = self.acked()?;
        let handed_out = self.read_key("seq")?;
        let stored = self.inner.summaries.values().map(|s| s.last);
        let (first, last) = allocate(boot, count, handed_out, stored.chain([acked]));
        self.write_key("seq", last, false)?;
        Ok(first)
    }

    /// The delivery cursor: every record with a key up to it reached the broker.
    pub fn acked(&self) -> Result<Key> {
        Ok(self.read_key("acked")?.unwrap_or_default())
    }

    /// Scans one segment (or uses its summary if the file did not change), repairing it.
    fn summary(&mut self, name: &str, repair: bool) -> Result<Option<Summary>> {
        let path = self.path(name);
        let len = match fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.inner.summaries.remove(name);
                return Ok(None);
            }
            Err(e) => return Err(OutboxError::io(&path, e)),
        };
        if let Some(s) = self.inner.summaries.get(name)
            && s.len == len
        {
            return Ok(Some(*s));
        }
        let (records, _) = self.scan(name, repair)?;
        Ok(self.summarise(name, &records))
    }

    fn summarise(&mut self, name: &str, records: &[Record]) -> Option<Summary> {
        let (Some(first), Some(last)) = (records.first(), records.last()) else {
            self.inner.summaries.remove(name);
            return None;
        };
        let len = records
            .iter()
            .map(|r| (RECORD_HEADER + r.frame.len()) as u64)
            .sum();
        let s = Summary {
            len,
            first: first.key,
            last: last.key,
            count: records.len() as u64,
            heartbeats: records.iter().filter(|r| r.is_heartbeat()).count() as u64,
        };
        self.inner.summaries.insert(name.to_owned(), s);
        Some(s)
    }

    /// Reads a segment's good records. With `repair`, a torn tail of the newest segment is cut
    /// and any other damage sends the file to quarantine and leaves its good records in place.
    /// Returns the records and whether the segment was damaged.
    fn scan(&mut self, name: &str, repair: bool) -> Result<(Vec<Record>, bool)> {
        let path = self.path(name);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Vec::new(), false)),
            Err(e) => return Err(OutboxError::io(&path, e)),
        };
        let parsed = parse_segment(&bytes);
        let damaged = parsed.bad_at.is_some() || parsed.rejected > 0;
        if !repair || !damaged {
            return Ok((parsed.records, damaged));
        }
        let is_newest = self.segment_names()?.last().map(String::as_str) == Some(name);
        if is_newest && parsed.torn_tail && parsed.rejected == 0 {
            let good = parsed.good_len as u64;
            warn!(
                segment = name,
                cut_bytes = bytes.len() as u64 - good,
                "outbox: torn tail after a crash cut off"
            );
            let file = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| OutboxError::io(&path, e))?;
            file.set_len(good).map_err(|e| OutboxError::io(&path, e))?;
            file.sync_all().map_err(|e| OutboxError::io(&path, e))?;
        } else {
            let quarantine = self.outbox.dir.join(QUARANTINE_DIR);
            fs::create_dir_all(&quarantine).map_err(|e| OutboxError::io(&quarantine, e))?;
            let target = quarantine.join(format!("{name}.{}", renkei_shared::Timestamp::now().0));
            fs::write(&target, &bytes).map_err(|e| OutboxError::io(&target, e))?;
            File::open(&target)
                .and_then(|f| f.sync_all())
                .map_err(|e| OutboxError::io(&target, e))?;
            error!(
                segment = name,
                quarantined_to = %target.display(),
                kept = parsed.records.len(),
                rejected = parsed.rejected,
                "outbox: corrupt segment set aside; its good records stay queued"
            );
            self.rewrite(name, &parsed.records)?;
        }
        Ok((parsed.records, true))
    }

    /// Replaces a segment with `records` (or removes it when empty), crash-safely.
    fn rewrite(&mut self, name: &str, records: &[Record]) -> Result<()> {
        let path = self.path(name);
        if records.is_empty() {
            fs::remove_file(&path).map_err(|e| OutboxError::io(&path, e))?;
            self.inner.summaries.remove(name);
        } else {
            let mut bytes = Vec::new();
            for r in records {
                frame_record(&mut bytes, &r.frame);
            }
            write_atomic(&path, &bytes)?;
            self.summarise(name, records);
        }
        sync_dir(&self.outbox.dir)
    }

    /// Every segment's summary, oldest first.
    fn summaries(&mut self) -> Result<Vec<(String, Summary)>> {
        let mut out = Vec::new();
        for name in self.segment_names()? {
            if let Some(s) = self.summary(&name, true)? {
                out.push((name, s));
            }
        }
        Ok(out)
    }

    /// Appends the message `make` builds with the next key. Told "saved" only with `Ok`.
    pub fn append(
        &mut self,
        make: impl FnOnce(Key) -> Envelope,
        durability: Durability,
    ) -> Result<Appended> {
        let key = self.take_seqs(1)?;
        let env = make(key);
        let frame = renkei_shared::encode(&env)?;
        let kind = env.body.kind();
        let mut bytes = Vec::with_capacity(RECORD_HEADER + frame.len());
        frame_record(&mut bytes, &frame);

        let need = bytes.len() as u64;
        let mut evicted = 0;
        let mut used = self.bytes()?;
        if used + need > self.outbox.max_bytes {
            evicted = self.evict_heartbeats(used + need - self.outbox.max_bytes)?;
            used = self.bytes()?;
        }
        if used + need > self.outbox.max_bytes {
            let depth = self.stats()?.depth;
            let err = OutboxError::Full {
                used,
                max: self.outbox.max_bytes,
                depth,
            };
            if kind != BodyKind::Status {
                self.raise_alarm(&err.to_string());
            }
            return Err(err);
        }
        if let Err(e) = self.outbox.check_disk(need) {
            if kind != BodyKind::Status {
                self.raise_alarm(&e.to_string());
            }
            return Err(e);
        }
        match self.write_record(key, &bytes, durability) {
            Ok(()) => {}
            Err(e) => {
                if e.is_full() && kind != BodyKind::Status {
                    self.raise_alarm(&e.to_string());
                }
                return Err(e);
            }
        }
        // The record is saved from here on: a failure below must not say otherwise.
        if matches!(kind, BodyKind::Shelter | BodyKind::Supplies)
            && let Err(e) = self.remember_latest(&env, durability)
        {
            error!(error = %e, "the latest-state copy was not updated; the report itself is saved");
        }
        if kind != BodyKind::Status {
            self.clear_alarm();
        }
        let depth = self.stats().map_or(0, |s| s.depth);
        Ok(Appended {
            key,
            depth,
            evicted,
        })
    }

    fn write_record(&mut self, key: Key, bytes: &[u8], durability: Durability) -> Result<()> {
        let names = self.segment_names()?;
        let (name, created) = match names.last() {
            Some(n)
                if self.summary(n, false)?.map_or(0, |s| s.len) + bytes.len() as u64
                    <= SEGMENT_BYTES =>
            {
                (n.clone(), false)
            }
            _ => (segment::segment_name(key), true),
        };
        let path = self.path(&name);
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| OutboxError::io(&path, e))?;
        let before = file
            .metadata()
            .map_err(|e| OutboxError::io(&path, e))?
            .len();
        let written = file.write_all(bytes).and_then(|()| {
            if durability == Durability::Sync {
                file.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            // Leave no half record behind (the next lock would cut it anyway).
            let _ = file.set_len(before);
            if created && before == 0 {
                let _ = fs::remove_file(&path);
            }
            return Err(OutboxError::io(&path, e));
        }
        if created && durability == Durability::Sync {
            sync_dir(&self.outbox.dir)?;
        }
        // Refresh the summary cheaply: this record was appended to a known segment.
        let kind_is_status = {
            let (_, f) = bytes.split_at(RECORD_HEADER);
            renkei_shared::decode(f).map(|e| e.body.kind() == BodyKind::Status)
        };
        let prev = self.inner.summaries.get(&name).copied();
        let s = Summary {
            len: before + bytes.len() as u64,
            first: prev.map_or(key, |p| p.first),
            last: key,
            count: prev.map_or(0, |p| p.count) + 1,
            heartbeats: prev.map_or(0, |p| p.heartbeats) + u64::from(kind_is_status == Ok(true)),
        };
        if prev.is_some_and(|p| p.len == before) || before == 0 {
            self.inner.summaries.insert(name, s);
        } else {
            self.inner.summaries.remove(&name);
        }
        Ok(())
    }

    /// Up to `limit` records with keys after `after`, in order.
    pub fn read_after(&mut self, after: Key, limit: usize) -> Result<Vec<Record>> {
        let mut out = Vec::new();
        for (name, s) in self.summaries()? {
            if s.last <= after {
                continue;
            }
            let (records, _) = self.scan(&name, false)?;
            out.extend(records.into_iter().filter(|r| r.key > after));
            if out.len() >= limit {
                out.truncate(limit);
                break;
            }
        }
        Ok(out)
    }

    /// The newest record's key, if any is stored.
    pub fn last_key(&mut self) -> Result<Option<Key>> {
        Ok(self.summaries()?.last().map(|(_, s)| s.last))
    }

    /// Moves the delivery cursor to `key` and deletes segments that hold nothing after it.
    pub fn set_acked(&mut self, key: Key) -> Result<()> {
        if key <= self.acked()? {
            return Ok(());
        }
        // Delivered segments go first, so that a full disk gets room for the cursor file. A
        // crash before the cursor is written re-sends the straddling records: duplicates with
        // the same (boot, seq), which HQ drops; nothing undelivered is ever removed.
        let mut removed = false;
        for (name, s) in self.summaries()? {
            if s.last <= key {
                let path = self.path(&name);
                fs::remove_file(&path).map_err(|e| OutboxError::io(&path, e))?;
                self.inner.summaries.remove(&name);
                removed = true;
            }
        }
        if removed {
            sync_dir(&self.outbox.dir)?;
        }
        self.write_key("acked", key, true)?;
        // A quarter of the budget free again, and the disk above its reserve: reports are
        // welcome.
        if self.alarm().is_some()
            && self.bytes()? <= self.outbox.max_bytes / 4 * 3
            && self.outbox.check_disk(0).is_ok()
        {
            self.clear_alarm();
        }
        Ok(())
    }

    /// What the outbox holds now.
    pub fn stats(&mut self) -> Result<Stats> {
        let acked = self.acked()?;
        let mut stats = Stats {
            acked,
            max_bytes: self.outbox.max_bytes,
            alarm: self.alarm(),
            disk_free: self.outbox.disk_free().ok(),
            disk_reserve: self.outbox.disk_reserve,
            ..Stats::default()
        };
        for (name, s) in self.summaries()? {
            stats.bytes += s.len;
            if s.last <= acked {
                continue;
            }
            if s.first > acked {
                stats.depth += s.count;
                stats.reports += s.count - s.heartbeats;
            } else {
                let (records, _) = self.scan(&name, false)?;
                for r in records.iter().filter(|r| r.key > acked) {
                    stats.depth += 1;
                    stats.reports += u64::from(!r.is_heartbeat());
                }
            }
        }
        let quarantine = self.outbox.dir.join(QUARANTINE_DIR);
        stats.quarantined = fs::read_dir(&quarantine).map_or(0, |d| d.count() as u64);
        Ok(stats)
    }

    /// The newest shelter and supplies reports ever stored.
    pub fn latest(&self) -> Latest {
        let mut latest = Latest::default();
        let Ok(bytes) = fs::read(self.path("latest")) else {
            return latest;
        };
        for r in parse_segment(&bytes).records {
            if let Ok(env) = renkei_shared::decode(&r.frame) {
                match r.kind {
                    BodyKind::Shelter => latest.shelter = Some(env),
                    BodyKind::Supplies => latest.supplies = Some(env),
                    _ => {}
                }
            }
        }
        latest
    }

    fn remember_latest(&mut self, env: &Envelope, durability: Durability) -> Result<()> {
        let mut latest = self.latest();
        match env.body.kind() {
            BodyKind::Shelter => latest.shelter = Some(env.clone()),
            BodyKind::Supplies => latest.supplies = Some(env.clone()),
            _ => return Ok(()),
        }
        let mut bytes = Vec::new();
        for e in [&latest.shelter, &latest.supplies].into_iter().flatten() {
            frame_record(&mut bytes, &renkei_shared::encode(e)?);
        }
        let path = self.path("latest");
        if durability == Durability::Sync {
            write_atomic(&path, &bytes)
        } else {
            fs::write(&path, &bytes).map_err(|e| OutboxError::io(&path, e))
        }
    }
}

#[cfg(test)]
mod tests {
    use renkei_shared::{Body, Header, Mode, Origin, sample};

    use super::*;

    fn stamp(key: Key, body: Body) -> Envelope {
        Envelope {
            header: Header {
                origin: Origin::Site(sample::site()),
                boot: key.boot,
                seq: key.seq,
                sent_at: sample::SENT_AT,
                mode: Mode::Exercise,
                historical: false,
            },
            body,
        }
    }

    fn heartbeat() -> Body {
        sample::status().body
    }

    fn shelter() -> Body {
        sample::shelter().body
    }

    fn append(outbox: &Outbox, body: Body) -> Result<Appended> {
        outbox.lock()?.append(|k| stamp(k, body), Durability::Sync)
    }

    fn all(outbox: &Outbox) -> Vec<Record> {
        let mut l = outbox.lock().unwrap();
        let acked = l.acked().unwrap();
        l.read_after(acked, usize::MAX).unwrap()
    }

    fn segments(outbox: &Outbox) -> Vec<PathBuf> {
        let l = outbox.lock().unwrap();
        l.segment_names()
            .unwrap()
            .into_iter()
            .map(|n| outbox.dir().join(n))
            .collect()
    }

    #[test]
    fn records_come_back_in_order_and_go_after_the_ack() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        let a = append(&outbox, shelter()).unwrap();
        let b = append(&outbox, heartbeat()).unwrap();
        let c = append(&outbox, shelter()).unwrap();
        assert_eq!(a.key, Key { boot: 1, seq: 1 });
        assert!(a.key < b.key && b.key < c.key);
        assert_eq!(c.depth, 3);
        let records = all(&outbox);
        assert_eq!(
            records.iter().map(|r| r.key).collect::<Vec<_>>(),
            [a.key, b.key, c.key]
        );
        let env = renkei_shared::decode(&records[0].frame).unwrap();
        assert_eq!(env.body, shelter());

        outbox.lock().unwrap().set_acked(b.key).unwrap();
        let left = all(&outbox);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].key, c.key);
        let stats = outbox.lock().unwrap().stats().unwrap();
        assert_eq!((stats.depth, stats.reports), (1, 1));

        // Reopening (a restart) keeps the cursor and the queue.
        drop(outbox);
        let outbox = Outbox::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        assert_eq!(all(&outbox)[0].key, c.key);
        outbox.lock().unwrap().set_acked(c.key).unwrap();
        assert!(segments(&outbox).is_empty());
        assert_eq!(outbox.lock().unwrap().stats().unwrap().depth, 0);
        // Keys keep growing after everything is delivered and deleted.
        assert!(append(&outbox, heartbeat()).unwrap().key > c.key);
    }

    #[test]
    fn a_new_boot_restarts_seq_and_outranks_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        let a = append(&outbox, shelter()).unwrap().key;
        let boot = outbox.lock().unwrap().new_boot().unwrap();
        let b = append(&outbox, shelter()).unwrap().key;
        assert_eq!(b, Key { boot, seq: 1 });
        assert!(b > a);
        let reserved = outbox.lock().unwrap().take_seqs(2).unwrap();
        assert_eq!(reserved.seq, 2);
        assert_eq!(append(&outbox, shelter()).unwrap().key.seq, 4);
    }

    #[test]
    fn a_torn_tail_is_cut_and_appends_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        append(&outbox, shelter()).unwrap();
        let seg = segments(&outbox)[0].clone();
        let good = fs::metadata(&seg).unwrap().len();
        // Half a record, as a kill -9 in the middle of a write leaves it.
        let mut half = Vec::new();
        frame_record(
            &mut half,
            &renkei_shared::encode(&sample::shelter()).unwrap(),
        );
        half.truncate(half.len() / 2);
        OpenOptions::new()
            .append(true)
            .open(&seg)
            .unwrap()
            .write_all(&half)
            .unwrap();
        let next = append(&outbox, heartbeat()).unwrap();
        assert_eq!(next.depth, 2);
        assert_eq!(all(&outbox).len(), 2);
        assert!(fs::metadata(&seg).unwrap().len() > good);
        assert_eq!(outbox.lock().unwrap().stats().unwrap().quarantined, 0);
    }

    #[test]
    fn a_corrupt_segment_is_quarantined_and_its_good_records_stay() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        let keys: Vec<Key> = (0..3)
            .map(|_| append(&outbox, shelter()).unwrap().key)
            .collect();
        let seg = segments(&outbox)[0].clone();
        let mut bytes = fs::read(&seg).unwrap();
        let one = bytes.len() / 3;
        // A flipped byte in the middle record's frame.
        bytes[one + RECORD_HEADER + 5] ^= 0xff;
        fs::write(&seg, &bytes).unwrap();
        drop(outbox);

        let outbox = Outbox::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        let left: Vec<Key> = all(&outbox).iter().map(|r| r.key).collect();
        assert_eq!(left, [keys[0]]);
        let stats = outbox.lock().unwrap().stats().unwrap();
        assert_eq!(stats.quarantined, 1);
        let q: Vec<_> = fs::read_dir(outbox.dir().join(QUARANTINE_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(q[0].starts_with(&segment::segment_name(keys[0])), "{q:?}");
        // And the outbox carries on.
        assert!(append(&outbox, shelter()).unwrap().key > keys[2]);
    }

    #[test]
    fn garbage_in_the_outbox_directory_does_not_stop_it() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        fs::write(
            outbox
                .dir()
                .join(segment::segment_name(Key { boot: 0, seq: 1 })),
            b"not a segment at all, but long enough",
        )
        .unwrap();
        drop(outbox);
        let outbox = Outbox::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        append(&outbox, shelter()).unwrap();
        assert_eq!(all(&outbox).len(), 1);
        assert_eq!(outbox.lock().unwrap().stats().unwrap().quarantined, 1);
    }

    #[test]
    fn when_full_old_heartbeats_go_first_then_reports_are_refused_with_an_alarm() {
        let dir = tempfile::tempdir().unwrap();
        let max = 4 * 1024;
        let outbox = Outbox::open(dir.path(), max).unwrap();
        let mut reports = Vec::new();
        for i in 0..200 {
            let body = if i % 4 == 0 { shelter() } else { heartbeat() };
            let is_report = i % 4 == 0;
            match append(&outbox, body) {
                Ok(a) if is_report => reports.push(a.key),
                Ok(_) => {}
                Err(e) => {
                    assert!(matches!(e, OutboxError::Full { .. }), "{e}");
                    if is_report {
                        break;
                    }
                }
            }
        }
        let stats = outbox.lock().unwrap().stats().unwrap();
        assert!(stats.bytes <= max, "{stats:?}");
        // Every confirmed report is still there; the heartbeats made way for them.
        let kept: Vec<Key> = all(&outbox)
            .iter()
            .filter(|r| !r.is_heartbeat())
            .map(|r| r.key)
            .collect();
        assert_eq!(kept, reports);
        assert_eq!(stats.reports, reports.len() as u64);
        let alarm = stats.alarm.expect("an alarm is raised");
        assert!(alarm.contains("NOT saved"), "{alarm}");
        let err = append(&outbox, shelter()).unwrap_err().to_string();
        assert!(err.contains("outbox is full"), "{err}");

        // Delivery makes room and clears the alarm.
        let last = *reports.last().unwrap();
        outbox.lock().unwrap().set_acked(last).unwrap();
        let stats = outbox.lock().unwrap().stats().unwrap();
        assert!(stats.alarm.is_none());
        append(&outbox, shelter()).unwrap();
    }

    /// A tmpfs of a given size mounted on a temporary directory, unmounted on drop: a real
    /// small disk for the full-disk tests (mounting needs root).
    struct SmallDisk {
        dir: tempfile::TempDir,
    }

    impl SmallDisk {
        fn mount(size: &str) -> Option<SmallDisk> {
            let dir = tempfile::tempdir().ok()?;
            let mounted = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir.path())
                .status()
                .is_ok_and(|s| s.success());
            mounted.then_some(SmallDisk { dir })
        }
    }

    impl Drop for SmallDisk {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg(self.dir.path())
                .status();
        }
    }

    /// A real full disk: a 64 KiB tmpfs (needs root; skipped otherwise).
    #[test]
    fn a_full_disk_is_a_clear_error_and_confirmed_reports_survive() {
        let Some(disk) = SmallDisk::mount("64k") else {
            eprintln!("SKIPPED: cannot mount a tmpfs here (not root?)");
            return;
        };
        let dir = &disk.dir;
        // No reserve: this is the last line of defence, a write that meets ENOSPC.
        let outbox = Outbox::open(dir.path(), DEFAULT_MAX_BYTES)
            .unwrap()
            .with_disk_reserve(0);
        let mut confirmed = Vec::new();
        let err = loop {
            match append(&outbox, shelter()) {
                Ok(a) => confirmed.push(a.key),
                Err(e) => break e,
            }
            assert!(confirmed.len() < 10_000, "the disk never filled");
        };
        assert!(matches!(err, OutboxError::DiskFull { .. }), "{err}");
        assert!(err.to_string().contains("disk"), "{err}");
        let stored: Vec<Key> = all(&outbox).iter().map(|r| r.key).collect();
        assert_eq!(stored, confirmed);
        // Delivery frees the space (the cursor file fits once the segments are gone), and
        // appends work again.
        let last = *confirmed.last().unwrap();
        outbox.lock().unwrap().set_acked(last).unwrap();
        append(&outbox, shelter()).unwrap();
    }

    #[test]
    fn an_append_that_would_eat_into_the_disk_reserve_is_refused_with_the_alarm() {
        let dir = tempfile::tempdir().unwrap();
        let free = Outbox::open(dir.path(), DEFAULT_MAX_BYTES)
            .unwrap()
            .disk_free()
            .unwrap();
        let outbox = Outbox::open(dir.path(), DEFAULT_MAX_BYTES)
            .unwrap()
            .with_disk_reserve(free.saturating_mul(2));
        let err = append(&outbox, shelter()).unwrap_err();
        assert!(matches!(err, OutboxError::DiskLow { .. }), "{err}");
        assert!(err.is_full());
        let text = err.to_string();
        assert!(
            text.contains("nearly full") && text.contains("NOT saved"),
            "{text}"
        );
        let err = append(&outbox, heartbeat()).unwrap_err();
        assert!(matches!(err, OutboxError::DiskLow { .. }), "{err}");
        assert!(segments(&outbox).is_empty(), "nothing was written");
        let stats = outbox.lock().unwrap().stats().unwrap();
        assert!(stats.alarm.is_some() && stats.alarming(), "{stats:?}");

        // With room again, a report is accepted and the alarm clears.
        let outbox = Outbox::open(dir.path(), DEFAULT_MAX_BYTES)
            .unwrap()
            .with_disk_reserve(0);
        append(&outbox, shelter()).unwrap();
        let stats = outbox.lock().unwrap().stats().unwrap();
        assert!(!stats.alarming(), "{stats:?}");
    }

    /// A real small disk: a 256 KiB tmpfs with a 128 KiB reserve (needs root; skipped
    /// otherwise). The reserve refuses before the disk is full, so the cursor still fits.
    #[test]
    fn a_small_disk_refuses_reports_at_its_reserve_and_delivery_clears_the_alarm() {
        let Some(disk) = SmallDisk::mount("256k") else {
            eprintln!("SKIPPED: cannot mount a tmpfs here (not root?)");
            return;
        };
        let dir = &disk.dir;
        let reserve = 128 * 1024;
        let outbox = Outbox::open(dir.path(), DEFAULT_MAX_BYTES)
            .unwrap()
            .with_disk_reserve(reserve);
        let mut confirmed = Vec::new();
        let err = loop {
            match append(&outbox, shelter()) {
                Ok(a) => confirmed.push(a.key),
                Err(e) => break e,
            }
            assert!(confirmed.len() < 10_000, "the reserve never bit");
        };
        assert!(matches!(err, OutboxError::DiskLow { .. }), "{err}");
        assert!(!confirmed.is_empty());
        let stats = outbox.lock().unwrap().stats().unwrap();
        assert!(stats.alarm.is_some(), "{stats:?}");
        assert!(stats.disk_free.unwrap() >= reserve / 2, "{stats:?}");
        let stored: Vec<Key> = all(&outbox).iter().map(|r| r.key).collect();
        assert_eq!(stored, confirmed);
        // Delivery frees the segments and the alarm clears with it.
        let last = *confirmed.last().unwrap();
        outbox.lock().unwrap().set_acked(last).unwrap();
        let stats = outbox.lock().unwrap().stats().unwrap();
        assert!(!stats.alarming(), "{stats:?}");
        append(&outbox, shelter()).unwrap();
    }

    #[test]
    fn the_latest_shelter_and_supplies_are_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        assert_eq!(outbox.lock().unwrap().latest(), Latest::default());
        append(&outbox, shelter()).unwrap();
        let second = append(&outbox, shelter()).unwrap().key;
        append(&outbox, sample::supplies().body).unwrap();
        append(&outbox, heartbeat()).unwrap();
        let latest = outbox.lock().unwrap().latest();
        assert_eq!(Key::of(&latest.shelter.unwrap()), second);
        assert!(latest.supplies.is_some());
    }

    #[test]
    fn the_daemon_claim_is_seen_by_others() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        assert!(!outbox.daemon_running().unwrap());
        let claim = outbox.claim_daemon().unwrap().expect("first claim");
        let other = Outbox::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        assert!(other.daemon_running().unwrap());
        assert!(other.claim_daemon().unwrap().is_none());
        drop(claim);
        assert!(!other.daemon_running().unwrap());
    }

    #[test]
    fn invalid_reports_are_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::open(dir.path(), DEFAULT_MAX_BYTES).unwrap();
        let mut request = sample::request().body;
        if let Body::Request(r) = &mut request {
            r.note = "x".repeat(10_000);
        }
        let err = append(&outbox, request).unwrap_err();
        assert!(matches!(err, OutboxError::Invalid(_)), "{err}");
        assert!(segments(&outbox).is_empty());
    }
}
