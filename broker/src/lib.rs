//! `renkei-broker`: the central process every ward, dashboard and integrator talks to.
//!
//! Data flow:
//!
//! ```text
//! agents, dashboards ──MQTT (TCP :1883, WebSocket :8083, TLS :8883)──▶ mqtt (embedded rumqttd) ──▶ subscribers
//!                      guard: login, client id, ACL, per-login bounds │ tap: every renkei/v1/ message, before its PUBACK
//!                                                                     ▼
//!        ingest: shared::receive (topic → decode → validate) → reducer ──▶ live State ──▶ rules
//!          │ refused: counted by reason    │ JSON mirror renkei/json/v1/… ──▶ publisher ──▶ mqtt
//!          ▼                                                                  alerts ──▶ mqtt
//!        recorder: batches into SQLite (db) or PostgreSQL (pg) ──▶ receipts: renkei/receipt/v1/{ward}/{site} ──▶ agent
//!                                                                     │
//! browsers, integrators ◀──── http: dashboard, /config.json, /api/v1/…, /metrics (reads live State, db)
//! ```
//!
//! At start the recorder's database rebuilds the live state and the retained topics before the
//! listeners open. Layout:
//! - [`config`]: the TOML configuration over compiled-in defaults;
//! - [`db`]: the SQLite database in the data directory;
//! - [`auth`]: users, roles and login checks (argon2, cache, lockout), for MQTT and HTTP;
//! - [`acl`]: what each role may publish and subscribe to;
//! - [`mqtt`]: rumqttd's router and listeners, the per-connection guard that applies [`auth`],
//!   [`acl`] and the per-login bounds, the auth hook, the MQTTS relay ([`mqtt::tls`]);
//! - [`publisher`]: the broker's own voice on MQTT (mirror, alerts, receipts, restored state);
//! - [`live`]: the live cross-ward state that ingest writes and the rules and HTTP read;
//! - [`clock`]: the injectable clock of ingest, the rules and HTTP;
//! - [`ingest`]: the consumer that keeps the live state, the JSON mirror and the recorder fed;
//! - [`recorder`]: every accepted message into the record, in batches, and the restore;
//! - [`pg`]: the record in a PostgreSQL database every instance of a clustered HQ shares;
//! - [`receipts`]: tells each agent which of its messages the recorder has committed;
//! - [`uplink`]: ward mode, the ward's record forwarded to HQ and what HQ sends down;
//! - [`relays`]: at HQ, the ward brokers' relays and whether each is reachable;
//! - [`external`]: external-broker mode, where a clustered broker replaces the embedded one
//!   and ingest, the mirror and the rules speak to it as an MQTT client;
//! - [`cluster_acl`]: Renkei's users and roles as a NATS cluster's `authorization` block;
//! - [`skew`]: what the live state takes from a sender's clock;
//! - [`jetstream`] and [`leadership`]: HQ on a NATS JetStream cluster: ingest from its
//!   replicated stream, and the lease that says which instance runs the rules;
//! - [`rules`]: alerts raised and cleared from the live state, published through MQTT so that
//!   they take the same path as every other message;
//! - [`http`]: the axum routes (`router(AppState)`), with the state API in [`http::api`];
//! - [`metrics`]: the counters behind `/metrics`;
//! - [`trim`]: hands the memory the broker freed (a departed subscriber's filter logs) back to
//!   the system;
//! - [`Broker`] (here): starts them in order and serves until shutdown.

pub mod acl;
pub mod auth;
pub mod clock;
pub mod cluster_acl;
pub mod config;
pub mod db;
pub mod external;
pub mod http;
pub mod ingest;
pub mod jetstream;
pub mod leadership;
pub mod live;
pub mod metrics;
pub mod mqtt;
pub mod pg;
pub mod publisher;
pub mod receipts;
pub mod recorder;
pub mod relays;
pub mod rules;
pub mod skew;
pub mod trim;
pub mod uplink;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::auth::Authenticator;
use crate::config::Config;
use crate::external::{External, ExternalError};
use crate::http::AppState;
use crate::ingest::{Ingest, IngestError};
use crate::live::LiveState;
use crate::metrics::Metrics;
use crate::mqtt::{Mqtt, MqttError};
use crate::publisher::Publisher;
use crate::recorder::Recorder;
use crate::rules::Rules;

/// Why the broker did not start or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Mqtt(#[from] MqttError),
    #[error(transparent)]
    Users(#[from] auth::UserError),
    #[error(transparent)]
    Recorder(#[from] recorder::RecorderError),
    #[error("ward mode: {0}")]
    Uplink(#[from] uplink::UplinkError),
    #[error("cannot start the receipts thread: {0}")]
    ReceiptsThread(std::io::Error),
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error(transparent)]
    Ingest(#[from] IngestError),
    #[error(transparent)]
    External(#[from] ExternalError),
    #[error(transparent)]
    JetStream(#[from] jetstream::JetStreamError),
    #[error("cannot publish the restored retained state: {0}")]
    Restore(publisher::PublishError),
    #[error("cannot start the rules thread: {0}")]
    Rules(std::io::Error),
    #[error("cannot listen for HTTP on {addr}: {source}")]
    HttpBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The addresses a started broker listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addrs {
    pub mqtt: SocketAddr,
    /// `None` when there is no MQTT-over-WebSocket listener to point a client at.
    pub ws: Option<SocketAddr>,
    pub http: SocketAddr,
    /// The MQTTS listener, when TLS is configured.
    pub mqtts: Option<SocketAddr>,
}

impl Addrs {
    /// The one line the binary prints on stdout once it serves; test harnesses parse it as
    /// `key=value` pairs, so optional keys go last.
    pub fn ready_line(&self) -> String {
        let ws = self
            .ws
            .map_or_else(|| "none".to_owned(), |ws| ws.to_string());
        let mut line = format!(
            "renkei-broker ready mqtt={} ws={ws} http={}",
            self.mqtt, self.http
        );
        if let Some(mqtts) = self.mqtts {
            line.push_str(&format!(" mqtts={mqtts}"));
        }
        line
    }

    /// Reads a [`Addrs::ready_line`] back.
    pub fn from_ready_line(line: &str) -> Option<Addrs> {
        let rest = line.trim_end().strip_prefix("renkei-broker ready ")?;
        let mut fields = rest.split(' ');
        let mut field =
            |name: &str| -> Option<&str> { fields.next()?.strip_prefix(name)?.strip_prefix('=') };
        let mqtt = field("mqtt")?.parse().ok()?;
        let ws = match field("ws")? {
            "none" => None,
            ws => Some(ws.parse().ok()?),
        };
        let http = field("http")?.parse().ok()?;
        let mqtts = match fields.next() {
            None => None,
            Some(kv) => Some(kv.strip_prefix("mqtts=")?.parse().ok()?),
        };
        let addrs = Addrs {
            mqtt,
            ws,
            http,
            mqtts,
        };
        fields.next().is_none().then_some(addrs)
    }
}

/// Where the MQTT messages come from.
#[derive(Debug)]
enum Source {
    Embedded(Mqtt),
    /// An external broker, the JetStream stream ingest reads instead of subscribing, and the
    /// further connections the mirror and the receipts go out through (JetStream mode).
    External(External, Option<jetstream::JetStreamSource>, Vec<External>),
}

/// Connections the JSON mirror and the receipts go out through on a NATS cluster: NATS takes
/// one connection's QoS 1 publishes one at a time (a retained one is written to a replicated
/// stream first), so one connection carries a few hundred a second (docs/scaling.md).
const JETSTREAM_PUBLISHERS: usize = 8;

/// A started broker: MQTT listening (or the external broker connected), ingest consuming,
/// HTTP bound but not yet serving.
#[derive(Debug)]
pub struct Broker {
    addrs: Addrs,
    source: Source,
    ingest: Ingest,
    recorder: Recorder,
    _receipts: receipts::Sender,
    /// `None` when `rules.enabled` is off.
    rules: Option<Rules>,
    http: TcpListener,
    http_limits: http::server::Limits,
    app: AppState,
    /// Runs as long as the broker.
    _trimmer: trim::Trimmer,
    /// Ward mode: forwarding this ward's record to HQ.
    uplink: Option<uplink::Uplink>,
    /// Raised at every start and kept in the database: the `boot` of the broker's messages.
    pub boot: u32,
}

impl Broker {
    /// Starts everything in order: ingest subscribes before the MQTT listeners open, so no
    /// message is missed, and the HTTP socket is bound last.
    pub async fn start(config: Config) -> Result<Broker, Error> {
        let data_dir = &config.data.dir;
        db::create_dir(data_dir).map_err(|source| Error::DataDir {
            path: data_dir.clone(),
            source,
        })?;
        let dashboard_index = config.http.dashboard_dir.join("index.html");
        if !dashboard_index.is_file() {
            tracing::warn!(
                path = %dashboard_index.display(),
                "no built dashboard here: / will answer 404 (build it with Trunk)"
            );
        }

        let metrics = Arc::new(Metrics::new());
        let trimmer = trim::Trimmer::start(metrics.clone());
        let auth = Arc::new(Authenticator::new(
            data_dir,
            config.demo,
            config.auth.clone(),
            metrics.clone(),
        )?);
        if config.demo {
            tracing::warn!("demo mode: clients may connect without a user name");
        }
        if config.upstream.broker.is_some() {
            // Relays chain only to HQ: a ward broker taking a relay's login is a cycle or a
            // chain in the configuration.
            auth.refuse_relays();
        }
        let boot = {
            let conn = db::open(data_dir)?;
            db::bump_counter(&conn, "broker_boot").map_err(|source| db::DbError {
                path: db::path(data_dir),
                source,
            })?
        };
        let archive = recorder::Archive::open(&config.recorder, data_dir).await?;
        let restored = recorder::restore(&archive).await?;
        tracing::info!(
            record = archive.name(),
            boot,
            messages = restored.messages,
            unreadable = restored.unreadable,
            retained = restored.retained.len(),
            "state rebuilt from the database"
        );
        let live: LiveState = Arc::new(std::sync::RwLock::new(restored.state));
        let recorder = Recorder::start(&archive, config.recorder.clone(), metrics.clone())?;
        let clock = clock::system_clock();
        let (trigger, triggered) = Rules::trigger();
        let setup = ingest::Setup {
            state: live.clone(),
            metrics: metrics.clone(),
            recorder: recorder.tx(),
            rules: config.rules.enabled.then_some(trigger),
            clock: clock.clone(),
        };
        let interest = Arc::new(match &config.external.broker {
            None => receipts::Interest::counted(),
            Some(_) => receipts::Interest::everyone(),
        });
        let (mut source, ingest, mut publisher, held) = match &config.external.broker {
            None => {
                let mut mqtt = Mqtt::new(&config.mqtt, &auth, &metrics, interest.clone())?;
                for retained in &restored.retained {
                    mqtt.admission().seed_item(&retained.topic);
                }
                let tap = mqtt.take_tap().ok_or(IngestError::Disconnected)?;
                let ingest = Ingest::start(tap, mqtt.link("ingest")?, setup)?;
                let publisher = Publisher::new(mqtt.link("publisher")?);
                (Source::Embedded(mqtt), ingest, publisher, None)
            }
            Some(url) => {
                let held = external::retained_topics(&config.external, url).await?;
                let mut external = External::connect(&config.external, url).await?;
                let incoming = external.incoming.take().ok_or(IngestError::ExternalGone)?;
                let mut out = Vec::new();
                let (ingest, stream) = if config.external.jetstream.is_empty() {
                    let ingest = Ingest::start_external(incoming, external.client.clone(), setup)?;
                    (ingest, None)
                } else {
                    let password = external::read_password(&config.external)?;
                    let (stream, delivered, settle) =
                        jetstream::JetStreamSource::start(&config.external, password).await?;
                    for k in 0..JETSTREAM_PUBLISHERS {
                        out.push(
                            External::connect_publisher(&config.external, url, &format!("out{k}"))
                                .await?,
                        );
                    }
                    let mirror = Publisher::Spread(out.iter().map(|o| o.client.clone()).collect());
                    let ingest = Ingest::start_jetstream(delivered, settle, mirror, setup)?;
                    (ingest, Some(stream))
                };
                let publisher = Publisher::External(external.client.clone());
                tracing::info!(
                    %url,
                    filter = ?external::filter(&config.external),
                    jetstream = ?config.external.jetstream,
                    client_id = %config.external.client_id,
                    already_retained = held.len(),
                    "external-broker mode: the embedded MQTT listeners are off"
                );
                (
                    Source::External(external, stream, out),
                    ingest,
                    publisher,
                    Some(held),
                )
            }
        };
        let (receipts, receipts_tx) = receipts::Sender::start(
            match &source {
                Source::Embedded(mqtt) => Publisher::new(mqtt.link("receipts")?),
                Source::External(_, _, out) if !out.is_empty() => {
                    Publisher::Spread(out.iter().map(|o| o.client.clone()).collect())
                }
                Source::External(external, ..) => Publisher::External(external.client.clone()),
            },
            interest,
            config.recorder.receipt_rate,
            metrics.clone(),
        )
        .map_err(Error::ReceiptsThread)?;
        recorder.send_receipts(receipts_tx);
        // Before the listeners open: a client that connects sees the state as it was. An
        // external broker keeps its retained messages: only what it lacks is published.
        for retained in &restored.retained {
            let topic_name = retained.topic.to_string();
            if held.as_ref().is_some_and(|held| held.contains(&topic_name)) {
                continue;
            }
            publisher
                .publish(topic_name, retained.payload.clone(), true)
                .map_err(Error::Restore)?;
            let mirrored = renkei_shared::mirror::MirroredRef {
                envelope: &retained.envelope,
                received_at: retained.received_at,
            };
            if let Ok(json) = serde_json::to_vec(&mirrored) {
                publisher
                    .publish(retained.topic.json(), json, true)
                    .map_err(Error::Restore)?;
            }
        }
        // The rules start from the restored state (its alerts included), so what they already
        // raised is not raised again; what they publish reaches ingest like any message.
        // On a cluster read by several instances, the rules run on the one holding the lease,
        // and each names its alerts by its own client id, so that two leaders in turn never
        // reuse each other's `(origin, boot, seq)`.
        let mut leading = None;
        let mut node = rules::node_name(config.upstream.broker.as_ref().and(config.upstream.ward));
        if config.rules.enabled
            && let Source::External(_, Some(stream), _) = &mut source
        {
            let leadership = leadership::Leadership::start(
                stream.js.clone(),
                config.external.client_id.clone(),
                config.external.stream_replicas,
            )
            .await
            .map_err(|e| Error::Rules(std::io::Error::other(e)))?;
            leading = Some(leadership.leading.clone());
            stream.leadership = Some(leadership);
            node = config.external.client_id.clone();
        }
        let rules = if config.rules.enabled {
            let setup = rules::Setup {
                config: config.rules.clone(),
                live: live.clone(),
                publisher,
                metrics: metrics.clone(),
                boot,
                node: renkei_shared::Id::new(node)
                    .map_err(|e| Error::Rules(std::io::Error::other(e.to_string())))?,
                started_at: clock.now(),
                clock: clock.clone(),
                leading,
            };
            Some(Rules::start(setup, triggered).map_err(Error::Rules)?)
        } else {
            None
        };
        if let Source::Embedded(mqtt) = &mut source {
            mqtt.listen().await?;
        }
        let uplink = match &config.upstream.broker {
            Some(_) => {
                let Source::Embedded(mqtt) = &source else {
                    return Err(Error::Uplink(uplink::UplinkError::Url(
                        "ward mode needs the embedded broker".into(),
                    )));
                };
                Some(uplink::Uplink::start(
                    &config.upstream,
                    data_dir,
                    recorder.committed(),
                    Publisher::new(mqtt.link("downlink")?),
                    metrics.clone(),
                )?)
            }
            None => None,
        };

        let http_addr = config.http.listen;
        let http = TcpListener::bind(http_addr)
            .await
            .map_err(|source| Error::HttpBind {
                addr: http_addr,
                source,
            })?;
        let http_addr = http.local_addr().map_err(|source| Error::HttpBind {
            addr: http_addr,
            source,
        })?;

        let addrs = match &source {
            Source::Embedded(mqtt) => Addrs {
                mqtt: mqtt.tcp_addr,
                ws: Some(mqtt.ws_addr),
                http: http_addr,
                mqtts: mqtt.tls_addr,
            },
            Source::External(external, ..) => Addrs {
                mqtt: external.addr,
                ws: external.ws_addr,
                http: http_addr,
                mqtts: None,
            },
        };
        // Browsers must reach the external broker's WebSocket, not this host's.
        let public_mqtt_ws_url = match &config.external.broker {
            Some(_) => config
                .http
                .public_mqtt_ws_url
                .clone()
                .or_else(|| config.external.ws_url.clone()),
            None => config.http.public_mqtt_ws_url.clone(),
        };
        let app = AppState {
            live,
            metrics,
            ws_port: addrs.ws.map_or(0, |ws| ws.port()),
            public_mqtt_ws_url,
            mqtt_ws_failover: match &config.external.broker {
                Some(_) => config.external.ws_failover.clone(),
                None => Vec::new(),
            },
            dashboard_dir: config.http.dashboard_dir.clone(),
            clock,
            auth: (!config.demo).then(|| auth.clone()),
            archive: archive.clone(),
            upstream_ward: config.upstream.broker.as_ref().and(config.upstream.ward),
        };
        Ok(Broker {
            addrs,
            source,
            ingest,
            recorder,
            _receipts: receipts,
            rules,
            http,
            http_limits: http::server::Limits::of(&config.http),
            app,
            _trimmer: trimmer,
            uplink,
            boot,
        })
    }

    pub fn addrs(&self) -> Addrs {
        self.addrs
    }

    /// What the HTTP handlers see (the live state and the counters).
    pub fn app_state(&self) -> &AppState {
        &self.app
    }

    /// Serves HTTP until `shutdown` resolves, then stops HTTP (letting requests in flight
    /// finish) and ingest. Returns an error instead if an MQTT listener or ingest stops: the
    /// process must not go on half-working.
    ///
    /// rumqttd cannot be stopped; its threads end with the process.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), Error> {
        let Broker {
            mut source,
            mut ingest,
            recorder,
            rules,
            http,
            http_limits,
            app,
            uplink,
            ..
        } = self;
        let server = http::server::serve(http, http::router(app), http_limits, shutdown);
        let mqtt_stopped = async {
            match &mut source {
                Source::Embedded(mqtt) => mqtt.stopped().await,
                Source::External(..) => std::future::pending().await,
            }
        };
        let result = tokio::select! {
            () = server => Ok(()),
            stopped = mqtt_stopped => Err(stopped.into()),
            failed = ingest.failed() => Err(failed.into()),
        };
        // Its last cursor is written, and HQ told with a DISCONNECT.
        if let Some(uplink) = uplink {
            uplink.stop().await;
        }
        // Joining waits for at most one poll interval of the ingest thread; the recorder then
        // writes what ingest handed it (its last sender is gone with ingest).
        // The rules stop first, so that ingest still records the last alerts they published.
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(rules) = rules {
                rules.stop();
            }
            ingest.stop();
            // After ingest: the last mirror and alert publishes are queued before DISCONNECT.
            if let Source::External(external, stream, out) = source {
                if let Some(stream) = stream {
                    stream.stop();
                }
                for o in out {
                    o.stop();
                }
                external.stop();
            }
            recorder.stop();
        })
        .await;
        tracing::info!("stopped");
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ready_line_round_trips() {
        let addrs = Addrs {
            mqtt: "127.0.0.1:41883".parse().unwrap(),
            ws: Some("127.0.0.1:48083".parse().unwrap()),
            http: "[::1]:48080".parse().unwrap(),
            mqtts: None,
        };
        let line = addrs.ready_line();
        assert_eq!(
            line,
            "renkei-broker ready mqtt=127.0.0.1:41883 ws=127.0.0.1:48083 http=[::1]:48080"
        );
        assert_eq!(Addrs::from_ready_line(&format!("{line}\n")), Some(addrs));
        assert_eq!(Addrs::from_ready_line("renkei-broker ready mqtt=x"), None);
        assert_eq!(Addrs::from_ready_line(&format!("{line} extra=1")), None);

        let tls = Addrs {
            mqtts: Some("0.0.0.0:8883".parse().unwrap()),
            ws: None,
            ..addrs
        };
        let line = tls.ready_line();
        assert_eq!(
            line,
            "renkei-broker ready mqtt=127.0.0.1:41883 ws=none http=[::1]:48080 mqtts=0.0.0.0:8883"
        );
        assert_eq!(Addrs::from_ready_line(&line), Some(tls));
    }
}
