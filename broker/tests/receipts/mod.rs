//! Receipts: after its recorder commits, the broker tells each site which of its messages are
//! stored, on `renkei/receipt/v1/{ward}/{site}`; only that site's agent may read them.

use std::collections::BTreeSet;
use std::time::Duration;

use renkei_shared::{Origin, Receipt, Topic, receipt_topic};
use rumqttc::{QoS, SubscribeReasonCode};

use crate::harness::{self, MqttClient, PASSWORD, RunningBroker, http_get, metric, status};

/// Reads receipts on `client` until they have named every seq in `want` (boot `boot`).
async fn receipts_until(client: &mut MqttClient, topic: &str, boot: u32, want: &BTreeSet<u64>) {
    let mut named = BTreeSet::new();
    while !want.is_subset(&named) {
        let p = client
            .publish_within(harness::PATIENCE)
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
    let broker = RunningBroker::start();
    let addrs = broker.addrs;
    let first = status(1);
    let Origin::Site(site) = &first.header.origin else {
        unreachable!("a status comes from a site")
    };
    let topic = receipt_topic(site);
    let mut agent = MqttClient::connect(&addrs, "agent").await;
    agent.subscribe(&topic).await;

    let seqs: BTreeSet<u64> = (1..=40).collect();
    for &seq in &seqs {
        agent.send(&status(seq)).await;
    }
    receipts_until(&mut agent, &topic, first.header.boot, &seqs).await;

    // A message sent again (its receipt was lost, say) is stored once and confirmed again.
    agent.send(&status(7)).await;
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
    let text = http_get(&addrs, "/metrics").await.text();
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
    let broker = RunningBroker::start_in(harness::with_users(""), &[]);
    let addrs = broker.addrs;
    let own = "renkei/receipt/v1/131041/nishi-shinjuku-es";
    let other = "renkei/receipt/v1/131016/chiyoda-es";
    let mut agent = MqttClient::connect_as(&addrs, "agent-nishi", PASSWORD).await;
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
    let mut forger = MqttClient::connect_as(&addrs, "agent-chiyoda", PASSWORD).await;
    let forged = Receipt::of_keys([(1, 1)]).remove(0).encode().unwrap();
    forger
        .client
        .publish(own, QoS::AtLeastOnce, false, forged)
        .await
        .unwrap();
    assert!(forger.closed_within(harness::PATIENCE).await);
    assert!(agent.publish_within(Duration::from_secs(1)).await.is_none());

    // The agent's own messages are confirmed to it.
    let env = status(1);
    agent.send(&env).await;
    receipts_until(&mut agent, own, env.header.boot, &BTreeSet::from([1])).await;
}

#[tokio::test]
async fn no_receipts_are_published_for_sites_nobody_listens_for() {
    let broker = RunningBroker::start();
    let addrs = broker.addrs;
    let publisher = MqttClient::connect(&addrs, "simulator").await;
    for seq in 1..=10 {
        publisher.send(&status(seq)).await;
    }
    harness::eventually("the messages recorded", || async {
        let text = http_get(&addrs, "/metrics").await.text();
        (metric(&text, "renkei_recorder_messages_inserted_total") == Some(10)).then_some(())
    })
    .await;
    let text = http_get(&addrs, "/metrics").await.text();
    assert_eq!(metric(&text, "renkei_receipts_published_total"), Some(0));
}
