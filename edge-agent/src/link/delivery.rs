//! The delivery core: which outbox records go out, and when one may leave the outbox.
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
//! No I/O: its user (the daemon) tells it what happened (a connection up or lost, a PUBACK, a
//! receipt, the time) and does what it answers: read the records it [`Delivery::want`]s from
//! the outbox, publish the ones [`Delivery::offer`] returns, and move the outbox's cursor to
//! each new [`Delivery::cursor`] it returns (records up to it may leave the outbox). The
//! outbox stays the one store of records; this keeps only keys. A restarted process starts a
//! new core from the outbox's cursor.
//!
//! The rules, each tested below:
//! 1. **In order, within a window**: records go out in key order after the last one sent,
//!    at most [`WINDOW`] unconfirmed at once.
//! 2. **Backlog is historical and paced**: records stored before the connection came up go
//!    out marked historical, at most `replay_rate` a second (bursts of one second's worth);
//!    live records wait behind them, so the order holds.
//! 3. **What confirms**: with `confirm = "receipt"` only HQ's receipt naming a record in
//!    flight confirms it (a PUBACK says only that the broker took it, not that HQ stored it);
//!    with `confirm = "puback"` its PUBACK does.
//! 4. **The cursor moves over the confirmed prefix only**: a record confirmed behind an
//!    unconfirmed one waits for it, so nothing unconfirmed ever leaves the outbox.
//! 5. **Overdue receipts resend**: a record with a PUBACK and no receipt for
//!    [`RECEIPT_TIMEOUT`] means HQ did not store what its broker took; everything unconfirmed
//!    is sent again from the cursor (HQ keeps one copy of each `(boot, seq)`).
//! 6. **A lost connection forgets the window**: rumqttc's own queue is dropped with it, so the
//!    next connection sends everything unconfirmed again from the cursor.
//! 7. **A publish not queued is offered again**, with everything sent after it.
//! 8. **A receipt for a record not in flight confirms nothing**: the window knows only what
//!    this connection sent; the record goes again and the next receipt confirms it.
//! 9. **A record that can never be sent is abandoned** (it no longer decodes after an
//!    upgrade): counted as confirmed, so that it does not hold back the rest.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use renkei_shared::Receipt;

use crate::config::Confirm;
use crate::keys::Key;

/// Outbox records handed to the link and not yet confirmed, at most. A receipt comes up to one
/// recorder batch (200 ms by default) after the PUBACK, so this allows a few hundred records a
/// second per site.
pub const WINDOW: usize = 64;
/// A record with a PUBACK and no receipt this long after it is sent again.
pub const RECEIPT_TIMEOUT: Duration = Duration::from_secs(30);

/// A read the core asks of the outbox: up to `limit` records with keys after `after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want {
    pub after: Key,
    pub limit: usize,
}

/// A record to publish now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Send {
    pub key: Key,
    /// Stored before this connection came up: HQ must not take it for the site's news.
    pub historical: bool,
}

/// Receipts were overdue: the window was emptied and everything unconfirmed goes again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overdue {
    /// The oldest record whose receipt was overdue.
    pub record: Key,
    /// Records in flight and unconfirmed when the window was emptied.
    pub unconfirmed: usize,
}

/// Which outbox records are out, and what may leave the outbox.
#[derive(Debug)]
pub struct Delivery {
    confirm: Confirm,
    rate: Rate,
    /// Every record up to here is confirmed.
    cursor: Key,
    phase: Phase,
}

#[derive(Debug)]
enum Phase {
    /// No connection: nothing goes out.
    Offline,
    Online(Window),
}

/// What the current connection has out.
#[derive(Debug, Default)]
struct Window {
    /// Records handed to the link, in order, until the cursor passes them.
    in_flight: VecDeque<Key>,
    /// Of those, the confirmed ones.
    confirmed: BTreeSet<Key>,
    /// Of those, the ones with a PUBACK and no receipt yet, with when the PUBACK came.
    pubacked: BTreeMap<Key, Instant>,
    /// The last record handed to the link.
    last_sent: Key,
    /// Records up to here were stored before this connection: backlog.
    backlog_until: Key,
}

impl Delivery {
    /// A core for a process whose outbox cursor is `cursor`, offline.
    pub fn new(confirm: Confirm, cursor: Key, replay_rate: u32, now: Instant) -> Delivery {
        Delivery {
            confirm,
            rate: Rate::new(replay_rate, now),
            cursor,
            phase: Phase::Offline,
        }
    }

    /// Every record up to here is confirmed and may leave the outbox.
    pub fn cursor(&self) -> Key {
        self.cursor
    }

    /// Records out and not yet passed by the cursor.
    pub fn in_flight(&self) -> usize {
        match &self.phase {
            Phase::Offline => 0,
            Phase::Online(w) => w.in_flight.len(),
        }
    }

    /// A connection came up; `last_stored` is the newest record in the outbox now (what is
    /// stored up to it is backlog). Sending starts again after the cursor.
    pub fn connected(&mut self, last_stored: Option<Key>) {
        self.phase = Phase::Online(Window {
            last_sent: self.cursor,
            backlog_until: last_stored.unwrap_or_default(),
            ..Window::default()
        });
    }

    /// The connection is gone, and with it everything it had out.
    pub fn disconnected(&mut self) {
        self.phase = Phase::Offline;
    }

    /// The records to read next, if there is room to send any.
    pub fn want(&self) -> Option<Want> {
        let Phase::Online(w) = &self.phase else {
            return None;
        };
        let limit = WINDOW.saturating_sub(w.in_flight.len());
        (limit > 0).then_some(Want {
            after: w.last_sent,
            limit,
        })
    }

    /// Takes the keys of the records read for [`Delivery::want`], in order, and returns those
    /// to publish now, in that order: the ones after the last sent, up to where the window or
    /// the replay rate cuts them off.
    pub fn offer(&mut self, keys: &[Key], now: Instant) -> Vec<Send> {
        let Phase::Online(w) = &mut self.phase else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for &key in keys {
            if w.in_flight.len() >= WINDOW {
                break;
            }
            if key <= w.last_sent {
                continue;
            }
            let historical = key <= w.backlog_until;
            if historical && !self.rate.try_take(now) {
                break;
            }
            w.in_flight.push_back(key);
            w.last_sent = key;
            out.push(Send { key, historical });
        }
        out
    }

    /// The link did not take the publish of `key`: it and everything sent after it go again.
    pub fn unsent(&mut self, key: Key) {
        let Phase::Online(w) = &mut self.phase else {
            return;
        };
        let Some(at) = w.in_flight.iter().position(|k| *k == key) else {
            return;
        };
        for k in w.in_flight.drain(at..) {
            w.confirmed.remove(&k);
            w.pubacked.remove(&k);
        }
        w.last_sent = w.in_flight.back().copied().unwrap_or(self.cursor);
    }

    /// `key`, offered, can never be sent: counted as confirmed. Returns the new cursor if it
    /// moved.
    pub fn abandon(&mut self, key: Key) -> Option<Key> {
        self.confirm(key)
    }

    /// The broker's PUBACK for `key`. Returns the new cursor if it moved.
    pub fn puback(&mut self, key: Key, now: Instant) -> Option<Key> {
        match self.confirm {
            Confirm::PubAck => self.confirm(key),
            Confirm::Receipt => {
                if let Phase::Online(w) = &mut self.phase
                    && w.in_flight.contains(&key)
                    && !w.confirmed.contains(&key)
                {
                    w.pubacked.insert(key, now);
                }
                None
            }
        }
    }

    /// HQ's receipt: confirms the records in flight that it names. Returns the new cursor if
    /// it moved.
    pub fn receipt(&mut self, receipt: &Receipt) -> Option<Key> {
        let Phase::Online(w) = &self.phase else {
            return None;
        };
        let named: Vec<Key> = w
            .in_flight
            .iter()
            .filter(|k| receipt.covers(k.boot, k.seq))
            .copied()
            .collect();
        named
            .into_iter()
            .fold(None, |moved, key| self.confirm(key).or(moved))
    }

    /// On the clock: if a receipt is overdue, empties the window so that everything
    /// unconfirmed goes again from the cursor.
    pub fn check_overdue(&mut self, now: Instant) -> Option<Overdue> {
        let Phase::Online(w) = &mut self.phase else {
            return None;
        };
        let record = w
            .pubacked
            .iter()
            .filter(|(_, at)| now.duration_since(**at) >= RECEIPT_TIMEOUT)
            .map(|(key, _)| *key)
            .next()?;
        let unconfirmed = w.in_flight.len().saturating_sub(w.confirmed.len());
        *w = Window {
            last_sent: self.cursor,
            backlog_until: w.backlog_until,
            ..Window::default()
        };
        Some(Overdue {
            record,
            unconfirmed,
        })
    }

    /// Marks `key`, in flight, as confirmed and moves the cursor over the confirmed prefix.
    fn confirm(&mut self, key: Key) -> Option<Key> {
        let Phase::Online(w) = &mut self.phase else {
            return None;
        };
        if !w.in_flight.contains(&key) {
            return None;
        }
        w.pubacked.remove(&key);
        w.confirmed.insert(key);
        let before = self.cursor;
        while let Some(front) = w.in_flight.front().copied() {
            if !w.confirmed.remove(&front) {
                break;
            }
            w.in_flight.pop_front();
            self.cursor = self.cursor.max(front);
        }
        (self.cursor != before).then_some(self.cursor)
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

    use super::*;

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
        let mut d = Delivery::new(confirm, Key::default(), 1000, t0);
        d.connected(None);
        d
    }

    /// Online, with records 1 to `n` sent.
    fn sent(confirm: Confirm, n: u64) -> (Delivery, Instant) {
        let t0 = Instant::now();
        let mut d = online(confirm, t0);
        assert_eq!(d.offer(&keys(1..=n), t0).len() as u64, n);
        (d, t0)
    }

    #[test]
    fn records_go_in_order_after_the_last_sent_within_the_window() {
        let t0 = Instant::now();
        let mut d = online(Confirm::PubAck, t0);
        assert_eq!(
            d.want(),
            Some(Want {
                after: Key::default(),
                limit: WINDOW
            })
        );
        let sent = d.offer(&keys(1..=100), t0);
        assert_eq!(seqs(&sent), (1..=64).collect::<Vec<_>>());
        assert!(sent.iter().all(|s| !s.historical));
        assert_eq!(d.want(), None, "the window is full");
        assert!(d.offer(&keys(65..=70), t0).is_empty());
        assert_eq!(d.puback(k(1), t0), Some(k(1)));
        assert_eq!(
            d.want(),
            Some(Want {
                after: k(64),
                limit: 1
            })
        );
        // Keys already sent are not sent twice.
        assert_eq!(seqs(&d.offer(&keys(60..=70), t0)), vec![65]);
    }

    #[test]
    fn backlog_is_historical_and_paced_and_live_records_wait_behind_it() {
        let t0 = Instant::now();
        let mut d = Delivery::new(Confirm::PubAck, Key::default(), 10, t0);
        d.connected(Some(k(20)));
        // One second's worth at once.
        let first = d.offer(&keys(1..=30), t0);
        assert_eq!(seqs(&first), (1..=10).collect::<Vec<_>>());
        assert!(first.iter().all(|s| s.historical));
        // The rest of the backlog holds back the live records behind it.
        assert!(d.offer(&keys(11..=30), t0).is_empty());
        let half = d.offer(&keys(11..=30), t0 + Duration::from_millis(500));
        assert_eq!(seqs(&half), (11..=15).collect::<Vec<_>>());
        let rest = d.offer(&keys(16..=30), t0 + Duration::from_secs(5));
        assert_eq!(seqs(&rest), (16..=30).collect::<Vec<_>>());
        assert!(rest.iter().take(5).all(|s| s.historical));
        assert!(rest.iter().skip(5).all(|s| !s.historical));

        // Live records are never paced.
        let mut d = Delivery::new(Confirm::PubAck, Key::default(), 1, t0);
        d.connected(None);
        assert_eq!(d.offer(&keys(1..=50), t0).len(), 50);
    }

    #[test]
    fn with_receipts_a_puback_alone_confirms_nothing() {
        let (mut d, t0) = sent(Confirm::Receipt, 3);
        assert_eq!(d.puback(k(1), t0), None);
        assert_eq!(d.cursor(), Key::default());
        assert_eq!(d.receipt(&receipt([1])), Some(k(1)));

        // With confirm = "puback", the PUBACK is the confirmation.
        let (mut d, t0) = sent(Confirm::PubAck, 3);
        assert_eq!(d.puback(k(1), t0), Some(k(1)));
    }

    #[test]
    fn the_cursor_moves_over_the_confirmed_prefix_only() {
        let (mut d, _) = sent(Confirm::Receipt, 4);
        assert_eq!(d.receipt(&receipt([2, 3])), None);
        assert_eq!(d.cursor(), Key::default());
        assert_eq!(d.in_flight(), 4);
        assert_eq!(d.receipt(&receipt([1])), Some(k(3)));
        assert_eq!(d.in_flight(), 1);
        assert_eq!(d.receipt(&receipt([4])), Some(k(4)));
        assert_eq!(d.in_flight(), 0);
    }

    #[test]
    fn an_overdue_receipt_sends_everything_unconfirmed_again_from_the_cursor() {
        let (mut d, t0) = sent(Confirm::Receipt, 5);
        d.receipt(&receipt([1, 4]));
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
            d.want(),
            Some(Want {
                after: k(1),
                limit: WINDOW
            })
        );
        // Record 4 had its receipt but sits behind 2: it goes again too.
        assert_eq!(seqs(&d.offer(&keys(2..=5), t0)), vec![2, 3, 4, 5]);
        assert_eq!(d.check_overdue(t0 + RECEIPT_TIMEOUT * 2), None);

        // Without receipts there is nothing to wait for.
        let (mut d, t0) = sent(Confirm::PubAck, 2);
        d.puback(k(2), t0);
        assert_eq!(d.check_overdue(t0 + RECEIPT_TIMEOUT * 2), None);
    }

    #[test]
    fn a_lost_connection_forgets_the_window_and_the_next_starts_from_the_cursor() {
        let (mut d, t0) = sent(Confirm::Receipt, 5);
        d.receipt(&receipt([1, 2]));
        d.disconnected();
        assert_eq!(d.want(), None);
        assert!(d.offer(&keys(3..=5), t0).is_empty());
        assert_eq!(d.receipt(&receipt([3])), None, "nothing is in flight");
        assert_eq!(d.in_flight(), 0);
        d.connected(Some(k(5)));
        assert_eq!(
            d.want(),
            Some(Want {
                after: k(2),
                limit: WINDOW
            })
        );
        let again = d.offer(&keys(3..=5), t0);
        assert_eq!(seqs(&again), vec![3, 4, 5]);
        assert!(
            again.iter().all(|s| s.historical),
            "stored before it came up"
        );

        // A restarted process starts from the outbox's cursor the same way.
        let mut d = Delivery::new(Confirm::Receipt, k(2), 1000, t0);
        assert_eq!(d.want(), None);
        d.connected(Some(k(5)));
        assert_eq!(d.want().map(|w| w.after), Some(k(2)));
    }

    #[test]
    fn a_publish_not_queued_goes_again_with_what_followed_it() {
        let (mut d, t0) = sent(Confirm::Receipt, 5);
        d.unsent(k(3));
        assert_eq!(d.in_flight(), 2);
        assert_eq!(d.want().map(|w| w.after), Some(k(2)));
        assert_eq!(d.receipt(&receipt([4])), None, "4 is no longer in flight");
        assert_eq!(seqs(&d.offer(&keys(3..=5), t0)), vec![3, 4, 5]);
        d.unsent(k(1));
        assert_eq!(d.want().map(|w| w.after), Some(Key::default()));
    }

    #[test]
    fn a_receipt_for_a_record_not_in_flight_confirms_nothing() {
        let (mut d, t0) = sent(Confirm::Receipt, 2);
        assert_eq!(d.receipt(&receipt([3, 4])), None);
        d.offer(&keys(3..=4), t0);
        assert_eq!(d.receipt(&receipt([1, 2, 3, 4])), Some(k(4)));
        // Nor does a PUBACK.
        let mut d = online(Confirm::PubAck, t0);
        assert_eq!(d.puback(k(1), t0), None);
        assert_eq!(d.cursor(), Key::default());
    }

    #[test]
    fn an_abandoned_record_does_not_hold_back_the_rest() {
        let (mut d, _) = sent(Confirm::Receipt, 3);
        assert_eq!(d.receipt(&receipt([2, 3])), None);
        assert_eq!(d.abandon(k(1)), Some(k(3)));
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
        fn new(confirm: Confirm) -> World {
            let now = Instant::now();
            World {
                confirm,
                now,
                core: Delivery::new(confirm, Key::default(), REPLAY_RATE, now),
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
                self.core.receipt(&r);
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
                    let Some(want) = self.core.want() else {
                        return;
                    };
                    let read: Vec<Key> = self
                        .stored
                        .iter()
                        .filter(|k| **k > want.after && **k > self.disk_cursor)
                        .take(want.limit)
                        .copied()
                        .collect();
                    for send in self.core.offer(&read, self.now) {
                        if std::mem::take(&mut self.refuse_next) {
                            self.core.unsent(send.key);
                            break;
                        }
                        self.transit.push(send.key);
                        self.ever_sent.insert(send.key);
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
                    self.core =
                        Delivery::new(self.confirm, self.disk_cursor, REPLAY_RATE, self.now);
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
            assert!(self.core.in_flight() <= WINDOW);
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
            ops in proptest::collection::vec(op(), 0..120),
        ) {
            let confirm = if by_puback { Confirm::PubAck } else { Confirm::Receipt };
            let mut world = World::new(confirm);
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
