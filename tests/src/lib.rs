//! Renkei's cross-crate and browser tests (the tests are in `tests/tests/`) and the load tool
//! `renkei-bench` (`src/bin/`).
//!
//! The broker, agents, Mosquitto and the MQTT and HTTP clients come from `renkei-testkit`, as
//! in every suite. What only these tests need is here: [`Browser`] runs Debian's ChromeDriver
//! and a headless Chromium driven over WebDriver (fantoccini), [`asyncapi`] generates and
//! checks `docs/asyncapi.yaml`, and [`proxy`] breaks the network between agents and broker.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use fantoccini::{Client, ClientBuilder};
use renkei_testkit::{AgentProcess, Process, free_port, workspace_root};

pub mod asyncapi;
pub mod proxy;

/// A directory for a ward broker (ward mode) of `ward` whose upstream is `hq_url`; `upstream`,
/// given the directory, adds keys to its `[upstream]` section (a relay's login).
pub fn ward_broker_dir(
    hq_url: &str,
    ward: u32,
    upstream: impl FnOnce(&Path) -> String,
) -> tempfile::TempDir {
    let dir = renkei_testkit::prepare();
    let extra = upstream(dir.path());
    renkei_testkit::write_config(
        dir.path(),
        &format!("[upstream]\nbroker = \"{hq_url}\"\nward = {ward}\n{extra}"),
    );
    dir
}

/// A broker's record (`renkei.db` in its data directory), opened read-only beside the running
/// broker, waiting up to 5 s for its writer.
pub fn open_record(data_dir: &Path) -> Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open_with_flags(
        data_dir.join("renkei.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

/// One number from a broker's record: `sql` (a `SELECT COUNT(*) …`) with one parameter.
pub fn record_count(data_dir: &Path, sql: &str, param: impl rusqlite::ToSql) -> Result<u64> {
    Ok(open_record(data_dir)?.query_row(sql, [param], |r| r.get(0))?)
}

/// The dashboard Trunk built into `dist/`, which the browser tests load from the broker.
pub fn built_dashboard() -> Result<PathBuf> {
    let dist = workspace_root().join("dist");
    anyhow::ensure!(
        dist.join("index.html").exists(),
        "{} is missing: build the dashboard first (`cargo xtask test` does it)",
        dist.join("index.html").display()
    );
    Ok(dist)
}

/// `renkei-agent run` for the shelter `site` in Shinjuku (131041), named `name`, open with 123
/// evacuees in 456 places, reporting to `broker_url` with its state in `state_dir`; `extra`
/// arguments follow.
pub fn shelter_agent(
    broker_url: &str,
    site: &str,
    name: &str,
    state_dir: &Path,
    extra: &[&str],
) -> Result<AgentProcess> {
    let state_dir = state_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("a state directory that is not UTF-8"))?;
    let mut args = vec![
        "run",
        "--broker",
        broker_url,
        "--ward",
        "131041",
        "--site",
        site,
        "--name",
        name,
        "--kind",
        "shelter",
        "--evacuees",
        "123",
        "--capacity",
        "456",
        "--shelter-state",
        "open",
        "--state-dir",
        state_dir,
    ];
    args.extend_from_slice(extra);
    Ok(AgentProcess::start(&args))
}

/// Kills ChromeDriver and everything it started (its process group).
#[derive(Debug)]
struct DriverGroup(Process);

impl Drop for DriverGroup {
    fn drop(&mut self) {
        let group = format!("-{}", self.0.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        self.0.kill9();
    }
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
        let port = free_port();
        // Its own process group, so that dropping the browser ends Chromium too (ChromeDriver
        // does not take its browser down when it is killed).
        let driver = Process::spawn(
            "chromedriver",
            Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0),
        );
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
