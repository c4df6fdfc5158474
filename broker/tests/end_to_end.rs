//! The real broker, driven from outside over MQTT, WebSocket and HTTP: the binary as a
//! process, or the library in this process where a test reaches into its state. Everything it
//! starts and every client comes from `renkei-testkit`.
// Helpers and tests panic on failure, like the assertions they make.
#![allow(clippy::unwrap_used)]

mod access;
mod api;
mod burst;
mod external;
mod file_modes;
mod filter_memory;
mod http_limits;
mod idle_sockets;
mod persistence;
mod receipts;
mod rules;
mod sessions;
mod tls;

use renkei_shared::codec::SCHEMA_VERSION;
use renkei_shared::{Envelope, Topic, encode, sample, topic};
use renkei_testkit::mqtt::websocket_upgrade;
use renkei_testkit::{
    BrokerProcess, InProcessBroker, MqttClient, PATIENCE, eventually, http_get, metric, options,
    scrape, start_refused,
};
use rumqttc::QoS;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingests_mirrors_and_counts_over_real_mqtt() {
    let broker = BrokerProcess::start();
    let addrs = broker.addrs;
    assert!(broker.data_dir().is_dir(), "data directory created");

    let mut integrator = MqttClient::connect(addrs.mqtt, "integrator").await;
    integrator.subscribe(topic::ALL_JSON).await;
    let agent = MqttClient::connect(addrs.mqtt, "agent-nishi-shinjuku-es").await;

    let status = sample::status();
    let status_topic = Topic::of(&status).unwrap().to_string();
    let status_bytes = encode(&status).unwrap();
    // Refused input first: the broker must count it and carry on.
    // (A topic outside the tree, e.g. …/weather, is refused earlier, by access control: see
    // tests/access.rs.)
    let refused: [(&str, Vec<u8>); 2] = [
        (&status_topic, vec![SCHEMA_VERSION, 0xff, 0xff, 0xff]),
        // Another site's topic: demo mode lets anonymous clients publish any site's topic, but
        // the message inside must belong there.
        ("renkei/v1/131016/chiyoda-es/status", status_bytes),
    ];
    for (topic, payload) in refused {
        agent
            .client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    // Then a real heartbeat, retained as agents send it.
    agent.send(&status).await;

    // The JSON mirror carries the accepted message, and only that one.
    let mirrored = integrator.next_publish().await;
    assert_eq!(
        mirrored.topic,
        "renkei/json/v1/131041/nishi-shinjuku-es/status"
    );
    let envelope: Envelope = serde_json::from_slice(&mirrored.payload).unwrap();
    assert_eq!(envelope, status);
    // A redelivery (QoS 1 after a lost PUBACK) is accepted but not mirrored again.
    agent.send(&status).await;

    // The live state shows it.
    let state = eventually("the site in /api/v1/state", || async {
        let state = http_get(addrs.http, "/api/v1/state?mode=actual")
            .await
            .json();
        let heard = state["sites"].as_array().is_some_and(|s| !s.is_empty());
        heard.then_some(state)
    })
    .await;
    let site = &state["sites"][0];
    assert_eq!(site["ward"], 131041);
    assert_eq!(site["site"], "nishi-shinjuku-es");
    assert_eq!(site["name"], "西新宿小学校");
    assert_eq!(site["status"]["value"]["interval_s"], 30);
    let wards = state["wards"].as_array().unwrap();
    assert_eq!(wards.len(), 23);
    let shinjuku = wards.iter().find(|w| w["ward"] == 131041).unwrap();
    assert_eq!(shinjuku["sites"], 1);

    // Every refusal is counted by reason.
    let metrics = eventually("refusals in /metrics", || async {
        let text = scrape(addrs.http, None).await;
        let counted = ["malformed", "wrong_topic"].iter().all(|reason| {
            metric(
                &text,
                &format!("renkei_messages_rejected_total{{reason=\"{reason}\"}}"),
            ) == Some(1)
        });
        let accepted = metric(&text, "renkei_messages_accepted_total{kind=\"status\"}");
        (counted && accepted == Some(2)).then_some(text)
    })
    .await;
    assert_eq!(
        metric(
            &metrics,
            "renkei_state_changes_total{outcome=\"duplicate\"}"
        ),
        Some(1)
    );
    assert_eq!(metric(&metrics, "renkei_json_republished_total"), Some(1));
    let tcp = metric(&metrics, "renkei_mqtt_connections{listener=\"tcp\"}").unwrap();
    assert!(tcp >= 2, "integrator and agent are connected: {tcp}");

    // Still serving: health, and a late integrator receives the retained mirror at once.
    let health = http_get(addrs.http, "/healthz").await;
    assert_eq!((health.status, health.text().as_str()), (200, "ok"));
    let mut late = MqttClient::connect(addrs.mqtt, "late-integrator").await;
    late.subscribe(topic::ALL_JSON).await;
    let retained = late.next_publish().await;
    assert!(retained.retain, "the mirror of a status is retained");
    assert_eq!(retained.topic, mirrored.topic);

    let exit = broker.terminate();
    assert!(exit.success(), "SIGTERM exits cleanly: {exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_finds_the_websocket_and_it_speaks_mqtt() {
    let broker = BrokerProcess::start();
    let addrs = broker.addrs;

    let config = http_get(addrs.http, "/config.json").await;
    assert_eq!(config.status, 200);
    assert!(
        config
            .head
            .to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{}",
        config.head
    );
    assert_eq!(
        config.json()["mqtt_ws_url"],
        format!("ws://127.0.0.1:{}", addrs.ws.unwrap().port())
    );
    assert_eq!(config.json()["auth_required"], false, "demo mode");
    let index = http_get(addrs.http, "/").await;
    assert_eq!(index.status, 200);
    assert!(index.text().contains("renkei dashboard"));

    // A browser's upgrade request: Chromium refuses the socket unless `mqtt` is answered.
    let (_ws, head) = websocket_upgrade(addrs.ws.unwrap()).await;
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("sec-websocket-protocol: mqtt\r\n"), "{head}");
    // The accept key of RFC 6455's own example.
    assert!(
        head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n"),
        "{head}"
    );

    assert!(broker.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_take_the_ingest_links_id() {
    let broker = BrokerProcess::start();
    let addrs = broker.addrs;

    let (_client, mut eventloop) =
        rumqttc::AsyncClient::new(options(addrs.mqtt, "renkei-broker-ingest"), 8);
    let first = tokio::time::timeout(PATIENCE, eventloop.poll())
        .await
        .unwrap();
    assert!(first.is_err(), "reserved client id refused: {first:?}");

    // Ingest still consumes.
    let agent = MqttClient::connect(addrs.mqtt, "agent").await;
    agent.send(&sample::status()).await;
    eventually("the heartbeat accepted", || async {
        let text = scrape(addrs.http, None).await;
        (metric(&text, "renkei_messages_accepted_total{kind=\"status\"}") == Some(1)).then_some(())
    })
    .await;
    assert!(broker.log().contains("reserved prefix"));
    assert!(broker.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_garbage_is_counted_but_not_logged_line_by_line() {
    const FLOOD: i64 = 500;
    let broker = BrokerProcess::start();
    let addrs = broker.addrs;
    let agent = MqttClient::connect(addrs.mqtt, "broken-agent").await;
    let status_topic = Topic::of(&sample::status()).unwrap().to_string();
    for _ in 0..FLOOD {
        agent
            .client
            .publish(
                &status_topic,
                QoS::AtLeastOnce,
                false,
                vec![SCHEMA_VERSION, 0xff],
            )
            .await
            .unwrap();
    }
    eventually("every refusal counted", || async {
        let text = scrape(addrs.http, None).await;
        (metric(
            &text,
            "renkei_messages_rejected_total{reason=\"malformed\"}",
        ) == Some(FLOOD))
        .then_some(())
    })
    .await;
    let logged = broker
        .log()
        .lines()
        .filter(|l| l.contains("refused message"))
        .count();
    // A few lines per second at most, however long the flood took here.
    assert!(
        (1..=30).contains(&logged),
        "{logged} lines for {FLOOD} refusals"
    );
    assert_eq!(http_get(addrs.http, "/healthz").await.status, 200);
    assert!(broker.terminate().success());
}

/// In process, through the library: ingest is held up (the live state locked) while a burst
/// arrives. The router's tap keeps the burst for it (and past its bound would hold the
/// publisher's PUBACKs); once ingest runs again every message is handled, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_held_up_gets_every_message_of_a_burst_once_it_runs() {
    const BURST: u64 = 1_000;
    let broker = InProcessBroker::start(|_| {}).await;
    let addrs = broker.addrs();
    let app = broker.app_state().clone();

    let agent = MqttClient::connect(addrs.mqtt, "bursting-agent").await;
    let mut status = sample::status();
    // Hold the lock on a thread of its own: the ingest thread blocks on it, this task does not.
    let (locked_tx, locked) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let live = app.live.clone();
    let holder = std::thread::spawn(move || {
        let _held = live.write().unwrap();
        locked_tx.send(()).unwrap();
        let _ = released.recv();
    });
    locked.recv().unwrap();
    for seq in 1..=BURST {
        status.header.seq = seq;
        agent.send(&status).await;
    }
    // Let the router push to ingest until its buffer is full.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    release.send(()).unwrap();
    holder.join().unwrap();

    // A message is counted as accepted when ingest handles it, and as republished when the
    // hand-off holding its JSON copy goes to the router, a little later: wait for both.
    eventually(
        "every message of the burst ingested and mirrored",
        || async {
            let mirrored = metric(&app.metrics.render(), "renkei_json_republished_total");
            (app.metrics.accepted_total() == BURST && mirrored == Some(BURST as i64)).then_some(())
        },
    )
    .await;
    let text = app.metrics.render();
    assert_eq!(
        metric(&text, "renkei_state_changes_total{outcome=\"updated\"}"),
        Some(BURST as i64)
    );

    broker.stop().await;
}

#[test]
fn a_bad_config_key_is_named_and_the_broker_does_not_start() {
    let stderr = start_refused("[mqtt]\nlisten_addr = \"0.0.0.0:1883\"\n", &[]);
    assert!(stderr.contains("mqtt.listen_addr"), "{stderr}");
}

#[test]
fn a_taken_mqtt_port_fails_the_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mqtt = format!("127.0.0.1:{port}");
    let stderr = start_refused(
        "",
        &[
            "--mqtt",
            &mqtt,
            "--ws",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
        ],
    );
    assert!(stderr.contains("MQTT TCP listener"), "{stderr}");
    drop(taken);
}
