//! Coalesces incoming messages so the view changes at most once per flush, not per message.
//!
//! At 2,000 messages per second a render per message would starve the page. Messages queue
//! here; the first one into an empty queue schedules a flush ([`FLUSH_MS`] later), which hands
//! the whole queue to the reducer as one batch. A timer is used rather than
//! `requestAnimationFrame` because browsers stop animation frames in background tabs, where
//! the queue would then grow without bound; timers there still fire (about once a second).

use std::cell::{Cell, RefCell};

use crate::mqtt::Incoming;

/// Delay between the first queued message and the flush, in ms: a few frames, far faster
/// than anyone reads a table, and short enough that a message is on screen within 100 ms of
/// being sent (at 2,000 messages a second that is 25 renders a second, each a few ms).
pub const FLUSH_MS: u32 = 40;

/// The queue between the MQTT client and the reducer.
#[derive(Debug, Default)]
pub struct Inbox {
    queue: RefCell<Vec<Incoming>>,
    flush_scheduled: Cell<bool>,
}

impl Inbox {
    pub fn new() -> Self {
        Inbox::default()
    }

    /// Queues a message; true if the caller must schedule a flush.
    pub fn push(&self, message: Incoming) -> bool {
        self.queue.borrow_mut().push(message);
        !self.flush_scheduled.replace(true)
    }

    /// Takes everything queued; the next push schedules a new flush.
    pub fn take(&self) -> Vec<Incoming> {
        self.flush_scheduled.set(false);
        std::mem::take(&mut *self.queue.borrow_mut())
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn m(i: u8) -> Incoming {
        Incoming {
            topic: format!("t/{i}"),
            payload: Bytes::from(vec![i]),
            retained: false,
        }
    }

    #[test]
    fn one_flush_per_burst_in_arrival_order() {
        let inbox = Inbox::new();
        assert!(inbox.push(m(1)), "first message schedules");
        for i in 2..=100 {
            assert!(!inbox.push(m(i)), "later ones ride along");
        }
        let batch = inbox.take();
        assert_eq!(batch.len(), 100);
        assert!(batch.windows(2).all(|w| w[0].payload[0] < w[1].payload[0]));
        assert!(inbox.take().is_empty());
        assert!(
            inbox.push(m(101)),
            "after a flush the next message schedules again"
        );
    }
}
