//! The command lifecycle: stored first, sent in order when the device is online, tracked until
//! the device answers, expired when its TTL passes, recovered after a restart.
//!
//! [`CommandService`] is a cheap handle; one task (the dispatcher) owns the lifecycle. Every
//! state change after creation is decided in that task, which is what makes "send, then record
//! `sent`" safe: no reply, cancel or expiry can be handled in between. Submissions are stored
//! by the caller's task (so a slow store write does not hold up the dispatcher) under a
//! per-device lock that also covers handing the command to the dispatcher, so the dispatcher
//! learns of one device's commands in `seq` order.
//!
//! Recording: the dispatcher does not wait for the store. It applies a change to its memory at
//! once and hands the change to a second task (the recorder), which writes it: one command's
//! changes strictly in the order decided (the next starts once the previous is stored), the
//! changes of different commands concurrently, so that the store can commit them together
//! (the SQLite store's group commit). A waiter ([`CommandService::wait`]) is told of a final
//! state only once it is stored, so an API answer `acknowledged` is never undone by a restart.
//! Where the store disagrees (a change refused because another process moved the command, a
//! command deleted with its device, a final change that failed), the recorder tells the
//! dispatcher, which corrects its memory. Without this, every command cost the dispatcher
//! three commits in a row (sent, delivered, acknowledged), which capped a device fleet's
//! commands at what one disk sync after another allows. The recorder also holds a send or
//! delivery for [`STEP_HOLD`] and writes it together with the next step if that comes in
//! time (usually the device's answer): one write per answered command instead of two.
//!
//! What the dispatcher keeps in memory is the unfinished commands only: per device, those
//! waiting to be sent (`pending`, by `seq`) and those sent and awaiting an answer
//! (`inflight`). The store stays the truth; memory is rebuilt from
//! [`Store::unfinished_commands`] at start, and submissions wait until that read is done (a
//! command stored before it would come back both from the read and as a submission).
//!
//! Time: the service reads wall-clock milliseconds through a clock anchored on tokio's
//! `Instant`, so that expiry follows tokio's (pausable) time in tests.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use polyhub_store::{
    Command, CommandState, CommandTransition, Device, IngestBatch, IngestedMessage,
    MAX_COMMAND_PAYLOAD, Millis, NewCommandRecord, Store, StoreError, TelemetryRow, Value,
    now_millis,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backend::{BackendClient, BackendError, BackendEvent, SendOutcome};
use crate::config::CommandConfig;
use crate::id::new_command_id;
use crate::polyglot::Polyglot;

/// Longest command name, in bytes: what the store accepts.
pub use polyhub_store::MAX_COMMAND_NAME_LEN;

/// How long sending to a device waits after its client reported itself unavailable, unless
/// the device reconnects first.
const UNAVAILABLE_RETRY: Duration = Duration::from_secs(1);

/// How many requests may wait for the dispatcher before submitters wait too.
const REQUEST_QUEUE: usize = 1024;

/// Submission locks: one per shard of device ids, enough to keep unrelated devices apart.
const LOCK_SHARDS: usize = 64;

/// A command as a caller asks for it.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandRequest {
    /// What to do: 1 to 128 bytes, usable as one MQTT topic level (no `/`, `+`, `#`).
    pub name: String,
    /// Arguments: any JSON, at most [`MAX_COMMAND_PAYLOAD`] bytes encoded.
    pub payload: serde_json::Value,
    /// Expire unless acknowledged within this many milliseconds (`None`: the configured
    /// default, which may be none).
    pub ttl_ms: Option<u64>,
}

/// Why a command operation was refused or failed. [`CommandError::http_status`] is the REST
/// mapping.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// No such device or command (404).
    #[error("{0}")]
    NotFound(String),
    /// Bad name, TTL or id, or no client for the device's protocol (400).
    #[error("{0}")]
    Invalid(String),
    /// The command is already in a final state (409).
    #[error("{0}")]
    Conflict(String),
    /// The payload is larger than [`MAX_COMMAND_PAYLOAD`] (413).
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The service is shut down or the store is unavailable (503).
    #[error("{0}")]
    Unavailable(String),
    /// The store failed (500).
    #[error("{0}")]
    Failed(String),
}

impl CommandError {
    /// The HTTP status the REST API answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            CommandError::NotFound(_) => 404,
            CommandError::Invalid(_) => 400,
            CommandError::Conflict(_) => 409,
            CommandError::PayloadTooLarge(_) => 413,
            CommandError::Unavailable(_) => 503,
            CommandError::Failed(_) => 500,
        }
    }
}

impl From<StoreError> for CommandError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound(message) => CommandError::NotFound(message),
            StoreError::Invalid(message) => CommandError::Invalid(message),
            StoreError::Conflict(message) => CommandError::Conflict(message),
            StoreError::Unavailable(_) => CommandError::Unavailable(err.to_string()),
            StoreError::Backend(_) => CommandError::Failed(err.to_string()),
        }
    }
}

/// Checks a command name: it becomes an MQTT topic level for sgframework resources.
pub fn validate_command_name(name: &str) -> Result<(), CommandError> {
    let reason = if name.is_empty() {
        Some("must not be empty")
    } else if name.len() > MAX_COMMAND_NAME_LEN {
        Some("is longer than 128 bytes")
    } else if name.contains(['/', '+', '#', '\0']) {
        Some("may not contain '/', '+', '#' or NUL (it must fit one MQTT topic level)")
    } else {
        None
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(CommandError::Invalid(format!(
            "command name {name:?} {reason}"
        ))),
    }
}

/// Wall-clock milliseconds that advance with tokio's clock (see the module docs).
#[derive(Debug, Clone, Copy)]
struct Clock {
    origin: Instant,
    origin_millis: Millis,
}

impl Clock {
    fn start() -> Clock {
        Clock {
            origin: Instant::now(),
            origin_millis: now_millis(),
        }
    }

    fn now(&self) -> Millis {
        let elapsed = i64::try_from(self.origin.elapsed().as_millis()).unwrap_or(i64::MAX / 2);
        self.origin_millis.saturating_add(elapsed)
    }
}

/// Callers of [`CommandService::wait`], by command id; the recorder completes them once the
/// command's final state is stored.
#[derive(Debug, Default)]
struct Waiters {
    by_command: Mutex<HashMap<String, Vec<oneshot::Sender<Command>>>>,
    /// Commands submitted through this service and not final yet. A waiter of one of these
    /// needs no store read to learn it is unfinished: it is certain to be completed (the id
    /// leaves this set before its waiters are completed, so a waiter that registers later
    /// sees it gone and reads the store instead).
    live: Mutex<std::collections::HashSet<String>>,
    /// The last commands that finished, for a waiter that registers after the end (the
    /// device often answers before the submitter has even started waiting): it needs no
    /// store read either.
    recent: Mutex<RecentlyFinished<Command>>,
    /// Commands whose last steps the recorder holds (see [`Recorder::enqueue`]), as decided:
    /// what [`CommandService::get`] answers for them until the write is done.
    held: Mutex<HashMap<String, Command>>,
}

/// How many finished commands [`Waiters`] keeps at most (about a second's worth at 1,000/s).
const RECENTLY_FINISHED: usize = 1024;

/// How many bytes of finished commands [`Waiters`] keeps at most, about: payloads and replies
/// may be up to 64 KiB each, and a thousand of those would be memory held for a shortcut.
const RECENTLY_FINISHED_BYTES: usize = 4 << 20;

/// Finished commands by id, oldest first, at most [`RECENTLY_FINISHED`] of them and
/// [`RECENTLY_FINISHED_BYTES`] in all.
#[derive(Debug)]
struct RecentlyFinished<T> {
    order: VecDeque<(String, usize)>,
    by_id: HashMap<String, T>,
    bytes: usize,
}

impl<T> Default for RecentlyFinished<T> {
    fn default() -> Self {
        RecentlyFinished {
            order: VecDeque::new(),
            by_id: HashMap::new(),
            bytes: 0,
        }
    }
}

impl<T> RecentlyFinished<T> {
    /// Keeps `finished`, about `bytes` large, dropping the oldest beyond the bounds.
    fn keep(&mut self, id: &str, finished: T, bytes: usize) {
        if bytes > RECENTLY_FINISHED_BYTES {
            return;
        }
        if self.by_id.insert(id.to_owned(), finished).is_none() {
            self.order.push_back((id.to_owned(), bytes));
            self.bytes += bytes;
        }
        while self.order.len() > RECENTLY_FINISHED || self.bytes > RECENTLY_FINISHED_BYTES {
            if let Some((oldest, size)) = self.order.pop_front() {
                self.by_id.remove(&oldest);
                self.bytes -= size;
            }
        }
    }
}

impl Waiters {
    fn start_live(&self, id: &str) {
        self.live.lock().insert(id.to_owned());
    }

    fn is_live(&self, id: &str) -> bool {
        self.live.lock().contains(id)
    }

    fn end_live(&self, id: &str) {
        self.live.lock().remove(id);
    }

    fn hold(&self, decided: Command) {
        self.held.lock().insert(decided.id.clone(), decided);
    }

    fn release_hold(&self, id: &str) {
        self.held.lock().remove(id);
    }

    fn held(&self, id: &str) -> Option<Command> {
        self.held.lock().get(id).cloned()
    }

    /// The command is final and stored: its waiters hear it.
    fn finished(&self, command: &Command) {
        // Kept before it leaves `live`, so that a waiter that finds it gone finds it here.
        let bytes = json_size(&command.payload) + command.reply.as_ref().map_or(0, json_size);
        self.recent.lock().keep(&command.id, command.clone(), bytes);
        self.end_live(&command.id);
        self.complete(command);
    }

    /// The command, if it finished lately (final: it cannot have changed since).
    fn recently_finished(&self, id: &str) -> Option<Command> {
        self.recent.lock().by_id.get(id).cloned()
    }

    fn register(&self, id: &str) -> oneshot::Receiver<Command> {
        let (sender, receiver) = oneshot::channel();
        self.by_command
            .lock()
            .entry(id.to_owned())
            .or_default()
            .push(sender);
        receiver
    }

    /// Drops registrations whose waiter has gone (timed out or returned early).
    fn prune(&self, id: &str) {
        let mut by_command = self.by_command.lock();
        if let Some(senders) = by_command.get_mut(id) {
            senders.retain(|sender| !sender.is_closed());
            if senders.is_empty() {
                by_command.remove(id);
            }
        }
    }

    fn complete(&self, command: &Command) {
        let senders = self.by_command.lock().remove(&command.id);
        for sender in senders.into_iter().flatten() {
            let _ = sender.send(command.clone());
        }
    }
}

/// About how many bytes `value` holds (its strings, plus a little per node): enough to bound
/// memory, without encoding it.
fn json_size(value: &serde_json::Value) -> usize {
    const NODE: usize = 16;
    match value {
        serde_json::Value::String(text) => NODE + text.len(),
        serde_json::Value::Array(items) => NODE + items.iter().map(json_size).sum::<usize>(),
        serde_json::Value::Object(fields) => {
            NODE + fields
                .iter()
                .map(|(name, field)| name.len() + json_size(field))
                .sum::<usize>()
        }
        serde_json::Value::Null | serde_json::Value::Bool(_) | serde_json::Value::Number(_) => NODE,
    }
}

/// Removes a waiter's registration once it no longer listens.
struct PruneOnDrop<'a> {
    waiters: &'a Waiters,
    id: &'a str,
}

impl Drop for PruneOnDrop<'_> {
    fn drop(&mut self) {
        self.waiters.prune(self.id);
    }
}

/// What the handle asks of the dispatcher.
#[derive(Debug)]
enum Request {
    /// A command was stored; `stored_online` is the device's presence in the store, used
    /// until the dispatcher hears a presence change itself.
    Submitted {
        command: Box<Command>,
        device: Box<Device>,
        stored_online: bool,
    },
    Cancel {
        id: String,
        reply: oneshot::Sender<Result<Command, CommandError>>,
    },
    Presence {
        device_id: String,
        online: bool,
    },
    Subscribed {
        device_id: String,
    },
}

struct Shared {
    store: Arc<dyn Store>,
    polyglot: Polyglot,
    config: CommandConfig,
    clock: Clock,
    waiters: Arc<Waiters>,
    requests: mpsc::Sender<Request>,
    /// Turns `true` once the dispatcher has read the unfinished commands of earlier runs.
    /// Submissions wait for it: a command stored before that read would be both recovered
    /// and submitted, and so sent twice.
    recovery_read: watch::Receiver<bool>,
    submit_locks: Vec<tokio::sync::Mutex<()>>,
    lock_hasher: std::collections::hash_map::RandomState,
}

/// The handle to the command service. Cheap to clone; every clone talks to the same
/// dispatcher task.
#[derive(Clone)]
pub struct CommandService {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CommandService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommandService")
            .field("protocols", &self.shared.polyglot.protocols())
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl CommandService {
    /// Starts the dispatcher: it reloads the unfinished commands, then serves requests,
    /// backend `events` and the expiry timer until `shutdown` is cancelled (or every handle
    /// is dropped). The returned task ends then.
    pub fn start(
        store: Arc<dyn Store>,
        polyglot: Polyglot,
        events: mpsc::Receiver<BackendEvent>,
        config: CommandConfig,
        shutdown: CancellationToken,
    ) -> (CommandService, JoinHandle<()>) {
        let (requests, request_receiver) = mpsc::channel(REQUEST_QUEUE);
        let clock = Clock::start();
        let waiters = Arc::new(Waiters::default());
        let (records, record_receiver) = mpsc::unbounded_channel();
        let (corrections, correction_receiver) = mpsc::unbounded_channel();
        let (recovery_done, recovery_read) = watch::channel(false);
        let recorder = Recorder {
            store: store.clone(),
            waiters: waiters.clone(),
            corrections,
            queued: HashMap::new(),
            held: HashMap::new(),
            hold_ends: VecDeque::new(),
            hold_ticks_from: Instant::now(),
            running: JoinSet::new(),
            running_ids: HashMap::new(),
        };
        let recorder = tokio::spawn(recorder.run(record_receiver));
        let dispatcher = Dispatcher {
            store: store.clone(),
            polyglot: polyglot.clone(),
            config: config.clone(),
            clock,
            records,
            devices: HashMap::new(),
            index: HashMap::new(),
            expiries: BTreeSet::new(),
            blocked: BTreeSet::new(),
            recovery_done: Some(recovery_done),
        };
        let task = tokio::spawn(dispatcher.run(
            request_receiver,
            events,
            correction_receiver,
            recorder,
            shutdown,
        ));
        let shared = Shared {
            store,
            polyglot,
            config,
            clock,
            waiters,
            requests,
            recovery_read,
            submit_locks: (0..LOCK_SHARDS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            lock_hasher: std::collections::hash_map::RandomState::new(),
        };
        (
            CommandService {
                shared: Arc::new(shared),
            },
            task,
        )
    }

    /// Stores a command for a device (state `queued`), then hands it to the dispatcher, which
    /// sends it when the device is online and every earlier command of the device has gone.
    ///
    /// Errors: `NotFound` (device), `Invalid` (name, TTL, no client for the protocol),
    /// `PayloadTooLarge`, `Unavailable` (service shut down, store unavailable).
    pub async fn submit(
        &self,
        device_id: &str,
        request: CommandRequest,
    ) -> Result<Command, CommandError> {
        let shared = &self.shared;
        if shared.requests.is_closed() {
            return Err(service_stopped());
        }
        validate_command_name(&request.name)?;
        let payload_len = serde_json::to_vec(&request.payload)
            .map_err(|err| CommandError::Invalid(format!("command payload: {err}")))?
            .len();
        if payload_len > MAX_COMMAND_PAYLOAD {
            return Err(CommandError::PayloadTooLarge(format!(
                "command payload is {payload_len} bytes of JSON, more than the {MAX_COMMAND_PAYLOAD} allowed"
            )));
        }
        let ttl_ms = request.ttl_ms.or(shared.config.default_ttl_ms);
        if ttl_ms == Some(0) {
            return Err(CommandError::Invalid(
                "ttl_ms must be at least 1".to_owned(),
            ));
        }
        let device = shared.store.get_device(device_id).await?;
        if shared.polyglot.client(&device.protocol).is_none() {
            return Err(CommandError::Invalid(format!(
                "no polyglot client for protocol {:?}",
                device.protocol
            )));
        }
        // The client's view wins over the stored one anyway (see `is_online`): read the
        // store only for a client that does not know.
        let client_view = shared
            .polyglot
            .client(&device.protocol)
            .and_then(|client| client.is_online(device_id));
        let stored_online = match client_view {
            Some(online) => online,
            None => match shared.store.get_presence(device_id).await {
                Ok(presence) => presence.online,
                Err(err) => {
                    tracing::debug!(device = device_id, error = %err, "no stored presence");
                    false
                }
            },
        };

        if !*shared.recovery_read.borrow() {
            let mut recovery_read = shared.recovery_read.clone();
            if recovery_read.wait_for(|read| *read).await.is_err() {
                return Err(service_stopped());
            }
        }
        let _order = shared.submit_locks[self.lock_shard(device_id)].lock().await;
        let created_at = shared.clock.now();
        let expires_at =
            ttl_ms.map(|ttl| created_at.saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX)));
        let command = shared
            .store
            .create_command(NewCommandRecord {
                id: new_command_id(created_at),
                device_id: device.id.clone(),
                hub_id: device.hub_id.clone(),
                protocol: device.protocol.clone(),
                name: request.name,
                payload: request.payload,
                created_at,
                expires_at,
            })
            .await?;
        count_transition(&command.protocol, CommandState::Queued);
        shared.waiters.start_live(&command.id);
        let submitted = Request::Submitted {
            command: Box::new(command.clone()),
            device: Box::new(device),
            stored_online,
        };
        if shared.requests.send(submitted).await.is_err() {
            shared.waiters.end_live(&command.id);
            // Stored all the same: the next start sends it.
            tracing::warn!(command = %command.id, "command service stopped; the command stays queued");
        }
        Ok(command)
    }

    /// The command as it is now: as stored, or as decided for a send or delivery the service
    /// has not written yet (see `Recorder::enqueue`).
    pub async fn get(&self, id: &str) -> Result<Command, CommandError> {
        if let Some(decided) = self.shared.waiters.held(id) {
            return Ok(decided);
        }
        Ok(self.shared.store.get_command(id).await?)
    }

    /// Waits until the command is acknowledged or otherwise final, or until `timeout` (capped
    /// at `max_wait_ms`) passes, and returns it as it is then.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<Command, CommandError> {
        let shared = &self.shared;
        let timeout = timeout.min(self.max_wait());
        // Declared before the registration so that it runs after the receiver is dropped,
        // however this future ends (including being dropped by an impatient caller).
        let _prune = PruneOnDrop {
            waiters: &shared.waiters,
            id,
        };
        // Registered before reading, so a change landing in between is not missed.
        let settled = shared.waiters.register(id);
        if !shared.waiters.is_live(id) {
            if let Some(finished) = shared.waiters.recently_finished(id) {
                return Ok(finished);
            }
            let current = shared.store.get_command(id).await?;
            if current.state.is_final() {
                return Ok(current);
            }
        }
        match tokio::time::timeout(timeout, settled).await {
            Ok(Ok(command)) => Ok(command),
            // Timed out, or the dispatcher stopped: answer with the command as it is now.
            _ => self.get(id).await,
        }
    }

    /// Cancels a command that is not final yet. Errors: `NotFound`, `Conflict` (already
    /// final), `Unavailable`.
    pub async fn cancel(&self, id: &str) -> Result<Command, CommandError> {
        let (reply, answer) = oneshot::channel();
        let request = Request::Cancel {
            id: id.to_owned(),
            reply,
        };
        self.shared
            .requests
            .send(request)
            .await
            .map_err(|_| service_stopped())?;
        answer.await.map_err(|_| service_stopped())?
    }

    /// Tells the client of the device's protocol that the device was registered (see
    /// [`BackendClient::device_added`]). Devices of a protocol without a client are ignored.
    pub async fn device_added(&self, device: &polyhub_store::Device) -> Result<(), CommandError> {
        let Some(client) = self.shared.polyglot.client(&device.protocol) else {
            return Ok(());
        };
        client
            .device_added(device)
            .await
            .map_err(|error| CommandError::Unavailable(error.to_string()))
    }

    /// A device connected (presence the binary forwards from the hub): its queued commands go
    /// out in order.
    pub async fn device_online(&self, device_id: &str) {
        self.device_presence(device_id, true).await;
    }

    /// A device connected or disconnected, as the hub saw it. Unlike a backend's
    /// [`BackendEvent::Presence`], this is not written to the store (the hub already did).
    pub async fn device_presence(&self, device_id: &str, online: bool) {
        let request = Request::Presence {
            device_id: device_id.to_owned(),
            online,
        };
        self.tell_dispatcher(device_id, request).await;
    }

    /// A device subscribed to something: commands its client held back because the device
    /// could not receive them yet ([`BackendError::Unavailable`], as the embedded broker's
    /// client answers before the device has subscribed to its command topic) are tried again
    /// now rather than at the next retry.
    pub async fn device_subscribed(&self, device_id: &str) {
        let request = Request::Subscribed {
            device_id: device_id.to_owned(),
        };
        self.tell_dispatcher(device_id, request).await;
    }

    async fn tell_dispatcher(&self, device_id: &str, request: Request) {
        if self.shared.requests.send(request).await.is_err() {
            tracing::debug!(
                device = device_id,
                "command service stopped; device event dropped"
            );
        }
    }

    /// The longest [`CommandService::wait`] waits.
    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.shared.config.max_wait_ms)
    }

    /// The protocols commands can be sent over.
    pub fn protocols(&self) -> Vec<&str> {
        self.shared.polyglot.protocols()
    }

    fn lock_shard(&self, device_id: &str) -> usize {
        let mut hasher = self.shared.lock_hasher.build_hasher();
        hasher.write(device_id.as_bytes());
        usize::try_from(hasher.finish() % LOCK_SHARDS as u64).unwrap_or(0)
    }
}

fn service_stopped() -> CommandError {
    CommandError::Unavailable("the command service is not running".to_owned())
}

fn count_transition(protocol: &str, state: CommandState) {
    metrics::counter!(
        "polyhub_commands_total",
        "protocol" => protocol.to_owned(),
        "state" => state.as_str()
    )
    .increment(1);
}

fn count_ignored_reply(reason: &'static str) {
    metrics::counter!("polyhub_command_replies_ignored_total", "reason" => reason).increment(1);
}

const UNFINISHED: [CommandState; 3] = [
    CommandState::Queued,
    CommandState::Sent,
    CommandState::Delivered,
];

/// One device's unfinished commands and what the dispatcher knows of its connection.
#[derive(Debug, Default)]
struct DeviceSlot {
    /// As last read from the store (refreshed by every submission).
    device: Option<Device>,
    /// The last presence heard (events, the hub), else the stored one.
    online: Option<bool>,
    /// Whether `online` came from a presence change rather than from the store.
    presence_heard: bool,
    /// To send, by seq: `queued` ones, and `sent`/`delivered` ones to send again after a
    /// restart.
    pending: BTreeMap<i64, Command>,
    /// Sent and awaiting an answer, by seq.
    inflight: BTreeMap<i64, Command>,
    /// Sending is paused until then after the client reported itself unavailable.
    retry_at: Option<Instant>,
}

impl DeviceSlot {
    fn is_idle(&self) -> bool {
        self.pending.is_empty() && self.inflight.is_empty()
    }
}

/// A state change the dispatcher decided, on its way to the store.
#[derive(Debug)]
struct Record {
    /// The command as the dispatcher held it before the change (`None`: not in memory).
    before: Option<Command>,
    change: CommandTransition,
    /// Who waits for the stored outcome (a cancel request).
    reply: Option<oneshot::Sender<Result<Command, CommandError>>>,
}

/// What the recorder tells the dispatcher where the store disagreed with its memory.
#[derive(Debug)]
enum Correction {
    /// The command is stored differently (another process moved it): adopt the stored one.
    Adopt(Command),
    /// The command is not stored any more (deleted with its device): forget it.
    Forget(String),
    /// A final change could not be stored: track the command again as it was before.
    Retrack(Command),
}

/// A finished store write: the records it carried (one command's steps, in order), what the
/// store answered, and (after a refusal) the command as stored.
type Written = (Vec<Record>, Result<Command, StoreError>, Option<Command>);

/// How long the recorder holds a command's send or delivery before writing it on its own: a
/// step followed within this time by the next (typically the device's answer) is written
/// with it, in one store write (see [`Recorder::enqueue`]).
const STEP_HOLD: Duration = Duration::from_millis(50);

/// Holds end on a grid of this step (so a hold lasts [`STEP_HOLD`] to [`STEP_HOLD`] plus
/// one step): the recorder's timer then moves once per step at most, not once per command.
/// Moving a tokio timer to a new earliest deadline wakes the runtime's I/O driver (an
/// `eventfd` write and an extra `epoll_wait`), which at 1,000 commands/s was more system
/// calls than the commands' own socket writes.
const HOLD_TICK: Duration = Duration::from_millis(10);

/// When a hold that begins at `now` ends: [`STEP_HOLD`] later, rounded up to the next
/// [`HOLD_TICK`] of the grid that starts at `ticks_from`, so that holds begun within one tick
/// end together.
fn hold_end(ticks_from: Instant, now: Instant) -> Instant {
    let tick = HOLD_TICK.as_nanos();
    let since = (now + STEP_HOLD)
        .saturating_duration_since(ticks_from)
        .as_nanos();
    let on_grid = since.div_ceil(tick) * tick;
    ticks_from + Duration::from_nanos(u64::try_from(on_grid).unwrap_or(u64::MAX))
}

/// The task that writes the dispatcher's changes (see the module docs).
struct Recorder {
    store: Arc<dyn Store>,
    waiters: Arc<Waiters>,
    corrections: mpsc::UnboundedSender<Correction>,
    /// Commands with a write under way, each with the changes waiting behind that write.
    queued: HashMap<String, VecDeque<Record>>,
    /// Sends and deliveries not written yet (no write of the command under way), by command.
    held: HashMap<String, Vec<Record>>,
    /// When each hold ends, in the order they began (see [`hold_end`]); an id
    /// whose steps were written meanwhile is skipped.
    hold_ends: VecDeque<(Instant, String)>,
    /// Where the grid of hold ends starts ([`HOLD_TICK`]).
    hold_ticks_from: Instant,
    running: JoinSet<Written>,
    /// Which command each running write is for (to move on even if a write task panicked).
    running_ids: HashMap<tokio::task::Id, String>,
}

impl Recorder {
    /// Runs until the dispatcher has gone and every change it handed over is written.
    async fn run(mut self, mut records: mpsc::UnboundedReceiver<Record>) {
        let mut open = true;
        // One timer for the holds, moved only when the first hold's end changes: a timer made
        // anew at each turn registers again each time (see [`HOLD_TICK`] for what that costs).
        let hold_timer = tokio::time::sleep_until(Instant::now());
        tokio::pin!(hold_timer);
        let mut hold_timer_end = None;
        loop {
            let hold_end = self.hold_ends.front().map(|(end, _)| *end);
            if let Some(end) = hold_end
                && hold_timer_end != Some(end)
            {
                hold_timer.as_mut().reset(end);
                hold_timer_end = Some(end);
            }
            tokio::select! {
                record = records.recv(), if open => match record {
                    Some(record) => self.enqueue(record),
                    None => {
                        open = false;
                        // Shutting down: nothing decided may stay unwritten.
                        let held: Vec<String> = self.held.keys().cloned().collect();
                        for id in held {
                            self.release(&id);
                        }
                        self.hold_ends.clear();
                    }
                },
                () = &mut hold_timer, if hold_end.is_some() => {
                    // Set again next turn, even for the same end: a fired timer stays fired.
                    hold_timer_end = None;
                    self.release_ended_holds();
                }
                Some(written) = self.running.join_next_with_id() => match written {
                    Ok((task, written)) => {
                        let id = self.running_ids.remove(&task);
                        self.finish(written);
                        if let Some(id) = id {
                            self.next_of(&id);
                        }
                    }
                    Err(error) => {
                        tracing::error!(%error, "a command store write did not finish");
                        if let Some(id) = self.running_ids.remove(&error.id()) {
                            self.waiters.release_hold(&id);
                            self.next_of(&id);
                        }
                    }
                },
                else => break,
            }
        }
    }

    /// Writes `record` after the command's write under way, if there is one. Otherwise a send
    /// or delivery is held for [`STEP_HOLD`], and anything else is written at once together
    /// with the command's held steps: when the device answers right after the send, the
    /// command costs one write (and one commit) less. Nothing is lost by holding: a step not
    /// yet written is one that a restart would not need anyway (the command is sent again
    /// whether it was stored `queued`, `sent` or `delivered`), and meanwhile
    /// [`CommandService::get`] shows the command as decided.
    fn enqueue(&mut self, record: Record) {
        let id = record.change.id.clone();
        if let Some(waiting) = self.queued.get_mut(&id) {
            waiting.push_back(record);
            return;
        }
        let holdable = record.reply.is_none()
            && matches!(
                record.change.to,
                CommandState::Sent | CommandState::Delivered
            );
        if holdable {
            if let Some(before) = &record.before {
                self.waiters.hold(applied(before, &record.change));
            }
            let end = hold_end(self.hold_ticks_from, Instant::now());
            match self.held.entry(id) {
                std::collections::hash_map::Entry::Occupied(mut steps) => {
                    steps.get_mut().push(record)
                }
                std::collections::hash_map::Entry::Vacant(steps) => {
                    self.hold_ends.push_back((end, steps.key().clone()));
                    steps.insert(vec![record]);
                }
            }
            return;
        }
        let mut steps = self.held.remove(&id).unwrap_or_default();
        steps.push(record);
        self.begin(id, steps);
    }

    /// Writes the held steps of every hold that has ended.
    fn release_ended_holds(&mut self) {
        let now = Instant::now();
        while let Some((end, _)) = self.hold_ends.front() {
            if *end > now {
                break;
            }
            if let Some((_, id)) = self.hold_ends.pop_front() {
                self.release(&id);
            }
        }
    }

    /// Writes command `id`'s held steps, if it has any.
    fn release(&mut self, id: &str) {
        if let Some(steps) = self.held.remove(id) {
            self.begin(id.to_owned(), steps);
        }
    }

    /// Starts the first write of command `id` (none of its writes is under way).
    fn begin(&mut self, id: String, steps: Vec<Record>) {
        self.queued.insert(id, VecDeque::new());
        self.start(steps);
    }

    /// Starts the write of one command's `steps` (one or more records, in order).
    fn start(&mut self, steps: Vec<Record>) {
        let Some(first) = steps.first() else {
            return;
        };
        let store = self.store.clone();
        let id = first.change.id.clone();
        let task = self.running.spawn(async move {
            let changes = steps.iter().map(|record| record.change.clone()).collect();
            let result = store.transition_command_steps(changes).await;
            let stored = match &result {
                Err(StoreError::Conflict(_)) => store.get_command(&steps[0].change.id).await.ok(),
                _ => None,
            };
            (steps, result, stored)
        });
        self.running_ids.insert(task.id(), id);
    }

    /// Starts the next change of command `id`, if one is waiting.
    fn next_of(&mut self, id: &str) {
        let next = self
            .queued
            .get_mut(id)
            .and_then(|waiting| waiting.pop_front());
        match next {
            Some(record) => self.start(vec![record]),
            None => {
                self.queued.remove(id);
            }
        }
    }

    fn finish(&mut self, (steps, result, stored): Written) {
        let Some(change) = steps.last().map(|record| record.change.clone()) else {
            return;
        };
        self.waiters.release_hold(&change.id);
        // The command as it was decided just before the last step (for a final step that
        // failed: it went out if an earlier step says so, even if that step was not stored).
        let before = steps.last().and_then(|record| record.before.clone());
        let mut moves = Vec::with_capacity(steps.len());
        let mut reply = None;
        for record in steps {
            if record
                .before
                .as_ref()
                .is_none_or(|before| before.state != record.change.to)
            {
                moves.push(record.change.to);
            }
            if record.reply.is_some() {
                reply = record.reply;
            }
        }
        let outcome = match result {
            Ok(command) => {
                for state in moves {
                    count_transition(&command.protocol, state);
                }
                if command.state.is_final() {
                    self.waiters.finished(&command);
                }
                if command.state == CommandState::Acknowledged {
                    let roundtrip = command
                        .acknowledged_at
                        .unwrap_or(change.at)
                        .saturating_sub(command.created_at)
                        .max(0);
                    metrics::histogram!(
                        "polyhub_command_roundtrip_seconds",
                        "protocol" => command.protocol.clone()
                    )
                    .record(roundtrip as f64 / 1000.0);
                }
                Ok(command)
            }
            Err(StoreError::Conflict(message)) => {
                // Moved by someone else (another process on the same store): adopt it.
                tracing::debug!(command = %change.id, %message, "transition refused");
                if let Some(stored) = stored {
                    if stored.state.is_final() {
                        self.waiters.finished(&stored);
                    }
                    self.correct(Correction::Adopt(stored));
                }
                Err(CommandError::Conflict(message))
            }
            Err(StoreError::NotFound(message)) => {
                self.waiters.end_live(&change.id);
                self.correct(Correction::Forget(change.id.clone()));
                Err(CommandError::NotFound(message))
            }
            Err(err) => {
                tracing::warn!(command = %change.id, to = change.to.as_str(), error = %err, "cannot record a command transition");
                // A final change that did not land must not leave the command untracked
                // (memory already let it go); a lost intermediate step changes nothing.
                if change.to.is_final()
                    && let Some(before) = before
                {
                    self.correct(Correction::Retrack(before));
                }
                Err(err.into())
            }
        };
        if let Some(reply) = reply {
            let _ = reply.send(outcome);
        }
    }

    fn correct(&self, correction: Correction) {
        // The dispatcher is gone only at shutdown, when memory no longer matters.
        let _ = self.corrections.send(correction);
    }
}

/// The task that owns the lifecycle.
struct Dispatcher {
    store: Arc<dyn Store>,
    polyglot: Polyglot,
    config: CommandConfig,
    clock: Clock,
    /// To the recorder: every change, in the order decided.
    records: mpsc::UnboundedSender<Record>,
    devices: HashMap<String, DeviceSlot>,
    /// Where each unfinished command is kept: id → (device, seq).
    index: HashMap<String, (String, i64)>,
    /// Unfinished commands with a TTL, by expiry time.
    expiries: BTreeSet<(Millis, String)>,
    /// Devices whose sending is paused after an unavailable client.
    blocked: BTreeSet<String>,
    /// Tells the submissions that recovery has read the store (see `Shared::recovery_read`).
    recovery_done: Option<watch::Sender<bool>>,
}

impl Dispatcher {
    async fn run(
        mut self,
        mut requests: mpsc::Receiver<Request>,
        mut events: mpsc::Receiver<BackendEvent>,
        mut corrections: mpsc::UnboundedReceiver<Correction>,
        recorder: JoinHandle<()>,
        shutdown: CancellationToken,
    ) {
        self.recover().await;
        let mut ticks =
            tokio::time::interval(Duration::from_millis(self.config.expiry_check_ms.max(1)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut events_open = true;
        loop {
            // Unbiased: a flood of submissions must not starve the replies that finish them.
            tokio::select! {
                () = shutdown.cancelled() => break,
                request = requests.recv() => match request {
                    Some(request) => self.handle_request(request).await,
                    None => break,
                },
                event = events.recv(), if events_open => match event {
                    Some(event) => self.handle_event(event).await,
                    // Every client is gone; requests and expiry still work.
                    None => events_open = false,
                },
                Some(correction) = corrections.recv() => self.correct(correction),
                _ = ticks.tick() => self.on_tick().await,
            }
        }
        // The recorder ends once every change handed to it is written.
        drop(self);
        if let Err(error) = recorder.await {
            tracing::error!(%error, "the command recorder failed");
        }
        tracing::debug!("command dispatcher stopped");
    }

    fn correct(&mut self, correction: Correction) {
        match correction {
            Correction::Adopt(stored) => self.mirror(stored),
            Correction::Forget(id) => self.forget(&id),
            Correction::Retrack(command) => {
                if self.tracked(&command.id).is_none() {
                    let device_id = command.device_id.clone();
                    let unsent = command.state == CommandState::Queued;
                    self.track_pending(command.clone());
                    if !unsent && let Some(slot) = self.devices.get_mut(&device_id) {
                        // It went out already: wait for its answer, do not send it again.
                        slot.pending.remove(&command.seq);
                        slot.inflight.insert(command.seq, command);
                    }
                }
            }
        }
    }

    /// Reloads what was unfinished when polyhub stopped.
    async fn recover(&mut self) {
        let unfinished = self.store.unfinished_commands().await;
        // Submissions may store commands from now on: none of theirs is in `unfinished`.
        if let Some(recovery_done) = self.recovery_done.take() {
            recovery_done.send_replace(true);
        }
        let commands = match unfinished {
            Ok(commands) => commands,
            Err(err) => {
                tracing::error!(error = %err, "cannot reload unfinished commands; they stay stored until the next start");
                return;
            }
        };
        if !commands.is_empty() {
            tracing::info!(count = commands.len(), "reloaded unfinished commands");
        }
        let mut device_ids = BTreeSet::new();
        for command in commands {
            if !self.devices.contains_key(&command.device_id) {
                let device = self.store.get_device(&command.device_id).await.ok();
                let online = match self.store.get_presence(&command.device_id).await {
                    Ok(presence) => Some(presence.online),
                    Err(_) => None,
                };
                self.devices.insert(
                    command.device_id.clone(),
                    DeviceSlot {
                        device,
                        online,
                        ..DeviceSlot::default()
                    },
                );
            }
            device_ids.insert(command.device_id.clone());
            self.track_pending(command);
        }
        for device_id in device_ids {
            self.dispatch(&device_id).await;
        }
    }

    async fn handle_request(&mut self, request: Request) {
        match request {
            Request::Submitted {
                command,
                device,
                stored_online,
            } => {
                let device_id = command.device_id.clone();
                let slot = self.devices.entry(device_id.clone()).or_default();
                slot.device = Some(*device);
                if !slot.presence_heard {
                    slot.online = Some(stored_online);
                }
                self.track_pending(*command);
                self.dispatch(&device_id).await;
            }
            Request::Cancel { id, reply } => self.cancel(id, reply),
            Request::Presence { device_id, online } => {
                self.presence_changed(&device_id, online).await;
            }
            Request::Subscribed { device_id } => {
                let retrying = self
                    .devices
                    .get_mut(&device_id)
                    .is_some_and(|slot| slot.retry_at.take().is_some());
                if retrying {
                    self.blocked.remove(&device_id);
                    self.dispatch(&device_id).await;
                }
            }
        }
    }

    async fn handle_event(&mut self, event: BackendEvent) {
        match event {
            BackendEvent::Presence {
                device_id,
                online,
                at,
            } => {
                match self.store.set_presence(&device_id, online, at).await {
                    Ok(()) => {}
                    Err(StoreError::NotFound(_)) => {
                        tracing::debug!(device = %device_id, "presence of an unregistered device ignored");
                        return;
                    }
                    Err(err) => {
                        tracing::warn!(device = %device_id, error = %err, "cannot record presence")
                    }
                }
                self.presence_changed(&device_id, online).await;
            }
            BackendEvent::Telemetry {
                device_id,
                values,
                at,
            } => self.store_telemetry(device_id, values, at).await,
            BackendEvent::Delivered { command_id, .. } => {
                let Some(command) = self.tracked(&command_id).cloned() else {
                    tracing::debug!(command = %command_id, "delivery of an untracked command ignored");
                    return;
                };
                if command.state == CommandState::Sent {
                    let change = transition(
                        &command,
                        &[CommandState::Sent],
                        CommandState::Delivered,
                        self.clock.now(),
                    );
                    self.record(&command, change, None);
                }
            }
            BackendEvent::Reply {
                device_id,
                command_id,
                name,
                ok,
                reply,
                reason,
                ..
            } => {
                let Some(command) =
                    self.reply_target(&device_id, command_id.as_deref(), name.as_deref())
                else {
                    return;
                };
                let mut change = if ok {
                    transition(
                        &command,
                        &UNFINISHED,
                        CommandState::Acknowledged,
                        self.clock.now(),
                    )
                } else {
                    let mut change = transition(
                        &command,
                        &UNFINISHED,
                        CommandState::Failed,
                        self.clock.now(),
                    );
                    change.reason =
                        Some(reason.unwrap_or_else(|| "the device reported an error".to_owned()));
                    change
                };
                change.reply = reply;
                self.record(&command, change, None);
            }
        }
    }

    /// Which tracked command a device's answer is for: the one it names, or (sgframework
    /// echo) the oldest sent one of that name.
    fn reply_target(
        &self,
        device_id: &str,
        command_id: Option<&str>,
        name: Option<&str>,
    ) -> Option<Command> {
        if let Some(command_id) = command_id {
            return match self.tracked(command_id) {
                Some(command) if command.device_id == device_id => Some(command.clone()),
                Some(_) => {
                    tracing::info!(
                        device = device_id,
                        command = command_id,
                        "reply from another device than the command's ignored"
                    );
                    count_ignored_reply("wrong_device");
                    None
                }
                None => {
                    tracing::info!(
                        device = device_id,
                        command = command_id,
                        "reply to an unknown or finished command ignored"
                    );
                    count_ignored_reply("unknown_command");
                    None
                }
            };
        }
        let Some(name) = name else {
            count_ignored_reply("malformed");
            return None;
        };
        // An echo with nothing sent under that name is plain telemetry: not worth a log line.
        self.devices.get(device_id).and_then(|slot| {
            slot.inflight
                .values()
                .find(|command| command.name == name)
                .cloned()
        })
    }

    async fn presence_changed(&mut self, device_id: &str, online: bool) {
        match self.devices.get_mut(device_id) {
            Some(slot) if !online && slot.is_idle() => {
                self.devices.remove(device_id);
            }
            Some(slot) => {
                slot.online = Some(online);
                slot.presence_heard = true;
                if online {
                    // A reconnect is the moment to retry an unavailable client.
                    slot.retry_at = None;
                    self.blocked.remove(device_id);
                }
            }
            // Devices without pending commands need no slot: a command submitted later reads
            // presence from its protocol client (or the store). Keeping one for every client
            // that connects would cost memory per connection, devices or not.
            None => {}
        }
        if online {
            self.dispatch(device_id).await;
        }
    }

    async fn store_telemetry(
        &mut self,
        device_id: String,
        values: Vec<(String, Value)>,
        at: Millis,
    ) {
        let hub_id = match self
            .devices
            .get(&device_id)
            .and_then(|slot| slot.device.as_ref())
        {
            Some(device) => device.hub_id.clone(),
            None => match self.store.get_device(&device_id).await {
                Ok(device) => device.hub_id,
                Err(err) => {
                    tracing::debug!(device = %device_id, error = %err, "telemetry of an unknown device ignored");
                    return;
                }
            },
        };
        let rows = values
            .into_iter()
            .map(|(signal, value)| TelemetryRow {
                device_id: device_id.clone(),
                signal,
                ts: at,
                value,
            })
            .collect();
        let batch = IngestBatch {
            hub_id,
            messages: vec![IngestedMessage {
                seq: None,
                device_id: Some(device_id.clone()),
                received_at: at,
                rows,
                dead_letter: None,
            }],
        };
        if let Err(err) = self.store.write_batch(batch).await {
            tracing::warn!(device = %device_id, error = %err, "cannot store telemetry");
        }
    }

    async fn on_tick(&mut self) {
        let now = self.clock.now();
        while let Some((expires_at, id)) = self.expiries.first().cloned() {
            if expires_at > now {
                break;
            }
            self.expiries.pop_first();
            if let Some(command) = self.tracked(&id).cloned() {
                let mut change = transition(
                    &command,
                    &UNFINISHED,
                    CommandState::Expired,
                    self.clock.now(),
                );
                change.reason = Some(if command.state == CommandState::Queued {
                    "expired before it could be sent".to_owned()
                } else {
                    "expired before the device acknowledged it".to_owned()
                });
                self.record(&command, change, None);
            }
        }
        // A safety net for presence nobody forwarded: a client that knows its devices'
        // connections (the MQTT client's presence table, XMPP presence) is asked again.
        let connected: Vec<String> = self
            .devices
            .iter()
            .filter(|(device_id, slot)| {
                slot.retry_at.is_none()
                    && slot
                        .pending
                        .values()
                        .next()
                        .and_then(|command| self.polyglot.client(&command.protocol))
                        .is_some_and(|client| client.is_online(device_id) == Some(true))
            })
            .map(|(device_id, _)| device_id.clone())
            .collect();
        for device_id in connected {
            self.dispatch(&device_id).await;
        }
        let instant = Instant::now();
        let due: Vec<String> = self
            .blocked
            .iter()
            .filter(|device_id| {
                self.devices
                    .get(*device_id)
                    .is_none_or(|slot| slot.retry_at.is_none_or(|at| at <= instant))
            })
            .cloned()
            .collect();
        for device_id in due {
            self.blocked.remove(&device_id);
            if let Some(slot) = self.devices.get_mut(&device_id) {
                slot.retry_at = None;
            }
            self.dispatch(&device_id).await;
        }
    }

    /// Cancels through the recorder, which answers `reply` once the store has decided.
    fn cancel(&mut self, id: String, reply: oneshot::Sender<Result<Command, CommandError>>) {
        let change = CommandTransition {
            id,
            from: UNFINISHED.to_vec(),
            to: CommandState::Cancelled,
            at: self.clock.now(),
            reason: Some("cancelled".to_owned()),
            reply: None,
        };
        match self.tracked(&change.id).cloned() {
            Some(command) => {
                self.record(&command, change, Some(reply));
            }
            // Not in memory: finished, unknown, or stored by another process. The store
            // answers which (and cancels it in the last case). It goes through the recorder
            // all the same, behind any change of the command still being written.
            None => self.send_record(Record {
                before: None,
                change,
                reply: Some(reply),
            }),
        }
    }

    /// Sends what a device has pending, in order, while it is online.
    async fn dispatch(&mut self, device_id: &str) {
        loop {
            let Some(slot) = self.devices.get(device_id) else {
                return;
            };
            if slot.retry_at.is_some() {
                return;
            }
            let Some(command) = slot.pending.values().next().cloned() else {
                return;
            };
            if command.expires_at.is_some_and(|at| at <= self.clock.now()) {
                let mut change = transition(
                    &command,
                    &UNFINISHED,
                    CommandState::Expired,
                    self.clock.now(),
                );
                change.reason = Some("expired before it could be sent".to_owned());
                self.record(&command, change, None);
                continue;
            }
            let Some(client) = self.polyglot.client(&command.protocol) else {
                // The configuration changed since it was stored.
                let reason = format!("no polyglot client for protocol {:?}", command.protocol);
                self.fail(&command, reason);
                continue;
            };
            let Some(device) = slot.device.clone() else {
                self.fail(
                    &command,
                    format!("device {:?} not found", command.device_id),
                );
                continue;
            };
            if !is_online(client.as_ref(), device_id, slot) {
                return;
            }
            match client.send_command(&device, &command).await {
                Ok(outcome) => self.sent(command, outcome),
                Err(BackendError::Unavailable(reason)) => {
                    tracing::debug!(device = device_id, %reason, "client unavailable; commands stay queued");
                    if let Some(slot) = self.devices.get_mut(device_id) {
                        slot.retry_at = Some(Instant::now() + UNAVAILABLE_RETRY);
                    }
                    self.blocked.insert(device_id.to_owned());
                    return;
                }
                Err(err) => {
                    tracing::info!(device = device_id, command = %command.id, error = %err, "command refused by its client");
                    self.fail(&command, err.to_string());
                }
            }
        }
    }

    /// Records a successful hand-over and moves the command to the in-flight set.
    fn sent(&mut self, command: Command, outcome: SendOutcome) {
        let current = if outcome == SendOutcome::Delivered && command.state == CommandState::Queued
        {
            // Sent and confirmed at once: one step (and one write), `queued` → `delivered`,
            // which the store records as a send (see `applied`).
            let change = transition(
                &command,
                &[CommandState::Queued],
                CommandState::Delivered,
                self.clock.now(),
            );
            self.record(&command, change, None)
        } else {
            self.sent_in_steps(command, outcome)
        };
        if let Some(slot) = self.devices.get_mut(&current.device_id) {
            slot.pending.remove(&current.seq);
            slot.inflight.insert(current.seq, current);
        }
    }

    /// `sent`, then (if the transport confirmed it at once) `delivered`: for a command sent
    /// again after a restart, whose `sent` → `delivered` step must count the new attempt.
    fn sent_in_steps(&mut self, command: Command, outcome: SendOutcome) -> Command {
        let change = transition(
            &command,
            &[command.state],
            CommandState::Sent,
            self.clock.now(),
        );
        let mut current = self.record(&command, change, None);
        if outcome == SendOutcome::Delivered {
            let change = transition(
                &current,
                &[CommandState::Sent],
                CommandState::Delivered,
                self.clock.now(),
            );
            current = self.record(&current, change, None);
        }
        current
    }

    fn fail(&mut self, command: &Command, reason: String) {
        let mut change = transition(command, &UNFINISHED, CommandState::Failed, self.clock.now());
        change.reason = Some(reason);
        self.record(command, change, None);
    }

    /// Applies a change to memory at once and hands it to the recorder (the store is the one
    /// place states change; see the module docs). Returns the command as changed.
    fn record(
        &mut self,
        command: &Command,
        change: CommandTransition,
        reply: Option<oneshot::Sender<Result<Command, CommandError>>>,
    ) -> Command {
        let after = applied(command, &change);
        self.mirror(after.clone());
        self.send_record(Record {
            before: Some(command.clone()),
            change,
            reply,
        });
        after
    }

    fn send_record(&self, record: Record) {
        if let Err(mpsc::error::SendError(record)) = self.records.send(record) {
            // Only while shutting down; the store still holds the previous state.
            tracing::warn!(command = %record.change.id, "command recorder stopped; change not recorded");
        }
    }

    /// Mirrors a command's new state in memory: forgotten when final, else updated where it
    /// is kept.
    fn mirror(&mut self, after: Command) {
        if after.state.is_final() {
            self.forget(&after.id);
        } else if let Some(slot) = self.devices.get_mut(&after.device_id) {
            if let Some(kept) = slot.pending.get_mut(&after.seq) {
                *kept = after;
            } else if let Some(kept) = slot.inflight.get_mut(&after.seq) {
                *kept = after;
            }
        }
    }

    fn track_pending(&mut self, command: Command) {
        if let Some(expires_at) = command.expires_at {
            self.expiries.insert((expires_at, command.id.clone()));
        }
        self.index
            .insert(command.id.clone(), (command.device_id.clone(), command.seq));
        self.devices
            .entry(command.device_id.clone())
            .or_default()
            .pending
            .insert(command.seq, command);
    }

    fn tracked(&self, id: &str) -> Option<&Command> {
        let (device_id, seq) = self.index.get(id)?;
        let slot = self.devices.get(device_id)?;
        slot.pending.get(seq).or_else(|| slot.inflight.get(seq))
    }

    fn forget(&mut self, id: &str) {
        let Some((device_id, seq)) = self.index.remove(id) else {
            return;
        };
        if let Some(slot) = self.devices.get_mut(&device_id) {
            if let Some(command) = slot
                .pending
                .remove(&seq)
                .or_else(|| slot.inflight.remove(&seq))
                && let Some(expires_at) = command.expires_at
            {
                self.expiries.remove(&(expires_at, command.id));
            }
            // Keep a slot whose presence was heard: it saves a store read and the
            // presence race on the next submission.
            if slot.is_idle() && slot.online != Some(true) {
                self.devices.remove(&device_id);
                self.blocked.remove(&device_id);
            }
        }
    }
}

/// The command as the store will have it once `change` is applied (the same rules as the
/// store's: see `Store::transition_command`).
fn applied(command: &Command, change: &CommandTransition) -> Command {
    let mut after = command.clone();
    after.apply(change);
    after
}

/// The client's view wins; otherwise the last presence heard (or stored).
fn is_online(client: &dyn BackendClient, device_id: &str, slot: &DeviceSlot) -> bool {
    client.is_online(device_id).or(slot.online).unwrap_or(false)
}

fn transition(
    command: &Command,
    from: &[CommandState],
    to: CommandState,
    at: Millis,
) -> CommandTransition {
    CommandTransition {
        id: command.id.clone(),
        from: from.to_vec(),
        to,
        at,
        reason: None,
        reply: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abandoned_wait_leaves_no_registration_behind() {
        let waiters = Waiters::default();
        {
            let _prune = PruneOnDrop {
                waiters: &waiters,
                id: "cmd-1",
            };
            let _receiver = waiters.register("cmd-1");
            assert_eq!(waiters.by_command.lock().len(), 1);
        }
        assert!(waiters.by_command.lock().is_empty());
    }

    #[test]
    fn the_recently_finished_are_the_last_ones() {
        let mut recent = RecentlyFinished::default();
        for n in 0..RECENTLY_FINISHED + 10 {
            let id = format!("cmd-{n}");
            recent.keep(&id, n, 10);
            // Kept twice (adopted after a conflict, say) is kept once.
            recent.keep(&id, n, 10);
        }
        assert_eq!(recent.by_id.len(), RECENTLY_FINISHED);
        assert_eq!(recent.order.len(), RECENTLY_FINISHED);
        assert!(!recent.by_id.contains_key("cmd-9"));
        assert_eq!(recent.by_id.get("cmd-10"), Some(&10));
        let newest = RECENTLY_FINISHED + 9;
        assert_eq!(recent.by_id.get(&format!("cmd-{newest}")), Some(&newest));
        assert_eq!(recent.bytes, RECENTLY_FINISHED * 10);
    }

    #[test]
    fn the_recently_finished_stay_within_their_bytes() {
        let mut recent = RecentlyFinished::default();
        let quarter = RECENTLY_FINISHED_BYTES / 4;
        for n in 0..6 {
            recent.keep(&format!("cmd-{n}"), n, quarter);
        }
        assert_eq!(recent.by_id.len(), 4, "the two oldest dropped");
        assert!(!recent.by_id.contains_key("cmd-1"));
        assert!(recent.by_id.contains_key("cmd-2"));
        assert_eq!(recent.bytes, 4 * quarter);
        // One larger than the whole budget is not kept, and drops nothing.
        recent.keep("huge", 99, RECENTLY_FINISHED_BYTES + 1);
        assert!(!recent.by_id.contains_key("huge"));
        assert_eq!(recent.by_id.len(), 4);
    }

    #[test]
    fn holds_end_on_the_tick_grid_between_one_hold_and_one_hold_plus_a_tick_later() {
        let origin = Instant::now();
        let mut ends = Vec::new();
        for offset_ms in [0, 1, 5, 9, 10, 11, 37] {
            let begins = origin + Duration::from_millis(offset_ms);
            let end = hold_end(origin, begins);
            assert!(end >= begins + STEP_HOLD, "{offset_ms} ms: ends too soon");
            assert!(
                end <= begins + STEP_HOLD + HOLD_TICK,
                "{offset_ms} ms: ends too late"
            );
            let since = (end - origin).as_nanos();
            assert_eq!(
                since % HOLD_TICK.as_nanos(),
                0,
                "{offset_ms} ms: off the grid"
            );
            ends.push(end);
        }
        // Holds begun within one tick end together: 1, 5, 9 and 10 ms share an end.
        assert_eq!(ends[1], ends[2]);
        assert_eq!(ends[2], ends[3]);
        assert_eq!(ends[3], ends[4]);
        assert!(ends[5] > ends[4]);
    }

    #[test]
    fn json_sizes_grow_with_the_text_they_hold() {
        let small = json_size(&serde_json::json!({"on": true}));
        let large = json_size(&serde_json::json!({"on": "x".repeat(10_000)}));
        assert!(small < 64, "{small}");
        assert!(large > 10_000, "{large}");
    }

    #[test]
    fn pruning_keeps_the_waiters_still_listening() {
        let waiters = Waiters::default();
        let listening = waiters.register("cmd-1");
        drop(waiters.register("cmd-1"));
        waiters.prune("cmd-1");
        assert_eq!(
            waiters.by_command.lock().get("cmd-1").map(Vec::len),
            Some(1)
        );
        drop(listening);
        waiters.prune("cmd-1");
        assert!(waiters.by_command.lock().is_empty());
    }
}
