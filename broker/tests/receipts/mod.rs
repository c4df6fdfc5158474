//! Receipts: after its recorder commits, the broker tells each site which of its messages are
//! stored, on `renkei/receipt/v1/{ward}/{site}`; only that site's agent may read them.

use std::collections::BTreeSet;
use std::time::Duration;

use renkei_shared::{Origin, Receipt, Topic, receipt_topic};
use renkei_testkit::{
    BrokerProcess, MqttClient, PASSWORD, PATIENCE, eventually, metric, sample_status, scrape,
};
use rumqttc::{QoS, SubscribeReasonCode};

/// Reads receipts on `client` until they have named every seq in `want` (boot `boot`).
async fn receipts_until(client: &mut MqttClient, topic: &str, boot: u32, want: &BTreeSet<u64>) {
    let mut named = BTreeSet::new();
    while !want.is_subset(&named) {
        let p = client
            .publish_within(PATIENCE)
            .await
            .unwrap_or_else(|| panic!("receipts named only {named:?} of {want:?}"));
        assert_eq!(p.topic, topic, "only receipts are subscribed to");
        assert!(!p.retain, "receipts are not retained");
        let receipt = Receipt::decode(&p.payload).expect("a receipt decodes");
        named.extend(want.iter().copied().filter(|&s| receipt.covers(boot, s)));
    }
}

#[tokio::test]
async fn every_recorded_message_is_named_in_a_receipt_redeliveries_too() {
    let broker = BrokerProcess::start();
    let addrs = broker.addrs;
    let first = sample_status(1);
    let Origin::Site(site) = &first.header.origin else {
        unreachable!("a status comes from a site")
    };
    let topic = receipt_topic(site);
    let mut agent = MqttClient::connect(addrs.mqtt, "agent").await;
    agent.subscribe(&topic).await;

    let seqs: BTreeSet<u64> = (1..=40).collect();
    for &seq in &seqs {
        agent.send(&sample_status(seq)).await;
    }
    receipts_until(&mut agent, &topic, first.header.boot, &seqs).await;

    // A message sent again (its receipt was lost, say) is stored once and confirmed again.
    agent.send(&sample_status(7)).await;
    receipts_until(&mut agent, &topic, first.header.boot, &BTreeSet::from([7])).await;

    // A refused message is quarantined, never confirmed.
    agent
        .client
        .publish(
            Topic::of(&first).unwrap().to_string(),
            QoS::AtLeastOnce,
            false,
            vec![1, 2, 3],
        )
        .await
        .unwrap();
    assert!(
        agent.publish_within(Duration::from_secs(2)).await.is_none(),
        "no receipt for a refused payload"
    );
    let text = scrape(addrs.http, None).await;
    assert_eq!(
        metric(&text, "renkei_recorder_messages_inserted_total"),
        Some(40)
    );
    assert_eq!(metric(&text, "renkei_receipts_messages_total"), Some(41));
    assert!(metric(&text, "renkei_receipts_published_total").is_some_and(|n| n >= 2));
    assert_eq!(metric(&text, "renkei_receipts_failed_total"), Some(0));
}

#[tokio::test]
async fn an_agent_reads_its_own_receipts_and_nobody_publishes_there() {
    let broker = BrokerProcess::start_with_users("");
    let addrs = broker.addrs;
    let own = "renkei/receipt/v1/131041/nishi-shinjuku-es";
    let other = "renkei/receipt/v1/131016/chiyoda-es";
    let mut agent = MqttClient::connect_as(addrs.mqtt, "agent-nishi", PASSWORD).await;
    assert!(matches!(
        agent.subscribe_codes(own).await[..],
        [SubscribeReasonCode::Success(_)]
    ));
    for refused in [other, "renkei/receipt/v1/#", "renkei/receipt/v1/131041/+"] {
        assert_eq!(
            agent.subscribe_codes(refused).await,
            vec![SubscribeReasonCode::Failure],
            "{refused}"
        );
    }
    // A forged receipt closes the forger's connection and reaches nobody.
    let mut forger = MqttClient::connect_as(addrs.mqtt, "agent-chiyoda", PASSWORD).await;
    let forged = Receipt::of_keys([(1, 1)]).remove(0).encode().unwrap();
    forger
        .client
        .publish(own, QoS::AtLeastOnce, false, forged)
        .await
        .unwrap();
    assert!(forger.closed_within(PATIENCE).await);
    assert!(agent.publish_within(Duration::from_secs(1)).await.is_none());

    // The agent's own messages are confirmed to it.
    let env = sample_status(1);
    agent.send(&env).await;
    receipts_until(&mut agent, own, env.header.boot, &BTreeSet::from([1])).await;
}

#[tokio::test]
async fn no_receipts_are_published_for_sites_nobody_listens_for() {
    let broker = BrokerProcess::start();
    let addrs = broker.addrs;
    let publisher = MqttClient::connect(addrs.mqtt, "simulator").await;
    for seq in 1..=10 {
        publisher.send(&sample_status(seq)).await;
    }
    eventually("the messages recorded", || async {
        let text = scrape(addrs.http, None).await;
        (metric(&text, "renkei_recorder_messages_inserted_total") == Some(10)).then_some(())
    })
    .await;
    let text = scrape(addrs.http, None).await;
    assert_eq!(metric(&text, "renkei_receipts_published_total"), Some(0));
}
