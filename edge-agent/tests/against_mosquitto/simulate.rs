//! `renkei-agent simulate`: sites across every ward whose figures move, the earthquake
//! scenario, and the flags it refuses.

use std::path::Path;
use std::time::Duration;

use renkei_shared::{Body, Life, Mode, Origin, SiteRef};
use renkei_testkit::{AgentProcess, Mosquitto, run_agent};
use tokio::time::Instant;

use crate::hq::{WAIT, watched_broker};

/// `renkei-agent simulate` of 30 sites reporting every second to `broker`, its state in
/// `dir`, with `extra` arguments.
fn thirty_sites(broker: &Mosquitto, dir: &Path, extra: &[&str]) -> AgentProcess {
    let url = broker.url();
    let state = dir.join("sim");
    let state = state.to_str().expect("a UTF-8 path");
    let args = [
        "simulate",
        "--broker",
        &url,
        "--sites",
        "30",
        "--interval",
        "1s",
    ];
    AgentProcess::start(&[&args[..], extra, &["--state-dir", state]].concat())
}

#[tokio::test]
async fn simulate_fills_every_ward_and_numbers_move() {
    let Some((broker, mut wire)) = watched_broker().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut agent = thirty_sites(&broker, dir.path(), &["--seed", "5"]);

    let mut births = std::collections::BTreeSet::new();
    let mut evacuees: std::collections::BTreeMap<SiteRef, Vec<u32>> = Default::default();
    let deadline = Instant::now() + WAIT;
    loop {
        let moved = evacuees
            .values()
            .filter(|v| v.windows(2).any(|w| w[0] != w[1]))
            .count();
        if births.len() == 30 && moved >= 5 {
            break;
        }
        let m = match wire.next_by(deadline).await {
            Some(m) => m,
            None => panic!(
                "births {} and {moved} moving shelters; log:\n{}",
                births.len(),
                agent.log()
            ),
        };
        assert_eq!(m.env.header.mode, Mode::Exercise);
        let Origin::Site(site) = m.env.header.origin.clone() else {
            panic!("simulated messages come from sites")
        };
        match &m.env.body {
            Body::Life(Life::Birth { .. }) => {
                births.insert(site);
            }
            Body::Shelter(s) => evacuees.entry(site).or_default().extend(s.evacuees),
            _ => {}
        }
    }
    let wards: std::collections::BTreeSet<_> = births.iter().map(|s| s.ward).collect();
    assert_eq!(wards.len(), 23);

    agent.signal("TERM");
    assert!(agent.wait_exit().success(), "{}", agent.log());
    assert_eq!(agent.stdout(), "renkei-agent simulate running sites=30\n");
}

#[tokio::test]
async fn simulate_earthquake_opens_shelters_and_raises_requests() {
    let Some((broker, mut wire)) = watched_broker().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let quake = [
        "--scenario",
        "earthquake",
        "--quake-at",
        "1s",
        "--seed",
        "7",
    ];
    let mut agent = thirty_sites(&broker, dir.path(), &quake);

    // Before the quake every shelter is not open; then shelters open and ask for supplies.
    let mut not_open_at_birth = std::collections::BTreeSet::new();
    let mut opened = std::collections::BTreeSet::new();
    let mut requests = 0;
    let deadline = Instant::now() + Duration::from_secs(40);
    while opened.len() < 10 || requests == 0 {
        let m = match wire.next_by(deadline).await {
            Some(m) => m,
            None => panic!(
                "{} opened, {requests} requests, {} not open at first; log:\n{}",
                opened.len(),
                not_open_at_birth.len(),
                agent.log()
            ),
        };
        let Origin::Site(site) = m.env.header.origin.clone() else {
            panic!("simulated messages come from sites")
        };
        match &m.env.body {
            Body::Shelter(s) if s.state == renkei_shared::ShelterState::NotOpen => {
                not_open_at_birth.insert(site);
            }
            Body::Shelter(s) if s.state == renkei_shared::ShelterState::Open => {
                opened.insert(site);
            }
            Body::Request(r) => {
                assert_eq!(r.state, renkei_shared::RequestState::Requested);
                requests += 1;
            }
            _ => {}
        }
    }
    assert!(not_open_at_birth.len() >= 20, "{not_open_at_birth:?}");
    eprintln!(
        "{} open and {requests} requests after {:?}",
        opened.len(),
        started.elapsed()
    );

    agent.signal("TERM");
    assert!(agent.wait_exit().success(), "{}", agent.log());
}

#[tokio::test]
async fn simulate_refuses_a_quake_time_without_the_earthquake_scenario() {
    let out = run_agent(&[
        "simulate",
        "--broker",
        "mqtt://127.0.0.1:1",
        "--sites",
        "1",
        "--quake-at",
        "5s",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--quake-at is only used with --scenario earthquake"),
        "{err}"
    );
}
