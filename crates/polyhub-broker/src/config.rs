//! Broker settings: the `[mqtt]` section of polyhub's configuration file.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// The `[mqtt]` section: where the broker listens and the limits it enforces.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Plain-TCP listener for MQTT 3.1, 3.1.1 and 5.0.
    pub listen: SocketAddr,
    /// Set TCP_NODELAY (Nagle's algorithm off) on every accepted connection, TLS included, as
    /// Mosquitto's `set_tcp_nodelay`. On by default: each write leaves at once, so latency
    /// stays low. Off, the kernel batches small writes into fewer segments while earlier data
    /// is unacknowledged: less CPU per message, but deliveries can wait for the client's
    /// delayed ACK (tens of milliseconds).
    pub tcp_nodelay: bool,
    /// Optional TLS listener (`[mqtt.tls]`).
    pub tls: Option<TlsConfig>,
    /// Limits and protocol behaviour (`[mqtt.limits]`).
    pub limits: BrokerConfig,
    /// Saving the broker's state across restarts (`[mqtt.persistence]`).
    pub persistence: PersistenceConfig,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            tcp_nodelay: true,
            tls: None,
            limits: BrokerConfig::default(),
            persistence: PersistenceConfig::default(),
        }
    }
}

impl MqttConfig {
    /// The options the broker applies to the sockets it accepts.
    pub fn socket_options(&self) -> SocketOptions {
        SocketOptions {
            tcp_nodelay: self.tcp_nodelay,
        }
    }
}

/// Options the broker applies to every socket it accepts, on every listener (plain and TLS).
///
/// Design: these belong to the broker rather than to one `serve` call because, as in
/// Mosquitto, they are one setting for the whole broker; keeping them out of [`BrokerConfig`]
/// keeps `[mqtt.limits]` about protocol limits only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketOptions {
    /// TCP_NODELAY: `true` sends each write at once (Nagle's algorithm off).
    pub tcp_nodelay: bool,
}

impl Default for SocketOptions {
    fn default() -> Self {
        MqttConfig::default().socket_options()
    }
}

/// The `[mqtt.persistence]` section: retained messages and persistent sessions saved to
/// `<data_dir>/broker.db` (see `docs/persistence.md`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PersistenceConfig {
    /// Load the snapshot at start and save it at shutdown and every `autosave_interval`.
    pub enabled: bool,
    /// Seconds between saves while running; 0 saves only at shutdown.
    pub autosave_interval: u64,
    /// What to do at start when the snapshot cannot be decoded.
    pub on_corrupt: OnCorrupt,
}

impl Default for PersistenceConfig {
    fn default() -> Self {
        PersistenceConfig {
            enabled: true,
            autosave_interval: 300,
            on_corrupt: OnCorrupt::Fail,
        }
    }
}

/// What start-up does with a snapshot file that cannot be decoded.
///
/// Design: failing is the default because starting empty would silently drop every retained
/// message and session; moving the file aside is an explicit choice and keeps the bytes for
/// inspection.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnCorrupt {
    /// Refuse to start, naming the file and the problem.
    #[default]
    Fail,
    /// Rename the file to `broker.db.corrupt-<unix time>` and start with an empty state.
    MoveAside,
}

/// The `[mqtt.tls]` section: a second listener speaking MQTT over TLS (rustls, ring).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Address of the TLS listener, conventionally port 8883.
    pub listen: SocketAddr,
    /// PEM file with the server certificate chain.
    pub cert_file: PathBuf,
    /// PEM file with the server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM file with the CA certificates that client certificates must chain to.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Refuse clients that present no valid certificate (needs `ca_file`).
    #[serde(default)]
    pub require_client_cert: bool,
}

/// What happens when a session's queue is full.
///
/// Design: the publisher is never slowed down by a slow or offline subscriber, so something has
/// to give at the subscriber's side; like Mosquitto we drop the newest message, count it in
/// `$SYS/broker/publish/messages/dropped` and log a warning (at most once per session per minute).
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum QueueFullPolicy {
    /// Drop the message that does not fit (Mosquitto's behaviour).
    #[default]
    DropNewest,
    /// Drop the oldest queued message to make room for the new one.
    DropOldest,
}

/// Limits and protocol behaviour of the broker (`[mqtt.limits]`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BrokerConfig {
    /// Largest packet accepted from or sent to a client, in bytes (fixed header included).
    pub max_packet_size: u32,
    /// Most simultaneous client connections; further CONNECTs get "server busy" / 3 and are closed.
    pub max_connections: usize,
    /// Most unacknowledged QoS 1/2 messages in flight towards one client (MQTT 5 clients may ask
    /// for fewer with receive maximum). 0 means no limit of ours (65,535, the protocol's).
    pub max_inflight: u16,
    /// Most unacknowledged QoS 2 messages a client may have in flight towards us (the receive
    /// maximum announced in CONNACK). 0 means 65,535.
    pub receive_maximum: u16,
    /// Most messages queued for one session beyond those in flight (offline or slow client).
    /// 0 means unbounded, as in Mosquitto: only for trusted clients, since memory then grows with
    /// every message a stalled subscriber misses.
    pub max_queued_messages: usize,
    /// What to drop when a session's queue is full.
    pub queue_full_policy: QueueFullPolicy,
    /// Whether QoS 0 messages are queued for offline persistent sessions (Mosquitto: no).
    pub queue_qos0_messages: bool,
    /// Highest keep-alive accepted, in seconds: an MQTT 5 client asking for more (or for none)
    /// is told a lower one through server keep-alive; a 3.x client, which cannot be told, is
    /// refused. `u16::MAX` accepts every keep-alive.
    pub max_keep_alive: u16,
    /// Highest topic alias a client may use towards us (MQTT 5).
    pub topic_alias_maximum: u16,
    /// Upper bound, in seconds, on how long a disconnected session is kept. `None` keeps 3.x
    /// persistent sessions forever and honours any MQTT 5 session expiry interval.
    pub max_session_expiry: Option<u32>,
    /// Seconds between `$SYS/broker/...` updates; 0 turns them off.
    pub sys_interval: u64,
    /// Backpressure for the sessions that never drop (hub parsers'): once one holds this many
    /// queued messages, a network client publishing into it is not read from (its socket fills
    /// and it waits, as TCP makes it) until the queue is back to half of this, or for at most
    /// a few seconds at a time. 0 turns it off (those queues then grow without bound).
    pub lossless_queue_high_water: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            max_packet_size: 16 * 1024 * 1024,
            max_connections: 100_000,
            max_inflight: 100,
            receive_maximum: 100,
            max_queued_messages: 1000,
            queue_full_policy: QueueFullPolicy::DropNewest,
            queue_qos0_messages: false,
            max_keep_alive: 65_535,
            topic_alias_maximum: 64,
            max_session_expiry: None,
            sys_interval: 10,
            lossless_queue_high_water: 10_000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_nodelay_is_on_by_default_and_can_be_turned_off() {
        assert!(MqttConfig::default().socket_options().tcp_nodelay);
        let config: MqttConfig = toml::from_str("tcp_nodelay = false\n").unwrap();
        assert!(!config.socket_options().tcp_nodelay);
    }
}
