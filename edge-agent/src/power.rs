//! The heartbeat's power source and battery charge: read from the OS where it exposes them
//! (Linux `/sys/class/power_supply`), otherwise the values staff configured, otherwise
//! unknown.
//!
//! Each supply is a directory with a `type` (`Mains`, `Battery`, `UPS`, `USB`, …) and, by
//! type, `online` (1 when external power is present), `capacity` (percent) and `status`
//! (`Charging`, `Discharging`, `Full`, `Not charging`). Anything missing, unreadable or odd is
//! treated as not known: a heartbeat is never held up by the power reading.
//!
//! The OS cannot tell the grid from a generator (both are "mains online"), so when the box
//! sees external power and staff configured a generator, the heartbeat says generator; when
//! the box runs on its battery, that wins over whatever was configured.

use std::io::Read;
use std::path::{Path, PathBuf};

use renkei_shared::PowerSource;

/// Where Linux lists its power supplies.
pub const DEFAULT_POWER_SUPPLY_DIR: &str = "/sys/class/power_supply";

/// Longest sysfs value read: real ones are a few bytes, so anything longer is not one.
const MAX_VALUE_BYTES: u64 = 64;
/// Supplies looked at: a box has a handful; a directory with thousands is not sysfs.
const MAX_SUPPLIES: usize = 64;

/// What the OS says about power; `None` where it says nothing usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PowerReading {
    /// [`PowerSource::Grid`] for "external power present" (grid or generator alike),
    /// [`PowerSource::Battery`] for "running on the battery".
    pub power: Option<PowerSource>,
    pub battery_pct: Option<u8>,
}

/// Where the heartbeat's power figures come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PowerProbe {
    /// The sysfs directory to read, or `None` to use the configured values only.
    pub sysfs_dir: Option<PathBuf>,
    /// Staff's word, used where the OS says nothing.
    pub configured_power: Option<PowerSource>,
    pub configured_battery_pct: Option<u8>,
}

impl PowerProbe {
    /// The power source and battery charge for the next heartbeat.
    pub fn read(&self) -> (PowerSource, Option<u8>) {
        let os = self
            .sysfs_dir
            .as_deref()
            .map(read_power_supplies)
            .unwrap_or_default();
        let power = match (os.power, self.configured_power) {
            // "Mains online" is also what a generator looks like.
            (Some(PowerSource::Grid), Some(PowerSource::Generator)) => PowerSource::Generator,
            (Some(seen), _) => seen,
            (None, Some(configured)) => configured,
            (None, None) => PowerSource::Unknown,
        };
        (power, os.battery_pct.or(self.configured_battery_pct))
    }
}

/// What one supply directory says.
#[derive(Debug, Default)]
struct Supply {
    kind: String,
    online: Option<bool>,
    capacity: Option<u8>,
    status: Option<String>,
}

/// Reads every supply under `dir` (e.g. `/sys/class/power_supply`). Never fails: a missing
/// directory or garbage in a file gives `None` for what it would have said.
pub fn read_power_supplies(dir: &Path) -> PowerReading {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return PowerReading::default();
    };
    let mut paths: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .take(MAX_SUPPLIES)
        .collect();
    // Directory order is arbitrary; sorted, two batteries always give the same reading.
    paths.sort();
    let supplies: Vec<Supply> = paths.iter().map(|p| read_supply(p)).collect();
    combine(&supplies)
}

fn read_supply(dir: &Path) -> Supply {
    Supply {
        kind: read_value(&dir.join("type")).unwrap_or_default(),
        online: read_value(&dir.join("online")).and_then(|v| match v.as_str() {
            "1" => Some(true),
            "0" => Some(false),
            _ => None,
        }),
        capacity: read_value(&dir.join("capacity"))
            .and_then(|v| v.parse::<u8>().ok())
            .filter(|&pct| pct <= 100),
        status: read_value(&dir.join("status")),
    }
}

/// A sysfs value, trimmed; `None` if the file is missing, unreadable, too long or not text.
fn read_value(path: &Path) -> Option<String> {
    let file = std::fs::File::open(path).ok()?;
    let mut bytes = Vec::new();
    file.take(MAX_VALUE_BYTES + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    if bytes.len() as u64 > MAX_VALUE_BYTES {
        return None;
    }
    let text = String::from_utf8(bytes).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

fn combine(supplies: &[Supply]) -> PowerReading {
    let is = |s: &Supply, kind: &str| s.kind.eq_ignore_ascii_case(kind);
    let status_is = |s: &Supply, want: &str| {
        s.status
            .as_deref()
            .is_some_and(|v| v.eq_ignore_ascii_case(want))
    };
    let external = |s: &&Supply| !is(s, "Battery");
    let batteries: Vec<&Supply> = supplies.iter().filter(|s| is(s, "Battery")).collect();
    let ups: Vec<&Supply> = supplies.iter().filter(|s| is(s, "UPS")).collect();

    // Any supply other than a battery that is online means external power (Mains, USB-C PD,
    // a UPS on line power).
    let online = supplies
        .iter()
        .filter(external)
        .any(|s| s.online == Some(true));
    let discharging = batteries
        .iter()
        .chain(&ups)
        .any(|s| status_is(s, "Discharging"));
    let charging = batteries
        .iter()
        .chain(&ups)
        .any(|s| status_is(s, "Charging") || status_is(s, "Full"));
    // Every external supply says offline and there is a battery: the box runs on it.
    let all_offline = {
        let mut ext = supplies.iter().filter(external).peekable();
        ext.peek().is_some() && ext.all(|s| s.online == Some(false))
    };

    let power = if online && !ups.iter().any(|s| status_is(s, "Discharging")) {
        Some(PowerSource::Grid)
    } else if discharging || (all_offline && !batteries.is_empty()) {
        Some(PowerSource::Battery)
    } else if charging {
        // A battery charges only from external power.
        Some(PowerSource::Grid)
    } else {
        None
    };
    // The box's own battery first; a UPS's charge where the box has none.
    let pct_of = |list: &[&Supply]| {
        let known: Vec<u32> = list
            .iter()
            .filter_map(|s| s.capacity)
            .map(u32::from)
            .collect();
        let n = u32::try_from(known.len()).ok().filter(|&n| n > 0)?;
        u8::try_from(known.iter().sum::<u32>() / n).ok()
    };
    PowerReading {
        power,
        battery_pct: pct_of(&batteries).or_else(|| pct_of(&ups)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake sysfs tree: `(supply, [(file, content)])`.
    fn tree(supplies: &[(&str, &[(&str, &str)])]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, files) in supplies {
            let d = dir.path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            for (file, content) in *files {
                std::fs::write(d.join(file), content).unwrap();
            }
        }
        dir
    }

    fn probe(dir: Option<&Path>, power: Option<PowerSource>, pct: Option<u8>) -> PowerProbe {
        PowerProbe {
            sysfs_dir: dir.map(Path::to_owned),
            configured_power: power,
            configured_battery_pct: pct,
        }
    }

    #[test]
    fn mains_online_is_grid() {
        let t = tree(&[
            ("AC", &[("type", "Mains\n"), ("online", "1\n")]),
            (
                "BAT0",
                &[
                    ("type", "Battery\n"),
                    ("status", "Charging\n"),
                    ("capacity", "88\n"),
                ],
            ),
        ]);
        assert_eq!(
            read_power_supplies(t.path()),
            PowerReading {
                power: Some(PowerSource::Grid),
                battery_pct: Some(88)
            }
        );
        // The OS wins over a configured battery…
        assert_eq!(
            probe(Some(t.path()), Some(PowerSource::Battery), Some(20)).read(),
            (PowerSource::Grid, Some(88))
        );
        // …but "mains" is what a generator looks like too.
        assert_eq!(
            probe(Some(t.path()), Some(PowerSource::Generator), None).read(),
            (PowerSource::Generator, Some(88))
        );
    }

    #[test]
    fn a_discharging_battery_is_battery_power_with_its_charge() {
        let t = tree(&[
            ("AC", &[("type", "Mains"), ("online", "0")]),
            (
                "BAT0",
                &[
                    ("type", "Battery"),
                    ("status", "Discharging"),
                    ("capacity", "37"),
                ],
            ),
        ]);
        assert_eq!(
            probe(Some(t.path()), Some(PowerSource::Grid), Some(80)).read(),
            (PowerSource::Battery, Some(37))
        );
        // No mains directory at all: the status alone says it.
        let t = tree(&[(
            "BAT1",
            &[
                ("type", "Battery"),
                ("status", "Discharging"),
                ("capacity", "37"),
            ],
        )]);
        assert_eq!(
            read_power_supplies(t.path()).power,
            Some(PowerSource::Battery)
        );
    }

    #[test]
    fn a_ups_on_battery_is_battery_power() {
        let t = tree(&[(
            "ups",
            &[
                ("type", "UPS"),
                ("online", "0"),
                ("status", "Discharging"),
                ("capacity", "64"),
            ],
        )]);
        assert_eq!(
            read_power_supplies(t.path()),
            PowerReading {
                power: Some(PowerSource::Battery),
                battery_pct: Some(64)
            }
        );
    }

    #[test]
    fn garbage_is_not_known_and_never_fails() {
        let long = "9".repeat(500);
        let t = tree(&[
            ("AC", &[("type", "Mains"), ("online", "yes please")]),
            (
                "BAT0",
                &[
                    ("type", "Battery"),
                    ("status", "\u{0}\u{1}"),
                    ("capacity", "lots"),
                ],
            ),
            ("BAT1", &[("type", "Battery"), ("capacity", "250")]),
            ("BAT2", &[("type", "Battery"), ("capacity", &long)]),
            ("BAT3", &[("type", "Battery"), ("capacity", "-5")]),
            ("empty", &[]),
        ]);
        // Invalid UTF-8 too.
        std::fs::write(t.path().join("AC/status"), [0xff, 0xfe]).unwrap();
        // A plain file where a supply directory would be.
        std::fs::write(t.path().join("stray"), "x").unwrap();
        assert_eq!(read_power_supplies(t.path()), PowerReading::default());
        assert_eq!(
            probe(Some(t.path()), Some(PowerSource::Generator), Some(80)).read(),
            (PowerSource::Generator, Some(80))
        );
    }

    #[test]
    fn missing_dirs_fall_back_to_configured_values_then_unknown() {
        let gone = Path::new("/nonexistent/renkei/power_supply");
        assert_eq!(read_power_supplies(gone), PowerReading::default());
        assert_eq!(
            probe(Some(gone), Some(PowerSource::Generator), Some(80)).read(),
            (PowerSource::Generator, Some(80))
        );
        assert_eq!(
            probe(Some(gone), None, None).read(),
            (PowerSource::Unknown, None)
        );
        // An empty power_supply directory (a desktop or VM) says nothing either.
        let t = tree(&[]);
        assert_eq!(
            probe(Some(t.path()), None, None).read(),
            (PowerSource::Unknown, None)
        );
        // Reading turned off: configured values only, even where sysfs has something.
        assert_eq!(
            probe(None, Some(PowerSource::None), None).read(),
            (PowerSource::None, None)
        );
    }

    #[test]
    fn two_batteries_average_in_a_stable_order() {
        let t = tree(&[
            ("BAT0", &[("type", "Battery"), ("capacity", "40")]),
            ("BAT1", &[("type", "Battery"), ("capacity", "60")]),
        ]);
        assert_eq!(read_power_supplies(t.path()).battery_pct, Some(50));
        assert_eq!(read_power_supplies(t.path()).power, None);
    }
}
