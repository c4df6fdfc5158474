//! What bounds the outbox: its byte budget (unsent heartbeats evicted oldest first, then
//! reports refused with the alarm raised) and the disk reserve it never eats into, checked
//! before anything is written.

use std::{fs, io};

use tracing::{error, info, warn};

use super::{Locked, Outbox, OutboxError, Record, Result};

impl Outbox {
    /// Bytes an unprivileged process may still write on the outbox's filesystem.
    pub fn disk_free(&self) -> Result<u64> {
        let vfs = rustix::fs::statvfs(&self.dir)
            .map_err(|e| OutboxError::io(&self.dir, io::Error::from(e)))?;
        Ok(vfs.f_bavail.saturating_mul(vfs.f_frsize))
    }

    /// Refuses an append of `need` bytes that would eat into the disk reserve. A failing
    /// statvfs does not refuse: the write itself still reports a full disk.
    pub(super) fn check_disk(&self, need: u64) -> Result<()> {
        if self.disk_reserve == 0 {
            return Ok(());
        }
        match self.disk_free() {
            Ok(available) if available < self.disk_reserve.saturating_add(need) => {
                Err(OutboxError::DiskLow {
                    path: self.dir.clone(),
                    available,
                    reserve: self.disk_reserve,
                })
            }
            Ok(_) => Ok(()),
            Err(e) => {
                warn!(error = %e, "free disk space unknown; the report is written anyway");
                Ok(())
            }
        }
    }
}

impl Locked<'_> {
    /// Bytes in segments.
    pub fn bytes(&mut self) -> Result<u64> {
        Ok(self.summaries()?.iter().map(|(_, s)| s.len).sum())
    }

    /// Drops unsent heartbeats, oldest segments first, until `needed` bytes are free.
    pub(super) fn evict_heartbeats(&mut self, needed: u64) -> Result<u64> {
        let acked = self.acked()?;
        let mut freed = 0;
        let mut evicted = 0;
        for (name, s) in self.summaries()? {
            if freed >= needed {
                break;
            }
            if s.heartbeats == 0 && s.first > acked {
                continue;
            }
            let (records, _) = self.scan(&name, true)?;
            let keep: Vec<Record> = records
                .iter()
                .filter(|r| r.key > acked && !r.is_heartbeat())
                .cloned()
                .collect();
            let dropped_heartbeats = records
                .iter()
                .filter(|r| r.key > acked && r.is_heartbeat())
                .count() as u64;
            let before = s.len;
            self.rewrite(&name, &keep)?;
            let after = self.summary(&name, false)?.map_or(0, |s| s.len);
            freed += before.saturating_sub(after);
            evicted += dropped_heartbeats;
        }
        if evicted > 0 {
            warn!(
                evicted,
                freed_bytes = freed,
                "outbox full: oldest unsent heartbeats dropped to make room"
            );
        }
        Ok(evicted)
    }

    /// Why reports are refused, while they are.
    pub fn alarm(&self) -> Option<String> {
        fs::read_to_string(self.path("alarm")).ok()
    }

    pub(super) fn raise_alarm(&self, why: &str) {
        error!(alarm = why, "OUTBOX ALARM: a staff report was refused");
        if let Err(e) = fs::write(self.path("alarm"), why) {
            error!(error = %e, "cannot record the outbox alarm");
        }
    }

    pub(super) fn clear_alarm(&self) {
        match fs::remove_file(self.path("alarm")) {
            Ok(()) => info!("outbox alarm cleared: reports are accepted again"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn!(error = %e, "cannot clear the outbox alarm"),
        }
    }
}
