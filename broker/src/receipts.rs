//! Receipts after each commit: which sites anyone listens to ([`Interest`]), and the thread
//! that publishes them at a steady pace ([`Sender`]).
//!
//! **Pacing.** A committed batch names hundreds of sites at once; publishing a receipt to each
//! at the moment of the commit puts a burst of hundreds of publishes, each to a different
//! connection, in front of the live traffic every 200 ms, and the latency of every other
//! message rises with it (BENCHMARKS.md, section 1, on receipts). So the recorder only hands
//! the committed `(boot, seq)` to the [`Sender`], which keeps them per site, merged, and
//! publishes at most `recorder.receipt_rate` receipts a second, oldest site first, each naming
//! everything that site has waiting. At 2,000 sites reporting every second and 500 receipts a
//! second, a site gets one receipt every four seconds naming four messages: a quarter of the
//! publishes, spread evenly, and far inside the agent's 30 s receipt timeout.
//!
//! **Interest.**
//! A receipt goes to one site's agent. Clients that keep no outbox (the simulator, load tools,
//! other systems' gateways) never subscribe to theirs, and at 2,000 messages a second a
//! receipt to nobody is one more publish through the router for each message. The guard of
//! each connection registers the receipt filters it allows ([`Interest::add`]) and removes
//! them when the connection ends; the recorder asks [`Interest::wanted`]. A filter with
//! wildcards over the receipt tree (an HQ operator watching, say) wants every site's. In
//! external-broker mode the subscriptions are the cluster's business and unknown here:
//! [`Interest::everyone`] wants them all.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use renkei_shared::receipt::{RECEIPT_ROOT, parse_receipt_topic};
use renkei_shared::{Receipt, SiteRef, WardCode, receipt_topic};

use crate::metrics::Metrics;
use crate::publisher::Publisher;

/// Keys one site may have waiting; past this the oldest are dropped (the agent sends those
/// again after its receipt timeout, and the recorder keeps one copy).
const MAX_WAITING_PER_SITE: usize = 100_000;
/// Committed batches waiting for the sender thread; past this a batch's receipts are dropped
/// (counted) rather than holding up the recorder.
const QUEUE: usize = 1_000;

/// `(boot, seq)` of a site's messages now stored.
pub type Committed = Vec<(SiteRef, Vec<(u32, u64)>)>;

/// The handle the recorder hands committed keys to.
#[derive(Debug, Clone)]
pub struct SenderTx {
    tx: SyncSender<Committed>,
    metrics: Arc<Metrics>,
}

impl SenderTx {
    /// Queues the receipts of a committed batch; never waits.
    pub fn committed(&self, committed: Committed) {
        match self.tx.try_send(committed) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.metrics.receipt_failed();
            }
        }
    }
}

/// The thread that publishes receipts at a steady pace; it ends, after sending what is
/// waiting, once every [`SenderTx`] is gone.
#[derive(Debug)]
pub struct Sender {
    _thread: JoinHandle<()>,
}

impl Sender {
    /// Starts the thread; `rate` receipts a second at most, in bursts of at most a tenth of a
    /// second's worth.
    pub fn start(
        publisher: Publisher,
        interest: Arc<Interest>,
        rate: u32,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<(Sender, SenderTx)> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let pacer = Pacer {
            publisher,
            interest,
            rate: f64::from(rate.max(1)),
            metrics: metrics.clone(),
            waiting: HashMap::new(),
            order: VecDeque::new(),
        };
        let thread = std::thread::Builder::new()
            .name("renkei-receipts".into())
            .spawn(move || pacer.run(rx))?;
        Ok((Sender { _thread: thread }, SenderTx { tx, metrics }))
    }
}

struct Pacer {
    publisher: Publisher,
    interest: Arc<Interest>,
    rate: f64,
    metrics: Arc<Metrics>,
    /// Keys waiting per site, and the sites in the order they started waiting.
    waiting: HashMap<SiteRef, Vec<(u32, u64)>>,
    order: VecDeque<SiteRef>,
}

impl Pacer {
    fn run(mut self, rx: Receiver<Committed>) {
        let burst = (self.rate / 10.0).max(1.0);
        let mut tokens = burst;
        let mut at = Instant::now();
        loop {
            // Wait for work, or for the next token when there is work.
            let wait = if self.order.is_empty() {
                Duration::from_secs(3600)
            } else {
                Duration::from_secs_f64(((1.0 - tokens).max(0.0)) / self.rate)
            };
            match rx.recv_timeout(wait) {
                Ok(committed) => self.add(committed),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // Shutting down: what is waiting goes out at once.
                    while let Some(site) = self.order.pop_front() {
                        self.send(&site);
                    }
                    return;
                }
            }
            while let Ok(committed) = rx.try_recv() {
                self.add(committed);
            }
            let now = Instant::now();
            tokens = (tokens + now.duration_since(at).as_secs_f64() * self.rate).min(burst);
            at = now;
            while tokens >= 1.0 {
                let Some(site) = self.order.pop_front() else {
                    break;
                };
                tokens -= 1.0;
                self.send(&site);
            }
        }
    }

    fn add(&mut self, committed: Committed) {
        for (site, keys) in committed {
            if !self.interest.wanted(&site) {
                continue;
            }
            let waiting = match self.waiting.get_mut(&site) {
                Some(w) => w,
                None => {
                    self.order.push_back(site.clone());
                    self.waiting.entry(site).or_default()
                }
            };
            waiting.extend(keys);
            if waiting.len() > MAX_WAITING_PER_SITE {
                let excess = waiting.len() - MAX_WAITING_PER_SITE;
                waiting.drain(..excess);
            }
        }
    }

    fn send(&mut self, site: &SiteRef) {
        let Some(keys) = self.waiting.remove(site) else {
            return;
        };
        let topic = receipt_topic(site);
        for receipt in Receipt::of_keys(keys) {
            let sent = receipt
                .encode()
                .map_err(|e| e.to_string())
                .and_then(|payload| {
                    self.publisher
                        .publish(topic.clone(), payload, false)
                        .map_err(|e| e.to_string())
                });
            match sent {
                Ok(()) => self.metrics.receipt_published(receipt.count()),
                Err(e) => {
                    self.metrics.receipt_failed();
                    tracing::warn!(%topic, error = %e, "receipt not published; the site will send again");
                }
            }
        }
    }
}

/// What one subscription filter reaches of the receipt tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wants {
    /// Possibly any site's receipts.
    All,
    Site(SiteRef),
    /// Every site of one ward: a ward broker's relay (`renkei/receipt/v1/{ward}/+`).
    Ward(WardCode),
}

/// The receipt subscriptions open now.
#[derive(Debug, Default)]
pub struct Interest {
    everyone: bool,
    all: AtomicUsize,
    sites: Mutex<HashMap<SiteRef, usize>>,
    wards: Mutex<HashMap<WardCode, usize>>,
}

impl Interest {
    /// Counts subscriptions as the guards report them.
    pub fn counted() -> Interest {
        Interest::default()
    }

    /// Wants every receipt, whoever subscribes.
    pub fn everyone() -> Interest {
        Interest {
            everyone: true,
            ..Interest::default()
        }
    }

    /// Which receipts `filter` (as allowed by the ACL) can receive, if any.
    pub fn of_filter(filter: &str) -> Option<Wants> {
        let filter = match filter.strip_prefix("$share/") {
            Some(rest) => rest.split_once('/')?.1,
            None => filter,
        };
        if let Some(site) = parse_receipt_topic(filter) {
            return Some(Wants::Site(site));
        }
        if let Some(ward) = filter
            .strip_prefix(RECEIPT_ROOT)
            .and_then(|rest| rest.strip_prefix('/'))
            .and_then(|rest| rest.strip_suffix("/+"))
            .filter(|ward| ward.len() == 6)
            .and_then(|ward| ward.parse::<WardCode>().ok())
            // One of the 23: an anonymous demo client names no other ward into the relays.
            .filter(|ward| ward.is_known())
        {
            return Some(Wants::Ward(ward));
        }
        let mut levels = filter.split('/');
        for fixed in RECEIPT_ROOT.split('/').chain(["", ""]) {
            match levels.next() {
                Some("#") => return Some(Wants::All),
                Some("+") => {}
                Some(level) if fixed.is_empty() || level == fixed => {}
                _ => return None,
            }
        }
        // Five levels, one of them a `+` (two fixed ones are a site's topic, handled above).
        levels.next().is_none().then_some(Wants::All)
    }

    pub fn add(&self, wants: &Wants) {
        match wants {
            Wants::All => {
                self.all.fetch_add(1, Ordering::Relaxed);
            }
            Wants::Site(site) => {
                *self
                    .sites
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entry(site.clone())
                    .or_default() += 1;
            }
            Wants::Ward(ward) => {
                *self
                    .wards
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entry(*ward)
                    .or_default() += 1;
            }
        }
    }

    pub fn remove(&self, wants: &Wants) {
        match wants {
            Wants::All => {
                let _ = self
                    .all
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
            }
            Wants::Site(site) => {
                let mut sites = self.sites.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(n) = sites.get_mut(site) {
                    *n -= 1;
                    if *n == 0 {
                        sites.remove(site);
                    }
                }
            }
            Wants::Ward(ward) => {
                let mut wards = self.wards.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(n) = wards.get_mut(ward) {
                    *n -= 1;
                    if *n == 0 {
                        wards.remove(ward);
                    }
                }
            }
        }
    }

    /// Whether anyone may be listening to `site`'s receipts.
    pub fn wanted(&self, site: &SiteRef) -> bool {
        self.everyone
            || self.all.load(Ordering::Relaxed) > 0
            || self
                .sites
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains_key(site)
            || self
                .wards
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains_key(&site.ward)
    }
}

#[cfg(test)]
mod tests {
    use renkei_shared::{Id, WardCode};

    use super::*;

    fn site(s: &str) -> SiteRef {
        SiteRef {
            ward: WardCode(131041),
            site: Id::new(s).unwrap(),
        }
    }

    #[test]
    fn filters_reach_one_site_all_or_none() {
        let one = Some(Wants::Site(site("es-1")));
        assert_eq!(Interest::of_filter("renkei/receipt/v1/131041/es-1"), one);
        assert_eq!(
            Interest::of_filter("$share/g/renkei/receipt/v1/131041/es-1"),
            one
        );
        for all in [
            "#",
            "renkei/#",
            "renkei/receipt/#",
            "renkei/receipt/v1/#",
            "renkei/+/v1/131041/es-1",
            "+/+/+/+/+",
            "$share/g/#",
        ] {
            assert_eq!(Interest::of_filter(all), Some(Wants::All), "{all}");
        }
        // A relay's: one ward's sites.
        assert_eq!(
            Interest::of_filter("renkei/receipt/v1/131041/+"),
            Some(Wants::Ward(WardCode(131041)))
        );
        for none in [
            "renkei/v1/#",
            "renkei/json/v1/#",
            "renkei/receipt/v1/131041",
            "renkei/receipt/v1/131041/es-1/x",
            "renkei/receipt/v1/+/+/+",
            "+/+/+/+",
            "$share/",
        ] {
            assert_eq!(Interest::of_filter(none), None, "{none}");
        }
    }

    #[test]
    fn counts_subscriptions_until_they_go() {
        let interest = Interest::counted();
        assert!(!interest.wanted(&site("es-1")));
        let one = Wants::Site(site("es-1"));
        interest.add(&one);
        interest.add(&one);
        interest.remove(&one);
        assert!(interest.wanted(&site("es-1")));
        assert!(!interest.wanted(&site("es-2")));
        interest.remove(&one);
        assert!(!interest.wanted(&site("es-1")));
        interest.add(&Wants::All);
        assert!(interest.wanted(&site("es-2")));
        interest.remove(&Wants::All);
        interest.remove(&Wants::All);
        assert!(!interest.wanted(&site("es-2")), "never below zero");
        assert!(Interest::everyone().wanted(&site("es-9")));
        let ward = Wants::Ward(WardCode(131041));
        interest.add(&ward);
        assert!(interest.wanted(&site("es-3")));
        assert!(!interest.wanted(&SiteRef {
            ward: WardCode(131016),
            site: Id::new("es-3").unwrap()
        }));
        interest.remove(&ward);
        assert!(!interest.wanted(&site("es-3")));
    }
}
