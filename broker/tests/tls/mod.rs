//! MQTTS: certificates made by the test kit with rcgen, clients that trust (or do not trust) their CA:
//! rumqttc over rustls (ring) and Mosquitto's `mosquitto_sub --cafile`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use renkei_shared::{Topic, sample};
use renkei_testkit::{
    BrokerProcess, MqttClient, PASSWORD, Pki, ROOT, client_id_for, eventually, http_get_as,
    login_options, make_pki, metric, scrape, start_refused, with_users,
};
use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use tokio::net::TcpStream;

/// The `[mqtt]` lines that serve MQTTS with `pki`'s certificate (more `[mqtt]` keys may follow).
pub fn tls_config(pki: &Pki) -> String {
    format!(
        "[mqtt]\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
        pki.cert.display().to_string(),
        pki.key.display().to_string()
    )
}

/// rumqttc options for the MQTTS port, trusting only `ca`.
pub fn tls_options(port: u16, user: &str, ca: &Path) -> MqttOptions {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile_certs(ca) {
        roots.add(cert).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut options = MqttOptions::new(client_id_for(user), "localhost", port);
    options.set_credentials(user, PASSWORD);
    options.set_keep_alive(Duration::from_secs(5));
    options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
        Arc::new(config),
    )));
    options
}

fn rustls_pemfile_certs(path: &Path) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject as _;
    rustls::pki_types::CertificateDer::pem_file_iter(path)
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_publishes_over_mqtts_and_an_untrusting_client_is_refused() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = make_pki(pki_dir.path(), "renkei");
    let stranger = make_pki(pki_dir.path(), "stranger");
    let broker =
        BrokerProcess::start_in(with_users(&tls_config(&pki)), &["--mqtts", "127.0.0.1:0"]);
    let addrs = broker.addrs;
    let mqtts = addrs
        .mqtts
        .expect("the ready line names the MQTTS listener");
    assert_ne!(mqtts.port(), 0);

    // A connection that never starts its handshake must not hold up the others.
    let _idle = TcpStream::connect(mqtts).await.unwrap();

    let agent = MqttClient::try_connect(tls_options(mqtts.port(), "agent-nishi", &pki.ca))
        .await
        .expect("agent-nishi connects over TLS");
    let status = sample::status();
    agent.send(&status).await;
    eventually("the state to show the site", || async {
        let state = http_get_as(addrs.http, "/api/v1/state", ROOT).await.json();
        let sites = state["sites"].as_array()?.len();
        (sites == 1).then_some(())
    })
    .await;

    // The guard behind TLS is the same: a wrong password and a forbidden topic are refused.
    let mut wrong = tls_options(mqtts.port(), "agent-nishi", &pki.ca);
    wrong.set_credentials("agent-nishi", "wrong");
    assert!(MqttClient::try_connect(wrong).await.is_err());

    // A client that trusts another CA refuses the broker's certificate.
    let refused =
        MqttClient::try_connect(tls_options(mqtts.port(), "agent-nishi", &stranger.ca)).await;
    let Err(error) = refused else {
        panic!("a client that does not trust the CA connected")
    };
    assert!(
        error.to_lowercase().contains("certificate") || error.to_lowercase().contains("tls"),
        "{error}"
    );
    // The broker counts a failed handshake, and a refused login's connection going, a moment
    // after the client has given up.
    eventually(
        "one failed handshake, and only the agent's connection on the TLS listener (not the \
         idle one, not the refused login)",
        || async {
            let text = scrape(addrs.http, ROOT).await;
            (metric(&text, "renkei_tls_handshakes_failed_total").unwrap_or(0) >= 1
                && metric(&text, "renkei_mqtt_connections{listener=\"tls\"}") == Some(1))
            .then_some(())
        },
    )
    .await;

    // Mosquitto's client over TLS reads the retained JSON mirror as HQ.
    let mirror = Topic::of(&status).unwrap().json();
    let out = mosquitto_sub(mqtts.port(), &pki.ca, "sato", &mirror);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["header"]["seq"], status.header.seq);
    // …and refuses a server its CA file does not vouch for.
    let out = mosquitto_sub(mqtts.port(), &stranger.ca, "sato", &mirror);
    assert!(!out.status.success(), "mosquitto_sub trusting another CA");

    // The plain listener still serves alongside.
    let _plain = MqttClient::connect_as(addrs.mqtt, "sato", PASSWORD).await;
    assert!(broker.terminate().success());
}

fn mosquitto_sub(port: u16, ca: &Path, user: &str, topic: &str) -> std::process::Output {
    Command::new("timeout")
        .args(["10", "mosquitto_sub", "-h", "localhost", "-p"])
        .arg(port.to_string())
        .arg("--cafile")
        .arg(ca)
        .args(["-i", &format!("{user}-sub")])
        .args([
            "-u", user, "-P", PASSWORD, "-t", topic, "-C", "1", "-W", "5",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Runs `serve` with MQTTS and `config`: it must not start. Its stderr.
fn start_fails(config: &str) -> String {
    let listeners = ["--mqtt", "--ws", "--http", "--mqtts"].map(|flag| [flag, "127.0.0.1:0"]);
    start_refused(config, listeners.as_flattened())
}

#[test]
fn bad_certificate_files_stop_the_start_with_the_key_and_path() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path(), "renkei");
    let other = make_pki(dir.path(), "other");

    let missing = dir.path().join("missing.pem");
    let stderr = start_fails(&format!(
        "[mqtt]\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
        missing.display().to_string(),
        pki.key.display().to_string()
    ));
    assert!(stderr.contains("mqtt.tls_cert_file"), "{stderr}");
    assert!(stderr.contains("missing.pem"), "{stderr}");

    // A key that does not belong to the certificate.
    let stderr = start_fails(&format!(
        "[mqtt]\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
        pki.cert.display().to_string(),
        other.key.display().to_string()
    ));
    assert!(stderr.contains("mqtt.tls_key_file"), "{stderr}");
    assert!(stderr.contains("other-key.pem"), "{stderr}");

    // A certificate file that holds only a key.
    let stderr = start_fails(&format!(
        "[mqtt]\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
        pki.key.display().to_string(),
        pki.key.display().to_string()
    ));
    assert!(stderr.contains("mqtt.tls_cert_file"), "{stderr}");

    // --mqtts without a certificate.
    let stderr = start_fails("");
    assert!(stderr.contains("--mqtts"), "{stderr}");
}

/// The relay tells the guard each client's address, so failed logins over MQTTS are counted
/// per address: past the limit, that address is refused whatever the name and password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_logins_over_mqtts_lock_out_the_client_address() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = make_pki(pki_dir.path(), "renkei");
    let config = format!("max_failed_logins_per_address = 3\n{}", tls_config(&pki));
    let broker = BrokerProcess::start_in(with_users(&config), &["--mqtts", "127.0.0.1:0"]);
    let addrs = broker.addrs;
    let mqtts = addrs.mqtts.expect("an MQTTS listener").port();
    // Right before the guessing: the right password gets in.
    drop(
        MqttClient::try_connect(tls_options(mqtts, "sato", &pki.ca))
            .await
            .expect("sato connects"),
    );
    for (user, password) in [("nobody", PASSWORD), ("sato", "guess"), ("dis", "guess")] {
        let mut guess = tls_options(mqtts, user, &pki.ca);
        guess.set_credentials(user, password);
        assert!(MqttClient::try_connect(guess).await.is_err(), "{user}");
    }
    // 127.0.0.1 is now refused over MQTTS, even with the right password …
    assert!(
        MqttClient::try_connect(tls_options(mqtts, "sato", &pki.ca))
            .await
            .is_err()
    );
    // … and so is it on the plain listener: one count per address for every listener and for
    // HTTP alike, the API refuses it too.
    let plain = login_options(addrs.mqtt, "sato", "sato", PASSWORD);
    assert!(MqttClient::try_connect(plain).await.is_err());
    assert_eq!(http_get_as(addrs.http, "/metrics", ROOT).await.status, 401);
}
