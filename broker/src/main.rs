//! `renkei-broker serve`: reads the configuration, starts the broker, prints the ready line on
//! stdout and serves until SIGTERM or Ctrl-C. Logs go to stderr (`RUST_LOG` filters them).
//!
//! `renkei-broker user add|list|remove` edit the users of the broker's database (a running
//! broker sees the change within seconds).

use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use renkei_broker::Broker;
use renkei_broker::auth::{self, Access};
use renkei_broker::config::Config;
use renkei_broker::db;
use renkei_shared::WardCode;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

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
    // Boxed: it holds many more flags than the other commands.
    Serve(Box<ServeArgs>),
    /// Manages the users that may connect (MQTT) and use the HTTP API.
    #[command(subcommand)]
    User(UserCommand),
    /// Writes the users and their roles as a NATS server's `authorization` block, for HQ on a
    /// NATS JetStream cluster (docs/scaling.md); every user needs a cluster password.
    ClusterAcl {
        /// Where to write it (stdout without it).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Adds a user, or replaces the one of the same name (new password, role, binding).
    Add {
        /// The user name (1–64 of A–Z a–z 0–9 _ -): it appears in acknowledgement topics.
        name: String,
        /// What the user may do (SECURITY.md has each role's rights).
        #[arg(long, value_enum)]
        role: renkei_shared::Role,
        /// The ward of an agent or ward operator (131041 or 13104).
        #[arg(long)]
        ward: Option<WardCode>,
        /// The site id of an agent.
        #[arg(long)]
        site: Option<String>,
        /// Reads the password from the first line of stdin; without it a random password is
        /// made and printed once.
        #[arg(long)]
        password_stdin: bool,
        /// Also keep a bcrypt hash of the password for a NATS cluster's config
        /// (`renkei-broker cluster-acl`); NATS reads no argon2 hashes.
        #[arg(long)]
        cluster_password: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Lists users with their roles and bindings (never the hashes).
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Removes a user; its open connections stay until they reconnect.
    Remove {
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// Where the users are: the data directory, from the config file or the flag.
#[derive(Debug, clap::Args)]
struct StoreArgs {
    /// TOML configuration (for data.dir and the password hash cost).
    #[arg(long, value_name = "FILE", env = "RENKEI_BROKER_CONFIG")]
    config: Option<PathBuf>,
    /// The broker's data directory (data.dir).
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
}

impl StoreArgs {
    fn open(&self) -> anyhow::Result<(Config, rusqlite::Connection)> {
        let mut config = Config::load(self.config.as_deref())?;
        if let Some(dir) = &self.data {
            config.data.dir = dir.clone();
        }
        db::create_dir(&config.data.dir).with_context(|| {
            format!("cannot create data directory {}", config.data.dir.display())
        })?;
        let conn = db::open(&config.data.dir)?;
        Ok((config, conn))
    }
}

/// Flags override the matching keys of the config file.
#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// TOML configuration (see docs/broker.example.toml); compiled-in defaults without it.
    #[arg(long, value_name = "FILE", env = "RENKEI_BROKER_CONFIG")]
    config: Option<PathBuf>,
    /// MQTT over TCP (mqtt.listen); port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    mqtt: Option<SocketAddr>,
    /// MQTT over WebSocket (mqtt.ws_listen); port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    ws: Option<SocketAddr>,
    /// MQTT over TLS (mqtt.tls_listen); needs mqtt.tls_cert_file and mqtt.tls_key_file.
    #[arg(long, value_name = "ADDR")]
    mqtts: Option<SocketAddr>,
    /// HTTP (http.listen); port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    http: Option<SocketAddr>,
    /// The built dashboard (http.dashboard_dir).
    #[arg(long, value_name = "DIR")]
    dashboard: Option<PathBuf>,
    /// The broker's data directory (data.dir).
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// External-broker mode (external.broker): mqtt://HOST[:PORT] or mqtts://HOST[:PORT] of the
    /// MQTT broker (cluster) to consume and publish to; the embedded listeners (--mqtt, --ws,
    /// --mqtts) are off.
    #[arg(long, value_name = "URL")]
    external: Option<String>,
    /// PEM CA certificates that an mqtts:// external broker's certificate must chain to
    /// (external.ca_file); without it, the system's roots.
    #[arg(long, value_name = "FILE", requires = "external")]
    external_ca_file: Option<PathBuf>,
    /// Login at the external broker (external.user).
    #[arg(long, value_name = "USER", requires = "external")]
    external_user: Option<String>,
    /// File whose first line is the external broker's password (external.password_file).
    #[arg(long, value_name = "FILE", requires = "external_user")]
    external_password_file: Option<PathBuf>,
    /// Client id at the external broker, unique per instance (external.client_id).
    #[arg(long, value_name = "ID", requires = "external")]
    external_client_id: Option<String>,
    /// Shared-subscription group, "" for a plain subscription (external.share_group).
    #[arg(long, value_name = "GROUP", requires = "external")]
    external_share_group: Option<String>,
    /// Another MQTT address of the external cluster, tried in turn when the one in use is lost
    /// (external.failover); repeat it for each node.
    #[arg(long, value_name = "URL", requires = "external")]
    external_failover: Vec<String>,
    /// A NATS JetStream server of the cluster whose stream ingest reads (external.jetstream);
    /// repeat it for each node.
    #[arg(long, value_name = "URL", requires = "external")]
    external_jetstream: Vec<String>,
    /// Keep the record in this PostgreSQL database, shared by every instance of a clustered HQ
    /// (recorder.postgres): postgresql://USER@HOST[:PORT]/DB, the password in
    /// recorder.postgres_password_file.
    #[arg(long, value_name = "CONNINFO")]
    postgres: Option<String>,
    /// Ward mode (upstream.broker): mqtt://HOST[:PORT] or mqtts://HOST[:PORT] of HQ's broker;
    /// this broker serves one ward (--upstream-ward) and forwards its record to HQ.
    #[arg(long, value_name = "URL", requires = "upstream_ward")]
    upstream: Option<String>,
    /// The ward this broker serves, its six-digit code (upstream.ward).
    #[arg(long, value_name = "CODE", requires = "upstream")]
    upstream_ward: Option<renkei_shared::WardCode>,
    /// The relay's login at HQ (upstream.user).
    #[arg(long, value_name = "USER", requires = "upstream")]
    upstream_user: Option<String>,
    /// File whose first line is the relay's password at HQ (upstream.password_file).
    #[arg(long, value_name = "FILE", requires = "upstream_user")]
    upstream_password_file: Option<PathBuf>,
    /// PEM CA certificates an mqtts:// HQ's certificate must chain to (upstream.ca_file).
    #[arg(long, value_name = "FILE", requires = "upstream")]
    upstream_ca_file: Option<PathBuf>,
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
        if let Some(addr) = self.mqtts {
            anyhow::ensure!(
                config.mqtt.tls_enabled(),
                "--mqtts needs mqtt.tls_cert_file and mqtt.tls_key_file in the config file"
            );
            config.mqtt.tls_listen = addr;
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
        if let Some(url) = &self.external {
            renkei_shared::url::BrokerUrl::parse(url)
                .map_err(|error| anyhow::anyhow!("--external: {error}"))?;
            config.external.broker = Some(url.clone());
        }
        if let Some(file) = &self.external_ca_file {
            config.external.ca_file = Some(file.clone());
        }
        if let Some(user) = &self.external_user {
            config.external.user = Some(user.clone());
        }
        if let Some(file) = &self.external_password_file {
            config.external.password_file = Some(file.clone());
        }
        if let Some(id) = &self.external_client_id {
            config.external.client_id = id.clone();
        }
        if let Some(group) = &self.external_share_group {
            config.external.share_group = group.clone();
        }
        if !self.external_failover.is_empty() {
            config.external.failover = self.external_failover.clone();
        }
        if !self.external_jetstream.is_empty() {
            config.external.jetstream = self.external_jetstream.clone();
        }
        if let Some(conninfo) = &self.postgres {
            config.recorder.postgres = Some(conninfo.clone());
        }
        if let Some(url) = &self.upstream {
            config.upstream.broker = Some(url.clone());
        }
        if let Some(ward) = self.upstream_ward {
            config.upstream.ward = Some(ward);
        }
        if let Some(user) = &self.upstream_user {
            config.upstream.user = Some(user.clone());
        }
        if let Some(file) = &self.upstream_password_file {
            config.upstream.password_file = Some(file.clone());
        }
        if let Some(file) = &self.upstream_ca_file {
            config.upstream.ca_file = Some(file.clone());
        }
        config.demo = self.demo;
        // The flags may have changed what the file's checks passed.
        config.validate()?;
        Ok(config)
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // rumqttd logs every accept at info and every disconnect, even a clean one, at error
    // (target rumqttd::server::broker): 2,000 reconnecting sites would bury everything else.
    // Its router's warnings stay; listener failures are logged here.
    let (filter, default_filter) = match EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, false),
        Err(_) => (EnvFilter::new(DEFAULT_LOG), true),
    };
    // rumqttd's router opens an error-level span for every packet it handles, one of them
    // with the publish's topic formatted as `Debug` bytes: under load, building those spans
    // was a fifth of the router thread's time (the one thread every message passes). By
    // default they are not built, so its warnings come without the client id and topic of
    // the span; setting `RUST_LOG` brings them back for whoever is diagnosing the router.
    let rumqttd_spans = filter_fn(|meta| !(meta.is_span() && meta.target().starts_with("rumqttd")));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .finish()
        .with(default_filter.then_some(rumqttd_spans))
        .init();
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::User(command) => user(command),
        Command::ClusterAcl { out, store } => {
            let (_, conn) = store.open()?;
            let block = renkei_broker::cluster_acl::authorization(&conn)?;
            match out {
                Some(path) => std::fs::write(&path, block)
                    .with_context(|| format!("cannot write {}", path.display()))?,
                None => std::io::stdout().lock().write_all(block.as_bytes())?,
            }
            Ok(())
        }
    }
}

fn user(command: UserCommand) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match command {
        UserCommand::Add {
            name,
            role,
            ward,
            site,
            password_stdin,
            cluster_password,
            store,
        } => {
            let access = auth::access_for(role, ward, site.as_deref())?;
            let (config, conn) = store.open()?;
            let (password, made) = if password_stdin {
                let mut line = String::new();
                std::io::stdin()
                    .read_line(&mut line)
                    .context("cannot read the password from stdin")?;
                (line.trim_end_matches(['\r', '\n']).to_owned(), false)
            } else {
                (format!("{:032x}", rand::random::<u128>()), true)
            };
            auth::add_user(&conn, &name, &access, &password, &config.auth)?;
            if cluster_password {
                renkei_broker::cluster_acl::set_cluster_hash(&conn, &name, &password)?;
            }
            if made {
                writeln!(stdout, "added {name}; password: {password}")?;
            } else {
                writeln!(stdout, "added {name}")?;
            }
        }
        UserCommand::List { store } => {
            let (_, conn) = store.open()?;
            for user in auth::list_users(&conn)? {
                let (role, binding) = match &user.access {
                    Access::Agent(site) => ("agent", format!("{}/{}", site.ward, site.site)),
                    Access::Ward(ward) => ("ward", ward.to_string()),
                    Access::Hq => ("hq", String::new()),
                    Access::Integrator => ("integrator", String::new()),
                    Access::Admin => ("admin", String::new()),
                    Access::Relay(ward) => ("relay", ward.to_string()),
                    Access::Demo | Access::Probe => continue,
                };
                writeln!(stdout, "{}\t{role}\t{binding}", user.name)?;
            }
        }
        UserCommand::Remove { name, store } => {
            let (_, conn) = store.open()?;
            if !auth::remove_user(&conn, &name)? {
                anyhow::bail!("no user {name:?}");
            }
            writeln!(stdout, "removed {name}")?;
        }
    }
    Ok(())
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
        tracing::info!(
            mqtt = %addrs.mqtt,
            ws = ?addrs.ws,
            http = %addrs.http,
            mqtts = ?addrs.mqtts,
            "serving"
        );
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
