//! Who is speaking and in which order: the boot id, the sequence numbers, birth and death.
//!
//! HQ keeps, for every piece of a site's state, the message with the highest `(boot, seq)`
//! (see `renkei_shared::reducer`). So:
//!
//! - the **boot id** is a counter kept on disk and raised at every start ([`crate::keys::next_boot_id`]),
//!   so that a restarted agent outranks everything it said before, even with a reset clock;
//! - the **seq** grows with every message within a boot ([`Lifecycle::stamp`]);
//! - before every connection attempt, [`Lifecycle::arm`] numbers that connection's birth `n`
//!   and its last will (death) `n + 1`, and continues at `n + 2`. The will then outranks the
//!   birth of its own connection (a drop shows as death) and is outranked by everything sent
//!   after it and by the next connection's birth (a reconnect shows as alive again).

use std::sync::Arc;

use renkei_link::driver::Speaker;
use tracing::error;

use crate::keys::Key;
use crate::outbox::Outbox;

use renkei_shared::{Body, Envelope, Header, Life, Mode, Origin, SiteRef, Timestamp};

/// The numbers of one boot of one site: stamps every message it sends.
#[derive(Debug, Clone)]
pub struct Lifecycle {
    site: SiteRef,
    boot: u32,
    mode: Mode,
    /// The seq of the next message.
    next_seq: u64,
    /// `run`: numbers come from the outbox, which `renkei-agent report` shares, so that the
    /// daemon's messages and the staff's reports never share a `(boot, seq)`.
    shared: Option<Arc<Outbox>>,
}

/// A connection's birth and last will, numbered together by [`Lifecycle::arm`].
pub use renkei_link::driver::Armed;

impl Speaker for Lifecycle {
    fn arm(&mut self, now: Timestamp) -> Option<Armed> {
        Some(Lifecycle::arm(self, crate::AGENT_VERSION, now))
    }

    fn death(&mut self, now: Timestamp) -> Option<Envelope> {
        Some(Lifecycle::death(self, now))
    }
}

impl Lifecycle {
    pub fn new(site: SiteRef, boot: u32, mode: Mode) -> Lifecycle {
        Lifecycle {
            site,
            boot,
            mode,
            next_seq: 1,
            shared: None,
        }
    }

    /// A lifecycle numbered by `outbox` (see [`Outbox`]); `boot` is the one it just started.
    pub fn shared(site: SiteRef, boot: u32, mode: Mode, outbox: Arc<Outbox>) -> Lifecycle {
        Lifecycle {
            shared: Some(outbox),
            ..Lifecycle::new(site, boot, mode)
        }
    }

    /// Makes `body` a message with a key the outbox handed out.
    pub fn envelope(&self, key: Key, body: Body, now: Timestamp) -> Envelope {
        let mut header = self.header(key.seq, now);
        header.boot = key.boot;
        Envelope { header, body }
    }

    pub fn site(&self) -> &SiteRef {
        &self.site
    }

    pub fn boot(&self) -> u32 {
        self.boot
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    fn header(&self, seq: u64, now: Timestamp) -> Header {
        Header {
            origin: Origin::Site(self.site.clone()),
            boot: self.boot,
            seq,
            sent_at: now,
            mode: self.mode,
            historical: false,
        }
    }

    /// Takes `count` consecutive numbers; returns the first.
    fn take_seqs(&mut self, count: u64) -> u64 {
        if let Some(outbox) = &self.shared {
            match outbox.lock().and_then(|mut l| l.take_seqs(count)) {
                Ok(key) => {
                    // A `report` run with no daemon may have started a newer boot meanwhile.
                    self.boot = key.boot;
                    self.next_seq = key.seq + count;
                    return key.seq;
                }
                // Numbering in memory keeps the site talking; the disk is failing anyway.
                Err(e) => {
                    error!(error = %e, "sequence numbers from the outbox failed; numbering in memory")
                }
            }
        }
        let seq = self.next_seq;
        self.next_seq += count;
        seq
    }

    /// Makes `body` a message with the next sequence number.
    pub fn stamp(&mut self, body: Body, now: Timestamp) -> Envelope {
        let seq = self.take_seqs(1);
        Envelope {
            header: self.header(seq, now),
            body,
        }
    }

    /// Numbers the birth and the will of the next connection attempt: will = birth + 1, and
    /// every later message after both.
    pub fn arm(&mut self, agent_version: &str, now: Timestamp) -> Armed {
        let seq = self.take_seqs(2);
        let birth = Envelope {
            header: self.header(seq, now),
            body: Body::Life(Life::Birth {
                agent_version: agent_version.to_owned(),
            }),
        };
        let will = Envelope {
            header: self.header(seq + 1, now),
            body: Body::Life(Life::Death),
        };
        Armed { birth, will }
    }

    /// The death a graceful exit sends itself; numbered after the will, so it stands.
    pub fn death(&mut self, now: Timestamp) -> Envelope {
        self.stamp(Body::Life(Life::Death), now)
    }
}

#[cfg(test)]
mod tests {
    use renkei_shared::{State, sample};

    use super::*;

    fn lifecycle(boot: u32) -> Lifecycle {
        Lifecycle::new(sample::site(), boot, Mode::Actual)
    }

    fn status() -> Body {
        sample::status().body
    }

    #[test]
    fn the_will_comes_right_after_its_birth_and_before_everything_else() {
        let mut life = lifecycle(7);
        let first = life.stamp(status(), Timestamp(1));
        let armed = life.arm("0.1.0", Timestamp(2));
        let after = life.stamp(status(), Timestamp(3));
        assert_eq!(first.header.seq, 1);
        assert_eq!(armed.birth.header.seq, 2);
        assert_eq!(armed.will.header.seq, armed.birth.header.seq + 1);
        assert!(after.header.seq > armed.will.header.seq);
        assert!(matches!(armed.will.body, Body::Life(Life::Death)));
        assert!(matches!(armed.birth.body, Body::Life(Life::Birth { .. })));
        for env in [&first, &armed.birth, &armed.will, &after] {
            assert_eq!(env.header.boot, 7);
            assert_eq!(env.header.origin, Origin::Site(sample::site()));
        }
        let rearmed = life.arm("0.1.0", Timestamp(4));
        assert!(rearmed.birth.header.seq > armed.will.header.seq);
        let death = life.death(Timestamp(5));
        assert!(death.header.seq > rearmed.will.header.seq);
    }

    /// The ordering above, as HQ's reducer sees it.
    #[test]
    fn hq_sees_death_when_the_will_fires_and_life_after_a_reconnect() {
        let mut life = lifecycle(1);
        let mut hq = State::new();
        let site = sample::site();
        let is_dead = |hq: &State| hq.world(Mode::Actual).sites[&site].is_dead();

        let conn1 = life.arm("0.1.0", Timestamp(10));
        hq.apply(&conn1.birth);
        hq.apply(&life.stamp(status(), Timestamp(11)));
        assert!(!is_dead(&hq));
        hq.apply(&conn1.will); // the connection drops
        assert!(is_dead(&hq));

        let conn2 = life.arm("0.1.0", Timestamp(20));
        // A late will of the first connection, redelivered, changes nothing.
        hq.apply(&conn2.birth);
        hq.apply(&conn1.will);
        assert!(!is_dead(&hq));
        // A rebirth re-sends the same birth: the armed will still outranks it.
        hq.apply(&conn2.birth);
        hq.apply(&conn2.will);
        assert!(is_dead(&hq));

        // A restart outranks the previous boot whatever its seq.
        let mut next_boot = lifecycle(2);
        let conn3 = next_boot.arm("0.1.0", Timestamp(5));
        hq.apply(&conn3.birth);
        assert!(!is_dead(&hq));
    }
}
