//! Limits, bad input, slow subscribers, `$SYS`, local clients and shutdown.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::{Client, bounded, config, connect, publish, start};
use polyhub_broker::{Broker, BrokerConfig, MessageProperties};
use polyhub_mqtt::{Packet, ProtocolVersion, QoS, ReasonCode};
use tokio::net::TcpListener;

#[tokio::test]
async fn connections_over_the_limit_are_refused_as_busy() {
    bounded(async {
        let broker = start(BrokerConfig {
            max_connections: 2,
            ..config()
        })
        .await;
        let mut first = broker.client(ProtocolVersion::V311, "a").await;
        let _second = broker.client(ProtocolVersion::V5, "b").await;
        for (version, expected) in [
            (ProtocolVersion::V5, ReasonCode::SERVER_BUSY),
            (ProtocolVersion::V311, ReasonCode::SERVER_UNAVAILABLE),
        ] {
            let (mut third, connack) = Client::connect(broker.addr, connect(version, "c")).await;
            assert_eq!(connack.reason_code, expected);
            third.expect_close().await;
        }
        first.ping().await;
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn unknown_protocol_level_and_name_get_connack_1() {
    bounded(async {
        let broker = start(config()).await;
        // CONNECT, protocol "MQTT" level 6.
        let level_6 = [
            0x10, 0x0f, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x06, 0x02, 0x00, 0x3c, 0x00, 0x03,
            b'a', b'b', b'c',
        ];
        // Protocol name "MQXX" level 4.
        let bad_name = [
            0x10, 0x0f, 0x00, 0x04, b'M', b'Q', b'X', b'X', 0x04, 0x02, 0x00, 0x3c, 0x00, 0x03,
            b'a', b'b', b'c',
        ];
        for bytes in [&level_6[..], &bad_name[..]] {
            let mut client = Client::open(broker.addr, ProtocolVersion::V311).await;
            client.send_bytes(bytes).await;
            let packets = client.expect_close().await;
            match packets.as_slice() {
                [Packet::ConnAck(connack)] => {
                    assert_eq!(
                        connack.reason_code,
                        ReasonCode::UNSUPPORTED_PROTOCOL_VERSION
                    );
                }
                other => panic!("expected CONNACK 1, got {other:?}"),
            }
        }
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn garbage_or_non_connect_first_closes_and_others_are_unharmed() {
    bounded(async {
        let broker = start(config()).await;
        let mut bystander = broker.client(ProtocolVersion::V311, "bystander").await;
        bystander.subscribe("still/here", QoS::AtMostOnce).await;
        let cases: [&[u8]; 4] = [
            // PINGREQ before CONNECT.
            &[0xc0, 0x00],
            // Bad remaining length (five continuation bytes).
            &[0x10, 0xff, 0xff, 0xff, 0xff, 0x7f],
            // Packet type 0.
            &[0x00, 0x00],
            // Truncated CONNECT followed by EOF.
            &[0x10, 0x10, 0x00, 0x04, b'M'],
        ];
        for bytes in cases {
            let mut client = Client::open(broker.addr, ProtocolVersion::V311).await;
            client.send_bytes(bytes).await;
            if bytes.len() == 5 {
                client.drop_connection().await;
                continue;
            }
            assert!(client.expect_close().await.is_empty());
        }
        let mut publisher = broker.client(ProtocolVersion::V5, "pub").await;
        publisher
            .publish("still/here", b"ok", QoS::AtMostOnce, false)
            .await;
        assert_eq!(bystander.recv_publish().await.payload, "ok".as_bytes());
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn wildcard_in_a_publish_topic_closes_with_0x90_in_v5() {
    bounded(async {
        let broker = start(config()).await;
        let mut v5 = broker.client(ProtocolVersion::V5, "v5").await;
        v5.send(&Packet::Publish(publish(
            "ok",
            b"",
            QoS::AtMostOnce,
            false,
            0,
        )))
        .await;
        // Encode by hand: the codec refuses to write a wildcard topic.
        v5.send_bytes(&[0x30, 0x06, 0x00, 0x03, b'a', b'/', b'#', 0x00])
            .await;
        let packets = v5.expect_close().await;
        assert!(matches!(
            packets.as_slice(),
            [Packet::Disconnect(d)] if d.reason_code == ReasonCode::TOPIC_NAME_INVALID
        ));
        let mut v3 = broker.client(ProtocolVersion::V311, "v3").await;
        v3.send_bytes(&[0x30, 0x05, 0x00, 0x03, b'a', b'/', b'+'])
            .await;
        assert!(v3.expect_close().await.is_empty());
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn qos_3_and_second_connect_are_violations() {
    bounded(async {
        let broker = start(config()).await;
        let mut client = broker.client(ProtocolVersion::V5, "q3").await;
        client
            .send_bytes(&[0x36, 0x06, 0x00, 0x01, b'a', 0x00, 0x01, 0x00])
            .await;
        let packets = client.expect_close().await;
        assert!(matches!(
            packets.as_slice(),
            [Packet::Disconnect(d)] if d.reason_code == ReasonCode::MALFORMED_PACKET
        ));

        let mut client = broker.client(ProtocolVersion::V5, "twice").await;
        client
            .send(&Packet::Connect(connect(ProtocolVersion::V5, "twice")))
            .await;
        let packets = client.expect_close().await;
        assert!(matches!(
            packets.as_slice(),
            [Packet::Disconnect(d)] if d.reason_code == ReasonCode::PROTOCOL_ERROR
        ));
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_subscriber_that_never_reads_does_not_stall_the_others() {
    bounded(async {
        let broker = start(BrokerConfig {
            max_queued_messages: 100,
            ..config()
        })
        .await;
        let mut stalled = broker.client(ProtocolVersion::V311, "stalled").await;
        stalled.subscribe("flood", QoS::AtLeastOnce).await;
        let mut fast = broker.client(ProtocolVersion::V311, "fast").await;
        fast.subscribe("flood", QoS::AtMostOnce).await;
        let mut publisher = broker.client(ProtocolVersion::V311, "pub").await;
        let payload = vec![7u8; 4096];
        let total = 2000usize;
        let reader = tokio::spawn(async move {
            for _ in 0..total {
                fast.recv_publish().await;
            }
            fast
        });
        for _ in 0..total {
            publisher
                .publish("flood", &payload, QoS::AtLeastOnce, false)
                .await;
        }
        let _fast = reader.await.unwrap();
        let dropped = broker
            .broker
            .stats()
            .publish_dropped
            .load(Ordering::Relaxed);
        assert!(
            dropped > 0,
            "the stalled subscriber's queue should have overflowed"
        );
        // The stalled client is still connected and its session bounded.
        assert!(
            broker
                .broker
                .stats()
                .messages_stored
                .load(Ordering::Relaxed)
                <= 100 + 100
        );
        drop(stalled);
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn sys_topics_are_published_and_retained() {
    bounded(async {
        let broker = start(BrokerConfig {
            sys_interval: 1,
            ..config()
        })
        .await;
        let mut client = broker.client(ProtocolVersion::V311, "sys").await;
        client.subscribe("$SYS/#", QoS::AtMostOnce).await;
        let mut topics = Vec::new();
        while let Some(Packet::Publish(p)) = client.try_recv(Duration::from_millis(1500)).await {
            topics.push(p.topic);
            if topics.len() > 200 {
                break;
            }
        }
        assert!(
            topics.iter().any(|t| t == "$SYS/broker/clients/connected"),
            "{topics:?}"
        );
        assert!(
            topics.iter().any(|t| t == "$SYS/broker/uptime"),
            "{topics:?}"
        );
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn local_clients_and_network_clients_talk_both_ways() {
    bounded(async {
        let broker = start(config()).await;
        let mut local = broker.broker.local_client("local").unwrap();
        local.subscribe("to/local", QoS::AtLeastOnce).await.unwrap();
        let mut remote = broker.client(ProtocolVersion::V5, "remote").await;
        remote.subscribe("to/remote", QoS::AtLeastOnce).await;

        remote
            .publish("to/local", b"hi local", QoS::AtLeastOnce, false)
            .await;
        let received = local.recv().await.unwrap();
        assert_eq!(received.topic, "to/local");
        assert_eq!(received.payload, "hi local".as_bytes());
        assert_eq!(received.qos, QoS::AtLeastOnce);

        local
            .publish_with_properties(
                "to/remote",
                "hi remote",
                QoS::AtLeastOnce,
                false,
                MessageProperties {
                    user_properties: vec![("k".into(), "v".into())],
                    ..MessageProperties::default()
                },
            )
            .await
            .unwrap();
        let received = remote.recv_publish_acked().await;
        assert_eq!(received.payload, "hi remote".as_bytes());
        assert_eq!(
            received.properties.user_properties,
            vec![("k".to_string(), "v".to_string())]
        );

        // Retained through the local client, seen by a new network subscriber.
        local
            .publish("state", Bytes::from_static(b"on"), QoS::AtMostOnce, true)
            .await
            .unwrap();
        let mut late = broker.client(ProtocolVersion::V311, "late").await;
        late.subscribe("state", QoS::AtMostOnce).await;
        assert!(late.recv_publish().await.retain);

        // Ids are exclusive; invalid topics are refused.
        assert!(broker.broker.local_client("local").is_err());
        assert!(
            local
                .publish("a/#", "x", QoS::AtMostOnce, false)
                .await
                .is_err()
        );
        let (mut clash, connack) =
            Client::connect(broker.addr, connect(ProtocolVersion::V311, "local")).await;
        assert_eq!(connack.reason_code, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
        clash.expect_close().await;

        // Dropping the local client ends its session and frees the id.
        drop(local);
        remote
            .publish("to/local", b"gone", QoS::AtLeastOnce, false)
            .await;
        assert!(broker.broker.local_client("local").is_ok());
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn local_recv_returns_none_after_shutdown() {
    bounded(async {
        let broker = Broker::new(config());
        let mut local = broker.local_client("l").unwrap();
        local.subscribe("x", QoS::AtMostOnce).await.unwrap();
        local
            .publish("x", "1", QoS::AtMostOnce, false)
            .await
            .unwrap();
        broker.shutdown().await;
        assert_eq!(local.recv().await.unwrap().payload, "1".as_bytes());
        assert!(local.recv().await.is_none());
        assert!(
            local
                .publish("x", "2", QoS::AtMostOnce, false)
                .await
                .is_err()
        );
    })
    .await;
}

#[tokio::test]
async fn shutdown_ends_serve_and_disconnects_clients() {
    bounded(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let broker = Broker::new(config());
        let serving = broker.clone();
        let serve =
            tokio::spawn(
                async move { serving.serve(listener, std::future::pending::<()>()).await },
            );
        let (mut v5, _) = Client::connect(addr, connect(ProtocolVersion::V5, "v5")).await;
        let (mut v3, _) = Client::connect(addr, connect(ProtocolVersion::V311, "v3")).await;
        tokio::time::timeout(common::WAIT, broker.shutdown())
            .await
            .unwrap();
        let packets = v5.expect_close().await;
        assert!(matches!(
            packets.as_slice(),
            [Packet::Disconnect(d)] if d.reason_code == ReasonCode::SERVER_SHUTTING_DOWN
        ));
        assert!(v3.expect_close().await.is_empty());
        assert!(serve.await.unwrap().is_ok());
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    })
    .await;
}

#[tokio::test]
async fn serve_returns_when_its_shutdown_future_completes() {
    bounded(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let broker = Broker::new(config());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let serving = broker.clone();
        let serve = tokio::spawn(async move {
            serving
                .serve(listener, async {
                    let _ = stopped.await;
                })
                .await
        });
        stop.send(()).unwrap();
        assert!(serve.await.unwrap().is_ok());
    })
    .await;
}

#[tokio::test]
async fn invalid_utf8_topic_is_malformed_and_publishes_the_will() {
    bounded(async {
        let broker = start(config()).await;
        let mut watcher = broker.client(ProtocolVersion::V311, "watcher").await;
        watcher.subscribe("will/#", QoS::AtMostOnce).await;
        let mut request = connect(ProtocolVersion::V5, "bad");
        request.will = Some(common::will(
            "will/bad",
            b"violated",
            QoS::AtMostOnce,
            false,
        ));
        let (mut client, _) = Client::connect(broker.addr, request).await;
        // PUBLISH QoS 0, topic of two bytes 0xC3 0x28 (invalid UTF-8), no properties.
        client
            .send_bytes(&[0x30, 0x05, 0x00, 0x02, 0xc3, 0x28, 0x00])
            .await;
        let packets = client.expect_close().await;
        assert!(matches!(
            packets.as_slice(),
            [Packet::Disconnect(d)] if d.reason_code == ReasonCode::MALFORMED_PACKET
        ));
        assert_eq!(watcher.recv_publish().await.payload, "violated".as_bytes());
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_3x_client_above_max_keep_alive_is_refused_as_mosquitto_does() {
    bounded(async {
        let broker = start(BrokerConfig {
            max_keep_alive: 30,
            ..config()
        })
        .await;
        for version in [ProtocolVersion::V31, ProtocolVersion::V311] {
            // Above the limit, or none at all: a 3.x client cannot be told a lower one.
            for keep_alive in [31, 600, 0] {
                let mut request = connect(version, "ka-3x");
                request.keep_alive = keep_alive;
                let (mut client, connack) = Client::connect(broker.addr, request).await;
                assert_eq!(
                    connack.reason_code,
                    ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
                    "{version:?} keep-alive {keep_alive}: identifier rejected (3.x code 2)"
                );
                client.expect_close().await;
            }
            let mut request = connect(version, "ka-3x");
            request.keep_alive = 30;
            let (client, connack) = Client::connect(broker.addr, request).await;
            assert_eq!(connack.reason_code, ReasonCode::SUCCESS);
            client.disconnect().await;
        }
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn without_a_keep_alive_limit_a_3x_client_may_have_none() {
    bounded(async {
        let broker = start(config()).await;
        let mut request = connect(ProtocolVersion::V311, "no-ka");
        request.keep_alive = 0;
        let (client, connack) = Client::connect(broker.addr, request).await;
        assert_eq!(connack.reason_code, ReasonCode::SUCCESS);
        client.disconnect().await;
        broker.stop().await;
    })
    .await;
}
