//! The listeners' sockets: a deep accept queue, free ports for port-0 addresses, a thread per
//! rumqttd listener, and the wait until each answers a real MQTT CONNECT.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use rumqttd::{LinkType, Server};
use tokio::sync::mpsc;

use super::{Guard, Listener, MqttError, READY_TIMEOUT, probe};

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
pub(super) fn resolve_port(addr: SocketAddr) -> Result<SocketAddr, MqttError> {
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

pub(super) fn spawn_listener(
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

pub(super) async fn wait_until_ready(
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
