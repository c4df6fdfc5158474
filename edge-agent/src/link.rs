//! One site's MQTT session (rumqttc): last will, birth and full state on every ConnAck,
//! heartbeats on a timer, commands from HQ, reconnects with backoff, and a graceful death.
//!
//! ```text
//!            ┌──────────── poll error: sleep (backoff + jitter) ───────────┐
//!            ▼                                                             │
//!   Connecting ── ConnAck ─▶ Connected ── network error ──────────────────▶┘
//!   (will armed)             birth, full state, heartbeats, commands
//!            └────────── SIGTERM / SIGINT ─▶ Closing: death, DISCONNECT
//! ```
//!
//! Before every connection attempt the will is re-armed with fresh sequence numbers (see
//! [`crate::lifecycle`]): rumqttc reconnects with the options it holds, which are public on its
//! `EventLoop` for exactly this. Any attempt may have had its will registered by the broker (a
//! timeout or reset after CONNECT), and a registered will fires when that connection goes, so
//! the next birth must come after it. The rumqttc event loop runs in a task of its own
//! (`Driver`), never cancelled mid-connect; the session loop gets its events over a channel
//! and publishes with `try_publish`, so it never waits on rumqttc's request channel. While
//! disconnected, heartbeats are skipped rather than queued: without an outbox they would be
//! stale on arrival, and the full state follows every birth.

use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use renkei_shared::codec::MAX_FRAME;
use renkei_shared::{Body, CommandAction, Envelope, Timestamp, topic};
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Packet, QoS,
    TlsConfiguration, Transport,
};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{debug, info, warn};

use crate::config::{BrokerAddr, Credentials};
use crate::lifecycle::Lifecycle;
use crate::report::{FrameError, Site, frame};

/// Keep-alive: short enough that a dead link is noticed (and the will fired) within a minute
/// or so, long enough not to load thin mobile links with pings.
pub const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Requests the loop may queue for rumqttc at once: a full state is a handful of messages.
const REQUEST_CAPACITY: usize = 64;
/// How long a graceful exit waits for its death and DISCONNECT to be written.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// How to reach the broker.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    pub broker: BrokerAddr,
    pub credentials: Option<Credentials>,
    /// The MQTT client id: stable per site, so the broker resumes the session.
    pub client_id: String,
    /// For an `mqtts://` broker: whom to trust (see [`crate::tls`]).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl LinkOptions {
    /// The client id of a site's agent: `agent-{ward}-{site}`.
    pub fn client_id(site: &renkei_shared::SiteRef) -> String {
        format!("agent-{}-{}", site.ward, site.site)
    }

    pub(crate) fn mqtt_options(&self) -> MqttOptions {
        let mut mqtt = MqttOptions::new(&self.client_id, &self.broker.host, self.broker.port);
        mqtt.set_keep_alive(KEEP_ALIVE)
            // A persistent session: commands HQ sent while the link was down are delivered.
            .set_clean_session(false)
            .set_max_packet_size(MAX_FRAME + 1024, MAX_FRAME + 1024);
        if let Some(c) = &self.credentials {
            mqtt.set_credentials(&c.username, &c.password);
        }
        if let Some(tls) = &self.tls {
            mqtt.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                tls.clone(),
            )));
        }
        mqtt
    }
}

/// A hint for the log when a connection fails in a way a person must fix at the site.
pub fn connection_hint(error: &ConnectionError) -> Option<&'static str> {
    match error {
        ConnectionError::Tls(_) => Some(
            "TLS handshake failed: check that ca_file holds the CA that signed the broker's \
             certificate and that the broker's name matches the certificate",
        ),
        ConnectionError::ConnectionRefused(_) => {
            Some("the broker refused the connection: check username and password")
        }
        _ => None,
    }
}

/// Why a session ended other than by shutdown.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// One of the site's own messages could not be framed: a bug, or a setting beyond the
    /// protocol's limits. Retrying would fail the same way.
    #[error("cannot frame a message of this site: {0}")]
    Frame(#[from] FrameError),
    /// The task polling rumqttc ended (it panicked): nothing more can be sent or received.
    #[error("the MQTT event loop task stopped")]
    Stopped,
}

/// What the session loop receives from rumqttc.
pub(crate) type LinkEvent = Result<Event, ConnectionError>;

/// rumqttc's event loop, polled by a task of its own.
///
/// `EventLoop::poll` is not cancel-safe while it connects: a poll dropped in a `select!` after
/// the broker took the CONNECT drops that connection, and the broker fires its will. Here every
/// attempt runs to its ConnAck or its error. An attempt starts only on [`Driver::connect`],
/// with the will armed for it, and its events end with exactly one error, so the session
/// re-arms (fresh numbers) before each attempt.
pub(crate) struct Driver {
    connect: mpsc::UnboundedSender<LastWill>,
    events: mpsc::Receiver<LinkEvent>,
    task: JoinHandle<()>,
}

impl Driver {
    /// Starts polling `eventloop` (idle until the first [`Driver::connect`]).
    pub(crate) fn spawn(eventloop: EventLoop, capacity: usize) -> Driver {
        let (connect, wills) = mpsc::unbounded_channel();
        let (tx, events) = mpsc::channel(capacity);
        let task = tokio::spawn(drive(eventloop, wills, tx));
        Driver {
            connect,
            events,
            task,
        }
    }

    /// Starts a connection attempt with `will` as its last will. Call again only after the
    /// previous attempt's error.
    pub(crate) fn connect(&self, will: LastWill) {
        // A send fails only if the task is gone; `next` then says so.
        let _ = self.connect.send(will);
    }

    /// The next event; `None` once the task has stopped.
    pub(crate) async fn next(&mut self) -> Option<LinkEvent> {
        self.events.recv().await
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn drive(
    mut eventloop: EventLoop,
    mut wills: mpsc::UnboundedReceiver<LastWill>,
    events: mpsc::Sender<LinkEvent>,
) {
    while let Some(will) = wills.recv().await {
        // Requests queued after the last connection failed belong to it (the session re-sends
        // what matters after the birth); sent first on the new one, they would precede it.
        eventloop.clean();
        eventloop.pending.clear();
        eventloop.mqtt_options.set_last_will(will);
        loop {
            let event = eventloop.poll().await;
            let lost = event.is_err();
            if matches!(event, Ok(Event::Incoming(Packet::ConnAck(_)))) {
                // rumqttc would retransmit the previous session's unacknowledged publishes
                // ahead of the birth; the session re-sends what matters itself.
                eventloop.pending.clear();
            }
            if events.send(event).await.is_err() {
                return;
            }
            if lost {
                break;
            }
        }
    }
}

/// `will` as rumqttc's last will (QoS 1, retained as framed).
pub(crate) fn last_will(will: &Envelope) -> Result<LastWill, LinkError> {
    let will = frame(will)?;
    Ok(LastWill::new(
        will.topic,
        will.payload,
        QoS::AtLeastOnce,
        will.retain,
    ))
}

/// Where the session stands; transitions are logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Will armed, waiting for the ConnAck.
    Connecting,
    /// Birth and full state sent; heartbeats run.
    Connected,
    /// The connection failed; waiting before the next attempt.
    Backoff,
    /// Shutting down: death sent, disconnecting.
    Closing,
}

/// Exponential backoff with "equal jitter": half the step fixed, half random, so that
/// thousands of agents reconnecting after an outage spread out instead of arriving together.
#[derive(Debug)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    failures: u32,
    rng: StdRng,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration, rng: StdRng) -> Backoff {
        Backoff {
            first,
            max,
            failures: 0,
            rng,
        }
    }

    /// The wait before the next attempt, growing with every failure since the last success.
    pub fn next_delay(&mut self) -> Duration {
        let step = self
            .first
            .saturating_mul(1u32 << self.failures.min(16))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        let half = step / 2;
        half + half.mul_f64(self.rng.random::<f64>())
    }

    /// A connection succeeded.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// What the session loop needs besides the network: the site, its numbers, its timer.
struct Session<S> {
    client: AsyncClient,
    lifecycle: Lifecycle,
    site: S,
    interval: Duration,
    state: LinkState,
    /// The birth of the current connection attempt, armed with its will.
    birth: Option<Envelope>,
    /// Messages rumqttc refused because its request channel was full.
    dropped: u64,
}

impl<S: Site> Session<S> {
    fn transition(&mut self, to: LinkState) {
        if self.state != to {
            debug!(from = ?self.state, to = ?to, "link state");
            self.state = to;
        }
    }

    /// Numbers the next connection's birth and will, and starts an attempt with that will.
    fn arm(&mut self, driver: &Driver) -> Result<(), LinkError> {
        let armed = self.lifecycle.arm(crate::AGENT_VERSION, Timestamp::now());
        driver.connect(last_will(&armed.will)?);
        self.birth = Some(armed.birth);
        self.transition(LinkState::Connecting);
        Ok(())
    }

    fn publish(&mut self, env: &Envelope) -> Result<(), LinkError> {
        let out = frame(env)?;
        if let Err(e) =
            self.client
                .try_publish(out.topic, QoS::AtLeastOnce, out.retain, out.payload)
        {
            self.dropped += 1;
            warn!(kind = env.body.kind().as_str(), seq = env.header.seq, dropped = self.dropped, error = %e, "message not queued");
        }
        Ok(())
    }

    fn send(&mut self, bodies: Vec<Body>) -> Result<(), LinkError> {
        for body in bodies {
            let env = self.lifecycle.stamp(body, Timestamp::now());
            self.publish(&env)?;
        }
        Ok(())
    }

    /// Birth (the one armed with this connection's will) and the full state.
    fn announce(&mut self, birth: &Envelope) -> Result<(), LinkError> {
        self.publish(birth)?;
        let bodies = self.site.full_state(Timestamp::now());
        self.send(bodies)
    }

    /// Handles a publish from the broker; anything malformed is logged and dropped.
    fn on_publish(
        &mut self,
        publish: &rumqttc::Publish,
        connection_birth: &Envelope,
    ) -> Result<Option<Duration>, LinkError> {
        let Some((command, mode)) = command_of(publish, self.lifecycle.site()) else {
            return Ok(None);
        };
        let env_mode = mode;
        match command.action {
            CommandAction::Rebirth => {
                info!(command = %command.command_id, mode = ?env_mode, "rebirth requested");
                // The same birth again (a duplicate to HQ), so the armed will still outranks it.
                self.announce(connection_birth)?;
                Ok(None)
            }
            CommandAction::SetInterval { seconds } => {
                let interval = Duration::from_secs(u64::from(seconds));
                info!(command = %command.command_id, mode = ?env_mode, from_s = self.interval.as_secs(), to_s = seconds, "heartbeat interval changed");
                self.interval = interval;
                self.site.set_interval(interval);
                Ok(Some(interval))
            }
        }
    }
}

/// The command in a publish from the broker, with its mode, if it is a valid command from HQ
/// for `site`; anything else is logged and dropped.
pub(crate) fn command_of(
    publish: &rumqttc::Publish,
    site: &renkei_shared::SiteRef,
) -> Option<(renkei_shared::Command, renkei_shared::Mode)> {
    let own_topic = topic::command_filter(site);
    if publish.topic != own_topic {
        debug!(topic = %publish.topic, "ignoring a publish not for this site");
        return None;
    }
    let env = match renkei_shared::receive(publish.topic.as_bytes(), &publish.payload) {
        Ok((_, env)) => env,
        Err(e) => {
            warn!(reason = e.reason(), error = %e, "ignoring an undecodable command, or one on the wrong topic");
            return None;
        }
    };
    if !matches!(env.header.origin, renkei_shared::Origin::Hq(_)) {
        warn!(origin = ?env.header.origin, "ignoring a command not from HQ");
        return None;
    }
    let Body::Command(command) = env.body else {
        warn!(
            kind = env.body.kind().as_str(),
            "ignoring a non-command on the command topic"
        );
        return None;
    };
    Some((command, env.header.mode))
}

/// Runs one site's session until `shutdown` turns true, then sends its death and disconnects.
///
/// Network errors never end it: it reconnects with backoff. It ends early only with a
/// [`LinkError`], which retrying could not fix.
pub async fn run_site<S: Site>(
    options: LinkOptions,
    lifecycle: Lifecycle,
    site: S,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), LinkError> {
    let (client, eventloop) = AsyncClient::new(options.mqtt_options(), REQUEST_CAPACITY);
    let mut driver = Driver::spawn(eventloop, REQUEST_CAPACITY);
    let mut session = Session {
        client,
        lifecycle,
        site,
        interval,
        state: LinkState::Connecting,
        birth: None,
        dropped: 0,
    };
    let mut backoff = Backoff::new(
        Duration::from_secs(1),
        Duration::from_secs(60),
        StdRng::from_os_rng(),
    );
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The birth that this connection's will answers; `Some` while connected.
    let mut connection_birth: Option<Envelope> = None;
    // An attempt or a connection is under way: it ends with an error event.
    let mut attempting = false;

    loop {
        if *shutdown.borrow() {
            break;
        }
        if !attempting {
            session.arm(&driver)?;
            attempting = true;
        }
        tokio::select! {
            // A dropped sender counts as shutdown, or `changed` would return at once forever.
            changed = shutdown.changed() => if changed.is_err() { break },
            event = driver.next() => match event.ok_or(LinkError::Stopped)? {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff.reset();
                    let Some(birth) = session.birth.take() else {
                        // Not possible: the driver connects only with a will armed here.
                        warn!("connected without an armed birth; ignored");
                        continue;
                    };
                    info!(broker = %options.broker, boot = session.lifecycle.boot(), birth_seq = birth.header.seq, session_present = ack.session_present, "connected");
                    session.transition(LinkState::Connected);
                    if let Err(e) = session.client.try_subscribe(topic::command_filter(session.lifecycle.site()), QoS::AtLeastOnce) {
                        warn!(error = %e, "command subscription not queued");
                    }
                    session.announce(&birth)?;
                    connection_birth = Some(birth);
                    ticker.reset();
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    if let Some(birth) = connection_birth.clone()
                        && let Some(interval) = session.on_publish(&publish, &birth)?
                    {
                        ticker = tokio::time::interval_at(Instant::now() + interval, interval);
                        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    connection_birth = None;
                    // The next attempt gets a will numbered after everything sent so far,
                    // including this attempt's will, which the broker may have registered.
                    session.birth = None;
                    attempting = false;
                    session.transition(LinkState::Backoff);
                    let delay = backoff.next_delay();
                    warn!(broker = %options.broker, error = %e, hint = connection_hint(&e), retry_in_ms = delay.as_millis() as u64, "connection lost");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        changed = shutdown.changed() => if changed.is_err() { break },
                    }
                }
            },
            _ = ticker.tick(), if connection_birth.is_some() => {
                let bodies = session.site.tick(Timestamp::now());
                session.send(bodies)?;
            }
        }
    }

    session.transition(LinkState::Closing);
    if connection_birth.is_some() {
        let death = session.lifecycle.death(Timestamp::now());
        session.publish(&death)?;
        if let Err(e) = session.client.try_disconnect() {
            warn!(error = %e, "disconnect not queued");
        }
        // Requests are written in order, so the death reaches the broker before DISCONNECT
        // (which makes it discard the will).
        let closing = async {
            loop {
                match driver.next().await {
                    Some(Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_)) | None => {
                        break;
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_up_to_its_cap_and_resets() {
        let mut b = Backoff::new(
            Duration::from_secs(1),
            Duration::from_secs(60),
            StdRng::seed_from_u64(7),
        );
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        for (i, d) in delays.iter().enumerate() {
            let step = Duration::from_secs(1 << i.min(6)).min(Duration::from_secs(60));
            assert!(
                *d >= step / 2 && *d <= step,
                "attempt {i}: {d:?} for step {step:?}"
            );
        }
        assert!(delays[9] >= Duration::from_secs(30));
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
    }

    #[test]
    fn jitter_spreads_agents_with_different_seeds() {
        let first: Vec<Duration> = (0..20)
            .map(|seed| {
                let mut b = Backoff::new(
                    Duration::from_secs(8),
                    Duration::from_secs(60),
                    StdRng::seed_from_u64(seed),
                );
                b.next_delay()
            })
            .collect();
        let distinct: std::collections::BTreeSet<_> = first.iter().collect();
        assert!(distinct.len() > 15);
    }

    #[test]
    fn client_id_names_ward_and_site() {
        assert_eq!(
            LinkOptions::client_id(&renkei_shared::sample::site()),
            "agent-131041-nishi-shinjuku-es"
        );
    }
}
