//! Renkei's HQ dashboard: the 23 wards' live picture in the browser (Yew, WebAssembly).
//!
//! Data flow: [`config`] finds the broker's WebSocket URL → [`mqtt`] connects, subscribes to
//! `renkei/v1/#` and delivers messages → [`inbox`] batches them → [`state`] checks each one and
//! applies it with the shared reducer, then derives the per-ward figures → [`view`] renders
//! them. [`services`] wires the first three together outside any component.
//!
//! Layout:
//! - [`config`]: where the broker is (query, `/config.json`, fallback);
//! - [`mqtt`]: MQTT 3.1.1 over WebSocket on mqttbytes (framing, session, backoff, client);
//! - [`inbox`]: the batching queue between client and reducer;
//! - [`state`]: `use_reducer` state around `renkei_shared::State`;
//! - [`i18n`]: Japanese and English labels, time format;
//! - [`log`]: console output and its rate limit;
//! - [`view`]: the components.
//!
//! Everything but the browser glue builds natively, so `cargo test -p renkei-dashboard` runs
//! the logic without a browser.

// The browser glue that uses some items is compiled for wasm32 only; the wasm32 build (and its
// clippy run) still reports genuinely dead code.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

mod config;
mod i18n;
mod inbox;
mod log;
mod mqtt;
mod services;
mod state;
mod view;

fn main() {
    yew::Renderer::<view::App>::new().render();
}
