//! TLS from an sgframework certificate directory, against a Mosquitto listener and against
//! polyhub's own TLS listener, both requiring a client certificate; a directory without the CA
//! file is reported at start.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{Mosquitto, WAIT, bounded, free_port, wait_retained};
use polyhub_sdk::{CommandOptions, Framework, MessageType, Resource, SdkError};
use polyhub_testkit::pki::Pki;

/// The client's files of `pki` as an sgframework certificate directory (its file names), in a
/// folder of the PKI's directory.
fn sgframework_directory(pki: &Pki) -> PathBuf {
    let dir = pki.dir.path().join("sgframework-client");
    std::fs::create_dir_all(&dir).unwrap();
    for (from, name) in [
        (&pki.ca_file, "ca_public_certificate.pem"),
        (&pki.client_cert_file, "public_certificate.pem"),
        (&pki.client_key_file, "private_key.pem"),
    ] {
        std::fs::copy(from, dir.join(name)).unwrap();
    }
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resource_over_tls_from_certificate_directory() {
    bounded(async {
        let pki = Pki::new();
        let tls_port = free_port();
        let broker = Mosquitto::start(&format!(
            "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
            pki.ca_file.display(),
            pki.server_cert_file.display(),
            pki.server_key_file.display(),
        ))
        .await;
        let sign = Resource::new("sign", "127.0.0.1", tls_port);
        sign.set_certificate_directory(sgframework_directory(&pki));
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
        let pki = Pki::new();
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
            cert_file: pki.server_cert_file.clone(),
            key_file: pki.server_key_file.clone(),
            ca_file: Some(pki.ca_file.clone()),
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
        sign.set_certificate_directory(sgframework_directory(&pki));
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
