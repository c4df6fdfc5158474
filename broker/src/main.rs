//! `renkei-broker serve`: reads the configuration, starts the broker, prints the ready line on
//! stdout and serves until SIGTERM or Ctrl-C. Logs go to stderr (`RUST_LOG` filters them).

use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use renkei_broker::Broker;
use renkei_broker::config::Config;
use tracing_subscriber::EnvFilter;

/// The log filter when `RUST_LOG` is not set.
const DEFAULT_LOG: &str = "info,rumqttd=warn,rumqttd::server::broker=off";

/// Renkei's central process: MQTT broker, live state and HTTP for the 23 wards.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs the broker until SIGTERM or Ctrl-C.
    Serve(ServeArgs),
}

/// Flags override the matching keys of the config file.
#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// TOML configuration (see broker.example.toml); compiled-in defaults without it.
    #[arg(long, value_name = "FILE", env = "RENKEI_BROKER_CONFIG")]
    config: Option<PathBuf>,
    /// MQTT over TCP (mqtt.listen); port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    mqtt: Option<SocketAddr>,
    /// MQTT over WebSocket (mqtt.ws_listen); port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    ws: Option<SocketAddr>,
    /// HTTP (http.listen); port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    http: Option<SocketAddr>,
    /// The built dashboard (http.dashboard_dir).
    #[arg(long, value_name = "DIR")]
    dashboard: Option<PathBuf>,
    /// The broker's data directory (data.dir).
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Demo mode: clients may connect without a user name (see the crate docs for what an
    /// anonymous client may do); the dashboard shows no login form.
    #[arg(long)]
    demo: bool,
}

impl ServeArgs {
    fn config(&self) -> anyhow::Result<Config> {
        let mut config = Config::load(self.config.as_deref())?;
        if let Some(addr) = self.mqtt {
            config.mqtt.listen = addr;
        }
        if let Some(addr) = self.ws {
            config.mqtt.ws_listen = addr;
        }
        if let Some(addr) = self.http {
            config.http.listen = addr;
        }
        if let Some(dir) = &self.dashboard {
            config.http.dashboard_dir = dir.clone();
        }
        if let Some(dir) = &self.data {
            config.data.dir = dir.clone();
        }
        config.demo = self.demo;
        Ok(config)
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            // rumqttd logs every accept at info and every disconnect, even a clean one, at
            // error (target rumqttd::server::broker): 2,000 reconnecting sites would bury
            // everything else. Its router's warnings stay; listener failures are logged here.
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG)),
        )
        .init();
    match cli.command {
        Command::Serve(args) => serve(args),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shutdown = shutdown_signal()?;
        let broker = Broker::start(config).await?;
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{}", broker.addrs().ready_line())?;
        stdout.flush()?;
        drop(stdout);
        let addrs = broker.addrs();
        tracing::info!(mqtt = %addrs.mqtt, ws = %addrs.ws, http = %addrs.http, "serving");
        broker.serve(shutdown).await?;
        Ok(())
    })
}

/// Resolves on SIGTERM (service managers, `docker stop`) or SIGINT (Ctrl-C). The handlers are
/// installed before this returns, so a signal sent right after the ready line is not lost.
#[cfg(unix)]
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = interrupt.recv() => tracing::info!("SIGINT: shutting down"),
        }
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    Ok(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::info!("Ctrl-C: shutting down");
        }
    })
}
