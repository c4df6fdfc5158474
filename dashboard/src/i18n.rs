//! Labels in Japanese (first) and English, and the formats shown next to them.

use renkei_shared::{
    AckAction, BuildingSafety, Crowding, HqState, IncidentCategory, Item, Level, LifelineState,
    LinkState, Mode, PowerSource, ReportVersion, RequestState, Severity, ShelterState, ShelterType,
    SiteKind, Timestamp, Ward,
};

use crate::age::Age;
use crate::mqtt::ConnState;

/// The display language.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lang {
    #[default]
    Ja,
    En,
}

impl Lang {
    pub fn other(self) -> Lang {
        match self {
            Lang::Ja => Lang::En,
            Lang::En => Lang::Ja,
        }
    }

    /// The BCP 47 tag, for `<html lang>`.
    pub fn tag(self) -> &'static str {
        match self {
            Lang::Ja => "ja",
            Lang::En => "en",
        }
    }

    pub fn pick(self, ja: &'static str, en: &'static str) -> &'static str {
        match self {
            Lang::Ja => ja,
            Lang::En => en,
        }
    }
}

/// Every fixed text of the view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Label {
    Title,
    /// The language button names the language it switches to.
    Switch,
    Ward,
    Total,
    LastUpdate,
    Never,
    Received,
    Rejected,
    Conn(ConnState),
    Map,
    BackToOverview,
    Alerts,
    NoAlerts,
    Acknowledge,
    AcknowledgedBy,
    Shelters,
    NoShelters,
    Stock,
    Requests,
    Incidents,
    Nothing,
    Filter,
    Name,
    State,
    Evacuees,
    Occupancy,
    CareNeeded,
    Updated,
    Site,
    Item,
    OnHand,
    DailyNeed,
    DaysLeft,
    Requested,
    Delivered,
    Category,
    Casualties,
    Severity,
    Report,
    Wards,
    Silent,
    Stale,
    Offline,
    ViewWorld,
    /// The banner over a drill world that is being viewed.
    ViewingDrill,
    Demo,
    LogIn,
    User,
    Password,
    Unknown,
    SiteStatus,
    ShelterDetails,
    History,
    HistoryLoading,
    HistoryEmpty,
    HistoryFailed,
    Capacity,
    Kind,
    Power,
    Battery,
    Comms,
    Internet,
    Mobile,
    Landline,
    Radio,
    HqState,
    Interval,
    QueueDepth,
    OutboxAlarm,
    OutboxFull,
    LastHeard,
    ShelterType,
    Households,
    Crowding,
    Pets,
    BuildingSafety,
    Lifelines,
    Water,
    Gas,
    Toilets,
    CareBreakdown,
    NoSiteData,
    OtherSites,
    NoOtherSites,
    EvacueeCount,
    Actions,
    DeliveredQuantity,
}

impl Label {
    pub fn text(self, lang: Lang) -> &'static str {
        match self {
            Label::Title => lang.pick("連携 23区災害情報共有", "Renkei: 23-ward disaster picture"),
            Label::Switch => lang.pick("English", "日本語"),
            Label::Ward => lang.pick("区", "Ward"),
            Label::Total => lang.pick("合計", "Total"),
            Label::LastUpdate => lang.pick("最終更新", "Last update"),
            Label::Never => lang.pick("未受信", "none yet"),
            Label::Received => lang.pick("受信", "Received"),
            Label::Rejected => lang.pick("不正", "Refused"),
            Label::Conn(ConnState::Connecting) => lang.pick("接続中…", "Connecting…"),
            Label::Conn(ConnState::Connected) => lang.pick("接続済み", "Connected"),
            Label::Conn(ConnState::Disconnected) => lang.pick("切断", "Disconnected"),
            Label::Map => lang.pick("23区地図", "23-ward map"),
            Label::BackToOverview => lang.pick("← 全区一覧", "← All wards"),
            Label::Alerts => lang.pick("通知", "Alerts"),
            Label::NoAlerts => lang.pick("有効な通知はありません", "No active alerts"),
            Label::Acknowledge => lang.pick("確認", "Acknowledge"),
            Label::AcknowledgedBy => lang.pick("確認済み", "Acknowledged by"),
            Label::Shelters => lang.pick("避難所", "Shelters"),
            Label::NoShelters => {
                lang.pick("報告のある避難所はありません", "No shelter has reported")
            }
            Label::Stock => lang.pick("物資在庫", "Stock on hand"),
            Label::Requests => lang.pick("物資要請", "Supply requests"),
            Label::Incidents => lang.pick("被害報告", "Incidents"),
            Label::Nothing => lang.pick("なし", "None"),
            Label::Filter => lang.pick("名称で絞り込み", "Filter by name"),
            Label::Name => lang.pick("名称", "Name"),
            Label::State => lang.pick("状態", "State"),
            Label::Evacuees => lang.pick("避難者数 / 収容人数", "Evacuees / capacity"),
            Label::Occupancy => lang.pick("収容率", "Occupancy"),
            Label::CareNeeded => lang.pick("要配慮者", "Needing care"),
            Label::Updated => lang.pick("更新", "Updated"),
            Label::Site => lang.pick("拠点", "Site"),
            Label::Item => lang.pick("品目", "Item"),
            Label::OnHand => lang.pick("在庫", "On hand"),
            Label::DailyNeed => lang.pick("1日必要量", "Daily need"),
            Label::DaysLeft => lang.pick("残日数", "Days left"),
            Label::Requested => lang.pick("要請数", "Requested"),
            Label::Delivered => lang.pick("到着済", "Delivered"),
            Label::Category => lang.pick("種別", "Category"),
            Label::Casualties => lang.pick("人的・住家被害", "Casualties and damage"),
            Label::Severity => lang.pick("深刻度", "Severity"),
            Label::Report => lang.pick("報", "Report"),
            Label::Wards => lang.pick("対象区", "Wards"),
            Label::Silent => lang.pick("途絶", "silent"),
            Label::Stale => lang.pick("古い情報", "stale"),
            Label::Offline => lang.pick("切断", "offline"),
            Label::ViewWorld => lang.pick("表示", "View"),
            Label::ViewingDrill => lang.pick(
                "訓練・試験データを表示中 — 実災害の情報ではありません",
                "Showing EXERCISE / TEST data — not the actual situation",
            ),
            Label::Demo => lang.pick("デモ", "demo"),
            Label::LogIn => lang.pick("ログイン", "Log in"),
            Label::User => lang.pick("ユーザー名", "User"),
            Label::Password => lang.pick("パスワード", "Password"),
            Label::Unknown => lang.pick("不明", "unknown"),
            Label::SiteStatus => lang.pick("拠点状態", "Site status"),
            Label::ShelterDetails => lang.pick("避難所状況", "Shelter details"),
            Label::History => lang.pick("避難者数の推移", "Evacuees over time"),
            Label::HistoryLoading => lang.pick("履歴を読み込み中…", "Loading history…"),
            Label::HistoryEmpty => lang.pick(
                "記録された避難所報告はありません",
                "No shelter reports recorded",
            ),
            Label::HistoryFailed => {
                lang.pick("履歴を取得できませんでした", "Could not load the history")
            }
            Label::Capacity => lang.pick("収容人数", "Capacity"),
            Label::Kind => lang.pick("拠点種別", "Kind"),
            Label::Power => lang.pick("電源", "Power"),
            Label::Battery => lang.pick("バッテリー", "Battery"),
            Label::Comms => lang.pick("通信", "Communications"),
            Label::Internet => lang.pick("インターネット", "Internet"),
            Label::Mobile => lang.pick("携帯電話", "Mobile"),
            Label::Landline => lang.pick("固定電話", "Landline"),
            Label::Radio => lang.pick("防災行政無線", "Disaster radio"),
            Label::HqState => lang.pick("災害対策本部", "Disaster HQ"),
            Label::Interval => lang.pick("報告間隔", "Reporting interval"),
            Label::QueueDepth => lang.pick("未送信の報告", "Reports queued"),
            Label::OutboxAlarm => lang.pick(
                "送信待ちが満杯: 新しい報告を保存できません。拠点に連絡してください",
                "Outbox full: the site cannot store new reports. Call the site",
            ),
            Label::OutboxFull => lang.pick("送信待ち満杯", "outbox full"),
            Label::LastHeard => lang.pick("最終受信", "Last heard"),
            Label::ShelterType => lang.pick("避難所種別", "Shelter type"),
            Label::Households => lang.pick("世帯数", "Households"),
            Label::Crowding => lang.pick("混雑", "Crowding"),
            Label::Pets => lang.pick("ペット", "Pets"),
            Label::BuildingSafety => lang.pick("建物の安全", "Building safety"),
            Label::Lifelines => lang.pick("ライフライン", "Lifelines"),
            Label::Water => lang.pick("水道", "Water"),
            Label::Gas => lang.pick("ガス", "Gas"),
            Label::Toilets => lang.pick("トイレ", "Toilets"),
            Label::CareBreakdown => lang.pick("要配慮者の内訳", "People needing care"),
            Label::NoSiteData => lang.pick(
                "この拠点からの報告はまだありません",
                "Nothing received from this site yet",
            ),
            Label::OtherSites => lang.pick("区役所・物資拠点", "Ward offices and depots"),
            Label::EvacueeCount => lang.pick("避難者数", "Evacuees"),
            Label::Actions => lang.pick("対応", "Actions"),
            Label::DeliveredQuantity => lang.pick("到着数量", "Quantity delivered"),
            Label::NoOtherSites => lang.pick(
                "報告のある区役所・物資拠点はありません",
                "No ward office or depot has reported",
            ),
        }
    }
}

/// The message shown when the broker turns a login away.
pub fn login_refused(lang: Lang) -> &'static str {
    lang.pick(
        "ログインできませんでした（ユーザー名・パスワードが違うか、接続が閉じられました）",
        "Login failed: wrong user name or password, or the broker closed the connection",
    )
}

/// How old a figure is: "3分前" / "3 min ago".
pub fn age(age: Age, lang: Lang) -> String {
    match (age, lang) {
        (Age::JustNow, _) => lang.pick("たった今", "just now").into(),
        (Age::Seconds(n), Lang::Ja) => format!("{n}秒前"),
        (Age::Seconds(n), Lang::En) => format!("{n} s ago"),
        (Age::Minutes(n), Lang::Ja) => format!("{n}分前"),
        (Age::Minutes(n), Lang::En) => format!("{n} min ago"),
        (Age::Hours(n), Lang::Ja) => format!("{n}時間前"),
        (Age::Hours(n), Lang::En) => format!("{n} h ago"),
        (Age::Days(n), Lang::Ja) => format!("{n}日前"),
        (Age::Days(n), Lang::En) => format!("{n} d ago"),
    }
}

pub fn mode(mode: Mode, lang: Lang) -> &'static str {
    match mode {
        Mode::Actual => lang.pick("実災害", "Actual"),
        Mode::Exercise => lang.pick("訓練", "Exercise"),
        Mode::Test => lang.pick("試験", "Test"),
    }
}

/// The value of `data-mode` attributes.
pub fn mode_key(mode: Mode) -> &'static str {
    match mode {
        Mode::Actual => "actual",
        Mode::Exercise => "exercise",
        Mode::Test => "test",
    }
}

pub fn shelter_state(state: ShelterState, lang: Lang) -> &'static str {
    match state {
        ShelterState::NotOpen => lang.pick("未開設", "Not open"),
        ShelterState::Preparing => lang.pick("開設準備中", "Preparing"),
        ShelterState::Open => lang.pick("開設", "Open"),
        ShelterState::Closed => lang.pick("閉鎖", "Closed"),
        ShelterState::Unknown => lang.pick("不明", "Unknown"),
    }
}

pub fn request_state(state: RequestState, lang: Lang) -> &'static str {
    match state {
        RequestState::Requested => lang.pick("要請", "Requested"),
        RequestState::Accepted => lang.pick("受付", "Accepted"),
        RequestState::Committed => lang.pick("調達確定", "Committed"),
        RequestState::Shipped => lang.pick("出荷", "Shipped"),
        RequestState::Delivered => lang.pick("到着", "Delivered"),
        RequestState::Received => lang.pick("受領", "Received"),
        RequestState::Declined => lang.pick("辞退", "Declined"),
        RequestState::Cancelled => lang.pick("取消", "Cancelled"),
    }
}

pub fn category(category: IncidentCategory, lang: Lang) -> &'static str {
    match category {
        IncidentCategory::Fire => lang.pick("火災", "Fire"),
        IncidentCategory::BuildingCollapse => lang.pick("建物倒壊", "Building collapse"),
        IncidentCategory::Casualties => lang.pick("人的被害", "Casualties"),
        IncidentCategory::Road => lang.pick("道路", "Road"),
        IncidentCategory::Lifeline => lang.pick("ライフライン", "Lifeline"),
        IncidentCategory::Flood => lang.pick("浸水", "Flood"),
        IncidentCategory::Landslide => lang.pick("崖崩れ", "Landslide"),
        IncidentCategory::Other => lang.pick("その他", "Other"),
    }
}

pub fn severity(severity: Severity, lang: Lang) -> &'static str {
    match severity {
        Severity::Unknown => lang.pick("不明", "Unknown"),
        Severity::Minor => lang.pick("軽微", "Minor"),
        Severity::Moderate => lang.pick("中程度", "Moderate"),
        Severity::Severe => lang.pick("重大", "Severe"),
        Severity::Extreme => lang.pick("極めて重大", "Extreme"),
    }
}

/// The value of `data-severity` attributes and the suffix of `severity-…` classes.
pub fn severity_key(severity: Severity) -> &'static str {
    match severity {
        Severity::Unknown => "unknown",
        Severity::Minor => "minor",
        Severity::Moderate => "moderate",
        Severity::Severe => "severe",
        Severity::Extreme => "extreme",
    }
}

pub fn report_version(version: ReportVersion, lang: Lang) -> String {
    match (version, lang) {
        (ReportVersion::First, _) => lang.pick("第1報", "First").into(),
        (ReportVersion::Update(n), Lang::Ja) => format!("続報{n}"),
        (ReportVersion::Update(n), Lang::En) => format!("Update {n}"),
        (ReportVersion::Final, _) => lang.pick("確定", "Final").into(),
    }
}

pub fn ack_action(action: AckAction, lang: Lang) -> &'static str {
    match action {
        AckAction::Ack => lang.pick("確認", "acknowledged"),
        AckAction::Accept => lang.pick("対応", "accepted"),
        AckAction::Decline => lang.pick("辞退", "declined"),
        AckAction::Escalate => lang.pick("上申", "escalated"),
        AckAction::Resolved => lang.pick("解決", "resolved"),
        AckAction::Commit => lang.pick("調達確定", "committed"),
        AckAction::Ship => lang.pick("出荷", "shipped"),
        AckAction::Deliver => lang.pick("到着", "delivered"),
    }
}

/// The button that takes HQ's step on a supply request.
pub fn request_action(action: AckAction, lang: Lang) -> &'static str {
    match action {
        AckAction::Accept => lang.pick("受付", "Accept"),
        AckAction::Commit => lang.pick("調達確定", "Commit"),
        AckAction::Ship => lang.pick("出荷", "Ship"),
        AckAction::Deliver => lang.pick("到着", "Deliver"),
        AckAction::Decline => lang.pick("辞退", "Decline"),
        AckAction::Ack | AckAction::Escalate | AckAction::Resolved => ack_action(action, lang),
    }
}

/// The value of `data-action` attributes: the action's wire name.
pub fn ack_action_key(action: AckAction) -> &'static str {
    match action {
        AckAction::Ack => "ack",
        AckAction::Accept => "accept",
        AckAction::Decline => "decline",
        AckAction::Escalate => "escalate",
        AckAction::Resolved => "resolved",
        AckAction::Commit => "commit",
        AckAction::Ship => "ship",
        AckAction::Deliver => "deliver",
    }
}

pub fn item(item: Item, lang: Lang) -> &'static str {
    match item {
        Item::Food => lang.pick("食料", "Food"),
        Item::Blankets => lang.pick("毛布", "Blankets"),
        Item::InfantFormula => lang.pick("乳児用ミルク", "Infant formula"),
        Item::ChildDiapers => lang.pick("乳幼児用おむつ", "Child diapers"),
        Item::AdultDiapers => lang.pick("大人用おむつ", "Adult diapers"),
        Item::PortableToilets => lang.pick("携帯・簡易トイレ", "Portable toilets"),
        Item::ToiletPaper => lang.pick("トイレットペーパー", "Toilet paper"),
        Item::SanitaryProducts => lang.pick("生理用品", "Sanitary products"),
        Item::Water => lang.pick("飲料水", "Water"),
        Item::Medicine => lang.pick("医薬品", "Medicine"),
        Item::AllergySafeFood => lang.pick("アレルギー対応食", "Allergy-safe food"),
        Item::CardboardBeds => lang.pick("段ボールベッド", "Cardboard beds"),
        Item::Fuel => lang.pick("燃料", "Fuel"),
        Item::Other => lang.pick("その他", "Other"),
    }
}

/// Tenths of a day as "2.5日" / "2.5 d".
pub fn days_tenths(tenths: u64, lang: Lang) -> String {
    let (whole, tenth) = (tenths / 10, tenths % 10);
    match lang {
        Lang::Ja => format!("{whole}.{tenth}日"),
        Lang::En => format!("{whole}.{tenth} d"),
    }
}

pub fn site_kind(kind: SiteKind, lang: Lang) -> &'static str {
    match kind {
        SiteKind::WardOffice => lang.pick("区役所", "Ward office"),
        SiteKind::Shelter => lang.pick("避難所", "Shelter"),
        SiteKind::Depot => lang.pick("物資拠点", "Supply depot"),
    }
}

/// The value of `data-kind` attributes.
pub fn site_kind_key(kind: SiteKind) -> &'static str {
    match kind {
        SiteKind::WardOffice => "ward_office",
        SiteKind::Shelter => "shelter",
        SiteKind::Depot => "depot",
    }
}

pub fn hq_state(state: HqState, lang: Lang) -> &'static str {
    match state {
        HqState::None => lang.pick("未設置", "None"),
        HqState::Alert => lang.pick("警戒", "Alert"),
        HqState::Established => lang.pick("設置", "Established"),
        HqState::Dissolved => lang.pick("廃止", "Dissolved"),
        HqState::Unknown => lang.pick("不明", "Unknown"),
    }
}

pub fn power(power: PowerSource, lang: Lang) -> &'static str {
    match power {
        PowerSource::Grid => lang.pick("商用電源", "Grid"),
        PowerSource::Generator => lang.pick("発電機", "Generator"),
        PowerSource::Battery => lang.pick("バッテリー", "Battery"),
        PowerSource::None => lang.pick("停電", "None"),
        PowerSource::Unknown => lang.pick("不明", "Unknown"),
    }
}

pub fn link_state(state: LinkState, lang: Lang) -> &'static str {
    match state {
        LinkState::Ok => lang.pick("正常", "OK"),
        LinkState::Degraded => lang.pick("不安定", "Degraded"),
        LinkState::Down => lang.pick("不通", "Down"),
    }
}

pub fn shelter_type(t: ShelterType, lang: Lang) -> &'static str {
    match t {
        ShelterType::Designated => lang.pick("指定避難所", "Designated shelter"),
        ShelterType::Welfare => lang.pick("福祉避難所", "Welfare shelter"),
        ShelterType::Temporary => lang.pick("臨時避難所", "Temporary shelter"),
        ShelterType::EmergencySite => lang.pick("指定緊急避難場所", "Emergency evacuation site"),
        ShelterType::WideArea => lang.pick("広域避難場所", "Wide-area evacuation site"),
    }
}

pub fn crowding(c: Crowding, lang: Lang) -> &'static str {
    match c {
        Crowding::Vacant => lang.pick("空き", "Vacant"),
        Crowding::Crowded => lang.pick("混雑", "Crowded"),
        Crowding::Full => lang.pick("定員一杯", "Full"),
    }
}

pub fn lifeline_state(state: LifelineState, lang: Lang) -> &'static str {
    match state {
        LifelineState::Ok => lang.pick("使用可", "OK"),
        LifelineState::Limited => lang.pick("一部制限", "Limited"),
        LifelineState::Out => lang.pick("使用不可", "Out"),
    }
}

pub fn building_safety(b: BuildingSafety, lang: Lang) -> &'static str {
    match b {
        BuildingSafety::Safe => lang.pick("調査済（緑）", "Inspected (green)"),
        BuildingSafety::Caution => lang.pick("要注意（黄）", "Caution (yellow)"),
        BuildingSafety::Unsafe => lang.pick("危険（赤）", "Unsafe (red)"),
    }
}

/// The kinds of care need (要配慮者), in the model's order.
pub fn care_needs(lang: Lang) -> [&'static str; 7] {
    [
        lang.pick("要介護高齢者", "Elderly needing care"),
        lang.pick("障害者", "Disabled"),
        lang.pick("乳幼児", "Infants"),
        lang.pick("妊産婦", "Pregnant"),
        lang.pick("医療的ケア", "Medical care"),
        lang.pick("外国語話者", "Foreign-language speakers"),
        lang.pick("負傷者", "Injured"),
    ]
}

/// A ward's name in `lang`.
pub fn ward_name(ward: &Ward, lang: Lang) -> &'static str {
    lang.pick(ward.name_ja, ward.name_en)
}

/// The CSS class of a row at `level`.
pub fn level_class(level: Level) -> &'static str {
    match level {
        Level::NoData => "level-nodata",
        Level::Normal => "level-normal",
        Level::Watch => "level-watch",
        Level::Warning => "level-warning",
        Level::Critical => "level-critical",
    }
}

/// Japan Standard Time, UTC+9 all year (no daylight saving).
const JST_OFFSET_MS: i64 = 9 * 3600 * 1000;

/// `HH:MM:SS` in JST: HQ staff read Tokyo time whatever the browser's zone.
pub fn clock_jst(t: Timestamp) -> String {
    let secs = (t.0 + JST_OFFSET_MS).div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use renkei_shared::{WARDS, sample};

    use super::*;

    #[test]
    fn every_label_exists_in_both_languages_and_differs() {
        let labels = [
            Label::Title,
            Label::Switch,
            Label::Ward,
            Label::Total,
            Label::LastUpdate,
            Label::Never,
            Label::Received,
            Label::Rejected,
            Label::Conn(ConnState::Connecting),
            Label::Conn(ConnState::Connected),
            Label::Conn(ConnState::Disconnected),
            Label::Map,
            Label::BackToOverview,
            Label::Alerts,
            Label::NoAlerts,
            Label::Acknowledge,
            Label::AcknowledgedBy,
            Label::Shelters,
            Label::NoShelters,
            Label::Stock,
            Label::Requests,
            Label::Incidents,
            Label::Nothing,
            Label::Filter,
            Label::Name,
            Label::State,
            Label::Evacuees,
            Label::Occupancy,
            Label::CareNeeded,
            Label::Updated,
            Label::Site,
            Label::Item,
            Label::OnHand,
            Label::DailyNeed,
            Label::DaysLeft,
            Label::Requested,
            Label::Delivered,
            Label::Category,
            Label::Casualties,
            Label::Severity,
            Label::Report,
            Label::Wards,
            Label::Silent,
            Label::Stale,
            Label::Offline,
            Label::ViewWorld,
            Label::ViewingDrill,
            Label::Demo,
            Label::LogIn,
            Label::User,
            Label::Password,
            Label::Unknown,
            Label::SiteStatus,
            Label::ShelterDetails,
            Label::History,
            Label::HistoryLoading,
            Label::HistoryEmpty,
            Label::HistoryFailed,
            Label::Capacity,
            Label::Kind,
            Label::Power,
            Label::Battery,
            Label::Comms,
            Label::Internet,
            Label::Mobile,
            Label::Landline,
            Label::Radio,
            Label::HqState,
            Label::Interval,
            Label::QueueDepth,
            Label::OutboxAlarm,
            Label::OutboxFull,
            Label::LastHeard,
            Label::ShelterType,
            Label::Households,
            Label::Crowding,
            Label::Pets,
            Label::BuildingSafety,
            Label::Lifelines,
            Label::Water,
            Label::Gas,
            Label::Toilets,
            Label::CareBreakdown,
            Label::NoSiteData,
            Label::OtherSites,
            Label::NoOtherSites,
            Label::EvacueeCount,
            Label::Actions,
            Label::DeliveredQuantity,
        ];
        for l in labels {
            assert!(!l.text(Lang::Ja).is_empty());
            assert_ne!(l.text(Lang::Ja), l.text(Lang::En), "{l:?}");
        }
        assert_eq!(ward_name(&WARDS[0], Lang::Ja), "千代田区");
        assert_eq!(ward_name(&WARDS[0], Lang::En), "Chiyoda");
        assert_eq!(Lang::Ja.other(), Lang::En);
    }

    #[test]
    fn ages_read_naturally_in_both_languages() {
        assert_eq!(age(Age::Minutes(3), Lang::Ja), "3分前");
        assert_eq!(age(Age::Minutes(3), Lang::En), "3 min ago");
        assert_eq!(age(Age::Seconds(20), Lang::Ja), "20秒前");
        assert_eq!(age(Age::Hours(2), Lang::En), "2 h ago");
        assert_eq!(age(Age::Days(1), Lang::Ja), "1日前");
        assert_eq!(age(Age::JustNow, Lang::Ja), "たった今");
        assert_eq!(days_tenths(25, Lang::Ja), "2.5日");
        assert_eq!(days_tenths(5, Lang::En), "0.5 d");
    }

    #[test]
    fn enum_names_differ_between_languages() {
        for s in [
            ShelterState::Open,
            ShelterState::Preparing,
            ShelterState::Closed,
        ] {
            assert_ne!(shelter_state(s, Lang::Ja), shelter_state(s, Lang::En));
        }
        assert_eq!(request_state(RequestState::Committed, Lang::Ja), "調達確定");
        assert_eq!(category(IncidentCategory::Fire, Lang::Ja), "火災");
        assert_eq!(item(Item::Water, Lang::En), "Water");
        assert_eq!(mode(Mode::Exercise, Lang::Ja), "訓練");
        assert_eq!(report_version(ReportVersion::Update(2), Lang::Ja), "続報2");
    }

    #[test]
    fn clock_in_tokyo_time() {
        // The samples were sent at 2026-09-01 09:00:00 JST.
        assert_eq!(clock_jst(sample::SENT_AT), "09:00:00");
        assert_eq!(
            clock_jst(sample::SENT_AT.plus_secs(15 * 3600 + 59)),
            "00:00:59"
        );
        assert_eq!(clock_jst(Timestamp(0)), "09:00:00");
    }
}
