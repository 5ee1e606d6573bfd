//! TLS settings: a rustls client configuration (ring provider) built from PEM files, and the
//! stream a connection runs over.
//!
//! Everything that can be wrong with the files is found when [`TlsOptions`] is built, once,
//! rather than at every connection attempt. The ring provider is named explicitly instead of
//! relying on a process-wide default, so that the client behaves the same in any binary.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::error::{ConnectionError, TlsError};

/// CA certificate file name in an sgframework certificate directory.
pub const CA_CERTIFICATE_FILE: &str = "ca_public_certificate.pem";
/// Client certificate file name in an sgframework certificate directory.
pub const CLIENT_CERTIFICATE_FILE: &str = "public_certificate.pem";
/// Client private key file name in an sgframework certificate directory.
pub const CLIENT_KEY_FILE: &str = "private_key.pem";

/// How to secure the connection: whom to trust, who we are, and the name to check.
#[derive(Clone)]
pub struct TlsOptions {
    config: Arc<ClientConfig>,
    server_name: Option<String>,
}

impl std::fmt::Debug for TlsOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsOptions")
            .field(
                "client_certificate",
                &self.config.client_auth_cert_resolver.has_certs(),
            )
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl TlsOptions {
    /// Trust the CA certificates in `ca_file` (PEM); no client certificate.
    pub fn from_ca_file(ca_file: impl AsRef<Path>) -> Result<TlsOptions, TlsError> {
        let roots = load_roots(ca_file.as_ref())?;
        let config = builder()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(TlsOptions::from_rustls_config(Arc::new(config)))
    }

    /// Trust the CA certificates in `ca_file` and present the certificate chain in `cert_file`
    /// with the private key in `key_file` (PEM: PKCS#8, PKCS#1 or SEC1).
    pub fn from_ca_and_client_files(
        ca_file: impl AsRef<Path>,
        cert_file: impl AsRef<Path>,
        key_file: impl AsRef<Path>,
    ) -> Result<TlsOptions, TlsError> {
        let roots = load_roots(ca_file.as_ref())?;
        let chain = load_certificates(cert_file.as_ref())?;
        let key_file = key_file.as_ref();
        let key = PrivateKeyDer::from_pem_file(key_file).map_err(|error| TlsError::File {
            path: key_file.to_path_buf(),
            reason: describe_pem_error(error, "private key"),
        })?;
        let config = builder()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        Ok(TlsOptions::from_rustls_config(Arc::new(config)))
    }

    /// The files of an sgframework certificate directory: [`CA_CERTIFICATE_FILE`] (required),
    /// and [`CLIENT_CERTIFICATE_FILE`] with [`CLIENT_KEY_FILE`] for a client certificate (used
    /// when both exist; one without the other is an error).
    pub fn from_certificate_directory(dir: impl AsRef<Path>) -> Result<TlsOptions, TlsError> {
        let dir = dir.as_ref();
        let ca_file = dir.join(CA_CERTIFICATE_FILE);
        let cert_file = dir.join(CLIENT_CERTIFICATE_FILE);
        let key_file = dir.join(CLIENT_KEY_FILE);
        match (cert_file.exists(), key_file.exists()) {
            (true, true) => TlsOptions::from_ca_and_client_files(ca_file, cert_file, key_file),
            (false, false) => TlsOptions::from_ca_file(ca_file),
            (true, false) => Err(TlsError::IncompleteClientIdentity {
                present: cert_file,
                missing: key_file,
            }),
            (false, true) => Err(TlsError::IncompleteClientIdentity {
                present: key_file,
                missing: cert_file,
            }),
        }
    }

    /// Use a rustls configuration built elsewhere (it should use the ring provider too).
    pub fn from_rustls_config(config: Arc<ClientConfig>) -> TlsOptions {
        TlsOptions {
            config,
            server_name: None,
        }
    }

    /// Check the broker's certificate against this name instead of the host connected to.
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Run the TLS handshake over `tcp`; `host` names the server unless overridden.
    pub(crate) async fn connect(
        &self,
        host: &str,
        tcp: TcpStream,
    ) -> Result<TlsStream<TcpStream>, ConnectionError> {
        let name = self.server_name.as_deref().unwrap_or(host);
        let server_name = ServerName::try_from(name.to_owned())
            .map_err(|_| ConnectionError::InvalidServerName(name.to_owned()))?;
        TlsConnector::from(Arc::clone(&self.config))
            .connect(server_name, tcp)
            .await
            .map_err(ConnectionError::TlsHandshake)
    }
}

/// A rustls client builder with the ring provider and the safe default protocol versions
/// (TLS 1.2 and 1.3).
fn builder() -> Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>, TlsError> {
    Ok(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?,
    )
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for certificate in load_certificates(path)? {
        roots.add(certificate).map_err(|error| TlsError::File {
            path: path.to_path_buf(),
            reason: format!("unusable CA certificate: {error}"),
        })?;
    }
    Ok(roots)
}

/// Every certificate in a PEM file; at least one.
fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_error = |error: pem::Error| TlsError::File {
        path: PathBuf::from(path),
        reason: describe_pem_error(error, "certificate"),
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(file_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(file_error)?;
    if certificates.is_empty() {
        return Err(file_error(pem::Error::NoItemsFound));
    }
    Ok(certificates)
}

fn describe_pem_error(error: pem::Error, what: &str) -> String {
    match error {
        pem::Error::Io(error) => error.to_string(),
        pem::Error::NoItemsFound => format!("no PEM {what} found"),
        other => format!("invalid PEM: {other}"),
    }
}

/// The byte stream of one connection: plain TCP or TLS over TCP.
///
/// Design: an enum rather than a boxed trait object, so that the hot read and write paths are
/// direct calls.
#[derive(Debug)]
pub(crate) enum Transport {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(stream) => Pin::new(stream).poll_read(cx, buf),
            Transport::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Tcp(stream) => Pin::new(stream).poll_write(cx, buf),
            Transport::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(stream) => Pin::new(stream).poll_flush(cx),
            Transport::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Tcp(stream) => Pin::new(stream).poll_shutdown(cx),
            Transport::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}
