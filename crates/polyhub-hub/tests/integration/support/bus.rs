//! An in-memory broker implementing the hub's bus traits, with persistent sessions:
//! subscriptions survive a disconnect, and messages received but not acknowledged are delivered
//! again (same seq, `redelivered = true`) to the next client with the same id.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::Mutex;
use polyhub_hub::bus::{
    AckToken, BusClient, BusConnector, BusError, BusMessage, Outgoing, Routing,
};
use tokio::sync::Notify;

#[derive(Debug, Clone)]
struct Delivery {
    topic: String,
    payload: Bytes,
    seq: u64,
    redelivered: bool,
    response_topic: Option<String>,
    correlation_data: Option<Bytes>,
}

#[derive(Debug)]
struct Session {
    persistent: bool,
    generation: u64,
    filters: BTreeSet<String>,
    queue: VecDeque<Delivery>,
    inflight: BTreeMap<u64, Delivery>,
    notify: Arc<Notify>,
}

#[derive(Debug, Default)]
struct State {
    sessions: HashMap<String, Session>,
    next_seq: u64,
    next_token: u64,
    next_generation: u64,
    /// Everything clients published, in order.
    published: Vec<Outgoing>,
    refused_filters: HashSet<String>,
    /// Clients whose next `ack` fails (as if the connection died just before it).
    failing_acks: HashSet<String>,
}

/// The fake broker. Clones share it.
#[derive(Debug, Clone, Default)]
pub(crate) struct FakeBus {
    state: Arc<Mutex<State>>,
}

/// MQTT topic filter matching (`+` one level, `#` the rest).
pub(crate) fn filter_matches(filter: &str, topic: &str) -> bool {
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        match (level, topic_levels.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (expected, Some(actual)) if expected == actual => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

impl FakeBus {
    pub(crate) fn new() -> Self {
        FakeBus::default()
    }

    fn route(state: &mut State, delivery_of: impl Fn(u64) -> Delivery) -> u64 {
        state.next_seq += 1;
        let seq = state.next_seq;
        let delivery = delivery_of(seq);
        for session in state.sessions.values_mut() {
            if session
                .filters
                .iter()
                .any(|filter| filter_matches(filter, &delivery.topic))
            {
                session.queue.push_back(delivery.clone());
                session.notify.notify_one();
            }
        }
        seq
    }

    /// Publishes as a device would (QoS 1); returns the seq.
    pub(crate) fn publish(&self, topic: &str, payload: impl Into<Bytes>) -> u64 {
        self.publish_request(topic, payload, None, None)
    }

    /// Publishes with MQTT 5 response topic and correlation data.
    pub(crate) fn publish_request(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
        response_topic: Option<&str>,
        correlation_data: Option<Bytes>,
    ) -> u64 {
        let payload = payload.into();
        let mut state = self.state.lock();
        Self::route(&mut state, |seq| Delivery {
            topic: topic.to_owned(),
            payload: payload.clone(),
            seq,
            redelivered: false,
            response_topic: response_topic.map(str::to_owned),
            correlation_data: correlation_data.clone(),
        })
    }

    /// What clients published on `topic`, oldest first.
    pub(crate) fn published_on(&self, topic: &str) -> Vec<Outgoing> {
        self.state
            .lock()
            .published
            .iter()
            .filter(|out| out.topic == topic)
            .cloned()
            .collect()
    }

    /// Waits until clients published at least `count` messages on `topic`.
    pub(crate) async fn wait_published(&self, topic: &str, count: usize) -> Vec<Outgoing> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let found = self.published_on(topic);
            if found.len() >= count {
                return found;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {count} publications on {topic} (got {found:?})"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The filters of a session.
    pub(crate) fn subscriptions(&self, client_id: &str) -> BTreeSet<String> {
        self.state
            .lock()
            .sessions
            .get(client_id)
            .map(|session| session.filters.clone())
            .unwrap_or_default()
    }

    /// Adds a filter to a session behind its client's back (a stale persistent subscription).
    pub(crate) fn force_subscribe(&self, client_id: &str, filter: &str) {
        if let Some(session) = self.state.lock().sessions.get_mut(client_id) {
            session.filters.insert(filter.to_owned());
        }
    }

    /// Messages of a session not yet acknowledged (queued or in flight).
    pub(crate) fn unacknowledged(&self, client_id: &str) -> usize {
        self.state
            .lock()
            .sessions
            .get(client_id)
            .map_or(0, |session| session.queue.len() + session.inflight.len())
    }

    /// Makes the next `ack` of `client_id` fail with `Closed`, acknowledging nothing.
    pub(crate) fn fail_next_ack(&self, client_id: &str) {
        self.state.lock().failing_acks.insert(client_id.to_owned());
    }

    /// Makes subscriptions to `filter` fail with `Refused`.
    pub(crate) fn refuse_filter(&self, filter: &str) {
        self.state.lock().refused_filters.insert(filter.to_owned());
    }
}

#[async_trait]
impl BusConnector for FakeBus {
    async fn connect(
        &self,
        client_id: &str,
        persistent: bool,
    ) -> Result<Box<dyn BusClient>, BusError> {
        let mut state = self.state.lock();
        state.next_generation += 1;
        let generation = state.next_generation;
        let resumed = state
            .sessions
            .get_mut(client_id)
            .filter(|session| persistent && session.persistent);
        let notify = match resumed {
            Some(session) => {
                session.generation = generation;
                let inflight = std::mem::take(&mut session.inflight);
                for mut delivery in inflight.into_values().rev() {
                    delivery.redelivered = true;
                    session.queue.push_front(delivery);
                }
                // Wakes a taken-over client so that it notices.
                session.notify.notify_waiters();
                session.notify.notify_one();
                session.notify.clone()
            }
            None => {
                let notify = Arc::new(Notify::new());
                state.sessions.insert(
                    client_id.to_owned(),
                    Session {
                        persistent,
                        generation,
                        filters: BTreeSet::new(),
                        queue: VecDeque::new(),
                        inflight: BTreeMap::new(),
                        notify: notify.clone(),
                    },
                );
                notify
            }
        };
        Ok(Box::new(FakeClient {
            bus: self.clone(),
            client_id: client_id.to_owned(),
            generation,
            notify,
        }))
    }
}

#[derive(Debug)]
pub(crate) struct FakeClient {
    bus: FakeBus,
    client_id: String,
    generation: u64,
    notify: Arc<Notify>,
}

impl FakeClient {
    fn with_session<T>(
        &self,
        apply: impl FnOnce(&mut State, &mut Session) -> T,
    ) -> Result<T, BusError> {
        let mut guard = self.bus.state.lock();
        let state = &mut *guard;
        let mut session = state
            .sessions
            .remove(&self.client_id)
            .ok_or_else(|| BusError::Closed("session gone".into()))?;
        let result = if session.generation == self.generation {
            Ok(apply(state, &mut session))
        } else {
            Err(BusError::Closed("taken over by a newer client".into()))
        };
        state.sessions.insert(self.client_id.clone(), session);
        result
    }
}

#[async_trait]
impl BusClient for FakeClient {
    async fn subscribe(&mut self, filters: &[String]) -> Result<(), BusError> {
        self.with_session(|state, session| {
            if let Some(refused) = filters
                .iter()
                .find(|filter| state.refused_filters.contains(*filter))
            {
                return Err(BusError::Refused(format!("filter {refused} not allowed")));
            }
            session.filters.extend(filters.iter().cloned());
            Ok(())
        })?
    }

    async fn unsubscribe(&mut self, filters: &[String]) -> Result<(), BusError> {
        self.with_session(|_, session| {
            for filter in filters {
                session.filters.remove(filter);
            }
        })
    }

    async fn recv(&mut self) -> Result<Option<BusMessage>, BusError> {
        loop {
            let delivered = self.with_session(|state, session| {
                let delivery = session.queue.pop_front()?;
                state.next_token += 1;
                let token = state.next_token;
                session.inflight.insert(token, delivery.clone());
                Some(BusMessage {
                    topic: delivery.topic,
                    payload: delivery.payload,
                    qos: 1,
                    seq: Some(delivery.seq),
                    redelivered: delivery.redelivered,
                    token: AckToken(token),
                    response_topic: delivery.response_topic,
                    correlation_data: delivery.correlation_data,
                    received_at: polyhub_store::now_millis(),
                })
            })?;
            if let Some(message) = delivered {
                return Ok(Some(message));
            }
            self.notify.notified().await;
        }
    }

    async fn ack(&mut self, tokens: &[AckToken]) -> Result<(), BusError> {
        self.with_session(|state, session| {
            if state.failing_acks.remove(&self.client_id) {
                return Err(BusError::Closed(
                    "injected: connection lost before the ack".into(),
                ));
            }
            for token in tokens {
                session.inflight.remove(&token.0);
            }
            Ok(())
        })?
    }

    async fn publish(&mut self, message: Outgoing) -> Result<Routing, BusError> {
        self.with_session(|_, _| ())?;
        let mut state = self.bus.state.lock();
        state.published.push(message.clone());
        FakeBus::route(&mut state, |seq| Delivery {
            topic: message.topic.clone(),
            payload: message.payload.clone(),
            seq,
            redelivered: false,
            response_topic: None,
            correlation_data: message.correlation_data.clone(),
        });
        // Nothing under test reads it.
        Ok(Routing::Unknown)
    }
}

impl Drop for FakeClient {
    fn drop(&mut self) {
        let mut state = self.bus.state.lock();
        let Some(session) = state.sessions.get_mut(&self.client_id) else {
            return;
        };
        if session.generation != self.generation {
            return;
        }
        if !session.persistent {
            state.sessions.remove(&self.client_id);
            return;
        }
        let inflight = std::mem::take(&mut session.inflight);
        for mut delivery in inflight.into_values().rev() {
            delivery.redelivered = true;
            session.queue.push_front(delivery);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_like_mqtt() {
        assert!(filter_matches("/+/register_cmd", "/h1/register_cmd"));
        assert!(!filter_matches("/+/register_cmd", "/h1/d1/register_cmd"));
        assert!(filter_matches("data/pump/+", "data/pump/t"));
        assert!(filter_matches("a/#", "a/b/c"));
        assert!(!filter_matches("/h1/d1/data", "/h1/d1/data/x"));
    }

    #[tokio::test]
    async fn unacknowledged_messages_are_redelivered_to_the_next_session() {
        let bus = FakeBus::new();
        let mut first = bus.connect("c", true).await.unwrap();
        first.subscribe(&["t".to_owned()]).await.unwrap();
        let seq = bus.publish("t", "x");
        let message = first.recv().await.unwrap().unwrap();
        assert_eq!(message.seq, Some(seq));
        assert!(!message.redelivered);
        drop(first);
        let mut second = bus.connect("c", true).await.unwrap();
        let again = second.recv().await.unwrap().unwrap();
        assert_eq!(again.seq, Some(seq));
        assert!(again.redelivered);
        second.ack(&[again.token]).await.unwrap();
        assert_eq!(bus.unacknowledged("c"), 0);
    }
}
