//! In-process clients: a session without a socket.
//!
//! A [`LocalClient`] publishes straight into routing (no encoding, no copy of the payload) and
//! receives from its session's queue, which is bounded like any other
//! (`max_queued_messages`, with the same queue-full policy), or unbounded
//! ([`Broker::local_client_with_queue`](crate::Broker::local_client_with_queue) with 0).
//!
//! Acknowledgement is implicit: a message counts as delivered (and, for QoS 1/2, as
//! acknowledged) the moment [`LocalClient::recv`] or [`LocalClient::try_recv`] takes it from
//! the queue; nothing is in flight and nothing is redelivered. A consumer that must only
//! acknowledge what it has processed keeps the taken messages itself until then (the hub's
//! bus adapter does). QoS therefore only matters to the other sessions a local client
//! publishes to (an offline persistent session keeps QoS 1/2 messages, not QoS 0 ones).

use std::sync::Arc;

use bytes::Bytes;
use polyhub_mqtt::{QoS, SubscriptionOptions, topic};
use tokio::time::Instant;

use crate::broker::Shared;
use crate::error::BrokerError;
use crate::message::{Message, MessageProperties};
use crate::session::Session;
use crate::subscriptions::Subscription;

/// An in-process MQTT client: publishes and subscribes through the broker's routing without a
/// socket. Dropping it ends its session.
#[derive(Debug)]
pub struct LocalClient {
    shared: Arc<Shared>,
    session: Arc<Session>,
}

/// A message delivered to a [`LocalClient`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalMessage {
    /// Topic it was published on.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// Delivery QoS.
    pub qos: QoS,
    /// Whether it came from the retained store (or was published retained and the
    /// subscription asked for retain-as-published).
    pub retain: bool,
    /// MQTT 5 properties from the publisher (empty for 3.x publishers).
    pub properties: MessageProperties,
    /// The broker's unique number for the message: assigned once when it was routed, the same
    /// for every subscriber and for retained replays, increasing per publisher, and unique
    /// across restarts of a broker that persists its state.
    pub seq: u64,
}

impl LocalClient {
    pub(crate) fn new(shared: Arc<Shared>, session: Arc<Session>) -> LocalClient {
        LocalClient { shared, session }
    }

    /// This client's id.
    pub fn client_id(&self) -> &str {
        &self.session.client_id
    }

    /// Publish a message.
    pub async fn publish(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
        qos: QoS,
        retain: bool,
    ) -> Result<(), BrokerError> {
        self.publish_now(
            topic,
            payload.into(),
            qos,
            retain,
            MessageProperties::default(),
        )
        .map(|_| ())
    }

    /// Publish a message with MQTT 5 properties (user properties, content type, expiry, ...).
    pub async fn publish_with_properties(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
        qos: QoS,
        retain: bool,
        properties: MessageProperties,
    ) -> Result<(), BrokerError> {
        self.publish_now(topic, payload.into(), qos, retain, properties)
            .map(|_| ())
    }

    /// Publish without awaiting anything (routing never waits); returns how many sessions the
    /// message matched. For hot loops that publish many messages.
    pub fn publish_now(
        &self,
        topic: &str,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        properties: MessageProperties,
    ) -> Result<usize, BrokerError> {
        if self.shared.shutdown.is_cancelled() {
            return Err(BrokerError::Closed);
        }
        topic::validate_topic_name(topic)
            .map_err(|error| BrokerError::InvalidRequest(format!("topic {topic:?}: {error}")))?;
        Ok(self.shared.publish(Message::new(
            topic.to_owned(),
            payload,
            qos,
            retain,
            self.session.id,
            properties,
        )))
    }

    /// Subscribe to a topic filter (`$share/{group}/{filter}` included). Matching retained
    /// messages are queued for [`LocalClient::recv`] at once.
    pub async fn subscribe(&self, filter: &str, qos: QoS) -> Result<(), BrokerError> {
        self.subscribe_with_options(
            filter,
            SubscriptionOptions {
                qos,
                ..SubscriptionOptions::default()
            },
        )
        .await
    }

    /// Subscribe with full MQTT 5 options (no local, retain as published, retain handling).
    pub async fn subscribe_with_options(
        &self,
        filter: &str,
        options: SubscriptionOptions,
    ) -> Result<(), BrokerError> {
        if self.shared.shutdown.is_cancelled() {
            return Err(BrokerError::Closed);
        }
        let is_shared = topic::parse_shared(filter)
            .map_err(|error| BrokerError::InvalidRequest(format!("filter {filter:?}: {error}")))?
            .is_some();
        topic::validate_topic_filter(filter)
            .map_err(|error| BrokerError::InvalidRequest(format!("filter {filter:?}: {error}")))?;
        let subscription = Subscription {
            options,
            identifier: None,
        };
        let is_new = self.shared.subscribe(&self.session, filter, subscription);
        let send_retained = match options.retain_handling {
            polyhub_mqtt::RetainHandling::SendAtSubscribe => true,
            polyhub_mqtt::RetainHandling::SendIfNewSubscription => is_new,
            polyhub_mqtt::RetainHandling::DoNotSend => false,
        };
        if send_retained && !is_shared {
            let deliveries = self.shared.retained_for(filter, &subscription);
            self.session.enqueue_unbounded(deliveries);
        }
        Ok(())
    }

    /// Remove a subscription.
    pub async fn unsubscribe(&self, filter: &str) -> Result<(), BrokerError> {
        if self.shared.shutdown.is_cancelled() {
            return Err(BrokerError::Closed);
        }
        self.shared.unsubscribe(&self.session, filter);
        Ok(())
    }

    /// The next delivered message; `None` once the broker has shut down and the queue is
    /// empty. Taking it acknowledges it (see the module documentation).
    pub async fn recv(&mut self) -> Option<LocalMessage> {
        loop {
            if let Some(message) = self.try_recv() {
                return Some(message);
            }
            if self.shared.shutdown.is_cancelled() {
                return None;
            }
            tokio::select! {
                () = self.session.notify.notified() => {}
                () = self.shared.shutdown.cancelled() => {}
            }
        }
    }

    /// The next delivered message if one is queued, without waiting.
    pub fn try_recv(&mut self) -> Option<LocalMessage> {
        let now = Instant::now();
        loop {
            let delivery = self.session.state.lock().queue.pop_front()?;
            if delivery.message.is_expired(now) {
                continue;
            }
            let message = &delivery.message;
            return Some(LocalMessage {
                topic: message.topic.clone(),
                payload: message.payload.clone(),
                qos: delivery.qos,
                retain: delivery.retain,
                properties: message.properties_at(now),
                seq: message.seq,
            });
        }
    }
}

impl Drop for LocalClient {
    fn drop(&mut self) {
        self.session.set_online(false);
        self.shared.unregister_session(&self.session);
        self.shared.end_session(&self.session);
    }
}
