//! [`XmppClientFactory`]: builds an [`XmppBackend`] from a `[polyglot.<name>]` section of
//! `type = "xmpp"`.

use std::sync::Arc;

use async_trait::async_trait;
use polyhub_polyglot::backend::{BackendClient, BackendError};
use polyhub_polyglot::registry::{ClientFactory, FactoryContext};

use crate::client::XmppBackend;
use crate::settings::XmppClientSettings;

/// The `type` that selects this factory.
pub const XMPP_TYPE: &str = "xmpp";

/// Builds XMPP clients. Building checks the settings and starts connecting in the
/// background: an unreachable server does not fail start-up, commands wait queued.
#[derive(Debug, Clone, Copy, Default)]
pub struct XmppClientFactory;

#[async_trait]
impl ClientFactory for XmppClientFactory {
    fn type_name(&self) -> &'static str {
        XMPP_TYPE
    }

    async fn build(
        &self,
        name: &str,
        settings: toml::Table,
        context: FactoryContext,
    ) -> Result<Arc<dyn BackendClient>, BackendError> {
        let settings: XmppClientSettings = toml::Value::Table(settings)
            .try_into()
            .map_err(|error: toml::de::Error| BackendError::Config(error.message().to_owned()))?;
        let options = settings.validate(name).map_err(BackendError::Config)?;
        Ok(Arc::new(XmppBackend::start(
            options,
            context.events,
            context.store,
            context.shutdown,
        )))
    }
}
