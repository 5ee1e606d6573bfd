//! Scenarios run against every broker: each takes a fresh broker.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use polyhub_sdk::{
    App, CommandOptions, Framework, MessageType, Resource, SdkError, ServiceManager,
};

use super::{Observer, QUIET, TestBroker, WAIT, options, retained, wait_retained};

/// Callback arguments recorded by a test.
type Calls = Arc<Mutex<Vec<(MessageType, String, String, String)>>>;

fn fast(framework: &Framework) {
    framework.set_reconnect_backoff(Duration::from_millis(50), Duration::from_millis(300));
}

fn sign(port: u16) -> Resource {
    let sign = Resource::new("sign", "127.0.0.1", port);
    fast(&sign);
    sign.register_incoming_command(
        "state",
        CommandOptions::new().default_value("False"),
        |_: &Framework, _: MessageType, _: &str, _: &str, _: &str| {},
    )
    .unwrap();
    sign.register_outgoing_data("speed", Some("0"), false)
        .unwrap();
    sign.register_outgoing_data("position", None, false)
        .unwrap();
    sign
}

async fn started_app(port: u16, setup: impl FnOnce(&App)) -> App {
    let app = App::new("driver", "127.0.0.1", port);
    fast(&app);
    setup(&app);
    app.start().unwrap();
    assert!(app.wait_ready(WAIT).await, "app never became ready");
    app
}

/// Presence, availability and defaults on connect; the will on an abrupt end.
pub async fn presence_availability_and_will(broker: &mut impl TestBroker) {
    let port = broker.port();
    let observer = Observer::start(port, "#").await;
    let sign = sign(port);
    let task = sign.start().unwrap();
    assert!(sign.wait_ready(WAIT).await);
    observer
        .wait_for("resourceavailable/sign/presence", "True")
        .await;
    observer.wait_for("data/sign/state", "False").await;
    observer.wait_for("data/sign/speed", "0").await;
    let store = retained(port, "+/sign/+").await;
    for topic in [
        "resourceavailable/sign/presence",
        "commandavailable/sign/state",
        "dataavailable/sign/state",
        "dataavailable/sign/speed",
        "dataavailable/sign/position",
    ] {
        assert_eq!(
            store.get(topic).map(String::as_str),
            Some("True"),
            "{topic} in {store:?}"
        );
    }
    // Defaults are not retained unless asked; `position` has no default.
    assert!(!store.contains_key("data/sign/speed"));
    assert!(observer.payloads("data/sign/position").is_empty());
    assert!(observer.payloads("commandavailable/sign/speed").is_empty());

    task.abort();
    observer
        .wait_for("resourceavailable/sign/presence", "False")
        .await;
    wait_retained(port, "resourceavailable/sign/presence", "False").await;
}

/// `stop()` says goodbye itself, and only once.
pub async fn stop_publishes_presence_false(broker: &mut impl TestBroker) {
    let port = broker.port();
    let sign = sign(port);
    let task = sign.start().unwrap();
    assert!(sign.wait_ready(WAIT).await);
    assert!(sign.is_connected());
    sign.stop().await.unwrap();
    assert!(!sign.is_connected());
    tokio::time::timeout(WAIT, task.join())
        .await
        .expect("task ends after stop");
    wait_retained(port, "resourceavailable/sign/presence", "False").await;
    assert!(matches!(sign.stop().await, Err(SdkError::NotStarted(_))));
    assert!(matches!(
        sign.send_data("speed", 1),
        Err(SdkError::NotStarted(_))
    ));
}

/// Echo rules: payload or return value, trimming, no echo, retained echo, failing and
/// panicking callbacks survived, and the echo becoming the default.
pub async fn echo_rules(broker: &mut impl TestBroker) {
    let port = broker.port();
    let observer = Observer::start(port, "data/sign/+").await;
    let sign = Resource::new("sign", "127.0.0.1", port);
    fast(&sign);
    let calls: Calls = Arc::default();
    let record = calls.clone();
    sign.register_incoming_command(
        "plain",
        CommandOptions::new().default_value("off"),
        move |_: &Framework, kind: MessageType, service: &str, signal: &str, payload: &str| {
            record
                .lock()
                .push((kind, service.into(), signal.into(), payload.into()));
        },
    )
    .unwrap();
    sign.register_incoming_command(
        "upper",
        CommandOptions::new(),
        |_: &Framework, _: MessageType, _: &str, _: &str, payload: &str| payload.to_uppercase(),
    )
    .unwrap();
    sign.register_incoming_command(
        "silent",
        CommandOptions::new().echo(false),
        |_: &Framework, _: MessageType, _: &str, _: &str, _: &str| {},
    )
    .unwrap();
    sign.register_incoming_command(
        "kept",
        CommandOptions::new().echo_as_retained(true),
        |_: &Framework, _: MessageType, _: &str, _: &str, _: &str| {},
    )
    .unwrap();
    sign.register_incoming_command(
        "failing",
        CommandOptions::new(),
        |_: &Framework, _: MessageType, _: &str, _: &str, _: &str| -> Result<(), String> {
            Err("refused".into())
        },
    )
    .unwrap();
    sign.register_incoming_command(
        "panicking",
        CommandOptions::new(),
        |_: &Framework, _: MessageType, _: &str, _: &str, _: &str| -> Option<String> {
            panic!("callback panics on purpose")
        },
    )
    .unwrap();
    let task = sign.start().unwrap();
    assert!(sign.wait_ready(WAIT).await);
    let app = started_app(port, |_| {}).await;

    app.send_command("sign", "failing", "x", false).unwrap();
    app.send_command("sign", "panicking", "x", false).unwrap();
    app.send_command("sign", "plain", "  on \n", false).unwrap();
    app.send_command("sign", "upper", "loud", false).unwrap();
    app.send_command("sign", "silent", "hush", false).unwrap();
    app.send_command("sign", "kept", "stay", false).unwrap();
    observer.wait_for("data/sign/plain", "on").await;
    observer.wait_for("data/sign/upper", "LOUD").await;
    observer.wait_for("data/sign/kept", "stay").await;
    tokio::time::sleep(QUIET).await;
    assert!(observer.payloads("data/sign/silent").is_empty());
    assert!(observer.payloads("data/sign/failing").is_empty());
    assert!(observer.payloads("data/sign/panicking").is_empty());
    assert_eq!(
        calls.lock().clone(),
        vec![(
            MessageType::Command,
            "sign".into(),
            "plain".into(),
            "on".into()
        )]
    );
    // The client survived the panic: it still answers.
    app.send_command("sign", "plain", "again", false).unwrap();
    observer.wait_for("data/sign/plain", "again").await;
    assert_eq!(sign.default_value("plain").as_deref(), Some("again"));
    // No default registered: echoes do not create one.
    assert_eq!(sign.default_value("upper"), None);
    let store = retained(port, "data/sign/+").await;
    assert_eq!(
        store.get("data/sign/kept").map(String::as_str),
        Some("stay")
    );
    assert!(!store.contains_key("data/sign/plain"), "{store:?}");
    assert!(!task.is_finished());
    sign.stop().await.unwrap();
}

/// `on_change_only` for commands and data; data and availability reach an app, trimmed.
pub async fn change_only_and_app_callbacks(broker: &mut impl TestBroker) {
    let port = broker.port();
    let observer = Observer::start(port, "data/sign/+").await;
    let sign = Resource::new("sign", "127.0.0.1", port);
    fast(&sign);
    let command_calls = Arc::new(AtomicUsize::new(0));
    let counter = command_calls.clone();
    sign.register_incoming_command(
        "mode",
        CommandOptions::new().on_change_only(true),
        move |_: &Framework, _: MessageType, _: &str, _: &str, _: &str| {
            counter.fetch_add(1, Ordering::SeqCst);
        },
    )
    .unwrap();
    sign.register_outgoing_data("speed", None, false).unwrap();
    sign.register_outgoing_data("temp", None, false).unwrap();

    let received: Arc<Mutex<Vec<(MessageType, String, String)>>> = Arc::default();
    let app = {
        let received = received.clone();
        started_app(port, move |app| {
            let all = received.clone();
            app.register_incoming_data(
                "sign",
                "speed",
                false,
                move |_: &Framework, kind: MessageType, _: &str, signal: &str, payload: &str| {
                    all.lock().push((kind, signal.into(), payload.into()));
                },
            )
            .unwrap();
            let changes = received.clone();
            app.register_incoming_data(
                "sign",
                "temp",
                true,
                move |_: &Framework, kind: MessageType, _: &str, signal: &str, payload: &str| {
                    changes.lock().push((kind, signal.into(), payload.into()));
                },
            )
            .unwrap();
            let availability = received.clone();
            app.register_incoming_availability(
                MessageType::DataAvailable,
                "sign",
                "speed",
                move |_: &Framework, kind: MessageType, _: &str, signal: &str, payload: &str| {
                    availability
                        .lock()
                        .push((kind, signal.into(), payload.into()));
                },
            )
            .unwrap();
            let presence = received.clone();
            app.register_incoming_availability(
                MessageType::ResourceAvailable,
                "sign",
                "ignored",
                move |_: &Framework, kind: MessageType, _: &str, signal: &str, payload: &str| {
                    presence.lock().push((kind, signal.into(), payload.into()));
                },
            )
            .unwrap();
        })
        .await
    };
    sign.start().unwrap();
    assert!(sign.wait_ready(WAIT).await);
    for value in ["a", "a", "b", "a"] {
        app.send_command("sign", "mode", value, false).unwrap();
    }
    for value in [" 1 ", "1", "2"] {
        sign.send_data("speed", value).unwrap();
        sign.send_data("temp", value).unwrap();
    }
    let expected = vec![
        (
            MessageType::ResourceAvailable,
            "presence".to_owned(),
            "True".to_owned(),
        ),
        (MessageType::DataAvailable, "speed".into(), "True".into()),
        (MessageType::Data, "speed".into(), "1".into()),
        (MessageType::Data, "temp".into(), "1".into()),
        (MessageType::Data, "speed".into(), "1".into()),
        (MessageType::Data, "speed".into(), "2".into()),
        (MessageType::Data, "temp".into(), "2".into()),
    ];
    let deadline = tokio::time::Instant::now() + WAIT;
    while received.lock().len() < expected.len() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(QUIET).await;
    assert_eq!(*received.lock(), expected);
    assert_eq!(command_calls.load(Ordering::SeqCst), 3);
    // Skipped commands are not echoed either.
    assert_eq!(observer.payloads("data/sign/mode"), vec!["a", "b", "a"]);
    sign.stop().await.unwrap();
    app.stop().await.unwrap();
}

/// After a broker restart the resource reconnects and announces again, with the current
/// defaults (the last echo, the last data sent).
pub async fn defaults_resent_after_restart(broker: &mut impl TestBroker) {
    let port = broker.port();
    let sign = Resource::new("sign", "127.0.0.1", port);
    fast(&sign);
    sign.register_incoming_command(
        "state",
        CommandOptions::new()
            .default_value("False")
            .echo_as_retained(true),
        |_: &Framework, _: MessageType, _: &str, _: &str, _: &str| {},
    )
    .unwrap();
    sign.register_outgoing_data("speed", Some("0"), true)
        .unwrap();
    let statuses: Arc<Mutex<Vec<bool>>> = Arc::default();
    let record = statuses.clone();
    sign.on_broker_connectionstatus(move |_, connected| record.lock().push(connected));
    sign.start().unwrap();
    assert!(sign.wait_ready(WAIT).await);
    let app = started_app(port, |_| {}).await;
    app.send_command("sign", "state", "True", false).unwrap();
    sign.send_data("speed", 42).unwrap();
    wait_retained(port, "data/sign/state", "True").await;
    wait_retained(port, "data/sign/speed", "42").await;

    broker.restart().await;
    wait_retained(port, "resourceavailable/sign/presence", "True").await;
    let store = retained(port, "+/sign/+").await;
    assert_eq!(
        store.get("data/sign/state").map(String::as_str),
        Some("True"),
        "{store:?}"
    );
    assert_eq!(store.get("data/sign/speed").map(String::as_str), Some("42"));
    assert_eq!(
        store.get("commandavailable/sign/state").map(String::as_str),
        Some("True")
    );
    assert_eq!(
        store.get("dataavailable/sign/speed").map(String::as_str),
        Some("True")
    );
    assert_eq!(*statuses.lock(), vec![true, false, true]);
    // The resource's subscriptions were renewed too.
    app.send_command("sign", "state", "Later", false).unwrap();
    wait_retained(port, "data/sign/state", "Later").await;
    sign.stop().await.unwrap();
}

/// sgframework's `loop()` style: the caller drives the network.
pub async fn caller_driven_loop(broker: &mut impl TestBroker) {
    let port = broker.port();
    let observer = Observer::start(port, "data/sign/+").await;
    let sign = Resource::new("sign", "127.0.0.1", port);
    fast(&sign);
    sign.register_incoming_command(
        "state",
        CommandOptions::new(),
        |_: &Framework, _: MessageType, _: &str, _: &str, payload: &str| format!("<{payload}>"),
    )
    .unwrap();
    let mut runner = sign.event_loop().unwrap();
    assert!(matches!(sign.start(), Err(SdkError::AlreadyStarted)));
    let app = started_app(port, |_| {}).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut sent = false;
    while observer.payloads("data/sign/state").is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no echo from the caller-driven loop"
        );
        assert!(runner.poll_timeout(Duration::from_millis(50)).await);
        if sign.is_connected() && !sent && sign.wait_ready(Duration::from_millis(50)).await {
            app.send_command("sign", "state", "x", false).unwrap();
            sent = true;
        }
    }
    assert_eq!(observer.payloads("data/sign/state"), vec!["<x>"]);
    runner.stop().await.unwrap();
    wait_retained(port, "resourceavailable/sign/presence", "False").await;
}

/// Errors: sending before start or on unregistered signals, bad names, double start.
pub async fn error_cases(broker: &mut impl TestBroker) {
    let port = broker.port();
    let sign = sign(port);
    assert!(matches!(
        sign.send_data("speed", 1),
        Err(SdkError::NotStarted(_))
    ));
    assert!(matches!(
        sign.send_command("other", "x", 1, false),
        Err(SdkError::NotStarted(_))
    ));
    assert!(matches!(sign.stop().await, Err(SdkError::NotStarted(_))));
    assert!(matches!(
        sign.register_outgoing_data("a/b", None, false),
        Err(SdkError::InvalidName(_))
    ));
    assert!(matches!(
        sign.send_command("+", "x", 1, false),
        Err(SdkError::InvalidName(_))
    ));
    sign.start().unwrap();
    assert!(matches!(sign.start(), Err(SdkError::AlreadyStarted)));
    assert!(
        matches!(sign.send_data("nothing", 1), Err(SdkError::UnregisteredSignal(name)) if name == "nothing")
    );
    // A command is not an outgoing data signal.
    assert!(matches!(
        sign.send_data("state", 1),
        Err(SdkError::UnregisteredSignal(_))
    ));
    assert!(sign.send_data("speed", 1).is_ok());
    sign.stop().await.unwrap();
}

/// The service manager withdraws a vanished resource's signals.
pub async fn service_manager_withdraws_signals(broker: &mut impl TestBroker) {
    service_manager_scenario(broker, false).await;
}

/// The same, with the service manager on an in-process client of polyhub's broker.
pub async fn service_manager_in_process(broker: &mut impl TestBroker) {
    service_manager_scenario(broker, true).await;
}

async fn service_manager_scenario(broker: &mut impl TestBroker, in_process: bool) {
    let port = broker.port();
    let manager = if in_process {
        let client = broker
            .in_process()
            .expect("an in-process broker")
            .local_client("servicemanager-local")
            .unwrap();
        tokio::spawn(async move {
            ServiceManager::new()
                .run_local(client)
                .await
                .map_err(|error| error.to_string())
        })
    } else {
        tokio::spawn(async move {
            ServiceManager::new()
                .run(options("servicemanager", port))
                .await
                .map_err(|error| error.to_string())
        })
    };
    // Let the manager(s) subscribe first.
    tokio::time::sleep(QUIET).await;
    let observer = Observer::start(port, "+/sign/+").await;
    let sign = sign(port);
    let task = sign.start().unwrap();
    assert!(sign.wait_ready(WAIT).await);
    observer
        .wait_for("dataavailable/sign/position", "True")
        .await;
    tokio::time::sleep(QUIET).await;
    task.abort();
    for topic in [
        "commandavailable/sign/state",
        "dataavailable/sign/state",
        "dataavailable/sign/speed",
        "dataavailable/sign/position",
    ] {
        observer.wait_for(topic, "False").await;
        wait_retained(port, topic, "False").await;
    }
    // Back again: the resource's own announcement wins.
    let task = sign.start().unwrap();
    wait_retained(port, "commandavailable/sign/state", "True").await;
    task.abort();
    assert!(
        !manager.is_finished(),
        "the manager stopped: {:?}",
        manager.await
    );
    manager.abort();
}

/// A persistent session (`clean_session = false`, client id = the bare name): commands sent
/// while the resource was away are delivered when it comes back.
pub async fn persistent_session_keeps_commands(broker: &mut impl TestBroker) {
    let port = broker.port();
    let observer = Observer::start(port, "data/keeper/+").await;
    let keeper = Resource::new("keeper", "127.0.0.1", port);
    fast(&keeper);
    keeper.set_clean_session(false);
    keeper
        .register_incoming_command(
            "state",
            CommandOptions::new(),
            |_: &Framework, _: MessageType, _: &str, _: &str, _: &str| {},
        )
        .unwrap();
    let task = keeper.start().unwrap();
    assert!(keeper.wait_ready(WAIT).await);
    task.abort();
    wait_retained(port, "resourceavailable/keeper/presence", "False").await;
    let app = started_app(port, |_| {}).await;
    app.send_command("keeper", "state", "while-away", false)
        .unwrap();
    assert!(app.wait_ready(WAIT).await);
    tokio::time::sleep(QUIET).await;
    assert!(observer.payloads("data/keeper/state").is_empty());
    keeper.start().unwrap();
    observer.wait_for("data/keeper/state", "while-away").await;
    keeper.stop().await.unwrap();
}
