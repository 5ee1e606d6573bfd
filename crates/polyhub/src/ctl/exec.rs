//! What each command asks the API and how the answer is printed.
//!
//! [`execute`] returns the text to print instead of printing it, so tests can run commands
//! against a stand-in server and compare the output.

use std::time::Duration;

use polyhub_api::{DeviceAccount, SubmitCommand};
use polyhub_store::{
    Bucket, Command, CommandState, DeadLetter, DesiredState, Device, Group, Hub, HubSettings,
    NewDevice, NewGroup, NewHub, ParserEvent, ParserStatus, Presence, RangePage, TelemetryRow,
};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::client::{ApiClient, CtlError, REQUEST_TIMEOUT, Reply};
use super::table::{Table, enum_name, fields, or_dash, timestamp, timestamp_or_dash, truncate};
use super::{
    ApiArgs, CommandAction, CommandSendArgs, CtlCommand, DeviceAction, GroupAction, HubAction,
    HubAddArgs, OutputFormat, PageArgs, RangeArgs, TelemetryAction,
};

/// `{"items": [...], "next": ...}`: registry lists, telemetry latest, events, dead letters.
#[derive(Debug, Deserialize)]
struct Items<T> {
    items: Vec<T>,
    #[serde(default)]
    next: Option<String>,
}

/// Runs `command` and returns what to print.
pub(crate) async fn execute(command: CtlCommand) -> Result<String, CtlError> {
    match command {
        CtlCommand::Group(cmd) => {
            let (client, output) = connect(&cmd.api)?;
            group(&client, output, cmd.action).await
        }
        CtlCommand::Hub(cmd) => {
            let (client, output) = connect(&cmd.api)?;
            hub(&client, output, cmd.action).await
        }
        CtlCommand::Device(cmd) => {
            let (client, output) = connect(&cmd.api)?;
            device(&client, output, cmd.action).await
        }
        CtlCommand::Command(cmd) => {
            let (client, output) = connect(&cmd.api)?;
            commands(&client, output, cmd.action).await
        }
        CtlCommand::Telemetry(cmd) => {
            let (client, output) = connect(&cmd.api)?;
            telemetry(&client, output, cmd.action).await
        }
        CtlCommand::DeadLetters(args) => {
            let (client, output) = connect(&args.api)?;
            let query = [
                ("hub", args.hub),
                ("before", args.before),
                ("limit", args.limit.map(|n| n.to_string())),
            ];
            let reply = client.get(&["dead-letters"], &query).await?;
            render(output, &reply, |page: Items<DeadLetter>| {
                dead_letters_table(&page.items) + &more_hint("--before", page.next.as_deref())
            })
        }
        CtlCommand::Parsers(args) => {
            let (client, output) = connect(&args.api)?;
            let reply = client.get(&["parsers"], &page_query(args.page)).await?;
            render(output, &reply, |page: Items<ParserStatus>| {
                parsers_table(&page.items) + &more_hint("--after", page.next.as_deref())
            })
        }
    }
}

fn connect(api: &ApiArgs) -> Result<(ApiClient, OutputFormat), CtlError> {
    Ok((ApiClient::new(&api.api)?, api.output))
}

/// JSON: the body exactly (plus a final newline); table: `table_of` the parsed body.
fn render<T: DeserializeOwned>(
    output: OutputFormat,
    reply: &Reply,
    table_of: impl FnOnce(T) -> String,
) -> Result<String, CtlError> {
    match output {
        OutputFormat::Json => Ok(json_text(&reply.body)),
        OutputFormat::Table => Ok(table_of(reply.parse()?)),
    }
}

fn json_text(body: &str) -> String {
    if body.is_empty() || body.ends_with('\n') {
        body.to_owned()
    } else {
        format!("{body}\n")
    }
}

/// A DELETE answered 204: nothing to show in JSON, a confirmation for people.
fn deleted(output: OutputFormat, reply: &Reply, what: &str, id: &str) -> String {
    match output {
        OutputFormat::Json => json_text(&reply.body),
        OutputFormat::Table => format!("deleted {what} {id}\n"),
    }
}

/// After a table whose list continues: how to ask for the next page.
fn more_hint(flag: &str, next: Option<&str>) -> String {
    next.map_or_else(String::new, |cursor| {
        format!("(more: repeat with {flag} {cursor})\n")
    })
}

fn page_query(page: PageArgs) -> [(&'static str, Option<String>); 2] {
    [
        ("after", page.after),
        ("limit", page.limit.map(|n| n.to_string())),
    ]
}

// ----- groups ----------------------------------------------------------------------------------

async fn group(
    client: &ApiClient,
    output: OutputFormat,
    action: GroupAction,
) -> Result<String, CtlError> {
    match action {
        GroupAction::Add { id, name, metadata } => {
            let body = to_json(&NewGroup { id, name, metadata })?;
            let reply = client.post(&["groups"], Some(&body)).await?;
            render(output, &reply, |group: Group| group_fields(&group))
        }
        GroupAction::List(page) => {
            let reply = client.get(&["groups"], &page_query(page)).await?;
            render(output, &reply, |page: Items<Group>| {
                let mut table = Table::new(&["ID", "NAME", "CREATED", "METADATA"]);
                for group in &page.items {
                    table.push(vec![
                        group.id.clone(),
                        group.name.clone(),
                        timestamp(group.created_at),
                        group.metadata.to_string(),
                    ]);
                }
                table.render() + &more_hint("--after", page.next.as_deref())
            })
        }
        GroupAction::Show { id } => {
            let reply = client.get(&["groups", &id], &[]).await?;
            render(output, &reply, |group: Group| group_fields(&group))
        }
        GroupAction::Rm { id } => {
            let reply = client.delete(&["groups", &id]).await?;
            Ok(deleted(output, &reply, "group", &id))
        }
    }
}

fn group_fields(group: &Group) -> String {
    fields(&[
        ("id", group.id.clone()),
        ("name", group.name.clone()),
        ("metadata", group.metadata.to_string()),
        ("created", timestamp(group.created_at)),
        ("updated", timestamp(group.updated_at)),
    ])
}

// ----- hubs ------------------------------------------------------------------------------------

async fn hub(
    client: &ApiClient,
    output: OutputFormat,
    action: HubAction,
) -> Result<String, CtlError> {
    match action {
        HubAction::Add(args) => {
            let body = to_json(&new_hub(args))?;
            let reply = client.post(&["hubs"], Some(&body)).await?;
            render(output, &reply, |hub: Hub| hub_fields(&hub))
        }
        HubAction::List { group, page } => {
            let [after, limit] = page_query(page);
            let reply = client
                .get(&["hubs"], &[("group", group), after, limit])
                .await?;
            render(output, &reply, |page: Items<Hub>| {
                let mut table = Table::new(&[
                    "ID",
                    "GROUP",
                    "NAME",
                    "DESIRED",
                    "DECODER",
                    "CHANNELS",
                    "ISOLATION",
                ]);
                for hub in &page.items {
                    table.push(vec![
                        hub.id.clone(),
                        hub.group_id.clone(),
                        hub.name.clone(),
                        enum_name(&hub.desired_state),
                        enum_name(&hub.settings.decoder),
                        enum_name(&hub.settings.channels),
                        isolation_name(&hub.settings),
                    ]);
                }
                table.render() + &more_hint("--after", page.next.as_deref())
            })
        }
        HubAction::Show { id } => {
            let reply = client.get(&["hubs", &id], &[]).await?;
            render(output, &reply, |hub: Hub| hub_fields(&hub))
        }
        HubAction::Rm { id } => {
            let reply = client.delete(&["hubs", &id]).await?;
            Ok(deleted(output, &reply, "hub", &id))
        }
        HubAction::Start { id } => parser_action(client, output, &id, "start").await,
        HubAction::Stop { id } => parser_action(client, output, &id, "stop").await,
        HubAction::Restart { id } => parser_action(client, output, &id, "restart").await,
        HubAction::Status { id } => {
            let reply = client.get(&["hubs", &id, "parser"], &[]).await?;
            render(output, &reply, |status: ParserStatus| {
                parser_fields(&status)
            })
        }
        HubAction::Events { id, limit } => {
            let query = [("limit", limit.map(|n| n.to_string()))];
            let reply = client
                .get(&["hubs", &id, "parser", "events"], &query)
                .await?;
            render(output, &reply, |page: Items<ParserEvent>| {
                let mut table = Table::new(&["ID", "TIME", "KIND", "REASON"]);
                for event in &page.items {
                    table.push(vec![
                        event.id.to_string(),
                        timestamp(event.at),
                        enum_name(&event.kind),
                        or_dash(event.reason.as_deref()),
                    ]);
                }
                table.render()
            })
        }
        HubAction::Presence { id } => {
            let reply = client.get(&["hubs", &id, "presence"], &[]).await?;
            render(output, &reply, |page: Items<Presence>| {
                presence_table(&page.items)
            })
        }
    }
}

fn new_hub(args: HubAddArgs) -> NewHub {
    NewHub {
        id: args.id,
        group_id: args.group,
        name: args.name,
        metadata: args.metadata,
        settings: HubSettings {
            decoder: args.decoder.map(Into::into).unwrap_or_default(),
            channels: args.channels.map(Into::into).unwrap_or_default(),
            isolation: args.isolation.map(Into::into),
        },
        desired_state: if args.stopped {
            DesiredState::Stopped
        } else {
            DesiredState::Running
        },
    }
}

/// `start`, `stop`, `restart`: POST /hubs/{id}/{action} → ParserStatus.
async fn parser_action(
    client: &ApiClient,
    output: OutputFormat,
    id: &str,
    action: &str,
) -> Result<String, CtlError> {
    let reply = client.post(&["hubs", id, action], None).await?;
    render(output, &reply, |status: ParserStatus| {
        parser_fields(&status)
    })
}

fn isolation_name(settings: &HubSettings) -> String {
    settings
        .isolation
        .as_ref()
        .map_or_else(|| "default".to_owned(), enum_name)
}

fn hub_fields(hub: &Hub) -> String {
    fields(&[
        ("id", hub.id.clone()),
        ("group", hub.group_id.clone()),
        ("name", hub.name.clone()),
        ("desired_state", enum_name(&hub.desired_state)),
        ("decoder", enum_name(&hub.settings.decoder)),
        ("channels", enum_name(&hub.settings.channels)),
        ("isolation", isolation_name(&hub.settings)),
        ("metadata", hub.metadata.to_string()),
        ("created", timestamp(hub.created_at)),
        ("updated", timestamp(hub.updated_at)),
    ])
}

fn parser_fields(status: &ParserStatus) -> String {
    fields(&[
        ("hub", status.hub_id.clone()),
        ("state", enum_name(&status.state)),
        ("since", timestamp(status.since)),
        ("isolation", enum_name(&status.isolation)),
        ("pid", or_dash(status.pid)),
        ("restarts", status.restarts.to_string()),
        ("last_error", or_dash(status.last_error.as_deref())),
        ("devices", status.devices.to_string()),
        ("messages_in", status.messages_in.to_string()),
        ("rows_written", status.rows_written.to_string()),
        ("dead_letters", status.dead_letters.to_string()),
        ("duplicates_skipped", status.duplicates_skipped.to_string()),
        (
            "last_batch_messages",
            status.last_batch_messages.to_string(),
        ),
        ("last_lag_ms", status.last_lag_ms.to_string()),
    ])
}

fn parsers_table(statuses: &[ParserStatus]) -> String {
    let mut table = Table::new(&[
        "HUB",
        "STATE",
        "ISOLATION",
        "PID",
        "RESTARTS",
        "DEVICES",
        "MESSAGES",
        "ROWS",
        "DEAD",
        "DUPLICATES",
        "LAG_MS",
        "LAST_ERROR",
    ]);
    for status in statuses {
        table.push(vec![
            status.hub_id.clone(),
            enum_name(&status.state),
            enum_name(&status.isolation),
            or_dash(status.pid),
            status.restarts.to_string(),
            status.devices.to_string(),
            status.messages_in.to_string(),
            status.rows_written.to_string(),
            status.dead_letters.to_string(),
            status.duplicates_skipped.to_string(),
            status.last_lag_ms.to_string(),
            truncate(status.last_error.as_deref().unwrap_or("-"), 60),
        ]);
    }
    table.render()
}

// ----- devices ---------------------------------------------------------------------------------

async fn device(
    client: &ApiClient,
    output: OutputFormat,
    action: DeviceAction,
) -> Result<String, CtlError> {
    match action {
        DeviceAction::Add {
            id,
            hub,
            name,
            protocol,
            metadata,
        } => {
            let body = to_json(&NewDevice {
                id,
                hub_id: hub,
                name,
                protocol,
                metadata,
            })?;
            let reply = client.post(&["devices"], Some(&body)).await?;
            render(output, &reply, |device: Device| device_fields(&device))
        }
        DeviceAction::List { hub, page } => {
            let [after, limit] = page_query(page);
            let reply = client
                .get(&["devices"], &[("hub", hub), after, limit])
                .await?;
            render(output, &reply, |page: Items<Device>| {
                let mut table = Table::new(&["ID", "HUB", "NAME", "PROTOCOL", "METADATA"]);
                for device in &page.items {
                    table.push(vec![
                        device.id.clone(),
                        device.hub_id.clone(),
                        device.name.clone(),
                        device.protocol.clone(),
                        device.metadata.to_string(),
                    ]);
                }
                table.render() + &more_hint("--after", page.next.as_deref())
            })
        }
        DeviceAction::Show { id } => {
            let reply = client.get(&["devices", &id], &[]).await?;
            render(output, &reply, |device: Device| device_fields(&device))
        }
        DeviceAction::Rm { id } => {
            let reply = client.delete(&["devices", &id]).await?;
            Ok(deleted(output, &reply, "device", &id))
        }
        DeviceAction::Presence { id } => {
            let reply = client.get(&["devices", &id, "presence"], &[]).await?;
            render(output, &reply, |presence: Presence| {
                presence_table(std::slice::from_ref(&presence))
            })
        }
        DeviceAction::CreateAccount { id } => {
            let reply = client.post(&["devices", &id, "account"], None).await?;
            render(output, &reply, |account: DeviceAccount| {
                fields(&[
                    ("username", account.username.clone()),
                    ("password", account.password.clone()),
                ])
            })
        }
        DeviceAction::RemoveAccount { id } => {
            let reply = client.delete(&["devices", &id, "account"]).await?;
            Ok(deleted(output, &reply, "the account of device", &id))
        }
    }
}

fn device_fields(device: &Device) -> String {
    fields(&[
        ("id", device.id.clone()),
        ("hub", device.hub_id.clone()),
        ("name", device.name.clone()),
        ("protocol", device.protocol.clone()),
        ("metadata", device.metadata.to_string()),
        ("created", timestamp(device.created_at)),
        ("updated", timestamp(device.updated_at)),
    ])
}

fn presence_table(items: &[Presence]) -> String {
    let mut table = Table::new(&["DEVICE", "STATE", "LAST_SEEN", "CHANGED"]);
    for presence in items {
        table.push(vec![
            presence.device_id.clone(),
            if presence.online { "online" } else { "offline" }.to_owned(),
            timestamp_or_dash(presence.last_seen),
            timestamp_or_dash(presence.changed_at),
        ]);
    }
    table.render()
}

// ----- commands --------------------------------------------------------------------------------

async fn commands(
    client: &ApiClient,
    output: OutputFormat,
    action: CommandAction,
) -> Result<String, CtlError> {
    match action {
        CommandAction::Send(args) => send_command(client, output, args).await,
        CommandAction::Show { id } => {
            let reply = client.get(&["commands", &id], &[]).await?;
            render(output, &reply, |command: Command| command_fields(&command))
        }
        CommandAction::List {
            device,
            state,
            oldest_first,
            page,
        } => {
            let states: Vec<String> = state
                .into_iter()
                .map(|arg| enum_name(&CommandState::from(arg)))
                .collect();
            let [after, limit] = page_query(page);
            let query = [
                ("state", (!states.is_empty()).then(|| states.join(","))),
                ("order", oldest_first.then(|| "asc".to_owned())),
                after,
                limit,
            ];
            let reply = client
                .get(&["devices", &device, "commands"], &query)
                .await?;
            render(output, &reply, |page: Items<Command>| {
                commands_table(&page.items) + &more_hint("--after", page.next.as_deref())
            })
        }
        CommandAction::Cancel { id } => {
            let reply = client.post(&["commands", &id, "cancel"], None).await?;
            render(output, &reply, |command: Command| command_fields(&command))
        }
    }
}

/// The request body of `command send`: `--ttl` and `--wait` become `ttl_ms` and `wait_ms`.
pub(crate) fn submit_body(args: &CommandSendArgs) -> SubmitCommand {
    SubmitCommand {
        name: args.name.clone(),
        payload: args.payload.clone().unwrap_or(serde_json::Value::Null),
        ttl_ms: args.ttl,
        wait_ms: args.wait,
    }
}

async fn send_command(
    client: &ApiClient,
    output: OutputFormat,
    args: CommandSendArgs,
) -> Result<String, CtlError> {
    let body = to_json(&submit_body(&args))?;
    // The API holds the request open for up to the wait; the usual limit then comes on top.
    let timeout = REQUEST_TIMEOUT + Duration::from_millis(args.wait.unwrap_or(0));
    let url = client.url(&["devices", &args.device, "commands"], &[]);
    let reply = client
        .send_with_timeout(reqwest::Method::POST, url, Some(&body), timeout)
        .await?;
    render(output, &reply, |command: Command| command_fields(&command))
}

/// One command as `name: value` lines, every step's time included.
pub(crate) fn command_fields(command: &Command) -> String {
    fields(&[
        ("id", command.id.clone()),
        ("device", command.device_id.clone()),
        ("hub", command.hub_id.clone()),
        ("protocol", command.protocol.clone()),
        ("name", command.name.clone()),
        ("payload", command.payload.to_string()),
        ("state", enum_name(&command.state)),
        ("seq", command.seq.to_string()),
        ("attempts", command.attempts.to_string()),
        ("created", timestamp(command.created_at)),
        ("expires", timestamp_or_dash(command.expires_at)),
        ("sent", timestamp_or_dash(command.sent_at)),
        ("delivered", timestamp_or_dash(command.delivered_at)),
        ("acknowledged", timestamp_or_dash(command.acknowledged_at)),
        ("finished", timestamp_or_dash(command.finished_at)),
        ("reason", or_dash(command.reason.as_deref())),
        ("reply", or_dash(command.reply.as_ref())),
    ])
}

/// Commands one per line; OUTCOME is the reply, else the reason, else `-`.
pub(crate) fn commands_table(commands: &[Command]) -> String {
    let mut table = Table::new(&[
        "ID", "SEQ", "NAME", "STATE", "CREATED", "ATTEMPTS", "PAYLOAD", "OUTCOME",
    ]);
    for command in commands {
        let outcome = match (&command.reply, &command.reason) {
            (Some(reply), _) => reply.to_string(),
            (None, Some(reason)) => reason.clone(),
            (None, None) => "-".to_owned(),
        };
        table.push(vec![
            command.id.clone(),
            command.seq.to_string(),
            command.name.clone(),
            enum_name(&command.state),
            timestamp(command.created_at),
            command.attempts.to_string(),
            truncate(&command.payload.to_string(), 40),
            truncate(&outcome, 60),
        ]);
    }
    table.render()
}

// ----- telemetry -------------------------------------------------------------------------------

async fn telemetry(
    client: &ApiClient,
    output: OutputFormat,
    action: TelemetryAction,
) -> Result<String, CtlError> {
    match action {
        TelemetryAction::Latest { device } => {
            let reply = client
                .get(&["devices", &device, "telemetry", "latest"], &[])
                .await?;
            render(output, &reply, |page: Items<TelemetryRow>| {
                rows_table(&page.items)
            })
        }
        TelemetryAction::Range(args) => range(client, output, args).await,
        TelemetryAction::Downsample {
            device,
            signal,
            interval,
            from,
            to,
        } => {
            let query = [
                ("signal", Some(signal)),
                ("from", from),
                ("to", to),
                ("interval", Some(interval)),
            ];
            let reply = client
                .get(&["devices", &device, "telemetry", "downsample"], &query)
                .await?;
            render(output, &reply, |page: Items<Bucket>| {
                let mut table = Table::new(&["START", "COUNT", "MIN", "MAX", "AVG"]);
                for bucket in &page.items {
                    table.push(vec![
                        timestamp(bucket.start),
                        bucket.count.to_string(),
                        bucket.min.to_string(),
                        bucket.max.to_string(),
                        bucket.avg.to_string(),
                    ]);
                }
                table.render()
            })
        }
    }
}

/// One page, or with `--all` every page merged into one `{"rows": [...], "next": null}`.
async fn range(
    client: &ApiClient,
    output: OutputFormat,
    args: RangeArgs,
) -> Result<String, CtlError> {
    let segments = ["devices", args.device.as_str(), "telemetry"];
    let query = |after: Option<String>| {
        [
            ("signal", args.signal.clone()),
            ("from", args.from.clone()),
            ("to", args.to.clone()),
            ("limit", args.limit.map(|n| n.to_string())),
            ("after", after),
        ]
    };
    if !args.all {
        let reply = client.get(&segments, &query(args.after.clone())).await?;
        return render(output, &reply, |page: RangePage| {
            rows_table(&page.rows) + &more_hint("--after", page.next.as_deref())
        });
    }
    // Rows are kept as JSON values so that `--output json` repeats the API's rows unchanged.
    let mut rows: Vec<serde_json::Value> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let reply = client.get(&segments, &query(cursor.clone())).await?;
        let page: RawRangePage = reply.parse()?;
        rows.extend(page.rows);
        match page.next {
            None => break,
            Some(next) if cursor.as_deref() == Some(next.as_str()) => {
                return Err(CtlError::CursorLoop {
                    url: reply.url.to_string(),
                    cursor: next,
                });
            }
            Some(next) => cursor = Some(next),
        }
    }
    match output {
        OutputFormat::Json => {
            let merged = serde_json::json!({ "rows": rows, "next": null });
            Ok(json_text(&merged.to_string()))
        }
        OutputFormat::Table => {
            let typed: Vec<TelemetryRow> = serde_json::from_value(serde_json::Value::Array(rows))
                .map_err(|error| CtlError::UnexpectedResponse {
                url: client.url(&segments, &[]).to_string(),
                detail: error.to_string(),
            })?;
            Ok(rows_table(&typed))
        }
    }
}

/// A range page whose rows are left as JSON.
#[derive(Debug, Deserialize)]
struct RawRangePage {
    rows: Vec<serde_json::Value>,
    next: Option<String>,
}

fn rows_table(rows: &[TelemetryRow]) -> String {
    let mut table = Table::new(&["DEVICE", "SIGNAL", "TIME", "VALUE"]);
    for row in rows {
        table.push(vec![
            row.device_id.clone(),
            row.signal.clone(),
            timestamp(row.ts),
            row.value.to_string(),
        ]);
    }
    table.render()
}

// ----- dead letters ----------------------------------------------------------------------------

fn dead_letters_table(items: &[DeadLetter]) -> String {
    let mut table = Table::new(&["ID", "TIME", "HUB", "DEVICE", "TOPIC", "REASON", "PAYLOAD"]);
    for letter in items {
        table.push(vec![
            letter.id.to_string(),
            timestamp(letter.received_at),
            letter.hub_id.clone(),
            or_dash(letter.device_id.as_deref()),
            letter.topic.clone(),
            letter.reason.clone(),
            truncate(&letter.payload, 40),
        ]);
    }
    table.render()
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<serde_json::Value, CtlError> {
    // Our request types always encode (string keys only); the error path exists so that it
    // is never a panic.
    serde_json::to_value(value).map_err(CtlError::Encode)
}
