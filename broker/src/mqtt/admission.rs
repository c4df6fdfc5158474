//! Who may hold which MQTT session, and what one login may cost the broker.
//!
//! rumqttd resumes a saved session (its subscriptions, read positions and pending commands) by
//! client id alone, and a new connection with a connected client's id closes the old one and
//! decides whether its last will fires. So the client id is part of the identity, and each one
//! is bound to a login here:
//!
//! | login             | client ids it may use                                                  |
//! |-------------------|------------------------------------------------------------------------|
//! | agent of site S   | `agent-{S.ward}-{S.site}` only                                         |
//! | any other user U  | `U` or `U-…`, unless a longer user name owns it (`U-x` owns `U-x-…`), and never an agent's id |
//! | anonymous (demo)  | any id no user owns                                                    |
//! | everyone          | the empty id with a clean session (rumqttd then assigns a random one)   |
//!
//! Anything else gets CONNACK 2 (identifier rejected) before the router sees the connection,
//! so a refused impostor never closes the real client's connection, never fires or cancels
//! its will, and never reads or changes its saved session. On top of the static rule, every
//! session the broker holds remembers the user that created it and is resumed by no one else
//! (a user removed and a new one whose name now covers the id cannot inherit it).
//!
//! What one login may cost is bounded here too, each bound in `[mqtt]`:
//! - `max_connections_per_user`: sessions a user holds at once, open connections and saved
//!   persistent sessions alike (an agent has exactly one id, so at most one);
//! - `max_filters_per_connection` and `max_filters_per_user`: subscribed filters, counted per
//!   session (a persistent session keeps its filters while its client is away, and they keep
//!   counting);
//! - `max_items_per_site`: distinct request, incident and request-acknowledgement ids per
//!   site, each of which the broker retains.
//!
//! A connection past a bound is refused at CONNECT with CONNACK 3 (server unavailable); a
//! filter past a bound gets SUBACK 0x80; a publish past a bound is taken off the router's path
//! (the client gets its PUBACK, nothing is forwarded, retained or recorded, and an agent keeps
//! the report in its outbox, since no receipt names it). Every refusal is counted in
//! `/metrics` and logged once per connection.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use blake2::{Blake2b512, Digest as _};
use renkei_shared::topic::SiteChannel;
use renkei_shared::{SiteRef, Topic};

use crate::auth::{Access, Principal};

/// Why a CONNECT's client id or a session is refused; labels `renkei_logins_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionRefusal {
    /// The id is not one this login may use (CONNACK 2).
    NotYourClientId,
    /// The broker holds a session of that id created by another user (CONNACK 2).
    SessionOfAnotherUser,
    /// The user already holds `max_connections_per_user` sessions (CONNACK 3).
    TooManyConnections,
}

impl SessionRefusal {
    pub fn reason(self) -> &'static str {
        match self {
            SessionRefusal::NotYourClientId => "client_id_not_yours",
            SessionRefusal::SessionOfAnotherUser => "session_of_another_user",
            SessionRefusal::TooManyConnections => "too_many_connections",
        }
    }

    /// Whether MQTT 3.1.1's "identifier rejected" (2) answers it; otherwise "server
    /// unavailable" (3).
    pub fn identifier_rejected(self) -> bool {
        !matches!(self, SessionRefusal::TooManyConnections)
    }
}

/// The bounds on one login, from `[mqtt]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub connections_per_user: usize,
    pub filters_per_connection: usize,
    pub filters_per_user: usize,
    pub items_per_site: usize,
}

/// Whether `client_id` has the shape of an agent's id (`agent-` and six digits, then `-`): such
/// ids belong to agents, whatever other user names look like.
fn looks_like_agent_id(client_id: &str) -> bool {
    client_id.strip_prefix("agent-").is_some_and(|rest| {
        let b = rest.as_bytes();
        b.len() > 7 && b[..6].iter().all(u8::is_ascii_digit) && b[6] == b'-'
    })
}

/// The static rule of the table above. `is_user` says whether a user name exists, and
/// `agent_of` whether an agent user exists for the site an agent-shaped id names.
pub fn may_use_client_id(
    principal: &Principal,
    client_id: &str,
    is_user: impl Fn(&str) -> bool,
    agent_owns: impl Fn(&str) -> bool,
) -> Result<(), SessionRefusal> {
    if client_id.is_empty() {
        return Ok(());
    }
    let refused = Err(SessionRefusal::NotYourClientId);
    match &principal.access {
        Access::Agent(site) => {
            if client_id == site.agent_client_id() {
                Ok(())
            } else {
                refused
            }
        }
        Access::Probe => refused,
        Access::Demo => {
            if looks_like_agent_id(client_id) {
                return if agent_owns(client_id) {
                    refused
                } else {
                    Ok(())
                };
            }
            // Owned by a user if it is a user name or extends one with '-'.
            let owned = is_user(client_id)
                || client_id
                    .match_indices('-')
                    .any(|(i, _)| is_user(&client_id[..i]));
            if owned { refused } else { Ok(()) }
        }
        Access::Ward(_) | Access::Hq | Access::Integrator | Access::Admin | Access::Relay(_) => {
            let user = principal.name.as_str();
            if looks_like_agent_id(client_id) {
                return refused;
            }
            let Some(rest) = client_id.strip_prefix(user) else {
                return refused;
            };
            if rest.is_empty() {
                return Ok(());
            }
            if !rest.starts_with('-') {
                return refused;
            }
            // A longer user name that the id also extends owns it.
            let longer_owner = client_id
                .match_indices('-')
                .filter(|(i, _)| *i > user.len())
                .any(|(i, _)| is_user(&client_id[..i]))
                || is_user(client_id);
            if longer_owner { refused } else { Ok(()) }
        }
    }
}

/// What the guard of a connection learns at CONNECT, handed to the auth hook that runs next
/// (rumqttd tells the hook only the client id, user name and password).
#[derive(Debug)]
struct Pending {
    peer: Option<IpAddr>,
    clean_session: bool,
    ticket: Weak<Ticket>,
}

/// A connection's claim on a session, filled by the auth hook once the login is admitted and
/// released when the connection's guard is dropped.
#[derive(Debug, Default)]
pub struct Ticket {
    held: Mutex<Option<Held>>,
}

#[derive(Debug)]
struct Held {
    admission: Weak<Admission>,
    /// The session's key: the client id, or a key of the connection's own for an empty id.
    key: String,
    user: String,
}

impl Ticket {
    /// The session this connection holds, once admitted.
    fn held(&self) -> Option<(Arc<Admission>, String, String)> {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let h = held.as_ref()?;
        Some((h.admission.upgrade()?, h.key.clone(), h.user.clone()))
    }

    /// Whether `filter` may be added to this connection's session; counts it if so.
    pub fn subscribe(&self, filter: &str) -> Result<(), &'static str> {
        match self.held() {
            Some((admission, key, user)) => admission.subscribe(&key, &user, filter),
            // Not admitted (the hook never ran): no session to subscribe in.
            None => Err("not_admitted"),
        }
    }

    /// Takes `filter` off this connection's session count.
    pub fn unsubscribe(&self, filter: &str) {
        if let Some((admission, key, user)) = self.held() {
            admission.unsubscribe(&key, &user, filter);
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let held = self
            .held
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(h) = held
            && let Some(admission) = h.admission.upgrade()
        {
            admission.release(&h.key, &h.user);
        }
    }
}

#[derive(Debug)]
struct Session {
    owner: String,
    /// Kept by rumqttd when no connection has it (clean_session = false).
    persistent: bool,
    /// Connections holding it: a reconnect is admitted before the router closes the old one.
    open: usize,
    filters: HashSet<String>,
}

#[derive(Debug, Default)]
struct UserUse {
    sessions: usize,
    filters: usize,
}

#[derive(Debug, Default)]
struct Book {
    sessions: HashMap<String, Session>,
    users: HashMap<String, UserUse>,
    /// Request, incident and request-ack ids seen per site, by channel.
    items: HashMap<(SiteRef, ItemKind), HashSet<String>>,
    /// Keys for connections with an empty client id.
    anonymous_keys: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ItemKind {
    Request,
    Incident,
    RequestAck,
}

/// The session book of one broker; see the module docs.
#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    book: Mutex<Book>,
    /// CONNECTs between their guard and their auth hook, by a keyed digest of what the hook
    /// is told (client id, user name, password).
    pending: Mutex<HashMap<[u8; 64], Pending>>,
    /// Keys the digests, so that the map holds nothing a memory dump could check offline.
    secret: [u8; 32],
    /// Itself, for the tickets it hands out.
    this: Weak<Admission>,
}

/// Pending CONNECTs kept at most; past it the oldest are forgotten (their hook then finds no
/// entry and refuses with CONNACK 3, and the client retries).
const MAX_PENDING: usize = 100_000;

impl Admission {
    pub fn new(limits: Limits) -> Arc<Admission> {
        Arc::new_cyclic(|this| Admission {
            limits,
            book: Mutex::new(Book::default()),
            pending: Mutex::new(HashMap::new()),
            secret: rand::random(),
            this: this.clone(),
        })
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    fn key(&self, client_id: &str, user: &str, password: &str) -> [u8; 64] {
        let mut h = Blake2b512::new();
        h.update(self.secret);
        for field in [client_id, user, password] {
            h.update((field.len() as u64).to_le_bytes());
            h.update(field.as_bytes());
        }
        h.finalize().into()
    }

    /// The guard's half: remembers a CONNECT for the auth hook. Returns the ticket the
    /// connection keeps until it ends.
    pub fn expect(
        &self,
        client_id: &str,
        user: &str,
        password: &str,
        peer: Option<IpAddr>,
        clean_session: bool,
    ) -> Arc<Ticket> {
        let ticket = Arc::new(Ticket::default());
        let key = self.key(client_id, user, password);
        let mut pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        if pending.len() >= MAX_PENDING {
            pending.retain(|_, p| p.ticket.strong_count() > 0);
            if pending.len() >= MAX_PENDING {
                pending.clear();
            }
        }
        // A second CONNECT with the same key replaces the first: both are the same client id
        // of the same login, and the router keeps only one of them anyway.
        pending.insert(
            key,
            Pending {
                peer,
                clean_session,
                ticket: Arc::downgrade(&ticket),
            },
        );
        ticket
    }

    /// The hook's half: the address the guard saw for this CONNECT (for the lockout), and
    /// whether the guard saw it at all.
    pub fn peer_of(&self, client_id: &str, user: &str, password: &str) -> Option<Option<IpAddr>> {
        let key = self.key(client_id, user, password);
        let pending = self.pending.lock().unwrap_or_else(PoisonError::into_inner);
        pending.get(&key).map(|p| p.peer)
    }

    /// The hook's last step, after the password: binds the connection to the session of
    /// `client_id`, within the user's bounds.
    pub fn admit(
        &self,
        principal: &Principal,
        client_id: &str,
        user: &str,
        password: &str,
    ) -> Result<(), SessionRefusal> {
        let key = self.key(client_id, user, password);
        let Some(pending) = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&key)
        else {
            return Err(SessionRefusal::TooManyConnections);
        };
        let Some(ticket) = pending.ticket.upgrade() else {
            // The connection is already gone.
            return Err(SessionRefusal::TooManyConnections);
        };
        let owner = principal.name.clone();
        let mut book = self.book.lock().unwrap_or_else(PoisonError::into_inner);
        let session_key = if client_id.is_empty() {
            book.anonymous_keys += 1;
            // '\0' cannot start an MQTT client id: no client can name this session.
            format!("\0{}", book.anonymous_keys)
        } else {
            client_id.to_owned()
        };
        let book = &mut *book;
        match book.sessions.get_mut(&session_key) {
            Some(session) if session.owner != owner => {
                return Err(SessionRefusal::SessionOfAnotherUser);
            }
            Some(session) => {
                session.open += 1;
                if pending.clean_session {
                    // rumqttd drops the saved session, filters and all.
                    let dropped = std::mem::take(&mut session.filters).len();
                    if let Some(u) = book.users.get_mut(&owner) {
                        u.filters = u.filters.saturating_sub(dropped);
                    }
                }
                session.persistent = !pending.clean_session;
            }
            None => {
                let usage = book.users.entry(owner.clone()).or_default();
                // Anonymous demo clients share no identity to bound; each is still bounded
                // per connection.
                let bounded = principal.access != Access::Demo;
                if bounded && usage.sessions >= self.limits.connections_per_user {
                    return Err(SessionRefusal::TooManyConnections);
                }
                usage.sessions += 1;
                book.sessions.insert(
                    session_key.clone(),
                    Session {
                        owner: owner.clone(),
                        persistent: !pending.clean_session,
                        open: 1,
                        filters: HashSet::new(),
                    },
                );
            }
        }
        *ticket.held.lock().unwrap_or_else(PoisonError::into_inner) = Some(Held {
            admission: self.this.clone(),
            key: session_key,
            user: owner,
        });
        Ok(())
    }

    /// A connection ended: its session goes unless rumqttd keeps it (persistent).
    fn release(&self, key: &str, user: &str) {
        let mut book = self.book.lock().unwrap_or_else(PoisonError::into_inner);
        let book = &mut *book;
        let Some(session) = book.sessions.get_mut(key) else {
            return;
        };
        session.open = session.open.saturating_sub(1);
        if session.open == 0 && !session.persistent {
            let filters = session.filters.len();
            book.sessions.remove(key);
            if let Some(u) = book.users.get_mut(user) {
                u.sessions = u.sessions.saturating_sub(1);
                u.filters = u.filters.saturating_sub(filters);
                if u.sessions == 0 {
                    book.users.remove(user);
                }
            }
        }
    }

    fn subscribe(&self, key: &str, user: &str, filter: &str) -> Result<(), &'static str> {
        let mut book = self.book.lock().unwrap_or_else(PoisonError::into_inner);
        let book = &mut *book;
        let Some(session) = book.sessions.get_mut(key) else {
            return Err("not_admitted");
        };
        if session.filters.contains(filter) {
            return Ok(());
        }
        if session.filters.len() >= self.limits.filters_per_connection {
            return Err("filters_per_connection");
        }
        let usage = book.users.entry(user.to_owned()).or_default();
        // The empty name is anonymous demo clients, each bounded per connection only.
        if !user.is_empty() && usage.filters >= self.limits.filters_per_user {
            return Err("filters_per_user");
        }
        usage.filters += 1;
        session.filters.insert(filter.to_owned());
        Ok(())
    }

    fn unsubscribe(&self, key: &str, user: &str, filter: &str) {
        let mut book = self.book.lock().unwrap_or_else(PoisonError::into_inner);
        let book = &mut *book;
        if let Some(session) = book.sessions.get_mut(key)
            && session.filters.remove(filter)
            && let Some(u) = book.users.get_mut(user)
        {
            u.filters = u.filters.saturating_sub(1);
        }
    }

    /// Whether a publish on `topic` stays within its site's item bound; counts a new id.
    /// Topics that carry no item id always pass.
    pub fn publish_item(&self, topic: &Topic) -> Result<(), &'static str> {
        let Some((site, kind, id)) = item_of(topic) else {
            return Ok(());
        };
        let mut book = self.book.lock().unwrap_or_else(PoisonError::into_inner);
        let ids = book.items.entry((site.clone(), kind)).or_default();
        if ids.contains(id) {
            return Ok(());
        }
        if ids.len() >= self.limits.items_per_site {
            return Err("items_per_site");
        }
        ids.insert(id.to_owned());
        Ok(())
    }

    /// Counts the items the broker already retains (restored from its record at start).
    pub fn seed_item(&self, topic: &Topic) {
        if let Some((site, kind, id)) = item_of(topic) {
            let mut book = self.book.lock().unwrap_or_else(PoisonError::into_inner);
            book.items
                .entry((site.clone(), kind))
                .or_default()
                .insert(id.to_owned());
        }
    }

    /// Sessions held now, and sessions of `user` (for tests and metrics).
    pub fn sessions_of(&self, user: &str) -> usize {
        let book = self.book.lock().unwrap_or_else(PoisonError::into_inner);
        book.users.get(user).map_or(0, |u| u.sessions)
    }
}

fn item_of(topic: &Topic) -> Option<(&SiteRef, ItemKind, &str)> {
    match topic {
        Topic::Site {
            site,
            channel: SiteChannel::Request(id),
        } => Some((site, ItemKind::Request, id.as_str())),
        Topic::Site {
            site,
            channel: SiteChannel::Incident(id),
        } => Some((site, ItemKind::Incident, id.as_str())),
        Topic::RequestAck { site, request_id } => {
            Some((site, ItemKind::RequestAck, request_id.as_str()))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use renkei_shared::sample;

    fn user(name: &str, access: Access) -> Principal {
        Principal {
            name: name.into(),
            access,
        }
    }

    const USERS: &[&str] = &["hq", "hq-sato", "dis", "agent-nishi"];

    fn check(p: &Principal, id: &str) -> Result<(), SessionRefusal> {
        may_use_client_id(
            p,
            id,
            |n| USERS.contains(&n),
            |id| id == "agent-131041-es-a",
        )
    }

    #[test]
    fn agents_use_only_their_own_sites_id() {
        let site = sample::site();
        let agent = user("agent-nishi", Access::Agent(site.clone()));
        assert_eq!(check(&agent, &site.agent_client_id()), Ok(()));
        for id in ["agent-nishi", "agent-131041-other", "hq", "x"] {
            assert_eq!(
                check(&agent, id),
                Err(SessionRefusal::NotYourClientId),
                "{id}"
            );
        }
        assert_eq!(check(&agent, ""), Ok(()), "the empty id gets a random one");
    }

    #[test]
    fn users_use_ids_under_their_name_that_no_longer_name_owns() {
        let hq = user("hq", Access::Hq);
        for id in ["hq", "hq-1", "hq-dash-abc"] {
            assert_eq!(check(&hq, id), Ok(()), "{id}");
        }
        for id in [
            "hq-sato",
            "hq-sato-dash",
            "hqx",
            "sato",
            "agent-131041-es-a",
            "h",
        ] {
            assert_eq!(check(&hq, id), Err(SessionRefusal::NotYourClientId), "{id}");
        }
        let sato = user("hq-sato", Access::Hq);
        assert_eq!(check(&sato, "hq-sato-dash-1"), Ok(()));
        assert!(check(&sato, "hq-1").is_err());
        let dis = user("dis", Access::Integrator);
        assert!(
            check(&dis, "agent-131041-es-b").is_err(),
            "agent ids are agents'"
        );
    }

    #[test]
    fn anonymous_demo_clients_use_ids_no_user_owns() {
        let demo = Principal::demo();
        assert_eq!(check(&demo, "agent-131041-es-b"), Ok(()));
        assert_eq!(check(&demo, "dash-1234"), Ok(()));
        for id in ["agent-131041-es-a", "hq", "hq-sato-x", "dis-1"] {
            assert!(check(&demo, id).is_err(), "{id}");
        }
    }

    fn limits() -> Limits {
        Limits {
            connections_per_user: 2,
            filters_per_connection: 3,
            filters_per_user: 4,
            items_per_site: 2,
        }
    }

    fn admit(
        a: &Admission,
        p: &Principal,
        id: &str,
        clean: bool,
    ) -> (Arc<Ticket>, Result<(), SessionRefusal>) {
        let ticket = a.expect(id, &p.name, "pw", None, clean);
        let r = a.admit(p, id, &p.name, "pw");
        (ticket, r)
    }

    #[test]
    fn a_persistent_session_is_resumed_only_by_its_owner() {
        let a = Admission::new(limits());
        let old = user("hq-sato", Access::Hq);
        let (t, r) = admit(&a, &old, "hq-sato-x", false);
        r.unwrap();
        drop(t);
        // Kept while away; another user (say one whose name now covers the id) is refused.
        let other = user("hq", Access::Hq);
        let (_t, r) = admit(&a, &other, "hq-sato-x", false);
        assert_eq!(r, Err(SessionRefusal::SessionOfAnotherUser));
        let (_t, r) = admit(&a, &old, "hq-sato-x", false);
        assert_eq!(r, Ok(()));
    }

    #[test]
    fn sessions_and_filters_per_user_are_bounded_and_given_back() {
        let a = Admission::new(limits());
        let p = user("dis", Access::Integrator);
        let (t1, r) = admit(&a, &p, "dis-1", true);
        r.unwrap();
        let (t2, r) = admit(&a, &p, "dis-2", true);
        r.unwrap();
        let (_t3, r) = admit(&a, &p, "dis-3", true);
        assert_eq!(r, Err(SessionRefusal::TooManyConnections));
        // A reconnect of a held id is not a new session.
        let (t1b, r) = admit(&a, &p, "dis-1", true);
        r.unwrap();

        for f in ["a/1", "a/2", "a/3"] {
            t1.subscribe(f).unwrap();
        }
        t1.subscribe("a/1").unwrap();
        assert_eq!(t1.subscribe("a/4"), Err("filters_per_connection"));
        t2.subscribe("b/1").unwrap();
        assert_eq!(t2.subscribe("b/2"), Err("filters_per_user"));
        t1.unsubscribe("a/1");
        t2.subscribe("b/2").unwrap();

        drop((t1, t1b, t2));
        assert_eq!(a.sessions_of("dis"), 0);
        let (t, r) = admit(&a, &p, "dis-9", true);
        r.unwrap();
        for f in ["c/1", "c/2", "c/3"] {
            t.subscribe(f).unwrap();
        }
    }

    #[test]
    fn a_persistent_sessions_filters_keep_counting_while_its_client_is_away() {
        let a = Admission::new(limits());
        let p = user("dis", Access::Integrator);
        let (t, r) = admit(&a, &p, "dis-1", false);
        r.unwrap();
        for f in ["a/1", "a/2", "a/3"] {
            t.subscribe(f).unwrap();
        }
        drop(t);
        let (t, r) = admit(&a, &p, "dis-1", false);
        r.unwrap();
        assert_eq!(t.subscribe("a/4"), Err("filters_per_connection"));
        // A clean reconnect drops the saved session and its filters.
        drop(t);
        let (t, r) = admit(&a, &p, "dis-1", true);
        r.unwrap();
        t.subscribe("a/4").unwrap();
    }

    #[test]
    fn a_connect_the_guard_never_saw_is_not_admitted() {
        let a = Admission::new(limits());
        let p = user("dis", Access::Integrator);
        assert!(a.admit(&p, "dis-1", "dis", "pw").is_err());
        let t = a.expect("dis-1", "dis", "pw", None, true);
        drop(t);
        assert!(
            a.admit(&p, "dis-1", "dis", "pw").is_err(),
            "connection gone"
        );
    }

    #[test]
    fn item_ids_per_site_are_bounded() {
        let a = Admission::new(limits());
        let site = sample::site();
        let request = |id: &str| Topic::Site {
            site: site.clone(),
            channel: SiteChannel::Request(renkei_shared::Id::new(id).unwrap()),
        };
        a.seed_item(&request("r-1"));
        a.publish_item(&request("r-2")).unwrap();
        a.publish_item(&request("r-1")).unwrap();
        assert_eq!(a.publish_item(&request("r-3")), Err("items_per_site"));
        let status = Topic::Site {
            site: site.clone(),
            channel: SiteChannel::Status,
        };
        a.publish_item(&status).unwrap();
    }
}
