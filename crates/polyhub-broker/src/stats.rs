//! Broker counters, and their rendering as the `$SYS/broker/...` topics Mosquitto publishes.
//!
//! The load averages (`$SYS/broker/load/.../1min` and so on) are computed the way Mosquitto does:
//! at each `$SYS` update the rate since the previous update, in events per minute, is folded into
//! exponentially decaying averages over 1, 5 and 15 minutes. Their state changes only when
//! [`Stats::sys_messages`] runs, so the hot path pays nothing for them. Unlike Mosquitto, whose
//! first update reports 0, the first update already averages over the time since start.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;

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
    /// Connections read lazily now: their acknowledgements are taken in by the loop turns
    /// that deliveries bring, not by a wake-up each (see `client.rs`). Not in `$SYS`.
    pub clients_read_lazily: AtomicU64,
    /// Load averages, advanced by [`Stats::sys_messages`].
    load: Mutex<LoadAverages>,
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
    ///
    /// `uptime` is the time since the broker started; the load averages advance by the time
    /// elapsed since the previous call.
    pub fn sys_messages(&self, uptime: Duration, version: &str) -> Vec<(String, String)> {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let connected = read(&self.clients_connected);
        let disconnected = read(&self.clients_disconnected);
        let stored = read(&self.messages_stored);
        let counters: [(&str, String); 19] = [
            ("version", format!("polyhub {version}")),
            ("uptime", format!("{} seconds", uptime.as_secs())),
            ("clients/connected", connected.to_string()),
            // Mosquitto keeps "active" and "inactive" as deprecated aliases.
            ("clients/active", connected.to_string()),
            ("clients/disconnected", disconnected.to_string()),
            ("clients/inactive", disconnected.to_string()),
            (
                "clients/maximum",
                read(&self.clients_maximum).max(connected).to_string(),
            ),
            (
                "clients/total",
                connected.saturating_add(disconnected).to_string(),
            ),
            (
                "messages/received",
                read(&self.messages_received).to_string(),
            ),
            ("messages/sent", read(&self.messages_sent).to_string()),
            ("messages/stored", stored.to_string()),
            ("store/messages/count", stored.to_string()),
            (
                "publish/messages/received",
                read(&self.publish_received).to_string(),
            ),
            (
                "publish/messages/sent",
                read(&self.publish_sent).to_string(),
            ),
            (
                "publish/messages/dropped",
                read(&self.publish_dropped).to_string(),
            ),
            ("bytes/received", read(&self.bytes_received).to_string()),
            ("bytes/sent", read(&self.bytes_sent).to_string()),
            (
                "retained messages/count",
                read(&self.retained_messages).to_string(),
            ),
            ("subscriptions/count", read(&self.subscriptions).to_string()),
        ];

        let loads = {
            let current = LOAD_METRICS.map(|(_, counter)| read(counter(self)));
            let mut load = self.load.lock();
            load.advance(uptime, current);
            load.averages
        };

        let mut messages = Vec::with_capacity(counters.len() + LOAD_METRICS.len() * 3);
        messages.extend(
            counters
                .into_iter()
                .map(|(name, value)| (format!("$SYS/broker/{name}"), value)),
        );
        for ((name, _), averages) in LOAD_METRICS.iter().zip(loads) {
            for (window, average) in LOAD_WINDOWS.iter().zip(averages) {
                messages.push((
                    format!("$SYS/broker/load/{name}/{}min", window / 60),
                    format!("{average:.2}"),
                ));
            }
        }
        messages
    }
}

/// Reads one counter of [`Stats`].
type CounterOf = fn(&Stats) -> &AtomicU64;

/// The counters with a load average, under Mosquitto's names (`$SYS/broker/load/<name>/1min`).
/// Mosquitto also has `sockets`, which counts accepted sockets; we count only connections.
const LOAD_METRICS: [(&str, CounterOf); 8] = [
    ("messages/received", |stats| &stats.messages_received),
    ("messages/sent", |stats| &stats.messages_sent),
    ("publish/dropped", |stats| &stats.publish_dropped),
    ("publish/received", |stats| &stats.publish_received),
    ("publish/sent", |stats| &stats.publish_sent),
    ("bytes/received", |stats| &stats.bytes_received),
    ("bytes/sent", |stats| &stats.bytes_sent),
    ("connections", |stats| &stats.connections_total),
];

/// Averaging windows of the load averages, in seconds.
const LOAD_WINDOWS: [u64; 3] = [60, 5 * 60, 15 * 60];

/// Exponentially decaying averages of the per-minute rate of each of [`LOAD_METRICS`].
#[derive(Debug, Default)]
struct LoadAverages {
    /// Uptime at the previous sample; the counters were all 0 at start.
    sampled_at: Duration,
    /// Counter values at the previous sample.
    previous: [u64; LOAD_METRICS.len()],
    /// Per metric, per window of [`LOAD_WINDOWS`]: events per minute.
    averages: [[f64; LOAD_WINDOWS.len()]; LOAD_METRICS.len()],
}

impl LoadAverages {
    fn advance(&mut self, now: Duration, current: [u64; LOAD_METRICS.len()]) {
        let elapsed = now.saturating_sub(self.sampled_at).as_secs_f64();
        // Two samples at the same instant carry no rate.
        if elapsed <= 0.0 {
            return;
        }
        for ((value, previous), averages) in
            current.iter().zip(&self.previous).zip(&mut self.averages)
        {
            // A gauge-like counter going down (it should not) counts as no events.
            let per_minute = value.saturating_sub(*previous) as f64 * 60.0 / elapsed;
            for (window, average) in LOAD_WINDOWS.iter().zip(averages.iter_mut()) {
                let decay = (-elapsed / *window as f64).exp();
                *average = per_minute + decay * (*average - per_minute);
            }
        }
        self.previous = current;
        self.sampled_at = now;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn sys_map(stats: &Stats, uptime_secs: u64) -> BTreeMap<String, String> {
        let messages = stats.sys_messages(Duration::from_secs(uptime_secs), "1.2.3");
        let count = messages.len();
        let map: BTreeMap<String, String> = messages.into_iter().collect();
        assert_eq!(map.len(), count, "topic names are unique");
        map
    }

    fn value<'a>(map: &'a BTreeMap<String, String>, name: &str) -> &'a str {
        map.get(&format!("$SYS/broker/{name}"))
            .unwrap_or_else(|| panic!("missing $SYS/broker/{name}"))
    }

    #[test]
    fn counters_are_published_under_mosquitto_names() {
        let stats = Stats::default();
        Stats::add(&stats.clients_connected, 7);
        Stats::add(&stats.clients_maximum, 9);
        Stats::add(&stats.clients_disconnected, 3);
        Stats::add(&stats.connections_total, 40);
        Stats::add(&stats.messages_received, 101);
        Stats::add(&stats.messages_sent, 102);
        Stats::add(&stats.publish_received, 51);
        Stats::add(&stats.publish_sent, 52);
        Stats::add(&stats.publish_dropped, 5);
        Stats::add(&stats.bytes_received, 10_001);
        Stats::add(&stats.bytes_sent, 10_002);
        Stats::add(&stats.retained_messages, 12);
        Stats::add(&stats.subscriptions, 13);
        Stats::add(&stats.messages_stored, 15);
        Stats::sub(&stats.messages_stored, 1);

        let map = sys_map(&stats, 42);
        let expected = [
            ("version", "polyhub 1.2.3"),
            ("uptime", "42 seconds"),
            ("clients/connected", "7"),
            ("clients/active", "7"),
            ("clients/disconnected", "3"),
            ("clients/inactive", "3"),
            ("clients/maximum", "9"),
            ("clients/total", "10"),
            ("messages/received", "101"),
            ("messages/sent", "102"),
            ("messages/stored", "14"),
            ("store/messages/count", "14"),
            ("publish/messages/received", "51"),
            ("publish/messages/sent", "52"),
            ("publish/messages/dropped", "5"),
            ("bytes/received", "10001"),
            ("bytes/sent", "10002"),
            ("retained messages/count", "12"),
            ("subscriptions/count", "13"),
        ];
        for (name, expected) in expected {
            assert_eq!(value(&map, name), expected, "{name}");
        }
        let loads = map.keys().filter(|name| name.contains("/load/")).count();
        assert_eq!(map.len(), expected.len() + loads);
        assert!(map.keys().all(|name| name.starts_with("$SYS/broker/")));
    }

    #[test]
    fn maximum_is_never_below_the_current_count() {
        let stats = Stats::default();
        Stats::add(&stats.clients_connected, 4);
        assert_eq!(value(&sys_map(&stats, 1), "clients/maximum"), "4");
    }

    #[test]
    fn load_averages_have_mosquitto_names() {
        let map = sys_map(&Stats::default(), 10);
        for metric in [
            "messages/received",
            "messages/sent",
            "publish/dropped",
            "publish/received",
            "publish/sent",
            "bytes/received",
            "bytes/sent",
            "connections",
        ] {
            for window in ["1min", "5min", "15min"] {
                assert_eq!(value(&map, &format!("load/{metric}/{window}")), "0.00");
            }
        }
    }

    #[test]
    fn load_averages_decay_towards_the_current_rate() {
        let stats = Stats::default();
        // 600 messages in the first minute: a rate of 600 per minute.
        Stats::add(&stats.messages_received, 600);
        let map = sys_map(&stats, 60);
        // 600 × (1 − e^(−60/window))
        assert_eq!(value(&map, "load/messages/received/1min"), "379.27");
        assert_eq!(value(&map, "load/messages/received/5min"), "108.76");
        assert_eq!(value(&map, "load/messages/received/15min"), "38.70");
        assert_eq!(value(&map, "load/messages/sent/1min"), "0.00");

        // Asking again at the same instant changes nothing.
        let map = sys_map(&stats, 60);
        assert_eq!(value(&map, "load/messages/received/1min"), "379.27");

        // A silent minute: 379.27 × e^(−1).
        let map = sys_map(&stats, 120);
        assert_eq!(value(&map, "load/messages/received/1min"), "139.53");

        // A steady 10 per second for half an hour: the 1-minute average settles on 600.
        for step in 1..=180 {
            Stats::add(&stats.messages_received, 100);
            let map = sys_map(&stats, 120 + step * 10);
            if step == 180 {
                assert_eq!(value(&map, "load/messages/received/1min"), "600.00");
                let fifteen: f64 = value(&map, "load/messages/received/15min").parse().unwrap();
                assert!((500.0..600.0).contains(&fifteen), "{fifteen}");
            }
        }
    }
}
