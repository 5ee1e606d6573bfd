//! The storage boundary's one error type.

/// Why a storage operation failed. The REST API maps each variant to one HTTP status in one
/// place: `NotFound` 404, `Conflict` 409, `Invalid` 400, `Unavailable`/`Backend` 503/500.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The addressed item does not exist (the message names it, e.g. `hub "h1" not found`).
    #[error("{0}")]
    NotFound(String),
    /// The operation conflicts with stored state: duplicate id, deleting a group that still
    /// owns hubs, a device whose hub does not exist.
    #[error("{0}")]
    Conflict(String),
    /// The input is invalid (bad id, metadata that is not an object, bad cursor, ...).
    #[error("{0}")]
    Invalid(String),
    /// The database is busy or cannot be reached; retrying later may succeed.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// Anything else the backend reported (I/O, corruption, a failed migration).
    #[error("storage error: {0}")]
    Backend(String),
}
