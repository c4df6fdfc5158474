//! `renkei-bench federation`: ward mode measured beside HQ alone, in one run.
//!
//! Every run starts fresh brokers (the release `renkei-broker`), in demo mode, and publishes
//! `messages` status reports from `publishers` sites of one ward (QoS 1, unpaced, 100 in
//! flight each), then times until HQ's record holds them all (read from its SQLite file):
//!
//! - **hq**: straight to HQ, the embedded broker alone;
//! - **forward**: to a ward broker, whose uplink forwards to HQ through a TCP relay;
//! - **drain**: to a ward broker whose line to HQ is cut (the relay resets every connection);
//!   once the ward has recorded them all the line is restored, and the drain is timed from
//!   HQ's first forwarded message to its last.
//!
//! Then the ward broker's memory: `sites` simulated sites of the ward (`renkei-agent
//! simulate --only-ward`, one report a second each) for `seconds`, its RSS sampled at 1 Hz,
//! with HQ's beside it.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use renkei_shared::{
    Body, Comms, Envelope, Header, HqState, Id, Mode, Origin, PowerSource, SiteKind, SiteRef,
    SiteStatus, Timestamp, Topic, WardCode, codec,
};
use renkei_testkit::{AgentProcess, BrokerProcess};
use renkei_tests::proxy::{Fault, Proxy};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};

/// The ward of the ward broker (Shinjuku).
const WARD: u32 = 131041;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Messages per run.
    #[arg(long, default_value_t = 20_000)]
    messages: u64,
    /// Publishing sites (connections).
    #[arg(long, default_value_t = 100)]
    publishers: usize,
    /// Runs of each measurement; medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Simulated sites at the ward broker for the memory measurement (0: skip it).
    #[arg(long, default_value_t = 100)]
    sites: usize,
    /// How long the memory measurement runs.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
}

pub fn run(args: Args) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(run_async(args))
}

async fn run_async(args: Args) -> Result<()> {
    let mut hq = Vec::new();
    let mut forward = Vec::new();
    let mut drain = Vec::new();
    for run in 1..=args.runs {
        let rate = hq_alone(&args).await?;
        println!("run {run}: hq alone        {rate:8.0} msg/s recorded");
        hq.push(rate);
        let rate = forwarded(&args).await?;
        println!("run {run}: through a ward  {rate:8.0} msg/s recorded at HQ");
        forward.push(rate);
        let (rate, back) = drained(&args).await?;
        println!(
            "run {run}: drain           {rate:8.0} msg/s (link back {back:.1}s after the restore)"
        );
        drain.push(rate);
    }
    let (hq, forward, drain) = (median(&mut hq), median(&mut forward), median(&mut drain));
    println!();
    println!(
        "medians of {} runs, {} messages from {} sites:",
        args.runs, args.messages, args.publishers
    );
    println!("  HQ alone                 {hq:8.0} msg/s");
    println!(
        "  through a ward broker    {forward:8.0} msg/s  ({:.2}x HQ alone)",
        forward / hq
    );
    println!(
        "  drain after a cut        {drain:8.0} msg/s  ({:.2}x HQ alone)",
        drain / hq
    );
    if args.sites > 0 {
        memory(&args).await?;
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn start_hq() -> BrokerProcess {
    BrokerProcess::start()
}

/// A ward broker (demo mode) whose upstream is `hq_url`.
fn start_ward(hq_url: &str) -> BrokerProcess {
    BrokerProcess::start_in(
        renkei_tests::ward_broker_dir(hq_url, WARD, |_| String::new()),
        &["--demo"],
    )
}

/// How many of the ward's messages the record in `data_dir` holds.
fn recorded(data_dir: &Path) -> Result<u64> {
    renkei_tests::record_count(
        data_dir,
        "SELECT COUNT(*) FROM messages WHERE ward = ?1 AND kind = 'status'",
        WARD,
    )
}

/// Waits until the record in `data_dir` holds `want` messages; the times of the first and
/// the last poll that saw more than `from` and all.
async fn until_recorded(data_dir: &Path, from: u64, want: u64) -> Result<(Instant, Instant)> {
    let started = Instant::now();
    let mut first = None;
    loop {
        let n = recorded(data_dir).unwrap_or(0);
        if first.is_none() && n > from {
            first = Some(Instant::now());
        }
        if n >= want {
            let now = Instant::now();
            return Ok((first.unwrap_or(now), now));
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("only {n} of {want} recorded after 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The status of site `p` of the ward, number `seq`.
fn message(p: usize, seq: u64) -> Result<(Topic, Vec<u8>)> {
    let env = Envelope {
        header: Header {
            origin: Origin::Site(site(p)?),
            boot: 1,
            seq,
            sent_at: Timestamp::now(),
            mode: Mode::Test,
            historical: false,
        },
        body: Body::Status(SiteStatus {
            name: format!("新宿区立第{p}小学校 体育館"),
            kind: SiteKind::Shelter,
            location: None,
            hq: HqState::Established,
            power: PowerSource::Grid,
            battery_pct: None,
            comms: Comms::default(),
            interval_s: 1,
            uptime_s: Some(seq),
            queue_depth: Some(0),
            outbox_alarm: false,
        }),
    };
    Ok((Topic::of(&env)?, codec::encode(&env)?))
}

fn site(p: usize) -> Result<SiteRef> {
    Ok(SiteRef {
        ward: WardCode(WARD),
        site: Id::new(format!("fed-bench-{p:04}"))?,
    })
}

/// Publishes `args.messages` from `args.publishers` sites to `port` and waits for every
/// PUBACK.
async fn publish_all(port: u16, args: &Args) -> Result<()> {
    let per = args.messages.div_ceil(args.publishers as u64);
    let mut tasks = Vec::new();
    for p in 0..args.publishers {
        let count = per.min(args.messages.saturating_sub(per * p as u64));
        if count == 0 {
            break;
        }
        tasks.push(tokio::spawn(publisher(port, p, count)));
    }
    for task in tasks {
        task.await.context("a publisher panicked")??;
    }
    Ok(())
}

async fn publisher(port: u16, p: usize, count: u64) -> Result<()> {
    let mut options = MqttOptions::new(site(p)?.agent_client_id(), "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_inflight(100);
    let (client, mut events) = AsyncClient::new(options, 256);
    let sender = tokio::spawn(async move {
        for seq in 1..=count {
            let (topic, payload) = message(p, seq)?;
            client
                .publish(topic.to_string(), QoS::AtLeastOnce, false, payload)
                .await?;
        }
        anyhow::Ok(client)
    });
    let mut acked = 0u64;
    while acked < count {
        match tokio::time::timeout(Duration::from_secs(60), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => bail!("publisher {p}: {e}"),
            Err(_) => bail!("publisher {p}: no PUBACK for a minute ({acked} of {count})"),
        }
    }
    let client = sender.await??;
    let _ = client.disconnect().await;
    while let Ok(Ok(event)) = tokio::time::timeout(Duration::from_secs(1), events.poll()).await {
        if matches!(event, Event::Outgoing(Outgoing::Disconnect)) {
            break;
        }
    }
    Ok(())
}

/// HQ alone: messages recorded a second, from the first publish to the last row.
async fn hq_alone(args: &Args) -> Result<f64> {
    let hq = start_hq();
    let started = Instant::now();
    publish_all(hq.addrs.mqtt.port(), args).await?;
    let (_, done) = until_recorded(&hq.data_dir(), 0, args.messages).await?;
    Ok(args.messages as f64 / (done - started).as_secs_f64())
}

/// Through a ward broker: messages in HQ's record a second, from the first publish at the
/// ward to the last row at HQ.
async fn forwarded(args: &Args) -> Result<f64> {
    let hq = start_hq();
    let line = Proxy::start(&hq.addrs.mqtt.to_string()).await?;
    let ward = start_ward(&format!("mqtt://{}", line.addr()));
    wait_up(&ward).await?;
    let started = Instant::now();
    publish_all(ward.addrs.mqtt.port(), args).await?;
    let (_, done) = until_recorded(&hq.data_dir(), 0, args.messages).await?;
    Ok(args.messages as f64 / (done - started).as_secs_f64())
}

/// After a cut: the backlog's rate into HQ's record, from its first row to its last, and how
/// long after the restore the first came.
async fn drained(args: &Args) -> Result<(f64, f64)> {
    let hq = start_hq();
    let line = Proxy::start(&hq.addrs.mqtt.to_string()).await?;
    let ward = start_ward(&format!("mqtt://{}", line.addr()));
    wait_up(&ward).await?;
    line.cut(Fault::Reset);
    publish_all(ward.addrs.mqtt.port(), args).await?;
    until_recorded(&ward.data_dir(), 0, args.messages).await?;
    let before = recorded(&hq.data_dir())?;
    let restored = Instant::now();
    line.restore();
    let (first, done) = until_recorded(&hq.data_dir(), before, args.messages).await?;
    let backlog = args.messages - before;
    Ok((
        backlog as f64 / (done - first).as_secs_f64().max(0.05),
        (first - restored).as_secs_f64(),
    ))
}

async fn wait_up(ward: &BrokerProcess) -> Result<()> {
    let http = ward.addrs.http;
    renkei_testkit::eventually_within(Duration::from_secs(30), "the uplink up", || async move {
        let text = renkei_testkit::scrape(http, None).await;
        (renkei_testkit::metric(&text, "renkei_uplink_connected") == Some(1)).then_some(())
    })
    .await?;
    Ok(())
}

/// The ward broker's RSS with `args.sites` simulated sites, HQ's beside it.
async fn memory(args: &Args) -> Result<()> {
    let hq = start_hq();
    let ward = start_ward(&hq.mqtt_url());
    wait_up(&ward).await?;
    let state = tempfile::tempdir()?;
    let sites = args.sites.to_string();
    let ward_code = WARD.to_string();
    let state_dir = state.path().to_str().context("utf-8 path")?;
    let _simulator = AgentProcess::start(&[
        "simulate",
        "--broker",
        &ward.mqtt_url(),
        "--sites",
        &sites,
        "--only-ward",
        &ward_code,
        "--interval",
        "1s",
        "--state-dir",
        state_dir,
    ]);
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    println!();
    println!(
        "memory: {} simulated sites of ward {WARD} at 1 s for {} s (RSS, MiB, 1 Hz)",
        args.sites, args.seconds
    );
    for second in 1..=args.seconds {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (w, h) = (mib(ward.rss()), mib(hq.rss()));
        samples
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?
            .push((w, h));
        if second % 10 == 0 {
            println!("  {second:4} s  ward {w:6.1}  hq {h:6.1}");
        }
    }
    let samples = samples.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let peak = |f: fn(&(f64, f64)) -> f64| samples.iter().map(f).fold(0.0, f64::max);
    let tenth = (samples.len() / 10).max(1);
    let last = |f: fn(&(f64, f64)) -> f64| {
        samples.iter().rev().take(tenth).map(f).sum::<f64>() / tenth as f64
    };
    let at_ward = recorded(&ward.data_dir())?;
    // What a message costs on the ward's disk, for the spool's budget (docs/federation.md).
    let rows = renkei_tests::record_count(
        &ward.data_dir(),
        "SELECT COUNT(*) FROM messages WHERE ?1",
        1,
    )?;
    let bytes: u64 = ["renkei.db", "renkei.db-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(ward.data_dir().join(f)).ok())
        .map(|m| m.len())
        .sum();
    println!(
        "  ward record: {rows} messages in {:.1} MiB (database and WAL): {:.0} bytes a message",
        mib(bytes),
        bytes as f64 / rows.max(1) as f64
    );
    println!(
        "  ward broker: peak {:.1} MiB, last tenth {:.1} MiB; HQ: peak {:.1} MiB, last tenth {:.1} MiB; {at_ward} statuses recorded at the ward",
        peak(|s| s.0),
        last(|s| s.0),
        peak(|s| s.1),
        last(|s| s.1),
    );
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
