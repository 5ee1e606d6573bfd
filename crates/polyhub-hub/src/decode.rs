//! Payload decoding: bytes to `(signal, value)` rows, or the reason the message is a dead letter.
//!
//! Rules (per hub setting [`Decoder`]):
//! - `json`: an object of named values gives one row per member, nested objects flattened with
//!   `.`; arrays, nulls, members nested deeper than [`MAX_DEPTH`] levels or duplicate flattened
//!   names make the whole message a dead letter. A JSON scalar gives one row `value`.
//! - `number`: a finite decimal number (ASCII whitespace trimmed).
//! - `boolean`: `true`/`false`/`1`/`0`/`on`/`off`, any case, trimmed.
//! - `string`: valid UTF-8, as is.
//! - `auto`: JSON if the payload is a JSON object or scalar, else a number, else a boolean word,
//!   else UTF-8 text.
//!
//! An empty payload is always a dead letter. Decoding never panics, whatever the bytes.

use std::collections::BTreeMap;

use polyhub_store::{Decoder, Value};
use serde_json::Value as Json;

/// Deepest nesting of an object member accepted (a top-level member is at depth 1).
pub const MAX_DEPTH: usize = 8;

/// Longest signal name, in bytes.
pub const MAX_SIGNAL_LEN: usize = 128;

/// The signal name of a payload that is a single value.
pub const VALUE_SIGNAL: &str = "value";

/// The rows of one message.
pub type Rows = Vec<(String, Value)>;

/// Why a payload could not be decoded (stored as the dead letter's reason).
pub type DeadReason = String;

/// Decodes a hub-style payload into rows (signal name, value).
pub fn decode(decoder: Decoder, payload: &[u8]) -> Result<Rows, DeadReason> {
    if payload.is_empty() {
        return Err("empty payload".to_owned());
    }
    match decoder {
        Decoder::Json => {
            let json: Json = serde_json::from_slice(payload)
                .map_err(|error| format!("not valid JSON: {error}"))?;
            json_rows(json)
        }
        Decoder::Number => single(number(payload)),
        Decoder::Boolean => single(boolean(payload)),
        Decoder::String => single(text(payload)),
        Decoder::Auto => match serde_json::from_slice::<Json>(payload) {
            Ok(json @ (Json::Object(_) | Json::Bool(_) | Json::Number(_) | Json::String(_))) => {
                json_rows(json)
            }
            _ => single(auto_plain(payload)),
        },
    }
}

/// Decodes the payload of an sgframework-style topic: always one value, whose signal comes from
/// the topic. `auto` follows the auto rules without objects; `json` accepts only JSON scalars.
pub fn decode_single(decoder: Decoder, payload: &[u8]) -> Result<Value, DeadReason> {
    if payload.is_empty() {
        return Err("empty payload".to_owned());
    }
    match decoder {
        Decoder::Json => match serde_json::from_slice::<Json>(payload) {
            Ok(json) => json_scalar(json).ok_or_else(|| {
                "expected a single JSON scalar (number, string or boolean)".to_owned()
            }),
            Err(error) => Err(format!("not valid JSON: {error}")),
        },
        Decoder::Number => number(payload),
        Decoder::Boolean => boolean(payload),
        Decoder::String => text(payload),
        Decoder::Auto => match serde_json::from_slice::<Json>(payload)
            .ok()
            .and_then(json_scalar)
        {
            Some(value) => Ok(value),
            None => auto_plain(payload),
        },
    }
}

/// Checks a signal name: non-empty, at most [`MAX_SIGNAL_LEN`] bytes.
pub fn check_signal(name: &str) -> Result<(), DeadReason> {
    if name.is_empty() {
        Err("empty signal name".to_owned())
    } else if name.len() > MAX_SIGNAL_LEN {
        Err(format!("signal name longer than {MAX_SIGNAL_LEN} bytes"))
    } else {
        Ok(())
    }
}

fn single(value: Result<Value, DeadReason>) -> Result<Rows, DeadReason> {
    value.map(|value| vec![(VALUE_SIGNAL.to_owned(), value)])
}

/// Number, then boolean word, then text: the non-JSON half of `auto`.
fn auto_plain(payload: &[u8]) -> Result<Value, DeadReason> {
    number(payload)
        .or_else(|_| boolean(payload))
        .or_else(|_| text(payload))
        .map_err(|_| "not JSON, a number, a boolean or UTF-8 text".to_owned())
}

fn ascii_trimmed(payload: &[u8]) -> Result<&str, DeadReason> {
    std::str::from_utf8(payload)
        .map(|text| text.trim_matches(|c: char| c.is_ascii_whitespace()))
        .map_err(|_| "not valid UTF-8".to_owned())
}

fn number(payload: &[u8]) -> Result<Value, DeadReason> {
    let text = ascii_trimmed(payload)?;
    // Rust's float syntax also accepts "inf" and "NaN"; the finiteness check rejects them.
    match text.parse::<f64>() {
        Ok(value) if value.is_finite() => Ok(Value::Number(value)),
        Ok(_) => Err("not a finite number".to_owned()),
        Err(_) => Err(format!("not a number: {:?}", truncate(text))),
    }
}

fn boolean(payload: &[u8]) -> Result<Value, DeadReason> {
    let text = ascii_trimmed(payload)?;
    match text.to_ascii_lowercase().as_str() {
        "true" | "1" | "on" => Ok(Value::Bool(true)),
        "false" | "0" | "off" => Ok(Value::Bool(false)),
        _ => Err(format!(
            "not a boolean (true/false/1/0/on/off): {:?}",
            truncate(text)
        )),
    }
}

fn text(payload: &[u8]) -> Result<Value, DeadReason> {
    std::str::from_utf8(payload)
        .map(|text| Value::Text(text.to_owned()))
        .map_err(|_| "not valid UTF-8".to_owned())
}

fn truncate(text: &str) -> &str {
    let mut end = text.len().min(40);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn json_scalar(json: Json) -> Option<Value> {
    match json {
        Json::Bool(value) => Some(Value::Bool(value)),
        // serde_json never yields a non-finite f64 from parsing; the check is for safety.
        Json::Number(number) => number
            .as_f64()
            .filter(|value| value.is_finite())
            .map(Value::Number),
        Json::String(value) => Some(Value::Text(value)),
        Json::Null | Json::Array(_) | Json::Object(_) => None,
    }
}

fn json_rows(json: Json) -> Result<Rows, DeadReason> {
    match json {
        Json::Object(object) => {
            let mut rows = BTreeMap::new();
            flatten(object, "", 1, &mut rows)?;
            Ok(rows.into_iter().collect())
        }
        Json::Null => Err("JSON null is not a value".to_owned()),
        Json::Array(_) => Err("JSON arrays are not supported".to_owned()),
        scalar => single(json_scalar(scalar).ok_or_else(|| "not a finite number".to_owned())),
    }
}

fn flatten(
    object: serde_json::Map<String, Json>,
    prefix: &str,
    depth: usize,
    rows: &mut BTreeMap<String, Value>,
) -> Result<(), DeadReason> {
    if depth > MAX_DEPTH {
        return Err(format!("members nested deeper than {MAX_DEPTH} levels"));
    }
    for (key, member) in object {
        if key.is_empty() {
            return Err("empty member name".to_owned());
        }
        let name = if prefix.is_empty() {
            key
        } else {
            format!("{prefix}.{key}")
        };
        match member {
            Json::Object(inner) => flatten(inner, &name, depth + 1, rows)?,
            Json::Null => return Err(format!("member {name:?} is null")),
            Json::Array(_) => return Err(format!("member {name:?} is an array")),
            scalar => {
                check_signal(&name)?;
                let value = json_scalar(scalar)
                    .ok_or_else(|| format!("member {name:?} is not a finite number"))?;
                if rows.insert(name.clone(), value).is_some() {
                    return Err(format!("signal {name:?} appears twice after flattening"));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn rows(pairs: &[(&str, Value)]) -> Rows {
        pairs
            .iter()
            .map(|(name, value)| ((*name).to_owned(), value.clone()))
            .collect()
    }

    #[test]
    fn json_objects_flatten_with_dots() {
        let decoded = decode(
            Decoder::Json,
            br#"{"t":21.5,"on":true,"s":"ok","a":{"b":1}}"#,
        )
        .unwrap();
        assert_eq!(
            decoded,
            rows(&[
                ("a.b", Value::Number(1.0)),
                ("on", Value::Bool(true)),
                ("s", Value::Text("ok".into())),
                ("t", Value::Number(21.5)),
            ])
        );
    }

    #[test]
    fn json_scalar_is_one_value_row() {
        assert_eq!(
            decode(Decoder::Json, b"42").unwrap(),
            rows(&[("value", Value::Number(42.0))])
        );
        assert_eq!(
            decode(Decoder::Json, b"\"hi\"").unwrap(),
            rows(&[("value", Value::Text("hi".into()))])
        );
        assert_eq!(decode(Decoder::Json, b"{}").unwrap(), rows(&[]));
    }

    #[test]
    fn json_arrays_nulls_and_deep_nesting_dead_letter_the_whole_message() {
        assert!(decode(Decoder::Json, br#"{"a":1,"b":[1,2]}"#).is_err());
        assert!(decode(Decoder::Json, br#"{"a":1,"b":null}"#).is_err());
        assert!(decode(Decoder::Json, b"[1]").is_err());
        assert!(decode(Decoder::Json, b"null").is_err());
        assert!(decode(Decoder::Json, b"hello").is_err());
        assert!(decode(Decoder::Json, br#"{"":1}"#).is_err());
        assert!(decode(Decoder::Json, br#"{"a.b":1,"a":{"b":2}}"#).is_err());
        let long = format!(r#"{{"{}":1}}"#, "x".repeat(MAX_SIGNAL_LEN + 1));
        assert!(decode(Decoder::Json, long.as_bytes()).is_err());
        // Eight levels is the limit; nine is too deep.
        let nested = |levels: usize| {
            let mut value = json!(1);
            for _ in 0..levels {
                value = json!({ "n": value });
            }
            value.to_string()
        };
        assert_eq!(
            decode(Decoder::Json, nested(8).as_bytes()).unwrap().len(),
            1
        );
        assert!(decode(Decoder::Json, nested(9).as_bytes()).is_err());
    }

    #[test]
    fn numbers_must_be_finite_decimals() {
        assert_eq!(
            decode(Decoder::Number, b" 21.5\n").unwrap(),
            rows(&[("value", Value::Number(21.5))])
        );
        assert_eq!(
            decode(Decoder::Number, b"-3e2").unwrap(),
            rows(&[("value", Value::Number(-300.0))])
        );
        assert!(decode(Decoder::Number, b"NaN").is_err());
        assert!(decode(Decoder::Number, b"inf").is_err());
        assert!(decode(Decoder::Number, b"1e400").is_err());
        assert!(decode(Decoder::Number, b"12abc").is_err());
    }

    #[test]
    fn booleans_accept_the_documented_words() {
        for (word, expected) in [
            ("true", true),
            ("OFF", false),
            ("On", true),
            ("0", false),
            ("1", true),
            (" false ", false),
        ] {
            assert_eq!(
                decode(Decoder::Boolean, word.as_bytes()).unwrap(),
                rows(&[("value", Value::Bool(expected))])
            );
        }
        assert!(decode(Decoder::Boolean, b"yes").is_err());
    }

    #[test]
    fn strings_must_be_utf8() {
        assert_eq!(
            decode(Decoder::String, b" hi ").unwrap(),
            rows(&[("value", Value::Text(" hi ".into()))])
        );
        assert!(decode(Decoder::String, &[0xff, 0xfe]).is_err());
    }

    #[test]
    fn auto_tries_json_number_boolean_text_in_order() {
        assert_eq!(
            decode(Decoder::Auto, br#"{"t":1}"#).unwrap(),
            rows(&[("t", Value::Number(1.0))])
        );
        assert_eq!(
            decode(Decoder::Auto, b"7").unwrap(),
            rows(&[("value", Value::Number(7.0))])
        );
        assert_eq!(
            decode(Decoder::Auto, b"true").unwrap(),
            rows(&[("value", Value::Bool(true))])
        );
        assert_eq!(
            decode(Decoder::Auto, b"on").unwrap(),
            rows(&[("value", Value::Bool(true))])
        );
        assert_eq!(
            decode(Decoder::Auto, b"hello").unwrap(),
            rows(&[("value", Value::Text("hello".into()))])
        );
        assert_eq!(
            decode(Decoder::Auto, b"[1,2]").unwrap(),
            rows(&[("value", Value::Text("[1,2]".into()))])
        );
        // An object is JSON: its bad members dead-letter it rather than storing it as text.
        assert!(decode(Decoder::Auto, br#"{"a":[1]}"#).is_err());
        assert!(decode(Decoder::Auto, &[0xff]).is_err());
    }

    #[test]
    fn empty_payload_is_a_dead_letter_for_every_decoder() {
        for decoder in [
            Decoder::Auto,
            Decoder::Json,
            Decoder::Number,
            Decoder::String,
            Decoder::Boolean,
        ] {
            assert_eq!(decode(decoder, b""), Err("empty payload".to_owned()));
            assert!(decode_single(decoder, b"").is_err());
        }
    }

    #[test]
    fn single_values_refuse_objects_under_json() {
        assert_eq!(
            decode_single(Decoder::Auto, b"3").unwrap(),
            Value::Number(3.0)
        );
        assert_eq!(
            decode_single(Decoder::Auto, b"off").unwrap(),
            Value::Bool(false)
        );
        assert_eq!(
            decode_single(Decoder::Auto, b"\"x\"").unwrap(),
            Value::Text("x".into())
        );
        assert!(decode_single(Decoder::Json, br#"{"a":1}"#).is_err());
        assert_eq!(
            decode_single(Decoder::Json, b"true").unwrap(),
            Value::Bool(true)
        );
    }

    fn scalar() -> impl Strategy<Value = Json> {
        prop_oneof![
            any::<bool>().prop_map(Json::Bool),
            (-1e12f64..1e12).prop_map(|n| json!(n)),
            any::<i32>().prop_map(|n| json!(n)),
            ".{0,20}".prop_map(Json::String),
        ]
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(payload in proptest::collection::vec(any::<u8>(), 0..200)) {
            for decoder in [Decoder::Auto, Decoder::Json, Decoder::Number, Decoder::String, Decoder::Boolean] {
                let _ = decode(decoder, &payload);
                let _ = decode_single(decoder, &payload);
            }
        }

        #[test]
        fn objects_of_scalars_round_trip_into_rows(
            members in proptest::collection::btree_map("[a-z][a-z0-9_]{0,15}", scalar(), 0..20)
        ) {
            let payload = serde_json::to_vec(&members).unwrap();
            for decoder in [Decoder::Json, Decoder::Auto] {
                let decoded = decode(decoder, &payload).unwrap();
                prop_assert_eq!(decoded.len(), members.len());
                for ((name, value), (expected_name, expected)) in decoded.iter().zip(&members) {
                    prop_assert_eq!(name, expected_name);
                    let expected = json_scalar(expected.clone()).unwrap();
                    prop_assert_eq!(value, &expected);
                }
            }
        }
    }
}
