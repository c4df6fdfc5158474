//! End to end: a real agent publishes to the real broker and real headless Chromium shows the
//! values the agent sent, through MQTT over WebSocket and the shared reducer in the browser.

use std::time::Duration;

use anyhow::{Context, Result};
use renkei_testkit::{BrokerProcess, prepare, workspace_root};
use renkei_tests::{Browser, built_dashboard, shelter_agent};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_typed_at_an_agent_appears_in_the_browser() -> Result<()> {
    let broker = BrokerProcess::start_serving(&built_dashboard()?, prepare(), &["--demo"]);
    let agent_state = tempfile::tempdir()?;
    let _agent = shelter_agent(
        &broker.mqtt_url(),
        "e2e-shelter",
        "E2E避難所",
        agent_state.path(),
        &["--interval", "2s"],
    )?;

    let browser = Browser::start().await?;
    browser
        .client
        .goto(&format!("http://{}/", broker.addrs.http))
        .await?;
    let shinjuku = |field: &str| format!("tr[data-ward=\"131041\"] td[data-field=\"{field}\"]");
    let checks = async {
        browser
            .wait_for_text(&shinjuku("evacuees"), "123", Duration::from_secs(30))
            .await?;
        browser
            .wait_for_text(&shinjuku("capacity"), "456", Duration::from_secs(5))
            .await?;
        browser
            .wait_for_text(&shinjuku("shelters_open"), "1", Duration::from_secs(5))
            .await?;
        browser
            .wait_for_text(&shinjuku("sites"), "1", Duration::from_secs(5))
            .await?;
        // A ward nobody reported for stays empty: figures are not invented.
        let chiyoda = "tr[data-ward=\"131016\"] td[data-field=\"evacuees\"]";
        browser
            .wait_for_text(chiyoda, "0", Duration::from_secs(5))
            .await?;
        browser
            .client
            .find(fantoccini::Locator::Css("#conn[data-state=\"connected\"]"))
            .await
            .context("the connection indicator does not say connected")?;
        anyhow::Ok(())
    };
    if let Err(e) = checks.await {
        let shot = workspace_root().join("target/e2e-failure.png");
        let _ = browser.screenshot(&shot).await;
        return Err(e.context(format!("screenshot at {}", shot.display())));
    }
    browser.client.clone().close().await?;
    Ok(())
}
