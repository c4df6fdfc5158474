//! The consumer of every Renkei message.
//!
//! Its source is a rumqttd link subscribed to `renkei/v1/#` (embedded broker), or the messages
//! an external broker delivers to [`crate::external`]; both feed [`Pipeline::handle`], which
//! for each publish: parses the topic,
//! decodes the payload, checks that the message belongs on that topic, applies it to the live
//! [`State`], hands it to the [`crate::recorder`] and, if it changed the state (or is a
//! command, which carries none), re-publishes it as JSON on the mirror topic for integrators.
//! A message that fails is quarantined by the recorder, counted by reason and logged, at most [`LOG_LINES_PER_SECOND`] lines per second per
//! reason so that one broken sender cannot flood the log.
//!
//! rumqttd's link API is blocking (its router is a thread fed by channels), so ingest runs on a
//! thread of its own rather than on the async runtime that serves HTTP; so does the external
//! source, whose client runs its own event loop thread.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use renkei_shared::topic;
use renkei_shared::validate::validate_for_topic;
use renkei_shared::{BodyKind, Change, Envelope, Scope, State, Topic, decode};
use rumqttd::Notification;
use rumqttd::local::{LinkError, LinkRx, LinkTx};
use tokio::sync::oneshot;

use crate::external::Incoming;
use crate::metrics::Metrics;
use crate::mqtt::Publisher;
use crate::recorder::{Record, RecorderTx};
use crate::rules::Trigger;

/// The live cross-ward state, written by ingest and read by HTTP.
pub type LiveState = Arc<RwLock<State>>;

/// Lines logged per refusal reason and second before the rest are only counted.
pub const LOG_LINES_PER_SECOND: u32 = 3;

/// How often the ingest thread looks up from its link to see whether it should stop.
const STOP_POLL: Duration = Duration::from_millis(200);

/// Longest topic quoted in a log line (topics come from the network).
const MAX_LOGGED_TOPIC: usize = 160;

/// Why ingest stopped.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Boxed: rumqttd's error carries a whole router event.
    #[error("the ingest link failed: {0}")]
    Link(Box<LinkError>),
    #[error("the router disconnected the ingest link")]
    Disconnected,
    #[error("the external broker's client stopped")]
    ExternalGone,
    #[error("cannot start the ingest thread: {0}")]
    Thread(std::io::Error),
}

impl From<LinkError> for IngestError {
    fn from(e: LinkError) -> Self {
        IngestError::Link(Box::new(e))
    }
}

/// A message that passed every check, with what applying it did.
#[derive(Debug)]
pub struct Accepted {
    pub topic: Topic,
    pub envelope: Envelope,
    pub change: Change,
}

/// A message refused, with a stable reason for metrics and a detail for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: &'static str,
    pub detail: String,
}

/// Checks one publish and applies it to `state`.
pub fn process(state: &RwLock<State>, topic: &[u8], payload: &[u8]) -> Result<Accepted, Rejection> {
    let bad_topic = |detail: String| Rejection {
        reason: "bad_topic",
        detail,
    };
    let text = std::str::from_utf8(topic).map_err(|_| bad_topic("topic is not UTF-8".into()))?;
    let topic = Topic::parse(text).map_err(|e| bad_topic(e.to_string()))?;
    let envelope = decode(payload).map_err(|e| Rejection {
        reason: e.reason(),
        detail: e.to_string(),
    })?;
    validate_for_topic(&envelope, &topic).map_err(|e| Rejection {
        reason: e.reason(),
        detail: e.to_string(),
    })?;
    let change = state
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .apply(&envelope);
    Ok(Accepted {
        topic,
        envelope,
        change,
    })
}

/// The running ingest thread.
#[derive(Debug)]
pub struct Ingest {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Resolves with the reason if the thread ends on its own.
    failed: Option<oneshot::Receiver<IngestError>>,
}

/// What every source hands each message to.
#[derive(Debug)]
pub struct Setup {
    pub state: LiveState,
    pub metrics: Arc<Metrics>,
    pub recorder: Option<RecorderTx>,
    /// Woken when a site's state changed.
    pub rules: Option<Trigger>,
}

impl Ingest {
    /// Subscribes `link` (embedded broker) to every Renkei message and starts consuming.
    ///
    /// The subscription is sent before this returns, so a listener started afterwards cannot
    /// deliver a message that ingest misses.
    pub fn start(link: (LinkTx, LinkRx), setup: Setup) -> Result<Ingest, IngestError> {
        let (mut tx, rx) = link;
        tx.subscribe(topic::ALL)?;
        let mirror = Publisher::Embedded { tx, _rx: None };
        Ingest::spawn(move |stop| {
            let consumer = Consumer {
                rx,
                pipeline: Pipeline::new(setup, mirror),
                offsets: Offsets::at_start(),
                stop,
            };
            consumer.run()
        })
    }

    /// Consumes what an external broker delivers (see [`crate::external`]), mirroring through
    /// `client`, and acknowledges each message once handled.
    pub fn start_external(
        incoming: std::sync::mpsc::Receiver<Incoming>,
        client: rumqttc::AsyncClient,
        setup: Setup,
    ) -> Result<Ingest, IngestError> {
        Ingest::spawn(move |stop| {
            let mut pipeline = Pipeline::new(setup, Publisher::External(client.clone()));
            while !stop.load(Ordering::Relaxed) {
                let message = match incoming.recv_timeout(STOP_POLL) {
                    Ok(message) => message,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => return Err(IngestError::ExternalGone),
                };
                pipeline.handle(message.publish.topic.as_bytes(), &message.publish.payload);
                // Acknowledged once handed to the recorder's queue, as the embedded path
                // takes a message off the router's log: the broker redelivers what was not
                // acknowledged when the connection drops, and the recorder keeps it once.
                if let Err(e) = futures::executor::block_on(client.ack(&message.publish)) {
                    tracing::debug!(error = %e, "cannot acknowledge: the client is stopping");
                }
            }
            Ok(())
        })
    }

    fn spawn(
        body: impl FnOnce(Arc<AtomicBool>) -> Result<(), IngestError> + Send + 'static,
    ) -> Result<Ingest, IngestError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (failed_tx, failed) = oneshot::channel();
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("renkei-ingest".into())
            .spawn(move || {
                if let Err(e) = body(thread_stop) {
                    tracing::error!(error = %e, "ingest stopped");
                    let _ = failed_tx.send(e);
                }
            })
            .map_err(IngestError::Thread)?;
        Ok(Ingest {
            stop,
            thread: Some(thread),
            failed: Some(failed),
        })
    }

    /// Resolves if ingest stops on its own; never while it is healthy.
    pub async fn failed(&mut self) -> IngestError {
        match self.failed.as_mut() {
            Some(rx) => match rx.await {
                Ok(e) => e,
                // The thread ended without an error: only `stop` does that.
                Err(_) => std::future::pending().await,
            },
            None => std::future::pending().await,
        }
    }

    /// Stops the thread after the message in hand and waits for it.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The embedded broker's source: ingest's rumqttd link.
struct Consumer {
    rx: LinkRx,
    pipeline: Pipeline,
    offsets: Offsets,
    stop: Arc<AtomicBool>,
}

/// Where ingest is in the router's `renkei/v1/#` log.
///
/// rumqttd keeps one in-memory log per subscribed filter, numbered by a per-log offset that
/// grows by one per message across segments. When a reader falls further behind than the log
/// holds, the oldest segment is dropped and the reader's next read silently starts at the
/// oldest one left: the only trace a local link gets is a jump in the offsets it is handed.
/// (Retained messages sent on subscribing carry no offset.)
#[derive(Debug)]
struct Offsets {
    /// The offset of the next message ingest expects.
    next: u64,
}

impl Offsets {
    /// Ingest subscribes before anything is published in this process (the filter is created
    /// empty with the router, and no listener or link publishes before [`Ingest::start`]
    /// returns), so its first message is offset 0: a first read that starts later has already
    /// lost what came before it.
    fn at_start() -> Offsets {
        Offsets { next: 0 }
    }

    /// Takes the offset of the message just read; returns how many were dropped before it.
    fn read(&mut self, offset: u64) -> u64 {
        let lost = offset.saturating_sub(self.next);
        self.next = offset + 1;
        lost
    }
}

impl Consumer {
    fn run(mut self) -> Result<(), IngestError> {
        while !self.stop.load(Ordering::Relaxed) {
            let notification = match self.rx.recv_deadline(Instant::now() + STOP_POLL) {
                Ok(Some(n)) => n,
                Ok(None) => continue,
                Err(LinkError::RecvTimeout(flume::RecvTimeoutError::Timeout)) => continue,
                Err(e) => return Err(e.into()),
            };
            match notification {
                Notification::Forward(forward) => {
                    self.check_offset(forward.cursor);
                    self.pipeline
                        .handle(&forward.publish.topic, &forward.publish.payload);
                }
                // The router stops forwarding to a link whose buffer filled up until the link
                // says it is ready again; by now everything before this marker was taken.
                Notification::Unschedule => {
                    tracing::debug!("ingest link unscheduled by the router; ready again");
                    self.rx.ready()?;
                }
                Notification::Disconnect(..) => return Err(IngestError::Disconnected),
                other => tracing::debug!(?other, "ingest link notification"),
            }
        }
        Ok(())
    }

    /// Counts messages the router dropped before ingest read them (see [`Offsets`]).
    fn check_offset(&mut self, cursor: Option<(u64, u64)>) {
        let Some((_, offset)) = cursor else { return };
        let expected = self.offsets.next;
        let lost = self.offsets.read(offset);
        if lost > 0 {
            self.pipeline.metrics.ingest_skipped(lost);
            tracing::error!(
                lost,
                from_offset = expected,
                to_offset = offset,
                "ingest fell behind the router's log and lost messages: they are neither \
                 recorded nor applied (raise mqtt.segment_size or mqtt.segment_count)"
            );
        }
    }
}

/// Decode, validate, apply, record, mirror: the one path of every message, whatever its source.
pub struct Pipeline {
    state: LiveState,
    metrics: Arc<Metrics>,
    recorder: Option<RecorderTx>,
    rules: Option<Trigger>,
    mirror: Publisher,
    log: LogLimiter,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline").finish_non_exhaustive()
    }
}

impl Pipeline {
    pub fn new(setup: Setup, mirror: Publisher) -> Pipeline {
        Pipeline {
            state: setup.state,
            metrics: setup.metrics,
            recorder: setup.recorder,
            rules: setup.rules,
            mirror,
            log: LogLimiter::new(LOG_LINES_PER_SECOND, Duration::from_secs(1)),
        }
    }

    /// Handles one publish received on `topic`.
    pub fn handle(&mut self, topic: &[u8], payload: &[u8]) {
        let received_at = crate::http::now();
        match process(&self.state, topic, payload) {
            Ok(accepted) => {
                self.metrics
                    .accepted(accepted.envelope.body.kind(), &accepted.change);
                // A redelivery adds nothing, and an older report arriving late must not
                // replace the newer one retained on the mirror.
                if matches!(accepted.change, Change::Updated { .. } | Change::NotState) {
                    self.republish_json(&accepted);
                }
                if let (
                    Change::Updated {
                        scope: Scope::Site(_),
                        ..
                    },
                    Some(rules),
                ) = (&accepted.change, &self.rules)
                {
                    rules.poke();
                }
                if let Some(recorder) = &self.recorder {
                    recorder.send(Record::Accepted {
                        received_at,
                        topic: accepted.topic,
                        envelope: Box::new(accepted.envelope),
                        payload: payload.to_vec(),
                    });
                }
            }
            Err(rejection) => {
                self.metrics.rejected(rejection.reason);
                if let Some(recorder) = &self.recorder {
                    let topic = String::from_utf8_lossy(topic);
                    recorder.send(Record::Rejected {
                        received_at,
                        topic: topic.chars().take(MAX_LOGGED_TOPIC).collect(),
                        reason: rejection.reason,
                        detail: rejection.detail.clone(),
                        payload: payload.to_vec(),
                    });
                }
                if let Some(suppressed) = self.log.admit(rejection.reason, Instant::now()) {
                    let topic = String::from_utf8_lossy(topic);
                    let topic: String = topic.chars().take(MAX_LOGGED_TOPIC).collect();
                    tracing::warn!(
                        reason = rejection.reason,
                        %topic,
                        bytes = payload.len(),
                        suppressed,
                        "refused message: {}",
                        rejection.detail
                    );
                }
            }
        }
    }

    fn republish_json(&mut self, accepted: &Accepted) {
        let kind: BodyKind = accepted.envelope.body.kind();
        let json = match serde_json::to_vec(&accepted.envelope) {
            Ok(json) => json,
            Err(e) => {
                self.metrics.json_failed();
                tracing::error!(error = %e, kind = kind.as_str(), "cannot encode JSON mirror");
                return;
            }
        };
        match self
            .mirror
            .publish(accepted.topic.json(), json, accepted.topic.retained())
        {
            Ok(()) => self.metrics.json_republished(),
            Err(e) => {
                self.metrics.json_failed();
                tracing::error!(error = %e, "cannot re-publish JSON mirror");
            }
        }
    }
}

/// Decides which refusals are logged: at most `per_window` lines per reason and window; the
/// next line after a quiet spell reports how many were left out.
#[derive(Debug)]
pub struct LogLimiter {
    per_window: u32,
    window: Duration,
    reasons: HashMap<&'static str, Window>,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    logged: u32,
    suppressed: u64,
}

impl LogLimiter {
    pub fn new(per_window: u32, window: Duration) -> Self {
        LogLimiter {
            per_window,
            window,
            reasons: HashMap::new(),
        }
    }

    /// `Some(suppressed since the last logged line)` if this one is to be logged, else `None`.
    pub fn admit(&mut self, reason: &'static str, now: Instant) -> Option<u64> {
        let w = self.reasons.entry(reason).or_insert(Window {
            started: now,
            logged: 0,
            suppressed: 0,
        });
        if now.saturating_duration_since(w.started) >= self.window {
            w.started = now;
            w.logged = 0;
        }
        if w.logged < self.per_window {
            w.logged += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use renkei_shared::{Mode, encode, sample};

    use super::*;

    fn status_topic() -> String {
        Topic::of(&sample::status()).unwrap().to_string()
    }

    #[test]
    fn accepts_a_valid_message_on_its_topic() {
        let state = RwLock::new(State::new());
        let bytes = encode(&sample::status()).unwrap();
        let accepted = process(&state, status_topic().as_bytes(), &bytes).unwrap();
        assert!(matches!(accepted.change, Change::Updated { .. }));
        assert_eq!(
            accepted.topic.json(),
            "renkei/json/v1/131041/nishi-shinjuku-es/status"
        );
        let state = state.read().unwrap();
        assert!(
            state
                .world(Mode::Actual)
                .sites
                .contains_key(&sample::site())
        );
    }

    #[test]
    fn offsets_count_every_message_dropped_before_ingest_read_it() {
        let mut offsets = Offsets::at_start();
        // The router dropped the first segments before ingest's first read.
        assert_eq!(offsets.read(4_720), 4_720);
        assert_eq!(offsets.read(4_721), 0);
        assert_eq!(offsets.read(4_722), 0);
        // A later jump.
        assert_eq!(offsets.read(5_000), 277);
        // Nothing lost from the start.
        let mut offsets = Offsets::at_start();
        assert_eq!((0..100).map(|o| offsets.read(o)).sum::<u64>(), 0);
    }

    #[test]
    fn a_repeat_is_a_duplicate() {
        let state = RwLock::new(State::new());
        let bytes = encode(&sample::shelter()).unwrap();
        let topic = Topic::of(&sample::shelter()).unwrap().to_string();
        process(&state, topic.as_bytes(), &bytes).unwrap();
        let again = process(&state, topic.as_bytes(), &bytes).unwrap();
        assert_eq!(again.change, Change::Duplicate);
    }

    #[test]
    fn refusals_carry_stable_reasons() {
        let state = RwLock::new(State::new());
        let good = encode(&sample::status()).unwrap();
        let status = status_topic();
        let status = status.as_bytes();
        let cases: [(&[u8], &[u8], &str); 6] = [
            (b"renkei/v1/131041/a/weather", &good, "bad_topic"),
            (b"renkei/v1/\xff/a/status", &good, "bad_topic"),
            (status, b"", "empty"),
            (status, b"\x01\xff\xff\xff", "malformed"),
            (status, b"\x09abc", "unsupported_version"),
            (b"renkei/v1/131016/chiyoda-es/status", &good, "wrong_topic"),
        ];
        for (topic, payload, reason) in cases {
            let err = process(&state, topic, payload).unwrap_err();
            assert_eq!(err.reason, reason, "{}", err.detail);
        }
        assert_eq!(*state.read().unwrap(), State::new());
    }

    #[test]
    fn limits_log_lines_per_reason_and_reports_what_it_left_out() {
        let mut log = LogLimiter::new(3, Duration::from_secs(1));
        let t0 = Instant::now();
        let admitted: Vec<_> = (0..10).map(|_| log.admit("malformed", t0)).collect();
        assert_eq!(&admitted[..3], &[Some(0), Some(0), Some(0)]);
        assert!(admitted[3..].iter().all(Option::is_none));
        // Another reason has its own budget.
        assert_eq!(log.admit("wrong_topic", t0), Some(0));
        // A second later the next line says how many were suppressed.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(log.admit("malformed", t1), Some(7));
        assert_eq!(log.admit("malformed", t1), Some(0));
    }
}
