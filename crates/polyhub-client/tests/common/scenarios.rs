//! Behaviour every broker must show the client, in any protocol version. The test files run
//! each scenario against Mosquitto and against polyhub's broker, once per version.

use std::time::Duration;

use bytes::Bytes;
use polyhub_client::{
    Client, ClientError, DisconnectReason, Event, EventLoop, LastWill, Message, Properties,
    ProtocolVersion, QoS,
};

use super::{TestBroker, WAIT, connected, disconnected, next_event, next_message, no_message};

/// Connect, check the first event, disconnect cleanly, and see the client stop.
pub async fn connect_and_disconnect(broker: &mut impl TestBroker, version: ProtocolVersion) {
    let (client, mut events) = Client::connect(broker.options("plain", version))
        .await
        .expect("connect");
    match next_event(&mut events).await {
        Event::Connected {
            session_present, ..
        } => assert!(!session_present),
        other => panic!("expected Connected, got {other:?}"),
    }
    client.disconnect().await.expect("disconnect");
    assert!(matches!(
        disconnected(&mut events).await,
        DisconnectReason::ClientDisconnect
    ));
    assert!(
        events.recv().await.is_none(),
        "the task ends after DISCONNECT"
    );
    assert!(client.is_closed());
    assert_eq!(
        client.publish("t", QoS::AtMostOnce, false, "late").await,
        Err(ClientError::Closed)
    );
    // Disconnecting again is harmless.
    client.disconnect().await.expect("second disconnect");
}

/// Messages of each QoS between two clients, with the QoS capped by the subscription.
pub async fn qos_round_trips(broker: &mut impl TestBroker, version: ProtocolVersion) {
    let (subscriber, mut inbox) = Client::connect(broker.options("subscriber", version))
        .await
        .expect("connect subscriber");
    let (publisher, _publisher_events) = Client::connect(broker.options("publisher", version))
        .await
        .expect("connect publisher");
    assert_eq!(
        subscriber.subscribe("rt/exact/#", QoS::ExactlyOnce).await,
        Ok(QoS::ExactlyOnce)
    );
    assert_eq!(
        subscriber.subscribe("rt/once/#", QoS::AtLeastOnce).await,
        Ok(QoS::AtLeastOnce)
    );

    for (qos, label) in [
        (QoS::AtMostOnce, "0"),
        (QoS::AtLeastOnce, "1"),
        (QoS::ExactlyOnce, "2"),
    ] {
        publisher
            .publish(
                format!("rt/exact/{label}"),
                qos,
                false,
                format!("payload {label}"),
            )
            .await
            .expect("publish acknowledged");
        let message = next_message(&mut inbox).await;
        assert_eq!(message.topic, format!("rt/exact/{label}"));
        assert_eq!(message.payload, Bytes::from(format!("payload {label}")));
        assert_eq!(message.qos, qos);
        assert!(!message.retain);
    }

    // Published at QoS 2 to a QoS 1 subscription: delivered at QoS 1.
    publisher
        .publish("rt/once/x", QoS::ExactlyOnce, false, "capped")
        .await
        .expect("publish");
    let message = next_message(&mut inbox).await;
    assert_eq!(message.qos, QoS::AtLeastOnce);
    assert_eq!(message.payload, "capped");

    // Many QoS 1 and 2 publishes in flight at once (more than the inflight limit). MQTT
    // orders messages of one QoS only, so order is checked per QoS.
    let mut acks = Vec::new();
    for n in 0..500u32 {
        let qos = if n % 2 == 0 {
            QoS::AtLeastOnce
        } else {
            QoS::ExactlyOnce
        };
        let message = Message::new("rt/exact/burst", n.to_string()).qos(qos);
        acks.push(publisher.begin_publish(message).await.expect("queued"));
    }
    for ack in acks {
        ack.await.expect("acknowledged");
    }
    let mut received: [Vec<u32>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..500 {
        let message = next_message(&mut inbox).await;
        let n: u32 = std::str::from_utf8(&message.payload)
            .expect("text")
            .parse()
            .expect("number");
        assert_eq!(message.qos as u32, 1 + n % 2, "QoS of message {n}");
        received[(n % 2) as usize].push(n);
    }
    assert_eq!(received[0], (0..500).step_by(2).collect::<Vec<u32>>());
    assert_eq!(received[1], (1..500).step_by(2).collect::<Vec<u32>>());

    assert_eq!(subscriber.unsubscribe("rt/exact/#").await, Ok(()));
    publisher
        .publish("rt/exact/after", QoS::AtLeastOnce, false, "not for you")
        .await
        .expect("publish");
    no_message(&mut inbox).await;
}

/// Retained messages reach later subscribers with the retain flag; an empty one deletes.
pub async fn retained(broker: &mut impl TestBroker, version: ProtocolVersion) {
    let (publisher, _events) = Client::connect(broker.options("retainer", version))
        .await
        .expect("connect");
    publisher
        .publish("state/lamp", QoS::AtLeastOnce, true, "on")
        .await
        .expect("publish retained");

    let (late, mut inbox) = Client::connect(broker.options("late", version))
        .await
        .expect("connect");
    late.subscribe("state/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let message = next_message(&mut inbox).await;
    assert_eq!(message.topic, "state/lamp");
    assert_eq!(message.payload, "on");
    assert!(message.retain);

    publisher
        .publish("state/lamp", QoS::AtLeastOnce, true, Bytes::new())
        .await
        .expect("delete retained");
    // Live delivery of the deletion itself, then nothing for a new subscriber.
    let deletion = next_message(&mut inbox).await;
    assert!(deletion.payload.is_empty());
    let (later, mut later_inbox) = Client::connect(broker.options("later", version))
        .await
        .expect("connect");
    later
        .subscribe("state/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    no_message(&mut later_inbox).await;
}

fn will(topic: &str) -> LastWill {
    LastWill {
        topic: topic.to_owned(),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Properties::default(),
    }
}

/// A connection that ends without DISCONNECT makes the broker publish the will.
pub async fn will_on_abrupt_close(broker: &mut impl TestBroker, version: ProtocolVersion) {
    let (watcher, mut inbox) = Client::connect(broker.options("watcher", version))
        .await
        .expect("connect watcher");
    watcher
        .subscribe("presence/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");

    let options = broker
        .options("mortal", version)
        .last_will(will("presence/mortal"));
    let (_client, mut event_loop) = EventLoop::new(options);
    let first = tokio::time::timeout(WAIT, event_loop.poll())
        .await
        .expect("connects in time");
    assert!(matches!(first, Some(Event::Connected { .. })), "{first:?}");
    // Dropping the event loop closes the socket without DISCONNECT.
    drop(event_loop);

    let message = next_message(&mut inbox).await;
    assert_eq!(message.topic, "presence/mortal");
    assert_eq!(message.payload, "gone");
}

/// A clean disconnect discards the will.
pub async fn no_will_on_clean_disconnect(broker: &mut impl TestBroker, version: ProtocolVersion) {
    let (watcher, mut inbox) = Client::connect(broker.options("watcher", version))
        .await
        .expect("connect watcher");
    watcher
        .subscribe("presence/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");

    let options = broker
        .options("polite", version)
        .last_will(will("presence/polite"));
    let (client, _events) = Client::connect(options).await.expect("connect");
    client.disconnect().await.expect("disconnect");
    no_message(&mut inbox).await;

    // The subscription works: the first message seen is this one, not a will.
    watcher
        .publish("presence/marker", QoS::AtLeastOnce, false, "marker")
        .await
        .expect("publish");
    assert_eq!(next_message(&mut inbox).await.topic, "presence/marker");
}

/// Dropping every handle ends the client with a clean DISCONNECT (no will).
pub async fn dropping_handles_disconnects_cleanly(
    broker: &mut impl TestBroker,
    version: ProtocolVersion,
) {
    let (watcher, mut inbox) = Client::connect(broker.options("watcher", version))
        .await
        .expect("connect watcher");
    watcher
        .subscribe("presence/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");

    let options = broker
        .options("dropped", version)
        .last_will(will("presence/dropped"));
    let (client, mut events) = Client::connect(options).await.expect("connect");
    // What was queued before the last handle went is still delivered.
    let _qos0_ack = client
        .begin_publish(Message::new("presence/last-words", "bye"))
        .await
        .expect("queued");
    drop(client);
    assert!(matches!(
        disconnected(&mut events).await,
        DisconnectReason::ClientDisconnect
    ));
    assert!(events.recv().await.is_none());
    assert_eq!(next_message(&mut inbox).await.topic, "presence/last-words");
    no_message(&mut inbox).await;
}

/// After the broker restarts (all sessions lost) the client reconnects and subscribes again
/// by itself; a publish made while offline goes out after the reconnect.
pub async fn reconnect_and_resubscribe(broker: &mut impl TestBroker, version: ProtocolVersion) {
    let (subscriber, mut inbox) = Client::connect(broker.options("resubscriber", version))
        .await
        .expect("connect subscriber");
    let (publisher, mut publisher_events) = Client::connect(broker.options("republisher", version))
        .await
        .expect("connect publisher");
    assert!(!connected(&mut inbox).await);
    assert!(!connected(&mut publisher_events).await);
    subscriber
        .subscribe("re/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    publisher
        .publish("re/before", QoS::AtLeastOnce, false, "before")
        .await
        .expect("publish");
    assert_eq!(next_message(&mut inbox).await.payload, "before");

    broker.restart().await;
    assert!(
        !connected(&mut inbox).await,
        "the restarted broker has no session"
    );

    // Publishes made while the publisher may still be offline are queued, then delivered. The
    // subscriber's new SUBSCRIBE and the publisher's messages race, so keep publishing until
    // one arrives.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut n = 0;
    let received = loop {
        n += 1;
        publisher
            .publish("re/after", QoS::AtLeastOnce, false, format!("after {n}"))
            .await
            .expect("publish after restart");
        match tokio::time::timeout(Duration::from_millis(200), next_message(&mut inbox)).await {
            Ok(message) => break message,
            Err(_) => assert!(
                tokio::time::Instant::now() < deadline,
                "no message after the restart"
            ),
        }
    };
    assert_eq!(received.topic, "re/after");
}

/// A persistent session keeps subscriptions and queues QoS 1 messages while the client is away.
pub async fn persistent_session(broker: &mut impl TestBroker, version: ProtocolVersion) {
    let durable = broker
        .options("durable", version)
        .clean_start(false)
        .session_expiry_interval(300);
    let (client, mut events) = Client::connect(durable.clone()).await.expect("connect");
    connected(&mut events).await;
    client
        .subscribe("queued/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    client.disconnect().await.expect("disconnect");

    let (publisher, _events) = Client::connect(broker.options("feeder", version))
        .await
        .expect("connect publisher");
    for n in 0..3 {
        publisher
            .publish(
                format!("queued/{n}"),
                QoS::AtLeastOnce,
                false,
                n.to_string(),
            )
            .await
            .expect("publish");
    }

    let (_client, mut events) = Client::connect(durable).await.expect("reconnect");
    let session_present = connected(&mut events).await;
    // MQTT 3.1's CONNACK cannot say so, but the session is there all the same.
    assert_eq!(session_present, version != ProtocolVersion::V31);
    for n in 0..3 {
        let message = next_message(&mut events).await;
        assert_eq!(message.topic, format!("queued/{n}"));
        assert_eq!(message.qos, QoS::AtLeastOnce);
    }
}

/// Manual acknowledgements: messages the application did not acknowledge come again after a
/// reconnect (with DUP), acknowledged ones do not, and tokens of an earlier connection
/// acknowledge nothing.
pub async fn manual_acks(broker: &mut impl TestBroker, version: ProtocolVersion) {
    let durable = broker
        .options("acker", version)
        .clean_start(false)
        .session_expiry_interval(300)
        .manual_acks(true);
    let (client, mut events) = Client::connect(durable.clone()).await.expect("connect");
    connected(&mut events).await;
    client
        .subscribe("manual/#", QoS::ExactlyOnce)
        .await
        .expect("subscribe");
    let (publisher, _publisher_events) = Client::connect(broker.options("manual-feeder", version))
        .await
        .expect("connect publisher");
    for (n, qos) in [
        QoS::AtLeastOnce,
        QoS::AtLeastOnce,
        QoS::ExactlyOnce,
        QoS::ExactlyOnce,
    ]
    .into_iter()
    .enumerate()
    {
        publisher
            .publish(format!("manual/{n}"), qos, false, n.to_string())
            .await
            .expect("publish");
    }

    let mut tokens = Vec::new();
    for n in 0..4 {
        let (message, token) = super::next_message_with_ack(&mut events).await;
        assert_eq!(message.topic, format!("manual/{n}"));
        let token = token.expect("QoS 1/2 messages come with a token");
        assert_eq!(token.qos(), message.qos);
        tokens.push(token);
    }
    // Acknowledge one of each QoS; the SUBSCRIBE after them is a round trip behind them.
    client.ack_all([tokens[0], tokens[2]]).await.expect("ack");
    client
        .subscribe("sync/1", QoS::AtMostOnce)
        .await
        .expect("sync");

    // Another connection takes the session over; the client comes back and takes it again.
    let intruder = durable.clone().reconnect(false);
    let (_intruder, _intruder_events) = Client::connect(intruder).await.expect("intruder");
    let mut redelivered = Vec::new();
    while redelivered.len() < 2 {
        let (message, token) = super::next_message_with_ack(&mut events).await;
        assert!(message.dup, "a redelivery is marked DUP: {message:?}");
        redelivered.push((message.topic, token.expect("token")));
    }
    redelivered.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        redelivered
            .iter()
            .map(|(topic, _)| topic.as_str())
            .collect::<Vec<_>>(),
        ["manual/1", "manual/3"]
    );
    // The first connection's tokens are stale: acknowledging them does nothing, and fails not.
    client
        .ack_all([tokens[1], tokens[3]])
        .await
        .expect("stale ack is fine");
    client
        .subscribe("sync/2", QoS::AtMostOnce)
        .await
        .expect("sync");
    no_message(&mut events).await;
    client.disconnect().await.expect("disconnect");

    // Not acknowledged yet: delivered again.
    let (client, mut events) = Client::connect(durable.clone()).await.expect("reconnect");
    let mut again = Vec::new();
    for _ in 0..2 {
        let (message, token) = super::next_message_with_ack(&mut events).await;
        assert!(message.dup);
        again.push((message.topic, token.expect("token")));
    }
    again.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(again[0].0, "manual/1");
    assert_eq!(again[1].0, "manual/3");
    client
        .ack_all(again.iter().map(|(_, token)| *token))
        .await
        .expect("ack");
    client
        .subscribe("sync/3", QoS::AtMostOnce)
        .await
        .expect("sync");
    // Let the QoS 2 flow (PUBREL → PUBCOMP) finish before leaving.
    tokio::time::sleep(Duration::from_millis(100)).await;
    client.disconnect().await.expect("disconnect");

    // Everything acknowledged: nothing comes back.
    let (_client, mut events) = Client::connect(durable).await.expect("reconnect");
    connected(&mut events).await;
    no_message(&mut events).await;
}

/// With manual acknowledgements, unacknowledged messages fill the broker's inflight window
/// (our receive maximum): the next one comes only after an acknowledgement. With
/// `one_per_ack`, check that one acknowledgement lets exactly one more through (Mosquitto
/// 2.0 sends more than its quota allows after a PUBACK, so it is not held to that).
pub async fn manual_acks_hold_the_receive_window(broker: &mut impl TestBroker, one_per_ack: bool) {
    let version = ProtocolVersion::V5;
    let options = broker
        .options("windowed", version)
        .manual_acks(true)
        .receive_maximum(2);
    let (client, mut events) = Client::connect(options).await.expect("connect");
    connected(&mut events).await;
    client
        .subscribe("window/#", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let (publisher, _publisher_events) = Client::connect(broker.options("window-feeder", version))
        .await
        .expect("connect publisher");
    for n in 0..4 {
        publisher
            .publish(format!("window/{n}"), QoS::AtLeastOnce, false, "x")
            .await
            .expect("publish");
    }
    let (first, first_token) = super::next_message_with_ack(&mut events).await;
    let (second, _) = super::next_message_with_ack(&mut events).await;
    assert_eq!(
        (first.topic.as_str(), second.topic.as_str()),
        ("window/0", "window/1")
    );
    no_message(&mut events).await;
    client.ack(first_token.expect("token")).await.expect("ack");
    let (third, _) = super::next_message_with_ack(&mut events).await;
    assert_eq!(third.topic, "window/2");
    if one_per_ack {
        no_message(&mut events).await;
    }
}
