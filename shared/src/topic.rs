//! Every MQTT topic Renkei uses, built and parsed here and nowhere else.
//!
//! ```text
//! renkei/v1/{ward}/{site}/status                  site status (heartbeat)      retained
//! renkei/v1/{ward}/{site}/shelter                 shelter status               retained
//! renkei/v1/{ward}/{site}/supplies                stock on hand                retained
//! renkei/v1/{ward}/{site}/life                    birth / death (last will)    retained
//! renkei/v1/{ward}/{site}/request/{request_id}    a supply request             retained
//! renkei/v1/{ward}/{site}/incident/{incident_id}  an incident report           retained
//! renkei/v1/{ward}/{site}/command/{command_id}    what the site did with a command  not retained
//! renkei/v1/hq/alert/{alert_id}                   an alert                     retained
//! renkei/v1/hq/ack/alert/{alert_id}/{user}        a user's answer to an alert  retained
//! renkei/v1/hq/ack/request/{ward}/{site}/{request_id}  HQ's step on a request  retained
//! renkei/v1/cmd/{ward}/{site}                     HQ → agent command           not retained
//! renkei/json/v1/…                                the same tree as JSON, for integrators
//! ```
//!
//! `{ward}` is the six-digit official code (e.g. `131041`). Requests and incidents have a topic
//! each, retained, so that a dashboard or integrator that connects late receives every open
//! request and incident at once, not only the latest one of a site. Acknowledgements are
//! retained per user and alert for the same reason.
//!
//! Every message has exactly one topic, [`Topic::of`]: the broker refuses a message published
//! anywhere else, so a topic's ward and site always agree with the header inside.

use core::fmt;

use crate::model::{AckTarget, Body, BodyKind, Envelope, Id, Origin, SiteRef};
use crate::ward::WardCode;

/// The root of the postcard tree.
pub const ROOT: &str = "renkei/v1";
/// The root of the JSON mirror for integrators.
pub const JSON_ROOT: &str = "renkei/json/v1";
/// A filter for every postcard message.
pub const ALL: &str = "renkei/v1/#";
/// A filter for every JSON message.
pub const ALL_JSON: &str = "renkei/json/v1/#";

/// The broker's notice to one subscriber that it fell so far behind that messages of one of
/// its filters were dropped for it: a QoS 0 publish it gets whether it subscribed to this
/// topic or not, JSON `{"filter": "<the filter>", "skipped": <messages>}`, before the next
/// message it reads. A live view subscribes again (the retained state comes anew); an
/// integrator fetches what it missed from the recorder (`GET /api/v1/events?since_time=`).
pub const SKIPPED_NOTICE: &str = "$renkei/skipped";

/// What a site topic carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SiteChannel {
    Status,
    Shelter,
    Supplies,
    Life,
    Request(Id),
    Incident(Id),
    /// The site's answer to one command.
    CommandResult(Id),
}

/// A parsed Renkei topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Topic {
    Site { site: SiteRef, channel: SiteChannel },
    Alert { alert_id: Id },
    AlertAck { alert_id: Id, user: Id },
    RequestAck { site: SiteRef, request_id: Id },
    Command { site: SiteRef },
}

/// Why a topic is not a Renkei topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic does not start with {ROOT}/ or {JSON_ROOT}/")]
    Root,
    #[error("topic has an unknown shape")]
    Shape,
    #[error("topic names no special ward: {0:?}")]
    Ward(String),
    #[error("topic level is not a valid id: {0:?}")]
    Id(String),
    #[error("topic has an unknown channel {0:?}")]
    Channel(String),
}

/// Why a message has no topic of its own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicForError {
    #[error("a site message ({0:?}) must come from a site")]
    NotFromSite(BodyKind),
}

impl Topic {
    /// The one topic a message is published on.
    pub fn of(env: &Envelope) -> Result<Topic, TopicForError> {
        let from_site = || match &env.header.origin {
            Origin::Site(site) => Ok(site.clone()),
            Origin::Hq(_) => Err(TopicForError::NotFromSite(env.body.kind())),
        };
        let site_topic = |channel| {
            Ok(Topic::Site {
                site: from_site()?,
                channel,
            })
        };
        match &env.body {
            Body::Status(_) => site_topic(SiteChannel::Status),
            Body::Shelter(_) => site_topic(SiteChannel::Shelter),
            Body::Supplies(_) => site_topic(SiteChannel::Supplies),
            Body::Life(_) => site_topic(SiteChannel::Life),
            Body::Request(r) => site_topic(SiteChannel::Request(r.request_id.clone())),
            Body::Incident(i) => site_topic(SiteChannel::Incident(i.incident_id.clone())),
            Body::Alert(a) => Ok(Topic::Alert {
                alert_id: a.alert_id.clone(),
            }),
            Body::Ack(ack) => Ok(match &ack.target {
                AckTarget::Alert(alert_id) => Topic::AlertAck {
                    alert_id: alert_id.clone(),
                    user: ack.by.user.clone(),
                },
                AckTarget::Request { site, request_id } => Topic::RequestAck {
                    site: site.clone(),
                    request_id: request_id.clone(),
                },
            }),
            Body::Command(c) => Ok(Topic::Command {
                site: c.target.clone(),
            }),
            Body::CommandResult(r) => site_topic(SiteChannel::CommandResult(r.command_id.clone())),
        }
    }

    /// Parses a postcard topic (`renkei/v1/…`).
    pub fn parse(topic: &str) -> Result<Topic, TopicError> {
        let rest = topic
            .strip_prefix(ROOT)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or(TopicError::Root)?;
        Topic::parse_levels(rest)
    }

    /// Parses a JSON-mirror topic (`renkei/json/v1/…`).
    pub fn parse_json(topic: &str) -> Result<Topic, TopicError> {
        let rest = topic
            .strip_prefix(JSON_ROOT)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or(TopicError::Root)?;
        Topic::parse_levels(rest)
    }

    fn parse_levels(rest: &str) -> Result<Topic, TopicError> {
        let levels: Vec<&str> = rest.split('/').collect();
        match levels.as_slice() {
            ["hq", "alert", alert_id] => Ok(Topic::Alert {
                alert_id: id(alert_id)?,
            }),
            ["hq", "ack", "alert", alert_id, user] => Ok(Topic::AlertAck {
                alert_id: id(alert_id)?,
                user: id(user)?,
            }),
            ["hq", "ack", "request", w, s, request_id] => Ok(Topic::RequestAck {
                site: site(w, s)?,
                request_id: id(request_id)?,
            }),
            ["cmd", w, s] => Ok(Topic::Command { site: site(w, s)? }),
            ["hq" | "cmd", ..] => Err(TopicError::Shape),
            [w, s, channel] => {
                let channel = match *channel {
                    "status" => SiteChannel::Status,
                    "shelter" => SiteChannel::Shelter,
                    "supplies" => SiteChannel::Supplies,
                    "life" => SiteChannel::Life,
                    other => return Err(TopicError::Channel(other.into())),
                };
                Ok(Topic::Site {
                    site: site(w, s)?,
                    channel,
                })
            }
            [w, s, channel, item] => {
                let channel = match *channel {
                    "request" => SiteChannel::Request(id(item)?),
                    "incident" => SiteChannel::Incident(id(item)?),
                    "command" => SiteChannel::CommandResult(id(item)?),
                    other => return Err(TopicError::Channel(other.into())),
                };
                Ok(Topic::Site {
                    site: site(w, s)?,
                    channel,
                })
            }
            _ => Err(TopicError::Shape),
        }
    }

    /// The same topic in the JSON mirror.
    pub fn json(&self) -> String {
        let mut json = String::with_capacity(JSON_ROOT.len() + 48);
        json.push_str(JSON_ROOT);
        json.push('/');
        // Writing to a String cannot fail.
        let _ = self.write_suffix(&mut json);
        json
    }

    /// Whether messages on this topic are retained (latest state) rather than events.
    pub fn retained(&self) -> bool {
        !matches!(
            self,
            Topic::Command { .. }
                | Topic::Site {
                    channel: SiteChannel::CommandResult(_),
                    ..
                }
        )
    }

    /// The site the topic belongs to, if any (for access control).
    pub fn site(&self) -> Option<&SiteRef> {
        match self {
            Topic::Site { site, .. } | Topic::RequestAck { site, .. } | Topic::Command { site } => {
                Some(site)
            }
            Topic::Alert { .. } | Topic::AlertAck { .. } => None,
        }
    }

    /// Writes the part after the root (one write per topic, no allocation: every message's
    /// topic is written on ingest's and the recorder's hot paths).
    fn write_suffix(&self, out: &mut impl fmt::Write) -> fmt::Result {
        match self {
            Topic::Site { site, channel } => {
                let SiteRef { ward, site } = site;
                match channel {
                    SiteChannel::Status => write!(out, "{ward}/{site}/status"),
                    SiteChannel::Shelter => write!(out, "{ward}/{site}/shelter"),
                    SiteChannel::Supplies => write!(out, "{ward}/{site}/supplies"),
                    SiteChannel::Life => write!(out, "{ward}/{site}/life"),
                    SiteChannel::Request(r) => write!(out, "{ward}/{site}/request/{r}"),
                    SiteChannel::Incident(i) => write!(out, "{ward}/{site}/incident/{i}"),
                    SiteChannel::CommandResult(c) => write!(out, "{ward}/{site}/command/{c}"),
                }
            }
            Topic::Alert { alert_id } => write!(out, "hq/alert/{alert_id}"),
            Topic::AlertAck { alert_id, user } => write!(out, "hq/ack/alert/{alert_id}/{user}"),
            Topic::RequestAck { site, request_id } => {
                write!(
                    out,
                    "hq/ack/request/{}/{}/{request_id}",
                    site.ward, site.site
                )
            }
            Topic::Command { site } => write!(out, "cmd/{}/{}", site.ward, site.site),
        }
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(ROOT)?;
        f.write_str("/")?;
        self.write_suffix(f)
    }
}

/// A filter for everything one site publishes (`renkei/v1/{ward}/{site}/#`).
pub fn site_filter(site: &SiteRef) -> String {
    format!("{ROOT}/{}/{}/#", site.ward, site.site)
}

/// A filter for everything the sites of one ward publish (`renkei/v1/{ward}/#`).
pub fn ward_filter(ward: WardCode) -> String {
    format!("{ROOT}/{ward}/#")
}

/// A filter for every alert (`renkei/v1/hq/#`: alerts and acknowledgements).
pub const HQ_FILTER: &str = "renkei/v1/hq/#";

/// What a ward operator reads over MQTT, and what a ward operator's dashboard subscribes to:
/// the ward's own sites, every alert (HQ raises alerts for all to see) with everyone's
/// answers to them, and HQ's steps on the ward's own supply requests. The broker refuses a
/// ward login any filter outside these (`acl::may_subscribe`).
pub fn ward_reader_filters(ward: WardCode) -> [String; 4] {
    [
        ward_filter(ward),
        format!("{ROOT}/hq/alert/#"),
        format!("{ROOT}/hq/ack/alert/#"),
        format!("{ROOT}/hq/ack/request/{ward}/#"),
    ]
}

/// The command topic filter an agent subscribes to.
pub fn command_filter(site: &SiteRef) -> String {
    Topic::Command { site: site.clone() }.to_string()
}

fn id(level: &str) -> Result<Id, TopicError> {
    Id::new(level).map_err(|_| TopicError::Id(level.into()))
}

fn site(ward: &str, site: &str) -> Result<SiteRef, TopicError> {
    // Topics carry the six-digit form only, so each ward has exactly one topic tree.
    if ward.len() != 6 {
        return Err(TopicError::Ward(ward.into()));
    }
    let ward: WardCode = ward.parse().map_err(|_| TopicError::Ward(ward.into()))?;
    Ok(SiteRef {
        ward,
        site: id(site)?,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::model::*;

    fn shinjuku(site: &str) -> SiteRef {
        SiteRef {
            ward: WardCode(131041),
            site: Id::new(site).unwrap(),
        }
    }

    #[test]
    fn builds_the_documented_tree() {
        let s = shinjuku("nishi-shinjuku-es");
        let cases = [
            (
                Topic::Site {
                    site: s.clone(),
                    channel: SiteChannel::Status,
                },
                "renkei/v1/131041/nishi-shinjuku-es/status",
            ),
            (
                Topic::Site {
                    site: s.clone(),
                    channel: SiteChannel::Request(Id::new("r-1").unwrap()),
                },
                "renkei/v1/131041/nishi-shinjuku-es/request/r-1",
            ),
            (
                Topic::Site {
                    site: s.clone(),
                    channel: SiteChannel::CommandResult(Id::new("cmd-1").unwrap()),
                },
                "renkei/v1/131041/nishi-shinjuku-es/command/cmd-1",
            ),
            (
                Topic::Alert {
                    alert_id: Id::new("a1").unwrap(),
                },
                "renkei/v1/hq/alert/a1",
            ),
            (
                Topic::AlertAck {
                    alert_id: Id::new("a1").unwrap(),
                    user: Id::new("sato").unwrap(),
                },
                "renkei/v1/hq/ack/alert/a1/sato",
            ),
            (
                Topic::RequestAck {
                    site: s.clone(),
                    request_id: Id::new("r-1").unwrap(),
                },
                "renkei/v1/hq/ack/request/131041/nishi-shinjuku-es/r-1",
            ),
            (
                Topic::Command { site: s.clone() },
                "renkei/v1/cmd/131041/nishi-shinjuku-es",
            ),
        ];
        for (topic, text) in cases {
            assert_eq!(topic.to_string(), text);
            assert_eq!(Topic::parse(text), Ok(topic.clone()));
            let json = topic.json();
            assert_eq!(json, text.replace("renkei/v1/", "renkei/json/v1/"));
            assert_eq!(Topic::parse_json(&json), Ok(topic));
        }
    }

    #[test]
    fn refuses_what_is_not_a_renkei_topic() {
        let bad = [
            ("other/v1/131041/a/status", TopicError::Root),
            ("renkei/v1", TopicError::Root),
            ("renkei/v2/131041/a/status", TopicError::Root),
            (
                "renkei/v1/131041/a/weather",
                TopicError::Channel("weather".into()),
            ),
            (
                "renkei/v1/132012/a/status",
                TopicError::Ward("132012".into()),
            ),
            ("renkei/v1/13104/a/status", TopicError::Ward("13104".into())),
            ("renkei/v1/131041/+/status", TopicError::Id("+".into())),
            ("renkei/v1/131041/#", TopicError::Shape),
            ("renkei/v1/131041//status", TopicError::Id("".into())),
            ("renkei/v1/131041/a/status/extra/more", TopicError::Shape),
            ("renkei/v1/hq/alert/a/b", TopicError::Shape),
        ];
        for (text, err) in bad {
            assert_eq!(Topic::parse(text), Err(err), "{text}");
        }
    }

    #[test]
    fn only_commands_and_their_results_are_not_retained() {
        assert!(
            !Topic::Command {
                site: shinjuku("a")
            }
            .retained()
        );
        assert!(
            !Topic::Site {
                site: shinjuku("a"),
                channel: SiteChannel::CommandResult(Id::new("c").unwrap()),
            }
            .retained()
        );
        assert!(
            Topic::Site {
                site: shinjuku("a"),
                channel: SiteChannel::Incident(Id::new("c").unwrap()),
            }
            .retained()
        );
        assert!(
            Topic::Alert {
                alert_id: Id::new("a").unwrap()
            }
            .retained()
        );
    }

    #[test]
    fn filters() {
        assert_eq!(site_filter(&shinjuku("a")), "renkei/v1/131041/a/#");
        assert_eq!(ward_filter(WardCode(131041)), "renkei/v1/131041/#");
        assert_eq!(command_filter(&shinjuku("a")), "renkei/v1/cmd/131041/a");
    }

    proptest! {
        /// Every message's topic parses back to itself, in both trees.
        #[test]
        fn topic_of_every_message_round_trips(env in any::<Envelope>()) {
            if let Ok(topic) = Topic::of(&env) {
                prop_assert_eq!(Topic::parse(&topic.to_string()), Ok(topic.clone()));
                prop_assert_eq!(Topic::parse_json(&topic.json()), Ok(topic));
            } else {
                prop_assert!(matches!(env.header.origin, Origin::Hq(_)));
            }
        }

        /// Arbitrary text never panics the parser.
        #[test]
        fn parser_never_panics(text in "\\PC{0,80}") {
            let _ = Topic::parse(&text);
            let _ = Topic::parse(&format!("renkei/v1/{text}"));
        }
    }
}
