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

pub mod admission;
pub mod probe;
pub mod tls;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use ppp::PartialResult as _;
use renkei_shared::receipt::RECEIPT_ROOT;
use renkei_shared::{Topic, topic};
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{self, ConnectReturnCode, Login, Packet, Protocol, SubscribeReasonCode};
use rumqttd::{
    ConnectionSettings, LinkType, Router, RouterConfig, SegmentConfig, Server, ServerSettings,
};
use tokio::sync::mpsc;

use crate::acl;
use crate::auth::{Access, Authenticator, LoginRefusal, Principal};
use crate::config::MqttConfig;
use crate::metrics::Metrics;
use crate::receipts::{Interest, Wants};
use admission::{Admission, SessionRefusal, Ticket};

/// Client ids of the broker's own in-process links. Remote clients may not use the prefix: the
/// router drops an existing connection when a new one takes its id.
pub const RESERVED_CLIENT_ID_PREFIX: &str = "renkei-broker-";

/// How long [`Mqtt::listen`] waits for the listeners to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest PROXY protocol header read (v1 is at most 107 bytes; v2 may carry TLVs).
const MAX_PROXY_HEADER: usize = 4096;

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
        let router_tx = Router::new(0, router_config(config)).spawn();
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
        })
    }

    /// The session book: client ids bound to logins, and what each login holds.
    pub fn admission(&self) -> &Arc<Admission> {
        &self.admission
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

/// A filter on the JSON mirror gets segments this many times `mqtt.segment_size`. rumqttd
/// bounds a log by bytes, and a message's JSON copy is 2 to 5 times its postcard form: with the
/// same bytes, an integrator's log held a third of the messages a dashboard's did, and in a
/// 200,000-message burst an integrator that fell behind lost messages (rumqttd: "Read cursor
/// start jumped") that every postcard subscriber still got. Three times holds the same storm
/// backlog in either form (tested below). The cost: once an integrator subscribes, its log fills
/// to this bound with the latest JSON copies and stays there, 192 MiB of message bytes by
/// default, plus rumqttd's 96 bytes of bookkeeping per message.
const JSON_LOG_FACTOR: usize = 3;

fn router_config(config: &MqttConfig) -> RouterConfig {
    RouterConfig {
        max_connections: config.max_connections,
        // Publishes read from a filter's log per scheduling turn (rumqttd's own example value).
        max_outgoing_packet_count: 200,
        max_segment_size: config.segment_size.0,
        max_segment_count: config.segment_count,
        custom_segment: Some(HashMap::from([
            (
                format!("{RECEIPT_ROOT}/+/+"),
                SegmentConfig {
                    max_segment_size: RECEIPT_SEGMENT_SIZE,
                    max_segment_count: 2,
                },
            ),
            (
                topic::ALL_JSON.to_owned(),
                SegmentConfig {
                    max_segment_size: config.segment_size.0.saturating_mul(JSON_LOG_FACTOR),
                    max_segment_count: config.segment_count,
                },
            ),
        ])),
        // Remote clients get no dynamic filters (a log per new topic would grow memory without
        // bound). The ingest link's filter exists from the start. The JSON mirror needs none:
        // rumqttd takes a publish that matches no filter, keeps its retained copy and hands it
        // to no one, so until an integrator subscribes, the mirror fills no log.
        initialized_filters: Some(vec![topic::ALL.to_owned()]),
        shared_subscriptions_strategy: Default::default(),
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

/// Why the auth hook refused a CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnectRefusal {
    Login(LoginRefusal),
    Session(SessionRefusal),
    /// The guard never saw this CONNECT (its entry was dropped under a flood): try again.
    Unseen,
}

/// The auth hook: the password (with the address the guard saw), then the session.
async fn admit(
    auth: &Authenticator,
    admission: &Admission,
    metrics: &Metrics,
    client_id: &str,
    user: &str,
    password: &str,
) -> Result<(), ConnectRefusal> {
    let Some(peer) = admission.peer_of(client_id, user, password) else {
        metrics.login_refused("unseen");
        return Err(ConnectRefusal::Unseen);
    };
    let principal = auth
        .verify_from(peer, user, password)
        .await
        .map_err(ConnectRefusal::Login)?;
    admission
        .admit(&principal, client_id, user, password)
        .map_err(|refusal| {
            metrics.login_refused(refusal.reason());
            tracing::info!(
                client_id = %short(client_id),
                user = %short(user),
                reason = refusal.reason(),
                "refused CONNECT"
            );
            ConnectRefusal::Session(refusal)
        })
}

/// The CONNACK a refusal gets (MQTT 3.1.1 §3.2.2.3).
fn connack_code(refusal: ConnectRefusal) -> ConnectReturnCode {
    match refusal {
        ConnectRefusal::Login(LoginRefusal::UnknownUser | LoginRefusal::BadPassword) => {
            ConnectReturnCode::BadUserNamePassword
        }
        ConnectRefusal::Login(
            LoginRefusal::Anonymous | LoginRefusal::LockedOut | LoginRefusal::AddressLockedOut,
        ) => ConnectReturnCode::NotAuthorized,
        ConnectRefusal::Login(LoginRefusal::Busy) | ConnectRefusal::Unseen => {
            ConnectReturnCode::ServiceUnavailable
        }
        ConnectRefusal::Session(s) if s.identifier_rejected() => {
            ConnectReturnCode::ClientIdentifierNotValid
        }
        ConnectRefusal::Session(_) => ConnectReturnCode::ServiceUnavailable,
    }
}

/// Connections a listener's kernel queue holds while they wait to be accepted: as deep as the
/// embedded rumqttd's (its patch 5), so that agents reconnecting at once after an outage wait
/// their turn instead of being dropped and retrying a SYN retransmission later. The kernel caps
/// it at `net.core.somaxconn`.
pub const LISTEN_QUEUE: u32 = 8192;

/// Binds a TCP listener with a queue of [`LISTEN_QUEUE`] (`TcpListener::bind` has 1,024): the
/// MQTTS front door (the TCP and WebSocket listeners are rumqttd's own).
pub fn bind_queued(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // As `TcpListener::bind`: a restarted broker binds while its old connections linger.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_QUEUE)
}

/// A port-0 address becomes a free port on the same IP; others are kept.
fn resolve_port(addr: SocketAddr) -> Result<SocketAddr, MqttError> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    // rumqttd binds from its config and cannot report the port it got: ask the OS for one,
    // release it and hand it over. Another process could take it in between; the readiness
    // probe then fails rather than report a port that is not ours.
    let picked = TcpListener::bind(addr)
        .and_then(|l| l.local_addr())
        .map_err(|source| MqttError::PickPort { addr, source })?;
    Ok(picked)
}

fn spawn_listener(
    listener: Listener,
    addr: SocketAddr,
    mut server: Server<Guard>,
    stopped: mpsc::UnboundedSender<MqttError>,
) -> Result<(), MqttError> {
    let link_type = match listener {
        Listener::Tcp | Listener::Tls => LinkType::Remote,
        Listener::WebSocket => LinkType::Websocket,
    };
    std::thread::Builder::new()
        .name(listener.thread_name().into())
        .spawn(move || {
            // One single-threaded runtime per listener, as rumqttd's own Broker does.
            let reason = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => match runtime.block_on(server.start(link_type)) {
                    Ok(()) => "accept loop ended".to_owned(),
                    Err(e) => e.to_string(),
                },
                Err(e) => format!("cannot build its runtime: {e}"),
            };
            tracing::error!(%listener, %addr, %reason, "MQTT listener stopped");
            let _ = stopped.send(MqttError::ListenerStopped {
                listener,
                addr,
                reason,
            });
        })
        .map(drop)
        .map_err(|source| MqttError::Thread { listener, source })
}

async fn wait_until_ready(
    mut targets: Vec<probe::Target>,
    connect: &[u8],
    stopped: &mut mpsc::UnboundedReceiver<MqttError>,
) -> Result<(), MqttError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(e) = stopped.try_recv() {
            return Err(e);
        }
        let mut last = String::new();
        let mut waiting = Vec::new();
        for target in targets {
            if let Err(e) = target.probe(connect).await {
                last = format!("{target}: {e}");
                waiting.push(target);
            }
        }
        if waiting.is_empty() {
            return Ok(());
        }
        targets = waiting;
        if Instant::now() >= deadline {
            return Err(MqttError::NotReady { last });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// MQTT 3.1.1 as rumqttd reads it, plus the broker's own rules on every connection.
///
/// rumqttd clones the listener's protocol value for each accepted connection and drops the
/// clone when the connection ends, so an armed clone is exactly one open connection, and the
/// place to keep who that connection is.
///
/// A refused PUBLISH (or last will) closes the connection: MQTT 3.1.1 has no per-publish
/// refusal, and the packet never reaches the router, so it is neither forwarded nor retained.
/// A refused SUBSCRIBE filter is swapped for [`acl::REFUSED_FILTER`] on the way in, and its
/// return code in the SUBACK on the way out becomes 0x80 (failure).
pub struct Guard {
    inner: V4,
    open: Arc<AtomicI64>,
    /// False for the listener's own value, true for a connection's.
    armed: bool,
    auth: Arc<Authenticator>,
    metrics: Arc<Metrics>,
    /// Who the connection is, from its CONNECT.
    principal: Option<Principal>,
    /// The listener's connections start with a PROXY protocol header (the MQTTS relay, or a
    /// load balancer with `mqtt.proxy_protocol`).
    proxied: bool,
    /// The connection's PROXY header has been read.
    header_read: bool,
    /// The client's address: the one the listener accepted, or the PROXY header's.
    peer: Option<IpAddr>,
    /// Receipt subscriptions of all connections, and this connection's (removed on drop).
    interest: Arc<Interest>,
    receipt_filters: Vec<Wants>,
    /// SUBSCRIBE packet ids → positions of refused filters, until their SUBACK goes out.
    /// A mutex because `Protocol::write` takes `&self`.
    refused_filters: Mutex<HashMap<u16, Vec<usize>>>,
    /// Client ids bound to logins, and the bounds on what a login holds.
    admission: Arc<Admission>,
    /// This connection's claim on its session, from CONNECT on.
    ticket: Option<Arc<Ticket>>,
    /// A bound was hit: logged once per connection, then only counted.
    limit_logged: AtomicBool,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("armed", &self.armed)
            .field("principal", &self.principal)
            .finish_non_exhaustive()
    }
}

impl Guard {
    fn listening(
        open: Arc<AtomicI64>,
        auth: Arc<Authenticator>,
        metrics: Arc<Metrics>,
        proxied: bool,
        interest: Arc<Interest>,
        admission: Arc<Admission>,
    ) -> Self {
        Guard {
            inner: V4,
            open,
            armed: false,
            auth,
            metrics,
            principal: None,
            proxied,
            header_read: false,
            peer: None,
            interest,
            receipt_filters: Vec::new(),
            refused_filters: Mutex::new(HashMap::new()),
            admission,
            ticket: None,
            limit_logged: AtomicBool::new(false),
        }
    }

    /// Logs a bound hit by this connection, the first time only; counts every time.
    fn over_limit(&self, packet: &'static str, reason: &'static str, what: &str) {
        self.metrics.acl_refused(packet, reason);
        if !self.limit_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                user = %self.principal.as_ref().map_or("", |p| p.name.as_str()),
                packet,
                reason,
                what = %short(what),
                "refused: over a per-login bound (logged once per connection)"
            );
        }
    }

    /// Reads the PROXY protocol header (v1 or v2) that starts the stream: the client's address.
    /// Anything else first, or a header that does not parse, closes the connection.
    fn read_proxy_header(&mut self, stream: &mut BytesMut) -> Result<(), protocol::Error> {
        const V1: &[u8] = b"PROXY ";
        const V2: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
        let refuse = |why: &str| {
            self.metrics.login_refused("bad_proxy_header");
            tracing::info!(why, "refused connection: no valid PROXY protocol header");
            Err(protocol::Error::InvalidProtocol)
        };
        let starts_like = |sig: &[u8]| {
            let n = stream.len().min(sig.len());
            stream[..n] == sig[..n]
        };
        if !starts_like(V1) && !starts_like(V2) {
            return refuse("the stream does not start with one");
        }
        let parsed = ppp::HeaderResult::parse(&stream[..]);
        if parsed.is_incomplete() {
            if stream.len() > MAX_PROXY_HEADER {
                return refuse("header too long");
            }
            return Err(protocol::Error::InsufficientBytes(1));
        }
        let (len, peer) = match parsed {
            ppp::HeaderResult::V1(Ok(h)) => (
                h.header.len(),
                match h.addresses {
                    ppp::v1::Addresses::Tcp4(a) => Some(IpAddr::V4(a.source_address)),
                    ppp::v1::Addresses::Tcp6(a) => Some(IpAddr::V6(a.source_address)),
                    ppp::v1::Addresses::Unknown => None,
                },
            ),
            ppp::HeaderResult::V2(Ok(h)) => (
                h.len(),
                match h.addresses {
                    ppp::v2::Addresses::IPv4(a) => Some(IpAddr::V4(a.source_address)),
                    ppp::v2::Addresses::IPv6(a) => Some(IpAddr::V6(a.source_address)),
                    ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => None,
                },
            ),
            ppp::HeaderResult::V1(Err(_)) | ppp::HeaderResult::V2(Err(_)) => {
                return refuse("the header does not parse");
            }
        };
        stream.advance(len);
        self.header_read = true;
        self.peer = peer;
        Ok(())
    }

    fn on_connect(&mut self, packet: Packet) -> Result<Packet, protocol::Error> {
        let Packet::Connect(connect, props, will, will_props, mut login) = packet else {
            return Ok(packet);
        };
        if self.principal.is_some() {
            return Err(protocol::Error::InvalidProtocol);
        }
        if connect.client_id.starts_with(RESERVED_CLIENT_ID_PREFIX) {
            tracing::warn!(
                client_id = %connect.client_id,
                "refused CONNECT: client id uses the broker's reserved prefix"
            );
            return Err(refuse_connect(ConnectReturnCode::ClientIdentifierNotValid));
        }
        let name = login.as_ref().map(|l| l.username.as_str());
        let principal = self
            .auth
            .identify_from(self.peer, name)
            .map_err(|refusal| {
                tracing::info!(
                    client_id = %short(&connect.client_id),
                    user = %short(name.unwrap_or("")),
                    peer = ?self.peer,
                    reason = refusal.reason(),
                    "refused CONNECT"
                );
                refuse_connect(connack_code(ConnectRefusal::Login(refusal)))
            })?;
        if let Err(refusal) = admission::may_use_client_id(
            &principal,
            &connect.client_id,
            |name| self.auth.is_user(name),
            |id| self.auth.agent_owns(id),
        ) {
            self.metrics.login_refused(refusal.reason());
            tracing::info!(
                client_id = %short(&connect.client_id),
                user = %principal.name,
                reason = refusal.reason(),
                "refused CONNECT: the client id belongs to another login"
            );
            return Err(refuse_connect(ConnectReturnCode::ClientIdentifierNotValid));
        }
        if let Some(will) = &will {
            let topic = std::str::from_utf8(&will.topic).unwrap_or("");
            if let Err(reason) = acl::may_publish(&principal, topic) {
                self.metrics.acl_refused("will", reason);
                tracing::info!(
                    client_id = %short(&connect.client_id),
                    user = %principal.name,
                    topic = %short(topic),
                    reason,
                    "refused CONNECT: last will on a forbidden topic"
                );
                return Err(refuse_connect(ConnectReturnCode::NotAuthorized));
            }
        }
        if principal.access == Access::Demo && login.is_none() {
            // rumqttd calls its auth hook only for a CONNECT with a login; an empty one is
            // what the hook admits as anonymous in demo mode.
            login = Some(Login {
                username: String::new(),
                password: String::new(),
            });
        }
        if let Some(login) = &login {
            // The auth hook, which checks the password next, is told neither the address nor
            // the session: it finds them here, and fills the ticket when it admits.
            self.ticket = Some(self.admission.expect(
                &connect.client_id,
                &login.username,
                &login.password,
                self.peer,
                connect.clean_session,
            ));
        }
        self.principal = Some(principal);
        Ok(Packet::Connect(connect, props, will, will_props, login))
    }

    fn check_publish(&self, packet: Packet) -> Result<Packet, protocol::Error> {
        let Packet::Publish(mut publish, props) = packet else {
            return Ok(packet);
        };
        let principal = self
            .principal
            .as_ref()
            .ok_or(protocol::Error::InvalidProtocol)?;
        let topic = &publish.topic;
        let verdict = std::str::from_utf8(topic)
            .map_err(|_| "not_utf8")
            .and_then(|topic| acl::may_publish(principal, topic).map(|()| topic));
        let topic = match verdict {
            Ok(topic) => topic,
            Err(reason) => {
                self.metrics.acl_refused("publish", reason);
                tracing::info!(
                    user = %principal.name,
                    topic = %short(&String::from_utf8_lossy(topic)),
                    reason,
                    "refused PUBLISH: disconnecting"
                );
                return Err(protocol::Error::InvalidProtocol);
            }
        };
        let parsed = Topic::parse(topic).ok();
        if let Some(Topic::AlertAck { .. } | Topic::RequestAck { .. }) = &parsed
            && let Ok(envelope) = renkei_shared::decode(&publish.payload)
            && let renkei_shared::Body::Ack(ack) = &envelope.body
            && let Err(reason) = acl::ack_author(principal, &ack.by)
        {
            // What does not decode is ingest's to refuse and quarantine, as on any topic.
            self.metrics.acl_refused("publish", reason);
            tracing::info!(
                user = %principal.name,
                by = %ack.by.user,
                reason,
                "refused PUBLISH: an acknowledgement in another user's name: disconnecting"
            );
            return Err(protocol::Error::InvalidProtocol);
        }
        if let Some(parsed) = &parsed
            && let Err(reason) = self.admission.publish_item(parsed)
        {
            // Over a bound the publish is taken off the router's path, not the connection
            // closed: an agent would send it again at once on reconnect, ahead of every
            // other report. It gets its PUBACK, no receipt, and keeps the report.
            self.over_limit("publish", reason, topic);
            publish.topic = SINK_TOPIC.as_bytes().to_vec().into();
            publish.retain = false;
        }
        Ok(Packet::Publish(publish, props))
    }

    fn check_subscribe(&mut self, packet: Packet) -> Result<Packet, protocol::Error> {
        let Packet::Subscribe(mut subscribe, props) = packet else {
            return Ok(packet);
        };
        let principal = self
            .principal
            .as_ref()
            .ok_or(protocol::Error::InvalidProtocol)?;
        let mut refused = Vec::new();
        for (i, filter) in subscribe.filters.iter_mut().enumerate() {
            let within_bounds = || match &self.ticket {
                Some(ticket) => ticket.subscribe(&filter.path),
                None => Err("not_admitted"),
            };
            if !acl::may_subscribe(principal, &filter.path) {
                self.metrics.acl_refused("subscribe", "filter");
                tracing::info!(
                    user = %principal.name,
                    filter = %short(&filter.path),
                    "refused subscription"
                );
                filter.path = acl::REFUSED_FILTER.to_owned();
                refused.push(i);
            } else if let Err(reason) = within_bounds() {
                self.over_limit("subscribe", reason, &filter.path);
                filter.path = acl::REFUSED_FILTER.to_owned();
                refused.push(i);
            } else if let Some(wants) = Interest::of_filter(&filter.path) {
                // Kept until the connection ends (an UNSUBSCRIBE only costs unread receipts).
                self.interest.add(&wants);
                self.receipt_filters.push(wants);
            }
        }
        if !refused.is_empty() {
            self.refused_filters
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(subscribe.pkid, refused);
        }
        Ok(Packet::Subscribe(subscribe, props))
    }
}

/// Where a publish over a per-login bound goes instead of its topic: no client may subscribe
/// to a `$` topic ([`acl::may_subscribe`]) and no wildcard matches one, so it reaches no one,
/// and it is never retained.
pub const SINK_TOPIC: &str = "$renkei/refused";

/// A CONNECT refused by the guard: the embedded rumqttd answers it with a CONNACK carrying
/// `code` and then closes the connection (its patch 10), so the client learns why.
fn refuse_connect(code: ConnectReturnCode) -> protocol::Error {
    protocol::Error::ConnectRefused(code)
}

/// Text from the network, cut short for a log line.
fn short(text: &str) -> String {
    text.chars().take(160).collect()
}

impl Clone for Guard {
    fn clone(&self) -> Self {
        self.open.fetch_add(1, Ordering::Relaxed);
        Guard {
            inner: self.inner.clone(),
            open: self.open.clone(),
            armed: true,
            auth: self.auth.clone(),
            metrics: self.metrics.clone(),
            principal: None,
            proxied: self.proxied,
            header_read: false,
            peer: None,
            interest: self.interest.clone(),
            receipt_filters: Vec::new(),
            refused_filters: Mutex::new(HashMap::new()),
            admission: self.admission.clone(),
            ticket: None,
            limit_logged: AtomicBool::new(false),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.armed {
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
        for wants in &self.receipt_filters {
            self.interest.remove(wants);
        }
    }
}

impl Protocol for Guard {
    /// The address a direct TCP or WebSocket connection came from. Behind a PROXY-protocol
    /// front (the MQTTS relay, a load balancer), the accepted address is the front's own, and
    /// the header names the client instead.
    fn accepted_from(&mut self, peer: SocketAddr) {
        if !self.proxied {
            self.peer = Some(peer.ip());
        }
    }

    fn read_mut(
        &mut self,
        stream: &mut BytesMut,
        max_size: usize,
    ) -> Result<Packet, protocol::Error> {
        if self.proxied && !self.header_read {
            self.read_proxy_header(stream)?;
        }
        let packet = match self.inner.read_mut(stream, max_size) {
            Ok(packet) => packet,
            Err(protocol::Error::PayloadSizeLimitExceeded(len)) => {
                // rumqttd closes the connection; the refusal is counted with ingest's.
                self.metrics.rejected("oversize_packet");
                tracing::info!(
                    len,
                    max_size,
                    "refused a packet over mqtt.max_packet_size: disconnecting"
                );
                return Err(protocol::Error::PayloadSizeLimitExceeded(len));
            }
            Err(e) => return Err(e),
        };
        match packet {
            Packet::Connect(..) => self.on_connect(packet),
            Packet::Publish(..) => self.check_publish(packet),
            Packet::Subscribe(..) => self.check_subscribe(packet),
            Packet::Unsubscribe(ref unsubscribe, _) => {
                if let Some(ticket) = &self.ticket {
                    for filter in &unsubscribe.filters {
                        ticket.unsubscribe(filter);
                    }
                }
                Ok(packet)
            }
            other => Ok(other),
        }
    }

    fn write(&self, packet: Packet, write: &mut BytesMut) -> Result<usize, protocol::Error> {
        let packet = match packet {
            Packet::SubAck(mut suback, props) => {
                let refused = self
                    .refused_filters
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&suback.pkid);
                for i in refused.into_iter().flatten() {
                    if let Some(code) = suback.return_codes.get_mut(i) {
                        *code = SubscribeReasonCode::Failure;
                    }
                }
                Packet::SubAck(suback, props)
            }
            other => other,
        };
        self.inner.write(packet, write)
    }
}

#[cfg(test)]
mod tests {
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
    fn receipt_logs_are_small_json_logs_large_and_the_rest_as_configured() {
        let mqtt = MqttConfig::default();
        let config = router_config(&mqtt);
        let base = (mqtt.segment_size.0, mqtt.segment_count);
        assert_eq!(
            segments_of(&config, "renkei/receipt/v1/131041/es-1"),
            (RECEIPT_SEGMENT_SIZE, 2)
        );
        for filter in [
            topic::ALL_JSON,
            "renkei/json/v1/131041/#",
            "renkei/json/v1/+/+/status",
        ] {
            assert_eq!(
                segments_of(&config, filter),
                (base.0 * JSON_LOG_FACTOR, base.1),
                "{filter}"
            );
        }
        for filter in [
            topic::ALL,
            "renkei/v1/cmd/131041/es-1",
            "renkei/v1/131041/#",
            "#",
        ] {
            assert_eq!(segments_of(&config, filter), base, "{filter}");
        }
    }

    /// A reconnect storm's backlog, 2,000 agents with 100 periodic reports each, fits in the
    /// guaranteed part of every filter's log, postcard or JSON. rumqttd counts a message as 4
    /// bytes, its topic and its payload (`PublishData::size`), and drops the oldest segment when
    /// the active one fills: the guaranteed part is all segments but the active one.
    #[test]
    fn every_log_holds_a_storm_backlog_of_reports_in_either_form() {
        use renkei_shared::{Topic, encode, sample};
        const BACKLOG: usize = 2_000 * 100;
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
            let postcard = 4 + topic.to_string().len() + encode(&env).unwrap().len();
            // The JSON copy as ingest makes it.
            let json = 4 + topic.json().len() + serde_json::to_vec(&env).unwrap().len();
            assert!(
                BACKLOG * postcard <= held(topic::ALL),
                "{name}: {postcard} B"
            );
            assert!(BACKLOG * json <= held(topic::ALL_JSON), "{name}: {json} B");
        }
    }
}
