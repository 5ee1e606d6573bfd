//! What travels in message bodies, and how device JIDs are formed: pure functions, no I/O.
//!
//! - A command is a chat message whose body is `{"id", "name", "payload"}` (the same JSON as a
//!   hub-style MQTT command), so one device firmware can speak both.
//! - A device's answer is a body `{"id", "status": "ok"|"error", "result"?, "reason"?}`.
//! - Any other JSON object body is telemetry, decoded like the hub's `json` decoder.

use polyhub_hub::decode::{Rows, decode};
use polyhub_store::{Command, Decoder, Device};
use serde_json::{Value as Json, json};
use tokio_xmpp::jid::BareJid;

/// The metadata member that overrides a device's JID.
pub const JID_METADATA_KEY: &str = "jid";

/// The body of a command message.
pub fn command_body(command: &Command) -> String {
    json!({"id": command.id, "name": command.name, "payload": command.payload}).to_string()
}

/// The JID a device is reached at: its metadata `jid`, else `<device id>@<device_domain>`.
pub fn device_jid(device: &Device, device_domain: &str) -> Result<BareJid, String> {
    match device.metadata.get(JID_METADATA_KEY) {
        Some(Json::String(jid)) => BareJid::new(jid)
            .map_err(|error| format!("device {}: metadata jid {jid:?}: {error}", device.id)),
        Some(_) => Err(format!(
            "device {}: metadata jid must be a string",
            device.id
        )),
        None => BareJid::new(&format!("{}@{device_domain}", device.id)).map_err(|error| {
            format!(
                "device {}: {:?} is not a valid JID local part: {error}",
                device.id, device.id
            )
        }),
    }
}

/// What a message body from a device means.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    /// An answer to a command.
    Reply {
        command_id: String,
        ok: bool,
        reply: Option<Json>,
        reason: Option<String>,
    },
    /// Named values.
    Telemetry(Rows),
    /// Not for us (not JSON, not an object, or an unusable reply); the text says why.
    Ignored(String),
}

/// Classifies a message body: a JSON object with both `id` and `status` is a reply, any other
/// JSON object is telemetry.
pub fn classify_body(body: &str) -> Body {
    let object = match serde_json::from_str::<Json>(body) {
        Ok(Json::Object(object)) => object,
        Ok(_) => return Body::Ignored("body is JSON but not an object".to_owned()),
        Err(_) => return Body::Ignored("body is not JSON".to_owned()),
    };
    if !(object.contains_key("id") && object.contains_key("status")) {
        return match decode(Decoder::Json, body.as_bytes()) {
            Ok(rows) if rows.is_empty() => Body::Ignored("empty telemetry object".to_owned()),
            Ok(rows) => Body::Telemetry(rows),
            Err(reason) => Body::Ignored(format!("telemetry not decodable: {reason}")),
        };
    }
    let Some(Json::String(command_id)) = object.get("id") else {
        return Body::Ignored("reply id is not a string".to_owned());
    };
    let reason = match object.get("reason") {
        None | Some(Json::Null) => None,
        Some(Json::String(reason)) => Some(reason.clone()),
        Some(other) => Some(other.to_string()),
    };
    let reply = object
        .get("result")
        .filter(|value| !value.is_null())
        .cloned();
    match object.get("status").and_then(Json::as_str) {
        Some("ok") => Body::Reply {
            command_id: command_id.clone(),
            ok: true,
            reply,
            reason: None,
        },
        Some("error") => Body::Reply {
            command_id: command_id.clone(),
            ok: false,
            reply,
            reason: Some(reason.unwrap_or_else(|| "the device reported an error".to_owned())),
        },
        _ => Body::Ignored("reply status is neither \"ok\" nor \"error\"".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use polyhub_store::{CommandState, Value};

    use super::*;

    fn device(id: &str, metadata: Json) -> Device {
        Device {
            id: id.to_owned(),
            hub_id: "hub".to_owned(),
            name: id.to_owned(),
            protocol: "xmpp".to_owned(),
            metadata,
            created_at: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn device_jid_defaults_to_id_at_domain_and_metadata_overrides() {
        let jid = device_jid(&device("dev1", json!({})), "localhost").unwrap();
        assert_eq!(jid.as_str(), "dev1@localhost");
        let jid = device_jid(
            &device("dev1", json!({"jid": "lamp@example.org"})),
            "localhost",
        )
        .unwrap();
        assert_eq!(jid.as_str(), "lamp@example.org");
        assert!(device_jid(&device("dev1", json!({"jid": 3})), "localhost").is_err());
        assert!(device_jid(&device("a@b", json!({})), "localhost").is_err());
    }

    #[test]
    fn command_body_is_the_hub_style_json() {
        let command = Command {
            id: "cmd-1".to_owned(),
            device_id: "dev1".to_owned(),
            hub_id: "hub".to_owned(),
            protocol: "xmpp".to_owned(),
            name: "reboot".to_owned(),
            payload: json!({"delay": 5}),
            seq: 1,
            state: CommandState::Queued,
            created_at: 0,
            expires_at: None,
            sent_at: None,
            delivered_at: None,
            acknowledged_at: None,
            finished_at: None,
            reason: None,
            reply: None,
            attempts: 0,
        };
        let body: Json = serde_json::from_str(&command_body(&command)).unwrap();
        assert_eq!(
            body,
            json!({"id": "cmd-1", "name": "reboot", "payload": {"delay": 5}})
        );
    }

    #[test]
    fn replies_are_classified_by_status() {
        assert_eq!(
            classify_body(r#"{"id":"c1","status":"ok","result":{"x":1}}"#),
            Body::Reply {
                command_id: "c1".to_owned(),
                ok: true,
                reply: Some(json!({"x": 1})),
                reason: None
            }
        );
        assert_eq!(
            classify_body(r#"{"id":"c1","status":"error","reason":"busy"}"#),
            Body::Reply {
                command_id: "c1".to_owned(),
                ok: false,
                reply: None,
                reason: Some("busy".to_owned())
            }
        );
        assert!(matches!(
            classify_body(r#"{"id":"c1","status":"maybe"}"#),
            Body::Ignored(_)
        ));
        assert!(matches!(
            classify_body(r#"{"id":7,"status":"ok"}"#),
            Body::Ignored(_)
        ));
    }

    #[test]
    fn other_objects_are_telemetry_and_the_rest_is_ignored() {
        assert_eq!(
            classify_body(r#"{"temperature":21.5,"door":{"open":true}}"#),
            Body::Telemetry(vec![
                ("door.open".to_owned(), Value::Bool(true)),
                ("temperature".to_owned(), Value::Number(21.5)),
            ])
        );
        // A lone "id" member is a value, not a reply.
        assert_eq!(
            classify_body(r#"{"id":"sensor-7"}"#),
            Body::Telemetry(vec![("id".to_owned(), Value::Text("sensor-7".to_owned()))])
        );
        for body in ["hello", "42", "[1,2]", "{}", r#"{"a":null}"#, "{\"a\":"] {
            assert!(
                matches!(classify_body(body), Body::Ignored(_)),
                "{body} should be ignored"
            );
        }
    }
}
