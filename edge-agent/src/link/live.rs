//! A simulated site's session: its full state after every birth, heartbeats on a timer,
//! commands from HQ, all on one [`Driver`].
//!
//! While disconnected, heartbeats are skipped rather than queued: without an outbox they
//! would be stale on arrival, and the full state follows every birth.

use std::time::Duration;

use renkei_shared::{Body, CommandAction, Timestamp, topic};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::info;

use super::driver::{Driver, DriverOptions, LinkEvent};
use super::{LinkError, LinkOptions, command_of, timer};
use crate::lifecycle::Lifecycle;
use crate::report::Site;

/// Runs one site's session until `shutdown` turns true, then sends its death and disconnects.
///
/// Network errors never end it: it reconnects with backoff. It ends early only with a
/// [`LinkError`], which retrying could not fix.
pub async fn run_site<S: Site>(
    options: LinkOptions,
    lifecycle: Lifecycle,
    mut site: S,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), LinkError> {
    let driver_options = DriverOptions {
        subscriptions: vec![topic::command_filter(lifecycle.site())],
        ..DriverOptions::default()
    };
    let mut link: Driver<Lifecycle> = Driver::spawn(&options, driver_options, lifecycle);
    let mut ticker = timer(Instant::now(), interval);
    let mut answered = super::answered();

    loop {
        if *shutdown.borrow() {
            break;
        }
        tokio::select! {
            // A dropped sender counts as shutdown, or `changed` would return at once forever.
            changed = shutdown.changed() => if changed.is_err() { break },
            event = link.next() => match event? {
                LinkEvent::Connected { .. } => {
                    let bodies = site.full_state(Timestamp::now());
                    send(&mut link, bodies)?;
                    ticker.reset();
                }
                LinkEvent::Message(publish) => {
                    let own = link.speaker().site().clone();
                    let Some(arrived) = command_of(&publish, &own, &mut answered, Timestamp::now()) else {
                        continue;
                    };
                    let command = &arrived.command;
                    match command.action {
                        _ if !arrived.carry_out() => {}
                        CommandAction::Rebirth => {
                            info!(command = %command.command_id, mode = ?arrived.mode, "command rebirth: answered with birth and full state");
                            link.rebirth()?;
                            let bodies = site.full_state(Timestamp::now());
                            send(&mut link, bodies)?;
                        }
                        CommandAction::SetInterval { seconds } => {
                            let to = Duration::from_secs(u64::from(seconds));
                            info!(command = %command.command_id, mode = ?arrived.mode, from_s = ticker.period().as_secs(), to_s = seconds, "command set interval");
                            site.set_interval(to);
                            ticker = timer(Instant::now() + to, to);
                        }
                    }
                    // Live like the rest of a simulated site's news: lost if the link drops.
                    send(&mut link, vec![Body::CommandResult(arrived.result)])?;
                }
                _ => {}
            },
            _ = ticker.tick(), if link.is_connected() => {
                let bodies = site.tick(Timestamp::now());
                send(&mut link, bodies)?;
            }
        }
    }
    link.close().await?;
    Ok(())
}

/// Numbers `bodies` and publishes them live.
fn send(link: &mut Driver<Lifecycle>, bodies: Vec<Body>) -> Result<(), LinkError> {
    for body in bodies {
        let env = link.speaker_mut().stamp(body, Timestamp::now());
        link.publish_live(&env)?;
    }
    Ok(())
}
