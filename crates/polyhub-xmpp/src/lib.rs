//! polyhub's XMPP backend client for Polyglot.
//!
//! The hub logs in to an XMPP server with its own account and reaches every device of its
//! protocol at the device's JID (`metadata.jid`, else `<device id>@<device_domain>`):
//! - [`client`]: [`XmppBackend`], the [`polyhub_polyglot::BackendClient`]: commands as chat
//!   messages with a XEP-0184 receipt request (stanza id = command id); receipts, replies,
//!   telemetry and device presence back as [`polyhub_polyglot::BackendEvent`]s.
//! - [`wire`]: the message bodies and device JIDs.
//! - [`settings`]: the `[polyglot.<name>]` settings ([`XmppClientSettings`]).
//! - [`factory`]: [`XmppClientFactory`] (type `xmpp`) for the client registry.
//! - `provision`: device accounts by XEP-0077 in-band registration; `admin`: their removal by
//!   the server's XEP-0133 delete-user command.

mod admin;
pub mod client;
pub mod factory;
mod provision;
pub mod settings;
pub mod wire;

pub use client::XmppBackend;
pub use factory::{XMPP_TYPE, XmppClientFactory};
pub use settings::{Transport, XmppClientSettings, XmppOptions};
