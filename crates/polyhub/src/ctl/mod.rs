//! `polyhub group|hub|device|command|telemetry|dead-letters|parsers`: the command line as a
//! client of the REST API of a running `polyhub run`, so the hub can be scripted without curl.
//!
//! Every command takes `--api URL` (env `POLYHUB_API`, default `http://127.0.0.1:8080`) and
//! `--output table|json`. `json` prints the API's answer exactly as received (one document per
//! command; `telemetry range --all` merges its pages into one); `table` renders it readably.
//!
//! - [`client`]: the HTTP client and [`CtlError`].
//! - [`exec`]: what each command requests and prints.
//! - [`table`]: the text rendering.

mod client;
mod exec;
mod table;

use clap::{Args, Subcommand, ValueEnum};
use polyhub_store::{ChannelStyle, CommandState, Decoder, Isolation};

pub(crate) use client::CtlError;

/// Where the API is when neither `--api` nor `POLYHUB_API` says otherwise: `polyhub run`'s
/// default HTTP listener.
pub(crate) const DEFAULT_API: &str = "http://127.0.0.1:8080";

/// The API client commands, flattened into `polyhub`'s top level.
#[derive(Debug, Subcommand)]
pub(crate) enum CtlCommand {
    /// Groups (customers): they own hubs.
    Group(GroupCmd),
    /// Hubs: they own devices; each running hub is ingested by its own parser.
    Hub(HubCmd),
    /// Devices: each publishes on its own channel of its hub.
    Device(DeviceCmd),
    /// Commands to devices: send one (optionally waiting for the answer), follow, list, cancel.
    Command(CommandCmd),
    /// Stored telemetry of a device: latest values, a time range, or downsampled buckets.
    Telemetry(TelemetryCmd),
    /// Messages that could not be ingested, with the reason, newest first.
    DeadLetters(DeadLettersArgs),
    /// The status of every hub parser.
    Parsers(ParsersArgs),
}

/// Where the API is and how to print its answers; accepted anywhere after the command name.
#[derive(Debug, Clone, Args)]
pub(crate) struct ApiArgs {
    /// Base URL of the polyhub REST API
    #[arg(
        long,
        global = true,
        env = "POLYHUB_API",
        default_value = DEFAULT_API,
        value_name = "URL"
    )]
    pub(crate) api: String,
    /// How to print the result: a readable table, or the API's JSON exactly
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Table)]
    pub(crate) output: OutputFormat,
}

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum OutputFormat {
    /// Aligned columns for people.
    Table,
    /// The API's JSON as received, for scripts.
    Json,
}

/// Paging of registry lists.
#[derive(Debug, Clone, Args)]
pub(crate) struct PageArgs {
    /// Start after this id (the `next` cursor of the previous page)
    #[arg(long, value_name = "ID")]
    pub(crate) after: Option<String>,
    /// At most this many items (the API's default is 100, its maximum 10000)
    #[arg(long, value_name = "N")]
    pub(crate) limit: Option<u32>,
}

/// `polyhub group ...`.
#[derive(Debug, Args)]
pub(crate) struct GroupCmd {
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    #[command(subcommand)]
    pub(crate) action: GroupAction,
}

/// What to do with groups.
#[derive(Debug, Subcommand)]
pub(crate) enum GroupAction {
    /// Create a group.
    Add {
        /// The group's id: 1 to 64 of A-Z a-z 0-9 _ . -
        id: String,
        /// Display name (default: the id)
        #[arg(long)]
        name: Option<String>,
        /// A JSON object of free-form metadata, e.g. '{"plan":"pro"}'
        #[arg(long, value_name = "JSON", value_parser = parse_json_object)]
        metadata: Option<serde_json::Value>,
    },
    /// List groups, ordered by id.
    List(PageArgs),
    /// Show one group.
    Show {
        /// The group's id
        id: String,
    },
    /// Delete a group (refused while it owns hubs).
    Rm {
        /// The group's id
        id: String,
    },
}

/// `polyhub hub ...`.
#[derive(Debug, Args)]
pub(crate) struct HubCmd {
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    #[command(subcommand)]
    pub(crate) action: HubAction,
}

/// What to do with hubs.
#[derive(Debug, Subcommand)]
pub(crate) enum HubAction {
    /// Create a hub; its parser starts at once unless --stopped.
    Add(HubAddArgs),
    /// List hubs, ordered by id.
    List {
        /// Only the hubs of this group
        #[arg(long, value_name = "ID")]
        group: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one hub.
    Show {
        /// The hub's id
        id: String,
    },
    /// Delete a hub and stop its parser (refused while it owns devices).
    Rm {
        /// The hub's id
        id: String,
    },
    /// Start the hub's parser (and keep it running across polyhub restarts).
    Start {
        /// The hub's id
        id: String,
    },
    /// Stop the hub's parser after it commits what it received; messages wait in the broker.
    Stop {
        /// The hub's id
        id: String,
    },
    /// Stop and start the hub's parser.
    Restart {
        /// The hub's id
        id: String,
    },
    /// The hub parser's status: state, pid, restarts, counters.
    Status {
        /// The hub's id
        id: String,
    },
    /// The hub parser's recent events (started, stopped, failed, restarted).
    Events {
        /// The hub's id
        id: String,
        /// At most this many events
        #[arg(long, value_name = "N")]
        limit: Option<u32>,
    },
    /// Online/offline state and last-seen time of every device of the hub.
    Presence {
        /// The hub's id
        id: String,
    },
}

/// `polyhub hub add`.
#[derive(Debug, Args)]
pub(crate) struct HubAddArgs {
    /// The hub's id: 1 to 64 of A-Z a-z 0-9 _ . -
    pub(crate) id: String,
    /// The group that owns it
    #[arg(long, value_name = "ID")]
    pub(crate) group: String,
    /// Display name (default: the id)
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// A JSON object of free-form metadata
    #[arg(long, value_name = "JSON", value_parser = parse_json_object)]
    pub(crate) metadata: Option<serde_json::Value>,
    /// How payloads become values (default: auto)
    #[arg(long, value_enum)]
    pub(crate) decoder: Option<DecoderArg>,
    /// Which topics its devices use (default: hub)
    #[arg(long, value_enum)]
    pub(crate) channels: Option<ChannelsArg>,
    /// Run its parser as a task or as its own process (default: the server's configuration)
    #[arg(long, value_enum)]
    pub(crate) isolation: Option<IsolationArg>,
    /// Create it without starting its parser
    #[arg(long)]
    pub(crate) stopped: bool,
}

/// `--decoder` (mirrors [`Decoder`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum DecoderArg {
    Auto,
    Json,
    Number,
    String,
    Boolean,
}

impl From<DecoderArg> for Decoder {
    fn from(arg: DecoderArg) -> Self {
        match arg {
            DecoderArg::Auto => Decoder::Auto,
            DecoderArg::Json => Decoder::Json,
            DecoderArg::Number => Decoder::Number,
            DecoderArg::String => Decoder::String,
            DecoderArg::Boolean => Decoder::Boolean,
        }
    }
}

/// `--channels` (mirrors [`ChannelStyle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ChannelsArg {
    Hub,
    Sgframework,
}

impl From<ChannelsArg> for ChannelStyle {
    fn from(arg: ChannelsArg) -> Self {
        match arg {
            ChannelsArg::Hub => ChannelStyle::Hub,
            ChannelsArg::Sgframework => ChannelStyle::Sgframework,
        }
    }
}

/// `--isolation` (mirrors [`Isolation`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum IsolationArg {
    Task,
    Process,
}

impl From<IsolationArg> for Isolation {
    fn from(arg: IsolationArg) -> Self {
        match arg {
            IsolationArg::Task => Isolation::Task,
            IsolationArg::Process => Isolation::Process,
        }
    }
}

/// `polyhub device ...`.
#[derive(Debug, Args)]
pub(crate) struct DeviceCmd {
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    #[command(subcommand)]
    pub(crate) action: DeviceAction,
}

/// What to do with devices.
#[derive(Debug, Subcommand)]
pub(crate) enum DeviceAction {
    /// Register a device; its hub's parser subscribes its channel before this returns.
    Add {
        /// The device's id, unique across hubs: 1 to 64 of A-Z a-z 0-9 _ . -
        id: String,
        /// The hub it belongs to
        #[arg(long, value_name = "ID")]
        hub: String,
        /// Display name (default: the id)
        #[arg(long)]
        name: Option<String>,
        /// How it is reached (default: mqtt)
        #[arg(long)]
        protocol: Option<String>,
        /// A JSON object of free-form metadata
        #[arg(long, value_name = "JSON", value_parser = parse_json_object)]
        metadata: Option<serde_json::Value>,
    },
    /// List devices, ordered by id.
    List {
        /// Only the devices of this hub
        #[arg(long, value_name = "ID")]
        hub: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one device.
    Show {
        /// The device's id
        id: String,
    },
    /// Delete a device; its hub's parser unsubscribes first.
    Rm {
        /// The device's id
        id: String,
    },
    /// Whether the device is online, and when it was last heard from.
    Presence {
        /// The device's id
        id: String,
    },
    /// Create the device's account on the server of its protocol (XMPP) and print its
    /// generated password: polyhub does not keep it, so this is the only time it is shown.
    CreateAccount {
        /// The device's id
        id: String,
    },
    /// Delete the device's account on the server of its protocol (the device stays
    /// registered).
    RemoveAccount {
        /// The device's id
        id: String,
    },
}

/// `polyhub command ...`.
#[derive(Debug, Args)]
pub(crate) struct CommandCmd {
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    #[command(subcommand)]
    pub(crate) action: CommandAction,
}

/// What to do with commands.
#[derive(Debug, Subcommand)]
pub(crate) enum CommandAction {
    /// Send a command to a device. It is stored first, then goes out in order as soon as the
    /// device is online; prints the command (after the wait, with --wait).
    Send(CommandSendArgs),
    /// Show one command: its state and when each step happened.
    Show {
        /// The command's id (cmd-...)
        id: String,
    },
    /// List a device's commands, newest first.
    List {
        /// The device's id
        device: String,
        /// Only commands in these states (comma-separated or repeated)
        #[arg(long, value_enum, value_delimiter = ',', value_name = "STATE")]
        state: Vec<CommandStateArg>,
        /// Oldest first instead
        #[arg(long)]
        oldest_first: bool,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Cancel a command that has not been acknowledged yet.
    Cancel {
        /// The command's id (cmd-...)
        id: String,
    },
}

/// `polyhub command send`.
#[derive(Debug, Args)]
pub(crate) struct CommandSendArgs {
    /// The device's id
    pub(crate) device: String,
    /// The command's name (for sgframework resources: the command signal)
    pub(crate) name: String,
    /// Its arguments as JSON, e.g. '{"rpm":1200}', 42 or '"on"' (default: null)
    #[arg(long, value_name = "JSON", value_parser = parse_json_value)]
    pub(crate) payload: Option<serde_json::Value>,
    /// Expire it if unacknowledged after this long: ms, or e.g. 500ms, 30s, 5m, 1h, 1d
    /// (default: never)
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_ms)]
    pub(crate) ttl: Option<u64>,
    /// Wait up to this long (at most 60s) for the device's answer before printing
    #[arg(long, value_name = "DURATION", value_parser = parse_wait_ms)]
    pub(crate) wait: Option<u64>,
}

/// `--state` (mirrors [`CommandState`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum CommandStateArg {
    Queued,
    Sent,
    Delivered,
    Acknowledged,
    Expired,
    Failed,
    Cancelled,
}

impl From<CommandStateArg> for CommandState {
    fn from(arg: CommandStateArg) -> Self {
        match arg {
            CommandStateArg::Queued => CommandState::Queued,
            CommandStateArg::Sent => CommandState::Sent,
            CommandStateArg::Delivered => CommandState::Delivered,
            CommandStateArg::Acknowledged => CommandState::Acknowledged,
            CommandStateArg::Expired => CommandState::Expired,
            CommandStateArg::Failed => CommandState::Failed,
            CommandStateArg::Cancelled => CommandState::Cancelled,
        }
    }
}

/// `polyhub telemetry ...`.
#[derive(Debug, Args)]
pub(crate) struct TelemetryCmd {
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    #[command(subcommand)]
    pub(crate) action: TelemetryAction,
}

/// Which telemetry to read. Times (`--from`, `--to`) are ms since the epoch or RFC 3339
/// (`2026-11-21T10:00:00Z`); the API checks them.
#[derive(Debug, Subcommand)]
pub(crate) enum TelemetryAction {
    /// The latest value of each signal of a device.
    Latest {
        /// The device's id
        device: String,
    },
    /// Stored values of a device, oldest first.
    Range(RangeArgs),
    /// Numeric values of one signal in time buckets: count, min, max, avg.
    Downsample {
        /// The device's id
        device: String,
        /// The signal to bucket
        #[arg(long)]
        signal: String,
        /// Bucket width: ms, or a duration such as 500ms, 10s, 1m, 1h, 1d
        #[arg(long, value_name = "DURATION")]
        interval: String,
        /// Start, inclusive (default: an hour before --to)
        #[arg(long, value_name = "TIME")]
        from: Option<String>,
        /// End, exclusive (default: now)
        #[arg(long, value_name = "TIME")]
        to: Option<String>,
    },
}

/// `polyhub telemetry range`.
#[derive(Debug, Args)]
pub(crate) struct RangeArgs {
    /// The device's id
    pub(crate) device: String,
    /// Only this signal
    #[arg(long)]
    pub(crate) signal: Option<String>,
    /// Start, inclusive
    #[arg(long, value_name = "TIME")]
    pub(crate) from: Option<String>,
    /// End, exclusive
    #[arg(long, value_name = "TIME")]
    pub(crate) to: Option<String>,
    /// Rows per page (the API's default is 1000, its maximum 10000)
    #[arg(long, value_name = "N")]
    pub(crate) limit: Option<u32>,
    /// Continue after this cursor (the `next` of the previous page)
    #[arg(long, value_name = "CURSOR", conflicts_with = "all")]
    pub(crate) after: Option<String>,
    /// Follow the cursors and print every row of the range
    #[arg(long)]
    pub(crate) all: bool,
}

/// `polyhub dead-letters`.
#[derive(Debug, Args)]
pub(crate) struct DeadLettersArgs {
    #[command(flatten)]
    pub(crate) api: ApiArgs,
    /// Only the dead letters of this hub
    #[arg(long, value_name = "ID")]
    pub(crate) hub: Option<String>,
    /// Only those older than this dead-letter id (the `next` cursor of the previous page)
    #[arg(long, value_name = "ID")]
    pub(crate) before: Option<String>,
    /// At most this many
    #[arg(long, value_name = "N")]
    pub(crate) limit: Option<u32>,
}

/// `polyhub parsers`.
#[derive(Debug, Args)]
pub(crate) struct ParsersArgs {
    #[command(flatten)]
    pub(crate) page: PageArgs,
    #[command(flatten)]
    pub(crate) api: ApiArgs,
}

/// `--metadata`: must be a JSON object, checked before anything is sent.
fn parse_json_object(text: &str) -> Result<serde_json::Value, String> {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(value @ serde_json::Value::Object(_)) => Ok(value),
        Ok(_) => Err("metadata must be a JSON object, e.g. '{\"site\":\"north\"}'".to_owned()),
        Err(error) => Err(format!("not valid JSON: {error}")),
    }
}

/// `--payload`: any JSON value, checked before anything is sent.
fn parse_json_value(text: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(text).map_err(|error| {
        format!("not valid JSON ({error}); quote text as a JSON string, e.g. '\"on\"'")
    })
}

/// `--ttl`: the API's duration grammar (integer ms, or a number with ms, s, m, h, d).
fn parse_duration_ms(text: &str) -> Result<u64, String> {
    let millis = polyhub_api::time::parse_duration_ms(text)?;
    u64::try_from(millis).map_err(|_| format!("duration {text:?} must be positive"))
}

/// `--wait`: a duration of at most the API's maximum wait.
fn parse_wait_ms(text: &str) -> Result<u64, String> {
    let millis = parse_duration_ms(text)?;
    if millis > polyhub_api::MAX_WAIT_MS {
        return Err(format!(
            "{text:?} is longer than the longest wait, {}s",
            polyhub_api::MAX_WAIT_MS / 1000
        ));
    }
    Ok(millis)
}

/// Runs one command against the API and prints its result on standard output.
pub(crate) async fn run(command: CtlCommand) -> Result<(), CtlError> {
    let text = exec::execute(command).await?;
    print_stdout(&text)
}

/// Writes to standard output; a closed pipe (`polyhub hub list | head -1`) is not an error.
fn print_stdout(text: &str) -> Result<(), CtlError> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(CtlError::Output(error))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests;
