//! The staff web form's defences, tried against the real agent and form server: what a
//! hostile page, a guessing phone and slow clients can and cannot do.

use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// The PIN's own strength, at start-up.

#[test]
fn run_refuses_a_short_pin_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    let form_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    std::fs::write(
        &config,
        format!(
            "broker = \"mqtt://127.0.0.1:9\"\nward = 131041\nsite = \"s1\"\nname = \"n\"\n\
             state_dir = {:?}\nform_listen = \"127.0.0.1:{form_port}\"\nform_pin = \"2468\"\n",
            dir.path().join("state").display().to_string()
        ),
    )
    .unwrap();
    let mut agent = std::process::Command::new(env!("CARGO_BIN_EXE_renkei-agent"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env_remove("RENKEI_AGENT_FORM_PIN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = agent.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = agent.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = agent.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let status = status.unwrap_or_else(|| panic!("it started with a 4-digit PIN:\n{stderr}"));
    assert!(!status.success());
    assert!(
        stderr.contains(&config.display().to_string())
            && stderr.contains("form_pin")
            && stderr.contains("6 to 64 digits"),
        "{stderr}"
    );
    assert!(!stderr.contains("2468"), "the PIN was printed: {stderr}");
}
