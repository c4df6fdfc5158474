//! Developer commands for Renkei, run from anywhere in the repository:
//!
//! - `cargo xtask demo`  — builds the dashboard and the programs, starts the broker (data in
//!   `var/demo`, anonymous, on 127.0.0.1 unless `--listen-all`), starts a simulator for the
//!   23 wards and prints the URL to open. With `--wards N`, the first N wards also get a ward
//!   broker of their own (ward mode), whose sites report to it and whose line to HQ can be
//!   cut and restored by typing `cut CODE` / `restore CODE` (docs/federation.md). With
//!   `--cluster`, HQ on a cluster instead: three NATS nodes, PostgreSQL and two instances,
//!   all throw-away (docs/scaling.md).
//! - `cargo xtask test`  — every check CI runs: format, clippy (native and wasm32), the
//!   dashboard's release build, all Rust tests, and the browser tests in real Chromium.
//! - `cargo xtask setup` — installs only the tools the two commands above need.
//!
//! On a fresh machine the tools are installed from the package registries only: the wasm32
//! target (rustup), Trunk and wasm-bindgen-cli (cargo install, versions pinned below and to
//! Cargo.lock), Chromium, ChromeDriver, Mosquitto, the NATS server and PostgreSQL (Debian).
//! Installed tools are reused when their versions match, so only the first run on a machine
//! pays for them.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// Trunk 0.22 needs a newer rustc than the stable toolchain here; 0.21.14 builds on it.
const TRUNK_VERSION: &str = "0.21.14";
/// Debian packages the tests use as real peers and browser.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("chromium", "/usr/bin/chromium"),
    ("chromium-driver", "/usr/bin/chromedriver"),
    ("mosquitto", "/usr/sbin/mosquitto"),
    ("mosquitto-clients", "/usr/bin/mosquitto_sub"),
    ("nats-server", "/usr/sbin/nats-server"),
    // The shared record of HQ on a cluster: the tests start throw-away servers with initdb.
    ("postgresql", "/usr/lib/postgresql/15/bin/initdb"),
];

#[derive(Parser)]
#[command(about = "Renkei developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Start the whole system with embedded defaults: broker, dashboard and simulated wards.
    Demo {
        /// Simulated sites across the 23 wards.
        #[arg(long, default_value_t = 300)]
        sites: u32,
        /// HTTP port of the dashboard and API.
        #[arg(long, default_value_t = 8080)]
        http_port: u16,
        /// Listen on every network interface instead of 127.0.0.1 only. The demo broker is
        /// anonymous: anyone who can reach this machine may then read and publish everything.
        #[arg(long)]
        listen_all: bool,
        /// Ward brokers (ward mode) for the first N wards, each forwarding to HQ over a line
        /// the demo can cut and restore.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=23))]
        wards: u32,
        /// HQ on a cluster instead (docs/scaling.md): three NATS JetStream nodes, a PostgreSQL
        /// record and two broker instances sharing it, all throw-away, with the simulator.
        #[arg(long, conflicts_with_all = ["wards", "listen_all"])]
        cluster: bool,
    },
    /// Run every check and test that CI runs.
    Test {
        /// Also run the long tests (soaks, long fault injection).
        #[arg(long)]
        long: bool,
    },
    /// Install the tools the demo and the tests need.
    Setup,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Demo {
            sites,
            http_port,
            listen_all,
            wards,
            cluster: false,
        } => demo(sites, http_port, listen_all, wards),
        Task::Demo {
            sites,
            cluster: true,
            ..
        } => demo_cluster(sites),
        Task::Test { long } => test(long),
        Task::Setup => setup(true),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The repository root (the parent of this crate).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// A step announced on stderr, timed, failing with its command line.
fn run(step: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("==> {step}");
    let start = Instant::now();
    let status = cmd
        .current_dir(root())
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{step} failed ({status}): {cmd:?}");
    }
    eprintln!("    {step}: ok in {:.0?}", start.elapsed());
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// The first line a command prints, if it runs.
fn version_of(program: &str, arg: &str) -> Option<String> {
    let out = Command::new(program).arg(arg).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    Some(text.lines().next().unwrap_or_default().trim().to_owned())
}

/// The version of a package as Cargo.lock resolved it.
fn locked_version(package: &str) -> Result<String> {
    let lock = std::fs::read_to_string(root().join("Cargo.lock")).context("reading Cargo.lock")?;
    let needle = format!("name = \"{package}\"\nversion = \"");
    let start = lock
        .find(&needle)
        .with_context(|| format!("{package} is not in Cargo.lock"))?
        + needle.len();
    let end = lock[start..].find('"').context("Cargo.lock is malformed")? + start;
    Ok(lock[start..end].to_owned())
}

/// Installs what is missing. `browser` also brings the Debian packages for the tests.
fn setup(browser: bool) -> Result<()> {
    let targets = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output();
    let has_wasm = targets
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("wasm32-unknown-unknown"))
        .unwrap_or(false);
    if !has_wasm {
        run(
            "rustup target add wasm32-unknown-unknown",
            Command::new("rustup").args(["target", "add", "wasm32-unknown-unknown"]),
        )?;
    }

    let wasm_bindgen = locked_version("wasm-bindgen")?;
    let have = version_of(&tool("wasm-bindgen"), "--version").unwrap_or_default();
    if have != format!("wasm-bindgen {wasm_bindgen}") {
        // `--locked` fails here: a locked dependency of wasm-bindgen-cli is missing from the
        // registry mirror. The version itself is pinned to Cargo.lock's wasm-bindgen.
        run(
            &format!("cargo install wasm-bindgen-cli {wasm_bindgen} (once per machine, ~4 min)"),
            cargo().args(["install", "wasm-bindgen-cli", "--version", &wasm_bindgen]),
        )?;
    }

    let have = version_of(&tool("trunk"), "--version").unwrap_or_default();
    if have != format!("trunk {TRUNK_VERSION}") {
        run(
            &format!("cargo install trunk {TRUNK_VERSION} (once per machine, ~16 min)"),
            cargo().args(["install", "--locked", "trunk", "--version", TRUNK_VERSION]),
        )?;
    }

    if browser {
        // paho-mqtt from PyPI is one of the real third-party clients the broker is tested with.
        let has_paho = Command::new("python3")
            .args(["-c", "import paho.mqtt.client"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !has_paho {
            run(
                "pip install paho-mqtt",
                Command::new("python3").args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "paho-mqtt>=2,<3",
                ]),
            )?;
        }
        let missing: Vec<&str> = DEBIAN_PACKAGES
            .iter()
            .filter(|(_, file)| !Path::new(file).exists())
            .map(|(pkg, _)| *pkg)
            .collect();
        if !missing.is_empty() {
            run(
                "apt-get update",
                Command::new("apt-get").args(["update", "-qq"]),
            )?;
            run(
                &format!("apt-get install {}", missing.join(" ")),
                Command::new("apt-get")
                    .env("DEBIAN_FRONTEND", "noninteractive")
                    .args(["install", "-y", "-qq", "--no-install-recommends"])
                    .args(&missing),
            )?;
        }
    }
    Ok(())
}

/// A tool's path: from ~/.cargo/bin when it is there, else by name from PATH.
fn tool(name: &str) -> String {
    let installed = cargo_bin_dir().join(name);
    if installed.exists() {
        installed.display().to_string()
    } else {
        name.to_owned()
    }
}

/// A command with ~/.cargo/bin first on its PATH: Trunk looks up wasm-bindgen there, and a
/// fresh machine's shell may not have it on PATH yet.
fn with_path(mut cmd: Command) -> Command {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths: Vec<PathBuf> = std::env::split_paths(&path).collect();
    paths.insert(0, cargo_bin_dir());
    if let Ok(joined) = std::env::join_paths(paths) {
        cmd.env("PATH", joined);
    }
    cmd
}

/// Builds the dashboard into `dist/` with Trunk, offline (no tool downloads).
fn build_dashboard() -> Result<()> {
    run("cargo fetch", cargo().args(["fetch", "--locked"]))?;
    run(
        "trunk build (dashboard, release)",
        with_path(Command::new(tool("trunk"))).args(["build", "--release", "--offline"]),
    )
}

fn test(long: bool) -> Result<()> {
    let start = Instant::now();
    setup(true)?;
    run(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    // Warnings are errors in both.
    let clippy = |what: &[&str]| {
        let mut cmd = cargo();
        cmd.arg("clippy")
            .args(what)
            .args(["--locked", "--", "-D", "warnings"]);
        cmd
    };
    run(
        "clippy (native, all targets)",
        &mut clippy(&["--workspace", "--all-targets"]),
    )?;
    run(
        "clippy (dashboard, wasm32)",
        &mut clippy(&[
            "-p",
            "renkei-dashboard",
            "--target",
            "wasm32-unknown-unknown",
        ]),
    )?;
    run(
        "shared builds for wasm32",
        cargo().args([
            "build",
            "-p",
            "renkei-shared",
            "--target",
            "wasm32-unknown-unknown",
            "--locked",
        ]),
    )?;
    build_dashboard()?;
    let mut tests = with_path(cargo());
    tests.args(["test", "--workspace", "--locked", "--no-fail-fast"]);
    if long {
        tests.env("RENKEI_LONG_TESTS", "1");
    }
    run(
        "cargo test --workspace (unit, integration and browser tests)",
        &mut tests,
    )?;
    // The vendored rumqttd is outside the workspace (upstream's code is not linted here), but
    // its patches carry unit tests; they build from a copy of the workspace's lock, so with
    // the versions the broker ships with. Its own manifest has no profile: line tables only,
    // as in the workspace, which keeps its target/ a fifth smaller.
    std::fs::copy(
        root().join("Cargo.lock"),
        root().join("vendor/rumqttd/Cargo.lock"),
    )
    .context("copying Cargo.lock for the vendored rumqttd")?;
    run(
        "rumqttd unit tests (vendored, with Renkei's patches)",
        cargo()
            .env("CARGO_PROFILE_DEV_DEBUG", "line-tables-only")
            .args([
                "test",
                "--manifest-path",
                "vendor/rumqttd/Cargo.toml",
                "--lib",
                "--target-dir",
                "target/vendor-rumqttd",
            ]),
    )?;
    // The dashboard's wire code also runs as wasm in the browser it ships to.
    run(
        "dashboard tests in headless Chromium (wasm-bindgen-test)",
        with_path(cargo())
            .env(
                "CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER",
                tool("wasm-bindgen-test-runner"),
            )
            .env("CHROMEDRIVER", "/usr/bin/chromedriver")
            .args([
                "test",
                "-p",
                "renkei-dashboard",
                "--target",
                "wasm32-unknown-unknown",
                "--locked",
            ]),
    )?;
    eprintln!("==> all checks passed in {:.0?}", start.elapsed());
    Ok(())
}

/// Kills the demo's children when the demo ends, however it ends.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The 23 wards' codes, in the order of `renkei_shared::WARDS`.
const WARD_CODES: [u32; 23] = [
    131016, 131024, 131032, 131041, 131059, 131067, 131075, 131083, 131091, 131105, 131113, 131121,
    131130, 131148, 131156, 131164, 131172, 131181, 131199, 131202, 131211, 131229, 131237,
];

fn demo(sites: u32, http_port: u16, listen_all: bool, wards: u32) -> Result<()> {
    if listen_all {
        eprintln!(
            "xtask: warning: --listen-all: the demo broker is anonymous (serve --demo): anyone \
             who can reach this machine on ports 1883, 8083 and {http_port} can read and \
             publish every message and read the API"
        );
    }
    setup(false)?;
    build_dashboard()?;
    build_release(&[])?;
    let bin = root().join("target/release");
    let mut children = Children(Vec::new());

    let mut broker = Command::new(bin.join("renkei-broker"))
        .current_dir(root())
        .args([
            "serve",
            "--demo",
            "--data",
            "var/demo",
            "--dashboard",
            "dist",
        ])
        .args(broker_listen_args(http_port, listen_all))
        .stdout(Stdio::piped())
        .spawn()
        .context("starting renkei-broker")?;
    let stdout = broker.stdout.take().context("broker stdout")?;
    children.0.push(broker);
    let ready = wait_for_ready(stdout, Duration::from_secs(30))?;
    let mqtt = ready_addr(&ready, "mqtt")?;
    let http = ready_addr(&ready, "http")?;

    // Ward mode: a broker per ward office, its line to HQ through a switch the demo controls.
    let mut lines = Vec::new();
    let mut ward_args = Vec::new();
    let mut ward_urls = Vec::new();
    for (i, code) in WARD_CODES.iter().take(wards as usize).enumerate() {
        let line = line::Line::open(&mqtt)?;
        let n = u16::try_from(i).unwrap_or(0);
        let ip = if listen_all { "0.0.0.0" } else { "127.0.0.1" };
        let data = format!("var/demo/ward-{code}");
        let mut ward = Command::new(bin.join("renkei-broker"))
            .current_dir(root())
            .args(["serve", "--demo", "--data", &data, "--dashboard", "dist"])
            .args(["--mqtt", &format!("{ip}:{}", 11883 + n)])
            .args(["--ws", &format!("{ip}:{}", 18083 + n)])
            .args(["--http", &format!("{ip}:{}", http_port + 1 + n)])
            .args(["--upstream", &format!("mqtt://{}", line.addr())])
            .args(["--upstream-ward", &code.to_string()])
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a ward broker")?;
        let stdout = ward.stdout.take().context("ward broker stdout")?;
        children.0.push(ward);
        let ready = wait_for_ready(stdout, Duration::from_secs(30))?;
        let ward_mqtt = ready_addr(&ready, "mqtt")?;
        let ward_http = ready_addr(&ready, "http")?;
        ward_args.push("--ward-broker".to_owned());
        ward_args.push(format!("{code}=mqtt://{ward_mqtt}"));
        ward_urls.push((*code, ward_http));
        lines.push((*code, line));
    }

    let simulator = Command::new(bin.join("renkei-agent"))
        .current_dir(root())
        .args([
            "simulate",
            "--broker",
            &format!("mqtt://{mqtt}"),
            "--sites",
            &sites.to_string(),
        ])
        .args(&ward_args)
        .args(["--state-dir", "var/demo/agents"])
        .spawn()
        .context("starting the simulator")?;
    children.0.push(simulator);

    println!();
    // The simulated sites report as an exercise (訓練): drills never pass for reality, so the
    // link opens the dashboard on the exercise world, under its banner.
    println!("  Renkei is running: open http://{http}/?mode=exercise  (Ctrl-C to stop)");
    println!("  MQTT: mqtt://{mqtt}   {sites} simulated sites (exercise) across the 23 wards");
    for (code, http) in &ward_urls {
        println!("  ward {code}: its own broker, open http://{http}/?mode=exercise");
    }
    if !lines.is_empty() {
        println!();
        println!("  Type `cut CODE` or `restore CODE` (and Enter) to cut or restore a ward's line");
        println!("  to HQ, e.g. `cut {}`.", lines[0].0);
        line::read_commands(lines);
    }
    println!();
    // Wait until one of the children ends (or Ctrl-C ends us and the guard kills them).
    loop {
        for child in &mut children.0 {
            if let Some(status) = child.try_wait()? {
                bail!("a demo process exited: {status}");
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Builds the broker, the agent and `more` (package, binary) for a demo, in release.
fn build_release(more: &[(&str, &str)]) -> Result<()> {
    let mut command = cargo();
    command.args(["build", "--release", "--locked"]);
    // Each binary named: with `--bin`, Cargo builds only the binaries it names.
    for (package, bin) in [
        ("renkei-broker", "renkei-broker"),
        ("renkei-agent", "renkei-agent"),
    ]
    .iter()
    .chain(more)
    {
        command.args(["-p", package, "--bin", bin]);
    }
    run("cargo build --release (the demo's programs)", &mut command)
}

/// `demo --cluster`: `renkei-cluster` (tests/src/bin) starts the cluster, the record, the two
/// instances and the simulator with the parts the cluster tests use, and stops them at the end.
fn demo_cluster(sites: u32) -> Result<()> {
    // NATS and PostgreSQL come from Debian's packages, as for the tests.
    setup(true)?;
    build_dashboard()?;
    build_release(&[("renkei-tests", "renkei-cluster")])?;
    run(
        "renkei-cluster (Ctrl-C or end of input stops it)",
        Command::new(root().join("target/release/renkei-cluster"))
            .current_dir(root())
            .args(["--sites", &sites.to_string(), "--dashboard", "dist"]),
    )
}

/// The demo broker's listener flags: 127.0.0.1 unless `listen_all`, since `serve --demo` lets
/// anyone connect without a user name. Every listener the broker opens without a TLS
/// certificate is named, so that none falls back to the broker's default of 0.0.0.0 (MQTTS is
/// off without one).
fn broker_listen_args(http_port: u16, listen_all: bool) -> Vec<String> {
    let ip = if listen_all { "0.0.0.0" } else { "127.0.0.1" };
    vec![
        "--mqtt".into(),
        format!("{ip}:1883"),
        "--ws".into(),
        format!("{ip}:8083"),
        "--http".into(),
        format!("{ip}:{http_port}"),
    ]
}

/// The address a broker's ready line gives for `key` (`mqtt`, `http`), reachable from here.
fn ready_addr(ready: &str, key: &str) -> Result<String> {
    let prefix = format!("{key}=");
    Ok(ready
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(prefix.as_str()))
        .with_context(|| format!("the broker's ready line names no {key} address: {ready}"))?
        .replace("0.0.0.0", "127.0.0.1"))
}

/// Reads the broker's stdout until its `renkei-broker ready …` line, then keeps draining it.
fn wait_for_ready(stdout: std::process::ChildStdout, timeout: Duration) -> Result<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref().map_while(Result::ok) {
            if line.starts_with("renkei-broker ready") {
                let _ = tx.send(line);
                break;
            }
        }
        for _ in lines {}
    });
    rx.recv_timeout(timeout)
        .context("the broker did not report ready in time")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The address each of the broker's listener flags is given in `args`.
    fn listen_addr(args: &[String], flag: &str) -> Option<std::net::SocketAddr> {
        let i = args.iter().position(|a| a == flag)?;
        args.get(i + 1)?.parse().ok()
    }

    #[test]
    fn the_demo_broker_listens_on_loopback_only() {
        let args = broker_listen_args(8080, false);
        // Every listener the broker opens by default is named, so none falls back to the
        // broker's 0.0.0.0 default.
        for flag in ["--mqtt", "--ws", "--http"] {
            let addr =
                listen_addr(&args, flag).unwrap_or_else(|| panic!("{flag} is not given: {args:?}"));
            assert!(addr.ip().is_loopback(), "{flag} {addr}");
        }
        assert_eq!(listen_addr(&args, "--http").map(|a| a.port()), Some(8080));
    }

    #[test]
    fn listen_all_opens_every_listener() {
        let args = broker_listen_args(9090, true);
        for flag in ["--mqtt", "--ws", "--http"] {
            let addr = listen_addr(&args, flag).unwrap();
            assert!(addr.ip().is_unspecified(), "{flag} {addr}");
        }
        assert_eq!(listen_addr(&args, "--http").map(|a| a.port()), Some(9090));
    }
}

/// The demo's line between a ward office and HQ: a TCP relay the person at the keyboard can
/// cut (every connection torn down, new ones refused) and restore.
///
/// Hand-written (some sixty lines of std): the demo needs only up and down, no fault proxy
/// server to install, and the tests' own proxy (tests/src/proxy.rs) is async and lives in
/// the test crate.
mod line {
    use std::io::BufRead;
    use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use anyhow::{Context, Result};

    pub struct Line {
        addr: SocketAddr,
        up: Arc<AtomicBool>,
        open: Arc<Mutex<Vec<TcpStream>>>,
    }

    impl Line {
        /// A line on an ephemeral port of 127.0.0.1 to `target`.
        pub fn open(target: &str) -> Result<Line> {
            let listener = TcpListener::bind("127.0.0.1:0").context("binding a ward's line")?;
            let addr = listener.local_addr()?;
            let up = Arc::new(AtomicBool::new(true));
            let open = Arc::new(Mutex::new(Vec::new()));
            let (target, up_, open_) = (target.to_owned(), up.clone(), open.clone());
            std::thread::spawn(move || {
                for client in listener.incoming().map_while(Result::ok) {
                    if !up_.load(Ordering::Relaxed) {
                        let _ = client.shutdown(Shutdown::Both);
                        continue;
                    }
                    let Ok(server) = TcpStream::connect(&target) else {
                        continue;
                    };
                    if let Ok(mut open) = open_.lock() {
                        open.retain(|s: &TcpStream| s.peer_addr().is_ok());
                        open.extend(client.try_clone().ok());
                        open.extend(server.try_clone().ok());
                    }
                    pipe(&client, &server);
                    pipe(&server, &client);
                }
            });
            Ok(Line { addr, up, open })
        }

        pub fn addr(&self) -> SocketAddr {
            self.addr
        }

        fn set(&self, up: bool) {
            self.up.store(up, Ordering::Relaxed);
            if !up && let Ok(mut open) = self.open.lock() {
                for stream in open.drain(..) {
                    let _ = stream.shutdown(Shutdown::Both);
                }
            }
        }
    }

    fn pipe(from: &TcpStream, to: &TcpStream) {
        let (Ok(mut from), Ok(mut to)) = (from.try_clone(), to.try_clone()) else {
            return;
        };
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Both);
        });
    }

    /// Reads `cut CODE` / `restore CODE` from stdin on a thread of its own.
    pub fn read_commands(lines: Vec<(u32, Line)>) {
        std::thread::spawn(move || {
            for command in std::io::stdin().lock().lines().map_while(Result::ok) {
                let mut words = command.split_whitespace();
                let (Some(verb), Some(code)) = (words.next(), words.next()) else {
                    continue;
                };
                let Some((code, line)) = lines.iter().find(|(c, _)| c.to_string() == code) else {
                    println!("  no ward broker for {code}");
                    continue;
                };
                match verb {
                    "cut" => {
                        line.set(false);
                        println!("  ward {code}: line to HQ cut");
                    }
                    "restore" => {
                        line.set(true);
                        println!("  ward {code}: line to HQ restored");
                    }
                    _ => println!("  commands: cut CODE, restore CODE"),
                }
            }
        });
    }

    #[cfg(test)]
    mod tests {
        use std::io::{Read, Write};

        use super::*;

        fn echo_server() -> SocketAddr {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            std::thread::spawn(move || {
                for stream in listener.incoming().map_while(Result::ok) {
                    std::thread::spawn(move || {
                        let mut read = stream.try_clone().unwrap();
                        let mut write = stream;
                        let _ = std::io::copy(&mut read, &mut write);
                    });
                }
            });
            addr
        }

        fn round_trip(addr: SocketAddr) -> std::io::Result<Vec<u8>> {
            let mut stream = TcpStream::connect(addr)?;
            stream.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
            stream.write_all(b"renkei")?;
            let mut got = vec![0u8; 6];
            stream.read_exact(&mut got)?;
            Ok(got)
        }

        #[test]
        fn a_line_carries_bytes_until_cut_and_again_once_restored() {
            let line = Line::open(&echo_server().to_string()).unwrap();
            let mut held = TcpStream::connect(line.addr()).unwrap();
            held.write_all(b"x").unwrap();
            let mut one = [0u8; 1];
            held.read_exact(&mut one).unwrap();
            assert_eq!(round_trip(line.addr()).unwrap(), b"renkei");

            line.set(false);
            held.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .unwrap();
            let _ = held.write_all(b"y");
            assert!(
                matches!(held.read(&mut one), Ok(0) | Err(_)),
                "an open connection must be torn down by the cut"
            );
            assert!(
                round_trip(line.addr()).is_err(),
                "a new one must go nowhere"
            );

            line.set(true);
            assert_eq!(round_trip(line.addr()).unwrap(), b"renkei");
        }
    }
}
