//! The embedded SQLite backend. (Being written.)

use serde::Deserialize;

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
        SqliteConfig { file: "polyhub.sqlite".to_owned(), busy_timeout_ms: 5_000 }
    }
}

/// The SQLite-backed [`crate::Store`].
#[derive(Debug)]
pub struct SqliteStore {}
