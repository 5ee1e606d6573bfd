//! A small raw MQTT test client over TCP, built on the polyhub-mqtt codec, and a broker
//! started on `127.0.0.1:0`.
//!
//! Every wait is bounded: reads give up after [`WAIT`], and tests wrap themselves in
//! [`bounded`].

#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use polyhub_broker::{Broker, BrokerConfig, BrokerError};
use polyhub_mqtt::{
    ConnAck, Connect, Disconnect, LastWill, Packet, Properties, ProtocolVersion, PubResponse,
    Publish, QoS, ReasonCode, SubAck, Subscribe, SubscribeFilter, SubscriptionOptions, UnsubAck,
    Unsubscribe, decode, encode,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How long a client waits for an expected packet.
pub const WAIT: Duration = Duration::from_secs(5);

/// How long a client waits to be sure that nothing arrives.
pub const QUIET: Duration = Duration::from_millis(300);

/// Run a test body with an overall time limit.
pub async fn bounded<F: Future<Output = ()>>(body: F) {
    tokio::time::timeout(Duration::from_secs(60), body)
        .await
        .expect("test took longer than 60 s");
}

/// A broker serving on an ephemeral loopback port.
pub struct TestBroker {
    pub broker: Broker,
    pub addr: SocketAddr,
    serve: JoinHandle<Result<(), BrokerError>>,
}

/// Start a broker with `config` ($SYS off unless the test asks for it).
pub async fn start(config: BrokerConfig) -> TestBroker {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let broker = Broker::new(config);
    let serving = broker.clone();
    let serve =
        tokio::spawn(async move { serving.serve(listener, std::future::pending::<()>()).await });
    TestBroker {
        broker,
        addr,
        serve,
    }
}

/// Default test config: `$SYS` off so that it does not interfere.
pub fn config() -> BrokerConfig {
    BrokerConfig {
        sys_interval: 0,
        ..BrokerConfig::default()
    }
}

impl TestBroker {
    /// Shut down and check that `serve` returned `Ok`.
    pub async fn stop(self) {
        tokio::time::timeout(WAIT, self.broker.shutdown())
            .await
            .expect("shutdown did not finish");
        let served = tokio::time::timeout(WAIT, self.serve)
            .await
            .expect("serve did not return after shutdown")
            .unwrap();
        assert!(served.is_ok());
    }

    /// A connected client with the given version and id.
    pub async fn client(&self, version: ProtocolVersion, client_id: &str) -> Client {
        let (client, connack) = Client::connect(self.addr, connect(version, client_id)).await;
        assert_eq!(connack.reason_code, ReasonCode::SUCCESS, "{connack:?}");
        client
    }
}

/// A CONNECT with clean start, keep-alive 60 s and no will.
pub fn connect(version: ProtocolVersion, client_id: &str) -> Connect {
    Connect {
        protocol: version,
        clean_start: true,
        keep_alive: 60,
        client_id: client_id.into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    }
}

/// A will on `topic` with `payload`.
pub fn will(topic: &str, payload: &'static [u8], qos: QoS, retain: bool) -> LastWill {
    LastWill {
        topic: topic.into(),
        payload: Bytes::from_static(payload),
        qos,
        retain,
        properties: Properties::default(),
    }
}

/// A PUBLISH with no properties.
pub fn publish(topic: &str, payload: &[u8], qos: QoS, retain: bool, packet_id: u16) -> Publish {
    Publish {
        dup: false,
        qos,
        retain,
        topic: topic.into(),
        packet_id,
        payload: Bytes::copy_from_slice(payload),
        properties: Properties::default(),
    }
}

/// Any byte stream a test client can run over (TCP, TLS).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A raw MQTT client: sends packets and reads them back one at a time.
pub struct Client {
    stream: Box<dyn Stream>,
    buf: BytesMut,
    pub version: ProtocolVersion,
    next_packet_id: u16,
}

impl Client {
    /// Open a TCP connection without sending anything.
    pub async fn open(addr: SocketAddr, version: ProtocolVersion) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Client::over(Box::new(stream), version)
    }

    /// A client over an already open stream.
    pub fn over(stream: Box<dyn Stream>, version: ProtocolVersion) -> Client {
        Client {
            stream,
            buf: BytesMut::new(),
            version,
            next_packet_id: 1,
        }
    }

    /// Connect with `connect` and return the client and its CONNACK.
    pub async fn connect(addr: SocketAddr, connect: Connect) -> (Client, ConnAck) {
        let client = Client::open(addr, connect.protocol).await;
        client.handshake(connect).await
    }

    /// Send CONNECT on an open stream and read the CONNACK.
    pub async fn handshake(mut self, connect: Connect) -> (Client, ConnAck) {
        self.send(&Packet::Connect(connect)).await;
        match self.recv().await {
            Packet::ConnAck(connack) => (self, connack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Send one packet.
    pub async fn send(&mut self, packet: &Packet) {
        let mut out = BytesMut::new();
        encode(packet, self.version, &mut out).unwrap();
        self.stream.write_all(&out).await.unwrap();
    }

    /// Send raw bytes.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// The next packet, or `None` if none arrives within `wait` or the connection closes.
    pub async fn try_recv(&mut self, wait: Duration) -> Option<Packet> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(packet) = decode(&mut self.buf, self.version, usize::MAX).unwrap() {
                return Some(packet);
            }
            let read = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await;
            match read {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// The next packet; panics if none arrives within [`WAIT`].
    pub async fn recv(&mut self) -> Packet {
        match self.try_recv(WAIT).await {
            Some(packet) => packet,
            None => panic!("no packet within {WAIT:?}"),
        }
    }

    /// The next packet, which must be a PUBLISH.
    pub async fn recv_publish(&mut self) -> Publish {
        match self.recv().await {
            Packet::Publish(publish) => publish,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// The next PUBLISH, acknowledged as its QoS requires (QoS 2: PUBREC, then PUBREL is
    /// awaited and answered with PUBCOMP).
    pub async fn recv_publish_acked(&mut self) -> Publish {
        let publish = self.recv_publish().await;
        match publish.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => {
                self.send(&Packet::PubAck(PubResponse::success(publish.packet_id)))
                    .await;
            }
            QoS::ExactlyOnce => {
                self.send(&Packet::PubRec(PubResponse::success(publish.packet_id)))
                    .await;
                match self.recv().await {
                    Packet::PubRel(rel) => assert_eq!(rel.packet_id, publish.packet_id),
                    other => panic!("expected PUBREL, got {other:?}"),
                }
                self.send(&Packet::PubComp(PubResponse::success(publish.packet_id)))
                    .await;
            }
        }
        publish
    }

    /// Assert that nothing arrives for [`QUIET`].
    pub async fn expect_nothing(&mut self) {
        if let Some(packet) = self.try_recv(QUIET).await {
            panic!("expected nothing, got {packet:?}");
        }
    }

    /// Wait for the server to close the connection; returns the packets received before.
    pub async fn expect_close(&mut self) -> Vec<Packet> {
        self.expect_close_within(WAIT).await
    }

    /// Like [`Client::expect_close`] with a chosen limit.
    pub async fn expect_close_within(&mut self, wait: Duration) -> Vec<Packet> {
        let mut packets = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            while let Ok(Some(packet)) = decode(&mut self.buf, self.version, usize::MAX) {
                packets.push(packet);
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return packets,
                Ok(Ok(_)) => {}
                Err(_) => panic!("connection not closed within {wait:?}; got {packets:?}"),
            }
        }
    }

    fn packet_id(&mut self) -> u16 {
        let id = self.next_packet_id;
        self.next_packet_id = self.next_packet_id.wrapping_add(1).max(1);
        id
    }

    /// Subscribe to one filter with `options`; returns the SUBACK.
    pub async fn subscribe_with(
        &mut self,
        filter: &str,
        options: SubscriptionOptions,
        properties: Properties,
    ) -> SubAck {
        let packet_id = self.packet_id();
        self.send(&Packet::Subscribe(Subscribe {
            packet_id,
            filters: vec![SubscribeFilter {
                filter: filter.into(),
                options,
            }],
            properties,
        }))
        .await;
        match self.recv().await {
            Packet::SubAck(suback) => {
                assert_eq!(suback.packet_id, packet_id);
                suback
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// Subscribe to one filter at `qos`, asserting it is granted.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) {
        let suback = self
            .subscribe_with(
                filter,
                SubscriptionOptions {
                    qos,
                    ..SubscriptionOptions::default()
                },
                Properties::default(),
            )
            .await;
        assert_eq!(suback.reason_codes, vec![ReasonCode(qos as u8)]);
    }

    /// Unsubscribe from one filter; returns the UNSUBACK.
    pub async fn unsubscribe(&mut self, filter: &str) -> UnsubAck {
        let packet_id = self.packet_id();
        self.send(&Packet::Unsubscribe(Unsubscribe {
            packet_id,
            filters: vec![filter.into()],
            properties: Properties::default(),
        }))
        .await;
        match self.recv().await {
            Packet::UnsubAck(unsuback) => unsuback,
            other => panic!("expected UNSUBACK, got {other:?}"),
        }
    }

    /// Publish and complete the QoS flow; returns the PUBACK/PUBREC reason (SUCCESS for QoS 0).
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: &[u8],
        qos: QoS,
        retain: bool,
    ) -> ReasonCode {
        let packet_id = if qos == QoS::AtMostOnce {
            0
        } else {
            self.packet_id()
        };
        self.publish_packet(publish(topic, payload, qos, retain, packet_id))
            .await
    }

    /// Send `publish` (its packet id as given) and complete its QoS flow.
    pub async fn publish_packet(&mut self, publish: Publish) -> ReasonCode {
        let qos = publish.qos;
        let packet_id = publish.packet_id;
        self.send(&Packet::Publish(publish)).await;
        match qos {
            QoS::AtMostOnce => ReasonCode::SUCCESS,
            QoS::AtLeastOnce => match self.recv().await {
                Packet::PubAck(ack) => {
                    assert_eq!(ack.packet_id, packet_id);
                    ack.reason_code
                }
                other => panic!("expected PUBACK, got {other:?}"),
            },
            QoS::ExactlyOnce => {
                let reason = match self.recv().await {
                    Packet::PubRec(rec) => {
                        assert_eq!(rec.packet_id, packet_id);
                        rec.reason_code
                    }
                    other => panic!("expected PUBREC, got {other:?}"),
                };
                self.send(&Packet::PubRel(PubResponse::success(packet_id)))
                    .await;
                match self.recv().await {
                    Packet::PubComp(comp) => assert_eq!(comp.packet_id, packet_id),
                    other => panic!("expected PUBCOMP, got {other:?}"),
                }
                reason
            }
        }
    }

    /// Send PINGREQ and wait for PINGRESP (a round trip: everything sent before has been
    /// handled by the broker).
    pub async fn ping(&mut self) {
        self.send(&Packet::PingReq).await;
        match self.recv().await {
            Packet::PingResp => {}
            other => panic!("expected PINGRESP, got {other:?}"),
        }
    }

    /// Send DISCONNECT (normal) and wait for the close.
    pub async fn disconnect(mut self) {
        self.send(&Packet::Disconnect(Disconnect::with_reason(
            ReasonCode::NORMAL_DISCONNECTION,
        )))
        .await;
        self.expect_close().await;
    }

    /// Close the socket without DISCONNECT.
    pub async fn drop_connection(mut self) {
        let _ = self.stream.shutdown().await;
    }
}

/// A fresh data directory for one test, removed when dropped.
pub struct DataDir(pub std::path::PathBuf);

impl DataDir {
    /// `<temp>/polyhub-<suite>-<test>-<pid>`, emptied.
    pub fn new(suite: &str, test: &str) -> DataDir {
        let path =
            std::env::temp_dir().join(format!("polyhub-{suite}-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("test data directory");
        DataDir(path)
    }

    /// Where the broker's snapshot goes in it.
    pub fn snapshot(&self) -> std::path::PathBuf {
        polyhub_broker::persist::snapshot_path(&self.0)
    }
}

impl Drop for DataDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
