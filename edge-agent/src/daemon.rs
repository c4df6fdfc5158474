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
//! receipts). PubAcks are matched to records through rumqttc's `Outgoing::Publish(pkid)`
//! events, which come in the order the publishes were queued.
//! rumqttc is polled by the link's `Driver` task, so a tick never cancels a connection attempt,
//! and every attempt carries a freshly numbered will (see [`crate::link`]).
//!
//! The daemon also writes `{state_dir}/status` (atomically) for `renkei-agent status`.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use renkei_shared::{Body, CommandAction, Envelope, Receipt, Timestamp, receipt_topic, topic};
use rumqttc::{AsyncClient, Event, Outgoing, Packet, QoS, SubscribeFilter, SubscribeReasonCode};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, error, info, warn};

use crate::config::Confirm;
use crate::lifecycle::Lifecycle;
use crate::link::{
    Backoff, Driver, LinkError, LinkOptions, LinkState, command_of, connection_hint, last_will,
};
use crate::outbox::{Durability, Key, Outbox, Record};
use crate::report::{FixedSite, Site, frame};

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
/// How long a graceful exit waits for its death and DISCONNECT to be written.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);
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
    /// One entry per publish queued, in order: which record it carries, if any.
    queued: VecDeque<Option<Key>>,
    /// Records by packet id, once rumqttc has written them.
    by_pkid: HashMap<u16, Key>,
    /// The last record handed to rumqttc.
    last_sent: Key,
    /// Records up to here were stored before this connection: backlog.
    backlog_until: Key,
}

struct Daemon {
    client: AsyncClient,
    outbox: Arc<Outbox>,
    lifecycle: Lifecycle,
    site: FixedSite,
    options: DaemonOptions,
    state: LinkState,
    since: renkei_shared::Timestamp,
    /// The birth armed with the will of the current attempt.
    birth: Option<Envelope>,
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

    /// Numbers a fresh birth and will and starts a connection attempt with that will.
    fn arm(&mut self, driver: &Driver) -> Result<(), LinkError> {
        let armed = self.lifecycle.arm(crate::AGENT_VERSION, Timestamp::now());
        driver.connect(last_will(&armed.will)?);
        self.birth = Some(armed.birth);
        self.transition(LinkState::Connecting);
        Ok(())
    }

    /// Queues a publish; `record` names the outbox record it carries.
    fn publish_frame(
        &mut self,
        topic: String,
        retain: bool,
        payload: Vec<u8>,
        record: Option<Key>,
    ) {
        match self
            .client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)
        {
            Ok(()) => self.delivery.queued.push_back(record),
            // The record stays in the outbox and goes on the next connection.
            Err(e) => {
                warn!(error = %e, record = ?record.map(|k| k.to_string()), "publish not queued")
            }
        }
    }

    fn publish_live(&mut self, env: &Envelope) -> Result<(), LinkError> {
        let out = frame(env)?;
        self.publish_frame(out.topic, out.retain, out.payload, None);
        Ok(())
    }

    /// Birth and a snapshot of the site: a fresh status, then the latest shelter and supplies
    /// reports already delivered (those still queued follow as backlog).
    fn announce(&mut self, birth: &Envelope) -> Result<(), LinkError> {
        self.publish_live(birth)?;
        self.refresh_depth();
        let status = self
            .lifecycle
            .stamp(Body::Status(self.site.status()), Timestamp::now());
        self.publish_live(&status)?;
        let latest = self.outbox.lock().map(|l| l.latest()).unwrap_or_default();
        for env in [latest.shelter, latest.supplies].into_iter().flatten() {
            if (Key {
                boot: env.header.boot,
                seq: env.header.seq,
            }) <= self.cursor
            {
                self.publish_live(&env)?;
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
        let stamped = |key| self.lifecycle.envelope(key, body, Timestamp::now());
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
                    if self.state == LinkState::Connected {
                        let status = self
                            .lifecycle
                            .stamp(Body::Status(self.site.status()), Timestamp::now());
                        if let Err(e) = self.publish_live(&status) {
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
        match frame(&env) {
            Ok(out) => {
                self.delivery.in_flight.push_back(key);
                self.publish_frame(out.topic, out.retain, out.payload, Some(key));
            }
            Err(e) => error!(key = %key, error = %e, "outbox record cannot be framed; left queued"),
        }
    }

    fn on_outgoing_publish(&mut self, pkid: u16) {
        if let Some(Some(key)) = self.delivery.queued.pop_front() {
            self.delivery.by_pkid.insert(pkid, key);
        }
    }

    fn on_puback(&mut self, pkid: u16) {
        let Some(key) = self.delivery.by_pkid.remove(&pkid) else {
            return;
        };
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

    fn connected(&mut self) -> Result<Option<Envelope>, LinkError> {
        let Some(birth) = self.birth.take() else {
            // Not possible: the driver connects only with a will armed here.
            warn!("connected without an armed birth; ignored");
            return Ok(None);
        };
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
        info!(
            broker = %self.options.link.broker, boot = self.lifecycle.boot(),
            birth_seq = birth.header.seq, backlog_until = %self.delivery.backlog_until,
            acked = %self.cursor, "connected"
        );
        self.transition(LinkState::Connected);
        // One SUBSCRIBE, before anything is published on this connection, so that no receipt
        // is missed; its SUBACK tells whether HQ lets this agent read its receipts.
        let mut filters = vec![SubscribeFilter::new(
            topic::command_filter(self.lifecycle.site()),
            QoS::AtLeastOnce,
        )];
        if self.options.confirm == Confirm::Receipt {
            filters.push(SubscribeFilter::new(
                receipt_topic(self.lifecycle.site()),
                QoS::AtLeastOnce,
            ));
        }
        if let Err(e) = self.client.try_subscribe_many(filters) {
            warn!(error = %e, "subscriptions not queued");
        }
        self.announce(&birth)?;
        Ok(Some(birth))
    }

    /// Handles a command from HQ; each is acknowledged by what it makes the site publish.
    fn on_publish(
        &mut self,
        publish: &rumqttc::Publish,
        birth: &Envelope,
    ) -> Result<Option<Duration>, LinkError> {
        let Some((command, mode)) = command_of(publish, self.lifecycle.site()) else {
            return Ok(None);
        };
        match command.action {
            CommandAction::Rebirth => {
                info!(command = %command.command_id, mode = ?mode, "command rebirth: acknowledged with birth and snapshot");
                self.announce(birth)?;
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
            self.lifecycle.boot(),
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
    let mut mqtt = options.link.mqtt_options();
    // A full window plus the snapshot must fit rumqttc's in-flight limit.
    mqtt.set_inflight((WINDOW + 8) as u16);
    let (client, mut eventloop) = AsyncClient::new(mqtt, REQUEST_CAPACITY);
    eventloop
        .network_options
        .set_connection_timeout(CONNECT_TIMEOUT_S);
    let mut driver = Driver::spawn(eventloop, REQUEST_CAPACITY);
    let cursor = outbox.lock().and_then(|l| l.acked()).unwrap_or_default();
    let mut daemon = Daemon {
        client,
        rate: Rate::new(options.replay_rate),
        outbox,
        lifecycle,
        site,
        state: LinkState::Connecting,
        since: Timestamp::now(),
        options,
        birth: None,
        delivery: Delivery::default(),
        cursor,
        cursor_dirty: false,
        heartbeats_dropped: 0,
        heartbeat_refused: false,
        last_error: None,
    };
    let mut backoff = Backoff::new(
        Duration::from_secs(1),
        Duration::from_secs(60),
        StdRng::from_os_rng(),
    );
    let mut ticker = tokio::time::interval(daemon.options.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut connection_birth: Option<Envelope> = None;
    // An attempt or a connection is under way: it ends with an error event.
    let mut attempting = false;
    daemon.write_status();

    loop {
        if *shutdown.borrow() {
            break;
        }
        if !attempting {
            daemon.arm(&driver)?;
            attempting = true;
        }
        tokio::select! {
            changed = shutdown.changed() => if changed.is_err() { break },
            // Ticks may win here freely: the driver's poll goes on regardless.
            event = driver.next() => match event.ok_or(LinkError::Stopped)? {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    backoff.reset();
                    connection_birth = daemon.connected()?;
                    daemon.pump();
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => daemon.on_outgoing_publish(pkid),
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    daemon.on_puback(ack.pkid);
                    daemon.pump();
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => daemon.on_suback(&ack.return_codes),
                Ok(Event::Incoming(Packet::Publish(publish))) if publish.topic == receipt_topic(daemon.lifecycle.site()) => {
                    daemon.on_receipt(&publish.payload);
                    daemon.pump();
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    if let Some(birth) = connection_birth.clone()
                        && let Some(interval) = daemon.on_publish(&publish, &birth)?
                    {
                        ticker = tokio::time::interval_at(Instant::now() + interval, interval);
                        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    connection_birth = None;
                    // The broker may have registered this attempt's will (and fire it): the
                    // next attempt is armed afresh, so its birth outranks that will.
                    daemon.birth = None;
                    attempting = false;
                    daemon.connection_lost();
                    daemon.transition(LinkState::Backoff);
                    let delay = backoff.next_delay();
                    warn!(broker = %daemon.options.link.broker, error = %e, hint = connection_hint(&e), retry_in_ms = delay.as_millis() as u64, "connection lost");
                    let sleep = tokio::time::sleep(delay);
                    tokio::pin!(sleep);
                    // Heartbeats go on being stored while the link is down.
                    loop {
                        tokio::select! {
                            _ = &mut sleep => break,
                            _ = ticker.tick() => daemon.heartbeat(),
                            changed = shutdown.changed() => if changed.is_err() || *shutdown.borrow() { break },
                        }
                    }
                }
            },
            _ = ticker.tick() => {
                daemon.heartbeat();
                if connection_birth.is_some() {
                    daemon.pump();
                }
            }
            _ = poll.tick(), if connection_birth.is_some() => {
                daemon.check_receipts();
                daemon.pump();
                daemon.save_cursor();
            }
        }
    }

    daemon.transition(LinkState::Closing);
    if connection_birth.is_some() {
        let death = daemon.lifecycle.death(Timestamp::now());
        daemon.publish_live(&death)?;
        if let Err(e) = daemon.client.try_disconnect() {
            warn!(error = %e, "disconnect not queued");
        }
        // Acks that arrive while closing still move the cursor.
        let closing = async {
            loop {
                match driver.next().await {
                    Some(Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_)) | None => break,
                    Some(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                        daemon.on_outgoing_publish(pkid)
                    }
                    Some(Ok(Event::Incoming(Packet::PubAck(ack)))) => daemon.on_puback(ack.pkid),
                    Some(Ok(Event::Incoming(Packet::Publish(p))))
                        if p.topic == receipt_topic(daemon.lifecycle.site()) =>
                    {
                        daemon.on_receipt(&p.payload)
                    }
                    Some(Ok(_)) => {}
                }
            }
        };
        if tokio::time::timeout(CLOSE_TIMEOUT, closing).await.is_err() {
            warn!("broker did not take the death in time; the will reports it instead");
        }
        info!(death_seq = death.header.seq, "disconnected");
    }
    daemon.save_cursor();
    daemon.write_status();
    Ok(())
}
