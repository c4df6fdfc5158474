//! Topic access control: what each [`Access`] may publish and subscribe to.
//!
//! | access            | publish                                                      | subscribe                                                                    |
//! |-------------------|--------------------------------------------------------------|------------------------------------------------------------------------------|
//! | agent (site S)    | `renkei/v1/{S.ward}/{S.site}/…` (its last will included)      | `renkei/v1/cmd/{S.ward}/{S.site}` and `renkei/receipt/v1/{S.ward}/{S.site}`   |
//! | ward (ward W)     | alert acks as itself; request acks and commands for W's sites | `renkei/v1/{W}/#`, `renkei/v1/hq/alert/#`, `renkei/v1/hq/ack/alert/#`, `renkei/v1/hq/ack/request/{W}/#`, `renkei/json/v1/{W}/#` and narrower |
//! | hq                | alerts, acks, commands                                        | everything                                                                   |
//! | integrator        | nothing                                                       | `renkei/json/v1/#`, `renkei/v1/#` and narrower                               |
//! | admin             | anything under `renkei/v1/`                                   | everything                                                                   |
//! | relay (ward W)    | W's sites' topics, `renkei/v1/{W}/…` (forwarded as the sites sent them) | `renkei/receipt/v1/{W}/+`, `renkei/v1/cmd/{W}/#`, what a ward operator of W reads, any one ward's tree `renkei/v1/{X}/#` (other wards' state, sent down), and narrower |
//! | demo (anonymous)  | any Renkei topic under `renkei/v1/` (site, alert, ack, command)| everything                                                                  |
//!
//! Besides, a relay (and, in demo mode, anyone) publishes its ward's line report,
//! `renkei/link/v1/{W}` ([`renkei_shared::line`]); integrators read every ward's and a ward
//! operator its own.
//!
//! Nobody but the broker's own links publishes under `renkei/json/v1/` (the mirror is derived
//! from validated messages only), and nothing outside `renkei/v1/` and the line reports is
//! published at all.
//! Filters are checked level by level: a wildcard where a fixed level is required (e.g.
//! `renkei/v1/+/…` for a ward operator) is refused, since it would reach other wards.
//! Shared subscriptions (`$share/{group}/…`) are checked on the filter after the group.
//!
//! A ward operator reads HQ's steps on its own ward's requests only, as the HTTP API shows
//! them. Alerts and their acknowledgements are the exception: their topics name no ward (one
//! alert may concern several), so over MQTT a ward operator reads every alert, while the HTTP
//! API lists only those naming its ward. Filtering them by payload per subscriber would mean
//! dropping QoS 1 deliveries the router counts as in flight. SECURITY.md says so.
//!
//! Acknowledgements carry who sent them (`by.user`, `by.role`): the guard refuses an ack
//! whose author is not the login that publishes it ([`ack_author`]).

use renkei_shared::line;
use renkei_shared::topic::{self, JSON_ROOT, ROOT};
use renkei_shared::{SiteRef, Topic, WardCode};

use crate::auth::{Access, Principal};

/// Why a publish was refused; labels `renkei_acl_refused_total`.
pub type Refusal = &'static str;

/// A filter no publish can ever match: it replaces a refused filter inside a SUBSCRIBE so
/// that the router answers it (with a code the guard then turns into a failure).
pub const REFUSED_FILTER: &str = "renkei/refused/subscription";

/// Whether `principal` may publish on `topic`.
pub fn may_publish(principal: &Principal, topic: &str) -> Result<(), Refusal> {
    if topic.starts_with(JSON_ROOT) {
        return Err("json_mirror");
    }
    if let Some(ward) = line::parse_line_topic(topic) {
        // A ward broker's report of its line: its relay's, or any anonymous client's in demo.
        return match principal.access {
            Access::Relay(own) if own == ward => Ok(()),
            Access::Relay(_) => Err("other_ward"),
            Access::Demo | Access::Admin => Ok(()),
            _ => Err("role"),
        };
    }
    let Some(rest) = topic.strip_prefix(ROOT).filter(|r| r.starts_with('/')) else {
        return Err("outside_tree");
    };
    if principal.access == Access::Admin {
        // Even an admin's topic must be a plain topic, not a filter.
        return if rest.contains(['+', '#']) {
            Err("not_a_renkei_topic")
        } else {
            Ok(())
        };
    }
    if matches!(principal.access, Access::Integrator | Access::Probe) {
        return Err("read_only");
    }
    let parsed = Topic::parse(topic).map_err(|_| "not_a_renkei_topic")?;
    match (&principal.access, &parsed) {
        (Access::Demo, _) => Ok(()),
        (Access::Agent(own), Topic::Site { site, .. }) => same_site(own, site),
        (Access::Agent(_), _) => Err("role"),
        (Access::Ward(_) | Access::Hq, Topic::AlertAck { user, .. }) => {
            if user.as_str() == principal.name {
                Ok(())
            } else {
                Err("other_user")
            }
        }
        (Access::Ward(ward), Topic::RequestAck { site, .. } | Topic::Command { site }) => {
            if site.ward == *ward {
                Ok(())
            } else {
                Err("other_ward")
            }
        }
        (Access::Ward(_), _) => Err("role"),
        (Access::Hq, Topic::Alert { .. } | Topic::RequestAck { .. } | Topic::Command { .. }) => {
            Ok(())
        }
        (Access::Hq, Topic::Site { .. }) => Err("role"),
        (Access::Relay(ward), Topic::Site { site, .. }) => {
            if site.ward == *ward {
                Ok(())
            } else {
                Err("other_ward")
            }
        }
        (Access::Relay(_), _) => Err("role"),
        (Access::Integrator | Access::Admin | Access::Probe, _) => Err("role"),
    }
}

fn same_site(own: &SiteRef, site: &SiteRef) -> Result<(), Refusal> {
    if own == site {
        Ok(())
    } else {
        Err("other_site")
    }
}

/// Whether `principal` may subscribe to `filter`.
pub fn may_subscribe(principal: &Principal, filter: &str) -> bool {
    let filter = match filter.strip_prefix("$share/") {
        Some(rest) => match rest.split_once('/') {
            Some((group, f)) if !group.is_empty() => f,
            _ => return false,
        },
        None => filter,
    };
    // rumqttd 0.20's `protocol::matches` slices the first byte of what it matches and panics
    // inside a multi-byte character (docs/fuzzing.md); no Renkei topic starts with one.
    if !filter.as_bytes().first().is_some_and(u8::is_ascii) {
        return false;
    }
    // `$` topics are the broker's own (`$renkei/refused` takes publishes over a bound).
    if filter.starts_with('$') {
        return false;
    }
    let lines = format!("{}/#", line::LINE_ROOT);
    match &principal.access {
        Access::Admin | Access::Hq | Access::Demo => true,
        Access::Integrator => {
            within(filter, topic::ALL_JSON) || within(filter, topic::ALL) || within(filter, &lines)
        }
        Access::Ward(ward) => {
            topic::ward_reader_filters(*ward)
                .iter()
                .any(|allowed| within(filter, allowed))
                || within(filter, &format!("{JSON_ROOT}/{ward}/#"))
                || filter == line::line_topic(*ward)
        }
        Access::Agent(site) => {
            filter == topic::command_filter(site) || filter == renkei_shared::receipt_topic(site)
        }
        Access::Relay(ward) => {
            relay_reads_receipts(*ward, filter)
                || within(filter, &format!("{ROOT}/cmd/{ward}/#"))
                || topic::ward_reader_filters(*ward)
                    .iter()
                    .any(|allowed| within(filter, allowed))
                // Other wards' state, for the ward's dashboard: one ward's tree at a time.
                || renkei_shared::WARDS
                    .iter()
                    .any(|w| within(filter, &topic::ward_filter(w.code)))
        }
        Access::Probe => false,
    }
}

/// Whether `filter` is the receipts of all `ward`'s sites (`…/{ward}/+`) or of one of them.
fn relay_reads_receipts(ward: WardCode, filter: &str) -> bool {
    if filter == renkei_shared::receipt::receipt_ward_filter(ward) {
        return true;
    }
    renkei_shared::receipt::parse_receipt_topic(filter).is_some_and(|site| site.ward == ward)
}

/// Whether an acknowledgement's author (`by`) is the login that publishes it: the same user
/// name and role. Anonymous demo clients have no login to compare with.
pub fn ack_author(principal: &Principal, by: &renkei_shared::Actor) -> Result<(), Refusal> {
    if principal.access == Access::Demo {
        return Ok(());
    }
    if by.user.as_str() != principal.name {
        return Err("ack_other_user");
    }
    if Some(by.role) != principal.access.role() {
        return Err("ack_other_role");
    }
    Ok(())
}

/// Whether `filter` matches only topics that `allowed` (`a/b/#`) matches: its levels up to
/// the `#` must be the same fixed levels.
fn within(filter: &str, allowed: &str) -> bool {
    let Some(prefix) = allowed.strip_suffix("/#") else {
        return filter == allowed;
    };
    let mut levels = filter.split('/');
    prefix
        .split('/')
        .all(|fixed| levels.next().is_some_and(|level| level == fixed))
}

#[cfg(test)]
mod tests {
    use renkei_shared::{Id, WardCode};

    use super::*;

    fn principal(name: &str, access: Access) -> Principal {
        Principal {
            name: name.into(),
            access,
        }
    }

    fn site(ward: u32, site: &str) -> SiteRef {
        SiteRef {
            ward: WardCode(ward),
            site: Id::new(site).unwrap(),
        }
    }

    #[test]
    fn agents_publish_only_their_own_site() {
        let agent = principal("a", Access::Agent(site(131041, "es-1")));
        assert_eq!(may_publish(&agent, "renkei/v1/131041/es-1/status"), Ok(()));
        assert_eq!(
            may_publish(&agent, "renkei/v1/131041/es-1/request/r-1"),
            Ok(())
        );
        assert_eq!(
            may_publish(&agent, "renkei/v1/131041/es-2/status"),
            Err("other_site")
        );
        assert_eq!(
            may_publish(&agent, "renkei/v1/131016/es-1/status"),
            Err("other_site")
        );
        assert_eq!(may_publish(&agent, "renkei/v1/hq/alert/x"), Err("role"));
        assert_eq!(
            may_publish(&agent, "renkei/json/v1/131041/es-1/status"),
            Err("json_mirror")
        );
        assert_eq!(
            may_publish(&agent, "renkei/v1/131041/es-1/weather"),
            Err("not_a_renkei_topic")
        );
        assert!(may_subscribe(&agent, "renkei/v1/cmd/131041/es-1"));
        assert!(!may_subscribe(&agent, "renkei/v1/cmd/131041/+"));
        assert!(!may_subscribe(&agent, "renkei/v1/#"));
        assert!(may_subscribe(&agent, "renkei/receipt/v1/131041/es-1"));
        assert!(!may_subscribe(&agent, "renkei/receipt/v1/131041/es-2"));
        assert!(!may_subscribe(&agent, "renkei/receipt/v1/131041/+"));
        assert!(!may_subscribe(&agent, "renkei/receipt/v1/#"));
        assert_eq!(
            may_publish(&agent, "renkei/receipt/v1/131041/es-1"),
            Err("outside_tree")
        );
    }

    #[test]
    fn relays_forward_only_their_wards_sites_and_read_only_what_comes_down_to_it() {
        let relay = principal("relay-shinjuku", Access::Relay(WardCode(131041)));
        assert_eq!(may_publish(&relay, "renkei/v1/131041/es-1/status"), Ok(()));
        assert_eq!(
            may_publish(&relay, "renkei/v1/131041/es-2/incident/i-1"),
            Ok(())
        );
        assert_eq!(
            may_publish(&relay, "renkei/v1/131016/es-1/status"),
            Err("other_ward")
        );
        for topic in [
            "renkei/v1/hq/alert/a-1",
            "renkei/v1/cmd/131041/es-1",
            "renkei/v1/hq/ack/request/131041/es-1/r-1",
        ] {
            assert_eq!(may_publish(&relay, topic), Err("role"), "{topic}");
        }
        assert_eq!(
            may_publish(&relay, "renkei/json/v1/131041/es-1/status"),
            Err("json_mirror")
        );
        for filter in [
            "renkei/receipt/v1/131041/+",
            "renkei/receipt/v1/131041/es-1",
            "renkei/v1/cmd/131041/#",
            "renkei/v1/cmd/131041/es-1",
            "renkei/v1/hq/alert/#",
            "renkei/v1/131041/#",
            "renkei/v1/131016/#",
            "renkei/v1/131016/+/status",
        ] {
            assert!(may_subscribe(&relay, filter), "{filter}");
        }
        for filter in [
            "renkei/receipt/v1/131016/+",
            "renkei/receipt/v1/+/+",
            "renkei/receipt/v1/#",
            "renkei/v1/cmd/131016/#",
            "renkei/v1/cmd/#",
            "renkei/v1/#",
            "renkei/json/v1/#",
            "#",
        ] {
            assert!(!may_subscribe(&relay, filter), "{filter}");
        }
    }

    #[test]
    fn only_a_wards_relay_reports_its_line_and_integrators_read_every_report() {
        let relay = principal("relay-shinjuku", Access::Relay(WardCode(131041)));
        assert_eq!(may_publish(&relay, "renkei/link/v1/131041"), Ok(()));
        assert_eq!(
            may_publish(&relay, "renkei/link/v1/131016"),
            Err("other_ward")
        );
        for (access, name) in [
            (Access::Hq, "sato"),
            (Access::Ward(WardCode(131041)), "tanaka"),
            (Access::Agent(site(131041, "es-1")), "a"),
            (Access::Integrator, "i"),
        ] {
            assert_eq!(
                may_publish(&principal(name, access), "renkei/link/v1/131041"),
                Err("role"),
                "{name}"
            );
        }
        assert_eq!(
            may_publish(&principal("", Access::Demo), "renkei/link/v1/131041"),
            Ok(())
        );
        assert!(
            may_publish(&relay, "renkei/link/v1/131041/x").is_err(),
            "not a report topic"
        );
        let integrator = principal("i", Access::Integrator);
        assert!(may_subscribe(&integrator, "renkei/link/v1/#"));
        assert!(may_subscribe(&integrator, "renkei/link/v1/131041"));
        let ward = principal("tanaka", Access::Ward(WardCode(131041)));
        assert!(may_subscribe(&ward, "renkei/link/v1/131041"));
        assert!(!may_subscribe(&ward, "renkei/link/v1/131016"));
        assert!(!may_subscribe(&ward, "renkei/link/v1/#"));
        assert!(!may_subscribe(&relay, "renkei/link/v1/#"));
    }

    #[test]
    fn ward_operators_stay_in_their_ward() {
        let ward = principal("tanaka", Access::Ward(WardCode(131041)));
        assert_eq!(
            may_publish(&ward, "renkei/v1/hq/ack/alert/a1/tanaka"),
            Ok(())
        );
        assert_eq!(
            may_publish(&ward, "renkei/v1/hq/ack/alert/a1/sato"),
            Err("other_user")
        );
        assert_eq!(
            may_publish(&ward, "renkei/v1/hq/ack/request/131041/es-1/r-1"),
            Ok(())
        );
        assert_eq!(
            may_publish(&ward, "renkei/v1/hq/ack/request/131016/es-1/r-1"),
            Err("other_ward")
        );
        assert_eq!(may_publish(&ward, "renkei/v1/cmd/131041/es-1"), Ok(()));
        assert_eq!(
            may_publish(&ward, "renkei/v1/cmd/131016/es-1"),
            Err("other_ward")
        );
        assert_eq!(may_publish(&ward, "renkei/v1/hq/alert/a1"), Err("role"));
        assert_eq!(
            may_publish(&ward, "renkei/v1/131041/es-1/status"),
            Err("role")
        );
        for ok in [
            "renkei/v1/131041/#",
            "renkei/v1/131041/es-1/status",
            "renkei/v1/131041",
            "renkei/v1/hq/alert/#",
            "renkei/v1/hq/alert/+",
            "renkei/v1/hq/ack/alert/#",
            "renkei/v1/hq/ack/request/131041/#",
            "renkei/v1/hq/ack/request/131041/es-1/+",
            "renkei/json/v1/131041/#",
            "$share/dash/renkei/v1/131041/#",
        ] {
            assert!(may_subscribe(&ward, ok), "{ok}");
        }
        for refused in [
            "renkei/v1/#",
            "renkei/v1/+/es-1/status",
            "renkei/v1/131016/#",
            "renkei/json/v1/#",
            "#",
            "renkei/#",
            "$share//renkei/v1/131041/#",
            "$share/g",
            "renkei/v1/hq/#",
            "renkei/v1/hq/ack/#",
            "renkei/v1/hq/ack/request/#",
            "renkei/v1/hq/ack/request/131016/#",
            "renkei/v1/hq/ack/+/131041/#",
            "$renkei/refused",
        ] {
            assert!(!may_subscribe(&ward, refused), "{refused}");
        }
    }

    #[test]
    fn hq_integrators_admins_and_demo() {
        let hq = principal("sato", Access::Hq);
        assert_eq!(may_publish(&hq, "renkei/v1/hq/alert/a1"), Ok(()));
        assert_eq!(may_publish(&hq, "renkei/v1/hq/ack/alert/a1/sato"), Ok(()));
        assert_eq!(
            may_publish(&hq, "renkei/v1/hq/ack/alert/a1/other"),
            Err("other_user")
        );
        assert_eq!(
            may_publish(&hq, "renkei/v1/131041/es-1/status"),
            Err("role")
        );
        assert!(may_subscribe(&hq, "#"));
        assert!(!may_subscribe(&hq, "˞/#"));
        assert!(!may_subscribe(&hq, "$share/g/˞"));
        assert!(!may_subscribe(&hq, ""));

        let integrator = principal("dis", Access::Integrator);
        assert_eq!(
            may_publish(&integrator, "renkei/v1/hq/alert/a1"),
            Err("read_only")
        );
        assert!(may_subscribe(&integrator, "renkei/json/v1/#"));
        assert!(may_subscribe(&integrator, "renkei/v1/131041/#"));
        assert!(!may_subscribe(&integrator, "#"));
        assert!(!may_subscribe(&integrator, "+/v1/#"));

        let admin = principal("root", Access::Admin);
        assert_eq!(may_publish(&admin, "renkei/v1/anything/at/all"), Ok(()));
        assert_eq!(
            may_publish(&admin, "renkei/json/v1/131041/es-1/status"),
            Err("json_mirror")
        );
        assert_eq!(may_publish(&admin, REFUSED_FILTER), Err("outside_tree"));

        let demo = Principal::demo();
        assert_eq!(may_publish(&demo, "renkei/v1/131041/es-1/status"), Ok(()));
        assert_eq!(may_publish(&demo, "renkei/v1/hq/ack/alert/a/u"), Ok(()));
        assert_eq!(
            may_publish(&demo, "renkei/v1/131041/es-1/weather"),
            Err("not_a_renkei_topic")
        );
        assert_eq!(
            may_publish(&demo, "renkei/json/v1/131041/es-1/status"),
            Err("json_mirror")
        );
        assert!(may_subscribe(&demo, "renkei/#"));
    }
}
