//! The HTTP API with the same users and roles as MQTT, its exports, and docs/openapi.yaml.

use renkei_shared::{Topic, sample};
use renkei_testkit::{
    BrokerProcess, MqttClient, PASSWORD, ROOT, eventually, http_get, http_get_as, metric, scrape,
};

fn openapi() -> serde_json::Value {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.yaml"))
            .unwrap();
    serde_norway::from_str(&text).unwrap()
}

/// A documented path with its parameters filled in.
fn concrete(path: &str) -> String {
    path.replace("{ward}", "131041")
        .replace("{site}", "nishi-shinjuku-es")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_needs_credentials_and_keeps_wards_apart() {
    // Without rules: the sample stock is low, and this test counts recorded messages exactly.
    let broker = BrokerProcess::start_with_users("[rules]\nenabled = false\n");
    let addrs = broker.addrs;
    let agent = MqttClient::connect_as(addrs.mqtt, "agent-nishi", PASSWORD).await;
    for env in [sample::status(), sample::shelter(), sample::supplies()] {
        agent.send(&env).await;
    }
    let mut shelter = sample::shelter();
    if let renkei_shared::Body::Shelter(s) = &mut shelter.body {
        s.evacuees = Some(400);
    }
    shelter.header.seq = 20;
    agent.send(&shelter).await;
    eventually("recorded", || async {
        let text = scrape(addrs.http, ROOT).await;
        (metric(&text, "renkei_recorder_messages_inserted_total") == Some(4)).then_some(())
    })
    .await;

    // Open: health, dashboard configuration, the dashboard itself.
    for open in ["/healthz", "/config.json", "/"] {
        assert_eq!(http_get(addrs.http, open).await.status, 200, "{open}");
    }
    // Everything else: 401 without credentials or with a wrong password, 403 for agents.
    let doc = openapi();
    let paths = doc["paths"].as_object().unwrap();
    // Wrong passwords go to two users in turn: each may fail `auth.max_failed_logins` (10)
    // times a minute before its own logins are refused for a while.
    let wrong_users = ["sato", "tanaka"];
    for (i, (path, item)) in paths.iter().enumerate() {
        if item["get"]["security"]
            .as_array()
            .is_some_and(Vec::is_empty)
        {
            continue;
        }
        let path = concrete(path);
        let anonymous = http_get(addrs.http, &path).await;
        assert_eq!(anonymous.status, 401, "{path}");
        assert!(
            anonymous
                .head
                .to_ascii_lowercase()
                .contains("www-authenticate: basic"),
            "{}",
            anonymous.head
        );
        let wrong_user = wrong_users[i % wrong_users.len()];
        let wrong = http_get_as(addrs.http, &path, Some((wrong_user, "wrong"))).await;
        assert_eq!(wrong.status, 401, "{path}");
        let agent = http_get_as(addrs.http, &path, Some(("agent-nishi", PASSWORD))).await;
        assert_eq!(agent.status, 403, "{path}");
    }

    // Each login learns who it is: what its dashboard subscribes to and signs acks with.
    let tanaka = Some(("tanaka", PASSWORD));
    let me = http_get_as(addrs.http, "/api/v1/whoami", tanaka)
        .await
        .json();
    assert_eq!(
        me,
        serde_json::json!({"user": "tanaka", "role": "ward", "ward": 131041})
    );
    let me = http_get_as(addrs.http, "/api/v1/whoami", Some(("sato", PASSWORD)))
        .await
        .json();
    assert_eq!(
        me,
        serde_json::json!({"user": "sato", "role": "hq", "ward": null})
    );

    // A ward operator sees its own ward only.
    let state = http_get_as(addrs.http, "/api/v1/state", tanaka)
        .await
        .json();
    assert_eq!(state["wards"].as_array().unwrap().len(), 1);
    assert_eq!(state["wards"][0]["ward"], 131041);
    assert_eq!(state["sites"][0]["shelter"]["value"]["evacuees"], 400);
    let other = http_get_as(
        addrs.http,
        "/api/v1/sites/131016/chiyoda-es/history",
        tanaka,
    )
    .await;
    assert_eq!(other.status, 403);

    // History, oldest first, by kind.
    let history = http_get_as(
        addrs.http,
        "/api/v1/sites/131041/nishi-shinjuku-es/history?kind=shelter&limit=500",
        Some(("dis", PASSWORD)),
    )
    .await
    .json();
    assert_eq!(history["site"]["ward"], 131041);
    assert_eq!(history["site"]["site"], "nishi-shinjuku-es");
    let events = history["events"].as_array().unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["envelope"]["body"]["shelter"]["evacuees"], 312);
    assert_eq!(events[1]["envelope"]["body"]["shelter"]["evacuees"], 400);
    assert!(events[0]["received_at"].as_i64().unwrap() > 0);
    let latest = http_get_as(
        addrs.http,
        "/api/v1/sites/131041/nishi-shinjuku-es/history?limit=1",
        tanaka,
    )
    .await
    .json();
    assert_eq!(latest["events"].as_array().unwrap().len(), 1);
    assert_eq!(latest["events"][0]["envelope"]["header"]["seq"], 20);
    let bad = http_get_as(
        addrs.http,
        "/api/v1/sites/131041/nishi-shinjuku-es/history?kind=weather",
        ROOT,
    )
    .await;
    assert_eq!(bad.status, 400);

    // Catching up: everything, then from the last id on.
    let all = http_get_as(addrs.http, "/api/v1/events?since=0&limit=3", ROOT)
        .await
        .json();
    assert_eq!(all["events"].as_array().unwrap().len(), 3);
    let next = all["next"].as_i64().unwrap();
    let rest = http_get_as(addrs.http, &format!("/api/v1/events?since={next}"), ROOT)
        .await
        .json();
    assert_eq!(rest["events"].as_array().unwrap().len(), 1);
    assert_eq!(
        rest["events"][0]["topic"],
        Topic::of(&shelter).unwrap().to_string()
    );

    // Exports.
    let csv = http_get_as(
        addrs.http,
        "/api/v1/export/sites.csv",
        Some(("sato", PASSWORD)),
    )
    .await;
    assert_eq!(csv.status, 200);
    assert!(
        csv.head
            .to_ascii_lowercase()
            .contains("content-type: text/csv")
    );
    let text = csv.text();
    assert!(text.starts_with("ward,ward_name,site,"), "{text}");
    assert!(text.contains("131041,Shinjuku,nishi-shinjuku-es,西新宿小学校,shelter,"));
    let geo = http_get_as(addrs.http, "/api/v1/export/sites.geojson", ROOT)
        .await
        .json();
    assert_eq!(geo["type"], "FeatureCollection");
    assert_eq!(geo["features"][0]["geometry"]["type"], "Point");
    let cap = http_get_as(addrs.http, "/api/v1/export/alerts.cap.xml", ROOT).await;
    assert_eq!(cap.status, 200);
    assert!(cap.text().starts_with("<?xml"));

    assert!(broker.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_documents_every_route_and_every_documented_path_answers() {
    let doc = openapi();
    assert_eq!(doc["openapi"], "3.0.3");
    let paths = doc["paths"].as_object().unwrap();
    for route in renkei_broker::http::ROUTES {
        assert!(
            paths.contains_key(route),
            "{route} is not in docs/openapi.yaml"
        );
    }
    assert_eq!(
        paths.len(),
        renkei_broker::http::ROUTES.len(),
        "no undocumented extras"
    );

    let broker = BrokerProcess::start_with_users("");
    for path in paths.keys() {
        let response = http_get_as(broker.addrs.http, &concrete(path), ROOT).await;
        assert_eq!(response.status, 200, "{path}: {}", response.text());
    }
    // The state answers every key its schema requires.
    let schema =
        &paths["/api/v1/state"]["get"]["responses"]["200"]["content"]["application/json"]["schema"];
    let state = http_get_as(broker.addrs.http, "/api/v1/state", ROOT)
        .await
        .json();
    for key in schema["required"].as_array().unwrap() {
        let key = key.as_str().unwrap();
        assert!(state.get(key).is_some(), "/api/v1/state lacks {key}");
    }
    assert!(
        schema["required"]
            .as_array()
            .unwrap()
            .contains(&"alerts".into())
    );
    assert!(broker.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_demo_mode_the_api_is_open() {
    let broker = BrokerProcess::start();
    let state = http_get(broker.addrs.http, "/api/v1/state").await;
    assert_eq!(state.status, 200);
    let events = http_get(broker.addrs.http, "/api/v1/events").await;
    assert_eq!(events.status, 200);
    assert!(broker.terminate().success());
}
