//! `/v1` administration: open, resolve and cancel incidents; the roster; caller erasure.
//!
//! - `POST /v1/incidents` `{"category","severity","summary"}` → 201, the record
//!   (`source: api`), queued and dispatched like a call's incident;
//! - `POST /v1/incidents/{id}/resolve|cancel` `[{"note"}]` → 200, the record;
//!   409 when already closed; whoever held it gets a `cancel` and is free again;
//! - `GET /v1/responders` → the roster with live connection, availability and channels;
//! - `PUT /v1/responders/{id}/availability` `{"status"}` → a supervisor sets it (contract §11);
//! - `DELETE /v1/callers/{number}` → `{"erased": n}`: number and name gone from
//!   every record, each one's timeline noting it (contract §7).
//!
//! Bodies are strict JSON (unknown fields refused); every error is JSON.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::{ApiState, error};
use crate::config::Settings;
use crate::dispatcher::Closed;
use crate::domain::classify::is_category_name;
use crate::domain::dispatch::{Availability, Channel};
use crate::domain::ids::normalize_id;
use crate::domain::incident::{Severity, State as IncidentState};
use crate::intake::{CallerStatus, Error};

const MAX_SUMMARY: usize = 500;
const MAX_NOTE: usize = 1000;
const MAX_NUMBER: usize = 128;

pub fn router() -> Router<ApiState> {
    Router::new()
        .route("/v1/incidents", post(open_incident))
        .route("/v1/incidents/{id}/resolve", post(resolve))
        .route("/v1/incidents/{id}/cancel", post(cancel))
        .route("/v1/responders", get(responders))
        .route("/v1/responders/{id}/availability", put(set_availability))
        .route("/v1/callers/{number}", delete(erase_caller))
        .route("/v1/callers/{number}/status", get(caller_status))
}

fn settings(st: &ApiState) -> Arc<Settings> {
    match st.settings.read() {
        Ok(g) => g.clone(),
        Err(p) => p.into_inner().clone(),
    }
}

fn unavailable(e: Error) -> Response {
    tracing::warn!(error = %e, "admin request not applied");
    error(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
}

/// Why a request is refused: its status and error text.
type Refusal = (StatusCode, String);

fn refuse((status, what): Refusal) -> Response {
    error(status, &what)
}

/// The body (413 when it is over the limit).
fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, Refusal> {
    body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => (StatusCode::PAYLOAD_TOO_LARGE, "body too large".into()),
        _ => (StatusCode::BAD_REQUEST, "body not readable".into()),
    })
}

/// Parses a JSON object body strictly; the error names what was wrong.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Refusal> {
    let bad = |what: String| (StatusCode::BAD_REQUEST, what);
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|_| bad("body is not valid JSON".into()))?;
    if !value.is_object() {
        return Err(bad("body must be a JSON object".into()));
    }
    serde_json::from_value(value).map_err(|e| bad(e.to_string()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewBody {
    category: String,
    severity: String,
    summary: String,
}

async fn open_incident(State(st): State<ApiState>, body: Result<Bytes, BytesRejection>) -> Response {
    let b: NewBody = match body_bytes(body).and_then(|body| parse(&body)) {
        Ok(b) => b,
        Err(r) => return refuse(r),
    };
    let Some(severity) = Severity::parse(&b.severity) else {
        return error(StatusCode::BAD_REQUEST, "severity must be critical, high, medium or low");
    };
    if !is_category_name(&b.category) {
        return error(StatusCode::BAD_REQUEST, "category must be 1 to 40 of a-z, 0-9, _ and -");
    }
    let summary = b.summary.trim();
    if summary.is_empty() || summary.chars().count() > MAX_SUMMARY {
        return error(StatusCode::BAD_REQUEST, "summary must be 1 to 500 characters");
    }
    let opened = match st.intake.open_manual(&b.category, severity, summary).await {
        Ok(o) => o,
        Err(e) => return unavailable(e),
    };
    match st.intake.incident(&opened.id).await {
        Ok(Some(inc)) => (StatusCode::CREATED, Json(inc)).into_response(),
        Ok(None) => error(StatusCode::INTERNAL_SERVER_ERROR, "incident vanished"),
        Err(e) => unavailable(e),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CloseBody {
    #[serde(default)]
    note: Option<String>,
}

type IdPath = Result<Path<String>, PathRejection>;

async fn resolve(st: State<ApiState>, id: IdPath, body: Result<Bytes, BytesRejection>) -> Response {
    close(st, id, body, IncidentState::Resolved).await
}

async fn cancel(st: State<ApiState>, id: IdPath, body: Result<Bytes, BytesRejection>) -> Response {
    close(st, id, body, IncidentState::Cancelled).await
}

async fn close(
    State(st): State<ApiState>,
    id: IdPath,
    body: Result<Bytes, BytesRejection>,
    to: IncidentState,
) -> Response {
    let Some(id) = id.ok().and_then(|Path(id)| normalize_id(&id)) else {
        return error(StatusCode::NOT_FOUND, "not_found");
    };
    let parsed = body_bytes(body).and_then(|body| {
        if body.iter().all(u8::is_ascii_whitespace) { Ok(CloseBody::default()) } else { parse(&body) }
    });
    let b = match parsed {
        Ok(b) => b,
        Err(r) => return refuse(r),
    };
    let note = b.note.unwrap_or_default();
    if note.chars().count() > MAX_NOTE {
        return error(StatusCode::BAD_REQUEST, "note must be at most 1000 characters");
    }
    let retention = settings(&st).privacy.retention;
    match st.dispatch.close(&id, to, note.trim(), retention).await {
        Ok(Closed::Done { .. }) => match st.intake.incident(&id).await {
            Ok(Some(inc)) => Json(inc).into_response(),
            Ok(None) => error(StatusCode::NOT_FOUND, "not_found"),
            Err(e) => unavailable(e),
        },
        Ok(Closed::NotFound) => error(StatusCode::NOT_FOUND, "not_found"),
        Ok(Closed::Conflict) => error(StatusCode::CONFLICT, "conflict"),
        Err(e) => unavailable(e),
    }
}

/// One roster member as `GET /v1/responders` shows it.
fn responder_json(
    r: &crate::config::ResponderConfig,
    p: crate::dispatcher::Presence,
    order: &[Channel],
) -> serde_json::Value {
    let mut v = json!({
        "id": r.id,
        "name": r.name,
        "tier": r.tier,
        "skills": r.skills,
        "connected": p.connected,
        "availability": p.availability.unwrap_or_else(|| "off_duty".into()),
    });
    // Extension (contract §11): its other channels, when it has any.
    let channels = r.channels(order);
    if !channels.is_empty() {
        v["channels"] = json!(channels);
    }
    v
}

async fn responders(State(st): State<ApiState>) -> Response {
    let s = settings(&st);
    let ids: Vec<String> = s.roster.iter().map(|r| r.id.clone()).collect();
    let presence = match st.dispatch.presence(&ids).await {
        Ok(p) => p,
        Err(e) => return unavailable(e),
    };
    let list: Vec<serde_json::Value> =
        s.roster.iter().zip(presence).map(|(r, p)| responder_json(r, p, &s.fallback.order)).collect();
    Json(json!({"responders": list})).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AvailabilityBody {
    status: String,
}

/// `PUT /v1/responders/{id}/availability` (contract §11): a supervisor puts a
/// responder on call (or off) — how responders who never open the console,
/// reached by PBX call, SIP MESSAGE or webhook, become `available`.
async fn set_availability(
    State(st): State<ApiState>,
    id: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let s = settings(&st);
    let Some(r) = id.ok().and_then(|Path(id)| s.roster.iter().find(|r| r.id == id).cloned()) else {
        return error(StatusCode::NOT_FOUND, "not_found");
    };
    let parsed = body_bytes(body).and_then(|b| {
        serde_json::from_slice::<AvailabilityBody>(&b)
            .map_err(|_| (StatusCode::BAD_REQUEST, "body must be {\"status\":\"available|busy|off_duty\"}".into()))
    });
    let availability = match parsed.map(|b| Availability::parse(&b.status)) {
        Ok(Some(a)) => a,
        Ok(None) => return error(StatusCode::BAD_REQUEST, "status must be available, busy or off_duty"),
        Err(refusal) => return refuse(refusal),
    };
    if let Err(e) = st.dispatch.availability(&r.id, availability).await {
        return unavailable(e);
    }
    tracing::info!(responder = %r.id, availability = availability.as_str(), actor = "api", "availability set by a supervisor");
    match st.dispatch.presence(std::slice::from_ref(&r.id)).await {
        Ok(mut p) if !p.is_empty() => Json(responder_json(&r, p.remove(0), &s.fallback.order)).into_response(),
        Ok(_) => error(StatusCode::NOT_FOUND, "not_found"),
        Err(e) => unavailable(e),
    }
}

/// The caller number of a `/v1/callers/{number}` path, checked. The path is
/// percent-decoded already (`%2B44…` → `+44…`).
fn caller_number(number: Result<Path<String>, PathRejection>) -> Option<String> {
    let Ok(Path(number)) = number else { return None };
    let number = number.trim();
    let ok = !number.is_empty() && number.len() <= MAX_NUMBER && !number.chars().any(char::is_control);
    ok.then(|| number.to_string())
}

async fn erase_caller(State(st): State<ApiState>, number: Result<Path<String>, PathRejection>) -> Response {
    let Some(number) = caller_number(number) else { return error(StatusCode::BAD_REQUEST, "bad caller number") };
    match st.intake.erase_caller(&number).await {
        Ok(n) => Json(json!({"erased": n})).into_response(),
        Err(e) => unavailable(e),
    }
}

/// Keeping callers informed (issue 5): the state of the caller's newest open
/// incident, in a form an IVR can speak. `eta_s` is there while a responder is
/// en route and gave one. No open incident: `{"state":"none"}`.
async fn caller_status(State(st): State<ApiState>, number: Result<Path<String>, PathRejection>) -> Response {
    let Some(number) = caller_number(number) else { return error(StatusCode::BAD_REQUEST, "bad caller number") };
    match st.intake.caller_status(&number).await {
        Ok(Some(CallerStatus { incident_id, state, eta_s })) => {
            let mut body =
                json!({"state": state.as_str(), "incident_id": incident_id, "message": spoken(state, eta_s)});
            if let Some(eta) = eta_s {
                body["eta_s"] = json!(eta);
            }
            Json(body).into_response()
        }
        Ok(None) => {
            Json(json!({"state": "none", "message": "There is no open incident for this number."})).into_response()
        }
        Err(e) => unavailable(e),
    }
}

/// One sentence for text-to-speech.
fn spoken(state: IncidentState, eta_s: Option<i64>) -> String {
    match state {
        IncidentState::Queued => "Your incident is logged and waiting for a responder.".into(),
        IncidentState::Offered => "Your incident is logged and a responder is being assigned.".into(),
        IncidentState::Acknowledged => "A responder has been assigned to your incident.".into(),
        IncidentState::EnRoute => match eta_s {
            Some(s) => {
                let min = ((s + 59) / 60).max(1);
                let unit = if min == 1 { "minute" } else { "minutes" };
                format!("A responder is on the way and should be with you in about {min} {unit}.")
            }
            None => "A responder is on the way.".into(),
        },
        IncidentState::OnScene => "A responder is on scene.".into(),
        IncidentState::Resolved | IncidentState::Cancelled => "Your incident is closed.".into(),
    }
}
