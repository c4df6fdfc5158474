use crate::protocol::{
    unboxed, ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect, DisconnectReasonCode,
    LastWill, LastWillProperties, Packet, PingResp, PubAck, PubAckReason, PubComp, PubCompReason,
    PubRec, PubRecReason, PubRel, PubRelReason, Publish, PublishProperties, QoS, SubAck,
    SubscribeReasonCode, UnsubAck, UnsubAckReason,
};
use crate::router::alertlog::alert;
use crate::router::scheduler::{PauseReason, Tracker};
use crate::router::{ConnectionEvents, Forward};
use crate::segments::Position;
use crate::*;
use bytes::Bytes;
use flume::{bounded, Receiver, RecvError, Sender, TryRecvError};
use slab::Slab;
use std::collections::{HashMap, HashSet, VecDeque};
use std::str::Utf8Error;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::SystemTime;
use thiserror::Error;
use tracing::{debug, error, info, trace, warn};

use super::alertlog::{Alert, AlertLog};
use super::graveyard::{Graveyard, SavedState};
use super::iobufs::{Incoming, Outgoing};
use super::logs::{AckLog, DataLog};
use super::scheduler::{ScheduleReason, Scheduler};
use super::shared_subs::SharedGroup;
use super::tap::Tap;
use super::{
    packetid, Connection, DataRequest, Event, FilterIdx, Meter, Notification, Print, RouterMeter,
    ShadowRequest, MAX_CHANNEL_CAPACITY, MAX_SCHEDULE_ITERATIONS,
};

#[derive(Error, Debug)]
pub enum RouterError {
    #[error("Receive error = {0}")]
    Recv(#[from] RecvError),
    #[error("Try Receive error = {0}")]
    TryRecv(#[from] TryRecvError),
    #[error("Disconnection")]
    Disconnected,
    #[error("Topic not utf-8")]
    NonUtf8Topic(#[from] Utf8Error),
    #[cfg(feature = "validate-tenant-prefix")]
    #[error("Bad Tenant")]
    BadTenant(String, String),
    #[error("No matching filters to topic {0}")]
    NoMatchingFilters(String),
    #[error("Invalid filter prefix {0}")]
    InvalidFilterPrefix(Filter),
    #[error("Invalid client_id {0}")]
    InvalidClientId(String),
    #[error("Disconnection (Reason: {0:?})")]
    Disconnect(DisconnectReasonCode),
}

// TODO: set this to some appropriate value
const TOPIC_ALIAS_MAX: u16 = 4096;

pub struct Router {
    id: RouterId,
    /// Id of this router. Used to index native commitlog to store data from
    /// local connections
    config: RouterConfig,
    /// Saved state of dead persistent connections
    graveyard: Graveyard,
    /// List of MetersLink's senders
    meters: Slab<Sender<Vec<Meter>>>,
    /// List of AlertsLink's senders with their respective subscription Filter
    alerts: Slab<Sender<Vec<Alert>>>,
    /// List of connections
    connections: Slab<Connection>,
    /// Connection map from device id to connection id
    connection_map: HashMap<String, ConnectionId>,
    /// Subscription map to interested connection ids
    subscription_map: HashMap<Filter, HashSet<ConnectionId>>,
    /// Incoming data grouped by connection
    ibufs: Slab<Incoming>,
    /// Outgoing data grouped by connection
    obufs: Slab<Outgoing>,
    /// Data log of all the subscriptions
    datalog: DataLog,
    /// Data log of all the alert subscriptions
    alertlog: AlertLog,
    /// Acks log per connection
    ackslog: Slab<AckLog>,
    /// Scheduler to schedule connections
    scheduler: Scheduler,
    /// Parked requests that are ready because of new data on the subscription
    notifications: VecDeque<(ConnectionId, DataRequest)>,
    /// Channel receiver to receive data from all the active connections and
    /// replicators. Each connection will have a tx handle which they use
    /// to send data and requests to router
    router_rx: Receiver<(ConnectionId, Event)>,
    /// Channel sender to send data to this router. This is given to active
    /// network connections, local connections and replicators to communicate
    /// with this router
    router_tx: Sender<(ConnectionId, Event)>,
    /// Router metrics
    router_meters: RouterMeter,
    /// Buffer for cache exchange of incoming packets
    cache: Option<VecDeque<Packet>>,
    /// Shared subscriptions map <group-name, group>
    shared_subscriptions: HashMap<String, SharedGroup>,
    /// Will messages per client_id
    last_wills: HashMap<String, (LastWill, Option<LastWillProperties>)>,
    /// Renkei patch: the tap, if one was set up (see `tap`)
    tap: Option<Tap>,
    /// Renkei patch: connections with a publish held back for the tap, in the order they
    /// came; served in turn when the tap's consumer makes room
    tap_line: VecDeque<ConnectionId>,
    /// Renkei patch: the connections in `tap_line`, to look one up without a scan
    in_tap_line: HashSet<ConnectionId>,
    /// Renkei patch: events that arrived for a connection already gone (see
    /// [`Router::gone_connection_events`])
    gone_events: Arc<AtomicU64>,
}

impl Router {
    pub fn new(router_id: RouterId, config: RouterConfig) -> Router {
        let (router_tx, router_rx) = bounded(1000);

        let meters = Slab::with_capacity(10);
        let alerts = Slab::with_capacity(10);
        // Renkei patch: the tables grow with the connections there are, not the most there may
        // be (5,000 reserved 2.6 MiB before anyone connected).
        let connections = Slab::new();
        let ibufs = Slab::new();
        let obufs = Slab::new();
        let ackslog = Slab::new();

        let router_metrics = RouterMeter {
            router_id,
            ..RouterMeter::default()
        };

        Router {
            id: router_id,
            config: config.clone(),
            graveyard: Graveyard::new(),
            meters,
            alerts,
            connections,
            connection_map: Default::default(),
            subscription_map: Default::default(),
            ibufs,
            obufs,
            datalog: DataLog::new(config.clone()).unwrap(),
            alertlog: AlertLog::new(config),
            ackslog,
            scheduler: Scheduler::with_capacity(0),
            notifications: VecDeque::with_capacity(1024),
            router_rx,
            router_tx,
            router_meters: router_metrics,
            cache: Some(VecDeque::new()),
            shared_subscriptions: HashMap::new(),
            last_wills: HashMap::new(),
            tap: None,
            tap_line: VecDeque::new(),
            in_tap_line: HashSet::new(),
            gone_events: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Renkei patch: a counter of the events that arrived for a connection the router had
    /// already dropped (its link's last data or Disconnect, thousands of times in a disconnect
    /// storm): a benign race, logged at debug level and counted here. Take it before
    /// [`Router::spawn`].
    pub fn gone_connection_events(&self) -> Arc<AtomicU64> {
        self.gone_events.clone()
    }

    /// Gets handle to the router. This is not a public method to ensure that link
    /// is created only after the router starts
    fn link(&self) -> Sender<(ConnectionId, Event)> {
        self.router_tx.clone()
    }

    // pub(crate) fn get_replica_handle(&mut self, _replica_id: NodeId) -> (LinkTx, LinkRx) {
    //     unimplemented!()
    // }

    /// Starts the router in a background thread and returns link to it. Link
    /// to communicate with router should only be returned only after it starts.
    /// For that reason, all the public methods should start the router in the
    /// background
    #[tracing::instrument(skip_all)]
    pub fn spawn(mut self) -> Sender<(ConnectionId, Event)> {
        let router = thread::Builder::new().name(format!("router-{}", self.id));
        let link = self.link();
        router
            .spawn(move || {
                let e = self.run(0);
                error!(reason=?e, "Router done!");
            })
            .unwrap();
        link
    }

    /// Waits on incoming events when ready queue is empty.
    /// After pulling 1 event, tries to pull 500 more events
    /// before polling ready queue 100 times (connections)
    #[tracing::instrument(skip_all)]
    fn run(&mut self, count: usize) -> Result<(), RouterError> {
        match count {
            0 => loop {
                self.run_inner()?;
            },
            n => {
                for _ in 0..n {
                    self.run_inner()?;
                }
            }
        };

        Ok(())
    }

    fn run_inner(&mut self) -> Result<(), RouterError> {
        // Block on incoming events if there are no ready connections for consumption
        if self.consume().is_none() {
            // trace!("{}:: {:20} {:20} {:?}", self.id, "", "done-await", self.readyqueue);
            let (id, data) = self.router_rx.recv()?;
            self.events(id, data);
        }

        // Try reading more from connections in a non-blocking
        // fashion to accumulate data and handle subscriptions.
        // Accumulating more data lets requests retrieve bigger
        // bulks which in turn increases efficiency
        for _ in 0..500 {
            // All these methods will handle state and errors
            match self.router_rx.try_recv() {
                Ok((id, data)) => self.events(id, data),
                Err(TryRecvError::Disconnected) => return Err(RouterError::Disconnected),
                Err(TryRecvError::Empty) => break,
            }
        }

        // A connection should not be scheduled multiple times
        #[cfg(debug_assertions)]
        if let Some(readyqueue) = self.scheduler.check_readyqueue_duplicates() {
            warn!(
                "Connection was scheduled multiple times in readyqueue: {:?}",
                readyqueue
            );
        }

        // Poll 100 connections which are ready in ready queue
        for _ in 0..100 {
            self.consume();
        }

        // self.send_all_alerts();
        Ok(())
    }

    fn events(&mut self, id: ConnectionId, data: Event) {
        let span = tracing::error_span!("[>] incoming", connection_id = id);
        let _guard = span.enter();

        match data {
            Event::Connect {
                connection,
                incoming,
                outgoing,
            } => self.handle_new_connection(connection, incoming, outgoing),
            Event::NewMeter(tx) => self.handle_new_meter(tx),
            Event::NewTap(tap) => self.tap = Some(tap),
            Event::TapReady => self.serve_tap_line(),
            Event::NewAlert(tx) => self.handle_new_alert(tx),
            Event::DeviceData => self.handle_device_payload(id),
            Event::Disconnect => self.handle_disconnection(id, None),
            Event::Ready => self.scheduler.reschedule(id, ScheduleReason::Ready),
            Event::Shadow(request) => {
                retrieve_shadow(&mut self.datalog, &mut self.obufs[id], request)
            }
            Event::SendAlerts => {
                self.send_alerts();
            }
            Event::SendMeters => {
                self.send_meters();
            }
            Event::PrintStatus(metrics) => print_status(self, metrics),
            Event::PublishWill((client_id, _tenant_id)) => self.handle_last_will(
                client_id,
                #[cfg(feature = "validate-tenant-prefix")]
                _tenant_id,
            ),
        }
    }

    fn handle_new_connection(
        &mut self,
        mut connection: Connection,
        incoming: Incoming,
        mut outgoing: Outgoing,
    ) {
        let client_id = outgoing.client_id.clone();
        if let Err(err) = validate_clientid(&client_id) {
            error!("Invalid client_id: {}", err);
            return;
        };

        let span = tracing::info_span!("incoming_connect", client_id);
        let _guard = span.enter();

        if cfg!(not(feature = "allow-duplicate-clientid")) {
            // Check if same client_id already exists and if so, replace it with this new connection
            // ref: https://docs.oasis-open.org/mqtt/mqtt/v3.1.1/os/mqtt-v3.1.1-os.html#_Toc398718032

            let connection_id = self.connection_map.get(&client_id);
            if let Some(connection_id) = connection_id {
                error!(
                    "Duplicate client_id, dropping previous connection with connection_id: {}",
                    connection_id
                );
                self.handle_disconnection(*connection_id, None);
            }
        }

        if self.connections.len() >= self.config.max_connections {
            error!("no space for new connection");
            // let ack = ConnectionAck::Failure("No space for new connection".to_owned());
            // let message = Notification::ConnectionAck(ack);
            return;
        }

        // Retrieve previous connection state from graveyard
        let mut saved = self.graveyard.retrieve(&client_id);
        let clean_session = connection.clean;
        let previous_session = saved.as_ref().is_some_and(|s| s.session_state.is_some());
        // for qos2 pending pubrels
        let mut pending_acks = VecDeque::new();

        let tracker = if !clean_session {
            // if there was some saved state, restore the metrics
            // and get the session's state if present
            let saved_state = saved.and_then(|saved| {
                connection.events = saved.metrics;
                saved.session_state
            });

            // if session's state is present, restore that session
            // otherwise, just start new one
            saved_state.map_or_else(
                || Tracker::new(client_id.clone()),
                |session_state| {
                    connection.subscriptions = session_state.subscriptions;
                    // for using in acklog
                    pending_acks.clone_from(&session_state.unacked_pubrels);
                    outgoing.unacked_pubrels = session_state.unacked_pubrels;
                    session_state.tracker
                },
            )
        } else {
            // Renkei patch: a clean session ends the saved one, and with it the saved
            // subscriptions' hold on their filters' logs.
            if let Some(session) = saved.as_mut().and_then(|s| s.session_state.take()) {
                self.release_subscriptions(session.subscriptions);
            }
            // Only retrieve metrics in clean session
            connection.events = saved.map_or_else(ConnectionEvents::default, |s| s.metrics);
            Tracker::new(client_id.clone())
        };

        let ackslog = AckLog::new();

        let time = match SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
            Ok(v) => v.as_millis().to_string(),
            Err(e) => format!("Time error = {e:?}"),
        };

        let event = "connection at ".to_owned() + &time + ", clean = " + &clean_session.to_string();
        connection.events.events.push_back(event);

        if connection.events.events.len() > 10 {
            connection.events.events.pop_front();
        }

        if let Some(will) = connection.last_will.take() {
            self.last_wills.insert(
                client_id.clone(),
                (will, connection.last_will_properties.take()),
            );
        }

        let connection_id = self.connections.insert(connection);
        assert_eq!(self.ibufs.insert(incoming), connection_id);
        assert_eq!(self.obufs.insert(outgoing), connection_id);

        // Renkei patch: a restored session's subscriptions are the connection's own again.
        // Upstream left them out of `subscription_map`, where UNSUBSCRIBE looks first, so the
        // client could never unsubscribe (no UNSUBACK, and the filter's log kept for good).
        for filter in self.connections[connection_id].subscriptions.iter() {
            self.subscription_map
                .entry(filter.clone())
                .or_default()
                .insert(connection_id);
            self.ibufs[connection_id]
                .meter
                .register_subscription(filter.clone());
        }

        self.connection_map.insert(client_id.clone(), connection_id);
        info!(connection_id, "Client connection registered");

        assert_eq!(self.ackslog.insert(ackslog), connection_id);
        assert_eq!(self.scheduler.add(tracker), connection_id);

        // Check if there are multiple data requests on same filter.
        debug_assert!(self
            .scheduler
            .check_tracker_duplicates(connection_id)
            .is_none());

        let ack = ConnAck {
            session_present: !clean_session && previous_session,
            code: ConnectReturnCode::Success,
        };

        let properties = ConnAckProperties {
            topic_alias_max: Some(TOPIC_ALIAS_MAX),
            ..Default::default()
        };

        let ackslog = self.ackslog.get_mut(connection_id).unwrap();
        ackslog.connack(connection_id, ack, Some(properties));

        pending_acks.into_iter().for_each(|pkid| {
            // NOTE: will it be better if we store the whole PubRel
            // instead of pkid in pending acks
            let pubrel = PubRel {
                pkid,
                reason: PubRelReason::Success,
            };
            ackslog.pubrel(pubrel)
        });

        self.scheduler
            .reschedule(connection_id, ScheduleReason::Init);

        self.router_meters.total_connections += 1;
    }

    /// Renkei patch: ends subscriptions that a connection or a saved session held (see
    /// `release_subscription`).
    fn release_subscriptions(&mut self, subscriptions: impl IntoIterator<Item = Filter>) {
        for filter in subscriptions {
            release_subscription(
                &mut self.datalog,
                &mut self.subscription_map,
                &mut self.notifications,
                &filter,
            );
        }
    }

    /// Renkei patch: a saved session that another one replaced ends (see `Graveyard`).
    fn release_saved_state(&mut self, replaced: Option<SavedState>) {
        if let Some(session) = replaced.and_then(|saved| saved.session_state) {
            self.release_subscriptions(session.subscriptions);
        }
    }

    fn handle_new_meter(&mut self, tx: Sender<Vec<Meter>>) {
        let _meter_id = self.meters.insert(tx);
    }

    fn handle_new_alert(&mut self, tx: Sender<Vec<Alert>>) {
        let _alert_id = self.alerts.insert(tx);
    }

    fn handle_disconnection(&mut self, id: ConnectionId, reason: Option<DisconnectReasonCode>) {
        // Some clients can choose to send Disconnect packet before network disconnection.
        // This will lead to double Disconnect packets in router `events`
        let client_id = match &self.obufs.get(id) {
            Some(v) => v.client_id.clone(),
            None => {
                // Renkei patch: benign (the link's Disconnect after the router dropped the
                // connection, thousands of times in a disconnect storm), so not an error.
                debug!("no-connection id {} is already gone", id);
                self.gone_events.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };

        let span = tracing::info_span!("incoming_disconnect", client_id);
        let _guard = span.enter();

        // must handle last will before sending disconnect packet
        // as the disconnecting client might have subscribed to will topic.
        // if execute_last_will {
        //     self.handle_last_will(id);
        // }

        info!("Disconnecting connection");

        if let Some(reason_code) = reason {
            let outgoing = match self.obufs.get_mut(id) {
                Some(v) => v,
                None => {
                    // Renkei patch: benign, as above.
                    debug!("no-connection id {} is already gone", id);
                    self.gone_events.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            };

            let disconnect = Disconnect { reason_code };

            let disconnect_notification = Notification::Disconnect(disconnect, None);

            outgoing
                .data_buffer
                .lock()
                .push_back(disconnect_notification);

            outgoing.handle.try_send(()).ok();
        }

        // Remove connection from router
        let mut connection = self.connections.remove(id);
        let _incoming = self.ibufs.remove(id);
        let outgoing = self.obufs.remove(id);
        let mut tracker = self.scheduler.remove(id);
        self.connection_map.remove(&client_id);
        self.ackslog.remove(id);

        // Don't remove connection id from readyqueue with index. This will
        // remove wrong connection from readyqueue. Instead just leave disconnected
        // connection in readyqueue and allow 'consume()' method to deal with this
        // self.readyqueue.remove(id);

        let inflight_data_requests = self.datalog.clean(id);
        let retransmissions = outgoing.retransmission_map();

        // Remove connections from all groups and
        // discard empty group ( group with no client )
        // note: can we do this in better way?
        self.shared_subscriptions.retain(|_, group| {
            group.remove_client(&client_id);
            !group.is_empty()
        });

        // Remove this connection from subscriptions
        for filter in connection.subscriptions.iter() {
            if let Some(connections) = self.subscription_map.get_mut(filter) {
                connections.remove(&id);
            }
        }

        // Add disconnection event to metrics
        let time = match SystemTime::now().duration_since(SystemTime::UNIX_EPOCH) {
            Ok(v) => v.as_millis().to_string(),
            Err(e) => format!("Time error = {e:?}"),
        };

        let event = "disconnection at ".to_owned() + &time;
        connection.events.events.push_back(event);

        if connection.events.events.len() > 10 {
            connection.events.events.pop_front();
        }

        // Save state for persistent sessions
        if !connection.clean {
            // Add inflight data requests back to tracker
            inflight_data_requests
                .into_iter()
                .for_each(|r| tracker.register_data_request(r));

            for request in tracker.data_requests.iter_mut() {
                if let Some(cursor) = retransmissions.get(&request.filter_idx) {
                    request.cursor = *cursor;
                    // reset the group cursor
                    if let Some(group_name) = &request.group {
                        // TODO: Test this more
                        self.shared_subscriptions
                            .get_mut(group_name)
                            .expect("group must exists")
                            .cursor = *cursor;
                    }
                }
            }

            // Renkei patch: the saved session keeps its subscriptions, and their logs.
            let replaced = self.graveyard.save_state(
                tracker,
                connection.subscriptions,
                connection.events,
                outgoing.unacked_pubrels,
            );
            self.release_saved_state(replaced);
        } else {
            tracker.pause(PauseReason::Busy);
            let id = tracker.id.clone();
            // Renkei patch: a clean session's subscriptions end with it.
            self.release_subscriptions(connection.subscriptions);
            // Only save metrics in clean session
            let replaced = self.graveyard.save_metrics(id, connection.events);
            self.release_saved_state(replaced);
        }
        self.router_meters.total_connections -= 1;
    }

    /// Handles new incoming data on a topic
    fn handle_device_payload(&mut self, id: ConnectionId) {
        // TODO: Retun errors and move error handling to the caller
        let incoming = match self.ibufs.get_mut(id) {
            Some(v) => v,
            None => {
                // Renkei patch: benign (data the link sent before the router dropped the
                // connection), so not an error.
                debug!("no-connection id {} is already gone", id);
                self.gone_events.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };

        let client_id = incoming.client_id.clone();
        let span = tracing::error_span!("incoming_payload", client_id);
        let _guard = span.enter();

        // Instead of exchanging, we should just append new incoming packets inside cache
        let mut packets = incoming.exchange(self.cache.take().unwrap());

        let mut force_ack = false;
        let mut new_data = false;
        let mut disconnect = false;
        let mut disconnect_reason: Option<DisconnectReasonCode> = None;
        let mut held = false;

        // info!("{:15.15}[I] {:20} count = {}", client_id, "packets", packets.len());

        while let Some(packet) = packets.pop_front() {
            match packet {
                Packet::Publish(publish, properties) => {
                    let span = tracing::error_span!("publish", topic = ?publish.topic, pkid = publish.pkid);
                    let _guard = span.enter();

                    // Renkei patch: while the tap's consumer is behind, this publish and all
                    // after it wait in the connection's buffer, and so does its PUBACK.
                    if let Some(tap) = &self.tap {
                        if !tap.is_closed() && tap.may_take(&publish.topic) && tap.must_hold() {
                            packets.push_front(Packet::Publish(publish, properties));
                            held = true;
                            break;
                        }
                    }

                    let qos = publish.qos;
                    let pkid = publish.pkid;

                    // Prepare acks for the above publish
                    // If any of the publish in the batch results in force flush,
                    // set global force flush flag. Force flush is triggered when the
                    // router is in instant ack more or connection data is from a replica
                    //
                    // TODO: handle multiple offsets
                    //
                    // The problem with multiple offsets is that when using replication with the current
                    // architecture, a single publish might get appended to multiple commit logs, resulting in
                    // multiple offsets (see `append_to_commitlog` function), meaning replicas will need to
                    // coordinate using multiple offsets, and we don't have any idea how to do so right now.
                    // Currently as we don't have replication, we just use a single offset, even when appending to
                    // multiple commit logs.

                    match qos {
                        QoS::AtLeastOnce => {
                            let puback = PubAck {
                                pkid,
                                reason: PubAckReason::Success,
                            };

                            let ackslog = self.ackslog.get_mut(id).unwrap();
                            ackslog.puback(puback);
                            force_ack = true;
                        }
                        QoS::ExactlyOnce => {
                            let pubrec = PubRec {
                                pkid,
                                reason: PubRecReason::Success,
                            };

                            let ackslog = self.ackslog.get_mut(id).unwrap();
                            ackslog.pubrec(publish, unboxed(properties), pubrec);
                            force_ack = true;
                            continue;
                        }
                        QoS::AtMostOnce => {
                            // Do nothing
                        }
                    };

                    self.router_meters.total_publishes += 1;

                    // Try to append publish to commitlog
                    match append_to_commitlog(
                        id,
                        publish.clone(),
                        unboxed(properties),
                        &mut self.datalog,
                        &mut self.notifications,
                        &mut self.connections,
                        self.tap.as_ref(),
                    ) {
                        Ok(_offset) => {
                            // Even if one of the data in the batch is appended to commitlog,
                            // set new data. This triggers notifications to wake waiters.
                            // Don't overwrite this flag to false if it is already true.
                            new_data = true;
                        }
                        Err(e) => {
                            // Disconnect on bad publishes
                            error!(
                                reason = ?e, "Failed to append to commitlog"
                            );
                            self.router_meters.failed_publishes += 1;
                            disconnect = true;

                            if let RouterError::Disconnect(code) = e {
                                disconnect_reason = Some(code)
                            }

                            break;
                        }
                    };

                    let meter = &mut self.ibufs.get_mut(id).unwrap().meter;
                    if let Err(e) = meter.register_publish(&publish) {
                        error!(
                            reason = ?e, "Failed to write to incoming meter"
                        );
                    };
                }
                Packet::Subscribe(mut subscribe, props) => {
                    let mut return_codes = Vec::new();
                    let pkid = subscribe.pkid;
                    // let len = s.len();

                    for f in &mut subscribe.filters {
                        let span =
                            tracing::info_span!("subscribe", topic = f.path, pkid = subscribe.pkid);
                        let _guard = span.enter();

                        info!("Adding subscription on topic {}", f.path);
                        let connection = self.connections.get_mut(id).unwrap();

                        if let Err(e) = validate_subscription(connection, f) {
                            warn!(reason = ?e,"Subscription cannot be validated: {}", e);

                            disconnect = true;
                            break;
                        }

                        let mut filter = f.path.clone();
                        let mut group = None;

                        if let Some((grp, filter_path)) = extract_group(&f.path) {
                            group = Some(grp);
                            filter = filter_path;
                        };

                        let subscription_id = props.as_ref().and_then(|p| p.id);

                        if subscription_id == Some(0) {
                            error!("Subscription identifier can't be 0");
                            disconnect = true;
                            disconnect_reason = Some(DisconnectReasonCode::ProtocolError);
                            break;
                        }

                        let (idx, cursor) = self.datalog.next_native_offset(&filter);

                        // in case of shared sub original_filter will be $share/group/topic
                        // this is because we do want to treat is as diffrent subscription
                        // and create DataRequest, while using the same datalog of "topic"
                        // NOTE: topic & $share/group/topic will have same filteridx!
                        self.prepare_filter(id, cursor, idx, f, group, subscription_id);

                        let code = match f.qos {
                            QoS::AtMostOnce => SubscribeReasonCode::QoS0,
                            QoS::AtLeastOnce => SubscribeReasonCode::QoS1,
                            QoS::ExactlyOnce => SubscribeReasonCode::QoS2,
                        };

                        return_codes.push(code);
                    }

                    // let meter = &mut self.ibufs.get_mut(id).unwrap().meter;
                    // meter.total_size += len;

                    let suback = SubAck { pkid, return_codes };
                    let ackslog = self.ackslog.get_mut(id).unwrap();
                    ackslog.suback(suback);
                    force_ack = true;
                }
                Packet::Unsubscribe(unsubscribe, _) => {
                    let connection = self.connections.get_mut(id).unwrap();
                    let pkid = unsubscribe.pkid;
                    for filter in &unsubscribe.filters {
                        let span = tracing::info_span!("unsubscribe", topic = filter, pkid);
                        let _guard = span.enter();

                        debug!("Removing subscription on filter {}", filter);
                        if let Some(connection_ids) = self.subscription_map.get_mut(filter) {
                            let removed = connection_ids.remove(&id);
                            if !removed {
                                continue;
                            }

                            let meter = &mut self.ibufs.get_mut(id).unwrap().meter;
                            meter.unregister_subscription(filter);

                            if !connection.subscriptions.remove(filter) {
                                warn!(
                                    pkid = unsubscribe.pkid,
                                    "Unsubscribe failed as filter was not subscribed previously"
                                );
                                continue;
                            }

                            // Remove connections from all groups
                            // discard empty group ( group with no client )
                            // note: can we do this in better way?
                            self.shared_subscriptions.retain(|_, group| {
                                group.remove_client(&client_id);
                                !group.is_empty()
                            });

                            if let Some(broker_aliases) = connection.broker_topic_aliases.as_mut() {
                                broker_aliases.remove_alias(filter);
                            }

                            // remove the subscription id
                            connection.subscription_ids.remove(filter);

                            let unsuback = UnsubAck {
                                pkid,
                                // reasons are used in MQTTv5
                                reasons: vec![UnsubAckReason::Success],
                            };
                            let ackslog = self.ackslog.get_mut(id).unwrap();
                            ackslog.unsuback(unsuback);
                            self.scheduler.untrack(id, filter);
                            // Renkei patch: the subscription's request may be parked in its
                            // log's waiters, or woken by a publish earlier in this batch; it
                            // goes from both (upstream missed the waiter of a shared one and
                            // let a woken one be tracked again below). Then the log is freed
                            // if this was its last subscription.
                            self.datalog
                                .remove_waiters_for_id(id, log_filter(filter), filter);
                            self.notifications.retain(|(waiter, request)| {
                                *waiter != id || request.filter != *filter
                            });
                            release_subscription(
                                &mut self.datalog,
                                &mut self.subscription_map,
                                &mut self.notifications,
                                filter,
                            );
                            force_ack = true;
                        }
                    }
                }
                Packet::PubAck(puback, _) => {
                    let span = tracing::info_span!("puback", pkid = puback.pkid);
                    let _guard = span.enter();

                    let outgoing = self.obufs.get_mut(id).unwrap();
                    let pkid = puback.pkid;
                    if outgoing.register_ack(pkid).is_none() {
                        error!(pkid, "Unsolicited/ooo ack received for pkid {}", pkid);
                        disconnect = true;
                        break;
                    }

                    self.scheduler.reschedule(id, ScheduleReason::IncomingAck);
                }
                Packet::PubRec(pubrec, _) => {
                    let span = tracing::info_span!("pubrec", pkid = pubrec.pkid);
                    let _guard = span.enter();

                    let outgoing = self.obufs.get_mut(id).unwrap();
                    let pkid = pubrec.pkid;
                    if outgoing.register_ack(pkid).is_none() {
                        error!(pkid, "Unsolicited/ooo ack received for pkid {}", pkid);
                        disconnect = true;
                        break;
                    }

                    let ackslog = self.ackslog.get_mut(id).unwrap();
                    let pubrel = PubRel {
                        pkid: pubrec.pkid,
                        reason: PubRelReason::Success,
                    };

                    outgoing.register_pubrec(pubrel.pkid);
                    ackslog.pubrel(pubrel);
                    self.scheduler.reschedule(id, ScheduleReason::IncomingAck);
                }
                Packet::PubRel(pubrel, None) => {
                    let span = tracing::info_span!("pubrel", pkid = pubrel.pkid);
                    let _guard = span.enter();

                    let ackslog = self.ackslog.get_mut(id).unwrap();
                    let pubcomp = PubComp {
                        pkid: pubrel.pkid,
                        reason: PubCompReason::Success,
                    };

                    // NOTE: client can try to resend previously unacked pubrels
                    // on reconnection ( with clean session false )
                    // we try to retrive publish assuming broker saved the previous state
                    // successfully in graveyard.
                    let (publish, props) = match ackslog.pubcomp(pubcomp) {
                        Some(v) => v,
                        None => {
                            disconnect = true;
                            break;
                        }
                    };

                    // Try to append publish to commitlog
                    match append_to_commitlog(
                        id,
                        publish,
                        props,
                        &mut self.datalog,
                        &mut self.notifications,
                        &mut self.connections,
                        self.tap.as_ref(),
                    ) {
                        Ok(_offset) => {
                            // Even if one of the data in the batch is appended to commitlog,
                            // set new data. This triggers notifications to wake waiters.
                            // Don't overwrite this flag to false if it is already true.
                            new_data = true;
                        }
                        Err(e) => {
                            // Disconnect on bad publishes
                            error!(
                                reason = ?e, "Failed to append to commitlog"
                            );
                            self.router_meters.failed_publishes += 1;
                            disconnect = true;
                            break;
                        }
                    };
                    self.scheduler.reschedule(id, ScheduleReason::IncomingAck);
                }
                Packet::PubComp(pubcomp, _) => {
                    let span = tracing::info_span!("pubcomp", pkid = pubcomp.pkid);
                    let _guard = span.enter();

                    let outgoing = self.obufs.get_mut(id).unwrap();
                    let pkid = pubcomp.pkid;
                    if outgoing.register_pubcomp(pkid).is_none() {
                        error!(
                            pkid,
                            "ack received for pkid {}, but the pkid didn't exists!", pkid
                        );
                        disconnect = true;
                        break;
                    }
                }
                Packet::PingReq(_) => {
                    let ackslog = self.ackslog.get_mut(id).unwrap();
                    ackslog.pingresp(PingResp);

                    force_ack = true;
                }
                Packet::Disconnect(_, _) => {
                    let span = tracing::info_span!("disconnect");
                    let _guard = span.enter();
                    disconnect = true;
                    // delete the last will message
                    self.last_wills.remove(&client_id);
                    break;
                }
                incoming => {
                    warn!(packet=?incoming, "Unexpected packet received, ignoring the packet." );
                }
            }
        }

        if held {
            // Renkei patch: PINGREQs behind the held publish are answered now (MQTT orders
            // PUBACKs among themselves, not against PINGRESPs), so a client that waits for
            // its acknowledgements is not taken for dead; the rest goes back, in order,
            // before anything the connection sent since.
            let pings = packets.len();
            packets.retain(|p| !matches!(p, Packet::PingReq(_)));
            for _ in packets.len()..pings {
                self.ackslog.get_mut(id).unwrap().pingresp(PingResp);
                force_ack = true;
            }
            if let Some(incoming) = self.ibufs.get_mut(id) {
                let mut buffer = incoming.buffer.lock();
                while let Some(packet) = packets.pop_back() {
                    buffer.push_front(packet);
                }
            }
            if self.in_tap_line.insert(id) {
                self.tap_line.push_back(id);
            }
        }
        packets.clear();
        // Renkei patch: this buffer goes to the next connection's exchange; a burst's
        // capacity is not handed round (see `Outgoing::new`).
        packets.shrink_to(crate::link::remote::KEPT_CAPACITY);
        self.cache = Some(packets);

        // Prepare AcksRequest in tracker if router is operating in a
        // single node mode or force ack request for subscriptions
        if force_ack {
            self.scheduler.reschedule(id, ScheduleReason::FreshData);
        }

        // Notify waiting consumers only if there is publish data. During
        // subscription, data request is added to data waiter. With out this
        // if condition, connection will be woken up even during subscription
        if new_data {
            // Prepare all the consumers which are waiting for new data
            while let Some((id, request)) = self.notifications.pop_front() {
                self.scheduler.track(id, request);
                self.scheduler.reschedule(id, ScheduleReason::FreshData);
            }
        }

        // Incase BytesMut represents 10 packets, publish error/diconnect event
        // on say 5th packet should not block new data notifications for packets
        // 1 - 4. Hence we use a flag instead of diconnecting immediately
        if disconnect {
            self.handle_disconnection(id, disconnect_reason);
        }
    }

    /// Renkei patch: marks connection `id`'s data request for `filter` to send the retained
    /// messages again, and schedules it.
    fn resend_retained(&mut self, id: ConnectionId, filter_idx: FilterIdx, filter: &str) {
        let mut found = false;
        if let Some(tracker) = self.scheduler.trackers.get_mut(id) {
            for request in tracker.data_requests.iter_mut() {
                if request.filter == filter {
                    request.forward_retained = true;
                    found = true;
                }
            }
        }
        if !found {
            if let Some(log) = self.datalog.native.get_mut(filter_idx) {
                let waiters = log.waiters.get_mut();
                if let Some(at) = waiters
                    .iter()
                    .position(|(c, r)| *c == id && r.filter == filter)
                {
                    if let Some((_, mut request)) = waiters.remove(at) {
                        request.forward_retained = true;
                        self.scheduler.track(id, request);
                        found = true;
                    }
                }
            }
        }
        if found {
            self.scheduler.reschedule(id, ScheduleReason::NewFilter);
        }
    }

    /// Renkei patch: the tap's consumer made room; the connections held for it take their
    /// turns, each until it has nothing more or the tap is full again (it then goes to the
    /// back of the line).
    fn serve_tap_line(&mut self) {
        let waiting = self.tap_line.len();
        for _ in 0..waiting {
            let Some(id) = self.tap_line.pop_front() else {
                break;
            };
            self.in_tap_line.remove(&id);
            // A connection gone since keeps no place in line (its id may have been given to
            // a new connection, which then only gets an early look at its buffer).
            if self.ibufs.get(id).is_some() {
                self.handle_device_payload(id);
            }
            if self
                .tap
                .as_ref()
                .is_some_and(|t| !t.is_closed() && t.is_full())
            {
                break;
            }
        }
    }

    /// Apply filter and prepare this connection to receive subscription data
    /// Handle retained messages as per subscription options!
    fn prepare_filter(
        &mut self,
        id: ConnectionId,
        cursor: Offset,
        filter_idx: FilterIdx,
        filter: &protocol::Filter,
        group: Option<String>,
        subscription_id: Option<usize>,
    ) {
        let filter_path = &filter.path;

        // Add connection id to subscription list
        match self.subscription_map.get_mut(filter_path) {
            Some(connections) => {
                connections.insert(id);
            }
            None => {
                let mut connections = HashSet::new();
                connections.insert(id);
                self.subscription_map
                    .insert(filter_path.clone(), connections);
            }
        }

        // Prepare consumer to pull data in case of subscription
        let connection = self.connections.get_mut(id).unwrap();

        // Add/Create shared group
        if let Some(group_name) = &group {
            let client_id = connection.client_id.clone();

            let shared_group = self
                .shared_subscriptions
                .entry(group_name.to_string())
                .or_insert(SharedGroup::new(
                    cursor,
                    self.config.shared_subscriptions_strategy.clone(),
                ));

            shared_group.add_client(client_id);
        };

        if let Some(subscription_id) = subscription_id {
            connection
                .subscription_ids
                .insert(filter_path.clone(), subscription_id);
        }

        // check is group is None because retained messages aren't sent
        // for shared subscriptions
        // TODO: use retain forward rules
        let forward_retained = group.is_none();

        // call to `insert(_)` returns `true` if it didn't contain the filter_path already
        // i.e. its a new subscription
        if connection.subscriptions.insert(filter_path.clone()) {
            // Renkei patch: the log lives as long as a subscription reads it.
            self.datalog.add_subscriber(filter_idx);
            let request = DataRequest {
                filter: filter_path.clone(),
                filter_idx,
                qos: filter.qos as u8,
                cursor,
                read_count: 0,
                max_count: 100,
                // set true for new subscriptions
                forward_retained,
                group,
                persistent: !connection.clean,
            };

            self.scheduler.track(id, request);
            self.scheduler.reschedule(id, ScheduleReason::NewFilter);
            debug_assert!(self.scheduler.check_tracker_duplicates(id).is_none())
        } else if forward_retained
            && matches!(
                filter.retain_forward_rule,
                protocol::RetainForwardRule::OnEverySubscribe
            )
        {
            // Renkei patch: a SUBSCRIBE for a filter the client already holds replaces the
            // subscription and re-sends the retained messages (MQTT 3.1.1 §3.8.4; MQTT 5's
            // retain handling 0). Upstream sent them only for a new filter. The filter's data
            // request is either with the scheduler or parked among the log's waiters.
            self.resend_retained(id, filter_idx, filter_path);
        }

        // TODO: figure out how we can update existing DataRequest
        // helpful in re-subscriptions and forwarding retained messages on
        // every subscribe

        let meter = &mut self.ibufs.get_mut(id).unwrap().meter;
        meter.register_subscription(filter_path.clone());
    }

    /// When a connection is ready, it should sweep native data from 'datalog',
    /// send data and notifications to consumer.
    /// To activate a connection, first connection's tracker is fetched and
    /// all the requests are handled.
    fn consume(&mut self) -> Option<()> {
        let (id, mut requests) = self.scheduler.poll()?;

        let span = tracing::info_span!("[<] outgoing", connection_id = id);
        let _guard = span.enter();

        let outgoing = match self.obufs.get_mut(id) {
            Some(v) => v,
            None => {
                error!("Connection is already disconnected");
                return Some(());
            }
        };

        let ackslog = self.ackslog.get_mut(id).unwrap();
        let datalog = &mut self.datalog;
        let alertlog = &mut self.alertlog;

        trace!("Consuming requests");

        // We always try to ack when ever a connection is scheduled
        ack_device_data(ackslog, outgoing);

        let connection = &mut self.connections[id];

        // Keep track of temporarily skipped DataRequest
        // NOTE: VecDeque::new() doesn't allocate memory until elements are pushed
        let mut skipped_requests: VecDeque<DataRequest> = VecDeque::new();

        // A new connection's tracker is always initialized with acks request.
        // A subscribe will register data request.
        // So a new connection is always scheduled with at least one request
        for _ in 0..MAX_SCHEDULE_ITERATIONS {
            let mut request = match requests.pop_front() {
                // Handle next data or acks request
                Some(request) => request,
                // No requests in the queue. This implies that consumer data and
                // acks are completely caught up. Pending requests are registered
                // in waiters and awaiting new notifications (device or replica data)
                None => {
                    if skipped_requests.is_empty() {
                        // if no requests is in skip list, that means
                        // we have nothing left to process, i.e. we caughtup
                        self.scheduler.pause(id, PauseReason::Caughtup);
                    }
                    // add back the skipped requests!
                    self.scheduler.trackv(id, skipped_requests);
                    return Some(());
                }
            };

            let shared_group = request
                .group
                .as_ref()
                .and_then(|name| self.shared_subscriptions.get_mut(name));

            match forward_device_data(
                &mut request,
                datalog,
                outgoing,
                alertlog,
                connection,
                shared_group,
            ) {
                ConsumeStatus::BufferFull => {
                    requests.push_back(request);
                    self.scheduler.pause(id, PauseReason::Busy);
                    break;
                }
                ConsumeStatus::InflightFull => {
                    requests.push_back(request);
                    self.scheduler.pause(id, PauseReason::InflightFull);
                    break;
                }
                ConsumeStatus::FilterCaughtup => {
                    let filter = &request.filter;
                    trace!(filter, "Filter caughtup {filter}, parking connection");

                    // When all the data in the log is caught up, current request is
                    // registered in waiters and not added back to the tracker. This
                    // ensures that tracker.next() stops when all the requests are done
                    datalog.park(id, request);
                }
                ConsumeStatus::PartialRead => {
                    requests.push_back(request);
                }
                ConsumeStatus::SkipRequest => {
                    skipped_requests.push_back(request);
                }
            }
        }

        // Add requests back to the tracker if there are any
        requests.extend(skipped_requests);
        self.scheduler.trackv(id, requests);
        Some(())
    }

    pub fn handle_last_will(
        &mut self,
        client_id: String,
        #[cfg(feature = "validate-tenant-prefix")] tenant_id: Option<String>,
    ) {
        #[cfg(feature = "validate-tenant-prefix")]
        let tenant_prefix = tenant_id.map(|id| format!("/tenants/{id}/"));

        let Some((will, will_props)) = self.last_wills.remove(&client_id) else {
            return;
        };

        let publish = Publish {
            dup: false,
            qos: will.qos,
            retain: will.retain,
            topic: will.topic,
            pkid: 0,
            payload: will.message,
        };

        let properties = will_props.map(|props| PublishProperties {
            payload_format_indicator: props.payload_format_indicator,
            message_expiry_interval: props.message_expiry_interval,
            response_topic: props.response_topic,
            correlation_data: props.correlation_data,
            user_properties: props.user_properties,
            content_type: props.content_type,
            ..Default::default()
        });

        match append_will_message(
            publish,
            properties,
            &mut self.datalog,
            &mut self.notifications,
            #[cfg(feature = "validate-tenant-prefix")]
            tenant_prefix,
            self.tap.as_ref().map(|tap| (tap, client_id.as_str())),
        ) {
            Ok(_offset) => {
                // Prepare all the consumers which are waiting for new data
                while let Some((id, request)) = self.notifications.pop_front() {
                    self.scheduler.track(id, request);
                    self.scheduler.reschedule(id, ScheduleReason::FreshData);
                }
            }
            Err(e) => {
                // Disconnect on bad publishes
                error!(
                    reason = ?e, "Failed to append to commitlog"
                );
                self.router_meters.failed_publishes += 1;
                // Removed disconnect = true from here because we disconnect anyways
            }
        };
    }

    fn send_meters(&mut self) {
        let mut meters = Vec::with_capacity(10);
        if let Some(router_meter) = self.router_meters.get() {
            meters.push(Meter::Router(self.id, router_meter));
        }
        for f in self.subscription_map.keys() {
            let filter = f.to_owned();
            if let Some(subscription_meter) = self.datalog.meter(f).and_then(|meter| meter.get()) {
                meters.push(Meter::Subscription(filter, subscription_meter));
            }
        }

        if !meters.is_empty() {
            for (meter_id, link) in self.meters.iter() {
                if let Err(e) = link.try_send(meters.clone()) {
                    error!(meter_id, "Failed to send meter. Error = {:?}", e);
                }
            }
        }
    }

    fn send_alerts(&mut self) {
        let alerts = self.alertlog.take();

        if !alerts.is_empty() {
            let alerts: Vec<Alert> = alerts.into();
            for (meter_id, link) in self.alerts.iter() {
                if let Err(e) = link.try_send(alerts.clone()) {
                    error!(meter_id, "Failed to send alert. Error = {:?}", e);
                }
            }
        }
    }
}

fn append_to_commitlog(
    id: ConnectionId,
    mut publish: Publish,
    mut properties: Option<PublishProperties>,
    datalog: &mut DataLog,
    notifications: &mut VecDeque<(ConnectionId, DataRequest)>,
    connections: &mut Slab<Connection>,
    tap: Option<&Tap>,
) -> Result<Offset, RouterError> {
    let connection = connections.get_mut(id).unwrap();

    let topic_alias = properties.as_mut().and_then(|p| {
        // clear the received value as it is irrelevant while forwarding publishes
        p.topic_alias.take()
    });

    // TODO: broker should properly send the disconnect packet!
    if properties
        .as_ref()
        .is_some_and(|p| !p.subscription_identifiers.is_empty())
    {
        error!("A PUBLISH packet sent from a Client to a Server MUST NOT contain a Subscription Identifier");
        return Err(RouterError::Disconnect(
            DisconnectReasonCode::MalformedPacket,
        ));
    }

    if let Some(alias) = topic_alias {
        validate_and_set_topic_alias(&mut publish, connection, alias)?;
    };

    // Renkei patch: the message gets bytes of its own. Its topic and payload were views of
    // the connection's read buffer, and every log entry, retained copy and forward that held
    // them kept that whole buffer alive (upstream rumqtt #1001): a 60-byte message could pin
    // kilobytes for as long as a log kept it.
    publish.topic = Bytes::copy_from_slice(&publish.topic);
    publish.payload = Bytes::copy_from_slice(&publish.payload);

    let topic = std::str::from_utf8(&publish.topic)?;

    // Ensure that only clients associated with a tenant can publish to tenant's topic
    #[cfg(feature = "validate-tenant-prefix")]
    if let Some(tenant_prefix) = &connection.tenant_prefix {
        if !topic.starts_with(tenant_prefix) {
            return Err(RouterError::BadTenant(
                tenant_prefix.to_owned(),
                topic.to_owned(),
            ));
        }
    }

    if publish.payload.is_empty() {
        datalog.remove_from_retained_publishes(topic.to_owned());
    } else if publish.retain {
        datalog.insert_to_retained_publishes(publish.clone(), properties.clone(), topic.to_owned());
    }

    // after recording retained message, we also send that message to existing subscribers
    // as normal publish message. Therefore we are setting retain to false
    publish.retain = false;
    let pkid = publish.pkid;

    let filter_idxs = datalog.matches(topic);

    // Create a dynamic filter if dynamic_filters are enabled for this connection
    let filter_idxs = match filter_idxs {
        Some(v) => v,
        None if connection.dynamic_filters => {
            let (idx, _cursor) = datalog.next_native_offset(topic);
            vec![idx]
        }
        None => return Err(RouterError::NoMatchingFilters(topic.to_owned())),
    };

    let mut o = (0, 0);
    for filter_idx in filter_idxs {
        // Renkei patch: `matches` forgets a log when it is freed; skip rather than unwrap.
        let Some(datalog) = datalog.native.get_mut(filter_idx) else {
            continue;
        };
        let publish_data = (publish.clone(), properties.clone());
        let (offset, filter) = datalog.append(publish_data.into(), notifications);
        debug!(
            pkid,
            "Appended to commitlog: {}[{}, {})", filter, offset.0, offset.1,
        );

        o = offset;
    }

    // Renkei patch: appended, so the tap's consumer gets it (the PUBACK leaves after this).
    if let Some(tap) = tap {
        tap.take(&publish.topic, &publish.payload, &connection.client_id);
    }

    // error!("{:15.15}[E] {:20} topic = {}", connections[id].client_id, "no-filter", topic);
    Ok(o)
}

fn append_will_message(
    mut publish: Publish,
    properties: Option<PublishProperties>,
    datalog: &mut DataLog,
    notifications: &mut VecDeque<(ConnectionId, DataRequest)>,
    #[cfg(feature = "validate-tenant-prefix")] tenant_prefix: Option<String>,
    tap: Option<(&Tap, &str)>,
) -> Result<Offset, RouterError> {
    // Renkei patch: bytes of its own (see `append_to_commitlog`).
    publish.topic = Bytes::copy_from_slice(&publish.topic);
    publish.payload = Bytes::copy_from_slice(&publish.payload);
    // TODO: broker should properly send the disconnect packet!
    if properties
        .as_ref()
        .is_some_and(|p| !p.subscription_identifiers.is_empty())
    {
        error!("A PUBLISH packet sent from a Client to a Server MUST NOT contain a Subscription Identifier");
        return Err(RouterError::Disconnect(
            DisconnectReasonCode::MalformedPacket,
        ));
    }

    let topic = std::str::from_utf8(&publish.topic)?;

    // Ensure that only clients associated with a tenant can publish to tenant's topic
    #[cfg(feature = "validate-tenant-prefix")]
    if let Some(tenant_prefix) = tenant_prefix {
        if !topic.starts_with(&tenant_prefix) {
            return Err(RouterError::BadTenant(
                tenant_prefix.to_owned(),
                topic.to_owned(),
            ));
        }
    }

    if publish.payload.is_empty() {
        datalog.remove_from_retained_publishes(topic.to_owned());
    } else if publish.retain {
        datalog.insert_to_retained_publishes(publish.clone(), properties.clone(), topic.to_owned());
    }

    // after recording retained message, we also send that message to existing subscribers
    // as normal publish message. Therefore we are setting retain to false
    publish.retain = false;
    let pkid = publish.pkid;

    let filter_idxs = datalog.matches(topic);

    let filter_idxs = match filter_idxs {
        Some(v) => v,
        None => return Err(RouterError::NoMatchingFilters(topic.to_owned())),
    };

    let mut o = (0, 0);
    for filter_idx in filter_idxs {
        // Renkei patch: `matches` forgets a log when it is freed; skip rather than unwrap.
        let Some(datalog) = datalog.native.get_mut(filter_idx) else {
            continue;
        };
        let publish_data = (publish.clone(), properties.clone());
        let (offset, filter) = datalog.append(publish_data.into(), notifications);
        debug!(
            pkid,
            "Appended to commitlog: {}[{}, {})", filter, offset.0, offset.1,
        );

        o = offset;
    }

    // Renkei patch: a will is a message the tap's consumer must see like any other. It is
    // never held back (no one waits for its acknowledgement); the tap's bound is soft by it.
    if let Some((tap, client_id)) = tap {
        tap.take(&publish.topic, &publish.payload, client_id);
    }

    Ok(o)
}

fn validate_and_set_topic_alias(
    publish: &mut Publish,
    connection: &mut Connection,
    alias: u16,
) -> Result<(), RouterError> {
    if alias == 0 || alias > TOPIC_ALIAS_MAX {
        error!("Alias must be greater than 0 and <={TOPIC_ALIAS_MAX}");
        return Err(RouterError::Disconnect(
            DisconnectReasonCode::TopicAliasInvalid,
        ));
    }

    if publish.topic.is_empty() {
        // if publish topic is empty, publisher must have set a valid alias
        let Some(alias_topic) = connection.topic_aliases.get(&alias) else {
            error!("Empty topic name with invalid alias");
            return Err(RouterError::Disconnect(DisconnectReasonCode::ProtocolError));
        };
        // set the publish topic before further processing
        publish.topic = alias_topic.to_owned().into();
    } else {
        // if publish topic isn't empty, that means
        // publisher wants to establish new mapping for topic & alias
        let topic = std::str::from_utf8(&publish.topic)?;
        connection.topic_aliases.insert(alias, topic.to_owned());
        trace!("set alias {alias} for topic {topic}");
    };

    Ok(())
}

/// Sweep ackslog for all the pending acks.
/// We write everything to outgoing buf with out worrying about buffer size
/// because acks most certainly won't cause memory bloat
fn ack_device_data(ackslog: &mut AckLog, outgoing: &mut Outgoing) -> bool {
    let span = tracing::info_span!("outgoing_ack", client_id = outgoing.client_id);
    let _guard = span.enter();

    let acks = ackslog.readv();
    if acks.is_empty() {
        debug!("No acks pending");
        return false;
    }

    let mut count = 0;
    let mut buffer = outgoing.data_buffer.lock();

    // Unlike forwards, we are reading all the pending acks for a given connection.
    // At any given point of time, there can be a max of connection's buffer size
    for ack in acks.drain(..) {
        let pkid = packetid(&ack);
        trace!(pkid, "Ack added for pkid {}", pkid);
        let message = Notification::DeviceAck(ack);
        buffer.push_back(message);
        count += 1;
    }

    // Renkei patch: a burst's acknowledgements do not keep their room (see `Outgoing::new`).
    acks.shrink_to(crate::link::remote::KEPT_CAPACITY);
    debug!(acks_count = count, "Acks sent to device");
    outgoing.handle.try_send(()).ok();
    true
}

enum ConsumeStatus {
    /// Limit for publishes on outgoing channel reached
    BufferFull,
    /// Limit for inflight publishes on outgoing channel reached
    InflightFull,
    /// All publishes on topic forwarded
    FilterCaughtup,
    /// Some publishes on topic have been forwarded
    PartialRead,
    /// Use to indicate we want to skip the datareqest
    /// for shared subscriptions
    SkipRequest,
}

/// Sweep datalog from offset in DataRequest and updates DataRequest
/// for next sweep. Returns (busy, caughtup) status
/// Returned arguments:
/// 1. `busy`: whether the data request was completed or not.
/// 2. `done`: whether the connection was busy or not.
/// 3. `inflight_full`: whether the inflight requests were completely filled
fn forward_device_data(
    request: &mut DataRequest,
    datalog: &mut DataLog,
    outgoing: &mut Outgoing,
    alertlog: &mut AlertLog,
    connection: &mut Connection,
    shared_group: Option<&mut SharedGroup>,
) -> ConsumeStatus {
    let span = tracing::info_span!("outgoing_publish", client_id = outgoing.client_id);
    let _guard = span.enter();

    if let Some(ref shared_group) = shared_group {
        // update the request cursor to use shared cursor
        request.cursor = shared_group.cursor;
    }

    trace!(
        "Reading from datalog: {}[{}, {}]",
        request.filter,
        request.cursor.0,
        request.cursor.1
    );

    let mut inflight_slots = if request.qos != 0 {
        // for qos 1 & 2
        let len = outgoing.free_slots();
        if len == 0 {
            trace!("Aborting read from datalog: inflight capacity reached");
            return ConsumeStatus::InflightFull;
        }

        len as u64
    } else {
        datalog.config.max_outgoing_packet_count
    };

    if shared_group
        .as_ref()
        .is_some_and(|g| g.strategy == Strategy::RoundRobin)
    {
        // only read one message in case of round robin
        // so that messages get equally distributed!
        inflight_slots = 1;
    }

    let mut publishes = Vec::new();

    if request.forward_retained {
        // NOTE: ideally we want to limit the number of read messages
        // and skip the messages previously read while reading next time.
        // but for now, we just try to read all messages and drop the excess ones
        let mut retained_publishes = datalog.read_retained_messages(&request.filter);
        retained_publishes.truncate(inflight_slots as usize);

        publishes.extend(retained_publishes.into_iter().map(|p| (p, None)));
        inflight_slots -= publishes.len() as u64;

        // we only want to forward retained messages once
        request.forward_retained = false;
    }

    let (next, publishes_from_datalog) =
        match datalog.native_readv(request.filter_idx, request.cursor, inflight_slots) {
            Ok(v) => v,
            Err(e) => {
                error!(error = ?e, "Failed to read from commitlog {}", e);
                return ConsumeStatus::FilterCaughtup;
            }
        };

    publishes.extend(
        publishes_from_datalog
            .into_iter()
            .map(|(p, offset)| (p, Some(offset))),
    );

    let (start, next, caughtup) = match next {
        Position::Next { start, end } => (start, end, false),
        Position::Done { start, end } => (start, end, true),
    };

    if let Some(ref shared_group) = shared_group {
        let skip_current_client = Some(&outgoing.client_id) != shared_group.current_client();

        if skip_current_client {
            return if caughtup {
                ConsumeStatus::FilterCaughtup
            } else {
                ConsumeStatus::SkipRequest
            };
        }
    }

    if start != request.cursor {
        let error = format!(
            "Read cursor start jumped from {:?} to {:?} on {}",
            request.cursor, start, request.filter
        );

        warn!(
            request_cursor = ?request.cursor,
            start_cursor = ?start,
            error
        );

        let alert = alert::cursorjump(&outgoing.client_id, &request.filter, 0);
        alertlog.log(alert);

        // Renkei patch: the subscriber is told, before what it reads next.
        if let Some(topic) = &datalog.config.skip_notice_topic {
            let skipped = start.1.saturating_sub(request.cursor.1);
            let payload = serde_json::json!({ "filter": request.filter, "skipped": skipped });
            let notice = Forward {
                cursor: None,
                size: 0,
                publish: Publish::new(topic.clone(), payload.to_string(), false),
                properties: None,
            };
            outgoing.push_forwards(std::iter::once(notice), 0, request.filter_idx);
        }
    }

    trace!(
        "Read from commitlog, cursor = {}[{}, {}), read count = {}",
        request.filter,
        next.0,
        next.1,
        publishes.len()
    );

    let qos = request.qos;
    let filter_idx = request.filter_idx;
    request.read_count += publishes.len();
    request.cursor = next;
    // println!("{:?} {:?} {}", start, next, request.read_count);

    if publishes.is_empty() {
        return ConsumeStatus::FilterCaughtup;
    }

    let broker_topic_aliases = &mut connection.broker_topic_aliases;
    let mut topic_alias = broker_topic_aliases
        .as_ref()
        .and_then(|aliases| aliases.get_alias(&request.filter));

    let topic_alias_already_exists = topic_alias.is_some();

    // if topic alias doesn't exists, try creating new one!
    if !topic_alias_already_exists {
        topic_alias = broker_topic_aliases
            .as_mut()
            .and_then(|broker_aliases| broker_aliases.set_new_alias(&request.filter))
    }

    let subscription_id = connection.subscription_ids.get(&request.filter);

    // Fill and notify device data
    let forwards = publishes
        .into_iter()
        .map(|((mut publish, mut properties), offset)| {
            publish.qos = protocol::qos(qos).unwrap();

            // if there is some topic alias to use, set it in publish properties
            if topic_alias.is_some() {
                let mut props = properties.unwrap_or_default();
                props.topic_alias = topic_alias;
                properties = Some(props);
            }

            // We want to clear topic if we are using an existing alias
            if topic_alias_already_exists {
                publish.topic.clear()
            }

            if let Some(&subscription_id) = subscription_id {
                // create new props if not already exists
                let mut props = properties.unwrap_or_default();
                props.subscription_identifiers.push(subscription_id);
                properties = Some(props);
            }

            Forward {
                cursor: offset,
                size: 0,
                publish,
                properties,
            }
        });

    let (len, inflight) = outgoing.push_forwards(forwards, qos, filter_idx);

    debug!(
        inflight_count = inflight,
        forward_count = len,
        "Forwarding publishes, cursor = {}[{}, {}) forward count = {}",
        request.filter,
        request.cursor.0,
        request.cursor.1,
        len
    );

    if len >= MAX_CHANNEL_CAPACITY - 1 {
        debug!("Outgoing channel reached its capacity");
        outgoing.push_notification(Notification::Unschedule);
        outgoing.handle.try_send(()).ok();
        return ConsumeStatus::BufferFull;
    }

    outgoing.handle.try_send(()).ok();

    // update the state of shared subscription
    if let Some(share) = shared_group {
        share.update_next_client();
        // update the shared cursor
        share.cursor = request.cursor;
    }

    if caughtup {
        ConsumeStatus::FilterCaughtup
    } else {
        ConsumeStatus::PartialRead
    }
}

fn retrieve_shadow(datalog: &mut DataLog, outgoing: &mut Outgoing, shadow: ShadowRequest) {
    if let Some(reply) = datalog.shadow(&shadow.filter) {
        let publish = reply.0;
        let shadow_reply = router::ShadowReply {
            topic: publish.topic,
            payload: publish.payload,
        };

        // Fill notify shadow
        let message = Notification::Shadow(shadow_reply);
        let len = outgoing.push_notification(message);
        if len >= MAX_CHANNEL_CAPACITY - 1 {
            outgoing.push_notification(Notification::Unschedule);
        }
        outgoing.handle.try_send(()).ok();
    }
}

fn print_status(router: &mut Router, metrics: Print) {
    match metrics {
        Print::Config => {
            let config = router.config.clone();
            println!("{config:#?}");
        }
        Print::Router => {
            let metrics = router.router_meters.clone();
            println!("{metrics:#?}");
        }
        Print::Connection(id) => {
            let metrics = router.connection_map.get(&id).map(|v| {
                let c = router
                    .connections
                    .get(*v)
                    .map(|v| v.events.clone())
                    .unwrap();
                let t = router.scheduler.trackers.get(*v).cloned().unwrap();
                (c, t)
            });

            let metrics = match metrics {
                Some(v) => Some(v),
                None => router.graveyard.retrieve(&id).map(|v| {
                    (
                        v.metrics,
                        v.session_state
                            .map(|s| s.tracker)
                            .unwrap_or(Tracker::new(id)),
                    )
                }),
            };

            println!("{metrics:#?}");
        }
        Print::Subscriptions => {
            let metrics: HashMap<Filter, Vec<String>> = router
                .subscription_map
                .iter()
                .map(|(filter, connections)| {
                    let connections = connections
                        .iter()
                        .map(|id| router.obufs[*id].client_id.clone())
                        .collect();

                    (filter.to_owned(), connections)
                })
                .collect();

            println!("{metrics:#?}");
        }
        Print::Subscription(filter) => {
            let metrics = router.datalog.meter(&filter);
            println!("{metrics:#?}");
        }
        Print::Waiters(filter) => {
            if let Some(waiters) = router.datalog.waiters(&filter) {
                let v: Vec<(String, DataRequest)> = waiters
                    .waiters()
                    .iter()
                    .map(|(id, request)| (router.obufs[*id].client_id.clone(), request.clone()))
                    .collect();

                println!("{v:#?}");
            }
        }
        Print::ReadyQueue => {
            let metrics = router.scheduler.readyqueue.clone();
            println!("{metrics:#?}");
        }
    };
}

fn validate_subscription(
    connection: &mut Connection,
    filter: &protocol::Filter,
) -> Result<(), RouterError> {
    trace!(
        "validate subscription = {}, tenant = {:?}",
        filter.path,
        connection.tenant_prefix
    );
    // Ensure that only client devices of the tenant can
    #[cfg(feature = "validate-tenant-prefix")]
    if let Some(tenant_prefix) = &connection.tenant_prefix {
        if !filter.path.starts_with(tenant_prefix) {
            return Err(RouterError::InvalidFilterPrefix(filter.path.to_owned()));
        }
    }

    if filter.path.starts_with('$') && !filter.path.starts_with("$share") {
        return Err(RouterError::InvalidFilterPrefix(filter.path.to_owned()));
    }

    Ok(())
}

fn validate_clientid(client_id: &str) -> Result<(), RouterError> {
    trace!("Validating Client ID = {}", client_id,);
    // Ensure that only client devices of the tenant can
    if "+$#/".chars().any(|c| client_id.contains(c)) {
        return Err(RouterError::InvalidClientId(client_id.to_string()));
    }

    Ok(())
}

/// Renkei patch: the filter whose log a subscription reads: `$share/group/filter` reads
/// `filter`'s (see `extract_group`).
fn log_filter(subscription: &str) -> &str {
    subscription
        .strip_prefix("$share/")
        .and_then(|s| s.split_once('/'))
        .map_or(subscription, |(_group, filter)| filter)
}

/// Renkei patch: a subscription has ended (its connection has already left
/// `subscription_map`). When it was the last to read its filter's log, the log is freed
/// (`DataLog::remove_subscriber`), any woken request for it is dropped, and the
/// subscription's entry in `subscription_map` goes if no connection is left in it.
fn release_subscription(
    datalog: &mut DataLog,
    subscription_map: &mut HashMap<Filter, HashSet<ConnectionId>>,
    notifications: &mut VecDeque<(ConnectionId, DataRequest)>,
    subscription: &str,
) {
    let Some(freed) = datalog.remove_subscriber(log_filter(subscription)) else {
        return;
    };
    notifications.retain(|(_, request)| request.filter_idx != freed);
    if subscription_map
        .get(subscription)
        .is_some_and(|connections| connections.is_empty())
    {
        subscription_map.remove(subscription);
    }
}

fn extract_group(filter: &str) -> Option<(String, String)> {
    filter.strip_prefix("$share/").and_then(|s| {
        s.split_once('/')
            .map(|(group, path)| (group.to_string(), path.to_string()))
    })
}

/// Renkei patch: a filter's log lives as long as some session subscribes to it.
/// Renkei patch: the tap (`router::tap`) as the router uses it.
#[cfg(test)]
mod tapped {
    use super::filter_logs::{connect, forwarded, router, send, settle, subscribe, Client};
    use super::*;
    use crate::protocol::PingReq;
    use crate::router::tap::{tap, TapLimits};
    use crate::router::Ack;
    use crate::TapRx;

    fn with_tap(router: &mut Router, max_messages: usize) -> TapRx {
        let limits = TapLimits {
            max_messages,
            max_bytes: 1 << 20,
        };
        let (tap, rx) = tap("renkei/v1/".into(), limits, router.router_tx.clone());
        router.events(0, Event::NewTap(tap));
        rx
    }

    fn qos1(topic: &str, pkid: u16) -> Packet {
        let mut publish = Publish::new(topic.to_owned(), pkid.to_string(), false);
        publish.qos = QoS::AtLeastOnce;
        publish.pkid = pkid;
        Packet::Publish(publish, None)
    }

    /// The packet ids of the PUBACKs sent to `client` since last asked, and its PINGRESPs.
    fn acks(client: &Client) -> (Vec<u16>, usize) {
        let (mut pubacks, mut pings) = (Vec::new(), 0);
        for notification in client.outgoing.lock().drain(..) {
            match notification {
                Notification::DeviceAck(Ack::PubAck(ack)) => pubacks.push(ack.pkid),
                Notification::DeviceAck(Ack::PingResp(_)) => pings += 1,
                _ => {}
            }
        }
        (pubacks, pings)
    }

    /// Takes `n` messages off the tap and lets the router handle the wake-ups that sent.
    fn drain(router: &mut Router, rx: &TapRx, n: usize) -> Vec<(Bytes, String)> {
        let taken = (0..n)
            .map(|_| {
                let t = rx.try_recv().unwrap().expect("a tapped message");
                (t.payload, t.client_id)
            })
            .collect();
        while let Ok((id, event)) = router.router_rx.try_recv() {
            router.events(id, event);
        }
        settle(router);
        taken
    }

    #[test]
    fn a_full_tap_holds_pubacks_answers_pingreqs_and_resumes_in_order() {
        let mut router = router(None);
        let rx = with_tap(&mut router, 2);
        let agent = connect(&mut router, "agent", true);
        send(
            &mut router,
            &agent,
            [
                qos1("renkei/v1/a", 1),
                qos1("renkei/v1/a", 2),
                qos1("renkei/v1/a", 3),
                Packet::PingReq(PingReq),
                qos1("other/a", 4),
            ],
        );
        // Two taken; the third waits with everything after it, but the PINGREQ is answered.
        assert_eq!(acks(&agent), (vec![1, 2], 1));
        assert_eq!(rx.len(), 2);
        assert_eq!(rx.holds(), 1);
        // Down to half: the router is woken and goes on where it stopped, in order.
        let taken = drain(&mut router, &rx, 1);
        assert_eq!(taken, vec![(Bytes::from("1"), "agent".to_owned())]);
        assert_eq!(acks(&agent), (vec![3, 4], 0));
        let rest: Vec<_> = drain(&mut router, &rx, 2)
            .into_iter()
            .map(|t| t.0)
            .collect();
        assert_eq!(rest, vec![Bytes::from("2"), Bytes::from("3")]);
        assert_eq!(rx.try_recv().unwrap(), None, "other/ is not tapped");
    }

    #[test]
    fn held_connections_take_turns_so_a_flood_starves_no_one() {
        let mut router = router(None);
        let rx = with_tap(&mut router, 4);
        let flood = connect(&mut router, "flood", true);
        let agent = connect(&mut router, "agent", true);
        send(
            &mut router,
            &flood,
            (1..=40).map(|i| qos1("renkei/v1/f", i)),
        );
        assert_eq!(acks(&flood).0, vec![1, 2, 3, 4]);
        // The agent arrives while the tap is full: it waits in line behind the flood.
        send(&mut router, &agent, [qos1("renkei/v1/a", 1)]);
        assert_eq!(acks(&agent).0, Vec::<u16>::new());
        // Room for two: the flood's turn comes first and fills the tap again...
        let mut seen = drain(&mut router, &rx, 2);
        assert_eq!(acks(&flood).0, vec![5, 6]);
        // ...then the agent's, before the flood's next.
        seen.extend(drain(&mut router, &rx, 2));
        assert_eq!(acks(&agent).0, vec![1]);
        assert_eq!(acks(&flood).0, vec![7]);
        // Everything arrives, each connection's in its order.
        while !rx.is_empty() {
            seen.extend(drain(&mut router, &rx, 1));
        }
        let flood_seen: Vec<Bytes> = seen
            .iter()
            .filter(|(_, client)| client == "flood")
            .map(|(payload, _)| payload.clone())
            .collect();
        let expected: Vec<Bytes> = (1..=40).map(|i: u16| Bytes::from(i.to_string())).collect();
        assert_eq!(flood_seen, expected);
        assert_eq!(seen.iter().filter(|(_, c)| c == "agent").count(), 1);
    }

    #[test]
    fn log_entries_and_tapped_messages_own_their_bytes() {
        let mut router = router(None);
        let rx = with_tap(&mut router, 10);
        let reader = connect(&mut router, "reader", true);
        send(&mut router, &reader, [subscribe("renkei/v1/#")]);
        let agent = connect(&mut router, "agent", true);
        // One read buffer holding a whole packet's bytes, as the network's does.
        let buffer = Bytes::from(vec![b'x'; 4096]);
        let topic = Bytes::from_static(b"renkei/v1/a");
        let mut publish = Publish::new(topic, buffer.slice(100..160), false);
        publish.qos = QoS::AtLeastOnce;
        publish.pkid = 1;
        send(&mut router, &agent, [Packet::Publish(publish, None)]);
        let inside = |b: &Bytes| {
            let range = buffer.as_ptr() as usize..buffer.as_ptr() as usize + buffer.len();
            range.contains(&(b.as_ptr() as usize))
        };
        let logged = forwarded(&mut router, &reader);
        assert_eq!(logged.len(), 1);
        assert_eq!(logged[0].1.len(), 60);
        assert!(!inside(&logged[0].1), "the log's copy is its own");
        let tapped = rx.try_recv().unwrap().unwrap();
        assert_eq!(tapped.payload, logged[0].1);
        assert!(!inside(&tapped.payload));
    }
}

#[cfg(test)]
mod filter_logs {
    use super::*;
    use crate::protocol::{Filter as Subscription, RetainForwardRule, Subscribe, Unsubscribe};
    use bytes::Bytes;
    use parking_lot::Mutex;
    use std::sync::Arc;

    pub(super) struct Client {
        pub(super) id: ConnectionId,
        pub(super) incoming: Arc<Mutex<VecDeque<Packet>>>,
        pub(super) outgoing: Arc<Mutex<VecDeque<Notification>>>,
        _wakeups: Receiver<()>,
    }

    pub(super) fn router(initialized_filters: Option<Vec<Filter>>) -> Router {
        Router::new(
            0,
            RouterConfig {
                max_connections: 100,
                max_outgoing_packet_count: 200,
                max_segment_size: 10 * 1024,
                max_segment_count: 10,
                custom_segment: None,
                initialized_filters,
                shared_subscriptions_strategy: Strategy::RoundRobin,
                skip_notice_topic: Some("$notice/skipped".into()),
            },
        )
    }

    /// Runs the router until no connection is ready.
    pub(super) fn settle(router: &mut Router) {
        for _ in 0..100_000 {
            if router.consume().is_none() {
                return;
            }
        }
        panic!("the router never settled");
    }

    pub(super) fn connect(router: &mut Router, client_id: &str, clean: bool) -> Client {
        let connection = Connection::new(None, client_id.to_owned(), clean, false);
        let incoming = Incoming::new(client_id.to_owned());
        let (outgoing, wakeups) = Outgoing::new(client_id.to_owned());
        let client = (incoming.buffer(), outgoing.buffer());
        let event = Event::Connect {
            connection,
            incoming,
            outgoing,
        };
        router.events(0, event);
        settle(router);
        Client {
            id: router.connection_map[client_id],
            incoming: client.0,
            outgoing: client.1,
            _wakeups: wakeups,
        }
    }

    pub(super) fn send(
        router: &mut Router,
        client: &Client,
        packets: impl IntoIterator<Item = Packet>,
    ) {
        client.incoming.lock().extend(packets);
        router.events(client.id, Event::DeviceData);
        settle(router);
    }

    fn disconnect(router: &mut Router, client: Client) {
        router.events(client.id, Event::Disconnect);
        settle(router);
    }

    pub(super) fn subscribe(filter: &str) -> Packet {
        let filter = Subscription {
            path: filter.to_owned(),
            qos: QoS::AtMostOnce,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::OnEverySubscribe,
        };
        let subscribe = Subscribe {
            pkid: 1,
            filters: vec![filter],
        };
        Packet::Subscribe(subscribe, None)
    }

    fn unsubscribe(filter: &str) -> Packet {
        let unsubscribe = Unsubscribe {
            pkid: 2,
            filters: vec![filter.to_owned()],
        };
        Packet::Unsubscribe(unsubscribe, None)
    }

    fn publish(topic: &str, payload: &str) -> Packet {
        let publish = Publish::new(topic.to_owned(), payload.to_owned(), false);
        Packet::Publish(publish, None)
    }

    /// The (topic, payload) of every message forwarded to `client` since last asked. Reads
    /// its outgoing buffer as its link would, asking for more when the router paused it.
    pub(super) fn forwarded(router: &mut Router, client: &Client) -> Vec<(Bytes, Bytes)> {
        let mut messages = Vec::new();
        loop {
            let mut paused = false;
            for notification in client.outgoing.lock().drain(..) {
                match notification {
                    Notification::Forward(f) => messages.push((f.publish.topic, f.publish.payload)),
                    Notification::Unschedule => paused = true,
                    _ => {}
                }
            }
            if !paused {
                return messages;
            }
            router.events(client.id, Event::Ready);
            settle(router);
        }
    }

    fn message(topic: &'static str, payload: &'static str) -> (Bytes, Bytes) {
        (Bytes::from(topic), Bytes::from(payload))
    }

    /// How many filter logs there are, once checked that no lookup names a freed one.
    fn logs(router: &Router) -> usize {
        router.datalog.check_lookups()
    }

    /// Renkei patch: a subscriber the log dropped messages for is told how many, first.
    #[test]
    fn a_subscriber_that_fell_behind_the_log_is_told_what_it_skipped() {
        let mut router = router(None);
        let reader = connect(&mut router, "reader", true);
        send(&mut router, &reader, [subscribe("renkei/#")]);
        let writer = connect(&mut router, "writer", true);
        // 100 B payloads: the 10 × 10 KiB log holds some 500, the reader's buffer 200.
        let total = 3_000;
        let payload = "x".repeat(100);
        for i in 0..total {
            send(
                &mut router,
                &writer,
                [publish("renkei/t", &format!("{i:04}{payload}"))],
            );
        }
        let got = forwarded(&mut router, &reader);
        let notices: Vec<(usize, serde_json::Value)> = got
            .iter()
            .enumerate()
            .filter(|(_, (topic, _))| topic == "$notice/skipped")
            .map(|(at, (_, payload))| (at, serde_json::from_slice(payload).unwrap()))
            .collect();
        let messages: Vec<usize> = got
            .iter()
            .filter(|(topic, _)| topic == "renkei/t")
            .map(|(_, p)| std::str::from_utf8(&p[..4]).unwrap().parse().unwrap())
            .collect();
        assert!(messages.len() < total, "the log dropped some");
        assert_eq!(notices.len(), 1, "{notices:?}");
        let (at, notice) = &notices[0];
        assert_eq!(notice["filter"], "renkei/#");
        let skipped = notice["skipped"].as_u64().unwrap() as usize;
        assert_eq!(
            messages.len() + skipped,
            total,
            "every message read or counted"
        );
        // The notice sits exactly at the gap.
        let before = messages[*at - 1];
        let after: usize = std::str::from_utf8(&got[at + 1].1[..4])
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(after - before - 1, skipped);
    }

    /// Renkei patch: MQTT 3.1.1 §3.8.4, the retained messages again on a repeated SUBSCRIBE.
    #[test]
    fn subscribing_again_to_a_held_filter_resends_the_retained_messages() {
        let mut router = router(None);
        let writer = connect(&mut router, "writer", true);
        let mut retained = Publish::new("renkei/a", "state-a", true);
        retained.retain = true;
        send(&mut router, &writer, [Packet::Publish(retained, None)]);
        let reader = connect(&mut router, "reader", true);
        send(&mut router, &reader, [subscribe("renkei/#")]);
        assert_eq!(
            forwarded(&mut router, &reader),
            vec![message("renkei/a", "state-a")]
        );
        // Caught up (parked among the log's waiters), then live, then caught up again.
        send(&mut router, &writer, [publish("renkei/b", "live")]);
        assert_eq!(
            forwarded(&mut router, &reader),
            vec![message("renkei/b", "live")]
        );
        send(&mut router, &reader, [subscribe("renkei/#")]);
        assert_eq!(
            forwarded(&mut router, &reader),
            vec![message("renkei/a", "state-a")]
        );
        // Still one subscription: a new message comes once.
        send(&mut router, &writer, [publish("renkei/c", "once")]);
        assert_eq!(
            forwarded(&mut router, &reader),
            vec![message("renkei/c", "once")]
        );
    }

    /// Renkei patch: with segments small enough to be dropped many times over (patch 15
    /// counts what an entry holds), a QoS 1 reader that acknowledges as it goes misses
    /// nothing and gets no skip notice.
    #[test]
    fn a_qos1_reader_that_keeps_up_reads_across_dropped_segments() {
        let mut router = router(None);
        let reader = connect(&mut router, "reader", true);
        let mut sub = subscribe("renkei/#");
        if let Packet::Subscribe(s, _) = &mut sub {
            s.filters[0].qos = QoS::AtLeastOnce;
        }
        send(&mut router, &reader, [sub]);
        let writer = connect(&mut router, "writer", true);
        let payload = "x".repeat(100);
        let mut got = 0;
        for i in 0..3000 {
            send(
                &mut router,
                &writer,
                [publish("renkei/t", &format!("{i:04}{payload}"))],
            );
            if i % 50 == 49 {
                // Read and acknowledge everything forwarded so far.
                loop {
                    let mut pkids = Vec::new();
                    let mut paused = false;
                    for n in reader.outgoing.lock().drain(..) {
                        match n {
                            Notification::Forward(f) => {
                                assert_eq!(f.publish.topic, "renkei/t", "no skip notice");
                                got += 1;
                                pkids.push(f.publish.pkid);
                            }
                            Notification::Unschedule => paused = true,
                            _ => {}
                        }
                    }
                    if pkids.is_empty() && !paused {
                        break;
                    }
                    let acks: Vec<Packet> = pkids
                        .into_iter()
                        .map(|p| {
                            Packet::PubAck(
                                PubAck {
                                    pkid: p,
                                    reason: PubAckReason::Success,
                                },
                                None,
                            )
                        })
                        .collect();
                    send(&mut router, &reader, acks);
                    if paused {
                        router.events(reader.id, Event::Ready);
                        settle(&mut router);
                    }
                }
            }
        }
        assert_eq!(got, 3000);
    }

    fn subscribe_qos1(filter: &str) -> Packet {
        let mut sub = subscribe(filter);
        if let Packet::Subscribe(s, _) = &mut sub {
            s.filters[0].qos = QoS::AtLeastOnce;
        }
        sub
    }

    fn numbered(messages: &[(Bytes, Bytes)]) -> Vec<usize> {
        messages
            .iter()
            .map(|(topic, payload)| {
                assert_eq!(topic, "renkei/t", "no skip notice");
                std::str::from_utf8(&payload[..4]).unwrap().parse().unwrap()
            })
            .collect()
    }

    /// Renkei patch: a log lets go of what every reader has read, and keeps what one is still
    /// to read.
    #[test]
    fn a_log_lets_go_of_what_every_reader_has_read() {
        let mut router = router(None);
        let fast = connect(&mut router, "fast", true);
        let slow = connect(&mut router, "slow", true);
        send(&mut router, &fast, [subscribe("renkei/#")]);
        send(&mut router, &slow, [subscribe("renkei/#")]);
        let writer = connect(&mut router, "writer", true);
        let payload = "x".repeat(20);
        let mut n = 0;
        let mut next = |router: &mut Router| {
            send(
                router,
                &writer,
                [publish("renkei/t", &format!("{n:04}{payload}"))],
            );
            n += 1;
        };

        // Both read as it comes: the log holds no more than the message last appended (all
        // 300 fit in its bound, so without the patch it held them all).
        for i in 0..300 {
            next(&mut router);
            assert_eq!(numbered(&forwarded(&mut router, &fast)), vec![i]);
            assert_eq!(numbered(&forwarded(&mut router, &slow)), vec![i]);
            assert!(router.datalog.held("renkei/#") <= 1);
        }

        // One falls behind (its 200-message buffer fills and it stops being served): the log
        // keeps what it has not read, though the other has.
        for _ in 0..400 {
            next(&mut router);
            assert_eq!(forwarded(&mut router, &fast).len(), 1);
        }
        assert!(router.datalog.held("renkei/#") >= 200);
        assert_eq!(
            numbered(&forwarded(&mut router, &slow)),
            (300..700).collect::<Vec<_>>(),
            "every message, in order, no skip"
        );

        // Caught up again: the next append lets go of the rest.
        next(&mut router);
        assert_eq!(router.datalog.held("renkei/#"), 1);
        assert_eq!(numbered(&forwarded(&mut router, &fast)), vec![700]);
        assert_eq!(numbered(&forwarded(&mut router, &slow)), vec![700]);

        // A new subscriber starts at the end, as before.
        let late = connect(&mut router, "late", true);
        send(&mut router, &late, [subscribe("renkei/#")]);
        next(&mut router);
        assert_eq!(numbered(&forwarded(&mut router, &late)), vec![701]);
        logs(&router);
    }

    /// Renkei patch: a persistent session goes back to its first unacknowledged message when
    /// its connection ends, so its log keeps what it has read: nothing is lost across the
    /// reconnect.
    #[test]
    fn a_persistent_readers_unacknowledged_messages_stay_in_the_log() {
        let mut router = router(None);
        let keeper = connect(&mut router, "keeper", false);
        send(&mut router, &keeper, [subscribe_qos1("renkei/#")]);
        let writer = connect(&mut router, "writer", true);
        for i in 0..50 {
            send(
                &mut router,
                &writer,
                [publish("renkei/t", &format!("{i:04}"))],
            );
        }
        // Read, never acknowledged; caught up, so parked.
        assert_eq!(
            numbered(&forwarded(&mut router, &keeper)),
            (0..50).collect::<Vec<_>>()
        );
        send(&mut router, &writer, [publish("renkei/t", "0050")]);
        assert_eq!(router.datalog.held("renkei/#"), 51, "kept for a rewind");

        disconnect(&mut router, keeper);
        let keeper = connect(&mut router, "keeper", false);
        assert_eq!(
            numbered(&forwarded(&mut router, &keeper)),
            (0..51).collect::<Vec<_>>(),
            "the unacknowledged messages again, and the one sent while away"
        );
    }

    #[test]
    fn a_clients_filter_logs_are_freed_when_it_leaves() {
        let mut router = router(Some(vec!["wards/#".to_owned()]));
        let before = logs(&router);
        let publisher = connect(&mut router, "publisher", true);

        // Exact filters, and every fifth one with a wildcard level.
        let filters: Vec<String> = (0..500)
            .map(|i| match i % 5 {
                0 => format!("wards/{i}/+/status"),
                _ => format!("wards/{i}/status"),
            })
            .collect();
        let many = connect(&mut router, "many", true);
        send(&mut router, &many, filters.iter().map(|f| subscribe(f)));
        assert_eq!(logs(&router), before + filters.len());

        // Published topics are cached with the filters they match.
        let topics: Vec<String> = (0..500)
            .map(|i| match i % 5 {
                0 => format!("wards/{i}/school/status"),
                _ => format!("wards/{i}/status"),
            })
            .collect();
        send(
            &mut router,
            &publisher,
            topics.iter().map(|t| publish(t, "up")),
        );
        assert_eq!(forwarded(&mut router, &many).len(), topics.len());

        disconnect(&mut router, many);
        assert_eq!(logs(&router), before);
        assert!(router.subscription_map.is_empty());

        // They come back for a new subscriber, with what was retained for them.
        send(
            &mut router,
            &publisher,
            [Packet::Publish(
                Publish::new("wards/7/status", "kept", true),
                None,
            )],
        );
        let again = connect(&mut router, "again", true);
        send(&mut router, &again, [subscribe("wards/7/status")]);
        assert_eq!(logs(&router), before + 1);
        assert_eq!(
            forwarded(&mut router, &again),
            [message("wards/7/status", "kept")]
        );
    }

    #[test]
    fn a_restored_session_can_unsubscribe() {
        let mut router = router(None);
        let before = logs(&router);
        let keeper = connect(&mut router, "keeper", false);
        send(&mut router, &keeper, [subscribe("wards/5/status")]);
        disconnect(&mut router, keeper);
        let keeper = connect(&mut router, "keeper", false);
        keeper.outgoing.lock().clear();

        send(&mut router, &keeper, [unsubscribe("wards/5/status")]);
        let unsubacked = keeper.outgoing.lock().iter().any(|notification| {
            matches!(
                notification,
                Notification::DeviceAck(super::super::Ack::UnsubAck(_))
            )
        });
        assert!(unsubacked, "no UNSUBACK");
        assert_eq!(logs(&router), before);
    }

    #[test]
    fn a_shared_subscription_holds_the_log_of_its_filter() {
        let mut router = router(None);
        let before = logs(&router);
        let publisher = connect(&mut router, "publisher", true);
        let shared = connect(&mut router, "shared", true);
        let plain = connect(&mut router, "plain", true);
        send(&mut router, &shared, [subscribe("$share/g/wards/4/status")]);
        send(&mut router, &plain, [subscribe("wards/4/status")]);
        assert_eq!(logs(&router), before + 1);

        send(
            &mut router,
            &shared,
            [unsubscribe("$share/g/wards/4/status")],
        );
        assert_eq!(logs(&router), before + 1);
        send(&mut router, &publisher, [publish("wards/4/status", "up")]);
        assert_eq!(
            forwarded(&mut router, &plain),
            [message("wards/4/status", "up")]
        );
        assert_eq!(forwarded(&mut router, &shared), []);

        send(&mut router, &shared, [subscribe("$share/g/wards/4/status")]);
        disconnect(&mut router, plain);
        assert_eq!(logs(&router), before + 1);
        disconnect(&mut router, shared);
        assert_eq!(logs(&router), before);
    }

    /// Run alone: `cargo test --lib -- --ignored --exact --nocapture
    /// router::routing::filter_logs::rss_after_20000_filters_have_come_and_gone`.
    ///
    /// glibc's allocator keeps what the process frees for its next allocations instead of
    /// handing it back to the system, so the RSS once the client is gone says little;
    /// `malloc_trim` hands back what is free, and what is left is what is still in use.
    #[test]
    #[ignore = "measures the whole process's RSS"]
    fn rss_after_20000_filters_have_come_and_gone() {
        fn rss_mib() -> f64 {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
            let kib: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
            kib / 1024.0
        }

        let mut router = router(None);
        let start = rss_mib();
        let client = connect(&mut router, "many", true);
        for batch in 0..20 {
            let filters = (0..1_000).map(|i| subscribe(&format!("wards/{batch}/{i}/status")));
            send(&mut router, &client, filters);
            client.outgoing.lock().clear();
        }
        let subscribed = rss_mib();
        disconnect(&mut router, client);
        let gone = rss_mib();
        // SAFETY: glibc's malloc_trim has no preconditions.
        unsafe { libc::malloc_trim(0) };
        let trimmed = rss_mib();
        eprintln!(
            "RSS (MiB): {start:.1} at start, {subscribed:.1} with 20,000 filters, {gone:.1} \
             once their client is gone, {trimmed:.1} after malloc_trim"
        );
        assert_eq!(logs(&router), 0);
        assert!(trimmed - start < 16.0, "more than 16 MiB is still in use");
    }

    #[test]
    fn a_filter_shared_by_two_clients_survives_the_first_leaving() {
        let mut router = router(None);
        let before = logs(&router);
        let publisher = connect(&mut router, "publisher", true);
        let first = connect(&mut router, "first", true);
        let second = connect(&mut router, "second", true);
        send(&mut router, &first, [subscribe("wards/1/status")]);
        send(&mut router, &second, [subscribe("wards/1/status")]);
        assert_eq!(logs(&router), before + 1);

        disconnect(&mut router, first);
        assert_eq!(logs(&router), before + 1);
        send(&mut router, &publisher, [publish("wards/1/status", "up")]);
        assert_eq!(
            forwarded(&mut router, &second),
            [message("wards/1/status", "up")]
        );

        // The last one leaves by unsubscribing.
        send(&mut router, &second, [unsubscribe("wards/1/status")]);
        assert_eq!(logs(&router), before);
        send(
            &mut router,
            &publisher,
            [publish("wards/1/status", "unheard")],
        );
        assert_eq!(forwarded(&mut router, &second), []);

        // A later subscriber gets the filter afresh.
        let third = connect(&mut router, "third", true);
        send(&mut router, &third, [subscribe("wards/1/status")]);
        assert_eq!(logs(&router), before + 1);
        send(
            &mut router,
            &publisher,
            [publish("wards/1/status", "again")],
        );
        assert_eq!(
            forwarded(&mut router, &third),
            [message("wards/1/status", "again")]
        );
        assert_eq!(forwarded(&mut router, &second), []);
    }

    #[test]
    fn a_persistent_sessions_filters_stay_until_a_clean_session_replaces_it() {
        let mut router = router(None);
        let before = logs(&router);
        let publisher = connect(&mut router, "publisher", true);
        let keeper = connect(&mut router, "keeper", false);
        send(&mut router, &keeper, [subscribe("wards/2/status")]);
        disconnect(&mut router, keeper);
        assert_eq!(logs(&router), before + 1);

        // Messages wait in the log for the session to come back.
        send(
            &mut router,
            &publisher,
            [publish("wards/2/status", "while away")],
        );
        let keeper = connect(&mut router, "keeper", false);
        assert_eq!(
            forwarded(&mut router, &keeper),
            [message("wards/2/status", "while away")]
        );
        disconnect(&mut router, keeper);
        assert_eq!(logs(&router), before + 1);

        // A clean session under the same client id ends the saved one.
        let clean = connect(&mut router, "keeper", true);
        assert_eq!(logs(&router), before);
        disconnect(&mut router, clean);
        assert_eq!(logs(&router), before);
    }
}
// #[cfg(test)]
// #[allow(non_snake_case)]
// mod test {
//     use std::{
//         thread,
//         time::{Duration, Instant},
//     };

//     use bytes::BytesMut;

//     use super::*;
//     use crate::{
//         link::local::*,
//         protocol::v4::{self, subscribe::SubscribeFilter, QoS},
//         router::ConnectionMeter,
//     };

//     /// Create a router and n connections
//     fn new_router(count: usize, clean: bool) -> (Router, VecDeque<(LinkTx, LinkRx)>) {
//         let config = RouterConfig {
//             instant_ack: true,
//             max_segment_size: 1024 * 10, // 10 KB
//             max_mem_segments: 10,
//             max_disk_segments: 0,
//             max_read_len: 128,
//             log_dir: None,
//             max_connections: 128,
//             dynamic_log: false,
//         };

//         let mut router = Router::new(0, config);
//         let link = router.link();
//         let handle = thread::spawn(move || {
//             (0..count)
//                 .map(|i| Link::new(&format!("link-{}", i), link.clone(), clean))
//                 .collect::<VecDeque<Result<_, _>>>()
//         });

//         router.run_exact(count).unwrap();
//         let links = handle
//             .join()
//             .unwrap()
//             .into_iter()
//             .map(|x| x.unwrap())
//             .collect();
//         (router, links)
//     }

//     fn reconnect(router: &mut Router, link_id: usize, clean: bool) -> (LinkTx, LinkRx) {
//         let link = router.link();
//         let handle =
//             thread::spawn(move || Link::new(&format!("link-{}", link_id), link, clean).unwrap());
//         router.run(1).unwrap();
//         handle.join().unwrap()
//     }

//     #[test]
//     fn test_graveyard_retreive_metrics_always() {
//         let (mut router, mut links) = new_router(1, false);
//         let (tx, _) = links.pop_front().unwrap();
//         let id = tx.connection_id;
//         let conn = router.connections.get_mut(id).unwrap();
//         conn.meter = ConnectionMeter {
//             publish_size: 1000,
//             publish_count: 1000,
//             subscriptions: HashSet::new(),
//             events: conn.meter.events.clone(),
//         };
//         conn.meter.push_event("graveyard-testing".to_string());
//         router.handle_disconnection(id);

//         let (tx, _) = reconnect(&mut router, 0, false);
//         let id = tx.connection_id;
//         let conn = router.connections.get_mut(id).unwrap();
//         assert_eq!(conn.meter.publish_size, 1000);
//         assert_eq!(conn.meter.publish_count, 1000);
//         assert_eq!(conn.meter.events.len(), 4);

//         let (mut router, mut links) = new_router(1, true);
//         let (tx, _) = links.pop_front().unwrap();
//         let id = tx.connection_id;
//         let conn = router.connections.get_mut(id).unwrap();
//         conn.meter = ConnectionMeter {
//             publish_size: 1000,
//             publish_count: 1000,
//             subscriptions: HashSet::new(),
//             events: conn.meter.events.clone(),
//         };
//         conn.meter.push_event("graveyard-testing".to_string());
//         router.handle_disconnection(id);

//         let (tx, _) = reconnect(&mut router, 0, true);
//         let id = tx.connection_id;
//         let conn = router.connections.get_mut(id).unwrap();
//         assert_eq!(conn.meter.publish_size, 1000);
//         assert_eq!(conn.meter.publish_count, 1000);
//         assert_eq!(conn.meter.events.len(), 4);
//     }

//     #[test]
//     #[should_panic]
//     fn test_blocking_too_many_connections() {
//         new_router(512, true);
//     }

//     #[test]
//     fn test_not_clean_sessions() {
//         // called once per data push (subscribe to 2 topics in our case)
//         // called once per each sub topic
//         // if prepare_data_request called, then Tracker::register_data_request is also called so
//         // no need to check separately for that

//         let (mut router, mut links) = new_router(2, false);
//         let (tx1, mut rx1) = links.pop_front().unwrap();
//         let id1 = tx1.connection_id;
//         let (tx2, mut rx2) = links.pop_front().unwrap();
//         let id2 = tx2.connection_id;

//         // manually subscribing to avoid calling Router::run(), so that we can see and test changes
//         // in Router::readyqueue.
//         let mut buf = BytesMut::new();
//         v4::subscribe::write(
//             vec![
//                 SubscribeFilter::new("hello/1/world".to_string(), QoS::AtMostOnce),
//                 SubscribeFilter::new("hello/2/world".to_string(), QoS::AtMostOnce),
//             ],
//             0,
//             &mut buf,
//         )
//         .unwrap();
//         let buf = buf.freeze();
//         {
//             let incoming = router.ibufs.get_mut(id1).unwrap();
//             let mut recv_buf = incoming.buffer.lock();
//             recv_buf.push_back(buf.clone());
//             assert_eq!(router.subscription_map.len(), 0);
//         }
//         {
//             let incoming = router.ibufs.get_mut(id2).unwrap();
//             let mut recv_buf = incoming.buffer.lock();
//             recv_buf.push_back(buf.clone());
//             assert_eq!(router.subscription_map.len(), 0);
//         }

//         router.handle_device_payload(id1);
//         assert_eq!(router.subscription_map.len(), 2);
//         assert_eq!(router.readyqueue.len(), 1);
//         router.consume(id1);
//         assert_eq!(
//             router
//                 .datalog
//                 .waiters(&"hello/1/world".to_string())
//                 .unwrap()
//                 .waiters()
//                 .len(),
//             1
//         );
//         assert_eq!(
//             router
//                 .datalog
//                 .waiters(&"hello/2/world".to_string())
//                 .unwrap()
//                 .waiters()
//                 .len(),
//             1
//         );

//         router.handle_device_payload(id2);
//         assert_eq!(router.subscription_map.len(), 2);
//         assert_eq!(router.readyqueue.len(), 2);
//         router.consume(id2);
//         assert_eq!(
//             router
//                 .datalog
//                 .waiters(&"hello/1/world".to_string())
//                 .unwrap()
//                 .waiters()
//                 .len(),
//             2
//         );
//         assert_eq!(
//             router
//                 .datalog
//                 .waiters(&"hello/2/world".to_string())
//                 .unwrap()
//                 .waiters()
//                 .len(),
//             2
//         );

//         assert!(matches!(rx1.recv().unwrap(), Some(Notification::DeviceAck(_))));
//         assert!(matches!(rx2.recv().unwrap(), Some(Notification::DeviceAck(_))));

//         router.handle_disconnection(id1);
//         router.handle_disconnection(id2);
//         router.run(1).unwrap();

//         let (_, _) = reconnect(&mut router, 0, false);
//         assert_eq!(
//             router
//                 .datalog
//                 .waiters(&"hello/1/world".to_string())
//                 .unwrap()
//                 .waiters()
//                 .len(),
//             1
//         );
//         assert_eq!(
//             router
//                 .datalog
//                 .waiters(&"hello/2/world".to_string())
//                 .unwrap()
//                 .waiters()
//                 .len(),
//             1
//         );

//         let (_, _) = reconnect(&mut router, 1, false);
//         assert_eq!(
//             router
//                 .datalog
//                 .waiters(&"hello/1/world".to_string())
//                 .unwrap()
//                 .waiters()
//                 .len(),
//             2
//         );
//         assert_eq!(
//             router
//                 .datalog
//                 .waiters(&"hello/2/world".to_string())
//                 .unwrap()
//                 .waiters()
//                 .len(),
//             2
//         );
//     }

//     #[test]
//     fn test_publish_appended_to_commitlog() {
//         let (mut router, mut links) = new_router(2, true);
//         let (mut sub_tx, _) = links.pop_front().unwrap();
//         let (mut pub_tx, _) = links.pop_front().unwrap();

//         sub_tx.subscribe("hello/1/world").unwrap();
//         router.run(1).unwrap();

//         // Each LinkTx::publish creates a single new event
//         for _ in 0..10 {
//             pub_tx.publish("hello/1/world", b"hello".to_vec()).unwrap();
//         }
//         router.run(1).unwrap();
//         assert_eq!(router.datalog.next_native_offset("hello/1/world").1, (0, 10));
//     }

//     #[test]
//     fn test_adding_caughtups_to_waiters() {
//         // number of times forward_device_data hit
//         //     = router.run times * topics * subscribers per topic
//         //     = 2 * 2 * 2 = 8
//         //
//         // we also call consume 2 times per subsriber, and one time it will call
//         // forward_device_data again, but no data will actually be forwarded.
//         // as 256 publishes at once, and router's config only reads 128 at a time, data needs to be
//         // read from same log twice, and thus half of the times the data reading is not done

//         let (mut router, mut links) = new_router(4, true);
//         let (mut sub1_tx, _) = links.pop_front().unwrap();
//         let (mut pub1_tx, _) = links.pop_front().unwrap();
//         let (mut sub2_tx, _) = links.pop_front().unwrap();
//         let (mut pub2_tx, _) = links.pop_front().unwrap();
//         sub1_tx.subscribe("hello/1/world").unwrap();
//         sub1_tx.subscribe("hello/2/world").unwrap();
//         sub2_tx.subscribe("hello/1/world").unwrap();
//         sub2_tx.subscribe("hello/2/world").unwrap();
//         router.run(1).unwrap();

//         assert_eq!(
//             router
//                 .datalog
//                 .waiters(&"hello/1/world".to_string())
//                 .unwrap()
//                 .waiters()
//                 .len(),
//             2
//         );
//         assert_eq!(
//             router
//                 .datalog
//                 .waiters(&"hello/2/world".to_string())
//                 .unwrap()
//                 .waiters()
//                 .len(),
//             2
//         );

//         for _ in 0..256 {
//             pub1_tx.publish("hello/1/world", b"hello".to_vec()).unwrap();
//             pub2_tx.publish("hello/2/world", b"hello".to_vec()).unwrap();
//         }
//         router.run(1).unwrap();

//         let tracker = router.trackers.get(sub1_tx.connection_id).unwrap();
//         assert_eq!(tracker.get_data_requests().len(), 2);
//         let tracker = router.trackers.get(sub2_tx.connection_id).unwrap();
//         assert_eq!(tracker.get_data_requests().len(), 2);

//         router.run(1).unwrap();

//         let tracker = router.trackers.get(sub1_tx.connection_id).unwrap();
//         assert_eq!(tracker.get_data_requests().len(), 2);
//         let tracker = router.trackers.get(sub2_tx.connection_id).unwrap();
//         assert_eq!(tracker.get_data_requests().len(), 2);

//         router.consume(sub1_tx.connection_id);
//         router.consume(sub2_tx.connection_id);

//         let tracker = router.trackers.get(sub1_tx.connection_id).unwrap();
//         assert_eq!(tracker.get_data_requests().len(), 1);
//         let tracker = router.trackers.get(sub2_tx.connection_id).unwrap();
//         assert_eq!(tracker.get_data_requests().len(), 1);

//         router.consume(sub1_tx.connection_id);
//         router.consume(sub2_tx.connection_id);

//         let tracker = router.trackers.get(sub1_tx.connection_id).unwrap();
//         assert_eq!(tracker.get_data_requests().len(), 0);
//         let tracker = router.trackers.get(sub2_tx.connection_id).unwrap();
//         assert_eq!(tracker.get_data_requests().len(), 0);

//         assert_eq!(
//             router
//                 .datalog
//                 .waiters(&"hello/1/world".to_string())
//                 .unwrap()
//                 .waiters()
//                 .len(),
//             2
//         );
//         assert_eq!(
//             router
//                 .datalog
//                 .waiters(&"hello/2/world".to_string())
//                 .unwrap()
//                 .waiters()
//                 .len(),
//             2
//         );
//     }

//     #[test]
//     fn test_disconnect_invalid_sub() {
//         let (mut router, mut links) = new_router(3, true);

//         let (mut tx, mut rx) = links.pop_front().unwrap();
//         tx.subscribe("$hello/world").unwrap();
//         router.run(1).unwrap();
//         assert!(matches!(rx.recv(), Err(LinkError::Recv(flume::RecvError::Disconnected))));

//         let (mut tx, mut rx) = links.pop_front().unwrap();
//         tx.subscribe("test/hello").unwrap();
//         router.run(1).unwrap();
//         assert!(matches!(rx.recv(), Err(LinkError::Recv(flume::RecvError::Disconnected))));
//     }

//     #[test]
//     fn test_disconnect_invalid_pub() {
//         let (mut router, mut links) = new_router(1, true);
//         let (mut tx, mut rx) = links.pop_front().unwrap();
//         tx.publish("invalid/topic", b"hello".to_vec()).unwrap();
//         router.run(1).unwrap();
//         assert!(matches!(rx.recv(), Err(LinkError::Recv(flume::RecvError::Disconnected))));
//     }

//     #[test]
//     fn test_pingreq() {
//         let (mut router, mut links) = new_router(1, true);
//         let (mut tx, mut rx) = links.pop_front().unwrap();
//         let mut buf = BytesMut::new();
//         mqttbytes::v4::PingReq.write(&mut buf).unwrap();
//         let buf = buf.freeze();
//         for _ in 0..10 {
//             tx.push(buf.clone()).unwrap();
//         }
//         router.run(1).unwrap();
//         for _ in 0..10 {
//             let ret = rx.recv().unwrap().unwrap();
//             assert!(matches!(ret, Notification::DeviceAck(Ack::PingResp)));
//         }
//     }

//     #[test]
//     fn test_disconnect() {
//         let (mut router, mut links) = new_router(1, true);
//         let (mut tx, mut rx) = links.pop_front().unwrap();
//         let mut buf = BytesMut::new();
//         mqttbytes::v4::Disconnect.write(&mut buf).unwrap();
//         let buf = buf.freeze();
//         tx.push(buf).unwrap();
//         router.run(1).unwrap();
//         assert!(matches!(rx.recv(), Err(LinkError::Recv(flume::RecvError::Disconnected))));
//     }

//     #[test]
//     fn test_connection_in_qos1() {
//         // connection as in crate::connection::Connection struct should get filled for all unacked,
//         // and refuse to add more packets than unacked.

//         let config = RouterConfig {
//             instant_ack: true,
//             max_segment_size: 1024 * 10, // 10 KB
//             max_mem_segments: 10,
//             max_disk_segments: 0,
//             max_read_len: 256,
//             log_dir: None,
//             max_connections: 128,
//             dynamic_log: false,
//         };

//         let mut router = Router::new(0, config);
//         let link = router.link();
//         let handle = thread::spawn(move || {
//             (0..2)
//                 .map(|i| Link::new(&format!("link-{}", i), link.clone(), true))
//                 .collect::<VecDeque<Result<_, _>>>()
//         });

//         router.run(2).unwrap();
//         let mut links: VecDeque<(LinkTx, LinkRx)> = handle
//             .join()
//             .unwrap()
//             .into_iter()
//             .map(|x| x.unwrap())
//             .collect();

//         let (mut sub_tx, _sub_rx) = links.pop_front().unwrap();
//         let (mut pub_tx, _) = links.pop_front().unwrap();

//         let mut buf = BytesMut::new();
//         mqttbytes::v4::Subscribe::new("hello/1/world", mqttbytes::QoS::AtLeastOnce)
//             .write(&mut buf)
//             .unwrap();
//         let buf = buf.freeze();
//         sub_tx.push(buf).unwrap();
//         router.run(1).unwrap();

//         for _ in 0..202 {
//             pub_tx.publish("hello/1/world", b"hello".to_vec()).unwrap();
//         }
//         router.run(1).unwrap();

//         let id = sub_tx.connection_id;
//         let tracker = router.trackers.get(id).unwrap();
//         assert_eq!(tracker.get_data_requests().front().unwrap().cursor, (0, 200));
//     }

//     #[test]
//     #[ignore]
//     fn test_resend_in_qos1() {
//         unimplemented!("we don't resend QoS1 packets yet")
//     }

//     #[test]
//     fn test_wildcard_subs() {
//         let (mut router, mut links) = new_router(3, true);

//         let (mut sub1_tx, mut sub1_rx) = links.pop_front().unwrap();
//         sub1_tx.subscribe("#").unwrap();

//         let (mut sub2_tx, mut sub2_rx) = links.pop_front().unwrap();
//         sub2_tx.subscribe("hello/+/world").unwrap();

//         let (mut pub_tx, mut _pub_rx) = links.pop_front().unwrap();
//         for _ in 0..10 {
//             for i in 0..10 {
//                 pub_tx
//                     .publish(format!("hello/{}/world", i), b"hello".to_vec())
//                     .unwrap();
//             }
//         }

//         for _ in 0..10 {
//             pub_tx.publish("hello/world", b"hello".to_vec()).unwrap();
//         }

//         router.run(1).unwrap();

//         let mut count = 0;
//         while let Ok(Some(notification)) =
//             sub1_rx.recv_deadline(Instant::now() + Duration::from_millis(1))
//         {
//             match notification {
//                 Notification::Forward { .. } => count += 1,
//                 _ => {}
//             }
//         }
//         assert_eq!(count, 110);

//         count = 0;
//         while let Ok(Some(notification)) =
//             sub2_rx.recv_deadline(Instant::now() + Duration::from_millis(1))
//         {
//             match notification {
//                 Notification::Forward { .. } => count += 1,
//                 _ => {}
//             }
//         }
//         assert_eq!(count, 100);
//     }
// }

// // #[cfg(test)]
// // mod test {
// //     use crate::connection::Connection;
// //     use crate::link::local::{Link, LinkRx, LinkTx};
// //     use crate::tracker::Tracker;
// //     use crate::{ConnectionId, Notification, Router, RouterConfig};
// //     use bytes::BytesMut;
// //     use flume::Receiver;
// //     use mqttbytes::v4::{Publish, Subscribe};
// //     use mqttbytes::QoS;
// //     use std::collections::VecDeque;
// //     use std::sync::atomic::AtomicBool;
// //     use std::sync::Arc;
// //     use std::thread;

// //     /// Create a router and n connections
// //     fn router(count: usize) -> (Router, VecDeque<(LinkTx, LinkRx)>) {
// //         let config = RouterConfig {
// //             data_filter: "hello/world".to_owned(),
// //             wildcard_filters: vec![],
// //             instant_ack: true,
// //             max_segment_size: 10 * 1024,
// //             max_segment_count: 10 * 1024,
// //             max_connections: 10,
// //         };

// //         let mut router = Router::new(0, config);
// //         let link = router.link();
// //         let handle = thread::spawn(move || {
// //             (0..count)
// //                 .map(|i| Link::new(&format!("link-{}", i), link.clone()).unwrap())
// //                 .collect()
// //         });

// //         router.run(count).unwrap();
// //         let links = handle.join().unwrap();
// //         (router, links)
// //     }

// //     /// Creates a connection
// //     fn connection(client_id: &str, clean: bool) -> (Connection, Receiver<Notification>) {
// //         let (tx, rx) = flume::bounded(10);
// //         let connection = Connection::new(client_id, clean, tx, Arc::new(AtomicBool::new(false)));
// //         (connection, rx)
// //     }

// //     /// Raw publish message
// //     fn publish(topic: &str) -> BytesMut {
// //         let mut publish = Publish::new(topic, QoS::AtLeastOnce, vec![1, 2, 3]);
// //         publish.pkid = 1;

// //         let mut o = BytesMut::new();
// //         publish.write(&mut o).unwrap();
// //         o
// //     }

// //     /// Raw publish message
// //     fn subscribe(topic: &str) -> BytesMut {
// //         let mut subscribe = Subscribe::new(topic, QoS::AtLeastOnce);
// //         subscribe.pkid = 1;

// //         let mut o = BytesMut::new();
// //         subscribe.write(&mut o).unwrap();
// //         o
// //     }

// //     /// When there is new data on a subscription's commitlog, it's
// //     /// consumer should start triggering data requests to pull data
// //     /// from commitlog
// //     #[test]
// //     fn new_connection_data_triggers_acks_of_self_and_data_of_consumer() {
// //         let (mut router, mut links) = router(2);
// //         let (mut l1tx, _l1rx) = links.pop_front().unwrap();
// //         let (mut l2tx, l2rx) = links.pop_front().unwrap();

// //         l2tx.subscribe("hello/world").unwrap();
// //         l1tx.publish("hello/world", vec![1, 2, 3]).unwrap();
// //         let _ = router.run(1);

// //         // Suback
// //         match l2rx.recv().unwrap() {
// //             Notification::DeviceAcks(_) => {}
// //             v => panic!("{:?}", v),
// //         }

// //         // Consumer data
// //         match l2rx.recv().unwrap() {
// //             Notification::DeviceData { cursor, .. } => assert_eq!(cursor, (0, 1)),
// //             v => panic!("{:?}", v),
// //         }

// //         // No acks for qos0 publish
// //     }

// //     #[test]
// //     fn half_open_connections_are_handled_correctly() {
// //         let config = RouterConfig {
// //             data_filter: "hello/world".to_owned(),
// //             wildcard_filters: vec![],
// //             instant_ack: true,
// //             max_segment_size: 10 * 1024,
// //             max_segment_count: 10 * 1024,
// //             max_connections: 10,
// //         };

// //         let mut router = Router::new(0, config);
// //         let (c, rx) = connection("test", true);
// //         router.handle_new_connection(c);

// //         let id = *router.connection_map.get("test").unwrap();
// //         router.handle_device_payload(id, subscribe("hello/data"));
// //         router.handle_device_payload(id, publish("hello/data"));

// //         let trackers = router.trackers.get(id).unwrap();
// //         assert!(trackers.get_data_requests().len() > 0);
// //         dbg!(trackers);

// //         // A new connection with same client id
// //         let (c, rx) = connection("test", true);
// //         router.handle_new_connection(c);

// //         let id = *router.connection_map.get("test").unwrap();
// //         let trackers = router.trackers.get(id).unwrap();
// //         dbg!(trackers);
// //     }
// // }

/// Renkei patch: the router's word for an event about a connection that has already gone.
#[cfg(test)]
mod gone_connections {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tracing::field::{Field, Visit};
    use tracing::{Level, Subscriber};
    use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

    /// The level and message of every event logged.
    #[derive(Clone, Default)]
    struct Events(Arc<Mutex<Vec<(Level, String)>>>);

    impl<S: Subscriber> Layer<S> for Events {
        fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
            struct Message(String);
            impl Visit for Message {
                fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
                    if field.name() == "message" {
                        self.0 = format!("{value:?}");
                    }
                }
            }
            let mut message = Message(String::new());
            event.record(&mut message);
            let level = *event.metadata().level();
            self.0.lock().unwrap().push((level, message.0));
        }
    }

    #[test]
    fn events_for_a_connection_already_gone_are_not_errors() {
        let events = Events::default();
        let subscriber = tracing_subscriber::registry().with(events.clone());
        let mut router = Router::new(0, RouterConfig::default());
        let counted = router.gone_connection_events();
        tracing::subscriber::with_default(subscriber, || {
            // A disconnect storm: the link's own Disconnect and its last data arrive after
            // the router has already dropped the connection.
            router.events(7, Event::Disconnect);
            router.events(7, Event::DeviceData);
        });
        assert_eq!(counted.load(Ordering::Relaxed), 2);
        let events = events.0.lock().unwrap();
        let gone: Vec<_> = events
            .iter()
            .filter(|(_, message)| message.contains("is already gone"))
            .collect();
        assert_eq!(gone.len(), 2, "{events:?}");
        assert!(
            gone.iter().all(|(level, _)| *level == Level::DEBUG),
            "{gone:?}"
        );
    }
}
