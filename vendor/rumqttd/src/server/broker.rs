use crate::link::alerts::{self};
use crate::link::console::ConsoleLink;
use crate::link::network::{self, Network, N};
use crate::link::remote::{self, mqtt_connect, RemoteLink};
use crate::link::{bridge, timer};
use crate::local::LinkBuilder;
use crate::protocol::v4::V4;
use crate::protocol::v5::V5;
use crate::protocol::{Packet, Protocol};
#[cfg(any(feature = "use-rustls", feature = "use-native-tls"))]
use crate::server::tls::{self, TLSAcceptor};
use crate::{meters, ConnectionSettings, Meter};
use flume::{RecvError, SendError, Sender};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use tracing::{error, field, info, warn, Instrument};
use uuid::Uuid;

#[cfg(feature = "websocket")]
use async_tungstenite::tokio::accept_hdr_async;
#[cfg(feature = "websocket")]
use async_tungstenite::tungstenite::handshake::server::{
    Callback, ErrorResponse, Request, Response,
};
#[cfg(feature = "websocket")]
use async_tungstenite::tungstenite::http::HeaderValue;
#[cfg(feature = "websocket")]
use ws_stream_tungstenite::WsStream;

use metrics::gauge;
use metrics_exporter_prometheus::PrometheusBuilder;
use std::time::Duration;
use std::{io, thread};

use crate::link::console;
use crate::link::local::{self, LinkRx, LinkTx};
use crate::router::{Event, Router};
use crate::{Config, ConnectionId, ServerSettings, TlsConfig};

use tokio::net::{TcpListener, TcpStream};
use tokio::time::error::Elapsed;
use tokio::{task, time};

#[derive(Debug, thiserror::Error)]
#[error("Acceptor error")]
pub enum Error {
    #[error("I/O {0}")]
    Io(#[from] io::Error),
    #[error("Timeout")]
    Timeout(#[from] Elapsed),
    #[error("Channel recv error")]
    Recv(#[from] RecvError),
    #[error("Channel send error")]
    Send(#[from] SendError<(ConnectionId, Event)>),
    #[cfg(any(feature = "use-rustls", feature = "use-native-tls"))]
    #[error("Certs error = {0}")]
    Certs(#[from] tls::Error),
    #[error("Accept error = {0}")]
    Accept(String),
    #[error("Remote error = {0}")]
    Remote(#[from] remote::Error),
    #[error("Invalid configuration")]
    Config(String),
}

pub struct Broker {
    config: Arc<Config>,
    router_tx: Sender<(ConnectionId, Event)>,
}

impl Broker {
    pub fn new(config: Config) -> Broker {
        let config = Arc::new(config);
        let router_config = config.router.clone();
        let router: Router = Router::new(config.id, router_config);

        // Setup cluster if cluster settings are configured.
        match config.cluster.clone() {
            Some(_cluster_config) => {
                // let node_id = cluster_config.node_id;
                // let listen = cluster_config.listen;
                // let seniors = cluster_config.seniors;
                // let mut cluster = RemoteCluster::new(node_id, &listen, seniors);
                // Broker::setup_remote_cluster(&mut router, node_id, &mut cluster);

                // Start router first and then cluster in the background
                let router_tx = router.spawn();
                // cluster.spawn();
                Broker { config, router_tx }
            }
            None => {
                let router_tx = router.spawn();
                Broker { config, router_tx }
            }
        }
    }

    // pub fn new_local_cluster(
    //     config: Config,
    //     node_id: NodeId,
    //     seniors: Vec<(NodeId, Sender<ReplicationData>)>,
    // ) -> (Broker, Sender<ReplicationData>) {
    //     let config = Arc::new(config);
    //     let router_config = config.router.clone();

    //     let mut router = Router::new(config.id, router_config);
    //     let (mut cluster, tx) = LocalCluster::new(node_id, seniors);
    //     Broker::setup_local_cluster(&mut router, node_id, &mut cluster);

    //     // Start router first and then cluster in the background
    //     let router_tx = router.spawn();
    //     cluster.spawn();

    //     (Broker { config, router_tx }, tx)
    // }

    // fn setup_remote_cluster(router: &mut Router, node_id: NodeId, cluster: &mut RemoteCluster) {
    //     // Retrieve pre-configured list of router <-> replica link from router
    //     // and add the link to cluster
    //     let nodes: Vec<NodeId> = (0..MAX_NODES).filter(|v| *v != node_id).collect();
    //     for node_id in nodes {
    //         let link = router.get_replica_handle(node_id);
    //         cluster.add_replica_router_handle(node_id, link);
    //     }
    // }

    // fn setup_local_cluster(router: &mut Router, node_id: NodeId, cluster: &mut LocalCluster) {
    //     // Retrieve pre-configured list of router <-> replica link from router
    //     // and add the link to cluster
    //     let nodes: Vec<NodeId> = (0..MAX_NODES).filter(|v| *v != node_id).collect();
    //     for node_id in nodes {
    //         let link = router.get_replica_handle(node_id);
    //         cluster.add_replica_router_handle(node_id, link);
    //     }
    // }

    // Link to get meters
    pub fn meters(&self) -> Result<meters::MetersLink, meters::LinkError> {
        let link = meters::MetersLink::new(self.router_tx.clone())?;
        Ok(link)
    }

    // Link to get alerts
    pub fn alerts(&self) -> Result<alerts::AlertsLink, alerts::LinkError> {
        let link = alerts::AlertsLink::new(self.router_tx.clone())?;
        Ok(link)
    }

    /// Renkei patch: every publish accepted under `prefix` from now on, handed to the returned
    /// consumer before its PUBACK, with back-pressure on the publishers when the consumer
    /// falls `limits` behind (see [`crate::router::tap`]). One tap per broker; a second
    /// replaces the first. Set it up before [`Broker::start`] so that it sees every message.
    pub fn tap(
        &self,
        prefix: &str,
        limits: crate::TapLimits,
    ) -> Result<crate::TapRx, local::LinkError> {
        Ok(crate::router::tap::open(&self.router_tx, prefix, limits)?)
    }

    pub fn link(&self, client_id: &str) -> Result<(LinkTx, LinkRx), local::LinkError> {
        // Register this connection with the router. Router replies with ack which if ok will
        // start the link. Router can sometimes reject the connection (ex. max connection limit).
        let (link_tx, link_rx, _ack) =
            LinkBuilder::new(client_id, self.router_tx.clone()).build()?;
        Ok((link_tx, link_rx))
    }

    #[tracing::instrument(skip(self))]
    pub fn start(&mut self) -> Result<(), Error> {
        if self.config.v4.is_none()
            && self.config.v5.is_none()
            && (cfg!(not(feature = "websocket")) || self.config.ws.is_none())
        {
            return Err(Error::Config(
                "Atleast one server config must be specified, \
                consider adding either of [v4.x]/[v5.x] or [ws.x] (if enabled) in config file."
                    .to_string(),
            ));
        }

        // we don't know which servers (v4/v5/ws) user will spawn
        // so we collect handles for all of the spawned servers
        let mut server_thread_handles = Vec::new();

        if let Some(metrics_config) = self.config.metrics.clone() {
            let timer_thread = thread::Builder::new().name("timer".to_owned());
            let router_tx = self.router_tx.clone();
            timer_thread.spawn(move || {
                let mut runtime = tokio::runtime::Builder::new_current_thread();
                let runtime = runtime.enable_all().build().unwrap();

                runtime.block_on(async move {
                    timer::start(metrics_config, router_tx).await;
                });
            })?;
        }

        // Spawn bridge in a separate thread.
        if let Some(bridge_config) = self.config.bridge.clone() {
            let bridge_thread = thread::Builder::new().name(bridge_config.name.clone());
            let router_tx = self.router_tx.clone();
            bridge_thread.spawn(move || {
                let mut runtime = tokio::runtime::Builder::new_current_thread();
                let runtime = runtime.enable_all().build().unwrap();

                runtime.block_on(async move {
                    if let Err(e) = bridge::start(bridge_config, router_tx, V4).await {
                        error!(error=?e, "Bridge Link error");
                    };
                });
            })?;
        }

        // Spawn servers in a separate thread.
        if let Some(v4_config) = &self.config.v4 {
            for (_, config) in v4_config.clone() {
                let server_thread = thread::Builder::new().name(config.name.clone());
                let mut server = Server::new(config, self.router_tx.clone(), V4);
                let handle = server_thread.spawn(move || {
                    let mut runtime = tokio::runtime::Builder::new_current_thread();
                    let runtime = runtime.enable_all().build().unwrap();

                    runtime.block_on(async {
                        if let Err(e) = server.start(LinkType::Remote).await {
                            error!(error=?e, "Server error - V4");
                        }
                    });
                })?;
                server_thread_handles.push(handle)
            }
        }

        if let Some(v5_config) = &self.config.v5 {
            for (_, config) in v5_config.clone() {
                let server_thread = thread::Builder::new().name(config.name.clone());
                let mut server = Server::new(config, self.router_tx.clone(), V5);
                let handle = server_thread.spawn(move || {
                    let mut runtime = tokio::runtime::Builder::new_current_thread();
                    let runtime = runtime.enable_all().build().unwrap();

                    runtime.block_on(async {
                        if let Err(e) = server.start(LinkType::Remote).await {
                            error!(error=?e, "Server error - V5");
                        }
                    });
                })?;
                server_thread_handles.push(handle)
            }
        }

        #[cfg(not(feature = "websocket"))]
        if self.config.ws.is_some() {
            warn!("websocket feature is disabled, [ws] config will be ignored.");
        }

        #[cfg(feature = "websocket")]
        if let Some(ws_config) = &self.config.ws {
            for (_, config) in ws_config.clone() {
                let server_thread = thread::Builder::new().name(config.name.clone());
                //TODO: Add support for V5 procotol with websockets. Registered in config or on ServerSettings
                let mut server = Server::new(config, self.router_tx.clone(), V4);
                let handle = server_thread.spawn(move || {
                    let mut runtime = tokio::runtime::Builder::new_current_thread();
                    let runtime = runtime.enable_all().build().unwrap();

                    runtime.block_on(async {
                        if let Err(e) = server.start(LinkType::Websocket).await {
                            error!(error=?e, "Server error - WS");
                        }
                    });
                })?;
                server_thread_handles.push(handle)
            }
        }

        if let Some(prometheus_setting) = &self.config.prometheus {
            let timeout = prometheus_setting.interval;
            // If port is specified use it instead of listen.
            // NOTE: This means listen is ignored when `port` is specified.
            // `port` will be removed in future release in favour of `listen`
            let addr = {
                #[allow(deprecated)]
                match prometheus_setting.port {
                    Some(port) => SocketAddr::new("127.0.0.1".parse().unwrap(), port),
                    None => prometheus_setting.listen.unwrap_or(SocketAddr::new(
                        IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
                        9042,
                    )),
                }
            };
            let metrics_thread = thread::Builder::new().name("Metrics".to_owned());
            let meter_link = self.meters().unwrap();
            metrics_thread.spawn(move || {
                let builder = PrometheusBuilder::new().with_http_listener(addr);
                builder.install().unwrap();

                let total_publishes = gauge!("metrics.router.total_publishes");
                let total_connections = gauge!("metrics.router.total_connections");
                let failed_publishes = gauge!("metrics.router.failed_publishes");
                loop {
                    if let Ok(metrics) = meter_link.recv() {
                        for m in metrics {
                            match m {
                                Meter::Router(_, ref r) => {
                                    total_connections.set(r.total_connections as f64);
                                    total_publishes.set(r.total_publishes as f64);
                                    failed_publishes.set(r.failed_publishes as f64);
                                }
                                _ => continue,
                            }
                        }
                    }

                    std::thread::sleep(Duration::from_secs(timeout));
                }
            })?;
        }

        if let Some(console) = self.config.console.clone() {
            let console_link = ConsoleLink::new(console, self.router_tx.clone());

            let console_link = Arc::new(console_link);
            let console_thread = thread::Builder::new().name("Console".to_string());
            console_thread.spawn(move || {
                let mut runtime = tokio::runtime::Builder::new_current_thread();
                let runtime = runtime.enable_all().build().unwrap();
                runtime.block_on(console::start(console_link));
            })?;
        }

        // in ideal case, where server doesn't crash, join() will never resolve
        // we still try to join threads so that we don't return from function
        // unless everything crashes.
        server_thread_handles.into_iter().for_each(|handle| {
            // join() might panic in case the thread panics
            // we just ignore it
            let _ = handle.join();
        });

        Ok(())
    }
}

#[derive(Copy, Clone)]
pub enum LinkType {
    #[cfg(feature = "websocket")]
    Websocket,
    Remote,
}

#[derive(PartialEq)]
enum AwaitingWill {
    Cancel,
    Fire,
}

pub struct Server<P> {
    config: ServerSettings,
    router_tx: Sender<(ConnectionId, Event)>,
    protocol: P,
    awaiting_will_handler: Arc<Mutex<HashMap<String, Sender<AwaitingWill>>>>,
}

impl<P: Protocol + Clone + Send + 'static> Server<P> {
    pub fn new(
        config: ServerSettings,
        router_tx: Sender<(ConnectionId, Event)>,
        protocol: P,
    ) -> Server<P> {
        Server {
            config,
            router_tx,
            protocol,
            awaiting_will_handler: Arc::new(Mutex::new(HashMap::default())),
        }
    }

    pub async fn start(&mut self, link_type: LinkType) -> Result<(), Error> {
        let listener = bind(self.config.listen)?;
        self.serve(listener, link_type).await
    }

    /// Accepts connections on `listener` (bound by `start`, or by a test on a port of its own).
    async fn serve(&mut self, listener: TcpListener, link_type: LinkType) -> Result<(), Error> {
        let delay = Duration::from_millis(self.config.next_connection_delay_ms);
        let mut count: usize = 0;

        let config = Arc::new(self.config.connections.clone());
        let tls = self.config.tls.clone().map(Arc::new);
        info!(
            config = self.config.name,
            listen_addr = self.config.listen.to_string(),
            "Listening for remote connections",
        );
        loop {
            // Await new network connection.
            let (stream, addr) = match listener.accept().await {
                Ok((s, r)) => (s, r),
                Err(e) => {
                    error!(error=?e, "Unable to accept socket.");
                    continue;
                }
            };

            if let Err(e) = set_tcp_keepalive(&stream) {
                warn!(error=?e, ?addr, "Unable to set TCP keep-alive");
            }

            info!(name=?self.config.name, ?addr, count, "accept");
            count += 1;

            let mut protocol = self.protocol.clone();
            protocol.accepted_from(addr);

            // Renkei patch: upstream awaited the TLS accept and the WebSocket handshake here, in
            // the accept loop, without a deadline: one peer that connected and sent nothing
            // (no TLS hello, no HTTP upgrade) kept every later connection on the listener
            // waiting. Everything after `accept()` now runs in the connection's own task.
            let span = match link_type {
                #[cfg(feature = "websocket")]
                LinkType::Websocket => tracing::info_span!(
                    "websocket_link",
                    tenant_id = field::Empty,
                    client_id = field::Empty,
                    connection_id = field::Empty
                ),
                LinkType::Remote => tracing::error_span!(
                    "remote_link",
                    tenant_id = field::Empty,
                    client_id = field::Empty,
                    connection_id = field::Empty,
                ),
            };
            task::spawn(
                accept_and_serve(
                    config.clone(),
                    tls.clone(),
                    link_type,
                    stream,
                    protocol,
                    self.router_tx.clone(),
                    self.awaiting_will_handler.clone(),
                )
                .instrument(span),
            );

            // Renkei patch: upstream slept even for a zero delay, which tokio rounds up to its
            // 1 ms timer tick, so a listener admitted at most ~1,000 connections a second.
            if !delay.is_zero() {
                time::sleep(delay).await;
            }
        }
    }
}

/// Renkei patch: TCP keep-alive on every accepted connection, so that a peer that is gone
/// without a FIN or RST (a powered-off agent, a dropped mobile link) is found out by the
/// kernel even when MQTT keep-alive does not look (keep alive 0) or has not started yet: after
/// `TCP_KEEPALIVE_IDLE` of silence, `TCP_KEEPALIVE_PROBES` probes `TCP_KEEPALIVE_INTERVAL`
/// apart, then the socket fails and its connection ends.
const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE_PROBES: u32 = 5;

fn set_tcp_keepalive(stream: &TcpStream) -> io::Result<()> {
    let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE_IDLE);
    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_os = "macos",
        target_os = "ios",
        target_os = "freebsd",
        target_os = "netbsd",
        target_os = "windows",
    ))]
    let keepalive = keepalive
        .with_interval(TCP_KEEPALIVE_INTERVAL)
        .with_retries(TCP_KEEPALIVE_PROBES);
    socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive)
}

/// Renkei patch: one connection, from its accepted socket on. The TLS accept, the WebSocket
/// handshake, reading the CONNECT and the auth hook all happen under one deadline,
/// `connection_timeout_ms`: upstream bounded only the CONNECT read, so a peer that stalled its
/// TLS or WebSocket handshake, or an auth hook that never answered, held the connection (and,
/// before the handshakes moved here, the whole listener) forever. Only an accepted CONNECT
/// goes on to `remote`, and so to the router.
async fn accept_and_serve<P: Protocol>(
    config: Arc<ConnectionSettings>,
    tls: Option<Arc<TlsConfig>>,
    link_type: LinkType,
    stream: TcpStream,
    protocol: P,
    router_tx: Sender<(ConnectionId, Event)>,
    will_handlers: Arc<Mutex<HashMap<String, Sender<AwaitingWill>>>>,
) {
    let deadline = Duration::from_millis(config.connection_timeout_ms.into());
    let handshake = handshake(&config, tls.as_deref(), link_type, stream, protocol);
    let (network, connect_packet, tenant_id) = match time::timeout(deadline, handshake).await {
        Ok(Ok(accepted)) => accepted,
        Ok(Err(e)) => {
            error!(error=?e, "Error while handling MQTT connect packet");
            return;
        }
        Err(_) => {
            error!(
                ?deadline,
                "No accepted MQTT connect within the connection timeout"
            );
            return;
        }
    };

    remote(
        config,
        tenant_id,
        router_tx,
        network,
        connect_packet,
        will_handlers,
    )
    .await
}

/// Renkei patch: what a connection goes through before its CONNECT is accepted (see
/// `accept_and_serve`, which bounds it).
async fn handshake<P: Protocol>(
    config: &Arc<ConnectionSettings>,
    tls: Option<&TlsConfig>,
    link_type: LinkType,
    stream: TcpStream,
    protocol: P,
) -> Result<(Network<P>, Packet, Option<String>), Error> {
    let (network, tenant_id) = tls_accept(tls, stream).await?;
    tracing::Span::current().record("tenant_id", field::debug(&tenant_id));

    let network: Box<dyn N> = match link_type {
        #[cfg(feature = "websocket")]
        LinkType::Websocket => match accept_hdr_async(network, WSCallback).await {
            Ok(s) => Box::new(WsStream::new(s)),
            Err(e) => return Err(Error::Accept(format!("Websocket failed handshake: {e}"))),
        },
        LinkType::Remote => network,
    };

    let mut network = Network::new(
        network,
        config.max_payload_size,
        config.max_inflight_count,
        protocol,
    );
    let connect_packet = mqtt_connect(config.clone(), &mut network).await?;
    Ok((network, connect_packet, tenant_id))
}

// Depending on TLS or not create a new Network
async fn tls_accept(
    tls: Option<&TlsConfig>,
    stream: TcpStream,
) -> Result<(Box<dyn N>, Option<String>), Error> {
    #[cfg(any(feature = "use-rustls", feature = "use-native-tls"))]
    if let Some(c) = tls {
        let (tenant_id, network) = TLSAcceptor::new(c)?.accept(stream).await?;
        return Ok((network, tenant_id));
    }
    Ok((Box::new(stream), None))
}

/// Configures the Websocket connection to indicate the correct protocol
/// by adding the "sec-websocket-protocol" with value of "mqtt" to the response header
#[cfg(feature = "websocket")]
struct WSCallback;
#[cfg(feature = "websocket")]
impl Callback for WSCallback {
    fn on_request(
        self,
        _request: &Request,
        mut response: Response,
    ) -> Result<Response, ErrorResponse> {
        response
            .headers_mut()
            .insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
        Ok(response)
    }
}

/// A new network connection should wait for a mqtt connect packet. This should be handled
/// asynchronously to avoid blocking other new connections while this connection is
/// waiting for mqtt connect packet. Also this honours connection wait time as per config to prevent
/// denial of service attacks (rogue clients which only establish network connections without
/// sending a mqtt connection packet to make the server reach its concurrent connection limit).
///
/// Renkei patch: `accept_and_serve` reads and checks the CONNECT (under the connection
/// deadline) and hands only an accepted one on, with its network: nothing here (the will
/// bookkeeping below, the router) ever sees a refused or unfinished connection.
async fn remote<P: Protocol>(
    config: Arc<ConnectionSettings>,
    tenant_id: Option<String>,
    router_tx: Sender<(ConnectionId, Event)>,
    network: Network<P>,
    connect_packet: Packet,
    will_handlers: Arc<Mutex<HashMap<String, Sender<AwaitingWill>>>>,
) {
    let dynamic_filters = config.dynamic_filters;

    let (mut client_id, clean_session) = match &connect_packet {
        Packet::Connect(ref connect, _, _, _, _) => {
            (connect.client_id.clone(), connect.clean_session)
        }
        _ => unreachable!(),
    };

    let mut assigned_client_id = None;
    if client_id.is_empty() {
        let uuid = Uuid::new_v4().simple();
        client_id = format!("rumqtt-{uuid}");
        assigned_client_id = Some(client_id.clone());
    }

    if let Some(tenant_id) = &tenant_id {
        // client_id is set to "tenant_id.client_id"
        // this is to make sure we are consistent,
        // as Connection uses this format of client_id
        client_id = format!("{tenant_id}.{client_id}");
    }

    // Renkei patch: the previous connection of this client id may have ended before it
    // waited for its will (e.g. `RemoteLink::new` failed when the client went away during
    // CONNACK), leaving a sender whose receiver is gone. Upstream unwrapped `try_send` here
    // while holding the lock: the panic poisoned `will_handlers`, and every later connection
    // on the listener panicked at `lock().unwrap()`.
    let previous = will_handlers.lock().unwrap().remove(&client_id);
    if let Some(sender) = previous {
        let awaiting_will = if clean_session {
            AwaitingWill::Fire
        } else {
            AwaitingWill::Cancel
        };
        let _ = sender.try_send(awaiting_will);
    }

    let (will_tx, will_rx) = flume::bounded::<AwaitingWill>(1);
    will_handlers
        .lock()
        .unwrap()
        .insert(client_id.clone(), will_tx);

    // Start the link
    let mut link = match RemoteLink::new(
        router_tx.clone(),
        tenant_id.clone(),
        network,
        connect_packet,
        dynamic_filters,
        assigned_client_id,
    )
    .await
    {
        Ok(l) => l,
        Err(e) => {
            error!(error=?e, "Remote link error");
            return;
        }
    };

    let connection_id = link.connection_id;
    let will_delay_interval = link.will_delay_interval;
    let mut send_disconnect = true;

    match link.start().await {
        // Connection got closed. This shouldn't usually happen.
        Ok(_) => error!("connection-stop"),
        // No need to send a disconnect message when disconnection
        // originated internally in the router.
        Err(remote::Error::Link(e)) => {
            error!(error=?e, "router-drop");
            send_disconnect = false;
        }
        // Connection was closed by peer
        Err(remote::Error::Network(network::Error::Io(err)) | remote::Error::Io(err))
            if err.kind() == io::ErrorKind::ConnectionAborted =>
        {
            info!(error=?err, "disconnected");
        }
        // Any other error
        Err(e) => {
            error!(error=?e, "disconnected");
        }
    };

    if send_disconnect {
        let disconnect = Event::Disconnect;
        let message = (connection_id, disconnect);
        router_tx.send(message).ok();
    }

    // this is important to stop the connection
    drop(link);

    let publish_will = match tokio::time::timeout(
        Duration::from_secs(will_delay_interval as u64),
        will_rx.recv_async(),
    )
    .await
    {
        Ok(w) => w.is_ok_and(|k| k == AwaitingWill::Fire),
        Err(_) => {
            // no need to keep the sender after timeout
            will_handlers.lock().unwrap().remove(&client_id);
            // as will delay interval has passed, publish the will message
            true
        }
    };

    if publish_will {
        let message = Event::PublishWill((client_id, tenant_id));
        // is this connection_id really correct at this point?
        // as we have disconnected already, some other connection
        // might be using this connection ID!
        // It won't matter in this case as we don't use it
        // but might affect logs?
        router_tx.send((connection_id, message)).ok();
    }
}

/// Renkei patch: upstream bound with `TcpListener::bind`, whose accept queue holds 1,024
/// connections. When more clients than that connect at once (agents reconnecting after an
/// outage) while the listener's runtime is busy, the kernel drops the rest and each of them
/// waits a full SYN retransmission (1 s, then 3 s) before trying again. The queue now holds up
/// to `LISTEN_BACKLOG` connections (the kernel caps it at `net.core.somaxconn`).
const LISTEN_BACKLOG: u32 = 8192;

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // As `TcpListener::bind` does on Unix: a restarted broker can bind while connections of
    // its previous run are in TIME_WAIT.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

#[cfg(test)]
mod listen_backlog {
    use super::*;

    /// Lets this process open `wanted` files, as far as its hard limit allows.
    pub(super) fn raise_open_files(wanted: u64) {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `limit` is a valid rlimit for the call to fill and then to read.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < wanted {
                limit.rlim_cur = wanted.min(limit.rlim_max);
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
            }
        }
    }

    /// Connections that arrive while the listener is not accepting (its runtime busy) wait in
    /// the kernel's queue, well past the 1,024 of `TcpListener::bind`, instead of being dropped
    /// and retried a second later.
    #[tokio::test]
    async fn connections_past_1024_wait_to_be_accepted() {
        // The kernel caps the queue at net.core.somaxconn (4,096 by default since Linux 5.4).
        let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(4096);
        let n = somaxconn.min(1_500);
        if n <= 1_024 {
            eprintln!("net.core.somaxconn is {somaxconn}: no queue past 1,024 to test");
            return;
        }
        raise_open_files(2_048);
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut clients = Vec::new();
        for i in 0..n {
            match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
                Ok(stream) => clients.push(stream),
                Err(e) => panic!("connection {i} was not queued: {e}"),
            }
        }
        // All of them are there to accept.
        for _ in 0..clients.len() {
            tokio::time::timeout(Duration::from_secs(5), listener.accept())
                .await
                .unwrap()
                .unwrap();
        }
    }
}

/// Renkei patch: a listener, its router and a raw MQTT 3.1.1 client written with the crate's own
/// codec, for the tests of what happens between `accept()` and the router.
#[cfg(test)]
mod test_client {
    use super::*;
    use crate::protocol::{ConnAck, Connect, ConnectReturnCode, LastWill, Login};
    use crate::RouterConfig;
    use bytes::BytesMut;
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

    pub fn router() -> Sender<(ConnectionId, Event)> {
        Router::new(
            0,
            RouterConfig {
                max_connections: 1_000,
                max_outgoing_packet_count: 200,
                max_segment_size: 100 * 1024,
                max_segment_count: 10,
                ..Default::default()
            },
        )
        .spawn()
    }

    pub fn settings(connection_timeout_ms: u16) -> ServerSettings {
        ServerSettings {
            name: "test".to_owned(),
            listen: "127.0.0.1:0".parse().unwrap(),
            tls: None,
            next_connection_delay_ms: 0,
            connections: ConnectionSettings {
                connection_timeout_ms,
                max_payload_size: 1024 * 1024,
                max_inflight_count: 100,
                auth: None,
                external_auth: None,
                dynamic_filters: false,
            },
        }
    }

    /// Serves `settings` on a port of its own, on a thread and single-threaded runtime of its
    /// own as `Broker::start` does, and returns the address.
    pub fn listen<P: Protocol + Clone + Send + 'static>(
        settings: ServerSettings,
        protocol: P,
        link_type: LinkType,
        router_tx: Sender<(ConnectionId, Event)>,
    ) -> SocketAddr {
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let mut server = Server::new(settings, router_tx, protocol);
                let _ = server.serve(listener, link_type).await;
            });
        });
        rx.recv().unwrap()
    }

    pub fn connect(client_id: &str, keep_alive: u16, login: Option<(&str, &str)>) -> Packet {
        connect_with_will(client_id, keep_alive, login, None)
    }

    pub fn connect_with_will(
        client_id: &str,
        keep_alive: u16,
        login: Option<(&str, &str)>,
        will: Option<LastWill>,
    ) -> Packet {
        let connect = Connect {
            keep_alive,
            client_id: client_id.to_owned(),
            clean_session: true,
        };
        let login = login.map(|(username, password)| Login {
            username: username.to_owned(),
            password: password.to_owned(),
        });
        Packet::Connect(connect, None, will.map(Box::new), None, login.map(Box::new))
    }

    pub async fn send(stream: &mut (impl AsyncWrite + Unpin), packet: Packet) {
        let mut buffer = BytesMut::new();
        V4.write(packet, &mut buffer).unwrap();
        stream.write_all(&buffer).await.unwrap();
    }

    /// The next packet, or `None` once the broker has closed the connection.
    pub async fn recv(
        stream: &mut (impl AsyncRead + Unpin),
        buffer: &mut BytesMut,
    ) -> Option<Packet> {
        loop {
            match V4.read_mut(buffer, 1024 * 1024) {
                Ok(packet) => return Some(packet),
                Err(crate::protocol::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("broker sent a malformed packet: {e}"),
            }
            if stream.read_buf(buffer).await.ok()? == 0 {
                return None;
            }
        }
    }

    pub fn is_connack(packet: &Option<Packet>, code: ConnectReturnCode) -> bool {
        matches!(packet, Some(Packet::ConnAck(ConnAck { code: c, .. }, _)) if *c == code)
    }
}

/// Renkei patch: nothing a peer does (or fails to do) before its CONNECT is accepted holds up
/// other connections on its listener, and it gets `connection_timeout_ms` for all of it.
#[cfg(test)]
mod connection_deadline {
    use super::test_client::*;
    use super::*;
    use crate::protocol::ConnectReturnCode;
    use async_tungstenite::tungstenite::client::IntoClientRequest;
    use bytes::BytesMut;
    use std::time::Instant;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn idle_sockets_do_not_hold_up_the_websocket_listener() {
        super::listen_backlog::raise_open_files(4_096);
        let timeout = Duration::from_millis(2_000);
        let addr = listen(settings(2_000), V4, LinkType::Websocket, router());

        // Connected, and never a byte of HTTP upgrade.
        let mut idle = Vec::new();
        for _ in 0..200 {
            idle.push((TcpStream::connect(addr).await.unwrap(), Instant::now()));
        }

        let connack = time::timeout(Duration::from_secs(1), async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let mut request = format!("ws://{addr}/mqtt").into_client_request().unwrap();
            request
                .headers_mut()
                .insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
            let (ws, _) = async_tungstenite::tokio::client_async(request, tcp)
                .await
                .unwrap();
            let mut ws = WsStream::new(ws);
            send(&mut ws, connect("late-but-real", 30, None)).await;
            recv(&mut ws, &mut BytesMut::new()).await
        })
        .await
        .expect("no CONNACK within 1 s while 200 idle sockets are open");
        assert!(
            is_connack(&connack, ConnectReturnCode::Success),
            "{connack:?}"
        );

        // The idle ones are closed once their time is up, not before.
        let (mut first, opened) = idle.swap_remove(0);
        let mut byte = [0u8; 1];
        let read = time::timeout(timeout * 3, first.read(&mut byte))
            .await
            .expect("an idle socket is still open at three times the connection timeout");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert!(opened.elapsed() >= timeout - Duration::from_millis(100));
    }

    #[tokio::test]
    async fn an_auth_hook_that_never_answers_is_cut_off_at_the_connection_timeout() {
        let mut settings = settings(500);
        settings.set_auth_handler(|_, _, _| std::future::pending::<bool>());
        let addr = listen(settings, V4, LinkType::Remote, router());

        let mut client = TcpStream::connect(addr).await.unwrap();
        let sent = Instant::now();
        send(&mut client, connect("patient", 30, Some(("user", "pass")))).await;
        let mut rest = Vec::new();
        let read = time::timeout(Duration::from_secs(3), client.read_to_end(&mut rest))
            .await
            .expect("the connection outlived its deadline while the auth hook was waited for");
        assert!(read.is_ok() && rest.is_empty(), "{read:?} {rest:?}");
        assert!(sent.elapsed() >= Duration::from_millis(400));
    }

    #[tokio::test]
    async fn accepted_sockets_get_tcp_keepalive() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        set_tcp_keepalive(&stream).unwrap();

        let socket = socket2::SockRef::from(&stream);
        assert!(socket.keepalive().unwrap());
        #[cfg(target_os = "linux")]
        {
            assert_eq!(socket.tcp_keepalive_time().unwrap(), TCP_KEEPALIVE_IDLE);
            assert_eq!(
                socket.tcp_keepalive_interval().unwrap(),
                TCP_KEEPALIVE_INTERVAL
            );
            assert_eq!(
                socket.tcp_keepalive_retries().unwrap(),
                TCP_KEEPALIVE_PROBES
            );
        }
    }
}

/// Renkei patch: keep alive 0 turns MQTT keep-alive off (MQTT 3.1.1 §3.1.2.10).
#[cfg(test)]
mod keep_alive_zero {
    use super::test_client::*;
    use super::*;
    use crate::protocol::{ConnectReturnCode, PingReq};
    use bytes::BytesMut;

    #[tokio::test]
    async fn a_connect_with_keep_alive_zero_is_accepted_and_never_times_out() {
        let addr = listen(settings(1_000), V4, LinkType::Remote, router());
        let mut client = TcpStream::connect(addr).await.unwrap();
        let mut buffer = BytesMut::new();
        send(&mut client, connect("keep-alive-off", 0, None)).await;
        let connack = time::timeout(Duration::from_secs(2), recv(&mut client, &mut buffer))
            .await
            .expect("no answer to the CONNECT");
        assert!(
            is_connack(&connack, ConnectReturnCode::Success),
            "{connack:?}"
        );

        // Silent for longer than the connection timeout, and than any keep-alive timeout a
        // zero could be mistaken for; the connection is still served.
        time::sleep(Duration::from_millis(1_500)).await;
        send(&mut client, Packet::PingReq(PingReq)).await;
        let pong = time::timeout(Duration::from_secs(2), recv(&mut client, &mut buffer))
            .await
            .expect("no answer to the PINGREQ");
        assert!(matches!(pong, Some(Packet::PingResp(_))), "{pong:?}");
    }
}

/// Renkei patch: a refused CONNECT is answered with a CONNACK that says why, and never reaches
/// the router.
#[cfg(test)]
mod refused_connect {
    use super::test_client::*;
    use super::*;
    use crate::protocol::{
        ConnectReturnCode, Filter, LastWill, PingReq, QoS, RetainForwardRule, Subscribe,
    };
    use bytes::BytesMut;
    use tokio::io::AsyncReadExt;

    /// Everything the broker sends `client` until it closes the connection.
    async fn rest_of(mut client: TcpStream) -> Vec<u8> {
        let mut answer = Vec::new();
        time::timeout(Duration::from_secs(3), client.read_to_end(&mut answer))
            .await
            .expect("the broker kept a refused connection open")
            .expect("the broker reset a refused connection");
        answer
    }

    async fn answer_to(addr: SocketAddr, connect: Packet) -> Vec<u8> {
        let mut client = TcpStream::connect(addr).await.unwrap();
        send(&mut client, connect).await;
        rest_of(client).await
    }

    /// CONNACK, remaining length 2, no session present, the return code.
    fn connack(code: u8) -> Vec<u8> {
        vec![0x20, 0x02, 0x00, code]
    }

    #[tokio::test]
    async fn a_handler_that_answers_false_gets_connack_4() {
        let mut settings = settings(2_000);
        settings.set_auth_handler(|_, _, _| async { false });
        let addr = listen(settings, V4, LinkType::Remote, router());
        let answer = answer_to(addr, connect("c", 30, Some(("user", "wrong")))).await;
        assert_eq!(answer, connack(4));
    }

    #[tokio::test]
    async fn a_wrong_password_for_static_auth_gets_connack_4() {
        let mut settings = settings(2_000);
        settings.connections.auth = Some(HashMap::from([("user".into(), "right".into())]));
        let addr = listen(settings, V4, LinkType::Remote, router());
        let answer = answer_to(addr, connect("c", 30, Some(("user", "wrong")))).await;
        assert_eq!(answer, connack(4));
    }

    #[tokio::test]
    async fn a_connect_without_login_gets_connack_5_when_auth_is_configured() {
        let mut settings = settings(2_000);
        settings.set_auth_handler(|_, _, _| async { true });
        let addr = listen(settings, V4, LinkType::Remote, router());
        let answer = answer_to(addr, connect("c", 30, None)).await;
        assert_eq!(answer, connack(5));
    }

    #[tokio::test]
    async fn each_refusal_reaches_the_client_as_its_connack_code() {
        use ConnectReturnCode::*;
        let mut settings = settings(2_000);
        // The user name says which refusal to give.
        settings.set_auth_handler(|_, user: String, _| async move {
            match user.as_str() {
                "2" => Err(ClientIdentifierNotValid),
                "3" => Err(ServiceUnavailable),
                "4" => Err(BadUserNamePassword),
                "5" => Err(NotAuthorized),
                "banned" => Err(Banned),
                _ => Ok(()),
            }
        });
        let addr = listen(settings, V4, LinkType::Remote, router());
        for (user, code) in [("2", 2), ("3", 3), ("4", 4), ("5", 5), ("banned", 5)] {
            let answer = answer_to(addr, connect("c", 30, Some((user, "pw")))).await;
            assert_eq!(answer, connack(code), "refused as {user}");
        }

        // A handler may also answer with a verdict.
        let mut settings = super::test_client::settings(2_000);
        settings.set_auth_handler(|_, _, _| async {
            crate::AuthVerdict::Refuse(ConnectReturnCode::ServiceUnavailable)
        });
        let addr = listen(settings, V4, LinkType::Remote, router());
        let answer = answer_to(addr, connect("c", 30, Some(("user", "pw")))).await;
        assert_eq!(answer, connack(3));
    }

    #[tokio::test]
    async fn a_refused_websocket_client_gets_its_connack_too() {
        use async_tungstenite::tungstenite::client::IntoClientRequest;
        let mut settings = settings(2_000);
        settings.set_auth_handler(|_, _, _| async { false });
        let addr = listen(settings, V4, LinkType::Websocket, router());
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut request = format!("ws://{addr}/mqtt").into_client_request().unwrap();
        request
            .headers_mut()
            .insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
        let (ws, _) = async_tungstenite::tokio::client_async(request, tcp)
            .await
            .unwrap();
        let mut ws = WsStream::new(ws);
        send(&mut ws, connect("c", 30, Some(("user", "wrong")))).await;
        let mut buffer = BytesMut::new();
        let answer = time::timeout(Duration::from_secs(3), recv(&mut ws, &mut buffer))
            .await
            .expect("no answer to the CONNECT");
        assert!(
            is_connack(&answer, ConnectReturnCode::BadUserNamePassword),
            "{answer:?}"
        );
        let end = time::timeout(Duration::from_secs(3), recv(&mut ws, &mut buffer))
            .await
            .expect("the broker kept a refused connection open");
        assert!(end.is_none(), "{end:?}");
    }

    /// MQTT 3.1.1 that refuses the client id "refused" while reading its CONNECT.
    #[derive(Clone)]
    struct RefusingProtocol;

    impl Protocol for RefusingProtocol {
        fn read_mut(
            &mut self,
            stream: &mut BytesMut,
            max_size: usize,
        ) -> Result<Packet, crate::protocol::Error> {
            match V4.read_mut(stream, max_size)? {
                Packet::Connect(connect, ..) if connect.client_id == "refused" => {
                    Err(crate::protocol::Error::ConnectRefused(
                        ConnectReturnCode::ClientIdentifierNotValid,
                    ))
                }
                packet => Ok(packet),
            }
        }

        fn write(
            &self,
            packet: Packet,
            write: &mut BytesMut,
        ) -> Result<usize, crate::protocol::Error> {
            V4.write(packet, write)
        }
    }

    #[tokio::test]
    async fn a_protocol_that_refuses_the_connect_has_it_answered_with_its_code() {
        let addr = listen(
            settings(2_000),
            RefusingProtocol,
            LinkType::Remote,
            router(),
        );
        let answer = answer_to(addr, connect("refused", 30, None)).await;
        assert_eq!(answer, connack(2));

        let mut client = TcpStream::connect(addr).await.unwrap();
        send(&mut client, connect("welcome", 30, None)).await;
        let answer = recv(&mut client, &mut BytesMut::new()).await;
        assert!(
            is_connack(&answer, ConnectReturnCode::Success),
            "{answer:?}"
        );
    }

    #[test]
    fn a_verdict_from_bool_or_result() {
        use crate::AuthVerdict::*;
        use ConnectReturnCode::*;
        assert_eq!(crate::AuthVerdict::from(true), Accept);
        assert_eq!(crate::AuthVerdict::from(false), Refuse(BadUserNamePassword));
        assert_eq!(crate::AuthVerdict::from(Ok(())), Accept);
        assert_eq!(crate::AuthVerdict::from(Err(Banned)), Refuse(Banned));
    }

    #[tokio::test]
    async fn a_refused_client_with_a_connected_clients_id_neither_disconnects_it_nor_fires_its_will(
    ) {
        let mut settings = settings(2_000);
        settings.set_auth_handler(|_, user: String, _| async move { user == "good" });
        let addr = listen(settings, V4, LinkType::Remote, router());

        let will = LastWill {
            topic: "wards/1/will".into(),
            message: "gone".into(),
            qos: QoS::AtMostOnce,
            retain: false,
        };
        let mut ward = TcpStream::connect(addr).await.unwrap();
        let mut ward_buffer = BytesMut::new();
        let login = Some(("good", "pw"));
        send(
            &mut ward,
            connect_with_will("ward-1", 30, login, Some(will)),
        )
        .await;
        let answer = recv(&mut ward, &mut ward_buffer).await;
        assert!(
            is_connack(&answer, ConnectReturnCode::Success),
            "{answer:?}"
        );

        let mut watcher = TcpStream::connect(addr).await.unwrap();
        let mut watcher_buffer = BytesMut::new();
        send(&mut watcher, connect("watcher", 30, login)).await;
        let answer = recv(&mut watcher, &mut watcher_buffer).await;
        assert!(
            is_connack(&answer, ConnectReturnCode::Success),
            "{answer:?}"
        );
        let filter = Filter {
            path: "wards/+/will".into(),
            qos: QoS::AtMostOnce,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::OnEverySubscribe,
        };
        let subscribe = Subscribe {
            pkid: 1,
            filters: vec![filter],
        };
        send(&mut watcher, Packet::Subscribe(subscribe, None)).await;
        let answer = recv(&mut watcher, &mut watcher_buffer).await;
        assert!(matches!(answer, Some(Packet::SubAck(..))), "{answer:?}");

        // The same client id with a wrong login: refused, and nothing else happens.
        let answer = answer_to(addr, connect("ward-1", 30, Some(("bad", "pw")))).await;
        assert_eq!(answer, connack(4));

        send(&mut ward, Packet::PingReq(PingReq)).await;
        let pong = time::timeout(Duration::from_secs(2), recv(&mut ward, &mut ward_buffer))
            .await
            .expect("no answer to the connected client's PINGREQ");
        assert!(matches!(pong, Some(Packet::PingResp(_))), "{pong:?}");
        let will = time::timeout(
            Duration::from_secs(1),
            recv(&mut watcher, &mut watcher_buffer),
        )
        .await;
        assert!(will.is_err(), "the will was published: {will:?}");

        // And the will does fire when the connected client goes away without DISCONNECT.
        drop(ward);
        let will = time::timeout(
            Duration::from_secs(3),
            recv(&mut watcher, &mut watcher_buffer),
        )
        .await
        .expect("the will was never published");
        assert!(
            matches!(&will, Some(Packet::Publish(p, _)) if p.topic == "wards/1/will"),
            "{will:?}"
        );
    }
}
