//! Many simulated shelters in one process, for drills, demos and load tests.
//!
//! [`plan`] spreads N sites over the 23 wards in proportion to each ward's designated shelters
//! ([`apportion`], largest remainder, at least one per ward once N ≥ 23), and gives each a
//! name, a place near its ward office, a capacity and its own random stream, all derived from
//! one seed: the same seed gives the same sites and the same story tick by tick.
//!
//! The story of one [`SimSite`], one step per heartbeat: closed at first, preparing, then open
//! after a short random delay; evacuees arrive quickly and then settle towards a target, which
//! for some shelters is near or above capacity (crowded, full); water and food are consumed
//! (one tick is ten minutes of shelter life, so stock visibly falls) and a low stock or a
//! random need raises a supply request; now and then an incident is reported nearby.
//!
//! That is the `steady` scenario (the default): a disaster already under way from the first
//! heartbeat. The `earthquake` scenario ([`Scenario::Earthquake`]) plays a timeline instead,
//! the same for a seed:
//!
//! - before the quake (`--quake-at`): every shelter not open, HQ not set up, grid power, all
//!   lifelines working, heartbeats only;
//! - the quake: HQ goes to alert, then established; lifelines fail at many sites; about a
//!   third lose the grid and run on a generator or on a battery that drains;
//! - shelters prepare and open, staggered over the following steps, and fill fast towards a
//!   target that is crowded or above capacity for about half of them; stock was low to start
//!   with, so water and food requests follow as it runs down, with other requests now and then;
//! - some sites report an incident nearby soon after the quake, and more later;
//! - about one site in ten goes silent for four to eight heartbeats (long enough for HQ to
//!   mark it silent), keeping what happened meanwhile, then comes back with its full state.
//!
//! `--speed` sets the story steps per heartbeat (2.0 plays the timeline twice as fast); the
//! quake itself strikes at its wall-clock time whatever the speed.
//!
//! Every site has its own MQTT connection ([`crate::link::run_site`]): a connection carries
//! exactly one last will, and the broker lets a client publish only under its own site, so
//! sharing connections would lose per-site death and break access control. A few hundred to a
//! couple of thousand connections are well within one tokio runtime and one broker.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use renkei_shared::{
    Body, GeoPoint, Lifelines, Mode, PowerSource, ShelterState, SiteRef, Timestamp,
};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{BrokerAddr, Credentials};
use crate::lifecycle::Lifecycle;
use crate::link::{LinkError, LinkOptions, run_site};
use crate::report::{Site, interval_secs};

mod plan;
mod story;

pub use plan::{apportion, plan, plan_scenario};
use story::QuakeStory;

/// One simulated shelter and where its story stands.
#[derive(Debug, Clone, PartialEq)]
pub struct SimSite {
    pub site: SiteRef,
    pub name: String,
    pub location: GeoPoint,
    pub capacity: u32,
    interval_s: u32,
    rng: StdRng,
    started: Instant,
    ticks: u32,
    /// The tick at which the shelter opens (preparing the tick before).
    opens_at: u32,
    /// The number of evacuees the shelter tends towards.
    target: u32,
    /// Share of the gap to `target` that closes each tick.
    fill_rate: f64,
    evacuees: u32,
    opened_at: Option<Timestamp>,
    power: PowerSource,
    battery_pct: Option<u8>,
    lifelines: Lifelines,
    water: u32,
    food: u32,
    blankets: u32,
    next_request: u32,
    next_incident: u32,
    /// Whether a water request is open (so a low stock asks once).
    water_requested: bool,
    /// Heartbeats so far.
    beats: u32,
    /// Story steps per heartbeat, and the part of a step carried over to the next one.
    speed: f64,
    carry: f64,
    /// The earthquake timeline, when that is the scenario.
    quake: Option<QuakeStory>,
}

/// Which story the simulated sites play.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// A disaster under way from the first heartbeat (the default).
    Steady,
    /// Calm until the quake strikes `quake_at` after start, then the timeline of the module doc.
    Earthquake { quake_at: Duration },
}

impl Scenario {
    /// The heartbeat on which the quake strikes: the first at or after `quake_at`.
    fn strike_beat(quake_at: Duration, interval: Duration) -> u32 {
        let interval = interval.as_millis().max(1);
        u32::try_from(quake_at.as_millis().div_ceil(interval)).unwrap_or(u32::MAX)
    }
}

impl Site for SimSite {
    fn full_state(&mut self, now: Timestamp) -> Vec<Body> {
        vec![
            Body::Status(self.status()),
            Body::Shelter(self.shelter(now)),
            Body::Supplies(self.supplies()),
        ]
    }

    /// The heartbeat's messages; none while the site is silent (HQ must notice).
    fn tick(&mut self, now: Timestamp) -> Vec<Body> {
        self.beats += 1;
        let before = (self.state(), self.evacuees, self.ticks);
        let mut events = Vec::new();
        for _ in 0..self.steps_this_beat() {
            events.extend(self.advance(now));
        }
        if self.silent() {
            if let Some(q) = &mut self.quake {
                q.held.extend(events);
                q.was_silent = true;
            }
            return Vec::new();
        }
        if let Some(q) = &mut self.quake
            && q.was_silent
        {
            // Back: everything HQ may have given up on, then what happened meanwhile.
            q.was_silent = false;
            let held = std::mem::take(&mut q.held);
            let mut bodies = self.full_state(now);
            bodies.extend(held);
            bodies.extend(events);
            return bodies;
        }
        let mut bodies = vec![Body::Status(self.status())];
        if (self.state(), self.evacuees) != (before.0, before.1) {
            bodies.push(Body::Shelter(self.shelter(now)));
        }
        // Every third story step (whatever the speed), once open.
        if self.ticks / 3 != before.2 / 3 && self.state() == ShelterState::Open {
            bodies.push(Body::Supplies(self.supplies()));
        }
        bodies.extend(events);
        bodies
    }

    fn set_interval(&mut self, interval: Duration) {
        self.interval_s = interval_secs(interval);
    }
}

/// Settings of `renkei-agent simulate`.
#[derive(Debug, Clone)]
pub struct SimOptions {
    pub broker: BrokerAddr,
    /// Every site in this ward (a ward office's own sites), instead of across the 23.
    pub only_ward: Option<renkei_shared::WardCode>,
    /// Sites of these wards report to their ward's own broker instead.
    pub ward_brokers: std::collections::HashMap<renkei_shared::WardCode, BrokerAddr>,
    /// For an `mqtts://` broker, shared by every site.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// Shared by every site; `{ward}` and `{site}` in the user name are replaced per site.
    pub credentials: Option<Credentials>,
    pub sites: usize,
    pub seed: u64,
    pub interval: Duration,
    pub scenario: Scenario,
    /// Story steps per heartbeat (1.0: one).
    pub speed: f64,
    pub mode: Mode,
    /// The boot id of the whole simulation is raised here at every start.
    pub boot: u32,
}

/// Starts every simulated site; each runs until `shutdown` turns true.
pub fn spawn(
    options: &SimOptions,
    shutdown: &watch::Receiver<bool>,
) -> JoinSet<Result<(), LinkError>> {
    let mut tasks = JoinSet::new();
    let sites = plan_scenario(
        options.sites,
        options.seed,
        options.interval,
        options.scenario,
        options.speed,
        options.only_ward,
    );
    for (i, site) in sites.into_iter().enumerate() {
        let credentials = options.credentials.as_ref().map(|c| Credentials {
            username: c
                .username
                .replace("{ward}", &site.site.ward.to_string())
                .replace("{site}", site.site.site.as_str()),
            password: c.password.clone(),
        });
        let link = LinkOptions {
            broker: options
                .ward_brokers
                .get(&site.site.ward)
                .unwrap_or(&options.broker)
                .clone(),
            credentials,
            client_id: site.site.agent_client_id(),
            tls: options.tls.clone(),
        };
        let lifecycle = Lifecycle::new(site.site.clone(), options.boot, options.mode);
        let interval = options.interval;
        let shutdown = shutdown.clone();
        // Spread the connects: a broker accepts on the order of a thousand per second.
        let delay = Duration::from_millis(2) * u32::try_from(i).unwrap_or(u32::MAX);
        let span = tracing::info_span!("site", site = %site.site.site);
        tasks.spawn(tracing::Instrument::instrument(
            async move {
                tokio::time::sleep(delay).await;
                run_site(link, lifecycle, site, interval, shutdown).await
            },
            span,
        ));
    }
    tasks
}

#[cfg(test)]
mod tests {
    use renkei_shared::validate::validate_for_topic;
    use renkei_shared::{Crowding, HqState, Item, Topic, WARDS, decode};

    use super::*;
    use crate::report::crowding;
    use crate::report::frame;

    fn weights() -> Vec<u32> {
        WARDS.iter().map(|w| w.shelters_2024).collect()
    }

    #[test]
    fn apportionment_sums_to_n_and_gives_every_ward_a_site_from_23() {
        for n in [0, 1, 5, 22, 23, 24, 50, 100, 300, 1000, 1698, 2000, 5000] {
            let seats = apportion(n, &weights());
            assert_eq!(seats.iter().sum::<usize>(), n, "n = {n}");
            if n >= 23 {
                assert!(seats.iter().all(|&s| s >= 1), "n = {n}: {seats:?}");
            }
        }
        assert_eq!(apportion(23, &weights()), vec![1; 23]);
    }

    #[test]
    fn apportionment_is_proportional() {
        let w = weights();
        let sum: f64 = w.iter().map(|&x| f64::from(x)).sum();
        // At the surveyed total, every ward gets exactly its surveyed shelters.
        assert_eq!(
            apportion(1698, &w),
            w.iter().map(|&x| x as usize).collect::<Vec<_>>()
        );
        for n in [300, 1000, 2000] {
            let seats = apportion(n, &w);
            for (i, &s) in seats.iter().enumerate() {
                let quota = n as f64 * f64::from(w[i]) / sum;
                assert!(
                    (s as f64 - quota).abs() < 1.0,
                    "n={n} ward {i}: {s} vs {quota}"
                );
            }
        }
        // 大田区 (217 shelters) gets the most, 千代田区 (16) the fewest.
        let seats = apportion(300, &w);
        let ota = WARDS.iter().position(|w| w.name_en == "Ota").unwrap();
        let chiyoda = WARDS.iter().position(|w| w.name_en == "Chiyoda").unwrap();
        assert_eq!(seats.iter().max(), Some(&seats[ota]));
        assert_eq!(seats.iter().min(), Some(&seats[chiyoda]));
        // Small sizes favour the largest wards.
        let five = apportion(5, &w);
        assert_eq!(five[ota], 1);
        assert_eq!(five[chiyoda], 0);
        assert_eq!(apportion(3, &[0, 0, 0]), vec![1, 1, 1]);
        assert_eq!(apportion(7, &[]), Vec::<usize>::new());
    }

    #[test]
    fn a_ward_offices_sites_are_all_in_its_ward() {
        let shinjuku = renkei_shared::WardCode(131041);
        let sites = plan_scenario(
            100,
            7,
            Duration::from_secs(1),
            Scenario::Steady,
            1.0,
            Some(shinjuku),
        );
        assert_eq!(sites.len(), 100);
        assert!(sites.iter().all(|s| s.site.ward == shinjuku));
    }

    #[test]
    fn plans_are_deterministic_for_a_seed() {
        let a = plan(60, 42, Duration::from_secs(5));
        let b = plan(60, 42, Duration::from_secs(5));
        let c = plan(60, 43, Duration::from_secs(5));
        let describe = |p: &[SimSite]| -> Vec<(SiteRef, String, GeoPoint, u32)> {
            p.iter()
                .map(|s| (s.site.clone(), s.name.clone(), s.location, s.capacity))
                .collect()
        };
        assert_eq!(describe(&a), describe(&b));
        assert_ne!(describe(&a), describe(&c));
        assert_eq!(a.len(), 60);
        let wards: std::collections::BTreeSet<_> = a.iter().map(|s| s.site.ward).collect();
        assert_eq!(wards.len(), 23);
        let ids: std::collections::BTreeSet<_> = a.iter().map(|s| s.site.clone()).collect();
        assert_eq!(ids.len(), 60, "site ids are unique");
        assert!(a.iter().any(|s| s.name == "新宿区第1避難所"));

        // The stories too, tick by tick.
        let story = |mut p: Vec<SimSite>| -> Vec<Vec<Body>> {
            (0..40)
                .flat_map(|t| {
                    p.iter_mut()
                        .map(move |s| s.tick(Timestamp(1_000 * t)))
                        .collect::<Vec<_>>()
                })
                .map(|mut bodies| {
                    // Uptime is wall-clock; everything else must match.
                    if let Some(Body::Status(s)) = bodies.first_mut() {
                        s.uptime_s = None;
                    }
                    bodies
                })
                .collect()
        };
        assert_eq!(story(a), story(b));
    }

    #[test]
    fn shelters_open_fill_and_stay_plausible() {
        let mut sites = plan(200, 7, Duration::from_secs(5));
        let mut requests = 0;
        for t in 0..60 {
            for s in &mut sites {
                for body in s.tick(Timestamp(t)) {
                    requests += usize::from(matches!(body, Body::Request(_)));
                }
            }
        }
        let open = sites
            .iter()
            .filter(|s| s.state() == ShelterState::Open)
            .count();
        assert_eq!(open, 200, "every shelter opens within 12 ticks");
        let crowded = sites
            .iter()
            .filter(|s| s.evacuees * 100 >= s.capacity * 80)
            .count();
        assert!(crowded > 10 && crowded < 150, "{crowded} crowded");
        assert!(sites.iter().all(|s| s.evacuees <= s.capacity * 6 / 5));
        assert!(requests > 0);
    }

    #[test]
    fn numbers_move_within_the_first_ticks() {
        let mut sites = plan(30, 1, Duration::from_secs(5));
        for t in 0..3 {
            for s in &mut sites {
                s.tick(Timestamp(t));
            }
        }
        assert!(sites.iter().filter(|s| s.evacuees() > 0).count() >= 3);
    }

    const QUAKE_BEAT: u32 = 3;

    fn quake_plan(sites: usize, seed: u64, speed: f64) -> Vec<SimSite> {
        // 15 s at a 5 s heartbeat: the quake strikes on the third heartbeat.
        let quake = Scenario::Earthquake {
            quake_at: Duration::from_secs(15),
        };
        plan_scenario(sites, seed, Duration::from_secs(5), quake, speed, None)
    }

    /// The bodies of `beats` heartbeats of every site, uptime (wall-clock) blanked.
    fn run_story(sites: &mut [SimSite], beats: u32) -> Vec<Vec<Vec<Body>>> {
        (1..=beats)
            .map(|t| {
                sites
                    .iter_mut()
                    .map(|s| {
                        let mut bodies = s.tick(Timestamp(1_788_220_800_000 + i64::from(t)));
                        for b in &mut bodies {
                            if let Body::Status(st) = b {
                                st.uptime_s = None;
                            }
                        }
                        bodies
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn the_earthquake_story_is_the_same_for_a_seed() {
        let story = |seed| run_story(&mut quake_plan(80, seed, 1.0), 40);
        let a = story(11);
        assert_eq!(a, story(11));
        assert_ne!(a, story(12));
        // The steady story of a seed is unchanged by the scenario machinery.
        let steady = |seed| run_story(&mut plan(40, seed, Duration::from_secs(5)), 20);
        let explicit = run_story(
            &mut plan_scenario(40, 5, Duration::from_secs(5), Scenario::Steady, 1.0, None),
            20,
        );
        assert_eq!(steady(5), explicit);
    }

    #[test]
    fn the_quake_strikes_on_the_heartbeat_at_or_after_its_time() {
        let s = Duration::from_secs;
        assert_eq!(Scenario::strike_beat(s(15), s(5)), 3);
        assert_eq!(Scenario::strike_beat(s(16), s(5)), 4);
        assert_eq!(Scenario::strike_beat(s(1), s(1)), 1);
        assert_eq!(Scenario::strike_beat(s(0), s(5)), 0);
    }

    #[test]
    fn every_phase_of_the_earthquake_happens() {
        let mut sites = quake_plan(200, 2026, 1.0);
        let n = sites.len();
        let beats = 60;
        let story = run_story(&mut sites, beats);

        let mut states: Vec<Vec<ShelterState>> = vec![Vec::new(); n];
        let mut power_seen: Vec<Vec<PowerSource>> = vec![Vec::new(); n];
        // Per site, the heartbeats that sent nothing.
        let mut silent: std::collections::BTreeMap<usize, Vec<u32>> = Default::default();
        let (mut requests, mut incidents, mut food_requests) = (0, 0, 0);
        let mut min_battery = 100;
        for (beat, per_site) in (1..=beats).zip(&story) {
            for (i, bodies) in per_site.iter().enumerate() {
                let site = &sites[i];
                if bodies.is_empty() {
                    silent.entry(i).or_default().push(beat);
                    continue;
                }
                for body in bodies {
                    match body {
                        Body::Status(st) => {
                            power_seen[i].push(st.power);
                            if beat < QUAKE_BEAT {
                                assert_eq!(st.hq, HqState::None);
                                assert_eq!(st.power, PowerSource::Grid);
                            } else if beat >= QUAKE_BEAT + 2 {
                                assert_eq!(st.hq, HqState::Established);
                            }
                            if let Some(b) = st.battery_pct {
                                min_battery = min_battery.min(b);
                            }
                        }
                        Body::Shelter(sh) => states[i].push(sh.state),
                        Body::Request(r) => {
                            assert!(beat >= QUAKE_BEAT, "no request before the quake");
                            requests += 1;
                            food_requests += usize::from(r.item == Item::Food);
                        }
                        Body::Incident(inc) => {
                            assert!(beat >= QUAKE_BEAT, "no incident before the quake");
                            incidents += 1;
                            // Near the shelter, so within its ward's reach.
                            let at = inc.location.unwrap();
                            assert!((at.lat_e6 - site.location.lat_e6).abs() <= 3_000);
                            assert!((at.lon_e6 - site.location.lon_e6).abs() <= 3_000);
                        }
                        _ => {}
                    }
                }
                if beat < QUAKE_BEAT {
                    assert_eq!(bodies.len(), 1, "heartbeats only before the quake");
                }
            }
        }
        // Shelters go not_open → preparing → open, in that order, staggered (a site silent
        // meanwhile shows HQ only where it got to).
        let mut model = quake_plan(200, 2026, 1.0);
        let mut path: Vec<Vec<ShelterState>> = vec![vec![ShelterState::NotOpen]; n];
        for _ in 0..beats {
            for (i, s) in model.iter_mut().enumerate() {
                s.tick(Timestamp(0));
                if path[i].last() != Some(&s.state()) {
                    path[i].push(s.state());
                }
            }
        }
        let phases = [
            ShelterState::NotOpen,
            ShelterState::Preparing,
            ShelterState::Open,
        ];
        assert!(path.iter().all(|p| p[..] == phases), "{path:?}");
        for (i, seen) in states.iter().enumerate() {
            let mut order: Vec<ShelterState> = seen.clone();
            order.dedup();
            assert!(
                order == phases[1..] || order == phases[2..],
                "site {i}: {seen:?}"
            );
        }
        let preparing_seen = states
            .iter()
            .filter(|s| s.contains(&ShelterState::Preparing))
            .count();
        assert!(preparing_seen >= n * 8 / 10, "{preparing_seen} of {n}");
        let open_beats: std::collections::BTreeSet<u32> =
            sites.iter().map(|s| s.opens_at).collect();
        assert!(
            open_beats.len() >= 4,
            "openings are staggered: {open_beats:?}"
        );
        // Evacuees rise towards their targets; some shelters crowded, some full.
        let levels: Vec<Option<Crowding>> = sites
            .iter()
            .map(|s| crowding(Some(s.evacuees), Some(s.capacity)))
            .collect();
        let count = |c| levels.iter().filter(|&&x| x == Some(c)).count();
        assert!(count(Crowding::Crowded) >= 20, "{levels:?}");
        assert!(count(Crowding::Full) >= 10, "{levels:?}");
        assert!(count(Crowding::Vacant) >= 40, "{levels:?}");
        // The grid fails at a share of sites; batteries drain.
        let lost_grid = power_seen
            .iter()
            .filter(|p| p.contains(&PowerSource::Grid) && p.last() != Some(&PowerSource::Grid))
            .count();
        assert!((40..=110).contains(&lost_grid), "{lost_grid} lost the grid");
        assert!(
            power_seen
                .iter()
                .any(|p| p.last() == Some(&PowerSource::Generator))
        );
        assert!(
            power_seen
                .iter()
                .any(|p| p.last() == Some(&PowerSource::Battery))
        );
        assert!(min_battery < 50, "batteries drain: lowest {min_battery}");
        // Requests as stock runs down; incidents near the wards.
        assert!(requests >= 100, "{requests} requests");
        assert!(food_requests >= 20, "{food_requests} food requests");
        assert!(incidents >= 30, "{incidents} incidents");
        // Some sites go silent for long enough to be marked silent, then come back with their
        // full state.
        assert!(silent.len() >= 5 && silent.len() <= 40, "{silent:?}");
        for (&i, beats) in &silent {
            let (from, len) = (beats[0], beats.len() as u32);
            // One run, after the quake, of at least three intervals (HQ's silence rule).
            assert_eq!(beats[beats.len() - 1], from + len - 1, "{beats:?}");
            assert!(from > QUAKE_BEAT && (4..=8).contains(&len), "{beats:?}");
            // story[k] is heartbeat k + 1: the one after the last silent heartbeat.
            let back = &story[(from + len - 1) as usize][i];
            assert!(matches!(back[0], Body::Status(_)), "{back:?}");
            assert!(matches!(back[1], Body::Shelter(_)), "{back:?}");
            assert!(matches!(back[2], Body::Supplies(_)), "{back:?}");
        }
    }

    #[test]
    fn speed_plays_the_timeline_faster_but_the_quake_strikes_on_time() {
        let open_after = |speed: f64, beats: u32| {
            let mut sites = quake_plan(100, 9, speed);
            run_story(&mut sites, beats);
            sites
                .iter()
                .filter(|s| s.state() == ShelterState::Open)
                .count()
        };
        assert_eq!(
            open_after(4.0, QUAKE_BEAT - 1),
            0,
            "nothing before the quake"
        );
        assert_eq!(open_after(1.0, QUAKE_BEAT), 0, "no shelter opens at once");
        assert!(open_after(4.0, QUAKE_BEAT + 1) > 30);
        assert!(open_after(2.0, QUAKE_BEAT + 4) > open_after(1.0, QUAKE_BEAT + 4));
        assert!(open_after(0.5, QUAKE_BEAT + 4) < open_after(1.0, QUAKE_BEAT + 4));
    }

    /// Every message a simulated site can send is valid on its topic.
    #[test]
    fn every_simulated_message_is_valid_on_its_topic() {
        let mut sites = plan(100, 3, Duration::from_secs(5));
        sites.extend(quake_plan(100, 3, 1.5));
        let mut kinds = std::collections::BTreeSet::new();
        for s in &mut sites {
            let mut life = Lifecycle::new(s.site.clone(), 1, Mode::Exercise);
            let mut bodies = s.full_state(Timestamp(1));
            for t in 0..200 {
                bodies.extend(s.tick(Timestamp(1_788_220_800_000 + t)));
            }
            for body in bodies {
                let env = life.stamp(body, Timestamp(1_788_220_800_000));
                let out = frame(&env).unwrap();
                let topic = Topic::parse(&out.topic).unwrap();
                validate_for_topic(&env, &topic).unwrap();
                assert_eq!(decode(&out.payload).unwrap(), env);
                kinds.insert(env.body.kind());
            }
        }
        assert!(kinds.len() >= 5, "{kinds:?}");
    }
}
