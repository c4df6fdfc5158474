#![allow(clippy::unwrap_used)] // test helpers: a failure should stop the test loudly

//! Golden vectors: the wire bytes (and the JSON mirror) of every sample message.
//!
//! A change to the model that changes the wire format fails here. If the change is meant, bump
//! `SCHEMA_VERSION` where old agents could be affected, regenerate with
//! `RENKEI_BLESS=1 cargo test -p renkei-shared --test golden`, and review the diff.

use std::fs;
use std::path::PathBuf;

use renkei_shared::{codec, sample};

fn vectors() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::new();
    for (i, chunk) in bytes.chunks(32).enumerate() {
        if i > 0 {
            out.push('\n');
        }
        for b in chunk {
            out.push_str(&format!("{b:02x}"));
        }
    }
    out.push('\n');
    out
}

fn unhex(text: &str) -> Vec<u8> {
    let digits: Vec<u8> = text.bytes().filter(|b| b.is_ascii_hexdigit()).collect();
    digits
        .chunks(2)
        .map(|p| u8::from_str_radix(std::str::from_utf8(p).unwrap(), 16).unwrap())
        .collect()
}

#[test]
fn wire_format_matches_golden_vectors() {
    let bless = std::env::var_os("RENKEI_BLESS").is_some();
    let mut mismatches = Vec::new();
    for (name, env) in sample::named() {
        let bytes = codec::encode(&env).unwrap();
        let json = serde_json::to_string_pretty(&env).unwrap() + "\n";
        let hex_path = vectors().join(format!("{name}.hex"));
        let json_path = vectors().join(format!("{name}.json"));
        if bless {
            fs::create_dir_all(vectors()).unwrap();
            fs::write(&hex_path, hex(&bytes)).unwrap();
            fs::write(&json_path, &json).unwrap();
            continue;
        }
        let golden = fs::read_to_string(&hex_path)
            .unwrap_or_else(|e| panic!("{}: {e} (bless with RENKEI_BLESS=1)", hex_path.display()));
        // The checked-in bytes must still decode to the sample, whatever this build encodes.
        assert_eq!(
            codec::decode(&unhex(&golden)).as_ref(),
            Ok(&env),
            "{name}: golden bytes"
        );
        if unhex(&golden) != bytes {
            mismatches.push(name);
        }
        let golden_json = fs::read_to_string(&json_path).unwrap();
        assert_eq!(golden_json, json, "{name}: JSON mirror changed");
    }
    assert!(
        mismatches.is_empty(),
        "wire format changed for {mismatches:?}"
    );
}
