//! Rules → alerts against the real binary: raised, acknowledged, kept across a restart without
//! being repeated, cleared; silence; drills stay in their own world.

use std::time::Duration;

use renkei_shared::{
    AlertSource, AlertState, Body, Envelope, Id, Mode, Origin, RuleKind, ShelterState, decode,
    sample,
};
use renkei_testkit::{
    BrokerProcess, MqttClient, PASSWORD, eventually, http_get, http_get_as, login_options, metric,
    scrape,
};
use rumqttc::QoS;

const SATO: Option<(&str, &str)> = Some(("sato", PASSWORD));
const OCC: &str = "renkei/v1/hq/alert/occ-131041-nishi-shinjuku-es";

/// A sample message sent now (the samples are dated in the past, which would make the site
/// silent at once) with sequence number `seq`.
fn now(mut env: Envelope, seq: u64) -> Envelope {
    env.header.sent_at = renkei_shared::Timestamp::now();
    env.header.seq = seq;
    env
}

/// An open shelter of 100 places holding `evacuees`, sent now.
fn shelter(evacuees: u32, seq: u64) -> Envelope {
    let mut env = now(sample::shelter(), seq);
    if let Body::Shelter(s) = &mut env.body {
        s.state = ShelterState::Open;
        s.capacity = Some(100);
        s.evacuees = Some(evacuees);
    }
    env
}

/// The next alert published on `topic`, decoded.
async fn next_alert(client: &mut MqttClient, topic: &str) -> (Envelope, bool) {
    loop {
        let p = client.next_publish().await;
        if p.topic == topic {
            return (decode(&p.payload).unwrap(), p.retain);
        }
    }
}

fn alert_state(env: &Envelope) -> AlertState {
    match &env.body {
        Body::Alert(a) => a.state,
        other => panic!("not an alert: {other:?}"),
    }
}

/// HQ user `sato` under its own client id (a second connection with the same id would end the
/// first).
async fn hq_client(mqtt: std::net::SocketAddr, client_id: &str) -> MqttClient {
    MqttClient::try_connect(login_options(mqtt, client_id, "sato", PASSWORD))
        .await
        .unwrap()
}

async fn rule_alerts(addrs: &renkei_broker::Addrs, state: &str) -> i64 {
    let text = scrape(addrs.http, SATO).await;
    metric(
        &text,
        &format!("renkei_rule_alerts_total{{state=\"{state}\"}}"),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_shelter_is_alerted_acknowledged_kept_over_a_restart_and_cleared() {
    let config = "[rules]\nevaluate_every = \"300ms\"\n";
    let broker = BrokerProcess::start_with_users(config);
    let addrs = broker.addrs;
    let mut hq = MqttClient::connect_as(addrs.mqtt, "sato", PASSWORD).await;
    hq.subscribe("renkei/v1/hq/#").await;
    let agent = MqttClient::connect_as(addrs.mqtt, "agent-nishi", PASSWORD).await;
    agent.send(&now(sample::status(), 100)).await;
    agent.send(&shelter(95, 101)).await;

    // Raised by the broker, in the mode of the data, on the alert topic.
    let (raised, _) = next_alert(&mut hq, OCC).await;
    assert_eq!(raised.header.origin, Origin::Hq(Id::new("broker").unwrap()));
    assert_eq!(raised.header.boot, 1, "the broker's first boot");
    assert_eq!(raised.header.mode, Mode::Actual);
    let Body::Alert(alert) = &raised.body else {
        panic!("{raised:?}")
    };
    assert_eq!(alert.state, AlertState::Active);
    assert_eq!(alert.source, AlertSource::Rule(RuleKind::ShelterOccupancy));
    assert!(alert.headline.contains("95%"), "{}", alert.headline);
    assert!(alert.ack_required);
    // Retained: a dashboard that connects later receives it at once.
    let mut late = hq_client(addrs.mqtt, "sato-late").await;
    late.client.subscribe(OCC, QoS::AtLeastOnce).await.unwrap();
    let (retained, retain_flag) = next_alert(&mut late, OCC).await;
    assert!(retain_flag);
    assert_eq!(retained, raised);
    // The JSON mirror carries it too, and the recorder has it.
    let mut json = hq_client(addrs.mqtt, "sato-json").await;
    json.client
        .subscribe("renkei/json/v1/hq/alert/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let mirrored: Envelope = serde_json::from_slice(&json.next_publish().await.payload).unwrap();
    assert_eq!(mirrored, raised);

    // An HQ operator acknowledges; the state shows the alert with the answer.
    hq.send(&now(sample::ack(), 1)).await;
    let state = eventually("the ack in /api/v1/state", || async {
        let state = http_get_as(addrs.http, "/api/v1/state", SATO).await.json();
        let acked = state["alerts"][0]["acks"][0]["user"] == "sato";
        acked.then_some(state)
    })
    .await;
    let shown = &state["alerts"][0];
    assert_eq!(shown["alert_id"], "occ-131041-nishi-shinjuku-es");
    assert_eq!(shown["state"], "active");
    assert_eq!(shown["source"]["rule"], "shelter_occupancy");
    assert_eq!(shown["acknowledged"], true);
    assert_eq!(shown["acks"][0]["action"], "accept");
    assert_eq!(state["alerts"].as_array().unwrap().len(), 1);

    // Several evaluations later it has not been published again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(rule_alerts(&addrs, "active").await, 1);

    // A restart restores it with its ack and does not raise it again.
    let (status, dir) = broker.terminate_keeping_dir();
    assert!(status.success());
    let broker = BrokerProcess::start_in(dir, &[]);
    let addrs = broker.addrs;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(rule_alerts(&addrs, "active").await, 0, "{}", broker.log());
    let state = http_get_as(addrs.http, "/api/v1/state", SATO).await.json();
    assert_eq!(
        state["alerts"][0]["alert_id"],
        "occ-131041-nishi-shinjuku-es"
    );
    assert_eq!(state["alerts"][0]["acks"][0]["user"], "sato");

    // The shelter empties: the alert is published again as cleared, by the new boot.
    let mut hq = MqttClient::connect_as(addrs.mqtt, "sato", PASSWORD).await;
    hq.subscribe(OCC).await;
    let (restored, _) = next_alert(&mut hq, OCC).await;
    assert_eq!(
        alert_state(&restored),
        AlertState::Active,
        "retained after restart"
    );
    let agent = MqttClient::connect_as(addrs.mqtt, "agent-nishi", PASSWORD).await;
    agent.send(&shelter(50, 102)).await;
    let (cleared, _) = next_alert(&mut hq, OCC).await;
    assert_eq!(alert_state(&cleared), AlertState::Cleared);
    assert_eq!(cleared.header.boot, 2);
    eventually("no active alert in /api/v1/state", || async {
        let state = http_get_as(addrs.http, "/api/v1/state", SATO).await.json();
        state["alerts"].as_array().unwrap().is_empty().then_some(())
    })
    .await;
    eventually("raised once and cleared once, recorded", || async {
        let events = http_get_as(addrs.http, "/api/v1/events?since=0&limit=1000", SATO)
            .await
            .json();
        let alerts: Vec<String> = events["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["topic"] == OCC)
            .map(|e| {
                e["envelope"]["body"]["alert"]["state"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        (alerts == ["active", "cleared"]).then_some(())
    })
    .await;
    assert!(broker.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_drill_site_raises_a_drill_alert_only() {
    let broker = BrokerProcess::start_demo("[rules]\nevaluate_every = \"200ms\"\n");
    let addrs = broker.addrs;
    let mut hq = MqttClient::connect(addrs.mqtt, "hq-screen").await;
    hq.subscribe("renkei/v1/hq/alert/#").await;
    let agent = MqttClient::connect(addrs.mqtt, "agent-nishi-shinjuku-es").await;

    // An exercise heartbeat every second, then nothing: silent after three seconds.
    let mut status = now(sample::status(), 100);
    status.header.mode = Mode::Exercise;
    if let Body::Status(s) = &mut status.body {
        s.interval_s = 1;
    }
    agent.send(&status).await;
    let mut full = shelter(95, 101);
    full.header.mode = Mode::Exercise;
    agent.send(&full).await;

    let (occ, _) = next_alert(
        &mut hq,
        "renkei/v1/hq/alert/ex-occ-131041-nishi-shinjuku-es",
    )
    .await;
    assert_eq!(occ.header.mode, Mode::Exercise);
    let started = std::time::Instant::now();
    let (silent, _) = next_alert(
        &mut hq,
        "renkei/v1/hq/alert/ex-silent-131041-nishi-shinjuku-es",
    )
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(silent.header.mode, Mode::Exercise);
    let Body::Alert(alert) = &silent.body else {
        panic!()
    };
    assert_eq!(alert.source, AlertSource::Rule(RuleKind::SiteSilent));

    // A subscriber may hear the alert before ingest has applied it: poll the state briefly.
    let expected = [
        "ex-occ-131041-nishi-shinjuku-es",
        "ex-silent-131041-nishi-shinjuku-es",
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let ids = loop {
        let exercise = http_get(addrs.http, "/api/v1/state?mode=exercise")
            .await
            .json();
        let mut ids: Vec<String> = exercise["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["alert_id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort_unstable();
        if ids == expected || std::time::Instant::now() > deadline {
            break ids;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(ids, expected);
    let actual = http_get(addrs.http, "/api/v1/state?mode=actual")
        .await
        .json();
    assert_eq!(
        actual["alerts"],
        serde_json::json!([]),
        "nothing in the real world"
    );

    // The site speaks again: the silence alert clears.
    agent.send(&now(status.clone(), 102)).await;
    let (cleared, _) = next_alert(
        &mut hq,
        "renkei/v1/hq/alert/ex-silent-131041-nishi-shinjuku-es",
    )
    .await;
    assert_eq!(alert_state(&cleared), AlertState::Cleared);
    assert_eq!(cleared.header.mode, Mode::Exercise);
    assert!(broker.terminate().success());
}
