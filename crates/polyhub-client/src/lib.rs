//! An async MQTT client for tokio, speaking MQTT 3.1 (`MQIsdp`), 3.1.1 and 5.0.
//!
//! A [`Client`] is a cheap, cloneable handle. It sends requests over a bounded channel to one
//! task that owns the connection (the [`EventLoop`]); that task reconnects with exponential
//! backoff, subscribes again when the broker lost the session, resends unacknowledged QoS 1/2
//! publishes, and keeps the connection alive with pings. Requests await the broker's answer:
//! `subscribe` the SUBACK, `publish` the PUBACK or PUBCOMP.
//!
//! ```no_run
//! use polyhub_client::{Client, ClientOptions, Event, QoS};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let options = ClientOptions::new("thermostat", "127.0.0.1", 1883);
//! let (client, mut events) = Client::connect(options).await?;
//! client.subscribe("home/+/temperature", QoS::AtLeastOnce).await?;
//! client.publish("home/kitchen/temperature", QoS::AtLeastOnce, true, "21.5").await?;
//! while let Some(event) = events.recv().await {
//!     if let Event::Message(message) = event {
//!         println!("{} = {:?}", message.topic, message.payload);
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Applications that own their loop create the pair with [`EventLoop::new`] and call
//! [`EventLoop::poll`] themselves instead of spawning it. `docs/client.md` describes the design.
//!
//! # Layout
//! - [`options`]: [`ClientOptions`], the builder for everything set before connecting.
//! - `client`: [`Client`] (the handle), [`Message`] (an outgoing publish), [`PublishAck`] and
//!   [`Published`] (its outcome), [`Events`] (the event stream of a spawned client), [`AckToken`] (manual
//!   acknowledgements, [`ClientOptions::manual_acks`]).
//! - `eventloop`: [`EventLoop`], the only code touching the socket: connecting, backoff,
//!   keep-alive, write coalescing; [`Event`] and [`DisconnectReason`].
//! - `state`: the I/O-free session state machine: packet identifiers, QoS 1/2 flows in both
//!   directions, the send window, the offline queue, subscriptions to renew, topic aliases.
//! - [`tls`]: [`TlsOptions`] (rustls with the ring provider, from PEM files or an sgframework
//!   certificate directory) and the TCP/TLS transport.
//! - [`error`]: one error enum per boundary: [`ClientError`] for requests,
//!   [`ConnectionError`] for connections, [`StateError`] for broker protocol violations,
//!   [`TlsError`] for TLS settings.

mod client;
pub mod error;
mod eventloop;
pub mod options;
mod state;
pub mod tls;

pub use client::{AckToken, Client, Events, Message, PublishAck, Published};
pub use error::{ClientError, ConnectionError, StateError, TlsError};
pub use eventloop::{DisconnectReason, Event, EventLoop};
pub use options::ClientOptions;
pub use tls::TlsOptions;

pub use polyhub_mqtt::{
    LastWill, Properties, ProtocolVersion, Publish, QoS, ReasonCode, RetainHandling,
    SubscribeFilter, SubscriptionOptions,
};
