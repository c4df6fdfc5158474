//! Hands memory the broker has freed back to the system.
//!
//! glibc's allocator keeps what the process frees for the process's next allocations: it
//! returns memory to the system only from the top of a heap, never from the middle of one. The
//! router frees a filter's log when its last subscriber leaves (rumqttd patch 11), but those
//! logs sit all over the router thread's heap, so a client that subscribed to many filters and
//! left would keep the broker's resident memory at its peak for good. Every [`TRIM_EVERY`] a
//! blocking task calls `malloc_trim(0)`, which walks every arena and hands back each whole free
//! page (`madvise(MADV_DONTNEED)`); memory still in use is untouched, and a page handed back
//! and used again costs one page fault.
//!
//! Each arena is locked while it is walked, so a trim briefly holds up the threads that
//! allocate from it, the router's included. A trim that finds little to hand back takes about
//! a millisecond (1.3 ms at most with 2,000 sites reporting and an integrator subscribed); one
//! that hands back a hundred MiB or more, after a client with 20,000 filters or 2,000 agents at
//! once have left, takes 15 to 55 ms, the page-by-page release being most of it (BENCHMARKS.md,
//! section 8). At one trim every ten seconds this is well under 1 % of one core. Elsewhere than
//! Linux with glibc there is nothing to do.
//! `/metrics` counts the trims and the time spent in them (`renkei_memory_trims_total`,
//! `renkei_memory_trim_seconds_total`).

use std::sync::Arc;
use std::time::Duration;

use crate::metrics::Metrics;

/// How often free memory is handed back.
pub const TRIM_EVERY: Duration = Duration::from_secs(10);

/// The periodic trim; stops when dropped.
#[derive(Debug)]
pub struct Trimmer {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Trimmer {
    /// Starts trimming every [`TRIM_EVERY`] on the current tokio runtime, the first time one
    /// interval from now.
    pub fn start(metrics: Arc<Metrics>) -> Trimmer {
        if !SUPPORTED {
            return Trimmer { task: None };
        }
        let task = tokio::spawn(async move {
            let mut ticks =
                tokio::time::interval_at(tokio::time::Instant::now() + TRIM_EVERY, TRIM_EVERY);
            // After a stall (a suspended host), one trim, not a burst of them.
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                // Off the async workers: a trim holds its thread for milliseconds.
                let trimmed = tokio::task::spawn_blocking(trim_once).await;
                if let Ok(took) = trimmed {
                    metrics.memory_trimmed(took);
                }
            }
        });
        Trimmer { task: Some(task) }
    }
}

impl Drop for Trimmer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Whether this build can hand memory back.
const SUPPORTED: bool = cfg!(all(target_os = "linux", target_env = "gnu"));

/// Hands back every whole free page of every arena; how long it took.
fn trim_once() -> Duration {
    let started = std::time::Instant::now();
    release_free_pages();
    started.elapsed()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn release_free_pages() {
    // SAFETY: malloc_trim takes no pointer and has no precondition. It locks each arena while
    // it walks it, so allocations on other threads go on safely around it, and it releases
    // only pages no allocation holds.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_pages() {}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    /// This process's resident memory in bytes, from `/proc/self/statm` (in pages of 4 KiB).
    fn resident() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
        let pages: Option<u64> = statm.split(' ').nth(1).and_then(|n| n.parse().ok());
        pages.expect("resident pages in /proc/self/statm") * 4096
    }

    #[test]
    fn free_memory_in_the_middle_of_the_heap_goes_back_to_the_system() {
        const BLOCKS: usize = 2_000;
        // Below glibc's threshold for mmap, so the blocks share the heap.
        const BLOCK: usize = 64 * 1024;
        // Written, so their pages are resident; every other one freed, so the free memory
        // lies between blocks in use, where glibc alone keeps it.
        let mut blocks: Vec<Option<Vec<u8>>> =
            (0..BLOCKS).map(|_| Some(vec![1u8; BLOCK])).collect();
        for block in blocks.iter_mut().step_by(2) {
            *block = None;
        }
        let before = resident();
        trim_once();
        let after = resident();
        let free = (BLOCKS / 2 * BLOCK) as u64;
        // Half of it, as other tests in this process allocate meanwhile.
        assert!(
            before.saturating_sub(after) >= free / 2,
            "resident {before} bytes before the trim, {after} after, with {free} free"
        );
        drop(blocks);
    }
}
