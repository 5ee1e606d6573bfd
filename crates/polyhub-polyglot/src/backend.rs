//! The backend broker client interface: one implementation per protocol (MQTT, XMPP, ...).
//!
//! The command service never names a concrete client: it asks the [`crate::Polyglot`] for the
//! client of a device's `protocol` and talks to it through [`BackendClient`]. What a client
//! hears from devices (presence, telemetry, command replies, delivery confirmations) comes back
//! as [`BackendEvent`]s on the channel it was given at construction, the same events whatever
//! the protocol, so an XMPP device is stored and shown like an MQTT one.

use async_trait::async_trait;
use polyhub_store::{Command, Device, Millis, Value};

/// Why a backend client failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The settings of this client are unusable (reported at start-up).
    #[error("{0}")]
    Config(String),
    /// The device cannot be reached this way (no address, not provisioned, refused).
    #[error("{0}")]
    Rejected(String),
    /// The connection to the broker/server is down; the command stays queued and is retried.
    #[error("{0}")]
    Unavailable(String),
    /// This client cannot do that (e.g. provisioning where the protocol has no accounts).
    #[error("{0}")]
    Unsupported(String),
}

/// What became of handing a command to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendOutcome {
    /// Handed over; a [`BackendEvent::Delivered`] follows when the transport confirms it.
    Sent,
    /// Handed over and already confirmed by the transport (e.g. routed by the in-process
    /// broker to the device's session).
    Delivered,
}

/// Credentials created for a device by [`BackendClient::provision_device`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Credentials {
    /// e.g. an XMPP JID or an MQTT user name.
    pub username: String,
    pub password: String,
}

/// A client for one protocol.
#[async_trait]
pub trait BackendClient: Send + Sync + std::fmt::Debug + 'static {
    /// The protocol name devices select it with (`mqtt`, `xmpp`, ...).
    fn protocol(&self) -> &str;
    /// Sends a command to a device. Commands to one device are called in order and the client
    /// must keep that order on the wire.
    async fn send_command(
        &self,
        device: &Device,
        command: &Command,
    ) -> Result<SendOutcome, BackendError>;
    /// Creates the device's account or credentials where the protocol has them (`None`: the
    /// protocol has none to create).
    async fn provision_device(&self, device: &Device) -> Result<Option<Credentials>, BackendError> {
        let _ = device;
        Ok(None)
    }
    /// Removes what [`BackendClient::provision_device`] created; `Unsupported` where the
    /// protocol has no accounts, so that a caller never believes something was removed.
    async fn remove_device(&self, device: &Device) -> Result<(), BackendError> {
        Err(BackendError::Unsupported(format!(
            "protocol {:?} has no device accounts to remove",
            device.protocol
        )))
    }
    /// A device of this client's protocol was registered: the client starts following it
    /// (e.g. asks for its XMPP presence) so that it is seen online without a restart.
    async fn device_added(&self, device: &Device) -> Result<(), BackendError> {
        let _ = device;
        Ok(())
    }
    /// Whether the device is connected, as far as this client knows (`None`: unknown).
    fn is_online(&self, device_id: &str) -> Option<bool>;
}

/// What a client heard, in protocol-neutral terms.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendEvent {
    /// A device connected or disconnected.
    Presence {
        device_id: String,
        online: bool,
        at: Millis,
    },
    /// Telemetry from a device (for protocols whose telemetry does not already reach a hub
    /// parser, such as XMPP).
    Telemetry {
        device_id: String,
        values: Vec<(String, Value)>,
        at: Millis,
    },
    /// The transport confirmed a command reached the device.
    Delivered { command_id: String, at: Millis },
    /// The device answered a command. `command_id` is known when the reply names it (hub reply
    /// channel, MQTT 5 correlation data, XMPP reply); for an sgframework echo only the signal
    /// `name` and the echoed value are known, and the service matches it to the oldest sent
    /// command of that name.
    Reply {
        device_id: String,
        command_id: Option<String>,
        name: Option<String>,
        ok: bool,
        reply: Option<serde_json::Value>,
        reason: Option<String>,
        at: Millis,
    },
}
