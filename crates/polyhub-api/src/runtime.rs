//! The contracts between the API and the runtime services it drives: the hub manager
//! ([`HubRuntime`]) and the command service ([`CommandRuntime`]). The binary implements both
//! over the real services, so this crate never names them.

use std::time::Duration;

use async_trait::async_trait;
use polyhub_store::{Command, Device, ParserStatus};

/// Why the hub runtime refused or failed an operation.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No such hub (or device).
    #[error("{0}")]
    NotFound(String),
    /// The operation does not fit the current state (e.g. a parser that is shutting down).
    #[error("{0}")]
    Conflict(String),
    /// The request cannot be carried out as given (the caller's mistake).
    #[error("{0}")]
    Invalid(String),
    /// The request's content is larger than allowed (e.g. a command payload above
    /// [`MAX_COMMAND_PAYLOAD`](polyhub_store::MAX_COMMAND_PAYLOAD)).
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The parser or its storage failed.
    #[error("{0}")]
    Failed(String),
}

/// What the API needs from the hub manager. The binary implements it over the manager, so this
/// crate never names the hub runtime.
#[async_trait]
pub trait HubRuntime: Send + Sync + std::fmt::Debug + 'static {
    /// Starts the hub's parser (and records the desired state `running`).
    async fn start_hub(&self, hub_id: &str) -> Result<ParserStatus, RuntimeError>;
    /// Stops it after committing what it has received (desired state `stopped`).
    async fn stop_hub(&self, hub_id: &str) -> Result<ParserStatus, RuntimeError>;
    /// Stops then starts the hub's parser (e.g. so that new settings take effect).
    async fn restart_hub(&self, hub_id: &str) -> Result<ParserStatus, RuntimeError>;
    /// A device was created: its hub's running parser subscribes to its channel before this
    /// returns.
    async fn device_added(&self, device: &Device) -> Result<(), RuntimeError>;
    /// A device was deleted: the parser unsubscribes before this returns.
    async fn device_removed(&self, hub_id: &str, device_id: &str) -> Result<(), RuntimeError>;
    /// A hub was deleted (its parser was stopped first): what the broker still keeps for its
    /// parser (a persistent session with subscriptions and queued messages) goes too.
    async fn hub_deleted(&self, hub_id: &str) -> Result<(), RuntimeError> {
        let _ = hub_id;
        Ok(())
    }
    /// Current status of a hub's parser (`None` if the manager has never seen that hub).
    fn parser_status(&self, hub_id: &str) -> Option<ParserStatus>;
    /// Status of every parser the manager knows.
    fn parsers(&self) -> Vec<ParserStatus>;
    /// Whether the manager finished starting (for `/ready`).
    fn is_ready(&self) -> bool;
}

/// A command as the API hands it to the command service: the validated body of
/// `POST /devices/{id}/commands`, without the API-only `wait_ms`.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandRequest {
    /// What to do (for sgframework resources: the command signal name).
    pub name: String,
    /// Arguments: any JSON value (`null` when the request gave none).
    pub payload: serde_json::Value,
    /// Time to live in milliseconds: unacknowledged after this long, the command expires.
    /// `None`: it never expires.
    pub ttl_ms: Option<u64>,
}

/// What the API needs from the command service (the Polyglot lifecycle engine). Reading and
/// listing commands goes straight to the [`Store`](polyhub_store::Store); everything that
/// changes a command goes through here, so the service sees every transition.
#[async_trait]
pub trait CommandRuntime: Send + Sync + std::fmt::Debug + 'static {
    /// Stores the command (state `queued`) and schedules its dispatch; returns it as stored.
    ///
    /// Errors: `NotFound` (no such device), `Invalid` (bad name, or no polyglot client for the
    /// device's protocol), `PayloadTooLarge`, `Failed`.
    async fn submit(
        &self,
        device_id: &str,
        request: CommandRequest,
    ) -> Result<Command, RuntimeError>;
    /// Resolves when the command is acknowledged or reaches a final state, or when `timeout`
    /// passes, whichever comes first; returns the command as it is then.
    ///
    /// Errors: `NotFound` (no such command), `Failed`.
    async fn wait(&self, id: &str, timeout: Duration) -> Result<Command, RuntimeError>;
    /// Cancels a command that is queued, sent or delivered; returns it cancelled.
    ///
    /// Errors: `NotFound`, `Conflict` (already in a final state), `Failed`.
    async fn cancel(&self, id: &str) -> Result<Command, RuntimeError>;
    /// Creates the device's account on the server of its protocol (e.g. an XMPP account) and
    /// returns its credentials; they are not kept, so this is the only time they are shown.
    ///
    /// Errors: `Invalid` (the protocol's client does not manage accounts, or no client for the
    /// protocol), `Conflict` (the server refused: the account exists), `Failed`.
    async fn create_account(&self, device: &Device) -> Result<DeviceAccount, RuntimeError> {
        Err(RuntimeError::Invalid(format!(
            "protocol {:?} does not manage device accounts",
            device.protocol
        )))
    }
    /// Deletes what [`CommandRuntime::create_account`] created.
    ///
    /// Errors: as for `create_account` (`Conflict`: the server refused, e.g. no such account or
    /// polyhub's account may not delete accounts).
    async fn remove_account(&self, device: &Device) -> Result<(), RuntimeError> {
        Err(RuntimeError::Invalid(format!(
            "protocol {:?} does not manage device accounts",
            device.protocol
        )))
    }
}

/// A device's account as created on the server of its protocol.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct DeviceAccount {
    /// What the device logs in as (for XMPP its JID).
    pub username: String,
    /// Its generated password: shown once, not stored by polyhub.
    pub password: String,
}
