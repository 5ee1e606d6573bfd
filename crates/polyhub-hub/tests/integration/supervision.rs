//! Supervision: failures (panics, storage errors, child processes) are restarted with backoff
//! and never disturb other hubs.

use std::sync::Arc;

use polyhub_hub::ProcessParserCommand;
use polyhub_store::{Decoder, DesiredState, HubSettings, Isolation, ParserEventKind, ParserState};

use crate::support::*;

fn number_hub() -> HubSettings {
    HubSettings {
        decoder: Decoder::Number,
        ..HubSettings::default()
    }
}

fn process_hub() -> HubSettings {
    HubSettings {
        isolation: Some(Isolation::Process),
        ..HubSettings::default()
    }
}

fn shell(script: &str) -> ProcessParserCommand {
    ProcessParserCommand {
        program: "sh".into(),
        args: vec!["-c".into(), script.into()],
    }
}

#[tokio::test]
async fn a_panicking_parser_is_restarted_while_other_hubs_keep_ingesting() {
    let store = Arc::new(MemoryStore::new());
    for (hub_id, device_id) in [("h1", "d1"), ("h2", "d2")] {
        add_hub(&store, hub_id, number_hub(), DesiredState::Running).await;
        add_device(&store, hub_id, device_id).await;
    }
    let hub = Fixture::start(store.clone(), fast_config()).await;
    hub.wait_running("h1").await;
    hub.wait_running("h2").await;

    store.set_fault("h1", Some(WriteFault::Panic));
    hub.bus.publish("/h1/d1/data", "1");
    hub.bus.publish("/h2/d2/data", "2");
    wait_until("h1 restarted twice", || {
        hub.manager.status("h1").unwrap().restarts >= 2
    })
    .await;
    wait_until("h2 ingested", || store.rows("d2").len() == 1).await;
    let h1 = hub.manager.status("h1").unwrap();
    assert!(
        h1.last_error
            .as_deref()
            .is_some_and(|error| error.contains("panicked")),
        "{h1:?}"
    );
    assert_eq!(hub.manager.status("h2").unwrap().restarts, 0);

    let events = store.events("h1");
    assert_eq!(events[0].kind, ParserEventKind::Started);
    assert_eq!(events[1].kind, ParserEventKind::Failed);
    assert!(
        events[1]
            .reason
            .as_deref()
            .is_some_and(|reason| reason.contains("injected panic"))
    );
    assert_eq!(events[2].kind, ParserEventKind::Restarted);

    // Once storage behaves, the unacknowledged message is redelivered and stored once.
    store.set_fault("h1", None);
    wait_until("h1 ingested", || store.rows("d1").len() == 1).await;
    wait_until("h1 running", || {
        hub.manager.status("h1").unwrap().state == ParserState::Running
    })
    .await;
    hub.bus.publish("/h2/d2/data", "3");
    wait_until("h2 still ingesting", || store.rows("d2").len() == 2).await;
    assert_eq!(store.rows("d1").len(), 1);
    hub.stop().await;
}

#[tokio::test]
async fn storage_errors_back_off_and_a_stop_during_backoff_is_clean() {
    let store = Arc::new(MemoryStore::new());
    add_hub(&store, "h1", number_hub(), DesiredState::Running).await;
    add_device(&store, "h1", "d1").await;
    let config = polyhub_hub::HubConfig {
        restart_backoff_initial_ms: 100,
        restart_backoff_max_ms: 10_000,
        ..fast_config()
    };
    let hub = Fixture::start(store.clone(), config).await;
    hub.wait_running("h1").await;

    store.set_fault("h1", Some(WriteFault::Fail));
    hub.bus.publish("/h1/d1/data", "1");
    wait_until("in backoff", || {
        hub.manager.status("h1").unwrap().state == ParserState::Backoff
    })
    .await;
    let started = tokio::time::Instant::now();
    // Each run fails on the redelivered message; delays double from 100 ms: 100 + 200 + 400.
    wait_until("three restarts", || {
        hub.manager.status("h1").unwrap().restarts >= 3
    })
    .await;
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    let status = hub.manager.status("h1").unwrap();
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|error| error.contains("storage unavailable")),
        "{status:?}"
    );
    assert_eq!(store.row_count(), 0);

    let stopped = hub.manager.stop_hub("h1").await.unwrap();
    assert_eq!(stopped.state, ParserState::Stopped);
    assert_eq!(
        store.events("h1").last().unwrap().kind,
        ParserEventKind::Stopped
    );
    // Nothing was acknowledged: the message waits in the session for the next start.
    assert_eq!(hub.bus.unacknowledged("polyhub-parser-h1"), 1);
    store.set_fault("h1", None);
    let restarted = hub.manager.start_hub("h1").await.unwrap();
    assert_eq!(restarted.state, ParserState::Running);
    wait_until("stored after restart", || store.rows("d1").len() == 1).await;
    hub.stop().await;
}

#[tokio::test]
async fn a_child_process_that_exits_non_zero_is_restarted_with_backoff() {
    let store = Arc::new(MemoryStore::new());
    add_hub(&store, "p1", process_hub(), DesiredState::Running).await;
    add_hub(&store, "h2", number_hub(), DesiredState::Running).await;
    add_device(&store, "h2", "d2").await;
    let hub = Fixture::start_with(
        store.clone(),
        FakeBus::new(),
        fast_config(),
        None,
        Some(shell("exit 3")),
    )
    .await;

    wait_until("p1 restarted twice", || {
        hub.manager.status("p1").unwrap().restarts >= 2
    })
    .await;
    let status = hub.manager.status("p1").unwrap();
    assert_eq!(status.isolation, Isolation::Process);
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|error| error.contains("exit status: 3")),
        "{status:?}"
    );
    hub.wait_running("h2").await;
    hub.bus.publish("/h2/d2/data", "1");
    wait_until("h2 ingests meanwhile", || store.rows("d2").len() == 1).await;

    let stopped = hub.manager.stop_hub("p1").await.unwrap();
    assert_eq!(stopped.state, ParserState::Stopped);
    hub.stop().await;
}

/// A stand-in for `polyhub parser`: ready at once, answers every request `ok`, exits on stop.
const PROTOCOL_CHILD: &str = r#"
echo '{"event":"ready","devices":3}'
while IFS= read -r line; do
  id=$(printf '%s' "$line" | sed -n 's/.*"id":\([0-9]*\).*/\1/p')
  echo "{\"event\":\"ok\",\"id\":$id}"
  case "$line" in
    *'"op":"add_device"'*) echo '{"event":"batch","messages":2,"rows":4,"dead_letters":0,"duplicates":1,"lag_ms":7}';;
    *'"op":"stop"'*) exit 0;;
  esac
done
exit 0
"#;

#[tokio::test]
async fn a_process_parser_is_driven_through_the_json_lines_protocol() {
    let store = Arc::new(MemoryStore::new());
    add_hub(&store, "p1", process_hub(), DesiredState::Stopped).await;
    let hub = Fixture::start_with(
        store.clone(),
        FakeBus::new(),
        fast_config(),
        None,
        Some(shell(PROTOCOL_CHILD)),
    )
    .await;

    let status = hub.manager.start_hub("p1").await.unwrap();
    assert_eq!(status.state, ParserState::Running, "{status:?}");
    assert!(status.pid.is_some());
    assert_eq!(status.devices, 3);

    add_device(&store, "p1", "d1").await;
    let device = polyhub_store::Store::get_device(store.as_ref(), "d1")
        .await
        .unwrap();
    hub.manager.device_added(&device).await.unwrap();
    wait_until("batch report", || {
        hub.manager.status("p1").unwrap().rows_written == 4
    })
    .await;
    let status = hub.manager.status("p1").unwrap();
    assert_eq!(
        (
            status.messages_in,
            status.duplicates_skipped,
            status.last_lag_ms
        ),
        (2, 1, 7)
    );

    let stopped = hub.manager.stop_hub("p1").await.unwrap();
    assert_eq!(stopped.state, ParserState::Stopped);
    assert_eq!(stopped.restarts, 0);
    let kinds: Vec<_> = store
        .events("p1")
        .into_iter()
        .map(|event| event.kind)
        .collect();
    assert_eq!(kinds, [ParserEventKind::Started, ParserEventKind::Stopped]);
    hub.stop().await;
}

#[tokio::test]
async fn process_isolation_without_a_program_fails_visibly() {
    let store = Arc::new(MemoryStore::new());
    add_hub(&store, "p1", process_hub(), DesiredState::Running).await;
    let hub = Fixture::start(store.clone(), fast_config()).await;
    wait_until("failure recorded", || {
        hub.manager.status("p1").unwrap().restarts >= 1
    })
    .await;
    let status = hub.manager.status("p1").unwrap();
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|error| error.contains("no parser program")),
        "{status:?}"
    );
    hub.stop().await;
}
