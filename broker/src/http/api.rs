//! The JSON shape of `GET /api/v1/state`.
//!
//! ```json
//! {
//!   "mode": "actual",
//!   "now": 1788220810000,
//!   "wards": [ { "ward": 131016, "name_ja": "千代田区", "name_en": "Chiyoda", "level": "no_data",
//!                "sites": 0, "reporting": 0, "silent": 0, "shelters_open": 0, "evacuees": 0,
//!                "capacity": 0, "care_needed": 0, "nearly_full": 0, "over_capacity": 0,
//!                "unsafe_buildings": 0, "open_requests": 0, "incidents": 0, "dead": 0,
//!                "missing": 0, "injured": 0, "active_alerts": 0, "worst_alert": null }, … ],
//!   "sites": [ { "ward": 131041, "site": "nishi-shinjuku-es", "name": "西新宿小学校",
//!                "last_heard": 1788220800000, "silent": false, "dead": false,
//!                "occupancy_pct": 80, "open_requests": 1, "incidents": 0,
//!                "status":   { "sent_at": …, "boot": 3, "seq": 10, "historical": false,
//!                              "value": { …SiteStatus as in the JSON mirror… } },
//!                "shelter":  null | { …same wrapper, ShelterStatus… },
//!                "supplies": null | { …same wrapper, SupplyStock… } }, … ],
//!   "alerts": [ { "alert_id": "occ-131041-nishi-shinjuku-es", "source": { "rule": "shelter_occupancy" },
//!                 "state": "active", "severity": "moderate", "urgency": "expected",
//!                 "certainty": "observed", "headline": "…", "description": "…",
//!                 "instruction": "…", "wards": [131041], "site": { "ward": 131041, "site": "…" },
//!                 "expires_at": null, "ack_required": true, "sent_at": 1788220810000,
//!                 "acknowledged": true,
//!                 "acks": [ { "user": "sato", "role": "hq", "organisation": "…",
//!                             "action": "accept", "note": "…", "sent_at": … } ] }, … ]
//! }
//! ```
//!
//! `wards` lists all 23 in code order (a ward operator sees only its own ward and its sites); `sites` lists every site heard from in the mode,
//! in (ward, site) order. Times are Unix milliseconds; message values are serialised exactly as
//! on the JSON mirror (`renkei/json/v1/…`). `level` is one of `no_data`, `normal`, `watch`,
//! `warning`, `critical`.

use renkei_shared::reducer::{AlertEntry, SiteState, Versioned};
use renkei_shared::{
    AckAction, Alert, Id, Level, Mode, Role, ShelterStatus, SiteStatus, State, SupplyStock,
    Timestamp, WardCode, WardRollup,
};
use serde::Serialize;

/// The live state of one mode, as the API shows it.
#[derive(Debug, Serialize)]
pub struct StateView<'a> {
    pub mode: Mode,
    pub now: Timestamp,
    pub wards: Vec<WardView>,
    pub sites: Vec<SiteView<'a>>,
    pub alerts: Vec<AlertView<'a>>,
}

impl<'a> StateView<'a> {
    /// The state of `mode`; limited to one ward's roll-up and sites when `ward` is given (a
    /// ward operator's view).
    pub fn new(state: &'a State, mode: Mode, now: Timestamp, ward: Option<WardCode>) -> Self {
        let world = state.world(mode);
        let shown = |w: WardCode| ward.is_none_or(|own| own == w);
        StateView {
            mode,
            now,
            wards: world
                .rollups(now)
                .iter()
                .filter(|r| shown(r.ward))
                .map(WardView::new)
                .collect(),
            sites: world
                .sites
                .iter()
                .filter(|(site, s)| s.last_heard.is_some() && shown(site.ward))
                .map(|(site, s)| SiteView::new(site.ward, &site.site, s, now))
                .collect(),
            alerts: {
                let mut alerts: Vec<AlertView<'a>> = world
                    .alerts
                    .values()
                    .filter(|entry| entry.is_active(now))
                    .filter_map(AlertView::new)
                    .filter(|a| ward.is_none_or(|own| a.alert.wards.contains(&own)))
                    .collect();
                alerts.sort_by_key(|a| std::cmp::Reverse(a.sent_at));
                alerts
            },
        }
    }
}

/// One ward's roll-up: the shared reducer's figures, with the ward's names, its map level and
/// the count of sites reporting.
#[derive(Debug, Serialize)]
pub struct WardView {
    pub name_ja: &'static str,
    pub name_en: &'static str,
    pub level: Level,
    pub reporting: u32,
    #[serde(flatten)]
    pub rollup: WardRollup,
}

impl WardView {
    fn new(r: &WardRollup) -> Self {
        let ward = r.ward.ward();
        WardView {
            name_ja: ward.map_or("", |w| w.name_ja),
            name_en: ward.map_or("", |w| w.name_en),
            level: r.level(),
            reporting: r.reporting(),
            rollup: r.clone(),
        }
    }
}

/// One site's latest reports.
#[derive(Debug, Serialize)]
pub struct SiteView<'a> {
    pub ward: WardCode,
    pub site: &'a Id,
    pub name: Option<&'a str>,
    pub last_heard: Option<Timestamp>,
    pub silent: bool,
    pub dead: bool,
    pub occupancy_pct: Option<u64>,
    pub open_requests: usize,
    pub incidents: usize,
    pub status: Option<Latest<'a, SiteStatus>>,
    pub shelter: Option<Latest<'a, ShelterStatus>>,
    pub supplies: Option<Latest<'a, SupplyStock>>,
}

impl<'a> SiteView<'a> {
    fn new(ward: WardCode, site: &'a Id, s: &'a SiteState, now: Timestamp) -> Self {
        SiteView {
            ward,
            site,
            name: s.name(),
            last_heard: s.last_heard,
            silent: s.is_silent(now),
            dead: s.is_dead(),
            occupancy_pct: s.occupancy_pct(),
            open_requests: s.requests.values().filter(|r| r.is_open()).count(),
            incidents: s.incidents.len(),
            status: s.status.as_ref().map(Latest::new),
            shelter: s.shelter.as_ref().map(Latest::new),
            supplies: s.supplies.as_ref().map(Latest::new),
        }
    }
}

/// A report with the header facts of the message that carried it.
#[derive(Debug, Serialize)]
pub struct Latest<'a, T> {
    pub sent_at: Timestamp,
    pub boot: u32,
    pub seq: u64,
    pub historical: bool,
    pub value: &'a T,
}

impl<'a, T> Latest<'a, T> {
    fn new(v: &'a Versioned<T>) -> Self {
        Latest {
            sent_at: v.sent_at,
            boot: v.stamp.boot,
            seq: v.stamp.seq,
            historical: v.historical,
            value: &v.value,
        }
    }
}

/// An active alert with the answers it got.
#[derive(Debug, Serialize)]
pub struct AlertView<'a> {
    #[serde(flatten)]
    pub alert: &'a Alert,
    /// When this version of the alert was sent.
    pub sent_at: Timestamp,
    pub acknowledged: bool,
    /// Each user's latest answer, in user order.
    pub acks: Vec<AckView<'a>>,
}

impl<'a> AlertView<'a> {
    fn new(entry: &'a AlertEntry) -> Option<Self> {
        let (_, sent_at, alert) = entry.alert.as_ref()?;
        Some(AlertView {
            alert,
            sent_at: *sent_at,
            acknowledged: entry.is_acknowledged(),
            acks: entry
                .acks
                .values()
                .map(|(_, sent_at, ack)| AckView {
                    user: &ack.by.user,
                    role: ack.by.role,
                    organisation: &ack.by.organisation,
                    action: ack.action,
                    note: &ack.note,
                    sent_at: *sent_at,
                })
                .collect(),
        })
    }
}

/// One user's answer to an alert.
#[derive(Debug, Serialize)]
pub struct AckView<'a> {
    pub user: &'a Id,
    pub role: Role,
    pub organisation: &'a str,
    pub action: AckAction,
    pub note: &'a str,
    pub sent_at: Timestamp,
}
