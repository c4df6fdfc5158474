//! Reads from the record: one site's history, every event after a point (for integrators
//! catching up), and the latest commands with their answers. From SQLite, each request opens
//! its own read connection on a blocking thread (WAL mode lets it read while the recorder
//! writes); from PostgreSQL, it borrows one of the pool's.

use std::collections::HashMap;
use std::path::Path;

use renkei_shared::{Id, Origin, SiteRef, WardCode};
use rusqlite::{Connection, OpenFlags, params};
use serde::Serialize;
use serde_json::Value;

use crate::pg::PgError;
use crate::recorder::Archive;

/// Why a read failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error("database read failed: {0}")]
    Blocking(#[from] tokio::task::JoinError),
}

/// One recorded message as the record holds it.
struct Row {
    id: i64,
    received_at: i64,
    topic: String,
    payload: Vec<u8>,
}

/// What to read: the same four columns (id, received_at, topic, payload) every time.
enum Read {
    /// A backwards walk of one site's range of the `(origin_id, boot, seq)` key.
    Site {
        origin: String,
        kind: Option<String>,
        limit: u32,
    },
    /// Rows after an id and from a time, of one ward's sites or all.
    After {
        after_id: i64,
        from_time: i64,
        ward: Option<i64>,
        limit: u32,
    },
    /// The latest commands, newest first.
    Commands { limit: u32 },
    /// The answers from a row id on, oldest first.
    Answers { from_id: i64 },
}

impl Read {
    /// The query, in SQLite's words and PostgreSQL's.
    fn sql(&self) -> (&'static str, &'static str) {
        match self {
            Read::Site { .. } => (SITE_HISTORY, PG_SITE_HISTORY),
            Read::After { .. } => (AFTER, PG_AFTER),
            Read::Commands { .. } => (COMMANDS, PG_COMMANDS),
            Read::Answers { .. } => (ANSWERS, PG_ANSWERS),
        }
    }
}

/// Runs `read` against the record.
async fn rows(archive: &Archive, read: Read) -> Result<Vec<Row>, ReadError> {
    match archive {
        Archive::Sqlite(data_dir) => {
            let data_dir = data_dir.clone();
            tokio::task::spawn_blocking(move || sqlite_rows(&data_dir, &read)).await?
        }
        Archive::Postgres { pool, .. } => {
            let sql = read.sql().1;
            let rows = match &read {
                Read::Site {
                    origin,
                    kind,
                    limit,
                } => pool.query(sql, &[origin, kind, &i64::from(*limit)]).await?,
                Read::After {
                    after_id,
                    from_time,
                    ward,
                    limit,
                } => {
                    pool.query(sql, &[after_id, from_time, ward, &i64::from(*limit)])
                        .await?
                }
                Read::Commands { limit } => pool.query(sql, &[&i64::from(*limit)]).await?,
                Read::Answers { from_id } => pool.query(sql, &[from_id]).await?,
            };
            let row = |r: &tokio_postgres::Row| -> Result<Row, tokio_postgres::Error> {
                Ok(Row {
                    id: r.try_get(0)?,
                    received_at: r.try_get(1)?,
                    topic: r.try_get(2)?,
                    payload: r.try_get(3)?,
                })
            };
            Ok(rows
                .iter()
                .map(row)
                .collect::<Result<_, _>>()
                .map_err(PgError::from)?)
        }
    }
}

fn sqlite_rows(data_dir: &Path, read: &Read) -> Result<Vec<Row>, ReadError> {
    let conn = open(data_dir)?;
    let mut stmt = conn.prepare_cached(read.sql().0)?;
    let row = |r: &rusqlite::Row<'_>| {
        Ok(Row {
            id: r.get(0)?,
            received_at: r.get(1)?,
            topic: r.get(2)?,
            payload: r.get(3)?,
        })
    };
    let rows = match read {
        Read::Site {
            origin,
            kind,
            limit,
        } => stmt.query_map(params![origin, kind, limit], row)?,
        Read::After {
            after_id,
            from_time,
            ward,
            limit,
        } => stmt.query_map(params![after_id, from_time, ward, limit], row)?,
        Read::Commands { limit } => stmt.query_map(params![limit], row)?,
        Read::Answers { from_id } => stmt.query_map(params![from_id], row)?,
    };
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

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

fn event(row: Row) -> Event {
    Event {
        id: row.id,
        received_at: row.received_at,
        // The payload was validated when it was recorded; one that no longer decodes (a
        // message version this broker does not read) shows null, as the state rebuild skips it.
        envelope: renkei_shared::decode(&row.payload)
            .ok()
            .and_then(|envelope| serde_json::to_value(envelope).ok())
            .unwrap_or(Value::Null),
        topic: row.topic,
    }
}

/// The latest `limit` messages a site sent (of one kind, if given), oldest first, in the order
/// the site sent them (boot, then sequence), which a backlog delivered late does not disturb.
pub async fn site_history(
    archive: &Archive,
    ward: WardCode,
    site: &Id,
    kind: Option<&str>,
    limit: u32,
) -> Result<Vec<Event>, ReadError> {
    let origin = crate::recorder::origin_key(&Origin::Site(SiteRef {
        ward,
        site: site.clone(),
    }));
    let read = Read::Site {
        origin,
        kind: kind.map(str::to_owned),
        limit,
    };
    let mut events: Vec<Event> = rows(archive, read).await?.into_iter().map(event).collect();
    events.reverse();
    Ok(events)
}

/// A backwards walk of one site's range of the `(origin_id, boot, seq)` key.
const SITE_HISTORY: &str = "SELECT id, received_at, topic, payload FROM messages
     WHERE origin_id = (SELECT id FROM origins WHERE key = ?1) AND (?2 IS NULL OR kind = ?2)
     ORDER BY boot DESC, seq DESC LIMIT ?3";
const PG_SITE_HISTORY: &str = "SELECT id, received_at, topic, payload FROM messages
     WHERE origin_id = (SELECT id FROM origins WHERE key = $1)
         AND ($2::text IS NULL OR kind = $2)
     ORDER BY boot DESC, seq DESC LIMIT $3";

/// Where [`events`] starts.
#[derive(Debug, Clone, Copy)]
pub enum Since {
    /// After this row id.
    Id(i64),
    /// Received at or after this time (Unix ms).
    Time(i64),
}

/// Messages after a point, oldest first; a ward operator's are limited to its ward's sites.
pub async fn events(
    archive: &Archive,
    since: Since,
    ward: Option<WardCode>,
    limit: u32,
) -> Result<Vec<Event>, ReadError> {
    let (after_id, from_time) = match since {
        Since::Id(id) => (id, i64::MIN),
        Since::Time(t) => (i64::MIN, t),
    };
    let read = Read::After {
        after_id,
        from_time,
        ward: ward.map(|w| i64::from(w.0)),
        limit,
    };
    Ok(rows(archive, read).await?.into_iter().map(event).collect())
}

const AFTER: &str = "SELECT id, received_at, topic, payload FROM messages
     WHERE id > ?1 AND received_at >= ?2 AND (?3 IS NULL OR ward = ?3)
     ORDER BY id LIMIT ?4";
const PG_AFTER: &str = "SELECT id, received_at, topic, payload FROM messages
     WHERE id > $1 AND received_at >= $2 AND ($3::int8 IS NULL OR ward = $3)
     ORDER BY id LIMIT $4";

/// What became of a command, as far as the record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandState {
    /// No answer yet, and it has not expired: the site may not have it yet.
    Pending,
    /// The site carried it out.
    Done,
    /// It reached its site too old, and the site did not carry it out.
    Expired,
    /// No answer, and it is past its TTL: it never reached its site, or the site's answer
    /// is still on its way (a cut line).
    NoAnswer,
}

/// A command and what became of it.
#[derive(Debug, Serialize)]
pub struct CommandView {
    pub command_id: Id,
    pub target: SiteRef,
    pub action: renkei_shared::CommandAction,
    /// Who issued it (the origin's name).
    pub by: String,
    pub sent_at: i64,
    pub received_at: i64,
    pub state: CommandState,
    /// When the site's answer was recorded.
    pub answered_at: Option<i64>,
    /// For an expired command: its age when it reached the site, in seconds.
    pub age_s: Option<u32>,
}

/// The latest `limit` commands (newest first), each with its site's answer if one is
/// recorded; a ward operator's are limited to its ward's sites. Both kinds are read through
/// the partial index `messages_commands`, so the record's size does not matter.
pub async fn commands(
    archive: &Archive,
    ward: Option<WardCode>,
    limit: u32,
    now: renkei_shared::Timestamp,
) -> Result<Vec<CommandView>, ReadError> {
    use renkei_shared::{Body, CommandOutcome};
    let mut commands = Vec::new();
    for Row {
        id,
        received_at,
        payload,
        ..
    } in rows(archive, Read::Commands { limit }).await?
    {
        let Ok(env) = renkei_shared::decode(&payload) else {
            continue;
        };
        let Body::Command(c) = env.body else { continue };
        if ward.is_some_and(|w| w != c.target.ward) {
            continue;
        }
        let by = match &env.header.origin {
            Origin::Hq(node) => node.to_string(),
            Origin::Site(s) => format!("{}/{}", s.ward, s.site),
        };
        let expired = now.millis_since(env.header.sent_at) > renkei_shared::COMMAND_TTL_MS;
        commands.push((
            id,
            CommandView {
                command_id: c.command_id,
                target: c.target,
                action: c.action,
                by,
                sent_at: env.header.sent_at.0,
                received_at,
                state: if expired {
                    CommandState::NoAnswer
                } else {
                    CommandState::Pending
                },
                answered_at: None,
                age_s: None,
            },
        ));
    }
    let Some(oldest) = commands.iter().map(|(id, _)| *id).min() else {
        return Ok(Vec::new());
    };
    // The answers recorded since the oldest of these commands (an answer is recorded after
    // its command, which came through this broker first, or it is an answer to an older one).
    let answers = rows(archive, Read::Answers { from_id: oldest }).await?;
    // A command id names one command of one target; the first answer counts. By key, so that
    // a site sending many answers costs one lookup each.
    let by_key: HashMap<(SiteRef, Id), usize> = commands
        .iter()
        .enumerate()
        .map(|(i, (_, v))| ((v.target.clone(), v.command_id.clone()), i))
        .collect();
    for Row {
        received_at,
        payload,
        ..
    } in answers
    {
        let Ok(env) = renkei_shared::decode(&payload) else {
            continue;
        };
        let (Origin::Site(site), Body::CommandResult(result)) = (env.header.origin, env.body)
        else {
            continue;
        };
        let Some((_, view)) = by_key
            .get(&(site, result.command_id))
            .and_then(|i| commands.get_mut(*i))
            .filter(|(_, v)| v.answered_at.is_none())
        else {
            continue;
        };
        view.answered_at = Some(received_at);
        match result.outcome {
            CommandOutcome::Done => view.state = CommandState::Done,
            CommandOutcome::Expired { age_s } => {
                view.state = CommandState::Expired;
                view.age_s = Some(age_s);
            }
        }
    }
    Ok(commands.into_iter().map(|(_, v)| v).collect())
}

/// The latest commands, newest first.
const COMMANDS: &str = "SELECT id, received_at, topic, payload FROM messages
     WHERE kind IN ('command', 'command_result') AND kind = 'command'
     ORDER BY id DESC LIMIT ?1";
const PG_COMMANDS: &str = "SELECT id, received_at, topic, payload FROM messages
     WHERE kind IN ('command', 'command_result') AND kind = 'command'
     ORDER BY id DESC LIMIT $1";

/// The answers after a row id, oldest first.
const ANSWERS: &str = "SELECT id, received_at, topic, payload FROM messages
     WHERE kind IN ('command', 'command_result') AND kind = 'command_result' AND id >= ?1
     ORDER BY id";
const PG_ANSWERS: &str = "SELECT id, received_at, topic, payload FROM messages
     WHERE kind IN ('command', 'command_result') AND kind = 'command_result' AND id >= $1
     ORDER BY id";

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn commands_and_their_answers_are_read_through_their_index() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::db::open(dir.path()).unwrap();
        for (sql, arg) in [(COMMANDS, 10), (ANSWERS, 1)] {
            let plan: Vec<String> = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap()
                .query_map(params![arg], |r| r.get(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            let plan = plan.join("; ");
            assert!(plan.contains("messages_commands"), "{plan}");
            assert!(!plan.contains("TEMP B-TREE"), "{plan}");
        }
    }

    /// Records `envs` as ingest would, in order.
    pub(crate) fn record(archive: &Archive, envs: Vec<renkei_shared::Envelope>) {
        use std::sync::Arc;

        use crate::recorder::{Record, Recorder};
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let recorder =
            Recorder::start(archive, crate::config::RecorderConfig::default(), metrics).unwrap();
        let tx = recorder.tx().unwrap();
        for env in envs {
            assert!(tx.send(Record::Accepted {
                received_at: env.header.sent_at,
                topic: renkei_shared::Topic::of(&env).unwrap(),
                payload: renkei_shared::encode(&env).unwrap(),
                envelope: Box::new(env),
                via: None,
            }));
        }
        drop(tx);
        recorder.stop();
    }

    #[tokio::test]
    async fn each_command_shows_its_sites_answer_or_how_long_it_waits() {
        let dir = tempfile::tempdir().unwrap();
        commands_and_answers(Archive::Sqlite(dir.path().to_path_buf())).await;
    }

    /// The same in PostgreSQL, which a clustered HQ's instances share.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_command_shows_its_sites_answer_in_postgresql_too() {
        let pg = renkei_testkit::postgres::Postgres::start();
        commands_and_answers(postgres_archive(&pg).await).await;
    }

    /// The record in `pg`, opened as the broker opens it.
    pub(crate) async fn postgres_archive(pg: &renkei_testkit::postgres::Postgres) -> Archive {
        let config = crate::config::RecorderConfig {
            postgres: Some(pg.url()),
            ..Default::default()
        };
        Archive::open(&config, Path::new("/nonexistent"))
            .await
            .unwrap()
    }

    /// Records commands and answers in `archive` and reads them back through the API's query.
    async fn commands_and_answers(archive: Archive) {
        use renkei_shared::{Body, CommandOutcome, CommandResult, Timestamp, sample};
        let now = Timestamp(sample::SENT_AT.0 + 3 * 3600 * 1000);
        let hours_ago = |h: i64| Timestamp(now.0 - h * 3600 * 1000 + 1);
        let mut seq = 100;
        let mut command = |name: &str, sent_at: Timestamp, ward: u32| {
            let mut env = sample::command();
            seq += 1;
            env.header.seq = seq;
            env.header.sent_at = sent_at;
            if let Body::Command(c) = &mut env.body {
                c.command_id = Id::new(name).unwrap();
                c.target.ward = WardCode(ward);
            }
            env
        };
        let answer = |name: &str, outcome, seq, site: &str| {
            let mut env = sample::command_result();
            env.header.seq = seq;
            env.header.sent_at = now;
            env.header.origin = Origin::Site(SiteRef {
                ward: WardCode(131041),
                site: Id::new(site).unwrap(),
            });
            env.body = Body::CommandResult(CommandResult {
                command_id: Id::new(name).unwrap(),
                outcome,
            });
            env
        };
        let envs = vec![
            command("done", hours_ago(0), 131041),
            command("expired", hours_ago(2), 131041),
            command("pending", hours_ago(0), 131041),
            command("no-answer", hours_ago(2), 131041),
            command("chiyoda", hours_ago(0), 131016),
            // Another site's answer naming the same id answers nothing.
            answer(
                "done",
                CommandOutcome::Expired { age_s: 1 },
                200,
                "other-es",
            ),
            answer("done", CommandOutcome::Done, 201, "nishi-shinjuku-es"),
            answer(
                "expired",
                CommandOutcome::Expired { age_s: 7200 },
                202,
                "nishi-shinjuku-es",
            ),
            // Delivered twice, answered twice: the first answer counts.
            answer(
                "done",
                CommandOutcome::Expired { age_s: 9 },
                203,
                "nishi-shinjuku-es",
            ),
        ];
        record(&archive, envs);
        let all = commands(&archive, None, 10, now).await.unwrap();
        let states: Vec<(&str, CommandState, Option<u32>)> = all
            .iter()
            .map(|c| (c.command_id.as_str(), c.state, c.age_s))
            .collect();
        assert_eq!(
            states,
            [
                ("chiyoda", CommandState::Pending, None),
                ("no-answer", CommandState::NoAnswer, None),
                ("pending", CommandState::Pending, None),
                ("expired", CommandState::Expired, Some(7200)),
                ("done", CommandState::Done, None),
            ],
            "newest first"
        );
        assert_eq!(all[4].answered_at, Some(now.0));
        assert_eq!(all[4].by, "broker");
        let shinjuku = commands(&archive, Some(WardCode(131041)), 10, now)
            .await
            .unwrap();
        assert_eq!(
            shinjuku.len(),
            4,
            "a ward operator sees its own ward's commands"
        );
        let latest = commands(&archive, None, 2, now).await.unwrap();
        assert_eq!(latest.len(), 2);
        assert_eq!(latest[1].command_id.as_str(), "no-answer");
    }

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
