//! TLS for the `mqtts` listener: builds a rustls server configuration (ring provider) from PEM
//! files.

use std::path::PathBuf;

use crate::config::TlsConfig;

/// Why the TLS listener could not be set up. Each variant names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no usable PEM item.
    #[error("cannot use {path}: {reason}")]
    File {
        /// The offending file.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// rustls rejected the certificate/key combination.
    #[error("invalid TLS configuration: {0}")]
    Config(String),
}

/// Build the acceptor for the TLS listener.
pub fn acceptor(config: &TlsConfig) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    let _ = config;
    Err(TlsError::Config("TLS not implemented yet".into()))
}
