//! Test doubles (a fake broker, and the test kit's in-memory store) and a fixture running a hub
//! manager on them.
#![allow(dead_code)]

pub(crate) mod bus;

use std::sync::Arc;
use std::time::Duration;

use polyhub_hub::{HubConfig, HubManager, ManagerDeps, ProcessParserCommand};
use polyhub_store::{DesiredState, HubSettings, NewDevice, NewGroup, NewHub, Store};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub(crate) use self::bus::FakeBus;
pub(crate) use polyhub_testkit::store::{MemoryStore, WriteFault};

/// Small batches and quick restarts, so tests run fast.
pub(crate) fn fast_config() -> HubConfig {
    HubConfig {
        batch_max_delay_ms: 5,
        restart_backoff_initial_ms: 20,
        restart_backoff_max_ms: 200,
        ..HubConfig::default()
    }
}

/// Polls `condition` until it holds; fails the test after 10 s.
pub(crate) async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Creates group `g` if needed and a hub in it.
pub(crate) async fn add_hub(
    store: &MemoryStore,
    hub_id: &str,
    settings: HubSettings,
    desired_state: DesiredState,
) {
    if store.get_group("g").await.is_err() {
        store
            .create_group(NewGroup {
                id: "g".into(),
                name: None,
                metadata: None,
            })
            .await
            .unwrap();
    }
    store
        .create_hub(NewHub {
            id: hub_id.into(),
            group_id: "g".into(),
            name: None,
            metadata: None,
            settings,
            desired_state,
        })
        .await
        .unwrap();
}

pub(crate) async fn add_device(store: &MemoryStore, hub_id: &str, device_id: &str) {
    store
        .create_device(NewDevice {
            id: device_id.into(),
            hub_id: hub_id.into(),
            name: None,
            protocol: None,
            metadata: None,
        })
        .await
        .unwrap();
}

/// A running hub manager over the fakes.
pub(crate) struct Fixture {
    pub(crate) store: Arc<MemoryStore>,
    pub(crate) bus: FakeBus,
    pub(crate) manager: HubManager,
    pub(crate) task: JoinHandle<()>,
    pub(crate) shutdown: CancellationToken,
    /// Devices the manager announced as added through a register channel.
    pub(crate) registered: mpsc::UnboundedReceiver<polyhub_store::Device>,
}

impl Fixture {
    pub(crate) async fn start(store: Arc<MemoryStore>, config: HubConfig) -> Fixture {
        Self::start_with(store, FakeBus::new(), config, None, None).await
    }

    pub(crate) async fn start_with(
        store: Arc<MemoryStore>,
        bus: FakeBus,
        config: HubConfig,
        presence: Option<mpsc::Receiver<polyhub_hub::bus::PresenceEvent>>,
        process_parser: Option<ProcessParserCommand>,
    ) -> Fixture {
        let shutdown = CancellationToken::new();
        let (registrations, registered) = mpsc::unbounded_channel();
        let deps = ManagerDeps {
            store: store.clone(),
            bus: Arc::new(bus.clone()),
            presence,
            process_parser,
            registrations: Some(registrations),
        };
        let (manager, task) = HubManager::start(config, deps, shutdown.clone())
            .await
            .unwrap();
        Fixture {
            store,
            bus,
            manager,
            task,
            shutdown,
            registered,
        }
    }

    /// Waits until the hub's parser reports running.
    pub(crate) async fn wait_running(&self, hub_id: &str) {
        wait_until(&format!("parser of {hub_id} running"), || {
            self.manager
                .status(hub_id)
                .is_some_and(|status| status.state == polyhub_store::ParserState::Running)
        })
        .await;
    }

    /// Shuts the manager down and waits for it (bounded).
    pub(crate) async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("manager shutdown timed out")
            .unwrap();
    }
}
