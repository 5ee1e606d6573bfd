//! TLS for the `mqtts` listener: builds a rustls server configuration (ring provider) from PEM
//! files.
//!
//! Everything that can be wrong with the files is found here, once, when the listener is set
//! up, so that an operator sees one error naming the file instead of failed handshakes later.
//! The acceptor uses the ring provider explicitly rather than the process-wide default, so it
//! behaves the same whether or not the binary installed one.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{InconsistentKeys, RootCertStore, ServerConfig};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

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
    /// The settings contradict each other, or rustls rejected them.
    #[error("invalid TLS configuration: {0}")]
    Config(String),
}

/// Build the acceptor for the TLS listener.
///
/// Loads the certificate chain and private key, checks that they belong together, and, when
/// `ca_file` is set, asks clients for a certificate chaining to one of its CAs (mandatory with
/// `require_client_cert`, optional otherwise). No ALPN protocol is announced.
pub fn acceptor(config: &TlsConfig) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    server_config(config).map(|server| tokio_rustls::TlsAcceptor::from(Arc::new(server)))
}

/// The rustls configuration behind [`acceptor`].
fn server_config(config: &TlsConfig) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());

    let client_verifier = match (&config.ca_file, config.require_client_cert) {
        (None, true) => {
            return Err(TlsError::Config(
                "require_client_cert needs ca_file: the CA certificates that client \
                 certificates must chain to"
                    .into(),
            ));
        }
        (None, false) => WebPkiClientVerifier::no_client_auth(),
        (Some(ca_file), required) => {
            let roots = load_ca_roots(ca_file)?;
            let builder =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            let builder = if required {
                builder
            } else {
                builder.allow_unauthenticated()
            };
            builder.build().map_err(|error| TlsError::File {
                path: ca_file.clone(),
                reason: format!("cannot verify client certificates with it: {error}"),
            })?
        }
    };

    let certified_key = load_certified_key(config, &provider)?;

    let server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| TlsError::Config(error.to_string()))?
        .with_client_cert_verifier(client_verifier)
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(certified_key)));
    Ok(server)
}

/// The certificate chain and private key, checked to belong together.
fn load_certified_key(
    config: &TlsConfig,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = load_certificates(&config.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&config.key_file).map_err(|error| TlsError::File {
        path: config.key_file.clone(),
        reason: describe_pem_error(error, "private key"),
    })?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|error| TlsError::File {
            path: config.key_file.clone(),
            reason: format!("unusable private key: {error}"),
        })?;

    let certified_key = CertifiedKey::new(chain, signing_key);
    match certified_key.keys_match() {
        // Some key types cannot tell their public key; rustls accepts those, and so do we.
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => {
            Ok(certified_key)
        }
        Err(rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::File {
                path: config.key_file.clone(),
                reason: format!(
                    "private key does not match the certificate in {}",
                    config.cert_file.display()
                ),
            })
        }
        // Anything else comes from parsing the end-entity certificate.
        Err(error) => Err(TlsError::File {
            path: config.cert_file.clone(),
            reason: format!("invalid certificate: {error}"),
        }),
    }
}

/// Every certificate in a PEM file; at least one.
fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_error = |reason: String| TlsError::File {
        path: path.to_path_buf(),
        reason,
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|error| file_error(describe_pem_error(error, "certificate")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| file_error(describe_pem_error(error, "certificate")))?;
    if certificates.is_empty() {
        return Err(file_error(describe_pem_error(
            pem::Error::NoItemsFound,
            "certificate",
        )));
    }
    Ok(certificates)
}

/// The CA certificates that client certificates must chain to.
fn load_ca_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for certificate in load_certificates(path)? {
        roots.add(certificate).map_err(|error| TlsError::File {
            path: path.to_path_buf(),
            reason: format!("invalid CA certificate: {error}"),
        })?;
    }
    Ok(roots)
}

/// A short reason for a PEM loading failure, in the words an operator would use.
fn describe_pem_error(error: pem::Error, wanted: &str) -> String {
    match error {
        pem::Error::Io(error) => describe_io_error(&error),
        pem::Error::NoItemsFound => format!("no PEM {wanted} found in it"),
        other => format!("malformed PEM: {other}"),
    }
}

fn describe_io_error(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::NotFound => "no such file".into(),
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    use rustls::ClientConfig;
    use rustls_pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A scratch directory removed when dropped (no tempfile dependency in this crate).
    struct ScratchDir(PathBuf);

    impl ScratchDir {
        fn new() -> ScratchDir {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "polyhub-tls-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&path).unwrap();
            ScratchDir(path)
        }

        fn write(&self, name: &str, contents: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, contents).unwrap();
            path
        }
    }

    impl Drop for ScratchDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A CA, a server certificate for `localhost` and a client certificate, all as PEM.
    struct Pki {
        ca_pem: String,
        server_cert_pem: String,
        server_key_pem: String,
        client_cert_pem: String,
        client_key_pem: String,
    }

    impl Pki {
        fn generate() -> Pki {
            let mut ca_params = CertificateParams::new(Vec::new()).unwrap();
            ca_params
                .distinguished_name
                .push(DnType::CommonName, "polyhub test CA");
            ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

            let server_key = KeyPair::generate().unwrap();
            let mut server_params = CertificateParams::new(vec!["localhost".into()]).unwrap();
            server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            let server_cert = server_params.signed_by(&server_key, &ca).unwrap();

            let client_key = KeyPair::generate().unwrap();
            let mut client_params = CertificateParams::new(Vec::new()).unwrap();
            client_params
                .distinguished_name
                .push(DnType::CommonName, "device-1");
            client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let client_cert = client_params.signed_by(&client_key, &ca).unwrap();

            Pki {
                ca_pem: ca.pem(),
                server_cert_pem: server_cert.pem(),
                server_key_pem: server_key.serialize_pem(),
                client_cert_pem: client_cert.pem(),
                client_key_pem: client_key.serialize_pem(),
            }
        }

        /// Writes the server's files and returns a config using them (no client auth).
        fn server_config(&self, dir: &ScratchDir) -> TlsConfig {
            TlsConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                cert_file: dir.write("server.pem", &self.server_cert_pem),
                key_file: dir.write("server.key", &self.server_key_pem),
                ca_file: None,
                require_client_cert: false,
            }
        }
    }

    fn file_error(result: Result<tokio_rustls::TlsAcceptor, TlsError>) -> (PathBuf, String) {
        match result {
            Err(TlsError::File { path, reason }) => (path, reason),
            Err(other) => panic!("expected a file error, got {other}"),
            Ok(_) => panic!("expected a file error, got an acceptor"),
        }
    }

    #[test]
    fn good_certificate_and_key_give_an_acceptor() {
        let dir = ScratchDir::new();
        let config = Pki::generate().server_config(&dir);
        assert!(acceptor(&config).is_ok());
    }

    #[test]
    fn ca_file_without_requirement_gives_an_acceptor() {
        let dir = ScratchDir::new();
        let pki = Pki::generate();
        let mut config = pki.server_config(&dir);
        config.ca_file = Some(dir.write("ca.pem", &pki.ca_pem));
        assert!(acceptor(&config).is_ok());
    }

    #[test]
    fn missing_certificate_file_is_named() {
        let dir = ScratchDir::new();
        let mut config = Pki::generate().server_config(&dir);
        config.cert_file = dir.0.join("absent.pem");
        let (path, reason) = file_error(acceptor(&config));
        assert_eq!(path, config.cert_file);
        assert_eq!(reason, "no such file");
        let message = TlsError::File { path, reason }.to_string();
        assert!(message.contains("absent.pem"), "{message}");
    }

    #[test]
    fn missing_key_file_is_named() {
        let dir = ScratchDir::new();
        let mut config = Pki::generate().server_config(&dir);
        config.key_file = dir.0.join("absent.key");
        let (path, reason) = file_error(acceptor(&config));
        assert_eq!(path, config.key_file);
        assert_eq!(reason, "no such file");
    }

    #[test]
    fn missing_ca_file_is_named() {
        let dir = ScratchDir::new();
        let mut config = Pki::generate().server_config(&dir);
        config.ca_file = Some(dir.0.join("absent-ca.pem"));
        let (path, _) = file_error(acceptor(&config));
        assert_eq!(Some(path), config.ca_file);
    }

    #[test]
    fn garbage_certificate_file_is_rejected() {
        let dir = ScratchDir::new();
        let mut config = Pki::generate().server_config(&dir);
        config.cert_file = dir.write("garbage.pem", "this is not a certificate\n");
        let (path, reason) = file_error(acceptor(&config));
        assert_eq!(path, config.cert_file);
        assert_eq!(reason, "no PEM certificate found in it");
    }

    #[test]
    fn garbage_key_file_is_rejected() {
        let dir = ScratchDir::new();
        let mut config = Pki::generate().server_config(&dir);
        config.key_file = dir.write("garbage.key", "-----BEGIN PRIVATE KEY-----\n!!!\n");
        let (path, reason) = file_error(acceptor(&config));
        assert_eq!(path, config.key_file);
        assert!(reason.starts_with("malformed PEM"), "{reason}");
    }

    #[test]
    fn certificate_in_place_of_key_is_rejected() {
        let dir = ScratchDir::new();
        let pki = Pki::generate();
        let mut config = pki.server_config(&dir);
        config.key_file = dir.write("cert-as-key.pem", &pki.server_cert_pem);
        let (path, reason) = file_error(acceptor(&config));
        assert_eq!(path, config.key_file);
        assert_eq!(reason, "no PEM private key found in it");
    }

    #[test]
    fn mismatched_key_is_rejected() {
        let dir = ScratchDir::new();
        let pki = Pki::generate();
        let mut config = pki.server_config(&dir);
        // The client's key belongs to another certificate.
        config.key_file = dir.write("other.key", &pki.client_key_pem);
        let (path, reason) = file_error(acceptor(&config));
        assert_eq!(path, config.key_file);
        assert!(
            reason.contains("does not match the certificate in") && reason.contains("server.pem"),
            "{reason}"
        );
    }

    #[test]
    fn required_client_certificate_needs_a_ca() {
        let dir = ScratchDir::new();
        let mut config = Pki::generate().server_config(&dir);
        config.require_client_cert = true;
        match acceptor(&config) {
            Err(TlsError::Config(reason)) => assert!(reason.contains("ca_file"), "{reason}"),
            Err(other) => panic!("expected a configuration error, got {other}"),
            Ok(_) => panic!("expected a configuration error, got an acceptor"),
        }
    }

    /// A client configuration trusting the test CA, with or without a client certificate.
    fn client_config(pki: &Pki, with_certificate: bool) -> ClientConfig {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
            .unwrap();
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots);
        if with_certificate {
            let chain =
                vec![CertificateDer::from_pem_slice(pki.client_cert_pem.as_bytes()).unwrap()];
            let key = PrivateKeyDer::from_pem_slice(pki.client_key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        } else {
            builder.with_no_client_auth()
        }
    }

    /// Runs a handshake over an in-memory pipe and echoes one message through it. `Ok` when
    /// both sides completed the handshake and the message made it across.
    async fn handshake(
        server: tokio_rustls::TlsAcceptor,
        client: ClientConfig,
    ) -> Result<(), String> {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server_side = async move {
            let mut stream = server.accept(server_io).await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            stream
                .read_exact(&mut buf)
                .await
                .map_err(|e| e.to_string())?;
            stream.write_all(&buf).await.map_err(|e| e.to_string())?;
            stream.flush().await.map_err(|e| e.to_string())?;
            Ok::<(), String>(())
        };
        let client_side = async move {
            let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
            let name = ServerName::try_from("localhost").unwrap();
            let mut stream = connector
                .connect(name, client_io)
                .await
                .map_err(|e| e.to_string())?;
            stream.write_all(b"ping").await.map_err(|e| e.to_string())?;
            stream.flush().await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            // With TLS 1.3 the client finishes its handshake before the server has checked the
            // client certificate; a rejection shows up here, as an alert instead of the echo.
            stream
                .read_exact(&mut buf)
                .await
                .map_err(|e| e.to_string())?;
            if &buf != b"ping" {
                return Err("echo mismatch".to_string());
            }
            Ok::<(), String>(())
        };
        let both = async { tokio::join!(server_side, client_side) };
        let (server_result, client_result) = tokio::time::timeout(Duration::from_secs(10), both)
            .await
            .map_err(|_| "handshake timed out".to_string())?;
        server_result.map_err(|e| format!("server: {e}"))?;
        client_result.map_err(|e| format!("client: {e}"))?;
        Ok(())
    }

    #[tokio::test]
    async fn handshake_without_client_auth() {
        let dir = ScratchDir::new();
        let pki = Pki::generate();
        let server = acceptor(&pki.server_config(&dir)).unwrap();
        handshake(server, client_config(&pki, false)).await.unwrap();
    }

    #[tokio::test]
    async fn required_client_certificate_accepts_a_valid_one() {
        let dir = ScratchDir::new();
        let pki = Pki::generate();
        let mut config = pki.server_config(&dir);
        config.ca_file = Some(dir.write("ca.pem", &pki.ca_pem));
        config.require_client_cert = true;
        let server = acceptor(&config).unwrap();
        handshake(server, client_config(&pki, true)).await.unwrap();
    }

    #[tokio::test]
    async fn required_client_certificate_rejects_a_client_without_one() {
        let dir = ScratchDir::new();
        let pki = Pki::generate();
        let mut config = pki.server_config(&dir);
        config.ca_file = Some(dir.write("ca.pem", &pki.ca_pem));
        config.require_client_cert = true;
        let server = acceptor(&config).unwrap();
        let error = handshake(server, client_config(&pki, false))
            .await
            .unwrap_err();
        assert!(error.starts_with("server: "), "{error}");
        assert!(error.contains("certificate"), "{error}");
    }

    #[tokio::test]
    async fn optional_client_certificate_accepts_both() {
        let dir = ScratchDir::new();
        let pki = Pki::generate();
        let mut config = pki.server_config(&dir);
        config.ca_file = Some(dir.write("ca.pem", &pki.ca_pem));
        let server = acceptor(&config).unwrap();
        handshake(server.clone(), client_config(&pki, true))
            .await
            .unwrap();
        handshake(server, client_config(&pki, false)).await.unwrap();
    }
}
