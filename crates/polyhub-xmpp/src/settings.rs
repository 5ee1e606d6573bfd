//! The `[polyglot.<name>]` settings of an XMPP client, and their checks.
//!
//! Two ways to be on the server ([`Mode`]): as an account (client-to-server, SASL, STARTTLS), or
//! as a component (XEP-0114: a domain of its own, a shared secret, and no TLS at all). Checking
//! turns the flat TOML keys into [`XmppOptions`], where each mode carries only what it uses, so
//! the rest of the crate cannot mix them up.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_xmpp::jid::BareJid;

/// How the hub is present on the XMPP server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Logs in as the account `jid` with `password` (client-to-server).
    #[default]
    Account,
    /// Connects to the server's component listener as `component_domain` with
    /// `component_secret` (XEP-0114).
    Component,
}

/// `[polyglot.<name>]` settings of a client of type `xmpp`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct XmppClientSettings {
    /// `account` (default) or `component`.
    pub mode: Mode,
    /// Account mode: the hub's own account (a bare JID); default `hub@localhost`. Refused in
    /// component mode, where the component domain is the hub's address.
    pub jid: Option<String>,
    /// Account mode: the account's password. Required there, refused in component mode.
    pub password: String,
    /// `host:port` of the server's client-to-server listener (account mode, default
    /// `127.0.0.1:5222`) or of its component listener (component mode, default
    /// `127.0.0.1:5347`).
    pub server: Option<String>,
    /// Component mode: the component's domain (e.g. `hub.localhost`), which is also the
    /// address commands come from. Required there.
    pub component_domain: Option<String>,
    /// Component mode: the secret shared with the server for this component. Required there.
    pub component_secret: String,
    /// Component mode: accept a `server` that is not a loopback address. XEP-0114 has no TLS,
    /// so every stanza then crosses the network in clear text.
    pub allow_remote_component: bool,
    /// `host:port` of the client-to-server listener that device accounts are registered on
    /// (XEP-0077). Default: `server` in account mode; none in component mode, where device
    /// provisioning is then unsupported.
    pub registration_server: Option<String>,
    /// Domain of device JIDs without a `jid` metadata member (`<device id>@<device_domain>`);
    /// defaults to the domain of `jid` (account mode) or to `component_domain` without its
    /// first label (component mode: `hub.localhost` → `localhost`).
    pub device_domain: Option<String>,
    /// Talk to the client-to-server listener (`server` in account mode, `registration_server`
    /// in component mode) without TLS. Only accepted when that listener is a loopback
    /// address, so a password never crosses a network in clear text. Otherwise STARTTLS is
    /// required and the server certificate must chain to the system's root store.
    pub allow_plaintext: bool,
    /// How long a command may wait to be written to the server before the send is
    /// reported as unavailable (and retried later), in milliseconds.
    pub send_timeout_ms: u64,
}

impl Default for XmppClientSettings {
    /// The embedded defaults; the mode-dependent ones (`jid`, `server`, `device_domain`) are
    /// `None` here and resolved by [`XmppClientSettings::validate`].
    fn default() -> Self {
        XmppClientSettings {
            mode: Mode::Account,
            jid: None,
            password: String::new(),
            server: None,
            component_domain: None,
            component_secret: String::new(),
            allow_remote_component: false,
            registration_server: None,
            device_domain: None,
            allow_plaintext: false,
            send_timeout_ms: DEFAULT_SEND_TIMEOUT_MS,
        }
    }
}

/// The account used in account mode when `jid` is not set.
pub const DEFAULT_JID: &str = "hub@localhost";
/// The client-to-server listener used in account mode when `server` is not set.
pub const DEFAULT_CLIENT_SERVER: &str = "127.0.0.1:5222";
/// The component listener used in component mode when `server` is not set (Prosody's and
/// ejabberd's usual component port).
pub const DEFAULT_COMPONENT_SERVER: &str = "127.0.0.1:5347";
/// The default of `send_timeout_ms`.
pub const DEFAULT_SEND_TIMEOUT_MS: u64 = 10_000;

/// How a client-to-server connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Plain TCP (loopback only).
    Plaintext,
    /// TCP upgraded with STARTTLS.
    StartTls,
}

/// A client-to-server listener and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientEndpoint {
    /// `host:port`.
    pub server: String,
    pub transport: Transport,
}

/// How the hub connects, with what only that mode needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connection {
    /// Logged in as an account.
    Account {
        jid: BareJid,
        password: String,
        endpoint: ClientEndpoint,
    },
    /// Connected as a component (always plain TCP: XEP-0114 has no TLS).
    Component {
        domain: BareJid,
        secret: String,
        /// `host:port` of the component listener.
        server: String,
    },
}

/// Checked settings, ready to connect with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XmppOptions {
    /// The protocol name devices select this client with (the section name).
    pub protocol: String,
    pub connection: Connection,
    /// Where device accounts are registered; `None`: provisioning is unsupported.
    pub registration: Option<ClientEndpoint>,
    pub device_domain: String,
    pub send_timeout: Duration,
}

impl XmppOptions {
    /// The address the hub's stanzas come from: the account, or the component's domain.
    pub fn address(&self) -> &BareJid {
        match &self.connection {
            Connection::Account { jid, .. } => jid,
            Connection::Component { domain, .. } => domain,
        }
    }

    /// Whether the hub is a component (no roster, no account of its own).
    pub fn is_component(&self) -> bool {
        matches!(self.connection, Connection::Component { .. })
    }
}

impl XmppClientSettings {
    /// Checks the settings; the error names the offending setting.
    pub fn validate(self, protocol: &str) -> Result<XmppOptions, String> {
        if self.send_timeout_ms == 0 {
            return Err("send_timeout_ms: must be positive".to_owned());
        }
        let registration_server = self
            .registration_server
            .as_deref()
            .map(|server| client_endpoint("registration_server", server, self.allow_plaintext))
            .transpose()?;
        let (connection, registration, default_device_domain) = match self.mode {
            Mode::Account => {
                self.refuse_component_keys()?;
                let jid_text = self.jid.as_deref().unwrap_or(DEFAULT_JID);
                let jid =
                    BareJid::new(jid_text).map_err(|error| format!("jid {jid_text:?}: {error}"))?;
                if jid.node().is_none() {
                    return Err(format!(
                        "jid {jid_text:?}: needs a local part (user@domain)"
                    ));
                }
                if self.password.is_empty() {
                    return Err("password: required".to_owned());
                }
                let server = self.server.as_deref().unwrap_or(DEFAULT_CLIENT_SERVER);
                let endpoint = client_endpoint("server", server, self.allow_plaintext)?;
                let registration = registration_server.unwrap_or_else(|| endpoint.clone());
                let device_domain = jid.domain().as_str().to_owned();
                let connection = Connection::Account {
                    jid,
                    password: self.password,
                    endpoint,
                };
                (connection, Some(registration), Some(device_domain))
            }
            Mode::Component => {
                if self.jid.is_some() {
                    return Err("jid: not used in component mode (the hub's address is \
                                component_domain)"
                        .to_owned());
                }
                if !self.password.is_empty() {
                    return Err("password: not used in component mode (the component \
                                authenticates with component_secret)"
                        .to_owned());
                }
                let domain_text = self
                    .component_domain
                    .as_deref()
                    .ok_or("component_domain: required in component mode")?;
                let domain = BareJid::new(domain_text)
                    .map_err(|error| format!("component_domain {domain_text:?}: {error}"))?;
                if domain.node().is_some() {
                    return Err(format!(
                        "component_domain {domain_text:?}: a domain, without a local part"
                    ));
                }
                if self.component_secret.is_empty() {
                    return Err("component_secret: required in component mode".to_owned());
                }
                let server = self.server.as_deref().unwrap_or(DEFAULT_COMPONENT_SERVER);
                let loopback = is_loopback(server)
                    .ok_or_else(|| format!("server {server:?}: expected host:port"))?;
                if !loopback && !self.allow_remote_component {
                    return Err(format!(
                        "server {server:?}: a component connection (XEP-0114) has no TLS, so \
                         it is only made to a loopback server; set allow_remote_component = \
                         true to send stanzas in clear text over a network you trust"
                    ));
                }
                // `hub.example.org` serves devices of `example.org` in the usual set-up.
                let device_domain = domain
                    .domain()
                    .as_str()
                    .split_once('.')
                    .map(|(_, parent)| parent.to_owned())
                    .filter(|parent| !parent.is_empty());
                let connection = Connection::Component {
                    domain,
                    secret: self.component_secret,
                    server: server.to_owned(),
                };
                (connection, registration_server, device_domain)
            }
        };
        let device_domain = self
            .device_domain
            .or(default_device_domain)
            .ok_or("device_domain: required (component_domain has no parent domain)")?;
        BareJid::new(&device_domain)
            .map_err(|error| format!("device_domain {device_domain:?}: {error}"))?;
        Ok(XmppOptions {
            protocol: protocol.to_owned(),
            connection,
            registration,
            device_domain,
            send_timeout: Duration::from_millis(self.send_timeout_ms),
        })
    }

    /// Component keys in account mode are a mistake worth naming, not something to ignore.
    fn refuse_component_keys(&self) -> Result<(), String> {
        let set = [
            ("component_domain", self.component_domain.is_some()),
            ("component_secret", !self.component_secret.is_empty()),
            ("allow_remote_component", self.allow_remote_component),
        ];
        match set.iter().find(|(_, is_set)| *is_set) {
            Some((key, _)) => Err(format!(
                "{key}: only used with mode = \"component\" (this section is in account mode)"
            )),
            None => Ok(()),
        }
    }
}

/// A client-to-server listener, plaintext only on loopback.
fn client_endpoint(
    key: &str,
    server: &str,
    allow_plaintext: bool,
) -> Result<ClientEndpoint, String> {
    let loopback =
        is_loopback(server).ok_or_else(|| format!("{key} {server:?}: expected host:port"))?;
    if allow_plaintext && !loopback {
        return Err(format!(
            "allow_plaintext = true is only accepted for a loopback server, not {server:?} ({key})"
        ));
    }
    Ok(ClientEndpoint {
        server: server.to_owned(),
        transport: if allow_plaintext {
            Transport::Plaintext
        } else {
            Transport::StartTls
        },
    })
}

/// Whether `host:port` names this machine; `None` when it is not `host:port`.
fn is_loopback(server: &str) -> Option<bool> {
    if let Ok(address) = server.parse::<SocketAddr>() {
        return Some(address.ip().is_loopback());
    }
    let (host, port) = server.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    if host.is_empty() {
        return None;
    }
    Some(
        host.eq_ignore_ascii_case("localhost")
            || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(toml_text: &str) -> Result<XmppClientSettings, toml::de::Error> {
        toml::from_str(toml_text)
    }

    fn validate(toml_text: &str) -> Result<XmppOptions, String> {
        settings(toml_text)
            .map_err(|error| error.to_string())?
            .validate("xmpp")
    }

    #[test]
    fn plaintext_needs_a_loopback_server() {
        let ok = validate(
            "jid = \"hub@localhost\"\npassword = \"pw\"\nserver = \"127.0.0.1:15222\"\nallow_plaintext = true",
        )
        .unwrap();
        let Connection::Account { endpoint, .. } = &ok.connection else {
            panic!("account mode by default");
        };
        assert_eq!(endpoint.transport, Transport::Plaintext);
        assert_eq!(ok.registration.as_ref(), Some(endpoint));
        assert_eq!(ok.device_domain, "localhost");
        assert_eq!(ok.protocol, "xmpp");
        assert_eq!(ok.address().as_str(), "hub@localhost");
        assert!(!ok.is_component());

        let error = validate(
            "jid = \"hub@example.org\"\npassword = \"pw\"\nserver = \"xmpp.example.org:5222\"\nallow_plaintext = true",
        )
        .unwrap_err();
        assert!(error.contains("loopback"), "{error}");

        let tls = settings(
            "jid = \"hub@example.org\"\npassword = \"pw\"\nserver = \"xmpp.example.org:5222\"\ndevice_domain = \"devices.example.org\"",
        )
        .unwrap()
        .validate("chat")
        .unwrap();
        let Connection::Account { endpoint, .. } = &tls.connection else {
            panic!("account mode by default");
        };
        assert_eq!(endpoint.transport, Transport::StartTls);
        assert_eq!(tls.device_domain, "devices.example.org");
    }

    #[test]
    fn account_mode_defaults() {
        let options = validate("password = \"pw\"").unwrap();
        assert_eq!(
            options.connection,
            Connection::Account {
                jid: BareJid::new(DEFAULT_JID).unwrap(),
                password: "pw".to_owned(),
                endpoint: ClientEndpoint {
                    server: DEFAULT_CLIENT_SERVER.to_owned(),
                    transport: Transport::StartTls,
                },
            }
        );
        assert_eq!(
            options.send_timeout,
            Duration::from_millis(DEFAULT_SEND_TIMEOUT_MS)
        );
    }

    #[test]
    fn bad_settings_name_the_setting() {
        let missing_password = XmppClientSettings::default().validate("xmpp").unwrap_err();
        assert!(
            missing_password.starts_with("password"),
            "{missing_password}"
        );
        let bad_jid = validate("jid = \"localhost\"\npassword = \"pw\"").unwrap_err();
        assert!(bad_jid.starts_with("jid"), "{bad_jid}");
        let bad_server = validate("password = \"pw\"\nserver = \"nowhere\"").unwrap_err();
        assert!(bad_server.starts_with("server"), "{bad_server}");
        let zero = validate("password = \"pw\"\nsend_timeout_ms = 0").unwrap_err();
        assert!(zero.starts_with("send_timeout_ms"), "{zero}");
        assert!(settings("component = \"hub.localhost\"").is_err());
        assert!(settings("mode = \"gateway\"").is_err());
    }

    #[test]
    fn component_mode_takes_a_domain_and_a_secret() {
        let options = validate(
            "mode = \"component\"\ncomponent_domain = \"hub.localhost\"\ncomponent_secret = \"s3\"",
        )
        .unwrap();
        assert_eq!(
            options.connection,
            Connection::Component {
                domain: BareJid::new("hub.localhost").unwrap(),
                secret: "s3".to_owned(),
                server: DEFAULT_COMPONENT_SERVER.to_owned(),
            }
        );
        assert!(options.is_component());
        assert_eq!(options.address().as_str(), "hub.localhost");
        // Devices are on the parent domain unless told otherwise.
        assert_eq!(options.device_domain, "localhost");
        // No client listener named: nowhere to register device accounts.
        assert_eq!(options.registration, None);

        let options = validate(
            "mode = \"component\"\ncomponent_domain = \"hub\"\ncomponent_secret = \"s3\"\n\
             server = \"localhost:15347\"\ndevice_domain = \"devices.lan\"\n\
             registration_server = \"127.0.0.1:15222\"\nallow_plaintext = true",
        )
        .unwrap();
        assert_eq!(options.device_domain, "devices.lan");
        assert_eq!(
            options.registration,
            Some(ClientEndpoint {
                server: "127.0.0.1:15222".to_owned(),
                transport: Transport::Plaintext,
            })
        );
    }

    #[test]
    fn component_mode_errors_name_the_setting() {
        let cases = [
            ("component_secret = \"s\"", "component_domain: required"),
            (
                "component_domain = \"hub.localhost\"",
                "component_secret: required",
            ),
            (
                "component_domain = \"admin@hub.localhost\"\ncomponent_secret = \"s\"",
                "component_domain \"admin@hub.localhost\": a domain",
            ),
            (
                "component_domain = \"hub.localhost\"\ncomponent_secret = \"s\"\njid = \"hub@localhost\"",
                "jid: not used in component mode",
            ),
            (
                "component_domain = \"hub.localhost\"\ncomponent_secret = \"s\"\npassword = \"pw\"",
                "password: not used in component mode",
            ),
            (
                "component_domain = \"hub\"\ncomponent_secret = \"s\"",
                "device_domain: required",
            ),
            (
                "component_domain = \"hub.example.org\"\ncomponent_secret = \"s\"\nserver = \"xmpp.example.org:5347\"",
                "allow_remote_component",
            ),
            (
                "component_domain = \"hub.example.org\"\ncomponent_secret = \"s\"\n\
                 registration_server = \"xmpp.example.org:5222\"\nallow_plaintext = true",
                "loopback",
            ),
        ];
        for (keys, expected) in cases {
            let error = validate(&format!("mode = \"component\"\n{keys}")).unwrap_err();
            assert!(error.contains(expected), "{keys}: {error}");
        }
        // Explicitly accepted: a remote component listener.
        let remote = validate(
            "mode = \"component\"\ncomponent_domain = \"hub.example.org\"\ncomponent_secret = \"s\"\n\
             server = \"xmpp.example.org:5347\"\nallow_remote_component = true",
        )
        .unwrap();
        assert_eq!(remote.device_domain, "example.org");
    }

    #[test]
    fn component_keys_are_refused_in_account_mode() {
        for key in [
            "component_domain = \"hub.localhost\"",
            "component_secret = \"s\"",
            "allow_remote_component = true",
        ] {
            let error = validate(&format!("password = \"pw\"\n{key}")).unwrap_err();
            let name = key.split(' ').next().unwrap_or_default();
            assert!(
                error.starts_with(name) && error.contains("mode = \"component\""),
                "{error}"
            );
        }
    }

    /// Every key is documented where users look for it: the commented default configuration
    /// and docs/configuration.md.
    #[test]
    fn every_key_is_documented() {
        let default_config = include_str!("../../polyhub/src/default-config.toml");
        let configuration = include_str!("../../../docs/configuration.md");
        let keys = serde_json::to_value(XmppClientSettings::default()).unwrap();
        let keys = keys.as_object().unwrap();
        assert!(keys.len() >= 11, "{keys:?}");
        for key in keys.keys() {
            let in_default_config = default_config.lines().any(|line| {
                line.trim_start_matches(['#', ' '])
                    .starts_with(&format!("{key} ="))
            });
            assert!(
                in_default_config,
                "{key} is missing from crates/polyhub/src/default-config.toml"
            );
            assert!(
                configuration.contains(&format!("`{key}`")),
                "docs/configuration.md does not mention `{key}`"
            );
        }
    }
}
