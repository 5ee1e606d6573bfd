//! The set of configured protocol clients, looked up by protocol.
//!
//! [`Polyglot::build`] turns the `[polyglot.*]` sections into clients through the
//! [`ClientRegistry`]; afterwards the command service asks it for the client of a device's
//! `protocol` and never names a concrete one.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::backend::{BackendClient, BackendError};
use crate::config::PolyglotConfig;
use crate::registry::{ClientRegistry, FactoryContext};

/// Why the clients could not be built. Each message is one line naming the section.
#[derive(Debug, thiserror::Error)]
pub enum PolyglotError {
    /// The section itself is malformed (bad name, `type` not a string, ...).
    #[error("[polyglot.{section}]: {reason}")]
    Section { section: String, reason: String },
    /// No factory is registered for the section's type.
    #[error("[polyglot.{section}]: unknown type {type_name:?} (known types: {known})")]
    UnknownType {
        section: String,
        type_name: String,
        /// The registered type names, comma-separated.
        known: String,
    },
    /// The factory refused the settings or could not build the client.
    #[error("[polyglot.{section}]: {source}")]
    Client {
        section: String,
        #[source]
        source: BackendError,
    },
}

/// The built clients, keyed by protocol (section name).
#[derive(Debug, Clone, Default)]
pub struct Polyglot {
    clients: BTreeMap<String, Arc<dyn BackendClient>>,
}

impl Polyglot {
    /// Builds every enabled section's client. Every section's type is checked before any
    /// client is built, so a typo fails start-up before connections are opened.
    pub async fn build(
        config: &PolyglotConfig,
        registry: &ClientRegistry,
        context: FactoryContext,
    ) -> Result<Polyglot, PolyglotError> {
        let sections = config.clients()?;
        for section in &sections {
            if registry.factory(&section.type_name).is_none() {
                let known = registry.type_names();
                return Err(PolyglotError::UnknownType {
                    section: section.name.clone(),
                    type_name: section.type_name.clone(),
                    known: if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    },
                });
            }
        }
        let mut clients = BTreeMap::new();
        for section in sections {
            let Some(factory) = registry.factory(&section.type_name) else {
                continue; // checked above
            };
            let client = factory
                .build(&section.name, section.settings, context.clone())
                .await
                .map_err(|source| PolyglotError::Client {
                    section: section.name.clone(),
                    source,
                })?;
            tracing::info!(protocol = %section.name, r#type = %section.type_name, "polyglot client ready");
            clients.insert(section.name, client);
        }
        Ok(Polyglot { clients })
    }

    /// A polyglot over clients built elsewhere (tests, custom wiring), keyed by protocol.
    pub fn from_clients(
        clients: impl IntoIterator<Item = (String, Arc<dyn BackendClient>)>,
    ) -> Polyglot {
        Polyglot {
            clients: clients.into_iter().collect(),
        }
    }

    /// The client of a protocol.
    pub fn client(&self, protocol: &str) -> Option<Arc<dyn BackendClient>> {
        self.clients.get(protocol).cloned()
    }

    /// The configured protocols, sorted.
    pub fn protocols(&self) -> Vec<&str> {
        self.clients.keys().map(String::as_str).collect()
    }
}
