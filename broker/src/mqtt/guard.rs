//! [`Guard`]: the MQTT 3.1.1 codec of every connection, wrapped with the broker's rules (who
//! the client is, its client id, its last will, every PUBLISH and SUBSCRIBE, the per-login
//! bounds, a PROXY protocol header where one is expected).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::{Buf, BytesMut};
use ppp::PartialResult as _;
use renkei_shared::{Timestamp, Topic};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{self, ConnectReturnCode, Login, Packet, Protocol, SubscribeReasonCode};

use super::admission::{Admission, Ticket};
use crate::acl;
use crate::auth::{Access, Authenticator, Principal};
use crate::metrics::Metrics;
use crate::receipts::{Interest, Wants};

use super::hook::{ConnectRefusal, connack_code};
use super::{RESERVED_CLIENT_ID_PREFIX, admission};

/// Longest PROXY protocol header read (v1 is at most 107 bytes; v2 may carry TLVs).
const MAX_PROXY_HEADER: usize = 4096;

/// MQTT 3.1.1 as rumqttd reads it, plus the broker's own rules on every connection.
///
/// rumqttd clones the listener's protocol value for each accepted connection and drops the
/// clone when the connection ends, so an armed clone is exactly one open connection, and the
/// place to keep who that connection is.
///
/// A refused PUBLISH (or last will) closes the connection: MQTT 3.1.1 has no per-publish
/// refusal, and the packet never reaches the router, so it is neither forwarded nor retained.
/// A refused SUBSCRIBE filter is swapped for [`acl::REFUSED_FILTER`] on the way in, and its
/// return code in the SUBACK on the way out becomes 0x80 (failure).
pub struct Guard {
    inner: V4,
    open: Arc<AtomicI64>,
    /// False for the listener's own value, true for a connection's.
    armed: bool,
    auth: Arc<Authenticator>,
    metrics: Arc<Metrics>,
    /// Who the connection is, from its CONNECT.
    principal: Option<Principal>,
    /// The listener's connections start with a PROXY protocol header (the MQTTS relay, or a
    /// load balancer with `mqtt.proxy_protocol`).
    proxied: bool,
    /// The connection's PROXY header has been read.
    header_read: bool,
    /// The client's address: the one the listener accepted, or the PROXY header's.
    peer: Option<IpAddr>,
    /// Receipt subscriptions of all connections, and this connection's (removed on drop).
    interest: Arc<Interest>,
    receipt_filters: Vec<Wants>,
    /// SUBSCRIBE packet ids → positions of refused filters, until their SUBACK goes out.
    /// A mutex because `Protocol::write` takes `&self`.
    refused_filters: Mutex<HashMap<u16, Vec<usize>>>,
    /// Client ids bound to logins, and the bounds on what a login holds.
    admission: Arc<Admission>,
    /// This connection's claim on its session, from CONNECT on.
    ticket: Option<Arc<Ticket>>,
    /// A bound was hit: logged once per connection, then only counted.
    limit_logged: AtomicBool,
    /// This connection is the relay of this ward, counted up in `metrics.relays`.
    relay_up: Option<renkei_shared::WardCode>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("armed", &self.armed)
            .field("principal", &self.principal)
            .finish_non_exhaustive()
    }
}

impl Guard {
    pub(super) fn listening(
        open: Arc<AtomicI64>,
        auth: Arc<Authenticator>,
        metrics: Arc<Metrics>,
        proxied: bool,
        interest: Arc<Interest>,
        admission: Arc<Admission>,
    ) -> Self {
        Guard {
            inner: V4,
            open,
            armed: false,
            auth,
            metrics,
            principal: None,
            proxied,
            header_read: false,
            peer: None,
            interest,
            receipt_filters: Vec::new(),
            refused_filters: Mutex::new(HashMap::new()),
            admission,
            ticket: None,
            limit_logged: AtomicBool::new(false),
            relay_up: None,
        }
    }

    /// Logs a bound hit by this connection, the first time only; counts every time.
    fn over_limit(&self, packet: &'static str, reason: &'static str, what: &str) {
        self.metrics.acl_refused(packet, reason);
        if !self.limit_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                user = %self.principal.as_ref().map_or("", |p| p.name.as_str()),
                packet,
                reason,
                what = %short(what),
                "refused: over a per-login bound (logged once per connection)"
            );
        }
    }

    /// Reads the PROXY protocol header (v1 or v2) that starts the stream: the client's address.
    /// Anything else first, or a header that does not parse, closes the connection.
    fn read_proxy_header(&mut self, stream: &mut BytesMut) -> Result<(), protocol::Error> {
        const V1: &[u8] = b"PROXY ";
        const V2: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
        let refuse = |why: &str| {
            self.metrics.login_refused("bad_proxy_header");
            tracing::info!(why, "refused connection: no valid PROXY protocol header");
            Err(protocol::Error::InvalidProtocol)
        };
        let starts_like = |sig: &[u8]| {
            let n = stream.len().min(sig.len());
            stream[..n] == sig[..n]
        };
        if !starts_like(V1) && !starts_like(V2) {
            return refuse("the stream does not start with one");
        }
        let parsed = ppp::HeaderResult::parse(&stream[..]);
        if parsed.is_incomplete() {
            if stream.len() > MAX_PROXY_HEADER {
                return refuse("header too long");
            }
            return Err(protocol::Error::InsufficientBytes(1));
        }
        let (len, peer) = match parsed {
            ppp::HeaderResult::V1(Ok(h)) => (
                h.header.len(),
                match h.addresses {
                    ppp::v1::Addresses::Tcp4(a) => Some(IpAddr::V4(a.source_address)),
                    ppp::v1::Addresses::Tcp6(a) => Some(IpAddr::V6(a.source_address)),
                    ppp::v1::Addresses::Unknown => None,
                },
            ),
            ppp::HeaderResult::V2(Ok(h)) => (
                h.len(),
                match h.addresses {
                    ppp::v2::Addresses::IPv4(a) => Some(IpAddr::V4(a.source_address)),
                    ppp::v2::Addresses::IPv6(a) => Some(IpAddr::V6(a.source_address)),
                    ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => None,
                },
            ),
            ppp::HeaderResult::V1(Err(_)) | ppp::HeaderResult::V2(Err(_)) => {
                return refuse("the header does not parse");
            }
        };
        stream.advance(len);
        self.header_read = true;
        self.peer = peer;
        Ok(())
    }

    fn on_connect(&mut self, packet: Packet) -> Result<Packet, protocol::Error> {
        let Packet::Connect(connect, props, will, will_props, mut login) = packet else {
            return Ok(packet);
        };
        if self.principal.is_some() {
            return Err(protocol::Error::InvalidProtocol);
        }
        if connect.client_id.starts_with(RESERVED_CLIENT_ID_PREFIX) {
            tracing::warn!(
                client_id = %connect.client_id,
                "refused CONNECT: client id uses the broker's reserved prefix"
            );
            return Err(refuse_connect(ConnectReturnCode::ClientIdentifierNotValid));
        }
        let name = login.as_ref().map(|l| l.username.as_str());
        let principal = self
            .auth
            .identify_from(self.peer, name)
            .map_err(|refusal| {
                tracing::info!(
                    client_id = %short(&connect.client_id),
                    user = %short(name.unwrap_or("")),
                    peer = ?self.peer,
                    reason = refusal.reason(),
                    "refused CONNECT"
                );
                refuse_connect(connack_code(ConnectRefusal::Login(refusal)))
            })?;
        if let Err(refusal) = admission::may_use_client_id(
            &principal,
            &connect.client_id,
            |name| self.auth.is_user(name),
            |id| self.auth.agent_owns(id),
        ) {
            self.metrics.login_refused(refusal.reason());
            tracing::info!(
                client_id = %short(&connect.client_id),
                user = %principal.name,
                reason = refusal.reason(),
                "refused CONNECT: the client id belongs to another login"
            );
            return Err(refuse_connect(ConnectReturnCode::ClientIdentifierNotValid));
        }
        if let Some(will) = &will {
            let topic = std::str::from_utf8(&will.topic).unwrap_or("");
            if let Err(reason) = acl::may_publish(&principal, topic) {
                self.metrics.acl_refused("will", reason);
                tracing::info!(
                    client_id = %short(&connect.client_id),
                    user = %principal.name,
                    topic = %short(topic),
                    reason,
                    "refused CONNECT: last will on a forbidden topic"
                );
                return Err(refuse_connect(ConnectReturnCode::NotAuthorized));
            }
        }
        if principal.access == Access::Demo && login.is_none() {
            // rumqttd calls its auth hook only for a CONNECT with a login; an empty one is
            // what the hook admits as anonymous in demo mode.
            login = Some(Box::new(Login {
                username: String::new(),
                password: String::new(),
            }));
        }
        if let Some(login) = &login {
            // The auth hook, which checks the password next, is told neither the address nor
            // the session: it finds them here, and fills the ticket when it admits.
            self.ticket = Some(self.admission.expect(
                &connect.client_id,
                &login.username,
                &login.password,
                self.peer,
                connect.clean_session,
            ));
        }
        self.principal = Some(principal);
        Ok(Packet::Connect(connect, props, will, will_props, login))
    }

    /// A relay's report of its ward's line: its backlog, kept for the API and the dashboard.
    /// One that does not read is logged and passed on (integrators may read it).
    fn line_report(&self, ward: renkei_shared::WardCode, payload: &[u8]) {
        use renkei_shared::line::{LineReport, MAX_REPORT_BYTES};
        let report = (payload.len() <= MAX_REPORT_BYTES)
            .then(|| serde_json::from_slice::<LineReport>(payload).ok())
            .flatten();
        match report {
            Some(report) => self.metrics.relays.report(ward, report, Timestamp::now()),
            None => {
                tracing::info!(%ward, bytes = payload.len(), "a relay's line report does not read")
            }
        }
    }

    fn check_publish(&self, packet: Packet) -> Result<Packet, protocol::Error> {
        let Packet::Publish(mut publish, props) = packet else {
            return Ok(packet);
        };
        let principal = self
            .principal
            .as_ref()
            .ok_or(protocol::Error::InvalidProtocol)?;
        let topic = &publish.topic;
        let verdict = std::str::from_utf8(topic)
            .map_err(|_| "not_utf8")
            .and_then(|topic| acl::may_publish(principal, topic).map(|()| topic));
        let topic = match verdict {
            Ok(topic) => topic,
            Err(reason) => {
                self.metrics.acl_refused("publish", reason);
                tracing::info!(
                    user = %principal.name,
                    topic = %short(&String::from_utf8_lossy(topic)),
                    reason,
                    "refused PUBLISH: disconnecting"
                );
                return Err(protocol::Error::InvalidProtocol);
            }
        };
        if let Some(ward) = self.relay_up {
            self.metrics.relays.heard(ward, Timestamp::now());
            if renkei_shared::line::parse_line_topic(topic) == Some(ward) {
                self.line_report(ward, &publish.payload);
            }
        }
        let parsed = Topic::parse(topic).ok();
        if let Some(Topic::AlertAck { .. } | Topic::RequestAck { .. }) = &parsed
            && let Ok(envelope) = renkei_shared::decode(&publish.payload)
            && let renkei_shared::Body::Ack(ack) = &envelope.body
            && let Err(reason) = acl::ack_author(principal, &ack.by)
        {
            // What does not decode is ingest's to refuse and quarantine, as on any topic.
            self.metrics.acl_refused("publish", reason);
            tracing::info!(
                user = %principal.name,
                by = %ack.by.user,
                reason,
                "refused PUBLISH: an acknowledgement in another user's name: disconnecting"
            );
            return Err(protocol::Error::InvalidProtocol);
        }
        if let Some(parsed) = &parsed
            && let Err(reason) = self.admission.publish_item(parsed)
        {
            // Over a bound the publish is taken off the router's path, not the connection
            // closed: an agent would send it again at once on reconnect, ahead of every
            // other report. It gets its PUBACK, no receipt, and keeps the report.
            self.over_limit("publish", reason, topic);
            publish.topic = SINK_TOPIC.as_bytes().to_vec().into();
            publish.retain = false;
        }
        Ok(Packet::Publish(publish, props))
    }

    fn check_subscribe(&mut self, packet: Packet) -> Result<Packet, protocol::Error> {
        let Packet::Subscribe(mut subscribe, props) = packet else {
            return Ok(packet);
        };
        let principal = self
            .principal
            .as_ref()
            .ok_or(protocol::Error::InvalidProtocol)?;
        let mut refused = Vec::new();
        for (i, filter) in subscribe.filters.iter_mut().enumerate() {
            let within_bounds = || match &self.ticket {
                Some(ticket) => ticket.subscribe(&filter.path),
                None => Err("not_admitted"),
            };
            if !acl::may_subscribe(principal, &filter.path) {
                self.metrics.acl_refused("subscribe", "filter");
                tracing::info!(
                    user = %principal.name,
                    filter = %short(&filter.path),
                    "refused subscription"
                );
                filter.path = acl::REFUSED_FILTER.to_owned();
                refused.push(i);
            } else if let Err(reason) = within_bounds() {
                self.over_limit("subscribe", reason, &filter.path);
                filter.path = acl::REFUSED_FILTER.to_owned();
                refused.push(i);
            } else if let Some(wants) = Interest::of_filter(&filter.path) {
                // Kept until the connection ends (an UNSUBSCRIBE only costs unread receipts).
                self.interest.add(&wants);
                // A relay's subscription to its ward's receipts: it is up (at HQ). In demo
                // mode relays log in anonymously, and the subscription alone says which.
                let relay_of = match (&wants, self.principal.as_ref().map(|p| &p.access)) {
                    (Wants::Ward(ward), Some(Access::Relay(own))) if ward == own => Some(*ward),
                    (Wants::Ward(ward), Some(Access::Demo)) => Some(*ward),
                    _ => None,
                };
                if let Some(ward) = &relay_of
                    && self.relay_up.is_none()
                {
                    let name = self.principal.as_ref().map_or("", |p| p.name.as_str());
                    self.metrics.relays.up(*ward, name, Timestamp::now());
                    self.relay_up = Some(*ward);
                }
                self.receipt_filters.push(wants);
            }
        }
        if !refused.is_empty() {
            self.refused_filters
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(subscribe.pkid, refused);
        }
        Ok(Packet::Subscribe(subscribe, props))
    }
}

/// Where a publish over a per-login bound goes instead of its topic: no client may subscribe
/// to a `$` topic ([`acl::may_subscribe`]) and no wildcard matches one, so it reaches no one,
/// and it is never retained.
pub const SINK_TOPIC: &str = "$renkei/refused";

/// A CONNECT refused by the guard: the embedded rumqttd answers it with a CONNACK carrying
/// `code` and then closes the connection (its patch 10), so the client learns why.
pub(super) fn refuse_connect(code: ConnectReturnCode) -> protocol::Error {
    protocol::Error::ConnectRefused(code)
}

/// Text from the network, cut short for a log line.
pub(super) fn short(text: &str) -> String {
    text.chars().take(160).collect()
}

impl Clone for Guard {
    fn clone(&self) -> Self {
        self.open.fetch_add(1, Ordering::Relaxed);
        Guard {
            inner: self.inner.clone(),
            open: self.open.clone(),
            armed: true,
            auth: self.auth.clone(),
            metrics: self.metrics.clone(),
            principal: None,
            proxied: self.proxied,
            header_read: false,
            peer: None,
            interest: self.interest.clone(),
            receipt_filters: Vec::new(),
            refused_filters: Mutex::new(HashMap::new()),
            admission: self.admission.clone(),
            ticket: None,
            limit_logged: AtomicBool::new(false),
            relay_up: None,
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.armed {
            self.open.fetch_sub(1, Ordering::Relaxed);
        }
        for wants in &self.receipt_filters {
            self.interest.remove(wants);
        }
        if let Some(ward) = self.relay_up {
            self.metrics.relays.down(ward, Timestamp::now());
        }
    }
}

impl Protocol for Guard {
    /// The address a direct TCP or WebSocket connection came from. Behind a PROXY-protocol
    /// front (the MQTTS relay, a load balancer), the accepted address is the front's own, and
    /// the header names the client instead.
    fn accepted_from(&mut self, peer: SocketAddr) {
        if !self.proxied {
            self.peer = Some(peer.ip());
        }
    }

    fn read_mut(
        &mut self,
        stream: &mut BytesMut,
        max_size: usize,
    ) -> Result<Packet, protocol::Error> {
        if self.proxied && !self.header_read {
            self.read_proxy_header(stream)?;
        }
        let packet = match self.inner.read_mut(stream, max_size) {
            Ok(packet) => packet,
            Err(protocol::Error::PayloadSizeLimitExceeded(len)) => {
                // rumqttd closes the connection; the refusal is counted with ingest's.
                self.metrics.rejected("oversize_packet");
                tracing::info!(
                    len,
                    max_size,
                    "refused a packet over mqtt.max_packet_size: disconnecting"
                );
                return Err(protocol::Error::PayloadSizeLimitExceeded(len));
            }
            Err(e) => return Err(e),
        };
        match packet {
            Packet::Connect(..) => self.on_connect(packet),
            Packet::Publish(..) => self.check_publish(packet),
            Packet::Subscribe(..) => self.check_subscribe(packet),
            Packet::Unsubscribe(ref unsubscribe, _) => {
                if let Some(ticket) = &self.ticket {
                    for filter in &unsubscribe.filters {
                        ticket.unsubscribe(filter);
                    }
                }
                Ok(packet)
            }
            other => Ok(other),
        }
    }

    fn write(&self, packet: Packet, write: &mut BytesMut) -> Result<usize, protocol::Error> {
        let packet = match packet {
            Packet::SubAck(mut suback, props) => {
                let refused = self
                    .refused_filters
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&suback.pkid);
                for i in refused.into_iter().flatten() {
                    if let Some(code) = suback.return_codes.get_mut(i) {
                        *code = SubscribeReasonCode::Failure;
                    }
                }
                Packet::SubAck(suback, props)
            }
            other => other,
        };
        self.inner.write(packet, write)
    }
}
