//! The recorder's write path against the floor SQLite sets on this disk, in the same run.
//!
//! - `recorder`: 20,000 accepted messages (2,000 sites × status and shelter × 5) through
//!   [`Recorder`]: its channel (in hand-offs of [`HANDOFF_RECORDS`], as ingest sends them),
//!   its batches, one `synchronous = FULL` transaction per batch, the `messages` table with its
//!   unique key and time index, and the stop that commits the last batch.
//! - `sqlite_floor`: the same payloads, in the same batches and with the same pragmas, into a
//!   table of `(id INTEGER PRIMARY KEY, payload BLOB)` with one prepared statement: what any
//!   recorder on SQLite pays at least.
//!
//! Run with `cargo bench -p renkei-broker --bench recorder`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use renkei_broker::config::RecorderConfig;
use renkei_broker::db;
use renkei_broker::metrics::Metrics;
use renkei_broker::recorder::{Archive, HANDOFF_RECORDS, Record, Recorder};
use renkei_shared::{Envelope, Id, Origin, SiteRef, Topic, WARDS, encode, sample};

const SITES: usize = 2_000;
const ROUNDS: u64 = 5;

fn messages() -> Vec<(Topic, Envelope, Vec<u8>)> {
    let mut out = Vec::new();
    for round in 0..ROUNDS {
        for i in 0..SITES {
            let site = SiteRef {
                ward: WARDS[i % WARDS.len()].code,
                site: Id::new(format!("site-{i:04}")).expect("valid id"),
            };
            for (n, mut env) in [sample::status(), sample::shelter()]
                .into_iter()
                .enumerate()
            {
                env.header.origin = Origin::Site(site.clone());
                env.header.seq = round * 2 + n as u64 + 1;
                let topic = Topic::of(&env).expect("sample has a topic");
                let payload = encode(&env).expect("sample encodes");
                out.push((topic, env, payload));
            }
        }
    }
    out
}

fn recorder(messages: &[(Topic, Envelope, Vec<u8>)]) -> Duration {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = RecorderConfig::default();
    let recorder = Recorder::start(
        &Archive::Sqlite(dir.path().to_path_buf()),
        config,
        Arc::new(Metrics::new()),
    )
    .expect("recorder starts");
    let tx = recorder.tx().expect("recorder running");
    let mut records: Vec<Record> = messages
        .iter()
        .map(|(topic, env, payload)| Record::Accepted {
            received_at: sample::SENT_AT,
            topic: topic.clone(),
            envelope: Box::new(env.clone()),
            payload: payload.clone(),
            via: None,
        })
        .collect();
    let started = Instant::now();
    // In hand-offs of the size ingest makes under load.
    while !records.is_empty() {
        let rest = records.split_off(records.len().min(HANDOFF_RECORDS));
        let handoff = std::mem::replace(&mut records, rest);
        assert!(tx.send_all(handoff), "recorder stopped");
    }
    drop(tx);
    recorder.stop();
    started.elapsed()
}

fn sqlite_floor(messages: &[(Topic, Envelope, Vec<u8>)]) -> Duration {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut conn = db::open(dir.path()).expect("database opens");
    conn.execute_batch("CREATE TABLE floor (id INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
        .expect("table");
    let batch = RecorderConfig::default().batch_size;
    let started = Instant::now();
    for chunk in messages.chunks(batch) {
        let tx = conn.transaction().expect("transaction");
        {
            let mut insert = tx
                .prepare_cached("INSERT INTO floor (payload) VALUES (?1)")
                .expect("statement");
            for (_, _, payload) in chunk {
                insert.execute([payload]).expect("insert");
            }
        }
        tx.commit().expect("commit");
    }
    started.elapsed()
}

fn bench(c: &mut Criterion) {
    let messages = messages();
    let mut group = c.benchmark_group("record_20000");
    group.throughput(Throughput::Elements(messages.len() as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.bench_function("recorder", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| recorder(&messages)).sum())
    });
    group.bench_function("sqlite_floor", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| sqlite_floor(&messages)).sum())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
