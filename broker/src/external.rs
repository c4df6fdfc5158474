//! External-broker mode: Renkei's recorder, rules and HTTP against an MQTT broker run elsewhere
//! (a cluster: EMQX, HiveMQ, VerneMQ; Mosquitto in the tests), with the embedded one off.
//!
//! ```text
//! agents, dashboards ──MQTT──▶ external broker ──$share/renkei/renkei/v1/# (QoS 1)──▶ client
//!        ▲                           ▲                                                 │
//!        │                           │ JSON mirror, rule alerts, restored retained     ▼
//!        └── subscriptions ──────────┴──────────────────── Publisher ◀── ingest::Pipeline
//! ```
//!
//! One rumqttc client per instance, with a stable client id and `clean_session = false`: the
//! external broker keeps the subscription and queues QoS 1 messages while the instance is down.
//! Messages are acknowledged by hand once ingest has handled them (recorded queue, state,
//! mirror), so a message in hand when the process dies is delivered again. Its event loop runs
//! on a thread of its own (a current-thread runtime), so that ingest and the rules may block on
//! publishing while the loop keeps reading; what it reads waits for ingest in a channel bounded
//! in practice by the broker's in-flight window, since nothing is acknowledged before ingest
//! took it.
//!
//! `external.broker` is `mqtt://HOST[:PORT]` (1883) or `mqtts://HOST[:PORT]` (8883): TLS 1.2/1.3
//! through rumqttc's rustls transport with the ring provider, as the agent's `mqtts://` link,
//! trusting the CA certificates of `external.ca_file`, or the system's roots without one. The
//! certificate must name the URL's host (a DNS name or an IP address).
//!
//! Access control lives in the external broker: Renkei's users and roles still guard the HTTP
//! API, but MQTT logins and topic rules must be configured there (docs/scaling.md).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use renkei_shared::codec::MAX_FRAME;
use renkei_shared::topic;
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::oneshot;

use renkei_shared::url::BrokerUrl;

use crate::config::{ExternalConfig, PACKET_HEADROOM};

/// How long the start waits for the external broker to accept the connection and subscription.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Why external mode did not start.
#[derive(Debug, thiserror::Error)]
pub enum ExternalError {
    #[error("config key external.broker: {0}")]
    Url(String),
    #[error("cannot resolve the external broker {host}:{port}: {source}")]
    Resolve {
        host: String,
        port: u16,
        source: std::io::Error,
    },
    #[error("cannot read external.password_file {path}: {source}")]
    Password {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the external broker's client thread: {0}")]
    Thread(std::io::Error),
    #[error("external broker {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("external broker TLS: {0}")]
    Tls(String),
}

/// The client options both connections to the external broker share: TLS for `mqtts://`.
fn client_options(
    client_id: String,
    config: &ExternalConfig,
    url: &BrokerUrl,
) -> Result<MqttOptions, ExternalError> {
    let mut options = MqttOptions::new(client_id, url.host.clone(), url.port);
    options
        .set_keep_alive(Duration::from_secs(30))
        // In: Renkei frames. Out: their JSON mirror, a few times larger.
        .set_max_packet_size(MAX_FRAME + PACKET_HEADROOM, 256 * 1024);
    if url.tls {
        let tls = client_tls(config)?;
        options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
    } else if let Some(path) = &config.ca_file {
        // A CA file next to a plain URL is a TLS setup half done: refuse it rather than
        // send the password in the clear.
        return Err(ExternalError::Tls(format!(
            "external.ca_file {} is set but external.broker is not an mqtts:// URL",
            path.display()
        )));
    }
    if let Some(user) = &config.user {
        options.set_credentials(user.clone(), read_password(config)?);
    }
    Ok(options)
}

/// The TLS client for an `mqtts://` broker: rustls with ring (the provider of the MQTTS
/// listener and of the agent, no C toolchain), TLS 1.2 and 1.3, trusting exactly the CA
/// certificates of `external.ca_file` (PEM, one or more), or the system's roots without one.
///
/// The CA file is read as the agent and a ward's uplink read theirs (`renkei_link::tls`).
fn client_tls(config: &ExternalConfig) -> Result<Arc<rustls::ClientConfig>, ExternalError> {
    let roots = match &config.ca_file {
        Some(path) => renkei_link::tls::roots_from(path)
            .map_err(|e| ExternalError::Tls(format!("external.{e}")))?,
        None => {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(ExternalError::Tls(format!(
                    "no system CA certificates found ({} errors); set external.ca_file",
                    found.errors.len()
                )));
            }
            roots
        }
    };
    renkei_link::tls::trusting(roots).map_err(ExternalError::Tls)
}

/// The filter ingest subscribes with: none when it reads a JetStream stream instead.
pub fn filter(config: &ExternalConfig) -> Option<String> {
    if !config.jetstream.is_empty() {
        return None;
    }
    Some(if config.share_group.is_empty() {
        topic::ALL.to_owned()
    } else {
        format!("$share/{}/{}", config.share_group, topic::ALL)
    })
}

/// A message delivered by the external broker, to be acknowledged once handled.
#[derive(Debug)]
pub struct Incoming {
    pub publish: rumqttc::Publish,
}

/// The connected client: its event loop thread, the messages it delivers, and the address the
/// broker resolved to (for the ready line).
#[derive(Debug)]
pub struct External {
    pub client: AsyncClient,
    pub incoming: Option<std::sync::mpsc::Receiver<Incoming>>,
    pub addr: SocketAddr,
    /// The broker's WebSocket address, from `external.ws_url`, when it resolves.
    pub ws_addr: Option<SocketAddr>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl External {
    /// Connects, subscribes, and returns once the broker has acknowledged the subscription.
    pub async fn connect(config: &ExternalConfig, url: &str) -> Result<External, ExternalError> {
        External::connect_session(config, url, config.client_id.clone(), filter(config), false)
            .await
    }

    /// A further connection that only publishes (its own clean session, `{client_id}-{name}`),
    /// failing over as the first does.
    pub async fn connect_publisher(
        config: &ExternalConfig,
        url: &str,
        name: &str,
    ) -> Result<External, ExternalError> {
        let client_id = format!("{}-{name}", config.client_id);
        External::connect_session(config, url, client_id, None, true).await
    }

    async fn connect_session(
        config: &ExternalConfig,
        url: &str,
        client_id: String,
        filter: Option<String>,
        clean: bool,
    ) -> Result<External, ExternalError> {
        let broker = BrokerUrl::parse(url).map_err(|e| ExternalError::Url(e.to_string()))?;
        let addr = resolve(&broker.host, broker.port).await?;
        let ws_addr = match &config.ws_url {
            Some(ws) => ws_socket_addr(ws).await,
            None => None,
        };
        let session = |url: &BrokerUrl| -> Result<MqttOptions, ExternalError> {
            let mut options = client_options(client_id.clone(), config, url)?;
            options.set_clean_session(clean).set_manual_acks(true);
            Ok(options)
        };
        let mut addresses = vec![session(&broker)?];
        for other in &config.failover {
            let url = BrokerUrl::parse(other)
                .map_err(|e| ExternalError::Url(format!("external.failover {other}: {e}")))?;
            addresses.push(session(&url)?);
        }
        let (client, eventloop) = AsyncClient::new(addresses[0].clone(), 1024);
        let (tx, incoming) = std::sync::mpsc::channel();
        let (ready_tx, ready) = oneshot::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let driver = Driver {
            client: client.clone(),
            addresses,
            current: 0,
            filter,
            incoming: tx,
            ready: Some(ready_tx),
            stop: stop.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("renkei-external".into())
            .spawn(move || driver.run(eventloop))
            .map_err(ExternalError::Thread)?;
        let mut external = External {
            client,
            incoming: Some(incoming),
            addr,
            ws_addr,
            stop,
            thread: Some(thread),
        };
        let failed = |reason: String| ExternalError::Connect {
            url: url.to_owned(),
            reason,
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, ready).await {
            Ok(Ok(Ok(()))) => Ok(external),
            Ok(Ok(Err(reason))) => {
                external.stop_blocking().await;
                Err(failed(reason))
            }
            Ok(Err(_)) => {
                external.stop_blocking().await;
                Err(failed("the client thread ended".into()))
            }
            Err(_) => {
                external.stop_blocking().await;
                Err(failed(format!(
                    "no connection and subscription within {CONNECT_TIMEOUT:?}"
                )))
            }
        }
    }

    async fn stop_blocking(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.client.try_disconnect();
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }

    /// Disconnects cleanly (the session stays with the broker) and waits for the thread.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.client.try_disconnect();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn resolve(host: &str, port: u16) -> Result<SocketAddr, ExternalError> {
    let resolve_error = |source| ExternalError::Resolve {
        host: host.to_owned(),
        port,
        source,
    };
    tokio::net::lookup_host((host, port))
        .await
        .map_err(resolve_error)?
        .next()
        .ok_or_else(|| resolve_error(std::io::Error::other("no address")))
}

/// `ws://HOST:PORT/…` → its socket address, if it names a port and resolves.
async fn ws_socket_addr(url: &str) -> Option<SocketAddr> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"))?;
    let authority = rest.split('/').next()?;
    let (host, port) = authority.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    resolve(host, port.parse().ok()?).await.ok()
}

/// How long [`retained_topics`] waits after the last retained message before it stops reading.
const RETAINED_QUIET: Duration = Duration::from_millis(500);

/// The topics under `renkei/v1/#` on which the external broker holds a retained message, read
/// through a short clean session of its own (a shared subscription receives no retained
/// messages). At start the broker re-publishes only the retained state the external broker
/// lacks: the cluster outlives an instance, and what it holds may be newer than the database.
pub async fn retained_topics(
    config: &ExternalConfig,
    url: &str,
) -> Result<std::collections::HashSet<String>, ExternalError> {
    let broker = BrokerUrl::parse(url).map_err(|e| ExternalError::Url(e.to_string()))?;
    let failed = |reason: String| ExternalError::Connect {
        url: url.to_owned(),
        reason,
    };
    let mut options = client_options(format!("{}-restore", config.client_id), config, &broker)?;
    options.set_clean_session(true);
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    let mut topics = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
    let mut subscribed = false;
    loop {
        let wait = if subscribed {
            RETAINED_QUIET
        } else {
            deadline.saturating_duration_since(tokio::time::Instant::now())
        };
        match tokio::time::timeout(wait, eventloop.poll()).await {
            Err(_) if subscribed => break,
            Err(_) => return Err(failed("no answer to the retained-state check".into())),
            Ok(Err(e)) => return Err(failed(format!("retained-state check: {e}"))),
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                client
                    .subscribe(topic::ALL, QoS::AtMostOnce)
                    .await
                    .map_err(|e| failed(e.to_string()))?;
            }
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => subscribed = true,
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) if p.retain => {
                topics.insert(p.topic);
            }
            Ok(Ok(_)) => {}
        }
    }
    let _ = client.try_disconnect();
    // Let the DISCONNECT out; the session is discarded either way.
    let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
    Ok(topics)
}

pub(crate) fn read_password(config: &ExternalConfig) -> Result<String, ExternalError> {
    match &config.password_file {
        Some(path) => {
            crate::config::read_password_file(path).map_err(|source| ExternalError::Password {
                path: path.clone(),
                source,
            })
        }
        None => Ok(String::new()),
    }
}

/// Runs the client's event loop: subscribes whenever the broker has no session for it,
/// forwards publishes to ingest, reconnects with backoff.
struct Driver {
    client: AsyncClient,
    /// The session's options at each of the cluster's addresses, `external.broker` first.
    addresses: Vec<MqttOptions>,
    /// The one in use.
    current: usize,
    filter: Option<String>,
    incoming: std::sync::mpsc::Sender<Incoming>,
    /// Told the outcome of the first connection and subscription.
    ready: Option<oneshot::Sender<Result<(), String>>>,
    stop: Arc<AtomicBool>,
}

impl Driver {
    fn run(mut self, mut eventloop: rumqttc::EventLoop) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(e) => {
                self.tell(Err(format!("cannot build the client's runtime: {e}")));
                return;
            }
        };
        runtime.block_on(async {
            let mut backoff = Duration::from_millis(100);
            let mut failing_since: Option<Instant> = None;
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        backoff = Duration::from_millis(100);
                        if let Some(since) = failing_since.take() {
                            tracing::info!(
                                down_for = ?since.elapsed(),
                                "external broker reconnected"
                            );
                        }
                        match &self.filter {
                            // A new session (first start, or the broker forgot it): the
                            // subscription must be made again.
                            Some(filter) if !ack.session_present => {
                                if let Err(e) = self.client.try_subscribe(filter, QoS::AtLeastOnce)
                                {
                                    tracing::error!(error = %e, "cannot subscribe");
                                }
                            }
                            _ => self.tell(Ok(())),
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        if ack
                            .return_codes
                            .iter()
                            .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure))
                        {
                            let reason = format!(
                                "the broker refused the subscription {:?} (not allowed, or no \
                                 shared subscriptions: set external.share_group = \"\")",
                                self.filter
                            );
                            tracing::error!("{reason}");
                            self.tell(Err(reason));
                        } else {
                            tracing::info!(filter = ?self.filter, "subscribed at the external broker");
                            self.tell(Ok(()));
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        if self.incoming.send(Incoming { publish }).is_err() {
                            // Ingest is gone: nothing is acknowledged any more.
                            return;
                        }
                    }
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                        if self.stop.load(Ordering::Relaxed) {
                            // Let the DISCONNECT reach the broker.
                            let _ = eventloop.poll().await;
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if self.stop.load(Ordering::Relaxed) {
                            return;
                        }
                        if let rumqttc::ConnectionError::ConnectionRefused(code) = &e
                            && self.ready.is_some()
                            && matches!(
                                code,
                                ConnectReturnCode::BadUserNamePassword
                                    | ConnectReturnCode::NotAuthorized
                            )
                        {
                            self.tell(Err(format!("login refused ({code:?})")));
                            return;
                        }
                        if failing_since.is_none() {
                            failing_since = Some(Instant::now());
                            tracing::warn!(error = %e, "external broker connection lost; reconnecting");
                        } else {
                            tracing::debug!(error = %e, "external broker still unreachable");
                        }
                        if self.addresses.len() > 1 {
                            // The next node of the cluster; the session is the cluster's.
                            self.current = (self.current + 1) % self.addresses.len();
                            let next = self.addresses[self.current].clone();
                            let (host, port) = next.broker_address();
                            tracing::info!(%host, port, "external broker: trying the next address");
                            eventloop.mqtt_options = next;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
        });
    }

    fn tell(&mut self, outcome: Result<(), String>) {
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(outcome);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_ca_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ExternalConfig {
            ca_file: Some(dir.path().join("none.pem")),
            ..ExternalConfig::default()
        };
        let err = client_tls(&config).unwrap_err().to_string();
        assert!(
            err.contains("none.pem") && err.contains("cannot read"),
            "{err}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "just text\n").unwrap();
        config.ca_file = Some(empty);
        let err = client_tls(&config).unwrap_err().to_string();
        assert!(err.contains("no certificate"), "{err}");
    }

    #[test]
    fn shares_the_subscription_unless_told_not_to() {
        let mut config = ExternalConfig::default();
        assert_eq!(
            filter(&config).as_deref(),
            Some("$share/renkei/renkei/v1/#")
        );
        config.share_group.clear();
        assert_eq!(filter(&config).as_deref(), Some("renkei/v1/#"));
        config.jetstream = vec!["nats://127.0.0.1:4222".into()];
        assert_eq!(filter(&config), None, "ingest reads the stream instead");
    }
}
