//! At HQ: the ward brokers' relays, and whether each is reachable now.
//!
//! A relay counts as connected from its subscription to its ward's receipts (which it makes on
//! every connection, after its login was accepted) until its connection ends. While a ward's
//! relay is gone, HQ does not know how that ward's sites are: their silence is the line's, not
//! theirs, so the rules raise no "site silent" alert for them, and the API says since when
//! the relay is unreachable (`GET /api/v1/links`).

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use renkei_shared::line::LineReport;
use renkei_shared::{Timestamp, WardCode};
use serde::Serialize;

/// Every relay seen since start, by ward.
#[derive(Debug, Default)]
pub struct Relays {
    by_ward: Mutex<BTreeMap<WardCode, Entry>>,
}

#[derive(Debug, Clone)]
struct Entry {
    user: String,
    /// Connections of this ward's relay now (a reconnecting relay may briefly have two).
    connections: u32,
    /// When it connected, or when it went.
    since: Timestamp,
    /// When it last published.
    last_heard: Option<Timestamp>,
    /// Its last report of the ward's backlog, and when it came.
    report: Option<(LineReport, Timestamp)>,
}

/// One relay, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RelayView {
    pub ward: WardCode,
    pub user: String,
    pub connected: bool,
    /// When it connected, or since when it is unreachable (Unix ms).
    pub since: i64,
    /// When it last forwarded a message (Unix ms).
    pub last_heard: Option<i64>,
    /// The ward's messages not yet in HQ's record, as its relay last reported (while it is
    /// unreachable: how much was waiting when it was last heard).
    pub backlog: Option<u64>,
    /// When that report came (Unix ms).
    pub backlog_at: Option<i64>,
    /// The relay last reported that HQ stored none of what it forwarded for a while.
    pub stalled: bool,
}

impl Relays {
    /// `user`, the relay of `ward`, connected.
    pub fn up(&self, ward: WardCode, user: &str, now: Timestamp) {
        let mut map = self.by_ward.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = map.entry(ward).or_insert_with(|| Entry {
            user: user.to_owned(),
            connections: 0,
            since: now,
            last_heard: None,
            report: None,
        });
        if entry.connections == 0 {
            entry.since = now;
        }
        entry.connections += 1;
        entry.user = user.to_owned();
    }

    /// A connection of `ward`'s relay ended.
    pub fn down(&self, ward: WardCode, now: Timestamp) {
        let mut map = self.by_ward.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = map.get_mut(&ward) {
            entry.connections = entry.connections.saturating_sub(1);
            if entry.connections == 0 {
                entry.since = now;
            }
        }
    }

    /// `ward`'s relay forwarded a message.
    pub fn heard(&self, ward: WardCode, now: Timestamp) {
        if let Some(entry) = self
            .by_ward
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(&ward)
        {
            entry.last_heard = Some(now);
        }
    }

    /// `ward`'s relay reported its line.
    pub fn report(&self, ward: WardCode, report: LineReport, now: Timestamp) {
        if let Some(entry) = self
            .by_ward
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(&ward)
        {
            entry.report = Some((report, now));
        }
    }

    /// Since when `ward`'s relay is unreachable, if it has one and it is.
    pub fn unreachable_since(&self, ward: WardCode) -> Option<Timestamp> {
        self.by_ward
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&ward)
            .filter(|e| e.connections == 0)
            .map(|e| e.since)
    }

    /// Every relay seen since start.
    pub fn views(&self) -> Vec<RelayView> {
        self.by_ward
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(ward, e)| RelayView {
                ward: *ward,
                user: e.user.clone(),
                connected: e.connections > 0,
                since: e.since.0,
                last_heard: e.last_heard.map(|t| t.0),
                backlog: e.report.map(|(r, _)| r.backlog),
                backlog_at: e.report.map(|(_, at)| at.0),
                stalled: e.report.is_some_and(|(r, _)| r.stalled),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relay_is_unreachable_from_its_last_connection_ending_until_it_returns() {
        let relays = Relays::default();
        let ward = WardCode(131041);
        assert_eq!(relays.unreachable_since(ward), None, "never seen: no relay");
        relays.up(ward, "relay-shinjuku", Timestamp(1));
        relays.up(ward, "relay-shinjuku", Timestamp(2));
        relays.down(ward, Timestamp(3));
        assert_eq!(relays.unreachable_since(ward), None, "one connection left");
        relays.heard(ward, Timestamp(4));
        relays.down(ward, Timestamp(5));
        assert_eq!(relays.unreachable_since(ward), Some(Timestamp(5)));
        let view = &relays.views()[0];
        assert!(!view.connected);
        assert_eq!((view.since, view.last_heard), (5, Some(4)));
        relays.up(ward, "relay-shinjuku", Timestamp(6));
        assert_eq!(relays.unreachable_since(ward), None);
        assert_eq!(relays.views()[0].since, 6);
    }

    #[test]
    fn the_last_backlog_report_outlives_the_connection() {
        let relays = Relays::default();
        let ward = WardCode(131041);
        let report = |backlog| LineReport {
            backlog,
            stalled: false,
            at: Timestamp(0),
        };
        relays.report(ward, report(5), Timestamp(1));
        assert!(relays.views().is_empty(), "no relay, no report kept");
        relays.up(ward, "relay-shinjuku", Timestamp(2));
        relays.report(ward, report(120), Timestamp(3));
        relays.down(ward, Timestamp(4));
        let view = &relays.views()[0];
        assert!(!view.connected);
        assert_eq!((view.backlog, view.backlog_at), (Some(120), Some(3)));
        relays.up(ward, "relay-shinjuku", Timestamp(5));
        relays.report(ward, report(3000), Timestamp(6));
        assert_eq!(relays.views()[0].backlog, Some(3000));
    }
}
