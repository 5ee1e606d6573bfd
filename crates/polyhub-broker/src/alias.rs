//! MQTT 5 topic aliases, both ways. Aliases belong to one network connection, never to the
//! session.

use std::collections::HashMap;

use polyhub_mqtt::{Publish, ReasonCode};

/// Aliases the client defines in its PUBLISHes (up to the maximum we announced in CONNACK).
#[derive(Debug, Default)]
pub(crate) struct InboundAliases {
    maximum: u16,
    topics: HashMap<u16, String>,
}

impl InboundAliases {
    pub(crate) fn new(maximum: u16) -> InboundAliases {
        InboundAliases {
            maximum,
            topics: HashMap::new(),
        }
    }

    /// Resolve `publish`'s topic alias: record the alias when the topic is given, fill in the
    /// topic when it is empty, and clear the alias property (it is not forwarded).
    ///
    /// Errors with the DISCONNECT reason: 0x94 for alias 0 or above our maximum, 0x82 for an
    /// empty topic without a known alias.
    pub(crate) fn resolve(&mut self, publish: &mut Publish) -> Result<(), ReasonCode> {
        let Some(alias) = publish.properties.topic_alias.take() else {
            return if publish.topic.is_empty() {
                Err(ReasonCode::PROTOCOL_ERROR)
            } else {
                Ok(())
            };
        };
        if alias == 0 || alias > self.maximum {
            return Err(ReasonCode::TOPIC_ALIAS_INVALID);
        }
        if publish.topic.is_empty() {
            match self.topics.get(&alias) {
                Some(topic) => publish.topic.clone_from(topic),
                None => return Err(ReasonCode::PROTOCOL_ERROR),
            }
        } else {
            self.topics.insert(alias, publish.topic.clone());
        }
        Ok(())
    }
}

/// What to put in an outbound PUBLISH for its topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutboundAlias {
    /// No alias: send the topic.
    None,
    /// A new alias: send the topic and the alias, so the client learns it.
    Define(u16),
    /// A known alias: send an empty topic and the alias.
    Use(u16),
}

/// Aliases we assign for topics sent repeatedly to a client that accepts them (its CONNECT's
/// topic alias maximum). Aliases are handed out first come, first served and never reassigned,
/// so a client that sees many topics gets aliases for the first ones only.
#[derive(Debug, Default)]
pub(crate) struct OutboundAliases {
    maximum: u16,
    assigned: HashMap<String, u16>,
}

impl OutboundAliases {
    pub(crate) fn new(maximum: u16) -> OutboundAliases {
        OutboundAliases {
            maximum,
            assigned: HashMap::new(),
        }
    }

    /// The alias treatment for `topic`; a `Define` is recorded at once and must be undone with
    /// [`OutboundAliases::forget`] if the packet is not sent after all.
    pub(crate) fn for_topic(&mut self, topic: &str) -> OutboundAlias {
        if self.maximum == 0 {
            return OutboundAlias::None;
        }
        if let Some(&alias) = self.assigned.get(topic) {
            return OutboundAlias::Use(alias);
        }
        let used = self.assigned.len();
        if used >= usize::from(self.maximum) {
            return OutboundAlias::None;
        }
        // `used < maximum <= u16::MAX`, so `used + 1` fits.
        let alias = u16::try_from(used + 1).unwrap_or(u16::MAX);
        self.assigned.insert(topic.to_owned(), alias);
        OutboundAlias::Define(alias)
    }

    /// Undo the `Define` just returned for `topic`.
    pub(crate) fn forget(&mut self, topic: &str) {
        self.assigned.remove(topic);
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use polyhub_mqtt::{Properties, QoS};

    use super::*;

    fn publish(topic: &str, alias: Option<u16>) -> Publish {
        Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: topic.into(),
            packet_id: 0,
            payload: Bytes::new(),
            properties: Properties {
                topic_alias: alias,
                ..Properties::default()
            },
        }
    }

    #[test]
    fn inbound_alias_is_learned_then_used() {
        let mut aliases = InboundAliases::new(4);
        let mut first = publish("a/b", Some(2));
        aliases.resolve(&mut first).unwrap();
        assert_eq!(first.properties.topic_alias, None);
        let mut second = publish("", Some(2));
        aliases.resolve(&mut second).unwrap();
        assert_eq!(second.topic, "a/b");
    }

    #[test]
    fn inbound_alias_errors_have_the_spec_reason_codes() {
        let mut aliases = InboundAliases::new(4);
        assert_eq!(
            aliases.resolve(&mut publish("a", Some(0))),
            Err(ReasonCode::TOPIC_ALIAS_INVALID)
        );
        assert_eq!(
            aliases.resolve(&mut publish("a", Some(5))),
            Err(ReasonCode::TOPIC_ALIAS_INVALID)
        );
        assert_eq!(
            aliases.resolve(&mut publish("", Some(3))),
            Err(ReasonCode::PROTOCOL_ERROR)
        );
        assert_eq!(
            aliases.resolve(&mut publish("", None)),
            Err(ReasonCode::PROTOCOL_ERROR)
        );
    }

    #[test]
    fn outbound_aliases_define_once_then_reuse_up_to_the_maximum() {
        let mut aliases = OutboundAliases::new(1);
        assert_eq!(aliases.for_topic("a"), OutboundAlias::Define(1));
        assert_eq!(aliases.for_topic("a"), OutboundAlias::Use(1));
        assert_eq!(aliases.for_topic("b"), OutboundAlias::None);
        aliases.forget("a");
        assert_eq!(aliases.for_topic("b"), OutboundAlias::Define(1));
        assert_eq!(OutboundAliases::new(0).for_topic("a"), OutboundAlias::None);
    }
}
