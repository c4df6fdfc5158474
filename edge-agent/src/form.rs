//! The local web form: shelter staff report from any phone on the shelter's network, with no
//! app to install and no link to HQ needed.
//!
//! ```text
//! phone ─ GET / ───────────────▶ page: link state, queue depth, the forms
//!       ─ POST /report/{kind} ─▶ fields → `report` arguments → staff::store (fsync) → outbox
//!       ◀─ 保存しました / saved (seq N, queue depth M) — or the error, with the form refilled
//! ```
//!
//! A posted form becomes the argument list of `renkei-agent report {kind} …` and goes through
//! the same clap definitions, [`StaffReport::check`] and [`staff::store`] as the command line,
//! so both accept exactly the same reports. Only the fields a form shows are passed on, each as
//! one `--flag=value` argument, so a post can never smuggle in another flag. The page is
//! server-rendered HTML with a little CSS and no script: it must work on any phone browser.
//! Off unless `form_listen` is set; optionally behind a PIN (`form_pin`).

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Form, Path, State};
use axum::http::StatusCode;
use axum::response::Html;
use axum::routing::get;
use clap::Parser;
use renkei_shared::{Mode, SiteRef};
use tokio::sync::watch;

use crate::link::LinkState;
use crate::outbox::Outbox;
use crate::staff::{self, StaffReport, StoreError};

/// Largest form body accepted: the longest text field is a few KiB.
const MAX_BODY: usize = 32 * 1024;

/// What the form needs from the daemon.
#[derive(Debug, Clone)]
pub struct FormState {
    /// The daemon's outbox (the form writes to it in-process).
    pub outbox: Arc<Outbox>,
    pub site: SiteRef,
    /// The site's name, as staff know it.
    pub name: String,
    pub mode: Mode,
    /// When set, every post must carry it.
    pub pin: Option<String>,
    /// The daemon's link state, shown on the page.
    pub link: watch::Receiver<LinkState>,
}

/// The forms on the page, named as the `report` subcommands they feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Shelter,
    Request,
    Incident,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Shelter, Kind::Request, Kind::Incident];

    fn parse(text: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == text)
    }

    /// The `report` subcommand, also the form's path.
    fn name(self) -> &'static str {
        match self {
            Kind::Shelter => "shelter",
            Kind::Request => "request",
            Kind::Incident => "incident",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Kind::Shelter => "避難所状況 / Shelter status",
            Kind::Request => "物資要請 / Supply request",
            Kind::Incident => "被害報告 / Incident",
        }
    }

    fn fields(self) -> &'static [Field] {
        match self {
            Kind::Shelter => SHELTER,
            Kind::Request => REQUEST,
            Kind::Incident => INCIDENT,
        }
    }
}

/// One input of a form; `name` is the `report` flag it fills.
#[derive(Debug)]
struct Field {
    name: &'static str,
    label: &'static str,
    input: Input,
    required: bool,
}

#[derive(Debug)]
enum Input {
    Number,
    Text,
    TextArea,
    /// (value as the flag takes it, label)
    Select(&'static [(&'static str, &'static str)]),
}

const fn field(name: &'static str, label: &'static str, input: Input) -> Field {
    Field {
        name,
        label,
        input,
        required: false,
    }
}

const fn required(name: &'static str, label: &'static str, input: Input) -> Field {
    Field {
        name,
        label,
        input,
        required: true,
    }
}

const SHELTER: &[Field] = &[
    required("evacuees", "避難者数 / Evacuees", Input::Number),
    field("capacity", "想定収容人数 / Capacity", Input::Number),
    field(
        "state",
        "開設状況 / State",
        Input::Select(&[
            ("", "自動(避難者がいれば開設) / auto (open with evacuees)"),
            ("open", "開設 / open"),
            ("preparing", "開設準備中 / preparing"),
            ("not-open", "未開設 / not open"),
            ("closed", "閉鎖 / closed"),
            ("unknown", "不明 / unknown"),
        ]),
    ),
    field("households", "世帯数 / Households", Input::Number),
    field(
        "elderly",
        "要介護高齢者 / Elderly needing care",
        Input::Number,
    ),
    field("disabled", "障害者 / Disabled", Input::Number),
    field("infants", "乳幼児 / Infants", Input::Number),
    field("pregnant", "妊産婦 / Pregnant", Input::Number),
    field("medical", "医療的ケア / Medical care", Input::Number),
    field(
        "foreign-language",
        "外国語話者 / Foreign-language speakers",
        Input::Number,
    ),
    field("injured", "負傷者 / Injured", Input::Number),
    field("pets", "ペット / Pets", Input::Number),
];

const ITEMS: &[(&str, &str)] = &[
    ("food", "食料 / food"),
    ("water", "飲料水 (L) / water (litres)"),
    ("blankets", "毛布 / blankets"),
    ("infant_formula", "乳児用粉ミルク / infant formula"),
    ("child_diapers", "乳幼児用おむつ / child diapers"),
    ("adult_diapers", "大人用おむつ / adult diapers"),
    ("portable_toilets", "携帯・簡易トイレ / portable toilets"),
    ("toilet_paper", "トイレットペーパー / toilet paper"),
    ("sanitary_products", "生理用品 / sanitary products"),
    ("medicine", "医薬品 / medicine"),
    ("allergy_safe_food", "アレルギー対応食 / allergy-safe food"),
    ("cardboard_beds", "段ボールベッド / cardboard beds"),
    ("fuel", "燃料 (L) / fuel (litres)"),
    ("other", "その他 / other"),
];

const REQUEST: &[Field] = &[
    required("item", "品目 / Item", Input::Select(ITEMS)),
    required("quantity", "要請数量 / Quantity", Input::Number),
    field("note", "備考 / Note", Input::TextArea),
];

const INCIDENT: &[Field] = &[
    required(
        "category",
        "種別 / Category",
        Input::Select(&[
            ("fire", "火災 / fire"),
            ("building-collapse", "建物倒壊 / building collapse"),
            ("casualties", "人的被害 / casualties"),
            ("road", "道路 / road"),
            ("lifeline", "ライフライン / lifeline"),
            ("flood", "浸水 / flood"),
            ("landslide", "崖崩れ / landslide"),
            ("other", "その他 / other"),
        ]),
    ),
    required(
        "severity",
        "深刻度 / Severity",
        Input::Select(&[
            ("unknown", "不明 / unknown"),
            ("minor", "軽微 / minor"),
            ("moderate", "中程度 / moderate"),
            ("severe", "重大 / severe"),
            ("extreme", "甚大 / extreme"),
        ]),
    ),
    required(
        "description",
        "状況 / What happened, where, what is needed",
        Input::TextArea,
    ),
    field("address", "住所 / Address", Input::Text),
    field(
        "location",
        "位置 (緯度,経度) / Location (lat,lon)",
        Input::Text,
    ),
    field("dead", "死者 / Dead", Input::Number),
    field("missing", "行方不明 / Missing", Input::Number),
    field("injured-serious", "重傷 / Seriously injured", Input::Number),
    field("injured-minor", "軽傷 / Slightly injured", Input::Number),
];

/// The `report` command line, for parsing a posted form with the CLI's own definitions.
#[derive(Debug, Parser)]
#[command(name = "report")]
struct Posted {
    #[command(subcommand)]
    report: StaffReport,
}

/// Parses a posted form as `renkei-agent report {kind} …` would; the error is bilingual.
fn parse(kind: Kind, form: &[(String, String)]) -> Result<StaffReport, String> {
    let mut args = vec!["report".to_owned(), kind.name().to_owned()];
    for f in kind.fields() {
        if let Some(v) = value(form, f.name).map(str::trim)
            && !v.is_empty()
        {
            args.push(format!("--{}={v}", f.name));
        }
    }
    let posted = Posted::try_parse_from(args).map_err(|e| {
        // clap's own words, without its usage hints (there is no command line here).
        let text = e.render().to_string();
        let text = text
            .split("\n\nUsage:")
            .next()
            .unwrap_or_default()
            .split("\n\nFor more information")
            .next()
            .unwrap_or_default()
            .trim()
            .trim_start_matches("error:")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        format!("入力が正しくありません / invalid input: {text}")
    })?;
    posted
        .report
        .check()
        .map_err(|e| format!("入力が正しくありません / invalid input: {e}"))?;
    Ok(posted.report)
}

fn value<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The routes of the form, separate from serving so tests can call them without a socket.
pub fn router(state: FormState) -> Router {
    Router::new()
        .route("/", get(page))
        // GET too: a phone reloading or bookmarking the page after a post gets the forms back.
        .route("/report/{kind}", get(page).post(submit))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(Arc::new(state))
}

/// Serves the form on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: FormState,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await
}

/// What the page says about the link and the outbox.
#[derive(Debug, Default)]
struct Overview {
    depth: Option<u64>,
    alarm: Option<String>,
}

async fn overview(state: &FormState) -> Overview {
    let outbox = state.outbox.clone();
    match tokio::task::spawn_blocking(move || outbox.lock().and_then(|mut l| l.stats())).await {
        Ok(Ok(stats)) => {
            let alarming = stats.alarming();
            Overview {
                depth: Some(stats.depth),
                alarm: stats.alarm.or_else(|| {
                    alarming.then(|| "ディスクの空きが不足 / the disk is nearly full".to_owned())
                }),
            }
        }
        _ => Overview::default(),
    }
}

async fn page(State(state): State<Arc<FormState>>) -> Html<String> {
    let overview = overview(&state).await;
    Html(render(&state, &overview, None, None))
}

async fn submit(
    State(state): State<Arc<FormState>>,
    Path(kind): Path<String>,
    Form(form): Form<Vec<(String, String)>>,
) -> (StatusCode, Html<String>) {
    let Some(kind) = Kind::parse(&kind) else {
        let overview = overview(&state).await;
        let notice = Err("そのフォームはありません / no such form".to_owned());
        return (
            StatusCode::NOT_FOUND,
            Html(render(&state, &overview, Some(&notice), None)),
        );
    };
    let outcome = store(&state, kind, &form).await;
    let overview = overview(&state).await;
    let (code, notice, refill) = match outcome {
        Ok(saved) => (StatusCode::OK, Ok(saved), None),
        Err((code, message)) => (code, Err(message), Some((kind, form.as_slice()))),
    };
    (code, Html(render(&state, &overview, Some(&notice), refill)))
}

/// Checks the PIN and the report, and stores it; the error comes with its HTTP status.
async fn store(
    state: &Arc<FormState>,
    kind: Kind,
    form: &[(String, String)],
) -> Result<String, (StatusCode, String)> {
    if let Some(pin) = &state.pin
        && !same(value(form, "pin").unwrap_or_default().trim(), pin)
    {
        return Err((
            StatusCode::FORBIDDEN,
            "暗証番号が違います。保存していません / wrong PIN: NOT saved".to_owned(),
        ));
    }
    let report = parse(kind, form).map_err(|e| (StatusCode::UNPROCESSABLE_ENTITY, e))?;
    let st = state.clone();
    // fsync blocks: off the runtime's thread, which also runs the MQTT link.
    let stored = tokio::task::spawn_blocking(move || {
        staff::store(&st.outbox, &st.site, st.mode, &report, false)
    })
    .await;
    match stored {
        Ok(Ok(saved)) => Ok(saved.to_string()),
        Ok(Err(StoreError::Invalid(e))) => Err((
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("入力が正しくありません / invalid input: {e}"),
        )),
        Ok(Err(e)) => Err((
            StatusCode::SERVICE_UNAVAILABLE,
            format!("保存できませんでした / NOT saved: {e}"),
        )),
        Err(e) => Err((
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("保存できませんでした / NOT saved: {e}"),
        )),
    }
}

/// Compares without stopping at the first difference, so timing does not give the PIN away.
fn same(given: &str, pin: &str) -> bool {
    given.len() == pin.len()
        && given
            .bytes()
            .zip(pin.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:0 auto;max-width:34rem;\
padding:.5rem;line-height:1.4}h1{font-size:1.3rem;margin:.3rem 0}h2{font-size:1.1rem;\
margin:0 0 .5rem}section,.status{border:1px solid #bbb;border-radius:.4rem;padding:.7rem;\
margin:.7rem 0}label{display:block;margin:.45rem 0 .1rem;font-weight:600}input,select,\
textarea{width:100%;box-sizing:border-box;font-size:1.1rem;padding:.45rem}textarea{min-height:\
5rem}button{margin-top:.8rem;width:100%;font-size:1.15rem;padding:.7rem;background:#1d4ed8;\
color:#fff;border:0;border-radius:.4rem}.ok{background:#dcfce7;border:2px solid #15803d;\
padding:.7rem;border-radius:.4rem}.err{background:#fee2e2;border:2px solid #b91c1c;\
padding:.7rem;border-radius:.4rem}.drill{background:#fde047;font-weight:700;padding:.4rem;\
text-align:center}.alarm{color:#b91c1c;font-weight:700}.req{color:#b91c1c}";

fn render(
    state: &FormState,
    overview: &Overview,
    notice: Option<&Result<String, String>>,
    refill: Option<(Kind, &[(String, String)])>,
) -> String {
    let link = match *state.link.borrow() {
        LinkState::Connected => "接続中 / connected",
        LinkState::Connecting => "接続しています / connecting",
        LinkState::Backoff => {
            "オフライン(再試行中、報告は保存されます) / offline (retrying; reports are kept)"
        }
        LinkState::Closing => "停止中 / stopping",
    };
    let mut html = String::with_capacity(16 * 1024);
    html.push_str(&format!(
        "<!doctype html><html lang=\"ja\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{name} — Renkei</title><style>{STYLE}</style></head><body>",
        name = escape(&state.name)
    ));
    match state.mode {
        Mode::Actual => {}
        Mode::Exercise => html.push_str("<div class=\"drill\">訓練 / EXERCISE</div>"),
        Mode::Test => html.push_str("<div class=\"drill\">テスト / TEST</div>"),
    }
    html.push_str(&format!(
        "<h1>{}</h1><div class=\"status\">区 ward {} · {}<br>回線 / link: <b>{link}</b><br>\
         送信待ち / queue depth: <b>{}</b>",
        escape(&state.name),
        state.site.ward,
        escape(state.site.site.as_str()),
        overview
            .depth
            .map_or_else(|| "?".to_owned(), |d| d.to_string()),
    ));
    if let Some(alarm) = &overview.alarm {
        html.push_str(&format!(
            "<br><span class=\"alarm\">警告 / ALARM: {}</span>",
            escape(alarm)
        ));
    }
    html.push_str("</div>");
    match notice {
        Some(Ok(text)) => html.push_str(&format!("<p class=\"ok\">{}</p>", escape(text))),
        Some(Err(text)) => html.push_str(&format!("<p class=\"err\">{}</p>", escape(text))),
        None => {}
    }
    for kind in Kind::ALL {
        let values = refill.filter(|(k, _)| *k == kind).map(|(_, v)| v);
        render_form(&mut html, state, kind, values);
    }
    html.push_str("</body></html>");
    html
}

fn render_form(
    html: &mut String,
    state: &FormState,
    kind: Kind,
    values: Option<&[(String, String)]>,
) {
    html.push_str(&format!(
        "<section id=\"{name}\"><h2>{title}</h2>\
         <form method=\"post\" action=\"/report/{name}#{name}\">",
        name = kind.name(),
        title = kind.title()
    ));
    for f in kind.fields() {
        let id = format!("{}-{}", kind.name(), f.name);
        let given = values.and_then(|v| value(v, f.name)).unwrap_or_default();
        let required = if f.required { " required" } else { "" };
        html.push_str(&format!(
            "<label for=\"{id}\">{}{}</label>",
            f.label,
            if f.required {
                " <span class=\"req\">*</span>"
            } else {
                ""
            }
        ));
        match f.input {
            Input::Number => html.push_str(&format!(
                "<input id=\"{id}\" name=\"{}\" type=\"number\" min=\"0\" inputmode=\"numeric\" \
                 value=\"{}\"{required}>",
                f.name,
                escape(given)
            )),
            Input::Text => html.push_str(&format!(
                "<input id=\"{id}\" name=\"{}\" value=\"{}\"{required}>",
                f.name,
                escape(given)
            )),
            Input::TextArea => html.push_str(&format!(
                "<textarea id=\"{id}\" name=\"{}\"{required}>{}</textarea>",
                f.name,
                escape(given)
            )),
            Input::Select(options) => {
                html.push_str(&format!(
                    "<select id=\"{id}\" name=\"{}\"{required}>",
                    f.name
                ));
                for (v, label) in options {
                    let selected = if *v == given { " selected" } else { "" };
                    html.push_str(&format!("<option value=\"{v}\"{selected}>{label}</option>"));
                }
                html.push_str("</select>");
            }
        }
    }
    if state.pin.is_some() {
        html.push_str(&format!(
            "<label for=\"{k}-pin\">暗証番号 / PIN <span class=\"req\">*</span></label>\
             <input id=\"{k}-pin\" name=\"pin\" type=\"password\" inputmode=\"numeric\" \
             autocomplete=\"off\" required>",
            k = kind.name()
        ));
    }
    html.push_str("<button type=\"submit\">保存 / Save</button></form></section>");
}

#[cfg(test)]
mod tests {
    use renkei_shared::Item;

    use super::*;

    fn form(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_form_is_parsed_and_checked_like_the_command_line() {
        let report = parse(
            Kind::Shelter,
            &form(&[
                ("evacuees", "120"),
                ("capacity", "300"),
                ("state", "open"),
                ("elderly", " 4 "),
                ("pets", ""),
            ]),
        )
        .unwrap();
        let StaffReport::Shelter(s) = report else {
            panic!("a shelter report")
        };
        assert_eq!(
            (s.evacuees, s.capacity, s.elderly, s.pets),
            (120, Some(300), Some(4), None)
        );

        let err = parse(Kind::Shelter, &form(&[("evacuees", "many")])).unwrap_err();
        assert!(
            err.starts_with("入力が正しくありません / invalid input:"),
            "{err}"
        );
        assert!(err.contains("evacuees") && err.contains("many"), "{err}");
        assert!(!err.contains("Usage"), "{err}");
        let err = parse(
            Kind::Shelter,
            &form(&[("evacuees", "10"), ("households", "20")]),
        )
        .unwrap_err();
        assert!(
            err.contains("--households") && err.contains("evacuees"),
            "{err}"
        );
        let err = parse(Kind::Shelter, &form(&[])).unwrap_err();
        assert!(err.contains("--evacuees"), "{err}");
        // Fields a form does not show are never passed on.
        let report = parse(
            Kind::Request,
            &form(&[("item", "water"), ("quantity", "5"), ("help", "1")]),
        )
        .unwrap();
        assert!(matches!(report, StaffReport::Request(_)));
        // A value that looks like a flag stays a value.
        let err = parse(
            Kind::Request,
            &form(&[("item", "water"), ("quantity", "-5")]),
        )
        .unwrap_err();
        assert!(err.contains("quantity"), "{err}");
    }

    #[test]
    fn every_select_value_is_one_the_command_line_takes() {
        for kind in Kind::ALL {
            for f in kind.fields() {
                let Input::Select(options) = f.input else {
                    continue;
                };
                for (v, _) in options.iter().filter(|(v, _)| !v.is_empty()) {
                    let mut posted = form(&[
                        ("evacuees", "0"),
                        ("item", "food"),
                        ("quantity", "1"),
                        ("category", "fire"),
                        ("severity", "minor"),
                        ("description", "x"),
                    ]);
                    posted.retain(|(k, _)| k != f.name);
                    posted.push((f.name.to_owned(), v.to_string()));
                    parse(kind, &posted).unwrap_or_else(|e| panic!("{} {v}: {e}", f.name));
                }
            }
        }
        assert_eq!(ITEMS.len(), Item::ALL.len());
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            escape("<b a=\"1\">&'"),
            "&lt;b a=&quot;1&quot;&gt;&amp;&#39;"
        );
        assert!(same("1234", "1234"));
        assert!(!same("1235", "1234"));
        assert!(!same("123", "1234"));
    }
}
