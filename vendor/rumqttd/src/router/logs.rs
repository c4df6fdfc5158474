use super::Ack;
use slab::Slab;
use tracing::{info, trace};

use crate::protocol::{
    matches, ConnAck, ConnAckProperties, PingResp, PubAck, PubComp, PubRec, PubRel, Publish,
    PublishProperties, SubAck, UnsubAck,
};
use crate::router::{DataRequest, FilterIdx, SubscriptionMeter, Waiters};
use crate::{ConnectionId, Filter, Offset, RouterConfig, Topic};

use crate::segments::{CommitLog, Position};
use crate::Storage;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::time::Instant;
use tracing::debug;

type PubWithProp = (Publish, Option<PublishProperties>);

/// Renkei patch: the properties are boxed. Every filter's log holds one `PublishData` per
/// message, and upstream's inline `Option<PublishProperties>` made each 232 bytes, 144 of them
/// for MQTT 5 properties that MQTT 3.1.1 clients never send; boxed, a message costs each log
/// 96 bytes, and reading a log out copies that much less.
#[derive(Clone)]
pub struct PublishData {
    pub publish: Publish,
    pub properties: Option<Box<PublishProperties>>,
    pub timestamp: Instant,
}

impl From<PubWithProp> for PublishData {
    fn from((publish, properties): PubWithProp) -> Self {
        PublishData {
            publish,
            properties: properties.map(Box::new),
            timestamp: Instant::now(),
        }
    }
}

// TODO: remove this from here
impl Storage for PublishData {
    /// Renkei patch: what an entry really holds, so that a log bounded by bytes is bounded in
    /// memory: the entry itself (96 bytes), its topic and payload (its own since
    /// `append_to_commitlog` copies them) and its MQTT 5 properties if any. Upstream counted
    /// topic and payload only, and a log of small messages held several times its bound.
    fn size(&self) -> usize {
        let publish = &self.publish;
        std::mem::size_of::<PublishData>()
            + publish.topic.len()
            + publish.payload.len()
            + self
                .properties
                .as_ref()
                .map_or(0, |_| std::mem::size_of::<PublishProperties>())
    }
}

/// Stores 'device' data and 'actions' data in native commitlog
/// organized by subscription filter. Device data is replicated
/// while actions data is not
pub struct DataLog {
    pub config: RouterConfig,
    /// Native commitlog data organized by subscription. Contains
    /// device data and actions data logs.
    ///
    /// Device data is replicated while actions data is not.
    /// Also has waiters used to wake connections/replicator tracker
    /// which are caught up with all the data on 'Filter' and waiting
    /// for new data
    pub native: Logs<Data<PublishData>>,
    /// Map of subscription filter name to filter index
    filter_indexes: HashMap<Filter, FilterIdx>,
    retained_publishes: HashMap<Topic, PublishData>,
    /// List of filters associated with a topic
    publish_filters: HashMap<Topic, Vec<FilterIdx>>,
    /// Renkei patch: the filters with a wildcard level, the only ones a topic must be matched
    /// against one by one (see [`is_wildcard`]).
    wildcard_filters: Vec<(Filter, FilterIdx)>,
}

/// Renkei patch: whether `filter` has a `+` or `#` level. Upstream matched every new topic
/// against every filter and every new filter against every known topic: with one exact filter
/// per client (each agent's receipt topic) and one topic per client, a storm of N connecting
/// clients cost the router thread O(N²) `matches` calls (with 2,000 agents, about 15 % of all
/// CPU samples on the machine). Filters without a wildcard are found by lookup instead.
fn is_wildcard(filter: &str) -> bool {
    filter.split('/').any(|level| level == "+" || level == "#")
}

/// Renkei patch: whether `matches(topic, filter)` holds for a filter without a wildcard: only
/// for the topic spelled the same, and never for a `$` topic (which `matches` never matches).
fn matches_exactly(topic: &str, filter: &str) -> bool {
    topic == filter && !topic.starts_with('$')
}

/// Renkei patch: the filters' logs, each in a slot with the serial number it was created with
/// (see `FilterIdx`). Upstream's `Slab` gave out bare slots, which was sound only because no
/// log was ever freed.
pub struct Logs<T> {
    slots: Slab<(u64, T)>,
    next_serial: u64,
}

impl<T> Logs<T> {
    fn new() -> Self {
        Logs {
            slots: Slab::new(),
            next_serial: 0,
        }
    }

    fn insert(&mut self, log: T) -> FilterIdx {
        let serial = self.next_serial;
        self.next_serial += 1;
        let slot = self.slots.insert((serial, log));
        FilterIdx { slot, serial }
    }

    /// The log `idx` names, unless it has been freed since.
    pub fn get(&self, idx: FilterIdx) -> Option<&T> {
        match self.slots.get(idx.slot) {
            Some((serial, log)) if *serial == idx.serial => Some(log),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, idx: FilterIdx) -> Option<&mut T> {
        match self.slots.get_mut(idx.slot) {
            Some((serial, log)) if *serial == idx.serial => Some(log),
            _ => None,
        }
    }

    fn remove(&mut self, idx: FilterIdx) -> Option<T> {
        self.get(idx)?;
        Some(self.slots.remove(idx.slot).1)
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.slots.iter_mut().map(|(_, (_, log))| log)
    }

    /// How many logs there are.
    pub fn len(&self) -> usize {
        self.slots.len()
    }
}

impl DataLog {
    pub fn new(config: RouterConfig) -> io::Result<DataLog> {
        let mut native = Logs::new();
        let mut filter_indexes = HashMap::new();
        let retained_publishes = HashMap::new();
        let publish_filters = HashMap::new();
        let mut wildcard_filters = Vec::new();

        if let Some(warmup_filters) = config.initialized_filters.clone() {
            for filter in warmup_filters {
                let data = Data::new(&filter, &config);

                // Add commitlog to datalog and add datalog index to filter to
                // datalog index map
                let idx = native.insert(data);
                if is_wildcard(&filter) {
                    wildcard_filters.push((filter.clone(), idx));
                }
                filter_indexes.insert(filter, idx);
            }
        }

        Ok(DataLog {
            config,
            native,
            publish_filters,
            filter_indexes,
            retained_publishes,
            wildcard_filters,
        })
    }

    pub fn meter(&mut self, filter: &str) -> Option<&mut SubscriptionMeter> {
        let data = self.native.get_mut(*self.filter_indexes.get(filter)?)?;
        Some(&mut data.meter)
    }

    pub fn waiters(&self, filter: &Filter) -> Option<&Waiters<DataRequest>> {
        self.native
            .get(*self.filter_indexes.get(filter)?)
            .map(|data| &data.waiters)
    }

    /// Renkei patch: the log is found by its filter, `log_filter`, and the waiter by the
    /// connection and the filter it subscribed with, `subscription`, which differ for a shared
    /// subscription (`$share/group/filter`). Upstream looked the log up by the subscription,
    /// which found no log for a shared one and left its waiter behind, and took the
    /// connection's first waiter on the log, whichever subscription it was for.
    pub fn remove_waiters_for_id(
        &mut self,
        id: ConnectionId,
        log_filter: &str,
        subscription: &str,
    ) -> Option<DataRequest> {
        let data = self.native.get_mut(*self.filter_indexes.get(log_filter)?)?;
        let waiters = data.waiters.get_mut();

        waiters
            .iter()
            .position(|(conn_id, request)| *conn_id == id && request.filter == subscription)
            .and_then(|index| {
                waiters
                    .swap_remove_back(index)
                    .map(|(_, data_req)| data_req)
            })
    }

    // TODO: Currently returning a Option<Vec> instead of Option<&Vec> due to Rust borrow checker
    // limitation
    pub fn matches(&mut self, topic: &str) -> Option<Vec<FilterIdx>> {
        match &self.publish_filters.get(topic) {
            Some(v) => Some(v.to_vec()),
            None => {
                // Renkei patch: the exact filter by lookup, then only the wildcard filters.
                let exact = self
                    .filter_indexes
                    .get_key_value(topic)
                    .filter(|(filter, _)| !is_wildcard(filter) && matches_exactly(topic, filter))
                    .map(|(_, idx)| idx);
                let v: Vec<FilterIdx> = exact
                    .copied()
                    .into_iter()
                    .chain(
                        self.wildcard_filters
                            .iter()
                            .filter(|(filter, _)| matches(topic, filter))
                            .map(|(_, filter_idx)| *filter_idx),
                    )
                    .collect();

                if !v.is_empty() {
                    self.publish_filters.insert(topic.to_owned(), v.clone());
                }

                Some(v)
            }
        }
    }

    pub fn next_native_offset(&mut self, filter: &str) -> (FilterIdx, Offset) {
        let publish_filters = &mut self.publish_filters;
        let filter_indexes = &mut self.filter_indexes;

        let (filter_idx, data) = match filter_indexes.get(filter) {
            Some(idx) => (*idx, self.native.get(*idx).unwrap()),
            None => {
                let data = Data::new(filter, &self.config);

                // Add commitlog to datalog and add datalog index to filter to
                // datalog index map
                let idx = self.native.insert(data);
                self.filter_indexes.insert(filter.to_owned(), idx);

                // Match new filter to existing topics and add to publish_filters if it matches
                // (Renkei patch: an exact filter can only be the topic equal to it).
                if is_wildcard(filter) {
                    self.wildcard_filters.push((filter.to_owned(), idx));
                    for (topic, filters) in publish_filters.iter_mut() {
                        if matches(topic, filter) {
                            filters.push(idx);
                        }
                    }
                } else if let Some(filters) = publish_filters.get_mut(filter) {
                    // The one topic this filter can match is the one spelled like it.
                    if matches_exactly(filter, filter) {
                        filters.push(idx);
                    }
                }

                (idx, self.native.get(idx).unwrap())
            }
        };

        (filter_idx, data.log.next_offset())
    }

    pub fn native_readv(
        &self,
        filter_idx: FilterIdx,
        offset: Offset,
        len: u64,
    ) -> io::Result<(Position, Vec<(PubWithProp, Offset)>)> {
        // Renkei patch: a request holds its filter's log until its subscription ends, and the
        // log is freed only after that, so this finds it; were a request to outlive its log
        // anyway, it reads nothing (upstream unwrapped).
        let Some(data) = self.native.get(filter_idx) else {
            debug!(?filter_idx, "read from a freed filter log");
            let done = Position::Done {
                start: offset,
                end: offset,
            };
            return Ok((done, Vec::new()));
        };
        let mut o = Vec::new();
        // TODO: `readv` is infallible but its current return type does not
        // reflect that. Consequently, this method is also infallible.
        // Encoding this information is important so that calling function
        // has more information on how this method behaves.
        let next = data.log.readv(offset, len, &mut o)?;

        let now = Instant::now();
        o.retain_mut(|(pubdata, _)| {
            // Keep data if no properties exists, which implies no message expiry!
            let Some(properties) = pubdata.properties.as_mut() else {
                return true;
            };

            // Keep data if there is no message_expiry_interval
            let Some(message_expiry_interval) = properties.message_expiry_interval.as_mut() else {
                return true;
            };

            let time_spent = (now - pubdata.timestamp).as_secs() as u32;

            let is_valid = time_spent < *message_expiry_interval;

            // ignore expired messages
            if is_valid {
                // set message_expiry_interval to (original value - time spent waiting in server)
                // ref: https://docs.oasis-open.org/mqtt/mqtt/v5.0/os/mqtt-v5.0-os.html#_Toc3901112
                *message_expiry_interval -= time_spent;
            }

            is_valid
        });

        // no need to include timestamp when returning
        let o = o
            .into_iter()
            .map(|(pubdata, offset)| ((pubdata.publish, pubdata.properties.map(|p| *p)), offset))
            .collect();

        Ok((next, o))
    }

    pub fn shadow(&mut self, filter: &str) -> Option<PubWithProp> {
        let data = self.native.get_mut(*self.filter_indexes.get(filter)?)?;
        data.log
            .last()
            .map(|p| (p.publish, p.properties.map(|p| *p)))
    }

    /// This method is called when the subscriber has caught up with the commit log. In which case,
    /// instead of actively checking for commits in each `Router::run_inner` iteration, we instead
    /// wait and only try reading again when new messages have been added to the commit log. This
    /// methods converts a `DataRequest` (which actively reads the commit log in `Router::consume`)
    /// to a `Waiter` (which only reads when notified).
    pub fn park(&mut self, id: ConnectionId, request: DataRequest) {
        // Renkei patch: a request whose log has been freed (see `native_readv`) is dropped,
        // not parked (upstream unwrapped).
        let Some(data) = self.native.get_mut(request.filter_idx) else {
            debug!(
                filter = request.filter,
                "dropped a request for a freed filter log"
            );
            return;
        };
        data.waiters.register(id, request);
    }

    /// Cleanup a connection from all the waiters
    pub fn clean(&mut self, id: ConnectionId) -> Vec<DataRequest> {
        let mut inflight = Vec::new();
        for data in self.native.iter_mut() {
            inflight.append(&mut data.waiters.remove(id));
        }

        inflight
    }

    /// Renkei patch: one more subscription (of a connected client or of a saved session)
    /// reads the log of `filter_idx`.
    pub fn add_subscriber(&mut self, filter_idx: FilterIdx) {
        if let Some(data) = self.native.get_mut(filter_idx) {
            data.subscribers += 1;
        }
    }

    /// Renkei patch: a subscription to `filter` (without any `$share/group/` prefix) has ended:
    /// unsubscribed, its client gone with a clean session, or its saved session ended. When it
    /// was the filter's last and the filter is not one of `initialized_filters`, the log is
    /// freed, with its place in the lookups, and its index is returned. Upstream kept every
    /// log for good: a client subscribing to 20,000 filters once left some 120 MiB behind.
    /// A later subscriber creates the log afresh, as for a filter never seen.
    pub fn remove_subscriber(&mut self, filter: &str) -> Option<FilterIdx> {
        let idx = *self.filter_indexes.get(filter)?;
        let data = self.native.get_mut(idx)?;
        data.subscribers = data.subscribers.saturating_sub(1);
        if data.subscribers > 0 || self.is_initialized(filter) {
            return None;
        }

        self.native.remove(idx);
        self.filter_indexes.remove(filter);
        if is_wildcard(filter) {
            self.wildcard_filters.retain(|(_, i)| *i != idx);
            self.publish_filters.retain(|_, filters| {
                filters.retain(|i| *i != idx);
                !filters.is_empty()
            });
        } else if let Some(filters) = self.publish_filters.get_mut(filter) {
            // An exact filter is cached for the one topic spelled like it.
            filters.retain(|i| *i != idx);
            if filters.is_empty() {
                self.publish_filters.remove(filter);
            }
        }
        Some(idx)
    }

    /// Renkei patch, for tests: every filter index the lookups hold names a live log, and
    /// every log is looked up by its filter. Returns the number of logs.
    #[cfg(test)]
    pub fn check_lookups(&self) -> usize {
        for (filter, idx) in &self.filter_indexes {
            assert!(
                self.native.get(*idx).is_some(),
                "{filter} names a freed log"
            );
        }
        assert_eq!(self.filter_indexes.len(), self.native.len());
        for (filter, idx) in &self.wildcard_filters {
            assert_eq!(self.filter_indexes.get(filter), Some(idx), "{filter}");
        }
        for (topic, filters) in &self.publish_filters {
            assert!(!filters.is_empty(), "{topic} cached without filters");
            for idx in filters {
                assert!(
                    self.native.get(*idx).is_some(),
                    "{topic} cached with a freed log"
                );
            }
        }
        self.native.len()
    }

    /// Renkei patch, for tests: how many entries the log of `filter` holds.
    #[cfg(test)]
    pub fn held(&self, filter: &str) -> u64 {
        self.native
            .get(self.filter_indexes[filter])
            .map_or(0, |data| data.log.held())
    }

    fn is_initialized(&self, filter: &str) -> bool {
        self.config
            .initialized_filters
            .as_ref()
            .is_some_and(|filters| filters.iter().any(|f| f == filter))
    }

    pub fn insert_to_retained_publishes(
        &mut self,
        publish: Publish,
        publish_properties: Option<PublishProperties>,
        topic: Topic,
    ) {
        let pub_with_props = (publish, publish_properties);
        self.retained_publishes.insert(topic, pub_with_props.into());
    }

    pub fn remove_from_retained_publishes(&mut self, topic: Topic) {
        self.retained_publishes.remove(&topic);
    }

    pub fn read_retained_messages(&mut self, filter: &str) -> Vec<PubWithProp> {
        trace!(info = "reading retain msg", filter = &filter);
        let now = Instant::now();

        // discard expired retained messages
        self.retained_publishes.retain(|_, pubdata| {
            // Keep data if no properties exists, which implies no message expiry!
            let Some(properties) = pubdata.properties.as_mut() else {
                return true;
            };

            // Keep data if there is no message_expiry_interval
            let Some(message_expiry_interval) = properties.message_expiry_interval.as_mut() else {
                return true;
            };

            let time_spent = (now - pubdata.timestamp).as_secs() as u32;

            let is_valid = time_spent < *message_expiry_interval;

            // ignore expired messages
            if is_valid {
                // set message_expiry_interval to (original value - time spent waiting in server)
                // ref: https://docs.oasis-open.org/mqtt/mqtt/v5.0/os/mqtt-v5.0-os.html#_Toc3901112
                *message_expiry_interval -= time_spent;
            }

            is_valid
        });

        // Renkei patch: an exact filter reads its one topic instead of matching them all.
        if !is_wildcard(filter) {
            return self
                .retained_publishes
                .get_key_value(filter)
                .filter(|(topic, _)| matches_exactly(topic, filter))
                .map(|(_, p)| (p.publish.clone(), p.properties.as_deref().cloned()))
                .into_iter()
                .collect();
        }

        // no need to include timestamp when returning
        self.retained_publishes
            .iter()
            .filter(|(topic, _)| matches(topic, filter))
            .map(|(_, p)| (p.publish.clone(), p.properties.as_deref().cloned()))
            .collect()
    }
}

pub struct Data<T> {
    filter: Filter,
    pub log: CommitLog<T>,
    pub waiters: Waiters<DataRequest>,
    meter: SubscriptionMeter,
    /// Renkei patch: how many subscriptions read this log (see `DataLog::remove_subscriber`).
    subscribers: usize,
}

impl<T> Data<T>
where
    T: Storage + Clone,
{
    pub fn new(filter: &str, router_config: &RouterConfig) -> Data<T> {
        let mut max_segment_size = router_config.max_segment_size;
        let mut max_mem_segments = router_config.max_segment_count;

        // Override segment config for selected filter
        if let Some(config) = &router_config.custom_segment {
            for (f, segment_config) in config {
                if matches(filter, f) {
                    info!("Overriding segment config for filter: {}", filter);
                    max_segment_size = segment_config.max_segment_size;
                    max_mem_segments = segment_config.max_segment_count;
                }
            }
        }

        // max_segment_size: usize, max_mem_segments: usize
        let log = CommitLog::new(max_segment_size, max_mem_segments).unwrap();

        // Renkei patch: most filters (an agent's receipts, its commands) have one reader.
        let waiters = Waiters::with_capacity(1);
        let metrics = SubscriptionMeter::default();
        Data {
            filter: filter.to_owned(),
            log,
            waiters,
            meter: metrics,
            subscribers: 0,
        }
    }

    /// Renkei patch: when every reader of this log has read all of it, the log lets go of
    /// what it holds. Upstream kept the last `max_segment_count` segments whether or not
    /// anyone would read them again: the dashboard's and an integrator's busy logs held their
    /// full bound (10 MiB each with Renkei's defaults) and every agent's receipt log its own,
    /// for the life of the subscription, though each subscriber had long read them.
    ///
    /// Every subscription that reads the log is counted (`subscribers`: connected clients'
    /// and saved sessions'), and one that has read everything is parked among the `waiters`
    /// until the next append. So when there are as many waiters as subscriptions, no one is
    /// behind and nothing in the log will be read again: a new subscriber starts at the end.
    /// Except where a reader may go back: a persistent session's cursor returns to its first
    /// unacknowledged message when its connection ends, and a shared group reads through one
    /// cursor its members move in turn; a log with such a reader keeps its segments, as
    /// upstream did. Offsets go on from where they were, so parked cursors stay valid.
    fn release_if_all_read(&mut self) {
        let waiters = self.waiters.waiters();
        if waiters.len() != self.subscribers
            || waiters
                .iter()
                .any(|(_, request)| request.persistent || request.group.is_some())
        {
            return;
        }
        self.log.release_read();
    }

    /// Writes to all the filters that are mapped to this publish topic
    /// and wakes up consumers that are matching this topic (if they exist)
    pub fn append(
        &mut self,
        item: T,
        notifications: &mut VecDeque<(ConnectionId, DataRequest)>,
    ) -> (Offset, &Filter) {
        let size = item.size();
        self.release_if_all_read();
        let offset = self.log.append(item);
        if let Some(mut parked) = self.waiters.take() {
            notifications.append(&mut parked);
        }

        self.meter.count += 1;
        self.meter.total_size += size;

        (offset, &self.filter)
    }
}

/// Acks log for a subscription
#[derive(Debug)]
pub struct AckLog {
    // Committed acks per connection. First pkid, last pkid, data
    committed: VecDeque<Ack>,
    // Recorded qos 2 publishes
    recorded: VecDeque<(Publish, Option<PublishProperties>)>,
}

impl AckLog {
    /// New log
    pub fn new() -> AckLog {
        AckLog {
            // Renkei patch: allocated as they fill (see `Outgoing::new`).
            committed: VecDeque::new(),
            recorded: VecDeque::new(),
        }
    }

    pub fn connack(&mut self, id: ConnectionId, ack: ConnAck, props: Option<ConnAckProperties>) {
        let ack = Ack::ConnAck(id, ack, props);
        self.committed.push_back(ack);
    }

    pub fn suback(&mut self, ack: SubAck) {
        let ack = Ack::SubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn puback(&mut self, ack: PubAck) {
        let ack = Ack::PubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn pubrec(&mut self, publish: Publish, props: Option<PublishProperties>, ack: PubRec) {
        let ack = Ack::PubRec(ack);
        self.recorded.push_back((publish, props));
        self.committed.push_back(ack);
    }

    pub fn pubrel(&mut self, ack: PubRel) {
        let ack = Ack::PubRel(ack);
        self.committed.push_back(ack);
    }

    pub fn pubcomp(&mut self, ack: PubComp) -> Option<(Publish, Option<PublishProperties>)> {
        let ack = Ack::PubComp(ack);
        self.committed.push_back(ack);
        self.recorded.pop_front()
    }

    pub fn pingresp(&mut self, ack: PingResp) {
        let ack = Ack::PingResp(ack);
        self.committed.push_back(ack);
    }

    pub fn unsuback(&mut self, ack: UnsubAck) {
        let ack = Ack::UnsubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn readv(&mut self) -> &mut VecDeque<Ack> {
        &mut self.committed
    }
}

#[cfg(test)]
mod test {
    use super::DataLog;
    use crate::router::shared_subs::Strategy;
    use crate::router::FilterIdx;
    use crate::RouterConfig;

    #[test]
    fn publish_filters_updating_correctly_on_new_topic_subscription() {
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
            skip_notice_topic: None,
        };
        let mut data = DataLog::new(config).unwrap();
        data.next_native_offset("topic/a");
        data.matches("topic/a");

        data.next_native_offset("topic/+");

        assert_eq!(data.publish_filters.get("topic/a").unwrap().len(), 2);
    }

    // Renkei patch: boxed properties come out of a log as they went in, and a logged message
    // takes no more than 96 bytes of each log it lands in.
    #[test]
    fn properties_come_out_of_the_log_as_they_went_in() {
        use super::PublishData;
        use crate::protocol::{Publish, PublishProperties};
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
            skip_notice_topic: None,
        };
        let mut data = DataLog::new(config).unwrap();
        let (idx, cursor) = data.next_native_offset("topic/a");
        // Read from `cursor` below as a subscriber would, so counted as one: a log no one
        // subscribes to keeps only its last message.
        data.add_subscriber(idx);
        let properties = PublishProperties {
            message_expiry_interval: Some(3600),
            content_type: Some("application/json".to_owned()),
            user_properties: vec![("ward".to_owned(), "131016".to_owned())],
            ..Default::default()
        };
        let with = Publish::new("topic/a", "one", false);
        let without = Publish::new("topic/a", "two", false);
        let mut notifications = std::collections::VecDeque::new();
        let log = data.native.get_mut(idx).unwrap();
        log.append(
            (with.clone(), Some(properties.clone())).into(),
            &mut notifications,
        );
        log.append((without.clone(), None).into(), &mut notifications);
        let (_, read) = data.native_readv(idx, cursor, 10).unwrap();
        let read: Vec<_> = read.into_iter().map(|(p, _)| p).collect();
        assert_eq!(read, vec![(with, Some(properties)), (without, None)]);
        assert!(std::mem::size_of::<PublishData>() <= 96);
    }

    // Renkei patch: the exact-filter lookup must agree with matching every filter.
    #[test]
    fn filter_lookup_agrees_with_matching_every_filter() {
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: Some(vec!["a/#".to_owned(), "x/y".to_owned()]),
            shared_subscriptions_strategy: Strategy::RoundRobin,
            skip_notice_topic: None,
        };
        let topics = [
            "a", "a/b", "a/b/c", "x/y", "x/y/", "x//y", "/x/y", "$SYS/x", "$SYS/x/y", "a/+", "+/b",
            "r/1/s", "r/2/s", "", "/",
        ];
        let early = ["a/b", "+/b", "#", "r/1/s", "$SYS/x", "x//y", "/"];
        let late = ["a/+", "a/b/c", "r/+/s", "r/2/s", "$SYS/#", "+", "", "x/y/"];
        let mut data = DataLog::new(config).unwrap();
        let mut filters: Vec<(String, FilterIdx)> = ["a/#", "x/y"]
            .iter()
            .map(|f| (f.to_string(), data.next_native_offset(f).0))
            .collect();
        let check = |data: &mut DataLog, filters: &[(String, FilterIdx)]| {
            for topic in topics {
                let mut got = data.matches(topic).unwrap();
                got.sort_unstable();
                let mut want: Vec<FilterIdx> = filters
                    .iter()
                    .filter(|(f, _)| crate::protocol::matches(topic, f))
                    .map(|(_, idx)| *idx)
                    .collect();
                want.sort_unstable();
                assert_eq!(got, want, "topic {topic:?}");
            }
        };
        for f in early {
            filters.push((f.to_owned(), data.next_native_offset(f).0));
        }
        // First lookups fill the per-topic cache, later filters must update it.
        check(&mut data, &filters);
        for f in late {
            filters.push((f.to_owned(), data.next_native_offset(f).0));
        }
        check(&mut data, &filters);
    }

    // Renkei patch: a log's slot is reused once it is freed; its old index must not find the
    // new log.
    #[test]
    fn a_freed_logs_index_reaches_no_other_log() {
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: Some(vec!["kept/+".to_owned()]),
            shared_subscriptions_strategy: Strategy::RoundRobin,
            skip_notice_topic: None,
        };
        let mut data = DataLog::new(config).unwrap();
        let (old, _) = data.next_native_offset("a/b");
        data.add_subscriber(old);
        data.matches("a/b");
        let (wild, _) = data.next_native_offset("a/+");
        data.add_subscriber(wild);
        assert_eq!(data.matches("a/b").unwrap().len(), 2);

        assert_eq!(data.remove_subscriber("a/b"), Some(old));
        assert_eq!(data.matches("a/b").unwrap(), vec![wild]);
        let (new, _) = data.next_native_offset("c/d");
        assert_ne!(old, new);
        assert!(data.native.get(old).is_none());
        assert!(data.native.get(new).is_some());
        let (_, read) = data.native_readv(old, (0, 0), 10).unwrap();
        assert!(read.is_empty());

        assert_eq!(data.remove_subscriber("a/+"), Some(wild));
        assert_eq!(data.matches("a/b").unwrap(), vec![]);
        // An initialized filter stays, subscribed or not.
        let (kept, _) = data.next_native_offset("kept/+");
        data.add_subscriber(kept);
        assert_eq!(data.remove_subscriber("kept/+"), None);
        assert!(data.native.get(kept).is_some());
        assert_eq!(data.check_lookups(), 2);
    }

    #[test]
    fn publish_filters_updating_correctly_on_new_publish() {
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
            skip_notice_topic: None,
        };
        let mut data = DataLog::new(config).unwrap();
        data.next_native_offset("+/+");

        data.matches("topic/a");

        assert_eq!(data.publish_filters.get("topic/a").unwrap().len(), 1);
    }

    //     #[test]
    //     fn appends_are_written_to_correct_commitlog() {
    //         pretty_env_logger::init();
    //         let config = RouterConfig {
    //             instant_ack: true,
    //             max_segment_size: 1024,
    //             max_connections: 10,
    //             max_mem_segments: 10,
    //             max_disk_segments: 0,
    //             max_read_len: 1024,
    //             log_dir: None,
    //             dynamic_log: true,
    //         };

    //         let mut data = DataLog::new(config).unwrap();
    //         data.next_native_offset("/devices/2321/actions");
    //         for i in 0..2 {
    //             let publish = Publish::new("/devices/2321/events/imu/jsonarray", QoS::AtLeastOnce, vec![1, 2, 3]);
    //             let v = data.native_append(publish);
    //             dbg!(v);
    //         }

    //         for i in 0..2 {
    //             let publish = Publish::new("/devices/2321/actions", QoS::AtLeastOnce, vec![1, 2, 3]);
    //             let v = data.native_append(publish);
    //             dbg!(v);
    //         }
    //     }
}
