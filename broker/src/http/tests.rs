//! The routes, driven through `oneshot` without a socket.

use std::path::Path;

use axum::body::{Body, to_bytes};
use axum::http::{Request, StatusCode, header};
use renkei_shared::sample;
use serde_json::Value;
use tower::ServiceExt as _;

use super::*;

const WS_PORT: u16 = 48083;

fn app_in(dashboard_dir: &Path) -> AppState {
    AppState {
        live: LiveState::default(),
        metrics: Arc::new(Metrics::new()),
        ws_port: WS_PORT,
        public_mqtt_ws_url: None,
        mqtt_ws_failover: Vec::new(),
        dashboard_dir: dashboard_dir.to_owned(),
        // Ten seconds after the samples were sent: every sample site is fresh.
        clock: crate::clock::Clock::new(|| sample::SENT_AT.plus_secs(10)),
        auth: None,
        archive: crate::recorder::Archive::Sqlite(dashboard_dir.join("no-data")),
        upstream_ward: None,
    }
}

fn app() -> AppState {
    app_in(Path::new("/nonexistent/renkei-dashboard"))
}

async fn get(app: &AppState, uri: &str, host: Option<&str>) -> (StatusCode, HeaderMap, Vec<u8>) {
    let mut request = Request::get(uri);
    if let Some(host) = host {
        request = request.header(header::HOST, host);
    }
    let response = router(app.clone())
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = to_bytes(response.into_body(), 1 << 20).await.unwrap();
    (status, headers, body.to_vec())
}

async fn get_json(app: &AppState, uri: &str, host: Option<&str>) -> (StatusCode, Value) {
    let (status, headers, body) = get(app, uri, host).await;
    assert_eq!(
        headers.get(header::CONTENT_TYPE).unwrap(),
        "application/json",
        "{uri}"
    );
    (status, serde_json::from_slice(&body).unwrap())
}

#[tokio::test]
async fn healthz_answers_ok() {
    let (status, _, body) = get(&app(), "/healthz", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, b"ok");
}

#[tokio::test]
async fn config_json_points_the_browser_at_the_host_it_used() {
    let app = app();
    for (host, url) in [
        ("renkei.local:8080", "ws://renkei.local:48083"),
        ("192.168.10.5", "ws://192.168.10.5:48083"),
        ("[::1]:8080", "ws://[::1]:48083"),
    ] {
        let (status, body) = get_json(&app, "/config.json", Some(host)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["mqtt_ws_url"], url, "{host}");
        assert_eq!(body["version"], VERSION);
        assert_eq!(body["auth_required"], false, "no authenticator: demo mode");
    }
}

#[tokio::test]
async fn config_json_refuses_unusable_hosts() {
    let app = app();
    for host in ["user@evil:80", "", "a b"] {
        let (status, body) = get_json(&app, "/config.json", Some(host)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{host:?}");
        assert!(body["error"].is_string());
    }
    let (status, _) = get_json(&app, "/config.json", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn config_json_prefers_the_configured_public_url() {
    let mut app = app();
    app.public_mqtt_ws_url = Some("wss://renkei.example.jp/mqtt".into());
    let (_, body) = get_json(&app, "/config.json", Some("10.0.0.1:8080")).await;
    assert_eq!(body["mqtt_ws_url"], "wss://renkei.example.jp/mqtt");
}

#[tokio::test]
async fn state_shows_ward_rollups_and_site_summaries() {
    let app = app();
    {
        let mut state = app.live.write().unwrap();
        state.apply(&sample::status());
        state.apply(&sample::shelter());
    }
    let (status, body) = get_json(&app, "/api/v1/state?mode=actual", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["mode"], "actual");
    assert_eq!(body["now"], sample::SENT_AT.plus_secs(10).0);

    let wards = body["wards"].as_array().unwrap();
    assert_eq!(wards.len(), 23);
    let shinjuku = wards.iter().find(|w| w["ward"] == 131041).unwrap();
    assert_eq!(shinjuku["name_en"], "Shinjuku");
    assert_eq!(shinjuku["name_ja"], "新宿区");
    assert_eq!(shinjuku["sites"], 1);
    assert_eq!(shinjuku["reporting"], 1);
    assert_eq!(shinjuku["shelters_open"], 1);
    assert_eq!(shinjuku["evacuees"], 312);
    assert_eq!(shinjuku["level"], "watch");
    let chiyoda = wards.iter().find(|w| w["ward"] == 131016).unwrap();
    assert_eq!(chiyoda["level"], "no_data");

    let sites = body["sites"].as_array().unwrap();
    assert_eq!(sites.len(), 1);
    let site = &sites[0];
    assert_eq!(site["ward"], 131041);
    assert_eq!(site["site"], "nishi-shinjuku-es");
    assert_eq!(site["name"], "西新宿小学校");
    assert_eq!(site["silent"], false);
    assert_eq!(site["occupancy_pct"], 69);
    assert_eq!(site["status"]["seq"], 10);
    assert_eq!(site["status"]["value"]["interval_s"], 30);
    assert_eq!(site["shelter"]["value"]["evacuees"], 312);
    assert!(site["supplies"].is_null());
}

#[tokio::test]
async fn state_keeps_modes_apart_and_refuses_unknown_ones() {
    let app = app();
    app.live.write().unwrap().apply(&sample::status());
    let (status, body) = get_json(&app, "/api/v1/state?mode=exercise", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["sites"].as_array().unwrap().len(), 0);
    let (_, body) = get_json(&app, "/api/v1/state", None).await;
    assert_eq!(body["mode"], "actual");
    assert_eq!(body["sites"].as_array().unwrap().len(), 1);
    let (status, body) = get_json(&app, "/api/v1/state?mode=drill", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"].as_str().unwrap().contains("drill"));
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let app = app();
    app.metrics.rejected("malformed");
    let (status, headers, body) = get(&app, "/metrics", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = String::from_utf8(body).unwrap();
    assert!(text.contains("renkei_messages_rejected_total{reason=\"malformed\"} 1\n"));
}

#[tokio::test]
async fn serves_the_dashboard_with_index_fallback() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.html"), "<html>renkei</html>").unwrap();
    std::fs::write(dir.path().join("app.js"), "console.log(1)").unwrap();
    let app = app_in(dir.path());
    for (uri, body) in [
        ("/", "<html>renkei</html>"),
        ("/app.js", "console.log(1)"),
        // A deep link into the app's own routes.
        ("/ward/131041", "<html>renkei</html>"),
    ] {
        let (status, _, got) = get(&app, uri, None).await;
        assert_eq!(status, StatusCode::OK, "{uri}");
        assert_eq!(got, body.as_bytes(), "{uri}");
    }
}

#[tokio::test]
async fn without_a_built_dashboard_the_api_still_answers() {
    let app = app();
    let (status, _, _) = get(&app, "/", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _, _) = get(&app, "/healthz", None).await;
    assert_eq!(status, StatusCode::OK);
}
