//! polyhub's configuration: the file's top level, and how file, environment and flags combine.
//!
//! Each component owns the struct of its own section (the broker's `[mqtt]` is
//! [`polyhub_broker::MqttConfig`]); this module only composes them. Settings are layered, later
//! layers winning: built-in defaults, then the TOML file, then `POLYHUB_*` environment
//! variables, then command-line flags. Environment and flags are both expressed as
//! [`Overrides`], so precedence is decided in one place ([`Config::with_overrides`]) and can be
//! tested without touching the process environment.

use std::ffi::OsString;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use polyhub_broker::{MqttConfig, TlsConfig};
use serde::Deserialize;

/// The commented default configuration, printed by `polyhub config default`. A test checks that
/// it parses to exactly [`Config::default()`].
pub(crate) const DEFAULT_CONFIG_TOML: &str = include_str!("default-config.toml");

/// Address of the TLS listener when TLS is enabled without saying where to listen.
pub(crate) const DEFAULT_MQTTS_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8883);

/// Names of the environment variables polyhub reads.
pub(crate) mod env {
    /// Path of the configuration file.
    pub(crate) const CONFIG: &str = "POLYHUB_CONFIG";
    /// `data_dir`.
    pub(crate) const DATA_DIR: &str = "POLYHUB_DATA_DIR";
    /// `[log] level`.
    pub(crate) const LOG: &str = "POLYHUB_LOG";
    /// `[mqtt] listen`.
    pub(crate) const MQTT_LISTEN: &str = "POLYHUB_MQTT_LISTEN";
    /// `[mqtt.tls] listen`.
    pub(crate) const MQTTS_LISTEN: &str = "POLYHUB_MQTTS_LISTEN";
    /// `[mqtt.tls] cert_file`.
    pub(crate) const TLS_CERT: &str = "POLYHUB_TLS_CERT";
    /// `[mqtt.tls] key_file`.
    pub(crate) const TLS_KEY: &str = "POLYHUB_TLS_KEY";
    /// `[mqtt.tls] ca_file`.
    pub(crate) const TLS_CA: &str = "POLYHUB_TLS_CA";
    /// `[mqtt.tls] require_client_cert`.
    pub(crate) const TLS_REQUIRE_CLIENT_CERT: &str = "POLYHUB_TLS_REQUIRE_CLIENT_CERT";
    /// `[http] listen`.
    pub(crate) const HTTP_LISTEN: &str = "POLYHUB_HTTP_LISTEN";
    /// `[external_broker] url`.
    pub(crate) const EXTERNAL_BROKER: &str = "POLYHUB_EXTERNAL_BROKER";
    /// `[external_broker] username`.
    pub(crate) const EXTERNAL_BROKER_USERNAME: &str = "POLYHUB_EXTERNAL_BROKER_USERNAME";
    /// `[external_broker] password`.
    pub(crate) const EXTERNAL_BROKER_PASSWORD: &str = "POLYHUB_EXTERNAL_BROKER_PASSWORD";

    /// Every variable, for documentation checks.
    #[cfg(test)]
    pub(crate) const ALL: [&str; 13] = [
        CONFIG,
        DATA_DIR,
        LOG,
        MQTT_LISTEN,
        MQTTS_LISTEN,
        TLS_CERT,
        TLS_KEY,
        TLS_CA,
        TLS_REQUIRE_CLIENT_CERT,
        HTTP_LISTEN,
        EXTERNAL_BROKER,
        EXTERNAL_BROKER_USERNAME,
        EXTERNAL_BROKER_PASSWORD,
    ];
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Config {
    /// Directory for polyhub's persistent data, created at start if missing. A relative path
    /// is relative to the working directory.
    pub(crate) data_dir: PathBuf,
    /// The `[log]` section.
    pub(crate) log: LogConfig,
    /// The `[mqtt]` section: the broker's listeners and limits.
    pub(crate) mqtt: MqttConfig,
    /// The `[http]` section: the REST API.
    pub(crate) http: polyhub_api::ApiConfig,
    /// The `[hub]` section: hub manager, parsers and ingest.
    pub(crate) hub: polyhub_hub::HubConfig,
    /// The `[storage]` section: where the registry and telemetry live.
    pub(crate) storage: StorageConfig,
    /// The `[polyglot.<name>]` sections: one backend client per protocol.
    pub(crate) polyglot: polyhub_polyglot::PolyglotConfig,
    /// The `[commands]` section: the command lifecycle.
    pub(crate) commands: polyhub_polyglot::CommandConfig,
    /// The `[external_broker]` section: when present, the hub and the MQTT command client
    /// use this broker instead of the embedded one, which then serves no listener.
    pub(crate) external_broker: Option<ExternalBrokerConfig>,
}

/// The `[storage]` section.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct StorageConfig {
    /// `[storage.sqlite]`: the embedded database in the data directory.
    pub(crate) sqlite: polyhub_store::SqliteConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("polyhub-data"),
            log: LogConfig::default(),
            mqtt: MqttConfig::default(),
            http: polyhub_api::ApiConfig::default(),
            hub: polyhub_hub::HubConfig::default(),
            storage: StorageConfig::default(),
            polyglot: polyhub_polyglot::PolyglotConfig::default(),
            commands: polyhub_polyglot::CommandConfig::default(),
            external_broker: None,
        }
    }
}

/// The `[external_broker]` section: an MQTT broker run by someone else (Mosquitto, EMQX)
/// that devices connect to; polyhub's parsers, hub manager and MQTT command client connect
/// to it as MQTT 5 clients. `Debug` leaves the password out.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExternalBrokerConfig {
    /// `mqtt://HOST[:PORT]` (port 1883 by default) or `mqtts://HOST[:PORT]` (8883).
    pub(crate) url: String,
    /// User name polyhub's clients log in with.
    #[serde(default)]
    pub(crate) username: Option<String>,
    /// Password polyhub's clients log in with (needs `username`).
    #[serde(default)]
    pub(crate) password: Option<String>,
    /// `mqtts` only: PEM file with the CA certificates the broker's certificate must chain
    /// to (required with `mqtts`: the system's roots are not used).
    #[serde(default)]
    pub(crate) ca_file: Option<PathBuf>,
    /// Put before every client id polyhub uses on the broker (`polyhub-parser-<hub>`,
    /// `polyhub-hub-manager`, `polyhub-polyglot-<name>`), so that several polyhub
    /// installations can share one broker without taking each other's sessions.
    #[serde(default)]
    pub(crate) client_id_prefix: String,
}

impl std::fmt::Debug for ExternalBrokerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalBrokerConfig")
            .field("url", &self.url)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<hidden>"))
            .field("ca_file", &self.ca_file)
            .field("client_id_prefix", &self.client_id_prefix)
            .finish()
    }
}

/// Where an external broker is, read from its URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BrokerUrl {
    /// `mqtts://`.
    pub(crate) tls: bool,
    /// Host name or IP address (IPv6 without brackets).
    pub(crate) host: String,
    pub(crate) port: u16,
}

impl BrokerUrl {
    /// Parses `mqtt://HOST[:PORT]` or `mqtts://HOST[:PORT]` (IPv6 as `[::1]`), with nothing
    /// after the address but an optional `/`. The error is a reason without the URL.
    pub(crate) fn parse(url: &str) -> Result<BrokerUrl, String> {
        const EXPECTED: &str = "expected mqtt://HOST:PORT or mqtts://HOST:PORT";
        let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtt://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("mqtts://") {
            (true, rest)
        } else {
            return Err(EXPECTED.to_owned());
        };
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        if authority.contains('@') {
            return Err(
                "user names and passwords go in username and password, not in the URL".to_owned(),
            );
        }
        if authority.contains(['/', '?', '#']) {
            return Err(format!("{EXPECTED} (no path or query)"));
        }
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| format!("{EXPECTED} (unclosed '[' around an IPv6 address)"))?;
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or_else(|| EXPECTED.to_owned())?),
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{EXPECTED} (the host is missing)"));
        }
        if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("{EXPECTED} (the host contains spaces)"));
        }
        let port = match port {
            None => default_port,
            Some(port) => match port.parse::<u16>() {
                Ok(port) if port > 0 => port,
                _ => return Err(format!("port {port:?} is not a number from 1 to 65535")),
            },
        };
        Ok(BrokerUrl {
            tls,
            host: host.to_owned(),
            port,
        })
    }
}

impl ExternalBrokerConfig {
    /// How polyhub's clients reach the broker: the URL read, credentials checked, the CA
    /// file loaded. Every error names the key at fault.
    pub(crate) fn bus_options(&self) -> Result<crate::bus::mqtt::MqttBusOptions, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid(format!("[external_broker] {reason}"));
        let url = BrokerUrl::parse(&self.url)
            .map_err(|reason| invalid(format!("url = {:?}: {reason}", self.url)))?;
        if self.password.is_some() && self.username.is_none() {
            return Err(invalid(format!(
                "password needs username ({})",
                env::EXTERNAL_BROKER_USERNAME
            )));
        }
        if !self
            .client_id_prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
            || self.client_id_prefix.len() > 64
        {
            return Err(invalid(format!(
                "client_id_prefix = {:?}: at most 64 of A-Z a-z 0-9 _ - . :",
                self.client_id_prefix
            )));
        }
        let tls = match (url.tls, &self.ca_file) {
            (true, Some(ca_file)) => Some(
                polyhub_client::TlsOptions::from_ca_file(ca_file)
                    .map_err(|error| invalid(format!("ca_file: {error}")))?,
            ),
            (true, None) => {
                return Err(invalid(
                    "mqtts:// needs ca_file, the CA certificates the broker's certificate must \
                     chain to"
                        .to_owned(),
                ));
            }
            (false, Some(_)) => {
                return Err(invalid(
                    "ca_file is only used with an mqtts:// url".to_owned(),
                ));
            }
            (false, None) => None,
        };
        let mut options = crate::bus::mqtt::MqttBusOptions::to_host(url.host, url.port);
        options.tls = tls;
        options.username = self.username.clone();
        options.password = self.password.clone();
        options.client_id_prefix = self.client_id_prefix.clone();
        Ok(options)
    }
}

/// The `[log]` section.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct LogConfig {
    /// What to log, in `RUST_LOG` syntax: a level (`info`) or a filter
    /// (`info,polyhub_broker=debug`).
    pub(crate) level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
        }
    }
}

/// Why a configuration cannot be used. Each message fits on one line and names the file,
/// variable or setting at fault.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {reason}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The file is not valid TOML, has an unknown key or a value of the wrong kind.
    #[error("config file {}: {detail}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong and where.
        detail: String,
    },
    /// An environment variable holds an unusable value.
    #[error("environment variable {name}={value:?}: {reason}")]
    Env {
        /// The variable.
        name: &'static str,
        /// Its value, lossily decoded.
        value: String,
        /// Why it is unusable.
        reason: String,
    },
    /// The settings are individually valid but do not make sense together.
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Reads and parses a configuration file.
    pub(crate) fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_path_buf(),
            reason: describe_io_error(&error),
        })?;
        Config::from_toml(&text).map_err(|detail| ConfigError::Parse {
            path: path.to_path_buf(),
            detail,
        })
    }

    /// Parses configuration text; the error is a one-line description with its position.
    pub(crate) fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|error| describe_toml_error(&error, text))
    }

    /// Applies override layers in order, each winning over the ones before it.
    ///
    /// The TLS listener exists when the file has `[mqtt.tls]` or any layer gives a TLS
    /// setting; its certificate and key may come from different layers.
    pub(crate) fn with_overrides(mut self, layers: &[&Overrides]) -> Result<Config, ConfigError> {
        let mut tls = TlsDraft::from(self.mqtt.tls.take());
        let mut external = ExternalDraft::from(self.external_broker.take());
        for layer in layers {
            if let Some(data_dir) = &layer.data_dir {
                self.data_dir.clone_from(data_dir);
            }
            if let Some(level) = &layer.log {
                self.log.level.clone_from(level);
            }
            if let Some(listen) = layer.mqtt_listen {
                self.mqtt.listen = listen;
            }
            if let Some(listen) = layer.http_listen {
                self.http.listen = listen;
            }
            tls.apply(layer);
            external.apply(layer);
        }
        self.external_broker = external.finish()?;
        self.mqtt.tls = tls.finish()?;
        Ok(self)
    }

    /// Checks what serde cannot: settings that contradict each other, and the log filter.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        self.hub
            .validate()
            .map_err(|error| ConfigError::Invalid(format!("[hub]: {error}")))?;
        self.commands
            .validate()
            .map_err(|error| ConfigError::Invalid(format!("[commands]: {error}")))?;
        self.polyglot
            .clients()
            .map_err(|error| ConfigError::Invalid(error.to_string()))?;
        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|error| {
            ConfigError::Invalid(format!(
                "invalid log filter {:?} ([log] level, {} or --log): {error}",
                self.log.level,
                env::LOG
            ))
        })?;
        if let Some(external) = &self.external_broker {
            external.bus_options()?;
            if self.mqtt.tls.is_some() {
                return Err(ConfigError::Invalid(
                    "[mqtt.tls] configures a listener of the embedded broker, which serves no \
                     listener while [external_broker] is set: remove one of them"
                        .to_owned(),
                ));
            }
        }
        if let Some(tls) = &self.mqtt.tls {
            if tls.require_client_cert && tls.ca_file.is_none() {
                return Err(ConfigError::Invalid(format!(
                    "[mqtt.tls] require_client_cert needs ca_file, the CA certificates that \
                     client certificates must chain to (--tls-ca or {})",
                    env::TLS_CA
                )));
            }
            if tls.listen == self.mqtt.listen && tls.listen.port() != 0 {
                return Err(ConfigError::Invalid(format!(
                    "the MQTT and MQTTS listeners cannot both use {}",
                    tls.listen
                )));
            }
        }
        Ok(())
    }
}

/// The configuration `polyhub run` uses: the file named by `config_flag` or `POLYHUB_CONFIG`
/// (defaults when neither is given), then the environment read through `lookup`, then
/// `flags`. Returns the configuration and the file it came from.
pub(crate) fn load(
    config_flag: Option<&Path>,
    flags: &Overrides,
    lookup: impl Fn(&str) -> Option<OsString>,
) -> Result<(Config, Option<PathBuf>), ConfigError> {
    let path = config_flag
        .map(Path::to_path_buf)
        .or_else(|| config_path_from_env(&lookup));
    let file = match &path {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    let environment = Overrides::from_env(&lookup)?;
    let config = file.with_overrides(&[&environment, flags])?;
    config.validate()?;
    Ok((config, path))
}

/// The configuration file named by `POLYHUB_CONFIG`, if set and not empty.
pub(crate) fn config_path_from_env(lookup: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    lookup(env::CONFIG)
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
}

/// Settings given outside the file, by environment variables or flags. `None` keeps the value
/// of the layers below.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Overrides {
    /// `data_dir`.
    pub(crate) data_dir: Option<PathBuf>,
    /// `[log] level`.
    pub(crate) log: Option<String>,
    /// `[mqtt] listen`.
    pub(crate) mqtt_listen: Option<SocketAddr>,
    /// `[mqtt.tls] listen`.
    pub(crate) mqtts_listen: Option<SocketAddr>,
    /// `[mqtt.tls] cert_file`.
    pub(crate) tls_cert: Option<PathBuf>,
    /// `[mqtt.tls] key_file`.
    pub(crate) tls_key: Option<PathBuf>,
    /// `[mqtt.tls] ca_file`.
    pub(crate) tls_ca: Option<PathBuf>,
    /// `[mqtt.tls] require_client_cert`.
    pub(crate) tls_require_client_cert: Option<bool>,
    /// `[http] listen`.
    pub(crate) http_listen: Option<SocketAddr>,
    /// `[external_broker] url`.
    pub(crate) external_broker: Option<String>,
    /// `[external_broker] username`.
    pub(crate) external_broker_username: Option<String>,
    /// `[external_broker] password`.
    pub(crate) external_broker_password: Option<String>,
}

impl Overrides {
    /// Reads the `POLYHUB_*` variables through `lookup` (normally [`std::env::var_os`]). An
    /// empty variable counts as unset.
    pub(crate) fn from_env(
        lookup: impl Fn(&str) -> Option<OsString>,
    ) -> Result<Overrides, ConfigError> {
        let get = |name: &str| lookup(name).filter(|value| !value.is_empty());
        let path = |name: &str| get(name).map(PathBuf::from);
        Ok(Overrides {
            data_dir: path(env::DATA_DIR),
            log: get(env::LOG)
                .map(|value| utf8(env::LOG, value))
                .transpose()?,
            mqtt_listen: get(env::MQTT_LISTEN)
                .map(|value| socket_addr(env::MQTT_LISTEN, value))
                .transpose()?,
            mqtts_listen: get(env::MQTTS_LISTEN)
                .map(|value| socket_addr(env::MQTTS_LISTEN, value))
                .transpose()?,
            tls_cert: path(env::TLS_CERT),
            tls_key: path(env::TLS_KEY),
            tls_ca: path(env::TLS_CA),
            tls_require_client_cert: get(env::TLS_REQUIRE_CLIENT_CERT)
                .map(|value| boolean(env::TLS_REQUIRE_CLIENT_CERT, value))
                .transpose()?,
            http_listen: get(env::HTTP_LISTEN)
                .map(|value| socket_addr(env::HTTP_LISTEN, value))
                .transpose()?,
            external_broker: get(env::EXTERNAL_BROKER)
                .map(|value| utf8(env::EXTERNAL_BROKER, value))
                .transpose()?,
            external_broker_username: get(env::EXTERNAL_BROKER_USERNAME)
                .map(|value| utf8(env::EXTERNAL_BROKER_USERNAME, value))
                .transpose()?,
            external_broker_password: get(env::EXTERNAL_BROKER_PASSWORD)
                .map(|value| utf8(env::EXTERNAL_BROKER_PASSWORD, value))
                .transpose()?,
        })
    }
}

fn env_error(name: &'static str, value: &OsString, reason: impl Into<String>) -> ConfigError {
    ConfigError::Env {
        name,
        value: value.to_string_lossy().into_owned(),
        reason: reason.into(),
    }
}

fn utf8(name: &'static str, value: OsString) -> Result<String, ConfigError> {
    value
        .clone()
        .into_string()
        .map_err(|_| env_error(name, &value, "not valid UTF-8"))
}

fn socket_addr(name: &'static str, value: OsString) -> Result<SocketAddr, ConfigError> {
    let text = utf8(name, value.clone())?;
    text.parse().map_err(|_| {
        env_error(
            name,
            &value,
            "expected an IP address and port, such as 127.0.0.1:1883",
        )
    })
}

fn boolean(name: &'static str, value: OsString) -> Result<bool, ConfigError> {
    match utf8(name, value.clone())?.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(env_error(name, &value, "expected true or false")),
    }
}

/// `[mqtt.tls]` while layers are applied: every field optional until the end.
#[derive(Debug, Default)]
struct TlsDraft {
    listen: Option<SocketAddr>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    require_client_cert: Option<bool>,
}

impl From<Option<TlsConfig>> for TlsDraft {
    fn from(tls: Option<TlsConfig>) -> Self {
        match tls {
            None => TlsDraft::default(),
            Some(tls) => TlsDraft {
                listen: Some(tls.listen),
                cert_file: Some(tls.cert_file),
                key_file: Some(tls.key_file),
                ca_file: tls.ca_file,
                require_client_cert: Some(tls.require_client_cert),
            },
        }
    }
}

impl TlsDraft {
    fn apply(&mut self, layer: &Overrides) {
        if let Some(listen) = layer.mqtts_listen {
            self.listen = Some(listen);
        }
        if let Some(cert) = &layer.tls_cert {
            self.cert_file = Some(cert.clone());
        }
        if let Some(key) = &layer.tls_key {
            self.key_file = Some(key.clone());
        }
        if let Some(ca) = &layer.tls_ca {
            self.ca_file = Some(ca.clone());
        }
        if let Some(required) = layer.tls_require_client_cert {
            self.require_client_cert = Some(required);
        }
    }

    fn finish(self) -> Result<Option<TlsConfig>, ConfigError> {
        // `require_client_cert = false` alone does not ask for a TLS listener.
        let wanted = self.listen.is_some()
            || self.cert_file.is_some()
            || self.key_file.is_some()
            || self.ca_file.is_some()
            || self.require_client_cert == Some(true);
        if !wanted {
            return Ok(None);
        }
        let missing = |what: &str, key: &str, flag: &str, var: &str| {
            ConfigError::Invalid(format!(
                "the MQTTS listener needs a {what}: set {key} in [mqtt.tls], {flag} or {var}"
            ))
        };
        let cert_file = self
            .cert_file
            .ok_or_else(|| missing("certificate file", "cert_file", "--tls-cert", env::TLS_CERT))?;
        let key_file = self
            .key_file
            .ok_or_else(|| missing("private key file", "key_file", "--tls-key", env::TLS_KEY))?;
        Ok(Some(TlsConfig {
            listen: self.listen.unwrap_or(DEFAULT_MQTTS_LISTEN),
            cert_file,
            key_file,
            ca_file: self.ca_file,
            require_client_cert: self.require_client_cert.unwrap_or(false),
        }))
    }
}

/// `[external_broker]` while layers are applied: the section exists once any layer gives its
/// URL; credentials may come from another layer than the URL.
#[derive(Debug, Default)]
struct ExternalDraft {
    section: Option<ExternalBrokerConfig>,
    url: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

impl From<Option<ExternalBrokerConfig>> for ExternalDraft {
    fn from(section: Option<ExternalBrokerConfig>) -> Self {
        ExternalDraft {
            section,
            ..ExternalDraft::default()
        }
    }
}

impl ExternalDraft {
    fn apply(&mut self, layer: &Overrides) {
        if let Some(url) = &layer.external_broker {
            self.url = Some(url.clone());
        }
        if let Some(username) = &layer.external_broker_username {
            self.username = Some(username.clone());
        }
        if let Some(password) = &layer.external_broker_password {
            self.password = Some(password.clone());
        }
    }

    fn finish(self) -> Result<Option<ExternalBrokerConfig>, ConfigError> {
        let mut section = match (self.section, self.url) {
            (Some(mut section), url) => {
                if let Some(url) = url {
                    section.url = url;
                }
                section
            }
            (None, Some(url)) => ExternalBrokerConfig {
                url,
                username: None,
                password: None,
                ca_file: None,
                client_id_prefix: String::new(),
            },
            (None, None) => {
                if self.username.is_some() || self.password.is_some() {
                    return Err(ConfigError::Invalid(format!(
                        "{} / {} are set but no external broker is: set url in \
                         [external_broker] or {}",
                        env::EXTERNAL_BROKER_USERNAME,
                        env::EXTERNAL_BROKER_PASSWORD,
                        env::EXTERNAL_BROKER
                    )));
                }
                return Ok(None);
            }
        };
        if let Some(username) = self.username {
            section.username = Some(username);
        }
        if let Some(password) = self.password {
            section.password = Some(password);
        }
        Ok(Some(section))
    }
}

/// A TOML error on one line: what, in which section, at which line and column.
///
/// The toml crate's own rendering spans several lines (it quotes the source), and it keeps the
/// section path private; rendering the error without its input yields the message followed by
/// an ``in `a.b` `` line, which is where the section comes from.
fn describe_toml_error(error: &toml::de::Error, text: &str) -> String {
    let message = error.message().trim().replace('\n', " ");
    let mut bare = error.clone();
    bare.set_input(None);
    let rendered = bare.to_string();
    let section = rendered
        .trim_end()
        .rsplit_once('\n')
        .and_then(|(_, last)| last.strip_prefix("in `"))
        .and_then(|rest| rest.strip_suffix('`'))
        .map(str::to_owned);

    let mut detail = match section {
        // "unknown field `x`, expected ..." becomes "unknown field `x` in [mqtt], expected ...".
        Some(section)
            if message.starts_with("unknown field `") || message.starts_with("missing field `") =>
        {
            insert_after_first_quoted(&message, &format!(" in [{section}]"))
        }
        Some(section) => format!("{section}: {message}"),
        None => message,
    };
    if let Some(span) = error.span() {
        let (line, column) = line_and_column(text, span.start);
        detail.push_str(&format!(" (line {line}, column {column})"));
    }
    detail
}

/// `message` with `insertion` placed right after its first `` `quoted` `` word.
fn insert_after_first_quoted(message: &str, insertion: &str) -> String {
    let close = message.find('`').and_then(|open| {
        message[open + 1..]
            .find('`')
            .map(|close| open + 1 + close + 1)
    });
    match close {
        Some(at) => format!("{}{insertion}{}", &message[..at], &message[at..]),
        None => format!("{message}{insertion}"),
    }
}

/// 1-based line and column (in characters) of byte offset `at` in `text`.
fn line_and_column(text: &str, at: usize) -> (usize, usize) {
    let before = &text[..text.floor_char_boundary(at.min(text.len()))];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// A short reason for an I/O failure, in the words an operator would use.
pub(crate) fn describe_io_error(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::NotFound => "no such file or directory".into(),
        io::ErrorKind::PermissionDenied => "permission denied".into(),
        io::ErrorKind::IsADirectory => "is a directory".into(),
        io::ErrorKind::InvalidData => "not valid UTF-8 text".into(),
        _ => error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    fn environment(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + use<> {
        let vars: HashMap<String, OsString> = vars
            .iter()
            .map(|(name, value)| (name.to_string(), OsString::from(value)))
            .collect();
        move |name| vars.get(name).cloned()
    }

    fn parse_error(text: &str) -> String {
        Config::from_toml(text).unwrap_err()
    }

    /// The field names serde expects for a section, read from its "unknown field" error.
    fn expected_fields<T: for<'de> Deserialize<'de> + std::fmt::Debug>() -> Vec<String> {
        let error = toml::from_str::<T>("not_a_real_key_ = 1").unwrap_err();
        let message = error.message();
        let (_, list) = message
            .split_once("expected one of ")
            .or_else(|| message.split_once("expected "))
            .unwrap_or_else(|| panic!("unexpected error: {message}"));
        // serde lists two fields as "`a` or `b`" and more as "one of `a`, `b`, `c`".
        list.split(", ")
            .flat_map(|part| part.split(" or "))
            .map(|field| field.trim_matches('`').to_owned())
            .collect()
    }

    #[test]
    fn default_file_parses_to_the_defaults() {
        assert_eq!(
            Config::from_toml(DEFAULT_CONFIG_TOML),
            Ok(Config::default())
        );
    }

    #[test]
    fn empty_file_gives_the_defaults() {
        assert_eq!(Config::from_toml(""), Ok(Config::default()));
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = Config::default();
        assert_eq!(config.mqtt.listen, addr("127.0.0.1:1883"));
        assert_eq!(config.data_dir, PathBuf::from("polyhub-data"));
        assert_eq!(config.log.level, "info");
        assert_eq!(config.mqtt.tls, None);
        config.validate().unwrap();
    }

    /// Every key of every section appears in the default file (set or commented out), so the
    /// file stays a complete reference when a section gains a field.
    /// Keys that name a sub-section rather than a setting.
    fn is_section(field: &str) -> bool {
        [
            "log",
            "mqtt",
            "tls",
            "limits",
            "persistence",
            "http",
            "hub",
            "channels",
            "storage",
            "sqlite",
            "polyglot",
            "commands",
            "external_broker",
        ]
        .contains(&field)
    }

    #[test]
    fn default_file_mentions_every_key() {
        let sections = [
            ("", expected_fields::<Config>()),
            ("[log]", expected_fields::<LogConfig>()),
            ("[mqtt]", expected_fields::<MqttConfig>()),
            ("[mqtt.tls]", expected_fields::<TlsConfig>()),
            (
                "[mqtt.limits]",
                expected_fields::<polyhub_broker::BrokerConfig>(),
            ),
            (
                "[mqtt.persistence]",
                expected_fields::<polyhub_broker::PersistenceConfig>(),
            ),
            ("[http]", expected_fields::<polyhub_api::ApiConfig>()),
            ("[hub]", expected_fields::<polyhub_hub::HubConfig>()),
            (
                "[hub.channels]",
                expected_fields::<polyhub_hub::ChannelTemplates>(),
            ),
            ("[storage]", expected_fields::<StorageConfig>()),
            (
                "[storage.sqlite]",
                expected_fields::<polyhub_store::SqliteConfig>(),
            ),
            (
                "[commands]",
                expected_fields::<polyhub_polyglot::CommandConfig>(),
            ),
            (
                "[external_broker]",
                expected_fields::<ExternalBrokerConfig>(),
            ),
        ];
        for (section, fields) in sections {
            assert!(!fields.is_empty());
            for field in fields {
                if is_section(&field) {
                    continue;
                }
                let mentioned = DEFAULT_CONFIG_TOML.lines().any(|line| {
                    let line = line.trim_start_matches(['#', ' ']);
                    line.starts_with(&format!("{field} ="))
                });
                assert!(
                    mentioned,
                    "{section} {field} is missing from default-config.toml"
                );
            }
        }
    }

    /// docs/configuration.md documents every key and every environment variable.
    #[test]
    fn configuration_docs_mention_every_key_and_variable() {
        let docs = include_str!("../../../docs/configuration.md");
        let sections = [
            expected_fields::<Config>(),
            expected_fields::<LogConfig>(),
            expected_fields::<MqttConfig>(),
            expected_fields::<TlsConfig>(),
            expected_fields::<polyhub_broker::BrokerConfig>(),
            expected_fields::<polyhub_broker::PersistenceConfig>(),
            expected_fields::<polyhub_api::ApiConfig>(),
            expected_fields::<polyhub_hub::HubConfig>(),
            expected_fields::<polyhub_hub::ChannelTemplates>(),
            expected_fields::<StorageConfig>(),
            expected_fields::<polyhub_store::SqliteConfig>(),
            expected_fields::<polyhub_polyglot::CommandConfig>(),
            expected_fields::<ExternalBrokerConfig>(),
        ];
        // Sections are documented under their own headings, not as keys.
        for field in sections.into_iter().flatten().filter(|f| !is_section(f)) {
            assert!(
                docs.contains(&format!("`{field}`")),
                "docs/configuration.md does not mention `{field}`"
            );
        }
        for name in env::ALL {
            assert!(
                docs.contains(name),
                "docs/configuration.md does not mention {name}"
            );
            assert!(
                name == env::CONFIG || DEFAULT_CONFIG_TOML.contains(name),
                "default-config.toml does not mention {name}"
            );
        }
    }

    #[test]
    fn file_values_replace_defaults() {
        let config = Config::from_toml(
            r#"
            data_dir = "/var/lib/polyhub"
            [log]
            level = "debug"
            [mqtt]
            listen = "127.0.0.1:1884"
            [mqtt.limits]
            max_inflight = 7
            [mqtt.tls]
            listen = "127.0.0.1:8884"
            cert_file = "server.pem"
            key_file = "server.key"
            "#,
        )
        .unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/var/lib/polyhub"));
        assert_eq!(config.log.level, "debug");
        assert_eq!(config.mqtt.listen, addr("127.0.0.1:1884"));
        assert_eq!(config.mqtt.limits.max_inflight, 7);
        assert_eq!(
            config.mqtt.limits.max_queued_messages,
            polyhub_broker::BrokerConfig::default().max_queued_messages
        );
        let tls = config.mqtt.tls.unwrap();
        assert_eq!(tls.listen, addr("127.0.0.1:8884"));
        assert_eq!(tls.ca_file, None);
        assert!(!tls.require_client_cert);
    }

    #[test]
    fn unknown_key_is_named_with_its_section_and_line() {
        let error = parse_error("[mqtt]\nlisen = \"127.0.0.1:1883\"\n");
        assert!(
            error.starts_with("unknown field `lisen` in [mqtt], expected one of `listen`"),
            "{error}"
        );
        assert!(error.ends_with("(line 2, column 1)"), "{error}");
        assert!(!error.contains('\n'));
    }

    #[test]
    fn unknown_top_level_key_is_named() {
        let error = parse_error("data_dri = \"x\"\n");
        assert!(error.starts_with("unknown field `data_dri`"), "{error}");
        assert!(error.contains("`data_dir`"), "{error}");
    }

    #[test]
    fn unknown_nested_key_is_named_with_its_section() {
        let error = parse_error("[mqtt.limits]\nmax_inflite = 3\n");
        assert!(
            error.starts_with("unknown field `max_inflite` in [mqtt.limits]"),
            "{error}"
        );
    }

    #[test]
    fn missing_tls_field_is_named() {
        let error = parse_error("[mqtt.tls]\nlisten = \"127.0.0.1:8883\"\ncert_file = \"c.pem\"\n");
        assert!(
            error.starts_with("missing field `key_file` in [mqtt.tls]"),
            "{error}"
        );
    }

    #[test]
    fn bad_value_names_the_key() {
        let error = parse_error("[mqtt]\nlisten = \"nowhere\"\n");
        assert!(error.starts_with("mqtt.listen: "), "{error}");
        assert!(error.contains("line 2"), "{error}");
        assert!(!error.contains('\n'));
    }

    #[test]
    fn invalid_toml_is_one_line_with_a_position() {
        let error = parse_error("[mqtt\nlisten = 1\n");
        assert!(!error.contains('\n'), "{error}");
        assert!(error.contains("(line 1, column"), "{error}");
    }

    #[test]
    fn unreadable_file_is_named() {
        let error = Config::from_file(Path::new("/nonexistent/polyhub.toml")).unwrap_err();
        assert_eq!(
            error.to_string(),
            "cannot read config file /nonexistent/polyhub.toml: no such file or directory"
        );
    }

    #[test]
    fn environment_is_read() {
        let overrides = Overrides::from_env(environment(&[
            ("POLYHUB_MQTT_LISTEN", "127.0.0.1:2000"),
            ("POLYHUB_MQTTS_LISTEN", "127.0.0.1:2001"),
            ("POLYHUB_TLS_CERT", "c.pem"),
            ("POLYHUB_TLS_KEY", "k.pem"),
            ("POLYHUB_TLS_CA", "ca.pem"),
            ("POLYHUB_TLS_REQUIRE_CLIENT_CERT", "yes"),
            ("POLYHUB_DATA_DIR", "/tmp/data"),
            ("POLYHUB_LOG", "debug"),
            ("POLYHUB_HTTP_LISTEN", "127.0.0.1:2002"),
        ]))
        .unwrap();
        assert_eq!(
            overrides,
            Overrides {
                data_dir: Some("/tmp/data".into()),
                log: Some("debug".into()),
                mqtt_listen: Some(addr("127.0.0.1:2000")),
                mqtts_listen: Some(addr("127.0.0.1:2001")),
                tls_cert: Some("c.pem".into()),
                tls_key: Some("k.pem".into()),
                tls_ca: Some("ca.pem".into()),
                tls_require_client_cert: Some(true),
                http_listen: Some(addr("127.0.0.1:2002")),
                external_broker: None,
                external_broker_username: None,
                external_broker_password: None,
            }
        );
    }

    #[test]
    fn empty_variables_count_as_unset() {
        let overrides = Overrides::from_env(environment(&[
            ("POLYHUB_MQTT_LISTEN", ""),
            ("POLYHUB_LOG", ""),
        ]))
        .unwrap();
        assert_eq!(overrides, Overrides::default());
    }

    #[test]
    fn bad_variable_is_named() {
        let error = Overrides::from_env(environment(&[("POLYHUB_MQTT_LISTEN", "localhost")]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "environment variable POLYHUB_MQTT_LISTEN=\"localhost\": expected an IP address \
             and port, such as 127.0.0.1:1883"
        );
        let error =
            Overrides::from_env(environment(&[("POLYHUB_TLS_REQUIRE_CLIENT_CERT", "maybe")]))
                .unwrap_err()
                .to_string();
        assert!(error.contains("expected true or false"), "{error}");
    }

    #[test]
    fn later_layers_win() {
        let file = Config::from_toml(
            "data_dir = \"file-data\"\n[log]\nlevel = \"warn\"\n[mqtt]\nlisten = \"127.0.0.1:1001\"\n",
        )
        .unwrap();
        let environment = Overrides {
            mqtt_listen: Some(addr("127.0.0.1:1002")),
            data_dir: Some("env-data".into()),
            ..Overrides::default()
        };
        let flags = Overrides {
            mqtt_listen: Some(addr("127.0.0.1:1003")),
            ..Overrides::default()
        };

        let config = file.clone().with_overrides(&[]).unwrap();
        assert_eq!(config.mqtt.listen, addr("127.0.0.1:1001"));

        let config = file.clone().with_overrides(&[&environment]).unwrap();
        assert_eq!(config.mqtt.listen, addr("127.0.0.1:1002"));
        assert_eq!(config.data_dir, PathBuf::from("env-data"));

        let config = file.with_overrides(&[&environment, &flags]).unwrap();
        assert_eq!(config.mqtt.listen, addr("127.0.0.1:1003"));
        // Untouched by the flags, so the environment's value stays; the file's level stays.
        assert_eq!(config.data_dir, PathBuf::from("env-data"));
        assert_eq!(config.log.level, "warn");
    }

    #[test]
    fn load_layers_file_environment_and_flags() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("polyhub.toml");
        std::fs::write(
            &file,
            "data_dir = \"file-data\"\n[mqtt]\nlisten = \"127.0.0.1:1001\"\n",
        )
        .unwrap();
        let file_text = file.to_str().unwrap();

        // The file is found through POLYHUB_CONFIG when no flag names one.
        let lookup = environment(&[("POLYHUB_CONFIG", file_text)]);
        let (config, source) = load(None, &Overrides::default(), lookup).unwrap();
        assert_eq!(source.as_deref(), Some(file.as_path()));
        assert_eq!(config.mqtt.listen, addr("127.0.0.1:1001"));
        assert_eq!(config.data_dir, PathBuf::from("file-data"));

        let lookup = environment(&[
            ("POLYHUB_CONFIG", file_text),
            ("POLYHUB_MQTT_LISTEN", "127.0.0.1:1002"),
        ]);
        let (config, _) = load(None, &Overrides::default(), lookup).unwrap();
        assert_eq!(config.mqtt.listen, addr("127.0.0.1:1002"));

        let lookup = environment(&[
            ("POLYHUB_CONFIG", "/nonexistent/ignored.toml"),
            ("POLYHUB_MQTT_LISTEN", "127.0.0.1:1002"),
        ]);
        let flags = Overrides {
            mqtt_listen: Some(addr("127.0.0.1:1003")),
            ..Overrides::default()
        };
        // The --config flag wins over POLYHUB_CONFIG, so the nonexistent file is never read.
        let (config, source) = load(Some(&file), &flags, lookup).unwrap();
        assert_eq!(source.as_deref(), Some(file.as_path()));
        assert_eq!(config.mqtt.listen, addr("127.0.0.1:1003"));
        assert_eq!(config.data_dir, PathBuf::from("file-data"));
    }

    #[test]
    fn load_without_a_file_uses_the_defaults() {
        let (config, source) = load(None, &Overrides::default(), environment(&[])).unwrap();
        assert_eq!(source, None);
        assert_eq!(config, Config::default());
    }

    #[test]
    fn load_reports_an_invalid_combination() {
        let flags = Overrides {
            tls_cert: Some("c.pem".into()),
            tls_key: Some("k.pem".into()),
            tls_require_client_cert: Some(true),
            ..Overrides::default()
        };
        assert!(matches!(
            load(None, &flags, environment(&[])),
            Err(ConfigError::Invalid(_))
        ));
    }

    #[test]
    fn tls_can_be_assembled_from_several_layers() {
        let environment = Overrides {
            tls_cert: Some("env-cert.pem".into()),
            tls_key: Some("env-key.pem".into()),
            ..Overrides::default()
        };
        let flags = Overrides {
            tls_key: Some("flag-key.pem".into()),
            tls_require_client_cert: Some(true),
            tls_ca: Some("ca.pem".into()),
            ..Overrides::default()
        };
        let config = Config::default()
            .with_overrides(&[&environment, &flags])
            .unwrap();
        assert_eq!(
            config.mqtt.tls,
            Some(TlsConfig {
                listen: DEFAULT_MQTTS_LISTEN,
                cert_file: "env-cert.pem".into(),
                key_file: "flag-key.pem".into(),
                ca_file: Some("ca.pem".into()),
                require_client_cert: true,
            })
        );
    }

    #[test]
    fn flags_override_the_files_tls_section() {
        let file = Config::from_toml(
            "[mqtt.tls]\nlisten = \"127.0.0.1:8884\"\ncert_file = \"a.pem\"\nkey_file = \"a.key\"\n",
        )
        .unwrap();
        let flags = Overrides {
            mqtts_listen: Some(addr("127.0.0.1:0")),
            ..Overrides::default()
        };
        let tls = file.with_overrides(&[&flags]).unwrap().mqtt.tls.unwrap();
        assert_eq!(tls.listen, addr("127.0.0.1:0"));
        assert_eq!(tls.cert_file, PathBuf::from("a.pem"));
    }

    #[test]
    fn tls_without_a_key_is_refused() {
        let flags = Overrides {
            tls_cert: Some("c.pem".into()),
            ..Overrides::default()
        };
        let error = Config::default()
            .with_overrides(&[&flags])
            .unwrap_err()
            .to_string();
        assert!(error.contains("needs a private key file"), "{error}");
        assert!(error.contains("--tls-key"), "{error}");
    }

    #[test]
    fn not_requiring_client_certs_alone_enables_nothing() {
        let environment = Overrides {
            tls_require_client_cert: Some(false),
            ..Overrides::default()
        };
        let config = Config::default().with_overrides(&[&environment]).unwrap();
        assert_eq!(config.mqtt.tls, None);
    }

    #[test]
    fn required_client_certificate_needs_a_ca() {
        let flags = Overrides {
            tls_cert: Some("c.pem".into()),
            tls_key: Some("k.pem".into()),
            tls_require_client_cert: Some(true),
            ..Overrides::default()
        };
        let config = Config::default().with_overrides(&[&flags]).unwrap();
        let error = config.validate().unwrap_err().to_string();
        assert!(
            error.contains("require_client_cert needs ca_file"),
            "{error}"
        );
    }

    #[test]
    fn listeners_cannot_share_a_port() {
        let flags = Overrides {
            mqtts_listen: Some(addr("127.0.0.1:1883")),
            tls_cert: Some("c.pem".into()),
            tls_key: Some("k.pem".into()),
            ..Overrides::default()
        };
        let config = Config::default().with_overrides(&[&flags]).unwrap();
        assert!(config.validate().is_err());
    }

    #[test]
    fn bad_log_filter_is_refused() {
        let mut config = Config::default();
        config.log.level = "info,=[".into();
        let error = config.validate().unwrap_err().to_string();
        assert!(
            error.starts_with("invalid log filter \"info,=[\""),
            "{error}"
        );
        config.log.level = "info,polyhub_broker=debug".into();
        config.validate().unwrap();
    }

    fn external(url: &str) -> Config {
        Config::from_toml(&format!("[external_broker]\nurl = {url:?}\n")).unwrap()
    }

    fn invalid(config: &Config) -> String {
        config.validate().unwrap_err().to_string()
    }

    #[test]
    fn broker_urls_parse_with_default_ports() {
        let parsed = |url: &str| BrokerUrl::parse(url).unwrap();
        assert_eq!(
            parsed("mqtt://127.0.0.1:18830"),
            BrokerUrl {
                tls: false,
                host: "127.0.0.1".into(),
                port: 18830
            }
        );
        assert_eq!(parsed("mqtt://broker.example/").port, 1883);
        let tls = parsed("mqtts://broker.example");
        assert!(tls.tls);
        assert_eq!(tls.port, 8883);
        let ipv6 = parsed("mqtt://[::1]:1884");
        assert_eq!((ipv6.host.as_str(), ipv6.port), ("::1", 1884));
        assert_eq!(parsed("mqtts://[::1]").port, 8883);
    }

    #[test]
    fn bad_broker_urls_say_what_is_expected() {
        for (url, expected) in [
            ("127.0.0.1:1883", "expected mqtt://HOST:PORT"),
            ("http://127.0.0.1:1883", "expected mqtt://HOST:PORT"),
            ("mqtt://", "the host is missing"),
            ("mqtt://:1883", "the host is missing"),
            ("mqtt://host:0", "not a number from 1 to 65535"),
            ("mqtt://host:99999", "not a number from 1 to 65535"),
            ("mqtt://host:x", "not a number from 1 to 65535"),
            ("mqtt://host:1883/topic", "no path or query"),
            ("mqtt://user:pw@host:1883", "username and password"),
            ("mqtt://[::1:1883", "unclosed"),
            ("mqtt://[::1]1883", "expected mqtt://"),
        ] {
            let error = BrokerUrl::parse(url).unwrap_err();
            assert!(error.contains(expected), "{url}: {error}");
        }
    }

    #[test]
    fn the_external_broker_section_parses_and_refuses_unknown_keys() {
        let config = Config::from_toml(
            r#"
            [external_broker]
            url = "mqtt://127.0.0.1:18830"
            username = "polyhub"
            password = "secret"
            client_id_prefix = "site1-"
            "#,
        )
        .unwrap();
        config.validate().unwrap();
        let section = config.external_broker.as_ref().unwrap();
        assert_eq!(section.username.as_deref(), Some("polyhub"));
        let options = section.bus_options().unwrap();
        assert_eq!((options.host.as_str(), options.port), ("127.0.0.1", 18830));
        assert_eq!(options.username.as_deref(), Some("polyhub"));
        assert_eq!(options.password.as_deref(), Some("secret"));
        assert_eq!(options.client_id_prefix, "site1-");
        assert!(options.tls.is_none());
        assert_eq!(options.describe(), "mqtt://127.0.0.1:18830");

        let error = parse_error("[external_broker]\nurl = \"mqtt://h\"\nuser = \"x\"\n");
        assert!(
            error.starts_with("unknown field `user` in [external_broker]"),
            "{error}"
        );
        let error = parse_error("[external_broker]\nusername = \"x\"\n");
        assert!(
            error.starts_with("missing field `url` in [external_broker]"),
            "{error}"
        );
    }

    #[test]
    fn a_bad_external_broker_url_names_the_key() {
        let error = invalid(&external("localhost:1883"));
        assert_eq!(
            error,
            "[external_broker] url = \"localhost:1883\": expected mqtt://HOST:PORT or \
             mqtts://HOST:PORT"
        );
    }

    #[test]
    fn external_broker_settings_that_contradict_each_other_are_refused() {
        let error = invalid(&external("mqtts://127.0.0.1:8883"));
        assert!(error.contains("mqtts:// needs ca_file"), "{error}");

        let mut config = external("mqtt://127.0.0.1:1883");
        config.external_broker.as_mut().unwrap().ca_file = Some("ca.pem".into());
        assert!(invalid(&config).contains("ca_file is only used with an mqtts://"));

        let mut config = external("mqtt://127.0.0.1:1883");
        config.external_broker.as_mut().unwrap().password = Some("secret".into());
        assert!(invalid(&config).contains("password needs username"));

        let mut config = external("mqtt://127.0.0.1:1883");
        config.external_broker.as_mut().unwrap().client_id_prefix = "a/b".into();
        assert!(invalid(&config).contains("client_id_prefix"));

        let flags = Overrides {
            tls_cert: Some("c.pem".into()),
            tls_key: Some("k.pem".into()),
            ..Overrides::default()
        };
        let config = external("mqtt://127.0.0.1:1883")
            .with_overrides(&[&flags])
            .unwrap();
        assert!(invalid(&config).contains("[mqtt.tls] configures a listener"));
    }

    #[test]
    fn an_mqtts_ca_file_is_loaded_and_a_missing_one_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing-ca.pem");
        let mut config = external("mqtts://localhost");
        config.external_broker.as_mut().unwrap().ca_file = Some(missing.clone());
        let error = invalid(&config);
        assert!(error.starts_with("[external_broker] ca_file: "), "{error}");
        assert!(error.contains("missing-ca.pem"), "{error}");

        let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.cert.pem()).unwrap();
        config.external_broker.as_mut().unwrap().ca_file = Some(ca_file);
        config.validate().unwrap();
        let options = config.external_broker.unwrap().bus_options().unwrap();
        assert!(options.tls.is_some());
        assert_eq!(options.describe(), "mqtts://localhost:8883");
    }

    #[test]
    fn the_external_broker_can_come_from_the_environment_or_a_flag() {
        let environment_layer = Overrides::from_env(environment(&[
            ("POLYHUB_EXTERNAL_BROKER", "mqtt://127.0.0.1:1884"),
            ("POLYHUB_EXTERNAL_BROKER_USERNAME", "env-user"),
            ("POLYHUB_EXTERNAL_BROKER_PASSWORD", "env-secret"),
        ]))
        .unwrap();
        let config = Config::default()
            .with_overrides(&[&environment_layer])
            .unwrap();
        config.validate().unwrap();
        let section = config.external_broker.unwrap();
        assert_eq!(section.url, "mqtt://127.0.0.1:1884");
        assert_eq!(section.username.as_deref(), Some("env-user"));
        assert_eq!(section.password.as_deref(), Some("env-secret"));
        assert_eq!(section.client_id_prefix, "");

        // The flag wins over the environment, and both over the file; the file's other keys
        // stay.
        let file = Config::from_toml(
            "[external_broker]\nurl = \"mqtt://file:1\"\nusername = \"file-user\"\nclient_id_prefix = \"p-\"\n",
        )
        .unwrap();
        let flags = Overrides {
            external_broker: Some("mqtt://flag:3".into()),
            ..Overrides::default()
        };
        let section = file
            .with_overrides(&[&environment_layer, &flags])
            .unwrap()
            .external_broker
            .unwrap();
        assert_eq!(section.url, "mqtt://flag:3");
        assert_eq!(section.username.as_deref(), Some("env-user"));
        assert_eq!(section.client_id_prefix, "p-");
    }

    #[test]
    fn external_broker_credentials_without_a_broker_are_refused() {
        let environment_layer =
            Overrides::from_env(environment(&[("POLYHUB_EXTERNAL_BROKER_USERNAME", "user")]))
                .unwrap();
        let error = Config::default()
            .with_overrides(&[&environment_layer])
            .unwrap_err()
            .to_string();
        assert!(error.contains("no external broker is"), "{error}");
        assert!(error.contains("POLYHUB_EXTERNAL_BROKER"), "{error}");
    }
}
