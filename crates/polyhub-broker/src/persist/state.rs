//! Between the live broker and a [`Snapshot`]: what is taken from the shared state, and how a
//! snapshot is put back.
//!
//! Taken: retained messages (not `$` topics: `$SYS` is regenerated, and `$` topics are the
//! server's own, MQTT §4.7.2), network sessions that outlive their connection (session
//! expiry > 0) whose connection reported its settings, and the persistent sessions of
//! in-process clients (with what their client took and did not acknowledge, so that it is
//! handed out again after the restart). Other local clients' sessions are not taken: the
//! program recreates them. Expiry intervals (session, message, will delay) are stored as what
//! remains, and count again from the restore.
//!
//! Lock order as everywhere: sessions map → subscription tree → session state → retained
//! store, with a session's `persistence` mutex as a leaf; no lock is held across an `.await`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use polyhub_mqtt::{QoS, topic};
use tokio::time::Instant;

use crate::broker::Shared;
use crate::client::{spawn_expiry_timer, spawn_will_timer};
use crate::error::BrokerError;
use crate::message::{BROKER_PUBLISHER, Delivery, Message};
use crate::persist::format::{
    InflightStage, Snapshot, StoredDelivery, StoredInflight, StoredLocal, StoredMessage,
    StoredSession, StoredSubscription, StoredWill,
};
use crate::session::{Awaiting, Inflight, Session, SessionKind, SessionState};
use crate::subscriptions::Subscription;

/// Intervals this long or longer arm no timer (as for live sessions): the session or will
/// waits until the broker stops, so its remaining time is not counted down either.
const NEVER_SECS: u32 = 365 * 24 * 3600;

/// What [`Broker::restore`](crate::Broker::restore) put back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RestoreSummary {
    /// Retained messages restored.
    pub retained: usize,
    /// Sessions of network clients restored.
    pub sessions: usize,
    /// Persistent sessions of in-process clients restored (waiting for their client).
    pub local_sessions: usize,
    /// Sessions not restored: their client id was already in use, or `max_session_expiry` is
    /// now 0.
    pub skipped_sessions: usize,
    /// Delayed wills that were due and were published by the restore.
    pub wills_published: usize,
}

/// Builds the message table, storing each shared message once.
struct MessageTable {
    messages: Vec<StoredMessage>,
    index: HashMap<*const Message, u32>,
    now: Instant,
}

impl MessageTable {
    fn stored(&self, message: &Message) -> StoredMessage {
        StoredMessage {
            seq: message.seq,
            topic: message.topic.clone(),
            payload: message.payload.clone(),
            qos: message.qos,
            retain: message.retain,
            // Expiry becomes what remains of it now.
            properties: message.properties_at(self.now),
        }
    }

    fn push(&mut self, stored: StoredMessage) -> u32 {
        let index = u32::try_from(self.messages.len()).unwrap_or(u32::MAX);
        self.messages.push(stored);
        index
    }

    fn shared(&mut self, message: &Arc<Message>) -> u32 {
        let key = Arc::as_ptr(message);
        if let Some(&index) = self.index.get(&key) {
            return index;
        }
        let index = self.push(self.stored(message));
        self.index.insert(key, index);
        index
    }

    fn delivery(&mut self, delivery: &Delivery) -> StoredDelivery {
        StoredDelivery {
            message: self.shared(&delivery.message),
            qos: delivery.qos,
            retain: delivery.retain,
            subscription_ids: delivery.subscription_ids.clone(),
        }
    }
}

/// Copy what persistence keeps out of `shared`. Locks each session briefly, one at a time.
pub(crate) fn snapshot(shared: &Shared) -> Snapshot {
    let now = Instant::now();
    let saved_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let mut table = MessageTable {
        messages: Vec::new(),
        index: HashMap::new(),
        now,
    };

    let mut retained_messages = Vec::new();
    // `#` does not match topics starting with `$`: exactly what is meant to stay behind.
    shared.retained.lock().for_each_match("#", |_, message| {
        retained_messages.push(Arc::clone(message))
    });
    let mut retained = Vec::with_capacity(retained_messages.len());
    for message in &retained_messages {
        if !message.is_expired(now) {
            retained.push(table.shared(message));
        }
    }

    let mut sessions: Vec<Arc<Session>> = shared.sessions.lock().values().cloned().collect();
    sessions.sort_by(|a, b| a.client_id.cmp(&b.client_id));
    let mut stored_sessions = Vec::new();
    let mut unreported = 0usize;
    for session in &sessions {
        let taken = match session.kind() {
            SessionKind::Network => {
                stored_session(session, &mut table, shared.config.queue_qos0_messages)
            }
            SessionKind::Local => {
                stored_local_session(session, &mut table, shared.config.queue_qos0_messages)
            }
        };
        match taken {
            Taken::Stored(stored) => stored_sessions.push(*stored),
            Taken::Unreported => unreported += 1,
            Taken::NotPersistent => {}
        }
    }
    if unreported > 0 {
        tracing::warn!(
            sessions = unreported,
            "Sessions not saved: their connection did not report its settings."
        );
    }

    Snapshot {
        saved_at,
        // Read last: every message taken above was numbered before this.
        last_seq: shared.last_seq(),
        messages: table.messages,
        retained,
        sessions: stored_sessions,
    }
}

/// What became of one session in a snapshot.
enum Taken {
    Stored(Box<StoredSession>),
    /// Clean, or its expiry has run out.
    NotPersistent,
    /// Its settings (expiry, subscription options) were never reported.
    Unreported,
}

fn stored_session(session: &Session, table: &mut MessageTable, queue_qos0: bool) -> Taken {
    let info = *session.persistence.lock();
    let Some(connection) = info.connection else {
        return Taken::Unreported;
    };
    if connection.session_expiry == 0 {
        return Taken::NotPersistent;
    }
    let offline_for = if session.is_online() {
        Duration::ZERO
    } else {
        info.offline_since.map_or(Duration::ZERO, |since| {
            table.now.saturating_duration_since(since)
        })
    };
    let Some(expiry) = remaining(connection.session_expiry, offline_for) else {
        return Taken::NotPersistent;
    };

    let state = session.state.lock();
    let Some(subscriptions) = stored_subscriptions(&state) else {
        return Taken::Unreported;
    };

    let queue = stored_queue(&state, table, queue_qos0);
    // Inflight messages are kept even when expired: the client has them and the flow must end.
    let inflight = state
        .inflight
        .iter()
        .map(|entry| StoredInflight {
            packet_id: entry.packet_id,
            stage: match entry.stage {
                Awaiting::Ack => InflightStage::AwaitingPuback,
                Awaiting::Rec => InflightStage::AwaitingPubrec,
                Awaiting::Comp => InflightStage::AwaitingPubcomp,
            },
            delivery: table.delivery(&entry.delivery),
        })
        .collect();
    let will = state.pending_will.as_deref().map(|will| {
        let delay = connection.will_delay.min(connection.session_expiry);
        StoredWill {
            message: table.push(table.stored(will)),
            // An overdue will (its timer was stopped by shutdown) is due at once.
            delay: remaining(delay, offline_for).unwrap_or(0),
        }
    });

    Taken::Stored(Box::new(StoredSession {
        client_id: session.client_id.clone(),
        protocol: connection.protocol,
        expiry,
        next_packet_id: state.next_packet_id(),
        subscriptions,
        queue,
        inflight,
        awaiting_release: state.awaiting_release.clone(),
        will,
        local: None,
    }))
}

/// Subscribes a restored session to its saved filters (routing and the session's own record);
/// a filter that is no longer valid is skipped with a warning.
fn restore_subscriptions(shared: &Shared, session: &Arc<Session>, stored: &StoredSession) {
    for subscription in &stored.subscriptions {
        if !Shared::filter_is_valid(&subscription.filter) {
            tracing::warn!(
                client_id = %stored.client_id,
                filter = %subscription.filter,
                "Saved subscription with an invalid filter skipped."
            );
            continue;
        }
        let live = Subscription {
            options: subscription.options,
            identifier: subscription.identifier,
        };
        shared.subscribe(session, &subscription.filter, live);
    }
}

/// The session's subscriptions by filter; `None` while one's options are not known.
fn stored_subscriptions(state: &SessionState) -> Option<Vec<StoredSubscription>> {
    let mut subscriptions = Vec::new();
    for (filter, subscription) in state.subscriptions.iter() {
        let subscription = subscription?;
        subscriptions.push(StoredSubscription {
            filter: filter.to_owned(),
            options: subscription.options,
            identifier: subscription.identifier,
        });
    }
    subscriptions.sort_by(|a, b| a.filter.cmp(&b.filter));
    Some(subscriptions)
}

/// The session's queue as a restored session keeps it: restored sessions wait offline, so QoS
/// 0 is kept only where an offline session keeps it, and expired messages go.
fn stored_queue(
    state: &SessionState,
    table: &mut MessageTable,
    queue_qos0: bool,
) -> Vec<StoredDelivery> {
    let now = table.now;
    state
        .queue
        .iter()
        .filter(|delivery| queue_qos0 || delivery.qos != QoS::AtMostOnce)
        .filter(|delivery| !delivery.message.is_expired(now))
        .map(|delivery| table.delivery(delivery))
        .collect()
}

/// The persistent session of an in-process client: subscriptions, queue, and what its client
/// took and did not acknowledge. Taken whether or not a client is attached: after a crash,
/// what the client held uncommitted must come back.
fn stored_local_session(session: &Session, table: &mut MessageTable, queue_qos0: bool) -> Taken {
    let state = session.state.lock();
    let Some(acks) = state.local.as_deref() else {
        return Taken::NotPersistent;
    };
    let Some(subscriptions) = stored_subscriptions(&state) else {
        return Taken::Unreported;
    };
    // Handed-out messages are kept even when expired (as inflight ones are): the client had
    // them and may not have finished with them.
    let queue = stored_queue(&state, table, queue_qos0);
    let unacknowledged = acks
        .pending()
        .map(|delivery| table.delivery(delivery))
        .collect();
    Taken::Stored(Box::new(StoredSession {
        client_id: session.client_id.clone(),
        protocol: polyhub_mqtt::ProtocolVersion::V5,
        expiry: u32::MAX,
        next_packet_id: 1,
        subscriptions,
        queue,
        inflight: Vec::new(),
        awaiting_release: Vec::new(),
        will: None,
        local: Some(StoredLocal {
            max_queued: u32::try_from(session.max_queued()).unwrap_or(u32::MAX),
            unacknowledged,
        }),
    }))
}

/// What remains of an interval of `secs` after `elapsed`; `None` once it has run out.
/// Intervals that arm no timer do not run down.
fn remaining(secs: u32, elapsed: Duration) -> Option<u32> {
    if secs >= NEVER_SECS {
        return Some(secs);
    }
    let elapsed = u32::try_from(elapsed.as_secs()).unwrap_or(u32::MAX);
    // Whole seconds elapsed, so what remains is rounded up.
    secs.checked_sub(elapsed).filter(|&left| left > 0)
}

/// Put `snapshot` back into `shared`: retained messages replace those on the same topics;
/// sessions are added disconnected, with their expiry and will timers started now.
pub(crate) fn restore(
    shared: &Arc<Shared>,
    snapshot: Snapshot,
) -> Result<RestoreSummary, BrokerError> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(BrokerError::InvalidRequest(
            "restoring a snapshot needs a tokio runtime (for the session timers)".into(),
        ));
    }
    snapshot
        .check()
        .map_err(|error| BrokerError::InvalidRequest(format!("inconsistent snapshot: {error}")))?;
    // Numbers from now on are above every number of the saved run, so they stay unique.
    let highest_saved = snapshot
        .messages
        .iter()
        .map(|stored| stored.seq)
        .fold(snapshot.last_seq, u64::max);
    shared.seq_above(highest_saved);
    let messages: Vec<Arc<Message>> = snapshot
        .messages
        .iter()
        .map(|stored| Arc::new(message(shared, stored)))
        .collect();
    let mut summary = RestoreSummary::default();

    {
        let mut store = shared.retained.lock();
        for &index in &snapshot.retained {
            let message = &messages[index as usize];
            // A decoded file has valid topics; a snapshot built by hand may not.
            if !message.payload.is_empty() && topic::validate_topic_name(&message.topic).is_ok() {
                store.insert(&message.topic, Arc::clone(message));
                summary.retained += 1;
            }
        }
    }

    let mut due_wills = Vec::new();
    for stored in snapshot.sessions {
        if let Some(local) = &stored.local {
            if restore_local(shared, &stored, local, &messages) {
                summary.local_sessions += 1;
            } else {
                summary.skipped_sessions += 1;
            }
            continue;
        }
        let expiry = shared
            .config
            .max_session_expiry
            .map_or(stored.expiry, |cap| stored.expiry.min(cap));
        if expiry == 0 {
            summary.skipped_sessions += 1;
            continue;
        }
        let Some(session) = register(shared, &stored.client_id) else {
            tracing::warn!(
                client_id = %stored.client_id,
                "Saved session not restored: the client id is already in use."
            );
            summary.skipped_sessions += 1;
            continue;
        };
        restore_subscriptions(shared, &session, &stored);
        let will_delay = stored
            .will
            .as_ref()
            .map_or(0, |will| will.delay.min(expiry));
        let epoch = {
            let mut state = session.state.lock();
            state.queue = stored
                .queue
                .iter()
                .map(|delivery| self::delivery(delivery, &messages))
                .collect();
            state.inflight = stored
                .inflight
                .iter()
                .map(|entry| Inflight {
                    packet_id: entry.packet_id,
                    stage: match entry.stage {
                        InflightStage::AwaitingPuback => Awaiting::Ack,
                        InflightStage::AwaitingPubrec => Awaiting::Rec,
                        InflightStage::AwaitingPubcomp => Awaiting::Comp,
                    },
                    delivery: self::delivery(&entry.delivery, &messages),
                })
                .collect();
            state.awaiting_release = stored.awaiting_release;
            state.set_next_packet_id(stored.next_packet_id);
            if let Some(will) = &stored.will {
                // Its own copy: a pending will is owned by its session, not shared.
                let message = message(shared, &snapshot.messages[will.message as usize]);
                if will_delay == 0 {
                    due_wills.push((session.client_id.clone(), message));
                } else {
                    state.pending_will = Some(Box::new(message));
                }
            }
            state.detach_epoch
        };
        session.record_connection(stored.protocol, expiry, will_delay);
        session.set_online(false);
        if will_delay > 0 && will_delay < NEVER_SECS {
            spawn_will_timer(
                Arc::clone(shared),
                Arc::clone(&session),
                epoch,
                Duration::from_secs(u64::from(will_delay)),
            );
        }
        if expiry < NEVER_SECS {
            spawn_expiry_timer(
                Arc::clone(shared),
                session,
                epoch,
                Duration::from_secs(u64::from(expiry)),
            );
        }
        summary.sessions += 1;
    }

    // Published once every session is back, so restored subscribers get them too.
    for (client_id, will) in due_wills {
        tracing::debug!(%client_id, "Saved will was due: publishing it.");
        shared.publish(will);
        summary.wills_published += 1;
    }
    shared.refresh_gauges();
    Ok(summary)
}

/// Put back the persistent session of an in-process client, waiting for its client to
/// attach (`Broker::local_client_persistent`); it never expires. Returns whether it was
/// restored (not if its client id is in use).
fn restore_local(
    shared: &Shared,
    stored: &StoredSession,
    local: &StoredLocal,
    messages: &[Arc<Message>],
) -> bool {
    let pending: VecDeque<Delivery> = local
        .unacknowledged
        .iter()
        .map(|delivery| self::delivery(delivery, messages))
        .collect();
    let session = {
        let mut sessions = shared.sessions.lock();
        if sessions.contains_key(&stored.client_id) {
            tracing::warn!(
                client_id = %stored.client_id,
                "Saved in-process session not restored: the client id is already in use."
            );
            return false;
        }
        let session = Arc::new(Session::new_local_persistent(
            shared.next_session_id(),
            stored.client_id.clone(),
            local.max_queued as usize,
            pending,
            &shared.config,
        ));
        sessions.insert(stored.client_id.clone(), Arc::clone(&session));
        session
    };
    restore_subscriptions(shared, &session, stored);
    session.state.lock().queue = stored
        .queue
        .iter()
        .map(|delivery| self::delivery(delivery, messages))
        .collect();
    true
}

/// A new, disconnected network session for `client_id`; `None` if the id is in use.
fn register(shared: &Shared, client_id: &str) -> Option<Arc<Session>> {
    let mut sessions = shared.sessions.lock();
    if sessions.contains_key(client_id) {
        return None;
    }
    let session = Arc::new(Session::new(
        shared.next_session_id(),
        client_id.to_owned(),
        SessionKind::Network,
        shared.config.max_queued_messages,
    ));
    sessions.insert(client_id.to_owned(), Arc::clone(&session));
    Some(session)
}

/// A live message from a stored one; its expiry counts from now. It keeps its sequence
/// number, so a redelivery after the restart is recognised as one; a message saved without
/// one (format version 1) gets a new one.
fn message(shared: &Shared, stored: &StoredMessage) -> Message {
    let mut message = Message::new(
        stored.topic.clone(),
        stored.payload.clone(),
        stored.qos,
        stored.retain,
        BROKER_PUBLISHER,
        stored.properties.clone(),
    );
    message.seq = if stored.seq == 0 {
        shared.next_seq()
    } else {
        stored.seq
    };
    message
}

fn delivery(stored: &StoredDelivery, messages: &[Arc<Message>]) -> Delivery {
    Delivery {
        message: Arc::clone(&messages[stored.message as usize]),
        qos: stored.qos,
        retain: stored.retain,
        subscription_ids: stored.subscription_ids.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_rounds_up_and_runs_out() {
        assert_eq!(remaining(10, Duration::from_millis(3500)), Some(7));
        assert_eq!(remaining(10, Duration::ZERO), Some(10));
        assert_eq!(remaining(10, Duration::from_secs(10)), None);
        assert_eq!(remaining(10, Duration::from_secs(11)), None);
        assert_eq!(
            remaining(u32::MAX, Duration::from_secs(1000)),
            Some(u32::MAX)
        );
        assert_eq!(
            remaining(NEVER_SECS, Duration::from_secs(5)),
            Some(NEVER_SECS)
        );
    }
}
