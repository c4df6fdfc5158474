//! The agent's MQTT link: how to reach the broker, the driver that keeps a connection up, the
//! delivery core, and the simulator's live session.
//!
//! - [`driver`]: one connection kept up (rumqttc's event loop, a fresh last will per attempt,
//!   birth, backoff with jitter, graceful close), handing its user typed events; the daemon
//!   and every simulated site run on it, and so can a ward's uplink;
//! - [`live`]: a simulated site's session: no outbox, its full state after every birth;
//! - here: the broker options shared by both ([`LinkOptions`]), the link's states and errors,
//!   and the reading of HQ's commands (`command_of`).

pub mod delivery;
pub mod driver;
pub mod live;

pub use live::run_site;

use std::sync::Arc;
use std::time::Duration;

use renkei_shared::codec::MAX_FRAME;
use renkei_shared::{Body, topic};
use rumqttc::{ConnectionError, MqttOptions, TlsConfiguration, Transport};
use tokio::time::{Instant, Interval, MissedTickBehavior};
use tracing::{debug, warn};

use crate::config::{BrokerAddr, Credentials};
use crate::report::FrameError;

/// Keep-alive: short enough that a dead link is noticed (and the will fired) within a minute
/// or so, long enough not to load thin mobile links with pings.
pub const KEEP_ALIVE: Duration = Duration::from_secs(30);

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

/// A timer ticking every `period` from `first`; a tick missed while the loop was busy is
/// taken late rather than in a burst.
pub(crate) fn timer(first: Instant, period: Duration) -> Interval {
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
