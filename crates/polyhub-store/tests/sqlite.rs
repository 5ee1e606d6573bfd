//! Behaviour of the SQLite store through the `Store` trait, on databases in temporary folders.

use std::collections::HashSet;
use std::sync::Arc;

use polyhub_store::*;
use proptest::prelude::*;
use tempfile::TempDir;

fn open(dir: &TempDir) -> SqliteStore {
    SqliteStore::open(dir.path(), &SqliteConfig::default()).expect("open store")
}

fn new_store() -> (TempDir, SqliteStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    (dir, store)
}

fn new_group(id: &str) -> NewGroup {
    NewGroup {
        id: id.to_owned(),
        name: None,
        metadata: None,
    }
}

fn new_hub(id: &str, group_id: &str) -> NewHub {
    NewHub {
        id: id.to_owned(),
        group_id: group_id.to_owned(),
        name: None,
        metadata: None,
        settings: HubSettings::default(),
        desired_state: DesiredState::default(),
    }
}

fn new_device(id: &str, hub_id: &str) -> NewDevice {
    NewDevice {
        id: id.to_owned(),
        hub_id: hub_id.to_owned(),
        name: None,
        protocol: None,
        metadata: None,
    }
}

/// A group `g1` with hub `h1` holding devices `d1` and `d2`.
async fn registry(store: &SqliteStore) {
    store.create_group(new_group("g1")).await.unwrap();
    store.create_hub(new_hub("h1", "g1")).await.unwrap();
    store.create_device(new_device("d1", "h1")).await.unwrap();
    store.create_device(new_device("d2", "h1")).await.unwrap();
}

fn row(device: &str, signal: &str, ts: Millis, value: Value) -> TelemetryRow {
    TelemetryRow {
        device_id: device.to_owned(),
        signal: signal.to_owned(),
        ts,
        value,
    }
}

fn message(
    seq: Option<u64>,
    device: &str,
    received_at: Millis,
    rows: Vec<TelemetryRow>,
) -> IngestedMessage {
    IngestedMessage {
        seq,
        device_id: Some(device.to_owned()),
        received_at,
        rows,
        dead_letter: None,
    }
}

fn batch(hub: &str, messages: Vec<IngestedMessage>) -> IngestBatch {
    IngestBatch {
        hub_id: hub.to_owned(),
        messages,
    }
}

fn number_rows(device: &str, signal: &str, points: &[(Millis, f64)]) -> Vec<TelemetryRow> {
    points
        .iter()
        .map(|&(ts, n)| row(device, signal, ts, Value::Number(n)))
        .collect()
}

fn assert_not_found<T: std::fmt::Debug>(result: Result<T, StoreError>, message: &str) {
    match result {
        Err(StoreError::NotFound(text)) => assert_eq!(text, message),
        other => panic!("expected NotFound({message}), got {other:?}"),
    }
}

macro_rules! assert_err {
    ($result:expr, $variant:ident) => {
        match $result {
            Err(StoreError::$variant(_)) => {}
            other => panic!("expected {}, got {other:?}", stringify!($variant)),
        }
    };
}

// --- registry -------------------------------------------------------------------------

#[tokio::test]
async fn groups_have_defaults_and_reject_bad_input() {
    let (_dir, store) = new_store();
    let group = store.create_group(new_group("g1")).await.unwrap();
    assert_eq!(group.name, "g1");
    assert_eq!(group.metadata, serde_json::json!({}));
    assert_eq!(group.created_at, group.updated_at);
    assert_eq!(store.get_group("g1").await.unwrap(), group);

    let named = NewGroup {
        id: "g2".into(),
        name: Some("Acme".into()),
        metadata: Some(serde_json::json!({"tier": "gold"})),
    };
    let named = store.create_group(named).await.unwrap();
    assert_eq!(named.name, "Acme");
    assert_eq!(named.metadata["tier"], "gold");

    assert_err!(store.create_group(new_group("g1")).await, Conflict);
    assert_err!(store.create_group(new_group("bad id")).await, Invalid);
    assert_err!(store.create_group(new_group("")).await, Invalid);
    let array_metadata = NewGroup {
        id: "g3".into(),
        name: None,
        metadata: Some(serde_json::json!([1, 2])),
    };
    assert_err!(store.create_group(array_metadata).await, Invalid);
    assert_not_found(store.get_group("nope").await, r#"group "nope" not found"#);
    assert_err!(store.get_group("../x").await, Invalid);
}

#[tokio::test]
async fn group_updates_change_fields_and_updated_at() {
    let (_dir, store) = new_store();
    let created = store.create_group(new_group("g1")).await.unwrap();
    let patch = GroupPatch {
        name: Some("Renamed".into()),
        metadata: None,
    };
    let renamed = store.update_group("g1", patch).await.unwrap();
    assert_eq!(renamed.name, "Renamed");
    assert_eq!(renamed.metadata, serde_json::json!({}));
    assert_eq!(renamed.created_at, created.created_at);
    assert!(renamed.updated_at > created.updated_at);

    let patch = GroupPatch {
        name: None,
        metadata: Some(serde_json::json!({"a": 1})),
    };
    let with_metadata = store.update_group("g1", patch).await.unwrap();
    assert_eq!(with_metadata.name, "Renamed", "absent fields stay");
    assert_eq!(with_metadata.metadata, serde_json::json!({"a": 1}));
    assert!(with_metadata.updated_at > renamed.updated_at);

    let bad = GroupPatch {
        name: None,
        metadata: Some(serde_json::json!(3)),
    };
    assert_err!(store.update_group("g1", bad).await, Invalid);
    assert_eq!(
        store.get_group("g1").await.unwrap(),
        with_metadata,
        "rejected patch changed nothing"
    );
    assert_not_found(
        store.update_group("nope", GroupPatch::default()).await,
        r#"group "nope" not found"#,
    );
}

#[tokio::test]
async fn deleting_parents_with_children_conflicts() {
    let (_dir, store) = new_store();
    registry(&store).await;
    assert_err!(store.delete_group("g1").await, Conflict);
    assert_err!(store.delete_hub("h1").await, Conflict);
    store.delete_device("d1").await.unwrap();
    store.delete_device("d2").await.unwrap();
    store.delete_hub("h1").await.unwrap();
    store.delete_group("g1").await.unwrap();
    assert_not_found(store.get_group("g1").await, r#"group "g1" not found"#);
    assert_not_found(store.delete_group("g1").await, r#"group "g1" not found"#);
    assert_not_found(store.delete_hub("h1").await, r#"hub "h1" not found"#);
    assert_not_found(store.delete_device("d1").await, r#"device "d1" not found"#);
}

#[tokio::test]
async fn hubs_keep_settings_and_desired_state() {
    let (_dir, store) = new_store();
    store.create_group(new_group("g1")).await.unwrap();
    store.create_group(new_group("g2")).await.unwrap();
    assert_err!(store.create_hub(new_hub("h1", "missing")).await, Conflict);

    let settings = HubSettings {
        decoder: Decoder::Json,
        channels: ChannelStyle::Sgframework,
        isolation: Some(Isolation::Process),
    };
    let mut wanted = new_hub("h1", "g1");
    wanted.settings = settings.clone();
    wanted.desired_state = DesiredState::Stopped;
    let hub = store.create_hub(wanted).await.unwrap();
    assert_eq!(hub.settings, settings);
    assert_eq!(hub.desired_state, DesiredState::Stopped);
    assert_eq!(hub.name, "h1");
    assert_eq!(store.get_hub("h1").await.unwrap(), hub);
    assert_err!(store.create_hub(new_hub("h1", "g2")).await, Conflict);

    let running = store
        .set_hub_desired_state("h1", DesiredState::Running)
        .await
        .unwrap();
    assert_eq!(running.desired_state, DesiredState::Running);
    assert!(running.updated_at > hub.updated_at);

    let patch = HubPatch {
        name: Some("Plant".into()),
        metadata: None,
        settings: Some(HubSettings::default()),
    };
    let patched = store.update_hub("h1", patch).await.unwrap();
    assert_eq!(patched.name, "Plant");
    assert_eq!(patched.settings, HubSettings::default());
    assert_eq!(patched.desired_state, DesiredState::Running);
    assert_eq!(patched.group_id, "g1");
    let bad = HubPatch {
        metadata: Some(serde_json::json!("x")),
        ..HubPatch::default()
    };
    assert_err!(store.update_hub("h1", bad).await, Invalid);
    assert_not_found(
        store.update_hub("h9", HubPatch::default()).await,
        r#"hub "h9" not found"#,
    );
    assert_not_found(
        store
            .set_hub_desired_state("h9", DesiredState::Stopped)
            .await,
        r#"hub "h9" not found"#,
    );

    store.create_hub(new_hub("h0", "g2")).await.unwrap();
    store.create_hub(new_hub("h2", "g1")).await.unwrap();
    let of_g1 = store
        .list_hubs(ListQuery {
            parent: Some("g1".into()),
            ..ListQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(
        of_g1.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(),
        ["h1", "h2"]
    );
    let all = store.list_hubs(ListQuery::default()).await.unwrap();
    assert_eq!(
        all.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(),
        ["h0", "h1", "h2"]
    );
}

#[tokio::test]
async fn devices_are_unique_across_hubs() {
    let (_dir, store) = new_store();
    registry(&store).await;
    store.create_hub(new_hub("h2", "g1")).await.unwrap();
    assert_err!(store.create_device(new_device("d1", "h2")).await, Conflict);
    assert_err!(
        store.create_device(new_device("d9", "missing")).await,
        Conflict
    );
    assert_err!(store.create_device(new_device("d/9", "h1")).await, Invalid);

    let device = store.get_device("d1").await.unwrap();
    assert_eq!(device.protocol, DEFAULT_PROTOCOL);
    assert_eq!(device.name, "d1");
    assert_eq!(device.hub_id, "h1");

    let full = NewDevice {
        id: "x1".into(),
        hub_id: "h2".into(),
        name: Some("Boiler".into()),
        protocol: Some("xmpp".into()),
        metadata: Some(serde_json::json!({"room": 4})),
    };
    let full = store.create_device(full).await.unwrap();
    assert_eq!(
        (full.name.as_str(), full.protocol.as_str()),
        ("Boiler", "xmpp")
    );

    let patch = DevicePatch {
        protocol: Some("mqtt".into()),
        ..DevicePatch::default()
    };
    let patched = store.update_device("x1", patch).await.unwrap();
    assert_eq!(patched.protocol, "mqtt");
    assert_eq!(patched.name, "Boiler");
    assert!(patched.updated_at > full.updated_at);
    let empty_protocol = DevicePatch {
        protocol: Some(String::new()),
        ..DevicePatch::default()
    };
    assert_err!(store.update_device("x1", empty_protocol).await, Invalid);
    assert_not_found(
        store.update_device("nope", DevicePatch::default()).await,
        r#"device "nope" not found"#,
    );

    let of_h1 = store
        .list_devices(ListQuery {
            parent: Some("h1".into()),
            ..ListQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(
        of_h1.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
        ["d1", "d2"]
    );
}

#[tokio::test]
async fn registry_lists_page_by_id_without_gaps() {
    let (_dir, store) = new_store();
    store.create_group(new_group("g1")).await.unwrap();
    store.create_hub(new_hub("h1", "g1")).await.unwrap();
    let mut expected = Vec::new();
    // Created out of order: lists sort by id, not by creation.
    for n in (0..120).rev() {
        let id = format!("dev-{n:03}");
        store.create_device(new_device(&id, "h1")).await.unwrap();
        expected.push(id);
    }
    expected.sort();

    let first_default_page = store.list_devices(ListQuery::default()).await.unwrap();
    assert_eq!(first_default_page.len(), 100, "limit 0 means 100");

    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list_devices(ListQuery {
                parent: Some("h1".into()),
                after: after.clone(),
                limit: 7,
            })
            .await
            .unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 7);
        after = page.last().map(|d| d.id.clone());
        seen.extend(page.into_iter().map(|d| d.id));
    }
    assert_eq!(seen, expected);

    let groups = store
        .list_groups(ListQuery {
            limit: 1,
            ..ListQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(groups.len(), 1);
    let after_last = store
        .list_groups(ListQuery {
            after: Some("g1".into()),
            ..ListQuery::default()
        })
        .await
        .unwrap();
    assert!(after_last.is_empty());
}

// --- ingest ---------------------------------------------------------------------------

#[tokio::test]
async fn write_batch_skips_redelivered_seqs() {
    let (_dir, store) = new_store();
    registry(&store).await;
    let first = batch(
        "h1",
        vec![
            message(Some(1), "d1", 100, number_rows("d1", "t", &[(100, 1.0)])),
            message(Some(2), "d1", 110, number_rows("d1", "t", &[(110, 2.0)])),
            message(
                None,
                "d2",
                120,
                vec![row("d2", "on", 120, Value::Bool(true))],
            ),
        ],
    );
    let outcome = store.write_batch(first.clone()).await.unwrap();
    assert_eq!(
        outcome,
        BatchOutcome {
            rows_written: 3,
            dead_letters_written: 0,
            duplicates_skipped: 0
        }
    );

    // A redelivery of the first two plus a new one: only the new one is written. A message
    // without a seq cannot be recognised, so it is written again.
    let mut again = first.clone();
    again.messages.push(message(
        Some(3),
        "d2",
        130,
        number_rows("d2", "t", &[(130, 3.0)]),
    ));
    let outcome = store.write_batch(again).await.unwrap();
    assert_eq!(
        outcome,
        BatchOutcome {
            rows_written: 2,
            dead_letters_written: 0,
            duplicates_skipped: 2
        }
    );
    assert_eq!(store.count_rows(None).await.unwrap(), 5);

    // Seqs are per hub.
    store.create_hub(new_hub("h2", "g1")).await.unwrap();
    store.create_device(new_device("e1", "h2")).await.unwrap();
    let other_hub = batch(
        "h2",
        vec![message(
            Some(1),
            "e1",
            140,
            number_rows("e1", "t", &[(140, 4.0)]),
        )],
    );
    assert_eq!(store.write_batch(other_hub).await.unwrap().rows_written, 1);

    // Within one batch, the second copy of a seq is a duplicate too.
    let twice = batch(
        "h1",
        vec![
            message(Some(9), "d1", 150, number_rows("d1", "t", &[(150, 5.0)])),
            message(Some(9), "d1", 150, number_rows("d1", "t", &[(150, 5.0)])),
        ],
    );
    let outcome = store.write_batch(twice).await.unwrap();
    assert_eq!((outcome.rows_written, outcome.duplicates_skipped), (1, 1));
    assert_eq!(store.count_rows(Some("h1")).await.unwrap(), 6);
    assert_eq!(store.count_rows(Some("h2")).await.unwrap(), 1);
    assert_eq!(
        store.write_batch(batch("h1", Vec::new())).await.unwrap(),
        BatchOutcome::default()
    );
}

#[tokio::test]
async fn prune_seqs_forgets_only_old_seqs() {
    let (_dir, store) = new_store();
    registry(&store).await;
    let messages = (1..=4)
        .map(|seq| message(Some(seq), "d1", seq as i64 * 100, Vec::new()))
        .collect();
    store.write_batch(batch("h1", messages)).await.unwrap();
    assert_eq!(store.prune_seqs("h1", 250).await.unwrap(), 2);
    assert_eq!(store.prune_seqs("h1", 250).await.unwrap(), 0);
    assert_eq!(store.prune_seqs("other", 10_000).await.unwrap(), 0);

    // A pruned seq is no longer recognised; a kept one still is.
    let redelivered = batch(
        "h1",
        vec![
            message(Some(1), "d1", 100, number_rows("d1", "t", &[(1, 1.0)])),
            message(Some(4), "d1", 400, number_rows("d1", "t", &[(4, 4.0)])),
        ],
    );
    let outcome = store.write_batch(redelivered).await.unwrap();
    assert_eq!((outcome.rows_written, outcome.duplicates_skipped), (1, 1));
}

#[tokio::test]
async fn dead_letters_keep_payload_as_lossy_text() {
    let (_dir, store) = new_store();
    registry(&store).await;
    let dead = |hub: &str, payload: &[u8], reason: &str| IngestedMessage {
        seq: None,
        device_id: Some("d1".into()),
        received_at: 500,
        rows: Vec::new(),
        dead_letter: Some(NewDeadLetter {
            hub_id: hub.into(),
            device_id: Some("d1".into()),
            topic: "/h1/d1/data".into(),
            payload: payload.to_vec(),
            reason: reason.into(),
            received_at: 500,
        }),
    };
    let outcome = store
        .write_batch(batch(
            "h1",
            vec![
                dead("h1", b"[1,2]", "arrays are not values"),
                dead("h1", &[0xff, b'a'], "not UTF-8"),
            ],
        ))
        .await
        .unwrap();
    assert_eq!(outcome.dead_letters_written, 2);
    store
        .write_batch(batch("h2", vec![dead("h2", b"", "empty payload")]))
        .await
        .unwrap();

    let all = store.list_dead_letters(None, None, 0).await.unwrap();
    assert_eq!(all.len(), 3);
    assert!(all.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    assert_eq!(all[0].hub_id, "h2");
    let binary = &all[1];
    assert_eq!(binary.payload, "\u{fffd}a");
    assert_eq!(binary.payload_len, 2);
    assert_eq!(binary.reason, "not UTF-8");
    assert_eq!(binary.device_id.as_deref(), Some("d1"));
    assert_eq!(binary.topic, "/h1/d1/data");
    assert_eq!(binary.received_at, 500);

    let of_h1 = store.list_dead_letters(Some("h1"), None, 1).await.unwrap();
    assert_eq!(of_h1.len(), 1);
    assert_eq!(of_h1[0].payload, "\u{fffd}a");
    let older = store
        .list_dead_letters(Some("h1"), Some(of_h1[0].id), 10)
        .await
        .unwrap();
    assert_eq!(older.len(), 1);
    assert_eq!(older[0].payload, "[1,2]");
    assert_eq!(older[0].payload_len, 5);
    assert!(
        store
            .list_dead_letters(Some("h1"), Some(older[0].id), 10)
            .await
            .unwrap()
            .is_empty()
    );
}

// --- telemetry queries ----------------------------------------------------------------

#[tokio::test]
async fn range_pages_oldest_first_without_gaps_or_duplicates() {
    let (_dir, store) = new_store();
    registry(&store).await;
    // Several rows share a timestamp, and signals interleave: the cursor must break ties.
    let mut rows = Vec::new();
    for n in 0..40i64 {
        let signal = if n % 3 == 0 { "a" } else { "b" };
        rows.push(row("d1", signal, 1_000 + n / 4, Value::Number(n as f64)));
    }
    rows.push(row("d2", "a", 1_005, Value::Number(-1.0)));
    store
        .write_batch(batch("h1", vec![message(None, "d1", 2_000, rows.clone())]))
        .await
        .unwrap();

    let mut seen = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let query = RangeQuery {
            device_id: "d1".into(),
            limit: 6,
            after: after.take(),
            ..RangeQuery::default()
        };
        let page = store.range(query).await.unwrap();
        pages += 1;
        assert!(page.rows.len() <= 6);
        seen.extend(page.rows);
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(pages, 7);
    let expected: Vec<_> = rows
        .iter()
        .filter(|r| r.device_id == "d1")
        .cloned()
        .collect();
    assert_eq!(seen, expected, "insertion order is time order here");

    let bounded = store
        .range(RangeQuery {
            device_id: "d1".into(),
            signal: Some("a".into()),
            from: Some(1_002),
            to: Some(1_005),
            ..RangeQuery::default()
        })
        .await
        .unwrap();
    let expected: Vec<_> = rows
        .iter()
        .filter(|r| r.device_id == "d1" && r.signal == "a" && (1_002..1_005).contains(&r.ts))
        .cloned()
        .collect();
    assert!(!expected.is_empty());
    assert_eq!(bounded.rows, expected);
    assert_eq!(bounded.next, None);

    for bad in ["garbage", "1:", "x:1"] {
        let query = RangeQuery {
            device_id: "d1".into(),
            after: Some(bad.into()),
            ..RangeQuery::default()
        };
        assert_err!(store.range(query).await, Invalid);
    }
    let unknown = store
        .range(RangeQuery {
            device_id: "ghost".into(),
            ..RangeQuery::default()
        })
        .await
        .unwrap();
    assert!(unknown.rows.is_empty());
}

#[tokio::test]
async fn range_limits_default_to_1000_and_cap_at_max_page() {
    let (_dir, store) = new_store();
    registry(&store).await;
    let points: Vec<_> = (0..(MAX_PAGE as i64 + 5)).map(|n| (n, n as f64)).collect();
    store
        .write_batch(batch(
            "h1",
            vec![message(None, "d1", 0, number_rows("d1", "v", &points))],
        ))
        .await
        .unwrap();
    let default_page = store
        .range(RangeQuery {
            device_id: "d1".into(),
            ..RangeQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(default_page.rows.len(), 1_000);
    assert!(default_page.next.is_some());
    let capped = store
        .range(RangeQuery {
            device_id: "d1".into(),
            limit: u32::MAX,
            ..RangeQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(capped.rows.len(), MAX_PAGE as usize);
    let rest = store
        .range(RangeQuery {
            device_id: "d1".into(),
            limit: u32::MAX,
            after: capped.next,
            ..RangeQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(rest.rows.len(), 5);
    assert_eq!(rest.rows[0].ts, MAX_PAGE as i64);
    assert_eq!(rest.next, None);
}

#[tokio::test]
async fn latest_returns_the_newest_row_of_each_signal() {
    let (_dir, store) = new_store();
    registry(&store).await;
    let rows = vec![
        row("d1", "temp", 10, Value::Number(20.0)),
        row("d1", "temp", 30, Value::Number(22.0)),
        row("d1", "temp", 20, Value::Number(21.0)),
        row("d1", "door", 15, Value::Bool(true)),
        row("d1", "door", 15, Value::Bool(false)),
        row("d1", "label", 5, Value::Text("kitchen".into())),
        row("d2", "temp", 99, Value::Number(0.0)),
    ];
    store
        .write_batch(batch("h1", vec![message(None, "d1", 100, rows)]))
        .await
        .unwrap();
    let latest = store.latest("d1").await.unwrap();
    assert_eq!(
        latest,
        vec![
            // Same ts: the later insert wins.
            row("d1", "door", 15, Value::Bool(false)),
            row("d1", "label", 5, Value::Text("kitchen".into())),
            row("d1", "temp", 30, Value::Number(22.0)),
        ]
    );
    assert!(store.latest("nobody").await.unwrap().is_empty());
    assert_err!(store.latest("bad id").await, Invalid);
}

#[tokio::test]
async fn downsample_computes_min_max_avg_count_per_bucket() {
    let (_dir, store) = new_store();
    registry(&store).await;
    let mut rows = number_rows(
        "d1",
        "t",
        &[
            (-15, 4.0),
            (-1, 2.0),
            (0, 1.0),
            (3, 5.0),
            (9, 3.0),
            (25, 10.0),
            (29, 20.0),
            (40, 7.0),
        ],
    );
    rows.push(row("d1", "t", 5, Value::Text("ignored".into())));
    rows.push(row("d1", "t", 21, Value::Bool(true)));
    rows.push(row("d1", "other", 1, Value::Number(1_000.0)));
    store
        .write_batch(batch("h1", vec![message(None, "d1", 0, rows)]))
        .await
        .unwrap();

    let query = DownsampleQuery {
        device_id: "d1".into(),
        signal: "t".into(),
        from: -20,
        to: 40,
        interval_ms: 10,
    };
    let buckets = store.downsample(query.clone()).await.unwrap();
    let bucket = |start, count, min, max, avg| Bucket {
        start,
        count,
        min,
        max,
        avg,
    };
    assert_eq!(
        buckets,
        vec![
            // ts -15 floors to -20, ts -1 to -10; 10..20 is empty and omitted; 40 is excluded.
            bucket(-20, 1, 4.0, 4.0, 4.0),
            bucket(-10, 1, 2.0, 2.0, 2.0),
            bucket(0, 3, 1.0, 5.0, 3.0),
            bucket(20, 3, 1.0, 20.0, 31.0 / 3.0),
        ]
    );

    let wide = store
        .downsample(DownsampleQuery {
            interval_ms: 1_000,
            ..query.clone()
        })
        .await
        .unwrap();
    assert_eq!(wide.len(), 2, "buckets [-1000, 0) and [0, 1000)");
    assert_eq!((wide[1].count, wide[1].min, wide[1].max), (6, 1.0, 20.0));
    assert_err!(
        store
            .downsample(DownsampleQuery {
                interval_ms: 0,
                ..query.clone()
            })
            .await,
        Invalid
    );
    let empty = DownsampleQuery {
        from: 100,
        to: 200,
        ..query
    };
    assert!(store.downsample(empty).await.unwrap().is_empty());
}

#[tokio::test]
async fn deleting_a_device_keeps_its_telemetry() {
    let (_dir, store) = new_store();
    registry(&store).await;
    let rows = number_rows("d1", "t", &[(1, 1.0), (2, 2.0)]);
    store
        .write_batch(batch("h1", vec![message(Some(1), "d1", 5, rows)]))
        .await
        .unwrap();
    store.set_presence("d1", true, 6).await.unwrap();
    store.delete_device("d1").await.unwrap();

    assert_not_found(store.get_presence("d1").await, r#"device "d1" not found"#);
    assert_eq!(store.latest("d1").await.unwrap().len(), 1);
    assert_eq!(store.count_rows(None).await.unwrap(), 2);
    assert_eq!(
        store.count_rows(Some("h1")).await.unwrap(),
        0,
        "only current devices count"
    );

    // Re-registering the id starts with fresh presence.
    store.create_device(new_device("d1", "h1")).await.unwrap();
    let presence = store.get_presence("d1").await.unwrap();
    assert_eq!(
        presence,
        Presence {
            device_id: "d1".into(),
            online: false,
            last_seen: None,
            changed_at: None
        }
    );
}

// --- presence and parser events -------------------------------------------------------

#[tokio::test]
async fn presence_tracks_connection_changes_and_last_seen() {
    let (_dir, store) = new_store();
    registry(&store).await;
    let never_seen = store.get_presence("d1").await.unwrap();
    assert_eq!(
        never_seen,
        Presence {
            device_id: "d1".into(),
            online: false,
            last_seen: None,
            changed_at: None
        }
    );
    assert_not_found(
        store.set_presence("ghost", true, 1).await,
        r#"device "ghost" not found"#,
    );
    assert_not_found(
        store.get_presence("ghost").await,
        r#"device "ghost" not found"#,
    );

    store.set_presence("d1", true, 100).await.unwrap();
    store.set_presence("d1", true, 150).await.unwrap();
    let online = store.get_presence("d1").await.unwrap();
    assert!(online.online);
    assert_eq!(
        (online.last_seen, online.changed_at),
        (Some(150), Some(100))
    );

    // Messages move last_seen (max received time of the batch), never backwards.
    let messages = vec![
        message(None, "d1", 300, Vec::new()),
        message(None, "d1", 200, Vec::new()),
    ];
    store.write_batch(batch("h1", messages)).await.unwrap();
    assert_eq!(store.get_presence("d1").await.unwrap().last_seen, Some(300));
    store
        .write_batch(batch("h1", vec![message(None, "d1", 250, Vec::new())]))
        .await
        .unwrap();
    assert_eq!(store.get_presence("d1").await.unwrap().last_seen, Some(300));

    store.set_presence("d1", false, 400).await.unwrap();
    let offline = store.get_presence("d1").await.unwrap();
    assert!(!offline.online);
    assert_eq!(
        (offline.last_seen, offline.changed_at),
        (Some(400), Some(400))
    );

    // A message from a device never seen creates its presence as offline with last_seen.
    store
        .write_batch(batch("h1", vec![message(None, "d2", 50, Vec::new())]))
        .await
        .unwrap();
    // And one from an unregistered device does not fail the batch.
    let stray = message(None, "ghost", 60, number_rows("ghost", "t", &[(60, 1.0)]));
    assert_eq!(
        store
            .write_batch(batch("h1", vec![stray]))
            .await
            .unwrap()
            .rows_written,
        1
    );

    let listed = store.list_presence("h1").await.unwrap();
    assert_eq!(
        listed,
        vec![
            offline,
            Presence {
                device_id: "d2".into(),
                online: false,
                last_seen: Some(50),
                changed_at: None
            },
        ]
    );
    assert_not_found(store.list_presence("h9").await, r#"hub "h9" not found"#);
}

#[tokio::test]
async fn parser_events_list_newest_first() {
    let (_dir, store) = new_store();
    let event = |hub: &str, kind, reason: Option<&str>, at| NewParserEvent {
        hub_id: hub.into(),
        kind,
        reason: reason.map(str::to_owned),
        at,
    };
    store
        .record_parser_event(event("h1", ParserEventKind::Started, None, 1))
        .await
        .unwrap();
    store
        .record_parser_event(event("h2", ParserEventKind::Started, None, 2))
        .await
        .unwrap();
    store
        .record_parser_event(event("h1", ParserEventKind::Failed, Some("disk full"), 3))
        .await
        .unwrap();
    store
        .record_parser_event(event("h1", ParserEventKind::Restarted, None, 4))
        .await
        .unwrap();

    let of_h1 = store.list_parser_events(Some("h1"), 0).await.unwrap();
    let kinds: Vec<_> = of_h1.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            ParserEventKind::Restarted,
            ParserEventKind::Failed,
            ParserEventKind::Started
        ]
    );
    assert_eq!(of_h1[1].reason.as_deref(), Some("disk full"));
    assert_eq!(of_h1[1].at, 3);
    let newest_two = store.list_parser_events(None, 2).await.unwrap();
    assert_eq!(newest_two.iter().map(|e| e.at).collect::<Vec<_>>(), [4, 3]);
}

// --- durability, migrations, concurrency ----------------------------------------------

#[tokio::test]
async fn reopening_keeps_everything_and_does_not_migrate_again() {
    let dir = tempfile::tempdir().unwrap();
    let config = SqliteConfig {
        file: "hub.db".into(),
        ..SqliteConfig::default()
    };
    {
        let store = SqliteStore::open(&dir.path().join("nested"), &config).unwrap();
        registry(&store).await;
        let rows = number_rows("d1", "t", &[(1, 1.5)]);
        store
            .write_batch(batch("h1", vec![message(Some(7), "d1", 1, rows)]))
            .await
            .unwrap();
    }
    let path = dir.path().join("nested").join("hub.db");
    let applied_before = migration_rows(&path);
    let versions: Vec<i64> = applied_before.iter().map(|(version, _)| *version).collect();
    assert_eq!(
        versions,
        vec![1, 2],
        "every migration applied once, in order"
    );

    let store = SqliteStore::open(&dir.path().join("nested"), &config).unwrap();
    assert_eq!(store.path(), path);
    assert_eq!(
        migration_rows(&path),
        applied_before,
        "re-running migrations is a no-op"
    );
    assert_eq!(store.get_device("d2").await.unwrap().hub_id, "h1");
    assert_eq!(
        store.latest("d1").await.unwrap(),
        vec![row("d1", "t", 1, Value::Number(1.5))]
    );
    let redelivered = batch(
        "h1",
        vec![message(
            Some(7),
            "d1",
            1,
            number_rows("d1", "t", &[(1, 1.5)]),
        )],
    );
    assert_eq!(
        store
            .write_batch(redelivered)
            .await
            .unwrap()
            .duplicates_skipped,
        1,
        "seqs survive"
    );
}

fn migration_rows(path: &std::path::Path) -> Vec<(i64, i64)> {
    let conn = rusqlite::Connection::open(path).unwrap();
    let mut statement = conn
        .prepare("SELECT version, applied_at FROM schema_migrations ORDER BY version")
        .unwrap();
    statement
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn a_database_from_a_newer_polyhub_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(&dir));
    let path = dir.path().join(SqliteConfig::default().file);
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute(
        "INSERT INTO schema_migrations (version, applied_at) VALUES (999, 0)",
        [],
    )
    .unwrap();
    drop(conn);
    match SqliteStore::open(dir.path(), &SqliteConfig::default()) {
        Err(StoreError::Backend(message)) => {
            assert!(
                message.contains("999") && message.contains("newer"),
                "{message}"
            )
        }
        other => panic!("expected a Backend error, got {other:?}"),
    }
}

#[test]
fn an_empty_file_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = SqliteConfig {
        file: " ".into(),
        ..SqliteConfig::default()
    };
    assert_err!(SqliteStore::open(dir.path(), &config), Invalid);
}

#[tokio::test]
async fn a_lock_held_past_the_busy_timeout_is_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let config = SqliteConfig {
        busy_timeout_ms: 50,
        ..SqliteConfig::default()
    };
    let store = SqliteStore::open(dir.path(), &config).unwrap();
    let blocker = rusqlite::Connection::open(store.path()).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    assert_err!(store.create_group(new_group("g1")).await, Unavailable);
    // Reads do not wait behind a writer (WAL).
    assert!(
        store
            .list_groups(ListQuery::default())
            .await
            .unwrap()
            .is_empty()
    );
    blocker.execute_batch("COMMIT").unwrap();
    store.create_group(new_group("g1")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stores_on_one_file_write_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let first = Arc::new(open(&dir));
    let second = Arc::new(open(&dir));
    registry(&first).await;
    const BATCHES: u64 = 15;
    const ROWS: i64 = 100;
    let mut tasks = Vec::new();
    for (index, store) in [first.clone(), second.clone()].into_iter().enumerate() {
        for worker in 0..2u64 {
            let store = store.clone();
            let device = if index == 0 { "d1" } else { "d2" };
            tasks.push(tokio::spawn(async move {
                for n in 0..BATCHES {
                    let seq = (index as u64 * 1_000_000) + worker * 10_000 + n;
                    let points: Vec<_> = (0..ROWS)
                        .map(|i| (seq as i64 * 1_000 + i, i as f64))
                        .collect();
                    let rows = number_rows(device, "v", &points);
                    let outcome = store
                        .write_batch(batch("h1", vec![message(Some(seq), device, 1, rows)]))
                        .await?;
                    assert_eq!(outcome.rows_written, ROWS as u64);
                    // Reads interleave with the other store's writes.
                    store.latest(device).await?;
                }
                Ok::<_, StoreError>(())
            }));
        }
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let expected = 2 * 2 * BATCHES * ROWS as u64;
    assert_eq!(first.count_rows(None).await.unwrap(), expected);
    assert_eq!(second.count_rows(Some("h1")).await.unwrap(), expected);
}

/// Not a benchmark: only checks that large batches go through in reasonable time.
#[tokio::test]
async fn thousand_row_batches_go_through() {
    let (_dir, store) = new_store();
    registry(&store).await;
    for n in 0..10i64 {
        let rows = (0..1_000i64)
            .map(|i| {
                row(
                    if i % 2 == 0 { "d1" } else { "d2" },
                    "v",
                    n * 1_000 + i,
                    Value::Number(i as f64),
                )
            })
            .collect();
        store
            .write_batch(batch("h1", vec![message(Some(n as u64), "d1", n, rows)]))
            .await
            .unwrap();
    }
    assert_eq!(store.count_rows(Some("h1")).await.unwrap(), 10_000);
}

// --- property: what goes in comes back out ---------------------------------------------

fn arbitrary_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<bool>().prop_map(Value::Bool),
        (-1.0e12f64..1.0e12).prop_map(Value::Number),
        "[a-z ]{0,8}".prop_map(Value::Text),
    ]
}

/// Batches of messages of rows.
/// One row as (device index, signal index, ts, value).
type RowSpec = (usize, usize, Millis, Value);

fn arbitrary_batches() -> impl Strategy<Value = Vec<Vec<Vec<RowSpec>>>> {
    let row = (0..2usize, 0..3usize, -50i64..50, arbitrary_value());
    let message = prop::collection::vec(row, 0..5);
    let batch = prop::collection::vec(message, 1..5);
    prop::collection::vec(batch, 1..6)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn range_reads_back_exactly_what_was_written(batches in arbitrary_batches(), page in 1u32..7) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let (_dir, store) = new_store();
            registry(&store).await;
            let devices = ["d1", "d2"];
            let signals = ["a", "b", "c"];
            let mut written: Vec<TelemetryRow> = Vec::new();
            let mut seq = 0u64;
            for messages in &batches {
                let mut ingest = Vec::new();
                for rows in messages {
                    seq += 1;
                    let rows: Vec<_> = rows
                        .iter()
                        .map(|(d, s, ts, v)| row(devices[*d], signals[*s], *ts, v.clone()))
                        .collect();
                    written.extend(rows.iter().cloned());
                    ingest.push(message(Some(seq), "d1", 0, rows));
                }
                store.write_batch(batch("h1", ingest)).await.unwrap();
            }
            for device in devices {
                // Oldest first; rows with equal ts keep their write order.
                let mut expected: Vec<_> = written.iter().filter(|r| r.device_id == device).cloned().collect();
                expected.sort_by_key(|r| r.ts);
                let mut read = Vec::new();
                let mut cursors = HashSet::new();
                let mut after = None;
                loop {
                    let query = RangeQuery { device_id: device.into(), limit: page, after: after.take(), ..RangeQuery::default() };
                    let result = store.range(query).await.unwrap();
                    read.extend(result.rows);
                    match result.next {
                        Some(next) => {
                            assert!(cursors.insert(next.clone()), "a cursor repeated");
                            after = Some(next);
                        }
                        None => break,
                    }
                }
                assert_eq!(read, expected);
            }
        });
    }
}

/// Devices are served from memory after the first read (see the store's docs): every change
/// made through the store shows at once all the same.
#[tokio::test]
async fn device_reads_follow_updates_deletes_and_recreation() {
    let (_dir, store) = new_store();
    registry(&store).await;
    store.create_hub(new_hub("h2", "g1")).await.unwrap();
    let first = store.get_device("d1").await.unwrap();
    assert_eq!(store.get_device("d1").await.unwrap(), first);

    let patch = DevicePatch {
        protocol: Some("xmpp".to_owned()),
        metadata: Some(serde_json::json!({"jid": "d1@example.org"})),
        ..DevicePatch::default()
    };
    let updated = store.update_device("d1", patch).await.unwrap();
    let read = store.get_device("d1").await.unwrap();
    assert_eq!(read, updated);
    assert_eq!(read.protocol, "xmpp");
    assert_eq!(read.metadata, serde_json::json!({"jid": "d1@example.org"}));

    store.delete_device("d1").await.unwrap();
    assert_err!(store.get_device("d1").await, NotFound);

    store.create_device(new_device("d1", "h2")).await.unwrap();
    assert_eq!(store.get_device("d1").await.unwrap().hub_id, "h2");
    // A device another one's change did not touch is still right.
    assert_eq!(store.get_device("d2").await.unwrap().hub_id, "h1");
}
