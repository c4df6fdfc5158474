//! What shelter staff report by hand (`renkei-agent report …`): the arguments of each report,
//! checked, and turned into the message body the outbox stores.
//!
//! A check that fails says which flag and why, in Japanese and English, because the person
//! typing is a volunteer on the day, not an operator.

use clap::{Args, Subcommand};
use renkei_shared::validate::{MAX_NAME_BYTES, MAX_TEXT_BYTES};
use renkei_shared::{
    Body, BuildingSafety, CareNeeds, Certainty, DamageCounts, Envelope, GeoPoint, Header, Id,
    IncidentCategory, IncidentReport, Item, LifelineState, Lifelines, Mode, Origin, ReportVersion,
    RequestState, RoadState, Severity, ShelterState, ShelterStatus, ShelterType, SiteRef,
    StockLine, SupplyRequest, SupplyStock, Timestamp,
};

use crate::keys::Key;
use crate::outbox::{Durability, Outbox, OutboxError};
use crate::report::crowding;

/// Largest head count a single shelter report may carry: the biggest wide-area evacuation
/// sites hold tens of thousands; more is a typing mistake.
pub const MAX_PEOPLE: u32 = 200_000;

/// One report, as staff give it.
#[derive(Debug, Clone, Subcommand)]
pub enum StaffReport {
    /// 避難所状況: evacuees, capacity, state, people needing care, lifelines
    Shelter(ShelterArgs),
    /// 物資在庫: stock on hand of one item (other items keep their last report)
    Supplies(SuppliesArgs),
    /// 物資要請: ask HQ for supplies
    Request(RequestArgs),
    /// 被害報告: an incident or damage near the site
    Incident(IncidentArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ShelterArgs {
    /// 避難者数: people at the shelter now
    #[arg(long)]
    pub evacuees: u32,
    /// 想定収容人数: planned capacity
    #[arg(long)]
    pub capacity: Option<u32>,
    /// 開設状況 [default: open when there are evacuees, else unknown]
    #[arg(long, value_enum)]
    pub state: Option<ShelterState>,
    /// 避難所の種別
    #[arg(long = "type", value_enum, default_value = "designated")]
    pub shelter_type: ShelterType,
    /// 世帯数
    #[arg(long)]
    pub households: Option<u32>,
    /// 要介護高齢者
    #[arg(long)]
    pub elderly: Option<u32>,
    /// 障害者
    #[arg(long)]
    pub disabled: Option<u32>,
    /// 乳幼児
    #[arg(long)]
    pub infants: Option<u32>,
    /// 妊産婦
    #[arg(long)]
    pub pregnant: Option<u32>,
    /// 医療的ケアが必要な人
    #[arg(long)]
    pub medical: Option<u32>,
    /// 外国語話者
    #[arg(long)]
    pub foreign_language: Option<u32>,
    /// 負傷者
    #[arg(long)]
    pub injured: Option<u32>,
    /// ペット
    #[arg(long)]
    pub pets: Option<u32>,
    /// 電気
    #[arg(long, value_enum)]
    pub power: Option<LifelineState>,
    /// 水道
    #[arg(long, value_enum)]
    pub water: Option<LifelineState>,
    /// ガス
    #[arg(long, value_enum)]
    pub gas: Option<LifelineState>,
    /// トイレ
    #[arg(long, value_enum)]
    pub toilets: Option<LifelineState>,
    /// 通信
    #[arg(long, value_enum)]
    pub comms: Option<LifelineState>,
    /// 応急危険度判定 (green / yellow / red tag)
    #[arg(long, value_enum)]
    pub safety: Option<BuildingSafety>,
}

#[derive(Debug, Clone, Args)]
pub struct SuppliesArgs {
    /// 品目
    #[arg(long, value_parser = parse_item)]
    pub item: Item,
    /// 在庫数 (litres for water and fuel)
    #[arg(long)]
    pub on_hand: u32,
    /// 1日の必要量
    #[arg(long)]
    pub daily_need: Option<u32>,
}

#[derive(Debug, Clone, Args)]
pub struct RequestArgs {
    /// 品目
    #[arg(long, value_parser = parse_item)]
    pub item: Item,
    /// 要請数量
    #[arg(long)]
    pub quantity: u32,
    /// 備考
    #[arg(long, default_value = "")]
    pub note: String,
}

#[derive(Debug, Clone, Args)]
pub struct IncidentArgs {
    /// 種別
    #[arg(long, value_enum)]
    pub category: IncidentCategory,
    /// 深刻度
    #[arg(long, value_enum)]
    pub severity: Severity,
    /// 確度
    #[arg(long, value_enum, default_value = "observed")]
    pub certainty: Certainty,
    /// 状況 (what happened, where, what is needed)
    #[arg(long)]
    pub description: String,
    /// 住所
    #[arg(long)]
    pub address: Option<String>,
    /// 位置 "LAT,LON"
    #[arg(long, value_name = "LAT,LON", allow_hyphen_values = true)]
    pub location: Option<String>,
    /// An earlier report's id, to send its update (続報) or final report (確定)
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,
    /// 報告区分: first (第1報), update N (続報), final (確定) [default: first, or update with --id]
    #[arg(long, value_name = "first|update|final")]
    pub version: Option<String>,
    /// 道路状況
    #[arg(long, value_enum)]
    pub road: Option<RoadState>,
    /// 死者
    #[arg(long)]
    pub dead: Option<u32>,
    /// 行方不明
    #[arg(long)]
    pub missing: Option<u32>,
    /// 重傷
    #[arg(long)]
    pub injured_serious: Option<u32>,
    /// 軽傷
    #[arg(long)]
    pub injured_minor: Option<u32>,
    /// 全壊
    #[arg(long)]
    pub houses_destroyed: Option<u32>,
    /// 半壊
    #[arg(long)]
    pub houses_half_destroyed: Option<u32>,
    /// 一部破損
    #[arg(long)]
    pub houses_partly_damaged: Option<u32>,
    /// 床上浸水
    #[arg(long)]
    pub flooded_above_floor: Option<u32>,
    /// 床下浸水
    #[arg(long)]
    pub flooded_below_floor: Option<u32>,
    /// 停電 (households)
    #[arg(long)]
    pub without_power: Option<u32>,
    /// 断水 (households)
    #[arg(long)]
    pub without_water: Option<u32>,
    /// ガス停止 (households)
    #[arg(long)]
    pub without_gas: Option<u32>,
    /// 電話不通 (lines)
    #[arg(long)]
    pub phone_lines_down: Option<u32>,
}

fn parse_item(text: &str) -> Result<Item, String> {
    Item::parse(text).ok_or_else(|| {
        let names: Vec<&str> = Item::ALL.iter().map(|i| i.as_str()).collect();
        format!(
            "品目が不明です / unknown item; one of: {}",
            names.join(", ")
        )
    })
}

/// Why a report cannot be saved as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--{flag}: {reason}")]
pub struct ReportError {
    pub flag: &'static str,
    pub reason: String,
}

fn bad(flag: &'static str, reason: impl Into<String>) -> ReportError {
    ReportError {
        flag,
        reason: reason.into(),
    }
}

fn at_most(flag: &'static str, value: Option<u32>, max: u32, of: &str) -> Result<(), ReportError> {
    match value {
        Some(v) if v > max => Err(bad(
            flag,
            format!("{v} は{of}({max})を超えています / {v} is more than {of} ({max})"),
        )),
        _ => Ok(()),
    }
}

fn text(flag: &'static str, value: &str, max: usize) -> Result<(), ReportError> {
    if value.len() > max {
        return Err(bad(
            flag,
            format!(
                "長すぎます / too long ({} bytes, at most {max})",
                value.len()
            ),
        ));
    }
    Ok(())
}

impl StaffReport {
    /// Checks the report before anything is stored (so an error never costs a sequence number).
    pub fn check(&self) -> Result<(), ReportError> {
        match self {
            StaffReport::Shelter(s) => {
                at_most("evacuees", Some(s.evacuees), MAX_PEOPLE, "上限")?;
                at_most("capacity", s.capacity, MAX_PEOPLE, "上限")?;
                at_most("households", s.households, s.evacuees, "避難者数 evacuees")?;
                for (flag, v) in [
                    ("elderly", s.elderly),
                    ("disabled", s.disabled),
                    ("infants", s.infants),
                    ("pregnant", s.pregnant),
                    ("medical", s.medical),
                    ("foreign-language", s.foreign_language),
                    ("injured", s.injured),
                ] {
                    at_most(flag, v, s.evacuees, "避難者数 evacuees")?;
                }
                if s.capacity == Some(0) {
                    return Err(bad("capacity", "0 は使えません / must be at least 1"));
                }
                if matches!(s.state, Some(ShelterState::NotOpen | ShelterState::Closed))
                    && s.evacuees > 0
                {
                    return Err(bad(
                        "state",
                        "未開設・閉鎖の避難所に避難者はいません / a shelter that is not open has no evacuees",
                    ));
                }
                Ok(())
            }
            StaffReport::Supplies(s) => {
                if s.daily_need == Some(0) {
                    return Err(bad("daily-need", "0 は使えません / must be at least 1"));
                }
                Ok(())
            }
            StaffReport::Request(r) => {
                if r.quantity == 0 {
                    return Err(bad("quantity", "0 は使えません / must be at least 1"));
                }
                text("note", &r.note, MAX_TEXT_BYTES)
            }
            StaffReport::Incident(i) => {
                if i.description.trim().is_empty() {
                    return Err(bad(
                        "description",
                        "状況を書いてください / say what happened",
                    ));
                }
                text("description", &i.description, MAX_TEXT_BYTES)?;
                if let Some(a) = &i.address {
                    text("address", a, MAX_NAME_BYTES)?;
                }
                if let Some(l) = &i.location {
                    parse_point(l)?;
                }
                if let Some(id) = &i.id {
                    Id::new(id.clone()).map_err(|e| bad("id", e.to_string()))?;
                }
                parse_version(i.version.as_deref(), i.id.is_some())?;
                Ok(())
            }
        }
    }

    /// The body to store under `key`. New requests and incidents get an id made from the key
    /// (unique within the site). `latest_stock` is the last supplies report, which a report of
    /// one item updates rather than replaces.
    pub fn body(
        &self,
        key: Key,
        now: Timestamp,
        latest_stock: Option<&SupplyStock>,
    ) -> Result<Body, ReportError> {
        self.check()?;
        Ok(match self {
            StaffReport::Shelter(s) => {
                let state = match s.state {
                    Some(state) => state,
                    None if s.evacuees > 0 => ShelterState::Open,
                    None => ShelterState::Unknown,
                };
                Body::Shelter(ShelterStatus {
                    shelter_type: s.shelter_type,
                    state,
                    opened_at: None,
                    closed_at: None,
                    capacity: s.capacity,
                    evacuees: Some(s.evacuees),
                    households: s.households,
                    crowding: crowding(Some(s.evacuees), s.capacity),
                    care: CareNeeds {
                        elderly: s.elderly,
                        disabled: s.disabled,
                        infants: s.infants,
                        pregnant: s.pregnant,
                        medical: s.medical,
                        foreign_language: s.foreign_language,
                        injured: s.injured,
                    },
                    pets: s.pets,
                    lifelines: Lifelines {
                        power: s.power,
                        water: s.water,
                        gas: s.gas,
                        toilets: s.toilets,
                        comms: s.comms,
                    },
                    building_safety: s.safety,
                    checked_at: Some(now),
                })
            }
            StaffReport::Supplies(s) => {
                let mut lines: Vec<StockLine> = latest_stock
                    .map(|l| l.lines.clone())
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|l| l.item != s.item)
                    .collect();
                lines.push(StockLine {
                    item: s.item,
                    on_hand: Some(s.on_hand),
                    daily_need: s.daily_need,
                });
                lines.sort_by_key(|l| l.item);
                Body::Supplies(SupplyStock { lines })
            }
            StaffReport::Request(r) => Body::Request(SupplyRequest {
                request_id: key_id("req", key)?,
                item: r.item,
                quantity: r.quantity,
                fulfilled: 0,
                state: RequestState::Requested,
                needed_by: None,
                note: r.note.clone(),
            }),
            StaffReport::Incident(i) => {
                let incident_id = match &i.id {
                    Some(id) => Id::new(id.clone()).map_err(|e| bad("id", e.to_string()))?,
                    None => key_id("inc", key)?,
                };
                Body::Incident(IncidentReport {
                    incident_id,
                    category: i.category,
                    location: i.location.as_deref().map(parse_point).transpose()?,
                    address: i.address.clone(),
                    counts: DamageCounts {
                        dead: i.dead,
                        missing: i.missing,
                        injured_serious: i.injured_serious,
                        injured_minor: i.injured_minor,
                        houses_destroyed: i.houses_destroyed,
                        houses_half_destroyed: i.houses_half_destroyed,
                        houses_partly_damaged: i.houses_partly_damaged,
                        flooded_above_floor: i.flooded_above_floor,
                        flooded_below_floor: i.flooded_below_floor,
                        without_power: i.without_power,
                        without_water: i.without_water,
                        without_gas: i.without_gas,
                        phone_lines_down: i.phone_lines_down,
                    },
                    road: i.road,
                    severity: i.severity,
                    certainty: i.certainty,
                    version: parse_version(i.version.as_deref(), i.id.is_some())?,
                    description: i.description.clone(),
                })
            }
        })
    }
}

/// A report stored in the outbox; its `Display` is what staff are told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    pub key: Key,
    /// Records waiting for delivery, this one included.
    pub depth: u64,
    /// The id HQ will know a new request or incident by.
    pub id: Option<String>,
}

impl std::fmt::Display for Saved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "保存しました / saved (seq {}, queue depth {}",
            self.key.seq, self.depth
        )?;
        if let Some(id) = &self.id {
            write!(f, ", id {id}")?;
        }
        f.write_str(")")
    }
}

/// Why a report was not stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The report itself is wrong: staff can correct it.
    #[error(transparent)]
    Invalid(#[from] ReportError),
    /// The outbox refused or failed (full, disk full, I/O).
    #[error(transparent)]
    Outbox(#[from] OutboxError),
}

/// Checks `report` and stores it for `site`, fsynced, before anyone is told "saved": the one
/// path of `renkei-agent report` and of the daemon's web form. `new_boot` is for a writer with
/// no daemon running, which must number a boot of its own (see [`crate::outbox`]).
pub fn store(
    outbox: &Outbox,
    site: &SiteRef,
    mode: Mode,
    report: &StaffReport,
    new_boot: bool,
) -> Result<Saved, StoreError> {
    report.check()?;
    let mut locked = outbox.lock()?;
    if new_boot {
        locked.new_boot()?;
    }
    let latest_stock = match locked.latest().supplies.map(|e| e.body) {
        Some(Body::Supplies(s)) => Some(s),
        _ => None,
    };
    // A dry run, so that anything `body` could still refuse is refused before a key is taken.
    let dry = report.body(Key::default(), Timestamp::now(), latest_stock.as_ref())?;
    let appended = locked.append(
        |key| Envelope {
            header: Header {
                origin: Origin::Site(site.clone()),
                boot: key.boot,
                seq: key.seq,
                sent_at: Timestamp::now(),
                mode,
                historical: false,
            },
            // Passed the dry run with the same input: only the key differs.
            body: report
                .body(key, Timestamp::now(), latest_stock.as_ref())
                .unwrap_or(dry),
        },
        Durability::Sync,
    )?;
    let id = match report {
        StaffReport::Request(_) => Some(format!("req-{}-{}", appended.key.boot, appended.key.seq)),
        StaffReport::Incident(i) if i.id.is_none() => {
            Some(format!("inc-{}-{}", appended.key.boot, appended.key.seq))
        }
        _ => None,
    };
    Ok(Saved {
        key: appended.key,
        depth: appended.depth,
        id,
    })
}

/// An id unique within the site: the report's own key.
fn key_id(prefix: &str, key: Key) -> Result<Id, ReportError> {
    Id::new(format!("{prefix}-{}-{}", key.boot, key.seq)).map_err(|e| bad("id", e.to_string()))
}

fn parse_point(text: &str) -> Result<GeoPoint, ReportError> {
    crate::config::parse_location(text)
        .map_err(|reason| bad("location", format!("{text:?}: {reason}")))
}

fn parse_version(text: Option<&str>, has_id: bool) -> Result<ReportVersion, ReportError> {
    match text {
        None if has_id => Ok(ReportVersion::Update(1)),
        None | Some("first") => Ok(ReportVersion::First),
        Some("final") => Ok(ReportVersion::Final),
        Some(t) => {
            let n = t.strip_prefix("update").map(str::trim);
            match n {
                Some("") => Ok(ReportVersion::Update(1)),
                Some(n) => n
                    .parse::<u16>()
                    .map(ReportVersion::Update)
                    .map_err(|_| bad("version", "first, update, update N or final")),
                None => Err(bad("version", "first, update, update N or final")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        report: StaffReport,
    }

    fn parse(args: &[&str]) -> Result<StaffReport, String> {
        Cli::try_parse_from(std::iter::once("report").chain(args.iter().copied()))
            .map(|c| c.report)
            .map_err(|e| e.to_string())
    }

    const KEY: Key = Key { boot: 3, seq: 17 };

    #[test]
    fn a_shelter_report_becomes_a_shelter_status() {
        let r = parse(&[
            "shelter",
            "--evacuees",
            "120",
            "--capacity",
            "150",
            "--households",
            "40",
            "--elderly",
            "5",
            "--water",
            "limited",
        ])
        .unwrap();
        let Body::Shelter(s) = r.body(KEY, Timestamp(9), None).unwrap() else {
            panic!("a shelter body")
        };
        assert_eq!(s.state, ShelterState::Open);
        assert_eq!(s.evacuees, Some(120));
        assert_eq!(s.crowding, Some(renkei_shared::Crowding::Crowded));
        assert_eq!(s.care.elderly, Some(5));
        assert_eq!(s.care.disabled, None, "not given stays unknown, not 0");
        assert_eq!(s.lifelines.water, Some(LifelineState::Limited));
        assert_eq!(s.checked_at, Some(Timestamp(9)));
    }

    #[test]
    fn impossible_figures_are_refused_naming_the_flag() {
        let cases: [(&[&str], &str); 6] = [
            (
                &["shelter", "--evacuees", "10", "--households", "11"],
                "--households",
            ),
            (
                &["shelter", "--evacuees", "10", "--infants", "50"],
                "--infants",
            ),
            (
                &["shelter", "--evacuees", "5", "--state", "closed"],
                "--state",
            ),
            (
                &["request", "--item", "water", "--quantity", "0"],
                "--quantity",
            ),
            (
                &[
                    "incident",
                    "--category",
                    "fire",
                    "--severity",
                    "severe",
                    "--description",
                    " ",
                ],
                "--description",
            ),
            (
                &[
                    "incident",
                    "--category",
                    "fire",
                    "--severity",
                    "minor",
                    "--description",
                    "x",
                    "--location",
                    "95,1",
                ],
                "--location",
            ),
        ];
        for (args, flag) in cases {
            let err = parse(args).unwrap().check().unwrap_err();
            assert!(err.to_string().starts_with(flag), "{args:?}: {err}");
        }
        let err = parse(&["supplies", "--item", "beer", "--on-hand", "1"]).unwrap_err();
        assert!(err.contains("unknown item"), "{err}");
    }

    #[test]
    fn a_supplies_report_updates_one_item_of_the_last_stock() {
        let before = SupplyStock {
            lines: vec![
                StockLine {
                    item: Item::Food,
                    on_hand: Some(10),
                    daily_need: Some(5),
                },
                StockLine {
                    item: Item::Water,
                    on_hand: Some(1),
                    daily_need: None,
                },
            ],
        };
        let r = parse(&[
            "supplies",
            "--item",
            "water",
            "--on-hand",
            "600",
            "--daily-need",
            "900",
        ])
        .unwrap();
        let Body::Supplies(s) = r.body(KEY, Timestamp(0), Some(&before)).unwrap() else {
            panic!("a supplies body")
        };
        assert_eq!(s.lines.len(), 2);
        assert_eq!(s.lines[0], before.lines[0]);
        assert_eq!(s.lines[1].on_hand, Some(600));
        assert_eq!(s.lines[1].daily_need, Some(900));
    }

    #[test]
    fn requests_and_incidents_get_ids_from_their_key() {
        let r = parse(&[
            "request",
            "--item",
            "water",
            "--quantity",
            "2000",
            "--note",
            "至急",
        ])
        .unwrap();
        let Body::Request(req) = r.body(KEY, Timestamp(0), None).unwrap() else {
            panic!("a request")
        };
        assert_eq!(req.request_id.as_str(), "req-3-17");
        assert_eq!(req.state, RequestState::Requested);
        let i = parse(&[
            "incident",
            "--category",
            "fire",
            "--severity",
            "severe",
            "--dead",
            "1",
            "--description",
            "体育館裏で火災",
        ])
        .unwrap();
        let Body::Incident(inc) = i.body(KEY, Timestamp(0), None).unwrap() else {
            panic!("an incident")
        };
        assert_eq!(inc.incident_id.as_str(), "inc-3-17");
        assert_eq!(inc.version, ReportVersion::First);
        assert_eq!(inc.counts.dead, Some(1));
        assert_eq!(inc.counts.missing, None);
        let update = parse(&[
            "incident",
            "--category",
            "fire",
            "--severity",
            "minor",
            "--id",
            "inc-3-17",
            "--description",
            "鎮火",
        ])
        .unwrap();
        let Body::Incident(inc) = update.body(KEY, Timestamp(0), None).unwrap() else {
            panic!("an incident")
        };
        assert_eq!(inc.incident_id.as_str(), "inc-3-17");
        assert_eq!(inc.version, ReportVersion::Update(1));
    }
}
