//! External-broker mode against a real Mosquitto 2.0 from Debian, started here on free ports
//! (MQTT and WebSocket listeners, `max_queued_messages 0`, anonymous clients, no persistence;
//! for `mqtts://`, a TLS listener with a certificate made by rcgen).

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use renkei_shared::{Topic, encode, topic};
use renkei_testkit::{
    BrokerProcess, Mosquitto, MqttClient, ROOT, eventually, free_port, http_get, http_get_as,
    make_pki, metric, sample_status, scrape, start_refused, with_users,
};
use rumqttc::QoS;

/// The retained message on `topic` at Mosquitto, read by a fresh subscriber.
async fn retained(mosquitto: &Mosquitto, topic: &str) -> Option<rumqttc::Publish> {
    let mut reader = MqttClient::connect(mosquitto.addr(), "retained-reader").await;
    reader.subscribe(topic).await;
    reader.publish_within(Duration::from_secs(2)).await
}

fn db_keys(db: &Path) -> Vec<(String, i64, i64)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT key, boot, seq FROM messages JOIN origins ON origins.id = origin_id")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agents_message_through_mosquitto_is_recorded_mirrored_and_restored() {
    let mosquitto = Mosquitto::start();
    let config = format!(
        "[external]\nws_url = \"ws://127.0.0.1:{}/mqtt\"\n",
        mosquitto.ws_port
    );
    let url = mosquitto.url();
    let args = [
        "--external",
        url.as_str(),
        "--external-client-id",
        "renkei-a",
    ];
    let broker = BrokerProcess::start_in(with_users(&config), &args);
    let addrs = broker.addrs;
    // The ready line names the external broker, and browsers are sent to its WebSocket.
    assert_eq!(addrs.mqtt.port(), mosquitto.port);
    assert_eq!(addrs.ws.map(|ws| ws.port()), Some(mosquitto.ws_port));
    assert_eq!(addrs.mqtts, None);
    let config = http_get(addrs.http, "/config.json").await.json();
    assert_eq!(
        config["mqtt_ws_url"],
        format!("ws://127.0.0.1:{}/mqtt", mosquitto.ws_port)
    );

    // An integrator on Mosquitto sees the JSON mirror of an agent's report sent to Mosquitto.
    let mut integrator = MqttClient::connect(addrs.mqtt, "integrator").await;
    integrator.subscribe(topic::ALL_JSON).await;
    let mut agent = MqttClient::connect(addrs.mqtt, "agent-nishi").await;
    let first = sample_status(1);
    let status_topic = Topic::of(&first).unwrap();
    let renkei_shared::Origin::Site(site) = &first.header.origin else {
        unreachable!("a status comes from a site")
    };
    let receipts = renkei_shared::receipt_topic(site);
    agent.subscribe(&receipts).await;
    agent.send(&first).await;
    let mirrored = integrator.next_publish().await;
    assert_eq!(mirrored.topic, status_topic.json());
    assert!(mirrored.retain || mirrored.qos == QoS::AtLeastOnce);
    let json: serde_json::Value = serde_json::from_slice(&mirrored.payload).unwrap();
    assert_eq!(json["header"]["seq"], 1);
    eventually("the state to show the site", || async {
        let state = http_get_as(addrs.http, "/api/v1/state", ROOT).await.json();
        (state["sites"].as_array()?.len() == 1).then_some(())
    })
    .await;
    eventually("the message recorded", || async {
        let text = scrape(addrs.http, ROOT).await;
        (metric(&text, "renkei_recorder_rows_total") == Some(1)).then_some(())
    })
    .await;
    // Once recorded, the agent's receipt comes back through Mosquitto.
    let receipt = agent.next_publish().await;
    assert_eq!(receipt.topic, receipts);
    let receipt = renkei_shared::Receipt::decode(&receipt.payload).unwrap();
    assert!(receipt.covers(first.header.boot, 1), "{receipt:?}");

    // While the broker is down a newer report reaches Mosquitto: the restart must not put the
    // older retained copy from its database back over it, and the persistent session hands
    // the missed message over.
    let (exit, dir) = broker.terminate_keeping_dir();
    assert!(exit.success());
    let second = sample_status(2);
    agent.send(&second).await;
    eventually("Mosquitto to retain the newer report", || async {
        let p = retained(&mosquitto, &status_topic.to_string()).await?;
        (renkei_shared::decode(&p.payload).ok()?.header.seq == 2).then_some(())
    })
    .await;
    let broker = BrokerProcess::start_in(dir, &args);
    let addrs = broker.addrs;
    eventually("the missed report recorded", || async {
        let text = scrape(addrs.http, ROOT).await;
        (metric(&text, "renkei_recorder_rows_total") == Some(1)).then_some(())
    })
    .await;
    let p = retained(&mosquitto, &status_topic.to_string())
        .await
        .unwrap();
    assert_eq!(renkei_shared::decode(&p.payload).unwrap().header.seq, 2);
    let (exit, dir) = broker.terminate_keeping_dir();
    assert!(exit.success());
    let keys = db_keys(&dir.path().join("data/renkei.db"));
    assert_eq!(keys.len(), 2, "both reports recorded once: {keys:?}");

    // A fresh Mosquitto holds nothing: the restart publishes the restored state to it.
    let (port, ws_port) = (mosquitto.port, mosquitto.ws_port);
    drop(integrator);
    drop(agent);
    drop(mosquitto);
    let mosquitto = Mosquitto::setup().port(port).ws_port(ws_port).start();
    assert!(
        retained(&mosquitto, &status_topic.to_string())
            .await
            .is_none()
    );
    let broker = BrokerProcess::start_in(dir, &args);
    let p = retained(&mosquitto, &status_topic.to_string())
        .await
        .unwrap();
    assert_eq!(renkei_shared::decode(&p.payload).unwrap().header.seq, 2);
    let p = retained(&mosquitto, &status_topic.json()).await.unwrap();
    let json: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
    assert_eq!(json["header"]["seq"], 2);
    assert!(broker.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_in_one_share_group_split_the_stream_and_record_each_message_once() {
    const N: u64 = 300;
    let mosquitto = Mosquitto::start();
    let url = mosquitto.url();
    let start = |id: &str| {
        BrokerProcess::start_in(
            with_users("[rules]\nenabled = false\n"),
            &["--external", &url, "--external-client-id", id],
        )
    };
    let a = start("renkei-a");
    let b = start("renkei-b");
    // Mosquitto hands a shared subscription's messages to one member at a time, to MQTT
    // 3.1.1 clients (rumqttc here) as to v5 ones.
    let agent = MqttClient::connect(mosquitto.addr(), "agent-nishi").await;
    for seq in 1..=N {
        let env = sample_status(seq);
        agent
            .client
            .publish(
                Topic::of(&env).unwrap().to_string(),
                QoS::AtLeastOnce,
                false,
                encode(&env).unwrap(),
            )
            .await
            .unwrap();
    }
    let rows = |text: &str| metric(text, "renkei_recorder_rows_total").unwrap_or(0);
    let (rows_a, rows_b) = eventually("every message recorded by one instance", || async {
        let ra = rows(&scrape(a.addrs.http, ROOT).await);
        let rb = rows(&scrape(b.addrs.http, ROOT).await);
        (ra + rb >= N as i64).then_some((ra, rb))
    })
    .await;
    // Nothing more arrives late.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        rows(&scrape(a.addrs.http, ROOT).await) + rows(&scrape(b.addrs.http, ROOT).await),
        N as i64
    );
    assert!(rows_a > 0 && rows_b > 0, "split {rows_a} / {rows_b}");
    let (exit_a, dir_a) = a.terminate_keeping_dir();
    let (exit_b, dir_b) = b.terminate_keeping_dir();
    assert!(exit_a.success() && exit_b.success());
    let keys_a = db_keys(&dir_a.path().join("data/renkei.db"));
    let keys_b = db_keys(&dir_b.path().join("data/renkei.db"));
    let set_a: HashSet<_> = keys_a.iter().cloned().collect();
    let set_b: HashSet<_> = keys_b.iter().cloned().collect();
    assert!(set_a.is_disjoint(&set_b), "a message recorded by both");
    assert_eq!(set_a.len() + set_b.len(), N as usize);
    eprintln!(
        "shared subscription split: {} / {}",
        set_a.len(),
        set_b.len()
    );
}

#[test]
fn an_unreachable_external_broker_stops_the_start() {
    let url = format!("mqtt://127.0.0.1:{}", free_port());
    let stderr = refused_start(&url, &[]);
    assert!(stderr.contains(&url), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mqtts_with_the_clusters_ca_a_message_is_recorded_and_mirrored() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = make_pki(pki_dir.path(), "cluster");
    let mosquitto = Mosquitto::setup().tls(None, &pki).start();
    let tls_port = mosquitto.tls_port.unwrap();
    let url = format!("mqtts://127.0.0.1:{tls_port}");
    let config = format!("[external]\nca_file = {:?}\n", pki.ca.display().to_string());
    let broker = BrokerProcess::start_in(
        with_users(&config),
        &["--external", &url, "--external-client-id", "renkei-tls"],
    );
    let addrs = broker.addrs;
    assert_eq!(addrs.mqtt.port(), tls_port);

    // The agent and the integrator use Mosquitto's plain listener: only Renkei speaks TLS, so
    // the mirror reaching the integrator went in and out over it.
    let mut integrator = MqttClient::connect(mosquitto.addr(), "integrator").await;
    integrator.subscribe(topic::ALL_JSON).await;
    let agent = MqttClient::connect(mosquitto.addr(), "agent-nishi").await;
    let report = sample_status(1);
    agent.send(&report).await;
    let mirrored = integrator.next_publish().await;
    assert_eq!(mirrored.topic, Topic::of(&report).unwrap().json());
    eventually("the message recorded", || async {
        let text = scrape(addrs.http, ROOT).await;
        (metric(&text, "renkei_recorder_rows_total") == Some(1)).then_some(())
    })
    .await;
    let state = http_get_as(addrs.http, "/api/v1/state", ROOT).await.json();
    assert_eq!(state["sites"].as_array().map(Vec::len), Some(1), "{state}");
    assert!(broker.terminate().success());
}

/// `serve` against `url` with `extra` flags; it must not start. Its stderr.
fn refused_start(url: &str, extra: &[&str]) -> String {
    let args = [&["--http", "127.0.0.1:0", "--external", url], extra].concat();
    start_refused("", &args)
}

#[test]
fn an_mqtts_broker_whose_certificate_is_not_trusted_stops_the_start() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = make_pki(pki_dir.path(), "cluster");
    let mosquitto = Mosquitto::setup().tls(None, &pki).start();
    let tls_port = mosquitto.tls_port.unwrap();
    // Without external.ca_file the system's roots are trusted, and they do not hold the
    // test's CA.
    let url = format!("mqtts://127.0.0.1:{tls_port}");
    let stderr = refused_start(&url, &[]);
    assert!(
        stderr.contains(&url) && stderr.contains("certificate"),
        "{stderr}"
    );
    // A CA file with a plain URL would send the password in the clear: refused too.
    let ca = pki.ca.display().to_string();
    let plain = format!("mqtt://127.0.0.1:{tls_port}");
    let stderr = refused_start(&plain, &["--external-ca-file", &ca]);
    assert!(stderr.contains("not an mqtts:// URL"), "{stderr}");
}
