//! Renkei's edge agent: reports one site's state (or, for drills, hundreds of simulated sites)
//! to HQ over MQTT.
//!
//! Data flow:
//!
//! ```text
//! config ─▶ report::Site (what the site says) ─▶ lifecycle (boot id, seq, birth/death)
//!        ─▶ report::Outgoing (postcard frame + topic) ─▶ link (rumqttc) ─▶ broker
//! broker ─▶ link ─▶ commands (rebirth, set interval) ─▶ back into the same loop
//! ```
//!
//! Layout:
//! - [`config`]: the `run` settings, from a TOML file and CLI flags, with errors that name the key;
//! - [`lifecycle`]: the persisted boot id and the per-boot sequence numbers, arranged so that
//!   the last will (death) outranks the birth of its connection and nothing after it;
//! - [`report`]: the [`report::Site`] trait (what a site reports, on connect and on each tick),
//!   the fixed site of `run`, and the framing of every envelope onto its topic;
//! - [`outbox`]: the durable disk queue (segment log, CRC per record, torn tails cut, corrupt
//!   segments quarantined, bounded by bytes) shared by the daemon and `renkei-agent report`;
//! - [`link`]: one MQTT session per site: will, birth and full state on every ConnAck,
//!   heartbeats on a timer, commands, reconnect with backoff and jitter, graceful death;
//! - [`simulate`]: many simulated shelters across the 23 wards, for drills, demos and load.
//!
//! Not here yet: the durable outbox of ARCHITECTURE.md (reports are sent live only; the full
//! state is re-sent after every reconnect, so HQ converges on the latest state), TLS, and the
//! staff CLI (`renkei-agent report …`).

pub mod config;
pub mod daemon;
pub mod lifecycle;
pub mod link;
pub mod outbox;
pub mod report;
pub mod simulate;
pub mod staff;

/// This agent's version, sent in every birth.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
