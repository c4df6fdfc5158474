//! The wire codec on arbitrary bytes.
//!
//! Checks, for any input:
//! - `codec::decode` returns (never panics, never loops);
//! - a frame that decodes re-encodes (`codec::encode` must accept whatever `decode` accepted),
//!   to a frame no longer than the input, that decodes to the same envelope;
//! - a decoded envelope has its own topic unless it is a site message from HQ, that topic
//!   validates it (`validate_for_topic`) and parses back from both trees;
//! - its JSON mirror (what the broker publishes under `renkei/json/v1/`) reads back equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use renkei_shared::validate::validate_for_topic;
use renkei_shared::{Body, Envelope, Origin, Topic, codec};

fuzz_target!(|data: &[u8]| {
    let Ok(env) = codec::decode(data) else {
        return;
    };
    let bytes = codec::encode(&env).expect("a decoded envelope must re-encode");
    assert!(
        bytes.len() <= data.len(),
        "re-encoding grew the frame: {} > {} bytes",
        bytes.len(),
        data.len()
    );
    assert_eq!(
        codec::decode(&bytes).as_ref(),
        Ok(&env),
        "encode∘decode is not the identity"
    );

    match Topic::of(&env) {
        Ok(topic) => {
            assert_eq!(validate_for_topic(&env, &topic), Ok(()));
            assert_eq!(Topic::parse(&topic.to_string()), Ok(topic.clone()));
            assert_eq!(Topic::parse_json(&topic.json()), Ok(topic));
        }
        Err(e) => assert!(
            matches!(env.header.origin, Origin::Hq(_))
                && !matches!(env.body, Body::Alert(_) | Body::Ack(_) | Body::Command(_)),
            "a valid message has no topic: {e}"
        ),
    }

    let json = serde_json::to_vec(&env).expect("a decoded envelope must serialise to JSON");
    let back: Envelope = serde_json::from_slice(&json).expect("the JSON mirror must read back");
    assert_eq!(back, env, "the JSON mirror changed the envelope");
});
