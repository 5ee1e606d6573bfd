//! polyhub's MQTT broker: MQTT 3.1, 3.1.1 and 5.0 on one listener, negotiated per connection.
//!
//! # Layout
//! - [`Broker`]: a cheap, cloneable handle on the shared state; `serve(listener, shutdown)` runs
//!   a listener until `shutdown` completes (mini-redis style, so tests inject `127.0.0.1:0` and
//!   their own signal).
//! - [`LocalClient`]: an in-process client (publish, subscribe, receive) for the rest of polyhub;
//!   it joins routing like any session, without a socket.
//! - [`config`]: the `[mqtt]` configuration section and its limits.
//! - [`tls`]: the rustls acceptor for the TLS listener.
//! - [`stats`]: counters and the `$SYS/broker/...` topics.
//! - [`persist`]: the snapshot file (`broker.db`) that keeps retained messages and persistent
//!   sessions across restarts.
//! - `subscriptions` / `retained`: the subscription trie (with `$share` groups) and the retained
//!   message store.
//! - `client` / `connection`: one task per network connection (CONNECT handshake, packet loop)
//!   and its socket with read and write buffers (and the lazy reads of subscribers that only
//!   acknowledge); `session`: per-client-id state (queue,
//!   inflight, QoS 2 ids); `router`: fan-out of a message to matching sessions; `message`: the
//!   shared message type; `alias`: MQTT 5 topic aliases; `local`: in-process clients; `sys`:
//!   the `$SYS` publisher. `docs/broker.md` describes the design.

mod alias;
mod broker;
mod client;
pub mod config;
mod connection;
mod error;
mod local;
mod message;
pub mod persist;
mod retained;
mod router;
mod session;
pub mod stats;
mod subscriptions;
mod sys;
pub mod tls;

pub use broker::{Broker, ClientPresence};
pub use config::{
    BrokerConfig, MqttConfig, OnCorrupt, PersistenceConfig, SocketOptions, TlsConfig,
};
pub use error::BrokerError;
pub use local::{LocalClient, LocalMessage};
pub use message::MessageProperties;
pub use persist::{RestoreSummary, Snapshot};
/// MQTT QoS levels, as [`LocalClient`] takes and reports them.
pub use polyhub_mqtt::QoS;
