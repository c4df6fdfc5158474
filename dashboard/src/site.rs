//! One site's view, derived from a [`World`]: its latest heartbeat and shelter report, and its
//! own stock, requests and incidents (the ward view's rows, for this site only).

use renkei_shared::Timestamp;
use renkei_shared::reducer::SiteState;
use renkei_shared::{ShelterStatus, SiteRef, SiteStatus, World};

use crate::age::Age;
use crate::detail::{Freshness, WardDetail, site_name};

/// Everything the site view shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteDetail {
    pub site: SiteRef,
    /// The site's name, or its id until its status arrives.
    pub name: String,
    /// Whether anything at all is known of the site in the viewed world.
    pub known: bool,
    pub freshness: Freshness,
    /// The latest heartbeat and its age.
    pub status: Option<(SiteStatus, Age)>,
    /// The latest shelter report and its age.
    pub shelter: Option<(ShelterStatus, Age)>,
    /// `(boot, seq)` of the latest shelter report: the history is fetched again when it moves.
    pub shelter_version: Option<(u32, u64)>,
    pub occupancy_pct: Option<u64>,
    /// The site's own stock, requests and incidents.
    pub rows: WardDetail,
}

impl SiteDetail {
    /// The site's detail in `world` at `now`.
    pub fn derive(world: &World, site: &SiteRef, now: Timestamp) -> SiteDetail {
        let empty = SiteState::default();
        let state = world.sites.get(site);
        let known = state.is_some();
        let state = state.unwrap_or(&empty);
        let mut rows = WardDetail::empty(site.ward);
        rows.add_site(&site.site, state, now);
        rows.sort();
        SiteDetail {
            site: site.clone(),
            name: site_name(state, &site.site),
            known,
            freshness: Freshness::of(state, now),
            status: state
                .status
                .as_ref()
                .map(|s| (s.value.clone(), Age::between(now, s.sent_at))),
            shelter: state
                .shelter
                .as_ref()
                .map(|s| (s.value.clone(), Age::between(now, s.sent_at))),
            shelter_version: state.shelter.as_ref().map(|s| (s.stamp.boot, s.stamp.seq)),
            occupancy_pct: state.occupancy_pct(),
            rows,
        }
    }
}

#[cfg(test)]
mod tests {
    use renkei_shared::{Id, Mode, State, WardCode, sample};

    use super::*;

    #[test]
    fn derives_one_sites_status_shelter_and_rows() {
        let mut state = State::new();
        for env in sample::all() {
            state.apply(&env);
        }
        let now = sample::SENT_AT.plus_secs(60);
        let detail = SiteDetail::derive(state.world(Mode::Actual), &sample::site(), now);
        assert!(detail.known);
        assert_eq!(detail.status.as_ref().map(|(s, _)| s.interval_s), Some(30));
        let (shelter, age) = detail.shelter.as_ref().unwrap();
        assert_eq!(shelter.evacuees, Some(312));
        assert_eq!(*age, Age::Minutes(1));
        assert!(detail.shelter_version.is_some());
        assert_eq!(detail.occupancy_pct, Some(69));
        assert_eq!(detail.rows.requests.len(), 1);
        assert_eq!(detail.rows.incidents.len(), 1);
        assert_eq!(detail.rows.shelters.len(), 1);
    }

    #[test]
    fn an_unknown_site_is_empty_but_named() {
        let state = State::new();
        let site = SiteRef {
            ward: WardCode(131016),
            site: Id::new("nowhere").unwrap(),
        };
        let detail = SiteDetail::derive(state.world(Mode::Actual), &site, sample::SENT_AT);
        assert!(!detail.known);
        assert_eq!(detail.name, "nowhere");
        assert!(detail.status.is_none() && detail.shelter.is_none());
        assert!(detail.rows.requests.is_empty());
    }
}
