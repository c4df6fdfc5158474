//! Validation of decoded messages: what the types cannot say by themselves.
//!
//! A message that decodes may still be wrong: a ward code outside the 23, an id that cannot be a
//! topic level, a percentage above 100, a name of megabytes. [`validate`] refuses those with a
//! reason that can be counted and logged; [`validate_for_topic`] also checks that the message
//! was published on its own topic.

use crate::model::*;
use crate::topic::{Topic, TopicForError};
use crate::ward::WardCode;

/// Longest name or address in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Longest free text (description, note, instruction) in bytes.
pub const MAX_TEXT_BYTES: usize = 4096;
/// Most lines in one stock report.
pub const MAX_STOCK_LINES: usize = 64;
/// Most wards one alert may name.
pub const MAX_ALERT_WARDS: usize = 23;

/// Why a message is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("ward code {0} is not one of the 23 special wards")]
    UnknownWard(u32),
    #[error("{field} is not a valid id: {value:?}")]
    BadId { field: &'static str, value: String },
    #[error("{field} is {len} bytes, more than {max}")]
    TooLong {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field} is out of range: {value}")]
    OutOfRange { field: &'static str, value: i64 },
    #[error("{0}")]
    NoTopic(#[from] TopicForError),
    #[error("a {0} message must come from HQ, not from a site")]
    NotFromHq(&'static str),
    #[error("published on {published} but belongs on {expected}")]
    WrongTopic { published: String, expected: String },
}

impl ValidationError {
    /// A short stable name for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            ValidationError::UnknownWard(_) => "unknown_ward",
            ValidationError::BadId { .. } => "bad_id",
            ValidationError::TooLong { .. } => "too_long",
            ValidationError::OutOfRange { .. } => "out_of_range",
            ValidationError::NoTopic(_) => "no_topic",
            ValidationError::NotFromHq(_) => "not_from_hq",
            ValidationError::WrongTopic { .. } => "wrong_topic",
        }
    }
}

type Result<T = ()> = core::result::Result<T, ValidationError>;

/// Checks a decoded message.
pub fn validate(env: &Envelope) -> Result {
    match &env.header.origin {
        Origin::Site(site) => site_ref(site)?,
        Origin::Hq(node) => id("origin.hq", node)?,
    }
    // Alerts, acknowledgements and commands speak for HQ; a site may not forge them.
    let from_hq = matches!(env.header.origin, Origin::Hq(_));
    match &env.body {
        Body::Alert(_) | Body::Ack(_) | Body::Command(_) if !from_hq => {
            return Err(ValidationError::NotFromHq(env.body.kind().as_str()));
        }
        _ => {}
    }
    match &env.body {
        Body::Status(s) => {
            text("status.name", &s.name, MAX_NAME_BYTES)?;
            if let Some(p) = s.location {
                point(p)?;
            }
            if let Some(b) = s.battery_pct {
                range("status.battery_pct", i64::from(b), 0, 100)?;
            }
            range("status.interval_s", i64::from(s.interval_s), 1, 86_400)?;
        }
        Body::Shelter(_) => {}
        Body::Supplies(s) => {
            if s.lines.len() > MAX_STOCK_LINES {
                return Err(ValidationError::TooLong {
                    field: "supplies.lines",
                    len: s.lines.len(),
                    max: MAX_STOCK_LINES,
                });
            }
        }
        Body::Request(r) => {
            id("request.request_id", &r.request_id)?;
            text("request.note", &r.note, MAX_TEXT_BYTES)?;
        }
        Body::Incident(i) => {
            id("incident.incident_id", &i.incident_id)?;
            if let Some(p) = i.location {
                point(p)?;
            }
            if let Some(a) = &i.address {
                text("incident.address", a, MAX_NAME_BYTES)?;
            }
            text("incident.description", &i.description, MAX_TEXT_BYTES)?;
        }
        Body::Alert(a) => {
            id("alert.alert_id", &a.alert_id)?;
            text("alert.headline", &a.headline, MAX_NAME_BYTES)?;
            text("alert.description", &a.description, MAX_TEXT_BYTES)?;
            text("alert.instruction", &a.instruction, MAX_TEXT_BYTES)?;
            if a.wards.len() > MAX_ALERT_WARDS {
                return Err(ValidationError::TooLong {
                    field: "alert.wards",
                    len: a.wards.len(),
                    max: MAX_ALERT_WARDS,
                });
            }
            for w in &a.wards {
                ward(*w)?;
            }
            if let Some(site) = &a.site {
                site_ref(site)?;
            }
        }
        Body::Ack(ack) => {
            match &ack.target {
                AckTarget::Alert(alert_id) => id("ack.target", alert_id)?,
                AckTarget::Request { site, request_id } => {
                    site_ref(site)?;
                    id("ack.target.request_id", request_id)?;
                }
            }
            id("ack.by.user", &ack.by.user)?;
            text("ack.by.organisation", &ack.by.organisation, MAX_NAME_BYTES)?;
            text("ack.note", &ack.note, MAX_TEXT_BYTES)?;
        }
        Body::Life(Life::Birth { agent_version }) => {
            text("life.agent_version", agent_version, MAX_NAME_BYTES)?;
        }
        Body::Life(Life::Death) => {}
        Body::Command(c) => {
            id("command.command_id", &c.command_id)?;
            site_ref(&c.target)?;
            if let CommandAction::SetInterval { seconds } = c.action {
                range("command.seconds", i64::from(seconds), 1, 86_400)?;
            }
        }
        Body::CommandResult(r) => id("command_result.command_id", &r.command_id)?,
    }
    Ok(())
}

/// Checks a decoded message and that `published` is the one topic it belongs on.
pub fn validate_for_topic(env: &Envelope, published: &Topic) -> Result {
    validate(env)?;
    let expected = Topic::of(env)?;
    if &expected != published {
        return Err(ValidationError::WrongTopic {
            published: published.to_string(),
            expected: expected.to_string(),
        });
    }
    Ok(())
}

fn ward(code: WardCode) -> Result {
    if code.is_known() {
        Ok(())
    } else {
        Err(ValidationError::UnknownWard(code.0))
    }
}

fn site_ref(site: &SiteRef) -> Result {
    ward(site.ward)?;
    id("site", &site.site)
}

fn id(field: &'static str, value: &Id) -> Result {
    if Id::is_valid(value.as_str()) {
        Ok(())
    } else {
        Err(ValidationError::BadId {
            field,
            value: value.as_str().chars().take(80).collect(),
        })
    }
}

fn text(field: &'static str, value: &str, max: usize) -> Result {
    if value.len() > max {
        Err(ValidationError::TooLong {
            field,
            len: value.len(),
            max,
        })
    } else {
        Ok(())
    }
}

fn range(field: &'static str, value: i64, min: i64, max: i64) -> Result {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ValidationError::OutOfRange { field, value })
    }
}

fn point(p: GeoPoint) -> Result {
    range(
        "location.lat_e6",
        i64::from(p.lat_e6),
        -90_000_000,
        90_000_000,
    )?;
    range(
        "location.lon_e6",
        i64::from(p.lon_e6),
        -180_000_000,
        180_000_000,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample;

    #[test]
    fn samples_are_valid_on_their_topics() {
        for env in sample::all() {
            let topic = Topic::of(&env).unwrap();
            assert_eq!(
                validate_for_topic(&env, &topic),
                Ok(()),
                "{:?}",
                env.body.kind()
            );
        }
    }

    #[test]
    fn refuses_unknown_wards_and_bad_ids() {
        let mut env = sample::status();
        env.header.origin = Origin::Site(SiteRef {
            ward: WardCode(132012),
            site: Id::new("a").unwrap(),
        });
        assert_eq!(validate(&env), Err(ValidationError::UnknownWard(132012)));

        let mut env = sample::status();
        let bad: Id = serde_json::from_str("\"a/b\"").unwrap();
        env.header.origin = Origin::Site(SiteRef {
            ward: WardCode(131041),
            site: bad,
        });
        assert!(matches!(
            validate(&env),
            Err(ValidationError::BadId { field: "site", .. })
        ));
    }

    #[test]
    fn refuses_out_of_range_values() {
        let mut env = sample::status();
        if let Body::Status(s) = &mut env.body {
            s.battery_pct = Some(101);
        }
        assert_eq!(
            validate(&env),
            Err(ValidationError::OutOfRange {
                field: "status.battery_pct",
                value: 101
            })
        );
    }

    #[test]
    fn refuses_another_sites_topic() {
        let env = sample::status();
        let other = Topic::parse("renkei/v1/131016/chiyoda-es/status").unwrap();
        let err = validate_for_topic(&env, &other).unwrap_err();
        assert_eq!(err.reason(), "wrong_topic");
    }

    #[test]
    fn refuses_hq_messages_from_sites() {
        for mut env in [sample::alert(), sample::ack(), sample::command()] {
            env.header.origin = Origin::Site(sample::site());
            assert_eq!(validate(&env).unwrap_err().reason(), "not_from_hq");
        }
    }

    #[test]
    fn refuses_site_messages_from_hq() {
        let mut env = sample::status();
        env.header.origin = Origin::Hq(Id::new("broker").unwrap());
        let topic = Topic::parse("renkei/v1/131041/nishi-shinjuku-es/status").unwrap();
        assert_eq!(
            validate_for_topic(&env, &topic).unwrap_err().reason(),
            "no_topic"
        );
    }
}
