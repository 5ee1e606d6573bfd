//! Domain types of the registry (groups own hubs, hubs own devices) and of telemetry.
//!
//! These types are the storage boundary: every backend reads and writes exactly these, and
//! the REST API serialises them as they are (JSON field names are part of the public API).
//! Times are milliseconds since the Unix epoch ([`Millis`]).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::StoreError;

/// Milliseconds since the Unix epoch, UTC.
pub type Millis = i64;

/// The current time as [`Millis`].
pub fn now_millis() -> Millis {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX)
}

/// Longest id accepted for a group, hub or device.
pub const MAX_ID_LEN: usize = 64;

/// Checks that `id` can name a group, hub or device.
///
/// Ids appear as one MQTT topic level and in URL paths, so they are restricted to
/// `[A-Za-z0-9_.-]`, 1 to [`MAX_ID_LEN`] bytes, and may not be `.` or `..`.
pub fn validate_id(kind: &'static str, id: &str) -> Result<(), StoreError> {
    let reason = if id.is_empty() {
        Some("must not be empty")
    } else if id.len() > MAX_ID_LEN {
        Some("is longer than 64 bytes")
    } else if id == "." || id == ".." {
        Some("must not be '.' or '..'")
    } else if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
    {
        Some("may only contain A-Z, a-z, 0-9, '_', '.' and '-'")
    } else {
        None
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(StoreError::Invalid(format!("{kind} id {id:?} {reason}"))),
    }
}

/// A customer: owns hubs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Group {
    pub id: String,
    pub name: String,
    /// Free-form JSON object.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub metadata: serde_json::Value,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// Fields to create a group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewGroup {
    pub id: String,
    /// Defaults to the id.
    #[serde(default)]
    pub name: Option<String>,
    /// A JSON object; defaults to `{}`.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub metadata: Option<serde_json::Value>,
}

/// Changes to a group; absent fields stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct GroupPatch {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub metadata: Option<serde_json::Value>,
}

/// How a hub's parser turns a payload into values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Decoder {
    /// JSON if the payload parses as JSON, else a number, a boolean, else text.
    #[default]
    Auto,
    /// A JSON object of named values, or a JSON scalar.
    Json,
    /// A plain decimal number.
    Number,
    /// UTF-8 text.
    String,
    /// `true`/`false`/`1`/`0`/`on`/`off`.
    Boolean,
}

/// Which topics a hub's devices use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ChannelStyle {
    /// The hub channels: `/<hub>/<device>/data` and `/<hub>/<device>/cmd` (templates configurable).
    #[default]
    Hub,
    /// sgframework resources: `data/<device>/<signal>`, presence from
    /// `resourceavailable/<device>/presence`.
    Sgframework,
}

/// Whether a hub's parser runs as a task of the polyhub process or as its own OS process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    #[default]
    Task,
    Process,
}

/// Per-hub parser settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields, default)]
pub struct HubSettings {
    pub decoder: Decoder,
    pub channels: ChannelStyle,
    /// `None`: the configured default (`[hub] isolation`).
    pub isolation: Option<Isolation>,
}

/// Whether the operator wants a hub's parser running. Survives restarts: on start-up the
/// manager starts every hub whose desired state is `Running`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DesiredState {
    #[default]
    Running,
    Stopped,
}

/// A hub: owned by a group, owns devices, ingested by one parser.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Hub {
    pub id: String,
    pub group_id: String,
    pub name: String,
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub metadata: serde_json::Value,
    pub settings: HubSettings,
    pub desired_state: DesiredState,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// Fields to create a hub.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewHub {
    pub id: String,
    pub group_id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub metadata: Option<serde_json::Value>,
    #[serde(default)]
    pub settings: HubSettings,
    /// Defaults to `running`: a new hub is ingested at once.
    #[serde(default)]
    pub desired_state: DesiredState,
}

/// Changes to a hub; absent fields stay as they are. The group cannot change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct HubPatch {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub metadata: Option<serde_json::Value>,
    #[serde(default)]
    pub settings: Option<HubSettings>,
}

/// Default protocol of a device.
pub const DEFAULT_PROTOCOL: &str = "mqtt";

/// A device. Its id is unique across all hubs (commands and URLs address it by id alone).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Device {
    pub id: String,
    pub hub_id: String,
    pub name: String,
    /// Which backend client reaches it (`mqtt`, `xmpp`, ...).
    pub protocol: String,
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub metadata: serde_json::Value,
    pub created_at: Millis,
    pub updated_at: Millis,
}

/// Fields to create a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewDevice {
    pub id: String,
    pub hub_id: String,
    #[serde(default)]
    pub name: Option<String>,
    /// Defaults to [`DEFAULT_PROTOCOL`].
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub metadata: Option<serde_json::Value>,
}

/// Changes to a device; absent fields stay as they are. The hub cannot change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DevicePatch {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub metadata: Option<serde_json::Value>,
}

/// One telemetry value. JSON: a number, a string or a boolean.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(untagged)]
pub enum Value {
    Bool(bool),
    Number(f64),
    Text(String),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Bool(value) => write!(f, "{value}"),
            Value::Number(value) => write!(f, "{value}"),
            Value::Text(value) => f.write_str(value),
        }
    }
}

/// One stored sample: a device's signal at a time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TelemetryRow {
    pub device_id: String,
    pub signal: String,
    /// When polyhub received the message (ms since the epoch).
    pub ts: Millis,
    pub value: Value,
}

/// One received message's outcome, written atomically with the rest of its batch.
#[derive(Debug, Clone, PartialEq)]
pub struct IngestedMessage {
    /// The broker's unique sequence number of this message, when the broker provides one.
    /// A message whose `(hub, seq)` was already committed is skipped as a redelivery.
    pub seq: Option<u64>,
    /// The device it came from (for last-seen), when known.
    pub device_id: Option<String>,
    pub received_at: Millis,
    /// Rows decoded from it (may be empty, e.g. an empty JSON object).
    pub rows: Vec<TelemetryRow>,
    /// Set when the payload could not be decoded: the message goes to the dead letters.
    pub dead_letter: Option<NewDeadLetter>,
}

/// A batch of messages of one hub, committed in one transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct IngestBatch {
    pub hub_id: String,
    pub messages: Vec<IngestedMessage>,
}

/// What committing a batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BatchOutcome {
    pub rows_written: u64,
    pub dead_letters_written: u64,
    /// Messages skipped because their seq was already committed.
    pub duplicates_skipped: u64,
}

/// A message that could not be ingested, kept with the reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NewDeadLetter {
    pub hub_id: String,
    pub device_id: Option<String>,
    pub topic: String,
    /// The payload as received (JSON: an array of bytes is avoided; see [`DeadLetter`]).
    #[serde(skip)]
    pub payload: Vec<u8>,
    pub reason: String,
    pub received_at: Millis,
}

/// A stored dead letter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeadLetter {
    pub id: i64,
    pub hub_id: String,
    pub device_id: Option<String>,
    pub topic: String,
    /// The payload as text when it is valid UTF-8 (lossy otherwise).
    pub payload: String,
    /// Payload size in bytes.
    pub payload_len: u64,
    pub reason: String,
    pub received_at: Millis,
}

/// Query for stored telemetry of one device, oldest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeQuery {
    pub device_id: String,
    /// Only this signal; all signals when `None`.
    pub signal: Option<String>,
    /// Inclusive lower bound.
    pub from: Option<Millis>,
    /// Exclusive upper bound.
    pub to: Option<Millis>,
    /// At most this many rows (the backend caps it at [`MAX_PAGE`]).
    pub limit: u32,
    /// Continue after this cursor (from [`RangePage::next`]).
    pub after: Option<String>,
}

/// Largest page any list or range query returns.
pub const MAX_PAGE: u32 = 10_000;

/// One page of a range query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RangePage {
    pub rows: Vec<TelemetryRow>,
    /// Opaque cursor for the next page; `None` on the last page.
    pub next: Option<String>,
}

/// Query for numeric telemetry of one signal, bucketed by time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownsampleQuery {
    pub device_id: String,
    pub signal: String,
    pub from: Millis,
    pub to: Millis,
    /// Bucket width, > 0. Buckets start at multiples of it since the epoch.
    pub interval_ms: i64,
}

/// One time bucket of numeric values (booleans count as 0/1; text is ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Bucket {
    pub start: Millis,
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub avg: f64,
}

/// A device's connection state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Presence {
    pub device_id: String,
    pub online: bool,
    /// Last time anything was heard from it (connection change or message).
    pub last_seen: Option<Millis>,
    /// When `online` last changed.
    pub changed_at: Option<Millis>,
}

/// What happened to a hub's parser.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ParserEventKind {
    Started,
    Stopped,
    /// It ended on its own (error, panic, process exit); `reason` says why.
    Failed,
    /// The manager started it again after a failure.
    Restarted,
}

/// A parser event to record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewParserEvent {
    pub hub_id: String,
    pub kind: ParserEventKind,
    pub reason: Option<String>,
    pub at: Millis,
}

/// A recorded parser event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ParserEvent {
    pub id: i64,
    pub hub_id: String,
    pub kind: ParserEventKind,
    pub reason: Option<String>,
    pub at: Millis,
}

/// Paging for registry lists: ordered by id, starting after `after`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// Only items that belong to this parent (a group's hubs, a hub's devices).
    pub parent: Option<String>,
    /// Start after this id.
    pub after: Option<String>,
    /// At most this many (capped at [`MAX_PAGE`]; 0 means the default of 100).
    pub limit: u32,
}

/// Where a hub's parser is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ParserState {
    Starting,
    Running,
    /// Failed and waiting to be restarted.
    Backoff,
    Stopped,
}

/// A hub parser as the manager sees it now (not stored: rebuilt on start-up).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ParserStatus {
    pub hub_id: String,
    pub state: ParserState,
    pub isolation: Isolation,
    /// OS process id in process isolation.
    pub pid: Option<u32>,
    /// Restarts after failures since polyhub started.
    pub restarts: u32,
    /// Why it last failed.
    pub last_error: Option<String>,
    /// When `state` last changed.
    pub since: Millis,
    /// Devices whose channels it is subscribed to.
    pub devices: u64,
    pub messages_in: u64,
    pub rows_written: u64,
    pub dead_letters: u64,
    pub duplicates_skipped: u64,
    /// Size (messages) of the last committed batch.
    pub last_batch_messages: u64,
    /// Receive-to-commit time of the oldest message of the last batch, in milliseconds.
    pub last_lag_ms: u64,
}

/// Where a command is in its life. `Queued → Sent → Delivered → Acknowledged`, or it ends
/// `Expired`, `Failed` or `Cancelled`. Every step is timestamped on the [`Command`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum CommandState {
    /// Stored, waiting for the device (offline, or behind earlier commands).
    Queued,
    /// Handed to the protocol client (published / sent as a stanza).
    Sent,
    /// The transport confirmed it reached the device (broker routed it to the device's
    /// session / XMPP delivery receipt).
    Delivered,
    /// The device answered (sgframework echo, a reply on the hub reply channel, an XMPP reply).
    Acknowledged,
    /// Its TTL passed before it was acknowledged; if still queued it never went out.
    Expired,
    /// The device or the protocol client reported an error.
    Failed,
    /// Cancelled through the API before it was acknowledged.
    Cancelled,
}

impl CommandState {
    /// The state's name as the API and the database spell it (`queued`, `acknowledged`).
    pub fn as_str(self) -> &'static str {
        match self {
            CommandState::Queued => "queued",
            CommandState::Sent => "sent",
            CommandState::Delivered => "delivered",
            CommandState::Acknowledged => "acknowledged",
            CommandState::Expired => "expired",
            CommandState::Failed => "failed",
            CommandState::Cancelled => "cancelled",
        }
    }

    /// The state named `name` as [`CommandState::as_str`] spells it.
    pub fn from_name(name: &str) -> Option<CommandState> {
        Some(match name {
            "queued" => CommandState::Queued,
            "sent" => CommandState::Sent,
            "delivered" => CommandState::Delivered,
            "acknowledged" => CommandState::Acknowledged,
            "expired" => CommandState::Expired,
            "failed" => CommandState::Failed,
            "cancelled" => CommandState::Cancelled,
            _ => return None,
        })
    }

    /// Whether nothing more can happen to a command in this state.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            CommandState::Acknowledged
                | CommandState::Expired
                | CommandState::Failed
                | CommandState::Cancelled
        )
    }
}

/// Largest command payload accepted (JSON-encoded), in bytes.
pub const MAX_COMMAND_PAYLOAD: usize = 64 * 1024;

/// Longest command name accepted, in bytes (it becomes an MQTT topic level for sgframework
/// devices).
pub const MAX_COMMAND_NAME_LEN: usize = 128;

/// A command to a device, stored before it is delivered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Command {
    /// Unique id (`cmd-` followed by 26 characters, sortable by creation time).
    pub id: String,
    pub device_id: String,
    pub hub_id: String,
    /// The device's protocol when the command was created: selects the backend client.
    pub protocol: String,
    /// What to do (for sgframework resources: the command signal name).
    pub name: String,
    /// Arguments: any JSON value.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub payload: serde_json::Value,
    /// Per-device position: commands to one device go out in this order.
    pub seq: i64,
    pub state: CommandState,
    pub created_at: Millis,
    /// When it expires unless acknowledged before (`created_at + ttl`).
    pub expires_at: Option<Millis>,
    pub sent_at: Option<Millis>,
    pub delivered_at: Option<Millis>,
    pub acknowledged_at: Option<Millis>,
    /// When it became expired, failed or cancelled.
    pub finished_at: Option<Millis>,
    /// Why it failed, expired or was cancelled.
    pub reason: Option<String>,
    /// What the device answered (acknowledged or failed), if anything.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub reply: Option<serde_json::Value>,
    /// How many times it was handed to the protocol client (re-sent after a restart or a
    /// reconnect while unacknowledged).
    pub attempts: u32,
}

impl Command {
    /// Takes `steps` (one command's, in order) as every store does: each must start from
    /// the state the one before left ([`CommandTransition::check_from`]) and is then applied
    /// ([`Command::apply`]). On a refusal the command is left part-way, so a store works on a
    /// copy and keeps it only on success (all or none).
    pub fn apply_steps(&mut self, steps: &[CommandTransition]) -> Result<(), StoreError> {
        for step in steps {
            step.check_from(self.state)?;
            self.apply(step);
        }
        Ok(())
    }

    /// Applies `change` as every store records it (see `Store::transition_command`), without
    /// checking `from`: the new state and its time; a send (`Sent`, or `Queued` → `Delivered`)
    /// also sets `sent_at` and counts an attempt; an acknowledgement fills an empty
    /// `delivered_at`; a reason or reply replaces the old one.
    pub fn apply(&mut self, change: &CommandTransition) {
        let sent_and_delivered =
            change.to == CommandState::Delivered && self.state == CommandState::Queued;
        self.state = change.to;
        match change.to {
            CommandState::Queued => {}
            CommandState::Sent => {
                self.sent_at = Some(change.at);
                self.attempts = self.attempts.saturating_add(1);
            }
            CommandState::Delivered => {
                if sent_and_delivered {
                    self.sent_at = Some(change.at);
                    self.attempts = self.attempts.saturating_add(1);
                }
                self.delivered_at = Some(change.at);
            }
            CommandState::Acknowledged => {
                self.acknowledged_at = Some(change.at);
                self.delivered_at.get_or_insert(change.at);
            }
            CommandState::Expired | CommandState::Failed | CommandState::Cancelled => {
                self.finished_at = Some(change.at);
            }
        }
        if let Some(reason) = &change.reason {
            self.reason = Some(reason.clone());
        }
        if let Some(reply) = &change.reply {
            self.reply = Some(reply.clone());
        }
    }
}

/// A command as it is first stored (state `Queued`; the store assigns `seq`).
#[derive(Debug, Clone, PartialEq)]
pub struct NewCommandRecord {
    pub id: String,
    pub device_id: String,
    pub hub_id: String,
    pub protocol: String,
    pub name: String,
    pub payload: serde_json::Value,
    pub created_at: Millis,
    pub expires_at: Option<Millis>,
}

impl NewCommandRecord {
    /// The refusal of a command for a device of another hub.
    pub fn wrong_hub(&self, device_hub: &str) -> StoreError {
        StoreError::Invalid(format!(
            "device {:?} belongs to hub {device_hub:?}, not {:?}",
            self.device_id, self.hub_id
        ))
    }

    /// The refusal of a command whose id is taken.
    pub fn duplicate(&self) -> StoreError {
        StoreError::Conflict(format!("command {:?} already exists", self.id))
    }

    /// What every store checks of a new command before it looks at its data (ids, protocol,
    /// name, payload size), in that order; returns the payload as the JSON text to store.
    pub fn validate(&self) -> Result<String, StoreError> {
        validate_id("command", &self.id)?;
        validate_id("device", &self.device_id)?;
        validate_id("hub", &self.hub_id)?;
        if self.protocol.is_empty() {
            return Err(StoreError::Invalid("protocol must not be empty".to_owned()));
        }
        if self.name.is_empty() {
            return Err(StoreError::Invalid(
                "command name must not be empty".to_owned(),
            ));
        }
        if self.name.len() > MAX_COMMAND_NAME_LEN {
            return Err(StoreError::Invalid(format!(
                "command name is longer than {MAX_COMMAND_NAME_LEN} bytes"
            )));
        }
        let payload = serde_json::to_string(&self.payload)
            .map_err(|err| StoreError::Invalid(format!("cannot encode command payload: {err}")))?;
        if payload.len() > MAX_COMMAND_PAYLOAD {
            return Err(StoreError::Invalid(format!(
                "command payload is {} bytes of JSON, more than the {MAX_COMMAND_PAYLOAD} allowed",
                payload.len()
            )));
        }
        Ok(payload)
    }
}

/// A change of a command's state, applied only if its current state is in `from`.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandTransition {
    pub id: String,
    pub from: Vec<CommandState>,
    pub to: CommandState,
    pub at: Millis,
    /// Stored in `reason` (failed, expired, cancelled).
    pub reason: Option<String>,
    /// Stored in `reply` (acknowledged, failed).
    pub reply: Option<serde_json::Value>,
}

impl CommandTransition {
    /// Whether a command now in `current` may take this step: only from a state in `from`,
    /// and never out of a final state, whatever `from` says (a late event must not revive a
    /// finished command). The refusal names both, as the API shows it.
    pub fn check_from(&self, current: CommandState) -> Result<(), StoreError> {
        if !current.is_final() && self.from.contains(&current) {
            return Ok(());
        }
        let expected = if self.from.is_empty() {
            "in any expected state".to_owned()
        } else {
            let names: Vec<&str> = self.from.iter().map(|state| state.as_str()).collect();
            names.join(", ")
        };
        Err(StoreError::Conflict(format!(
            "command {:?} is {}, not {expected}",
            self.id,
            current.as_str()
        )))
    }
}

/// The refusal of a page cursor (`after`) that names no command.
pub fn unknown_command_cursor(after: &str) -> StoreError {
    StoreError::Invalid(format!(
        "cannot continue after command {after:?}: no such command"
    ))
}

/// The refusal of a per-device page cursor that names another device's command.
pub fn foreign_command_cursor(after: &str, device_id: &str) -> StoreError {
    StoreError::Invalid(format!(
        "cannot continue after command {after:?}: it is not a command of device {device_id:?}"
    ))
}

/// Commands of one device (or of all devices), newest first unless `oldest_first`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandQuery {
    pub device_id: Option<String>,
    /// Only these states; all when empty.
    pub states: Vec<CommandState>,
    /// Continue after this command id (from the previous page's last item).
    pub after: Option<String>,
    /// 0 → 100; capped at [`MAX_PAGE`].
    pub limit: u32,
    pub oldest_first: bool,
}
