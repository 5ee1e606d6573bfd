//! The API over the real embedded store (SQLite in a temporary folder): the same contract
//! holds with the backend the binary uses.

mod support;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use polyhub_api::{ApiState, router};
use polyhub_store::{
    IngestBatch, IngestedMessage, NewDeadLetter, SqliteConfig, SqliteStore, Store, TelemetryRow,
    Value,
};
use serde_json::{Value as Json, json};
use support::{FakeCommands, FakeRuntime, Reply, send};

const T0: i64 = 1_795_255_200_000;

struct SqliteHarness {
    router: Router,
    store: Arc<SqliteStore>,
    runtime: Arc<FakeRuntime>,
    commands: Arc<FakeCommands>,
    _dir: tempfile::TempDir,
}

impl SqliteHarness {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open(dir.path(), &SqliteConfig::default()).unwrap());
        let runtime = Arc::new(FakeRuntime::default());
        let commands = Arc::new(FakeCommands::new(store.clone() as Arc<dyn Store>));
        let state = ApiState {
            store: store.clone() as Arc<dyn Store>,
            runtime: runtime.clone(),
            commands: Some(commands.clone()),
            metrics: None,
        };
        SqliteHarness {
            router: router(state),
            store,
            runtime,
            commands,
            _dir: dir,
        }
    }

    async fn call(&self, method: Method, uri: &str, body: Option<Json>) -> Reply {
        let mut request = Request::builder().method(method).uri(uri);
        let body = match body {
            Some(json) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Body::from(json.to_string())
            }
            None => Body::empty(),
        };
        send(&self.router, request.body(body).unwrap()).await
    }

    async fn get(&self, uri: &str) -> Reply {
        self.call(Method::GET, uri, None).await
    }

    async fn post(&self, uri: &str, body: Json) -> Reply {
        self.call(Method::POST, uri, Some(body)).await
    }
}

fn ids(reply: &Reply) -> Vec<String> {
    reply.json["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items: {}", reply.text))
        .iter()
        .map(|item| item["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn registry_lifecycle_over_sqlite() {
    let h = SqliteHarness::new();
    assert_eq!(h.get("/ready").await.status, StatusCode::OK);

    assert_eq!(
        h.post("/groups", json!({"id": "acme"})).await.status,
        StatusCode::CREATED
    );
    h.post("/groups", json!({"id": "acme"}))
        .await
        .assert_error(StatusCode::CONFLICT, "conflict");
    h.post("/hubs", json!({"id": "h1", "group_id": "nope"}))
        .await
        .assert_error(StatusCode::CONFLICT, "conflict");
    let hub = h
        .post("/hubs", json!({"id": "h1", "group_id": "acme"}))
        .await;
    assert_eq!(hub.status, StatusCode::CREATED, "{}", hub.text);
    assert_eq!(hub.json["desired_state"], "running");
    for id in ["d3", "d1", "d2"] {
        let reply = h.post("/devices", json!({"id": id, "hub_id": "h1"})).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    }
    assert_eq!(
        h.runtime.calls(),
        [
            "start h1",
            "device_added d3",
            "device_added d1",
            "device_added d2"
        ]
    );
    h.post("/devices", json!({"id": "d1", "hub_id": "h1"}))
        .await
        .assert_error(StatusCode::CONFLICT, "conflict");
    h.post(
        "/devices",
        json!({"id": "d9", "hub_id": "h1", "metadata": "not an object"}),
    )
    .await
    .assert_error(StatusCode::BAD_REQUEST, "invalid_request");

    let page = h.get("/devices?hub=h1&limit=2").await;
    assert_eq!(ids(&page), ["d1", "d2"]);
    assert_eq!(page.json["next"], "d2");
    let page = h.get("/devices?hub=h1&limit=2&after=d2").await;
    assert_eq!(ids(&page), ["d3"]);
    assert!(page.json["next"].is_null());

    let patched = h
        .call(
            Method::PATCH,
            "/devices/d1",
            Some(json!({"name": "Boiler"})),
        )
        .await;
    assert_eq!(patched.json["name"], "Boiler");

    h.call(Method::DELETE, "/hubs/h1", None)
        .await
        .assert_error(StatusCode::CONFLICT, "conflict");
    h.call(Method::DELETE, "/groups/acme", None)
        .await
        .assert_error(StatusCode::CONFLICT, "conflict");
    for id in ["d1", "d2", "d3"] {
        let path = format!("/devices/{id}");
        assert_eq!(
            h.call(Method::DELETE, &path, None).await.status,
            StatusCode::NO_CONTENT
        );
    }
    assert_eq!(
        h.call(Method::DELETE, "/hubs/h1", None).await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        h.call(Method::DELETE, "/groups/acme", None).await.status,
        StatusCode::NO_CONTENT
    );
    h.get("/groups/acme")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn telemetry_and_dead_letters_over_sqlite() {
    let h = SqliteHarness::new();
    h.post("/groups", json!({"id": "g1"})).await;
    h.post("/hubs", json!({"id": "h1", "group_id": "g1"})).await;
    h.post("/devices", json!({"id": "d1", "hub_id": "h1"}))
        .await;

    let row = |signal: &str, ts: i64, value: Value| TelemetryRow {
        device_id: "d1".into(),
        signal: signal.into(),
        ts,
        value,
    };
    let mut messages: Vec<IngestedMessage> = (0..5)
        .map(|i| IngestedMessage {
            seq: Some(i as u64 + 1),
            device_id: Some("d1".into()),
            received_at: T0 + i * 1_000,
            rows: vec![row("temp", T0 + i * 1_000, Value::Number(20.0 + i as f64))],
            dead_letter: None,
        })
        .collect();
    messages.push(IngestedMessage {
        seq: Some(6),
        device_id: Some("d1".into()),
        received_at: T0 + 5_000,
        rows: Vec::new(),
        dead_letter: Some(NewDeadLetter {
            hub_id: "h1".into(),
            device_id: Some("d1".into()),
            topic: "/h1/d1/data".into(),
            payload: b"[1,2]".to_vec(),
            reason: "arrays are not supported".into(),
            received_at: T0 + 5_000,
        }),
    });
    h.store
        .write_batch(IngestBatch {
            hub_id: "h1".into(),
            messages,
        })
        .await
        .unwrap();

    let latest = h.get("/devices/d1/telemetry/latest").await;
    assert_eq!(
        latest.json,
        json!({"items": [{"device_id": "d1", "signal": "temp", "ts": T0 + 4_000, "value": 24.0}]})
    );

    let first = h.get("/devices/d1/telemetry?signal=temp&limit=3").await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text);
    assert_eq!(first.json["rows"].as_array().unwrap().len(), 3);
    let cursor = first.json["next"].as_str().expect("more rows").to_owned();
    let rest = h
        .get(&format!(
            "/devices/d1/telemetry?signal=temp&limit=3&after={cursor}"
        ))
        .await;
    let rest_ts: Vec<i64> = rest.json["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["ts"].as_i64().unwrap())
        .collect();
    assert_eq!(rest_ts, [T0 + 3_000, T0 + 4_000]);

    let ranged = h
        .get("/devices/d1/telemetry?from=2026-11-21T10:00:01Z&to=2026-11-21T10:00:03Z")
        .await;
    assert_eq!(ranged.json["rows"].as_array().unwrap().len(), 2);

    let uri = format!(
        "/devices/d1/telemetry/downsample?signal=temp&from={T0}&to={}&interval=5s",
        T0 + 5_000
    );
    let buckets = h.get(&uri).await;
    assert_eq!(buckets.status, StatusCode::OK, "{}", buckets.text);
    assert_eq!(buckets.json["items"][0]["count"], 5);
    assert_eq!(buckets.json["items"][0]["avg"], 22.0);

    let letters = h.get("/dead-letters?hub=h1").await;
    assert_eq!(letters.json["items"].as_array().unwrap().len(), 1);
    assert_eq!(
        letters.json["items"][0]["reason"],
        "arrays are not supported"
    );
    assert_eq!(letters.json["items"][0]["payload"], "[1,2]");
    assert!(letters.json["next"].is_null());

    let presence = h.get("/hubs/h1/presence").await;
    assert_eq!(presence.json["items"][0]["device_id"], "d1");
    h.get("/devices/d1/telemetry?after=garbage")
        .await
        .assert_error(StatusCode::BAD_REQUEST, "invalid_request");
}

#[tokio::test]
async fn commands_over_sqlite() {
    let h = SqliteHarness::new();
    h.post("/groups", json!({"id": "g"})).await;
    h.post("/hubs", json!({"id": "h", "group_id": "g"})).await;
    for id in ["d1", "d2"] {
        let reply = h.post("/devices", json!({"id": id, "hub_id": "h"})).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    }

    let mut created = Vec::new();
    for n in 0..3 {
        let reply = h
            .post(
                "/devices/d1/commands",
                json!({"name": format!("c{n}"), "payload": {"n": n}, "ttl_ms": 60000}),
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
        assert_eq!(reply.json["state"], "queued");
        assert_eq!(reply.json["seq"], n + 1);
        created.push(reply.json["id"].as_str().unwrap().to_owned());
    }
    h.post("/devices/d2/commands", json!({"name": "other"}))
        .await;

    let read = h.get(&format!("/commands/{}", created[0])).await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.text);
    assert_eq!(read.json["payload"], json!({"n": 0}));
    let created_at = read.json["created_at"].as_i64().unwrap();
    assert_eq!(read.json["expires_at"].as_i64(), Some(created_at + 60_000));
    h.get("/commands/cmd-unknown")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");

    let newest_first: Vec<String> = created.iter().rev().cloned().collect();
    assert_eq!(ids(&h.get("/devices/d1/commands").await), newest_first);
    assert_eq!(ids(&h.get("/devices/d1/commands?order=asc").await), created);
    let first_page = h.get("/devices/d1/commands?limit=2").await;
    assert_eq!(ids(&first_page), newest_first[..2]);
    let next = first_page.json["next"].as_str().unwrap().to_owned();
    let second_page = h
        .get(&format!("/devices/d1/commands?limit=2&after={next}"))
        .await;
    assert_eq!(ids(&second_page), newest_first[2..]);
    assert_eq!(second_page.json["next"], Json::Null);

    let cancel = format!("/commands/{}/cancel", created[1]);
    let reply = h.call(Method::POST, &cancel, None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text);
    assert_eq!(reply.json["state"], "cancelled");
    h.call(Method::POST, &cancel, None)
        .await
        .assert_error(StatusCode::CONFLICT, "conflict");
    assert_eq!(
        ids(&h.get("/devices/d1/commands?state=cancelled").await),
        vec![created[1].clone()]
    );
    assert_eq!(
        ids(&h.get("/devices/d1/commands?state=queued&order=asc").await),
        vec![created[0].clone(), created[2].clone()]
    );
    h.get("/devices/nope/commands")
        .await
        .assert_error(StatusCode::NOT_FOUND, "not_found");

    // Waiting sees the acknowledgement written to the database.
    h.commands.settle_after(
        std::time::Duration::from_millis(50),
        polyhub_store::CommandState::Acknowledged,
    );
    let reply = h
        .post(
            "/devices/d2/commands",
            json!({"name": "ping", "wait_ms": 5000}),
        )
        .await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text);
    assert_eq!(reply.json["state"], "acknowledged");
    assert_eq!(reply.json["reply"], json!({"ok": true}));
    let stored = h
        .store
        .get_command(reply.json["id"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(stored.state, polyhub_store::CommandState::Acknowledged);
}
