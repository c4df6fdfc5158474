//! Sizes and durations as operators write them in the broker's and the agent's settings:
//! `"16MiB"`, `"30s"`.
//!
//! One parser for both programs and for files and flags alike, so that a spelling that works in
//! one place works in every other. A value is a whole number, optional blanks, then a unit:
//!
//! | | units |
//! |---|---|
//! | [`ByteSize`] | none or `B` (bytes), `K` `k` `KiB`, `M` `MiB`, `G` `GiB` (powers of 1024) |
//! | [`HumanDuration`] | `ms`, `s`, `m` or `min`, `h` |
//!
//! A size without a unit is bytes. A duration without one is refused ([`UnitError::NoUnit`]):
//! in the broker's file `batch_time = 200` could mean milliseconds or seconds. The agent takes it
//! as seconds, as it always has; it decides that itself from the error. Fractions (`1.5MiB`) and
//! days (`3d`) are refused: every setting fits a whole number of these units.
//!
//! Hand-written rather than humantime and bytesize: those read spellings the files never used
//! (`1.5MB` as 1,500,000 bytes, `"5 minutes"`) and not all that they do (`K`, a bare size).

use core::fmt;
use core::str::FromStr;
use core::time::Duration;

use serde::{Deserialize, Deserializer};

/// A number of bytes, written `20480`, `"20KiB"` or `"1MiB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

/// A duration, written `"500ms"`, `"5s"`, `"2m"` or `"1h"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HumanDuration(pub Duration);

/// Why a text is not a size or a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// It does not start with a whole number.
    #[error("{text:?} is not {what} such as \"{example}\"")]
    NotANumber {
        text: String,
        what: &'static str,
        example: &'static str,
    },
    /// A duration with a number and no unit.
    #[error("{0} has no unit: write {0}ms, {0}s, {0}m or {0}h")]
    NoUnit(u64),
    /// A size unit other than those of the module docs.
    #[error("unknown size unit {0:?} (use B, KiB, MiB or GiB)")]
    SizeUnit(String),
    /// A duration unit other than those of the module docs.
    #[error("unknown duration unit {0:?} (use ms, s, m or h)")]
    DurationUnit(String),
    /// The number times its unit does not fit 64 bits.
    #[error("{0:?} is too large")]
    TooLarge(String),
}

/// The leading whole number of `text` (trimmed) and the unit after it (trimmed).
fn split<'a>(
    text: &'a str,
    what: &'static str,
    example: &'static str,
) -> Result<(u64, &'a str), UnitError> {
    let text = text.trim();
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let number = number.parse().map_err(|_| {
        if digits > 0 {
            UnitError::TooLarge(text.to_owned())
        } else {
            UnitError::NotANumber {
                text: text.to_owned(),
                what,
                example,
            }
        }
    })?;
    Ok((number, unit.trim()))
}

/// Parses a size (see the module docs).
pub fn parse_size(text: &str) -> Result<u64, UnitError> {
    let (number, unit) = split(text, "a size", "20KiB")?;
    let scale: u64 = match unit {
        "" | "B" => 1,
        "K" | "k" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        other => return Err(UnitError::SizeUnit(other.to_owned())),
    };
    number
        .checked_mul(scale)
        .ok_or_else(|| UnitError::TooLarge(text.trim().to_owned()))
}

/// Parses a duration (see the module docs); a bare number is [`UnitError::NoUnit`].
pub fn parse_duration(text: &str) -> Result<Duration, UnitError> {
    let (number, unit) = split(text, "a duration", "5s")?;
    let seconds = |per: u64| {
        number
            .checked_mul(per)
            .map(Duration::from_secs)
            .ok_or_else(|| UnitError::TooLarge(text.trim().to_owned()))
    };
    match unit {
        "ms" => Ok(Duration::from_millis(number)),
        "s" => seconds(1),
        "m" | "min" => seconds(60),
        "h" => seconds(3600),
        "" => Err(UnitError::NoUnit(number)),
        other => Err(UnitError::DurationUnit(other.to_owned())),
    }
}

impl FromStr for ByteSize {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_size(s).map(ByteSize)
    }
}

impl FromStr for HumanDuration {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_duration(s).map(HumanDuration)
    }
}

/// In the largest unit that keeps it whole: `16MiB`, `1000B`.
impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (scale, unit) in [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")] {
            if n >= scale && n.is_multiple_of(scale) {
                return write!(f, "{}{unit}", n / scale);
            }
        }
        write!(f, "{n}B")
    }
}

/// In the largest unit that keeps it whole: `1h`, `90s`, `1500ms`.
impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        for (scale, unit) in [(3_600_000, "h"), (60_000, "m"), (1_000, "s")] {
            if ms >= scale && ms.is_multiple_of(scale) {
                return write!(f, "{}{unit}", ms / scale);
            }
        }
        if ms == 0 {
            return f.write_str("0s");
        }
        write!(f, "{ms}ms")
    }
}

/// A size or a duration as a settings file gives it: a string, or a bare whole number.
enum Written {
    Number(u64),
    Text(String),
}

impl<'de> Deserialize<'de> for Written {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Written;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string such as \"20KiB\" or \"5s\"")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Written, E> {
                Ok(Written::Number(n))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Written, E> {
                u64::try_from(n)
                    .map(Written::Number)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(n), &self))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Written, E> {
                Ok(Written::Text(s.to_owned()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A bare number is bytes.
impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Written::deserialize(d)? {
            Written::Number(n) => Ok(ByteSize(n)),
            Written::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// A bare number is refused with [`UnitError::NoUnit`], which says how to write it.
impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match Written::deserialize(d)? {
            Written::Number(n) => Err(serde::de::Error::custom(UnitError::NoUnit(n))),
            Written::Text(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_size_unit() {
        let cases: [(&str, u64); 17] = [
            ("0", 0),
            ("4096", 4096),
            ("4096B", 4096),
            ("4096 B", 4096),
            ("64K", 64 << 10),
            ("64k", 64 << 10),
            ("64KiB", 64 << 10),
            ("20 KiB", 20 << 10),
            ("16M", 16 << 20),
            ("16MiB", 16 << 20),
            ("3 MiB", 3 << 20),
            ("1G", 1 << 30),
            ("1GiB", 1 << 30),
            ("  19MiB  ", 19 << 20),
            ("17179869183GiB", 17_179_869_183 << 30),
            ("18446744073709551615", u64::MAX),
            ("00012KiB", 12 << 10),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(bytes)), "{text}");
        }
    }

    #[test]
    fn sizes_refused() {
        for text in [
            "", "KiB", "1.5MiB", "-1", "1TiB", "1MB", "1 kb", "1Ki", "lots", "1 MiB x",
        ] {
            assert!(parse_size(text).is_err(), "{text}");
        }
        assert_eq!(
            parse_size("20 parsecs"),
            Err(UnitError::SizeUnit("parsecs".into()))
        );
        assert_eq!(
            parse_size("17179869184GiB"),
            Err(UnitError::TooLarge("17179869184GiB".into()))
        );
        assert_eq!(
            parse_size("99999999999999999999"),
            Err(UnitError::TooLarge("99999999999999999999".into()))
        );
    }

    #[test]
    fn every_duration_unit() {
        let cases = [
            ("250ms", Duration::from_millis(250)),
            ("1500ms", Duration::from_millis(1500)),
            ("0ms", Duration::ZERO),
            ("30s", Duration::from_secs(30)),
            ("30 s", Duration::from_secs(30)),
            ("0s", Duration::ZERO),
            ("2m", Duration::from_secs(120)),
            ("2min", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("24h", Duration::from_secs(86_400)),
            (" 5s ", Duration::from_secs(5)),
        ];
        for (text, d) in cases {
            assert_eq!(parse_duration(text), Ok(d), "{text}");
            assert_eq!(
                text.parse::<HumanDuration>(),
                Ok(HumanDuration(d)),
                "{text}"
            );
        }
    }

    #[test]
    fn durations_refused() {
        assert_eq!(parse_duration("5"), Err(UnitError::NoUnit(5)));
        assert_eq!(
            UnitError::NoUnit(5).to_string(),
            "5 has no unit: write 5ms, 5s, 5m or 5h"
        );
        for text in ["", "s", "-1s", "1.5s", "3d", "1 hour", "5 fortnights", "1H"] {
            assert!(parse_duration(text).is_err(), "{text}");
        }
        assert_eq!(
            parse_duration("99999999999999999999s"),
            Err(UnitError::TooLarge("99999999999999999999s".into()))
        );
        assert_eq!(
            parse_duration("5124095576030432h"),
            Err(UnitError::TooLarge("5124095576030432h".into()))
        );
    }

    #[test]
    fn printed_in_the_largest_whole_unit_and_read_back() {
        for (bytes, text) in [
            (0, "0B"),
            (1000, "1000B"),
            (20 << 10, "20KiB"),
            (16 << 20, "16MiB"),
            (1 << 30, "1GiB"),
            ((1 << 20) + 1, "1048577B"),
        ] {
            assert_eq!(ByteSize(bytes).to_string(), text);
            assert_eq!(text.parse(), Ok(ByteSize(bytes)));
        }
        for (d, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(120), "2m"),
            (Duration::from_secs(3600), "1h"),
            (Duration::from_secs(86_400), "24h"),
        ] {
            assert_eq!(HumanDuration(d).to_string(), text);
            assert_eq!(text.parse(), Ok(HumanDuration(d)));
        }
    }

    #[test]
    fn from_settings_files() {
        #[derive(Debug, Deserialize)]
        struct File {
            size: ByteSize,
            time: Option<HumanDuration>,
        }
        let read = |json: &str| serde_json::from_str::<File>(json).map_err(|e| e.to_string());
        let f = read(r#"{"size": 2097152, "time": "200ms"}"#).unwrap();
        assert_eq!(f.size, ByteSize(2 << 20));
        assert_eq!(f.time, Some(HumanDuration(Duration::from_millis(200))));
        assert_eq!(read(r#"{"size": "1MiB"}"#).unwrap().size, ByteSize(1 << 20));
        let e = read(r#"{"size": 1, "time": 5}"#).unwrap_err();
        assert!(e.starts_with("5 has no unit"), "{e}");
        let e = read(r#"{"size": "20 parsecs"}"#).unwrap_err();
        assert!(e.contains("\"parsecs\""), "{e}");
        let e = read(r#"{"size": -1}"#).unwrap_err();
        assert!(e.contains("a string such as"), "{e}");
        let e = read(r#"{"size": true}"#).unwrap_err();
        assert!(e.contains("a string such as"), "{e}");
    }
}
