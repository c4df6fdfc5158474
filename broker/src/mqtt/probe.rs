//! Readiness probes: a real MQTT 3.1.1 CONNECT → CONNACK → DISCONNECT on each listener.
//!
//! A bare TCP connect would only prove the port is bound; a CONNACK proves the listener, the
//! protocol, authentication and the router answer. The probe logs in as the process's own
//! probe user ([`crate::auth::PROBE_USER`], a name no stored user can have, with a password
//! made at start). The packets are a few bytes built here and the WebSocket framing is the few
//! lines a client needs, so no MQTT or WebSocket client library is linked for this. The MQTTS
//! probe runs the same CONNECT through a real TLS handshake that pins the configured
//! certificate ([`super::tls`]).

use std::io::{Error, ErrorKind, Result};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A listener to probe.
pub enum Target {
    /// `proxied`: the listener expects a PROXY protocol header first.
    Tcp {
        addr: SocketAddr,
        proxied: bool,
    },
    WebSocket(SocketAddr),
    Tls(SocketAddr, TlsConnector),
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp { addr, .. } => write!(f, "TCP {addr}"),
            Target::WebSocket(addr) => write!(f, "WebSocket {addr}"),
            Target::Tls(addr, _) => write!(f, "MQTTS {addr}"),
        }
    }
}

impl Target {
    pub async fn probe(&self, connect: &[u8]) -> Result<()> {
        match self {
            Target::Tcp { addr, proxied } => tcp(*addr, *proxied, connect).await,
            Target::WebSocket(addr) => websocket(*addr, connect).await,
            Target::Tls(addr, connector) => tls(*addr, connector, connect).await,
        }
    }
}

/// Where to reach a listener bound to `addr` from this host: a wildcard address is reached on
/// loopback.
pub fn reachable(addr: SocketAddr) -> SocketAddr {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port())
}

/// How long one probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// CONNECT, MQTT 3.1.1, clean session, keep-alive 10 s, empty client id (the broker assigns a
/// unique one, so the probe never displaces a real client), with a user name and password.
pub fn connect_packet(user: &str, password: &str) -> Vec<u8> {
    let mut body = vec![
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0xc2, 0x00, 0x0a, 0x00, 0x00,
    ];
    for field in [user, password] {
        let len = u16::try_from(field.len()).unwrap_or(u16::MAX);
        body.extend_from_slice(&len.to_be_bytes());
        body.extend_from_slice(&field.as_bytes()[..usize::from(len)]);
    }
    // The probe's own short login: one length byte suffices (< 128).
    let mut packet = vec![0x10, u8::try_from(body.len()).unwrap_or(0x7f)];
    packet.extend_from_slice(&body);
    packet
}

const DISCONNECT: [u8; 2] = [0xe0, 0x00];

/// Probes the MQTT-over-TCP listener; a `proxied` one is told the probe's address is unknown
/// (`PROXY UNKNOWN`, the form for connections a proxy did not relay).
pub async fn tcp(addr: SocketAddr, proxied: bool, connect: &[u8]) -> Result<()> {
    within_timeout(async {
        let mut stream = TcpStream::connect(addr).await?;
        if proxied {
            stream.write_all(b"PROXY UNKNOWN\r\n").await?;
        }
        connect_disconnect(&mut stream, connect).await
    })
    .await
}

/// Probes the MQTTS listener: TLS handshake, then CONNECT → CONNACK → DISCONNECT inside.
pub async fn tls(addr: SocketAddr, connector: &TlsConnector, connect: &[u8]) -> Result<()> {
    within_timeout(async {
        let mut stream = super::tls::connect(addr, connector).await?;
        connect_disconnect(&mut stream, connect).await
    })
    .await
}

async fn connect_disconnect(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    connect: &[u8],
) -> Result<()> {
    stream.write_all(connect).await?;
    stream.flush().await?;
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).await?;
    check_connack(&connack)?;
    stream.write_all(&DISCONNECT).await?;
    stream.flush().await?;
    wait_for_close(stream).await
}

/// Probes the MQTT-over-WebSocket listener, checking that it answers the subprotocol `mqtt`
/// (browsers refuse the connection otherwise).
pub async fn websocket(addr: SocketAddr, connect: &[u8]) -> Result<()> {
    within_timeout(async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!(
            "GET /mqtt HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: cmVua2VpLXByb2JlLWtleQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: mqtt\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let head = read_http_head(&mut stream).await?;
        let status = head.lines().next().unwrap_or_default();
        if !status.starts_with("HTTP/1.1 101") {
            return Err(invalid(format!("upgrade refused: {status:?}")));
        }
        if subprotocol(&head) != Some("mqtt") {
            return Err(invalid("upgrade does not answer subprotocol mqtt".into()));
        }
        stream.write_all(&client_frame(0x2, connect)).await?;
        let connack = read_server_frame(&mut stream).await?;
        check_connack(&connack)?;
        stream.write_all(&client_frame(0x2, &DISCONNECT)).await?;
        stream.write_all(&client_frame(0x8, &[])).await?;
        wait_for_close(&mut stream).await
    })
    .await
}

/// The `Sec-WebSocket-Protocol` of an HTTP response head, if any.
pub fn subprotocol(head: &str) -> Option<&str> {
    head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("sec-websocket-protocol")
            .then(|| value.trim())
    })
}

async fn within_timeout(probe: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(PROBE_TIMEOUT, probe)
        .await
        .map_err(|_| Error::new(ErrorKind::TimedOut, "no answer"))?
}

/// Lets the broker close the connection after DISCONNECT: closing first races the router's
/// own clean-up, which rumqttd then logs as an error.
async fn wait_for_close(stream: &mut (impl AsyncRead + Unpin)) -> Result<()> {
    let mut sink = [0u8; 64];
    loop {
        match stream.read(&mut sink).await {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            // A TLS peer that closes without close_notify: the relay drops the connection
            // when rumqttd does, which is the close this waits for.
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

fn check_connack(packet: &[u8]) -> Result<()> {
    match packet {
        [0x20, 0x02, _, 0x00] => Ok(()),
        [0x20, 0x02, _, code] => Err(invalid(format!("CONNACK refused with code {code}"))),
        other => Err(invalid(format!("expected CONNACK, got {other:02x?}"))),
    }
}

fn invalid(message: String) -> Error {
    Error::new(ErrorKind::InvalidData, message)
}

/// Reads an HTTP response head, up to and including the blank line.
async fn read_http_head(stream: &mut TcpStream) -> Result<String> {
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    // Byte by byte: the server sends nothing after the head until the client speaks, and
    // reading no further than the head leaves the stream at the first WebSocket frame.
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8 * 1024 {
            return Err(invalid("HTTP response head too long".into()));
        }
        stream.read_exact(&mut byte).await?;
        head.push(byte[0]);
    }
    String::from_utf8(head).map_err(|_| invalid("HTTP response head is not UTF-8".into()))
}

/// A final client frame with `opcode`. Clients must mask; the zero key leaves data as is.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    debug_assert!(payload.len() < 126, "probe frames are short");
    let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(payload);
    frame
}

/// Reads one short unmasked server frame and returns its payload.
async fn read_server_frame(stream: &mut (impl AsyncRead + Unpin)) -> Result<Vec<u8>> {
    let mut head = [0u8; 2];
    stream.read_exact(&mut head).await?;
    let len = usize::from(head[1] & 0x7f);
    if head[1] & 0x80 != 0 || len >= 126 {
        return Err(invalid(format!("unexpected frame header {head:02x?}")));
    }
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await?;
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_subprotocol_header() {
        let head = "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\
                    sec-websocket-protocol: mqtt\r\n\r\n";
        assert_eq!(subprotocol(head), Some("mqtt"));
        assert_eq!(subprotocol("HTTP/1.1 101 OK\r\n\r\n"), None);
    }

    #[test]
    fn reads_connack_codes() {
        assert!(check_connack(&[0x20, 2, 0, 0]).is_ok());
        assert!(check_connack(&[0x20, 2, 0, 5]).is_err());
        assert!(check_connack(&[0x30, 2, 0, 0]).is_err());
    }

    #[test]
    fn masks_client_frames() {
        assert_eq!(
            client_frame(0x2, &DISCONNECT),
            [0x82, 0x82, 0, 0, 0, 0, 0xe0, 0x00]
        );
    }
}
