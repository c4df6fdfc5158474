//! HQ on a NATS JetStream cluster: ingest reads the engine's replicated stream, not an MQTT
//! subscription, and acknowledges each message to the engine only once it is committed.
//!
//! ```text
//! agents ─MQTT─▶ NATS cluster (3 nodes) ──stream RENKEI, subjects renkei.v1.>, R3──┐
//!                       ▲                                                          │ durable pull
//!                       │ receipts, JSON mirror, alerts (MQTT, QoS 1, retained)    ▼ consumer
//!                       └───────────── renkei-broker (external mode) ◀── this task ─┘
//!                                            │ ingest ─▶ recorder ─ commit ─▶ ack
//! ```
//!
//! - The stream (`external.stream`, R`external.stream_replicas`) captures every MQTT publish
//!   under `renkei/v1/` (NATS subject `renkei.v1.…`); this instance makes it if it is missing.
//! - Each instance has its own durable consumer (named by `external.client_id`), so that
//!   each sees every message and keeps the whole state; the store keeps one copy of each by
//!   `(origin, boot, seq)` whichever instance recorded it first.
//! - A message is acknowledged only after the recorder committed the hand-off that carried
//!   it ([`crate::recorder::Progress`]); one the recorder could not store (no room, a failed
//!   batch) is negatively acknowledged, and the engine delivers it again. What was taken and
//!   never acknowledged (the instance died) comes again after the consumer's `ack_wait`.
//! - A NATS PUBACK to an agent does not mean the message reached this stream (NATS stores it
//!   in its own MQTT stream first; a stream electing a leader drops what comes meanwhile):
//!   agents rely on receipts, which go out only after the commit, and send again the rest.

use std::sync::mpsc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::message::{AckKind, Acker};
use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use renkei_shared::codec::MAX_FRAME;
use tokio::sync::mpsc as tokio_mpsc;
use tokio::task::JoinHandle;

use crate::config::ExternalConfig;

/// The subjects of every Renkei message.
const SUBJECTS: &str = "renkei.v1.>";
/// How long the engine waits for an acknowledgement before it delivers a message again.
const ACK_WAIT: Duration = Duration::from_secs(30);
/// Messages delivered and not yet acknowledged, at most (the recorder's queue is far larger).
const MAX_ACK_PENDING: i64 = 20_000;

/// Why the stream cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum JetStreamError {
    #[error("external.jetstream: no server given")]
    NoServer,
    #[error("cannot connect to the NATS cluster {servers}: {reason}")]
    Connect { servers: String, reason: String },
    #[error("JetStream stream {stream}: {reason}")]
    Stream { stream: String, reason: String },
}

/// One message off the stream, for ingest.
pub struct Delivered {
    /// The MQTT topic it was published on (`renkei/v1/…`).
    pub topic: String,
    pub payload: bytes::Bytes,
    /// What ingest hands back once the message is stored, or not.
    pub ack: Acker,
}

impl std::fmt::Debug for Delivered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivered")
            .field("topic", &self.topic)
            .field("bytes", &self.payload.len())
            .finish_non_exhaustive()
    }
}

/// What ingest tells the engine about a message it took.
pub enum Settle {
    /// Stored: never deliver it again.
    Stored(Vec<Acker>),
    /// Not stored: deliver it again.
    Again(Vec<Acker>),
}

impl std::fmt::Debug for Settle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Settle::Stored(a) => write!(f, "Stored({})", a.len()),
            Settle::Again(a) => write!(f, "Again({})", a.len()),
        }
    }
}

/// The running reader: the task that pulls, and the one that acknowledges.
#[derive(Debug)]
pub struct JetStreamSource {
    pull: JoinHandle<()>,
    settle: JoinHandle<()>,
    /// The cluster's JetStream, for the rules' lease ([`crate::leadership`]).
    pub js: jetstream::Context,
    /// The rules' lease, when this instance seeks it.
    pub leadership: Option<crate::leadership::Leadership>,
}

impl JetStreamSource {
    /// Connects to the cluster, makes the stream and this instance's consumer if missing, and
    /// starts delivering to the returned receiver; ingest settles through the sender.
    pub async fn start(
        config: &ExternalConfig,
        password: String,
    ) -> Result<
        (
            JetStreamSource,
            mpsc::Receiver<Delivered>,
            tokio_mpsc::UnboundedSender<Settle>,
        ),
        JetStreamError,
    > {
        if config.jetstream.is_empty() {
            return Err(JetStreamError::NoServer);
        }
        let servers = config.jetstream.join(",");
        let options = match &config.user {
            Some(user) => {
                async_nats::ConnectOptions::with_user_and_password(user.clone(), password)
            }
            None => async_nats::ConnectOptions::new(),
        }
        .name(config.client_id.clone())
        .connection_timeout(Duration::from_secs(5));
        let client = options
            .connect(config.jetstream.as_slice())
            .await
            .map_err(|e| JetStreamError::Connect {
                servers: servers.clone(),
                reason: e.to_string(),
            })?;
        let js = jetstream::new(client);
        let context = js.clone();
        let stream_err = |reason: String| JetStreamError::Stream {
            stream: config.stream.clone(),
            reason,
        };
        let stream = js
            .get_or_create_stream(stream::Config {
                name: config.stream.clone(),
                subjects: vec![SUBJECTS.to_owned()],
                num_replicas: config.stream_replicas.max(1),
                storage: stream::StorageType::File,
                max_message_size: i32::try_from(MAX_FRAME).unwrap_or(i32::MAX),
                ..Default::default()
            })
            .await
            .map_err(|e| stream_err(e.to_string()))?;
        let consumer = stream
            .get_or_create_consumer(
                &config.client_id,
                pull::Config {
                    durable_name: Some(config.client_id.clone()),
                    ack_policy: AckPolicy::Explicit,
                    deliver_policy: DeliverPolicy::All,
                    ack_wait: ACK_WAIT,
                    max_ack_pending: MAX_ACK_PENDING,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| stream_err(format!("consumer {}: {e}", config.client_id)))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| stream_err(e.to_string()))?;
        tracing::info!(
            %servers,
            stream = %config.stream,
            consumer = %config.client_id,
            "ingest reads the JetStream stream"
        );
        let (tx, rx) = mpsc::channel();
        let pull = tokio::spawn(async move {
            while let Some(next) = messages.next().await {
                let message = match next {
                    Ok(m) => m,
                    Err(e) => {
                        // The client reconnects by itself; the stream resumes.
                        tracing::warn!(error = %e, "JetStream: reading the stream");
                        continue;
                    }
                };
                let (message, ack) = message.split();
                let delivered = Delivered {
                    topic: topic_of(message.subject.as_str()),
                    payload: message.payload,
                    ack,
                };
                if tx.send(delivered).is_err() {
                    return;
                }
            }
        });
        let (settle_tx, mut settle_rx) = tokio_mpsc::unbounded_channel::<Settle>();
        let settle = tokio::spawn(async move {
            while let Some(settle) = settle_rx.recv().await {
                let (ackers, kind) = match settle {
                    Settle::Stored(a) => (a, AckKind::Ack),
                    Settle::Again(a) => (a, AckKind::Nak(None)),
                };
                for acker in ackers {
                    if let Err(e) = acker.ack_with(kind).await {
                        // Unacknowledged, it comes again after ack_wait; the store keeps one.
                        tracing::debug!(error = %e, "JetStream: acknowledgement not sent");
                    }
                }
            }
        });
        Ok((
            JetStreamSource {
                pull,
                settle,
                js: context,
                leadership: None,
            },
            rx,
            settle_tx,
        ))
    }

    /// Stops reading (what was taken and not acknowledged comes again).
    pub fn stop(self) {
        if let Some(leadership) = self.leadership {
            leadership.stop();
        }
        self.pull.abort();
        self.settle.abort();
    }
}

/// The MQTT topic of a NATS subject: NATS's MQTT listener maps `/` to `.`, and Renkei's topic
/// levels never hold a `.`.
pub fn topic_of(subject: &str) -> String {
    subject.replace('.', "/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subject_is_its_topic_with_dots_for_slashes() {
        assert_eq!(
            topic_of("renkei.v1.131041.es-1.status"),
            "renkei/v1/131041/es-1/status"
        );
        assert_eq!(topic_of("renkei.v1.hq.alert.a_1"), "renkei/v1/hq/alert/a_1");
    }
}
