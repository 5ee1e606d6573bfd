//! Helpers shared by the tests of both bus adapters.

use std::time::Duration;

use bytes::Bytes;
use polyhub_hub::bus::{BusClient, BusMessage, Outgoing};

/// How long a test waits for a message that must come.
pub(super) const WAIT: Duration = Duration::from_secs(5);

pub(super) fn filters(filters: &[&str]) -> Vec<String> {
    filters.iter().map(|filter| (*filter).to_owned()).collect()
}

pub(super) async fn next(client: &mut Box<dyn BusClient>) -> BusMessage {
    tokio::time::timeout(WAIT, client.recv())
        .await
        .expect("a message within 5 s")
        .expect("recv works")
        .expect("not shut down")
}

/// Nothing reaches `client` within `quiet` (recv does not complete).
pub(super) async fn nothing_within(client: &mut Box<dyn BusClient>, quiet: Duration) {
    let waited = tokio::time::timeout(quiet, client.recv()).await;
    assert!(waited.is_err(), "unexpected {waited:?}");
}

pub(super) fn outgoing(topic: &str, payload: &'static str, qos: u8) -> Outgoing {
    Outgoing {
        topic: topic.to_owned(),
        payload: Bytes::from_static(payload.as_bytes()),
        qos,
        retain: false,
        correlation_data: None,
        response_topic: None,
    }
}
