//! Commands through the `Store` trait, one suite for every store: creation and per-device
//! order, compare-and-set transitions and step lists, listing and paging, unfinished commands,
//! commands of a deleted device. Each scenario runs twice, on the SQLite store
//! (`sqlite::<scenario>`) and on the kit's in-memory `MemoryStore` (`memory::<scenario>`) that
//! the other crates' tests stand on, so the two cannot drift apart unnoticed. A few tests
//! below are about SQLite alone (restart reload, two store instances on one file, schema
//! upgrade).

use std::sync::Arc;

use polyhub_store::*;
use polyhub_testkit::store::MemoryStore;
use serde_json::json;
use tempfile::TempDir;

use CommandState::*;

/// Runs each scenario (an `async fn(Arc<dyn Store>)` below) as two tests, `sqlite::<scenario>`
/// and `memory::<scenario>`, each on a fresh store from [`add_devices`]: a failure names the
/// store it happened on, and one store failing does not hide how the other does. Arguments
/// in parentheses after a scenario go to `#[tokio::test]`.
macro_rules! on_both_stores {
    ($($scenario:ident $(($($test_args:tt)*))?),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test $(($($test_args)*))?]
                async fn $scenario() {
                    let (_dir, store) = super::store_with_devices().await;
                    super::$scenario(std::sync::Arc::new(store)).await;
                }
            )*
        }
        mod memory {
            $(
                #[tokio::test $(($($test_args)*))?]
                async fn $scenario() {
                    let store = super::MemoryStore::new();
                    super::add_devices(&store).await;
                    super::$scenario(std::sync::Arc::new(store)).await;
                }
            )*
        }
    };
}

on_both_stores! {
    a_new_command_is_queued_with_every_field_stored,
    payloads_of_every_json_kind_round_trip,
    seq_counts_per_device,
    concurrent_creations_get_distinct_consecutive_seqs,
    creating_for_a_missing_device_is_not_found,
    a_duplicate_id_is_a_conflict_and_changes_nothing,
    invalid_new_commands_are_refused,
    unknown_and_invalid_ids_when_reading,
    the_full_lifecycle_timestamps_each_step,
    queued_to_delivered_records_the_send_in_the_same_step,
    steps_written_together_apply_in_order_all_or_none,
    an_acknowledgement_fills_a_missing_delivery_time_only,
    final_states_set_finished_at_and_keep_reason_and_reply,
    a_transition_from_an_unexpected_state_is_a_conflict_naming_it,
    a_final_state_never_changes_even_if_from_lists_it,
    sending_again_counts_attempts_and_moves_sent_at,
    back_to_queued_keeps_the_timestamps,
    a_later_transition_without_reason_keeps_the_earlier_one,
    racing_transitions_in_one_process_have_exactly_one_winner(
        flavor = "multi_thread",
        worker_threads = 2
    ),
    a_device_list_is_in_seq_order_newest_first_by_default,
    a_list_of_all_devices_is_in_creation_order_with_ids_breaking_ties,
    lists_filter_by_state,
    paging_after_an_id_continues_in_the_chosen_order,
    paging_after_an_unknown_or_foreign_id_is_invalid,
    limit_zero_means_a_hundred_and_large_limits_are_capped,
    unfinished_commands_are_ordered_by_device_then_seq,
    commands_of_a_deleted_device_stay_readable,
}

fn open(dir: &TempDir) -> SqliteStore {
    SqliteStore::open(dir.path(), &SqliteConfig::default()).expect("open store")
}

/// Adds group `g1`, hub `h1` and devices `d1`, `d2` (`d2` speaks xmpp) to an empty store.
async fn add_devices(store: &dyn Store) {
    store
        .create_group(NewGroup {
            id: "g1".to_owned(),
            name: None,
            metadata: None,
        })
        .await
        .unwrap();
    store
        .create_hub(NewHub {
            id: "h1".to_owned(),
            group_id: "g1".to_owned(),
            name: None,
            metadata: None,
            settings: HubSettings::default(),
            desired_state: DesiredState::default(),
        })
        .await
        .unwrap();
    for (id, protocol) in [("d1", "mqtt"), ("d2", "xmpp")] {
        store
            .create_device(NewDevice {
                id: id.to_owned(),
                hub_id: "h1".to_owned(),
                name: None,
                protocol: Some(protocol.to_owned()),
                metadata: None,
            })
            .await
            .unwrap();
    }
}

/// A SQLite store in a fresh folder, with the devices of [`add_devices`].
async fn store_with_devices() -> (TempDir, SqliteStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    add_devices(&store).await;
    (dir, store)
}

fn record(id: &str, device: &str, created_at: Millis) -> NewCommandRecord {
    NewCommandRecord {
        id: id.to_owned(),
        device_id: device.to_owned(),
        hub_id: "h1".to_owned(),
        protocol: "mqtt".to_owned(),
        name: "set".to_owned(),
        payload: json!({"level": 3}),
        created_at,
        expires_at: Some(created_at + 30_000),
    }
}

fn change(id: &str, from: &[CommandState], to: CommandState, at: Millis) -> CommandTransition {
    CommandTransition {
        id: id.to_owned(),
        from: from.to_vec(),
        to,
        at,
        reason: None,
        reply: None,
    }
}

fn ids(commands: &[Command]) -> Vec<&str> {
    commands.iter().map(|command| command.id.as_str()).collect()
}

fn query(device: Option<&str>) -> CommandQuery {
    CommandQuery {
        device_id: device.map(str::to_owned),
        ..CommandQuery::default()
    }
}

async fn a_new_command_is_queued_with_every_field_stored(store: Arc<dyn Store>) {
    let mut new = record("cmd-1", "d1", 1_000);
    new.payload = json!({"nested": [1, "two", null], "on": true});
    let created = store.create_command(new.clone()).await.unwrap();
    let expected = Command {
        id: "cmd-1".to_owned(),
        device_id: "d1".to_owned(),
        hub_id: "h1".to_owned(),
        protocol: "mqtt".to_owned(),
        name: "set".to_owned(),
        payload: new.payload,
        seq: 1,
        state: Queued,
        created_at: 1_000,
        expires_at: Some(31_000),
        sent_at: None,
        delivered_at: None,
        acknowledged_at: None,
        finished_at: None,
        reason: None,
        reply: None,
        attempts: 0,
    };
    assert_eq!(created, expected);
    assert_eq!(store.get_command("cmd-1").await.unwrap(), expected);
}

async fn payloads_of_every_json_kind_round_trip(store: Arc<dyn Store>) {
    let payloads = [
        json!(null),
        json!("on"),
        json!(42),
        json!(-1.5),
        json!(false),
        json!([1, 2]),
        json!({"a": {"b": "ünïcode"}}),
    ];
    for (n, payload) in payloads.iter().enumerate() {
        let mut new = record(&format!("cmd-{n}"), "d1", 1);
        new.payload = payload.clone();
        new.expires_at = None;
        store.create_command(new).await.unwrap();
        let stored = store.get_command(&format!("cmd-{n}")).await.unwrap();
        assert_eq!(&stored.payload, payload);
        assert_eq!(stored.expires_at, None);
    }
}

async fn seq_counts_per_device(store: Arc<dyn Store>) {
    let mut seqs = Vec::new();
    for (id, device) in [
        ("c1", "d1"),
        ("c2", "d2"),
        ("c3", "d1"),
        ("c4", "d1"),
        ("c5", "d2"),
    ] {
        seqs.push(
            store
                .create_command(record(id, device, 1))
                .await
                .unwrap()
                .seq,
        );
    }
    assert_eq!(seqs, vec![1, 1, 2, 3, 2]);
}

async fn concurrent_creations_get_distinct_consecutive_seqs(store: Arc<dyn Store>) {
    let tasks: Vec<_> = (0..8)
        .map(|n| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .create_command(record(&format!("c{n}"), "d1", n))
                    .await
            })
        })
        .collect();
    let mut seqs = Vec::new();
    for task in tasks {
        seqs.push(task.await.unwrap().unwrap().seq);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=8).collect::<Vec<i64>>());
}

async fn creating_for_a_missing_device_is_not_found(store: Arc<dyn Store>) {
    match store.create_command(record("c1", "ghost", 1)).await {
        Err(StoreError::NotFound(message)) => assert!(message.contains("ghost"), "{message}"),
        other => panic!("expected NotFound, got {other:?}"),
    }
}

async fn a_duplicate_id_is_a_conflict_and_changes_nothing(store: Arc<dyn Store>) {
    store.create_command(record("c1", "d1", 1)).await.unwrap();
    let mut again = record("c1", "d2", 2);
    again.name = "other".to_owned();
    match store.create_command(again).await {
        Err(StoreError::Conflict(message)) => assert!(message.contains("c1"), "{message}"),
        other => panic!("expected Conflict, got {other:?}"),
    }
    let stored = store.get_command("c1").await.unwrap();
    assert_eq!(
        (stored.device_id.as_str(), stored.name.as_str()),
        ("d1", "set")
    );
    // The failed attempt did not use up a position of d2.
    assert_eq!(
        store
            .create_command(record("c2", "d2", 3))
            .await
            .unwrap()
            .seq,
        1
    );
}

async fn invalid_new_commands_are_refused(store: Arc<dyn Store>) {
    let cases: Vec<(&str, NewCommandRecord)> = vec![
        ("empty id", record("", "d1", 1)),
        ("id with a slash", record("cmd/1", "d1", 1)),
        ("too long id", record(&"c".repeat(65), "d1", 1)),
        ("bad device id", record("c1", "d 1", 1)),
        (
            "empty name",
            NewCommandRecord {
                name: String::new(),
                ..record("c1", "d1", 1)
            },
        ),
        (
            "long name",
            NewCommandRecord {
                name: "n".repeat(129),
                ..record("c1", "d1", 1)
            },
        ),
        (
            "empty protocol",
            NewCommandRecord {
                protocol: String::new(),
                ..record("c1", "d1", 1)
            },
        ),
        (
            "wrong hub",
            NewCommandRecord {
                hub_id: "h2".to_owned(),
                ..record("c1", "d1", 1)
            },
        ),
        (
            "payload too large",
            NewCommandRecord {
                payload: json!("x".repeat(MAX_COMMAND_PAYLOAD)),
                ..record("c1", "d1", 1)
            },
        ),
    ];
    for (what, new) in cases {
        match store.create_command(new).await {
            Err(StoreError::Invalid(_)) => {}
            other => panic!("{what}: expected Invalid, got {other:?}"),
        }
    }
    // A 128-byte name and a payload just at the limit are fine.
    let name = "n".repeat(128);
    let payload = json!("x".repeat(MAX_COMMAND_PAYLOAD - 2));
    let created = store
        .create_command(NewCommandRecord {
            name: name.clone(),
            payload: payload.clone(),
            ..record("c1", "d1", 1)
        })
        .await
        .unwrap();
    assert_eq!((created.name, created.payload), (name, payload));
    assert!(
        store
            .list_commands(query(Some("d2")))
            .await
            .unwrap()
            .is_empty()
    );
}

async fn unknown_and_invalid_ids_when_reading(store: Arc<dyn Store>) {
    assert!(matches!(
        store.get_command("nope").await,
        Err(StoreError::NotFound(message)) if message.contains("nope")
    ));
    assert!(matches!(
        store.get_command("../x").await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        store
            .transition_command(change("nope", &[Queued], Sent, 1))
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        store
            .transition_command(change("a b", &[Queued], Sent, 1))
            .await,
        Err(StoreError::Invalid(_))
    ));
}

async fn the_full_lifecycle_timestamps_each_step(store: Arc<dyn Store>) {
    store
        .create_command(record("c1", "d1", 1_000))
        .await
        .unwrap();
    let sent = store
        .transition_command(change("c1", &[Queued], Sent, 1_100))
        .await
        .unwrap();
    assert_eq!(
        (sent.state, sent.sent_at, sent.attempts),
        (Sent, Some(1_100), 1)
    );
    let delivered = store
        .transition_command(change("c1", &[Sent], Delivered, 1_200))
        .await
        .unwrap();
    assert_eq!(
        (delivered.state, delivered.delivered_at),
        (Delivered, Some(1_200))
    );
    let acknowledged = store
        .transition_command(CommandTransition {
            reply: Some(json!({"level": 3, "ok": true})),
            ..change("c1", &[Sent, Delivered], Acknowledged, 1_300)
        })
        .await
        .unwrap();
    assert_eq!(acknowledged.state, Acknowledged);
    assert_eq!(acknowledged.acknowledged_at, Some(1_300));
    assert_eq!(acknowledged.reply, Some(json!({"level": 3, "ok": true})));
    // Earlier steps keep their times; no finish time for a success.
    assert_eq!(
        (
            acknowledged.sent_at,
            acknowledged.delivered_at,
            acknowledged.finished_at,
            acknowledged.attempts
        ),
        (Some(1_100), Some(1_200), None, 1)
    );
    assert_eq!(store.get_command("c1").await.unwrap(), acknowledged);
}

/// A send that the transport confirmed at once is one step, `queued` → `delivered`, recorded
/// as a send too; `sent` → `delivered` (a receipt) is not a send.
async fn queued_to_delivered_records_the_send_in_the_same_step(store: Arc<dyn Store>) {
    store
        .create_command(record("c1", "d1", 1_000))
        .await
        .unwrap();
    let delivered = store
        .transition_command(change("c1", &[Queued], Delivered, 1_100))
        .await
        .unwrap();
    assert_eq!(
        (
            delivered.state,
            delivered.sent_at,
            delivered.delivered_at,
            delivered.attempts
        ),
        (Delivered, Some(1_100), Some(1_100), 1)
    );
    store
        .create_command(record("c2", "d1", 1_000))
        .await
        .unwrap();
    store
        .transition_command(change("c2", &[Queued], Sent, 1_100))
        .await
        .unwrap();
    let received = store
        .transition_command(change("c2", &[Sent], Delivered, 1_200))
        .await
        .unwrap();
    assert_eq!(
        (received.sent_at, received.delivered_at, received.attempts),
        (Some(1_100), Some(1_200), 1)
    );
}

/// Steps written together (a delivery with the answer right after it) are recorded as if
/// written one by one, in one write: all of them or none.
async fn steps_written_together_apply_in_order_all_or_none(store: Arc<dyn Store>) {
    store
        .create_command(record("c1", "d1", 1_000))
        .await
        .unwrap();
    let mut acknowledged = change("c1", &[Queued, Sent, Delivered], Acknowledged, 1_300);
    acknowledged.reply = Some(json!({"ok": true}));
    let answered = store
        .transition_command_steps(vec![
            change("c1", &[Queued], Sent, 1_100),
            change("c1", &[Sent], Delivered, 1_200),
            acknowledged,
        ])
        .await
        .unwrap();
    assert_eq!(
        (
            answered.state,
            answered.sent_at,
            answered.delivered_at,
            answered.acknowledged_at,
            answered.attempts,
            answered.reply.clone()
        ),
        (
            Acknowledged,
            Some(1_100),
            Some(1_200),
            Some(1_300),
            1,
            Some(json!({"ok": true}))
        )
    );
    assert_eq!(store.get_command("c1").await.unwrap(), answered);

    // The last step is refused: the first is not kept either.
    store
        .create_command(record("c2", "d1", 1_000))
        .await
        .unwrap();
    let refused = store
        .transition_command_steps(vec![
            change("c2", &[Queued], Delivered, 1_100),
            change("c2", &[Sent], Acknowledged, 1_200),
        ])
        .await;
    assert!(
        matches!(refused, Err(StoreError::Conflict(_))),
        "{refused:?}"
    );
    let untouched = store.get_command("c2").await.unwrap();
    assert_eq!(
        (untouched.state, untouched.sent_at, untouched.attempts),
        (Queued, None, 0)
    );

    // Steps of two commands, or none at all, are not one command's steps.
    for steps in [
        vec![
            change("c2", &[Queued], Sent, 1_100),
            change("c1", &[Acknowledged], Failed, 1_200),
        ],
        Vec::new(),
    ] {
        let result = store.transition_command_steps(steps).await;
        assert!(matches!(result, Err(StoreError::Invalid(_))), "{result:?}");
    }
    assert_eq!(store.get_command("c2").await.unwrap().state, Queued);
}

/// A reply can overtake the transport's confirmation (an XMPP receipt sent after the reply, a
/// reply to a command still `sent`): the answer proves delivery, so `delivered_at` is filled,
/// and an earlier confirmation keeps its own time.
async fn an_acknowledgement_fills_a_missing_delivery_time_only(store: Arc<dyn Store>) {
    store
        .create_command(record("c1", "d1", 1_000))
        .await
        .unwrap();
    store
        .create_command(record("c2", "d1", 1_000))
        .await
        .unwrap();
    for id in ["c1", "c2"] {
        store
            .transition_command(change(id, &[Queued], Sent, 1_100))
            .await
            .unwrap();
    }
    let overtaken = store
        .transition_command(change("c1", &[Sent, Delivered], Acknowledged, 1_300))
        .await
        .unwrap();
    assert_eq!(
        (overtaken.delivered_at, overtaken.acknowledged_at),
        (Some(1_300), Some(1_300))
    );
    store
        .transition_command(change("c2", &[Sent], Delivered, 1_200))
        .await
        .unwrap();
    let in_order = store
        .transition_command(change("c2", &[Sent, Delivered], Acknowledged, 1_300))
        .await
        .unwrap();
    assert_eq!(
        (in_order.delivered_at, in_order.acknowledged_at),
        (Some(1_200), Some(1_300))
    );
    // Other final states do not claim a delivery.
    store
        .create_command(record("c3", "d1", 1_000))
        .await
        .unwrap();
    store
        .transition_command(change("c3", &[Queued], Sent, 1_100))
        .await
        .unwrap();
    let failed = store
        .transition_command(change("c3", &[Sent], Failed, 1_300))
        .await
        .unwrap();
    assert_eq!(failed.delivered_at, None);
}

async fn final_states_set_finished_at_and_keep_reason_and_reply(store: Arc<dyn Store>) {
    for (id, to) in [("c1", Expired), ("c2", Failed), ("c3", Cancelled)] {
        store.create_command(record(id, "d1", 1)).await.unwrap();
        let finished = store
            .transition_command(CommandTransition {
                reason: Some(format!("{id} went wrong")),
                reply: (to == Failed).then(|| json!({"code": 7})),
                ..change(id, &[Queued, Sent, Delivered], to, 50)
            })
            .await
            .unwrap();
        assert_eq!(finished.state, to);
        assert_eq!(finished.finished_at, Some(50));
        assert_eq!(
            finished.reason.as_deref(),
            Some(format!("{id} went wrong").as_str())
        );
        assert_eq!(finished.reply, (to == Failed).then(|| json!({"code": 7})));
        assert_eq!((finished.sent_at, finished.attempts), (None, 0));
    }
}

async fn a_transition_from_an_unexpected_state_is_a_conflict_naming_it(store: Arc<dyn Store>) {
    store.create_command(record("c1", "d1", 1)).await.unwrap();
    match store
        .transition_command(change("c1", &[Sent, Delivered], Acknowledged, 2))
        .await
    {
        Err(StoreError::Conflict(message)) => {
            assert!(message.contains("queued"), "{message}");
            assert!(message.contains("c1"), "{message}");
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    assert!(matches!(
        store.transition_command(change("c1", &[], Sent, 2)).await,
        Err(StoreError::Conflict(_))
    ));
    let unchanged = store.get_command("c1").await.unwrap();
    assert_eq!((unchanged.state, unchanged.acknowledged_at), (Queued, None));
}

async fn a_final_state_never_changes_even_if_from_lists_it(store: Arc<dyn Store>) {
    store.create_command(record("c1", "d1", 1)).await.unwrap();
    store
        .transition_command(change("c1", &[Queued], Cancelled, 2))
        .await
        .unwrap();
    for to in [Queued, Sent, Acknowledged, Failed, Cancelled] {
        match store
            .transition_command(change("c1", &[Cancelled, Queued, Sent], to, 3))
            .await
        {
            Err(StoreError::Conflict(message)) => {
                assert!(message.contains("cancelled"), "{message}")
            }
            other => panic!("to {to:?}: expected Conflict, got {other:?}"),
        }
    }
    let stored = store.get_command("c1").await.unwrap();
    assert_eq!((stored.state, stored.finished_at), (Cancelled, Some(2)));
}

async fn sending_again_counts_attempts_and_moves_sent_at(store: Arc<dyn Store>) {
    store.create_command(record("c1", "d1", 1)).await.unwrap();
    store
        .transition_command(change("c1", &[Queued], Sent, 10))
        .await
        .unwrap();
    store
        .transition_command(change("c1", &[Sent], Delivered, 11))
        .await
        .unwrap();
    // After a restart, a delivered (unacknowledged) command goes out again.
    let resent = store
        .transition_command(change("c1", &[Sent, Delivered], Sent, 20))
        .await
        .unwrap();
    assert_eq!(
        (resent.state, resent.sent_at, resent.attempts),
        (Sent, Some(20), 2)
    );
    let resent = store
        .transition_command(change("c1", &[Sent, Delivered], Sent, 30))
        .await
        .unwrap();
    assert_eq!((resent.sent_at, resent.attempts), (Some(30), 3));
    // Delivered earlier stays recorded; other transitions do not count attempts.
    assert_eq!(resent.delivered_at, Some(11));
    let delivered = store
        .transition_command(change("c1", &[Sent], Delivered, 31))
        .await
        .unwrap();
    assert_eq!((delivered.delivered_at, delivered.attempts), (Some(31), 3));
}

async fn back_to_queued_keeps_the_timestamps(store: Arc<dyn Store>) {
    store.create_command(record("c1", "d1", 1)).await.unwrap();
    store
        .transition_command(change("c1", &[Queued], Sent, 10))
        .await
        .unwrap();
    let requeued = store
        .transition_command(change("c1", &[Sent], Queued, 11))
        .await
        .unwrap();
    assert_eq!(
        (requeued.state, requeued.sent_at, requeued.attempts),
        (Queued, Some(10), 1)
    );
}

async fn a_later_transition_without_reason_keeps_the_earlier_one(store: Arc<dyn Store>) {
    store.create_command(record("c1", "d1", 1)).await.unwrap();
    store
        .transition_command(CommandTransition {
            reason: Some("device offline".to_owned()),
            ..change("c1", &[Queued], Sent, 2)
        })
        .await
        .unwrap();
    let acknowledged = store
        .transition_command(change("c1", &[Sent], Acknowledged, 3))
        .await
        .unwrap();
    assert_eq!(acknowledged.reason.as_deref(), Some("device offline"));
    assert_eq!(acknowledged.reply, None);
}

async fn racing_transitions_in_one_process_have_exactly_one_winner(store: Arc<dyn Store>) {
    for round in 0..10 {
        let id = format!("c{round}");
        store.create_command(record(&id, "d1", 1)).await.unwrap();
        store
            .transition_command(change(&id, &[Queued], Sent, 2))
            .await
            .unwrap();
        // An acknowledgement and a cancellation arrive at the same time.
        let ack = {
            let store = Arc::clone(&store);
            let id = id.clone();
            tokio::spawn(async move {
                store
                    .transition_command(change(&id, &[Sent, Delivered], Acknowledged, 3))
                    .await
            })
        };
        let cancel = {
            let store = Arc::clone(&store);
            let id = id.clone();
            tokio::spawn(async move {
                store
                    .transition_command(change(&id, &[Queued, Sent, Delivered], Cancelled, 3))
                    .await
            })
        };
        let results = [ack.await.unwrap(), cancel.await.unwrap()];
        let winners: Vec<&Command> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(winners.len(), 1, "round {round}: {results:?}");
        let loser = results.iter().find_map(|r| r.as_ref().err()).unwrap();
        assert!(matches!(loser, StoreError::Conflict(_)), "{loser:?}");
        assert_eq!(
            store.get_command(&id).await.unwrap().state,
            winners[0].state
        );
    }
}

/// d1: c1..c5 (seq 1..5), d2: e1, e2; creation times interleave and two share a time.
async fn listing_fixture(store: &dyn Store) {
    for (id, device, created_at) in [
        ("c1", "d1", 10),
        ("e1", "d2", 15),
        ("c2", "d1", 20),
        ("c3", "d1", 20),
        ("e2", "d2", 25),
        ("c4", "d1", 30),
        ("c5", "d1", 5),
    ] {
        store
            .create_command(record(id, device, created_at))
            .await
            .unwrap();
    }
    store
        .transition_command(change("c2", &[Queued], Sent, 40))
        .await
        .unwrap();
    store
        .transition_command(change("c3", &[Queued], Cancelled, 40))
        .await
        .unwrap();
    store
        .transition_command(change("e1", &[Queued], Sent, 40))
        .await
        .unwrap();
    store
        .transition_command(change("e1", &[Sent], Acknowledged, 41))
        .await
        .unwrap();
}

async fn a_device_list_is_in_seq_order_newest_first_by_default(store: Arc<dyn Store>) {
    listing_fixture(store.as_ref()).await;
    let newest_first = store.list_commands(query(Some("d1"))).await.unwrap();
    // c5 was created with the earliest time but is d1's latest command.
    assert_eq!(ids(&newest_first), vec!["c5", "c4", "c3", "c2", "c1"]);
    let oldest_first = store
        .list_commands(CommandQuery {
            oldest_first: true,
            ..query(Some("d1"))
        })
        .await
        .unwrap();
    assert_eq!(ids(&oldest_first), vec!["c1", "c2", "c3", "c4", "c5"]);
    // Nor does the id decide: the caller picks ids, the store picks `seq`. d2's latest
    // command has the id that sorts first, and a page after it goes on by seq.
    store.create_command(record("a1", "d2", 50)).await.unwrap();
    assert_eq!(
        ids(&store.list_commands(query(Some("d2"))).await.unwrap()),
        vec!["a1", "e2", "e1"]
    );
    let after_latest = store
        .list_commands(CommandQuery {
            after: Some("a1".to_owned()),
            ..query(Some("d2"))
        })
        .await
        .unwrap();
    assert_eq!(ids(&after_latest), vec!["e2", "e1"]);
    assert!(
        store
            .list_commands(query(Some("nobody")))
            .await
            .unwrap()
            .is_empty()
    );
}

async fn a_list_of_all_devices_is_in_creation_order_with_ids_breaking_ties(store: Arc<dyn Store>) {
    listing_fixture(store.as_ref()).await;
    let newest_first = store.list_commands(query(None)).await.unwrap();
    assert_eq!(
        ids(&newest_first),
        vec!["c4", "e2", "c3", "c2", "e1", "c1", "c5"]
    );
    let oldest_first = store
        .list_commands(CommandQuery {
            oldest_first: true,
            ..query(None)
        })
        .await
        .unwrap();
    assert_eq!(
        ids(&oldest_first),
        vec!["c5", "c1", "e1", "c2", "c3", "e2", "c4"]
    );
}

async fn lists_filter_by_state(store: Arc<dyn Store>) {
    listing_fixture(store.as_ref()).await;
    let unfinished = store
        .list_commands(CommandQuery {
            states: vec![Queued, Sent],
            ..query(Some("d1"))
        })
        .await
        .unwrap();
    assert_eq!(ids(&unfinished), vec!["c5", "c4", "c2", "c1"]);
    let over_all = store
        .list_commands(CommandQuery {
            states: vec![Acknowledged, Cancelled],
            oldest_first: true,
            ..query(None)
        })
        .await
        .unwrap();
    assert_eq!(ids(&over_all), vec!["e1", "c3"]);
    let none = store
        .list_commands(CommandQuery {
            states: vec![Failed],
            ..query(None)
        })
        .await
        .unwrap();
    assert!(none.is_empty());
}

/// Walks every page of `base` with pages of `limit`, following the last id of each page.
async fn all_pages(store: &dyn Store, base: CommandQuery, limit: u32) -> Vec<Vec<String>> {
    let mut pages = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list_commands(CommandQuery {
                after: after.clone(),
                limit,
                ..base.clone()
            })
            .await
            .unwrap();
        if page.is_empty() {
            return pages;
        }
        after = page.last().map(|command| command.id.clone());
        pages.push(page.into_iter().map(|command| command.id).collect());
        assert!(pages.len() < 20, "paging does not end");
    }
}

async fn paging_after_an_id_continues_in_the_chosen_order(store: Arc<dyn Store>) {
    listing_fixture(store.as_ref()).await;
    assert_eq!(
        all_pages(store.as_ref(), query(Some("d1")), 2).await,
        vec![vec!["c5", "c4"], vec!["c3", "c2"], vec!["c1"]]
    );
    assert_eq!(
        all_pages(
            store.as_ref(),
            CommandQuery {
                oldest_first: true,
                ..query(Some("d1"))
            },
            3
        )
        .await,
        vec![vec!["c1", "c2", "c3"], vec!["c4", "c5"]]
    );
    // Across devices the tie at created_at 20 (c2, c3) falls on a page boundary.
    assert_eq!(
        all_pages(store.as_ref(), query(None), 3).await,
        vec![vec!["c4", "e2", "c3"], vec!["c2", "e1", "c1"], vec!["c5"]]
    );
    assert_eq!(
        all_pages(
            store.as_ref(),
            CommandQuery {
                oldest_first: true,
                ..query(None)
            },
            4
        )
        .await,
        vec![vec!["c5", "c1", "e1", "c2"], vec!["c3", "e2", "c4"]]
    );
    // Paging with a state filter may continue after an item the filter would now exclude.
    let page = store
        .list_commands(CommandQuery {
            states: vec![Queued],
            after: Some("c3".to_owned()),
            ..query(Some("d1"))
        })
        .await
        .unwrap();
    assert_eq!(ids(&page), vec!["c1"]);
}

async fn paging_after_an_unknown_or_foreign_id_is_invalid(store: Arc<dyn Store>) {
    listing_fixture(store.as_ref()).await;
    for (device, after) in [
        (Some("d1"), "zzz"),
        (None, "zzz"),
        (Some("d1"), "e1"),
        (None, "a/b"),
    ] {
        match store
            .list_commands(CommandQuery {
                after: Some(after.to_owned()),
                ..query(device)
            })
            .await
        {
            Err(StoreError::Invalid(message)) => assert!(message.contains(after), "{message}"),
            other => panic!("after {after:?}: expected Invalid, got {other:?}"),
        }
    }
    assert!(matches!(
        store.list_commands(query(Some("bad id"))).await,
        Err(StoreError::Invalid(_))
    ));
}

async fn limit_zero_means_a_hundred_and_large_limits_are_capped(store: Arc<dyn Store>) {
    for n in 0..105 {
        store
            .create_command(record(&format!("c{n:03}"), "d1", n))
            .await
            .unwrap();
    }
    assert_eq!(
        store.list_commands(query(Some("d1"))).await.unwrap().len(),
        100
    );
    let huge = store
        .list_commands(CommandQuery {
            limit: u32::MAX,
            ..query(None)
        })
        .await
        .unwrap();
    assert_eq!(huge.len(), 105);
    let one = store
        .list_commands(CommandQuery {
            limit: 1,
            ..query(None)
        })
        .await
        .unwrap();
    assert_eq!(ids(&one), vec!["c104"]);
}

async fn unfinished_commands_are_ordered_by_device_then_seq(store: Arc<dyn Store>) {
    listing_fixture(store.as_ref()).await;
    store
        .transition_command(change("c4", &[Queued], Sent, 50))
        .await
        .unwrap();
    store
        .transition_command(change("c4", &[Sent], Delivered, 51))
        .await
        .unwrap();
    store
        .transition_command(change("c1", &[Queued], Expired, 52))
        .await
        .unwrap();
    let unfinished = store.unfinished_commands().await.unwrap();
    assert_eq!(ids(&unfinished), vec!["c2", "c4", "c5", "e2"]);
    let states: Vec<CommandState> = unfinished.iter().map(|command| command.state).collect();
    assert_eq!(states, vec![Sent, Delivered, Queued, Queued]);
}

async fn commands_of_a_deleted_device_stay_readable(store: Arc<dyn Store>) {
    store.create_command(record("c1", "d1", 1)).await.unwrap();
    store.create_command(record("c2", "d1", 2)).await.unwrap();
    store.delete_device("d1").await.unwrap();
    assert_eq!(store.get_command("c1").await.unwrap().device_id, "d1");
    assert_eq!(
        ids(&store.list_commands(query(Some("d1"))).await.unwrap()),
        vec!["c2", "c1"]
    );
    // They can still be finished (e.g. expired by the dispatcher).
    store
        .transition_command(change("c1", &[Queued], Expired, 3))
        .await
        .unwrap();
    assert!(matches!(
        store.create_command(record("c3", "d1", 3)).await,
        Err(StoreError::NotFound(_))
    ));
    // A device created again under the same id continues after the old commands.
    store
        .create_device(NewDevice {
            id: "d1".to_owned(),
            hub_id: "h1".to_owned(),
            name: None,
            protocol: None,
            metadata: None,
        })
        .await
        .unwrap();
    assert_eq!(
        store
            .create_command(record("c3", "d1", 4))
            .await
            .unwrap()
            .seq,
        3
    );
}

// --- SQLite only: files, processes and restarts, which the in-memory store does not have ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_transitions_from_two_store_instances_have_exactly_one_winner() {
    // Two stores on one file stand in for two processes: only SQLite's locks serialise them.
    let (dir, first) = store_with_devices().await;
    let second = open(&dir);
    for round in 0..5 {
        let id = format!("c{round}");
        first.create_command(record(&id, "d1", 1)).await.unwrap();
        let (a, b) = tokio::join!(
            first.transition_command(change(&id, &[Queued], Sent, 2)),
            second.transition_command(change(&id, &[Queued], Sent, 2)),
        );
        assert_eq!(
            usize::from(a.is_ok()) + usize::from(b.is_ok()),
            1,
            "round {round}: {a:?} {b:?}"
        );
        let loser = a.as_ref().err().or(b.as_ref().err()).unwrap();
        assert!(matches!(loser, StoreError::Conflict(_)), "{loser:?}");
        let stored = second.get_command(&id).await.unwrap();
        assert_eq!((stored.state, stored.attempts), (Sent, 1), "sent once");
    }
}

#[tokio::test]
async fn commands_survive_a_reopen() {
    let (dir, store) = store_with_devices().await;
    store.create_command(record("c1", "d1", 1)).await.unwrap();
    store.create_command(record("c2", "d1", 2)).await.unwrap();
    store
        .transition_command(change("c1", &[Queued], Sent, 3))
        .await
        .unwrap();
    let before = store.list_commands(query(None)).await.unwrap();
    drop(store);

    let reopened = open(&dir);
    assert_eq!(reopened.list_commands(query(None)).await.unwrap(), before);
    assert_eq!(
        ids(&reopened.unfinished_commands().await.unwrap()),
        vec!["c1", "c2"]
    );
    let resent = reopened
        .transition_command(change("c1", &[Sent, Delivered], Sent, 10))
        .await
        .unwrap();
    assert_eq!(resent.attempts, 2);
    assert_eq!(
        reopened
            .create_command(record("c3", "d1", 11))
            .await
            .unwrap()
            .seq,
        3
    );
}

fn applied_versions(path: &std::path::Path) -> Vec<i64> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut statement = conn
        .prepare("SELECT version FROM schema_migrations ORDER BY version")
        .unwrap();
    statement
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test]
async fn a_version_1_database_is_upgraded_and_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(SqliteConfig::default().file);
    {
        // What polyhub before issue 5 left behind: schema 1 with a device in it.
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE schema_migrations (
                 version BIGINT NOT NULL PRIMARY KEY, applied_at BIGINT NOT NULL);
             INSERT INTO schema_migrations VALUES (1, 0);",
        )
        .unwrap();
        conn.execute_batch(include_str!("../migrations/0001_initial.sql"))
            .unwrap();
        conn.execute_batch(
            "INSERT INTO groups VALUES ('g1', 'g1', '{}', 0, 0);
             INSERT INTO hubs VALUES ('h1', 'g1', 'h1', '{}', '{}', 'running', 0, 0);
             INSERT INTO devices VALUES ('d1', 'h1', 'd1', 'mqtt', '{}', 0, 0);",
        )
        .unwrap();
    }
    assert_eq!(applied_versions(&path), vec![1]);

    let store = open(&dir);
    assert_eq!(applied_versions(&path), vec![1, 2]);
    assert_eq!(store.get_device("d1").await.unwrap().hub_id, "h1");
    let created = store.create_command(record("c1", "d1", 1)).await.unwrap();
    assert_eq!((created.seq, created.state), (1, Queued));
    drop(store);

    // Opening again applies nothing more.
    let reopened = open(&dir);
    assert_eq!(applied_versions(&path), vec![1, 2]);
    assert_eq!(reopened.get_command("c1").await.unwrap(), created);
}
