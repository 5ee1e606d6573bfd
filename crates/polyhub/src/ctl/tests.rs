//! Tests of the CLI: argument parsing, and whole commands against a stand-in API server that
//! records what it was asked.

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

use super::exec::execute;
use super::*;

/// A stand-in for `polyhub`'s top level, which flattens [`CtlCommand`] the same way.
#[derive(Debug, Parser)]
#[command(name = "polyhub")]
struct TestCli {
    #[command(subcommand)]
    command: TopLevel,
}

#[derive(Debug, Subcommand)]
enum TopLevel {
    #[command(flatten)]
    Ctl(CtlCommand),
}

fn parse(args: &[&str]) -> Result<CtlCommand, clap::Error> {
    TestCli::try_parse_from(std::iter::once("polyhub").chain(args.iter().copied())).map(|cli| {
        match cli.command {
            TopLevel::Ctl(command) => command,
        }
    })
}

fn parsed(args: &[&str]) -> CtlCommand {
    parse(args).unwrap_or_else(|error| panic!("{args:?} did not parse: {error}"))
}

// ----- argument parsing ------------------------------------------------------------------------

#[test]
fn hub_add_takes_every_setting() {
    let command = parsed(&[
        "hub",
        "add",
        "h1",
        "--group",
        "g1",
        "--name",
        "Boiler house",
        "--decoder",
        "number",
        "--channels",
        "sgframework",
        "--isolation",
        "process",
        "--stopped",
        "--metadata",
        r#"{"site":"north"}"#,
    ]);
    let CtlCommand::Hub(HubCmd {
        api,
        action: HubAction::Add(args),
    }) = command
    else {
        panic!("parsed as {command:?}");
    };
    assert_eq!(api.output, OutputFormat::Table);
    assert_eq!(args.id, "h1");
    assert_eq!(args.group, "g1");
    assert_eq!(args.name.as_deref(), Some("Boiler house"));
    assert_eq!(args.decoder, Some(DecoderArg::Number));
    assert_eq!(args.channels, Some(ChannelsArg::Sgframework));
    assert_eq!(args.isolation, Some(IsolationArg::Process));
    assert!(args.stopped);
    assert_eq!(args.metadata, Some(json!({"site": "north"})));
}

#[test]
fn api_and_output_are_accepted_before_and_after_the_action() {
    for args in [
        &[
            "device",
            "--api",
            "http://10.0.0.1:9",
            "--output",
            "json",
            "list",
        ][..],
        &[
            "device",
            "list",
            "--api",
            "http://10.0.0.1:9",
            "--output",
            "json",
        ][..],
    ] {
        let CtlCommand::Device(DeviceCmd { api, action }) = parsed(args) else {
            panic!("{args:?}");
        };
        assert_eq!(api.api, "http://10.0.0.1:9", "{args:?}");
        assert_eq!(api.output, OutputFormat::Json, "{args:?}");
        assert!(matches!(action, DeviceAction::List { hub: None, .. }));
    }
    let CtlCommand::Parsers(ParsersArgs { api, .. }) = parsed(&["parsers", "--output", "json"])
    else {
        panic!("parsers");
    };
    assert_eq!(api.output, OutputFormat::Json);
}

#[test]
fn the_api_defaults_to_the_local_listener() {
    // Only meaningful when the caller's environment does not choose an API.
    if std::env::var_os("POLYHUB_API").is_some() {
        return;
    }
    let CtlCommand::Group(GroupCmd { api, .. }) = parsed(&["group", "list"]) else {
        panic!("group list");
    };
    assert_eq!(api.api, DEFAULT_API);
}

#[test]
fn telemetry_commands_parse_their_queries() {
    let CtlCommand::Telemetry(TelemetryCmd {
        action: TelemetryAction::Range(range),
        ..
    }) = parsed(&[
        "telemetry",
        "range",
        "d1",
        "--signal",
        "temp",
        "--from",
        "1000",
        "--to",
        "2026-11-21T10:00:00Z",
        "--limit",
        "50",
        "--all",
    ])
    else {
        panic!("range");
    };
    assert_eq!(range.device, "d1");
    assert_eq!(range.signal.as_deref(), Some("temp"));
    assert_eq!(range.from.as_deref(), Some("1000"));
    assert_eq!(range.to.as_deref(), Some("2026-11-21T10:00:00Z"));
    assert_eq!(range.limit, Some(50));
    assert!(range.all);

    let CtlCommand::Telemetry(TelemetryCmd {
        action: TelemetryAction::Downsample {
            signal, interval, ..
        },
        ..
    }) = parsed(&[
        "telemetry",
        "downsample",
        "d1",
        "--signal",
        "t",
        "--interval",
        "1m",
    ])
    else {
        panic!("downsample");
    };
    assert_eq!((signal.as_str(), interval.as_str()), ("t", "1m"));
}

#[test]
fn bad_arguments_are_usage_errors() {
    for args in [
        &["hub", "add", "h1"][..],                                     // no --group
        &["hub", "add", "h1", "--group", "g", "--decoder", "xml"][..], // unknown decoder
        &["group", "add", "g", "--metadata", "[1]"][..],               // not an object
        &["group", "add", "g", "--metadata", "{oops"][..],             // not JSON
        &["telemetry", "downsample", "d1", "--signal", "t"][..],       // no --interval
        &["telemetry", "range", "d1", "--all", "--after", "c"][..],    // contradictory
        &["group", "list", "--output", "yaml"][..],
        &["dead-letters", "--limit", "-3"][..],
    ] {
        let error = parse(args).expect_err(&format!("{args:?} parsed"));
        assert_ne!(
            error.kind(),
            clap::error::ErrorKind::DisplayHelp,
            "{args:?}: {error}"
        );
    }
}

#[test]
fn metadata_must_be_a_json_object() {
    assert_eq!(parse_json_object(r#"{"a":1}"#), Ok(json!({"a": 1})));
    assert!(parse_json_object("3").unwrap_err().contains("JSON object"));
    assert!(
        parse_json_object("{")
            .unwrap_err()
            .contains("not valid JSON")
    );
}

// ----- whole commands against a stand-in API -------------------------------------------------

/// What the stand-in server saw: method, path with query, body.
type Seen = Arc<Mutex<Vec<(String, String, Value)>>>;

fn record(seen: &Seen, method: &Method, uri: &Uri, body: Value) {
    seen.lock()
        .unwrap()
        .push((method.to_string(), uri.to_string(), body));
}

fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}

/// Serves a few routes the way the real API does; returns its base URL.
async fn stand_in_api(seen: Seen) -> String {
    async fn create_hub(
        State(seen): State<Seen>,
        method: Method,
        uri: Uri,
        Json(body): Json<Value>,
    ) -> Response {
        record(&seen, &method, &uri, body.clone());
        if body["id"] == "taken" {
            return error_response(StatusCode::CONFLICT, "conflict", "hub \"taken\" exists");
        }
        let hub = json!({
            "id": body["id"], "group_id": body["group_id"], "name": body["id"],
            "metadata": {}, "settings": {"decoder": "number", "channels": "hub", "isolation": null},
            "desired_state": "stopped", "created_at": 0, "updated_at": 0,
        });
        (StatusCode::CREATED, Json(hub)).into_response()
    }
    async fn list_groups(State(seen): State<Seen>, method: Method, uri: Uri) -> Json<Value> {
        record(&seen, &method, &uri, Value::Null);
        Json(json!({"items": [
            {"id": "g1", "name": "Acme", "metadata": {"plan": "pro"},
             "created_at": 1_795_255_200_000_i64, "updated_at": 1_795_255_200_000_i64},
        ], "next": "g1"}))
    }
    async fn delete_group(State(seen): State<Seen>, method: Method, uri: Uri) -> StatusCode {
        record(&seen, &method, &uri, Value::Null);
        StatusCode::NO_CONTENT
    }
    async fn get_hub(Path(id): Path<String>) -> Response {
        error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("hub {id:?} not found"),
        )
    }
    async fn range(
        State(seen): State<Seen>,
        Path(device): Path<String>,
        method: Method,
        uri: Uri,
        Query(query): Query<std::collections::HashMap<String, String>>,
    ) -> Json<Value> {
        record(&seen, &method, &uri, Value::Null);
        let row = |ts: i64, value: Value| json!({"device_id": "d1", "signal": "t", "ts": ts, "value": value});
        if device == "looping" {
            return Json(json!({"rows": [], "next": "loop"}));
        }
        match query.get("after").map(String::as_str) {
            None => Json(
                json!({"rows": [row(1000, json!(1.5)), row(2000, json!("on\nline"))], "next": "c2"}),
            ),
            Some(_) => Json(json!({"rows": [row(3000, json!(true))], "next": null})),
        }
    }
    async fn start_hub(Path(id): Path<String>) -> Json<Value> {
        Json(json!({
            "hub_id": id, "state": "running", "isolation": "process", "pid": 4242,
            "restarts": 2, "last_error": "child exited with signal 9", "since": 0,
            "devices": 3, "messages_in": 10, "rows_written": 20, "dead_letters": 1,
            "duplicates_skipped": 0, "last_batch_messages": 4, "last_lag_ms": 7,
        }))
    }

    async fn submit_command(
        State(seen): State<Seen>,
        Path(device): Path<String>,
        method: Method,
        uri: Uri,
        Json(body): Json<Value>,
    ) -> Response {
        record(&seen, &method, &uri, body.clone());
        let mut command = sample_command_json();
        command["device_id"] = json!(device);
        command["name"] = body["name"].clone();
        command["payload"] = body["payload"].clone();
        (StatusCode::CREATED, Json(command)).into_response()
    }
    async fn list_commands(State(seen): State<Seen>, method: Method, uri: Uri) -> Json<Value> {
        record(&seen, &method, &uri, Value::Null);
        Json(json!({"items": [sample_command_json()], "next": "cmd-01"}))
    }
    async fn cancel_command(Path(id): Path<String>) -> Response {
        error_response(
            StatusCode::CONFLICT,
            "conflict",
            &format!("command {id:?} is acknowledged"),
        )
    }

    async fn create_account(Path(id): Path<String>) -> Response {
        (
            StatusCode::CREATED,
            Json(json!({"username": format!("{id}@localhost"), "password": "s3cret"})),
        )
            .into_response()
    }
    async fn remove_account(State(seen): State<Seen>, method: Method, uri: Uri) -> StatusCode {
        record(&seen, &method, &uri, Value::Null);
        StatusCode::NO_CONTENT
    }

    let app = axum::Router::new()
        .route(
            "/devices/{id}/account",
            post(create_account).delete(remove_account),
        )
        .route(
            "/devices/{id}/commands",
            post(submit_command).get(list_commands),
        )
        .route("/commands/{id}/cancel", post(cancel_command))
        .route("/groups", get(list_groups))
        .route("/groups/{id}", axum::routing::delete(delete_group))
        .route("/hubs", post(create_hub))
        .route("/hubs/{id}", get(get_hub))
        .route("/hubs/{id}/start", post(start_hub))
        .route("/devices/{id}/telemetry", get(range))
        .with_state(seen);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{address}")
}

async fn run_against(api: &str, args: &[&str]) -> Result<String, CtlError> {
    let mut full: Vec<&str> = args.to_vec();
    full.extend(["--api", api]);
    execute(parsed(&full)).await
}

#[tokio::test]
async fn hub_add_posts_the_new_hub_and_prints_it() {
    let seen = Seen::default();
    let api = stand_in_api(seen.clone()).await;
    let text = run_against(
        &api,
        &[
            "hub",
            "add",
            "h1",
            "--group",
            "g1",
            "--decoder",
            "number",
            "--stopped",
        ],
    )
    .await
    .unwrap();
    assert!(text.contains("id:             h1\n"), "{text}");
    assert!(text.contains("desired_state:  stopped\n"), "{text}");
    assert!(text.contains("isolation:      default\n"), "{text}");
    let requests = seen.lock().unwrap().clone();
    assert_eq!(requests.len(), 1);
    let (method, uri, body) = &requests[0];
    assert_eq!((method.as_str(), uri.as_str()), ("POST", "/hubs"));
    assert_eq!(
        body,
        &json!({
            "id": "h1", "group_id": "g1", "name": null, "metadata": null,
            "settings": {"decoder": "number", "channels": "hub", "isolation": null},
            "desired_state": "stopped",
        })
    );
}

#[tokio::test]
async fn api_errors_carry_message_code_and_status() {
    let api = stand_in_api(Seen::default()).await;
    let error = run_against(&api, &["hub", "show", "h9"]).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        r#"hub "h9" not found (not_found, HTTP 404)"#
    );
    let error = run_against(&api, &["hub", "add", "taken", "--group", "g"])
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        r#"hub "taken" exists (conflict, HTTP 409)"#
    );
}

#[tokio::test]
async fn json_output_is_the_api_body_and_tables_are_readable() {
    let seen = Seen::default();
    let api = stand_in_api(seen.clone()).await;
    let json_text = run_against(&api, &["group", "list", "--limit", "1", "--output", "json"])
        .await
        .unwrap();
    let expected = json!({"items": [
        {"id": "g1", "name": "Acme", "metadata": {"plan": "pro"},
         "created_at": 1_795_255_200_000_i64, "updated_at": 1_795_255_200_000_i64},
    ], "next": "g1"});
    assert_eq!(serde_json::from_str::<Value>(&json_text).unwrap(), expected);
    assert!(json_text.ends_with("}\n"));

    let table = run_against(&api, &["group", "list"]).await.unwrap();
    assert_eq!(
        table,
        "ID  NAME  CREATED                   METADATA\n\
         g1  Acme  2026-11-21T10:00:00.000Z  {\"plan\":\"pro\"}\n\
         (more: repeat with --after g1)\n"
    );
    let uris: Vec<String> = seen.lock().unwrap().iter().map(|r| r.1.clone()).collect();
    assert_eq!(uris, ["/groups?limit=1", "/groups"]);
}

#[tokio::test]
async fn range_all_follows_cursors_and_merges_pages() {
    let seen = Seen::default();
    let api = stand_in_api(seen.clone()).await;
    let text = run_against(
        &api,
        &[
            "telemetry",
            "range",
            "d1",
            "--signal",
            "t",
            "--all",
            "--output",
            "json",
        ],
    )
    .await
    .unwrap();
    let merged: Value = serde_json::from_str(&text).unwrap();
    let timestamps: Vec<i64> = merged["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["ts"].as_i64().unwrap())
        .collect();
    assert_eq!(timestamps, [1000, 2000, 3000]);
    assert_eq!(merged["next"], Value::Null);
    let uris: Vec<String> = seen.lock().unwrap().iter().map(|r| r.1.clone()).collect();
    assert_eq!(
        uris,
        [
            "/devices/d1/telemetry?signal=t",
            "/devices/d1/telemetry?signal=t&after=c2"
        ]
    );

    let table = run_against(&api, &["telemetry", "range", "d1", "--all"])
        .await
        .unwrap();
    assert_eq!(
        table,
        "DEVICE  SIGNAL  TIME                      VALUE\n\
         d1      t       1970-01-01T00:00:01.000Z  1.5\n\
         d1      t       1970-01-01T00:00:02.000Z  on\\nline\n\
         d1      t       1970-01-01T00:00:03.000Z  true\n"
    );
}

#[tokio::test]
async fn a_cursor_that_repeats_is_an_error_not_a_hang() {
    let api = stand_in_api(Seen::default()).await;
    // The stand-in answers every page of device "looping" with the cursor "loop".
    let error = run_against(&api, &["telemetry", "range", "looping", "--all"])
        .await
        .unwrap_err();
    assert!(
        matches!(error, CtlError::CursorLoop { ref cursor, .. } if cursor == "loop"),
        "{error}"
    );
}

#[tokio::test]
async fn delete_and_parser_actions_print_confirmations() {
    let seen = Seen::default();
    let api = stand_in_api(seen.clone()).await;
    assert_eq!(
        run_against(&api, &["group", "rm", "g1"]).await.unwrap(),
        "deleted group g1\n"
    );
    assert_eq!(
        run_against(&api, &["group", "rm", "g1", "--output", "json"])
            .await
            .unwrap(),
        ""
    );
    let status = run_against(&api, &["hub", "start", "h1"]).await.unwrap();
    assert!(
        status.contains("state:                running\n"),
        "{status}"
    );
    assert!(status.contains("pid:                  4242\n"), "{status}");
    assert!(
        status.contains("last_error:           child exited with signal 9\n"),
        "{status}"
    );
    let methods: Vec<String> = seen.lock().unwrap().iter().map(|r| r.0.clone()).collect();
    assert_eq!(methods, ["DELETE", "DELETE"]);
}

#[tokio::test]
async fn device_accounts_are_created_with_their_password_shown_and_removed() {
    let seen = Seen::default();
    let api = stand_in_api(seen.clone()).await;
    let created = run_against(&api, &["device", "create-account", "x1"])
        .await
        .unwrap();
    assert!(created.contains("x1@localhost"), "{created}");
    assert!(created.contains("s3cret"), "{created}");
    assert_eq!(
        run_against(&api, &["device", "remove-account", "x1"])
            .await
            .unwrap(),
        "deleted the account of device x1\n"
    );
    let requests: Vec<(String, String)> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|r| (r.0.clone(), r.1.clone()))
        .collect();
    assert_eq!(
        requests,
        [("DELETE".to_owned(), "/devices/x1/account".to_owned())]
    );
}

#[tokio::test]
async fn an_unreachable_api_gets_advice() {
    // A port that was free a moment ago: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let api = format!("http://{address}");
    let error = run_against(&api, &["parsers"]).await.unwrap_err();
    assert_eq!(
        error.to_string(),
        format!("cannot reach the polyhub API at {api}: is `polyhub run` running?")
    );
}

// ----- commands --------------------------------------------------------------------------------

/// An acknowledged command as the API serialises it.
fn sample_command_json() -> Value {
    json!({
        "id": "cmd-01", "device_id": "d1", "hub_id": "h1", "protocol": "mqtt",
        "name": "set_speed", "payload": {"rpm": 1200}, "seq": 3, "state": "acknowledged",
        "created_at": 1_795_255_200_000_i64, "expires_at": 1_795_255_230_000_i64,
        "sent_at": 1_795_255_200_002_i64, "delivered_at": null,
        "acknowledged_at": 1_795_255_200_010_i64, "finished_at": null, "reason": null,
        "reply": {"ok": true}, "attempts": 1,
    })
}

fn sample_command() -> polyhub_store::Command {
    serde_json::from_value(sample_command_json()).unwrap()
}

fn send_args(args: &[&str]) -> CommandSendArgs {
    let mut full = vec!["command", "send"];
    full.extend_from_slice(args);
    match parsed(&full) {
        CtlCommand::Command(CommandCmd {
            action: CommandAction::Send(send),
            ..
        }) => send,
        other => panic!("parsed as {other:?}"),
    }
}

#[test]
fn command_send_maps_durations_to_milliseconds() {
    let args = send_args(&[
        "d1",
        "set_speed",
        "--payload",
        r#"{"rpm":1200}"#,
        "--ttl",
        "30s",
        "--wait",
        "5s",
    ]);
    assert_eq!(
        (args.device.as_str(), args.name.as_str()),
        ("d1", "set_speed")
    );
    let body = serde_json::to_value(super::exec::submit_body(&args)).unwrap();
    assert_eq!(
        body,
        json!({"name": "set_speed", "payload": {"rpm": 1200}, "ttl_ms": 30000, "wait_ms": 5000})
    );

    // Bare numbers are milliseconds; absent options are left out, the payload is null.
    let args = send_args(&["d1", "reboot", "--wait", "250"]);
    assert_eq!(args.wait, Some(250));
    let body = serde_json::to_value(super::exec::submit_body(&args)).unwrap();
    assert_eq!(
        body,
        json!({"name": "reboot", "payload": null, "wait_ms": 250})
    );
    // Any JSON value is a payload, a string included.
    let args = send_args(&["d1", "mode", "--payload", r#""eco""#, "--ttl", "1m"]);
    assert_eq!(args.payload, Some(json!("eco")));
    assert_eq!(args.ttl, Some(60_000));
    assert_eq!(send_args(&["d1", "x", "--wait", "60s"]).wait, Some(60_000));
}

#[test]
fn bad_command_arguments_are_usage_errors() {
    for args in [
        &["command", "send", "d1"][..],                          // no name
        &["command", "send", "d1", "x", "--payload", "eco"][..], // not JSON
        &["command", "send", "d1", "x", "--ttl", "0"][..],       // not positive
        &["command", "send", "d1", "x", "--ttl", "5 weeks"][..],
        &["command", "send", "d1", "x", "--wait", "61s"][..], // above the API's maximum
        &["command", "list", "d1", "--state", "done"][..],
        &["command", "show"][..],
    ] {
        let error = parse(args).expect_err(&format!("{args:?} parsed"));
        assert_ne!(
            error.kind(),
            clap::error::ErrorKind::DisplayHelp,
            "{args:?}: {error}"
        );
    }
    let error = parse(&["command", "send", "d1", "x", "--payload", "eco"]).unwrap_err();
    assert!(error.to_string().contains("quote text"), "{error}");
}

#[test]
fn command_list_and_show_parse() {
    let CtlCommand::Command(CommandCmd {
        action:
            CommandAction::List {
                device,
                state,
                oldest_first,
                page,
            },
        ..
    }) = parsed(&[
        "command",
        "list",
        "d1",
        "--state",
        "queued,sent",
        "--state",
        "failed",
        "--oldest-first",
        "--limit",
        "5",
    ])
    else {
        panic!("list");
    };
    assert_eq!(device, "d1");
    assert_eq!(
        state,
        [
            CommandStateArg::Queued,
            CommandStateArg::Sent,
            CommandStateArg::Failed
        ]
    );
    assert!(oldest_first);
    assert_eq!(page.limit, Some(5));
    assert!(matches!(
        parsed(&["command", "show", "cmd-1"]),
        CtlCommand::Command(CommandCmd { action: CommandAction::Show { id }, .. }) if id == "cmd-1"
    ));
    assert!(matches!(
        parsed(&["command", "cancel", "cmd-1"]),
        CtlCommand::Command(CommandCmd { action: CommandAction::Cancel { id }, .. }) if id == "cmd-1"
    ));
}

#[test]
fn a_command_renders_as_fields_and_as_a_table_row() {
    let command = sample_command();
    assert_eq!(
        super::exec::command_fields(&command),
        "id:            cmd-01\n\
         device:        d1\n\
         hub:           h1\n\
         protocol:      mqtt\n\
         name:          set_speed\n\
         payload:       {\"rpm\":1200}\n\
         state:         acknowledged\n\
         seq:           3\n\
         attempts:      1\n\
         created:       2026-11-21T10:00:00.000Z\n\
         expires:       2026-11-21T10:00:30.000Z\n\
         sent:          2026-11-21T10:00:00.002Z\n\
         delivered:     -\n\
         acknowledged:  2026-11-21T10:00:00.010Z\n\
         finished:      -\n\
         reason:        -\n\
         reply:         {\"ok\":true}\n"
    );
    let mut failed = sample_command();
    failed.id = "cmd-02".to_owned();
    failed.state = polyhub_store::CommandState::Failed;
    failed.reply = None;
    failed.reason = Some("device said no".to_owned());
    failed.payload = json!(null);
    assert_eq!(
        super::exec::commands_table(&[command, failed]),
        "ID      SEQ  NAME       STATE         CREATED                   ATTEMPTS  PAYLOAD       OUTCOME\n\
         cmd-01  3    set_speed  acknowledged  2026-11-21T10:00:00.000Z  1         {\"rpm\":1200}  {\"ok\":true}\n\
         cmd-02  3    set_speed  failed        2026-11-21T10:00:00.000Z  1         null          device said no\n"
    );
}

#[tokio::test]
async fn command_send_posts_ttl_and_wait_and_prints_the_command() {
    let seen = Seen::default();
    let api = stand_in_api(seen.clone()).await;
    let text = run_against(
        &api,
        &[
            "command",
            "send",
            "d7",
            "set_speed",
            "--payload",
            "7",
            "--ttl",
            "2s",
            "--wait",
            "5s",
        ],
    )
    .await
    .unwrap();
    assert!(text.contains("device:        d7\n"), "{text}");
    assert!(text.contains("state:         acknowledged\n"), "{text}");
    let requests = seen.lock().unwrap().clone();
    let (method, uri, body) = &requests[0];
    assert_eq!(
        (method.as_str(), uri.as_str()),
        ("POST", "/devices/d7/commands")
    );
    assert_eq!(
        body,
        &json!({"name": "set_speed", "payload": 7, "ttl_ms": 2000, "wait_ms": 5000})
    );
}

#[tokio::test]
async fn command_list_sends_filters_and_cancel_reports_conflicts() {
    let seen = Seen::default();
    let api = stand_in_api(seen.clone()).await;
    let table = run_against(
        &api,
        &[
            "command",
            "list",
            "d1",
            "--state",
            "queued,sent",
            "--oldest-first",
        ],
    )
    .await
    .unwrap();
    assert!(table.starts_with("ID      SEQ  NAME"), "{table}");
    assert!(
        table.ends_with("(more: repeat with --after cmd-01)\n"),
        "{table}"
    );
    let json_text = run_against(&api, &["command", "list", "d1", "--output", "json"])
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&json_text).unwrap()["items"][0],
        sample_command_json()
    );
    let uris: Vec<String> = seen.lock().unwrap().iter().map(|r| r.1.clone()).collect();
    assert_eq!(
        uris,
        [
            "/devices/d1/commands?state=queued%2Csent&order=asc",
            "/devices/d1/commands"
        ]
    );

    let error = run_against(&api, &["command", "cancel", "cmd-01"])
        .await
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        r#"command "cmd-01" is acknowledged (conflict, HTTP 409)"#
    );
}
