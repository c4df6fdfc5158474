//! Who may connect: users with roles, stored in the database, and the checks on every login.
//!
//! - A user has a [`Role`] (`agent`, `ward`, `hq`, `integrator`, `admin`); agents are bound to
//!   one site, ward operators to one ward ([`Access`]). `renkei-broker user add|list|remove`
//!   edits the `users` table; a running broker sees the change within
//!   [`DIRECTORY_REFRESH`].
//! - Passwords are stored as argon2id hashes (PHC strings). Argon2 is slow by design, so
//!   [`Authenticator::verify`] runs it on a blocking thread, at most `auth.verify_threads` at
//!   once, and remembers a successful login for `auth.login_cache_ttl` as a keyed BLAKE2 digest
//!   (never the password): 2,000 agents reconnecting after an outage cost one argon2 run each.
//! - Failed logins are counted per user name: `auth.max_failed_logins` within
//!   `auth.failed_login_window` locks the name out for `auth.lockout`. A password already
//!   verified and cached still gets in, so that guessing at an agent's name cannot lock the
//!   real agent out.
//! - Failed logins are also counted per client address where the address is known:
//!   `auth.max_failed_logins_per_address` within the same window refuses every login from that
//!   address for `auth.lockout`, cached or not, whatever the name (a guesser trying many
//!   names). HTTP knows the address of every request. On MQTT, the [`crate::mqtt::Guard`] learns
//!   it from the listener that accepted the connection (TCP and WebSocket; a patch to the
//!   vendored rumqttd, whose auth hook is not told), or from the PROXY header where the listener
//!   sits behind a front that sends one (the MQTTS relay, `mqtt.proxy_protocol`), and hands it
//!   to the auth hook through [`crate::mqtt::admission`]. IPv6 addresses count per /64 (one
//!   host usually holds a whole /64).
//! - A locked user name does not lock out that user's logins from an address where the same
//!   user logged in successfully within `auth.known_address_ttl`: guessing at a name from
//!   elsewhere cannot shut its owner out.
//! - Admission cannot be queued shut: at most `auth.verify_queue` logins wait for or hold a
//!   password check (the rest are refused at once, CONNACK 3 on MQTT, and retry), and the
//!   lockout is checked again once a check slot is free. Checks in flight for one name count
//!   as failures to come, so however many wrong passwords arrive at once, a name costs at
//!   most `auth.max_failed_logins` argon2 runs per window.
//! - In demo mode a client without a user name is [`Access::Demo`]; named users are still
//!   checked.
//!
//! What each [`Access`] may publish and subscribe to is [`crate::acl`]'s business.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString, rand_core::OsRng};
use argon2::{Argon2, PasswordVerifier};
use blake2::{Blake2b512, Digest};
use renkei_shared::{Id, Role, SiteRef, Timestamp, WardCode};
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::Semaphore;

use crate::config::AuthConfig;
use crate::db;
use crate::metrics::Metrics;

/// The readiness probe's user name: not an [`Id`], so no stored user can take it.
pub const PROBE_USER: &str = "renkei-broker:probe";

/// How stale the in-memory copy of the users table may get.
pub const DIRECTORY_REFRESH: Duration = Duration::from_secs(2);

/// What a connected client is allowed, by role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Anonymous, demo mode only.
    Demo,
    /// The broker's own readiness probe: may connect, nothing else.
    Probe,
    Agent(SiteRef),
    Ward(WardCode),
    Hq,
    Integrator,
    Admin,
    /// A ward broker's uplink: forwards its ward's record, reads what HQ sends down to it.
    Relay(WardCode),
}

impl Access {
    pub fn role(&self) -> Option<Role> {
        match self {
            Access::Demo | Access::Probe => None,
            Access::Agent(_) => Some(Role::Agent),
            Access::Ward(_) => Some(Role::Ward),
            Access::Hq => Some(Role::Hq),
            Access::Integrator => Some(Role::Integrator),
            Access::Admin => Some(Role::Admin),
            Access::Relay(_) => Some(Role::Relay),
        }
    }
}

/// An authenticated (or, in demo mode, anonymous) client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The user name; empty for [`Access::Demo`].
    pub name: String,
    pub access: Access,
}

impl Principal {
    pub fn demo() -> Principal {
        Principal {
            name: String::new(),
            access: Access::Demo,
        }
    }
}

/// One row of the `users` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub access: Access,
    pub password_hash: String,
}

/// Why a user cannot be added, or the users table cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error("users table: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("{0}")]
    Invalid(String),
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

/// Builds the access of a role from its bindings, checking that they fit the role.
pub fn access_for(
    role: Role,
    ward: Option<WardCode>,
    site: Option<&str>,
) -> Result<Access, UserError> {
    let invalid = |m: &str| Err(UserError::Invalid(m.into()));
    if let Some(ward) = ward
        && !ward.is_known()
    {
        return Err(UserError::Invalid(format!(
            "{ward} is not one of the 23 special wards"
        )));
    }
    match (role, ward, site) {
        (Role::Agent, Some(ward), Some(site)) => {
            let site = Id::new(site).map_err(|e| UserError::Invalid(e.to_string()))?;
            Ok(Access::Agent(SiteRef { ward, site }))
        }
        (Role::Agent, _, _) => invalid("an agent needs --ward and --site"),
        (Role::Ward, Some(ward), None) => Ok(Access::Ward(ward)),
        (Role::Ward, _, _) => invalid("a ward operator needs --ward and no --site"),
        (Role::Relay, Some(ward), None) => Ok(Access::Relay(ward)),
        (Role::Relay, _, _) => invalid("a relay needs --ward (the ward it serves) and no --site"),
        (_, None, None) => Ok(match role {
            Role::Hq => Access::Hq,
            Role::Integrator => Access::Integrator,
            _ => Access::Admin,
        }),
        _ => invalid("only agents, ward operators and relays take --ward / --site"),
    }
}

/// Hashes a password with argon2id at the given cost.
pub fn hash_password(password: &str, config: &AuthConfig) -> Result<String, UserError> {
    let memory_kib = u32::try_from(config.hash_memory.0 / 1024).unwrap_or(u32::MAX);
    let params = argon2::Params::new(memory_kib, config.hash_iterations, 1, None)
        .map_err(|e| UserError::Hash(e.to_string()))?;
    let argon = Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::generate(&mut OsRng);
    argon
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| UserError::Hash(e.to_string()))
}

/// Adds a user (or replaces one of the same name).
pub fn add_user(
    conn: &Connection,
    name: &str,
    access: &Access,
    password: &str,
    config: &AuthConfig,
) -> Result<(), UserError> {
    // User names appear in acknowledgement topics, so they must be topic levels.
    Id::new(name).map_err(|e| UserError::Invalid(e.to_string()))?;
    if password.is_empty() {
        return Err(UserError::Invalid("the password is empty".into()));
    }
    let role = access
        .role()
        .ok_or_else(|| UserError::Invalid("demo access is not a role".into()))?;
    let (ward, site) = match access {
        Access::Agent(s) => (Some(s.ward.0), Some(s.site.to_string())),
        Access::Ward(w) | Access::Relay(w) => (Some(w.0), None),
        _ => (None, None),
    };
    let hash = hash_password(password, config)?;
    conn.execute(
        "INSERT OR REPLACE INTO users (name, role, ward, site, password_hash, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![name, role.as_str(), ward, site, hash, Timestamp::now().0],
    )?;
    Ok(())
}

/// Removes a user; false if there was none of that name.
pub fn remove_user(conn: &Connection, name: &str) -> Result<bool, UserError> {
    Ok(conn.execute("DELETE FROM users WHERE name = ?1", [name])? > 0)
}

/// Every user, by name.
pub fn list_users(conn: &Connection) -> Result<Vec<User>, UserError> {
    let mut stmt =
        conn.prepare("SELECT name, role, ward, site, password_hash FROM users ORDER BY name")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Option<u32>>(2)?,
            r.get::<_, Option<String>>(3)?,
            r.get::<_, String>(4)?,
        ))
    })?;
    let mut users = Vec::new();
    for row in rows {
        let (name, role, ward, site, password_hash) = row?;
        // A row edited by hand into something meaningless is skipped, not fatal.
        let Some(role) = role.parse::<Role>().ok() else {
            tracing::warn!(%name, %role, "users: unknown role, ignored");
            continue;
        };
        match access_for(role, ward.map(WardCode), site.as_deref()) {
            Ok(access) => users.push(User {
                name,
                access,
                password_hash,
            }),
            Err(e) => tracing::warn!(%name, error = %e, "users: unusable row, ignored"),
        }
    }
    Ok(users)
}

/// One user, if present.
pub fn find_user(conn: &Connection, name: &str) -> Result<Option<String>, UserError> {
    Ok(conn
        .query_row("SELECT name FROM users WHERE name = ?1", [name], |r| {
            r.get(0)
        })
        .optional()?)
}

/// Why a login was refused; the names label `renkei_logins_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginRefusal {
    /// No user name, outside demo mode.
    Anonymous,
    UnknownUser,
    BadPassword,
    /// Too many failures for this name lately.
    LockedOut,
    /// Too many failures from this client address lately.
    AddressLockedOut,
    /// Too many logins waiting for a password check, or enough checks already in flight for
    /// this name to lock it: try again later.
    Busy,
    /// A relay's login at a broker that has an upstream itself (a ward broker): relays chain
    /// only to HQ, so this is a misconfigured cycle or chain, refused before it forwards.
    RelayToWardBroker,
}

impl LoginRefusal {
    pub fn reason(self) -> &'static str {
        match self {
            LoginRefusal::Anonymous => "anonymous",
            LoginRefusal::UnknownUser => "unknown_user",
            LoginRefusal::BadPassword => "bad_password",
            LoginRefusal::LockedOut => "locked_out",
            LoginRefusal::AddressLockedOut => "address_locked_out",
            LoginRefusal::Busy => "busy",
            LoginRefusal::RelayToWardBroker => "relay_to_ward_broker",
        }
    }
}

/// Checks logins for MQTT and HTTP alike.
pub struct Authenticator {
    db_path: PathBuf,
    demo: bool,
    config: AuthConfig,
    metrics: Arc<Metrics>,
    directory: RwLock<Directory>,
    /// Successful logins: name → digest of the password and the hash it matched.
    cache: Mutex<HashMap<String, CachedLogin>>,
    failures: Lockouts<String>,
    /// By [`address_key`]: IPv6 per /64.
    address_failures: Lockouts<IpAddr>,
    /// (user name, [`address_key`]) → when that user last logged in from there.
    known_addresses: Mutex<HashMap<(String, IpAddr), Instant>>,
    verify_slots: Semaphore,
    /// Logins waiting for or holding a check slot.
    verify_waiting: std::sync::atomic::AtomicUsize,
    /// Keys the cache digests, so that a memory dump does not give away password digests
    /// that could be checked offline.
    secret: [u8; 32],
    /// The readiness probe's password, made at start and never stored.
    probe_password: String,
    /// See [`Authenticator::refuse_relays`].
    refuse_relays: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("db_path", &self.db_path)
            .field("demo", &self.demo)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct Directory {
    users: HashMap<String, User>,
    loaded_at: Option<Instant>,
}

#[derive(Debug)]
struct CachedLogin {
    digest: [u8; 64],
    password_hash: String,
    until: Instant,
}

#[derive(Debug)]
struct Failures {
    window_start: Instant,
    count: u32,
    locked_until: Option<Instant>,
    /// Password checks running for this key: failures to come, as far as the limit goes.
    in_flight: u32,
}

/// Whether a key may start one more password check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Begin {
    Started,
    Locked,
    /// Failures and checks in flight already reach the limit.
    Full,
}

/// The key failed logins of a client address count under: the address itself, or for IPv6
/// its /64 (a host is usually given a whole /64, and picks from it at will). An IPv4 address
/// mapped into IPv6 counts as the IPv4 address.
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut o = v6.octets();
                o[8..].fill(0);
                IpAddr::V6(std::net::Ipv6Addr::from(o))
            }
        },
    }
}

/// Failed logins per key (a user name, a client address): `max` within `window` lock the key
/// for `lockout`. Bounded: past 10,000 keys, those with nothing recent are forgotten.
#[derive(Debug)]
struct Lockouts<K> {
    max: u32,
    window: Duration,
    lockout: Duration,
    map: Mutex<HashMap<K, Failures>>,
}

impl<K: Hash + Eq> Lockouts<K> {
    fn new(max: u32, window: Duration, lockout: Duration) -> Self {
        Lockouts {
            max,
            window,
            lockout,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn is_locked(&self, key: &K) -> bool {
        let map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(key)
            .and_then(|f| f.locked_until)
            .is_some_and(|t| t > Instant::now())
    }

    /// Counts a failure; returns the count if this one locked the key.
    fn record(&self, key: K) -> Option<u32> {
        let now = Instant::now();
        let window = self.window;
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if map.len() > 10_000 {
            map.retain(|_, f| {
                now.saturating_duration_since(f.window_start) < window
                    || f.locked_until.is_some_and(|t| t > now)
                    || f.in_flight > 0
            });
        }
        let f = map.entry(key).or_insert(Failures {
            window_start: now,
            count: 0,
            locked_until: None,
            in_flight: 0,
        });
        if now.saturating_duration_since(f.window_start) >= window {
            f.window_start = now;
            f.count = 0;
        }
        f.count += 1;
        if f.count >= self.max && f.locked_until.is_none_or(|t| t <= now) {
            f.locked_until = Some(now + self.lockout);
            return Some(f.count);
        }
        None
    }

    /// Reserves a password check for `key`, unless it is locked or the checks in flight
    /// would, if they all failed, reach the limit.
    fn begin(&self, key: &K) -> Begin
    where
        K: Clone,
    {
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let f = map.entry(key.clone()).or_insert(Failures {
            window_start: now,
            count: 0,
            locked_until: None,
            in_flight: 0,
        });
        if f.locked_until.is_some_and(|t| t > now) {
            return Begin::Locked;
        }
        if now.saturating_duration_since(f.window_start) >= self.window {
            f.window_start = now;
            f.count = 0;
        }
        if f.count.saturating_add(f.in_flight) >= self.max {
            return Begin::Full;
        }
        f.in_flight += 1;
        Begin::Started
    }

    /// Ends a check [`Lockouts::begin`] reserved (after its failure, if any, is recorded).
    fn end(&self, key: &K) {
        let mut map = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = map.get_mut(key) {
            f.in_flight = f.in_flight.saturating_sub(1);
        }
    }
}

impl Authenticator {
    /// Reads the users table of the database in `data_dir`.
    pub fn new(
        data_dir: &Path,
        demo: bool,
        config: AuthConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Authenticator, UserError> {
        let auth = Authenticator {
            db_path: data_dir.to_owned(),
            demo,
            verify_slots: Semaphore::new(config.verify_threads.max(1)),
            metrics,
            directory: RwLock::new(Directory::default()),
            cache: Mutex::new(HashMap::new()),
            failures: Lockouts::new(
                config.max_failed_logins,
                config.failed_login_window.0,
                config.lockout.0,
            ),
            address_failures: Lockouts::new(
                config.max_failed_logins_per_address,
                config.failed_login_window.0,
                config.lockout.0,
            ),
            known_addresses: Mutex::new(HashMap::new()),
            verify_waiting: std::sync::atomic::AtomicUsize::new(0),
            config,
            secret: rand::random(),
            probe_password: format!("{:032x}", rand::random::<u128>()),
            refuse_relays: std::sync::atomic::AtomicBool::new(false),
        };
        auth.reload()?;
        Ok(auth)
    }

    pub fn demo(&self) -> bool {
        self.demo
    }

    pub fn probe_password(&self) -> &str {
        &self.probe_password
    }

    fn probe() -> Principal {
        Principal {
            name: PROBE_USER.into(),
            access: Access::Probe,
        }
    }

    fn reload(&self) -> Result<(), UserError> {
        let conn = db::open(&self.db_path)?;
        let users = list_users(&conn)?;
        let mut dir = self
            .directory
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        dir.users = users.into_iter().map(|u| (u.name.clone(), u)).collect();
        dir.loaded_at = Some(Instant::now());
        Ok(())
    }

    /// The user of that name, from a copy of the table at most [`DIRECTORY_REFRESH`] old.
    fn user(&self, name: &str) -> Option<User> {
        let stale = {
            let dir = self
                .directory
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            dir.loaded_at
                .is_none_or(|t| t.elapsed() >= DIRECTORY_REFRESH)
        };
        if stale && let Err(e) = self.reload() {
            tracing::error!(error = %e, "cannot re-read the users table; using the last copy");
        }
        let dir = self
            .directory
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        dir.users.get(name).cloned()
    }

    /// Who a CONNECT claims to be, without checking the password ([`Authenticator::verify`]
    /// does, before the connection is accepted). `None` user name: anonymous.
    pub fn identify(&self, name: Option<&str>) -> Result<Principal, LoginRefusal> {
        self.identify_from(None, name)
    }

    /// [`Authenticator::identify`] for a client at `peer`, if known: refused while that address
    /// is locked out, and an unknown name counts against it.
    pub fn identify_from(
        &self,
        peer: Option<IpAddr>,
        name: Option<&str>,
    ) -> Result<Principal, LoginRefusal> {
        let refused = |r: LoginRefusal| {
            self.metrics.login_refused(r.reason());
            Err(r)
        };
        if let Some(ip) = peer.map(address_key)
            && self.address_failures.is_locked(&ip)
        {
            return refused(LoginRefusal::AddressLockedOut);
        }
        match name {
            None | Some("") if self.demo => Ok(Principal::demo()),
            None | Some("") => refused(LoginRefusal::Anonymous),
            Some(PROBE_USER) => Ok(Authenticator::probe()),
            Some(name) => match self.user(name) {
                Some(user) => Ok(Principal {
                    name: user.name,
                    access: user.access,
                }),
                None => {
                    self.record_failure(name, peer);
                    refused(LoginRefusal::UnknownUser)
                }
            },
        }
    }

    /// Whether a user of that name exists.
    pub fn is_user(&self, name: &str) -> bool {
        self.user(name).is_some()
    }

    /// Whether an agent user exists whose site's client id is `client_id`.
    pub fn agent_owns(&self, client_id: &str) -> bool {
        // Refreshes the copy if it is stale.
        let _ = self.user("");
        let dir = self
            .directory
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        dir.users.values().any(|u| match &u.access {
            Access::Agent(site) => site.agent_client_id() == client_id,
            _ => false,
        })
    }

    /// Checks a user name and password; the argon2 work runs off the async threads.
    pub async fn verify(&self, name: &str, password: &str) -> Result<Principal, LoginRefusal> {
        self.verify_from(None, name, password).await
    }

    /// A broker with an upstream (a ward broker) refuses relays' logins: see
    /// [`LoginRefusal::RelayToWardBroker`].
    pub fn refuse_relays(&self) {
        self.refuse_relays
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// [`Authenticator::check_password`], then the refusal of relays at a ward broker (after
    /// the password, so that a stranger learns nothing of who is a relay).
    pub async fn verify_from(
        &self,
        peer: Option<IpAddr>,
        name: &str,
        password: &str,
    ) -> Result<Principal, LoginRefusal> {
        let principal = self.check_password(peer, name, password).await?;
        if matches!(principal.access, Access::Relay(_))
            && self
                .refuse_relays
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            let refusal = LoginRefusal::RelayToWardBroker;
            self.metrics.login_refused(refusal.reason());
            tracing::warn!(
                user = %principal.name,
                "refused a relay's login: this broker has an upstream itself, and relays \
                 chain only to HQ (a cycle or a chain of ward brokers in the configuration)"
            );
            return Err(refusal);
        }
        Ok(principal)
    }

    /// [`Authenticator::verify`] for a client at `peer`, if known: refused while that address is
    /// locked out, and a failure counts against it.
    async fn check_password(
        &self,
        peer: Option<IpAddr>,
        name: &str,
        password: &str,
    ) -> Result<Principal, LoginRefusal> {
        if name.is_empty() {
            return self.identify_from(peer, None);
        }
        let refused = |r: LoginRefusal| {
            self.metrics.login_refused(r.reason());
            Err(r)
        };
        let address = peer.map(address_key);
        if let Some(ip) = address
            && self.address_failures.is_locked(&ip)
        {
            return refused(LoginRefusal::AddressLockedOut);
        }
        if name == PROBE_USER {
            let right = self.digest(name, &self.probe_password);
            return if self.digest(name, password) == right {
                Ok(Authenticator::probe())
            } else {
                refused(LoginRefusal::BadPassword)
            };
        }
        let Some(user) = self.user(name) else {
            self.record_failure(name, peer);
            return refused(LoginRefusal::UnknownUser);
        };
        let principal = Principal {
            name: user.name.clone(),
            access: user.access.clone(),
        };
        let digest = self.digest(name, password);
        if self.cached(name, &digest, &user.password_hash) {
            self.metrics.login_ok(true);
            return Ok(principal);
        }
        // Where this user logged in lately, a lock on the name (someone guessing from
        // elsewhere) does not apply; failures from here still count against the address.
        let known = address.is_some_and(|ip| self.known_address(name, ip));
        let key = short_name(name);
        if !known && self.failures.is_locked(&key) {
            return refused(LoginRefusal::LockedOut);
        }
        let ok = {
            let _waiting = match Waiting::enter(&self.verify_waiting, self.config.verify_queue) {
                Some(w) => w,
                None => return refused(LoginRefusal::Busy),
            };
            let Ok(_slot) = self.verify_slots.acquire().await else {
                return refused(LoginRefusal::Busy);
            };
            // The wait may have been long: the locks are checked again, and a check is only
            // started while the failures it could add stay within the limit.
            if let Some(ip) = address
                && self.address_failures.is_locked(&ip)
            {
                return refused(LoginRefusal::AddressLockedOut);
            }
            let reserved = !known;
            if reserved {
                match self.failures.begin(&key) {
                    Begin::Started => {}
                    Begin::Locked => return refused(LoginRefusal::LockedOut),
                    Begin::Full => return refused(LoginRefusal::Busy),
                }
            }
            self.metrics.password_checked();
            let hash = user.password_hash.clone();
            let password = password.to_owned();
            let ok = tokio::task::spawn_blocking(move || {
                PasswordHash::new(&hash).is_ok_and(|parsed| {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &parsed)
                        .is_ok()
                })
            })
            .await
            .unwrap_or(false);
            if !ok {
                self.record_failure(name, peer);
            }
            if reserved {
                self.failures.end(&key);
            }
            ok
        };
        if ok {
            let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            if cache.len() > 50_000 {
                let now = Instant::now();
                cache.retain(|_, c| c.until > now);
            }
            cache.insert(
                name.to_owned(),
                CachedLogin {
                    digest,
                    password_hash: user.password_hash,
                    until: Instant::now() + self.config.login_cache_ttl.0,
                },
            );
            drop(cache);
            if let Some(ip) = address {
                self.note_known_address(name, ip);
            }
            self.metrics.login_ok(false);
            Ok(principal)
        } else {
            refused(LoginRefusal::BadPassword)
        }
    }

    fn known_address(&self, name: &str, ip: IpAddr) -> bool {
        let known = self
            .known_addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        known
            .get(&(short_name(name), ip))
            .is_some_and(|t| t.elapsed() < self.config.known_address_ttl.0)
    }

    fn note_known_address(&self, name: &str, ip: IpAddr) {
        let mut known = self
            .known_addresses
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if known.len() >= 50_000 {
            let ttl = self.config.known_address_ttl.0;
            known.retain(|_, t| t.elapsed() < ttl);
            if known.len() >= 50_000 {
                known.clear();
            }
        }
        known.insert((short_name(name), ip), Instant::now());
    }

    fn digest(&self, name: &str, password: &str) -> [u8; 64] {
        let mut h = Blake2b512::new();
        h.update(self.secret);
        h.update(name.as_bytes());
        h.update([0]);
        h.update(password.as_bytes());
        h.finalize().into()
    }

    fn cached(&self, name: &str, digest: &[u8; 64], password_hash: &str) -> bool {
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache.get(name).is_some_and(|c| {
            // A changed password (user re-added) invalidates the entry.
            c.until > Instant::now() && c.password_hash == password_hash && c.digest == *digest
        })
    }

    fn record_failure(&self, name: &str, peer: Option<IpAddr>) {
        if let Some(failures) = self.failures.record(short_name(name)) {
            self.metrics.login_lockout();
            tracing::warn!(user = %short_name(name), failures, "too many failed logins: locked out");
        }
        if let Some(ip) = peer.map(address_key)
            && let Some(failures) = self.address_failures.record(ip)
        {
            self.metrics.login_lockout();
            tracing::warn!(address = %ip, failures, "too many failed logins from one address: locked out");
        }
    }
}

/// A login waiting for or holding a password-check slot; leaves the count when dropped.
struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Waiting<'a> {
    /// Enters unless `max` are already waiting.
    fn enter(count: &'a std::sync::atomic::AtomicUsize, max: usize) -> Option<Waiting<'a>> {
        use std::sync::atomic::Ordering;
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max.max(1)).then_some(n + 1)
            })
            .ok()
            .map(|_| Waiting(count))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Names from the network are cut short before they are kept.
fn short_name(name: &str) -> String {
    name.chars().take(64).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::{ByteSize, HumanDuration};

    pub(crate) fn cheap() -> AuthConfig {
        AuthConfig {
            hash_memory: ByteSize(64 * 1024),
            hash_iterations: 1,
            max_failed_logins: 3,
            ..AuthConfig::default()
        }
    }

    fn shinjuku_agent() -> Access {
        Access::Agent(SiteRef {
            ward: WardCode(131041),
            site: Id::new("nishi-shinjuku-es").unwrap(),
        })
    }

    #[test]
    fn roles_and_bindings_must_fit() {
        assert_eq!(
            access_for(
                Role::Agent,
                Some(WardCode(131041)),
                Some("nishi-shinjuku-es")
            )
            .unwrap(),
            shinjuku_agent()
        );
        assert!(access_for(Role::Agent, Some(WardCode(131041)), None).is_err());
        assert!(access_for(Role::Ward, Some(WardCode(999999)), None).is_err());
        assert!(access_for(Role::Hq, Some(WardCode(131041)), None).is_err());
        assert_eq!(access_for(Role::Hq, None, None).unwrap(), Access::Hq);
        assert_eq!("integrator".parse::<Role>().ok(), Some(Role::Integrator));
        assert_eq!("root".parse::<Role>().ok(), None);
    }

    #[tokio::test]
    async fn verifies_caches_and_locks_out() {
        let dir = tempfile::tempdir().unwrap();
        let conn = db::open(dir.path()).unwrap();
        add_user(&conn, "agent-1", &shinjuku_agent(), "s3cret", &cheap()).unwrap();
        assert!(add_user(&conn, "bad name", &Access::Hq, "x", &cheap()).is_err());
        let metrics = Arc::new(Metrics::new());
        let mut config = cheap();
        config.lockout = HumanDuration(Duration::from_secs(60));
        let auth = Authenticator::new(dir.path(), false, config, metrics.clone()).unwrap();

        let p = auth.verify("agent-1", "s3cret").await.unwrap();
        assert_eq!(p.access, shinjuku_agent());
        auth.verify("agent-1", "s3cret").await.unwrap();
        let text = metrics.render();
        assert!(
            text.contains("renkei_logins_total{cache=\"hit\"} 1"),
            "{text}"
        );

        assert_eq!(auth.identify(None), Err(LoginRefusal::Anonymous));
        assert_eq!(
            auth.verify("nobody", "x").await,
            Err(LoginRefusal::UnknownUser)
        );
        for _ in 0..3 {
            assert_eq!(
                auth.verify("agent-1", "wrong").await,
                Err(LoginRefusal::BadPassword)
            );
        }
        // Locked out now, but the cached right password still gets in.
        assert_eq!(
            auth.verify("agent-1", "guess").await,
            Err(LoginRefusal::LockedOut)
        );
        assert!(auth.verify("agent-1", "s3cret").await.is_ok());

        // Removal is seen after the refresh interval.
        remove_user(&conn, "agent-1").unwrap();
        auth.directory.write().unwrap().loaded_at = None;
        assert_eq!(
            auth.verify("agent-1", "s3cret").await,
            Err(LoginRefusal::UnknownUser)
        );
    }

    #[tokio::test]
    async fn an_address_with_too_many_failures_is_refused_whatever_the_name() {
        let dir = tempfile::tempdir().unwrap();
        let conn = db::open(dir.path()).unwrap();
        add_user(&conn, "agent-1", &shinjuku_agent(), "s3cret", &cheap()).unwrap();
        let metrics = Arc::new(Metrics::new());
        let mut config = cheap();
        config.max_failed_logins_per_address = 4;
        let auth = Authenticator::new(dir.path(), false, config, metrics.clone()).unwrap();
        let guesser: IpAddr = "203.0.113.7".parse().unwrap();
        let other: IpAddr = "203.0.113.8".parse().unwrap();
        // The right password is cached before the guessing starts.
        assert!(
            auth.verify_from(Some(other), "agent-1", "s3cret")
                .await
                .is_ok()
        );

        // Different names each time: no name reaches its own limit of 3.
        for name in ["a", "b"] {
            assert_eq!(
                auth.identify_from(Some(guesser), Some(name)),
                Err(LoginRefusal::UnknownUser)
            );
        }
        for name in ["c", "d"] {
            assert_eq!(
                auth.verify_from(Some(guesser), name, "x").await,
                Err(LoginRefusal::UnknownUser)
            );
        }
        // Locked: even a right (and cached) password is refused from that address …
        assert_eq!(
            auth.verify_from(Some(guesser), "agent-1", "s3cret").await,
            Err(LoginRefusal::AddressLockedOut)
        );
        assert_eq!(
            auth.identify_from(Some(guesser), Some("agent-1")),
            Err(LoginRefusal::AddressLockedOut)
        );
        // … and accepted from any other, or where the address is unknown.
        assert!(
            auth.verify_from(Some(other), "agent-1", "s3cret")
                .await
                .is_ok()
        );
        assert!(auth.verify("agent-1", "s3cret").await.is_ok());
        assert!(
            metrics
                .render()
                .contains("renkei_logins_refused_total{reason=\"address_locked_out\"} 2")
        );
    }

    #[test]
    fn ipv6_addresses_count_per_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:1:2:3".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(address_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[tokio::test]
    async fn failures_from_one_ipv6_64_lock_the_whole_64() {
        let dir = tempfile::tempdir().unwrap();
        let conn = db::open(dir.path()).unwrap();
        add_user(&conn, "agent-1", &shinjuku_agent(), "s3cret", &cheap()).unwrap();
        let mut config = cheap();
        config.max_failed_logins = 100;
        config.max_failed_logins_per_address = 2;
        let auth = Authenticator::new(dir.path(), false, config, Arc::new(Metrics::new())).unwrap();
        for host in ["2001:db8::1", "2001:db8::2"] {
            assert_eq!(
                auth.verify_from(host.parse().ok(), "agent-1", "x").await,
                Err(LoginRefusal::BadPassword)
            );
        }
        assert_eq!(
            auth.verify_from("2001:db8::ffff".parse().ok(), "agent-1", "s3cret")
                .await,
            Err(LoginRefusal::AddressLockedOut)
        );
        assert!(
            auth.verify_from("2001:db8:0:1::1".parse().ok(), "agent-1", "s3cret")
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn a_locked_name_still_gets_in_from_where_it_logged_in_lately() {
        let dir = tempfile::tempdir().unwrap();
        let conn = db::open(dir.path()).unwrap();
        add_user(&conn, "hq-sato", &Access::Hq, "s3cret", &cheap()).unwrap();
        let mut config = cheap();
        config.login_cache_ttl = HumanDuration(Duration::ZERO);
        let auth = Authenticator::new(dir.path(), false, config, Arc::new(Metrics::new())).unwrap();
        let office: IpAddr = "192.0.2.10".parse().unwrap();
        let guesser: IpAddr = "198.51.100.1".parse().unwrap();
        assert!(
            auth.verify_from(Some(office), "hq-sato", "s3cret")
                .await
                .is_ok()
        );
        for _ in 0..3 {
            let _ = auth.verify_from(Some(guesser), "hq-sato", "guess").await;
        }
        assert_eq!(
            auth.verify_from(Some(guesser), "hq-sato", "s3cret").await,
            Err(LoginRefusal::LockedOut)
        );
        assert_eq!(
            auth.verify_from("192.0.2.11".parse().ok(), "hq-sato", "s3cret")
                .await,
            Err(LoginRefusal::LockedOut),
            "a new address is locked out with the name"
        );
        assert!(
            auth.verify_from(Some(office), "hq-sato", "s3cret")
                .await
                .is_ok(),
            "the office where sato logged in is not"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_wrong_passwords_run_at_most_the_failure_limit_of_checks() {
        let dir = tempfile::tempdir().unwrap();
        let conn = db::open(dir.path()).unwrap();
        add_user(&conn, "hq-sato", &Access::Hq, "s3cret", &cheap()).unwrap();
        let metrics = Arc::new(Metrics::new());
        let mut config = cheap();
        config.max_failed_logins = 5;
        config.max_failed_logins_per_address = 1_000_000;
        config.verify_threads = 4;
        config.verify_queue = 32;
        let auth =
            Arc::new(Authenticator::new(dir.path(), false, config, metrics.clone()).unwrap());
        let tries: Vec<_> = (0..500)
            .map(|i| {
                let auth = auth.clone();
                tokio::spawn(async move {
                    let peer = IpAddr::from([10, 0, (i / 256) as u8, (i % 256) as u8]);
                    auth.verify_from(Some(peer), "hq-sato", "wrong").await
                })
            })
            .collect();
        let mut busy = 0;
        for t in tries {
            match t.await.unwrap() {
                Err(LoginRefusal::Busy) => busy += 1,
                Err(_) => {}
                Ok(_) => panic!("a wrong password got in"),
            }
        }
        let text = metrics.render();
        let checks: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("renkei_password_checks_total "))
            .and_then(|n| n.parse().ok())
            .unwrap();
        assert!(checks <= 5, "{checks} checks for a limit of 5");
        assert!(busy > 0, "the queue is bounded");
    }

    #[tokio::test]
    async fn demo_mode_lets_anonymous_in_and_still_checks_names() {
        let dir = tempfile::tempdir().unwrap();
        let auth = Authenticator::new(dir.path(), true, cheap(), Arc::new(Metrics::new())).unwrap();
        assert_eq!(auth.identify(None), Ok(Principal::demo()));
        assert_eq!(auth.verify("", "").await, Ok(Principal::demo()));
        assert_eq!(
            auth.verify("someone", "x").await,
            Err(LoginRefusal::UnknownUser)
        );
    }
}
