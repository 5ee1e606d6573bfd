//! Persistent in-process sessions (`Broker::local_client_persistent`): explicit
//! acknowledgement, detach and resume, redelivery with the original `seq`, and the round trip
//! through a real snapshot file into a second broker; plus `Broker::close_network`, which
//! disconnects network clients while in-process clients keep working.

mod common;

use std::time::Duration;

use common::{Client, DataDir, TestBroker, bounded, config, connect, start};
use polyhub_broker::persist;
use polyhub_broker::{BrokerError, LocalClient, LocalMessage};
use polyhub_mqtt::{Packet, ProtocolVersion, QoS, ReasonCode};

/// Save `broker`'s state to `dir` WITHOUT shutting it down first (as an autosave before a
/// crash would), then start a second broker from the file.
async fn crash_and_restart(broker: &TestBroker, dir: &DataDir) -> TestBroker {
    persist::save_broker(&broker.broker, &dir.snapshot())
        .await
        .unwrap();
    let snapshot = persist::load(&dir.snapshot()).unwrap().expect("saved");
    let restarted = start(config()).await;
    let summary = restarted.broker.restore(snapshot).unwrap();
    assert_eq!(summary.skipped_sessions, 0);
    restarted
}

async fn next(client: &mut LocalClient) -> LocalMessage {
    tokio::time::timeout(Duration::from_secs(5), client.recv())
        .await
        .expect("no message within 5 s")
        .expect("broker shut down")
}

async fn nothing(client: &mut LocalClient) {
    if let Ok(message) = tokio::time::timeout(Duration::from_millis(100), client.recv()).await {
        panic!("expected nothing, got {message:?}");
    }
}

fn payload(message: &LocalMessage) -> &str {
    std::str::from_utf8(&message.payload).unwrap()
}

async fn publish_all(publisher: &LocalClient, topic: &str, payloads: &[&str]) {
    for payload in payloads {
        publisher
            .publish(topic, payload.to_string(), QoS::AtLeastOnce, false)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn unacknowledged_messages_come_back_first_to_the_next_client_with_their_seq() {
    bounded(async {
        let broker = start(config()).await;
        let device = broker.broker.local_client("device").unwrap();
        let mut parser = broker.broker.local_client_persistent("parser", 0).unwrap();
        assert!(!parser.session_present());
        assert!(parser.is_persistent());
        parser.subscribe("data/#", QoS::AtLeastOnce).await.unwrap();
        publish_all(&device, "data/x", &["1", "2", "3"]).await;
        let first = next(&mut parser).await;
        let second = next(&mut parser).await;
        assert_eq!((payload(&first), payload(&second)), ("1", "2"));
        assert!(first.token != 0 && second.token != first.token);
        assert!(!first.redelivered);
        parser.ack(&[first.token]);
        // A second client cannot attach while one is.
        let refused = broker.broker.local_client_persistent("parser", 0);
        assert!(matches!(refused, Err(BrokerError::InvalidRequest(_))));
        drop(parser);

        // Detached: the session keeps its subscription and queues.
        publish_all(&device, "data/x", &["4"]).await;
        let mut parser = broker.broker.local_client_persistent("parser", 0).unwrap();
        assert!(parser.session_present());
        let again = next(&mut parser).await;
        assert_eq!(payload(&again), "2");
        assert!(again.redelivered);
        assert_eq!(again.seq, second.seq);
        assert_ne!(again.token, second.token, "tokens are never reused");
        for expected in ["3", "4"] {
            let message = next(&mut parser).await;
            assert_eq!(payload(&message), expected);
            assert!(!message.redelivered);
            parser.ack(&[message.token]);
        }
        // Not acknowledged again: asked for again without detaching.
        parser.redeliver_unacknowledged();
        let third = next(&mut parser).await;
        assert_eq!((payload(&third), third.redelivered), ("2", true));
        parser.ack(&[third.token, third.token, 0, 999]);
        parser.redeliver_unacknowledged();
        nothing(&mut parser).await;

        // Ended for good: the id is free and nothing is kept.
        parser.end_session();
        let mut fresh = broker.broker.local_client_persistent("parser", 0).unwrap();
        assert!(!fresh.session_present());
        publish_all(&device, "data/x", &["5"]).await;
        nothing(&mut fresh).await;
        drop((fresh, device));
        broker.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_plain_local_client_neither_acknowledges_nor_persists() {
    bounded(async {
        let broker = start(config()).await;
        let mut plain = broker.broker.local_client("plain").unwrap();
        assert!(!plain.is_persistent());
        plain.subscribe("a", QoS::AtLeastOnce).await.unwrap();
        plain
            .publish("a", "x", QoS::AtLeastOnce, false)
            .await
            .unwrap();
        let message = next(&mut plain).await;
        assert_eq!((message.token, message.redelivered), (0, false));
        plain.redeliver_unacknowledged();
        nothing(&mut plain).await;
        assert!(broker.broker.snapshot().sessions.is_empty());
        // A persistent client cannot take the id of a plain one, nor of a network session.
        assert!(broker.broker.local_client_persistent("plain", 0).is_err());
        let _device = broker.client(ProtocolVersion::V311, "device").await;
        assert!(broker.broker.local_client_persistent("device", 0).is_err());
        drop(plain);
        broker.stop().await;
    })
    .await;
}

/// The crash case: the snapshot is taken while the consumer is attached and holds messages
/// it has not acknowledged. After the restore they come back first, with their original
/// sequence numbers, then what was queued, then what arrived after the restore (the
/// subscription was restored too), numbered above everything saved.
#[tokio::test]
async fn a_session_survives_a_restart_through_the_snapshot_file() {
    bounded(async {
        let dir = DataDir::new("local", "restart");
        let broker = start(config()).await;
        let device = broker.broker.local_client("device").unwrap();
        let mut parser = broker
            .broker
            .local_client_persistent("polyhub-parser-h1", 0)
            .unwrap();
        parser
            .subscribe("/h1/+/data", QoS::AtLeastOnce)
            .await
            .unwrap();
        publish_all(&device, "/h1/d1/data", &["1", "2", "3", "4"]).await;
        // QoS 0 is not kept for a session waiting for its client, as for a network one.
        device
            .publish("/h1/d1/data", "qos0", QoS::AtMostOnce, false)
            .await
            .unwrap();
        let acked = next(&mut parser).await;
        parser.ack(&[acked.token]);
        let held = next(&mut parser).await;
        assert_eq!(payload(&held), "2");

        let saved = broker.broker.snapshot();
        let session = saved
            .sessions
            .iter()
            .find(|session| session.client_id == "polyhub-parser-h1")
            .expect("the persistent local session is saved");
        let local = session.local.as_ref().expect("saved as a local session");
        assert_eq!(local.max_queued, 0);
        assert_eq!(local.unacknowledged.len(), 1);
        assert_eq!(
            session.queue.len(),
            2,
            "3 and 4; the QoS 0 message is not kept"
        );
        assert_eq!(session.subscriptions.len(), 1);

        let restarted = crash_and_restart(&broker, &dir).await;
        drop((parser, device));
        broker.stop().await;

        // The restored session queues before its client attaches.
        let device = restarted.broker.local_client("device").unwrap();
        publish_all(&device, "/h1/d1/data", &["5"]).await;
        let mut parser = restarted
            .broker
            .local_client_persistent("polyhub-parser-h1", 100)
            .unwrap();
        assert!(parser.session_present());
        let again = next(&mut parser).await;
        assert_eq!((payload(&again), again.redelivered), ("2", true));
        assert_eq!(again.seq, held.seq);
        let mut last_seq = again.seq;
        for expected in ["3", "4", "5"] {
            let message = next(&mut parser).await;
            assert_eq!((payload(&message), message.redelivered), (expected, false));
            assert!(
                message.seq > last_seq,
                "seqs stay increasing across the restart"
            );
            last_seq = message.seq;
            parser.ack(&[message.token]);
        }
        parser.ack(&[again.token]);
        nothing(&mut parser).await;
        let saved = restarted.broker.snapshot();
        let local = saved.sessions[0].local.as_ref().unwrap();
        assert!(local.unacknowledged.is_empty());
        assert!(saved.sessions[0].queue.is_empty());
        drop((parser, device));
        restarted.stop().await;
    })
    .await;
}

#[tokio::test]
async fn a_restored_session_nobody_claims_can_be_discarded() {
    bounded(async {
        let dir = DataDir::new("local", "discard");
        let broker = start(config()).await;
        let parser = broker.broker.local_client_persistent("parser", 0).unwrap();
        parser.subscribe("t", QoS::AtLeastOnce).await.unwrap();
        drop(parser);
        let restarted = crash_and_restart(&broker, &dir).await;
        broker.stop().await;
        // Held by the restored session: a network client cannot take the id.
        let (_refused, connack) =
            common::Client::connect(restarted.addr, connect(ProtocolVersion::V311, "parser")).await;
        assert_ne!(connack.reason_code, ReasonCode::SUCCESS);
        assert!(restarted.broker.discard_local_session("parser"));
        assert!(!restarted.broker.discard_local_session("parser"));
        assert!(restarted.broker.snapshot().sessions.is_empty());
        // An attached session is not discarded.
        let attached = restarted
            .broker
            .local_client_persistent("parser", 0)
            .unwrap();
        assert!(!attached.session_present());
        assert!(!restarted.broker.discard_local_session("parser"));
        drop(attached);
        restarted.stop().await;
    })
    .await;
}

#[tokio::test]
async fn close_network_disconnects_devices_and_leaves_local_clients_working() {
    bounded(async {
        let broker = start(config()).await;
        let mut parser = broker.broker.local_client_persistent("parser", 0).unwrap();
        parser.subscribe("data/#", QoS::AtLeastOnce).await.unwrap();
        let mut device = broker.client(ProtocolVersion::V5, "device").await;
        device
            .publish("data/x", b"1", QoS::AtLeastOnce, false)
            .await;

        tokio::time::timeout(Duration::from_secs(5), broker.broker.close_network())
            .await
            .expect("close_network finished");
        device.expect_close().await;
        assert!(broker.broker.connected_clients().is_empty());
        // The in-process side still works: receive, acknowledge, publish.
        let message = next(&mut parser).await;
        assert_eq!(payload(&message), "1");
        parser.ack(&[message.token]);
        parser
            .publish("data/y", "2", QoS::AtLeastOnce, false)
            .await
            .unwrap();
        let held = next(&mut parser).await;
        assert_eq!(payload(&held), "2");

        broker.broker.shutdown().await;
        // After shutdown: acknowledgements still count, recv ends, nothing new is created.
        parser.ack(&[held.token]);
        let ended = tokio::time::timeout(Duration::from_secs(5), parser.recv()).await;
        assert_eq!(ended.expect("recv returns after shutdown"), None);
        assert!(matches!(
            broker.broker.local_client_persistent("other", 0),
            Err(BrokerError::Closed)
        ));
        let saved = broker.broker.snapshot();
        let local = saved.sessions[0].local.as_ref().unwrap();
        assert!(local.unacknowledged.is_empty(), "{local:?}");
    })
    .await;
}

/// A hub switching isolation: its parser's session goes from an in-process client to a network
/// one and back, keeping its subscription, its queue and what was taken but not acknowledged.
#[tokio::test]
async fn a_session_moves_between_in_process_and_network_clients() {
    bounded(async {
        let broker = start(config()).await;
        let id = "polyhub-parser-h1";
        let device = broker.broker.local_client("device").unwrap();
        let mut parser = broker.broker.local_client_persistent(id, 0).unwrap();
        parser
            .subscribe("/h1/+/data", QoS::AtLeastOnce)
            .await
            .unwrap();
        publish_all(&device, "/h1/d1/data", &["1", "2", "3"]).await;
        let first = next(&mut parser).await;
        parser.ack(&[first.token]);
        assert_eq!(
            payload(&next(&mut parser).await),
            "2",
            "taken, not acknowledged"
        );
        drop(parser);
        publish_all(&device, "/h1/d1/data", &["4"]).await;

        // Task → process: a CONNECT that keeps its session resumes the in-process one; a
        // clean one may not wipe it.
        let mut clean = connect(ProtocolVersion::V5, id);
        clean.clean_start = true;
        let (_refused, connack) = Client::connect(broker.addr, clean).await;
        assert!(connack.reason_code.is_error());
        let mut request = connect(ProtocolVersion::V5, id);
        request.clean_start = false;
        request.properties.session_expiry_interval = Some(3600);
        let (mut child, connack) = Client::connect(broker.addr, request).await;
        assert!(!connack.reason_code.is_error());
        assert!(connack.session_present);
        for expected in ["2", "3", "4"] {
            let publish = child.recv_publish_acked().await;
            assert_eq!(&publish.payload[..], expected.as_bytes());
        }
        publish_all(&device, "/h1/d1/data", &["5"]).await;
        assert_eq!(&child.recv_publish_acked().await.payload[..], b"5");
        assert!(
            broker.broker.local_client_persistent(id, 0).is_err(),
            "not while the connection is attached"
        );
        publish_all(&device, "/h1/d1/data", &["6"]).await;
        assert_eq!(
            &child.recv_publish().await.payload[..],
            b"6",
            "not acknowledged"
        );
        child.drop_connection().await;
        publish_all(&device, "/h1/d1/data", &["7"]).await;

        // Process → task: the in-process client resumes the detached network session.
        let mut parser = loop {
            match broker.broker.local_client_persistent(id, 0) {
                Ok(parser) => break parser,
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        assert!(parser.session_present());
        let again = next(&mut parser).await;
        assert_eq!((payload(&again), again.redelivered), ("6", true));
        let queued = next(&mut parser).await;
        assert_eq!(payload(&queued), "7");
        parser.ack(&[again.token, queued.token]);
        publish_all(&device, "/h1/d1/data", &["8"]).await;
        assert_eq!(payload(&next(&mut parser).await), "8");
        parser.redeliver_unacknowledged();
        let last = next(&mut parser).await;
        assert_eq!((payload(&last), last.redelivered), ("8", true));
        parser.ack(&[last.token]);
        nothing(&mut parser).await;
        drop((parser, device));
        broker.stop().await;
    })
    .await;
}

/// Backpressure: a publisher into a lossless session that is past its high water is no longer
/// read from (so its acknowledgements stop coming) while everyone else is served; once the
/// session's client drains it, the publisher goes on and nothing is lost.
#[tokio::test]
async fn publishers_into_a_backed_up_lossless_session_wait_and_lose_nothing() {
    bounded(async {
        let high_water = 100;
        let broker = start(polyhub_broker::BrokerConfig {
            lossless_queue_high_water: high_water,
            ..config()
        })
        .await;
        let mut parser = broker
            .broker
            .local_client_persistent("polyhub-parser-h1", 0)
            .unwrap();
        parser
            .subscribe("/h1/+/data", QoS::AtLeastOnce)
            .await
            .unwrap();

        // Far more than the high water and than one read of the socket, without waiting.
        let total: u16 = 3000;
        let payload = [b'x'; 200];
        let mut device = broker.client(ProtocolVersion::V311, "d1").await;
        for packet_id in 1..=total {
            device
                .send(&Packet::Publish(common::publish(
                    "/h1/d1/data",
                    &payload,
                    QoS::AtLeastOnce,
                    false,
                    packet_id,
                )))
                .await;
        }
        let mut acked = 0usize;
        while let Some(packet) = device.try_recv(Duration::from_millis(300)).await {
            assert!(matches!(packet, Packet::PubAck(_)), "{packet:?}");
            acked += 1;
        }
        assert!(
            acked >= high_water && acked < usize::from(total) / 2,
            "{acked} of {total} acknowledged while the session is backed up"
        );

        // Everyone else is served meanwhile.
        let mut watcher = broker.client(ProtocolVersion::V311, "watcher").await;
        watcher.subscribe("other/#", QoS::AtLeastOnce).await;
        let mut other = broker.client(ProtocolVersion::V311, "other").await;
        other
            .publish_packet(common::publish(
                "other/x",
                b"hi",
                QoS::AtLeastOnce,
                false,
                1,
            ))
            .await;
        assert_eq!(&watcher.recv_publish_acked().await.payload[..], b"hi");

        // The parser drains: the device is read again, to the last message, in order.
        for expected in 1..=usize::from(total) {
            let message = next(&mut parser).await;
            assert_eq!(message.payload.len(), payload.len(), "message {expected}");
            parser.ack(&[message.token]);
            if expected % 500 == 0 {
                while let Some(packet) = device.try_recv(Duration::from_millis(1)).await {
                    assert!(matches!(packet, Packet::PubAck(_)), "{packet:?}");
                    acked += 1;
                }
            }
        }
        while acked < usize::from(total) {
            match device.try_recv(Duration::from_secs(2)).await {
                Some(Packet::PubAck(_)) => acked += 1,
                other => panic!("after {acked} acknowledgements: {other:?}"),
            }
        }
        nothing(&mut parser).await;
        broker.stop().await;
    })
    .await;
}
