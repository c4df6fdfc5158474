//! Which instance runs the rules, when several read the same NATS JetStream cluster.
//!
//! Every instance ingests and serves the whole state, but two rule engines would announce
//! every alert twice. The instances hold a lease in the cluster's replicated key-value store
//! (bucket `renkei`, key `rules-leader`, its value the holder's client id):
//! - the holder writes the key again every [`RENEW`], each write conditioned on the revision
//!   it read, so that it fails if anyone else wrote meanwhile;
//! - the others read it every [`RENEW`]; one that has seen the same revision for [`LEASE`]
//!   (by its own monotonic clock: no clocks are compared across machines) takes the lease
//!   over with a write conditioned on that revision, which exactly one of them wins;
//! - an absent key (first start; the bucket forgets keys [`FORGET`] after their last
//!   write) is created, which again exactly one wins.
//!
//! When the leader dies, another instance runs the rules within about [`LEASE`] + 2 ×
//! [`RENEW`] (7 s: a follower may first see the last revision up to a [`RENEW`] after it was
//! written, and looks once a [`RENEW`]); measured 5.2–6.2 s (`tests/tests/cluster.rs`).
//! The store is the engine's own (JetStream, replicated ×3), not a home-made election.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use tokio::task::JoinHandle;

/// How long the lease holds without a renewal.
pub const LEASE: Duration = Duration::from_secs(5);
/// How often the leader renews it, and the others look at it.
pub const RENEW: Duration = Duration::from_secs(1);
/// How long the bucket keeps a key after its last write.
pub const FORGET: Duration = Duration::from_secs(60);
const BUCKET: &str = "renkei";
const KEY: &str = "rules-leader";

/// The running lease holder or seeker.
#[derive(Debug)]
pub struct Leadership {
    task: JoinHandle<()>,
    /// Whether this instance holds the lease now.
    pub leading: Arc<AtomicBool>,
}

impl Leadership {
    /// Starts seeking the lease as `id` (this instance's client id).
    pub async fn start(
        js: jetstream::Context,
        id: String,
        replicas: usize,
    ) -> Result<Leadership, String> {
        // The bucket's stream, made as the client's `create_key_value` would (which first asks
        // for account details that NATS 2.9 answers in a form this client does not read), with
        // a duplicate window within the lease (NATS refuses one longer than `max_age`).
        js.get_or_create_stream(stream::Config {
            name: format!("KV_{BUCKET}"),
            description: Some("Renkei: which instance runs the rules".to_owned()),
            subjects: vec![format!("$KV.{BUCKET}.>")],
            max_messages_per_subject: 1,
            max_age: FORGET,
            duplicate_window: RENEW,
            storage: stream::StorageType::File,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            num_replicas: replicas.max(1),
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("key-value bucket {BUCKET}: {e}"))?;
        let store = js
            .get_key_value(BUCKET)
            .await
            .map_err(|e| format!("key-value bucket {BUCKET}: {e}"))?;
        let leading = Arc::new(AtomicBool::new(false));
        let flag = leading.clone();
        let task = tokio::spawn(async move {
            // The holder's revision as this instance last saw it change, and when.
            let mut seen: Option<(u64, Instant)> = None;
            let mut tick = tokio::time::interval(RENEW);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let value = || bytes::Bytes::from(id.clone().into_bytes());
                let leads = match store.entry(KEY).await {
                    Err(e) => {
                        // The cluster may be electing a leader: keep what we had until the
                        // lease would lapse anyway.
                        tracing::debug!(error = %e, "rules: cannot read the lease");
                        flag.load(Ordering::Acquire)
                            && seen.is_some_and(|(_, at)| at.elapsed() < LEASE)
                    }
                    Ok(None) => store.create(KEY, value()).await.is_ok(),
                    Ok(Some(entry)) if entry.value.as_ref() == id.as_bytes() => {
                        let renewed = store.update(KEY, value(), entry.revision).await;
                        if let Ok(revision) = renewed {
                            seen = Some((revision, Instant::now()));
                        }
                        renewed.is_ok()
                    }
                    Ok(Some(entry)) => match seen {
                        Some((revision, at))
                            if revision == entry.revision && at.elapsed() >= LEASE =>
                        {
                            // The holder stopped renewing: take it over, once.
                            let taken = store.update(KEY, value(), entry.revision).await;
                            seen = None;
                            taken.is_ok()
                        }
                        Some((revision, _)) if revision == entry.revision => false,
                        _ => {
                            seen = Some((entry.revision, Instant::now()));
                            false
                        }
                    },
                };
                let was = flag.swap(leads, Ordering::AcqRel);
                if leads && !was {
                    tracing::info!(%id, "rules: took the lease; this instance runs them");
                } else if was && !leads {
                    tracing::warn!(%id, "rules: lost the lease; another instance runs them");
                }
            }
        });
        Ok(Leadership { task, leading })
    }

    pub fn stop(self) {
        self.task.abort();
        self.leading.store(false, Ordering::Release);
    }
}
