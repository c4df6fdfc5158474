//! MQTT 3.1.1 over a browser WebSocket, on the mqttbytes codec (rumqttc does not build for
//! wasm32).
//!
//! - [`frames`]: bytes from the socket → MQTT packets;
//! - [`session`]: the protocol of one connection (CONNECT, SUBSCRIBE, PUBACK, PINGREQ), no I/O;
//! - [`backoff`]: delays between reconnections;
//! - `client` (browser only): the loop that owns the socket, drives a session and reconnects,
//!   reporting [`Event`]s through a callback so that no component holds the connection.

pub mod backoff;
#[cfg(target_arch = "wasm32")]
pub mod client;
pub mod frames;
pub mod session;

pub use session::{Credentials, Incoming};

/// The connection as the view shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Opening the socket or waiting for the broker to accept the session and subscription.
    Connecting,
    /// Subscribed: retained state has arrived or is arriving, live updates follow.
    Connected,
    /// Between attempts.
    Disconnected,
}

impl ConnState {
    /// The value of the indicator's `data-state` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::Connecting => "connecting",
            ConnState::Connected => "connected",
            ConnState::Disconnected => "disconnected",
        }
    }
}

/// What the client reports to the app.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    State(ConnState),
    Message(Incoming),
    /// The broker refused the login (or closed the connection before accepting it): the
    /// client has stopped, and a new login is needed.
    Refused(String),
}

/// A message the page publishes (an acknowledgement).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// The page's client id, from a random number in [0, 1): `{user}-dash-{8 hex digits}` with a
/// login (the broker admits a login only under ids of its own user name, so no page can take
/// over another user's session), `dash-{8 hex digits}` for an anonymous page in demo mode.
/// Random per connection, so two tabs of one user do not take over each other's session.
pub fn client_id(user: Option<&str>, random: f64) -> String {
    let n = (random.clamp(0.0, 1.0) * f64::from(u32::MAX)) as u32;
    match user {
        Some(user) => format!("{user}-dash-{n:08x}"),
        None => format!("dash-{n:08x}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids_are_short_distinct_and_under_the_users_name() {
        assert_eq!(client_id(None, 0.0), "dash-00000000");
        assert_eq!(client_id(None, 0.5).len(), 13);
        assert_ne!(client_id(None, 0.25), client_id(None, 0.26));
        assert_eq!(client_id(Some("sato"), 0.0), "sato-dash-00000000");
        assert!(client_id(Some("tanaka"), 0.7).starts_with("tanaka-dash-"));
    }
}
