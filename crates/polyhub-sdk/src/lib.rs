//! Resources and apps for polyhub, wire-compatible with Python's `sgframework`.
//!
//! A [`Resource`] owns signals: it receives commands on `command/<name>/<signal>`, echoes them
//! and sends data on `data/<name>/<signal>`, announces `commandavailable/...` and
//! `dataavailable/...` (retained `True`) and its presence `resourceavailable/<name>/presence`
//! (retained `True`, with `False` as last will). An [`App`] sends commands and listens to data
//! and availability. Both speak MQTT 3.1 with QoS 1 by default, like sgframework.
//!
//! ```no_run
//! use polyhub_sdk::{CommandOptions, MessageType, Resource, Framework};
//!
//! # async fn demo() -> Result<(), polyhub_sdk::SdkError> {
//! let sign = Resource::new("taxisign", "127.0.0.1", 1883);
//! sign.register_incoming_command(
//!     "state",
//!     CommandOptions::new().default_value("False"),
//!     |_sign: &Framework, _kind: MessageType, _service: &str, _signal: &str, payload: &str| {
//!         println!("turning the sign {payload}");
//!     },
//! )?;
//! let task = sign.start()?;
//! // ... later
//! sign.stop().await?;
//! task.join().await;
//! # Ok(()) }
//! ```
//!
//! Callbacks are `Fn(&Framework, MessageType, &str service, &str signal, &str payload) -> R`
//! where `R` is `()`, `Option<String>`, `String`, `&str` or a `Result` of those (see
//! [`CallbackOutput`]); a returned value replaces the payload in the echo, an `Err` or a panic
//! is logged and suppresses the echo. Callbacks run on the network loop: keep them short.
//!
//! Layout: [`topics`] (the conventions, pure), `framework` ([`Framework`], [`Resource`],
//! [`App`], [`Runner`], [`TaskHandle`]), [`service_manager`], [`error`]. `docs/topics.md`
//! describes the conventions with a worked example.

pub mod error;
mod framework;
pub mod service_manager;
pub mod topics;

pub use error::SdkError;
pub use framework::{
    App, CallbackOutput, CommandOptions, DEFAULT_KEEP_ALIVE, DEFAULT_QOS, Framework, Resource,
    Runner, TaskHandle,
};
pub use service_manager::{ServiceManager, ServiceManagerError};
pub use topics::MessageType;

pub use polyhub_client::{ClientOptions, ProtocolVersion, QoS};
