//! Debian's Mosquitto 2.0 as a real third-party broker: the agent's peer in its own tests, the
//! clustered broker of external-broker mode, a target of the load tool.
//!
//! Every instance allows anonymous clients, keeps nothing on disk (`persistence false`) and
//! queues without limit (`max_queued_messages 0`: the default silently drops QoS 1 messages
//! beyond 1,000 to a subscriber that falls behind).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use tempfile::TempDir;

use crate::pki::Pki;
use crate::process::{Process, free_port, wait_listening};
use crate::wait::PATIENCE;

/// Where Debian installs it (`apt-get install mosquitto`).
pub const MOSQUITTO: &str = "/usr/sbin/mosquitto";

/// A running Mosquitto on 127.0.0.1, killed on drop.
#[derive(Debug)]
pub struct Mosquitto {
    _process: Process,
    /// The plain MQTT listener.
    pub port: u16,
    /// The MQTT-over-WebSocket listener.
    pub ws_port: u16,
    /// The MQTTS listener, if one was asked for.
    pub tls_port: Option<u16>,
    _dir: TempDir,
}

impl Mosquitto {
    pub fn installed() -> bool {
        Path::new(MOSQUITTO).exists()
    }

    /// A Mosquitto on free ports.
    pub fn start() -> Mosquitto {
        Mosquitto::setup().start()
    }

    /// [`Mosquitto::start`], or `None` with a SKIPPED line where Mosquitto is not installed
    /// (for suites that run without Debian's packages).
    pub fn start_if_installed() -> Option<Mosquitto> {
        if !Mosquitto::installed() {
            eprintln!("SKIPPED: {MOSQUITTO} is not installed (apt-get install mosquitto)");
            return None;
        }
        Some(Mosquitto::start())
    }

    /// A Mosquitto to configure before it starts.
    pub fn setup() -> MosquittoSetup {
        MosquittoSetup::default()
    }

    /// The plain listener's address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The plain listener's URL, as agents and the broker are given it.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

/// What a [`Mosquitto`] listens on, and anything more for its config file.
#[derive(Debug, Default)]
pub struct MosquittoSetup {
    port: Option<u16>,
    ws_port: Option<u16>,
    tls: Option<(Option<u16>, String)>,
    extra: String,
}

impl MosquittoSetup {
    /// The plain listener on `port` (to restart one where clients expect it).
    pub fn port(mut self, port: u16) -> MosquittoSetup {
        self.port = Some(port);
        self
    }

    /// The WebSocket listener on `port`.
    pub fn ws_port(mut self, port: u16) -> MosquittoSetup {
        self.ws_port = Some(port);
        self
    }

    /// A TLS listener too, on `port` (a free one if `None`), serving `pki`'s certificate.
    pub fn tls(mut self, port: Option<u16>, pki: &Pki) -> MosquittoSetup {
        let files = format!(
            "cafile {}\ncertfile {}\nkeyfile {}\n",
            pki.ca.display(),
            pki.cert.display(),
            pki.key.display()
        );
        self.tls = Some((port, files));
        self
    }

    /// More lines for the config file (global options).
    pub fn extra(mut self, lines: &str) -> MosquittoSetup {
        self.extra.push_str(lines);
        self
    }

    /// Starts it and waits until every listener accepts connections.
    pub fn start(self) -> Mosquitto {
        assert!(
            Mosquitto::installed(),
            "{MOSQUITTO} is not installed (apt-get install mosquitto)"
        );
        let port = self.port.unwrap_or_else(free_port);
        let ws_port = self.ws_port.unwrap_or_else(free_port);
        let tls = self
            .tls
            .map(|(tls_port, files)| (tls_port.unwrap_or_else(free_port), files));
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("mosquitto.conf");
        let mut text = format!(
            "allow_anonymous true\npersistence false\nmax_queued_messages 0\n{}\
             listener {port} 127.0.0.1\nlistener {ws_port} 127.0.0.1\nprotocol websockets\n",
            self.extra
        );
        if let Some((tls_port, files)) = &tls {
            text.push_str(&format!("listener {tls_port} 127.0.0.1\n{files}"));
        }
        std::fs::write(&conf, text).unwrap();
        let process = Process::spawn(
            "mosquitto",
            Command::new(MOSQUITTO)
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        let tls_port = tls.map(|(tls_port, _)| tls_port);
        for listener in [port, ws_port].into_iter().chain(tls_port) {
            assert!(
                wait_listening(listener, PATIENCE),
                "mosquitto did not listen on {listener}"
            );
        }
        Mosquitto {
            _process: process,
            port,
            ws_port,
            tls_port,
            _dir: dir,
        }
    }
}
