//! Parser events and device presence.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::page_size;
use super::registry::device_exists;
use crate::error::StoreError;
use crate::model::*;

/// Default page of parser events.
const DEFAULT_EVENT_PAGE: u32 = 100;

fn kind_text(kind: ParserEventKind) -> &'static str {
    match kind {
        ParserEventKind::Started => "started",
        ParserEventKind::Stopped => "stopped",
        ParserEventKind::Failed => "failed",
        ParserEventKind::Restarted => "restarted",
    }
}

fn parse_kind(text: &str) -> Result<ParserEventKind, StoreError> {
    match text {
        "started" => Ok(ParserEventKind::Started),
        "stopped" => Ok(ParserEventKind::Stopped),
        "failed" => Ok(ParserEventKind::Failed),
        "restarted" => Ok(ParserEventKind::Restarted),
        other => Err(StoreError::Backend(format!(
            "stored parser event kind {other:?} is unknown"
        ))),
    }
}

pub(super) fn record_parser_event(
    conn: &Connection,
    event: &NewParserEvent,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO parser_events (hub_id, kind, reason, at) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![
        event.hub_id,
        kind_text(event.kind),
        event.reason,
        event.at
    ])?;
    Ok(())
}

pub(super) fn list_parser_events(
    conn: &Connection,
    hub_id: Option<&str>,
    limit: u32,
) -> Result<Vec<ParserEvent>, StoreError> {
    let limit = page_size(limit, DEFAULT_EVENT_PAGE);
    let map = |row: &Row<'_>| -> rusqlite::Result<(i64, String, String, Option<String>, Millis)> {
        Ok((
            row.get(0)?,
            row.get(1)?,
            row.get(2)?,
            row.get(3)?,
            row.get(4)?,
        ))
    };
    let records = match hub_id {
        Some(hub_id) => conn
            .prepare_cached(
                "SELECT id, hub_id, kind, reason, at FROM parser_events
                 WHERE hub_id = ?1 ORDER BY id DESC LIMIT ?2",
            )?
            .query_map(params![hub_id, limit], map)?
            .collect::<rusqlite::Result<Vec<_>>>()?,
        None => conn
            .prepare_cached(
                "SELECT id, hub_id, kind, reason, at FROM parser_events ORDER BY id DESC LIMIT ?1",
            )?
            .query_map(params![limit], map)?
            .collect::<rusqlite::Result<Vec<_>>>()?,
    };
    records
        .into_iter()
        .map(|(id, hub_id, kind, reason, at)| {
            Ok(ParserEvent {
                id,
                hub_id,
                kind: parse_kind(&kind)?,
                reason,
                at,
            })
        })
        .collect()
}

pub(super) fn set_presence(
    conn: &Connection,
    device_id: &str,
    online: bool,
    at: Millis,
) -> Result<(), StoreError> {
    if !device_exists(conn, device_id)? {
        return Err(StoreError::NotFound(format!(
            "device {device_id:?} not found"
        )));
    }
    // changed_at moves only when the state flips (or on the first report); last_seen never
    // goes backwards, whatever order reports arrive in.
    conn.prepare_cached(
        "INSERT INTO presence (device_id, online, last_seen, changed_at) VALUES (?1, ?2, ?3, ?3)
         ON CONFLICT (device_id) DO UPDATE SET
             changed_at = CASE WHEN presence.online <> excluded.online OR presence.changed_at IS NULL
                               THEN excluded.changed_at ELSE presence.changed_at END,
             online = excluded.online,
             last_seen = CASE WHEN presence.last_seen IS NULL OR presence.last_seen < excluded.last_seen
                              THEN excluded.last_seen ELSE presence.last_seen END",
    )?
    .execute(params![device_id, i64::from(online), at])?;
    Ok(())
}

fn presence_from_row(row: &Row<'_>) -> rusqlite::Result<Presence> {
    Ok(Presence {
        device_id: row.get(0)?,
        online: row.get::<_, Option<i64>>(1)?.unwrap_or(0) != 0,
        last_seen: row.get(2)?,
        changed_at: row.get(3)?,
    })
}

pub(super) fn get_presence(conn: &Connection, device_id: &str) -> Result<Presence, StoreError> {
    conn.prepare_cached(
        "SELECT d.id, p.online, p.last_seen, p.changed_at
         FROM devices d LEFT JOIN presence p ON p.device_id = d.id
         WHERE d.id = ?1",
    )?
    .query_row([device_id], presence_from_row)
    .optional()?
    .ok_or_else(|| StoreError::NotFound(format!("device {device_id:?} not found")))
}

pub(super) fn list_presence(conn: &Connection, hub_id: &str) -> Result<Vec<Presence>, StoreError> {
    let hub_known = conn
        .prepare_cached("SELECT 1 FROM hubs WHERE id = ?1")?
        .query_row([hub_id], |_| Ok(()))
        .optional()?
        .is_some();
    if !hub_known {
        return Err(StoreError::NotFound(format!("hub {hub_id:?} not found")));
    }
    let presences = conn
        .prepare_cached(
            "SELECT d.id, p.online, p.last_seen, p.changed_at
             FROM devices d LEFT JOIN presence p ON p.device_id = d.id
             WHERE d.hub_id = ?1 ORDER BY d.id",
        )?
        .query_map([hub_id], presence_from_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(presences)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_kinds_round_trip_through_their_text() {
        for kind in [
            ParserEventKind::Started,
            ParserEventKind::Stopped,
            ParserEventKind::Failed,
            ParserEventKind::Restarted,
        ] {
            assert_eq!(parse_kind(kind_text(kind)).unwrap(), kind);
        }
        assert!(matches!(
            parse_kind("exploded"),
            Err(StoreError::Backend(_))
        ));
    }
}
