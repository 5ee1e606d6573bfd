//! Broker state that survives a restart: retained messages and persistent sessions, saved as
//! one snapshot file (`<data_dir>/broker.db`).
//!
//! # Layout
//! - [`format`]: the file format, a pure encoder/decoder ([`encode`], [`decode`]).
//! - `state`: from the live broker to a [`Snapshot`] and back
//!   ([`Broker::snapshot`](crate::Broker::snapshot), [`Broker::restore`](crate::Broker::restore)).
//! - this module: files ([`save`], [`load`], [`load_for_startup`]) and the periodic save
//!   ([`autosave`], [`save_broker`]).
//!
//! # Crash safety
//! [`save`] writes `broker.db.tmp`, fsyncs it, renames it over `broker.db` and fsyncs the
//! directory. A crash at any point leaves either the previous snapshot or the new one, never a
//! mix; a stale `broker.db.tmp` is ignored and overwritten by the next save. CRCs catch damage
//! done afterwards. `docs/persistence.md` has the whole story.

pub mod format;
mod state;

use std::fs::{self, File};
use std::future::Future;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

pub use format::{
    FORMAT_VERSION, InflightStage, MAGIC, OLDEST_READABLE_VERSION, Snapshot, SnapshotError,
    StoredDelivery, StoredInflight, StoredLocal, StoredMessage, StoredSession, StoredSubscription,
    StoredWill, decode, encode,
};
pub use state::RestoreSummary;
pub(crate) use state::{restore, snapshot};

use crate::Broker;
use crate::config::OnCorrupt;

/// Name of the snapshot file in the data directory.
pub const SNAPSHOT_FILE: &str = "broker.db";

/// The snapshot file of the data directory `data_dir`.
pub fn snapshot_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SNAPSHOT_FILE)
}

/// Why a snapshot file could not be read or written. Each message names the file.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The file exists but cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The file (or its temporary file or directory) cannot be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The file was read but is not a valid snapshot.
    #[error("{} is not a usable broker snapshot: {source}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: SnapshotError,
    },
    /// The snapshot to save refers to messages it does not contain.
    #[error("refusing to save an inconsistent snapshot to {}: {source}", path.display())]
    Inconsistent {
        /// The file.
        path: PathBuf,
        /// The inconsistency.
        source: SnapshotError,
    },
}

/// Held while a snapshot is written: two saves at once (an autosave still running when a
/// slow shutdown gives up waiting for it, and the final save) would share the temporary file.
static SAVING: Mutex<()> = Mutex::new(());

/// Write `snapshot` to `path` atomically: a temporary file next to it, fsynced, renamed over
/// `path`, then the directory fsynced. Saves in one process run one at a time. Blocking; see
/// [`save_broker`] from async code.
pub fn save(path: &Path, snapshot: &Snapshot) -> Result<(), PersistError> {
    let _saving = SAVING.lock();
    snapshot
        .check()
        .map_err(|source| PersistError::Inconsistent {
            path: path.to_owned(),
            source,
        })?;
    let temporary = temporary_path(path);
    let write_error = |at: &Path| {
        let at = at.to_owned();
        move |source| PersistError::Write { path: at, source }
    };
    let written = (|| {
        let file = File::create(&temporary)?;
        let mut writer = BufWriter::with_capacity(256 * 1024, file);
        format::write_to(&mut writer, snapshot)?;
        writer.flush()?;
        let file = writer.into_inner().map_err(|error| error.into_error())?;
        file.sync_all()
    })();
    if let Err(source) = written {
        let _ = fs::remove_file(&temporary);
        return Err(write_error(&temporary)(source));
    }
    if let Err(source) = fs::rename(&temporary, path) {
        let _ = fs::remove_file(&temporary);
        return Err(write_error(path)(source));
    }
    // The rename is only durable once the directory entry is.
    let directory = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    File::open(directory)
        .and_then(|directory| directory.sync_all())
        .map_err(write_error(directory))
}

/// `broker.db.tmp` next to `broker.db`.
fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Read the snapshot at `path`; `Ok(None)` when there is no file (a first start).
pub fn load(path: &Path) -> Result<Option<Snapshot>, PersistError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(PersistError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    decode(&bytes)
        .map(Some)
        .map_err(|source| PersistError::Corrupt {
            path: path.to_owned(),
            source,
        })
}

/// Rename a damaged snapshot to `<name>.corrupt-<unix time>` (with a counter if that exists)
/// and return the new path. The bytes are kept for inspection.
pub fn move_aside(path: &Path) -> Result<PathBuf, PersistError> {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let mut target = path.with_file_name(format!("{name}.corrupt-{seconds}"));
    let mut attempt = 1;
    while target.exists() {
        attempt += 1;
        target = path.with_file_name(format!("{name}.corrupt-{seconds}-{attempt}"));
    }
    fs::rename(path, &target).map_err(|source| PersistError::Write {
        path: target.clone(),
        source,
    })?;
    Ok(target)
}

/// Load the snapshot at start-up. A file that cannot be decoded is an error with
/// [`OnCorrupt::Fail`]; with [`OnCorrupt::MoveAside`] it is renamed (logged as a warning) and
/// the broker starts empty. A file that cannot be read at all is always an error.
pub fn load_for_startup(
    path: &Path,
    on_corrupt: OnCorrupt,
) -> Result<Option<Snapshot>, PersistError> {
    match load(path) {
        Err(error @ PersistError::Corrupt { .. }) if on_corrupt == OnCorrupt::MoveAside => {
            let moved = move_aside(path)?;
            tracing::warn!(
                moved_to = %moved.display(),
                "{error}; moved it aside and starting without saved state."
            );
            Ok(None)
        }
        other => other,
    }
}

/// What one save wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaveSummary {
    /// Retained messages saved.
    pub retained: usize,
    /// Sessions of network clients saved.
    pub sessions: usize,
    /// Persistent sessions of in-process clients saved (the program's own, such as the hub's
    /// parsers).
    pub local_sessions: usize,
    /// Distinct messages saved (retained, queued, in flight, wills).
    pub messages: usize,
}

/// Take a snapshot of `broker` now and write it to `path`, on a blocking thread: a large
/// state takes a while to copy and encode, and no runtime worker should wait for that.
pub async fn save_broker(broker: &Broker, path: &Path) -> Result<SaveSummary, PersistError> {
    let broker = broker.clone();
    let path = path.to_owned();
    let target = path.clone();
    let saving = move || {
        let snapshot = broker.snapshot();
        let local_sessions = snapshot
            .sessions
            .iter()
            .filter(|session| session.local.is_some())
            .count();
        save(&path, &snapshot).map(|()| SaveSummary {
            retained: snapshot.retained.len(),
            sessions: snapshot.sessions.len() - local_sessions,
            local_sessions,
            messages: snapshot.messages.len(),
        })
    };
    match tokio::task::spawn_blocking(saving).await {
        Ok(result) => result,
        Err(join_error) => Err(PersistError::Write {
            path: target,
            source: io::Error::other(format!("the save task failed: {join_error}")),
        }),
    }
}

/// Save `broker` to `path` every `every` until `stop` completes. A failed save is logged and
/// retried at the next tick; the broker keeps running. A save in progress when `stop`
/// completes is finished first, so a final save that follows never races with it.
pub async fn autosave(
    broker: Broker,
    path: PathBuf,
    every: Duration,
    stop: impl Future<Output = ()> + Send,
) {
    tokio::pin!(stop);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = ticker.tick() => {}
        }
        match save_broker(&broker, &path).await {
            Ok(saved) => tracing::debug!(
                retained = saved.retained,
                sessions = saved.sessions,
                local_sessions = saved.local_sessions,
                "Broker state saved."
            ),
            Err(error) => tracing::warn!("Autosave failed: {error}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let path = std::env::temp_dir().join(format!(
                "polyhub-persist-{name}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn sample() -> Snapshot {
        Snapshot {
            saved_at: 5,
            last_seq: 9,
            messages: vec![StoredMessage {
                seq: 7,
                topic: "a/b".into(),
                payload: bytes::Bytes::from_static(b"hello"),
                qos: polyhub_mqtt::QoS::AtLeastOnce,
                retain: true,
                properties: crate::MessageProperties::default(),
            }],
            retained: vec![0],
            sessions: Vec::new(),
        }
    }

    #[test]
    fn save_then_load_gives_the_snapshot_back_and_leaves_no_temporary() {
        let dir = TempDir::new("roundtrip");
        let path = snapshot_path(&dir.0);
        assert!(load(&path).unwrap().is_none());
        save(&path, &sample()).unwrap();
        assert_eq!(load(&path).unwrap(), Some(sample()));
        assert!(!temporary_path(&path).exists());
        // A second save replaces the first.
        save(&path, &Snapshot::default()).unwrap();
        assert_eq!(load(&path).unwrap(), Some(Snapshot::default()));
    }

    #[test]
    fn a_stale_temporary_file_is_ignored_and_replaced() {
        let dir = TempDir::new("stale");
        let path = snapshot_path(&dir.0);
        save(&path, &sample()).unwrap();
        fs::write(temporary_path(&path), b"half written").unwrap();
        assert_eq!(load(&path).unwrap(), Some(sample()));
        save(&path, &sample()).unwrap();
        assert!(!temporary_path(&path).exists());
    }

    #[test]
    fn corrupt_files_fail_or_move_aside_as_configured() {
        let dir = TempDir::new("corrupt");
        let path = snapshot_path(&dir.0);
        let mut bytes = encode(&sample());
        let last = bytes.len() - 1;
        bytes[last] ^= 0xFF;
        fs::write(&path, &bytes).unwrap();

        let error = load_for_startup(&path, OnCorrupt::Fail).unwrap_err();
        let message = error.to_string();
        assert!(message.contains("broker.db"), "{message}");
        assert!(message.contains("checksum mismatch"), "{message}");
        assert!(path.exists());

        assert_eq!(load_for_startup(&path, OnCorrupt::MoveAside).unwrap(), None);
        assert!(!path.exists());
        let moved: Vec<_> = fs::read_dir(&dir.0)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(moved.len(), 1);
        assert!(moved[0].starts_with("broker.db.corrupt-"), "{moved:?}");
        assert_eq!(fs::read(dir.0.join(&moved[0])).unwrap(), bytes);
    }

    #[test]
    fn inconsistent_snapshots_are_not_written() {
        let dir = TempDir::new("inconsistent");
        let path = snapshot_path(&dir.0);
        let mut snapshot = sample();
        snapshot.retained.push(3);
        assert!(matches!(
            save(&path, &snapshot),
            Err(PersistError::Inconsistent { .. })
        ));
        assert!(!path.exists());
    }
}
