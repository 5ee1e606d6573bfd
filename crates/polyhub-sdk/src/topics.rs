//! sgframework's topic conventions: `<messagetype>/<service>/<signal>`, the five message types,
//! and the `True`/`False` availability payloads.
//!
//! Everything here is pure: building and checking topic names, no I/O.

use std::fmt;
use std::str::FromStr;

use crate::error::SdkError;

/// Payload of an available resource, command or data signal (Python's `str(True)`).
pub const PAYLOAD_TRUE: &str = "True";
/// Payload of a vanished resource, command or data signal.
pub const PAYLOAD_FALSE: &str = "False";
/// Last level of a resource's presence topic: `resourceavailable/<name>/presence`.
pub const SUFFIX_PRESENCE: &str = "presence";
/// Every sgframework topic has exactly this many levels.
pub const TOPIC_DEPTH: usize = 3;

/// The first topic level, which says what a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// `command/<resource>/<signal>`: an app asks a resource to do something.
    Command,
    /// `data/<resource>/<signal>`: a resource reports a value (or echoes a command).
    Data,
    /// `commandavailable/<resource>/<signal>`: `True` while the resource accepts the command.
    CommandAvailable,
    /// `dataavailable/<resource>/<signal>`: `True` while the resource publishes the data.
    DataAvailable,
    /// `resourceavailable/<resource>/presence`: `True` while the resource is connected.
    ResourceAvailable,
}

impl MessageType {
    /// Every message type, in sgframework's order.
    pub const ALL: [MessageType; 5] = [
        MessageType::CommandAvailable,
        MessageType::DataAvailable,
        MessageType::ResourceAvailable,
        MessageType::Data,
        MessageType::Command,
    ];

    /// The topic prefix, as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageType::Command => "command",
            MessageType::Data => "data",
            MessageType::CommandAvailable => "commandavailable",
            MessageType::DataAvailable => "dataavailable",
            MessageType::ResourceAvailable => "resourceavailable",
        }
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MessageType {
    type Err = SdkError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        MessageType::ALL
            .into_iter()
            .find(|kind| kind.as_str() == text)
            .ok_or_else(|| SdkError::UnknownMessageType(text.to_owned()))
    }
}

/// `<messagetype>/<service>/<signal>`, the one topic layout of sgframework.
pub fn topic(message_type: MessageType, service: &str, signal: &str) -> String {
    format!("{message_type}/{service}/{signal}")
}

/// A service or signal name, trimmed like sgframework does (`str(name).strip()`), and checked:
/// it must be one non-empty topic level without MQTT wildcards, since sgframework matches
/// incoming topics exactly.
pub fn checked_name(name: &str) -> Result<String, SdkError> {
    let trimmed = name.trim();
    if trimmed.is_empty() || trimmed.contains(['/', '+', '#', '\0']) {
        return Err(SdkError::InvalidName(name.to_owned()));
    }
    Ok(trimmed.to_owned())
}

/// Split a received topic into its three levels; `None` for any other depth.
pub fn split_topic(topic: &str) -> Option<(&str, &str, &str)> {
    let mut levels = topic.split('/');
    let first = levels.next()?;
    let second = levels.next()?;
    let third = levels.next()?;
    match levels.next() {
        Some(_) => None,
        None => Some((first, second, third)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_types_round_trip() {
        for kind in MessageType::ALL {
            assert_eq!(kind.as_str().parse::<MessageType>().unwrap(), kind);
        }
        assert!("commands".parse::<MessageType>().is_err());
    }

    #[test]
    fn topics_have_three_levels() {
        assert_eq!(
            topic(MessageType::Data, "taxisign", "state"),
            "data/taxisign/state"
        );
        assert_eq!(split_topic("data/a/b"), Some(("data", "a", "b")));
        assert_eq!(split_topic("data/a"), None);
        assert_eq!(split_topic("data/a/b/c"), None);
    }

    #[test]
    fn names_are_trimmed_and_checked() {
        assert_eq!(checked_name("  state ").unwrap(), "state");
        for bad in ["", "  ", "a/b", "+", "a#"] {
            assert!(checked_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
