//! Reads from the recorder's database: one site's history, and every event after a point
//! (for integrators catching up). Each request opens its own read connection on a blocking
//! thread; WAL mode lets it read while the recorder writes.

use std::path::Path;

use renkei_shared::{Id, Origin, SiteRef, WardCode};
use rusqlite::{Connection, OpenFlags, params};
use serde::Serialize;
use serde_json::Value;

/// Most events one request returns.
pub const MAX_LIMIT: u32 = 5_000;
/// Events returned when the request names no limit.
pub const DEFAULT_LIMIT: u32 = 500;

/// One recorded message.
#[derive(Debug, Serialize)]
pub struct Event {
    /// The row id: pass the last one as `since` to continue.
    pub id: i64,
    pub received_at: i64,
    pub topic: String,
    pub envelope: Value,
}

fn open(data_dir: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        crate::db::path(data_dir),
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

fn event(row: &rusqlite::Row<'_>) -> rusqlite::Result<Event> {
    let payload: Vec<u8> = row.get(3)?;
    Ok(Event {
        id: row.get(0)?,
        received_at: row.get(1)?,
        topic: row.get(2)?,
        // The payload was validated when it was recorded; one that no longer decodes (a
        // message version this broker does not read) shows null, as the state rebuild skips it.
        envelope: renkei_shared::decode(&payload)
            .ok()
            .and_then(|envelope| serde_json::to_value(envelope).ok())
            .unwrap_or(Value::Null),
    })
}

/// The latest `limit` messages a site sent (of one kind, if given), oldest first, in the order
/// the site sent them (boot, then sequence), which a backlog delivered late does not disturb.
pub fn site_history(
    data_dir: &Path,
    ward: WardCode,
    site: &Id,
    kind: Option<&str>,
    limit: u32,
) -> rusqlite::Result<Vec<Event>> {
    let conn = open(data_dir)?;
    let mut stmt = conn.prepare_cached(SITE_HISTORY)?;
    let origin = crate::recorder::origin_key(&Origin::Site(SiteRef {
        ward,
        site: site.clone(),
    }));
    let mut events = stmt
        .query_map(params![origin, kind, limit], event)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    events.reverse();
    Ok(events)
}

/// A backwards walk of one site's range of the `(origin_id, boot, seq)` key.
const SITE_HISTORY: &str = "SELECT id, received_at, topic, payload FROM messages
     WHERE origin_id = (SELECT id FROM origins WHERE key = ?1) AND (?2 IS NULL OR kind = ?2)
     ORDER BY boot DESC, seq DESC LIMIT ?3";

/// Where [`events`] starts.
#[derive(Debug, Clone, Copy)]
pub enum Since {
    /// After this row id.
    Id(i64),
    /// Received at or after this time (Unix ms).
    Time(i64),
}

/// Messages after a point, oldest first; a ward operator's are limited to its ward's sites.
pub fn events(
    data_dir: &Path,
    since: Since,
    ward: Option<WardCode>,
    limit: u32,
) -> rusqlite::Result<Vec<Event>> {
    let conn = open(data_dir)?;
    let (after_id, from_time) = match since {
        Since::Id(id) => (id, i64::MIN),
        Since::Time(t) => (i64::MIN, t),
    };
    let mut stmt = conn.prepare_cached(
        "SELECT id, received_at, topic, payload FROM messages
         WHERE id > ?1 AND received_at >= ?2 AND (?3 IS NULL OR ward = ?3)
         ORDER BY id LIMIT ?4",
    )?;
    let events = stmt
        .query_map(
            params![after_id, from_time, ward.map(|w| w.0), limit],
            event,
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_history_reads_the_message_key_without_sorting() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::db::open(dir.path()).unwrap();
        let plan: Vec<String> = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {SITE_HISTORY}"))
            .unwrap()
            .query_map(params!["site:131041/es-1", "shelter", 10], |r| r.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let plan = plan.join("; ");
        assert!(
            plan.contains("sqlite_autoindex_messages_1 (origin_id=?)"),
            "{plan}"
        );
        assert!(!plan.contains("TEMP B-TREE"), "{plan}");
    }
}
