//! Connecting with each protocol version, and QoS 0/1/2 in both directions.

mod common;

use common::{Client, bounded, config, connect, start};
use polyhub_mqtt::{Packet, ProtocolVersion, PubResponse, QoS, ReasonCode};

const VERSIONS: [ProtocolVersion; 3] = [
    ProtocolVersion::V31,
    ProtocolVersion::V311,
    ProtocolVersion::V5,
];

#[tokio::test]
async fn each_version_connects_and_pings() {
    bounded(async {
        let broker = start(config()).await;
        for version in VERSIONS {
            let (mut client, connack) = Client::connect(
                broker.addr,
                connect(version, &format!("c{}", version.level())),
            )
            .await;
            assert_eq!(connack.reason_code, ReasonCode::SUCCESS);
            assert!(!connack.session_present);
            client.ping().await;
            client.disconnect().await;
        }
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn every_qos_flows_between_every_pair_of_versions() {
    bounded(async {
        let broker = start(config()).await;
        for publisher_version in VERSIONS {
            for subscriber_version in VERSIONS {
                let mut subscriber = broker.client(subscriber_version, "sub").await;
                subscriber.subscribe("q/+", QoS::ExactlyOnce).await;
                let mut publisher = broker.client(publisher_version, "pub").await;
                for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
                    let payload = format!("{qos:?}");
                    let reason = publisher
                        .publish(&format!("q/{}", qos as u8), payload.as_bytes(), qos, false)
                        .await;
                    assert!(!reason.is_error());
                    let received = subscriber.recv_publish_acked().await;
                    assert_eq!(received.topic, format!("q/{}", qos as u8));
                    assert_eq!(received.payload, payload.as_bytes());
                    assert_eq!(received.qos, qos);
                    assert!(!received.retain);
                    assert!(!received.dup);
                }
                publisher.disconnect().await;
                subscriber.disconnect().await;
            }
        }
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn delivery_qos_is_the_lower_of_publish_and_subscription() {
    bounded(async {
        let broker = start(config()).await;
        let mut low = broker.client(ProtocolVersion::V311, "low").await;
        low.subscribe("t", QoS::AtMostOnce).await;
        let mut mid = broker.client(ProtocolVersion::V5, "mid").await;
        mid.subscribe("t", QoS::AtLeastOnce).await;
        let mut publisher = broker.client(ProtocolVersion::V311, "pub").await;
        publisher.publish("t", b"x", QoS::ExactlyOnce, false).await;
        assert_eq!(low.recv_publish_acked().await.qos, QoS::AtMostOnce);
        assert_eq!(mid.recv_publish_acked().await.qos, QoS::AtLeastOnce);
        publisher.publish("t", b"y", QoS::AtMostOnce, false).await;
        assert_eq!(mid.recv_publish_acked().await.qos, QoS::AtMostOnce);
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn qos2_duplicate_publish_is_routed_once() {
    bounded(async {
        let broker = start(config()).await;
        let mut subscriber = broker.client(ProtocolVersion::V311, "sub").await;
        subscriber.subscribe("d", QoS::AtMostOnce).await;
        let mut publisher = broker.client(ProtocolVersion::V311, "pub").await;
        let mut first = common::publish("d", b"once", QoS::ExactlyOnce, false, 7);
        publisher.send(&Packet::Publish(first.clone())).await;
        assert!(matches!(publisher.recv().await, Packet::PubRec(rec) if rec.packet_id == 7));
        first.dup = true;
        publisher.send(&Packet::Publish(first)).await;
        assert!(matches!(publisher.recv().await, Packet::PubRec(rec) if rec.packet_id == 7));
        publisher
            .send(&Packet::PubRel(PubResponse::success(7)))
            .await;
        assert!(matches!(publisher.recv().await, Packet::PubComp(comp) if comp.packet_id == 7));
        assert_eq!(subscriber.recv_publish().await.payload, "once".as_bytes());
        subscriber.expect_nothing().await;
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn pubrel_for_an_unknown_id_gets_pubcomp_0x92_in_v5() {
    bounded(async {
        let broker = start(config()).await;
        let mut client = broker.client(ProtocolVersion::V5, "c").await;
        client.send(&Packet::PubRel(PubResponse::success(42))).await;
        match client.recv().await {
            Packet::PubComp(comp) => {
                assert_eq!(comp.packet_id, 42);
                assert_eq!(comp.reason_code, ReasonCode::PACKET_IDENTIFIER_NOT_FOUND);
            }
            other => panic!("expected PUBCOMP, got {other:?}"),
        }
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn qos1_puback_in_v5_says_when_nobody_subscribed() {
    bounded(async {
        let broker = start(config()).await;
        let mut client = broker.client(ProtocolVersion::V5, "c").await;
        let reason = client
            .publish("nobody", b"x", QoS::AtLeastOnce, false)
            .await;
        assert_eq!(reason, ReasonCode::NO_MATCHING_SUBSCRIBERS);
        client.subscribe("nobody", QoS::AtMostOnce).await;
        let reason = client
            .publish("nobody", b"x", QoS::AtLeastOnce, false)
            .await;
        assert_eq!(reason, ReasonCode::SUCCESS);
        broker.stop().await;
    })
    .await;
}
