//! The broker under test: the real `renkei-broker` binary as a process, or the
//! `renkei_broker` library in this process, every listener on 127.0.0.1 port 0.
//!
//! A broker process lives in a directory of its own (from [`prepare`] or [`with_users`]):
//! `broker.toml` (cheap password hashes, so that debug builds check logins quickly),
//! `data/`, `dist/` (a stub dashboard unless a built one is named) and `broker.log`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use renkei_broker::Addrs;
use renkei_broker::config::Config;
use renkei_broker::http::AppState;
use tempfile::TempDir;

use crate::process::{Process, binary, ready_line};
use crate::wait::PATIENCE;

/// The config file in a broker's directory.
pub const CONFIG: &str = "broker.toml";

/// The password of every user [`with_users`] makes.
pub const PASSWORD: &str = "correct horse battery staple";

/// `root`'s login (the admin of [`with_users`]), for the API and `/metrics`.
pub const ROOT: Option<(&str, &str)> = Some(("root", PASSWORD));

/// A directory for a broker, with the kit's config.
pub fn prepare() -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), "");
    dir
}

/// Writes the kit's config into `dir` with `extra` TOML appended (sections other than
/// `[auth]`, or `[auth]` keys other than the hash cost).
pub fn write_config(dir: &Path, extra: &str) {
    std::fs::write(
        dir.join(CONFIG),
        format!("[auth]\nhash_memory = \"64KiB\"\nhash_iterations = 1\n{extra}"),
    )
    .unwrap();
}

/// Adds a user to the broker directory's database with the real `user add` command.
pub fn add_user(dir: &Path, name: &str, role_args: &[&str], password: &str) {
    use std::io::Write as _;
    let mut child = broker_command()
        .args(["user", "add", name, "--password-stdin", "--config"])
        .arg(dir.join(CONFIG))
        .arg("--data")
        .arg(dir.join("data"))
        .args(role_args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "user add {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The client id a user of [`with_users`] connects with: an agent must use its site's, anyone
/// else an id under its own name (the broker binds client ids to logins).
pub fn client_id_for(user: &str) -> String {
    match user {
        "agent-nishi" => "agent-131041-nishi-shinjuku-es".into(),
        "agent-chiyoda" => "agent-131016-chiyoda-es".into(),
        other => other.into(),
    }
}

/// A broker directory with `config` and one user of every role: `agent-nishi`
/// (131041/nishi-shinjuku-es), `agent-chiyoda` (131016/chiyoda-es), `tanaka` (ward 131041),
/// `sato` (hq), `dis` (integrator), `root` (admin), all with [`PASSWORD`].
pub fn with_users(config: &str) -> TempDir {
    let dir = prepare();
    write_config(dir.path(), config);
    for (name, args) in USER_ROLES {
        add_user(dir.path(), name, args, PASSWORD);
    }
    dir
}

/// The users of [`with_users`] and their `user add` role arguments; the first is the sample
/// site's agent (`agent-nishi`, 131041/nishi-shinjuku-es).
pub const USER_ROLES: [(&str, &[&str]); 6] = [
    (
        "agent-nishi",
        &[
            "--role",
            "agent",
            "--ward",
            "131041",
            "--site",
            "nishi-shinjuku-es",
        ],
    ),
    (
        "agent-chiyoda",
        &["--role", "agent", "--ward", "13101", "--site", "chiyoda-es"],
    ),
    ("tanaka", &["--role", "ward", "--ward", "131041"]),
    ("sato", &["--role", "hq"]),
    ("dis", &["--role", "integrator"]),
    ("root", &["--role", "admin"]),
];

/// Runs `renkei-broker serve` with `args` and `config` (appended to the kit's), which must
/// not start: no ready line, a failed exit. Its stderr.
pub fn start_refused(config: &str, args: &[&str]) -> String {
    let dir = prepare();
    write_config(dir.path(), config);
    let out = broker_command()
        .arg("serve")
        .args(args)
        .arg("--config")
        .arg(dir.path().join(CONFIG))
        .arg("--data")
        .arg(dir.path().join("data"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "the broker started with {args:?} and\n{config}\n{stderr}"
    );
    assert!(out.stdout.is_empty(), "no ready line");
    stderr
}

/// The `renkei-broker` binary, with nothing from the test's environment that would change
/// its configuration.
fn broker_command() -> Command {
    let mut command = Command::new(binary("renkei-broker", "renkei-broker"));
    command.env_remove("RENKEI_BROKER_CONFIG");
    command
}

/// A `renkei-broker serve` process; killed on drop if a test did not stop it, and its log
/// printed if the test is failing.
#[derive(Debug)]
pub struct BrokerProcess {
    process: Process,
    pub addrs: Addrs,
    /// Holds the config, the data directory, the dashboard and the broker's log.
    pub dir: TempDir,
}

impl BrokerProcess {
    /// Starts the broker in demo mode (anonymous clients allowed).
    pub fn start() -> BrokerProcess {
        BrokerProcess::start_demo("")
    }

    /// Starts the broker in demo mode with `config` (TOML, as for [`write_config`]).
    pub fn start_demo(config: &str) -> BrokerProcess {
        let dir = prepare();
        write_config(dir.path(), config);
        BrokerProcess::start_in(dir, &["--demo"])
    }

    /// Starts the broker with `config` and the users of [`with_users`]: every client must
    /// log in.
    pub fn start_with_users(config: &str) -> BrokerProcess {
        BrokerProcess::start_in(with_users(config), &[])
    }

    /// Starts the broker on a directory from [`prepare`] or [`with_users`], or one a previous
    /// run left behind (its `data/` is kept), serving a stub dashboard.
    pub fn start_in(dir: TempDir, extra: &[&str]) -> BrokerProcess {
        let dashboard = dir.path().join("dist");
        std::fs::create_dir_all(&dashboard).unwrap();
        std::fs::write(
            dashboard.join("index.html"),
            "<html>renkei dashboard</html>",
        )
        .unwrap();
        BrokerProcess::launch(dir, &dashboard, extra)
    }

    /// As [`BrokerProcess::start_in`], serving the dashboard built in `dist` (Trunk's output).
    pub fn start_serving(dist: &Path, dir: TempDir, extra: &[&str]) -> BrokerProcess {
        BrokerProcess::launch(dir, dist, extra)
    }

    fn launch(dir: TempDir, dashboard: &Path, extra: &[&str]) -> BrokerProcess {
        if !dir.path().join(CONFIG).exists() {
            write_config(dir.path(), "");
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(dir.path().join("broker.log"))
            .unwrap();
        let mut command = broker_command();
        command
            .args(["serve", "--mqtt", "127.0.0.1:0", "--ws", "127.0.0.1:0"])
            .args(["--http", "127.0.0.1:0", "--dashboard"])
            .arg(dashboard)
            .arg("--data")
            .arg(dir.path().join("data"))
            .arg("--config")
            .arg(dir.path().join(CONFIG))
            .args(extra)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut process = Process::spawn("renkei-broker", &mut command);
        let stdout = process.child.stdout.take().unwrap();
        let Some(line) = ready_line(stdout, "renkei-broker ready", PATIENCE) else {
            process.kill9();
            panic!(
                "no ready line from renkei-broker; its log:\n{}",
                std::fs::read_to_string(dir.path().join("broker.log")).unwrap_or_default()
            );
        };
        let addrs = Addrs::from_ready_line(&line)
            .unwrap_or_else(|| panic!("unexpected ready line {line:?}"));
        BrokerProcess {
            process,
            addrs,
            dir,
        }
    }

    /// The URL agents are given.
    pub fn mqtt_url(&self) -> String {
        format!("mqtt://{}", self.addrs.mqtt)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The broker's process id, for looking at it in `/proc`.
    pub fn pid(&self) -> u32 {
        self.process.id()
    }

    /// The broker process's resident set size now, in bytes.
    pub fn rss(&self) -> u64 {
        self.process.rss()
    }

    /// How many file descriptors the broker process has open now.
    pub fn open_fds(&self) -> usize {
        self.process.open_fds()
    }

    /// What the broker has logged so far (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(mut self) -> ExitStatus {
        self.process.terminate()
    }

    /// Sends SIGTERM, waits for the exit, and hands back the directory for a restart.
    pub fn terminate_keeping_dir(mut self) -> (ExitStatus, TempDir) {
        let status = self.process.terminate();
        (status, self.take_dir())
    }

    /// Kills the broker with SIGKILL (no shutdown at all) and hands back the directory for a
    /// restart.
    pub fn kill9_keeping_dir(mut self) -> TempDir {
        self.process.kill9();
        self.take_dir()
    }

    fn take_dir(&mut self) -> TempDir {
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- broker log ---\n{}", self.log());
        }
    }
}

/// The `renkei_broker` library started in this process, as `serve` would start it (the
/// tests that reach into its state: its live state's lock, its counters).
///
/// rumqttd cannot be stopped: its threads end with the test process.
#[derive(Debug)]
pub struct InProcessBroker {
    addrs: Addrs,
    app: AppState,
    stop: tokio::sync::oneshot::Sender<()>,
    serving: tokio::task::JoinHandle<Result<(), renkei_broker::Error>>,
    _dir: TempDir,
}

impl InProcessBroker {
    /// Starts the broker in demo mode, every listener on 127.0.0.1 port 0, its data in a
    /// temporary directory, and `configure` applied last.
    pub async fn start(configure: impl FnOnce(&mut Config)) -> InProcessBroker {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.mqtt.listen = "127.0.0.1:0".parse().unwrap();
        config.mqtt.ws_listen = "127.0.0.1:0".parse().unwrap();
        config.http.listen = "127.0.0.1:0".parse().unwrap();
        config.http.dashboard_dir = dir.path().join("dist");
        config.data.dir = dir.path().join("data");
        config.demo = true;
        configure(&mut config);
        let broker = renkei_broker::Broker::start(config).await.unwrap();
        let addrs = broker.addrs();
        let app = broker.app_state().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(broker.serve(async {
            let _ = stopped.await;
        }));
        InProcessBroker {
            addrs,
            app,
            stop,
            serving,
            _dir: dir,
        }
    }

    pub fn addrs(&self) -> Addrs {
        self.addrs
    }

    /// What the HTTP handlers see: the live state and the counters.
    pub fn app_state(&self) -> &AppState {
        &self.app
    }

    /// Shuts the broker down as SIGTERM would and waits until it has; panics if it had
    /// stopped serving with an error.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.serving.await.unwrap().unwrap();
    }
}
