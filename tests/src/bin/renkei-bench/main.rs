//! `renkei-bench`: the load tool. It drives N MQTT publishers with real Renkei messages at a
//! broker and measures throughput and publish → subscriber latency, counting gaps and
//! duplicates, against several brokers in the same run so results are ratios, not absolutes.
//! On Renkei it also measures publish → recorder committed: every publisher subscribes to its
//! site's receipt topic, as an agent does, and times each message until the first receipt that
//! names it (the moment an agent may delete it from its outbox). The other targets have no
//! recorder and send no receipts.
//!
//! - `renkei`: `renkei-broker serve --demo` (ingest, validation, reducer, JSON mirror, and
//!   whatever else the broker does to every accepted message);
//! - `renkei-no-receipts`: the same broker, but the publishers do not subscribe to their
//!   receipts, so the broker sends none (what receipts cost, in the same run; not by default);
//! - `renkei-integrator`: the same broker with an integrator subscribed to the JSON mirror
//!   (`renkei/json/v1/#`), counted for gaps and duplicates as the subscriber is (not by default);
//! - `rumqttd`: bare rumqttd with the same router settings and no Renkei layer (this binary's
//!   `bare-rumqttd` subcommand, run as its own process);
//! - `mosquitto`: Debian's Mosquitto 2.0 with `max_queued_messages 0`, since its default
//!   silently drops QoS 1 messages to a subscriber that falls behind.
//!
//! The publishers use the tool's own lean client by default ([`lean`]: all a window allows in
//! one write), since the tool shares the machine with the broker it measures; `--client
//! rumqttc` puts them on rumqttc, one write per message, as the edge agent sends.
//!
//! ```text
//! cargo run --release -p renkei-tests --bin renkei-bench -- load --publishers 100 --messages 2000
//! ```

use std::collections::HashMap;
use std::fmt::Write as _;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::{Parser, Subcommand, ValueEnum};
use renkei_shared::{
    Body, Comms, Envelope, Header, HqState, Id, Mode, Origin, PowerSource, Receipt, SiteKind,
    SiteRef, SiteStatus, Timestamp, Topic, WARDS, codec, receipt_topic, topic,
};
use renkei_testkit::nats::NatsCluster;
use renkei_testkit::postgres::Postgres;
use renkei_testkit::process::{ready_line, wait_listening};
use renkei_testkit::{BrokerProcess, Mosquitto, Process, free_port};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

mod federation;
mod lean;
mod mem;

#[derive(Parser)]
#[command(
    about = "Renkei load tool: the same MQTT load against Renkei, bare rumqttd and Mosquitto"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Ward mode beside HQ alone: forwarding throughput, drain rate after a cut, and a ward
    /// broker's memory with its sites.
    Federation(federation::Args),
    /// Run the load against each target, `runs` times, and print a summary.
    Load {
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "renkei,rumqttd,mosquitto"
        )]
        targets: Vec<Target>,
        #[arg(long, default_value_t = 100)]
        publishers: usize,
        #[arg(long, default_value_t = 2000)]
        messages: u64,
        /// Runs per target; the summary reports medians.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Give up on a run when nothing arrives for this many seconds.
        #[arg(long, default_value_t = 20)]
        idle_timeout_s: u64,
        /// Total publish rate in messages per second, spread over the publishers (default: as
        /// fast as the brokers take them). A paced run measures latency at a realistic load; an
        /// unpaced one measures throughput, and its latencies are queueing.
        #[arg(long)]
        rate: Option<f64>,
        /// The publishers' MQTT client.
        #[arg(long, value_enum, default_value_t = Client::Lean)]
        client: Client,
    },
    /// Subscribe to a running system and report how old live messages are on arrival: from the
    /// `sent_at` their sender stamped to the subscriber's wall clock (retained copies and
    /// replayed backlog are skipped). Sender and subscriber clocks must agree, as on one machine.
    Watch {
        /// MQTT broker, `mqtt://host:port`.
        #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
        broker: String,
        #[arg(long, default_value = "renkei/v1/#")]
        filter: String,
        /// Seconds to ignore after subscribing (start-up bursts).
        #[arg(long, default_value_t = 5)]
        warmup_s: u64,
        /// Seconds to measure after the warm-up.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
    },
    /// Sample each target broker's memory (VmRSS, VmHWM) at 1 Hz: idle, with N quiet agents
    /// connected, and under `renkei-agent simulate` load with a dashboard and an integrator.
    Mem(mem::MemArgs),
    /// Serve bare rumqttd (Renkei's router settings, no Renkei layer) on a port.
    BareRumqttd {
        #[arg(long)]
        port: u16,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum)]
enum Target {
    Renkei,
    /// The same broker with publishers that do not subscribe to their receipts, so it sends
    /// none: what receipts cost, measured in the same run.
    RenkeiNoReceipts,
    /// The same broker with an integrator on the JSON mirror (`renkei/json/v1/#`), which the
    /// tool counts as it counts the subscriber: what an integrator costs, in the same run.
    RenkeiIntegrator,
    Rumqttd,
    Mosquitto,
    /// HQ on a cluster (docs/scaling.md): a three-node NATS JetStream cluster whose MQTT
    /// listener takes the load and serves the subscriber, and two Renkei instances reading its
    /// replicated stream into one PostgreSQL record and sending the receipts.
    Cluster,
}

/// The publishers' MQTT client. Both keep the same session: clean, receipts subscribed before
/// the first publish, [`WINDOW`] QoS 1 messages in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Client {
    /// The load tool's own publisher ([`lean`]): everything the window allows in one write,
    /// so that the load tool takes as little as it can of the CPU the broker runs on.
    Lean,
    /// rumqttc's `AsyncClient`, as the edge agent uses it: one write per message.
    Rumqttc,
}

/// QoS 1 messages a publisher keeps in flight.
const WINDOW: u16 = 100;

/// Every message of the bench is from boot 1.
const BOOT: u32 = 1;

/// What one run measured.
#[derive(Debug, Clone)]
struct RunResult {
    delivered: u64,
    expected: u64,
    duplicates: u64,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Publish → recorder committed, for a target that sends receipts.
    commit: Option<CommitResult>,
    /// What the integrator on the JSON mirror received (first copies, duplicates), if any.
    integrator: Option<(u64, u64)>,
    /// The broker process's peak RSS (`VmHWM`) once the run is over, in MiB: a fresh process
    /// for every run, so the run's own peak. `None` for a cluster (several processes).
    peak_rss_mib: Option<f64>,
}

/// Publish → recorder committed, from the first receipt that names each message.
#[derive(Debug, Clone)]
struct CommitResult {
    /// Messages handed to the MQTT client.
    sent: u64,
    /// Of those, named by a receipt.
    confirmed: u64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl CommitResult {
    fn never(&self) -> u64 {
        self.sent.saturating_sub(self.confirmed)
    }
}

/// `q`-quantile of sorted microseconds, in milliseconds (NaN if there are none).
fn quantile_ms(sorted_us: &[u64], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    sorted_us[((sorted_us.len() - 1) as f64 * q) as usize] as f64 / 1000.0
}

impl RunResult {
    fn rate(&self) -> f64 {
        self.delivered as f64 / self.seconds
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::BareRumqttd { port } => bare_rumqttd(port),
        Cmd::Mem(args) => mem::run(args),
        Cmd::Federation(args) => federation::run(args),
        Cmd::Watch {
            broker,
            filter,
            warmup_s,
            seconds,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(watch(
                &broker,
                &filter,
                Duration::from_secs(warmup_s),
                Duration::from_secs(seconds),
            ))
        }
        Cmd::Load {
            targets,
            publishers,
            messages,
            runs,
            idle_timeout_s,
            rate,
            client,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            let idle = Duration::from_secs(idle_timeout_s);
            let spec = Load {
                publishers,
                messages,
                idle,
                rate,
                client,
            };
            rt.block_on(load(targets, runs, spec))
        }
    }
}

fn bare_rumqttd(port: u16) -> Result<()> {
    // The same router limits renkei-broker configures by default (2 MiB × 5 segments per
    // filter log, 100 in flight, 5,000 connections), so the difference is the Renkei layer.
    let config = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 5000
max_outgoing_packet_count = 200
max_segment_size = 2097152
max_segment_count = 5
[v4.1]
name = "v4-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 0
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 20480
    max_inflight_count = 100
    dynamic_filters = true
"#
    );
    let config: rumqttd::Config = toml::from_str(&config).context("bare rumqttd config")?;
    let mut broker = rumqttd::Broker::new(config);
    println!("bare-rumqttd ready port={port}");
    broker.start().context("rumqttd stopped")?;
    Ok(())
}

async fn watch(broker: &str, filter: &str, warmup: Duration, seconds: Duration) -> Result<()> {
    let url = renkei_shared::url::BrokerUrl::parse(broker)?;
    anyhow::ensure!(
        !url.tls,
        "watch speaks plain MQTT only: give an mqtt:// URL"
    );
    let mut opts = MqttOptions::new(
        format!("bench-watch-{}", std::process::id()),
        url.host,
        url.port,
    );
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(64 * 1024, 64 * 1024);
    opts.set_inflight(100);
    let (client, mut events) = AsyncClient::new(opts, 1000);
    client.subscribe(filter, QoS::AtLeastOnce).await?;
    let subscribed = Instant::now();
    let (mut latencies_us, mut skipped, mut undecodable) = (Vec::new(), 0u64, 0u64);
    loop {
        let left = (subscribed + warmup + seconds).saturating_duration_since(Instant::now());
        let event = match tokio::time::timeout(left, events.poll()).await {
            Err(_) => break,
            Ok(event) => event.context("subscriber connection")?,
        };
        let Event::Incoming(Packet::Publish(p)) = event else {
            continue;
        };
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        if subscribed.elapsed() < warmup {
            continue;
        }
        let Ok(env) = codec::decode(&p.payload) else {
            undecodable += 1;
            continue;
        };
        if p.retain || env.header.historical {
            skipped += 1;
            continue;
        }
        let age_us = now_us.saturating_sub(env.header.sent_at.0.saturating_mul(1000));
        latencies_us.push(u64::try_from(age_us).unwrap_or(0));
    }
    latencies_us.sort_unstable();
    let n = latencies_us.len();
    println!(
        "watch {broker} {filter}: {n} live messages in {:.0?} ({:.0} msg/s), {skipped} retained or \
         historical skipped, {undecodable} not Renkei envelopes; sent_at → arrival p50 {:.1} ms, \
         p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        seconds,
        n as f64 / seconds.as_secs_f64(),
        quantile_ms(&latencies_us, 0.5),
        quantile_ms(&latencies_us, 0.9),
        quantile_ms(&latencies_us, 0.99),
        quantile_ms(&latencies_us, 1.0),
    );
    Ok(())
}

/// A running target broker; dropping it stops the broker.
enum Server {
    Renkei(BrokerProcess),
    Rumqttd {
        port: u16,
        _process: Process,
    },
    Mosquitto(Mosquitto),
    Cluster {
        // Dropped in order: the instances first, then the engine and the record.
        instances: Vec<BrokerProcess>,
        cluster: NatsCluster,
        _record: Postgres,
    },
}

impl Server {
    /// The port of its MQTT TCP listener.
    fn port(&self) -> u16 {
        match self {
            Server::Renkei(broker) => broker.addrs.mqtt.port(),
            Server::Rumqttd { port, .. } => *port,
            Server::Mosquitto(mosquitto) => mosquitto.port,
            Server::Cluster { cluster, .. } => cluster.nodes[0].ports.mqtt,
        }
    }
}

fn start(target: Target) -> Result<Server> {
    Ok(match target {
        Target::Renkei | Target::RenkeiNoReceipts | Target::RenkeiIntegrator => {
            Server::Renkei(BrokerProcess::start())
        }
        Target::Rumqttd => {
            let port = free_port();
            let mut process = Process::spawn(
                "bare-rumqttd",
                Command::new(std::env::current_exe()?)
                    .args(["bare-rumqttd", "--port", &port.to_string()])
                    .stdout(Stdio::piped()),
            );
            let stdout = process.child.stdout.take().context("stdout")?;
            ready_line(stdout, "bare-rumqttd ready", Duration::from_secs(10))
                .context("no ready line from bare-rumqttd")?;
            ensure!(
                wait_listening(port, Duration::from_secs(10)),
                "nothing listens on port {port}"
            );
            Server::Rumqttd {
                port,
                _process: process,
            }
        }
        // As fast as Mosquitto goes: 100 messages in flight per client, as rumqttd and Renkei
        // allow, and errors only in its log.
        Target::Mosquitto => Server::Mosquitto(
            Mosquitto::setup()
                .extra("max_inflight_messages 100\nlog_type error\n")
                .start(),
        ),
        Target::Cluster => {
            // Open, as the demo's embedded broker is: the cost measured is the engine's and
            // the record's, not the logins'.
            let cluster = NatsCluster::start("");
            let record = Postgres::start();
            let mut instances = Vec::new();
            for id in ["renkei-bench-a", "renkei-bench-b"] {
                let mut args = cluster.instance_flags(0);
                args.extend([
                    "--demo".to_owned(),
                    "--external-client-id".to_owned(),
                    id.to_owned(),
                    "--postgres".to_owned(),
                    record.url(),
                ]);
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                instances.push(BrokerProcess::start_in(renkei_testkit::prepare(), &args));
            }
            Server::Cluster {
                instances,
                cluster,
                _record: record,
            }
        }
    })
}

/// A ~200-byte status message of publisher `p`, sequence `seq`: what a real site sends.
fn message(p: usize, seq: u64) -> Result<(Topic, Vec<u8>)> {
    let ward = WARDS[p % WARDS.len()];
    let site = SiteRef {
        ward: ward.code,
        site: Id::new(format!("bench-{p:05}"))?,
    };
    let env = Envelope {
        header: Header {
            origin: Origin::Site(site),
            boot: 1,
            seq,
            sent_at: Timestamp(1_788_220_800_000 + seq as i64),
            mode: Mode::Test,
            historical: false,
        },
        body: Body::Status(SiteStatus {
            name: format!(
                "{}立第{p}小学校 体育館 指定避難所 (負荷試験用の拠点名・校舎棟とプール棟を含む運営区画)",
                ward.name_ja
            ),
            kind: SiteKind::Shelter,
            location: None,
            hq: HqState::Established,
            power: PowerSource::Generator,
            battery_pct: Some(80),
            comms: Comms::default(),
            interval_s: 30,
            uptime_s: Some(seq),
            queue_depth: Some(0),
            outbox_alarm: false,
        }),
    };
    Ok((Topic::of(&env)?, codec::encode(&env)?))
}

async fn load(targets: Vec<Target>, runs: usize, load: Load) -> Result<()> {
    let Load {
        publishers,
        messages,
        rate,
        client,
        ..
    } = load;
    let size = message(0, 1)?.1.len();
    let pace = rate.map_or("unpaced".to_owned(), |r| {
        format!("paced at {r:.0} msg/s in all")
    });
    println!(
        "load: {publishers} publishers x {messages} QoS 1 messages of {size} B (retained status \
         reports), {pace}, one QoS 1 subscriber to renkei/v1/#, {runs} runs per target, \
         publishers on the {} client",
        // The name `--client` takes, as clap spells it.
        client
            .to_possible_value()
            .map_or_else(|| format!("{client:?}"), |v| v.get_name().to_owned())
    );
    let mut all: HashMap<Target, Vec<RunResult>> = HashMap::new();
    for run in 1..=runs {
        // Interleave targets so that machine noise falls on all of them alike.
        for &target in &targets {
            let server = start(target)?;
            let receipts = matches!(
                target,
                Target::Renkei | Target::RenkeiIntegrator | Target::Cluster
            );
            let integrator = target == Target::RenkeiIntegrator;
            let mut result = one_run(server.port(), load, receipts, integrator).await?;
            result.peak_rss_mib = mem::peak_rss_mib(&server);
            let commit = match &result.commit {
                Some(c) => format!(
                    "commit p50 {:.1} ms p90 {:.1} ms p99 {:.1} ms max {:.1} ms, confirmed {}/{} never {}",
                    c.p50_ms,
                    c.p90_ms,
                    c.p99_ms,
                    c.max_ms,
                    c.confirmed,
                    c.sent,
                    c.never()
                ),
                None => "commit n/a".to_owned(),
            };
            let integrator = match result.integrator {
                Some((got, dup)) => format!("; integrator {got}/{} dup {dup}", result.expected),
                None => String::new(),
            };
            let peak = result
                .peak_rss_mib
                .map_or(String::new(), |mib| format!("; peak RSS {mib:.1} MiB"));
            println!(
                "run {run} {target:?}: {:.0} msg/s delivered {}/{} dup {} in {:.2}s, latency p50 {:.1} ms p99 {:.1} ms max {:.1} ms; {commit}{integrator}{peak}",
                result.rate(),
                result.delivered,
                result.expected,
                result.duplicates,
                result.seconds,
                result.p50_ms,
                result.p99_ms,
                result.max_ms
            );
            if result.delivered < result.expected {
                let brokers = match &server {
                    Server::Renkei(broker) => std::slice::from_ref(broker),
                    Server::Cluster { instances, .. } => instances.as_slice(),
                    _ => &[],
                };
                // What the broker said while the subscriber missed messages.
                for broker in brokers {
                    let log = broker.log();
                    for line in log
                        .lines()
                        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                        .take(20)
                    {
                        eprintln!("  broker: {line}");
                    }
                }
            }
            all.entry(target).or_default().push(result);
            drop(server);
        }
    }
    println!("\nmedians over {runs} runs:");
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let mut rates = HashMap::new();
    for &target in &targets {
        let results = &all[&target];
        let mut r: Vec<f64> = results.iter().map(RunResult::rate).collect();
        let mut p99: Vec<f64> = results.iter().map(|r| r.p99_ms).collect();
        let lost: u64 = results.iter().map(|r| r.expected - r.delivered).sum();
        let dups: u64 = results.iter().map(|r| r.duplicates).sum();
        let rate = median(&mut r);
        rates.insert(target, rate);
        let commits: Vec<&CommitResult> =
            results.iter().filter_map(|r| r.commit.as_ref()).collect();
        let commit = if commits.is_empty() {
            "commit n/a".to_owned()
        } else {
            let of = |f: fn(&CommitResult) -> f64| {
                let mut v: Vec<f64> = commits.iter().map(|c| f(c)).collect();
                median(&mut v)
            };
            let (p50, p90, p99, max) = (
                of(|c| c.p50_ms),
                of(|c| c.p90_ms),
                of(|c| c.p99_ms),
                of(|c| c.max_ms),
            );
            let confirmed: u64 = commits.iter().map(|c| c.confirmed).sum();
            let sent: u64 = commits.iter().map(|c| c.sent).sum();
            let never: u64 = commits.iter().map(|c| c.never()).sum();
            format!(
                "commit p50 {p50:.1} ms p90 {p90:.1} ms p99 {p99:.1} ms max {max:.1} ms, \
                 confirmed {confirmed}/{sent} never {never}"
            )
        };
        // Lost and duplicated on the JSON mirror, over the runs that had an integrator.
        let integrator = results
            .iter()
            .filter_map(|r| r.integrator.map(|(got, dup)| (r.expected - got, dup)))
            .reduce(|a, b| (a.0 + b.0, a.1 + b.1))
            .map_or(String::new(), |(lost, dups)| {
                format!("; integrator lost {lost}, duplicates {dups}")
            });
        let mut peaks: Vec<f64> = results.iter().filter_map(|r| r.peak_rss_mib).collect();
        let peak = if peaks.is_empty() {
            String::new()
        } else {
            format!("; peak RSS {:.1} MiB", median(&mut peaks))
        };
        println!(
            "  {target:?}: {rate:.0} msg/s, p99 {:.1} ms, lost {lost}, duplicates {dups}; \
             {commit}{integrator}{peak}",
            median(&mut p99)
        );
    }
    if let Some(renkei) = rates.get(&Target::Renkei) {
        for (peer, rate) in &rates {
            if *peer != Target::Renkei {
                println!("  Renkei / {peer:?} = {:.2}", renkei / rate);
            }
        }
    }
    Ok(())
}

/// One load, as the command line gave it.
#[derive(Debug, Clone, Copy)]
struct Load {
    publishers: usize,
    messages: u64,
    idle: Duration,
    rate: Option<f64>,
    client: Client,
}

async fn one_run(port: u16, load: Load, receipts: bool, integrator: bool) -> Result<RunResult> {
    let Load {
        publishers,
        messages,
        idle,
        rate,
        client,
    } = load;
    let expected = publishers as u64 * messages;
    let start = Instant::now();
    let table = || -> Arc<Vec<Vec<AtomicU64>>> {
        Arc::new(
            (0..publishers)
                .map(|_| (0..=messages).map(|_| AtomicU64::new(0)).collect())
                .collect(),
        )
    };
    // Publish times in µs since `start`, per publisher and sequence (seq starts at 1).
    let sent = table();
    // Arrival of the first receipt naming each message, in µs since `start` (0: none yet).
    let committed = table();

    // The subscriber, connected and subscribed before anyone publishes.
    let (sub, receiver) = subscriber(
        port,
        topic::ALL,
        Payload::Postcard,
        (publishers, messages),
        idle,
        start,
        Some(Arc::clone(&sent)),
    )
    .await?;
    // An integrator on the JSON mirror, for the target that has one.
    let integrator = if integrator {
        Some(
            subscriber(
                port,
                topic::ALL_JSON,
                Payload::Json,
                (publishers, messages),
                idle,
                start,
                None,
            )
            .await?,
        )
    } else {
        None
    };

    let shared = Arc::new(Publishers {
        port,
        publishers,
        messages,
        idle,
        rate,
        start,
        sent: Arc::clone(&sent),
        committed: Arc::clone(&committed),
    });
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let shared = Arc::clone(&shared);
        let receipt_filter = if receipts {
            Some(receipt_topic(&SiteRef {
                ward: WARDS[p % WARDS.len()].code,
                site: Id::new(format!("bench-{p:05}"))?,
            }))
        } else {
            None
        };
        tasks.push(tokio::spawn(async move {
            match client {
                Client::Lean => lean::publish(&shared, p, receipt_filter).await,
                Client::Rumqttc => rumqttc_publisher(shared, p, receipt_filter).await,
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let Received {
        delivered,
        duplicates,
        latencies_us: mut lat,
        last,
        seen,
    } = receiver.await?;
    let _ = sub.disconnect().await;
    let integrator = match integrator {
        Some((client, counting)) => {
            let received = counting.await?;
            let _ = client.disconnect().await;
            Some((received.delivered, received.duplicates))
        }
        None => None,
    };
    lat.sort_unstable();
    let pct = |q: f64| quantile_ms(&lat, q);
    let commit = receipts.then(|| commit_result(&sent, &committed, &seen));
    Ok(RunResult {
        delivered,
        expected,
        duplicates,
        seconds: last.duration_since(start).as_secs_f64(),
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        max_ms: pct(1.0),
        commit,
        integrator,
        peak_rss_mib: None,
    })
}

/// Marks every message of this publisher that `receipt` names for the first time as committed
/// at `now_us`; returns how many it marked. Names of unsent or unknown messages are ignored.
fn confirm(
    receipt: &Receipt,
    messages: u64,
    sent: &[AtomicU64],
    committed: &[AtomicU64],
    now_us: u64,
) -> u64 {
    let mut marked = 0;
    for range in receipt.recorded.iter().filter(|r| r.boot == BOOT) {
        for seq in range.first.max(1)..=range.last.min(messages) {
            let i = seq as usize;
            if sent[i].load(Ordering::Relaxed) != 0 && committed[i].load(Ordering::Relaxed) == 0 {
                committed[i].store(now_us, Ordering::Relaxed);
                marked += 1;
            }
        }
    }
    marked
}

/// Publish → first receipt over every message sent; prints the messages no receipt named.
fn commit_result(
    sent: &[Vec<AtomicU64>],
    committed: &[Vec<AtomicU64>],
    seen: &[Vec<bool>],
) -> CommitResult {
    let mut lat: Vec<u64> = Vec::new();
    let mut sent_count = 0u64;
    let mut never: Vec<(usize, usize)> = Vec::new();
    for (p, (sent, committed)) in sent.iter().zip(committed).enumerate() {
        for (seq, (s, c)) in sent.iter().zip(committed).enumerate().skip(1) {
            let s = s.load(Ordering::Relaxed);
            if s == 0 {
                continue;
            }
            sent_count += 1;
            match c.load(Ordering::Relaxed) {
                0 => never.push((p, seq)),
                c => lat.push(c.saturating_sub(s)),
            }
        }
    }
    if !never.is_empty() {
        let delivered = never
            .iter()
            .filter(|&&(p, seq)| seen.get(p).and_then(|s| s.get(seq)) == Some(&true))
            .count();
        let mut examples = String::new();
        for (p, seq) in never.iter().take(10) {
            let _ = write!(examples, " bench-{p:05}#{seq}");
        }
        println!(
            "  never confirmed by a receipt: {} ({delivered} of them reached the subscriber), e.g.{examples}",
            never.len()
        );
    }
    lat.sort_unstable();
    CommitResult {
        sent: sent_count,
        confirmed: lat.len() as u64,
        p50_ms: quantile_ms(&lat, 0.5),
        p90_ms: quantile_ms(&lat, 0.9),
        p99_ms: quantile_ms(&lat, 0.99),
        max_ms: quantile_ms(&lat, 1.0),
    }
}

/// What every publisher of a run shares.
struct Publishers {
    port: u16,
    publishers: usize,
    messages: u64,
    idle: Duration,
    rate: Option<f64>,
    start: Instant,
    /// Publish times in µs since `start`, per publisher and sequence (seq starts at 1).
    sent: Arc<Vec<Vec<AtomicU64>>>,
    /// Arrival of the first receipt naming each message, in µs since `start` (0: none yet).
    committed: Arc<Vec<Vec<AtomicU64>>>,
}

impl Publishers {
    /// Records that message `seq` of publisher `p` is being published now.
    fn mark_sent(&self, p: usize, seq: u64) {
        self.sent[p][seq as usize]
            .store(self.start.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    /// Marks what `receipt` names for publisher `p`; returns how many it newly confirmed.
    fn on_receipt(&self, p: usize, receipt: &Receipt) -> u64 {
        let now_us = (self.start.elapsed().as_micros() as u64).max(1);
        confirm(
            receipt,
            self.messages,
            &self.sent[p],
            &self.committed[p],
            now_us,
        )
    }

    /// The pacer of publisher `p`: its share of the total rate, started at a spread-out phase
    /// so the publishers do not fire in lockstep. `None` when unpaced.
    fn pacer(&self, p: usize) -> Option<tokio::time::Interval> {
        self.rate.map(|r| {
            let period = Duration::from_secs_f64(self.publishers as f64 / r);
            let phase = period.mul_f64((p as f64 * 0.618_033_988_7) % 1.0);
            tokio::time::interval_at(tokio::time::Instant::now() + phase, period)
        })
    }
}

/// Publisher `p` on a rumqttc client (`--client rumqttc`): one `AsyncClient` and its event
/// loop, as the edge agent uses them. Returns how many PUBACKs it received.
async fn rumqttc_publisher(
    shared: Arc<Publishers>,
    p: usize,
    receipt_filter: Option<String>,
) -> u64 {
    let ward = WARDS[p % WARDS.len()].code;
    let mut opts = MqttOptions::new(
        format!("agent-{ward}-bench-{p:05}"),
        "127.0.0.1",
        shared.port,
    );
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(WINDOW);
    let (client, mut events) = AsyncClient::new(opts, 200);
    // Subscribed to the site's receipts before the first publish, as an agent is: the
    // SUBSCRIBE is queued ahead of every PUBLISH on the connection.
    if let Some(filter) = &receipt_filter
        && let Err(e) = client.subscribe(filter.clone(), QoS::AtLeastOnce).await
    {
        eprintln!("publisher {p}: subscribe to receipts: {e}");
    }
    let (connected_tx, connected) = tokio::sync::oneshot::channel::<()>();
    let poller = {
        let client = client.clone();
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let (messages, idle) = (shared.messages, shared.idle);
            let mut acks = 0u64;
            let mut confirmed = 0u64;
            let mut connacks = 0u32;
            let mut connected_tx = Some(connected_tx);
            loop {
                let acks_done = acks >= messages;
                if acks_done && (receipt_filter.is_none() || confirmed >= messages) {
                    break;
                }
                // Once every PUBACK is in, wait for the missing receipts only while something
                // still arrives.
                let event = if acks_done {
                    match tokio::time::timeout(idle, events.poll()).await {
                        Ok(event) => event,
                        Err(_) => break,
                    }
                } else {
                    events.poll().await
                };
                match event {
                    Ok(Event::Incoming(Packet::PubAck(_))) => acks += 1,
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        connacks += 1;
                        if let Some(tx) = connected_tx.take() {
                            let _ = tx.send(());
                        }
                        // A clean session forgets its subscriptions on a reconnect.
                        if connacks > 1
                            && let Some(filter) = &receipt_filter
                        {
                            let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(publish)))
                        if receipt_filter.as_deref() == Some(publish.topic.as_str()) =>
                    {
                        let Ok(receipt) = Receipt::decode(&publish.payload) else {
                            eprintln!("publisher {p}: a receipt that does not decode");
                            continue;
                        };
                        confirmed += shared.on_receipt(p, &receipt);
                    }
                    Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
                    Ok(_) => {}
                    Err(e) => {
                        eprintln!("publisher {p}: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            acks
        })
    };
    // A paced publisher starts once connected: a realistic site publishes over a live link, and
    // the connection storm is measured by the unpaced runs.
    if shared.rate.is_some() {
        let _ = tokio::time::timeout(Duration::from_secs(60), connected).await;
    }
    let mut pacer = shared.pacer(p);
    for seq in 1..=shared.messages {
        if let Some(pacer) = pacer.as_mut() {
            pacer.tick().await;
        }
        let Ok((topic, payload)) = message(p, seq) else {
            continue;
        };
        shared.mark_sent(p, seq);
        if client
            .publish(
                topic.to_string(),
                QoS::AtLeastOnce,
                topic.retained(),
                payload,
            )
            .await
            .is_err()
        {
            break;
        }
    }
    let acks = match tokio::time::timeout(Duration::from_secs(120), poller).await {
        Ok(Ok(acks)) => acks,
        _ => 0,
    };
    let _ = client.disconnect().await;
    acks
}

/// How a subscriber reads what it receives.
#[derive(Debug, Clone, Copy)]
enum Payload {
    /// Renkei's wire format, on `renkei/v1/#`.
    Postcard,
    /// The JSON mirror, on `renkei/json/v1/#`.
    Json,
}

/// What one subscriber received.
struct Received {
    delivered: u64,
    duplicates: u64,
    /// Publish → arrival of each first copy, when the publish times were given.
    latencies_us: Vec<u64>,
    last: Instant,
    /// Per publisher and seq: arrived.
    seen: Vec<Vec<bool>>,
}

/// A QoS 1 subscriber to `filter`, connected and subscribed when this returns, counting every
/// bench message `(publisher, seq)` it receives (first copies and duplicates) until it has them
/// all or nothing arrives for `idle`. With `sent`, it also measures publish → arrival.
async fn subscriber(
    port: u16,
    filter: &str,
    payload: Payload,
    (publishers, messages): (usize, u64),
    idle: Duration,
    start: Instant,
    sent: Option<Arc<Vec<Vec<AtomicU64>>>>,
) -> Result<(AsyncClient, tokio::task::JoinHandle<Received>)> {
    let name = match payload {
        Payload::Postcard => "bench-sub",
        Payload::Json => "bench-integrator",
    };
    let mut opts = MqttOptions::new(format!("{name}-{}", std::process::id()), "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_max_packet_size(64 * 1024, 64 * 1024);
    opts.set_inflight(100);
    let (client, mut events) = AsyncClient::new(opts, 1000);
    client.subscribe(filter, QoS::AtLeastOnce).await?;
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), events.poll())
            .await
            .context("subscriber did not connect")??;
        if let Event::Incoming(Packet::SubAck(_)) = event {
            break;
        }
    }
    let expected = publishers as u64 * messages;
    let counting = tokio::spawn(async move {
        let mut received = Received {
            delivered: 0,
            duplicates: 0,
            latencies_us: Vec::with_capacity(if sent.is_some() { expected as usize } else { 0 }),
            last: Instant::now(),
            seen: (0..publishers)
                .map(|_| vec![false; messages as usize + 1])
                .collect(),
        };
        while received.delivered < expected {
            let event = match tokio::time::timeout(idle, events.poll()).await {
                Ok(Ok(e)) => e,
                Ok(Err(e)) => {
                    eprintln!("{name}: {e}");
                    break;
                }
                Err(_) => break, // idle: whatever is missing is lost
            };
            let Event::Incoming(Packet::Publish(p)) = event else {
                continue;
            };
            let now_us = start.elapsed().as_micros() as u64;
            let env = match payload {
                Payload::Postcard => codec::decode(&p.payload).ok(),
                Payload::Json => serde_json::from_slice::<Envelope>(&p.payload).ok(),
            };
            let Some((idx, seq)) = env.as_ref().and_then(bench_key) else {
                continue;
            };
            if idx >= publishers || seq > messages as usize {
                continue;
            }
            if received.seen[idx][seq] {
                received.duplicates += 1;
            } else {
                received.seen[idx][seq] = true;
                received.delivered += 1;
                if let Some(sent) = &sent {
                    let t0 = sent[idx][seq].load(Ordering::Relaxed);
                    received.latencies_us.push(now_us.saturating_sub(t0));
                }
            }
            received.last = Instant::now();
        }
        received
    });
    Ok((client, counting))
}

/// `(publisher, seq)` of a bench message: its site is `bench-{publisher}`.
fn bench_key(env: &Envelope) -> Option<(usize, usize)> {
    let Origin::Site(site) = &env.header.origin else {
        return None;
    };
    let idx = site.site.as_str().strip_prefix("bench-")?.parse().ok()?;
    Some((idx, env.header.seq as usize))
}
