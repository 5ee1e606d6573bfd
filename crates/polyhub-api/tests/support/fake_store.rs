//! An in-memory [`Store`] with the trait's documented semantics, enough to drive the API.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use polyhub_store::*;

#[derive(Debug, Default)]
pub struct FakeStore {
    data: Mutex<Data>,
    /// While set, every call fails with `Unavailable`.
    down: AtomicBool,
}

#[derive(Debug, Default)]
struct Data {
    groups: BTreeMap<String, Group>,
    hubs: BTreeMap<String, Hub>,
    devices: BTreeMap<String, Device>,
    rows: Vec<TelemetryRow>,
    dead_letters: Vec<DeadLetter>,
    events: Vec<ParserEvent>,
    presence: BTreeMap<String, Presence>,
    /// Keyed by id, which sorts by creation like the real ids.
    commands: BTreeMap<String, Command>,
    clock: Millis,
}

impl Data {
    fn tick(&mut self) -> Millis {
        self.clock += 1;
        self.clock
    }
}

fn metadata_of(value: Option<serde_json::Value>) -> Result<serde_json::Value, StoreError> {
    match value {
        None => Ok(serde_json::json!({})),
        Some(value @ serde_json::Value::Object(_)) => Ok(value),
        Some(_) => Err(StoreError::Invalid("metadata must be a JSON object".into())),
    }
}

fn page<T: Clone>(
    items: impl Iterator<Item = (String, T)>,
    after: Option<&str>,
    limit: u32,
) -> Vec<T> {
    let limit = if limit == 0 { 100 } else { limit.min(MAX_PAGE) } as usize;
    items
        .filter(|(id, _)| after.is_none_or(|after| id.as_str() > after))
        .map(|(_, item)| item)
        .take(limit)
        .collect()
}

impl FakeStore {
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    fn data(&self) -> Result<std::sync::MutexGuard<'_, Data>, StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("injected outage".into()));
        }
        Ok(self.data.lock().unwrap())
    }

    pub fn add_row(&self, device_id: &str, signal: &str, ts: Millis, value: Value) {
        let row = TelemetryRow {
            device_id: device_id.into(),
            signal: signal.into(),
            ts,
            value,
        };
        self.data.lock().unwrap().rows.push(row);
    }

    pub fn add_dead_letter(&self, hub_id: &str, reason: &str) -> i64 {
        let mut data = self.data.lock().unwrap();
        let id = data.dead_letters.len() as i64 + 1;
        data.dead_letters.push(DeadLetter {
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
}

#[async_trait]
impl Store for FakeStore {
    async fn create_group(&self, group: NewGroup) -> Result<Group, StoreError> {
        validate_id("group", &group.id)?;
        let metadata = metadata_of(group.metadata)?;
        let mut data = self.data()?;
        if data.groups.contains_key(&group.id) {
            return Err(StoreError::Conflict(format!("group {:?} exists", group.id)));
        }
        let now = data.tick();
        let created = Group {
            name: group.name.unwrap_or_else(|| group.id.clone()),
            id: group.id,
            metadata,
            created_at: now,
            updated_at: now,
        };
        data.groups.insert(created.id.clone(), created.clone());
        Ok(created)
    }

    async fn get_group(&self, id: &str) -> Result<Group, StoreError> {
        let data = self.data()?;
        data.groups
            .get(id)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(format!("group {id:?} not found")))
    }

    async fn list_groups(&self, query: ListQuery) -> Result<Vec<Group>, StoreError> {
        let data = self.data()?;
        let items = data.groups.iter().map(|(id, g)| (id.clone(), g.clone()));
        Ok(page(items, query.after.as_deref(), query.limit))
    }

    async fn update_group(&self, id: &str, patch: GroupPatch) -> Result<Group, StoreError> {
        let metadata = patch.metadata.map(|m| metadata_of(Some(m))).transpose()?;
        let mut data = self.data()?;
        let now = data.tick();
        let group = data
            .groups
            .get_mut(id)
            .ok_or_else(|| StoreError::NotFound(format!("group {id:?} not found")))?;
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
        let mut data = self.data()?;
        if !data.groups.contains_key(id) {
            return Err(StoreError::NotFound(format!("group {id:?} not found")));
        }
        if data.hubs.values().any(|hub| hub.group_id == id) {
            return Err(StoreError::Conflict(format!(
                "group {id:?} still owns hubs"
            )));
        }
        data.groups.remove(id);
        Ok(())
    }

    async fn create_hub(&self, hub: NewHub) -> Result<Hub, StoreError> {
        validate_id("hub", &hub.id)?;
        let metadata = metadata_of(hub.metadata)?;
        let mut data = self.data()?;
        if data.hubs.contains_key(&hub.id) {
            return Err(StoreError::Conflict(format!("hub {:?} exists", hub.id)));
        }
        if !data.groups.contains_key(&hub.group_id) {
            return Err(StoreError::Conflict(format!(
                "group {:?} does not exist",
                hub.group_id
            )));
        }
        let now = data.tick();
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
        data.hubs.insert(created.id.clone(), created.clone());
        Ok(created)
    }

    async fn get_hub(&self, id: &str) -> Result<Hub, StoreError> {
        let data = self.data()?;
        data.hubs
            .get(id)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(format!("hub {id:?} not found")))
    }

    async fn list_hubs(&self, query: ListQuery) -> Result<Vec<Hub>, StoreError> {
        let data = self.data()?;
        let items = data
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
        let mut data = self.data()?;
        let now = data.tick();
        let hub = data
            .hubs
            .get_mut(id)
            .ok_or_else(|| StoreError::NotFound(format!("hub {id:?} not found")))?;
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
        state: DesiredState,
    ) -> Result<Hub, StoreError> {
        let mut data = self.data()?;
        let hub = data
            .hubs
            .get_mut(id)
            .ok_or_else(|| StoreError::NotFound(format!("hub {id:?} not found")))?;
        hub.desired_state = state;
        Ok(hub.clone())
    }

    async fn delete_hub(&self, id: &str) -> Result<(), StoreError> {
        let mut data = self.data()?;
        if !data.hubs.contains_key(id) {
            return Err(StoreError::NotFound(format!("hub {id:?} not found")));
        }
        if data.devices.values().any(|device| device.hub_id == id) {
            return Err(StoreError::Conflict(format!(
                "hub {id:?} still owns devices"
            )));
        }
        data.hubs.remove(id);
        Ok(())
    }

    async fn create_device(&self, device: NewDevice) -> Result<Device, StoreError> {
        validate_id("device", &device.id)?;
        let metadata = metadata_of(device.metadata)?;
        let mut data = self.data()?;
        if data.devices.contains_key(&device.id) {
            return Err(StoreError::Conflict(format!(
                "device {:?} exists",
                device.id
            )));
        }
        if !data.hubs.contains_key(&device.hub_id) {
            return Err(StoreError::Conflict(format!(
                "hub {:?} does not exist",
                device.hub_id
            )));
        }
        let now = data.tick();
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
        data.devices.insert(created.id.clone(), created.clone());
        Ok(created)
    }

    async fn get_device(&self, id: &str) -> Result<Device, StoreError> {
        let data = self.data()?;
        data.devices
            .get(id)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(format!("device {id:?} not found")))
    }

    async fn list_devices(&self, query: ListQuery) -> Result<Vec<Device>, StoreError> {
        let data = self.data()?;
        let items = data
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
        let mut data = self.data()?;
        let now = data.tick();
        let device = data
            .devices
            .get_mut(id)
            .ok_or_else(|| StoreError::NotFound(format!("device {id:?} not found")))?;
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
        let mut data = self.data()?;
        data.presence.remove(id);
        data.devices
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| StoreError::NotFound(format!("device {id:?} not found")))
    }

    async fn write_batch(&self, batch: IngestBatch) -> Result<BatchOutcome, StoreError> {
        let mut data = self.data()?;
        let mut outcome = BatchOutcome::default();
        for message in batch.messages {
            outcome.rows_written += message.rows.len() as u64;
            data.rows.extend(message.rows);
        }
        Ok(outcome)
    }

    async fn prune_seqs(&self, _hub_id: &str, _received_before: Millis) -> Result<u64, StoreError> {
        Ok(0)
    }

    async fn latest(&self, device_id: &str) -> Result<Vec<TelemetryRow>, StoreError> {
        let data = self.data()?;
        let mut latest: BTreeMap<&str, &TelemetryRow> = BTreeMap::new();
        for row in data.rows.iter().filter(|row| row.device_id == device_id) {
            let entry = latest.entry(&row.signal).or_insert(row);
            if row.ts >= entry.ts {
                *entry = row;
            }
        }
        Ok(latest.into_values().cloned().collect())
    }

    async fn range(&self, query: RangeQuery) -> Result<RangePage, StoreError> {
        let data = self.data()?;
        let skip: usize = match &query.after {
            None => 0,
            Some(cursor) => cursor
                .parse()
                .map_err(|_| StoreError::Invalid(format!("bad cursor {cursor:?}")))?,
        };
        let mut rows: Vec<TelemetryRow> = data
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
        let data = self.data()?;
        let mut buckets: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
        for row in data.rows.iter().filter(|row| {
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

    async fn count_rows(&self, _hub_id: Option<&str>) -> Result<u64, StoreError> {
        Ok(self.data()?.rows.len() as u64)
    }

    async fn list_dead_letters(
        &self,
        hub_id: Option<&str>,
        before_id: Option<i64>,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let data = self.data()?;
        Ok(data
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
        let mut data = self.data()?;
        let id = data.events.len() as i64 + 1;
        data.events.push(ParserEvent {
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
        let data = self.data()?;
        Ok(data
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
        let mut data = self.data()?;
        if !data.devices.contains_key(device_id) {
            return Err(StoreError::NotFound(format!(
                "device {device_id:?} not found"
            )));
        }
        data.presence.insert(
            device_id.to_owned(),
            Presence {
                device_id: device_id.to_owned(),
                online,
                last_seen: Some(at),
                changed_at: Some(at),
            },
        );
        Ok(())
    }

    async fn get_presence(&self, device_id: &str) -> Result<Presence, StoreError> {
        let data = self.data()?;
        if !data.devices.contains_key(device_id) {
            return Err(StoreError::NotFound(format!(
                "device {device_id:?} not found"
            )));
        }
        Ok(data.presence.get(device_id).cloned().unwrap_or(Presence {
            device_id: device_id.to_owned(),
            online: false,
            last_seen: None,
            changed_at: None,
        }))
    }

    async fn list_presence(&self, hub_id: &str) -> Result<Vec<Presence>, StoreError> {
        let data = self.data()?;
        Ok(data
            .devices
            .values()
            .filter(|device| device.hub_id == hub_id)
            .map(|device| {
                data.presence.get(&device.id).cloned().unwrap_or(Presence {
                    device_id: device.id.clone(),
                    online: false,
                    last_seen: None,
                    changed_at: None,
                })
            })
            .collect())
    }

    async fn create_command(&self, command: NewCommandRecord) -> Result<Command, StoreError> {
        let mut data = self.data()?;
        if !data.devices.contains_key(&command.device_id) {
            return Err(StoreError::NotFound(format!(
                "device {:?} not found",
                command.device_id
            )));
        }
        if data.commands.contains_key(&command.id) {
            return Err(StoreError::Conflict(format!(
                "command {:?} exists",
                command.id
            )));
        }
        let seq = data
            .commands
            .values()
            .filter(|c| c.device_id == command.device_id)
            .map(|c| c.seq)
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
        data.commands.insert(created.id.clone(), created.clone());
        Ok(created)
    }

    async fn get_command(&self, id: &str) -> Result<Command, StoreError> {
        let data = self.data()?;
        data.commands
            .get(id)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(format!("command {id:?} not found")))
    }

    async fn list_commands(&self, query: CommandQuery) -> Result<Vec<Command>, StoreError> {
        let data = self.data()?;
        let limit = if query.limit == 0 {
            100
        } else {
            query.limit.min(MAX_PAGE)
        } as usize;
        let selected = data.commands.values().filter(|c| {
            query.device_id.as_ref().is_none_or(|d| &c.device_id == d)
                && (query.states.is_empty() || query.states.contains(&c.state))
        });
        let after = query.after.as_deref();
        let items: Vec<Command> = if query.oldest_first {
            selected
                .filter(|c| after.is_none_or(|a| c.id.as_str() > a))
                .take(limit)
                .cloned()
                .collect()
        } else {
            selected
                .rev()
                .filter(|c| after.is_none_or(|a| c.id.as_str() < a))
                .take(limit)
                .cloned()
                .collect()
        };
        Ok(items)
    }

    async fn transition_command(&self, change: CommandTransition) -> Result<Command, StoreError> {
        let mut data = self.data()?;
        let command = data
            .commands
            .get_mut(&change.id)
            .ok_or_else(|| StoreError::NotFound(format!("command {:?} not found", change.id)))?;
        if !change.from.contains(&command.state) {
            return Err(StoreError::Conflict(format!(
                "command {:?} is {:?}",
                change.id, command.state
            )));
        }
        command.state = change.to;
        match change.to {
            CommandState::Queued => {}
            CommandState::Sent => {
                command.sent_at = Some(change.at);
                command.attempts += 1;
            }
            CommandState::Delivered => command.delivered_at = Some(change.at),
            CommandState::Acknowledged => command.acknowledged_at = Some(change.at),
            CommandState::Expired | CommandState::Failed | CommandState::Cancelled => {
                command.finished_at = Some(change.at);
            }
        }
        if change.reason.is_some() {
            command.reason = change.reason;
        }
        if change.reply.is_some() {
            command.reply = change.reply;
        }
        Ok(command.clone())
    }

    async fn unfinished_commands(&self) -> Result<Vec<Command>, StoreError> {
        let data = self.data()?;
        let mut items: Vec<Command> = data
            .commands
            .values()
            .filter(|c| !c.state.is_final())
            .cloned()
            .collect();
        items.sort_by(|a, b| (&a.device_id, a.seq).cmp(&(&b.device_id, b.seq)));
        Ok(items)
    }
}
