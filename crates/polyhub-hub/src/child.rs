//! The body of `polyhub parser --hub ID`: one hub's parser in its own process.
//!
//! The child runs the same ingest loop as a task-isolated parser and speaks JSON lines with the
//! manager that spawned it: requests on standard input, events on standard output, logs on
//! standard error.
//!
//! Parent → child: `{"op":"add_device","device":"d1","id":7}`,
//! `{"op":"remove_device","device":"d1","id":8}`, `{"op":"stop","id":9}`.
//!
//! Child → parent: `{"event":"ready","devices":n}` once subscribed, `{"event":"ok","id":7}` or
//! `{"event":"error","id":7,"reason":"..."}` answers, `{"event":"devices","devices":n}` when the
//! number of subscribed devices changes, and
//! `{"event":"batch","messages":n,"rows":n,"dead_letters":n,"duplicates":n,"lag_ms":n}` after each
//! commit. (`devices` fields and events extend the shared contract; parents ignore what they do
//! not know.)
//!
//! The child exits when its input closes (the parent is gone) or after `stop`, committing what
//! it received first; it answers `stop` with `ok` once committed.

use std::sync::Arc;

use polyhub_store::Store;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::bus::BusConnector;
use crate::config::HubConfig;
use crate::error::HubError;
use crate::parser::{ParserCommand, ParserContext, ParserNotice, run_parser};

/// A request from the parent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub(crate) enum ParentOp {
    AddDevice { device: String, id: u64 },
    RemoveDevice { device: String, id: u64 },
    Stop { id: u64 },
}

/// An event from the child.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub(crate) enum ChildEvent {
    Ready {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        devices: Option<u64>,
    },
    Devices {
        devices: u64,
    },
    Ok {
        id: u64,
    },
    Error {
        id: Option<u64>,
        reason: String,
    },
    Batch {
        messages: u64,
        rows: u64,
        dead_letters: u64,
        duplicates: u64,
        lag_ms: u64,
    },
}

impl From<ParserNotice> for ChildEvent {
    fn from(notice: ParserNotice) -> Self {
        match notice {
            ParserNotice::Ready { devices } => ChildEvent::Ready {
                devices: Some(devices),
            },
            ParserNotice::Devices(devices) => ChildEvent::Devices { devices },
            ParserNotice::Batch(report) => ChildEvent::Batch {
                messages: report.messages,
                rows: report.rows,
                dead_letters: report.dead_letters,
                duplicates: report.duplicates,
                lag_ms: report.lag_ms,
            },
        }
    }
}

/// Runs the parser of `hub_id` speaking the protocol on this process's stdin and stdout, until
/// `stop`, the input closes, or `shutdown` is cancelled. Returns `Err` when the parser failed
/// (the caller exits non-zero, and the parent restarts it).
pub async fn run_child_parser(
    hub_id: &str,
    config: HubConfig,
    store: Arc<dyn Store>,
    bus: Arc<dyn BusConnector>,
    shutdown: CancellationToken,
) -> Result<(), HubError> {
    run_child_parser_with_io(
        hub_id,
        config,
        store,
        bus,
        tokio::io::stdin(),
        tokio::io::stdout(),
        shutdown,
    )
    .await
}

/// [`run_child_parser`] over any input and output (tests drive it through in-memory pipes).
pub async fn run_child_parser_with_io<R, W>(
    hub_id: &str,
    config: HubConfig,
    store: Arc<dyn Store>,
    bus: Arc<dyn BusConnector>,
    input: R,
    output: W,
    shutdown: CancellationToken,
) -> Result<(), HubError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    config.validate()?;
    let context = ParserContext {
        hub_id: hub_id.to_owned(),
        config: Arc::new(config),
        store,
        bus,
    };
    let (event_sender, event_receiver) = mpsc::unbounded_channel::<ChildEvent>();
    let writer = tokio::spawn(write_events(output, event_receiver));

    let (command_sender, command_receiver) = mpsc::channel(64);
    let (notice_sender, mut notice_receiver) = mpsc::unbounded_channel();
    let stop = shutdown.child_token();
    let mut parser = tokio::spawn(run_parser(
        context,
        command_receiver,
        notice_sender,
        stop.clone(),
    ));

    let mut lines = BufReader::new(input).lines();
    let mut input_open = true;
    let mut notices_open = true;
    let mut stop_id = None;
    let result = loop {
        tokio::select! {
            result = &mut parser => {
                break result.unwrap_or_else(|error| {
                    Err(HubError::Process(format!("the parser task ended abnormally: {error}")))
                });
            }
            notice = notice_receiver.recv(), if notices_open => match notice {
                Some(notice) => {
                    let _ = event_sender.send(notice.into());
                }
                None => notices_open = false,
            },
            line = lines.next_line(), if input_open => match line {
                Ok(Some(line)) => {
                    if let Some(id) = handle_op(&line, &command_sender, &event_sender) {
                        stop_id = Some(id);
                        stop.cancel();
                    }
                }
                // The parent is gone (or its pipe broke): stop cleanly.
                Ok(None) | Err(_) => {
                    input_open = false;
                    stop.cancel();
                }
            },
        }
    };
    while let Ok(notice) = notice_receiver.try_recv() {
        let _ = event_sender.send(notice.into());
    }
    if let (Ok(()), Some(id)) = (&result, stop_id) {
        let _ = event_sender.send(ChildEvent::Ok { id });
    }
    drop(event_sender);
    let _ = writer.await;
    result
}

/// Handles one request line; returns the id of a `stop` request.
fn handle_op(
    line: &str,
    commands: &mpsc::Sender<ParserCommand>,
    events: &mpsc::UnboundedSender<ChildEvent>,
) -> Option<u64> {
    let op = match serde_json::from_str::<ParentOp>(line) {
        Ok(op) => op,
        Err(error) => {
            warn!("ignoring a malformed request from the parent ({error}): {line:?}");
            let id = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|value| value.get("id").and_then(serde_json::Value::as_u64));
            let _ = events.send(ChildEvent::Error {
                id,
                reason: format!("malformed request: {error}"),
            });
            return None;
        }
    };
    let (id, command, answer) = match op {
        ParentOp::Stop { id } => return Some(id),
        ParentOp::AddDevice { device, id } => {
            let (answer_sender, answer) = oneshot::channel();
            (
                id,
                ParserCommand::AddDevice {
                    device_id: device,
                    answer: answer_sender,
                },
                answer,
            )
        }
        ParentOp::RemoveDevice { device, id } => {
            let (answer_sender, answer) = oneshot::channel();
            (
                id,
                ParserCommand::RemoveDevice {
                    device_id: device,
                    answer: answer_sender,
                },
                answer,
            )
        }
    };
    let commands = commands.clone();
    let events = events.clone();
    // Answers arrive after the parser's current batch is committed; waiting for them here
    // would stall reading further requests.
    tokio::spawn(async move {
        let event = if commands.send(command).await.is_err() {
            ChildEvent::Error {
                id: Some(id),
                reason: "the parser is stopping".to_owned(),
            }
        } else {
            match answer.await {
                Ok(Ok(())) => ChildEvent::Ok { id },
                Ok(Err(reason)) => ChildEvent::Error {
                    id: Some(id),
                    reason,
                },
                Err(_) => ChildEvent::Error {
                    id: Some(id),
                    reason: "the parser ended".to_owned(),
                },
            }
        };
        let _ = events.send(event);
    });
    None
}

async fn write_events<W: AsyncWrite + Unpin>(
    mut output: W,
    mut events: mpsc::UnboundedReceiver<ChildEvent>,
) {
    while let Some(event) = events.recv().await {
        let Ok(mut line) = serde_json::to_vec(&event) else {
            continue;
        };
        line.push(b'\n');
        if output.write_all(&line).await.is_err() || output.flush().await.is_err() {
            // The parent is gone; the input side notices too and stops the parser.
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_lines_match_the_contract() {
        let op: ParentOp =
            serde_json::from_str(r#"{"op":"add_device","device":"d1","id":7}"#).unwrap();
        assert_eq!(
            op,
            ParentOp::AddDevice {
                device: "d1".into(),
                id: 7
            }
        );
        let op: ParentOp = serde_json::from_str(r#"{"op":"stop","id":9}"#).unwrap();
        assert_eq!(op, ParentOp::Stop { id: 9 });
        assert!(serde_json::from_str::<ParentOp>(r#"{"op":"stop"}"#).is_err());

        let ready: ChildEvent = serde_json::from_str(r#"{"event":"ready"}"#).unwrap();
        assert_eq!(ready, ChildEvent::Ready { devices: None });
        let batch = serde_json::to_value(ChildEvent::Batch {
            messages: 3,
            rows: 5,
            dead_letters: 1,
            duplicates: 0,
            lag_ms: 12,
        })
        .unwrap();
        assert_eq!(
            batch,
            serde_json::json!({"event":"batch","messages":3,"rows":5,"dead_letters":1,"duplicates":0,"lag_ms":12})
        );
        let error: ChildEvent =
            serde_json::from_str(r#"{"event":"error","id":7,"reason":"x"}"#).unwrap();
        assert_eq!(
            error,
            ChildEvent::Error {
                id: Some(7),
                reason: "x".into()
            }
        );
    }
}
