//! The real `renkei-agent` binary: daemons and simulators as processes, and its one-shot
//! commands (`report`, `status`) run to the end.

use std::path::PathBuf;
use std::process::{Command, ExitStatus, Output, Stdio};

use tempfile::TempDir;

use crate::process::{Process, binary};
use crate::wait::PATIENCE;

/// The `renkei-agent` binary, with nothing from the test's environment that would change its
/// configuration (the config file, a password, the form's PIN).
fn agent_command() -> Command {
    let mut command = Command::new(binary("renkei-agent", "renkei-agent"));
    for var in [
        "RENKEI_AGENT_CONFIG",
        "RENKEI_AGENT_PASSWORD",
        "RENKEI_AGENT_FORM_PIN",
    ] {
        command.env_remove(var);
    }
    command
}

/// Runs `renkei-agent` with `args` to the end (`report …`, `status …`).
pub fn run_agent(args: &[&str]) -> Output {
    agent_command()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running renkei-agent")
}

/// A running `renkei-agent` (`run` or `simulate`), killed on drop. Its log (stderr, at debug
/// level for the agent's own lines and its link's) goes to a file, for the messages of failing
/// tests.
#[derive(Debug)]
pub struct AgentProcess {
    process: Process,
    log: PathBuf,
    _log_dir: TempDir,
}

impl AgentProcess {
    /// Starts `renkei-agent` with `args`; its stdout is kept for [`AgentProcess::stdout`].
    pub fn start(args: &[&str]) -> AgentProcess {
        let log_dir = tempfile::tempdir().unwrap();
        let log = log_dir.path().join("agent.log");
        let process = Process::spawn(
            "renkei-agent",
            agent_command()
                .args(args)
                .env("RUST_LOG", "renkei_agent=debug,renkei_link=debug")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(&log).unwrap()),
        );
        AgentProcess {
            process,
            log,
            _log_dir: log_dir,
        }
    }

    /// What the agent has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` (`TERM`, `STOP`, `CONT`, …).
    pub fn signal(&self, signal: &str) {
        self.process.signal(signal);
    }

    /// Kills the agent with SIGKILL: no DISCONNECT, so the broker publishes its will.
    pub fn kill9(&mut self) {
        self.process.kill9();
    }

    /// Waits (up to [`PATIENCE`]) for the agent to exit by itself.
    pub fn wait_exit(&mut self) -> ExitStatus {
        match self.process.wait_exit(PATIENCE) {
            Some(status) => status,
            None => panic!("the agent did not exit:\n{}", self.log()),
        }
    }

    /// Everything the agent printed on stdout, once it has exited.
    pub fn stdout(&mut self) -> String {
        let mut text = String::new();
        if let Some(stdout) = self.process.child.stdout.as_mut() {
            std::io::Read::read_to_string(stdout, &mut text).unwrap();
        }
        text
    }
}
