//! Debian's PostgreSQL as a real shared record: a throw-away server the harness makes itself
//! (`initdb`, then `postgres` on a loopback port), for HQ on a cluster (docs/scaling.md).
//!
//! PostgreSQL refuses to run as root, and CI runs as root: then the server's directory is given
//! to the `postgres` user Debian's package makes (or `nobody`), and `initdb` and the server run
//! as that user. The server runs with `fsync=off`: a test kills the server, never the machine,
//! and what a killed server had committed is in the page cache for its restart.

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::process::{Process, free_port, wait_listening};
use crate::wait::PATIENCE;

/// Where Debian's packages put the server's programs (`/usr/lib/postgresql/<version>/bin`).
const LIB: &str = "/usr/lib/postgresql";

/// The database and user the server is made with.
pub const DATABASE: &str = "renkei";

/// A running throw-away server.
#[derive(Debug)]
pub struct Postgres {
    pub port: u16,
    bin: PathBuf,
    dir: TempDir,
    /// The user the server runs as, when this process is root.
    user: Option<(u32, u32)>,
    process: Option<Process>,
}

impl Postgres {
    /// The newest installed server's programs, if any.
    fn bin() -> Option<PathBuf> {
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(LIB)
            .ok()?
            .filter_map(Result::ok)
            .filter_map(|e| {
                let version = e.file_name().to_str()?.parse().ok()?;
                let bin = e.path().join("bin");
                bin.join("initdb").exists().then_some((version, bin))
            })
            .collect();
        versions.sort();
        versions.pop().map(|(_, bin)| bin)
    }

    pub fn installed() -> bool {
        Postgres::bin().is_some()
    }

    /// Makes a new database cluster and starts its server; waits until it takes connections.
    pub fn start() -> Postgres {
        let bin = Postgres::bin()
            .unwrap_or_else(|| panic!("no PostgreSQL in {LIB} (apt-get install postgresql)"));
        let dir = tempfile::tempdir().unwrap();
        let user = server_user();
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-U", DATABASE, "-A", "trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_user(&mut initdb, user);
        let out = initdb.output().expect("running initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Another test may take the picked port before the server binds it: then again on
        // another, up to three times.
        let mut postgres = Postgres {
            port: 0,
            bin,
            dir,
            user,
            process: None,
        };
        for _ in 0..3 {
            postgres.port = free_port();
            if postgres.spawn() {
                postgres.create_database();
                return postgres;
            }
        }
        panic!("PostgreSQL did not start:\n{}", postgres.log());
    }

    /// Starts the server on `self.port`; false if it exited or did not listen in time.
    fn spawn(&mut self) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        if let Some((uid, gid)) = self.user {
            let _ = std::os::unix::fs::chown(self.log_path(), Some(uid), Some(gid));
        }
        let mut command = Command::new(self.bin.join("postgres"));
        command
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-p", &self.port.to_string()])
            .arg("-k")
            .arg(self.dir.path())
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "full_page_writes=off", "-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        as_user(&mut command, self.user);
        let mut process = Process::spawn("postgres", &mut command);
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if process.wait_exit(Duration::ZERO).is_some() {
                return false;
            }
            if wait_listening(self.port, Duration::from_millis(100)) && self.ready() {
                self.process = Some(process);
                return true;
            }
        }
        false
    }

    /// Whether the server takes connections (past its start-up and recovery).
    fn ready(&self) -> bool {
        Command::new(self.bin.join("pg_isready"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
            .status()
            .is_ok_and(|s| s.success())
    }

    fn create_database(&self) {
        self.client("createdb", &[DATABASE]);
    }

    /// Runs the client program `name` against the server as its user, and returns what it
    /// printed; panics with what it said if it fails.
    fn client(&self, name: &str, args: &[&str]) -> String {
        let out = Command::new(self.bin.join(name))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                DATABASE,
            ])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("running {name}: {e}"));
        assert!(
            out.status.success(),
            "{name} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// A connection string for `recorder.postgres`.
    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user={DATABASE} dbname={DATABASE}",
            self.port
        )
    }

    /// Runs one query with psql and returns its output, trimmed (`-At`: values only).
    pub fn query(&self, sql: &str) -> String {
        self.client(
            "psql",
            &["-d", DATABASE, "-At", "-v", "ON_ERROR_STOP=1", "-c", sql],
        )
    }

    /// A query's single number.
    pub fn count(&self, sql: &str) -> i64 {
        let out = self.query(sql);
        out.parse()
            .unwrap_or_else(|_| panic!("{sql:?} gave {out:?}, not a number"))
    }

    /// Stops the server the hard way (immediate shutdown: no checkpoint, connections cut, a
    /// crash recovery at the next start), as a dying server would.
    pub fn crash(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.signal("QUIT");
            if process.wait_exit(PATIENCE).is_none() {
                process.kill9();
            }
        }
    }

    /// Starts the server again on the same port, after [`Postgres::crash`].
    pub fn start_again(&mut self) {
        assert!(self.process.is_none(), "the server is running");
        assert!(
            self.spawn(),
            "PostgreSQL did not start again on port {}:\n{}",
            self.port,
            self.log()
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Immediate shutdown ends the server's own processes too (SIGKILL would leave them).
        if let Some(mut process) = self.process.take() {
            if process.wait_exit(Duration::ZERO).is_none() {
                process.signal("QUIT");
            }
            let _ = process.wait_exit(Duration::from_secs(5));
        }
    }
}

/// The user the server runs as: none of its own when this process is not root; else the
/// `postgres` user, or `nobody`.
fn server_user() -> Option<(u32, u32)> {
    if effective_uid() != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    let find = |name: &str| {
        passwd.lines().find_map(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            (fields.first() == Some(&name) && fields.len() > 3)
                .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
                .flatten()
        })
    };
    Some(
        find("postgres")
            .or_else(|| find("nobody"))
            .expect("a user other than root to run PostgreSQL as"),
    )
}

/// This process's effective user id, from `/proc/self/status` (`Uid:` real, effective, …).
fn effective_uid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1))
                .and_then(|id| id.parse().ok())
        })
        .unwrap_or(0)
}

fn as_user(command: &mut Command, user: Option<(u32, u32)>) {
    if let Some((uid, gid)) = user {
        command.uid(uid).gid(gid);
        // The server's own environment, not root's (HOME would point where it cannot write).
        command.env("HOME", "/tmp");
    }
}
