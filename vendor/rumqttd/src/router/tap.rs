//! Renkei patch: a tap, the router's hand-off of every accepted publish under a topic prefix
//! to one consumer, with back-pressure instead of loss.
//!
//! A subscriber reads a filter's log, which the router fills whether or not anyone reads it
//! and which drops its oldest segment when full: a reader that falls behind skips messages,
//! and the log holds its full size in memory for as long as it exists. A consumer that must
//! see every message (a broker's recorder) instead takes them from a tap:
//!
//! - the router hands each publish whose topic starts with the tap's prefix to the tap's
//!   queue after appending it to the logs and before the publisher's PUBACK (or PUBREC) can
//!   leave, with its topic, payload and the publishing client's id;
//! - while the queue holds [`TapLimits::max_messages`] messages or [`TapLimits::max_bytes`]
//!   bytes, the router takes no further tapped publish from any connection: it leaves the
//!   connection's packets where they are (so that connection's acknowledgements wait, and
//!   its client, bound by its in-flight window, stops sending), answers the PINGREQs among
//!   them at once, and puts the connection in line;
//! - when the consumer has taken the queue down to half of both limits it wakes the router,
//!   which serves the connections in line in turn (first come, first served, and a
//!   connection that fills the queue again goes to the back of the line), so one flooding
//!   client slows everyone by its share and starves no one.
//!
//! The queue's bounds are soft by at most the QoS 2 messages whose PUBREC went out before the
//! queue filled (their publish is handed over at PUBREL).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use flume::{Receiver, RecvTimeoutError, Sender, TryRecvError};

use crate::router::Event;
use crate::ConnectionId;

/// How much the tap's queue may hold before the router holds tapped publishes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TapLimits {
    pub max_messages: usize,
    /// Topic and payload bytes of the queued messages.
    pub max_bytes: usize,
}

/// One publish the router accepted, as the consumer gets it. Its topic and payload are its
/// own allocations, not views of the connection's read buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tapped {
    pub topic: Bytes,
    pub payload: Bytes,
    /// The client id of the connection (or local link) that published it.
    pub client_id: String,
}

impl Tapped {
    fn bytes(&self) -> usize {
        self.topic.len() + self.payload.len()
    }
}

/// What the consumer's side and the router's side share.
#[derive(Debug)]
struct Shared {
    limits: TapLimits,
    messages: AtomicUsize,
    bytes: AtomicUsize,
    /// Set by the router when it held a publish back; the consumer wakes it when it clears.
    waiting: AtomicBool,
    /// Times the router held a connection's publishes back.
    holds: AtomicU64,
}

impl Shared {
    fn has_room(&self) -> bool {
        self.messages.load(Ordering::SeqCst) < self.limits.max_messages
            && self.bytes.load(Ordering::SeqCst) < self.limits.max_bytes
    }

    fn below_low_water(&self) -> bool {
        self.messages.load(Ordering::SeqCst) <= self.limits.max_messages / 2
            && self.bytes.load(Ordering::SeqCst) <= self.limits.max_bytes / 2
    }
}

/// The router's side of a tap.
#[derive(Debug)]
pub struct Tap {
    prefix: String,
    tx: Sender<Tapped>,
    shared: Arc<Shared>,
}

impl Tap {
    /// Whether `topic` is one the tap takes. An empty topic (an MQTT 5 topic alias, resolved
    /// only when the publish is appended) may be one.
    pub(crate) fn may_take(&self, topic: &[u8]) -> bool {
        topic.is_empty() || topic.starts_with(self.prefix.as_bytes())
    }

    /// Whether a publish the tap takes must wait (counted as a hold). When it must, the
    /// consumer is asked to wake the router with [`Event::TapReady`] once the queue has gone
    /// down.
    pub(crate) fn must_hold(&self) -> bool {
        if !self.is_full() {
            return false;
        }
        self.shared.holds.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Whether the queue is full; if it is, the consumer will wake the router once it has
    /// gone down. Not counted: the router also asks this between connections it serves.
    pub(crate) fn is_full(&self) -> bool {
        if self.shared.has_room() {
            return false;
        }
        self.shared.waiting.store(true, Ordering::SeqCst);
        // The consumer may have drained the queue between the two looks, without a wake-up
        // (it saw no one waiting): look again, now that it will see the flag.
        if self.shared.has_room() {
            self.shared.waiting.store(false, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// Hands over a publish that was appended (whose bytes the router has already copied off
    /// the connection's read buffer: see `append_to_commitlog`).
    pub(crate) fn take(&self, topic: &Bytes, payload: &Bytes, client_id: &str) {
        if !topic.starts_with(self.prefix.as_bytes()) {
            return;
        }
        let tapped = Tapped {
            topic: topic.clone(),
            payload: payload.clone(),
            client_id: client_id.to_owned(),
        };
        let bytes = tapped.bytes();
        self.shared.messages.fetch_add(1, Ordering::SeqCst);
        self.shared.bytes.fetch_add(bytes, Ordering::SeqCst);
        if self.tx.send(tapped).is_err() {
            // The consumer is gone: nothing waits for the queue any more.
            self.shared.messages.fetch_sub(1, Ordering::SeqCst);
            self.shared.bytes.fetch_sub(bytes, Ordering::SeqCst);
        }
    }

    /// Whether the consumer has gone (its [`TapRx`] dropped): the tap then holds nothing back.
    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_disconnected()
    }
}

/// The consumer's side of a tap: every accepted publish under the prefix, in the order the
/// router accepted them.
#[derive(Debug)]
pub struct TapRx {
    rx: Receiver<Tapped>,
    shared: Arc<Shared>,
    router_tx: Sender<(ConnectionId, Event)>,
}

/// Why a tap cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TapError {
    #[error("the router has stopped")]
    RouterGone,
}

impl TapRx {
    /// The next publish, waiting until `deadline`; `Ok(None)` when there was none by then.
    pub fn recv_deadline(&self, deadline: Instant) -> Result<Option<Tapped>, TapError> {
        match self.rx.recv_deadline(deadline) {
            Ok(t) => Ok(Some(self.taken(t))),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(TapError::RouterGone),
        }
    }

    /// The next publish if one is queued.
    pub fn try_recv(&self) -> Result<Option<Tapped>, TapError> {
        match self.rx.try_recv() {
            Ok(t) => Ok(Some(self.taken(t))),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(TapError::RouterGone),
        }
    }

    /// Messages queued now.
    pub fn len(&self) -> usize {
        self.shared.messages.load(Ordering::SeqCst)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Times the router has held a connection's publishes back because the queue was full.
    pub fn holds(&self) -> u64 {
        self.shared.holds.load(Ordering::Relaxed)
    }

    fn taken(&self, tapped: Tapped) -> Tapped {
        self.shared.messages.fetch_sub(1, Ordering::SeqCst);
        self.shared
            .bytes
            .fetch_sub(tapped.bytes(), Ordering::SeqCst);
        if self.shared.below_low_water() && self.shared.waiting.swap(false, Ordering::SeqCst) {
            // A blocking send: the router never waits for the consumer, so it drains its
            // channel, and a wake-up must not be lost (the router would hold the publishers
            // until the next event from anyone).
            let _ = self.router_tx.send((0, Event::TapReady));
        }
        tapped
    }
}

/// Sets up a tap on the router `router_tx` leads to (the sender [`crate::Router::spawn`]
/// returns) and returns its consumer's side; see [`crate::Broker::tap`].
pub fn open(
    router_tx: &Sender<(ConnectionId, Event)>,
    prefix: &str,
    limits: TapLimits,
) -> Result<TapRx, flume::SendError<(ConnectionId, Event)>> {
    let (tap, rx) = tap(prefix.to_owned(), limits, router_tx.clone());
    router_tx.send((0, Event::NewTap(tap)))?;
    Ok(rx)
}

/// A tap's two sides: the router's and the consumer's.
pub(crate) fn tap(
    prefix: String,
    limits: TapLimits,
    router_tx: Sender<(ConnectionId, Event)>,
) -> (Tap, TapRx) {
    let (tx, rx) = flume::unbounded();
    let shared = Arc::new(Shared {
        limits: TapLimits {
            max_messages: limits.max_messages.max(1),
            max_bytes: limits.max_bytes.max(1),
        },
        messages: AtomicUsize::new(0),
        bytes: AtomicUsize::new(0),
        waiting: AtomicBool::new(false),
        holds: AtomicU64::new(0),
    });
    (
        Tap {
            prefix,
            tx,
            shared: shared.clone(),
        },
        TapRx {
            rx,
            shared,
            router_tx,
        },
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn b(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    fn pair(max_messages: usize, max_bytes: usize) -> (Tap, TapRx, Receiver<(usize, Event)>) {
        let (router_tx, router_rx) = flume::bounded(10);
        let (tap, rx) = tap(
            "renkei/v1/".into(),
            TapLimits {
                max_messages,
                max_bytes,
            },
            router_tx,
        );
        (tap, rx, router_rx)
    }

    #[test]
    fn only_the_prefix_is_taken() {
        let (tap, rx, _router) = pair(10, 1_000);
        tap.take(&b("renkei/v1/a/"), &b("payload"), "agent-1");
        tap.take(&b("other/topic"), &b("x"), "agent-1");
        let got = rx.try_recv().unwrap().unwrap();
        assert_eq!(got.topic, Bytes::from_static(b"renkei/v1/a/"));
        assert_eq!(got.payload, Bytes::from_static(b"payload"));
        assert_eq!(got.client_id, "agent-1");
        assert_eq!(rx.try_recv().unwrap(), None);
        assert!(tap.may_take(b"renkei/v1/x") && tap.may_take(b"") && !tap.may_take(b"x/y"));
    }

    #[test]
    fn a_full_queue_holds_and_draining_to_half_wakes_the_router_once() {
        let (tap, rx, router) = pair(4, 1_000_000);
        for _ in 0..4 {
            assert!(!tap.must_hold());
            tap.take(&b("renkei/v1/t"), &b("p"), "c");
        }
        assert!(tap.must_hold());
        assert_eq!(rx.len(), 4);
        assert_eq!(rx.holds(), 1);
        // Asking whether it is full (as the router does between the connections it serves)
        // holds no one and is not counted.
        assert!(tap.is_full());
        assert_eq!(rx.holds(), 1);
        rx.try_recv().unwrap().unwrap();
        // 3 left: above half, no wake-up yet, but there is room again.
        assert!(router.try_recv().is_err());
        rx.try_recv().unwrap().unwrap();
        // 2 left: half. One wake-up.
        assert!(matches!(router.try_recv(), Ok((0, Event::TapReady))));
        rx.try_recv().unwrap().unwrap();
        assert!(router.try_recv().is_err(), "one wake-up per hold");
    }

    #[test]
    fn the_byte_bound_holds_too() {
        let (tap, rx, router) = pair(1_000, 100);
        tap.take(&b("renkei/v1/t"), &Bytes::from(vec![0; 95]), "c");
        assert!(tap.must_hold());
        rx.recv_deadline(Instant::now() + Duration::from_secs(1))
            .unwrap()
            .unwrap();
        assert!(!tap.must_hold());
        assert!(matches!(router.try_recv(), Ok((0, Event::TapReady))));
    }

    #[test]
    fn a_queue_drained_between_the_routers_two_looks_is_not_held() {
        let (tap, rx, router) = pair(1, 1_000);
        tap.take(&b("renkei/v1/t"), &b("p"), "c");
        // The consumer takes it before the router sets its flag: it sees no one waiting.
        rx.try_recv().unwrap().unwrap();
        assert!(!tap.must_hold());
        assert!(router.try_recv().is_err());
    }

    #[test]
    fn a_gone_consumer_leaves_nothing_held() {
        let (tap, rx, _router) = pair(1, 1_000);
        drop(rx);
        assert!(tap.is_closed());
        tap.take(&b("renkei/v1/t"), &b("p"), "c");
        assert!(!tap.must_hold());
    }
}
