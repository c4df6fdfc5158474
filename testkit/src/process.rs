//! Child processes the tests start: the workspace's own binaries and Debian's servers.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::wait::PATIENCE;

/// The repository root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The directory Cargo puts this build's binaries in (`target/debug`, or `target/release`
/// for a release build such as the load tool's).
fn bin_dir() -> PathBuf {
    // Test executables live in target/<profile>/deps/, binaries in target/<profile>/.
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf));
    match exe_dir {
        Some(dir) if dir.ends_with("deps") => dir.parent().map(Path::to_path_buf).unwrap_or(dir),
        Some(dir) => dir,
        None => workspace_root().join("target/debug"),
    }
}

/// The path of the workspace binary `name` of `package`, built first if this build has not.
///
/// A package's own integration tests always find its binaries fresh: Cargo builds them before
/// it runs the tests. Another package's binaries are as fresh as the last build of the
/// workspace (`cargo build --workspace --bins`, which `cargo test --workspace` includes).
pub fn binary(package: &str, name: &str) -> PathBuf {
    let dir = bin_dir();
    let path = dir.join(name);
    if !path.exists() {
        let profile: &[&str] = if dir.ends_with("release") {
            &["--release"]
        } else {
            &[]
        };
        let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args(["build", "-p", package])
            .args(profile)
            .current_dir(workspace_root())
            .status()
            .expect("running cargo build");
        assert!(status.success(), "cargo build -p {package} failed");
    }
    path
}

/// A TCP port that was free a moment ago, for servers that cannot report a port-0 bind.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// Whether something accepts connections on 127.0.0.1:`port` within `within`.
pub fn wait_listening(port: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Reads a child's stdout until a line starting with `prefix` and returns it, or `None` if
/// none comes within `within`; then keeps draining the pipe so the child never blocks on it.
pub fn ready_line(stdout: ChildStdout, prefix: &'static str, within: Duration) -> Option<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    // On a thread of its own, so that a child that never prints cannot hang the test.
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref().map_while(Result::ok) {
            if line.starts_with(prefix) {
                let _ = tx.send(line);
                break;
            }
        }
        for _ in lines {}
    });
    rx.recv_timeout(within).ok()
}

/// A child process, killed (SIGKILL) on drop if it still runs.
#[derive(Debug)]
pub struct Process {
    pub child: Child,
    /// For messages: what the process is.
    pub name: String,
}

impl Process {
    /// Starts `command`.
    pub fn spawn(name: &str, command: &mut Command) -> Process {
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Process {
            child,
            name: name.to_owned(),
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Kills the process with SIGKILL at once (no clean shutdown, no last words) and reaps it.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends `signal` (`TERM`, `STOP`, `CONT`, …) with kill(1).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.id().to_string())
            .status()
            .expect("kill(1)");
        assert!(status.success(), "kill -{signal} {} failed", self.name);
    }

    /// The exit status once the process has ended by itself, if it does within `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits (up to [`PATIENCE`]) for the process to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait_exit(PATIENCE)
            .unwrap_or_else(|| panic!("{} did not exit after SIGTERM", self.name))
    }

    /// The process's resident set size now, in bytes (`VmRSS` in `/proc/<pid>/status`).
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.id()))
            .unwrap_or_else(|e| panic!("/proc status of {}: {e}", self.name));
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in {status}"));
        kib * 1024
    }

    /// How many file descriptors the process has open now.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.id()))
            .unwrap_or_else(|e| panic!("/proc fds of {}: {e}", self.name))
            .count()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.kill9();
        }
    }
}
