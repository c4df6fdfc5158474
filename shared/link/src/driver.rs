//! The link driver: one MQTT connection to a broker, kept up for its user.
//!
//! ```text
//!        ┌─────────────────── error: Disconnected, wait (backoff + jitter) ───────────────┐
//!        ▼                                                                                │
//!   Connecting ── ConnAck ─▶ Connected: SUBSCRIBE, birth; the user's publishes, acks, ────┘
//!   (will armed)             messages
//!        └────────────── close(): death, DISCONNECT ─▶ Closing
//! ```
//!
//! The driver owns rumqttc's event loop, the last will of every attempt, the birth of every
//! connection, the backoff between attempts and the graceful close. Its user (the agent's
//! daemon, each simulated site, a ward's uplink) calls [`Driver::next`] for typed
//! [`LinkEvent`]s and publishes with [`Driver::publish`], tagging a publish to be told of its
//! PUBACK.
//!
//! The rules it keeps, and why:
//! - **A fresh will before every attempt** ([`Speaker::arm`]): the broker may have registered
//!   the will of any attempt (a timeout or reset after CONNECT) and fires it when that
//!   connection goes, so the next birth must be numbered after it. rumqttc reconnects with the
//!   options it holds, which are public on its `EventLoop` for exactly this.
//! - **The event loop runs in a task of its own**, never cancelled: `EventLoop::poll` is not
//!   cancel-safe while it connects (a poll dropped after the broker took the CONNECT drops the
//!   connection, and the broker fires the will). Every attempt runs to its ConnAck or its
//!   error, and its events end with exactly one error.
//! - **Nothing of an earlier connection is sent on a new one**: requests queued while down and
//!   rumqttc's retransmissions of the previous session are dropped, because they would precede
//!   the birth. The user re-sends what matters from its own store after [`LinkEvent::Connected`].
//!   For the same reason [`Driver::publish`] refuses while not connected.
//! - **PUBACKs are matched to tags** through rumqttc's `Outgoing::Publish(pkid)` events, which
//!   come in the order the publishes were queued.
//! - **[`Driver::next`] is cancel-safe**, so the user may `select!` it against its timers: the
//!   event channel is, and a backoff wait keeps its deadline across calls.
//! - **Failover** ([`DriverOptions::fallback`]): a site configured with its ward's broker and
//!   HQ's tries the ward's; after [`DriverOptions::fail_over_after`] failed attempts in a row
//!   it tries HQ's, and after as many there the ward's again. Connected to the fallback, it
//!   looks every [`DriverOptions::fail_back_every`] whether the primary answers a TCP connect;
//!   if it does, it disconnects (gracefully: no will) and connects to the primary. Its user
//!   sees an ordinary reconnection ([`LinkEvent::Connected`] names the broker) and sends
//!   everything unconfirmed again; each broker keeps one copy of each message.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use renkei_shared::{Envelope, Timestamp};
use rumqttc::{
    AsyncClient, ClientError, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing,
    Packet, QoS, SubscribeFilter, SubscribeReasonCode,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::{
    FrameError, LinkError, LinkOptions, LinkState, Outgoing as Framed, connection_hint, frame,
};

/// The wait after the first failed attempt; it doubles with every further failure.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// How long a graceful close waits for its death and DISCONNECT to be written.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// A connection's birth and last will, numbered together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Armed {
    /// Sent on the connection's ConnAck; re-sent verbatim on a rebirth command.
    pub birth: Envelope,
    /// Given to the broker as the connection's last will.
    pub will: Envelope,
}

/// Who speaks on a link: numbers each attempt's birth and will, and the death of a close.
pub trait Speaker {
    /// The birth and the last will of the next connection attempt, the will outranking the
    /// birth and outranked by everything numbered after it; `None` for a link that announces
    /// nothing of itself (it forwards the messages of others).
    fn arm(&mut self, now: Timestamp) -> Option<Armed>;
    /// The death sent before a graceful DISCONNECT, if the link announces itself.
    fn death(&mut self, now: Timestamp) -> Option<Envelope>;
}

/// The speaker of a link that forwards others' messages and announces nothing of its own:
/// no will, no birth, no death.
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Speaker for Silent {
    fn arm(&mut self, _now: Timestamp) -> Option<Armed> {
        None
    }

    fn death(&mut self, _now: Timestamp) -> Option<Envelope> {
        None
    }
}

/// How a driver uses its connection, besides the broker's address.
#[derive(Debug, Clone)]
pub struct DriverOptions {
    /// Topic filters subscribed to on every connection, in one SUBSCRIBE sent before the
    /// birth, so that nothing published in answer to the birth is missed.
    pub subscriptions: Vec<String>,
    /// Publishes rumqttc may have unacknowledged at once (`None`: rumqttc's default).
    pub inflight: Option<u16>,
    /// How long one attempt (TCP, TLS, CONNECT) may take (`None`: rumqttc's default).
    pub connect_timeout: Option<Duration>,
    /// Requests the user may queue for rumqttc at once.
    pub request_capacity: usize,
    /// The longest wait between attempts (`None`: a minute, for a site's box).
    pub backoff_max: Option<Duration>,
    /// A second broker to fail over to (HQ's, for a site whose ward office is lost).
    pub fallback: Option<LinkOptions>,
    /// Failed attempts in a row on one broker before trying the other.
    pub fail_over_after: u32,
    /// Connected to the fallback: how often to look whether the primary is back.
    pub fail_back_every: Duration,
}

impl Default for DriverOptions {
    fn default() -> DriverOptions {
        DriverOptions {
            subscriptions: Vec::new(),
            inflight: None,
            connect_timeout: None,
            // A birth and a full state are a handful of messages.
            request_capacity: 64,
            backoff_max: None,
            fallback: None,
            fail_over_after: 3,
            fail_back_every: Duration::from_secs(15),
        }
    }
}

/// What the driver hands its user.
#[derive(Debug)]
pub enum LinkEvent<T> {
    /// A connection attempt started, with a freshly armed will.
    Connecting,
    /// The broker accepted the connection; the subscriptions and then `birth` (if the speaker
    /// has one) are queued. The user sends its state now.
    Connected {
        birth: Option<Envelope>,
        session_present: bool,
        /// Connected to the fallback broker, not the primary.
        fallback: bool,
    },
    /// The SUBACK of the connection's SUBSCRIBE: one code per filter, in the order given.
    Subscribed(Vec<SubscribeReasonCode>),
    /// The broker's PUBACK for a publish queued with this tag.
    Acked(T),
    /// A message from the broker.
    Message(rumqttc::Publish),
    /// The attempt or the connection ended. Whatever was queued and not acknowledged is gone;
    /// the next attempt starts after `retry_in`.
    Disconnected {
        error: ConnectionError,
        retry_in: Duration,
    },
}

/// Why a publish was not queued.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The message cannot be framed: a bug, or a setting beyond the protocol's limits.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Not connected: the publish would be dropped, or sent ahead of the next birth.
    #[error("not connected")]
    Offline,
    /// rumqttc's request queue is full (or its task is gone).
    #[error("rumqttc did not take the publish: {0}")]
    NotQueued(#[from] ClientError),
}

/// Where the connection stands.
enum Phase {
    /// No attempt yet: the next [`Driver::next`] arms one.
    Idle,
    /// An attempt is under way with the will of this birth.
    Connecting { birth: Option<Envelope> },
    /// Connected; `birth` answers this connection's will.
    Connected { birth: Option<Envelope> },
    /// The last attempt failed; the next one starts at `until`.
    Backoff { until: Instant },
    /// [`Driver::close`] was called: no more attempts.
    Closed,
}

impl Phase {
    fn state(&self) -> LinkState {
        match self {
            Phase::Idle | Phase::Connecting { .. } => LinkState::Connecting,
            Phase::Connected { .. } => LinkState::Connected,
            Phase::Backoff { .. } => LinkState::Backoff,
            Phase::Closed => LinkState::Closing,
        }
    }
}

/// One MQTT connection, kept up until [`Driver::close`]; `T` tags publishes whose PUBACK the
/// user wants to hear of.
pub struct Driver<S, T = ()> {
    client: AsyncClient,
    /// Starts an attempt with these options (a broker, a will) in the task that polls rumqttc.
    attempts: mpsc::UnboundedSender<MqttOptions>,
    /// The options of the primary broker and of the fallback, without a will.
    targets: Vec<(String, MqttOptions)>,
    /// Which of `targets` the current or next attempt goes to.
    target: usize,
    /// Failed attempts in a row on `target`.
    failed_here: u32,
    fail_over_after: u32,
    fail_back_every: Duration,
    /// The primary's address, for the fail-back probe.
    primary: (String, u16),
    /// A fail-back is under way: the next attempt goes to the primary, at once.
    failing_back: bool,
    /// Connected to the fallback: when to look at the primary next.
    next_probe: Option<Instant>,
    events: mpsc::Receiver<Result<Event, ConnectionError>>,
    task: JoinHandle<()>,
    speaker: S,
    subscriptions: Vec<String>,
    backoff: Backoff,
    phase: Phase,
    /// One entry per publish queued on this connection, in order: its tag, if any.
    queued: VecDeque<Option<T>>,
    /// Tags by packet id, once rumqttc has written their publishes.
    by_pkid: HashMap<u16, T>,
    /// Untagged publishes rumqttc did not take (its request queue was full).
    not_queued: u64,
}

impl<S: Speaker, T> Driver<S, T> {
    /// Starts the task that polls rumqttc; the first attempt starts on the first
    /// [`Driver::next`].
    pub fn spawn(link: &LinkOptions, options: DriverOptions, speaker: S) -> Driver<S, T> {
        let target_options = |link: &LinkOptions| {
            let mut mqtt = link.mqtt_options();
            if let Some(inflight) = options.inflight {
                mqtt.set_inflight(inflight.max(1));
            }
            (link.broker.to_string(), mqtt)
        };
        let mut targets = vec![target_options(link)];
        targets.extend(options.fallback.as_ref().map(target_options));
        let (client, mut eventloop) =
            AsyncClient::new(targets[0].1.clone(), options.request_capacity);
        if let Some(timeout) = options.connect_timeout {
            eventloop
                .network_options
                .set_connection_timeout(timeout.as_secs().max(1));
        }
        let (attempts, attempts_rx) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::channel(options.request_capacity);
        let task = tokio::spawn(drive(eventloop, attempts_rx, events_tx));
        Driver {
            client,
            attempts,
            targets,
            target: 0,
            failed_here: 0,
            fail_over_after: options.fail_over_after.max(1),
            fail_back_every: options.fail_back_every,
            primary: (link.broker.host.clone(), link.broker.port),
            failing_back: false,
            next_probe: None,
            events,
            task,
            speaker,
            subscriptions: options.subscriptions,
            backoff: Backoff::new(
                BACKOFF_FIRST,
                options
                    .backoff_max
                    .unwrap_or(BACKOFF_MAX)
                    .max(BACKOFF_FIRST),
                StdRng::from_os_rng(),
            ),
            phase: Phase::Idle,
            queued: VecDeque::new(),
            by_pkid: HashMap::new(),
            not_queued: 0,
        }
    }

    /// Who speaks on this link: the user numbers its own messages with it.
    pub fn speaker(&self) -> &S {
        &self.speaker
    }

    pub fn speaker_mut(&mut self) -> &mut S {
        &mut self.speaker
    }

    pub fn state(&self) -> LinkState {
        self.phase.state()
    }

    pub fn is_connected(&self) -> bool {
        matches!(self.phase, Phase::Connected { .. })
    }

    /// The next event. Network errors never end the link (it reconnects); an error here is
    /// one retrying cannot fix. Cancel-safe.
    pub async fn next(&mut self) -> Result<LinkEvent<T>, LinkError> {
        loop {
            match self.phase {
                Phase::Idle => return self.arm(),
                Phase::Backoff { until } => {
                    tokio::time::sleep_until(until).await;
                    return self.arm();
                }
                Phase::Closed => return Err(LinkError::Stopped),
                Phase::Connecting { .. } | Phase::Connected { .. } => {}
            }
            // On the fallback: look now and then whether the primary is back. The deadline
            // is kept across calls and events, so that a busy link still probes on time.
            let probe = self.target != 0 && self.is_connected() && !self.failing_back;
            let next_probe = *self
                .next_probe
                .get_or_insert_with(|| Instant::now() + self.fail_back_every);
            let event = tokio::select! {
                event = self.events.recv() => event.ok_or(LinkError::Stopped)?,
                () = tokio::time::sleep_until(next_probe), if probe => {
                    self.next_probe = Some(Instant::now() + self.fail_back_every);
                    self.probe_primary().await;
                    continue;
                }
            };
            if let Some(event) = self.on_event(event)? {
                return Ok(event);
            }
        }
    }

    /// Whether the primary accepts a TCP connection; if so, leaves the fallback (a graceful
    /// DISCONNECT: the fallback fires no will) for the primary.
    async fn probe_primary(&mut self) {
        let (host, port) = (&self.primary.0, self.primary.1);
        let answered = tokio::time::timeout(
            Duration::from_secs(3),
            tokio::net::TcpStream::connect((host.as_str(), port)),
        )
        .await
        .is_ok_and(|c| c.is_ok());
        if answered {
            info!(primary = %self.targets[0].0, "the primary broker answers again: failing back");
            self.failing_back = true;
            if let Err(e) = self.client.try_disconnect() {
                warn!(error = %e, "disconnect not queued");
            }
        }
    }

    /// The broker of the current connection or attempt.
    pub fn broker(&self) -> &str {
        &self.targets[self.target].0
    }

    /// Queues `env` (QoS 1, retained where its topic says so); with a tag, its PUBACK comes
    /// back as [`LinkEvent::Acked`].
    pub fn publish(&mut self, env: &Envelope, tag: Option<T>) -> Result<(), PublishError> {
        let out = frame(env)?;
        if !self.is_connected() {
            return Err(PublishError::Offline);
        }
        self.queue(out, tag)
    }

    /// Queues a message already framed (a record forwarded byte for byte), tagged like
    /// [`Driver::publish`].
    pub fn publish_frame(&mut self, out: Framed, tag: Option<T>) -> Result<(), PublishError> {
        if !self.is_connected() {
            return Err(PublishError::Offline);
        }
        self.queue(out, tag)
    }

    /// Queues `env` untagged. One rumqttc did not take is logged and counted, not retried: a
    /// live message is stale by the next chance, and the next birth brings the full state.
    pub fn publish_live(&mut self, env: &Envelope) -> Result<(), LinkError> {
        match self.publish(env, None) {
            Ok(()) => Ok(()),
            Err(PublishError::Frame(e)) => Err(e.into()),
            Err(e) => {
                self.not_queued += 1;
                warn!(kind = env.body.kind().as_str(), seq = env.header.seq, not_queued = self.not_queued, error = %e, "message not queued");
                Ok(())
            }
        }
    }

    /// Sends this connection's birth again (a duplicate to HQ, so that the will armed with it
    /// still outranks it), as a rebirth command asks.
    pub fn rebirth(&mut self) -> Result<(), LinkError> {
        let Phase::Connected { birth: Some(birth) } = &self.phase else {
            return Ok(());
        };
        let birth = birth.clone();
        self.publish_live(&birth)
    }

    /// Ends the link: while connected, sends the death and a DISCONNECT and waits (at most
    /// [`CLOSE_TIMEOUT`]) until rumqttc has written them. Returns the PUBACKs and messages
    /// that arrived meanwhile, for the user to apply.
    pub async fn close(&mut self) -> Result<Vec<LinkEvent<T>>, LinkError> {
        let mut late = Vec::new();
        let was = std::mem::replace(&mut self.phase, Phase::Closed);
        if !matches!(was, Phase::Connected { .. }) {
            return Ok(late);
        }
        let death = self.speaker.death(Timestamp::now());
        if let Some(death) = &death
            && let Err(e) = self.queue(frame(death)?, None)
        {
            warn!(error = %e, "death not queued");
        }
        // Requests are written in order, so the death reaches the broker before DISCONNECT
        // (which makes it discard the will).
        if let Err(e) = self.client.try_disconnect() {
            warn!(error = %e, "disconnect not queued");
        }
        let drain = async {
            loop {
                match self.events.recv().await {
                    Some(Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_)) | None => break,
                    Some(event) => {
                        if let Ok(Some(event)) = self.on_event(event) {
                            late.push(event);
                        }
                    }
                }
            }
        };
        if tokio::time::timeout(CLOSE_TIMEOUT, drain).await.is_err() {
            warn!("broker did not take the death in time; the will reports it instead");
        }
        info!(death_seq = death.map(|d| d.header.seq), "disconnected");
        Ok(late)
    }

    fn queue(&mut self, out: Framed, tag: Option<T>) -> Result<(), PublishError> {
        self.client
            .try_publish(out.topic, QoS::AtLeastOnce, out.retain, out.payload)?;
        self.queued.push_back(tag);
        Ok(())
    }

    /// Numbers a fresh birth and will and starts an attempt with that will.
    fn arm(&mut self) -> Result<LinkEvent<T>, LinkError> {
        let armed = self.speaker.arm(Timestamp::now());
        // A send fails only if the task is gone; the event channel then says so.
        let (birth, will) = match armed {
            Some(armed) => (Some(armed.birth), Some(last_will(&armed.will)?)),
            None => (None, None),
        };
        if std::mem::take(&mut self.failing_back) {
            self.target = 0;
            self.failed_here = 0;
        } else if self.failed_here >= self.fail_over_after && self.targets.len() > 1 {
            let from = self.target;
            self.target = (self.target + 1) % self.targets.len();
            self.failed_here = 0;
            warn!(
                from = %self.targets[from].0,
                to = %self.targets[self.target].0,
                "failing over: the broker did not answer {} attempts in a row",
                self.fail_over_after
            );
        }
        let mut options = self.targets[self.target].1.clone();
        if let Some(will) = will {
            options.set_last_will(will);
        }
        let _ = self.attempts.send(options);
        self.phase = Phase::Connecting { birth };
        Ok(LinkEvent::Connecting)
    }

    fn on_event(
        &mut self,
        event: Result<Event, ConnectionError>,
    ) -> Result<Option<LinkEvent<T>>, LinkError> {
        Ok(match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => self.connected(ack.session_present)?,
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                if let Some(Some(tag)) = self.queued.pop_front() {
                    self.by_pkid.insert(pkid, tag);
                }
                None
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                self.by_pkid.remove(&ack.pkid).map(LinkEvent::Acked)
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                Some(LinkEvent::Subscribed(ack.return_codes))
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => Some(LinkEvent::Message(publish)),
            Ok(_) => None,
            Err(error) => Some(self.lost(error)),
        })
    }

    fn connected(&mut self, session_present: bool) -> Result<Option<LinkEvent<T>>, LinkError> {
        let birth = match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::Connecting { birth } => birth,
            other => {
                // Not possible: the task connects only with a will armed here.
                self.phase = other;
                warn!("connected without an armed birth; ignored");
                return Ok(None);
            }
        };
        self.backoff.reset();
        self.queued.clear();
        self.by_pkid.clear();
        self.failed_here = 0;
        self.next_probe = None;
        info!(broker = %self.targets[self.target].0, fallback = self.target != 0, boot = birth.as_ref().map(|b| b.header.boot), birth_seq = birth.as_ref().map(|b| b.header.seq), session_present, "connected");
        self.phase = Phase::Connected {
            birth: birth.clone(),
        };
        if !self.subscriptions.is_empty() {
            let filters = self
                .subscriptions
                .iter()
                .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
            if let Err(e) = self.client.try_subscribe_many(filters) {
                warn!(error = %e, "subscriptions not queued");
            }
        }
        if let Some(birth) = &birth {
            self.publish_live(birth)?;
        }
        Ok(Some(LinkEvent::Connected {
            birth,
            session_present,
            fallback: self.target != 0,
        }))
    }

    fn lost(&mut self, error: ConnectionError) -> LinkEvent<T> {
        let retry_in = if self.failing_back {
            Duration::ZERO
        } else {
            self.failed_here = self.failed_here.saturating_add(1);
            self.backoff.next_delay()
        };
        warn!(broker = %self.targets[self.target].0, error = %error, hint = connection_hint(&error), retry_in_ms = retry_in.as_millis() as u64, "connection lost");
        self.phase = Phase::Backoff {
            until: Instant::now() + retry_in,
        };
        self.queued.clear();
        self.by_pkid.clear();
        LinkEvent::Disconnected { error, retry_in }
    }
}

impl<S, T> std::fmt::Debug for Driver<S, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("broker", &self.targets[self.target].0)
            .field("state", &self.phase.state())
            .field("queued", &self.queued.len())
            .finish_non_exhaustive()
    }
}

impl<S, T> Drop for Driver<S, T> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Polls rumqttc: one attempt per set of options received (a broker and its will), each run
/// to its first error.
async fn drive(
    mut eventloop: EventLoop,
    mut attempts: mpsc::UnboundedReceiver<MqttOptions>,
    events: mpsc::Sender<Result<Event, ConnectionError>>,
) {
    while let Some(options) = attempts.recv().await {
        // Requests queued after the last connection failed belong to it (the user re-sends
        // what matters after the birth); sent first on the new one, they would precede it.
        eventloop.clean();
        eventloop.pending.clear();
        eventloop.mqtt_options = options;
        loop {
            let event = eventloop.poll().await;
            let lost = event.is_err();
            if matches!(event, Ok(Event::Incoming(Packet::ConnAck(_)))) {
                // rumqttc would retransmit the previous session's unacknowledged publishes
                // ahead of the birth; the user re-sends what matters itself.
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
fn last_will(will: &Envelope) -> Result<LastWill, LinkError> {
    let will = frame(will)?;
    Ok(LastWill::new(
        will.topic,
        will.payload,
        QoS::AtLeastOnce,
        will.retain,
    ))
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
}
