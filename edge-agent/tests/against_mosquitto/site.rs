//! The site's side: the test site, the agent's arguments and config file, and its one-shot
//! commands (`report`, `status`) as staff run them.

use std::path::{Path, PathBuf};

use renkei_shared::{Id, SiteRef, WardCode};
use renkei_testkit::run_agent;

/// The site every agent here speaks for, unless a test names others.
pub fn site() -> SiteRef {
    SiteRef {
        ward: WardCode(131041),
        site: Id::new("nishi-shinjuku-es").expect("a valid id"),
    }
}

/// `renkei-agent run` for [`site`], in exercise mode, reporting to `url` every `interval`.
pub fn run_args<'a>(url: &'a str, state_dir: &'a str, interval: &'a str) -> Vec<&'a str> {
    vec![
        "run",
        "--broker",
        url,
        "--ward",
        "131041",
        "--site",
        "nishi-shinjuku-es",
        "--name",
        "西新宿小学校",
        "--kind",
        "shelter",
        "--interval",
        interval,
        "--mode",
        "exercise",
        "--state-dir",
        state_dir,
        "--evacuees",
        "120",
        "--capacity",
        "450",
        "--shelter-state",
        "open",
        // Mosquitto alone sends no receipts (renkei-broker does; tests/ covers that).
        "--confirm",
        "puback",
    ]
}

/// A config file for the test site at `port`, with extra lines.
pub fn write_config(dir: &Path, port: u16, extra: &str) -> PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "broker = \"mqtt://127.0.0.1:{port}\"\nward = 131041\nsite = \"nishi-shinjuku-es\"\n\
             name = \"西新宿小学校\"\nmode = \"exercise\"\ninterval = \"1s\"\n\
             state_dir = {:?}\nconfirm = \"puback\"\n{extra}\n",
            dir.join("state").display().to_string()
        ),
    )
    .expect("write agent.toml");
    path
}

/// Runs `renkei-agent report …` to the end: (exit success, stdout + stderr).
pub fn report(config: &Path, args: &[&str]) -> (bool, String) {
    let config = config.to_str().expect("a UTF-8 path");
    let out = run_agent(&[&["report", "--config", config][..], args].concat());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// What `renkei-agent status` prints.
pub fn agent_status(config: &Path) -> String {
    let config = config.to_str().expect("a UTF-8 path");
    let out = run_agent(&["status", "--config", config]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}
