//! What a simulated site lives through, one story step per heartbeat: the steady scenario and
//! the earthquake timeline of the module docs of [`super`].

use std::time::{Duration, Instant};

use rand::Rng;
use rand::rngs::StdRng;
use renkei_shared::{
    Body, BuildingSafety, CareNeeds, Certainty, Comms, DamageCounts, GeoPoint, HqState, Id,
    IncidentCategory, IncidentReport, Item, LifelineState, Lifelines, LinkState, PowerSource,
    ReportVersion, RequestState, RoadState, Severity, ShelterState, ShelterStatus, ShelterType,
    SiteKind, SiteRef, SiteStatus, StockLine, SupplyRequest, SupplyStock, Timestamp, Ward,
};

use crate::report::{crowding, interval_secs};

use super::SimSite;

/// Shelter-life minutes one tick stands for: keeps stock and needs moving at demo speed.
const MINUTES_PER_TICK: u32 = 10;
/// Ticks in a shelter-day.
const TICKS_PER_DAY: u32 = 24 * 60 / MINUTES_PER_TICK;
/// Litres of drinking water per person per day (the usual planning figure).
const WATER_PER_PERSON_DAY: u32 = 3;
/// Meals per person per day.
const MEALS_PER_PERSON_DAY: u32 = 3;
/// Capacity of a shelter in a ward that publishes none.
const DEFAULT_CAPACITY: u32 = 700;

/// One site's earthquake timeline, drawn from its own stream when it is planned. Steps count
/// story steps after the quake; `silence` counts heartbeats after it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct QuakeStory {
    /// The heartbeat on which the quake strikes (the same at every site).
    pub(super) strike_beat: u32,
    /// The step from which staff prepare the shelter (it opens at `SimSite::opens_at`).
    pub(super) prepares_at: u32,
    /// The step at which the grid fails here, if it does, and what takes over.
    pub(super) power_fails_at: Option<u32>,
    pub(super) backup: PowerSource,
    /// The lifelines after the quake (all working before it).
    pub(super) damaged: Lifelines,
    /// The step at which staff report an incident nearby, if they do early.
    pub(super) first_incident_at: Option<u32>,
    /// Heartbeats after the quake at which the site goes silent, and for how many.
    pub(super) silence: Option<(u32, u32)>,
    /// Whether a food request is open (so a low stock asks once).
    pub(super) food_requested: bool,
    /// What happened while the site was silent, sent when it comes back.
    pub(super) held: Vec<Body>,
    /// The last heartbeat was silent: the next one sends the full state again.
    pub(super) was_silent: bool,
}

fn jitter_e6(rng: &mut StdRng, around: i32, spread: i32) -> i32 {
    around + rng.random_range(-spread..=spread)
}

fn some_lifeline(rng: &mut StdRng, ok: f64, limited: f64) -> Option<LifelineState> {
    let x: f64 = rng.random();
    Some(if x < ok {
        LifelineState::Ok
    } else if x < ok + limited {
        LifelineState::Limited
    } else {
        LifelineState::Out
    })
}

impl SimSite {
    pub(super) fn new(ward: &Ward, n: usize, mut rng: StdRng, interval: Duration) -> SimSite {
        let slug = ward.name_en.to_ascii_lowercase();
        let site = Id::new(format!("sim-{slug}-{n:03}")).expect("ward names and numbers make ids");
        let mean = ward
            .shelter_capacity_2024
            .map_or(DEFAULT_CAPACITY, |c| c / ward.shelters_2024.max(1))
            .clamp(150, 3000);
        let capacity = ((f64::from(mean) * rng.random_range(0.5..1.5)) as u32 / 10 * 10).max(50);
        let fullness = match rng.random_range(0..100) {
            0..70 => rng.random_range(0.3..0.85),
            70..90 => rng.random_range(0.85..1.0),
            _ => rng.random_range(1.0..1.15),
        };
        let power = match rng.random_range(0..100) {
            0..80 => PowerSource::Grid,
            80..94 => PowerSource::Generator,
            _ => PowerSource::Battery,
        };
        let lifelines = Lifelines {
            power: some_lifeline(&mut rng, 0.8, 0.15),
            water: some_lifeline(&mut rng, 0.6, 0.25),
            gas: some_lifeline(&mut rng, 0.5, 0.2),
            toilets: some_lifeline(&mut rng, 0.7, 0.25),
            comms: some_lifeline(&mut rng, 0.8, 0.15),
        };
        SimSite {
            site: SiteRef {
                ward: ward.code,
                site,
            },
            name: format!("{}第{n}避難所", ward.name_ja),
            location: GeoPoint {
                lat_e6: jitter_e6(&mut rng, ward.office_lat_e6, 22_000),
                lon_e6: jitter_e6(&mut rng, ward.office_lon_e6, 27_000),
            },
            capacity,
            interval_s: interval_secs(interval),
            started: Instant::now(),
            ticks: 0,
            opens_at: rng.random_range(0..12),
            target: (f64::from(capacity) * fullness) as u32,
            fill_rate: rng.random_range(0.08..0.3),
            evacuees: 0,
            opened_at: None,
            battery_pct: (power == PowerSource::Battery).then_some(100),
            power,
            lifelines,
            // About a day of water and food for the target population.
            water: capacity * WATER_PER_PERSON_DAY * rng.random_range(6..14) / 10,
            food: capacity * MEALS_PER_PERSON_DAY * rng.random_range(6..14) / 10,
            blankets: capacity * rng.random_range(3..9) / 10,
            next_request: 1,
            next_incident: 1,
            water_requested: false,
            beats: 0,
            speed: 1.0,
            carry: 0.0,
            quake: None,
            rng,
        }
    }

    /// Replaces the steady story by the earthquake timeline. Drawn after everything `new`
    /// draws, so the steady story of a seed stays what it was.
    pub(super) fn prepare_for_quake(&mut self, strike_beat: u32) {
        let rng = &mut self.rng;
        let prepares_at = rng.random_range(1..5);
        self.opens_at = prepares_at + rng.random_range(1..6);
        // A quake fills shelters beyond plan more often than the steady story does.
        let fullness = match rng.random_range(0..100) {
            0..50 => rng.random_range(0.4..0.8),
            50..80 => rng.random_range(0.8..1.0),
            _ => rng.random_range(1.0..1.15),
        };
        self.target = (f64::from(self.capacity) * fullness) as u32;
        self.fill_rate = rng.random_range(0.25..0.5);
        // Stock for a few hours of the target population: requests follow within the hour.
        self.water = self.target * WATER_PER_PERSON_DAY * rng.random_range(15..50) / 100;
        self.food = self.target * MEALS_PER_PERSON_DAY * rng.random_range(15..50) / 100;
        let power_fails_at = rng.random_bool(0.35).then(|| rng.random_range(1..4));
        let backup = if rng.random_bool(0.6) {
            PowerSource::Generator
        } else {
            PowerSource::Battery
        };
        let first_incident_at = rng.random_bool(0.3).then(|| rng.random_range(1..7));
        let silence = rng
            .random_bool(0.1)
            .then(|| (rng.random_range(3..13), rng.random_range(4..9)));
        let damaged = self.lifelines;
        self.lifelines = Lifelines {
            power: Some(LifelineState::Ok),
            water: Some(LifelineState::Ok),
            gas: Some(LifelineState::Ok),
            toilets: Some(LifelineState::Ok),
            comms: Some(LifelineState::Ok),
        };
        self.power = PowerSource::Grid;
        self.battery_pct = None;
        self.quake = Some(QuakeStory {
            strike_beat,
            prepares_at,
            power_fails_at,
            backup,
            damaged,
            first_incident_at,
            silence,
            food_requested: false,
            held: Vec::new(),
            was_silent: false,
        });
    }

    /// Whether the quake has struck (always, in the steady story).
    pub(super) fn struck(&self) -> bool {
        self.quake
            .as_ref()
            .is_none_or(|q| self.beats >= q.strike_beat)
    }

    /// Whether this heartbeat falls in the site's silence.
    pub(super) fn silent(&self) -> bool {
        self.quake.as_ref().is_some_and(|q| {
            q.silence.is_some_and(|(from, beats)| {
                let since = self.beats.saturating_sub(q.strike_beat);
                self.struck() && since >= from && since < from + beats
            })
        })
    }

    /// Story steps this heartbeat: `speed` on average, none before the quake.
    pub(super) fn steps_this_beat(&mut self) -> u32 {
        if !self.struck() {
            return 0;
        }
        self.carry += self.speed;
        let steps = self.carry.floor();
        self.carry -= steps;
        steps as u32
    }

    pub(super) fn state(&self) -> ShelterState {
        if let Some(q) = &self.quake {
            return if !self.struck() || self.ticks < q.prepares_at {
                ShelterState::NotOpen
            } else if self.ticks < self.opens_at {
                ShelterState::Preparing
            } else {
                ShelterState::Open
            };
        }
        if self.ticks + 1 < self.opens_at {
            ShelterState::NotOpen
        } else if self.ticks < self.opens_at {
            ShelterState::Preparing
        } else {
            ShelterState::Open
        }
    }

    pub fn evacuees(&self) -> u32 {
        self.evacuees
    }

    pub(super) fn status(&self) -> SiteStatus {
        SiteStatus {
            name: self.name.clone(),
            kind: SiteKind::Shelter,
            location: Some(self.location),
            hq: if !self.struck() {
                HqState::None
            } else if self.ticks >= 2 {
                HqState::Established
            } else {
                HqState::Alert
            },
            power: self.power,
            battery_pct: self.battery_pct,
            comms: Comms {
                internet: Some(LinkState::Ok),
                mobile: Some(if self.lifelines.comms == Some(LifelineState::Ok) {
                    LinkState::Ok
                } else {
                    LinkState::Degraded
                }),
                landline: None,
                radio: Some(LinkState::Ok),
            },
            interval_s: self.interval_s,
            uptime_s: Some(self.started.elapsed().as_secs()),
            queue_depth: None,
            outbox_alarm: false,
        }
    }

    pub(super) fn shelter(&self, now: Timestamp) -> ShelterStatus {
        let n = self.evacuees;
        let share = |pct: u32| Some(n * pct / 100);
        let open = self.state() == ShelterState::Open;
        ShelterStatus {
            shelter_type: ShelterType::Designated,
            state: self.state(),
            opened_at: self.opened_at,
            closed_at: None,
            capacity: Some(self.capacity),
            evacuees: Some(n),
            households: Some(n * 10 / 23),
            crowding: if open {
                crowding(Some(n), Some(self.capacity))
            } else {
                None
            },
            care: if open {
                CareNeeds {
                    elderly: share(12),
                    disabled: share(2),
                    infants: share(3),
                    pregnant: share(1),
                    medical: share(1),
                    foreign_language: share(2),
                    injured: share(1),
                }
            } else {
                CareNeeds::default()
            },
            pets: open.then_some(n / 40),
            lifelines: self.lifelines,
            building_safety: open.then_some(BuildingSafety::Safe),
            checked_at: Some(now),
        }
    }

    pub(super) fn supplies(&self) -> SupplyStock {
        let n = self.evacuees.max(1);
        SupplyStock {
            lines: vec![
                StockLine {
                    item: Item::Water,
                    on_hand: Some(self.water),
                    daily_need: Some(n * WATER_PER_PERSON_DAY),
                },
                StockLine {
                    item: Item::Food,
                    on_hand: Some(self.food),
                    daily_need: Some(n * MEALS_PER_PERSON_DAY),
                },
                StockLine {
                    item: Item::Blankets,
                    on_hand: Some(self.blankets),
                    daily_need: None,
                },
            ],
        }
    }

    /// One step of the story; returns the events it raised (requests, incidents).
    pub(super) fn advance(&mut self, now: Timestamp) -> Vec<Body> {
        self.ticks += 1;
        let mut events = Vec::new();
        if self.quake.is_some() {
            events.extend(self.after_the_quake());
        }
        if self.state() != ShelterState::Open {
            return events;
        }
        if self.opened_at.is_none() {
            self.opened_at = Some(now);
        }
        // Arrivals close part of the gap to the target; a few people come and go anyway.
        let gap = f64::from(self.target) - f64::from(self.evacuees);
        let moved = (gap * self.fill_rate).round() as i64 + self.rng.random_range(-2..=4);
        let cap = i64::from(self.capacity) * 6 / 5;
        self.evacuees = (i64::from(self.evacuees) + moved).clamp(0, cap) as u32;
        // Aftershocks and rumours move the target now and then.
        if self.rng.random_bool(0.02) {
            let f: f64 = self.rng.random_range(0.9..1.25);
            self.target = ((f64::from(self.target) * f) as u32).min(self.capacity * 6 / 5);
        }
        if let Some(b) = self.battery_pct
            && self.quake.is_none()
        {
            self.battery_pct = Some(b.saturating_sub(u8::from(self.rng.random_bool(0.3))).max(5));
        }

        let use_per_tick = |per_day: u32| (self.evacuees * per_day).div_ceil(TICKS_PER_DAY);
        self.water = self
            .water
            .saturating_sub(use_per_tick(WATER_PER_PERSON_DAY));
        self.food = self.food.saturating_sub(use_per_tick(MEALS_PER_PERSON_DAY));
        let water_days_tenths =
            u64::from(self.water) * 10 / u64::from((self.evacuees * WATER_PER_PERSON_DAY).max(1));
        if water_days_tenths < 5 && !self.water_requested {
            self.water_requested = true;
            let quantity = (self.evacuees * WATER_PER_PERSON_DAY * 2).max(100);
            events.push(self.request(Item::Water, quantity, "飲料水が残り半日分を切りました", now));
        } else if let Some(quantity) = self.food_running_out() {
            events.push(self.request(Item::Food, quantity, "食料が残り半日分を切りました", now));
        } else if self
            .rng
            .random_bool(if self.quake.is_some() { 0.02 } else { 0.004 })
        {
            let (item, note) = [
                (Item::Blankets, "夜間の冷え込みに備えて毛布が必要"),
                (Item::ChildDiapers, "乳幼児用おむつが不足"),
                (
                    Item::PortableToilets,
                    "トイレが使用できないため簡易トイレを要請",
                ),
                (Item::Medicine, "常備薬を切らした避難者がいます"),
                (Item::CardboardBeds, "高齢者用に段ボールベッドを要請"),
            ][self.rng.random_range(0..5)];
            let quantity = (self.evacuees / 4).max(10);
            events.push(self.request(item, quantity, note, now));
        }
        if self
            .rng
            .random_bool(if self.quake.is_some() { 0.01 } else { 0.0015 })
        {
            events.push(self.incident());
        }
        events
    }

    /// The quake's own steps, open or not: lifelines fail, the grid goes, batteries drain, an
    /// incident is seen nearby.
    pub(super) fn after_the_quake(&mut self) -> Vec<Body> {
        let Some(q) = &self.quake else {
            return Vec::new();
        };
        let (damaged, fails_at, backup, incident_at) =
            (q.damaged, q.power_fails_at, q.backup, q.first_incident_at);
        let mut events = Vec::new();
        if self.ticks == 1 {
            self.lifelines = damaged;
        }
        if fails_at == Some(self.ticks) {
            self.power = backup;
            self.lifelines.power = Some(if backup == PowerSource::Battery {
                LifelineState::Out
            } else {
                LifelineState::Limited
            });
            if backup == PowerSource::Battery {
                self.battery_pct = Some(100);
            }
        }
        if let Some(b) = self.battery_pct {
            self.battery_pct = Some(b.saturating_sub(self.rng.random_range(1..5)).max(5));
        }
        if incident_at == Some(self.ticks) {
            events.push(self.incident());
        }
        events
    }

    /// The quantity to ask for when food falls below half a day, once (earthquake only).
    pub(super) fn food_running_out(&mut self) -> Option<u32> {
        let q = self.quake.as_mut()?;
        let need = (self.evacuees * MEALS_PER_PERSON_DAY).max(1);
        if q.food_requested || u64::from(self.food) * 10 / u64::from(need) >= 5 {
            return None;
        }
        q.food_requested = true;
        Some((self.evacuees * MEALS_PER_PERSON_DAY * 2).max(100))
    }

    pub(super) fn request(
        &mut self,
        item: Item,
        quantity: u32,
        note: &str,
        now: Timestamp,
    ) -> Body {
        let request_id = Id::new(format!("req-{:04}", self.next_request)).expect("request ids");
        self.next_request += 1;
        Body::Request(SupplyRequest {
            request_id,
            item,
            quantity,
            fulfilled: 0,
            state: RequestState::Requested,
            needed_by: Some(now.plus_secs(6 * 3600)),
            note: note.into(),
        })
    }

    pub(super) fn incident(&mut self) -> Body {
        let incident_id = Id::new(format!("inc-{:04}", self.next_incident)).expect("incident ids");
        self.next_incident += 1;
        let (category, description, severity) = [
            (
                IncidentCategory::Fire,
                "避難所近くで火災発生",
                Severity::Severe,
            ),
            (
                IncidentCategory::BuildingCollapse,
                "近隣の木造家屋が倒壊",
                Severity::Severe,
            ),
            (
                IncidentCategory::Road,
                "前面道路に亀裂、車両通行困難",
                Severity::Moderate,
            ),
            (
                IncidentCategory::Lifeline,
                "周辺一帯で断水",
                Severity::Moderate,
            ),
            (IncidentCategory::Flood, "地下道が冠水", Severity::Minor),
        ][self.rng.random_range(0..5)];
        let counts = match category {
            IncidentCategory::BuildingCollapse => DamageCounts {
                houses_destroyed: Some(self.rng.random_range(1..4)),
                injured_minor: Some(self.rng.random_range(0..5)),
                ..DamageCounts::default()
            },
            IncidentCategory::Lifeline => DamageCounts {
                without_water: Some(self.rng.random_range(50..2000)),
                ..DamageCounts::default()
            },
            _ => DamageCounts::default(),
        };
        Body::Incident(IncidentReport {
            incident_id,
            category,
            location: Some(GeoPoint {
                lat_e6: jitter_e6(&mut self.rng, self.location.lat_e6, 3_000),
                lon_e6: jitter_e6(&mut self.rng, self.location.lon_e6, 3_000),
            }),
            address: None,
            counts,
            road: (category == IncidentCategory::Road).then_some(RoadState::Restricted),
            severity,
            certainty: Certainty::Observed,
            version: ReportVersion::First,
            description: description.into(),
        })
    }
}
