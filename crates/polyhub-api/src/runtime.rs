//! The contract between the API and the hub manager. The binary implements [`HubRuntime`] over
//! its manager, so this crate never names the hub runtime.

use async_trait::async_trait;
use polyhub_store::{Device, ParserStatus};

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
    /// Current status of a hub's parser (`None` if the manager has never seen that hub).
    fn parser_status(&self, hub_id: &str) -> Option<ParserStatus>;
    /// Status of every parser the manager knows.
    fn parsers(&self) -> Vec<ParserStatus>;
    /// Whether the manager finished starting (for `/ready`).
    fn is_ready(&self) -> bool;
}
