//! A [`CommandRuntime`] over any [`Store`] that applies the contract's submit rules, records
//! its calls, and can be told to settle each new command after a delay (as a device would).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use polyhub_api::{CommandRequest, CommandRuntime, DeviceAccount, RuntimeError};
use polyhub_store::{
    Command, CommandState, CommandTransition, MAX_COMMAND_PAYLOAD, NewCommandRecord, Store,
    StoreError, now_millis,
};

#[derive(Debug)]
pub struct FakeCommands {
    store: Arc<dyn Store>,
    /// Protocols that have a polyglot client.
    protocols: Vec<String>,
    next_id: AtomicU64,
    submits: Mutex<Vec<(String, CommandRequest)>>,
    waits: Mutex<Vec<Duration>>,
    /// After this delay, each new command moves to this state (with a reply when acknowledged).
    settle: Mutex<Option<(Duration, CommandState)>>,
    /// Accounts made for `xmpp` devices (the only protocol with accounts here).
    accounts: Mutex<HashSet<String>>,
}

const UNSETTLED: [CommandState; 3] = [
    CommandState::Queued,
    CommandState::Sent,
    CommandState::Delivered,
];

fn from_store(error: StoreError) -> RuntimeError {
    match error {
        StoreError::NotFound(message) => RuntimeError::NotFound(message),
        StoreError::Conflict(message) => RuntimeError::Conflict(message),
        StoreError::Invalid(message) => RuntimeError::Invalid(message),
        other => RuntimeError::Failed(other.to_string()),
    }
}

impl FakeCommands {
    /// Only `mqtt` has a client.
    pub fn new(store: Arc<dyn Store>) -> Self {
        FakeCommands {
            store,
            protocols: vec!["mqtt".to_owned()],
            next_id: AtomicU64::new(1),
            submits: Mutex::default(),
            waits: Mutex::default(),
            settle: Mutex::default(),
            accounts: Mutex::default(),
        }
    }

    /// Every later command moves to `state` `delay` after it is submitted.
    pub fn settle_after(&self, delay: Duration, state: CommandState) {
        *self.settle.lock().unwrap() = Some((delay, state));
    }

    /// `(device, request)` of every accepted or refused submit, in order.
    pub fn submits(&self) -> Vec<(String, CommandRequest)> {
        self.submits.lock().unwrap().clone()
    }

    /// The timeout of every `wait` call, in order.
    pub fn waits(&self) -> Vec<Duration> {
        self.waits.lock().unwrap().clone()
    }

    async fn move_to(
        &self,
        id: &str,
        to: CommandState,
        reason: Option<&str>,
    ) -> Result<Command, RuntimeError> {
        let reply = (to == CommandState::Acknowledged).then(|| serde_json::json!({"ok": true}));
        self.store
            .transition_command(CommandTransition {
                id: id.to_owned(),
                from: UNSETTLED.to_vec(),
                to,
                at: now_millis(),
                reason: reason.map(str::to_owned),
                reply,
            })
            .await
            .map_err(from_store)
    }
}

#[async_trait]
impl CommandRuntime for FakeCommands {
    async fn create_account(
        &self,
        device: &polyhub_store::Device,
    ) -> Result<DeviceAccount, RuntimeError> {
        if device.protocol != "xmpp" {
            return Err(RuntimeError::Invalid(format!(
                "protocol {:?} does not manage device accounts",
                device.protocol
            )));
        }
        let username = format!("{}@localhost", device.id);
        if !self.accounts.lock().unwrap().insert(username.clone()) {
            return Err(RuntimeError::Conflict(format!("{username} exists")));
        }
        Ok(DeviceAccount {
            username,
            password: "generated".to_owned(),
        })
    }

    async fn remove_account(&self, device: &polyhub_store::Device) -> Result<(), RuntimeError> {
        if device.protocol != "xmpp" {
            return Err(RuntimeError::Invalid(format!(
                "protocol {:?} does not manage device accounts",
                device.protocol
            )));
        }
        let username = format!("{}@localhost", device.id);
        if self.accounts.lock().unwrap().remove(&username) {
            Ok(())
        } else {
            Err(RuntimeError::Conflict(format!("no account {username}")))
        }
    }

    async fn submit(
        &self,
        device_id: &str,
        request: CommandRequest,
    ) -> Result<Command, RuntimeError> {
        self.submits
            .lock()
            .unwrap()
            .push((device_id.to_owned(), request.clone()));
        let device = self.store.get_device(device_id).await.map_err(from_store)?;
        if request.name.is_empty()
            || request.name.len() > 128
            || request.name.contains(['/', '+', '#'])
        {
            return Err(RuntimeError::Invalid(format!(
                "bad command name {:?}",
                request.name
            )));
        }
        if !self.protocols.contains(&device.protocol) {
            return Err(RuntimeError::Invalid(format!(
                "no polyglot client for protocol {}",
                device.protocol
            )));
        }
        if request.payload.to_string().len() > MAX_COMMAND_PAYLOAD {
            return Err(RuntimeError::PayloadTooLarge(
                "payload too large".to_owned(),
            ));
        }
        let number = self.next_id.fetch_add(1, Ordering::SeqCst);
        let now = now_millis();
        let command = self
            .store
            .create_command(NewCommandRecord {
                id: format!("cmd-{number:026}"),
                device_id: device.id,
                hub_id: device.hub_id,
                protocol: device.protocol,
                name: request.name,
                payload: request.payload,
                created_at: now,
                expires_at: request
                    .ttl_ms
                    .map(|ttl| now.saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX))),
            })
            .await
            .map_err(from_store)?;
        let settle = *self.settle.lock().unwrap();
        if let Some((delay, state)) = settle {
            let store = self.store.clone();
            let id = command.id.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let reply =
                    (state == CommandState::Acknowledged).then(|| serde_json::json!({"ok": true}));
                let _ = store
                    .transition_command(CommandTransition {
                        id,
                        from: UNSETTLED.to_vec(),
                        to: state,
                        at: now_millis(),
                        reason: None,
                        reply,
                    })
                    .await;
            });
        }
        Ok(command)
    }

    async fn wait(&self, id: &str, timeout: Duration) -> Result<Command, RuntimeError> {
        self.waits.lock().unwrap().push(timeout);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let command = self.store.get_command(id).await.map_err(from_store)?;
            if command.state.is_final() || tokio::time::Instant::now() >= deadline {
                return Ok(command);
            }
            tokio::time::sleep_until(
                deadline.min(tokio::time::Instant::now() + Duration::from_millis(5)),
            )
            .await;
        }
    }

    async fn cancel(&self, id: &str) -> Result<Command, RuntimeError> {
        self.move_to(
            id,
            CommandState::Cancelled,
            Some("cancelled through the API"),
        )
        .await
    }
}
