//! The HTTP listener: accepts connections and serves [`super::router`] on them with bounds that
//! a client cannot stretch.
//!
//! `axum::serve` reads request heads without a deadline and accepts every connection offered,
//! so a few hundred clients that open connections and send nothing (or one header byte now and
//! then: slowloris) hold a descriptor and a task each for as long as they like, and enough of
//! them exhaust the process's open-file limit, which the MQTT listeners share. Here:
//!
//! - **`http.header_read_timeout`**: a request head must arrive whole within this time of the
//!   connection opening, or of the previous response on a kept-alive connection (hyper starts
//!   the same clock whenever it waits for a head), else the connection is closed. This is also
//!   how long an idle kept-alive connection stays open.
//! - **`http.idle_timeout`**: a connection on which no byte has moved either way for this long
//!   is closed: a client that stops reading its response, or stops sending a request body. A
//!   request must therefore be answered within this time too.
//! - **`http.max_connections`**: connections served at once. The listener accepts only while
//!   it holds a free slot; beyond that, new connections wait in the kernel's listen queue (and
//!   are refused by the kernel once that is full) until a served one ends.
//!
//! HTTP/1.1 only, as before (axum's `http2` feature is off, and the `h2` crate is not in the
//! tree), so connections are hyper's HTTP/1 connections, built directly: hyper-util's
//! `auto::Builder` would first read to tell HTTP/1 from an HTTP/2 preface, a read with no
//! deadline of its own, and its graceful-shutdown support needs the `h2` crate.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tower::Layer as _;

use crate::config::HttpConfig;

/// The bounds of [`serve`], from the `[http]` configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

impl Limits {
    pub fn of(config: &HttpConfig) -> Limits {
        Limits {
            header_read_timeout: config.header_read_timeout.0,
            idle_timeout: config.idle_timeout.0,
            max_connections: config.max_connections,
        }
    }
}

/// How often, at most, a full connection table is logged.
const FULL_LOG_EVERY: Duration = Duration::from_secs(60);

/// Serves `router` on `listener` until `shutdown` resolves; then stops accepting, lets the
/// requests in flight finish (idle connections close at once) and returns once every
/// connection has ended. Each request carries its client's address as
/// `ConnectInfo<SocketAddr>`, which counts failed logins.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut logged_full: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        // A slot before accepting: while there is none, connections wait in the kernel's
        // queue instead of costing a descriptor here.
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if logged_full.is_none_or(|at| at.elapsed() >= FULL_LOG_EVERY) {
                    logged_full = Some(Instant::now());
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "HTTP connections at http.max_connections: new ones wait to be accepted"
                    );
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        // The semaphore is never closed.
                        Err(_) => break,
                    },
                    () = &mut shutdown => break,
                }
            }
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let service =
            TowerToHyperService::new(axum::Extension(ConnectInfo(peer)).layer(router.clone()));
        let io = TokioIo::new(IdleTimeout::new(stream, limits.idle_timeout));
        let connection = graceful.watch(builder.serve_connection(io, service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                // Timeouts and clients that go away: theirs to know, not an operator's.
                tracing::debug!(%peer, error = %e, "HTTP connection ended");
            }
            drop(slot);
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// What `accept` failing means: a connection that went away before it was accepted is
/// nothing; anything else (out of descriptors, `EMFILE`) is logged and waited out for a
/// second rather than retried in a busy loop, as `axum::serve` does.
async fn accept_failed(e: io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "cannot accept an HTTP connection");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// A TCP stream whose reads and writes fail once nothing has moved either way for `timeout`.
///
/// The deadline is shared by both directions and pushed back by every byte read or written,
/// so a slow but steady download is not cut; a stalled one is.
struct IdleTimeout {
    inner: TcpStream,
    timeout: Duration,
    deadline: Pin<Box<Sleep>>,
}

impl IdleTimeout {
    fn new(inner: TcpStream, timeout: Duration) -> IdleTimeout {
        IdleTimeout {
            inner,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }

    fn moved(&mut self) {
        let next = Instant::now() + self.timeout;
        self.deadline.as_mut().reset(next);
    }

    /// For an operation the stream left pending: the error once the deadline has passed
    /// (the timer wakes the task then), else pending.
    fn stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "nothing moved within http.idle_timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        p: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match p {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.moved();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.stalled(cx),
        }
    }
}

impl AsyncRead for IdleTimeout {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.moved();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => this.stalled(cx),
        }
    }
}

impl AsyncWrite for IdleTimeout {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let p = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.after_write(cx, p)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let p = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.after_write(cx, p)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
