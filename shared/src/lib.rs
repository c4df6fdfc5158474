//! Renkei's protocol, defined once for the agent, the broker, the dashboard and integrators.
//!
//! Data flow: an agent builds an [`model::Envelope`], [`codec::encode`]s it and publishes it on
//! [`topic::Topic::of`] the envelope; the broker and the dashboard [`receive::receive`] it
//! (parse the topic, [`codec::decode`] and [`validate`] the payload, check it arrived on its
//! own topic) and [`reducer::State::apply`] it to the cross-ward state, from which they read
//! per-ward [`reducer::WardRollup`]s.
//!
//! Layout:
//! - [`ward`]: the 23 special wards and their official codes;
//! - [`model`]: the messages of DOMAIN.md;
//! - [`topic`]: every MQTT topic, built and parsed;
//! - [`codec`]: postcard framing with a version byte and a size limit;
//! - [`validate`]: what a decoded message must also satisfy;
//! - [`reducer`]: the state and the one function that changes it;
//! - [`receive`]: the one path from a topic and payload off the network to a checked message;
//! - [`receipt`]: HQ's word to a site that its messages are stored;
//! - [`line`]: a ward broker's report of its line to HQ (its backlog);
//! - [`mirror`]: the JSON mirror's message for integrators (the envelope and when HQ got it);
//! - [`sample`]: one example of every message (golden vectors, docs, tests);
//! - [`units`]: sizes and durations as the broker's and the agent's settings write them;
//! - [`url`]: the one grammar of broker addresses (`mqtt://`, `mqtts://`).
//!
//! The crate builds for `wasm32-unknown-unknown` and has no I/O beyond reading the clock
//! ([`model::Timestamp::now`]).

pub mod codec;
pub mod line;
pub mod mirror;
pub mod model;
pub mod receipt;
pub mod receive;
pub mod reducer;
pub mod sample;
pub mod topic;
pub mod units;
pub mod url;
pub mod validate;
pub mod ward;

pub use codec::{CodecError, decode, encode};
pub use model::*;
pub use receipt::{Receipt, receipt_topic};
pub use receive::{Refusal, receive};
pub use reducer::{Change, Level, Scope, State, WardRollup, World};
pub use topic::Topic;
pub use ward::{WARDS, Ward, WardCode};
