//! The harness for Renkei's cross-crate and browser tests (the tests are in `tests/tests/`).
//!
//! Everything here starts the real thing on ephemeral ports and tears it down on drop:
//! [`Broker`] runs the `renkei-broker` binary, [`Agent`] runs `renkei-agent`, [`Browser`] runs
//! Debian's ChromeDriver and a headless Chromium driven over WebDriver (fantoccini).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use fantoccini::{Client, ClientBuilder};

/// The repository root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The directory Cargo puts this build's binaries in (`target/debug`).
fn bin_dir() -> PathBuf {
    // Test executables live in target/<profile>/deps/, binaries in target/<profile>/.
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf));
    match exe_dir {
        Some(dir) if dir.ends_with("deps") => dir.parent().map(Path::to_path_buf).unwrap_or(dir),
        Some(dir) => dir,
        None => workspace_root().join("target/debug"),
    }
}

/// The path of a workspace binary, building its package first if this run has not.
pub fn binary(package: &str, name: &str) -> Result<PathBuf> {
    let dir = bin_dir();
    let path = dir.join(name);
    if !path.exists() {
        let profile: &[&str] = if dir.ends_with("release") {
            &["--release"]
        } else {
            &[]
        };
        let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["build", "-p", package])
            .args(profile)
            .current_dir(workspace_root())
            .status()
            .context("running cargo build")?;
        if !status.success() {
            bail!("cargo build -p {package} failed");
        }
    }
    Ok(path)
}

/// A TCP port that was free a moment ago, for servers that cannot report a port-0 bind.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A child process killed on drop.
#[derive(Debug)]
pub struct Process {
    pub child: Child,
    pub name: String,
}

impl Process {
    /// Kills the process with SIGKILL at once (no clean shutdown, no last words).
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Asks the process to stop (SIGTERM) and waits for it.
    pub fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                self.kill9();
                bail!("{} did not stop within {timeout:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Kills ChromeDriver and everything it started (its process group).
#[derive(Debug)]
struct DriverGroup(Process);

impl Drop for DriverGroup {
    fn drop(&mut self) {
        let group = format!("-{}", self.0.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        self.0.kill9();
    }
}

/// A running `renkei-broker` on ephemeral ports.
#[derive(Debug)]
pub struct Broker {
    pub process: Process,
    /// `127.0.0.1:PORT` of the MQTT TCP listener.
    pub mqtt: String,
    /// `127.0.0.1:PORT` of the MQTT WebSocket listener.
    pub ws: String,
    /// `127.0.0.1:PORT` of the HTTP server (dashboard, API).
    pub http: String,
    /// The broker's data directory.
    pub data: PathBuf,
}

impl Broker {
    /// Starts the broker with its data in `data`, serving the dashboard from `dist/`, with
    /// `extra` arguments for `serve`.
    pub fn start(data: &Path, extra: &[&str]) -> Result<Broker> {
        let exe = binary("renkei-broker", "renkei-broker")?;
        let mut child = Command::new(exe)
            .current_dir(workspace_root())
            .args([
                "serve",
                "--mqtt",
                "127.0.0.1:0",
                "--ws",
                "127.0.0.1:0",
                "--http",
                "127.0.0.1:0",
            ])
            .arg("--data")
            .arg(data)
            .arg("--dashboard")
            .arg(workspace_root().join("dist"))
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .context("starting renkei-broker")?;
        let stdout = child.stdout.take().context("broker stdout")?;
        let process = Process {
            child,
            name: "renkei-broker".into(),
        };
        let ready = ready_line(stdout, "renkei-broker ready", Duration::from_secs(30))?;
        let field = |key: &str| -> Result<String> {
            ready
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(key))
                .map(str::to_owned)
                .with_context(|| format!("ready line {ready:?} has no {key}"))
        };
        Ok(Broker {
            mqtt: field("mqtt=")?,
            ws: field("ws=")?,
            http: field("http=")?,
            data: data.to_path_buf(),
            process,
        })
    }

    /// The MQTT URL agents use.
    pub fn mqtt_url(&self) -> String {
        format!("mqtt://{}", self.mqtt)
    }

    /// `(host, port)` of the MQTT TCP listener, for rumqttc.
    pub fn mqtt_host_port(&self) -> Result<(String, u16)> {
        let (host, port) = self.mqtt.rsplit_once(':').context("mqtt address")?;
        Ok((host.to_owned(), port.parse()?))
    }
}

/// Reads a child's stdout until a line starting with `prefix`, then keeps draining it so the
/// child never blocks on a full pipe.
pub fn ready_line(
    stdout: std::process::ChildStdout,
    prefix: &'static str,
    timeout: Duration,
) -> Result<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref().map_while(Result::ok) {
            if line.starts_with(prefix) {
                let _ = tx.send(line);
                break;
            }
        }
        for _ in lines {}
    });
    rx.recv_timeout(timeout)
        .with_context(|| format!("no {prefix:?} line within {timeout:?}"))
}

/// Runs `renkei-agent` with `args` (its stdout and stderr are inherited).
pub fn agent(args: &[&str]) -> Result<Process> {
    let exe = binary("renkei-agent", "renkei-agent")?;
    let child = Command::new(exe)
        .current_dir(workspace_root())
        .args(args)
        .stdout(Stdio::null())
        .spawn()
        .context("starting renkei-agent")?;
    Ok(Process {
        child,
        name: "renkei-agent".into(),
    })
}

/// A headless Chromium driven through Debian's ChromeDriver.
#[derive(Debug)]
pub struct Browser {
    pub client: Client,
    _driver: DriverGroup,
    _profile: tempfile::TempDir,
}

/// Where Debian installs the browser and its driver.
pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

impl Browser {
    /// Starts ChromeDriver on a free port and opens a fresh headless Chromium session.
    pub async fn start() -> Result<Browser> {
        for file in [CHROMIUM, CHROMEDRIVER] {
            if !Path::new(file).exists() {
                bail!(
                    "{file} is missing: run `cargo xtask setup` (installs Debian's chromium and chromium-driver)"
                );
            }
        }
        let port = free_port()?;
        // Its own process group, so that dropping the browser ends Chromium too (ChromeDriver
        // does not take its browser down when it is killed).
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting chromedriver")?;
        let driver = Process {
            child,
            name: "chromedriver".into(),
        };
        let profile = tempfile::tempdir()?;
        let caps = serde_json::json!({
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", "--disable-quic",
                    "--window-size=1400,1000",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }
        });
        let caps = match caps {
            serde_json::Value::Object(map) => map,
            _ => unreachable!("a JSON object literal"),
        };
        let url = format!("http://127.0.0.1:{port}");
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        // ChromeDriver takes a moment to listen.
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = loop {
            match ClientBuilder::new(connector.clone())
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(client) => break client,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => bail!("cannot open a Chromium session: {e}"),
            }
        };
        Ok(Browser {
            client,
            _driver: DriverGroup(driver),
            _profile: profile,
        })
    }

    /// The text of the first element matching `css`, if there is one.
    pub async fn text(&self, css: &str) -> Option<String> {
        let el = self.client.find(fantoccini::Locator::Css(css)).await.ok()?;
        el.text().await.ok()
    }

    /// The attribute `name` of the first element matching `css`, if both exist.
    pub async fn attr(&self, css: &str, name: &str) -> Option<String> {
        let el = self.client.find(fantoccini::Locator::Css(css)).await.ok()?;
        el.attr(name).await.ok()?
    }

    /// Waits until the element matching `css` has exactly `want` as its text.
    pub async fn wait_for_text(&self, css: &str, want: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        while Instant::now() < deadline {
            last = self.text(css).await;
            if last.as_deref() == Some(want) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("{css}: wanted {want:?}, last saw {last:?} after {timeout:?}")
    }

    /// Saves a screenshot (for a person to look at when a test fails).
    pub async fn screenshot(&self, path: &Path) -> Result<()> {
        let png = self.client.screenshot().await?;
        std::fs::write(path, png)?;
        Ok(())
    }
}

/// Polls `check` until it returns `Some`, or fails after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
pub mod asyncapi;
pub mod proxy;
