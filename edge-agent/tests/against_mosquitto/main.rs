//! The built `renkei-agent` binary against a real MQTT broker (Debian's Mosquitto), watched by
//! a subscriber: what HQ would see on the wire.
//!
//! Each test starts its own Mosquitto on free ports and skips (with a message) where it is not
//! installed. Mosquitto alone publishes no receipts, so these agents run with
//! `confirm = "puback"`; tests/ runs agents against renkei-broker and its receipts.
//!
//! - [`lifecycle`]: birth, heartbeats and the will; SIGTERM and the next boot; commands; a
//!   broker restart; many agents starting at once;
//! - [`simulate`]: the simulator's sites across the wards and its earthquake;
//! - [`outbox`]: staff reports through kill -9, outages, a damaged segment and a full disk;
//! - [`tls`]: `mqtts://` with the broker's CA, another CA and none;
//! - [`link`]: the link driver on its own, as every session uses it;
//! - [`web_form`]: the staff web form the daemon serves, from a POST to HQ;
//! - [`hq`] and [`site`]: the subscriber and what it checks, and the site's side (its
//!   arguments, config file and commands).

mod hq;
mod lifecycle;
mod link;
mod outbox;
mod simulate;
mod site;
mod tls;
mod web_form;
