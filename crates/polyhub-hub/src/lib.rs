//! The hub: what turns the broker into an IoT platform.
//!
//! Groups own hubs, hubs own devices, each device has its own MQTT channel, and each running hub
//! is ingested by its own parser that the [`manager`] starts, stops and supervises.
//!
//! # Layout
//!
//! Pure parts (no I/O, property-tested):
//! - [`channels`]: topic templates (`/{hub}/{device}/data`, ...): validation, rendering, and
//!   parsing a received topic back to its hub and device (hub style and sgframework style).
//! - [`control`]: the JSON schema of the control channels (`register_cmd`, `hub_manager/cmd`):
//!   parsing into typed requests or a rejection, and the reply documents.
//! - [`decode`]: payload bytes to `(signal, value)` rows or a dead-letter reason, per decoder.
//! - [`config`]: the `[hub]` configuration section.
//!
//! Runtime:
//! - [`bus`]: the broker as the hub sees it (traits; the binary supplies implementations).
//! - `parser` (private): one hub's ingest loop: subscribe the registered devices' channels,
//!   decode, batch, commit, then acknowledge.
//! - `presence` (private): the presence channel of hub-style devices, as the parser reads it.
//! - `supervisor` (private): runs one hub's parser as a task or a child process, restarts it
//!   with backoff when it fails, and publishes its [`ParserStatus`](polyhub_store::ParserStatus).
//! - [`manager`]: [`HubManager`], the handle the binary and the API use; it owns the
//!   supervisors, serves the control channels and records presence.
//! - [`child`]: the body of `polyhub parser --hub ID` (process isolation), speaking JSON lines
//!   with its parent.
//! - [`error`]: the one error type, [`HubError`].

pub mod bus;
pub mod channels;
pub mod child;
pub mod config;
pub mod control;
pub mod decode;
pub mod error;
pub mod manager;
mod parser;
mod presence;
mod supervisor;

pub use channels::ChannelTemplates;
pub use child::run_child_parser;
pub use config::HubConfig;
pub use error::HubError;
pub use manager::{HubManager, ManagerDeps, ProcessParserCommand};
pub use parser::parser_client_id;
