//! The HTTP ops plane (contract §6): health, metrics, and the `/v1` API.
//!
//! `/v1` answers need the admin bearer token, compared by its SHA-256 in
//! constant time; every error is JSON.
//!
//! - this file: health, metrics, reading incidents;
//! - `admin.rs`: opening, resolving and cancelling incidents, the roster, caller erasure;
//! - `report.rs`: the post-incident review report.

pub mod admin;
pub mod report;
pub mod server;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{Path, Query, RawQuery, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::dispatcher::Dispatch;
use crate::domain::ids::normalize_id;
use crate::domain::incident::{ListFilter, Severity, State as IncidentState};
use crate::intake::Intake;

#[derive(Clone)]
pub struct ApiState {
    /// The door for incidents: opening, reading, erasing.
    pub intake: Arc<Intake>,
    /// The door for offers and assignments: resolve, cancel, presence.
    pub dispatch: Arc<Dispatch>,
    /// The settings in force (roster, privacy, targets).
    pub settings: Arc<std::sync::RwLock<Arc<crate::config::Settings>>>,
    pub metrics: PrometheusHandle,
    /// True once every listener is bound (and stays true).
    pub listening: Arc<AtomicBool>,
    /// True while Redis answers.
    pub redis_up: Arc<AtomicBool>,
    /// SHA-256 of the admin token; None = nobody is admitted.
    pub admin_sha256: Option<[u8; 32]>,
}

pub(crate) fn error(status: StatusCode, what: &str) -> Response {
    (status, Json(json!({"error": what}))).into_response()
}

pub fn router(state: ApiState) -> Router {
    let v1 = Router::new()
        .route("/v1/incidents", get(list_incidents))
        .route("/v1/incidents/{id}", get(get_incident))
        .merge(admin::router())
        .merge(report::router())
        .route_layer(middleware::from_fn_with_state(state.clone(), admin_only));
    Router::new()
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(v1)
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found") })
        .method_not_allowed_fallback(|| async { error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed") })
        .layer(middleware::from_fn(server::within_time))
        .with_state(state)
}

/// Parses `-` / `admin_token_sha256` into bytes (validated by config already).
pub fn admin_hash(hex_sha256: &str) -> Option<[u8; 32]> {
    let v = hex::decode(hex_sha256).ok()?;
    v.try_into().ok()
}

/// Constant-time comparison of a presented token against the configured hash.
pub fn token_matches(presented: &str, expected: &[u8; 32]) -> bool {
    let got = Sha256::digest(presented.as_bytes());
    got.iter().zip(expected.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

async fn admin_only(State(st): State<ApiState>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match (presented, &st.admin_sha256) {
        (Some(tok), Some(expected)) if token_matches(tok, expected) => next.run(req).await,
        _ => error(StatusCode::UNAUTHORIZED, "unauthorized"),
    }
}

async fn readyz(State(st): State<ApiState>) -> Response {
    let listening = st.listening.load(Ordering::Relaxed);
    let redis = st.redis_up.load(Ordering::Relaxed);
    let body = Json(json!({"listening": listening, "redis": redis}));
    if listening && redis {
        (StatusCode::OK, body).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}

async fn metrics(State(st): State<ApiState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], st.metrics.render()).into_response()
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    state: Option<String>,
    severity: Option<String>,
    limit: Option<String>,
}

/// The filter of `GET /v1/incidents?state=&severity=&limit=` from its raw
/// query string; the error names what was wrong.
pub fn list_filter(raw_query: Option<&str>) -> Result<ListFilter, &'static str> {
    let q: ListQuery = serde_urlencoded_query(raw_query.unwrap_or_default()).ok_or("bad query string")?;
    let state = match q.state.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(IncidentState::parse(s).ok_or("unknown state")?),
    };
    let severity = match q.severity.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(Severity::parse(s).ok_or("unknown severity")?),
    };
    let limit = match q.limit.as_deref().filter(|s| !s.is_empty()) {
        None => 50,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=500).contains(&n) => n,
            _ => return Err("limit must be 1 to 500"),
        },
    };
    Ok(ListFilter { state, severity, limit })
}

/// A query string decoded into `T` as axum's `Query` does; None when it cannot be.
pub(crate) fn serde_urlencoded_query<T: serde::de::DeserializeOwned>(raw: &str) -> Option<T> {
    let uri: axum::http::Uri = format!("/?{raw}").parse().ok()?;
    Query::<T>::try_from_uri(&uri).ok().map(|Query(q)| q)
}

async fn list_incidents(State(st): State<ApiState>, RawQuery(raw): RawQuery) -> Response {
    let filter = match list_filter(raw.as_deref()) {
        Ok(f) => f,
        Err(what) => return error(StatusCode::BAD_REQUEST, what),
    };
    match st.intake.list(&filter).await {
        Ok(incidents) => Json(json!({"incidents": incidents})).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "listing incidents failed");
            error(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
        }
    }
}

async fn get_incident(
    State(st): State<ApiState>,
    id: Result<Path<String>, axum::extract::rejection::PathRejection>,
) -> Response {
    let Some(id) = id.ok().and_then(|Path(id)| normalize_id(&id)) else {
        return error(StatusCode::NOT_FOUND, "not_found");
    };
    match st.intake.incident(&id).await {
        Ok(Some(inc)) => Json(inc).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "not_found"),
        Err(e) => {
            tracing::warn!(incident_id = %id, error = %e, "reading incident failed");
            error(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
        }
    }
}
