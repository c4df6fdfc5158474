//! Rendering performance, measured in the page and published for tests and people.
//!
//! Two User Timing entries appear in the browser's performance panel: `renkei-first-render`
//! (navigation start → the first render that shows a site) and one `renkei-batch` per batch
//! (dispatch of a batch → its render finished). A summary of them is kept on
//! `window.__renkeiPerf` so a WebDriver test can read it with one script call.

use serde::Serialize;

/// Batch durations kept for the percentiles; older ones are dropped first.
pub const KEEP_BATCHES: usize = 10_000;

/// What has been measured so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PerfLog {
    first_render_ms: Option<f64>,
    batches: u64,
    /// The most recent durations, in ms, at most [`KEEP_BATCHES`].
    recent: std::collections::VecDeque<f64>,
    max_batch_ms: f64,
}

/// The summary published on `window.__renkeiPerf`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PerfSummary {
    pub first_render_ms: Option<f64>,
    pub batches: u64,
    pub batch_p50_ms: Option<f64>,
    pub batch_p99_ms: Option<f64>,
    pub max_batch_ms: Option<f64>,
}

impl PerfLog {
    /// Records the first render that showed data; later calls are ignored. True if recorded.
    pub fn first_render(&mut self, since_navigation_ms: f64) -> bool {
        if self.first_render_ms.is_some() {
            return false;
        }
        self.first_render_ms = Some(since_navigation_ms);
        true
    }

    pub fn batch(&mut self, ms: f64) {
        self.batches += 1;
        self.max_batch_ms = self.max_batch_ms.max(ms);
        if self.recent.len() == KEEP_BATCHES {
            self.recent.pop_front();
        }
        self.recent.push_back(ms);
    }

    pub fn summary(&self) -> PerfSummary {
        let mut sorted: Vec<f64> = self.recent.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        PerfSummary {
            first_render_ms: self.first_render_ms,
            batches: self.batches,
            batch_p50_ms: percentile(&sorted, 50.0),
            batch_p99_ms: percentile(&sorted, 99.0),
            max_batch_ms: (self.batches > 0).then_some(self.max_batch_ms),
        }
    }
}

/// The nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], pct: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (pct / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

#[cfg(target_arch = "wasm32")]
pub mod browser {
    //! The User Timing calls and the `window.__renkeiPerf` summary.

    use std::cell::RefCell;

    use super::PerfLog;

    thread_local! {
        static LOG: RefCell<PerfLog> = RefCell::new(PerfLog::default());
    }

    const BATCH_START: &str = "renkei-batch-start";
    const BATCH_END: &str = "renkei-batch-end";

    fn performance() -> Option<web_sys::Performance> {
        web_sys::window()?.performance()
    }

    /// Milliseconds since navigation start.
    pub fn now() -> f64 {
        performance().map_or(0.0, |p| p.now())
    }

    /// Marks the start of a batch.
    pub fn batch_started() {
        if let Some(p) = performance() {
            let _ = p.mark(BATCH_START);
        }
    }

    /// Ends a batch begun at `started` (from [`now`]): call once its render has finished.
    pub fn batch_finished(started: f64) {
        let Some(p) = performance() else { return };
        let _ = p.mark(BATCH_END);
        let _ = p.measure_with_start_mark_and_end_mark("renkei-batch", BATCH_START, BATCH_END);
        // Marks and measures are kept by the browser until cleared: at ten batches a second
        // they would grow for as long as the wall screen stays on.
        p.clear_marks_with_mark_name(BATCH_START);
        p.clear_marks_with_mark_name(BATCH_END);
        let batches = LOG.with(|log| {
            let mut log = log.borrow_mut();
            log.batch(p.now() - started);
            log.summary().batches
        });
        if batches.is_multiple_of(1_000) {
            p.clear_measures_with_measure_name("renkei-batch");
        }
        publish();
    }

    /// Records the first render that shows a site (once per page load).
    pub fn first_render() {
        let Some(p) = performance() else { return };
        if LOG.with(|log| log.borrow_mut().first_render(p.now())) {
            let _ = p.mark("renkei-first-render");
            // With no marks, a measure runs from navigation start.
            let _ = p.measure("renkei-first-render");
            publish();
        }
    }

    fn publish() {
        let json = LOG.with(|log| serde_json::to_string(&log.borrow().summary()));
        let (Ok(json), Some(window)) = (json, web_sys::window()) else {
            return;
        };
        if let Ok(value) = js_sys::JSON::parse(&json) {
            let _ = js_sys::Reflect::set(&window, &"__renkeiPerf".into(), &value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), Some(50.0));
        assert_eq!(percentile(&values, 99.0), Some(99.0));
        assert_eq!(percentile(&values, 100.0), Some(100.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn summary_of_batches_and_first_render() {
        let mut log = PerfLog::default();
        assert_eq!(
            log.summary(),
            PerfSummary {
                first_render_ms: None,
                batches: 0,
                batch_p50_ms: None,
                batch_p99_ms: None,
                max_batch_ms: None,
            }
        );
        assert!(log.first_render(812.5));
        assert!(!log.first_render(900.0), "only the first counts");
        for ms in [3.0, 1.0, 2.0, 40.0] {
            log.batch(ms);
        }
        let s = log.summary();
        assert_eq!(s.first_render_ms, Some(812.5));
        assert_eq!(s.batches, 4);
        assert_eq!(s.batch_p50_ms, Some(2.0));
        assert_eq!(s.batch_p99_ms, Some(40.0));
        assert_eq!(s.max_batch_ms, Some(40.0));
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["first_render_ms"], 812.5);
        assert_eq!(json["batches"], 4);
    }

    #[test]
    fn keeps_a_bounded_window_but_counts_everything() {
        let mut log = PerfLog::default();
        log.batch(1_000.0);
        for _ in 0..KEEP_BATCHES {
            log.batch(1.0);
        }
        let s = log.summary();
        assert_eq!(s.batches, KEEP_BATCHES as u64 + 1);
        assert_eq!(
            s.batch_p99_ms,
            Some(1.0),
            "the old slow batch left the window"
        );
        assert_eq!(
            s.max_batch_ms,
            Some(1_000.0),
            "but the maximum remembers it"
        );
    }
}
