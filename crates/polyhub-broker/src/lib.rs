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
//! - `subscriptions` / `retained`: the subscription trie (with `$share` groups) and the retained
//!   message store.

mod broker;
pub mod config;
mod error;
mod retained;
pub mod stats;
mod subscriptions;
pub mod tls;

pub use broker::{Broker, LocalClient, LocalMessage};
pub use config::{BrokerConfig, MqttConfig, TlsConfig};
pub use error::BrokerError;
