//! The control channels' JSON: requests on `register_cmd` and `hub_manager/cmd`, and replies.
//!
//! Requests are parsed by hand from a `serde_json::Value` rather than derived, so that every
//! rejection carries a precise reason and the request id (when one can be read) even when the
//! rest of the message is wrong. Parsing has no side effects: a rejected message changes nothing.

use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value};

/// Largest control message accepted, in bytes.
pub const MAX_CONTROL_MESSAGE: usize = 64 * 1024;

/// Longest `request_id` accepted, in bytes.
pub const MAX_REQUEST_ID: usize = 256;

/// Why a control message was refused (the `code` of a rejected reply).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectCode {
    /// Not JSON at all.
    InvalidJson,
    /// JSON, but not a valid request (unknown field, missing action, bad id, ...).
    InvalidRequest,
    UnknownHub,
    UnknownDevice,
    /// The request conflicts with stored state (device id taken).
    Conflict,
    /// We failed (storage, parser).
    Internal,
}

/// A refused control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The request's id, when it could be read.
    pub request_id: Option<String>,
    pub code: RejectCode,
    pub reason: String,
}

impl Rejection {
    /// A rejection of the request `request_id`.
    pub fn new(request_id: Option<String>, code: RejectCode, reason: impl Into<String>) -> Self {
        Rejection {
            request_id,
            code,
            reason: reason.into(),
        }
    }

    /// The reply document.
    pub fn to_reply(&self) -> Bytes {
        rejected_reply(self.request_id.as_deref(), self.code, &self.reason)
    }
}

/// A request on a hub's register channel.
#[derive(Debug, Clone, PartialEq)]
pub enum RegisterRequest {
    Add {
        device: String,
        name: Option<String>,
        protocol: Option<String>,
        metadata: Option<Value>,
    },
    Remove {
        device: String,
    },
}

impl RegisterRequest {
    /// The device it is about.
    pub fn device(&self) -> &str {
        match self {
            RegisterRequest::Add { device, .. } | RegisterRequest::Remove { device } => device,
        }
    }

    /// `add` or `remove`.
    pub fn action(&self) -> &'static str {
        match self {
            RegisterRequest::Add { .. } => "add",
            RegisterRequest::Remove { .. } => "remove",
        }
    }
}

/// What the hub manager channel can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManagerAction {
    Start,
    Stop,
    Restart,
}

impl ManagerAction {
    /// The action's name in requests and replies.
    pub fn as_str(self) -> &'static str {
        match self {
            ManagerAction::Start => "start",
            ManagerAction::Stop => "stop",
            ManagerAction::Restart => "restart",
        }
    }
}

/// A request on the hub manager channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagerRequest {
    pub action: ManagerAction,
    pub hub: String,
}

/// A parsed request with its optional id.
#[derive(Debug, Clone, PartialEq)]
pub struct Request<T> {
    pub request_id: Option<String>,
    pub body: T,
}

/// Reads the object and its request id, the part both channels share.
fn parse_envelope(payload: &[u8]) -> Result<(Map<String, Value>, Option<String>), Rejection> {
    if payload.len() > MAX_CONTROL_MESSAGE {
        return Err(Rejection::new(
            None,
            RejectCode::InvalidRequest,
            format!("control messages are limited to {MAX_CONTROL_MESSAGE} bytes"),
        ));
    }
    let value: Value = serde_json::from_slice(payload).map_err(|error| {
        Rejection::new(
            None,
            RejectCode::InvalidJson,
            format!("not valid JSON: {error}"),
        )
    })?;
    let Value::Object(object) = value else {
        return Err(Rejection::new(
            None,
            RejectCode::InvalidRequest,
            "a control message must be a JSON object",
        ));
    };
    let request_id = match object.get("request_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) if id.len() <= MAX_REQUEST_ID => Some(id.clone()),
        Some(Value::String(_)) => {
            return Err(Rejection::new(
                None,
                RejectCode::InvalidRequest,
                format!("request_id is longer than {MAX_REQUEST_ID} bytes"),
            ));
        }
        Some(_) => {
            return Err(Rejection::new(
                None,
                RejectCode::InvalidRequest,
                "request_id must be a string",
            ));
        }
    };
    Ok((object, request_id))
}

/// Field access that turns every mistake into a rejection naming the field.
struct Fields<'a> {
    object: &'a Map<String, Value>,
    request_id: &'a Option<String>,
}

impl Fields<'_> {
    fn reject(&self, reason: String) -> Rejection {
        Rejection::new(self.request_id.clone(), RejectCode::InvalidRequest, reason)
    }

    fn only(&self, allowed: &[&str]) -> Result<(), Rejection> {
        match self
            .object
            .keys()
            .find(|key| !allowed.contains(&key.as_str()))
        {
            Some(key) => Err(self.reject(format!(
                "unknown field {key:?} (expected one of: {})",
                allowed.join(", ")
            ))),
            None => Ok(()),
        }
    }

    fn optional_string(&self, name: &str) -> Result<Option<String>, Rejection> {
        match self.object.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(value)) => Ok(Some(value.clone())),
            Some(_) => Err(self.reject(format!("{name} must be a string"))),
        }
    }

    fn required_string(&self, name: &str) -> Result<String, Rejection> {
        self.optional_string(name)?
            .ok_or_else(|| self.reject(format!("missing field {name:?}")))
    }

    fn id(&self, name: &'static str) -> Result<String, Rejection> {
        let id = self.required_string(name)?;
        polyhub_store::validate_id(name, &id).map_err(|error| self.reject(error.to_string()))?;
        Ok(id)
    }
}

/// Parses a message of a hub's register channel.
pub fn parse_register(payload: &[u8]) -> Result<Request<RegisterRequest>, Rejection> {
    let (object, request_id) = parse_envelope(payload)?;
    let fields = Fields {
        object: &object,
        request_id: &request_id,
    };
    let body = match fields.required_string("action")?.as_str() {
        "add" => {
            fields.only(&[
                "action",
                "device",
                "name",
                "protocol",
                "metadata",
                "request_id",
            ])?;
            let metadata = match object.get("metadata") {
                None | Some(Value::Null) => None,
                Some(value @ Value::Object(_)) => Some(value.clone()),
                Some(_) => return Err(fields.reject("metadata must be a JSON object".into())),
            };
            RegisterRequest::Add {
                device: fields.id("device")?,
                name: fields.optional_string("name")?,
                protocol: fields.optional_string("protocol")?,
                metadata,
            }
        }
        "remove" => {
            fields.only(&["action", "device", "request_id"])?;
            RegisterRequest::Remove {
                device: fields.id("device")?,
            }
        }
        other => {
            return Err(fields.reject(format!("unknown action {other:?} (expected add or remove)")));
        }
    };
    Ok(Request { request_id, body })
}

/// Parses a message of the hub manager channel.
pub fn parse_manager(payload: &[u8]) -> Result<Request<ManagerRequest>, Rejection> {
    let (object, request_id) = parse_envelope(payload)?;
    let fields = Fields {
        object: &object,
        request_id: &request_id,
    };
    fields.only(&["action", "hub", "request_id"])?;
    let action = match fields.required_string("action")?.as_str() {
        "start" => ManagerAction::Start,
        "stop" => ManagerAction::Stop,
        "restart" => ManagerAction::Restart,
        other => {
            return Err(fields.reject(format!(
                "unknown action {other:?} (expected start, stop or restart)"
            )));
        }
    };
    let hub = fields.id("hub")?;
    Ok(Request {
        request_id,
        body: ManagerRequest { action, hub },
    })
}

#[derive(Serialize)]
struct AcceptedReply<'a> {
    request_id: Option<&'a str>,
    status: &'static str,
    action: &'a str,
    hub: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<&'a str>,
}

#[derive(Serialize)]
struct RejectedReply<'a> {
    request_id: Option<&'a str>,
    status: &'static str,
    code: RejectCode,
    reason: &'a str,
}

/// `{"request_id", "status": "accepted", "action", "hub", "device"?}`.
pub fn accepted_reply(
    request_id: Option<&str>,
    action: &str,
    hub: &str,
    device: Option<&str>,
) -> Bytes {
    let reply = AcceptedReply {
        request_id,
        status: "accepted",
        action,
        hub,
        device,
    };
    // Serialising a struct of strings cannot fail.
    Bytes::from(serde_json::to_vec(&reply).unwrap_or_default())
}

/// `{"request_id", "status": "rejected", "code", "reason"}`.
pub fn rejected_reply(request_id: Option<&str>, code: RejectCode, reason: &str) -> Bytes {
    let reply = RejectedReply {
        request_id,
        status: "rejected",
        code,
        reason,
    };
    Bytes::from(serde_json::to_vec(&reply).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn rejection_code<T: std::fmt::Debug>(result: Result<T, Rejection>) -> RejectCode {
        result.unwrap_err().code
    }

    #[test]
    fn add_with_every_field_parses() {
        let request = parse_register(
            br#"{"action":"add","device":"d1","name":"Boiler","protocol":"mqtt","metadata":{"floor":2},"request_id":"abc"}"#,
        )
        .unwrap();
        assert_eq!(request.request_id.as_deref(), Some("abc"));
        assert_eq!(
            request.body,
            RegisterRequest::Add {
                device: "d1".into(),
                name: Some("Boiler".into()),
                protocol: Some("mqtt".into()),
                metadata: Some(json!({"floor": 2})),
            }
        );
    }

    #[test]
    fn remove_parses() {
        let request = parse_register(br#"{"action":"remove","device":"d1"}"#).unwrap();
        assert_eq!(request.request_id, None);
        assert_eq!(
            request.body,
            RegisterRequest::Remove {
                device: "d1".into()
            }
        );
    }

    #[test]
    fn malformed_register_messages_are_rejected_with_the_right_code() {
        assert_eq!(
            rejection_code(parse_register(b"{not json")),
            RejectCode::InvalidJson
        );
        assert_eq!(
            rejection_code(parse_register(b"[1]")),
            RejectCode::InvalidRequest
        );
        assert_eq!(
            rejection_code(parse_register(br#"{"device":"d1"}"#)),
            RejectCode::InvalidRequest
        );
        assert_eq!(
            rejection_code(parse_register(br#"{"action":"add"}"#)),
            RejectCode::InvalidRequest
        );
        assert_eq!(
            rejection_code(parse_register(br#"{"action":"add","device":"a/b"}"#)),
            RejectCode::InvalidRequest
        );
        assert_eq!(
            rejection_code(parse_register(
                br#"{"action":"add","device":"d","extra":1}"#
            )),
            RejectCode::InvalidRequest
        );
        assert_eq!(
            rejection_code(parse_register(
                br#"{"action":"remove","device":"d","name":"x"}"#
            )),
            RejectCode::InvalidRequest
        );
        assert_eq!(
            rejection_code(parse_register(
                br#"{"action":"add","device":"d","metadata":[1]}"#
            )),
            RejectCode::InvalidRequest
        );
        assert_eq!(
            rejection_code(parse_register(
                br#"{"action":"add","device":"d","request_id":5}"#
            )),
            RejectCode::InvalidRequest
        );
        assert_eq!(
            rejection_code(parse_register(br#"{"action":"grow","device":"d"}"#)),
            RejectCode::InvalidRequest
        );
        let huge = format!(
            r#"{{"action":"add","device":"d","name":"{}"}}"#,
            "x".repeat(MAX_CONTROL_MESSAGE)
        );
        assert_eq!(
            rejection_code(parse_register(huge.as_bytes())),
            RejectCode::InvalidRequest
        );
    }

    #[test]
    fn a_rejection_keeps_the_request_id_when_readable() {
        let rejection =
            parse_register(br#"{"action":"add","device":"bad id","request_id":"r7"}"#).unwrap_err();
        assert_eq!(rejection.request_id.as_deref(), Some("r7"));
        let reply: Value = serde_json::from_slice(&rejection.to_reply()).unwrap();
        assert_eq!(reply["request_id"], "r7");
        assert_eq!(reply["status"], "rejected");
        assert_eq!(reply["code"], "invalid_request");
        assert!(reply["reason"].as_str().unwrap().contains("device"));
    }

    #[test]
    fn manager_requests_parse() {
        let request =
            parse_manager(br#"{"action":"restart","hub":"h1","request_id":"x"}"#).unwrap();
        assert_eq!(
            request.body,
            ManagerRequest {
                action: ManagerAction::Restart,
                hub: "h1".into()
            }
        );
        assert_eq!(
            rejection_code(parse_manager(br#"{"action":"start"}"#)),
            RejectCode::InvalidRequest
        );
        assert_eq!(
            rejection_code(parse_manager(
                br#"{"action":"start","hub":"h1","device":"d"}"#
            )),
            RejectCode::InvalidRequest
        );
        assert_eq!(rejection_code(parse_manager(b"")), RejectCode::InvalidJson);
    }

    #[test]
    fn accepted_replies_have_the_documented_shape() {
        let reply: Value =
            serde_json::from_slice(&accepted_reply(None, "add", "h1", Some("d1"))).unwrap();
        assert_eq!(
            reply,
            json!({"request_id": null, "status": "accepted", "action": "add", "hub": "h1", "device": "d1"})
        );
        let reply: Value =
            serde_json::from_slice(&accepted_reply(Some("a"), "stop", "h1", None)).unwrap();
        assert_eq!(
            reply,
            json!({"request_id": "a", "status": "accepted", "action": "stop", "hub": "h1"})
        );
    }

    proptest! {
        #[test]
        fn parsing_arbitrary_bytes_never_panics(payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_register(&payload);
            let _ = parse_manager(&payload);
        }

        #[test]
        fn parsing_arbitrary_objects_never_panics(
            action in prop_oneof![Just("add".to_owned()), Just("remove".to_owned()), Just("start".to_owned()), ".{0,8}"],
            key in "[a-z_]{1,10}",
            value in ".{0,20}",
        ) {
            let payload = json!({"action": action, "device": value, "hub": value, key: value}).to_string();
            let _ = parse_register(payload.as_bytes());
            let _ = parse_manager(payload.as_bytes());
        }
    }
}
