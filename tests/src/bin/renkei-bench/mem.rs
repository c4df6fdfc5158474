//! `renkei-bench mem`: the broker's memory through a deployment in miniature, sampled once a
//! second, against Renkei, bare rumqttd and Mosquitto in the same run, so that the figures can
//! be read as ratios as well as against the footprint targets of a ward-office broker (BENCHMARKS.md §9).
//!
//! Each target, each run, is a fresh broker process on free ports (Renkei: `renkei-broker
//! serve --demo`; rumqttd: this binary's `bare-rumqttd`; Mosquitto: the test kit's, with the
//! load tool's extra lines), and goes through these phases, every one labelled in the samples:
//!
//! 1. `idle`: nothing connected, `--idle-seconds` (10).
//! 2. `connecting`, then `quiet`: `--sites` (2,000) quiet MQTT clients (this module's own, on
//!    rumqttc's `mqttbytes`), each holding the session of a Renkei agent with `confirm =
//!    "receipt"` (the default): clean session, keep alive 60 s, one SUBSCRIBE to its site's
//!    command filter and its receipt topic, and nothing published. Measured for
//!    `--quiet-seconds` (20) once every client has its SUBACK; then they send DISCONNECT and go
//!    (`leaving`).
//! 3. `load`: a dashboard-like subscriber on `renkei/v1/#` and an integrator on the JSON mirror
//!    `renkei/json/v1/#` (rumqttd and Mosquitto have no mirror: it receives nothing there),
//!    both QoS 1 rumqttc clients in this process, then `renkei-agent simulate --sites N
//!    --interval 1s --scenario steady`, for `--load-seconds` (600) from the simulator's start.
//!    The simulator publishes live at QoS 1: it has no outbox and no confirm mode, subscribes
//!    only to its command filter and never to receipts, and sends the same whatever the broker
//!    answers. So the offered load is the same for every target, and Renkei sends it no
//!    receipts.
//! 4. `stopping`, then `after`: the simulator stopped with SIGTERM (every site sends its death
//!    and disconnects) and the subscribers gone; `--after-seconds` (10).
//!
//! The sampler reads `VmRSS` and `VmHWM` from `/proc/PID/status` of the broker process (only)
//! once a second from the moment it is ready. The raw samples go to `--out` as CSV
//! (`target,run,time_s,phase,rss_kib,hwm_kib`, time from the broker's start), with `#` lines
//! that say what ran and, at the end, the summary the tool prints.
//!
//! ```text
//! target/release/renkei-bench mem --load-seconds 60 --runs 1 --out mem.csv
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::BytesMut;
use clap::{Args, ValueEnum};
use renkei_shared::{Id, SiteRef, WARDS, receipt_topic, topic};
use renkei_testkit::mosquitto::MOSQUITTO;
use renkei_testkit::process::ready_line;
use renkei_testkit::{Process, binary};
use rumqttc::mqttbytes::{self, v4};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use crate::lean::{parse, read_more};
use crate::{Server, Target, start};

/// Settings of `renkei-bench mem`.
#[derive(Debug, Args)]
pub struct MemArgs {
    /// Brokers to measure, one after the other within each run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "renkei,rumqttd,mosquitto"
    )]
    targets: Vec<MemTarget>,
    /// Runs per target (targets interleaved); the summary reports medians over runs.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Sites: quiet clients in the second phase, simulated sites in the third.
    #[arg(long, default_value_t = 2000)]
    sites: usize,
    /// Seconds with nothing connected, right after the broker starts.
    #[arg(long, default_value_t = 10)]
    idle_seconds: u64,
    /// Seconds measured once every quiet client is connected and subscribed.
    #[arg(long, default_value_t = 20)]
    quiet_seconds: u64,
    /// Seconds of load from the simulator's start (600: ten minutes; the fifth and last
    /// minutes are compared for flatness; below 600, the fifth and last tenths).
    #[arg(long, default_value_t = 600)]
    load_seconds: u64,
    /// Seconds measured after the simulator and the subscribers have gone.
    #[arg(long, default_value_t = 10)]
    after_seconds: u64,
    /// The simulated sites' heartbeat (`renkei-agent simulate --interval`).
    #[arg(long, default_value = "1s")]
    interval: String,
    /// Write the raw samples (CSV, with `#` lines saying what ran, and the summary) here.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run each broker inside a memory cgroup of this size (e.g. `192MiB`; cgroup v2's
    /// `memory.max` or v1's `memory.limit_in_bytes`, made by the tool and removed after) and
    /// report whether the kernel had to reclaim or kill: a small box's limit, enforced.
    #[arg(long, value_parser = renkei_shared::units::parse_size)]
    cgroup_memory_max: Option<u64>,
}

/// A memory cgroup the tool made for one broker process, removed when dropped.
struct MemoryCgroup {
    dir: PathBuf,
    /// cgroup v2 (`memory.max`, `memory.events`) or v1 (`memory.limit_in_bytes`, `memory.failcnt`).
    v2: bool,
}

impl MemoryCgroup {
    /// Makes a cgroup limited to `bytes` and moves `pid` into it.
    fn enter(pid: u32, bytes: u64) -> Result<MemoryCgroup> {
        let name = format!("renkei-bench-mem-{}-{pid}", std::process::id());
        let v2_root = Path::new("/sys/fs/cgroup");
        let (dir, v2, limit_file) = if v2_root.join("cgroup.controllers").exists() {
            (v2_root.join(&name), true, "memory.max")
        } else if Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists()
            && !Path::new("/sys/fs/cgroup/memory").exists()
        {
            (
                Path::new("/sys/fs/cgroup/unified").join(&name),
                true,
                "memory.max",
            )
        } else {
            (
                Path::new("/sys/fs/cgroup/memory").join(&name),
                false,
                "memory.limit_in_bytes",
            )
        };
        std::fs::create_dir(&dir)
            .with_context(|| format!("making the cgroup {} (needs root)", dir.display()))?;
        let cgroup = MemoryCgroup { dir, v2 };
        std::fs::write(cgroup.dir.join(limit_file), bytes.to_string())
            .with_context(|| format!("{}/{limit_file}", cgroup.dir.display()))?;
        std::fs::write(cgroup.dir.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("moving pid {pid} into {}", cgroup.dir.display()))?;
        Ok(cgroup)
    }

    /// What the limit did: times the kernel hit it, and processes it killed.
    fn outcome(&self) -> String {
        let read = |file: &str| std::fs::read_to_string(self.dir.join(file)).unwrap_or_default();
        let stat = read("memory.stat");
        let stat_mib = |key: &str| {
            stat.lines()
                .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
                .unwrap_or(0)
                / (1024 * 1024)
        };
        if self.v2 {
            let events = read("memory.events");
            let field = |key: &str| {
                events
                    .lines()
                    .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            format!(
                "cgroup v2: limit hit {} times (high {}), oom {}, oom kills {}; now anonymous \
                 {} MiB, page cache {} MiB (the database's file pages, reclaimable)",
                field("max "),
                field("high "),
                field("oom "),
                field("oom_kill "),
                stat_mib("anon "),
                stat_mib("file ")
            )
        } else {
            let oom = read("memory.oom_control");
            let killed = oom
                .lines()
                .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse::<u64>().ok())
                .unwrap_or(0);
            format!(
                "cgroup v1: limit hit {} times, peak {} KiB (page cache included), oom kills \
                 {killed}; now anonymous {} MiB, page cache {} MiB (the database's file pages, \
                 reclaimable)",
                read("memory.failcnt").trim(),
                read("memory.max_usage_in_bytes")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0)
                    / 1024,
                stat_mib("rss "),
                stat_mib("cache ")
            )
        }
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        // Empty once its process has exited; a cgroup with a process in it cannot be removed.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("cannot remove the cgroup {}", self.dir.display());
    }
}

/// A broker `mem` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum)]
enum MemTarget {
    Renkei,
    Rumqttd,
    Mosquitto,
}

impl MemTarget {
    fn name(self) -> &'static str {
        match self {
            MemTarget::Renkei => "renkei",
            MemTarget::Rumqttd => "rumqttd",
            MemTarget::Mosquitto => "mosquitto",
        }
    }

    fn load_target(self) -> Target {
        match self {
            MemTarget::Renkei => Target::Renkei,
            MemTarget::Rumqttd => Target::Rumqttd,
            MemTarget::Mosquitto => Target::Mosquitto,
        }
    }
}

/// Which part of a run a sample was taken in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    Idle,
    Connecting,
    Quiet,
    Leaving,
    Load,
    Stopping,
    After,
}

impl Phase {
    const ALL: [Phase; 7] = [
        Phase::Idle,
        Phase::Connecting,
        Phase::Quiet,
        Phase::Leaving,
        Phase::Load,
        Phase::Stopping,
        Phase::After,
    ];

    fn name(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Connecting => "connecting",
            Phase::Quiet => "quiet",
            Phase::Leaving => "leaving",
            Phase::Load => "load",
            Phase::Stopping => "stopping",
            Phase::After => "after",
        }
    }

    fn from_u8(n: u8) -> Phase {
        Phase::ALL
            .get(usize::from(n))
            .copied()
            .unwrap_or(Phase::After)
    }
}

/// One reading of the broker's memory.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Seconds since the broker was ready.
    t: f64,
    phase: Phase,
    rss_kib: u64,
    hwm_kib: u64,
}

/// `VmRSS` and `VmHWM` of process `pid`, in KiB.
fn read_memory(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|n| n.trim().parse::<u64>().ok())
    };
    match (field("VmRSS:"), field("VmHWM:")) {
        (Some(rss), Some(hwm)) => Ok((rss, hwm)),
        // A zombie has a status file without them.
        _ => bail!("no VmRSS/VmHWM in /proc/{pid}/status: the process has exited"),
    }
}

/// What the sampling task and the run share.
struct Sampling {
    pid: u32,
    start: Instant,
    phase: AtomicU8,
    samples: Mutex<Vec<Sample>>,
    /// Why sampling stopped early (the broker is gone).
    failed: Mutex<Option<String>>,
}

impl Sampling {
    fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
    }

    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// An error if the broker stopped being sampled (it has exited).
    fn check(&self) -> Result<()> {
        match &*self.failed.lock().unwrap_or_else(PoisonError::into_inner) {
            Some(why) => bail!("the broker (pid {}) is gone: {why}", self.pid),
            None => Ok(()),
        }
    }

    /// Holds `phase` for `seconds`, checking every second that the broker lives.
    async fn hold(&self, phase: Phase, seconds: u64) -> Result<()> {
        self.set_phase(phase);
        let until = Instant::now() + Duration::from_secs(seconds);
        while Instant::now() < until {
            self.check()?;
            let left = until.saturating_duration_since(Instant::now());
            tokio::time::sleep(left.min(Duration::from_secs(1))).await;
        }
        self.check()
    }

    fn samples(&self) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// A task aborted when this is dropped.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Samples `pid` once a second from now until the returned guard is dropped.
fn start_sampling(pid: u32) -> (Arc<Sampling>, AbortOnDrop<()>) {
    let sampling = Arc::new(Sampling {
        pid,
        start: Instant::now(),
        phase: AtomicU8::new(Phase::Idle as u8),
        samples: Mutex::new(Vec::new()),
        failed: Mutex::new(None),
    });
    let shared = Arc::clone(&sampling);
    let task = tokio::spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let phase = Phase::from_u8(shared.phase.load(Ordering::Relaxed));
            match read_memory(shared.pid) {
                Ok((rss_kib, hwm_kib)) => {
                    let sample = Sample {
                        t: shared.now(),
                        phase,
                        rss_kib,
                        hwm_kib,
                    };
                    shared
                        .samples
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(sample);
                }
                Err(e) => {
                    *shared.failed.lock().unwrap_or_else(PoisonError::into_inner) =
                        Some(format!("{e:#}"));
                    break;
                }
            }
        }
    });
    (sampling, AbortOnDrop(task))
}

/// The pid of this process's one child called `name` (Mosquitto, which the test kit starts
/// and does not name).
fn child_named(name: &str) -> Result<u32> {
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").context("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // Processes come and go while this reads: a vanished one is not ours.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u32>().ok());
        if comm == name && ppid == Some(me) {
            found.push(pid);
        }
    }
    match found[..] {
        [pid] => Ok(pid),
        [] => bail!("no child process named {name}"),
        _ => bail!("several child processes named {name}: {found:?}"),
    }
}

/// The peak RSS (`VmHWM`) of `server`'s broker process so far, in MiB; `None` for a cluster
/// (several processes) or a process gone. For `renkei-bench load`, where each run has a fresh
/// broker process.
pub(crate) fn peak_rss_mib(server: &Server) -> Option<f64> {
    let (_, hwm_kib) = read_memory(pid_of(server).ok()?).ok()?;
    Some(hwm_kib as f64 / 1024.0)
}

/// The pid of a target's one broker process.
fn pid_of(server: &Server) -> Result<u32> {
    Ok(match server {
        Server::Cluster { .. } => {
            bail!("the memory benchmark measures one broker process; a cluster is several")
        }
        Server::Renkei(broker) => broker.pid(),
        Server::Rumqttd { _process, .. } => _process.id(),
        Server::Mosquitto(_) => child_named("mosquitto")?,
    })
}

/// What a target's broker process is, for the record: its pid and its configuration.
fn describe(server: &Server) -> Result<(u32, String)> {
    let pid = pid_of(server)?;
    Ok(match server {
        Server::Cluster { .. } => unreachable!("pid_of refuses a cluster"),
        Server::Renkei(broker) => {
            let config_path = broker.dir.path().join(renkei_testkit::CONFIG);
            let config = std::fs::read_to_string(&config_path)
                .with_context(|| format!("{}", config_path.display()))?;
            let bin = binary("renkei-broker", "renkei-broker");
            (
                pid,
                format!(
                    "{} serve --demo (every listener on 127.0.0.1 port 0); every other setting \
                     at its default; config file:\n{}",
                    bin.display(),
                    config.trim_end()
                ),
            )
        }
        Server::Rumqttd { port, .. } => (
            pid,
            format!(
                "renkei-bench bare-rumqttd --port {port}: the vendored rumqttd with Renkei's \
                 router settings and no Renkei layer (router max_connections 5000, \
                 max_outgoing_packet_count 200, max_segment_size 2 MiB, max_segment_count 5; \
                 v4 listener max_inflight_count 100, max_payload_size 20480, \
                 connection_timeout_ms 60000, dynamic_filters)"
            ),
        ),
        Server::Mosquitto(_) => {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
                .with_context(|| format!("/proc/{pid}/cmdline"))?;
            let args: Vec<String> = cmdline
                .split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let config = match args
                .iter()
                .position(|a| a == "-c")
                .and_then(|i| args.get(i + 1))
            {
                Some(path) => std::fs::read_to_string(path)
                    .with_context(|| format!("Mosquitto's config {path}"))?,
                None => bail!("no -c in Mosquitto's command line {args:?}"),
            };
            let version = Command::new(MOSQUITTO)
                .arg("-h")
                .stdin(Stdio::null())
                .output()
                .ok()
                .and_then(|out| {
                    String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .next()
                        .map(str::to_owned)
                })
                .unwrap_or_else(|| "version unknown".into());
            (
                pid,
                format!(
                    "{} ({version}); config file:\n{}",
                    args.join(" "),
                    config.trim_end()
                ),
            )
        }
    })
}

/// The site of quiet client `p`: `bench-{p}` in the wards in turn, as the load tool's.
fn bench_site(p: usize) -> Result<SiteRef> {
    Ok(SiteRef {
        ward: WARDS[p % WARDS.len()].code,
        site: Id::new(format!("bench-{p:05}"))?,
    })
}

/// Keep alive of the quiet clients, as an agent's (PINGREQ at half of it).
const QUIET_KEEP_ALIVE: u16 = 60;

/// The quiet clients: connected and subscribed, saying nothing.
struct QuietClients {
    stop: watch::Sender<bool>,
    /// Dropped, it aborts every client (closing its socket without DISCONNECT).
    tasks: JoinSet<()>,
    subscribed: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    /// Filters refused in a SUBACK.
    refused: Arc<AtomicUsize>,
}

impl QuietClients {
    /// Starts `n` clients, 2 ms apart (as the simulator spreads its connects).
    fn start(port: u16, n: usize) -> Result<QuietClients> {
        let (stop, stopped) = watch::channel(false);
        let subscribed = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let refused = Arc::new(AtomicUsize::new(0));
        let mut tasks = JoinSet::new();
        for p in 0..n {
            let site = bench_site(p)?;
            let (subscribed, failed, refused) = (
                Arc::clone(&subscribed),
                Arc::clone(&failed),
                Arc::clone(&refused),
            );
            let stopped = stopped.clone();
            let delay = Duration::from_millis(2) * u32::try_from(p).unwrap_or(u32::MAX);
            tasks.spawn(async move {
                tokio::time::sleep(delay).await;
                if let Err(e) = quiet_client(port, &site, &subscribed, &refused, stopped).await {
                    // The first few say why; the count says how many.
                    if failed.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("quiet client {}: {e:#}", site.agent_client_id());
                    }
                }
            });
        }
        Ok(QuietClients {
            stop,
            tasks,
            subscribed,
            failed,
            refused,
        })
    }

    /// Waits until every client has its SUBACK; an error if one failed or `within` passed.
    async fn all_subscribed(&self, n: usize, sampling: &Sampling, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            sampling.check()?;
            let (ok, failed) = (
                self.subscribed.load(Ordering::Relaxed),
                self.failed.load(Ordering::Relaxed),
            );
            if ok >= n {
                return Ok(());
            }
            if failed > 0 || Instant::now() > deadline {
                bail!(
                    "{ok} of {n} quiet clients connected and subscribed, {failed} failed, \
                     after {:.0?}",
                    within.saturating_sub(deadline.saturating_duration_since(Instant::now()))
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every client sends DISCONNECT and closes; waits for them (at most `within`).
    async fn leave(mut self, within: Duration) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(within, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
    }
}

/// One quiet client: CONNECT and SUBSCRIBE (command filter and receipt topic, QoS 1), then
/// only PINGREQs until `stop`, then DISCONNECT.
async fn quiet_client(
    port: u16,
    site: &SiteRef,
    subscribed: &AtomicUsize,
    refused: &AtomicUsize,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let mut stream = tokio::time::timeout(
        Duration::from_secs(30),
        TcpStream::connect(("127.0.0.1", port)),
    )
    .await
    .context("connect timed out")?
    .context("connect")?;
    stream.set_nodelay(true)?;
    let (mut rbuf, mut wbuf) = (BytesMut::with_capacity(1024), BytesMut::with_capacity(512));
    let mut connect = v4::Connect::new(site.agent_client_id());
    connect.keep_alive = QUIET_KEEP_ALIVE;
    connect.write(&mut wbuf)?;
    let mut subscribe =
        v4::Subscribe::new(topic::command_filter(site), mqttbytes::QoS::AtLeastOnce);
    subscribe.add(receipt_topic(site), mqttbytes::QoS::AtLeastOnce);
    subscribe.pkid = 1;
    subscribe.write(&mut wbuf)?;
    stream.write_all(&wbuf).await.context("write CONNECT")?;
    wbuf.clear();

    // CONNACK, then SUBACK (anything else before them is answered and skipped).
    let handshake = async {
        let mut connected = false;
        loop {
            match next_packet(&mut stream, &mut rbuf).await? {
                v4::Packet::ConnAck(ack) if ack.code == v4::ConnectReturnCode::Success => {
                    connected = true;
                }
                v4::Packet::ConnAck(ack) => {
                    bail!("the broker refused the connection: {:?}", ack.code)
                }
                v4::Packet::SubAck(ack) if connected => {
                    let failures = ack
                        .return_codes
                        .iter()
                        .filter(|c| matches!(c, v4::SubscribeReasonCode::Failure))
                        .count();
                    refused.fetch_add(failures, Ordering::Relaxed);
                    return Ok(());
                }
                v4::Packet::Publish(publish) => {
                    answer(&publish, &mut wbuf)?;
                }
                other => bail!("unexpected packet before the SUBACK: {other:?}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), handshake)
        .await
        .context("no CONNACK and SUBACK within 60 s")??;
    subscribed.fetch_add(1, Ordering::Relaxed);

    let half = Duration::from_secs(u64::from(QUIET_KEEP_ALIVE) / 2);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + half, half);
    loop {
        if !wbuf.is_empty() {
            stream.write_all(&wbuf).await.context("write")?;
            wbuf.clear();
        }
        tokio::select! {
            // A dropped sender is a stop too.
            _ = stop.changed() => break,
            _ = ping.tick() => {
                v4::PingReq.write(&mut wbuf)?;
            }
            read = read_more(&mut stream, &mut rbuf, 4096) => {
                read?;
                while let Some(packet) = parse(&mut rbuf)? {
                    if let v4::Packet::Publish(publish) = packet {
                        answer(&publish, &mut wbuf)?;
                    }
                }
            }
        }
    }
    v4::Disconnect.write(&mut wbuf)?;
    stream.write_all(&wbuf).await.context("write DISCONNECT")?;
    let _ = stream.shutdown().await;
    Ok(())
}

/// The PUBACK a QoS 1 publish asks for.
fn answer(publish: &v4::Publish, wbuf: &mut BytesMut) -> Result<()> {
    if publish.qos != mqttbytes::QoS::AtMostOnce {
        v4::PubAck::new(publish.pkid).write(wbuf)?;
    }
    Ok(())
}

/// Reads until one whole packet is in `rbuf` and returns it.
async fn next_packet(stream: &mut TcpStream, rbuf: &mut BytesMut) -> Result<v4::Packet> {
    loop {
        if let Some(packet) = parse(rbuf)? {
            return Ok(packet);
        }
        read_more(stream, rbuf, 4096).await?;
    }
}

/// A QoS 1 subscriber in this process that counts what it receives.
struct Counting {
    client: AsyncClient,
    received: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    _task: AbortOnDrop<()>,
}

impl Counting {
    /// Connects as `name`, subscribes to `filter` and returns once the SUBACK is in.
    async fn start(port: u16, name: &str, filter: &str) -> Result<Counting> {
        let mut opts =
            MqttOptions::new(format!("{name}-{}", std::process::id()), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(64 * 1024, 64 * 1024);
        opts.set_inflight(100);
        let (client, mut events) = AsyncClient::new(opts, 100);
        client.subscribe(filter, QoS::AtLeastOnce).await?;
        loop {
            let event = tokio::time::timeout(Duration::from_secs(10), events.poll())
                .await
                .with_context(|| format!("{name}: no SUBACK within 10 s"))?
                .with_context(|| format!("{name}: connection"))?;
            match event {
                Event::Incoming(Packet::SubAck(ack)) => {
                    ensure!(
                        ack.return_codes
                            .iter()
                            .all(|c| !matches!(c, rumqttc::SubscribeReasonCode::Failure)),
                        "{name}: the broker refused {filter}"
                    );
                    break;
                }
                _ => continue,
            }
        }
        let received = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let task = {
            let (received, errors) = (Arc::clone(&received), Arc::clone(&errors));
            let (client, filter, name) = (client.clone(), filter.to_owned(), name.to_owned());
            tokio::spawn(async move {
                loop {
                    match events.poll().await {
                        Ok(Event::Incoming(Packet::Publish(_))) => {
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                        // A clean session forgets its subscription on a reconnect.
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            let _ = client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                        }
                        Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => break,
                        Ok(_) => {}
                        Err(e) => {
                            if errors.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!("{name}: {e}");
                            }
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            })
        };
        Ok(Counting {
            client,
            received,
            errors,
            _task: AbortOnDrop(task),
        })
    }

    async fn leave(self) {
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `renkei-agent simulate` as a process, killed on drop.
struct Simulator {
    process: Process,
    log: PathBuf,
}

impl Simulator {
    fn start(port: u16, sites: usize, interval: &str, dir: &Path) -> Result<(Simulator, String)> {
        let bin = binary("renkei-agent", "renkei-agent");
        let args: Vec<String> = [
            "simulate",
            "--broker",
            &format!("mqtt://127.0.0.1:{port}"),
            "--sites",
            &sites.to_string(),
            "--interval",
            interval,
            "--scenario",
            "steady",
            "--state-dir",
        ]
        .into_iter()
        .map(str::to_owned)
        .chain([dir.join("state").display().to_string()])
        .collect();
        let log = dir.join("simulate.log");
        let stderr = std::fs::File::create(&log).with_context(|| format!("{}", log.display()))?;
        let child = Command::new(&bin)
            .args(&args)
            // Its own defaults: warnings only, no password, no config file.
            .env_remove("RUST_LOG")
            .env_remove("RENKEI_AGENT_PASSWORD")
            .env_remove("RENKEI_AGENT_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut process = Process {
            child,
            name: "renkei-agent simulate".into(),
        };
        let stdout = process
            .child
            .stdout
            .take()
            .context("the simulator's stdout")?;
        let command_line = format!("{} {}", bin.display(), args.join(" "));
        ready_line(
            stdout,
            "renkei-agent simulate running",
            Duration::from_secs(30),
        )
        .with_context(|| format!("no ready line from {command_line}"))?;
        Ok((Simulator { process, log }, command_line))
    }

    /// SIGTERM, then up to `within` for the sites' deaths and DISCONNECTs; SIGKILL after.
    /// Whether it exited by itself.
    async fn stop(mut self, within: Duration) -> Result<bool> {
        let pid = self.process.id().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .context("kill(1)")?;
        ensure!(status.success(), "kill -TERM {pid} failed");
        let deadline = Instant::now() + within;
        loop {
            if self
                .process
                .child
                .try_wait()
                .context("waiting for the simulator")?
                .is_some()
            {
                return Ok(true);
            }
            if Instant::now() > deadline {
                self.process.kill9();
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Lines of its log, and of those the publishes it could not queue (its rumqttc request
    /// queue was full: the offered load fell short).
    fn log_counts(&self) -> (usize, usize) {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let not_queued = log.lines().filter(|l| l.contains("not queued")).count();
        (log.lines().count(), not_queued)
    }
}

/// What one run of one target measured; memory in MiB.
#[derive(Debug, Clone)]
struct RunStats {
    idle: f64,
    quiet: f64,
    load_peak: f64,
    /// `VmHWM` at the end of the load (the process's peak so far, between samples too).
    load_hwm: f64,
    load_mean: f64,
    fifth: f64,
    last: f64,
    after: f64,
    dashboard: u64,
    integrator: u64,
}

impl RunStats {
    fn flatness(&self) -> f64 {
        self.last / self.fifth
    }
}

/// The two load windows compared for flatness, in seconds from the load's start: the fifth and
/// the last minute of a load of ten minutes or more, otherwise the fifth and the last tenth.
fn windows(load_s: f64) -> ((f64, f64), (f64, f64), &'static str) {
    if load_s >= 600.0 {
        ((240.0, 300.0), (load_s - 60.0, load_s), "minute")
    } else {
        (
            (0.4 * load_s, 0.5 * load_s),
            (0.9 * load_s, load_s),
            "tenth",
        )
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 { f64::NAN } else { sum / n as f64 }
}

/// The median of the numbers that are not NaN (NaN if none are).
fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.filter(|x| !x.is_nan()).collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A figure, or `n/a`.
fn show(x: f64, decimals: usize) -> String {
    if x.is_finite() {
        format!("{x:.decimals$}")
    } else {
        "n/a".into()
    }
}

fn stats(samples: &[Sample], load_t0: f64, load_s: f64, counts: (u64, u64)) -> RunStats {
    let in_phase = |phase: Phase| samples.iter().filter(move |s| s.phase == phase);
    let rss_mean = |phase: Phase| mean(in_phase(phase).map(|s| mib(s.rss_kib)));
    let load_in = |(from, to): (f64, f64)| {
        mean(
            in_phase(Phase::Load)
                .filter(|s| (from..to).contains(&(s.t - load_t0)))
                .map(|s| mib(s.rss_kib)),
        )
    };
    let (fifth, last, _) = windows(load_s);
    RunStats {
        idle: rss_mean(Phase::Idle),
        quiet: rss_mean(Phase::Quiet),
        load_peak: in_phase(Phase::Load)
            .map(|s| mib(s.rss_kib))
            .fold(f64::NAN, f64::max),
        load_hwm: in_phase(Phase::Load)
            .next_back()
            .map_or(f64::NAN, |s| mib(s.hwm_kib)),
        load_mean: rss_mean(Phase::Load),
        fifth: load_in(fifth),
        last: load_in(last),
        after: rss_mean(Phase::After),
        dashboard: counts.0,
        integrator: counts.1,
    }
}

/// The raw record: `#` lines and CSV rows, written to `--out` after every run.
struct Record {
    out: Option<PathBuf>,
    text: String,
}

impl Record {
    fn note(&mut self, line: &str) {
        for l in line.lines() {
            let _ = writeln!(self.text, "# {l}");
        }
    }

    fn flush(&self) -> Result<()> {
        if let Some(out) = &self.out {
            std::fs::write(out, &self.text).with_context(|| format!("{}", out.display()))?;
        }
        Ok(())
    }
}

/// `renkei-bench mem`.
pub fn run(args: MemArgs) -> Result<()> {
    ensure!(args.runs > 0, "--runs 0: give at least one run");
    ensure!(args.sites > 0, "--sites 0: give at least one site");
    ensure!(args.load_seconds > 0, "--load-seconds 0: give some load");
    ensure!(!args.targets.is_empty(), "no --targets");
    let runtime = tokio::runtime::Runtime::new().context("the async runtime")?;
    runtime.block_on(measure(args))
}

async fn measure(args: MemArgs) -> Result<()> {
    let mut record = Record {
        out: args.out.clone(),
        text: String::new(),
    };
    let command_line: Vec<String> = std::env::args().collect();
    record.note(&format!("renkei-bench mem: {}", command_line.join(" ")));
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    record.note(&format!(
        "started at unix time {started}; {} sites; phases: idle {} s, quiet {} s once all are \
         subscribed, load {} s, after {} s; VmRSS and VmHWM of the broker process at 1 Hz",
        args.sites, args.idle_seconds, args.quiet_seconds, args.load_seconds, args.after_seconds
    ));
    record.note(&format!(
        "quiet clients: {} sessions as an agent's with confirm = \"receipt\": clean session, keep \
         alive {QUIET_KEEP_ALIVE} s, SUBSCRIBE QoS 1 to renkei/v1/cmd/{{ward}}/{{site}} and \
         renkei/receipt/v1/{{ward}}/{{site}}; no will, nothing published",
        args.sites
    ));
    record.note(
        "load: subscribers (rumqttc, QoS 1, in this process) on renkei/v1/# (dashboard) and \
         renkei/json/v1/# (integrator), then renkei-agent simulate; the simulator publishes live \
         at QoS 1 with no outbox and no confirm mode (no receipts subscribed, none sent, the same \
         offered load for every target)",
    );
    let _ = writeln!(record.text, "target,run,time_s,phase,rss_kib,hwm_kib");
    println!(
        "renkei-bench mem: {} sites, load {} s at --interval {}, {} run(s) of {}",
        args.sites,
        args.load_seconds,
        args.interval,
        args.runs,
        args.targets
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>()
            .join(", ")
    );

    let mut all: Vec<(MemTarget, RunStats)> = Vec::new();
    for run in 1..=args.runs {
        // Interleaved, so that the machine's noise falls on every target alike.
        for &target in &args.targets {
            let stats = one_run(target, run, &args, &mut record)
                .await
                .with_context(|| format!("run {run} of {}", target.name()))?;
            println!(
                "run {run} {}: idle {} MiB, quiet {} MiB, load peak {} MiB (VmHWM {}), mean {}, \
                 fifth {} {}, last {} {} (×{}), after {} MiB; dashboard received {} messages, \
                 integrator {}",
                target.name(),
                show(stats.idle, 1),
                show(stats.quiet, 1),
                show(stats.load_peak, 1),
                show(stats.load_hwm, 1),
                show(stats.load_mean, 1),
                windows(args.load_seconds as f64).2,
                show(stats.fifth, 1),
                windows(args.load_seconds as f64).2,
                show(stats.last, 1),
                show(stats.flatness(), 3),
                show(stats.after, 1),
                stats.dashboard,
                stats.integrator,
            );
            all.push((target, stats));
            record.flush()?;
        }
    }
    let summary = summary(&args, &all);
    print!("\n{summary}");
    record.note("");
    record.note("summary");
    record.note(&summary);
    record.flush()?;
    Ok(())
}

/// One run of one target, its samples appended to `record`.
async fn one_run(
    target: MemTarget,
    run: usize,
    args: &MemArgs,
    record: &mut Record,
) -> Result<RunStats> {
    let dir = tempfile::tempdir().context("a temporary directory")?;
    let server = start(target.load_target())?;
    let port = server.port();
    let (pid, description) = describe(&server)?;
    if run == 1 {
        record.note(&format!("{}: {description}", target.name()));
    }
    let cgroup = match args.cgroup_memory_max {
        Some(bytes) => Some(MemoryCgroup::enter(pid, bytes)?),
        None => None,
    };
    let (sampling, _sampler) = start_sampling(pid);
    let result = phases(target, run, args, port, &sampling, dir.path(), record).await;
    // Every sample taken, whatever happened.
    let samples = sampling.samples();
    for s in &samples {
        let _ = writeln!(
            record.text,
            "{},{run},{:.1},{},{},{}",
            target.name(),
            s.t,
            s.phase.name(),
            s.rss_kib,
            s.hwm_kib
        );
    }
    let (load_t0, counts) = match result {
        Ok(done) => done,
        Err(e) => {
            if let Server::Renkei(broker) = &server {
                let log = broker.log();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                eprintln!(
                    "--- the last lines of the broker's log ---\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            let _ = record.flush();
            return Err(e);
        }
    };
    if let Some(cgroup) = &cgroup {
        let alive = std::fs::metadata(format!("/proc/{pid}")).is_ok();
        let line = format!(
            "{} run {run}: in a cgroup of {} MiB: {}; the broker {} at the end",
            target.name(),
            args.cgroup_memory_max.unwrap_or(0) / (1024 * 1024),
            cgroup.outcome(),
            if alive {
                "was still running"
            } else {
                "had exited"
            }
        );
        eprintln!("{line}");
        record.note(&line);
    }
    drop(server);
    drop(cgroup);
    Ok(stats(&samples, load_t0, args.load_seconds as f64, counts))
}

/// The phases of one run; returns when the load started (seconds from the broker's start) and
/// what the dashboard and the integrator received.
async fn phases(
    target: MemTarget,
    run: usize,
    args: &MemArgs,
    port: u16,
    sampling: &Sampling,
    dir: &Path,
    record: &mut Record,
) -> Result<(f64, (u64, u64))> {
    let name = target.name();
    eprintln!("run {run} {name}: idle {} s", args.idle_seconds);
    sampling.hold(Phase::Idle, args.idle_seconds).await?;

    eprintln!("run {run} {name}: {} quiet clients connecting", args.sites);
    sampling.set_phase(Phase::Connecting);
    let connecting = sampling.now();
    let quiet = QuietClients::start(port, args.sites)?;
    quiet
        .all_subscribed(args.sites, sampling, Duration::from_secs(120))
        .await?;
    let connected_in = sampling.now() - connecting;
    sampling.hold(Phase::Quiet, args.quiet_seconds).await?;
    // A client whose connection broke after its SUBACK counts as failed too.
    let lost = quiet.failed.load(Ordering::Relaxed);
    record.note(&format!(
        "{name} run {run}: {} quiet clients connected and subscribed in {connected_in:.1} s, {} \
         filters refused, {lost} connections lost during the quiet phase",
        quiet.subscribed.load(Ordering::Relaxed),
        quiet.refused.load(Ordering::Relaxed)
    ));
    if lost > 0 {
        eprintln!("run {run} {name}: {lost} quiet clients lost their connection");
    }
    sampling.set_phase(Phase::Leaving);
    quiet.leave(Duration::from_secs(10)).await;
    sampling.hold(Phase::Leaving, 2).await?;

    eprintln!("run {run} {name}: load {} s", args.load_seconds);
    let dashboard = Counting::start(port, "bench-dashboard", topic::ALL).await?;
    let integrator = Counting::start(port, "bench-integrator", topic::ALL_JSON).await?;
    sampling.set_phase(Phase::Load);
    let load_t0 = sampling.now();
    let (mut simulator, simulate_line) = Simulator::start(port, args.sites, &args.interval, dir)?;
    if run == 1 {
        record.note(&format!("{name}: simulator {simulate_line}"));
    }
    let until = Instant::now() + Duration::from_secs(args.load_seconds);
    while Instant::now() < until {
        sampling.check()?;
        if let Some(status) = simulator
            .process
            .child
            .try_wait()
            .context("the simulator")?
        {
            bail!("the simulator exited during the load: {status}");
        }
        let left = until.saturating_duration_since(Instant::now());
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
    }
    let load_s = sampling.now() - load_t0;
    let counts = (
        dashboard.received.load(Ordering::Relaxed),
        integrator.received.load(Ordering::Relaxed),
    );
    sampling.set_phase(Phase::Stopping);
    // The machine is shared: what else ran shows here (1, 5 and 15 minutes).
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into());
    let (log_lines, not_queued) = simulator.log_counts();
    let clean = simulator.stop(Duration::from_secs(20)).await?;
    let errors = (
        dashboard.errors.load(Ordering::Relaxed),
        integrator.errors.load(Ordering::Relaxed),
    );
    dashboard.leave().await;
    integrator.leave().await;
    record.note(&format!(
        "{name} run {run}: load from t = {load_t0:.1} s for {load_s:.1} s; dashboard received {} \
         messages ({:.0}/s), integrator {} ({:.0}/s); subscriber connection errors {} and {}; \
         simulator log {log_lines} lines, {not_queued} of them publishes not queued; simulator \
         {} on SIGTERM; machine load average at the load's end {loadavg}",
        counts.0,
        counts.0 as f64 / load_s,
        counts.1,
        counts.1 as f64 / load_s,
        errors.0,
        errors.1,
        if clean {
            "exited"
        } else {
            "did not exit within 20 s (killed)"
        }
    ));
    if not_queued > 0 {
        eprintln!(
            "run {run} {name}: the simulator could not queue {not_queued} publishes: the offered \
             load fell short"
        );
    }
    sampling.hold(Phase::After, args.after_seconds).await?;
    Ok((load_t0, counts))
}

/// The summary: medians over runs per target, the ratios, and the footprint targets.
fn summary(args: &MemArgs, all: &[(MemTarget, RunStats)]) -> String {
    let mut s = String::new();
    let load_s = args.load_seconds as f64;
    let ((f0, f1), (l0, l1), unit) = windows(load_s);
    let _ = writeln!(
        s,
        "memory of the broker process, MiB (VmRSS at 1 Hz), median over {} run(s); {} sites",
        args.runs, args.sites
    );
    let _ = writeln!(
        s,
        "  idle: mean of the first {} s; quiet: mean over {} s with the {} clients subscribed; \
         load peak: highest sample of the load; VmHWM: the process's peak at the load's end; \
         load mean: mean over the whole load; fifth/last: mean of load seconds \
         {f0:.0}-{f1:.0} and {l0:.0}-{l1:.0} (the fifth and the last {unit}); after: {} s after \
         the load",
        args.idle_seconds, args.quiet_seconds, args.sites, args.after_seconds
    );
    let _ = writeln!(
        s,
        "{:<10} {:>7} {:>7} {:>9} {:>7} {:>9} {:>7} {:>7} {:>8} {:>7} {:>11}",
        "target",
        "idle",
        "quiet",
        "load peak",
        "VmHWM",
        "load mean",
        "fifth",
        "last",
        "last/5th",
        "after",
        "dashboard/s"
    );
    let mut medians: Vec<(MemTarget, RunStats, f64)> = Vec::new();
    for &target in &args.targets {
        let runs: Vec<&RunStats> = all
            .iter()
            .filter(|(t, _)| *t == target)
            .map(|(_, r)| r)
            .collect();
        if runs.is_empty() {
            continue;
        }
        let of = |f: fn(&RunStats) -> f64| median(runs.iter().map(|r| f(r)));
        let m = RunStats {
            idle: of(|r| r.idle),
            quiet: of(|r| r.quiet),
            load_peak: of(|r| r.load_peak),
            load_hwm: of(|r| r.load_hwm),
            load_mean: of(|r| r.load_mean),
            fifth: of(|r| r.fifth),
            last: of(|r| r.last),
            after: of(|r| r.after),
            dashboard: 0,
            integrator: 0,
        };
        let flat = of(RunStats::flatness);
        let dashboard_rate = median(runs.iter().map(|r| r.dashboard as f64 / load_s));
        let _ = writeln!(
            s,
            "{:<10} {:>7} {:>7} {:>9} {:>7} {:>9} {:>7} {:>7} {:>8} {:>7} {:>11}",
            target.name(),
            show(m.idle, 1),
            show(m.quiet, 1),
            show(m.load_peak, 1),
            show(m.load_hwm, 1),
            show(m.load_mean, 1),
            show(m.fifth, 1),
            show(m.last, 1),
            show(flat, 3),
            show(m.after, 1),
            show(dashboard_rate, 0),
        );
        medians.push((target, m, flat));
    }
    let get = |t: MemTarget| medians.iter().find(|(x, _, _)| *x == t);
    let renkei = get(MemTarget::Renkei);
    if let Some((_, r, _)) = renkei {
        for peer in [MemTarget::Mosquitto, MemTarget::Rumqttd] {
            if let Some((_, p, _)) = get(peer) {
                let _ = writeln!(
                    s,
                    "Renkei / {}: load mean {} (peak {}, idle {}, quiet {})",
                    peer.name(),
                    show(r.load_mean / p.load_mean, 2),
                    show(r.load_peak / p.load_peak, 2),
                    show(r.idle / p.idle, 2),
                    show(r.quiet / p.quiet, 2),
                );
            }
        }
    }
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    if let Some((_, r, flat)) = renkei {
        let _ = writeln!(
            s,
            "the footprint targets of a ward-office broker, for Renkei:"
        );
        let _ = writeln!(
            s,
            "  idle <= 24 MiB:                          {:>8} MiB  {}",
            show(r.idle, 1),
            verdict(r.idle <= 24.0)
        );
        let _ = writeln!(
            s,
            "  2,000 connected quiet <= 64 MiB:         {:>8} MiB  {}{}",
            show(r.quiet, 1),
            verdict(r.quiet <= 64.0),
            if args.sites == 2000 {
                String::new()
            } else {
                format!(" (measured with {} sites)", args.sites)
            }
        );
        let _ = writeln!(
            s,
            "  load <= 96 MiB (load peak):              {:>8} MiB  {}",
            show(r.load_peak, 1),
            verdict(r.load_peak <= 96.0)
        );
        match get(MemTarget::Mosquitto) {
            Some((_, m, _)) => {
                let ratio = r.load_mean / m.load_mean;
                let _ = writeln!(
                    s,
                    "  load <= 2x Mosquitto (load mean):        {:>8}x    {}",
                    show(ratio, 2),
                    verdict(ratio <= 2.0)
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "  load <= 2x Mosquitto: not measured (no mosquitto target)"
                );
            }
        }
        let _ = writeln!(
            s,
            "  flat, last minute <= 1.05x fifth minute: {:>8}x    {}{}",
            show(*flat, 3),
            verdict(*flat <= 1.05),
            if unit == "minute" {
                String::new()
            } else {
                format!(
                    " (a {}-s load: the fifth and last tenths stand in for the minutes)",
                    args.load_seconds
                )
            }
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flatness_compares_the_fifth_and_last_minutes_or_tenths() {
        assert_eq!(windows(600.0), ((240.0, 300.0), (540.0, 600.0), "minute"));
        assert_eq!(windows(900.0), ((240.0, 300.0), (840.0, 900.0), "minute"));
        assert_eq!(windows(60.0), ((24.0, 30.0), (54.0, 60.0), "tenth"));
    }

    #[test]
    fn medians_skip_what_was_not_measured() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, f64::NAN, 2.0, 3.0].into_iter()), 2.5);
        assert!(median([f64::NAN].into_iter()).is_nan());
        assert!(mean(std::iter::empty()).is_nan());
    }

    #[test]
    fn a_run_is_summed_up_by_phase_and_window() {
        let sample = |t: f64, phase, rss_mib: u64| Sample {
            t,
            phase,
            rss_kib: rss_mib * 1024,
            hwm_kib: 100 * 1024,
        };
        let mut samples = vec![
            sample(0.0, Phase::Idle, 10),
            sample(1.0, Phase::Idle, 12),
            sample(2.0, Phase::Connecting, 30),
            sample(3.0, Phase::Quiet, 20),
            sample(4.0, Phase::Leaving, 20),
        ];
        // 60 s of load from t = 5: 40 MiB until load second 50, then 44 MiB.
        for i in 0..60 {
            let rss = if i < 50 { 40 } else { 44 };
            samples.push(sample(5.5 + f64::from(i), Phase::Load, rss));
        }
        samples.push(sample(70.0, Phase::After, 25));
        let r = stats(&samples, 5.0, 60.0, (7, 0));
        assert_eq!((r.idle, r.quiet, r.after), (11.0, 20.0, 25.0));
        assert_eq!((r.load_peak, r.load_hwm), (44.0, 100.0));
        assert_eq!((r.fifth, r.last), (40.0, 44.0));
        assert!((r.flatness() - 1.1).abs() < 1e-9);
        assert!((r.load_mean - (50.0 * 40.0 + 10.0 * 44.0) / 60.0).abs() < 1e-9);
    }

    #[test]
    fn this_process_memory_is_readable_and_a_missing_child_is_an_error() {
        let (rss, hwm) = read_memory(std::process::id()).expect("own /proc status");
        assert!(rss > 0 && hwm >= rss);
        assert!(child_named("no-such-child-process").is_err());
    }
}
