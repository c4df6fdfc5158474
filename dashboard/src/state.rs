//! The dashboard's state: the shared reducer's [`State`] behind Yew's `use_reducer`.
//!
//! Messages arrive in batches ([`Action::Batch`], see [`crate::inbox`]); each is checked
//! ([`ingest`]: topic, codec, topic/body agreement) and applied with [`State::apply`]. The view
//! never reads the `State` itself: after each batch or clock tick what the page shows (the
//! per-ward figures of the world being viewed, its active alerts, and the open ward's detail)
//! is derived into a [`Snapshot`], and a snapshot equal to the last one skips the re-render.
//!
//! The `State` lives in a `RefCell` shared by successive [`Dashboard`] values instead of being
//! cloned per action: Yew keeps the previous value alive during `reduce`, so a pure reducer
//! would deep-copy 2,000 sites on every batch.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use renkei_shared::{Change, Envelope, Level, Mode, State, Timestamp, Ward, WardRollup};
use yew::Reducible;

use crate::age::Age;
use crate::alerts::{AlertRow, active_alerts};
use crate::detail::WardDetail;
use crate::log::{self, RateLimit};
use crate::mqtt::{ConnState, Incoming};
use crate::route::Route;
use crate::site::SiteDetail;

/// Bad messages are logged at most once per this period.
const LOG_EVERY_MS: i64 = 5_000;

/// What became of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ingested {
    Applied(Change),
    /// An empty payload: a retained message being cleared, which carries no state.
    Ignored,
    Rejected {
        /// A short stable name, for counting.
        reason: &'static str,
        detail: String,
    },
}

/// Checks one message and applies it to `state`.
pub fn ingest(state: &mut State, topic: &str, payload: &[u8]) -> Ingested {
    match checked(topic, payload) {
        Ok(None) => Ingested::Ignored,
        Ok(Some(env)) => Ingested::Applied(state.apply(&env)),
        Err((reason, detail)) => Ingested::Rejected { reason, detail },
    }
}

/// Decodes and checks one message: `None` for an empty payload (a retained message being
/// cleared), else the message, or why it is refused.
fn checked(topic: &str, payload: &[u8]) -> Result<Option<Envelope>, (&'static str, String)> {
    if payload.is_empty() {
        return Ok(None);
    }
    let (_, env) = renkei_shared::receive(topic.as_bytes(), payload)
        .map_err(|e| (e.reason(), e.to_string()))?;
    Ok(Some(env))
}

/// The figures of one table row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Figures {
    pub sites: u64,
    pub reporting: u64,
    pub shelters_open: u64,
    pub evacuees: u64,
    pub capacity: u64,
    pub care_needed: u64,
    pub open_requests: u64,
    pub incidents: u64,
    pub silent: u64,
    /// Sites whose outbox is full: they cannot store new reports.
    pub outbox_alarms: u64,
}

impl From<&WardRollup> for Figures {
    fn from(r: &WardRollup) -> Self {
        Figures {
            sites: r.sites.into(),
            reporting: r.reporting().into(),
            shelters_open: r.shelters_open.into(),
            evacuees: r.evacuees,
            capacity: r.capacity,
            care_needed: r.care_needed,
            open_requests: r.open_requests.into(),
            incidents: r.incidents.into(),
            silent: r.silent.into(),
            outbox_alarms: r.outbox_alarms.into(),
        }
    }
}

impl std::ops::AddAssign for Figures {
    fn add_assign(&mut self, o: Figures) {
        self.sites += o.sites;
        self.reporting += o.reporting;
        self.shelters_open += o.shelters_open;
        self.evacuees += o.evacuees;
        self.capacity += o.capacity;
        self.care_needed += o.care_needed;
        self.open_requests += o.open_requests;
        self.incidents += o.incidents;
        self.silent += o.silent;
        self.outbox_alarms += o.outbox_alarms;
    }
}

/// One ward's row (and map tile).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WardRow {
    pub ward: &'static Ward,
    pub figures: Figures,
    pub level: Level,
    /// Age of the ward's freshest report.
    pub newest: Option<Age>,
    /// Every site of the ward that ever reported is silent: its figures are all old.
    pub all_silent: bool,
}

/// What the view shows, derived from the state at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The world the rows, totals, alerts and detail come from.
    pub mode: Mode,
    /// All 23 wards in code order, from the viewed world only.
    pub rows: Vec<WardRow>,
    pub totals: Figures,
    /// Active alerts of the viewed world, worst first.
    pub alerts: Rc<Vec<AlertRow>>,
    /// The open ward's view, when one is open.
    pub detail: Option<Rc<WardDetail>>,
    /// The open site's view, when one is open.
    pub site: Option<Rc<SiteDetail>>,
    /// The non-actual modes that hold any data: drills are shown, never added in.
    pub drills: Vec<Mode>,
    /// When a message last changed the state (the dashboard's clock).
    pub last_update: Option<Timestamp>,
    /// Messages received, good or bad.
    pub received: u64,
    /// Refused messages by reason.
    pub rejected: BTreeMap<&'static str, u64>,
}

impl Snapshot {
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }
}

/// The mutable part, shared by successive [`Dashboard`] values.
#[derive(Debug)]
struct Engine {
    state: State,
    received: u64,
    rejected: BTreeMap<&'static str, u64>,
    log_limit: RateLimit,
}

impl Default for Engine {
    fn default() -> Self {
        Engine {
            state: State::new(),
            received: 0,
            rejected: BTreeMap::new(),
            log_limit: RateLimit::new(LOG_EVERY_MS),
        }
    }
}

impl Engine {
    /// Applies a batch: whether the state changed, and the `sent_at` (ms) of the live
    /// messages in it (neither retained copies nor replayed backlog), for the latency figures.
    fn ingest_batch(&mut self, messages: &[Incoming], now: Timestamp) -> (bool, Vec<i64>) {
        let mut changed = false;
        let mut live = Vec::new();
        for m in messages {
            self.received += 1;
            match checked(&m.topic, &m.payload) {
                Ok(None) => {}
                Ok(Some(env)) => {
                    if matches!(self.state.apply(&env), Change::Updated { .. }) {
                        changed = true;
                    }
                    if !m.retained && !env.header.historical {
                        live.push(env.header.sent_at.0);
                    }
                }
                Err((reason, detail)) => {
                    *self.rejected.entry(reason).or_default() += 1;
                    if let Some(held_back) = self.log_limit.allow(now.0) {
                        log::warn(&format!(
                            "renkei: refused a message on {} ({reason}): {detail} \
                             [{held_back} more refused since the last report]",
                            m.topic
                        ));
                    }
                }
            }
        }
        (changed, live)
    }

    fn snapshot(&self, now: Timestamp, last_update: Option<Timestamp>, view: &View) -> Snapshot {
        let world = self.state.world(view.mode);
        let rollups = world.rollups(now);
        let mut newest: BTreeMap<_, Timestamp> = BTreeMap::new();
        for (site, state) in &world.sites {
            if let Some(heard) = state.last_heard {
                let slot = newest.entry(site.ward).or_insert(heard);
                *slot = (*slot).max(heard);
            }
        }
        let mut totals = Figures::default();
        let rows = rollups
            .iter()
            .filter_map(|r| {
                let figures = Figures::from(r);
                totals += figures;
                Some(WardRow {
                    ward: r.ward.ward()?,
                    figures,
                    level: r.level(),
                    newest: newest.get(&r.ward).map(|&t| Age::between(now, t)),
                    all_silent: r.sites > 0 && r.silent == r.sites,
                })
            })
            .collect();
        let detail = match &view.route {
            Route::Ward(ward) => Some(Rc::new(WardDetail::derive(world, *ward, now))),
            Route::Overview | Route::Site(_) => None,
        };
        let site = match &view.route {
            Route::Site(site) => Some(Rc::new(SiteDetail::derive(world, site, now))),
            Route::Overview | Route::Ward(_) => None,
        };
        let drills = [Mode::Exercise, Mode::Test]
            .into_iter()
            .filter(|&mode| {
                let world = self.state.world(mode);
                !world.sites.is_empty() || !world.alerts.is_empty()
            })
            .collect();
        Snapshot {
            mode: view.mode,
            rows,
            totals,
            alerts: Rc::new(active_alerts(world, now)),
            detail,
            site,
            drills,
            last_update,
            received: self.received,
            rejected: self.rejected.clone(),
        }
    }
}

/// What changes the dashboard.
#[derive(Debug)]
pub enum Action {
    /// Messages received since the last batch, with the time they are applied.
    Batch {
        messages: Vec<Incoming>,
        now: Timestamp,
    },
    /// The clock moved: silence is re-evaluated even when nothing arrives.
    Tick(Timestamp),
    Connection(ConnState),
    /// The broker's WebSocket URL, once found.
    Endpoint(Rc<str>),
    /// The page's hash changed.
    Route(Route, Timestamp),
    /// The operator chose which world to view.
    ViewMode(Mode, Timestamp),
    Access(Access),
    /// Ward mode's lines, as the broker last said ([`crate::links`]).
    Links(crate::links::Links),
}

/// What is shown of the state: which world, which page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub mode: Mode,
    pub route: Route,
}

impl Default for View {
    /// The actual world's overview: drills are only ever shown when asked for.
    fn default() -> Self {
        View {
            mode: Mode::Actual,
            route: Route::Overview,
        }
    }
}

/// Whether and as whom the page may connect.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Access {
    /// `/config.json` not read yet.
    #[default]
    Resolving,
    /// No login required: the broker runs in demo mode.
    Demo,
    /// The broker requires a login; `error` says why the last attempt failed.
    Login { error: Option<Rc<str>> },
    /// Credentials given; the client uses them.
    LoggedIn { user: Rc<str> },
}

/// The value behind `use_reducer`.
#[derive(Debug, Clone)]
pub struct Dashboard {
    engine: Rc<RefCell<Engine>>,
    pub snapshot: Rc<Snapshot>,
    pub conn: ConnState,
    pub endpoint: Option<Rc<str>>,
    pub view: View,
    pub access: Access,
    pub links: crate::links::Links,
}

impl Default for Dashboard {
    fn default() -> Self {
        Dashboard::new(Timestamp(0))
    }
}

impl Dashboard {
    pub fn new(now: Timestamp) -> Self {
        let engine = Engine::default();
        let view = View::default();
        let snapshot = Rc::new(engine.snapshot(now, None, &view));
        Dashboard {
            engine: Rc::new(RefCell::new(engine)),
            snapshot,
            conn: ConnState::Connecting,
            endpoint: None,
            view,
            access: Access::Resolving,
            links: crate::links::Links::default(),
        }
    }

    /// A new value with the snapshot at `now`, or `self` if nothing visible changed.
    fn refresh(self: Rc<Self>, now: Timestamp, last_update: Option<Timestamp>) -> Rc<Self> {
        let snapshot = self.engine.borrow().snapshot(now, last_update, &self.view);
        if snapshot == *self.snapshot {
            return self;
        }
        Rc::new(Dashboard {
            snapshot: Rc::new(snapshot),
            ..(*self).clone()
        })
    }

    /// A new value showing `view`, its snapshot taken at `now`.
    fn show(self: Rc<Self>, view: View, now: Timestamp) -> Rc<Self> {
        if view == self.view {
            return self;
        }
        let last_update = self.snapshot.last_update;
        Rc::new(Dashboard {
            view,
            ..(*self).clone()
        })
        .refresh(now, last_update)
    }
}

impl PartialEq for Dashboard {
    fn eq(&self, other: &Self) -> bool {
        Rc::ptr_eq(&self.engine, &other.engine)
            && self.snapshot == other.snapshot
            && self.conn == other.conn
            && self.endpoint == other.endpoint
            && self.view == other.view
            && self.access == other.access
    }
}

impl Reducible for Dashboard {
    type Action = Action;

    fn reduce(self: Rc<Self>, action: Action) -> Rc<Self> {
        match action {
            Action::Batch { messages, now } => {
                let (changed, live) = self.engine.borrow_mut().ingest_batch(&messages, now);
                #[cfg(target_arch = "wasm32")]
                crate::perf::browser::applied(live);
                #[cfg(not(target_arch = "wasm32"))]
                drop(live);
                let last_update = if changed {
                    Some(now)
                } else {
                    self.snapshot.last_update
                };
                self.refresh(now, last_update)
            }
            Action::Tick(now) => {
                let last_update = self.snapshot.last_update;
                self.refresh(now, last_update)
            }
            Action::Connection(conn) if conn == self.conn => self,
            Action::Connection(conn) => Rc::new(Dashboard {
                conn,
                ..(*self).clone()
            }),
            Action::Endpoint(url) => Rc::new(Dashboard {
                endpoint: Some(url),
                ..(*self).clone()
            }),
            Action::Links(links) => {
                if links == self.links {
                    return self;
                }
                Rc::new(Dashboard {
                    links,
                    ..(*self).clone()
                })
            }
            Action::Route(route, now) => {
                let view = View {
                    route,
                    ..self.view.clone()
                };
                self.show(view, now)
            }
            Action::ViewMode(mode, now) => {
                let view = View {
                    mode,
                    ..self.view.clone()
                };
                self.show(view, now)
            }
            Action::Access(access) if access == self.access => self,
            Action::Access(access) => Rc::new(Dashboard {
                access,
                ..(*self).clone()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use renkei_shared::{Body, encode, sample};

    use super::*;

    fn message(env: &renkei_shared::Envelope) -> Incoming {
        Incoming {
            topic: renkei_shared::Topic::of(env).unwrap().to_string(),
            payload: Bytes::from(encode(env).unwrap()),
            retained: true,
        }
    }

    fn batch(d: Rc<Dashboard>, messages: Vec<Incoming>, now: Timestamp) -> Rc<Dashboard> {
        d.reduce(Action::Batch { messages, now })
    }

    fn row(d: &Dashboard, code: u32) -> &WardRow {
        d.snapshot
            .rows
            .iter()
            .find(|r| r.ward.code.0 == code)
            .unwrap()
    }

    #[test]
    fn shows_all_23_wards_before_any_data() {
        let d = Dashboard::new(Timestamp(0));
        assert_eq!(d.snapshot.rows.len(), 23);
        assert!(d.snapshot.rows.iter().all(|r| r.level == Level::NoData));
        assert_eq!(d.snapshot.totals, Figures::default());
    }

    #[test]
    fn applies_a_batch_into_the_wards_row_and_totals() {
        let now = sample::SENT_AT;
        let d = Rc::new(Dashboard::new(now));
        let d = batch(
            d,
            vec![message(&sample::status()), message(&sample::shelter())],
            now,
        );
        let shinjuku = row(&d, 131041);
        assert_eq!(shinjuku.figures.sites, 1);
        assert_eq!(shinjuku.figures.reporting, 1);
        assert_eq!(shinjuku.figures.shelters_open, 1);
        assert_eq!(shinjuku.figures.evacuees, 312);
        assert_eq!(shinjuku.figures.capacity, 450);
        assert_eq!(shinjuku.figures.care_needed, 45);
        assert_eq!(d.snapshot.totals, shinjuku.figures);
        assert_eq!(d.snapshot.last_update, Some(now));
        assert_eq!(d.snapshot.received, 2);
        assert!(d.snapshot.drills.is_empty());
    }

    #[test]
    fn the_clock_makes_sites_silent_without_messages() {
        let now = sample::SENT_AT;
        let d = batch(
            Rc::new(Dashboard::new(now)),
            vec![message(&sample::status())],
            now,
        );
        // Interval 30 s: silent after 90 s.
        // Within the same age step (under ten seconds) nothing visible changes.
        let same = d.clone().reduce(Action::Tick(now.plus_secs(5)));
        assert!(Rc::ptr_eq(&d, &same), "nothing visible changed");
        let later = d.reduce(Action::Tick(now.plus_secs(91)));
        assert_eq!(row(&later, 131041).figures.silent, 1);
        assert_eq!(row(&later, 131041).figures.reporting, 0);
        assert_eq!(row(&later, 131041).level, Level::Warning);
    }

    #[test]
    fn exercise_data_is_flagged_and_never_added_in() {
        let now = sample::SENT_AT;
        let mut drill = sample::shelter();
        drill.header.mode = Mode::Exercise;
        let d = batch(Rc::new(Dashboard::new(now)), vec![message(&drill)], now);
        assert_eq!(d.snapshot.drills, vec![Mode::Exercise]);
        assert_eq!(d.snapshot.totals, Figures::default());
    }

    #[test]
    fn counts_bad_messages_by_reason_and_ignores_clears() {
        let now = sample::SENT_AT;
        let good = message(&sample::status());
        let wrong_topic = Incoming {
            topic: "renkei/v1/131016/chiyoda-es/status".into(),
            ..good.clone()
        };
        let bad_topic = Incoming {
            topic: "renkei/v1/nowhere".into(),
            ..good.clone()
        };
        let garbage = Incoming {
            payload: Bytes::from_static(&[1, 0xff, 0xff]),
            ..good.clone()
        };
        let clear = Incoming {
            payload: Bytes::new(),
            ..good.clone()
        };
        let d = batch(
            Rc::new(Dashboard::new(now)),
            vec![wrong_topic, bad_topic, garbage, clear],
            now,
        );
        let rejected: Vec<_> = d.snapshot.rejected.iter().map(|(k, v)| (*k, *v)).collect();
        assert_eq!(
            rejected,
            vec![("bad_topic", 1), ("malformed", 1), ("wrong_topic", 1)]
        );
        assert_eq!(d.snapshot.rejected_total(), 3);
        assert_eq!(d.snapshot.received, 4);
        assert_eq!(d.snapshot.last_update, None);
        assert_eq!(d.snapshot.totals, Figures::default());
    }

    #[test]
    fn commands_and_duplicates_change_nothing() {
        let mut state = State::new();
        let status = sample::status();
        let m = message(&status);
        assert!(matches!(
            ingest(&mut state, &m.topic, &m.payload),
            Ingested::Applied(Change::Updated { .. })
        ));
        assert_eq!(
            ingest(&mut state, &m.topic, &m.payload),
            Ingested::Applied(Change::Duplicate)
        );
        let cmd = message(&sample::command());
        assert_eq!(
            ingest(&mut state, &cmd.topic, &cmd.payload),
            Ingested::Applied(Change::NotState)
        );
        assert!(matches!(sample::command().body, Body::Command(_)));
    }

    #[test]
    fn connection_changes_only_when_it_differs() {
        let d = Rc::new(Dashboard::new(Timestamp(0)));
        let same = d.clone().reduce(Action::Connection(ConnState::Connecting));
        assert!(Rc::ptr_eq(&d, &same));
        let up = d.reduce(Action::Connection(ConnState::Connected));
        assert_eq!(up.conn, ConnState::Connected);
    }
}
