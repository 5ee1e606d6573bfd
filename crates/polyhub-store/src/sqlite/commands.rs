//! Commands to devices: their per-device order and their state changes.
//!
//! Every function runs inside the caller's transaction. Writes run under `BEGIN IMMEDIATE`, so
//! the read-then-write steps below (next `seq`, compare-and-set of a state) cannot interleave
//! with another writer, in this process or another one.

use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OptionalExtension, Row, params, params_from_iter};

use super::page_size;
use crate::error::StoreError;
use crate::model::*;

/// Default page of command lists.
const DEFAULT_COMMAND_PAGE: u32 = 100;

/// The states a command can still leave; must match the `commands_unfinished` index's
/// `WHERE` clause in migration 0002 word for word, or SQLite will not use that index.
const UNFINISHED_CONDITION: &str = "state IN ('queued', 'sent', 'delivered')";

const COMMAND_COLUMNS: &str = "id, device_id, hub_id, protocol, name, payload, seq, state, \
     created_at, expires_at, sent_at, delivered_at, acknowledged_at, finished_at, reason, \
     reply, attempts";

fn parse_state(command_id: &str, text: &str) -> Result<CommandState, StoreError> {
    CommandState::from_name(text).ok_or_else(|| {
        StoreError::Backend(format!(
            "stored state of command {command_id:?} is unknown: {text:?}"
        ))
    })
}

fn encode_json(what: &str, value: &serde_json::Value) -> Result<String, StoreError> {
    serde_json::to_string(value)
        .map_err(|err| StoreError::Invalid(format!("cannot encode command {what}: {err}")))
}

/// A `commands` row as stored; JSON and state still as text.
struct CommandRecord {
    id: String,
    device_id: String,
    hub_id: String,
    protocol: String,
    name: String,
    payload: String,
    seq: i64,
    state: String,
    created_at: Millis,
    expires_at: Option<Millis>,
    sent_at: Option<Millis>,
    delivered_at: Option<Millis>,
    acknowledged_at: Option<Millis>,
    finished_at: Option<Millis>,
    reason: Option<String>,
    reply: Option<String>,
    attempts: i64,
}

impl CommandRecord {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<CommandRecord> {
        Ok(CommandRecord {
            id: row.get(0)?,
            device_id: row.get(1)?,
            hub_id: row.get(2)?,
            protocol: row.get(3)?,
            name: row.get(4)?,
            payload: row.get(5)?,
            seq: row.get(6)?,
            state: row.get(7)?,
            created_at: row.get(8)?,
            expires_at: row.get(9)?,
            sent_at: row.get(10)?,
            delivered_at: row.get(11)?,
            acknowledged_at: row.get(12)?,
            finished_at: row.get(13)?,
            reason: row.get(14)?,
            reply: row.get(15)?,
            attempts: row.get(16)?,
        })
    }

    fn into_command(self) -> Result<Command, StoreError> {
        let payload = super::parse_stored_json("payload of command", &self.id, &self.payload)?;
        let reply = self
            .reply
            .as_deref()
            .map(|text| super::parse_stored_json("reply of command", &self.id, text))
            .transpose()?;
        let state = parse_state(&self.id, &self.state)?;
        let attempts = u32::try_from(self.attempts).map_err(|_| {
            StoreError::Backend(format!(
                "stored attempts of command {:?} is out of range: {}",
                self.id, self.attempts
            ))
        })?;
        Ok(Command {
            id: self.id,
            device_id: self.device_id,
            hub_id: self.hub_id,
            protocol: self.protocol,
            name: self.name,
            payload,
            seq: self.seq,
            state,
            created_at: self.created_at,
            expires_at: self.expires_at,
            sent_at: self.sent_at,
            delivered_at: self.delivered_at,
            acknowledged_at: self.acknowledged_at,
            finished_at: self.finished_at,
            reason: self.reason,
            reply,
            attempts,
        })
    }
}

fn collect_commands(records: Vec<CommandRecord>) -> Result<Vec<Command>, StoreError> {
    records
        .into_iter()
        .map(CommandRecord::into_command)
        .collect()
}

/// Stores `command`, whose fields [`NewCommandRecord::validate`] has checked and whose payload
/// it encoded.
pub(super) fn create_command(
    conn: &Connection,
    command: NewCommandRecord,
    payload: &str,
) -> Result<Command, StoreError> {
    let device_hub: Option<String> = conn
        .prepare_cached("SELECT hub_id FROM devices WHERE id = ?1")?
        .query_row([&command.device_id], |row| row.get(0))
        .optional()?;
    let Some(device_hub) = device_hub else {
        return Err(StoreError::NotFound(format!(
            "device {:?} not found",
            command.device_id
        )));
    };
    if device_hub != command.hub_id {
        return Err(command.wrong_hub(&device_hub));
    }
    let taken = conn
        .prepare_cached("SELECT 1 FROM commands WHERE id = ?1")?
        .query_row([&command.id], |_| Ok(()))
        .optional()?
        .is_some();
    if taken {
        return Err(command.duplicate());
    }
    // Counted over the commands table, not the device: a device deleted and created again
    // continues after its old commands instead of reusing their positions.
    let seq: i64 = conn
        .prepare_cached("SELECT COALESCE(MAX(seq), 0) + 1 FROM commands WHERE device_id = ?1")?
        .query_row([&command.device_id], |row| row.get(0))?;
    // The row comes back from the insert itself: no second lookup.
    conn.prepare_cached(&format!(
        "INSERT INTO commands (id, device_id, hub_id, protocol, name, payload, seq, state,
                               created_at, expires_at, attempts)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'queued', ?8, ?9, 0)
         RETURNING {COMMAND_COLUMNS}"
    ))?
    .query_row(
        params![
            command.id,
            command.device_id,
            command.hub_id,
            command.protocol,
            command.name,
            payload,
            seq,
            command.created_at,
            command.expires_at
        ],
        CommandRecord::from_row,
    )?
    .into_command()
}

fn find_command(conn: &Connection, id: &str) -> Result<Option<Command>, StoreError> {
    conn.prepare_cached(&format!(
        "SELECT {COMMAND_COLUMNS} FROM commands WHERE id = ?1"
    ))?
    .query_row([id], CommandRecord::from_row)
    .optional()?
    .map(CommandRecord::into_command)
    .transpose()
}

pub(super) fn get_command(conn: &Connection, id: &str) -> Result<Command, StoreError> {
    find_command(conn, id)?.ok_or_else(|| StoreError::NotFound(format!("command {id:?} not found")))
}

pub(super) fn list_commands(
    conn: &Connection,
    query: &CommandQuery,
) -> Result<Vec<Command>, StoreError> {
    let (direction, after_op) = if query.oldest_first {
        ("ASC", ">")
    } else {
        ("DESC", "<")
    };
    let mut conditions: Vec<String> = Vec::new();
    let mut values: Vec<SqlValue> = Vec::new();
    let order = match &query.device_id {
        Some(device_id) => {
            values.push(SqlValue::Text(device_id.clone()));
            conditions.push(format!("device_id = ?{}", values.len()));
            if let Some(after) = &query.after {
                let seq = cursor_seq(conn, after, device_id)?;
                values.push(SqlValue::Integer(seq));
                conditions.push(format!("seq {after_op} ?{}", values.len()));
            }
            format!("seq {direction}")
        }
        None => {
            if let Some(after) = &query.after {
                let created_at = cursor_created_at(conn, after)?;
                values.push(SqlValue::Integer(created_at));
                let created_at_index = values.len();
                values.push(SqlValue::Text(after.clone()));
                conditions.push(format!(
                    "(created_at, id) {after_op} (?{created_at_index}, ?{})",
                    values.len()
                ));
            }
            format!("created_at {direction}, id {direction}")
        }
    };
    if !query.states.is_empty() {
        let mut placeholders = Vec::with_capacity(query.states.len());
        for state in &query.states {
            values.push(SqlValue::Text(state.as_str().to_owned()));
            placeholders.push(format!("?{}", values.len()));
        }
        conditions.push(format!("state IN ({})", placeholders.join(", ")));
    }
    values.push(SqlValue::Integer(page_size(
        query.limit,
        DEFAULT_COMMAND_PAGE,
    )));
    let limit_index = values.len();
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    };
    let sql = format!(
        "SELECT {COMMAND_COLUMNS} FROM commands {filter} ORDER BY {order} LIMIT ?{limit_index}"
    );
    let records = conn
        .prepare_cached(&sql)?
        .query_map(params_from_iter(values), CommandRecord::from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    collect_commands(records)
}

/// The `seq` of the command a per-device page continues after; it must be that device's.
fn cursor_seq(conn: &Connection, after: &str, device_id: &str) -> Result<i64, StoreError> {
    let found: Option<(String, i64)> = conn
        .prepare_cached("SELECT device_id, seq FROM commands WHERE id = ?1")?
        .query_row([after], |row| Ok((row.get(0)?, row.get(1)?)))
        .optional()?;
    match found {
        None => Err(unknown_command_cursor(after)),
        Some((owner, _)) if owner != device_id => Err(foreign_command_cursor(after, device_id)),
        Some((_, seq)) => Ok(seq),
    }
}

fn cursor_created_at(conn: &Connection, after: &str) -> Result<Millis, StoreError> {
    conn.prepare_cached("SELECT created_at FROM commands WHERE id = ?1")?
        .query_row([after], |row| row.get(0))
        .optional()?
        .ok_or_else(|| unknown_command_cursor(after))
}

/// Applies one command's `steps`, in order, as one compare-and-set write: the row is read
/// once, each step is checked and applied by the model's rules ([`CommandTransition::check_from`],
/// [`Command::apply`], the same code the in-memory store runs), and the result is written once,
/// on condition that the state is still the one read. A step refused refuses them all.
pub(super) fn transition_command_steps(
    conn: &Connection,
    steps: &[CommandTransition],
) -> Result<Command, StoreError> {
    let Some(first) = steps.first() else {
        return Err(crate::no_command_change());
    };
    let mut command = get_command(conn, &first.id)?;
    let read_state = command.state;
    command.apply_steps(steps)?;
    // Only a new reply is encoded and written: the stored text of an old one stays as it is.
    let new_reply = steps
        .iter()
        .rev()
        .find_map(|step| step.reply.as_ref())
        .map(|reply| encode_json("reply", reply))
        .transpose()?;
    // The state in the WHERE clause repeats the check: cheap insurance that nothing changed
    // the row in between, should this ever run outside an immediate transaction.
    let updated = conn
        .prepare_cached(
            "UPDATE commands SET state = ?2, sent_at = ?3, delivered_at = ?4,
                 acknowledged_at = ?5, finished_at = ?6, reason = ?7,
                 reply = COALESCE(?8, reply), attempts = ?9
             WHERE id = ?1 AND state = ?10",
        )?
        .execute(params![
            command.id,
            command.state.as_str(),
            command.sent_at,
            command.delivered_at,
            command.acknowledged_at,
            command.finished_at,
            command.reason,
            new_reply,
            i64::from(command.attempts),
            read_state.as_str(),
        ])?;
    if updated == 0 {
        return Err(StoreError::Conflict(format!(
            "command {:?} changed state concurrently",
            command.id
        )));
    }
    Ok(command)
}

pub(super) fn unfinished_commands(conn: &Connection) -> Result<Vec<Command>, StoreError> {
    let records = conn
        .prepare_cached(&format!(
            "SELECT {COMMAND_COLUMNS} FROM commands WHERE {UNFINISHED_CONDITION}
             ORDER BY device_id, seq"
        ))?
        .query_map([], CommandRecord::from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    collect_commands(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_their_text() {
        for state in [
            CommandState::Queued,
            CommandState::Sent,
            CommandState::Delivered,
            CommandState::Acknowledged,
            CommandState::Expired,
            CommandState::Failed,
            CommandState::Cancelled,
        ] {
            assert_eq!(parse_state("c", state.as_str()).unwrap(), state);
            // The stored text is the API's JSON spelling.
            assert_eq!(
                serde_json::to_value(state).unwrap(),
                serde_json::Value::String(state.as_str().to_owned())
            );
        }
        assert!(matches!(
            parse_state("c", "lost"),
            Err(StoreError::Backend(_))
        ));
    }

    #[test]
    fn unfinished_queries_use_the_partial_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("plan.sqlite")).unwrap();
        super::super::schema::migrate(&mut conn).unwrap();
        let plan: Vec<String> = conn
            .prepare(&format!(
                "EXPLAIN QUERY PLAN SELECT {COMMAND_COLUMNS} FROM commands
                 WHERE {UNFINISHED_CONDITION} ORDER BY device_id, seq"
            ))
            .unwrap()
            .query_map([], |row| row.get::<_, String>(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let plan = plan.join("\n");
        assert!(plan.contains("commands_unfinished"), "{plan}");
        assert!(
            !plan.contains("TEMP B-TREE"),
            "sorts instead of using the index: {plan}"
        );
    }

    #[test]
    fn device_lists_page_by_the_seq_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("plan.sqlite")).unwrap();
        super::super::schema::migrate(&mut conn).unwrap();
        let plan: Vec<String> = conn
            .prepare(&format!(
                "EXPLAIN QUERY PLAN SELECT {COMMAND_COLUMNS} FROM commands
                 WHERE device_id = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT 10"
            ))
            .unwrap()
            .query_map(params!["d1", 5], |row| row.get::<_, String>(3))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        let plan = plan.join("\n");
        assert!(plan.contains("commands_by_device_seq"), "{plan}");
        assert!(!plan.contains("TEMP B-TREE"), "{plan}");
    }
}
