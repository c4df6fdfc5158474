//! Who is asking: HTTP Basic credentials checked against the same users as MQTT.
//!
//! [`Viewer`] is an extractor: a handler that takes one answers only to an authenticated
//! user whose role may read the API (agents may not), with `401` and a `WWW-Authenticate`
//! challenge otherwise. A script's request (`X-Requested-With: XMLHttpRequest`, as the
//! dashboard sends) gets its `401` without the challenge: a browser answers a challenge to a
//! fetch with its own password dialog, which would stand in front of the dashboard's login
//! form. In demo mode (no [`crate::auth::Authenticator`] in the app state) everyone is a
//! viewer of everything.

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
    /// No or wrong credentials; `challenge`: with a `WWW-Authenticate` header.
    Unauthenticated { challenge: bool },
    /// Authenticated, but the role may not read the API.
    Forbidden,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        let (status, message, challenge) = match self {
            Refused::Unauthenticated { challenge } => {
                (StatusCode::UNAUTHORIZED, "credentials required", challenge)
            }
            Refused::Forbidden => (
                StatusCode::FORBIDDEN,
                "this role may not use the API",
                false,
            ),
        };
        let mut response =
            (status, axum::Json(serde_json::json!({ "error": message }))).into_response();
        if challenge {
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

/// Whether the request says it comes from a script (`X-Requested-With: XMLHttpRequest`).
fn from_script(parts: &Parts) -> bool {
    parts
        .headers
        .get("x-requested-with")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("xmlhttprequest"))
}

impl FromRequestParts<AppState> for Viewer {
    type Rejection = Refused;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, Refused> {
        let Some(auth) = &app.auth else {
            return Ok(Viewer {
                principal: Principal::demo(),
            });
        };
        let unauthenticated = Refused::Unauthenticated {
            challenge: !from_script(parts),
        };
        let Some((user, password)) = basic_credentials(parts) else {
            return Err(unauthenticated);
        };
        if user.is_empty() {
            return Err(unauthenticated);
        }
        let peer = parts
            .extensions
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|info| info.0.ip());
        let principal = auth
            .verify_from(peer, &user, &password)
            .await
            .map_err(|_| unauthenticated)?;
        match principal.access {
            Access::Agent(_) | Access::Probe | Access::Relay(_) => Err(Refused::Forbidden),
            _ => Ok(Viewer { principal }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut request = axum::http::Request::builder().uri("/api/v1/whoami");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).expect("a request").into_parts().0
    }

    #[test]
    fn a_scripts_401_comes_without_the_browsers_password_dialog() {
        assert!(from_script(&parts(&[(
            "X-Requested-With",
            "XMLHttpRequest"
        )])));
        assert!(!from_script(&parts(&[])));
        assert!(!from_script(&parts(&[("X-Requested-With", "fetch")])));
        let challenged = Refused::Unauthenticated { challenge: true }.into_response();
        assert_eq!(challenged.status(), StatusCode::UNAUTHORIZED);
        assert!(challenged.headers().contains_key(header::WWW_AUTHENTICATE));
        let quiet = Refused::Unauthenticated { challenge: false }.into_response();
        assert_eq!(quiet.status(), StatusCode::UNAUTHORIZED);
        assert!(!quiet.headers().contains_key(header::WWW_AUTHENTICATE));
    }

    #[test]
    fn basic_credentials_are_read_and_odd_headers_are_none() {
        let ok = parts(&[("Authorization", "Basic c2F0bzpzM2NyZXQ6eA==")]);
        assert_eq!(
            basic_credentials(&ok),
            Some(("sato".into(), "s3cret:x".into()))
        );
        for bad in ["Bearer abc", "Basic !!!", "Basic", "Basic c2F0bw=="] {
            assert_eq!(
                basic_credentials(&parts(&[("Authorization", bad)])),
                None,
                "{bad}"
            );
        }
    }
}
