//! Renkei's edge agent: reports one site's state (or, for drills, hundreds of simulated sites)
//! to HQ over MQTT.
//!
//! Data flow:
//!
//! ```text
//! staff ─ `report` CLI ─┐
//! staff ─ web form ─────┤
//! heartbeat timer ──────┴▶ outbox (disk, fsync) ─▶ daemon ─▶ delivery core ─▶ link driver (rumqttc) ─▶ broker
//!                              ▲ cursor moved by HQ's receipt (or the PUBACK, confirm = "puback") ◀──┘
//! broker ─▶ link driver ─▶ commands (rebirth, set interval) ─▶ back into the same loop
//! ```
//!
//! Layout:
//! - [`config`]: the `run` settings, from a TOML file and CLI flags, each value typed and parsed
//!   once, with errors that name the key and, for the file, the file and the line;
//! - [`keys`]: the boot id raised on disk at every start and the `(boot, seq)` key of every
//!   message, its place in the delivery order;
//! - [`lifecycle`]: the per-boot sequence numbers, arranged so that the last will (death)
//!   outranks the birth of its connection and nothing after it;
//! - [`outbox`]: the durable disk queue (segment log, CRC per record, torn tails cut, corrupt
//!   segments quarantined, bounded by bytes) shared by the daemon and `renkei-agent report`;
//!   it also hands out every `(boot, seq)` of `run`, so CLI reports and daemon messages share
//!   one order;
//! - [`staff`]: the reports staff enter (shelter, supplies, request, incident), checked, and
//!   [`staff::store`], the one path by which the CLI and the web form save them;
//! - [`power`]: the heartbeat's power source and battery, from Linux's power-supply sysfs
//!   where it says, else from the configuration, else unknown;
//! - [`report`]: the [`report::Site`] trait (what a site reports, on connect and on each tick),
//!   the fixed site of `run`, and the framing of every envelope onto its topic;
//! - [`form`]: the staff web form the daemon serves on the shelter's network (`form_listen`),
//!   parsed, checked and stored by the same code as `renkei-agent report`;
//! - [`daemon`]: `run`'s session: birth and snapshot on every connection, the outbox
//!   delivered through the delivery core, commands, the status file;
//! - [`link`]: what every MQTT session shares: the link driver ([`link::driver`]: the rumqttc
//!   event loop, will, birth, backoff, close), the sans-IO delivery core ([`link::delivery`]:
//!   what to send, and what may leave the outbox on a PUBACK or a receipt), HQ's commands, and
//!   the live session of [`simulate`], which has no outbox;
//! - [`status`]: `{state_dir}/status`, the daemon's account of its link for `renkei-agent
//!   status`;
//! - [`simulate`]: many simulated shelters across the 23 wards, for drills, demos and load,
//!   playing a scenario deterministic for a seed: `steady` (the default: a disaster already
//!   under way) or `earthquake` (calm, a quake at `--quake-at`, then shelters opening, power
//!   failing, requests, incidents and sites going silent);
//! - [`tls`]: `mqtts://` brokers, trusted through the site's `ca_file` only.
//!
//! The outbox alarm (reports refused: outbox or disk full) rides on every heartbeat as
//! `outbox_alarm` until the backlog drains; a heartbeat that finds no room itself is sent live.

pub mod config;
pub mod daemon;
pub mod form;
pub mod keys;
pub mod lifecycle;
pub mod link;
pub mod outbox;
pub mod power;
pub mod report;
pub mod simulate;
pub mod staff;
pub mod status;

/// `mqtts://` brokers, trusted through the site's `ca_file` only (the link's).
pub use renkei_link::tls;

/// This agent's version, sent in every birth.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
