//! The dashboard's wire pieces run inside Chromium (wasm32), where they run for real: MQTT
//! framing and the session on mqttbytes, and Renkei's postcard codec for what the page
//! publishes. Native unit tests cover the same logic; these catch what only wasm32 breaks
//! (word size, float formatting, allocation limits).
//!
//! Run with `wasm-bindgen-test-runner` (see the crate's Cargo.toml).

#![cfg(target_arch = "wasm32")]
// clippy's allow-unwrap-in-tests covers `#[test]` only, not `#[wasm_bindgen_test]`.
#![allow(clippy::unwrap_used)]

use bytes::BytesMut;
use mqttbytes::QoS;
use mqttbytes::v4::{
    self, ConnAck, ConnectReturnCode, Packet, Publish, SubAck, SubscribeReasonCode,
};
use renkei_dashboard::alerts::{HqSender, active_alerts, user_id};
use renkei_dashboard::history;
use renkei_dashboard::mqtt::Credentials;
use renkei_dashboard::mqtt::frames::{Frame, Splitter};
use renkei_dashboard::mqtt::session::{Output, Session};
use renkei_dashboard::perf::PerfLog;
use renkei_shared::{Body, Mode, Role, State, Topic, decode, encode, sample};
use wasm_bindgen_test::{wasm_bindgen_test, wasm_bindgen_test_configure};

wasm_bindgen_test_configure!(run_in_browser);

fn decode_packet(bytes: &[u8]) -> Packet {
    v4::read(&mut BytesMut::from(bytes), 1 << 20).expect("a whole packet")
}

#[wasm_bindgen_test]
fn frames_split_and_joined_across_websocket_messages() {
    let mut stream = Vec::new();
    for (i, payload) in [encode(&sample::status()), encode(&sample::shelter())]
        .into_iter()
        .enumerate()
    {
        let mut p = Publish::new(
            Topic::of(&sample::status()).unwrap().to_string(),
            QoS::AtLeastOnce,
            payload.unwrap(),
        );
        p.pkid = i as u16 + 1;
        let mut buf = BytesMut::new();
        p.write(&mut buf).unwrap();
        stream.extend_from_slice(&buf);
    }
    // Three WebSocket messages that cut both packets in the middle.
    let mut splitter = Splitter::new();
    let mut frames = Vec::new();
    for chunk in stream.chunks(stream.len() / 3 + 1) {
        splitter.push(chunk);
        while let Some(frame) = splitter.next_frame().unwrap() {
            frames.push(frame);
        }
    }
    assert_eq!(frames.len(), 2);
    for frame in frames {
        let Frame::Packet(Packet::Publish(p)) = frame else {
            panic!("not a publish: {frame:?}")
        };
        assert!(decode(&p.payload).is_ok());
    }
}

#[wasm_bindgen_test]
fn a_login_session_subscribes_then_publishes_an_ack() {
    let credentials = Credentials {
        user: "sato".into(),
        password: "pw".into(),
    };
    let (mut session, connect) = Session::open(
        "sato-dash-test",
        &["renkei/v1/#".to_owned()],
        Some(&credentials),
        0.0,
    )
    .unwrap();
    let Packet::Connect(c) = decode_packet(&connect) else {
        panic!("not a CONNECT")
    };
    assert_eq!(c.login.unwrap().username, "sato");

    let mut out = Vec::new();
    session
        .on_packet(
            Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false)),
            1.0,
            &mut out,
        )
        .unwrap();
    let [Output::Send(subscribe)] = &out[..] else {
        panic!("{out:?}")
    };
    let Packet::Subscribe(sub) = decode_packet(subscribe) else {
        panic!("not a SUBSCRIBE")
    };
    out.clear();
    session
        .on_packet(
            Packet::SubAck(SubAck::new(
                sub.pkid,
                vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)],
            )),
            2.0,
            &mut out,
        )
        .unwrap();
    assert_eq!(out, vec![Output::Subscribed]);

    let Body::Alert(alert) = sample::alert().body else {
        panic!("not an alert")
    };
    let mut sender = HqSender::new(user_id("sato"), Role::Hq, 0xdead_beef);
    let ack = sender.ack(alert.alert_id.clone(), Mode::Actual, sample::SENT_AT);
    let topic = Topic::of(&ack).unwrap().to_string();
    let bytes = session.publish(&topic, &encode(&ack).unwrap()).unwrap();
    let Packet::Publish(p) = decode_packet(&bytes) else {
        panic!("not a PUBLISH")
    };
    assert!(p.retain);
    assert_eq!(p.qos, QoS::AtLeastOnce);
    assert_eq!(p.topic, topic);
    let back = decode(&p.payload).unwrap();
    assert_eq!(back, ack);
    assert_eq!(back.header.boot, 0xdead_beef);

    // Applied like any other message, the ack shows under its alert.
    let mut state = State::new();
    state.apply(&sample::alert());
    state.apply(&back);
    let rows = active_alerts(state.world(Mode::Actual), sample::SENT_AT);
    assert_eq!(rows[0].acks[0].user.as_str(), "sato");
}

#[wasm_bindgen_test]
fn every_sample_message_round_trips_in_the_browser() {
    for env in sample::all() {
        let bytes = encode(&env).unwrap();
        assert_eq!(decode(&bytes).unwrap(), env);
    }
}

#[wasm_bindgen_test]
fn the_perf_summary_serialises_as_the_page_publishes_it() {
    let mut log = PerfLog::default();
    log.first_render(250.0);
    log.batch(4.0);
    log.batch(8.0);
    let json = serde_json::to_value(log.summary()).unwrap();
    assert_eq!(json["first_render_ms"], 250.0);
    assert_eq!(json["batches"], 2);
    assert_eq!(json["batch_p50_ms"], 4.0);
    assert_eq!(json["max_batch_ms"], 8.0);
}

#[wasm_bindgen_test]
fn a_history_answer_reads_and_lays_out_in_the_browser() {
    // The broker's JSON for two shelter reports and a drill, as the HTTP API sends it.
    let mut later = sample::shelter();
    later.header.seq += 1;
    later.header.sent_at = later.header.sent_at.plus_secs(600);
    let mut drill = sample::shelter();
    drill.header.mode = Mode::Exercise;
    let events: Vec<_> = [sample::shelter(), drill, later]
        .iter()
        .map(|e| serde_json::json!({ "received_at": 1, "envelope": e }))
        .collect();
    let body = serde_json::json!({ "site": { "ward": 131041, "site": "x" }, "events": events });
    let points = history::points(&body.to_string(), Mode::Actual).unwrap();
    assert_eq!(points.len(), 2);
    let chart = history::chart(&points).unwrap();
    assert_eq!(chart.plotted(), 2);
    assert_eq!(chart.x_ticks.first().unwrap().1, "09:00");
    assert_eq!(
        history::basic_auth("Aladdin", "open sesame"),
        "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
    );
}
