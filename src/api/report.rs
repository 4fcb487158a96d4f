//! `GET /v1/report?since=&until=`: the post-incident review report.
//!
//! `since` and `until` are RFC 3339 (`until` exclusive), both required, at most
//! 366 days apart; incidents are selected by opening time. The body is
//! [`crate::report::Report`], the same that `dispatchd report --format json` prints.

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use super::{ApiState, error};
use crate::report::{Range, compute, parse_range};

pub fn router() -> Router<ApiState> {
    Router::new().route("/v1/report", get(report))
}

#[derive(Debug, Deserialize)]
struct ReportQuery {
    since: Option<String>,
    until: Option<String>,
}

/// The range of `GET /v1/report?since=&until=` from its raw query string.
pub fn report_range(raw_query: Option<&str>) -> Result<Range, String> {
    let q: ReportQuery =
        super::serde_urlencoded_query(raw_query.unwrap_or_default()).ok_or_else(|| "bad query string".to_string())?;
    parse_range(q.since.as_deref(), q.until.as_deref())
}

async fn report(State(st): State<ApiState>, RawQuery(raw): RawQuery) -> Response {
    let range = match report_range(raw.as_deref()) {
        Ok(r) => r,
        Err(what) => return error(StatusCode::BAD_REQUEST, &what),
    };
    let targets = match st.settings.read() {
        Ok(g) => g.targets.clone(),
        Err(p) => p.into_inner().targets.clone(),
    };
    match st.intake.report_facts(range.since_ms, range.until_ms).await {
        // A long range is seconds of arithmetic: on the blocking pool, not on
        // the threads that answer calls (`runtime.worker_threads`, 1 by default).
        Ok(facts) => match tokio::task::spawn_blocking(move || compute(&range, &facts, &targets)).await {
            Ok(report) => Json(report).into_response(),
            Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "report_failed"),
        },
        Err(e) => {
            tracing::warn!(error = %e, "report not read");
            error(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable")
        }
    }
}
