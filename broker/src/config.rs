//! The broker's configuration: one TOML file over compiled-in defaults.
//!
//! Every key is optional; an empty file (or none at all) gives [`Config::default`]. Unknown keys
//! are errors, so a typo never silently falls back to a default. Errors name the file, the line
//! and the key (`config file broker.toml, line 12: config key mqtt.max_packet_size: …`). Sizes and
//! durations are written in human units (`"20KiB"`, `"5s"`), read by [`renkei_shared::units`] as
//! the agent reads them. `docs/broker.example.toml` documents every key.

use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use renkei_shared::codec::MAX_FRAME;
use renkei_shared::units::{self, UnitError};
use serde::Deserialize;

/// Room on top of [`MAX_FRAME`] for the MQTT fixed header and the topic of a PUBLISH.
pub const PACKET_HEADROOM: usize = 4 * 1024;

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("config is not valid TOML: {0}")]
    Syntax(String),
    /// A key is unknown, or its value has the wrong type or is out of range.
    #[error("config key {key}: {message}")]
    Invalid { key: String, message: String },
    /// One of the errors above, in a config file: where to fix it.
    // `error`, not `source`: its text is already in this one's, so it is not a cause to print again.
    #[error("config file {}{}: {error}", path.display(), line.map(|n| format!(", line {n}")).unwrap_or_default())]
    InFile {
        path: PathBuf,
        /// The line of the bad key or value; `None` for what no one line holds.
        line: Option<usize>,
        error: Box<ConfigError>,
    },
}

/// Everything the broker can be told.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub mqtt: MqttConfig,
    pub http: HttpConfig,
    pub data: DataConfig,
    pub auth: AuthConfig,
    pub recorder: RecorderConfig,
    pub rules: RulesConfig,
    pub external: ExternalConfig,
    pub upstream: UpstreamConfig,
    /// Demo mode: anonymous clients allowed (see [`crate::auth`]). Set only by `serve --demo`,
    /// never from a file, so that a copied configuration cannot open a production broker.
    #[serde(skip)]
    pub demo: bool,
}

/// The embedded MQTT broker (rumqttd).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// MQTT 3.1.1 over TCP, for agents and integrators. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// MQTT 3.1.1 over WebSocket (subprotocol `mqtt`), for the dashboard. Port 0 picks one.
    pub ws_listen: SocketAddr,
    /// Connections the router accepts at once (2,000 sites plus dashboards and integrators).
    pub max_connections: usize,
    /// Largest MQTT packet accepted from a client; at least a Renkei frame plus its topic.
    pub max_packet_size: ByteSize,
    /// How long a new connection may take to send CONNECT before it is dropped.
    pub connect_timeout: HumanDuration,
    /// QoS 1 messages in flight to one subscriber.
    pub max_inflight: u16,
    /// Size of one segment of a topic filter's in-memory log.
    pub segment_size: ByteSize,
    /// Segments kept per topic filter: memory per filter is at most size × count.
    pub segment_count: usize,
    /// MQTT 3.1.1 over TLS; served only when `tls_cert_file` and `tls_key_file` are set.
    pub tls_listen: SocketAddr,
    /// PEM: the server certificate, then any intermediates.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM: the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub tls_key_file: Option<PathBuf>,
    /// The TCP listener is behind a load balancer that starts every connection with a
    /// PROXY protocol header (v1 or v2): connections without one are refused, and the
    /// client address it gives counts failed logins.
    pub proxy_protocol: bool,
    /// Sessions one user holds at once: open connections and saved persistent sessions (an
    /// agent may only use its site's one client id, so it holds at most one).
    pub max_connections_per_user: usize,
    /// Topic filters one session may subscribe to.
    pub max_filters_per_connection: usize,
    /// Topic filters all of one user's sessions may subscribe to together.
    pub max_filters_per_user: usize,
    /// Distinct request, incident and request-acknowledgement ids the broker retains per site
    /// (each kind counted on its own).
    pub max_items_per_site: usize,
    /// Accepted messages waiting for ingest (to be checked, applied and recorded). When the
    /// queue is this full, publishers' PUBACKs wait until ingest catches up: a burst slows
    /// them rather than being dropped.
    pub ingest_queue_messages: usize,
    /// The same bound in topic and payload bytes.
    pub ingest_queue_bytes: ByteSize,
}

impl MqttConfig {
    /// Whether the MQTTS listener is on.
    pub fn tls_enabled(&self) -> bool {
        self.tls_cert_file.is_some() && self.tls_key_file.is_some()
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            ws_listen: SocketAddr::from(([0, 0, 0, 0], 8083)),
            max_connections: 5_000,
            max_packet_size: ByteSize(MAX_FRAME + PACKET_HEADROOM),
            connect_timeout: HumanDuration(Duration::from_secs(5)),
            max_inflight: 100,
            // At most 10 MiB per subscribed filter's log, 8 MiB of it kept once full: five seconds
            // of 2,000 sites reporting every second, read as postcard or as JSON, before a
            // subscriber that stalls is skipped ahead (and told: `topic::SKIPPED_NOTICE`).
            // Ingest does not read a log. See docs/broker.example.toml.
            segment_size: ByteSize(2 * 1024 * 1024),
            segment_count: 5,
            tls_listen: SocketAddr::from(([0, 0, 0, 0], 8883)),
            tls_cert_file: None,
            tls_key_file: None,
            proxy_protocol: false,
            max_connections_per_user: 16,
            max_filters_per_connection: 32,
            max_filters_per_user: 256,
            max_items_per_site: 1_000,
            // Half a second of a 2,000-site storm at ingest's pace, in a few MiB.
            ingest_queue_messages: 4_096,
            ingest_queue_bytes: ByteSize(4 * 1024 * 1024),
        }
    }
}

/// The HTTP server: dashboard, API, health and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Where HTTP listens. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// The built dashboard (Trunk's `dist/`), served at `/`.
    pub dashboard_dir: PathBuf,
    /// The MQTT-over-WebSocket URL handed to browsers in `/config.json`, when they must not
    /// derive it from the page's host (a TLS proxy in front, another host or port).
    pub public_mqtt_ws_url: Option<String>,
    /// A request head must arrive whole within this time of the connection opening or of the
    /// previous response, else the connection is closed (slowloris; idle keep-alive).
    pub header_read_timeout: HumanDuration,
    /// A connection on which no byte moves either way for this long is closed (a client that
    /// stops reading its response).
    pub idle_timeout: HumanDuration,
    /// Connections served at once; more wait in the kernel's listen queue.
    pub max_connections: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            dashboard_dir: PathBuf::from("dist"),
            public_mqtt_ws_url: None,
            // Browsers send a head at once; 10s leaves room for a slow mobile link.
            header_read_timeout: HumanDuration(Duration::from_secs(10)),
            idle_timeout: HumanDuration(Duration::from_secs(60)),
            // Dashboards (a browser opens up to six connections), integrators and probes,
            // well below the open-file limit the broker needs for mqtt.max_connections.
            max_connections: 1024,
        }
    }
}

/// Where the broker keeps its files.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Created at start if missing.
    pub dir: PathBuf,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            dir: PathBuf::from("var/broker"),
        }
    }
}

/// Logins: password hashing, the cache of verified logins, and failed-login limits.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// A verified login is remembered this long, so reconnects skip argon2.
    pub login_cache_ttl: HumanDuration,
    /// Failed logins of one user name within `failed_login_window` that lock it out.
    pub max_failed_logins: u32,
    pub failed_login_window: HumanDuration,
    /// Failed logins from one client address within `failed_login_window` that refuse every
    /// login from it for `lockout` (where the address is known: HTTP, MQTTS, and TCP with
    /// `mqtt.proxy_protocol`).
    pub max_failed_logins_per_address: u32,
    /// How long a locked-out name or address is refused.
    pub lockout: HumanDuration,
    /// Argon2 verifications run at once (each takes `hash_memory` and a core for a moment).
    pub verify_threads: usize,
    /// Logins that may wait for a verification slot; more are refused at once (MQTT:
    /// CONNACK 3) and retry later.
    pub verify_queue: usize,
    /// A user locked out by failures elsewhere still gets in from an address where it logged
    /// in successfully within this long.
    pub known_address_ttl: HumanDuration,
    /// Argon2id cost of new password hashes (`user add`); existing hashes keep theirs.
    pub hash_memory: ByteSize,
    pub hash_iterations: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            login_cache_ttl: HumanDuration(Duration::from_secs(300)),
            max_failed_logins: 10,
            failed_login_window: HumanDuration(Duration::from_secs(60)),
            max_failed_logins_per_address: 30,
            lockout: HumanDuration(Duration::from_secs(300)),
            verify_threads: 2,
            verify_queue: 64,
            known_address_ttl: HumanDuration(Duration::from_secs(24 * 3600)),
            // OWASP's argon2id baseline (19 MiB, 2 passes, 1 lane).
            hash_memory: ByteSize(19 * 1024 * 1024),
            hash_iterations: 2,
        }
    }
}

/// The recorder: batching of database writes and the quarantine of refused payloads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecorderConfig {
    /// Records waiting for the disk before ingest waits too.
    pub queue_capacity: usize,
    /// Most records in one transaction.
    pub batch_size: usize,
    /// How long a batch may wait to fill up.
    pub batch_time: HumanDuration,
    /// Refused payloads kept for inspection (the oldest go first).
    pub quarantine_rows: usize,
    /// Receipts published per second at most (see `crate::receipts`).
    pub receipt_rate: u32,
    /// The most the record (database and write-ahead log) may take; `"0"`: what the disk
    /// allows. Past it, or past `min_free`, batches are refused (counted; their senders keep
    /// them and send again); from 80 % of what the record may take an alarm is raised.
    pub max_bytes: ByteSize,
    /// Free space the record leaves on its disk, for the system and the rest (SQLite only:
    /// PostgreSQL's disk is its server's to watch).
    pub min_free: ByteSize,
    /// Keep the record in this PostgreSQL database instead of SQLite, shared by every
    /// instance of a clustered HQ (docs/scaling.md): a connection string,
    /// `postgresql://user@host:port/db` or `host=… user=… dbname=…`. Users stay in SQLite.
    pub postgres: Option<String>,
    /// The PostgreSQL user's password, on the file's first line (kept out of the string).
    pub postgres_password_file: Option<PathBuf>,
}

impl Default for RecorderConfig {
    fn default() -> Self {
        RecorderConfig {
            queue_capacity: 10_000,
            batch_size: 2_000,
            batch_time: HumanDuration(Duration::from_millis(200)),
            quarantine_rows: 10_000,
            receipt_rate: 500,
            max_bytes: ByteSize(0),
            min_free: ByteSize(64 * 1024 * 1024),
            postgres: None,
            postgres_password_file: None,
        }
    }
}

/// The rules that raise alerts (see [`crate::rules`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RulesConfig {
    /// Off when another system raises these alerts.
    pub enabled: bool,
    /// How often the rules look at the whole state (they also look soon after every change).
    pub evaluate_every: HumanDuration,
    /// Occupancy of an open shelter, in percent of capacity, that raises an alert.
    pub occupancy_pct: u64,
    /// Water or food stock below this many days of need raises an alert ("24h" = one day).
    pub stock_below: HumanDuration,
    /// A supply request still `requested` this long after it was made raises an alert.
    pub request_unanswered_after: HumanDuration,
}

impl Default for RulesConfig {
    fn default() -> Self {
        RulesConfig {
            enabled: true,
            evaluate_every: HumanDuration(Duration::from_secs(5)),
            occupancy_pct: 90,
            stock_below: HumanDuration(Duration::from_secs(24 * 3600)),
            request_unanswered_after: HumanDuration(Duration::from_secs(2 * 3600)),
        }
    }
}

/// External-broker mode: recorder, rules and HTTP against a broker run elsewhere (a cluster),
/// instead of the embedded one (see [`crate::external`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExternalConfig {
    /// `mqtt://HOST[:PORT]` or `mqtts://HOST[:PORT]`; set, it turns the mode on and the
    /// embedded listeners off.
    pub broker: Option<String>,
    /// PEM: the CA certificates an `mqtts://` broker's certificate must chain to; without it,
    /// the system's roots.
    pub ca_file: Option<PathBuf>,
    /// The broker's MQTT-over-WebSocket URL for browsers (`ws://…` or `wss://…`), when it has one.
    pub ws_url: Option<String>,
    /// The cluster's other MQTT-over-WebSocket URLs: a dashboard whose connection to `ws_url`
    /// is lost tries them in turn (`/config.json`, `mqtt_ws_failover`).
    pub ws_failover: Vec<String>,
    /// Login at the external broker; the password is the first line of `password_file`.
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Stable, unique per instance: the external broker keeps this session's subscription
    /// and queues its QoS 1 messages while the instance is away.
    pub client_id: String,
    /// Shared-subscription group (`$share/GROUP/renkei/v1/#`): instances in one group split
    /// the stream. Empty: a plain subscription, every instance gets every message.
    pub share_group: String,
    /// More MQTT addresses of the same cluster (`mqtt://` or `mqtts://`), tried in turn after
    /// `broker` when the one in use is lost: the session lives in the cluster, so the instance
    /// carries on through another node.
    pub failover: Vec<String>,
    /// A NATS JetStream cluster's servers (`nats://HOST:PORT`, any of them): set, ingest reads
    /// the replicated stream `stream` with a durable consumer named `client_id` and
    /// acknowledges each message only once it is committed, instead of subscribing over MQTT
    /// (docs/scaling.md). Logs in as `user`, the same login as over MQTT.
    pub jetstream: Vec<String>,
    /// The JetStream stream every `renkei/v1/…` message is kept in (made if missing).
    pub stream: String,
    /// Its replicas, when this instance makes it (3 on a three-node cluster).
    pub stream_replicas: usize,
}

impl Default for ExternalConfig {
    fn default() -> Self {
        ExternalConfig {
            broker: None,
            ca_file: None,
            ws_url: None,
            user: None,
            password_file: None,
            client_id: "renkei-broker".into(),
            share_group: "renkei".into(),
            failover: Vec::new(),
            ws_failover: Vec::new(),
            jetstream: Vec::new(),
            stream: "RENKEI".into(),
            stream_replicas: 3,
        }
    }
}

/// Ward mode: this broker serves one ward's office and forwards everything its own sites sent
/// to HQ's broker, from its record (see [`crate::uplink`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// HQ's broker, `mqtt://HOST[:PORT]` or `mqtts://HOST[:PORT]`; set, it turns ward mode on.
    pub broker: Option<String>,
    /// The ward this broker serves (its six-digit code, e.g. 131041); required in ward mode.
    /// Only its sites' messages are forwarded.
    pub ward: Option<renkei_shared::WardCode>,
    /// PEM: the CA certificates an `mqtts://` HQ's certificate must chain to.
    pub ca_file: Option<PathBuf>,
    /// The relay's login at HQ (a user of role `relay` bound to `ward`); the password is the
    /// first line of `password_file`. Without a user, the login is anonymous (an HQ in demo
    /// mode only).
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Records out to HQ and not yet named by its receipts, at most. HQ's receipts come every
    /// few seconds per site, so this bounds the drain rate (window / receipt delay).
    pub window: usize,
    /// Backlog records forwarded a second at most, after a cut; live records are never held.
    pub replay_rate: u32,
    /// What of the other 22 wards HQ sends down for this ward's dashboard: `"status"` (each
    /// site's heartbeat: who is up, power, comms), `"all"` (every site message) or `"none"`.
    /// HQ's alerts, its acknowledgements and its commands for this ward always come down.
    pub other_wards: OtherWards,
}

/// What of the other wards a ward broker takes from HQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OtherWards {
    None,
    #[default]
    Status,
    All,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            broker: None,
            ward: None,
            ca_file: None,
            user: None,
            password_file: None,
            window: 4096,
            replay_rate: 2000,
            other_wards: OtherWards::Status,
        }
    }
}

impl UpstreamConfig {
    /// The relay's MQTT client id at HQ: its user name (HQ allows a named user only its own
    /// name, or the name and a suffix), or `relay-{ward}` anonymously.
    pub fn client_id(&self) -> String {
        match (&self.user, self.ward) {
            (Some(user), _) => user.clone(),
            (None, Some(ward)) => format!("relay-{ward}"),
            (None, None) => "relay".into(),
        }
    }
}

/// The password in a `password_file` (external.password_file, upstream.password_file): its
/// first line.
pub fn read_password_file(path: &Path) -> std::io::Result<String> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned())
}

impl Config {
    /// Reads `path`, or returns the defaults when there is none.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            None => Ok(Config::default()),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Config::parse(&text).map_err(|(source, line)| ConfigError::InFile {
                    path: path.to_owned(),
                    line,
                    error: Box::new(source),
                })
            }
        }
    }

    /// Parses and checks a configuration.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text).map_err(|(error, _line)| error)
    }

    /// [`Config::from_toml`], with the line of the error where one line holds it.
    fn parse(text: &str) -> Result<Config, (ConfigError, Option<usize>)> {
        let line = |span: Option<Range<usize>>| span.map(|span| line_at(text, span.start));
        let de = toml::Deserializer::parse(text)
            .map_err(|e| (ConfigError::Syntax(one_line(e.message())), line(e.span())))?;
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let e = e.into_inner();
            let error = ConfigError::Invalid {
                // An error about the whole document has the empty path ".".
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                message: e.message().to_owned(),
            };
            (error, line(e.span()))
        })?;
        config.check().map_err(|e| {
            let line = match &e {
                ConfigError::Invalid { key, .. } => key_line(text, key),
                _ => None,
            };
            (e, line)
        })?;
        Ok(config)
    }

    /// Checks again what [`Config::load`] checked, after the command line changed it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check()
    }

    /// Checks what the types alone cannot.
    fn check(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| {
            Err(ConfigError::Invalid {
                key: key.into(),
                message,
            })
        };
        let m = &self.mqtt;
        let min_packet = MAX_FRAME + PACKET_HEADROOM;
        if m.max_packet_size.0 < min_packet {
            return invalid(
                "mqtt.max_packet_size",
                format!(
                    "{} is below {} (a Renkei frame plus its topic)",
                    m.max_packet_size,
                    ByteSize(min_packet)
                ),
            );
        }
        if m.segment_size.0 < m.max_packet_size.0 {
            return invalid(
                "mqtt.segment_size",
                format!(
                    "{} cannot hold one packet of mqtt.max_packet_size ({})",
                    m.segment_size, m.max_packet_size
                ),
            );
        }
        if m.segment_count == 0 {
            return invalid("mqtt.segment_count", "must be at least 1".into());
        }
        if m.ingest_queue_messages == 0 {
            return invalid("mqtt.ingest_queue_messages", "must be at least 1".into());
        }
        if m.ingest_queue_bytes.0 < m.max_packet_size.0 {
            return invalid(
                "mqtt.ingest_queue_bytes",
                format!(
                    "{} holds less than one packet of max_packet_size ({})",
                    m.ingest_queue_bytes, m.max_packet_size
                ),
            );
        }
        if m.max_connections == 0 {
            return invalid("mqtt.max_connections", "must be at least 1".into());
        }
        if m.max_inflight == 0 {
            return invalid("mqtt.max_inflight", "must be at least 1".into());
        }
        if m.connect_timeout.millis_u16().is_none() {
            return invalid(
                "mqtt.connect_timeout",
                format!("{} is not between 1ms and 65s", m.connect_timeout),
            );
        }
        if m.listen.port() != 0 && m.listen == m.ws_listen {
            return invalid(
                "mqtt.ws_listen",
                format!("{} is also mqtt.listen", m.ws_listen),
            );
        }
        match (&m.tls_cert_file, &m.tls_key_file) {
            (Some(_), None) => {
                return invalid(
                    "mqtt.tls_key_file",
                    "missing: mqtt.tls_cert_file is set, TLS needs both".into(),
                );
            }
            (None, Some(_)) => {
                return invalid(
                    "mqtt.tls_cert_file",
                    "missing: mqtt.tls_key_file is set, TLS needs both".into(),
                );
            }
            _ => {}
        }
        if m.tls_enabled()
            && m.tls_listen.port() != 0
            && (m.tls_listen == m.listen || m.tls_listen == m.ws_listen)
        {
            return invalid(
                "mqtt.tls_listen",
                format!("{} is also mqtt.listen or mqtt.ws_listen", m.tls_listen),
            );
        }
        let x = &self.external;
        if let Some(url) = &x.broker
            && let Err(error) = renkei_shared::url::BrokerUrl::parse(url)
        {
            return invalid("external.broker", error.to_string());
        }
        if let Some(url) = &x.ws_url
            && !(url.starts_with("ws://") || url.starts_with("wss://"))
        {
            return invalid(
                "external.ws_url",
                format!("{url:?} is not a ws:// or wss:// URL"),
            );
        }
        if let Some(url) = x
            .ws_failover
            .iter()
            .find(|url| !(url.starts_with("ws://") || url.starts_with("wss://")))
        {
            return invalid(
                "external.ws_failover",
                format!("{url:?} is not a ws:// or wss:// URL"),
            );
        }
        if !x.ws_failover.is_empty() && x.ws_url.is_none() {
            return invalid(
                "external.ws_url",
                "missing: external.ws_failover lists the others".into(),
            );
        }
        if x.password_file.is_some() && x.user.is_none() {
            return invalid(
                "external.user",
                "missing: external.password_file is set".into(),
            );
        }
        if x.client_id.is_empty() || x.client_id.len() > 23 * 4 {
            return invalid("external.client_id", "must be 1 to 92 bytes".into());
        }
        if x.share_group.contains(['/', '+', '#']) {
            return invalid(
                "external.share_group",
                format!("{:?} may not contain / + #", x.share_group),
            );
        }
        if let Some(conninfo) = &self.recorder.postgres
            && let Err(error) = crate::pg::parse(conninfo)
        {
            return invalid("recorder.postgres", error.to_string());
        }
        let u = &self.upstream;
        if let Some(url) = &u.broker {
            if let Err(error) = renkei_shared::url::BrokerUrl::parse(url) {
                return invalid("upstream.broker", error.to_string());
            }
            if self.recorder.postgres.is_some() {
                return invalid(
                    "upstream.broker",
                    "ward mode forwards from its own SQLite record: recorder.postgres is set too"
                        .into(),
                );
            }
            if x.broker.is_some() {
                return invalid(
                    "upstream.broker",
                    "ward mode needs the embedded broker: external.broker is set too".into(),
                );
            }
            match u.ward {
                None => {
                    return invalid(
                        "upstream.ward",
                        "missing: ward mode (upstream.broker) serves one ward".into(),
                    );
                }
                Some(ward) if !ward.is_known() => {
                    return invalid(
                        "upstream.ward",
                        format!("{ward} is not one of the 23 special wards"),
                    );
                }
                Some(_) => {}
            }
        }
        if u.password_file.is_some() && u.user.is_none() {
            return invalid(
                "upstream.user",
                "missing: upstream.password_file is set".into(),
            );
        }
        if u.window == 0 || u.window > 65_535 {
            return invalid("upstream.window", "must be between 1 and 65535".into());
        }
        if u.replay_rate == 0 {
            return invalid("upstream.replay_rate", "must be at least 1".into());
        }
        let r = &self.recorder;
        if r.receipt_rate == 0 {
            return invalid("recorder.receipt_rate", "must be at least 1".into());
        }
        if r.queue_capacity == 0 {
            return invalid("recorder.queue_capacity", "must be at least 1".into());
        }
        if r.batch_size == 0 {
            return invalid("recorder.batch_size", "must be at least 1".into());
        }
        let rules = &self.rules;
        if rules.evaluate_every.0 < Duration::from_millis(100) {
            return invalid("rules.evaluate_every", "must be at least 100ms".into());
        }
        if !(1..=1000).contains(&rules.occupancy_pct) {
            return invalid("rules.occupancy_pct", "must be between 1 and 1000".into());
        }
        let a = &self.auth;
        if a.max_failed_logins == 0 {
            return invalid("auth.max_failed_logins", "must be at least 1".into());
        }
        if a.verify_threads == 0 {
            return invalid("auth.verify_threads", "must be at least 1".into());
        }
        if a.hash_iterations == 0 {
            return invalid("auth.hash_iterations", "must be at least 1".into());
        }
        if a.hash_memory.0 < 8 * 1024 {
            return invalid("auth.hash_memory", "must be at least 8KiB".into());
        }
        if let Some(url) = &self.http.public_mqtt_ws_url
            && !(url.starts_with("ws://") || url.starts_with("wss://"))
        {
            return invalid(
                "http.public_mqtt_ws_url",
                format!("{url:?} is not a ws:// or wss:// URL"),
            );
        }
        let h = &self.http;
        // Zero would close every connection before its first request.
        if h.header_read_timeout.0 < Duration::from_millis(100) {
            return invalid("http.header_read_timeout", "must be at least 100ms".into());
        }
        if h.idle_timeout.0 < Duration::from_millis(100) {
            return invalid("http.idle_timeout", "must be at least 100ms".into());
        }
        if h.max_connections == 0 {
            return invalid("http.max_connections", "must be at least 1".into());
        }
        Ok(())
    }
}

fn one_line(message: &str) -> String {
    message.lines().map(str::trim).collect::<Vec<_>>().join(" ")
}

/// The line (from 1) of byte `offset` of `text`.
fn line_at(text: &str, offset: usize) -> usize {
    let before = text.get(..offset).unwrap_or(text);
    before.matches('\n').count() + 1
}

/// The line of `key` (`mqtt.listen`) in `text`, if the text gives that key.
fn key_line(text: &str, key: &str) -> Option<usize> {
    let root = toml::de::DeTable::parse(text).ok()?;
    let mut table = root.get_ref();
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let (name, value) = table.get_key_value(part)?;
        if parts.peek().is_none() {
            return Some(line_at(text, name.span().start));
        }
        table = value.get_ref().as_table()?;
    }
    None
}

/// A size in bytes as rumqttd and argon2 take it (`usize`), written as
/// [`renkei_shared::units`] reads sizes: `20480`, `"20KiB"`, `"1MiB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "units::ByteSize")]
pub struct ByteSize(pub usize);

impl TryFrom<units::ByteSize> for ByteSize {
    type Error = String;
    fn try_from(size: units::ByteSize) -> Result<Self, Self::Error> {
        usize::try_from(size.0)
            .map(ByteSize)
            .map_err(|_| format!("{size} is too large for this machine"))
    }
}

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let size: units::ByteSize = s.parse().map_err(|e: UnitError| e.to_string())?;
        size.try_into()
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        units::ByteSize(self.0 as u64).fmt(f)
    }
}

/// A duration, written as [`renkei_shared::units`] reads durations: `"500ms"`, `"5s"`, `"2m"`,
/// `"1h"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(from = "units::HumanDuration")]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    /// The duration in milliseconds, if it fits rumqttd's `u16` and is not zero.
    pub fn millis_u16(self) -> Option<u16> {
        u16::try_from(self.0.as_millis()).ok().filter(|&ms| ms > 0)
    }
}

impl From<units::HumanDuration> for HumanDuration {
    fn from(d: units::HumanDuration) -> Self {
        HumanDuration(d.0)
    }
}

impl FromStr for HumanDuration {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        units::parse_duration(s).map(HumanDuration)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        units::HumanDuration(self.0).fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invalid(text: &str) -> (String, String) {
        match Config::from_toml(text) {
            Err(ConfigError::Invalid { key, message }) => (key, message),
            other => panic!("expected an invalid key, got {other:?}"),
        }
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
        assert_eq!(Config::load(None).unwrap(), Config::default());
    }

    #[test]
    fn defaults_pass_their_own_checks() {
        Config::default().check().unwrap();
        let m = MqttConfig::default();
        assert_eq!(m.listen.port(), 1883);
        assert_eq!(m.ws_listen.port(), 8083);
        assert_eq!(HttpConfig::default().listen.port(), 8080);
        assert!(m.max_packet_size.0 > MAX_FRAME);
    }

    #[test]
    fn the_example_file_is_valid_and_matches_the_defaults() {
        let text = include_str!("../../docs/broker.example.toml");
        assert_eq!(Config::from_toml(text).unwrap(), Config::default());
    }

    #[test]
    fn a_postgresql_record_needs_a_connection_string_and_no_ward_mode() {
        let ok = Config::from_toml(
            "[recorder]\npostgres = \"host=db.hq port=5432 user=renkei dbname=renkei\"\n",
        )
        .unwrap();
        assert!(ok.recorder.postgres.is_some());
        for (text, key) in [
            (
                "[recorder]\npostgres = \"postgresql://renkei:secret@[db\"\n",
                "recorder.postgres",
            ),
            (
                "[recorder]\npostgres = \"postgresql://db/renkei\"\n[upstream]\n\
                 broker = \"mqtt://hq\"\nward = 131041\n",
                "upstream.broker",
            ),
        ] {
            match Config::from_toml(text) {
                Err(ConfigError::Invalid { key: k, message }) => {
                    assert_eq!(k, key, "{message}");
                    assert!(!message.contains("secret"), "{message}");
                }
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn ward_mode_needs_a_known_ward_and_the_embedded_broker() {
        let ok = Config::from_toml(
            "[upstream]\nbroker = \"mqtt://hq:1883\"\nward = 131041\nuser = \"relay-shinjuku\"\n\
             other_wards = \"all\"\n",
        )
        .unwrap();
        assert_eq!(ok.upstream.client_id(), "relay-shinjuku");
        assert_eq!(ok.upstream.other_wards, OtherWards::All);
        for (text, key, says) in [
            (
                "[upstream]\nbroker = \"mqtt://hq\"\n",
                "upstream.ward",
                "missing",
            ),
            (
                "[upstream]\nbroker = \"mqtt://hq\"\nward = 131999\n",
                "upstream.ward",
                "23 special wards",
            ),
            (
                "[upstream]\nbroker = \"http://hq\"\nward = 131041\n",
                "upstream.broker",
                "",
            ),
            (
                "[upstream]\nbroker = \"mqtt://hq\"\nward = 131041\n[external]\nbroker = \"mqtt://c\"\n",
                "upstream.broker",
                "embedded",
            ),
            ("[upstream]\nwindow = 0\n", "upstream.window", "between"),
            (
                "[upstream]\npassword_file = \"/p\"\n",
                "upstream.user",
                "missing",
            ),
            (
                "[upstream]\nother_wards = \"some\"\n",
                "upstream.other_wards",
                "",
            ),
        ] {
            let (k, message) = invalid(text);
            assert_eq!(k, key, "{text}: {message}");
            assert!(message.contains(says), "{text}: {message}");
        }
        let anonymous = UpstreamConfig {
            ward: Some(renkei_shared::WardCode(131041)),
            ..UpstreamConfig::default()
        };
        assert_eq!(anonymous.client_id(), "relay-131041");
    }

    #[test]
    fn reads_human_units() {
        let c = Config::from_toml(
            r#"
            [mqtt]
            listen = "127.0.0.1:0"
            max_packet_size = "64KiB"
            segment_size = 2097152
            connect_timeout = "1500ms"
            [http]
            dashboard_dir = "/srv/renkei/dist"
            public_mqtt_ws_url = "wss://renkei.example/mqtt"
            header_read_timeout = "2500ms"
            idle_timeout = "2m"
            max_connections = 64
            "#,
        )
        .unwrap();
        assert_eq!(c.mqtt.listen, "127.0.0.1:0".parse().unwrap());
        assert_eq!(c.mqtt.max_packet_size, ByteSize(64 * 1024));
        assert_eq!(c.mqtt.segment_size, ByteSize(2 * 1024 * 1024));
        assert_eq!(c.mqtt.connect_timeout.millis_u16(), Some(1500));
        assert_eq!(c.http.dashboard_dir, PathBuf::from("/srv/renkei/dist"));
        assert_eq!(c.http.header_read_timeout.0, Duration::from_millis(2500));
        assert_eq!(c.http.idle_timeout.0, Duration::from_secs(120));
        assert_eq!(c.http.max_connections, 64);
        assert_eq!(c.data, DataConfig::default());
    }

    #[test]
    fn unknown_keys_are_named() {
        let (key, message) = invalid("[mqtt]\nlisten_addr = \"0.0.0.0:1\"\n");
        assert_eq!(key, "mqtt.listen_addr");
        assert!(message.contains("unknown field"), "{message}");
        let (key, message) = invalid("[mqqt]\n");
        assert_eq!(key, "mqqt");
        assert!(message.contains("mqqt"), "{message}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let (key, message) = invalid("[mqtt]\nlisten = \"localhost\"\n");
        assert_eq!(key, "mqtt.listen");
        assert!(message.contains("socket address"), "{message}");
        let (key, message) = invalid("[mqtt]\nmax_packet_size = \"20 parsecs\"\n");
        assert_eq!(key, "mqtt.max_packet_size");
        assert!(message.contains("parsecs"), "{message}");
        let (key, _) = invalid("[http]\nlisten = 8080\n");
        assert_eq!(key, "http.listen");
        let (key, _) = invalid("[mqtt]\nconnect_timeout = \"5 fortnights\"\n");
        assert_eq!(key, "mqtt.connect_timeout");
    }

    #[test]
    fn checks_ranges_and_names_the_key() {
        assert_eq!(
            invalid("[mqtt]\nmax_packet_size = \"1KiB\"\n").0,
            "mqtt.max_packet_size"
        );
        assert_eq!(
            invalid("[mqtt]\nsegment_size = \"8KiB\"\n").0,
            "mqtt.segment_size"
        );
        assert_eq!(
            invalid("[mqtt]\nconnect_timeout = \"2m\"\n").0,
            "mqtt.connect_timeout"
        );
        assert_eq!(
            invalid("[mqtt]\nlisten = \"0.0.0.0:1\"\nws_listen = \"0.0.0.0:1\"\n").0,
            "mqtt.ws_listen"
        );
        assert_eq!(
            invalid("[mqtt]\ntls_cert_file = \"c.pem\"\n").0,
            "mqtt.tls_key_file"
        );
        assert_eq!(
            invalid("[mqtt]\ntls_key_file = \"k.pem\"\n").0,
            "mqtt.tls_cert_file"
        );
        assert_eq!(
            invalid(
                "[mqtt]\ntls_cert_file = \"c\"\ntls_key_file = \"k\"\ntls_listen = \"0.0.0.0:1883\"\n"
            )
            .0,
            "mqtt.tls_listen"
        );
        assert_eq!(
            invalid("[http]\npublic_mqtt_ws_url = \"http://x\"\n").0,
            "http.public_mqtt_ws_url"
        );
        assert_eq!(
            invalid("[http]\nheader_read_timeout = \"0s\"\n").0,
            "http.header_read_timeout"
        );
        assert_eq!(
            invalid("[http]\nidle_timeout = \"0s\"\n").0,
            "http.idle_timeout"
        );
        assert_eq!(
            invalid("[http]\nmax_connections = 0\n").0,
            "http.max_connections"
        );
    }

    #[test]
    fn syntax_errors_are_reported_on_one_line() {
        match Config::from_toml("[mqtt\n") {
            Err(ConfigError::Syntax(message)) => assert!(!message.contains('\n')),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_in_a_file_name_the_file_the_line_and_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.toml");
        let error_in = |text: &str| {
            std::fs::write(&path, text).unwrap();
            Config::load(Some(&path)).unwrap_err().to_string()
        };
        let file = path.display();
        // A value of the wrong form: the line of the value.
        assert_eq!(
            error_in("[mqtt]\nlisten = \"0.0.0.0:1883\"\n\nmax_packet_size = \"20 parsecs\"\n"),
            format!(
                "config file {file}, line 4: config key mqtt.max_packet_size: unknown size unit \
                 \"parsecs\" (use B, KiB, MiB or GiB)"
            )
        );
        // A value the checks refuse: the line of its key.
        assert_eq!(
            error_in("[http]\nlisten = \"0.0.0.0:8080\"\n[rules]\noccupancy_pct = 0\n"),
            format!(
                "config file {file}, line 4: config key rules.occupancy_pct: must be between 1 \
                 and 1000"
            )
        );
        // Written inline, the table's key is on the line of the table.
        assert_eq!(
            error_in("mqtt = { connect_timeout = \"5\" }\n"),
            format!(
                "config file {file}, line 1: config key mqtt.connect_timeout: 5 has no unit: \
                 write 5ms, 5s, 5m or 5h"
            )
        );
        // An unknown key: the line of the key.
        assert_eq!(
            error_in("\n[auth]\nlockout = \"5m\"\nlock_out = \"5m\"\n")
                .split(", expected")
                .next()
                .unwrap(),
            format!(
                "config file {file}, line 4: config key auth.lock_out: unknown field `lock_out`"
            )
        );
        // Not TOML at all: the line where it stops being TOML.
        assert_eq!(
            error_in("[mqtt]\nlisten = \"0.0.0.0:1883\"\n[http\n"),
            format!(
                "config file {file}, line 3: config is not valid TOML: unclosed table, expected \
                 `]`"
            )
        );
        // A rule between two keys belongs to neither line.
        let msg = error_in("[mqtt]\ntls_cert_file = \"c.pem\"\n");
        assert_eq!(
            msg,
            format!(
                "config file {file}: config key mqtt.tls_key_file: missing: mqtt.tls_cert_file \
                 is set, TLS needs both"
            )
        );
    }

    #[test]
    fn every_unit_spelling_reads_in_the_file() {
        for (text, bytes) in [
            ("20480", 20 << 10),
            ("\"20480\"", 20 << 10),
            ("\"20480B\"", 20 << 10),
            ("\"20K\"", 20 << 10),
            ("\"20k\"", 20 << 10),
            ("\"20KiB\"", 20 << 10),
            ("\"20 KiB\"", 20 << 10),
            ("\"1M\"", 1 << 20),
            ("\"1MiB\"", 1 << 20),
            ("\"1G\"", 1 << 30),
            ("\"1GiB\"", 1 << 30),
        ] {
            let c = Config::from_toml(&format!(
                "[mqtt]\nmax_packet_size = {text}\nsegment_size = \"1GiB\"\ningest_queue_bytes = \"1GiB\"\n"
            ))
            .unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(c.mqtt.max_packet_size, ByteSize(bytes), "{text}");
        }
        for (text, d) in [
            ("150ms", Duration::from_millis(150)),
            ("2s", Duration::from_secs(2)),
            ("2 s", Duration::from_secs(2)),
            ("3m", Duration::from_secs(180)),
            ("3min", Duration::from_secs(180)),
            ("4h", Duration::from_secs(4 * 3600)),
        ] {
            let c = Config::from_toml(&format!("[recorder]\nbatch_time = {text:?}\n")).unwrap();
            assert_eq!(c.recorder.batch_time, HumanDuration(d), "{text}");
        }
        for bad in ["\"2\"", "2", "\"2d\"", "\"1.5s\"", "\"2 hours\""] {
            let (key, _) = invalid(&format!("[recorder]\nbatch_time = {bad}\n"));
            assert_eq!(key, "recorder.batch_time", "{bad}");
        }
    }

    #[test]
    fn unit_parsers() {
        assert_eq!("0".parse::<ByteSize>(), Ok(ByteSize(0)));
        assert_eq!("3 MiB".parse::<ByteSize>(), Ok(ByteSize(3 << 20)));
        assert!("KiB".parse::<ByteSize>().is_err());
        assert!("1TiB".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(20 * 1024).to_string(), "20KiB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
        assert_eq!(
            "2m".parse::<HumanDuration>(),
            Ok(HumanDuration(Duration::from_secs(120)))
        );
        assert!("5".parse::<HumanDuration>().is_err());
        assert_eq!(HumanDuration(Duration::from_millis(0)).millis_u16(), None);
    }
}
