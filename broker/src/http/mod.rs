//! HTTP: the dashboard's files, where it should connect, the live state, health and metrics.
//!
//! | route                                          | answers                                    |
//! |------------------------------------------------|--------------------------------------------|
//! | `GET /healthz`                                 | `200 ok` while the process serves (open)   |
//! | `GET /config.json`                             | `{"mqtt_ws_url", "version", "auth_required"}` (open) |
//! | `GET /api/v1/whoami`                           | the login's user, role and ward            |
//! | `GET /api/v1/state?mode=`                      | roll-ups and latest reports ([`api`])       |
//! | `GET /api/v1/sites/{ward}/{site}/history?kind=&limit=` | one site's recorded messages ([`history`]) |
//! | `GET /api/v1/events?since=&since_time=&limit=` | recorded messages after a row id or a time |
//! | `GET /api/v1/export/sites.csv?mode=`           | sites, one line each ([`export`])          |
//! | `GET /api/v1/export/sites.geojson?mode=`       | sites with a location, as Points           |
//! | `GET /api/v1/export/alerts.cap.xml?mode=`      | active alerts, CAP 1.2                     |
//! | `GET /api/v1/links`                            | ward mode's lines: this ward broker's uplink to HQ, or at HQ the wards' relays |
//! | `GET /metrics`                                 | Prometheus text ([`crate::metrics`])       |
//! | anything else                                  | the built dashboard (open); unknown paths get its `index.html` |
//!
//! Everything but the open routes needs HTTP Basic credentials of a user who is not an agent
//! ([`viewer::Viewer`]); a ward operator sees only its ward. In demo mode all is open.
//! `docs/openapi.yaml` documents the API. [`router`] builds the routes without a socket, so
//! tests drive it with `oneshot`; [`server`] serves them on the listener, with timeouts and a
//! cap on connections.

pub mod api;
pub mod export;
pub mod history;
pub mod server;
pub mod viewer;

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use renkei_shared::{BodyKind, Id, Mode, Timestamp, WardCode};
use serde::Deserialize;
use tower_http::services::{ServeDir, ServeFile};
use tower_http::trace::TraceLayer;

use crate::auth::Authenticator;
use crate::clock::Clock;
use crate::live::LiveState;
use crate::metrics::Metrics;
use viewer::Viewer;

/// The broker's version, as `/config.json` reports it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub live: LiveState,
    pub metrics: Arc<Metrics>,
    /// The port of the MQTT-over-WebSocket listener, for `/config.json`.
    pub ws_port: u16,
    /// Overrides the URL `/config.json` derives from the request's host.
    pub public_mqtt_ws_url: Option<String>,
    /// The cluster's other WebSocket URLs, tried in turn when the first is lost.
    pub mqtt_ws_failover: Vec<String>,
    pub dashboard_dir: PathBuf,
    pub clock: Clock,
    /// Checks API credentials; `None` in demo mode, where the API is open and the dashboard
    /// shows no login form.
    pub auth: Option<Arc<Authenticator>>,
    /// The record, for history, events and commands.
    pub archive: crate::recorder::Archive,
    /// Ward mode: the ward this broker serves (it forwards to HQ).
    pub upstream_ward: Option<WardCode>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("ws_port", &self.ws_port)
            .field("public_mqtt_ws_url", &self.public_mqtt_ws_url)
            .field("dashboard_dir", &self.dashboard_dir)
            .field("auth_required", &self.auth.is_some())
            .field("archive", &self.archive.name())
            .finish_non_exhaustive()
    }
}

/// Every route [`router`] serves besides the dashboard, as axum writes them; each must be in
/// `docs/openapi.yaml` (checked by the broker's tests).
pub const ROUTES: [&str; 12] = [
    "/healthz",
    "/config.json",
    "/api/v1/whoami",
    "/api/v1/state",
    "/api/v1/sites/{ward}/{site}/history",
    "/api/v1/events",
    "/api/v1/commands",
    "/api/v1/export/sites.csv",
    "/api/v1/export/sites.geojson",
    "/api/v1/export/alerts.cap.xml",
    "/api/v1/links",
    "/metrics",
];

/// All routes.
pub fn router(state: AppState) -> Router {
    let index = state.dashboard_dir.join("index.html");
    // The dashboard routes in the browser: a deep link must load the app, not a 404.
    let dashboard = ServeDir::new(&state.dashboard_dir).fallback(ServeFile::new(index));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/config.json", get(config_json))
        .route("/api/v1/whoami", get(whoami))
        .route("/api/v1/state", get(state_api))
        .route("/api/v1/sites/{ward}/{site}/history", get(site_history))
        .route("/api/v1/events", get(events))
        .route("/api/v1/commands", get(commands))
        .route("/api/v1/export/sites.csv", get(export_csv))
        .route("/api/v1/export/sites.geojson", get(export_geojson))
        .route("/api/v1/export/alerts.cap.xml", get(export_cap))
        .route("/api/v1/links", get(links))
        .route("/metrics", get(metrics))
        .fallback_service(dashboard)
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// A failed request, answered as `{"error": "…"}`.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The request itself is wrong (a bad query, no usable Host header).
    #[error("{0}")]
    BadRequest(String),
    /// The viewer may not see this (another ward's site).
    #[error("{0}")]
    Forbidden(String),
    /// The broker failed to answer.
    #[error("{0}")]
    Internal(String),
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = match self {
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::Forbidden(_) => StatusCode::FORBIDDEN,
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::error!(error = %self, "HTTP request failed");
        }
        let body = Json(serde_json::json!({ "error": self.to_string() }));
        (status, no_store(), body).into_response()
    }
}

fn no_store() -> [(header::HeaderName, HeaderValue); 1] {
    [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))]
}

async fn healthz() -> &'static str {
    "ok"
}

/// Who the request's credentials name: the dashboard asks after a login, to subscribe to
/// what the login may read ([`renkei_shared::topic::ward_reader_filters`] for a ward
/// operator) and to sign its acknowledgements with the login's own name and role, which the
/// broker checks (`acl::ack_author`).
#[derive(Debug, serde::Serialize)]
pub struct WhoAmI {
    /// The user name; empty in demo mode.
    pub user: String,
    /// `null` in demo mode.
    pub role: Option<renkei_shared::Role>,
    /// The ward a ward operator is limited to.
    pub ward: Option<WardCode>,
}

async fn whoami(viewer: Viewer) -> Response {
    let body = WhoAmI {
        ward: viewer.ward(),
        role: viewer.principal.access.role(),
        user: viewer.principal.name,
    };
    (
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Json(body),
    )
        .into_response()
}

/// Ward mode's lines, for the dashboards: at a ward broker its uplink to HQ, at HQ the wards'
/// relays (a ward operator sees its own ward's).
#[derive(Debug, serde::Serialize)]
pub struct Links {
    pub uplink: Option<UplinkView>,
    pub relays: Vec<crate::relays::RelayView>,
    /// This broker's record: its room on disk.
    pub record: RecordView,
}

/// The record's room: what it holds, what it may take, the 80 % alarm, and what was refused
/// for want of room (its senders keep it and send it again).
#[derive(Debug, serde::Serialize)]
pub struct RecordView {
    pub bytes: u64,
    pub budget: u64,
    pub alarm: bool,
    pub refused: u64,
}

/// A ward broker's line to HQ.
#[derive(Debug, serde::Serialize)]
pub struct UplinkView {
    pub ward: WardCode,
    pub connected: bool,
    /// Since when HQ is unreachable (Unix ms), while it is.
    pub down_since: Option<i64>,
    /// This ward's records HQ does not have yet.
    pub backlog: u64,
    /// HQ's last receipt (Unix ms).
    pub last_receipt: Option<i64>,
    /// HQ takes this ward's records and stores none.
    pub stalled: bool,
}

async fn links(State(app): State<AppState>, viewer: Viewer) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    let u = &app.metrics.uplink;
    let nonzero = |v: u64| (v > 0).then(|| i64::try_from(v).unwrap_or(i64::MAX));
    let uplink = app.upstream_ward.map(|ward| UplinkView {
        ward,
        connected: u.connected.load(Relaxed) == 1,
        down_since: if u.connected.load(Relaxed) == 1 {
            None
        } else {
            nonzero(u.down_since_ms.load(Relaxed))
        },
        backlog: u.backlog.load(Relaxed),
        last_receipt: nonzero(u.last_receipt_ms.load(Relaxed)),
        stalled: u.stalled.load(Relaxed) == 1,
    });
    let relays = app
        .metrics
        .relays
        .views()
        .into_iter()
        .filter(|r| viewer.sees(r.ward))
        .collect();
    let (bytes, budget, alarm, refused) = app.metrics.record_room();
    let record = RecordView {
        bytes,
        budget,
        alarm,
        refused,
    };
    (
        no_store(),
        Json(Links {
            uplink,
            relays,
            record,
        }),
    )
        .into_response()
}

/// Tells the dashboard where the MQTT WebSocket is: the host the browser used to load the
/// page (so it works by IP, by name and through port forwarding) and the WebSocket port.
async fn config_json(
    State(app): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
) -> Result<Response, AppError> {
    let mqtt_ws_url = match &app.public_mqtt_ws_url {
        Some(url) => url.clone(),
        None => format!("ws://{}:{}", browser_host(&headers, &uri)?, app.ws_port),
    };
    let mut body = serde_json::json!({
        "mqtt_ws_url": mqtt_ws_url,
        "version": VERSION,
        "auth_required": app.auth.is_some(),
    });
    if !app.mqtt_ws_failover.is_empty() {
        body["mqtt_ws_failover"] = serde_json::json!(app.mqtt_ws_failover);
    }
    let body = Json(body);
    Ok((no_store(), body).into_response())
}

/// The host part of the request's `Host` header (or of an absolute URI, as HTTP/2 sends it).
fn browser_host(headers: &HeaderMap, uri: &Uri) -> Result<String, AppError> {
    let authority = match headers.get(header::HOST) {
        Some(value) => value
            .to_str()
            .map_err(|_| AppError::BadRequest("Host header is not text".into()))?
            .parse::<axum::http::uri::Authority>()
            .map_err(|_| AppError::BadRequest("Host header is not host[:port]".into()))?,
        None => uri
            .authority()
            .cloned()
            .ok_or_else(|| AppError::BadRequest("request names no host".into()))?,
    };
    let host = authority.host();
    // The host goes into a URL the browser will open: nothing but a name or an address.
    let plain = |c: char| c.is_ascii_alphanumeric() || c == '.' || c == '-';
    let ipv6 = |c: char| c.is_ascii_hexdigit() || c == ':' || c == '.';
    let ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(inner) => !inner.is_empty() && inner.chars().all(ipv6),
        None => !host.is_empty() && host.chars().all(plain),
    };
    if ok && !authority.as_str().contains('@') {
        Ok(host.to_owned())
    } else {
        Err(AppError::BadRequest(format!("unusable host {host:?}")))
    }
}

#[derive(Debug, Deserialize)]
struct StateQuery {
    mode: Option<String>,
}

fn parse_mode(mode: Option<&str>) -> Result<Mode, AppError> {
    let Some(name) = mode else {
        return Ok(Mode::Actual);
    };
    name.parse()
        .map_err(|_| AppError::BadRequest(format!("mode {name:?} is not actual, exercise or test")))
}

type QueryResult<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

fn query<T>(q: QueryResult<T>) -> Result<T, AppError> {
    q.map(|Query(q)| q)
        .map_err(|e| AppError::BadRequest(e.body_text()))
}

async fn state_api(
    State(app): State<AppState>,
    viewer: Viewer,
    q: QueryResult<StateQuery>,
) -> Result<Response, AppError> {
    let mode = parse_mode(query(q)?.mode.as_deref())?;
    let now = app.clock.now();
    let body = {
        let state = app
            .live
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Serialised under the read lock: the view borrows from the state, and copying 2,000
        // sites to release the lock earlier would cost more than the ingest thread waits.
        serde_json::to_vec(&api::StateView::new(&state, mode, now, viewer.ward()))
            .map_err(|e| AppError::Internal(format!("cannot encode state: {e}")))?
    };
    let headers = [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        ),
        (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
    ];
    Ok((headers, body).into_response())
}

#[derive(Debug, Deserialize)]
struct HistoryQuery {
    kind: Option<String>,
    limit: Option<u32>,
}

fn limit(limit: Option<u32>) -> Result<u32, AppError> {
    match limit.unwrap_or(history::DEFAULT_LIMIT) {
        n @ 1..=history::MAX_LIMIT => Ok(n),
        n => Err(AppError::BadRequest(format!(
            "limit {n} is not between 1 and {}",
            history::MAX_LIMIT
        ))),
    }
}

fn json_response(body: &impl serde::Serialize) -> Result<Response, AppError> {
    let body =
        serde_json::to_vec(body).map_err(|e| AppError::Internal(format!("cannot encode: {e}")))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        no_store(),
        body,
    )
        .into_response())
}

/// A failed read of the record, as the API answers it.
fn read_failed(e: history::ReadError) -> AppError {
    AppError::Internal(e.to_string())
}

async fn site_history(
    State(app): State<AppState>,
    viewer: Viewer,
    Path((ward, site)): Path<(String, String)>,
    q: QueryResult<HistoryQuery>,
) -> Result<Response, AppError> {
    let q = query(q)?;
    let ward: WardCode = ward
        .parse()
        .map_err(|e: renkei_shared::ward::WardCodeError| AppError::BadRequest(e.to_string()))?;
    let site = Id::new(site).map_err(|e| AppError::BadRequest(e.to_string()))?;
    if !viewer.sees(ward) {
        return Err(AppError::Forbidden(format!("ward {ward} is not yours")));
    }
    if let Some(kind) = &q.kind
        && !BodyKind::ALL.iter().any(|k| k.as_str() == kind)
    {
        return Err(AppError::BadRequest(format!("unknown kind {kind:?}")));
    }
    let limit = limit(q.limit)?;
    let events = history::site_history(&app.archive, ward, &site, q.kind.as_deref(), limit)
        .await
        .map_err(read_failed)?;
    let events: Vec<_> = events
        .into_iter()
        .map(|e| serde_json::json!({ "received_at": e.received_at, "envelope": e.envelope }))
        .collect();
    json_response(&serde_json::json!({
        "site": { "ward": ward, "site": site },
        "events": events,
    }))
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    /// A row id: events after it.
    since: Option<i64>,
    /// Unix ms: events received at or after it.
    since_time: Option<i64>,
    limit: Option<u32>,
}

async fn events(
    State(app): State<AppState>,
    viewer: Viewer,
    q: QueryResult<EventsQuery>,
) -> Result<Response, AppError> {
    let q = query(q)?;
    let since = match (q.since, q.since_time) {
        (Some(_), Some(_)) => {
            return Err(AppError::BadRequest(
                "give since (a row id) or since_time (ms), not both".into(),
            ));
        }
        (_, Some(t)) => history::Since::Time(t),
        (id, None) => history::Since::Id(id.unwrap_or(0)),
    };
    let limit = limit(q.limit)?;
    let events = history::events(&app.archive, since, viewer.ward(), limit)
        .await
        .map_err(read_failed)?;
    let next = events.last().map(|e| e.id);
    json_response(&serde_json::json!({ "events": events, "next": next }))
}

#[derive(Debug, Deserialize)]
struct CommandsQuery {
    limit: Option<u32>,
}

/// The latest commands, newest first, each with what its site answered: HQ's view of
/// whether a command issued during a cut was carried out or expired.
async fn commands(
    State(app): State<AppState>,
    viewer: Viewer,
    q: QueryResult<CommandsQuery>,
) -> Result<Response, AppError> {
    let q = query(q)?;
    let limit = limit(q.limit)?;
    let now = app.clock.now();
    let commands = history::commands(&app.archive, viewer.ward(), limit, now)
        .await
        .map_err(read_failed)?;
    json_response(&serde_json::json!({
        "ttl_ms": renkei_shared::COMMAND_TTL_MS,
        "commands": commands,
    }))
}

#[derive(Debug, Deserialize)]
struct ExportQuery {
    mode: Option<String>,
}

fn export<F>(
    app: &AppState,
    viewer: &Viewer,
    q: QueryResult<ExportQuery>,
    f: F,
) -> Result<Vec<u8>, AppError>
where
    F: FnOnce(&renkei_shared::State, Mode, Option<WardCode>, Timestamp) -> Vec<u8>,
{
    let mode = parse_mode(query(q)?.mode.as_deref())?;
    let now = app.clock.now();
    let state = app
        .live
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    Ok(f(&state, mode, viewer.ward(), now))
}

async fn export_csv(
    State(app): State<AppState>,
    viewer: Viewer,
    q: QueryResult<ExportQuery>,
) -> Result<Response, AppError> {
    let body = export(&app, &viewer, q, |s, m, w, n| {
        export::sites_csv(s, m, w, n).into_bytes()
    })?;
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/csv; charset=utf-8"),
            ),
            (
                header::CONTENT_DISPOSITION,
                HeaderValue::from_static("attachment; filename=\"sites.csv\""),
            ),
        ],
        no_store(),
        body,
    )
        .into_response())
}

async fn export_geojson(
    State(app): State<AppState>,
    viewer: Viewer,
    q: QueryResult<ExportQuery>,
) -> Result<Response, AppError> {
    let body = export(&app, &viewer, q, |s, m, w, n| {
        serde_json::to_vec(&export::sites_geojson(s, m, w, n)).unwrap_or_default()
    })?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/geo+json"),
        )],
        no_store(),
        body,
    )
        .into_response())
}

async fn export_cap(
    State(app): State<AppState>,
    viewer: Viewer,
    q: QueryResult<ExportQuery>,
) -> Result<Response, AppError> {
    let body = export(&app, &viewer, q, |s, m, w, n| {
        export::alerts_cap(s, m, w, n).into_bytes()
    })?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/xml; charset=utf-8"),
        )],
        no_store(),
        body,
    )
        .into_response())
}

async fn metrics(State(app): State<AppState>, _viewer: Viewer) -> impl IntoResponse {
    let content_type = HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");
    ([(header::CONTENT_TYPE, content_type)], app.metrics.render())
}

#[cfg(test)]
mod tests;
