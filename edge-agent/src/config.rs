//! Settings of `renkei-agent run`: from a TOML file, overridden by command-line flags.
//!
//! The file and the flags fill the same [`RawConfig`] (every value as text, the keys named
//! like the flags with `_` for `-`), so both go through one parser and every error names the
//! key and the value that is wrong. [`RawConfig::resolve`] turns it into an [`AgentConfig`].
//!
//! ```toml
//! broker = "mqtt://hq.example:1883"   # or mqtts://… with ca_file
//! ca_file = "/etc/renkei/hq-ca.pem"   # mqtts:// only, then required
//! ward = 131041                  # or "13104"; the 23 special wards only
//! site = "nishi-shinjuku-es"     # 1–64 of A–Z a–z 0–9 _ -
//! name = "西新宿小学校"
//! kind = "shelter"               # ward_office | shelter | depot
//! interval = "30s"               # heartbeat: ms, s, m, h
//! mode = "actual"                # actual | exercise | test
//! state_dir = "/var/lib/renkei"  # default ./var/agent-{site}
//! location = "35.6895,139.6917"  # optional, WGS84 degrees
//! username = "agent-131041-nishi-shinjuku-es"
//! password = "…"                 # or RENKEI_AGENT_PASSWORD
//! evacuees = 120                 # shelters only
//! capacity = 450
//! shelter_state = "open"         # not_open | preparing | open | closed | unknown
//! outbox_max = "16MiB"           # byte budget of undelivered messages
//! replay_rate = 10               # backlog messages per second after an outage
//! confirm = "receipt"            # receipt: kept until HQ has stored it | puback: until the broker took it
//! disk_reserve = "1MiB"          # free disk never used; reports refused below it
//! form_listen = "0.0.0.0:8090"   # the staff web form (--form); off by default
//! form_pin = "…"                 # 6–64 digits, or RENKEI_AGENT_FORM_PIN
//! form_hosts = "renkei.local"    # names the form also answers to (comma-separated)
//! form_max_connections = 128     # then the longest-idle connection makes room
//! form_header_timeout = "10s"    # a request's head, then its body, each within this
//! form_idle_timeout = "30s"      # a connection with no request in progress is closed
//! form_pin_attempts = 5          # wrong PINs from one device within form_pin_window …
//! form_pin_window = "10m"
//! form_pin_lockout = "15m"       # … lock its PIN entry for this long
//! power = "generator"            # when the OS does not say: grid | generator | battery | none
//! battery_pct = 80               # when the OS does not say
//! power_supply_dir = "/sys/class/power_supply"   # "" = do not read the OS
//! hq = "established"             # none | alert | established | dissolved | unknown
//! internet = "ok"                # also mobile, landline, radio: ok | degraded | down
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use renkei_shared::validate::MAX_NAME_BYTES;
use renkei_shared::{
    Comms, GeoPoint, HqState, Id, LinkState, Mode, PowerSource, ShelterState, SiteKind, SiteRef,
    WardCode,
};
use serde::{Deserialize, Deserializer, Serialize};

use crate::form::FormLimits;
use crate::power::{DEFAULT_POWER_SUPPLY_DIR, PowerProbe};

/// Heartbeat interval when none is given.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
/// Port of a `mqtt://` address without one.
pub const DEFAULT_MQTT_PORT: u16 = 1883;
/// Port of a `mqtts://` address without one.
pub const DEFAULT_MQTTS_PORT: u16 = 8883;
/// Backlog replay rate when none is given (messages per second).
pub const DEFAULT_REPLAY_RATE: u32 = 10;
/// The smallest outbox budget: one segment.
pub const MIN_OUTBOX: u64 = 64 * 1024;
/// The longest heartbeat interval a status can carry (one day).
pub const MAX_INTERVAL: Duration = Duration::from_secs(86_400);

/// What tells the agent a record has been delivered, so that it may leave the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Confirm {
    /// A receipt from HQ's recorder (`renkei_shared::receipt`): the message is on HQ's disk.
    #[default]
    Receipt,
    /// The broker's PUBACK alone: for a broker that sends no receipts. A broker that fails
    /// between its PUBACK and its own write loses the message.
    PubAck,
}

/// Why the settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has a key this agent does not know.
    #[error("config file {}: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    /// A setting without a default was given nowhere.
    #[error("missing {key}: give --{} or `{key} = …` in the config file", key.replace('_', "-"))]
    Missing { key: &'static str },
    /// A setting has a value that cannot be used.
    #[error("{key} = {value:?}: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
    /// An invalid setting that came from the config file (not from a flag).
    #[error("config file {}: {source}", path.display())]
    InFile {
        path: PathBuf,
        source: Box<ConfigError>,
    },
}

fn invalid(key: &'static str, value: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// Settings as given, before checking. Filled by the config file and by the flags alike.
/// (Serialize: only to tell which keys a file gave, for errors that name the file.)
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize, Serialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Broker address: mqtt://HOST[:PORT], or mqtts://HOST[:PORT] for TLS (needs --ca-file)
    #[arg(long, value_name = "URL")]
    #[serde(default, deserialize_with = "scalar")]
    pub broker: Option<String>,
    /// PEM file of the CA that signed the broker's certificate (mqtts:// only)
    #[arg(long, value_name = "FILE")]
    #[serde(default, deserialize_with = "scalar")]
    pub ca_file: Option<String>,
    /// Ward code, six digits (131041) or five (13104)
    #[arg(long, value_name = "CODE")]
    #[serde(default, deserialize_with = "scalar")]
    pub ward: Option<String>,
    /// Site id within Renkei (A–Z a–z 0–9 _ -)
    #[arg(long, value_name = "ID")]
    #[serde(default, deserialize_with = "scalar")]
    pub site: Option<String>,
    /// The site's name as staff know it
    #[arg(long)]
    #[serde(default, deserialize_with = "scalar")]
    pub name: Option<String>,
    /// ward_office | shelter | depot [default: shelter]
    #[arg(long)]
    #[serde(default, deserialize_with = "scalar")]
    pub kind: Option<String>,
    /// Heartbeat interval, e.g. 30s, 2m [default: 30s]
    #[arg(long, value_name = "DURATION")]
    #[serde(default, deserialize_with = "scalar")]
    pub interval: Option<String>,
    /// actual | exercise | test [default: actual]
    #[arg(long)]
    #[serde(default, deserialize_with = "scalar")]
    pub mode: Option<String>,
    /// Where the boot id is kept [default: ./var/agent-{site}]
    #[arg(long, value_name = "DIR")]
    #[serde(default, deserialize_with = "scalar")]
    pub state_dir: Option<String>,
    /// The site's position, "LAT,LON" in degrees
    #[arg(long, value_name = "LAT,LON", allow_hyphen_values = true)]
    #[serde(default, deserialize_with = "scalar")]
    pub location: Option<String>,
    /// MQTT user name
    #[arg(long)]
    #[serde(default, deserialize_with = "scalar")]
    pub username: Option<String>,
    /// MQTT password
    #[arg(long, env = "RENKEI_AGENT_PASSWORD", hide_env_values = true)]
    #[serde(default, deserialize_with = "scalar")]
    pub password: Option<String>,
    /// Evacuees now at the shelter
    #[arg(long, value_name = "N")]
    #[serde(default, deserialize_with = "scalar")]
    pub evacuees: Option<String>,
    /// The shelter's planned capacity
    #[arg(long, value_name = "N")]
    #[serde(default, deserialize_with = "scalar")]
    pub capacity: Option<String>,
    /// not_open | preparing | open | closed | unknown [default: open with evacuees, else unknown]
    #[arg(long, value_name = "STATE")]
    #[serde(default, deserialize_with = "scalar")]
    pub shelter_state: Option<String>,
    /// Byte budget of the outbox, e.g. 16MiB [default: 16MiB]
    #[arg(long, value_name = "SIZE")]
    #[serde(default, deserialize_with = "scalar")]
    pub outbox_max: Option<String>,
    /// Messages per second when replaying the backlog after an outage [default: 10]
    #[arg(long, value_name = "N")]
    #[serde(default, deserialize_with = "scalar")]
    pub replay_rate: Option<String>,
    /// When a record leaves the outbox: receipt (HQ stored it) | puback (the broker took it;
    /// for a broker without Renkei's recorder) [default: receipt]
    #[arg(long, value_name = "WHEN")]
    #[serde(default, deserialize_with = "scalar")]
    pub confirm: Option<String>,
    /// Free disk space the outbox never uses; reports are refused below it [default: 1MiB]
    #[arg(long, value_name = "SIZE")]
    #[serde(default, deserialize_with = "scalar")]
    pub disk_reserve: Option<String>,
    /// Serve the staff web form on ADDR, e.g. 0.0.0.0:8090 [default: off]
    #[arg(long = "form", value_name = "ADDR")]
    #[serde(default, deserialize_with = "scalar")]
    pub form_listen: Option<String>,
    /// PIN the web form asks for before it saves a report: 6–64 digits [default: none]
    #[arg(
        long,
        value_name = "PIN",
        env = "RENKEI_AGENT_FORM_PIN",
        hide_env_values = true
    )]
    #[serde(default, deserialize_with = "scalar")]
    pub form_pin: Option<String>,
    /// Host names the web form answers to besides its addresses and localhost, comma-separated
    /// (a name staff type, or a proxy's) [default: none]
    #[arg(long, value_name = "NAMES")]
    #[serde(default, deserialize_with = "scalar")]
    pub form_hosts: Option<String>,
    /// Connections the web form holds at most; then the longest-idle one makes room
    /// [default: 128]
    #[arg(long, value_name = "N")]
    #[serde(default, deserialize_with = "scalar")]
    pub form_max_connections: Option<String>,
    /// Time a request's head, and then its body, may take to arrive [default: 10s]
    #[arg(long, value_name = "DURATION")]
    #[serde(default, deserialize_with = "scalar")]
    pub form_header_timeout: Option<String>,
    /// A web form connection with no request in progress for this long is closed [default: 30s]
    #[arg(long, value_name = "DURATION")]
    #[serde(default, deserialize_with = "scalar")]
    pub form_idle_timeout: Option<String>,
    /// Wrong PINs from one device within --form-pin-window that lock its PIN entry [default: 5]
    #[arg(long, value_name = "N")]
    #[serde(default, deserialize_with = "scalar")]
    pub form_pin_attempts: Option<String>,
    /// The window in which wrong PINs are counted [default: 10m]
    #[arg(long, value_name = "DURATION")]
    #[serde(default, deserialize_with = "scalar")]
    pub form_pin_window: Option<String>,
    /// How long PIN entry stays locked [default: 15m]
    #[arg(long, value_name = "DURATION")]
    #[serde(default, deserialize_with = "scalar")]
    pub form_pin_lockout: Option<String>,
    /// Power source when the OS does not say: grid | generator | battery | none | unknown
    #[arg(long, value_name = "SOURCE")]
    #[serde(default, deserialize_with = "scalar")]
    pub power: Option<String>,
    /// Battery charge in percent when the OS does not say
    #[arg(long, value_name = "PCT")]
    #[serde(default, deserialize_with = "scalar")]
    pub battery_pct: Option<String>,
    /// The ward's disaster HQ as the site knows it: none | alert | established | dissolved | unknown
    #[arg(long, value_name = "STATE")]
    #[serde(default, deserialize_with = "scalar")]
    pub hq: Option<String>,
    /// Internet link: ok | degraded | down [default: not reported]
    #[arg(long, value_name = "STATE")]
    #[serde(default, deserialize_with = "scalar")]
    pub internet: Option<String>,
    /// Mobile network: ok | degraded | down [default: not reported]
    #[arg(long, value_name = "STATE")]
    #[serde(default, deserialize_with = "scalar")]
    pub mobile: Option<String>,
    /// Landline: ok | degraded | down [default: not reported]
    #[arg(long, value_name = "STATE")]
    #[serde(default, deserialize_with = "scalar")]
    pub landline: Option<String>,
    /// 防災行政無線 radio: ok | degraded | down [default: not reported]
    #[arg(long, value_name = "STATE")]
    #[serde(default, deserialize_with = "scalar")]
    pub radio: Option<String>,
    /// Where the OS lists power supplies; "" turns reading off [default: /sys/class/power_supply]
    #[arg(long, value_name = "DIR")]
    #[serde(default, deserialize_with = "scalar")]
    pub power_supply_dir: Option<String>,
}

/// Accepts a TOML string, integer, float or boolean as text, so `ward = 131041` and
/// `ward = "131041"` both work and the value is checked by the same parser as the flag.
fn scalar<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Int(i64),
        Float(f64),
        Bool(bool),
    }
    Ok(Some(match Scalar::deserialize(d)? {
        Scalar::Text(s) => s,
        Scalar::Int(n) => n.to_string(),
        Scalar::Float(x) => x.to_string(),
        Scalar::Bool(b) => b.to_string(),
    }))
}

/// A broker's network address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
    /// `mqtts://`: the connection is TLS, checked against the configured CA.
    pub tls: bool,
}

impl std::fmt::Display for BrokerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// MQTT user name and password.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    // Never print the password into a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// What a shelter's staff gave at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShelterInput {
    pub state: ShelterState,
    pub evacuees: Option<u32>,
    pub capacity: Option<u32>,
}

/// Checked settings of one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    pub broker: BrokerAddr,
    /// The CA the broker's certificate must chain to; `Some` exactly when the broker is TLS.
    pub ca_file: Option<PathBuf>,
    pub credentials: Option<Credentials>,
    pub site: SiteRef,
    pub name: String,
    pub kind: SiteKind,
    pub location: Option<GeoPoint>,
    pub interval: Duration,
    pub mode: Mode,
    /// Holds the boot id, which must survive restarts.
    pub state_dir: PathBuf,
    /// `Some` for a shelter whose staff gave any of its figures.
    pub shelter: Option<ShelterInput>,
    /// Byte budget of the outbox.
    pub outbox_max: u64,
    /// Backlog messages per second after a reconnect, so a thin link is not swamped.
    pub replay_rate: u32,
    /// What removes a delivered record from the outbox.
    pub confirm: Confirm,
    /// Free bytes kept on the outbox's disk: reports are refused (with the alarm) below it.
    pub disk_reserve: u64,
    /// Where the staff web form listens, if anywhere.
    pub form_listen: Option<std::net::SocketAddr>,
    /// What the web form asks for before it saves, if anything.
    pub form_pin: Option<FormPin>,
    /// Host names the web form answers to besides its addresses and `localhost`.
    pub form_hosts: Vec<String>,
    /// The web form's connection, timeout and PIN-attempt limits.
    pub form_limits: FormLimits,
    /// Where the heartbeat's power source and battery charge come from.
    pub power: PowerProbe,
    /// The ward HQ's state as staff gave it; unknown otherwise.
    pub hq: HqState,
    /// The site's channels as staff gave them; `None` for those not given.
    pub comms: Comms,
}

/// The web form's PIN; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct FormPin(pub String);

impl std::fmt::Debug for FormPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FormPin(…)")
    }
}

impl RawConfig {
    /// Reads a config file.
    pub fn from_file(path: &Path) -> Result<RawConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        RawConfig::from_toml(&text).map_err(|message| ConfigError::Syntax {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses config text; the error names the line and key (toml's message).
    pub fn from_toml(text: &str) -> Result<RawConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// These settings, with `fallback`'s where these have none (flags over file).
    pub fn or(self, fallback: RawConfig) -> RawConfig {
        RawConfig {
            broker: self.broker.or(fallback.broker),
            ca_file: self.ca_file.or(fallback.ca_file),
            ward: self.ward.or(fallback.ward),
            site: self.site.or(fallback.site),
            name: self.name.or(fallback.name),
            kind: self.kind.or(fallback.kind),
            interval: self.interval.or(fallback.interval),
            mode: self.mode.or(fallback.mode),
            state_dir: self.state_dir.or(fallback.state_dir),
            location: self.location.or(fallback.location),
            username: self.username.or(fallback.username),
            password: self.password.or(fallback.password),
            evacuees: self.evacuees.or(fallback.evacuees),
            capacity: self.capacity.or(fallback.capacity),
            shelter_state: self.shelter_state.or(fallback.shelter_state),
            outbox_max: self.outbox_max.or(fallback.outbox_max),
            replay_rate: self.replay_rate.or(fallback.replay_rate),
            confirm: self.confirm.or(fallback.confirm),
            disk_reserve: self.disk_reserve.or(fallback.disk_reserve),
            form_listen: self.form_listen.or(fallback.form_listen),
            form_pin: self.form_pin.or(fallback.form_pin),
            form_hosts: self.form_hosts.or(fallback.form_hosts),
            form_max_connections: self.form_max_connections.or(fallback.form_max_connections),
            form_header_timeout: self.form_header_timeout.or(fallback.form_header_timeout),
            form_idle_timeout: self.form_idle_timeout.or(fallback.form_idle_timeout),
            form_pin_attempts: self.form_pin_attempts.or(fallback.form_pin_attempts),
            form_pin_window: self.form_pin_window.or(fallback.form_pin_window),
            form_pin_lockout: self.form_pin_lockout.or(fallback.form_pin_lockout),
            power: self.power.or(fallback.power),
            battery_pct: self.battery_pct.or(fallback.battery_pct),
            hq: self.hq.or(fallback.hq),
            internet: self.internet.or(fallback.internet),
            mobile: self.mobile.or(fallback.mobile),
            landline: self.landline.or(fallback.landline),
            radio: self.radio.or(fallback.radio),
            power_supply_dir: self.power_supply_dir.or(fallback.power_supply_dir),
        }
    }

    /// Checks every setting and fills the defaults.
    pub fn resolve(&self) -> Result<AgentConfig, ConfigError> {
        let required = |key, v: &Option<String>| v.clone().ok_or(ConfigError::Missing { key });

        let broker = parse_broker("broker", &required("broker", &self.broker)?)?;
        let ca_file = match (&self.ca_file, broker.tls) {
            (Some(f), _) if f.is_empty() => return Err(invalid("ca_file", f, "must not be empty")),
            (Some(f), true) => Some(PathBuf::from(f)),
            (None, false) => None,
            (None, true) => {
                return Err(invalid(
                    "broker",
                    self.broker.as_deref().unwrap_or_default(),
                    "mqtts:// needs ca_file (--ca-file): the PEM file of the CA that signed \
                     the broker's certificate",
                ));
            }
            (Some(f), false) => {
                return Err(invalid(
                    "ca_file",
                    f,
                    "only used with an mqtts:// broker; the broker is plain mqtt://",
                ));
            }
        };
        let ward_text = required("ward", &self.ward)?;
        let ward: WardCode =
            ward_text
                .parse()
                .map_err(|e: renkei_shared::ward::WardCodeError| {
                    invalid("ward", &ward_text, e.to_string())
                })?;
        let site_text = required("site", &self.site)?;
        let site = Id::new(site_text.clone())
            .map_err(|_| invalid("site", &site_text, "1–64 characters of A–Z a–z 0–9 _ -"))?;
        let name = required("name", &self.name)?;
        if name.trim().is_empty() {
            return Err(invalid("name", &name, "must not be empty"));
        }
        if name.len() > MAX_NAME_BYTES {
            return Err(invalid(
                "name",
                &name,
                format!("longer than {MAX_NAME_BYTES} bytes"),
            ));
        }
        let kind = match &self.kind {
            Some(k) => parse_kind("kind", k)?,
            None => SiteKind::Shelter,
        };
        let interval = match &self.interval {
            Some(i) => parse_interval("interval", i)?,
            None => DEFAULT_INTERVAL,
        };
        let mode = match &self.mode {
            Some(m) => parse_mode("mode", m)?,
            None => Mode::Actual,
        };
        let state_dir = match &self.state_dir {
            Some(d) if d.is_empty() => return Err(invalid("state_dir", d, "must not be empty")),
            Some(d) => PathBuf::from(d),
            None => PathBuf::from(format!("./var/agent-{site}")),
        };
        let location = self
            .location
            .as_deref()
            .map(|l| parse_location("location", l))
            .transpose()?;
        let outbox_max = match &self.outbox_max {
            Some(v) => parse_size(v).filter(|&n| n >= MIN_OUTBOX).ok_or_else(|| {
                invalid("outbox_max", v, "expected a size from 64KiB, e.g. 16MiB")
            })?,
            None => crate::outbox::DEFAULT_MAX_BYTES,
        };
        let replay_rate = match &self.replay_rate {
            Some(v) => v
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=10_000).contains(n))
                .ok_or_else(|| {
                    invalid("replay_rate", v, "expected messages per second, 1–10000")
                })?,
            None => DEFAULT_REPLAY_RATE,
        };
        let confirm = match self.confirm.as_deref().map(str::trim) {
            None | Some("receipt") => Confirm::Receipt,
            Some("puback") => Confirm::PubAck,
            Some(v) => return Err(invalid("confirm", v, "expected receipt or puback")),
        };
        let form_listen = self
            .form_listen
            .as_deref()
            .map(|a| {
                a.trim().parse::<std::net::SocketAddr>().map_err(|_| {
                    invalid("form_listen", a, "expected ADDRESS:PORT, e.g. 0.0.0.0:8090")
                })
            })
            .transpose()?;
        let form_pin = match self.form_pin.as_deref().map(str::trim) {
            // At least six digits: a million guesses, where the form's lockout allows a few
            // per quarter hour. Digits only: what the form's numeric keypad types.
            Some(p) if !(6..=64).contains(&p.len()) || !p.bytes().all(|b| b.is_ascii_digit()) => {
                // The value is a secret: not repeated in the error.
                return Err(invalid(
                    "form_pin",
                    "…",
                    "expected 6 to 64 digits (0–9): a shorter PIN is guessed too easily",
                ));
            }
            Some(p) => Some(FormPin(p.to_owned())),
            None => None,
        };
        let (form_hosts, form_limits) = self.form_settings()?;
        if form_listen.is_none()
            && let Some((key, value)) = self.form_keys().find(|(_, v)| v.is_some())
        {
            let value = if key == "form_pin" {
                "…"
            } else {
                value.unwrap_or_default()
            };
            return Err(invalid(
                key,
                value,
                "only used with the web form (form_listen / --form)",
            ));
        }
        let disk_reserve = match &self.disk_reserve {
            Some(v) => parse_size(v).ok_or_else(|| {
                invalid("disk_reserve", v, "expected a size, e.g. 1MiB (0: none)")
            })?,
            None => crate::outbox::DEFAULT_DISK_RESERVE,
        };
        let credentials = match (&self.username, &self.password) {
            (Some(u), Some(p)) => Some(Credentials {
                username: u.clone(),
                password: p.clone(),
            }),
            (None, None) => None,
            (Some(_), None) => return Err(ConfigError::Missing { key: "password" }),
            (None, Some(_)) => return Err(ConfigError::Missing { key: "username" }),
        };

        let power = PowerProbe {
            sysfs_dir: match &self.power_supply_dir {
                Some(d) if d.trim().is_empty() => None,
                Some(d) => Some(PathBuf::from(d)),
                None => Some(PathBuf::from(DEFAULT_POWER_SUPPLY_DIR)),
            },
            configured_power: self
                .power
                .as_deref()
                .map(|v| parse_power("power", v))
                .transpose()?,
            configured_battery_pct: self
                .battery_pct
                .as_deref()
                .map(|v| {
                    v.trim()
                        .parse::<u8>()
                        .ok()
                        .filter(|&p| p <= 100)
                        .ok_or_else(|| invalid("battery_pct", v, "expected a percentage, 0–100"))
                })
                .transpose()?,
        };
        let hq = match &self.hq {
            Some(v) => parse_hq("hq", v)?,
            None => HqState::Unknown,
        };
        let link = |key, v: &Option<String>| v.as_deref().map(|v| parse_link(key, v)).transpose();
        let comms = Comms {
            internet: link("internet", &self.internet)?,
            mobile: link("mobile", &self.mobile)?,
            landline: link("landline", &self.landline)?,
            radio: link("radio", &self.radio)?,
        };

        let evacuees = self
            .evacuees
            .as_deref()
            .map(|v| parse_count("evacuees", v))
            .transpose()?;
        let capacity = self
            .capacity
            .as_deref()
            .map(|v| parse_count("capacity", v))
            .transpose()?;
        let state = self
            .shelter_state
            .as_deref()
            .map(|v| parse_shelter_state("shelter_state", v))
            .transpose()?;
        let shelter = if evacuees.is_none() && capacity.is_none() && state.is_none() {
            None
        } else if kind != SiteKind::Shelter {
            let (key, value) = [
                ("evacuees", &self.evacuees),
                ("capacity", &self.capacity),
                ("shelter_state", &self.shelter_state),
            ]
            .into_iter()
            .find_map(|(k, v)| v.clone().map(|v| (k, v)))
            .unwrap_or(("evacuees", String::new()));
            return Err(invalid(
                key,
                &value,
                "only a shelter reports this (kind is not shelter)",
            ));
        } else {
            let state = state.unwrap_or(match evacuees {
                Some(n) if n > 0 => ShelterState::Open,
                _ => ShelterState::Unknown,
            });
            Some(ShelterInput {
                state,
                evacuees,
                capacity,
            })
        };

        Ok(AgentConfig {
            broker,
            ca_file,
            credentials,
            site: SiteRef { ward, site },
            name,
            kind,
            location,
            interval,
            mode,
            state_dir,
            shelter,
            outbox_max,
            replay_rate,
            confirm,
            disk_reserve,
            form_listen,
            form_pin,
            form_hosts,
            form_limits,
            power,
            hq,
            comms,
        })
    }
}

impl RawConfig {
    /// The web form's settings other than where it listens and its PIN, with their defaults.
    fn form_settings(&self) -> Result<(Vec<String>, FormLimits), ConfigError> {
        let d = FormLimits::default();
        let hosts = match &self.form_hosts {
            Some(text) => parse_hosts("form_hosts", text)?,
            None => Vec::new(),
        };
        let duration = |key: &'static str, value: &Option<String>, default: Duration| {
            let Some(text) = value else {
                return Ok(default);
            };
            parse_duration(text)
                .filter(|d| (Duration::from_millis(100)..=MAX_INTERVAL).contains(d))
                .ok_or_else(|| {
                    invalid(key, text, "expected a duration from 100ms to 24h, e.g. 10s")
                })
        };
        let count = |key: &'static str, value: &Option<String>, max: u32, default: u32| {
            let Some(text) = value else {
                return Ok(default);
            };
            text.trim()
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| invalid(key, text, format!("expected a whole number, 1–{max}")))
        };
        let limits = FormLimits {
            max_connections: count(
                "form_max_connections",
                &self.form_max_connections,
                10_000,
                u32::try_from(d.max_connections).unwrap_or(u32::MAX),
            )? as usize,
            header_timeout: duration(
                "form_header_timeout",
                &self.form_header_timeout,
                d.header_timeout,
            )?,
            idle_timeout: duration("form_idle_timeout", &self.form_idle_timeout, d.idle_timeout)?,
            pin_attempts: count(
                "form_pin_attempts",
                &self.form_pin_attempts,
                1_000,
                d.pin_attempts,
            )?,
            pin_window: duration("form_pin_window", &self.form_pin_window, d.pin_window)?,
            pin_lockout: duration("form_pin_lockout", &self.form_pin_lockout, d.pin_lockout)?,
            token_ttl: d.token_ttl,
        };
        Ok((hosts, limits))
    }

    /// The web form's keys other than `form_listen`, with their values as given.
    fn form_keys(&self) -> impl Iterator<Item = (&'static str, Option<&str>)> {
        [
            ("form_pin", &self.form_pin),
            ("form_hosts", &self.form_hosts),
            ("form_max_connections", &self.form_max_connections),
            ("form_header_timeout", &self.form_header_timeout),
            ("form_idle_timeout", &self.form_idle_timeout),
            ("form_pin_attempts", &self.form_pin_attempts),
            ("form_pin_window", &self.form_pin_window),
            ("form_pin_lockout", &self.form_pin_lockout),
        ]
        .into_iter()
        .map(|(k, v)| (k, v.as_deref()))
    }

    /// Whether these settings give `key` (a file key, `_` for `-`).
    fn gives(&self, key: &str) -> bool {
        toml::Value::try_from(self)
            .ok()
            .is_some_and(|table| table.get(key).is_some())
    }
}

/// The settings of `renkei-agent run`: the file at `path` (if any) with `flags` over it,
/// checked. An invalid value that came from the file is reported with the file's path, so
/// the operator knows where to fix it.
pub fn load(flags: RawConfig, path: Option<&Path>) -> Result<AgentConfig, ConfigError> {
    let file = match path {
        Some(path) => RawConfig::from_file(path)?,
        None => RawConfig::default(),
    };
    let from_file = |key: &str| !flags.gives(key) && file.gives(key);
    match flags.clone().or(file.clone()).resolve() {
        Err(e @ ConfigError::Invalid { key, .. }) if from_file(key) => Err(ConfigError::InFile {
            // `from_file` holds only with a file.
            path: path.map(Path::to_owned).unwrap_or_default(),
            source: Box::new(e),
        }),
        other => other,
    }
}

/// Host names, comma-separated, lower-cased: each a DNS or mDNS name (labels of a–z 0–9 -)
/// or an IP address (one the form is reached by through a port forward, say). No port: a
/// configured name is served on any port, since a proxy may stand in front.
fn parse_hosts(key: &'static str, text: &str) -> Result<Vec<String>, ConfigError> {
    let mut hosts = Vec::new();
    for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let name = name
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let valid = name.parse::<std::net::IpAddr>().is_ok()
            || (name.len() <= 253
                && name.split('.').all(|label| {
                    !label.is_empty()
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                }));
        if !valid {
            return Err(invalid(
                key,
                text,
                format!("{name:?} is not a host name (letters, digits, - and .; no port)"),
            ));
        }
        hosts.push(name);
    }
    Ok(hosts)
}

/// Parses `mqtt://HOST[:PORT]` (or `tcp://…`, or a bare `HOST[:PORT]`), and
/// `mqtts://HOST[:PORT]` (or `ssl://…`, `tls://…`) for TLS.
pub fn parse_broker(key: &'static str, text: &str) -> Result<BrokerAddr, ConfigError> {
    let (rest, tls) = if let Some((scheme, rest)) = text.split_once("://") {
        match scheme {
            "mqtt" | "tcp" => (rest, false),
            "mqtts" | "ssl" | "tls" => (rest, true),
            _ => {
                return Err(invalid(
                    key,
                    text,
                    "expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]",
                ));
            }
        }
    } else {
        (text, false)
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    // "[::1]:1883" for IPv6, else "host:port" or "host".
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| invalid(key, text, "unclosed '[' in IPv6 address"))?;
        (host, after.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() || host.contains('/') || host.contains('@') {
        return Err(invalid(key, text, "expected mqtt://HOST[:PORT]"));
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| invalid(key, text, "port must be 1–65535"))?,
        None if tls => DEFAULT_MQTTS_PORT,
        None => DEFAULT_MQTT_PORT,
    };
    Ok(BrokerAddr {
        host: host.to_owned(),
        port,
        tls,
    })
}

/// Parses a size in bytes: a whole number with an optional `KiB`, `MiB` or `GiB` (`16MiB`).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let per = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(per)
}

/// Parses a human duration: a whole number followed by `ms`, `s`, `m` or `h` (`30s`, `2m`).
///
/// Hand-written: these four units are all the agent's settings use, and it keeps the
/// dependency tree of a small edge binary small.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits.parse().ok()?;
    let ms_per = match unit.trim() {
        "ms" => 1,
        "s" | "" => 1_000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    n.checked_mul(ms_per).map(Duration::from_millis)
}

/// A heartbeat interval: a duration of whole seconds from 1 s to one day.
pub fn parse_interval(key: &'static str, text: &str) -> Result<Duration, ConfigError> {
    let d = parse_duration(text)
        .ok_or_else(|| invalid(key, text, "expected a duration such as 30s, 2m or 1h"))?;
    if d < Duration::from_secs(1) || d > MAX_INTERVAL {
        return Err(invalid(key, text, "must be from 1s to 24h"));
    }
    if d.subsec_millis() != 0 {
        return Err(invalid(key, text, "must be whole seconds"));
    }
    Ok(d)
}

pub fn parse_mode(key: &'static str, text: &str) -> Result<Mode, ConfigError> {
    match text {
        "actual" => Ok(Mode::Actual),
        "exercise" => Ok(Mode::Exercise),
        "test" => Ok(Mode::Test),
        _ => Err(invalid(key, text, "expected actual, exercise or test")),
    }
}

fn parse_power(key: &'static str, text: &str) -> Result<PowerSource, ConfigError> {
    match text.trim() {
        "grid" => Ok(PowerSource::Grid),
        "generator" => Ok(PowerSource::Generator),
        "battery" => Ok(PowerSource::Battery),
        "none" => Ok(PowerSource::None),
        "unknown" => Ok(PowerSource::Unknown),
        _ => Err(invalid(
            key,
            text,
            "expected grid, generator, battery, none or unknown",
        )),
    }
}

fn parse_hq(key: &'static str, text: &str) -> Result<HqState, ConfigError> {
    match text.trim() {
        "none" => Ok(HqState::None),
        "alert" => Ok(HqState::Alert),
        "established" => Ok(HqState::Established),
        "dissolved" => Ok(HqState::Dissolved),
        "unknown" => Ok(HqState::Unknown),
        _ => Err(invalid(
            key,
            text,
            "expected none, alert, established, dissolved or unknown",
        )),
    }
}

fn parse_link(key: &'static str, text: &str) -> Result<LinkState, ConfigError> {
    match text.trim() {
        "ok" => Ok(LinkState::Ok),
        "degraded" => Ok(LinkState::Degraded),
        "down" => Ok(LinkState::Down),
        _ => Err(invalid(key, text, "expected ok, degraded or down")),
    }
}

fn parse_kind(key: &'static str, text: &str) -> Result<SiteKind, ConfigError> {
    match text {
        "ward_office" | "ward-office" => Ok(SiteKind::WardOffice),
        "shelter" => Ok(SiteKind::Shelter),
        "depot" => Ok(SiteKind::Depot),
        _ => Err(invalid(key, text, "expected ward_office, shelter or depot")),
    }
}

fn parse_shelter_state(key: &'static str, text: &str) -> Result<ShelterState, ConfigError> {
    match text {
        "not_open" | "not-open" => Ok(ShelterState::NotOpen),
        "preparing" => Ok(ShelterState::Preparing),
        "open" => Ok(ShelterState::Open),
        "closed" => Ok(ShelterState::Closed),
        "unknown" => Ok(ShelterState::Unknown),
        _ => Err(invalid(
            key,
            text,
            "expected not_open, preparing, open, closed or unknown",
        )),
    }
}

fn parse_count(key: &'static str, text: &str) -> Result<u32, ConfigError> {
    text.trim()
        .parse()
        .map_err(|_| invalid(key, text, "expected a whole number from 0"))
}

pub fn parse_location(key: &'static str, text: &str) -> Result<GeoPoint, ConfigError> {
    let bad = || {
        invalid(
            key,
            text,
            "expected \"LAT,LON\" in degrees, e.g. 35.6895,139.6917",
        )
    };
    let (lat, lon) = text.split_once(',').ok_or_else(bad)?;
    let lat: f64 = lat.trim().parse().map_err(|_| bad())?;
    let lon: f64 = lon.trim().parse().map_err(|_| bad())?;
    if !(-90.0..=90.0).contains(&lat) || !(-180.0..=180.0).contains(&lon) {
        return Err(bad());
    }
    // Within the checked ranges, micro-degrees fit an i32 exactly enough (±0.5e-6°).
    #[allow(clippy::cast_possible_truncation)]
    Ok(GeoPoint {
        lat_e6: (lat * 1e6).round() as i32,
        lon_e6: (lon * 1e6).round() as i32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        broker = "mqtt://hq.example:1884"
        ward = 131041
        site = "nishi-shinjuku-es"
        name = "西新宿小学校"
    "#;

    fn resolve(text: &str) -> Result<AgentConfig, ConfigError> {
        RawConfig::from_toml(text).unwrap().resolve()
    }

    fn error_of(text: &str) -> String {
        resolve(text).unwrap_err().to_string()
    }

    #[test]
    fn minimal_file_gets_the_defaults() {
        let c = resolve(MINIMAL).unwrap();
        assert_eq!(
            c.broker,
            BrokerAddr {
                host: "hq.example".into(),
                port: 1884,
                tls: false
            }
        );
        assert_eq!(c.site.ward, WardCode(131041));
        assert_eq!(c.site.site.as_str(), "nishi-shinjuku-es");
        assert_eq!(c.name, "西新宿小学校");
        assert_eq!(c.kind, SiteKind::Shelter);
        assert_eq!(c.interval, DEFAULT_INTERVAL);
        assert_eq!(c.mode, Mode::Actual);
        assert_eq!(c.state_dir, PathBuf::from("./var/agent-nishi-shinjuku-es"));
        assert_eq!(c.shelter, None);
        assert_eq!(c.credentials, None);
        assert_eq!(c.location, None);
    }

    #[test]
    fn full_file_parses_every_key() {
        let c = resolve(&format!(
            r#"{MINIMAL}
            kind = "shelter"
            interval = "2m"
            mode = "exercise"
            state_dir = "/tmp/renkei"
            location = "35.6895,139.6917"
            username = "agent-1"
            password = "secret"
            evacuees = 120
            capacity = "450"
            shelter_state = "preparing"
        "#
        ))
        .unwrap();
        assert_eq!(c.interval, Duration::from_secs(120));
        assert_eq!(c.mode, Mode::Exercise);
        assert_eq!(c.state_dir, PathBuf::from("/tmp/renkei"));
        assert_eq!(
            c.location,
            Some(GeoPoint {
                lat_e6: 35_689_500,
                lon_e6: 139_691_700
            })
        );
        assert_eq!(
            c.shelter,
            Some(ShelterInput {
                state: ShelterState::Preparing,
                evacuees: Some(120),
                capacity: Some(450)
            })
        );
        let creds = c.credentials.unwrap();
        assert_eq!(creds.username, "agent-1");
        assert!(!format!("{creds:?}").contains("secret"));
    }

    #[test]
    fn flags_override_the_file() {
        let file = RawConfig::from_toml(MINIMAL).unwrap();
        let flags = RawConfig {
            ward: Some("13113".into()),
            interval: Some("5s".into()),
            ..RawConfig::default()
        };
        let c = flags.or(file).resolve().unwrap();
        assert_eq!(
            c.site.ward,
            WardCode(131130),
            "five-digit form gets its check digit"
        );
        assert_eq!(c.interval, Duration::from_secs(5));
        assert_eq!(c.name, "西新宿小学校");
    }

    #[test]
    fn evacuees_without_a_state_mean_open() {
        let c = resolve(&format!("{MINIMAL}\nevacuees = 3")).unwrap();
        assert_eq!(c.shelter.unwrap().state, ShelterState::Open);
        let c = resolve(&format!("{MINIMAL}\ncapacity = 300")).unwrap();
        assert_eq!(c.shelter.unwrap().state, ShelterState::Unknown);
    }

    #[test]
    fn errors_name_the_key_and_the_value() {
        let cases = [
            ("ward = 132012", "ward = \"132012\""),
            ("ward = 131042", "check digit"),
            ("site = \"a/b\"", "site = \"a/b\""),
            ("interval = \"30x\"", "interval = \"30x\""),
            ("interval = \"0s\"", "from 1s to 24h"),
            ("interval = \"1500ms\"", "whole seconds"),
            (
                "mode = \"real\"",
                "mode = \"real\": expected actual, exercise or test",
            ),
            ("kind = \"school\"", "kind = \"school\""),
            ("evacuees = -1", "evacuees = \"-1\""),
            ("shelter_state = \"full\"", "shelter_state = \"full\""),
            ("location = \"35.6\"", "location = \"35.6\""),
            ("location = \"95,139\"", "location"),
            ("name = \"  \"", "name"),
            ("broker = \"mqtts://hq:8883\"", "mqtts:// needs ca_file"),
            (
                "ca_file = \"/etc/ca.pem\"",
                "only used with an mqtts:// broker",
            ),
            ("broker = \"http://hq\"", "broker = \"http://hq\""),
            ("broker = \"mqtt://hq:0\"", "port"),
            ("broker = \"mqtt://:1883\"", "broker"),
            ("username = \"u\"", "missing password"),
        ];
        for (line, expected) in cases {
            // Later keys win in our test text only if we drop the minimal one they replace.
            let key = line.split(' ').next().unwrap();
            let base: String = MINIMAL
                .lines()
                .filter(|l| l.trim().split(' ').next() != Some(key))
                .collect::<Vec<_>>()
                .join("\n");
            let msg = error_of(&format!("{base}\n{line}"));
            assert!(msg.contains(expected), "{line}: {msg}");
        }
    }

    #[test]
    fn shelter_figures_on_a_non_shelter_are_refused() {
        let msg = error_of(&format!("{MINIMAL}\nkind = \"depot\"\ncapacity = 10"));
        assert!(
            msg.starts_with("capacity = \"10\": only a shelter"),
            "{msg}"
        );
    }

    #[test]
    fn missing_keys_say_how_to_give_them() {
        let msg = RawConfig::default().resolve().unwrap_err().to_string();
        assert_eq!(
            msg,
            "missing broker: give --broker or `broker = …` in the config file"
        );
        let msg = error_of("broker = \"h\"\nward = 131041\nsite = \"s\"");
        assert!(msg.starts_with("missing name"), "{msg}");
    }

    #[test]
    fn unknown_keys_and_bad_syntax_name_the_key() {
        let err = RawConfig::from_toml("brokr = \"x\"").unwrap_err();
        assert!(err.contains("brokr"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, "ward = [1]").unwrap();
        let err = RawConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("agent.toml") && err.contains("ward"), "{err}");
        let err = RawConfig::from_file(&dir.path().join("none.toml")).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
    }

    #[test]
    fn the_example_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/agent.example.toml");
        let c = RawConfig::from_file(&path).unwrap().resolve().unwrap();
        assert_eq!(c.site.site.as_str(), "nishi-shinjuku-es");
        assert_eq!(c.shelter.unwrap().evacuees, Some(120));
    }

    #[test]
    fn broker_addresses() {
        let ok = [
            ("mqtt://localhost", "localhost", 1883, false),
            ("tcp://10.0.0.1:1884", "10.0.0.1", 1884, false),
            ("hq.example:2000", "hq.example", 2000, false),
            ("mqtt://[::1]:1885/", "::1", 1885, false),
            ("mqtt://[::1]", "::1", 1883, false),
            ("mqtts://hq.example", "hq.example", 8883, true),
            ("ssl://[::1]:9883", "::1", 9883, true),
        ];
        for (text, host, port, tls) in ok {
            let addr = parse_broker("broker", text).unwrap();
            assert_eq!(
                addr,
                BrokerAddr {
                    host: host.into(),
                    port,
                    tls
                },
                "{text}"
            );
            // Printed back as an address that parses to the same.
            assert_eq!(parse_broker("broker", &addr.to_string()).unwrap(), addr);
        }
        let c = resolve(&format!(
            "{}\nbroker = \"mqtts://hq.example\"\nca_file = \"/etc/renkei/ca.pem\"",
            MINIMAL.replace("broker = \"mqtt://hq.example:1884\"", "")
        ))
        .unwrap();
        assert!(c.broker.tls);
        assert_eq!(c.ca_file, Some(PathBuf::from("/etc/renkei/ca.pem")));
    }

    #[test]
    fn sizes_and_replay_rate() {
        assert_eq!(parse_size("16MiB"), Some(16 << 20));
        assert_eq!(parse_size("64KiB"), Some(64 << 10));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("1.5MiB"), None);
        let c = resolve(&format!(
            "{MINIMAL}\noutbox_max = \"1MiB\"\nreplay_rate = 5"
        ))
        .unwrap();
        assert_eq!((c.outbox_max, c.replay_rate), (1 << 20, 5));
        assert!(error_of(&format!("{MINIMAL}\noutbox_max = \"1KiB\"")).contains("outbox_max"));
        assert!(error_of(&format!("{MINIMAL}\nreplay_rate = 0")).contains("replay_rate"));
        assert_eq!(resolve(MINIMAL).unwrap().confirm, Confirm::Receipt);
        assert_eq!(
            resolve(&format!("{MINIMAL}\nconfirm = \"puback\""))
                .unwrap()
                .confirm,
            Confirm::PubAck
        );
        assert!(error_of(&format!("{MINIMAL}\nconfirm = \"never\"")).contains("confirm"));
        assert_eq!(
            resolve(MINIMAL).unwrap().disk_reserve,
            crate::outbox::DEFAULT_DISK_RESERVE
        );
        let c = resolve(&format!("{MINIMAL}\ndisk_reserve = \"8MiB\"")).unwrap();
        assert_eq!(c.disk_reserve, 8 << 20);
        assert!(error_of(&format!("{MINIMAL}\ndisk_reserve = \"lots\"")).contains("disk_reserve"));
    }

    #[test]
    fn the_web_form_is_off_by_default_and_its_pin_is_never_printed() {
        assert_eq!(resolve(MINIMAL).unwrap().form_listen, None);
        let c = resolve(&format!(
            "{MINIMAL}\nform_listen = \"0.0.0.0:8090\"\nform_pin = \"246810\""
        ))
        .unwrap();
        assert_eq!(c.form_listen, Some("0.0.0.0:8090".parse().unwrap()));
        assert_eq!(c.form_pin, Some(FormPin("246810".into())));
        assert!(!format!("{c:?}").contains("246810"));
        assert!(error_of(&format!("{MINIMAL}\nform_listen = \"8090\"")).contains("form_listen"));
        let msg = error_of(&format!(
            "{MINIMAL}\nform_listen = \"127.0.0.1:1\"\nform_pin = \"12\""
        ));
        assert!(msg.contains("form_pin") && !msg.contains("12\""), "{msg}");
        let msg = error_of(&format!("{MINIMAL}\nform_pin = \"246810\""));
        assert_eq!(
            msg,
            "form_pin = \"…\": only used with the web form (form_listen / --form)"
        );
        let msg = error_of(&format!("{MINIMAL}\nform_pin_lockout = \"1h\""));
        assert!(
            msg.starts_with("form_pin_lockout = \"1h\": only used"),
            "{msg}"
        );
    }

    #[test]
    fn the_web_form_limits_and_hosts() {
        let form = |extra: &str| format!("{MINIMAL}\nform_listen = \"0.0.0.0:8090\"\n{extra}");
        let c = resolve(&form("")).unwrap();
        assert_eq!(c.form_limits, FormLimits::default());
        assert_eq!(c.form_hosts, Vec::<String>::new());
        let c = resolve(&form(
            "form_hosts = \"Renkei-Nishi.local, shelter-pc,10.0.0.5\"\n\
             form_max_connections = 32\nform_header_timeout = \"5s\"\n\
             form_idle_timeout = \"1m\"\nform_pin_attempts = 3\nform_pin_window = \"2m\"\n\
             form_pin_lockout = \"1h\"",
        ))
        .unwrap();
        assert_eq!(
            c.form_hosts,
            ["renkei-nishi.local", "shelter-pc", "10.0.0.5"]
        );
        let l = &c.form_limits;
        assert_eq!(
            (l.max_connections, l.header_timeout, l.idle_timeout),
            (32, Duration::from_secs(5), Duration::from_secs(60))
        );
        assert_eq!(
            (l.pin_attempts, l.pin_window, l.pin_lockout),
            (3, Duration::from_secs(120), Duration::from_secs(3600))
        );
        for (line, expected) in [
            ("form_hosts = \"evil.example:80\"", "not a host name"),
            ("form_hosts = \"a/b\"", "form_hosts = \"a/b\""),
            ("form_max_connections = 0", "form_max_connections = \"0\""),
            ("form_max_connections = \"many\"", "1–10000"),
            ("form_header_timeout = \"10ms\"", "from 100ms to 24h"),
            ("form_idle_timeout = \"forever\"", "form_idle_timeout"),
            ("form_pin_attempts = 0", "form_pin_attempts"),
            ("form_pin_window = \"0s\"", "form_pin_window"),
            ("form_pin_lockout = \"2d\"", "form_pin_lockout"),
        ] {
            let msg = error_of(&form(line));
            assert!(msg.contains(expected), "{line}: {msg}");
        }
    }

    #[test]
    fn a_bad_value_in_the_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            format!("{MINIMAL}\nform_listen = \"127.0.0.1:8090\"\nform_pin = \"2468\"\n"),
        )
        .unwrap();
        let msg = load(RawConfig::default(), Some(&path))
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            format!(
                "config file {}: form_pin = \"…\": expected 6 to 64 digits (0–9): a shorter \
                 PIN is guessed too easily",
                path.display()
            )
        );
        // Given as a flag (or in the environment), the same value is not the file's fault.
        let flags = RawConfig {
            form_pin: Some("12".into()),
            ..RawConfig::default()
        };
        let msg = load(flags, Some(&path)).unwrap_err().to_string();
        assert!(msg.starts_with("form_pin = \"…\": expected 6"), "{msg}");
        // A good flag mends the file's bad value.
        let flags = RawConfig {
            form_pin: Some("135790".into()),
            ..RawConfig::default()
        };
        let c = load(flags, Some(&path)).unwrap();
        assert_eq!(c.form_pin, Some(FormPin("135790".into())));
        // Which keys a set of settings gives, for any key.
        let file = RawConfig::from_file(&path).unwrap();
        assert!(file.gives("form_pin") && file.gives("ward") && !file.gives("form_hosts"));
        assert!(!RawConfig::default().gives("ward"));
    }

    #[test]
    fn a_form_pin_has_at_least_six_digits() {
        let with_pin =
            |pin: &str| format!("{MINIMAL}\nform_listen = \"127.0.0.1:8090\"\nform_pin = {pin:?}");
        for good in ["123456", " 246810 ", &"9".repeat(64)] {
            let c = resolve(&with_pin(good)).unwrap();
            assert_eq!(c.form_pin, Some(FormPin(good.trim().to_owned())), "{good}");
        }
        // Four digits are 10,000 guesses; letters are hard to type on a phone's number pad
        // and invite a word; full-width digits are not what the form's keypad sends.
        for bad in [
            "2468",
            "12345",
            "abcdef",
            "12345a",
            "123 456",
            "１２３４５６",
            &"9".repeat(65),
        ] {
            let msg = error_of(&with_pin(bad));
            assert!(
                msg.starts_with("form_pin = \"…\": expected 6 to 64 digits"),
                "{bad}: {msg}"
            );
            // The PIN is a secret: never repeated.
            assert!(bad.trim().is_empty() || !msg.contains(bad.trim()), "{msg}");
        }
    }

    #[test]
    fn power_hq_and_comms_as_configured() {
        let c = resolve(MINIMAL).unwrap();
        assert_eq!(
            c.power,
            PowerProbe {
                sysfs_dir: Some(PathBuf::from("/sys/class/power_supply")),
                configured_power: None,
                configured_battery_pct: None,
            }
        );
        assert_eq!((c.hq, c.comms), (HqState::Unknown, Comms::default()));
        let c = resolve(&format!(
            "{MINIMAL}\npower = \"generator\"\nbattery_pct = 80\nhq = \"established\"\n\
             internet = \"ok\"\nradio = \"down\"\npower_supply_dir = \"\""
        ))
        .unwrap();
        assert_eq!(c.power.sysfs_dir, None);
        assert_eq!(c.power.configured_power, Some(PowerSource::Generator));
        assert_eq!(c.power.configured_battery_pct, Some(80));
        assert_eq!(c.hq, HqState::Established);
        assert_eq!(c.comms.internet, Some(LinkState::Ok));
        assert_eq!(c.comms.radio, Some(LinkState::Down));
        assert_eq!(c.comms.mobile, None);
        for (line, expected) in [
            ("power = \"solar\"", "power = \"solar\": expected grid"),
            ("battery_pct = 101", "battery_pct = \"101\""),
            ("battery_pct = -1", "battery_pct"),
            ("hq = \"yes\"", "hq = \"yes\""),
            ("landline = \"fine\"", "landline = \"fine\": expected ok"),
        ] {
            let msg = error_of(&format!("{MINIMAL}\n{line}"));
            assert!(msg.contains(expected), "{line}: {msg}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("30"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        for bad in ["", "s", "-1s", "1.5s", "3d", "99999999999999999999s"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
