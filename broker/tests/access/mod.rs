//! Authentication and topic access control, with real clients: rumqttc, Mosquitto's command
//! line clients and paho-mqtt (Python).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use renkei_shared::{Topic, encode, sample, topic};
use renkei_testkit::net::connect_from;
use renkei_testkit::{
    BrokerProcess, MqttClient, PASSWORD, PATIENCE, ROOT, client_id_for, eventually, http_get,
    metric, options, refusal, scrape,
};
use rumqttc::{ConnectReturnCode, QoS, SubscribeReasonCode};

/// How long a test waits to be sure something does *not* arrive.
const QUIET: Duration = Duration::from_millis(1500);

async fn metrics(broker: &BrokerProcess) -> String {
    scrape(broker.addrs.http, ROOT).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_and_wrong_passwords_are_refused_and_counted() {
    let broker = BrokerProcess::start_with_users("max_failed_logins = 3\n");
    let addrs = broker.addrs;
    let config = http_get(addrs.http, "/config.json").await.json();
    assert_eq!(config["auth_required"], true);

    // Each refusal is a CONNACK that says why (MQTT 3.1.1 §3.2.2.3).
    assert_eq!(
        refusal(options(addrs.mqtt, "anonymous")).await,
        Some(ConnectReturnCode::NotAuthorized),
        "anonymous refused without --demo"
    );
    let mut wrong = options(addrs.mqtt, &client_id_for("agent-nishi"));
    wrong.set_credentials("agent-nishi", "wrong");
    assert_eq!(
        refusal(wrong).await,
        Some(ConnectReturnCode::BadUserNamePassword)
    );
    let mut unknown = options(addrs.mqtt, "nobody");
    unknown.set_credentials("nobody", PASSWORD);
    assert_eq!(
        refusal(unknown).await,
        Some(ConnectReturnCode::BadUserNamePassword)
    );

    // The right password gets in.
    let _agent = MqttClient::connect_as(addrs.mqtt, "agent-nishi", PASSWORD).await;
    let text = metrics(&broker).await;
    assert_eq!(
        metric(&text, "renkei_logins_refused_total{reason=\"anonymous\"}"),
        Some(1)
    );
    assert_eq!(
        metric(
            &text,
            "renkei_logins_refused_total{reason=\"bad_password\"}"
        ),
        Some(1)
    );
    assert_eq!(
        metric(
            &text,
            "renkei_logins_refused_total{reason=\"unknown_user\"}"
        ),
        Some(1)
    );
    // agent-nishi over MQTT, root over HTTP (reading these metrics).
    assert_eq!(
        metric(&text, "renkei_logins_total{cache=\"miss\"}"),
        Some(2)
    );
    // Mosquitto's client is told the same.
    let out = Command::new("timeout")
        .args(["10", "mosquitto_sub", "-h", "127.0.0.1", "-p"])
        .arg(addrs.mqtt.port().to_string())
        .args([
            "-i",
            "sato-sub",
            "-u",
            "sato",
            "-P",
            "wrong",
            "-t",
            "renkei/v1/#",
            "-C",
            "1",
        ])
        .args(["-W", "3"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "mosquitto_sub with a wrong password");
    let said = String::from_utf8_lossy(&out.stderr).to_ascii_lowercase();
    assert!(said.contains("bad user name or password"), "{said}");

    let text = metrics(&broker).await;
    assert!(
        metric(
            &text,
            "renkei_logins_refused_total{reason=\"bad_password\"}"
        )
        .unwrap_or(0)
            >= 2,
        "{text}"
    );

    // Three failures lock a name out, even for the right password, unless it was verified
    // (and cached) before: the real agent keeps working while someone guesses.
    for _ in 0..3 {
        let mut guess = options(addrs.mqtt, "tanaka");
        guess.set_credentials("tanaka", "guess");
        assert!(MqttClient::try_connect(guess).await.is_err());
    }
    let mut right = options(addrs.mqtt, "tanaka");
    right.set_credentials("tanaka", PASSWORD);
    assert!(MqttClient::try_connect(right).await.is_err(), "locked out");
    let _again = MqttClient::connect_as(addrs.mqtt, "agent-nishi", PASSWORD).await;
    let text = metrics(&broker).await;
    assert!(metric(&text, "renkei_login_lockouts_total").unwrap_or(0) >= 1);
    assert!(metric(&text, "renkei_logins_refused_total{reason=\"locked_out\"}").unwrap_or(0) >= 1);
    // agent-nishi's second login, and root's later metrics reads.
    assert!(metric(&text, "renkei_logins_total{cache=\"hit\"}").unwrap_or(0) >= 2);
    assert!(broker.terminate().success());
}

/// Publishes `payload` with `mosquitto_pub` as `user`; returns whether it exited cleanly.
fn mosquitto_pub(port: u16, user: &str, topic: &str, payload: &Path, retain: bool) -> bool {
    let mut cmd = Command::new("timeout");
    cmd.args(["10", "mosquitto_pub", "-h", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .args(["-i", &client_id_for(user)])
        .args(["-u", user, "-P", PASSWORD, "-q", "1", "-t", topic, "-f"])
        .arg(payload);
    if retain {
        cmd.arg("-r");
    }
    cmd.stdin(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_site_publish_is_refused_never_delivered_nor_retained() {
    let broker = BrokerProcess::start_with_users("");
    let addrs = broker.addrs;
    let mut hq = MqttClient::connect_as(addrs.mqtt, "sato", PASSWORD).await;
    hq.subscribe(topic::ALL).await;

    // agent-nishi speaks for Chiyoda's school: refused at the broker's door.
    let mut forged = sample::status();
    forged.header.origin = renkei_shared::Origin::Site(renkei_shared::SiteRef {
        ward: renkei_shared::WardCode(131016),
        site: renkei_shared::Id::new("chiyoda-es").unwrap(),
    });
    let forged_topic = Topic::of(&forged).unwrap().to_string();
    let payload = broker.dir.path().join("forged.bin");
    std::fs::write(&payload, encode(&forged).unwrap()).unwrap();
    let _ = mosquitto_pub(
        addrs.mqtt.port(),
        "agent-nishi",
        &forged_topic,
        &payload,
        true,
    );
    // With rumqttc too: the connection is closed.
    let mut agent = MqttClient::connect_as(addrs.mqtt, "agent-nishi", PASSWORD).await;
    agent.send(&forged).await;
    assert!(agent.closed_within(PATIENCE).await, "disconnected");
    assert!(
        hq.publish_within(QUIET).await.is_none(),
        "nothing delivered"
    );

    // Chiyoda's own agent may; a new subscriber then sees only that, retained.
    let own = payload.with_file_name("own.bin");
    std::fs::write(&own, encode(&forged).unwrap()).unwrap();
    assert!(mosquitto_pub(
        addrs.mqtt.port(),
        "agent-chiyoda",
        &forged_topic,
        &own,
        true
    ));
    let delivered = hq.next_publish().await;
    assert_eq!(delivered.topic, forged_topic);
    let mut late = MqttClient::connect_as(addrs.mqtt, "root", PASSWORD).await;
    late.subscribe(topic::ALL).await;
    let retained = late.next_publish().await;
    assert!(retained.retain);
    assert!(
        late.publish_within(QUIET).await.is_none(),
        "one retained message only"
    );

    // And nothing was retained from the refused ones: a fresh broker-side view agrees.
    let text = metrics(&broker).await;
    assert!(
        metric(
            &text,
            "renkei_acl_refused_total{packet=\"publish\",reason=\"other_site\"}"
        )
        .unwrap_or(0)
            >= 1,
        "{text}"
    );
    assert_eq!(
        metric(&text, "renkei_messages_accepted_total{kind=\"status\"}"),
        Some(1)
    );
    assert!(broker.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_subscriptions_fail_and_receive_nothing() {
    let broker = BrokerProcess::start_with_users("");
    let addrs = broker.addrs;
    let mut ward = MqttClient::connect_as(addrs.mqtt, "tanaka", PASSWORD).await;
    assert_eq!(
        ward.subscribe_codes("renkei/v1/#").await,
        [SubscribeReasonCode::Failure]
    );
    assert_eq!(
        ward.subscribe_codes("renkei/v1/131016/#").await,
        [SubscribeReasonCode::Failure]
    );
    assert_eq!(
        ward.subscribe_codes("renkei/v1/131041/#").await,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let mut agent = MqttClient::connect_as(addrs.mqtt, "agent-nishi", PASSWORD).await;
    assert_eq!(
        agent.subscribe_codes("renkei/v1/hq/#").await,
        [SubscribeReasonCode::Failure]
    );
    assert_eq!(
        agent
            .subscribe_codes("renkei/v1/cmd/131041/nishi-shinjuku-es")
            .await,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );

    // Chiyoda's report does not reach Shinjuku's operator; Shinjuku's does.
    let chiyoda = MqttClient::connect_as(addrs.mqtt, "agent-chiyoda", PASSWORD).await;
    let mut report = sample::status();
    report.header.origin = renkei_shared::Origin::Site(renkei_shared::SiteRef {
        ward: renkei_shared::WardCode(131016),
        site: renkei_shared::Id::new("chiyoda-es").unwrap(),
    });
    chiyoda.send(&report).await;
    assert!(ward.publish_within(QUIET).await.is_none());
    agent.send(&sample::status()).await;
    let got = ward.next_publish().await;
    assert_eq!(got.topic, "renkei/v1/131041/nishi-shinjuku-es/status");

    let text = metrics(&broker).await;
    assert_eq!(
        metric(
            &text,
            "renkei_acl_refused_total{packet=\"subscribe\",reason=\"filter\"}"
        ),
        Some(3)
    );
    assert!(broker.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integrators_read_the_mirror_and_publish_nothing() {
    let broker = BrokerProcess::start_with_users("");
    let addrs = broker.addrs;
    let mut integrator = MqttClient::connect_as(addrs.mqtt, "dis", PASSWORD).await;
    integrator.subscribe(topic::ALL_JSON).await;
    let mut hq = MqttClient::connect_as(addrs.mqtt, "sato", PASSWORD).await;
    hq.subscribe(topic::HQ_FILTER).await;

    let alert = sample::alert();
    integrator.send(&alert).await;
    assert!(integrator.closed_within(PATIENCE).await, "disconnected");
    assert!(hq.publish_within(QUIET).await.is_none());

    // Nobody, not even an admin, publishes on the JSON mirror.
    let mut admin = MqttClient::connect_as(addrs.mqtt, "root", PASSWORD).await;
    admin
        .client
        .publish(
            "renkei/json/v1/131041/nishi-shinjuku-es/status",
            QoS::AtLeastOnce,
            true,
            "{}",
        )
        .await
        .unwrap();
    assert!(admin.closed_within(PATIENCE).await);

    // An agent whose last will names another site is refused at CONNECT.
    let mut will = options(addrs.mqtt, &client_id_for("agent-nishi"));
    will.set_credentials("agent-nishi", PASSWORD);
    will.set_last_will(rumqttc::LastWill::new(
        "renkei/v1/131016/chiyoda-es/life",
        encode(&sample::death()).unwrap(),
        QoS::AtLeastOnce,
        true,
    ));
    assert!(MqttClient::try_connect(will).await.is_err());

    // HQ may raise the alert; the integrator reads it on the mirror.
    let mut integrator = MqttClient::connect_as(addrs.mqtt, "dis", PASSWORD).await;
    integrator.subscribe(topic::ALL_JSON).await;
    hq.send(&alert).await;
    let mirrored = integrator.next_publish().await;
    assert_eq!(
        mirrored.topic,
        "renkei/json/v1/hq/alert/occ-131041-nishi-shinjuku-es"
    );
    let text = metrics(&broker).await;
    for series in [
        "renkei_acl_refused_total{packet=\"publish\",reason=\"read_only\"}",
        "renkei_acl_refused_total{packet=\"publish\",reason=\"json_mirror\"}",
        "renkei_acl_refused_total{packet=\"will\",reason=\"other_site\"}",
    ] {
        assert_eq!(metric(&text, series), Some(1), "{series}\n{text}");
    }
    assert!(broker.terminate().success());
}

/// Whether python3 can import paho-mqtt, after trying to install it if not.
fn paho_available() -> bool {
    let has_paho = || {
        Command::new("python3")
            .args(["-c", "import paho.mqtt.client"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has_paho() {
        let _ = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "paho-mqtt"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    has_paho()
}

/// paho-mqtt, the client most integrators script with: a refused filter is reported as 128,
/// and a forbidden publish ends the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paho_sees_refusals_as_an_mqtt_client_should() {
    if !paho_available() {
        eprintln!(
            "SKIPPED paho_sees_refusals_as_an_mqtt_client_should: python3 with paho-mqtt is not \
             available (pip install paho-mqtt)"
        );
        return;
    }
    let broker = BrokerProcess::start_with_users("");
    let addrs = broker.addrs;
    let script = r#"
import sys, time, threading
import paho.mqtt.client as mqtt
port, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3]
done = threading.Event()
granted = {}
def on_connect(c, u, flags, rc, props=None):
    print("connack", rc, flush=True)
    c.subscribe([("renkei/v1/#", 1), ("renkei/v1/131041/#", 1)])
def on_subscribe(c, u, mid, codes, props=None):
    print("suback", " ".join(str(int(getattr(x, "value", x))) for x in codes), flush=True)
    c.publish("renkei/v1/131016/chiyoda-es/status", b"\x01", qos=1)
def on_disconnect(c, u, *rest):
    print("disconnected", flush=True)
    done.set()
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user + "-paho")
c.username_pw_set(user, password)
c.on_connect, c.on_subscribe, c.on_disconnect = on_connect, on_subscribe, on_disconnect
c.connect("127.0.0.1", port, 10)
c.loop_start()
done.wait(10)
c.loop_stop()
"#;
    let out = Command::new("python3")
        .args([
            "-c",
            script,
            &addrs.mqtt.port().to_string(),
            "tanaka",
            PASSWORD,
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        ["connack Success", "suback 128 1", "disconnected"],
        "{stdout}"
    );
    eventually("the refused publish counted", || async {
        let text = metrics(&broker).await;
        (metric(
            &text,
            "renkei_acl_refused_total{packet=\"publish\",reason=\"role\"}",
        ) == Some(1))
        .then_some(())
    })
    .await;
    assert!(broker.terminate().success());
}

/// Logs in over raw TCP after `header` (a PROXY protocol line, if any): whether the broker
/// answered CONNACK "accepted".
async fn login_after(
    addr: std::net::SocketAddr,
    header: Option<&str>,
    user: &str,
    password: &str,
) -> bool {
    login_from(addr, None, header, user, password).await
}

/// As [`login_after`], from `source` (any 127.x.y.z is this machine's loopback too).
async fn login_from(
    addr: std::net::SocketAddr,
    source: Option<std::net::IpAddr>,
    header: Option<&str>,
    user: &str,
    password: &str,
) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = match source {
        Some(ip) => connect_from(ip, addr).await.unwrap(),
        None => tokio::net::TcpStream::connect(addr).await.unwrap(),
    };
    if let Some(header) = header {
        stream.write_all(header.as_bytes()).await.unwrap();
    }
    let connect = renkei_broker::mqtt::probe::connect_packet(user, password);
    stream.write_all(&connect).await.unwrap();
    let mut connack = [0u8; 4];
    matches!(
        tokio::time::timeout(PATIENCE, stream.read_exact(&mut connack)).await,
        Ok(Ok(_))
    ) && connack == [0x20, 0x02, 0x00, 0x00]
}

/// Behind a load balancer that sends PROXY protocol headers (`mqtt.proxy_protocol`), failed
/// logins count against the client address it names; connections without a header are
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_proxy_failed_logins_lock_out_the_client_address() {
    let broker = BrokerProcess::start_with_users(
        "max_failed_logins_per_address = 3\n[mqtt]\nproxy_protocol = true\n",
    );
    let tcp = broker.addrs.mqtt;
    let from = |ip: &str| format!("PROXY TCP4 {ip} 127.0.0.1 40000 {}\r\n", tcp.port());
    let (guesser, other) = (from("203.0.113.7"), from("203.0.113.8"));
    assert!(login_after(tcp, Some(&guesser), "sato", PASSWORD).await);
    assert!(
        !login_after(tcp, None, "sato", PASSWORD).await,
        "a connection without a PROXY header is refused"
    );
    for (user, password) in [("nobody", "x"), ("sato", "guess"), ("tanaka", "guess")] {
        assert!(!login_after(tcp, Some(&guesser), user, password).await);
    }
    assert!(
        !login_after(tcp, Some(&guesser), "sato", PASSWORD).await,
        "the guessing address is locked out"
    );
    assert!(login_after(tcp, Some(&other), "sato", PASSWORD).await);
    // PROXY UNKNOWN (a health check, say): the address is not known, so only names count.
    assert!(login_after(tcp, Some("PROXY UNKNOWN\r\n"), "sato", PASSWORD).await);
    let text = metrics(&broker).await;
    for (reason, n) in [("address_locked_out", 1), ("bad_proxy_header", 1)] {
        assert_eq!(
            metric(
                &text,
                &format!("renkei_logins_refused_total{{reason=\"{reason}\"}}")
            ),
            Some(n),
            "{reason}: {text}"
        );
    }
}

/// Without a proxy in front, failed logins count against the address the TCP or WebSocket
/// listener accepted the connection from: a guesser trying many names is locked out on both
/// listeners, and other addresses are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_failed_logins_lock_out_the_client_address_on_tcp_and_websocket() {
    let broker = BrokerProcess::start_with_users("max_failed_logins_per_address = 3\n");
    let tcp = broker.addrs.mqtt;
    let ip = |s: &str| Some(s.parse::<std::net::IpAddr>().unwrap());
    let (guesser, other) = (ip("127.0.0.7"), ip("127.0.0.8"));
    assert!(login_from(tcp, guesser, None, "sato", PASSWORD).await);
    for (user, password) in [("nobody", "x"), ("sato", "guess"), ("tanaka", "guess")] {
        assert!(!login_from(tcp, guesser, None, user, password).await);
    }
    assert!(
        !login_from(tcp, guesser, None, "sato", PASSWORD).await,
        "the guessing address is locked out"
    );
    assert!(login_from(tcp, other, None, "sato", PASSWORD).await);

    // The WebSocket listener, with paho-mqtt: the same book of failures per address.
    let ws = broker.addrs.ws.expect("a WebSocket listener");
    let script = r#"
import sys, threading
import paho.mqtt.client as mqtt
port, source, user, password = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
done = threading.Event()
def on_connect(c, u, flags, rc, props=None):
    print("connack", rc, flush=True)
    done.set()
def on_disconnect(c, u, *rest):
    done.set()
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=user + "-paho-ws", transport="websockets")
c.username_pw_set(user, password)
c.on_connect, c.on_disconnect = on_connect, on_disconnect
try:
    c.connect("127.0.0.1", port, 10, bind_address=source)
except Exception as e:
    print("refused", e, flush=True)
    sys.exit(0)
c.loop_start()
done.wait(10)
c.loop_stop()
"#;
    let ws_login = |source: &str, user: &str, password: &str| {
        let out = Command::new("python3")
            .args(["-c", script, &ws.port().to_string(), source, user, password])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout.trim() == "connack Success"
    };
    let has_paho = paho_available();
    if has_paho {
        assert!(ws_login("127.0.0.9", "sato", PASSWORD));
        for (user, password) in [("nobody", "x"), ("sato", "guess"), ("tanaka", "guess")] {
            assert!(!ws_login("127.0.0.9", user, password));
        }
        assert!(
            !ws_login("127.0.0.9", "sato", PASSWORD),
            "the guessing address is locked out over WebSocket too"
        );
        assert!(ws_login("127.0.0.10", "sato", PASSWORD));
    } else {
        eprintln!("SKIPPED the WebSocket half: python3 with paho-mqtt is not available");
    }
    let text = metrics(&broker).await;
    assert_eq!(
        metric(
            &text,
            "renkei_logins_refused_total{reason=\"address_locked_out\"}"
        ),
        Some(if has_paho { 2 } else { 1 }),
        "{text}"
    );
}

/// An acknowledgement names who sent it: a login may only sign its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_in_another_users_name_or_role_are_refused() {
    let broker = BrokerProcess::start_with_users("");
    let addrs = broker.addrs;
    let mut reader = MqttClient::connect_as(addrs.mqtt, "root", PASSWORD).await;
    reader.subscribe(topic::HQ_FILTER).await;

    let ack_as = |user: &str, role: renkei_shared::Role| {
        let mut ack = sample::ack();
        if let renkei_shared::Body::Ack(a) = &mut ack.body {
            a.by.user = renkei_shared::Id::new(user).unwrap();
            a.by.role = role;
            a.target = renkei_shared::AckTarget::Request {
                site: sample::site(),
                request_id: renkei_shared::Id::new("r-1").unwrap(),
            };
        }
        ack
    };
    use renkei_shared::Role;
    // sato (hq) signs as tanaka; tanaka (ward) signs as hq; both are cut off, nothing passes.
    for (login, forged) in [
        ("sato", ack_as("tanaka", Role::Ward)),
        ("tanaka", ack_as("tanaka", Role::Hq)),
    ] {
        let mut client = MqttClient::connect_as(addrs.mqtt, login, PASSWORD).await;
        client.send(&forged).await;
        assert!(client.closed_within(PATIENCE).await, "{login}'s forged ack");
    }
    assert!(reader.publish_within(QUIET).await.is_none());
    // Signed as itself, it passes.
    let honest = MqttClient::connect_as(addrs.mqtt, "tanaka", PASSWORD).await;
    let own = ack_as("tanaka", Role::Ward);
    honest.send(&own).await;
    let got = reader.next_publish().await;
    assert_eq!(got.topic, Topic::of(&own).unwrap().to_string());

    // A ward operator reads HQ's steps on its own ward's requests, not on others'.
    let mut ward = MqttClient::connect_as(addrs.mqtt, "tanaka", PASSWORD).await;
    for (filter, ok) in [
        ("renkei/v1/hq/#", false),
        ("renkei/v1/hq/ack/request/131016/#", false),
        ("renkei/v1/hq/ack/request/131041/#", true),
        ("renkei/v1/hq/alert/#", true),
    ] {
        let code = ward.subscribe_codes(filter).await;
        assert_eq!(
            code[0] != SubscribeReasonCode::Failure,
            ok,
            "{filter}: {code:?}"
        );
    }
    let text = metrics(&broker).await;
    for reason in ["ack_other_user", "ack_other_role"] {
        assert_eq!(
            metric(
                &text,
                &format!("renkei_acl_refused_total{{packet=\"publish\",reason=\"{reason}\"}}")
            ),
            Some(1),
            "{reason}"
        );
    }
}
