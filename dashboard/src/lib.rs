//! Renkei's HQ dashboard: the 23 wards' live picture in the browser (Yew, WebAssembly).
//!
//! Data flow: [`config`] finds the broker's WebSocket URL and whether it wants a login →
//! [`mqtt`] connects, subscribes to `renkei/v1/#` and delivers messages → [`inbox`] batches
//! them → [`state`] checks each one and applies it with the shared reducer, then derives what
//! the page shows (ward figures, [`alerts`], one ward's [`detail`], one [`site`]) → `view` renders
//! it; the site view also fetches the site's [`history`] over HTTP.
//! Acknowledgements go the other way: [`alerts`] builds them, the client publishes them, and
//! they show once the broker hands them back. `services` wires it together outside any
//! component; [`perf`] measures batches and renders.
//!
//! Layout:
//! - [`config`]: where the broker is (query, `/config.json`, fallback) and its login rule;
//! - [`mqtt`]: MQTT 3.1.1 over WebSocket on mqttbytes (framing, session, backoff, client);
//! - [`inbox`]: the batching queue between client and reducer;
//! - [`state`]: `use_reducer` state around `renkei_shared::State`;
//! - [`detail`], [`site`], [`alerts`], [`age`], [`route`]: the view models, plain data tested
//!   natively;
//! - [`history`]: a shelter's recorded reports from the broker's HTTP API, and its chart's
//!   geometry;
//! - [`i18n`]: Japanese and English labels, ages, time format;
//! - [`perf`]: User Timing marks and the `window.__renkeiPerf` summary;
//! - `log`: console output and its rate limit;
//! - `view`: the components.
//!
//! Everything but the browser glue builds natively, so `cargo test -p renkei-dashboard` runs
//! the logic without a browser; `tests/` runs the wire pieces in Chromium too.

// The browser glue that uses some items is compiled for wasm32 only; the wasm32 build (and its
// clippy run) still reports genuinely dead code.
#![cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]

pub mod age;
pub mod alerts;
pub mod config;
pub mod detail;
pub mod history;
pub mod i18n;
pub mod inbox;
pub mod links;
mod log;
pub mod mqtt;
pub mod perf;
pub mod route;
mod services;
pub mod site;
pub mod state;
mod view;
pub mod whoami;

/// Mounts the app on the page's body.
pub fn run() {
    yew::Renderer::<view::App>::new().render();
}
