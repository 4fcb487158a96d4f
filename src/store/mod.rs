//! Redis: the only module that talks to it.
//!
//! Keys, all under `redis.prefix` (`p`):
//! - `p:seq` — the incident counter (ids are unique across daemons);
//! - `p:call:<call key>` — call key (X-Call-Ref or Call-ID) → incident id, so a
//!   retransmitted or re-sent INVITE never opens a second incident;
//! - `p:inc:<id>` — the record (hash); `p:inc:<id>:tl` — its timeline (list of JSON, append-only);
//! - `p:incidents` — every incident by opening time (zset, ms);
//! - `p:queue` — waiting incidents, severity first then oldest (zset, see [`queue_score`]);
//! - `p:deadlines`, `p:idle`, `p:roster`, `p:resp:<rid>`, `p:inc:<id>:tried` — dispatch
//!   state, described in `scripts/dispatch.lua` and used through [`dispatch`];
//! - `p:acall:<call key>`, `p:dedup:*`, `p:repeat:*`, `p:surge:*`, `p:major:*`,
//!   `p:abandons:*`, `p:storm:*`, `p:inc:<id>:members` — call events and the
//!   correlation rules, described in `scripts/intake.lua` and used through [`intake`];
//! - `p:closed` (+ `p:closed:cursor`) — resolved/cancelled incidents awaiting expiry, and
//!   `p:caller:<pseudonym>` — a caller's incidents, for erasure (see [`admin`]).
//!
//! Every change that must be atomic is one Lua script in `scripts/`. The
//! connection manager reconnects by itself; every failed command counts in
//! `dispatchd_redis_errors_total` here and nowhere else.

use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};

use crate::incident::{Incident, Severity, Source, State, TimelineEntry, timestamp_ms};
use crate::telemetry::metric;

pub mod admin;
pub mod dispatch;
pub mod intake;
pub mod report;

/// How long a call key keeps pointing at its incident (re-sends of an INVITE come within this).
const CALL_KEY_TTL_S: u64 = 86_400;
/// How long what intake remembers of a call (caller, queue, IVR path) is kept.
const CALL_STATE_TTL_S: u64 = 6 * 3600;
/// How long an applied call event (SIP MESSAGE, PBX feed delivery) is remembered,
/// so a re-sent one is not applied twice. Re-sends come within seconds.
const DEDUP_TTL_S: u64 = 600;
/// How many records a filtered list reads at most to fill one page.
const LIST_SCAN_MAX: isize = 5_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("corrupt record {0}: {1}")]
    Corrupt(String, &'static str),
}

impl StoreError {
    /// True when Redis could not be reached or did not answer (in time): the
    /// same request may succeed later. False for an answer that will not change
    /// on a retry (a script error, an unreadable record).
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Redis(e) => {
                e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || !matches!(e.retry_method(), redis::RetryMethod::NoRetry)
                    // Out of memory, failing to persist, busy with a script: it passes.
                    || matches!(e.code(), Some("OOM" | "MISCONF" | "BUSY" | "LOADING" | "READONLY"))
            }
            StoreError::Corrupt(..) => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// What an incident is opened with.
#[derive(Debug, Clone)]
pub struct NewIncident {
    pub call_key: String,
    pub call_id: String,
    pub source: Source,
    pub caller: String,
    pub caller_name: String,
    /// `incident::pseudonym` of the caller ("" when unknown): the key of the
    /// erasure index, so the number itself never appears in a key name.
    pub caller_pseudonym: String,
    pub ivr_path: Vec<String>,
    pub queue: String,
    pub wait_seconds: Option<u32>,
    pub category: String,
    pub severity: Severity,
    pub summary: String,
    pub instructions: String,
    pub opened_at: DateTime<Utc>,
    /// The first timeline entries (opened, classified, queued).
    pub timeline: Vec<TimelineEntry>,
}

/// Filters of `GET /v1/incidents`.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub state: Option<State>,
    pub severity: Option<Severity>,
    pub limit: usize,
}

/// The queue orders by this score: severity rank, then opening time in ms
/// (13 digits until the year 2286, so the sum is exact in a double).
pub fn queue_score(severity: Severity, opened_ms: i64) -> String {
    format!("{}{:013}", severity.rank(), opened_ms.max(0))
}

#[derive(Clone)]
pub struct Store {
    conn: ConnectionManager,
    url: String,
    prefix: String,
    intake: Script,
    dispatch: Script,
}

impl Store {
    /// Creates the store; the connection is made lazily and remade after failures.
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<Store> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Store {
            conn,
            url: url.to_string(),
            prefix: prefix.to_string(),
            intake: Script::new(concat!(include_str!("scripts/common.lua"), include_str!("scripts/intake.lua"))),
            dispatch: Script::new(concat!(include_str!("scripts/common.lua"), include_str!("scripts/dispatch.lua"))),
        })
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.prefix.clone();
        for p in parts {
            k.push(':');
            k.push_str(p);
        }
        k
    }

    fn counted<T>(r: std::result::Result<T, redis::RedisError>) -> Result<T> {
        r.map_err(|e| {
            metrics::counter!(metric::REDIS_ERRORS).increment(1);
            StoreError::Redis(e)
        })
    }

    /// Whether Redis answers right now.
    pub async fn ping(&self) -> Result<()> {
        let mut c = self.conn.clone();
        Self::counted(redis::cmd("PING").query_async::<String>(&mut c).await).map(|_| ())
    }

    /// Appends one timeline entry to each of several incidents, in one round
    /// trip. For entries that need no other change (e.g. `delivered`).
    pub async fn append_many(&self, entries: &[(String, TimelineEntry)]) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (id, e) in entries {
            pipe.rpush(format!("{}:tl", self.key(&["inc", id])), e.to_json()).ignore();
        }
        let mut c = self.conn.clone();
        Self::counted(pipe.query_async::<()>(&mut c).await)
    }

    /// One incident with its timeline.
    pub async fn get(&self, id: &str) -> Result<Option<Incident>> {
        let rec = self.key(&["inc", id]);
        let mut c = self.conn.clone();
        let (fields, tl, mut members): (Vec<(String, String)>, Vec<String>, Vec<String>) = Self::counted(
            redis::pipe()
                .hgetall(&rec)
                .lrange(format!("{rec}:tl"), 0, -1)
                .smembers(format!("{rec}:members"))
                .query_async(&mut c)
                .await,
        )?;
        if fields.is_empty() {
            return Ok(None);
        }
        let mut inc = record(id, fields)?;
        members.sort();
        inc.members = members;
        let timeline = tl
            .iter()
            .map(|t| serde_json::from_str(t).map_err(|_| StoreError::Corrupt(id.to_string(), "timeline entry")))
            .collect::<Result<Vec<TimelineEntry>>>()?;
        inc.timeline = Some(timeline);
        Ok(Some(inc))
    }

    /// Newest first, without timelines.
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<Incident>> {
        let limit = filter.limit.clamp(1, 500);
        let mut c = self.conn.clone();
        let mut out = Vec::new();
        let page: isize = 200;
        let mut start: isize = 0;
        while out.len() < limit && start < LIST_SCAN_MAX {
            let ids: Vec<String> = Self::counted(c.zrevrange(self.key(&["incidents"]), start, start + page - 1).await)?;
            if ids.is_empty() {
                break;
            }
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.hgetall(self.key(&["inc", id]));
            }
            let recs: Vec<Vec<(String, String)>> = Self::counted(pipe.query_async(&mut c).await)?;
            for (id, fields) in ids.iter().zip(recs) {
                if fields.is_empty() {
                    continue; // expired record
                }
                let inc = record(id, fields)?;
                if filter.state.is_some_and(|s| s != inc.state) || filter.severity.is_some_and(|s| s != inc.severity) {
                    continue;
                }
                out.push(inc);
                if out.len() == limit {
                    break;
                }
            }
            start += page;
        }
        Ok(out)
    }

    /// Waiting incidents per severity (for `dispatchd_queue_depth`).
    pub async fn queue_depths(&self) -> Result<Vec<(Severity, u64)>> {
        let mut c = self.conn.clone();
        let key = self.key(&["queue"]);
        let mut pipe = redis::pipe();
        for s in Severity::ALL {
            // Scores of one severity lie in [rank·10¹³, (rank+1)·10¹³).
            let lo = queue_score(s, 0);
            let hi = format!("({}", u64::from(s.rank() + 1) * 10_000_000_000_000);
            pipe.zcount(&key, lo, hi);
        }
        let counts: Vec<u64> = Self::counted(pipe.query_async(&mut c).await)?;
        Ok(Severity::ALL.into_iter().zip(counts).collect())
    }
}

/// Builds an [`Incident`] from its hash fields.
fn record(id: &str, fields: Vec<(String, String)>) -> Result<Incident> {
    let corrupt = |what| StoreError::Corrupt(id.to_string(), what);
    let mut inc = Incident {
        id: id.to_string(),
        state: State::Queued,
        severity: Severity::Medium,
        category: String::new(),
        summary: String::new(),
        source: Source::Sip,
        call_id: String::new(),
        caller: String::new(),
        caller_name: String::new(),
        ivr_path: Vec::new(),
        queue: String::new(),
        wait_seconds: None,
        opened_at: String::new(),
        assigned_to: None,
        attempts: 0,
        exhausted: false,
        major: false,
        major_incident: None,
        members: Vec::new(),
        repeat_calls: 0,
        timeline: None,
    };
    for (k, v) in fields {
        match k.as_str() {
            "state" => inc.state = State::parse(&v).ok_or_else(|| corrupt("state"))?,
            "severity" => inc.severity = Severity::parse(&v).ok_or_else(|| corrupt("severity"))?,
            "category" => inc.category = v,
            "summary" => inc.summary = v,
            "source" => {
                inc.source = match v.as_str() {
                    "sip" => Source::Sip,
                    "ami" => Source::Ami,
                    "esl" => Source::Esl,
                    "api" => Source::Api,
                    _ => return Err(corrupt("source")),
                }
            }
            "call_id" => inc.call_id = v,
            "caller" => inc.caller = v,
            "caller_name" => inc.caller_name = v,
            "ivr_path" => inc.ivr_path = crate::classify::split_path(&v),
            "queue" => inc.queue = v,
            "wait_seconds" => inc.wait_seconds = v.parse().ok(),
            "opened_ms" => inc.opened_at = timestamp_ms(v.parse().map_err(|_| corrupt("opened_ms"))?),
            "assigned_to" if !v.is_empty() => inc.assigned_to = Some(v),
            "attempts" => inc.attempts = v.parse().unwrap_or(0),
            "exhausted" => inc.exhausted = v == "1",
            "major" => inc.major = v == "1",
            "major_incident" if !v.is_empty() => inc.major_incident = Some(v),
            "repeat_calls" => inc.repeat_calls = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    Ok(inc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_is_told_from_an_answer_that_will_not_change() {
        let refused: redis::RedisError = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused").into();
        assert!(StoreError::Redis(refused).is_unavailable());
        let loading: redis::RedisError =
            (redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading), "loading").into();
        assert!(StoreError::Redis(loading).is_unavailable());
        let script: redis::RedisError =
            (redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError), "user_script:1: bad").into();
        assert!(!StoreError::Redis(script).is_unavailable());
        assert!(!StoreError::Corrupt("INC-1".into(), "state").is_unavailable());
    }

    #[test]
    fn queue_score_orders_severity_then_age() {
        let a = queue_score(Severity::Critical, 1_800_000_000_000);
        let b = queue_score(Severity::High, 1_000_000_000_000);
        let c = queue_score(Severity::High, 1_000_000_000_001);
        let (a, b, c): (f64, f64, f64) = (a.parse().unwrap(), b.parse().unwrap(), c.parse().unwrap());
        assert!(a < b && b < c);
        assert_eq!(c - b, 1.0, "exact in a double");
    }
}
