//! Polyglot: commands to any device, over whichever protocol it speaks.
//!
//! - [`backend`]: the backend broker client interface ([`backend::BackendClient`]) and the
//!   protocol-neutral events clients report.
//! - [`registry`]: client factories keyed by type name ([`ClientRegistry`]).
//! - [`config`]: the `[polyglot.<name>]` sections ([`PolyglotConfig`]) and `[commands]`
//!   ([`CommandConfig`]).
//! - [`polyglot`]: the built clients, looked up by protocol ([`Polyglot`]).
//! - [`service`]: the command lifecycle ([`CommandService`]): stored first, sent in order,
//!   expired, recovered after a restart, matched with the device's answer.
//! - [`backends`]: the clients built in (MQTT, over polyhub-hub's bus).
//! - [`id`]: command ids (`cmd-` + ULID).

pub mod backend;
pub mod backends;
pub mod config;
pub mod id;
pub mod polyglot;
pub mod registry;
pub mod service;

pub use backend::{BackendClient, BackendError, BackendEvent, Credentials, SendOutcome};
pub use config::{ClientSection, CommandConfig, PolyglotConfig};
pub use polyglot::{Polyglot, PolyglotError};
pub use registry::{ClientFactory, ClientRegistry, FactoryContext};
pub use service::{CommandError, CommandRequest, CommandService, validate_command_name};
