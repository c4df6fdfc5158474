//! Counters for `/metrics`, in the Prometheus text format.
//!
//! The set is small and fixed, so the text is written here rather than through a metrics
//! library and a global recorder. Counters only grow; they are read without locking except the
//! map of rejection reasons, which is touched once per refused message.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use renkei_shared::{BodyKind, Change};

/// Everything the broker counts.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Accepted messages, indexed like [`BodyKind::ALL`].
    accepted: [AtomicU64; BodyKind::ALL.len()],
    /// Refused messages by stable reason (`CodecError::reason`, `ValidationError::reason`,
    /// `bad_topic`).
    rejected: Mutex<BTreeMap<&'static str, u64>>,
    /// What the reducer made of accepted messages.
    updated: AtomicU64,
    duplicate: AtomicU64,
    outdated: AtomicU64,
    not_state: AtomicU64,
    /// Messages re-published on the JSON mirror, and those that could not be.
    json_republished: AtomicU64,
    json_failed: AtomicU64,
    /// Logins accepted, by whether the cache of verified logins answered.
    logins_cached: AtomicU64,
    logins_verified: AtomicU64,
    /// Logins refused by reason (`auth::LoginRefusal::reason`), and lockouts started.
    logins_refused: Mutex<BTreeMap<&'static str, u64>>,
    lockouts: AtomicU64,
    /// Argon2 password checks run (a cached login runs none).
    password_checks: AtomicU64,
    /// Accepted messages whose `sent_at` was off the broker's clock past the tolerance, by
    /// direction, and the largest skew seen each way (ms).
    skew_future: AtomicU64,
    skew_past: AtomicU64,
    skew_future_max: AtomicU64,
    skew_past_max: AtomicU64,
    /// Publishes, subscriptions and last wills refused by topic access control, by reason.
    acl_refused: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// Records waiting for the recorder thread (shared with its senders).
    pub recorder_queue: Arc<AtomicI64>,
    recorder_batches: AtomicU64,
    recorder_rows: AtomicU64,
    recorder_inserted: AtomicU64,
    recorder_last_batch: AtomicU64,
    recorder_failed: AtomicU64,
    recorder_db_bytes: AtomicU64,
    /// What the record may take in all (`recorder.max_bytes` and the disk), and whether it
    /// holds 80 % of it; batches refused for want of room, by reason.
    recorder_budget: AtomicU64,
    recorder_alarm: AtomicU64,
    recorder_refused: Mutex<BTreeMap<&'static str, u64>>,
    /// Receipts published to sites after a commit, the messages they named, and receipts
    /// that could not be handed to the broker.
    receipts_published: AtomicU64,
    receipts_messages: AtomicU64,
    receipts_failed: AtomicU64,
    /// Rule alerts published, raised (active) and cleared.
    rule_alerts_active: AtomicU64,
    rule_alerts_cleared: AtomicU64,
    /// Accepted messages waiting for ingest, and the times publishers were held back because
    /// that queue was full (as last seen by ingest).
    ingest_queue: AtomicU64,
    ingest_holds: AtomicU64,
    /// The router's count of events for connections it had already dropped (a benign race
    /// of disconnect storms, logged at debug level), once the router exists.
    router_gone_events: std::sync::OnceLock<Arc<AtomicU64>>,
    /// Open MQTT connections per listener (shared with the listeners' protocol wrappers).
    pub tcp_connections: Arc<AtomicI64>,
    pub ws_connections: Arc<AtomicI64>,
    pub tls_connections: Arc<AtomicI64>,
    /// TLS handshakes that failed or timed out on the MQTTS listener.
    tls_handshakes_failed: AtomicU64,
    /// Times free memory was handed back to the system ([`crate::trim`]), and the time spent.
    memory_trims: AtomicU64,
    memory_trim_micros: AtomicU64,
    /// Ward mode: the uplink to HQ (all zero otherwise).
    pub uplink: UplinkMetrics,
    /// At HQ: the ward brokers' relays.
    pub relays: crate::relays::Relays,
    /// 1 while this instance runs the rules (always, unless several share a cluster).
    pub rules_leader: AtomicU64,
}

/// Ward mode: how the uplink to HQ stands (see [`crate::uplink`]).
#[derive(Debug, Default)]
pub struct UplinkMetrics {
    /// 1 while connected to HQ.
    pub connected: AtomicU64,
    /// Unix ms since when HQ has been unreachable (0 while connected, or never tried).
    pub down_since_ms: AtomicU64,
    /// Records published to HQ (again after a cut or an overdue receipt included).
    pub forwarded: AtomicU64,
    /// Records HQ's receipts confirmed.
    pub confirmed: AtomicU64,
    /// Times receipts were overdue and everything unconfirmed went again.
    pub overdue: AtomicU64,
    /// The uplink's cursor: every record up to this row id is in HQ's record.
    pub cursor: AtomicI64,
    /// This ward's records not yet confirmed by HQ.
    pub backlog: AtomicU64,
    /// Unix ms of HQ's last receipt.
    pub last_receipt_ms: AtomicU64,
    /// Messages HQ sent down (alerts, acks, commands, other wards) published here.
    pub down: AtomicU64,
    /// Messages HQ sent down again (QoS 1 redelivery), passed over.
    pub down_repeated: AtomicU64,
    /// 1 while connected with records HQ's broker took and HQ has not stored for longer than
    /// the uplink's stall limit: a link that says connected but forwards nothing.
    pub stalled: AtomicU64,
}

impl Metrics {
    pub fn new() -> Self {
        Metrics::default()
    }

    pub fn accepted(&self, kind: BodyKind, change: &Change) {
        if let Some(i) = BodyKind::ALL.iter().position(|k| *k == kind) {
            self.accepted[i].fetch_add(1, Ordering::Relaxed);
        }
        let outcome = match change {
            Change::Updated { .. } => &self.updated,
            Change::Duplicate => &self.duplicate,
            Change::Outdated => &self.outdated,
            Change::NotState => &self.not_state,
        };
        outcome.fetch_add(1, Ordering::Relaxed);
    }

    pub fn rejected(&self, reason: &'static str) {
        let mut map = self.rejected.lock().unwrap_or_else(PoisonError::into_inner);
        *map.entry(reason).or_default() += 1;
    }

    pub fn login_ok(&self, cached: bool) {
        let c = if cached {
            &self.logins_cached
        } else {
            &self.logins_verified
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn login_refused(&self, reason: &'static str) {
        let mut map = self
            .logins_refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *map.entry(reason).or_default() += 1;
    }

    pub fn sent_at_skew(&self, skew: crate::skew::Skew) {
        let (count, max, ms) = match skew {
            crate::skew::Skew::None => return,
            crate::skew::Skew::Future(ms) => (&self.skew_future, &self.skew_future_max, ms),
            crate::skew::Skew::Past(ms) => (&self.skew_past, &self.skew_past_max, ms),
        };
        count.fetch_add(1, Ordering::Relaxed);
        max.fetch_max(u64::try_from(ms).unwrap_or(0), Ordering::Relaxed);
    }

    pub fn password_checked(&self) {
        self.password_checks.fetch_add(1, Ordering::Relaxed);
    }

    pub fn login_lockout(&self) {
        self.lockouts.fetch_add(1, Ordering::Relaxed);
    }

    /// `packet` is `publish`, `subscribe` or `will`.
    pub fn acl_refused(&self, packet: &'static str, reason: &'static str) {
        let mut map = self
            .acl_refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *map.entry((packet, reason)).or_default() += 1;
    }

    pub fn recorder_batch(&self, rows: usize, inserted: usize) {
        self.recorder_batches.fetch_add(1, Ordering::Relaxed);
        self.recorder_rows.fetch_add(rows as u64, Ordering::Relaxed);
        self.recorder_inserted
            .fetch_add(inserted as u64, Ordering::Relaxed);
        self.recorder_last_batch
            .store(rows as u64, Ordering::Relaxed);
    }

    pub fn recorder_failed(&self, rows: usize) {
        self.recorder_failed
            .fetch_add(rows as u64, Ordering::Relaxed);
    }

    /// The record may take `budget` bytes in all and holds `bytes`.
    pub fn recorder_budget(&self, budget: u64, bytes: u64) {
        self.recorder_budget.store(budget, Ordering::Relaxed);
        let alarm = budget > 0 && bytes.saturating_mul(5) >= budget.saturating_mul(4);
        let was = self
            .recorder_alarm
            .swap(u64::from(alarm), Ordering::Relaxed);
        if alarm && was == 0 {
            tracing::warn!(
                bytes,
                budget,
                "the record holds 80 % of the room it may take (recorder.max_bytes, the disk)"
            );
        }
    }

    /// A batch of `rows` was refused for want of room.
    pub fn recorder_refused(&self, rows: usize, reason: &'static str) {
        *self
            .recorder_refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(reason)
            .or_default() += rows as u64;
    }

    /// The record's size, what it may take, whether it is at 80 %, and the rows refused.
    pub fn record_room(&self) -> (u64, u64, bool, u64) {
        (
            self.recorder_db_bytes.load(Ordering::Relaxed),
            self.recorder_budget.load(Ordering::Relaxed),
            self.recorder_alarm.load(Ordering::Relaxed) == 1,
            self.recorder_refused
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .values()
                .sum(),
        )
    }

    pub fn recorder_db_bytes(&self, bytes: u64) {
        self.recorder_db_bytes.store(bytes, Ordering::Relaxed);
    }

    pub fn receipt_published(&self, messages: u64) {
        self.receipts_published.fetch_add(1, Ordering::Relaxed);
        self.receipts_messages
            .fetch_add(messages, Ordering::Relaxed);
    }

    pub fn receipt_failed(&self) {
        self.receipts_failed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn json_republished(&self, n: u64) {
        self.json_republished.fetch_add(n, Ordering::Relaxed);
    }

    pub fn json_failed(&self, n: u64) {
        self.json_failed.fetch_add(n, Ordering::Relaxed);
    }

    pub fn rule_alert(&self, state: renkei_shared::AlertState) {
        let c = match state {
            renkei_shared::AlertState::Active => &self.rule_alerts_active,
            renkei_shared::AlertState::Cleared => &self.rule_alerts_cleared,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn tls_handshake_failed(&self) {
        self.tls_handshakes_failed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn memory_trimmed(&self, took: std::time::Duration) {
        self.memory_trims.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.memory_trim_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// What the router's tap holds for ingest, and how often it held publishers back.
    pub fn ingest_queue(&self, queued: usize, holds: u64) {
        self.ingest_queue
            .store(u64::try_from(queued).unwrap_or(u64::MAX), Ordering::Relaxed);
        self.ingest_holds.store(holds, Ordering::Relaxed);
    }

    /// Reads the router's count of events for connections already gone.
    pub fn count_router_gone_events(&self, counter: Arc<AtomicU64>) {
        let _ = self.router_gone_events.set(counter);
    }

    /// Accepted messages of all kinds.
    pub fn accepted_total(&self) -> u64 {
        self.accepted
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum()
    }

    /// Refused messages with `reason`.
    pub fn rejected_count(&self, reason: &str) -> u64 {
        let map = self.rejected.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(reason).copied().unwrap_or(0)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(2048);
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);

        header(
            &mut out,
            "renkei_mqtt_connections",
            "gauge",
            "Open MQTT connections per listener.",
        );
        for (listener, gauge) in [
            ("tcp", &self.tcp_connections),
            ("ws", &self.ws_connections),
            ("tls", &self.tls_connections),
        ] {
            let n = gauge.load(Ordering::Relaxed).max(0);
            let _ = writeln!(
                out,
                "renkei_mqtt_connections{{listener=\"{listener}\"}} {n}"
            );
        }
        header(
            &mut out,
            "renkei_tls_handshakes_failed_total",
            "counter",
            "TLS handshakes on the MQTTS listener that failed or timed out.",
        );
        let _ = writeln!(
            out,
            "renkei_tls_handshakes_failed_total {}",
            load(&self.tls_handshakes_failed)
        );

        header(
            &mut out,
            "renkei_logins_total",
            "counter",
            "Logins accepted, by whether a recent verification was reused (hit) or argon2 ran (miss).",
        );
        for (cache, count) in [
            ("hit", &self.logins_cached),
            ("miss", &self.logins_verified),
        ] {
            let _ = writeln!(
                out,
                "renkei_logins_total{{cache=\"{cache}\"}} {}",
                load(count)
            );
        }
        header(
            &mut out,
            "renkei_logins_refused_total",
            "counter",
            "Logins refused (MQTT and HTTP), by reason.",
        );
        {
            let map = self
                .logins_refused
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for (reason, count) in map.iter() {
                let _ = writeln!(
                    out,
                    "renkei_logins_refused_total{{reason=\"{reason}\"}} {count}"
                );
            }
        }
        header(
            &mut out,
            "renkei_login_lockouts_total",
            "counter",
            "User names locked out after too many failed logins.",
        );
        let _ = writeln!(out, "renkei_login_lockouts_total {}", load(&self.lockouts));
        header(
            &mut out,
            "renkei_sent_at_skew_total",
            "counter",
            "Accepted messages whose sent_at was more than 5 minutes off the broker's clock, by direction (past is normal after an outage).",
        );
        header(
            &mut out,
            "renkei_sent_at_skew_max_seconds",
            "gauge",
            "The largest such skew seen, by direction.",
        );
        for (direction, count, max) in [
            ("future", &self.skew_future, &self.skew_future_max),
            ("past", &self.skew_past, &self.skew_past_max),
        ] {
            let _ = writeln!(
                out,
                "renkei_sent_at_skew_total{{direction=\"{direction}\"}} {}",
                load(count)
            );
            let _ = writeln!(
                out,
                "renkei_sent_at_skew_max_seconds{{direction=\"{direction}\"}} {}",
                load(max) / 1000
            );
        }
        header(
            &mut out,
            "renkei_password_checks_total",
            "counter",
            "Argon2 password checks run (logins the cache answered run none).",
        );
        let _ = writeln!(
            out,
            "renkei_password_checks_total {}",
            load(&self.password_checks)
        );
        header(
            &mut out,
            "renkei_acl_refused_total",
            "counter",
            "Publishes, subscriptions and last wills refused by topic access control.",
        );
        {
            let map = self
                .acl_refused
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for ((packet, reason), count) in map.iter() {
                let _ = writeln!(
                    out,
                    "renkei_acl_refused_total{{packet=\"{packet}\",reason=\"{reason}\"}} {count}"
                );
            }
        }

        header(
            &mut out,
            "renkei_messages_accepted_total",
            "counter",
            "Messages that decoded, validated and arrived on their own topic, by kind.",
        );
        for (kind, count) in BodyKind::ALL.iter().zip(&self.accepted) {
            let _ = writeln!(
                out,
                "renkei_messages_accepted_total{{kind=\"{}\"}} {}",
                kind.as_str(),
                load(count)
            );
        }

        header(
            &mut out,
            "renkei_messages_rejected_total",
            "counter",
            "Messages refused, by reason.",
        );
        {
            let map = self.rejected.lock().unwrap_or_else(PoisonError::into_inner);
            for (reason, count) in map.iter() {
                let _ = writeln!(
                    out,
                    "renkei_messages_rejected_total{{reason=\"{reason}\"}} {count}"
                );
            }
        }

        header(
            &mut out,
            "renkei_state_changes_total",
            "counter",
            "What applying accepted messages did to the live state.",
        );
        for (outcome, count) in [
            ("updated", &self.updated),
            ("duplicate", &self.duplicate),
            ("outdated", &self.outdated),
            ("not_state", &self.not_state),
        ] {
            let _ = writeln!(
                out,
                "renkei_state_changes_total{{outcome=\"{outcome}\"}} {}",
                load(count)
            );
        }

        let gauges: [(&str, &str, &str, u64); 26] = [
            (
                "renkei_recorder_queue",
                "gauge",
                "Records waiting for the recorder thread (its lag).",
                u64::try_from(self.recorder_queue.load(Ordering::Relaxed).max(0)).unwrap_or(0),
            ),
            (
                "renkei_recorder_batches_total",
                "counter",
                "Transactions the recorder committed.",
                load(&self.recorder_batches),
            ),
            (
                "renkei_recorder_rows_total",
                "counter",
                "Records written (messages and quarantined payloads).",
                load(&self.recorder_rows),
            ),
            (
                "renkei_recorder_messages_inserted_total",
                "counter",
                "Messages new to the database (redeliveries are recorded once).",
                load(&self.recorder_inserted),
            ),
            (
                "renkei_recorder_last_batch_size",
                "gauge",
                "Records in the last batch.",
                load(&self.recorder_last_batch),
            ),
            (
                "renkei_recorder_failed_total",
                "counter",
                "Records lost because their batch could not be written.",
                load(&self.recorder_failed),
            ),
            (
                "renkei_receipts_published_total",
                "counter",
                "Receipts published to sites after their messages were committed.",
                load(&self.receipts_published),
            ),
            (
                "renkei_receipts_messages_total",
                "counter",
                "Messages named in published receipts.",
                load(&self.receipts_messages),
            ),
            (
                "renkei_receipts_failed_total",
                "counter",
                "Receipts that could not be published (their sites send again).",
                load(&self.receipts_failed),
            ),
            (
                "renkei_ingest_queue_messages",
                "gauge",
                "Accepted messages waiting for ingest (bounded by mqtt.ingest_queue_messages and mqtt.ingest_queue_bytes).",
                load(&self.ingest_queue),
            ),
            (
                "renkei_ingest_holds_total",
                "counter",
                "Times publishers' PUBACKs were held back because ingest's queue was full.",
                load(&self.ingest_holds),
            ),
            (
                "renkei_mqtt_events_for_gone_connections_total",
                "counter",
                "Events the router got from links of connections it had already dropped (benign: their last data or disconnect in a disconnect storm).",
                self.router_gone_events.get().map_or(0, |c| load(c)),
            ),
            (
                "renkei_database_bytes",
                "gauge",
                "Size of the database file and its write-ahead log.",
                load(&self.recorder_db_bytes),
            ),
            (
                "renkei_database_budget_bytes",
                "gauge",
                "What the record may take in all: recorder.max_bytes, or what the disk gives beyond recorder.min_free.",
                load(&self.recorder_budget),
            ),
            (
                "renkei_database_alarm",
                "gauge",
                "1 while the record holds 80 % or more of what it may take.",
                load(&self.recorder_alarm),
            ),
            (
                "renkei_uplink_connected",
                "gauge",
                "Ward mode: 1 while the uplink to HQ is connected.",
                load(&self.uplink.connected),
            ),
            (
                "renkei_uplink_down_since_ms",
                "gauge",
                "Ward mode: Unix ms since when HQ has been unreachable (0 while connected).",
                load(&self.uplink.down_since_ms),
            ),
            (
                "renkei_uplink_forwarded_total",
                "counter",
                "Ward mode: records published to HQ, resends included.",
                load(&self.uplink.forwarded),
            ),
            (
                "renkei_uplink_confirmed_total",
                "counter",
                "Ward mode: records HQ's receipts confirmed (in HQ's record).",
                load(&self.uplink.confirmed),
            ),
            (
                "renkei_uplink_overdue_total",
                "counter",
                "Ward mode: times HQ's receipts were overdue and the unconfirmed records went again.",
                load(&self.uplink.overdue),
            ),
            (
                "renkei_uplink_backlog_records",
                "gauge",
                "Ward mode: this ward's records not yet in HQ's record.",
                load(&self.uplink.backlog),
            ),
            (
                "renkei_uplink_down_total",
                "counter",
                "Ward mode: messages HQ sent down (alerts, acks, commands, other wards' state) published here.",
                load(&self.uplink.down),
            ),
            (
                "renkei_uplink_down_repeated_total",
                "counter",
                "Ward mode: messages HQ sent down again (a QoS 1 redelivery), passed over so that each reaches the ward once.",
                load(&self.uplink.down_repeated),
            ),
            (
                "renkei_uplink_stalled",
                "gauge",
                "Ward mode: 1 while HQ's broker takes records that HQ does not store (connected, forwarding nothing).",
                load(&self.uplink.stalled),
            ),
            (
                "renkei_rules_leader",
                "gauge",
                "1 while this instance runs the rules (on a cluster, the one holding the lease).",
                load(&self.rules_leader),
            ),
            (
                "renkei_uplink_last_receipt_ms",
                "gauge",
                "Ward mode: Unix ms of HQ's last receipt (a link that says connected but forwards nothing shows here).",
                load(&self.uplink.last_receipt_ms),
            ),
        ];
        for (name, kind, help, value) in gauges {
            header(&mut out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        }

        header(
            &mut out,
            "renkei_recorder_refused_total",
            "counter",
            "Records refused for want of room (max_bytes, min_free): their senders keep them and send again.",
        );
        for (reason, count) in self
            .recorder_refused
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let _ = writeln!(
                out,
                "renkei_recorder_refused_total{{reason=\"{reason}\"}} {count}"
            );
        }

        header(
            &mut out,
            "renkei_relay_connected",
            "gauge",
            "At HQ: 1 while the ward's relay (ward broker) is connected; 0 since it went.",
        );
        for relay in self.relays.views() {
            let _ = writeln!(
                out,
                "renkei_relay_connected{{ward=\"{}\"}} {}",
                relay.ward,
                u8::from(relay.connected)
            );
        }

        header(
            &mut out,
            "renkei_memory_trims_total",
            "counter",
            "Times the broker handed the allocator's free memory back to the system.",
        );
        let _ = writeln!(
            out,
            "renkei_memory_trims_total {}",
            load(&self.memory_trims)
        );
        header(
            &mut out,
            "renkei_memory_trim_seconds_total",
            "counter",
            "Time spent handing free memory back (each arena is locked while it is walked).",
        );
        let _ = writeln!(
            out,
            "renkei_memory_trim_seconds_total {:.6}",
            load(&self.memory_trim_micros) as f64 / 1e6
        );

        header(
            &mut out,
            "renkei_rule_alerts_total",
            "counter",
            "Alerts the broker's rules published, by the state they carried.",
        );
        for (state, count) in [
            ("active", &self.rule_alerts_active),
            ("cleared", &self.rule_alerts_cleared),
        ] {
            let _ = writeln!(
                out,
                "renkei_rule_alerts_total{{state=\"{state}\"}} {}",
                load(count)
            );
        }
        header(
            &mut out,
            "renkei_json_republished_total",
            "counter",
            "Messages re-published as JSON on renkei/json/v1/ (those that changed the state, and commands).",
        );
        let _ = writeln!(
            out,
            "renkei_json_republished_total {}",
            load(&self.json_republished)
        );
        header(
            &mut out,
            "renkei_json_republish_failed_total",
            "counter",
            "Accepted messages that could not be re-published as JSON.",
        );
        let _ = writeln!(
            out,
            "renkei_json_republish_failed_total {}",
            load(&self.json_failed)
        );
        out
    }
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

#[cfg(test)]
mod tests {
    use renkei_shared::{Mode, Scope, sample};

    use super::*;

    #[test]
    fn renders_every_family_with_labels() {
        let m = Metrics::new();
        let change = Change::Updated {
            mode: Mode::Actual,
            scope: Scope::Site(sample::site()),
        };
        m.accepted(BodyKind::Status, &change);
        m.accepted(BodyKind::Status, &Change::Duplicate);
        m.rejected("malformed");
        m.rejected("malformed");
        m.rejected("wrong_topic");
        m.json_republished(1);
        m.tcp_connections.fetch_add(3, Ordering::Relaxed);
        m.memory_trimmed(std::time::Duration::from_micros(2_500));
        m.memory_trimmed(std::time::Duration::from_micros(1_500));
        let text = m.render();
        for line in [
            "renkei_mqtt_connections{listener=\"tcp\"} 3",
            "renkei_mqtt_connections{listener=\"ws\"} 0",
            "renkei_messages_accepted_total{kind=\"status\"} 2",
            "renkei_messages_accepted_total{kind=\"alert\"} 0",
            "renkei_messages_rejected_total{reason=\"malformed\"} 2",
            "renkei_messages_rejected_total{reason=\"wrong_topic\"} 1",
            "renkei_state_changes_total{outcome=\"updated\"} 1",
            "renkei_state_changes_total{outcome=\"duplicate\"} 1",
            "renkei_json_republished_total 1",
            "renkei_memory_trims_total 2",
            "renkei_memory_trim_seconds_total 0.004000",
            "# TYPE renkei_messages_rejected_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert_eq!(m.accepted_total(), 2);
        assert_eq!(m.rejected_count("malformed"), 2);
        assert_eq!(m.rejected_count("empty"), 0);
    }
}
