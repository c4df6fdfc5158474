//! `{state_dir}/status`: what the running daemon last said about itself, for
//! `renkei-agent status`, which has no other way to ask it.
//!
//! The daemon writes the whole file on every change of its link and renames it into place, so a
//! reader sees one complete version or the one before. It is TOML, read by the same struct that
//! wrote it; keys a newer daemon adds are ignored by an older reader.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::link::LinkState;

/// The file's name in the state directory.
pub const FILE_NAME: &str = "status";

/// The daemon's own account of its session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// What the link was doing when the file was written.
    pub link: Link,
    /// When the link entered that state (Unix ms).
    pub since_ms: i64,
    /// The broker the daemon speaks to.
    pub broker: String,
    pub boot: u32,
    /// The last record delivery confirmed.
    pub acked: String,
    /// Heartbeats dropped to make room in a full outbox.
    pub heartbeats_dropped: u64,
    pub pid: u32,
    /// When the file was written (Unix ms).
    pub updated_ms: i64,
    /// The last connection or delivery error, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// The link's state as the file gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Link {
    Connecting,
    Connected,
    /// The connection failed; waiting before the next attempt.
    // Also read: the name a daemon of an earlier release writes.
    #[serde(alias = "offline (retrying)")]
    Offline,
    /// The daemon has stopped.
    Stopped,
}

impl From<LinkState> for Link {
    fn from(state: LinkState) -> Link {
        match state {
            LinkState::Connecting => Link::Connecting,
            LinkState::Connected => Link::Connected,
            LinkState::Backoff => Link::Offline,
            LinkState::Closing => Link::Stopped,
        }
    }
}

/// As `renkei-agent status` prints it.
impl fmt::Display for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Link::Connecting => "connecting",
            Link::Connected => "connected",
            Link::Offline => "offline (retrying)",
            Link::Stopped => "stopped",
        })
    }
}

/// Why the status file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a status file: {message}", path.display())]
    Parse { path: PathBuf, message: String },
}

impl Status {
    /// Writes the file in `state_dir`, whole: a temporary file renamed over the old one.
    pub fn write(&self, state_dir: &Path) -> std::io::Result<()> {
        let text = toml::to_string(self).map_err(std::io::Error::other)?;
        let tmp = state_dir.join(format!("{FILE_NAME}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, state_dir.join(FILE_NAME))
    }

    /// Reads the file in `state_dir`; `None` when there is none (no daemon has run there yet).
    pub fn read(state_dir: &Path) -> Result<Option<Status>, StatusError> {
        let path = state_dir.join(FILE_NAME);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StatusError::Read { path, source }),
        };
        toml::from_str(&text)
            .map(Some)
            .map_err(|e| StatusError::Parse {
                path,
                message: e
                    .to_string()
                    .lines()
                    .map(str::trim)
                    .collect::<Vec<_>>()
                    .join(" "),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> Status {
        Status {
            link: Link::Offline,
            since_ms: 1_788_220_800_000,
            broker: "mqtt://hq.example:1883".into(),
            boot: 3,
            acked: "3:41".into(),
            heartbeats_dropped: 2,
            pid: 4242,
            updated_ms: 1_788_220_801_000,
            last_error: Some("connection refused: \"hq\" said no\nat 12:00".into()),
        }
    }

    #[test]
    fn what_is_written_is_read_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Status::read(dir.path()).unwrap(), None);
        let written = status();
        written.write(dir.path()).unwrap();
        assert_eq!(Status::read(dir.path()).unwrap(), Some(written.clone()));
        let quiet = Status {
            link: Link::Connected,
            last_error: None,
            ..written
        };
        quiet.write(dir.path()).unwrap();
        assert_eq!(Status::read(dir.path()).unwrap(), Some(quiet));
        assert!(!dir.path().join("status.tmp").exists());
    }

    #[test]
    fn reads_the_file_an_earlier_daemon_wrote() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(FILE_NAME),
            "link = \"offline (retrying)\"\nsince_ms = 1788220800000\n\
             broker = \"mqtt://hq.example:1883\"\nboot = 3\nacked = \"3:41\"\n\
             heartbeats_dropped = 2\npid = 4242\nupdated_ms = 1788220801000\n\
             last_error = \"connection refused: \\\"hq\\\" said no\\nat 12:00\"\n",
        )
        .unwrap();
        assert_eq!(Status::read(dir.path()).unwrap(), Some(status()));
        assert_eq!(Link::Offline.to_string(), "offline (retrying)");
    }

    #[test]
    fn a_damaged_file_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(FILE_NAME),
            "link = \"connected\"\nsince_ms =",
        )
        .unwrap();
        let e = Status::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("status is not a status file"), "{e}");
    }
}
