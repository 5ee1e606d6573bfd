//! [`SdkError`], the one error type of the SDK's public API.

use polyhub_client::{ClientError, TlsError};

/// Why an SDK call failed.
#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    /// Sending, stopping or looping before `start()` (or after `stop()`), like sgframework's
    /// "You must call start() before ...".
    #[error("you must call start() before {0}")]
    NotStarted(&'static str),
    /// `start()` while already running.
    #[error("already started; call stop() first")]
    AlreadyStarted,
    /// `send_data` on a signal never registered with `register_outgoing_data`.
    #[error("the data signal `{0}` has not been registered")]
    UnregisteredSignal(String),
    /// A service or signal name that is not a single, non-empty, wildcard-free topic level.
    #[error("invalid service or signal name `{0}`")]
    InvalidName(String),
    /// A topic prefix that is none of sgframework's five message types.
    #[error("unknown message type `{0}`")]
    UnknownMessageType(String),
    /// The certificate directory could not be loaded.
    #[error("TLS settings: {0}")]
    Tls(#[from] TlsError),
    /// The MQTT client refused or failed a request.
    #[error("MQTT client: {0}")]
    Client(#[from] ClientError),
}
