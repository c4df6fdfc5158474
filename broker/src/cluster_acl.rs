//! Renkei's users and roles as a NATS server's `authorization` block, for HQ on a NATS
//! JetStream cluster whose MQTT listeners serve agents and dashboards (docs/scaling.md).
//!
//! `renkei-broker cluster-acl` writes it; every node of the cluster includes the same file.
//! Each role's row of the table in `acl.rs` becomes publish and subscribe permissions on NATS
//! subjects: an MQTT topic's `/` is NATS's `.` (`renkei/v1/131041/es-1/status` is
//! `renkei.v1.131041.es-1.status`), `+` is `*` and `#` is `>`. Renkei's ids never hold `.` or
//! spaces, which the NATS MQTT listener refuses.
//!
//! What NATS needs besides:
//! - every MQTT user that subscribes at QoS 1 may subscribe to `$MQTT.sub.>`: the server
//!   delivers QoS 1 through a JetStream consumer on such a subject in the user's name;
//! - a filter `a/b/#` is two NATS subscriptions, `a.b.>` and `a.b`: both are allowed;
//! - passwords are bcrypt hashes (NATS reads no argon2): a user's `cluster_hash`, kept only
//!   when the user was added with `--cluster-password` ([`set_cluster_hash`]);
//! - an `admin` may connect over the NATS protocol too: that is the login Renkei's own
//!   instances consume the JetStream stream with. Everyone else may use MQTT only
//!   (`allowed_connection_types`), over TCP, and dashboard roles over WebSocket too.
//!
//! What stays weaker than the embedded broker (SECURITY.md): NATS does not bind a client id
//! to a login, so one login can take over (disconnect) another's MQTT session by its client
//! id, though not read what that session subscribed to; a publish the permissions refuse is
//! dropped and still acknowledged (PUBACK), so an agent publishing out of its tree learns it
//! only from the receipts that never come; the acknowledgement's author (`by`) is not checked
//! against the login; and the per-site bounds of open requests and incidents do not apply.

use renkei_shared::{Role, WARDS, WardCode};
use rusqlite::{Connection, params};

use crate::auth::{Access, User, UserError};

/// bcrypt's cost for cluster hashes (NATS checks one at every MQTT CONNECT).
const BCRYPT_COST: u32 = 11;

/// Why the authorization block cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum ClusterAclError {
    #[error(transparent)]
    Users(#[from] UserError),
    #[error("these users have no cluster password (add them again with --cluster-password): {0}")]
    NoClusterHash(String),
    #[error("no users: the cluster would refuse every login")]
    Empty,
}

/// Keeps a bcrypt hash of `password` for `name`, for the cluster's config.
pub fn set_cluster_hash(conn: &Connection, name: &str, password: &str) -> Result<(), UserError> {
    let hash = bcrypt::hash(password, BCRYPT_COST).map_err(|e| UserError::Hash(e.to_string()))?;
    let changed = conn.execute(
        "UPDATE users SET cluster_hash = ?2 WHERE name = ?1",
        params![name, hash],
    )?;
    if changed == 0 {
        return Err(UserError::Invalid(format!("no user {name:?}")));
    }
    Ok(())
}

/// Every user with its cluster hash, if it has one.
fn users_with_hashes(conn: &Connection) -> Result<Vec<(User, Option<String>)>, UserError> {
    let mut hashes: std::collections::HashMap<String, Option<String>> = conn
        .prepare("SELECT name, cluster_hash FROM users")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(crate::auth::list_users(conn)?
        .into_iter()
        .map(|user| {
            let hash = hashes.remove(&user.name).flatten();
            (user, hash)
        })
        .collect())
}

/// The NATS `authorization { users = [...] }` block for every user.
pub fn authorization(conn: &Connection) -> Result<String, ClusterAclError> {
    let users = users_with_hashes(conn)?;
    if users.is_empty() {
        return Err(ClusterAclError::Empty);
    }
    let missing: Vec<&str> = users
        .iter()
        .filter(|(_, hash)| hash.is_none())
        .map(|(u, _)| u.name.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(ClusterAclError::NoClusterHash(missing.join(", ")));
    }
    let mut out = String::from(
        "# Written by `renkei-broker cluster-acl` from Renkei's users: do not edit by hand.\n\
         authorization {\n  users = [\n",
    );
    for (user, hash) in &users {
        let Some(hash) = hash else { continue };
        let Some(entry) = entry(&user.name, &user.access, hash) else {
            continue;
        };
        out.push_str(&entry);
    }
    out.push_str("  ]\n}\n");
    Ok(out)
}

/// The permissions of one role, as NATS subjects.
#[derive(Debug, PartialEq, Eq)]
pub struct Permissions {
    pub connection_types: &'static [&'static str],
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// What every QoS 1 MQTT subscriber needs to subscribe to inside NATS.
const MQTT_QOS1_DELIVERY: &str = "$MQTT.sub.>";
const MQTT_ONLY: &[&str] = &["MQTT"];
const MQTT_AND_WS: &[&str] = &["MQTT", "MQTT_WS"];
const EVERY_WAY: &[&str] = &["STANDARD", "WEBSOCKET", "MQTT", "MQTT_WS"];

/// A role's row of the table in `acl.rs`, as NATS permissions.
pub fn permissions(name: &str, access: &Access) -> Option<Permissions> {
    // NATS's MQTT listener reads a filter `a/b/#` as two subscriptions, `a.b.>` and `a.b`
    // (MQTT's `#` also matches its parent level), and both must be allowed.
    let subscribe = |subjects: Vec<String>| {
        let mut out = Vec::with_capacity(subjects.len() * 2 + 1);
        for s in subjects {
            if let Some(stem) = s.strip_suffix(".>") {
                out.push(stem.to_owned());
            }
            out.push(s);
        }
        out.push(MQTT_QOS1_DELIVERY.to_owned());
        out
    };
    let ward_reads = |ward: WardCode| {
        vec![
            format!("renkei.v1.{ward}.>"),
            "renkei.v1.hq.alert.>".to_owned(),
            "renkei.v1.hq.ack.alert.>".to_owned(),
            format!("renkei.v1.hq.ack.request.{ward}.>"),
        ]
    };
    Some(match access {
        Access::Demo | Access::Probe => return None,
        Access::Agent(site) => Permissions {
            connection_types: MQTT_ONLY,
            publish: vec![format!("renkei.v1.{}.{}.>", site.ward, site.site)],
            subscribe: subscribe(vec![
                format!("renkei.v1.cmd.{}.{}", site.ward, site.site),
                format!("renkei.receipt.v1.{}.{}", site.ward, site.site),
            ]),
        },
        Access::Ward(ward) => Permissions {
            connection_types: MQTT_AND_WS,
            publish: vec![
                format!("renkei.v1.hq.ack.alert.*.{name}"),
                format!("renkei.v1.hq.ack.request.{ward}.>"),
                format!("renkei.v1.cmd.{ward}.>"),
            ],
            subscribe: subscribe({
                let mut s = ward_reads(*ward);
                s.push(format!("renkei.json.v1.{ward}.>"));
                s.push(format!("renkei.link.v1.{ward}"));
                s
            }),
        },
        Access::Hq => Permissions {
            connection_types: MQTT_AND_WS,
            publish: vec![
                "renkei.v1.hq.alert.>".to_owned(),
                format!("renkei.v1.hq.ack.alert.*.{name}"),
                "renkei.v1.hq.ack.request.>".to_owned(),
                "renkei.v1.cmd.>".to_owned(),
            ],
            subscribe: subscribe(vec!["renkei.>".to_owned()]),
        },
        Access::Integrator => Permissions {
            connection_types: MQTT_AND_WS,
            publish: Vec::new(),
            subscribe: subscribe(vec![
                "renkei.v1.>".to_owned(),
                "renkei.json.v1.>".to_owned(),
                "renkei.link.v1.>".to_owned(),
            ]),
        },
        Access::Admin => Permissions {
            connection_types: EVERY_WAY,
            publish: vec![">".to_owned()],
            subscribe: vec![">".to_owned()],
        },
        Access::Relay(ward) => Permissions {
            connection_types: MQTT_ONLY,
            publish: vec![
                format!("renkei.v1.{ward}.>"),
                format!("renkei.link.v1.{ward}"),
            ],
            subscribe: subscribe({
                let mut s = ward_reads(*ward);
                s.push(format!("renkei.receipt.v1.{ward}.*"));
                s.push(format!("renkei.v1.cmd.{ward}.>"));
                s.extend(
                    WARDS
                        .iter()
                        .filter(|w| w.code != *ward)
                        .map(|w| format!("renkei.v1.{}.>", w.code)),
                );
                s
            }),
        },
    })
}

/// One user's entry in the block.
fn entry(name: &str, access: &Access, hash: &str) -> Option<String> {
    let p = permissions(name, access)?;
    let list = |items: &[String]| {
        items
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let types = p
        .connection_types
        .iter()
        .map(|t| format!("\"{t}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let publish = if p.publish.is_empty() {
        "{ deny: [\">\"] }".to_owned()
    } else {
        format!("{{ allow: [{}] }}", list(&p.publish))
    };
    let role = access.role().map_or("", Role::as_str);
    // User names and ids are [A-Za-z0-9_-] and bcrypt hashes [./$A-Za-z0-9]: nothing to
    // escape inside the quotes.
    Some(format!(
        "    # {role}\n    {{ user: \"{name}\", password: \"{hash}\", allowed_connection_types: [{types}],\n      \
         permissions: {{ publish: {publish}, subscribe: {{ allow: [{}] }} }} }}\n",
        list(&p.subscribe)
    ))
}

#[cfg(test)]
mod tests {
    use renkei_shared::{Id, SiteRef};

    use super::*;

    fn site() -> Access {
        Access::Agent(SiteRef {
            ward: WardCode(131041),
            site: Id::new("es-1").unwrap(),
        })
    }

    #[test]
    fn an_agent_publishes_its_own_tree_and_reads_its_commands_and_receipts() {
        let p = permissions("agent-es-1", &site()).unwrap();
        assert_eq!(p.publish, ["renkei.v1.131041.es-1.>"]);
        assert_eq!(
            p.subscribe,
            [
                "renkei.v1.cmd.131041.es-1",
                "renkei.receipt.v1.131041.es-1",
                "$MQTT.sub.>"
            ]
        );
        assert_eq!(p.connection_types, ["MQTT"]);
    }

    #[test]
    fn read_only_and_ward_bound_roles_stay_so() {
        let integrator = permissions("i", &Access::Integrator).unwrap();
        assert!(integrator.publish.is_empty());
        let ward = permissions("tanaka", &Access::Ward(WardCode(131041))).unwrap();
        assert!(
            ward.publish
                .contains(&"renkei.v1.hq.ack.alert.*.tanaka".to_owned())
        );
        assert!(
            ward.subscribe
                .iter()
                .all(|s| !s.starts_with("renkei.v1.131016") && s != "renkei.>"),
            "{:?}",
            ward.subscribe
        );
        let relay = permissions("relay", &Access::Relay(WardCode(131041))).unwrap();
        assert_eq!(
            relay.publish,
            ["renkei.v1.131041.>", "renkei.link.v1.131041"]
        );
        assert_eq!(
            relay
                .subscribe
                .iter()
                .filter(|s| s.starts_with("renkei.v1.13") && s.ends_with(".>"))
                .count(),
            23,
            "its own ward's tree and each other ward's"
        );
        assert!(permissions("", &Access::Demo).is_none());
    }

    #[test]
    fn the_block_needs_every_users_cluster_hash() {
        let dir = tempfile::tempdir().unwrap();
        let conn = crate::db::open(dir.path()).unwrap();
        assert!(matches!(authorization(&conn), Err(ClusterAclError::Empty)));
        let cheap = crate::auth::tests::cheap();
        crate::auth::add_user(&conn, "agent-es-1", &site(), "pw-1", &cheap).unwrap();
        crate::auth::add_user(&conn, "sato", &Access::Hq, "pw-2", &cheap).unwrap();
        set_cluster_hash(&conn, "agent-es-1", "pw-1").unwrap();
        match authorization(&conn) {
            Err(ClusterAclError::NoClusterHash(names)) => assert_eq!(names, "sato"),
            other => panic!("{other:?}"),
        }
        set_cluster_hash(&conn, "sato", "pw-2").unwrap();
        let block = authorization(&conn).unwrap();
        assert!(block.contains("user: \"agent-es-1\""), "{block}");
        assert!(block.contains("\"renkei.v1.131041.es-1.>\""), "{block}");
        let hash = block
            .split("password: \"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap();
        assert!(
            bcrypt::verify("pw-1", hash).unwrap(),
            "a hash NATS can check"
        );
        // A new password without --cluster-password drops the stale cluster hash.
        crate::auth::add_user(&conn, "sato", &Access::Hq, "pw-3", &cheap).unwrap();
        assert!(matches!(
            authorization(&conn),
            Err(ClusterAclError::NoClusterHash(_))
        ));
        assert!(set_cluster_hash(&conn, "nobody", "x").is_err());
    }
}
