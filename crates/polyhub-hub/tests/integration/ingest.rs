//! Ingest: decoding per hub setting, dead letters, batching, durability, presence.

use std::sync::Arc;

use polyhub_store::{ChannelStyle, Decoder, DesiredState, HubSettings, ParserState, Value};
use tokio::sync::mpsc;

use crate::support::*;

fn settings(decoder: Decoder) -> HubSettings {
    HubSettings {
        decoder,
        ..HubSettings::default()
    }
}

fn values(store: &MemoryStore, device: &str) -> Vec<(String, Value)> {
    let mut rows: Vec<_> = store
        .rows(device)
        .into_iter()
        .map(|row| (row.signal, row.value))
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

#[tokio::test]
async fn json_data_is_committed_then_acknowledged() {
    let store = Arc::new(MemoryStore::new());
    add_hub(&store, "h1", settings(Decoder::Json), DesiredState::Running).await;
    add_device(&store, "h1", "d1").await;
    let hub = Fixture::start(store.clone(), fast_config()).await;
    hub.wait_running("h1").await;
    assert!(
        hub.bus
            .subscriptions("polyhub-parser-h1")
            .contains("/h1/d1/data")
    );

    hub.bus
        .publish("/h1/d1/data", r#"{"t":21.5,"a":{"b":true},"s":"ok"}"#);
    wait_until("rows", || store.row_count() == 3).await;
    assert_eq!(
        values(&store, "d1"),
        [
            ("a.b".to_owned(), Value::Bool(true)),
            ("s".to_owned(), Value::Text("ok".into())),
            ("t".to_owned(), Value::Number(21.5)),
        ]
    );
    wait_until("ack", || hub.bus.unacknowledged("polyhub-parser-h1") == 0).await;
    let status = hub.manager.status("h1").unwrap();
    assert_eq!(status.messages_in, 1);
    assert_eq!(status.rows_written, 3);
    assert_eq!(status.devices, 1);
    assert!(store.presence("d1").unwrap().last_seen.is_some());
    hub.stop().await;
}

#[tokio::test]
async fn every_decoder_ingests_its_format() {
    let store = Arc::new(MemoryStore::new());
    let cases = [
        (Decoder::Number, "num", " 42.5 ", Value::Number(42.5)),
        (Decoder::Boolean, "bool", "ON", Value::Bool(true)),
        (
            Decoder::String,
            "str",
            "hello world",
            Value::Text("hello world".into()),
        ),
        (Decoder::Auto, "auto", "off", Value::Bool(false)),
        (Decoder::Json, "json", "7", Value::Number(7.0)),
    ];
    for (decoder, name, _, _) in &cases {
        add_hub(
            &store,
            &format!("h-{name}"),
            settings(*decoder),
            DesiredState::Running,
        )
        .await;
        add_device(&store, &format!("h-{name}"), &format!("d-{name}")).await;
    }
    let hub = Fixture::start(store.clone(), fast_config()).await;
    for (_, name, _, _) in &cases {
        hub.wait_running(&format!("h-{name}")).await;
    }
    for (_, name, payload, _) in &cases {
        hub.bus
            .publish(&format!("/h-{name}/d-{name}/data"), payload.to_string());
    }
    wait_until("one row per hub", || store.row_count() == cases.len()).await;
    for (_, name, _, expected) in cases {
        assert_eq!(
            values(&store, &format!("d-{name}")),
            [("value".to_owned(), expected)]
        );
    }
    assert!(store.dead_letters().is_empty());
    hub.stop().await;
}

#[tokio::test]
async fn undecodable_payloads_and_foreign_topics_become_dead_letters() {
    let store = Arc::new(MemoryStore::new());
    add_hub(&store, "h1", settings(Decoder::Json), DesiredState::Running).await;
    add_device(&store, "h1", "d1").await;
    let hub = Fixture::start(store.clone(), fast_config()).await;
    hub.wait_running("h1").await;
    // A stale subscription left in the persistent session delivers an unregistered device.
    hub.bus.force_subscribe("polyhub-parser-h1", "/h1/+/data");

    hub.bus.publish("/h1/d1/data", "{broken");
    hub.bus.publish("/h1/d1/data", r#"{"a":1,"b":[1,2]}"#);
    hub.bus.publish("/h1/d1/data", "");
    hub.bus.publish("/h1/ghost/data", "1");
    wait_until("four dead letters", || store.dead_letters().len() == 4).await;

    let dead = store.dead_letters();
    assert!(dead[0].reason.contains("JSON"), "{dead:?}");
    assert_eq!(dead[0].payload, "{broken");
    assert_eq!(dead[0].device_id.as_deref(), Some("d1"));
    assert!(dead[1].reason.contains("array"), "{dead:?}");
    assert_eq!(dead[2].reason, "empty payload");
    assert_eq!(dead[3].device_id, None);
    assert!(
        dead[3]
            .reason
            .contains("not a data channel of a registered device"),
        "{dead:?}"
    );
    // The half-valid object wrote nothing.
    assert_eq!(store.row_count(), 0);
    wait_until("acknowledged", || {
        hub.bus.unacknowledged("polyhub-parser-h1") == 0
    })
    .await;
    assert_eq!(hub.manager.status("h1").unwrap().dead_letters, 4);
    hub.stop().await;
}

/// Hub `h1` (numbers) with device `d1`, its parser running, committing every
/// `batch_max_messages` messages; the delay is long enough that only the count (or a stop)
/// commits within a test.
async fn running_number_hub(batch_max_messages: usize) -> (Arc<MemoryStore>, Fixture) {
    let store = Arc::new(MemoryStore::new());
    add_hub(
        &store,
        "h1",
        settings(Decoder::Number),
        DesiredState::Running,
    )
    .await;
    add_device(&store, "h1", "d1").await;
    let config = polyhub_hub::HubConfig {
        batch_max_messages,
        batch_max_delay_ms: 60_000,
        ..fast_config()
    };
    let hub = Fixture::start(store.clone(), config).await;
    hub.wait_running("h1").await;
    (store, hub)
}

#[tokio::test]
async fn batches_commit_by_count_and_stop_flushes_the_rest() {
    let (store, hub) = running_number_hub(5).await;

    for value in 0..7 {
        hub.bus.publish("/h1/d1/data", value.to_string());
    }
    wait_until("the first full batch", || store.row_count() == 5).await;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert_eq!(
        store.row_count(),
        5,
        "a partial batch must wait for its deadline"
    );
    assert_eq!(hub.manager.status("h1").unwrap().last_batch_messages, 5);

    let status = hub.manager.stop_hub("h1").await.unwrap();
    assert_eq!(status.state, ParserState::Stopped);
    assert_eq!(store.row_count(), 7);
    assert_eq!(hub.bus.unacknowledged("polyhub-parser-h1"), 0);
    hub.stop().await;
}

/// At a graceful stop the devices are gone first, so whatever their session holds for the
/// parser was acknowledged to them: the stop commits it, not the next start.
#[tokio::test]
async fn a_stop_commits_what_the_broker_has_already_handed_over() {
    let (store, hub) = running_number_hub(4).await;

    // The parser is inside a commit when the rest arrives and the stop is asked for.
    store.hold_batches();
    for value in 0..4 {
        hub.bus.publish("/h1/d1/data", value.to_string());
    }
    wait_until("the parser committing", || store.batch_waiting()).await;
    for value in 4..10 {
        hub.bus.publish("/h1/d1/data", value.to_string());
    }
    let (status, ()) = tokio::join!(hub.manager.stop_hub("h1"), async {
        // This runtime has one thread: yielding lets the manager and the supervisor pass the
        // stop on to the parser's token before its commit returns.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        store.release_batches();
    });
    assert_eq!(status.unwrap().state, ParserState::Stopped);
    assert_eq!(
        store.row_count(),
        10,
        "every delivered message committed by the stop"
    );
    assert_eq!(hub.bus.unacknowledged("polyhub-parser-h1"), 0);
    hub.stop().await;
}

#[tokio::test]
async fn a_crash_between_commit_and_ack_duplicates_nothing() {
    let store = Arc::new(MemoryStore::new());
    add_hub(
        &store,
        "h1",
        settings(Decoder::Number),
        DesiredState::Running,
    )
    .await;
    add_device(&store, "h1", "d1").await;
    let hub = Fixture::start(store.clone(), fast_config()).await;
    hub.wait_running("h1").await;

    store.set_fault("h1", Some(WriteFault::FailAfterCommitOnce));
    for value in 0..3 {
        hub.bus.publish("/h1/d1/data", value.to_string());
    }
    wait_until("restart after the failed ack", || {
        hub.manager.status("h1").unwrap().restarts >= 1
    })
    .await;
    wait_until("redeliveries skipped", || store.duplicates() >= 1).await;
    wait_until("acknowledged", || {
        hub.bus.unacknowledged("polyhub-parser-h1") == 0
    })
    .await;
    let mut numbers: Vec<f64> = store
        .rows("d1")
        .into_iter()
        .map(|row| match row.value {
            Value::Number(number) => number,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    numbers.sort_by(f64::total_cmp);
    assert_eq!(numbers, [0.0, 1.0, 2.0]);
    hub.stop().await;
}

#[tokio::test]
async fn sgframework_hubs_ingest_signals_and_presence_topics() {
    let store = Arc::new(MemoryStore::new());
    let sg = HubSettings {
        channels: ChannelStyle::Sgframework,
        ..HubSettings::default()
    };
    add_hub(&store, "sg", sg, DesiredState::Running).await;
    add_device(&store, "sg", "pump").await;
    let hub = Fixture::start(store.clone(), fast_config()).await;
    hub.wait_running("sg").await;
    let filters = hub.bus.subscriptions("polyhub-parser-sg");
    assert!(filters.contains("data/pump/+") && filters.contains("resourceavailable/pump/presence"));

    hub.bus.publish("data/pump/temperature", "21.5");
    hub.bus.publish("data/pump/mode", "eco");
    hub.bus.publish("resourceavailable/pump/presence", "online");
    wait_until("rows and presence", || {
        store.row_count() == 2
            && store
                .presence("pump")
                .is_some_and(|presence| presence.online)
    })
    .await;
    assert_eq!(
        values(&store, "pump"),
        [
            ("mode".to_owned(), Value::Text("eco".into())),
            ("temperature".to_owned(), Value::Number(21.5))
        ]
    );
    hub.bus
        .publish("resourceavailable/pump/presence", "offline");
    hub.bus.publish("resourceavailable/pump/presence", "maybe");
    wait_until("offline", || {
        store
            .presence("pump")
            .is_some_and(|presence| !presence.online)
    })
    .await;
    wait_until("bad presence payload dead-lettered", || {
        store.dead_letters().len() == 1
    })
    .await;
    hub.stop().await;
}

#[tokio::test]
async fn connection_events_set_the_presence_of_devices_only() {
    let store = Arc::new(MemoryStore::new());
    add_hub(&store, "h1", HubSettings::default(), DesiredState::Stopped).await;
    add_device(&store, "h1", "d1").await;
    let (events, receiver) = mpsc::channel(8);
    let hub = Fixture::start_with(
        store.clone(),
        FakeBus::new(),
        fast_config(),
        Some(receiver),
        None,
    )
    .await;
    for (client_id, online) in [("not-a-device", true), ("d1", true)] {
        let event = polyhub_hub::bus::PresenceEvent {
            client_id: client_id.into(),
            online,
            at: 1_000,
        };
        events.send(event).await.unwrap();
    }
    wait_until("d1 online", || {
        store.presence("d1").is_some_and(|presence| presence.online)
    })
    .await;
    assert_eq!(store.presence("d1").unwrap().changed_at, Some(1_000));
    assert!(store.presence("not-a-device").is_none());
    hub.stop().await;
}
