//! The API client commands (`polyhub hub ...`, `polyhub telemetry ...`) as a script meets them:
//! the real binary, run against a stand-in API served by this test, observed through its exit
//! code, standard output and its one-line error.
//!
//! The stand-in mimics a few routes of polyhub's REST API; the suite in tests/hub runs the same
//! commands against the real API.

use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use axum::Json;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

const POLYHUB: &str = env!("CARGO_BIN_EXE_polyhub");

/// Upper bound for one CLI run.
const TIMEOUT: Duration = Duration::from_secs(20);

/// Serves the stand-in API on a free port of 127.0.0.1 from a thread of its own; returns its
/// base URL. The server lives until the test process ends.
fn stand_in_api() -> String {
    async fn latest(Path(device): Path<String>) -> Response {
        if device != "d1" {
            let body = json!({"error": {"code": "not_found",
                                        "message": format!("device {device:?} not found")}});
            return (StatusCode::NOT_FOUND, Json(body)).into_response();
        }
        Json(json!({"items": [
            {"device_id": "d1", "signal": "temp", "ts": 1_795_255_200_000_i64, "value": 21.5},
            {"device_id": "d1", "signal": "state", "ts": 1_795_255_200_000_i64, "value": "on"},
        ]}))
        .into_response()
    }
    async fn create_device(Json(body): Json<Value>) -> Response {
        let device = json!({
            "id": body["id"], "hub_id": body["hub_id"], "name": body["id"],
            "protocol": body["protocol"].as_str().unwrap_or("mqtt"), "metadata": {},
            "created_at": 0, "updated_at": 0,
        });
        (StatusCode::CREATED, Json(device)).into_response()
    }

    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let app = axum::Router::new()
                .route("/devices/{id}/telemetry/latest", get(latest))
                .route("/devices", post(create_device));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let _ = sender.send(listener.local_addr().expect("address"));
            let _ = axum::serve(listener, app).await;
        });
    });
    let address = receiver
        .recv_timeout(TIMEOUT)
        .expect("stand-in API address");
    format!("http://{address}")
}

/// Runs `polyhub args...` to completion within [`TIMEOUT`].
fn polyhub(args: &[&str]) -> Output {
    let child = Command::new(POLYHUB)
        .args(args)
        .env_remove("POLYHUB_API")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn polyhub");
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(child.wait_with_output());
    });
    receiver
        .recv_timeout(TIMEOUT)
        .expect("polyhub did not finish in time")
        .expect("wait for polyhub")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn telemetry_latest_prints_the_api_json_or_a_table() {
    let api = stand_in_api();
    let output = polyhub(&[
        "telemetry",
        "latest",
        "d1",
        "--api",
        &api,
        "--output",
        "json",
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let printed: Value = serde_json::from_slice(&output.stdout).expect("JSON on stdout");
    assert_eq!(printed["items"][0]["value"], json!(21.5));
    assert_eq!(printed["items"][1]["value"], json!("on"));

    let output = polyhub(&["telemetry", "latest", "d1", "--api", &api]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(
        text(&output.stdout),
        "DEVICE  SIGNAL  TIME                      VALUE\n\
         d1      temp    2026-11-21T10:00:00.000Z  21.5\n\
         d1      state   2026-11-21T10:00:00.000Z  on\n"
    );
}

#[test]
fn the_api_url_can_come_from_the_environment() {
    let api = stand_in_api();
    let output = Command::new(POLYHUB)
        .args(["device", "add", "d7", "--hub", "h1", "--output", "json"])
        .env("POLYHUB_API", &api)
        .stdin(Stdio::null())
        .output()
        .expect("run polyhub");
    assert!(output.status.success(), "{}", text(&output.stderr));
    let device: Value = serde_json::from_slice(&output.stdout).expect("JSON on stdout");
    assert_eq!(
        (device["id"].clone(), device["hub_id"].clone()),
        (json!("d7"), json!("h1"))
    );
}

#[test]
fn api_errors_exit_1_with_one_line() {
    let api = stand_in_api();
    let output = polyhub(&["telemetry", "latest", "nope", "--api", &api]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        text(&output.stderr),
        "error: device \"nope\" not found (not_found, HTTP 404)\n"
    );
    assert!(output.stdout.is_empty());
}

#[test]
fn an_unreachable_api_exits_1_with_advice() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let api = format!("http://{}", listener.local_addr().expect("address"));
    drop(listener);
    let output = polyhub(&["parsers", "--api", &api]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.starts_with(&format!(
            "error: cannot reach the polyhub API at {api}: is `polyhub run` running?"
        )),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn usage_errors_exit_2() {
    let output = polyhub(&["hub", "add", "h1", "--decoder", "xml"]);
    assert_eq!(output.status.code(), Some(2));
    let output = polyhub(&["group", "add", "g1", "--metadata", "[1]"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("JSON object"));
}
