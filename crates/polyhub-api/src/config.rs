//! The `[http]` section of polyhub's configuration.

use std::net::SocketAddr;

use serde::Deserialize;

/// Default address of the REST API: loopback only, so nothing is exposed without a decision.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// Default largest request body accepted (1 MiB); larger bodies get 413.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;

/// Settings of the REST API (`[http]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address the API listens on (`polyhub run --http-listen` overrides it).
    pub listen: SocketAddr,
    /// Largest request body, in bytes; larger requests are refused with 413.
    pub max_body_bytes: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_matches_documented_values() {
        let config = ApiConfig::default();
        assert_eq!(config.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(config.max_body_bytes, 1_048_576);
    }

    #[test]
    fn empty_section_is_the_default_and_unknown_keys_are_refused() {
        let parsed: ApiConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(parsed, ApiConfig::default());
        let parsed: ApiConfig =
            serde_json::from_str(r#"{"listen":"127.0.0.1:9000","max_body_bytes":10}"#).unwrap();
        assert_eq!(parsed.listen.port(), 9000);
        assert_eq!(parsed.max_body_bytes, 10);
        assert!(serde_json::from_str::<ApiConfig>(r#"{"listn":"127.0.0.1:1"}"#).is_err());
    }
}
