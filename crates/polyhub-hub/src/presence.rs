//! The presence channel of hub-style devices, as the parser ingests it.
//!
//! With the embedded broker, presence comes from its connection events. An external broker
//! (Mosquitto, EMQX) does not tell polyhub who connects, so devices report it themselves on
//! the `presence` channel (`/{hub}/{device}/presence`): a retained `online` when they connect,
//! and a retained `offline` as their last will (and before a clean disconnect). The parser
//! subscribes that channel next to the data channel of every registered device, and a
//! presence message goes through the batch like telemetry: it counts as an ingested message
//! of its device (no rows, but last-seen), and its presence change is applied after the
//! batch is committed, before it is acknowledged.
//!
//! This lives here rather than in `parser.rs` so that the parser only needs two hooks: the
//! filters of a device ([`device_filters`]) and the classification of a message
//! ([`classify`]).

use std::collections::BTreeSet;

use polyhub_store::{Millis, TelemetryRow};

use crate::bus::BusMessage;
use crate::channels::{ChannelTemplates, parse_presence_payload};

/// What the parser does with a message: rows of a device, or a dead letter (with its device
/// when known) and its reason.
pub(crate) type Classified = Result<(String, Vec<TelemetryRow>), (Option<String>, String)>;

/// A presence change to apply once the batch holding its message is committed.
pub(crate) type PendingPresence = (String, bool, Millis);

/// The filters a hub-style parser subscribes for one device: its data channel and its
/// presence channel.
pub(crate) fn device_filters(
    channels: &ChannelTemplates,
    hub_id: &str,
    device_id: &str,
) -> Vec<String> {
    vec![
        channels.data_topic(hub_id, device_id),
        channels.presence_topic(hub_id, device_id),
    ]
}

/// Classifies `message` if it is on the presence channel of a registered device of
/// `hub_id`, queueing its change in `pending`; `None` for any other topic (the parser's
/// data rules apply).
pub(crate) fn classify(
    channels: &ChannelTemplates,
    hub_id: &str,
    devices: &BTreeSet<String>,
    message: &BusMessage,
    pending: &mut Vec<PendingPresence>,
) -> Option<Classified> {
    let topic = channels.parse_presence_topic(&message.topic)?;
    if topic.hub.is_some_and(|hub| hub != hub_id) || !devices.contains(topic.device) {
        return None;
    }
    let device_id = topic.device.to_owned();
    match parse_presence_payload(&message.payload) {
        Some(online) => {
            pending.push((device_id.clone(), online, message.received_at));
            Some(Ok((device_id, Vec::new())))
        }
        None => Some(Err((
            Some(device_id),
            "presence payload must be \"online\" or \"offline\"".to_owned(),
        ))),
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::bus::AckToken;

    fn message(topic: &str, payload: &'static [u8]) -> BusMessage {
        BusMessage {
            topic: topic.to_owned(),
            payload: Bytes::from_static(payload),
            qos: 1,
            seq: None,
            redelivered: false,
            token: AckToken(1),
            response_topic: None,
            correlation_data: None,
            received_at: 1234,
        }
    }

    fn devices() -> BTreeSet<String> {
        ["d1".to_owned()].into_iter().collect()
    }

    #[test]
    fn a_device_subscribes_its_data_and_presence_channels() {
        assert_eq!(
            device_filters(&ChannelTemplates::default(), "h1", "d1"),
            ["/h1/d1/data", "/h1/d1/presence"]
        );
    }

    #[test]
    fn presence_messages_of_registered_devices_are_queued() {
        let channels = ChannelTemplates::default();
        let mut pending = Vec::new();
        let online = classify(
            &channels,
            "h1",
            &devices(),
            &message("/h1/d1/presence", b"online"),
            &mut pending,
        );
        assert_eq!(online, Some(Ok(("d1".to_owned(), Vec::new()))));
        let offline = classify(
            &channels,
            "h1",
            &devices(),
            &message("/h1/d1/presence", b"offline\n"),
            &mut pending,
        );
        assert_eq!(offline, Some(Ok(("d1".to_owned(), Vec::new()))));
        assert_eq!(
            pending,
            [
                ("d1".to_owned(), true, 1234),
                ("d1".to_owned(), false, 1234)
            ]
        );
    }

    #[test]
    fn a_bad_payload_is_a_dead_letter_of_the_device() {
        let channels = ChannelTemplates::default();
        let mut pending = Vec::new();
        let outcome = classify(
            &channels,
            "h1",
            &devices(),
            &message("/h1/d1/presence", b"maybe"),
            &mut pending,
        );
        let Some(Err((device, reason))) = outcome else {
            panic!("{outcome:?}");
        };
        assert_eq!(device.as_deref(), Some("d1"));
        assert!(reason.contains("online"), "{reason}");
        assert!(pending.is_empty());
    }

    #[test]
    fn other_topics_hubs_and_devices_are_left_to_the_parser() {
        let channels = ChannelTemplates::default();
        let mut pending = Vec::new();
        for topic in [
            "/h1/d1/data",
            "/h2/d1/presence",
            "/h1/d9/presence",
            "/h1/d1/presence/x",
        ] {
            assert_eq!(
                classify(
                    &channels,
                    "h1",
                    &devices(),
                    &message(topic, b"online"),
                    &mut pending
                ),
                None,
                "{topic}"
            );
        }
        assert!(pending.is_empty());
    }
}
