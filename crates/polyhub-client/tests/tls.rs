//! TLS against Mosquitto: server authentication, client certificates, the sgframework
//! certificate directory, and the errors when trust or files are missing.

mod common;

use common::{Mosquitto, MosquittoTls, Pki, TestBroker, bounded, next_message};
use polyhub_client::{
    Client, ClientOptions, ConnectionError, ProtocolVersion, QoS, TlsError, TlsOptions,
};

/// Subscribe to our own topic and publish to it: the whole path works over TLS.
async fn round_trip(options: ClientOptions) {
    let (client, mut events) = Client::connect(options).await.expect("connect over TLS");
    client
        .subscribe("secure/#", QoS::ExactlyOnce)
        .await
        .expect("subscribe");
    client
        .publish("secure/echo", QoS::ExactlyOnce, false, "sealed")
        .await
        .expect("publish");
    let message = next_message(&mut events).await;
    assert_eq!(message.payload, "sealed");
    client.disconnect().await.expect("disconnect");
}

#[tokio::test]
async fn tls_with_a_ca_file_in_every_version() {
    bounded(async {
        let pki = Pki::new();
        let mosquitto = Mosquitto::start_tls(MosquittoTls {
            pki: &pki,
            require_certificate: false,
        })
        .await;
        let tls = TlsOptions::from_ca_file(&pki.ca_file).expect("load CA");
        for version in [
            ProtocolVersion::V31,
            ProtocolVersion::V311,
            ProtocolVersion::V5,
        ] {
            round_trip(mosquitto.options("tls", version).tls(tls.clone())).await;
        }
        // The name checked can differ from the host connected to.
        round_trip(
            mosquitto
                .options("tls-named", ProtocolVersion::V311)
                .tls(tls.server_name("localhost")),
        )
        .await;
    })
    .await;
}

#[tokio::test]
async fn tls_with_a_client_certificate() {
    bounded(async {
        let pki = Pki::new();
        let mosquitto = Mosquitto::start_tls(MosquittoTls {
            pki: &pki,
            require_certificate: true,
        })
        .await;

        let with_files = TlsOptions::from_ca_and_client_files(
            &pki.ca_file,
            &pki.client_cert_file,
            &pki.client_key_file,
        )
        .expect("load files");
        round_trip(
            mosquitto
                .options("files", ProtocolVersion::V5)
                .tls(with_files),
        )
        .await;

        let directory = tempfile::tempdir().expect("directory");
        pki.certificate_directory(directory.path());
        let from_directory =
            TlsOptions::from_certificate_directory(directory.path()).expect("load directory");
        round_trip(
            mosquitto
                .options("sgframework", ProtocolVersion::V31)
                .tls(from_directory),
        )
        .await;

        // Without a certificate the broker refuses the handshake.
        let anonymous = TlsOptions::from_ca_file(&pki.ca_file).expect("load CA");
        let refused = Client::connect(
            mosquitto
                .options("anonymous", ProtocolVersion::V311)
                .tls(anonymous),
        )
        .await;
        assert!(refused.is_err(), "connected without a client certificate");
    })
    .await;
}

#[tokio::test]
async fn a_server_certificate_from_another_ca_is_refused() {
    bounded(async {
        let pki = Pki::new();
        let mosquitto = Mosquitto::start_tls(MosquittoTls {
            pki: &pki,
            require_certificate: false,
        })
        .await;
        let stranger = Pki::new();
        let tls = TlsOptions::from_ca_file(&stranger.ca_file).expect("load CA");
        match Client::connect(mosquitto.options("wary", ProtocolVersion::V311).tls(tls)).await {
            Err(ConnectionError::TlsHandshake(error)) => {
                assert!(error.to_string().contains("certificate"), "{error}");
            }
            other => panic!("expected a handshake failure, got {:?}", other.map(|_| ())),
        }
    })
    .await;
}

#[test]
fn tls_file_errors_name_the_file() {
    let missing = std::path::Path::new("/nonexistent/ca.pem");
    match TlsOptions::from_ca_file(missing) {
        Err(TlsError::File { path, .. }) => assert_eq!(path, missing),
        other => panic!("{other:?}"),
    }

    let pki = Pki::new();
    // A key where a certificate should be.
    match TlsOptions::from_ca_file(&pki.client_key_file) {
        Err(TlsError::File { path, reason }) => {
            assert_eq!(path, pki.client_key_file);
            assert!(reason.contains("no PEM certificate"), "{reason}");
        }
        other => panic!("{other:?}"),
    }

    // A certificate directory with a certificate but no key.
    let directory = tempfile::tempdir().expect("directory");
    std::fs::copy(
        &pki.ca_file,
        directory.path().join("ca_public_certificate.pem"),
    )
    .expect("copy");
    std::fs::copy(
        &pki.client_cert_file,
        directory.path().join("public_certificate.pem"),
    )
    .expect("copy");
    assert!(matches!(
        TlsOptions::from_certificate_directory(directory.path()),
        Err(TlsError::IncompleteClientIdentity { .. })
    ));
    // With only the CA it is server authentication alone.
    std::fs::remove_file(directory.path().join("public_certificate.pem")).expect("remove");
    assert!(TlsOptions::from_certificate_directory(directory.path()).is_ok());

    // A key that does not belong to the certificate.
    let other = Pki::new();
    assert!(matches!(
        TlsOptions::from_ca_and_client_files(
            &pki.ca_file,
            &pki.client_cert_file,
            &other.client_key_file
        ),
        Err(TlsError::Config(_))
    ));
}
