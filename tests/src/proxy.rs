//! A TCP proxy the fault tests control: it sits between clients and a server on an ephemeral
//! port and can cut the network on command, then heal it.
//!
//! Hand-written because no crate offers this simply: fault proxies such as Toxiproxy run as
//! separate servers driven over HTTP (and are not packaged here), and the tokio proxy examples
//! only forward. The tests need, in-process and instantly, three behaviours of a real network:
//!
//! - [`Fault::Reset`]: every connection is torn down with a TCP RST (as when a router reboots)
//!   and new ones are reset at once;
//! - [`Fault::Blackhole`]: nothing moves either way, but no side is told (a cable cut between two
//!   switches): connections stay open until a keep-alive or timeout notices, and new ones are
//!   accepted but go nowhere until [`Proxy::restore`];
//! - up: bytes flow, counted both ways.
//!
//! The target can change while the proxy runs ([`Proxy::retarget`]), so clients keep one
//! address while the server behind it restarts on new ports.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How the proxy breaks the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Tear down every connection with RST and reset new ones.
    Reset,
    /// Forward nothing and tell nobody; connections stay open.
    Blackhole,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Up,
    Cut(Fault),
}

/// Counters since the proxy started.
#[derive(Debug, Default)]
pub struct Stats {
    /// Bytes forwarded from clients to the target.
    pub up: AtomicU64,
    /// Bytes forwarded from the target to clients.
    pub down: AtomicU64,
    /// Connections accepted from clients.
    pub accepted: AtomicU64,
    /// Connections forwarding now.
    pub open: AtomicU64,
}

struct Shared {
    target: Mutex<String>,
    mode: watch::Sender<Mode>,
    stats: Stats,
}

/// A running proxy; it stops (and drops every connection) when dropped.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("addr", &self.addr)
            .field("mode", &*self.shared.mode.borrow())
            .finish()
    }
}

impl Proxy {
    /// Listens on `127.0.0.1:0` and forwards every connection to `target` (`host:port`).
    /// Must be called within a tokio runtime; the proxy runs on it.
    pub async fn start(target: &str) -> Result<Proxy> {
        // A queue as deep as the broker's, so that a storm of clients connecting at once is not
        // dropped here, where there is no proxy in a real network.
        let listener =
            renkei_broker::mqtt::bind_queued(([127, 0, 0, 1], 0).into()).context("proxy bind")?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(Mode::Up);
        let shared = Arc::new(Shared {
            target: Mutex::new(target.to_owned()),
            mode,
            stats: Stats::default(),
        });
        let accept = tokio::spawn(accept_loop(listener, shared.clone()));
        Ok(Proxy {
            addr,
            shared,
            accept,
        })
    }

    /// `127.0.0.1:PORT` clients connect to.
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Breaks the network as `fault` says, for current and new connections.
    pub fn cut(&self, fault: Fault) {
        self.shared.mode.send_replace(Mode::Cut(fault));
    }

    /// Heals the network: new connections are forwarded; blackholed ones resume.
    pub fn restore(&self) {
        self.shared.mode.send_replace(Mode::Up);
    }

    /// Forwards new connections to `target` from now on (existing ones keep theirs).
    pub fn retarget(&self, target: &str) {
        if let Ok(mut t) = self.shared.target.lock() {
            *t = target.to_owned();
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Bytes forwarded so far, `(client → target, target → client)`.
    pub fn bytes(&self) -> (u64, u64) {
        let s = &self.shared.stats;
        (s.up.load(Ordering::Relaxed), s.down.load(Ordering::Relaxed))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Ends every connection task.
        self.shared.mode.send_replace(Mode::Cut(Fault::Reset));
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            // Out of descriptors or similar: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
        if *shared.mode.borrow() == Mode::Cut(Fault::Reset) {
            reset(client);
            continue;
        }
        tokio::spawn(connection(client, shared.clone()));
    }
}

/// Drops a socket with RST instead of FIN: the peer learns at once that the link is gone.
fn reset(stream: TcpStream) {
    abortive(&stream);
    drop(stream);
}

/// Linger 0: closing the socket sends RST. tokio deprecates `set_linger` because a non-zero
/// linger blocks the thread on drop; zero never blocks (the kernel discards at once).
#[allow(deprecated)]
fn abortive(stream: &TcpStream) {
    let _ = stream.set_linger(Some(Duration::ZERO));
}

/// Waits until the network is up; false if it was reset meanwhile.
async fn wait_up(mode: &mut watch::Receiver<Mode>) -> bool {
    match mode.wait_for(|m| *m != Mode::Cut(Fault::Blackhole)).await {
        Ok(m) => *m == Mode::Up,
        Err(_) => false,
    }
}

async fn wait_reset(mut mode: watch::Receiver<Mode>) {
    let _ = mode.wait_for(|m| *m == Mode::Cut(Fault::Reset)).await;
}

async fn connection(client: TcpStream, shared: Arc<Shared>) {
    let mut mode = shared.mode.subscribe();
    // A connection made during a blackhole waits, unanswered, as over a dead route.
    if !wait_up(&mut mode).await {
        reset(client);
        return;
    }
    let target = shared.target.lock().map(|t| t.clone()).unwrap_or_default();
    let Ok(server) = TcpStream::connect(&target).await else {
        reset(client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    // Linger 0 so that a reset (or the end of the test) sends RST on both sides.
    abortive(&client);
    abortive(&server);
    shared.stats.open.fetch_add(1, Ordering::Relaxed);
    let (client_rx, client_tx) = client.into_split();
    let (server_rx, server_tx) = server.into_split();
    let both = async {
        tokio::join!(
            pipe(
                client_rx,
                server_tx,
                shared.mode.subscribe(),
                &shared.stats.up
            ),
            pipe(
                server_rx,
                client_tx,
                shared.mode.subscribe(),
                &shared.stats.down
            ),
        )
    };
    tokio::select! {
        _ = both => {}
        () = wait_reset(shared.mode.subscribe()) => {}
    }
    shared.stats.open.fetch_sub(1, Ordering::Relaxed);
}

/// Copies one direction, holding still while the network is blackholed. Returns the write
/// half so that it is dropped (closing the socket) only when both directions are done.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    counter: &AtomicU64,
) -> OwnedWriteHalf {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if !wait_up(&mut mode).await {
            return to;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    let _ = to.shutdown().await;
                    return to;
                }
                Ok(n) => n,
            },
            // A cut while waiting for data: look at the mode again before reading on.
            _ = mode.changed() => continue,
        };
        // Bytes read just as the network went down are held, not delivered, until it is back.
        if !wait_up(&mut mode).await {
            return to;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return to;
        }
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}
