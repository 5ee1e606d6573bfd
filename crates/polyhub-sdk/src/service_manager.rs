//! The service manager of sgframework's tool set: when a resource's presence turns `False`
//! (its will, or its own goodbye), republish every `commandavailable/<resource>/...` and
//! `dataavailable/<resource>/...` it announced as `False`, retained, so apps see its signals
//! vanish (and late subscribers get `False` from the retained store).
//!
//! [`ServiceManager`] is the pure bookkeeping: feed it every message of
//! [`ServiceManager::FILTERS`] and publish what it returns. [`ServiceManager::run`] drives it
//! over an MQTT connection ([`polyhub_client`]), `ServiceManager::run_local` (feature
//! `embedded-broker`) over an in-process client of polyhub's broker.

use std::collections::BTreeMap;

#[cfg(feature = "embedded-broker")]
use polyhub_broker::LocalClient;
use polyhub_client::{ClientOptions, Event, EventLoop, QoS};

use crate::error::SdkError;
use crate::topics::{MessageType, PAYLOAD_FALSE, PAYLOAD_TRUE, SUFFIX_PRESENCE, split_topic};

/// Why the service manager stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServiceManagerError {
    /// The MQTT client failed.
    #[error(transparent)]
    Sdk(#[from] SdkError),
    /// The in-process broker client failed.
    #[cfg(feature = "embedded-broker")]
    #[error("broker: {0}")]
    Broker(#[from] polyhub_broker::BrokerError),
}

/// Availability bookkeeping: per resource, each availability topic and whether it is `True`.
#[derive(Debug, Default)]
pub struct ServiceManager {
    resources: BTreeMap<String, BTreeMap<String, bool>>,
}

impl ServiceManager {
    /// What to subscribe to.
    pub const FILTERS: [&'static str; 3] = [
        "resourceavailable/+/presence",
        "commandavailable/+/+",
        "dataavailable/+/+",
    ];

    /// An empty manager.
    pub fn new() -> ServiceManager {
        ServiceManager::default()
    }

    /// Take in one message; returns the topics to publish `False` on (retained), in a stable
    /// order. Anything that is not a well-formed availability message is ignored.
    pub fn handle_message(&mut self, topic: &str, payload: &[u8]) -> Vec<String> {
        let Some((prefix, resource, signal)) = split_topic(topic.trim()) else {
            return Vec::new();
        };
        let Ok(payload) = std::str::from_utf8(payload) else {
            return Vec::new();
        };
        let available = match payload.trim() {
            PAYLOAD_TRUE => true,
            PAYLOAD_FALSE => false,
            _ => return Vec::new(),
        };
        match prefix.parse::<MessageType>() {
            Ok(MessageType::CommandAvailable | MessageType::DataAvailable) => {
                self.resources
                    .entry(resource.to_owned())
                    .or_default()
                    .insert(topic.trim().to_owned(), available);
                Vec::new()
            }
            Ok(MessageType::ResourceAvailable) if signal == SUFFIX_PRESENCE && !available => {
                let Some(topics) = self.resources.get_mut(resource) else {
                    return Vec::new();
                };
                let mut vanished = Vec::new();
                for (topic, state) in topics.iter_mut().filter(|(_, state)| **state) {
                    *state = false;
                    vanished.push(topic.clone());
                }
                if !vanished.is_empty() {
                    tracing::info!(
                        resource,
                        signals = vanished.len(),
                        "Resource gone; its signals are now unavailable."
                    );
                }
                vanished
            }
            _ => Vec::new(),
        }
    }

    /// The availability topics known for `resource` and their state.
    pub fn availability(&self, resource: &str) -> Option<&BTreeMap<String, bool>> {
        self.resources.get(resource)
    }

    /// Run over an MQTT connection (any broker) until the client shuts down. Reconnects like
    /// every polyhub client; `options` should use a clean session.
    pub async fn run(mut self, options: ClientOptions) -> Result<(), ServiceManagerError> {
        let (client, mut event_loop) = EventLoop::new(options);
        let subscriber = client.clone();
        tokio::spawn(async move {
            for filter in ServiceManager::FILTERS {
                if let Err(error) = subscriber.subscribe(filter, QoS::AtLeastOnce).await {
                    tracing::warn!(filter, %error, "Service manager subscription failed.");
                }
            }
        });
        while let Some(event) = event_loop.poll().await {
            if let Event::Message(message) = event {
                for topic in self.handle_message(&message.topic, &message.payload) {
                    // Queued, not awaited: the acknowledgement needs this very loop.
                    let ack = client.try_publish(
                        polyhub_client::Message::new(topic, PAYLOAD_FALSE)
                            .qos(QoS::AtLeastOnce)
                            .retain(true),
                    );
                    if let Err(error) = ack {
                        tracing::warn!(%error, "Service manager publish failed.");
                    }
                }
            }
        }
        Ok(())
    }

    /// Run over an in-process client of polyhub's broker (`broker.local_client(id)`) until the
    /// broker shuts down. Needs the `embedded-broker` feature.
    #[cfg(feature = "embedded-broker")]
    pub async fn run_local(mut self, mut client: LocalClient) -> Result<(), ServiceManagerError> {
        for filter in ServiceManager::FILTERS {
            client.subscribe(filter, QoS::AtLeastOnce).await?;
        }
        while let Some(message) = client.recv().await {
            for topic in self.handle_message(&message.topic, &message.payload) {
                client
                    .publish(&topic, PAYLOAD_FALSE, QoS::AtLeastOnce, true)
                    .await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_false_withdraws_what_was_announced() {
        let mut manager = ServiceManager::new();
        assert!(
            manager
                .handle_message("commandavailable/sign/state", b"True")
                .is_empty()
        );
        assert!(
            manager
                .handle_message("dataavailable/sign/state", b" True ")
                .is_empty()
        );
        assert!(
            manager
                .handle_message("dataavailable/other/x", b"True")
                .is_empty()
        );
        assert!(
            manager
                .handle_message("resourceavailable/sign/presence", b"True")
                .is_empty()
        );
        assert_eq!(
            manager.handle_message("resourceavailable/sign/presence", b"False"),
            vec!["commandavailable/sign/state", "dataavailable/sign/state"]
        );
        // Already withdrawn: a second False (our own echo of it, or a will) changes nothing.
        assert!(
            manager
                .handle_message("resourceavailable/sign/presence", b"False")
                .is_empty()
        );
        assert!(manager.availability("other").unwrap()["dataavailable/other/x"]);
    }

    #[test]
    fn garbage_is_ignored() {
        let mut manager = ServiceManager::new();
        manager.handle_message("dataavailable/sign/state", b"True");
        assert!(
            manager
                .handle_message("resourceavailable/sign/presence/x", b"False")
                .is_empty()
        );
        assert!(
            manager
                .handle_message("resourceavailable/sign/other", b"False")
                .is_empty()
        );
        assert!(
            manager
                .handle_message("resourceavailable/sign/presence", b"maybe")
                .is_empty()
        );
        assert!(
            manager
                .handle_message("resourceavailable/sign/presence", b"\xff")
                .is_empty()
        );
        assert!(
            manager
                .handle_message("data/sign/state", b"False")
                .is_empty()
        );
        assert!(manager.availability("sign").unwrap()["dataavailable/sign/state"]);
    }
}
