//! Concurrency: several publishers and subscribers at once on a multi-threaded runtime, every
//! message accounted for, in order per publisher. Bounded in size and time.

mod common;

use common::{bounded, config, start};
use polyhub_mqtt::{Packet, ProtocolVersion, PubResponse, QoS};

const PUBLISHERS: u8 = 4;
const MESSAGES: u16 = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_reach_every_subscriber_exactly_once_in_order() {
    bounded(async {
        let broker = start(polyhub_broker::BrokerConfig {
            max_queued_messages: 0,
            ..config()
        })
        .await;
        let mut subscribers = Vec::new();
        for (n, (version, qos)) in [
            (ProtocolVersion::V311, QoS::AtLeastOnce),
            (ProtocolVersion::V5, QoS::ExactlyOnce),
            (ProtocolVersion::V31, QoS::AtLeastOnce),
        ]
        .into_iter()
        .enumerate()
        {
            let mut client = broker.client(version, &format!("sub{n}")).await;
            client.subscribe("load/+", qos).await;
            subscribers.push(tokio::spawn(async move {
                let total = usize::from(PUBLISHERS) * usize::from(MESSAGES);
                let mut next = vec![0u16; usize::from(PUBLISHERS)];
                let mut received = 0;
                while received < total {
                    match client.recv().await {
                        Packet::Publish(publish) => {
                            received += 1;
                            let publisher = usize::from(publish.payload[0]);
                            let sequence =
                                u16::from_be_bytes([publish.payload[1], publish.payload[2]]);
                            assert_eq!(sequence, next[publisher], "out of order from {publisher}");
                            next[publisher] += 1;
                            let ack = PubResponse::success(publish.packet_id);
                            match publish.qos {
                                QoS::AtMostOnce => {}
                                QoS::AtLeastOnce => client.send(&Packet::PubAck(ack)).await,
                                QoS::ExactlyOnce => client.send(&Packet::PubRec(ack)).await,
                            }
                        }
                        Packet::PubRel(rel) => {
                            client
                                .send(&Packet::PubComp(PubResponse::success(rel.packet_id)))
                                .await;
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
                client
            }));
        }
        let mut publishers = Vec::new();
        for n in 0..PUBLISHERS {
            let mut client = broker
                .client(ProtocolVersion::V311, &format!("pub{n}"))
                .await;
            publishers.push(tokio::spawn(async move {
                for sequence in 0..MESSAGES {
                    let [high, low] = sequence.to_be_bytes();
                    let qos = if sequence % 2 == 0 {
                        QoS::AtLeastOnce
                    } else {
                        QoS::ExactlyOnce
                    };
                    client
                        .publish(&format!("load/{n}"), &[n, high, low], qos, false)
                        .await;
                }
            }));
        }
        for publisher in publishers {
            publisher.await.unwrap();
        }
        for subscriber in subscribers {
            subscriber.await.unwrap();
        }
        broker.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos0_flood_reaches_a_subscriber_that_only_reads() {
    bounded(async {
        let broker = start(polyhub_broker::BrokerConfig {
            max_queued_messages: 0,
            ..config()
        })
        .await;
        let mut subscriber = broker.client(ProtocolVersion::V311, "sub").await;
        subscriber.subscribe("flood", QoS::AtMostOnce).await;
        let mut publisher = broker.client(ProtocolVersion::V311, "pub").await;
        // Each message is larger than the connection's write high-water mark.
        const FLOOD: usize = 400;
        let mut burst = bytes::BytesMut::new();
        let message = Packet::Publish(common::publish(
            "flood",
            &[1; 100_000],
            QoS::AtMostOnce,
            false,
            0,
        ));
        for _ in 0..FLOOD {
            polyhub_mqtt::encode(&message, ProtocolVersion::V311, &mut burst).unwrap();
        }
        let sending = tokio::spawn(async move {
            publisher.send_bytes(&burst).await;
            publisher
        });
        for n in 0..FLOOD {
            match subscriber.try_recv(common::WAIT).await {
                Some(Packet::Publish(_)) => {}
                other => panic!("message {n} of {FLOOD} missing: {other:?}"),
            }
        }
        let _publisher = sending.await.unwrap();
        broker.stop().await;
    })
    .await;
}
