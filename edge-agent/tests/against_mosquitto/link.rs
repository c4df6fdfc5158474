//! The link driver on its own, as the daemon, each simulated site and a ward's uplink use it.

use std::time::Duration;

use renkei_agent::config::BrokerAddr;
use renkei_agent::lifecycle::Lifecycle;
use renkei_agent::link::driver::{Driver, DriverOptions, LinkEvent, PublishError};
use renkei_agent::link::{LinkError, LinkOptions};
use renkei_shared::{Body, Life, Mode, Timestamp, Topic};
use renkei_testkit::Mosquitto;
use rumqttc::QoS;
use tokio::time::{Instant, timeout};

use crate::hq::{WAIT, Watch, is_life};

async fn event(link: &mut Driver<Lifecycle, u32>) -> LinkEvent<u32> {
    timeout(WAIT, link.next())
        .await
        .expect("a link event in time")
        .expect("the link runs")
}

/// Each step reaches the driver's user as an event, PUBACKs come back under the tag their
/// publish carried, nothing is queued while down, a broker that goes away is retried with a
/// freshly armed will, and a close sends the death before its DISCONNECT.
#[tokio::test]
async fn the_link_driver_reports_each_step_and_arms_a_fresh_will_per_attempt() {
    let Some(broker) = Mosquitto::start_if_installed() else {
        return;
    };
    let port = broker.port;
    let site = renkei_shared::sample::site();
    let options = LinkOptions {
        broker: BrokerAddr {
            host: "127.0.0.1".into(),
            port,
            tls: false,
        },
        credentials: None,
        client_id: site.agent_client_id(),
        tls: None,
    };
    let driver_options = DriverOptions {
        subscriptions: vec![renkei_shared::topic::command_filter(&site)],
        ..DriverOptions::default()
    };
    let lifecycle = Lifecycle::new(site.clone(), 1, Mode::Exercise);
    let mut link: Driver<Lifecycle, u32> = Driver::spawn(&options, driver_options, lifecycle);

    assert!(matches!(event(&mut link).await, LinkEvent::Connecting));
    let LinkEvent::Connected {
        birth: Some(birth), ..
    } = event(&mut link).await
    else {
        panic!("not connected");
    };
    assert!(matches!(birth.body, Body::Life(Life::Birth { .. })));
    let LinkEvent::Subscribed(codes) = event(&mut link).await else {
        panic!("no SUBACK");
    };
    assert_eq!(codes.len(), 1);
    let mut wire = Watch::start(&broker, "hq-watch", renkei_shared::topic::ALL).await;

    let mut sent = Vec::new();
    for tag in [10, 11, 12] {
        let body = renkei_shared::sample::status().body;
        let status = link.speaker_mut().stamp(body, Timestamp::now());
        link.publish(&status, Some(tag)).expect("queued");
        sent.push(status.header.seq);
    }
    let mut acked = Vec::new();
    while acked.len() < 3 {
        match event(&mut link).await {
            LinkEvent::Acked(tag) => acked.push(tag),
            other => panic!("{other:?} before the PUBACKs"),
        }
    }
    assert_eq!(acked, vec![10, 11, 12]);
    let deadline = Instant::now() + WAIT;
    let mut arrived = Vec::new();
    while arrived.len() < 3 {
        let m = wire.next_by(deadline).await.expect("at HQ in time");
        if matches!(m.env.body, Body::Status(_)) {
            arrived.push(m.env.header.seq);
        }
    }
    assert_eq!(arrived, sent);

    let command = renkei_shared::sample::command();
    let topic = Topic::of(&command).unwrap();
    wire.client()
        .publish(
            topic.to_string(),
            QoS::AtLeastOnce,
            false,
            renkei_shared::encode(&command).unwrap(),
        )
        .await
        .unwrap();
    let LinkEvent::Message(publish) = event(&mut link).await else {
        panic!("no command");
    };
    assert_eq!(publish.topic, topic.to_string());

    // The broker goes away: the user hears why and when the next attempt comes; nothing can
    // be queued meanwhile, and every attempt arms a will numbered after everything before.
    drop(wire);
    drop(broker);
    let LinkEvent::Disconnected { retry_in, .. } = event(&mut link).await else {
        panic!("the loss not told");
    };
    assert!(retry_in <= Duration::from_secs(1), "{retry_in:?}");
    assert!(!link.is_connected());
    let late = link
        .speaker_mut()
        .stamp(Body::Life(Life::Death), Timestamp::now());
    assert!(matches!(
        link.publish(&late, Some(99)),
        Err(PublishError::Offline)
    ));
    assert!(matches!(event(&mut link).await, LinkEvent::Connecting));
    let broker = Mosquitto::setup().port(port).start();
    let deadline = Instant::now() + WAIT * 2;
    let birth2 = loop {
        assert!(Instant::now() < deadline, "not connected again");
        match event(&mut link).await {
            LinkEvent::Connected {
                birth: Some(birth), ..
            } => break birth,
            LinkEvent::Connecting | LinkEvent::Disconnected { .. } => {}
            other => panic!("{other:?} while reconnecting"),
        }
    };
    assert_eq!(birth2.header.boot, birth.header.boot);
    assert!(birth2.header.seq > late.header.seq);

    let mut wire = Watch::start(&broker, "hq-watch-2", renkei_shared::topic::ALL).await;
    link.close().await.expect("closed");
    let deadline = Instant::now() + WAIT;
    let death = loop {
        let m = wire.next_by(deadline).await.expect("the death in time");
        if let Some(m) = is_life(&m, false) {
            break m;
        }
    };
    // A death of its own, after the birth it answers: not the will (which is birth + 1).
    assert!(death.env.header.seq > birth2.header.seq + 1);
    assert!(matches!(link.next().await, Err(LinkError::Stopped)));
}
