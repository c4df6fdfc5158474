//! Starts the real `renkei-broker` binary on ephemeral ports and talks to it from outside:
//! plain HTTP/1.1, MQTT through rumqttc, and raw TCP for the WebSocket handshake.
//!
//! Helpers panic on failure like the tests that call them.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use renkei_broker::Addrs;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc as tokio_mpsc;

/// How long anything in these tests may take before it counts as hung.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// A broker process; killed on drop if a test did not stop it.
pub struct RunningBroker {
    child: Child,
    pub addrs: Addrs,
    /// Holds the dashboard, data directory and the broker's log.
    pub dir: tempfile::TempDir,
}

impl RunningBroker {
    /// Starts the broker in demo mode (anonymous clients allowed) with every listener on
    /// 127.0.0.1 port 0 and waits for its ready line.
    pub fn start() -> RunningBroker {
        RunningBroker::start_with(&["--demo"])
    }

    /// Starts the broker with `extra` arguments for `serve` (no `--demo`: every client must
    /// authenticate).
    pub fn start_with(extra: &[&str]) -> RunningBroker {
        RunningBroker::start_in(prepare(), extra)
    }

    /// Starts the broker on a directory from [`prepare`], or one a previous run left behind
    /// (its `data/` is kept), with its `broker.toml`.
    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> RunningBroker {
        if !dir.path().join(CONFIG).exists() {
            write_config(dir.path(), "");
        }
        let dashboard = dir.path().join("dist");
        std::fs::create_dir_all(&dashboard).unwrap();
        std::fs::write(
            dashboard.join("index.html"),
            "<html>renkei dashboard</html>",
        )
        .unwrap();
        let log = File::options()
            .create(true)
            .append(true)
            .open(dir.path().join("broker.log"))
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_renkei-broker"))
            .args(["serve", "--mqtt", "127.0.0.1:0", "--ws", "127.0.0.1:0"])
            .args(["--http", "127.0.0.1:0", "--dashboard"])
            .arg(&dashboard)
            .arg("--data")
            .arg(dir.path().join("data"))
            .arg("--config")
            .arg(dir.path().join(CONFIG))
            .args(extra)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();

        // Read the ready line on a thread so that a broker that never prints cannot hang us.
        let stdout = child.stdout.take().unwrap();
        let (line_tx, line_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let _ = line_tx.send(lines.next());
            // Keep draining so the broker never blocks on a full pipe.
            for _ in lines {}
        });
        let line = match line_rx.recv_timeout(PATIENCE) {
            Ok(Some(Ok(line))) => line,
            other => {
                let _ = child.kill();
                panic!(
                    "no ready line ({other:?}); broker log:\n{}",
                    std::fs::read_to_string(dir.path().join("broker.log")).unwrap_or_default()
                );
            }
        };
        let addrs = Addrs::from_ready_line(&line)
            .unwrap_or_else(|| panic!("unexpected ready line {line:?}"));
        RunningBroker { child, addrs, dir }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The broker's process id, for looking at it in `/proc`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The broker process's resident set size now, in bytes (`VmRSS` in `/proc/<pid>/status`).
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in {status}"));
        kib * 1024
    }

    /// How many file descriptors the broker process has open now.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
    }

    /// Sends SIGTERM, waits for the exit, and hands back the directory for a restart.
    pub fn terminate_keeping_dir(mut self) -> (ExitStatus, tempfile::TempDir) {
        let status = self.stop();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        (status, dir)
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(mut self) -> ExitStatus {
        self.stop()
    }

    fn stop(&mut self) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM failed");
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "broker did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The config file the harness writes into a broker's directory.
pub const CONFIG: &str = "broker.toml";

/// A directory for a broker: its config (cheap password hashes, so that debug builds verify
/// logins quickly) and, once started, `data/` and `broker.log`.
pub fn prepare() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), "");
    dir
}

/// Writes the harness's config with `extra` TOML appended (sections other than `[auth]`, or
/// `[auth]` keys other than the hash cost).
pub fn write_config(dir: &std::path::Path, extra: &str) {
    std::fs::write(
        dir.join(CONFIG),
        format!("[auth]\nhash_memory = \"64KiB\"\nhash_iterations = 1\n{extra}"),
    )
    .unwrap();
}

/// Adds a user to the broker directory's database with the real `user add` command.
pub fn add_user(dir: &std::path::Path, name: &str, role_args: &[&str], password: &str) {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_renkei-broker"))
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

pub const PASSWORD: &str = "correct horse battery staple";

/// The client id a user of [`with_users`] connects with: an agent must use its site's, anyone
/// else an id under its own name (the broker binds client ids to logins).
pub fn client_id_for(user: &str) -> String {
    match user {
        "agent-nishi" => "agent-131041-nishi-shinjuku-es".into(),
        "agent-chiyoda" => "agent-131016-chiyoda-es".into(),
        other => other.into(),
    }
}

/// A broker directory with one user of every role: `agent-nishi` (131041/nishi-shinjuku-es),
/// `agent-chiyoda` (131016/chiyoda-es), `tanaka` (ward 131041), `sato` (hq), `dis`
/// (integrator), `root` (admin), all with [`PASSWORD`].
pub fn with_users(config: &str) -> tempfile::TempDir {
    let dir = prepare();
    write_config(dir.path(), config);
    let users: [(&str, &[&str]); 6] = [
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
    for (name, args) in users {
        add_user(dir.path(), name, args, PASSWORD);
    }
    dir
}

impl Drop for RunningBroker {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- broker log ---\n{}", self.log());
        }
    }
}

/// A plain HTTP/1.1 response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// `GET path` with `Connection: close`; the broker's responses carry a Content-Length, so the
/// body is everything after the head.
pub async fn http_get(addrs: &Addrs, path: &str) -> HttpResponse {
    http_get_as(addrs, path, None).await
}

/// [`http_get`] with HTTP Basic credentials.
pub async fn http_get_as(addrs: &Addrs, path: &str, user: Option<(&str, &str)>) -> HttpResponse {
    use base64::Engine as _;
    let mut stream = TcpStream::connect(addrs.http).await.unwrap();
    let authorization = user
        .map(|(name, password)| {
            let token =
                base64::engine::general_purpose::STANDARD.encode(format!("{name}:{password}"));
            format!("Authorization: Basic {token}\r\n")
        })
        .unwrap_or_default();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\n{authorization}Connection: close\r\n\r\n",
        addrs.http
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut raw))
        .await
        .expect("HTTP response in time")
        .unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("HTTP head");
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    HttpResponse {
        status,
        head,
        body: raw[split + 4..].to_vec(),
    }
}

/// The value of one sample line of a Prometheus text exposition.
pub fn metric(text: &str, series: &str) -> Option<i64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Polls `check` until it returns `Some`, or panics after [`PATIENCE`] with `what`.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An MQTT 3.1.1 client whose event loop runs in a task.
pub struct MqttClient {
    pub client: AsyncClient,
    incoming: tokio_mpsc::UnboundedReceiver<Packet>,
    /// Publishes that arrived while waiting for something else.
    early: VecDeque<Publish>,
}

impl MqttClient {
    /// Connects anonymously (demo mode) and waits for the CONNACK.
    pub async fn connect(addrs: &Addrs, client_id: &str) -> MqttClient {
        MqttClient::try_connect(options(addrs, client_id))
            .await
            .unwrap_or_else(|e| panic!("{client_id} cannot connect: {e}"))
    }

    /// Connects as a user and waits for the CONNACK.
    pub async fn connect_as(addrs: &Addrs, user: &str, password: &str) -> MqttClient {
        let mut options = options(addrs, &client_id_for(user));
        options.set_credentials(user, password);
        MqttClient::try_connect(options)
            .await
            .unwrap_or_else(|e| panic!("{user} cannot connect: {e}"))
    }

    /// Connects with `options`; the error if the broker does not answer with a CONNACK.
    pub async fn try_connect(options: MqttOptions) -> Result<MqttClient, String> {
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let event = tokio::time::timeout(PATIENCE, eventloop.poll())
            .await
            .expect("an answer in time")
            .map_err(|e| e.to_string())?;
        assert!(
            matches!(event, Event::Incoming(Packet::ConnAck(_))),
            "{event:?}"
        );
        let (tx, incoming) = tokio_mpsc::unbounded_channel();
        tokio::spawn(drive(eventloop, tx));
        Ok(MqttClient {
            client,
            incoming,
            early: VecDeque::new(),
        })
    }

    /// Subscribes and returns the SUBACK's return codes.
    pub async fn subscribe_codes(&mut self, filter: &str) -> Vec<rumqttc::SubscribeReasonCode> {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            match self.next_packet().await {
                Packet::SubAck(ack) => return ack.return_codes,
                Packet::Publish(p) => self.early.push_back(p),
                _ => {}
            }
        }
    }

    /// Subscribes to `filters` in one SUBSCRIBE and returns the SUBACK's return codes.
    pub async fn subscribe_many_codes(
        &mut self,
        filters: impl IntoIterator<Item = String>,
    ) -> Vec<rumqttc::SubscribeReasonCode> {
        let filters = filters
            .into_iter()
            .map(|path| rumqttc::SubscribeFilter::new(path, QoS::AtLeastOnce));
        self.client.subscribe_many(filters).await.unwrap();
        loop {
            match self.next_packet().await {
                Packet::SubAck(ack) => return ack.return_codes,
                Packet::Publish(p) => self.early.push_back(p),
                _ => {}
            }
        }
    }

    /// Publishes a Renkei message on its own topic, retained, at QoS 1.
    pub async fn send(&self, env: &renkei_shared::Envelope) {
        self.client
            .publish(
                renkei_shared::Topic::of(env).unwrap().to_string(),
                QoS::AtLeastOnce,
                true,
                renkei_shared::encode(env).unwrap(),
            )
            .await
            .unwrap();
    }

    /// The next publish if one arrives within `wait`.
    pub async fn publish_within(&mut self, wait: Duration) -> Option<Publish> {
        if let Some(p) = self.early.pop_front() {
            return Some(p);
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.incoming.recv()).await {
                Ok(Some(Packet::Publish(p))) => return Some(p),
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Whether the event loop has ended (the broker closed the connection) within `wait`.
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.incoming.recv()).await {
                Ok(Some(Packet::Publish(p))) => self.early.push_back(p),
                Ok(Some(_)) => continue,
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
    }

    /// Subscribes and waits for the SUBACK, so that what is published next is seen.
    pub async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            match self.next_packet().await {
                Packet::SubAck(_) => return,
                Packet::Publish(p) => self.early.push_back(p),
                _ => {}
            }
        }
    }

    /// The next publish received, within [`PATIENCE`].
    pub async fn next_publish(&mut self) -> Publish {
        if let Some(p) = self.early.pop_front() {
            return p;
        }
        loop {
            if let Packet::Publish(p) = self.next_packet().await {
                return p;
            }
        }
    }

    async fn next_packet(&mut self) -> Packet {
        tokio::time::timeout(PATIENCE, self.incoming.recv())
            .await
            .expect("a packet in time")
            .expect("event loop running")
    }
}

pub fn options(addrs: &Addrs, client_id: &str) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, addrs.mqtt.ip().to_string(), addrs.mqtt.port());
    options.set_keep_alive(Duration::from_secs(5));
    // JSON mirror messages are a few times larger than their postcard form.
    options.set_max_packet_size(256 * 1024, 64 * 1024);
    options
}

async fn drive(mut eventloop: EventLoop, incoming: tokio_mpsc::UnboundedSender<Packet>) {
    while let Ok(event) = eventloop.poll().await {
        if let Event::Incoming(packet) = event
            && incoming.send(packet).is_err()
        {
            return;
        }
    }
}

/// The sample status with sequence number `seq`, sent a second later per step.
pub fn status(seq: u64) -> renkei_shared::Envelope {
    let mut env = renkei_shared::sample::status();
    env.header.seq = seq;
    env.header.sent_at = renkei_shared::Timestamp(env.header.sent_at.0 + seq as i64 * 1000);
    env
}

/// Connects and returns the CONNACK's refusal code, or `None` if the broker accepted.
pub async fn refusal(options: MqttOptions) -> Option<rumqttc::ConnectReturnCode> {
    let (_client, mut eventloop) = AsyncClient::new(options, 8);
    match tokio::time::timeout(PATIENCE, eventloop.poll())
        .await
        .expect("an answer in time")
    {
        Ok(Event::Incoming(Packet::ConnAck(_))) => None,
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => Some(code),
        other => panic!("neither a CONNACK nor a refusal: {other:?}"),
    }
}
