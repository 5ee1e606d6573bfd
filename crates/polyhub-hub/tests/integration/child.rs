//! `run_child_parser`'s JSON-lines protocol, driven in-process through pipes.

use std::sync::Arc;
use std::time::Duration;

use polyhub_hub::child::run_child_parser_with_io;
use polyhub_store::{Decoder, DesiredState, HubSettings};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream, Lines};
use tokio_util::sync::CancellationToken;

use crate::support::*;

async fn next_event(lines: &mut Lines<BufReader<DuplexStream>>) -> Value {
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .expect("no event from the child in time")
        .unwrap()
        .expect("the child closed its output");
    serde_json::from_str(&line).unwrap()
}

/// Reads events until one satisfies `wanted`.
async fn event_where(
    lines: &mut Lines<BufReader<DuplexStream>>,
    wanted: impl Fn(&Value) -> bool,
) -> Value {
    loop {
        let event = next_event(lines).await;
        if wanted(&event) {
            return event;
        }
    }
}

async fn store_with_hub() -> Arc<MemoryStore> {
    let store = Arc::new(MemoryStore::new());
    let settings = HubSettings {
        decoder: Decoder::Number,
        ..HubSettings::default()
    };
    add_hub(&store, "h1", settings, DesiredState::Running).await;
    add_device(&store, "h1", "d1").await;
    store
}

#[tokio::test]
async fn the_child_reports_ready_answers_requests_reports_batches_and_stops() {
    let store = store_with_hub().await;
    let bus = FakeBus::new();
    let (mut to_child, child_input) = tokio::io::duplex(4096);
    let (child_output, from_child) = tokio::io::duplex(4096);
    let child = tokio::spawn({
        let store = store.clone();
        let bus = Arc::new(bus.clone());
        async move {
            run_child_parser_with_io(
                "h1",
                fast_config(),
                store,
                bus,
                child_input,
                child_output,
                CancellationToken::new(),
            )
            .await
        }
    });
    let mut lines = BufReader::new(from_child).lines();
    assert_eq!(
        next_event(&mut lines).await,
        json!({"event": "ready", "devices": 1})
    );

    add_device(&store, "h1", "d2").await;
    to_child
        .write_all(b"{\"op\":\"add_device\",\"device\":\"d2\",\"id\":7}\n")
        .await
        .unwrap();
    let ok = event_where(&mut lines, |event| event["event"] == "ok").await;
    assert_eq!(ok, json!({"event": "ok", "id": 7}));
    assert!(
        bus.subscriptions("polyhub-parser-h1")
            .contains("/h1/d2/data")
    );

    to_child
        .write_all(b"{\"op\":\"grow\",\"id\":8}\n")
        .await
        .unwrap();
    let error = event_where(&mut lines, |event| event["event"] == "error").await;
    assert_eq!(error["id"], 8);

    bus.publish("/h1/d2/data", "3");
    bus.publish("/h1/d2/data", "x");
    // The two messages may be committed in one batch or two; the reports must add up.
    let (mut messages, mut rows, mut dead_letters) = (0, 0, 0);
    while messages < 2 {
        let batch = event_where(&mut lines, |event| event["event"] == "batch").await;
        messages += batch["messages"].as_u64().unwrap();
        rows += batch["rows"].as_u64().unwrap();
        dead_letters += batch["dead_letters"].as_u64().unwrap();
    }
    assert_eq!((messages, rows, dead_letters), (2, 1, 1));

    to_child
        .write_all(b"{\"op\":\"stop\",\"id\":9}\n")
        .await
        .unwrap();
    let stopped = event_where(&mut lines, |event| event["event"] == "ok").await;
    assert_eq!(stopped, json!({"event": "ok", "id": 9}));
    tokio::time::timeout(Duration::from_secs(10), child)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(store.rows("d2").len(), 1);
    assert_eq!(store.dead_letters().len(), 1);
    assert_eq!(bus.unacknowledged("polyhub-parser-h1"), 0);
}

#[tokio::test]
async fn the_child_commits_and_exits_when_its_input_closes() {
    let store = store_with_hub().await;
    let bus = FakeBus::new();
    let config = polyhub_hub::HubConfig {
        batch_max_delay_ms: 60_000,
        ..fast_config()
    };
    let (to_child, child_input) = tokio::io::duplex(4096);
    let (child_output, from_child) = tokio::io::duplex(4096);
    let child = tokio::spawn({
        let (store, bus) = (store.clone(), Arc::new(bus.clone()));
        async move {
            run_child_parser_with_io(
                "h1",
                config,
                store,
                bus,
                child_input,
                child_output,
                CancellationToken::new(),
            )
            .await
        }
    });
    let mut lines = BufReader::new(from_child).lines();
    assert_eq!(next_event(&mut lines).await["event"], "ready");
    bus.publish("/h1/d1/data", "1");
    wait_until("received", || bus.unacknowledged("polyhub-parser-h1") == 1).await;
    // The parent dies: the pending batch is still committed before the exit.
    drop(to_child);
    tokio::time::timeout(Duration::from_secs(10), child)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(store.rows("d1").len(), 1);
    assert_eq!(bus.unacknowledged("polyhub-parser-h1"), 0);
}

#[tokio::test]
async fn a_failing_child_returns_an_error_and_acknowledges_nothing() {
    let store = store_with_hub().await;
    let bus = FakeBus::new();
    let (_to_child, child_input) = tokio::io::duplex(4096);
    let (child_output, from_child) = tokio::io::duplex(4096);
    let child = tokio::spawn({
        let (store, bus) = (store.clone(), Arc::new(bus.clone()));
        async move {
            run_child_parser_with_io(
                "h1",
                fast_config(),
                store,
                bus,
                child_input,
                child_output,
                CancellationToken::new(),
            )
            .await
        }
    });
    let mut lines = BufReader::new(from_child).lines();
    assert_eq!(next_event(&mut lines).await["event"], "ready");
    store.set_fault("h1", Some(WriteFault::Fail));
    bus.publish("/h1/d1/data", "1");
    let result = tokio::time::timeout(Duration::from_secs(10), child)
        .await
        .unwrap()
        .unwrap();
    assert!(result.is_err());
    assert_eq!(bus.unacknowledged("polyhub-parser-h1"), 1);
}
