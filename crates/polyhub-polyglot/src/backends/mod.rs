//! Protocol clients built into this crate. Each comes with its [`crate::ClientFactory`];
//! other crates (XMPP) bring their own.

pub mod mqtt;
