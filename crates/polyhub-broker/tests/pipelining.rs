//! Clients may send packets right behind CONNECT without waiting for CONNACK (paho does when
//! `subscribe()` is called before its network loop runs): they must be handled, not dropped.

mod common;

use bytes::BytesMut;
use common::{Client, bounded, config, connect, start};
use polyhub_mqtt::{
    Packet, ProtocolVersion, QoS, ReasonCode, Subscribe, SubscribeFilter, SubscriptionOptions,
    encode,
};

fn subscribe(filter: &str, packet_id: u16) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id,
        filters: vec![SubscribeFilter {
            filter: filter.into(),
            options: SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                ..SubscriptionOptions::default()
            },
        }],
        properties: Default::default(),
    })
}

#[tokio::test]
async fn packets_in_the_same_segment_as_connect_are_handled() {
    bounded(async {
        let broker = start(config()).await;
        for version in [
            ProtocolVersion::V31,
            ProtocolVersion::V311,
            ProtocolVersion::V5,
        ] {
            let mut bytes = BytesMut::new();
            let client_id = format!("pipelined{}", version.level());
            encode(
                &Packet::Connect(connect(version, &client_id)),
                version,
                &mut bytes,
            )
            .unwrap();
            encode(&subscribe("pipe/line", 7), version, &mut bytes).unwrap();
            encode(&Packet::PingReq, version, &mut bytes).unwrap();

            let mut client = Client::open(broker.addr, version).await;
            client.send_bytes(&bytes).await;
            match client.recv().await {
                Packet::ConnAck(connack) => assert_eq!(connack.reason_code, ReasonCode::SUCCESS),
                other => panic!("expected CONNACK, got {other:?}"),
            }
            match client.recv().await {
                Packet::SubAck(suback) => {
                    assert_eq!(suback.packet_id, 7);
                    assert_eq!(suback.reason_codes, vec![ReasonCode::GRANTED_QOS_1]);
                }
                other => panic!("expected SUBACK, got {other:?}"),
            }
            assert_eq!(client.recv().await, Packet::PingResp);

            let mut publisher = broker
                .client(version, &format!("pub{}", version.level()))
                .await;
            publisher
                .publish("pipe/line", b"through", QoS::AtLeastOnce, false)
                .await;
            let delivered = client.recv_publish_acked().await;
            assert_eq!(delivered.topic, "pipe/line");
            assert_eq!(&delivered.payload[..], b"through");
            publisher.disconnect().await;
            client.disconnect().await;
        }
        broker.stop().await;
    })
    .await;
}
