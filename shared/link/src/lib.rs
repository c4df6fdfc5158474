//! Renkei's MQTT link: what every hop that forwards records shares, the agent's (shelter →
//! its broker) and a ward broker's uplink (ward office → HQ).
//!
//! - [`driver`]: one connection kept up (rumqttc's event loop, a fresh last will per attempt,
//!   birth, backoff with jitter, graceful close), handing its user typed events;
//! - [`delivery`]: the sans-IO delivery core: which stored records go out, in which order and
//!   at which pace, and when one may leave the store (the next hop's PUBACK or its receipt);
//! - [`tls`]: `mqtts://` brokers, trusted through a CA file only;
//! - [`recent`]: the last few keys seen, to pass over a repeat;
//! - here: how to reach a broker ([`LinkOptions`]), the link's states and errors, a message's
//!   [`Key`], and the framing of an envelope onto its topic ([`frame`]).
//!
//! The crate holds no store of its own: the agent keeps its outbox on disk, a ward broker its
//! SQLite record; each drives the same core over its own store.

pub mod delivery;
pub mod driver;
pub mod recent;
pub mod tls;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use renkei_shared::codec::MAX_FRAME;
use renkei_shared::topic::TopicForError;
use renkei_shared::url::BrokerUrl;
use renkei_shared::{CodecError, Envelope, Topic};
use rumqttc::{ConnectionError, MqttOptions, TlsConfiguration, Transport};
use tokio::time::{Instant, Interval, MissedTickBehavior};

/// Keep-alive: short enough that a dead link is noticed (and the will fired) within a minute
/// or so, long enough not to load thin mobile links with pings.
pub const KEEP_ALIVE: Duration = Duration::from_secs(30);

/// MQTT user name and password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    // Never print the password into a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// How to reach the broker.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    pub broker: BrokerUrl,
    pub credentials: Option<Credentials>,
    /// The MQTT client id: stable per sender, so the broker resumes the session.
    pub client_id: String,
    /// For an `mqtts://` broker: whom to trust (see [`tls`]).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl LinkOptions {
    pub(crate) fn mqtt_options(&self) -> MqttOptions {
        let mut mqtt = MqttOptions::new(&self.client_id, &self.broker.host, self.broker.port);
        mqtt.set_keep_alive(KEEP_ALIVE)
            // A persistent session: what the broker sent down while the link was down is
            // delivered.
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

/// A hint for the log when a connection fails in a way a person must fix.
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
    /// One of the sender's own messages could not be framed: a bug, or a setting beyond the
    /// protocol's limits. Retrying would fail the same way.
    #[error("cannot frame a message: {0}")]
    Frame(#[from] FrameError),
    /// The task polling rumqttc ended (it panicked): nothing more can be sent or received.
    #[error("the MQTT event loop task stopped")]
    Stopped,
}

/// A timer ticking every `period` from `first`; a tick missed while the loop was busy is
/// taken late rather than in a burst.
pub fn timer(first: Instant, period: Duration) -> Interval {
    let mut timer = tokio::time::interval_at(first, period);
    timer.set_missed_tick_behavior(MissedTickBehavior::Delay);
    timer
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

/// What tells a sender a record has been delivered, so that it may leave its store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Confirm {
    /// The next hop stored it: its recorder sent a receipt for it.
    #[default]
    Receipt,
    /// The broker took it: its PUBACK alone, for a broker without Renkei's recorder. A broker
    /// that fails between its PUBACK and its own write loses the message.
    #[value(name = "puback")]
    PubAck,
}

/// A sender's message identity and place in its delivery order: the envelope's
/// `(boot, seq)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Key {
    pub boot: u32,
    pub seq: u64,
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.boot, self.seq)
    }
}

impl Key {
    pub fn of(env: &Envelope) -> Key {
        Key {
            boot: env.header.boot,
            seq: env.header.seq,
        }
    }

    /// Reads `"{boot} {seq}"`, as [`Key::to_text`] writes it.
    pub fn parse(text: &str) -> Option<Key> {
        let (boot, seq) = text.trim().split_once(' ')?;
        Some(Key {
            boot: boot.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }

    /// `"{boot} {seq}\n"`: the key as the agent's small state files hold it.
    pub fn to_text(self) -> String {
        format!("{} {}\n", self.boot, self.seq)
    }
}

/// A message ready to publish: its frame, its one topic, and whether the broker keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

/// Why a message of ours cannot be sent (a bug or a setting beyond the protocol's limits).
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("message does not encode: {0}")]
    Codec(#[from] CodecError),
    #[error("message has no topic: {0}")]
    Topic(#[from] TopicForError),
}

/// Encodes a message onto its topic, retained where the topic says so.
pub fn frame(env: &Envelope) -> Result<Outgoing, FrameError> {
    let payload = renkei_shared::encode(env)?;
    let topic = Topic::of(env)?;
    Ok(Outgoing {
        retain: topic.retained(),
        topic: topic.to_string(),
        payload,
    })
}
