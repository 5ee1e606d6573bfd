//! Supervision of one hub's parser: run it (as a task or a child process), forward device
//! commands to it, publish its status, and restart it with exponential backoff when it fails.
//!
//! A supervisor lives from `start` to `stop` of its hub. Each run of the parser is a
//! [`Launched`]: the same shape for both isolation modes (a command sender, a notice receiver
//! and an exit signal), so the supervision logic does not care where the parser runs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use polyhub_store::{
    Isolation, NewParserEvent, ParserEventKind, ParserState, ParserStatus, Store, now_millis,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::child::{ChildEvent, ParentOp};
use crate::config::HubConfig;
use crate::parser::{
    CommandAnswer, ParserCommand, ParserContext, ParserNotice, parser_client_id, run_parser,
};

/// How long a child parser may take to flush and exit after `stop` before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Commands buffered towards one parser.
const COMMAND_BUFFER: usize = 64;

/// How to spawn a process-isolated parser: `program args... --hub <id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessParserCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
}

/// What a supervisor needs.
#[derive(Debug, Clone)]
pub(crate) struct SupervisorSpec {
    pub(crate) context: ParserContext,
    pub(crate) process: Option<ProcessParserCommand>,
    pub(crate) status: Arc<watch::Sender<ParserStatus>>,
}

/// Starts supervising a hub's parser until `stop` is cancelled (or `commands` closes).
pub(crate) fn spawn_supervisor(
    spec: SupervisorSpec,
    commands: mpsc::Receiver<ParserCommand>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(supervise(spec, commands, stop))
}

/// One run of a parser, wherever it runs.
#[derive(Debug)]
struct Launched {
    commands: mpsc::Sender<ParserCommand>,
    notices: mpsc::UnboundedReceiver<ParserNotice>,
    exit: oneshot::Receiver<Result<(), String>>,
    stop: CancellationToken,
    pid: Option<u32>,
}

fn backoff_delay(config: &HubConfig, consecutive_failures: u32) -> Duration {
    let exponent = consecutive_failures.saturating_sub(1).min(32);
    let delay = config
        .restart_backoff_initial_ms
        .saturating_mul(1u64 << exponent);
    Duration::from_millis(delay.min(config.restart_backoff_max_ms))
}

async fn record(store: &dyn Store, hub_id: &str, kind: ParserEventKind, reason: Option<String>) {
    let event = NewParserEvent {
        hub_id: hub_id.to_owned(),
        kind,
        reason,
        at: now_millis(),
    };
    if let Err(error) = store.record_parser_event(event).await {
        warn!(hub = %hub_id, "cannot record parser event {kind:?}: {error}");
    }
}

async fn supervise(
    spec: SupervisorSpec,
    mut commands: mpsc::Receiver<ParserCommand>,
    stop: CancellationToken,
) {
    let hub_id = spec.context.hub_id.clone();
    let store = spec.context.store.clone();
    let config = spec.context.config.clone();
    let healthy_after = Duration::from_millis(config.restart_backoff_max_ms);
    let mut consecutive_failures = 0u32;
    let mut first = true;
    loop {
        let launched = launch(&spec, &stop).await;
        let started = Instant::now();
        let kind = if first {
            ParserEventKind::Started
        } else {
            ParserEventKind::Restarted
        };
        record(store.as_ref(), &hub_id, kind, None).await;
        first = false;

        let (result, stopping) = match launched {
            Ok((mut running, isolation)) => {
                spec.status.send_modify(|status| {
                    status.state = ParserState::Starting;
                    status.isolation = isolation;
                    status.pid = running.pid;
                    status.since = now_millis();
                });
                watch_run(&spec, &mut running, &mut commands, &stop).await
            }
            Err(reason) => (Err(reason), stop.is_cancelled()),
        };

        if stopping {
            if let Err(reason) = &result {
                record(
                    store.as_ref(),
                    &hub_id,
                    ParserEventKind::Failed,
                    Some(reason.clone()),
                )
                .await;
            }
            finish_stopped(&spec, result.err()).await;
            return;
        }

        let reason = match result {
            Err(reason) => reason,
            Ok(()) => "the parser ended without being asked to".to_owned(),
        };
        consecutive_failures = if started.elapsed() >= healthy_after {
            1
        } else {
            consecutive_failures + 1
        };
        let delay = backoff_delay(&config, consecutive_failures);
        warn!(hub = %hub_id, "parser failed: {reason}; restarting in {delay:?}");
        record(
            store.as_ref(),
            &hub_id,
            ParserEventKind::Failed,
            Some(reason.clone()),
        )
        .await;
        metrics::counter!("polyhub_parser_restarts_total", "hub" => hub_id.clone()).increment(1);
        spec.status.send_modify(|status| {
            status.state = ParserState::Backoff;
            status.pid = None;
            status.restarts = status.restarts.saturating_add(1);
            status.last_error = Some(reason);
            status.since = now_millis();
        });

        let deadline = Instant::now() + delay;
        loop {
            tokio::select! {
                () = stop.cancelled() => {
                    finish_stopped(&spec, None).await;
                    return;
                }
                () = tokio::time::sleep_until(deadline) => break,
                command = commands.recv() => match command {
                    // Nothing runs: the device is in the store, and the next run subscribes
                    // every registered device.
                    Some(command) => answer(command, Ok(())),
                    None => {
                        finish_stopped(&spec, None).await;
                        return;
                    }
                },
            }
        }
    }
}

fn answer(command: ParserCommand, result: Result<(), String>) {
    let (ParserCommand::AddDevice { answer, .. } | ParserCommand::RemoveDevice { answer, .. }) =
        command;
    let _ = answer.send(result);
}

async fn finish_stopped(spec: &SupervisorSpec, error: Option<String>) {
    let hub_id = &spec.context.hub_id;
    record(
        spec.context.store.as_ref(),
        hub_id,
        ParserEventKind::Stopped,
        None,
    )
    .await;
    info!(hub = %hub_id, "parser stopped");
    spec.status.send_modify(|status| {
        status.state = ParserState::Stopped;
        status.pid = None;
        if error.is_some() {
            status.last_error = error;
        }
        status.since = now_millis();
    });
}

/// Follows one run until it exits. Returns its result and whether it was asked to stop.
async fn watch_run(
    spec: &SupervisorSpec,
    running: &mut Launched,
    commands: &mut mpsc::Receiver<ParserCommand>,
    stop: &CancellationToken,
) -> (Result<(), String>, bool) {
    let mut stopping = false;
    let mut notices_open = true;
    let mut counted_running = false;
    let result = loop {
        tokio::select! {
            biased;
            result = &mut running.exit => {
                break result.unwrap_or_else(|_| Err("the parser vanished without a result".to_owned()));
            }
            notice = running.notices.recv(), if notices_open => match notice {
                Some(notice) => apply_notice(spec, notice, &mut counted_running),
                None => notices_open = false,
            },
            () = stop.cancelled(), if !stopping => {
                stopping = true;
                running.stop.cancel();
            }
            command = commands.recv(), if !stopping => match command {
                Some(command) => {
                    if let Err(mpsc::error::SendError(command)) = running.commands.send(command).await {
                        // The parser is ending; its next run subscribes from the store.
                        answer(command, Ok(()));
                    }
                }
                None => {
                    stopping = true;
                    running.stop.cancel();
                }
            },
        }
    };
    // The last batches' reports may still be queued.
    while let Ok(notice) = running.notices.try_recv() {
        apply_notice(spec, notice, &mut counted_running);
    }
    if counted_running {
        metrics::gauge!("polyhub_parsers_running").decrement(1.0);
    }
    // The parser's stop token is a child of `stop`: a parser that saw the stop first may end
    // before the branch above ran, and that is still a requested stop, not a failure.
    (result, stopping || stop.is_cancelled())
}

fn apply_notice(spec: &SupervisorSpec, notice: ParserNotice, counted_running: &mut bool) {
    match notice {
        ParserNotice::Ready { devices } => {
            if !*counted_running {
                *counted_running = true;
                metrics::gauge!("polyhub_parsers_running").increment(1.0);
            }
            spec.status.send_modify(|status| {
                status.state = ParserState::Running;
                status.devices = devices;
                status.since = now_millis();
            });
        }
        ParserNotice::Devices(devices) => {
            spec.status.send_modify(|status| status.devices = devices)
        }
        ParserNotice::Batch(report) => spec.status.send_modify(|status| {
            status.messages_in += report.messages;
            status.rows_written += report.rows;
            status.dead_letters += report.dead_letters;
            status.duplicates_skipped += report.duplicates;
            status.last_batch_messages = report.messages;
            status.last_lag_ms = report.lag_ms;
        }),
    }
}

/// Starts one run of the hub's parser in the isolation its settings ask for.
async fn launch(
    spec: &SupervisorSpec,
    stop: &CancellationToken,
) -> Result<(Launched, Isolation), String> {
    let hub_id = &spec.context.hub_id;
    let hub = spec
        .context
        .store
        .get_hub(hub_id)
        .await
        .map_err(|error| format!("cannot read hub {hub_id:?}: {error}"))?;
    let isolation = hub
        .settings
        .isolation
        .unwrap_or(spec.context.config.isolation);
    let launched = match isolation {
        Isolation::Task => launch_task(spec.context.clone(), stop),
        Isolation::Process => {
            let command = spec.process.as_ref().ok_or_else(|| {
                format!(
                    "hub {hub_id:?} asks for process isolation, but no parser program is configured"
                )
            })?;
            // Not fatal: the child then gets an ordinary session, as before.
            if let Err(error) = spec
                .context
                .bus
                .prepare_session(&parser_client_id(hub_id))
                .await
            {
                tracing::warn!(hub = %hub_id, "the parser's session could not be prepared: {error}");
            }
            launch_process(command, hub_id, stop)?
        }
    };
    Ok((launched, isolation))
}

fn launch_task(context: ParserContext, stop: &CancellationToken) -> Launched {
    let (command_sender, command_receiver) = mpsc::channel(COMMAND_BUFFER);
    let (notice_sender, notice_receiver) = mpsc::unbounded_channel();
    let (exit_sender, exit_receiver) = oneshot::channel();
    let parser_stop = stop.child_token();
    let task = tokio::spawn(run_parser(
        context,
        command_receiver,
        notice_sender,
        parser_stop.clone(),
    ));
    tokio::spawn(async move {
        let result = match task.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(error.to_string()),
            Err(error) => Err(join_failure(error)),
        };
        let _ = exit_sender.send(result);
    });
    Launched {
        commands: command_sender,
        notices: notice_receiver,
        exit: exit_receiver,
        stop: parser_stop,
        pid: None,
    }
}

/// Describes a parser task that panicked or was cancelled.
fn join_failure(error: tokio::task::JoinError) -> String {
    match error.try_into_panic() {
        Ok(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|message| (*message).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-string panic payload".to_owned());
            format!("the parser panicked: {message}")
        }
        Err(_) => "the parser task was cancelled".to_owned(),
    }
}

fn launch_process(
    command: &ProcessParserCommand,
    hub_id: &str,
    stop: &CancellationToken,
) -> Result<Launched, String> {
    let mut child = tokio::process::Command::new(&command.program)
        .args(&command.args)
        .arg("--hub")
        .arg(hub_id)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|error| format!("cannot start {}: {error}", command.program.display()))?;
    let pid = child.id();
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return Err("the parser process has no piped stdin/stdout".to_owned());
    };
    let (command_sender, command_receiver) = mpsc::channel(COMMAND_BUFFER);
    let (notice_sender, notice_receiver) = mpsc::unbounded_channel();
    let (exit_sender, exit_receiver) = oneshot::channel();
    let parser_stop = stop.child_token();
    let bridge = ProcessBridge {
        hub_id: hub_id.to_owned(),
        stdin,
        pending: HashMap::new(),
        next_id: 1,
        notices: notice_sender,
    };
    tokio::spawn(bridge.run(
        child,
        stdout,
        command_receiver,
        exit_sender,
        parser_stop.clone(),
    ));
    Ok(Launched {
        commands: command_sender,
        notices: notice_receiver,
        exit: exit_receiver,
        stop: parser_stop,
        pid,
    })
}

/// The parent's end of the JSON-lines protocol with one child parser.
struct ProcessBridge {
    hub_id: String,
    stdin: ChildStdin,
    pending: HashMap<u64, CommandAnswer>,
    next_id: u64,
    notices: mpsc::UnboundedSender<ParserNotice>,
}

impl ProcessBridge {
    async fn run(
        mut self,
        mut child: Child,
        stdout: ChildStdout,
        mut commands: mpsc::Receiver<ParserCommand>,
        exit: oneshot::Sender<Result<(), String>>,
        stop: CancellationToken,
    ) {
        let mut lines = BufReader::new(stdout).lines();
        let mut stdout_open = true;
        let mut stop_sent = false;
        let mut kill_at: Option<Instant> = None;
        let status = loop {
            tokio::select! {
                status = child.wait() => break status,
                line = lines.next_line(), if stdout_open => match line {
                    Ok(Some(line)) => self.handle_line(&line),
                    Ok(None) | Err(_) => stdout_open = false,
                },
                command = commands.recv(), if !stop_sent => match command {
                    Some(command) => self.send_command(command).await,
                    None => {
                        self.send_stop().await;
                        stop_sent = true;
                        kill_at = Some(Instant::now() + STOP_GRACE);
                    }
                },
                () = stop.cancelled(), if !stop_sent => {
                    self.send_stop().await;
                    stop_sent = true;
                    kill_at = Some(Instant::now() + STOP_GRACE);
                }
                () = sleep_until(kill_at) => {
                    warn!(hub = %self.hub_id, "parser process did not stop in {STOP_GRACE:?}; killing it");
                    let _ = child.start_kill();
                    kill_at = None;
                }
            }
        };
        if stdout_open {
            // The last batch reports, written just before the exit.
            let drain = async {
                while let Ok(Some(line)) = lines.next_line().await {
                    self.handle_line(&line);
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
        }
        let result = match status {
            Ok(status) if status.success() && stop_sent => Ok(()),
            Ok(status) => Err(format!("the parser process ended: {status}")),
            Err(error) => Err(format!("cannot wait for the parser process: {error}")),
        };
        let _ = exit.send(result);
    }

    async fn write(&mut self, op: &ParentOp) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(op).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.stdin.write_all(&line).await?;
        self.stdin.flush().await
    }

    async fn send_command(&mut self, command: ParserCommand) {
        let id = self.next_id;
        self.next_id += 1;
        let (op, answer) = match command {
            ParserCommand::AddDevice { device_id, answer } => (
                ParentOp::AddDevice {
                    device: device_id,
                    id,
                },
                answer,
            ),
            ParserCommand::RemoveDevice { device_id, answer } => (
                ParentOp::RemoveDevice {
                    device: device_id,
                    id,
                },
                answer,
            ),
        };
        match self.write(&op).await {
            Ok(()) => {
                self.pending.insert(id, answer);
            }
            Err(error) => {
                let _ = answer.send(Err(format!("cannot reach the parser process: {error}")));
            }
        }
    }

    async fn send_stop(&mut self) {
        let id = self.next_id;
        self.next_id += 1;
        // A child that is already gone cannot read it; its exit is reported anyway.
        let _ = self.write(&ParentOp::Stop { id }).await;
    }

    fn handle_line(&mut self, line: &str) {
        let event = match serde_json::from_str::<ChildEvent>(line) {
            Ok(event) => event,
            Err(error) => {
                warn!(hub = %self.hub_id, "unexpected line from the parser process ({error}): {line:?}");
                return;
            }
        };
        match event {
            ChildEvent::Ready { devices } => {
                let _ = self.notices.send(ParserNotice::Ready {
                    devices: devices.unwrap_or(0),
                });
            }
            ChildEvent::Devices { devices } => {
                let _ = self.notices.send(ParserNotice::Devices(devices));
            }
            ChildEvent::Ok { id } => {
                if let Some(answer) = self.pending.remove(&id) {
                    let _ = answer.send(Ok(()));
                }
            }
            ChildEvent::Error { id, reason } => match id.and_then(|id| self.pending.remove(&id)) {
                Some(answer) => {
                    let _ = answer.send(Err(reason));
                }
                None => warn!(hub = %self.hub_id, "parser process reported: {reason}"),
            },
            ChildEvent::Batch {
                messages,
                rows,
                dead_letters,
                duplicates,
                lag_ms,
            } => {
                let report = crate::parser::BatchReport {
                    messages,
                    rows,
                    dead_letters,
                    duplicates,
                    lag_ms,
                };
                crate::parser::record_metrics(&self.hub_id, &report);
                let _ = self.notices.send(ParserNotice::Batch(report));
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_maximum() {
        let config = HubConfig {
            restart_backoff_initial_ms: 200,
            restart_backoff_max_ms: 1000,
            ..HubConfig::default()
        };
        let delays: Vec<u64> = (1..=6)
            .map(|n| backoff_delay(&config, n).as_millis() as u64)
            .collect();
        assert_eq!(delays, [200, 400, 800, 1000, 1000, 1000]);
        assert_eq!(backoff_delay(&config, 500).as_millis(), 1000);
    }
}
