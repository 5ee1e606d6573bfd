//! The embedded SQLite backend.
//!
//! One database file in the data folder, in WAL mode, shared by the polyhub process and by
//! hub parsers running as child processes.
//!
//! Threading: SQLite calls block, so every [`Store`] method runs its work on tokio's blocking
//! pool (`spawn_blocking`). Each store owns one write connection behind a mutex, so writes of
//! one process are serialised there; every write transaction is `BEGIN IMMEDIATE`, which takes
//! the database's write lock up front so that the busy timeout (not an immediate
//! `SQLITE_BUSY`) governs waiting for writers of other processes. Reads use a small pool of
//! separate read-only connections: under WAL they read a snapshot and never wait behind ingest.
//!
//! Group commit: a write joins a queue; one drainer at a time (a blocking-pool task, started by
//! the write that finds none running) takes the write connection and runs everything queued
//! (up to [`MAX_WRITES_PER_COMMIT`] per transaction) in one transaction, each write inside its
//! own savepoint, so one write's error rolls back that write only, and keeps going while writes
//! keep arriving. A write returns once the transaction that carried it is committed. Concurrent
//! writers (API requests, the command service, ingest) thus share one commit, and so one sync,
//! and one blocking-pool hand-off, instead of each parking a pool thread on the connection's
//! lock (that cost two context switches per write, for nothing, under load). A lone write
//! commits at once: batching adds no delay. (The drainer stays on the blocking pool rather than
//! on a thread of its own because tokio's paused test clock waits for blocking-pool work and
//! not for other threads: tests of crates that use the store with paused time rely on that.)
//!
//! No write runs on the caller's (runtime) thread, not even one without a sync: a write into
//! the page cache can block for milliseconds (a page under writeback, the writer's backstop
//! checkpoint, another process holding SQLite's write lock), and on a runtime thread that
//! stalls every task of it. Running unsynced command steps in place was tried: it saved two
//! context switches per write and cost stalls of up to 150 ms under load.
//!
//! Device cache: [`Store::get_device`] is on the path of every command submission, so devices
//! read are kept in memory ([`DeviceCache`]) and served without a trip to the blocking pool.
//! Every registry write of this store that can change or remove a device (device update and
//! delete, hub and group delete) empties the cache once it has run, and a read that raced with
//! such a write does not put what it read into the cache (a generation counter). Devices are
//! written only through the `polyhub run` process's store (the API and the hub manager); a
//! parser child process never changes them.
//!
//! Durability: `synchronous=FULL`, so a commit syncs the WAL before the write returns (with
//! `fdatasync`: the workspace builds the bundled SQLite with `HAVE_FDATASYNC`, see
//! `.cargo/config.toml`). A parser
//! acknowledges messages to the broker only after `write_batch` returns, and with `NORMAL` a
//! power loss could drop the last commits after their messages were acknowledged. The cost is
//! one fsync per commit (not per row), which batching amortises: with 1000-row batches the
//! difference from `NORMAL` was within run-to-run noise on the 2-core development VM (see
//! `ingest_rate_report` in the tests for the measurement). One kind of write is exempt: a
//! command moving to `sent` or `delivered` ([`Durability::Committed`]). Losing such a step to a
//! power cut changes nothing polyhub does (a command not known to be answered is sent again
//! after a restart, whether it was recorded `queued`, `sent` or `delivered`), and since the WAL
//! is written in order, the next synced commit makes it durable too. A batch made only of such
//! writes commits with `synchronous=NORMAL`: it survives a crash of polyhub, not of the machine.
//!
//! Checkpoints: SQLite's automatic checkpoint runs inside the commit that crosses the WAL size
//! limit, copying the WAL into the database and syncing it while every write waits (tens of
//! milliseconds each time, under a steady stream of small commits). A checkpointer thread with
//! its own connection runs a passive checkpoint every [`CHECKPOINT_INTERVAL`] instead, which
//! writers do not wait for; the writer's automatic checkpoint stays as a backstop at
//! [`BACKSTOP_CHECKPOINT_PAGES`], for when the checkpointer cannot keep up.

mod activity;
mod commands;
mod registry;
mod schema;
mod telemetry;

use std::collections::HashMap;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use rusqlite::config::DbConfig;
use rusqlite::{Connection, ErrorCode, OpenFlags, Transaction, TransactionBehavior};
use serde::Deserialize;
use tokio::sync::oneshot;

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
const STATEMENT_CACHE_CAPACITY: usize = 128;

/// Page cache of the write connection, in KiB (allocated as pages are used, not up front).
const WRITER_CACHE_KIB: i64 = 64 * 1024;

/// Page cache of each read connection, in KiB.
const READER_CACHE_KIB: i64 = 16 * 1024;

/// Idle read connections kept for reuse; more are opened on demand under load and closed
/// when returned to a full pool.
const MAX_IDLE_READERS: usize = 4;

/// Most writes one transaction carries (see the module docs on group commit). Bounds how long
/// the first write of a batch waits for the others to run before its commit.
const MAX_WRITES_PER_COMMIT: usize = 256;

/// How often the checkpointer thread checkpoints the WAL (see the module docs).
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(200);

/// WAL size, in pages, at which a commit checkpoints by itself (SQLite's default is 1000).
const BACKSTOP_CHECKPOINT_PAGES: i64 = 20_000;

/// The savepoint that isolates each write of a batch.
const WRITE_SAVEPOINT: &str = "polyhub_write";

// The statements every write or batch runs, spelled once so that they are prepared once (and
// kept in the connection's statement cache) instead of parsed for each write.
const SAVEPOINT_SQL: &str = "SAVEPOINT polyhub_write";
const RELEASE_SQL: &str = "RELEASE polyhub_write";
const BEGIN_SQL: &str = "BEGIN IMMEDIATE";
const COMMIT_SQL: &str = "COMMIT";
const SYNCED_SQL: &str = "PRAGMA synchronous = FULL";
const COMMITTED_SQL: &str = "PRAGMA synchronous = NORMAL";

/// Runs one statement that returns no rows through the statement cache.
fn run_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.raw_execute().map(|_| ())
}

/// The SQLite-backed [`crate::Store`]. Cheap to clone; clones share the connections.
#[derive(Clone)]
pub struct SqliteStore {
    shared: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    busy_timeout: Duration,
    /// Writes waiting for the write connection (see the module docs on group commit).
    queued_writes: Mutex<Vec<Box<dyn PendingWrite>>>,
    /// Whether a drainer is running (or about to): only then may a write rely on someone else
    /// to run it.
    draining: AtomicBool,
    writer: Mutex<Writer>,
    devices: Mutex<DeviceCache>,
    idle_readers: Mutex<Vec<Connection>>,
    /// Dropped with the store, which tells the checkpointer thread to end.
    _checkpointer: mpsc::Sender<()>,
}

/// The write connection and its current `synchronous` level.
struct Writer {
    conn: Connection,
    synchronous: Durability,
}

/// How durable a write is once it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Durability {
    /// Synced to disk (`synchronous=FULL`): survives a power loss.
    Synced,
    /// Committed and visible, survives a crash of the process, but may be lost with the
    /// machine until the next synced commit (see the module docs for who may use it).
    Committed,
}

/// How durable a command's move to `state` must be before the caller goes on: the module docs
/// explain why a send or a delivery need not be synced.
fn step_durability(state: CommandState) -> Durability {
    match state {
        CommandState::Sent | CommandState::Delivered => Durability::Committed,
        _ => Durability::Synced,
    }
}

/// A write waiting for the writer thread; the type parameters of [`SqliteStore::write`] are
/// erased here so that writes of any result type share one queue.
trait PendingWrite: Send {
    fn durability(&self) -> Durability;
    /// Runs the operation inside the batch's transaction, in its own savepoint. The answer goes
    /// out only once the commit's outcome is known, through the returned value.
    fn run(self: Box<Self>, tx: &Connection) -> Result<Box<dyn Settle>, BatchAborted>;
    /// The batch could not run: answers with `error`.
    fn abandon(self: Box<Self>, error: StoreError);
}

/// The outcome of one write of a batch, waiting for the commit.
trait Settle: Send {
    fn settle(self: Box<Self>, commit: Result<(), &StoreError>);
}

/// A savepoint could not be rolled back: the transaction's state is unknown, so the whole
/// batch is rolled back and fails with this error.
struct BatchAborted(StoreError);

struct WriteRequest<T, F> {
    durability: Durability,
    op: F,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

struct WriteOutcome<T> {
    result: Result<T, StoreError>,
    reply: oneshot::Sender<Result<T, StoreError>>,
}

impl<T, F> PendingWrite for WriteRequest<T, F>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
{
    fn durability(&self) -> Durability {
        self.durability
    }

    fn run(self: Box<Self>, tx: &Connection) -> Result<Box<dyn Settle>, BatchAborted> {
        let WriteRequest { op, reply, .. } = *self;
        if let Err(err) = run_cached(tx, SAVEPOINT_SQL) {
            let error = StoreError::from(err);
            let _ = reply.send(Err(copy_error(&error)));
            return Err(BatchAborted(error));
        }
        // A panicking operation must not take the writer thread (and every later write) down.
        let result = catch_unwind(AssertUnwindSafe(|| op(tx))).unwrap_or_else(|_| {
            Err(StoreError::Backend(
                "a storage operation panicked; its changes were rolled back".to_owned(),
            ))
        });
        let end = if result.is_ok() {
            run_cached(tx, RELEASE_SQL)
        } else {
            tx.execute_batch(&format!(
                "ROLLBACK TO {WRITE_SAVEPOINT}; RELEASE {WRITE_SAVEPOINT}"
            ))
        };
        if let Err(err) = end {
            let error = StoreError::from(err);
            let _ = reply.send(Err(copy_error(&error)));
            return Err(BatchAborted(error));
        }
        Ok(Box::new(WriteOutcome { result, reply }))
    }

    fn abandon(self: Box<Self>, error: StoreError) {
        let _ = self.reply.send(Err(error));
    }
}

impl<T: Send + 'static> Settle for WriteOutcome<T> {
    fn settle(self: Box<Self>, commit: Result<(), &StoreError>) {
        let result = match (self.result, commit) {
            (Ok(value), Ok(())) => Ok(value),
            (Ok(_), Err(error)) => Err(copy_error(error)),
            // The write's own error is the better explanation.
            (Err(error), _) => Err(error),
        };
        // The caller may have gone away (a dropped future): nothing to tell then.
        let _ = self.reply.send(result);
    }
}

/// The same error again, for each write of a batch that one failure ended.
fn copy_error(error: &StoreError) -> StoreError {
    match error {
        StoreError::NotFound(message) => StoreError::NotFound(message.clone()),
        StoreError::Conflict(message) => StoreError::Conflict(message.clone()),
        StoreError::Invalid(message) => StoreError::Invalid(message.clone()),
        StoreError::Unavailable(message) => StoreError::Unavailable(message.clone()),
        StoreError::Backend(message) => StoreError::Backend(message.clone()),
    }
}

/// The checkpointer thread: a passive checkpoint (it never waits for writers, nor they for it)
/// every [`CHECKPOINT_INTERVAL`], until the store is dropped.
fn run_checkpointer(conn: Connection, stop: mpsc::Receiver<()>) {
    while let Err(mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_INTERVAL) {
        let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, i64>(2)?,
            ))
        });
        if let Err(err) = done {
            tracing::debug!(error = %err, "WAL checkpoint failed; the next one retries");
        }
    }
}

/// Runs every queued write, in transactions of at most [`MAX_WRITES_PER_COMMIT`], while holding
/// the write connection.
fn run_queued_writes(writer: &mut Writer, queued: &Mutex<Vec<Box<dyn PendingWrite>>>) {
    loop {
        let batch: Vec<Box<dyn PendingWrite>> = {
            let mut queued = queued.lock();
            let take = queued.len().min(MAX_WRITES_PER_COMMIT);
            queued.drain(..take).collect()
        };
        if batch.is_empty() {
            return;
        }
        run_batch(writer, batch);
    }
}

/// Runs `batch` in one transaction, at the `synchronous` level its writes need.
fn run_batch(writer: &mut Writer, batch: Vec<Box<dyn PendingWrite>>) {
    let durability = if batch
        .iter()
        .any(|write| write.durability() == Durability::Synced)
    {
        Durability::Synced
    } else {
        Durability::Committed
    };
    let begun = set_synchronous(writer, durability)
        .and_then(|()| run_cached(&writer.conn, BEGIN_SQL).map_err(StoreError::from));
    if let Err(error) = begun {
        for write in batch {
            write.abandon(copy_error(&error));
        }
        return;
    }
    run_in_transaction(&writer.conn, batch);
}

/// Sets the write connection's `synchronous` level for the next transaction.
fn set_synchronous(writer: &mut Writer, durability: Durability) -> Result<(), StoreError> {
    if durability != writer.synchronous {
        let level = match durability {
            Durability::Synced => SYNCED_SQL,
            Durability::Committed => COMMITTED_SQL,
        };
        run_cached(&writer.conn, level)?;
        writer.synchronous = durability;
    }
    Ok(())
}

/// Runs `batch` in the transaction just begun on `conn`, each write in its savepoint, and
/// commits it (or rolls it back when a write could not even be attempted).
fn run_in_transaction(conn: &Connection, batch: Vec<Box<dyn PendingWrite>>) {
    let mut settles = Vec::with_capacity(batch.len());
    let mut writes = batch.into_iter();
    let mut aborted = None;
    for write in writes.by_ref() {
        match write.run(conn) {
            Ok(settle) => settles.push(settle),
            Err(BatchAborted(error)) => {
                aborted = Some(error);
                break;
            }
        }
    }
    let commit = match aborted {
        Some(error) => {
            roll_back(conn);
            for write in writes {
                write.abandon(copy_error(&error));
            }
            Err(error)
        }
        None => run_cached(conn, COMMIT_SQL).map_err(|err| {
            // A failed COMMIT (say, busy) leaves the transaction open.
            roll_back(conn);
            StoreError::from(err)
        }),
    };
    for settle in settles {
        settle.settle(commit.as_ref().map(|_| ()));
    }
}

/// Ends the open transaction, if any, undoing it.
fn roll_back(conn: &Connection) {
    if !conn.is_autocommit()
        && let Err(err) = conn.execute_batch("ROLLBACK")
    {
        tracing::warn!(error = %err, "cannot roll back a failed write transaction");
    }
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
        writer.pragma_update(None, "wal_autocheckpoint", BACKSTOP_CHECKPOINT_PAGES)?;
        let checkpoints = open_connection(&path, busy_timeout, Role::Writer)?;
        let (checkpointer, stop) = mpsc::channel();
        std::thread::Builder::new()
            .name("polyhub-sqlite-checkpointer".to_owned())
            .spawn(move || run_checkpointer(checkpoints, stop))
            .map_err(|err| {
                StoreError::Backend(format!("cannot start the SQLite checkpointer: {err}"))
            })?;

        tracing::debug!(path = %path.display(), "opened SQLite store");
        Ok(SqliteStore {
            shared: Arc::new(Shared {
                path,
                busy_timeout,
                queued_writes: Mutex::new(Vec::new()),
                draining: AtomicBool::new(false),
                devices: Mutex::new(DeviceCache::default()),
                writer: Mutex::new(Writer {
                    conn: writer,
                    synchronous: Durability::Synced,
                }),
                idle_readers: Mutex::new(Vec::new()),
                _checkpointer: checkpointer,
            }),
        })
    }

    /// The database file this store uses.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Runs `op` on the blocking pool, in a write transaction it may share with other writes
    /// (in its own savepoint: an `Err` undoes its changes only), and returns once that
    /// transaction is committed and synced.
    async fn write<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        self.write_with(Durability::Synced, op).await
    }

    /// [`SqliteStore::write`] with a chosen durability.
    async fn write_with<T, F>(&self, durability: Durability, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let request = WriteRequest {
            durability,
            op,
            reply,
        };
        self.shared.queued_writes.lock().push(Box::new(request));
        // Ours is queued: a running drainer takes it (it looks at the queue again after it
        // stopped draining, see `Drainer::run`), or we start one.
        if !self.shared.draining.swap(true, Ordering::SeqCst) {
            let drainer = Drainer {
                shared: Arc::clone(&self.shared),
                ran: false,
            };
            // Not awaited: the answer comes through `answer`, which also tells of a drainer
            // that never ran (see `Drainer`'s `Drop`).
            drop(tokio::task::spawn_blocking(move || drainer.run()));
        }
        answer.await.unwrap_or_else(|_| Err(write_lost()))
    }

    /// Forgets every cached device after a registry write that may have changed some; see
    /// [`DeviceCache`].
    fn devices_changed(&self) {
        self.shared.devices.lock().clear();
    }

    /// Runs a registry write that can change or remove devices, then empties the device cache
    /// (whatever the outcome: a failed write changed nothing, but forgetting is always safe).
    async fn write_devices<T, F>(&self, op: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let result = self.write(op).await;
        self.devices_changed();
        result
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

/// The one task that runs queued writes (see the module docs on group commit).
struct Drainer {
    shared: Arc<Shared>,
    /// Whether `run` was called: a drainer dropped without running (the runtime shutting
    /// down) must not leave the writes it was started for unanswered.
    ran: bool,
}

impl Drainer {
    fn run(mut self) {
        self.ran = true;
        let shared = &self.shared;
        loop {
            {
                let mut writer = shared.writer.lock();
                run_queued_writes(&mut writer, &shared.queued_writes);
            }
            shared.draining.store(false, Ordering::SeqCst);
            // A write queued after the queue was last seen empty but before `draining` was
            // cleared found a drainer running and started none: it is ours, unless a newer
            // drainer already claimed it.
            if shared.queued_writes.lock().is_empty()
                || shared.draining.swap(true, Ordering::SeqCst)
            {
                return;
            }
        }
    }
}

impl Drop for Drainer {
    fn drop(&mut self) {
        if self.ran {
            return;
        }
        let abandoned: Vec<Box<dyn PendingWrite>> =
            std::mem::take(&mut *self.shared.queued_writes.lock());
        self.shared.draining.store(false, Ordering::SeqCst);
        for write in abandoned {
            write.abandon(StoreError::Unavailable(
                "the store's writer could not run (shutting down)".to_owned(),
            ));
        }
    }
}

/// Devices as last read, for [`Store::get_device`] (see the module docs).
#[derive(Default)]
struct DeviceCache {
    by_id: HashMap<String, Device>,
    /// Bumped by every [`DeviceCache::clear`]: a read that started under an older generation
    /// may have read what a registry write has since changed, so it is not kept.
    generation: u64,
}

/// Devices kept at most; past that the cache starts again empty (fleets beyond it pay a read
/// per command for the devices not kept, nothing more).
const MAX_CACHED_DEVICES: usize = 100_000;

impl DeviceCache {
    fn clear(&mut self) {
        self.by_id.clear();
        self.generation = self.generation.wrapping_add(1);
    }

    fn keep(&mut self, device: &Device, read_under: u64) {
        if self.generation != read_under {
            return;
        }
        if self.by_id.len() >= MAX_CACHED_DEVICES {
            self.by_id.clear();
        }
        self.by_id.insert(device.id.clone(), device.clone());
    }
}

fn write_lost() -> StoreError {
    StoreError::Backend("a write was dropped without an answer".to_owned())
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
    // The query planner stability guarantee: a cached statement keeps its plan whatever values
    // are bound. Without it, SQLite compiled the per-device `MAX(seq)` lookup of every command
    // creation anew (`sqlite3Reprepare`, 5% of polyhub's CPU at 1,000 commands/s; 0.5% with
    // it). Queries that need a partial index repeat its WHERE clause verbatim, not as values.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
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
        self.write_devices(move |tx| registry::delete_group(tx, &id))
            .await
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
        self.write_devices(move |tx| registry::delete_hub(tx, &id))
            .await
    }

    async fn create_device(&self, device: NewDevice) -> Result<Device, StoreError> {
        self.write(move |tx| registry::create_device(tx, device))
            .await
    }

    async fn get_device(&self, id: &str) -> Result<Device, StoreError> {
        validate_id("device", id)?;
        let read_under = {
            let cache = self.shared.devices.lock();
            if let Some(device) = cache.by_id.get(id) {
                return Ok(device.clone());
            }
            cache.generation
        };
        let id = id.to_owned();
        let device = self.read(move |tx| registry::get_device(tx, &id)).await?;
        self.shared.devices.lock().keep(&device, read_under);
        Ok(device)
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
        self.write_devices(move |tx| registry::update_device(tx, &id, patch))
            .await
    }

    async fn delete_device(&self, id: &str) -> Result<(), StoreError> {
        validate_id("device", id)?;
        let id = id.to_owned();
        self.write_devices(move |tx| registry::delete_device(tx, &id))
            .await
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
        let payload = command.validate()?;
        self.write(move |tx| commands::create_command(tx, command, &payload))
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
        self.transition_command_steps(vec![change]).await
    }

    async fn transition_command_steps(
        &self,
        changes: Vec<CommandTransition>,
    ) -> Result<Command, StoreError> {
        validate_id("command", crate::steps_command_id(&changes)?)?;
        let durability = if changes
            .iter()
            .all(|change| step_durability(change.to) == Durability::Committed)
        {
            Durability::Committed
        } else {
            Durability::Synced
        };
        // One write: an error in any step refuses the steps before it too.
        self.write_with(durability, move |tx| {
            commands::transition_command_steps(tx, &changes)
        })
        .await
    }

    async fn unfinished_commands(&self) -> Result<Vec<Command>, StoreError> {
        self.read(|tx| commands::unfinished_commands(tx)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pragma(conn: &Connection, name: &str) -> String {
        conn.query_row(&format!("PRAGMA {name}"), [], |row| {
            row.get::<_, rusqlite::types::Value>(0)
        })
        .map(|value| match value {
            rusqlite::types::Value::Integer(n) => n.to_string(),
            rusqlite::types::Value::Text(text) => text,
            other => format!("{other:?}"),
        })
        .unwrap()
    }

    #[test]
    fn connections_keep_the_plans_of_cached_statements() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plans.sqlite");
        for role in [Role::Writer, Role::Reader] {
            let conn = open_connection(&path, Duration::from_secs(1), role).unwrap();
            assert!(
                conn.db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG)
                    .unwrap(),
                "{role:?}"
            );
        }
    }

    /// Creates the scratch table `t (n INTEGER PRIMARY KEY)` the write-path tests use.
    fn create_table_t(runtime: &tokio::runtime::Runtime, store: &SqliteStore) {
        runtime
            .block_on(store.write(|conn| {
                conn.execute_batch("CREATE TABLE t (n INTEGER PRIMARY KEY)")?;
                Ok(())
            }))
            .unwrap();
    }

    /// How many rows `t` holds.
    fn rows_of_t(runtime: &tokio::runtime::Runtime, store: &SqliteStore) -> i64 {
        runtime
            .block_on(
                store.read(|conn| {
                    Ok(conn.query_row("SELECT count(*) FROM t", [], |row| row.get(0))?)
                }),
            )
            .unwrap()
    }

    /// Occupies the store's writer with a write that lasts until the returned sender is used;
    /// returns once that write runs.
    async fn occupy_writer(
        store: &SqliteStore,
    ) -> (
        tokio::task::JoinHandle<Result<(), StoreError>>,
        std::sync::mpsc::Sender<()>,
    ) {
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (started, running) = oneshot::channel::<()>();
        let blocking_store = store.clone();
        let blocker = tokio::spawn(async move {
            blocking_store
                .write(move |_| {
                    let _ = started.send(());
                    let _ = released.recv_timeout(Duration::from_secs(10));
                    Ok(())
                })
                .await
        });
        running.await.unwrap();
        (blocker, release)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn connections_are_durable_wal_connections() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), &SqliteConfig::default()).unwrap();
        let pragmas = runtime()
            .block_on(store.write(|conn| {
                Ok([
                    "journal_mode",
                    "synchronous",
                    "foreign_keys",
                    "busy_timeout",
                    "query_only",
                ]
                .map(|name| pragma(conn, name)))
            }))
            .unwrap();
        assert_eq!(
            pragmas,
            ["wal", "2", "1", "5000", "0"],
            "synchronous 2 is FULL"
        );
        let reader = open_connection(store.path(), Duration::from_millis(5), Role::Reader).unwrap();
        assert_eq!(pragma(&reader, "query_only"), "1");
        assert_eq!(pragma(&reader, "busy_timeout"), "5");
    }

    #[test]
    fn only_batches_of_unsynced_writes_commit_without_a_sync() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), &SqliteConfig::default()).unwrap();
        let runtime = runtime();
        let level = |durability| {
            runtime
                .block_on(store.write_with(durability, |conn| Ok(pragma(conn, "synchronous"))))
                .unwrap()
        };
        assert_eq!(level(Durability::Committed), "1", "NORMAL");
        assert_eq!(level(Durability::Synced), "2", "FULL again");
        assert_eq!(level(Durability::Synced), "2");
    }

    /// Writes waiting together share one transaction, and one write's error (or panic) undoes
    /// that write only.
    #[test]
    fn concurrent_writes_share_a_commit_and_fail_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), &SqliteConfig::default()).unwrap();
        let runtime = runtime();
        create_table_t(&runtime, &store);
        // Hold the writer thread busy so that the writes below queue up behind it and are
        // taken as one batch.
        let results = runtime.block_on(async {
            let (blocker, release) = occupy_writer(&store).await;
            let mut writes = Vec::new();
            for n in 0..10_i64 {
                let store = store.clone();
                let path = store.path().to_owned();
                writes.push(tokio::spawn(async move {
                    store
                        .write(move |conn| {
                            conn.execute("INSERT INTO t (n) VALUES (?1)", [n])?;
                            match n {
                                3 => Err(StoreError::Invalid("three is refused".to_owned())),
                                7 => panic!("seven panics"),
                                // What another connection sees: nothing of this batch
                                // until it commits.
                                _ => Connection::open(&path)?
                                    .query_row("SELECT count(*) FROM t", [], |row| {
                                        row.get::<_, i64>(0)
                                    })
                                    .map_err(StoreError::from),
                            }
                        })
                        .await
                }));
            }
            // Let every write reach the queue before the writer is free again.
            tokio::time::sleep(Duration::from_millis(200)).await;
            release.send(()).unwrap();
            blocker.await.unwrap().unwrap();
            let mut results = Vec::new();
            for write in writes {
                results.push(write.await.unwrap());
            }
            results
        });
        for (n, result) in results.iter().enumerate() {
            match n {
                3 => assert!(matches!(result, Err(StoreError::Invalid(_))), "{result:?}"),
                7 => assert!(matches!(result, Err(StoreError::Backend(_))), "{result:?}"),
                _ => assert!(
                    matches!(result, Ok(0)),
                    "write {n} saw earlier writes committed, so they did not share a commit: {result:?}"
                ),
            }
        }
        let stored: Vec<i64> = runtime
            .block_on(store.read(|conn| {
                let mut statement = conn.prepare("SELECT n FROM t ORDER BY n")?;
                let rows = statement
                    .query_map([], |row| row.get(0))?
                    .collect::<rusqlite::Result<Vec<i64>>>()?;
                Ok(rows)
            }))
            .unwrap();
        assert_eq!(stored, vec![0, 1, 2, 4, 5, 6, 8, 9]);
    }

    /// No write runs on the caller's thread, synced or not, the writer idle or busy: a write
    /// can block (see the module docs), and the caller is a runtime thread.
    #[test]
    fn writes_never_run_on_the_callers_thread() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), &SqliteConfig::default()).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let caller = std::thread::current().id();
        let thread_of = |durability| {
            runtime
                .block_on(store.write_with(durability, |_| Ok(std::thread::current().id())))
                .unwrap()
        };
        assert_ne!(thread_of(Durability::Committed), caller);
        assert_ne!(thread_of(Durability::Synced), caller);

        let ran_on = runtime.block_on(async {
            let (blocker, release) = occupy_writer(&store).await;
            let queued_store = store.clone();
            let queued = tokio::spawn(async move {
                queued_store
                    .write_with(Durability::Committed, |_| Ok(std::thread::current().id()))
                    .await
            });
            // The one runtime thread is still free: the queued write does not block it.
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(!queued.is_finished(), "ran while the writer was busy");
            release.send(()).unwrap();
            blocker.await.unwrap().unwrap();
            queued.await.unwrap().unwrap()
        });
        assert_ne!(
            ran_on, caller,
            "a write queued behind a busy writer ran in place"
        );
    }

    /// Another process holding SQLite's write lock (a process-isolated parser committing
    /// ingest) does not make an unsynced write wait on the caller's runtime thread: the write
    /// goes to the drainer, which waits for the lock, and lands once it is released.
    #[test]
    fn an_unsynced_write_does_not_wait_for_another_process_on_the_callers_thread() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), &SqliteConfig::default()).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        create_table_t(&runtime, &store);
        let other_process = Connection::open(store.path()).unwrap();
        other_process.execute_batch("BEGIN IMMEDIATE").unwrap();

        let caller = std::thread::current().id();
        let (ran_on, waited_in_place) = runtime.block_on(async {
            let queued_store = store.clone();
            let write = tokio::spawn(async move {
                queued_store
                    .write_with(Durability::Committed, |conn| {
                        conn.execute("INSERT INTO t (n) VALUES (1)", [])?;
                        Ok(std::thread::current().id())
                    })
                    .await
            });
            // The runtime's one thread stays free while the other process holds the lock.
            let started = std::time::Instant::now();
            tokio::time::sleep(Duration::from_millis(100)).await;
            let waited_in_place = started.elapsed() > Duration::from_millis(1_000);
            assert!(
                !write.is_finished(),
                "wrote while another process held the lock"
            );
            other_process.execute_batch("COMMIT").unwrap();
            (write.await.unwrap().unwrap(), waited_in_place)
        });
        assert!(!waited_in_place, "the runtime thread was held up");
        assert_ne!(ran_on, caller, "the write waited on the caller's thread");
        assert_eq!(rows_of_t(&runtime, &store), 1);
    }

    /// Many writers at once, from many tasks: each is answered, once, with its own result,
    /// and nothing is left queued or any drainer left claimed.
    #[test]
    fn a_storm_of_writes_is_answered_and_leaves_no_drainer_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path(), &SqliteConfig::default()).unwrap();
        let runtime = runtime();
        create_table_t(&runtime, &store);
        let answers = runtime.block_on(async {
            let mut writes = Vec::new();
            for n in 0..500_i64 {
                let store = store.clone();
                let durability = if n % 3 == 0 {
                    Durability::Committed
                } else {
                    Durability::Synced
                };
                writes.push(tokio::spawn(async move {
                    if n % 7 == 0 {
                        tokio::task::yield_now().await;
                    }
                    store
                        .write_with(durability, move |conn| {
                            conn.execute("INSERT INTO t (n) VALUES (?1)", [n])?;
                            Ok(n)
                        })
                        .await
                }));
            }
            let mut answers = Vec::new();
            for write in writes {
                answers.push(write.await.unwrap().unwrap());
            }
            answers
        });
        assert_eq!(answers, (0..500).collect::<Vec<i64>>());
        assert_eq!(rows_of_t(&runtime, &store), 500);
        assert!(store.shared.queued_writes.lock().is_empty());
        assert!(!store.shared.draining.load(Ordering::SeqCst));
    }

    /// A read that started before a registry write finished may hold the old device: the
    /// cache does not keep it.
    #[test]
    fn the_device_cache_keeps_no_read_older_than_the_last_change() {
        let device = Device {
            id: "d1".to_owned(),
            hub_id: "h1".to_owned(),
            name: "d1".to_owned(),
            protocol: "mqtt".to_owned(),
            metadata: serde_json::json!({}),
            created_at: 1,
            updated_at: 1,
        };
        let mut cache = DeviceCache::default();
        let read_under = cache.generation;
        cache.clear();
        cache.keep(&device, read_under);
        assert!(
            cache.by_id.is_empty(),
            "a read from before the change was kept"
        );
        cache.keep(&device, cache.generation);
        assert_eq!(cache.by_id.get("d1"), Some(&device));
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
            runtime
                .block_on(store.write(move |conn| {
                    conn.pragma_update(None, "synchronous", synchronous)?;
                    Ok(())
                }))
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
