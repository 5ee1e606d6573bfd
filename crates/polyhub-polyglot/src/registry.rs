//! Client factories keyed by type name: the Rust counterpart of the seed's reflection.
//!
//! Each `[polyglot.<name>]` section names a factory by its `type`; the binary registers the
//! factories it links ([`ClientRegistry::with`]) and [`crate::Polyglot::build`] asks the right
//! one to build each configured client. Nothing else ever names a concrete client.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use polyhub_hub::ChannelTemplates;
use polyhub_hub::bus::BusConnector;
use polyhub_store::Store;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::backend::{BackendClient, BackendError, BackendEvent};

/// What a factory may hand to the client it builds.
#[derive(Debug, Clone)]
pub struct FactoryContext {
    /// Where the client reports what it hears ([`BackendEvent`]s); the command service reads it.
    pub events: mpsc::Sender<BackendEvent>,
    pub store: Arc<dyn Store>,
    /// Cancelled when polyhub shuts down: clients stop their tasks.
    pub shutdown: CancellationToken,
    /// The MQTT broker (embedded through its in-process client, or external); `None` when
    /// polyhub runs without one.
    pub bus: Option<Arc<dyn BusConnector>>,
    /// The hub channel templates (where hub-style devices receive commands and reply).
    pub channels: ChannelTemplates,
}

/// Builds clients of one type from their configuration section.
#[async_trait]
pub trait ClientFactory: Send + Sync + std::fmt::Debug + 'static {
    /// The `type` that selects this factory in a `[polyglot.<name>]` section.
    fn type_name(&self) -> &'static str;
    /// Builds the client of section `name` (also the protocol its devices select it with)
    /// from the section's own settings (without `type`). Bad settings are
    /// [`BackendError::Config`]; the message need not repeat the section name.
    async fn build(
        &self,
        name: &str,
        settings: toml::Table,
        context: FactoryContext,
    ) -> Result<Arc<dyn BackendClient>, BackendError>;
}

/// The factories polyhub knows, by type name.
#[derive(Debug, Default)]
pub struct ClientRegistry {
    factories: BTreeMap<&'static str, Box<dyn ClientFactory>>,
}

impl ClientRegistry {
    /// An empty registry.
    pub fn new() -> ClientRegistry {
        ClientRegistry::default()
    }

    /// Adds a factory; one registered later under the same type name replaces it.
    pub fn with(mut self, factory: Box<dyn ClientFactory>) -> ClientRegistry {
        self.factories.insert(factory.type_name(), factory);
        self
    }

    /// The factory of `type_name`, if registered.
    pub fn factory(&self, type_name: &str) -> Option<&dyn ClientFactory> {
        self.factories
            .get(type_name)
            .map(|factory| factory.as_ref())
    }

    /// Registered type names, sorted.
    pub fn type_names(&self) -> Vec<&'static str> {
        self.factories.keys().copied().collect()
    }
}
