//! Debian's NATS server 2.9 as a real clustered engine: three nodes on loopback, each with
//! JetStream, an MQTT listener and MQTT over WebSocket (`ws://…/mqtt`), for HQ on a cluster
//! (docs/scaling.md, `tests/tests/cluster.rs`).
//!
//! The nodes list all three routes and set `mqtt.stream_replicas: 3`: left unset, NATS sizes
//! its own MQTT streams by the routes a node lists, and a node listing only its two peers
//! makes them R2, which stop when either replica is lost. They also set `mqtt.ack_wait` to
//! 5 s (30 s by default): a QoS 1 message in flight to a subscriber whose node died (an
//! agent's receipt) is sent again that much sooner once it has connected elsewhere.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::process::{Process, free_port, wait_listening};
use crate::wait::PATIENCE;

/// Where Debian installs it (`apt-get install nats-server`).
pub const NATS_SERVER: &str = "/usr/sbin/nats-server";

/// One node's ports.
#[derive(Debug, Clone, Copy)]
pub struct NatsPorts {
    pub client: u16,
    pub cluster: u16,
    pub mqtt: u16,
    pub ws: u16,
    pub http: u16,
}

/// One node: its process while it runs.
#[derive(Debug)]
pub struct NatsNode {
    pub name: String,
    pub ports: NatsPorts,
    conf: PathBuf,
    log: PathBuf,
    process: Option<Process>,
}

impl NatsNode {
    /// The MQTT listener's address.
    pub fn mqtt(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.ports.mqtt))
    }

    /// The NATS protocol URL.
    pub fn nats_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.ports.client)
    }

    /// MQTT over WebSocket, as a browser is given it.
    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/mqtt", self.ports.ws)
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(&self.log).unwrap();
        self.process = Some(Process::spawn(
            &self.name,
            Command::new(NATS_SERVER)
                .arg("-c")
                .arg(&self.conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log),
        ));
    }

    /// Whether `/healthz` says the node serves, its JetStream included.
    pub fn healthy(&self) -> bool {
        get_status(self.ports.http, "/healthz") == Some(200)
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A three-node cluster on 127.0.0.1, killed on drop.
#[derive(Debug)]
pub struct NatsCluster {
    pub nodes: Vec<NatsNode>,
    _dir: TempDir,
}

impl NatsCluster {
    pub fn installed() -> bool {
        Path::new(NATS_SERVER).exists()
    }

    /// Starts three nodes whose config ends with `authorization` (a NATS `authorization { … }`
    /// block, e.g. from `renkei-broker cluster-acl`), and waits until every node is healthy.
    ///
    /// Fifteen free ports are picked and then bound by the nodes: another test may take one
    /// in between, and the node that finds it taken exits. The cluster is then started again
    /// on fresh ports, up to three times.
    pub fn start(authorization: &str) -> NatsCluster {
        assert!(
            NatsCluster::installed(),
            "{NATS_SERVER} is not installed (apt-get install nats-server)"
        );
        let mut last = String::new();
        for _ in 0..3 {
            match NatsCluster::try_start(authorization) {
                Ok(cluster) => return cluster,
                Err(why) => last = why,
            }
        }
        panic!("the NATS cluster did not start:\n{last}");
    }

    fn try_start(authorization: &str) -> Result<NatsCluster, String> {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<NatsPorts> = (0..3)
            .map(|_| NatsPorts {
                client: free_port(),
                cluster: free_port(),
                mqtt: free_port(),
                ws: free_port(),
                http: free_port(),
            })
            .collect();
        let routes: Vec<String> = ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{}", p.cluster))
            .collect();
        let mut nodes = Vec::new();
        for (i, p) in ports.iter().enumerate() {
            let name = format!("hq-{}", ["a", "b", "c"][i]);
            let store = dir.path().join(&name);
            let conf = dir.path().join(format!("{name}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "server_name: {name}\nlisten: 127.0.0.1:{}\nhttp: 127.0.0.1:{}\n\
                     jetstream {{ store_dir: {store:?}, max_memory_store: 64MB, max_file_store: 1GB }}\n\
                     cluster {{ name: renkei-hq, listen: 127.0.0.1:{}, routes: [{}] }}\n\
                     mqtt {{ listen: 127.0.0.1:{}, stream_replicas: 3, ack_wait: \"5s\" }}\n\
                     websocket {{ listen: 127.0.0.1:{}, no_tls: true }}\n{authorization}\n",
                    p.client,
                    p.http,
                    p.cluster,
                    routes.join(", "),
                    p.mqtt,
                    p.ws,
                ),
            )
            .unwrap();
            let mut node = NatsNode {
                log: dir.path().join(format!("{name}.log")),
                name,
                ports: *p,
                conf,
                process: None,
            };
            node.spawn();
            nodes.push(node);
        }
        let mut cluster = NatsCluster { nodes, _dir: dir };
        for i in 0..3 {
            cluster.healthy_within(i, PATIENCE)?;
        }
        Ok(cluster)
    }

    /// Waits until node `i` listens for MQTT and says it is healthy.
    pub fn wait_healthy(&mut self, i: usize) {
        if let Err(why) = self.healthy_within(i, PATIENCE) {
            panic!("{why}");
        }
    }

    /// Node `i` healthy within `within`, or why not (its log); a node that exited says so at
    /// once.
    fn healthy_within(&mut self, i: usize, within: Duration) -> Result<(), String> {
        let node = &mut self.nodes[i];
        let deadline = Instant::now() + within;
        loop {
            if node.healthy() && wait_listening(node.ports.mqtt, Duration::from_millis(100)) {
                return Ok(());
            }
            let exited = node
                .process
                .as_mut()
                .is_some_and(|p| p.child.try_wait().ok().flatten().is_some());
            if exited || Instant::now() >= deadline {
                return Err(format!(
                    "{} {} :\n{}",
                    node.name,
                    if exited {
                        "exited"
                    } else {
                        "not healthy in time"
                    },
                    node.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Node `first`, then the others in turn.
    fn from(&self, first: usize) -> impl Iterator<Item = &NatsNode> {
        let n = self.nodes.len();
        (0..n).map(move |k| &self.nodes[(first + k) % n])
    }

    /// The flags of a `renkei-broker` instance on this cluster (`serve` in external mode): its
    /// MQTT session through node `first`, the others to fail over to, and its ingest reading
    /// the replicated stream through every node.
    pub fn instance_flags(&self, first: usize) -> Vec<String> {
        let mut flags = Vec::new();
        for (k, node) in self.from(first).enumerate() {
            flags.push(
                if k == 0 {
                    "--external"
                } else {
                    "--external-failover"
                }
                .to_owned(),
            );
            flags.push(format!("mqtt://{}", node.mqtt()));
        }
        for node in &self.nodes {
            flags.push("--external-jetstream".to_owned());
            flags.push(node.nats_url());
        }
        flags
    }

    /// The `[external]` config that sends an instance's dashboards to node `first`'s
    /// WebSocket listener, and to the others in turn when it is lost.
    pub fn dashboard_config(&self, first: usize) -> String {
        let urls: Vec<String> = self
            .from(first)
            .map(|n| format!("{:?}", n.ws_url()))
            .collect();
        format!(
            "[external]\nws_url = {}\nws_failover = [{}]\n",
            urls[0],
            urls[1..].join(", ")
        )
    }

    /// Kills node `i` with SIGKILL.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].process.take() {
            p.kill9();
        }
    }

    /// Starts node `i` again (its store and ports kept) and waits until it is healthy.
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].spawn();
        self.wait_healthy(i);
    }
}

/// The status code of `GET path` on 127.0.0.1:`port`, if it answers.
fn get_status(port: u16, path: &str) -> Option<u16> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head).ok()?;
    let line = std::str::from_utf8(&head[..n]).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}
