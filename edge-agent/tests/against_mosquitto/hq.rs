//! What HQ sees on the wire: a subscriber for which every message must be a valid Renkei
//! message on its topic, and the checks HQ's reducer makes of a stream of shelter reports.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use renkei_shared::{Body, Envelope, Life, Refusal, Topic, receive};
use renkei_testkit::{AgentProcess, Mosquitto, MqttClient};
use tokio::time::Instant;

/// Generous: the machine is shared with other builds.
pub const WAIT: Duration = Duration::from_secs(15);

/// Long enough for a backoff step, a restart and a rate-limited backlog on a shared machine.
pub const LONG_WAIT: Duration = Duration::from_secs(60);

/// One message as a subscriber received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: Topic,
    pub retain: bool,
    pub env: Envelope,
}

/// A subscriber on a broker, subscribed (SUBACK received) once started.
#[derive(Debug)]
pub struct Watch {
    mqtt: MqttClient,
}

impl Watch {
    pub async fn start(broker: &Mosquitto, client_id: &str, filter: &str) -> Watch {
        let mut mqtt = MqttClient::connect(broker.addr(), client_id).await;
        mqtt.subscribe(filter).await;
        Watch { mqtt }
    }

    /// The client, for publishing as HQ does.
    pub fn client(&self) -> &rumqttc::AsyncClient {
        &self.mqtt.client
    }

    /// The next message that arrives by `deadline`, decoded and checked against its topic.
    pub async fn next_by(&mut self, deadline: Instant) -> Option<Received> {
        loop {
            let p = self.mqtt.publish_by(deadline).await?;
            let topic = Topic::parse(&p.topic).expect("a renkei topic");
            match receive(p.topic.as_bytes(), &p.payload) {
                Ok((_, env)) => {
                    return Some(Received {
                        topic,
                        retain: p.retain,
                        env,
                    });
                }
                // A test puts garbage on the command topic on purpose.
                Err(Refusal::Payload(_)) if matches!(topic, Topic::Command { .. }) => continue,
                Err(e) => panic!("not a valid renkei message on {}: {e}", p.topic),
            }
        }
    }

    /// The next message for which `pick` says yes, skipping others; panics with the agent's
    /// log after [`WAIT`].
    pub async fn next<T>(
        &mut self,
        agent: &AgentProcess,
        what: &str,
        mut pick: impl FnMut(&Received) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.next_by(deadline).await {
                Some(m) => {
                    if let Some(t) = pick(&m) {
                        return t;
                    }
                }
                None => panic!("no {what} within {WAIT:?}; agent log:\n{}", agent.log()),
            }
        }
    }
}

/// A Mosquitto with HQ watching every Renkei topic on it, or `None` (with a SKIPPED line)
/// where Mosquitto is not installed.
pub async fn watched_broker() -> Option<(Mosquitto, Watch)> {
    let broker = Mosquitto::start_if_installed()?;
    let wire = Watch::start(&broker, "hq-watch", renkei_shared::topic::ALL).await;
    Some((broker, wire))
}

/// The message, if it is a birth (`want_birth`) or a death (otherwise).
pub fn is_life(m: &Received, want_birth: bool) -> Option<Received> {
    match &m.env.body {
        Body::Life(Life::Birth { .. }) if want_birth => Some(m.clone()),
        Body::Life(Life::Death) if !want_birth => Some(m.clone()),
        _ => None,
    }
}

/// Shelter reports received, keyed by their evacuee count (unique per report in these
/// tests), checked the way HQ's reducer would apply them: each (boot, seq) applied once, and
/// first arrivals in increasing (boot, seq) order.
#[derive(Default)]
pub struct Hq {
    state: renkei_shared::State,
    applied: BTreeMap<(u32, u64), u32>,
    first_arrivals: Vec<(u32, u64)>,
    evacuees: BTreeSet<u32>,
    pub historical: usize,
}

impl Hq {
    fn take(&mut self, m: &Received) {
        let Body::Shelter(s) = &m.env.body else {
            return;
        };
        let key = (m.env.header.boot, m.env.header.seq);
        let change = self.state.apply(&m.env);
        if self.applied.contains_key(&key) {
            assert!(
                !matches!(change, renkei_shared::reducer::Change::Updated { .. }),
                "{key:?} applied twice"
            );
            return;
        }
        self.applied.insert(key, s.evacuees.unwrap_or(0));
        self.first_arrivals.push(key);
        self.evacuees.extend(s.evacuees);
        self.historical += usize::from(m.env.header.historical);
    }

    /// Takes what `wire` receives until every report of `want` has arrived (within
    /// [`LONG_WAIT`]), then checks their order.
    pub async fn until_all(
        &mut self,
        wire: &mut Watch,
        want: &BTreeSet<u32>,
        log: impl Fn() -> String,
    ) {
        let deadline = Instant::now() + LONG_WAIT;
        while !want.is_subset(&self.evacuees) {
            match wire.next_by(deadline).await {
                Some(m) => self.take(&m),
                None => panic!(
                    "missing reports {:?}; log:\n{}",
                    want.difference(&self.evacuees).collect::<Vec<_>>(),
                    log()
                ),
            }
        }
        let mut sorted = self.first_arrivals.clone();
        sorted.sort();
        assert_eq!(self.first_arrivals, sorted, "reports out of order");
    }
}
