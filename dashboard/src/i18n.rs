//! Labels in Japanese (first) and English, and the formats shown next to them.

use renkei_shared::{Level, Timestamp, Ward};

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
        }
    }
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
