//! Ingest (batches, redelivery detection, dead letters) and telemetry queries.
//!
//! Values are stored as `kind` + `num`/`text` columns: numbers and booleans (as 0/1) share
//! `num` so that SQL and the downsampler aggregate both, text goes to `text`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OptionalExtension, Row, params, params_from_iter};

use super::page_size;
use crate::error::StoreError;
use crate::model::*;

const KIND_NUMBER: i64 = 0;
const KIND_BOOLEAN: i64 = 1;
const KIND_TEXT: i64 = 2;

/// Default page of a range query.
const DEFAULT_RANGE_PAGE: u32 = 1_000;

/// Default page of dead letters.
const DEFAULT_DEAD_LETTER_PAGE: u32 = 100;

/// Seqs are `u64` on the wire and `BIGINT` (signed) in SQL. Reinterpreting the bits keeps
/// distinct seqs distinct, which is all redelivery detection needs.
fn seq_column(seq: u64) -> i64 {
    i64::from_ne_bytes(seq.to_ne_bytes())
}

fn value_columns(value: &Value) -> (i64, Option<f64>, Option<&str>) {
    match value {
        Value::Number(number) => (KIND_NUMBER, Some(*number), None),
        Value::Bool(flag) => (KIND_BOOLEAN, Some(if *flag { 1.0 } else { 0.0 }), None),
        Value::Text(text) => (KIND_TEXT, None, Some(text.as_str())),
    }
}

fn value_from_columns(
    kind: i64,
    num: Option<f64>,
    text: Option<String>,
) -> Result<Value, StoreError> {
    match kind {
        // SQLite stores a NaN as NULL; the decoder never produces one, but a NULL must not
        // make the whole query fail.
        KIND_NUMBER => Ok(Value::Number(num.unwrap_or(f64::NAN))),
        KIND_BOOLEAN => Ok(Value::Bool(num.is_some_and(|n| n != 0.0))),
        KIND_TEXT => Ok(Value::Text(text.unwrap_or_default())),
        other => Err(StoreError::Backend(format!(
            "stored telemetry value kind {other} is unknown"
        ))),
    }
}

/// A telemetry row as read, with its rowid for cursors.
struct StoredRow {
    id: i64,
    device_id: String,
    signal: String,
    ts: Millis,
    kind: i64,
    num: Option<f64>,
    text: Option<String>,
}

const ROW_COLUMNS: &str = "id, device_id, signal, ts, kind, num, text";

impl StoredRow {
    fn from_row(row: &Row<'_>) -> rusqlite::Result<StoredRow> {
        Ok(StoredRow {
            id: row.get(0)?,
            device_id: row.get(1)?,
            signal: row.get(2)?,
            ts: row.get(3)?,
            kind: row.get(4)?,
            num: row.get(5)?,
            text: row.get(6)?,
        })
    }

    fn into_row(self) -> Result<TelemetryRow, StoreError> {
        Ok(TelemetryRow {
            device_id: self.device_id,
            signal: self.signal,
            ts: self.ts,
            value: value_from_columns(self.kind, self.num, self.text)?,
        })
    }
}

// --- ingest ---------------------------------------------------------------------------

pub(super) fn write_batch(
    conn: &Connection,
    batch: &IngestBatch,
) -> Result<BatchOutcome, StoreError> {
    let mut outcome = BatchOutcome::default();
    let mut record_seq = conn.prepare_cached(
        "INSERT INTO ingest_seqs (hub_id, seq, received_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (hub_id, seq) DO NOTHING",
    )?;
    let mut insert_row = conn.prepare_cached(
        "INSERT INTO telemetry (device_id, signal, ts, kind, num, text) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    let mut insert_dead_letter = conn.prepare_cached(
        "INSERT INTO dead_letters (hub_id, device_id, topic, payload, reason, received_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    let mut last_seen: HashMap<&str, Millis> = HashMap::new();
    for message in &batch.messages {
        if let Some(seq) = message.seq {
            let recorded =
                record_seq.execute(params![batch.hub_id, seq_column(seq), message.received_at])?;
            if recorded == 0 {
                outcome.duplicates_skipped += 1;
                continue;
            }
        }
        for row in &message.rows {
            let (kind, num, text) = value_columns(&row.value);
            insert_row.execute(params![row.device_id, row.signal, row.ts, kind, num, text])?;
            outcome.rows_written += 1;
        }
        if let Some(dead) = &message.dead_letter {
            insert_dead_letter.execute(params![
                dead.hub_id,
                dead.device_id,
                dead.topic,
                dead.payload,
                dead.reason,
                dead.received_at
            ])?;
            outcome.dead_letters_written += 1;
        }
        if let Some(device_id) = &message.device_id {
            let seen = last_seen
                .entry(device_id.as_str())
                .or_insert(message.received_at);
            *seen = (*seen).max(message.received_at);
        }
    }
    if !last_seen.is_empty() {
        // Only registered devices have presence: a device removed while its messages were in
        // flight must not fail the batch (the parser would retry it forever).
        let mut touch = conn.prepare_cached(
            "INSERT INTO presence (device_id, online, last_seen, changed_at)
             SELECT id, 0, ?2, NULL FROM devices WHERE id = ?1
             ON CONFLICT (device_id) DO UPDATE SET last_seen =
                 CASE WHEN presence.last_seen IS NULL OR presence.last_seen < excluded.last_seen
                      THEN excluded.last_seen ELSE presence.last_seen END",
        )?;
        for (device_id, seen) in last_seen {
            touch.execute(params![device_id, seen])?;
        }
    }
    Ok(outcome)
}

pub(super) fn prune_seqs(
    conn: &Connection,
    hub_id: &str,
    received_before: Millis,
) -> Result<u64, StoreError> {
    let removed = conn
        .prepare_cached("DELETE FROM ingest_seqs WHERE hub_id = ?1 AND received_at < ?2")?
        .execute(params![hub_id, received_before])?;
    Ok(removed as u64)
}

// --- queries --------------------------------------------------------------------------

/// The signals a device has rows of, in order. One index seek per signal instead of a scan
/// of every row of the device (which `SELECT DISTINCT` would do).
fn signals_of(conn: &Connection, device_id: &str) -> Result<Vec<String>, StoreError> {
    let mut first = conn.prepare_cached(
        "SELECT signal FROM telemetry WHERE device_id = ?1 ORDER BY signal LIMIT 1",
    )?;
    let mut next = conn.prepare_cached(
        "SELECT signal FROM telemetry WHERE device_id = ?1 AND signal > ?2 ORDER BY signal LIMIT 1",
    )?;
    let mut signals = Vec::new();
    let mut current = first
        .query_row([device_id], |row| row.get::<_, String>(0))
        .optional()?;
    while let Some(signal) = current {
        current = next
            .query_row(params![device_id, signal], |row| row.get::<_, String>(0))
            .optional()?;
        signals.push(signal);
    }
    Ok(signals)
}

pub(super) fn latest(conn: &Connection, device_id: &str) -> Result<Vec<TelemetryRow>, StoreError> {
    let mut newest = conn.prepare_cached(&format!(
        "SELECT {ROW_COLUMNS} FROM telemetry WHERE device_id = ?1 AND signal = ?2
         ORDER BY ts DESC, id DESC LIMIT 1"
    ))?;
    let mut rows = Vec::new();
    for signal in signals_of(conn, device_id)? {
        if let Some(row) = newest
            .query_row(params![device_id, signal], StoredRow::from_row)
            .optional()?
        {
            rows.push(row.into_row()?);
        }
    }
    Ok(rows)
}

/// Where a range page ended: the `(ts, rowid)` of its last row. Rendered as `"<ts>:<id>"`;
/// callers treat it as opaque.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Cursor {
    ts: Millis,
    id: i64,
}

impl Cursor {
    pub(super) fn parse(text: &str) -> Result<Cursor, StoreError> {
        let invalid = || StoreError::Invalid(format!("invalid range cursor {text:?}"));
        let (ts, id) = text.split_once(':').ok_or_else(invalid)?;
        Ok(Cursor {
            ts: ts.parse().map_err(|_| invalid())?,
            id: id.parse().map_err(|_| invalid())?,
        })
    }

    fn render(self) -> String {
        format!("{}:{}", self.ts, self.id)
    }
}

pub(super) fn range(
    conn: &Connection,
    query: &RangeQuery,
    after: Option<Cursor>,
) -> Result<RangePage, StoreError> {
    let limit = page_size(query.limit, DEFAULT_RANGE_PAGE);
    // One row more than the page tells whether another page follows.
    let fetch = limit + 1;
    let mut stored = match &query.signal {
        Some(signal) => conn
            .prepare_cached(&series_range_sql(query, after))?
            .query_map(
                params_from_iter(series_range_args(query, signal, after, fetch)),
                StoredRow::from_row,
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?,
        None => merged_range(conn, query, after, fetch)?,
    };
    let more = stored.len() as i64 > limit;
    stored.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let next = match stored.last() {
        Some(last) if more => Some(
            Cursor {
                ts: last.ts,
                id: last.id,
            }
            .render(),
        ),
        _ => None,
    };
    let rows = stored
        .into_iter()
        .map(StoredRow::into_row)
        .collect::<Result<_, _>>()?;
    Ok(RangePage { rows, next })
}

/// The range query of one signal, oldest first; its parameters come from
/// [`series_range_args`].
fn series_range_sql(query: &RangeQuery, after: Option<Cursor>) -> String {
    let mut sql = format!("SELECT {ROW_COLUMNS} FROM telemetry WHERE device_id = ? AND signal = ?");
    if query.from.is_some() {
        sql.push_str(" AND ts >= ?");
    }
    if query.to.is_some() {
        sql.push_str(" AND ts < ?");
    }
    if after.is_some() {
        // A row-value comparison, which SQLite (and PostgreSQL) turn into one index range.
        sql.push_str(" AND (ts, id) > (?, ?)");
    }
    sql.push_str(" ORDER BY ts, id LIMIT ?");
    sql
}

fn series_range_args(
    query: &RangeQuery,
    signal: &str,
    after: Option<Cursor>,
    fetch: i64,
) -> Vec<SqlValue> {
    let mut args = vec![
        SqlValue::Text(query.device_id.clone()),
        SqlValue::Text(signal.to_owned()),
    ];
    args.extend(query.from.map(SqlValue::Integer));
    args.extend(query.to.map(SqlValue::Integer));
    if let Some(cursor) = after {
        args.extend([SqlValue::Integer(cursor.ts), SqlValue::Integer(cursor.id)]);
    }
    args.push(SqlValue::Integer(fetch));
    args
}

/// A range over every signal of a device: a k-way merge of the per-signal ranges by
/// `(ts, id)`. The telemetry index is per series, so this reads at most `fetch` rows per
/// signal, where one `ORDER BY ts` over the device would read (and sort) every row of the
/// device in the time bounds; it also spares ingest a second index.
fn merged_range(
    conn: &Connection,
    query: &RangeQuery,
    after: Option<Cursor>,
    fetch: i64,
) -> Result<Vec<StoredRow>, StoreError> {
    let signals = signals_of(conn, &query.device_id)?;
    let sql = series_range_sql(query, after);
    let mut statements = signals
        .iter()
        .map(|_| conn.prepare_cached(&sql))
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut cursors = statements
        .iter_mut()
        .zip(&signals)
        .map(|(statement, signal)| {
            statement.query(params_from_iter(series_range_args(
                query, signal, after, fetch,
            )))
        })
        .collect::<rusqlite::Result<Vec<_>>>()?;

    // The head row of each signal waits in `heads`; the heap orders the heads.
    let mut heads: Vec<Option<StoredRow>> = Vec::with_capacity(cursors.len());
    let mut heap = BinaryHeap::new();
    for (index, rows) in cursors.iter_mut().enumerate() {
        let head = rows.next()?.map(StoredRow::from_row).transpose()?;
        if let Some(row) = &head {
            heap.push(Reverse((row.ts, row.id, index)));
        }
        heads.push(head);
    }
    let mut merged = Vec::new();
    while (merged.len() as i64) < fetch {
        let Some(Reverse((_, _, index))) = heap.pop() else {
            break;
        };
        let Some(row) = heads[index].take() else {
            break;
        };
        merged.push(row);
        if let Some(next) = cursors[index]
            .next()?
            .map(StoredRow::from_row)
            .transpose()?
        {
            heap.push(Reverse((next.ts, next.id, index)));
            heads[index] = Some(next);
        }
    }
    Ok(merged)
}

/// The start of the bucket holding `ts`: the largest multiple of `interval` not after `ts`
/// (floor, also for times before the epoch).
fn bucket_start(ts: Millis, interval: i64) -> Millis {
    ts.checked_sub(ts.rem_euclid(interval)).unwrap_or(i64::MIN)
}

pub(super) fn downsample(
    conn: &Connection,
    query: &DownsampleQuery,
) -> Result<Vec<Bucket>, StoreError> {
    // Aggregated here rather than with GROUP BY: the index already yields rows in time order,
    // so buckets close one after another without a sort, and the floor arithmetic stays exact.
    let mut statement = conn.prepare_cached(
        "SELECT ts, num FROM telemetry
         WHERE device_id = ?1 AND signal = ?2 AND ts >= ?3 AND ts < ?4
           AND kind IN (0, 1) AND num IS NOT NULL
         ORDER BY ts",
    )?;
    let mut rows = statement.query(params![query.device_id, query.signal, query.from, query.to])?;
    let mut buckets: Vec<Bucket> = Vec::new();
    let mut sum = 0.0;
    while let Some(row) = rows.next()? {
        let ts: Millis = row.get(0)?;
        let value: f64 = row.get(1)?;
        let start = bucket_start(ts, query.interval_ms);
        match buckets.last_mut() {
            Some(bucket) if bucket.start == start => {
                bucket.count += 1;
                bucket.min = bucket.min.min(value);
                bucket.max = bucket.max.max(value);
                sum += value;
            }
            _ => {
                if let Some(bucket) = buckets.last_mut() {
                    bucket.avg = sum / bucket.count as f64;
                }
                buckets.push(Bucket {
                    start,
                    count: 1,
                    min: value,
                    max: value,
                    avg: value,
                });
                sum = value;
            }
        }
    }
    if let Some(bucket) = buckets.last_mut() {
        bucket.avg = sum / bucket.count as f64;
    }
    Ok(buckets)
}

pub(super) fn count_rows(conn: &Connection, hub_id: Option<&str>) -> Result<u64, StoreError> {
    let count: i64 = match hub_id {
        Some(hub_id) => conn
            .prepare_cached(
                "SELECT COUNT(*) FROM telemetry
                 WHERE device_id IN (SELECT id FROM devices WHERE hub_id = ?1)",
            )?
            .query_row([hub_id], |row| row.get(0))?,
        None => conn
            .prepare_cached("SELECT COUNT(*) FROM telemetry")?
            .query_row([], |row| row.get(0))?,
    };
    Ok(u64::try_from(count).unwrap_or(0))
}

// --- dead letters ---------------------------------------------------------------------

pub(super) fn list_dead_letters(
    conn: &Connection,
    hub_id: Option<&str>,
    before_id: Option<i64>,
    limit: u32,
) -> Result<Vec<DeadLetter>, StoreError> {
    let limit = page_size(limit, DEFAULT_DEAD_LETTER_PAGE);
    let before = before_id.unwrap_or(i64::MAX);
    let columns = "id, hub_id, device_id, topic, payload, reason, received_at";
    let map = |row: &Row<'_>| -> rusqlite::Result<DeadLetter> {
        let payload: Vec<u8> = row.get(4)?;
        Ok(DeadLetter {
            id: row.get(0)?,
            hub_id: row.get(1)?,
            device_id: row.get(2)?,
            topic: row.get(3)?,
            payload_len: payload.len() as u64,
            payload: String::from_utf8_lossy(&payload).into_owned(),
            reason: row.get(5)?,
            received_at: row.get(6)?,
        })
    };
    let letters = match hub_id {
        Some(hub_id) => conn
            .prepare_cached(&format!(
                "SELECT {columns} FROM dead_letters WHERE hub_id = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3"
            ))?
            .query_map(params![hub_id, before, limit], map)?
            .collect::<rusqlite::Result<Vec<_>>>()?,
        None => conn
            .prepare_cached(&format!(
                "SELECT {columns} FROM dead_letters WHERE id < ?1 ORDER BY id DESC LIMIT ?2"
            ))?
            .query_map(params![before, limit], map)?
            .collect::<rusqlite::Result<Vec<_>>>()?,
    };
    Ok(letters)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_floor_towards_negative_infinity() {
        assert_eq!(bucket_start(0, 10), 0);
        assert_eq!(bucket_start(9, 10), 0);
        assert_eq!(bucket_start(10, 10), 10);
        assert_eq!(bucket_start(-1, 10), -10);
        assert_eq!(bucket_start(-10, 10), -10);
        assert_eq!(bucket_start(-11, 10), -20);
        assert_eq!(bucket_start(i64::MIN, 3), i64::MIN);
        assert_eq!(bucket_start(i64::MAX, i64::MAX), i64::MAX);
    }

    #[test]
    fn cursor_round_trips_and_rejects_garbage() {
        let cursor = Cursor { ts: -5, id: 42 };
        assert_eq!(Cursor::parse(&cursor.render()).unwrap(), cursor);
        for bad in ["", "12", "a:1", "1:b", "1:2:3", ":", "1:"] {
            assert!(
                matches!(Cursor::parse(bad), Err(StoreError::Invalid(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn values_round_trip_through_their_columns() {
        for value in [
            Value::Number(-2.5),
            Value::Bool(true),
            Value::Bool(false),
            Value::Text("hi".into()),
        ] {
            let (kind, num, text) = value_columns(&value);
            assert_eq!(
                value_from_columns(kind, num, text.map(str::to_owned)).unwrap(),
                value
            );
        }
        assert!(matches!(
            value_from_columns(7, None, None),
            Err(StoreError::Backend(_))
        ));
    }

    #[test]
    fn seqs_above_i64_stay_distinct() {
        assert_ne!(seq_column(u64::MAX), seq_column(u64::MAX - 1));
        assert_eq!(seq_column(7), 7);
    }
}
