//! `$SYS` and `$share` are the broker's: a network client's PUBLISH there is neither routed nor
//! retained, and MQTT 5 clients are told "not authorized" (Mosquitto does the same).

mod common;

use common::{Client, bounded, config, publish, start};
use polyhub_mqtt::{Packet, ProtocolVersion, QoS, ReasonCode};

/// Subscribes to everything under `$SYS` and to a plain topic, so a test can see what reached it.
async fn watcher(broker: &common::TestBroker) -> Client {
    let mut watcher = broker.client(ProtocolVersion::V5, "watcher").await;
    watcher.subscribe("$SYS/#", QoS::AtLeastOnce).await;
    watcher.subscribe("plain/after", QoS::AtLeastOnce).await;
    watcher
}

/// A message on a plain topic, published last: the watcher receiving it next proves that
/// nothing from the refused publishes arrived before it.
async fn marker(publisher: &mut Client, watcher: &mut Client) {
    publisher
        .publish("plain/after", b"marker", QoS::AtLeastOnce, false)
        .await;
    let next = watcher.recv_publish_acked().await;
    assert_eq!(next.topic, "plain/after", "got {next:?}");
}

#[tokio::test]
async fn an_mqtt5_client_is_told_that_sys_and_share_topics_are_not_its_to_publish() {
    bounded(async {
        let broker = start(config()).await;
        let mut watcher = watcher(&broker).await;
        let mut client = broker.client(ProtocolVersion::V5, "intruder").await;

        for topic in ["$SYS/broker/uptime", "$share/group/x"] {
            let reason = client
                .publish(topic, b"forged", QoS::AtLeastOnce, true)
                .await;
            assert_eq!(reason, ReasonCode::NOT_AUTHORIZED, "{topic}");
        }
        // QoS 2: PUBREC says no, and the flow ends there (no PUBREL expected).
        client
            .send(&Packet::Publish(publish(
                "$SYS/broker/clients/connected",
                b"999",
                QoS::ExactlyOnce,
                true,
                77,
            )))
            .await;
        match client.recv().await {
            Packet::PubRec(rec) => {
                assert_eq!(rec.packet_id, 77);
                assert_eq!(rec.reason_code, ReasonCode::NOT_AUTHORIZED);
            }
            other => panic!("expected PUBREC, got {other:?}"),
        }
        // QoS 0 is dropped without a word.
        client
            .publish("$SYS/broker/version", b"forged", QoS::AtMostOnce, true)
            .await;
        // A bridge's own state is the exception.
        let reason = client
            .publish(
                "$SYS/broker/connection/b1/state",
                b"1",
                QoS::AtLeastOnce,
                false,
            )
            .await;
        assert_eq!(reason, ReasonCode::SUCCESS);
        let bridge = watcher.recv_publish_acked().await;
        assert_eq!(bridge.topic, "$SYS/broker/connection/b1/state");

        marker(&mut client, &mut watcher).await;
        // Nothing was retained either.
        let mut late = broker.client(ProtocolVersion::V5, "late").await;
        late.subscribe("$SYS/broker/uptime", QoS::AtLeastOnce).await;
        late.subscribe("$SYS/broker/clients/connected", QoS::AtLeastOnce)
            .await;
        late.subscribe("$SYS/broker/version", QoS::AtLeastOnce)
            .await;
        late.expect_nothing().await;

        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_3x_client_gets_the_usual_flow_but_its_sys_publish_goes_nowhere() {
    bounded(async {
        let broker = start(config()).await;
        let mut watcher = watcher(&broker).await;
        for version in [ProtocolVersion::V31, ProtocolVersion::V311] {
            let mut client = broker.client(version, "old-intruder").await;
            for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
                // The helper completes the QoS 2 flow (PUBREC, PUBREL, PUBCOMP).
                let reason = client
                    .publish("$SYS/broker/uptime", b"forged", qos, true)
                    .await;
                assert_eq!(reason, ReasonCode::SUCCESS, "{version:?} {qos:?}");
            }
            marker(&mut client, &mut watcher).await;
            client.disconnect().await;
        }
        let mut late = broker.client(ProtocolVersion::V311, "late").await;
        late.subscribe("$SYS/broker/uptime", QoS::AtLeastOnce).await;
        late.expect_nothing().await;
        broker.stop().await;
    })
    .await;
}
