//! Who numbers what: the boot id kept on disk ([`next_boot_id`]) and the `(boot, seq)`
//! [`Key`] of every message, which is also its place in the delivery order. [`allocate`]
//! decides the next keys, the outbox hands them out under its lock ([`crate::outbox`]), the lifecycle stamps them on messages
//! ([`crate::lifecycle`]), and the delivery core matches PUBACKs and receipts by them.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A record's identity and place in the delivery order: its envelope's `(boot, seq)`.
pub use renkei_link::Key;

/// The keys of `count` (at least one) new records of `boot`: the first and the last.
///
/// They follow the last sequence number handed out (`handed_out`, the outbox's `seq` file,
/// written without fsync) and, belt and braces, every key already stored or delivered
/// (`floors`): a `seq` file lost in a power cut never makes a key be handed out twice.
pub fn allocate(
    boot: u32,
    count: u64,
    handed_out: Option<Key>,
    floors: impl IntoIterator<Item = Key>,
) -> (Key, Key) {
    let last = handed_out
        .into_iter()
        .chain(floors)
        .filter(|k| k.boot == boot)
        .map(|k| k.seq)
        .max()
        .unwrap_or(0);
    (
        Key {
            boot,
            seq: last + 1,
        },
        Key {
            boot,
            seq: last + count.max(1),
        },
    )
}

/// The file in the state directory that holds the last boot id, as decimal text.
pub const BOOT_ID_FILE: &str = "boot_id";

/// Why the boot id could not be raised. The agent refuses to start without one: reusing an
/// old boot id would make HQ discard everything this boot says as outdated.
#[derive(Debug, thiserror::Error)]
pub enum BootIdError {
    /// The state directory or file could not be created, read, written or synced.
    #[error("boot id in {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file holds something other than a number (it is never half-written: see
    /// [`next_boot_id`]), so a person must look at it.
    #[error("boot id file {} holds {content:?}, not a number", path.display())]
    Corrupt { path: PathBuf, content: String },
    /// Four billion restarts.
    #[error("boot id in {} is at its maximum", path.display())]
    Exhausted { path: PathBuf },
}

/// Raises the boot id kept in `dir` by one and returns it (1 on the first start).
///
/// The new value is written to a temporary file, synced, renamed over the old one and the
/// directory synced, so that a power cut leaves either the old or the new value, never a torn
/// one, and a value once returned is never returned again.
pub fn next_boot_id(dir: &Path) -> Result<u32, BootIdError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| BootIdError::Io { path, source }
    };
    fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join(BOOT_ID_FILE);
    let last = match fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse::<u32>()
            .map_err(|_| BootIdError::Corrupt {
                path: path.clone(),
                content: text.chars().take(40).collect(),
            })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(io(&path)(e)),
    };
    let next = last
        .checked_add(1)
        .ok_or_else(|| BootIdError::Exhausted { path: path.clone() })?;

    let tmp = dir.join(format!("{BOOT_ID_FILE}.tmp"));
    let mut file = File::create(&tmp).map_err(io(&tmp))?;
    writeln!(file, "{next}").map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(io(&path))?;
    // Makes the rename itself durable.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(boot: u32, seq: u64) -> Key {
        Key { boot, seq }
    }

    #[test]
    fn a_new_boot_starts_at_one() {
        assert_eq!(allocate(3, 1, None, []), (key(3, 1), key(3, 1)));
        // Keys of earlier boots do not count.
        assert_eq!(
            allocate(3, 2, Some(key(2, 90)), [key(2, 95)]),
            (key(3, 1), key(3, 2))
        );
    }

    #[test]
    fn keys_follow_the_last_handed_out_and_never_fall_below_what_is_stored() {
        assert_eq!(
            allocate(1, 3, Some(key(1, 10)), []),
            (key(1, 11), key(1, 13))
        );
        // A `seq` file behind the stored records (lost in a power cut) is overruled.
        assert_eq!(
            allocate(1, 1, Some(key(1, 4)), [key(1, 7), key(1, 6)]),
            (key(1, 8), key(1, 8))
        );
        // No file at all: the delivered cursor is the floor.
        assert_eq!(allocate(1, 0, None, [key(1, 20)]), (key(1, 21), key(1, 21)));
    }

    #[test]
    fn boot_id_starts_at_one_and_grows_across_starts() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("nested/agent");
        assert_eq!(next_boot_id(&state).unwrap(), 1);
        assert_eq!(next_boot_id(&state).unwrap(), 2);
        assert_eq!(next_boot_id(&state).unwrap(), 3);
        let text = fs::read_to_string(state.join(BOOT_ID_FILE)).unwrap();
        assert_eq!(text, "3\n");
        assert!(!state.join("boot_id.tmp").exists());
    }

    #[test]
    fn boot_id_continues_from_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(BOOT_ID_FILE), "41\n").unwrap();
        assert_eq!(next_boot_id(dir.path()).unwrap(), 42);
    }

    #[test]
    fn a_corrupt_boot_id_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(BOOT_ID_FILE), "garbage").unwrap();
        let err = next_boot_id(dir.path()).unwrap_err();
        assert!(matches!(err, BootIdError::Corrupt { .. }), "{err}");
        // The file is left for a person to look at.
        assert_eq!(
            fs::read_to_string(dir.path().join(BOOT_ID_FILE)).unwrap(),
            "garbage"
        );
        fs::write(dir.path().join(BOOT_ID_FILE), u32::MAX.to_string()).unwrap();
        assert!(matches!(
            next_boot_id(dir.path()),
            Err(BootIdError::Exhausted { .. })
        ));
    }
}
