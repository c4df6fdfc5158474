//! `renkei-testkit`: what every Renkei test suite starts, talks to and waits on, written once.
//!
//! The tests run real components on ephemeral ports, never mocks:
//!
//! ```text
//! test ──spawn──▶ BrokerProcess (renkei-broker serve, port 0)  ◀──MQTT── MqttClient
//!      ──start──▶ InProcessBroker (renkei_broker::Broker)       ◀──HTTP── http_get / HttpRequest
//!      ──spawn──▶ AgentProcess (renkei-agent run | simulate)   ──MQTT──▶ a broker above
//!      ──spawn──▶ Mosquitto (Debian's, for the agent and external-broker mode)
//!      ──poll───▶ eventually(what, check) until it holds, or fail after PATIENCE
//! ```
//!
//! Layout:
//! - [`wait`]: [`PATIENCE`], [`eventually`] and [`eventually_within`];
//! - [`process`]: a child process killed on drop, the workspace's built binaries, free ports,
//!   ready lines, `/proc` figures;
//! - [`broker`]: the broker as a process ([`BrokerProcess`], with its config file and users)
//!   or as a library in this process ([`InProcessBroker`]);
//! - [`agent`]: `renkei-agent` as a process ([`AgentProcess`]) and its one-shot commands;
//! - [`mosquitto`]: a Mosquitto with plain, WebSocket and TLS listeners;
//! - [`nats`]: a three-node NATS JetStream cluster with MQTT listeners ([`nats::NatsCluster`]);
//! - [`pki`]: a CA and a server certificate made with rcgen;
//! - [`mqtt`]: an MQTT 3.1.1 client whose event loop runs in a task ([`MqttClient`]);
//! - [`http`]: one HTTP/1.1 request per connection, and Prometheus samples;
//! - [`net`]: raw TCP from a chosen loopback address, and waiting for a peer to close.
//!
//! Helpers panic on failure, as the assertions of the tests that call them do; the few that a
//! test needs to see fail (a refused start, a request to a server that may be gone) return the
//! error instead.

// A test kit fails the test that called it: panicking on what cannot happen is its job.
#![allow(clippy::unwrap_used)]

pub mod agent;
pub mod broker;
pub mod http;
pub mod mosquitto;
pub mod mqtt;
pub mod nats;
pub mod net;
pub mod pki;
pub mod postgres;
pub mod process;
pub mod wait;

pub use agent::{AgentProcess, run_agent};
pub use broker::{
    BrokerProcess, CONFIG, InProcessBroker, PASSWORD, ROOT, USER_ROLES, add_user, client_id_for,
    prepare, start_refused, with_users, write_config,
};
pub use http::{HttpRequest, HttpResponse, http_get, http_get_as, metric, scrape};
pub use mosquitto::Mosquitto;
pub use mqtt::{MqttClient, login_options, options, refusal};
pub use pki::{Pki, make_pki};
pub use process::{Process, binary, free_port, workspace_root};
pub use wait::{PATIENCE, TimedOut, eventually, eventually_within};

/// The sample status with sequence number `seq`, sent a second later per step.
pub fn sample_status(seq: u64) -> renkei_shared::Envelope {
    let mut env = renkei_shared::sample::status();
    env.header.seq = seq;
    env.header.sent_at = renkei_shared::Timestamp(env.header.sent_at.0 + seq as i64 * 1000);
    env
}
