//! The recorder and the restart: what the broker accepted survives it, what it refused is
//! quarantined, and a client that connects after the restart sees the latest state at once.

use std::time::Duration;

use renkei_shared::codec::SCHEMA_VERSION;
use renkei_shared::{Envelope, Topic, sample, topic};
use renkei_testkit::{
    BrokerProcess, MqttClient, PASSWORD, PATIENCE, ROOT, eventually, http_get_as, metric, scrape,
};
use rumqttc::QoS;

fn count(db: &std::path::Path, sql: &str) -> i64 {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row(sql, [], |r| r.get(0)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_survives_a_restart_and_refusals_are_quarantined() {
    let broker = BrokerProcess::start_with_users("");
    let addrs = broker.addrs;
    let agent = MqttClient::connect_as(addrs.mqtt, "agent-nishi", PASSWORD).await;
    let status_topic = Topic::of(&sample::status()).unwrap().to_string();
    for env in [sample::status(), sample::shelter(), sample::status()] {
        agent.send(&env).await;
    }
    // Refused by ingest, quarantined: malformed, and over the 16 KiB frame limit (yet within
    // the MQTT packet limit).
    for payload in [
        vec![SCHEMA_VERSION, 0xff, 0xff],
        vec![SCHEMA_VERSION; 18 * 1024],
    ] {
        agent
            .client
            .publish(&status_topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    eventually("recorded", || async {
        let text = scrape(addrs.http, ROOT).await;
        let rows = metric(&text, "renkei_recorder_rows_total").unwrap_or(0);
        (rows == 5).then_some(())
    })
    .await;
    // Over the MQTT packet limit: the broker drops the connection, counts it and carries on.
    let mut big = MqttClient::connect_as(addrs.mqtt, "agent-nishi", PASSWORD).await;
    big.client
        .publish(&status_topic, QoS::AtLeastOnce, false, vec![0u8; 40 * 1024])
        .await
        .unwrap();
    assert!(big.closed_within(PATIENCE).await);
    let text = scrape(addrs.http, ROOT).await;
    for (reason, n) in [("malformed", 1), ("too_large", 1), ("oversize_packet", 1)] {
        assert_eq!(
            metric(
                &text,
                &format!("renkei_messages_rejected_total{{reason=\"{reason}\"}}")
            ),
            Some(n),
            "{reason}\n{text}"
        );
    }
    assert!(metric(&text, "renkei_database_bytes").unwrap_or(0) > 0);
    assert_eq!(metric(&text, "renkei_recorder_queue"), Some(0));
    drop(agent);

    let (exit, dir) = broker.terminate_keeping_dir();
    assert!(exit.success());
    let db = dir.path().join("data/renkei.db");
    // The redelivered status is recorded once.
    assert_eq!(count(&db, "SELECT COUNT(*) FROM messages"), 2);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM quarantine"), 2);
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM messages WHERE kind = 'shelter' AND ward = 131041"
        ),
        1
    );

    // After the restart a new subscriber receives the latest state, in both trees.
    let broker = BrokerProcess::start_in(dir, &[]);
    let addrs = broker.addrs;
    let mut hq = MqttClient::connect_as(addrs.mqtt, "sato", PASSWORD).await;
    hq.subscribe(topic::ALL).await;
    let mut got = Vec::new();
    for _ in 0..2 {
        let p = hq.next_publish().await;
        assert!(p.retain);
        got.push((p.topic.clone(), renkei_shared::decode(&p.payload).unwrap()));
    }
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        [
            (
                "renkei/v1/131041/nishi-shinjuku-es/shelter".to_owned(),
                sample::shelter()
            ),
            (status_topic.clone(), sample::status()),
        ]
    );
    let mut integrator = MqttClient::connect_as(addrs.mqtt, "dis", PASSWORD).await;
    integrator.subscribe(topic::ALL_JSON).await;
    for _ in 0..2 {
        let p = integrator.next_publish().await;
        let env: Envelope = serde_json::from_slice(&p.payload).unwrap();
        assert_eq!(p.topic, Topic::of(&env).unwrap().json());
    }
    assert!(
        integrator
            .publish_within(Duration::from_millis(500))
            .await
            .is_none()
    );
    let state = http_get_as(addrs.http, "/api/v1/state", Some(("sato", PASSWORD)))
        .await
        .json();
    assert_eq!(state["sites"][0]["site"], "nishi-shinjuku-es");
    assert_eq!(state["sites"][0]["shelter"]["value"]["evacuees"], 312);
    assert!(broker.terminate().success());
    let _ = hq;
}
