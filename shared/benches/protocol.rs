//! Codec and reducer speed, each against a peer measured in the same run.
//!
//! - encode/decode: postcard (the wire) against serde_json (the integrators' mirror) on the
//!   same messages;
//! - reducer: applying a message to a state of 2,000 sites, against a bare `BTreeMap` insert of
//!   the same message (the floor any keyed state store pays);
//! - roll-ups: all 23 wards from 2,000 sites (what the dashboard does per frame).
//!
//! Run with `cargo bench -p renkei-shared --bench protocol`.

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use renkei_shared::{Body, Envelope, Id, Origin, SiteRef, State, WARDS, codec, sample};

/// 2,000 sites spread over the wards, each with a status and a shelter report.
fn sites(n: usize) -> Vec<Envelope> {
    let mut out = Vec::with_capacity(n * 2);
    for i in 0..n {
        let site = SiteRef {
            ward: WARDS[i % WARDS.len()].code,
            site: Id::new(format!("site-{i:04}")).expect("valid id"),
        };
        for mut env in [sample::status(), sample::shelter()] {
            env.header.origin = Origin::Site(site.clone());
            out.push(env);
        }
    }
    out
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec");
    for (name, env) in [("status", sample::status()), ("shelter", sample::shelter())] {
        let wire = codec::encode(&env).expect("sample encodes");
        let json = serde_json::to_vec(&env).expect("sample serialises");
        group.bench_function(format!("postcard_encode/{name}"), |b| {
            b.iter(|| codec::encode(black_box(&env)))
        });
        group.bench_function(format!("json_encode/{name}"), |b| {
            b.iter(|| serde_json::to_vec(black_box(&env)))
        });
        group.bench_function(format!("postcard_decode/{name}"), |b| {
            b.iter(|| codec::decode(black_box(&wire)))
        });
        group.bench_function(format!("json_decode/{name}"), |b| {
            b.iter(|| serde_json::from_slice::<Envelope>(black_box(&json)))
        });
    }
    group.finish();
}

fn reducer(c: &mut Criterion) {
    let msgs = sites(2000);
    let mut state = State::new();
    for m in &msgs {
        state.apply(m);
    }
    let mut update = msgs[1001].clone();
    let mut group = c.benchmark_group("reducer");
    group.bench_function("apply/2000_sites", |b| {
        b.iter(|| {
            update.header.seq += 1;
            state.apply(black_box(&update))
        })
    });
    let mut map: BTreeMap<SiteRef, Envelope> = BTreeMap::new();
    for m in &msgs {
        if let Origin::Site(s) = &m.header.origin {
            map.insert(s.clone(), m.clone());
        }
    }
    let key = match &update.header.origin {
        Origin::Site(s) => s.clone(),
        Origin::Hq(_) => unreachable!("sites() builds site messages"),
    };
    group.bench_function("btreemap_insert/2000_sites", |b| {
        b.iter(|| map.insert(black_box(key.clone()), black_box(update.clone())))
    });
    let now = sample::SENT_AT;
    group.bench_function("rollups/2000_sites", |b| {
        b.iter(|| {
            state
                .world(renkei_shared::Mode::Actual)
                .rollups(black_box(now))
        })
    });
    assert!(matches!(update.body, Body::Shelter(_)));
    group.finish();
}

criterion_group!(benches, codec, reducer);
criterion_main!(benches);
