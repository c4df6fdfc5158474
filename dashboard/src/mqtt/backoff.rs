//! Delay between reconnection attempts: doubling from one second up to half a minute, with
//! jitter so that dashboards dropped together by a broker restart do not return together.
//!
//! With several addresses (a clustered engine's nodes, `/config.json`'s `mqtt_ws_failover`),
//! a dropped connection moves to the next address after [`NEXT_ADDRESS_MS`], and only a whole
//! round of them failing waits the backoff ([`Addresses`]).

/// First delay after a connection ends, in ms.
pub const INITIAL_MS: u32 = 1_000;
/// Longest delay, in ms.
pub const MAX_MS: u32 = 30_000;
/// The pause before trying the next address when the one in use was lost, in ms.
pub const NEXT_ADDRESS_MS: u32 = 250;
/// Longest delay with several addresses, in ms: a cluster that refuses on every node is
/// electing leaders, which takes seconds, and a round costs each node one connection.
pub const MAX_CLUSTER_MS: u32 = 5_000;

/// The broker's addresses, the first the one to use while it answers.
#[derive(Debug, Clone)]
pub struct Addresses {
    urls: Vec<String>,
    current: usize,
    /// Addresses that failed since a connection last reached the subscribed state.
    failed: usize,
}

impl Addresses {
    /// `first`, then `others` in turn.
    pub fn new(first: String, others: Vec<String>) -> Self {
        let mut urls = vec![first];
        urls.extend(others.into_iter().filter(|u| !u.is_empty()));
        Addresses {
            urls,
            current: 0,
            failed: 0,
        }
    }

    /// How many there are (never none).
    pub fn count(&self) -> usize {
        self.urls.len()
    }

    /// The address to connect to now.
    pub fn current(&self) -> &str {
        self.urls.get(self.current).map_or("", String::as_str)
    }

    /// A connection reached the subscribed state.
    pub fn connected(&mut self) {
        self.failed = 0;
    }

    /// The connection to [`Addresses::current`] ended or never came up: moves on to the next
    /// address. True when every address has failed since the last good connection, so the
    /// backoff is due before the next try.
    pub fn dropped(&mut self) -> bool {
        self.current = (self.current + 1) % self.urls.len().max(1);
        self.failed += 1;
        if self.failed >= self.urls.len() {
            self.failed = 0;
            true
        } else {
            false
        }
    }
}

#[derive(Debug, Clone)]
pub struct Backoff {
    next_ms: u32,
    max_ms: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next_ms: INITIAL_MS,
            max_ms: MAX_MS,
        }
    }
}

impl Backoff {
    pub fn new() -> Self {
        Backoff::default()
    }

    /// The backoff for a broker at `addresses` addresses: capped at [`MAX_CLUSTER_MS`] when
    /// there are several.
    pub fn for_addresses(addresses: usize) -> Self {
        Backoff {
            next_ms: INITIAL_MS,
            max_ms: if addresses > 1 {
                MAX_CLUSTER_MS
            } else {
                MAX_MS
            },
        }
    }

    /// The delay before the next attempt; `random` in [0, 1) picks the jitter (50–100 %).
    pub fn next_delay_ms(&mut self, random: f64) -> u32 {
        let base = self.next_ms;
        self.next_ms = self.next_ms.saturating_mul(2).min(self.max_ms);
        let factor = 0.5 + 0.5 * random.clamp(0.0, 1.0);
        (f64::from(base) * factor) as u32
    }

    /// A connection reached the subscribed state: the next failure starts from the beginning.
    pub fn reset(&mut self) {
        self.next_ms = INITIAL_MS;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new();
        let delays: Vec<u32> = (0..8).map(|_| b.next_delay_ms(0.999_999)).collect();
        assert_eq!(delays[0], 999);
        assert_eq!(delays[1], 1_999);
        assert!(delays[7] <= MAX_MS && delays[7] > MAX_MS - 10);
        b.reset();
        assert_eq!(b.next_delay_ms(0.0), INITIAL_MS / 2);
    }

    #[test]
    fn a_lost_address_gives_way_to_the_next_and_a_failed_round_waits() {
        let mut one = Addresses::new("ws://a".into(), Vec::new());
        assert!(
            one.dropped(),
            "one address: every failure waits the backoff"
        );
        assert_eq!(one.current(), "ws://a");

        let mut three = Addresses::new(
            "ws://a".into(),
            vec!["ws://b".into(), String::new(), "ws://c".into()],
        );
        assert!(!three.dropped());
        assert_eq!(three.current(), "ws://b");
        assert!(!three.dropped());
        assert_eq!(three.current(), "ws://c");
        assert!(three.dropped(), "all three failed: back off");
        let mut backoff = Backoff::for_addresses(three.count());
        let delays: Vec<u32> = (0..6).map(|_| backoff.next_delay_ms(0.999_999)).collect();
        assert!(delays[5] <= MAX_CLUSTER_MS, "{delays:?}");
        assert_eq!(three.current(), "ws://a");
        // A good connection on b, then b is lost: c is tried at once.
        assert!(!three.dropped());
        three.connected();
        assert!(!three.dropped());
        assert_eq!(three.current(), "ws://c");
    }
}
