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
//! snapshot after it and the death are sent live (they describe the connection itself).
//!
//! The daemon is glue between three pieces:
//! - the link's [`Driver`] (will, birth, backoff, close), which tells it each record's PUBACK;
//! - the [`Delivery`] core, which decides which records go out (in order, at most
//!   [`WINDOW`] unconfirmed, backlog marked historical and paced
//!   at `replay_rate`) and when one is confirmed: by HQ's receipt (`renkei_shared::receipt`),
//!   sent once HQ's recorder has committed the message, or with `confirm = "puback"` by the
//!   PUBACK; it sends again whatever a lost connection or an overdue receipt left unconfirmed;
//! - the [`Outbox`], which holds the records and the cursor the core moves.
//!
//! The daemon also writes `{state_dir}/status` (atomically) for `renkei-agent status`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use renkei_shared::{Body, CommandAction, Receipt, Timestamp, receipt_topic, topic};
use rumqttc::SubscribeReasonCode;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::config::Confirm;
use crate::keys::Key;
use crate::lifecycle::Lifecycle;
use crate::link::delivery::{Delivery, Order, RECEIPT_TIMEOUT, WINDOW};
use crate::link::driver::{Driver, DriverOptions, LinkEvent, PublishError};
use crate::link::{Answered, LinkError, LinkOptions, LinkState, command_of, timer};
use crate::outbox::{Durability, Outbox, Record};
use crate::report::{FixedSite, Site};
use crate::status::Status;

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
    /// Failed over to when `link`'s broker does not answer (HQ's, for a ward office's).
    pub fallback: Option<LinkOptions>,
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

struct Daemon {
    /// The connection; its speaker numbers every message of this boot.
    link: Driver<Lifecycle, Key>,
    outbox: Arc<Outbox>,
    site: FixedSite,
    options: DaemonOptions,
    state: LinkState,
    since: renkei_shared::Timestamp,
    delivery: Delivery,
    /// The cursor as last written to the outbox.
    saved: Key,
    heartbeats_dropped: u64,
    /// The last heartbeat found no room (outbox or disk full): the alarm stands until one fits.
    heartbeat_refused: bool,
    last_error: Option<String>,
    /// HQ's commands answered this run.
    answered: Answered,
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
            }) <= self.delivery.cursor()
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

    /// Hands the outbox records the delivery core offers to the link.
    fn pump(&mut self) {
        // An in-order core asks for one read at most.
        let Some(want) = self.delivery.wants().first().copied() else {
            return;
        };
        let records = match self
            .outbox
            .lock()
            .and_then(|mut l| l.read_after(want.after, want.limit))
        {
            Ok(r) => r,
            Err(e) => {
                error!(error = %e, "cannot read the outbox");
                self.last_error = Some(e.to_string());
                return;
            }
        };
        let keys: Vec<Key> = records.iter().map(|r| r.key).collect();
        let sends = self.delivery.offer(&want, &keys, std::time::Instant::now());
        let mut records = records.into_iter();
        for send in sends {
            let Some(record) = records.find(|r| r.key == send.key) else {
                break;
            };
            if !self.send_record(record, send.historical) {
                break;
            }
        }
    }

    /// Publishes one offered record; false if the link did not take it (nor will it take
    /// the next ones now).
    fn send_record(&mut self, record: Record, historical: bool) -> bool {
        let key = record.key;
        let env = match renkei_shared::decode(&record.frame) {
            Ok(mut env) => {
                env.header.historical = historical;
                env
            }
            Err(e) => {
                // Checked when stored, so this is a schema change across an upgrade: it can
                // never be sent; count it as delivered so it does not block the rest.
                error!(key = %key, error = %e, "outbox record no longer decodes; skipped");
                let moved = self.delivery.abandon(key);
                self.retired(moved);
                return true;
            }
        };
        match self.link.publish(&env, Some(key)) {
            Ok(()) => true,
            Err(PublishError::Frame(e)) => {
                // It decoded, so it cannot grow past the frame limit: like a record that no
                // longer decodes, it can never be sent.
                error!(key = %key, error = %e, "outbox record cannot be framed; skipped");
                let moved = self.delivery.abandon(key);
                self.retired(moved);
                true
            }
            // The record goes again at the next pump.
            Err(e) => {
                warn!(error = %e, record = %key, "publish not queued");
                self.delivery.unsent(key);
                false
            }
        }
    }

    fn on_puback(&mut self, key: Key) {
        let moved = self.delivery.puback(key, std::time::Instant::now());
        self.retired(moved);
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
        let moved = self
            .delivery
            .receipt(|key| receipt.covers(key.boot, key.seq));
        debug!(named = receipt.count(), cursor = %self.delivery.cursor(), "receipt");
        self.retired(moved);
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

    /// The core moved the cursor (if `moved`): saved at once when nothing is left in flight,
    /// else on the next poll, so that a busy window does not sync the disk per record.
    fn retired(&mut self, moved: Option<Key>) {
        if moved.is_some() && self.delivery.in_flight() == 0 {
            self.save_cursor();
        }
    }

    /// Sends again, from the cursor, when a record's receipt is overdue: the broker took it
    /// but HQ did not store it (a recorder that failed, or a broker that lost it).
    fn check_receipts(&mut self) {
        let Some(overdue) = self.delivery.check_overdue(std::time::Instant::now()) else {
            return;
        };
        warn!(
            record = %overdue.record, unconfirmed = overdue.unconfirmed,
            timeout_s = RECEIPT_TIMEOUT.as_secs(),
            "no receipt from HQ for a record the broker took; sending again from the cursor"
        );
        self.last_error = Some(format!(
            "no receipt from HQ within {} s for record {}; sent again",
            RECEIPT_TIMEOUT.as_secs(),
            overdue.record
        ));
        self.pump();
    }

    /// Writes the core's cursor to the outbox, which then drops what it has delivered.
    fn save_cursor(&mut self) {
        let cursor = self.delivery.cursor();
        if cursor <= self.saved {
            return;
        }
        match self.outbox.lock().and_then(|mut l| l.set_acked(cursor)) {
            Ok(()) => {
                self.saved = cursor;
                debug!(acked = %cursor, "delivery cursor saved");
                self.write_status();
            }
            Err(e) => {
                error!(error = %e, "cannot save the delivery cursor; records will be re-sent");
                self.last_error = Some(e.to_string());
            }
        }
    }

    /// Forgets the connection's in-flight state: everything unconfirmed is sent again from
    /// the outbox on the next connection (the driver drops rumqttc's own queue).
    fn connection_lost(&mut self) {
        self.save_cursor();
        self.delivery.disconnected();
    }

    /// A new connection: its subscriptions and birth are queued; the snapshot follows, then
    /// the outbox from the cursor.
    fn connected(&mut self) -> Result<(), LinkError> {
        let last_stored = self
            .outbox
            .lock()
            .and_then(|mut l| l.last_key())
            .ok()
            .flatten();
        self.delivery.connected(last_stored);
        info!(backlog_until = %last_stored.unwrap_or_default(), acked = %self.delivery.cursor(), "delivery resumes");
        self.transition(LinkState::Connected);
        self.snapshot()
    }

    /// Handles a command from HQ: carried out once unless it expired on its way, and
    /// answered either way with a result stored in the outbox like any report, so that HQ
    /// learns what became of it. Returns the new heartbeat interval, if it changed.
    fn on_command(&mut self, publish: &rumqttc::Publish) -> Result<Option<Duration>, LinkError> {
        let site = self.link.speaker().site().clone();
        let Some(arrived) = command_of(publish, &site, &mut self.answered, Timestamp::now()) else {
            return Ok(None);
        };
        let command = &arrived.command;
        let mut interval = None;
        if arrived.carry_out() {
            match command.action {
                CommandAction::Rebirth => {
                    info!(command = %command.command_id, mode = ?arrived.mode, "command rebirth: answered with birth and snapshot");
                    self.link.rebirth()?;
                    self.snapshot()?;
                }
                CommandAction::SetInterval { seconds } => {
                    let to = Duration::from_secs(u64::from(seconds));
                    info!(command = %command.command_id, mode = ?arrived.mode, from_s = self.options.interval.as_secs(), to_s = seconds, "command set interval: answered with a fresh status");
                    self.options.interval = to;
                    self.site.set_interval(to);
                    self.heartbeat();
                    interval = Some(to);
                }
            }
        }
        self.store(Body::CommandResult(arrived.result), Durability::Sync);
        self.pump();
        Ok(interval)
    }

    /// Stores one report of the site's in the outbox (it is sent from there).
    fn store(&mut self, body: Body, durability: Durability) {
        let lifecycle = self.link.speaker();
        let stamped = |key| lifecycle.envelope(key, body, Timestamp::now());
        let appended = self
            .outbox
            .lock()
            .and_then(|mut l| l.append(stamped, durability));
        if let Err(e) = appended {
            warn!(error = %e, "report not stored");
            self.last_error = Some(e.to_string());
        }
    }

    /// `{state_dir}/status`, for `renkei-agent status`.
    fn write_status(&self) {
        let status = Status {
            link: self.state.into(),
            since_ms: self.since.0,
            broker: self.options.link.broker.to_string(),
            boot: self.link.speaker().boot(),
            acked: self.delivery.cursor().to_string(),
            heartbeats_dropped: self.heartbeats_dropped,
            pid: std::process::id(),
            updated_ms: Timestamp::now().0,
            last_error: self.last_error.clone(),
        };
        if let Err(e) = status.write(&self.options.state_dir) {
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
        fallback: options.fallback.clone(),
        ..DriverOptions::default()
    };
    let receipts = receipt_topic(lifecycle.site());
    let link = Driver::spawn(&options.link, driver_options, lifecycle);
    let cursor = outbox.lock().and_then(|l| l.acked()).unwrap_or_default();
    let mut daemon = Daemon {
        link,
        delivery: Delivery::new(
            options.confirm,
            Order::InOrder,
            WINDOW,
            cursor,
            options.replay_rate,
            std::time::Instant::now(),
        ),
        saved: cursor,
        outbox,
        site,
        state: LinkState::Connecting,
        since: Timestamp::now(),
        options,
        heartbeats_dropped: 0,
        heartbeat_refused: false,
        last_error: None,
        answered: crate::link::answered(),
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
