//! Console logging, and a limiter so that a flood of bad messages cannot flood the console.

/// Writes a warning to the browser console (stderr when run natively, in tests).
pub fn warn(message: &str) {
    #[cfg(target_arch = "wasm32")]
    web_sys::console::warn_1(&message.into());
    #[cfg(not(target_arch = "wasm32"))]
    eprintln!("{message}");
}

/// Lets one event through per period and counts the ones it holds back.
#[derive(Debug, Clone)]
pub struct RateLimit {
    period_ms: i64,
    last_ms: Option<i64>,
    held_back: u64,
}

impl RateLimit {
    pub fn new(period_ms: i64) -> Self {
        RateLimit {
            period_ms,
            last_ms: None,
            held_back: 0,
        }
    }

    /// `Some(n)` if an event at `now_ms` may be logged, `n` being how many were held back since
    /// the last one; `None` if it must be held back.
    pub fn allow(&mut self, now_ms: i64) -> Option<u64> {
        match self.last_ms {
            Some(last) if now_ms - last < self.period_ms => {
                self.held_back += 1;
                None
            }
            _ => {
                self.last_ms = Some(now_ms);
                Some(std::mem::take(&mut self.held_back))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_per_period_with_a_count_of_the_rest() {
        let mut limit = RateLimit::new(5_000);
        assert_eq!(limit.allow(0), Some(0));
        assert_eq!(limit.allow(1), None);
        assert_eq!(limit.allow(4_999), None);
        assert_eq!(limit.allow(5_000), Some(2));
        assert_eq!(limit.allow(5_001), None);
        assert_eq!(limit.allow(20_000), Some(1));
    }
}
