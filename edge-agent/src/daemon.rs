//! `renkei-agent run`: one site's session, delivering its outbox.
//!
//! ```text
//!   staff ─ report CLI ─┐                                 ┌─ receipt (HQ stored it) ─▶ cursor
//!   heartbeat timer ────┴▶ outbox (disk) ─▶ pump ─▶ rumqttc ─▶ broker ─▶ recorder (commit)
//!                                            ▲ window, replay rate, historical flag
//!   ConnAck ─▶ birth, snapshot (status + latest shelter/supplies) ─▶ backlog
//! ```
//!
//! Everything staff report and every heartbeat goes through the outbox; only the birth, the
//! snapshot after it and the death are sent live (they describe the connection itself). The
//! pump sends records after the last one handed to rumqttc, at most [`WINDOW`] unconfirmed
//! at once; records stored before the current connection came up are backlog: sent with
//! `historical: true` and at most `replay_rate` per second. rumqttc's own retransmission queue
//! is emptied after every connection loss, so the outbox is the one source of what is resent.
//!
//! A record is confirmed by HQ's receipt (`renkei_shared::receipt`), which the broker publishes
//! once its recorder has committed the message: a PUBACK only says the broker's router took it,
//! and a broker killed before its next commit would lose it. The cursor moves over the
//! confirmed prefix. A record that had its PUBACK but no receipt within [`RECEIPT_TIMEOUT`] is
//! sent again, and so is everything unconfirmed after a reconnect; HQ records each
//! `(boot, seq)` once. With `confirm = "puback"` the PUBACK confirms (a broker without
//! receipts). The connection itself (will, birth, backoff, close) is the link's
//! [`Driver`](crate::link::driver::Driver), which tells the daemon each record's PUBACK.
//!
//! The daemon also writes `{state_dir}/status` (atomically) for `renkei-agent status`.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use renkei_shared::{Body, CommandAction, Receipt, Timestamp, receipt_topic, topic};
use rumqttc::SubscribeReasonCode;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::config::Confirm;
use crate::lifecycle::Lifecycle;
use crate::link::driver::{Driver, DriverOptions, LinkEvent, PublishError};
use crate::link::{LinkError, LinkOptions, LinkState, command_of, timer};
use crate::outbox::{Durability, Key, Outbox, Record};
use crate::report::{FixedSite, Site};

/// Outbox records handed to rumqttc and not yet confirmed, at most. A receipt comes up to one
/// recorder batch (200 ms by default) after the PUBACK, so this allows a few hundred records a
/// second per site.
pub const WINDOW: usize = 64;
/// A record with a PUBACK and no receipt this long after it is sent again.
pub const RECEIPT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the pump looks for records `renkei-agent report` appended.
const POLL: Duration = Duration::from_millis(500);
/// Requests the loop may queue for rumqttc at once: the window plus a snapshot.
const REQUEST_CAPACITY: usize = 64;
/// A connection attempt may take this long on a slow mobile link (TCP + CONNECT).
const CONNECT_TIMEOUT_S: u64 = 20;

/// What `run` needs besides the site.
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    pub link: LinkOptions,
    pub interval: Duration,
    /// Backlog messages per second.
    pub replay_rate: u32,
    /// What confirms a record.
    pub confirm: Confirm,
    /// Where `status` is written.
    pub state_dir: PathBuf,
    /// Told every link state change (the web form shows it).
    pub link_watch: Option<watch::Sender<LinkState>>,
}

/// A token bucket: `rate` per second, bursts of up to one second's worth.
#[derive(Debug)]
struct Rate {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Rate {
    fn new(rate: u32) -> Rate {
        Rate {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            at: Instant::now(),
        }
    }

    fn try_take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate)
            .min(self.rate.max(1.0));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Delivery state of the current connection.
#[derive(Debug, Default)]
struct Delivery {
    /// Outbox records handed to rumqttc, in order, until the cursor passes them.
    in_flight: VecDeque<Key>,
    /// Of those, the confirmed ones.
    confirmed: BTreeSet<Key>,
    /// Of those, the ones with a PUBACK and no receipt yet, with when the PUBACK came.
    pubacked: HashMap<Key, Instant>,
    /// The last record handed to rumqttc.
    last_sent: Key,
    /// Records up to here were stored before this connection: backlog.
    backlog_until: Key,
}

struct Daemon {
    /// The connection; its speaker numbers every message of this boot.
    link: Driver<Lifecycle, Key>,
    outbox: Arc<Outbox>,
    site: FixedSite,
    options: DaemonOptions,
    state: LinkState,
    since: renkei_shared::Timestamp,
    delivery: Delivery,
    rate: Rate,
    /// The cursor as last written to disk.
    cursor: Key,
    cursor_dirty: bool,
    heartbeats_dropped: u64,
    /// The last heartbeat found no room (outbox or disk full): the alarm stands until one fits.
    heartbeat_refused: bool,
    last_error: Option<String>,
}

impl Daemon {
    fn transition(&mut self, to: LinkState) {
        if self.state != to {
            info!(from = ?self.state, to = ?to, "link state");
            self.state = to;
            if let Some(watch) = &self.options.link_watch {
                watch.send_replace(to);
            }
            self.since = Timestamp::now();
            self.write_status();
        }
    }

    fn lifecycle(&mut self) -> &mut Lifecycle {
        self.link.speaker_mut()
    }

    /// A snapshot of the site, after every birth: a fresh status, then the latest shelter and
    /// supplies reports already delivered (those still queued follow as backlog).
    fn snapshot(&mut self) -> Result<(), LinkError> {
        self.refresh_depth();
        let body = Body::Status(self.site.status());
        let status = self.lifecycle().stamp(body, Timestamp::now());
        self.link.publish_live(&status)?;
        let latest = self.outbox.lock().map(|l| l.latest()).unwrap_or_default();
        for env in [latest.shelter, latest.supplies].into_iter().flatten() {
            if (Key {
                boot: env.header.boot,
                seq: env.header.seq,
            }) <= self.cursor
            {
                self.link.publish_live(&env)?;
            }
        }
        Ok(())
    }

    fn refresh_depth(&mut self) {
        match self.outbox.lock().and_then(|mut l| l.stats()) {
            Ok(stats) => {
                self.site.set_queue_depth(stats.depth);
                self.site
                    .set_outbox_alarm(stats.alarming() || self.heartbeat_refused);
            }
            Err(e) => warn!(error = %e, "outbox depth unknown"),
        }
    }

    /// Stores a heartbeat in the outbox (it is sent from there).
    fn heartbeat(&mut self) {
        self.refresh_depth();
        let body = Body::Status(self.site.status());
        let lifecycle = self.link.speaker();
        let stamped = |key| lifecycle.envelope(key, body, Timestamp::now());
        let appended = self
            .outbox
            .lock()
            .and_then(|mut l| l.append(stamped, Durability::Lazy));
        match appended {
            Ok(a) => {
                self.heartbeat_refused = false;
                debug!(key = %a.key, depth = a.depth, "heartbeat stored");
            }
            Err(e) => {
                self.heartbeats_dropped += 1;
                warn!(error = %e, dropped = self.heartbeats_dropped, "heartbeat not stored");
                self.last_error = Some(e.to_string());
                if e.is_full() {
                    self.heartbeat_refused = true;
                    self.site.set_outbox_alarm(true);
                    // The outbox cannot carry this heartbeat, yet HQ must hear the alarm it
                    // raises: sent live while connected (lost if the link drops meanwhile).
                    if self.link.is_connected() {
                        let body = Body::Status(self.site.status());
                        let status = self.lifecycle().stamp(body, Timestamp::now());
                        if let Err(e) = self.link.publish_live(&status) {
                            warn!(error = %e, "live heartbeat not sent");
                        }
                    }
                }
            }
        }
    }

    /// Hands the next outbox records to rumqttc, within the window and the replay rate.
    fn pump(&mut self) {
        let room = WINDOW.saturating_sub(self.delivery.in_flight.len());
        if room == 0 {
            return;
        }
        let records = match self
            .outbox
            .lock()
            .and_then(|mut l| l.read_after(self.delivery.last_sent, room))
        {
            Ok(r) => r,
            Err(e) => {
                error!(error = %e, "cannot read the outbox");
                self.last_error = Some(e.to_string());
                return;
            }
        };
        for record in records {
            let historical = record.key <= self.delivery.backlog_until;
            if historical && !self.rate.try_take() {
                break;
            }
            self.send_record(record, historical);
        }
    }

    fn send_record(&mut self, record: Record, historical: bool) {
        let key = record.key;
        self.delivery.last_sent = key;
        let env = match renkei_shared::decode(&record.frame) {
            Ok(mut env) => {
                env.header.historical = historical;
                env
            }
            Err(e) => {
                // Checked when stored, so this is a schema change across an upgrade: it can
                // never be sent; count it as delivered so it does not block the rest.
                error!(key = %key, error = %e, "outbox record no longer decodes; skipped");
                self.delivery.in_flight.push_back(key);
                self.confirm(key);
                return;
            }
        };
        match self.link.publish(&env, Some(key)) {
            Ok(()) => self.delivery.in_flight.push_back(key),
            Err(PublishError::Frame(e)) => {
                error!(key = %key, error = %e, "outbox record cannot be framed; left queued")
            }
            // The record stays in the outbox and goes on the next connection.
            Err(e) => {
                self.delivery.in_flight.push_back(key);
                warn!(error = %e, record = %key, "publish not queued")
            }
        }
    }

    fn on_puback(&mut self, key: Key) {
        match self.options.confirm {
            Confirm::PubAck => self.confirm(key),
            Confirm::Receipt => {
                if self.delivery.in_flight.contains(&key) && !self.delivery.confirmed.contains(&key)
                {
                    self.delivery.pubacked.insert(key, Instant::now());
                }
            }
        }
    }

    /// A receipt from HQ: confirms the records in flight that it names. Records it names that
    /// are not in flight (sent on an earlier connection) are sent again and confirmed then.
    fn on_receipt(&mut self, payload: &[u8]) {
        let receipt = match Receipt::decode(payload) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "ignoring a receipt that does not decode");
                return;
            }
        };
        let named: Vec<Key> = self
            .delivery
            .in_flight
            .iter()
            .filter(|k| receipt.covers(k.boot, k.seq))
            .copied()
            .collect();
        debug!(named = receipt.count(), confirmed = named.len(), "receipt");
        for key in named {
            self.confirm(key);
        }
    }

    /// The SUBACK of the connection's one SUBSCRIBE: commands, then receipts.
    fn on_suback(&mut self, codes: &[SubscribeReasonCode]) {
        if self.options.confirm == Confirm::Receipt
            && matches!(codes.get(1), Some(SubscribeReasonCode::Failure))
        {
            let e = "HQ refused the receipt subscription: records stay in the outbox and are \
                     sent again (a broker without receipts needs confirm = \"puback\")";
            error!("{e}");
            self.last_error = Some(e.to_owned());
            self.write_status();
        }
    }

    /// Marks a record in flight as delivered and moves the cursor over the confirmed prefix.
    fn confirm(&mut self, key: Key) {
        self.delivery.pubacked.remove(&key);
        self.delivery.confirmed.insert(key);
        while let Some(front) = self.delivery.in_flight.front().copied() {
            if !self.delivery.confirmed.remove(&front) {
                break;
            }
            self.delivery.in_flight.pop_front();
            self.cursor = self.cursor.max(front);
            self.cursor_dirty = true;
        }
        if self.delivery.in_flight.is_empty() {
            self.save_cursor();
        }
    }

    /// Sends again, from the cursor, when a record's receipt is overdue: the broker took it
    /// but HQ did not store it (a recorder that failed, or a broker that lost it).
    fn check_receipts(&mut self) {
        let now = Instant::now();
        let overdue = self
            .delivery
            .pubacked
            .iter()
            .filter(|(_, at)| now.duration_since(**at) >= RECEIPT_TIMEOUT)
            .map(|(key, _)| *key)
            .min();
        let Some(overdue) = overdue else {
            return;
        };
        let unconfirmed =
            (self.delivery.in_flight.len()).saturating_sub(self.delivery.confirmed.len());
        warn!(
            record = %overdue, unconfirmed, timeout_s = RECEIPT_TIMEOUT.as_secs(),
            "no receipt from HQ for a record the broker took; sending again from the cursor"
        );
        self.last_error = Some(format!(
            "no receipt from HQ within {} s for record {overdue}; sent again",
            RECEIPT_TIMEOUT.as_secs()
        ));
        self.delivery.in_flight.clear();
        self.delivery.confirmed.clear();
        self.delivery.pubacked.clear();
        self.delivery.last_sent = self.cursor;
        self.pump();
    }

    fn save_cursor(&mut self) {
        if !self.cursor_dirty {
            return;
        }
        match self
            .outbox
            .lock()
            .and_then(|mut l| l.set_acked(self.cursor))
        {
            Ok(()) => {
                self.cursor_dirty = false;
                debug!(acked = %self.cursor, "delivery cursor saved");
                self.write_status();
            }
            Err(e) => {
                error!(error = %e, "cannot save the delivery cursor; records will be re-sent");
                self.last_error = Some(e.to_string());
            }
        }
    }

    /// Forgets the connection's in-flight state: everything unacknowledged is re-sent from
    /// the outbox on the next connection (the driver drops rumqttc's own queue).
    fn connection_lost(&mut self) {
        self.save_cursor();
        self.delivery = Delivery::default();
    }

    /// A new connection: its subscriptions and birth are queued; the snapshot follows, then
    /// the outbox from the cursor.
    fn connected(&mut self) -> Result<(), LinkError> {
        self.delivery = Delivery {
            last_sent: self.cursor,
            backlog_until: self
                .outbox
                .lock()
                .and_then(|mut l| l.last_key())
                .ok()
                .flatten()
                .unwrap_or_default(),
            ..Delivery::default()
        };
        info!(backlog_until = %self.delivery.backlog_until, acked = %self.cursor, "delivery resumes");
        self.transition(LinkState::Connected);
        self.snapshot()
    }

    /// Handles a command from HQ; each is acknowledged by what it makes the site publish.
    /// Returns the new heartbeat interval, if it changed.
    fn on_command(&mut self, publish: &rumqttc::Publish) -> Result<Option<Duration>, LinkError> {
        let Some((command, mode)) = command_of(publish, self.link.speaker().site()) else {
            return Ok(None);
        };
        match command.action {
            CommandAction::Rebirth => {
                info!(command = %command.command_id, mode = ?mode, "command rebirth: acknowledged with birth and snapshot");
                self.link.rebirth()?;
                self.snapshot()?;
                Ok(None)
            }
            CommandAction::SetInterval { seconds } => {
                let interval = Duration::from_secs(u64::from(seconds));
                info!(command = %command.command_id, mode = ?mode, from_s = self.options.interval.as_secs(), to_s = seconds, "command set interval: acknowledged with a fresh status");
                self.options.interval = interval;
                self.site.set_interval(interval);
                self.heartbeat();
                self.pump();
                Ok(Some(interval))
            }
        }
    }

    /// `{state_dir}/status`, for `renkei-agent status`; written whole and renamed into place.
    fn write_status(&self) {
        let link = match self.state {
            LinkState::Connecting => "connecting",
            LinkState::Connected => "connected",
            LinkState::Backoff => "offline (retrying)",
            LinkState::Closing => "stopped",
        };
        let mut text = format!(
            "link = {link:?}\nsince_ms = {}\nbroker = {:?}\nboot = {}\nacked = {:?}\n\
             heartbeats_dropped = {}\npid = {}\nupdated_ms = {}\n",
            self.since.0,
            self.options.link.broker.to_string(),
            self.link.speaker().boot(),
            self.cursor.to_string(),
            self.heartbeats_dropped,
            std::process::id(),
            Timestamp::now().0,
        );
        if let Some(e) = &self.last_error {
            text.push_str(&format!("last_error = {e:?}\n"));
        }
        let path = self.options.state_dir.join("status");
        let tmp = self.options.state_dir.join("status.tmp");
        if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &path)) {
            debug!(error = %e, "status file not written");
        }
    }
}

/// Runs the site's session until `shutdown` turns true, then sends its death and disconnects.
pub async fn run_daemon(
    options: DaemonOptions,
    outbox: Arc<Outbox>,
    lifecycle: Lifecycle,
    site: FixedSite,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), LinkError> {
    // One SUBSCRIBE before the birth, so that no receipt is missed; its SUBACK tells whether
    // HQ lets this agent read its receipts.
    let mut subscriptions = vec![topic::command_filter(lifecycle.site())];
    if options.confirm == Confirm::Receipt {
        subscriptions.push(receipt_topic(lifecycle.site()));
    }
    let driver_options = DriverOptions {
        subscriptions,
        // A full window plus the snapshot must fit rumqttc's in-flight limit.
        inflight: Some((WINDOW + 8) as u16),
        connect_timeout: Some(Duration::from_secs(CONNECT_TIMEOUT_S)),
        request_capacity: REQUEST_CAPACITY,
    };
    let receipts = receipt_topic(lifecycle.site());
    let link = Driver::spawn(&options.link, driver_options, lifecycle);
    let cursor = outbox.lock().and_then(|l| l.acked()).unwrap_or_default();
    let mut daemon = Daemon {
        link,
        rate: Rate::new(options.replay_rate),
        outbox,
        site,
        state: LinkState::Connecting,
        since: Timestamp::now(),
        options,
        delivery: Delivery::default(),
        cursor,
        cursor_dirty: false,
        heartbeats_dropped: 0,
        heartbeat_refused: false,
        last_error: None,
    };
    let mut ticker = timer(Instant::now(), daemon.options.interval);
    let mut poll = timer(Instant::now(), POLL);
    daemon.write_status();

    loop {
        if *shutdown.borrow() {
            break;
        }
        tokio::select! {
            changed = shutdown.changed() => if changed.is_err() { break },
            // Ticks may win here freely: the driver's poll goes on regardless.
            event = daemon.link.next() => match event? {
                LinkEvent::Connecting => daemon.transition(LinkState::Connecting),
                LinkEvent::Connected { .. } => {
                    daemon.connected()?;
                    daemon.pump();
                }
                LinkEvent::Acked(key) => {
                    daemon.on_puback(key);
                    daemon.pump();
                }
                LinkEvent::Subscribed(codes) => daemon.on_suback(&codes),
                LinkEvent::Message(publish) if publish.topic == receipts => {
                    daemon.on_receipt(&publish.payload);
                    daemon.pump();
                }
                LinkEvent::Message(publish) => {
                    if let Some(interval) = daemon.on_command(&publish)? {
                        ticker = timer(Instant::now() + interval, interval);
                    }
                }
                LinkEvent::Disconnected { .. } => {
                    daemon.connection_lost();
                    daemon.transition(LinkState::Backoff);
                }
            },
            // Heartbeats go on being stored while the link is down.
            _ = ticker.tick() => {
                daemon.heartbeat();
                if daemon.link.is_connected() {
                    daemon.pump();
                }
            }
            _ = poll.tick(), if daemon.link.is_connected() => {
                daemon.check_receipts();
                daemon.pump();
                daemon.save_cursor();
            }
        }
    }

    daemon.transition(LinkState::Closing);
    // Acks and receipts that arrive while closing still move the cursor.
    for event in daemon.link.close().await? {
        match event {
            LinkEvent::Acked(key) => daemon.on_puback(key),
            LinkEvent::Message(publish) if publish.topic == receipts => {
                daemon.on_receipt(&publish.payload)
            }
            _ => {}
        }
    }
    daemon.save_cursor();
    daemon.write_status();
    Ok(())
}
