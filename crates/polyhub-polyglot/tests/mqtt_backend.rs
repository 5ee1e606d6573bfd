//! The MQTT backend client over a fake bus: wire formats of both channel styles, replies and
//! echoes turned into events, malformed replies ignored, order kept, reconnects, the factory.
//!
//! The real embedded broker (`LocalBus`) lives in the binary crate; the end-to-end path is
//! tested there.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use polyhub_hub::ChannelTemplates;
use polyhub_hub::bus::{
    AckToken, BusClient, BusConnector, BusError, BusMessage, Outgoing, Routing,
};
use polyhub_polyglot::backend::{BackendClient, BackendError, BackendEvent, SendOutcome};
use polyhub_polyglot::backends::mqtt::{
    MqttBackend, MqttBackendOptions, MqttClientFactory, PresenceTable,
};
use polyhub_polyglot::registry::{ClientFactory, FactoryContext};
use polyhub_store::{
    ChannelStyle, Command, CommandState, Device, HubSettings, NewDevice, NewGroup, NewHub,
    SqliteConfig, SqliteStore, Store,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(5);

/// What the fake broker saw and what it will deliver.
#[derive(Debug, Default)]
struct BusState {
    published: Vec<Outgoing>,
    subscriptions: Vec<String>,
    acked: Vec<AckToken>,
    connects: u32,
    /// Messages for the connected client; `None` entries end its connection (recv fails).
    incoming: VecDeque<Option<BusMessage>>,
    next_token: u64,
    refuse_publishes: bool,
    refuse_connects: bool,
    /// Publishes reach nobody, and the broker says so (as an external MQTT 5 broker does for
    /// a device that is connected but has not subscribed yet).
    no_subscribers: bool,
}

/// A broker in memory: one client at a time.
#[derive(Debug, Clone, Default)]
struct FakeBus {
    state: Arc<Mutex<BusState>>,
    arrived: Arc<tokio::sync::Notify>,
}

impl FakeBus {
    fn state(&self) -> std::sync::MutexGuard<'_, BusState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn deliver(&self, topic: &str, payload: &[u8], correlation_data: Option<&str>) {
        let mut state = self.state();
        state.next_token += 1;
        let message = BusMessage {
            topic: topic.to_owned(),
            payload: Bytes::copy_from_slice(payload),
            qos: 1,
            seq: None,
            redelivered: false,
            token: AckToken(state.next_token),
            response_topic: None,
            correlation_data: correlation_data.map(|data| Bytes::copy_from_slice(data.as_bytes())),
            received_at: 1_000,
        };
        state.incoming.push_back(Some(message));
        drop(state);
        self.arrived.notify_one();
    }

    /// Ends the current connection, as a broker restart would.
    fn drop_connection(&self) {
        self.state().incoming.push_back(None);
        self.arrived.notify_one();
    }

    /// Waits until `count` messages were acknowledged (an event is emitted before its
    /// message is acknowledged).
    async fn wait_acked(&self, count: usize) {
        tokio::time::timeout(WAIT, async {
            while self.state().acked.len() < count {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("messages acknowledged within 5 s");
        assert_eq!(self.state().acked.len(), count);
    }

    fn published(&self) -> Vec<Outgoing> {
        self.state().published.clone()
    }
}

#[async_trait]
impl BusConnector for FakeBus {
    async fn connect(
        &self,
        _client_id: &str,
        persistent: bool,
    ) -> Result<Box<dyn BusClient>, BusError> {
        assert!(persistent, "the MQTT backend keeps its session");
        let mut state = self.state();
        if state.refuse_connects {
            return Err(BusError::Closed("broker down".into()));
        }
        state.connects += 1;
        Ok(Box::new(FakeClient { bus: self.clone() }))
    }
}

#[derive(Debug)]
struct FakeClient {
    bus: FakeBus,
}

#[async_trait]
impl BusClient for FakeClient {
    async fn subscribe(&mut self, filters: &[String]) -> Result<(), BusError> {
        self.bus
            .state()
            .subscriptions
            .extend(filters.iter().cloned());
        Ok(())
    }

    async fn unsubscribe(&mut self, _filters: &[String]) -> Result<(), BusError> {
        Ok(())
    }

    /// Cancel safe: a message is taken only when returned.
    async fn recv(&mut self) -> Result<Option<BusMessage>, BusError> {
        loop {
            let arrived = self.bus.arrived.notified();
            if let Some(next) = self.bus.state().incoming.pop_front() {
                return next
                    .map(Some)
                    .ok_or_else(|| BusError::Closed("dropped".into()));
            }
            arrived.await;
        }
    }

    async fn ack(&mut self, tokens: &[AckToken]) -> Result<(), BusError> {
        self.bus.state().acked.extend_from_slice(tokens);
        Ok(())
    }

    async fn publish(&mut self, message: Outgoing) -> Result<Routing, BusError> {
        // Let other tasks run in between, as a real publish would.
        tokio::task::yield_now().await;
        let mut state = self.bus.state();
        if state.refuse_publishes {
            return Err(BusError::Refused("not authorised".into()));
        }
        state.published.push(message);
        Ok(if state.no_subscribers {
            Routing::NoSubscribers
        } else {
            Routing::Matched
        })
    }
}

/// A store with hub `h1` (hub channels: devices d1, d2) and hub `sg` (sgframework: s1), plus
/// `d3` on `h1` for presence checks.
struct World {
    _dir: tempfile::TempDir,
    store: Arc<dyn Store>,
    bus: FakeBus,
    backend: Arc<MqttBackend>,
    presence: PresenceTable,
    events: mpsc::Receiver<BackendEvent>,
    shutdown: CancellationToken,
}

async fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(dir.path(), &SqliteConfig::default()).expect("store opens"));
    store
        .create_group(NewGroup {
            id: "g".into(),
            name: None,
            metadata: None,
        })
        .await
        .unwrap();
    for (hub, channels) in [("h1", ChannelStyle::Hub), ("sg", ChannelStyle::Sgframework)] {
        store
            .create_hub(NewHub {
                id: hub.into(),
                group_id: "g".into(),
                name: None,
                metadata: None,
                settings: HubSettings {
                    channels,
                    ..HubSettings::default()
                },
                desired_state: Default::default(),
            })
            .await
            .unwrap();
    }
    for (device, hub) in [("d1", "h1"), ("d2", "h1"), ("d3", "h1"), ("s1", "sg")] {
        store
            .create_device(NewDevice {
                id: device.into(),
                hub_id: hub.into(),
                name: None,
                protocol: None,
                metadata: None,
            })
            .await
            .unwrap();
    }
    (dir, store)
}

async fn world() -> World {
    let (dir, store) = store().await;
    let bus = FakeBus::default();
    let (sender, events) = mpsc::channel(256);
    let shutdown = CancellationToken::new();
    let presence = PresenceTable::default();
    let backend = MqttBackend::start(
        MqttBackendOptions {
            protocol: "mqtt".into(),
            client_id: "polyhub-polyglot-mqtt".into(),
            channels: ChannelTemplates::default(),
            presence: presence.clone(),
        },
        Arc::new(bus.clone()),
        Arc::clone(&store),
        sender,
        shutdown.clone(),
    )
    .await
    .expect("backend starts");
    World {
        _dir: dir,
        store,
        bus,
        backend,
        presence,
        events,
        shutdown,
    }
}

impl World {
    async fn device(&self, id: &str) -> Device {
        self.store.get_device(id).await.unwrap()
    }

    async fn next_event(&mut self) -> BackendEvent {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("an event within 5 s")
            .expect("the backend is running")
    }

    async fn send(
        &self,
        device: &str,
        id: &str,
        name: &str,
        payload: serde_json::Value,
    ) -> SendOutcome {
        self.backend
            .send_command(
                &self.device(device).await,
                &command(device, id, name, payload),
            )
            .await
            .expect("send works")
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn command(device: &str, id: &str, name: &str, payload: serde_json::Value) -> Command {
    Command {
        id: id.into(),
        device_id: device.into(),
        hub_id: String::new(),
        protocol: "mqtt".into(),
        name: name.into(),
        payload,
        seq: 1,
        state: CommandState::Queued,
        created_at: 0,
        expires_at: None,
        sent_at: None,
        delivered_at: None,
        acknowledged_at: None,
        finished_at: None,
        reason: None,
        reply: None,
        attempts: 0,
    }
}

fn reply(
    device: &str,
    command_id: Option<&str>,
    name: Option<&str>,
    ok: bool,
    value: Option<serde_json::Value>,
    reason: Option<&str>,
) -> BackendEvent {
    BackendEvent::Reply {
        device_id: device.into(),
        command_id: command_id.map(str::to_owned),
        name: name.map(str::to_owned),
        ok,
        reply: value,
        reason: reason.map(str::to_owned),
        at: 1_000,
    }
}

#[tokio::test]
async fn subscribes_the_reply_echo_and_presence_channels() {
    let world = world().await;
    let state = world.bus.state();
    assert_eq!(state.connects, 1);
    assert_eq!(
        state.subscriptions,
        [
            "/+/+/cmd_reply",
            "/+/+/presence",
            "data/+/+",
            "resourceavailable/+/presence"
        ]
    );
}

#[tokio::test]
async fn hub_style_command_is_json_with_its_id_and_reply_channel_as_mqtt5_properties() {
    let world = world().await;
    let outcome = world
        .send("d1", "cmd-1", "reboot", serde_json::json!({"delay": 5}))
        .await;
    // Presence never reported: the broker took it, nothing more is known.
    assert_eq!(outcome, SendOutcome::Sent);
    let published = world.bus.published();
    assert_eq!(published.len(), 1);
    let message = &published[0];
    assert_eq!(message.topic, "/h1/d1/cmd");
    assert_eq!(message.qos, 1);
    assert!(!message.retain);
    assert_eq!(message.correlation_data, Some(Bytes::from_static(b"cmd-1")));
    assert_eq!(message.response_topic.as_deref(), Some("/h1/d1/cmd_reply"));
    let body: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"id": "cmd-1", "name": "reboot", "payload": {"delay": 5}})
    );
}

#[tokio::test]
async fn a_publish_to_an_online_device_is_delivered() {
    let world = world().await;
    assert_eq!(world.backend.is_online("d1"), None);
    world.presence.set("d1", true);
    assert_eq!(world.backend.is_online("d1"), Some(true));
    assert_eq!(
        world
            .send("d1", "cmd-1", "a", serde_json::Value::Null)
            .await,
        SendOutcome::Delivered
    );
    world.presence.set("d1", false);
    assert_eq!(world.backend.is_online("d1"), Some(false));
    assert_eq!(
        world
            .send("d1", "cmd-2", "a", serde_json::Value::Null)
            .await,
        SendOutcome::Sent
    );
}

#[test]
fn the_brokers_sessions_answer_before_reported_presence() {
    // The embedded broker knows "dev" (connected, subscribed) and "quiet" (connected, not
    // subscribed yet); "res" has no session (an sgframework resource reporting by topic).
    let presence = PresenceTable::with_connections(Arc::new(|client_id: &str| match client_id {
        "dev" => Some(true),
        "quiet" => Some(false),
        _ => None,
    }));
    assert_eq!(presence.get("dev"), Some(true));
    assert_eq!(presence.get("quiet"), Some(false));
    presence.set("quiet", true);
    assert_eq!(
        presence.get("quiet"),
        Some(false),
        "the session is the truth"
    );
    assert_eq!(presence.get("res"), None);
    presence.set("res", true);
    assert_eq!(presence.get("res"), Some(true));
    presence.set("res", false);
    assert_eq!(presence.get("res"), Some(false));
}

#[tokio::test]
async fn sgframework_command_is_text_on_the_command_topic() {
    let world = world().await;
    world
        .send("s1", "cmd-1", "power", serde_json::json!("on"))
        .await;
    world
        .send("s1", "cmd-2", "speed", serde_json::json!(42.5))
        .await;
    world
        .send("s1", "cmd-3", "mode", serde_json::json!({"a": [1]}))
        .await;
    let published = world.bus.published();
    let sent: Vec<(&str, &[u8], u8, bool, bool)> = published
        .iter()
        .map(|message| {
            (
                message.topic.as_str(),
                message.payload.as_ref(),
                message.qos,
                message.retain,
                message.correlation_data.is_some(),
            )
        })
        .collect();
    assert_eq!(
        sent,
        [
            ("command/s1/power", &b"on"[..], 1, false, false),
            ("command/s1/speed", &b"42.5"[..], 1, false, false),
            ("command/s1/mode", &br#"{"a":[1]}"#[..], 1, false, false),
        ]
    );
}

#[tokio::test]
async fn replies_become_ok_and_error_events() {
    let mut world = world().await;
    world.bus.deliver(
        "/h1/d1/cmd_reply",
        br#"{"id":"cmd-1","status":"ok","result":{"uptime":3}}"#,
        None,
    );
    assert_eq!(
        world.next_event().await,
        reply(
            "d1",
            Some("cmd-1"),
            None,
            true,
            Some(serde_json::json!({"uptime": 3})),
            None
        )
    );
    world.bus.deliver(
        "/h1/d2/cmd_reply",
        br#"{"id":"cmd-2","status":"error","reason":"jammed"}"#,
        None,
    );
    assert_eq!(
        world.next_event().await,
        reply("d2", Some("cmd-2"), None, false, None, Some("jammed"))
    );
    // An MQTT 5 device may name the command by the correlation data alone.
    world
        .bus
        .deliver("/h1/d1/cmd_reply", br#"{"status":"ok"}"#, Some("cmd-3"));
    assert_eq!(
        world.next_event().await,
        reply("d1", Some("cmd-3"), None, true, None, None)
    );
    world.bus.wait_acked(3).await;
}

#[tokio::test]
async fn malformed_replies_are_ignored_and_acknowledged() {
    let mut world = world().await;
    for payload in [
        &b"garbage"[..],
        br#"{"id":"cmd-1"}"#,
        br#"{"id":"cmd-1","status":"perhaps"}"#,
        br#"{"status":"ok"}"#,
        br#"{"id":17,"status":"ok"}"#,
        br#"[1,2]"#,
    ] {
        world.bus.deliver("/h1/d1/cmd_reply", payload, None);
    }
    // Not reply channels: ignored too.
    world
        .bus
        .deliver("/h1/d1/cmd", br#"{"id":"x","status":"ok"}"#, None);
    world
        .bus
        .deliver("/h1//cmd_reply", br#"{"id":"x","status":"ok"}"#, None);
    world
        .bus
        .deliver("/h1/d1/cmd_reply", br#"{"id":"cmd-9","status":"ok"}"#, None);
    // The first event is the only well-formed reply.
    assert_eq!(
        world.next_event().await,
        reply("d1", Some("cmd-9"), None, true, None, None)
    );
    world.bus.wait_acked(9).await;
}

#[tokio::test]
async fn an_echo_after_a_command_is_a_reply_with_the_signal_name() {
    let mut world = world().await;
    // Telemetry before any command (or a retained value) is not an echo.
    world.bus.deliver("data/s1/power", b"off", None);
    world
        .send("s1", "cmd-1", "power", serde_json::json!("on"))
        .await;
    world
        .send("s1", "cmd-2", "power", serde_json::json!("off"))
        .await;
    world.bus.deliver("data/s1/temperature", b"21.5", None);
    world.bus.deliver("data/s1/power", b"on", None);
    world.bus.deliver("data/s1/power", b"off", None);
    // Both commands echoed: the next data message is telemetry again.
    world.bus.deliver("data/s1/power", b"on", None);
    world
        .bus
        .deliver("/h1/d1/cmd_reply", br#"{"id":"end","status":"ok"}"#, None);
    assert_eq!(
        world.next_event().await,
        reply(
            "s1",
            None,
            Some("power"),
            true,
            Some(serde_json::json!("on")),
            None
        )
    );
    assert_eq!(
        world.next_event().await,
        reply(
            "s1",
            None,
            Some("power"),
            true,
            Some(serde_json::json!("off")),
            None
        )
    );
    assert_eq!(
        world.next_event().await,
        reply("d1", Some("end"), None, true, None, None)
    );
}

#[tokio::test]
async fn sgframework_presence_is_reported_for_sgframework_devices_only() {
    let mut world = world().await;
    world
        .bus
        .deliver("resourceavailable/d1/presence", b"True", None);
    world
        .bus
        .deliver("resourceavailable/ghost/presence", b"True", None);
    world
        .bus
        .deliver("resourceavailable/s1/presence", b"maybe", None);
    world
        .bus
        .deliver("resourceavailable/s1/presence", b"True", None);
    assert_eq!(
        world.next_event().await,
        BackendEvent::Presence {
            device_id: "s1".into(),
            online: true,
            at: 1_000
        }
    );
    assert_eq!(world.backend.is_online("s1"), Some(true));
    assert_eq!(world.backend.is_online("d1"), None);
    world
        .bus
        .deliver("resourceavailable/s1/presence", b"False", None);
    assert_eq!(
        world.next_event().await,
        BackendEvent::Presence {
            device_id: "s1".into(),
            online: false,
            at: 1_000
        }
    );
    assert_eq!(world.backend.is_online("s1"), Some(false));
}

#[tokio::test]
async fn hub_presence_channel_is_reported_for_devices_of_hub_style_hubs() {
    let mut world = world().await;
    // Not this device's hub, an unknown device, an sgframework device, a bad payload: ignored.
    world.bus.deliver("/sg/d1/presence", b"online", None);
    world.bus.deliver("/h1/ghost/presence", b"online", None);
    world.bus.deliver("/sg/s1/presence", b"online", None);
    world.bus.deliver("/h1/d1/presence", b"maybe", None);
    world.bus.deliver("/h1/d1/presence", b"online", None);
    assert_eq!(
        world.next_event().await,
        BackendEvent::Presence {
            device_id: "d1".into(),
            online: true,
            at: 1_000
        }
    );
    assert_eq!(world.backend.is_online("d1"), Some(true));
    assert_eq!(world.backend.is_online("s1"), None);
    // What the device's last will says when its connection is lost.
    world.bus.deliver("/h1/d1/presence", b"offline", None);
    assert_eq!(
        world.next_event().await,
        BackendEvent::Presence {
            device_id: "d1".into(),
            online: false,
            at: 1_000
        }
    );
    assert_eq!(world.backend.is_online("d1"), Some(false));
    world.bus.wait_acked(6).await;
}

#[tokio::test]
async fn commands_go_out_in_call_order() {
    let world = world().await;
    let mut expected = Vec::new();
    for n in 0..60 {
        let device = if n % 3 == 0 {
            "s1"
        } else if n % 2 == 0 {
            "d1"
        } else {
            "d2"
        };
        let id = format!("cmd-{n}");
        world
            .send(device, &id, &format!("n{n}"), serde_json::json!(n))
            .await;
        expected.push(id);
    }
    let order_of = |message: &Outgoing| -> String {
        if let Some(name) = message.topic.strip_prefix("command/s1/n") {
            format!("cmd-{name}")
        } else {
            let body: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
            body["id"].as_str().unwrap().to_owned()
        }
    };
    let published: Vec<String> = world.bus.published().iter().map(order_of).collect();
    assert_eq!(published, expected);
}

#[tokio::test]
async fn concurrent_calls_keep_the_order_they_were_made_in() {
    let world = world().await;
    let device = world.device("d1").await;
    // Calls made in order without waiting for each other: each is polled once (so it has
    // started, and waits behind the earlier ones) before the next is made; then all run at
    // once on their own tasks.
    let mut calls = Vec::new();
    for n in 0..20 {
        let backend = Arc::clone(&world.backend);
        let device = device.clone();
        let mut call = Box::pin(async move {
            let command = command("d1", &format!("cmd-{n}"), "x", serde_json::Value::Null);
            backend.send_command(&device, &command).await
        });
        let finished = std::future::poll_fn(|context| {
            std::task::Poll::Ready(call.as_mut().poll(context).is_ready())
        })
        .await;
        assert!(
            !finished,
            "a send completes only once the bus task published it"
        );
        calls.push(tokio::spawn(call));
    }
    for call in calls {
        tokio::time::timeout(WAIT, call)
            .await
            .expect("sends finish within 5 s")
            .expect("the send task ran")
            .expect("send works");
    }
    let ids: Vec<String> = world
        .bus
        .published()
        .iter()
        .filter_map(|message| message.correlation_data.clone())
        .map(|id| String::from_utf8_lossy(&id).into_owned())
        .collect();
    let expected: Vec<String> = (0..20).map(|n| format!("cmd-{n}")).collect();
    assert_eq!(ids, expected);
}

#[tokio::test]
async fn a_refused_publish_is_rejected() {
    let world = world().await;
    world.bus.state().refuse_publishes = true;
    let result = world
        .backend
        .send_command(
            &world.device("d1").await,
            &command("d1", "cmd-1", "x", serde_json::Value::Null),
        )
        .await;
    assert!(
        matches!(result, Err(BackendError::Rejected(_))),
        "{result:?}"
    );
}

#[tokio::test]
async fn a_command_that_reached_no_subscriber_is_unavailable_and_expects_no_echo() {
    let mut world = world().await;
    world.bus.state().no_subscribers = true;
    for (device, id) in [("d1", "cmd-1"), ("s1", "cmd-2")] {
        let result = world
            .backend
            .send_command(
                &world.device(device).await,
                &command(device, id, "power", serde_json::json!("on")),
            )
            .await;
        // Unavailable keeps the command queued in the service, to be sent again.
        assert!(
            matches!(&result, Err(BackendError::Unavailable(reason)) if reason.contains("no subscriber")),
            "{device}: {result:?}"
        );
    }
    assert_eq!(
        world.bus.published().len(),
        2,
        "both were handed to the broker"
    );
    // The sgframework command went nowhere, so the device's next data is telemetry, not its
    // echo.
    world.bus.deliver("data/s1/power", b"on", None);
    world
        .bus
        .deliver("/h1/d1/cmd_reply", br#"{"id":"end","status":"ok"}"#, None);
    assert_eq!(
        world.next_event().await,
        reply("d1", Some("end"), None, true, None, None)
    );

    // Once someone is subscribed, the same command goes through.
    world.bus.state().no_subscribers = false;
    world
        .backend
        .send_command(
            &world.device("d1").await,
            &command("d1", "cmd-1", "power", serde_json::json!("on")),
        )
        .await
        .expect("sent once the device subscribed");
}

#[tokio::test]
async fn a_device_of_a_missing_hub_is_rejected() {
    let world = world().await;
    let mut device = world.device("d1").await;
    device.hub_id = "nohub".into();
    let result = world
        .backend
        .send_command(
            &device,
            &command("d1", "cmd-1", "x", serde_json::Value::Null),
        )
        .await;
    assert!(
        matches!(result, Err(BackendError::Rejected(_))),
        "{result:?}"
    );
    assert!(world.bus.published().is_empty());
}

#[tokio::test]
async fn after_a_lost_connection_it_reconnects_and_subscribes_again() {
    let mut world = world().await;
    world.bus.state().refuse_connects = true;
    world.bus.drop_connection();
    // While it cannot reconnect, sends fail as unavailable (the command stays queued).
    let mut unavailable = false;
    for _ in 0..100 {
        let result = world
            .backend
            .send_command(
                &world.device("d1").await,
                &command("d1", "cmd-0", "x", serde_json::Value::Null),
            )
            .await;
        if let Err(BackendError::Unavailable(_)) = result {
            unavailable = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(unavailable, "sends fail while the connection is down");
    world.bus.state().refuse_connects = false;
    tokio::time::timeout(WAIT, async {
        while world.bus.state().connects < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("reconnects within 5 s");
    assert_eq!(world.bus.state().subscriptions.len(), 8);
    world
        .send("d1", "cmd-1", "x", serde_json::Value::Null)
        .await;
    world
        .bus
        .deliver("/h1/d1/cmd_reply", br#"{"id":"cmd-1","status":"ok"}"#, None);
    assert_eq!(
        world.next_event().await,
        reply("d1", Some("cmd-1"), None, true, None, None)
    );
}

fn context(
    store: Arc<dyn Store>,
    bus: Option<Arc<dyn BusConnector>>,
) -> (FactoryContext, mpsc::Receiver<BackendEvent>) {
    let (events, receiver) = mpsc::channel(16);
    (
        FactoryContext {
            events,
            store,
            shutdown: CancellationToken::new(),
            bus,
            channels: ChannelTemplates::default(),
        },
        receiver,
    )
}

#[tokio::test]
async fn the_factory_builds_a_client_on_the_embedded_bus_with_shared_presence() {
    let (_dir, store) = store().await;
    let bus = FakeBus::default();
    let presence = PresenceTable::default();
    let factory = MqttClientFactory::new(presence.clone());
    assert_eq!(factory.type_name(), "mqtt");
    let (context, _events) = context(Arc::clone(&store), Some(Arc::new(bus.clone())));
    let client = factory
        .build("mqtt", toml::Table::new(), context.clone())
        .await
        .expect("builds");
    assert_eq!(client.protocol(), "mqtt");
    presence.set("d1", true);
    assert_eq!(client.is_online("d1"), Some(true));
    let outcome = client
        .send_command(
            &store.get_device("d1").await.unwrap(),
            &command("d1", "cmd-1", "x", serde_json::Value::Null),
        )
        .await
        .unwrap();
    assert_eq!(outcome, SendOutcome::Delivered);
    assert_eq!(bus.published().len(), 1);
    context.shutdown.cancel();
}

#[tokio::test]
async fn the_factory_refuses_bad_settings() {
    let (_dir, store) = store().await;
    let factory = MqttClientFactory::default();
    let (without_bus, _events) = context(Arc::clone(&store), None);
    let result = factory.build("mqtt", toml::Table::new(), without_bus).await;
    assert!(matches!(result, Err(BackendError::Config(_))), "{result:?}");

    let bus: Arc<dyn BusConnector> = Arc::new(FakeBus::default());
    let (with_bus, _events) = context(Arc::clone(&store), Some(Arc::clone(&bus)));
    let unknown: toml::Table = toml::from_str("brokr = \"embedded\"").unwrap();
    let result = factory.build("mqtt", unknown, with_bus.clone()).await;
    assert!(
        matches!(&result, Err(BackendError::Config(message)) if message.contains("brokr")),
        "{result:?}"
    );
    let external: toml::Table = toml::from_str("broker = \"127.0.0.1:1883\"").unwrap();
    let result = factory
        .build("mqtt", external.clone(), with_bus.clone())
        .await;
    assert!(matches!(result, Err(BackendError::Config(_))), "{result:?}");

    // With an external connector the address goes to it.
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let recorded = Arc::clone(&seen);
    let external_bus = Arc::clone(&bus);
    let factory = MqttClientFactory::default().with_external(Arc::new(move |address: &str| {
        recorded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(address.to_owned());
        Ok(Arc::clone(&external_bus))
    }));
    let client = factory
        .build("ext", external, with_bus.clone())
        .await
        .expect("builds");
    assert_eq!(client.protocol(), "ext");
    assert_eq!(*seen.lock().unwrap(), ["127.0.0.1:1883"]);
    with_bus.shutdown.cancel();
}

#[tokio::test]
async fn with_an_external_hub_broker_the_hub_bus_is_used_and_embedded_is_refused() {
    let (_dir, store) = store().await;
    let bus = FakeBus::default();
    let factory = MqttClientFactory::new(PresenceTable::default()).with_external_hub();
    let (context, _events) = context(Arc::clone(&store), Some(Arc::new(bus.clone())));
    let embedded: toml::Table = toml::from_str("broker = \"embedded\"").unwrap();
    let result = factory.build("mqtt", embedded, context.clone()).await;
    assert!(
        matches!(&result, Err(BackendError::Config(message)) if message.contains("broker = \"hub\"")),
        "{result:?}"
    );
    assert_eq!(bus.state().connects, 0);
    // The default, "hub", is the external broker the hub uses.
    let client = factory
        .build("mqtt", toml::Table::new(), context.clone())
        .await
        .expect("builds");
    assert_eq!(bus.state().connects, 1);
    let outcome = client
        .send_command(
            &store.get_device("d1").await.unwrap(),
            &command("d1", "cmd-1", "x", serde_json::Value::Null),
        )
        .await
        .unwrap();
    // Nothing reported the device online yet.
    assert_eq!(outcome, SendOutcome::Sent);
    assert_eq!(bus.published().len(), 1);
    context.shutdown.cancel();
}
