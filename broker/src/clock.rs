//! The broker's clock, injectable: ingest stamps receive times with it, the rules age sites
//! and requests by it, and HTTP computes staleness with it. Tests fix it.

use std::sync::Arc;

use renkei_shared::Timestamp;

/// Where "now" comes from.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> Timestamp + Send + Sync>);

impl Clock {
    /// A clock that reads `now`.
    pub fn new(now: impl Fn() -> Timestamp + Send + Sync + 'static) -> Clock {
        Clock(Arc::new(now))
    }

    /// The time now.
    pub fn now(&self) -> Timestamp {
        (self.0)()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

/// The wall clock.
pub fn system_clock() -> Clock {
    Clock::new(Timestamp::now)
}
