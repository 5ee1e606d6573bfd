//! The `$SYS/broker/...` publisher: every `sys_interval` seconds, the counters rendered by
//! [`Stats::sys_messages`](crate::stats::Stats::sys_messages) go out as retained QoS 0 messages
//! through normal routing.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use polyhub_mqtt::QoS;

use crate::broker::Shared;
use crate::message::{BROKER_PUBLISHER, Message, MessageProperties};

/// Publish the `$SYS` topics at once, then every `sys_interval` seconds until shutdown.
pub(crate) async fn run(shared: Arc<Shared>) {
    let period = Duration::from_secs(shared.config.sys_interval.max(1));
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => publish(&shared),
            () = shared.shutdown.cancelled() => return,
        }
    }
}

/// Publish the current `$SYS` topics once.
pub(crate) fn publish(shared: &Shared) {
    shared.refresh_gauges();
    let uptime = shared.started.elapsed();
    for (topic, payload) in shared.stats.sys_messages(uptime, env!("CARGO_PKG_VERSION")) {
        shared.publish(Message::new(
            topic,
            Bytes::from(payload),
            QoS::AtMostOnce,
            true,
            BROKER_PUBLISHER,
            MessageProperties::default(),
        ));
    }
}
