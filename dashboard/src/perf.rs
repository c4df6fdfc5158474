//! Rendering performance, measured in the page and published for tests and people.
//!
//! Two User Timing entries appear in the browser's performance panel: `renkei-first-render`
//! (navigation start → the first render that shows a site) and one `renkei-batch` per batch
//! (dispatch of a batch → its render finished). A summary of them is kept on
//! `window.__renkeiPerf` so a WebDriver test can read it with one script call.
//!
//! The summary also holds the delivery latency of live messages: from the `sent_at` an agent
//! stamped on a message to the end of the render that shows it (both wall clocks, so agent and
//! browser clocks must agree, as they do on one machine or with NTP). Retained copies and
//! replayed backlog (`historical`) are old by nature and not counted.

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
    /// The most recent live messages' sent → shown latencies, in ms, at most
    /// [`KEEP_LATENCIES`].
    latencies: std::collections::VecDeque<f64>,
    latency_count: u64,
    max_latency_ms: f64,
}

/// Latencies kept for the percentiles, older ones dropped first: about the last ten seconds at
/// 2,000 messages a second, so the figures describe the page now, not its start-up burst.
pub const KEEP_LATENCIES: usize = 20_000;

/// The summary published on `window.__renkeiPerf`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PerfSummary {
    pub first_render_ms: Option<f64>,
    pub batches: u64,
    pub batch_p50_ms: Option<f64>,
    pub batch_p99_ms: Option<f64>,
    pub max_batch_ms: Option<f64>,
    /// Live messages measured, and their sent → shown latency.
    pub latency_count: u64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub max_latency_ms: Option<f64>,
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

    /// Records the messages a render has just shown: `shown_ms` is the wall clock then, and
    /// `sent_at_ms` the wall clock each was sent at.
    pub fn shown(&mut self, shown_ms: f64, sent_at_ms: &[i64]) {
        for &sent in sent_at_ms {
            // A clock that runs ahead at the agent shows as zero, not as negative time.
            let ms = (shown_ms - sent as f64).max(0.0);
            self.latency_count += 1;
            self.max_latency_ms = self.max_latency_ms.max(ms);
            if self.latencies.len() == KEEP_LATENCIES {
                self.latencies.pop_front();
            }
            self.latencies.push_back(ms);
        }
    }

    pub fn summary(&self) -> PerfSummary {
        let sorted = |values: &std::collections::VecDeque<f64>| {
            let mut v: Vec<f64> = values.iter().copied().collect();
            v.sort_by(f64::total_cmp);
            v
        };
        let batches = sorted(&self.recent);
        let latencies = sorted(&self.latencies);
        PerfSummary {
            first_render_ms: self.first_render_ms,
            batches: self.batches,
            batch_p50_ms: percentile(&batches, 50.0),
            batch_p99_ms: percentile(&batches, 99.0),
            max_batch_ms: (self.batches > 0).then_some(self.max_batch_ms),
            latency_count: self.latency_count,
            latency_p50_ms: percentile(&latencies, 50.0),
            latency_p99_ms: percentile(&latencies, 99.0),
            max_latency_ms: (self.latency_count > 0).then_some(self.max_latency_ms),
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
        /// `sent_at` of the live messages in the batch being rendered.
        static SHOWING: RefCell<Vec<i64>> = const { RefCell::new(Vec::new()) };
    }

    /// The batch being rendered holds live messages sent at these times (wall clock, ms).
    pub fn applied(sent_at_ms: Vec<i64>) {
        SHOWING.with(|s| s.borrow_mut().extend(sent_at_ms));
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
        let shown = SHOWING.with(|s| std::mem::take(&mut *s.borrow_mut()));
        let batches = LOG.with(|log| {
            let mut log = log.borrow_mut();
            log.batch(p.now() - started);
            log.shown(js_sys::Date::now(), &shown);
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
                latency_count: 0,
                latency_p50_ms: None,
                latency_p99_ms: None,
                max_latency_ms: None,
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
    fn latencies_from_sent_to_shown() {
        let mut log = PerfLog::default();
        log.shown(10_000.0, &[9_990, 9_900, 9_700]);
        log.shown(20_000.0, &[20_050]);
        let s = log.summary();
        assert_eq!(s.latency_count, 4);
        assert_eq!(s.latency_p50_ms, Some(10.0));
        assert_eq!(s.latency_p99_ms, Some(300.0));
        assert_eq!(s.max_latency_ms, Some(300.0));
        assert_eq!(
            PerfLog::default().summary().latency_p99_ms,
            None,
            "nothing measured, nothing claimed"
        );
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
