//! Building the configured clients through the factory registry, and the configuration
//! sections' parsing and errors.

use std::sync::Arc;

use async_trait::async_trait;
use parking_lot::Mutex;
use polyhub_hub::ChannelTemplates;
use polyhub_polyglot::{
    BackendClient, BackendError, ClientFactory, ClientRegistry, CommandConfig, FactoryContext,
    Polyglot, PolyglotConfig, PolyglotError, SendOutcome,
};
use polyhub_store::{Command, Device, SqliteConfig, SqliteStore};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Debug)]
struct NamedClient {
    protocol: String,
}

#[async_trait]
impl BackendClient for NamedClient {
    fn protocol(&self) -> &str {
        &self.protocol
    }
    async fn send_command(&self, _: &Device, _: &Command) -> Result<SendOutcome, BackendError> {
        Ok(SendOutcome::Sent)
    }
    fn is_online(&self, _: &str) -> Option<bool> {
        None
    }
}

/// A factory that records what it was asked to build and accepts only `port` settings.
#[derive(Debug)]
struct RecordingFactory {
    type_name: &'static str,
    built: Arc<Mutex<Vec<(String, toml::Table)>>>,
}

#[async_trait]
impl ClientFactory for RecordingFactory {
    fn type_name(&self) -> &'static str {
        self.type_name
    }

    async fn build(
        &self,
        name: &str,
        settings: toml::Table,
        _context: FactoryContext,
    ) -> Result<Arc<dyn BackendClient>, BackendError> {
        if let Some(key) = settings.keys().find(|key| *key != "port") {
            return Err(BackendError::Config(format!("unknown setting `{key}`")));
        }
        self.built.lock().push((name.to_owned(), settings));
        Ok(Arc::new(NamedClient {
            protocol: name.to_owned(),
        }))
    }
}

fn context(dir: &tempfile::TempDir) -> FactoryContext {
    let store = SqliteStore::open(dir.path(), &SqliteConfig::default()).unwrap();
    let (events, _) = mpsc::channel(1);
    FactoryContext {
        events,
        store: Arc::new(store),
        shutdown: CancellationToken::new(),
        bus: None,
        channels: ChannelTemplates::default(),
    }
}

fn registry(built: &Arc<Mutex<Vec<(String, toml::Table)>>>) -> ClientRegistry {
    ClientRegistry::new()
        .with(Box::new(RecordingFactory {
            type_name: "mqtt",
            built: built.clone(),
        }))
        .with(Box::new(RecordingFactory {
            type_name: "xmpp",
            built: built.clone(),
        }))
}

#[tokio::test]
async fn each_section_is_built_by_the_factory_of_its_type() {
    let dir = tempfile::tempdir().unwrap();
    let built = Arc::new(Mutex::new(Vec::new()));
    let config = PolyglotConfig::from_toml(
        r#"
        [xmpp]
        port = 5222
        [lab]
        type = "xmpp"
        port = 5223
        "#,
    )
    .unwrap();
    let polyglot = Polyglot::build(&config, &registry(&built), context(&dir))
        .await
        .unwrap();
    assert_eq!(polyglot.protocols(), vec!["lab", "mqtt", "xmpp"]);
    assert_eq!(polyglot.client("lab").unwrap().protocol(), "lab");
    assert!(polyglot.client("coap").is_none());
    let built = built.lock().clone();
    let names: Vec<&str> = built.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, vec!["lab", "mqtt", "xmpp"]);
    // `type` is polyglot's; the factory sees only its own settings.
    assert_eq!(
        built[0].1.get("port").and_then(|v| v.as_integer()),
        Some(5223)
    );
    assert!(built[0].1.get("type").is_none());
}

#[tokio::test]
async fn an_unknown_type_fails_naming_the_section_and_the_known_types() {
    let dir = tempfile::tempdir().unwrap();
    let built = Arc::new(Mutex::new(Vec::new()));
    let config = PolyglotConfig::from_toml("[zigbee]\nport = 1\n").unwrap();
    let err = Polyglot::build(&config, &registry(&built), context(&dir))
        .await
        .unwrap_err();
    assert!(matches!(err, PolyglotError::UnknownType { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "[polyglot.zigbee]: unknown type \"zigbee\" (known types: mqtt, xmpp)"
    );
    assert!(
        built.lock().is_empty(),
        "nothing is built when a type is unknown"
    );
}

#[tokio::test]
async fn a_bad_setting_fails_naming_the_section() {
    let dir = tempfile::tempdir().unwrap();
    let built = Arc::new(Mutex::new(Vec::new()));
    let config = PolyglotConfig::from_toml("[xmpp]\npassword = \"x\"\nprot = 1\n").unwrap();
    let err = Polyglot::build(&config, &registry(&built), context(&dir))
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(
        message.starts_with("[polyglot.xmpp]: unknown setting"),
        "{message}"
    );
    assert!(!message.contains('\n'));
}

#[test]
fn the_default_is_the_embedded_brokers_client_and_stays_unless_disabled() {
    let default = PolyglotConfig::default();
    let clients = default.clients().unwrap();
    assert_eq!(clients.len(), 1);
    assert_eq!(clients[0].name, "mqtt");
    assert_eq!(clients[0].type_name, "mqtt");
    assert!(clients[0].settings.is_empty());

    let with_xmpp = PolyglotConfig::from_toml("[xmpp]\njid = \"hub@localhost\"\n").unwrap();
    let names: Vec<String> = with_xmpp
        .clients()
        .unwrap()
        .into_iter()
        .map(|section| section.name)
        .collect();
    assert_eq!(names, vec!["mqtt", "xmpp"]);

    let without = PolyglotConfig::from_toml("[mqtt]\nenabled = false\n").unwrap();
    assert!(without.clients().unwrap().is_empty());
}

#[test]
fn malformed_sections_are_refused_with_their_name() {
    let bad_type = PolyglotConfig::from_toml("[xmpp]\ntype = 3\n").unwrap();
    let err = bad_type.clients().unwrap_err().to_string();
    assert!(err.starts_with("[polyglot.xmpp]: `type`"), "{err}");
    let bad_enabled = PolyglotConfig::from_toml("[xmpp]\nenabled = \"no\"\n").unwrap();
    let err = bad_enabled.clients().unwrap_err().to_string();
    assert!(err.starts_with("[polyglot.xmpp]: `enabled`"), "{err}");
    let bad_name = PolyglotConfig::from_toml("[\"my proto\"]\n").unwrap();
    assert!(bad_name.clients().is_err());
    assert!(PolyglotConfig::from_toml("xmpp = 1\n").is_err());
}

#[test]
fn the_polyglot_table_parses_inside_a_larger_config() {
    #[derive(serde::Deserialize)]
    struct Config {
        #[serde(default)]
        polyglot: PolyglotConfig,
        #[serde(default)]
        commands: CommandConfig,
    }
    let config: Config = toml::from_str(
        "[polyglot.xmpp]\nserver = \"127.0.0.1:5222\"\n[commands]\ndefault_ttl_ms = 5000\n",
    )
    .unwrap();
    assert!(config.polyglot.section("mqtt").is_some());
    assert_eq!(
        config.polyglot.section("xmpp").unwrap()["server"].as_str(),
        Some("127.0.0.1:5222")
    );
    assert_eq!(config.commands.default_ttl_ms, Some(5000));
    assert_eq!(config.commands.max_wait_ms, 60_000);
    let absent: Config = toml::from_str("").unwrap();
    assert_eq!(absent.polyglot, PolyglotConfig::default());
    assert_eq!(absent.commands, CommandConfig::default());
}

#[test]
fn command_config_refuses_unknown_and_unusable_values() {
    assert!(toml::from_str::<CommandConfig>("max_wait = 1\n").is_err());
    let zero: CommandConfig = toml::from_str("expiry_check_ms = 0\n").unwrap();
    assert!(zero.validate().is_err());
    assert!(CommandConfig::default().validate().is_ok());
}
