//! Ward mode's lines (`GET /api/v1/links`), read every few seconds: at a ward broker whether
//! HQ is reachable, at HQ whether each ward's relay is. The page says what is unknown and
//! since when, so that silence on a cut line is not read as silence at the sites.

use std::rc::Rc;

use renkei_shared::{Timestamp, WardCode};
use serde::Deserialize;

use crate::i18n::{self, Lang};

/// The API path.
pub const PATH: &str = "/api/v1/links";
/// How often the page asks, in ms.
pub const EVERY_MS: u32 = 5_000;

/// The body of [`PATH`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct Links {
    pub uplink: Option<Uplink>,
    #[serde(default)]
    pub relays: Vec<Relay>,
    #[serde(default)]
    pub record: Record,
}

/// The broker's record and its room on disk.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
pub struct Record {
    pub bytes: u64,
    pub budget: u64,
    pub alarm: bool,
    pub refused: u64,
}

/// A ward broker's line to HQ.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Uplink {
    pub ward: WardCode,
    pub connected: bool,
    pub down_since: Option<i64>,
    pub backlog: u64,
    pub stalled: bool,
}

/// A ward broker's relay, as HQ sees it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Relay {
    pub ward: WardCode,
    pub connected: bool,
    pub since: i64,
    pub last_heard: Option<i64>,
    /// The ward's messages HQ does not have yet, as its relay last reported.
    #[serde(default)]
    pub backlog: Option<u64>,
}

impl Links {
    /// The wards whose ward office HQ cannot reach now: their sites' state is unknown.
    pub fn wards_cut_off(&self) -> Rc<Vec<WardCode>> {
        Rc::new(
            self.relays
                .iter()
                .filter(|r| !r.connected)
                .map(|r| r.ward)
                .collect(),
        )
    }
}

/// Reads the body; `None` if it is not one (an older broker answers 404 with the page).
pub fn parse(body: &str) -> Option<Links> {
    serde_json::from_str(body).ok()
}

/// The notices to show, most important first.
pub fn notices(links: &Links, lang: Lang) -> Vec<String> {
    let mut out = Vec::new();
    let record = &links.record;
    if record.refused > 0 {
        out.push(match lang {
            Lang::Ja => format!(
                "記録領域が不足しています: {} 件の報告を受け付けられませんでした（送信元が保持し、再送します）。",
                record.refused
            ),
            Lang::En => format!(
                "The record is out of room: {} reports were refused (their senders keep them and send again).",
                record.refused
            ),
        });
    } else if record.alarm && record.budget > 0 {
        let pct = record.bytes.saturating_mul(100) / record.budget;
        out.push(match lang {
            Lang::Ja => format!("記録領域の {pct}% を使用しています。空き容量を確保してください。"),
            Lang::En => format!("The record uses {pct}% of its room. Free some space."),
        });
    }
    if let Some(up) = &links.uplink {
        if !up.connected {
            let since = up
                .down_since
                .map(|t| i18n::clock_jst(Timestamp(t)))
                .unwrap_or_else(|| "—".into());
            out.push(match lang {
                Lang::Ja => format!(
                    "本部（HQ）に接続できません: {since} から。この区の情報は記録・表示を続けています（未送信 {} 件）。他区の情報は古い可能性があります。",
                    up.backlog
                ),
                Lang::En => format!(
                    "HQ unreachable since {since}. This ward keeps recording and showing its own reports ({} waiting for HQ). Other wards' figures may be old.",
                    up.backlog
                ),
            });
        } else if up.stalled {
            out.push(
                lang.pick(
                    "本部（HQ）が受信した報告を記録していません。送信を再試行しています。",
                    "HQ takes this ward's reports but stores none; they are being sent again.",
                )
                .to_owned(),
            );
        }
    }
    for relay in links.relays.iter().filter(|r| !r.connected) {
        let name = ward_name(relay.ward, lang);
        let since = i18n::clock_jst(Timestamp(relay.since));
        let heard = relay
            .last_heard
            .map(|t| i18n::clock_jst(Timestamp(t)))
            .unwrap_or_else(|| "—".into());
        let waiting = relay.backlog.map(|n| match lang {
            Lang::Ja => format!("最終報告時の未送信 {n} 件、"),
            Lang::En => format!(", {n} reports waiting at its last report"),
        });
        let waiting = waiting.unwrap_or_default();
        out.push(match lang {
            Lang::Ja => format!(
                "{name}の区本部と通信できません: {since} から（{waiting}最終受信 {heard}）。{name}の避難所の状況は不明です（途絶とは限りません）。"
            ),
            Lang::En => format!(
                "{name} ward office unreachable since {since} (last heard {heard}{waiting}). Its shelters' state is unknown, not necessarily silent."
            ),
        });
    }
    for relay in links.relays.iter().filter(|r| r.connected) {
        let Some(n) = relay.backlog.filter(|n| *n > 0) else {
            continue;
        };
        let name = ward_name(relay.ward, lang);
        out.push(match lang {
            Lang::Ja => format!("{name}の区本部から未着分を受信中: 残り {n} 件。{name}の状況は追いつくまで古い可能性があります。"),
            Lang::En => format!("{name} ward office catching up: {n} reports still to come. Its figures may be old until then."),
        });
    }
    out
}

fn ward_name(code: WardCode, lang: Lang) -> String {
    renkei_shared::WARDS
        .iter()
        .find(|w| w.code == code)
        .map_or_else(|| code.to_string(), |w| i18n::ward_name(w, lang).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_line_is_said_at_both_ends_with_since_when() {
        let body = r#"{"uplink":{"ward":131041,"connected":false,"down_since":1800000000000,
            "backlog":42,"last_receipt":null,"stalled":false},
            "relays":[{"ward":131016,"user":"relay-chiyoda","connected":false,
            "since":1800000000000,"last_heard":1799999990000,"backlog":120,
            "backlog_at":1799999990000,"stalled":false},
            {"ward":131024,"user":"relay-chuo","connected":true,"since":1,"last_heard":null,
            "backlog":0,"backlog_at":1,"stalled":false}]}"#;
        let links = parse(body).unwrap();
        let ja = notices(&links, Lang::Ja);
        assert_eq!(ja.len(), 2, "{ja:?}");
        assert!(ja[0].contains("本部") && ja[0].contains("42"), "{ja:?}");
        let since = i18n::clock_jst(Timestamp(1_800_000_000_000));
        assert!(ja[0].contains(&since), "{ja:?}");
        assert!(
            ja[1].contains("千代田区") && ja[1].contains("不明") && ja[1].contains("120 件"),
            "{ja:?}"
        );
        let en = notices(&links, Lang::En);
        assert!(en[0].starts_with("HQ unreachable since"), "{en:?}");
        assert!(
            en[1].contains("Chiyoda") && en[1].contains("unknown"),
            "{en:?}"
        );
        assert_eq!(*links.wards_cut_off(), vec![WardCode(131016)]);
        // A ward office back on the line with a backlog: it is catching up.
        let catching_up = parse(
            r#"{"uplink":null,"relays":[{"ward":131024,"user":"relay-chuo","connected":true,
            "since":1,"last_heard":1,"backlog":3000,"backlog_at":1,"stalled":false}]}"#,
        )
        .unwrap();
        let en = notices(&catching_up, Lang::En);
        assert_eq!(en.len(), 1, "{en:?}");
        assert!(en[0].contains("Chuo") && en[0].contains("3000"), "{en:?}");
        // A broker from before the reports: no backlog said.
        let older = parse(
            r#"{"uplink":null,"relays":[{"ward":131024,"user":"relay-chuo","connected":false,
            "since":1,"last_heard":null}]}"#,
        )
        .unwrap();
        assert!(!notices(&older, Lang::En)[0].contains("waiting"));
        // All up: nothing to say.
        let up = parse(
            r#"{"uplink":{"ward":131041,"connected":true,"down_since":null,
            "backlog":0,"last_receipt":1,"stalled":false},"relays":[]}"#,
        )
        .unwrap();
        assert!(notices(&up, Lang::Ja).is_empty());
        assert_eq!(parse("<html>"), None);
        // A record at 80 %, then one refusing.
        let full = parse(
            r#"{"uplink":null,"relays":[],
            "record":{"bytes":85,"budget":100,"alarm":true,"refused":0}}"#,
        )
        .unwrap();
        assert_eq!(
            notices(&full, Lang::En),
            ["The record uses 85% of its room. Free some space."]
        );
        let refusing = parse(
            r#"{"uplink":null,"relays":[],
            "record":{"bytes":100,"budget":100,"alarm":true,"refused":7}}"#,
        )
        .unwrap();
        assert!(notices(&refusing, Lang::Ja)[0].contains("7 件"));
    }
}
