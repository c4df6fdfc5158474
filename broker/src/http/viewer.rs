//! Who is asking: HTTP Basic credentials checked against the same users as MQTT.
//!
//! [`Viewer`] is an extractor: a handler that takes one answers only to an authenticated
//! user whose role may read the API (agents may not), with `401` and a `WWW-Authenticate`
//! challenge otherwise. In demo mode (no [`crate::auth::Authenticator`] in the app state)
//! everyone is a viewer of everything.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use renkei_shared::WardCode;

use super::AppState;
use crate::auth::{Access, Principal};

/// An authenticated reader of the API, and how far it may see.
#[derive(Debug, Clone)]
pub struct Viewer {
    pub principal: Principal,
}

impl Viewer {
    /// The one ward a ward operator is limited to; `None` sees all wards.
    pub fn ward(&self) -> Option<WardCode> {
        match &self.principal.access {
            Access::Ward(ward) => Some(*ward),
            _ => None,
        }
    }

    /// Whether the viewer may see `ward`.
    pub fn sees(&self, ward: WardCode) -> bool {
        self.ward().is_none_or(|own| own == ward)
    }
}

/// A refused request.
#[derive(Debug)]
pub enum Refused {
    /// No or wrong credentials.
    Unauthenticated,
    /// Authenticated, but the role may not read the API.
    Forbidden,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            Refused::Unauthenticated => (StatusCode::UNAUTHORIZED, "credentials required"),
            Refused::Forbidden => (StatusCode::FORBIDDEN, "this role may not use the API"),
        };
        let mut response =
            (status, axum::Json(serde_json::json!({ "error": message }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"renkei\", charset=\"UTF-8\""),
            );
        }
        response
    }
}

/// `user:password` from an `Authorization: Basic …` header.
fn basic_credentials(parts: &Parts) -> Option<(String, String)> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(token.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

impl FromRequestParts<AppState> for Viewer {
    type Rejection = Refused;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, Refused> {
        let Some(auth) = &app.auth else {
            return Ok(Viewer {
                principal: Principal::demo(),
            });
        };
        let (user, password) = basic_credentials(parts).ok_or(Refused::Unauthenticated)?;
        if user.is_empty() {
            return Err(Refused::Unauthenticated);
        }
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|info| info.0.ip());
        let principal = auth
            .verify_from(peer, &user, &password)
            .await
            .map_err(|_| Refused::Unauthenticated)?;
        match principal.access {
            Access::Agent(_) | Access::Probe => Err(Refused::Forbidden),
            _ => Ok(Viewer { principal }),
        }
    }
}
