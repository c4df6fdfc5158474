//! The reducer (`State::apply`) on sequences of decoded messages.
//!
//! Input: frames, each a 2-byte big-endian length then that many bytes (the last frame takes
//! what is left); each frame goes through `codec::decode`, as in the broker's ingest, and the
//! envelopes that decode are applied in order (at most 64).
//!
//! Checks:
//! - applying never panics, nor do the derived views (`rollups`, `level`, `reporting`,
//!   `silent_sites`) at the latest time sent, far in the past and far in the future;
//! - idempotence: applying the whole sequence a second time leaves the state unchanged, and
//!   no message of the second pass reports `Change::Updated`;
//! - order: when no two distinct messages share `(origin, boot, seq)` (the reducer's
//!   precondition: a sender never reuses a stamp), applying them in reverse gives the same state.
#![no_main]

use std::collections::BTreeSet;

use libfuzzer_sys::fuzz_target;
use renkei_shared::{Change, Envelope, Mode, State, Timestamp, codec};

const MAX_MESSAGES: usize = 64;

fuzz_target!(|data: &[u8]| {
    let envs = frames(data);
    if envs.is_empty() {
        return;
    }

    let mut state = State::new();
    for env in &envs {
        state.apply(env);
    }
    views(&state, &envs);

    let once = state.clone();
    for env in &envs {
        let change = state.apply(env);
        assert!(
            !matches!(change, Change::Updated { .. }),
            "re-applying {env:?} reported {change:?}"
        );
    }
    assert_eq!(state, once, "applying the sequence twice changed the state");

    // Distinct messages with distinct stamps: the order must not matter.
    let mut unique: Vec<&Envelope> = Vec::new();
    for env in &envs {
        if !unique.contains(&env) {
            unique.push(env);
        }
    }
    let stamps: BTreeSet<_> = unique
        .iter()
        .map(|e| (&e.header.origin, e.header.boot, e.header.seq))
        .collect();
    if stamps.len() == unique.len() {
        let mut reversed = State::new();
        for env in envs.iter().rev() {
            reversed.apply(env);
        }
        assert_eq!(
            reversed, once,
            "the order of distinct messages changed the state"
        );
    }
});

fn frames(mut data: &[u8]) -> Vec<Envelope> {
    let mut envs = Vec::new();
    while envs.len() < MAX_MESSAGES {
        let frame = match data {
            [] => break,
            [hi, lo, rest @ ..] => {
                let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(rest.len());
                let (frame, rest) = rest.split_at(len);
                data = rest;
                frame
            }
            [_] => break,
        };
        if let Ok(env) = codec::decode(frame) {
            envs.push(env);
        }
    }
    envs
}

fn views(state: &State, envs: &[Envelope]) {
    let latest = envs
        .iter()
        .map(|e| e.header.sent_at)
        .max()
        .unwrap_or_default();
    for now in [latest, Timestamp(i64::MIN), Timestamp(i64::MAX)] {
        for mode in [Mode::Actual, Mode::Exercise, Mode::Test] {
            let world = state.world(mode);
            for rollup in world.rollups(now) {
                let _ = rollup.level();
                let _ = rollup.reporting();
            }
            let _ = world.silent_sites(now).count();
        }
    }
}
