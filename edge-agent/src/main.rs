//! `renkei-agent`: the command line over the `renkei_agent` library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use renkei_agent::config::{
    self, AgentConfig, BrokerAddr, ConfigFile, Credentials, Interval, Settings,
};
use renkei_agent::daemon::{DaemonOptions, run_daemon};
use renkei_agent::form::{self, FormState};
use renkei_agent::keys::next_boot_id;
use renkei_agent::lifecycle::Lifecycle;
use renkei_agent::link::{LinkOptions, LinkState};
use renkei_agent::outbox::{Durability, Outbox};
use renkei_agent::report::FixedSite;
use renkei_agent::simulate::{self, SimOptions};
use renkei_agent::staff::{self, StaffReport};
use renkei_agent::status::Status;
use renkei_shared::{Body, Mode, Timestamp};
use tokio::sync::watch;
use tracing::{info, warn};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "renkei-agent",
    version,
    about = "Renkei's edge agent: reports a site's state to HQ over MQTT"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Report one site's state to HQ until SIGTERM / SIGINT.
    Run(Box<RunArgs>),
    /// Run many simulated shelters across the 23 wards (drills, demos, load tests).
    Simulate(SimArgs),
    /// 報告: store a report for HQ (works with no network and no running daemon)
    Report(ReportArgs),
    /// 状態: link state, reports waiting, last delivered
    Status(StatusArgs),
}

#[derive(Debug, Args)]
struct ReportArgs {
    /// The site's config file (the one `run` uses)
    #[arg(
        long,
        value_name = "FILE",
        env = "RENKEI_AGENT_CONFIG",
        default_value = "/etc/renkei/agent.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    report: StaffReport,
}

#[derive(Debug, Args)]
struct StatusArgs {
    /// The site's config file (the one `run` uses)
    #[arg(
        long,
        value_name = "FILE",
        env = "RENKEI_AGENT_CONFIG",
        default_value = "/etc/renkei/agent.toml"
    )]
    config: PathBuf,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// TOML file with the same settings as the flags (keys with '_'); flags override it
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Declares the flags; `run` reads them from the matches, which also say which were given
    /// (see `config::load`).
    #[command(flatten)]
    settings: Settings,
}

#[derive(Debug, Args)]
struct SimArgs {
    /// Broker address: mqtt://HOST[:PORT], or mqtts://HOST[:PORT] with --ca-file
    #[arg(long, value_name = "URL")]
    broker: BrokerAddr,
    /// PEM file of the CA that signed the broker's certificate (mqtts:// only)
    #[arg(long, value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// The sites of one ward report to that ward's own broker (ward mode) instead of
    /// --broker: CODE=URL, e.g. 131041=mqtt://127.0.0.1:11883; repeat for more wards
    #[arg(long, value_name = "CODE=URL", value_parser = ward_broker)]
    ward_broker: Vec<(renkei_shared::WardCode, BrokerAddr)>,
    /// Number of simulated sites
    #[arg(long, value_name = "N")]
    sites: usize,
    /// Every site in this ward (a ward office's own sites) instead of across the 23
    #[arg(long, value_name = "CODE")]
    only_ward: Option<renkei_shared::WardCode>,
    /// Seed: the same seed gives the same sites and the same story
    #[arg(long, default_value_t = 2026)]
    seed: u64,
    /// Heartbeat interval of every site (one step of the story at --speed 1)
    #[arg(long, value_name = "DURATION", default_value = "5s")]
    interval: Interval,
    /// The story the sites play
    #[arg(long, value_enum, default_value_t = ScenarioName::Steady)]
    scenario: ScenarioName,
    /// When the quake strikes after start (earthquake only) [default: 30s]
    #[arg(long, value_name = "DURATION", value_parser = config::duration)]
    quake_at: Option<Duration>,
    /// Story steps per heartbeat: 2.0 plays the story twice as fast
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Whether the sites' messages are about the real world or a drill (a simulation is an
    /// exercise unless said otherwise)
    #[arg(long, value_enum, default_value = "exercise")]
    mode: Mode,
    /// Where the simulation's boot id is kept
    #[arg(long, value_name = "DIR", default_value = "./var/simulate")]
    state_dir: PathBuf,
    /// MQTT user name for every site; {ward} and {site} are replaced per site
    #[arg(long)]
    username: Option<String>,
    /// MQTT password for every site
    #[arg(long, env = "RENKEI_AGENT_PASSWORD", hide_env_values = true)]
    password: Option<String>,
}

/// `CODE=URL` of `--ward-broker`.
fn ward_broker(text: &str) -> Result<(renkei_shared::WardCode, BrokerAddr), String> {
    let (code, url) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected CODE=URL, e.g. 131041=mqtt://host:1883"))?;
    let ward: renkei_shared::WardCode =
        code.trim().parse().map_err(|e| format!("{code:?}: {e}"))?;
    if !ward.is_known() {
        return Err(format!("{ward} is not one of the 23 special wards"));
    }
    let url = BrokerAddr::parse(url.trim()).map_err(|e| e.to_string())?;
    Ok((ward, url))
}

/// The stories of `simulate` (see [`simulate::Scenario`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ScenarioName {
    /// A disaster under way from the start
    Steady,
    /// Calm, a quake at --quake-at, then shelters open, power fails, requests, incidents,
    /// silent sites
    Earthquake,
}

fn main() -> Result<ExitCode> {
    // The matches are kept: `run` lays the flags it was given over its config file.
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // A simulation runs hundreds of sessions: only their problems are worth a line each.
    // Staff commands print their own result; the log is for what goes wrong.
    let default_filter = match cli.command {
        Command::Run(_) => "info",
        Command::Simulate(_) | Command::Report(_) | Command::Status(_) => "warn",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter)),
        )
        .init();
    match cli.command {
        Command::Report(args) => return Ok(report(args)),
        Command::Status(args) => return status(args).map(|()| ExitCode::SUCCESS),
        _ => {}
    }
    // The daemon is one session: a single-threaded runtime keeps it small. A simulation runs
    // hundreds of sessions and uses every core.
    let runtime = match cli.command {
        Command::Run(_) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        _ => tokio::runtime::Runtime::new(),
    }
    .context("cannot start the async runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Run(args) => {
                let flags = matches
                    .subcommand_matches("run")
                    .context("the run command without its flags")?;
                run(*args, flags).await
            }
            Command::Simulate(args) => simulate(args).await,
            Command::Report(_) | Command::Status(_) => Ok(()),
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

fn load_config(path: &std::path::Path) -> Result<AgentConfig> {
    Ok(ConfigFile::read(path)?.resolve()?)
}

fn open_outbox(config: &AgentConfig) -> Result<Outbox> {
    Ok(Outbox::open(&config.state_dir, config.outbox_max)?.with_disk_reserve(config.disk_reserve))
}

/// `renkei-agent report …`: appends to the outbox directly and says "saved" only after fsync.
fn report(args: ReportArgs) -> ExitCode {
    match store_report(&args) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("保存できませんでした / NOT saved: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn store_report(args: &ReportArgs) -> Result<String> {
    args.report.check()?;
    let config = load_config(&args.config)?;
    let outbox = open_outbox(&config)?;
    // No daemon keeps the numbering: the report starts a boot of its own.
    let new_boot = !outbox.daemon_running()?;
    let saved = staff::store(&outbox, &config.site, config.mode, &args.report, new_boot)?;
    Ok(saved.to_string())
}

/// `renkei-agent status`: the daemon's status file and the outbox, read directly.
fn status(args: StatusArgs) -> Result<()> {
    let config = load_config(&args.config)?;
    let outbox = open_outbox(&config)?;
    let running = outbox.daemon_running()?;
    let stats = outbox.lock()?.stats()?;
    // What the daemon says of its link; without it the outbox still tells the rest.
    let daemon = Status::read(&config.state_dir).unwrap_or_else(|e| {
        warn!(error = %e, "status file not read");
        None
    });
    let link = match (&daemon, running) {
        (Some(daemon), true) => daemon.link.to_string(),
        (None, true) => "starting".into(),
        (_, false) => "daemon not running (reports are kept and sent when it starts)".into(),
    };
    println!("site:            {} {}", config.site.ward, config.site.site);
    println!("link:            {link}");
    if let Some(daemon) = &daemon
        && running
    {
        println!(
            "since:           {}s ago",
            Timestamp::now().millis_since(Timestamp(daemon.since_ms)) / 1000
        );
    }
    println!(
        "queue depth:     {} ({} reports, {} heartbeats)",
        stats.depth,
        stats.reports,
        stats.depth - stats.reports
    );
    println!("outbox bytes:    {} of {}", stats.bytes, stats.max_bytes);
    println!(
        "last acked:      {}",
        if stats.acked.seq == 0 {
            "none yet".into()
        } else {
            format!("boot {} seq {}", stats.acked.boot, stats.acked.seq)
        }
    );
    if let Some(free) = stats.disk_free {
        println!(
            "disk free:       {free} bytes (reserve {}{})",
            stats.disk_reserve,
            if free < stats.disk_reserve {
                ": reports are refused"
            } else {
                ""
            }
        );
    }
    println!("quarantined:     {}", stats.quarantined);
    if let Some(e) = daemon.as_ref().and_then(|d| d.last_error.as_ref()) {
        println!("last error:      {e}");
    }
    match &stats.alarm {
        Some(alarm) => println!("ALARM:           {alarm}"),
        None => println!("alarm:           none"),
    }
    Ok(())
}

/// A flag that turns true on SIGTERM or SIGINT.
fn shutdown_signal() -> Result<watch::Receiver<bool>> {
    let (tx, rx) = watch::channel(false);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot listen for SIGTERM")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
        }
        let _ = tx.send(true);
        // Keep the sender alive: receivers treat a dropped sender as shutdown too.
        std::future::pending::<()>().await;
    });
    Ok(rx)
}

/// `renkei-agent run`; `flags` are its matches, laid over the config file.
async fn run(args: RunArgs, flags: &ArgMatches) -> Result<()> {
    let config = config::load(args.config.as_deref(), flags)?;
    // Before anything is touched: a bad CA file is a setting to fix, not a boot to count.
    let tls = config
        .ca_file
        .as_deref()
        .map(renkei_agent::tls::client_config)
        .transpose()?;
    let outbox = Arc::new(open_outbox(&config)?);
    let Some(_claim) = outbox.claim_daemon()? else {
        bail!(
            "another renkei-agent run is using {}: one daemon per site",
            config.state_dir.display()
        );
    };
    let form_listener = match config.form_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("form_listen = \"{addr}\": cannot listen there"))?,
        ),
        None => None,
    };
    let boot = outbox.lock()?.new_boot()?;
    let stats = outbox.lock()?.stats()?;
    info!(
        ward = %config.site.ward, site = %config.site.site, boot, mode = ?config.mode,
        interval_s = config.interval.as_secs(), broker = %config.broker,
        queue_depth = stats.depth, acked = %stats.acked, "starting"
    );
    if let Some(alarm) = &stats.alarm {
        tracing::error!(alarm, "the outbox alarm is raised");
    }
    let shutdown = shutdown_signal()?;
    let (link_watch, link_state) = watch::channel(LinkState::Connecting);
    if let Some(listener) = form_listener {
        let form = FormState {
            outbox: outbox.clone(),
            site: config.site.clone(),
            name: config.name.clone(),
            mode: config.mode,
            pin: config.form_pin.clone().map(|p| p.0),
            link: link_state,
            hosts: config.form_hosts.clone(),
            limits: config.form_limits.clone(),
        };
        let addr = listener.local_addr().ok();
        info!(addr = ?addr, pin = form.pin.is_some(), "staff web form listening");
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = form::serve(listener, form, shutdown).await {
                tracing::error!(error = %e, "the staff web form stopped");
            }
        });
    }
    let link = LinkOptions {
        broker: config.broker.clone(),
        credentials: config.credentials.clone(),
        client_id: config.site.agent_client_id(),
        tls,
    };
    let fallback = config.fallback_broker.clone().map(|broker| LinkOptions {
        broker,
        ..link.clone()
    });
    let lifecycle = Lifecycle::shared(config.site.clone(), boot, config.mode, outbox.clone());
    let site = FixedSite::from_config(&config, Timestamp::now());
    // The configured shelter figures are the site's state until staff report: stored once,
    // so that a restart never re-sends them over a newer report.
    if let Some(shelter) = site.configured_shelter()
        && outbox.lock()?.latest().shelter.is_none()
    {
        let body = Body::Shelter(shelter.clone());
        match outbox.lock()?.append(
            |key| lifecycle.envelope(key, body, Timestamp::now()),
            Durability::Sync,
        ) {
            Ok(appended) => {
                info!(key = %appended.key, "configured shelter figures stored as the first report")
            }
            // A full outbox or disk must not keep the site silent: it starts, and its
            // heartbeats carry the alarm.
            Err(e) if e.is_full() => {
                tracing::error!(error = %e, "configured shelter figures not stored")
            }
            Err(e) => return Err(e.into()),
        }
    }
    let options = DaemonOptions {
        link,
        fallback,
        interval: config.interval,
        replay_rate: config.replay_rate,
        confirm: config.confirm,
        state_dir: config.state_dir.clone(),
        link_watch: Some(link_watch),
    };
    run_daemon(options, outbox, lifecycle, site, shutdown).await?;
    Ok(())
}

async fn simulate(args: SimArgs) -> Result<()> {
    let broker = args.broker;
    let tls = match (&args.ca_file, broker.tls) {
        (Some(ca), true) => Some(renkei_agent::tls::client_config(ca)?),
        (None, false) => None,
        (None, true) => bail!("--broker {broker}: mqtts:// needs --ca-file"),
        (Some(_), false) => bail!("--ca-file is only used with an mqtts:// broker"),
    };
    let interval = args.interval.0;
    let mode = args.mode;
    if args.sites == 0 {
        bail!("sites = 0: give at least one site");
    }
    let scenario = match (args.scenario, args.quake_at) {
        (ScenarioName::Earthquake, quake_at) => simulate::Scenario::Earthquake {
            quake_at: quake_at.unwrap_or(Duration::from_secs(30)),
        },
        (ScenarioName::Steady, None) => simulate::Scenario::Steady,
        (ScenarioName::Steady, Some(_)) => {
            bail!("--quake-at is only used with --scenario earthquake")
        }
    };
    if !(args.speed.is_finite() && args.speed > 0.0 && args.speed <= 100.0) {
        bail!(
            "--speed {}: expected a number above 0, at most 100",
            args.speed
        );
    }
    let credentials = match (args.username, args.password) {
        (Some(username), Some(password)) => Some(Credentials { username, password }),
        (None, None) => None,
        _ => bail!("give both --username and --password, or neither"),
    };
    if mode == Mode::Actual {
        warn!("simulating in actual mode: HQ will count these sites as real");
    }
    let boot = next_boot_id(&args.state_dir)?;
    let shutdown = shutdown_signal()?;
    let options = SimOptions {
        broker,
        ward_brokers: args.ward_broker.into_iter().collect(),
        only_ward: args.only_ward,
        tls,
        credentials,
        sites: args.sites,
        seed: args.seed,
        interval,
        scenario,
        speed: args.speed,
        mode,
        boot,
    };
    let mut tasks = simulate::spawn(&options, &shutdown);
    println!("renkei-agent simulate running sites={}", args.sites);
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "a simulated site stopped"),
            Err(e) => warn!(error = %e, "a simulated site failed"),
        }
    }
    Ok(())
}
