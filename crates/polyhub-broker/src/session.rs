//! Sessions: what the broker keeps for one client id, connected or not.
//!
//! Design: a session is an `Arc<Session>` shared by the sessions map, the subscription tree (as
//! a [`SessionKey`]), the connection task that owns it and its timers. Everything mutable sits
//! behind one short-lived `parking_lot` mutex that is never held across an `.await`; the
//! connection task is woken through a [`Notify`] outside that mutex when something is queued.
//!
//! Lock order: sessions map → subscription tree → session state → retained store. Routing takes
//! the tree's read lock only to collect targets and releases it before locking any session.
//! A session's `persistence` mutex is a leaf: nothing else is locked while it is held.
//!
//! Persistent in-process sessions (see `local.rs`) keep one more thing in their state: what
//! their client has taken and not yet acknowledged ([`LocalAcks`]). It sits behind an
//! `Option<Box<_>>` so that the many network sessions pay one pointer for it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use polyhub_mqtt::{ProtocolVersion, QoS};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;

use crate::config::{BrokerConfig, QueueFullPolicy};
use crate::message::{Delivery, Message};
use crate::stats::Stats;
use crate::subscriptions::Subscription;

/// How often, at most, a session's dropped messages are logged.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Who drives a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SessionKind {
    /// A network client (TCP or TLS).
    Network,
    /// An in-process [`LocalClient`](crate::LocalClient).
    Local,
}

/// One client id's session.
pub(crate) struct Session {
    /// Unique for the broker's lifetime (never 0, which is the broker itself).
    pub(crate) id: u64,
    pub(crate) client_id: String,
    /// Who drives it ([`SessionKind`]); changes only when a client of the other kind takes over a
    /// detached persistent session ([`Session::become_network`], [`Session::become_local`]).
    is_local: AtomicBool,
    /// Most deliveries queued (beyond those in flight); 0 = unbounded.
    max_queued: usize,
    /// Whether a connection (or a local client) is attached; read without the lock by routing
    /// (offline QoS 0 filtering, shared-subscription member choice).
    online: AtomicBool,
    pub(crate) state: Mutex<SessionState>,
    /// Wakes the attached connection (or `LocalClient::recv`) when the queue goes from empty to
    /// non-empty, or when another connection takes the session over.
    pub(crate) notify: Notify,
    /// Held by the attached connection task for its whole life, so a client taking the session
    /// over waits until the previous connection has finished detaching.
    pub(crate) owner: Arc<Semaphore>,
    /// What only the connection knows and a snapshot needs (see [`PersistenceInfo`]).
    pub(crate) persistence: Mutex<PersistenceInfo>,
    /// For sessions that never drop: when publishers into it are paused (`None` for others, so
    /// an ordinary session pays one pointer).
    backpressure: Option<Box<Backpressure>>,
}

/// A lossless session's high-water mark and who waits for it to drain.
#[derive(Debug)]
pub(crate) struct Backpressure {
    high_water: usize,
    low_water: usize,
    /// Set when the queue reached `high_water`, cleared when it is back at `low_water`.
    over: AtomicBool,
    /// Wakes paused publishers when `over` is cleared.
    drained: Notify,
}

/// What a snapshot needs to know about a session beyond its state: reported by its connection
/// through [`Session::record_connection`] / [`Session::record_session_expiry`], and the
/// instant it went offline (from [`Session::set_online`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PersistenceInfo {
    /// `None` until a connection reports it; a session without it is not persisted.
    pub(crate) connection: Option<ConnectionInfo>,
    /// When the session last went offline.
    pub(crate) offline_since: Option<Instant>,
}

/// The session-related settings of the CONNECT (or restored snapshot) behind a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConnectionInfo {
    pub(crate) protocol: ProtocolVersion,
    /// Session expiry interval in seconds, capped by `max_session_expiry`, as it stands now
    /// (DISCONNECT may change it); `u32::MAX` = never, 0 = ends with the connection.
    pub(crate) session_expiry: u32,
    /// Will delay interval in seconds of the connection's will (0: none or no delay).
    pub(crate) will_delay: u32,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("client_id", &self.client_id)
            .field("kind", &self.kind())
            .field("online", &self.is_online())
            .finish_non_exhaustive()
    }
}

/// The acknowledgement an outbound QoS 1/2 message waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Awaiting {
    /// QoS 1 PUBLISH sent, PUBACK expected.
    Ack,
    /// QoS 2 PUBLISH sent, PUBREC expected.
    Rec,
    /// PUBREL sent, PUBCOMP expected.
    Comp,
}

/// An outbound QoS 1/2 message not yet fully acknowledged.
#[derive(Debug)]
pub(crate) struct Inflight {
    pub(crate) packet_id: u16,
    pub(crate) delivery: Delivery,
    pub(crate) stage: Awaiting,
}

/// The mutable part of a session.
#[derive(Debug)]
pub(crate) struct SessionState {
    /// Filters this session subscribed to (routing uses the subscription tree; the options
    /// recorded here are for snapshots).
    pub(crate) subscriptions: SubscribedFilters,
    /// Deliveries waiting to be sent, oldest first.
    pub(crate) queue: VecDeque<Delivery>,
    /// Outbound QoS 1/2 messages in flight, in the order they were first sent.
    pub(crate) inflight: VecDeque<Inflight>,
    next_packet_id: u16,
    /// Inbound QoS 2 packet ids received and answered with PUBREC, awaiting PUBREL.
    pub(crate) awaiting_release: Vec<u16>,
    /// Whether a network connection drives this session.
    pub(crate) attached: bool,
    /// Set by a new connection for this client id: the attached one must go. It sees the flag
    /// the next time it looks at the queue (it is woken through `notify`).
    pub(crate) taken_over: bool,
    /// Set with `taken_over`: whether the new connection keeps the session (clean start 0).
    /// The old connection reads it to decide whether its will can wait for its delay.
    pub(crate) takeover_keeps_session: bool,
    /// Bumped each time a connection detaches; timers armed at a detach only act if it has not
    /// changed since.
    pub(crate) detach_epoch: u64,
    /// A will waiting for its delay interval (MQTT 5) or for the session to end.
    pub(crate) pending_will: Option<Box<Message>>,
    dropped_since_log: u64,
    last_drop_log: Option<Instant>,
    /// `Some` for the persistent session of an in-process client: its acknowledgement state.
    pub(crate) local: Option<Box<LocalAcks>>,
}

/// What a persistent in-process session has handed out and not had acknowledged.
///
/// Its client acknowledges explicitly (by token) once it has done its work with a message;
/// until then the message belongs to the session, is saved in snapshots and is handed out
/// again, marked redelivered, to the next client that attaches (or when the client asks).
#[derive(Debug, Default)]
pub(crate) struct LocalAcks {
    /// Whether a [`LocalClient`](crate::LocalClient) is attached.
    pub(crate) attached: bool,
    /// The next token; tokens are never reused within a session (0 means "no ack needed").
    next_token: u64,
    /// QoS 1/2 deliveries handed out and not acknowledged, by token, so in hand-out order.
    pub(crate) unacked: BTreeMap<u64, Delivery>,
    /// Deliveries to hand out again, before anything from the queue.
    pub(crate) redeliver: VecDeque<Delivery>,
}

impl LocalAcks {
    /// Acknowledgement state for a session that resumes with `redeliver` pending.
    pub(crate) fn with_redeliveries(redeliver: VecDeque<Delivery>) -> LocalAcks {
        LocalAcks {
            attached: false,
            next_token: 1,
            unacked: BTreeMap::new(),
            redeliver,
        }
    }

    /// Remember `delivery` as handed out; returns its token (0 for QoS 0, which needs none).
    pub(crate) fn hand_out(&mut self, delivery: &Delivery) -> u64 {
        if delivery.qos == QoS::AtMostOnce {
            return 0;
        }
        let token = self.next_token.max(1);
        self.next_token = token + 1;
        self.unacked.insert(token, delivery.clone());
        token
    }

    /// Everything handed out and not acknowledged goes back to be handed out again, first,
    /// ahead of older redeliveries not yet handed out (those were handed out before them).
    pub(crate) fn redeliver_unacked(&mut self) {
        let unacked = std::mem::take(&mut self.unacked);
        for (_, delivery) in unacked.into_iter().rev() {
            self.redeliver.push_front(delivery);
        }
    }

    /// What a snapshot saves: every delivery not acknowledged, in the order it is to be
    /// handed out again.
    pub(crate) fn pending(&self) -> impl Iterator<Item = &Delivery> {
        self.unacked.values().chain(self.redeliver.iter())
    }

    /// How many deliveries are not acknowledged.
    pub(crate) fn len(&self) -> usize {
        self.unacked.len() + self.redeliver.len()
    }
}

impl Session {
    pub(crate) fn new(id: u64, client_id: String, kind: SessionKind, max_queued: usize) -> Session {
        Session {
            id,
            client_id,
            is_local: AtomicBool::new(kind == SessionKind::Local),
            max_queued,
            online: AtomicBool::new(kind == SessionKind::Local),
            state: Mutex::new(SessionState {
                subscriptions: SubscribedFilters::default(),
                queue: VecDeque::new(),
                inflight: VecDeque::new(),
                next_packet_id: 1,
                awaiting_release: Vec::new(),
                attached: false,
                taken_over: false,
                takeover_keeps_session: false,
                detach_epoch: 0,
                pending_will: None,
                dropped_since_log: 0,
                last_drop_log: None,
                local: None,
            }),
            notify: Notify::new(),
            owner: Arc::new(Semaphore::new(1)),
            persistence: Mutex::new(PersistenceInfo::default()),
            backpressure: None,
        }
    }

    /// Marks a session that never drops as one whose publishers are paused above `high_water`
    /// queued messages (0: never).
    pub(crate) fn with_backpressure(mut self, high_water: usize) -> Session {
        if high_water > 0 {
            self.backpressure = Some(Box::new(Backpressure {
                high_water,
                low_water: high_water / 2,
                over: AtomicBool::new(false),
                drained: Notify::new(),
            }));
        }
        self
    }

    /// Whether publishers into this session should pause: its queue is past its high water
    /// and its client is there to drain it (while it is away, the queue simply grows).
    pub(crate) fn is_backed_up(&self) -> bool {
        self.backpressure
            .as_ref()
            .is_some_and(|backpressure| backpressure.over.load(Ordering::Acquire))
            && self.is_online()
    }

    /// Resolves once this session is no longer backed up (at once if it is not).
    pub(crate) async fn drained(&self) {
        let Some(backpressure) = &self.backpressure else {
            return;
        };
        let notified = backpressure.drained.notified();
        if !backpressure.over.load(Ordering::Acquire) {
            return;
        }
        notified.await;
    }

    /// After messages were taken from the queue, which now holds `queued`: wakes paused
    /// publishers once it is down to the low-water mark.
    pub(crate) fn taken(&self, queued: usize) {
        if let Some(backpressure) = &self.backpressure
            && queued <= backpressure.low_water
            && backpressure.over.swap(false, Ordering::AcqRel)
        {
            backpressure.drained.notify_waiters();
        }
    }

    /// The persistent session of an in-process client, not attached yet: it queues like an
    /// offline session until a [`LocalClient`](crate::LocalClient) attaches, and `pending` is
    /// handed out first, marked redelivered. Unbounded (`max_queued` 0), it never drops, and
    /// its publishers are paused above `config.lossless_queue_high_water` instead.
    pub(crate) fn new_local_persistent(
        id: u64,
        client_id: String,
        max_queued: usize,
        pending: VecDeque<Delivery>,
        config: &BrokerConfig,
    ) -> Session {
        let mut session = Session::new(id, client_id, SessionKind::Local, max_queued);
        if max_queued == 0 {
            session = session.with_backpressure(config.lossless_queue_high_water);
        }
        session.online.store(false, Ordering::Release);
        session.state.lock().local = Some(Box::new(LocalAcks::with_redeliveries(pending)));
        session
    }

    /// Who drives this session.
    pub(crate) fn kind(&self) -> SessionKind {
        if self.is_local.load(Ordering::Acquire) {
            SessionKind::Local
        } else {
            SessionKind::Network
        }
    }

    /// Turns a detached persistent in-process session into a network one for a CONNECT that
    /// resumes its client id (a hub switched from task to process isolation): what the local
    /// client had taken and not acknowledged goes back to the front of the queue, in order,
    /// and the subscriptions stay, so nothing routed to it meanwhile is lost. Returns `false`
    /// (and changes nothing) for a session that is not such a session. Call with the sessions
    /// map locked.
    pub(crate) fn become_network(&self) -> bool {
        let mut state = self.state.lock();
        if self.kind() != SessionKind::Local
            || state.local.as_deref().is_none_or(|acks| acks.attached)
        {
            return false;
        }
        if let Some(acks) = state.local.take() {
            let LocalAcks {
                unacked, redeliver, ..
            } = *acks;
            let mut pending: VecDeque<Delivery> = unacked.into_values().chain(redeliver).collect();
            pending.append(&mut state.queue);
            state.queue = pending;
        }
        state.attached = false;
        self.is_local.store(false, Ordering::Release);
        true
    }

    /// Turns a detached persistent network session into an in-process one for a local client
    /// that resumes its client id (a hub switched from process to task isolation): messages in
    /// flight that the client had not received for sure are handed out again first; timers
    /// armed at the network client's detach (will, expiry) no longer apply. Returns `false` (and
    /// changes nothing) when a connection is attached or the session is not a network one.
    /// Call with the sessions map locked.
    pub(crate) fn become_local(&self) -> bool {
        let mut state = self.state.lock();
        if self.kind() != SessionKind::Network || state.attached {
            return false;
        }
        // A PUBREL stage means the client has the message (it sent PUBREC).
        let pending: VecDeque<Delivery> = state
            .inflight
            .drain(..)
            .filter(|entry| entry.stage != Awaiting::Comp)
            .map(|entry| entry.delivery)
            .collect();
        state.awaiting_release.clear();
        state.pending_will = None;
        state.detach_epoch = state.detach_epoch.wrapping_add(1);
        state.local = Some(Box::new(LocalAcks::with_redeliveries(pending)));
        self.is_local.store(true, Ordering::Release);
        true
    }

    /// The queue bound of this session (0: unbounded).
    pub(crate) fn max_queued(&self) -> usize {
        self.max_queued
    }

    /// Record the session settings of the connection that attached (for snapshots).
    pub(crate) fn record_connection(
        &self,
        protocol: ProtocolVersion,
        session_expiry: u32,
        will_delay: u32,
    ) {
        self.persistence.lock().connection = Some(ConnectionInfo {
            protocol,
            session_expiry,
            will_delay,
        });
    }

    /// Record a session expiry changed by DISCONNECT (for snapshots).
    pub(crate) fn record_session_expiry(&self, session_expiry: u32) {
        if let Some(connection) = &mut self.persistence.lock().connection {
            connection.session_expiry = session_expiry;
        }
    }

    /// Whether a connection or local client is attached.
    pub(crate) fn is_online(&self) -> bool {
        self.online.load(Ordering::Acquire)
    }

    pub(crate) fn set_online(&self, online: bool) {
        self.online.store(online, Ordering::Release);
        // A leaf lock: callers may hold the state lock.
        self.persistence.lock().offline_since = (!online).then(Instant::now);
    }

    /// Queue `delivery` for this session, applying the queue bound and the offline rules.
    /// Returns whether it was queued.
    ///
    /// Offline sessions only queue QoS 1/2 (QoS 0 too with `queue_qos0_messages`). When the
    /// queue holds its maximum (`max_queued_messages` for network clients), the queue-full
    /// policy drops the newest or the oldest message; drops are counted in `publish_dropped`
    /// and logged at most once a minute.
    pub(crate) fn enqueue(&self, delivery: Delivery, config: &BrokerConfig, stats: &Stats) -> bool {
        if delivery.qos == QoS::AtMostOnce && !config.queue_qos0_messages && !self.is_online() {
            return false;
        }
        let was_empty;
        {
            let mut state = self.state.lock();
            let limit = self.max_queued;
            if limit != 0 && state.queue.len() >= limit {
                Stats::add(&stats.publish_dropped, 1);
                self.note_drop(&mut state);
                match config.queue_full_policy {
                    QueueFullPolicy::DropNewest => return false,
                    QueueFullPolicy::DropOldest => {
                        state.queue.pop_front();
                    }
                }
            }
            was_empty = state.queue.is_empty();
            state.queue.push_back(delivery);
            if let Some(backpressure) = &self.backpressure
                && state.queue.len() >= backpressure.high_water
            {
                backpressure.over.store(true, Ordering::Release);
            }
        }
        if was_empty {
            self.notify.notify_one();
        }
        true
    }

    /// Queue deliveries without applying the bound: retained messages sent because the client
    /// just subscribed (it asked for them, and they are bounded by the retained store).
    pub(crate) fn enqueue_unbounded(&self, deliveries: impl IntoIterator<Item = Delivery>) {
        let was_empty;
        {
            let mut state = self.state.lock();
            was_empty = state.queue.is_empty();
            state.queue.extend(deliveries);
            if state.queue.is_empty() {
                return;
            }
        }
        if was_empty {
            self.notify.notify_one();
        }
    }

    /// Log a drop unless one was logged for this session in the last minute.
    fn note_drop(&self, state: &mut SessionState) {
        state.dropped_since_log += 1;
        let now = Instant::now();
        if state
            .last_drop_log
            .is_none_or(|last| now.duration_since(last) >= DROP_LOG_INTERVAL)
        {
            tracing::warn!(
                client_id = %self.client_id,
                dropped = state.dropped_since_log,
                online = self.is_online(),
                "Session queue full: messages dropped."
            );
            state.last_drop_log = Some(now);
            state.dropped_since_log = 0;
        }
    }
}

impl SessionState {
    /// A packet id not used by any message in flight. The caller keeps the number in flight
    /// below 65,535, so one is always free.
    pub(crate) fn allocate_packet_id(&mut self) -> u16 {
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = if id == u16::MAX { 1 } else { id + 1 };
            if !self.packet_id_in_use(id) {
                return id;
            }
        }
    }

    /// Whether an inflight message uses `id`. Ids are handed out in sequence and the inflight
    /// list is in allocation order, so the ids in use lie in the cyclic window from the
    /// oldest's to the newest's; the usual candidate (just past the newest) is outside it and
    /// costs no scan. Only after the counter has wrapped into the window is the list searched.
    fn packet_id_in_use(&self, id: u16) -> bool {
        let (Some(oldest), Some(newest)) = (self.inflight.front(), self.inflight.back()) else {
            return false;
        };
        let span = id_distance(oldest.packet_id, newest.packet_id);
        if id_distance(oldest.packet_id, id) > span {
            return false;
        }
        self.inflight.iter().any(|entry| entry.packet_id == id)
    }

    /// The inflight entry for `packet_id`, if any. Acknowledgements usually come in order, so
    /// the front is checked first.
    pub(crate) fn inflight_position(&self, packet_id: u16) -> Option<usize> {
        self.inflight
            .iter()
            .position(|entry| entry.packet_id == packet_id)
    }
}

/// A session's subscribed filters, with their options once known.
///
/// Routing only needs the subscription tree; the options are kept here as well so that a
/// snapshot can list a session's subscriptions without searching the tree.
#[derive(Debug, Default)]
pub(crate) struct SubscribedFilters {
    /// Filter → options; `None` while they are not known (a snapshot then skips the session).
    filters: Filters,
}

/// Most sessions hold one or a few filters: a vector sized to fit costs an idle connection a
/// fraction of the smallest hash map (which allocates room for four entries plus control
/// bytes). Past [`FEW_FILTERS`] a map keeps subscribing and unsubscribing O(1).
#[derive(Debug)]
enum Filters {
    Few(Vec<(String, Option<Subscription>)>),
    Many(HashMap<String, Option<Subscription>>),
}

/// The most filters kept in the vector form.
const FEW_FILTERS: usize = 8;

impl Default for Filters {
    fn default() -> Self {
        Filters::Few(Vec::new())
    }
}

impl SubscribedFilters {
    /// Add or update `filter` with its options; returns whether it is new.
    pub(crate) fn insert_with(&mut self, filter: String, subscription: Subscription) -> bool {
        match &mut self.filters {
            Filters::Few(entries) => {
                if let Some(entry) = entries.iter_mut().find(|(known, _)| *known == filter) {
                    entry.1 = Some(subscription);
                    return false;
                }
                if entries.len() < FEW_FILTERS {
                    entries.reserve_exact(1);
                    entries.push((filter, Some(subscription)));
                } else {
                    let mut map: HashMap<String, Option<Subscription>> =
                        entries.drain(..).collect();
                    map.insert(filter, Some(subscription));
                    self.filters = Filters::Many(map);
                }
                true
            }
            Filters::Many(map) => map.insert(filter, Some(subscription)).is_none(),
        }
    }

    /// Remove `filter`; returns whether it was there.
    pub(crate) fn remove(&mut self, filter: &str) -> bool {
        match &mut self.filters {
            Filters::Few(entries) => match entries.iter().position(|(known, _)| known == filter) {
                Some(position) => {
                    entries.swap_remove(position);
                    true
                }
                None => false,
            },
            Filters::Many(map) => map.remove(filter).is_some(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        match &self.filters {
            Filters::Few(entries) => entries.is_empty(),
            Filters::Many(map) => map.is_empty(),
        }
    }

    /// Each filter with its options, if known.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, Option<Subscription>)> {
        let (few, many) = match &self.filters {
            Filters::Few(entries) => (Some(entries.iter().map(|(f, s)| (f, s))), None),
            Filters::Many(map) => (None, Some(map.iter())),
        };
        few.into_iter()
            .flatten()
            .chain(many.into_iter().flatten())
            .map(|(filter, subscription)| (filter.as_str(), *subscription))
    }
}

impl<'a> IntoIterator for &'a SubscribedFilters {
    type Item = &'a String;
    type IntoIter = Box<dyn Iterator<Item = &'a String> + 'a>;

    fn into_iter(self) -> Self::IntoIter {
        match &self.filters {
            Filters::Few(entries) => Box::new(entries.iter().map(|(filter, _)| filter)),
            Filters::Many(map) => Box::new(map.keys()),
        }
    }
}

impl SessionState {
    /// The packet id the next outbound QoS 1/2 message will try first.
    pub(crate) fn next_packet_id(&self) -> u16 {
        self.next_packet_id
    }

    /// Set the packet id counter (restoring a snapshot); 0 becomes 1.
    pub(crate) fn set_next_packet_id(&mut self, id: u16) {
        self.next_packet_id = id.max(1);
    }
}

/// Steps from packet id `from` forward to `to`, on the cycle 1..=65535.
fn id_distance(from: u16, to: u16) -> u32 {
    (i32::from(to) - i32::from(from))
        .rem_euclid(65_535)
        .unsigned_abs()
}

/// A session as the subscription tree knows it: equal and hashed by the session's unique id,
/// and carrying the session itself so routing needs no map lookup.
#[derive(Clone, Debug)]
pub(crate) struct SessionKey(pub(crate) Arc<Session>);

impl PartialEq for SessionKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.id == other.0.id
    }
}

impl Eq for SessionKey {}

impl Hash for SessionKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.id.hash(state);
    }
}

impl PartialOrd for SessionKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for SessionKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.id.cmp(&other.0.id)
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::message::MessageProperties;

    fn delivery(qos: QoS, n: u8) -> Delivery {
        Delivery {
            message: Arc::new(Message::new(
                "t".into(),
                Bytes::from(vec![n]),
                qos,
                false,
                9,
                MessageProperties::default(),
            )),
            qos,
            retain: false,
            subscription_ids: Vec::new(),
        }
    }

    fn queued_payloads(session: &Session) -> Vec<u8> {
        let state = session.state.lock();
        state.queue.iter().map(|d| d.message.payload[0]).collect()
    }

    #[tokio::test]
    async fn full_queue_drops_newest_by_default() {
        let config = BrokerConfig {
            max_queued_messages: 2,
            ..BrokerConfig::default()
        };
        let stats = Stats::default();
        let session = Session::new(
            1,
            "c".into(),
            SessionKind::Network,
            config.max_queued_messages,
        );
        for n in 0..4 {
            session.enqueue(delivery(QoS::AtLeastOnce, n), &config, &stats);
        }
        assert_eq!(queued_payloads(&session), vec![0, 1]);
        assert_eq!(stats.publish_dropped.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn full_queue_can_drop_oldest() {
        let config = BrokerConfig {
            max_queued_messages: 2,
            queue_full_policy: QueueFullPolicy::DropOldest,
            ..BrokerConfig::default()
        };
        let stats = Stats::default();
        let session = Session::new(
            1,
            "c".into(),
            SessionKind::Network,
            config.max_queued_messages,
        );
        for n in 0..4 {
            session.enqueue(delivery(QoS::AtLeastOnce, n), &config, &stats);
        }
        assert_eq!(queued_payloads(&session), vec![2, 3]);
        assert_eq!(stats.publish_dropped.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn offline_sessions_skip_qos0_unless_configured() {
        let stats = Stats::default();
        let session = Session::new(1, "c".into(), SessionKind::Network, 10);
        let config = BrokerConfig::default();
        assert!(!session.enqueue(delivery(QoS::AtMostOnce, 0), &config, &stats));
        assert!(session.enqueue(delivery(QoS::AtLeastOnce, 1), &config, &stats));
        let config = BrokerConfig {
            queue_qos0_messages: true,
            ..BrokerConfig::default()
        };
        assert!(session.enqueue(delivery(QoS::AtMostOnce, 2), &config, &stats));
        assert_eq!(queued_payloads(&session), vec![1, 2]);
        assert_eq!(stats.publish_dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn packet_ids_wrap_into_the_inflight_window_without_reuse() {
        let session = Session::new(1, "c".into(), SessionKind::Network, 10);
        let mut state = session.state.lock();
        state.next_packet_id = 65_534;
        for id in [65_534, 65_535, 1, 2] {
            assert_eq!(state.allocate_packet_id(), id);
            state.inflight.push_back(Inflight {
                packet_id: id,
                delivery: delivery(QoS::AtLeastOnce, 0),
                stage: Awaiting::Ack,
            });
        }
        // Everything but the oldest acknowledged; the counter is then forced back into the
        // window: ids still in flight are skipped.
        state.inflight.pop_front();
        state.next_packet_id = 65_535;
        assert_eq!(state.allocate_packet_id(), 3);
        assert_eq!(id_distance(65_535, 1), 1);
        assert_eq!(id_distance(1, 65_535), 65_534);
    }

    #[test]
    fn packet_ids_skip_zero_and_ids_in_flight() {
        let session = Session::new(1, "c".into(), SessionKind::Network, 10);
        let mut state = session.state.lock();
        state.next_packet_id = u16::MAX;
        state.inflight.push_back(Inflight {
            packet_id: 1,
            delivery: delivery(QoS::AtLeastOnce, 0),
            stage: Awaiting::Ack,
        });
        assert_eq!(state.allocate_packet_id(), u16::MAX);
        assert_eq!(state.allocate_packet_id(), 2);
    }

    fn subscription(identifier: u32) -> Subscription {
        Subscription {
            options: polyhub_mqtt::SubscriptionOptions::default(),
            identifier: Some(identifier),
        }
    }

    #[test]
    fn subscribed_filters_keep_every_filter_across_the_switch_to_a_map() {
        let mut filters = SubscribedFilters::default();
        for n in 0..20u32 {
            assert!(filters.insert_with(format!("f/{n}"), subscription(n)));
            // Re-subscribing updates the options and is not new.
            assert!(!filters.insert_with(format!("f/{n}"), subscription(n + 100)));
            let mut seen: Vec<(String, Option<u32>)> = filters
                .iter()
                .map(|(filter, known)| (filter.to_owned(), known.and_then(|s| s.identifier)))
                .collect();
            seen.sort();
            let mut expected: Vec<(String, Option<u32>)> =
                (0..=n).map(|k| (format!("f/{k}"), Some(k + 100))).collect();
            expected.sort();
            assert_eq!(seen, expected);
            assert_eq!((&filters).into_iter().count(), n as usize + 1);
        }
        for n in 0..20u32 {
            assert!(filters.remove(&format!("f/{n}")));
            assert!(!filters.remove(&format!("f/{n}")));
        }
        assert!(filters.is_empty());

        let mut few = SubscribedFilters::default();
        few.insert_with("a".into(), subscription(1));
        few.insert_with("b".into(), subscription(2));
        assert!(few.remove("a"));
        assert!(!few.remove("a"));
        assert_eq!((&few).into_iter().collect::<Vec<_>>(), vec!["b"]);
    }
}
