//! Rules → alerts: the broker's own CAP-style alerts about what the sites report (DOMAIN.md).
//!
//! ```text
//! live State ──(every rules.evaluate_every, and soon after ingest changed a site)──▶ evaluate
//!   ──▶ alerts that should be active, per mode ──diff with what was last published──▶
//!   Publisher (in-process link, retained) ──▶ router ──▶ ingest: recorded, applied,
//!   mirrored as JSON, like any other message
//! ```
//!
//! [`evaluate`] is pure: the world of one mode and a clock in, the alerts that should be active
//! out. Four rules, each thresholds from `[rules]`:
//! - an open shelter at or above `occupancy_pct` of its capacity (`occ-{ward}-{site}`);
//! - a site silent: its last will fired, or nothing heard for three reporting intervals
//!   (`silent-{ward}-{site}`);
//! - water or food stock below `stock_below` of daily need (`stock-{ward}-{site}-water|food`);
//! - a supply request still `requested` after `request_unanswered_after`
//!   (`req-{ward}-{site}-{request_id}`).
//!
//! Ids are deterministic, so an alert keeps its topic, its retained message and its acks for
//! as long as its condition lasts; alerts of the exercise and test worlds carry an `ex-` or
//! `test-` prefix because the alert topic has no mode level and a drill's retained alert must
//! not replace a real one. When a condition ends the alert is published again as `cleared`.
//! An alert is published only when it differs from the last one published under its id (texts
//! hold no clock-dependent figures), so an unchanged condition costs nothing per tick. Figures
//! that move with every report are quoted in steps (occupancy in 5-point steps, stock in tenths
//! of a day, neither the counts behind them), so a shelter filling report by report re-publishes
//! its alert a handful of times, not once per report. What was
//! published is seeded from the restored state at start, so a restart does not repeat alerts.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use renkei_shared::reducer::{SILENT_AFTER_INTERVALS, SiteState, World};
use renkei_shared::{
    Alert, AlertSource, AlertState, Body, Certainty, Envelope, Header, Id, Item, MAX_ID_LEN, Mode,
    Origin, RequestState, RuleKind, Severity, SiteRef, State, Timestamp, Topic, Urgency, encode,
};

use crate::clock::Clock;
use crate::config::RulesConfig;
use crate::live::LiveState;
use crate::metrics::Metrics;
use crate::publisher::Publisher;

/// The node name in the `Origin::Hq` of every alert HQ's rules publish; a ward broker's
/// rules publish as `ward-{ward}` ([`node_name`]), so that HQ's alerts coming down to a ward
/// never share an origin (and so a key) with the ward's own.
pub const NODE: &str = "broker";

/// The node name of this broker's rules: [`NODE`] at HQ, `ward-{ward}` at a ward broker.
pub fn node_name(ward: Option<renkei_shared::WardCode>) -> String {
    match ward {
        Some(ward) => format!("ward-{ward}"),
        None => NODE.to_owned(),
    }
}

/// How long the rules wait after a change before they evaluate, so that a burst of reports is
/// evaluated once rather than once per message.
const SETTLE: Duration = Duration::from_millis(200);

/// How often the rules thread looks up to see whether it should stop.
const STOP_POLL: Duration = Duration::from_millis(200);

/// Stock items whose shortage raises an alert (DOMAIN.md: water; food matters as much).
const WATCHED_ITEMS: [Item; 2] = [Item::Water, Item::Food];

/// The rules' thresholds, in the units [`evaluate`] works in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub occupancy_pct: u64,
    /// Days of stock left, in tenths of a day ([`renkei_shared::StockLine::days_left_tenths`]).
    pub stock_below_tenths: u64,
    pub request_unanswered_ms: i64,
}

impl Thresholds {
    pub fn new(config: &RulesConfig) -> Thresholds {
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        Thresholds {
            occupancy_pct: config.occupancy_pct,
            stock_below_tenths: config.stock_below.0.as_secs().saturating_mul(10) / 86_400,
            request_unanswered_ms: ms(config.request_unanswered_after.0),
        }
    }
}

/// The alerts that should be active in `world` at `now`, by id.
///
/// `listening_since` is when the broker started: a site cannot be blamed for silence the broker
/// was not there to hear, so staleness counts from whichever is later.
///
/// `line_down` says which wards' relays (ward brokers) HQ cannot reach now: their sites'
/// silence is the line's, not theirs, so no "site silent" alert is raised for them.
pub fn evaluate(
    world: &World,
    mode: Mode,
    now: Timestamp,
    listening_since: Timestamp,
    t: &Thresholds,
    line_down: &dyn Fn(renkei_shared::WardCode) -> bool,
) -> BTreeMap<Id, Alert> {
    let mut out = BTreeMap::new();
    let mut add = |alert: Alert| {
        out.insert(alert.alert_id.clone(), alert);
    };
    for (site, state) in &world.sites {
        // Known only from HQ's steps on its requests: not a reporting site.
        if state.last_heard.is_none() {
            continue;
        }
        let place = Place::new(site, state);
        if state.is_open_shelter()
            && let (Some(pct), Some(shelter)) = (state.occupancy_pct(), state.shelter.as_ref())
            && pct >= t.occupancy_pct
        {
            let capacity = shelter.value.capacity.unwrap_or(0);
            let quoted = occupancy_step(pct, t.occupancy_pct);
            let over = pct >= 100;
            add(Alert {
                alert_id: alert_id(mode, &["occ", &site.ward.to_string(), site.site.as_str()]),
                source: AlertSource::Rule(RuleKind::ShelterOccupancy),
                state: AlertState::Active,
                severity: if over {
                    Severity::Severe
                } else {
                    Severity::Moderate
                },
                urgency: if over {
                    Urgency::Immediate
                } else {
                    Urgency::Expected
                },
                certainty: Certainty::Observed,
                headline: format!("避難所の収容率が{quoted}%以上になりました: {}", place.name),
                description: format!(
                    "{}: 避難者数が想定収容人数{capacity}人の{quoted}%以上です（基準{}%）。\
                     現在の人数は拠点の最新の報告で確認してください。",
                    place.full, t.occupancy_pct
                ),
                instruction: if over {
                    "定員を超えています。近隣の避難所への誘導と追加の受入先の確保を直ちに行ってください。"
                } else {
                    "近隣の避難所の空き状況を確認し、受入先の確保と誘導の準備をしてください。"
                }
                .to_owned(),
                wards: vec![site.ward],
                site: Some(site.clone()),
                expires_at: None,
                ack_required: true,
            });
        }
        if is_silent(state, now, listening_since) && !line_down(site.ward) {
            let interval = state.interval_s();
            let description = if state.is_dead() {
                format!(
                    "{}: 接続が切れました（エージェントのラストウィル）。",
                    place.full
                )
            } else {
                format!(
                    "{}: 報告間隔{interval}秒の{SILENT_AFTER_INTERVALS}回分を過ぎても報告がありません。",
                    place.full
                )
            };
            add(Alert {
                alert_id: alert_id(
                    mode,
                    &["silent", &site.ward.to_string(), site.site.as_str()],
                ),
                source: AlertSource::Rule(RuleKind::SiteSilent),
                state: AlertState::Active,
                severity: Severity::Moderate,
                urgency: Urgency::Expected,
                certainty: Certainty::Likely,
                headline: format!("拠点からの報告が途絶えています: {}", place.name),
                description,
                instruction: "電話・防災行政無線など別の手段で拠点の状況を確認してください。"
                    .to_owned(),
                wards: vec![site.ward],
                site: Some(site.clone()),
                expires_at: None,
                ack_required: true,
            });
        }
        if let Some(supplies) = &state.supplies {
            for line in &supplies.value.lines {
                if !WATCHED_ITEMS.contains(&line.item) {
                    continue;
                }
                let Some(tenths) = line.days_left_tenths() else {
                    continue;
                };
                if tenths >= t.stock_below_tenths {
                    continue;
                }
                let item_ja = match line.item {
                    Item::Water => "飲料水",
                    _ => "食料",
                };
                add(Alert {
                    alert_id: alert_id(
                        mode,
                        &[
                            "stock",
                            &site.ward.to_string(),
                            site.site.as_str(),
                            line.item.as_str(),
                        ],
                    ),
                    source: AlertSource::Rule(RuleKind::StockLow),
                    state: AlertState::Active,
                    severity: if tenths == 0 {
                        Severity::Severe
                    } else {
                        Severity::Moderate
                    },
                    urgency: Urgency::Expected,
                    certainty: Certainty::Observed,
                    headline: format!(
                        "{item_ja}の在庫が残り{}日分です: {}",
                        tenths_text(tenths),
                        place.name
                    ),
                    description: format!(
                        "{}: {item_ja}の在庫が残り約{}日分です（基準{}日分）。\
                         在庫数と必要量は拠点の最新の報告で確認してください。",
                        place.full,
                        tenths_text(tenths),
                        tenths_text(t.stock_below_tenths),
                    ),
                    instruction: "物資の手配と輸送を確認し、必要なら物資要請を受け付けてください。"
                        .to_owned(),
                    wards: vec![site.ward],
                    site: Some(site.clone()),
                    expires_at: None,
                    ack_required: true,
                });
            }
        }
        for (request_id, request) in &state.requests {
            if request.state != RequestState::Requested
                || now.millis_since(request.first_seen) < t.request_unanswered_ms
            {
                continue;
            }
            let what = request.detail.as_ref().map_or_else(String::new, |d| {
                format!("（{} × {}）", d.value.item.as_str(), d.value.quantity)
            });
            add(Alert {
                alert_id: alert_id(
                    mode,
                    &[
                        "req",
                        &site.ward.to_string(),
                        site.site.as_str(),
                        request_id.as_str(),
                    ],
                ),
                source: AlertSource::Rule(RuleKind::RequestUnanswered),
                state: AlertState::Active,
                severity: Severity::Moderate,
                urgency: Urgency::Expected,
                certainty: Certainty::Observed,
                headline: format!("物資要請が未対応です: {}", place.name),
                description: format!(
                    "{}: 物資要請 {request_id}{what} が{}以上「要請」のままです。",
                    place.full,
                    duration_text(t.request_unanswered_ms),
                ),
                instruction: "要請を受け付ける（受付）か、対応できない場合は辞退を返してください。"
                    .to_owned(),
                wards: vec![site.ward],
                site: Some(site.clone()),
                expires_at: None,
                ack_required: true,
            });
        }
    }
    out
}

/// Occupancy steps an alert quotes: a filling shelter reports a new count every interval, and an
/// alert that quoted each one would be re-published (recorded, mirrored, re-sent to every
/// dashboard) on every report. Steps of 5 points from the threshold up, with 100 % always a step.
const OCCUPANCY_STEP: u64 = 5;

/// The occupancy an alert quotes for `pct` (at or above `threshold`): the highest step at or
/// under it, never under the threshold.
fn occupancy_step(pct: u64, threshold: u64) -> u64 {
    let step = threshold + (pct.saturating_sub(threshold) / OCCUPANCY_STEP) * OCCUPANCY_STEP;
    if threshold < 100 && pct >= 100 {
        step.max(100)
    } else {
        step
    }
}

/// [`SiteState::is_silent`], with staleness counted from `listening_since` at the earliest.
fn is_silent(state: &SiteState, now: Timestamp, listening_since: Timestamp) -> bool {
    let limit_ms = SILENT_AFTER_INTERVALS * i64::from(state.interval_s()) * 1000;
    state.is_dead() || (state.is_silent(now) && now.millis_since(listening_since) > limit_ms)
}

/// How a site is named in alert texts.
struct Place {
    /// The site's name, or its id before its status arrived.
    name: String,
    /// Ward, name and id.
    full: String,
}

impl Place {
    fn new(site: &SiteRef, state: &SiteState) -> Place {
        let name = state.name().unwrap_or(site.site.as_str()).to_owned();
        let ward = site.ward.ward().map_or("", |w| w.name_ja);
        Place {
            full: format!("{ward} {name}（{}）", site.site),
            name,
        }
    }
}

fn tenths_text(tenths: u64) -> String {
    format!("{}.{}", tenths / 10, tenths % 10)
}

fn duration_text(ms: i64) -> String {
    let mins = ms / 60_000;
    match (mins / 60, mins % 60) {
        (0, 0) => format!("{}秒", ms / 1000),
        (0, m) => format!("{m}分"),
        (h, 0) => format!("{h}時間"),
        (h, m) => format!("{h}時間{m}分"),
    }
}

/// A deterministic alert id from its parts, prefixed by mode outside the actual world. Parts
/// that would exceed [`MAX_ID_LEN`] are cut and a digest of the whole keeps the id unique.
pub fn alert_id(mode: Mode, parts: &[&str]) -> Id {
    let prefix = match mode {
        Mode::Actual => "",
        Mode::Exercise => "ex-",
        Mode::Test => "test-",
    };
    let whole = format!("{prefix}{}", parts.join("-"));
    let text = if whole.len() <= MAX_ID_LEN {
        whole
    } else {
        // FNV-1a: a stable digest (std's hasher may change between Rust releases).
        let digest = whole.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let keep = MAX_ID_LEN - 17;
        format!("{}-{digest:016x}", &whole[..keep])
    };
    // Parts are ids and ward codes and the text is cut to the limit: it is an id.
    Id::new(text).expect("alert ids are built from ids")
}

/// Wakes the rules after ingest changed the state; cheap, never blocks.
#[derive(Debug, Clone)]
pub struct Trigger(SyncSender<()>);

impl Trigger {
    pub fn poke(&self) {
        match self.0.try_send(()) {
            Ok(()) | Err(TrySendError::Full(())) | Err(TrySendError::Disconnected(())) => {}
        }
    }
}

/// The running rules thread.
#[derive(Debug)]
pub struct Rules {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// What the rules need to run.
#[derive(Debug)]
pub struct Setup {
    pub config: RulesConfig,
    pub live: LiveState,
    pub publisher: Publisher,
    pub metrics: Arc<Metrics>,
    /// The broker's boot counter: the `boot` of every alert it publishes.
    pub boot: u32,
    /// The node name in the origin of every alert ([`node_name`]).
    pub node: Id,
    pub started_at: Timestamp,
    /// What "now" is when the rules look.
    pub clock: Clock,
    /// Set when several instances share a cluster: the rules run only while it is true
    /// ([`crate::leadership`]). `None`: always.
    pub leading: Option<Arc<AtomicBool>>,
}

impl Rules {
    /// The trigger ingest pokes; hand its receiver to [`Rules::start`].
    pub fn trigger() -> (Trigger, Receiver<()>) {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        (Trigger(tx), rx)
    }

    pub fn start(setup: Setup, trigger: Receiver<()>) -> std::io::Result<Rules> {
        let stop = Arc::new(AtomicBool::new(false));
        let published = {
            let state = setup.live.read().unwrap_or_else(PoisonError::into_inner);
            published_in(&state)
        };
        let mut engine = Engine {
            thresholds: Thresholds::new(&setup.config),
            every: setup.config.evaluate_every.0,
            live: setup.live,
            publisher: setup.publisher,
            metrics: setup.metrics,
            boot: setup.boot,
            node: setup.node,
            seq: 0,
            started_at: setup.started_at,
            clock: setup.clock,
            published,
            trigger,
            stop: stop.clone(),
            led: setup.leading.is_none(),
            leading: setup.leading,
        };
        engine
            .metrics
            .rules_leader
            .store(u64::from(engine.led), Ordering::Relaxed);
        let thread = std::thread::Builder::new()
            .name("renkei-rules".into())
            .spawn(move || engine.run())?;
        Ok(Rules {
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The rule alerts already in the state (restored from the database), as last published.
fn published_in(state: &State) -> HashMap<(Mode, Id), (Timestamp, Alert)> {
    let mut out = HashMap::new();
    for mode in Mode::ALL {
        for (id, entry) in &state.world(mode).alerts {
            if let Some((_, sent_at, alert)) = &entry.alert
                && matches!(alert.source, AlertSource::Rule(_))
            {
                out.insert((mode, id.clone()), (*sent_at, alert.clone()));
            }
        }
    }
    out
}

struct Engine {
    thresholds: Thresholds,
    every: Duration,
    live: LiveState,
    publisher: Publisher,
    metrics: Arc<Metrics>,
    boot: u32,
    node: Id,
    seq: u64,
    started_at: Timestamp,
    clock: Clock,
    /// The last version published under each id (or restored), with when it was sent.
    published: HashMap<(Mode, Id), (Timestamp, Alert)>,
    trigger: Receiver<()>,
    stop: Arc<AtomicBool>,
    leading: Option<Arc<AtomicBool>>,
    /// Whether it ran the rules at its last look.
    led: bool,
}

impl Engine {
    fn run(&mut self) {
        let mut next_tick = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            // Taking the rules over is looked at every STOP_POLL: the new leader runs them
            // at once, not at its next tick.
            let taking_over = !self.led
                && self
                    .leading
                    .as_ref()
                    .is_some_and(|flag| flag.load(Ordering::Acquire));
            if now >= next_tick || taking_over {
                self.evaluate();
                next_tick = now + self.every;
                continue;
            }
            let wait = next_tick.saturating_duration_since(now).min(STOP_POLL);
            match self.trigger.recv_timeout(wait) {
                Ok(()) => {
                    // Let the rest of a burst arrive, then look once.
                    std::thread::sleep(SETTLE);
                    while self.trigger.try_recv().is_ok() {}
                    self.evaluate();
                }
                Err(RecvTimeoutError::Timeout) => {}
                // Ingest is gone: only the timer remains.
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(wait),
            }
        }
    }

    /// Whether this instance runs the rules now. On taking them over, what was already
    /// published (by the previous leader, recorded since) is read again from the live state,
    /// so that nothing is announced twice.
    fn leads(&mut self) -> bool {
        let Some(flag) = &self.leading else {
            return true;
        };
        let leads = flag.load(Ordering::Acquire);
        if leads && !self.led {
            let state = self.live.read().unwrap_or_else(PoisonError::into_inner);
            self.published = published_in(&state);
        }
        if leads != self.led {
            self.metrics
                .rules_leader
                .store(u64::from(leads), Ordering::Relaxed);
        }
        self.led = leads;
        leads
    }

    fn evaluate(&mut self) {
        if !self.leads() {
            return;
        }
        let now = self.clock.now();
        let wanted: Vec<(Mode, BTreeMap<Id, Alert>)> = {
            let state = self.live.read().unwrap_or_else(PoisonError::into_inner);
            Mode::ALL
                .into_iter()
                .map(|mode| {
                    let world = state.world(mode);
                    let relays = &self.metrics.relays;
                    let line_down = |ward| relays.unreachable_since(ward).is_some();
                    let alerts = evaluate(
                        world,
                        mode,
                        now,
                        self.started_at,
                        &self.thresholds,
                        &line_down,
                    );
                    (mode, alerts)
                })
                .collect()
        };
        for (mode, alerts) in wanted {
            let cleared: Vec<Alert> = self
                .published
                .iter()
                .filter(|((m, id), (_, alert))| {
                    *m == mode && alert.state == AlertState::Active && !alerts.contains_key(id)
                })
                .map(|(_, (_, alert))| Alert {
                    state: AlertState::Cleared,
                    ..alert.clone()
                })
                .collect();
            for alert in cleared {
                self.publish(mode, alert, now);
            }
            for (id, alert) in alerts {
                let unchanged = self
                    .published
                    .get(&(mode, id))
                    .is_some_and(|(_, last)| *last == alert);
                if !unchanged {
                    self.publish(mode, alert, now);
                }
            }
        }
    }

    fn publish(&mut self, mode: Mode, alert: Alert, now: Timestamp) {
        let key = (mode, alert.alert_id.clone());
        // HQ messages order by time sent: never send one that sorts before the last version
        // (a clock stepped back after a restart would otherwise leave the old one in force).
        let sent_at = match self.published.get(&key) {
            Some((last, _)) if *last >= now => Timestamp(last.0.saturating_add(1)),
            _ => now,
        };
        self.seq += 1;
        let envelope = Envelope {
            header: Header {
                origin: Origin::Hq(self.node.clone()),
                boot: self.boot,
                seq: self.seq,
                sent_at,
                mode,
                historical: false,
            },
            body: Body::Alert(alert.clone()),
        };
        let (topic, payload) = match (Topic::of(&envelope), encode(&envelope)) {
            (Ok(topic), Ok(payload)) => (topic, payload),
            (topic, payload) => {
                tracing::error!(?topic, ?payload, id = %alert.alert_id, "cannot encode a rule alert");
                return;
            }
        };
        match self.publisher.publish(topic.to_string(), payload, true) {
            Ok(()) => {
                tracing::info!(
                    id = %alert.alert_id,
                    mode = mode.as_str(),
                    state = ?alert.state,
                    headline = %alert.headline,
                    "rule alert published"
                );
                self.metrics.rule_alert(alert.state);
                self.published.insert(key, (sent_at, alert));
            }
            Err(e) => {
                tracing::error!(error = %e, id = %alert.alert_id, "cannot publish a rule alert")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use renkei_shared::reducer::SILENT_AFTER_INTERVALS;
    use renkei_shared::{ShelterState, StockLine, SupplyRequest, sample};

    use super::*;

    const T: Thresholds = Thresholds {
        occupancy_pct: 90,
        stock_below_tenths: 10,
        request_unanswered_ms: 2 * 3_600_000,
    };

    fn at(secs: i64) -> Timestamp {
        sample::SENT_AT.plus_secs(secs)
    }

    fn world(envs: &[Envelope]) -> (State, Mode) {
        let mut state = State::new();
        for env in envs {
            state.apply(env);
        }
        (state, envs.first().map_or(Mode::Actual, |e| e.header.mode))
    }

    fn shelter(evacuees: u32, seq: u64) -> Envelope {
        let mut env = sample::shelter();
        if let Body::Shelter(s) = &mut env.body {
            s.state = ShelterState::Open;
            s.capacity = Some(100);
            s.evacuees = Some(evacuees);
        }
        env.header.seq = seq;
        env
    }

    fn ids(alerts: &BTreeMap<Id, Alert>) -> Vec<&str> {
        alerts.keys().map(Id::as_str).collect()
    }

    #[test]
    fn occupancy_fires_at_the_threshold_and_escalates_over_capacity() {
        for (evacuees, expected) in [
            (89, None),
            (90, Some(Severity::Moderate)),
            (120, Some(Severity::Severe)),
        ] {
            let (state, mode) = world(&[sample::status(), shelter(evacuees, 50)]);
            let alerts = evaluate(state.world(mode), mode, at(1), at(0), &T, &|_| false);
            let got = alerts.get(&Id::new("occ-131041-nishi-shinjuku-es").unwrap());
            assert_eq!(got.map(|a| a.severity), expected, "{evacuees}");
            if let Some(a) = got {
                assert_eq!(a.source, AlertSource::Rule(RuleKind::ShelterOccupancy));
                assert!(a.headline.contains("西新宿小学校"), "{}", a.headline);
                assert_eq!(a.wards, vec![sample::site().ward]);
                assert!(a.ack_required);
            }
        }
    }

    #[test]
    fn a_filling_shelter_republishes_its_alert_only_at_each_step() {
        let alert = |evacuees: u32| {
            let (state, mode) = world(&[sample::status(), shelter(evacuees, 50)]);
            let alerts = evaluate(state.world(mode), mode, at(1), at(0), &T, &|_| false);
            alerts
                .get(&Id::new("occ-131041-nishi-shinjuku-es").unwrap())
                .cloned()
        };
        // Capacity 100: one evacuee is one point.
        let versions: Vec<Alert> = (90..=112).filter_map(alert).collect();
        assert_eq!(versions.len(), 23);
        let mut distinct = versions.clone();
        distinct.dedup();
        let quoted: Vec<&str> = distinct
            .iter()
            .map(|a| a.headline.split('%').next().unwrap_or(""))
            .collect();
        assert_eq!(
            quoted,
            [
                "避難所の収容率が90",
                "避難所の収容率が95",
                "避難所の収容率が100",
                "避難所の収容率が105",
                "避難所の収容率が110"
            ]
        );
        assert_eq!(distinct[1].severity, Severity::Moderate);
        assert_eq!(distinct[2].severity, Severity::Severe);
        assert_eq!(occupancy_step(99, 87), 97);
        assert_eq!(occupancy_step(101, 87), 100, "100 % is always a step");
        assert_eq!(occupancy_step(103, 87), 102);
        assert_eq!(occupancy_step(150, 150), 150);
    }

    #[test]
    fn silence_counts_three_intervals_from_the_later_of_last_heard_and_start() {
        let (state, mode) = world(&[sample::status()]);
        let w = state.world(mode);
        let limit = SILENT_AFTER_INTERVALS * 30;
        assert!(ids(&evaluate(w, mode, at(limit), at(0), &T, &|_| false)).is_empty());
        assert_eq!(
            ids(&evaluate(w, mode, at(limit + 1), at(0), &T, &|_| false)),
            ["silent-131041-nishi-shinjuku-es"]
        );
        // The broker itself started late: the site gets three intervals from then.
        assert!(ids(&evaluate(w, mode, at(limit + 1), at(10), &T, &|_| false)).is_empty());
        // Its ward's relay is unreachable: HQ does not know, and says no more than that.
        let shinjuku_down = |ward: renkei_shared::WardCode| ward.0 == 131041;
        assert!(ids(&evaluate(w, mode, at(limit + 1), at(0), &T, &shinjuku_down)).is_empty());
        let chiyoda_down = |ward: renkei_shared::WardCode| ward.0 == 131016;
        assert_eq!(
            ids(&evaluate(w, mode, at(limit + 1), at(0), &T, &chiyoda_down)),
            ["silent-131041-nishi-shinjuku-es"]
        );
    }

    #[test]
    fn low_water_or_food_fires_other_items_do_not() {
        let mut env = sample::supplies();
        if let Body::Supplies(s) = &mut env.body {
            s.lines = vec![
                StockLine {
                    item: Item::Water,
                    on_hand: Some(90),
                    daily_need: Some(100),
                },
                StockLine {
                    item: Item::Food,
                    on_hand: Some(100),
                    daily_need: Some(100),
                },
                StockLine {
                    item: Item::Blankets,
                    on_hand: Some(0),
                    daily_need: Some(100),
                },
            ];
        }
        let (state, mode) = world(&[sample::status(), env.clone()]);
        let alerts = evaluate(state.world(mode), mode, at(1), at(0), &T, &|_| false);
        assert_eq!(ids(&alerts), ["stock-131041-nishi-shinjuku-es-water"]);

        // Counts that leave the days left as they were do not change the alert.
        let water = |on_hand: u32, daily_need: u32| {
            let mut env = env.clone();
            if let Body::Supplies(s) = &mut env.body {
                s.lines[0].on_hand = Some(on_hand);
                s.lines[0].daily_need = Some(daily_need);
            }
            let (state, mode) = world(&[sample::status(), env]);
            evaluate(state.world(mode), mode, at(1), at(0), &T, &|_| false)
                .remove(&Id::new("stock-131041-nishi-shinjuku-es-water").unwrap())
        };
        assert_eq!(water(90, 100), water(180, 200));
        assert_eq!(water(90, 100), water(91, 100));
        assert_ne!(water(90, 100), water(80, 100));
    }

    #[test]
    fn a_request_left_requested_fires_after_its_time_and_not_once_accepted() {
        let mut env = sample::request();
        if let Body::Request(r) = &mut env.body {
            *r = SupplyRequest {
                state: RequestState::Requested,
                ..r.clone()
            };
        }
        let (mut state, mode) = world(&[sample::status(), env]);
        let hours = 2 * 3600;
        assert!(
            ids(&evaluate(
                state.world(mode),
                mode,
                at(hours - 1),
                at(hours),
                &T,
                &|_| false
            ))
            .is_empty()
        );
        let alerts = evaluate(state.world(mode), mode, at(hours), at(hours), &T, &|_| {
            false
        });
        assert_eq!(alerts.len(), 1);
        assert!(ids(&alerts)[0].starts_with("req-131041-nishi-shinjuku-es-"));
        let mut ack = sample::ack();
        if let Body::Ack(a) = &mut ack.body {
            a.target = renkei_shared::AckTarget::Request {
                site: sample::site(),
                request_id: Id::new("req-0001").unwrap(),
            };
        }
        ack.header.sent_at = at(hours);
        state.apply(&ack);
        assert!(
            evaluate(state.world(mode), mode, at(hours), at(hours), &T, &|_| {
                false
            })
            .is_empty()
        );
    }

    #[test]
    fn exercise_data_raises_exercise_alerts_under_their_own_ids() {
        let mut env = shelter(95, 50);
        env.header.mode = Mode::Exercise;
        let (state, _) = world(&[env]);
        assert!(
            evaluate(
                state.world(Mode::Actual),
                Mode::Actual,
                at(1),
                at(0),
                &T,
                &|_| false
            )
            .is_empty()
        );
        let alerts = evaluate(
            state.world(Mode::Exercise),
            Mode::Exercise,
            at(1),
            at(0),
            &T,
            &|_| false,
        );
        assert_eq!(ids(&alerts), ["ex-occ-131041-nishi-shinjuku-es"]);
    }

    /// Through ingest, as the broker takes messages: a sender's clock far off the broker's
    /// neither fires the request rule on arrival nor keeps a dead site from going silent.
    #[test]
    fn a_senders_clock_far_off_neither_fires_nor_hides_an_alert() {
        use crate::ingest::process;
        use renkei_shared::{Topic, encode};
        let state = std::sync::RwLock::new(State::new());
        let received = at(0);
        let send = |env: &Envelope| {
            let topic = Topic::of(env).unwrap().to_string();
            process(&state, topic.as_bytes(), &encode(env).unwrap(), received).unwrap();
        };
        // Heard from once, with a clock a year ahead.
        let mut status = sample::status();
        status.header.sent_at = at(365 * 24 * 3600);
        send(&status);
        // A request dated 1970.
        let mut request = sample::request();
        request.header.seq = status.header.seq + 1;
        request.header.sent_at = Timestamp(0);
        if let Body::Request(r) = &mut request.body {
            r.state = RequestState::Requested;
        }
        send(&request);
        let state = state.into_inner().unwrap();
        let mode = request.header.mode;
        let alerts = |now| -> Vec<String> {
            evaluate(state.world(mode), mode, now, at(0), &T, &|_| false)
                .into_keys()
                .map(|id| id.as_str().to_owned())
                .collect()
        };
        assert!(
            !alerts(at(60)).iter().any(|id| id.starts_with("req-")),
            "no unanswered-request alert a minute after it arrived"
        );
        assert!(
            alerts(at(2 * 3600)).iter().any(|id| id.starts_with("req-")),
            "two hours after it arrived it is unanswered"
        );
        // Silent after three intervals of the broker's clock, not a year later.
        let silent = alerts(at(24 * 3600));
        assert!(
            silent.iter().any(|id| id.starts_with("silent-")),
            "{silent:?}"
        );
    }

    #[test]
    fn long_ids_stay_valid_and_distinct() {
        let long = "s".repeat(64);
        let a = alert_id(Mode::Exercise, &["req", "131041", &long, "r-1"]);
        let b = alert_id(Mode::Exercise, &["req", "131041", &long, "r-2"]);
        assert!(a.as_str().len() <= MAX_ID_LEN);
        assert_ne!(a, b);
        assert_eq!(
            a,
            alert_id(Mode::Exercise, &["req", "131041", &long, "r-1"])
        );
    }
}
