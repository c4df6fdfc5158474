//! Delay between reconnection attempts: doubling from one second up to half a minute, with
//! jitter so that dashboards dropped together by a broker restart do not return together.

/// First delay after a connection ends, in ms.
pub const INITIAL_MS: u32 = 1_000;
/// Longest delay, in ms.
pub const MAX_MS: u32 = 30_000;

#[derive(Debug, Clone)]
pub struct Backoff {
    next_ms: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next_ms: INITIAL_MS,
        }
    }
}

impl Backoff {
    pub fn new() -> Self {
        Backoff::default()
    }

    /// The delay before the next attempt; `random` in [0, 1) picks the jitter (50–100 %).
    pub fn next_delay_ms(&mut self, random: f64) -> u32 {
        let base = self.next_ms;
        self.next_ms = self.next_ms.saturating_mul(2).min(MAX_MS);
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
}
