//! `docs/asyncapi.yaml` is what the model says, and what the broker really sends matches it.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use renkei_shared::mirror::{Mirrored, MirroredRef};
use renkei_shared::{Body, Envelope, Origin, Timestamp, Topic, codec, sample};
use renkei_testkit::{BrokerProcess, MqttClient, workspace_root};
use renkei_tests::asyncapi;
use rumqttc::QoS;

fn checked_in() -> Result<serde_json::Value> {
    let path = workspace_root().join("docs/asyncapi.yaml");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    Ok(serde_norway::from_str(&text)?)
}

#[test]
fn the_checked_in_document_is_generated_from_the_model() -> Result<()> {
    let path = workspace_root().join("docs/asyncapi.yaml");
    let generated = asyncapi::yaml()?;
    if std::env::var_os("RENKEI_BLESS").is_some() {
        std::fs::write(&path, &generated)?;
    }
    let on_disk = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    assert!(
        on_disk == generated,
        "docs/asyncapi.yaml is out of date: regenerate with RENKEI_BLESS=1 cargo test -p renkei-tests --test asyncapi"
    );
    Ok(())
}

#[test]
fn every_sample_message_validates_and_bad_ones_do_not() -> Result<()> {
    let validator = asyncapi::mirrored_validator(&checked_in()?)?;
    let mirrored = |env: &Envelope| {
        serde_json::to_value(MirroredRef {
            envelope: env,
            received_at: Timestamp(1_700_000_000_000),
        })
    };
    for env in sample::all() {
        let json = mirrored(&env)?;
        let errors: Vec<String> = validator
            .iter_errors(&json)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{:?}: {errors:?}", env.body.kind());
    }
    let plain = serde_json::to_value(sample::status())?;
    assert!(
        !validator.is_valid(&plain),
        "a message without received_at must not validate"
    );
    let mut bad = mirrored(&sample::status())?;
    bad["header"]["mode"] = "drill".into();
    assert!(
        !validator.is_valid(&bad),
        "an unknown mode must not validate"
    );
    let mut bad = mirrored(&sample::shelter())?;
    bad["body"]["shelter"]["evacuees"] = (-1).into();
    assert!(
        !validator.is_valid(&bad),
        "a negative count must not validate"
    );
    Ok(())
}

/// Real messages published to the real broker come out on the JSON mirror, valid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brokers_json_mirror_matches_the_document() -> Result<()> {
    let validator = asyncapi::mirrored_validator(&checked_in()?)?;
    let started = Timestamp::now();
    let broker = BrokerProcess::start();
    let mut client = MqttClient::connect(broker.addrs.mqtt, "asyncapi-check").await;
    client.subscribe("renkei/json/v1/#").await;
    // Publish every sample a site may send, from its own topic.
    let site_samples: Vec<Envelope> = sample::all()
        .into_iter()
        .filter(|e| matches!(e.header.origin, Origin::Site(_)) && !matches!(e.body, Body::Life(_)))
        .collect();
    for env in &site_samples {
        let topic = Topic::of(env)?;
        client
            .client
            .publish(
                topic.to_string(),
                QoS::AtLeastOnce,
                topic.retained(),
                codec::encode(env)?,
            )
            .await?;
    }

    let mut seen = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen < site_samples.len() {
        let p = client
            .publish_within(deadline.saturating_duration_since(Instant::now()))
            .await
            .context("timed out waiting for the JSON mirror")?;
        let topic = Topic::parse_json(&p.topic)?;
        let json: serde_json::Value = serde_json::from_slice(&p.payload)?;
        let errors: Vec<String> = validator
            .iter_errors(&json)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{}: {errors:?}", p.topic);
        let Mirrored {
            envelope: env,
            received_at,
        } = serde_json::from_value(json)?;
        assert!(
            started <= received_at && received_at <= Timestamp::now(),
            "received_at is when HQ received it"
        );
        assert_eq!(Topic::of(&env)?, topic, "mirrored on its own topic");
        assert!(site_samples.contains(&env), "mirrored unchanged");
        seen += 1;
    }
    Ok(())
}
