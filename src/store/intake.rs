//! Opening incidents and applying call events: `scripts/intake.lua`.
//!
//! The script takes its arguments as one JSON object built here from plain
//! values (`open` passes the record's fields and first timeline entries as
//! plain arguments after it: they are the bulk of every incoming call) and
//! answers one JSON object, decoded into [`Opened`] / [`Applied`].

use std::collections::HashMap;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::keys::Family;
use super::prelude::Script;
use super::{At, CALL_KEY_TTL_S, CALL_STATE_TTL_S, DEDUP_TTL_S, Result, Store, StoreError};
use crate::domain::incident::{NewIncident, Severity, State};
use crate::domain::policy::CorrelationSettings;
use crate::domain::timeline::Entry;

/// The correlation rules as the script takes them (absent = off).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Rules {
    #[serde(skip_serializing_if = "Option::is_none")]
    rep: Option<RepeatArgs>,
    #[serde(skip_serializing_if = "Option::is_none")]
    surge: Option<BurstArgs>,
}

#[derive(Debug, Clone, Serialize)]
struct RepeatArgs {
    window_ms: u64,
    raise_after: u32,
}

#[derive(Debug, Clone, Serialize)]
struct BurstArgs {
    count: u32,
    window_ms: u64,
    severity: Severity,
}

impl Rules {
    pub fn new(c: &CorrelationSettings) -> Rules {
        Rules {
            rep: c.repeat.enabled.then_some(RepeatArgs {
                window_ms: c.repeat.window.as_millis() as u64,
                raise_after: c.repeat.raise_after,
            }),
            surge: c.surge.enabled.then_some(BurstArgs {
                count: c.surge.count,
                window_ms: c.surge.window.as_millis() as u64,
                severity: c.surge.severity,
            }),
        }
    }

    /// No rule at all (incidents opened by hand through the API).
    pub fn none() -> Rules {
        Rules::default()
    }
}

/// What `open` did.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Opened {
    pub id: String,
    /// 1 when a new incident was written; 0 when the call (or, by the repeat
    /// rule, its caller) already had one.
    pub created: u8,
    /// Set when the call was attached to the caller's open incident: how many repeats it has now.
    #[serde(default)]
    pub repeat_calls: Option<u32>,
    /// The severity the incident was raised to by this repeat.
    #[serde(default)]
    pub raised: Option<Severity>,
    /// The caller's open incident of another category, now linked to this new one.
    #[serde(default)]
    pub related: Option<String>,
    /// The major incident the new incident belongs to (surge rule).
    #[serde(default)]
    pub major: Option<String>,
    /// True when this incident's arrival declared that major incident.
    #[serde(default)]
    pub major_created: bool,
    #[serde(default)]
    pub major_severity: Option<Severity>,
    #[serde(default)]
    pub members: u32,
    /// Whether a responder could take an offer when it was opened (absent:
    /// not known, taken as yes). Nobody idle: no dispatch pass is needed.
    #[serde(default = "yes")]
    pub idle: bool,
}

fn yes() -> bool {
    true
}

/// What `event` did.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Applied {
    /// The call's incident ("" when it has none).
    pub id: String,
    /// The event was applied before (same dedup key): nothing was written.
    #[serde(default)]
    pub duplicate: bool,
    /// The incident is the call's own (not one it was attached to as a repeat call).
    #[serde(default)]
    pub own: bool,
    /// The callback incident opened for this abandon (or the caller's open incident it went to).
    #[serde(default)]
    pub callback: Option<Opened>,
    /// The queue's abandon-storm incident, when there is one.
    #[serde(default)]
    pub storm: Option<String>,
    #[serde(default)]
    pub storm_created: bool,
    #[serde(default)]
    pub storm_severity: Option<Severity>,
}

/// One call event for the script.
#[derive(Debug, Clone, Default)]
pub struct EventWrite {
    pub call_key: String,
    pub source: String,
    /// The caller's pseudonym ("" when unknown), to list the call for erasure.
    pub pseudonym: String,
    /// What to remember of the call (field → value).
    pub state: Vec<(&'static str, String)>,
    pub dedup: Option<String>,
    /// Timeline entries for the call's incident, if it has one.
    pub entries: Vec<Entry>,
    /// Record fields to set on the call's incident (reclassification), and the
    /// entries that go with them: only when the incident is the call's own, not
    /// one a repeat call was attached to.
    pub changes: Vec<(&'static str, String)>,
    pub own_entries: Vec<Entry>,
    /// The incident to open when the call has none (callback rule).
    pub callback: Option<(NewIncident, Rules)>,
    /// The abandon-storm rule: queue, count, window, severity, wait.
    pub storm: Option<Storm>,
}

#[derive(Debug, Clone)]
pub struct Storm {
    pub queue: String,
    pub count: u32,
    pub window_ms: u64,
    pub severity: Severity,
    pub wait_seconds: Option<u32>,
}

/// The `open` arguments of the script for one new incident: a small JSON
/// object, the record's fields and its first timeline entries. `state` is what
/// to remember of the call for its later events (an INVITE's incident needs
/// nothing: its record has it).
pub(super) struct OpenArgs {
    json: Value,
    fields: Vec<(&'static str, String)>,
    timeline: Vec<String>,
}

fn open_args(n: &NewIncident, rules: &Rules, state: &[(&'static str, String)]) -> OpenArgs {
    let fields = vec![
        ("state", State::Queued.as_str().to_string()),
        ("severity", n.severity.as_str().to_string()),
        ("category", n.category.clone()),
        ("summary", n.summary.clone()),
        ("instructions", n.instructions.clone()),
        ("source", n.source.as_str().to_string()),
        ("call_id", n.call_id.clone()),
        ("call_key", n.call_key.clone()),
        ("caller", n.caller.clone()),
        ("caller_name", n.caller_name.clone()),
        ("caller_pseudonym", n.caller_pseudonym.clone()),
        ("ivr_path", n.ivr_path.to_string()),
        ("queue", n.queue.clone()),
        ("wait_seconds", n.wait_seconds.map(|w| w.to_string()).unwrap_or_default()),
        ("attempts", "0".to_string()),
        ("exhausted", "0".to_string()),
    ];
    OpenArgs {
        json: json!({
            "call_key": n.call_key,
            "call_ttl": CALL_KEY_TTL_S,
            "state_ttl": CALL_STATE_TTL_S,
            "pseudonym": n.caller_pseudonym,
            "age_ms": n.age_ms,
            "generic": n.generic,
            "state": state_map(state),
            "rules": rules,
        }),
        fields,
        timeline: n.timeline.iter().map(Entry::to_json).collect(),
    }
}

fn state_map(pairs: &[(&'static str, String)]) -> Map<String, Value> {
    pairs.iter().map(|(k, v)| ((*k).to_string(), json!(v))).collect()
}

impl OpenArgs {
    /// The call waited `d` more before its script ran: it was opened that much earlier.
    pub(super) fn add_age(&mut self, d: std::time::Duration) {
        let age = self.json["age_ms"].as_u64().unwrap_or(0);
        self.json["age_ms"] = json!(age + u64::try_from(d.as_millis()).unwrap_or(0));
    }

    /// All in one JSON object (the callback of an `event`, a rare path).
    fn into_json(self) -> Value {
        let mut v = self.json;
        let flat: Vec<String> = self.fields.into_iter().flat_map(|(k, v)| [k.to_string(), v]).collect();
        v["fields"] = json!(flat);
        v["timeline"] = json!(self.timeline);
        v
    }
}

impl Store {
    async fn run_intake<T: serde::de::DeserializeOwned>(
        &self,
        op: &str,
        args: &Value,
        at: At,
        what: &str,
    ) -> Result<T> {
        let mut inv = self.op(Script::Intake, op, at);
        inv.arg(args.to_string());
        // What a call's answer promises (202, an INFO's 200) waits for the
        // replicas; a feed lease does not.
        if matches!(op, "event" | "append") {
            self.run_json_durable(&inv, what).await
        } else {
            self.run_json(&inv, what).await
        }
    }

    /// Opens (or finds) the incidents of `calls` in one script call, in order;
    /// durable like every write a call's answer promises.
    pub(super) async fn open_batch(&self, calls: &[&OpenArgs], at: At) -> Result<Vec<Opened>> {
        let mut inv = self.op(Script::Intake, "open", at);
        let list: Vec<Value> = calls
            .iter()
            .map(|c| {
                let mut j = c.json.clone();
                j["nf"] = json!(c.fields.len());
                j["nt"] = json!(c.timeline.len());
                j
            })
            .collect();
        inv.arg(Value::Array(list).to_string());
        for c in calls {
            for (k, v) in &c.fields {
                inv.arg(*k).arg(v);
            }
            for t in &c.timeline {
                inv.arg(t);
            }
        }
        let outs: Vec<Opened> = self.run_json_durable(&inv, "open").await?;
        if outs.len() != calls.len() {
            return Err(StoreError::Corrupt("open".into(), "one answer per call expected"));
        }
        Ok(outs)
    }

    /// Opens the incident for a call, or finds the one already opened for the
    /// same call key, or (repeat rule) attaches the call to its caller's open
    /// incident. When this returns `Ok`, everything is in Redis.
    pub async fn open(
        &self,
        n: &NewIncident,
        rules: &Rules,
        state: &[(&'static str, String)],
        at: At,
    ) -> Result<Opened> {
        let args = open_args(n, rules, state);
        if at == At::Server
            && let Some(b) = self.batcher()
        {
            return b.open(args).await;
        }
        let mut outs = self.open_batch(&[&args], at).await?;
        outs.pop().ok_or(StoreError::Corrupt("open".into(), "one answer per call expected"))
    }

    /// Appends timeline entries that need no other change (`(incident, entry)`),
    /// in one round trip; entries of records that no longer exist are dropped.
    pub async fn append(&self, entries: &[(String, Entry)], at: At) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let flat: Vec<String> = entries.iter().flat_map(|(id, e)| [id.clone(), e.to_json()]).collect();
        let _: Value = self.run_intake("append", &json!(flat), at, "append").await?;
        Ok(())
    }

    /// Takes or keeps the lease of the PBX feed `name` for `holder`, for
    /// `ttl` from now (Redis's clock); with `release`, gives it up. Returns
    /// whether `holder` holds it now.
    pub async fn feed_lease(&self, name: &str, holder: &str, ttl: std::time::Duration, release: bool) -> Result<bool> {
        #[derive(Deserialize)]
        struct Lease {
            held: bool,
        }
        let args = json!({"name": name, "holder": holder, "ttl_ms": ttl.as_millis() as u64, "release": release});
        let lease: Lease = self.run_intake("lease", &args, At::Server, name).await?;
        Ok(lease.held)
    }

    /// One field of an incident's record.
    pub async fn field(&self, id: &str, name: &str) -> Result<Option<String>> {
        let mut c = self.conn()?;
        self.counted(c.hget(self.of(Family::Inc, id), name).await)
    }

    /// What is known of a call (`p:acall:<key>`), its incident id if any, and
    /// the store's time then (ms): the time the event is applied at.
    pub async fn call_state(&self, call_key: &str) -> Result<(HashMap<String, String>, Option<String>, i64)> {
        let mut c = self.conn()?;
        let (state, id, (s, us)): (HashMap<String, String>, Option<String>, (i64, i64)) = self.counted(
            redis::pipe()
                .hgetall(self.of(Family::CallState, call_key))
                .get(self.of(Family::Call, call_key))
                .cmd("TIME")
                .query_async(&mut c)
                .await,
        )?;
        Ok((state, id, s * 1000 + us / 1000))
    }

    /// Applies one call event atomically: the call's state, its incident's
    /// timeline and fields, the callback and abandon-storm rules.
    pub async fn apply_event(&self, w: &EventWrite, at: At) -> Result<Applied> {
        let mut args = Map::new();
        args.insert("call_key".into(), json!(w.call_key));
        args.insert("call_ttl".into(), json!(CALL_STATE_TTL_S));
        args.insert("source".into(), json!(w.source));
        args.insert("pseudonym".into(), json!(w.pseudonym));
        args.insert("state".into(), Value::Object(state_map(&w.state)));
        if let Some(d) = &w.dedup {
            args.insert("dedup".into(), json!(d));
            args.insert("dedup_ttl".into(), json!(DEDUP_TTL_S));
        }
        if !w.entries.is_empty() {
            args.insert("entries".into(), json!(w.entries.iter().map(Entry::to_json).collect::<Vec<_>>()));
        }
        if !w.own_entries.is_empty() {
            let own: Vec<String> = w.own_entries.iter().map(Entry::to_json).collect();
            args.insert("own_entries".into(), json!(own));
        }
        if !w.changes.is_empty() {
            args.insert("changes".into(), Value::Object(state_map(&w.changes)));
        }
        if let Some((n, rules)) = &w.callback {
            // The event itself remembers what is known of the call.
            args.insert("callback".into(), open_args(n, rules, &[]).into_json());
        }
        if let Some(s) = &w.storm {
            let mut storm =
                json!({"queue": s.queue, "count": s.count, "window_ms": s.window_ms, "severity": s.severity});
            if let Some(wait) = s.wait_seconds {
                storm["wait_seconds"] = json!(wait);
            }
            args.insert("storm".into(), storm);
        }
        self.run_intake("event", &Value::Object(args), at, &w.call_key).await
    }

    /// The newest open incident of a caller (by pseudonym), with what an IVR
    /// needs to tell them: `(id, state, eta_ms)`, and the store's time (ms).
    pub async fn caller_open_incident(&self, pseudonym: &str) -> Result<(Option<(String, State, Option<i64>)>, i64)> {
        let now = self.server_ms().await?;
        let mut c = self.conn()?;
        let ids: Vec<String> = self.counted(c.smembers(self.of(Family::Caller, pseudonym)).await)?;
        if ids.is_empty() {
            return Ok((None, now));
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HMGET").arg(self.of(Family::Inc, id)).arg("state").arg("opened_ms").arg("eta_ms");
        }
        let rows: Vec<(Option<String>, Option<String>, Option<String>)> =
            self.counted(pipe.query_async(&mut c).await)?;
        let mut best: Option<(i64, String, State, Option<i64>)> = None;
        for (id, (state, opened, eta)) in ids.into_iter().zip(rows) {
            let Some(state) = state.as_deref().and_then(State::parse) else { continue };
            if state.is_closed() {
                continue;
            }
            let opened: i64 = opened.and_then(|o| o.parse().ok()).unwrap_or(0);
            if best.as_ref().is_none_or(|b| opened > b.0) {
                best = Some((opened, id, state, eta.and_then(|e| e.parse().ok())));
            }
        }
        Ok((best.map(|(_, id, state, eta)| (id, state, eta)), now))
    }
}
