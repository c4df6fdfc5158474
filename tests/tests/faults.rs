//! Fault tests: the real broker binary, real agents and real TCP, broken on purpose.
//!
//! - [`kill9_under_load_loses_no_confirmed_message`]: publishers stream QoS 1 messages, the
//!   broker is killed with SIGKILL mid-stream and restarted on the same data directory; every
//!   message HQ's receipt confirmed must be in the record, once.
//! - [`agents_lose_nothing_when_the_broker_is_killed`]: the same with real `renkei-agent run`
//!   daemons and staff reports.
//! - [`agents_ride_out_a_network_cut`]: real `renkei-agent run` daemons behind a proxy that
//!   is cut; HQ must see them go silent, staff reports filed during the outage must arrive in
//!   order after it, and the state must recover.
//! - [`reconnect_storm_records_every_queued_report_once`]: hundreds of clients with queued
//!   reports come back at the same moment.
//! - [`soak_broker_memory_stays_bounded`] (long mode only): RSS sampled under steady load.
//!
//! `RENKEI_LONG_TESTS=1` (`cargo xtask test --long`) selects the larger variants. The tests of
//! this file run one at a time: each loads both cores of a small machine.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use renkei_shared::{
    Body, Envelope, Header, Id, Mode, Origin, Receipt, SiteRef, Timestamp, WardCode, receipt_topic,
};
use renkei_testkit::{AgentProcess, BrokerProcess, HttpRequest, eventually_within, run_agent};
use renkei_tests::proxy::{Fault, Proxy};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use serde_json::Value;

/// Serialises the tests of this file (see the module docs).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn long_mode() -> bool {
    std::env::var("RENKEI_LONG_TESTS").is_ok_and(|v| !v.is_empty() && v != "0")
}

// ---------------------------------------------------------------------------------------------
// The broker's HTTP API.

/// The body of a 200 answer to `GET path`.
async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let response = HttpRequest::get(path)
        .try_send(addr, Duration::from_secs(30))
        .await
        .with_context(|| format!("GET {path}"))?;
    ensure!(response.status == 200, "GET {path}: {}", response.head);
    Ok(response.text())
}

async fn get_json(addr: SocketAddr, path: &str) -> Result<Value> {
    Ok(serde_json::from_str(&http_get(addr, path).await?)?)
}

/// Every recorded message, oldest first, through the catch-up API.
async fn all_events(http: SocketAddr) -> Result<Vec<Value>> {
    let mut events = Vec::new();
    let mut since = 0i64;
    loop {
        let page = get_json(http, &format!("/api/v1/events?since={since}&limit=5000")).await?;
        let batch = page["events"].as_array().context("events")?;
        if batch.is_empty() {
            return Ok(events);
        }
        since = batch
            .last()
            .and_then(|e| e["id"].as_i64())
            .context("event id")?;
        events.extend(batch.iter().cloned());
    }
}

/// A Prometheus counter or gauge without labels.
async fn metric(http: SocketAddr, name: &str) -> Result<f64> {
    let text = http_get(http, "/metrics").await?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .with_context(|| format!("no {name} in /metrics"))
}

/// `(origin site, boot, seq)` of a recorded event.
fn key_of(event: &Value) -> Option<(String, u64, u64)> {
    let h = &event["envelope"]["header"];
    let site = h["origin"]["site"]["site"].as_str()?;
    Some((site.to_owned(), h["boot"].as_u64()?, h["seq"].as_u64()?))
}

// ---------------------------------------------------------------------------------------------
// Publishers: one MQTT connection per site, QoS 1, each message a real Renkei envelope. Every
// message stays "unacked" until its PUBACK; a lost connection starts a fresh session that
// sends all unacked ones again (a fresh rumqttc event loop, so nothing is resent twice behind
// the test's back).

fn status_envelope(site: &SiteRef, boot: u32, seq: u64) -> Envelope {
    let Body::Status(mut status) = renkei_shared::sample::status().body else {
        unreachable!("the status sample is a status")
    };
    status.name = format!("試験 {}", site.site.as_str());
    status.uptime_s = Some(seq);
    Envelope {
        header: Header {
            origin: Origin::Site(site.clone()),
            boot,
            seq,
            sent_at: Timestamp::now(),
            mode: Mode::Actual,
            historical: false,
        },
        body: Body::Status(status),
    }
}

/// What one publisher has done, shared with the test. Like an agent, a publisher keeps a
/// message until HQ's receipt confirms it (`acked`); a PUBACK alone only frees the window.
#[derive(Debug, Default)]
struct Book {
    /// The highest seq made so far (seqs start at 1).
    created: u64,
    unacked: BTreeSet<u64>,
    acked: BTreeSet<u64>,
    /// Unconfirmed messages that had a PUBACK (what a PUBACK-trusting sender would have
    /// deleted).
    pubacked: BTreeSet<u64>,
    /// Seqs handed to rumqttc, waiting for their packet id.
    queued: VecDeque<u64>,
    by_pkid: HashMap<u16, u64>,
    sessions: u64,
}

#[derive(Debug, Clone)]
struct PublisherSpec {
    site: SiteRef,
    boot: u32,
    /// Seqs to make in all (u64::MAX: until `finish`).
    limit: u64,
    /// Where to connect; read at every attempt, so the test may move it.
    addr: Arc<Mutex<(String, u16)>>,
    /// Stops making new messages; the publisher ends once everything made is confirmed.
    finish: Arc<AtomicBool>,
    /// Messages confirmed by receipts, across publishers.
    acks: Arc<AtomicU64>,
    inflight: u16,
    /// Time between new messages (`None`: as fast as the broker confirms them).
    every: Option<Duration>,
}

struct Publisher {
    book: Arc<Mutex<Book>>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    fn spawn(spec: PublisherSpec, index: u64) -> Publisher {
        let book = Arc::new(Mutex::new(Book::default()));
        let task = tokio::spawn(publish_loop(spec, book.clone(), index));
        Publisher { book, task }
    }
}

fn done(spec: &PublisherSpec, book: &Book) -> bool {
    (spec.finish.load(Ordering::Relaxed) || book.created >= spec.limit) && book.unacked.is_empty()
}

/// A small deterministic jitter (no RNG dependency): spreads reconnects like real clients do.
fn jitter_ms(index: u64, attempt: u64, max: u64) -> u64 {
    let mut x = index
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(attempt.wrapping_mul(0xBF58_476D_1CE4_E5B9));
    x ^= x >> 31;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    (x ^ (x >> 29)) % max.max(1)
}

async fn publish_loop(spec: PublisherSpec, book: Arc<Mutex<Book>>, index: u64) {
    let topic = renkei_shared::Topic::of(&status_envelope(&spec.site, spec.boot, 1))
        .map(|t| t.to_string())
        .unwrap_or_default();
    let receipt = receipt_topic(&spec.site);
    let mut attempt = 0u64;
    loop {
        if done(&spec, &book.lock().unwrap()) {
            return;
        }
        attempt += 1;
        let (host, port) = spec.addr.lock().unwrap().clone();
        let mut options = MqttOptions::new(
            format!("fault-{}-{}", spec.site.ward.0, spec.site.site.as_str()),
            host,
            port,
        );
        options
            .set_keep_alive(Duration::from_secs(5))
            .set_clean_session(true)
            .set_inflight(spec.inflight)
            .set_max_packet_size(64 * 1024, 64 * 1024);
        let (client, mut eventloop) = AsyncClient::new(options, usize::from(spec.inflight) * 2);
        // As the agent does (`daemon::CONNECT_TIMEOUT_S`): when thousands reconnect at once,
        // rumqttd admits about a thousand a second, and a client that gives up after rumqttc's
        // default 5 s comes back with its id while its first attempt is still queued.
        eventloop.network_options.set_connection_timeout(20);
        {
            let mut b = book.lock().unwrap();
            b.queued.clear();
            b.by_pkid.clear();
            b.sessions += 1;
        }
        let feeder = tokio::spawn(feed(client, spec.clone(), book.clone(), topic.clone()));
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    let mut b = book.lock().unwrap();
                    if let Some(seq) = b.queued.pop_front() {
                        b.by_pkid.insert(pkid, seq);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    let mut b = book.lock().unwrap();
                    if let Some(seq) = b.by_pkid.remove(&ack.pkid)
                        && b.unacked.contains(&seq)
                    {
                        b.pubacked.insert(seq);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == receipt => {
                    let Ok(receipt) = Receipt::decode(&p.payload) else {
                        continue;
                    };
                    let mut b = book.lock().unwrap();
                    let named: Vec<u64> = b
                        .unacked
                        .iter()
                        .copied()
                        .filter(|&seq| receipt.covers(spec.boot, seq))
                        .collect();
                    for seq in named {
                        b.unacked.remove(&seq);
                        b.pubacked.remove(&seq);
                        b.acked.insert(seq);
                        spec.acks.fetch_add(1, Ordering::Relaxed);
                    }
                    if done(&spec, &b) {
                        break;
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        feeder.abort();
        if done(&spec, &book.lock().unwrap()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100 + jitter_ms(index, attempt, 400))).await;
    }
}

/// Subscribes to the site's receipts, then hands this session's messages to rumqttc:
/// everything unconfirmed first, then new ones.
async fn feed(client: AsyncClient, spec: PublisherSpec, book: Arc<Mutex<Book>>, topic: String) {
    if client
        .subscribe(receipt_topic(&spec.site), QoS::AtLeastOnce)
        .await
        .is_err()
    {
        return;
    }
    let resend: Vec<u64> = book.lock().unwrap().unacked.iter().copied().collect();
    let send = |seq: u64| {
        let client = client.clone();
        let book = book.clone();
        let topic = topic.clone();
        let payload = renkei_shared::encode(&status_envelope(&spec.site, spec.boot, seq));
        async move {
            let Ok(payload) = payload else { return false };
            book.lock().unwrap().queued.push_back(seq);
            client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .is_ok()
        }
    };
    for seq in resend {
        if !send(seq).await {
            return;
        }
    }
    let mut pace = spec.every.map(|every| {
        let mut pace = tokio::time::interval(every);
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        pace
    });
    loop {
        if let Some(pace) = pace.as_mut() {
            pace.tick().await;
        }
        let seq = {
            let mut b = book.lock().unwrap();
            if spec.finish.load(Ordering::Relaxed) || b.created >= spec.limit {
                return;
            }
            b.created += 1;
            let seq = b.created;
            b.unacked.insert(seq);
            seq
        };
        if !send(seq).await {
            return;
        }
    }
}

fn site_ref(ward: u32, site: &str) -> SiteRef {
    SiteRef {
        ward: WardCode(ward),
        site: Id::new(site).unwrap(),
    }
}

/// The 23 wards' codes, for spreading sites over them.
fn ward_code(i: usize) -> u32 {
    let wards = renkei_shared::WARDS;
    wards[i % wards.len()].code.0
}

/// Checks the record against what the publishers had confirmed: returns (recorded of
/// theirs, duplicates, confirmed but missing as (site, seq)).
fn audit(
    events: &[Value],
    boot: u32,
    acked: &BTreeMap<String, BTreeSet<u64>>,
) -> (usize, usize, Vec<(String, u64)>) {
    let mut seen: HashMap<(String, u64), usize> = HashMap::new();
    for (site, b, seq) in events.iter().filter_map(key_of) {
        if b == u64::from(boot) && acked.contains_key(&site) {
            *seen.entry((site, seq)).or_default() += 1;
        }
    }
    let duplicates = seen.values().filter(|&&n| n > 1).count();
    let missing = acked
        .iter()
        .flat_map(|(site, seqs)| seqs.iter().map(move |&s| (site.clone(), s)))
        .filter(|k| !seen.contains_key(k))
        .collect();
    (seen.len(), duplicates, missing)
}

// ---------------------------------------------------------------------------------------------

/// Publishers stream QoS 1 messages through a proxy (so their address survives the restart);
/// the broker is SIGKILLed mid-stream and restarted on the same data directory; publishers
/// resend whatever HQ's receipt had not confirmed. Every confirmed message must be recorded,
/// exactly once.
///
/// rumqttd sends its PUBACK when the router takes a message, while the recorder commits in
/// batches up to `recorder.batch_time` (200 ms) later; a sender that deleted a message on its
/// PUBACK lost thousands here (2,717 to 7,139 in 5 runs). The receipt comes after the commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_under_load_loses_no_confirmed_message() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let outcome = kill9_under_load().await?;
    ensure!(
        outcome.missing.is_empty(),
        "{} confirmed messages are not in the record ({} of them confirmed before the kill), \
         e.g. {:?}",
        outcome.missing.len(),
        outcome.lost_before_kill,
        outcome.missing.iter().take(10).collect::<Vec<_>>()
    );
    Ok(())
}

struct Kill9Outcome {
    missing: Vec<(String, u64)>,
    lost_before_kill: usize,
}

async fn kill9_under_load() -> Result<Kill9Outcome> {
    let (publishers, run_before, run_after) = if long_mode() {
        (8, Duration::from_secs(20), Duration::from_secs(10))
    } else {
        (4, Duration::from_secs(3), Duration::from_secs(2))
    };
    let broker = BrokerProcess::start();
    let proxy = Proxy::start(&broker.addrs.mqtt.to_string()).await?;
    let addr = Arc::new(Mutex::new(("127.0.0.1".to_owned(), proxy.port())));
    let finish = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(AtomicU64::new(0));
    let boot = 1;
    let pubs: Vec<(String, Publisher)> = (0..publishers)
        .map(|i| {
            let site = format!("kill9-{i}");
            let spec = PublisherSpec {
                site: site_ref(ward_code(i), &site),
                boot,
                limit: u64::MAX,
                addr: addr.clone(),
                finish: finish.clone(),
                acks: acks.clone(),
                inflight: 32,
                every: None,
            };
            (site, Publisher::spawn(spec, i as u64))
        })
        .collect();

    let started = Instant::now();
    tokio::time::sleep(run_before).await;
    ensure!(
        acks.load(Ordering::Relaxed) > 100,
        "publishers got only {} receipts in {run_before:?}",
        acks.load(Ordering::Relaxed)
    );
    let dir = broker.kill9_keeping_dir();
    let killed_at = started.elapsed();
    // What had been confirmed when the broker died (no receipt can come after).
    let acked_at_kill: BTreeMap<String, BTreeSet<u64>> = pubs
        .iter()
        .map(|(site, p)| (site.clone(), p.book.lock().unwrap().acked.clone()))
        .collect();
    let acked_before: usize = acked_at_kill.values().map(BTreeSet::len).sum();
    // Taken by the broker (PUBACK) but not yet confirmed stored when it died.
    let pubacked_only: usize = pubs
        .iter()
        .map(|(_, p)| p.book.lock().unwrap().pubacked.len())
        .sum();

    let restart = Instant::now();
    let broker = BrokerProcess::start_in(dir, &["--demo"]);
    proxy.retarget(&broker.addrs.mqtt.to_string());
    let restart_took = restart.elapsed();
    tokio::time::sleep(run_after).await;
    finish.store(true, Ordering::Relaxed);
    let drain = Instant::now();
    for (site, p) in &pubs {
        eventually_within(Duration::from_secs(60), site, || async {
            p.task.is_finished().then_some(())
        })
        .await?;
    }
    let drained_in = drain.elapsed();

    let acked: BTreeMap<String, BTreeSet<u64>> = pubs
        .iter()
        .map(|(site, p)| (site.clone(), p.book.lock().unwrap().acked.clone()))
        .collect();
    let total: usize = acked.values().map(BTreeSet::len).sum();
    let sessions: u64 = pubs
        .iter()
        .map(|(_, p)| p.book.lock().unwrap().sessions)
        .sum();
    // The recorder commits in batches: wait for the last one before reading.
    let deadline = Instant::now() + Duration::from_secs(15);
    let events = loop {
        let events = all_events(broker.addrs.http).await?;
        if audit(&events, boot, &acked).0 >= total || Instant::now() > deadline {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let (recorded, duplicates, missing) = audit(&events, boot, &acked);
    let lost_before_kill: Vec<_> = missing
        .iter()
        .filter(|(site, seq)| acked_at_kill.get(site).is_some_and(|s| s.contains(seq)))
        .collect();
    println!(
        "kill -9 under load: {publishers} publishers, killed after {killed_at:.1?} with \
         {acked_before} confirmed and {pubacked_only} with a PUBACK only (sent again); restart \
         took {restart_took:.1?}; {total} confirmed in all over {sessions} sessions, drained in \
         {drained_in:.1?}; {recorded} recorded, {duplicates} duplicated, {} confirmed but \
         missing ({} of them confirmed before the kill); proxy moved {:?} bytes",
        missing.len(),
        lost_before_kill.len(),
        proxy.bytes()
    );
    ensure!(
        duplicates == 0,
        "{duplicates} messages recorded more than once"
    );
    let lost_before_kill = lost_before_kill.len();
    Ok(Kill9Outcome {
        missing,
        lost_before_kill,
    })
}

// ---------------------------------------------------------------------------------------------

/// One `renkei-agent run` daemon with its config file (which `report` reads too).
struct Site {
    ward: u32,
    site: String,
    config: std::path::PathBuf,
    _process: AgentProcess,
    _dir: tempfile::TempDir,
}

impl Site {
    fn start(broker_url: &str, ward: u32, site: &str, interval: &str) -> Result<Site> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("agent.toml");
        let state = dir.path().join("state");
        let toml = format!(
            "broker = \"{broker_url}\"\nward = {ward}\nsite = \"{site}\"\nname = \"試験 {site}\"\n\
             kind = \"shelter\"\ninterval = \"{interval}\"\nstate_dir = {state:?}\n\
             evacuees = 100\ncapacity = 500\nshelter_state = \"open\"\n"
        );
        std::fs::write(&config, toml)?;
        let process =
            AgentProcess::start(&["run", "--config", config.to_str().context("utf-8 path")?]);
        Ok(Site {
            ward,
            site: site.to_owned(),
            config,
            _process: process,
            _dir: dir,
        })
    }

    /// Files a shelter report the way staff do, and waits for the command to finish.
    fn report_evacuees(&self, evacuees: u32) -> Result<()> {
        let config = self.config.to_str().context("utf-8 path")?;
        let evacuees = evacuees.to_string();
        let out = run_agent(&[
            "report",
            "--config",
            config,
            "shelter",
            "--evacuees",
            &evacuees,
        ]);
        ensure!(
            out.status.success(),
            "report for {} failed: {}",
            self.site,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

/// `sites[]` entry of /api/v1/state for one site.
fn site_view<'a>(state: &'a Value, ward: u32, site: &str) -> Option<&'a Value> {
    state["sites"]
        .as_array()?
        .iter()
        .find(|s| s["ward"].as_u64() == Some(u64::from(ward)) && s["site"].as_str() == Some(site))
}

fn evacuees_of(view: &Value) -> Option<u64> {
    view["shelter"]["value"]["evacuees"].as_u64()
}

/// Whether the site's last message was sent at most `ms` before the state's `now`.
fn heard_within(state: &Value, view: &Value, ms: i64) -> bool {
    match (state["now"].as_i64(), view["last_heard"].as_i64()) {
        (Some(now), Some(heard)) => now - heard <= ms,
        _ => false,
    }
}

fn is_silent(view: &Value) -> bool {
    view["silent"].as_bool() == Some(true) || view["dead"].as_bool() == Some(true)
}

async fn agents_through_a_cut(fault: Fault, outage: Duration) -> Result<()> {
    let broker = BrokerProcess::start();
    let proxy = Proxy::start(&broker.addrs.mqtt.to_string()).await?;
    let url = format!("mqtt://{}", proxy.addr());
    let sites: Vec<Site> = (0..3)
        .map(|i| Site::start(&url, ward_code(i), &format!("cut-{i}"), "1s"))
        .collect::<Result<_>>()?;
    let http = broker.addrs.http;
    let state = || async { get_json(http, "/api/v1/state").await.ok() };

    eventually_within(Duration::from_secs(30), "all sites reporting", || async {
        let s = state().await?;
        // Heard from lately, not `silent`: a fresh agent may show dead while it reports (see
        // `a_connected_agent_is_never_shown_dead`).
        sites
            .iter()
            .all(|site| {
                site_view(&s, site.ward, &site.site)
                    .is_some_and(|v| heard_within(&s, v, 3000) && evacuees_of(v) == Some(100))
            })
            .then_some(())
    })
    .await?;
    // Where the record stands before the outage: what comes after is the backlog's delivery.
    let before = all_events(http)
        .await?
        .last()
        .and_then(|e| e["id"].as_i64());

    proxy.cut(fault);
    let cut_at = Instant::now();
    // Staff keep working: reports typed during the outage go to each agent's outbox.
    let reports: Vec<Vec<u32>> = (0..sites.len() as u32)
        .map(|i| vec![150 + i, 175 + i, 200 + i])
        .collect();
    for round in 0..3 {
        for (site, values) in sites.iter().zip(&reports) {
            site.report_evacuees(values[round])?;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let silent_after = eventually_within(Duration::from_secs(30), "all sites silent", || async {
        let s = state().await?;
        sites
            .iter()
            .all(|site| site_view(&s, site.ward, &site.site).is_some_and(is_silent))
            .then(|| cut_at.elapsed())
    })
    .await?;
    let dead: Vec<bool> = {
        let s = state().await.context("state")?;
        sites
            .iter()
            .map(|site| {
                site_view(&s, site.ward, &site.site).is_some_and(|v| v["dead"] == Value::Bool(true))
            })
            .collect()
    };
    if let Some(rest) = outage.checked_sub(cut_at.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let bytes_at_restore = proxy.bytes();
    proxy.restore();
    let restored_at = Instant::now();

    let recovered_in = eventually_within(Duration::from_secs(60), "state recovered", || async {
        let s = state().await?;
        sites
            .iter()
            .zip(&reports)
            .all(|(site, values)| {
                site_view(&s, site.ward, &site.site).is_some_and(|v| {
                    !is_silent(v) && evacuees_of(v) == values.last().map(|&n| u64::from(n))
                })
            })
            .then(|| restored_at.elapsed())
    })
    .await?;

    // The backlog: every report filed during the outage recorded once, in the order filed,
    // and the replayed (historical) messages of each site in increasing seq order.
    let events = eventually_within(Duration::from_secs(30), "backlog recorded", || async {
        let events = all_events(http).await.ok()?;
        let after: Vec<Value> = events
            .into_iter()
            .filter(|e| e["id"].as_i64() > before)
            .collect();
        let complete = sites.iter().zip(&reports).all(|(site, values)| {
            let got = filed_evacuees(&after, site);
            values.iter().all(|v| got.contains(&u64::from(*v)))
        });
        complete.then_some(after)
    })
    .await?;
    let mut summary = Vec::new();
    for (site, values) in sites.iter().zip(&reports) {
        let filed: Vec<u64> = values.iter().map(|&v| u64::from(v)).collect();
        let got: Vec<u64> = filed_evacuees(&events, site)
            .into_iter()
            .filter(|v| filed.contains(v))
            .collect();
        ensure!(
            got == filed,
            "{}: reports filed during the outage {filed:?}, recorded {got:?}",
            site.site
        );
        let replayed: Vec<u64> = events
            .iter()
            .filter(|e| from_site(e, site) && e["envelope"]["header"]["historical"] == true)
            .filter_map(|e| e["envelope"]["header"]["seq"].as_u64())
            .collect();
        ensure!(
            replayed.windows(2).all(|w| w[0] < w[1]),
            "{}: replayed seqs out of order: {replayed:?}",
            site.site
        );
        // One heartbeat a second was stored while the link was down (less the first seconds
        // before the agent noticed, and some slack for a slow machine).
        let heartbeats = events
            .iter()
            .filter(|e| {
                from_site(e, site)
                    && e["envelope"]["header"]["historical"] == true
                    && e["topic"].as_str().is_some_and(|t| t.ends_with("/status"))
            })
            .count();
        let expected = (outage.as_secs() / 2).max(2) as usize;
        ensure!(
            heartbeats >= expected,
            "{}: only {heartbeats} heartbeats replayed after a {outage:?} outage (want ≥ {expected})",
            site.site
        );
        summary.push(format!("{}: {} replayed", site.site, replayed.len()));
    }
    println!(
        "network cut ({fault:?}, {outage:?}): silent after {silent_after:.1?} (dead by last will: \
         {dead:?}); recovered {recovered_in:.1?} after restore; {}; proxy bytes at restore \
         {bytes_at_restore:?}, at end {:?}",
        summary.join(", "),
        proxy.bytes()
    );
    Ok(())
}

fn from_site(event: &Value, site: &Site) -> bool {
    let s = &event["envelope"]["header"]["origin"]["site"];
    s["ward"].as_u64() == Some(u64::from(site.ward)) && s["site"].as_str() == Some(&site.site)
}

/// Evacuee figures of a site's shelter messages, in received order.
fn filed_evacuees(events: &[Value], site: &Site) -> Vec<u64> {
    events
        .iter()
        .filter(|e| {
            from_site(e, site) && e["topic"].as_str().is_some_and(|t| t.ends_with("/shelter"))
        })
        .filter_map(|e| e["envelope"]["body"]["shelter"]["evacuees"].as_u64())
        .collect()
}

/// Real `renkei-agent run` daemons while staff file shelter reports as fast as the CLI
/// allows; the broker is SIGKILLed mid-stream, reports go on being filed while it is down, and
/// it restarts on the same data directory. Every report the CLI confirmed as saved must be in
/// the record exactly once: the agents keep each one until HQ's receipt names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_lose_nothing_when_the_broker_is_killed() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let broker = BrokerProcess::start();
    let proxy = Proxy::start(&broker.addrs.mqtt.to_string()).await?;
    let url = format!("mqtt://{}", proxy.addr());
    let sites: Vec<Arc<Site>> = (0..3)
        .map(|i| Site::start(&url, ward_code(i), &format!("k9-{i}"), "1s").map(Arc::new))
        .collect::<Result<_>>()?;
    let http = broker.addrs.http;
    eventually_within(Duration::from_secs(30), "all sites reporting", || async {
        let s = get_json(http, "/api/v1/state").await.ok()?;
        sites
            .iter()
            .all(|site| {
                site_view(&s, site.ward, &site.site).is_some_and(|v| evacuees_of(v) == Some(100))
            })
            .then_some(())
    })
    .await?;

    // Each site's staff file reports 1000, 1001, … back to back (the configured figure is
    // 100); only confirmed ones count.
    let stop = Arc::new(AtomicBool::new(false));
    let filers: Vec<std::thread::JoinHandle<Result<Vec<u64>>>> = sites
        .iter()
        .map(|site| {
            let (site, stop) = (site.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut filed = Vec::new();
                let mut next = 1_000u32;
                while !stop.load(Ordering::Relaxed) {
                    site.report_evacuees(next)?;
                    filed.push(u64::from(next));
                    next += 1;
                }
                Ok(filed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let dir = broker.kill9_keeping_dir();
    // Reports filed while HQ is down wait in the outboxes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let broker = BrokerProcess::start_in(dir, &["--demo"]);
    proxy.retarget(&broker.addrs.mqtt.to_string());
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut filed = Vec::new();
    for filer in filers {
        filed.push(
            filer
                .join()
                .map_err(|_| anyhow::anyhow!("a filer panicked"))??,
        );
    }

    let http = broker.addrs.http;
    let all_recorded = |events: &[Value]| {
        sites.iter().zip(&filed).all(|(site, filed)| {
            let recorded: BTreeSet<u64> = filed_evacuees(events, site).into_iter().collect();
            filed.iter().all(|v| recorded.contains(v))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    let events = loop {
        let events = all_events(http).await?;
        if all_recorded(&events) || Instant::now() > deadline {
            break events;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let mut summary = Vec::new();
    let mut problems = Vec::new();
    for (site, filed) in sites.iter().zip(&filed) {
        let mut counts: BTreeMap<u64, usize> = BTreeMap::new();
        for v in filed_evacuees(&events, site) {
            *counts.entry(v).or_default() += 1;
        }
        let missing: Vec<u64> = filed
            .iter()
            .copied()
            .filter(|v| !counts.contains_key(v))
            .collect();
        let twice: Vec<u64> = filed
            .iter()
            .copied()
            .filter(|v| counts.get(v).is_some_and(|n| *n > 1))
            .collect();
        summary.push(format!(
            "{}: {} filed, {} missing, {} twice",
            site.site,
            filed.len(),
            missing.len(),
            twice.len()
        ));
        if filed.len() < 5 {
            problems.push(format!("{}: only {} reports filed", site.site, filed.len()));
        }
        if !missing.is_empty() || !twice.is_empty() {
            problems.push(format!(
                "{}: confirmed reports missing {:?}, recorded twice {:?}",
                site.site,
                missing.iter().take(20).collect::<Vec<_>>(),
                twice.iter().take(20).collect::<Vec<_>>()
            ));
        }
    }
    println!("agents through kill -9: {}", summary.join("; "));
    ensure!(problems.is_empty(), "{}", problems.join("; "));
    Ok(())
}

/// Three agents behind a proxy; the network is reset for a few seconds (the broker sees the
/// connections drop, so the last wills fire); reports are filed meanwhile. Long mode adds a
/// blackhole of 70 s, which only keep-alives and timeouts can notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_ride_out_a_network_cut() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    agents_through_a_cut(Fault::Reset, Duration::from_secs(6)).await?;
    if long_mode() {
        agents_through_a_cut(Fault::Blackhole, Duration::from_secs(70)).await?;
    }
    Ok(())
}

/// A site whose agent is connected and reporting must not show as dead.
///
/// Regression: a heartbeat tick that won a `select!` while rumqttc was still connecting used to
/// cancel the poll and drop the half-open connection right after its CONNACK; the broker then
/// published that connection's last will (death, seq n+1), and the agent reconnected with the
/// same birth (seq n), which the will outranked, so HQ showed a reporting site as dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_agent_is_never_shown_dead() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let broker = BrokerProcess::start();
    let sites: Vec<Site> = (0..6)
        .map(|i| {
            Site::start(
                &broker.mqtt_url(),
                ward_code(i),
                &format!("alive-{i}"),
                "1s",
            )
        })
        .collect::<Result<_>>()?;
    let http = broker.addrs.http;
    eventually_within(Duration::from_secs(30), "all sites heard", || async {
        let s = get_json(http, "/api/v1/state").await.ok()?;
        sites
            .iter()
            .all(|site| {
                site_view(&s, site.ward, &site.site).is_some_and(|v| heard_within(&s, v, 3000))
            })
            .then_some(())
    })
    .await?;
    // Long enough for every agent to have sent heartbeats on its settled connection.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = get_json(http, "/api/v1/state").await?;
    let dead: Vec<&str> = sites
        .iter()
        .filter(|site| {
            site_view(&s, site.ward, &site.site)
                .is_some_and(|v| heard_within(&s, v, 3000) && v["dead"] == Value::Bool(true))
        })
        .map(|site| site.site.as_str())
        .collect();
    ensure!(dead.is_empty(), "reporting but shown dead: {dead:?}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// Many clients, each with reports queued while the network was down, come back at once: every
/// report is recorded exactly once. Default: 200 clients × 20 reports; long mode: 2,000 × 100,
/// which should all be recorded within 30 s (the vendored rumqttd admits connections without
/// the upstream 1 ms pause each; see vendor/rumqttd/VENDORED.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_storm_records_every_queued_report_once() -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let (clients, reports, target) = if long_mode() {
        (2_000usize, 100u64, Duration::from_secs(30))
    } else {
        (200, 20, Duration::from_secs(30))
    };
    let broker = BrokerProcess::start();
    let proxy = Proxy::start(&broker.addrs.mqtt.to_string()).await?;
    // The network is down when the reports are made: every client queues its reports and
    // keeps retrying (100–500 ms apart, jittered) against a proxy that resets it.
    proxy.cut(Fault::Reset);
    let addr = Arc::new(Mutex::new(("127.0.0.1".to_owned(), proxy.port())));
    let acks = Arc::new(AtomicU64::new(0));
    let boot = 7;
    let pubs: Vec<(String, Publisher)> = (0..clients)
        .map(|i| {
            let site = format!("storm-{i}");
            let spec = PublisherSpec {
                site: site_ref(ward_code(i), &site),
                boot,
                limit: reports,
                addr: addr.clone(),
                finish: Arc::new(AtomicBool::new(false)),
                acks: acks.clone(),
                inflight: 20,
                every: None,
            };
            (site, Publisher::spawn(spec, i as u64))
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let refused = proxy.stats().accepted.load(Ordering::Relaxed);
    let inserted_before =
        metric(broker.addrs.http, "renkei_recorder_messages_inserted_total").await?;

    proxy.restore();
    let restored = Instant::now();
    let total = clients as u64 * reports;
    // Recorded (the target) first, then confirmed: receipts follow the commits at
    // `recorder.receipt_rate`, so confirmation comes a receipt round later.
    let http = broker.addrs.http;
    let all_recorded = eventually_within(
        Duration::from_secs(120),
        "every report recorded",
        || async {
            let n = metric(http, "renkei_recorder_messages_inserted_total")
                .await
                .ok()?;
            (n - inserted_before >= total as f64).then(|| restored.elapsed())
        },
    )
    .await;
    let all_acked = eventually_within(
        Duration::from_secs(120),
        "every report confirmed",
        || async { (acks.load(Ordering::Relaxed) >= total).then(|| restored.elapsed()) },
    )
    .await?;
    for (site, p) in &pubs {
        eventually_within(Duration::from_secs(10), site, || async {
            p.task.is_finished().then_some(())
        })
        .await?;
    }
    let acked: BTreeMap<String, BTreeSet<u64>> = pubs
        .iter()
        .map(|(site, p)| (site.clone(), p.book.lock().unwrap().acked.clone()))
        .collect();
    let sessions: u64 = pubs
        .iter()
        .map(|(_, p)| p.book.lock().unwrap().sessions)
        .sum();
    let events = all_events(broker.addrs.http).await?;
    let (recorded, duplicates, missing) = audit(&events, boot, &acked);
    println!(
        "reconnect storm: {clients} clients × {reports} queued reports; {refused} connection \
         attempts reset during the outage; after restore all confirmed in {all_acked:.1?}, \
         recorded in {:?}; {recorded} recorded, {duplicates} duplicated, {} missing; {sessions} \
         sessions; proxy bytes {:?}",
        all_recorded.as_ref().map(|d| format!("{d:.1?}")),
        missing.len(),
        proxy.bytes()
    );
    let all_recorded = all_recorded?;
    ensure!(
        duplicates == 0,
        "{duplicates} reports recorded more than once"
    );
    ensure!(
        missing.is_empty() && recorded as u64 == total,
        "{} of {total} reports missing, e.g. {:?}",
        missing.len(),
        missing.iter().take(10).collect::<Vec<_>>()
    );
    if long_mode() {
        ensure!(
            all_recorded <= target,
            "the storm took {all_recorded:?} to be recorded (target {target:?})"
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------

/// Long mode only: 300 simulated sites (1 s heartbeats) plus 4 QoS 1 publishers at 100 msg/s
/// each against one broker for 10 min (`RENKEI_SOAK_SECS` to change), sampling its RSS every
/// 10 s. Fails if memory keeps growing (the last quarter's mean above 1.5× the second
/// quarter's) or if confirmations slow down (the last quarter's receipts fewer than half the
/// second quarter's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_broker_memory_stays_bounded() -> Result<()> {
    if !long_mode() {
        println!("soak: long mode only (RENKEI_LONG_TESTS=1)");
        return Ok(());
    }
    let _serial = ONE_AT_A_TIME.lock().await;
    let secs: u64 = std::env::var("RENKEI_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let broker = BrokerProcess::start();
    let sim_state = tempfile::tempdir()?;
    let _sim = AgentProcess::start(&[
        "simulate",
        "--broker",
        &broker.mqtt_url(),
        "--sites",
        "300",
        "--interval",
        "1s",
        "--state-dir",
        sim_state.path().to_str().context("utf-8 path")?,
    ]);
    let mqtt = broker.addrs.mqtt;
    let addr = Arc::new(Mutex::new((mqtt.ip().to_string(), mqtt.port())));
    let finish = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(AtomicU64::new(0));
    let pubs: Vec<Publisher> = (0..4)
        .map(|i| {
            let spec = PublisherSpec {
                site: site_ref(ward_code(i), &format!("soak-{i}")),
                boot: 1,
                limit: u64::MAX,
                addr: addr.clone(),
                finish: finish.clone(),
                acks: acks.clone(),
                inflight: 8,
                every: Some(Duration::from_millis(10)),
            };
            Publisher::spawn(spec, i as u64)
        })
        .collect();
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut confirmed = Vec::new();
    while started.elapsed() < Duration::from_secs(secs) {
        let kb = broker.rss() / 1024;
        samples.push(kb);
        confirmed.push(acks.load(Ordering::Relaxed));
        println!(
            "soak t={:>5}s rss={:>7} kB acks={}",
            started.elapsed().as_secs(),
            kb,
            acks.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
    finish.store(true, Ordering::Relaxed);
    for p in &pubs {
        p.task.abort();
    }
    ensure!(samples.len() >= 8, "too few samples: {samples:?}");
    let quarter = samples.len() / 4;
    let mean = |s: &[u64]| s.iter().sum::<u64>() as f64 / s.len().max(1) as f64;
    let second = mean(&samples[quarter..2 * quarter]);
    let last = mean(&samples[3 * quarter..]);
    println!(
        "soak: {secs} s, RSS kB every 10 s {samples:?}; second quarter mean {second:.0}, last \
         quarter mean {last:.0}"
    );
    ensure!(
        last <= second * 1.5,
        "broker RSS grew from {second:.0} kB to {last:.0} kB (mean of the second vs last quarter)"
    );
    let n = confirmed.len();
    let second_acks = confirmed[2 * quarter] - confirmed[quarter];
    let last_acks = confirmed[n - 1] - confirmed[n - 1 - quarter];
    println!("soak: receipts in the second quarter {second_acks}, in the last {last_acks}");
    ensure!(
        second_acks > 0 && last_acks * 2 >= second_acks,
        "confirmations slowed: {second_acks} in the second quarter, {last_acks} in the last"
    );
    Ok(())
}
