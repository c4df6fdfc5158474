//! One ward's view, derived from a [`World`]: its shelters, supplies, requests and incidents,
//! and the sorting and filtering of the shelter table.
//!
//! Everything is plain data with ages already computed, so the view only formats it and a
//! detail that did not change compares equal and skips the re-render.

use std::cmp::Ordering;

use renkei_shared::reducer::SiteState;
use renkei_shared::{
    DamageCounts, HqState, Id, IncidentCategory, Item, LinkState, PowerSource, ReportVersion,
    RequestState, Severity, ShelterState, SiteKind, Timestamp, WardCode, World,
};

use crate::age::Age;

/// How fresh a site's figures are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    /// When the site was last heard from.
    pub heard_at: Option<Timestamp>,
    pub age: Option<Age>,
    /// Nothing heard for three reporting intervals.
    pub stale: bool,
    /// Its last will fired.
    pub dead: bool,
}

impl Freshness {
    pub fn of(site: &SiteState, now: Timestamp) -> Freshness {
        Freshness {
            heard_at: site.last_heard,
            age: site.last_heard.map(|t| Age::between(now, t)),
            stale: site.is_stale(now),
            dead: site.is_dead(),
        }
    }

    /// Silent: stale or dead, as the roll-ups count it.
    pub fn silent(&self) -> bool {
        self.stale || self.dead
    }
}

/// One row of the shelter table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShelterRow {
    pub site: Id,
    /// The site's name, or its id until its status arrives.
    pub name: String,
    pub state: Option<ShelterState>,
    pub evacuees: Option<u32>,
    pub capacity: Option<u32>,
    pub occupancy_pct: Option<u64>,
    pub care_needed: Option<u64>,
    /// When the shelter figures were sent.
    pub reported_at: Option<Timestamp>,
    pub reported_age: Option<Age>,
    pub freshness: Freshness,
    /// The agent's outbox is full: the shelter cannot store new reports.
    pub outbox_alarm: bool,
}

/// A site that is not a shelter (a ward office, a depot), by its heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteRow {
    pub site: Id,
    pub name: String,
    pub kind: SiteKind,
    pub hq: HqState,
    pub power: PowerSource,
    pub battery_pct: Option<u8>,
    /// The worst of its communication channels, where any is known.
    pub worst_link: Option<LinkState>,
    pub queue_depth: Option<u32>,
    pub outbox_alarm: bool,
    pub freshness: Freshness,
}

/// One stock line of a site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StockRow {
    pub site_name: String,
    pub item: Item,
    pub on_hand: Option<u32>,
    pub daily_need: Option<u32>,
    pub days_left_tenths: Option<u64>,
    pub age: Age,
    pub stale: bool,
}

/// One supply request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRow {
    pub site: Id,
    pub site_name: String,
    pub request_id: Id,
    pub item: Option<Item>,
    pub quantity: Option<u32>,
    pub fulfilled: u32,
    pub state: RequestState,
    pub age: Age,
}

/// One incident report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncidentRow {
    pub site: Id,
    pub site_name: String,
    pub incident_id: Id,
    pub category: IncidentCategory,
    pub counts: DamageCounts,
    pub severity: Severity,
    pub version: ReportVersion,
    pub age: Age,
    pub stale: bool,
}

/// Everything the ward view shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WardDetail {
    pub ward: WardCode,
    pub shelters: Vec<ShelterRow>,
    pub stock: Vec<StockRow>,
    pub requests: Vec<RequestRow>,
    pub incidents: Vec<IncidentRow>,
    /// Ward offices and depots, by name.
    pub other_sites: Vec<SiteRow>,
}

/// How bad a link state is, for picking the worst.
fn link_rank(state: LinkState) -> u8 {
    match state {
        LinkState::Ok => 0,
        LinkState::Degraded => 1,
        LinkState::Down => 2,
    }
}

pub(crate) fn site_name(site: &SiteState, id: &Id) -> String {
    site.name().unwrap_or(id.as_str()).to_owned()
}

impl WardDetail {
    /// A detail with no rows yet.
    pub fn empty(ward: WardCode) -> WardDetail {
        WardDetail {
            ward,
            shelters: Vec::new(),
            stock: Vec::new(),
            requests: Vec::new(),
            incidents: Vec::new(),
            other_sites: Vec::new(),
        }
    }

    /// The ward's detail in `world` at `now`.
    pub fn derive(world: &World, ward: WardCode, now: Timestamp) -> WardDetail {
        let mut detail = WardDetail::empty(ward);
        // Sites are keyed by (ward, site), so one ward's sites are one contiguous range.
        for (site_ref, site) in world.sites.iter().filter(|(s, _)| s.ward == ward) {
            detail.add_site(&site_ref.site, site, now);
        }
        detail.sort();
        detail
    }

    /// Adds the rows of one site of the ward.
    pub fn add_site(&mut self, id: &Id, site: &SiteState, now: Timestamp) {
        let name = site_name(site, id);
        let freshness = Freshness::of(site, now);
        let status = site.status.as_ref().map(|s| &s.value);
        let outbox_alarm = status.is_some_and(|s| s.outbox_alarm);
        let is_shelter =
            site.shelter.is_some() || status.map(|s| s.kind) == Some(SiteKind::Shelter);
        if is_shelter {
            let shelter = site.shelter.as_ref();
            let value = shelter.map(|s| &s.value);
            self.shelters.push(ShelterRow {
                site: id.clone(),
                name: name.clone(),
                state: value.map(|s| s.state),
                evacuees: value.and_then(|s| s.evacuees),
                capacity: value.and_then(|s| s.capacity),
                occupancy_pct: site.occupancy_pct(),
                care_needed: value.and_then(|s| s.care.total()),
                reported_at: shelter.map(|s| s.sent_at),
                reported_age: shelter.map(|s| Age::between(now, s.sent_at)),
                freshness,
                outbox_alarm,
            });
        } else if let Some(status) = status {
            let c = &status.comms;
            self.other_sites.push(SiteRow {
                site: id.clone(),
                name: name.clone(),
                kind: status.kind,
                hq: status.hq,
                power: status.power,
                battery_pct: status.battery_pct,
                worst_link: [c.internet, c.mobile, c.landline, c.radio]
                    .into_iter()
                    .flatten()
                    .max_by_key(|&l| link_rank(l)),
                queue_depth: status.queue_depth,
                outbox_alarm,
                freshness,
            });
        }
        if let Some(supplies) = &site.supplies {
            let age = Age::between(now, supplies.sent_at);
            self.stock
                .extend(supplies.value.lines.iter().map(|line| StockRow {
                    site_name: name.clone(),
                    item: line.item,
                    on_hand: line.on_hand,
                    daily_need: line.daily_need,
                    days_left_tenths: line.days_left_tenths(),
                    age,
                    stale: freshness.silent(),
                }));
        }
        for (request_id, entry) in &site.requests {
            let detail_value = entry.detail.as_ref().map(|d| &d.value);
            self.requests.push(RequestRow {
                site: id.clone(),
                site_name: name.clone(),
                request_id: request_id.clone(),
                item: detail_value.map(|d| d.item),
                quantity: detail_value.map(|d| d.quantity),
                fulfilled: entry.fulfilled,
                state: entry.state,
                age: Age::between(now, entry.updated_at),
            });
        }
        for (incident_id, incident) in &site.incidents {
            let i = &incident.value;
            self.incidents.push(IncidentRow {
                site: id.clone(),
                site_name: name.clone(),
                incident_id: incident_id.clone(),
                category: i.category,
                counts: i.counts,
                severity: i.severity,
                version: i.version,
                age: Age::between(now, incident.sent_at),
                stale: freshness.silent(),
            });
        }
    }

    /// Open requests first (oldest state first), then closed ones; worst incidents first;
    /// other sites by kind (ward office first), then name.
    pub fn sort(&mut self) {
        self.other_sites.sort_by(|a, b| {
            (a.kind != SiteKind::WardOffice, &a.name, &a.site).cmp(&(
                b.kind != SiteKind::WardOffice,
                &b.name,
                &b.site,
            ))
        });
        self.requests
            .sort_by_key(|r| (r.state.is_closed(), r.state.rank()));
        self.incidents
            .sort_by_key(|i| std::cmp::Reverse(i.severity));
    }
}

/// A column the shelter table sorts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortKey {
    #[default]
    Name,
    State,
    Evacuees,
    Occupancy,
    Care,
    Age,
}

impl SortKey {
    pub const ALL: [SortKey; 6] = [
        SortKey::Name,
        SortKey::State,
        SortKey::Evacuees,
        SortKey::Occupancy,
        SortKey::Care,
        SortKey::Age,
    ];

    /// The `data-sort` key of the column header.
    pub fn as_str(self) -> &'static str {
        match self {
            SortKey::Name => "name",
            SortKey::State => "state",
            SortKey::Evacuees => "evacuees",
            SortKey::Occupancy => "occupancy",
            SortKey::Care => "care",
            SortKey::Age => "age",
        }
    }

    /// The direction a first click sorts in: figures biggest (or oldest) first, names A–Z.
    pub fn default_descending(self) -> bool {
        !matches!(self, SortKey::Name | SortKey::State)
    }
}

/// Order of shelter states in the table: open first, unknown last.
fn state_rank(state: Option<ShelterState>) -> u8 {
    match state {
        Some(ShelterState::Open) => 0,
        Some(ShelterState::Preparing) => 1,
        Some(ShelterState::NotOpen) => 2,
        Some(ShelterState::Closed) => 3,
        Some(ShelterState::Unknown) => 4,
        None => 5,
    }
}

/// Compares two rows by `key`; unknown figures sort after known ones either way.
fn compare(a: &ShelterRow, b: &ShelterRow, key: SortKey, descending: bool) -> Ordering {
    fn known<T: Ord>(a: Option<T>, b: Option<T>, descending: bool) -> Ordering {
        match (a, b) {
            (Some(a), Some(b)) if descending => b.cmp(&a),
            (Some(a), Some(b)) => a.cmp(&b),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        }
    }
    let primary = match key {
        SortKey::Name => {
            let o = a.name.cmp(&b.name);
            if descending { o.reverse() } else { o }
        }
        SortKey::State => {
            let o = state_rank(a.state).cmp(&state_rank(b.state));
            if descending { o.reverse() } else { o }
        }
        SortKey::Evacuees => known(a.evacuees, b.evacuees, descending),
        SortKey::Occupancy => known(a.occupancy_pct, b.occupancy_pct, descending),
        SortKey::Care => known(a.care_needed, b.care_needed, descending),
        // Oldest first when descending: the figure least to be trusted leads.
        SortKey::Age => known(
            a.reported_at.map(std::cmp::Reverse),
            b.reported_at.map(std::cmp::Reverse),
            descending,
        ),
    };
    primary.then_with(|| a.site.cmp(&b.site))
}

/// Whether a row matches the filter text: case-insensitive, on its name or site id.
pub fn matches(row: &ShelterRow, filter: &str) -> bool {
    let filter = filter.trim().to_lowercase();
    filter.is_empty()
        || row.name.to_lowercase().contains(&filter)
        || row.site.as_str().to_lowercase().contains(&filter)
}

/// The rows to show: filtered, then sorted.
pub fn sort_and_filter<'a>(
    rows: &'a [ShelterRow],
    key: SortKey,
    descending: bool,
    filter: &str,
) -> Vec<&'a ShelterRow> {
    let mut shown: Vec<&ShelterRow> = rows.iter().filter(|r| matches(r, filter)).collect();
    shown.sort_by(|a, b| compare(a, b, key, descending));
    shown
}

#[cfg(test)]
mod tests {
    use renkei_shared::{Body, Mode, State, sample};

    use super::*;

    fn row(
        site: &str,
        name: &str,
        evacuees: Option<u32>,
        occupancy: Option<u64>,
        at: i64,
    ) -> ShelterRow {
        ShelterRow {
            site: Id::new(site).unwrap(),
            name: name.into(),
            state: Some(ShelterState::Open),
            evacuees,
            capacity: Some(100),
            occupancy_pct: occupancy,
            care_needed: None,
            reported_at: Some(Timestamp(at)),
            reported_age: Some(Age::JustNow),
            freshness: Freshness {
                heard_at: Some(Timestamp(at)),
                age: Some(Age::JustNow),
                stale: false,
                dead: false,
            },
            outbox_alarm: false,
        }
    }

    fn sites(rows: &[&ShelterRow]) -> Vec<String> {
        rows.iter().map(|r| r.site.to_string()).collect()
    }

    #[test]
    fn sorts_by_each_column_with_unknowns_last() {
        let rows = vec![
            row("a", "西新宿小学校", Some(10), Some(10), 3_000),
            row("b", "新宿中学校", None, None, 1_000),
            row("c", "Ochiai Hall", Some(300), Some(95), 2_000),
        ];
        let by = |key, desc| sites(&sort_and_filter(&rows, key, desc, ""));
        assert_eq!(by(SortKey::Evacuees, true), ["c", "a", "b"]);
        assert_eq!(by(SortKey::Evacuees, false), ["a", "c", "b"]);
        assert_eq!(by(SortKey::Occupancy, true), ["c", "a", "b"]);
        assert_eq!(by(SortKey::Name, false), ["c", "b", "a"]);
        assert_eq!(by(SortKey::Name, true), ["a", "b", "c"]);
        // Oldest report first when descending.
        assert_eq!(by(SortKey::Age, true), ["b", "c", "a"]);
        assert_eq!(by(SortKey::Age, false), ["a", "c", "b"]);
        assert!(SortKey::Evacuees.default_descending());
        assert!(!SortKey::Name.default_descending());
    }

    #[test]
    fn filters_on_name_or_id_ignoring_case() {
        let rows = vec![
            row("nishi-es", "西新宿小学校", None, None, 0),
            row("ochiai", "Ochiai Hall", None, None, 0),
        ];
        assert_eq!(
            sites(&sort_and_filter(&rows, SortKey::Name, false, "西新宿")),
            ["nishi-es"]
        );
        assert_eq!(
            sites(&sort_and_filter(&rows, SortKey::Name, false, " HALL ")),
            ["ochiai"]
        );
        assert_eq!(
            sites(&sort_and_filter(&rows, SortKey::Name, false, "NISHI")),
            ["nishi-es"]
        );
        assert_eq!(sort_and_filter(&rows, SortKey::Name, false, "").len(), 2);
        assert!(sort_and_filter(&rows, SortKey::Name, false, "渋谷").is_empty());
    }

    #[test]
    fn derives_a_wards_shelters_supplies_requests_and_incidents() {
        let mut state = State::new();
        for env in sample::all() {
            state.apply(&env);
        }
        let now = sample::SENT_AT.plus_secs(180);
        let site = sample::site();
        let detail = WardDetail::derive(state.world(Mode::Actual), site.ward, now);
        assert_eq!(detail.shelters.len(), 1);
        let shelter = &detail.shelters[0];
        assert_eq!(shelter.evacuees, Some(312));
        assert_eq!(shelter.capacity, Some(450));
        assert_eq!(shelter.occupancy_pct, Some(69));
        assert_eq!(shelter.reported_age, Some(Age::Minutes(3)));
        assert!(!detail.stock.is_empty());
        assert_eq!(detail.requests.len(), 1);
        assert_eq!(detail.incidents.len(), 1);
        // Another ward sees none of it.
        let other = WardDetail::derive(state.world(Mode::Actual), WardCode(131016), now);
        assert!(other.shelters.is_empty() && other.requests.is_empty());
        assert!(matches!(sample::shelter().body, Body::Shelter(_)));
    }

    #[test]
    fn flags_full_outboxes_and_lists_ward_offices_and_depots() {
        let mut state = State::new();
        let mut shelter_status = sample::status();
        if let Body::Status(s) = &mut shelter_status.body {
            s.outbox_alarm = true;
        }
        state.apply(&shelter_status);
        for (site, kind, name) in [
            ("depot-1", SiteKind::Depot, "新宿区備蓄倉庫"),
            ("office", SiteKind::WardOffice, "新宿区役所"),
        ] {
            let mut env = sample::status();
            env.header.origin = renkei_shared::Origin::Site(renkei_shared::SiteRef {
                ward: sample::site().ward,
                site: Id::new(site).unwrap(),
            });
            if let Body::Status(s) = &mut env.body {
                s.kind = kind;
                s.name = name.into();
                s.comms.internet = Some(LinkState::Degraded);
                s.comms.landline = Some(LinkState::Down);
            }
            state.apply(&env);
        }
        let detail = WardDetail::derive(
            state.world(Mode::Actual),
            sample::site().ward,
            sample::SENT_AT,
        );
        assert_eq!(detail.shelters.len(), 1);
        assert!(detail.shelters[0].outbox_alarm);
        let others: Vec<_> = detail
            .other_sites
            .iter()
            .map(|s| (s.site.as_str(), s.kind))
            .collect();
        assert_eq!(
            others,
            [
                ("office", SiteKind::WardOffice),
                ("depot-1", SiteKind::Depot)
            ]
        );
        assert_eq!(detail.other_sites[1].worst_link, Some(LinkState::Down));
        assert!(!detail.other_sites[1].outbox_alarm);
    }

    #[test]
    fn a_site_that_stops_reporting_goes_stale() {
        let mut state = State::new();
        state.apply(&sample::status());
        state.apply(&sample::shelter());
        let world = state.world(Mode::Actual);
        let fresh = WardDetail::derive(world, sample::site().ward, sample::SENT_AT);
        assert!(!fresh.shelters[0].freshness.stale);
        // The sample's interval is 30 s: stale after three of them.
        let later = WardDetail::derive(world, sample::site().ward, sample::SENT_AT.plus_secs(91));
        assert!(later.shelters[0].freshness.stale);
        assert_eq!(later.shelters[0].freshness.age, Some(Age::Minutes(1)));
    }
}
