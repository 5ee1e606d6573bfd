//! In-process clients: a session without a socket.
//!
//! A [`LocalClient`] publishes straight into routing (no encoding, no copy of the payload) and
//! receives from its session's queue, which is bounded like any other
//! (`max_queued_messages`, with the same queue-full policy), or unbounded
//! ([`Broker::local_client_with_queue`](crate::Broker::local_client_with_queue) with 0).
//!
//! Two kinds of sessions:
//!
//! - **Plain** ([`Broker::local_client`](crate::Broker::local_client)): acknowledgement is
//!   implicit: a message counts as delivered (and, for QoS 1/2, as acknowledged) the moment
//!   [`LocalClient::recv`] or [`LocalClient::try_recv`] takes it from the queue; nothing is
//!   redelivered, and the session ends with the client. QoS then only matters to the other
//!   sessions a local client publishes to (an offline persistent session keeps QoS 1/2
//!   messages, not QoS 0 ones).
//! - **Persistent**
//!   ([`Broker::local_client_persistent`](crate::Broker::local_client_persistent)): the
//!   session outlives its client and is saved in the broker's snapshot like a network
//!   client's persistent session. A QoS 1/2 message taken from it carries a token and stays
//!   the session's until [`LocalClient::ack`]: the next client to attach (after a restart
//!   too) gets it again first, marked redelivered, with its original `seq`. This is what lets
//!   a consumer acknowledge only what it has committed (the hub's parsers do), and what makes
//!   that survive a restart of the program.
//!
//! Design: the acknowledgement state lives in the session (`session::LocalAcks`), under the
//! same lock as the queue, so a snapshot sees queue and unacknowledged messages consistently.

use std::sync::Arc;

use bytes::Bytes;
use polyhub_mqtt::{QoS, SubscriptionOptions, topic};
use tokio::time::Instant;

use crate::broker::Shared;
use crate::error::BrokerError;
use crate::message::{Delivery, Message, MessageProperties};
use crate::session::Session;
use crate::subscriptions::Subscription;

/// An in-process MQTT client: publishes and subscribes through the broker's routing without a
/// socket. Dropping it ends its session, unless the session is persistent (then the client
/// only detaches from it).
#[derive(Debug)]
pub struct LocalClient {
    shared: Arc<Shared>,
    session: Arc<Session>,
    /// Whether an existing session was resumed.
    present: bool,
    /// Set by [`LocalClient::end_session`]: a persistent session ends with this client too.
    end_on_drop: bool,
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
    /// What to pass to [`LocalClient::ack`] once the message is processed: non-zero for QoS
    /// 1/2 messages of a persistent session, 0 when nothing needs acknowledging.
    pub token: u64,
    /// Whether it was handed out before (to this or an earlier client of the session) and not
    /// acknowledged then.
    pub redelivered: bool,
}

impl LocalClient {
    pub(crate) fn new(shared: Arc<Shared>, session: Arc<Session>, present: bool) -> LocalClient {
        LocalClient {
            shared,
            session,
            present,
            end_on_drop: false,
        }
    }

    /// Whether this client resumed an existing persistent session (with its subscriptions,
    /// queue and unacknowledged messages) rather than starting a new one.
    pub fn session_present(&self) -> bool {
        self.present
    }

    /// Whether this client's session is persistent (see
    /// [`Broker::local_client_persistent`](crate::Broker::local_client_persistent)).
    pub fn is_persistent(&self) -> bool {
        self.session.state.lock().local.is_some()
    }

    /// Acknowledge messages taken from a persistent session, by their
    /// [`LocalMessage::token`]: the session forgets them. Tokens of 0, unknown or already
    /// acknowledged are ignored (tokens are never reused within a session). Works after
    /// [`Broker::close_network`](crate::Broker::close_network) and after shutdown, so that a
    /// consumer can acknowledge what it committed while the program stops.
    pub fn ack(&self, tokens: &[u64]) {
        let mut state = self.session.state.lock();
        if let Some(acks) = state.local.as_deref_mut() {
            for token in tokens {
                acks.unacked.remove(token);
            }
        }
    }

    /// Hand everything taken from a persistent session and not acknowledged out again,
    /// before anything else and marked redelivered (for a consumer that restarts without
    /// detaching). Nothing to do for a plain session.
    pub fn redeliver_unacknowledged(&self) {
        let mut state = self.session.state.lock();
        let pending = match state.local.as_deref_mut() {
            Some(acks) => {
                acks.redeliver_unacked();
                !acks.redeliver.is_empty()
            }
            None => false,
        };
        drop(state);
        if pending {
            self.session.notify.notify_one();
        }
    }

    /// End this client's session for good, persistent or not: subscriptions, queue and
    /// unacknowledged messages go.
    pub fn end_session(mut self) {
        self.end_on_drop = true;
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
        if self.shared.local_shutdown.is_cancelled() {
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
        if self.shared.local_shutdown.is_cancelled() {
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
        if self.shared.local_shutdown.is_cancelled() {
            return Err(BrokerError::Closed);
        }
        self.shared.unsubscribe(&self.session, filter);
        Ok(())
    }

    /// The next delivered message; `None` once the broker has shut down and the queue is
    /// empty. Cancel safe: nothing is taken while it waits. Taking a message from a plain
    /// session acknowledges it; from a persistent one, see [`LocalClient::ack`].
    pub async fn recv(&mut self) -> Option<LocalMessage> {
        loop {
            if let Some(message) = self.try_recv() {
                return Some(message);
            }
            if self.shared.local_shutdown.is_cancelled() {
                return None;
            }
            tokio::select! {
                () = self.session.notify.notified() => {}
                () = self.shared.local_shutdown.cancelled() => {}
            }
        }
    }

    /// The next delivered message if one is queued, without waiting. A persistent session
    /// hands out its redeliveries first.
    pub fn try_recv(&mut self) -> Option<LocalMessage> {
        let now = Instant::now();
        let mut state = self.session.state.lock();
        let state = &mut *state;
        if let Some(acks) = state.local.as_deref_mut()
            && let Some(delivery) = acks.redeliver.pop_front()
        {
            // Handed out before: given again even if it has expired since (as a network
            // session resends what is in flight), the client may not have finished with it.
            let token = acks.hand_out(&delivery);
            return Some(local_message(&delivery, now, token, true));
        }
        loop {
            let delivery = state.queue.pop_front()?;
            self.session.taken(state.queue.len());
            if delivery.message.is_expired(now) {
                continue;
            }
            let token = match state.local.as_deref_mut() {
                Some(acks) => acks.hand_out(&delivery),
                None => 0,
            };
            return Some(local_message(&delivery, now, token, false));
        }
    }
}

/// What a client sees of `delivery`.
fn local_message(delivery: &Delivery, now: Instant, token: u64, redelivered: bool) -> LocalMessage {
    let message = &delivery.message;
    LocalMessage {
        topic: message.topic.clone(),
        payload: message.payload.clone(),
        qos: delivery.qos,
        retain: delivery.retain,
        properties: message.properties_at(now),
        seq: message.seq,
        token,
        redelivered,
    }
}

impl Drop for LocalClient {
    fn drop(&mut self) {
        let detached = !self.end_on_drop && {
            let mut state = self.session.state.lock();
            match state.local.as_deref_mut() {
                Some(acks) => {
                    // The session stays; what this client did not acknowledge goes to the
                    // next one first.
                    acks.attached = false;
                    acks.redeliver_unacked();
                    true
                }
                None => false,
            }
        };
        self.session.set_online(false);
        if detached {
            return;
        }
        self.session.state.lock().local = None;
        self.shared.unregister_session(&self.session);
        self.shared.end_session(&self.session);
    }
}
