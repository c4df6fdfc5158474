//! The staff web form the daemon serves, over plain HTTP as a phone uses it: what it refuses,
//! and a saved report and request that reach HQ.

use std::net::SocketAddr;
use std::time::Duration;

use renkei_shared::{Body, ShelterState};
use renkei_testkit::{AgentProcess, HttpRequest, free_port};
use tokio::time::Instant;

use crate::hq::{WAIT, is_life, watched_broker};
use crate::site::write_config;

/// `GET path` from the form on `port`: (status code, body).
async fn get(port: u16, path: &str) -> (u16, String) {
    send(port, HttpRequest::get(path)).await
}

/// POSTs `form` to `path` as a browser on the page does: with the CSRF token of a freshly
/// loaded page and the form's own Origin. (status code, body).
async fn post(port: u16, path: &str, form: &str) -> (u16, String) {
    let (_, page) = get(port, "/").await;
    let marker = "name=\"csrf\" value=\"";
    let token = page
        .split_once(marker)
        .and_then(|(_, rest)| rest.split('"').next())
        .expect("a CSRF token in the page");
    let form = format!("{form}&csrf={token}");
    send(port, HttpRequest::post_form(path, &form)).await
}

async fn send(port: u16, request: HttpRequest) -> (u16, String) {
    let response = request
        .header("Origin", &format!("http://127.0.0.1:{port}"))
        .try_send(SocketAddr::from(([127, 0, 0, 1], port)), WAIT)
        .await
        .expect("an answer from the web form");
    (response.status, response.text())
}

#[tokio::test]
async fn the_web_form_saves_a_shelter_report_that_reaches_hq_and_refuses_bad_input() {
    let Some((broker, mut wire)) = watched_broker().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let form_port = free_port();
    let config = write_config(
        dir.path(),
        broker.port,
        &format!("form_listen = \"127.0.0.1:{form_port}\"\nform_pin = \"246810\""),
    );
    let agent = AgentProcess::start(&["run", "--config", config.to_str().unwrap()]);
    wire.next(&agent, "birth", |m| is_life(m, true)).await;
    let deadline = Instant::now() + WAIT;
    while std::net::TcpStream::connect(("127.0.0.1", form_port)).is_err() {
        assert!(Instant::now() < deadline, "no web form:\n{}", agent.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let (code, page) = get(form_port, "/").await;
    assert_eq!(code, 200, "{page}");
    assert_eq!(get(form_port, "/report/shelter").await.0, 200);
    for text in [
        "避難所状況 / Shelter status",
        "物資要請 / Supply request",
        "被害報告 / Incident",
        "接続中 / connected",
        "送信待ち / queue depth",
        "訓練 / EXERCISE",
        "暗証番号 / PIN",
    ] {
        assert!(page.contains(text), "{text} missing:\n{page}");
    }

    // Refused, each with its reason in both languages, and nothing stored.
    let (code, page) = post(form_port, "/report/shelter", "evacuees=321&pin=111111").await;
    assert_eq!(code, 403);
    assert!(
        page.contains("暗証番号が違います") && page.contains("wrong PIN"),
        "{page}"
    );
    let (code, page) = post(
        form_port,
        "/report/shelter",
        "evacuees=50&households=80&pin=246810",
    )
    .await;
    assert_eq!(code, 422);
    assert!(
        page.contains("入力が正しくありません / invalid input") && page.contains("--households"),
        "{page}"
    );
    // The form comes back filled in, so staff only fix the wrong field.
    assert!(
        page.contains(
            "name=\"evacuees\" type=\"number\" min=\"0\" inputmode=\"numeric\" value=\"50\""
        ) && page.contains("value=\"80\""),
        "{page}"
    );
    let (code, page) = post(form_port, "/report/shelter", "evacuees=abc&pin=246810").await;
    assert_eq!(code, 422);
    assert!(page.contains("abc") && page.contains("evacuees"), "{page}");
    let (code, page) = post(
        form_port,
        "/report/request",
        "item=water&quantity=0&note=%3Cscript%3E&pin=246810",
    )
    .await;
    assert_eq!(code, 422);
    assert!(
        page.contains("&lt;script&gt;") && !page.contains("<script>"),
        "{page}"
    );

    let (code, page) = post(
        form_port,
        "/report/shelter",
        "evacuees=321&capacity=400&state=open&households=100&elderly=5&pin=246810",
    )
    .await;
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("保存しました / saved (seq"), "{page}");
    assert!(page.contains("queue depth"), "{page}");
    // The first shelter report HQ sees is this one: none of the refused ones was stored.
    let shelter = wire
        .next(&agent, "the posted shelter report", |m| match &m.env.body {
            Body::Shelter(s) => Some(s.clone()),
            _ => None,
        })
        .await;
    assert_eq!(shelter.evacuees, Some(321));
    assert_eq!(shelter.capacity, Some(400));
    assert_eq!(shelter.households, Some(100));
    assert_eq!(shelter.care.elderly, Some(5));
    assert_eq!(shelter.state, ShelterState::Open);

    let (code, page) = post(
        form_port,
        "/report/request",
        "item=water&quantity=20&note=for+the+gym&pin=246810",
    )
    .await;
    assert_eq!(code, 200, "{page}");
    assert!(page.contains(", id req-"), "{page}");
    let request = wire
        .next(&agent, "the posted request", |m| match &m.env.body {
            Body::Request(r) => Some(r.clone()),
            _ => None,
        })
        .await;
    assert_eq!(
        (request.quantity, request.note.as_str()),
        (20, "for the gym")
    );
}
