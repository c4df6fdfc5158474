//! The load tool against the real brokers it compares, at a size that runs in seconds: every
//! message of every publisher must reach the subscriber once (and the integrator on Renkei's
//! JSON mirror, where there is one), and on Renkei every message must be named by a receipt.
//! A load tool that lost or doubled messages itself would make every figure in BENCHMARKS.md
//! wrong.

use std::process::Command;

use anyhow::{Context, Result, ensure};

/// Runs `renkei-bench load` with `args` and returns its standard output.
fn bench(args: &[&str]) -> Result<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_renkei-bench"))
        .arg("load")
        .args(args)
        .output()
        .context("running renkei-bench")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "renkei-bench failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// Checks that each target ran once and had every message delivered exactly once, and that
/// Renkei's receipts named every message.
fn check(stdout: &str, targets: &[&str], expected: u64) -> Result<()> {
    for target in targets {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("run 1 {target}:")))
            .with_context(|| format!("no run of {target} in:\n{stdout}"))?;
        ensure!(
            line.contains(&format!("delivered {expected}/{expected} dup 0 ")),
            "{target} lost or doubled messages: {line}"
        );
        if *target == "RenkeiIntegrator" {
            ensure!(
                line.contains(&format!("integrator {expected}/{expected} dup 0")),
                "the integrator on the JSON mirror lost or doubled messages: {line}"
            );
        }
        if target.starts_with("Renkei") && *target != "RenkeiNoReceipts" {
            ensure!(
                line.contains(&format!("confirmed {expected}/{expected} never 0")),
                "Renkei's receipts did not name every message: {line}"
            );
        }
    }
    Ok(())
}

#[test]
fn both_publisher_clients_deliver_every_message_once_to_every_broker() -> Result<()> {
    let targets = ["Renkei", "RenkeiIntegrator", "Rumqttd", "Mosquitto"];
    for client in ["lean", "rumqttc"] {
        let out = bench(&[
            "--publishers",
            "40",
            "--messages",
            "250",
            "--runs",
            "1",
            "--targets",
            "renkei,renkei-integrator,rumqttd,mosquitto",
            "--client",
            client,
        ])?;
        ensure!(
            out.contains(&format!("publishers on the {client} client")),
            "{out}"
        );
        check(&out, &targets, 40 * 250).with_context(|| format!("client {client}"))?;
    }
    Ok(())
}

#[test]
fn a_paced_lean_publisher_keeps_its_rate() -> Result<()> {
    // 20 publishers at 200 msg/s in all: 10 messages each take about a second.
    let out = bench(&[
        "--publishers",
        "20",
        "--messages",
        "10",
        "--rate",
        "200",
        "--runs",
        "1",
        "--targets",
        "renkei",
    ])?;
    check(&out, &["Renkei"], 200)?;
    let line = out
        .lines()
        .find(|l| l.starts_with("run 1 Renkei:"))
        .context("no run line")?;
    let seconds: f64 = line
        .split(" in ")
        .nth(1)
        .and_then(|s| s.split('s').next())
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no duration in {line}"))?;
    // Paced, the run cannot be faster than its 200 messages at 200 a second allow.
    ensure!(seconds >= 0.9, "paced run took {seconds} s: {line}");
    Ok(())
}
