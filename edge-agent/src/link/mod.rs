//! The agent's MQTT link: the crate `renkei-link` (the driver that keeps a connection up and the
//! delivery core, which a ward broker's uplink runs too), the simulator's live session, and
//! the reading of HQ's commands.
//!
//! - [`driver`] and [`delivery`]: re-exported from `renkei-link`; the daemon and every
//!   simulated site run on the driver;
//! - [`live`]: a simulated site's session: no outbox, its full state after every birth;
//! - here: the reading of HQ's commands (`command_of`).

pub mod live;

pub use live::run_site;
pub use renkei_link::{
    KEEP_ALIVE, LinkError, LinkOptions, LinkState, connection_hint, delivery, driver, timer,
};

use renkei_shared::{Body, topic};
use tracing::{debug, warn};

/// The command in a publish from the broker, with its mode, if it is a valid command from HQ
/// for `site`; anything else is logged and dropped.
pub(crate) fn command_of(
    publish: &rumqttc::Publish,
    site: &renkei_shared::SiteRef,
) -> Option<(renkei_shared::Command, renkei_shared::Mode)> {
    let own_topic = topic::command_filter(site);
    if publish.topic != own_topic {
        debug!(topic = %publish.topic, "ignoring a publish not for this site");
        return None;
    }
    let env = match renkei_shared::receive(publish.topic.as_bytes(), &publish.payload) {
        Ok((_, env)) => env,
        Err(e) => {
            warn!(reason = e.reason(), error = %e, "ignoring an undecodable command, or one on the wrong topic");
            return None;
        }
    };
    if !matches!(env.header.origin, renkei_shared::Origin::Hq(_)) {
        warn!(origin = ?env.header.origin, "ignoring a command not from HQ");
        return None;
    }
    let Body::Command(command) = env.body else {
        warn!(
            kind = env.body.kind().as_str(),
            "ignoring a non-command on the command topic"
        );
        return None;
    };
    Some((command, env.header.mode))
}
