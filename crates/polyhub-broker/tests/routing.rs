//! Retained messages, `$` topics, wildcards and overlapping subscriptions.

mod common;

use common::{bounded, config, start};
use polyhub_mqtt::{Properties, ProtocolVersion, QoS, SubscriptionOptions};

#[tokio::test]
async fn retained_message_is_set_replaced_and_deleted() {
    bounded(async {
        let broker = start(config()).await;
        let mut publisher = broker.client(ProtocolVersion::V311, "pub").await;
        publisher
            .publish("r/a", b"first", QoS::AtLeastOnce, true)
            .await;
        publisher
            .publish("r/a", b"second", QoS::AtLeastOnce, true)
            .await;
        // Not retained: does not replace.
        publisher
            .publish("r/a", b"transient", QoS::AtLeastOnce, false)
            .await;

        let mut late = broker.client(ProtocolVersion::V311, "late").await;
        late.subscribe("r/#", QoS::AtLeastOnce).await;
        let retained = late.recv_publish_acked().await;
        assert_eq!(retained.payload, "second".as_bytes());
        assert!(retained.retain);
        late.expect_nothing().await;

        // A live message to an existing subscriber has retain cleared (3.1.1 §3.3.1.3).
        publisher
            .publish("r/a", b"third", QoS::AtLeastOnce, true)
            .await;
        let live = late.recv_publish_acked().await;
        assert_eq!(live.payload, "third".as_bytes());
        assert!(!live.retain);

        // Empty retained payload deletes.
        publisher.publish("r/a", b"", QoS::AtLeastOnce, true).await;
        let deletion = late.recv_publish_acked().await;
        assert!(deletion.payload.is_empty());
        let mut later = broker.client(ProtocolVersion::V5, "later").await;
        later.subscribe("r/#", QoS::AtLeastOnce).await;
        later.expect_nothing().await;
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn retained_qos_is_capped_by_the_subscription() {
    bounded(async {
        let broker = start(config()).await;
        let mut publisher = broker.client(ProtocolVersion::V311, "pub").await;
        publisher.publish("r", b"x", QoS::ExactlyOnce, true).await;
        let mut subscriber = broker.client(ProtocolVersion::V311, "sub").await;
        subscriber.subscribe("r", QoS::AtLeastOnce).await;
        let retained = subscriber.recv_publish_acked().await;
        assert_eq!(retained.qos, QoS::AtLeastOnce);
        assert!(retained.retain);
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn dollar_topics_are_not_matched_by_leading_wildcards() {
    bounded(async {
        let broker = start(config()).await;
        let mut wildcard = broker.client(ProtocolVersion::V311, "wild").await;
        wildcard.subscribe("#", QoS::AtMostOnce).await;
        wildcard.subscribe("+/x", QoS::AtMostOnce).await;
        let mut explicit = broker.client(ProtocolVersion::V311, "explicit").await;
        explicit.subscribe("$app/#", QoS::AtMostOnce).await;
        let mut publisher = broker.client(ProtocolVersion::V311, "pub").await;
        publisher
            .publish("$app/x", b"1", QoS::AtMostOnce, false)
            .await;
        publisher
            .publish("plain/x", b"2", QoS::AtMostOnce, false)
            .await;
        assert_eq!(explicit.recv_publish().await.payload, "1".as_bytes());
        let got = wildcard.recv_publish().await;
        assert_eq!(got.topic, "plain/x");
        wildcard.expect_nothing().await;
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn plus_and_hash_match_per_spec() {
    bounded(async {
        let broker = start(config()).await;
        let mut subscriber = broker.client(ProtocolVersion::V311, "sub").await;
        subscriber.subscribe("a/+/c", QoS::AtMostOnce).await;
        subscriber.subscribe("x/#", QoS::AtMostOnce).await;
        let mut publisher = broker.client(ProtocolVersion::V311, "pub").await;
        for topic in ["a/b/c", "a/b/c/d", "a/c", "x", "x/y/z", "y/x"] {
            publisher.publish(topic, b"", QoS::AtMostOnce, false).await;
        }
        let mut topics = Vec::new();
        while let Some(polyhub_mqtt::Packet::Publish(publish)) =
            subscriber.try_recv(common::QUIET).await
        {
            topics.push(publish.topic);
        }
        assert_eq!(topics, vec!["a/b/c", "x", "x/y/z"]);
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn overlapping_subscriptions_deliver_once_at_the_highest_qos() {
    bounded(async {
        let broker = start(config()).await;
        for version in [
            ProtocolVersion::V31,
            ProtocolVersion::V311,
            ProtocolVersion::V5,
        ] {
            let mut subscriber = broker.client(version, "sub").await;
            subscriber.subscribe("o/#", QoS::AtMostOnce).await;
            subscriber.subscribe("o/+", QoS::ExactlyOnce).await;
            subscriber.subscribe("o/t", QoS::AtLeastOnce).await;
            let mut publisher = broker.client(ProtocolVersion::V311, "pub").await;
            publisher
                .publish("o/t", b"x", QoS::ExactlyOnce, false)
                .await;
            let received = subscriber.recv_publish_acked().await;
            assert_eq!(received.qos, QoS::ExactlyOnce, "{version:?}");
            subscriber.expect_nothing().await;
            subscriber.disconnect().await;
            publisher.disconnect().await;
        }
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn overlapping_v5_subscriptions_carry_every_subscription_identifier() {
    bounded(async {
        let broker = start(config()).await;
        let mut subscriber = broker.client(ProtocolVersion::V5, "sub").await;
        for (filter, id) in [("s/#", 11), ("s/+", 22)] {
            subscriber
                .subscribe_with(
                    filter,
                    SubscriptionOptions::default(),
                    Properties {
                        subscription_identifiers: vec![id],
                        ..Properties::default()
                    },
                )
                .await;
        }
        subscriber.subscribe("s/t", QoS::AtMostOnce).await;
        let mut publisher = broker.client(ProtocolVersion::V5, "pub").await;
        publisher.publish("s/t", b"x", QoS::AtMostOnce, false).await;
        let received = subscriber.recv_publish().await;
        let mut ids = received.properties.subscription_identifiers.clone();
        ids.sort_unstable();
        assert_eq!(ids, vec![11, 22]);
        subscriber.expect_nothing().await;
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn unsubscribe_stops_delivery_and_reports_unknown_filters_in_v5() {
    bounded(async {
        let broker = start(config()).await;
        let mut subscriber = broker.client(ProtocolVersion::V5, "sub").await;
        subscriber.subscribe("u", QoS::AtMostOnce).await;
        let unsuback = subscriber.unsubscribe("u").await;
        assert_eq!(
            unsuback.reason_codes,
            vec![polyhub_mqtt::ReasonCode::SUCCESS]
        );
        let unsuback = subscriber.unsubscribe("u").await;
        assert_eq!(
            unsuback.reason_codes,
            vec![polyhub_mqtt::ReasonCode::NO_SUBSCRIPTION_EXISTED]
        );
        let mut publisher = broker.client(ProtocolVersion::V311, "pub").await;
        publisher.publish("u", b"x", QoS::AtMostOnce, false).await;
        subscriber.expect_nothing().await;
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn shared_subscription_gives_each_message_to_one_member() {
    bounded(async {
        let broker = start(config()).await;
        let mut first = broker.client(ProtocolVersion::V5, "m1").await;
        first.subscribe("$share/g/work/+", QoS::AtLeastOnce).await;
        let mut second = broker.client(ProtocolVersion::V311, "m2").await;
        second.subscribe("$share/g/work/+", QoS::AtLeastOnce).await;
        let mut plain = broker.client(ProtocolVersion::V311, "plain").await;
        plain.subscribe("work/+", QoS::AtLeastOnce).await;

        let mut publisher = broker.client(ProtocolVersion::V311, "pub").await;
        for n in 0..10u8 {
            publisher
                .publish("work/item", &[n], QoS::AtLeastOnce, false)
                .await;
        }
        let mut first_got = Vec::new();
        while let Some(polyhub_mqtt::Packet::Publish(p)) = first.try_recv(common::QUIET).await {
            first_got.push(p.payload[0]);
            first
                .send(&polyhub_mqtt::Packet::PubAck(
                    polyhub_mqtt::PubResponse::success(p.packet_id),
                ))
                .await;
        }
        let mut second_got = Vec::new();
        while let Some(polyhub_mqtt::Packet::Publish(p)) = second.try_recv(common::QUIET).await {
            second_got.push(p.payload[0]);
            second
                .send(&polyhub_mqtt::Packet::PubAck(
                    polyhub_mqtt::PubResponse::success(p.packet_id),
                ))
                .await;
        }
        assert!(!first_got.is_empty() && !second_got.is_empty());
        let mut all: Vec<u8> = first_got.iter().chain(&second_got).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..10).collect::<Vec<u8>>());
        for n in 0..10u8 {
            assert_eq!(plain.recv_publish_acked().await.payload[0], n);
        }
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn shared_subscriptions_get_no_retained_messages() {
    bounded(async {
        let broker = start(config()).await;
        let mut publisher = broker.client(ProtocolVersion::V311, "pub").await;
        publisher.publish("job", b"r", QoS::AtMostOnce, true).await;
        let mut member = broker.client(ProtocolVersion::V5, "m").await;
        member.subscribe("$share/g/job", QoS::AtMostOnce).await;
        member.expect_nothing().await;
        broker.stop().await;
    })
    .await;
}
