//! Test doubles and helpers shared by the integration tests: the test kit's in-memory
//! [`Store`] (`polyhub_testkit::store::MemoryStore`), a [`HubRuntime`] that records its calls,
//! a command service double, and a one-shot request helper.

#![allow(dead_code, unreachable_pub)]

pub mod fake_commands;
pub mod fake_runtime;

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::http::{Method, Request, StatusCode, header};
use polyhub_api::{ApiState, router};
use polyhub_store::Store;
use serde_json::Value;
use tower::ServiceExt;

pub use fake_commands::FakeCommands;
pub use fake_runtime::FakeRuntime;
pub use polyhub_testkit::store::MemoryStore;

/// A router over fresh doubles, and the doubles to inspect.
pub struct Harness {
    pub router: Router,
    pub store: Arc<MemoryStore>,
    pub runtime: Arc<FakeRuntime>,
    pub commands: Arc<FakeCommands>,
}

impl Harness {
    /// With a command service.
    pub fn new() -> Self {
        Self::build(true)
    }

    /// Without a command service: commands are not enabled.
    pub fn without_commands() -> Self {
        Self::build(false)
    }

    fn build(with_commands: bool) -> Self {
        let store = Arc::new(MemoryStore::new());
        let runtime = Arc::new(FakeRuntime::default());
        let commands = Arc::new(FakeCommands::new(store.clone() as Arc<dyn Store>));
        let state = ApiState {
            store: store.clone() as Arc<dyn Store>,
            runtime: runtime.clone(),
            commands: with_commands
                .then(|| commands.clone() as Arc<dyn polyhub_api::CommandRuntime>),
            metrics: None,
        };
        Harness {
            router: router(state),
            store,
            runtime,
            commands,
        }
    }

    /// Sends one request; `body` is sent as JSON when given.
    pub async fn call(&self, method: Method, uri: &str, body: Option<Value>) -> Reply {
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

    /// Sends a raw body with a JSON content type.
    pub async fn call_raw(&self, method: Method, uri: &str, body: &str) -> Reply {
        let request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.to_owned()))
            .unwrap();
        send(&self.router, request).await
    }

    pub async fn get(&self, uri: &str) -> Reply {
        self.call(Method::GET, uri, None).await
    }

    pub async fn post(&self, uri: &str, body: Value) -> Reply {
        self.call(Method::POST, uri, Some(body)).await
    }

    /// Creates a group, a hub and devices, asserting each succeeds.
    pub async fn seed(&self, group: &str, hub: &str, devices: &[&str]) {
        let reply = self.post("/groups", serde_json::json!({"id": group})).await;
        assert!(reply.status == StatusCode::CREATED || reply.status == StatusCode::CONFLICT);
        let reply = self
            .post("/hubs", serde_json::json!({"id": hub, "group_id": group}))
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.json);
        for device in devices {
            let reply = self
                .post("/devices", serde_json::json!({"id": device, "hub_id": hub}))
                .await;
            assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.json);
        }
    }
}

/// A response with its body read.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub content_type: Option<String>,
    pub text: String,
    /// The body as JSON (`Value::Null` when empty or not JSON).
    pub json: Value,
}

impl Reply {
    /// Asserts the contract's error shape and returns the code.
    pub fn error_code(&self) -> String {
        let error = self
            .json
            .get("error")
            .unwrap_or_else(|| panic!("not an error body: {}", self.text));
        let code = error["code"].as_str().expect("error.code is a string");
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "error.message: {}",
            self.text
        );
        assert_eq!(
            error.as_object().unwrap().len(),
            2,
            "error has only code and message"
        );
        code.to_owned()
    }

    /// Asserts `status` and the error code.
    pub fn assert_error(&self, status: StatusCode, code: &str) {
        assert_eq!(self.status, status, "{}", self.text);
        assert_eq!(self.error_code(), code, "{}", self.text);
        assert_eq!(self.content_type.as_deref(), Some("application/json"));
    }
}

pub async fn send(router: &Router, request: Request<Body>) -> Reply {
    let response = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        router.clone().oneshot(request),
    )
    .await
    .expect("the router answers in time")
    .unwrap();
    let status = response.status();
    let content_type = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let bytes = to_bytes(response.into_body(), 16 * 1024 * 1024)
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply {
        status,
        content_type,
        text,
        json,
    }
}
