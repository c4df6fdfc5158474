//! Where the broker's WebSocket listener is, and whether it wants a login.
//!
//! The URL, in order: a `?ws=ws://…` query parameter (tests, debugging); `mqtt_ws_url` from
//! `/config.json`, served by the broker next to the dashboard; else port 8083 on the page's
//! host (a dashboard served by a development server). `auth_required` comes from
//! `/config.json` only; a missing field or file means no login (demo mode).

use serde::Deserialize;

/// Path of the configuration the broker serves, relative to the page's origin.
pub const CONFIG_PATH: &str = "/config.json";
/// Port of the broker's WebSocket listener when nothing says otherwise.
pub const DEFAULT_WS_PORT: u16 = 8083;

/// The fields of `/config.json` the dashboard reads; others are ignored.
#[derive(Debug, Deserialize)]
struct ServedConfig {
    mqtt_ws_url: Option<String>,
    #[serde(default)]
    auth_required: bool,
}

/// What the page needs to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub url: String,
    /// The broker refuses connections without a user name and password.
    pub auth_required: bool,
}

/// Whether a `/config.json` body asks for a login; anything unreadable does not.
pub fn auth_required(body: &str) -> bool {
    serde_json::from_str::<ServedConfig>(body).is_ok_and(|c| c.auth_required)
}

/// The URL from a `/config.json` body, if it holds a usable one.
pub fn from_config_json(body: &str, page_hostname: &str) -> Option<String> {
    let config: ServedConfig = serde_json::from_str(body).ok()?;
    usable(&config.mqtt_ws_url?, page_hostname)
}

/// A WebSocket URL as given, or with a wildcard host replaced by the page's host: a broker
/// listening on all interfaces knows no better name for itself than the browser does.
pub fn usable(url: &str, page_hostname: &str) -> Option<String> {
    let url = url.trim();
    let (scheme, rest) = url.split_once("://")?;
    if !matches!(scheme, "ws" | "wss") || rest.is_empty() {
        return None;
    }
    for wildcard in ["0.0.0.0", "[::]"] {
        if let Some(after) = rest.strip_prefix(wildcard)
            && (after.is_empty() || after.starts_with([':', '/']))
        {
            return Some(format!("{scheme}://{page_hostname}{after}"));
        }
    }
    Some(url.to_owned())
}

/// The fallback: the page's host on [`DEFAULT_WS_PORT`], encrypted if the page is.
pub fn fallback(page_protocol: &str, page_hostname: &str) -> String {
    let scheme = if page_protocol == "https:" {
        "wss"
    } else {
        "ws"
    };
    format!("{scheme}://{page_hostname}:{DEFAULT_WS_PORT}")
}

/// Finds the endpoint in the browser: the URL from the query, then `/config.json`, then the
/// fallback; the login requirement from `/config.json`.
#[cfg(target_arch = "wasm32")]
pub async fn resolve() -> Endpoint {
    let location = web_sys::window().map(|w| w.location());
    let (search, protocol, hostname) = match &location {
        Some(l) => (
            l.search().unwrap_or_default(),
            l.protocol().unwrap_or_default(),
            l.hostname().unwrap_or_default(),
        ),
        None => Default::default(),
    };
    let from_query = web_sys::UrlSearchParams::new_with_str(&search)
        .ok()
        .and_then(|p| p.get("ws"))
        .and_then(|url| usable(&url, &hostname));
    let body = fetch_config().await.unwrap_or_default();
    let url = from_query
        .or_else(|| from_config_json(&body, &hostname))
        .unwrap_or_else(|| fallback(&protocol, &hostname));
    Endpoint {
        url,
        auth_required: auth_required(&body),
    }
}

#[cfg(target_arch = "wasm32")]
async fn fetch_config() -> Option<String> {
    let response = gloo_net::http::Request::get(CONFIG_PATH)
        .send()
        .await
        .ok()?;
    if !response.ok() {
        return None;
    }
    response.text().await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_url_from_the_brokers_config() {
        let body = r#"{"mqtt_ws_url":"ws://hq.example:9001","api":"/api/v1"}"#;
        assert_eq!(
            from_config_json(body, "page.example").as_deref(),
            Some("ws://hq.example:9001")
        );
        assert_eq!(from_config_json("{}", "h"), None);
        assert_eq!(from_config_json("not json", "h"), None);
        assert_eq!(from_config_json(r#"{"mqtt_ws_url":"http://x"}"#, "h"), None);
    }

    #[test]
    fn a_login_is_required_only_when_said_so() {
        assert!(auth_required(
            r#"{"mqtt_ws_url":"ws://h:1","auth_required":true}"#
        ));
        assert!(!auth_required(
            r#"{"mqtt_ws_url":"ws://h:1","auth_required":false}"#
        ));
        assert!(
            !auth_required(r#"{"mqtt_ws_url":"ws://h:1"}"#),
            "missing means demo"
        );
        assert!(!auth_required(""));
        assert!(!auth_required(r#"{"auth_required":"yes"}"#));
    }

    #[test]
    fn a_wildcard_host_becomes_the_pages_host() {
        assert_eq!(
            usable("ws://0.0.0.0:8083", "10.1.2.3").as_deref(),
            Some("ws://10.1.2.3:8083")
        );
        assert_eq!(
            usable("wss://[::]:8083/mqtt", "hq.example").as_deref(),
            Some("wss://hq.example:8083/mqtt")
        );
        assert_eq!(
            usable("ws://0.0.0.0.example:1", "h").as_deref(),
            Some("ws://0.0.0.0.example:1")
        );
        assert_eq!(usable("ws://", "h"), None);
        assert_eq!(usable("localhost:8083", "h"), None);
    }

    #[test]
    fn falls_back_to_the_pages_host() {
        assert_eq!(fallback("http:", "localhost"), "ws://localhost:8083");
        assert_eq!(fallback("https:", "hq.example"), "wss://hq.example:8083");
    }
}
