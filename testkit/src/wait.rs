//! Waiting for what happens in another process or task: poll a check until it holds.

use std::fmt;
use std::time::{Duration, Instant};

/// How long anything in a test may take before it counts as hung.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Polls `check` until it returns `Some`, or panics after [`PATIENCE`] naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    // Most checks are cheap (a metric, a file): checked often, a test ends soon after.
    poll(PATIENCE, Duration::from_millis(50), what, check)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Polls `check` until it returns `Some`, or fails after `within`.
///
/// A test that sets its own limit waits on something slow (a browser, an agent's backlog, a
/// restarted broker): checking it every 100 ms is often enough and leaves the cores to it.
pub async fn eventually_within<T, F, Fut>(
    within: Duration,
    what: &str,
    check: F,
) -> Result<T, TimedOut>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    poll(within, Duration::from_millis(100), what, check).await
}

async fn poll<T, F, Fut>(
    within: Duration,
    every: Duration,
    what: &str,
    mut check: F,
) -> Result<T, TimedOut>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() > deadline {
            return Err(TimedOut {
                what: what.to_owned(),
                within,
            });
        }
        tokio::time::sleep(every).await;
    }
}

/// What [`eventually_within`] waited for did not come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimedOut {
    pub what: String,
    pub within: Duration,
}

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "timed out after {:?} waiting for {}",
            self.within, self.what
        )
    }
}

impl std::error::Error for TimedOut {}
