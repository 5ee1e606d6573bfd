//! The client against Mosquitto (an independent broker), in MQTT 3.1, 3.1.1 and 5.0.

#[macro_use]
mod common;

use bytes::Bytes;
use common::{Mosquitto, TestBroker, bounded, next_message};
use polyhub_client::{Client, Message, ProtocolVersion, QoS};

scenario_tests!(
    connect_and_disconnect,
    qos_round_trips,
    retained,
    will_on_abrupt_close,
    no_will_on_clean_disconnect,
    dropping_handles_disconnects_cleanly,
    reconnect_and_resubscribe,
    persistent_session,
    manual_acks,
);

async fn start_broker() -> Mosquitto {
    Mosquitto::start().await
}

#[tokio::test]
async fn v5_properties_reach_the_subscriber() {
    bounded(async {
        let mosquitto = Mosquitto::start().await;
        let (subscriber, mut inbox) =
            Client::connect(mosquitto.options("props-sub", ProtocolVersion::V5))
                .await
                .expect("connect");
        let (publisher, _events) =
            Client::connect(mosquitto.options("props-pub", ProtocolVersion::V5))
                .await
                .expect("connect");
        subscriber
            .subscribe("rpc/#", QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        let request = Message::new("rpc/clock", "now?")
            .qos(QoS::AtLeastOnce)
            .user_property("origin", "test")
            .user_property("origin", "repeated")
            .user_property("trace", "abc")
            .response_topic("rpc/clock/reply")
            .correlation_data(Bytes::from_static(b"\x00\x2a"))
            .content_type("text/plain")
            .message_expiry_interval(60)
            .utf8_payload();
        publisher.publish_message(request).await.expect("publish");

        let message = next_message(&mut inbox).await;
        let properties = &message.properties;
        assert_eq!(
            properties.user_properties,
            [
                ("origin".to_owned(), "test".to_owned()),
                ("origin".to_owned(), "repeated".to_owned()),
                ("trace".to_owned(), "abc".to_owned()),
            ]
        );
        assert_eq!(
            properties.response_topic.as_deref(),
            Some("rpc/clock/reply")
        );
        assert_eq!(
            properties.correlation_data.as_deref(),
            Some(&b"\x00\x2a"[..])
        );
        assert_eq!(properties.content_type.as_deref(), Some("text/plain"));
        assert_eq!(properties.payload_format_indicator, Some(1));
        let expiry = properties
            .message_expiry_interval
            .expect("expiry forwarded");
        assert!((55..=60).contains(&expiry), "{expiry}");
    })
    .await;
}

#[tokio::test]
async fn a_stopped_broker_is_detected_by_keep_alive() {
    // SIGSTOP freezes Mosquitto with its sockets open: only the missing PINGRESP can tell.
    bounded(async {
        let mosquitto = Mosquitto::start().await;
        let options = mosquitto
            .options("pinger", ProtocolVersion::V311)
            .keep_alive(std::time::Duration::from_secs(1))
            .connect_timeout(std::time::Duration::from_millis(500));
        let (_client, mut events) = Client::connect(options).await.expect("connect");
        common::connected(&mut events).await;
        let pid = mosquitto.pid().to_string();
        let stop = std::process::Command::new("kill")
            .args(["-STOP", &pid])
            .status();
        assert!(stop.expect("kill -STOP").success());
        let started = tokio::time::Instant::now();
        let reason = common::disconnected(&mut events).await;
        let resumed = std::process::Command::new("kill")
            .args(["-CONT", &pid])
            .status();
        assert!(resumed.expect("kill -CONT").success());
        assert!(
            matches!(
                reason,
                polyhub_client::DisconnectReason::Error(
                    polyhub_client::ConnectionError::KeepAliveTimeout(_)
                )
            ),
            "{reason:?}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(3));
        // Thawed, the broker takes the client back without help.
        common::connected(&mut events).await;
    })
    .await;
}

#[tokio::test]
async fn manual_acks_hold_the_receive_window() {
    common::bounded(async {
        let mut broker = Mosquitto::start().await;
        common::scenarios::manual_acks_hold_the_receive_window(&mut broker, false).await;
    })
    .await;
}
