//! What one read-only login's filters cost in memory, and that the broker gives it back.
//!
//! The router keeps a log per subscribed filter. rumqttd patch 11 frees a filter's log when its
//! last subscriber leaves, but glibc keeps freed memory for the process; the broker's
//! housekeeping ([`renkei_broker::trim`]) hands it back to the system. The per-login bounds
//! (`mqtt.max_filters_per_connection`, `max_filters_per_user`) keep an ordinary login far from
//! this; the test raises them so that one integrator holds 20,000 filters, as a deployment that
//! trusts its integrators might allow, and checks the process's resident memory (`VmRSS`).

use std::time::{Duration, Instant};

use rumqttc::{QoS, SubscribeReasonCode};

use renkei_testkit::{BrokerProcess, MqttClient, PASSWORD, PATIENCE, ROOT, metric, scrape};

const MIB: u64 = 1024 * 1024;
/// Distinct filters the integrator subscribes to.
const FILTERS: usize = 20_000;
/// Filters per SUBSCRIBE packet.
const PER_SUBSCRIBE: usize = 100;
/// How far above its footing before the subscriptions the broker's RSS may stay once they
/// are gone (the database's page cache, allocator bookkeeping, a log line or two).
const SLACK: u64 = 16 * MIB;
/// How long the memory may take to come back: the housekeeping's interval, and time for the
/// router to free 20,000 logs in a debug build.
const GIVE_BACK_WITHIN: Duration = Duration::from_secs(25);

const OK: SubscribeReasonCode = SubscribeReasonCode::Success(QoS::AtLeastOnce);

/// `renkei/v1/131041/site-{i}/status` for `i` in `range`.
fn site_filters(range: std::ops::Range<usize>) -> impl Iterator<Item = String> {
    range.map(|i| format!("renkei/v1/131041/site-{i}/status"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_integrators_20000_filters_are_given_back_when_it_leaves() {
    let broker = BrokerProcess::start_with_users(&format!(
        "[mqtt]\nmax_filters_per_connection = {FILTERS}\nmax_filters_per_user = {FILTERS}\n"
    ));
    let addrs = broker.addrs;

    // Warm up: the first login and subscription allocate what the process keeps anyway
    // (the login cache, the user's session book, the first connection's buffers).
    let mut warm = MqttClient::connect_as(addrs.mqtt, "dis", PASSWORD).await;
    assert_eq!(
        warm.subscribe_many_codes(site_filters(0..PER_SUBSCRIBE))
            .await,
        vec![OK; PER_SUBSCRIBE]
    );
    warm.client.disconnect().await.unwrap();
    assert!(warm.closed_within(PATIENCE).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = broker.rss();

    let mut dis = MqttClient::connect_as(addrs.mqtt, "dis", PASSWORD).await;
    let subscribing = Instant::now();
    for start in (0..FILTERS).step_by(PER_SUBSCRIBE) {
        let codes = dis
            .subscribe_many_codes(site_filters(start..start + PER_SUBSCRIBE))
            .await;
        assert!(
            codes.iter().all(|c| *c == OK),
            "filters from {start}: {codes:?}"
        );
    }
    let subscribe_took = subscribing.elapsed();
    let subscribed = broker.rss();

    dis.client.disconnect().await.unwrap();
    assert!(dis.closed_within(PATIENCE).await);
    let left = Instant::now();
    let mut after = broker.rss();
    // Freed at the top of the heap, memory may go back to the system by itself at once.
    let given_back_by_itself = after <= before + SLACK;
    while after > before + SLACK && left.elapsed() < GIVE_BACK_WITHIN {
        tokio::time::sleep(Duration::from_millis(250)).await;
        after = broker.rss();
    }
    let mib = |bytes: u64| bytes as f64 / MIB as f64;
    eprintln!(
        "RSS {:.1} MiB before, {:.1} MiB with {FILTERS} filters (subscribed in {subscribe_took:?}), \
         {:.1} MiB {:?} after the client left",
        mib(before),
        mib(subscribed),
        mib(after),
        left.elapsed(),
    );
    // The load was real, above the slack: each filter's log, lookups and subscription book
    // took memory (some 1.2 KiB a filter, logs allocating as they fill), and without being
    // given back it would stay above `before + SLACK`.
    assert!(
        subscribed > before + SLACK,
        "{FILTERS} filters took only {:.1} MiB",
        mib(subscribed.saturating_sub(before))
    );
    assert!(
        after <= before + SLACK,
        "RSS {:.1} MiB {GIVE_BACK_WITHIN:?} after the client with {FILTERS} filters left, \
         {:.1} MiB before it subscribed",
        mib(after),
        mib(before)
    );
    // It was the housekeeping that gave it back (unless the allocator did at once).
    let text = scrape(addrs.http, ROOT).await;
    let trims = metric(&text, "renkei_memory_trims_total").unwrap_or(0);
    assert!(trims >= 1 || given_back_by_itself, "{text}");
    eprintln!(
        "{trims} trims, {} s in all",
        text.lines()
            .find_map(|l| l.strip_prefix("renkei_memory_trim_seconds_total "))
            .unwrap_or("?")
    );
    assert!(broker.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_session_gets_32_filters_and_the_33rd_is_refused() {
    let broker = BrokerProcess::start_with_users("");
    let mut dis = MqttClient::connect_as(broker.addrs.mqtt, "dis", PASSWORD).await;
    let codes = dis.subscribe_many_codes(site_filters(0..33)).await;
    let mut expected = vec![OK; 32];
    expected.push(SubscribeReasonCode::Failure);
    assert_eq!(codes, expected);
    assert!(broker.terminate().success());
}
