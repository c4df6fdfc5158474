//! A reconnect storm: many agents flush their queues at once. Every message the broker
//! acknowledged must be recorded exactly once, however small the router's logs are: ingest
//! reads the router's tap, and when it falls behind the publishers' PUBACKs wait.

use std::time::{Duration, Instant};

use renkei_shared::{Envelope, Id, Origin, SiteRef, Topic, WardCode, encode, sample, topic};
use rumqttc::{AsyncClient, Event, Packet, QoS};

use renkei_testkit::{BrokerProcess, metric, options, scrape};

const PUBLISHERS: u64 = 50;
const PER_PUBLISHER: u64 = 1_000;
const TOTAL: i64 = (PUBLISHERS * PER_PUBLISHER) as i64;

/// What one burst left behind.
#[derive(Debug)]
struct Outcome {
    /// Rows in the recorder's `messages` table.
    recorded: i64,
    /// Origins whose rows are exactly seq 1..=PER_PUBLISHER, once each.
    complete_origins: i64,
    /// Times the router held publishers back for ingest.
    holds: i64,
    /// What a QoS 1 subscriber to renkei/v1/# (a dashboard) received, and what the broker
    /// told it it skipped (`$renkei/skipped`) when it fell behind its log.
    subscriber_received: u64,
    subscriber_skipped: u64,
    elapsed: Duration,
}

fn status_of(site: u64, seq: u64) -> Envelope {
    let mut env = sample::status();
    env.header.origin = Origin::Site(SiteRef {
        ward: WardCode(131041),
        site: Id::new(format!("burst-{site}")).unwrap(),
    });
    env.header.seq = seq;
    env
}

/// Publishes `PER_PUBLISHER` QoS 1 reports from each of `PUBLISHERS` clients at once and
/// returns when every one was acknowledged by the broker.
async fn storm(addrs: &renkei_broker::Addrs) {
    let mut tasks = Vec::new();
    for site in 0..PUBLISHERS {
        let mut options = options(addrs.mqtt, &format!("burst-{site}"));
        options.set_inflight(100);
        let (client, mut eventloop) = AsyncClient::new(options, 200);
        tasks.push(tokio::spawn(async move {
            let sender = tokio::spawn(async move {
                for seq in 1..=PER_PUBLISHER {
                    let env = status_of(site, seq);
                    let topic = Topic::of(&env).unwrap().to_string();
                    client
                        .publish(topic, QoS::AtLeastOnce, false, encode(&env).unwrap())
                        .await
                        .unwrap();
                }
                client
            });
            let mut acked = 0;
            while acked < PER_PUBLISHER {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                    Ok(_) => {}
                    Err(e) => panic!("publisher {site}: {e}"),
                }
            }
            drop(sender.await.unwrap());
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(300), task)
            .await
            .expect("every publish acknowledged in time")
            .unwrap();
    }
}

async fn burst(mqtt_config: &str) -> Outcome {
    let broker = BrokerProcess::start_demo(&format!(
        "[rules]\nenabled = false\n[mqtt]\n{mqtt_config}\n"
    ));
    let addrs = broker.addrs;

    // A dashboard's view: QoS 1 on the whole tree, reading as fast as it can.
    let mut options = options(addrs.mqtt, "dashboard");
    options.set_inflight(100);
    let (dashboard, mut dashboard_loop) = AsyncClient::new(options, 100);
    dashboard
        .subscribe(topic::ALL, QoS::AtLeastOnce)
        .await
        .unwrap();
    let (received_tx, mut received_rx) = tokio::sync::watch::channel((0u64, 0u64));
    tokio::spawn(async move {
        let (mut received, mut skipped) = (0, 0);
        while let Ok(event) = dashboard_loop.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                if p.topic == topic::SKIPPED_NOTICE {
                    let notice: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                    skipped += notice["skipped"].as_u64().unwrap();
                } else {
                    received += 1;
                }
                let _ = received_tx.send((received, skipped));
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    storm(&addrs).await;
    // Ingest and the recorder catch up: wait until every message is recorded.
    let deadline = Instant::now() + Duration::from_secs(300);
    let (inserted, holds) = loop {
        let text = scrape(addrs.http, None).await;
        let inserted = metric(&text, "renkei_recorder_messages_inserted_total").unwrap_or(0);
        let holds = metric(&text, "renkei_ingest_holds_total").unwrap_or(0);
        if inserted >= TOTAL || Instant::now() > deadline {
            break (inserted, holds);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let elapsed = started.elapsed();
    // The dashboard gets a moment more; it reads over TCP.
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let (received, skipped) = *received_rx.borrow();
            if received + skipped >= TOTAL as u64 {
                break;
            }
            if received_rx.changed().await.is_err() {
                break;
            }
        }
    })
    .await;
    let (subscriber_received, subscriber_skipped) = *received_rx.borrow();
    eprintln!("inserted {inserted}, holds {holds}");
    // The publishers' disconnects raced their last packets: counted, not logged as errors.
    let text = scrape(addrs.http, None).await;
    assert!(metric(&text, "renkei_mqtt_events_for_gone_connections_total").is_some());
    assert!(
        !broker
            .log()
            .lines()
            .any(|l| l.contains("ERROR") && l.contains("already gone")),
        "a benign race logged as an error"
    );

    let (status, dir) = broker.terminate_keeping_dir();
    assert!(status.success());
    let conn =
        rusqlite::Connection::open(renkei_broker::db::path(&dir.path().join("data"))).unwrap();
    let recorded: i64 = conn
        .query_row("SELECT COUNT(*) FROM messages", [], |r| r.get(0))
        .unwrap();
    let complete_origins: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM (SELECT origin_id FROM messages GROUP BY origin_id
             HAVING COUNT(*) = ?1 AND COUNT(DISTINCT seq) = ?1 AND MIN(seq) = 1 AND MAX(seq) = ?1)",
            [PER_PUBLISHER as i64],
            |r| r.get(0),
        )
        .unwrap();
    Outcome {
        recorded,
        complete_origins,
        holds,
        subscriber_received,
        subscriber_skipped,
        elapsed,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_is_recorded_exactly_once_with_the_default_logs() {
    let outcome = burst("").await;
    eprintln!(
        "default segments: {outcome:?}, {:.0} messages/s recorded",
        TOTAL as f64 / outcome.elapsed.as_secs_f64()
    );
    assert_eq!(outcome.recorded, TOTAL, "{outcome:?}");
    assert_eq!(outcome.complete_origins, PUBLISHERS as i64, "{outcome:?}");
    // A dashboard that fell behind its log is told exactly what it skipped.
    assert_eq!(
        outcome.subscriber_received + outcome.subscriber_skipped,
        TOTAL as u64,
        "{outcome:?}"
    );
}

/// Logs far too small for the burst (a slow dashboard misses messages, is told how many, and
/// as a live view gets the retained state again) and an ingest queue of 64: the publishers
/// are held back, and the record is still whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tiny_logs_and_queue_the_record_is_whole_and_publishers_wait() {
    let outcome = burst(
        "segment_size = \"24KiB\"\nsegment_count = 2\ningest_queue_messages = 64\n\
         ingest_queue_bytes = \"64KiB\"",
    )
    .await;
    eprintln!("small segments and queue: {outcome:?}");
    assert_eq!(outcome.recorded, TOTAL, "{outcome:?}");
    assert_eq!(outcome.complete_origins, PUBLISHERS as i64, "{outcome:?}");
    assert!(outcome.holds > 0, "{outcome:?}");
    // The dashboard that fell behind its small log was told exactly what it skipped.
    assert_eq!(
        outcome.subscriber_received + outcome.subscriber_skipped,
        TOTAL as u64,
        "{outcome:?}"
    );
}
