//! Lazy reads (see `client.rs`): a subscriber that only acknowledges is no longer woken for
//! each acknowledgement, and whatever else it sends is still heard.
//!
//! `Stats::clients_read_lazily` shows whether a connection is in lazy mode, so each test
//! first checks that the mode was reached; the behaviour that follows is what clients see.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Client, TestBroker, WAIT, bounded, config, connect, start, will};
use polyhub_mqtt::{Connect, Properties, ProtocolVersion, QoS, ReasonCode};

/// More acknowledgement-only reads than it takes to turn lazy.
const ROUNDS: u16 = 20;

fn lazily_read(broker: &TestBroker) -> u64 {
    broker
        .broker
        .stats()
        .clients_read_lazily
        .load(Ordering::Relaxed)
}

/// Waits until `lazily_read` is `expected`; panics after [`WAIT`].
async fn until_lazily_read(broker: &TestBroker, expected: u64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while lazily_read(broker) != expected {
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections read lazily: {} (expected {expected})",
            lazily_read(broker)
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `ROUNDS` QoS 1 messages from `publisher` to `subscriber`, one round trip at a time, so that
/// each acknowledgement arrives on its own.
async fn acknowledged_rounds(publisher: &mut Client, subscriber: &mut Client, topic: &str) {
    for n in 0..ROUNDS {
        let reason = publisher
            .publish(topic, &n.to_be_bytes(), QoS::AtLeastOnce, false)
            .await;
        assert_eq!(reason, ReasonCode::SUCCESS);
        let received = subscriber.recv_publish_acked().await;
        assert_eq!(received.payload, n.to_be_bytes().as_slice());
    }
}

/// A subscriber (connecting with `subscriber`) to `{name}/down`, made lazy by a run of
/// acknowledged deliveries, and the publisher of those, itself subscribed to `{name}/up`.
async fn lazy_pair(broker: &TestBroker, subscriber: Connect, name: &str) -> (Client, Client) {
    let (mut lazy, connack) = Client::connect(broker.addr, subscriber).await;
    assert_eq!(connack.reason_code, ReasonCode::SUCCESS);
    lazy.subscribe(&format!("{name}/down"), QoS::AtLeastOnce)
        .await;
    let mut publisher = broker
        .client(ProtocolVersion::V5, &format!("{name}-pub"))
        .await;
    publisher
        .subscribe(&format!("{name}/up"), QoS::AtLeastOnce)
        .await;
    acknowledged_rounds(&mut publisher, &mut lazy, &format!("{name}/down")).await;
    until_lazily_read(broker, 1).await;
    (lazy, publisher)
}

/// Disconnects the clients still connected and stops the broker.
async fn finish(broker: TestBroker, clients: Vec<Client>) {
    for client in clients {
        client.disconnect().await;
    }
    broker.stop().await;
}

#[tokio::test]
async fn a_lazy_subscriber_that_publishes_is_heard_and_woken_again() {
    bounded(async {
        let broker = start(config()).await;
        let (mut subscriber, mut publisher) =
            lazy_pair(&broker, connect(ProtocolVersion::V311, "lazy-sub"), "lazy").await;

        // Nothing is delivered to it meanwhile: only the lazy poll brings this PUBLISH in.
        let reason = subscriber
            .publish("lazy/up", b"from a lazy client", QoS::AtLeastOnce, false)
            .await;
        assert_eq!(reason, ReasonCode::SUCCESS);
        let up = publisher.recv_publish_acked().await;
        assert_eq!(up.payload, b"from a lazy client".as_slice());
        until_lazily_read(&broker, 0).await;

        // Lazy again, then a PINGREQ: answered, and the connection is woken again.
        acknowledged_rounds(&mut publisher, &mut subscriber, "lazy/down").await;
        until_lazily_read(&broker, 1).await;
        subscriber.ping().await;
        until_lazily_read(&broker, 0).await;

        finish(broker, vec![subscriber, publisher]).await;
    })
    .await;
}

#[tokio::test]
async fn a_lazy_subscriber_with_nothing_in_flight_is_woken_again() {
    bounded(async {
        let broker = start(config()).await;
        let (mut subscriber, mut publisher) = lazy_pair(
            &broker,
            connect(ProtocolVersion::V311, "quiet-sub"),
            "quiet",
        )
        .await;

        // No more deliveries: the next lazy poll finds nothing in flight.
        until_lazily_read(&broker, 0).await;
        // And the same client turns lazy again when the deliveries resume.
        acknowledged_rounds(&mut publisher, &mut subscriber, "quiet/down").await;
        until_lazily_read(&broker, 1).await;

        finish(broker, vec![subscriber, publisher]).await;
    })
    .await;
}

#[tokio::test]
async fn a_lazy_subscriber_that_goes_away_is_noticed_at_once() {
    bounded(async {
        let broker = start(config()).await;
        let mut sub_connect = connect(ProtocolVersion::V311, "gone-sub");
        sub_connect.will = Some(will("gone/up", b"gone", QoS::AtLeastOnce, false));
        let (mut subscriber, mut publisher) = lazy_pair(&broker, sub_connect, "gone").await;

        // Keep a delivery in flight, so that the quiet poll does not end lazy mode first.
        publisher
            .publish("gone/down", b"never acknowledged", QoS::AtLeastOnce, false)
            .await;
        let unacknowledged = subscriber.recv_publish().await;
        assert_eq!(unacknowledged.payload, b"never acknowledged".as_slice());

        // Its end of stream is seen (the kernel wakes us for it whatever the low-water mark):
        // the will goes out.
        subscriber.drop_connection().await;
        let will = publisher.recv_publish_acked().await;
        assert_eq!(will.payload, b"gone".as_slice());
        until_lazily_read(&broker, 0).await;

        finish(broker, vec![publisher]).await;
    })
    .await;
}

#[tokio::test]
async fn a_small_receive_maximum_still_gets_every_message_in_order() {
    bounded(async {
        let broker = start(config()).await;
        let mut sub_connect = connect(ProtocolVersion::V5, "window-sub");
        sub_connect.properties = Properties {
            receive_maximum: Some(2),
            ..Properties::default()
        };
        let (mut subscriber, mut publisher) = lazy_pair(&broker, sub_connect, "window").await;

        // A burst larger than the window: each PUBACK frees the slot the next one needs.
        const BURST: u16 = 200;
        for n in 0..BURST {
            publisher
                .publish("window/down", &n.to_be_bytes(), QoS::AtLeastOnce, false)
                .await;
        }
        for n in 0..BURST {
            let received = subscriber.recv_publish_acked().await;
            assert_eq!(received.payload, n.to_be_bytes().as_slice());
        }
        subscriber.expect_nothing().await;
        until_lazily_read(&broker, 0).await;

        finish(broker, vec![subscriber, publisher]).await;
    })
    .await;
}

#[tokio::test]
async fn a_large_publish_from_a_lazy_subscriber_is_read_whole() {
    bounded(async {
        let broker = start(config()).await;
        let (mut subscriber, mut publisher) =
            lazy_pair(&broker, connect(ProtocolVersion::V311, "big-sub"), "big").await;

        // Larger than the low-water mark and than what one lazy read takes.
        let payload: Vec<u8> = (0..200_000u32).map(|n| n as u8).collect();
        let reason = subscriber
            .publish("big/up", &payload, QoS::AtLeastOnce, false)
            .await;
        assert_eq!(reason, ReasonCode::SUCCESS);
        let up = publisher.recv_publish_acked().await;
        assert_eq!(up.payload, payload.as_slice());
        until_lazily_read(&broker, 0).await;

        finish(broker, vec![subscriber, publisher]).await;
    })
    .await;
}
