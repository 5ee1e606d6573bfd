//! An in-memory [`Store`] for tests of the crates that sit above the store (the API, the hub).
//!
//! It follows the trait's documented semantics closely enough to stand in for `SqliteStore`:
//! registry with conflicts and paging, atomic batches with `(hub, seq)` dedupe, telemetry
//! queries, dead letters, parser events, presence and commands. Timestamps come from the wall
//! clock but never repeat, so `updated_at` always moves.
//!
//! Two ways to make it fail, because the API and the hub test different outages:
//!
//! - [`MemoryStore::set_down`]: every trait call fails `Unavailable` (a database that is gone).
//! - [`MemoryStore::set_fault`]: `write_batch` of one hub fails, panics, or commits and then
//!   fails once (a crash between commit and acknowledgement), see [`WriteFault`].
//!
//! The inspection helpers (`rows`, `events`, `presence`, …) and the seeding helpers
//! (`add_row`, `add_dead_letter`) bypass both, so a test can look inside during an outage.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use parking_lot::{Mutex, MutexGuard};
use polyhub_store::{
    BatchOutcome, Bucket, Command, CommandQuery, CommandState, CommandTransition, DEFAULT_PROTOCOL,
    DeadLetter, DesiredState, Device, DevicePatch, DownsampleQuery, Group, GroupPatch, Hub,
    HubPatch, IngestBatch, ListQuery, MAX_PAGE, Millis, NewCommandRecord, NewDevice, NewGroup,
    NewHub, NewParserEvent, ParserEvent, Presence, RangePage, RangeQuery, Store, StoreError,
    TelemetryRow, Value, now_millis, validate_id,
};

/// How `write_batch` misbehaves for one hub (see [`MemoryStore::set_fault`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFault {
    /// Fails with `Unavailable` without committing.
    Fail,
    /// Panics without committing.
    Panic,
    /// Commits, then fails with `Unavailable` (as if the process died before acknowledging).
    /// Cleared after it fired once.
    FailAfterCommitOnce,
}

/// An in-memory [`Store`]; `Default` is an empty, healthy store.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
    /// While set, every trait call fails with `Unavailable`.
    down: AtomicBool,
    /// While set, `write_batch` waits before it does anything ([`MemoryStore::hold_batches`]).
    batches_held: AtomicBool,
    batches_released: tokio::sync::Notify,
    batches_waiting: std::sync::atomic::AtomicUsize,
    faults: Mutex<HashMap<String, WriteFault>>,
}

#[derive(Debug, Default)]
struct State {
    groups: BTreeMap<String, Group>,
    hubs: BTreeMap<String, Hub>,
    devices: BTreeMap<String, Device>,
    rows: Vec<TelemetryRow>,
    dead_letters: Vec<DeadLetter>,
    /// `(hub, seq)` of every committed message, with its receive time (for pruning).
    seqs: HashMap<(String, u64), Millis>,
    /// How many redelivered messages `write_batch` skipped, over the store's life.
    duplicates: u64,
    events: Vec<ParserEvent>,
    presence: BTreeMap<String, Presence>,
    /// Keyed by id; `list_commands` sorts them as SQLite does.
    commands: BTreeMap<String, Command>,
    /// The last timestamp handed out.
    clock: Millis,
    /// How many command transition writes succeeded (one per `transition_command` or
    /// `transition_command_steps` call).
    command_writes: usize,
}

impl State {
    /// Now, but strictly later than the previous stamp: tests compare `updated_at` with
    /// `created_at` and must not depend on the wall clock's resolution.
    fn stamp(&mut self) -> Millis {
        self.clock = now_millis().max(self.clock + 1);
        self.clock
    }
}

impl MemoryStore {
    /// An empty, healthy store.
    pub fn new() -> Self {
        MemoryStore::default()
    }

    /// How many command transition writes succeeded so far: one per `transition_command` or
    /// `transition_command_steps` call, however many steps it carried.
    pub fn command_writes(&self) -> usize {
        self.state.lock().command_writes
    }

    /// Takes the whole store down (every trait call fails `Unavailable`) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Holds every `write_batch` call (as a slow disk would) until
    /// [`release_batches`](MemoryStore::release_batches): lets a test act while a parser is
    /// inside a commit.
    pub fn hold_batches(&self) {
        self.batches_held.store(true, Ordering::SeqCst);
    }

    /// Lets held and later `write_batch` calls go on.
    pub fn release_batches(&self) {
        self.batches_held.store(false, Ordering::SeqCst);
        self.batches_released.notify_waiters();
    }

    /// Whether a `write_batch` call is waiting in [`hold_batches`](MemoryStore::hold_batches).
    pub fn batch_waiting(&self) -> bool {
        self.batches_waiting.load(Ordering::SeqCst) > 0
    }

    /// Makes `write_batch` misbehave for `hub_id` (`None` heals it).
    pub fn set_fault(&self, hub_id: &str, fault: Option<WriteFault>) {
        let mut faults = self.faults.lock();
        match fault {
            Some(fault) => faults.insert(hub_id.to_owned(), fault),
            None => faults.remove(hub_id),
        };
    }

    /// Adds a telemetry row directly, as if ingested (the device need not exist).
    pub fn add_row(&self, device_id: &str, signal: &str, ts: Millis, value: Value) {
        self.state.lock().rows.push(TelemetryRow {
            device_id: device_id.into(),
            signal: signal.into(),
            ts,
            value,
        });
    }

    /// Adds a dead letter of `hub_id` directly; returns its id (1, 2, …).
    pub fn add_dead_letter(&self, hub_id: &str, reason: &str) -> i64 {
        let mut state = self.state.lock();
        let id = next_id(state.dead_letters.len());
        state.dead_letters.push(DeadLetter {
            id,
            hub_id: hub_id.into(),
            device_id: None,
            topic: format!("/{hub_id}/x/data"),
            payload: "garbage".into(),
            payload_len: 7,
            reason: reason.into(),
            received_at: id,
        });
        id
    }

    /// The rows of a device, in the order they were written.
    pub fn rows(&self, device_id: &str) -> Vec<TelemetryRow> {
        self.state
            .lock()
            .rows
            .iter()
            .filter(|row| row.device_id == device_id)
            .cloned()
            .collect()
    }

    /// How many rows there are, of every device.
    pub fn row_count(&self) -> usize {
        self.state.lock().rows.len()
    }

    /// Every dead letter, oldest first.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.state.lock().dead_letters.clone()
    }

    /// The parser events of a hub, oldest first.
    pub fn events(&self, hub_id: &str) -> Vec<ParserEvent> {
        self.state
            .lock()
            .events
            .iter()
            .filter(|event| event.hub_id == hub_id)
            .cloned()
            .collect()
    }

    /// How many redelivered messages `write_batch` has skipped so far.
    pub fn duplicates(&self) -> u64 {
        self.state.lock().duplicates
    }

    /// The presence recorded for a device, `None` if nothing was ever recorded (unlike
    /// `get_presence`, which answers "offline, never seen" for a registered device).
    pub fn presence(&self, device_id: &str) -> Option<Presence> {
        self.state.lock().presence.get(device_id).cloned()
    }

    /// The state for a trait call, or `Unavailable` while the store is down.
    fn state(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected outage".into()));
        }
        Ok(self.state.lock())
    }
}

/// The id after `count` items: ids start at 1.
fn next_id(count: usize) -> i64 {
    i64::try_from(count).unwrap_or(i64::MAX - 1) + 1
}

/// Metadata as stored: `{}` when absent, `Invalid` when not a JSON object.
fn metadata_of(value: Option<serde_json::Value>) -> Result<serde_json::Value, StoreError> {
    match value {
        None => Ok(serde_json::json!({})),
        Some(value @ serde_json::Value::Object(_)) => Ok(value),
        Some(_) => Err(StoreError::Invalid("metadata must be a JSON object".into())),
    }
}

/// One page of a registry listing: ids after `after`, at most `limit` (0 means 100).
fn page<T>(items: impl Iterator<Item = (String, T)>, after: Option<&str>, limit: u32) -> Vec<T> {
    let limit = if limit == 0 { 100 } else { limit.min(MAX_PAGE) } as usize;
    items
        .filter(|(id, _)| after.is_none_or(|after| id.as_str() > after))
        .map(|(_, item)| item)
        .take(limit)
        .collect()
}

fn not_found(kind: &str, id: &str) -> StoreError {
    StoreError::NotFound(format!("{kind} {id:?} not found"))
}

fn never_seen(device_id: &str) -> Presence {
    Presence {
        device_id: device_id.to_owned(),
        online: false,
        last_seen: None,
        changed_at: None,
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn create_group(&self, group: NewGroup) -> Result<Group, StoreError> {
        validate_id("group", &group.id)?;
        let metadata = metadata_of(group.metadata)?;
        let mut state = self.state()?;
        if state.groups.contains_key(&group.id) {
            return Err(StoreError::Conflict(format!("group {:?} exists", group.id)));
        }
        let now = state.stamp();
        let created = Group {
            name: group.name.unwrap_or_else(|| group.id.clone()),
            id: group.id,
            metadata,
            created_at: now,
            updated_at: now,
        };
        state.groups.insert(created.id.clone(), created.clone());
        Ok(created)
    }

    async fn get_group(&self, id: &str) -> Result<Group, StoreError> {
        let state = self.state()?;
        state
            .groups
            .get(id)
            .cloned()
            .ok_or_else(|| not_found("group", id))
    }

    async fn list_groups(&self, query: ListQuery) -> Result<Vec<Group>, StoreError> {
        let state = self.state()?;
        let items = state
            .groups
            .iter()
            .map(|(id, group)| (id.clone(), group.clone()));
        Ok(page(items, query.after.as_deref(), query.limit))
    }

    async fn update_group(&self, id: &str, patch: GroupPatch) -> Result<Group, StoreError> {
        let metadata = patch.metadata.map(|m| metadata_of(Some(m))).transpose()?;
        let mut state = self.state()?;
        let now = state.stamp();
        let group = state
            .groups
            .get_mut(id)
            .ok_or_else(|| not_found("group", id))?;
        if let Some(name) = patch.name {
            group.name = name;
        }
        if let Some(metadata) = metadata {
            group.metadata = metadata;
        }
        group.updated_at = now;
        Ok(group.clone())
    }

    async fn delete_group(&self, id: &str) -> Result<(), StoreError> {
        let mut state = self.state()?;
        if !state.groups.contains_key(id) {
            return Err(not_found("group", id));
        }
        if state.hubs.values().any(|hub| hub.group_id == id) {
            return Err(StoreError::Conflict(format!(
                "group {id:?} still owns hubs"
            )));
        }
        state.groups.remove(id);
        Ok(())
    }

    async fn create_hub(&self, hub: NewHub) -> Result<Hub, StoreError> {
        validate_id("hub", &hub.id)?;
        let metadata = metadata_of(hub.metadata)?;
        let mut state = self.state()?;
        if state.hubs.contains_key(&hub.id) {
            return Err(StoreError::Conflict(format!("hub {:?} exists", hub.id)));
        }
        if !state.groups.contains_key(&hub.group_id) {
            return Err(StoreError::Conflict(format!(
                "group {:?} does not exist",
                hub.group_id
            )));
        }
        let now = state.stamp();
        let created = Hub {
            name: hub.name.unwrap_or_else(|| hub.id.clone()),
            id: hub.id,
            group_id: hub.group_id,
            metadata,
            settings: hub.settings,
            desired_state: hub.desired_state,
            created_at: now,
            updated_at: now,
        };
        state.hubs.insert(created.id.clone(), created.clone());
        Ok(created)
    }

    async fn get_hub(&self, id: &str) -> Result<Hub, StoreError> {
        let state = self.state()?;
        state
            .hubs
            .get(id)
            .cloned()
            .ok_or_else(|| not_found("hub", id))
    }

    async fn list_hubs(&self, query: ListQuery) -> Result<Vec<Hub>, StoreError> {
        let state = self.state()?;
        let items = state
            .hubs
            .iter()
            .filter(|(_, hub)| {
                query
                    .parent
                    .as_ref()
                    .is_none_or(|group| &hub.group_id == group)
            })
            .map(|(id, hub)| (id.clone(), hub.clone()));
        Ok(page(items, query.after.as_deref(), query.limit))
    }

    async fn update_hub(&self, id: &str, patch: HubPatch) -> Result<Hub, StoreError> {
        let metadata = patch.metadata.map(|m| metadata_of(Some(m))).transpose()?;
        let mut state = self.state()?;
        let now = state.stamp();
        let hub = state.hubs.get_mut(id).ok_or_else(|| not_found("hub", id))?;
        if let Some(name) = patch.name {
            hub.name = name;
        }
        if let Some(metadata) = metadata {
            hub.metadata = metadata;
        }
        if let Some(settings) = patch.settings {
            hub.settings = settings;
        }
        hub.updated_at = now;
        Ok(hub.clone())
    }

    async fn set_hub_desired_state(
        &self,
        id: &str,
        desired: DesiredState,
    ) -> Result<Hub, StoreError> {
        let mut state = self.state()?;
        let hub = state.hubs.get_mut(id).ok_or_else(|| not_found("hub", id))?;
        hub.desired_state = desired;
        Ok(hub.clone())
    }

    async fn delete_hub(&self, id: &str) -> Result<(), StoreError> {
        let mut state = self.state()?;
        if !state.hubs.contains_key(id) {
            return Err(not_found("hub", id));
        }
        if state.devices.values().any(|device| device.hub_id == id) {
            return Err(StoreError::Conflict(format!(
                "hub {id:?} still owns devices"
            )));
        }
        state.hubs.remove(id);
        Ok(())
    }

    async fn create_device(&self, device: NewDevice) -> Result<Device, StoreError> {
        validate_id("device", &device.id)?;
        let metadata = metadata_of(device.metadata)?;
        let mut state = self.state()?;
        if state.devices.contains_key(&device.id) {
            return Err(StoreError::Conflict(format!(
                "device {:?} exists",
                device.id
            )));
        }
        if !state.hubs.contains_key(&device.hub_id) {
            return Err(StoreError::Conflict(format!(
                "hub {:?} does not exist",
                device.hub_id
            )));
        }
        let now = state.stamp();
        let created = Device {
            name: device.name.unwrap_or_else(|| device.id.clone()),
            id: device.id,
            hub_id: device.hub_id,
            protocol: device
                .protocol
                .unwrap_or_else(|| DEFAULT_PROTOCOL.to_owned()),
            metadata,
            created_at: now,
            updated_at: now,
        };
        state.devices.insert(created.id.clone(), created.clone());
        Ok(created)
    }

    async fn get_device(&self, id: &str) -> Result<Device, StoreError> {
        let state = self.state()?;
        state
            .devices
            .get(id)
            .cloned()
            .ok_or_else(|| not_found("device", id))
    }

    async fn list_devices(&self, query: ListQuery) -> Result<Vec<Device>, StoreError> {
        let state = self.state()?;
        let items = state
            .devices
            .iter()
            .filter(|(_, device)| {
                query
                    .parent
                    .as_ref()
                    .is_none_or(|hub| &device.hub_id == hub)
            })
            .map(|(id, device)| (id.clone(), device.clone()));
        Ok(page(items, query.after.as_deref(), query.limit))
    }

    async fn update_device(&self, id: &str, patch: DevicePatch) -> Result<Device, StoreError> {
        let metadata = patch.metadata.map(|m| metadata_of(Some(m))).transpose()?;
        let mut state = self.state()?;
        let now = state.stamp();
        let device = state
            .devices
            .get_mut(id)
            .ok_or_else(|| not_found("device", id))?;
        if let Some(name) = patch.name {
            device.name = name;
        }
        if let Some(protocol) = patch.protocol {
            device.protocol = protocol;
        }
        if let Some(metadata) = metadata {
            device.metadata = metadata;
        }
        device.updated_at = now;
        Ok(device.clone())
    }

    async fn delete_device(&self, id: &str) -> Result<(), StoreError> {
        let mut state = self.state()?;
        state
            .devices
            .remove(id)
            .ok_or_else(|| not_found("device", id))?;
        state.presence.remove(id);
        Ok(())
    }

    async fn write_batch(&self, batch: IngestBatch) -> Result<BatchOutcome, StoreError> {
        self.batches_waiting.fetch_add(1, Ordering::SeqCst);
        loop {
            let released = self.batches_released.notified();
            if !self.batches_held.load(Ordering::SeqCst) {
                break;
            }
            released.await;
        }
        self.batches_waiting.fetch_sub(1, Ordering::SeqCst);
        let mut state = self.state()?;
        let fault = self.faults.lock().get(&batch.hub_id).copied();
        match fault {
            Some(WriteFault::Fail) => {
                return Err(StoreError::Unavailable("injected failure".into()));
            }
            Some(WriteFault::Panic) => {
                // Released first, so the panic poisons nothing the next call needs.
                drop(state);
                panic!("injected panic in write_batch");
            }
            Some(WriteFault::FailAfterCommitOnce) | None => {}
        }
        let mut outcome = BatchOutcome::default();
        let mut last_seen: HashMap<String, Millis> = HashMap::new();
        for message in batch.messages {
            if let Some(seq) = message.seq {
                let key = (batch.hub_id.clone(), seq);
                if state.seqs.contains_key(&key) {
                    outcome.duplicates_skipped += 1;
                    state.duplicates += 1;
                    continue;
                }
                state.seqs.insert(key, message.received_at);
            }
            outcome.rows_written += message.rows.len() as u64;
            state.rows.extend(message.rows);
            if let Some(dead) = message.dead_letter {
                outcome.dead_letters_written += 1;
                let id = next_id(state.dead_letters.len());
                state.dead_letters.push(DeadLetter {
                    id,
                    hub_id: dead.hub_id,
                    device_id: dead.device_id,
                    topic: dead.topic,
                    payload: String::from_utf8_lossy(&dead.payload).into_owned(),
                    payload_len: dead.payload.len() as u64,
                    reason: dead.reason,
                    received_at: dead.received_at,
                });
            }
            if let Some(device_id) = message.device_id {
                let seen = last_seen.entry(device_id).or_insert(message.received_at);
                *seen = (*seen).max(message.received_at);
            }
        }
        for (device_id, seen) in last_seen {
            // Like SQLite: only registered devices have presence, and last_seen never goes
            // backwards.
            if !state.devices.contains_key(&device_id) {
                continue;
            }
            let presence = state
                .presence
                .entry(device_id.clone())
                .or_insert_with(|| never_seen(&device_id));
            presence.last_seen = Some(presence.last_seen.map_or(seen, |last| last.max(seen)));
        }
        drop(state);
        if fault == Some(WriteFault::FailAfterCommitOnce) {
            self.set_fault(&batch.hub_id, None);
            return Err(StoreError::Unavailable(
                "injected failure after commit".into(),
            ));
        }
        Ok(outcome)
    }

    async fn prune_seqs(&self, hub_id: &str, received_before: Millis) -> Result<u64, StoreError> {
        let mut state = self.state()?;
        let before = state.seqs.len();
        state
            .seqs
            .retain(|(hub, _), at| hub != hub_id || *at >= received_before);
        Ok((before - state.seqs.len()) as u64)
    }

    async fn latest(&self, device_id: &str) -> Result<Vec<TelemetryRow>, StoreError> {
        let state = self.state()?;
        let mut latest: BTreeMap<&str, &TelemetryRow> = BTreeMap::new();
        for row in state.rows.iter().filter(|row| row.device_id == device_id) {
            let entry = latest.entry(&row.signal).or_insert(row);
            if row.ts >= entry.ts {
                *entry = row;
            }
        }
        Ok(latest.into_values().cloned().collect())
    }

    async fn range(&self, query: RangeQuery) -> Result<RangePage, StoreError> {
        let state = self.state()?;
        // The cursor is the number of rows already returned: opaque to callers.
        let skip: usize = match &query.after {
            None => 0,
            Some(cursor) => cursor
                .parse()
                .map_err(|_| StoreError::Invalid(format!("bad cursor {cursor:?}")))?,
        };
        let mut rows: Vec<TelemetryRow> = state
            .rows
            .iter()
            .filter(|row| row.device_id == query.device_id)
            .filter(|row| {
                query
                    .signal
                    .as_ref()
                    .is_none_or(|signal| &row.signal == signal)
            })
            .filter(|row| query.from.is_none_or(|from| row.ts >= from))
            .filter(|row| query.to.is_none_or(|to| row.ts < to))
            .cloned()
            .collect();
        rows.sort_by_key(|row| row.ts);
        let limit = query.limit.min(MAX_PAGE) as usize;
        let total = rows.len();
        let rows: Vec<TelemetryRow> = rows.into_iter().skip(skip).take(limit).collect();
        let next = (skip + rows.len() < total).then(|| (skip + rows.len()).to_string());
        Ok(RangePage { rows, next })
    }

    async fn downsample(&self, query: DownsampleQuery) -> Result<Vec<Bucket>, StoreError> {
        if query.interval_ms <= 0 {
            return Err(StoreError::Invalid("interval must be positive".into()));
        }
        let state = self.state()?;
        let mut buckets: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
        for row in state.rows.iter().filter(|row| {
            row.device_id == query.device_id
                && row.signal == query.signal
                && row.ts >= query.from
                && row.ts < query.to
        }) {
            let number = match row.value {
                Value::Number(number) => number,
                Value::Bool(flag) => f64::from(u8::from(flag)),
                Value::Text(_) => continue,
            };
            let start = row.ts.div_euclid(query.interval_ms) * query.interval_ms;
            buckets.entry(start).or_default().push(number);
        }
        Ok(buckets
            .into_iter()
            .map(|(start, values)| Bucket {
                start,
                count: values.len() as u64,
                min: values.iter().copied().fold(f64::INFINITY, f64::min),
                max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                avg: values.iter().sum::<f64>() / values.len() as f64,
            })
            .collect())
    }

    async fn count_rows(&self, hub_id: Option<&str>) -> Result<u64, StoreError> {
        let state = self.state()?;
        let Some(hub_id) = hub_id else {
            return Ok(state.rows.len() as u64);
        };
        // Rows carry no hub: they count for the hub their device is registered in now.
        let count = state
            .rows
            .iter()
            .filter(|row| {
                state
                    .devices
                    .get(&row.device_id)
                    .is_some_and(|device| device.hub_id == hub_id)
            })
            .count();
        Ok(count as u64)
    }

    async fn list_dead_letters(
        &self,
        hub_id: Option<&str>,
        before_id: Option<i64>,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let state = self.state()?;
        Ok(state
            .dead_letters
            .iter()
            .rev()
            .filter(|letter| hub_id.is_none_or(|hub| letter.hub_id == hub))
            .filter(|letter| before_id.is_none_or(|before| letter.id < before))
            .take(limit.min(MAX_PAGE) as usize)
            .cloned()
            .collect())
    }

    async fn record_parser_event(&self, event: NewParserEvent) -> Result<(), StoreError> {
        let mut state = self.state()?;
        let id = next_id(state.events.len());
        state.events.push(ParserEvent {
            id,
            hub_id: event.hub_id,
            kind: event.kind,
            reason: event.reason,
            at: event.at,
        });
        Ok(())
    }

    async fn list_parser_events(
        &self,
        hub_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<ParserEvent>, StoreError> {
        let state = self.state()?;
        Ok(state
            .events
            .iter()
            .rev()
            .filter(|event| hub_id.is_none_or(|hub| event.hub_id == hub))
            .take(limit as usize)
            .cloned()
            .collect())
    }

    async fn set_presence(
        &self,
        device_id: &str,
        online: bool,
        at: Millis,
    ) -> Result<(), StoreError> {
        let mut state = self.state()?;
        if !state.devices.contains_key(device_id) {
            return Err(not_found("device", device_id));
        }
        let presence = state
            .presence
            .entry(device_id.to_owned())
            .or_insert_with(|| never_seen(device_id));
        // Like SQLite: changed_at moves only on a flip (or the first report); last_seen never
        // goes backwards.
        if presence.online != online || presence.changed_at.is_none() {
            presence.changed_at = Some(at);
        }
        presence.online = online;
        presence.last_seen = Some(presence.last_seen.map_or(at, |last| last.max(at)));
        Ok(())
    }

    async fn get_presence(&self, device_id: &str) -> Result<Presence, StoreError> {
        let state = self.state()?;
        if !state.devices.contains_key(device_id) {
            return Err(not_found("device", device_id));
        }
        Ok(state
            .presence
            .get(device_id)
            .cloned()
            .unwrap_or_else(|| never_seen(device_id)))
    }

    async fn list_presence(&self, hub_id: &str) -> Result<Vec<Presence>, StoreError> {
        let state = self.state()?;
        Ok(state
            .devices
            .values()
            .filter(|device| device.hub_id == hub_id)
            .map(|device| {
                state
                    .presence
                    .get(&device.id)
                    .cloned()
                    .unwrap_or_else(|| never_seen(&device.id))
            })
            .collect())
    }

    async fn create_command(&self, command: NewCommandRecord) -> Result<Command, StoreError> {
        // The checks every store makes first, so that a wrong command gets the same error
        // from both.
        command.validate()?;
        let mut state = self.state()?;
        let Some(device) = state.devices.get(&command.device_id) else {
            return Err(not_found("device", &command.device_id));
        };
        if device.hub_id != command.hub_id {
            return Err(command.wrong_hub(&device.hub_id));
        }
        if state.commands.contains_key(&command.id) {
            return Err(command.duplicate());
        }
        // Counted over the commands, not the device: a device deleted and created again
        // continues after its old commands.
        let seq = state
            .commands
            .values()
            .filter(|existing| existing.device_id == command.device_id)
            .map(|existing| existing.seq)
            .max()
            .unwrap_or(0)
            + 1;
        let created = Command {
            id: command.id,
            device_id: command.device_id,
            hub_id: command.hub_id,
            protocol: command.protocol,
            name: command.name,
            payload: command.payload,
            seq,
            state: CommandState::Queued,
            created_at: command.created_at,
            expires_at: command.expires_at,
            sent_at: None,
            delivered_at: None,
            acknowledged_at: None,
            finished_at: None,
            reason: None,
            reply: None,
            attempts: 0,
        };
        state.commands.insert(created.id.clone(), created.clone());
        Ok(created)
    }

    async fn get_command(&self, id: &str) -> Result<Command, StoreError> {
        validate_id("command", id)?;
        let state = self.state()?;
        state
            .commands
            .get(id)
            .cloned()
            .ok_or_else(|| not_found("command", id))
    }

    async fn list_commands(&self, query: CommandQuery) -> Result<Vec<Command>, StoreError> {
        if let Some(device_id) = &query.device_id {
            validate_id("device", device_id)?;
        }
        if let Some(after) = &query.after {
            validate_id("command", after)?;
        }
        let state = self.state()?;
        let limit = if query.limit == 0 {
            100
        } else {
            query.limit.min(MAX_PAGE)
        } as usize;
        // As SQLite orders them: one device's commands by `seq` (the order they go out in,
        // whatever their ids and times), all devices' by creation time, ids breaking ties. A
        // page continues after the position of the `after` command, which must exist (and
        // be the device's), even if the state filter would now leave it out.
        let key = |command: &Command| match query.device_id {
            Some(_) => (command.seq, String::new()),
            None => (command.created_at, command.id.clone()),
        };
        let after = match &query.after {
            None => None,
            Some(after) => {
                let Some(cursor) = state.commands.get(after) else {
                    return Err(polyhub_store::unknown_command_cursor(after));
                };
                if let Some(device_id) = &query.device_id
                    && &cursor.device_id != device_id
                {
                    return Err(polyhub_store::foreign_command_cursor(after, device_id));
                }
                Some(key(cursor))
            }
        };
        let mut selected: Vec<&Command> = state
            .commands
            .values()
            .filter(|command| {
                query
                    .device_id
                    .as_ref()
                    .is_none_or(|device| &command.device_id == device)
                    && (query.states.is_empty() || query.states.contains(&command.state))
            })
            .collect();
        selected.sort_by_cached_key(|command| key(command));
        if !query.oldest_first {
            selected.reverse();
        }
        Ok(selected
            .into_iter()
            .filter(|command| {
                after.as_ref().is_none_or(|after| {
                    if query.oldest_first {
                        key(command) > *after
                    } else {
                        key(command) < *after
                    }
                })
            })
            .take(limit)
            .cloned()
            .collect())
    }

    async fn transition_command(&self, change: CommandTransition) -> Result<Command, StoreError> {
        self.transition_command_steps(vec![change]).await
    }

    async fn transition_command_steps(
        &self,
        changes: Vec<CommandTransition>,
    ) -> Result<Command, StoreError> {
        let id = polyhub_store::steps_command_id(&changes)?.to_owned();
        validate_id("command", &id)?;
        let mut state = self.state()?;
        // Applied to a copy, kept only if every step applies: all or none, like SQLite's.
        let mut command = state
            .commands
            .get(&id)
            .cloned()
            .ok_or_else(|| not_found("command", &id))?;
        command.apply_steps(&changes)?;
        state.commands.insert(id, command.clone());
        state.command_writes += 1;
        Ok(command)
    }

    async fn unfinished_commands(&self) -> Result<Vec<Command>, StoreError> {
        let state = self.state()?;
        let mut items: Vec<Command> = state
            .commands
            .values()
            .filter(|command| !command.state.is_final())
            .cloned()
            .collect();
        items.sort_by(|a, b| (&a.device_id, a.seq).cmp(&(&b.device_id, b.seq)));
        Ok(items)
    }
}
