//! Placeholder: the broker's public handle with its final signatures.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use polyhub_mqtt::QoS;
use tokio::net::TcpListener;

use crate::config::BrokerConfig;
use crate::error::BrokerError;
use crate::stats::Stats;

/// Handle on a running broker; clones share the same state.
#[derive(Debug, Clone)]
pub struct Broker {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: BrokerConfig,
    stats: Stats,
}

impl Broker {
    /// A broker with the given limits and no listeners yet.
    pub fn new(config: BrokerConfig) -> Broker {
        Broker {
            shared: Arc::new(Shared {
                config,
                stats: Stats::default(),
            }),
        }
    }

    /// Accept MQTT connections on `listener` until `shutdown` completes.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), BrokerError> {
        let _ = (listener, &self.shared.config);
        shutdown.await;
        Ok(())
    }

    /// Accept MQTT-over-TLS connections on `listener` until `shutdown` completes. The TLS
    /// handshake runs in each connection's own task, never in the accept loop.
    pub async fn serve_tls(
        &self,
        listener: TcpListener,
        acceptor: tokio_rustls::TlsAcceptor,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), BrokerError> {
        let _ = (listener, acceptor);
        shutdown.await;
        Ok(())
    }

    /// Disconnect every client (MQTT 5 clients get DISCONNECT "server shutting down") and wait
    /// until their tasks have ended.
    pub async fn shutdown(&self) {}

    /// Counters behind `$SYS/broker/...`.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// An in-process client with the given client id.
    pub fn local_client(&self, client_id: &str) -> Result<LocalClient, BrokerError> {
        let _ = client_id;
        Err(BrokerError::Closed)
    }
}

/// An in-process MQTT client: publishes and subscribes through the broker's routing without a
/// socket. Dropping it ends its session.
#[derive(Debug)]
pub struct LocalClient {}

/// A message delivered to a [`LocalClient`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalMessage {
    /// Topic it was published on.
    pub topic: String,
    /// Payload.
    pub payload: Bytes,
    /// Delivery QoS.
    pub qos: QoS,
    /// Whether it came from the retained store.
    pub retain: bool,
}

impl LocalClient {
    /// Publish a message.
    pub async fn publish(
        &self,
        topic: &str,
        payload: impl Into<Bytes>,
        qos: QoS,
        retain: bool,
    ) -> Result<(), BrokerError> {
        let _ = (topic, payload.into(), qos, retain);
        Err(BrokerError::Closed)
    }

    /// Subscribe to a topic filter.
    pub async fn subscribe(&self, filter: &str, qos: QoS) -> Result<(), BrokerError> {
        let _ = (filter, qos);
        Err(BrokerError::Closed)
    }

    /// Remove a subscription.
    pub async fn unsubscribe(&self, filter: &str) -> Result<(), BrokerError> {
        let _ = filter;
        Err(BrokerError::Closed)
    }

    /// The next delivered message; `None` once the broker has shut down.
    pub async fn recv(&mut self) -> Option<LocalMessage> {
        None
    }
}
