//! Application messages as the broker routes them, and the per-subscriber deliveries made of
//! them.
//!
//! Design: a message is built once from the publisher's PUBLISH (or will, or `$SYS` update) and
//! shared as an `Arc<Message>` by every subscriber's queue, the inflight maps and the retained
//! store, so the payload is never copied per subscriber. Only the few things that differ per
//! subscriber (granted QoS, retain flag, subscription identifiers) live in a [`Delivery`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use polyhub_mqtt::{LastWill, Properties, Publish, QoS};
use tokio::time::Instant;

/// MQTT 5 properties that travel with a message from its publisher to its subscribers.
///
/// For a message received by a [`LocalClient`](crate::LocalClient), `message_expiry_interval` is
/// what remains of the publisher's interval.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MessageProperties {
    /// 0 unspecified bytes, 1 UTF-8 text.
    pub payload_format_indicator: Option<u8>,
    /// Seconds after which the message is no longer delivered.
    pub message_expiry_interval: Option<u32>,
    /// MIME type of the payload.
    pub content_type: Option<String>,
    /// Topic the receiver should answer on (request/response).
    pub response_topic: Option<String>,
    /// Opaque data that ties a response to its request.
    pub correlation_data: Option<Bytes>,
    /// User properties, in the publisher's order; names may repeat.
    pub user_properties: Vec<(String, String)>,
}

impl MessageProperties {
    /// Whether no property is set.
    pub fn is_empty(&self) -> bool {
        self.payload_format_indicator.is_none()
            && self.message_expiry_interval.is_none()
            && self.content_type.is_none()
            && self.response_topic.is_none()
            && self.correlation_data.is_none()
            && self.user_properties.is_empty()
    }

    /// The forwarded subset of a PUBLISH or will's properties (topic alias, subscription
    /// identifiers and will delay stay behind).
    fn take_from(properties: &mut Properties) -> MessageProperties {
        MessageProperties {
            payload_format_indicator: properties.payload_format_indicator,
            message_expiry_interval: properties.message_expiry_interval,
            content_type: properties.content_type.take(),
            response_topic: properties.response_topic.take(),
            correlation_data: properties.correlation_data.take(),
            user_properties: std::mem::take(&mut properties.user_properties),
        }
    }
}

/// Session id used as the publisher of messages the broker itself creates (`$SYS`); no session
/// ever gets it, so no-local never filters them.
pub(crate) const BROKER_PUBLISHER: u64 = 0;

/// One application message, shared by everyone it is delivered to.
#[derive(Debug)]
pub(crate) struct Message {
    /// Topic name (never empty: aliases are resolved before a message is built).
    pub(crate) topic: String,
    pub(crate) payload: Bytes,
    /// QoS the publisher used; each delivery gets at most this.
    pub(crate) qos: QoS,
    /// Retain flag as published.
    pub(crate) retain: bool,
    /// Id of the publishing session, for no-local.
    pub(crate) publisher: u64,
    /// Forwarded MQTT 5 properties; `None` when there are none (always for 3.x publishers), so
    /// a 3.x message costs one pointer here.
    pub(crate) properties: Option<Box<MessageProperties>>,
    /// When the message expires (MQTT 5 message expiry interval).
    pub(crate) expires_at: Option<Instant>,
    /// The broker's unique number for this message, set by routing when the message enters
    /// it (0 until then); every delivery of it, retained replays and redeliveries included,
    /// carries the same number.
    pub(crate) seq: u64,
}

impl Message {
    /// A message with the given parts; `properties` may be empty.
    pub(crate) fn new(
        topic: String,
        payload: Bytes,
        qos: QoS,
        retain: bool,
        publisher: u64,
        properties: MessageProperties,
    ) -> Message {
        let expires_at = properties
            .message_expiry_interval
            .map(|secs| Instant::now() + Duration::from_secs(u64::from(secs)));
        // A retained message may live for days: give it its own small allocation rather than
        // pinning the (much larger) read buffer its payload was sliced from.
        let payload = if retain && !payload.is_empty() {
            Bytes::copy_from_slice(&payload)
        } else {
            payload
        };
        Message {
            topic,
            payload,
            qos,
            retain,
            publisher,
            properties: (!properties.is_empty()).then(|| Box::new(properties)),
            expires_at,
            seq: 0,
        }
    }

    /// The message a client's PUBLISH carries. The topic must already be resolved.
    /// It takes the parts it keeps out of `publish` (by reference: a `Publish` is large and the
    /// receive path would otherwise copy it whole).
    pub(crate) fn from_publish(publish: &mut Publish, publisher: u64) -> Message {
        let properties = MessageProperties::take_from(&mut publish.properties);
        Message::new(
            std::mem::take(&mut publish.topic),
            std::mem::take(&mut publish.payload),
            publish.qos,
            publish.retain,
            publisher,
            properties,
        )
    }

    /// The message a client's will stands for.
    pub(crate) fn from_will(mut will: LastWill, publisher: u64) -> Message {
        let properties = MessageProperties::take_from(&mut will.properties);
        Message::new(
            will.topic,
            will.payload,
            will.qos,
            will.retain,
            publisher,
            properties,
        )
    }

    /// Whether the message's expiry interval has run out at `now`.
    pub(crate) fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// Seconds of the expiry interval left at `now`, rounded up so a live message never
    /// announces 0.
    pub(crate) fn remaining_expiry(&self, now: Instant) -> Option<u32> {
        self.expires_at.map(|at| {
            let left = at.saturating_duration_since(now);
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            u32::try_from(secs.max(1)).unwrap_or(u32::MAX)
        })
    }

    /// The forwarded properties as a subscriber sees them at `now`.
    pub(crate) fn properties_at(&self, now: Instant) -> MessageProperties {
        let mut properties = self.properties.as_deref().cloned().unwrap_or_default();
        properties.message_expiry_interval = self.remaining_expiry(now);
        properties
    }

    /// The PUBLISH properties for one delivery at `now` (MQTT 5 only).
    pub(crate) fn publish_properties(
        &self,
        now: Instant,
        subscription_identifiers: &[u32],
        topic_alias: Option<u16>,
    ) -> Properties {
        let mut out = Properties {
            message_expiry_interval: self.remaining_expiry(now),
            subscription_identifiers: subscription_identifiers.to_vec(),
            topic_alias,
            ..Properties::default()
        };
        if let Some(forwarded) = self.properties.as_deref() {
            out.payload_format_indicator = forwarded.payload_format_indicator;
            out.content_type.clone_from(&forwarded.content_type);
            out.response_topic.clone_from(&forwarded.response_topic);
            out.correlation_data.clone_from(&forwarded.correlation_data);
            out.user_properties.clone_from(&forwarded.user_properties);
        }
        out
    }
}

/// One message on its way to one session: what differs per subscriber.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    pub(crate) message: Arc<Message>,
    /// min(published QoS, highest granted QoS of the matching subscriptions).
    pub(crate) qos: QoS,
    /// Retain flag to send: set for retained messages sent at subscribe time, otherwise the
    /// published flag if a matching subscription asked for retain-as-published.
    pub(crate) retain: bool,
    /// Identifiers of every matching subscription that has one (MQTT 5).
    pub(crate) subscription_ids: Vec<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn expiry_counts_down_and_never_announces_zero() {
        let properties = MessageProperties {
            message_expiry_interval: Some(10),
            ..MessageProperties::default()
        };
        let message = Message::new(
            "a".into(),
            Bytes::new(),
            QoS::AtMostOnce,
            false,
            1,
            properties,
        );
        let start = Instant::now();
        assert_eq!(message.remaining_expiry(start), Some(10));
        assert_eq!(
            message.remaining_expiry(start + Duration::from_millis(3500)),
            Some(7)
        );
        assert!(!message.is_expired(start + Duration::from_millis(9999)));
        assert!(message.is_expired(start + Duration::from_secs(10)));
    }

    #[test]
    fn messages_without_v5_properties_carry_none() {
        let message = Message::new(
            "a".into(),
            Bytes::from_static(b"x"),
            QoS::AtLeastOnce,
            false,
            1,
            MessageProperties::default(),
        );
        assert!(message.properties.is_none());
        assert!(message.expires_at.is_none());
    }
}
