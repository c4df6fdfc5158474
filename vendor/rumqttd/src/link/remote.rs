use crate::link::local::{LinkError, LinkRx, LinkTx};
use crate::link::network;
use crate::link::network::Network;
use crate::local::LinkBuilder;
use crate::protocol::{self, ConnAck, Connect, ConnectReturnCode, Login, Packet, Protocol};
use crate::router::{Event, Notification};
use crate::{AuthVerdict, ConnectionId, ConnectionSettings};

use flume::{RecvError, SendError, Sender, TrySendError};
use std::cmp::min;
use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::time::error::Elapsed;
use tokio::{select, time};
use tracing::{trace, Span};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O")]
    Io(#[from] io::Error),
    #[error("Zero keep alive")]
    ZeroKeepAlive,
    #[error("Not connect packet")]
    NotConnectPacket(Packet),
    #[error("Network {0}")]
    Network(#[from] network::Error),
    #[error("Timeout")]
    Timeout(#[from] Elapsed),
    #[error("Channel send error")]
    Send(#[from] SendError<(ConnectionId, Event)>),
    #[error("Channel recv error")]
    Recv(#[from] RecvError),
    #[error("Got new session, disconnecting old one")]
    SessionEnd,
    #[error("Persistent session requires valid client id")]
    InvalidClientId,
    #[error("Unexpected router message")]
    NotConnectionAck,
    #[error("ConnAck error {0}")]
    ConnectionAck(String),
    /// Renkei patch: the CONNECT was refused (by the auth hook or by the protocol), and
    /// answered with a CONNACK carrying this code.
    #[error("Connect refused with {0:?}")]
    Refused(ConnectReturnCode),
    #[error("Channel try send error")]
    TrySend(#[from] TrySendError<(ConnectionId, Event)>),
    #[error("Link error = {0}")]
    Link(#[from] LinkError),
}

/// Renkei patch: packets a connection may have read and not yet handed to the router. Above
/// any client's in-flight window (Renkei's clients keep 100) with room for its PINGREQs and
/// acknowledgements.
pub(crate) const MAX_BUFFERED_INCOMING: usize = 512;

/// Renkei patch: the capacity a connection's buffers keep after a burst. A Renkei agent sends a
/// message or two at a time; 2,000 of them each keeping room for 32 packets (392 bytes each
/// then; 88 since patch 20) and 32 notifications (248 bytes) held some 40 MB for nothing.
pub(crate) const KEPT_CAPACITY: usize = 4;

/// Renkei patch: how often a connection whose buffer is full looks whether the router has
/// taken from it.
const FULL_BUFFER_RECHECK: Duration = Duration::from_millis(20);

/// Orchestrates between Router and Network.
pub struct RemoteLink<P> {
    connect: Connect,
    pub(crate) connection_id: ConnectionId,
    network: Network<P>,
    link_tx: LinkTx,
    link_rx: LinkRx,
    notifications: VecDeque<Notification>,
    pub(crate) will_delay_interval: u32,
}

impl<P: Protocol> RemoteLink<P> {
    pub async fn new(
        router_tx: Sender<(ConnectionId, Event)>,
        tenant_id: Option<String>,
        mut network: Network<P>,
        connect_packet: Packet,
        dynamic_filters: bool,
        assigned_client_id: Option<String>,
    ) -> Result<RemoteLink<P>, Error> {
        let Packet::Connect(connect, props, lastwill, lastwill_props, _) = connect_packet else {
            return Err(Error::NotConnectPacket(connect_packet));
        };

        // Register this connection with the router. Router replys with ack which if ok will
        // start the link. Router can sometimes reject the connection (ex max connection limit)
        let client_id = assigned_client_id.as_ref().unwrap_or(&connect.client_id);
        let clean_session = connect.clean_session;

        let topic_alias_max = props.as_ref().and_then(|p| p.topic_alias_max);
        let session_expiry = props
            .as_ref()
            .and_then(|p| p.session_expiry_interval)
            .unwrap_or(0);

        let delay_interval = lastwill_props
            .as_ref()
            .and_then(|f| f.delay_interval)
            .unwrap_or(0);

        // The Server delays publishing the Client’s Will Message until
        // the Will Delay Interval has passed or the Session ends, whichever happens first
        let will_delay_interval = min(session_expiry, delay_interval);

        let (link_tx, link_rx, notification) = LinkBuilder::new(client_id, router_tx)
            .tenant_id(tenant_id)
            .clean_session(clean_session)
            .last_will(crate::protocol::unboxed(lastwill))
            .last_will_properties(crate::protocol::unboxed(lastwill_props))
            .dynamic_filters(dynamic_filters)
            .topic_alias_max(topic_alias_max.unwrap_or(0))
            .build()?;

        let id = link_rx.id();
        Span::current().record("connection_id", id);

        if let Some(mut packet) = notification.into() {
            if let Packet::ConnAck(_ack, props) = &mut packet {
                let mut new_props = props.clone().unwrap_or_default();
                new_props.assigned_client_identifier = assigned_client_id;
                *props = Some(new_props);
                network.write(packet).await?;
            }
        }

        Ok(RemoteLink {
            connect,
            connection_id: id,
            network,
            link_tx,
            link_rx,
            // Renkei patch: allocated as it fills (see `Outgoing::new`).
            notifications: VecDeque::new(),
            will_delay_interval,
        })
    }

    pub async fn start(&mut self) -> Result<(), Error> {
        self.network.set_keepalive(self.connect.keep_alive);

        // Note:
        // Shouldn't result in bounded queue deadlocks because of blocking n/w send
        loop {
            // Renkei patch: packets read but not yet taken by the router are bounded. The
            // router may leave a connection's publishes unread while a tap's consumer is
            // behind (`router::tap`); a client within its in-flight window then waits for its
            // PUBACKs, and one that is not stops being read (TCP slows it) rather than
            // growing this buffer without bound.
            let room = self.link_tx.buffer().len() < MAX_BUFFERED_INCOMING;
            select! {
                o = self.network.read(), if room => {
                    let packet = o?;
                    let len = {
                        let mut buffer = self.link_tx.buffer();
                        buffer.push_back(packet);
                        self.network.readv(&mut buffer)?;
                        buffer.len()
                    };

                    trace!("Packets read from network, count = {}", len);
                    self.link_tx.notify().await?;
                }
                // Receive from router when previous when state isn't in collision
                // due to previously received data request
                o = self.link_rx.exchange(&mut self.notifications) => {
                    o?;
                    let mut packets = VecDeque::new();
                    let mut unscheduled = false;

                    for notif in self.notifications.drain(..) {
                        if let Some(packet) = notif.into() {
                            packets.push_back(packet);
                        } else {
                            unscheduled = true;
                        }

                    }
                    // Renkei patch: this buffer trades places with the router's on every
                    // exchange; one burst must not leave every later exchange carrying its
                    // capacity.
                    self.notifications.shrink_to(KEPT_CAPACITY);
                    self.network.writev(packets).await?;
                    if unscheduled {
                        self.link_rx.wake().await?;
                    }
                }
                // The router takes held packets without a word to the link (QoS 0 ones get
                // no acknowledgement): look again shortly.
                _ = time::sleep(FULL_BUFFER_RECHECK), if !room => {}
            }
        }
    }
}

/// Read MQTT connect packet from network and verify it.
/// authentication and checks are done here.
///
/// Renkei patch: the caller bounds this, with the TLS and WebSocket handshakes before it, by
/// `connection_timeout_ms` (`server::broker::accept_and_serve`). Upstream bounded only the
/// read of the CONNECT here, and an auth hook could take as long as it liked.
pub async fn mqtt_connect<P>(
    config: Arc<ConnectionSettings>,
    network: &mut Network<P>,
) -> Result<Packet, Error>
where
    P: Protocol,
{
    let packet = match network.read().await {
        Ok(packet) => packet,
        // Renkei patch: the protocol refused the CONNECT it read (see `ConnectRefused`).
        Err(network::Error::Protocol(protocol::Error::ConnectRefused(code))) => {
            return refuse(network, code).await;
        }
        Err(e) => return Err(e.into()),
    };

    let (connect, _props, login) = match packet {
        Packet::Connect(ref connect, ref props, _, _, ref login) => (connect, props, login),
        packet => return Err(Error::NotConnectPacket(packet)),
    };

    Span::current().record("client_id", &connect.client_id);

    if let Err(code) = handle_auth(config.clone(), login.as_deref(), &connect.client_id).await {
        return refuse(network, code).await;
    }

    // Renkei patch: upstream refused keep alive 0, without a CONNACK, because such a client
    // could stay connected forever. MQTT 3.1.1 (§3.1.2.10) and 5 allow it: the keep-alive
    // mechanism is off. The connection then has no read timeout, and a peer that is gone is
    // found out by TCP keep-alive (`server::broker::set_tcp_keepalive`).

    let empty_client_id = connect.client_id.is_empty();
    let clean_session = connect.clean_session;

    if empty_client_id && !clean_session {
        let ack = ConnAck {
            session_present: false,
            code: ConnectReturnCode::ClientIdentifierNotValid,
        };

        let packet = Packet::ConnAck(ack, None);
        network.write(packet).await?;

        return Err(Error::InvalidClientId);
    }

    // Ok((connect, props, lastwill, lastwill_props))
    Ok(packet)
}

/// Renkei patch: answers a refused CONNECT with a CONNACK carrying `code`, through the
/// connection's own protocol, and returns the refusal; the caller then drops the connection,
/// which closes it. Upstream closed refused connections without a CONNACK.
async fn refuse<P: Protocol>(
    network: &mut Network<P>,
    code: ConnectReturnCode,
) -> Result<Packet, Error> {
    // A refusal is never a success, whatever a handler or protocol said.
    let code = match code {
        ConnectReturnCode::Success => ConnectReturnCode::NotAuthorized,
        code => code,
    };
    let ack = ConnAck {
        session_present: false,
        code,
    };
    network.write(Packet::ConnAck(ack, None)).await?;
    Err(Error::Refused(code))
}

/// Renkei patch: a refusal now carries the CONNACK code to answer with: `NotAuthorized` for a
/// CONNECT without a login where auth is configured, `BadUserNamePassword` for a wrong static
/// password, and the auth hook's own verdict.
async fn handle_auth(
    config: Arc<ConnectionSettings>,
    login: Option<&Login>,
    client_id: &str,
) -> Result<(), ConnectReturnCode> {
    if config.auth.is_none() && config.external_auth.is_none() {
        return Ok(());
    }

    // if authentication is configured and connect packet doesn't have login details
    // return an error
    let Some(login) = login else {
        return Err(ConnectReturnCode::NotAuthorized);
    };

    let username = &login.username;
    let password = &login.password;

    if let Some(auth) = &config.external_auth {
        let verdict = auth(
            client_id.to_owned(),
            username.to_owned(),
            password.to_owned(),
        )
        .await;
        return match verdict {
            AuthVerdict::Accept => Ok(()),
            AuthVerdict::Refuse(code) => Err(code),
        };
    }

    if let Some(pairs) = &config.auth {
        if let Some(stored_password) = pairs.get(username) {
            if stored_password.as_bytes().ct_eq(password.as_bytes()).into() {
                return Ok(());
            }
        }

        return Err(ConnectReturnCode::BadUserNamePassword);
    }

    Err(ConnectReturnCode::NotAuthorized)
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, sync::Arc};

    use crate::{protocol::Login, ConnectionSettings};

    use super::handle_auth;

    fn config() -> ConnectionSettings {
        ConnectionSettings {
            connection_timeout_ms: 0,
            max_payload_size: 0,
            max_inflight_count: 0,
            auth: None,
            external_auth: None,
            dynamic_filters: false,
        }
    }

    fn login() -> Login {
        Login {
            username: "u".to_owned(),
            password: "p".to_owned(),
        }
    }

    #[tokio::test]
    async fn no_login_no_auth() {
        let cfg = Arc::new(config());
        let r = handle_auth(cfg, None, "").await;
        assert!(r.is_ok());
    }

    #[tokio::test]
    async fn some_login_no_auth() {
        let cfg = Arc::new(config());
        let login = login();
        let r = handle_auth(cfg, Some(&login), "").await;
        assert!(r.is_ok());
    }

    #[tokio::test]
    async fn login_matches_static_auth() {
        let login = login();
        let mut map = HashMap::<String, String>::new();
        map.insert(login.username.clone(), login.password.clone());

        let mut cfg = config();
        cfg.auth = Some(map);

        let r = handle_auth(Arc::new(cfg), Some(&login), "").await;
        assert!(r.is_ok());
    }

    #[tokio::test]
    async fn login_fails_static_no_external() {
        let login = login();
        let mut map = HashMap::<String, String>::new();
        map.insert("wrong".to_owned(), "wrong".to_owned());

        let mut cfg = config();
        cfg.auth = Some(map);

        let r = handle_auth(Arc::new(cfg), Some(&login), "").await;
        assert!(r.is_err());
    }

    #[tokio::test]
    async fn login_fails_static_matches_external() {
        let login = login();

        let mut map = HashMap::<String, String>::new();
        map.insert("wrong".to_owned(), "wrong".to_owned());

        let dynamic = |_: String, _: String, _: String| async { true };

        let mut cfg = config();
        cfg.auth = Some(map);
        cfg.set_auth_handler(dynamic);

        let r = handle_auth(Arc::new(cfg), Some(&login), "").await;
        assert!(r.is_ok());
    }

    #[tokio::test]
    async fn login_fails_static_fails_external() {
        let login = login();

        let mut map = HashMap::<String, String>::new();
        map.insert("wrong".to_owned(), "wrong".to_owned());

        let dynamic = |_: String, _: String, _: String| async { false };

        let mut cfg = config();
        cfg.auth = Some(map);
        cfg.set_auth_handler(dynamic);

        let r = handle_auth(Arc::new(cfg), Some(&login), "").await;
        assert!(r.is_err());
    }

    #[tokio::test]
    async fn external_auth_clousre_or_fnptr_type_check_or_fail_compile() {
        let closure = |_: String, _: String, _: String| async { false };
        async fn fnptr(_: String, _: String, _: String) -> bool {
            true
        }

        let mut cfg = config();
        cfg.set_auth_handler(closure);
        cfg.set_auth_handler(fnptr);
    }
}
