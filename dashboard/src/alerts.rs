//! The alerts panel's rows, and the acknowledgements an operator publishes: of an alert, or
//! a step on a supply request.
//!
//! An acknowledgement is an ordinary Renkei message from HQ: the reducer applies it like any
//! other once the broker hands it back, so the page shows an ack (or a request's new state)
//! only after it went round the broker, never optimistically.

use renkei_shared::{
    Ack, AckAction, AckTarget, Actor, Body, Envelope, Header, Id, Mode, Origin, RequestState, Role,
    Severity, SiteRef, Timestamp, WardCode, World,
};

use crate::age::Age;

/// The user named on acknowledgements when nobody logged in (demo mode).
pub const DEFAULT_USER: &str = "hq-operator";

/// One active alert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertRow {
    pub alert_id: Id,
    pub severity: Severity,
    pub headline: String,
    pub wards: Vec<WardCode>,
    pub ack_required: bool,
    pub age: Age,
    /// Who answered, in user order.
    pub acks: Vec<AckRow>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckRow {
    pub user: Id,
    pub action: AckAction,
    pub age: Age,
}

/// The active alerts of `world` at `now`, worst first, newest first within a severity.
pub fn active_alerts(world: &World, now: Timestamp) -> Vec<AlertRow> {
    let mut rows: Vec<(Timestamp, AlertRow)> = world
        .alerts
        .values()
        .filter(|entry| entry.is_active(now))
        .filter_map(|entry| {
            let (_, sent_at, alert) = entry.alert.as_ref()?;
            let acks = entry
                .acks
                .iter()
                .map(|(user, (_, at, ack))| AckRow {
                    user: user.clone(),
                    action: ack.action,
                    age: Age::between(now, *at),
                })
                .collect();
            Some((
                *sent_at,
                AlertRow {
                    alert_id: alert.alert_id.clone(),
                    severity: alert.severity,
                    headline: alert.headline.clone(),
                    wards: alert.wards.clone(),
                    ack_required: alert.ack_required,
                    age: Age::between(now, *sent_at),
                    acks,
                },
            ))
        })
        .collect();
    rows.sort_by(|(ta, a), (tb, b)| b.severity.cmp(&a.severity).then(tb.cmp(ta)));
    rows.into_iter().map(|(_, row)| row).collect()
}

/// A user name as an [`Id`]: login names may hold characters a topic level cannot.
pub fn user_id(login: &str) -> Id {
    let cleaned: String = login
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        // Leaves room for the "dash-" of the origin id.
        .take(renkei_shared::MAX_ID_LEN - 5)
        .collect();
    Id::new(cleaned).unwrap_or_else(|_| Id::new(DEFAULT_USER).expect("a valid id"))
}

/// Who this page publishes as, and the counters that order its messages.
#[derive(Debug, Clone)]
pub struct HqSender {
    pub user: Id,
    /// The login's role: the broker refuses an acknowledgement signed with another.
    pub role: Role,
    /// Random per page load: two tabs of one user never collide on `(boot, seq)`.
    pub boot: u32,
    seq: u64,
}

impl HqSender {
    pub fn new(user: Id, role: Role, boot: u32) -> Self {
        HqSender {
            user,
            role,
            boot,
            seq: 0,
        }
    }

    /// The acknowledgement of `alert_id` in `mode`, sent at `now`.
    pub fn ack(&mut self, alert_id: Id, mode: Mode, now: Timestamp) -> Envelope {
        self.envelope(AckTarget::Alert(alert_id), AckAction::Ack, None, mode, now)
    }

    /// HQ's step `action` on a supply request of `mode`'s world, sent at `now`; `fulfilled`
    /// is the quantity delivered so far, when the step says it.
    pub fn request_step(&mut self, step: RequestStep, mode: Mode, now: Timestamp) -> Envelope {
        let target = AckTarget::Request {
            site: step.site,
            request_id: step.request_id,
        };
        self.envelope(target, step.action, step.fulfilled, mode, now)
    }

    fn envelope(
        &mut self,
        target: AckTarget,
        action: AckAction,
        fulfilled: Option<u32>,
        mode: Mode,
        now: Timestamp,
    ) -> Envelope {
        self.seq += 1;
        let origin = Id::new(format!("dash-{}", self.user))
            .unwrap_or_else(|_| Id::new("dash").expect("a valid id"));
        Envelope {
            header: Header {
                origin: Origin::Hq(origin),
                boot: self.boot,
                seq: self.seq,
                sent_at: now,
                mode,
                historical: false,
            },
            body: Body::Ack(Ack {
                target,
                by: Actor {
                    user: self.user.clone(),
                    role: self.role,
                    organisation: String::new(),
                },
                action,
                fulfilled,
                note: String::new(),
            }),
        }
    }
}

/// An operator's step on one supply request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestStep {
    pub site: SiteRef,
    pub request_id: Id,
    pub action: AckAction,
    /// For deliveries: the quantity delivered so far.
    pub fulfilled: Option<u32>,
}

/// The steps HQ can take on a request in `state`: those that move it forward in its
/// lifecycle, none once it is closed.
pub fn request_actions(state: RequestState) -> Vec<AckAction> {
    if state.is_closed() {
        return Vec::new();
    }
    [
        AckAction::Accept,
        AckAction::Commit,
        AckAction::Ship,
        AckAction::Deliver,
        AckAction::Decline,
    ]
    .into_iter()
    .filter(|a| a.request_state().is_some_and(|s| s.rank() > state.rank()))
    .collect()
}

#[cfg(test)]
mod tests {
    use renkei_shared::{State, Topic, decode, encode, sample};

    use super::*;

    #[test]
    fn acks_go_to_the_users_topic_and_round_trip_through_the_reducer() {
        let mut sender = HqSender::new(user_id("sato"), Role::Hq, 7);
        let alert = sample::alert();
        let Body::Alert(a) = &alert.body else {
            panic!()
        };
        let now = sample::SENT_AT.plus_secs(60);
        let ack = sender.ack(a.alert_id.clone(), Mode::Actual, now);
        let second = sender.ack(a.alert_id.clone(), Mode::Actual, now);
        assert!(second.header.seq > ack.header.seq);
        assert_eq!(ack.header.origin, Origin::Hq(Id::new("dash-sato").unwrap()));
        let topic = Topic::of(&ack).unwrap().to_string();
        assert_eq!(topic, format!("renkei/v1/hq/ack/alert/{}/sato", a.alert_id));
        let bytes = encode(&ack).unwrap();
        assert_eq!(decode(&bytes).unwrap(), ack);

        let mut state = State::new();
        state.apply(&alert);
        let before = active_alerts(state.world(Mode::Actual), now);
        assert_eq!(before.len(), 1);
        assert!(before[0].acks.is_empty());
        state.apply(&ack);
        let after = active_alerts(state.world(Mode::Actual), now);
        assert_eq!(after[0].acks.len(), 1);
        assert_eq!(after[0].acks[0].user.as_str(), "sato");
        assert_eq!(after[0].acks[0].action, AckAction::Ack);
    }

    #[test]
    fn request_steps_go_to_the_requests_topic_and_move_it_forward() {
        let mut sender = HqSender::new(user_id("sato"), Role::Hq, 7);
        let site = sample::site();
        let request_id = Id::new("req-0001").unwrap();
        let now = sample::SENT_AT.plus_secs(60);
        let step = |action, fulfilled| RequestStep {
            site: site.clone(),
            request_id: request_id.clone(),
            action,
            fulfilled,
        };
        let accept = sender.request_step(step(AckAction::Accept, None), Mode::Actual, now);
        assert_eq!(
            Topic::of(&accept).unwrap().to_string(),
            format!(
                "renkei/v1/hq/ack/request/{}/{}/req-0001",
                site.ward, site.site
            )
        );
        let mut state = State::new();
        state.apply(&sample::request());
        state.apply(&accept);
        let entry =
            |state: &State| state.world(Mode::Actual).sites[&site].requests[&request_id].clone();
        assert_eq!(entry(&state).state, RequestState::Accepted);
        let deliver = sender.request_step(
            step(AckAction::Deliver, Some(1500)),
            Mode::Actual,
            now.plus_secs(1),
        );
        state.apply(&deliver);
        assert_eq!(entry(&state).state, RequestState::Delivered);
        assert_eq!(entry(&state).fulfilled, 1500);
    }

    #[test]
    fn only_forward_steps_are_offered() {
        use AckAction::*;
        assert_eq!(
            request_actions(RequestState::Requested),
            [Accept, Commit, Ship, Deliver, Decline]
        );
        assert_eq!(
            request_actions(RequestState::Committed),
            [Ship, Deliver, Decline]
        );
        assert_eq!(request_actions(RequestState::Delivered), [Decline]);
        assert!(request_actions(RequestState::Received).is_empty());
        assert!(request_actions(RequestState::Declined).is_empty());
        assert!(request_actions(RequestState::Cancelled).is_empty());
    }

    #[test]
    fn user_names_become_ids() {
        assert_eq!(user_id("sato").as_str(), "sato");
        assert_eq!(user_id("佐藤 a.b").as_str(), "___a_b");
        assert_eq!(user_id("").as_str(), DEFAULT_USER);
        assert_eq!(user_id(&"x".repeat(100)).as_str().len(), 59);
    }

    #[test]
    fn expired_and_cleared_alerts_leave_the_panel() {
        let mut state = State::new();
        let mut alert = sample::alert();
        if let Body::Alert(a) = &mut alert.body {
            a.expires_at = Some(sample::SENT_AT.plus_secs(10));
        }
        state.apply(&alert);
        let world = state.world(Mode::Actual);
        assert_eq!(active_alerts(world, sample::SENT_AT).len(), 1);
        assert!(active_alerts(world, sample::SENT_AT.plus_secs(11)).is_empty());
    }
}
