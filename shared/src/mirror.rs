//! The JSON mirror: what integrators read under `renkei/json/v1/`.
//!
//! Each message is its envelope's JSON with one field more, `received_at`: when HQ's broker
//! received it, as its recorder keeps it. An integrator that was away (disconnected, or told
//! by [`crate::topic::SKIPPED_NOTICE`] that messages were dropped for it) fetches what it
//! missed with `GET /api/v1/events?since_time=<the last received_at it has>` and drops the
//! ones it already holds by `(origin, boot, seq)`.

use serde::{Deserialize, Serialize};

use crate::model::{Envelope, Timestamp};

/// One message on the JSON mirror.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Mirrored {
    #[serde(flatten)]
    pub envelope: Envelope,
    /// When HQ's broker received the message, Unix milliseconds (its recorder's time): where
    /// to resume with `GET /api/v1/events?since_time=`.
    pub received_at: Timestamp,
}

/// [`Mirrored`] without owning the envelope, for writing.
#[derive(Debug, Serialize)]
pub struct MirroredRef<'a> {
    #[serde(flatten)]
    pub envelope: &'a Envelope,
    pub received_at: Timestamp,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sample;

    #[test]
    fn a_mirrored_message_is_the_envelopes_json_plus_its_receipt_time() {
        let envelope = sample::shelter();
        let text = serde_json::to_value(MirroredRef {
            envelope: &envelope,
            received_at: Timestamp(1_700_000_000_123),
        })
        .unwrap();
        let mut plain = serde_json::to_value(&envelope).unwrap();
        plain["received_at"] = serde_json::json!(1_700_000_000_123_i64);
        assert_eq!(text, plain);
        let back: Mirrored = serde_json::from_value(text).unwrap();
        assert_eq!(back.envelope, envelope);
        assert_eq!(back.received_at, Timestamp(1_700_000_000_123));
        // A reader of plain envelopes reads it too.
        let _: Envelope = serde_json::from_value(plain).unwrap();
    }
}
