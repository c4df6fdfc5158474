//! What a site reports, and how a report becomes an MQTT publish.
//!
//! A [`Site`] gives the bodies to send: its full state after every birth (so a dashboard that
//! lost everything can draw the site again) and what to send on each heartbeat tick. The
//! [`crate::link`] stamps them with [`crate::lifecycle::Lifecycle`] and [`frame`]s them.
//! [`FixedSite`] is the site of `renkei-agent run`, reporting what its staff configured;
//! `crate::simulate` has sites whose figures move by themselves.

use std::time::{Duration, Instant};

use renkei_shared::{
    Body, Comms, Crowding, GeoPoint, HqState, ShelterStatus, ShelterType, SiteKind, SiteStatus,
    Timestamp,
};

use crate::config::AgentConfig;
use crate::power::PowerProbe;

/// What one site says.
pub trait Site: Send {
    /// Everything HQ needs to draw the site from scratch: sent after every birth.
    fn full_state(&mut self, now: Timestamp) -> Vec<Body>;
    /// What to send on a heartbeat tick: at least the status, or nothing at all for a
    /// simulated site playing an outage (HQ must see it fall silent).
    fn tick(&mut self, now: Timestamp) -> Vec<Body>;
    /// HQ changed the heartbeat interval; the status must say so from now on.
    fn set_interval(&mut self, interval: Duration);
}

/// A message ready to publish, why one of ours cannot be, and the framing of an envelope
/// onto its topic: the link's, shared with every hop.
pub use renkei_link::{FrameError, Outgoing, frame};

/// Crowding from occupancy: full at capacity, crowded from [`CROWDED_PCT`].
pub fn crowding(evacuees: Option<u32>, capacity: Option<u32>) -> Option<Crowding> {
    let (n, cap) = (u64::from(evacuees?), u64::from(capacity?));
    if cap == 0 {
        return None;
    }
    let pct = n * 100 / cap;
    Some(if pct >= 100 {
        Crowding::Full
    } else if pct >= CROWDED_PCT {
        Crowding::Crowded
    } else {
        Crowding::Vacant
    })
}

/// Occupancy (percent) from which a shelter reports itself crowded (混雑).
pub const CROWDED_PCT: u64 = 80;

/// Seconds of a heartbeat interval as the status carries them (at least 1).
pub fn interval_secs(interval: Duration) -> u32 {
    u32::try_from(interval.as_secs()).unwrap_or(u32::MAX).max(1)
}

/// The site of `renkei-agent run`: reports what its configuration says.
#[derive(Debug, Clone)]
pub struct FixedSite {
    name: String,
    kind: SiteKind,
    location: Option<GeoPoint>,
    interval_s: u32,
    started: Instant,
    shelter: Option<ShelterStatus>,
    /// Records waiting in the outbox, where there is one (`run`).
    queue_depth: Option<u32>,
    /// The outbox (or its disk) is refusing reports: HQ should call the site.
    outbox_alarm: bool,
    /// Read on every heartbeat, so a power cut shows on the next one.
    power: PowerProbe,
    hq: HqState,
    comms: Comms,
}

impl FixedSite {
    pub fn from_config(config: &AgentConfig, now: Timestamp) -> FixedSite {
        let shelter = config.shelter.as_ref().map(|s| ShelterStatus {
            shelter_type: ShelterType::Designated,
            state: s.state,
            opened_at: None,
            closed_at: None,
            capacity: s.capacity,
            evacuees: s.evacuees,
            households: None,
            crowding: crowding(s.evacuees, s.capacity),
            care: Default::default(),
            pets: None,
            lifelines: Default::default(),
            building_safety: None,
            checked_at: Some(now),
        });
        FixedSite {
            name: config.name.clone(),
            kind: config.kind,
            location: config.location,
            interval_s: interval_secs(config.interval),
            started: Instant::now(),
            shelter,
            queue_depth: None,
            outbox_alarm: false,
            power: config.power.clone(),
            hq: config.hq,
            comms: config.comms,
        }
    }

    /// The shelter figures from the configuration, if any: the site's state until staff
    /// report.
    pub fn configured_shelter(&self) -> Option<&ShelterStatus> {
        self.shelter.as_ref()
    }

    /// The outbox depth the next status carries.
    pub fn set_queue_depth(&mut self, depth: u64) {
        self.queue_depth = Some(u32::try_from(depth).unwrap_or(u32::MAX));
    }

    /// Whether the next status says the outbox is refusing reports.
    pub fn set_outbox_alarm(&mut self, alarm: bool) {
        self.outbox_alarm = alarm;
    }

    /// The heartbeat: power and battery from the OS where it says, else as configured; HQ
    /// state and comms as configured; unknown where nobody said.
    pub fn status(&self) -> SiteStatus {
        let (power, battery_pct) = self.power.read();
        SiteStatus {
            name: self.name.clone(),
            kind: self.kind,
            location: self.location,
            hq: self.hq,
            power,
            battery_pct,
            comms: self.comms,
            interval_s: self.interval_s,
            uptime_s: Some(self.started.elapsed().as_secs()),
            queue_depth: self.queue_depth,
            outbox_alarm: self.outbox_alarm,
        }
    }
}

impl Site for FixedSite {
    fn full_state(&mut self, _now: Timestamp) -> Vec<Body> {
        let mut bodies = vec![Body::Status(self.status())];
        bodies.extend(self.shelter.clone().map(Body::Shelter));
        bodies
    }

    fn tick(&mut self, _now: Timestamp) -> Vec<Body> {
        vec![Body::Status(self.status())]
    }

    fn set_interval(&mut self, interval: Duration) {
        self.interval_s = interval_secs(interval);
    }
}

#[cfg(test)]
mod tests {
    use renkei_shared::validate::validate_for_topic;
    use renkei_shared::{Envelope, LinkState, Mode, PowerSource, ShelterState, Topic, decode};

    use super::*;
    use crate::config::ConfigFile;
    use crate::lifecycle::Lifecycle;

    fn config(extra: &str) -> AgentConfig {
        let text = format!(
            "broker = \"mqtt://localhost\"\nward = 131041\nsite = \"nishi-shinjuku-es\"\n\
             name = \"西新宿小学校\"\n{extra}"
        );
        ConfigFile::parse(std::path::Path::new("agent.toml"), &text)
            .unwrap()
            .resolve()
            .unwrap()
    }

    /// Stamps, frames and decodes every body, checking it is valid on the topic it goes to.
    fn send_all(life: &mut Lifecycle, bodies: Vec<Body>) -> Vec<Envelope> {
        bodies
            .into_iter()
            .map(|b| {
                let env = life.stamp(b, Timestamp(1_788_220_800_000));
                let out = frame(&env).unwrap();
                let topic = Topic::parse(&out.topic).unwrap();
                validate_for_topic(&env, &topic).unwrap();
                assert_eq!(out.retain, topic.retained());
                assert_eq!(decode(&out.payload).unwrap(), env);
                env
            })
            .collect()
    }

    #[test]
    fn a_shelter_reports_status_and_shelter_state() {
        let cfg =
            config("evacuees = 120\ncapacity = 450\nshelter_state = \"open\"\ninterval = \"10s\"");
        let mut site = FixedSite::from_config(&cfg, Timestamp(0));
        let mut life = Lifecycle::new(cfg.site.clone(), 1, Mode::Actual);
        let sent = send_all(&mut life, site.full_state(Timestamp(0)));
        assert_eq!(sent.len(), 2);
        let Body::Status(status) = &sent[0].body else {
            panic!("first is the status")
        };
        assert_eq!(status.name, "西新宿小学校");
        assert_eq!(status.kind, SiteKind::Shelter);
        assert_eq!(status.interval_s, 10);
        let Body::Shelter(shelter) = &sent[1].body else {
            panic!("second is the shelter")
        };
        assert_eq!(shelter.state, ShelterState::Open);
        assert_eq!(shelter.evacuees, Some(120));
        assert_eq!(shelter.capacity, Some(450));
        assert_eq!(shelter.crowding, Some(Crowding::Vacant));

        site.set_interval(Duration::from_secs(5));
        let ticked = send_all(&mut life, site.tick(Timestamp(0)));
        let [Body::Status(status)] = &ticked.iter().map(|e| e.body.clone()).collect::<Vec<_>>()[..]
        else {
            panic!("a tick is one status")
        };
        assert_eq!(status.interval_s, 5);
    }

    #[test]
    fn the_heartbeat_carries_power_from_the_os_else_as_configured() {
        let sysfs = tempfile::tempdir().unwrap();
        let bat = sysfs.path().join("BAT0");
        std::fs::create_dir(&bat).unwrap();
        std::fs::write(bat.join("type"), "Battery\n").unwrap();
        std::fs::write(bat.join("status"), "Discharging\n").unwrap();
        std::fs::write(bat.join("capacity"), "37\n").unwrap();
        let dir = sysfs.path().display();
        let cfg = config(&format!(
            "power = \"generator\"\nbattery_pct = 80\nhq = \"established\"\n\
             internet = \"down\"\nmobile = \"degraded\"\npower_supply_dir = \"{dir}\""
        ));
        let site = FixedSite::from_config(&cfg, Timestamp(0));
        let status = site.status();
        assert_eq!(
            (status.power, status.battery_pct),
            (PowerSource::Battery, Some(37))
        );
        assert_eq!(status.hq, HqState::Established);
        assert_eq!(status.comms.internet, Some(LinkState::Down));
        assert_eq!(status.comms.mobile, Some(LinkState::Degraded));
        assert_eq!(status.comms.radio, None);

        // Mains comes back: read again on the next heartbeat; a generator feeds the mains.
        std::fs::write(bat.join("status"), "Charging\n").unwrap();
        assert_eq!(site.status().power, PowerSource::Generator);

        // The OS says nothing: the configured values.
        std::fs::remove_dir_all(&bat).unwrap();
        let status = site.status();
        assert_eq!(
            (status.power, status.battery_pct),
            (PowerSource::Generator, Some(80))
        );

        // Nobody says: unknown.
        let cfg = config("power_supply_dir = \"\"");
        let status = FixedSite::from_config(&cfg, Timestamp(0)).status();
        assert_eq!(
            (status.power, status.battery_pct, status.hq),
            (PowerSource::Unknown, None, HqState::Unknown)
        );
        assert_eq!(status.comms, Comms::default());
    }

    #[test]
    fn a_site_without_shelter_figures_reports_status_only() {
        let cfg = config("kind = \"ward_office\"");
        let mut site = FixedSite::from_config(&cfg, Timestamp(0));
        let mut life = Lifecycle::new(cfg.site.clone(), 1, Mode::Exercise);
        let sent = send_all(&mut life, site.full_state(Timestamp(0)));
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].header.mode, Mode::Exercise);
    }

    #[test]
    fn birth_and_will_frame_onto_the_retained_life_topic() {
        let mut life = Lifecycle::new(config("").site, 4, Mode::Actual);
        let armed = life.arm(crate::AGENT_VERSION, Timestamp::now());
        for env in [armed.birth, armed.will] {
            let out = frame(&env).unwrap();
            assert_eq!(out.topic, "renkei/v1/131041/nishi-shinjuku-es/life");
            assert!(out.retain);
            validate_for_topic(&env, &Topic::parse(&out.topic).unwrap()).unwrap();
        }
    }

    #[test]
    fn crowding_follows_occupancy() {
        assert_eq!(crowding(Some(0), Some(100)), Some(Crowding::Vacant));
        assert_eq!(crowding(Some(79), Some(100)), Some(Crowding::Vacant));
        assert_eq!(crowding(Some(80), Some(100)), Some(Crowding::Crowded));
        assert_eq!(crowding(Some(100), Some(100)), Some(Crowding::Full));
        assert_eq!(crowding(Some(130), Some(100)), Some(Crowding::Full));
        assert_eq!(crowding(Some(1), Some(0)), None);
        assert_eq!(crowding(None, Some(100)), None);
    }
}
