//! Implementations of the hub's bus traits (`polyhub_hub::bus`): [`LocalBus`] over the
//! embedded broker's in-process clients (parsers running as tasks of `polyhub run`), and
//! [`MqttBus`] over an MQTT 5 connection made with polyhub-client (parsers in their own
//! process, external brokers).
//!
//! Both give the hub the same delivery contract: QoS 1 messages stay unacknowledged until
//! `BusClient::ack`, and a persistent client's unacknowledged messages come again, marked
//! redelivered and with the same `seq`, to the next client connecting with that id.

mod local;
/// Public in the crate for [`mqtt::MqttBusOptions`] (TLS, host names) beyond [`MqttBus::new`].
pub(crate) mod mqtt;
#[cfg(test)]
mod test_support;

pub(crate) use local::LocalBus;
pub(crate) use mqtt::MqttBus;

use polyhub_hub::bus::BusError;

/// The broker error as the hub sees it: a closed broker is a closed connection; everything
/// else it says no to is a refusal.
fn broker_error(error: polyhub_broker::BrokerError) -> BusError {
    match error {
        polyhub_broker::BrokerError::Closed => BusError::Closed(error.to_string()),
        polyhub_broker::BrokerError::InvalidRequest(detail) => BusError::Refused(detail),
        other => BusError::Other(other.to_string()),
    }
}
