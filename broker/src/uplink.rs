//! Ward mode: the uplink that forwards this ward's record to HQ, from the record itself.
//!
//! ```text
//!   agents ─▶ this broker ─▶ ingest ─▶ recorder ─ commit ─▶ messages (SQLite) ──┐
//!                                                                                 │ read by row id
//!   HQ's receipts (after HQ's commit) ─▶ delivery core (renkei-link, live first) ◀┘
//!                                         │ publish byte for byte, QoS 1
//!                                         ▼
//!                                   HQ's broker (login of role relay, bound to this ward)
//! ```
//!
//! - **The record is the spool.** Rows are read from `messages` by id and published as they
//!   arrived (topic and payload byte for byte: same origin, boot, seq); there is no second
//!   queue to lose. A row counts as delivered only when HQ's receipt (sent after HQ's commit,
//!   on `renkei/receipt/v1/{ward}/{site}`, the topic the site's own agent would read) names its
//!   `(site, boot, seq)`. The cursor (every row up to it is in HQ's record) is kept in `meta`
//!   as `uplink_cursor`: a restart sends again what followed it, and HQ keeps one copy.
//! - **What is forwarded**: rows of this ward's sites that their own agents sent (`via` is
//!   NULL). What came down from HQ, or through another relay, is never sent up again.
//! - **Live before backlog** (`Order::LiveFirst`): rows committed after the link came up go at
//!   once; rows stored before (the backlog of a cut) follow at `upstream.replay_rate`. Both
//!   are forwarded as they were sent, so HQ's reducer (highest `(boot, seq)` wins) keeps the
//!   newest state whatever the order of arrival. A backlog row is published retained only if
//!   no newer row of its topic went out live on this connection, so that HQ's broker never
//!   hands a late subscriber an older copy than it has.
//! - **Down**: the same connection subscribes to what HQ sends this ward (its alerts and
//!   their acknowledgements, its steps on this ward's requests, its commands to this ward's
//!   sites) and, per `upstream.other_wards`, the other wards' sites' statuses or all their
//!   messages. Each is published into this broker as it came (topic and payload), so the
//!   ward's agents get their commands and its dashboard the wider picture; ingest records
//!   them with `via` = this link, and they are never forwarded up again. HQ keeps the relay's
//!   session (QoS 1, clean session off): what it sent during a cut comes on reconnection,
//!   once. A command is handed to its site however late: the site carries it out unless it
//!   is older than [`renkei_shared::COMMAND_TTL_MS`], and answers either way
//!   ([`renkei_shared::CommandResult`], forwarded up like its other news), so HQ learns
//!   which.
//! - One driver, one delivery core: the agent's (`renkei-link`), with a speaker that announces
//!   nothing of its own.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use renkei_link::delivery::{Delivery, Order, Want};
use renkei_link::driver::{Driver, DriverOptions, LinkEvent, PublishError, Silent};
use renkei_link::recent::Recent;
use renkei_link::{Confirm, Credentials, LinkOptions, Outgoing};
use renkei_shared::receipt::{parse_receipt_topic, receipt_ward_filter};
use renkei_shared::url::BrokerUrl;
use renkei_shared::{Id, Receipt, SiteRef, Timestamp, Topic, WardCode};
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::config::{OtherWards, UpstreamConfig};
use crate::db;
use crate::metrics::Metrics;
use crate::publisher::Publisher;

/// The `meta` key of the uplink's cursor.
const CURSOR_KEY: &str = "uplink_cursor";
/// How often the uplink looks at the clock: the backlog's pace, overdue receipts, the cursor
/// written to disk, the backlog counted.
const TICK: Duration = Duration::from_millis(100);
/// Messages that came down remembered by `(origin, boot, seq)`, so that HQ's redelivery of
/// one (QoS 1 is at least once: a reconnection resends what was not acknowledged) reaches the
/// ward's sites once.
const DOWN_SEEN: usize = 4096;

/// How often the cursor is written and the backlog counted, at most.
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// A record HQ's broker took this long ago and HQ has not stored raises the stall alarm
/// (`renkei_uplink_stalled`). HQ's receipts come within a few seconds even under load (its
/// receipt pacing names every site at least every few seconds); the records are sent again
/// at the receipt timeout (30 s).
const STALL_AFTER: Duration = Duration::from_secs(20);

/// Why ward mode cannot start.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("upstream.broker: {0}")]
    Url(String),
    #[error("cannot read upstream.password_file {path}: {source}")]
    Password {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("upstream.ca_file: {0}")]
    Tls(#[from] renkei_link::tls::TlsError),
    #[error("upstream: an mqtts:// broker needs upstream.ca_file")]
    NoCa,
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
}

/// The running uplink.
#[derive(Debug)]
pub struct Uplink {
    task: JoinHandle<()>,
    stop: Arc<Notify>,
}

impl Uplink {
    /// Starts forwarding this ward's record to HQ. `committed` is notified after every commit
    /// of the recorder.
    pub fn start(
        config: &UpstreamConfig,
        data_dir: &Path,
        committed: Arc<Notify>,
        down: Publisher,
        metrics: Arc<Metrics>,
    ) -> Result<Uplink, UplinkError> {
        let url = config
            .broker
            .as_deref()
            .ok_or_else(|| UplinkError::Url("not set".into()))?;
        let broker = BrokerUrl::parse(url).map_err(|e| UplinkError::Url(e.to_string()))?;
        let ward = config
            .ward
            .ok_or_else(|| UplinkError::Url("upstream.ward is not set".into()))?;
        let tls = match (broker.tls, &config.ca_file) {
            (true, Some(ca)) => Some(renkei_link::tls::client_config(ca)?),
            (true, None) => return Err(UplinkError::NoCa),
            (false, _) => None,
        };
        let credentials = match &config.user {
            Some(user) => Some(Credentials {
                username: user.clone(),
                password: read_password(config.password_file.as_deref())?,
            }),
            None => None,
        };
        let link = LinkOptions {
            broker,
            credentials,
            client_id: config.client_id(),
            tls,
        };
        let store = Store::open(data_dir, ward)?;
        let cursor = store.cursor()?;
        let window = config.window;
        let options = DriverOptions {
            subscriptions: subscriptions(ward, config.other_wards),
            inflight: Some(u16::try_from(window.min(1000)).unwrap_or(1000)),
            connect_timeout: Some(Duration::from_secs(10)),
            request_capacity: window + 64,
            // One link per ward office, to a broker sized for all of them: retried often, so
            // that the backlog starts soon after the line is back.
            backoff_max: Some(Duration::from_secs(5)),
            ..DriverOptions::default()
        };
        let driver = Driver::spawn(&link, options, Silent);
        let delivery = Delivery::new(
            Confirm::Receipt,
            Order::LiveFirst,
            window,
            cursor,
            config.replay_rate,
            Instant::now(),
        );
        metrics.uplink.cursor.store(cursor, Ordering::Relaxed);
        tracing::info!(
            hq = %link.broker,
            %ward,
            client_id = %link.client_id,
            cursor,
            "ward mode: forwarding this ward's record to HQ"
        );
        let stop = Arc::new(Notify::new());
        let uplink = Forwarder {
            driver,
            delivery,
            store: Arc::new(Mutex::new(store)),
            in_flight: BTreeMap::new(),
            live_topics: HashSet::new(),
            committed,
            down: Arc::new(Mutex::new(down)),
            ward,
            seen_down: Recent::new(DOWN_SEEN),
            stop: stop.clone(),
            metrics,
            saved: cursor,
            saved_at: Instant::now(),
            reported_at: None,
        };
        Ok(Uplink {
            task: tokio::spawn(uplink.run()),
            stop,
        })
    }

    /// Closes the link (a graceful DISCONNECT) and writes the cursor.
    pub async fn stop(self) {
        self.stop.notify_one();
        let _ = self.task.await;
    }
}

/// What the uplink subscribes to at HQ: this ward's receipts first, then what comes down.
fn subscriptions(ward: WardCode, other_wards: OtherWards) -> Vec<String> {
    use renkei_shared::topic::{ROOT, ward_reader_filters};
    let mut filters = vec![receipt_ward_filter(ward), format!("{ROOT}/cmd/{ward}/#")];
    // HQ's alerts, their acknowledgements and its steps on this ward's requests; not the
    // ward's own tree (first of the four), which is this ward's to send.
    filters.extend(ward_reader_filters(ward).into_iter().skip(1));
    for other in renkei_shared::WARDS.iter().filter(|w| w.code != ward) {
        match other_wards {
            OtherWards::None => {}
            OtherWards::Status => filters.push(format!("{ROOT}/{}/+/status", other.code)),
            OtherWards::All => filters.push(renkei_shared::topic::ward_filter(other.code)),
        }
    }
    filters
}

fn read_password(path: Option<&Path>) -> Result<String, UplinkError> {
    match path {
        Some(path) => {
            crate::config::read_password_file(path).map_err(|source| UplinkError::Password {
                path: path.to_owned(),
                source,
            })
        }
        None => Ok(String::new()),
    }
}

/// One forwarded row, as much as a receipt needs to name it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Named {
    site: SiteRef,
    boot: u32,
    seq: u64,
}

/// A row of `messages` to forward.
#[derive(Debug)]
struct Row {
    id: i64,
    topic: String,
    payload: Vec<u8>,
    named: Named,
}

/// The uplink's view of the database: this ward's rows, and its cursor in `meta`.
#[derive(Debug)]
struct Store {
    conn: Connection,
    ward: WardCode,
}

impl Store {
    fn open(data_dir: &Path, ward: WardCode) -> Result<Store, UplinkError> {
        Ok(Store {
            conn: db::open(data_dir)?,
            ward,
        })
    }

    fn cursor(&self) -> rusqlite::Result<i64> {
        Ok(self
            .conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [CURSOR_KEY], |r| {
                r.get(0)
            })
            .optional()?
            .unwrap_or(0))
    }

    fn save_cursor(&self, cursor: i64) -> rusqlite::Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )?
            .execute(params![CURSOR_KEY, cursor])?;
        Ok(())
    }

    /// The newest row of the record, whatever it holds.
    fn last_id(&self) -> rusqlite::Result<Option<i64>> {
        self.conn
            .query_row("SELECT MAX(id) FROM messages", [], |r| r.get(0))
    }

    /// This ward's rows after the cursor that HQ does not have yet.
    fn backlog(&self, cursor: i64) -> rusqlite::Result<u64> {
        self.conn
            .prepare_cached(
                "SELECT COUNT(*) FROM messages WHERE id > ?1 AND via IS NULL AND ward = ?2",
            )?
            .query_row(params![cursor, self.ward.0], |r| r.get(0))
    }

    /// The rows a want asks for: this ward's sites' own messages, in id order.
    fn read(&self, want: &Want<i64>) -> rusqlite::Result<Vec<Row>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, topic, payload, site, boot, seq FROM messages
             WHERE id > ?1 AND id <= ?2 AND via IS NULL AND ward = ?3
             ORDER BY id LIMIT ?4",
        )?;
        let limit = i64::try_from(want.limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map(
            params![
                want.after,
                want.until.unwrap_or(i64::MAX),
                self.ward.0,
                limit
            ],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, u32>(4)?,
                    r.get::<_, i64>(5)?,
                ))
            },
        )?;
        let mut out = Vec::new();
        for row in rows {
            let (id, topic, payload, site, boot, seq) = row?;
            // The recorder wrote the site's id from a validated message.
            let Ok(site) = Id::new(&site) else {
                tracing::warn!(id, site, "uplink: a row's site id does not parse; skipped");
                continue;
            };
            out.push(Row {
                id,
                topic,
                payload,
                named: Named {
                    site: SiteRef {
                        ward: self.ward,
                        site,
                    },
                    boot,
                    // Stored as its bits (SQLite integers are signed).
                    seq: seq as u64,
                },
            });
        }
        Ok(out)
    }
}

/// The task: one link to HQ, one delivery core over the record.
struct Forwarder {
    driver: Driver<Silent, i64>,
    delivery: Delivery<i64>,
    store: Arc<Mutex<Store>>,
    /// Rows out on this connection, by id, until the cursor passes them.
    in_flight: BTreeMap<i64, Named>,
    /// Topics a live row went out on, this connection.
    live_topics: HashSet<String>,
    committed: Arc<Notify>,
    /// This broker's own link: what comes down is published here.
    down: Arc<Mutex<Publisher>>,
    ward: WardCode,
    seen_down: Recent<(String, u32, u64)>,
    stop: Arc<Notify>,
    metrics: Arc<Metrics>,
    saved: i64,
    saved_at: Instant,
    /// When this connection last reported the backlog to HQ (`None`: not yet).
    reported_at: Option<Instant>,
}

impl Forwarder {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.set_down();
        loop {
            tokio::select! {
                biased;
                () = self.stop.notified() => break,
                event = self.driver.next() => match event {
                    Ok(event) => self.on_event(event).await,
                    Err(e) => {
                        tracing::error!(error = %e, "uplink: the link to HQ stopped");
                        break;
                    }
                },
                () = self.committed.notified() => self.pump().await,
                _ = tick.tick() => self.on_tick().await,
            }
        }
        if let Err(e) = self.driver.close().await {
            tracing::warn!(error = %e, "uplink: close");
        }
        self.save(true).await;
    }

    async fn on_event(&mut self, event: LinkEvent<i64>) {
        match event {
            LinkEvent::Connecting => {}
            LinkEvent::Connected { .. } => {
                let last = self.with_store(|s| s.last_id()).await.flatten();
                self.delivery.connected(last);
                self.in_flight.clear();
                self.live_topics.clear();
                self.reported_at = None;
                self.metrics.uplink.connected.store(1, Ordering::Relaxed);
                self.metrics
                    .uplink
                    .down_since_ms
                    .store(0, Ordering::Relaxed);
                tracing::info!(
                    cursor = self.delivery.cursor(),
                    backlog_until = last,
                    "uplink: connected to HQ"
                );
                self.pump().await;
            }
            LinkEvent::Subscribed(codes) => {
                if codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                {
                    tracing::error!(
                        "uplink: HQ refused the subscription to this ward's receipts: nothing \
                         forwarded can be confirmed (is the login a relay bound to this ward?)"
                    );
                }
            }
            LinkEvent::Acked(id) => {
                self.delivery.puback(id, Instant::now());
            }
            LinkEvent::Message(publish) => self.on_message(&publish).await,
            LinkEvent::Disconnected { .. } => {
                self.delivery.disconnected();
                self.metrics.uplink.stalled.store(0, Ordering::Relaxed);
                self.in_flight.clear();
                self.set_down();
            }
        }
    }

    fn set_down(&self) {
        let m = &self.metrics.uplink;
        m.connected.store(0, Ordering::Relaxed);
        let _ = m
            .down_since_ms
            .compare_exchange(0, now_ms(), Ordering::Relaxed, Ordering::Relaxed);
    }

    async fn on_message(&mut self, publish: &rumqttc::Publish) {
        let Some(site) = parse_receipt_topic(&publish.topic) else {
            self.came_down(publish).await;
            return;
        };
        let receipt = match Receipt::decode(&publish.payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(topic = %publish.topic, error = %e, "uplink: ignoring an undecodable receipt");
                return;
            }
        };
        self.metrics
            .uplink
            .last_receipt_ms
            .store(now_ms(), Ordering::Relaxed);
        let in_flight = &self.in_flight;
        let mut named = 0u64;
        let moved = self.delivery.receipt(|id| {
            let hit = in_flight
                .get(id)
                .is_some_and(|n| n.site == site && receipt.covers(n.boot, n.seq));
            named += u64::from(hit);
            hit
        });
        self.metrics
            .uplink
            .confirmed
            .fetch_add(named, Ordering::Relaxed);
        if let Some(cursor) = moved {
            self.moved(cursor);
            self.pump().await;
        }
    }

    /// Publishes what HQ sent down into this broker, as it came. Only Renkei topics are taken
    /// (the subscriptions allow nothing else; this is the guard of a link past the guard).
    async fn came_down(&mut self, publish: &rumqttc::Publish) {
        let Ok(topic) = Topic::parse(&publish.topic) else {
            tracing::warn!(topic = %publish.topic, "uplink: ignoring a publish from HQ on no Renkei topic");
            return;
        };
        if let Topic::Site { site, .. } = &topic
            && site.ward == self.ward
        {
            // This ward's own news comes from its own sites, never back from HQ.
            tracing::warn!(topic = %publish.topic, "uplink: ignoring this ward's own message sent back down");
            return;
        }
        match renkei_shared::decode(&publish.payload) {
            Ok(env) => {
                let key = (
                    crate::recorder::origin_key(&env.header.origin),
                    env.header.boot,
                    env.header.seq,
                );
                if !self.seen_down.first_time(&key) {
                    self.metrics
                        .uplink
                        .down_repeated
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            Err(e) => {
                // Passed on all the same: this broker's ingest refuses and quarantines it.
                tracing::warn!(topic = %publish.topic, error = %e, "uplink: HQ sent down an undecodable message");
            }
        }
        let (name, payload, retain) = (
            publish.topic.clone(),
            publish.payload.to_vec(),
            topic.retained(),
        );
        let down = self.down.clone();
        let sent = tokio::task::spawn_blocking(move || {
            down.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .publish(name, payload, retain)
        })
        .await;
        match sent {
            Ok(Ok(())) => {
                self.metrics.uplink.down.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(e)) => tracing::error!(error = %e, "uplink: cannot publish what came down"),
            Err(e) => tracing::error!(error = %e, "uplink: cannot publish what came down"),
        }
    }

    fn moved(&mut self, cursor: i64) {
        self.in_flight = self.in_flight.split_off(&(cursor + 1));
        self.metrics.uplink.cursor.store(cursor, Ordering::Relaxed);
    }

    async fn on_tick(&mut self) {
        let stalled = self
            .delivery
            .oldest_unreceipted()
            .is_some_and(|taken| taken.elapsed() >= STALL_AFTER);
        let was = self
            .metrics
            .uplink
            .stalled
            .swap(u64::from(stalled), Ordering::Relaxed);
        if stalled && was == 0 {
            tracing::error!(
                after_s = STALL_AFTER.as_secs(),
                "uplink: HQ's broker takes this ward's records but HQ stores none: the link \
                 says connected and forwards nothing (HQ's recorder or disk?)"
            );
        } else if !stalled && was == 1 {
            tracing::info!("uplink: HQ stores this ward's records again");
        }
        if let Some(overdue) = self.delivery.check_overdue(Instant::now()) {
            self.metrics.uplink.overdue.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                record = overdue.record,
                unconfirmed = overdue.unconfirmed,
                "uplink: HQ's receipts are overdue: sending again what it has not confirmed"
            );
            self.in_flight.clear();
        }
        self.pump().await;
        self.save(false).await;
        self.report();
    }

    /// Tells HQ this ward's backlog (`renkei/link/v1/{ward}`, retained): at once on each
    /// connection, then every few seconds, so that HQ knows how much is catching up, and
    /// after a cut how much was waiting when it last heard.
    fn report(&mut self) {
        let due = self.reported_at.is_none_or(|at| {
            at.elapsed() >= Duration::from_secs(renkei_shared::line::REPORT_EVERY_S)
        });
        if !due || !self.driver.is_connected() {
            return;
        }
        let report = renkei_shared::line::LineReport {
            backlog: self.metrics.uplink.backlog.load(Ordering::Relaxed),
            stalled: self.metrics.uplink.stalled.load(Ordering::Relaxed) == 1,
            at: Timestamp::now(),
        };
        let Ok(payload) = serde_json::to_vec(&report) else {
            return;
        };
        let out = Outgoing {
            topic: renkei_shared::line::line_topic(self.ward),
            payload,
            retain: true,
        };
        match self.driver.publish_frame(out, None) {
            Ok(()) => self.reported_at = Some(Instant::now()),
            Err(e) => tracing::debug!(error = %e, "uplink: backlog report not queued"),
        }
    }

    /// Forwards what the delivery core offers.
    async fn pump(&mut self) {
        for want in self.delivery.wants() {
            let Some(rows) = self.with_store(move |s| s.read(&want)).await else {
                return;
            };
            let keys: Vec<i64> = rows.iter().map(|r| r.id).collect();
            let sends = self.delivery.offer(&want, &keys, Instant::now());
            let mut rows = rows.into_iter();
            for send in sends {
                let Some(row) = rows.find(|r| r.id == send.key) else {
                    break;
                };
                let retained_topic = Topic::parse(&row.topic).is_ok_and(|t| t.retained());
                let retain = if send.historical {
                    retained_topic && !self.live_topics.contains(&row.topic)
                } else {
                    if retained_topic {
                        self.live_topics.insert(row.topic.clone());
                    }
                    retained_topic
                };
                let out = Outgoing {
                    topic: row.topic,
                    payload: row.payload,
                    retain,
                };
                match self.driver.publish_frame(out, Some(row.id)) {
                    Ok(()) => {
                        self.in_flight.insert(row.id, row.named);
                        self.metrics
                            .uplink
                            .forwarded
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        if !matches!(e, PublishError::Offline) {
                            tracing::debug!(error = %e, "uplink: publish not queued; offered again");
                        }
                        self.delivery.unsent(row.id);
                        return;
                    }
                }
            }
        }
    }

    /// Writes the cursor (at most every [`SAVE_EVERY`] unless `now`) and counts the backlog.
    async fn save(&mut self, now: bool) {
        if !now && self.saved_at.elapsed() < SAVE_EVERY {
            return;
        }
        self.saved_at = Instant::now();
        let cursor = self.delivery.cursor();
        let save = cursor != self.saved;
        let counted = self
            .with_store(move |s| {
                if save {
                    s.save_cursor(cursor)?;
                }
                s.backlog(cursor)
            })
            .await;
        if let Some(backlog) = counted {
            if save {
                self.saved = cursor;
            }
            self.metrics
                .uplink
                .backlog
                .store(backlog, Ordering::Relaxed);
        }
    }

    /// Runs `f` on the store off the async threads; `None` (logged) if it failed.
    async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> rusqlite::Result<T> + Send + 'static,
    ) -> Option<T> {
        let store = self.store.clone();
        let result = tokio::task::spawn_blocking(move || {
            let store = store.lock().unwrap_or_else(PoisonError::into_inner);
            f(&store)
        })
        .await;
        match result {
            Ok(Ok(value)) => Some(value),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "uplink: database");
                None
            }
            Err(e) => {
                tracing::error!(error = %e, "uplink: database task");
                None
            }
        }
    }
}

fn now_ms() -> u64 {
    u64::try_from(Timestamp::now().0).unwrap_or(0)
}
