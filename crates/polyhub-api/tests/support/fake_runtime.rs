//! A [`HubRuntime`] that records every call and can be told to fail one operation.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use polyhub_api::{HubRuntime, RuntimeError};
use polyhub_store::{Device, Isolation, ParserState, ParserStatus};

#[derive(Debug)]
pub struct FakeRuntime {
    calls: Mutex<Vec<String>>,
    parsers: Mutex<BTreeMap<String, ParserStatus>>,
    /// `(operation, error kind)`: the next call of that operation fails with that error.
    failure: Mutex<Option<(&'static str, &'static str)>>,
    ready: AtomicBool,
}

impl Default for FakeRuntime {
    fn default() -> Self {
        FakeRuntime {
            calls: Mutex::default(),
            parsers: Mutex::default(),
            failure: Mutex::default(),
            ready: AtomicBool::new(true),
        }
    }
}

pub fn status(hub_id: &str, state: ParserState) -> ParserStatus {
    ParserStatus {
        hub_id: hub_id.to_owned(),
        state,
        isolation: Isolation::Task,
        pid: None,
        restarts: 0,
        last_error: None,
        since: 1,
        devices: 0,
        messages_in: 0,
        rows_written: 0,
        dead_letters: 0,
        duplicates_skipped: 0,
        last_batch_messages: 0,
        last_lag_ms: 0,
    }
}

impl FakeRuntime {
    /// Every call so far, e.g. `start h1`, `device_added d1`, `device_removed h1 d1`.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    pub fn clear_calls(&self) {
        self.calls.lock().unwrap().clear();
    }

    /// The next call of `operation` (`start`, `stop`, `restart`, `device_added`,
    /// `device_removed`) fails with `kind` (`not_found`, `conflict`, `failed`).
    pub fn fail_next(&self, operation: &'static str, kind: &'static str) {
        *self.failure.lock().unwrap() = Some((operation, kind));
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    fn record(&self, operation: &'static str, call: String) -> Result<(), RuntimeError> {
        self.calls.lock().unwrap().push(call.clone());
        let mut failure = self.failure.lock().unwrap();
        match *failure {
            Some((failing, kind)) if failing == operation => {
                *failure = None;
                let message = format!("injected {kind} for {call}");
                Err(match kind {
                    "not_found" => RuntimeError::NotFound(message),
                    "conflict" => RuntimeError::Conflict(message),
                    _ => RuntimeError::Failed(message),
                })
            }
            _ => Ok(()),
        }
    }

    fn set_state(&self, hub_id: &str, state: ParserState) -> ParserStatus {
        let mut parsers = self.parsers.lock().unwrap();
        let entry = parsers
            .entry(hub_id.to_owned())
            .or_insert_with(|| status(hub_id, state));
        entry.state = state;
        entry.clone()
    }
}

#[async_trait]
impl HubRuntime for FakeRuntime {
    async fn start_hub(&self, hub_id: &str) -> Result<ParserStatus, RuntimeError> {
        self.record("start", format!("start {hub_id}"))?;
        Ok(self.set_state(hub_id, ParserState::Running))
    }

    async fn stop_hub(&self, hub_id: &str) -> Result<ParserStatus, RuntimeError> {
        self.record("stop", format!("stop {hub_id}"))?;
        Ok(self.set_state(hub_id, ParserState::Stopped))
    }

    async fn restart_hub(&self, hub_id: &str) -> Result<ParserStatus, RuntimeError> {
        self.record("restart", format!("restart {hub_id}"))?;
        self.set_state(hub_id, ParserState::Running);
        let mut parsers = self.parsers.lock().unwrap();
        let entry = parsers.get_mut(hub_id).expect("set just above");
        entry.restarts += 1;
        Ok(entry.clone())
    }

    async fn device_added(&self, device: &Device) -> Result<(), RuntimeError> {
        self.record("device_added", format!("device_added {}", device.id))
    }

    async fn hub_deleted(&self, hub_id: &str) -> Result<(), RuntimeError> {
        self.record("hub_deleted", format!("hub_deleted {hub_id}"))
    }

    async fn device_removed(&self, hub_id: &str, device_id: &str) -> Result<(), RuntimeError> {
        self.record(
            "device_removed",
            format!("device_removed {hub_id} {device_id}"),
        )
    }

    fn parser_status(&self, hub_id: &str) -> Option<ParserStatus> {
        self.parsers.lock().unwrap().get(hub_id).cloned()
    }

    fn parsers(&self) -> Vec<ParserStatus> {
        // Reverse order, so the API's sorting is observable.
        self.parsers
            .lock()
            .unwrap()
            .values()
            .rev()
            .cloned()
            .collect()
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}
