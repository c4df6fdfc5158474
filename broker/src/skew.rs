//! The sender's clock against the broker's: what the live state and the rules take from a
//! message's `sent_at`.
//!
//! A site's clock may be wrong (a box without a real-time clock after a power cut) or lied
//! about, and the rules must not fire, or stay quiet, because of it:
//! - a `sent_at` more than [`FUTURE_TOLERANCE_MS`] ahead of the broker's receive time would keep a
//!   dead site "heard from" until that future time, so the live state takes the receive time
//!   instead;
//! - a supply request's age counts from when the broker received it, never from an earlier
//!   `sent_at`: a request delivered late (after an outage) or back-dated is unanswered only
//!   from the moment HQ could have seen it, so the "unanswered request" rule cannot fire on
//!   arrival.
//!
//! Site messages are ordered by `(boot, seq)`, not by time, so neither changes which report is
//! the latest. The recorded bytes, the mirror and what dashboards receive keep the sender's
//! `sent_at`; only the broker's live state (and so the rules and the HTTP API) uses the
//! adjusted copy, the same at ingest and when the state is rebuilt from the record. Every
//! message whose clock is off by more than the tolerance is counted by direction in
//! `renkei_sent_at_skew_total`, with the largest skew seen.

use renkei_shared::{Body, Envelope, Origin, Timestamp};

/// How far ahead of the broker's clock a sender's may run before its time is not believed.
pub const FUTURE_TOLERANCE_MS: i64 = 5 * 60 * 1000;

/// How a message's `sent_at` compares with its receive time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skew {
    /// Within the tolerance either way.
    None,
    /// Ahead of the broker by this many milliseconds.
    Future(i64),
    /// Behind by this many milliseconds (normal for a report kept through an outage).
    Past(i64),
}

impl Skew {
    pub fn of(sent_at: Timestamp, received_at: Timestamp) -> Skew {
        let ahead = sent_at.millis_since(received_at);
        if ahead > FUTURE_TOLERANCE_MS {
            Skew::Future(ahead)
        } else if -ahead > FUTURE_TOLERANCE_MS {
            Skew::Past(-ahead)
        } else {
            Skew::None
        }
    }
}

/// The copy of `envelope` the live state takes, if it differs: a site's `sent_at` from the
/// future becomes the receive time, and a request's `sent_at` is never before it.
pub fn for_state(envelope: &Envelope, received_at: Timestamp) -> Option<Envelope> {
    if !matches!(envelope.header.origin, Origin::Site(_)) {
        return None;
    }
    let sent_at = envelope.header.sent_at;
    let adjusted = match (&envelope.body, Skew::of(sent_at, received_at)) {
        (_, Skew::Future(_)) => received_at,
        (Body::Request(_), _) if sent_at < received_at => received_at,
        _ => return None,
    };
    let mut copy = envelope.clone();
    copy.header.sent_at = adjusted;
    Some(copy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use renkei_shared::sample;

    #[test]
    fn future_site_times_and_early_request_times_become_the_receive_time() {
        let now = sample::SENT_AT;
        let mut status = sample::status();
        status.header.sent_at = now.plus_secs(10);
        assert_eq!(for_state(&status, now), None, "small drift is believed");
        status.header.sent_at = now.plus_secs(3600 * 24 * 365);
        assert_eq!(for_state(&status, now).unwrap().header.sent_at, now);
        status.header.sent_at = Timestamp(0);
        assert_eq!(
            for_state(&status, now),
            None,
            "a late status keeps its time"
        );

        let mut request = sample::request();
        request.header.sent_at = Timestamp(0);
        assert_eq!(for_state(&request, now).unwrap().header.sent_at, now);
        assert_eq!(Skew::of(Timestamp(0), now), Skew::Past(now.0));

        let mut alert = sample::alert();
        alert.header.sent_at = now.plus_secs(3600);
        assert_eq!(
            for_state(&alert, now),
            None,
            "HQ messages are ordered by HQ's time"
        );
    }
}
