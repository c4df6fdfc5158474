//! HTTP: the dashboard's files, where it should connect, the live state, health and metrics.
//!
//! | route              | answers                                                        |
//! |--------------------|----------------------------------------------------------------|
//! | `GET /healthz`     | `200 ok` while the process serves                              |
//! | `GET /config.json` | `{"mqtt_ws_url": "ws://HOST:PORT", "version": "…", "auth_required": true}` |
//! | `GET /api/v1/state`| per-ward roll-ups and per-site latest reports ([`api`])        |
//! | `GET /metrics`     | Prometheus text ([`crate::metrics`])                            |
//! | anything else      | the built dashboard; unknown paths get its `index.html`        |
//!
//! [`router`] builds the routes without a socket, so tests drive it with `oneshot`.

pub mod api;

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use renkei_shared::{Mode, Timestamp};
use serde::Deserialize;
use tower_http::services::{ServeDir, ServeFile};
use tower_http::trace::TraceLayer;

use crate::ingest::LiveState;
use crate::metrics::Metrics;

/// The broker's version, as `/config.json` reports it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The time `now` used for staleness and roll-ups; tests fix it.
pub type Clock = Arc<dyn Fn() -> Timestamp + Send + Sync>;

/// The wall clock.
pub fn system_clock() -> Clock {
    Arc::new(now)
}

/// The time now, from the broker's clock.
pub fn now() -> Timestamp {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    Timestamp(ms)
}

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub live: LiveState,
    pub metrics: Arc<Metrics>,
    /// The port of the MQTT-over-WebSocket listener, for `/config.json`.
    pub ws_port: u16,
    /// Overrides the URL `/config.json` derives from the request's host.
    pub public_mqtt_ws_url: Option<String>,
    pub dashboard_dir: PathBuf,
    pub clock: Clock,
    /// False in demo mode: the dashboard then shows no login form and the API is open.
    pub auth_required: bool,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("ws_port", &self.ws_port)
            .field("public_mqtt_ws_url", &self.public_mqtt_ws_url)
            .field("dashboard_dir", &self.dashboard_dir)
            .field("auth_required", &self.auth_required)
            .finish_non_exhaustive()
    }
}

/// All routes.
pub fn router(state: AppState) -> Router {
    let index = state.dashboard_dir.join("index.html");
    // The dashboard routes in the browser: a deep link must load the app, not a 404.
    let dashboard = ServeDir::new(&state.dashboard_dir).fallback(ServeFile::new(index));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/config.json", get(config_json))
        .route("/api/v1/state", get(state_api))
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
    /// The broker failed to answer.
    #[error("{0}")]
    Internal(String),
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = match self {
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
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
    let body = Json(serde_json::json!({
        "mqtt_ws_url": mqtt_ws_url,
        "version": VERSION,
        "auth_required": app.auth_required,
    }));
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

async fn state_api(
    State(app): State<AppState>,
    query: Result<Query<StateQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, AppError> {
    let Query(query) = query.map_err(|e| AppError::BadRequest(e.body_text()))?;
    let mode = match query.mode.as_deref() {
        None | Some("actual") => Mode::Actual,
        Some("exercise") => Mode::Exercise,
        Some("test") => Mode::Test,
        Some(other) => {
            return Err(AppError::BadRequest(format!(
                "mode {other:?} is not actual, exercise or test"
            )));
        }
    };
    let now = (app.clock)();
    let body = {
        let state = app
            .live
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Serialised under the read lock: the view borrows from the state, and copying 2,000
        // sites to release the lock earlier would cost more than the ingest thread waits.
        serde_json::to_vec(&api::StateView::new(&state, mode, now))
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

async fn metrics(State(app): State<AppState>) -> impl IntoResponse {
    let content_type = HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8");
    ([(header::CONTENT_TYPE, content_type)], app.metrics.render())
}

#[cfg(test)]
mod tests;
