//! Errors at the broker's boundary.

/// What can go wrong running the broker or one of its listeners.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Accepting or configuring a socket failed.
    #[error("listener I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A TLS certificate, key or CA file could not be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// An in-process client asked for something invalid (bad topic, bad filter).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The broker has shut down.
    #[error("broker is shut down")]
    Closed,
}
