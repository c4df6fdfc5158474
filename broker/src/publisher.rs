//! The broker's own voice on MQTT: what it publishes itself (the restored retained state at
//! start, alerts from the rules, the JSON mirror and receipts from ingest and the recorder),
//! through an in-process link to the embedded rumqttd or the client of an external broker.

use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::Packet;

/// The broker's own voice on MQTT (the restored retained state at start, alerts from the
/// rules, the JSON mirror from ingest): an in-process link past the guard of the embedded
/// broker, so it may also write the mirror, or the client of an external broker.
pub enum Publisher {
    Embedded {
        tx: LinkTx,
        /// Kept open: the router drops a link whose receiver is gone. `None` when the link's
        /// receiver is read elsewhere (ingest's own link).
        _rx: Option<LinkRx>,
    },
    External(rumqttc::AsyncClient),
    /// Several clients of an external broker, each topic always through the same one (its
    /// messages stay in order): for an engine that takes one connection's QoS 1 publishes one
    /// at a time (NATS stores each retained one in a replicated stream before the next).
    Spread(Vec<rumqttc::AsyncClient>),
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Publisher::Embedded { .. } => "Publisher::Embedded",
            Publisher::External(_) => "Publisher::External",
            Publisher::Spread(_) => "Publisher::Spread",
        })
    }
}

/// Why a publish could not be handed over.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the in-process link refused it: {0}")]
    Link(Box<LinkError>),
    #[error("the external broker's client is gone: {0}")]
    External(#[from] rumqttc::ClientError),
    #[error("no client of the external broker to publish through")]
    NoClient,
}

/// Which of `n` clients carries `topic`: the same one every time.
fn spread_index(topic: &str, n: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    topic.hash(&mut hasher);
    (hasher.finish() % n.max(1) as u64) as usize
}

impl Publisher {
    pub fn new((tx, rx): (LinkTx, LinkRx)) -> Publisher {
        Publisher::Embedded { tx, _rx: Some(rx) }
    }

    /// Publishes, retained or not, at QoS 1.
    ///
    /// rumqttd does not let a local link set a publish's QoS (the field is private) and does
    /// not need it to: the router hands every message, retained ones included, to each
    /// subscriber at the QoS of that subscription, and the in-process hop itself is a memory
    /// queue. To an external broker the publish goes at QoS 1; this waits only while the
    /// client's request queue is full, never for the broker's PUBACK.
    ///
    /// Blocks: call it from a thread, not from an async task.
    pub fn publish(
        &mut self,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<(), PublishError> {
        match self {
            // `LinkTx::send` is async in signature only (it queues and signals the router's
            // channel) and is the one call that sets retain.
            Publisher::Embedded { tx, .. } => {
                let packet = Outgoing {
                    topic,
                    payload,
                    retain,
                }
                .into_packet();
                futures::executor::block_on(tx.send(packet))
                    .map(drop)
                    .map_err(|e| PublishError::Link(Box::new(e)))
            }
            Publisher::External(client) => Ok(futures::executor::block_on(client.publish(
                topic,
                rumqttc::QoS::AtLeastOnce,
                retain,
                payload,
            ))?),
            Publisher::Spread(clients) => {
                let Some(client) = clients.get(spread_index(&topic, clients.len())) else {
                    return Err(PublishError::NoClient);
                };
                Ok(futures::executor::block_on(client.publish(
                    topic,
                    rumqttc::QoS::AtLeastOnce,
                    retain,
                    payload,
                ))?)
            }
        }
    }

    /// Publishes `messages` in order, as [`Publisher::publish`] publishes one.
    ///
    /// To the embedded router they go as one hand-off: on every wake-up the router takes all
    /// that a link has queued, so the messages are queued together and the router is woken
    /// once for them all, not once for each (a futex wake-up per message, on this thread and
    /// on the router's).
    pub fn publish_all(
        &mut self,
        messages: impl IntoIterator<Item = Outgoing>,
    ) -> Result<(), PublishError> {
        match self {
            Publisher::Embedded { tx, .. } => {
                let mut last = None;
                {
                    let mut queued = tx.buffer();
                    for m in messages {
                        if let Some(before) = last.replace(m.into_packet()) {
                            queued.push_back(before);
                        }
                    }
                }
                // The last one goes with the wake-up: the router then takes every one queued.
                match last {
                    Some(packet) => futures::executor::block_on(tx.send(packet))
                        .map(drop)
                        .map_err(|e| PublishError::Link(Box::new(e))),
                    None => Ok(()),
                }
            }
            Publisher::External(_) | Publisher::Spread(_) => messages
                .into_iter()
                .try_for_each(|m| self.publish(m.topic, m.payload, m.retain)),
        }
    }
}

/// One message for [`Publisher::publish_all`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

impl Outgoing {
    fn into_packet(self) -> Packet {
        Packet::Publish(
            rumqttd::protocol::Publish::new(self.topic.into_bytes(), self.payload, self.retain),
            None,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_topic_keeps_its_client_and_topics_spread_over_all() {
        let topics: Vec<String> = (0..400)
            .map(|i| format!("renkei/json/v1/131041/es-{i}/status"))
            .collect();
        for t in &topics {
            assert_eq!(spread_index(t, 8), spread_index(t, 8));
        }
        let mut used = [0usize; 8];
        for t in &topics {
            used[spread_index(t, 8)] += 1;
        }
        assert!(used.iter().all(|n| *n > 20), "{used:?}");
        assert_eq!(spread_index("x", 0), 0);
    }
}
