//! How old a figure is, in the coarse steps staff read ("3分前" / "3 min ago").
//!
//! Ages are kept as these steps, not milliseconds, so that a snapshot taken on the next clock
//! tick compares equal when nothing a person could see has changed, and skips the re-render.

use renkei_shared::Timestamp;

/// The age of a figure, rounded down to the unit shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Age {
    /// Under ten seconds, or from a clock slightly ahead of ours.
    JustNow,
    /// Whole tens of seconds, under a minute.
    Seconds(u32),
    Minutes(u32),
    Hours(u32),
    Days(u32),
}

impl Age {
    /// The age at `now` of something sent at `then`.
    pub fn between(now: Timestamp, then: Timestamp) -> Age {
        let secs = now.millis_since(then).max(0) / 1000;
        let clamp = |n: i64| u32::try_from(n).unwrap_or(u32::MAX);
        match secs {
            0..10 => Age::JustNow,
            10..60 => Age::Seconds(clamp(secs / 10 * 10)),
            60..3_600 => Age::Minutes(clamp(secs / 60)),
            3_600..86_400 => Age::Hours(clamp(secs / 3_600)),
            _ => Age::Days(clamp(secs / 86_400)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_down_to_the_unit_shown() {
        let t = Timestamp(1_000_000_000);
        let at = |secs: i64| Age::between(t.plus_secs(secs), t);
        assert_eq!(at(0), Age::JustNow);
        assert_eq!(at(9), Age::JustNow);
        assert_eq!(at(-30), Age::JustNow, "a sender's clock ahead of ours");
        assert_eq!(at(10), Age::Seconds(10));
        assert_eq!(at(59), Age::Seconds(50));
        assert_eq!(at(60), Age::Minutes(1));
        assert_eq!(at(3 * 60 + 59), Age::Minutes(3));
        assert_eq!(at(3_600), Age::Hours(1));
        assert_eq!(at(86_399), Age::Hours(23));
        assert_eq!(at(3 * 86_400), Age::Days(3));
    }

    #[test]
    fn equal_within_a_step_so_ticks_do_not_redraw() {
        let t = Timestamp(0);
        assert_eq!(
            Age::between(t.plus_secs(125), t),
            Age::between(t.plus_secs(179), t)
        );
    }
}
