//! The one receive path: a topic and payload from the network to a checked message.
//!
//! The broker's ingest, the dashboard and the agent's command link all take what arrives this
//! way, so a message one of them accepts is a message all of them accept: the topic parses,
//! the payload decodes (which validates it) and the message belongs on the topic it came on.

use crate::codec::{CodecError, decode};
use crate::model::Envelope;
use crate::topic::{Topic, TopicError};
use crate::validate::{ValidationError, validate_for_topic};

/// Why something that arrived is not a Renkei message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("topic is not UTF-8")]
    TopicNotUtf8,
    #[error("{0}")]
    Topic(#[from] TopicError),
    #[error("{0}")]
    Payload(#[from] CodecError),
    #[error("{0}")]
    Invalid(#[from] ValidationError),
}

impl Refusal {
    /// A short stable name for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::TopicNotUtf8 | Refusal::Topic(_) => "bad_topic",
            Refusal::Payload(e) => e.reason(),
            Refusal::Invalid(e) => e.reason(),
        }
    }
}

/// Parses `topic`, decodes `payload` and checks that the message belongs on that topic.
pub fn receive(topic: &[u8], payload: &[u8]) -> Result<(Topic, Envelope), Refusal> {
    let text = std::str::from_utf8(topic).map_err(|_| Refusal::TopicNotUtf8)?;
    let topic = Topic::parse(text)?;
    let envelope = decode(payload)?;
    validate_for_topic(&envelope, &topic)?;
    Ok((topic, envelope))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{encode, sample};

    #[test]
    fn a_message_on_its_own_topic_is_received() {
        let env = sample::shelter();
        let topic = Topic::of(&env).unwrap();
        let bytes = encode(&env).unwrap();
        assert_eq!(
            receive(topic.to_string().as_bytes(), &bytes),
            Ok((topic, env))
        );
    }

    #[test]
    fn each_refusal_names_its_reason() {
        let env = sample::shelter();
        let bytes = encode(&env).unwrap();
        let own = Topic::of(&env).unwrap().to_string();
        assert_eq!(
            receive(b"\xff\xfe", &bytes).unwrap_err().reason(),
            "bad_topic"
        );
        assert_eq!(
            receive(b"renkei/v9/x", &bytes).unwrap_err().reason(),
            "bad_topic"
        );
        assert_eq!(receive(own.as_bytes(), &[]).unwrap_err().reason(), "empty");
        assert_eq!(
            receive(own.as_bytes(), &[0xee, 1, 2]).unwrap_err().reason(),
            "unsupported_version"
        );
        let elsewhere = Topic::of(&sample::status()).unwrap().to_string();
        let wrong = receive(elsewhere.as_bytes(), &bytes).unwrap_err();
        assert_eq!(wrong.reason(), "wrong_topic", "{wrong}");
    }
}
