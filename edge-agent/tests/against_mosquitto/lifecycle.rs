//! The agent's life as HQ sees it: birth, heartbeats and the will when it is killed; a death
//! of its own on SIGTERM and a new boot after; commands; a broker that restarts; many agents
//! starting at once.

use std::time::Duration;

use renkei_shared::topic::SiteChannel;
use renkei_shared::{
    Body, CommandAction, CommandOutcome, Envelope, Header, Id, Mode, Origin, ShelterState,
    SiteKind, SiteRef, Timestamp, Topic, WardCode,
};
use renkei_testkit::{AgentProcess, Mosquitto};
use rumqttc::QoS;
use tokio::time::Instant;

use crate::hq::{Received, WAIT, Watch, is_life, watched_broker};
use crate::site::{run_args, site};

#[tokio::test]
async fn birth_status_and_shelter_arrive_and_the_will_reports_a_killed_agent() {
    let Some((broker, mut wire)) = watched_broker().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let url = broker.url();
    let mut agent = AgentProcess::start(&run_args(&url, state.to_str().unwrap(), "1s"));

    let birth = wire.next(&agent, "birth", |m| is_life(m, true)).await;
    assert_eq!(
        birth.topic,
        Topic::Site {
            site: site(),
            channel: SiteChannel::Life
        }
    );
    assert_eq!(birth.env.header.origin, Origin::Site(site()));
    assert_eq!(birth.env.header.boot, 1);
    // Seq 1 is the configured shelter figures, stored in the outbox before connecting.
    assert_eq!(birth.env.header.seq, 2);
    assert_eq!(birth.env.header.mode, Mode::Exercise);

    let status = wire
        .next(&agent, "status", |m| match &m.env.body {
            Body::Status(s) => Some((m.env.header.clone(), s.clone())),
            _ => None,
        })
        .await;
    assert_eq!(status.1.name, "西新宿小学校");
    assert_eq!(status.1.kind, SiteKind::Shelter);
    assert_eq!(status.1.interval_s, 1);
    // The will (birth + 1) sits between the birth and everything after it.
    assert!(status.0.seq > birth.env.header.seq + 1);

    let shelter = wire
        .next(&agent, "shelter", |m| match &m.env.body {
            Body::Shelter(s) => Some((m.env.header.clone(), s.clone())),
            _ => None,
        })
        .await;
    assert_eq!(shelter.1.state, ShelterState::Open);
    assert_eq!(shelter.1.evacuees, Some(120));
    assert_eq!(shelter.1.capacity, Some(450));
    // Stored before the connection came up, so it is sent as backlog.
    assert_eq!(shelter.0.seq, 1);
    assert!(shelter.0.historical);

    // Heartbeats follow, numbered on.
    let heartbeat = wire
        .next(&agent, "heartbeat", |m| match &m.env.body {
            Body::Status(_) if m.env.header.seq > status.0.seq => Some(m.env.header.clone()),
            _ => None,
        })
        .await;
    assert!(heartbeat.seq > status.0.seq);

    // kill -9: no DISCONNECT, so the broker publishes the will.
    agent.kill9();
    let death = wire
        .next(&agent, "death by last will", |m| is_life(m, false))
        .await;
    assert_eq!(death.env.header.boot, 1);
    assert_eq!(death.env.header.seq, birth.env.header.seq + 1);
    assert_eq!(death.env.header.mode, Mode::Exercise);

    // It is retained: a dashboard that connects later sees the site dead.
    let life = Topic::Site {
        site: site(),
        channel: SiteChannel::Life,
    };
    let mut late = Watch::start(&broker, "hq-late", &life.to_string()).await;
    let retained = late
        .next(&agent, "retained death", |m| Some(m.clone()))
        .await;
    assert!(retained.retain);
    assert_eq!(retained.env, death.env);
}

#[tokio::test]
async fn sigterm_sends_a_death_and_a_restart_raises_the_boot_id() {
    let Some((broker, mut wire)) = watched_broker().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let url = broker.url();
    let args = run_args(&url, state.to_str().unwrap(), "30s");

    let mut agent = AgentProcess::start(&args);
    let birth = wire.next(&agent, "birth", |m| is_life(m, true)).await;
    wire.next(&agent, "shelter", |m| {
        matches!(m.env.body, Body::Shelter(_)).then_some(())
    })
    .await;
    agent.signal("TERM");
    let death = wire.next(&agent, "death", |m| is_life(m, false)).await;
    // Sent by the agent itself, after the will's number: not the will.
    assert!(death.env.header.seq > birth.env.header.seq + 1);
    assert!(agent.wait_exit().success(), "{}", agent.log());

    let second = AgentProcess::start(&args);
    let birth2 = wire
        .next(&second, "second birth", |m| is_life(m, true))
        .await;
    assert_eq!(birth2.env.header.boot, birth.env.header.boot + 1);
    assert_eq!(birth2.env.header.seq, 1);
}

#[tokio::test]
async fn commands_ask_for_a_rebirth_and_change_the_interval() {
    let Some((broker, mut wire)) = watched_broker().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let url = broker.url();
    let agent = AgentProcess::start(&run_args(&url, state.to_str().unwrap(), "60s"));
    let birth = wire.next(&agent, "birth", |m| is_life(m, true)).await;
    let first_shelter = wire
        .next(&agent, "shelter", |m| {
            matches!(m.env.body, Body::Shelter(_)).then(|| m.env.header.seq)
        })
        .await;

    // HQ's own client: what it publishes comes back to it too, and is skipped.
    let hq = wire.client().clone();
    let command = |n: u64, action: CommandAction| Envelope {
        header: Header {
            origin: Origin::Hq(Id::new("hq-test").unwrap()),
            boot: 1,
            seq: n,
            sent_at: Timestamp::now(),
            mode: Mode::Exercise,
            historical: false,
        },
        body: Body::Command(renkei_shared::Command {
            command_id: Id::new(format!("cmd-{n}")).unwrap(),
            target: site(),
            action,
        }),
    };
    let send = |env: Envelope| {
        let hq = hq.clone();
        async move {
            let topic = Topic::of(&env).unwrap();
            hq.publish(
                topic.to_string(),
                QoS::AtLeastOnce,
                topic.retained(),
                renkei_shared::encode(&env).unwrap(),
            )
            .await
            .unwrap();
        }
    };
    // Commands are published by this test's own client; its messages come back too, so skip them.
    send(command(1, CommandAction::Rebirth)).await;
    let rebirth = wire.next(&agent, "rebirth", |m| is_life(m, true)).await;
    // The same birth again, so that the will armed with it still outranks it.
    assert_eq!(rebirth.env, birth.env);
    let shelter_again = wire
        .next(&agent, "full state again", |m| {
            matches!(m.env.body, Body::Shelter(_)).then(|| m.env.header.seq)
        })
        .await;
    // The same delivered report again: HQ's reducer sees a duplicate, not news.
    assert_eq!(shelter_again, first_shelter);
    assert!(agent.log().contains("command rebirth: answered"));
    let answer = |id: &'static str| {
        move |m: &Received| match &m.env.body {
            Body::CommandResult(r) if r.command_id.as_str() == id => Some(r.outcome),
            _ => None,
        }
    };
    assert_eq!(
        wire.next(&agent, "the answer to cmd-1", answer("cmd-1"))
            .await,
        CommandOutcome::Done
    );

    // A command that waited too long on its way (two hours: a cut line, a queue) is answered
    // but not carried out.
    let mut old = command(3, CommandAction::SetInterval { seconds: 7 });
    old.header.sent_at = Timestamp(Timestamp::now().0 - 2 * 3600 * 1000);
    send(old).await;
    let outcome = wire
        .next(&agent, "the answer to cmd-3", answer("cmd-3"))
        .await;
    assert!(
        matches!(outcome, CommandOutcome::Expired { age_s } if age_s >= 7200),
        "{outcome:?}"
    );

    // Garbage on the command topic is logged and ignored.
    hq.publish(
        renkei_shared::topic::command_filter(&site()),
        QoS::AtLeastOnce,
        false,
        vec![1, 2, 3],
    )
    .await
    .unwrap();

    send(command(2, CommandAction::SetInterval { seconds: 1 })).await;
    let started = Instant::now();
    let status = wire
        .next(&agent, "status at the new interval", |m| {
            match &m.env.body {
                Body::Status(s) if s.interval_s == 1 => Some(s.clone()),
                Body::Status(s) if s.interval_s == 7 => {
                    panic!("the expired command was carried out")
                }
                _ => None,
            }
        })
        .await;
    assert_eq!(status.interval_s, 1, "the expired command changed nothing");
    assert!(started.elapsed() < Duration::from_secs(10));
    // And more follow at that pace.
    wire.next(&agent, "second fast heartbeat", |m| match &m.env.body {
        Body::Status(s) if s.interval_s == 1 => Some(()),
        _ => None,
    })
    .await;
    assert!(
        agent.log().contains("undecodable command"),
        "{}",
        agent.log()
    );
}

#[tokio::test]
async fn after_a_broker_restart_the_agent_is_born_again_with_a_fresh_will() {
    let Some(broker) = Mosquitto::start_if_installed() else {
        return;
    };
    let port = broker.port;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let url = broker.url();
    let mut agent = AgentProcess::start(&run_args(&url, state.to_str().unwrap(), "30s"));
    let mut wire = Watch::start(&broker, "hq-watch", renkei_shared::topic::ALL).await;
    let birth = wire.next(&agent, "birth", |m| is_life(m, true)).await;

    // The broker goes away (and, without persistence, forgets everything retained). The
    // agent is held still while it comes back, so HQ subscribes before the agent can return.
    drop(broker);
    agent.signal("STOP");
    let broker = Mosquitto::setup().port(port).start();
    let mut wire = Watch::start(&broker, "hq-watch-2", renkei_shared::topic::ALL).await;
    agent.signal("CONT");
    let birth2 = wire
        .next(&agent, "birth after reconnect", |m| is_life(m, true))
        .await;
    assert_eq!(birth2.env.header.boot, birth.env.header.boot);
    // After the first connection's will and everything sent before the drop.
    assert!(birth2.env.header.seq > birth.env.header.seq + 1);
    wire.next(&agent, "full state after reconnect", |m| {
        matches!(m.env.body, Body::Shelter(_)).then_some(())
    })
    .await;

    agent.kill9();
    let death = wire
        .next(&agent, "death by the re-armed will", |m| is_life(m, false))
        .await;
    assert_eq!(death.env.header.seq, birth2.env.header.seq + 1);
}

/// Fresh agents connecting together are all alive at HQ once they report. A connection attempt
/// given up after the broker registered its will (a cancelled poll used to do that right after
/// the CONNACK) fires that will; the next birth must outrank it, or the site shows dead while
/// its heartbeats arrive.
#[tokio::test]
async fn freshly_started_agents_are_never_shown_dead_while_reporting() {
    let Some((broker, mut wire)) = watched_broker().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = broker.url();
    let names: Vec<String> = (0..6).map(|i| format!("alive-{i}")).collect();
    let agents: Vec<AgentProcess> = names
        .iter()
        .map(|name| {
            let state = dir.path().join(name);
            let mut args = run_args(&url, state.to_str().unwrap(), "1s");
            let at = args.iter().position(|a| *a == "--site").unwrap() + 1;
            args[at] = name;
            AgentProcess::start(&args)
        })
        .collect();
    let refs: Vec<SiteRef> = names
        .iter()
        .map(|name| SiteRef {
            ward: WardCode(131041),
            site: Id::new(name.as_str()).unwrap(),
        })
        .collect();

    let mut hq = renkei_shared::State::new();
    let logs = || {
        agents
            .iter()
            .zip(&names)
            .map(|(a, n)| format!("--- {n}\n{}", a.log()))
            .collect::<String>()
    };
    // Until every site has sent a heartbeat after its birth, then ~3 s more of traffic (a
    // will fired by a dropped connection lands within that).
    let mut settled: Option<Instant> = None;
    let deadline = Instant::now() + WAIT;
    loop {
        let until = settled.map_or(deadline, |at| at + Duration::from_secs(3));
        match wire.next_by(until).await {
            Some(m) => {
                hq.apply(&m.env);
            }
            None if settled.is_some() => break,
            None => panic!("not every site reported within {WAIT:?}:\n{}", logs()),
        }
        let sites = &hq.world(Mode::Exercise).sites;
        if settled.is_none()
            && refs.iter().all(|r| {
                sites
                    .get(r)
                    .is_some_and(|s| s.life.is_some() && s.status.is_some())
            })
        {
            settled = Some(Instant::now());
        }
    }
    let sites = &hq.world(Mode::Exercise).sites;
    let dead: Vec<&str> = refs
        .iter()
        .filter(|r| sites[*r].is_dead())
        .map(|r| r.site.as_str())
        .collect();
    assert!(
        dead.is_empty(),
        "reporting but shown dead: {dead:?}\n{}",
        logs()
    );
}
