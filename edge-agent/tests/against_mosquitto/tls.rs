//! `mqtts://` against Mosquitto's TLS listener, with certificates made by the test kit: the
//! broker's CA, another CA, and none.

use std::time::Duration;

use renkei_shared::{Body, Origin};
use renkei_testkit::mosquitto::MOSQUITTO;
use renkei_testkit::{AgentProcess, Mosquitto, Pki, make_pki};
use tokio::time::Instant;

use crate::hq::{WAIT, Watch, is_life};
use crate::site::{run_args, site};

/// A Mosquitto with a plain listener (for the test's subscriber) and a TLS one serving `pki`,
/// and the TLS listener's port.
fn tls_broker(pki: &Pki) -> Option<(Mosquitto, u16)> {
    if !Mosquitto::installed() {
        eprintln!("SKIPPED: {MOSQUITTO} is not installed");
        return None;
    }
    let broker = Mosquitto::setup().tls(None, pki).start();
    let tls_port = broker.tls_port.expect("a TLS listener");
    Some((broker, tls_port))
}

#[tokio::test]
async fn over_tls_birth_and_status_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path(), "hq");
    let Some((broker, tls_port)) = tls_broker(&pki) else {
        return;
    };
    let mut wire = Watch::start(&broker, "hq-watch", renkei_shared::topic::ALL).await;
    let url = format!("mqtts://127.0.0.1:{tls_port}");
    let state = dir.path().join("state");
    let mut args = run_args(&url, state.to_str().unwrap(), "1s");
    args.extend(["--ca-file", pki.ca.to_str().unwrap()]);
    let agent = AgentProcess::start(&args);
    let birth = wire
        .next(&agent, "birth over TLS", |m| is_life(m, true))
        .await;
    assert_eq!(birth.env.header.origin, Origin::Site(site()));
    let status = wire
        .next(&agent, "status over TLS", |m| match &m.env.body {
            Body::Status(s) => Some(s.clone()),
            _ => None,
        })
        .await;
    assert_eq!(status.name, "西新宿小学校");
    wire.next(&agent, "shelter over TLS", |m| {
        matches!(m.env.body, Body::Shelter(_)).then_some(())
    })
    .await;
    let log = agent.log();
    assert!(
        log.contains(&format!("mqtts://127.0.0.1:{tls_port}")),
        "{log}"
    );
}

#[tokio::test]
async fn over_tls_a_wrong_ca_is_refused_clearly_and_retried_and_no_ca_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path(), "hq");
    let other = make_pki(dir.path(), "other");
    let Some((broker, tls_port)) = tls_broker(&pki) else {
        return;
    };
    let mut wire = Watch::start(&broker, "hq-watch", renkei_shared::topic::ALL).await;
    let url = format!("mqtts://127.0.0.1:{tls_port}");
    let state = dir.path().join("state");

    // mqtts:// without a CA file: refused at start, naming what is missing.
    let mut no_ca = AgentProcess::start(&run_args(&url, state.to_str().unwrap(), "1s"));
    assert!(!no_ca.wait_exit().success());
    let log = no_ca.log();
    assert!(log.contains("mqtts:// needs ca_file"), "{log}");

    // A CA that did not sign the broker's certificate: every attempt fails the handshake,
    // says why, and backs off.
    let mut args = run_args(&url, state.to_str().unwrap(), "1s");
    args.extend(["--ca-file", other.ca.to_str().unwrap()]);
    let agent = AgentProcess::start(&args);
    let deadline = Instant::now() + WAIT;
    loop {
        let log = agent.log();
        if log.matches("TLS handshake failed").count() >= 2 {
            assert!(log.contains("retry_in_ms"), "{log}");
            assert!(log.to_lowercase().contains("certificate"), "{log}");
            break;
        }
        assert!(Instant::now() < deadline, "no retried TLS failure:\n{log}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Nothing got through.
    assert!(
        wire.next_by(Instant::now() + Duration::from_millis(300))
            .await
            .is_none(),
        "a message arrived over an untrusted link"
    );
}
