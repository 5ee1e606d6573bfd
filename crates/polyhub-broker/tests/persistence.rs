//! Broker state across a restart: retained messages and persistent sessions go through a real
//! snapshot file (`persist::save`, `persist::load`) into a second broker, and clients reconnect
//! to it over TCP.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Client, DataDir, TestBroker, bounded, config, connect, publish, start, will};
use polyhub_broker::persist::{self, PersistError, SnapshotError};
use polyhub_broker::{BrokerConfig, MessageProperties, OnCorrupt};
use polyhub_mqtt::{
    Connect, Disconnect, Packet, Properties, ProtocolVersion, PubResponse, QoS, ReasonCode,
    SubscriptionOptions,
};

/// Shut `broker` down as `polyhub run` does, save its state to `dir`, and start a new broker
/// with `config` from that file.
async fn restart(broker: TestBroker, dir: &DataDir, config: BrokerConfig) -> TestBroker {
    let old = broker.broker.clone();
    broker.stop().await;
    persist::save_broker(&old, &dir.snapshot()).await.unwrap();
    let snapshot = persist::load(&dir.snapshot())
        .unwrap()
        .expect("the snapshot file exists");
    let restarted = start(config).await;
    restarted.broker.restore(snapshot).unwrap();
    restarted
}

/// CONNECT that resumes (or creates) a persistent session: 3.x clean session 0, or MQTT 5
/// with `expiry` seconds of session expiry.
fn persistent(version: ProtocolVersion, client_id: &str, expiry: u32) -> Connect {
    let mut request = connect(version, client_id);
    request.clean_start = false;
    if version.is_v5() {
        request.properties.session_expiry_interval = Some(expiry);
    }
    request
}

/// Connect and return the client with CONNACK's session present flag.
async fn resume(broker: &TestBroker, request: Connect) -> (Client, bool) {
    let (client, connack) = Client::connect(broker.addr, request).await;
    assert_eq!(connack.reason_code, ReasonCode::SUCCESS, "{connack:?}");
    (client, connack.session_present)
}

#[tokio::test]
async fn retained_messages_survive_a_restart_with_their_properties() {
    bounded(async {
        let dir = DataDir::new("persistence", "retained");
        let broker = start(config()).await;
        let mut publisher = broker.client(ProtocolVersion::V5, "publisher").await;
        let mut with_properties = publish("status/a", b"on", QoS::AtLeastOnce, true, 1);
        with_properties.properties = Properties {
            content_type: Some("text/plain".into()),
            message_expiry_interval: Some(3600),
            user_properties: vec![("site".into(), "north".into())],
            ..Properties::default()
        };
        publisher.publish_packet(with_properties).await;
        publisher
            .publish("status/b", b"off", QoS::AtMostOnce, true)
            .await;
        publisher
            .publish("status/c", b"gone soon", QoS::AtMostOnce, true)
            .await;
        // Cleared before the restart: must not come back.
        publisher
            .publish("status/c", b"", QoS::AtMostOnce, true)
            .await;
        publisher.ping().await;
        broker.broker.publish_sys();
        drop(publisher);

        let broker = restart(broker, &dir, config()).await;
        let mut subscriber = broker.client(ProtocolVersion::V5, "subscriber").await;
        subscriber.subscribe("status/#", QoS::AtLeastOnce).await;
        let mut received = vec![
            subscriber.recv_publish_acked().await,
            subscriber.recv_publish_acked().await,
        ];
        subscriber.expect_nothing().await;
        received.sort_by(|a, b| a.topic.cmp(&b.topic));
        let [a, b] = received.as_slice() else {
            unreachable!()
        };
        assert_eq!((a.topic.as_str(), &a.payload[..]), ("status/a", &b"on"[..]));
        assert!(a.retain);
        assert_eq!(a.qos, QoS::AtLeastOnce);
        assert_eq!(a.properties.content_type.as_deref(), Some("text/plain"));
        assert_eq!(
            a.properties.user_properties,
            vec![("site".to_owned(), "north".to_owned())]
        );
        let expiry = a.properties.message_expiry_interval.unwrap();
        assert!((3590..=3600).contains(&expiry), "{expiry}");
        assert_eq!(
            (b.topic.as_str(), &b.payload[..]),
            ("status/b", &b"off"[..])
        );
        assert_eq!(b.qos, QoS::AtMostOnce);

        // $SYS was retained before the restart and is not carried over.
        let mut sys = broker.client(ProtocolVersion::V311, "sys").await;
        sys.subscribe("$SYS/#", QoS::AtMostOnce).await;
        sys.expect_nothing().await;
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn persistent_sessions_keep_subscriptions_and_queued_messages() {
    bounded(async {
        let dir = DataDir::new("persistence", "sessions");
        let broker = start(config()).await;
        let v311 = persistent(ProtocolVersion::V311, "sub-311", 0);
        let v5 = persistent(ProtocolVersion::V5, "sub-5", 600);
        let (mut client, _) = resume(&broker, v311.clone()).await;
        client.subscribe("q/#", QoS::ExactlyOnce).await;
        client.disconnect().await;
        let (mut client, _) = resume(&broker, v5.clone()).await;
        let identified = Properties {
            subscription_identifiers: vec![42],
            ..Properties::default()
        };
        client
            .subscribe_with(
                "q/+",
                SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    ..SubscriptionOptions::default()
                },
                identified,
            )
            .await;
        client.disconnect().await;

        let mut publisher = broker.client(ProtocolVersion::V311, "publisher").await;
        publisher
            .publish("q/0", b"zero", QoS::AtMostOnce, false)
            .await;
        publisher
            .publish("q/1", b"one", QoS::AtLeastOnce, false)
            .await;
        publisher
            .publish("q/2", b"two", QoS::ExactlyOnce, false)
            .await;
        drop(publisher);

        let broker = restart(broker, &dir, config()).await;

        let (mut client, present) = resume(&broker, v311).await;
        assert!(present, "the 3.1.1 session was not restored");
        let first = client.recv_publish_acked().await;
        let second = client.recv_publish_acked().await;
        assert_eq!((first.topic.as_str(), first.qos), ("q/1", QoS::AtLeastOnce));
        assert_eq!(
            (second.topic.as_str(), second.qos),
            ("q/2", QoS::ExactlyOnce)
        );
        assert_eq!(second.payload, "two".as_bytes());
        client.expect_nothing().await;

        let (mut client5, present) = resume(&broker, v5).await;
        assert!(present, "the MQTT 5 session was not restored");
        for (topic, qos) in [("q/1", QoS::AtLeastOnce), ("q/2", QoS::AtLeastOnce)] {
            let message = client5.recv_publish_acked().await;
            assert_eq!((message.topic.as_str(), message.qos), (topic, qos));
            assert_eq!(message.properties.subscription_identifiers, vec![42]);
        }
        client5.expect_nothing().await;

        // The subscriptions themselves came back, with their options.
        let mut publisher = broker.client(ProtocolVersion::V311, "publisher").await;
        publisher
            .publish("q/3", b"three", QoS::ExactlyOnce, false)
            .await;
        let live = client.recv_publish_acked().await;
        assert_eq!((live.topic.as_str(), live.qos), ("q/3", QoS::ExactlyOnce));
        let live = client5.recv_publish_acked().await;
        assert_eq!((live.topic.as_str(), live.qos), ("q/3", QoS::AtLeastOnce));
        assert_eq!(live.properties.subscription_identifiers, vec![42]);
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn unacknowledged_messages_are_resent_after_a_restart() {
    bounded(async {
        let dir = DataDir::new("persistence", "inflight");
        let broker = start(config()).await;
        let request = persistent(ProtocolVersion::V311, "slow", 0);
        let (mut slow, _) = resume(&broker, request.clone()).await;
        slow.subscribe("i/#", QoS::ExactlyOnce).await;
        let mut publisher = broker.client(ProtocolVersion::V311, "publisher").await;
        publisher
            .publish("i/1", b"one", QoS::AtLeastOnce, false)
            .await;
        publisher
            .publish("i/2", b"two", QoS::ExactlyOnce, false)
            .await;
        // QoS 1 left unacknowledged; QoS 2 acknowledged with PUBREC, its PUBREL left unanswered.
        let one = slow.recv_publish().await;
        let two = slow.recv_publish().await;
        assert!(!one.dup && !two.dup);
        slow.send(&Packet::PubRec(PubResponse::success(two.packet_id)))
            .await;
        match slow.recv().await {
            Packet::PubRel(rel) => assert_eq!(rel.packet_id, two.packet_id),
            other => panic!("expected PUBREL, got {other:?}"),
        }
        // Still connected when the broker stops.
        let broker = restart(broker, &dir, config()).await;
        drop(slow);

        let (mut slow, present) = resume(&broker, request).await;
        assert!(present);
        let again = slow.recv_publish().await;
        assert!(again.dup, "a resent PUBLISH carries DUP");
        assert_eq!(
            (again.packet_id, again.topic.as_str(), &again.payload[..]),
            (one.packet_id, "i/1", &b"one"[..])
        );
        match slow.recv().await {
            Packet::PubRel(rel) => assert_eq!(rel.packet_id, two.packet_id),
            other => panic!("expected the PUBREL again, got {other:?}"),
        }
        slow.send(&Packet::PubAck(PubResponse::success(one.packet_id)))
            .await;
        slow.send(&Packet::PubComp(PubResponse::success(two.packet_id)))
            .await;
        slow.expect_nothing().await;
        assert!(broker.broker.snapshot().sessions[0].inflight.is_empty());
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn inbound_qos2_awaiting_pubrel_is_remembered() {
    bounded(async {
        let dir = DataDir::new("persistence", "inbound-qos2");
        let broker = start(config()).await;
        let mut watcher = broker.client(ProtocolVersion::V311, "watcher").await;
        watcher.subscribe("x/#", QoS::AtMostOnce).await;
        let request = persistent(ProtocolVersion::V5, "sender", 600);
        let (mut sender, _) = resume(&broker, request.clone()).await;
        let message = publish("x/1", b"once", QoS::ExactlyOnce, false, 7);
        sender.send(&Packet::Publish(message.clone())).await;
        match sender.recv().await {
            Packet::PubRec(rec) => assert_eq!(rec.packet_id, 7),
            other => panic!("expected PUBREC, got {other:?}"),
        }
        assert_eq!(watcher.recv_publish().await.payload, "once".as_bytes());
        let broker = restart(broker, &dir, config()).await;
        drop(sender);
        drop(watcher);

        let mut watcher = broker.client(ProtocolVersion::V311, "watcher").await;
        watcher.subscribe("x/#", QoS::AtMostOnce).await;
        let (mut sender, present) = resume(&broker, request).await;
        assert!(present);
        // The sender did not see PUBREC arrive in time and resends: not routed a second time.
        let mut resent = message;
        resent.dup = true;
        sender.send(&Packet::Publish(resent)).await;
        match sender.recv().await {
            Packet::PubRec(rec) => assert_eq!(rec.packet_id, 7),
            other => panic!("expected PUBREC, got {other:?}"),
        }
        sender.send(&Packet::PubRel(PubResponse::success(7))).await;
        match sender.recv().await {
            Packet::PubComp(comp) => {
                assert_eq!(comp.packet_id, 7);
                assert_eq!(
                    comp.reason_code,
                    ReasonCode::SUCCESS,
                    "the id was forgotten"
                );
            }
            other => panic!("expected PUBCOMP, got {other:?}"),
        }
        watcher.expect_nothing().await;
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn clean_sessions_are_not_saved() {
    bounded(async {
        let dir = DataDir::new("persistence", "clean");
        let broker = start(config()).await;
        // Connected while the state is saved (an autosave) and at shutdown.
        let mut clean311 = broker.client(ProtocolVersion::V311, "clean-311").await;
        clean311.subscribe("c/#", QoS::AtLeastOnce).await;
        let mut clean5 = broker.client(ProtocolVersion::V5, "clean-5").await;
        clean5.subscribe("c/#", QoS::AtLeastOnce).await;
        let (mut kept, _) = resume(&broker, persistent(ProtocolVersion::V5, "kept", 60)).await;
        kept.subscribe("c/#", QoS::AtLeastOnce).await;
        let saved: Vec<String> = broker
            .broker
            .snapshot()
            .sessions
            .into_iter()
            .map(|session| session.client_id)
            .collect();
        assert_eq!(saved, vec!["kept".to_owned()]);

        let broker = restart(broker, &dir, config()).await;
        drop((clean311, clean5, kept));
        for (version, id) in [
            (ProtocolVersion::V311, "clean-311"),
            (ProtocolVersion::V5, "clean-5"),
        ] {
            let (_client, present) = resume(&broker, persistent(version, id, 60)).await;
            assert!(!present, "{id} came back");
        }
        let (_kept, present) = resume(&broker, persistent(ProtocolVersion::V5, "kept", 60)).await;
        assert!(present);
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn expired_sessions_are_not_restored_and_expiry_restarts_at_restore() {
    bounded(async {
        let dir = DataDir::new("persistence", "expiry");
        let broker = start(config()).await;
        for (id, expiry) in [("short", 1), ("medium", 600), ("long", 600)] {
            let (mut client, _) =
                resume(&broker, persistent(ProtocolVersion::V5, id, expiry)).await;
            client.subscribe("e/#", QoS::AtLeastOnce).await;
            client.disconnect().await;
        }
        let old = broker.broker.clone();
        broker.stop().await;
        // Shutdown stopped the expiry timers; 1 s of "short" is over by the time of the save.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        persist::save_broker(&old, &dir.snapshot()).await.unwrap();
        let mut snapshot = persist::load(&dir.snapshot()).unwrap().unwrap();
        let saved: Vec<&str> = snapshot
            .sessions
            .iter()
            .map(|session| session.client_id.as_str())
            .collect();
        assert_eq!(saved, vec!["long", "medium"]);
        for session in &snapshot.sessions {
            // What remained, in whole seconds rounded up.
            assert!((590..=599).contains(&session.expiry), "{session:?}");
        }
        // As if "medium" had had 1 s left when saved.
        snapshot.sessions[1].expiry = 1;
        let broker = start(config()).await;
        broker.broker.restore(snapshot).unwrap();

        let (_short, present) = resume(&broker, persistent(ProtocolVersion::V5, "short", 60)).await;
        assert!(!present, "an expired session was restored");
        // "medium" had 1 s left, counted from the restore.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (_medium, present) =
            resume(&broker, persistent(ProtocolVersion::V5, "medium", 60)).await;
        assert!(!present, "the restored session did not expire");
        let (_long, present) = resume(&broker, persistent(ProtocolVersion::V5, "long", 60)).await;
        assert!(present);
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_pending_delayed_will_is_published_after_the_restart() {
    bounded(async {
        let dir = DataDir::new("persistence", "will");
        let broker = start(config()).await;
        let mut request = persistent(ProtocolVersion::V5, "dying", 600);
        let mut last_will = will("will/dying", b"gone", QoS::AtLeastOnce, false);
        last_will.properties.will_delay_interval = Some(2);
        request.will = Some(last_will);
        let (client, _) = Client::connect(broker.addr, request).await;
        client.drop_connection().await;
        tokio::time::sleep(Duration::from_millis(100)).await;

        let old = broker.broker.clone();
        broker.stop().await;
        let snapshot = old.snapshot();
        let will = snapshot.sessions[0]
            .will
            .as_ref()
            .expect("the will is saved");
        assert!((1..=2).contains(&will.delay), "{will:?}");
        persist::save(&dir.snapshot(), &snapshot).unwrap();

        let broker = start(config()).await;
        let mut watcher = broker.broker.local_client("watcher").unwrap();
        watcher.subscribe("will/#", QoS::AtLeastOnce).await.unwrap();
        let snapshot = persist::load(&dir.snapshot()).unwrap().unwrap();
        broker.broker.restore(snapshot).unwrap();
        assert!(
            watcher.try_recv().is_none(),
            "the delay starts again at restore"
        );
        let published = tokio::time::timeout(Duration::from_secs(5), watcher.recv())
            .await
            .expect("the will was not published")
            .unwrap();
        assert_eq!(published.topic, "will/dying");
        assert_eq!(published.payload, Bytes::from_static(b"gone"));
        drop(watcher);
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_will_of_a_connection_open_at_shutdown_is_not_saved() {
    bounded(async {
        let broker = start(config()).await;
        let mut request = persistent(ProtocolVersion::V5, "alive", 600);
        request.will = Some(will("will/alive", b"gone", QoS::AtLeastOnce, false));
        let (_client, _) = Client::connect(broker.addr, request).await;
        let old = broker.broker.clone();
        broker.stop().await;
        let snapshot = old.snapshot();
        assert_eq!(snapshot.sessions.len(), 1);
        assert_eq!(snapshot.sessions[0].will, None);
    })
    .await;
}

#[tokio::test]
async fn a_v5_session_expiry_changed_at_disconnect_is_what_is_saved() {
    bounded(async {
        let broker = start(config()).await;
        let (mut client, _) =
            resume(&broker, persistent(ProtocolVersion::V5, "changing", 600)).await;
        let properties = Properties {
            session_expiry_interval: Some(30),
            ..Properties::default()
        };
        client
            .send(&Packet::Disconnect(Disconnect {
                reason_code: ReasonCode::NORMAL_DISCONNECTION,
                properties,
            }))
            .await;
        client.expect_close().await;
        let snapshot = broker.broker.snapshot();
        assert_eq!(snapshot.sessions.len(), 1);
        assert_eq!(snapshot.sessions[0].expiry, 30);
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn restoring_does_not_replace_a_session_in_use() {
    bounded(async {
        let broker = start(config()).await;
        let (mut client, _) = resume(&broker, persistent(ProtocolVersion::V311, "twin", 0)).await;
        client.subscribe("t/#", QoS::AtLeastOnce).await;
        let snapshot = broker.broker.snapshot();
        let summary = broker.broker.restore(snapshot).unwrap();
        assert_eq!((summary.sessions, summary.skipped_sessions), (0, 1));
        client.ping().await;
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_corrupt_snapshot_is_a_clear_error() {
    bounded(async {
        let dir = DataDir::new("persistence", "corrupt");
        let path = dir.snapshot();
        let broker = start(config()).await;
        let mut publisher = broker.client(ProtocolVersion::V311, "publisher").await;
        publisher
            .publish("r/1", b"kept", QoS::AtMostOnce, true)
            .await;
        publisher.ping().await;
        persist::save_broker(&broker.broker, &path).await.unwrap();
        broker.stop().await;
        let good = std::fs::read(&path).unwrap();

        let mut damaged = good.clone();
        let middle = damaged.len() / 2;
        damaged[middle] ^= 0x20;
        std::fs::write(&path, &damaged).unwrap();
        let error = persist::load(&path).unwrap_err();
        assert!(
            matches!(
                &error,
                PersistError::Corrupt {
                    source: SnapshotError::Checksum { .. },
                    ..
                }
            ),
            "{error}"
        );
        let line = error.to_string();
        assert!(line.contains(&path.display().to_string()), "{line}");
        assert!(!line.contains('\n'));

        std::fs::write(&path, &good[..good.len() - 3]).unwrap();
        let error = persist::load(&path).unwrap_err();
        assert!(error.to_string().contains("truncated"), "{error}");

        std::fs::write(&path, b"{\"not\": \"a snapshot\"}").unwrap();
        let error = persist::load_for_startup(&path, OnCorrupt::Fail).unwrap_err();
        assert!(error.to_string().contains("bad magic"), "{error}");
        assert!(path.exists(), "failing must leave the file where it is");

        // Unreadable is not corrupt: never moved aside.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        let error = persist::load_for_startup(&path, OnCorrupt::MoveAside).unwrap_err();
        assert!(matches!(error, PersistError::Read { .. }), "{error}");
    })
    .await;
}

#[tokio::test]
async fn local_messages_and_properties_round_trip_through_the_file() {
    bounded(async {
        let dir = DataDir::new("persistence", "local");
        let broker = start(config()).await;
        let publisher = broker.broker.local_client("ingest").unwrap();
        let properties = MessageProperties {
            payload_format_indicator: Some(1),
            response_topic: Some("reply/here".into()),
            correlation_data: Some(Bytes::from_static(b"\x01\x02")),
            ..MessageProperties::default()
        };
        publisher
            .publish_with_properties("l/1", "v", QoS::ExactlyOnce, true, properties.clone())
            .await
            .unwrap();
        drop(publisher);
        let broker = restart(broker, &dir, config()).await;
        let mut reader = broker.broker.local_client("reader").unwrap();
        reader.subscribe("l/#", QoS::ExactlyOnce).await.unwrap();
        let message = reader.recv().await.unwrap();
        assert_eq!(message.qos, QoS::ExactlyOnce);
        assert!(message.retain);
        assert_eq!(message.properties, properties);
        // Local clients' own sessions are never saved.
        assert!(broker.broker.snapshot().sessions.is_empty());
        drop(reader);
        broker.stop().await;
    })
    .await;
}
