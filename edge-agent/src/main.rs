//! `renkei-agent`: the command line over the `renkei_agent` library.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use renkei_agent::config::{self, Credentials, RawConfig};
use renkei_agent::lifecycle::{Lifecycle, next_boot_id};
use renkei_agent::link::{LinkOptions, run_site};
use renkei_agent::report::{FixedSite, now};
use renkei_agent::simulate::{self, SimOptions};
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
    Run(RunArgs),
    /// Run many simulated shelters across the 23 wards (drills, demos, load tests).
    Simulate(SimArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// TOML file with the same settings as the flags (keys with '_'); flags override it
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: RawConfig,
}

#[derive(Debug, Args)]
struct SimArgs {
    /// Broker address: mqtt://HOST[:PORT]
    #[arg(long, value_name = "URL")]
    broker: String,
    /// Number of simulated sites
    #[arg(long, value_name = "N")]
    sites: usize,
    /// Seed: the same seed gives the same sites and the same story
    #[arg(long, default_value_t = 2026)]
    seed: u64,
    /// Heartbeat interval of every site (one step of the story)
    #[arg(long, value_name = "DURATION", default_value = "5s")]
    interval: String,
    /// actual | exercise | test (a simulation is an exercise unless said otherwise)
    #[arg(long, default_value = "exercise")]
    mode: String,
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

fn main() -> Result<()> {
    let cli = Cli::parse();
    // A simulation runs hundreds of sessions: only their problems are worth a line each.
    let default_filter = match cli.command {
        Command::Run(_) => "info",
        Command::Simulate(_) => "warn",
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter)),
        )
        .init();
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Simulate(args) => simulate(args).await,
        }
    })
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

async fn run(args: RunArgs) -> Result<()> {
    let file = match &args.config {
        Some(path) => RawConfig::from_file(path)?,
        None => RawConfig::default(),
    };
    let config = args.settings.or(file).resolve()?;
    let boot = next_boot_id(&config.state_dir)?;
    info!(
        ward = %config.site.ward, site = %config.site.site, boot, mode = ?config.mode,
        interval_s = config.interval.as_secs(), broker = %config.broker, "starting"
    );
    let shutdown = shutdown_signal()?;
    let link = LinkOptions {
        broker: config.broker.clone(),
        credentials: config.credentials.clone(),
        client_id: LinkOptions::client_id(&config.site),
    };
    let lifecycle = Lifecycle::new(config.site.clone(), boot, config.mode);
    let site = FixedSite::from_config(&config, now());
    run_site(link, lifecycle, site, config.interval, shutdown).await?;
    Ok(())
}

async fn simulate(args: SimArgs) -> Result<()> {
    let broker = config::parse_broker("broker", &args.broker)?;
    let interval = config::parse_interval("interval", &args.interval)?;
    let mode = config::parse_mode("mode", &args.mode)?;
    if args.sites == 0 {
        bail!("sites = 0: give at least one site");
    }
    let credentials = match (args.username, args.password) {
        (Some(username), Some(password)) => Some(Credentials { username, password }),
        (None, None) => None,
        _ => bail!("give both --username and --password, or neither"),
    };
    if mode == renkei_shared::Mode::Actual {
        warn!("simulating in actual mode: HQ will count these sites as real");
    }
    let boot = next_boot_id(&args.state_dir)?;
    let shutdown = shutdown_signal()?;
    let options = SimOptions {
        broker,
        credentials,
        sites: args.sites,
        seed: args.seed,
        interval,
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
