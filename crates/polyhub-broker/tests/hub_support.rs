//! What the hub needs from the broker: message sequence numbers (unique, increasing per
//! publisher, kept by retained replays and across a restore), the `polyhub-seq` user property
//! for clients that ask for it, presence and subscription events and the list of connected
//! clients, and local clients with an unbounded queue.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::{Client, bounded, config, connect, start};
use polyhub_broker::persist::{Snapshot, StoredMessage};
use polyhub_broker::{BrokerConfig, ClientPresence, LocalMessage, MessageProperties};
use polyhub_mqtt::{Packet, ProtocolVersion, Publish, QoS};
use tokio::sync::broadcast;

const V5: ProtocolVersion = ProtocolVersion::V5;
const V311: ProtocolVersion = ProtocolVersion::V311;

/// The next message of a local client, within a few seconds.
async fn next(local: &mut polyhub_broker::LocalClient) -> LocalMessage {
    tokio::time::timeout(Duration::from_secs(5), local.recv())
        .await
        .expect("no message within 5 s")
        .expect("broker shut down")
}

/// The next presence event, within a few seconds.
async fn next_presence(events: &mut broadcast::Receiver<ClientPresence>) -> (String, bool) {
    let event = tokio::time::timeout(Duration::from_secs(5), events.recv())
        .await
        .expect("no presence event within 5 s")
        .expect("presence channel open");
    (event.client_id, event.online)
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// The `polyhub-seq` user properties of a PUBLISH.
fn stamped_seqs(publish: &Publish) -> Vec<&str> {
    publish
        .properties
        .user_properties
        .iter()
        .filter(|(name, _)| name == "polyhub-seq")
        .map(|(_, value)| value.as_str())
        .collect()
}

#[tokio::test]
async fn every_routed_message_gets_a_unique_seq_increasing_per_publisher() {
    bounded(async {
        let before = now_micros();
        let broker = start(config()).await;
        let mut sink = broker.broker.local_client_with_queue("sink", 0).unwrap();
        sink.subscribe("load/#", QoS::AtLeastOnce).await.unwrap();

        let mut publishers = Vec::new();
        for name in ["p1", "p2", "p3"] {
            let addr = broker.addr;
            publishers.push(tokio::spawn(async move {
                let (mut client, _) = Client::connect(addr, connect(V5, name)).await;
                for n in 0..200u32 {
                    let qos = if n % 2 == 0 {
                        QoS::AtLeastOnce
                    } else {
                        QoS::AtMostOnce
                    };
                    client
                        .publish(&format!("load/{name}"), &n.to_be_bytes(), qos, false)
                        .await;
                }
                client.disconnect().await;
            }));
        }
        let local = broker.broker.local_client("local-publisher").unwrap();
        for n in 0..200u32 {
            local
                .publish(
                    "load/local",
                    n.to_be_bytes().to_vec(),
                    QoS::AtLeastOnce,
                    false,
                )
                .await
                .unwrap();
        }
        for publisher in publishers {
            publisher.await.unwrap();
        }

        let mut seen = HashSet::new();
        let mut last_per_publisher: HashMap<String, u64> = HashMap::new();
        for _ in 0..800 {
            let message = next(&mut sink).await;
            assert!(
                message.seq >= before,
                "seq {} starts below the wall clock",
                message.seq
            );
            assert!(seen.insert(message.seq), "seq {} repeated", message.seq);
            if let Some(last) = last_per_publisher.insert(message.topic.clone(), message.seq) {
                assert!(
                    message.seq > last,
                    "{}: {} after {last}",
                    message.topic,
                    message.seq
                );
            }
        }
        assert_eq!(last_per_publisher.len(), 4);
        assert!(broker.broker.last_seq() >= *seen.iter().max().unwrap());
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn retained_replays_and_every_subscriber_share_the_message_seq() {
    bounded(async {
        let broker = start(config()).await;
        let mut first = broker.broker.local_client("first").unwrap();
        first.subscribe("state/#", QoS::AtLeastOnce).await.unwrap();
        let mut second = broker.broker.local_client("second").unwrap();
        second.subscribe("state/#", QoS::AtMostOnce).await.unwrap();
        let (mut publisher, _) = Client::connect(broker.addr, connect(V311, "pub")).await;
        publisher
            .publish("state/a", b"on", QoS::AtLeastOnce, true)
            .await;
        let live = next(&mut first).await;
        assert_eq!(next(&mut second).await.seq, live.seq);

        let mut late = broker.broker.local_client("late").unwrap();
        late.subscribe("state/#", QoS::AtLeastOnce).await.unwrap();
        let replay = next(&mut late).await;
        assert!(replay.retain);
        assert_eq!(replay.payload, Bytes::from_static(b"on"));
        assert_eq!(replay.seq, live.seq);

        // A new message on the same topic is a new number.
        publisher
            .publish("state/a", b"off", QoS::AtLeastOnce, true)
            .await;
        assert!(next(&mut first).await.seq > live.seq);
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn wills_get_a_seq_when_published() {
    bounded(async {
        let broker = start(config()).await;
        let mut sink = broker.broker.local_client("sink").unwrap();
        sink.subscribe("#", QoS::AtLeastOnce).await.unwrap();
        let mut request = connect(V311, "dying");
        request.will = Some(common::will(
            "wills/dying",
            b"gone",
            QoS::AtLeastOnce,
            false,
        ));
        let (mut client, _) = Client::connect(broker.addr, request).await;
        client
            .publish("alive/dying", b"1", QoS::AtLeastOnce, false)
            .await;
        let alive = next(&mut sink).await;
        client.drop_connection().await;
        let will = next(&mut sink).await;
        assert_eq!(will.topic, "wills/dying");
        assert!(will.seq > alive.seq);
        broker.stop().await;
    })
    .await;
}

/// A CONNECT that asks (or not) for the `polyhub-seq` user property.
fn stamping(client_id: &str, value: Option<&str>) -> polyhub_mqtt::Connect {
    let mut request = connect(V5, client_id);
    if let Some(value) = value {
        request.properties.user_properties =
            vec![("polyhub-stamp-seq".to_owned(), value.to_owned())];
    }
    request
}

#[tokio::test]
async fn only_v5_clients_that_ask_get_the_seq_user_property() {
    bounded(async {
        let broker = start(config()).await;
        let mut local = broker.broker.local_client("local").unwrap();
        local.subscribe("data/#", QoS::AtLeastOnce).await.unwrap();
        let (mut stamped, _) = Client::connect(broker.addr, stamping("stamped", Some("1"))).await;
        let (mut declined, _) = Client::connect(broker.addr, stamping("declined", Some("0"))).await;
        let (mut plain, _) = Client::connect(broker.addr, stamping("plain", None)).await;
        let (mut old, _) = Client::connect(broker.addr, connect(V311, "old")).await;
        for client in [&mut stamped, &mut declined, &mut plain, &mut old] {
            client.subscribe("data/#", QoS::AtLeastOnce).await;
        }

        let (mut publisher, _) = Client::connect(broker.addr, connect(V5, "pub")).await;
        let mut message = common::publish("data/x", b"42", QoS::AtLeastOnce, false, 1);
        message.properties.user_properties = vec![("origin".into(), "test".into())];
        publisher.publish_packet(message).await;
        publisher
            .publish("data/y", b"43", QoS::AtMostOnce, false)
            .await;

        for payload in [&b"42"[..], b"43"] {
            let seq = next(&mut local).await.seq;
            let got = stamped.recv_publish_acked().await;
            assert_eq!(got.payload, payload);
            assert_eq!(stamped_seqs(&got), vec![seq.to_string()]);
            if payload == b"42" {
                // The publisher's own properties come first, unchanged.
                assert_eq!(
                    got.properties.user_properties[0],
                    ("origin".into(), "test".into())
                );
            }
            for client in [&mut declined, &mut plain, &mut old] {
                let got = client.recv_publish_acked().await;
                assert_eq!(got.payload, payload);
                assert!(stamped_seqs(&got).is_empty(), "{got:?}");
            }
        }
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn redeliveries_after_a_reconnect_carry_the_same_seq() {
    bounded(async {
        let broker = start(config()).await;
        let mut request = stamping("parser", Some("1"));
        request.clean_start = false;
        request.properties.session_expiry_interval = Some(600);
        let (mut parser, _) = Client::connect(broker.addr, request.clone()).await;
        parser.subscribe("data/#", QoS::AtLeastOnce).await;
        let (mut publisher, _) = Client::connect(broker.addr, connect(V311, "pub")).await;
        publisher
            .publish("data/x", b"1", QoS::AtLeastOnce, false)
            .await;
        let first = parser.recv_publish().await;
        let seq = stamped_seqs(&first)[0].to_owned();
        // Not acknowledged: the session keeps it in flight.
        parser.drop_connection().await;

        let (mut parser, connack) = Client::connect(broker.addr, request).await;
        assert!(connack.session_present);
        let again = parser.recv_publish().await;
        assert!(again.dup);
        assert_eq!(stamped_seqs(&again), vec![seq.as_str()]);
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn subscription_events_name_network_clients_once_their_subscriptions_are_in_place() {
    bounded(async {
        let broker = start(config()).await;
        let mut subscribed = broker.broker.subscription_events();
        let (mut device, _) = Client::connect(broker.addr, connect(V311, "d1")).await;
        // An in-process client's subscriptions are not reported.
        let local = broker.broker.local_client("local").unwrap();
        local.subscribe("x/#", QoS::AtLeastOnce).await.unwrap();

        device.subscribe("h/d1/cmd", QoS::AtLeastOnce).await;
        let client_id = tokio::time::timeout(Duration::from_secs(5), subscribed.recv())
            .await
            .expect("no subscription event within 5 s")
            .expect("channel open");
        assert_eq!(client_id, "d1");
        // By then a message to it is routed to it.
        assert_eq!(
            broker.broker.client_subscribed("d1", "h/d1/cmd"),
            Some(true)
        );
        assert!(subscribed.try_recv().is_err(), "one event per SUBSCRIBE");
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn presence_events_follow_connects_and_disconnects() {
    bounded(async {
        let broker = start(config()).await;
        let mut events = broker.broker.presence_events();
        assert!(broker.broker.connected_clients().is_empty());

        let (device, _) = Client::connect(broker.addr, connect(V311, "d1")).await;
        assert_eq!(next_presence(&mut events).await, ("d1".into(), true));
        assert_eq!(broker.broker.connected_clients(), vec!["d1".to_owned()]);
        // Local clients are not reported.
        let _local = broker.broker.local_client("local").unwrap();
        assert_eq!(broker.broker.connected_clients(), vec!["d1".to_owned()]);

        device.disconnect().await;
        assert_eq!(next_presence(&mut events).await, ("d1".into(), false));
        assert!(broker.broker.connected_clients().is_empty());

        let (device, _) = Client::connect(broker.addr, connect(V5, "d2")).await;
        assert_eq!(next_presence(&mut events).await, ("d2".into(), true));
        device.drop_connection().await;
        assert_eq!(next_presence(&mut events).await, ("d2".into(), false));

        // A refused CONNECT (3.1.1, empty id without clean session) is never online.
        let mut refused = connect(V311, "");
        refused.clean_start = false;
        let (_refused, connack) = Client::connect(broker.addr, refused).await;
        assert!(connack.reason_code.is_error());
        let (_d3, _) = Client::connect(broker.addr, connect(V311, "d3")).await;
        assert_eq!(next_presence(&mut events).await, ("d3".into(), true));
        broker.stop().await;
        assert_eq!(next_presence(&mut events).await, ("d3".into(), false));
    })
    .await;
}

#[tokio::test]
async fn a_client_is_reachable_once_connected_and_subscribed() {
    bounded(async {
        let broker = start(config()).await;
        assert_eq!(broker.broker.client_reachable("d1"), None);
        let mut request = connect(V311, "d1");
        request.clean_start = false;
        let (mut device, _) = Client::connect(broker.addr, request.clone()).await;
        assert_eq!(broker.broker.client_reachable("d1"), Some(false));
        device.subscribe("/h/d1/cmd", QoS::AtLeastOnce).await;
        assert_eq!(broker.broker.client_reachable("d1"), Some(true));
        device.drop_connection().await;
        // The kept session remembers the subscription, but nobody is there to receive.
        while broker.broker.client_reachable("d1") != Some(false) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (_device, _) = Client::connect(broker.addr, request).await;
        assert_eq!(broker.broker.client_reachable("d1"), Some(true));
        // Local clients are not devices.
        let _local = broker.broker.local_client("local").unwrap();
        assert_eq!(broker.broker.client_reachable("local"), None);
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_takeover_reports_the_old_offline_before_the_new_online() {
    bounded(async {
        let broker = start(config()).await;
        let mut events = broker.broker.presence_events();
        let dev = |online: bool| ("dev".to_owned(), online);
        for round in 0..12 {
            let mut request = connect(V5, "dev");
            // Kept and clean sessions, with and without expiry: every path keeps the order.
            request.clean_start = round % 2 == 0;
            request.properties.session_expiry_interval = Some(if round % 3 == 0 { 0 } else { 60 });
            let (_old, _) = Client::connect(broker.addr, request.clone()).await;
            assert_eq!(next_presence(&mut events).await, dev(true), "round {round}");
            let (new, _) = Client::connect(broker.addr, request).await;
            let seen = [
                next_presence(&mut events).await,
                next_presence(&mut events).await,
            ];
            assert_eq!(seen, [dev(false), dev(true)], "round {round}");
            assert_eq!(broker.broker.connected_clients(), vec!["dev".to_owned()]);
            new.disconnect().await;
            assert_eq!(
                next_presence(&mut events).await,
                dev(false),
                "round {round}"
            );
        }
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_keep_alive_timeout_is_reported_offline() {
    bounded(async {
        let broker = start(config()).await;
        let mut events = broker.broker.presence_events();
        let mut request = connect(V311, "sleepy");
        request.keep_alive = 1;
        let (_silent, _) = Client::connect(broker.addr, request).await;
        assert_eq!(next_presence(&mut events).await, ("sleepy".into(), true));
        let started = tokio::time::Instant::now();
        assert_eq!(next_presence(&mut events).await, ("sleepy".into(), false));
        assert!(started.elapsed() >= Duration::from_millis(1000));
        assert!(broker.broker.connected_clients().is_empty());
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn restored_brokers_number_above_the_snapshot_and_keep_saved_numbers() {
    bounded(async {
        let far_ahead = now_micros() + 3_600_000_000_000;
        let retained = |topic: &str, seq: u64| StoredMessage {
            seq,
            topic: topic.to_owned(),
            payload: Bytes::from_static(b"v"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: MessageProperties::default(),
        };
        let snapshot = Snapshot {
            saved_at: 1,
            last_seq: far_ahead,
            messages: vec![retained("kept/a", far_ahead - 5), retained("old/b", 0)],
            retained: vec![0, 1],
            sessions: Vec::new(),
        };
        // Through the file format, as a restart does.
        let snapshot =
            polyhub_broker::persist::decode(&polyhub_broker::persist::encode(&snapshot)).unwrap();
        let broker = start(config()).await;
        broker.broker.restore(snapshot).unwrap();

        let mut sink = broker.broker.local_client("sink").unwrap();
        sink.subscribe("kept/#", QoS::AtLeastOnce).await.unwrap();
        assert_eq!(next(&mut sink).await.seq, far_ahead - 5);
        sink.subscribe("old/#", QoS::AtLeastOnce).await.unwrap();
        let renumbered = next(&mut sink).await.seq;
        assert!(renumbered > far_ahead, "{renumbered}");

        sink.subscribe("new/#", QoS::AtLeastOnce).await.unwrap();
        let (mut publisher, _) = Client::connect(broker.addr, connect(V311, "pub")).await;
        publisher
            .publish("new/x", b"1", QoS::AtLeastOnce, false)
            .await;
        let fresh = next(&mut sink).await.seq;
        assert!(fresh > renumbered, "{fresh} <= {renumbered}");

        // And a snapshot of this broker records a last seq at least that high.
        assert!(broker.broker.snapshot().last_seq >= fresh);
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_local_client_with_an_unbounded_queue_never_drops() {
    bounded(async {
        let broker = start(BrokerConfig {
            max_queued_messages: 10,
            ..config()
        })
        .await;
        let mut bounded_client = broker.broker.local_client("bounded").unwrap();
        bounded_client
            .subscribe("burst/#", QoS::AtLeastOnce)
            .await
            .unwrap();
        let mut unbounded = broker
            .broker
            .local_client_with_queue("unbounded", 0)
            .unwrap();
        unbounded
            .subscribe("burst/#", QoS::AtLeastOnce)
            .await
            .unwrap();
        let publisher = broker.broker.local_client("pub").unwrap();
        for n in 0..5_000u32 {
            publisher
                .publish_now(
                    "burst/x",
                    Bytes::copy_from_slice(&n.to_be_bytes()),
                    QoS::AtLeastOnce,
                    false,
                    MessageProperties::default(),
                )
                .unwrap();
        }
        for n in 0..5_000u32 {
            let message = unbounded.try_recv().expect("queued");
            assert_eq!(message.payload[..], n.to_be_bytes());
        }
        assert!(unbounded.try_recv().is_none());
        let mut kept = 0;
        while bounded_client.try_recv().is_some() {
            kept += 1;
        }
        assert_eq!(kept, 10);
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn stamping_survives_topic_aliases() {
    bounded(async {
        let broker = start(config()).await;
        let mut request = stamping("aliased", Some("1"));
        request.properties.topic_alias_maximum = Some(4);
        let (mut client, _) = Client::connect(broker.addr, request).await;
        client.subscribe("t", QoS::AtMostOnce).await;
        let mut sink = broker.broker.local_client("sink").unwrap();
        sink.subscribe("t", QoS::AtMostOnce).await.unwrap();
        let local = broker.broker.local_client("pub").unwrap();
        for _ in 0..3 {
            local
                .publish("t", "x", QoS::AtMostOnce, false)
                .await
                .unwrap();
            let seq = next(&mut sink).await.seq.to_string();
            match client.recv().await {
                Packet::Publish(publish) => assert_eq!(stamped_seqs(&publish), vec![seq.as_str()]),
                other => panic!("expected PUBLISH, got {other:?}"),
            }
        }
        broker.stop().await;
    })
    .await;
}
