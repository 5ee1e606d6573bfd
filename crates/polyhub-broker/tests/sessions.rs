//! Wills, persistent sessions, redelivery, takeover and client ids.

mod common;

use std::time::Duration;

use common::{Client, bounded, config, connect, start, will};
use polyhub_broker::BrokerConfig;
use polyhub_broker::config::QueueFullPolicy;
use polyhub_mqtt::{Disconnect, Packet, Properties, ProtocolVersion, PubResponse, QoS, ReasonCode};

#[tokio::test]
async fn will_is_published_on_abrupt_close_but_not_after_disconnect() {
    bounded(async {
        let broker = start(config()).await;
        let mut watcher = broker.client(ProtocolVersion::V311, "watcher").await;
        watcher.subscribe("will/#", QoS::AtLeastOnce).await;

        for version in [
            ProtocolVersion::V31,
            ProtocolVersion::V311,
            ProtocolVersion::V5,
        ] {
            let mut request = connect(version, "dying");
            request.will = Some(will("will/dying", b"gone", QoS::AtLeastOnce, false));
            let (client, _) = Client::connect(broker.addr, request.clone()).await;
            client.drop_connection().await;
            let published = watcher.recv_publish_acked().await;
            assert_eq!(published.topic, "will/dying");
            assert_eq!(published.payload, "gone".as_bytes());

            let (client, _) = Client::connect(broker.addr, request).await;
            client.disconnect().await;
            watcher.expect_nothing().await;
        }
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn retained_will_is_kept_for_later_subscribers() {
    bounded(async {
        let broker = start(config()).await;
        let mut request = connect(ProtocolVersion::V311, "dying");
        request.will = Some(will("status/dying", b"offline", QoS::AtMostOnce, true));
        let (client, _) = Client::connect(broker.addr, request).await;
        client.drop_connection().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut late = broker.client(ProtocolVersion::V311, "late").await;
        late.subscribe("status/+", QoS::AtMostOnce).await;
        let retained = late.recv_publish().await;
        assert_eq!(retained.payload, "offline".as_bytes());
        assert!(retained.retain);
        broker.stop().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn keep_alive_timeout_closes_and_publishes_the_will() {
    bounded(async {
        let broker = start(config()).await;
        let mut watcher = broker.client(ProtocolVersion::V311, "watcher").await;
        watcher.subscribe("will/#", QoS::AtMostOnce).await;
        let mut request = connect(ProtocolVersion::V5, "sleepy");
        request.keep_alive = 2;
        request.will = Some(will("will/sleepy", b"timeout", QoS::AtMostOnce, false));
        let (mut sleepy, _) = Client::connect(broker.addr, request).await;
        // 1.5 × 2 s later (paused clock: advances as soon as everything is idle).
        let before = tokio::time::Instant::now();
        let packets = sleepy.expect_close().await;
        assert!(before.elapsed() >= Duration::from_secs(3));
        assert!(matches!(
            packets.as_slice(),
            [Packet::Disconnect(d)] if d.reason_code == ReasonCode::KEEP_ALIVE_TIMEOUT
        ));
        assert_eq!(watcher.recv_publish().await.payload, "timeout".as_bytes());
        broker.stop().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn keep_alive_is_reset_by_any_packet() {
    bounded(async {
        let broker = start(config()).await;
        let mut request = connect(ProtocolVersion::V311, "pinger");
        request.keep_alive = 2;
        let (mut client, _) = Client::connect(broker.addr, request).await;
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            client.ping().await;
        }
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn v5_disconnect_with_will_message_publishes_it() {
    bounded(async {
        let broker = start(config()).await;
        let mut watcher = broker.client(ProtocolVersion::V5, "watcher").await;
        watcher.subscribe("will/#", QoS::AtMostOnce).await;
        let mut request = connect(ProtocolVersion::V5, "leaver");
        request.will = Some(will("will/leaver", b"bye", QoS::AtMostOnce, false));
        let (mut client, _) = Client::connect(broker.addr, request).await;
        client
            .send(&Packet::Disconnect(Disconnect::with_reason(
                ReasonCode::DISCONNECT_WITH_WILL_MESSAGE,
            )))
            .await;
        client.expect_close().await;
        assert_eq!(watcher.recv_publish().await.payload, "bye".as_bytes());
        broker.stop().await;
    })
    .await;
}

fn delayed_will_connect(client_id: &str, delay: u32, expiry: u32) -> polyhub_mqtt::Connect {
    let mut request = connect(ProtocolVersion::V5, client_id);
    request.properties.session_expiry_interval = Some(expiry);
    let mut last_will = will("will/delayed", b"late", QoS::AtMostOnce, false);
    last_will.properties.will_delay_interval = Some(delay);
    request.will = Some(last_will);
    request
}

#[tokio::test(start_paused = true)]
async fn v5_will_delay_postpones_the_will_and_a_reconnect_cancels_it() {
    bounded(async {
        let broker = start(config()).await;
        let mut watcher = broker.client(ProtocolVersion::V5, "watcher").await;
        watcher.subscribe("will/#", QoS::AtMostOnce).await;

        // Delayed, then published.
        let (client, _) = Client::connect(broker.addr, delayed_will_connect("d1", 5, 100)).await;
        client.drop_connection().await;
        let start = tokio::time::Instant::now();
        match watcher.try_recv(Duration::from_secs(20)).await {
            Some(Packet::Publish(will)) => assert_eq!(will.payload, "late".as_bytes()),
            other => panic!("expected the will, got {other:?}"),
        }
        assert!(start.elapsed() >= Duration::from_secs(5));

        // Delayed, then cancelled by a reconnect within the delay.
        let (client, _) = Client::connect(broker.addr, delayed_will_connect("d2", 5, 100)).await;
        client.drop_connection().await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut resumed = connect(ProtocolVersion::V5, "d2");
        resumed.clean_start = false;
        resumed.properties.session_expiry_interval = Some(100);
        let (_client, connack) = Client::connect(broker.addr, resumed).await;
        assert!(connack.session_present);
        assert!(watcher.try_recv(Duration::from_secs(10)).await.is_none());

        // Session expiry shorter than the delay: the will goes when the session ends.
        let (client, _) = Client::connect(broker.addr, delayed_will_connect("d3", 50, 2)).await;
        client.drop_connection().await;
        let start = tokio::time::Instant::now();
        assert_eq!(watcher.recv_publish().await.payload, "late".as_bytes());
        let waited = start.elapsed();
        assert!(waited >= Duration::from_secs(2) && waited < Duration::from_secs(50));
        broker.stop().await;
    })
    .await;
}

fn persistent(version: ProtocolVersion, client_id: &str) -> polyhub_mqtt::Connect {
    let mut request = connect(version, client_id);
    request.clean_start = false;
    if version.is_v5() {
        request.properties.session_expiry_interval = Some(3600);
    }
    request
}

#[tokio::test]
async fn persistent_session_keeps_subscriptions_and_queues_qos1_and_2_offline() {
    bounded(async {
        let broker = start(config()).await;
        for version in [
            ProtocolVersion::V31,
            ProtocolVersion::V311,
            ProtocolVersion::V5,
        ] {
            let client_id = format!("p{}", version.level());
            let (mut client, connack) =
                Client::connect(broker.addr, persistent(version, &client_id)).await;
            assert!(!connack.session_present);
            client.subscribe("offline/#", QoS::ExactlyOnce).await;
            client.disconnect().await;

            let mut publisher = broker.client(ProtocolVersion::V311, "pub").await;
            publisher
                .publish("offline/0", b"q0", QoS::AtMostOnce, false)
                .await;
            publisher
                .publish("offline/1", b"q1", QoS::AtLeastOnce, false)
                .await;
            publisher
                .publish("offline/2", b"q2", QoS::ExactlyOnce, false)
                .await;
            publisher.disconnect().await;

            let (mut client, connack) =
                Client::connect(broker.addr, persistent(version, &client_id)).await;
            // MQTT 3.1's CONNACK has no session-present flag.
            assert_eq!(connack.session_present, version != ProtocolVersion::V31);
            let first = client.recv_publish_acked().await;
            assert_eq!(
                (first.payload.as_ref(), first.qos),
                (&b"q1"[..], QoS::AtLeastOnce)
            );
            let second = client.recv_publish_acked().await;
            assert_eq!(
                (second.payload.as_ref(), second.qos),
                (&b"q2"[..], QoS::ExactlyOnce)
            );
            client.expect_nothing().await;

            // Clean start discards the session.
            let mut clean = connect(version, &client_id);
            clean.clean_start = true;
            let (client, connack) = Client::connect(broker.addr, clean).await;
            assert!(!connack.session_present);
            client.disconnect().await;
        }
        broker.stop().await;
    })
    .await;
}

async fn queue_policy_keeps(policy: QueueFullPolicy) -> Vec<u8> {
    let broker = start(BrokerConfig {
        max_queued_messages: 3,
        queue_full_policy: policy,
        ..config()
    })
    .await;
    let (mut client, _) =
        Client::connect(broker.addr, persistent(ProtocolVersion::V311, "q")).await;
    client.subscribe("bound", QoS::AtLeastOnce).await;
    client.disconnect().await;
    let mut publisher = broker.client(ProtocolVersion::V311, "pub").await;
    for n in 0..6u8 {
        publisher
            .publish("bound", &[n], QoS::AtLeastOnce, false)
            .await;
    }
    assert_eq!(
        broker
            .broker
            .stats()
            .publish_dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        3
    );
    let (mut client, _) =
        Client::connect(broker.addr, persistent(ProtocolVersion::V311, "q")).await;
    let mut kept = Vec::new();
    while let Some(Packet::Publish(publish)) = client.try_recv(common::QUIET).await {
        kept.push(publish.payload[0]);
        client
            .send(&Packet::PubAck(PubResponse::success(publish.packet_id)))
            .await;
    }
    broker.stop().await;
    kept
}

#[tokio::test]
async fn offline_queue_is_bounded_and_drops_per_policy() {
    bounded(async {
        assert_eq!(
            queue_policy_keeps(QueueFullPolicy::DropNewest).await,
            vec![0, 1, 2]
        );
        assert_eq!(
            queue_policy_keeps(QueueFullPolicy::DropOldest).await,
            vec![3, 4, 5]
        );
    })
    .await;
}

#[tokio::test]
async fn unacknowledged_messages_are_resent_with_dup_after_reconnect() {
    bounded(async {
        let broker = start(config()).await;
        let (mut client, _) =
            Client::connect(broker.addr, persistent(ProtocolVersion::V311, "redeliver")).await;
        client.subscribe("r/+", QoS::ExactlyOnce).await;
        let mut publisher = broker.client(ProtocolVersion::V311, "pub").await;
        publisher
            .publish("r/1", b"one", QoS::AtLeastOnce, false)
            .await;
        publisher
            .publish("r/2", b"two", QoS::ExactlyOnce, false)
            .await;
        publisher
            .publish("r/3", b"three", QoS::ExactlyOnce, false)
            .await;
        let one = client.recv_publish().await;
        let two = client.recv_publish().await;
        let three = client.recv_publish().await;
        // PUBREC the third only: it must come back as PUBREL, not PUBLISH.
        client
            .send(&Packet::PubRec(PubResponse::success(three.packet_id)))
            .await;
        assert!(matches!(client.recv().await, Packet::PubRel(r) if r.packet_id == three.packet_id));
        client.drop_connection().await;

        let (mut client, connack) =
            Client::connect(broker.addr, persistent(ProtocolVersion::V311, "redeliver")).await;
        assert!(connack.session_present);
        let again_one = client.recv_publish().await;
        assert!(again_one.dup);
        assert_eq!(again_one.packet_id, one.packet_id);
        assert_eq!(again_one.payload, "one".as_bytes());
        let again_two = client.recv_publish().await;
        assert!(again_two.dup);
        assert_eq!(again_two.packet_id, two.packet_id);
        match client.recv().await {
            Packet::PubRel(rel) => assert_eq!(rel.packet_id, three.packet_id),
            other => panic!("expected PUBREL, got {other:?}"),
        }
        client
            .send(&Packet::PubAck(PubResponse::success(one.packet_id)))
            .await;
        client
            .send(&Packet::PubRec(PubResponse::success(two.packet_id)))
            .await;
        assert!(matches!(client.recv().await, Packet::PubRel(r) if r.packet_id == two.packet_id));
        client
            .send(&Packet::PubComp(PubResponse::success(two.packet_id)))
            .await;
        client
            .send(&Packet::PubComp(PubResponse::success(three.packet_id)))
            .await;
        client.disconnect().await;
        let (mut client, _) =
            Client::connect(broker.addr, persistent(ProtocolVersion::V311, "redeliver")).await;
        client.expect_nothing().await;
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn inflight_window_holds_back_the_rest_until_acknowledged() {
    bounded(async {
        let broker = start(BrokerConfig {
            max_inflight: 2,
            ..config()
        })
        .await;
        let mut subscriber = broker.client(ProtocolVersion::V311, "sub").await;
        subscriber.subscribe("w", QoS::AtLeastOnce).await;
        let mut publisher = broker.client(ProtocolVersion::V311, "pub").await;
        for n in 0..4u8 {
            publisher.publish("w", &[n], QoS::AtLeastOnce, false).await;
        }
        let first = subscriber.recv_publish().await;
        let second = subscriber.recv_publish().await;
        subscriber.expect_nothing().await;
        subscriber
            .send(&Packet::PubAck(PubResponse::success(first.packet_id)))
            .await;
        assert_eq!(subscriber.recv_publish_acked().await.payload[0], 2);
        subscriber
            .send(&Packet::PubAck(PubResponse::success(second.packet_id)))
            .await;
        assert_eq!(subscriber.recv_publish_acked().await.payload[0], 3);
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn takeover_closes_the_older_connection_and_keeps_the_session() {
    bounded(async {
        let broker = start(config()).await;
        let mut watcher = broker.client(ProtocolVersion::V311, "watcher").await;
        watcher.subscribe("will/#", QoS::AtMostOnce).await;

        let mut first_request = persistent(ProtocolVersion::V5, "dup");
        first_request.will = Some(will("will/dup", b"old", QoS::AtMostOnce, false));
        let (mut first, _) = Client::connect(broker.addr, first_request).await;
        first.subscribe("mine", QoS::AtLeastOnce).await;

        let (mut second, connack) =
            Client::connect(broker.addr, persistent(ProtocolVersion::V311, "dup")).await;
        assert!(connack.session_present);
        let packets = first.expect_close().await;
        assert!(matches!(
            packets.as_slice(),
            [Packet::Disconnect(d)] if d.reason_code == ReasonCode::SESSION_TAKEN_OVER
        ));
        // The old connection's will goes out (no will delay).
        assert_eq!(watcher.recv_publish().await.payload, "old".as_bytes());

        // The subscription came along with the session.
        let mut publisher = broker.client(ProtocolVersion::V311, "pub").await;
        publisher
            .publish("mine", b"x", QoS::AtLeastOnce, false)
            .await;
        assert_eq!(second.recv_publish_acked().await.payload, "x".as_bytes());
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn takeover_with_clean_start_gets_a_fresh_session() {
    bounded(async {
        let broker = start(config()).await;
        let (mut first, _) =
            Client::connect(broker.addr, persistent(ProtocolVersion::V311, "dup")).await;
        first.subscribe("mine", QoS::AtLeastOnce).await;
        let (mut second, connack) =
            Client::connect(broker.addr, connect(ProtocolVersion::V311, "dup")).await;
        assert!(!connack.session_present);
        assert!(first.expect_close().await.is_empty());
        let mut publisher = broker.client(ProtocolVersion::V311, "pub").await;
        publisher
            .publish("mine", b"x", QoS::AtLeastOnce, false)
            .await;
        second.expect_nothing().await;
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn empty_client_ids_follow_each_versions_rules() {
    bounded(async {
        let broker = start(config()).await;
        // 3.1: always rejected.
        let (mut client, connack) =
            Client::connect(broker.addr, connect(ProtocolVersion::V31, "")).await;
        assert_eq!(connack.reason_code, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
        client.expect_close().await;
        // 3.1.1 without clean session: rejected.
        let (mut client, connack) =
            Client::connect(broker.addr, persistent(ProtocolVersion::V311, "")).await;
        assert_eq!(connack.reason_code, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
        client.expect_close().await;
        // 3.1.1 clean: accepted.
        let (mut client, connack) =
            Client::connect(broker.addr, connect(ProtocolVersion::V311, "")).await;
        assert_eq!(connack.reason_code, ReasonCode::SUCCESS);
        client.ping().await;
        // 5.0: accepted and told its id.
        let (mut client, connack) =
            Client::connect(broker.addr, persistent(ProtocolVersion::V5, "")).await;
        assert_eq!(connack.reason_code, ReasonCode::SUCCESS);
        let assigned = connack.properties.assigned_client_identifier.unwrap();
        assert!(!assigned.is_empty());
        client.ping().await;
        broker.stop().await;
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn v5_session_expiry_ends_the_session_after_the_interval() {
    bounded(async {
        let broker = start(config()).await;
        let mut request = connect(ProtocolVersion::V5, "exp");
        request.clean_start = false;
        request.properties.session_expiry_interval = Some(10);
        let (client, _) = Client::connect(broker.addr, request.clone()).await;
        client.disconnect().await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (client, connack) = Client::connect(broker.addr, request.clone()).await;
        assert!(connack.session_present);
        client.disconnect().await;
        tokio::time::sleep(Duration::from_secs(11)).await;
        let (client, connack) = Client::connect(broker.addr, request.clone()).await;
        assert!(!connack.session_present);
        client.disconnect().await;

        // Expiry 0 (the default) ends the session at disconnect.
        request.properties.session_expiry_interval = None;
        let (client, _) = Client::connect(broker.addr, request.clone()).await;
        client.disconnect().await;
        let (_client, connack) = Client::connect(broker.addr, request).await;
        assert!(!connack.session_present);
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn disconnect_may_not_raise_a_zero_session_expiry() {
    bounded(async {
        let broker = start(config()).await;
        let mut client = broker.client(ProtocolVersion::V5, "c").await;
        client
            .send(&Packet::Disconnect(Disconnect {
                reason_code: ReasonCode::NORMAL_DISCONNECTION,
                properties: Properties {
                    session_expiry_interval: Some(60),
                    ..Properties::default()
                },
            }))
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
async fn max_session_expiry_caps_and_is_announced() {
    bounded(async {
        let broker = start(BrokerConfig {
            max_session_expiry: Some(30),
            ..config()
        })
        .await;
        let (_client, connack) =
            Client::connect(broker.addr, persistent(ProtocolVersion::V5, "cap")).await;
        assert_eq!(connack.properties.session_expiry_interval, Some(30));
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn takeover_works_even_when_the_old_connection_is_stalled() {
    bounded(async {
        let broker = start(BrokerConfig {
            max_queued_messages: 10,
            ..config()
        })
        .await;
        let (mut stalled, _) =
            Client::connect(broker.addr, persistent(ProtocolVersion::V5, "stuck")).await;
        stalled.subscribe("big", QoS::AtMostOnce).await;
        // Fill the socket and the connection's write buffer: the old client never reads.
        let mut publisher = broker.client(ProtocolVersion::V311, "pub").await;
        let payload = vec![0u8; 256 * 1024];
        for _ in 0..40 {
            publisher
                .publish("big", &payload, QoS::AtLeastOnce, false)
                .await;
        }
        let (mut fresh, connack) =
            Client::connect(broker.addr, persistent(ProtocolVersion::V5, "stuck")).await;
        assert_eq!(connack.reason_code, ReasonCode::SUCCESS);
        assert!(connack.session_present);
        fresh.ping().await;
        drop(stalled);
        broker.stop().await;
    })
    .await;
}
