//! [`ClientOptions`]: everything a client needs to know before it connects, as a by-value
//! builder.
//!
//! ```
//! use std::time::Duration;
//! use polyhub_client::{ClientOptions, ProtocolVersion};
//!
//! let options = ClientOptions::new("sensor-1", "127.0.0.1", 1883)
//!     .protocol(ProtocolVersion::V31)
//!     .keep_alive(Duration::from_secs(10))
//!     .reconnect_backoff(Duration::from_millis(100), Duration::from_secs(5));
//! assert_eq!(options.client_id(), "sensor-1");
//! ```

use std::time::Duration;

use bytes::Bytes;
use polyhub_mqtt::{LastWill, ProtocolVersion};

use crate::state::StateConfig;
use crate::tls::TlsOptions;

/// How to connect, and how the client behaves. See each setter for its default.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) client_id: String,
    pub(crate) protocol: ProtocolVersion,
    pub(crate) keep_alive: Duration,
    pub(crate) clean_start: bool,
    pub(crate) session_expiry_interval: Option<u32>,
    pub(crate) receive_maximum: Option<u16>,
    pub(crate) max_packet_size: Option<u32>,
    pub(crate) topic_alias_maximum: u16,
    pub(crate) connect_user_properties: Vec<(String, String)>,
    pub(crate) will: Option<LastWill>,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<Bytes>,
    pub(crate) tls: Option<TlsOptions>,
    pub(crate) reconnect: bool,
    pub(crate) backoff_min: Duration,
    pub(crate) backoff_max: Duration,
    pub(crate) backoff_jitter: bool,
    pub(crate) connect_timeout: Duration,
    pub(crate) inflight_limit: u16,
    pub(crate) pending_limit: usize,
    pub(crate) request_capacity: usize,
    pub(crate) event_capacity: usize,
    pub(crate) manual_acks: bool,
}

impl ClientOptions {
    /// Options for connecting to `host:port` as `client_id`, with the defaults below.
    ///
    /// An empty client id asks the broker to assign one (MQTT 3.1.1 with a clean session, and
    /// 5.0); for MQTT 3.1, which does not allow that, the client makes up a random one.
    pub fn new(client_id: impl Into<String>, host: impl Into<String>, port: u16) -> ClientOptions {
        ClientOptions {
            host: host.into(),
            port,
            client_id: client_id.into(),
            protocol: ProtocolVersion::V311,
            keep_alive: Duration::from_secs(30),
            clean_start: true,
            session_expiry_interval: None,
            receive_maximum: None,
            max_packet_size: None,
            topic_alias_maximum: 64,
            connect_user_properties: Vec::new(),
            will: None,
            username: None,
            password: None,
            tls: None,
            reconnect: true,
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
            backoff_jitter: true,
            connect_timeout: Duration::from_secs(10),
            inflight_limit: 20,
            pending_limit: 1000,
            request_capacity: 256,
            event_capacity: 256,
            manual_acks: false,
        }
    }

    /// The broker's host name or IP address.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The broker's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The client identifier sent in CONNECT.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The protocol version spoken.
    pub fn protocol_version(&self) -> ProtocolVersion {
        self.protocol
    }

    /// MQTT version: 3.1 (`MQIsdp`), 3.1.1 or 5.0. Default 3.1.1.
    pub fn protocol(mut self, protocol: ProtocolVersion) -> Self {
        self.protocol = protocol;
        self
    }

    /// Keep-alive, in whole seconds up to 65,535; zero turns it off. Default 30 s.
    ///
    /// The client pings when it has been silent, or the broker has, for half of it, and gives
    /// the connection up when a PINGRESP has not come within a whole keep-alive. An MQTT 5
    /// broker may impose another value (server keep-alive), which then applies.
    pub fn keep_alive(mut self, keep_alive: Duration) -> Self {
        self.keep_alive = keep_alive;
        self
    }

    /// Clean session (3.x) / clean start (5.0). Default `true`.
    ///
    /// With 3.x the flag is sent as given on every connection. With 5.0 it is sent on the first
    /// connection only; reconnects resume the session, which the broker keeps for the
    /// [`session_expiry_interval`](Self::session_expiry_interval).
    pub fn clean_start(mut self, clean_start: bool) -> Self {
        self.clean_start = clean_start;
        self
    }

    /// MQTT 5 session expiry interval in seconds (`u32::MAX`: never). Default: not sent (0,
    /// the session ends with the connection).
    pub fn session_expiry_interval(mut self, seconds: u32) -> Self {
        self.session_expiry_interval = Some(seconds);
        self
    }

    /// MQTT 5 receive maximum announced to the broker: how many QoS 1/2 messages it may have
    /// unacknowledged towards us. Default: not sent (65,535).
    pub fn receive_maximum(mut self, receive_maximum: u16) -> Self {
        self.receive_maximum = Some(receive_maximum.max(1));
        self
    }

    /// Largest packet accepted from the broker; announced in MQTT 5 CONNECT. Default: MQTT's
    /// own limit (about 256 MiB), not announced.
    pub fn max_packet_size(mut self, bytes: u32) -> Self {
        self.max_packet_size = Some(bytes);
        self
    }

    /// Highest MQTT 5 topic alias the broker may use towards us (0: none). Default 64.
    pub fn topic_alias_maximum(mut self, maximum: u16) -> Self {
        self.topic_alias_maximum = maximum;
        self
    }

    /// An MQTT 5 user property for CONNECT (may be repeated).
    pub fn connect_user_property(
        mut self,
        name: impl Into<String>,
        value: impl Into<String>,
    ) -> Self {
        self.connect_user_properties
            .push((name.into(), value.into()));
        self
    }

    /// The last will: published by the broker when the connection ends without DISCONNECT.
    /// Its `properties` (MQTT 5: will delay, message expiry, content type, ...) are sent with
    /// 5.0 only.
    pub fn last_will(mut self, will: LastWill) -> Self {
        self.will = Some(will);
        self
    }

    /// User name and password.
    pub fn credentials(mut self, username: impl Into<String>, password: impl Into<Bytes>) -> Self {
        self.username = Some(username.into());
        self.password = Some(password.into());
        self
    }

    /// User name without a password.
    pub fn username(mut self, username: impl Into<String>) -> Self {
        self.username = Some(username.into());
        self
    }

    /// Connect over TLS. The server name checked against the broker's certificate is the host,
    /// unless [`TlsOptions::server_name`] says otherwise.
    pub fn tls(mut self, tls: TlsOptions) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Whether to reconnect after a connection is lost or an attempt fails. Default `true`.
    /// Without, the client shuts down at the first loss (pending requests fail with
    /// [`ClientError::Closed`](crate::ClientError::Closed)).
    pub fn reconnect(mut self, reconnect: bool) -> Self {
        self.reconnect = reconnect;
        self
    }

    /// Delay before reconnecting: `min`, doubled after each failed attempt, at most `max`.
    /// Default 250 ms to 30 s. A successful CONNACK starts again from `min`.
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff_min = min;
        self.backoff_max = max.max(min);
        self
    }

    /// Randomise each delay to between half and all of its value, so that many clients cut
    /// off together do not come back together. Default `true`.
    pub fn reconnect_jitter(mut self, jitter: bool) -> Self {
        self.backoff_jitter = jitter;
        self
    }

    /// How long a connection attempt (TCP, TLS, CONNECT → CONNACK) may take. Default 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Most outgoing QoS 1/2 publishes awaiting acknowledgement (the broker's MQTT 5 receive
    /// maximum lowers it further). Default 20.
    ///
    /// Why 20: a 3.x broker cannot announce its limit, and Mosquitto (default
    /// `max_inflight_messages 20`) silently drops incoming QoS 2 messages beyond it while
    /// still acknowledging them to a 3.x client. paho uses the same default.
    pub fn inflight_limit(mut self, limit: u16) -> Self {
        self.inflight_limit = limit.max(1);
        self
    }

    /// Most publishes waiting for the connection (offline) or for a free inflight slot.
    /// Default 1000. Offline, publishes beyond it fail with
    /// [`ClientError::OfflineQueueFull`](crate::ClientError::OfflineQueueFull); online, further
    /// requests wait until the broker acknowledges.
    pub fn pending_limit(mut self, limit: usize) -> Self {
        self.pending_limit = limit;
        self
    }

    /// Capacity of the channel from the handles to the connection task. Default 256.
    pub fn request_capacity(mut self, capacity: usize) -> Self {
        self.request_capacity = capacity.max(1);
        self
    }

    /// Capacity of the event channel of a spawned client ([`Client::connect`](crate::Client::connect),
    /// [`EventLoop::spawn`](crate::EventLoop::spawn)). Default 256. While it is full the
    /// connection task waits, and so does the broker's flow towards this client.
    pub fn event_capacity(mut self, capacity: usize) -> Self {
        self.event_capacity = capacity.max(1);
        self
    }

    /// Acknowledge incoming QoS 1/2 messages only when the application says so, with the
    /// [`AckToken`](crate::AckToken) that comes with each ([`Events::recv_with_ack`],
    /// [`EventLoop::poll_with_ack`]) passed to [`Client::ack`]. Default `false`: acknowledged on
    /// receipt.
    ///
    /// An unacknowledged message keeps its place in the broker's inflight window (our receive
    /// maximum, [`receive_maximum`](Self::receive_maximum)), so at most that many wait for the
    /// application at once. If the connection ends first, a broker that kept the session
    /// delivers them again (with DUP) on the next connection, and the old tokens go stale.
    ///
    /// [`Events::recv_with_ack`]: crate::Events::recv_with_ack
    /// [`EventLoop::poll_with_ack`]: crate::EventLoop::poll_with_ack
    /// [`Client::ack`]: crate::Client::ack
    pub fn manual_acks(mut self, manual: bool) -> Self {
        self.manual_acks = manual;
        self
    }

    /// Keep-alive as sent in CONNECT.
    pub(crate) fn keep_alive_secs(&self) -> u16 {
        u16::try_from(self.keep_alive.as_secs()).unwrap_or(u16::MAX)
    }

    /// Decoder limit for packets from the broker.
    pub(crate) fn max_incoming_packet_size(&self) -> usize {
        match self.max_packet_size {
            Some(bytes) => bytes as usize,
            // The largest packet MQTT can express: remaining length plus a 5-byte fixed header.
            None => polyhub_mqtt::codec::MAX_REMAINING_LENGTH + 5,
        }
    }

    pub(crate) fn state_config(&self) -> StateConfig {
        StateConfig {
            version: self.protocol,
            inflight_limit: self.inflight_limit,
            pending_limit: self.pending_limit,
            topic_alias_maximum: if self.protocol.is_v5() {
                self.topic_alias_maximum
            } else {
                0
            },
            manual_acks: self.manual_acks,
        }
    }
}
