//! MQTT 5 features: aliases, flow control, sizes, expiry, properties, subscribe options.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Client, bounded, config, connect, publish, start};
use polyhub_broker::BrokerConfig;
use polyhub_mqtt::{
    Packet, Properties, ProtocolVersion, PubResponse, QoS, ReasonCode, RetainHandling,
    SubscriptionOptions,
};

#[tokio::test]
async fn connack_advertises_the_server_capabilities() {
    bounded(async {
        let broker = start(BrokerConfig {
            receive_maximum: 10,
            topic_alias_maximum: 5,
            max_packet_size: 4096,
            ..config()
        })
        .await;
        let (_client, connack) =
            Client::connect(broker.addr, connect(ProtocolVersion::V5, "caps")).await;
        let p = &connack.properties;
        assert_eq!(p.receive_maximum, Some(10));
        assert_eq!(p.topic_alias_maximum, Some(5));
        assert_eq!(p.maximum_packet_size, Some(4096));
        assert_eq!(p.retain_available, Some(1));
        assert_eq!(p.wildcard_subscription_available, Some(1));
        assert_eq!(p.subscription_identifier_available, Some(1));
        assert_eq!(p.shared_subscription_available, Some(1));
        assert_eq!(p.maximum_qos, None);
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn inbound_topic_aliases_are_resolved_and_policed() {
    bounded(async {
        let broker = start(BrokerConfig {
            topic_alias_maximum: 2,
            ..config()
        })
        .await;
        let mut subscriber = broker.client(ProtocolVersion::V311, "sub").await;
        subscriber.subscribe("alias/#", QoS::AtMostOnce).await;
        let mut publisher = broker.client(ProtocolVersion::V5, "pub").await;
        let mut first = publish("alias/long/topic", b"1", QoS::AtMostOnce, false, 0);
        first.properties.topic_alias = Some(1);
        publisher.send(&Packet::Publish(first)).await;
        let mut second = publish("", b"2", QoS::AtMostOnce, false, 0);
        second.properties.topic_alias = Some(1);
        publisher.send(&Packet::Publish(second)).await;
        for payload in ["1", "2"] {
            let received = subscriber.recv_publish().await;
            assert_eq!(received.topic, "alias/long/topic");
            assert_eq!(received.payload, payload.as_bytes());
        }

        let mut too_high = publish("alias/x", b"", QoS::AtMostOnce, false, 0);
        too_high.properties.topic_alias = Some(3);
        publisher.send(&Packet::Publish(too_high)).await;
        let packets = publisher.expect_close().await;
        assert!(matches!(
            packets.as_slice(),
            [Packet::Disconnect(d)] if d.reason_code == ReasonCode::TOPIC_ALIAS_INVALID
        ));

        let mut publisher = broker.client(ProtocolVersion::V5, "pub2").await;
        let mut unknown = publish("", b"", QoS::AtMostOnce, false, 0);
        unknown.properties.topic_alias = Some(2);
        publisher.send(&Packet::Publish(unknown)).await;
        let packets = publisher.expect_close().await;
        assert!(matches!(
            packets.as_slice(),
            [Packet::Disconnect(d)] if d.reason_code == ReasonCode::PROTOCOL_ERROR
        ));
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn outbound_topic_aliases_are_assigned_for_clients_that_accept_them() {
    bounded(async {
        let broker = start(config()).await;
        let mut request = connect(ProtocolVersion::V5, "sub");
        request.properties.topic_alias_maximum = Some(1);
        let (mut subscriber, _) = Client::connect(broker.addr, request).await;
        subscriber.subscribe("a/#", QoS::AtMostOnce).await;
        let mut publisher = broker.client(ProtocolVersion::V311, "pub").await;
        for topic in ["a/one", "a/one", "a/two"] {
            publisher.publish(topic, b"", QoS::AtMostOnce, false).await;
        }
        let first = subscriber.recv_publish().await;
        assert_eq!(
            (first.topic.as_str(), first.properties.topic_alias),
            ("a/one", Some(1))
        );
        let second = subscriber.recv_publish().await;
        assert_eq!(
            (second.topic.as_str(), second.properties.topic_alias),
            ("", Some(1))
        );
        let third = subscriber.recv_publish().await;
        assert_eq!(
            (third.topic.as_str(), third.properties.topic_alias),
            ("a/two", None)
        );
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn client_receive_maximum_limits_messages_in_flight() {
    bounded(async {
        let broker = start(config()).await;
        let mut request = connect(ProtocolVersion::V5, "sub");
        request.properties.receive_maximum = Some(1);
        let (mut subscriber, _) = Client::connect(broker.addr, request).await;
        subscriber.subscribe("rm", QoS::AtLeastOnce).await;
        let mut publisher = broker.client(ProtocolVersion::V311, "pub").await;
        for n in 0..3u8 {
            publisher.publish("rm", &[n], QoS::AtLeastOnce, false).await;
        }
        for n in 0..3u8 {
            let received = subscriber.recv_publish().await;
            assert_eq!(received.payload[0], n);
            subscriber.expect_nothing().await;
            subscriber
                .send(&Packet::PubAck(PubResponse::success(received.packet_id)))
                .await;
        }
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn exceeding_our_receive_maximum_is_a_protocol_violation() {
    bounded(async {
        let broker = start(BrokerConfig {
            receive_maximum: 2,
            ..config()
        })
        .await;
        let mut client = broker.client(ProtocolVersion::V5, "c").await;
        for id in 1..=3u16 {
            client
                .send(&Packet::Publish(publish(
                    "rx",
                    b"",
                    QoS::ExactlyOnce,
                    false,
                    id,
                )))
                .await;
        }
        let packets = client.expect_close().await;
        assert!(matches!(
            packets.last(),
            Some(Packet::Disconnect(d)) if d.reason_code == ReasonCode::RECEIVE_MAXIMUM_EXCEEDED
        ));
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn packets_over_the_maximum_size_are_refused_both_ways() {
    bounded(async {
        let broker = start(BrokerConfig {
            max_packet_size: 200,
            ..config()
        })
        .await;
        // Outbound: the subscriber accepts at most 64 bytes; the big one is dropped.
        let mut request = connect(ProtocolVersion::V5, "small");
        request.properties.maximum_packet_size = Some(64);
        let (mut subscriber, _) = Client::connect(broker.addr, request).await;
        subscriber.subscribe("size", QoS::AtLeastOnce).await;
        let mut publisher = broker.client(ProtocolVersion::V5, "pub").await;
        publisher
            .publish("size", &[0; 100], QoS::AtLeastOnce, false)
            .await;
        publisher
            .publish("size", b"small", QoS::AtLeastOnce, false)
            .await;
        assert_eq!(
            subscriber.recv_publish_acked().await.payload,
            "small".as_bytes()
        );
        subscriber.expect_nothing().await;

        // Inbound: over our 200 bytes → DISCONNECT 0x95.
        publisher
            .send(&Packet::Publish(publish(
                "size",
                &[0; 300],
                QoS::AtMostOnce,
                false,
                0,
            )))
            .await;
        let packets = publisher.expect_close().await;
        assert!(matches!(
            packets.as_slice(),
            [Packet::Disconnect(d)] if d.reason_code == ReasonCode::PACKET_TOO_LARGE
        ));
        broker.stop().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn expired_messages_are_dropped_and_the_rest_carry_the_remaining_interval() {
    bounded(async {
        let broker = start(config()).await;
        let mut subscriber = Client::connect(broker.addr, {
            let mut request = connect(ProtocolVersion::V5, "sub");
            request.clean_start = false;
            request.properties.session_expiry_interval = Some(600);
            request
        })
        .await
        .0;
        subscriber.subscribe("exp/#", QoS::AtLeastOnce).await;
        subscriber.disconnect().await;

        let mut publisher = broker.client(ProtocolVersion::V5, "pub").await;
        for (topic, expiry) in [("exp/short", 2), ("exp/long", 100)] {
            let mut message = publish(topic, b"", QoS::AtLeastOnce, false, 1);
            message.properties.message_expiry_interval = Some(expiry);
            publisher.publish_packet(message).await;
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
        let mut request = connect(ProtocolVersion::V5, "sub");
        request.clean_start = false;
        request.properties.session_expiry_interval = Some(600);
        let (mut subscriber, _) = Client::connect(broker.addr, request).await;
        let received = subscriber.recv_publish_acked().await;
        assert_eq!(received.topic, "exp/long");
        let remaining = received.properties.message_expiry_interval.unwrap();
        assert!((89..=90).contains(&remaining), "{remaining}");
        subscriber.expect_nothing().await;
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn publish_properties_are_forwarded_unchanged_and_in_order() {
    bounded(async {
        let broker = start(config()).await;
        let mut subscriber = broker.client(ProtocolVersion::V5, "sub").await;
        subscriber.subscribe("props", QoS::AtMostOnce).await;
        let mut publisher = broker.client(ProtocolVersion::V5, "pub").await;
        let user_properties = vec![
            ("b".to_string(), "1".to_string()),
            ("a".to_string(), "2".to_string()),
            ("b".to_string(), "3".to_string()),
        ];
        let mut message = publish("props", b"{}", QoS::AtMostOnce, false, 0);
        message.properties = Properties {
            payload_format_indicator: Some(1),
            content_type: Some("application/json".into()),
            response_topic: Some("reply/here".into()),
            correlation_data: Some(Bytes::from_static(b"\x01\x02")),
            user_properties: user_properties.clone(),
            ..Properties::default()
        };
        publisher.publish_packet(message).await;
        let received = subscriber.recv_publish().await;
        let p = &received.properties;
        assert_eq!(p.payload_format_indicator, Some(1));
        assert_eq!(p.content_type.as_deref(), Some("application/json"));
        assert_eq!(p.response_topic.as_deref(), Some("reply/here"));
        assert_eq!(p.correlation_data.as_deref(), Some(&b"\x01\x02"[..]));
        assert_eq!(p.user_properties, user_properties);
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn no_local_and_retain_as_published_options() {
    bounded(async {
        let broker = start(config()).await;
        let mut client = broker.client(ProtocolVersion::V5, "self").await;
        client
            .subscribe_with(
                "nl",
                SubscriptionOptions {
                    no_local: true,
                    ..SubscriptionOptions::default()
                },
                Properties::default(),
            )
            .await;
        client
            .subscribe_with(
                "rap",
                SubscriptionOptions {
                    retain_as_published: true,
                    ..SubscriptionOptions::default()
                },
                Properties::default(),
            )
            .await;
        client.publish("nl", b"mine", QoS::AtMostOnce, false).await;
        client.expect_nothing().await;
        let mut other = broker.client(ProtocolVersion::V5, "other").await;
        other.publish("nl", b"theirs", QoS::AtMostOnce, false).await;
        assert_eq!(client.recv_publish().await.payload, "theirs".as_bytes());

        other.publish("rap", b"kept", QoS::AtMostOnce, true).await;
        let received = client.recv_publish().await;
        assert!(received.retain);
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn retain_handling_decides_when_retained_messages_are_sent() {
    bounded(async {
        let broker = start(config()).await;
        let mut publisher = broker.client(ProtocolVersion::V5, "pub").await;
        publisher.publish("rh", b"r", QoS::AtMostOnce, true).await;
        let mut client = broker.client(ProtocolVersion::V5, "c").await;
        let options = |retain_handling| SubscriptionOptions {
            retain_handling,
            ..SubscriptionOptions::default()
        };

        client
            .subscribe_with(
                "rh",
                options(RetainHandling::DoNotSend),
                Properties::default(),
            )
            .await;
        client.expect_nothing().await;
        client.unsubscribe("rh").await;

        client
            .subscribe_with(
                "rh",
                options(RetainHandling::SendIfNewSubscription),
                Properties::default(),
            )
            .await;
        assert!(client.recv_publish().await.retain);
        client
            .subscribe_with(
                "rh",
                options(RetainHandling::SendIfNewSubscription),
                Properties::default(),
            )
            .await;
        client.expect_nothing().await;

        client
            .subscribe_with(
                "rh",
                options(RetainHandling::SendAtSubscribe),
                Properties::default(),
            )
            .await;
        assert!(client.recv_publish().await.retain);
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn subscription_identifier_comes_with_live_and_retained_messages() {
    bounded(async {
        let broker = start(config()).await;
        let mut publisher = broker.client(ProtocolVersion::V5, "pub").await;
        publisher
            .publish("sid/r", b"r", QoS::AtMostOnce, true)
            .await;
        let mut client = broker.client(ProtocolVersion::V5, "c").await;
        client
            .subscribe_with(
                "sid/#",
                SubscriptionOptions::default(),
                Properties {
                    subscription_identifiers: vec![77],
                    ..Properties::default()
                },
            )
            .await;
        let retained = client.recv_publish().await;
        assert_eq!(retained.properties.subscription_identifiers, vec![77]);
        publisher
            .publish("sid/live", b"l", QoS::AtMostOnce, false)
            .await;
        let live = client.recv_publish().await;
        assert_eq!(live.properties.subscription_identifiers, vec![77]);
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn server_keep_alive_and_response_information() {
    bounded(async {
        let broker = start(BrokerConfig {
            max_keep_alive: 30,
            ..config()
        })
        .await;
        let mut request = connect(ProtocolVersion::V5, "ka");
        request.keep_alive = 600;
        request.properties.request_response_information = Some(1);
        let (_client, connack) = Client::connect(broker.addr, request).await;
        assert_eq!(connack.properties.server_keep_alive, Some(30));
        let info = connack.properties.response_information.unwrap();
        assert!(info.contains("ka"), "{info}");

        let mut request = connect(ProtocolVersion::V5, "ka2");
        request.keep_alive = 20;
        let (_client, connack) = Client::connect(broker.addr, request).await;
        assert_eq!(connack.properties.server_keep_alive, None);
        assert_eq!(connack.properties.response_information, None);
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn enhanced_authentication_is_refused() {
    bounded(async {
        let broker = start(config()).await;
        let mut request = connect(ProtocolVersion::V5, "auth");
        request.properties.authentication_method = Some("SCRAM-SHA-1".into());
        let (mut client, connack) = Client::connect(broker.addr, request).await;
        assert_eq!(connack.reason_code, ReasonCode::BAD_AUTHENTICATION_METHOD);
        client.expect_close().await;
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn invalid_subscription_filter_is_refused_with_the_right_reason() {
    bounded(async {
        let broker = start(config()).await;
        // The codec refuses a SUBSCRIBE with an invalid filter as a whole: MQTT 5 clients get
        // DISCONNECT 0x8F, 3.x clients are disconnected.
        for version in [ProtocolVersion::V5, ProtocolVersion::V311] {
            let mut client = broker.client(version, "c").await;
            // SUBSCRIBE id 1, filter "a/#/b" QoS 0 (encoded by hand: the codec will not).
            let mut bytes = vec![0x82, 0x00, 0x00, 0x01];
            if version.is_v5() {
                bytes.push(0x00);
            }
            bytes.extend_from_slice(&[0x00, 0x05, b'a', b'/', b'#', b'/', b'b', 0x00]);
            bytes[1] = (bytes.len() - 2) as u8;
            client.send_bytes(&bytes).await;
            let packets = client.expect_close().await;
            if version.is_v5() {
                assert!(matches!(
                    packets.as_slice(),
                    [Packet::Disconnect(d)] if d.reason_code == ReasonCode::TOPIC_FILTER_INVALID
                ));
            } else {
                assert!(packets.is_empty());
            }
        }
        broker.stop().await;
    })
    .await;
}
