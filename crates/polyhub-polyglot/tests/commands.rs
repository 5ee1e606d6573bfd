//! The command lifecycle through `CommandService`, over a real SQLite store and a fake
//! protocol client that records what it is asked to send.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use polyhub_polyglot::{
    BackendClient, BackendError, BackendEvent, CommandConfig, CommandError, CommandRequest,
    CommandService, Polyglot, SendOutcome,
};
use polyhub_store::{
    Command, CommandState, DesiredState, Device, HubSettings, NewCommandRecord, NewDevice,
    NewGroup, NewHub, SqliteConfig, SqliteStore, Store, Value, now_millis,
};
use polyhub_testkit::store::MemoryStore;
use serde_json::json;
use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const PROTOCOL: &str = "fake";
/// Every wait in these tests gives up after this (real time), so a bug fails, not hangs.
const PATIENCE: Duration = Duration::from_secs(5);

/// What the fake client answers to `send_command`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Sent,
    Delivered,
    Unavailable,
    Rejected,
}

#[derive(Debug)]
struct FakeClient {
    mode: Mutex<Mode>,
    /// `None`: the client does not know (the service decides from presence).
    online: Mutex<HashMap<String, bool>>,
    /// (device, command id, name, attempts as stored when sent) in call order.
    sent: Mutex<Vec<(String, String, String, u32)>>,
    /// Sends answered `Unavailable`.
    held_back: Mutex<usize>,
}

impl FakeClient {
    fn new(mode: Mode) -> Arc<FakeClient> {
        Arc::new(FakeClient {
            mode: Mutex::new(mode),
            online: Mutex::new(HashMap::new()),
            sent: Mutex::new(Vec::new()),
            held_back: Mutex::new(0),
        })
    }

    fn set_online(&self, device_id: &str, online: bool) {
        self.online.lock().insert(device_id.to_owned(), online);
    }

    fn sent_ids(&self) -> Vec<String> {
        self.sent
            .lock()
            .iter()
            .map(|(_, id, _, _)| id.clone())
            .collect()
    }
}

#[async_trait]
impl BackendClient for FakeClient {
    fn protocol(&self) -> &str {
        PROTOCOL
    }

    async fn send_command(
        &self,
        device: &Device,
        command: &Command,
    ) -> Result<SendOutcome, BackendError> {
        let mode = *self.mode.lock();
        match mode {
            Mode::Unavailable => {
                *self.held_back.lock() += 1;
                return Err(BackendError::Unavailable("link down".to_owned()));
            }
            Mode::Rejected => return Err(BackendError::Rejected("no address".to_owned())),
            Mode::Sent | Mode::Delivered => {}
        }
        self.sent.lock().push((
            device.id.clone(),
            command.id.clone(),
            command.name.clone(),
            command.attempts,
        ));
        Ok(if mode == Mode::Delivered {
            SendOutcome::Delivered
        } else {
            SendOutcome::Sent
        })
    }

    fn is_online(&self, device_id: &str) -> Option<bool> {
        self.online.lock().get(device_id).copied()
    }
}

/// A store with group g1, hub h1, devices d1, d2 (protocol "fake") and d3 (protocol "coap",
/// which has no client).
async fn new_store() -> (TempDir, Arc<SqliteStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path(), &SqliteConfig::default()).unwrap());
    add_devices(
        store.as_ref(),
        &[("d1", PROTOCOL), ("d2", PROTOCOL), ("d3", "coap")],
    )
    .await;
    (dir, store)
}

/// Adds group g1, hub h1 and `devices` (id, protocol) to `store`.
async fn add_devices(store: &dyn Store, devices: &[(&str, &str)]) {
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
            desired_state: DesiredState::Running,
        })
        .await
        .unwrap();
    for (id, protocol) in devices {
        store
            .create_device(NewDevice {
                id: (*id).to_owned(),
                hub_id: "h1".to_owned(),
                name: None,
                protocol: Some((*protocol).to_owned()),
                metadata: None,
            })
            .await
            .unwrap();
    }
}

struct Harness {
    service: CommandService,
    events: mpsc::Sender<BackendEvent>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Harness {
    fn start(store: Arc<impl Store>, client: Arc<FakeClient>, config: CommandConfig) -> Harness {
        let (events, receiver) = mpsc::channel(64);
        let polyglot =
            Polyglot::from_clients([(PROTOCOL.to_owned(), client as Arc<dyn BackendClient>)]);
        let shutdown = CancellationToken::new();
        let (service, task) =
            CommandService::start(store, polyglot, receiver, config, shutdown.clone());
        Harness {
            service,
            events,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.task)
            .await
            .expect("dispatcher stops")
            .expect("dispatcher does not panic");
    }

    async fn submit(&self, device_id: &str, name: &str) -> Command {
        self.service
            .submit(device_id, request(name, json!({"n": name}), None))
            .await
            .expect("submit")
    }

    async fn reply(&self, device_id: &str, command_id: Option<&str>, name: Option<&str>, ok: bool) {
        self.events
            .send(BackendEvent::Reply {
                device_id: device_id.to_owned(),
                command_id: command_id.map(str::to_owned),
                name: name.map(str::to_owned),
                ok,
                reply: Some(json!({"done": ok})),
                reason: (!ok).then(|| "motor jammed".to_owned()),
                at: now_millis(),
            })
            .await
            .unwrap();
    }
}

fn request(name: &str, payload: serde_json::Value, ttl_ms: Option<u64>) -> CommandRequest {
    CommandRequest {
        name: name.to_owned(),
        payload,
        ttl_ms,
    }
}

/// Polls until `check` holds, failing the test after [`PATIENCE`].
async fn eventually<F: FnMut() -> bool>(what: &str, mut check: F) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn state_of(store: &SqliteStore, id: &str) -> CommandState {
    store.get_command(id).await.unwrap().state
}

async fn eventually_state(store: &SqliteStore, id: &str, state: CommandState) -> Command {
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let command = store.get_command(id).await.unwrap();
        if command.state == state {
            return command;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "command {id} is {:?}, expected {state:?}",
            command.state
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn commands_to_an_online_device_go_out_in_order_and_are_delivered() {
    let (_dir, store) = new_store().await;
    let client = FakeClient::new(Mode::Delivered);
    client.set_online("d1", true);
    let hub = Harness::start(store.clone(), client.clone(), CommandConfig::default());

    let mut ids = Vec::new();
    for i in 0..5 {
        let command = hub.submit("d1", &format!("step{i}")).await;
        assert!(command.id.starts_with("cmd-"));
        assert_eq!(command.hub_id, "h1");
        assert_eq!(command.protocol, PROTOCOL);
        ids.push(command.id);
    }
    eventually("five sends", || client.sent.lock().len() == 5).await;
    assert_eq!(client.sent_ids(), ids, "sent in submission order");
    for id in &ids {
        let command = eventually_state(&store, id, CommandState::Delivered).await;
        assert!(command.sent_at.is_some() && command.delivered_at.is_some());
        assert_eq!(command.attempts, 1);
    }
    hub.stop().await;
}

#[tokio::test]
async fn commands_to_an_offline_device_wait_then_go_out_in_order_when_it_connects() {
    let (_dir, store) = new_store().await;
    // The client does not know presence: the service goes by what it hears (stored: never seen).
    let client = FakeClient::new(Mode::Sent);
    let hub = Harness::start(store.clone(), client.clone(), CommandConfig::default());

    let first = hub.submit("d1", "a").await;
    let second = hub.submit("d1", "b").await;
    let third = hub.submit("d1", "c").await;
    assert_eq!(first.state, CommandState::Queued);
    assert!(first.seq < second.seq && second.seq < third.seq);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        client.sent_ids().is_empty(),
        "nothing goes to an offline device"
    );
    assert_eq!(state_of(&store, &first.id).await, CommandState::Queued);

    // Presence reported by a backend: recorded, and the queue drains in order.
    hub.events
        .send(BackendEvent::Presence {
            device_id: "d1".to_owned(),
            online: true,
            at: now_millis(),
        })
        .await
        .unwrap();
    eventually("three sends", || client.sent.lock().len() == 3).await;
    assert_eq!(
        client.sent_ids(),
        vec![first.id, second.id, third.id.clone()]
    );
    eventually_state(&store, &third.id, CommandState::Sent).await;
    assert!(store.get_presence("d1").await.unwrap().online);

    // Offline again (as the hub saw it): the next command waits for the next connection.
    hub.service.device_presence("d1", false).await;
    let fourth = hub.submit("d1", "d").await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(client.sent.lock().len(), 3);
    hub.service.device_online("d1").await;
    eventually("the fourth send", || client.sent.lock().len() == 4).await;
    assert_eq!(client.sent_ids()[3], fourth.id);
    hub.stop().await;
}

#[tokio::test]
async fn a_device_stored_online_gets_commands_at_once() {
    let (_dir, store) = new_store().await;
    store.set_presence("d2", true, now_millis()).await.unwrap();
    let client = FakeClient::new(Mode::Sent);
    let hub = Harness::start(store.clone(), client.clone(), CommandConfig::default());
    let command = hub.submit("d2", "go").await;
    eventually_state(&store, &command.id, CommandState::Sent).await;
    assert_eq!(client.sent_ids(), vec![command.id]);
    hub.stop().await;
}

#[tokio::test(start_paused = true)]
async fn expired_commands_never_go_out_and_sent_ones_expire_unacknowledged() {
    let (_dir, store) = new_store().await;
    let client = FakeClient::new(Mode::Sent);
    client.set_online("d2", true);
    let config = CommandConfig {
        expiry_check_ms: 100,
        ..CommandConfig::default()
    };
    let hub = Harness::start(store.clone(), client.clone(), config);

    let queued = hub
        .service
        .submit("d1", request("open", json!(null), Some(1_000)))
        .await
        .unwrap();
    let lasting = hub
        .service
        .submit("d1", request("close", json!(null), Some(60_000)))
        .await
        .unwrap();
    let sent = hub
        .service
        .submit("d2", request("blink", json!(null), Some(1_000)))
        .await
        .unwrap();
    assert_eq!(queued.expires_at, Some(queued.created_at + 1_000));

    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // The store writes on its own thread, in real time, which the paused clock does not wait
    // for: poll for what the expiry (due by now) stores.
    let expired = eventually_state(&store, &queued.id, CommandState::Expired).await;
    assert!(expired.finished_at.is_some());
    assert!(expired.sent_at.is_none());
    assert!(expired.reason.unwrap().contains("before it could be sent"));
    let expired_sent = eventually_state(&store, &sent.id, CommandState::Expired).await;
    assert!(expired_sent.sent_at.is_some());

    client.set_online("d1", true);
    hub.service.device_online("d1").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    eventually_state(&store, &lasting.id, CommandState::Sent).await;
    assert_eq!(
        client.sent_ids(),
        vec![sent.id, lasting.id.clone()],
        "the expired command never went out; the next one did"
    );
    hub.stop().await;
}

#[tokio::test]
async fn default_ttl_applies_when_the_request_has_none() {
    let (_dir, store) = new_store().await;
    let config = CommandConfig {
        default_ttl_ms: Some(30_000),
        ..CommandConfig::default()
    };
    let hub = Harness::start(store.clone(), FakeClient::new(Mode::Sent), config);
    let command = hub.submit("d1", "x").await;
    assert_eq!(command.expires_at, Some(command.created_at + 30_000));
    let explicit = hub
        .service
        .submit("d1", request("y", json!(1), Some(5)))
        .await
        .unwrap();
    assert_eq!(explicit.expires_at, Some(explicit.created_at + 5));
    hub.stop().await;
}

#[tokio::test]
async fn a_restart_resends_unacknowledged_commands_but_never_acknowledged_ones() {
    let (_dir, store) = new_store().await;
    let client = FakeClient::new(Mode::Delivered);
    client.set_online("d1", true);
    let hub = Harness::start(store.clone(), client.clone(), CommandConfig::default());
    let acked = hub.submit("d1", "one").await;
    let delivered = hub.submit("d1", "two").await;
    eventually_state(&store, &delivered.id, CommandState::Delivered).await;
    hub.reply("d1", Some(&acked.id), None, true).await;
    eventually_state(&store, &acked.id, CommandState::Acknowledged).await;
    hub.stop().await;

    // Stored while polyhub was down (e.g. by a request that raced the shutdown).
    let created_at = now_millis();
    let queued = store
        .create_command(NewCommandRecord {
            id: polyhub_polyglot::id::new_command_id(created_at),
            device_id: "d1".to_owned(),
            hub_id: "h1".to_owned(),
            protocol: PROTOCOL.to_owned(),
            name: "three".to_owned(),
            payload: json!(3),
            created_at,
            expires_at: None,
        })
        .await
        .unwrap();

    let restarted_client = FakeClient::new(Mode::Sent);
    restarted_client.set_online("d1", true);
    let hub = Harness::start(
        store.clone(),
        restarted_client.clone(),
        CommandConfig::default(),
    );
    eventually("two sends after the restart", || {
        restarted_client.sent.lock().len() == 2
    })
    .await;
    assert_eq!(
        restarted_client.sent_ids(),
        vec![delivered.id.clone(), queued.id.clone()],
        "the unacknowledged one again, then the queued one; never the acknowledged one"
    );
    let resent = eventually_state(&store, &delivered.id, CommandState::Sent).await;
    assert_eq!(resent.attempts, 2);
    assert_eq!(
        eventually_state(&store, &queued.id, CommandState::Sent)
            .await
            .attempts,
        1
    );
    assert_eq!(
        state_of(&store, &acked.id).await,
        CommandState::Acknowledged
    );

    // The restarted service still matches replies to what it reloaded.
    hub.reply("d1", Some(&delivered.id), None, true).await;
    eventually_state(&store, &delivered.id, CommandState::Acknowledged).await;
    hub.stop().await;
}

#[tokio::test]
async fn replies_acknowledge_or_fail_and_wait_returns_the_outcome() {
    let (_dir, store) = new_store().await;
    let client = FakeClient::new(Mode::Sent);
    client.set_online("d1", true);
    let hub = Harness::start(store.clone(), client.clone(), CommandConfig::default());
    let good = hub.submit("d1", "good").await;
    let bad = hub.submit("d1", "bad").await;
    eventually_state(&store, &bad.id, CommandState::Sent).await;

    let waiter = {
        let service = hub.service.clone();
        let id = good.id.clone();
        tokio::spawn(async move { service.wait(&id, Duration::from_secs(10)).await })
    };
    tokio::time::sleep(Duration::from_millis(20)).await;
    hub.reply("d1", Some(&good.id), None, true).await;
    let answered = tokio::time::timeout(PATIENCE, waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(answered.state, CommandState::Acknowledged);
    assert_eq!(answered.reply, Some(json!({"done": true})));
    assert!(answered.acknowledged_at.is_some());

    hub.reply("d1", Some(&bad.id), None, false).await;
    let failed = eventually_state(&store, &bad.id, CommandState::Failed).await;
    assert_eq!(failed.reason.as_deref(), Some("motor jammed"));
    assert_eq!(failed.reply, Some(json!({"done": false})));

    // Waiting on a final command returns at once.
    let again = tokio::time::timeout(
        Duration::from_secs(1),
        hub.service.wait(&bad.id, Duration::from_secs(30)),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(again.state, CommandState::Failed);

    // A late or foreign reply changes nothing.
    hub.reply("d1", Some(&good.id), None, false).await;
    hub.reply("d2", Some(&good.id), None, false).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(state_of(&store, &good.id).await, CommandState::Acknowledged);
    hub.stop().await;
}

#[tokio::test]
async fn a_reply_from_another_device_is_ignored() {
    let (_dir, store) = new_store().await;
    let client = FakeClient::new(Mode::Sent);
    client.set_online("d1", true);
    let hub = Harness::start(store.clone(), client.clone(), CommandConfig::default());
    let command = hub.submit("d1", "go").await;
    eventually_state(&store, &command.id, CommandState::Sent).await;
    hub.reply("d2", Some(&command.id), None, true).await;
    hub.reply("d1", Some("cmd-00000000000000000000000000"), None, true)
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(state_of(&store, &command.id).await, CommandState::Sent);
    hub.stop().await;
}

#[tokio::test]
async fn an_echo_acknowledges_the_oldest_sent_command_of_that_name() {
    let (_dir, store) = new_store().await;
    let client = FakeClient::new(Mode::Delivered);
    client.set_online("d1", true);
    let hub = Harness::start(store.clone(), client.clone(), CommandConfig::default());
    let first_led = hub.submit("d1", "led").await;
    let fan = hub.submit("d1", "fan").await;
    let second_led = hub.submit("d1", "led").await;
    eventually_state(&store, &second_led.id, CommandState::Delivered).await;

    hub.reply("d1", None, Some("led"), true).await;
    let acked = eventually_state(&store, &first_led.id, CommandState::Acknowledged).await;
    assert_eq!(acked.reply, Some(json!({"done": true})));
    assert_eq!(
        state_of(&store, &second_led.id).await,
        CommandState::Delivered
    );
    assert_eq!(state_of(&store, &fan.id).await, CommandState::Delivered);

    hub.reply("d1", None, Some("led"), true).await;
    eventually_state(&store, &second_led.id, CommandState::Acknowledged).await;
    // An echo with nothing outstanding under that name is plain telemetry.
    hub.reply("d1", None, Some("led"), true).await;
    hub.reply("d1", None, Some("temperature"), true).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(state_of(&store, &fan.id).await, CommandState::Delivered);
    hub.stop().await;
}

#[tokio::test]
async fn cancel_stops_a_queued_command_and_refuses_a_final_one() {
    let (_dir, store) = new_store().await;
    let client = FakeClient::new(Mode::Sent);
    let hub = Harness::start(store.clone(), client.clone(), CommandConfig::default());
    let cancelled = hub.submit("d1", "a").await;
    let kept = hub.submit("d1", "b").await;

    let answer = hub.service.cancel(&cancelled.id).await.unwrap();
    assert_eq!(answer.state, CommandState::Cancelled);
    assert!(answer.finished_at.is_some());
    let again = hub.service.cancel(&cancelled.id).await.unwrap_err();
    assert!(matches!(again, CommandError::Conflict(_)), "{again:?}");
    assert_eq!(again.http_status(), 409);
    let unknown = hub
        .service
        .cancel("cmd-00000000000000000000000000")
        .await
        .unwrap_err();
    assert_eq!(unknown.http_status(), 404, "{unknown:?}");

    client.set_online("d1", true);
    hub.service.device_online("d1").await;
    eventually("the kept command", || client.sent.lock().len() == 1).await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(client.sent_ids(), vec![kept.id.clone()]);

    // A sent command can be cancelled too; its late reply is ignored.
    eventually_state(&store, &kept.id, CommandState::Sent).await;
    assert_eq!(
        hub.service.cancel(&kept.id).await.unwrap().state,
        CommandState::Cancelled
    );
    hub.reply("d1", Some(&kept.id), None, true).await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(state_of(&store, &kept.id).await, CommandState::Cancelled);
    hub.stop().await;
}

#[tokio::test]
async fn wait_returns_the_current_command_at_the_timeout() {
    let (_dir, store) = new_store().await;
    let hub = Harness::start(
        store.clone(),
        FakeClient::new(Mode::Sent),
        CommandConfig::default(),
    );
    let command = hub.submit("d1", "slow").await;
    let started = std::time::Instant::now();
    let waited = hub
        .service
        .wait(&command.id, Duration::from_millis(100))
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert_eq!(waited.state, CommandState::Queued);
    let missing = hub
        .service
        .wait("cmd-00000000000000000000000000", Duration::from_millis(10))
        .await
        .unwrap_err();
    assert_eq!(missing.http_status(), 404);
    hub.stop().await;
}

#[tokio::test]
async fn bad_submissions_are_refused_with_their_status() {
    let (_dir, store) = new_store().await;
    let hub = Harness::start(
        store.clone(),
        FakeClient::new(Mode::Sent),
        CommandConfig::default(),
    );
    let service = hub.service.clone();
    let submit = move |device: &'static str, name: &'static str, payload: serde_json::Value| {
        let service = service.clone();
        async move { service.submit(device, request(name, payload, None)).await }
    };

    let unknown = submit("nope", "x", json!(null)).await.unwrap_err();
    assert_eq!(unknown.http_status(), 404, "{unknown}");
    let no_client = submit("d3", "x", json!(null)).await.unwrap_err();
    assert_eq!(no_client.http_status(), 400);
    assert!(
        no_client
            .to_string()
            .contains("no polyglot client for protocol \"coap\""),
        "{no_client}"
    );
    let large = submit("d1", "x", json!("a".repeat(70_000)))
        .await
        .unwrap_err();
    assert_eq!(large.http_status(), 413, "{large}");
    for name in ["", "a/b", "a+", "#"] {
        let bad = submit("d1", name, json!(null)).await.unwrap_err();
        assert_eq!(bad.http_status(), 400, "{name:?}: {bad}");
    }
    let long = hub
        .service
        .submit("d1", request(&"n".repeat(129), json!(null), None))
        .await
        .unwrap_err();
    assert_eq!(long.http_status(), 400);
    let zero_ttl = hub
        .service
        .submit("d1", request("x", json!(null), Some(0)))
        .await
        .unwrap_err();
    assert_eq!(zero_ttl.http_status(), 400);
    assert!(
        store
            .list_commands(polyhub_store::CommandQuery::default())
            .await
            .unwrap()
            .is_empty(),
        "nothing refused was stored"
    );

    hub.stop().await;
    let stopped = submit("d1", "x", json!(null)).await.unwrap_err();
    assert_eq!(stopped.http_status(), 503);
}

#[tokio::test]
async fn a_rejected_send_fails_the_command_and_the_next_one_still_goes() {
    let (_dir, store) = new_store().await;
    let client = FakeClient::new(Mode::Rejected);
    client.set_online("d1", true);
    let hub = Harness::start(store.clone(), client.clone(), CommandConfig::default());
    let refused = hub.submit("d1", "a").await;
    let failed = eventually_state(&store, &refused.id, CommandState::Failed).await;
    assert_eq!(failed.reason.as_deref(), Some("no address"));
    *client.mode.lock() = Mode::Sent;
    let next = hub.submit("d1", "b").await;
    eventually_state(&store, &next.id, CommandState::Sent).await;
    hub.stop().await;
}

#[tokio::test]
async fn an_unavailable_client_keeps_commands_queued_until_it_recovers() {
    let (_dir, store) = new_store().await;
    let client = FakeClient::new(Mode::Unavailable);
    client.set_online("d1", true);
    let config = CommandConfig {
        expiry_check_ms: 20,
        ..CommandConfig::default()
    };
    let hub = Harness::start(store.clone(), client.clone(), config);
    let first = hub.submit("d1", "a").await;
    let second = hub.submit("d1", "b").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(state_of(&store, &first.id).await, CommandState::Queued);
    assert_eq!(state_of(&store, &second.id).await, CommandState::Queued);

    *client.mode.lock() = Mode::Sent;
    // Retried on its own after a pause; a reconnect would retry at once.
    eventually("both sends after the retry", || {
        client.sent.lock().len() == 2
    })
    .await;
    assert_eq!(client.sent_ids(), vec![first.id, second.id]);
    hub.stop().await;
}

/// A device that subscribes is the moment to try again what its client held back for want of
/// a subscription: the commands go out at once, not at the next retry (a second later).
#[tokio::test(start_paused = true)]
async fn a_device_that_subscribes_gets_held_back_commands_at_once() {
    let (_dir, store) = new_store().await;
    let client = FakeClient::new(Mode::Unavailable);
    client.set_online("d1", true);
    let hub = Harness::start(store.clone(), client.clone(), CommandConfig::default());
    let first = hub.submit("d1", "a").await;
    let second = hub.submit("d1", "b").await;
    eventually("the first send held back", || *client.held_back.lock() == 1).await;
    assert_eq!(state_of(&store, &first.id).await, CommandState::Queued);

    *client.mode.lock() = Mode::Sent;
    let subscribed_at = tokio::time::Instant::now();
    hub.service.device_subscribed("d1").await;
    // Another device subscribing changes nothing for d1, and costs nothing.
    hub.service.device_subscribed("d2").await;
    eventually("both sends after the subscription", || {
        client.sent.lock().len() == 2
    })
    .await;
    assert!(
        subscribed_at.elapsed() < Duration::from_millis(500),
        "sent {:?} after the subscription: at the retry, not at once",
        subscribed_at.elapsed()
    );
    assert_eq!(client.sent_ids(), vec![first.id, second.id]);
    hub.stop().await;
}

/// A waiter that comes after the device answered (the usual case for a fast device) is
/// answered from memory: not even an unreachable store stands in its way.
#[tokio::test]
async fn a_wait_after_the_answer_needs_no_store_read() {
    let store = Arc::new(MemoryStore::new());
    add_devices(store.as_ref(), &[("d1", PROTOCOL)]).await;
    let client = FakeClient::new(Mode::Sent);
    client.set_online("d1", true);
    let hub = Harness::start(store.clone(), client.clone(), CommandConfig::default());
    let command = hub.submit("d1", "a").await;
    eventually("the send", || client.sent.lock().len() == 1).await;
    hub.reply("d1", Some(&command.id), None, true).await;
    let deadline = std::time::Instant::now() + PATIENCE;
    while store.get_command(&command.id).await.unwrap().state != CommandState::Acknowledged {
        assert!(std::time::Instant::now() < deadline, "never acknowledged");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    store.set_down(true);
    let waited = hub
        .service
        .wait(&command.id, Duration::from_secs(1))
        .await
        .expect("answered without the store");
    assert_eq!(waited.state, CommandState::Acknowledged);
    store.set_down(false);
    hub.stop().await;
}

/// A started service with devices d1 (online) and d2 on a `MemoryStore`, whose client
/// confirms every send at once, and a command to d1 that the client has been handed (its
/// `delivered` step decided, not yet stored); paused-clock tests use it.
async fn a_sent_command_on_a_memory_store() -> (Arc<MemoryStore>, Arc<FakeClient>, Harness, Command)
{
    let store = Arc::new(MemoryStore::new());
    add_devices(store.as_ref(), &[("d1", PROTOCOL), ("d2", PROTOCOL)]).await;
    let client = FakeClient::new(Mode::Delivered);
    client.set_online("d1", true);
    let hub = Harness::start(store.clone(), client.clone(), CommandConfig::default());
    let command = hub.submit("d1", "a").await;
    eventually("the send", || client.sent.lock().len() == 1).await;
    (store, client, hub, command)
}

/// The device answers right after the send: the delivery and the answer are stored in one
/// write, each step with its own time.
#[tokio::test(start_paused = true)]
async fn an_answer_right_after_the_delivery_is_stored_with_it_in_one_write() {
    let (store, _client, hub, command) = a_sent_command_on_a_memory_store().await;
    hub.reply("d1", Some(&command.id), None, true).await;
    let answered = hub.service.wait(&command.id, PATIENCE).await.unwrap();
    assert_eq!(answered.state, CommandState::Acknowledged);
    let stored = store.get_command(&command.id).await.unwrap();
    assert_eq!(stored, answered, "the waiter heard what is stored");
    assert!(
        stored.sent_at.is_some() && stored.delivered_at.is_some() && stored.attempts == 1,
        "{stored:?}"
    );
    assert_eq!(
        store.command_writes(),
        1,
        "delivery and answer in one write"
    );
    hub.stop().await;
}

/// Nobody answers: the delivery is stored on its own once the hold ends, and meanwhile the
/// service already shows the command delivered.
#[tokio::test(start_paused = true)]
async fn an_unanswered_delivery_is_stored_when_the_hold_ends() {
    let (store, _client, hub, command) = a_sent_command_on_a_memory_store().await;
    let held = hub.service.get(&command.id).await.unwrap();
    assert_eq!(held.state, CommandState::Delivered);
    assert_eq!(
        store.get_command(&command.id).await.unwrap().state,
        CommandState::Queued,
        "held, not written yet"
    );
    tokio::time::sleep(Duration::from_millis(60)).await;
    eventually("the delivery stored", || store.command_writes() == 1).await;
    let stored = store.get_command(&command.id).await.unwrap();
    assert_eq!(stored, held);
    assert_eq!(hub.service.get(&command.id).await.unwrap(), stored);
    hub.stop().await;
}

/// The answer's write fails (with the held delivery in it): the command is tracked again as
/// delivered, not sent again, and a later answer is stored.
#[tokio::test(start_paused = true)]
async fn an_answer_whose_write_fails_leaves_the_command_delivered_not_queued() {
    let (store, client, hub, first) = a_sent_command_on_a_memory_store().await;
    store.set_down(true);
    hub.reply("d1", Some(&first.id), None, true).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    store.set_down(false);
    assert_eq!(store.command_writes(), 0, "nothing stored while down");

    let second = hub.submit("d1", "b").await;
    eventually("the second send", || client.sent.lock().len() >= 2).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        client.sent_ids(),
        vec![first.id.clone(), second.id.clone()],
        "the first went out once"
    );
    hub.reply("d1", Some(&first.id), None, true).await;
    let answered = hub.service.wait(&first.id, PATIENCE).await.unwrap();
    assert_eq!(answered.state, CommandState::Acknowledged);
    assert_eq!(
        store.get_command(&first.id).await.unwrap().state,
        CommandState::Acknowledged
    );
    hub.stop().await;
}

/// Stopping the service writes what it holds at once: nothing decided is left unrecorded, and
/// stopping does not wait for the hold to end.
#[tokio::test(start_paused = true)]
async fn held_deliveries_are_stored_at_shutdown() {
    let (store, _client, hub, command) = a_sent_command_on_a_memory_store().await;
    let stopping = tokio::time::Instant::now();
    hub.stop().await;
    assert!(
        stopping.elapsed() < Duration::from_millis(40),
        "stopped after {:?}: at the hold's end, not at once",
        stopping.elapsed()
    );
    assert_eq!(
        store.get_command(&command.id).await.unwrap().state,
        CommandState::Delivered
    );
}

#[tokio::test]
async fn backend_telemetry_is_stored_like_mqtt_telemetry() {
    let (_dir, store) = new_store().await;
    let hub = Harness::start(
        store.clone(),
        FakeClient::new(Mode::Sent),
        CommandConfig::default(),
    );
    let at = now_millis();
    hub.events
        .send(BackendEvent::Telemetry {
            device_id: "d2".to_owned(),
            values: vec![
                ("temperature".to_owned(), Value::Number(21.5)),
                ("door".to_owned(), Value::Text("open".to_owned())),
            ],
            at,
        })
        .await
        .unwrap();
    // Unknown devices are ignored without stopping the service.
    hub.events
        .send(BackendEvent::Telemetry {
            device_id: "ghost".to_owned(),
            values: vec![("x".to_owned(), Value::Bool(true))],
            at,
        })
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + PATIENCE;
    let latest = loop {
        let latest = store.latest("d2").await.unwrap();
        if latest.len() == 2 || std::time::Instant::now() > deadline {
            break latest;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let values: Vec<(String, Value)> = latest
        .into_iter()
        .map(|row| (row.signal, row.value))
        .collect();
    assert_eq!(
        values,
        vec![
            ("door".to_owned(), Value::Text("open".to_owned())),
            ("temperature".to_owned(), Value::Number(21.5)),
        ]
    );
    assert_eq!(store.get_presence("d2").await.unwrap().last_seen, Some(at));
    let command = hub.submit("d2", "still-serving").await;
    assert_eq!(command.state, CommandState::Queued);
    hub.stop().await;
}

#[tokio::test]
async fn concurrent_submissions_to_one_device_go_out_in_seq_order() {
    let (_dir, store) = new_store().await;
    let client = FakeClient::new(Mode::Sent);
    client.set_online("d1", true);
    let hub = Harness::start(store.clone(), client.clone(), CommandConfig::default());
    let mut tasks = Vec::new();
    for i in 0..20 {
        let service = hub.service.clone();
        tasks.push(tokio::spawn(async move {
            service
                .submit("d1", request(&format!("c{i}"), json!(i), None))
                .await
                .unwrap()
        }));
    }
    let mut commands = Vec::new();
    for task in tasks {
        commands.push(task.await.unwrap());
    }
    commands.sort_by_key(|command| command.seq);
    eventually("twenty sends", || client.sent.lock().len() == 20).await;
    let by_seq: Vec<String> = commands.into_iter().map(|command| command.id).collect();
    assert_eq!(client.sent_ids(), by_seq);
    hub.stop().await;
}

#[tokio::test]
async fn a_client_that_sees_the_device_connect_gets_the_queue_without_a_presence_event() {
    let (_dir, store) = new_store().await;
    let client = FakeClient::new(Mode::Sent);
    client.set_online("d1", false);
    let config = CommandConfig {
        expiry_check_ms: 20,
        ..CommandConfig::default()
    };
    let hub = Harness::start(store.clone(), client.clone(), config);
    let first = hub.submit("d1", "a").await;
    let second = hub.submit("d1", "b").await;
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert!(client.sent_ids().is_empty());
    client.set_online("d1", true);
    eventually("both sends", || client.sent.lock().len() == 2).await;
    assert_eq!(client.sent_ids(), vec![first.id, second.id]);
    hub.stop().await;
}

/// The dispatcher hands state changes to the store without waiting for them; a reply that
/// arrives while the send is still being recorded must be stored after it (so `sent_at` and
/// `attempts` are kept), a waiter must hear `acknowledged` only once it is stored, and an
/// answer that overtook the transport's confirmation still fills `delivered_at`.
#[tokio::test]
async fn a_reply_on_the_heels_of_the_send_is_stored_after_it() {
    for mode in [Mode::Sent, Mode::Delivered] {
        let (_dir, store) = new_store().await;
        let client = FakeClient::new(mode);
        client.set_online("d1", true);
        let hub = Harness::start(store.clone(), client.clone(), CommandConfig::default());
        for round in 0..20 {
            let command = hub.submit("d1", &format!("go{round}")).await;
            let waiter = {
                let service = hub.service.clone();
                let id = command.id.clone();
                tokio::spawn(async move { service.wait(&id, PATIENCE).await })
            };
            eventually("the command handed to the client", || {
                client.sent_ids().contains(&command.id)
            })
            .await;
            hub.reply("d1", Some(&command.id), None, true).await;
            let answered = tokio::time::timeout(PATIENCE, waiter)
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert_eq!(answered.state, CommandState::Acknowledged, "{mode:?}");
            let stored = store.get_command(&command.id).await.unwrap();
            assert_eq!(
                stored, answered,
                "{mode:?}: the waiter heard what is stored"
            );
            let (Some(sent), Some(delivered), Some(acknowledged)) =
                (stored.sent_at, stored.delivered_at, stored.acknowledged_at)
            else {
                panic!("{mode:?}: a step is missing: {stored:?}");
            };
            assert!(
                stored.created_at <= sent && sent <= delivered && delivered <= acknowledged,
                "{mode:?}: {stored:?}"
            );
            assert_eq!(stored.attempts, 1, "{mode:?}");
        }
        hub.stop().await;
    }
}

/// Commands to many devices at once all get through the write-behind path, with their waiters
/// answered, and nothing stays unfinished in the store.
#[tokio::test]
async fn many_commands_in_flight_at_once_are_all_acknowledged_and_stored() {
    let (_dir, store) = new_store().await;
    let client = FakeClient::new(Mode::Delivered);
    client.set_online("d1", true);
    client.set_online("d2", true);
    let hub = Arc::new(Harness::start(
        store.clone(),
        client.clone(),
        CommandConfig::default(),
    ));
    let mut waiters = Vec::new();
    for n in 0..100 {
        let hub = hub.clone();
        let client = client.clone();
        waiters.push(tokio::spawn(async move {
            let device = if n % 2 == 0 { "d1" } else { "d2" };
            let command = hub.submit(device, &format!("c{n}")).await;
            let waiter = {
                let service = hub.service.clone();
                let id = command.id.clone();
                tokio::spawn(async move { service.wait(&id, PATIENCE).await })
            };
            eventually("the command handed to the client", || {
                client.sent_ids().contains(&command.id)
            })
            .await;
            hub.reply(device, Some(&command.id), None, true).await;
            waiter.await.unwrap().unwrap()
        }));
    }
    for waiter in waiters {
        let answered = tokio::time::timeout(PATIENCE, waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(answered.state, CommandState::Acknowledged);
    }
    assert!(store.unfinished_commands().await.unwrap().is_empty());
    let hub = Arc::into_inner(hub).expect("every task finished");
    hub.stop().await;
}

/// Submissions read the device from the store's device cache: a device changed or deleted
/// through the store after earlier commands is seen as it is now.
#[tokio::test]
async fn submissions_see_device_changes_made_after_earlier_commands() {
    let (_dir, store) = new_store().await;
    let client = FakeClient::new(Mode::Delivered);
    client.set_online("d1", true);
    client.set_online("d2", true);
    let hub = Harness::start(store.clone(), client.clone(), CommandConfig::default());
    hub.submit("d1", "first").await;
    hub.submit("d2", "first").await;

    let patch = polyhub_store::DevicePatch {
        protocol: Some("coap".to_owned()),
        ..polyhub_store::DevicePatch::default()
    };
    store.update_device("d1", patch).await.unwrap();
    let moved = hub
        .service
        .submit("d1", request("second", json!(null), None))
        .await
        .unwrap_err();
    assert_eq!(moved.http_status(), 400, "{moved}");
    assert!(moved.to_string().contains("\"coap\""), "{moved}");

    store.delete_device("d2").await.unwrap();
    let deleted = hub
        .service
        .submit("d2", request("second", json!(null), None))
        .await
        .unwrap_err();
    assert_eq!(deleted.http_status(), 404, "{deleted}");

    let back = polyhub_store::DevicePatch {
        protocol: Some(PROTOCOL.to_owned()),
        ..polyhub_store::DevicePatch::default()
    };
    store.update_device("d1", back).await.unwrap();
    let again = hub.submit("d1", "third").await;
    assert_eq!(again.protocol, PROTOCOL);
    eventually("the third command goes out", || {
        client.sent_ids().contains(&again.id)
    })
    .await;
    hub.stop().await;
}

/// A command submitted while the dispatcher is still reading the unfinished commands of
/// earlier runs is sent once: it must not be both recovered and submitted. The race is
/// narrow, so the test starts the service many times and submits at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_submitted_during_recovery_is_sent_once() {
    for round in 0..40 {
        let (_dir, store) = new_store().await;
        let client = FakeClient::new(Mode::Sent);
        client.set_online("d1", true);
        let hub = Harness::start(store.clone(), client.clone(), CommandConfig::default());
        let submissions: Vec<_> = (0..3)
            .map(|i| {
                let service = hub.service.clone();
                tokio::spawn(async move {
                    service
                        .submit("d1", request(&format!("r{round}c{i}"), json!(i), None))
                        .await
                        .unwrap()
                })
            })
            .collect();
        for submission in submissions {
            submission.await.unwrap();
        }
        eventually("three sends", || client.sent.lock().len() >= 3).await;
        // Time for a second send of a command that was also recovered.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let sent = client.sent_ids();
        let distinct: std::collections::BTreeSet<&String> = sent.iter().collect();
        assert_eq!(
            (sent.len(), distinct.len()),
            (3, 3),
            "round {round}: sent {sent:?}"
        );
        hub.stop().await;
    }
}
