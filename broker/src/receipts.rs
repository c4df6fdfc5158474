//! Which sites anyone listens to receipts for, so that the recorder publishes only those.
//!
//! A receipt goes to one site's agent. Clients that keep no outbox (the simulator, load tools,
//! other systems' gateways) never subscribe to theirs, and at 2,000 messages a second a
//! receipt to nobody is one more publish through the router for each message. The guard of
//! each connection registers the receipt filters it allows ([`Interest::add`]) and removes
//! them when the connection ends; the recorder asks [`Interest::wanted`]. A filter with
//! wildcards over the receipt tree (an HQ operator watching, say) wants every site's. In
//! external-broker mode the subscriptions are the cluster's business and unknown here:
//! [`Interest::everyone`] wants them all.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use renkei_shared::SiteRef;
use renkei_shared::receipt::{RECEIPT_ROOT, parse_receipt_topic};

/// What one subscription filter reaches of the receipt tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wants {
    /// Possibly any site's receipts.
    All,
    Site(SiteRef),
}

/// The receipt subscriptions open now.
#[derive(Debug, Default)]
pub struct Interest {
    everyone: bool,
    all: AtomicUsize,
    sites: Mutex<HashMap<SiteRef, usize>>,
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
            "renkei/receipt/v1/131041/+",
            "+/+/+/+/+",
            "$share/g/#",
        ] {
            assert_eq!(Interest::of_filter(all), Some(Wants::All), "{all}");
        }
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
    }
}
