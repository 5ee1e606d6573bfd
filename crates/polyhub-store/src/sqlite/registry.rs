//! Groups, hubs and devices.
//!
//! Every function runs inside the caller's transaction. Writes check existence and ownership
//! explicitly (under `BEGIN IMMEDIATE` nothing changes between the check and the write) so that
//! callers get messages such as `hub "h1" not found` instead of a raw constraint error; the
//! schema's keys still back those checks up.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{page_size, parse_stored_json};
use crate::error::StoreError;
use crate::model::*;

/// Default page of registry lists.
const DEFAULT_LIST_PAGE: u32 = 100;

/// The metadata to store: `{}` when absent; anything but a JSON object is refused.
fn metadata_text(metadata: Option<&serde_json::Value>) -> Result<String, StoreError> {
    match metadata {
        None => Ok("{}".to_owned()),
        Some(value @ serde_json::Value::Object(_)) => Ok(value.to_string()),
        Some(other) => Err(StoreError::Invalid(format!(
            "metadata must be a JSON object, got {}",
            json_kind(other)
        ))),
    }
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn settings_text(settings: &HubSettings) -> Result<String, StoreError> {
    serde_json::to_string(settings)
        .map_err(|err| StoreError::Backend(format!("cannot encode hub settings: {err}")))
}

fn desired_state_text(state: DesiredState) -> &'static str {
    match state {
        DesiredState::Running => "running",
        DesiredState::Stopped => "stopped",
    }
}

fn parse_desired_state(hub_id: &str, text: &str) -> Result<DesiredState, StoreError> {
    match text {
        "running" => Ok(DesiredState::Running),
        "stopped" => Ok(DesiredState::Stopped),
        other => Err(StoreError::Backend(format!(
            "stored desired state of hub {hub_id:?} is unknown: {other:?}"
        ))),
    }
}

fn check_protocol(protocol: &str) -> Result<(), StoreError> {
    if protocol.is_empty() {
        return Err(StoreError::Invalid("protocol must not be empty".to_owned()));
    }
    Ok(())
}

/// `updated_at` for a change now: strictly after the previous one, so an update is visible
/// even within the same millisecond.
fn next_update_time(previous: Millis) -> Millis {
    now_millis().max(previous.saturating_add(1))
}

fn exists(conn: &Connection, sql: &str, id: &str) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached(sql)?
        .query_row([id], |_| Ok(()))
        .optional()?
        .is_some())
}

fn group_exists(conn: &Connection, id: &str) -> Result<bool, StoreError> {
    exists(conn, "SELECT 1 FROM groups WHERE id = ?1", id)
}

fn hub_exists(conn: &Connection, id: &str) -> Result<bool, StoreError> {
    exists(conn, "SELECT 1 FROM hubs WHERE id = ?1", id)
}

pub(super) fn device_exists(conn: &Connection, id: &str) -> Result<bool, StoreError> {
    exists(conn, "SELECT 1 FROM devices WHERE id = ?1", id)
}

fn count_children(conn: &Connection, sql: &str, id: &str) -> Result<i64, StoreError> {
    Ok(conn
        .prepare_cached(sql)?
        .query_row([id], |row| row.get(0))?)
}

// --- groups ---------------------------------------------------------------------------

const GROUP_COLUMNS: &str = "id, name, metadata, created_at, updated_at";

struct GroupRecord {
    id: String,
    name: String,
    metadata: String,
    created_at: Millis,
    updated_at: Millis,
}

impl GroupRecord {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<GroupRecord> {
        Ok(GroupRecord {
            id: row.get(0)?,
            name: row.get(1)?,
            metadata: row.get(2)?,
            created_at: row.get(3)?,
            updated_at: row.get(4)?,
        })
    }

    fn into_group(self) -> Result<Group, StoreError> {
        let metadata = parse_stored_json("metadata of group", &self.id, &self.metadata)?;
        Ok(Group {
            id: self.id,
            name: self.name,
            metadata,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

pub(super) fn create_group(conn: &Connection, group: NewGroup) -> Result<Group, StoreError> {
    validate_id("group", &group.id)?;
    let metadata = metadata_text(group.metadata.as_ref())?;
    if group_exists(conn, &group.id)? {
        return Err(StoreError::Conflict(format!(
            "group {:?} already exists",
            group.id
        )));
    }
    let name = group.name.unwrap_or_else(|| group.id.clone());
    let now = now_millis();
    conn.prepare_cached(
        "INSERT INTO groups (id, name, metadata, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?4)",
    )?
    .execute(params![group.id, name, metadata, now])?;
    get_group(conn, &group.id)
}

pub(super) fn get_group(conn: &Connection, id: &str) -> Result<Group, StoreError> {
    conn.prepare_cached(&format!("SELECT {GROUP_COLUMNS} FROM groups WHERE id = ?1"))?
        .query_row([id], GroupRecord::from_row)
        .optional()?
        .ok_or_else(|| StoreError::NotFound(format!("group {id:?} not found")))?
        .into_group()
}

pub(super) fn list_groups(conn: &Connection, query: &ListQuery) -> Result<Vec<Group>, StoreError> {
    let mut statement = conn.prepare_cached(&format!(
        "SELECT {GROUP_COLUMNS} FROM groups WHERE id > ?1 ORDER BY id LIMIT ?2"
    ))?;
    let after = query.after.as_deref().unwrap_or("");
    let records = statement
        .query_map(
            params![after, page_size(query.limit, DEFAULT_LIST_PAGE)],
            GroupRecord::from_row,
        )?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    records.into_iter().map(GroupRecord::into_group).collect()
}

pub(super) fn update_group(
    conn: &Connection,
    id: &str,
    patch: GroupPatch,
) -> Result<Group, StoreError> {
    let current = get_group(conn, id)?;
    let metadata = match &patch.metadata {
        Some(metadata) => metadata_text(Some(metadata))?,
        None => current.metadata.to_string(),
    };
    let name = patch.name.unwrap_or(current.name);
    conn.prepare_cached(
        "UPDATE groups SET name = ?2, metadata = ?3, updated_at = ?4 WHERE id = ?1",
    )?
    .execute(params![
        id,
        name,
        metadata,
        next_update_time(current.updated_at)
    ])?;
    get_group(conn, id)
}

pub(super) fn delete_group(conn: &Connection, id: &str) -> Result<(), StoreError> {
    if !group_exists(conn, id)? {
        return Err(StoreError::NotFound(format!("group {id:?} not found")));
    }
    let hubs = count_children(conn, "SELECT COUNT(*) FROM hubs WHERE group_id = ?1", id)?;
    if hubs > 0 {
        return Err(StoreError::Conflict(format!(
            "group {id:?} still owns {hubs} hub(s); delete them first"
        )));
    }
    conn.prepare_cached("DELETE FROM groups WHERE id = ?1")?
        .execute([id])?;
    Ok(())
}

// --- hubs -----------------------------------------------------------------------------

const HUB_COLUMNS: &str =
    "id, group_id, name, metadata, settings, desired_state, created_at, updated_at";

struct HubRecord {
    id: String,
    group_id: String,
    name: String,
    metadata: String,
    settings: String,
    desired_state: String,
    created_at: Millis,
    updated_at: Millis,
}

impl HubRecord {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<HubRecord> {
        Ok(HubRecord {
            id: row.get(0)?,
            group_id: row.get(1)?,
            name: row.get(2)?,
            metadata: row.get(3)?,
            settings: row.get(4)?,
            desired_state: row.get(5)?,
            created_at: row.get(6)?,
            updated_at: row.get(7)?,
        })
    }

    fn into_hub(self) -> Result<Hub, StoreError> {
        let metadata = parse_stored_json("metadata of hub", &self.id, &self.metadata)?;
        let settings = parse_stored_json("settings of hub", &self.id, &self.settings)?;
        let desired_state = parse_desired_state(&self.id, &self.desired_state)?;
        Ok(Hub {
            id: self.id,
            group_id: self.group_id,
            name: self.name,
            metadata,
            settings,
            desired_state,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

pub(super) fn create_hub(conn: &Connection, hub: NewHub) -> Result<Hub, StoreError> {
    validate_id("hub", &hub.id)?;
    validate_id("group", &hub.group_id)?;
    let metadata = metadata_text(hub.metadata.as_ref())?;
    let settings = settings_text(&hub.settings)?;
    if hub_exists(conn, &hub.id)? {
        return Err(StoreError::Conflict(format!(
            "hub {:?} already exists",
            hub.id
        )));
    }
    if !group_exists(conn, &hub.group_id)? {
        return Err(StoreError::Conflict(format!(
            "group {:?} does not exist",
            hub.group_id
        )));
    }
    let name = hub.name.unwrap_or_else(|| hub.id.clone());
    let now = now_millis();
    conn.prepare_cached(
        "INSERT INTO hubs (id, group_id, name, metadata, settings, desired_state, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
    )?
    .execute(params![
        hub.id,
        hub.group_id,
        name,
        metadata,
        settings,
        desired_state_text(hub.desired_state),
        now
    ])?;
    get_hub(conn, &hub.id)
}

pub(super) fn get_hub(conn: &Connection, id: &str) -> Result<Hub, StoreError> {
    conn.prepare_cached(&format!("SELECT {HUB_COLUMNS} FROM hubs WHERE id = ?1"))?
        .query_row([id], HubRecord::from_row)
        .optional()?
        .ok_or_else(|| StoreError::NotFound(format!("hub {id:?} not found")))?
        .into_hub()
}

pub(super) fn list_hubs(conn: &Connection, query: &ListQuery) -> Result<Vec<Hub>, StoreError> {
    let after = query.after.as_deref().unwrap_or("");
    let limit = page_size(query.limit, DEFAULT_LIST_PAGE);
    let records = match &query.parent {
        Some(group_id) => conn
            .prepare_cached(&format!(
                "SELECT {HUB_COLUMNS} FROM hubs WHERE group_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3"
            ))?
            .query_map(params![group_id, after, limit], HubRecord::from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?,
        None => conn
            .prepare_cached(&format!(
                "SELECT {HUB_COLUMNS} FROM hubs WHERE id > ?1 ORDER BY id LIMIT ?2"
            ))?
            .query_map(params![after, limit], HubRecord::from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?,
    };
    records.into_iter().map(HubRecord::into_hub).collect()
}

pub(super) fn update_hub(conn: &Connection, id: &str, patch: HubPatch) -> Result<Hub, StoreError> {
    let current = get_hub(conn, id)?;
    let metadata = match &patch.metadata {
        Some(metadata) => metadata_text(Some(metadata))?,
        None => current.metadata.to_string(),
    };
    let settings = settings_text(patch.settings.as_ref().unwrap_or(&current.settings))?;
    let name = patch.name.unwrap_or(current.name);
    conn.prepare_cached(
        "UPDATE hubs SET name = ?2, metadata = ?3, settings = ?4, updated_at = ?5 WHERE id = ?1",
    )?
    .execute(params![
        id,
        name,
        metadata,
        settings,
        next_update_time(current.updated_at)
    ])?;
    get_hub(conn, id)
}

pub(super) fn set_hub_desired_state(
    conn: &Connection,
    id: &str,
    state: DesiredState,
) -> Result<Hub, StoreError> {
    let current = get_hub(conn, id)?;
    conn.prepare_cached("UPDATE hubs SET desired_state = ?2, updated_at = ?3 WHERE id = ?1")?
        .execute(params![
            id,
            desired_state_text(state),
            next_update_time(current.updated_at)
        ])?;
    get_hub(conn, id)
}

pub(super) fn delete_hub(conn: &Connection, id: &str) -> Result<(), StoreError> {
    if !hub_exists(conn, id)? {
        return Err(StoreError::NotFound(format!("hub {id:?} not found")));
    }
    let devices = count_children(conn, "SELECT COUNT(*) FROM devices WHERE hub_id = ?1", id)?;
    if devices > 0 {
        return Err(StoreError::Conflict(format!(
            "hub {id:?} still owns {devices} device(s); delete them first"
        )));
    }
    // The recorded seqs only matter while the hub is ingested. Dead letters and parser events
    // stay: they are history an operator may still want to read.
    conn.prepare_cached("DELETE FROM ingest_seqs WHERE hub_id = ?1")?
        .execute([id])?;
    conn.prepare_cached("DELETE FROM hubs WHERE id = ?1")?
        .execute([id])?;
    Ok(())
}

// --- devices --------------------------------------------------------------------------

const DEVICE_COLUMNS: &str = "id, hub_id, name, protocol, metadata, created_at, updated_at";

struct DeviceRecord {
    id: String,
    hub_id: String,
    name: String,
    protocol: String,
    metadata: String,
    created_at: Millis,
    updated_at: Millis,
}

impl DeviceRecord {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<DeviceRecord> {
        Ok(DeviceRecord {
            id: row.get(0)?,
            hub_id: row.get(1)?,
            name: row.get(2)?,
            protocol: row.get(3)?,
            metadata: row.get(4)?,
            created_at: row.get(5)?,
            updated_at: row.get(6)?,
        })
    }

    fn into_device(self) -> Result<Device, StoreError> {
        let metadata = parse_stored_json("metadata of device", &self.id, &self.metadata)?;
        Ok(Device {
            id: self.id,
            hub_id: self.hub_id,
            name: self.name,
            protocol: self.protocol,
            metadata,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

pub(super) fn create_device(conn: &Connection, device: NewDevice) -> Result<Device, StoreError> {
    validate_id("device", &device.id)?;
    validate_id("hub", &device.hub_id)?;
    let metadata = metadata_text(device.metadata.as_ref())?;
    let protocol = device
        .protocol
        .unwrap_or_else(|| DEFAULT_PROTOCOL.to_owned());
    check_protocol(&protocol)?;
    if let Some(owner) = conn
        .prepare_cached("SELECT hub_id FROM devices WHERE id = ?1")?
        .query_row([&device.id], |row| row.get::<_, String>(0))
        .optional()?
    {
        return Err(StoreError::Conflict(format!(
            "device {:?} already exists (in hub {owner:?})",
            device.id
        )));
    }
    if !hub_exists(conn, &device.hub_id)? {
        return Err(StoreError::Conflict(format!(
            "hub {:?} does not exist",
            device.hub_id
        )));
    }
    let name = device.name.unwrap_or_else(|| device.id.clone());
    let now = now_millis();
    conn.prepare_cached(
        "INSERT INTO devices (id, hub_id, name, protocol, metadata, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
    )?
    .execute(params![
        device.id,
        device.hub_id,
        name,
        protocol,
        metadata,
        now
    ])?;
    get_device(conn, &device.id)
}

pub(super) fn get_device(conn: &Connection, id: &str) -> Result<Device, StoreError> {
    conn.prepare_cached(&format!(
        "SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?1"
    ))?
    .query_row([id], DeviceRecord::from_row)
    .optional()?
    .ok_or_else(|| StoreError::NotFound(format!("device {id:?} not found")))?
    .into_device()
}

pub(super) fn list_devices(
    conn: &Connection,
    query: &ListQuery,
) -> Result<Vec<Device>, StoreError> {
    let after = query.after.as_deref().unwrap_or("");
    let limit = page_size(query.limit, DEFAULT_LIST_PAGE);
    let records = match &query.parent {
        Some(hub_id) => conn
            .prepare_cached(&format!(
                "SELECT {DEVICE_COLUMNS} FROM devices WHERE hub_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3"
            ))?
            .query_map(params![hub_id, after, limit], DeviceRecord::from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?,
        None => conn
            .prepare_cached(&format!(
                "SELECT {DEVICE_COLUMNS} FROM devices WHERE id > ?1 ORDER BY id LIMIT ?2"
            ))?
            .query_map(params![after, limit], DeviceRecord::from_row)?
            .collect::<rusqlite::Result<Vec<_>>>()?,
    };
    records.into_iter().map(DeviceRecord::into_device).collect()
}

pub(super) fn update_device(
    conn: &Connection,
    id: &str,
    patch: DevicePatch,
) -> Result<Device, StoreError> {
    let current = get_device(conn, id)?;
    let metadata = match &patch.metadata {
        Some(metadata) => metadata_text(Some(metadata))?,
        None => current.metadata.to_string(),
    };
    let protocol = patch.protocol.unwrap_or(current.protocol);
    check_protocol(&protocol)?;
    let name = patch.name.unwrap_or(current.name);
    conn.prepare_cached(
        "UPDATE devices SET name = ?2, protocol = ?3, metadata = ?4, updated_at = ?5 WHERE id = ?1",
    )?
    .execute(params![
        id,
        name,
        protocol,
        metadata,
        next_update_time(current.updated_at)
    ])?;
    get_device(conn, id)
}

pub(super) fn delete_device(conn: &Connection, id: &str) -> Result<(), StoreError> {
    if !device_exists(conn, id)? {
        return Err(StoreError::NotFound(format!("device {id:?} not found")));
    }
    // Presence goes with the device (the foreign key cascades too; explicit so a database
    // opened without foreign_keys behaves the same). Telemetry stays queryable.
    conn.prepare_cached("DELETE FROM presence WHERE device_id = ?1")?
        .execute([id])?;
    conn.prepare_cached("DELETE FROM devices WHERE id = ?1")?
        .execute([id])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_must_be_an_object() {
        assert_eq!(metadata_text(None).unwrap(), "{}");
        let object = serde_json::json!({"floor": 2});
        assert_eq!(metadata_text(Some(&object)).unwrap(), r#"{"floor":2}"#);
        for bad in [
            serde_json::json!([1]),
            serde_json::json!("x"),
            serde_json::Value::Null,
        ] {
            assert!(
                matches!(metadata_text(Some(&bad)), Err(StoreError::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn update_time_moves_forward_even_within_one_millisecond() {
        let far_future = now_millis() + 60_000;
        assert_eq!(next_update_time(far_future), far_future + 1);
        assert!(next_update_time(0) >= now_millis() - 1_000);
    }

    #[test]
    fn desired_state_round_trips_through_its_text() {
        for state in [DesiredState::Running, DesiredState::Stopped] {
            assert_eq!(
                parse_desired_state("h", desired_state_text(state)).unwrap(),
                state
            );
        }
        assert!(matches!(
            parse_desired_state("h", "paused"),
            Err(StoreError::Backend(_))
        ));
    }
}
