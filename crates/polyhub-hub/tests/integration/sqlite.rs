//! The hub against the real embedded store (SQLite in a temporary folder).

use std::sync::Arc;
use std::time::Duration;

use polyhub_hub::bus::PresenceEvent;
use polyhub_hub::{HubManager, ManagerDeps};
use polyhub_store::{
    Decoder, DesiredState, HubSettings, ListQuery, NewDevice, NewGroup, NewHub, ParserEventKind,
    RangeQuery, SqliteConfig, SqliteStore, Store, Value,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::support::*;

/// Polls an async condition until it holds; fails after 10 s.
async fn eventually<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn sqlite_ingest_is_exact_across_a_crash_between_commit_and_ack() {
    let folder = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(folder.path(), &SqliteConfig::default()).unwrap());
    store
        .create_group(NewGroup {
            id: "g".into(),
            name: None,
            metadata: None,
        })
        .await
        .unwrap();
    let settings = HubSettings {
        decoder: Decoder::Json,
        ..HubSettings::default()
    };
    store
        .create_hub(NewHub {
            id: "h1".into(),
            group_id: "g".into(),
            name: None,
            metadata: None,
            settings,
            desired_state: DesiredState::Running,
        })
        .await
        .unwrap();
    store
        .create_device(NewDevice {
            id: "d1".into(),
            hub_id: "h1".into(),
            name: None,
            protocol: None,
            metadata: None,
        })
        .await
        .unwrap();

    let bus = FakeBus::new();
    let (presence, presence_events) = mpsc::channel(8);
    let shutdown = CancellationToken::new();
    let deps = ManagerDeps {
        store: store.clone(),
        bus: Arc::new(bus.clone()),
        presence: Some(presence_events),
        process_parser: None,
        registrations: None,
    };
    let (manager, task) = HubManager::start(fast_config(), deps, shutdown.clone())
        .await
        .unwrap();
    wait_until("running", || {
        manager
            .status("h1")
            .is_some_and(|status| status.state == polyhub_store::ParserState::Running)
    })
    .await;

    bus.publish("/h1/register_cmd", r#"{"action":"add","device":"d2"}"#);
    let replies = bus.wait_published("/h1/register_reply", 1).await;
    let reply: serde_json::Value = serde_json::from_slice(&replies[0].payload).unwrap();
    assert_eq!(reply["status"], "accepted", "{reply}");
    assert_eq!(store.get_device("d2").await.unwrap().hub_id, "h1");

    // The first commit succeeds but its acknowledgement is lost: everything is redelivered.
    bus.fail_next_ack("polyhub-parser-h1");
    for value in 0..3 {
        bus.publish("/h1/d1/data", format!(r#"{{"t":{value}}}"#));
    }
    bus.publish("/h1/d2/data", "[1,2]");
    bus.publish("/h1/d2/data", "{broken");
    eventually("restart and full acknowledgement", || async {
        manager
            .status("h1")
            .is_some_and(|status| status.restarts >= 1)
            && bus.unacknowledged("polyhub-parser-h1") == 0
            && store.count_rows(Some("h1")).await.unwrap() == 3
    })
    .await;
    let rows = store
        .range(RangeQuery {
            device_id: "d1".into(),
            limit: 100,
            ..RangeQuery::default()
        })
        .await
        .unwrap()
        .rows;
    let mut values: Vec<String> = rows.iter().map(|row| row.value.to_string()).collect();
    values.sort();
    assert_eq!(values, ["0", "1", "2"]);
    assert_eq!(store.latest("d1").await.unwrap()[0].signal, "t");
    assert!(matches!(
        store.latest("d1").await.unwrap()[0].value,
        Value::Number(_)
    ));
    let dead = store
        .list_dead_letters(Some("h1"), None, 100)
        .await
        .unwrap();
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert!(manager.status("h1").unwrap().duplicates_skipped >= 1);
    let events = store.list_parser_events(Some("h1"), 100).await.unwrap();
    assert!(
        events
            .iter()
            .any(|event| event.kind == ParserEventKind::Failed)
    );

    presence
        .send(PresenceEvent {
            client_id: "d1".into(),
            online: true,
            at: polyhub_store::now_millis(),
        })
        .await
        .unwrap();
    eventually("presence", || async {
        store
            .get_presence("d1")
            .await
            .is_ok_and(|presence| presence.online)
    })
    .await;

    // Stop persists; the hub's devices stay listed.
    manager.stop_hub("h1").await.unwrap();
    assert_eq!(
        store.get_hub("h1").await.unwrap().desired_state,
        DesiredState::Stopped
    );
    let devices = store
        .list_devices(ListQuery {
            parent: Some("h1".into()),
            ..ListQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(devices.len(), 2);
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap();
}
