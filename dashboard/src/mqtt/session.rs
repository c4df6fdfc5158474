//! The MQTT 3.1.1 session of one connection, without I/O: packets in, packets and events out.
//!
//! ```text
//! open ──CONNECT──▶ AwaitingConnAck ──CONNACK ok──SUBSCRIBE──▶ AwaitingSubAck ──SUBACK ok──▶ Subscribed
//!                        │ refused                                   │ refused
//!                        └──────────────────────▶ error: drop the connection, back off, retry
//! ```
//!
//! The broker must see CONNACK before SUBSCRIBE (rumqttd drops a client that does otherwise),
//! every QoS 1 publish is acknowledged at once, a handshake that takes longer than
//! [`HANDSHAKE_MS`] is given up, and a connection that has said nothing for longer than the
//! keep-alive allows is treated as dead even if the socket looks open.
//!
//! The page subscribes at QoS 0. Its session is clean, so a message in flight when the link
//! drops is lost at either QoS; what the page shows comes back with the retained messages of
//! the next SUBSCRIBE. On a clustered engine a QoS 1 subscription also costs a replicated
//! consumer per filter, made while the client waits for its SUBACK, and while the engine
//! elects leaders after losing a node that stalls or fails (docs/scaling.md).

use bytes::{Bytes, BytesMut};
use mqttbytes::QoS;
use mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PingReq, PubAck, Publish, SubAck, Subscribe,
    SubscribeFilter, SubscribeReasonCode,
};

/// Keep-alive announced in CONNECT, in seconds.
pub const KEEP_ALIVE_S: u16 = 30;
/// How often to send PINGREQ: well inside the keep-alive, so one late ping is not fatal.
pub const PING_EVERY_MS: f64 = 20_000.0;
/// How often the driver calls [`Session::on_tick`].
pub const TICK_MS: u32 = 1_000;
/// How long CONNACK and SUBACK may take together before the address is given up for the
/// next: a broker that holds the handshake this long is not serving (a cluster node cut off
/// from its peers, or one waiting out an election, answers in 4 s or closes). Generous for a
/// single broker: an embedded one answers in milliseconds, even under a reconnect storm.
pub const HANDSHAKE_MS: f64 = 10_000.0;
/// Silence after which the connection is given up: keep-alive and a half, as the broker does.
pub const DEAD_AFTER_MS: f64 = KEEP_ALIVE_S as f64 * 1500.0;
/// The shortest time between two re-subscriptions for the retained state after skip notices.
const RESUBSCRIBE_EVERY_MS: f64 = 10_000.0;

/// Packet id of the one SUBSCRIBE (all of the session's filters); MQTT forbids 0.
const SUBSCRIBE_PKID: u16 = 1;
/// First packet id of the page's own publishes, clear of [`SUBSCRIBE_PKID`].
const FIRST_PUBLISH_PKID: u16 = 2;

/// A user name and password for CONNECT, held in memory only.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    /// Never prints the password, even in a debug log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Where the session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    AwaitingConnAck,
    AwaitingSubAck,
    Subscribed,
}

/// A message delivered by the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    pub topic: String,
    pub payload: Bytes,
    pub retained: bool,
}

/// What the session asks its driver to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Write these bytes to the socket.
    Send(Bytes),
    /// The subscription is in place: live data flows from now on.
    Subscribed,
    Deliver(Incoming),
}

/// Why the session cannot go on.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionError {
    Refused(ConnectReturnCode),
    SubscriptionRefused,
    /// A packet the broker must not send in this phase.
    Unexpected(&'static str, Phase),
    /// Nothing heard for longer than [`DEAD_AFTER_MS`].
    Silent,
    /// Not subscribed [`HANDSHAKE_MS`] after opening.
    HandshakeTimeout(Phase),
    Encode(mqttbytes::Error),
}

impl std::fmt::Display for SessionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionError::Refused(code) => write!(f, "broker refused the connection: {code:?}"),
            SessionError::SubscriptionRefused => f.write_str("broker refused the subscription"),
            SessionError::Unexpected(what, phase) => write!(f, "unexpected {what} in {phase:?}"),
            SessionError::Silent => f.write_str("broker silent past the keep-alive"),
            SessionError::HandshakeTimeout(phase) => {
                write!(f, "no answer within {HANDSHAKE_MS} ms ({phase:?})")
            }
            SessionError::Encode(e) => write!(f, "cannot encode a packet: {e:?}"),
        }
    }
}

/// One connection's protocol state.
#[derive(Debug)]
pub struct Session {
    phase: Phase,
    /// The topic filters subscribed to once connected, in one SUBSCRIBE.
    filters: Vec<String>,
    /// When the CONNECT went, in the driver's clock (ms).
    opened_ms: f64,
    /// When anything was last heard.
    last_heard_ms: f64,
    /// When the last PINGREQ went (or the session opened).
    pinged_ms: f64,
    /// When a skip notice last made the session subscribe again.
    resubscribed_ms: Option<f64>,
    /// Packet id of the next publish.
    next_pkid: u16,
}

impl Session {
    /// Starts a session: the CONNECT to send first, and the state awaiting its answer.
    pub fn open(
        client_id: &str,
        filters: &[String],
        credentials: Option<&Credentials>,
        now_ms: f64,
    ) -> Result<(Session, Bytes), SessionError> {
        let mut connect = Connect::new(client_id);
        connect.keep_alive = KEEP_ALIVE_S;
        // Each page load starts clean: retained messages give the whole picture at once.
        connect.clean_session = true;
        if let Some(c) = credentials {
            connect.set_login(&c.user, &c.password);
        }
        let bytes = encode(|buf| connect.write(buf))?;
        let session = Session {
            phase: Phase::AwaitingConnAck,
            filters: filters.to_vec(),
            opened_ms: now_ms,
            last_heard_ms: now_ms,
            pinged_ms: now_ms,
            resubscribed_ms: None,
            next_pkid: FIRST_PUBLISH_PKID,
        };
        Ok((session, bytes))
    }

    /// A retained QoS 1 PUBLISH of `payload` on `topic`. Its PUBACK needs no handling: what
    /// was published comes back through the subscription, and that is what the view shows.
    pub fn publish(&mut self, topic: &str, payload: &[u8]) -> Result<Bytes, SessionError> {
        let mut publish =
            Publish::from_bytes(topic, QoS::AtLeastOnce, Bytes::copy_from_slice(payload));
        publish.retain = true;
        publish.pkid = self.next_pkid;
        self.next_pkid = match self.next_pkid.wrapping_add(1) {
            0 | SUBSCRIBE_PKID => FIRST_PUBLISH_PKID,
            n => n,
        };
        encode(|buf| publish.write(buf))
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Handles one packet from the broker.
    pub fn on_packet(
        &mut self,
        packet: Packet,
        now_ms: f64,
        out: &mut Vec<Output>,
    ) -> Result<(), SessionError> {
        self.last_heard_ms = now_ms;
        match (self.phase, packet) {
            (Phase::AwaitingConnAck, Packet::ConnAck(ConnAck { code, .. })) => {
                if code != ConnectReturnCode::Success {
                    return Err(SessionError::Refused(code));
                }
                out.push(Output::Send(self.subscribe()?));
                self.phase = Phase::AwaitingSubAck;
            }
            (Phase::AwaitingConnAck, _) => {
                return Err(SessionError::Unexpected(
                    "packet before CONNACK",
                    self.phase,
                ));
            }
            (Phase::AwaitingSubAck, Packet::SubAck(SubAck { pkid, return_codes }))
                if pkid == SUBSCRIBE_PKID =>
            {
                if return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure))
                {
                    return Err(SessionError::SubscriptionRefused);
                }
                self.phase = Phase::Subscribed;
                out.push(Output::Subscribed);
            }
            (_, Packet::Publish(publish)) => self.on_publish(publish, now_ms, out)?,
            (_, Packet::PingResp | Packet::PubAck(_) | Packet::SubAck(_)) => {}
            (phase, Packet::ConnAck(_)) => {
                return Err(SessionError::Unexpected("second CONNACK", phase));
            }
            (phase, Packet::Disconnect) => {
                return Err(SessionError::Unexpected("DISCONNECT", phase));
            }
            // Nothing else is sent to a QoS 1 subscriber; ignoring it is safer than dropping
            // a working connection.
            (_, _) => {}
        }
        Ok(())
    }

    /// The one SUBSCRIBE of all the session's filters.
    fn subscribe(&self) -> Result<Bytes, SessionError> {
        let mut subscribe = Subscribe::new_many(
            self.filters
                .iter()
                .map(|f| SubscribeFilter::new(f.clone(), QoS::AtMostOnce)),
        );
        // Subscribe::new leaves the packet id at 0, which brokers reject.
        subscribe.pkid = SUBSCRIBE_PKID;
        encode(|buf| subscribe.write(buf))
    }

    fn on_publish(
        &mut self,
        publish: Publish,
        now_ms: f64,
        out: &mut Vec<Output>,
    ) -> Result<(), SessionError> {
        if publish.topic == renkei_shared::topic::SKIPPED_NOTICE {
            // At most once per RESUBSCRIBE_EVERY_MS: a page that stays behind would otherwise
            // pull every retained message again on each notice, and fall further behind.
            if self
                .resubscribed_ms
                .is_some_and(|at| now_ms - at < RESUBSCRIBE_EVERY_MS)
            {
                return Ok(());
            }
            self.resubscribed_ms = Some(now_ms);
            // The page fell so far behind that the broker dropped messages for it. The same
            // SUBSCRIBE again makes the broker send every retained message anew (MQTT 3.1.1
            // §3.8.4): the latest state of every site replaces whatever was skipped. (Its
            // SUBACK comes while subscribed, where it is ignored.)
            out.push(Output::Send(self.subscribe()?));
            return Ok(());
        }
        match publish.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                let ack = PubAck::new(publish.pkid);
                out.push(Output::Send(encode(|buf| ack.write(buf))?));
            }
            // Not requested (the subscription is QoS 0), so not handled: the broker downgrades.
            QoS::ExactlyOnce => {}
        }
        out.push(Output::Deliver(Incoming {
            topic: publish.topic,
            payload: publish.payload,
            retained: publish.retain,
        }));
        Ok(())
    }

    /// Called every [`TICK_MS`]: a PINGREQ to send when one is due, or an error if the
    /// handshake took too long or the broker went silent.
    pub fn on_tick(&mut self, now_ms: f64) -> Result<Option<Bytes>, SessionError> {
        if self.phase != Phase::Subscribed && now_ms - self.opened_ms > HANDSHAKE_MS {
            return Err(SessionError::HandshakeTimeout(self.phase));
        }
        if now_ms - self.last_heard_ms > DEAD_AFTER_MS {
            return Err(SessionError::Silent);
        }
        if now_ms - self.pinged_ms < PING_EVERY_MS {
            return Ok(None);
        }
        self.pinged_ms = now_ms;
        encode(|buf| PingReq.write(buf)).map(Some)
    }
}

fn encode(
    write: impl FnOnce(&mut BytesMut) -> Result<usize, mqttbytes::Error>,
) -> Result<Bytes, SessionError> {
    let mut buf = BytesMut::new();
    write(&mut buf).map_err(SessionError::Encode)?;
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use mqttbytes::v4::read;

    use super::*;

    fn decode(bytes: &Bytes) -> Packet {
        read(&mut BytesMut::from(&bytes[..]), 1 << 20).unwrap()
    }

    #[test]
    fn a_skip_notice_resubscribes_for_the_retained_state_and_is_not_delivered() {
        let mut s = connected();
        let mut out = Vec::new();
        let notice = Publish::new(
            renkei_shared::topic::SKIPPED_NOTICE,
            QoS::AtMostOnce,
            r#"{"filter":"renkei/v1/#","skipped":120}"#,
        );
        s.on_packet(Packet::Publish(notice), 5.0, &mut out).unwrap();
        let [Output::Send(bytes)] = &out[..] else {
            panic!("{out:?}")
        };
        let Packet::Subscribe(sub) = decode(bytes) else {
            panic!("not a SUBSCRIBE")
        };
        assert_eq!(sub.filters[0].path, "renkei/v1/#");
        // A second notice soon after does not pull the retained state again; a later one does.
        out.clear();
        let again = |topic| Packet::Publish(Publish::new(topic, QoS::AtMostOnce, "{}"));
        s.on_packet(
            again(renkei_shared::topic::SKIPPED_NOTICE),
            5_000.0,
            &mut out,
        )
        .unwrap();
        assert!(out.is_empty(), "{out:?}");
        s.on_packet(
            again(renkei_shared::topic::SKIPPED_NOTICE),
            10_006.0,
            &mut out,
        )
        .unwrap();
        assert!(matches!(&out[..], [Output::Send(_)]), "{out:?}");
        // Its SUBACK is ignored; the session stays subscribed.
        out.clear();
        let suback = SubAck::new(
            SUBSCRIBE_PKID,
            vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)],
        );
        s.on_packet(Packet::SubAck(suback), 6.0, &mut out).unwrap();
        assert!(out.is_empty());
        assert_eq!(s.phase(), Phase::Subscribed);
    }

    fn connected() -> Session {
        let (mut s, _) = Session::open("dash-x", &all(), None, 0.0).unwrap();
        let mut out = Vec::new();
        accept(&mut s, 1.0, &mut out);
        granted(&mut s, 2.0, &mut out);
        s
    }

    /// The broker's CONNACK "accepted", at `now`.
    fn accept(s: &mut Session, now: f64, out: &mut Vec<Output>) {
        let ack = Packet::ConnAck(ConnAck::new(ConnectReturnCode::Success, false));
        s.on_packet(ack, now, out).unwrap();
    }

    /// The broker's SUBACK granting the one filter at QoS 0, at `now`.
    fn granted(s: &mut Session, now: f64, out: &mut Vec<Output>) {
        let codes = vec![SubscribeReasonCode::Success(QoS::AtMostOnce)];
        s.on_packet(Packet::SubAck(SubAck::new(SUBSCRIBE_PKID, codes)), now, out)
            .unwrap();
    }

    fn all() -> Vec<String> {
        vec!["renkei/v1/#".to_owned()]
    }

    #[test]
    fn connects_then_subscribes_with_a_packet_id() {
        let (mut s, connect) = Session::open("dash-abc", &all(), None, 0.0).unwrap();
        match decode(&connect) {
            Packet::Connect(c) => {
                assert_eq!(c.client_id, "dash-abc");
                assert_eq!(c.keep_alive, 30);
                assert!(c.clean_session);
                assert!(c.login.is_none(), "no login in demo mode");
            }
            other => panic!("{other:?}"),
        }
        let mut out = Vec::new();
        accept(&mut s, 1.0, &mut out);
        assert_eq!(s.phase(), Phase::AwaitingSubAck);
        match &out[..] {
            [Output::Send(bytes)] => match decode(bytes) {
                Packet::Subscribe(sub) => {
                    assert_ne!(sub.pkid, 0);
                    assert_eq!(sub.filters[0].path, "renkei/v1/#");
                    assert_eq!(sub.filters[0].qos, QoS::AtMostOnce);
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        out.clear();
        granted(&mut s, 2.0, &mut out);
        assert_eq!(out, vec![Output::Subscribed]);
        assert_eq!(s.phase(), Phase::Subscribed);
    }

    #[test]
    fn a_ward_operators_filters_go_in_one_subscribe() {
        let filters = renkei_shared::topic::ward_reader_filters(renkei_shared::WardCode(131041));
        let (mut s, _) = Session::open("tanaka-dash-1", &filters, None, 0.0).unwrap();
        let mut out = Vec::new();
        accept(&mut s, 1.0, &mut out);
        let [Output::Send(bytes)] = &out[..] else {
            panic!("{out:?}")
        };
        let Packet::Subscribe(sub) = decode(bytes) else {
            panic!("not a SUBSCRIBE")
        };
        let paths: Vec<_> = sub.filters.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            paths,
            filters.iter().map(String::as_str).collect::<Vec<_>>()
        );
        // One refused filter refuses the session: the view would silently miss its part.
        let refused = Packet::SubAck(SubAck::new(
            SUBSCRIBE_PKID,
            vec![
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::Failure,
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
                SubscribeReasonCode::Success(QoS::AtLeastOnce),
            ],
        ));
        assert_eq!(
            s.on_packet(refused, 2.0, &mut Vec::new()),
            Err(SessionError::SubscriptionRefused)
        );
    }

    #[test]
    fn refusals_end_the_session() {
        let (mut s, _) = Session::open("d", &["f/#".to_owned()], None, 0.0).unwrap();
        let refused = Packet::ConnAck(ConnAck::new(ConnectReturnCode::NotAuthorized, false));
        assert!(matches!(
            s.on_packet(refused, 0.0, &mut Vec::new()),
            Err(SessionError::Refused(ConnectReturnCode::NotAuthorized))
        ));

        let (mut s, _) = Session::open("d", &["f/#".to_owned()], None, 0.0).unwrap();
        assert!(s.on_packet(Packet::PingResp, 0.0, &mut Vec::new()).is_err());

        let (mut s, _) = Session::open("d", &["f/#".to_owned()], None, 0.0).unwrap();
        let mut out = Vec::new();
        accept(&mut s, 0.0, &mut out);
        let refused = Packet::SubAck(SubAck::new(
            SUBSCRIBE_PKID,
            vec![SubscribeReasonCode::Failure],
        ));
        assert_eq!(
            s.on_packet(refused, 0.0, &mut out),
            Err(SessionError::SubscriptionRefused)
        );
    }

    #[test]
    fn acknowledges_qos1_and_delivers() {
        let mut s = connected();
        let mut publish = Publish::new("renkei/v1/x", QoS::AtLeastOnce, vec![1, 2]);
        publish.pkid = 77;
        publish.retain = true;
        let mut out = Vec::new();
        s.on_packet(Packet::Publish(publish), 3.0, &mut out)
            .unwrap();
        match &out[..] {
            [Output::Send(ack), Output::Deliver(m)] => {
                assert_eq!(decode(ack), Packet::PubAck(PubAck::new(77)));
                assert_eq!(m.topic, "renkei/v1/x");
                assert_eq!(&m.payload[..], &[1, 2]);
                assert!(m.retained);
            }
            other => panic!("{other:?}"),
        }
        // QoS 0 needs no acknowledgement.
        out.clear();
        let publish = Publish::new("renkei/v1/y", QoS::AtMostOnce, vec![3]);
        s.on_packet(Packet::Publish(publish), 4.0, &mut out)
            .unwrap();
        assert!(matches!(&out[..], [Output::Deliver(_)]));
    }

    #[test]
    fn sends_the_login_in_connect_and_hides_the_password() {
        let creds = Credentials {
            user: "sato".into(),
            password: "s3cret".into(),
        };
        let (_, connect) = Session::open("dash-1", &["f/#".to_owned()], Some(&creds), 0.0).unwrap();
        match decode(&connect) {
            Packet::Connect(c) => {
                let login = c.login.unwrap();
                assert_eq!(login.username, "sato");
                assert_eq!(login.password, "s3cret");
            }
            other => panic!("{other:?}"),
        }
        assert!(!format!("{creds:?}").contains("s3cret"));
    }

    #[test]
    fn publishes_retained_qos1_with_fresh_packet_ids() {
        let mut s = connected();
        let first = s
            .publish("renkei/v1/hq/ack/alert/a/sato", &[1, 2, 3])
            .unwrap();
        let second = s.publish("renkei/v1/hq/ack/alert/a/sato", &[4]).unwrap();
        let (Packet::Publish(p1), Packet::Publish(p2)) = (decode(&first), decode(&second)) else {
            panic!("not publishes");
        };
        assert_eq!(p1.topic, "renkei/v1/hq/ack/alert/a/sato");
        assert_eq!(&p1.payload[..], &[1, 2, 3]);
        assert_eq!(p1.qos, QoS::AtLeastOnce);
        assert!(p1.retain);
        assert_ne!(p1.pkid, 0);
        assert_ne!(p1.pkid, SUBSCRIBE_PKID);
        assert_ne!(p1.pkid, p2.pkid);
        // Packet ids wrap past 0 and the subscription's id.
        s.next_pkid = u16::MAX;
        s.publish("t", &[]).unwrap();
        assert_eq!(s.next_pkid, FIRST_PUBLISH_PKID);
    }

    #[test]
    fn pings_every_twenty_seconds_until_the_broker_goes_silent() {
        let mut s = connected();
        assert_eq!(s.on_tick(19_000.0), Ok(None), "not yet due");
        let ping = s.on_tick(20_000.0).unwrap().unwrap();
        assert_eq!(decode(&ping), Packet::PingReq);
        assert_eq!(s.on_tick(21_000.0), Ok(None), "one ping per period");
        s.on_packet(Packet::PingResp, 21_000.0, &mut Vec::new())
            .unwrap();
        assert!(s.on_tick(40_000.0).unwrap().is_some());
        assert!(s.on_tick(21_000.0 + DEAD_AFTER_MS - 1.0).is_ok());
        assert_eq!(
            s.on_tick(21_000.0 + DEAD_AFTER_MS + 1.0),
            Err(SessionError::Silent)
        );
    }

    #[test]
    fn a_handshake_that_takes_too_long_is_given_up() {
        // No CONNACK.
        let (mut s, _) = Session::open("dash-x", &all(), None, 0.0).unwrap();
        assert_eq!(s.on_tick(HANDSHAKE_MS - 1.0), Ok(None));
        assert_eq!(
            s.on_tick(HANDSHAKE_MS + 1.0),
            Err(SessionError::HandshakeTimeout(Phase::AwaitingConnAck))
        );
        // A CONNACK but no SUBACK: the broker answers, but serves nothing.
        let (mut s, _) = Session::open("dash-x", &all(), None, 0.0).unwrap();
        accept(&mut s, 3_000.0, &mut Vec::new());
        assert_eq!(
            s.on_tick(HANDSHAKE_MS + 1.0),
            Err(SessionError::HandshakeTimeout(Phase::AwaitingSubAck))
        );
        // Subscribed in time: no deadline any more.
        let (mut s, _) = Session::open("dash-x", &all(), None, 0.0).unwrap();
        accept(&mut s, 1_000.0, &mut Vec::new());
        granted(&mut s, 9_000.0, &mut Vec::new());
        assert_eq!(s.on_tick(HANDSHAKE_MS + 1.0), Ok(None));
    }
}
