//! The agent's MQTT link: the crate `renkei-link` (the driver that keeps a connection up and the
//! delivery core, which a ward broker's uplink runs too), the simulator's live session, and
//! the reading of HQ's commands.
//!
//! - [`driver`] and [`delivery`]: re-exported from `renkei-link`; the daemon and every
//!   simulated site run on the driver;
//! - [`live`]: a simulated site's session: no outbox, its full state after every birth;
//! - here: the reading of HQ's commands (`command_of`): each is carried out once, unless it
//!   expired on its way ([`renkei_shared::COMMAND_TTL_MS`]), and answered either way with a
//!   [`CommandResult`].

pub mod live;

pub use live::run_site;
pub use renkei_link::{
    KEEP_ALIVE, LinkError, LinkOptions, LinkState, connection_hint, delivery, driver, timer,
};

use renkei_shared::{Body, Command, CommandOutcome, CommandResult, Id, Mode, Timestamp, topic};
use tracing::{debug, info, warn};

/// A command from HQ as it reached this site: carried out if its outcome is
/// [`CommandOutcome::Done`], and answered with `result` either way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Arrived {
    pub command: Command,
    pub mode: Mode,
    pub result: CommandResult,
}

impl Arrived {
    /// Whether the site carries it out (it has not expired).
    pub fn carry_out(&self) -> bool {
        self.result.outcome == CommandOutcome::Done
    }
}

/// How many command ids a site remembers having answered.
const ANSWERED: usize = 256;

/// The commands this site answered since it started, so that one delivered twice (QoS 1 is
/// at least once, and a site that fails over to HQ meets it again in its session there) is
/// carried out and answered once.
pub(crate) type Answered = renkei_link::recent::Recent<Id>;

/// A site's [`Answered`], remembering the last [`ANSWERED`] commands.
pub(crate) fn answered() -> Answered {
    Answered::new(ANSWERED)
}

/// The command in a publish from the broker, if it is a valid command from HQ for `site`
/// that this site has not answered yet; anything else is logged and dropped.
pub(crate) fn command_of(
    publish: &rumqttc::Publish,
    site: &renkei_shared::SiteRef,
    answered: &mut Answered,
    now: Timestamp,
) -> Option<Arrived> {
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
    if !answered.first_time(&command.command_id) {
        info!(command = %command.command_id, "command delivered again: carried out and answered once already");
        return None;
    }
    let outcome = CommandOutcome::on_arrival(env.header.sent_at, now);
    if let CommandOutcome::Expired { age_s } = outcome {
        warn!(command = %command.command_id, age_s, "command expired on its way here: not carried out; HQ is told");
    }
    Some(Arrived {
        result: CommandResult {
            command_id: command.command_id.clone(),
            outcome,
        },
        command,
        mode: env.header.mode,
    })
}

#[cfg(test)]
mod tests {
    use renkei_shared::{COMMAND_TTL_MS, sample};

    use super::*;

    fn publish(env: &renkei_shared::Envelope) -> rumqttc::Publish {
        let topic = renkei_shared::Topic::of(env).unwrap().to_string();
        rumqttc::Publish::new(
            topic,
            rumqttc::QoS::AtLeastOnce,
            renkei_shared::encode(env).unwrap(),
        )
    }

    #[test]
    fn a_command_is_carried_out_once_and_an_old_one_only_answered() {
        let site = sample::site();
        let mut answered = answered();
        let command = sample::command();
        let sent = command.header.sent_at;
        let got = command_of(&publish(&command), &site, &mut answered, sent).unwrap();
        assert!(got.carry_out());
        assert_eq!(got.result.command_id.as_str(), "cmd-1");
        assert_eq!(
            command_of(&publish(&command), &site, &mut answered, sent),
            None,
            "delivered twice: answered once"
        );

        let mut old = sample::command();
        if let Body::Command(c) = &mut old.body {
            c.command_id = Id::new("cmd-old").unwrap();
        }
        let late = Timestamp(sent.0 + COMMAND_TTL_MS + 60_000);
        let got = command_of(&publish(&old), &site, &mut answered, late).unwrap();
        assert!(!got.carry_out());
        assert_eq!(got.result.outcome, CommandOutcome::Expired { age_s: 3660 });
    }

    #[test]
    fn a_command_for_another_site_or_a_non_command_is_dropped() {
        let mut answered = answered();
        let command = sample::command();
        let other = renkei_shared::SiteRef {
            ward: renkei_shared::WardCode(131041),
            site: Id::new("other").unwrap(),
        };
        let now = command.header.sent_at;
        assert_eq!(
            command_of(&publish(&command), &other, &mut answered, now),
            None
        );
        // A site's own message on its command topic (the broker refuses it; this is the
        // site's own guard).
        let mut p = publish(&command);
        p.payload = renkei_shared::encode(&sample::status()).unwrap().into();
        assert_eq!(command_of(&p, &sample::site(), &mut answered, now), None);
        assert!(
            command_of(&publish(&command), &sample::site(), &mut answered, now).is_some(),
            "what was dropped was not counted as answered"
        );
    }
}
