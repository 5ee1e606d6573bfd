//! polyhub's registry and telemetry storage.
//!
//! - [`model`]: the domain types (groups own hubs, hubs own devices; telemetry rows, dead
//!   letters, presence, parser events). They are what the REST API serialises.
//! - [`Store`]: the one trait every backend implements. Callers hold an `Arc<dyn Store>` and
//!   never name a backend; only the binary picks one.
//! - [`sqlite`]: the embedded backend (SQLite in the data folder, WAL mode), with its schema
//!   migrations applied on open. PostgreSQL follows behind the same trait.

pub mod error;
pub mod model;
pub mod sqlite;

use async_trait::async_trait;

pub use error::StoreError;
pub use model::*;
pub use sqlite::{SqliteConfig, SqliteStore};

/// Everything polyhub persists about the registry and telemetry.
///
/// Every method is one transaction. Implementations are cheap to share (`Arc<dyn Store>`) and
/// safe to call from many tasks, and from several processes on the same database (hub parsers
/// in process isolation open the same store).
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    // --- groups -----------------------------------------------------------------------
    /// Errors: `Invalid` (bad id/metadata), `Conflict` (id taken).
    async fn create_group(&self, group: NewGroup) -> Result<Group, StoreError>;
    async fn get_group(&self, id: &str) -> Result<Group, StoreError>;
    async fn list_groups(&self, query: ListQuery) -> Result<Vec<Group>, StoreError>;
    async fn update_group(&self, id: &str, patch: GroupPatch) -> Result<Group, StoreError>;
    /// Errors: `Conflict` while the group still owns hubs.
    async fn delete_group(&self, id: &str) -> Result<(), StoreError>;

    // --- hubs -------------------------------------------------------------------------
    /// Errors: `Invalid`, `Conflict` (id taken or group missing).
    async fn create_hub(&self, hub: NewHub) -> Result<Hub, StoreError>;
    async fn get_hub(&self, id: &str) -> Result<Hub, StoreError>;
    /// `query.parent` filters by group.
    async fn list_hubs(&self, query: ListQuery) -> Result<Vec<Hub>, StoreError>;
    async fn update_hub(&self, id: &str, patch: HubPatch) -> Result<Hub, StoreError>;
    async fn set_hub_desired_state(&self, id: &str, state: DesiredState)
    -> Result<Hub, StoreError>;
    /// Errors: `Conflict` while the hub still owns devices.
    async fn delete_hub(&self, id: &str) -> Result<(), StoreError>;

    // --- devices ----------------------------------------------------------------------
    /// Errors: `Invalid`, `Conflict` (id taken anywhere, or hub missing).
    async fn create_device(&self, device: NewDevice) -> Result<Device, StoreError>;
    async fn get_device(&self, id: &str) -> Result<Device, StoreError>;
    /// `query.parent` filters by hub.
    async fn list_devices(&self, query: ListQuery) -> Result<Vec<Device>, StoreError>;
    async fn update_device(&self, id: &str, patch: DevicePatch) -> Result<Device, StoreError>;
    /// Removes the device and its presence; its telemetry stays queryable.
    async fn delete_device(&self, id: &str) -> Result<(), StoreError>;

    // --- ingest -----------------------------------------------------------------------
    /// Commits a batch atomically: rows, dead letters, the seqs seen (for redelivery
    /// detection) and each device's last-seen time. Messages whose `(hub, seq)` is already
    /// recorded are skipped whole.
    async fn write_batch(&self, batch: IngestBatch) -> Result<BatchOutcome, StoreError>;
    /// Forgets recorded seqs of `hub_id` whose message was received before `received_before`
    /// (old enough that the broker can no longer redeliver it). Returns how many were removed.
    async fn prune_seqs(&self, hub_id: &str, received_before: Millis) -> Result<u64, StoreError>;

    // --- telemetry queries ------------------------------------------------------------
    /// The most recent row of every signal of a device, ordered by signal.
    async fn latest(&self, device_id: &str) -> Result<Vec<TelemetryRow>, StoreError>;
    /// Rows oldest first, paged by an opaque cursor. Errors: `Invalid` (bad cursor).
    async fn range(&self, query: RangeQuery) -> Result<RangePage, StoreError>;
    /// Numeric rows bucketed by time, oldest bucket first; empty buckets are omitted.
    async fn downsample(&self, query: DownsampleQuery) -> Result<Vec<Bucket>, StoreError>;
    /// Number of telemetry rows of a hub's devices (all hubs when `None`).
    async fn count_rows(&self, hub_id: Option<&str>) -> Result<u64, StoreError>;

    // --- dead letters -----------------------------------------------------------------
    /// Newest first; `before_id` pages backwards; `limit` capped at [`MAX_PAGE`].
    async fn list_dead_letters(
        &self,
        hub_id: Option<&str>,
        before_id: Option<i64>,
        limit: u32,
    ) -> Result<Vec<DeadLetter>, StoreError>;

    // --- parser events ----------------------------------------------------------------
    async fn record_parser_event(&self, event: NewParserEvent) -> Result<(), StoreError>;
    /// Newest first.
    async fn list_parser_events(
        &self,
        hub_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<ParserEvent>, StoreError>;

    // --- presence ---------------------------------------------------------------------
    /// Records a connection change of a registered device (unknown devices: `NotFound`).
    async fn set_presence(
        &self,
        device_id: &str,
        online: bool,
        at: Millis,
    ) -> Result<(), StoreError>;
    /// A registered device's presence (offline with no times if never seen).
    async fn get_presence(&self, device_id: &str) -> Result<Presence, StoreError>;
    /// Presence of every device of a hub, ordered by device id.
    async fn list_presence(&self, hub_id: &str) -> Result<Vec<Presence>, StoreError>;

    // --- commands ---------------------------------------------------------------------
    // Default bodies keep test doubles that do not deal with commands short; every real
    // backend implements them all.
    /// Stores a new command as `Queued`, with the next per-device `seq`.
    /// Errors: `NotFound` (device), `Conflict` (id taken), `Invalid`.
    async fn create_command(&self, command: NewCommandRecord) -> Result<Command, StoreError> {
        let _ = command;
        Err(commands_unsupported())
    }
    async fn get_command(&self, id: &str) -> Result<Command, StoreError> {
        let _ = id;
        Err(commands_unsupported())
    }
    async fn list_commands(&self, query: CommandQuery) -> Result<Vec<Command>, StoreError> {
        let _ = query;
        Err(commands_unsupported())
    }
    /// Applies a state change atomically if the command is in one of `from` (sets the
    /// timestamp of the new state; `Sent` also increments `attempts`; `Queued → Delivered`
    /// also sets `sent_at` and counts the attempt; `Acknowledged` sets an empty
    /// `delivered_at`). Errors: `NotFound`, `Conflict` (current state not in `from`; the
    /// message names it).
    async fn transition_command(&self, change: CommandTransition) -> Result<Command, StoreError> {
        let _ = change;
        Err(commands_unsupported())
    }
    /// Applies one command's `changes` in order, as [`Store::transition_command`] would one
    /// after the other, and returns the command after the last. The command service uses it
    /// to record a step together with the next one (a delivery with the answer that came
    /// right after it). The SQLite store makes them one write, all or none; this default
    /// applies them one by one and stops at the first error.
    async fn transition_command_steps(
        &self,
        changes: Vec<CommandTransition>,
    ) -> Result<Command, StoreError> {
        steps_command_id(&changes)?;
        let mut last = Err(no_command_change());
        for change in changes {
            last = Ok(self.transition_command(change).await?);
        }
        last
    }
    /// Every command not in a final state, ordered by device then `seq`: what the dispatcher
    /// reloads at start-up.
    async fn unfinished_commands(&self) -> Result<Vec<Command>, StoreError> {
        Err(commands_unsupported())
    }
}

fn commands_unsupported() -> StoreError {
    StoreError::Backend("this store does not keep commands".to_owned())
}

/// [`Store::transition_command_steps`] was given no change.
pub(crate) fn no_command_change() -> StoreError {
    StoreError::Invalid("no command change to apply".to_owned())
}

/// The command that [`Store::transition_command_steps`]' `changes` are for: `Invalid` unless
/// there is at least one and they all name the same command.
pub fn steps_command_id(changes: &[CommandTransition]) -> Result<&str, StoreError> {
    let Some(first) = changes.first() else {
        return Err(no_command_change());
    };
    if changes.iter().any(|change| change.id != first.id) {
        return Err(StoreError::Invalid(
            "the steps of one write must all be of one command".to_owned(),
        ));
    }
    Ok(&first.id)
}
