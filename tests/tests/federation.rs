//! Ward mode through faults: a real HQ broker and a real ward broker (`renkei-broker serve`
//! with `[upstream]`), the ward's uplink to HQ through the harness's TCP proxy, and
//! publishers at the ward office sending their sites' messages at a steady rate.
//!
//! After every fault the two records must hold the same messages: every `(origin, boot, seq,
//! payload)` of the ward's own sites in the ward's record is in HQ's, once, and HQ's names the
//! relay that brought it.
//!
//! - [`a_silent_cut_of_the_uplink_loses_nothing_and_the_backlog_drains_fast`]: the line to HQ
//!   goes silent (no RST) for 60 s (10 minutes with `RENKEI_LONG_TESTS=1`) at ≥ 50 messages a
//!   second; after it heals, the records match within 2 minutes, the backlog drains ≥ 10×
//!   faster than it built up, and live messages reach HQ within 2 s (p99) during the drain.
//! - [`a_ward_broker_killed_at_random_moments_forwards_everything_once`]: SIGKILL of the ward
//!   broker, some kills during a cut, some during the drain.
//! - [`a_flapping_uplink_loses_nothing`]: the line to HQ goes down and up every 5–12 s for
//!   60 s (5–30 s for 10 minutes in long mode), silently or with resets.
//! - [`a_link_that_says_connected_but_stores_nothing_is_alarmed_and_caught_up`]: HQ's broker
//!   takes the relay's messages but its database is locked: the ward raises
//!   `renkei_uplink_stalled`, and sends again what HQ lost once it stores again.
//! - [`hq_killed_mid_drain_records_every_message_once`]: SIGKILL of HQ while the backlog
//!   streams in: only HQ's receipts, sent after its commits, retire the ward's rows.
//! - HQ's alert and another ward's status reach the ward's dashboard; a command HQ issues
//!   during a cut reaches the site once the line is back, once; none of it goes up again
//!   ([`what_hq_sends_down_reaches_the_wards_sites_and_dashboard_and_never_goes_up`]).
//! - [`a_site_whose_ward_office_is_lost_fails_over_to_hq_and_back`]: a real `renkei-agent run`
//!   with its ward's broker and HQ's: the ward office dies, the site reports straight to HQ,
//!   the office returns and the site goes back to it; HQ keeps each message once.
//! - [`a_ward_record_out_of_room_refuses_counts_and_loses_nothing`]: a ward broker whose
//!   record has no room refuses each batch and counts it, its agent keeps every report, and
//!   once there is room again everything reaches the ward and HQ.
//! - [`a_relay_login_at_a_ward_broker_is_refused_and_counted`]: ward A's upstream is ward B
//!   (a cycle or a chain): B refuses the relay's CONNECT and counts it.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use renkei_shared::{Envelope, Id, Origin, SiteRef, Timestamp, Topic, WardCode};
use renkei_testkit::{
    BrokerProcess, MqttClient, PASSWORD, ROOT, add_user, eventually_within, metric, scrape,
    with_users,
};
use renkei_tests::proxy::{Fault, Proxy};
use renkei_tests::{open_record, record_count};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tempfile::TempDir;

/// The ward the ward broker serves (Shinjuku).
const WARD: u32 = 131041;
/// The relay's login at HQ.
const RELAY: &str = "relay-shinjuku";

/// The federation tests run one at a time: each runs two brokers and a stream of messages.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn long_mode() -> bool {
    std::env::var("RENKEI_LONG_TESTS").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// HQ: a broker with the kit's users and a relay bound to [`WARD`].
fn start_hq() -> BrokerProcess {
    let dir = with_users("");
    add_user(
        dir.path(),
        RELAY,
        &["--role", "relay", "--ward", &WARD.to_string()],
        PASSWORD,
    );
    BrokerProcess::start_in(dir, &[])
}

/// A directory for a ward broker whose upstream is `hq_url` (the proxy in front of HQ).
fn ward_dir(hq_url: &str, ward: u32) -> TempDir {
    renkei_tests::ward_broker_dir(hq_url, ward, |dir| {
        let password = dir.join("relay.password");
        std::fs::write(&password, format!("{PASSWORD}\n")).unwrap();
        format!(
            "user = \"{RELAY}\"\npassword_file = \"{}\"\n",
            password.display()
        )
    })
}

/// The ward broker: demo mode, so that the test's publishers connect without logins (their
/// client ids are their sites' agent ids, so their messages count as sent by the sites).
fn start_ward(dir: TempDir) -> BrokerProcess {
    BrokerProcess::start_in(dir, &["--demo"])
}

/// One message of a record: `(origin key, boot, seq, payload)`.
type Row = (String, i64, i64, Vec<u8>);
/// How many messages each `via` brought.
type Vias = BTreeMap<Option<String>, u64>;

/// The messages of [`WARD`]'s sites in the record in `data_dir`, and, for HQ, who brought
/// each (`via`) counted.
fn record(data_dir: &Path) -> Result<(BTreeSet<Row>, Vias)> {
    let conn = open_record(data_dir)?;
    let mut stmt = conn.prepare(
        "SELECT o.key, m.boot, m.seq, m.payload, m.via
         FROM messages m JOIN origins o ON o.id = m.origin_id WHERE m.ward = ?1",
    )?;
    let mut rows = BTreeSet::new();
    let mut vias = BTreeMap::new();
    let mut query = stmt.query([WARD])?;
    while let Some(row) = query.next()? {
        rows.insert((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?));
        *vias.entry(row.get::<_, Option<String>>(4)?).or_default() += 1;
    }
    Ok((rows, vias))
}

/// How many of [`WARD`]'s messages the record in `data_dir` holds.
fn count(data_dir: &Path) -> Result<u64> {
    record_count(
        data_dir,
        "SELECT COUNT(*) FROM messages WHERE ward = ?1",
        WARD,
    )
}

/// Waits until HQ's record of the ward is the ward's, exactly; how long that took.
async fn records_match(hq: &Path, ward: &Path, within: Duration) -> Result<Duration> {
    let start = Instant::now();
    let matched = eventually_within(within, "HQ's record equals the ward's", || async {
        let (at_ward, _) = record(ward).ok()?;
        let (at_hq, _) = record(hq).ok()?;
        (!at_ward.is_empty() && at_ward == at_hq).then_some(())
    })
    .await;
    if matched.is_err() {
        let (at_ward, _) = record(ward)?;
        let (at_hq, vias) = record(hq)?;
        let missing = at_ward.difference(&at_hq).count();
        let extra = at_hq.difference(&at_ward).count();
        anyhow::bail!(
            "after {within:?}: the ward holds {} messages, HQ {} ({missing} missing at HQ, \
             {extra} at HQ only); HQ's via: {vias:?}",
            at_ward.len(),
            at_hq.len()
        );
    }
    let (_, vias) = record(hq)?;
    ensure!(
        vias.keys().all(|via| via.as_deref() == Some(RELAY)),
        "HQ must name the relay that brought each message: {vias:?}"
    );
    Ok(start.elapsed())
}

/// Sites at the ward office, each publishing a status every `period` (QoS 1, as an agent
/// would), through a proxy so that the ward broker can restart on new ports.
struct Publishers {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Publishers {
    fn start(addr: Arc<Mutex<SocketAddr>>, sites: usize, period: Duration) -> Publishers {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let tasks = (0..sites)
            .map(|i| {
                let (stop, sent, addr) = (stop.clone(), sent.clone(), addr.clone());
                tokio::spawn(async move {
                    let site = SiteRef {
                        ward: WardCode(WARD),
                        site: Id::new(format!("fed-{i}")).unwrap(),
                    };
                    publish_site(site, addr, period, stop, sent).await;
                })
            })
            .collect();
        Publishers { stop, sent, tasks }
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        self.sent.load(Ordering::Relaxed)
    }
}

/// One site: a status every `period`, `seq` raised for each; a new boot for every
/// connection, as an agent that lost its link re-announces itself.
async fn publish_site(
    site: SiteRef,
    addr: Arc<Mutex<SocketAddr>>,
    period: Duration,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) {
    let mut boot = 0u32;
    let mut ticker = tokio::time::interval(period);
    while !stop.load(Ordering::Relaxed) {
        boot += 1;
        let target = *addr.lock().unwrap();
        let mut options = MqttOptions::new(
            site.agent_client_id(),
            target.ip().to_string(),
            target.port(),
        );
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(options, 256);
        let up = Arc::new(AtomicBool::new(true));
        let poll = {
            let up = up.clone();
            tokio::spawn(async move {
                while let Ok(event) = eventloop.poll().await {
                    if let Event::Incoming(Packet::Disconnect) = event {
                        break;
                    }
                }
                up.store(false, Ordering::Relaxed);
            })
        };
        let mut seq = 0u64;
        while up.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
            ticker.tick().await;
            seq += 1;
            let mut env: Envelope = renkei_shared::sample::status();
            env.header.origin = Origin::Site(site.clone());
            env.header.boot = boot;
            env.header.seq = seq;
            env.header.sent_at = Timestamp::now();
            let topic = Topic::of(&env).unwrap();
            let payload = renkei_shared::encode(&env).unwrap();
            if client
                .publish(
                    topic.to_string(),
                    QoS::AtLeastOnce,
                    topic.retained(),
                    payload,
                )
                .await
                .is_ok()
            {
                sent.fetch_add(1, Ordering::Relaxed);
            }
        }
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(1), poll).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Latency of live messages at HQ: a subscriber (HQ operator) reading the ward's statuses,
/// timing those sent after `live_from` from their `sent_at` (same machine, same clock).
struct LiveProbe {
    latencies: Arc<Mutex<Vec<i64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LiveProbe {
    async fn start(hq: SocketAddr, live_from: Timestamp) -> LiveProbe {
        let mut options = renkei_testkit::login_options(hq, "sato-probe", "sato", PASSWORD);
        options.set_max_packet_size(64 * 1024, 64 * 1024);
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        client
            .subscribe(format!("renkei/v1/{WARD}/+/status"), QoS::AtMostOnce)
            .await
            .unwrap();
        let latencies = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let latencies = latencies.clone();
            tokio::spawn(async move {
                let _client = client;
                while let Ok(event) = eventloop.poll().await {
                    if let Event::Incoming(Packet::Publish(p)) = event
                        && let Ok(env) = renkei_shared::decode(&p.payload)
                        && env.header.sent_at.0 >= live_from.0
                    {
                        let latency = Timestamp::now().0 - env.header.sent_at.0;
                        latencies.lock().unwrap().push(latency);
                    }
                }
            })
        };
        LiveProbe { latencies, task }
    }

    /// The 99th percentile (ms) and the number of live messages seen.
    fn p99(self) -> (i64, usize) {
        self.task.abort();
        let mut l = self.latencies.lock().unwrap().clone();
        l.sort_unstable();
        let n = l.len();
        let p99 = if n == 0 {
            i64::MAX
        } else {
            l[(n * 99 / 100).min(n - 1)]
        };
        (p99, n)
    }
}

/// A fixed sequence of moments, the same in every run (xorshift from `seed`): each call gives
/// a number below its argument.
fn moments(mut seed: u64) -> impl FnMut(u64) -> u64 {
    move |n| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    }
}

fn data(broker: &BrokerProcess) -> PathBuf {
    broker.data_dir()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_cut_of_the_uplink_loses_nothing_and_the_backlog_drains_fast() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let cut_for = if long_mode() {
        Duration::from_secs(600)
    } else {
        Duration::from_secs(60)
    };
    let hq = start_hq();
    let uplink = Proxy::start(&hq.addrs.mqtt.to_string()).await?;
    let ward = start_ward(ward_dir(&format!("mqtt://{}", uplink.addr()), WARD));
    // 10 sites at 6 messages a second each: 60 messages a second at the ward office.
    let publishers = Publishers::start(
        Arc::new(Mutex::new(ward.addrs.mqtt)),
        10,
        Duration::from_millis(166),
    );
    records_match(&data(&hq), &data(&ward), Duration::from_secs(30))
        .await
        .context("before the cut")?;

    uplink.cut(Fault::Blackhole);
    let cut_at = Instant::now();
    let at_hq_before = count(&data(&hq))?;
    tokio::time::sleep(cut_for).await;
    let at_ward = count(&data(&ward))?;
    let at_hq = count(&data(&hq))?;
    let built = at_ward.saturating_sub(at_hq);
    let built_rate = built as f64 / cut_at.elapsed().as_secs_f64();
    ensure!(
        at_hq <= at_hq_before + 200,
        "HQ kept receiving through a silent cut: {at_hq_before} then {at_hq}"
    );
    ensure!(
        built_rate >= 50.0,
        "the ward built {built_rate:.1} msg/s, not 50"
    );

    let probe = LiveProbe::start(hq.addrs.mqtt, Timestamp::now()).await;
    uplink.restore();
    let restored = Instant::now();
    // The drain: from HQ's first new message to the last of the backlog. Meanwhile HQ's API
    // says how much the ward still has to send, from the relay's reports.
    let mut first = None;
    let mut reported = 0;
    let drained = loop {
        let now = count(&data(&hq))?;
        if first.is_none() && now > at_hq {
            first = Some(Instant::now());
        }
        reported = reported.max(hq_backlog(&hq).await.unwrap_or(0));
        if now >= at_ward {
            break Instant::now();
        }
        ensure!(
            restored.elapsed() < Duration::from_secs(120),
            "the backlog did not drain in 2 minutes: HQ at {now} of {at_ward}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let first = first.unwrap_or(drained);
    let drain_secs = (drained - first).as_secs_f64().max(0.1);
    let drain_rate = built as f64 / drain_secs;
    let sent = publishers.stop().await;
    let matched = records_match(&data(&hq), &data(&ward), Duration::from_secs(120)).await?;
    let (p99, live) = probe.p99();
    eprintln!(
        "silent cut of {cut_for:?}: {built} messages built up at {built_rate:.1}/s; link back \
         {:.1}s after the restore; drained at {drain_rate:.0}/s ({:.1}x); live p99 during the \
         drain {p99} ms over {live} messages; records matched {matched:?} after; {sent} sent; \
         HQ heard a backlog of {reported} at most",
        (first - restored).as_secs_f64(),
        drain_rate / built_rate
    );
    ensure!(
        drain_rate >= 10.0 * built_rate,
        "the backlog drained at {drain_rate:.0}/s, less than 10x the {built_rate:.1}/s it built at"
    );
    ensure!(live > 0, "no live message reached HQ during the drain");
    ensure!(p99 <= 2000, "live p99 during the drain was {p99} ms");
    let metrics = scrape(ward.addrs.http, None).await;
    ensure!(
        metric(&metrics, "renkei_uplink_connected") == Some(1),
        "the uplink says it is down:\n{metrics}"
    );
    ensure!(
        reported >= built / 2,
        "HQ never heard the ward's backlog ({built} built up; largest reported {reported})"
    );
    eventually_within(
        Duration::from_secs(15),
        "HQ hears the backlog is gone",
        || async { (hq_backlog(&hq).await? == 0).then_some(()) },
    )
    .await?;
    Ok(())
}

/// The ward's backlog as HQ's API says its relay last reported it.
async fn hq_backlog(hq: &BrokerProcess) -> Option<u64> {
    let links = renkei_testkit::http_get_as(hq.addrs.http, "/api/v1/links", ROOT)
        .await
        .json();
    links["relays"]
        .as_array()?
        .iter()
        .find(|r| r["ward"] == WARD)?["backlog"]
        .as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ward_broker_killed_at_random_moments_forwards_everything_once() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let kills = if long_mode() { 20 } else { 6 };
    let hq = start_hq();
    let uplink = Proxy::start(&hq.addrs.mqtt.to_string()).await?;
    let hq_url = format!("mqtt://{}", uplink.addr());
    let mut ward = start_ward(ward_dir(&hq_url, WARD));
    // The sites reach the ward broker through a proxy of their own, retargeted after each
    // restart (a new process listens on new ports).
    let office = Proxy::start(&ward.addrs.mqtt.to_string()).await?;
    let office_addr: SocketAddr = office.addr().parse()?;
    let publishers = Publishers::start(
        Arc::new(Mutex::new(office_addr)),
        5,
        Duration::from_millis(100),
    );
    let mut random = moments(0x5eed);
    for kill in 0..kills {
        // The restarted broker reconnects and forwards before the next fault.
        eventually_within(Duration::from_secs(30), "the uplink up", || async {
            let text = scrape(ward.addrs.http, None).await;
            (metric(&text, "renkei_uplink_connected") == Some(1)).then_some(())
        })
        .await?;
        tokio::time::sleep(Duration::from_millis(random(1000))).await;
        // Half the kills during a silent cut, after the broker has sent rows into it and
        // written its cursor at least once; half during the drain that follows a cut.
        let during_cut = kill % 2 == 0;
        uplink.cut(Fault::Blackhole);
        tokio::time::sleep(Duration::from_millis(1200 + random(2000))).await;
        if !during_cut {
            uplink.restore();
            tokio::time::sleep(Duration::from_millis(random(300))).await;
        }
        let dir = ward.kill9_keeping_dir();
        if during_cut {
            // What the dead broker had sent into the silent line is lost with it: the line
            // resets (the office's router reboots) before it comes back.
            uplink.cut(Fault::Reset);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        uplink.restore();
        ward = start_ward(dir);
        office.retarget(&ward.addrs.mqtt.to_string());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sent = publishers.stop().await;
    let matched = records_match(&data(&hq), &data(&ward), Duration::from_secs(120)).await?;
    let (rows, _) = record(&data(&ward))?;
    eprintln!(
        "{kills} kills of the ward broker: {} messages in both records ({sent} published), \
         matched {matched:?} after the last",
        rows.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hq_killed_mid_drain_records_every_message_once() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut hq = start_hq();
    let uplink = Proxy::start(&hq.addrs.mqtt.to_string()).await?;
    let ward = start_ward(ward_dir(&format!("mqtt://{}", uplink.addr()), WARD));
    let publishers = Publishers::start(
        Arc::new(Mutex::new(ward.addrs.mqtt)),
        5,
        Duration::from_millis(50),
    );
    for round in 0..3u64 {
        uplink.cut(Fault::Blackhole);
        tokio::time::sleep(Duration::from_secs(3)).await;
        uplink.restore();
        // HQ dies while the backlog streams in: what it took and had not committed is lost
        // with it, and only its receipts (sent after its commits) may retire rows.
        tokio::time::sleep(Duration::from_millis(50 + 70 * round)).await;
        let dir = hq.kill9_keeping_dir();
        hq = BrokerProcess::start_in(dir, &[]);
        uplink.retarget(&hq.addrs.mqtt.to_string());
    }
    let sent = publishers.stop().await;
    let matched = records_match(&data(&hq), &data(&ward), Duration::from_secs(120)).await?;
    eprintln!("HQ killed 3 times mid-drain: {sent} published, records matched {matched:?} after");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flapping_uplink_loses_nothing() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let (flaps_for, longest) = if long_mode() {
        (Duration::from_secs(600), 30)
    } else {
        (Duration::from_secs(60), 12)
    };
    let hq = start_hq();
    let uplink = Proxy::start(&hq.addrs.mqtt.to_string()).await?;
    let ward = start_ward(ward_dir(&format!("mqtt://{}", uplink.addr()), WARD));
    let publishers = Publishers::start(
        Arc::new(Mutex::new(ward.addrs.mqtt)),
        10,
        Duration::from_millis(200),
    );
    let mut random = moments(0xf1a9);
    let started = Instant::now();
    let mut flaps = 0;
    while started.elapsed() < flaps_for {
        // Down for 5 s or more, silently or with a reset; up again as long.
        let fault = if random(2) == 0 {
            Fault::Blackhole
        } else {
            Fault::Reset
        };
        uplink.cut(fault);
        tokio::time::sleep(Duration::from_secs(5 + random(longest - 4))).await;
        uplink.restore();
        flaps += 1;
        tokio::time::sleep(Duration::from_secs(5 + random(longest - 4))).await;
    }
    let sent = publishers.stop().await;
    let matched = records_match(&data(&hq), &data(&ward), Duration::from_secs(120)).await?;
    eprintln!(
        "{flaps} flaps in {:?}: {sent} published, records matched {matched:?} after",
        started.elapsed()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_link_that_says_connected_but_stores_nothing_is_alarmed_and_caught_up() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let hq = start_hq();
    let ward = start_ward(ward_dir(&hq.mqtt_url(), WARD));
    let publishers = Publishers::start(
        Arc::new(Mutex::new(ward.addrs.mqtt)),
        5,
        Duration::from_millis(200),
    );
    records_match(&data(&hq), &data(&ward), Duration::from_secs(30)).await?;
    // HQ's database is held by someone else: its broker still takes (PUBACKs) the relay's
    // messages and answers its pings, but its recorder commits nothing, so no receipt comes.
    let lock = {
        let path = data(&hq).join("renkei.db");
        std::thread::spawn(move || {
            let conn = rusqlite::Connection::open(path).unwrap();
            conn.execute_batch("BEGIN EXCLUSIVE").unwrap();
            std::thread::sleep(Duration::from_secs(30));
            conn.execute_batch("COMMIT").unwrap();
        })
    };
    let stalled_after = {
        let start = Instant::now();
        eventually_within(Duration::from_secs(40), "the stall alarm", || async {
            let text = scrape(ward.addrs.http, None).await;
            (metric(&text, "renkei_uplink_stalled") == Some(1)
                && metric(&text, "renkei_uplink_connected") == Some(1))
            .then_some(())
        })
        .await?;
        start.elapsed()
    };
    tokio::task::spawn_blocking(move || lock.join().unwrap()).await?;
    // What HQ's recorder failed to write while locked is sent again on the receipt timeout.
    let matched = records_match(&data(&hq), &data(&ward), Duration::from_secs(90)).await?;
    let text = scrape(ward.addrs.http, None).await;
    ensure!(
        metric(&text, "renkei_uplink_stalled") == Some(0),
        "the alarm must clear once HQ stores again:\n{text}"
    );
    ensure!(
        metric(&text, "renkei_uplink_overdue_total").unwrap_or(0) > 0,
        "the unconfirmed records must have gone again:\n{text}"
    );
    let sent = publishers.stop().await;
    eprintln!(
        "stall alarmed {stalled_after:?} after HQ's database locked; records matched \
         {matched:?} after it was released; {sent} published"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn what_hq_sends_down_reaches_the_wards_sites_and_dashboard_and_never_goes_up() -> Result<()>
{
    let _one = ONE_AT_A_TIME.lock().await;
    let hq = start_hq();
    let uplink = Proxy::start(&hq.addrs.mqtt.to_string()).await?;
    let ward = start_ward(ward_dir(&format!("mqtt://{}", uplink.addr()), WARD));
    eventually_within(Duration::from_secs(30), "the uplink up", || async {
        let text = scrape(ward.addrs.http, None).await;
        (metric(&text, "renkei_uplink_connected") == Some(1)).then_some(())
    })
    .await?;
    // At the ward office: a site's agent (a real `renkei-agent run`), a client watching what
    // reaches the site's command topic, and a dashboard reading HQ's alerts and the
    // neighbouring ward's statuses.
    let mut command = renkei_shared::sample::command();
    command.header.sent_at = Timestamp::now();
    let command_topic = Topic::of(&command)?.to_string();
    let agent_dir = tempfile::tempdir()?;
    let agent_config = agent_dir.path().join("agent.toml");
    std::fs::write(
        &agent_config,
        format!(
            "broker = \"mqtt://{}\"\nward = {WARD}\nsite = \"nishi-shinjuku-es\"\n\
             name = \"西新宿小学校\"\nkind = \"shelter\"\ninterval = \"1s\"\n\
             state_dir = {:?}\n",
            ward.addrs.mqtt,
            agent_dir.path().join("state"),
        ),
    )?;
    let site_agent = renkei_testkit::AgentProcess::start(&[
        "run",
        "--config",
        agent_config.to_str().context("utf-8 path")?,
    ]);
    let mut agent = MqttClient::connect(ward.addrs.mqtt, "ward-command-watch").await;
    agent.subscribe(&command_topic).await;
    eventually_within(
        Duration::from_secs(30),
        "the site's agent at its ward",
        || {
            let ward = data(&ward);
            async move { (site_rows(&ward, true).ok()? >= 1).then_some(()) }
        },
    )
    .await
    .with_context(|| site_agent.log())?;
    let mut dashboard = MqttClient::connect(ward.addrs.mqtt, "ward-dashboard").await;
    dashboard.subscribe("renkei/v1/hq/alert/#").await;
    dashboard.subscribe("renkei/v1/131016/+/status").await;

    // At HQ: an operator's alert, and a status from a site of another ward.
    let sato = MqttClient::connect_as(hq.addrs.mqtt, "sato", PASSWORD).await;
    let alert = renkei_shared::sample::alert();
    let alert_topic = Topic::of(&alert)?.to_string();
    sato.send(&alert).await;
    let chiyoda = MqttClient::connect_as(hq.addrs.mqtt, "agent-chiyoda", PASSWORD).await;
    let mut status = renkei_shared::sample::status();
    status.header.origin = Origin::Site(SiteRef {
        ward: WardCode(131016),
        site: Id::new("chiyoda-es")?,
    });
    status.header.sent_at = Timestamp::now();
    let status_topic = Topic::of(&status)?.to_string();
    chiyoda.send(&status).await;
    let got = dashboard
        .publish_on(&alert_topic, Duration::from_secs(10))
        .await;
    ensure!(
        got == Some(renkei_shared::encode(&alert)?),
        "HQ's alert did not reach the ward's dashboard as sent"
    );
    let got = dashboard
        .publish_on(&status_topic, Duration::from_secs(10))
        .await;
    ensure!(
        got == Some(renkei_shared::encode(&status)?),
        "the other ward's status did not come down"
    );

    // A command HQ issues while the line is down reaches the site once it is back, once, and
    // HQ learns what became of it.
    let hq_links = renkei_testkit::http_get_as(hq.addrs.http, "/api/v1/links", ROOT)
        .await
        .json();
    ensure!(
        hq_links["relays"][0]["ward"] == WARD && hq_links["relays"][0]["connected"] == true,
        "HQ must list the ward's relay as connected: {hq_links}"
    );
    uplink.cut(Fault::Reset);
    // Both ends say the line is down, and since when.
    let (hq_says, ward_says) =
        eventually_within(Duration::from_secs(10), "the line down", || async {
            let hq_links = renkei_testkit::http_get_as(hq.addrs.http, "/api/v1/links", ROOT)
                .await
                .json();
            let ward_links = renkei_testkit::http_get(ward.addrs.http, "/api/v1/links")
                .await
                .json();
            (hq_links["relays"][0]["connected"] == false
                && ward_links["uplink"]["connected"] == false
                && ward_links["uplink"]["down_since"].is_i64())
            .then_some((hq_links, ward_links))
        })
        .await?;
    ensure!(
        hq_says["relays"][0]["since"].as_i64() > Some(0),
        "HQ must say since when: {hq_says}"
    );
    ensure!(ward_says["uplink"]["ward"] == WARD, "{ward_says}");
    sato.send(&command).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        agent
            .publish_on(&command_topic, Duration::from_millis(500))
            .await
            .is_none(),
        "a command crossed a cut line"
    );
    // And one HQ sent two hours ago (its clock, or a queue somewhere, held it): expired.
    let mut stale = renkei_shared::sample::command();
    stale.header.seq += 100;
    stale.header.sent_at = Timestamp(Timestamp::now().0 - 2 * 3600 * 1000);
    if let renkei_shared::Body::Command(c) = &mut stale.body {
        c.command_id = Id::new("cmd-stale")?;
    }
    sato.send(&stale).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let issued = HashSet::from([
        renkei_shared::encode(&command)?,
        renkei_shared::encode(&stale)?,
    ]);
    uplink.restore();
    // Both reach the site's topic, each once: the site, not the line, judges the old one.
    let mut reached = Vec::new();
    let mut wait = Duration::from_secs(30);
    while let Some(payload) = agent.publish_on(&command_topic, wait).await {
        reached.push(payload);
        wait = Duration::from_secs(3);
    }
    ensure!(
        reached.len() == 2 && reached.iter().cloned().collect::<HashSet<_>>() == issued,
        "the commands issued during the cut must reach the site once each: {} came",
        reached.len()
    );
    // HQ sees which was carried out and which expired, from the site's own answers, which
    // came up through the ward's record like its other news.
    let outcomes = eventually_within(Duration::from_secs(30), "HQ hears the outcomes", || async {
        let body = renkei_testkit::http_get_as(hq.addrs.http, "/api/v1/commands", ROOT)
            .await
            .json();
        let state = |id: &str| {
            body["commands"]
                .as_array()?
                .iter()
                .find(|c| c["command_id"] == id)
                .map(|c| {
                    (
                        c["state"].as_str().unwrap_or("").to_owned(),
                        c["age_s"].as_u64(),
                    )
                })
        };
        let (done, expired) = (state("cmd-1")?, state("cmd-stale")?);
        (done.0 == "done" && expired.0 == "expired").then_some((done, expired))
    })
    .await
    .with_context(|| site_agent.log())?;
    ensure!(
        outcomes.1.1.is_some_and(|age| age >= 7200),
        "the expired command's age at the site: {outcomes:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let answers = record_count(
        &data(&hq),
        "SELECT COUNT(*) FROM messages WHERE kind = ?1",
        "command_result",
    )?;
    ensure!(
        answers == 2,
        "HQ recorded {answers} answers, not one per command"
    );

    // The ward recorded what came down, marked as brought by its downlink, and sent none of
    // it up: HQ never saw the relay publish outside its ward.
    let conn = open_record(&data(&ward))?;
    let down: Vec<(String, Option<String>)> = eventually_within(
        Duration::from_secs(10),
        "the ward's record of what came down",
        || async {
            let mut stmt = conn
                .prepare("SELECT topic, via FROM messages WHERE topic IN (?1, ?2, ?3) ORDER BY id")
                .ok()?;
            let rows: Vec<(String, Option<String>)> = stmt
                .query_map([&alert_topic, &status_topic, &command_topic], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .ok()?
                .collect::<Result<_, _>>()
                .ok()?;
            (rows.len() == 4).then_some(rows)
        },
    )
    .await?;
    let status_via = down.iter().find(|(t, _)| *t == status_topic).map(|r| &r.1);
    ensure!(
        status_via.is_some_and(|via| via.as_deref().is_some_and(|v| v.contains("downlink"))),
        "the other ward's status must be recorded as brought by the downlink: {down:?}"
    );
    let text = scrape(hq.addrs.http, ROOT).await;
    ensure!(
        !text
            .lines()
            .any(|l| l.starts_with("renkei_acl_refused_total")
                && l.contains("publish")
                && !l.ends_with(" 0")),
        "HQ refused a publish (something went up that came down):\n{text}"
    );
    let text = scrape(ward.addrs.http, None).await;
    ensure!(
        metric(&text, "renkei_uplink_down_total").unwrap_or(0) >= 3,
        "{text}"
    );
    Ok(())
}

/// How many messages of the sample site (131041/nishi-shinjuku-es) the record in `data_dir`
/// holds that came straight from the site (`direct`) or through someone else.
fn site_rows(data_dir: &Path, direct: bool) -> Result<u64> {
    let via = if direct { "IS NULL" } else { "IS NOT NULL" };
    record_count(
        data_dir,
        &format!("SELECT COUNT(*) FROM messages WHERE site = ?1 AND via {via}"),
        "nishi-shinjuku-es",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_site_whose_ward_office_is_lost_fails_over_to_hq_and_back() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let hq = start_hq();
    let uplink = Proxy::start(&hq.addrs.mqtt.to_string()).await?;
    // The ward broker has the site's login too, as HQ has.
    let dir = ward_dir(&format!("mqtt://{}", uplink.addr()), WARD);
    add_user(
        dir.path(),
        "agent-nishi",
        renkei_testkit::USER_ROLES[0].1,
        PASSWORD,
    );
    let ward = BrokerProcess::start_in(dir, &[]);
    // The site reaches its ward office through the office's network.
    let office = Proxy::start(&ward.addrs.mqtt.to_string()).await?;
    let agent_dir = tempfile::tempdir()?;
    let config = agent_dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "broker = \"mqtt://{}\"\nfallback_broker = \"{}\"\nward = 131041\n\
             site = \"nishi-shinjuku-es\"\nname = \"西新宿小学校\"\nkind = \"shelter\"\n\
             interval = \"1s\"\nstate_dir = {:?}\nusername = \"agent-nishi\"\n\
             password = \"{PASSWORD}\"\nevacuees = 100\ncapacity = 500\n\
             shelter_state = \"open\"\n",
            office.addr(),
            hq.mqtt_url(),
            agent_dir.path().join("state"),
        ),
    )?;
    let agent = renkei_testkit::AgentProcess::start(&[
        "run",
        "--config",
        config.to_str().context("utf-8 path")?,
    ]);
    let ward_data = data(&ward);
    eventually_within(
        Duration::from_secs(30),
        "the site heard at HQ through its ward",
        || {
            let hq = data(&hq);
            async move { (site_rows(&hq, false).ok()? >= 3).then_some(()) }
        },
    )
    .await?;

    // The ward office is lost: its broker dies and its network with it.
    let ward_dir = ward.kill9_keeping_dir();
    office.cut(Fault::Reset);
    let lost = Instant::now();
    let failed_over = eventually_within(Duration::from_secs(60), "the site straight at HQ", || {
        let hq = data(&hq);
        async move { (site_rows(&hq, true).ok()? >= 3).then(|| lost.elapsed()) }
    })
    .await?;

    // The office comes back (on new ports, behind the same address).
    let ward = BrokerProcess::start_in(ward_dir, &[]);
    office.retarget(&ward.addrs.mqtt.to_string());
    office.restore();
    let back = Instant::now();
    let at_ward_before = site_rows(&data(&ward), true)?;
    let failed_back = eventually_within(Duration::from_secs(60), "the site back at its ward", || {
        let ward = data(&ward);
        async move { (site_rows(&ward, true).ok()? >= at_ward_before + 3).then(|| back.elapsed()) }
    })
    .await
    .with_context(|| format!("the agent's log:\n{}", agent.log()))?;
    // What the site sent its ward is at HQ, once, whichever way it went. By key: a report the
    // agent sent again straight to HQ after its ward's receipt was lost went marked historical,
    // so its bytes may differ from the ward's copy by that flag; HQ keeps the first to arrive.
    let keys = |rows: BTreeSet<Row>| -> BTreeSet<(String, i64, i64)> {
        rows.into_iter().map(|(o, b, s, _)| (o, b, s)).collect()
    };
    let caught_up = eventually_within(Duration::from_secs(60), "HQ has all the ward has", || {
        let (ward, hq) = (data(&ward), data(&hq));
        async move {
            let (at_ward, _) = record(&ward).ok()?;
            let (at_hq, _) = record(&hq).ok()?;
            let at_hq = keys(at_hq);
            keys(at_ward).is_subset(&at_hq).then_some(at_hq.len())
        }
    })
    .await?;
    let status =
        renkei_testkit::run_agent(&["status", "--config", config.to_str().context("utf-8")?]);
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    let depth: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("queue depth:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .context("queue depth in the status")?;
    ensure!(
        depth <= 5,
        "the site's outbox did not drain:\n{status}\n{}",
        agent.log()
    );
    eprintln!(
        "ward office lost: the site failed over to HQ in {failed_over:?} and back in \
         {failed_back:?}; HQ holds {caught_up} of the ward's messages, {} straight from the \
         site; its outbox holds {depth}",
        site_rows(&data(&hq), true)?
    );
    drop(ward_data);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_ward_record_out_of_room_refuses_counts_and_loses_nothing() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let hq = start_hq();
    let hq_url = hq.mqtt_url();
    // A ward broker whose record has no room at all.
    let dir = ward_dir(&hq_url, WARD);
    let config = dir.path().join(renkei_testkit::CONFIG);
    let roomy = std::fs::read_to_string(&config)?;
    std::fs::write(&config, format!("{roomy}[recorder]\nmax_bytes = \"1\"\n"))?;
    let ward = start_ward(dir);
    // The site reaches its ward office through the office's network (the restarted broker
    // listens on new ports behind it).
    let office = Proxy::start(&ward.addrs.mqtt.to_string()).await?;
    let agent_dir = tempfile::tempdir()?;
    let agent_config = agent_dir.path().join("agent.toml");
    std::fs::write(
        &agent_config,
        format!(
            "broker = \"mqtt://{}\"\nward = 131041\nsite = \"room-es\"\nname = \"試験\"\n\
             kind = \"shelter\"\ninterval = \"1s\"\nstate_dir = {:?}\n",
            office.addr(),
            agent_dir.path().join("state"),
        ),
    )?;
    let agent_config = agent_config.to_str().context("utf-8 path")?.to_owned();
    let agent = renkei_testkit::AgentProcess::start(&["run", "--config", &agent_config]);
    let depth = || -> Result<u64> {
        let out = renkei_testkit::run_agent(&["status", "--config", &agent_config]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("queue depth:"))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
            .context("queue depth")
    };
    let refused = eventually_within(Duration::from_secs(30), "refusals counted", || async {
        let text = scrape(ward.addrs.http, None).await;
        let links = renkei_testkit::http_get(ward.addrs.http, "/api/v1/links")
            .await
            .json();
        (metric(&text, "renkei_recorder_refused_total{reason=\"max_bytes\"}").unwrap_or(0) >= 5
            && metric(&text, "renkei_database_alarm") == Some(1)
            && links["record"]["refused"].as_u64() >= Some(5))
        .then_some(())
    })
    .await;
    refused.with_context(|| format!("the ward's log:\n{}", ward.log()))?;
    // The agent keeps every report it stored (its birth and snapshots are live: sent again
    // at its next connection).
    let kept = eventually_within(
        Duration::from_secs(30),
        "the agent keeping them",
        || async { depth().ok().filter(|d| *d >= 5) },
    )
    .await?;
    ensure!(
        site_rows_of(&data(&ward), "room-es")? == 0,
        "nothing recorded without room"
    );

    // Room again: everything the agent kept reaches the ward's record and HQ's.
    let (_, dir) = ward.terminate_keeping_dir();
    std::fs::write(dir.path().join(renkei_testkit::CONFIG), &roomy)?;
    let ward = start_ward(dir);
    office.retarget(&ward.addrs.mqtt.to_string());
    let at_hq = eventually_within(Duration::from_secs(60), "the backlog at HQ", || async {
        let n = site_rows_of(&data(&hq), "room-es").ok()?;
        (depth().ok()? <= 2 && n >= kept).then_some(n)
    })
    .await
    .with_context(|| format!("the agent's log:\n{}", agent.log()))?;
    eprintln!("{kept} reports kept by the agent while the ward had no room; HQ holds {at_hq}");
    drop(ward);
    Ok(())
}

/// How many messages of site `site` of the ward the record in `data_dir` holds.
fn site_rows_of(data_dir: &Path, site: &str) -> Result<u64> {
    record_count(
        data_dir,
        "SELECT COUNT(*) FROM messages WHERE site = ?1",
        site,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_login_at_a_ward_broker_is_refused_and_counted() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    // Ward B is itself a ward broker (its upstream goes nowhere), with a relay user for A.
    let b_dir = ward_dir("mqtt://127.0.0.1:9", 131016);
    add_user(b_dir.path(), "root", &["--role", "admin"], PASSWORD);
    add_user(
        b_dir.path(),
        RELAY,
        &["--role", "relay", "--ward", &WARD.to_string()],
        PASSWORD,
    );
    let b = BrokerProcess::start_in(b_dir, &[]);
    // Ward A's upstream is B: a chain of ward brokers, as a cycle would be.
    let a = start_ward(ward_dir(&b.mqtt_url(), WARD));
    let refused = eventually_within(Duration::from_secs(30), "B refuses A's relay", || async {
        let text = scrape(b.addrs.http, ROOT).await;
        metric(
            &text,
            "renkei_logins_refused_total{reason=\"relay_to_ward_broker\"}",
        )
        .filter(|n| *n > 0)
    })
    .await?;
    let code = renkei_testkit::refusal(renkei_testkit::login_options(
        b.addrs.mqtt,
        RELAY,
        RELAY,
        PASSWORD,
    ))
    .await;
    ensure!(
        code == Some(rumqttc::ConnectReturnCode::NotAuthorized),
        "the relay's CONNECT at a ward broker got {code:?}"
    );
    let metrics = scrape(a.addrs.http, None).await;
    ensure!(
        metric(&metrics, "renkei_uplink_connected") == Some(0),
        "A's uplink must not count as connected:\n{metrics}"
    );
    eprintln!("B refused A's relay {refused} times");
    Ok(())
}
