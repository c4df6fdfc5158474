//! No accept loop can be held by one peer: hundreds of sockets that connect and never send a
//! byte, on every MQTT listener at once, while a dashboard (WebSocket), an agent (TCP) and an
//! agent behind TLS (MQTTS) log in.
//!
//! Each listener's accept loop must only accept; everything that waits for the peer (the TLS
//! handshake, the WebSocket upgrade, a PROXY header, the CONNECT and its login check) runs in
//! the connection's own task under `mqtt.connect_timeout` (rumqttd patch 8 in
//! `vendor/rumqttd/VENDORED.md`, and the MQTTS relay in `broker/src/mqtt/tls.rs`). Were any of
//! it awaited on the accept loop, the loop would sit on the first idle socket of its listener
//! for the whole connect timeout (30 s here, and with no bound at all upstream for the upgrade
//! and the TLS hello), the other idle sockets would wait unaccepted behind it, and so would
//! the login that came after them: its socket connects (the kernel queues it), but no upgrade
//! answer, TLS hello or CONNACK comes, and the test fails at the one-second bound. Only the
//! TCP listener already read its CONNECT off the loop upstream; the WebSocket and MQTTS parts
//! are the ones a regression would break.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use renkei_testkit::mqtt::websocket_upgrade;
use renkei_testkit::{BrokerProcess, MqttClient, PASSWORD, make_pki, with_users};
use rumqttc::mqttbytes::v4::{Connect, Packet};
use rumqttc::{ConnAck, ConnectReturnCode};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Idle sockets opened on each listener.
const IDLE: usize = 200;
/// The longest a login may wait for its CONNACK.
const CONNACK_WITHIN: Duration = Duration::from_secs(1);
/// How long a login is waited for before the test gives up on it (well past the bound, so
/// that a failure says how late it was, and well short of the connect timeout).
const GIVE_UP: Duration = Duration::from_secs(5);

/// The connect timeout of this test's broker: longer than the test, so that the broker holds
/// every idle socket for its whole run and none is closed before the logins are done.
const CONFIG_MQTT: &str = "connect_timeout = \"30s\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_on_every_listener_hold_up_no_login() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = make_pki(pki_dir.path(), "renkei");
    let config = format!("{}{CONFIG_MQTT}", crate::tls::tls_config(&pki));
    let broker = BrokerProcess::start_in(with_users(&config), &["--mqtts", "127.0.0.1:0"]);
    let addrs = broker.addrs;
    let ws = addrs.ws.expect("a WebSocket listener");
    let mqtts = addrs.mqtts.expect("an MQTTS listener");
    let before = broker.open_fds();

    let mut idle = Vec::with_capacity(3 * IDLE);
    for listener in [addrs.mqtt, ws, mqtts] {
        for _ in 0..IDLE {
            idle.push(TcpStream::connect(listener).await.unwrap());
        }
    }
    // The logins come after every idle socket, in the order the kernel queued them. The broker
    // gets a short while to take the idle ones, not more: a listener stuck on its first idle
    // socket never takes the others, and the logins below then say so with their times.
    let settle = Instant::now() + Duration::from_secs(2);
    while broker.open_fds() < before + idle.len() && Instant::now() < settle {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (dashboard, dashboard_took) = timed(websocket_login(ws, "sato", "sato-dash")).await;
    let dashboard = dashboard
        .unwrap_or_else(|| panic!("no CONNACK for sato over WebSocket within {GIVE_UP:?}"));
    let (agent, agent_took) =
        timed(MqttClient::connect_as(addrs.mqtt, "agent-nishi", PASSWORD)).await;
    let agent =
        agent.unwrap_or_else(|| panic!("no CONNACK for agent-nishi over TCP within {GIVE_UP:?}"));
    let (tls_agent, tls_took) = timed(async {
        MqttClient::try_connect(crate::tls::tls_options(
            mqtts.port(),
            "agent-chiyoda",
            &pki.ca,
        ))
        .await
        .unwrap()
    })
    .await;
    let tls_agent = tls_agent
        .unwrap_or_else(|| panic!("no CONNACK for agent-chiyoda over MQTTS within {GIVE_UP:?}"));
    eprintln!(
        "with {IDLE} idle sockets on each listener: CONNACK over WebSocket in {dashboard_took:?}, \
         TCP {agent_took:?}, MQTTS {tls_took:?}"
    );
    assert!(
        dashboard_took < CONNACK_WITHIN && agent_took < CONNACK_WITHIN && tls_took < CONNACK_WITHIN,
        "with {IDLE} idle sockets on each listener, CONNACK took {dashboard_took:?} over \
         WebSocket, {agent_took:?} over TCP and {tls_took:?} over MQTTS (limit {CONNACK_WITHIN:?})"
    );

    // The idle sockets were all accepted and are still held: the logins went past them, not
    // around a broker that had dropped them.
    assert!(
        broker.open_fds() >= before + idle.len(),
        "the broker holds {} descriptors, {} before the idle sockets",
        broker.open_fds(),
        before
    );
    let mut buf = [0u8; 1];
    for (i, socket) in idle.iter().enumerate() {
        match socket.try_read(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("idle socket {i} no longer idle: {other:?}"),
        }
    }

    drop((dashboard, agent, tls_agent, idle));
    assert!(broker.terminate().success());
}

/// Runs `login` for at most [`GIVE_UP`]; what it returned (`None` if it did not finish) and
/// how long it took.
async fn timed<T>(login: impl Future<Output = T>) -> (Option<T>, Duration) {
    let started = Instant::now();
    let result = tokio::time::timeout(GIVE_UP, login).await.ok();
    (result, started.elapsed())
}

/// Logs in as the dashboard does: a WebSocket upgrade with the subprotocol `mqtt`, then an MQTT
/// 3.1.1 CONNECT in a binary frame; returns the open socket once the CONNACK accepted it.
async fn websocket_login(addr: std::net::SocketAddr, user: &str, client_id: &str) -> TcpStream {
    let (mut stream, head) = websocket_upgrade(addr).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");

    let mut connect = Connect::new(client_id);
    connect.keep_alive = 30;
    connect.set_login(user, PASSWORD);
    let mut packet = BytesMut::new();
    connect.write(&mut packet).unwrap();
    stream.write_all(&client_frame(&packet)).await.unwrap();

    let mut frame_head = [0u8; 2];
    stream.read_exact(&mut frame_head).await.unwrap();
    assert_eq!(frame_head[0], 0x82, "a final binary frame");
    let mut payload = vec![0u8; usize::from(frame_head[1] & 0x7f)];
    stream.read_exact(&mut payload).await.unwrap();
    match Packet::read(&mut BytesMut::from(&payload[..]), 1024).unwrap() {
        Packet::ConnAck(ConnAck {
            code: ConnectReturnCode::Success,
            ..
        }) => stream,
        other => panic!("{user} over WebSocket: {other:?}"),
    }
}

/// A final binary frame from a client (masked, as RFC 6455 requires of clients; the zero key
/// leaves the bytes as they are). Logins fit the 7-bit length.
fn client_frame(payload: &[u8]) -> Vec<u8> {
    let len = u8::try_from(payload.len())
        .ok()
        .filter(|len| *len < 126)
        .expect("a short login");
    let mut frame = vec![0x82, 0x80 | len, 0, 0, 0, 0];
    frame.extend_from_slice(payload);
    frame
}
