//! The outbox as HQ sees it: staff reports survive kill -9 of the CLI and the daemon, a broker
//! that is down and a damaged segment, and reach HQ once and in order; a full outbox or disk
//! refuses new reports and raises the alarm in the heartbeats.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use renkei_shared::{Body, Mode, WardCode};
use renkei_testkit::mosquitto::MOSQUITTO;
use renkei_testkit::{AgentProcess, Mosquitto, free_port};
use tokio::time::Instant;

use crate::hq::{Hq, LONG_WAIT, Watch, is_life, watched_broker};
use crate::site::{agent_status, report, write_config};

/// Files supply requests of 3 kB each until the outbox refuses one: how many it saved, and
/// what the refused report told staff.
fn fill_outbox(config: &Path) -> (usize, String) {
    let note = "x".repeat(3000);
    let mut saved = 0;
    loop {
        let request = ["request", "--item", "water", "--quantity", "10", "--note"];
        let (ok, text) = report(config, &[&request[..], &[&note]].concat());
        if !ok {
            return (saved, text);
        }
        saved += 1;
        assert!(saved < 100, "the outbox never filled");
    }
}

#[tokio::test]
async fn confirmed_reports_survive_kill_9_of_report_and_daemon_and_arrive_once_in_order() {
    if !Mosquitto::installed() {
        eprintln!("SKIPPED: {MOSQUITTO} is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let run = ["run", "--config", config.to_str().unwrap()];
    // No broker yet: the site is offline.
    let mut daemon = AgentProcess::start(&run);
    let mut confirmed = std::collections::BTreeSet::new();
    let mut rng = rand::rng();
    for i in 0..50u32 {
        let evacuees = 1000 + i;
        let child = Command::new(env!("CARGO_BIN_EXE_renkei-agent"))
            .args(["report", "--config", config.to_str().unwrap()])
            .args(["shelter", "--evacuees", &evacuees.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        // Kill it at a random moment of its short life (some finish first).
        std::thread::sleep(Duration::from_millis(rand::Rng::random_range(
            &mut rng,
            0..25,
        )));
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        if stdout.contains("saved (seq") {
            confirmed.insert(evacuees);
        }
        if i % 10 == 9 {
            // The daemon dies too, mid-whatever, and comes back.
            daemon.kill9();
            daemon = AgentProcess::start(&run);
        }
    }
    eprintln!("{} of 50 reports confirmed before kill -9", confirmed.len());
    assert!(!confirmed.is_empty(), "no report finished in time");
    // A report run to the end is always confirmed.
    let (ok, text) = report(&config, &["shelter", "--evacuees", "2000"]);
    assert!(ok && text.contains("保存しました / saved (seq"), "{text}");
    confirmed.insert(2000);

    // One last kill -9, and the broker comes up with HQ watching before the daemon returns
    // (a daemon still alive would deliver before HQ subscribed).
    daemon.kill9();
    let broker = Mosquitto::setup().port(port).start();
    let mut wire = Watch::start(&broker, "hq-watch", renkei_shared::topic::ALL).await;
    let daemon = AgentProcess::start(&run);
    let mut hq = Hq::default();
    hq.until_all(&mut wire, &confirmed, || daemon.log()).await;
    assert!(
        hq.historical >= confirmed.len(),
        "backlog is marked historical"
    );
    // And the outbox empties.
    let deadline = Instant::now() + LONG_WAIT;
    loop {
        let status = agent_status(&config);
        if status.contains("queue depth:     0") {
            assert!(status.contains("link:            connected"), "{status}");
            break;
        }
        assert!(Instant::now() < deadline, "outbox never drained:\n{status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn broker_down_then_back_the_backlog_arrives_in_order_once_and_paced() {
    let Some((broker, mut wire)) = watched_broker().await else {
        return;
    };
    let port = broker.port;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), port, "replay_rate = 20");
    let agent = AgentProcess::start(&["run", "--config", config.to_str().unwrap()]);
    wire.next(&agent, "birth", |m| is_life(m, true)).await;
    let mut hq = Hq::default();
    let live: std::collections::BTreeSet<u32> = (1..=3).collect();
    for n in &live {
        let (ok, text) = report(&config, &["shelter", "--evacuees", &n.to_string()]);
        assert!(ok, "{text}");
    }
    hq.until_all(&mut wire, &live, || agent.log()).await;

    drop(broker);
    let offline: std::collections::BTreeSet<u32> = (100..160).collect();
    for n in &offline {
        let (ok, text) = report(&config, &["shelter", "--evacuees", &n.to_string()]);
        assert!(ok, "{text}");
    }
    let status = agent_status(&config);
    assert!(
        status.contains("offline") || status.contains("connecting"),
        "{status}"
    );
    // All 60, and perhaps a live one whose PubAck the broker's death cut off (re-sent).
    let waiting: u32 = status
        .split_once("queue depth:")
        .and_then(|(_, rest)| rest.split_once('(')?.1.split_once(' ')?.0.parse().ok())
        .unwrap_or(0);
    assert!((60..=63).contains(&waiting), "{status}");

    // The agent is held still while the broker comes back, so HQ subscribes before the
    // backlog starts (a running agent reconnects within a second and would deliver its first
    // burst to nobody).
    agent.signal("STOP");
    let broker = Mosquitto::setup().port(port).start();
    let mut wire = Watch::start(&broker, "hq-watch-2", renkei_shared::topic::ALL).await;
    agent.signal("CONT");
    let started = Instant::now();
    hq.until_all(&mut wire, &offline, || agent.log()).await;
    let took = started.elapsed();
    assert!(
        hq.historical >= offline.len(),
        "backlog is marked historical"
    );
    // 60 reports plus the heartbeats stored meanwhile, at 20/s with a one-second burst.
    assert!(
        took >= Duration::from_secs(2),
        "backlog not paced: {took:?}"
    );
}

#[tokio::test]
async fn a_corrupt_outbox_segment_is_quarantined_and_the_agent_carries_on() {
    let Some(broker) = Mosquitto::start_if_installed() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), broker.port, "");
    for n in 1..=3 {
        let (ok, text) = report(&config, &["shelter", "--evacuees", &n.to_string()]);
        assert!(ok, "{text}");
    }
    let outbox = dir.path().join("state/outbox");
    let segment = std::fs::read_dir(&outbox)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "seg"))
        .expect("a segment");
    let mut bytes = std::fs::read(&segment).unwrap();
    let last = bytes.len() - 3;
    bytes[last / 2] ^= 0x55; // inside the second record
    std::fs::write(&segment, &bytes).unwrap();

    let mut wire = Watch::start(&broker, "hq-watch", renkei_shared::topic::ALL).await;
    let agent = AgentProcess::start(&["run", "--config", config.to_str().unwrap()]);
    let mut hq = Hq::default();
    hq.until_all(&mut wire, &[1].into(), || agent.log()).await;
    let (ok, text) = report(&config, &["shelter", "--evacuees", "4"]);
    assert!(ok, "{text}");
    hq.until_all(&mut wire, &[4].into(), || agent.log()).await;
    let status = agent_status(&config);
    assert!(status.contains("quarantined:     1"), "{status}");
    assert!(outbox.join("quarantine").read_dir().unwrap().count() == 1);
}

#[tokio::test]
async fn a_full_outbox_refuses_new_reports_with_an_alarm_and_keeps_the_saved_ones() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), free_port(), "outbox_max = \"64KiB\"");
    let (saved, refusal) = fill_outbox(&config);
    assert!(
        refusal.contains("NOT saved") && refusal.contains("outbox is full"),
        "{refusal}"
    );
    let status = agent_status(&config);
    assert!(status.contains(&format!("({saved} reports")), "{status}");
    assert!(status.contains("ALARM"), "{status}");
}

#[tokio::test]
async fn a_full_outbox_raises_the_alarm_in_heartbeats_until_the_backlog_drains() {
    let Some(broker) = Mosquitto::start_if_installed() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        broker.port,
        "outbox_max = \"64KiB\"\nreplay_rate = 50",
    );
    // Filled while no daemon runs, until staff are told "NOT saved".
    let (saved, refusal) = fill_outbox(&config);
    assert!(refusal.contains("outbox is full"), "{refusal}");

    let mut wire = Watch::start(&broker, "hq-watch", renkei_shared::topic::ALL).await;
    let agent = AgentProcess::start(&["run", "--config", config.to_str().unwrap()]);
    let mut hq = renkei_shared::State::new();
    let mut requests = 0;
    let alarmed = wire
        .next(&agent, "a status with the alarm", |m| {
            hq.apply(&m.env);
            match &m.env.body {
                Body::Status(s) if s.outbox_alarm => Some((m.env.header.boot, m.env.header.seq)),
                _ => None,
            }
        })
        .await;
    // HQ's ward roll-up counts the site as one that cannot take reports.
    let rollup = hq
        .world(Mode::Exercise)
        .rollup(WardCode(131041), renkei_shared::Timestamp(i64::MAX / 2));
    assert_eq!(rollup.outbox_alarms, 1);

    // The backlog drains, the alarm clears, and a later live heartbeat says so.
    let cleared = wire
        .next(&agent, "a status without the alarm", |m| {
            let key = (m.env.header.boot, m.env.header.seq);
            match &m.env.body {
                Body::Request(_) => {
                    requests += 1;
                    None
                }
                Body::Status(s) if !s.outbox_alarm && !m.env.header.historical && key > alarmed => {
                    Some(s.clone())
                }
                _ => None,
            }
        })
        .await;
    assert!(!cleared.outbox_alarm);
    assert_eq!(
        requests, saved,
        "every saved request arrived before the alarm cleared"
    );
    let status = agent_status(&config);
    assert!(status.contains("alarm:           none"), "{status}");
    // Staff can report again.
    let (ok, text) = report(&config, &["shelter", "--evacuees", "5"]);
    assert!(ok, "{text}");
}

#[tokio::test]
async fn below_the_disk_reserve_reports_are_refused_and_live_heartbeats_carry_the_alarm() {
    let Some(broker) = Mosquitto::start_if_installed() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // More than any disk here has free: the disk counts as full without filling one.
    let config = write_config(dir.path(), broker.port, "disk_reserve = \"1000000GiB\"");
    let (ok, text) = report(&config, &["shelter", "--evacuees", "7"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("NOT saved") && text.contains("nearly full") && text.contains("reserve"),
        "{text}"
    );
    let status = agent_status(&config);
    assert!(
        status.contains("ALARM") && status.contains("reports are refused"),
        "{status}"
    );

    let mut wire = Watch::start(&broker, "hq-watch", renkei_shared::topic::ALL).await;
    let agent = AgentProcess::start(&["run", "--config", config.to_str().unwrap()]);
    let snapshot = wire
        .next(&agent, "the snapshot status", |m| match &m.env.body {
            Body::Status(s) => Some((m.env.header.seq, s.outbox_alarm)),
            _ => None,
        })
        .await;
    assert!(snapshot.1, "the snapshot carries the alarm");
    // No heartbeat fits in the outbox, so they go live, still flagged.
    let live = wire
        .next(&agent, "a live heartbeat", |m| match &m.env.body {
            Body::Status(s) if m.env.header.seq > snapshot.0 => {
                Some((m.env.header.historical, s.outbox_alarm))
            }
            _ => None,
        })
        .await;
    assert_eq!(live, (false, true));
    assert!(
        agent.log().contains("heartbeat not stored"),
        "{}",
        agent.log()
    );
}
