//! The `[hub]` configuration section: isolation, channel templates, batching, supervision.

use polyhub_store::Isolation;
use serde::Deserialize;

use crate::channels::ChannelTemplates;
use crate::error::HubError;

/// Settings of the hub manager and its parsers (`[hub]`). `Default` is the embedded default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HubConfig {
    /// Where parsers of hubs without their own `isolation` setting run: `task` (inside the
    /// polyhub process) or `process` (one `polyhub parser --hub ID` child per hub).
    pub isolation: Isolation,
    /// Topic templates of the hub channels (`[hub.channels]`).
    pub channels: ChannelTemplates,
    /// A parser commits a batch once it holds this many messages.
    pub batch_max_messages: usize,
    /// ... or once its oldest message has waited this long, in milliseconds.
    pub batch_max_delay_ms: u64,
    /// First delay before restarting a failed parser, in milliseconds; it doubles with each
    /// consecutive failure.
    pub restart_backoff_initial_ms: u64,
    /// Longest restart delay, in milliseconds. A parser that ran at least this long before
    /// failing starts again from the initial delay.
    pub restart_backoff_max_ms: u64,
    /// How long the store remembers committed message seqs (to recognise redeliveries), in
    /// hours. Must exceed the longest time the broker may hold an unacknowledged message.
    pub seq_retention_hours: u64,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            isolation: Isolation::Task,
            channels: ChannelTemplates::default(),
            batch_max_messages: 1000,
            batch_max_delay_ms: 20,
            restart_backoff_initial_ms: 200,
            restart_backoff_max_ms: 30_000,
            seq_retention_hours: 24,
        }
    }
}

impl HubConfig {
    /// Checks what serde cannot: the channel templates and that the numbers make sense.
    pub fn validate(&self) -> Result<(), HubError> {
        self.channels.validate()?;
        if self.batch_max_messages == 0 {
            return Err(HubError::Config(
                "batch_max_messages must be at least 1".into(),
            ));
        }
        if self.restart_backoff_initial_ms == 0 {
            return Err(HubError::Config(
                "restart_backoff_initial_ms must be at least 1".into(),
            ));
        }
        if self.restart_backoff_max_ms < self.restart_backoff_initial_ms {
            return Err(HubError::Config(
                "restart_backoff_max_ms must not be below restart_backoff_initial_ms".into(),
            ));
        }
        if self.seq_retention_hours == 0 {
            return Err(HubError::Config(
                "seq_retention_hours must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_match_the_documented_values() {
        let config = HubConfig::default();
        config.validate().unwrap();
        assert_eq!(config.isolation, Isolation::Task);
        assert_eq!(config.batch_max_messages, 1000);
        assert_eq!(config.batch_max_delay_ms, 20);
        assert_eq!(config.channels.data, "/{hub}/{device}/data");
    }

    #[test]
    fn zero_batch_size_is_rejected() {
        let config = HubConfig {
            batch_max_messages: 0,
            ..HubConfig::default()
        };
        assert!(matches!(config.validate(), Err(HubError::Config(_))));
    }

    #[test]
    fn backoff_max_below_initial_is_rejected() {
        let config = HubConfig {
            restart_backoff_initial_ms: 500,
            restart_backoff_max_ms: 100,
            ..HubConfig::default()
        };
        assert!(matches!(config.validate(), Err(HubError::Config(_))));
    }

    #[test]
    fn sections_deserialize_with_defaults_and_reject_unknown_keys() {
        let config: HubConfig = serde_json::from_str(
            r#"{"isolation": "process", "channels": {"data": "devices/{device}/up"}}"#,
        )
        .unwrap();
        assert_eq!(config.isolation, Isolation::Process);
        assert_eq!(config.channels.data, "devices/{device}/up");
        assert_eq!(config.channels.command, ChannelTemplates::default().command);
        assert_eq!(config.batch_max_messages, 1000);
        config.validate().unwrap();
        assert!(serde_json::from_str::<HubConfig>(r#"{"batch_size": 5}"#).is_err());
        assert!(serde_json::from_str::<HubConfig>(r#"{"channels": {"dta": "x"}}"#).is_err());
        let bad: HubConfig =
            serde_json::from_str(r#"{"channels": {"data": "/{hub}/data"}}"#).unwrap();
        assert!(matches!(bad.validate(), Err(HubError::Config(_))));
    }
}
