//! The wire format: one schema-version byte, then the [`Envelope`] in postcard.
//!
//! ```text
//! [ SCHEMA_VERSION: u8 ][ postcard(Envelope) ]      at most MAX_FRAME bytes in all
//! ```
//!
//! [`decode`] checks the size before it reads anything, the version before it reads the
//! envelope, that no bytes trail the envelope, and then [`validate`]s it. Every failure is a
//! [`CodecError`] with a stable [`CodecError::reason`] for counting; nothing here panics on
//! input. The golden vectors in `shared/tests/vectors/` pin the format.

use crate::model::Envelope;
use crate::validate::{ValidationError, validate};

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: u8 = 1;

/// Largest frame accepted, in bytes. Renkei's messages are a few hundred bytes; 16 KiB leaves
/// room for long descriptions and keeps one bad sender from filling memory.
pub const MAX_FRAME: usize = 16 * 1024;

/// Why bytes are not a Renkei message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("empty payload")]
    Empty,
    #[error("payload of {len} bytes is larger than {max}")]
    TooLarge { len: usize, max: usize },
    #[error("schema version {0} is not supported (this build reads {SCHEMA_VERSION})")]
    UnsupportedVersion(u8),
    #[error("payload does not decode: {0}")]
    Malformed(postcard::Error),
    #[error("{0} bytes trail the message")]
    TrailingBytes(usize),
    #[error("message is invalid: {0}")]
    Invalid(#[from] ValidationError),
    #[error("message does not encode: {0}")]
    Encode(postcard::Error),
}

impl CodecError {
    /// A short stable name for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            CodecError::Empty => "empty",
            CodecError::TooLarge { .. } => "too_large",
            CodecError::UnsupportedVersion(_) => "unsupported_version",
            CodecError::Malformed(_) => "malformed",
            CodecError::TrailingBytes(_) => "trailing_bytes",
            CodecError::Invalid(e) => e.reason(),
            CodecError::Encode(_) => "encode",
        }
    }
}

/// Encodes a message, refusing one that is invalid or larger than [`MAX_FRAME`].
pub fn encode(env: &Envelope) -> Result<Vec<u8>, CodecError> {
    validate(env)?;
    let mut out = vec![SCHEMA_VERSION];
    out = postcard::to_extend(env, out).map_err(CodecError::Encode)?;
    if out.len() > MAX_FRAME {
        return Err(CodecError::TooLarge {
            len: out.len(),
            max: MAX_FRAME,
        });
    }
    Ok(out)
}

/// Decodes and validates a message.
pub fn decode(bytes: &[u8]) -> Result<Envelope, CodecError> {
    let env: Envelope = unframe(bytes)?;
    validate(&env)?;
    Ok(env)
}

/// Reads one framed value (size limit, version byte, postcard, nothing trailing), for every
/// type the wire carries in this framing (messages and receipts).
pub(crate) fn unframe<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    if bytes.len() > MAX_FRAME {
        return Err(CodecError::TooLarge {
            len: bytes.len(),
            max: MAX_FRAME,
        });
    }
    let (&version, body) = bytes.split_first().ok_or(CodecError::Empty)?;
    if version != SCHEMA_VERSION {
        return Err(CodecError::UnsupportedVersion(version));
    }
    let (value, rest): (T, &[u8]) =
        postcard::take_from_bytes(body).map_err(CodecError::Malformed)?;
    if !rest.is_empty() {
        return Err(CodecError::TrailingBytes(rest.len()));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::model::*;
    use crate::sample;

    #[test]
    fn refuses_bad_frames_with_reasons() {
        assert_eq!(decode(&[]), Err(CodecError::Empty));
        assert_eq!(decode(&[9, 0, 0]), Err(CodecError::UnsupportedVersion(9)));
        assert_eq!(decode(&[SCHEMA_VERSION]).unwrap_err().reason(), "malformed");
        let big = vec![SCHEMA_VERSION; MAX_FRAME + 1];
        assert_eq!(
            decode(&big),
            Err(CodecError::TooLarge {
                len: MAX_FRAME + 1,
                max: MAX_FRAME
            })
        );
        let mut trailing = encode(&sample::status()).unwrap();
        trailing.push(0);
        assert_eq!(decode(&trailing), Err(CodecError::TrailingBytes(1)));
    }

    #[test]
    fn refuses_to_encode_oversize_messages() {
        let mut env = sample::incident();
        if let Body::Incident(i) = &mut env.body {
            i.description = "あ".repeat(1000); // 3,000 bytes: within the text limit
        }
        assert!(encode(&env).is_ok());
        let mut env = sample::supplies();
        if let Body::Supplies(s) = &mut env.body {
            s.lines = vec![s.lines[0]; 65];
        }
        assert_eq!(encode(&env).unwrap_err().reason(), "too_long");
    }

    #[test]
    fn an_unknown_future_variant_is_an_error_not_a_panic() {
        let mut bytes = encode(&sample::status()).unwrap();
        // Header first: origin variant tag is the first byte after the version.
        bytes[1] = 0x7f;
        assert_eq!(decode(&bytes).unwrap_err().reason(), "malformed");
    }

    #[test]
    fn heartbeats_are_small() {
        // A heartbeat goes out every 10–60 s from 2,000 sites over thin links.
        let len = encode(&sample::status()).unwrap().len();
        assert!(len < 120, "heartbeat is {len} bytes");
    }

    proptest! {
        #[test]
        fn round_trips_every_valid_message(env in any::<Envelope>()) {
            match encode(&env) {
                Ok(bytes) => prop_assert_eq!(decode(&bytes), Ok(env)),
                // Arbitrary text may exceed the limits; that must be the only reason to refuse.
                // Arbitrary envelopes may exceed the limits or put HQ bodies on a site's origin;
                // those must be the only reasons to refuse.
                Err(e) => prop_assert!(
                    matches!(
                        e,
                        CodecError::Invalid(ValidationError::TooLong { .. } | ValidationError::NotFromHq(_))
                            | CodecError::TooLarge { .. }
                    ),
                    "{e}"
                ),
            }
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
            let mut framed = vec![SCHEMA_VERSION];
            framed.extend_from_slice(&bytes);
            let _ = decode(&framed);
        }

        #[test]
        fn truncation_is_always_detected(env in any::<Envelope>(), cut in 0usize..400) {
            if let Ok(bytes) = encode(&env) {
                let cut = cut % bytes.len();
                prop_assert!(decode(&bytes[..cut]).is_err());
            }
        }
    }
}
