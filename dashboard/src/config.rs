//! Where the broker's WebSocket listener is, and whether it wants a login.
//!
//! The URL, in order: a `?ws=ws://…` query parameter (tests, debugging), in demo mode only;
//! `mqtt_ws_url` from `/config.json`, served by the broker next to the dashboard; else port 8083
//! on the page's host (a dashboard served by a development server). `auth_required` comes from
//! `/config.json` only; a missing field or file means no login (demo mode).
//!
//! When a login is required, `?ws=` is ignored (with a console warning): the operator's password
//! goes in the MQTT CONNECT, so it may only go to the address the server itself named. Anyone
//! can send a link with `?ws=wss://attacker.example`; honouring it would hand the attacker the
//! password of whoever logs in from that link. In demo mode no password is ever sent (the MQTT
//! client sends none, and offers no login on a refusal), so the override stays for debugging.

use serde::Deserialize;

/// Path of the configuration the broker serves, relative to the page's origin.
pub const CONFIG_PATH: &str = "/config.json";
/// Port of the broker's WebSocket listener when nothing says otherwise.
pub const DEFAULT_WS_PORT: u16 = 8083;

/// The fields of `/config.json` the dashboard reads; others are ignored.
#[derive(Debug, Deserialize)]
struct ServedConfig {
    mqtt_ws_url: Option<String>,
    /// A clustered engine's other nodes, tried in turn when the first is lost.
    #[serde(default)]
    mqtt_ws_failover: Vec<String>,
    #[serde(default)]
    auth_required: bool,
}

/// What the page needs to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub url: String,
    /// Tried in turn when `url` is lost (a clustered engine's other nodes).
    pub failover: Vec<String>,
    /// The broker refuses connections without a user name and password.
    pub auth_required: bool,
}

/// The endpoint, and a warning for the console when a `?ws=` was set aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    pub endpoint: Endpoint,
    pub warning: Option<String>,
}

/// Chooses the endpoint from what the page found: the `?ws=` parameter if there was one, the
/// body of `/config.json` (empty if it could not be fetched) and the page's own location.
///
/// The rule (see the module docs): `?ws=` wins only when no login is required; with a login,
/// the URL is the one `/config.json` names, else the page's host.
pub fn choose(
    query_ws: Option<&str>,
    config_body: &str,
    page_protocol: &str,
    page_hostname: &str,
) -> Resolution {
    let auth_required = auth_required(config_body);
    let named = from_config_json(config_body, page_hostname)
        .unwrap_or_else(|| fallback(page_protocol, page_hostname));
    let (url, warning) = match query_ws {
        Some(query) if auth_required => {
            let warning = format!(
                "renkei: ignoring ?ws={query}: this broker requires a login, and the password \
                 goes only to the address the server names ({named})"
            );
            (named, Some(warning))
        }
        // An unusable override is ignored, as if there were none.
        Some(query) => (usable(query, page_hostname).unwrap_or(named), None),
        None => (named, None),
    };
    // The server's other addresses go with its own, never with an override.
    let failover = if query_ws.is_none() || auth_required {
        failover_from_config_json(config_body, page_hostname)
    } else {
        Vec::new()
    };
    Resolution {
        endpoint: Endpoint {
            url,
            failover,
            auth_required,
        },
        warning,
    }
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

/// The usable failover URLs of a `/config.json` body.
pub fn failover_from_config_json(body: &str, page_hostname: &str) -> Vec<String> {
    serde_json::from_str::<ServedConfig>(body).map_or_else(
        |_| Vec::new(),
        |c| {
            c.mqtt_ws_failover
                .iter()
                .filter_map(|u| usable(u, page_hostname))
                .collect()
        },
    )
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

/// Finds the endpoint in the browser, by [`choose`]'s rule.
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
    let query_ws = web_sys::UrlSearchParams::new_with_str(&search)
        .ok()
        .and_then(|p| p.get("ws"));
    let body = fetch_config().await.unwrap_or_default();
    let Resolution { endpoint, warning } = choose(query_ws.as_deref(), &body, &protocol, &hostname);
    if let Some(warning) = warning {
        crate::log::warn(&warning);
    }
    endpoint
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

    const LOGIN: &str = r#"{"mqtt_ws_url":"ws://hq.example:9001","auth_required":true}"#;
    const DEMO: &str = r#"{"mqtt_ws_url":"ws://hq.example:9001","auth_required":false}"#;
    const DECOY: &str = "wss://attacker.example";

    #[test]
    fn with_a_login_the_query_is_ignored_and_the_servers_url_used() {
        let chosen = choose(Some(DECOY), LOGIN, "https:", "hq.example");
        assert_eq!(
            chosen.endpoint,
            Endpoint {
                url: "ws://hq.example:9001".into(),
                failover: Vec::new(),
                auth_required: true,
            }
        );
        let warning = chosen.warning.expect("a warning for the console");
        assert!(warning.contains(DECOY), "{warning}");
        // Without a usable URL in /config.json, the page's own host, never the query's.
        let chosen = choose(
            Some(DECOY),
            r#"{"auth_required":true}"#,
            "https:",
            "hq.example",
        );
        assert_eq!(chosen.endpoint.url, "wss://hq.example:8083");
        assert!(chosen.endpoint.auth_required);
        assert!(chosen.warning.is_some());
        // Even an unusable `?ws=` is worth a warning: someone sent it.
        assert!(choose(Some("junk"), LOGIN, "http:", "h").warning.is_some());
    }

    #[test]
    fn in_demo_mode_the_query_overrides_the_servers_url() {
        for body in [DEMO, r#"{"mqtt_ws_url":"ws://hq.example:9001"}"#] {
            let chosen = choose(Some("ws://127.0.0.1:1234"), body, "http:", "hq.example");
            assert_eq!(chosen.endpoint.url, "ws://127.0.0.1:1234", "{body}");
            assert!(!chosen.endpoint.auth_required);
            assert_eq!(chosen.warning, None);
        }
        // No /config.json (a development server): demo mode, the query still wins.
        let chosen = choose(Some("ws://0.0.0.0:1234"), "", "http:", "localhost");
        assert_eq!(chosen.endpoint.url, "ws://localhost:1234");
        assert!(!chosen.endpoint.auth_required);
        // An unusable override is ignored.
        let chosen = choose(Some("http://x"), DEMO, "http:", "hq.example");
        assert_eq!(chosen.endpoint.url, "ws://hq.example:9001");
    }

    #[test]
    fn without_a_query_the_servers_url_then_the_pages_host() {
        for body in [LOGIN, DEMO] {
            let chosen = choose(None, body, "http:", "page.example");
            assert_eq!(chosen.endpoint.url, "ws://hq.example:9001");
            assert_eq!(chosen.warning, None);
        }
        assert_eq!(
            choose(None, "", "https:", "page.example").endpoint,
            Endpoint {
                url: "wss://page.example:8083".into(),
                failover: Vec::new(),
                auth_required: false,
            }
        );
    }

    #[test]
    fn a_clusters_other_nodes_come_with_the_servers_url_only() {
        let body = r#"{"mqtt_ws_url":"ws://n1:8083/mqtt","mqtt_ws_failover":
            ["ws://n2:8083/mqtt","http://bad","ws://0.0.0.0:9/mqtt"],"auth_required":true}"#;
        let chosen = choose(None, body, "http:", "page.example");
        assert_eq!(chosen.endpoint.url, "ws://n1:8083/mqtt");
        assert_eq!(
            chosen.endpoint.failover,
            ["ws://n2:8083/mqtt", "ws://page.example:9/mqtt"]
        );
        // With a login, an override is set aside and the server's list kept.
        let chosen = choose(Some(DECOY), body, "http:", "page.example");
        assert_eq!(chosen.endpoint.failover.len(), 2);
        // In demo mode an override goes alone.
        let demo = body.replace("true", "false");
        let chosen = choose(Some("ws://127.0.0.1:1"), &demo, "http:", "page.example");
        assert!(chosen.endpoint.failover.is_empty());
    }

    #[test]
    fn falls_back_to_the_pages_host() {
        assert_eq!(fallback("http:", "localhost"), "ws://localhost:8083");
        assert_eq!(fallback("https:", "hq.example"), "wss://hq.example:8083");
    }
}
