//! A throw-away PKI for TLS tests, made with rcgen: a CA, a server certificate for
//! 127.0.0.1 / localhost and a client certificate, written as PEM files to a temporary
//! directory that lives as long as the [`Pki`].

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files.
#[derive(Debug)]
pub struct Pki {
    /// The directory holding the files (deleted when dropped).
    pub dir: tempfile::TempDir,
    /// The CA certificate.
    pub ca_file: PathBuf,
    /// The server certificate (for 127.0.0.1 and localhost), signed by the CA.
    pub server_cert_file: PathBuf,
    /// The server's private key.
    pub server_key_file: PathBuf,
    /// The client certificate (CN `polyhub-test-client`), signed by the CA.
    pub client_cert_file: PathBuf,
    /// The client's private key.
    pub client_key_file: PathBuf,
}

impl Pki {
    /// A fresh CA with its two leaf certificates; each call makes unrelated keys.
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().expect("temporary directory");
        let write = |name: &str, contents: String| -> PathBuf {
            let path = dir.path().join(name);
            std::fs::write(&path, contents).expect("write PEM file");
            path
        };

        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = CertificateParams::new(Vec::new()).expect("CA params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "polyhub test CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf = |names: Vec<String>, common_name: &str, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().expect("leaf key");
            let mut params = CertificateParams::new(names).expect("leaf params");
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            params.use_authority_key_identifier_extension = true;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer).expect("leaf certificate");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(
            vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
            "localhost",
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) = leaf(
            Vec::new(),
            "polyhub-test-client",
            ExtendedKeyUsagePurpose::ClientAuth,
        );

        let ca_file = write("ca.pem", ca_cert.pem());
        let server_cert_file = write("server.pem", server_cert);
        let server_key_file = write("server-key.pem", server_key);
        let client_cert_file = write("client.pem", client_cert);
        let client_key_file = write("client-key.pem", client_key);
        Pki {
            dir,
            ca_file,
            server_cert_file,
            server_key_file,
            client_cert_file,
            client_key_file,
        }
    }

    /// Copies the CA and the client's certificate and key into `into` with sgframework's file
    /// names (`ca_public_certificate.pem`, `public_certificate.pem`, `private_key.pem`).
    pub fn certificate_directory(&self, into: &Path) {
        std::fs::copy(&self.ca_file, into.join("ca_public_certificate.pem")).expect("copy");
        std::fs::copy(&self.client_cert_file, into.join("public_certificate.pem")).expect("copy");
        std::fs::copy(&self.client_key_file, into.join("private_key.pem")).expect("copy");
    }
}

impl Default for Pki {
    fn default() -> Self {
        Pki::new()
    }
}
