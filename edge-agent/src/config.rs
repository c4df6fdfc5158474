//! Settings of `renkei-agent run`: from a TOML file, overridden by command-line flags.
//!
//! The file and the flags fill the same typed [`Settings`], and each value has one parser:
//! clap reads a flag with it, serde reads the file's value with it (as text, so `ward = 131041`
//! and `ward = "131041"` are the same), and the names of every choice are the `ValueEnum`
//! names of its type, which are its serde names too. [`load`] lays the flags (and their
//! environment variables) over the file's values, and [`Settings::resolve`] checks what joins
//! several settings and fills the defaults, giving an [`AgentConfig`]. Every error names the key
//! and the value that is wrong, and, for a value from the file, the file and its line.
//!
//! ```toml
//! broker = "mqtt://hq.example:1883"   # or mqtts://… with ca_file
//! fallback_broker = "mqtt://hq2.example:1883"   # failed over to when broker does not answer
//! ca_file = "/etc/renkei/hq-ca.pem"   # mqtts:// only, then required
//! ward = 131041                  # or "13104"; the 23 special wards only
//! site = "nishi-shinjuku-es"     # 1–64 of A–Z a–z 0–9 _ -
//! name = "西新宿小学校"
//! kind = "shelter"               # ward_office | shelter | depot
//! interval = "30s"               # heartbeat: ms, s, m, h (renkei_shared::units)
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

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::builder::{OsStringValueParser, TypedValueParser as _};
use clap::{ArgMatches, FromArgMatches as _, ValueEnum};
use renkei_shared::units::{self, ByteSize, HumanDuration, UnitError};
use renkei_shared::validate::MAX_NAME_BYTES;
use renkei_shared::{
    Comms, GeoPoint, HqState, Id, LinkState, Mode, PowerSource, ShelterState, SiteKind, SiteRef,
    WardCode,
};
use serde::{Deserialize, Deserializer};

use crate::power::{DEFAULT_POWER_SUPPLY_DIR, PowerProbe};

/// Heartbeat interval when none is given.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
/// Backlog replay rate when none is given (messages per second).
pub const DEFAULT_REPLAY_RATE: u32 = 10;
/// The smallest outbox budget: one segment.
pub const MIN_OUTBOX: u64 = 64 * 1024;
/// The longest heartbeat interval a status can carry (one day).
pub const MAX_INTERVAL: Duration = Duration::from_secs(86_400);
/// Keys whose values are secrets: never repeated in an error.
const SECRET_KEYS: [&str; 2] = ["password", "form_pin"];

/// What tells the agent a record has been delivered (HQ's receipt, or the PUBACK), and its MQTT
/// login: the link's own types.
pub use renkei_link::{Confirm, Credentials};

/// Why the settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The config file is not valid TOML.
    #[error("not valid TOML: {0}")]
    Syntax(String),
    /// A setting without a default was given nowhere.
    #[error("missing {key}: give --{} or `{key} = …` in the config file", key.replace('_', "-"))]
    Missing { key: &'static str },
    /// A setting has a value that cannot be used, or is a key this agent does not know.
    #[error("{key} = {value:?}: {reason}")]
    Invalid {
        key: String,
        value: String,
        reason: String,
    },
    /// One of the errors above, found in the config file (not in a flag): where to fix it.
    // `error`, not `source`: its text is already in this one's, so it is not a cause to print again.
    #[error("config file {}{}: {error}", path.display(), line.map(|n| format!(", line {n}")).unwrap_or_default())]
    InFile {
        path: PathBuf,
        /// The line of the key or value; `None` for an error no one line holds.
        line: Option<usize>,
        error: Box<ConfigError>,
    },
    /// The flags do not fit [`Settings`]: a mistake in this program, not in the flags.
    #[error("command line: {0}")]
    Flags(String),
}

impl ConfigError {
    /// The key an invalid value was given for.
    fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

fn invalid(key: &str, value: impl fmt::Display, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Settings as given, each checked on its own but not yet against the others. Filled by the
/// config file (serde, keys with `_`) and by the flags (clap, with `-`) alike.
#[derive(Debug, Default, Clone, PartialEq, Eq, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Broker address: mqtt://HOST[:PORT], or mqtts://HOST[:PORT] for TLS (needs --ca-file)
    #[arg(long, value_name = "URL")]
    #[serde(default, deserialize_with = "text")]
    pub broker: Option<BrokerAddr>,
    /// A second broker to fail over to when `broker` does not answer (HQ's, when `broker` is
    /// the ward office's); the same login, and the same scheme so that one ca_file serves
    #[arg(long, value_name = "URL")]
    #[serde(default, deserialize_with = "text")]
    pub fallback_broker: Option<BrokerAddr>,
    /// PEM file of the CA that signed the broker's certificate (mqtts:// only)
    #[arg(long, value_name = "FILE")]
    #[serde(default, deserialize_with = "text")]
    pub ca_file: Option<PathBuf>,
    /// Ward code, six digits (131041) or five (13104)
    #[arg(long, value_name = "CODE")]
    #[serde(default, deserialize_with = "text")]
    pub ward: Option<WardCode>,
    /// Site id within Renkei (A–Z a–z 0–9 _ -)
    #[arg(long, value_name = "ID")]
    #[serde(default, deserialize_with = "text")]
    pub site: Option<Id>,
    /// The site's name as staff know it
    #[arg(long)]
    #[serde(default, deserialize_with = "text")]
    pub name: Option<String>,
    /// The kind of site [default: shelter]
    #[arg(long, value_enum)]
    #[serde(default, deserialize_with = "choice")]
    pub kind: Option<SiteKind>,
    /// Heartbeat interval, e.g. 30s, 2m [default: 30s]
    #[arg(long, value_name = "DURATION")]
    #[serde(default, deserialize_with = "text")]
    pub interval: Option<Interval>,
    /// Whether the site's messages are about the real world or a drill [default: actual]
    #[arg(long, value_enum)]
    #[serde(default, deserialize_with = "choice")]
    pub mode: Option<Mode>,
    /// Where the boot id is kept [default: ./var/agent-{site}]
    #[arg(long, value_name = "DIR")]
    #[serde(default, deserialize_with = "text")]
    pub state_dir: Option<PathBuf>,
    /// The site's position, "LAT,LON" in degrees
    #[arg(long, value_name = "LAT,LON", allow_hyphen_values = true)]
    #[serde(default, deserialize_with = "text")]
    pub location: Option<Location>,
    /// MQTT user name
    #[arg(long)]
    #[serde(default, deserialize_with = "text")]
    pub username: Option<String>,
    /// MQTT password
    #[arg(long, env = "RENKEI_AGENT_PASSWORD", hide_env_values = true)]
    #[serde(default, deserialize_with = "text")]
    pub password: Option<String>,
    /// Evacuees now at the shelter
    #[arg(long, value_name = "N")]
    #[serde(default, deserialize_with = "text")]
    pub evacuees: Option<Count>,
    /// The shelter's planned capacity
    #[arg(long, value_name = "N")]
    #[serde(default, deserialize_with = "text")]
    pub capacity: Option<Count>,
    /// The shelter's state [default: open with evacuees, else unknown]
    #[arg(long, value_name = "STATE", value_enum)]
    #[serde(default, deserialize_with = "choice")]
    pub shelter_state: Option<ShelterState>,
    /// Byte budget of the outbox, e.g. 16MiB [default: 16MiB]
    #[arg(long, value_name = "SIZE")]
    #[serde(default, deserialize_with = "text")]
    pub outbox_max: Option<ByteSize>,
    /// Messages per second when replaying the backlog after an outage [default: 10]
    #[arg(long, value_name = "N")]
    #[serde(default, deserialize_with = "text")]
    pub replay_rate: Option<Bounded<1, 10_000>>,
    /// When a record leaves the outbox [default: receipt]
    #[arg(long, value_name = "WHEN", value_enum)]
    #[serde(default, deserialize_with = "choice")]
    pub confirm: Option<Confirm>,
    /// Free disk space the outbox never uses; reports are refused below it [default: 1MiB]
    #[arg(long, value_name = "SIZE")]
    #[serde(default, deserialize_with = "text")]
    pub disk_reserve: Option<ByteSize>,
    /// Serve the staff web form on ADDR, e.g. 0.0.0.0:8090 [default: off]
    #[arg(long = "form", value_name = "ADDR")]
    #[serde(default, deserialize_with = "text")]
    pub form_listen: Option<ListenAddr>,
    /// PIN the web form asks for before it saves a report: 6–64 digits [default: none]
    #[arg(
        long,
        value_name = "PIN",
        env = "RENKEI_AGENT_FORM_PIN",
        hide_env_values = true
    )]
    #[serde(default, deserialize_with = "text")]
    pub form_pin: Option<FormPin>,
    /// Host names the web form answers to besides its addresses and localhost, comma-separated
    /// (a name staff type, or a proxy's) [default: none]
    #[arg(long, value_name = "NAMES")]
    #[serde(default, deserialize_with = "text")]
    pub form_hosts: Option<FormHosts>,
    /// Connections the web form holds at most; then the longest-idle one makes room
    /// [default: 128]
    #[arg(long, value_name = "N")]
    #[serde(default, deserialize_with = "text")]
    pub form_max_connections: Option<Bounded<1, 10_000>>,
    /// Time a request's head, and then its body, may take to arrive [default: 10s]
    #[arg(long, value_name = "DURATION")]
    #[serde(default, deserialize_with = "text")]
    pub form_header_timeout: Option<FormTimeout>,
    /// A web form connection with no request in progress for this long is closed [default: 30s]
    #[arg(long, value_name = "DURATION")]
    #[serde(default, deserialize_with = "text")]
    pub form_idle_timeout: Option<FormTimeout>,
    /// Wrong PINs from one device within --form-pin-window that lock its PIN entry [default: 5]
    #[arg(long, value_name = "N")]
    #[serde(default, deserialize_with = "text")]
    pub form_pin_attempts: Option<Bounded<1, 1_000>>,
    /// The window in which wrong PINs are counted [default: 10m]
    #[arg(long, value_name = "DURATION")]
    #[serde(default, deserialize_with = "text")]
    pub form_pin_window: Option<FormTimeout>,
    /// How long PIN entry stays locked [default: 15m]
    #[arg(long, value_name = "DURATION")]
    #[serde(default, deserialize_with = "text")]
    pub form_pin_lockout: Option<FormTimeout>,
    /// Power source when the OS does not say
    #[arg(long, value_name = "SOURCE", value_enum)]
    #[serde(default, deserialize_with = "choice")]
    pub power: Option<PowerSource>,
    /// Battery charge in percent when the OS does not say
    #[arg(long, value_name = "PCT")]
    #[serde(default, deserialize_with = "text")]
    pub battery_pct: Option<Bounded<0, 100>>,
    /// The ward's disaster HQ as the site knows it [default: unknown]
    #[arg(long, value_name = "STATE", value_enum)]
    #[serde(default, deserialize_with = "choice")]
    pub hq: Option<HqState>,
    /// Internet link [default: not reported]
    #[arg(long, value_name = "STATE", value_enum)]
    #[serde(default, deserialize_with = "choice")]
    pub internet: Option<LinkState>,
    /// Mobile network [default: not reported]
    #[arg(long, value_name = "STATE", value_enum)]
    #[serde(default, deserialize_with = "choice")]
    pub mobile: Option<LinkState>,
    /// Landline [default: not reported]
    #[arg(long, value_name = "STATE", value_enum)]
    #[serde(default, deserialize_with = "choice")]
    pub landline: Option<LinkState>,
    /// 防災行政無線 radio [default: not reported]
    #[arg(long, value_name = "STATE", value_enum)]
    #[serde(default, deserialize_with = "choice")]
    pub radio: Option<LinkState>,
    /// Where the OS lists power supplies; "" turns reading off [default: /sys/class/power_supply]
    // Not clap's path parser, which refuses the empty value that turns reading off.
    #[arg(long, value_name = "DIR", value_parser = OsStringValueParser::new().map(PathBuf::from))]
    #[serde(default, deserialize_with = "text")]
    pub power_supply_dir: Option<PathBuf>,
}

/// Reads a TOML string, integer, float or boolean as text and parses it with the flag's parser,
/// so a value means the same in the file as on the command line.
fn text<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    let text = d.deserialize_any(Scalar)?;
    text.parse().map(Some).map_err(serde::de::Error::custom)
}

/// Reads one of the names the flag takes (the type's [`ValueEnum`] names).
fn choice<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: ValueEnum,
{
    let text = d.deserialize_any(Scalar)?;
    parse_choice(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// One of `T`'s names (or their aliases), blanks around it ignored.
fn parse_choice<T: ValueEnum>(text: &str) -> Result<T, String> {
    let text = text.trim();
    T::value_variants()
        .iter()
        .find(|v| {
            v.to_possible_value()
                .is_some_and(|p| p.matches(text, false))
        })
        .cloned()
        .ok_or_else(|| {
            let names: Vec<String> = T::value_variants()
                .iter()
                .filter_map(|v| v.to_possible_value())
                .map(|p| p.get_name().to_owned())
                .collect();
            match names.split_last() {
                Some((last, [])) => format!("expected {last}"),
                Some((last, rest)) => format!("expected {} or {last}", rest.join(", ")),
                None => "expected nothing".to_owned(),
            }
        })
}

/// The name a choice is written with.
fn name_of<T: ValueEnum>(value: &T) -> String {
    value
        .to_possible_value()
        .map(|p| p.get_name().to_owned())
        .unwrap_or_default()
}

/// A scalar TOML value as the text a flag would give.
struct Scalar;

impl serde::de::Visitor<'_> for Scalar {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or a number")
    }
    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<String, E> {
        Ok(s.to_owned())
    }
    fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<String, E> {
        Ok(n.to_string())
    }
    fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<String, E> {
        Ok(n.to_string())
    }
    fn visit_f64<E: serde::de::Error>(self, x: f64) -> Result<String, E> {
        Ok(x.to_string())
    }
    fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<String, E> {
        Ok(b.to_string())
    }
}

/// A whole number from `MIN` to `MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounded<const MIN: u32, const MAX: u32>(pub u32);

/// A head count: any whole number from 0.
pub type Count = Bounded<0, { u32::MAX }>;

impl<const MIN: u32, const MAX: u32> FromStr for Bounded<MIN, MAX> {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim()
            .parse::<u32>()
            .ok()
            .filter(|n| (MIN..=MAX).contains(n))
            .map(Bounded)
            .ok_or_else(|| {
                if MAX == u32::MAX {
                    format!("expected a whole number from {MIN}")
                } else {
                    format!("expected a whole number, {MIN}–{MAX}")
                }
            })
    }
}

impl<const MIN: u32, const MAX: u32> fmt::Display for Bounded<MIN, MAX> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A duration in the agent's settings, as [`units::parse_duration`] reads it, except that a bare
/// number is seconds (`interval = 30`): the agent has always read it so, and its files use it.
pub fn duration(text: &str) -> Result<Duration, UnitError> {
    match units::parse_duration(text) {
        Err(UnitError::NoUnit(seconds)) => Ok(Duration::from_secs(seconds)),
        other => other,
    }
}

/// A heartbeat interval: whole seconds, from 1 s to one day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interval(pub Duration);

impl FromStr for Interval {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let d = duration(s).map_err(|_| "expected a duration such as 30s, 2m or 1h")?;
        if d < Duration::from_secs(1) || d > MAX_INTERVAL {
            return Err("must be from 1s to 24h".into());
        }
        if d.subsec_millis() != 0 {
            return Err("must be whole seconds".into());
        }
        Ok(Interval(d))
    }
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        HumanDuration(self.0).fmt(f)
    }
}

/// One of the web form's timeouts: from 100 ms (less would cut off any phone) to one day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FormTimeout(pub Duration);

impl FromStr for FormTimeout {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        duration(s)
            .ok()
            .filter(|d| (Duration::from_millis(100)..=MAX_INTERVAL).contains(d))
            .map(FormTimeout)
            .ok_or_else(|| "expected a duration from 100ms to 24h, e.g. 10s".into())
    }
}

impl fmt::Display for FormTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        HumanDuration(self.0).fmt(f)
    }
}

/// A broker's address, in the one grammar of [`renkei_shared::url`]; the agent's modules know
/// it by this name.
pub use renkei_shared::url::BrokerUrl as BrokerAddr;

/// The site's position: `"LAT,LON"` in WGS84 degrees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location(pub GeoPoint);

impl FromStr for Location {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_location(s).map(Location)
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let GeoPoint { lat_e6, lon_e6 } = self.0;
        write!(f, "{},{}", f64::from(lat_e6) / 1e6, f64::from(lon_e6) / 1e6)
    }
}

/// Parses `"LAT,LON"` in degrees, each within its range.
pub fn parse_location(text: &str) -> Result<GeoPoint, String> {
    let bad = || "expected \"LAT,LON\" in degrees, e.g. 35.6895,139.6917".to_owned();
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

/// Where the staff web form listens: `ADDRESS:PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr(pub SocketAddr);

impl FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim()
            .parse()
            .map(ListenAddr)
            .map_err(|_| "expected ADDRESS:PORT, e.g. 0.0.0.0:8090".into())
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The web form's PIN; never printed. Read as given (blanks around it dropped) and checked by
/// [`Settings::resolve`], so that a bad PIN is refused without being repeated: clap would
/// print the value of a flag it refuses.
#[derive(Clone, PartialEq, Eq)]
pub struct FormPin(pub String);

impl fmt::Debug for FormPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FormPin(…)")
    }
}

impl FromStr for FormPin {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(FormPin(s.trim().to_owned()))
    }
}

impl FormPin {
    /// At least six digits: a million guesses, where the form's lockout allows a few per
    /// quarter hour. Digits only: what the form's numeric keypad types.
    fn check(&self) -> Result<(), ConfigError> {
        let p = &self.0;
        if (6..=64).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()) {
            return Ok(());
        }
        Err(invalid(
            "form_pin",
            "…",
            "expected 6 to 64 digits (0–9): a shorter PIN is guessed too easily",
        ))
    }
}

/// Host names, comma-separated, lower-cased: each a DNS or mDNS name (labels of a–z 0–9 -)
/// or an IP address (one the form is reached by through a port forward, say). No port: a
/// configured name is served on any port, since a proxy may stand in front.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FormHosts(pub Vec<String>);

impl FromStr for FormHosts {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
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
                return Err(format!(
                    "{name:?} is not a host name (letters, digits, - and .; no port)"
                ));
            }
            hosts.push(name);
        }
        Ok(FormHosts(hosts))
    }
}

impl fmt::Display for FormHosts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(","))
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
    /// Failed over to when `broker` does not answer; failed back from when it does.
    pub fallback_broker: Option<BrokerAddr>,
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
    pub form_listen: Option<SocketAddr>,
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

impl Settings {
    /// Checks the settings against each other and fills the defaults.
    pub fn resolve(&self) -> Result<AgentConfig, ConfigError> {
        let broker = self
            .broker
            .clone()
            .ok_or(ConfigError::Missing { key: "broker" })?;
        let ca_file = match (&self.ca_file, broker.tls) {
            (Some(f), _) if f.as_os_str().is_empty() => {
                return Err(invalid("ca_file", "", "must not be empty"));
            }
            (Some(f), true) => Some(f.clone()),
            (None, false) => None,
            (None, true) => {
                return Err(invalid(
                    "broker",
                    &broker,
                    "mqtts:// needs ca_file (--ca-file): the PEM file of the CA that signed \
                     the broker's certificate",
                ));
            }
            (Some(f), false) => {
                return Err(invalid(
                    "ca_file",
                    f.display(),
                    "only used with an mqtts:// broker; the broker is plain mqtt://",
                ));
            }
        };
        if let Some(fallback) = &self.fallback_broker
            && fallback.tls != broker.tls
        {
            return Err(invalid(
                "fallback_broker",
                fallback,
                "must use the scheme of broker (mqtt:// or mqtts://): one ca_file serves both",
            ));
        }
        let ward = self.ward.ok_or(ConfigError::Missing { key: "ward" })?;
        let site = self
            .site
            .clone()
            .ok_or(ConfigError::Missing { key: "site" })?;
        let name = self
            .name
            .clone()
            .ok_or(ConfigError::Missing { key: "name" })?;
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
        let kind = self.kind.unwrap_or(SiteKind::Shelter);
        let state_dir = match &self.state_dir {
            Some(d) if d.as_os_str().is_empty() => {
                return Err(invalid("state_dir", "", "must not be empty"));
            }
            Some(d) => d.clone(),
            None => PathBuf::from(format!("./var/agent-{site}")),
        };
        let outbox_max = match self.outbox_max {
            Some(size) if size.0 < MIN_OUTBOX => {
                return Err(invalid(
                    "outbox_max",
                    size,
                    "expected a size from 64KiB, e.g. 16MiB",
                ));
            }
            Some(size) => size.0,
            None => crate::outbox::DEFAULT_MAX_BYTES,
        };
        if let Some(pin) = &self.form_pin {
            pin.check()?;
        }
        let form_listen = self.form_listen.map(|a| a.0);
        if form_listen.is_none()
            && let Some((key, value)) = self.form_keys().find_map(|(k, v)| Some((k, v?)))
        {
            return Err(invalid(
                key,
                value,
                "only used with the web form (form_listen / --form)",
            ));
        }
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
                Some(d) if d.to_string_lossy().trim().is_empty() => None,
                Some(d) => Some(d.clone()),
                None => Some(PathBuf::from(DEFAULT_POWER_SUPPLY_DIR)),
            },
            configured_power: self.power,
            // Bounded to 100, so within a u8.
            configured_battery_pct: self.battery_pct.and_then(|p| u8::try_from(p.0).ok()),
        };
        let shelter = self.shelter(kind)?;

        Ok(AgentConfig {
            broker,
            fallback_broker: self.fallback_broker.clone(),
            ca_file,
            credentials,
            site: SiteRef { ward, site },
            name,
            kind,
            location: self.location.map(|l| l.0),
            interval: self.interval.map_or(DEFAULT_INTERVAL, |i| i.0),
            mode: self.mode.unwrap_or(Mode::Actual),
            state_dir,
            shelter,
            outbox_max,
            replay_rate: self.replay_rate.map_or(DEFAULT_REPLAY_RATE, |r| r.0),
            confirm: self.confirm.unwrap_or_default(),
            disk_reserve: self
                .disk_reserve
                .map_or(crate::outbox::DEFAULT_DISK_RESERVE, |r| r.0),
            form_listen,
            form_pin: self.form_pin.clone(),
            form_hosts: self.form_hosts.clone().unwrap_or_default().0,
            form_limits: self.form_limits(),
            power,
            hq: self.hq.unwrap_or(HqState::Unknown),
            comms: Comms {
                internet: self.internet,
                mobile: self.mobile,
                landline: self.landline,
                radio: self.radio,
            },
        })
    }

    /// The shelter's figures as staff gave them; only a shelter has any.
    fn shelter(&self, kind: SiteKind) -> Result<Option<ShelterInput>, ConfigError> {
        let evacuees = self.evacuees.map(|n| n.0);
        let capacity = self.capacity.map(|n| n.0);
        let given = [
            ("evacuees", self.evacuees.map(|n| n.to_string())),
            ("capacity", self.capacity.map(|n| n.to_string())),
            ("shelter_state", self.shelter_state.as_ref().map(name_of)),
        ];
        let Some((key, value)) = given.into_iter().find_map(|(k, v)| Some((k, v?))) else {
            return Ok(None);
        };
        if kind != SiteKind::Shelter {
            return Err(invalid(
                key,
                value,
                "only a shelter reports this (kind is not shelter)",
            ));
        }
        let state = self.shelter_state.unwrap_or(match evacuees {
            Some(n) if n > 0 => ShelterState::Open,
            _ => ShelterState::Unknown,
        });
        Ok(Some(ShelterInput {
            state,
            evacuees,
            capacity,
        }))
    }

    /// The web form's limits, with their defaults.
    fn form_limits(&self) -> FormLimits {
        let d = FormLimits::default();
        let timeout = |t: Option<FormTimeout>, default| t.map_or(default, |t| t.0);
        FormLimits {
            max_connections: self
                .form_max_connections
                .map_or(d.max_connections, |n| n.0 as usize),
            header_timeout: timeout(self.form_header_timeout, d.header_timeout),
            idle_timeout: timeout(self.form_idle_timeout, d.idle_timeout),
            pin_attempts: self.form_pin_attempts.map_or(d.pin_attempts, |n| n.0),
            pin_window: timeout(self.form_pin_window, d.pin_window),
            pin_lockout: timeout(self.form_pin_lockout, d.pin_lockout),
            token_ttl: d.token_ttl,
        }
    }

    /// The web form's keys other than `form_listen`, with their values as written (the PIN
    /// as "…").
    fn form_keys(&self) -> impl Iterator<Item = (&'static str, Option<String>)> {
        [
            ("form_pin", self.form_pin.as_ref().map(|_| "…".to_owned())),
            (
                "form_hosts",
                self.form_hosts.as_ref().map(ToString::to_string),
            ),
            (
                "form_max_connections",
                self.form_max_connections.map(|v| v.to_string()),
            ),
            (
                "form_header_timeout",
                self.form_header_timeout.map(|v| v.to_string()),
            ),
            (
                "form_idle_timeout",
                self.form_idle_timeout.map(|v| v.to_string()),
            ),
            (
                "form_pin_attempts",
                self.form_pin_attempts.map(|v| v.to_string()),
            ),
            (
                "form_pin_window",
                self.form_pin_window.map(|v| v.to_string()),
            ),
            (
                "form_pin_lockout",
                self.form_pin_lockout.map(|v| v.to_string()),
            ),
        ]
        .into_iter()
    }
}

/// A config file, read: its settings and the line each of its keys is on.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub settings: Settings,
    /// The line (from 1) of each key the file gives.
    lines: std::collections::BTreeMap<String, usize>,
}

impl ConfigFile {
    /// Reads the config file at `path`.
    pub fn read(path: &Path) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        ConfigFile::parse(path, &text)
    }

    /// Parses `text`, the contents of the file at `path`; an error names the file, the line,
    /// the key and the value.
    pub fn parse(path: &Path, text: &str) -> Result<ConfigFile, ConfigError> {
        let in_file = |line: Option<usize>, source| ConfigError::InFile {
            path: path.to_owned(),
            line,
            error: Box::new(source),
        };
        let line = |span: Option<std::ops::Range<usize>>| span.map(|s| line_at(text, s.start));
        let table = toml::de::DeTable::parse(text)
            .map_err(|e| in_file(line(e.span()), ConfigError::Syntax(one_line(e.message()))))?;
        let lines = table
            .get_ref()
            .keys()
            .map(|key| (key.get_ref().to_string(), line_at(text, key.span().start)))
            .collect();
        let settings = serde_path_to_error::deserialize(toml::de::Deserializer::from(
            table.clone(),
        ))
        .map_err(|e| {
            let key = e.path().to_string();
            let e = e.into_inner();
            let value = if SECRET_KEYS.contains(&key.as_str()) {
                "…".to_owned()
            } else {
                table
                    .get_ref()
                    .get(key.as_str())
                    .map(|v| match v.get_ref() {
                        toml::de::DeValue::String(s) => s.to_string(),
                        _ => text.get(v.span()).unwrap_or_default().to_owned(),
                    })
                    .unwrap_or_default()
            };
            in_file(line(e.span()), invalid(&key, value, e.message()))
        })?;
        Ok(ConfigFile {
            path: path.to_owned(),
            settings,
            lines,
        })
    }

    /// The line of `key`, if the file gives it.
    pub fn line(&self, key: &str) -> Option<usize> {
        self.lines.get(key).copied()
    }

    /// The file's settings alone, checked.
    pub fn resolve(&self) -> Result<AgentConfig, ConfigError> {
        self.settings.resolve().map_err(|e| self.blame(e))
    }

    /// `error`, with this file and the line of its key if the file gives that key.
    fn blame(&self, error: ConfigError) -> ConfigError {
        match error.key().and_then(|key| self.line(key)) {
            Some(line) => ConfigError::InFile {
                path: self.path.clone(),
                line: Some(line),
                error: Box::new(error),
            },
            None => error,
        }
    }
}

/// The settings of `renkei-agent run`: the file at `path` (if any) with the flags of `flags`,
/// and their environment variables, over it; checked. An invalid value that came from the file
/// is reported with the file's path and line, so the operator knows where to fix it.
pub fn load(path: Option<&Path>, flags: &ArgMatches) -> Result<AgentConfig, ConfigError> {
    let file = path.map(ConfigFile::read).transpose()?;
    let mut settings = file
        .as_ref()
        .map(|f| f.settings.clone())
        .unwrap_or_default();
    // clap replaces exactly the settings a flag or its environment variable gave.
    settings
        .update_from_arg_matches(flags)
        .map_err(|e| ConfigError::Flags(e.to_string()))?;
    settings.resolve().map_err(|e| match &file {
        Some(file) if e.key().is_some_and(|key| flags.value_source(key).is_none()) => file.blame(e),
        _ => e,
    })
}

/// The line (from 1) of byte `offset` of `text`.
fn line_at(text: &str, offset: usize) -> usize {
    text.get(..offset).unwrap_or(text).matches('\n').count() + 1
}

fn one_line(message: &str) -> String {
    message.lines().map(str::trim).collect::<Vec<_>>().join(" ")
}

/// Limits of the form's server and of PIN entry; the defaults suit a shelter's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormLimits {
    /// Connections held at most; beyond it the longest-idle one is closed to make room.
    pub max_connections: usize,
    /// A request's head must arrive within this, and then its body within this again.
    pub header_timeout: Duration,
    /// A connection with no request in progress for this long is closed.
    pub idle_timeout: Duration,
    /// Wrong PINs from one device within `pin_window` that lock its PIN entry.
    pub pin_attempts: u32,
    /// The window in which wrong PINs are counted.
    pub pin_window: Duration,
    /// How long PIN entry stays locked.
    pub pin_lockout: Duration,
    /// How long the token of a rendered page is accepted.
    pub token_ttl: Duration,
}

impl Default for FormLimits {
    fn default() -> FormLimits {
        FormLimits {
            max_connections: 128,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            pin_attempts: 5,
            pin_window: Duration::from_secs(10 * 60),
            pin_lockout: Duration::from_secs(15 * 60),
            // A page left open through a shift; an older one is refused with the form
            // refilled and a fresh token, so staff only press Save again.
            token_ttl: Duration::from_secs(12 * 3600),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Args as _;

    use super::*;

    const MINIMAL: &str = r#"
        broker = "mqtt://hq.example:1884"
        ward = 131041
        site = "nishi-shinjuku-es"
        name = "西新宿小学校"
    "#;

    /// `text` as the file agent.toml, checked.
    fn resolve(text: &str) -> Result<AgentConfig, ConfigError> {
        ConfigFile::parse(Path::new("agent.toml"), text)?.resolve()
    }

    /// What is wrong with `text`, without where (the tests of `InFile` check that).
    fn error_of(text: &str) -> String {
        match resolve(text).unwrap_err() {
            ConfigError::InFile { error, .. } => error.to_string(),
            e => e.to_string(),
        }
    }

    /// The flags of `renkei-agent run`, as clap reads them.
    fn flags(args: &[&str]) -> ArgMatches {
        Settings::augment_args(clap::Command::new("run"))
            .try_get_matches_from(std::iter::once("run").chain(args.iter().copied()))
            .unwrap()
    }

    /// A file at a fresh path holding `text`, with the directory that holds it.
    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    fn parse_broker(_key: &str, text: &str) -> Result<BrokerAddr, renkei_shared::url::UrlError> {
        text.parse()
    }

    fn parse_size(text: &str) -> Option<u64> {
        text.parse::<ByteSize>().ok().map(|size| size.0)
    }

    fn parse_duration(text: &str) -> Option<Duration> {
        duration(text).ok()
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
        let (_dir, path) = file(MINIMAL);
        let c = load(
            Some(&path),
            &flags(&["--ward", "13113", "--interval", "5s"]),
        )
        .unwrap();
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
            (
                "fallback_broker = \"mqtts://hq2:8883\"",
                "must use the scheme of broker",
            ),
            ("fallback_broker = \"http://hq2\"", "fallback_broker"),
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
        let msg = Settings::default().resolve().unwrap_err().to_string();
        assert_eq!(
            msg,
            "missing broker: give --broker or `broker = …` in the config file"
        );
        let msg = error_of("broker = \"h\"\nward = 131041\nsite = \"s\"");
        assert!(msg.starts_with("missing name"), "{msg}");
    }

    #[test]
    fn unknown_keys_and_bad_syntax_name_the_key() {
        let err = error_of("brokr = \"x\"");
        assert!(err.contains("brokr"), "{err}");
        let (dir, path) = file("ward = [1]");
        let err = ConfigFile::read(&path).unwrap_err().to_string();
        assert!(err.contains("agent.toml") && err.contains("ward"), "{err}");
        let err = ConfigFile::read(&dir.path().join("none.toml")).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }));
    }

    #[test]
    fn the_example_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/agent.example.toml");
        let c = ConfigFile::read(&path).unwrap().resolve().unwrap();
        assert_eq!(c.site.site.as_str(), "nishi-shinjuku-es");
        assert_eq!(c.shelter.unwrap().evacuees, Some(120));
    }

    #[test]
    fn errors_in_the_file_name_the_file_the_line_the_key_and_the_value() {
        let text = |extra: &str| format!("{MINIMAL}\n# the site's own\n{extra}\n");
        let error = |extra: &str| {
            ConfigFile::parse(Path::new("/etc/renkei/agent.toml"), &text(extra))
                .and_then(|f| f.resolve())
                .unwrap_err()
                .to_string()
        };
        let at_line_8 = |rest: &str| format!("config file /etc/renkei/agent.toml, line 8: {rest}");
        // A value its type refuses.
        assert_eq!(
            error("mode = \"real\""),
            at_line_8("mode = \"real\": expected actual, exercise or test")
        );
        assert_eq!(
            error("outbox_max = \"16 MB\""),
            at_line_8("outbox_max = \"16 MB\": unknown size unit \"MB\" (use B, KiB, MiB or GiB)")
        );
        assert_eq!(
            error("evacuees = 12.5"),
            at_line_8("evacuees = \"12.5\": expected a whole number from 0")
        );
        assert_eq!(
            error("location = [35.6, 139.7]"),
            at_line_8(
                "location = \"[35.6, 139.7]\": invalid type: sequence, expected a string or a \
                 number"
            )
        );
        // A value the checks across settings refuse: the line of its key.
        assert_eq!(
            error("kind = \"depot\"\ncapacity = 10").replace("line 9", "line 8"),
            at_line_8("capacity = \"10\": only a shelter reports this (kind is not shelter)")
        );
        // A key this agent does not know.
        let msg = error("evacuee = 12");
        assert!(
            msg.starts_with(&at_line_8(
                "evacuee = \"12\": unknown field `evacuee`, expected one of `broker`"
            )),
            "{msg}"
        );
        // Not TOML: the line where it stops being TOML.
        assert_eq!(
            error("shelter_state = open"),
            at_line_8("not valid TOML: string values must be quoted, expected literal string")
        );
        // Secrets are never repeated, however they are wrong.
        for line in ["form_pin = [246810]", "password = { a = 1 }"] {
            let msg = error(line);
            assert!(msg.contains("= \"…\": invalid type"), "{msg}");
            assert!(!msg.contains("246810") && !msg.contains("a = 1"), "{msg}");
        }
        // What no line holds: a key given nowhere.
        assert_eq!(
            error("username = \"agent-1\""),
            "missing password: give --password or `password = …` in the config file"
        );
    }

    #[test]
    fn every_unit_spelling_is_taken_in_the_file_and_as_a_flag() {
        let (_dir, path) = file(MINIMAL);
        let via_file = |line: &str| resolve(&format!("{MINIMAL}\n{line}")).unwrap();
        let via_flag = |args: &[&str]| load(Some(&path), &flags(args)).unwrap();
        let sizes: [(&str, u64); 11] = [
            ("1048576", 1 << 20),
            ("1048576B", 1 << 20),
            ("1024K", 1 << 20),
            ("1024k", 1 << 20),
            ("1024KiB", 1 << 20),
            ("1 MiB", 1 << 20),
            ("16M", 16 << 20),
            ("16MiB", 16 << 20),
            ("1G", 1 << 30),
            ("1GiB", 1 << 30),
            (" 2MiB ", 2 << 20),
        ];
        for (text, bytes) in sizes {
            let c = via_file(&format!("outbox_max = {text:?}\ndisk_reserve = {text:?}"));
            assert_eq!((c.outbox_max, c.disk_reserve), (bytes, bytes), "{text}");
            let c = via_flag(&["--outbox-max", text, "--disk-reserve", text]);
            assert_eq!((c.outbox_max, c.disk_reserve), (bytes, bytes), "{text}");
        }
        let c = via_file("outbox_max = 1048576\ndisk_reserve = 0");
        assert_eq!(
            (c.outbox_max, c.disk_reserve),
            (1 << 20, 0),
            "bare TOML integers"
        );
        let intervals: [(&str, u64); 8] = [
            ("30", 30),
            ("30s", 30),
            ("30 s", 30),
            ("2000ms", 2),
            ("2m", 120),
            ("2min", 120),
            ("1h", 3600),
            ("24h", 86_400),
        ];
        for (text, seconds) in intervals {
            let expected = Duration::from_secs(seconds);
            assert_eq!(via_file(&format!("interval = {text:?}")).interval, expected);
            assert_eq!(via_flag(&["--interval", text]).interval, expected, "{text}");
        }
        assert_eq!(via_file("interval = 45").interval, Duration::from_secs(45));
        let form = |line: &str| via_file(&format!("form_listen = \"127.0.0.1:0\"\n{line}"));
        for (text, expected) in [
            ("100ms", Duration::from_millis(100)),
            ("1500ms", Duration::from_millis(1500)),
            ("10", Duration::from_secs(10)),
            ("10s", Duration::from_secs(10)),
            ("3m", Duration::from_secs(180)),
            ("3min", Duration::from_secs(180)),
            ("2h", Duration::from_secs(7200)),
        ] {
            let c = form(&format!(
                "form_header_timeout = {text:?}\nform_pin_lockout = {text:?}"
            ));
            let l = c.form_limits;
            assert_eq!(
                (l.header_timeout, l.pin_lockout),
                (expected, expected),
                "{text}"
            );
        }
        let refused = |flag: &str, key: &str, bad: &str| {
            let as_flag = Settings::augment_args(clap::Command::new("run"))
                .try_get_matches_from(["run", flag, bad]);
            assert!(as_flag.is_err(), "{flag} {bad}");
            assert!(
                resolve(&format!("{MINIMAL}\n{key} = {bad:?}")).is_err(),
                "{key} {bad}"
            );
        };
        for bad in ["1.5MiB", "16MB", "1TiB", "MiB", "-1"] {
            refused("--outbox-max", "outbox_max", bad);
        }
        for bad in ["1.5s", "3d", "-1s", "s", "1 hour"] {
            refused("--interval", "interval", bad);
        }
    }

    #[test]
    fn every_name_of_a_choice_is_taken_in_the_file_and_as_a_flag() {
        let (_dir, path) = file(MINIMAL);
        let via_file = |line: &str| resolve(&format!("{MINIMAL}\n{line}")).unwrap();
        let via_flag = |args: &[&str]| load(Some(&path), &flags(args)).unwrap();
        for (text, kind) in [
            ("ward_office", SiteKind::WardOffice),
            ("ward-office", SiteKind::WardOffice),
            ("shelter", SiteKind::Shelter),
            ("depot", SiteKind::Depot),
        ] {
            assert_eq!(via_file(&format!("kind = {text:?}")).kind, kind);
            assert_eq!(via_flag(&["--kind", text]).kind, kind);
        }
        for (text, state) in [
            ("not_open", ShelterState::NotOpen),
            ("not-open", ShelterState::NotOpen),
            ("preparing", ShelterState::Preparing),
            (" open ", ShelterState::Open),
            ("closed", ShelterState::Closed),
            ("unknown", ShelterState::Unknown),
        ] {
            let c = via_file(&format!("shelter_state = {text:?}"));
            assert_eq!(c.shelter.unwrap().state, state, "{text}");
        }
        for (text, confirm) in [("receipt", Confirm::Receipt), ("puback", Confirm::PubAck)] {
            assert_eq!(via_file(&format!("confirm = {text:?}")).confirm, confirm);
            assert_eq!(via_flag(&["--confirm", text]).confirm, confirm);
        }
        let c = via_flag(&[
            "--mode",
            "test",
            "--power",
            "battery",
            "--hq",
            "dissolved",
            "--mobile",
            "degraded",
        ]);
        assert_eq!(c.mode, Mode::Test);
        assert_eq!(c.power.configured_power, Some(PowerSource::Battery));
        assert_eq!(
            (c.hq, c.comms.mobile),
            (HqState::Dissolved, Some(LinkState::Degraded))
        );
        let refused = Settings::augment_args(clap::Command::new("run"))
            .try_get_matches_from(["run", "--mode", "real"])
            .unwrap_err()
            .to_string();
        assert!(
            refused.contains("'real'") && refused.contains("--mode"),
            "{refused}"
        );
    }

    /// A name in the file is the one the wire and the JSON mirror use: the enums derive both
    /// from one rule, and this holds them to it.
    #[test]
    fn the_names_of_choices_are_their_serde_names() {
        fn same<T: ValueEnum + serde::Serialize + fmt::Debug>() {
            for v in T::value_variants() {
                let serde_name = toml::Value::try_from(v).unwrap();
                assert_eq!(serde_name.as_str(), Some(name_of(v).as_str()), "{v:?}");
            }
        }
        same::<Mode>();
        same::<SiteKind>();
        same::<ShelterState>();
        same::<PowerSource>();
        same::<HqState>();
        same::<LinkState>();
        same::<renkei_shared::ShelterType>();
        same::<renkei_shared::LifelineState>();
        same::<renkei_shared::BuildingSafety>();
        same::<renkei_shared::IncidentCategory>();
        same::<renkei_shared::RoadState>();
        same::<renkei_shared::Severity>();
        same::<renkei_shared::Certainty>();
        same::<renkei_shared::Role>();
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
        let (_dir, path) = file(&format!(
            "{MINIMAL}\nform_listen = \"127.0.0.1:8090\"\nform_pin = \"2468\"\n"
        ));
        let msg = load(Some(&path), &flags(&[])).unwrap_err().to_string();
        assert_eq!(
            msg,
            format!(
                "config file {}, line 8: form_pin = \"…\": expected 6 to 64 digits (0–9): a \
                 shorter PIN is guessed too easily",
                path.display()
            )
        );
        // Given as a flag (or in the environment), the same value is not the file's fault.
        let msg = load(Some(&path), &flags(&["--form-pin", "12"]))
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("form_pin = \"…\": expected 6"), "{msg}");
        // A good flag mends the file's bad value.
        let c = load(Some(&path), &flags(&["--form-pin", "135790"])).unwrap();
        assert_eq!(c.form_pin, Some(FormPin("135790".into())));
        // Which keys a file gives, for any key.
        let file = ConfigFile::read(&path).unwrap();
        assert!(file.line("form_pin").is_some() && file.line("ward").is_some());
        assert_eq!(file.line("form_hosts"), None);
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
