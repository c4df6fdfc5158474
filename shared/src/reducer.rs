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
            // A command's result is news from the site, not state.
            Body::CommandResult(_) => Err(Change::NotState),
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
            if let Some((_, _, alert)) = &entry.alert
                && entry.is_active(now)
            {
                for ward in &alert.wards {
                    if let Some(r) = by_ward.get_mut(ward) {
                        r.active_alerts += 1;
                        r.worst_alert = r.worst_alert.max(Some(alert.severity));
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
        if let Some(f) = fulfilled
            && f > self.fulfilled
        {
            self.fulfilled = f;
            changed = true;
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[derive(strum::IntoStaticStr, strum::EnumString, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
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

/// One ward's figures, derived from its sites. Serialised as is by the broker's HTTP API.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
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
    /// Sites whose agent says its outbox is full: they cannot store new reports.
    pub outbox_alarms: u32,
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
            outbox_alarms: 0,
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
        if site.status.as_ref().is_some_and(|s| s.value.outbox_alarm) {
            self.outbox_alarms += 1;
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
        } else if self.nearly_full > 0
            || self.silent > 0
            || self.active_alerts > 0
            || self.outbox_alarms > 0
        {
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

impl Level {
    /// The name used in the API and exports (`no_data`, `normal`, …).
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::sample;

    fn with_seq(mut env: Envelope, boot: u32, seq: u64) -> Envelope {
        env.header.boot = boot;
        env.header.seq = seq;
        env
    }

    fn evacuees(state: &State) -> Option<u32> {
        let site = state.world(Mode::Actual).sites.get(&sample::site())?;
        site.shelter.as_ref()?.value.evacuees
    }

    fn shelter_with(evacuees: u32, boot: u32, seq: u64) -> Envelope {
        let mut env = with_seq(sample::shelter(), boot, seq);
        if let Body::Shelter(s) = &mut env.body {
            s.evacuees = Some(evacuees);
        }
        env
    }

    #[test]
    fn applying_twice_is_applying_once() {
        let mut state = State::new();
        let env = sample::shelter();
        assert!(matches!(
            state.apply(&env),
            Change::Updated {
                mode: Mode::Actual,
                ..
            }
        ));
        let once = state.clone();
        assert_eq!(state.apply(&env), Change::Duplicate);
        assert_eq!(state, once);
    }

    #[test]
    fn an_older_sequence_never_overwrites_a_newer_one() {
        let mut state = State::new();
        state.apply(&shelter_with(300, 3, 20));
        assert_eq!(state.apply(&shelter_with(100, 3, 19)), Change::Outdated);
        assert_eq!(evacuees(&state), Some(300));
        // A later boot outranks any sequence of an earlier one, whatever its clock says.
        let mut rebooted = shelter_with(50, 4, 1);
        rebooted.header.sent_at = Timestamp(0);
        state.apply(&rebooted);
        assert_eq!(evacuees(&state), Some(50));
    }

    #[test]
    fn exercise_data_never_reaches_actual_totals() {
        let mut state = State::new();
        let mut drill = sample::shelter();
        drill.header.mode = Mode::Exercise;
        state.apply(&drill);
        let now = sample::SENT_AT;
        let shinjuku = |mode| state.world(mode).rollup(WardCode(131041), now);
        assert_eq!(shinjuku(Mode::Actual).evacuees, 0);
        assert_eq!(shinjuku(Mode::Actual).sites, 0);
        assert_eq!(shinjuku(Mode::Exercise).evacuees, 312);
    }

    #[test]
    fn rollups_cover_every_ward_and_add_up() {
        let mut state = State::new();
        for env in sample::all() {
            state.apply(&env);
        }
        let rollups = state.world(Mode::Actual).rollups(sample::SENT_AT);
        assert_eq!(rollups.len(), 23);
        let r = rollups.iter().find(|r| r.ward == WardCode(131041)).unwrap();
        assert_eq!(r.sites, 1);
        assert_eq!(r.shelters_open, 1);
        assert_eq!((r.evacuees, r.capacity), (312, 450));
        assert_eq!(r.care_needed, 21 + 4 + 9 + 2 + 6 + 3);
        assert_eq!(r.open_requests, 1);
        assert_eq!((r.incidents, r.injured), (1, 5));
        assert_eq!(r.active_alerts, 1);
        // The sample death (seq 2) outranks the birth (seq 1): the agent dropped off.
        assert_eq!(r.silent, 1);
        assert_eq!(r.level(), Level::Warning);
        let chiyoda = rollups.iter().find(|r| r.ward == WardCode(131016)).unwrap();
        assert_eq!(chiyoda.level(), Level::NoData);
    }

    #[test]
    fn a_site_goes_silent_after_three_intervals() {
        let mut state = State::new();
        state.apply(&sample::status()); // interval 30 s
        let site = &state.world(Mode::Actual).sites[&sample::site()];
        assert!(!site.is_silent(sample::SENT_AT.plus_secs(90)));
        assert!(site.is_silent(sample::SENT_AT.plus_secs(91)));
    }

    #[test]
    fn a_new_birth_outranks_the_last_will() {
        let mut state = State::new();
        state.apply(&sample::birth());
        state.apply(&sample::death());
        assert!(state.world(Mode::Actual).sites[&sample::site()].is_dead());
        state.apply(&with_seq(sample::birth(), 3, 5));
        assert!(!state.world(Mode::Actual).sites[&sample::site()].is_dead());
    }

    #[test]
    fn request_lifecycle_only_moves_forward() {
        let mut state = State::new();
        let step = |action, seq, fulfilled| {
            let mut env = sample::ack();
            env.header.seq = seq;
            env.header.sent_at = sample::SENT_AT.plus_secs(seq as i64);
            if let Body::Ack(a) = &mut env.body {
                a.target = AckTarget::Request {
                    site: sample::site(),
                    request_id: Id::new("req-0001").unwrap(),
                };
                a.action = action;
                a.fulfilled = fulfilled;
            }
            env
        };
        // HQ's "shipped" arrives before the site's request and before "accepted".
        state.apply(&step(AckAction::Ship, 30, Some(500)));
        state.apply(&sample::request());
        state.apply(&step(AckAction::Accept, 10, None));
        let req = &state.world(Mode::Actual).sites[&sample::site()].requests
            [&Id::new("req-0001").unwrap()];
        assert_eq!(req.state, RequestState::Shipped);
        assert_eq!(req.fulfilled, 500);
        assert_eq!(req.detail.as_ref().unwrap().value.quantity, 2000);
        assert_eq!(req.last_step.as_ref().unwrap().1.action, AckAction::Ship);
        assert!(req.is_open());
    }

    #[test]
    fn acknowledgements_are_kept_per_user() {
        let mut state = State::new();
        state.apply(&sample::alert());
        state.apply(&sample::ack());
        let entry =
            &state.world(Mode::Actual).alerts[&Id::new("occ-131041-nishi-shinjuku-es").unwrap()];
        assert!(entry.is_active(sample::SENT_AT));
        assert!(entry.is_acknowledged());
        assert_eq!(
            entry.acks[&Id::new("sato").unwrap()].2.note,
            "新宿中学校へ誘導開始"
        );
    }

    #[test]
    fn commands_carry_no_state() {
        let mut state = State::new();
        assert_eq!(state.apply(&sample::command()), Change::NotState);
        assert_eq!(state, State::new());
    }

    /// Messages about a few sites and alerts, each with its own (origin, boot, seq), so that any
    /// two of them are distinct messages.
    fn messages() -> impl Strategy<Value = Vec<Envelope>> {
        let sites = [
            sample::site(),
            SiteRef {
                ward: WardCode(131016),
                site: Id::new("a").unwrap(),
            },
        ];
        proptest::collection::vec((any::<Envelope>(), 0usize..2, 0u32..3, 0i64..5), 1..40).prop_map(
            move |items| {
                items
                    .into_iter()
                    .enumerate()
                    .map(|(i, (mut env, site, boot, t))| {
                        env.header.boot = boot;
                        env.header.seq = i as u64;
                        env.header.sent_at = sample::SENT_AT.plus_secs(t);
                        // Site bodies come from sites (as validation demands); pin them to a
                        // few sites so that messages collide on the same state.
                        if !matches!(env.body, Body::Alert(_) | Body::Ack(_) | Body::Command(_)) {
                            env.header.origin = Origin::Site(sites[site].clone());
                        }
                        env
                    })
                    .collect()
            },
        )
    }

    proptest! {
        #[test]
        fn order_and_repeats_do_not_matter(msgs in messages(), seed in any::<u64>()) {
            let mut in_order = State::new();
            for m in &msgs {
                in_order.apply(m);
            }
            // Apply again: nothing changes, and nothing claims to.
            let before = in_order.clone();
            for m in &msgs {
                let change = in_order.apply(m);
                prop_assert!(!matches!(change, Change::Updated { .. }), "reapplied: {:?}", change);
            }
            prop_assert_eq!(&in_order, &before);

            // Any other order (a seeded shuffle) gives the same state.
            let mut shuffled = msgs.clone();
            let mut x = seed | 1;
            for i in (1..shuffled.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                shuffled.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let mut other = State::new();
            for m in &shuffled {
                other.apply(m);
            }
            prop_assert_eq!(&other, &in_order);
        }
    }
}
