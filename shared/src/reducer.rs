//! The cross-ward state, and the one function that changes it: [`State::apply`].
//!
//! The broker and the dashboard both run this code, so both see the same picture.
//!
//! - **Worlds.** Actual, exercise and test messages each go to their own [`World`]; nothing
//!   from a drill is ever added into actual totals.
//! - **Ordering.** Each piece of a site's state keeps the message with the highest
//!   `(boot, seq)`: an older report that arrives late (a backlog replay, a redelivery) never
//!   overwrites a newer one, and a message applied twice changes nothing the second time.
//!   Boot ids grow across restarts, so a rebooted agent's reports outrank its old ones even when
//!   its clock was reset. HQ messages (alerts, acknowledgements) order by time sent, then
//!   `(boot, seq, origin)`.
//! - **Requests** move forward through their lifecycle only: the site's report and HQ's steps
//!   merge by taking the later state and the larger delivered quantity, whatever their order.
//! - **Roll-ups and silence** are derived on demand from the per-site state and a clock, so
//!   there is nothing to keep in step and the result never depends on arrival order.
//!
//! Every rule here is commutative and idempotent: the state after a set of messages does not
//! depend on their order or on repeats (property-tested below).

use std::collections::BTreeMap;

use crate::model::*;
use crate::ward::{WARDS, WardCode};

/// A site that has said nothing for this many reporting intervals is silent.
pub const SILENT_AFTER_INTERVALS: i64 = 3;
/// Reporting interval assumed for a site whose status has not arrived yet.
pub const DEFAULT_INTERVAL_S: u32 = 60;
/// Occupancy (percent of capacity) at which a shelter counts as nearly full.
pub const NEARLY_FULL_PCT: u64 = 90;

/// Where a site's message stands in its sender's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Stamp {
    pub boot: u32,
    pub seq: u64,
}

/// A value with the header facts of the message that carried it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    pub stamp: Stamp,
    pub sent_at: Timestamp,
    pub historical: bool,
    pub value: T,
}

impl<T> Versioned<T> {
    fn new(header: &Header, value: T) -> Self {
        Versioned {
            stamp: Stamp {
                boot: header.boot,
                seq: header.seq,
            },
            sent_at: header.sent_at,
            historical: header.historical,
            value,
        }
    }
}

/// The order of HQ messages: time sent first (HQ clocks are kept), then the sender's counters.
type HqOrder = (Timestamp, u32, u64, Origin);

fn hq_order(header: &Header) -> HqOrder {
    (
        header.sent_at,
        header.boot,
        header.seq,
        header.origin.clone(),
    )
}

/// The whole picture: one world per mode.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct State {
    actual: World,
    exercise: World,
    test: World,
}

/// Everything known in one mode.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct World {
    pub sites: BTreeMap<SiteRef, SiteState>,
    pub alerts: BTreeMap<Id, AlertEntry>,
}

/// What one site has told HQ.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SiteState {
    pub status: Option<Versioned<SiteStatus>>,
    pub shelter: Option<Versioned<ShelterStatus>>,
    pub supplies: Option<Versioned<SupplyStock>>,
    pub life: Option<Versioned<Life>>,
    pub requests: BTreeMap<Id, RequestEntry>,
    pub incidents: BTreeMap<Id, Versioned<IncidentReport>>,
    /// The latest time sent of anything the site sent.
    pub last_heard: Option<Timestamp>,
}

/// A supply request: the site's latest report of it, merged with HQ's lifecycle steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestEntry {
    /// The site's latest report (item, quantity, note); `None` until it arrives.
    pub detail: Option<Versioned<SupplyRequest>>,
    /// The furthest lifecycle state anyone reported.
    pub state: RequestState,
    /// The largest delivered quantity anyone reported.
    pub fulfilled: u32,
    /// When the request was first made (the earliest report of it).
    pub first_seen: Timestamp,
    /// When it last moved.
    pub updated_at: Timestamp,
    /// The latest HQ step, with who took it.
    pub last_step: Option<(HqOrderKey, Ack)>,
}

/// The order of an HQ message, kept to merge later steps over earlier ones.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct HqOrderKey(Timestamp, u32, u64, Origin);

impl From<HqOrder> for HqOrderKey {
    fn from((t, b, s, o): HqOrder) -> Self {
        HqOrderKey(t, b, s, o)
    }
}

/// An alert with the answers operators gave it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AlertEntry {
    /// The latest version of the alert; `None` if only acknowledgements have arrived so far.
    pub alert: Option<(HqOrderKey, Timestamp, Alert)>,
    /// Each user's latest answer, with when it was sent.
    pub acks: BTreeMap<Id, (HqOrderKey, Timestamp, Ack)>,
}

impl AlertEntry {
    /// Whether the alert is known and active at `now`.
    pub fn is_active(&self, now: Timestamp) -> bool {
        match &self.alert {
            Some((_, _, a)) => {
                a.state == AlertState::Active && a.expires_at.is_none_or(|exp| now < exp)
            }
            None => false,
        }
    }

    /// Whether someone acknowledged it.
    pub fn is_acknowledged(&self) -> bool {
        !self.acks.is_empty()
    }
}

/// What applying a message did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The state changed; `scope` says where, so a view can redraw only that.
    Updated { mode: Mode, scope: Scope },
    /// The same message (or one with the same stamp) was already applied.
    Duplicate,
    /// A newer message of the same kind was already applied.
    Outdated,
    /// The message carries no state (a command).
    NotState,
}

/// The part of the state a change touched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Site(SiteRef),
    Alert(Id),
}

/// Whether a message stamped `stamp` outranks the `current` value.
fn outranks<T>(current: Option<&Versioned<T>>, stamp: Stamp) -> Result<(), Change> {
    match current {
        Some(cur) if cur.stamp == stamp => Err(Change::Duplicate),
        Some(cur) if cur.stamp > stamp => Err(Change::Outdated),
        _ => Ok(()),
    }
}

/// Keeps `incoming` in `slot` if it outranks what is there.
fn keep_newer<T>(slot: &mut Option<Versioned<T>>, incoming: Versioned<T>) -> Result<(), Change> {
    outranks(slot.as_ref(), incoming.stamp)?;
    *slot = Some(incoming);
    Ok(())
}

impl State {
    pub fn new() -> Self {
        State::default()
    }

    /// The world of one mode.
    pub fn world(&self, mode: Mode) -> &World {
        match mode {
            Mode::Actual => &self.actual,
            Mode::Exercise => &self.exercise,
            Mode::Test => &self.test,
        }
    }

    fn world_mut(&mut self, mode: Mode) -> &mut World {
        match mode {
            Mode::Actual => &mut self.actual,
            Mode::Exercise => &mut self.exercise,
            Mode::Test => &mut self.test,
        }
    }

    /// Applies one (already validated) message.
    pub fn apply(&mut self, env: &Envelope) -> Change {
        let header = &env.header;
        let mode = header.mode;
        let world = self.world_mut(mode);
        let result = match (&header.origin, &env.body) {
            (_, Body::Command(_)) => return Change::NotState,
            (_, Body::Alert(alert)) => world.apply_alert(header, alert),
            (_, Body::Ack(ack)) => world.apply_ack(header, ack),
            (Origin::Site(site), body) => world.apply_site(site, header, body),
            // Site messages from HQ have no topic and are refused by validation; ignore them.
            (Origin::Hq(_), _) => return Change::NotState,
        };
        match result {
            Ok(scope) => Change::Updated { mode, scope },
            Err(change) => change,
        }
    }
}

impl World {
    fn apply_site(
        &mut self,
        site: &SiteRef,
        header: &Header,
        body: &Body,
    ) -> Result<Scope, Change> {
        let state = self.sites.entry(site.clone()).or_default();
        let heard = state.last_heard.is_none_or(|t| t < header.sent_at);
        let result = match body {
            Body::Status(s) => keep_newer(&mut state.status, Versioned::new(header, s.clone())),
            Body::Shelter(s) => keep_newer(&mut state.shelter, Versioned::new(header, s.clone())),
            Body::Supplies(s) => keep_newer(&mut state.supplies, Versioned::new(header, s.clone())),
            Body::Life(l) => keep_newer(&mut state.life, Versioned::new(header, l.clone())),
            Body::Incident(i) => {
                let incoming = Versioned::new(header, i.clone());
                outranks(state.incidents.get(&i.incident_id), incoming.stamp)
                    .map(|()| drop(state.incidents.insert(i.incident_id.clone(), incoming)))
            }
            Body::Request(r) => {
                let entry = state
                    .requests
                    .entry(r.request_id.clone())
                    .or_insert_with(|| RequestEntry::new(header.sent_at));
                let mut changed = entry.merge_times(header.sent_at);
                changed |= keep_newer(&mut entry.detail, Versioned::new(header, r.clone())).is_ok();
                changed |= entry.advance(r.state, Some(r.fulfilled));
                if changed {
                    Ok(())
                } else {
                    Err(Change::Duplicate)
                }
            }
            Body::Alert(_) | Body::Ack(_) | Body::Command(_) => Err(Change::NotState),
        };
        // Hearing from a site is news even when the message itself was already known.
        if heard {
            state.last_heard = Some(header.sent_at);
        }
        match result {
            Ok(()) => Ok(Scope::Site(site.clone())),
            Err(_) if heard => Ok(Scope::Site(site.clone())),
            Err(change) => Err(change),
        }
    }

    fn apply_alert(&mut self, header: &Header, alert: &Alert) -> Result<Scope, Change> {
        let entry = self.alerts.entry(alert.alert_id.clone()).or_default();
        let order = HqOrderKey::from(hq_order(header));
        match &entry.alert {
            Some((cur, _, _)) if *cur == order => return Err(Change::Duplicate),
            Some((cur, _, _)) if *cur > order => return Err(Change::Outdated),
            _ => {}
        }
        entry.alert = Some((order, header.sent_at, alert.clone()));
        Ok(Scope::Alert(alert.alert_id.clone()))
    }

    fn apply_ack(&mut self, header: &Header, ack: &Ack) -> Result<Scope, Change> {
        let order = HqOrderKey::from(hq_order(header));
        match &ack.target {
            AckTarget::Alert(alert_id) => {
                let entry = self.alerts.entry(alert_id.clone()).or_default();
                match entry.acks.get(&ack.by.user) {
                    Some((cur, _, _)) if *cur == order => return Err(Change::Duplicate),
                    Some((cur, _, _)) if *cur > order => return Err(Change::Outdated),
                    _ => {}
                }
                entry
                    .acks
                    .insert(ack.by.user.clone(), (order, header.sent_at, ack.clone()));
                Ok(Scope::Alert(alert_id.clone()))
            }
            AckTarget::Request { site, request_id } => {
                let entry = self
                    .sites
                    .entry(site.clone())
                    .or_default()
                    .requests
                    .entry(request_id.clone())
                    .or_insert_with(|| RequestEntry::new(header.sent_at));
                let mut changed = entry.merge_times(header.sent_at);
                if let Some(state) = ack.action.request_state() {
                    changed |= entry.advance(state, ack.fulfilled);
                } else if let Some(fulfilled) = ack.fulfilled {
                    changed |= entry.advance(RequestState::Requested, Some(fulfilled));
                }
                if entry.last_step.as_ref().is_none_or(|(cur, _)| *cur < order) {
                    entry.last_step = Some((order, ack.clone()));
                    changed = true;
                }
                if changed {
                    Ok(Scope::Site(site.clone()))
                } else {
                    Err(Change::Duplicate)
                }
            }
        }
    }

    /// The roll-up of every ward (all 23, in code order), at `now`.
    pub fn rollups(&self, now: Timestamp) -> Vec<WardRollup> {
        let mut by_ward: BTreeMap<WardCode, WardRollup> = WARDS
            .iter()
            .map(|w| (w.code, WardRollup::empty(w.code)))
            .collect();
        for (site, state) in &self.sites {
            if let Some(r) = by_ward.get_mut(&site.ward) {
                r.add_site(state, now);
            }
        }
        for entry in self.alerts.values() {
            if let Some((_, _, alert)) = &entry.alert {
                if entry.is_active(now) {
                    for ward in &alert.wards {
                        if let Some(r) = by_ward.get_mut(ward) {
                            r.active_alerts += 1;
                            r.worst_alert = r.worst_alert.max(Some(alert.severity));
                        }
                    }
                }
            }
        }
        by_ward.into_values().collect()
    }

    /// The roll-up of one ward at `now`.
    pub fn rollup(&self, ward: WardCode, now: Timestamp) -> WardRollup {
        self.rollups(now)
            .into_iter()
            .find(|r| r.ward == ward)
            .unwrap_or_else(|| WardRollup::empty(ward))
    }

    /// The sites that are silent at `now`.
    pub fn silent_sites(&self, now: Timestamp) -> impl Iterator<Item = (&SiteRef, &SiteState)> {
        self.sites.iter().filter(move |(_, s)| s.is_silent(now))
    }
}

impl RequestEntry {
    fn new(at: Timestamp) -> Self {
        RequestEntry {
            detail: None,
            state: RequestState::Requested,
            fulfilled: 0,
            first_seen: at,
            updated_at: at,
            last_step: None,
        }
    }

    /// Widens the time span with a report sent at `at`; true if it changed.
    fn merge_times(&mut self, at: Timestamp) -> bool {
        let mut changed = false;
        if at < self.first_seen {
            self.first_seen = at;
            changed = true;
        }
        if at > self.updated_at {
            self.updated_at = at;
            changed = true;
        }
        changed
    }

    /// Moves the request forward; true if it moved.
    fn advance(&mut self, state: RequestState, fulfilled: Option<u32>) -> bool {
        let mut changed = false;
        if state.rank() > self.state.rank() {
            self.state = state;
            changed = true;
        }
        if let Some(f) = fulfilled {
            if f > self.fulfilled {
                self.fulfilled = f;
                changed = true;
            }
        }
        changed
    }

    /// Whether the request still waits for HQ or for delivery.
    pub fn is_open(&self) -> bool {
        !self.state.is_closed()
    }
}

impl SiteState {
    /// The reporting interval the site announced, or the default.
    pub fn interval_s(&self) -> u32 {
        self.status
            .as_ref()
            .map_or(DEFAULT_INTERVAL_S, |s| s.value.interval_s)
    }

    /// Whether the site's agent is known to have dropped off (its last will fired).
    pub fn is_dead(&self) -> bool {
        matches!(self.life.as_ref().map(|l| &l.value), Some(Life::Death))
    }

    /// Whether the site has gone silent at `now`: its last will fired, or it has said nothing for
    /// [`SILENT_AFTER_INTERVALS`] reporting intervals.
    pub fn is_silent(&self, now: Timestamp) -> bool {
        self.is_dead() || self.is_stale(now)
    }

    /// Whether nothing has been heard for [`SILENT_AFTER_INTERVALS`] reporting intervals.
    pub fn is_stale(&self, now: Timestamp) -> bool {
        let limit_ms = SILENT_AFTER_INTERVALS * i64::from(self.interval_s()) * 1000;
        match self.last_heard {
            Some(t) => now.millis_since(t) > limit_ms,
            None => true,
        }
    }

    /// The site's display name, if its status has arrived.
    pub fn name(&self) -> Option<&str> {
        self.status.as_ref().map(|s| s.value.name.as_str())
    }

    /// Occupancy of an open shelter in percent, where evacuees and capacity are known.
    pub fn occupancy_pct(&self) -> Option<u64> {
        let shelter = &self.shelter.as_ref()?.value;
        let capacity = u64::from(shelter.capacity?);
        let evacuees = u64::from(shelter.evacuees?);
        (capacity > 0).then(|| evacuees * 100 / capacity)
    }

    /// Whether the site is an open shelter.
    pub fn is_open_shelter(&self) -> bool {
        matches!(
            self.shelter.as_ref().map(|s| s.value.state),
            Some(ShelterState::Open)
        )
    }
}

/// How bad things look in a ward, for colouring the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// No site of the ward has reported.
    NoData,
    Normal,
    /// Shelters open or supply requests waiting.
    Watch,
    /// A shelter nearly full, a site silent, or an alert active.
    Warning,
    /// A shelter over capacity, an unsafe building in use, deaths or missing people, or an
    /// extreme alert.
    Critical,
}

/// One ward's figures, derived from its sites.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WardRollup {
    pub ward: WardCode,
    /// Sites that have reported at least once.
    pub sites: u32,
    pub silent: u32,
    pub shelters_open: u32,
    /// Evacuees in open shelters.
    pub evacuees: u64,
    /// Capacity of the open shelters that report one.
    pub capacity: u64,
    /// People needing special care in open shelters.
    pub care_needed: u64,
    /// Open shelters at or above [`NEARLY_FULL_PCT`].
    pub nearly_full: u32,
    /// Open shelters over capacity.
    pub over_capacity: u32,
    /// Open shelters whose building is tagged unsafe.
    pub unsafe_buildings: u32,
    pub open_requests: u32,
    pub incidents: u32,
    pub dead: u64,
    pub missing: u64,
    pub injured: u64,
    pub active_alerts: u32,
    pub worst_alert: Option<Severity>,
}

impl WardRollup {
    fn empty(ward: WardCode) -> Self {
        WardRollup {
            ward,
            sites: 0,
            silent: 0,
            shelters_open: 0,
            evacuees: 0,
            capacity: 0,
            care_needed: 0,
            nearly_full: 0,
            over_capacity: 0,
            unsafe_buildings: 0,
            open_requests: 0,
            incidents: 0,
            dead: 0,
            missing: 0,
            injured: 0,
            active_alerts: 0,
            worst_alert: None,
        }
    }

    fn add_site(&mut self, site: &SiteState, now: Timestamp) {
        if site.last_heard.is_none() {
            // Known only from HQ's steps on its requests: not a reporting site yet.
            self.open_requests += site.requests.values().filter(|r| r.is_open()).count() as u32;
            return;
        }
        self.sites += 1;
        if site.is_silent(now) {
            self.silent += 1;
        }
        if site.is_open_shelter() {
            if let Some(shelter) = site.shelter.as_ref().map(|s| &s.value) {
                self.shelters_open += 1;
                self.evacuees += u64::from(shelter.evacuees.unwrap_or(0));
                self.capacity += u64::from(shelter.capacity.unwrap_or(0));
                self.care_needed += shelter.care.total().unwrap_or(0);
                if shelter.building_safety == Some(BuildingSafety::Unsafe) {
                    self.unsafe_buildings += 1;
                }
            }
            match site.occupancy_pct() {
                Some(pct) if pct > 100 => {
                    self.over_capacity += 1;
                    self.nearly_full += 1;
                }
                Some(pct) if pct >= NEARLY_FULL_PCT => self.nearly_full += 1,
                _ => {}
            }
        }
        self.open_requests += site.requests.values().filter(|r| r.is_open()).count() as u32;
        for incident in site.incidents.values() {
            let c = &incident.value.counts;
            self.incidents += 1;
            self.dead += u64::from(c.dead.unwrap_or(0));
            self.missing += u64::from(c.missing.unwrap_or(0));
            self.injured +=
                u64::from(c.injured_serious.unwrap_or(0)) + u64::from(c.injured_minor.unwrap_or(0));
        }
    }

    /// The ward's worst state, for the map.
    pub fn level(&self) -> Level {
        if self.sites == 0 && self.active_alerts == 0 {
            Level::NoData
        } else if self.over_capacity > 0
            || self.unsafe_buildings > 0
            || self.dead > 0
            || self.missing > 0
            || self.worst_alert == Some(Severity::Extreme)
        {
            Level::Critical
        } else if self.nearly_full > 0 || self.silent > 0 || self.active_alerts > 0 {
            Level::Warning
        } else if self.shelters_open > 0 || self.open_requests > 0 {
            Level::Watch
        } else {
            Level::Normal
        }
    }

    /// Sites heard from within their reporting interval.
    pub fn reporting(&self) -> u32 {
        self.sites - self.silent
    }
}
