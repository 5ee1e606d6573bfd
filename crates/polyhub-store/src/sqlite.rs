//! The embedded SQLite backend.
//!
//! One database file in the data folder, in WAL mode, shared by the polyhub process and by
//! hub parsers running as child processes.
//!
//! Threading: SQLite calls block, so every [`Store`] method runs its work on tokio's blocking
//! pool (`spawn_blocking`). Each store owns one write connection behind a mutex, so writes of
//! one process are serialised there; every write is a `BEGIN IMMEDIATE` transaction, which takes
//! the database's write lock up front so that the busy timeout (not an immediate
//! `SQLITE_BUSY`) governs waiting for writers of other processes. Reads use a small pool of
//! separate read-only connections: under WAL they read a snapshot and never wait behind ingest.
//!
//! Durability: `synchronous=FULL`, so each commit syncs the WAL before it returns. A parser
//! acknowledges messages to the broker only after `write_batch` returns, and with `NORMAL` a
//! power loss could drop the last commits after their messages were acknowledged. The cost is
//! one fsync per batch (not per row), which batching amortises: with 1000-row batches the
//! difference from `NORMAL` was within run-to-run noise on the 2-core development VM (see
//! `ingest_rate_report` in the tests for the measurement).

mod activity;
mod commands;
mod registry;
mod schema;
mod telemetry;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use rusqlite::{Connection, ErrorCode, OpenFlags, Transaction, TransactionBehavior};
use serde::Deserialize;

use crate::Store;
use crate::error::StoreError;
use crate::model::*;

/// Settings of the embedded SQLite store (`[storage.sqlite]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SqliteConfig {
    /// File name inside the data folder.
    pub file: String,
    /// How long a writer waits for a lock held by another process, in milliseconds.
    pub busy_timeout_ms: u64,
}

impl Default for SqliteConfig {
    fn default() -> Self {
        SqliteConfig {
            file: "polyhub.sqlite".to_owned(),
            busy_timeout_ms: 5_000,
        }
    }
}

/// Prepared statements kept per connection; the ingest path and every query shape fit.
const STATEMENT_CACHE_CAPACITY: usize = 64;

/// Page cache of the write connection, in KiB (allocated as pages are used, not up front).
const WRITER_CACHE_KIB: i64 = 64 * 1024;

/// Page cache of each read connection, in KiB.
const READER_CACHE_KIB: i64 = 16 * 1024;

/// Idle read connections kept for reuse; more are opened on demand under load and closed
/// when returned to a full pool.
const MAX_IDLE_READERS: usize = 4;

/// The SQLite-backed [`crate::Store`]. Cheap to clone; clones share the connections.
#[derive(Clone)]
pub struct SqliteStore {
    shared: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    busy_timeout: Duration,
    writer: Mutex<Connection>,
    idle_readers: Mutex<Vec<Connection>>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.shared.path)
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) `data_dir/<config.file>`, switches it to WAL mode and applies
    /// pending schema migrations.
    ///
    /// Blocks on file I/O and, when another process holds the write lock, for up to the busy
    /// timeout: call it at start-up or from a blocking context.
    ///
    /// Errors: `Backend` when the folder or file cannot be opened, a migration fails, or the
    /// database was written by a newer polyhub (its schema version is higher than ours);
    /// `Invalid` for an empty file name; `Unavailable` when locks stay held past the timeout.
    pub fn open(data_dir: &Path, config: &SqliteConfig) -> Result<SqliteStore, StoreError> {
        if config.file.trim().is_empty() {
            return Err(StoreError::Invalid(
                "storage.sqlite.file must not be empty".to_owned(),
            ));
        }
        std::fs::create_dir_all(data_dir).map_err(|err| {
            StoreError::Backend(format!(
                "cannot create data folder {}: {err}",
                data_dir.display()
            ))
        })?;
        let path = data_dir.join(&config.file);
        let busy_timeout = Duration::from_millis(config.busy_timeout_ms);
        let mut writer = open_connection(&path, busy_timeout, Role::Writer)?;
        schema::migrate(&mut writer)?;
        tracing::debug!(path = %path.display(), "opened SQLite store");
        Ok(SqliteStore {
            shared: Arc::new(Shared {
                path,
                busy_timeout,
                writer: Mutex::new(writer),
                idle_readers: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The database file this store uses.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Runs `op` in one write transaction on the blocking pool; commits if it returns `Ok`.
    async fn write<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        let shared = Arc::clone(&self.shared);
        run_blocking(move || {
            let mut conn = shared.writer.lock();
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let value = op(&tx)?;
            tx.commit()?;
            Ok(value)
        })
        .await
    }

    /// Runs `op` in one read transaction (one consistent snapshot) on a pooled read connection.
    async fn read<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, StoreError> + Send + 'static,
    {
        let shared = Arc::clone(&self.shared);
        run_blocking(move || {
            let pooled = shared.idle_readers.lock().pop();
            let mut conn = match pooled {
                Some(conn) => conn,
                None => open_connection(&shared.path, shared.busy_timeout, Role::Reader)?,
            };
            let result = conn
                .transaction_with_behavior(TransactionBehavior::Deferred)
                .map_err(StoreError::from)
                .and_then(|tx| {
                    let value = op(&tx)?;
                    tx.commit()?;
                    Ok(value)
                });
            let mut idle = shared.idle_readers.lock();
            if idle.len() < MAX_IDLE_READERS && conn.is_autocommit() {
                idle.push(conn);
            }
            result
        })
        .await
    }
}

/// Runs blocking database work off the async runtime's worker threads.
async fn run_blocking<T, F>(work: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StoreError> + Send + 'static,
{
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(join_error) => Err(StoreError::Backend(format!(
            "storage task did not finish: {join_error}"
        ))),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Writer,
    Reader,
}

fn open_connection(
    path: &Path,
    busy_timeout: Duration,
    role: Role,
) -> Result<Connection, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|err| {
        StoreError::Backend(format!("cannot open database {}: {err}", path.display()))
    })?;
    // First, so that the pragmas below already wait for other processes' locks.
    conn.busy_timeout(busy_timeout)?;
    let journal_mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !journal_mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Backend(format!(
            "database {} cannot use WAL mode (journal_mode is {journal_mode})",
            path.display()
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", true)?;
    // Negative sizes are KiB. The writer's cache holds the hot tails of the telemetry index:
    // with the default 2 MiB, ingest spends most of its time re-reading index pages.
    let cache_kib = match role {
        Role::Writer => WRITER_CACHE_KIB,
        Role::Reader => READER_CACHE_KIB,
    };
    conn.pragma_update(None, "cache_size", -cache_kib)?;
    if role == Role::Reader {
        conn.pragma_update(None, "query_only", true)?;
    }
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
    Ok(conn)
}

/// The one place SQLite errors become [`StoreError`]s.
impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> StoreError {
        match err.sqlite_error_code() {
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => {
                StoreError::Unavailable(format!("database is busy: {err}"))
            }
            Some(ErrorCode::ConstraintViolation) => {
                StoreError::Conflict(format!("conflicts with stored data: {err}"))
            }
            _ => StoreError::Backend(err.to_string()),
        }
    }
}

/// `limit` as a page size: 0 means `default`, anything above [`MAX_PAGE`] is capped.
fn page_size(limit: u32, default: u32) -> i64 {
    let size = if limit == 0 {
        default
    } else {
        limit.min(MAX_PAGE)
    };
    i64::from(size)
}

/// A stored JSON column that does not parse means the database was edited behind our back.
fn parse_stored_json<T: serde::de::DeserializeOwned>(
    what: &str,
    id: &str,
    text: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(text)
        .map_err(|err| StoreError::Backend(format!("stored {what} of {id:?} is corrupt: {err}")))
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_group(&self, group: NewGroup) -> Result<Group, StoreError> {
        self.write(move |tx| registry::create_group(tx, group))
            .await
    }

    async fn get_group(&self, id: &str) -> Result<Group, StoreError> {
        validate_id("group", id)?;
        let id = id.to_owned();
        self.read(move |tx| registry::get_group(tx, &id)).await
    }

    async fn list_groups(&self, query: ListQuery) -> Result<Vec<Group>, StoreError> {
        self.read(move |tx| registry::list_groups(tx, &query)).await
    }

    async fn update_group(&self, id: &str, patch: GroupPatch) -> Result<Group, StoreError> {
        validate_id("group", id)?;
        let id = id.to_owned();
        self.write(move |tx| registry::update_group(tx, &id, patch))
            .await
    }

    async fn delete_group(&self, id: &str) -> Result<(), StoreError> {
        validate_id("group", id)?;
        let id = id.to_owned();
        self.write(move |tx| registry::delete_group(tx, &id)).await
    }

    async fn create_hub(&self, hub: NewHub) -> Result<Hub, StoreError> {
        self.write(move |tx| registry::create_hub(tx, hub)).await
    }

    async fn get_hub(&self, id: &str) -> Result<Hub, StoreError> {
        validate_id("hub", id)?;
        let id = id.to_owned();
        self.read(move |tx| registry::get_hub(tx, &id)).await
    }

    async fn list_hubs(&self, query: ListQuery) -> Result<Vec<Hub>, StoreError> {
        if let Some(group_id) = &query.parent {
            validate_id("group", group_id)?;
        }
        self.read(move |tx| registry::list_hubs(tx, &query)).await
    }

    async fn update_hub(&self, id: &str, patch: HubPatch) -> Result<Hub, StoreError> {
        validate_id("hub", id)?;
        let id = id.to_owned();
        self.write(move |tx| registry::update_hub(tx, &id, patch))
            .await
    }

    async fn set_hub_desired_state(
        &self,
        id: &str,
        state: DesiredState,
    ) -> Result<Hub, StoreError> {
        validate_id("hub", id)?;
        let id = id.to_owned();
        self.write(move |tx| registry::set_hub_desired_state(tx, &id, state))
            .await
    }

    async fn delete_hub(&self, id: &str) -> Result<(), StoreError> {
        validate_id("hub", id)?;
        let id = id.to_owned();
        self.write(move |tx| registry::delete_hub(tx, &id)).await
    }

    async fn create_device(&self, device: NewDevice) -> Result<Device, StoreError> {
        self.write(move |tx| registry::create_device(tx, device))
            .await
    }

    async fn get_device(&self, id: &str) -> Result<Device, StoreError> {
        validate_id("device", id)?;
        let id = id.to_owned();
        self.read(move |tx| registry::get_device(tx, &id)).await
    }

    async fn list_devices(&self, query: ListQuery) -> Result<Vec<Device>, StoreError> {
        if let Some(hub_id) = &query.parent {
            validate_id("hub", hub_id)?;
        }
        self.read(move |tx| registry::list_devices(tx, &query))
            .await
    }

    async fn update_device(&self, id: &str, patch: DevicePatch) -> Result<Device, StoreError> {
        validate_id("device", id)?;
        let id = id.to_owned();
        self.write(move |tx| registry::update_device(tx, &id, patch))
            .await
    }

    async fn delete_device(&self, id: &str) -> Result<(), StoreError> {
        validate_id("device", id)?;
        let id = id.to_owned();
        self.write(move |tx| registry::delete_device(tx, &id)).await
    }

    async fn write_batch(&self, batch: IngestBatch) -> Result<BatchOutcome, StoreError> {
        if batch.messages.is_empty() {
            return Ok(BatchOutcome::default());
        }
        self.write(move |tx| telemetry::write_batch(tx, &batch))
            .await
    }

    async fn prune_seqs(&self, hub_id: &str, received_before: Millis) -> Result<u64, StoreError> {
        let hub_id = hub_id.to_owned();
        self.write(move |tx| telemetry::prune_seqs(tx, &hub_id, received_before))
            .await
    }

    async fn latest(&self, device_id: &str) -> Result<Vec<TelemetryRow>, StoreError> {
        validate_id("device", device_id)?;
        let device_id = device_id.to_owned();
        self.read(move |tx| telemetry::latest(tx, &device_id)).await
    }

    async fn range(&self, query: RangeQuery) -> Result<RangePage, StoreError> {
        validate_id("device", &query.device_id)?;
        let after = query
            .after
            .as_deref()
            .map(telemetry::Cursor::parse)
            .transpose()?;
        self.read(move |tx| telemetry::range(tx, &query, after))
            .await
    }

    async fn downsample(&self, query: DownsampleQuery) -> Result<Vec<Bucket>, StoreError> {
        validate_id("device", &query.device_id)?;
        if query.interval_ms <= 0 {
            return Err(StoreError::Invalid(format!(
                "interval must be positive, got {} ms",
                query.interval_ms
            )));
        }
        self.read(move |tx| telemetry::downsample(tx, &query)).await
    }

    async fn count_rows(&self, hub_id: Option<&str>) -> Result<u64, StoreError> {
        if let Some(hub_id) = hub_id {
            validate_id("hub", hub_id)?;
        }
        let hub_id = hub_id.map(str::to_owned);
        self.read(move |tx| telemetry::count_rows(tx, hub_id.as_deref()))
            .await
    }

    async fn list_dead_letters(
        &self,
        hub_id: Option<&str>,
        before_id: Option<i64>,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let hub_id = hub_id.map(str::to_owned);
        self.read(move |tx| telemetry::list_dead_letters(tx, hub_id.as_deref(), before_id, limit))
            .await
    }

    async fn record_parser_event(&self, event: NewParserEvent) -> Result<(), StoreError> {
        self.write(move |tx| activity::record_parser_event(tx, &event))
            .await
    }

    async fn list_parser_events(
        &self,
        hub_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<ParserEvent>, StoreError> {
        let hub_id = hub_id.map(str::to_owned);
        self.read(move |tx| activity::list_parser_events(tx, hub_id.as_deref(), limit))
            .await
    }

    async fn set_presence(
        &self,
        device_id: &str,
        online: bool,
        at: Millis,
    ) -> Result<(), StoreError> {
        validate_id("device", device_id)?;
        let device_id = device_id.to_owned();
        self.write(move |tx| activity::set_presence(tx, &device_id, online, at))
            .await
    }

    async fn get_presence(&self, device_id: &str) -> Result<Presence, StoreError> {
        validate_id("device", device_id)?;
        let device_id = device_id.to_owned();
        self.read(move |tx| activity::get_presence(tx, &device_id))
            .await
    }

    async fn list_presence(&self, hub_id: &str) -> Result<Vec<Presence>, StoreError> {
        validate_id("hub", hub_id)?;
        let hub_id = hub_id.to_owned();
        self.read(move |tx| activity::list_presence(tx, &hub_id))
            .await
    }

    async fn create_command(&self, command: NewCommandRecord) -> Result<Command, StoreError> {
        commands::validate_new_command(&command)?;
        self.write(move |tx| commands::create_command(tx, command))
            .await
    }

    async fn get_command(&self, id: &str) -> Result<Command, StoreError> {
        validate_id("command", id)?;
        let id = id.to_owned();
        self.read(move |tx| commands::get_command(tx, &id)).await
    }

    async fn list_commands(&self, query: CommandQuery) -> Result<Vec<Command>, StoreError> {
        if let Some(device_id) = &query.device_id {
            validate_id("device", device_id)?;
        }
        if let Some(after) = &query.after {
            validate_id("command", after)?;
        }
        self.read(move |tx| commands::list_commands(tx, &query))
            .await
    }

    async fn transition_command(&self, change: CommandTransition) -> Result<Command, StoreError> {
        validate_id("command", &change.id)?;
        self.write(move |tx| commands::transition_command(tx, &change))
            .await
    }

    async fn unfinished_commands(&self) -> Result<Vec<Command>, StoreError> {
        self.read(|tx| commands::unfinished_commands(tx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_durable_wal_connections() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), &SqliteConfig::default()).unwrap();
        let writer = store.shared.writer.lock();
        let pragma = |conn: &Connection, name: &str| -> String {
            conn.query_row(&format!("PRAGMA {name}"), [], |row| {
                row.get::<_, rusqlite::types::Value>(0)
            })
            .map(|value| match value {
                rusqlite::types::Value::Integer(n) => n.to_string(),
                rusqlite::types::Value::Text(text) => text,
                other => format!("{other:?}"),
            })
            .unwrap()
        };
        assert_eq!(pragma(&writer, "journal_mode"), "wal");
        assert_eq!(pragma(&writer, "synchronous"), "2", "FULL");
        assert_eq!(pragma(&writer, "foreign_keys"), "1");
        assert_eq!(pragma(&writer, "busy_timeout"), "5000");
        assert_eq!(pragma(&writer, "query_only"), "0");
        let reader = open_connection(store.path(), Duration::from_millis(5), Role::Reader).unwrap();
        assert_eq!(pragma(&reader, "query_only"), "1");
        assert_eq!(pragma(&reader, "busy_timeout"), "5");
    }

    #[test]
    fn sqlite_errors_map_to_store_errors() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (id TEXT PRIMARY KEY); INSERT INTO t VALUES ('a');")
            .unwrap();
        let duplicate = conn.execute("INSERT INTO t VALUES ('a')", []).unwrap_err();
        match StoreError::from(duplicate) {
            StoreError::Conflict(message) => assert!(message.contains("UNIQUE"), "{message}"),
            other => panic!("expected Conflict, got {other:?}"),
        }
        let syntax = conn.execute("NOT SQL", []).unwrap_err();
        assert!(matches!(StoreError::from(syntax), StoreError::Backend(_)));
        let busy = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        );
        assert!(matches!(StoreError::from(busy), StoreError::Unavailable(_)));
        let locked = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_LOCKED),
            None,
        );
        assert!(matches!(
            StoreError::from(locked),
            StoreError::Unavailable(_)
        ));
    }

    #[test]
    fn page_sizes_default_and_cap() {
        assert_eq!(page_size(0, 100), 100);
        assert_eq!(page_size(7, 100), 7);
        assert_eq!(page_size(u32::MAX, 100), i64::from(MAX_PAGE));
    }

    /// User + system CPU time of this process so far (Linux; 0 elsewhere). Wall time on a
    /// shared machine mostly measures the neighbours.
    fn process_cpu_seconds() -> f64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
        let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let ticks: f64 = after_name
            .split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|field| field.parse::<f64>().ok())
            .sum();
        ticks / 100.0
    }

    /// Prints ingest rates of 1000-row batches (1000 devices x 3 signals, interleaved);
    /// asserts nothing. Run by hand:
    /// `cargo test --release -p polyhub-store --lib ingest_rate -- --ignored --nocapture`.
    /// `POLYHUB_BENCH_VARIANTS=1` adds tuning experiments (small cache, no series index, rarer
    /// checkpoints); `POLYHUB_BENCH_BATCHES=n` changes the run length (default 200).
    #[test]
    #[ignore = "prints a measurement; run by hand"]
    fn ingest_rate_report() {
        const DEVICES: usize = 1_000;
        const SIGNALS: [&str; 3] = ["temperature", "humidity", "pressure"];
        const MESSAGES_PER_BATCH: usize = 334;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let variants = std::env::var("POLYHUB_BENCH_VARIANTS").unwrap_or_default();
        for (synchronous, tweak) in [
            ("FULL", ""),
            ("NORMAL", ""),
            ("FULL", "PRAGMA cache_size=-2000"),
            ("FULL", "DROP INDEX telemetry_by_series"),
            ("FULL", "PRAGMA wal_autocheckpoint=10000"),
        ] {
            if !tweak.is_empty() && variants.is_empty() {
                continue;
            }
            let dir = tempfile::tempdir().unwrap();
            let store = SqliteStore::open(dir.path(), &SqliteConfig::default()).unwrap();
            store
                .shared
                .writer
                .lock()
                .pragma_update(None, "synchronous", synchronous)
                .unwrap();
            let batches_wanted: usize = std::env::var("POLYHUB_BENCH_BATCHES")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(200);
            let mut seq = 0u64;
            let batches: Vec<IngestBatch> = (0..batches_wanted)
                .map(|b| {
                    let messages = (0..MESSAGES_PER_BATCH)
                        .map(|m| {
                            seq += 1;
                            let device =
                                format!("device-{:04}", (b * MESSAGES_PER_BATCH + m) % DEVICES);
                            let ts = 1_700_000_000_000 + seq as i64;
                            let rows = SIGNALS
                                .iter()
                                .map(|signal| TelemetryRow {
                                    device_id: device.clone(),
                                    signal: (*signal).to_owned(),
                                    ts,
                                    value: Value::Number(seq as f64 * 0.5),
                                })
                                .collect();
                            IngestedMessage {
                                seq: Some(seq),
                                device_id: Some(device),
                                received_at: ts,
                                rows,
                                dead_letter: None,
                            }
                        })
                        .collect();
                    IngestBatch {
                        hub_id: "h1".to_owned(),
                        messages,
                    }
                })
                .collect();
            let cpu_before = process_cpu_seconds();
            let started = std::time::Instant::now();
            let mut rows = 0;
            runtime.block_on(async {
                for batch in batches {
                    rows += store.write_batch(batch).await.unwrap().rows_written;
                }
            });
            let elapsed = started.elapsed().as_secs_f64();
            let cpu = process_cpu_seconds() - cpu_before;
            println!(
                "synchronous={synchronous} {tweak}: {rows} rows in {batches_wanted} batches of ~1000 rows, \
                 {DEVICES} devices x {} signals: {:.0} rows/s, {:.2} ms per batch, \
                 {:.0} rows per CPU-second",
                SIGNALS.len(),
                rows as f64 / elapsed,
                elapsed * 1_000.0 / batches_wanted as f64,
                rows as f64 / cpu
            );
        }
    }
}
