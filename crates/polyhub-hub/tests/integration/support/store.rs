//! An in-memory `Store` for the hub's tests, with failure injection per hub.
//!
//! Only what the hub uses is implemented for real (registry, ingest, events, presence); the
//! telemetry queries answer `Backend` errors.

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use parking_lot::Mutex;
use polyhub_store::*;

#[derive(Debug, Default)]
struct State {
    groups: BTreeMap<String, Group>,
    hubs: BTreeMap<String, Hub>,
    devices: BTreeMap<String, Device>,
    rows: Vec<TelemetryRow>,
    dead_letters: Vec<DeadLetter>,
    seqs: HashMap<(String, u64), Millis>,
    events: Vec<ParserEvent>,
    presence: HashMap<String, Presence>,
    duplicates: u64,
}

/// How `write_batch` misbehaves for a hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteFault {
    /// Fails with `Unavailable` without committing.
    Fail,
    /// Panics without committing.
    Panic,
    /// Commits, then fails (as if the process died before acknowledging). Cleared after once.
    FailAfterCommitOnce,
}

#[derive(Debug, Default)]
pub(crate) struct MemoryStore {
    state: Mutex<State>,
    faults: Mutex<HashMap<String, WriteFault>>,
}

fn list_page<T: Clone>(items: impl Iterator<Item = (String, T)>, query: &ListQuery) -> Vec<T> {
    let limit = if query.limit == 0 {
        100
    } else {
        query.limit.min(MAX_PAGE)
    } as usize;
    items
        .filter(|(id, _)| query.after.as_ref().is_none_or(|after| id > after))
        .take(limit)
        .map(|(_, item)| item)
        .collect()
}

fn unsupported<T>() -> Result<T, StoreError> {
    Err(StoreError::Backend(
        "not supported by the test store".into(),
    ))
}

impl MemoryStore {
    pub(crate) fn new() -> Self {
        MemoryStore::default()
    }

    pub(crate) fn set_fault(&self, hub_id: &str, fault: Option<WriteFault>) {
        let mut faults = self.faults.lock();
        match fault {
            Some(fault) => faults.insert(hub_id.to_owned(), fault),
            None => faults.remove(hub_id),
        };
    }

    pub(crate) fn rows(&self, device_id: &str) -> Vec<TelemetryRow> {
        self.state
            .lock()
            .rows
            .iter()
            .filter(|row| row.device_id == device_id)
            .cloned()
            .collect()
    }

    pub(crate) fn row_count(&self) -> usize {
        self.state.lock().rows.len()
    }

    pub(crate) fn dead_letters(&self) -> Vec<DeadLetter> {
        self.state.lock().dead_letters.clone()
    }

    pub(crate) fn events(&self, hub_id: &str) -> Vec<ParserEvent> {
        self.state
            .lock()
            .events
            .iter()
            .filter(|event| event.hub_id == hub_id)
            .cloned()
            .collect()
    }

    pub(crate) fn duplicates(&self) -> u64 {
        self.state.lock().duplicates
    }

    pub(crate) fn presence(&self, device_id: &str) -> Option<Presence> {
        self.state.lock().presence.get(device_id).cloned()
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn create_group(&self, group: NewGroup) -> Result<Group, StoreError> {
        validate_id("group", &group.id)?;
        let mut state = self.state.lock();
        if state.groups.contains_key(&group.id) {
            return Err(StoreError::Conflict(format!("group {:?} exists", group.id)));
        }
        let now = now_millis();
        let created = Group {
            name: group.name.unwrap_or_else(|| group.id.clone()),
            id: group.id,
            metadata: group.metadata.unwrap_or_else(|| serde_json::json!({})),
            created_at: now,
            updated_at: now,
        };
        state.groups.insert(created.id.clone(), created.clone());
        Ok(created)
    }

    async fn get_group(&self, id: &str) -> Result<Group, StoreError> {
        self.state
            .lock()
            .groups
            .get(id)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(format!("group {id:?} not found")))
    }

    async fn list_groups(&self, query: ListQuery) -> Result<Vec<Group>, StoreError> {
        let state = self.state.lock();
        Ok(list_page(
            state
                .groups
                .iter()
                .map(|(id, group)| (id.clone(), group.clone())),
            &query,
        ))
    }

    async fn update_group(&self, _id: &str, _patch: GroupPatch) -> Result<Group, StoreError> {
        unsupported()
    }

    async fn delete_group(&self, _id: &str) -> Result<(), StoreError> {
        unsupported()
    }

    async fn create_hub(&self, hub: NewHub) -> Result<Hub, StoreError> {
        validate_id("hub", &hub.id)?;
        let mut state = self.state.lock();
        if state.hubs.contains_key(&hub.id) || !state.groups.contains_key(&hub.group_id) {
            return Err(StoreError::Conflict(format!(
                "hub {:?} exists or its group is missing",
                hub.id
            )));
        }
        let now = now_millis();
        let created = Hub {
            name: hub.name.unwrap_or_else(|| hub.id.clone()),
            id: hub.id,
            group_id: hub.group_id,
            metadata: hub.metadata.unwrap_or_else(|| serde_json::json!({})),
            settings: hub.settings,
            desired_state: hub.desired_state,
            created_at: now,
            updated_at: now,
        };
        state.hubs.insert(created.id.clone(), created.clone());
        Ok(created)
    }

    async fn get_hub(&self, id: &str) -> Result<Hub, StoreError> {
        self.state
            .lock()
            .hubs
            .get(id)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(format!("hub {id:?} not found")))
    }

    async fn list_hubs(&self, query: ListQuery) -> Result<Vec<Hub>, StoreError> {
        let state = self.state.lock();
        let hubs = state
            .hubs
            .iter()
            .filter(|(_, hub)| {
                query
                    .parent
                    .as_ref()
                    .is_none_or(|group| &hub.group_id == group)
            })
            .map(|(id, hub)| (id.clone(), hub.clone()));
        Ok(list_page(hubs, &query))
    }

    async fn update_hub(&self, id: &str, patch: HubPatch) -> Result<Hub, StoreError> {
        let mut state = self.state.lock();
        let hub = state
            .hubs
            .get_mut(id)
            .ok_or_else(|| StoreError::NotFound(format!("hub {id:?} not found")))?;
        if let Some(settings) = patch.settings {
            hub.settings = settings;
        }
        if let Some(name) = patch.name {
            hub.name = name;
        }
        Ok(hub.clone())
    }

    async fn set_hub_desired_state(
        &self,
        id: &str,
        desired: DesiredState,
    ) -> Result<Hub, StoreError> {
        let mut state = self.state.lock();
        let hub = state
            .hubs
            .get_mut(id)
            .ok_or_else(|| StoreError::NotFound(format!("hub {id:?} not found")))?;
        hub.desired_state = desired;
        Ok(hub.clone())
    }

    async fn delete_hub(&self, _id: &str) -> Result<(), StoreError> {
        unsupported()
    }

    async fn create_device(&self, device: NewDevice) -> Result<Device, StoreError> {
        validate_id("device", &device.id)?;
        if device
            .metadata
            .as_ref()
            .is_some_and(|metadata| !metadata.is_object())
        {
            return Err(StoreError::Invalid("metadata must be an object".into()));
        }
        let mut state = self.state.lock();
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
        let now = now_millis();
        let created = Device {
            name: device.name.unwrap_or_else(|| device.id.clone()),
            id: device.id,
            hub_id: device.hub_id,
            protocol: device
                .protocol
                .unwrap_or_else(|| DEFAULT_PROTOCOL.to_owned()),
            metadata: device.metadata.unwrap_or_else(|| serde_json::json!({})),
            created_at: now,
            updated_at: now,
        };
        state.devices.insert(created.id.clone(), created.clone());
        Ok(created)
    }

    async fn get_device(&self, id: &str) -> Result<Device, StoreError> {
        self.state
            .lock()
            .devices
            .get(id)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(format!("device {id:?} not found")))
    }

    async fn list_devices(&self, query: ListQuery) -> Result<Vec<Device>, StoreError> {
        let state = self.state.lock();
        let devices = state
            .devices
            .iter()
            .filter(|(_, device)| {
                query
                    .parent
                    .as_ref()
                    .is_none_or(|hub| &device.hub_id == hub)
            })
            .map(|(id, device)| (id.clone(), device.clone()));
        Ok(list_page(devices, &query))
    }

    async fn update_device(&self, _id: &str, _patch: DevicePatch) -> Result<Device, StoreError> {
        unsupported()
    }

    async fn delete_device(&self, id: &str) -> Result<(), StoreError> {
        let mut state = self.state.lock();
        state
            .devices
            .remove(id)
            .ok_or_else(|| StoreError::NotFound(format!("device {id:?} not found")))?;
        state.presence.remove(id);
        Ok(())
    }

    async fn write_batch(&self, batch: IngestBatch) -> Result<BatchOutcome, StoreError> {
        let fault = self.faults.lock().get(&batch.hub_id).copied();
        match fault {
            Some(WriteFault::Fail) => {
                return Err(StoreError::Unavailable("injected failure".into()));
            }
            Some(WriteFault::Panic) => panic!("injected panic in write_batch"),
            _ => {}
        }
        let mut outcome = BatchOutcome::default();
        {
            let mut state = self.state.lock();
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
                    let id = state.dead_letters.len() as i64 + 1;
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
                    let presence = state.presence.entry(device_id.clone()).or_insert(Presence {
                        device_id,
                        online: false,
                        last_seen: None,
                        changed_at: None,
                    });
                    presence.last_seen = Some(message.received_at);
                }
            }
        }
        if fault == Some(WriteFault::FailAfterCommitOnce) {
            self.set_fault(&batch.hub_id, None);
            return Err(StoreError::Unavailable(
                "injected failure after commit".into(),
            ));
        }
        Ok(outcome)
    }

    async fn prune_seqs(&self, hub_id: &str, received_before: Millis) -> Result<u64, StoreError> {
        let mut state = self.state.lock();
        let before = state.seqs.len();
        state
            .seqs
            .retain(|(hub, _), at| hub != hub_id || *at >= received_before);
        Ok((before - state.seqs.len()) as u64)
    }

    async fn latest(&self, _device_id: &str) -> Result<Vec<TelemetryRow>, StoreError> {
        unsupported()
    }

    async fn range(&self, _query: RangeQuery) -> Result<RangePage, StoreError> {
        unsupported()
    }

    async fn downsample(&self, _query: DownsampleQuery) -> Result<Vec<Bucket>, StoreError> {
        unsupported()
    }

    async fn count_rows(&self, _hub_id: Option<&str>) -> Result<u64, StoreError> {
        Ok(self.state.lock().rows.len() as u64)
    }

    async fn list_dead_letters(
        &self,
        _hub: Option<&str>,
        _before: Option<i64>,
        _limit: u32,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        Ok(self.dead_letters())
    }

    async fn record_parser_event(&self, event: NewParserEvent) -> Result<(), StoreError> {
        let mut state = self.state.lock();
        let id = state.events.len() as i64 + 1;
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
        _limit: u32,
    ) -> Result<Vec<ParserEvent>, StoreError> {
        let state = self.state.lock();
        Ok(state
            .events
            .iter()
            .rev()
            .filter(|event| hub_id.is_none_or(|hub| event.hub_id == hub))
            .cloned()
            .collect())
    }

    async fn set_presence(
        &self,
        device_id: &str,
        online: bool,
        at: Millis,
    ) -> Result<(), StoreError> {
        let mut state = self.state.lock();
        if !state.devices.contains_key(device_id) {
            return Err(StoreError::NotFound(format!(
                "device {device_id:?} not found"
            )));
        }
        let presence = state
            .presence
            .entry(device_id.to_owned())
            .or_insert(Presence {
                device_id: device_id.to_owned(),
                online: false,
                last_seen: None,
                changed_at: None,
            });
        if presence.online != online {
            presence.changed_at = Some(at);
        }
        presence.online = online;
        presence.last_seen = Some(at);
        Ok(())
    }

    async fn get_presence(&self, device_id: &str) -> Result<Presence, StoreError> {
        self.presence(device_id)
            .ok_or_else(|| StoreError::NotFound(format!("device {device_id:?} not found")))
    }

    async fn list_presence(&self, _hub_id: &str) -> Result<Vec<Presence>, StoreError> {
        unsupported()
    }
}
