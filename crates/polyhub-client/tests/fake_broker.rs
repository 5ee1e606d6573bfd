//! The client against a scripted broker built on the codec: what real brokers rarely do on
//! demand (go silent, impose MQTT 5 limits, use topic aliases, refuse, keep a session across a
//! dropped connection) and what the client puts on the wire.

mod common;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::{QUIET, WAIT, bounded, connected, disconnected, free_port, next_event, next_message};
use polyhub_client::{
    Client, ClientError, ClientOptions, ConnectionError, DisconnectReason, Event, EventLoop,
    LastWill, Message, Properties, ProtocolVersion, QoS, ReasonCode, StateError,
};
use polyhub_mqtt::{
    ConnAck, Connect, Disconnect, Packet, PubResponse, Publish, SubAck, decode, encode,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One accepted connection of the scripted broker.
struct Peer {
    stream: TcpStream,
    buf: BytesMut,
    version: ProtocolVersion,
}

impl Peer {
    /// Accept a connection and read its CONNECT; the raw CONNECT bytes are returned too.
    async fn accept(listener: &TcpListener) -> (Peer, Connect, Bytes) {
        let (stream, _) = tokio::time::timeout(WAIT, listener.accept())
            .await
            .expect("a client connects in time")
            .expect("accept");
        let mut peer = Peer {
            stream,
            buf: BytesMut::new(),
            version: ProtocolVersion::V311,
        };
        loop {
            let snapshot = Bytes::copy_from_slice(&peer.buf);
            if let Some(packet) = decode(&mut peer.buf, peer.version, usize::MAX).expect("valid") {
                let Packet::Connect(connect) = packet else {
                    panic!("expected CONNECT, got {packet:?}");
                };
                peer.version = connect.protocol;
                let raw = snapshot.slice(..snapshot.len() - peer.buf.len());
                return (peer, connect, raw);
            }
            peer.read_more().await.expect("CONNECT arrives");
        }
    }

    async fn read_more(&mut self) -> Option<()> {
        match tokio::time::timeout(WAIT, self.stream.read_buf(&mut self.buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => None,
            Ok(Ok(_)) => Some(()),
            Err(_) => panic!("timed out waiting for the client"),
        }
    }

    async fn send(&mut self, packet: Packet) {
        let mut out = BytesMut::new();
        encode(&packet, self.version, &mut out).expect("encode");
        self.stream.write_all(&out).await.expect("write");
    }

    async fn connack(&mut self, session_present: bool, properties: Properties) {
        self.send(Packet::ConnAck(ConnAck {
            session_present,
            reason_code: ReasonCode::SUCCESS,
            properties,
        }))
        .await;
    }

    /// The next packet, or `None` when the client closed the connection.
    async fn recv(&mut self) -> Option<Packet> {
        loop {
            if let Some(packet) = decode(&mut self.buf, self.version, usize::MAX).expect("valid") {
                return Some(packet);
            }
            self.read_more().await?;
        }
    }

    /// The next packet that is not a PINGREQ.
    async fn recv_significant(&mut self) -> Option<Packet> {
        loop {
            match self.recv().await? {
                Packet::PingReq => {}
                other => return Some(other),
            }
        }
    }

    /// Assert that nothing but pings arrives for a while.
    async fn expect_quiet(&mut self) {
        let outcome = tokio::time::timeout(QUIET, self.recv_significant()).await;
        assert!(outcome.is_err(), "unexpected packet {outcome:?}");
    }
}

fn options(port: u16, version: ProtocolVersion) -> ClientOptions {
    ClientOptions::new("scripted", "127.0.0.1", port)
        .protocol(version)
        .reconnect_backoff(Duration::from_millis(20), Duration::from_millis(100))
        .connect_timeout(Duration::from_secs(2))
}

async fn listener() -> (TcpListener, u16) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    (listener, port)
}

/// Connect a spawned client to a scripted broker that answers CONNACK with `properties`.
async fn connected_pair(
    version: ProtocolVersion,
    properties: Properties,
    configure: impl FnOnce(ClientOptions) -> ClientOptions,
) -> (Client, polyhub_client::Events, Peer, Connect, TcpListener) {
    let (listener, port) = listener().await;
    let connecting = tokio::spawn(Client::connect(configure(options(port, version))));
    let (mut peer, connect, _) = Peer::accept(&listener).await;
    peer.connack(false, properties).await;
    let (client, mut events) = connecting.await.expect("join").expect("connect");
    connected(&mut events).await;
    (client, events, peer, connect, listener)
}

#[tokio::test]
async fn mqtt_3_1_speaks_mqisdp_level_3_with_everything_set() {
    bounded(async {
        let (listener, port) = listener().await;
        let will = LastWill {
            topic: "presence/device".into(),
            payload: Bytes::from_static(b"offline"),
            qos: QoS::AtLeastOnce,
            retain: true,
            properties: Properties::default(),
        };
        let options = options(port, ProtocolVersion::V31)
            .keep_alive(Duration::from_secs(10))
            .clean_start(false)
            .last_will(will.clone())
            .credentials("user", "secret");
        let connecting = tokio::spawn(Client::connect(options));
        let (mut peer, connect, raw) = Peer::accept(&listener).await;
        // Fixed header (2 bytes), then the protocol name and level.
        assert_eq!(&raw[2..10], b"\x00\x06MQIsdp");
        assert_eq!(raw[10], 3);
        assert_eq!(connect.client_id, "scripted");
        assert_eq!(connect.keep_alive, 10);
        assert!(!connect.clean_start);
        assert_eq!(connect.will, Some(will));
        assert_eq!(connect.username.as_deref(), Some("user"));
        assert_eq!(connect.password.as_deref(), Some(&b"secret"[..]));
        peer.connack(false, Properties::default()).await;
        let (client, mut events) = connecting.await.expect("join").expect("connect");
        connected(&mut events).await;

        // An empty client id gets a random one that 3.1 accepts.
        let (_anonymous, mut anonymous_loop) = EventLoop::new(
            ClientOptions::new("", "127.0.0.1", port).protocol(ProtocolVersion::V31),
        );
        let polling = tokio::spawn(async move { anonymous_loop.poll().await.map(|_| ()) });
        let (_peer, connect, _) = Peer::accept(&listener).await;
        assert!(!connect.client_id.is_empty() && connect.client_id.len() <= 23);
        polling.abort();
        drop(client);
    })
    .await;
}

#[tokio::test]
async fn mqtt_5_connect_carries_the_session_and_limits() {
    bounded(async {
        let (_client, _events, _peer, connect, _listener) =
            connected_pair(ProtocolVersion::V5, Properties::default(), |options| {
                options
                    .session_expiry_interval(600)
                    .receive_maximum(7)
                    .max_packet_size(4096)
                    .connect_user_property("device", "d1")
            })
            .await;
        assert_eq!(connect.protocol, ProtocolVersion::V5);
        assert!(connect.clean_start);
        let properties = &connect.properties;
        assert_eq!(properties.session_expiry_interval, Some(600));
        assert_eq!(properties.receive_maximum, Some(7));
        assert_eq!(properties.maximum_packet_size, Some(4096));
        assert_eq!(properties.topic_alias_maximum, Some(64));
        assert_eq!(
            properties.user_properties,
            [("device".to_owned(), "d1".to_owned())]
        );
    })
    .await;
}

#[tokio::test]
async fn a_silent_broker_is_detected_by_keep_alive() {
    bounded(async {
        let (_client, mut events, mut peer, _, listener) =
            connected_pair(ProtocolVersion::V311, Properties::default(), |options| {
                options.keep_alive(Duration::from_secs(1))
            })
            .await;
        let started = tokio::time::Instant::now();
        // An idle client pings within the keep-alive...
        assert_eq!(peer.recv().await, Some(Packet::PingReq));
        assert!(started.elapsed() <= Duration::from_millis(1500));
        // ...and an answered ping keeps the connection.
        peer.send(Packet::PingResp).await;
        assert_eq!(peer.recv().await, Some(Packet::PingReq));
        // Unanswered, the connection is given up one keep-alive later.
        let unanswered = tokio::time::Instant::now();
        let reason = disconnected(&mut events).await;
        assert!(
            matches!(
                reason,
                DisconnectReason::Error(ConnectionError::KeepAliveTimeout(period))
                    if period == Duration::from_secs(1)
            ),
            "{reason:?}"
        );
        let waited = unanswered.elapsed();
        assert!(
            waited >= Duration::from_millis(900) && waited <= Duration::from_millis(2400),
            "{waited:?}"
        );
        // And the client comes back by itself.
        let (mut peer, _, _) = Peer::accept(&listener).await;
        peer.connack(false, Properties::default()).await;
        connected(&mut events).await;
    })
    .await;
}

#[tokio::test]
async fn the_brokers_receive_maximum_bounds_publishes_in_flight() {
    bounded(async {
        let limits = Properties {
            receive_maximum: Some(2),
            ..Properties::default()
        };
        let (client, _events, mut peer, _, _listener) =
            connected_pair(ProtocolVersion::V5, limits, |options| options).await;
        let mut acks = Vec::new();
        for n in 0..5 {
            let message = Message::new("flow", n.to_string()).qos(QoS::AtLeastOnce);
            acks.push(client.begin_publish(message).await.expect("queued"));
        }
        let mut in_flight = Vec::new();
        for _ in 0..2 {
            match peer.recv_significant().await {
                Some(Packet::Publish(publish)) => in_flight.push(publish.packet_id),
                other => panic!("expected PUBLISH, got {other:?}"),
            }
        }
        peer.expect_quiet().await;
        peer.send(Packet::PubAck(PubResponse::success(in_flight[0])))
            .await;
        match peer.recv_significant().await {
            Some(Packet::Publish(publish)) => assert_eq!(publish.payload, "2"),
            other => panic!("expected PUBLISH, got {other:?}"),
        }
        peer.expect_quiet().await;
        acks.remove(0).await.expect("first acknowledged");
    })
    .await;
}

#[tokio::test]
async fn the_brokers_maximum_packet_size_and_qos_are_honoured() {
    bounded(async {
        let limits = Properties {
            maximum_packet_size: Some(100),
            maximum_qos: Some(1),
            ..Properties::default()
        };
        let (client, _events, mut peer, _, _listener) =
            connected_pair(ProtocolVersion::V5, limits, |options| options).await;
        let refused = client
            .publish("big", QoS::AtMostOnce, false, vec![0u8; 200])
            .await;
        // QoS 0 is not acknowledged: the refusal shows only in what reaches the broker.
        assert_eq!(refused.map(|published| published.reason_code()), Ok(None));
        assert!(matches!(
            client
                .publish("big", QoS::AtLeastOnce, false, vec![0u8; 200])
                .await,
            Err(ClientError::PacketTooLarge { max: 100, .. })
        ));
        assert_eq!(
            client.publish("exact", QoS::ExactlyOnce, false, "x").await,
            Err(ClientError::QoSNotSupported {
                requested: QoS::ExactlyOnce,
                maximum: QoS::AtLeastOnce
            })
        );
        client
            .publish("small", QoS::AtMostOnce, false, "fits")
            .await
            .expect("publish");
        match peer.recv_significant().await {
            Some(Packet::Publish(publish)) => assert_eq!(publish.topic, "small"),
            other => panic!("expected only the small PUBLISH, got {other:?}"),
        }
    })
    .await;
}

fn aliased(topic: &str, alias: u16) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: topic.into(),
        packet_id: 0,
        payload: Bytes::from_static(b"reading"),
        properties: Properties {
            topic_alias: Some(alias),
            ..Properties::default()
        },
    })
}

#[tokio::test]
async fn inbound_topic_aliases_are_resolved_and_policed() {
    bounded(async {
        let (_client, mut events, mut peer, _, _listener) =
            connected_pair(ProtocolVersion::V5, Properties::default(), |options| {
                options.topic_alias_maximum(8)
            })
            .await;
        peer.send(aliased("sensors/kitchen", 3)).await;
        peer.send(aliased("", 3)).await;
        assert_eq!(next_message(&mut events).await.topic, "sensors/kitchen");
        assert_eq!(next_message(&mut events).await.topic, "sensors/kitchen");

        // Beyond the announced maximum: DISCONNECT "topic alias invalid", then reconnect.
        peer.send(aliased("sensors/hall", 9)).await;
        assert_eq!(
            peer.recv_significant().await,
            Some(Packet::Disconnect(Disconnect::with_reason(
                ReasonCode::TOPIC_ALIAS_INVALID
            )))
        );
        let reason = disconnected(&mut events).await;
        assert!(
            matches!(
                reason,
                DisconnectReason::Error(ConnectionError::Protocol(
                    StateError::TopicAliasOutOfRange(9)
                ))
            ),
            "{reason:?}"
        );
    })
    .await;
}

#[tokio::test]
async fn unacknowledged_publishes_are_resent_with_dup_after_a_reconnect() {
    bounded(async {
        let (client, mut events, mut peer, _, listener) =
            connected_pair(ProtocolVersion::V311, Properties::default(), |options| {
                options
            })
            .await;
        let ack = client
            .begin_publish(Message::new("important", "data").qos(QoS::ExactlyOnce))
            .await
            .expect("queued");
        let first = match peer.recv_significant().await {
            Some(Packet::Publish(publish)) => publish,
            other => panic!("expected PUBLISH, got {other:?}"),
        };
        assert!(!first.dup);
        drop(peer);
        disconnected(&mut events).await;

        let (mut peer, connect, _) = Peer::accept(&listener).await;
        assert!(connect.clean_start, "3.x sends clean session as configured");
        peer.connack(true, Properties::default()).await;
        match peer.recv_significant().await {
            Some(Packet::Publish(again)) => {
                assert!(again.dup);
                assert_eq!(again.packet_id, first.packet_id);
                assert_eq!(again.payload, first.payload);
            }
            other => panic!("expected the PUBLISH again, got {other:?}"),
        }
        peer.send(Packet::PubRec(PubResponse::success(first.packet_id)))
            .await;
        assert_eq!(
            peer.recv_significant().await,
            Some(Packet::PubRel(PubResponse::success(first.packet_id)))
        );
        peer.send(Packet::PubComp(PubResponse::success(first.packet_id)))
            .await;
        ack.await.expect("completed after the reconnect");
    })
    .await;
}

#[tokio::test]
async fn mqtt_5_reconnects_resume_the_session() {
    bounded(async {
        let (_client, mut events, peer, connect, listener) =
            connected_pair(ProtocolVersion::V5, Properties::default(), |options| {
                options.session_expiry_interval(60)
            })
            .await;
        assert!(connect.clean_start, "the first connection starts clean");
        drop(peer);
        disconnected(&mut events).await;
        let (_peer, connect, _) = Peer::accept(&listener).await;
        assert!(!connect.clean_start, "a reconnect resumes");
    })
    .await;
}

#[tokio::test]
async fn a_server_disconnect_is_reported_and_followed_by_a_reconnect() {
    bounded(async {
        let (_client, mut events, mut peer, _, listener) =
            connected_pair(ProtocolVersion::V5, Properties::default(), |options| {
                options
            })
            .await;
        let mut disconnect = Disconnect::with_reason(ReasonCode::SERVER_SHUTTING_DOWN);
        disconnect.properties.reason_string = Some("maintenance".into());
        peer.send(Packet::Disconnect(disconnect)).await;
        match disconnected(&mut events).await {
            DisconnectReason::ServerDisconnect {
                reason_code,
                reason_string,
            } => {
                assert_eq!(reason_code, ReasonCode::SERVER_SHUTTING_DOWN);
                assert_eq!(reason_string.as_deref(), Some("maintenance"));
            }
            other => panic!("{other:?}"),
        }
        let (mut peer, _, _) = Peer::accept(&listener).await;
        peer.connack(false, Properties::default()).await;
        connected(&mut events).await;
    })
    .await;
}

#[tokio::test]
async fn a_refused_connection_is_an_error_of_connect() {
    for (version, code) in [
        (ProtocolVersion::V311, ReasonCode::BAD_USER_NAME_OR_PASSWORD),
        (ProtocolVersion::V5, ReasonCode::NOT_AUTHORIZED),
    ] {
        bounded(async {
            let (listener, port) = listener().await;
            let connecting = tokio::spawn(Client::connect(options(port, version)));
            let (mut peer, _, _) = Peer::accept(&listener).await;
            peer.send(Packet::ConnAck(ConnAck {
                session_present: false,
                reason_code: code,
                properties: Properties::default(),
            }))
            .await;
            match connecting.await.expect("join") {
                Err(ConnectionError::Refused { reason_code, .. }) => assert_eq!(reason_code, code),
                other => panic!("{other:?}"),
            }
        })
        .await;
    }
}

#[tokio::test]
async fn a_refused_subscription_is_an_error() {
    bounded(async {
        let (client, _events, mut peer, _, _listener) =
            connected_pair(ProtocolVersion::V311, Properties::default(), |options| {
                options
            })
            .await;
        let subscribing = tokio::spawn({
            let client = client.clone();
            async move { client.subscribe("secret/#", QoS::AtLeastOnce).await }
        });
        let packet_id = match peer.recv_significant().await {
            Some(Packet::Subscribe(subscribe)) => subscribe.packet_id,
            other => panic!("expected SUBSCRIBE, got {other:?}"),
        };
        peer.send(Packet::SubAck(SubAck {
            packet_id,
            reason_codes: vec![ReasonCode::UNSPECIFIED_ERROR],
            properties: Properties::default(),
        }))
        .await;
        assert_eq!(
            subscribing.await.expect("join"),
            Err(ClientError::SubscriptionRefused {
                filter: "secret/#".into(),
                reason_code: ReasonCode::UNSPECIFIED_ERROR,
            })
        );
        assert!(matches!(
            client.subscribe("bad/#/filter", QoS::AtMostOnce).await,
            Err(ClientError::InvalidFilter { .. })
        ));
        assert!(matches!(
            client.publish("bad/+", QoS::AtMostOnce, false, "x").await,
            Err(ClientError::InvalidTopic { .. })
        ));
    })
    .await;
}

#[tokio::test]
async fn offline_publishes_wait_for_the_connection_up_to_the_limit() {
    bounded(async {
        let port = free_port();
        let (client, event_loop) =
            EventLoop::new(options(port, ProtocolVersion::V311).pending_limit(2));
        let mut events = event_loop.spawn();
        assert!(matches!(
            next_event(&mut events).await,
            Event::ConnectFailed {
                retry_in: Some(_),
                ..
            }
        ));
        let first = client
            .begin_publish(Message::new("queued", "1").qos(QoS::AtLeastOnce))
            .await
            .expect("queued");
        let second = client
            .begin_publish(Message::new("queued", "2").qos(QoS::AtMostOnce))
            .await
            .expect("queued");
        assert_eq!(
            client.publish("queued", QoS::AtLeastOnce, false, "3").await,
            Err(ClientError::OfflineQueueFull { limit: 2 })
        );
        second.await.expect("QoS 0 completes when queued");

        let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
        let (mut peer, _, _) = Peer::accept(&listener).await;
        peer.connack(false, Properties::default()).await;
        let mut payloads = Vec::new();
        for _ in 0..2 {
            match peer.recv_significant().await {
                Some(Packet::Publish(publish)) => {
                    if publish.qos == QoS::AtLeastOnce {
                        peer.send(Packet::PubAck(PubResponse::success(publish.packet_id)))
                            .await;
                    }
                    payloads.push(publish.payload);
                }
                other => panic!("expected PUBLISH, got {other:?}"),
            }
        }
        assert_eq!(payloads, ["1", "2"]);
        first.await.expect("acknowledged after connecting");
    })
    .await;
}

#[tokio::test]
async fn without_reconnect_the_client_stops_at_the_first_loss() {
    bounded(async {
        let (client, mut events, peer, _, _listener) =
            connected_pair(ProtocolVersion::V311, Properties::default(), |options| {
                options.reconnect(false)
            })
            .await;
        let ack = client
            .begin_publish(Message::new("t", "x").qos(QoS::AtLeastOnce))
            .await
            .expect("queued");
        drop(peer);
        assert!(matches!(
            disconnected(&mut events).await,
            DisconnectReason::Error(ConnectionError::ClosedByBroker)
        ));
        assert!(events.recv().await.is_none());
        assert_eq!(ack.await, Err(ClientError::Closed));
        assert_eq!(
            client.publish("t", QoS::AtMostOnce, false, "x").await,
            Err(ClientError::Closed)
        );
    })
    .await;
}

#[tokio::test]
async fn a_caller_driven_event_loop_serves_requests_while_polled() {
    bounded(async {
        let (listener, port) = listener().await;
        let (client, mut event_loop) = EventLoop::new(options(port, ProtocolVersion::V5));
        let broker = tokio::spawn(async move {
            let (mut peer, _, _) = Peer::accept(&listener).await;
            peer.connack(false, Properties::default()).await;
            let Some(Packet::Publish(publish)) = peer.recv_significant().await else {
                panic!("expected PUBLISH");
            };
            peer.send(Packet::PubAck(PubResponse::success(publish.packet_id)))
                .await;
            // Echo it back as a delivery.
            peer.send(Packet::Publish(Publish {
                packet_id: 0,
                qos: QoS::AtMostOnce,
                ..publish
            }))
            .await;
            peer
        });
        let publishing = tokio::spawn(async move {
            client
                .publish("echo", QoS::AtLeastOnce, false, "ping")
                .await
                .map(|_| client)
        });
        let mut seen = Vec::new();
        let echoed = loop {
            match tokio::time::timeout(WAIT, event_loop.poll())
                .await
                .expect("event")
            {
                Some(Event::Message(message)) => break message,
                Some(other) => seen.push(format!("{other:?}")),
                None => panic!("stopped early after {seen:?}"),
            }
        };
        assert_eq!(echoed.payload, "ping");
        assert!(seen[0].starts_with("Connected"), "{seen:?}");
        let client = publishing.await.expect("join").expect("acknowledged");
        let _peer = broker.await.expect("broker script");

        // disconnect() completes while the loop is polled.
        let disconnecting = tokio::spawn(async move { client.disconnect().await });
        assert!(matches!(
            event_loop.poll().await,
            Some(Event::Disconnected {
                reason: DisconnectReason::ClientDisconnect
            })
        ));
        assert!(event_loop.poll().await.is_none());
        assert_eq!(disconnecting.await.expect("join"), Ok(()));
    })
    .await;
}

/// A clean disconnect waits for the broker to close and reads what still arrives meanwhile:
/// closing with unread input would reset the connection, and a reset can discard the last
/// packets sent (the DISCONNECT among them) before the broker reads them.
#[tokio::test]
async fn a_disconnect_reads_until_the_broker_closes_and_never_resets() {
    bounded(async {
        let (client, _events, mut peer, _, _listener) =
            connected_pair(ProtocolVersion::V311, Properties::default(), |options| {
                options
            })
            .await;
        let disconnecting = tokio::spawn(async move { client.disconnect().await });
        assert!(matches!(
            peer.recv_significant().await,
            Some(Packet::Disconnect(_))
        ));
        // Input the client has not read when it is done writing.
        let late = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "late".into(),
            packet_id: 0,
            payload: Bytes::from_static(b"x"),
            properties: Properties::default(),
        });
        for _ in 0..3 {
            peer.send(late.clone()).await;
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert!(
            !disconnecting.is_finished(),
            "the client closed before the broker did"
        );
        // No reset came back: the connection still takes bytes.
        let mut out = BytesMut::new();
        encode(&late, peer.version, &mut out).expect("encode");
        peer.stream
            .write_all(&out)
            .await
            .expect("the client did not reset the connection");
        drop(peer);
        let done = tokio::time::timeout(WAIT, disconnecting)
            .await
            .expect("the disconnect ends once the broker closes");
        assert_eq!(done.expect("join"), Ok(()));
    })
    .await;
}
