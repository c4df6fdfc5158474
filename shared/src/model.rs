//! The message model of DOMAIN.md: what sites and HQ say to each other.
//!
//! Every message is an [`Envelope`]: a common [`Header`] (who sent it, which boot and sequence,
//! when, in which [`Mode`]) and one [`Body`]. The same types travel as postcard on the wire
//! (see [`crate::codec`]) and as JSON for integrators, so they avoid serde features that postcard
//! cannot carry (internally tagged enums, skipped fields).
//!
//! Wire compatibility: enum variants and struct fields are encoded by position. Append new
//! variants at the end; any other change alters the golden vectors in `shared/tests/vectors/`
//! and needs a new schema version.
//!
//! Unknown counts are `Option`: `None` means "not known", never zero.

use serde::{Deserialize, Serialize};

use crate::ward::WardCode;

/// Unix time in milliseconds, UTC.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// The time now, from the system clock (the browser's in wasm, where `std` has none).
    pub fn now() -> Timestamp {
        #[cfg(target_arch = "wasm32")]
        {
            Timestamp(js_sys::Date::now() as i64)
        }
        #[cfg(not(target_arch = "wasm32"))]
        {
            let ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
            Timestamp(ms)
        }
    }

    /// Milliseconds from `earlier` to `self` (negative when `earlier` is later).
    pub fn millis_since(self, earlier: Timestamp) -> i64 {
        self.0.saturating_sub(earlier.0)
    }

    /// This time plus `secs` seconds.
    pub fn plus_secs(self, secs: i64) -> Timestamp {
        Timestamp(self.0.saturating_add(secs.saturating_mul(1000)))
    }
}

/// An identifier that is also a valid MQTT topic level: 1–64 characters of `A–Z a–z 0–9 _ -`.
///
/// Site ids, request ids, incident ids, alert ids and user names are all `Id`s, because each of
/// them appears in a topic. Deserialising does not check the characters (the bytes come from
/// the network); [`crate::validate`] does, and [`Id::new`] does for ids made locally.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(transparent)]
pub struct Id(
    #[cfg_attr(
        feature = "schema",
        schemars(regex(pattern = r"^[A-Za-z0-9_-]{1,64}$"))
    )]
    String,
);

/// Longest [`Id`] in characters.
pub const MAX_ID_LEN: usize = 64;

/// Why a text is not an [`Id`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an id (1–64 characters of A–Z, a–z, 0–9, '_' or '-')")]
pub struct IdError(pub String);

impl Id {
    /// Checks `s` and makes it an id.
    pub fn new(s: impl Into<String>) -> Result<Id, IdError> {
        let s = s.into();
        if Id::is_valid(&s) {
            Ok(Id(s))
        } else {
            Err(IdError(s))
        }
    }

    /// Whether `s` is a well-formed id.
    pub fn is_valid(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= MAX_ID_LEN
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl core::fmt::Display for Id {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(&self.0)
    }
}

impl core::str::FromStr for Id {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Id::new(s)
    }
}

/// A site: a ward office, shelter or depot, named by its ward and its id within Renkei.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SiteRef {
    pub ward: WardCode,
    pub site: Id,
}

impl SiteRef {
    /// The MQTT client id of this site's agent, `agent-{ward}-{site}`: the only id the broker
    /// admits the site's login under, and one no other login may take.
    pub fn agent_client_id(&self) -> String {
        format!("agent-{}-{}", self.ward, self.site)
    }

    /// Whether `client_id` is [`SiteRef::agent_client_id`], without making it: asked of every
    /// message a broker records.
    pub fn is_agent_client_id(&self, client_id: &str) -> bool {
        client_id
            .strip_prefix("agent-")
            .and_then(|rest| rest.split_once('-'))
            .is_some_and(|(ward, site)| {
                ward.len() == 6
                    && ward.parse::<u32>().is_ok_and(|w| w == self.ward.0)
                    && site == self.site.as_str()
            })
    }
}

/// Whether a message is about the real world or a drill. Drills must never pass for reality.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "clap",
    derive(clap::ValueEnum),
    value(rename_all = "snake_case")
)]
#[serde(rename_all = "snake_case")]
#[derive(strum::IntoStaticStr, strum::EnumString, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum Mode {
    /// 実災害: a real event.
    Actual,
    /// 訓練: an exercise.
    Exercise,
    /// A technical test.
    Test,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Actual, Mode::Exercise, Mode::Test];

    /// The name used in topics' JSON, the API's `?mode=` and the recorder.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Who sent a message.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// An edge agent at a site.
    Site(SiteRef),
    /// HQ: the broker's rules engine or an operator's dashboard, named by node (e.g. `broker`).
    Hq(Id),
}

/// The common header of every message (modelled on CAP 1.2 and L-Alert).
///
/// `(origin, boot, seq)` names a message uniquely: redelivery of the same message is harmless.
/// The schema version is not a field: it is the first byte of every frame (see
/// [`crate::codec`]), because a reader must know it before it can read the header at all.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Header {
    pub origin: Origin,
    /// Agent boot id: a counter persisted by the sender, raised at every start.
    pub boot: u32,
    /// Sequence number within the boot, raised for every message.
    pub seq: u64,
    /// When the sender made the message.
    pub sent_at: Timestamp,
    pub mode: Mode,
    /// Replayed from the agent's backlog after an outage rather than sent live.
    pub historical: bool,
}

/// One Renkei message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Envelope {
    pub header: Header,
    pub body: Body,
}

/// What a message says. Variants are encoded by position: append only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Body {
    Status(SiteStatus),
    Shelter(ShelterStatus),
    Supplies(SupplyStock),
    Request(SupplyRequest),
    Incident(IncidentReport),
    Alert(Alert),
    Ack(Ack),
    Life(Life),
    Command(Command),
    CommandResult(CommandResult),
}

/// The kind of a [`Body`], without its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[derive(strum::IntoStaticStr, strum::EnumString, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum BodyKind {
    Status,
    Shelter,
    Supplies,
    Request,
    Incident,
    Alert,
    Ack,
    Life,
    Command,
    CommandResult,
}

impl BodyKind {
    pub const ALL: [BodyKind; 10] = [
        BodyKind::Status,
        BodyKind::Shelter,
        BodyKind::Supplies,
        BodyKind::Request,
        BodyKind::Incident,
        BodyKind::Alert,
        BodyKind::Ack,
        BodyKind::Life,
        BodyKind::Command,
        BodyKind::CommandResult,
    ];

    /// The name used in topics, JSON and metrics.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl Body {
    pub fn kind(&self) -> BodyKind {
        match self {
            Body::Status(_) => BodyKind::Status,
            Body::Shelter(_) => BodyKind::Shelter,
            Body::Supplies(_) => BodyKind::Supplies,
            Body::Request(_) => BodyKind::Request,
            Body::Incident(_) => BodyKind::Incident,
            Body::Alert(_) => BodyKind::Alert,
            Body::Ack(_) => BodyKind::Ack,
            Body::Life(_) => BodyKind::Life,
            Body::Command(_) => BodyKind::Command,
            Body::CommandResult(_) => BodyKind::CommandResult,
        }
    }
}

/// A point in WGS84, in micro-degrees (integers: exact, compact, no NaN on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct GeoPoint {
    #[cfg_attr(test, proptest(strategy = "-90_000_000i32..=90_000_000"))]
    pub lat_e6: i32,
    #[cfg_attr(test, proptest(strategy = "-180_000_000i32..=180_000_000"))]
    pub lon_e6: i32,
}

impl GeoPoint {
    pub fn lat(self) -> f64 {
        f64::from(self.lat_e6) / 1e6
    }
    pub fn lon(self) -> f64 {
        f64::from(self.lon_e6) / 1e6
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Heartbeat / site status (死活・拠点状態)

/// A site's heartbeat: what it is and whether it can work. Sent on a timer, retained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SiteStatus {
    /// The site's name as staff know it, e.g. 新宿区立西新宿小学校.
    pub name: String,
    pub kind: SiteKind,
    pub location: Option<GeoPoint>,
    /// The ward's disaster HQ (災害対策本部) state, as this site knows it.
    pub hq: HqState,
    pub power: PowerSource,
    /// Battery charge in percent, where the box has one.
    #[cfg_attr(test, proptest(strategy = "proptest::option::of(0u8..=100)"))]
    pub battery_pct: Option<u8>,
    pub comms: Comms,
    /// Seconds between heartbeats: HQ marks the site silent after about three missed ones.
    #[cfg_attr(test, proptest(strategy = "1u32..=86_400"))]
    pub interval_s: u32,
    /// Seconds since the agent started.
    pub uptime_s: Option<u64>,
    /// Reports waiting in the agent's outbox.
    pub queue_depth: Option<u32>,
    /// The agent's outbox is full (or its disk is): it is refusing new staff reports until the
    /// backlog drains, so HQ should call the site.
    pub outbox_alarm: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "clap",
    derive(clap::ValueEnum),
    value(rename_all = "snake_case")
)]
#[serde(rename_all = "snake_case")]
#[derive(strum::IntoStaticStr, strum::EnumString, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum SiteKind {
    /// 区役所
    // Also taken: the kebab-case spelling that scripts, settings and the web form use.
    #[cfg_attr(feature = "clap", value(alias = "ward-office"))]
    WardOffice,
    /// 避難所
    Shelter,
    /// 物資拠点
    Depot,
}

impl SiteKind {
    /// The name used in JSON and the exports.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "clap",
    derive(clap::ValueEnum),
    value(rename_all = "snake_case")
)]
#[serde(rename_all = "snake_case")]
pub enum HqState {
    None,
    /// 警戒
    Alert,
    /// 設置
    Established,
    /// 廃止
    Dissolved,
    /// Not known at the site (appended: wire index 4).
    // Help without the wire note above, which is for protocol maintainers.
    #[cfg_attr(feature = "clap", value(help = "not known at the site"))]
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "clap",
    derive(clap::ValueEnum),
    value(rename_all = "snake_case")
)]
#[serde(rename_all = "snake_case")]
pub enum PowerSource {
    Grid,
    Generator,
    Battery,
    None,
    /// Not known: the box cannot tell and staff did not say (appended: wire index 4).
    // Help without the wire note above, which is for protocol maintainers.
    #[cfg_attr(feature = "clap", value(help = "not known at the site"))]
    Unknown,
}

/// State of one communication channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "clap",
    derive(clap::ValueEnum),
    value(rename_all = "snake_case")
)]
#[serde(rename_all = "snake_case")]
pub enum LinkState {
    Ok,
    Degraded,
    Down,
}

/// The site's communication channels; `None` where the site does not have or know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Comms {
    pub internet: Option<LinkState>,
    pub mobile: Option<LinkState>,
    pub landline: Option<LinkState>,
    /// 防災行政無線
    pub radio: Option<LinkState>,
}

// ---------------------------------------------------------------------------------------------
// 2. Shelter status (避難所状況)

/// A shelter's state as its staff last reported it. Retained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ShelterStatus {
    pub shelter_type: ShelterType,
    pub state: ShelterState,
    pub opened_at: Option<Timestamp>,
    pub closed_at: Option<Timestamp>,
    /// 想定収容人数
    pub capacity: Option<u32>,
    /// 避難者数
    pub evacuees: Option<u32>,
    /// 世帯数
    pub households: Option<u32>,
    pub crowding: Option<Crowding>,
    /// 要配慮者
    pub care: CareNeeds,
    pub pets: Option<u32>,
    pub lifelines: Lifelines,
    /// After inspection (応急危険度判定).
    pub building_safety: Option<BuildingSafety>,
    pub checked_at: Option<Timestamp>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "clap",
    derive(clap::ValueEnum),
    value(rename_all = "snake_case")
)]
#[serde(rename_all = "snake_case")]
pub enum ShelterType {
    /// 指定避難所
    Designated,
    /// 福祉避難所
    Welfare,
    /// 臨時
    Temporary,
    /// 指定緊急避難場所
    // Also taken: the kebab-case spelling that scripts, settings and the web form use.
    #[cfg_attr(feature = "clap", value(alias = "emergency-site"))]
    EmergencySite,
    /// 広域避難場所
    // Also taken: the kebab-case spelling that scripts, settings and the web form use.
    #[cfg_attr(feature = "clap", value(alias = "wide-area"))]
    WideArea,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "clap",
    derive(clap::ValueEnum),
    value(rename_all = "snake_case")
)]
#[serde(rename_all = "snake_case")]
pub enum ShelterState {
    /// 未開設
    // Also taken: the kebab-case spelling that scripts, settings and the web form use.
    #[cfg_attr(feature = "clap", value(alias = "not-open"))]
    NotOpen,
    /// 開設準備中
    Preparing,
    /// 開設
    Open,
    /// 閉鎖
    Closed,
    /// 不明
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Crowding {
    /// 空き
    Vacant,
    /// 混雑
    Crowded,
    /// 定員一杯
    Full,
}

/// People needing special care (要配慮者), by need. `None` is "not counted".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CareNeeds {
    pub elderly: Option<u32>,
    pub disabled: Option<u32>,
    pub infants: Option<u32>,
    pub pregnant: Option<u32>,
    pub medical: Option<u32>,
    pub foreign_language: Option<u32>,
    pub injured: Option<u32>,
}

impl CareNeeds {
    /// The known counts added up, or `None` if none is known.
    pub fn total(&self) -> Option<u64> {
        let counts = [
            self.elderly,
            self.disabled,
            self.infants,
            self.pregnant,
            self.medical,
            self.foreign_language,
            self.injured,
        ];
        counts
            .iter()
            .flatten()
            .map(|&n| u64::from(n))
            .fold(None, |acc, n| Some(acc.unwrap_or(0) + n))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "clap",
    derive(clap::ValueEnum),
    value(rename_all = "snake_case")
)]
#[serde(rename_all = "snake_case")]
pub enum LifelineState {
    Ok,
    Limited,
    Out,
}

/// Lifelines at the site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Lifelines {
    pub power: Option<LifelineState>,
    pub water: Option<LifelineState>,
    pub gas: Option<LifelineState>,
    pub toilets: Option<LifelineState>,
    pub comms: Option<LifelineState>,
}

/// Building safety tags of 応急危険度判定: green, yellow, red.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "clap",
    derive(clap::ValueEnum),
    value(rename_all = "snake_case")
)]
#[serde(rename_all = "snake_case")]
pub enum BuildingSafety {
    Safe,
    Caution,
    Unsafe,
}

// ---------------------------------------------------------------------------------------------
// 3. Supplies (物資)

/// Supply items: Japan's basic 8 items (基本8品目) first, then the others staff ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
#[derive(strum::IntoStaticStr, strum::EnumString, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum Item {
    /// 食料 (meals)
    Food,
    /// 毛布
    Blankets,
    /// 乳児用粉ミルク・液体ミルク
    InfantFormula,
    /// 乳児・小児用おむつ
    ChildDiapers,
    /// 大人用おむつ
    AdultDiapers,
    /// 携帯トイレ・簡易トイレ
    PortableToilets,
    /// トイレットペーパー
    ToiletPaper,
    /// 生理用品
    SanitaryProducts,
    /// 飲料水 (litres)
    Water,
    /// 医薬品
    Medicine,
    /// アレルギー対応食
    AllergySafeFood,
    /// 段ボールベッド
    CardboardBeds,
    /// 燃料 (litres)
    Fuel,
    /// その他
    Other,
}

impl Item {
    pub const ALL: [Item; 14] = [
        Item::Food,
        Item::Blankets,
        Item::InfantFormula,
        Item::ChildDiapers,
        Item::AdultDiapers,
        Item::PortableToilets,
        Item::ToiletPaper,
        Item::SanitaryProducts,
        Item::Water,
        Item::Medicine,
        Item::AllergySafeFood,
        Item::CardboardBeds,
        Item::Fuel,
        Item::Other,
    ];

    /// Whether the item is one of the basic 8 (基本8品目).
    pub fn is_basic_eight(self) -> bool {
        (self as u8) < 8
    }

    /// The name used in CLI arguments and JSON.
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// Parses the name given by [`Item::as_str`].
    pub fn parse(s: &str) -> Option<Item> {
        s.parse().ok()
    }
}

/// Stock on hand (在庫) at a site. Retained; each report replaces the previous one whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SupplyStock {
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::arbitrary::any::<StockLine>(), 0..8)"
        )
    )]
    pub lines: Vec<StockLine>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct StockLine {
    pub item: Item,
    pub on_hand: Option<u32>,
    /// What the site uses in a day, so HQ can tell days of stock left.
    pub daily_need: Option<u32>,
}

impl StockLine {
    /// Days of stock left, in tenths of a day, where both figures are known.
    pub fn days_left_tenths(&self) -> Option<u64> {
        match (self.on_hand, self.daily_need) {
            (Some(on_hand), Some(need)) if need > 0 => {
                Some(u64::from(on_hand) * 10 / u64::from(need))
            }
            _ => None,
        }
    }
}

/// A supply request (物資要請) and where it stands in its lifecycle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SupplyRequest {
    /// Unique within the site.
    pub request_id: Id,
    pub item: Item,
    pub quantity: u32,
    /// Quantity delivered so far.
    pub fulfilled: u32,
    pub state: RequestState,
    pub needed_by: Option<Timestamp>,
    pub note: String,
}

/// The lifecycle of a supply request (after B-PLo and OASIS EDXL-RM):
/// requested 要請 → accepted 受付 → committed 調達確定 → shipped 出荷 → delivered 到着 →
/// received 受領, or declined / cancelled at any point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum RequestState {
    Requested,
    Accepted,
    Committed,
    Shipped,
    Delivered,
    Received,
    Declined,
    Cancelled,
}

impl RequestState {
    /// Position in the lifecycle. A request only moves forward, so reports merge by taking the
    /// later state whatever order they arrive in; declined and cancelled end it.
    pub fn rank(self) -> u8 {
        match self {
            RequestState::Requested => 0,
            RequestState::Accepted => 1,
            RequestState::Committed => 2,
            RequestState::Shipped => 3,
            RequestState::Delivered => 4,
            RequestState::Received => 5,
            RequestState::Declined => 6,
            RequestState::Cancelled => 7,
        }
    }

    /// Whether nothing more is expected of HQ.
    pub fn is_closed(self) -> bool {
        matches!(
            self,
            RequestState::Received | RequestState::Declined | RequestState::Cancelled
        )
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Incident / damage report (被害報告)

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct IncidentReport {
    /// Unique within the site; later versions of the same report keep it.
    pub incident_id: Id,
    pub category: IncidentCategory,
    pub location: Option<GeoPoint>,
    pub address: Option<String>,
    pub counts: DamageCounts,
    pub road: Option<RoadState>,
    pub severity: Severity,
    pub certainty: Certainty,
    pub version: ReportVersion,
    pub description: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "clap",
    derive(clap::ValueEnum),
    value(rename_all = "snake_case")
)]
#[serde(rename_all = "snake_case")]
pub enum IncidentCategory {
    /// 火災
    Fire,
    /// 建物倒壊
    // Also taken: the kebab-case spelling that scripts, settings and the web form use.
    #[cfg_attr(feature = "clap", value(alias = "building-collapse"))]
    BuildingCollapse,
    /// 人的被害
    Casualties,
    /// 道路
    Road,
    /// ライフライン
    Lifeline,
    /// 浸水
    Flood,
    /// 崖崩れ
    Landslide,
    Other,
}

/// Counts following the national damage form (第4号様式). Unknown counts are `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DamageCounts {
    /// 死者
    pub dead: Option<u32>,
    /// 行方不明
    pub missing: Option<u32>,
    /// 重傷
    pub injured_serious: Option<u32>,
    /// 軽傷
    pub injured_minor: Option<u32>,
    /// 全壊
    pub houses_destroyed: Option<u32>,
    /// 半壊
    pub houses_half_destroyed: Option<u32>,
    /// 一部破損
    pub houses_partly_damaged: Option<u32>,
    /// 床上浸水
    pub flooded_above_floor: Option<u32>,
    /// 床下浸水
    pub flooded_below_floor: Option<u32>,
    /// 停電 (households)
    pub without_power: Option<u32>,
    /// 断水 (households)
    pub without_water: Option<u32>,
    /// ガス停止 (households)
    pub without_gas: Option<u32>,
    /// 電話不通 (lines)
    pub phone_lines_down: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "clap",
    derive(clap::ValueEnum),
    value(rename_all = "snake_case")
)]
#[serde(rename_all = "snake_case")]
pub enum RoadState {
    Open,
    /// 規制
    Restricted,
    /// 通行止
    Closed,
}

/// CAP 1.2 severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "clap",
    derive(clap::ValueEnum),
    value(rename_all = "snake_case")
)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Unknown,
    Minor,
    Moderate,
    Severe,
    Extreme,
}

/// CAP 1.2 certainty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "clap",
    derive(clap::ValueEnum),
    value(rename_all = "snake_case")
)]
#[serde(rename_all = "snake_case")]
pub enum Certainty {
    Observed,
    Likely,
    Possible,
    Unlikely,
    Unknown,
}

/// CAP 1.2 urgency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Urgency {
    Immediate,
    Expected,
    Future,
    Past,
    Unknown,
}

/// Which report of an incident this is: 第1報, 続報 (numbered), 確定.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum ReportVersion {
    First,
    Update(u16),
    Final,
}

// ---------------------------------------------------------------------------------------------
// 5. Alert (通知)

/// A CAP-style alert raised by HQ staff or by a broker rule. Retained while it matters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Alert {
    pub alert_id: Id,
    pub source: AlertSource,
    pub state: AlertState,
    pub severity: Severity,
    pub urgency: Urgency,
    pub certainty: Certainty,
    pub headline: String,
    pub description: String,
    pub instruction: String,
    #[cfg_attr(
        test,
        proptest(
            strategy = "proptest::collection::vec(proptest::arbitrary::any::<WardCode>(), 0..4)"
        )
    )]
    pub wards: Vec<WardCode>,
    /// The site the alert is about, if one.
    pub site: Option<SiteRef>,
    pub expires_at: Option<Timestamp>,
    pub ack_required: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum AlertSource {
    Operator,
    Rule(RuleKind),
}

/// The broker's rules (DOMAIN.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    /// Shelter occupancy at or above its threshold (90 %).
    ShelterOccupancy,
    /// Site silent for three reporting intervals.
    SiteSilent,
    /// Water or food stock below its threshold (one day).
    StockLow,
    /// Supply request unanswered for two hours.
    RequestUnanswered,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    Active,
    Cleared,
}

// ---------------------------------------------------------------------------------------------
// 6. Acknowledgement (確認応答)

/// An operator's answer to an alert or a supply request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Ack {
    pub target: AckTarget,
    pub by: Actor,
    pub action: AckAction,
    /// For supply requests: the quantity delivered so far, if this ack changes it.
    pub fulfilled: Option<u32>,
    pub note: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum AckTarget {
    Alert(Id),
    Request { site: SiteRef, request_id: Id },
}

/// Who acted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Actor {
    pub user: Id,
    pub role: Role,
    pub organisation: String,
}

/// The roles of Renkei's users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[cfg_attr(
    feature = "clap",
    derive(clap::ValueEnum),
    value(rename_all = "snake_case")
)]
#[serde(rename_all = "snake_case")]
#[derive(strum::IntoStaticStr, strum::EnumString, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum Role {
    Agent,
    Ward,
    Hq,
    Integrator,
    Admin,
    /// A ward broker's uplink to HQ, bound to one ward: forwards that ward's record, reads
    /// what HQ sends down to it.
    Relay,
}

impl Role {
    /// The name stored in the users table and given on the command line.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// What an acknowledgement does. On supply requests the lifecycle steps move the request on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum AckAction {
    /// 確認
    Ack,
    /// 対応 / 受付
    Accept,
    Decline,
    Escalate,
    /// 解決
    Resolved,
    /// 調達確定
    Commit,
    /// 出荷
    Ship,
    /// 到着
    Deliver,
}

impl AckAction {
    /// The request state this action moves a supply request to, if any.
    pub fn request_state(self) -> Option<RequestState> {
        match self {
            AckAction::Accept => Some(RequestState::Accepted),
            AckAction::Commit => Some(RequestState::Committed),
            AckAction::Ship => Some(RequestState::Shipped),
            AckAction::Deliver => Some(RequestState::Delivered),
            AckAction::Decline => Some(RequestState::Declined),
            AckAction::Ack | AckAction::Escalate | AckAction::Resolved => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Lifecycle (birth / death) and commands

/// An agent's birth (sent on every connect) or death (its MQTT last will). Retained.
///
/// The agent numbers its will after the birth of the same connection, so the death outranks
/// that birth and is itself outranked by the next connection's birth.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Life {
    Birth { agent_version: String },
    Death,
}

/// HQ → agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Command {
    pub command_id: Id,
    pub target: SiteRef,
    pub action: CommandAction,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum CommandAction {
    /// Send a fresh full report (rebirth).
    Rebirth,
    /// Change the heartbeat interval.
    SetInterval {
        #[cfg_attr(test, proptest(strategy = "1u32..=86_400"))]
        seconds: u32,
    },
}

/// How long a command stays good: one that reaches its site older than this (by the site's
/// clock, from its `sent_at`) is not carried out, and the site answers
/// [`CommandOutcome::Expired`]. One TTL for the whole system, so that HQ knows from the
/// command alone when to stop waiting for its result.
pub const COMMAND_TTL_MS: i64 = 60 * 60 * 1000;

impl CommandOutcome {
    /// What a site does with a command sent at `sent_at` that reaches it at `now`.
    pub fn on_arrival(sent_at: Timestamp, now: Timestamp) -> CommandOutcome {
        let age_ms = now.millis_since(sent_at);
        if age_ms > COMMAND_TTL_MS {
            CommandOutcome::Expired {
                age_s: u32::try_from(age_ms / 1000).unwrap_or(u32::MAX),
            }
        } else {
            CommandOutcome::Done
        }
    }
}

/// Site → HQ: what became of a command, sent once per command by the site it targets.
///
/// It travels like any report of the site (through its outbox, its ward's broker and that
/// broker's uplink), so HQ learns the outcome of a command that waited out a cut line as
/// surely as the site's other news.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CommandResult {
    pub command_id: Id,
    pub outcome: CommandOutcome,
}

/// What a site did with a command. Variants are encoded by position: append only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum CommandOutcome {
    /// Carried out on arrival.
    Done,
    /// Not carried out: it arrived older than the site's command TTL (its age on arrival,
    /// by the site's clock, in seconds).
    Expired { age_s: u32 },
}

#[cfg(test)]
mod arbitrary {
    //! Strategies for the types whose valid values are narrower than their Rust type.
    use proptest::prelude::*;

    use super::Id;
    use crate::ward::{WARDS, WardCode};

    impl Arbitrary for Id {
        type Parameters = ();
        type Strategy = BoxedStrategy<Id>;
        fn arbitrary_with(_: ()) -> Self::Strategy {
            "[A-Za-z0-9_-]{1,24}"
                .prop_map(|s| Id::new(s).expect("regex makes ids"))
                .boxed()
        }
    }

    impl Arbitrary for WardCode {
        type Parameters = ();
        type Strategy = BoxedStrategy<WardCode>;
        fn arbitrary_with(_: ()) -> Self::Strategy {
            (0..WARDS.len()).prop_map(|i| WARDS[i].code).boxed()
        }
    }
}

#[cfg(test)]
mod tests {
    use strum::VariantArray;

    use super::*;
    use crate::reducer::Level;

    /// Every variant's text name (strum) is its serde name, and parses back to it.
    fn names_agree<T>()
    where
        T: VariantArray + Copy + PartialEq + std::fmt::Debug + Serialize,
        T: Into<&'static str> + std::str::FromStr,
    {
        for &v in T::VARIANTS {
            let text: &'static str = v.into();
            assert_eq!(serde_json::to_value(v).ok(), Some(serde_json::json!(text)));
            assert!(
                matches!(text.parse::<T>(), Ok(p) if p == v),
                "{text} parses back"
            );
        }
        assert!("no-such-name".parse::<T>().is_err());
    }

    #[test]
    fn text_names_are_serde_names() {
        names_agree::<Mode>();
        names_agree::<BodyKind>();
        names_agree::<SiteKind>();
        names_agree::<Item>();
        names_agree::<Role>();
        names_agree::<Level>();
        assert_eq!(Item::VARIANTS, Item::ALL.as_slice());
        assert_eq!(BodyKind::VARIANTS, BodyKind::ALL.as_slice());
        assert_eq!(Mode::VARIANTS, Mode::ALL.as_slice());
    }

    #[test]
    fn a_command_is_carried_out_within_its_ttl_and_expires_after() {
        let sent = Timestamp(1_000_000_000);
        let at = |ms| CommandOutcome::on_arrival(sent, Timestamp(sent.0 + ms));
        assert_eq!(at(0), CommandOutcome::Done);
        assert_eq!(at(COMMAND_TTL_MS), CommandOutcome::Done);
        // A site whose clock is behind the sender's carries it out.
        assert_eq!(at(-5_000), CommandOutcome::Done);
        assert_eq!(
            at(COMMAND_TTL_MS + 1),
            CommandOutcome::Expired { age_s: 3600 }
        );
        assert_eq!(
            at(2 * COMMAND_TTL_MS),
            CommandOutcome::Expired { age_s: 7200 }
        );
    }

    #[test]
    fn agent_client_id_names_ward_and_site() {
        let site = crate::sample::site();
        assert_eq!(site.agent_client_id(), "agent-131041-nishi-shinjuku-es");
        assert!(site.is_agent_client_id("agent-131041-nishi-shinjuku-es"));
        for other in [
            "agent-131041-nishi-shinjuku",
            "agent-131041-nishi-shinjuku-es2",
            "agent-13104-1nishi-shinjuku-es",
            "agent-131016-nishi-shinjuku-es",
            "relay-131041",
            "",
        ] {
            assert!(!site.is_agent_client_id(other), "{other}");
        }
    }
}
