//! The local web form: shelter staff report from any phone on the shelter's network, with no
//! app to install and no link to HQ needed.
//!
//! ```text
//! phone ─ GET / ───────────────▶ page: link state, queue depth, the forms (each with a token)
//!       ─ POST /report/{kind} ─▶ Host, Origin, token, PIN → `report` arguments
//!                                 → staff::store (fsync) → outbox
//!       ◀─ 保存しました / saved (seq N, queue depth M) — or the error, with the form refilled
//! ```
//!
//! A posted form becomes the argument list of `renkei-agent report {kind} …` and goes through
//! the same clap definitions, [`StaffReport::check`] and [`staff::store`] as the command line,
//! so both accept exactly the same reports. Only the fields a form shows are passed on, each as
//! one `--flag=value` argument, so a post can never smuggle in another flag. The page is
//! server-rendered HTML with a little CSS and no script: it must work on any phone browser.
//! Off unless `form_listen` is set; optionally behind a PIN (`form_pin`).
//!
//! Defences, for a form that any device on the shelter's network (and any web page one of
//! them opens) can reach:
//! - every request must name, in `Host`, an address the connection arrived on, `localhost`,
//!   or a name in `form_hosts`: a hostile page whose own name resolves to this box (DNS
//!   rebinding) is refused (421) and so cannot read a page or a token;
//! - every POST must come from the form's own origin (`Origin`, or without it `Referer`,
//!   equal to `Host`) and carry the token of a page this process rendered, unaltered and
//!   younger than [`FormLimits::token_ttl`]: a cross-site post is refused (403);
//! - wrong PINs are counted per device, and [`FormLimits::pin_attempts`] of them within
//!   [`FormLimits::pin_window`] lock its PIN entry for [`FormLimits::pin_lockout`] (429);
//! - the server holds at most [`FormLimits::max_connections`] connections (16 per device),
//!   closing the longest-idle one to make room; a request head must arrive within
//!   [`FormLimits::header_timeout`], its body within that again, and a connection with no
//!   request in progress for [`FormLimits::idle_timeout`] is closed: slow clients cannot
//!   hold it;
//! - pages may not be framed or cached, and forms post only to the form itself (CSP).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Form, FromRequest, Path, Request, State};
use axum::http::uri::Authority;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use clap::Parser;
use hyper_util::rt::{TokioIo, TokioTimer};
use renkei_shared::{Mode, SiteRef};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use subtle::ConstantTimeEq;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tower::ServiceExt;
use tracing::{debug, info, warn};

use crate::link::LinkState;
use crate::outbox::Outbox;
use crate::staff::{self, StaffReport, StoreError};

/// Largest form body accepted: the longest text field is a few KiB.
const MAX_BODY: usize = 32 * 1024;
/// Connections one device may hold: a browser opens up to six per host; more is not a phone.
const MAX_CONNECTIONS_PER_CLIENT: usize = 16;
/// Devices whose wrong PINs are remembered at once; beyond it, PIN entry pauses for new
/// devices until a record expires (the table cannot grow, and many addresses gain no guesses).
const MAX_PIN_CLIENTS: usize = 1024;
/// How long a stopping server waits for its connections to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

pub use crate::config::FormLimits;

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
    /// Host names the form answers to besides the addresses it is reached on and
    /// `localhost` (lower case).
    pub hosts: Vec<String>,
    pub limits: FormLimits,
}

/// The form's state with what its defences keep.
#[derive(Debug)]
struct Shared {
    state: FormState,
    tokens: Tokens,
    pins: Mutex<PinGate>,
}

/// The two ends of a request's connection, put into every request by [`serve`].
#[derive(Debug, Clone, Copy)]
struct Conn {
    /// The box's address the client connected to.
    local: SocketAddr,
    peer: SocketAddr,
}

/// Who a per-device limit counts: an IPv4 address, or an IPv6 /64, since one device may pick
/// any address of its /64 at will.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Client {
    V4(Ipv4Addr),
    V6(u64),
}

impl Client {
    fn of(ip: IpAddr) -> Client {
        match ip {
            IpAddr::V4(v4) => Client::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Client::V4(v4),
                None => Client::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding it leaves counters, still usable: never a second panic.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// CSRF tokens.

/// Tokens that prove a post came from a page this process rendered: each page gets a fresh
/// one, `issued ‖ nonce ‖ HMAC-SHA256(issued ‖ nonce)` under a key made at start, in
/// base64url. Nothing is stored per token: one from before a restart, from another agent or
/// altered fails the MAC (checked in constant time by ring), and one older than the TTL is
/// stale. Times are from a monotonic clock, which a box without a real-time clock does not
/// jump.
struct Tokens {
    key: hmac::Key,
    rng: SystemRandom,
    epoch: Instant,
    ttl: Duration,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// Milliseconds since the epoch, then the nonce.
const TOKEN_SIGNED: usize = 8 + 16;
const TOKEN_LEN: usize = TOKEN_SIGNED + 32;

/// Why a post's token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenError {
    Missing,
    /// Not one of this process's tokens: another agent's, from before a restart, or altered.
    Foreign,
    Stale,
}

impl Tokens {
    fn new(ttl: Duration) -> std::io::Result<Tokens> {
        let rng = SystemRandom::new();
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rng)
            .map_err(|_| std::io::Error::other("no randomness for the web form's tokens"))?;
        Ok(Tokens {
            key,
            rng,
            epoch: Instant::now(),
            ttl,
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn issue(&self) -> String {
        let mut token = Vec::with_capacity(TOKEN_LEN);
        token.extend_from_slice(&self.now_ms().to_be_bytes());
        let mut nonce = [0u8; 16];
        // Without the OS's randomness the nonce stays zero: the token is still unforgeable
        // (the MAC), only no longer unique per page.
        let _ = self.rng.fill(&mut nonce);
        token.extend_from_slice(&nonce);
        let tag = hmac::sign(&self.key, &token);
        token.extend_from_slice(tag.as_ref());
        URL_SAFE_NO_PAD.encode(token)
    }

    fn check(&self, token: Option<&str>) -> Result<(), TokenError> {
        let token = token.map(str::trim).filter(|t| !t.is_empty());
        let token = token.ok_or(TokenError::Missing)?;
        let bytes = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| TokenError::Foreign)?;
        if bytes.len() != TOKEN_LEN {
            return Err(TokenError::Foreign);
        }
        let (signed, tag) = bytes.split_at(TOKEN_SIGNED);
        hmac::verify(&self.key, signed, tag).map_err(|_| TokenError::Foreign)?;
        let mut issued = [0u8; 8];
        issued.copy_from_slice(&signed[..8]);
        let age = self.now_ms().saturating_sub(u64::from_be_bytes(issued));
        if u128::from(age) > self.ttl.as_millis() {
            return Err(TokenError::Stale);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// PIN attempts.

/// Wrong PINs per device, bounded: see [`MAX_PIN_CLIENTS`].
#[derive(Debug)]
struct PinGate {
    attempts: u32,
    window: Duration,
    lockout: Duration,
    clients: HashMap<Client, Attempts>,
}

#[derive(Debug, Clone, Copy)]
struct Attempts {
    window_start: Instant,
    wrong: u32,
    locked_until: Option<Instant>,
}

impl Attempts {
    /// When this record no longer matters.
    fn expires(&self, window: Duration) -> Instant {
        let window_end = self.window_start + window;
        self.locked_until.map_or(window_end, |l| l.max(window_end))
    }
}

/// Why a PIN was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PinRefusal {
    Wrong,
    /// Entry is locked for this much longer.
    Locked(Duration),
}

impl PinGate {
    fn new(limits: &FormLimits) -> PinGate {
        PinGate {
            attempts: limits.pin_attempts.max(1),
            window: limits.pin_window,
            lockout: limits.pin_lockout,
            clients: HashMap::new(),
        }
    }

    /// One PIN entry by `who`, `correct` or not, at `now`. A locked device is refused before
    /// its PIN is looked at, so the right PIN does not open a lock early.
    fn attempt(&mut self, who: Client, correct: bool, now: Instant) -> Result<(), PinRefusal> {
        let window = self.window;
        if let Some(a) = self.clients.get(&who)
            && let Some(until) = a.locked_until
            && until > now
        {
            return Err(PinRefusal::Locked(until - now));
        }
        if !self.clients.contains_key(&who) && self.clients.len() >= MAX_PIN_CLIENTS {
            self.clients.retain(|_, a| a.expires(window) > now);
            if self.clients.len() >= MAX_PIN_CLIENTS {
                let next_free = self.clients.values().map(|a| a.expires(window)).min();
                return Err(PinRefusal::Locked(
                    next_free.map_or(self.lockout, |t| t.saturating_duration_since(now)),
                ));
            }
        }
        if correct {
            self.clients.remove(&who);
            return Ok(());
        }
        let a = self.clients.entry(who).or_insert(Attempts {
            window_start: now,
            wrong: 0,
            locked_until: None,
        });
        if now.saturating_duration_since(a.window_start) >= window || a.locked_until.is_some() {
            // A new window; a lock that has run out starts one too.
            *a = Attempts {
                window_start: now,
                wrong: 0,
                locked_until: None,
            };
        }
        a.wrong += 1;
        if a.wrong >= self.attempts {
            a.locked_until = Some(now + self.lockout);
            return Err(PinRefusal::Locked(self.lockout));
        }
        Err(PinRefusal::Wrong)
    }
}

// ---------------------------------------------------------------------------------------------
// The forms.

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

// ---------------------------------------------------------------------------------------------
// Routes and the checks every request passes.

/// The routes of the form, with the Host, Origin and header checks of every request.
fn router(state: FormState) -> std::io::Result<Router> {
    let shared = Arc::new(Shared {
        tokens: Tokens::new(state.limits.token_ttl)?,
        pins: Mutex::new(PinGate::new(&state.limits)),
        state,
    });
    Ok(Router::new()
        .route("/", get(page))
        // GET too: a phone reloading or bookmarking the page after a post gets the forms back.
        .route("/report/{kind}", get(page).post(submit))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(shared.clone(), guard))
        .with_state(shared))
}

/// Refuses a request to a host the form does not serve and a post from another origin, and
/// sets the headers every page carries.
async fn guard(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let conn = request.extensions().get::<Conn>().copied();
    let peer = conn.map(|c| c.peer);
    let mut response = match served_host(&request, conn, &shared.state.hosts) {
        Err(host) => {
            info!(
                ?peer,
                host, "web form: a request for a host it does not serve refused"
            );
            refusal(
                StatusCode::MISDIRECTED_REQUEST,
                &format!(
                    "この名前ではフォームを開けません。この機器のIPアドレスで開いてください / \
                     this form does not answer to host {host:?}: open it by this box's \
                     address, or add the name to form_hosts in the agent's settings"
                ),
            )
        }
        Ok(host) if !request.method().is_safe() => match same_origin(request.headers(), &host) {
            Err(why) => {
                warn!(?peer, why, "web form: a post from another origin refused");
                refusal(
                    StatusCode::FORBIDDEN,
                    &format!(
                        "別のサイトからの送信は受け付けません。保存していません / refused: the \
                         post did not come from this form's own origin ({why}); NOT saved"
                    ),
                )
            }
            Ok(()) => next.run(request).await,
        },
        Ok(_) => next.run(request).await,
    };
    // Written here rather than with tower-http's set-header layer: four constant headers, in
    // the one middleware every response already passes.
    let headers = response.headers_mut();
    for (name, value) in [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
        // For browsers older than frame-ancestors: no other site may frame the form and
        // trick staff into pressing its buttons.
        (header::X_FRAME_OPTIONS, "DENY"),
        // Pages hold reports and tokens: not for a shared phone's cache.
        (header::CACHE_CONTROL, "no-store"),
        // Posts carry a Referer to the form itself (the check's fallback), and nothing leaks
        // to other sites.
        (header::REFERRER_POLICY, "same-origin"),
    ] {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

/// The request's host, if the form serves it: an address of this box that the connection
/// arrived on (with its port), `localhost` (with the port), or a configured name (any port:
/// it may sit behind a proxy or a port forward). Anything else is refused, so that a page
/// from a name an attacker controls, resolving to this box (DNS rebinding), cannot use it.
fn served_host(
    request: &Request,
    conn: Option<Conn>,
    hosts: &[String],
) -> Result<Authority, String> {
    let text = request
        .headers()
        .get(header::HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        .unwrap_or_default();
    let host: Authority = text.parse().map_err(|_| text.clone())?;
    // An absolute-form request line names its host too: it must be the same.
    if request.uri().authority().is_some_and(|a| a != &host) || text.contains('@') {
        return Err(text);
    }
    let name = host
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    let same_port = |local: SocketAddr| host.port_u16().unwrap_or(80) == local.port();
    let served = if hosts.contains(&name) {
        true
    } else if name == "localhost" {
        conn.is_some_and(|c| same_port(c.local))
    } else if let Ok(ip) = name.parse::<IpAddr>() {
        conn.is_some_and(|c| ip.to_canonical() == c.local.ip().to_canonical() && same_port(c.local))
    } else {
        false
    };
    if served { Ok(host) } else { Err(text) }
}

/// Whether a post comes from the form's own origin: `Origin`, or without it `Referer`, must
/// be http(s)://`host`. A post with neither is refused: every browser that renders this form
/// sends one of them (the page asks for a same-origin Referer).
fn same_origin(headers: &HeaderMap, host: &Authority) -> Result<(), String> {
    let (name, value) = match (headers.get(header::ORIGIN), headers.get(header::REFERER)) {
        (Some(origin), _) => ("Origin", origin),
        (None, Some(referer)) => ("Referer", referer),
        (None, None) => return Err("no Origin or Referer header".to_owned()),
    };
    let text = String::from_utf8_lossy(value.as_bytes());
    let foreign = || format!("{name} {text:?}");
    let uri: Uri = text.parse().map_err(|_| foreign())?;
    let default_port = match uri.scheme_str() {
        Some("http") => 80,
        Some("https") => 443,
        _ => return Err(foreign()),
    };
    let from = uri.authority().ok_or_else(foreign)?;
    let same = !from.as_str().contains('@')
        && from.host().eq_ignore_ascii_case(host.host())
        && from.port_u16().unwrap_or(default_port) == host.port_u16().unwrap_or(default_port);
    if same { Ok(()) } else { Err(foreign()) }
}

/// A short page for a refused request.
fn refusal(code: StatusCode, message: &str) -> Response {
    let page = format!(
        "<!doctype html><html lang=\"ja\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>Renkei</title><style>{STYLE}</style></head><body><p class=\"err\">{}</p>\
         </body></html>",
        escape(message)
    );
    (code, Html(page)).into_response()
}

// ---------------------------------------------------------------------------------------------
// The server.

/// Serves the form on `listener` until `shutdown` turns true.
///
/// By hand on hyper's connection builder rather than `axum::serve`, which has no header
/// timeout, no idle timeout and no connection cap; see [`FormLimits`] for the limits.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: FormState,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let limits = state.limits.clone();
    let app = router(state)?;
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let table = Arc::new(Mutex::new(Connections::new(limits.max_connections)));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, mostly: wait for some to close rather than spin.
                    warn!(error = %e, "web form: cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            Some(_) = tasks.join_next() => continue,
            () = stopped(&mut shutdown) => break,
        };
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        let Some(admitted) = lock(&table).admit(Client::of(peer.ip())) else {
            debug!(%peer, "web form: every connection is busy; refused");
            continue;
        };
        let _ = stream.set_nodelay(true);
        tasks.spawn(connection(
            http.clone(),
            stream,
            Conn { local, peer },
            app.clone(),
            admitted,
            table.clone(),
            limits.idle_timeout,
            shutdown.clone(),
        ));
    }
    drop(listener);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}

/// Until `shutdown` turns true (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // Not `wait_for` itself in a select: its guard must not live across an await.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// One connection, until it ends, is evicted, idles too long, or the server stops.
#[allow(clippy::too_many_arguments)]
async fn connection(
    http: hyper::server::conn::http1::Builder,
    stream: tokio::net::TcpStream,
    conn: Conn,
    app: Router,
    admitted: Admitted,
    table: Arc<Mutex<Connections>>,
    idle_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let Admitted {
        id,
        activity,
        mut evicted,
    } = admitted;
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(conn);
            let in_request = Activity::begin(&activity);
            let app = app.clone();
            async move {
                let response = app.oneshot(request).await;
                drop(in_request);
                response
            }
        })
    };
    let serving = http.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(serving);
    let mut stopping = false;
    loop {
        let check_at = activity.idle_deadline(idle_timeout);
        tokio::select! {
            result = serving.as_mut() => {
                if let Err(e) = result {
                    debug!(peer = %conn.peer, error = %e, "web form: connection ended");
                }
                break;
            }
            _ = &mut evicted => {
                debug!(peer = %conn.peer, "web form: connection closed to make room");
                break;
            }
            () = tokio::time::sleep_until(check_at) => {
                if activity.idle_for().is_some_and(|idle| idle >= idle_timeout) {
                    debug!(peer = %conn.peer, "web form: idle connection closed");
                    break;
                }
            }
            () = stopped(&mut shutdown), if !stopping => {
                stopping = true;
                serving.as_mut().graceful_shutdown();
            }
        }
    }
    lock(&table).remove(id);
}

/// Whether a connection has a request in progress, and since when it has not.
#[derive(Debug)]
struct Activity {
    epoch: Instant,
    requests: AtomicUsize,
    /// Milliseconds from `epoch` at which the last request ended (or the connection opened).
    idle_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            epoch: Instant::now(),
            requests: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
        })
    }

    fn begin(activity: &Arc<Activity>) -> InRequest {
        activity.requests.fetch_add(1, Ordering::SeqCst);
        InRequest(activity.clone())
    }

    fn idle_since(&self) -> Instant {
        self.epoch + Duration::from_millis(self.idle_since_ms.load(Ordering::SeqCst))
    }

    /// How long the connection has been without a request; `None` during one.
    fn idle_for(&self) -> Option<Duration> {
        (self.requests.load(Ordering::SeqCst) == 0).then(|| self.idle_since().elapsed())
    }

    /// When the connection will have idled for `timeout`, if nothing happens before.
    fn idle_deadline(&self, timeout: Duration) -> Instant {
        match self.idle_for() {
            Some(_) => self.idle_since() + timeout,
            None => Instant::now() + timeout,
        }
    }
}

/// A request in progress on a connection; dropped when its response is ready.
struct InRequest(Arc<Activity>);

impl Drop for InRequest {
    fn drop(&mut self) {
        let a = &self.0;
        let ms = u64::try_from(a.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        // The time first, then the count: whoever sees no request sees when the last ended.
        a.idle_since_ms.store(ms, Ordering::SeqCst);
        a.requests.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A connection let in: its id in the table, its activity, and what tells it to close.
struct Admitted {
    id: u64,
    activity: Arc<Activity>,
    evicted: oneshot::Receiver<()>,
}

/// The open connections, bounded: a new one beyond a device's share or the cap evicts the
/// longest-idle connection (of that device, else of anyone); one with a request in progress
/// is never evicted, and if every connection has one, the new connection is refused.
/// Slow clients hold no request (hyper calls the service only once a head is complete), so
/// however many they open they only ever push each other out.
#[derive(Debug)]
struct Connections {
    max: usize,
    per_client: usize,
    next_id: u64,
    open: HashMap<u64, Open>,
}

#[derive(Debug)]
struct Open {
    client: Client,
    activity: Arc<Activity>,
    /// Dropping it (on eviction) closes the connection.
    _evict: oneshot::Sender<()>,
}

impl Connections {
    fn new(max: usize) -> Connections {
        let max = max.max(1);
        Connections {
            max,
            per_client: MAX_CONNECTIONS_PER_CLIENT.min(max),
            next_id: 0,
            open: HashMap::new(),
        }
    }

    fn admit(&mut self, who: Client) -> Option<Admitted> {
        let own = self.open.values().filter(|o| o.client == who).count();
        let only_own = if own >= self.per_client {
            Some(true)
        } else if self.open.len() >= self.max {
            Some(false)
        } else {
            None
        };
        if let Some(only_own) = only_own {
            let victim = self
                .open
                .iter()
                .filter(|(_, o)| !only_own || o.client == who)
                .filter_map(|(id, o)| o.activity.idle_for().map(|idle| (*id, idle)))
                .max_by_key(|(_, idle)| *idle)
                .map(|(id, _)| id)?;
            self.open.remove(&victim);
        }
        let id = self.next_id;
        self.next_id += 1;
        let activity = Activity::new();
        let (evict, evicted) = oneshot::channel();
        self.open.insert(
            id,
            Open {
                client: who,
                activity: activity.clone(),
                _evict: evict,
            },
        );
        Some(Admitted {
            id,
            activity,
            evicted,
        })
    }

    fn remove(&mut self, id: u64) {
        self.open.remove(&id);
    }
}

// ---------------------------------------------------------------------------------------------
// Pages and posts.

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

async fn page(State(shared): State<Arc<Shared>>) -> Html<String> {
    let overview = overview(&shared.state).await;
    Html(render(&shared, &overview, None, None))
}

/// A refused post: its status, its message, and how long to wait if it says.
#[derive(Debug)]
struct Refused {
    code: StatusCode,
    message: String,
    retry_after: Option<Duration>,
}

impl Refused {
    fn new(code: StatusCode, message: impl Into<String>) -> Refused {
        Refused {
            code,
            message: message.into(),
            retry_after: None,
        }
    }
}

async fn submit(
    State(shared): State<Arc<Shared>>,
    Path(kind): Path<String>,
    request: Request,
) -> Response {
    let who = request
        .extensions()
        .get::<Conn>()
        .map(|c| Client::of(c.peer.ip()));
    let Some(kind) = Kind::parse(&kind) else {
        let overview = overview(&shared.state).await;
        let notice = Err("そのフォームはありません / no such form".to_owned());
        return (
            StatusCode::NOT_FOUND,
            Html(render(&shared, &overview, Some(&notice), None)),
        )
            .into_response();
    };
    // The head came within the header timeout; the body gets as long again, so that a post
    // trickled in a byte at a time cannot hold a request open.
    let read = Form::<Vec<(String, String)>>::from_request(request, &());
    let form = match tokio::time::timeout(shared.state.limits.header_timeout, read).await {
        Ok(Ok(Form(form))) => form,
        Ok(Err(rejection)) => return rejection.into_response(),
        Err(_) => {
            let mut response = refusal(
                StatusCode::REQUEST_TIMEOUT,
                "送信が途中で止まりました。保存していません / the form did not arrive in time: \
                 NOT saved",
            );
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return response;
        }
    };
    let outcome = store(&shared, kind, &form, who).await;
    let overview = overview(&shared.state).await;
    let (code, notice, refill, retry_after) = match outcome {
        Ok(saved) => (StatusCode::OK, Ok(saved), None, None),
        Err(r) => (
            r.code,
            Err(r.message),
            Some((kind, form.as_slice())),
            r.retry_after,
        ),
    };
    let mut response = (
        code,
        Html(render(&shared, &overview, Some(&notice), refill)),
    )
        .into_response();
    if let Some(wait) = retry_after
        && let Ok(value) = HeaderValue::from_str(&wait.as_secs().max(1).to_string())
    {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

/// Checks the token, the PIN and the report, and stores it.
async fn store(
    shared: &Arc<Shared>,
    kind: Kind,
    form: &[(String, String)],
    who: Option<Client>,
) -> Result<String, Refused> {
    if let Err(e) = shared.tokens.check(value(form, "csrf")) {
        info!(?who, error = ?e, "web form: a post with a bad token refused");
        return Err(Refused::new(
            StatusCode::FORBIDDEN,
            "このページの有効期限が切れたか、このフォームからの送信ではありません。内容を確かめて、\
             もう一度「保存」を押してください。保存していません / this page has expired or the \
             post did not come from it: check the form and press Save again. NOT saved",
        ));
    }
    if let Some(pin) = &shared.state.pin {
        let given = value(form, "pin").unwrap_or_default().trim();
        let correct: bool = given.as_bytes().ct_eq(pin.as_bytes()).into();
        // Without a connection (never, when served) all such posts count as one device.
        let who = who.unwrap_or(Client::V4(Ipv4Addr::UNSPECIFIED));
        let attempt = lock(&shared.pins).attempt(who, correct, Instant::now());
        match attempt {
            Ok(()) => {}
            Err(PinRefusal::Wrong) => {
                return Err(Refused::new(
                    StatusCode::FORBIDDEN,
                    "暗証番号が違います。保存していません / wrong PIN: NOT saved",
                ));
            }
            Err(PinRefusal::Locked(wait)) => {
                warn!(?who, ?wait, "web form: PIN entry locked after wrong PINs");
                let (ja, en) = wait_text(wait);
                return Err(Refused {
                    code: StatusCode::TOO_MANY_REQUESTS,
                    message: format!(
                        "暗証番号の誤りが続いたため、暗証番号の入力を一時停止しています。\
                         あと{ja}ほどでもう一度お試しください。保存していません / too many \
                         wrong PINs: PIN entry is paused for about {en}. NOT saved"
                    ),
                    retry_after: Some(wait),
                });
            }
        }
    }
    let report =
        parse(kind, form).map_err(|e| Refused::new(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    let st = shared.clone();
    // fsync blocks: off the runtime's thread, which also runs the MQTT link.
    let stored = tokio::task::spawn_blocking(move || {
        staff::store(
            &st.state.outbox,
            &st.state.site,
            st.state.mode,
            &report,
            false,
        )
    })
    .await;
    match stored {
        Ok(Ok(saved)) => Ok(saved.to_string()),
        Ok(Err(StoreError::Invalid(e))) => Err(Refused::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("入力が正しくありません / invalid input: {e}"),
        )),
        Ok(Err(e)) => Err(Refused::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("保存できませんでした / NOT saved: {e}"),
        )),
        Err(e) => Err(Refused::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("保存できませんでした / NOT saved: {e}"),
        )),
    }
}

/// A wait as staff read it: (Japanese, English), rounded up to a second or a minute.
fn wait_text(wait: Duration) -> (String, String) {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    if secs < 60 {
        (format!("{secs}秒"), format!("{secs} s"))
    } else {
        let mins = secs.div_ceil(60);
        (format!("{mins}分"), format!("{mins} min"))
    }
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

/// The page, with a fresh token in each of its forms.
fn render(
    shared: &Shared,
    overview: &Overview,
    notice: Option<&Result<String, String>>,
    refill: Option<(Kind, &[(String, String)])>,
) -> String {
    let state = &shared.state;
    let token = shared.tokens.issue();
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
        render_form(&mut html, state, kind, values, &token);
    }
    html.push_str("</body></html>");
    html
}

fn render_form(
    html: &mut String,
    state: &FormState,
    kind: Kind,
    values: Option<&[(String, String)]>,
    token: &str,
) {
    html.push_str(&format!(
        "<section id=\"{name}\"><h2>{title}</h2>\
         <form method=\"post\" action=\"/report/{name}#{name}\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{token}\">",
        name = kind.name(),
        title = kind.title(),
        token = escape(token),
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

    fn limits() -> FormLimits {
        FormLimits {
            pin_attempts: 3,
            pin_window: Duration::from_secs(60),
            pin_lockout: Duration::from_secs(300),
            ..FormLimits::default()
        }
    }

    #[test]
    fn wrong_pins_lock_a_device_and_only_that_device() {
        let mut gate = PinGate::new(&limits());
        let t0 = Instant::now();
        let a = Client::of("192.168.1.20".parse().unwrap());
        let b = Client::of("192.168.1.21".parse().unwrap());
        assert_eq!(gate.attempt(a, false, t0), Err(PinRefusal::Wrong));
        assert_eq!(gate.attempt(a, false, t0), Err(PinRefusal::Wrong));
        let lockout = Duration::from_secs(300);
        assert_eq!(gate.attempt(a, false, t0), Err(PinRefusal::Locked(lockout)));
        // The right PIN during the lockout is refused; another device is not affected.
        let later = t0 + Duration::from_secs(100);
        assert_eq!(
            gate.attempt(a, true, later),
            Err(PinRefusal::Locked(Duration::from_secs(200)))
        );
        assert_eq!(gate.attempt(b, true, later), Ok(()));
        // After it, the right PIN works and clears the count.
        let after = t0 + lockout;
        assert_eq!(gate.attempt(a, true, after), Ok(()));
        assert!(gate.clients.is_empty());
        // Wrong PINs further apart than the window do not add up.
        for i in 0..10 {
            let t = after + Duration::from_secs(61) * i;
            assert_eq!(gate.attempt(a, false, t), Err(PinRefusal::Wrong), "{i}");
        }
    }

    #[test]
    fn the_pin_table_is_bounded_and_ipv6_counts_per_64() {
        let mut gate = PinGate::new(&limits());
        let t0 = Instant::now();
        // Every address of one /64 is one device.
        for i in 1..=3u16 {
            let ip: IpAddr = format!("2001:db8:1:2::{i:x}").parse().unwrap();
            let _ = gate.attempt(Client::of(ip), false, t0);
        }
        let other: IpAddr = "2001:db8:1:2:ffff::1".parse().unwrap();
        assert!(matches!(
            gate.attempt(Client::of(other), true, t0),
            Err(PinRefusal::Locked(_))
        ));
        assert_eq!(
            Client::of("::ffff:10.0.0.1".parse().unwrap()),
            Client::of("10.0.0.1".parse().unwrap())
        );
        // A table full of failing devices: a new device waits, whatever its PIN, until the
        // first record expires; memory never holds more than MAX_PIN_CLIENTS.
        let mut gate = PinGate::new(&limits());
        for i in 0..MAX_PIN_CLIENTS {
            let ip = Ipv4Addr::from(0x0a00_0000 + u32::try_from(i).unwrap());
            let _ = gate.attempt(Client::V4(ip), false, t0);
        }
        let newcomer = Client::of("192.168.9.9".parse().unwrap());
        let soon = t0 + Duration::from_secs(10);
        assert_eq!(
            gate.attempt(newcomer, true, soon),
            Err(PinRefusal::Locked(Duration::from_secs(50)))
        );
        assert_eq!(gate.clients.len(), MAX_PIN_CLIENTS);
        let expired = t0 + Duration::from_secs(60);
        assert_eq!(gate.attempt(newcomer, true, expired), Ok(()));
        assert!(gate.clients.len() < MAX_PIN_CLIENTS);
    }

    #[test]
    fn tokens_are_this_processes_and_fresh() {
        let tokens = Tokens::new(Duration::from_secs(60)).unwrap();
        let other = Tokens::new(Duration::from_secs(60)).unwrap();
        let token = tokens.issue();
        assert_ne!(token, tokens.issue(), "one per page");
        assert_eq!(tokens.check(Some(&token)), Ok(()));
        assert_eq!(tokens.check(None), Err(TokenError::Missing));
        assert_eq!(tokens.check(Some(" ")), Err(TokenError::Missing));
        assert_eq!(other.check(Some(&token)), Err(TokenError::Foreign));
        assert_eq!(tokens.check(Some("%%%")), Err(TokenError::Foreign));
        assert_eq!(tokens.check(Some(&token[..20])), Err(TokenError::Foreign));
        let stale = Tokens {
            ttl: Duration::ZERO,
            ..tokens
        };
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(stale.check(Some(&token)), Err(TokenError::Stale));
    }

    fn request(host: &str) -> Request {
        Request::builder()
            .uri("/")
            .header(header::HOST, host)
            .body(axum::body::Body::empty())
            .unwrap()
    }

    #[test]
    fn hosts_served_and_not() {
        let conn = Some(Conn {
            local: "192.168.1.10:8090".parse().unwrap(),
            peer: "192.168.1.20:50000".parse().unwrap(),
        });
        let hosts = ["renkei.local".to_owned()];
        for ok in [
            "192.168.1.10:8090",
            "localhost:8090",
            "renkei.local",
            "RENKEI.local:80",
        ] {
            assert!(served_host(&request(ok), conn, &hosts).is_ok(), "{ok}");
        }
        for bad in [
            "evil.example:8090",
            "192.168.1.10",
            "192.168.1.11:8090",
            "localhost",
            "user@192.168.1.10:8090",
            "",
            "renkei.local.evil.example",
        ] {
            assert!(served_host(&request(bad), conn, &hosts).is_err(), "{bad}");
        }
        let v6 = Some(Conn {
            local: "[fe80::1]:8090".parse().unwrap(),
            peer: "[fe80::2]:50000".parse().unwrap(),
        });
        assert!(served_host(&request("[FE80::1]:8090"), v6, &[]).is_ok());
        // Without the connection's address only configured names pass.
        assert!(served_host(&request("localhost:8090"), None, &[]).is_err());
        assert!(served_host(&request("renkei.local"), None, &hosts).is_ok());
    }

    #[test]
    fn origins_same_and_not() {
        let host: Authority = "192.168.1.10:8090".parse().unwrap();
        let check = |name: header::HeaderName, value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(name, HeaderValue::from_str(value).unwrap());
            same_origin(&headers, &host)
        };
        assert!(check(header::ORIGIN, "http://192.168.1.10:8090").is_ok());
        assert!(check(header::REFERER, "http://192.168.1.10:8090/report/x?y#z").is_ok());
        for bad in [
            "null",
            "http://192.168.1.10",
            "http://192.168.1.10:8091",
            "ftp://192.168.1.10:8090",
            "http://evil.example",
            "http://x@192.168.1.10:8090",
            "192.168.1.10:8090",
        ] {
            assert!(check(header::ORIGIN, bad).is_err(), "{bad}");
        }
        assert!(same_origin(&HeaderMap::new(), &host).is_err());
        // Default ports match an absent one, by the origin's scheme (a proxy's https).
        let named: Authority = "renkei.local".parse().unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://renkei.local:443"),
        );
        assert!(same_origin(&headers, &named).is_ok());
    }

    #[test]
    fn connections_make_room_by_closing_the_longest_idle() {
        let mut table = Connections::new(3);
        let who = |last: u8| Client::V4(Ipv4Addr::new(10, 0, 0, last));
        let a = table.admit(who(1)).unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let mut b = table.admit(who(2)).unwrap();
        let c = table.admit(who(3)).unwrap();
        // Full: the new connection closes the longest idle, `a`.
        let mut evicted_a = a.evicted;
        let d = table.admit(who(4)).unwrap();
        assert_eq!(
            evicted_a.try_recv(),
            Err(oneshot::error::TryRecvError::Closed),
            "a was told to close"
        );
        assert_eq!(
            b.evicted.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        );
        assert_eq!(table.open.len(), 3);
        // One with a request in progress is never evicted; if all have one, none is let in.
        let _busy = [
            Activity::begin(&b.activity),
            Activity::begin(&c.activity),
            Activity::begin(&d.activity),
        ];
        assert!(table.admit(who(5)).is_none());
        table.remove(b.id);
        assert!(table.admit(who(5)).is_some());
        // One device gets a share, and pushes out only its own connections beyond it.
        let mut table = Connections::new(100);
        let own: Vec<Admitted> = (0..MAX_CONNECTIONS_PER_CLIENT)
            .map(|_| table.admit(who(9)).unwrap())
            .collect();
        let other = table.admit(who(8)).unwrap();
        let _ = table.admit(who(9)).unwrap();
        assert_eq!(table.open.len(), MAX_CONNECTIONS_PER_CLIENT + 1);
        assert!(table.open.contains_key(&other.id));
        drop(own);
    }

    #[test]
    fn waits_are_told_in_seconds_or_minutes() {
        assert_eq!(
            wait_text(Duration::from_millis(1500)),
            ("2秒".into(), "2 s".into())
        );
        assert_eq!(
            wait_text(Duration::from_secs(60)),
            ("1分".into(), "1 min".into())
        );
        assert_eq!(
            wait_text(Duration::from_secs(61)),
            ("2分".into(), "2 min".into())
        );
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            escape("<b a=\"1\">&'"),
            "&lt;b a=&quot;1&quot;&gt;&amp;&#39;"
        );
    }
}
