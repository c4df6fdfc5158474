//! Raw TCP for the tests that play a client no library would be: one that connects from a
//! chosen address, says nothing, or never reads.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::net::{TcpSocket, TcpStream};

/// A connection to `to` from `source`: any 127.x.y.z is this machine's loopback too, so a
/// test can be many clients at once.
pub async fn connect_from(source: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(to).await
}

/// Reads (and drops) what the peer sends until it closes; whether it did before `deadline`.
pub async fn closed_by(read: &mut (impl AsyncRead + Unpin), deadline: Instant) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline.into(), read.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            // A response, if the server sends one before closing.
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}
