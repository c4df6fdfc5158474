//! One fixed, realistic example of every message kind.
//!
//! They pin the wire format (the golden vectors are these messages encoded), document the
//! model for integrators, and seed tests across the workspace.

use crate::model::*;
use crate::ward::WardCode;

/// 2026-09-01 09:00:00 JST (防災の日), the time every sample was "sent".
pub const SENT_AT: Timestamp = Timestamp(1_788_220_800_000);

fn id(s: &str) -> Id {
    Id::new(s).expect("sample ids are valid")
}

/// A shelter in Shinjuku: 西新宿小学校.
pub fn site() -> SiteRef {
    SiteRef {
        ward: WardCode(131041),
        site: id("nishi-shinjuku-es"),
    }
}

fn header(origin: Origin, seq: u64) -> Header {
    Header {
        origin,
        boot: 3,
        seq,
        sent_at: SENT_AT,
        mode: Mode::Actual,
        historical: false,
    }
}

fn from_site(seq: u64, body: Body) -> Envelope {
    Envelope {
        header: header(Origin::Site(site()), seq),
        body,
    }
}

fn from_hq(seq: u64, body: Body) -> Envelope {
    Envelope {
        header: header(Origin::Hq(id("broker")), seq),
        body,
    }
}

pub fn status() -> Envelope {
    from_site(
        10,
        Body::Status(SiteStatus {
            name: "西新宿小学校".into(),
            kind: SiteKind::Shelter,
            location: Some(GeoPoint {
                lat_e6: 35_689_500,
                lon_e6: 139_691_700,
            }),
            hq: HqState::Established,
            power: PowerSource::Generator,
            battery_pct: Some(82),
            comms: Comms {
                internet: Some(LinkState::Degraded),
                mobile: Some(LinkState::Ok),
                landline: Some(LinkState::Down),
                radio: Some(LinkState::Ok),
            },
            interval_s: 30,
            uptime_s: Some(3600),
            queue_depth: Some(0),
            outbox_alarm: false,
        }),
    )
}

pub fn shelter() -> Envelope {
    from_site(
        11,
        Body::Shelter(ShelterStatus {
            shelter_type: ShelterType::Designated,
            state: ShelterState::Open,
            opened_at: Some(Timestamp(SENT_AT.0 - 3_600_000)),
            closed_at: None,
            capacity: Some(450),
            evacuees: Some(312),
            households: Some(140),
            crowding: Some(Crowding::Crowded),
            care: CareNeeds {
                elderly: Some(21),
                disabled: Some(4),
                infants: Some(9),
                pregnant: Some(2),
                medical: None,
                foreign_language: Some(6),
                injured: Some(3),
            },
            pets: Some(5),
            lifelines: Lifelines {
                power: Some(LifelineState::Limited),
                water: Some(LifelineState::Out),
                gas: Some(LifelineState::Out),
                toilets: Some(LifelineState::Limited),
                comms: Some(LifelineState::Ok),
            },
            building_safety: Some(BuildingSafety::Safe),
            checked_at: Some(SENT_AT),
        }),
    )
}

pub fn supplies() -> Envelope {
    from_site(
        12,
        Body::Supplies(SupplyStock {
            lines: vec![
                StockLine {
                    item: Item::Water,
                    on_hand: Some(600),
                    daily_need: Some(936),
                },
                StockLine {
                    item: Item::Food,
                    on_hand: Some(900),
                    daily_need: Some(936),
                },
                StockLine {
                    item: Item::Blankets,
                    on_hand: Some(200),
                    daily_need: None,
                },
            ],
        }),
    )
}

pub fn request() -> Envelope {
    from_site(
        13,
        Body::Request(SupplyRequest {
            request_id: id("req-0001"),
            item: Item::Water,
            quantity: 2000,
            fulfilled: 0,
            state: RequestState::Requested,
            needed_by: Some(SENT_AT.plus_secs(6 * 3600)),
            note: "2L ペットボトル希望".into(),
        }),
    )
}

pub fn incident() -> Envelope {
    from_site(
        14,
        Body::Incident(IncidentReport {
            incident_id: id("inc-0001"),
            category: IncidentCategory::BuildingCollapse,
            location: Some(GeoPoint {
                lat_e6: 35_690_100,
                lon_e6: 139_692_900,
            }),
            address: Some("西新宿四丁目".into()),
            counts: DamageCounts {
                injured_serious: Some(1),
                injured_minor: Some(4),
                houses_destroyed: Some(2),
                ..DamageCounts::default()
            },
            road: Some(RoadState::Closed),
            severity: Severity::Severe,
            certainty: Certainty::Observed,
            version: ReportVersion::First,
            description: "木造家屋2棟倒壊、道路閉塞".into(),
        }),
    )
}

pub fn alert() -> Envelope {
    from_hq(
        1,
        Body::Alert(Alert {
            alert_id: id("occ-131041-nishi-shinjuku-es"),
            source: AlertSource::Rule(RuleKind::ShelterOccupancy),
            state: AlertState::Active,
            severity: Severity::Severe,
            urgency: Urgency::Immediate,
            certainty: Certainty::Observed,
            headline: "避難所の収容率が90%を超えました".into(),
            description: "西新宿小学校: 412 / 450 人 (92%)".into(),
            instruction: "近隣避難所への誘導を検討してください".into(),
            wards: vec![WardCode(131041)],
            site: Some(site()),
            expires_at: None,
            ack_required: true,
        }),
    )
}

pub fn ack() -> Envelope {
    from_hq(
        2,
        Body::Ack(Ack {
            target: AckTarget::Alert(id("occ-131041-nishi-shinjuku-es")),
            by: Actor {
                user: id("sato"),
                role: Role::Hq,
                organisation: "特別区災害対策本部".into(),
            },
            action: AckAction::Accept,
            fulfilled: None,
            note: "新宿中学校へ誘導開始".into(),
        }),
    )
}

pub fn birth() -> Envelope {
    from_site(
        1,
        Body::Life(Life::Birth {
            agent_version: "0.1.0".into(),
        }),
    )
}

pub fn death() -> Envelope {
    from_site(2, Body::Life(Life::Death))
}

pub fn command() -> Envelope {
    from_hq(
        3,
        Body::Command(Command {
            command_id: id("cmd-1"),
            target: site(),
            action: CommandAction::SetInterval { seconds: 10 },
        }),
    )
}

pub fn command_result() -> Envelope {
    from_site(
        15,
        Body::CommandResult(CommandResult {
            command_id: id("cmd-1"),
            outcome: CommandOutcome::Done,
        }),
    )
}

/// Every sample, with a file name for its golden vector.
pub fn named() -> Vec<(&'static str, Envelope)> {
    vec![
        ("status", status()),
        ("shelter", shelter()),
        ("supplies", supplies()),
        ("request", request()),
        ("incident", incident()),
        ("alert", alert()),
        ("ack", ack()),
        ("birth", birth()),
        ("death", death()),
        ("command", command()),
        ("command_result", command_result()),
    ]
}

/// Every sample.
pub fn all() -> Vec<Envelope> {
    named().into_iter().map(|(_, env)| env).collect()
}
