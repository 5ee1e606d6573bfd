//! MQTT over TLS: the same broker behind `serve_tls`, and the CONNECT timeout.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Client, bounded, config, connect};
use polyhub_broker::{Broker, TlsConfig, tls};
use polyhub_mqtt::{ProtocolVersion, QoS, ReasonCode};
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

/// A scratch directory removed when dropped.
struct ScratchDir(std::path::PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn tls_clients_get_the_full_broker() {
    bounded(async {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let dir = ScratchDir(
            std::env::temp_dir().join(format!("polyhub-broker-tls-{}", std::process::id())),
        );
        std::fs::create_dir_all(&dir.0).unwrap();
        let cert_file = dir.0.join("cert.pem");
        let key_file = dir.0.join("key.pem");
        std::fs::write(&cert_file, certified.cert.pem()).unwrap();
        std::fs::write(&key_file, certified.signing_key.serialize_pem()).unwrap();

        let tls_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tls_addr = tls_listener.local_addr().unwrap();
        let acceptor = tls::acceptor(&TlsConfig {
            listen: tls_addr,
            cert_file,
            key_file,
            ca_file: None,
            require_client_cert: false,
        })
        .unwrap();
        let tcp_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp_addr = tcp_listener.local_addr().unwrap();
        let broker = Broker::new(config());
        let tls_serving = broker.clone();
        let tls_serve = tokio::spawn(async move {
            tls_serving
                .serve_tls(tls_listener, acceptor, std::future::pending::<()>())
                .await
        });
        let tcp_serving = broker.clone();
        let tcp_serve = tokio::spawn(async move {
            tcp_serving
                .serve(tcp_listener, std::future::pending::<()>())
                .await
        });

        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(certified.cert.pem().as_bytes()).unwrap())
            .unwrap();
        let client_config =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));

        // A TCP connection that never completes its handshake does not block others.
        let _stuck = TcpStream::connect(tls_addr).await.unwrap();

        let stream = TcpStream::connect(tls_addr).await.unwrap();
        let tls_stream = connector
            .connect(ServerName::try_from("localhost").unwrap(), stream)
            .await
            .unwrap();
        let (mut secure, connack) = Client::over(Box::new(tls_stream), ProtocolVersion::V5)
            .handshake(connect(ProtocolVersion::V5, "secure"))
            .await;
        assert_eq!(connack.reason_code, ReasonCode::SUCCESS);
        secure.subscribe("tls/#", QoS::AtLeastOnce).await;

        let (mut plain, _) =
            Client::connect(tcp_addr, connect(ProtocolVersion::V311, "plain")).await;
        plain
            .publish("tls/x", b"across", QoS::AtLeastOnce, false)
            .await;
        assert_eq!(
            secure.recv_publish_acked().await.payload,
            "across".as_bytes()
        );
        plain.subscribe("back", QoS::ExactlyOnce).await;
        secure
            .publish("back", b"back", QoS::ExactlyOnce, false)
            .await;
        let echoed = plain.recv_publish_acked().await;
        assert_eq!(echoed.payload, "back".as_bytes());

        tokio::time::timeout(common::WAIT, broker.shutdown())
            .await
            .unwrap();
        assert!(tls_serve.await.unwrap().is_ok());
        assert!(tcp_serve.await.unwrap().is_ok());
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_connection_without_connect_is_closed_after_the_timeout() {
    bounded(async {
        let broker = common::start(config()).await;
        let mut idle = Client::open(broker.addr, ProtocolVersion::V311).await;
        let before = tokio::time::Instant::now();
        assert!(
            idle.expect_close_within(Duration::from_secs(30))
                .await
                .is_empty()
        );
        assert!(before.elapsed() >= Duration::from_secs(10));
        broker.stop().await;
    })
    .await;
}
