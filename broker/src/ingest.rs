//! The consumer of every Renkei message.
//!
//! Its source is the embedded router's tap (every message accepted under `renkei/v1/`, handed
//! over before its PUBACK, with the publishers held back while ingest is behind: nothing is
//! skipped), or the messages an external broker delivers to [`crate::external`]; both feed [`Pipeline::handle`], which
//! for each publish: parses the topic, decodes the payload, checks that the message belongs on
//! that topic, applies it to the live [`State`], and queues its record for the
//! [`crate::recorder`] and, if it changed the state (or is a command, which carries none), its
//! JSON copy for the mirror topic that integrators read. The source hands the queue on with
//! [`Pipeline::flush`] whenever it has nothing more to read at once (see [`Pipeline`]). A
//! message that fails is quarantined by the recorder, counted by reason and logged, at most
//! [`LOG_LINES_PER_SECOND`] lines per second per reason so that one broken sender cannot flood
//! the log.
//!
//! rumqttd's link API is blocking (its router is a thread fed by channels), so ingest runs on a
//! thread of its own rather than on the async runtime that serves HTTP; so does the external
//! source, whose client runs its own event loop thread.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{RecvTimeoutError, TryRecvError};
use std::sync::{Arc, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use renkei_shared::mirror::MirroredRef;
use renkei_shared::{BodyKind, Change, Envelope, Scope, State, Timestamp, Topic};
use rumqttd::TapRx;
use rumqttd::local::{LinkRx, LinkTx};
use tokio::sync::oneshot;

use crate::clock::Clock;
use crate::external::Incoming;
use crate::jetstream::{Delivered, Settle};
use crate::live::LiveState;
use crate::metrics::Metrics;
use crate::publisher::{Outgoing, Publisher};
use crate::recorder::{HANDOFF_RECORDS, Progress, Record, RecorderTx};
use crate::rules::Trigger;
use crate::skew;

/// Lines logged per refusal reason and second before the rest are only counted.
pub const LOG_LINES_PER_SECOND: u32 = 3;

/// How often the ingest thread looks up from its link to see whether it should stop.
const STOP_POLL: Duration = Duration::from_millis(200);

/// Longest topic quoted in a log line (topics come from the network).
const MAX_LOGGED_TOPIC: usize = 160;

/// Why ingest stopped.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("the router stopped handing messages to ingest")]
    Disconnected,
    #[error("the external broker's client stopped")]
    ExternalGone,
    #[error("cannot start the ingest thread: {0}")]
    Thread(std::io::Error),
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
///
/// The live state takes the message with its sender's time as [`crate::skew`] adjusts it for
/// `received_at`; the returned envelope is the message as sent.
pub fn process(
    state: &RwLock<State>,
    topic: &[u8],
    payload: &[u8],
    received_at: Timestamp,
) -> Result<Accepted, Rejection> {
    let (topic, envelope) = renkei_shared::receive(topic, payload).map_err(|e| Rejection {
        reason: e.reason(),
        detail: e.to_string(),
    })?;
    let adjusted = skew::for_state(&envelope, received_at);
    let change = state
        .write()
        .unwrap_or_else(PoisonError::into_inner)
        .apply(adjusted.as_ref().unwrap_or(&envelope));
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
    /// Stamps each message's receive time.
    pub clock: Clock,
}

impl Ingest {
    /// Consumes the embedded broker's every accepted message from `tap` (see
    /// [`crate::mqtt::Mqtt::take_tap`]) and mirrors through `link`.
    pub fn start(tap: TapRx, link: (LinkTx, LinkRx), setup: Setup) -> Result<Ingest, IngestError> {
        let (tx, _rx) = link;
        let mirror = Publisher::Embedded { tx, _rx: None };
        Ingest::spawn(move |stop| {
            let consumer = Consumer {
                tap,
                pipeline: Pipeline::new(setup, mirror),
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
            // Handled but not yet acknowledged: acknowledged once handed to the recorder's
            // queue, as the embedded path takes a message off the router's log. The broker
            // redelivers what was not acknowledged when the connection drops, and the
            // recorder keeps it once.
            let mut unacked = Vec::new();
            let handed_on = |pipeline: &mut Pipeline, unacked: &mut Vec<rumqttc::Publish>| {
                pipeline.flush();
                for publish in unacked.drain(..) {
                    if let Err(e) = futures::executor::block_on(client.ack(&publish)) {
                        tracing::debug!(error = %e, "cannot acknowledge: the client is stopping");
                    }
                }
            };
            while !stop.load(Ordering::Relaxed) {
                let message = match next(&incoming, !unacked.is_empty()) {
                    Ok(message) => message,
                    Err(RecvTimeoutError::Timeout) => {
                        handed_on(&mut pipeline, &mut unacked);
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        handed_on(&mut pipeline, &mut unacked);
                        return Err(IngestError::ExternalGone);
                    }
                };
                pipeline.handle(
                    message.publish.topic.as_bytes(),
                    &message.publish.payload,
                    None,
                );
                unacked.push(message.publish);
                if !pipeline.pending() {
                    // The pipeline handed on by itself (its hand-off was full).
                    handed_on(&mut pipeline, &mut unacked);
                }
            }
            handed_on(&mut pipeline, &mut unacked);
            Ok(())
        })
    }

    /// Consumes a JetStream stream (see [`crate::jetstream`]), mirroring through `client`,
    /// and settles each message with the engine once the recorder has committed it, or could
    /// not store it.
    pub fn start_jetstream(
        incoming: std::sync::mpsc::Receiver<Delivered>,
        settle: tokio::sync::mpsc::UnboundedSender<Settle>,
        publisher: Publisher,
        setup: Setup,
    ) -> Result<Ingest, IngestError> {
        Ingest::spawn(move |stop| {
            let progress = setup.recorder.as_ref().map(RecorderTx::progress);
            let mut pipeline = Pipeline::new(setup, publisher);
            let mut settling = Settling::new(progress, settle);
            while !stop.load(Ordering::Relaxed) {
                let message = match next(&incoming, !settling.handled.is_empty()) {
                    Ok(message) => message,
                    Err(RecvTimeoutError::Timeout) => {
                        settling.handed_on(&mut pipeline);
                        settling.release();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        settling.handed_on(&mut pipeline);
                        return Err(IngestError::ExternalGone);
                    }
                };
                pipeline.handle(message.topic.as_bytes(), &message.payload, None);
                settling.handled.push(message.ack);
                if !pipeline.pending() {
                    // The pipeline handed on by itself (its hand-off was full).
                    settling.handed_on(&mut pipeline);
                }
                settling.release();
            }
            settling.handed_on(&mut pipeline);
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

/// The embedded broker's source: the router's tap.
struct Consumer {
    tap: TapRx,
    pipeline: Pipeline,
    stop: Arc<AtomicBool>,
}

impl Consumer {
    fn run(mut self) -> Result<(), IngestError> {
        let result = self.consume();
        // What was handled before a stop or a failure is still recorded and mirrored.
        self.pipeline.flush();
        result
    }

    fn consume(&mut self) -> Result<(), IngestError> {
        while !self.stop.load(Ordering::Relaxed) {
            // With hand-offs pending, only look whether more is already there: what is queued
            // is handled in one batch, and the pending hand-offs go before ingest waits again.
            let next = if self.pipeline.pending() {
                self.tap.try_recv()
            } else {
                self.tap.recv_deadline(Instant::now() + STOP_POLL)
            };
            match next.map_err(|_| IngestError::Disconnected)? {
                Some(tapped) => {
                    self.pipeline
                        .handle(&tapped.topic, &tapped.payload, Some(&tapped.client_id))
                }
                None => self.pipeline.flush(),
            }
            // Two atomic loads and stores: kept current under load, when they matter.
            self.pipeline
                .metrics
                .ingest_queue(self.tap.len(), self.tap.holds());
        }
        Ok(())
    }
}

/// Decode, validate, apply, record, mirror: the one path of every message, whatever its source.
///
/// What a message leaves for other threads (its record, its JSON copy, a poke to the rules) is
/// held in an outbox and handed on by [`Pipeline::flush`], which the source calls when it has
/// nothing more to read at once, and which [`Pipeline::handle`] calls itself every
/// [`HANDOFF_RECORDS`] messages. Handing on one message at a time cost a wake-up of the
/// recorder (or, with its queue full, of ingest by the recorder) and of the router for every
/// message: under load, most of ingest's time.
pub struct Pipeline {
    state: LiveState,
    metrics: Arc<Metrics>,
    recorder: Option<RecorderTx>,
    rules: Option<Trigger>,
    clock: Clock,
    mirror: Publisher,
    log: LogLimiter,
    outbox: Outbox,
}

/// What handled messages leave for other threads, until [`Pipeline::flush`].
#[derive(Debug, Default)]
struct Outbox {
    /// Messages handled since the last flush.
    handled: usize,
    records: Vec<Record>,
    mirror: Vec<Outgoing>,
    /// A site's state changed: the rules should look.
    poke_rules: bool,
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
            clock: setup.clock,
            mirror,
            log: LogLimiter::new(LOG_LINES_PER_SECOND, Duration::from_secs(1)),
            outbox: Outbox::default(),
        }
    }

    /// Messages were handled and not yet handed on.
    pub fn pending(&self) -> bool {
        self.outbox.handled > 0
    }

    /// Handles one publish received on `topic` from the connection `publisher` (its client id,
    /// when known); what it leaves for others waits for [`Pipeline::flush`].
    pub fn handle(&mut self, topic: &[u8], payload: &[u8], publisher: Option<&str>) {
        let received_at = self.clock.now();
        match process(&self.state, topic, payload, received_at) {
            Ok(accepted) => {
                self.metrics.sent_at_skew(skew::Skew::of(
                    accepted.envelope.header.sent_at,
                    received_at,
                ));
                self.metrics
                    .accepted(accepted.envelope.body.kind(), &accepted.change);
                // A redelivery adds nothing, and an older report arriving late must not
                // replace the newer one retained on the mirror.
                if matches!(accepted.change, Change::Updated { .. } | Change::NotState) {
                    self.mirror_json(&accepted, received_at);
                }
                if let Change::Updated {
                    scope: Scope::Site(_),
                    ..
                } = &accepted.change
                {
                    self.outbox.poke_rules = true;
                }
                if self.recorder.is_some() {
                    self.outbox.records.push(Record::Accepted {
                        via: via(&accepted.envelope, publisher),
                        received_at,
                        topic: accepted.topic,
                        envelope: Box::new(accepted.envelope),
                        payload: payload.to_vec(),
                    });
                }
            }
            Err(rejection) => {
                self.metrics.rejected(rejection.reason);
                if self.recorder.is_some() {
                    let topic = String::from_utf8_lossy(topic);
                    self.outbox.records.push(Record::Rejected {
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
        self.outbox.handled += 1;
        if self.outbox.handled >= HANDOFF_RECORDS {
            self.flush();
        }
    }

    /// Hands on what the messages handled since the last flush left: their records to the
    /// recorder (waiting while its queue is full), their JSON copies to the broker, and one
    /// poke to the rules.
    pub fn flush(&mut self) {
        let outbox = &mut self.outbox;
        if outbox.handled == 0 {
            return;
        }
        outbox.handled = 0;
        if !outbox.mirror.is_empty() {
            let n = outbox.mirror.len() as u64;
            match self.mirror.publish_all(outbox.mirror.drain(..)) {
                Ok(()) => self.metrics.json_republished(n),
                Err(e) => {
                    self.metrics.json_failed(n);
                    tracing::error!(error = %e, "cannot re-publish JSON mirror");
                }
            }
        }
        if std::mem::take(&mut outbox.poke_rules)
            && let Some(rules) = &self.rules
        {
            rules.poke();
        }
        if let Some(recorder) = &self.recorder
            && !outbox.records.is_empty()
        {
            let records =
                std::mem::replace(&mut outbox.records, Vec::with_capacity(HANDOFF_RECORDS));
            recorder.send_all(records);
        }
    }

    fn mirror_json(&mut self, accepted: &Accepted, received_at: Timestamp) {
        let mirrored = MirroredRef {
            envelope: &accepted.envelope,
            received_at,
        };
        match serde_json::to_vec(&mirrored) {
            Ok(payload) => self.outbox.mirror.push(Outgoing {
                topic: accepted.topic.json(),
                payload,
                retain: accepted.topic.retained(),
            }),
            Err(e) => {
                self.metrics.json_failed(1);
                let kind: BodyKind = accepted.envelope.body.kind();
                tracing::error!(error = %e, kind = kind.as_str(), "cannot encode JSON mirror");
            }
        }
    }
}

/// Who brought a site's message when it was not the site's own agent (a ward broker's relay,
/// HQ's downlink at a ward broker): recorded as `messages.via`. `None` for a message its
/// sender published itself, for HQ's own messages, and where the publisher is not known.
fn via(envelope: &renkei_shared::Envelope, publisher: Option<&str>) -> Option<String> {
    match (&envelope.header.origin, publisher) {
        (renkei_shared::Origin::Site(site), Some(client_id))
            if !site.is_agent_client_id(client_id) =>
        {
            Some(client_id.to_owned())
        }
        _ => None,
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

/// The next message of an external source. With messages handled and not yet handed on
/// (`holding`), it does not wait: a `Timeout` then says to hand them on now.
fn next<T>(incoming: &std::sync::mpsc::Receiver<T>, holding: bool) -> Result<T, RecvTimeoutError> {
    if holding {
        incoming.try_recv().map_err(|e| match e {
            TryRecvError::Empty => RecvTimeoutError::Timeout,
            TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
        })
    } else {
        incoming.recv_timeout(STOP_POLL)
    }
}

/// JetStream messages taken and not yet settled, by the recorder hand-off that carries them.
struct Settling {
    progress: Option<Arc<Progress>>,
    settle: tokio::sync::mpsc::UnboundedSender<Settle>,
    /// Handled since the last hand-off.
    handled: Vec<async_nats::jetstream::message::Acker>,
    /// Handed on, waiting for the recorder: the count of hand-offs sent when each went.
    waiting: std::collections::VecDeque<(u64, Vec<async_nats::jetstream::message::Acker>)>,
    /// Hand-offs not stored, as last seen.
    not_stored_seen: u64,
}

impl Settling {
    fn new(
        progress: Option<Arc<Progress>>,
        settle: tokio::sync::mpsc::UnboundedSender<Settle>,
    ) -> Settling {
        let not_stored_seen = progress.as_ref().map_or(0, |p| p.done().1);
        Settling {
            progress,
            settle,
            handled: Vec::new(),
            waiting: std::collections::VecDeque::new(),
            not_stored_seen,
        }
    }

    /// Hands the pipeline's queue on and notes what went with it.
    fn handed_on(&mut self, pipeline: &mut Pipeline) {
        pipeline.flush();
        if self.handled.is_empty() {
            return;
        }
        let handled = std::mem::take(&mut self.handled);
        match &self.progress {
            Some(progress) => self.waiting.push_back((progress.sent(), handled)),
            // Nothing records: handled is all there is.
            None => {
                let _ = self.settle.send(Settle::Stored(handled));
            }
        }
    }

    /// Settles what the recorder has finished with: acknowledged if stored, delivered again
    /// if a hand-off was not stored meanwhile (which of them is not known here: all of that
    /// round go again, and the store keeps one copy of what it already had).
    fn release(&mut self) {
        let Some(progress) = &self.progress else {
            return;
        };
        let (done, not_stored) = progress.done();
        let mut ready = Vec::new();
        while self.waiting.front().is_some_and(|(mark, _)| *mark <= done) {
            if let Some((_, ackers)) = self.waiting.pop_front() {
                ready.extend(ackers);
            }
        }
        if ready.is_empty() {
            return;
        }
        let again = not_stored > self.not_stored_seen;
        self.not_stored_seen = not_stored;
        let _ = self.settle.send(if again {
            Settle::Again(ready)
        } else {
            Settle::Stored(ready)
        });
    }
}

#[cfg(test)]
mod tests {
    use crate::recorder::Archive;
    use renkei_shared::{Mode, encode, sample, topic};
    use rumqttd::Notification;

    use super::*;

    fn status_topic() -> String {
        Topic::of(&sample::status()).unwrap().to_string()
    }

    #[test]
    fn accepts_a_valid_message_on_its_topic() {
        let state = RwLock::new(State::new());
        let bytes = encode(&sample::status()).unwrap();
        let accepted = process(&state, status_topic().as_bytes(), &bytes, sample::SENT_AT).unwrap();
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

    /// A real router, recorder and ingest in this process, on ephemeral ports.
    struct Harness {
        dir: tempfile::TempDir,
        mqtt: crate::mqtt::Mqtt,
        recorder: crate::recorder::Recorder,
        state: LiveState,
        ingest: Ingest,
        metrics: Arc<Metrics>,
    }

    impl Harness {
        fn start() -> Harness {
            Harness::start_with(crate::config::MqttConfig::default())
        }

        /// With `mqtt`'s router settings; the listeners go to ephemeral loopback ports.
        fn start_with(mqtt: crate::config::MqttConfig) -> Harness {
            use crate::auth::Authenticator;
            use crate::config::{AuthConfig, MqttConfig, RecorderConfig};
            use crate::mqtt::Mqtt;
            use crate::receipts::Interest;
            use crate::recorder::Recorder;

            let dir = tempfile::tempdir().unwrap();
            let metrics = Arc::new(Metrics::new());
            let auth = Authenticator::new(dir.path(), true, AuthConfig::default(), metrics.clone());
            let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
            let mut mqtt = Mqtt::new(
                &MqttConfig {
                    listen: loopback,
                    ws_listen: loopback,
                    ..mqtt
                },
                &Arc::new(auth.unwrap()),
                &metrics,
                Arc::new(Interest::counted()),
            )
            .unwrap();
            let recorder = RecorderConfig {
                batch_time: crate::config::HumanDuration(Duration::from_millis(20)),
                ..RecorderConfig::default()
            };
            let recorder = Recorder::start(
                &Archive::Sqlite(dir.path().to_path_buf()),
                recorder,
                metrics.clone(),
            )
            .unwrap();
            let state = LiveState::default();
            let setup = Setup {
                state: state.clone(),
                metrics: metrics.clone(),
                recorder: recorder.tx(),
                rules: None,
                clock: crate::clock::system_clock(),
            };
            let tap = mqtt.take_tap().unwrap();
            let ingest = Ingest::start(tap, mqtt.link("ingest").unwrap(), setup).unwrap();
            Harness {
                dir,
                mqtt,
                recorder,
                state,
                ingest,
                metrics,
            }
        }

        /// The sample site's status report number `seq`: its topic and payload.
        fn report(seq: u64) -> (String, Vec<u8>) {
            let mut env = sample::status();
            env.header.seq = seq;
            env.header.sent_at.0 += seq as i64;
            (Topic::of(&env).unwrap().to_string(), encode(&env).unwrap())
        }

        /// The seqs recorded, in the order received, once there are `want` (or at `deadline`).
        fn recorded(&self, want: usize, deadline: Instant) -> Vec<u64> {
            let db = crate::db::open(self.dir.path()).unwrap();
            let mut recorded = Vec::new();
            while recorded.len() < want && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
                recorded = db
                    .prepare("SELECT seq FROM messages ORDER BY id")
                    .unwrap()
                    .query_map([], |r| r.get::<_, u64>(0))
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap();
            }
            recorded
        }

        /// Seqs of the JSON copies `link` receives (retained ones included), until `want`.
        fn mirrored(link: &mut LinkRx, want: usize, deadline: Instant) -> Vec<u64> {
            Harness::received(link, want, deadline, |payload| {
                serde_json::from_slice::<Envelope>(payload).unwrap()
            })
        }

        /// Seqs of the messages `link` receives, read with `decode`, until `want`.
        fn received(
            link: &mut LinkRx,
            want: usize,
            deadline: Instant,
            decode: impl Fn(&[u8]) -> Envelope,
        ) -> Vec<u64> {
            let mut received = Vec::new();
            while received.len() < want && Instant::now() < deadline {
                match link.recv_deadline(deadline) {
                    Ok(Some(Notification::Forward(f))) => {
                        received.push(decode(&f.publish.payload).header.seq);
                    }
                    Ok(Some(Notification::Unschedule)) => link.ready().unwrap(),
                    _ => {}
                }
            }
            received
        }

        fn stop(self) {
            self.ingest.stop();
            self.recorder.stop();
        }
    }

    /// Through the real router and SQLite: a run longer than two hand-offs, then one message
    /// alone after a pause, are all recorded, mirrored and applied, in order.
    #[test]
    fn every_message_is_handed_on_whether_its_hand_off_filled_or_the_link_ran_dry() {
        let harness = Harness::start();
        let (mut json_tx, mut json) = harness.mqtt.link("json").unwrap();
        json_tx.subscribe(topic::ALL_JSON).unwrap();
        let (mut site, _site_rx) = harness.mqtt.link("site").unwrap();
        let run = 2 * HANDOFF_RECORDS as u64 + 1;
        for seq in 1..=run {
            let (topic, payload) = Harness::report(seq);
            site.publish(topic, payload).unwrap();
        }
        std::thread::sleep(Duration::from_millis(300));
        let (topic, payload) = Harness::report(run + 1);
        site.publish(topic, payload).unwrap();
        let all = run + 1;
        let deadline = Instant::now() + Duration::from_secs(10);

        // The mirror: every report, in order.
        let mirrored = Harness::mirrored(&mut json, all as usize, deadline);
        assert_eq!(mirrored, (1..=all).collect::<Vec<_>>());
        // The record: every report, in the order received.
        let recorded = harness.recorded(all as usize, deadline);
        assert_eq!(recorded, (1..=all).collect::<Vec<_>>());

        let world = harness.state.read().unwrap();
        let status = world.world(Mode::Actual).sites[&sample::site()]
            .status
            .as_ref();
        assert_eq!(status.map(|s| s.stamp.seq), Some(all));
        drop(world);
        harness.stop();
    }

    /// A burst that an integrator does not read as it comes: the router hands the stalled
    /// link its buffer's worth and keeps the rest in the filter's log, which drops its oldest
    /// segment when full. The integrator is told how many it lost, exactly where, and gets
    /// every one of them back from the recorder from the `received_at` it last saw.
    #[test]
    fn a_stalled_integrator_is_told_what_it_lost_and_gets_it_back_from_the_recorder() {
        use crate::config::{ByteSize, MqttConfig};
        use crate::http::history::{Since, events};
        use renkei_shared::mirror::Mirrored;
        let harness = Harness::start_with(MqttConfig {
            max_packet_size: ByteSize(4 * 1024),
            segment_size: ByteSize(8 * 1024),
            segment_count: 3,
            ..MqttConfig::default()
        });
        let (mut integrator_tx, mut integrator) = harness.mqtt.link("integrator").unwrap();
        integrator_tx.subscribe(topic::ALL_JSON).unwrap();
        let (mut site, _site_rx) = harness.mqtt.link("site").unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);

        // A link's buffer holds 200 messages (rumqttd's MAX_CHANNEL_CAPACITY); the 24 KiB log
        // holds some 50 of the rest. Ingest keeps up: the site sends 20 at a time and waits
        // for them to be recorded.
        let all = 600u64;
        for batch in (1..=all).collect::<Vec<_>>().chunks(20) {
            for &seq in batch {
                let (topic, payload) = Harness::report(seq);
                site.publish(topic, payload).unwrap();
            }
            let last = *batch.last().unwrap() as usize;
            assert_eq!(harness.recorded(last, deadline).len(), last);
        }

        // The integrator reads: messages, and one notice where the gap is.
        let mut got: Vec<(u64, Timestamp)> = Vec::new();
        let mut notices = Vec::new();
        while got.len() + notices.iter().sum::<u64>() as usize != all as usize
            && Instant::now() < deadline
        {
            match integrator.recv_deadline(deadline) {
                Ok(Some(Notification::Forward(f))) if f.publish.topic == topic::SKIPPED_NOTICE => {
                    let notice: serde_json::Value =
                        serde_json::from_slice(&f.publish.payload).unwrap();
                    assert_eq!(notice["filter"], topic::ALL_JSON);
                    notices.push(notice["skipped"].as_u64().unwrap());
                    // Where the integrator resumes from: the last message it has.
                    let (_, since) = *got.last().unwrap();
                    let mut recovered = Vec::new();
                    let archive = Archive::Sqlite(harness.dir.path().to_path_buf());
                    let read = events(&archive, Since::Time(since.0), None, 5_000);
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .build()
                        .unwrap();
                    for event in runtime.block_on(read).unwrap() {
                        let seq = event.envelope["header"]["seq"].as_u64().unwrap();
                        if !got.iter().any(|(s, _)| *s == seq) {
                            recovered.push((seq, Timestamp(event.received_at)));
                        }
                    }
                    assert!(recovered.len() as u64 >= *notices.last().unwrap());
                    got.extend(recovered);
                    break;
                }
                Ok(Some(Notification::Forward(f))) => {
                    let m: Mirrored = serde_json::from_slice(&f.publish.payload).unwrap();
                    got.push((m.envelope.header.seq, m.received_at));
                }
                Ok(Some(Notification::Unschedule)) => integrator.ready().unwrap(),
                Ok(_) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(notices.len(), 1, "the integrator was told: {notices:?}");
        assert!(notices[0] > 0);
        let mut seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
        seqs.sort_unstable();
        seqs.dedup();
        assert_eq!(
            seqs,
            (1..=all).collect::<Vec<_>>(),
            "nothing the recorder holds is lost"
        );
        harness.stop();
    }

    /// With no integrator subscribed, the JSON mirror has no filter (and so no log) in the
    /// router: its publishes reach no one, and ingest goes on. An integrator that subscribes
    /// later gets the retained state, then every new message.
    #[test]
    fn the_mirror_needs_no_listener_and_a_late_integrator_gets_retained_then_live() {
        let harness = Harness::start();
        let (mut site, _site_rx) = harness.mqtt.link("site").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        // Two rounds: a link dropped after its first mirror publish would record no more.
        for round in 0..2u64 {
            for seq in round * 10 + 1..=round * 10 + 10 {
                let (topic, payload) = Harness::report(seq);
                site.publish(topic, payload).unwrap();
            }
            let want = (round * 10 + 10) as usize;
            let recorded = harness.recorded(want, deadline);
            assert_eq!(recorded, (1..=want as u64).collect::<Vec<_>>());
        }

        let (mut json_tx, mut json) = harness.mqtt.link("integrator").unwrap();
        json_tx.subscribe(topic::ALL_JSON).unwrap();
        assert_eq!(Harness::mirrored(&mut json, 1, deadline), vec![20]);
        let (topic, payload) = Harness::report(21);
        site.publish(topic, payload).unwrap();
        assert_eq!(Harness::mirrored(&mut json, 1, deadline), vec![21]);
        harness.stop();
    }

    /// Ingest reads the router's tap, not a log: with room for four messages, a burst of
    /// 2,000 that no log could hold for it is recorded whole and in order, the router holding
    /// the publisher back instead (counted).
    #[test]
    fn a_burst_bigger_than_ingests_queue_is_held_back_not_lost() {
        let harness = Harness::start_with(crate::config::MqttConfig {
            ingest_queue_messages: 4,
            segment_size: crate::config::ByteSize(8 * 1024),
            segment_count: 1,
            ..crate::config::MqttConfig::default()
        });
        let (mut site, _site_rx) = harness.mqtt.link("site").unwrap();
        let all = 2_000u64;
        for seq in 1..=all {
            let (topic, payload) = Harness::report(seq);
            site.publish(topic, payload).unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let recorded = harness.recorded(all as usize, deadline);
        assert_eq!(recorded, (1..=all).collect::<Vec<_>>());
        // Ingest reports the tap's figures as it reads; wait for it to read the last one.
        std::thread::sleep(STOP_POLL * 2);
        let text = harness.metrics.render();
        let holds = renkei_testkit::metric(&text, "renkei_ingest_holds_total").unwrap_or(0);
        assert!(holds > 0, "the router held the publisher back: {holds}");
        assert_eq!(
            renkei_testkit::metric(&text, "renkei_ingest_queue_messages").unwrap_or(-1),
            0
        );
        harness.stop();
    }

    #[test]
    fn a_repeat_is_a_duplicate() {
        let state = RwLock::new(State::new());
        let bytes = encode(&sample::shelter()).unwrap();
        let topic = Topic::of(&sample::shelter()).unwrap().to_string();
        process(&state, topic.as_bytes(), &bytes, sample::SENT_AT).unwrap();
        let again = process(&state, topic.as_bytes(), &bytes, sample::SENT_AT).unwrap();
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
            let err = process(&state, topic, payload, sample::SENT_AT).unwrap_err();
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
