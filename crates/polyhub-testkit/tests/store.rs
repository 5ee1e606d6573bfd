//! The kit's `MemoryStore` where neither the API's nor the hub's tests reach: both ways to
//! inject failures, seq dedupe and pruning, presence as SQLite keeps it, rows per hub, and
//! the count of command writes. How it keeps commands is not tested here: polyhub-store's
//! tests/commands.rs runs one suite on this store and on SQLite's.

use polyhub_store::{
    CommandState, CommandTransition, DesiredState, HubSettings, IngestBatch, IngestedMessage,
    NewCommandRecord, NewDevice, NewGroup, NewHub, Store, StoreError, TelemetryRow, Value,
};
use polyhub_testkit::store::{MemoryStore, WriteFault};

async fn with_devices(devices: &[(&str, &str)]) -> MemoryStore {
    let store = MemoryStore::new();
    store
        .create_group(NewGroup {
            id: "g".into(),
            name: None,
            metadata: None,
        })
        .await
        .unwrap();
    for (hub, device) in devices {
        if store.get_hub(hub).await.is_err() {
            store
                .create_hub(NewHub {
                    id: (*hub).into(),
                    group_id: "g".into(),
                    name: None,
                    metadata: None,
                    settings: HubSettings::default(),
                    desired_state: DesiredState::Running,
                })
                .await
                .unwrap();
        }
        store
            .create_device(NewDevice {
                id: (*device).into(),
                hub_id: (*hub).into(),
                name: None,
                protocol: None,
                metadata: None,
            })
            .await
            .unwrap();
    }
    store
}

fn message(seq: u64, device: &str, received_at: i64) -> IngestedMessage {
    IngestedMessage {
        seq: Some(seq),
        device_id: Some(device.into()),
        received_at,
        rows: vec![TelemetryRow {
            device_id: device.into(),
            signal: "t".into(),
            ts: received_at,
            value: Value::Number(1.0),
        }],
        dead_letter: None,
    }
}

fn batch(hub: &str, messages: Vec<IngestedMessage>) -> IngestBatch {
    IngestBatch {
        hub_id: hub.into(),
        messages,
    }
}

#[tokio::test]
async fn down_fails_every_call_but_not_inspection() {
    let store = with_devices(&[("h1", "d1")]).await;
    store.add_row("d1", "t", 1, Value::Number(1.0));
    store.set_down(true);
    assert!(matches!(
        store.get_device("d1").await,
        Err(StoreError::Unavailable(_))
    ));
    assert!(matches!(
        store
            .write_batch(batch("h1", vec![message(1, "d1", 5)]))
            .await,
        Err(StoreError::Unavailable(_))
    ));
    assert_eq!(store.row_count(), 1);
    store.set_down(false);
    assert_eq!(store.get_device("d1").await.unwrap().id, "d1");
}

#[tokio::test]
async fn faults_hit_one_hub_and_commit_then_fail_fires_once() {
    let store = with_devices(&[("h1", "d1"), ("h2", "d2")]).await;
    store.set_fault("h1", Some(WriteFault::Fail));
    assert!(
        store
            .write_batch(batch("h1", vec![message(1, "d1", 5)]))
            .await
            .is_err()
    );
    store
        .write_batch(batch("h2", vec![message(1, "d2", 5)]))
        .await
        .unwrap();
    assert_eq!((store.rows("d1").len(), store.rows("d2").len()), (0, 1));

    store.set_fault("h1", Some(WriteFault::FailAfterCommitOnce));
    assert!(
        store
            .write_batch(batch("h1", vec![message(1, "d1", 5)]))
            .await
            .is_err()
    );
    assert_eq!(store.rows("d1").len(), 1, "committed before failing");
    // The redelivery is recognised by its seq, and the fault is gone.
    let outcome = store
        .write_batch(batch("h1", vec![message(1, "d1", 5)]))
        .await
        .unwrap();
    assert_eq!((outcome.rows_written, outcome.duplicates_skipped), (0, 1));
    assert_eq!(store.duplicates(), 1);
    assert_eq!(store.prune_seqs("h1", 6).await.unwrap(), 1);
    assert_eq!(store.prune_seqs("h2", 5).await.unwrap(), 0);
}

#[tokio::test]
async fn presence_and_rows_follow_the_registry() {
    let store = with_devices(&[("h1", "d1"), ("h2", "d2")]).await;
    store
        .write_batch(batch(
            "h1",
            vec![
                message(1, "d1", 50),
                message(2, "ghost", 60),
                message(3, "d1", 40),
            ],
        ))
        .await
        .unwrap();
    assert_eq!(store.presence("d1").unwrap().last_seen, Some(50));
    assert!(
        store.presence("ghost").is_none(),
        "unregistered: no presence"
    );
    assert_eq!(store.count_rows(Some("h1")).await.unwrap(), 2);
    assert_eq!(store.count_rows(Some("h2")).await.unwrap(), 0);
    assert_eq!(store.count_rows(None).await.unwrap(), 3);

    store.set_presence("d1", true, 100).await.unwrap();
    store.set_presence("d1", true, 90).await.unwrap();
    let presence = store.get_presence("d1").await.unwrap();
    assert_eq!(
        (presence.online, presence.changed_at, presence.last_seen),
        (true, Some(100), Some(100))
    );
    store.set_presence("d1", false, 200).await.unwrap();
    assert_eq!(store.presence("d1").unwrap().changed_at, Some(200));
    let never = store.get_presence("d2").await.unwrap();
    assert_eq!((never.online, never.last_seen), (false, None));
    assert!(matches!(
        store.set_presence("ghost", true, 1).await,
        Err(StoreError::NotFound(_))
    ));
}

/// Command `id` for device d1 of hub h1, created at 1 and never expiring.
fn command_record(id: &str) -> NewCommandRecord {
    NewCommandRecord {
        id: id.into(),
        device_id: "d1".into(),
        hub_id: "h1".into(),
        protocol: "mqtt".into(),
        name: "open".into(),
        payload: serde_json::json!({}),
        created_at: 1,
        expires_at: None,
    }
}

fn transition(id: &str, from: CommandState, to: CommandState, at: i64) -> CommandTransition {
    CommandTransition {
        id: id.into(),
        from: vec![from],
        to,
        at,
        reason: None,
        reply: None,
    }
}

/// `command_writes` is how the command service's tests see that steps were stored together:
/// one per transition call that changed a command, however many steps it carried.
#[tokio::test]
async fn command_writes_count_successful_transition_calls_not_steps() {
    let store = with_devices(&[("h1", "d1")]).await;
    for id in ["c1", "c2"] {
        store.create_command(command_record(id)).await.unwrap();
    }
    assert_eq!(store.command_writes(), 0, "creating is not a transition");
    store
        .transition_command_steps(vec![
            transition("c1", CommandState::Queued, CommandState::Delivered, 5),
            transition("c1", CommandState::Delivered, CommandState::Acknowledged, 9),
        ])
        .await
        .unwrap();
    assert_eq!(store.command_writes(), 1, "two steps, one write");
    store
        .transition_command(transition(
            "c2",
            CommandState::Queued,
            CommandState::Sent,
            5,
        ))
        .await
        .unwrap();
    assert_eq!(store.command_writes(), 2);

    // Refused steps (the second is not from `sent`), an unknown command, an outage.
    let refused = store
        .transition_command_steps(vec![
            transition("c2", CommandState::Sent, CommandState::Delivered, 6),
            transition("c2", CommandState::Sent, CommandState::Acknowledged, 7),
        ])
        .await;
    assert!(
        matches!(refused, Err(StoreError::Conflict(_))),
        "{refused:?}"
    );
    let unknown = store
        .transition_command(transition(
            "c9",
            CommandState::Queued,
            CommandState::Sent,
            6,
        ))
        .await;
    assert!(
        matches!(unknown, Err(StoreError::NotFound(_))),
        "{unknown:?}"
    );
    store.set_down(true);
    let down = store
        .transition_command(transition(
            "c2",
            CommandState::Sent,
            CommandState::Delivered,
            6,
        ))
        .await;
    assert!(matches!(down, Err(StoreError::Unavailable(_))), "{down:?}");
    store.set_down(false);
    assert_eq!(store.command_writes(), 2, "a failed call is not counted");
}
