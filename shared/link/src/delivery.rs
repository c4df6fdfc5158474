//! The delivery core: which stored records go out, and when one may leave the store.
//!
//! ```text
//!            connected(last stored)
//!   Offline ────────────────────────▶ Online ─ offer ─▶ in flight ─ confirmed ─▶ cursor moves
//!      ▲        disconnected()          │      (window)    │      (receipt, or    over the
//!      └────────────────────────────────┘                  │       PUBACK)        confirmed prefix
//!                                                          └─ PUBACK, no receipt in time:
//!                                                             all unconfirmed sent again
//! ```
//!
//! No I/O: its user tells it what happened (a connection up or lost, a PUBACK, a receipt, the
//! time) and does what it answers: read the records it [`Delivery::wants`] from its store,
//! publish the ones [`Delivery::offer`] returns, and move the store's cursor to each new
//! [`Delivery::cursor`] it returns (records up to it may leave the store). The store stays the
//! one store of records; this keeps only keys. A restarted process starts a new core from the
//! store's cursor. Two users drive it: the agent over its outbox (keys `(boot, seq)`, in
//! order) and a ward broker's uplink over its SQLite record (keys row ids, live first).
//!
//! The rules, each tested below:
//! 1. **In order, within a window**: records go out in key order after the last one sent
//!    (in their lane), at most `window` unconfirmed at once.
//! 2. **Backlog is historical and paced**: records stored before the connection came up go
//!    out marked historical, at most `replay_rate` a second (bursts of one second's worth).
//!    With [`Order::InOrder`] (the agent) live records wait behind them, so a site's order
//!    holds; with [`Order::LiveFirst`] (a ward's uplink) live records go first, in a lane of
//!    their own, and the backlog follows in the room they leave.
//! 3. **What confirms**: with [`Confirm::Receipt`] only the next hop's receipt naming a
//!    record in flight confirms it (a PUBACK says only that the broker took it, not that its
//!    recorder stored it); with [`Confirm::PubAck`] its PUBACK does.
//! 4. **The cursor moves over the confirmed prefix only**: a record confirmed behind an
//!    unconfirmed (or unsent) one waits for it, so nothing unconfirmed ever leaves the store.
//!    With [`Order::LiveFirst`] the live lane's records wait for the whole backlog.
//! 5. **Overdue receipts resend**: a record with a PUBACK and no receipt for
//!    [`RECEIPT_TIMEOUT`] means the next hop did not store what its broker took; everything
//!    unconfirmed is sent again from the cursor (the next hop keeps one copy of each message).
//! 6. **A lost connection forgets the window**: rumqttc's own queue is dropped with it, so the
//!    next connection sends everything unconfirmed again from the cursor.
//! 7. **A publish not queued is offered again**, with everything sent after it in its lane.
//! 8. **A receipt for a record not in flight confirms nothing**: the window knows only what
//!    this connection sent; the record goes again and the next receipt confirms it.
//! 9. **A record that can never be sent is abandoned** (it no longer decodes after an
//!    upgrade): counted as confirmed, so that it does not hold back the rest.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Debug;
use std::time::{Duration, Instant};

use crate::{Confirm, Key};

/// The agent's window: records handed to the link and not yet confirmed, at most. A receipt
/// comes up to one recorder batch (200 ms by default) after the PUBACK, so this allows a few
/// hundred records a second per site.
pub const WINDOW: usize = 64;
/// A record with a PUBACK and no receipt this long after it is sent again.
pub const RECEIPT_TIMEOUT: Duration = Duration::from_secs(30);

/// How live records and the backlog share the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// One lane in key order: live records wait behind the backlog (a site's own messages,
    /// whose order HQ reads as the site's story).
    InOrder,
    /// Live records first, the backlog in the room they leave (a ward's uplink: the news of a
    /// hundred sites must not wait behind an hour of history).
    LiveFirst,
}

/// A read the core asks of the store: up to `limit` records with keys after `after` and, if
/// `until` is given, not after it. A read for the backlog lane that finds nothing tells the
/// core that the backlog is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want<K = Key> {
    pub after: K,
    pub limit: usize,
    pub until: Option<K>,
}

/// A record to publish now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Send<K = Key> {
    pub key: K,
    /// Stored before this connection came up: the next hop must not take it for news.
    pub historical: bool,
}

/// Receipts were overdue: the window was emptied and everything unconfirmed goes again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overdue<K = Key> {
    /// The oldest record whose receipt was overdue.
    pub record: K,
    /// Records in flight and unconfirmed when the window was emptied.
    pub unconfirmed: usize,
}

/// Which stored records are out, and what may leave the store.
#[derive(Debug)]
pub struct Delivery<K = Key> {
    confirm: Confirm,
    order: Order,
    window: usize,
    rate: Rate,
    /// Every record up to here is confirmed.
    cursor: K,
    phase: Phase<K>,
}

#[derive(Debug)]
enum Phase<K> {
    /// No connection: nothing goes out.
    Offline,
    Online(Window<K>),
}

/// One lane of records in flight, in key order.
#[derive(Debug, Default)]
struct Lane<K> {
    /// Records handed to the link, in order, until the cursor passes them.
    in_flight: VecDeque<K>,
    /// The last record handed to the link in this lane.
    last_sent: K,
}

impl<K: Ord> Lane<K> {
    fn holds(&self, key: &K) -> bool {
        self.in_flight.binary_search(key).is_ok()
    }
}

/// What the current connection has out.
#[derive(Debug)]
struct Window<K> {
    /// [`Order::InOrder`]: every record; [`Order::LiveFirst`]: records up to `backlog_until`.
    backlog: Lane<K>,
    /// [`Order::LiveFirst`]: records after `backlog_until`.
    live: Lane<K>,
    /// Of those in flight, the confirmed ones.
    confirmed: BTreeSet<K>,
    /// Of those, the ones with a PUBACK and no receipt yet, with when the PUBACK came.
    pubacked: BTreeMap<K, Instant>,
    /// Records up to here were stored before this connection: backlog.
    backlog_until: Option<K>,
    /// [`Order::LiveFirst`]: a read of the backlog lane found nothing more to send.
    backlog_read: bool,
}

impl<K: Copy + Ord> Window<K> {
    /// A window with nothing out: sending starts again after `cursor`.
    fn fresh(order: Order, cursor: K, backlog_until: Option<K>) -> Window<K> {
        let live_from = match (order, backlog_until) {
            (Order::LiveFirst, Some(until)) => until.max(cursor),
            _ => cursor,
        };
        Window {
            backlog: Lane {
                in_flight: VecDeque::new(),
                last_sent: cursor,
            },
            live: Lane {
                in_flight: VecDeque::new(),
                last_sent: live_from,
            },
            confirmed: BTreeSet::new(),
            pubacked: BTreeMap::new(),
            backlog_until,
            backlog_read: backlog_until.is_none_or(|until| until <= cursor),
        }
    }

    fn in_flight(&self) -> usize {
        self.backlog.in_flight.len() + self.live.in_flight.len()
    }

    /// Out and not confirmed: what the window bounds. (Confirmed records waiting for the
    /// cursor occupy no room on the link: with [`Order::LiveFirst`] the live lane's wait for
    /// backlog records that may not be sent yet.)
    fn unconfirmed(&self) -> usize {
        self.in_flight().saturating_sub(self.confirmed.len())
    }

    fn holds(&self, key: &K) -> bool {
        self.backlog.holds(key) || self.live.holds(key)
    }

    fn is_backlog(&self, key: &K) -> bool {
        self.backlog_until.is_some_and(|until| *key <= until)
    }
}

impl<K: Copy + Ord + Default + Debug> Delivery<K> {
    /// A core for a process whose store's cursor is `cursor`, offline.
    pub fn new(
        confirm: Confirm,
        order: Order,
        window: usize,
        cursor: K,
        replay_rate: u32,
        now: Instant,
    ) -> Delivery<K> {
        Delivery {
            confirm,
            order,
            window: window.max(1),
            rate: Rate::new(replay_rate, now),
            cursor,
            phase: Phase::Offline,
        }
    }

    /// Every record up to here is confirmed and may leave the store.
    pub fn cursor(&self) -> K {
        self.cursor
    }

    /// Records out and not yet passed by the cursor.
    pub fn in_flight(&self) -> usize {
        match &self.phase {
            Phase::Offline => 0,
            Phase::Online(w) => w.in_flight(),
        }
    }

    /// When the oldest record the broker took (its PUBACK) and the next hop has not yet
    /// confirmed was taken: a link that says connected while nothing it sends is stored
    /// shows here long before the receipt timeout resends.
    pub fn oldest_unreceipted(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Offline => None,
            Phase::Online(w) => w.pubacked.values().min().copied(),
        }
    }

    /// Records out and not yet confirmed: at most the window.
    pub fn unconfirmed(&self) -> usize {
        match &self.phase {
            Phase::Offline => 0,
            Phase::Online(w) => w.unconfirmed(),
        }
    }

    /// The most records this core has out unconfirmed at once.
    pub fn window(&self) -> usize {
        self.window
    }

    /// Online, with records stored before the connection still to send.
    pub fn replaying(&self) -> bool {
        match &self.phase {
            Phase::Offline => false,
            Phase::Online(w) => match self.order {
                Order::InOrder => w.backlog_until.is_some_and(|u| w.backlog.last_sent < u),
                Order::LiveFirst => !w.backlog_read,
            },
        }
    }

    /// A connection came up; `last_stored` is the newest record in the store now (what is
    /// stored up to it is backlog). Sending starts again after the cursor.
    pub fn connected(&mut self, last_stored: Option<K>) {
        let backlog_until = last_stored.filter(|last| *last > self.cursor);
        self.phase = Phase::Online(Window::fresh(self.order, self.cursor, backlog_until));
    }

    /// The connection is gone, and with it everything it had out.
    pub fn disconnected(&mut self) {
        self.phase = Phase::Offline;
    }

    /// The reads to make next, most urgent first, if there is room to send any: with
    /// [`Order::LiveFirst`] the live lane's, then the backlog's.
    pub fn wants(&self) -> Vec<Want<K>> {
        let Phase::Online(w) = &self.phase else {
            return Vec::new();
        };
        let limit = self.window.saturating_sub(w.unconfirmed());
        if limit == 0 {
            return Vec::new();
        }
        match self.order {
            Order::InOrder => vec![Want {
                after: w.backlog.last_sent,
                limit,
                until: None,
            }],
            Order::LiveFirst => {
                let mut wants = vec![Want {
                    after: w.live.last_sent,
                    limit,
                    until: None,
                }];
                if !w.backlog_read {
                    wants.push(Want {
                        after: w.backlog.last_sent,
                        limit,
                        until: w.backlog_until,
                    });
                }
                wants
            }
        }
    }

    /// Takes the keys of the records read for `want` (one of [`Delivery::wants`]), in order,
    /// and returns those to publish now, in that order: the ones after the last sent in their
    /// lane, up to where the window or the replay rate cuts them off.
    pub fn offer(&mut self, want: &Want<K>, keys: &[K], now: Instant) -> Vec<Send<K>> {
        let window = self.window;
        let order = self.order;
        let Phase::Online(w) = &mut self.phase else {
            return Vec::new();
        };
        if order == Order::LiveFirst && want.until.is_some() && keys.is_empty() {
            w.backlog_read = true;
            self.advance();
            return Vec::new();
        }
        let mut out = Vec::new();
        for &key in keys {
            if w.unconfirmed() >= window {
                break;
            }
            let historical = w.is_backlog(&key);
            let lane = match order {
                Order::LiveFirst if !historical => &mut w.live,
                _ => &mut w.backlog,
            };
            if key <= lane.last_sent {
                continue;
            }
            if historical && !self.rate.try_take(now) {
                break;
            }
            lane.in_flight.push_back(key);
            lane.last_sent = key;
            out.push(Send { key, historical });
        }
        out
    }

    /// The link did not take the publish of `key`: it and everything sent after it in its
    /// lane go again.
    pub fn unsent(&mut self, key: K) {
        let cursor = self.cursor;
        let Phase::Online(w) = &mut self.phase else {
            return;
        };
        let fresh = Window::fresh(self.order, cursor, w.backlog_until);
        let (lane, start) = if w.live.holds(&key) {
            (&mut w.live, fresh.live.last_sent)
        } else {
            (&mut w.backlog, fresh.backlog.last_sent)
        };
        let Ok(at) = lane.in_flight.binary_search(&key) else {
            return;
        };
        for k in lane.in_flight.drain(at..) {
            w.confirmed.remove(&k);
            w.pubacked.remove(&k);
        }
        lane.last_sent = lane.in_flight.back().copied().unwrap_or(start);
    }

    /// `key`, offered, can never be sent: counted as confirmed. Returns the new cursor if it
    /// moved.
    pub fn abandon(&mut self, key: K) -> Option<K> {
        self.confirm(key)
    }

    /// The broker's PUBACK for `key`. Returns the new cursor if it moved.
    pub fn puback(&mut self, key: K, now: Instant) -> Option<K> {
        match self.confirm {
            Confirm::PubAck => self.confirm(key),
            Confirm::Receipt => {
                if let Phase::Online(w) = &mut self.phase
                    && w.holds(&key)
                    && !w.confirmed.contains(&key)
                {
                    w.pubacked.insert(key, now);
                }
                None
            }
        }
    }

    /// The next hop's receipt: confirms the records in flight that `names` picks out.
    /// Returns the new cursor if it moved.
    pub fn receipt(&mut self, mut names: impl FnMut(&K) -> bool) -> Option<K> {
        let Phase::Online(w) = &self.phase else {
            return None;
        };
        let named: Vec<K> = w
            .backlog
            .in_flight
            .iter()
            .chain(&w.live.in_flight)
            .filter(|k| names(k))
            .copied()
            .collect();
        named
            .into_iter()
            .fold(None, |moved, key| self.confirm(key).or(moved))
    }

    /// On the clock: if a receipt is overdue, empties the window so that everything
    /// unconfirmed goes again from the cursor.
    pub fn check_overdue(&mut self, now: Instant) -> Option<Overdue<K>> {
        let Phase::Online(w) = &mut self.phase else {
            return None;
        };
        let record = w
            .pubacked
            .iter()
            .filter(|(_, at)| now.duration_since(**at) >= RECEIPT_TIMEOUT)
            .map(|(key, _)| *key)
            .next()?;
        let unconfirmed = w.unconfirmed();
        *w = Window::fresh(self.order, self.cursor, w.backlog_until);
        Some(Overdue {
            record,
            unconfirmed,
        })
    }

    /// Marks `key`, in flight, as confirmed and moves the cursor over the confirmed prefix.
    fn confirm(&mut self, key: K) -> Option<K> {
        let Phase::Online(w) = &mut self.phase else {
            return None;
        };
        if !w.holds(&key) {
            return None;
        }
        w.pubacked.remove(&key);
        w.confirmed.insert(key);
        let before = self.cursor;
        self.advance();
        (self.cursor != before).then_some(self.cursor)
    }

    /// Moves the cursor over the confirmed prefix: the backlog lane's, then (once the backlog
    /// is all sent and confirmed) the live lane's.
    fn advance(&mut self) {
        let Phase::Online(w) = &mut self.phase else {
            return;
        };
        while let Some(front) = w.backlog.in_flight.front().copied() {
            if !w.confirmed.remove(&front) {
                return;
            }
            w.backlog.in_flight.pop_front();
            self.cursor = self.cursor.max(front);
        }
        if self.order == Order::InOrder || !w.backlog_read {
            return;
        }
        while let Some(front) = w.live.in_flight.front().copied() {
            if !w.confirmed.remove(&front) {
                return;
            }
            w.live.in_flight.pop_front();
            self.cursor = self.cursor.max(front);
        }
    }
}

/// A token bucket: `rate` per second, bursts of up to one second's worth.
#[derive(Debug)]
struct Rate {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Rate {
    fn new(rate: u32, now: Instant) -> Rate {
        Rate {
            rate: f64::from(rate),
            tokens: f64::from(rate),
            at: now,
        }
    }

    fn try_take(&mut self, now: Instant) -> bool {
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate)
            .min(self.rate.max(1.0));
        self.at = self.at.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use renkei_shared::Receipt;

    use super::*;

    /// A want for the in-order lane (the only one an in-order core has).
    fn in_order() -> Want {
        Want {
            after: Key::default(),
            limit: WINDOW,
            until: None,
        }
    }

    /// Picks out what a receipt names.
    fn names(r: Receipt) -> impl Fn(&Key) -> bool {
        move |k| r.covers(k.boot, k.seq)
    }

    fn k(seq: u64) -> Key {
        Key { boot: 1, seq }
    }

    fn keys(seqs: std::ops::RangeInclusive<u64>) -> Vec<Key> {
        seqs.map(k).collect()
    }

    fn receipt(seqs: impl IntoIterator<Item = u64>) -> Receipt {
        Receipt::of_keys(seqs.into_iter().map(|s| (1, s))).remove(0)
    }

    fn seqs(sends: &[Send]) -> Vec<u64> {
        sends.iter().map(|s| s.key.seq).collect()
    }

    /// Connected, nothing stored before the connection, a replay rate that never binds.
    fn online(confirm: Confirm, t0: Instant) -> Delivery {
        let mut d = Delivery::new(confirm, Order::InOrder, WINDOW, Key::default(), 1000, t0);
        d.connected(None);
        d
    }

    /// Online, with records 1 to `n` sent.
    fn sent(confirm: Confirm, n: u64) -> (Delivery, Instant) {
        let t0 = Instant::now();
        let mut d = online(confirm, t0);
        assert_eq!(d.offer(&in_order(), &keys(1..=n), t0).len() as u64, n);
        (d, t0)
    }

    #[test]
    fn records_go_in_order_after_the_last_sent_within_the_window() {
        let t0 = Instant::now();
        let mut d = online(Confirm::PubAck, t0);
        assert_eq!(
            d.wants().first().copied(),
            Some(Want {
                after: Key::default(),
                limit: WINDOW,
                until: None
            })
        );
        let sent = d.offer(&in_order(), &keys(1..=100), t0);
        assert_eq!(seqs(&sent), (1..=64).collect::<Vec<_>>());
        assert!(sent.iter().all(|s| !s.historical));
        assert_eq!(d.wants().first().copied(), None, "the window is full");
        assert!(d.offer(&in_order(), &keys(65..=70), t0).is_empty());
        assert_eq!(d.puback(k(1), t0), Some(k(1)));
        assert_eq!(
            d.wants().first().copied(),
            Some(Want {
                after: k(64),
                limit: 1,
                until: None
            })
        );
        // Keys already sent are not sent twice.
        assert_eq!(seqs(&d.offer(&in_order(), &keys(60..=70), t0)), vec![65]);
    }

    #[test]
    fn backlog_is_historical_and_paced_and_live_records_wait_behind_it() {
        let t0 = Instant::now();
        let mut d = Delivery::new(
            Confirm::PubAck,
            Order::InOrder,
            WINDOW,
            Key::default(),
            10,
            t0,
        );
        d.connected(Some(k(20)));
        // One second's worth at once.
        let first = d.offer(&in_order(), &keys(1..=30), t0);
        assert_eq!(seqs(&first), (1..=10).collect::<Vec<_>>());
        assert!(first.iter().all(|s| s.historical));
        // The rest of the backlog holds back the live records behind it.
        assert!(d.offer(&in_order(), &keys(11..=30), t0).is_empty());
        let half = d.offer(&in_order(), &keys(11..=30), t0 + Duration::from_millis(500));
        assert_eq!(seqs(&half), (11..=15).collect::<Vec<_>>());
        let rest = d.offer(&in_order(), &keys(16..=30), t0 + Duration::from_secs(5));
        assert_eq!(seqs(&rest), (16..=30).collect::<Vec<_>>());
        assert!(rest.iter().take(5).all(|s| s.historical));
        assert!(rest.iter().skip(5).all(|s| !s.historical));

        // Live records are never paced.
        let mut d = Delivery::new(
            Confirm::PubAck,
            Order::InOrder,
            WINDOW,
            Key::default(),
            1,
            t0,
        );
        d.connected(None);
        assert_eq!(d.offer(&in_order(), &keys(1..=50), t0).len(), 50);
    }

    #[test]
    fn with_receipts_a_puback_alone_confirms_nothing() {
        let (mut d, t0) = sent(Confirm::Receipt, 3);
        assert_eq!(d.puback(k(1), t0), None);
        assert_eq!(d.cursor(), Key::default());
        assert_eq!(d.receipt(names(receipt([1]))), Some(k(1)));

        // With confirm = "puback", the PUBACK is the confirmation.
        let (mut d, t0) = sent(Confirm::PubAck, 3);
        assert_eq!(d.puback(k(1), t0), Some(k(1)));
    }

    #[test]
    fn the_cursor_moves_over_the_confirmed_prefix_only() {
        let (mut d, _) = sent(Confirm::Receipt, 4);
        assert_eq!(d.receipt(names(receipt([2, 3]))), None);
        assert_eq!(d.cursor(), Key::default());
        assert_eq!(d.in_flight(), 4);
        assert_eq!(d.receipt(names(receipt([1]))), Some(k(3)));
        assert_eq!(d.in_flight(), 1);
        assert_eq!(d.receipt(names(receipt([4]))), Some(k(4)));
        assert_eq!(d.in_flight(), 0);
    }

    #[test]
    fn an_overdue_receipt_sends_everything_unconfirmed_again_from_the_cursor() {
        let (mut d, t0) = sent(Confirm::Receipt, 5);
        d.receipt(names(receipt([1, 4])));
        d.puback(k(2), t0);
        d.puback(k(3), t0 + Duration::from_secs(1));
        assert_eq!(d.check_overdue(t0 + RECEIPT_TIMEOUT / 2), None);
        assert_eq!(
            d.check_overdue(t0 + RECEIPT_TIMEOUT),
            Some(Overdue {
                record: k(2),
                unconfirmed: 3
            })
        );
        assert_eq!(d.cursor(), k(1));
        assert_eq!(
            d.wants().first().copied(),
            Some(Want {
                after: k(1),
                limit: WINDOW,
                until: None
            })
        );
        // Record 4 had its receipt but sits behind 2: it goes again too.
        assert_eq!(
            seqs(&d.offer(&in_order(), &keys(2..=5), t0)),
            vec![2, 3, 4, 5]
        );
        assert_eq!(d.check_overdue(t0 + RECEIPT_TIMEOUT * 2), None);

        // Without receipts there is nothing to wait for.
        let (mut d, t0) = sent(Confirm::PubAck, 2);
        d.puback(k(2), t0);
        assert_eq!(d.check_overdue(t0 + RECEIPT_TIMEOUT * 2), None);
    }

    #[test]
    fn a_lost_connection_forgets_the_window_and_the_next_starts_from_the_cursor() {
        let (mut d, t0) = sent(Confirm::Receipt, 5);
        d.receipt(names(receipt([1, 2])));
        d.disconnected();
        assert_eq!(d.wants().first().copied(), None);
        assert!(d.offer(&in_order(), &keys(3..=5), t0).is_empty());
        assert_eq!(d.receipt(names(receipt([3]))), None, "nothing is in flight");
        assert_eq!(d.in_flight(), 0);
        d.connected(Some(k(5)));
        assert_eq!(
            d.wants().first().copied(),
            Some(Want {
                after: k(2),
                limit: WINDOW,
                until: None
            })
        );
        let again = d.offer(&in_order(), &keys(3..=5), t0);
        assert_eq!(seqs(&again), vec![3, 4, 5]);
        assert!(
            again.iter().all(|s| s.historical),
            "stored before it came up"
        );

        // A restarted process starts from the outbox's cursor the same way.
        let mut d = Delivery::new(Confirm::Receipt, Order::InOrder, WINDOW, k(2), 1000, t0);
        assert_eq!(d.wants().first().copied(), None);
        d.connected(Some(k(5)));
        assert_eq!(d.wants().first().copied().map(|w| w.after), Some(k(2)));
    }

    #[test]
    fn a_publish_not_queued_goes_again_with_what_followed_it() {
        let (mut d, t0) = sent(Confirm::Receipt, 5);
        d.unsent(k(3));
        assert_eq!(d.in_flight(), 2);
        assert_eq!(d.wants().first().copied().map(|w| w.after), Some(k(2)));
        assert_eq!(
            d.receipt(names(receipt([4]))),
            None,
            "4 is no longer in flight"
        );
        assert_eq!(seqs(&d.offer(&in_order(), &keys(3..=5), t0)), vec![3, 4, 5]);
        d.unsent(k(1));
        assert_eq!(
            d.wants().first().copied().map(|w| w.after),
            Some(Key::default())
        );
    }

    #[test]
    fn a_receipt_for_a_record_not_in_flight_confirms_nothing() {
        let (mut d, t0) = sent(Confirm::Receipt, 2);
        assert_eq!(d.receipt(names(receipt([3, 4]))), None);
        d.offer(&in_order(), &keys(3..=4), t0);
        assert_eq!(d.receipt(names(receipt([1, 2, 3, 4]))), Some(k(4)));
        // Nor does a PUBACK.
        let mut d = online(Confirm::PubAck, t0);
        assert_eq!(d.puback(k(1), t0), None);
        assert_eq!(d.cursor(), Key::default());
    }

    #[test]
    fn an_abandoned_record_does_not_hold_back_the_rest() {
        let (mut d, _) = sent(Confirm::Receipt, 3);
        assert_eq!(d.receipt(names(receipt([2, 3]))), None);
        assert_eq!(d.abandon(k(1)), Some(k(3)));
    }

    /// A live-first core (a ward's uplink), connected with records 1 to `stored` as backlog.
    fn live_first(stored: u64, rate: u32, t0: Instant) -> Delivery {
        let mut d = Delivery::new(
            Confirm::Receipt,
            Order::LiveFirst,
            100,
            Key::default(),
            rate,
            t0,
        );
        d.connected(Some(k(stored)));
        d
    }

    #[test]
    fn live_first_sends_live_records_at_once_and_the_backlog_paced_behind_them() {
        let t0 = Instant::now();
        let mut d = live_first(20, 10, t0);
        let wants = d.wants();
        assert_eq!(
            wants,
            vec![
                Want {
                    after: k(20),
                    limit: 100,
                    until: None
                },
                Want {
                    after: Key::default(),
                    limit: 100,
                    until: Some(k(20))
                }
            ],
            "the live lane is read first"
        );
        let live = d.offer(&wants[0], &keys(21..=25), t0);
        assert_eq!(seqs(&live), vec![21, 22, 23, 24, 25]);
        assert!(live.iter().all(|s| !s.historical));
        let backlog = d.offer(&wants[1], &keys(1..=20), t0);
        assert_eq!(
            seqs(&backlog),
            (1..=10).collect::<Vec<_>>(),
            "one second's worth"
        );
        assert!(backlog.iter().all(|s| s.historical));
        // More live records still go at once, whatever the backlog's pace.
        let wants = d.wants();
        assert_eq!(wants[0].after, k(25));
        assert_eq!(seqs(&d.offer(&wants[0], &keys(26..=26), t0)), vec![26]);
        assert_eq!(wants[1].after, k(10));
        assert_eq!(
            seqs(&d.offer(&wants[1], &keys(11..=20), t0 + Duration::from_secs(1))),
            (11..=20).collect::<Vec<_>>()
        );
        assert!(d.replaying(), "not yet read to its end");
    }

    #[test]
    fn live_first_moves_the_cursor_over_live_records_only_once_the_backlog_is_confirmed() {
        let t0 = Instant::now();
        let mut d = live_first(3, 1000, t0);
        let wants = d.wants();
        d.offer(&wants[0], &keys(4..=5), t0);
        d.offer(&wants[1], &keys(1..=3), t0);
        assert_eq!(
            d.receipt(names(receipt([4, 5]))),
            None,
            "the backlog is unconfirmed"
        );
        assert_eq!(d.receipt(names(receipt([1, 2, 3]))), Some(k(3)));
        assert_eq!(d.cursor(), k(3), "the backlog's end is not yet known");
        // A read of the backlog lane that finds nothing: the backlog is all out.
        let backlog = d.wants()[1];
        assert_eq!(backlog.until, Some(k(3)));
        assert!(d.offer(&backlog, &[], t0).is_empty());
        assert_eq!(d.cursor(), k(5));
        assert!(!d.replaying());
        assert_eq!(d.wants().len(), 1, "only the live lane is left");

        // An overdue receipt, or a lost connection, resends from the cursor in both lanes.
        let mut d = live_first(3, 1000, t0);
        let wants = d.wants();
        d.offer(&wants[0], &keys(4..=5), t0);
        d.offer(&wants[1], &keys(1..=3), t0);
        d.receipt(names(receipt([1])));
        d.puback(k(2), t0);
        assert!(d.check_overdue(t0 + RECEIPT_TIMEOUT).is_some());
        let wants = d.wants();
        assert_eq!((wants[0].after, wants[1].after), (k(3), k(1)));
        // A publish not queued goes again within its own lane only.
        d.offer(&wants[0], &keys(4..=5), t0);
        d.offer(&wants[1], &keys(2..=3), t0);
        d.unsent(k(5));
        let wants = d.wants();
        assert_eq!((wants[0].after, wants[1].after), (k(4), k(3)));
    }

    /// What happens to an agent, its link and HQ, in any order.
    #[derive(Debug, Clone)]
    enum Op {
        /// Staff or the heartbeat store this many records.
        Store(u8),
        Connect,
        /// The daemon reads what the core wants and publishes what it offers.
        Pump,
        /// The link's request queue is full for the next publish.
        RefuseNextPublish,
        /// The broker takes one publish in transit (by index) and sends its PUBACK.
        PubAck(usize),
        /// HQ's recorder commits what the broker took.
        Commit,
        /// HQ's recorder fails: what the broker took is lost, the connection stays up.
        RecorderFails,
        /// HQ sends a receipt naming some of what it stored (from, count).
        Receipt(usize, usize),
        /// The connection drops: what is in transit is lost.
        Disconnect,
        /// The broker is killed: what it took and did not commit is lost with the connection.
        BrokerKilled,
        /// The agent restarts: a new core from the cursor on disk.
        Restart,
        /// The daemon writes the cursor to disk.
        Save,
        Wait(u8),
        CheckOverdue,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (1u8..=5).prop_map(Op::Store),
            2 => Just(Op::Connect),
            4 => Just(Op::Pump),
            1 => Just(Op::RefuseNextPublish),
            4 => any::<usize>().prop_map(Op::PubAck),
            2 => Just(Op::Commit),
            1 => Just(Op::RecorderFails),
            3 => (any::<usize>(), 1usize..8).prop_map(|(a, n)| Op::Receipt(a, n)),
            1 => Just(Op::Disconnect),
            1 => Just(Op::BrokerKilled),
            1 => Just(Op::Restart),
            2 => Just(Op::Save),
            2 => (1u8..=40).prop_map(Op::Wait),
            2 => Just(Op::CheckOverdue),
        ]
    }

    /// The agent, its link and HQ, modelled just far enough to check the core.
    struct World {
        confirm: Confirm,
        order: Order,
        window: usize,
        now: Instant,
        core: Delivery,
        /// The outbox: every record stored (none is lost before it leaves past the cursor).
        stored: Vec<Key>,
        /// The cursor on disk: records up to it have left the outbox.
        disk_cursor: Key,
        online: bool,
        refuse_next: bool,
        /// Published on this connection, no PUBACK yet.
        transit: Vec<Key>,
        /// Taken by the broker, not yet committed by HQ's recorder.
        taken: BTreeSet<Key>,
        recorded: BTreeSet<Key>,
        /// What the core was told confirms a record: receipts, or PUBACKs with
        /// confirm = "puback".
        confirmations: BTreeSet<Key>,
        ever_sent: BTreeSet<Key>,
    }

    const REPLAY_RATE: u32 = 50;

    impl World {
        fn new(confirm: Confirm, order: Order, window: usize) -> World {
            let now = Instant::now();
            World {
                confirm,
                order,
                window,
                now,
                core: Delivery::new(confirm, order, window, Key::default(), REPLAY_RATE, now),
                stored: Vec::new(),
                disk_cursor: Key::default(),
                online: false,
                refuse_next: false,
                transit: Vec::new(),
                taken: BTreeSet::new(),
                recorded: BTreeSet::new(),
                confirmations: BTreeSet::new(),
                ever_sent: BTreeSet::new(),
            }
        }

        fn lost(&mut self) {
            self.online = false;
            self.transit.clear();
            self.core.disconnected();
        }

        fn puback(&mut self, key: Key) {
            self.taken.insert(key);
            if self.confirm == Confirm::PubAck {
                self.confirmations.insert(key);
            }
            self.core.puback(key, self.now);
        }

        fn receipt(&mut self, named: Vec<Key>) {
            if !self.online || self.confirm == Confirm::PubAck {
                return;
            }
            for r in Receipt::of_keys(named.iter().map(|k| (k.boot, k.seq))) {
                self.confirmations.extend(named.iter().copied());
                self.core.receipt(names(r));
            }
        }

        fn apply(&mut self, op: Op) {
            match op {
                Op::Store(n) => {
                    for _ in 0..n {
                        let seq = self.stored.last().map_or(1, |k| k.seq + 1);
                        self.stored.push(k(seq));
                    }
                }
                Op::Connect => {
                    if !self.online {
                        self.online = true;
                        self.core.connected(self.stored.last().copied());
                    }
                }
                Op::Pump => {
                    for want in self.core.wants() {
                        let read: Vec<Key> = self
                            .stored
                            .iter()
                            .filter(|k| **k > want.after && **k > self.disk_cursor)
                            .filter(|k| want.until.is_none_or(|until| **k <= until))
                            .take(want.limit)
                            .copied()
                            .collect();
                        for send in self.core.offer(&want, &read, self.now) {
                            if std::mem::take(&mut self.refuse_next) {
                                self.core.unsent(send.key);
                                break;
                            }
                            self.transit.push(send.key);
                            self.ever_sent.insert(send.key);
                        }
                    }
                }
                Op::RefuseNextPublish => self.refuse_next = true,
                Op::PubAck(i) => {
                    if !self.transit.is_empty() {
                        let key = self.transit.remove(i % self.transit.len());
                        self.puback(key);
                    }
                }
                Op::Commit => self.recorded.append(&mut self.taken),
                Op::RecorderFails => self.taken.clear(),
                Op::Receipt(from, count) => {
                    let named: Vec<Key> = self
                        .recorded
                        .iter()
                        .skip(from % self.recorded.len().max(1))
                        .take(count)
                        .copied()
                        .collect();
                    self.receipt(named);
                }
                Op::Disconnect => {
                    self.lost();
                    self.save();
                }
                Op::BrokerKilled => {
                    self.taken.clear();
                    self.lost();
                }
                Op::Restart => {
                    self.lost();
                    self.core = Delivery::new(
                        self.confirm,
                        self.order,
                        self.window,
                        self.disk_cursor,
                        REPLAY_RATE,
                        self.now,
                    );
                }
                Op::Save => self.save(),
                Op::Wait(s) => self.now += Duration::from_secs(u64::from(s)),
                Op::CheckOverdue => {
                    self.core.check_overdue(self.now);
                }
            }
        }

        fn save(&mut self) {
            assert!(
                self.core.cursor() >= self.disk_cursor,
                "the cursor went back"
            );
            self.disk_cursor = self.core.cursor();
        }

        /// No record leaves the outbox, nor is counted as delivered, before its confirmation.
        fn check(&self) {
            for key in &self.stored {
                if *key <= self.core.cursor() || *key <= self.disk_cursor {
                    assert!(
                        self.confirmations.contains(key),
                        "{key} passed by the cursor without a confirmation"
                    );
                }
            }
            assert!(self.core.unconfirmed() <= self.window);
            if self.confirm == Confirm::Receipt {
                assert!(self.confirmations.is_subset(&self.recorded));
            }
        }

        /// A link that stays up and a broker that answers everything: all goes through.
        fn drain(&mut self) {
            for _ in 0..10_000 {
                if self
                    .stored
                    .last()
                    .is_none_or(|last| self.core.cursor() >= *last)
                {
                    break;
                }
                self.apply(Op::Connect);
                self.apply(Op::Pump);
                for key in std::mem::take(&mut self.transit) {
                    self.puback(key);
                }
                self.apply(Op::Commit);
                let all: Vec<Key> = self.recorded.iter().copied().collect();
                self.receipt(all);
                self.apply(Op::Wait(1));
                self.apply(Op::CheckOverdue);
                self.apply(Op::Save);
                self.check();
            }
            self.save();
        }
    }

    proptest! {
        #[test]
        fn nothing_leaves_unconfirmed_and_everything_is_sent(
            by_puback in any::<bool>(),
            live_first in any::<bool>(),
            window in prop_oneof![Just(WINDOW), 1usize..8],
            ops in proptest::collection::vec(op(), 0..120),
        ) {
            let confirm = if by_puback { Confirm::PubAck } else { Confirm::Receipt };
            let order = if live_first { Order::LiveFirst } else { Order::InOrder };
            let mut world = World::new(confirm, order, window);
            for op in ops {
                world.apply(op);
                world.check();
            }
            world.drain();
            let last = world.stored.last().copied().unwrap_or_default();
            prop_assert_eq!(world.core.cursor(), last);
            prop_assert_eq!(world.disk_cursor, last);
            for key in &world.stored {
                prop_assert!(world.ever_sent.contains(key), "{} never sent", key);
                if confirm == Confirm::Receipt {
                    prop_assert!(world.recorded.contains(key), "{} not recorded at HQ", key);
                }
            }
        }
    }
}
