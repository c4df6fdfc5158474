//! The built `renkei-agent` binary against a real MQTT broker (Debian's Mosquitto), watched by
//! a rumqttc subscriber: what HQ would see on the wire.
//!
//! Each test starts its own Mosquitto on a free port and skips (with a message) where the
//! binary is not installed. Mosquitto alone publishes no receipts, so these agents run with
//! `confirm = "puback"`; tests/ runs agents against renkei-broker and its receipts.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use renkei_shared::topic::SiteChannel;
use renkei_shared::validate::validate_for_topic;
use renkei_shared::{
    Body, CommandAction, Envelope, Header, Id, Life, Mode, Origin, ShelterState, SiteKind, SiteRef,
    Timestamp, Topic, WardCode,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

const MOSQUITTO: &str = "/usr/sbin/mosquitto";
/// Generous: the machine is shared with other builds.
const WAIT: Duration = Duration::from_secs(15);

/// A Mosquitto on 127.0.0.1 and a free port, killed on drop.
struct Broker {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Broker {
    fn start() -> Option<Broker> {
        if !Path::new(MOSQUITTO).exists() {
            eprintln!("SKIPPED: {MOSQUITTO} is not installed (apt-get install mosquitto)");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        Some(Broker::start_on(port))
    }

    /// A broker on a given port (to restart one where agents expect it).
    fn start_on(port: u16) -> Broker {
        Broker::start_conf(port, "", None)
    }

    /// A broker on `port` with `extra` configuration; also waits for `also_port` to listen.
    fn start_conf(port: u16, extra: &str, also_port: Option<u16>) -> Broker {
        let dir = tempfile::tempdir().expect("temp dir");
        let conf = dir.path().join("mosquitto.conf");
        // No queue limit: Mosquitto's default silently drops QoS 1 messages beyond 1,000.
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\npersistence false\n{extra}"
            ),
        )
        .expect("write mosquitto.conf");
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        let deadline = std::time::Instant::now() + WAIT;
        for port in std::iter::once(port).chain(also_port) {
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "mosquitto did not listen on {port}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Broker {
            child,
            port,
            _dir: dir,
        }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running agent process, killed on drop; its stderr goes to a file for failure messages.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Agent {
    fn spawn(args: &[&str], log_dir: &Path, name: &str) -> Agent {
        let log = log_dir.join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_renkei-agent"))
            .args(args)
            .env("RUST_LOG", "renkei_agent=debug")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("agent log"))
            .spawn()
            .expect("start renkei-agent");
        Agent { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit by itself.
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "agent did not exit:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One message as a subscriber received it.
#[derive(Debug, Clone)]
struct Received {
    topic: Topic,
    retain: bool,
    env: Envelope,
}

/// A rumqttc subscriber to `filter`, ready (SubAck received) when returned. Every message
/// must decode and be valid on its topic.
async fn subscribe(
    broker: &Broker,
    client_id: &str,
    filter: &str,
) -> (AsyncClient, mpsc::UnboundedReceiver<Received>) {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", broker.port);
    options.set_keep_alive(Duration::from_secs(10));
    let (client, mut eventloop) = AsyncClient::new(options, 16);
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut ready = Some(ready_tx);
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let topic = Topic::parse(&p.topic).expect("a renkei topic");
                    let env = match renkei_shared::decode(&p.payload) {
                        Ok(env) => env,
                        // A test puts garbage on the command topic on purpose.
                        Err(_) if matches!(topic, Topic::Command { .. }) => continue,
                        Err(e) => panic!("not a renkei message on {}: {e}", p.topic),
                    };
                    validate_for_topic(&env, &topic).expect("valid on its topic");
                    if tx
                        .send(Received {
                            topic,
                            retain: p.retain,
                            env,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    timeout(WAIT, ready_rx)
        .await
        .expect("SubAck in time")
        .expect("subscriber running");
    (client, rx)
}

/// The next message for which `pick` says yes, skipping others; panics with the agent's log
/// after [`WAIT`].
async fn next<T>(
    rx: &mut mpsc::UnboundedReceiver<Received>,
    agent: &Agent,
    what: &str,
    mut pick: impl FnMut(&Received) -> Option<T>,
) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(m)) => {
                if let Some(t) = pick(&m) {
                    return t;
                }
            }
            _ => panic!("no {what} within {WAIT:?}; agent log:\n{}", agent.log()),
        }
    }
}

fn site() -> SiteRef {
    SiteRef {
        ward: WardCode(131041),
        site: Id::new("nishi-shinjuku-es").expect("a valid id"),
    }
}

fn is_life(m: &Received, want_birth: bool) -> Option<Received> {
    match &m.env.body {
        Body::Life(Life::Birth { .. }) if want_birth => Some(m.clone()),
        Body::Life(Life::Death) if !want_birth => Some(m.clone()),
        _ => None,
    }
}

fn run_args<'a>(url: &'a str, state_dir: &'a str, interval: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--broker",
        url,
        "--ward",
        "131041",
        "--site",
        "nishi-shinjuku-es",
        "--name",
        "西新宿小学校",
        "--kind",
        "shelter",
        "--interval",
        interval,
        "--mode",
        "exercise",
        "--state-dir",
        state_dir,
        "--evacuees",
        "120",
        "--capacity",
        "450",
        "--shelter-state",
        "open",
        // Mosquitto alone sends no receipts (renkei-broker does; tests/ covers that).
        "--confirm",
        "puback",
    ]
}

#[tokio::test]
async fn birth_status_and_shelter_arrive_and_the_will_reports_a_killed_agent() {
    let Some(broker) = Broker::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (_sub, mut rx) = subscribe(&broker, "hq-watch", renkei_shared::topic::ALL).await;
    let url = broker.url();
    let mut agent = Agent::spawn(
        &run_args(&url, state.to_str().unwrap(), "1s"),
        dir.path(),
        "agent",
    );

    let birth = next(&mut rx, &agent, "birth", |m| is_life(m, true)).await;
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

    let status = next(&mut rx, &agent, "status", |m| match &m.env.body {
        Body::Status(s) => Some((m.env.header.clone(), s.clone())),
        _ => None,
    })
    .await;
    assert_eq!(status.1.name, "西新宿小学校");
    assert_eq!(status.1.kind, SiteKind::Shelter);
    assert_eq!(status.1.interval_s, 1);
    // The will (birth + 1) sits between the birth and everything after it.
    assert!(status.0.seq > birth.env.header.seq + 1);

    let shelter = next(&mut rx, &agent, "shelter", |m| match &m.env.body {
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
    let heartbeat = next(&mut rx, &agent, "heartbeat", |m| match &m.env.body {
        Body::Status(_) if m.env.header.seq > status.0.seq => Some(m.env.header.clone()),
        _ => None,
    })
    .await;
    assert!(heartbeat.seq > status.0.seq);

    // kill -9: no DISCONNECT, so the broker publishes the will.
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    let death = next(&mut rx, &agent, "death by last will", |m| is_life(m, false)).await;
    assert_eq!(death.env.header.boot, 1);
    assert_eq!(death.env.header.seq, birth.env.header.seq + 1);
    assert_eq!(death.env.header.mode, Mode::Exercise);

    // It is retained: a dashboard that connects later sees the site dead.
    let life = Topic::Site {
        site: site(),
        channel: SiteChannel::Life,
    };
    let (_late, mut late_rx) = subscribe(&broker, "hq-late", &life.to_string()).await;
    let retained = next(&mut late_rx, &agent, "retained death", |m| Some(m.clone())).await;
    assert!(retained.retain);
    assert_eq!(retained.env, death.env);
}

#[tokio::test]
async fn sigterm_sends_a_death_and_a_restart_raises_the_boot_id() {
    let Some(broker) = Broker::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (_sub, mut rx) = subscribe(&broker, "hq-watch", renkei_shared::topic::ALL).await;
    let url = broker.url();
    let args = run_args(&url, state.to_str().unwrap(), "30s");

    let mut agent = Agent::spawn(&args, dir.path(), "first");
    let birth = next(&mut rx, &agent, "birth", |m| is_life(m, true)).await;
    next(&mut rx, &agent, "shelter", |m| {
        matches!(m.env.body, Body::Shelter(_)).then_some(())
    })
    .await;
    agent.signal("TERM");
    let death = next(&mut rx, &agent, "death", |m| is_life(m, false)).await;
    // Sent by the agent itself, after the will's number: not the will.
    assert!(death.env.header.seq > birth.env.header.seq + 1);
    assert!(agent.wait_exit().success(), "{}", agent.log());

    let second = Agent::spawn(&args, dir.path(), "second");
    let birth2 = next(&mut rx, &second, "second birth", |m| is_life(m, true)).await;
    assert_eq!(birth2.env.header.boot, birth.env.header.boot + 1);
    assert_eq!(birth2.env.header.seq, 1);
}

#[tokio::test]
async fn commands_ask_for_a_rebirth_and_change_the_interval() {
    let Some(broker) = Broker::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (hq, mut rx) = subscribe(&broker, "hq-watch", renkei_shared::topic::ALL).await;
    let url = broker.url();
    let agent = Agent::spawn(
        &run_args(&url, state.to_str().unwrap(), "60s"),
        dir.path(),
        "agent",
    );
    let birth = next(&mut rx, &agent, "birth", |m| is_life(m, true)).await;
    let first_shelter = next(&mut rx, &agent, "shelter", |m| {
        matches!(m.env.body, Body::Shelter(_)).then(|| m.env.header.seq)
    })
    .await;

    let command = |n: u64, action: CommandAction| Envelope {
        header: Header {
            origin: Origin::Hq(Id::new("hq-test").unwrap()),
            boot: 1,
            seq: n,
            sent_at: Timestamp(0),
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
    let rebirth = next(&mut rx, &agent, "rebirth", |m| is_life(m, true)).await;
    // The same birth again, so that the will armed with it still outranks it.
    assert_eq!(rebirth.env, birth.env);
    let shelter_again = next(&mut rx, &agent, "full state again", |m| {
        matches!(m.env.body, Body::Shelter(_)).then(|| m.env.header.seq)
    })
    .await;
    // The same delivered report again: HQ's reducer sees a duplicate, not news.
    assert_eq!(shelter_again, first_shelter);
    assert!(agent.log().contains("command rebirth: acknowledged"));

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
    let status = next(
        &mut rx,
        &agent,
        "status at the new interval",
        |m| match &m.env.body {
            Body::Status(s) if s.interval_s == 1 => Some(s.clone()),
            _ => None,
        },
    )
    .await;
    assert_eq!(status.interval_s, 1);
    assert!(started.elapsed() < Duration::from_secs(10));
    // And more follow at that pace.
    next(&mut rx, &agent, "second fast heartbeat", |m| {
        match &m.env.body {
            Body::Status(s) if s.interval_s == 1 => Some(()),
            _ => None,
        }
    })
    .await;
    assert!(
        agent.log().contains("undecodable command"),
        "{}",
        agent.log()
    );
}

#[tokio::test]
async fn simulate_fills_every_ward_and_numbers_move() {
    let Some(broker) = Broker::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("sim");
    let (_sub, mut rx) = subscribe(&broker, "hq-watch", renkei_shared::topic::ALL).await;
    let url = broker.url();
    let mut agent = Agent::spawn(
        &[
            "simulate",
            "--broker",
            &url,
            "--sites",
            "30",
            "--seed",
            "5",
            "--interval",
            "1s",
            "--state-dir",
            state.to_str().unwrap(),
        ],
        dir.path(),
        "sim",
    );

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
        let m = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(m)) => m,
            _ => panic!(
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
    let mut stdout = String::new();
    std::io::Read::read_to_string(agent.child.stdout.as_mut().unwrap(), &mut stdout).unwrap();
    assert_eq!(stdout, "renkei-agent simulate running sites=30\n");
}

#[tokio::test]
async fn simulate_earthquake_opens_shelters_and_raises_requests() {
    let Some(broker) = Broker::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("sim");
    let (_sub, mut rx) = subscribe(&broker, "hq-watch", renkei_shared::topic::ALL).await;
    let url = broker.url();
    let started = Instant::now();
    let mut agent = Agent::spawn(
        &[
            "simulate",
            "--broker",
            &url,
            "--sites",
            "30",
            "--scenario",
            "earthquake",
            "--quake-at",
            "1s",
            "--interval",
            "1s",
            "--seed",
            "7",
            "--state-dir",
            state.to_str().unwrap(),
        ],
        dir.path(),
        "sim-quake",
    );

    // Before the quake every shelter is not open; then shelters open and ask for supplies.
    let mut not_open_at_birth = std::collections::BTreeSet::new();
    let mut opened = std::collections::BTreeSet::new();
    let mut requests = 0;
    let deadline = Instant::now() + Duration::from_secs(40);
    while opened.len() < 10 || requests == 0 {
        let m = match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(m)) => m,
            _ => panic!(
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
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_renkei-agent"))
        .args(["simulate", "--broker", "mqtt://127.0.0.1:1", "--sites", "1"])
        .args(["--quake-at", "5s"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--quake-at is only used with --scenario earthquake"),
        "{err}"
    );
}

#[tokio::test]
async fn after_a_broker_restart_the_agent_is_born_again_with_a_fresh_will() {
    let Some(broker) = Broker::start() else {
        return;
    };
    let port = broker.port;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let url = broker.url();
    let mut agent = Agent::spawn(
        &run_args(&url, state.to_str().unwrap(), "30s"),
        dir.path(),
        "agent",
    );
    let (_sub, mut rx) = subscribe(&broker, "hq-watch", renkei_shared::topic::ALL).await;
    let birth = next(&mut rx, &agent, "birth", |m| is_life(m, true)).await;

    // The broker goes away (and, without persistence, forgets everything retained). The
    // agent is held still while it comes back, so HQ subscribes before the agent can return.
    drop(broker);
    agent.signal("STOP");
    let broker = Broker::start_on(port);
    let (_sub, mut rx) = subscribe(&broker, "hq-watch-2", renkei_shared::topic::ALL).await;
    agent.signal("CONT");
    let birth2 = next(&mut rx, &agent, "birth after reconnect", |m| {
        is_life(m, true)
    })
    .await;
    assert_eq!(birth2.env.header.boot, birth.env.header.boot);
    // After the first connection's will and everything sent before the drop.
    assert!(birth2.env.header.seq > birth.env.header.seq + 1);
    next(&mut rx, &agent, "full state after reconnect", |m| {
        matches!(m.env.body, Body::Shelter(_)).then_some(())
    })
    .await;

    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    let death = next(&mut rx, &agent, "death by the re-armed will", |m| {
        is_life(m, false)
    })
    .await;
    assert_eq!(death.env.header.seq, birth2.env.header.seq + 1);
}

/// Fresh agents connecting together are all alive at HQ once they report. A connection attempt
/// given up after the broker registered its will (a cancelled poll used to do that right after
/// the CONNACK) fires that will; the next birth must outrank it, or the site shows dead while
/// its heartbeats arrive.
#[tokio::test]
async fn freshly_started_agents_are_never_shown_dead_while_reporting() {
    let Some(broker) = Broker::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (_sub, mut rx) = subscribe(&broker, "hq-watch", renkei_shared::topic::ALL).await;
    let url = broker.url();
    let names: Vec<String> = (0..6).map(|i| format!("alive-{i}")).collect();
    let agents: Vec<Agent> = names
        .iter()
        .map(|name| {
            let state = dir.path().join(name);
            let mut args = run_args(&url, state.to_str().unwrap(), "1s");
            let at = args.iter().position(|a| *a == "--site").unwrap() + 1;
            args[at] = name;
            Agent::spawn(&args, dir.path(), name)
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
        match tokio::time::timeout_at(until, rx.recv()).await {
            Ok(Some(m)) => {
                hq.apply(&m.env);
            }
            Ok(None) => panic!("subscriber ended"),
            Err(_) if settled.is_some() => break,
            Err(_) => panic!("not every site reported within {WAIT:?}:\n{}", logs()),
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

// ---------------------------------------------------------------------------------------------
// The outbox: staff reports survive kill -9, outages and damage, and reach HQ once, in order.

/// Long enough for a backoff step, a restart and a rate-limited backlog on a shared machine.
const LONG_WAIT: Duration = Duration::from_secs(60);

/// A config file for the test site at `port`, with extra lines.
fn write_config(dir: &Path, port: u16, extra: &str) -> PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "broker = \"mqtt://127.0.0.1:{port}\"\nward = 131041\nsite = \"nishi-shinjuku-es\"\n\
             name = \"西新宿小学校\"\nmode = \"exercise\"\ninterval = \"1s\"\n\
             state_dir = {:?}\nconfirm = \"puback\"\n{extra}\n",
            dir.join("state").display().to_string()
        ),
    )
    .expect("write agent.toml");
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Runs `renkei-agent report …` to the end: (exit success, stdout + stderr).
fn report(config: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_renkei-agent"))
        .arg("report")
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run renkei-agent report");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn agent_status(config: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_renkei-agent"))
        .arg("status")
        .arg("--config")
        .arg(config)
        .output()
        .expect("run renkei-agent status");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Shelter reports received, keyed by their evacuee count (unique per report in these
/// tests), checked the way HQ's reducer would apply them: each (boot, seq) applied once, and
/// first arrivals in increasing (boot, seq) order.
#[derive(Default)]
struct Hq {
    state: renkei_shared::State,
    applied: std::collections::BTreeMap<(u32, u64), u32>,
    first_arrivals: Vec<(u32, u64)>,
    evacuees: std::collections::BTreeSet<u32>,
    historical: usize,
}

impl Hq {
    fn take(&mut self, m: &Received) {
        let Body::Shelter(s) = &m.env.body else {
            return;
        };
        let key = (m.env.header.boot, m.env.header.seq);
        let change = self.state.apply(&m.env);
        if self.applied.contains_key(&key) {
            assert!(
                !matches!(change, renkei_shared::reducer::Change::Updated { .. }),
                "{key:?} applied twice"
            );
            return;
        }
        self.applied.insert(key, s.evacuees.unwrap_or(0));
        self.first_arrivals.push(key);
        self.evacuees.extend(s.evacuees);
        self.historical += usize::from(m.env.header.historical);
    }

    async fn until_all(
        &mut self,
        rx: &mut mpsc::UnboundedReceiver<Received>,
        want: &std::collections::BTreeSet<u32>,
        log: impl Fn() -> String,
    ) {
        let deadline = Instant::now() + LONG_WAIT;
        while !want.is_subset(&self.evacuees) {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(m)) => self.take(&m),
                _ => panic!(
                    "missing reports {:?}; log:\n{}",
                    want.difference(&self.evacuees).collect::<Vec<_>>(),
                    log()
                ),
            }
        }
        let mut sorted = self.first_arrivals.clone();
        sorted.sort();
        assert_eq!(self.first_arrivals, sorted, "reports out of order");
    }
}

#[tokio::test]
async fn confirmed_reports_survive_kill_9_of_report_and_daemon_and_arrive_once_in_order() {
    if !Path::new(MOSQUITTO).exists() {
        eprintln!("SKIPPED: {MOSQUITTO} is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(dir.path(), port, "");
    let run = ["run", "--config", config.to_str().unwrap()];
    // No broker yet: the site is offline.
    let mut daemon = Agent::spawn(&run, dir.path(), "daemon-0");
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
            daemon.child.kill().unwrap();
            daemon.child.wait().unwrap();
            daemon = Agent::spawn(&run, dir.path(), &format!("daemon-{i}"));
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
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    let broker = Broker::start_on(port);
    let (_sub, mut rx) = subscribe(&broker, "hq-watch", renkei_shared::topic::ALL).await;
    let daemon = Agent::spawn(&run, dir.path(), "daemon-final");
    let mut hq = Hq::default();
    hq.until_all(&mut rx, &confirmed, || daemon.log()).await;
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
    let Some(broker) = Broker::start() else {
        return;
    };
    let port = broker.port;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), port, "replay_rate = 20");
    let (_sub, mut rx) = subscribe(&broker, "hq-watch", renkei_shared::topic::ALL).await;
    let agent = Agent::spawn(
        &["run", "--config", config.to_str().unwrap()],
        dir.path(),
        "agent",
    );
    next(&mut rx, &agent, "birth", |m| is_life(m, true)).await;
    let mut hq = Hq::default();
    let live: std::collections::BTreeSet<u32> = (1..=3).collect();
    for n in &live {
        let (ok, text) = report(&config, &["shelter", "--evacuees", &n.to_string()]);
        assert!(ok, "{text}");
    }
    hq.until_all(&mut rx, &live, || agent.log()).await;

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
    let broker = Broker::start_on(port);
    let (_sub, mut rx) = subscribe(&broker, "hq-watch-2", renkei_shared::topic::ALL).await;
    agent.signal("CONT");
    let started = Instant::now();
    hq.until_all(&mut rx, &offline, || agent.log()).await;
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
    let Some(broker) = Broker::start() else {
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

    let (_sub, mut rx) = subscribe(&broker, "hq-watch", renkei_shared::topic::ALL).await;
    let agent = Agent::spawn(
        &["run", "--config", config.to_str().unwrap()],
        dir.path(),
        "agent",
    );
    let mut hq = Hq::default();
    hq.until_all(&mut rx, &[1].into(), || agent.log()).await;
    let (ok, text) = report(&config, &["shelter", "--evacuees", "4"]);
    assert!(ok, "{text}");
    hq.until_all(&mut rx, &[4].into(), || agent.log()).await;
    let status = agent_status(&config);
    assert!(status.contains("quarantined:     1"), "{status}");
    assert!(outbox.join("quarantine").read_dir().unwrap().count() == 1);
}

#[tokio::test]
async fn a_full_outbox_refuses_new_reports_with_an_alarm_and_keeps_the_saved_ones() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), free_port(), "outbox_max = \"64KiB\"");
    let note = "x".repeat(3000);
    let mut saved = 0;
    let refusal = loop {
        let (ok, text) = report(
            &config,
            &[
                "request",
                "--item",
                "water",
                "--quantity",
                "10",
                "--note",
                &note,
            ],
        );
        if !ok {
            break text;
        }
        saved += 1;
        assert!(saved < 100, "the outbox never filled");
    };
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
    let Some(broker) = Broker::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        broker.port,
        "outbox_max = \"64KiB\"\nreplay_rate = 50",
    );
    // Filled while no daemon runs, until staff are told "NOT saved".
    let note = "x".repeat(3000);
    let mut saved = 0;
    loop {
        let (ok, text) = report(
            &config,
            &[
                "request",
                "--item",
                "water",
                "--quantity",
                "10",
                "--note",
                &note,
            ],
        );
        if !ok {
            assert!(text.contains("outbox is full"), "{text}");
            break;
        }
        saved += 1;
        assert!(saved < 100, "the outbox never filled");
    }

    let (_sub, mut rx) = subscribe(&broker, "hq-watch", renkei_shared::topic::ALL).await;
    let agent = Agent::spawn(
        &["run", "--config", config.to_str().unwrap()],
        dir.path(),
        "agent",
    );
    let mut hq = renkei_shared::State::new();
    let mut requests = 0;
    let alarmed = next(&mut rx, &agent, "a status with the alarm", |m| {
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
    let cleared = next(&mut rx, &agent, "a status without the alarm", |m| {
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
    let Some(broker) = Broker::start() else {
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

    let (_sub, mut rx) = subscribe(&broker, "hq-watch", renkei_shared::topic::ALL).await;
    let agent = Agent::spawn(
        &["run", "--config", config.to_str().unwrap()],
        dir.path(),
        "agent",
    );
    let snapshot = next(&mut rx, &agent, "the snapshot status", |m| {
        match &m.env.body {
            Body::Status(s) => Some((m.env.header.seq, s.outbox_alarm)),
            _ => None,
        }
    })
    .await;
    assert!(snapshot.1, "the snapshot carries the alarm");
    // No heartbeat fits in the outbox, so they go live, still flagged.
    let live = next(&mut rx, &agent, "a live heartbeat", |m| match &m.env.body {
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

// ---------------------------------------------------------------------------------------------
// TLS: mqtts:// against Mosquitto's TLS listener, certificates made here.

/// A CA and a server certificate for 127.0.0.1 and localhost, as PEM files in `dir`.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn make_pki(dir: &Path, name: &str) -> Pki {
    let ca_key = rcgen::KeyPair::generate().expect("test PKI");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("test PKI");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} test CA"));
    let ca_cert = ca_params.self_signed(&ca_key).expect("test PKI");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().expect("test PKI");
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("test PKI");
    let cert = params.signed_by(&key, &issuer).expect("test PKI");
    let pki = Pki {
        ca: dir.join(format!("{name}-ca.pem")),
        cert: dir.join(format!("{name}-cert.pem")),
        key: dir.join(format!("{name}-key.pem")),
    };
    std::fs::write(&pki.ca, ca_cert.pem()).expect("test PKI");
    std::fs::write(&pki.cert, cert.pem()).expect("test PKI");
    std::fs::write(&pki.key, key.serialize_pem()).expect("test PKI");
    pki
}

/// A Mosquitto with a plain listener (for the test's subscriber) and a TLS one serving `pki`.
fn tls_broker(pki: &Pki) -> Option<(Broker, u16)> {
    if !Path::new(MOSQUITTO).exists() {
        eprintln!("SKIPPED: {MOSQUITTO} is not installed");
        return None;
    }
    let (plain, tls) = (free_port(), free_port());
    let extra = format!(
        "listener {tls} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
        pki.ca.display(),
        pki.cert.display(),
        pki.key.display()
    );
    Some((Broker::start_conf(plain, &extra, Some(tls)), tls))
}

#[tokio::test]
async fn over_tls_birth_and_status_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path(), "hq");
    let Some((broker, tls_port)) = tls_broker(&pki) else {
        return;
    };
    let (_sub, mut rx) = subscribe(&broker, "hq-watch", renkei_shared::topic::ALL).await;
    let url = format!("mqtts://127.0.0.1:{tls_port}");
    let state = dir.path().join("state");
    let mut args = run_args(&url, state.to_str().unwrap(), "1s");
    args.extend(["--ca-file", pki.ca.to_str().unwrap()]);
    let agent = Agent::spawn(&args, dir.path(), "agent");
    let birth = next(&mut rx, &agent, "birth over TLS", |m| is_life(m, true)).await;
    assert_eq!(birth.env.header.origin, Origin::Site(site()));
    let status = next(&mut rx, &agent, "status over TLS", |m| match &m.env.body {
        Body::Status(s) => Some(s.clone()),
        _ => None,
    })
    .await;
    assert_eq!(status.name, "西新宿小学校");
    next(&mut rx, &agent, "shelter over TLS", |m| {
        matches!(m.env.body, Body::Shelter(_)).then_some(())
    })
    .await;
    let log = agent.log();
    assert!(
        log.contains(&format!("mqtts://127.0.0.1:{tls_port}")),
        "{log}"
    );
}

#[tokio::test]
async fn over_tls_a_wrong_ca_is_refused_clearly_and_retried_and_no_ca_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path(), "hq");
    let other = make_pki(dir.path(), "other");
    let Some((broker, tls_port)) = tls_broker(&pki) else {
        return;
    };
    let (_sub, mut rx) = subscribe(&broker, "hq-watch", renkei_shared::topic::ALL).await;
    let url = format!("mqtts://127.0.0.1:{tls_port}");
    let state = dir.path().join("state");

    // mqtts:// without a CA file: refused at start, naming what is missing.
    let mut no_ca = Agent::spawn(
        &run_args(&url, state.to_str().unwrap(), "1s"),
        dir.path(),
        "no-ca",
    );
    assert!(!no_ca.wait_exit().success());
    let log = no_ca.log();
    assert!(log.contains("mqtts:// needs ca_file"), "{log}");

    // A CA that did not sign the broker's certificate: every attempt fails the handshake,
    // says why, and backs off.
    let mut args = run_args(&url, state.to_str().unwrap(), "1s");
    args.extend(["--ca-file", other.ca.to_str().unwrap()]);
    let agent = Agent::spawn(&args, dir.path(), "wrong-ca");
    let deadline = Instant::now() + WAIT;
    loop {
        let log = agent.log();
        if log.matches("TLS handshake failed").count() >= 2 {
            assert!(log.contains("retry_in_ms"), "{log}");
            assert!(log.to_lowercase().contains("certificate"), "{log}");
            break;
        }
        assert!(Instant::now() < deadline, "no retried TLS failure:\n{log}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Nothing got through.
    assert!(
        timeout(Duration::from_millis(300), rx.recv())
            .await
            .is_err(),
        "a message arrived over an untrusted link"
    );
}

// ---------------------------------------------------------------------------------------------
// The staff web form, served by the daemon, over a plain socket as a phone would use it.

/// One HTTP/1.1 request as a browser on the page sends it: (status code, body). A POST
/// carries the CSRF token of a freshly loaded page and the form's own Origin.
fn http(port: u16, method: &str, path: &str, form: &str) -> (u16, String) {
    if method == "POST" {
        let (_, page) = raw_http(port, "GET", "/", "");
        let marker = "name=\"csrf\" value=\"";
        let token = page
            .split_once(marker)
            .and_then(|(_, rest)| rest.split('"').next())
            .expect("a CSRF token in the page");
        return raw_http(port, method, path, &format!("{form}&csrf={token}"));
    }
    raw_http(port, method, path, form)
}

fn raw_http(port: u16, method: &str, path: &str, form: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the web form");
    stream.set_read_timeout(Some(WAIT)).expect("read timeout");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Origin: http://127.0.0.1:{port}\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
        form.len()
    );
    stream
        .write_all(request.as_bytes())
        .expect("send the request");
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .expect("read the response");
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test]
async fn the_web_form_saves_a_shelter_report_that_reaches_hq_and_refuses_bad_input() {
    let Some(broker) = Broker::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let form_port = free_port();
    let config = write_config(
        dir.path(),
        broker.port,
        &format!("form_listen = \"127.0.0.1:{form_port}\"\nform_pin = \"246810\""),
    );
    let (_sub, mut rx) = subscribe(&broker, "hq-watch", renkei_shared::topic::ALL).await;
    let agent = Agent::spawn(
        &["run", "--config", config.to_str().unwrap()],
        dir.path(),
        "agent",
    );
    next(&mut rx, &agent, "birth", |m| is_life(m, true)).await;
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", form_port)).is_err() {
        assert!(Instant::now() < deadline, "no web form:\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (code, page) = http(form_port, "GET", "/", "");
    assert_eq!(code, 200, "{page}");
    assert_eq!(http(form_port, "GET", "/report/shelter", "").0, 200);
    for text in [
        "避難所状況 / Shelter status",
        "物資要請 / Supply request",
        "被害報告 / Incident",
        "接続中 / connected",
        "送信待ち / queue depth",
        "訓練 / EXERCISE",
        "暗証番号 / PIN",
    ] {
        assert!(page.contains(text), "{text} missing:\n{page}");
    }

    // Refused, each with its reason in both languages, and nothing stored.
    let (code, page) = http(
        form_port,
        "POST",
        "/report/shelter",
        "evacuees=321&pin=111111",
    );
    assert_eq!(code, 403);
    assert!(
        page.contains("暗証番号が違います") && page.contains("wrong PIN"),
        "{page}"
    );
    let (code, page) = http(
        form_port,
        "POST",
        "/report/shelter",
        "evacuees=50&households=80&pin=246810",
    );
    assert_eq!(code, 422);
    assert!(
        page.contains("入力が正しくありません / invalid input") && page.contains("--households"),
        "{page}"
    );
    // The form comes back filled in, so staff only fix the wrong field.
    assert!(
        page.contains(
            "name=\"evacuees\" type=\"number\" min=\"0\" inputmode=\"numeric\" value=\"50\""
        ) && page.contains("value=\"80\""),
        "{page}"
    );
    let (code, page) = http(
        form_port,
        "POST",
        "/report/shelter",
        "evacuees=abc&pin=246810",
    );
    assert_eq!(code, 422);
    assert!(page.contains("abc") && page.contains("evacuees"), "{page}");
    let (code, page) = http(
        form_port,
        "POST",
        "/report/request",
        "item=water&quantity=0&note=%3Cscript%3E&pin=246810",
    );
    assert_eq!(code, 422);
    assert!(
        page.contains("&lt;script&gt;") && !page.contains("<script>"),
        "{page}"
    );

    let (code, page) = http(
        form_port,
        "POST",
        "/report/shelter",
        "evacuees=321&capacity=400&state=open&households=100&elderly=5&pin=246810",
    );
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("保存しました / saved (seq"), "{page}");
    assert!(page.contains("queue depth"), "{page}");
    // The first shelter report HQ sees is this one: none of the refused ones was stored.
    let shelter = next(&mut rx, &agent, "the posted shelter report", |m| {
        match &m.env.body {
            Body::Shelter(s) => Some(s.clone()),
            _ => None,
        }
    })
    .await;
    assert_eq!(shelter.evacuees, Some(321));
    assert_eq!(shelter.capacity, Some(400));
    assert_eq!(shelter.households, Some(100));
    assert_eq!(shelter.care.elderly, Some(5));
    assert_eq!(shelter.state, ShelterState::Open);

    let (code, page) = http(
        form_port,
        "POST",
        "/report/request",
        "item=water&quantity=20&note=for+the+gym&pin=246810",
    );
    assert_eq!(code, 200, "{page}");
    assert!(page.contains(", id req-"), "{page}");
    let request = next(&mut rx, &agent, "the posted request", |m| {
        match &m.env.body {
            Body::Request(r) => Some(r.clone()),
            _ => None,
        }
    })
    .await;
    assert_eq!(
        (request.quantity, request.note.as_str()),
        (20, "for the gym")
    );
}
