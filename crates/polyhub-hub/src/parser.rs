//! One hub's ingest loop: subscribe, receive, decode, batch, commit, then acknowledge.
//!
//! The parser owns a persistent bus session (`polyhub-parser-{hub}`) so that whatever it has
//! received but not committed is redelivered after a crash. A batch is committed in one store
//! transaction and only then acknowledged; the store skips messages whose seq it already
//! committed, so a crash between the commit and the acknowledgement duplicates nothing.
//!
//! Device add/remove commands are applied between batches (the current batch is committed
//! first) and answered only after the bus has confirmed the (un)subscription.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use polyhub_store::{
    ChannelStyle, Decoder, IngestBatch, IngestedMessage, ListQuery, NewDeadLetter, Store,
    StoreError, TelemetryRow, now_millis,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::bus::{AckToken, BusClient, BusConnector, BusError, BusMessage};
use crate::channels::{SgframeworkTopic, parse_sgframework_topic, sgframework_filters};
use crate::config::HubConfig;
use crate::decode::{check_signal, decode, decode_single};
use crate::error::HubError;
use crate::presence;

/// Devices listed from the store per page at start-up.
const DEVICE_PAGE: u32 = 1000;

/// Filters subscribed per bus call at start-up (keeps SUBSCRIBE packets small).
const SUBSCRIBE_CHUNK: usize = 200;

/// How often recorded seqs older than the retention are forgotten.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// The bus client id of a hub's parser.
/// The client id of a hub's parser on the bus: its persistent session is the hub's.
pub fn parser_client_id(hub_id: &str) -> String {
    format!("polyhub-parser-{hub_id}")
}

/// The answer to a device command: `Err` carries the reason.
pub(crate) type CommandAnswer = oneshot::Sender<Result<(), String>>;

/// What a supervisor (or the child protocol) asks of a running parser.
#[derive(Debug)]
pub(crate) enum ParserCommand {
    /// Subscribe this device's channels, then answer.
    AddDevice {
        device_id: String,
        answer: CommandAnswer,
    },
    /// Unsubscribe this device's channels, then answer.
    RemoveDevice {
        device_id: String,
        answer: CommandAnswer,
    },
}

/// What one committed batch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct BatchReport {
    pub(crate) messages: u64,
    pub(crate) rows: u64,
    pub(crate) dead_letters: u64,
    pub(crate) duplicates: u64,
    pub(crate) lag_ms: u64,
}

/// What a parser tells its supervisor as it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ParserNotice {
    /// Subscribed to the channels of this many devices; ingesting.
    Ready {
        devices: u64,
    },
    /// The number of subscribed devices changed.
    Devices(u64),
    Batch(BatchReport),
}

/// Everything a parser needs besides its channels to the supervisor.
#[derive(Debug, Clone)]
pub(crate) struct ParserContext {
    pub(crate) hub_id: String,
    pub(crate) config: Arc<HubConfig>,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) bus: Arc<dyn BusConnector>,
}

/// Runs one hub's parser until `stop` (or until `commands` closes), committing and
/// acknowledging what it received before returning `Ok`. Returns `Err` on a storage or bus
/// failure, leaving the uncommitted messages unacknowledged for redelivery.
pub(crate) async fn run_parser(
    context: ParserContext,
    mut commands: mpsc::Receiver<ParserCommand>,
    notices: mpsc::UnboundedSender<ParserNotice>,
    stop: CancellationToken,
) -> Result<(), HubError> {
    let hub = context.store.get_hub(&context.hub_id).await?;
    let client = context
        .bus
        .connect(&parser_client_id(&hub.id), true)
        .await?;
    let mut parser = Parser {
        hub_id: hub.id.clone(),
        decoder: hub.settings.decoder,
        style: hub.settings.channels,
        config: context.config.clone(),
        store: context.store.clone(),
        client,
        devices: BTreeSet::new(),
        batch: Batch::default(),
        notices,
    };
    parser.subscribe_registered().await?;
    let _ = parser.notices.send(ParserNotice::Ready {
        devices: parser.devices.len() as u64,
    });
    debug!(hub = %parser.hub_id, devices = parser.devices.len(), "parser ready");

    // Not at once: what the session redelivers (first, at start-up) must be checked against
    // the recorded seqs before any is forgotten; after a crash followed by a long downtime,
    // an immediate prune would let the redeliveries of committed messages through again.
    let mut prune = tokio::time::interval_at(Instant::now() + PRUNE_INTERVAL, PRUNE_INTERVAL);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let deadline = parser.batch.deadline;
        tokio::select! {
            biased;
            () = stop.cancelled() => {
                parser.take_delivered().await?;
                parser.flush().await?;
                return Ok(());
            }
            command = commands.recv() => match command {
                Some(command) => {
                    parser.flush().await?;
                    parser.apply(command).await?;
                }
                // The supervisor is gone: nobody can stop us any more, so stop now.
                None => {
                    parser.flush().await?;
                    return Ok(());
                }
            },
            () = sleep_until(deadline) => parser.flush().await?,
            _ = prune.tick() => parser.prune().await,
            // Relies on `BusClient::recv` being cancel-safe, as channel-backed clients are.
            message = parser.client.recv() => match message? {
                Some(message) => {
                    parser.accept(message);
                    if parser.batch.messages.len() >= parser.config.batch_max_messages {
                        parser.flush().await?;
                    }
                }
                None => {
                    // Committed even if the acknowledgement cannot reach the broker any more:
                    // the commit recorded the seqs, so a redelivery is skipped.
                    let flushed = parser.flush().await;
                    if broker_gone_before_stop(&stop, &mut commands).await {
                        return Ok(());
                    }
                    flushed?;
                    return Err(HubError::Bus(BusError::Closed("the broker is shutting down".into())));
                }
            },
        }
    }
}

/// How long a parser whose broker said it is shutting down waits for its own stop before it
/// reports a failure.
const BROKER_GONE_GRACE: Duration = Duration::from_secs(2);

/// After the broker announced an orderly shutdown: whether the parser's own stop follows
/// within [`BROKER_GONE_GRACE`]. It usually does: polyhub disconnects every network client
/// (a process-isolated parser's connection included) before it stops the parsers, and a
/// parser stopped that way has not failed. Commands that arrive meanwhile are refused.
async fn broker_gone_before_stop(
    stop: &CancellationToken,
    commands: &mut mpsc::Receiver<ParserCommand>,
) -> bool {
    let deadline = Instant::now() + BROKER_GONE_GRACE;
    loop {
        tokio::select! {
            () = stop.cancelled() => return true,
            () = tokio::time::sleep_until(deadline) => return false,
            command = commands.recv() => match command {
                Some(ParserCommand::AddDevice { answer, .. } | ParserCommand::RemoveDevice { answer, .. }) => {
                    let _ = answer.send(Err("the broker is shutting down".to_owned()));
                }
                None => return true,
            },
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Messages received but not yet committed.
#[derive(Debug, Default)]
struct Batch {
    messages: Vec<IngestedMessage>,
    tokens: Vec<AckToken>,
    /// sgframework presence changes, applied after the commit: (device, online, at).
    presence: Vec<(String, bool, i64)>,
    /// When the batch must be committed at the latest (set by its first message).
    deadline: Option<Instant>,
}

#[derive(Debug)]
struct Parser {
    hub_id: String,
    decoder: Decoder,
    style: ChannelStyle,
    config: Arc<HubConfig>,
    store: Arc<dyn Store>,
    client: Box<dyn BusClient>,
    devices: BTreeSet<String>,
    batch: Batch,
    notices: mpsc::UnboundedSender<ParserNotice>,
}

impl Parser {
    fn filters(&self, device_id: &str) -> Vec<String> {
        match self.style {
            ChannelStyle::Hub => {
                presence::device_filters(&self.config.channels, &self.hub_id, device_id)
            }
            ChannelStyle::Sgframework => sgframework_filters(device_id).to_vec(),
        }
    }

    /// Lists the hub's devices page by page and subscribes their channels.
    async fn subscribe_registered(&mut self) -> Result<(), HubError> {
        let mut after = None;
        loop {
            let page = self
                .store
                .list_devices(ListQuery {
                    parent: Some(self.hub_id.clone()),
                    after: after.clone(),
                    limit: DEVICE_PAGE,
                })
                .await?;
            let full = page.len() >= DEVICE_PAGE as usize;
            after = page.last().map(|device| device.id.clone());
            self.devices
                .extend(page.into_iter().map(|device| device.id));
            if !full || after.is_none() {
                break;
            }
        }
        let filters: Vec<String> = self
            .devices
            .iter()
            .flat_map(|device| self.filters(device))
            .collect();
        for chunk in filters.chunks(SUBSCRIBE_CHUNK) {
            self.client.subscribe(chunk).await?;
        }
        Ok(())
    }

    /// Applies a device command and answers it. A closed connection also fails the parser
    /// (after answering); a refusal is only reported to the caller.
    async fn apply(&mut self, command: ParserCommand) -> Result<(), HubError> {
        let (device_id, answer, adding) = match command {
            ParserCommand::AddDevice { device_id, answer } => (device_id, answer, true),
            ParserCommand::RemoveDevice { device_id, answer } => (device_id, answer, false),
        };
        let filters = self.filters(&device_id);
        let result = if adding {
            self.client.subscribe(&filters).await
        } else {
            self.client.unsubscribe(&filters).await
        };
        match result {
            Ok(()) => {
                if adding {
                    self.devices.insert(device_id);
                } else {
                    self.devices.remove(&device_id);
                }
                let _ = self
                    .notices
                    .send(ParserNotice::Devices(self.devices.len() as u64));
                let _ = answer.send(Ok(()));
                Ok(())
            }
            Err(error) => {
                let _ = answer.send(Err(error.to_string()));
                match error {
                    BusError::Closed(_) => Err(error.into()),
                    _ => Ok(()),
                }
            }
        }
    }

    async fn prune(&mut self) {
        let retention_ms = i64::try_from(self.config.seq_retention_hours.saturating_mul(3_600_000))
            .unwrap_or(i64::MAX);
        let before = now_millis().saturating_sub(retention_ms);
        match self.store.prune_seqs(&self.hub_id, before).await {
            Ok(removed) => debug!(hub = %self.hub_id, removed, "pruned recorded seqs"),
            // Pruning is housekeeping: a failure here must not stop ingest.
            Err(error) => warn!(hub = %self.hub_id, "cannot prune recorded seqs: {error}"),
        }
    }

    /// Turns a received message into its batch entry (rows or a dead letter).
    /// At a stop: takes in every message the broker has already handed to this parser's
    /// session (the devices' connections are closed before parsers stop, so the broker has
    /// acknowledged them to their devices), so that the flush after it commits them now
    /// rather than after the next start. Stops at the first message not there yet.
    async fn take_delivered(&mut self) -> Result<(), HubError> {
        loop {
            // `recv` is cancel-safe; a zero timeout polls it once, and without tokio's
            // cooperative budget, which would otherwise make a long queue look empty.
            let poll_once = tokio::time::timeout(Duration::ZERO, self.client.recv());
            let message = match tokio::task::unconstrained(poll_once).await {
                Ok(Ok(Some(message))) => message,
                // Nothing more yet, the broker going away or a lost connection (a process
                // parser's, closed with the devices'): the flush that follows commits what
                // was taken, as a stop always did.
                Ok(Ok(None) | Err(_)) | Err(_) => return Ok(()),
            };
            self.accept(message);
            if self.batch.messages.len() >= self.config.batch_max_messages {
                self.flush().await?;
            }
        }
    }

    fn accept(&mut self, message: BusMessage) {
        if self.batch.messages.is_empty() {
            self.batch.deadline =
                Some(Instant::now() + Duration::from_millis(self.config.batch_max_delay_ms));
        }
        let received_at = message.received_at;
        let ingested = match self.style {
            ChannelStyle::Hub => presence::classify(
                &self.config.channels,
                &self.hub_id,
                &self.devices,
                &message,
                &mut self.batch.presence,
            )
            .unwrap_or_else(|| self.classify_hub(&message)),
            ChannelStyle::Sgframework => self.classify_sgframework(&message),
        };
        let (device_id, outcome) = match ingested {
            Ok((device_id, rows)) => (Some(device_id), Ok(rows)),
            Err((device_id, reason)) => (device_id, Err(reason)),
        };
        let (rows, dead_letter) = match outcome {
            Ok(rows) => (rows, None),
            Err(reason) => (
                Vec::new(),
                Some(NewDeadLetter {
                    hub_id: self.hub_id.clone(),
                    device_id: device_id.clone(),
                    topic: message.topic.clone(),
                    payload: message.payload.to_vec(),
                    reason,
                    received_at,
                }),
            ),
        };
        self.batch.messages.push(IngestedMessage {
            seq: message.seq,
            device_id,
            received_at,
            rows,
            dead_letter,
        });
        self.batch.tokens.push(message.token);
    }

    fn unregistered(&self, topic: &str) -> (Option<String>, String) {
        (
            None,
            format!(
                "topic {topic:?} is not a data channel of a registered device of hub {:?}",
                self.hub_id
            ),
        )
    }

    fn classify_hub(
        &self,
        message: &BusMessage,
    ) -> Result<(String, Vec<TelemetryRow>), (Option<String>, String)> {
        let Some(topic) = self.config.channels.parse_data_topic(&message.topic) else {
            return Err(self.unregistered(&message.topic));
        };
        if topic.hub.is_some_and(|hub| hub != self.hub_id) || !self.devices.contains(topic.device) {
            return Err(self.unregistered(&message.topic));
        }
        let device_id = topic.device.to_owned();
        match decode(self.decoder, &message.payload) {
            Ok(decoded) => {
                let rows = decoded
                    .into_iter()
                    .map(|(signal, value)| TelemetryRow {
                        device_id: device_id.clone(),
                        signal,
                        ts: message.received_at,
                        value,
                    })
                    .collect();
                Ok((device_id, rows))
            }
            Err(reason) => Err((Some(device_id), reason)),
        }
    }

    fn classify_sgframework(
        &mut self,
        message: &BusMessage,
    ) -> Result<(String, Vec<TelemetryRow>), (Option<String>, String)> {
        let Some(topic) = parse_sgframework_topic(&message.topic) else {
            return Err(self.unregistered(&message.topic));
        };
        let device = match topic {
            SgframeworkTopic::Data { device, .. } | SgframeworkTopic::Presence { device } => device,
        };
        if !self.devices.contains(device) {
            return Err(self.unregistered(&message.topic));
        }
        let device_id = device.to_owned();
        match topic {
            SgframeworkTopic::Data { signal, .. } => {
                let value = check_signal(signal)
                    .and_then(|()| decode_single(self.decoder, &message.payload))
                    .map_err(|reason| (Some(device_id.clone()), reason))?;
                let row = TelemetryRow {
                    device_id: device_id.clone(),
                    signal: signal.to_owned(),
                    ts: message.received_at,
                    value,
                };
                Ok((device_id, vec![row]))
            }
            SgframeworkTopic::Presence { .. } => {
                let online = match message.payload.trim_ascii() {
                    b"online" => true,
                    b"offline" => false,
                    _ => {
                        return Err((
                            Some(device_id),
                            "presence payload must be \"online\" or \"offline\"".to_owned(),
                        ));
                    }
                };
                self.batch
                    .presence
                    .push((device_id.clone(), online, message.received_at));
                Ok((device_id, Vec::new()))
            }
        }
    }

    /// Commits the batch, applies its presence changes, then acknowledges it.
    async fn flush(&mut self) -> Result<(), HubError> {
        if self.batch.messages.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        let message_count = batch.messages.len() as u64;
        let oldest = batch
            .messages
            .iter()
            .map(|message| message.received_at)
            .min();
        let outcome = self
            .store
            .write_batch(IngestBatch {
                hub_id: self.hub_id.clone(),
                messages: batch.messages,
            })
            .await
            .map_err(HubError::Store)?;
        for (device_id, online, at) in batch.presence {
            match self.store.set_presence(&device_id, online, at).await {
                // Removed since: nothing to record.
                Ok(()) | Err(StoreError::NotFound(_)) => {}
                Err(error) => return Err(HubError::Store(error)),
            }
        }
        self.client.ack(&batch.tokens).await?;

        let lag_ms = oldest.map_or(0, |oldest| {
            u64::try_from(now_millis() - oldest).unwrap_or(0)
        });
        let report = BatchReport {
            messages: message_count,
            rows: outcome.rows_written,
            dead_letters: outcome.dead_letters_written,
            duplicates: outcome.duplicates_skipped,
            lag_ms,
        };
        record_metrics(&self.hub_id, &report);
        let _ = self.notices.send(ParserNotice::Batch(report));
        Ok(())
    }
}

/// Counts a committed batch in the metrics (the parent does it for process-isolated parsers,
/// whose own process has no recorder).
pub(crate) fn record_metrics(hub_id: &str, report: &BatchReport) {
    let hub = hub_id.to_owned();
    metrics::counter!("polyhub_ingest_messages_total", "hub" => hub.clone())
        .increment(report.messages);
    metrics::counter!("polyhub_ingest_rows_written_total", "hub" => hub.clone())
        .increment(report.rows);
    metrics::counter!("polyhub_ingest_dead_letters_total", "hub" => hub.clone())
        .increment(report.dead_letters);
    metrics::counter!("polyhub_ingest_duplicates_skipped_total", "hub" => hub.clone())
        .increment(report.duplicates);
    metrics::histogram!("polyhub_ingest_batch_messages", "hub" => hub.clone())
        .record(report.messages as f64);
    metrics::histogram!("polyhub_ingest_lag_seconds", "hub" => hub)
        .record(report.lag_ms as f64 / 1000.0);
}
