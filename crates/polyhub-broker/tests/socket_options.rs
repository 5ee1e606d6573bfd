//! A broker with Nagle's algorithm left on (`[mqtt] tcp_nodelay = false`) serves clients like
//! the default one. Whether the option reaches the accepted sockets is checked against the
//! sockets themselves by the unit tests of the accept loop (`broker.rs`), which can see them.

mod common;

use common::{Client, WAIT, bounded, config, connect};
use polyhub_broker::Broker;
use polyhub_broker::config::SocketOptions;
use polyhub_mqtt::{ProtocolVersion, QoS, ReasonCode};
use tokio::net::TcpListener;

/// Messages per QoS level: enough for several of them to be in flight behind an
/// unacknowledged segment, the case Nagle's algorithm holds back.
const MESSAGES: u16 = 50;

#[tokio::test]
async fn a_broker_with_nagle_on_delivers_every_message_in_order() {
    bounded(async {
        let nagle = SocketOptions { tcp_nodelay: false };
        let broker = Broker::with_socket_options(config(), nagle);
        assert_eq!(broker.socket_options(), nagle);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let serving = broker.clone();
        let serve =
            tokio::spawn(async move { serving.serve(listener, std::future::pending()).await });

        let (mut subscriber, connack) =
            Client::connect(address, connect(ProtocolVersion::V311, "sub")).await;
        assert_eq!(connack.reason_code, ReasonCode::SUCCESS);
        subscriber.subscribe("nagle/#", QoS::AtLeastOnce).await;
        let (mut publisher, connack) =
            Client::connect(address, connect(ProtocolVersion::V5, "pub")).await;
        assert_eq!(connack.reason_code, ReasonCode::SUCCESS);

        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce] {
            // Published back to back, so the broker's writes to the subscriber follow each
            // other faster than its acknowledgements come back.
            for n in 0..MESSAGES {
                let reason = publisher
                    .publish(&format!("nagle/{n}"), &n.to_be_bytes(), qos, false)
                    .await;
                assert!(!reason.is_error(), "{reason:?}");
            }
            for n in 0..MESSAGES {
                let received = subscriber.recv_publish_acked().await;
                assert_eq!(received.topic, format!("nagle/{n}"));
                assert_eq!(received.payload, n.to_be_bytes().as_slice());
                assert_eq!(received.qos, qos);
            }
        }
        subscriber.expect_nothing().await;

        publisher.disconnect().await;
        subscriber.disconnect().await;
        tokio::time::timeout(WAIT, broker.shutdown())
            .await
            .expect("shutdown did not finish");
        let served = tokio::time::timeout(WAIT, serve)
            .await
            .expect("serve did not return after shutdown")
            .unwrap();
        assert!(served.is_ok());
    })
    .await;
}
