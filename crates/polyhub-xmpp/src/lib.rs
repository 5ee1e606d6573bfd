//! polyhub's XMPP backend client for Polyglot.
//!
//! The hub is on an XMPP server either as its own account (client-to-server) or as a
//! component with a domain of its own (XEP-0114), and reaches every device of its protocol at
//! the device's JID (`metadata.jid`, else `<device id>@<device_domain>`):
//! - [`client`]: [`XmppBackend`], the [`polyhub_polyglot::BackendClient`]: commands as chat
//!   messages with a XEP-0184 receipt request (stanza id = command id); receipts, replies,
//!   telemetry and device presence back as [`polyhub_polyglot::BackendEvent`]s. The same code
//!   in both modes; only the `link` (connection) differs, and the `component` module is the
//!   component's connection.
//! - [`wire`]: the message bodies and device JIDs.
//! - [`settings`]: the `[polyglot.<name>]` settings ([`XmppClientSettings`]).
//! - [`factory`]: [`XmppClientFactory`] (type `xmpp`) for the client registry.
//! - `provision`: device accounts by XEP-0077 in-band registration; `admin`: their removal by
//!   the server's XEP-0133 delete-user command.

mod admin;
pub mod client;
mod component;
pub mod factory;
mod link;
mod provision;
pub mod settings;
pub mod wire;

pub use client::XmppBackend;
pub use factory::{XMPP_TYPE, XmppClientFactory};
pub use settings::{ClientEndpoint, Connection, Mode, Transport, XmppClientSettings, XmppOptions};
