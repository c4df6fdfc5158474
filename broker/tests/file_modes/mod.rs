//! Who may read the broker's files: the database holds password hashes and every recorded
//! message, so it and its WAL and shared-memory files are the owner's alone, and so is the
//! data directory the broker creates.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use renkei_testkit::{BrokerProcess, PASSWORD, add_user, prepare};

/// The permission bits, in octal as `ls` and `chmod` write them.
fn mode(path: &Path) -> String {
    let mode = std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode();
    format!("{:o}", mode & 0o777)
}

/// The modes of the data directory and of the database's three files, by name.
fn modes(data: &Path) -> Vec<(String, String)> {
    let mut modes = vec![("data/".to_owned(), mode(data))];
    for name in ["renkei.db", "renkei.db-wal", "renkei.db-shm"] {
        modes.push((name.to_owned(), mode(&data.join(name))));
    }
    modes
}

fn owner_only() -> Vec<(String, String)> {
    [
        ("data/", "700"),
        ("renkei.db", "600"),
        ("renkei.db-wal", "600"),
        ("renkei.db-shm", "600"),
    ]
    .map(|(name, mode)| (name.to_owned(), mode.to_owned()))
    .to_vec()
}

#[test]
fn the_broker_creates_its_data_directory_and_database_for_its_owner_only() {
    // The test's umask would let group and others read what is created with the defaults.
    let broker = BrokerProcess::start();
    let data = broker.data_dir();
    // WAL mode: the -wal and -shm files exist while the broker has the database open.
    assert_eq!(modes(&data), owner_only());
    assert!(broker.terminate().success());
}

#[test]
fn user_add_on_a_fresh_directory_creates_it_for_its_owner_only() {
    let dir = prepare();
    add_user(dir.path(), "sato", &["--role", "hq"], PASSWORD);
    let data = dir.path().join("data");
    assert_eq!(mode(&data), "700", "data directory");
    assert_eq!(mode(&data.join("renkei.db")), "600", "database");
    // The broker started on it keeps the modes, WAL files included.
    let broker = BrokerProcess::start_in(dir, &[]);
    assert_eq!(modes(&broker.data_dir()), owner_only());
    assert!(broker.terminate().success());
}

#[test]
fn a_database_left_readable_by_others_is_named_in_the_log() {
    let dir = prepare();
    add_user(dir.path(), "sato", &["--role", "hq"], PASSWORD);
    let db = dir.path().join("data/renkei.db");
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let broker = BrokerProcess::start_in(dir, &[]);
    let log = broker.log();
    assert!(
        log.contains("readable by others") && log.contains("renkei.db"),
        "{log}"
    );
    assert!(broker.terminate().success());
}
