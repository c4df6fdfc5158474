//! The embedded MQTT broker: rumqttd's router and listeners, started the way Renkei needs.
//!
//! rumqttd's `Broker::start` binds from its config, blocks forever and hardwires the protocol;
//! Renkei assembles the same public pieces instead (`Router`, `Server`, `LinkBuilder`) so that
//! it can:
//! - run each listener on its own thread and learn when one fails (a taken port, for example);
//! - wrap the MQTT 3.1.1 codec in [`Guard`], which sees every packet of every connection: it
//!   counts open connections, learns from CONNECT who the client claims to be (rumqttd's auth
//!   hook then checks the password, see [`crate::auth`]), and applies [`crate::acl`] to the
//!   last will, every PUBLISH and every SUBSCRIBE;
//! - hand in-process consumers ([`crate::ingest`]) a link whenever they need one.
//!
//! rumqttd cannot report the port of a port-0 listener, so [`Mqtt::new`] picks free ports itself
//! before handing them over, then waits until both listeners answer a real MQTT CONNECT
//! ([`probe`]) before it reports the addresses.
//!
//! Modules: `guard` (the codec wrapper above), `hook` (rumqttd's auth hook: the password, then
//! the session), [`admission`] (client ids bound to logins, sessions, per-login bounds),
//! `listen` (sockets, ports, readiness), [`probe`] (the readiness CONNECT), [`tls`] (the MQTTS
//! relay).

pub mod admission;
mod guard;
mod hook;
mod listen;
pub mod probe;
pub mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use renkei_shared::receipt::RECEIPT_ROOT;
use renkei_shared::topic;
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::{
    ConnectionSettings, Router, RouterConfig, SegmentConfig, Server, ServerSettings, TapLimits,
    TapRx,
};
use tokio::sync::mpsc;

use crate::auth::Authenticator;
use crate::config::MqttConfig;
use crate::metrics::Metrics;
use crate::receipts::Interest;
use admission::Admission;

/// Client ids of the broker's own in-process links. Remote clients may not use the prefix: the
/// router drops an existing connection when a new one takes its id.
pub const RESERVED_CLIENT_ID_PREFIX: &str = "renkei-broker-";

/// How long [`Mqtt::listen`] waits for the listeners to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the MQTT broker did not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// No free port could be found for a port-0 address.
    #[error("cannot pick a free port on {addr}: {source}")]
    PickPort {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// A listener thread could not be started.
    #[error("cannot start the {listener} listener thread: {source}")]
    Thread {
        listener: Listener,
        source: std::io::Error,
    },
    /// A listener stopped (at start: usually its address is taken).
    #[error("MQTT {listener} listener on {addr} stopped: {reason}")]
    ListenerStopped {
        listener: Listener,
        addr: SocketAddr,
        reason: String,
    },
    /// The TLS certificate or key cannot be used.
    #[error(transparent)]
    Tls(#[from] tls::TlsFileError),
    /// The MQTTS address cannot be bound.
    #[error("cannot listen for MQTTS on {addr} (mqtt.tls_listen): {source}")]
    TlsBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The listeners did not answer a CONNECT in time.
    #[error("MQTT listeners did not become ready within {READY_TIMEOUT:?}: {last}")]
    NotReady { last: String },
    /// The router refused an in-process link.
    #[error("cannot open in-process link {client_id:?}: {source}")]
    Link {
        client_id: String,
        // Boxed: rumqttd's error carries a whole router event.
        source: Box<LinkError>,
    },
}

/// One of the MQTT listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Tcp,
    WebSocket,
    /// The loopback listener behind the MQTTS relay ([`tls`]).
    Tls,
}

impl Listener {
    /// The name of its thread, and of its server in rumqttd's logs.
    fn thread_name(self) -> &'static str {
        match self {
            Listener::Tcp => "mqtt-tcp",
            Listener::WebSocket => "mqtt-ws",
            Listener::Tls => "mqtt-tls",
        }
    }
}

impl std::fmt::Display for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Listener::Tcp => "TCP",
            Listener::WebSocket => "WebSocket",
            Listener::Tls => "TLS",
        })
    }
}

type LinkFactory = dyn Fn(&str) -> Result<(LinkTx, LinkRx), Box<LinkError>> + Send + Sync;

/// The embedded MQTT broker: its router runs from [`Mqtt::new`], its listeners from
/// [`Mqtt::listen`], so that in-process consumers can subscribe in between and miss nothing.
pub struct Mqtt {
    /// The addresses the listeners use (port 0 already replaced by the port picked).
    pub tcp_addr: SocketAddr,
    /// The TCP listener expects PROXY protocol headers (`mqtt.proxy_protocol`).
    tcp_proxied: bool,
    pub ws_addr: SocketAddr,
    /// The MQTTS address, once [`Mqtt::listen`] bound it; `None` without TLS.
    pub tls_addr: Option<SocketAddr>,
    /// The MQTTS relay, until [`Mqtt::listen`] starts it.
    tls: Option<TlsFront>,
    /// Opens in-process links; holds the router's channel, whose type rumqttd does not export.
    links: Arc<LinkFactory>,
    /// Listeners built but not yet started.
    pending: Vec<(Listener, SocketAddr, Server<Guard>)>,
    /// Reports listeners that stop.
    stopped_tx: mpsc::UnboundedSender<MqttError>,
    stopped: mpsc::UnboundedReceiver<MqttError>,
    /// For the readiness probes' login.
    auth: Arc<Authenticator>,
    admission: Arc<Admission>,
    /// Every accepted Renkei message, for ingest; taken once by [`Mqtt::take_tap`].
    tap: Option<TapRx>,
}

impl std::fmt::Debug for Mqtt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mqtt")
            .field("tcp_addr", &self.tcp_addr)
            .field("ws_addr", &self.ws_addr)
            .field("tls_addr", &self.tls_addr)
            .finish_non_exhaustive()
    }
}

/// What the MQTTS relay needs to start.
struct TlsFront {
    listen: SocketAddr,
    identity: tls::TlsIdentity,
    /// The loopback rumqttd listener it relays to.
    backend: SocketAddr,
    handshake_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Mqtt {
    /// Starts the router and prepares both listeners; every connection authenticates with
    /// `auth` and is counted in `metrics`.
    pub fn new(
        config: &MqttConfig,
        auth: &Arc<Authenticator>,
        metrics: &Arc<Metrics>,
        interest: Arc<Interest>,
    ) -> Result<Mqtt, MqttError> {
        let tcp_addr = resolve_port(config.listen)?;
        let ws_addr = resolve_port(config.ws_listen)?;
        // Read before anything starts: a bad file is a start-up error, not a failed handshake.
        let tls = match (&config.tls_cert_file, &config.tls_key_file) {
            (Some(cert), Some(key)) => Some(TlsFront {
                listen: config.tls_listen,
                identity: tls::TlsIdentity::load(cert, key)?,
                backend: resolve_port(SocketAddr::from(([127, 0, 0, 1], 0)))?,
                handshake_timeout: config.connect_timeout.0,
                metrics: metrics.clone(),
            }),
            _ => None,
        };
        let admission = Admission::new(admission::Limits {
            connections_per_user: config.max_connections_per_user,
            filters_per_connection: config.max_filters_per_connection,
            filters_per_user: config.max_filters_per_user,
            items_per_site: config.max_items_per_site,
        });
        let router = Router::new(0, router_config(config));
        metrics.count_router_gone_events(router.gone_connection_events());
        let router_tx = router.spawn();
        // Before any listener or link exists, so that ingest sees every message.
        let tap = rumqttd::open_tap(
            &router_tx,
            &format!("{}/", topic::ROOT),
            TapLimits {
                max_messages: config.ingest_queue_messages,
                max_bytes: config.ingest_queue_bytes.0,
            },
        )
        .map_err(|e| MqttError::Link {
            client_id: "tap".into(),
            source: Box::new(e.into()),
        })?;
        let mut listeners = vec![
            (Listener::Tcp, tcp_addr, &metrics.tcp_connections),
            (Listener::WebSocket, ws_addr, &metrics.ws_connections),
        ];
        if let Some(front) = &tls {
            listeners.push((Listener::Tls, front.backend, &metrics.tls_connections));
        }
        let pending = listeners
            .into_iter()
            .map(|(listener, addr, gauge)| {
                let proxied = match listener {
                    Listener::Tls => true,
                    Listener::Tcp => config.proxy_protocol,
                    Listener::WebSocket => false,
                };
                let server = Server::new(
                    server_settings(config, listener, addr, auth, &admission, metrics),
                    router_tx.clone(),
                    Guard::listening(
                        gauge.clone(),
                        auth.clone(),
                        metrics.clone(),
                        proxied,
                        interest.clone(),
                        admission.clone(),
                    ),
                );
                (listener, addr, server)
            })
            .collect();
        let links: Arc<LinkFactory> = Arc::new(move |client_id: &str| {
            LinkBuilder::new(client_id, router_tx.clone())
                .build()
                .map(|(tx, rx, _ack)| (tx, rx))
                .map_err(Box::new)
        });
        let (stopped_tx, stopped) = mpsc::unbounded_channel();
        Ok(Mqtt {
            tcp_addr,
            tcp_proxied: config.proxy_protocol,
            ws_addr,
            tls_addr: None,
            tls,
            links,
            pending,
            stopped_tx,
            stopped,
            auth: auth.clone(),
            admission,
            tap: Some(tap),
        })
    }

    /// The session book: client ids bound to logins, and what each login holds.
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
    }

    /// The router's hand-off of every message accepted under `renkei/v1/`, in order, before
    /// its PUBACK (see rumqttd's `router::tap`); `None` once taken.
    pub fn take_tap(&mut self) -> Option<TapRx> {
        self.tap.take()
    }

    /// Opens an in-process link (`LinkTx`/`LinkRx`) named `name` under the reserved prefix.
    pub fn link(&self, name: &str) -> Result<(LinkTx, LinkRx), MqttError> {
        let client_id = format!("{RESERVED_CLIENT_ID_PREFIX}{name}");
        (self.links)(&client_id).map_err(|source| MqttError::Link { client_id, source })
    }

    /// Starts the listeners and returns once each answers an MQTT CONNECT (MQTTS through a
    /// real TLS handshake).
    pub async fn listen(&mut self) -> Result<(), MqttError> {
        for (listener, addr, server) in self.pending.drain(..) {
            spawn_listener(listener, addr, server, self.stopped_tx.clone())?;
        }
        let mut probes = vec![
            probe::Target::Tcp {
                addr: self.tcp_addr,
                proxied: self.tcp_proxied,
            },
            probe::Target::WebSocket(self.ws_addr),
        ];
        if let Some(front) = self.tls.take() {
            let addr = front.listen;
            let listener =
                bind_queued(addr).map_err(|source| MqttError::TlsBind { addr, source })?;
            let bound = listener
                .local_addr()
                .map_err(|source| MqttError::TlsBind { addr, source })?;
            let connector = front
                .identity
                .probe_client()
                .map_err(|e| MqttError::TlsBind {
                    addr,
                    source: std::io::Error::other(e),
                })?;
            probes.push(probe::Target::Tcp {
                addr: front.backend,
                proxied: true,
            });
            probes.push(probe::Target::Tls(probe::reachable(bound), connector));
            let stopped = self.stopped_tx.clone();
            tokio::spawn(async move {
                let e = tls::relay(
                    listener,
                    front.identity,
                    front.backend,
                    front.handshake_timeout,
                    front.metrics,
                )
                .await;
                let _ = stopped.send(MqttError::ListenerStopped {
                    listener: Listener::Tls,
                    addr: bound,
                    reason: e.to_string(),
                });
            });
            self.tls_addr = Some(bound);
        }
        let connect = probe::connect_packet(crate::auth::PROBE_USER, self.auth.probe_password());
        wait_until_ready(probes, &connect, &mut self.stopped).await?;
        tracing::info!(
            tcp = %self.tcp_addr,
            ws = %self.ws_addr,
            tls = ?self.tls_addr,
            "MQTT listeners ready"
        );
        Ok(())
    }

    /// Resolves when a listener stops; a healthy broker never resolves this.
    pub async fn stopped(&mut self) -> MqttError {
        match self.stopped.recv().await {
            Some(e) => e,
            // `self` holds a sender, so the channel cannot close while it is polled.
            None => std::future::pending().await,
        }
    }
}

/// Segment size of each site's receipt log. Every agent's receipt subscription is a filter of
/// its own, and with the ingest log's segments (64 MiB a filter by default) a log of receipts of
/// ~60 bytes is never trimmed: the broker kept every receipt it ever sent, and its memory grew
/// with uptime. Two segments of 16 KiB hold hundreds of receipts, far more than an agent has
/// outstanding; an agent that misses one sends its records again and is receipted again.
const RECEIPT_SEGMENT_SIZE: usize = 16 * 1024;

fn router_config(config: &MqttConfig) -> RouterConfig {
    RouterConfig {
        max_connections: config.max_connections,
        // Publishes read from a filter's log per scheduling turn (rumqttd's own example value).
        max_outgoing_packet_count: 200,
        max_segment_size: config.segment_size.0,
        max_segment_count: config.segment_count,
        custom_segment: Some(HashMap::from([(
            format!("{RECEIPT_ROOT}/+/+"),
            SegmentConfig {
                max_segment_size: RECEIPT_SEGMENT_SIZE,
                max_segment_count: 2,
            },
        )])),
        // Remote clients get no dynamic filters (a log per new topic would grow memory without
        // bound), and no filter exists before its first subscriber: ingest reads the tap, not
        // a log. rumqttd takes a publish that matches no filter, keeps its retained copy and
        // hands it to no one, so a tree no one subscribes to fills no log.
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
        // A subscriber that falls further behind than its log holds is told (a dashboard
        // subscribes again for the retained state, an integrator fetches from the recorder).
        skip_notice_topic: Some(topic::SKIPPED_NOTICE.to_owned()),
    }
}

fn server_settings(
    config: &MqttConfig,
    listener: Listener,
    addr: SocketAddr,
    auth: &Arc<Authenticator>,
    admission: &Arc<Admission>,
    metrics: &Arc<Metrics>,
) -> ServerSettings {
    let mut settings = ServerSettings {
        name: listener.thread_name().into(),
        listen: addr,
        tls: None,
        // rumqttd sleeps this long after every accept (≥ one timer tick even at 0): no throttle.
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: config.connect_timeout.millis_u16().unwrap_or(5_000),
            max_payload_size: config.max_packet_size.0,
            max_inflight_count: usize::from(config.max_inflight),
            auth: None,
            // Set below: every CONNECT's password is checked there (`Guard` has already
            // refused unknown names and given demo-mode anonymous clients an empty login).
            external_auth: None,
            dynamic_filters: false,
        },
    };
    let auth = auth.clone();
    let admission = admission.clone();
    let metrics = metrics.clone();
    settings.set_auth_handler(move |client_id: String, user: String, password: String| {
        let auth = auth.clone();
        let admission = admission.clone();
        let metrics = metrics.clone();
        async move {
            let verdict = admit(&auth, &admission, &metrics, &client_id, &user, &password).await;
            verdict.map_err(connack_code)
        }
    });
    settings
}

pub use guard::{Guard, SINK_TOPIC};
use hook::{admit, connack_code};
pub use listen::{LISTEN_QUEUE, bind_queued};
use listen::{resolve_port, spawn_listener, wait_until_ready};

#[cfg(test)]
mod tests {
    use rumqttd::protocol;

    use super::*;

    /// More clients than `TcpListener::bind`'s 1,024 connect while nothing accepts (the
    /// runtime busy): every one of them is queued, none dropped.
    #[tokio::test]
    async fn connections_past_1024_wait_in_the_listen_queue() {
        let limit = |path: &str| -> Option<usize> {
            std::fs::read_to_string(path).ok()?.trim().parse().ok()
        };
        let somaxconn = limit("/proc/sys/net/core/somaxconn").unwrap_or(4096);
        // Open files: the soft limit from /proc/self/limits ("Max open files  soft  hard  files").
        let files = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|l| {
                l.lines()
                    .find(|l| l.starts_with("Max open files"))
                    .and_then(|l| l.split_whitespace().nth(3)?.parse::<usize>().ok())
            })
            .unwrap_or(1024);
        let n = somaxconn.min(files.saturating_sub(256)).min(1_500);
        if n <= 1_025 {
            eprintln!("somaxconn {somaxconn}, open files {files}: no room to test past 1,024");
            return;
        }
        let listener = bind_queued("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::with_capacity(n);
        for i in 0..n {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(stream) => clients.push(stream),
                Err(e) => panic!("connection {i} was not queued: {e}"),
            }
        }
        for _ in 0..n {
            tokio::time::timeout(Duration::from_secs(5), listener.accept())
                .await
                .unwrap()
                .unwrap();
        }
    }

    /// The segments rumqttd gives a filter: it matches the filter, as a topic, against each
    /// `custom_segment` pattern, and falls back to the router's own.
    fn segments_of(config: &RouterConfig, filter: &str) -> (usize, usize) {
        let custom = config.custom_segment.clone().unwrap_or_default();
        let found: Vec<_> = custom
            .iter()
            .filter(|(pattern, _)| protocol::matches(filter, pattern))
            .map(|(_, c)| (c.max_segment_size, c.max_segment_count))
            .collect();
        assert!(found.len() <= 1, "{filter} matches two patterns: {found:?}");
        found
            .first()
            .copied()
            .unwrap_or((config.max_segment_size, config.max_segment_count))
    }

    #[test]
    fn receipt_logs_are_small_and_the_rest_as_configured() {
        let mqtt = MqttConfig::default();
        let config = router_config(&mqtt);
        let base = (mqtt.segment_size.0, mqtt.segment_count);
        assert_eq!(
            segments_of(&config, "renkei/receipt/v1/131041/es-1"),
            (RECEIPT_SEGMENT_SIZE, 2)
        );
        for filter in [
            topic::ALL,
            topic::ALL_JSON,
            "renkei/json/v1/131041/#",
            "renkei/v1/cmd/131041/es-1",
            "renkei/v1/131041/#",
            "#",
        ] {
            assert_eq!(segments_of(&config, filter), base, "{filter}");
        }
        assert_eq!(
            config.skip_notice_topic.as_deref(),
            Some(topic::SKIPPED_NOTICE)
        );
    }

    /// A subscriber that stalls for five seconds while 2,000 sites report every second loses
    /// nothing, reading postcard or JSON: that much fits in the part of a default log that is
    /// kept once it is full (all segments but the one filling). rumqttd counts a message as its
    /// 96-byte entry, its topic and its payload.
    #[test]
    fn every_log_holds_five_seconds_of_two_thousand_sites_in_either_form() {
        use renkei_shared::mirror::MirroredRef;
        use renkei_shared::{Timestamp, Topic, encode, sample};
        const BACKLOG: usize = 2_000 * 5;
        const ENTRY: usize = 96;
        let mqtt = MqttConfig::default();
        let config = router_config(&mqtt);
        let held = |filter: &str| {
            let (size, count) = segments_of(&config, filter);
            size * (count - 1)
        };
        for (name, env) in [
            ("status", sample::status()),
            ("shelter", sample::shelter()),
            ("supplies", sample::supplies()),
        ] {
            let topic = Topic::of(&env).unwrap();
            let postcard = ENTRY + topic.to_string().len() + encode(&env).unwrap().len();
            // The JSON copy as ingest makes it.
            let mirrored = MirroredRef {
                envelope: &env,
                received_at: Timestamp(1_700_000_000_000),
            };
            let json = ENTRY + topic.json().len() + serde_json::to_vec(&mirrored).unwrap().len();
            assert!(
                BACKLOG * postcard <= held(topic::ALL),
                "{name}: {postcard} B"
            );
            assert!(BACKLOG * json <= held(topic::ALL_JSON), "{name}: {json} B");
        }
    }
}
