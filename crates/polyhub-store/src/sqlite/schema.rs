//! Schema migrations, applied when a store opens.
//!
//! `schema_migrations` records each applied version with its time. Every migration runs in its
//! own `BEGIN IMMEDIATE` transaction and re-reads the current version inside it, so several
//! processes opening the same database at once apply each migration exactly once. A database
//! whose version is newer than the newest migration here was written by a newer polyhub: it is
//! refused rather than used with a schema this binary does not know.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use crate::error::StoreError;
use crate::model::now_millis;

/// One schema step: applied in version order, never edited once released.
struct Migration {
    version: i64,
    description: &'static str,
    sql: &'static str,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "registry, telemetry, ingest seqs, dead letters, parser events, presence",
        sql: include_str!("../../migrations/0001_initial.sql"),
    },
    Migration {
        version: 2,
        description: "commands",
        sql: include_str!("../../migrations/0002_commands.sql"),
    },
];

/// The schema version this binary writes.
pub(super) fn latest_version() -> i64 {
    MIGRATIONS.last().map_or(0, |migration| migration.version)
}

/// Brings the database up to [`latest_version`].
pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version     BIGINT NOT NULL PRIMARY KEY,
             applied_at  BIGINT NOT NULL
         )",
    )?;
    for migration in MIGRATIONS {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current = current_version(&tx)?;
        if current > latest_version() {
            return Err(newer_schema(current));
        }
        if migration.version <= current {
            continue;
        }
        tx.execute_batch(migration.sql).map_err(|err| {
            StoreError::Backend(format!(
                "schema migration {} ({}) failed: {err}",
                migration.version, migration.description
            ))
        })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
            (migration.version, now_millis()),
        )?;
        tx.commit()?;
        tracing::info!(version = migration.version, "applied schema migration");
    }
    // Also refuses a newer database when every migration here was already applied.
    let current = current_version(conn)?;
    if current > latest_version() {
        return Err(newer_schema(current));
    }
    Ok(())
}

fn newer_schema(current: i64) -> StoreError {
    StoreError::Backend(format!(
        "database schema version {current} is newer than this polyhub supports (version {}); \
         upgrade polyhub or use another data folder",
        latest_version()
    ))
}

/// The highest applied migration, 0 for a new database.
pub(super) fn current_version(conn: &Connection) -> Result<i64, StoreError> {
    let version: Option<i64> = conn
        .query_row("SELECT MAX(version) FROM schema_migrations", [], |row| {
            row.get(0)
        })
        .optional()?
        .flatten();
    Ok(version.unwrap_or(0))
}
