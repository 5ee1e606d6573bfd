//! Configuration: the `[polyglot.<name>]` client sections and the `[commands]` section.
//!
//! Each `[polyglot.<name>]` section builds one client. Its name is the protocol devices select
//! it with (`device.protocol`); `type` names the factory (defaults to the section name);
//! `enabled = false` leaves it out; every other key belongs to the factory, which rejects the
//! ones it does not know. `[polyglot.mqtt]` (the embedded broker) is always present unless
//! disabled that way, so adding `[polyglot.xmpp]` does not remove it.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

use crate::polyglot::PolyglotError;

/// The section (and factory type) of the client of the embedded broker.
pub const DEFAULT_SECTION: &str = "mqtt";

/// Keys of a section that belong to polyglot itself, not to the factory.
const TYPE_KEY: &str = "type";
const ENABLED_KEY: &str = "enabled";

/// The `[polyglot]` table: section name → that client's settings. `Default` is the embedded
/// broker's client alone (`[polyglot.mqtt] type = "mqtt"`).
#[derive(Debug, Clone, PartialEq)]
pub struct PolyglotConfig {
    sections: BTreeMap<String, toml::Table>,
}

impl Default for PolyglotConfig {
    fn default() -> Self {
        PolyglotConfig::from_sections(BTreeMap::new())
    }
}

impl<'de> Deserialize<'de> for PolyglotConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let sections = BTreeMap::<String, toml::Table>::deserialize(deserializer)?;
        Ok(PolyglotConfig::from_sections(sections))
    }
}

/// One client section, split into what polyglot reads and what the factory reads.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientSection {
    /// The section name: the protocol name devices select the client with.
    pub name: String,
    /// The factory's type name.
    pub type_name: String,
    /// The factory's own settings (without `type` and `enabled`).
    pub settings: toml::Table,
}

impl PolyglotConfig {
    /// The given sections, plus `[polyglot.mqtt]` if absent.
    pub fn from_sections(mut sections: BTreeMap<String, toml::Table>) -> PolyglotConfig {
        sections
            .entry(DEFAULT_SECTION.to_owned())
            .or_insert_with(|| {
                let mut table = toml::Table::new();
                table.insert(
                    TYPE_KEY.to_owned(),
                    toml::Value::String(DEFAULT_SECTION.to_owned()),
                );
                table
            });
        PolyglotConfig { sections }
    }

    /// Parses the `[polyglot]` table from TOML text (its contents, i.e. `[mqtt]`, `[xmpp]`...).
    pub fn from_toml(text: &str) -> Result<PolyglotConfig, PolyglotError> {
        toml::from_str(text).map_err(|err| PolyglotError::Section {
            section: "polyglot".to_owned(),
            reason: err.message().to_owned(),
        })
    }

    /// The raw settings of a section (as written, `type` included), if configured.
    pub fn section(&self, name: &str) -> Option<&toml::Table> {
        self.sections.get(name)
    }

    /// The enabled sections, sorted by name, each validated: the name must be usable as a
    /// protocol name, `type` a string and `enabled` a boolean.
    pub fn clients(&self) -> Result<Vec<ClientSection>, PolyglotError> {
        let mut clients = Vec::with_capacity(self.sections.len());
        for (name, table) in &self.sections {
            let fail = |reason: String| PolyglotError::Section {
                section: name.clone(),
                reason,
            };
            validate_section_name(name).map_err(fail)?;
            let mut settings = table.clone();
            let type_name = match settings.remove(TYPE_KEY) {
                None => name.clone(),
                Some(toml::Value::String(type_name)) if !type_name.is_empty() => type_name,
                Some(other) => {
                    return Err(fail(format!(
                        "`type` must be a non-empty string, not {other}"
                    )));
                }
            };
            let enabled = match settings.remove(ENABLED_KEY) {
                None => true,
                Some(toml::Value::Boolean(enabled)) => enabled,
                Some(other) => {
                    return Err(fail(format!(
                        "`enabled` must be true or false, not {other}"
                    )));
                }
            };
            if enabled {
                clients.push(ClientSection {
                    name: name.clone(),
                    type_name,
                    settings,
                });
            }
        }
        Ok(clients)
    }
}

/// Section names become `device.protocol` values and metric labels: keep them plain.
fn validate_section_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err("the section name must be 1 to 64 characters".to_owned());
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
    {
        return Err("the section name may only contain A-Z, a-z, 0-9, '_', '-' and '.'".to_owned());
    }
    Ok(())
}

/// The `[commands]` section: how the command service behaves.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CommandConfig {
    /// TTL of commands submitted without one, in milliseconds (`None`: they never expire).
    pub default_ttl_ms: Option<u64>,
    /// Longest a caller may wait for a command's outcome (`wait`, the API's `wait_ms`).
    pub max_wait_ms: u64,
    /// How often expired commands are looked for, and how often sending to a device whose
    /// client was unavailable is retried at most.
    pub expiry_check_ms: u64,
}

impl Default for CommandConfig {
    fn default() -> Self {
        CommandConfig {
            default_ttl_ms: None,
            max_wait_ms: 60_000,
            expiry_check_ms: 250,
        }
    }
}

impl CommandConfig {
    /// Rejects values the service cannot work with.
    pub fn validate(&self) -> Result<(), String> {
        if self.expiry_check_ms == 0 {
            return Err("[commands] expiry_check_ms must be at least 1".to_owned());
        }
        if self.default_ttl_ms == Some(0) {
            return Err("[commands] default_ttl_ms must be at least 1 (or absent)".to_owned());
        }
        Ok(())
    }
}
