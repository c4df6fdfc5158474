//! Sessions and what one login may cost, attacked with real MQTT clients: a login taking
//! another client's id (to steal its commands, plant a subscription in its saved session or
//! kick it and fire its will), and one login holding too many sessions, filters or items.

use std::time::{Duration, Instant};

use renkei_broker::mqtt::probe;
use renkei_shared::{Envelope, Topic, encode, sample, topic};
use renkei_testkit::net::connect_from;
use renkei_testkit::{
    BrokerProcess, MqttClient, PASSWORD, PATIENCE, ROOT, client_id_for, eventually, login_options,
    metric, refusal, scrape,
};
use rumqttc::{ConnectReturnCode, MqttOptions, QoS, SubscribeReasonCode};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// How long a test waits to be sure something does *not* arrive.
const QUIET: Duration = Duration::from_millis(1500);

/// The nishi-shinjuku-es agent's own client id.
const NISHI: &str = "agent-131041-nishi-shinjuku-es";

fn login(client_id: &str, user: &str, addrs: &renkei_broker::Addrs) -> MqttOptions {
    login_options(addrs.mqtt, client_id, user, PASSWORD)
}

fn persistent(mut o: MqttOptions) -> MqttOptions {
    o.set_clean_session(false);
    o
}

async fn metrics(broker: &BrokerProcess) -> String {
    scrape(broker.addrs.http, ROOT).await
}

/// The sample command, addressed to the sample site (nishi-shinjuku-es).
fn command_to_nishi() -> Envelope {
    sample::command()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_login_cannot_take_a_sites_session_or_its_commands() {
    let broker = BrokerProcess::start_with_users("");
    let addrs = broker.addrs;
    // The real agent keeps a persistent session with its command subscription, then drops off.
    {
        let mut nishi = MqttClient::try_connect(persistent(login(NISHI, "agent-nishi", &addrs)))
            .await
            .unwrap();
        let cmd = topic::command_filter(&sample::site());
        assert_eq!(
            nishi.subscribe_codes(&cmd).await,
            vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
        );
        nishi.client.disconnect().await.unwrap();
    }

    // Steal: another site's agent, with its own valid password, asks for nishi's session.
    assert_eq!(
        refusal(persistent(login(NISHI, "agent-chiyoda", &addrs))).await,
        Some(ConnectReturnCode::BadClientId)
    );
    // Plant: a reader asks for it to add the whole tree to it.
    assert_eq!(
        refusal(persistent(login(NISHI, "dis", &addrs))).await,
        Some(ConnectReturnCode::BadClientId)
    );
    // Nor may anyone use an id shaped like an agent's, or another user's name.
    for (id, user) in [
        ("agent-131041-some-other-es", "sato"),
        ("sato", "dis"),
        ("sato-dash", "tanaka"),
        ("agent-nishi", "agent-nishi"),
    ] {
        assert_eq!(
            refusal(login(id, user, &addrs)).await,
            Some(ConnectReturnCode::BadClientId),
            "{user} as {id}"
        );
    }

    // A command sent while nishi is away reaches nishi, and only nishi.
    let hq = MqttClient::connect_as(addrs.mqtt, "sato", PASSWORD).await;
    let cmd = command_to_nishi();
    hq.client
        .publish(
            Topic::of(&cmd).unwrap().to_string(),
            QoS::AtLeastOnce,
            false,
            encode(&cmd).unwrap(),
        )
        .await
        .unwrap();
    let mut nishi = MqttClient::try_connect(persistent(login(NISHI, "agent-nishi", &addrs)))
        .await
        .unwrap();
    let got = nishi
        .publish_within(PATIENCE)
        .await
        .expect("the command kept in nishi's session");
    assert_eq!(got.payload.as_ref(), encode(&cmd).unwrap().as_slice());
    // The planted subscription would have brought the tree: nothing else arrives.
    assert!(nishi.publish_within(QUIET).await.is_none());

    let text = metrics(&broker).await;
    assert!(
        metric(
            &text,
            "renkei_logins_refused_total{reason=\"client_id_not_yours\"}"
        )
        .unwrap_or(0)
            >= 6,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_impostor_neither_kicks_the_site_nor_fires_its_will() {
    let broker = BrokerProcess::start_with_users("");
    let addrs = broker.addrs;
    let mut hq = MqttClient::connect_as(addrs.mqtt, "sato", PASSWORD).await;
    let life = Topic::of(&sample::death()).unwrap().to_string();
    hq.subscribe_codes(&life).await;

    let death = sample::death();
    let mut nishi = login(NISHI, "agent-nishi", &addrs);
    nishi.set_last_will(rumqttc::LastWill::new(
        Topic::of(&death).unwrap().to_string(),
        encode(&death).unwrap(),
        QoS::AtLeastOnce,
        true,
    ));
    let mut nishi = MqttClient::try_connect(nishi).await.unwrap();

    // Clean or persistent, an impostor with the site's id is refused before the router.
    for clean in [true, false] {
        let mut o = login(NISHI, "agent-chiyoda", &addrs);
        o.set_clean_session(clean);
        assert_eq!(refusal(o).await, Some(ConnectReturnCode::BadClientId));
    }
    assert!(!nishi.closed_within(QUIET).await, "the real agent stays");
    assert!(
        hq.publish_within(QUIET).await.is_none(),
        "no will fired for a site that never left"
    );
    // Its own reconnect still replaces it, as MQTT says.
    let _again = MqttClient::connect_as(addrs.mqtt, "agent-nishi", PASSWORD).await;
    assert!(nishi.closed_within(PATIENCE).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_login_holds_a_bounded_number_of_sessions_filters_and_items() {
    let broker = BrokerProcess::start_with_users(
        "[mqtt]\nmax_connections_per_user = 3\nmax_filters_per_connection = 4\n\
         max_filters_per_user = 6\nmax_items_per_site = 2\n",
    );
    let addrs = broker.addrs;

    // Sessions: three ids of one integrator at once, not four; a persistent one counts while
    // its client is away.
    let mut kept = Vec::new();
    for id in ["dis", "dis-2"] {
        kept.push(
            MqttClient::try_connect(login(id, "dis", &addrs))
                .await
                .unwrap(),
        );
    }
    let away = MqttClient::try_connect(persistent(login("dis-away", "dis", &addrs)))
        .await
        .unwrap();
    away.client.disconnect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        refusal(login("dis-4", "dis", &addrs)).await,
        Some(ConnectReturnCode::ServiceUnavailable)
    );
    // Another user is not affected.
    let _sato = MqttClient::connect_as(addrs.mqtt, "sato", PASSWORD).await;

    // Filters: four per session, six per user.
    let filters: Vec<String> = (0..5)
        .map(|i| format!("renkei/json/v1/{}/#", renkei_shared::WARDS[i].code))
        .collect();
    let mut codes = Vec::new();
    for f in &filters {
        codes.extend(kept[0].subscribe_codes(f).await);
    }
    let ok = SubscribeReasonCode::Success(QoS::AtLeastOnce);
    assert_eq!(codes[..4], [ok, ok, ok, ok]);
    assert_eq!(codes[4], SubscribeReasonCode::Failure);
    let mut codes = Vec::new();
    for f in &filters[..3] {
        codes.extend(kept[1].subscribe_codes(f).await);
    }
    assert_eq!(codes, [ok, ok, SubscribeReasonCode::Failure]);
    // Unsubscribing gives one back.
    kept[0].client.unsubscribe(&filters[0]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(kept[1].subscribe_codes(&filters[2]).await, [ok]);

    // Items: a site's third request id is neither forwarded, retained nor recorded, and the
    // agent stays connected (it keeps the report, since no receipt names it).
    let mut reader = MqttClient::connect_as(addrs.mqtt, "sato", PASSWORD).await;
    reader
        .subscribe_codes(&topic::site_filter(&sample::site()))
        .await;
    let mut agent = MqttClient::connect_as(addrs.mqtt, "agent-nishi", PASSWORD).await;
    let mut sent = Vec::new();
    for (seq, id) in [(1u64, "r-1"), (2, "r-2"), (3, "r-3")] {
        let mut env = sample::request();
        env.header.seq = seq;
        if let renkei_shared::Body::Request(r) = &mut env.body {
            r.request_id = renkei_shared::Id::new(id).unwrap();
        }
        agent.send(&env).await;
        sent.push(env);
    }
    for env in &sent[..2] {
        let got = reader.publish_within(PATIENCE).await.unwrap();
        assert_eq!(got.topic, Topic::of(env).unwrap().to_string());
    }
    assert!(reader.publish_within(QUIET).await.is_none());
    assert!(!agent.closed_within(Duration::from_millis(200)).await);
    let text = eventually("refusals counted", || async {
        let text = metrics(&broker).await;
        let subscribe = metric(
            &text,
            "renkei_acl_refused_total{packet=\"subscribe\",reason=\"filters_per_connection\"}",
        );
        let items = metric(
            &text,
            "renkei_acl_refused_total{packet=\"publish\",reason=\"items_per_site\"}",
        );
        (subscribe == Some(1) && items == Some(1)).then_some(text)
    })
    .await;
    assert_eq!(
        metric(
            &text,
            "renkei_acl_refused_total{packet=\"subscribe\",reason=\"filters_per_user\"}"
        ),
        Some(1),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "renkei_logins_refused_total{reason=\"too_many_connections\"}"
        ),
        Some(1)
    );
    let log = broker.log();
    assert_eq!(
        log.matches("over a per-login bound").count(),
        3,
        "once per connection: {log}"
    );
    drop(away);
}

/// One CONNECT over raw TCP from `local` (any 127/8 address); the CONNACK's return code, or
/// `None` if the broker closed without one.
async fn raw_connect(broker: std::net::SocketAddr, local: [u8; 4], packet: &[u8]) -> Option<u8> {
    let mut stream = connect_from(local.into(), broker).await.ok()?;
    stream.write_all(packet).await.ok()?;
    let mut ack = [0u8; 4];
    match tokio::time::timeout(Duration::from_secs(30), stream.read_exact(&mut ack)).await {
        Ok(Ok(_)) if ack[0] == 0x20 => Some(ack[3]),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_wrong_passwords_for_one_user_costs_few_checks_and_shuts_no_one_out() {
    let broker = BrokerProcess::start_with_users("max_failed_logins = 5\nverify_queue = 32\n");
    let addrs = broker.addrs;
    let wrong = probe::connect_packet("dis", "wrong password");
    let flood: Vec<_> = (0..2_000u32)
        .map(|i| {
            let packet = wrong.clone();
            // From many loopback addresses, so the per-address lockout does not end it early.
            let local = [127, 1, (i / 200) as u8, (i % 200 + 1) as u8];
            tokio::spawn(async move { raw_connect(addrs.mqtt, local, &packet).await })
        })
        .collect();
    // Meanwhile another user logs in from elsewhere, and not slowly.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let right = probe::connect_packet("sato", PASSWORD);
    let started = Instant::now();
    let code = raw_connect(addrs.mqtt, [127, 0, 0, 2], &right).await;
    let took = started.elapsed();
    assert_eq!(code, Some(0), "sato's login");
    assert!(took < Duration::from_secs(2), "sato waited {took:?}");

    let mut codes = std::collections::BTreeMap::new();
    for f in flood {
        *codes.entry(f.await.unwrap()).or_insert(0u32) += 1;
    }
    assert!(!codes.contains_key(&Some(0)), "{codes:?}");
    let text = metrics(&broker).await;
    // sato's check, root's for /metrics, and at most five for dis.
    let checks = metric(&text, "renkei_password_checks_total").unwrap();
    assert!(checks <= 5 + 2, "{checks} checks: {codes:?}");
}

/// MQTT 3.1.1 §3.1.2.10: keep alive 0 turns the keep-alive mechanism off. Embedded clients and
/// the Eclipse Paho test client use it; the broker accepts it and never times such a client
/// out for silence (a dead peer is still found by TCP keep-alive).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_keep_alive_zero_is_accepted_and_kept() {
    let broker = BrokerProcess::start_with_users("");
    let mut o = login(&client_id_for("tanaka"), "tanaka", &broker.addrs);
    o.set_keep_alive(Duration::ZERO);
    let mut client = MqttClient::try_connect(o)
        .await
        .expect("a CONNACK for keep alive 0");
    // Silent (no PINGREQ is ever sent) for longer than any timeout a keep alive would set:
    // rumqttd's default for a client is 1.5 × its keep alive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        client.subscribe_codes("renkei/v1/131041/#").await,
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    assert!(broker.terminate().success());
}
