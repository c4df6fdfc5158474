//! The outbox's files: a record is `[len u32 LE][crc32 u32 LE][frame]`, with the CRC over the
//! length and the frame; a segment is records back to back, named by its first record's key;
//! small state files are replaced whole (written aside, synced, renamed, the directory synced).

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

use super::{OutboxError, Record, Result};
use crate::keys::Key;

/// Bytes before each frame: length and CRC.
pub(super) const RECORD_HEADER: usize = 8;
/// Largest frame a record may claim; anything longer is corruption, not a message.
pub(super) const MAX_RECORD: usize = renkei_shared::codec::MAX_FRAME;
pub(super) const SEGMENT_EXT: &str = "seg";

/// Segment files are named by the key of their first record.
pub(super) fn segment_name(key: Key) -> String {
    format!("{:010}-{:020}.{SEGMENT_EXT}", key.boot, key.seq)
}

/// The key of a segment file's first record, from its name.
pub(super) fn key_of_segment(name: &str) -> Option<Key> {
    let stem = name.strip_suffix(&format!(".{SEGMENT_EXT}"))?;
    let (boot, seq) = stem.split_once('-')?;
    Some(Key {
        boot: boot.parse().ok()?,
        seq: seq.parse().ok()?,
    })
}

/// Appends `[len][crc][frame]` to `out`.
pub(super) fn frame_record(out: &mut Vec<u8>, frame: &[u8]) {
    let len = u32::try_from(frame.len()).unwrap_or(u32::MAX).to_le_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len);
    crc.update(frame);
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc.finalize().to_le_bytes());
    out.extend_from_slice(frame);
}

#[derive(Debug, Default)]
pub(super) struct Parsed {
    pub(super) records: Vec<Record>,
    /// Bytes up to the end of the last good record before any damage.
    pub(super) good_len: usize,
    /// Where the first bad record starts.
    pub(super) bad_at: Option<usize>,
    /// Whether the damage is an append cut short: the bad record runs to (or past) the end.
    pub(super) torn_tail: bool,
    /// Records whose checksum held but which do not decode (e.g. from another schema).
    pub(super) rejected: u64,
}

pub(super) fn parse_segment(bytes: &[u8]) -> Parsed {
    let mut p = Parsed::default();
    let mut at = 0;
    while at < bytes.len() {
        let Some(header) = bytes.get(at..at + RECORD_HEADER) else {
            p.bad_at = Some(at);
            p.torn_tail = true;
            break;
        };
        let len_bytes = [header[0], header[1], header[2], header[3]];
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let len = u32::from_le_bytes(len_bytes) as usize;
        let end = at + RECORD_HEADER + len;
        if len == 0 || len > MAX_RECORD {
            p.bad_at = Some(at);
            // A zero-filled tail is what a power cut leaves after an extending write.
            p.torn_tail = bytes[at..].iter().all(|&b| b == 0);
            break;
        }
        let Some(frame) = bytes.get(at + RECORD_HEADER..end) else {
            p.bad_at = Some(at);
            p.torn_tail = true;
            break;
        };
        let mut h = crc32fast::Hasher::new();
        h.update(&len_bytes);
        h.update(frame);
        if h.finalize() != crc {
            p.bad_at = Some(at);
            p.torn_tail = end == bytes.len();
            break;
        }
        match renkei_shared::decode(frame) {
            Ok(env) => p.records.push(Record {
                key: Key::of(&env),
                kind: env.body.kind(),
                frame: frame.to_vec(),
            }),
            Err(_) => p.rejected += 1,
        }
        at = end;
        p.good_len = at;
    }
    p
}

/// Writes a file so that a crash leaves the old content or the new, never a mix.
pub(super) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = File::create(&tmp).map_err(|e| OutboxError::io(&tmp, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| OutboxError::io(&tmp, e))?;
    drop(file);
    fs::rename(&tmp, path).map_err(|e| OutboxError::io(path, e))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Makes creations, renames and removals in `dir` durable.
pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| OutboxError::io(dir, e))
}
