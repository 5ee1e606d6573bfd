//! The hub's one error type.

use polyhub_store::StoreError;

use crate::bus::BusError;

/// Why a hub operation failed.
///
/// Storage errors that name the caller's mistake keep their meaning ([`HubError::NotFound`],
/// [`HubError::Conflict`], [`HubError::Invalid`]) so the API and the control channels can
/// answer with the right code; everything else is ours.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// No such hub or device.
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with stored state (duplicate id, device of another hub, ...).
    #[error("{0}")]
    Conflict(String),
    /// The request is malformed (bad id, metadata that is not an object, ...).
    #[error("{0}")]
    Invalid(String),
    /// The `[hub]` configuration is unusable.
    #[error("invalid [hub] configuration: {0}")]
    Config(String),
    /// Storage failed (unavailable, backend error).
    #[error(transparent)]
    Store(StoreError),
    /// The broker connection failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The hub's running parser could not apply a device change (its reason).
    #[error("the hub's parser refused: {0}")]
    Parser(String),
    /// A child parser process could not be run, or broke the JSON-lines protocol.
    #[error("parser process: {0}")]
    Process(String),
    /// The manager has shut down and accepts no more requests.
    #[error("the hub manager has shut down")]
    ShutDown,
}

impl From<StoreError> for HubError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::NotFound(message) => HubError::NotFound(message),
            StoreError::Conflict(message) => HubError::Conflict(message),
            StoreError::Invalid(message) => HubError::Invalid(message),
            other => HubError::Store(other),
        }
    }
}
