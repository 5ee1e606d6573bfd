//! The `[polyglot.<name>]` settings of an XMPP client, and their checks.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::Deserialize;
use tokio_xmpp::jid::BareJid;

/// `[polyglot.<name>]` settings of a client of type `xmpp`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct XmppClientSettings {
    /// The hub's own account (a bare JID such as `hub@localhost`).
    pub jid: String,
    /// The account's password. Required.
    pub password: String,
    /// `host:port` of the server's client-to-server listener.
    pub server: String,
    /// Domain of device JIDs without a `jid` metadata member (`<device id>@<device_domain>`);
    /// defaults to the domain of `jid`.
    pub device_domain: Option<String>,
    /// Talk to the server without TLS. Only accepted when `server` is a loopback address,
    /// so a password never crosses a network in clear text. Otherwise STARTTLS is required
    /// and the server certificate must chain to the system's root store.
    pub allow_plaintext: bool,
    /// How long a command may wait to be written to the server before the send is
    /// reported as unavailable (and retried later), in milliseconds.
    pub send_timeout_ms: u64,
}

impl Default for XmppClientSettings {
    fn default() -> Self {
        XmppClientSettings {
            jid: "hub@localhost".to_owned(),
            password: String::new(),
            server: "127.0.0.1:5222".to_owned(),
            device_domain: None,
            allow_plaintext: false,
            send_timeout_ms: 10_000,
        }
    }
}

/// How the connection to the server is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Plain TCP (loopback only).
    Plaintext,
    /// TCP upgraded with STARTTLS.
    StartTls,
}

/// Checked settings, ready to connect with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XmppOptions {
    /// The protocol name devices select this client with (the section name).
    pub protocol: String,
    pub jid: BareJid,
    pub password: String,
    pub server: String,
    pub device_domain: String,
    pub transport: Transport,
    pub send_timeout: Duration,
}

impl XmppClientSettings {
    /// Checks the settings; the error names the offending setting.
    pub fn validate(self, protocol: &str) -> Result<XmppOptions, String> {
        let jid =
            BareJid::new(&self.jid).map_err(|error| format!("jid {:?}: {error}", self.jid))?;
        if jid.node().is_none() {
            return Err(format!(
                "jid {:?}: needs a local part (user@domain)",
                self.jid
            ));
        }
        if self.password.is_empty() {
            return Err("password: required".to_owned());
        }
        let loopback = is_loopback(&self.server)
            .ok_or_else(|| format!("server {:?}: expected host:port", self.server))?;
        if self.allow_plaintext && !loopback {
            return Err(format!(
                "allow_plaintext = true is only accepted for a loopback server, not {:?}",
                self.server
            ));
        }
        let device_domain = self
            .device_domain
            .unwrap_or_else(|| jid.domain().as_str().to_owned());
        BareJid::new(&device_domain)
            .map_err(|error| format!("device_domain {device_domain:?}: {error}"))?;
        if self.send_timeout_ms == 0 {
            return Err("send_timeout_ms: must be positive".to_owned());
        }
        Ok(XmppOptions {
            protocol: protocol.to_owned(),
            jid,
            password: self.password,
            server: self.server,
            device_domain,
            transport: if self.allow_plaintext {
                Transport::Plaintext
            } else {
                Transport::StartTls
            },
            send_timeout: Duration::from_millis(self.send_timeout_ms),
        })
    }
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

    #[test]
    fn plaintext_needs_a_loopback_server() {
        let ok = settings(
            "jid = \"hub@localhost\"\npassword = \"pw\"\nserver = \"127.0.0.1:15222\"\nallow_plaintext = true",
        )
        .unwrap()
        .validate("xmpp")
        .unwrap();
        assert_eq!(ok.transport, Transport::Plaintext);
        assert_eq!(ok.device_domain, "localhost");
        assert_eq!(ok.protocol, "xmpp");

        let error = settings(
            "jid = \"hub@example.org\"\npassword = \"pw\"\nserver = \"xmpp.example.org:5222\"\nallow_plaintext = true",
        )
        .unwrap()
        .validate("xmpp")
        .unwrap_err();
        assert!(error.contains("loopback"), "{error}");

        let tls = settings(
            "jid = \"hub@example.org\"\npassword = \"pw\"\nserver = \"xmpp.example.org:5222\"\ndevice_domain = \"devices.example.org\"",
        )
        .unwrap()
        .validate("chat")
        .unwrap();
        assert_eq!(tls.transport, Transport::StartTls);
        assert_eq!(tls.device_domain, "devices.example.org");
    }

    #[test]
    fn bad_settings_name_the_setting() {
        let missing_password = XmppClientSettings::default().validate("xmpp").unwrap_err();
        assert!(
            missing_password.starts_with("password"),
            "{missing_password}"
        );
        let bad_jid = settings("jid = \"localhost\"\npassword = \"pw\"")
            .unwrap()
            .validate("xmpp")
            .unwrap_err();
        assert!(bad_jid.starts_with("jid"), "{bad_jid}");
        let bad_server = settings("password = \"pw\"\nserver = \"nowhere\"")
            .unwrap()
            .validate("xmpp")
            .unwrap_err();
        assert!(bad_server.starts_with("server"), "{bad_server}");
        assert!(settings("component = \"hub.localhost\"").is_err());
    }
}
