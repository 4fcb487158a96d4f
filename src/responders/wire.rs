//! Responder frames (contract §4): one JSON object per text frame.
//! Parsing is strict and never panics; every refusal names what was wrong.

use serde_json::{Map, Value, json};

use crate::domain::dispatch::{Availability, Offer, Reminder};
use crate::domain::incident::State;
use crate::domain::timeline::timestamp_ms;

/// Longest text frame we read as a request; longer ones get `bad_request`.
pub const MAX_FRAME: usize = 16 * 1024;
/// Longest `note` or `reason` kept.
const MAX_TEXT: usize = 1000;
/// Largest `eta_s` accepted: one day.
const MAX_ETA_S: u64 = 86_400;

#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    Hello {
        token: String,
    },
    Ack {
        dispatch_id: String,
    },
    Decline {
        dispatch_id: String,
        reason: String,
    },
    /// `eta_s` (extension): seconds until the responder expects to be on scene, with `en_route`.
    Status {
        incident_id: String,
        status: State,
        note: String,
        eta_s: Option<u32>,
    },
    Availability {
        status: Availability,
    },
}

/// A frame that could not be used: the client's `id` (if any) and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub reference: Option<Value>,
    pub message: String,
}

fn field(obj: &Map<String, Value>, name: &str, max: usize) -> Result<String, String> {
    match obj.get(name) {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= max => Ok(s.clone()),
        Some(Value::String(s)) if s.is_empty() => Err(format!("{name} is empty")),
        Some(Value::String(_)) => Err(format!("{name} is too long")),
        Some(_) => Err(format!("{name} must be a string")),
        None => Err(format!("{name} is missing")),
    }
}

fn optional(obj: &Map<String, Value>, name: &str) -> Result<String, String> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.chars().filter(|c| !c.is_control()).take(MAX_TEXT).collect()),
        Some(_) => Err(format!("{name} must be a string")),
    }
}

/// Parses one text frame. Returns the client's `id` with the message.
pub fn parse(text: &str) -> Result<(Option<Value>, Inbound), Refused> {
    if text.len() > MAX_FRAME {
        return Err(Refused { reference: None, message: format!("frame larger than {MAX_FRAME} bytes") });
    }
    let value: Value =
        serde_json::from_str(text).map_err(|_| Refused { reference: None, message: "not JSON".into() })?;
    let Value::Object(obj) = value else {
        return Err(Refused { reference: None, message: "not a JSON object".into() });
    };
    let reference = obj.get("id").filter(|v| v.is_string() || v.is_number()).cloned();
    let refuse = |message: String| Refused { reference: reference.clone(), message };
    let kind = match obj.get("type") {
        Some(Value::String(t)) => t.as_str(),
        _ => return Err(refuse("type is missing".into())),
    };
    let msg = match kind {
        "hello" => Inbound::Hello { token: field(&obj, "token", 1024).map_err(refuse)? },
        "ack" => Inbound::Ack { dispatch_id: field(&obj, "dispatch_id", 128).map_err(refuse)? },
        "decline" => Inbound::Decline {
            dispatch_id: field(&obj, "dispatch_id", 128).map_err(refuse)?,
            reason: optional(&obj, "reason").map_err(refuse)?,
        },
        "status" => {
            let status = field(&obj, "status", 32).map_err(refuse)?;
            let Some(status) = State::parse(&status).filter(|s| State::REPORTABLE.contains(s)) else {
                return Err(refuse("status must be en_route, on_scene or resolved".into()));
            };
            let eta_s = match obj.get("eta_s") {
                None | Some(Value::Null) => None,
                Some(v) => match v.as_u64() {
                    Some(n) if n <= MAX_ETA_S => Some(n as u32),
                    _ => return Err(refuse(format!("eta_s must be whole seconds, 0 to {MAX_ETA_S}"))),
                },
            };
            Inbound::Status {
                incident_id: field(&obj, "incident_id", 64).map_err(refuse)?,
                status,
                note: optional(&obj, "note").map_err(refuse)?,
                eta_s,
            }
        }
        "availability" => {
            let status = field(&obj, "status", 32).map_err(refuse)?;
            let Some(status) = Availability::parse(&status) else {
                return Err(refuse("status must be available, busy or off_duty".into()));
            };
            Inbound::Availability { status }
        }
        _ => return Err(refuse("unknown type".into())),
    };
    Ok((reference, msg))
}

fn with_ref(mut v: Value, reference: Option<&Value>) -> String {
    if let (Some(r), Value::Object(o)) = (reference, &mut v) {
        o.insert("ref".into(), r.clone());
    }
    v.to_string()
}

pub fn ok(reference: Option<&Value>) -> String {
    with_ref(json!({"type": "ok"}), reference)
}

pub fn error(reference: Option<&Value>, code: &str, message: &str) -> String {
    with_ref(json!({"type": "error", "code": code, "message": message}), reference)
}

pub fn welcome(responder_id: &str, heartbeat_s: u64) -> String {
    json!({"type": "welcome", "responder_id": responder_id, "heartbeat_s": heartbeat_s}).to_string()
}

/// The `reminder` frame (contract §11): an acknowledged incident waits for `due`.
pub fn reminder(r: &Reminder) -> String {
    json!({"type": "reminder", "incident_id": r.incident_id, "due": r.due, "since": timestamp_ms(r.since_ms)})
        .to_string()
}

/// The `dispatch` frame of an offer (caller already masked).
pub fn dispatch(o: &Offer) -> String {
    json!({
        "type": "dispatch",
        "dispatch_id": o.dispatch_id,
        "incident_id": o.incident_id,
        "attempt": o.attempt,
        "severity": o.severity,
        "category": o.category,
        "summary": o.summary,
        "instructions": o.instructions,
        "caller": o.caller,
        "queue": o.queue,
        "opened_at": timestamp_ms(o.opened_ms),
        "ack_by": timestamp_ms(o.ack_by_ms),
        // Extension: a major incident (surge or abandon storm).
        "major": o.major,
    })
    .to_string()
}

pub fn cancel(dispatch_id: &str, reason: &str) -> String {
    json!({"type": "cancel", "dispatch_id": dispatch_id, "reason": reason}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_kind() {
        assert_eq!(
            parse(r#"{"type":"ack","dispatch_id":"INC-00011.1","id":7}"#).unwrap(),
            (Some(json!(7)), Inbound::Ack { dispatch_id: "INC-00011.1".into() })
        );
        assert!(matches!(parse(r#"{"type":"status","incident_id":"I","status":"on_scene"}"#).unwrap().1,
            Inbound::Status { ref note, .. } if note.is_empty()));
        assert!(matches!(
            parse(r#"{"type":"status","incident_id":"I","status":"en_route","eta_s":600}"#).unwrap().1,
            Inbound::Status { eta_s: Some(600), .. }
        ));
        for bad in [r#""10""#, "-1", "1.5", "86401"] {
            let frame = format!(r#"{{"type":"status","incident_id":"I","status":"en_route","eta_s":{bad}}}"#);
            assert!(parse(&frame).unwrap_err().message.contains("eta_s"), "{bad}");
        }
        assert!(matches!(parse(r#"{"type":"availability","status":"busy"}"#).unwrap().1, Inbound::Availability { .. }));
        assert!(matches!(parse(r#"{"type":"decline","dispatch_id":"d","reason":"too far"}"#).unwrap().1,
            Inbound::Decline { ref reason, .. } if reason == "too far"));
    }

    #[test]
    fn refusals_keep_the_reference() {
        let e = parse(r#"{"type":"ack","id":"x1"}"#).unwrap_err();
        assert_eq!(e.reference, Some(json!("x1")));
        assert!(e.message.contains("dispatch_id"));
        assert_eq!(parse(r#"{"type":"status","incident_id":"I","status":"lost"}"#).unwrap_err().reference, None);
        assert!(parse("[1,2]").is_err());
        assert!(parse("{").is_err());
        assert!(parse(r#"{"type":"nope"}"#).is_err());
        assert!(parse(r#"{"type":42}"#).is_err());
        assert!(parse(&format!(r#"{{"type":"ack","dispatch_id":"{}"}}"#, "x".repeat(MAX_FRAME))).is_err());
        assert_eq!(
            error(Some(&json!("r")), "bad_request", "m"),
            r#"{"code":"bad_request","message":"m","ref":"r","type":"error"}"#
        );
        assert_eq!(ok(None), r#"{"type":"ok"}"#);
    }
}
