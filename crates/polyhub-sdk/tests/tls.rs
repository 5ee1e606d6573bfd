//! TLS from an sgframework certificate directory, against a Mosquitto listener and against
//! polyhub's own TLS listener, both requiring a client certificate; a directory without the CA
//! file is reported at start.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Mosquitto, WAIT, bounded, free_port, wait_retained};
use polyhub_sdk::{CommandOptions, Framework, MessageType, Resource, SdkError};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A CA, a server certificate for 127.0.0.1 and a client certificate: the server files in
/// `server/`, the client's in `client/` with sgframework's file names.
fn make_pki(root: &Path) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "sdk test CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>, common_name: &str, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(
        vec!["127.0.0.1".into(), "localhost".into()],
        "localhost",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) =
        leaf(Vec::new(), "taxisign", ExtendedKeyUsagePurpose::ClientAuth);
    for (dir, files) in [
        (
            "server",
            [
                ("ca.pem", &ca_cert.pem()),
                ("cert.pem", &server_cert),
                ("key.pem", &server_key),
            ],
        ),
        (
            "client",
            [
                ("ca_public_certificate.pem", &ca_cert.pem()),
                ("public_certificate.pem", &client_cert),
                ("private_key.pem", &client_key),
            ],
        ),
    ] {
        std::fs::create_dir_all(root.join(dir)).unwrap();
        for (name, contents) in files {
            std::fs::write(root.join(dir).join(name), contents).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_over_tls_from_certificate_directory() {
    bounded(async {
        let pki = tempfile::tempdir().unwrap();
        make_pki(pki.path());
        let server = pki.path().join("server");
        let tls_port = free_port();
        let broker = Mosquitto::start(&format!(
            "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
            server.join("ca.pem").display(),
            server.join("cert.pem").display(),
            server.join("key.pem").display(),
        ))
        .await;
        let sign = Resource::new("sign", "127.0.0.1", tls_port);
        sign.set_certificate_directory(pki.path().join("client"));
        sign.register_incoming_command(
            "state",
            CommandOptions::new().default_value("False"),
            |_: &Framework, _: MessageType, _: &str, _: &str, _: &str| {},
        )
        .unwrap();
        let task = sign.start().unwrap();
        assert!(sign.wait_ready(WAIT).await, "no TLS connection");
        // Seen through the plain listener of the same broker.
        use common::TestBroker;
        wait_retained(broker.port(), "commandavailable/sign/state", "True").await;
        task.abort();
        wait_retained(broker.port(), "resourceavailable/sign/presence", "False").await;

        // A directory without the CA file is refused at start, naming the file.
        let empty = tempfile::tempdir().unwrap();
        let broken = Resource::new("broken", "127.0.0.1", tls_port);
        broken.set_certificate_directory(empty.path());
        broken.set_reconnect_backoff(Duration::from_millis(50), Duration::from_millis(100));
        match broken.start() {
            Err(SdkError::Tls(error)) => {
                assert!(error.to_string().contains("ca_public_certificate.pem"), "{error}")
            }
            other => panic!("expected a TLS error, got {other:?}"),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_over_polyhub_tls_listener() {
    bounded(async {
        let pki = tempfile::tempdir().unwrap();
        make_pki(pki.path());
        let server = pki.path().join("server");
        let broker = polyhub_broker::Broker::new(polyhub_broker::BrokerConfig {
            sys_interval: 0,
            ..polyhub_broker::BrokerConfig::default()
        });
        let tls_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tls_port = tls_listener.local_addr().unwrap().port();
        let plain_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let plain_port = plain_listener.local_addr().unwrap().port();
        let acceptor = polyhub_broker::tls::acceptor(&polyhub_broker::TlsConfig {
            listen: ([127, 0, 0, 1], tls_port).into(),
            cert_file: server.join("cert.pem"),
            key_file: server.join("key.pem"),
            ca_file: Some(server.join("ca.pem")),
            require_client_cert: true,
        })
        .unwrap();
        let (tls_broker, plain_broker) = (broker.clone(), broker.clone());
        let serving_tls = tokio::spawn(async move {
            let _ = tls_broker
                .serve_tls(tls_listener, acceptor, std::future::pending::<()>())
                .await;
        });
        let serving_plain = tokio::spawn(async move {
            let _ = plain_broker
                .serve(plain_listener, std::future::pending::<()>())
                .await;
        });

        let sign = Resource::new("sign", "127.0.0.1", tls_port);
        sign.set_certificate_directory(pki.path().join("client"));
        sign.register_outgoing_data("speed", Some("0"), true)
            .unwrap();
        let task = sign.start().unwrap();
        assert!(sign.wait_ready(WAIT).await, "no TLS connection to polyhub");
        wait_retained(plain_port, "data/sign/speed", "0").await;
        wait_retained(plain_port, "resourceavailable/sign/presence", "True").await;
        task.abort();
        wait_retained(plain_port, "resourceavailable/sign/presence", "False").await;
        serving_tls.abort();
        serving_plain.abort();
    })
    .await;
}
