//! Applying call events from any source (SIP MESSAGE, AMI, ESL): the call's
//! state, its incident's timeline and fields, and the callback and
//! abandon-storm rules, in one script call per event.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::json;

use super::{Intake, Result};
use crate::domain::call::{CallEvent, CallFacts, EventKind};
use crate::domain::classify::Classification;
use crate::domain::incident::{NewIncident, Severity, Source};
use crate::domain::ivr::IvrPath;
use crate::domain::timeline::{Entry, Event};
use crate::store::At;
use crate::store::intake::{EventWrite, Rules, Storm};
use crate::telemetry::metric;

/// What applying a call event did.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The call's incident, when it has one (after this event).
    pub incident: Option<String>,
    /// The event was applied before (a re-sent MESSAGE): nothing changed.
    pub duplicate: bool,
}

/// The call's facts from an event and what was remembered of the call before.
fn facts_of(ev: &CallEvent, state: &HashMap<String, String>) -> CallFacts {
    let pick = |own: &str, key: &str| {
        if own.is_empty() { state.get(key).cloned().unwrap_or_default() } else { own.to_string() }
    };
    let remembered = || state.get("ivr_path").map(|p| IvrPath::lenient(p)).unwrap_or_default();
    let ivr_path = match ev.kind {
        EventKind::Dtmf => {
            let mut p = remembered();
            if let Some(key) = ev.ivr_path.selections().first().and_then(|k| k.chars().next()) {
                p.push_key(key);
            }
            p
        }
        _ if !ev.ivr_path.is_empty() => ev.ivr_path.clone(),
        _ => remembered(),
    };
    CallFacts {
        call_id: if ev.call_id.is_empty() { ev.call_ref.clone() } else { ev.call_id.clone() },
        call_key: ev.call_ref.clone(),
        // The caller's number and name only as this event carries them: what
        // is remembered of a call keeps the caller's pseudonym, never the
        // number (contract §7: the number lives only in the incident record).
        caller: ev.caller.clone(),
        caller_name: ev.caller_name.clone(),
        ivr_path,
        queue: pick(&ev.queue, "queue"),
        wait_seconds: ev.wait_seconds,
        ruri_user: ev.ruri_user.clone(),
        ruri_host: None,
    }
}

/// Seconds waited in the queue: as the PBX said, else since the join we heard.
fn waited(ev: &CallEvent, state: &HashMap<String, String>, now_ms: i64) -> Option<u32> {
    ev.wait_seconds.or_else(|| {
        let joined: i64 = state.get("joined_ms")?.parse().ok()?;
        u32::try_from((now_ms - joined).max(0) / 1000).ok()
    })
}

impl Intake {
    /// Applies one call event from any source. On `Ok` it is durably in Redis
    /// (for SIP MESSAGE: the 202 may be sent).
    pub async fn apply(&self, ev: CallEvent) -> Result<Outcome> {
        let (source, kind) = (ev.source, ev.kind);
        let out = self.apply_once(ev.clean()).await?;
        if !out.duplicate {
            metrics::counter!(metric::CALL_EVENTS, "source" => source.as_str(), "event" => kind.as_str()).increment(1);
        }
        Ok(out)
    }

    async fn apply_once(&self, ev: CallEvent) -> Result<Outcome> {
        let live = self.live();
        // The event happens at the store's time of this read.
        let (mut state, existing, now) = self.store.call_state(&ev.call_ref).await?;
        let at = At::Ms(now);
        if ev.kind == EventKind::Dtmf
            && !state.contains_key("ivr_path")
            && let Some(id) = &existing
            && let Some(path) = self.store.field(id, "ivr_path").await?
        {
            // An INVITE's incident: the path so far is in its record.
            state.insert("ivr_path".into(), path);
        }
        let facts = facts_of(&ev, &state);
        let actor = ev.source.as_str();
        let opens = match ev.kind {
            EventKind::Incident => true,
            EventKind::QueueJoin => live.acd.opens_incident(&facts.queue),
            _ => false,
        };
        if opens {
            let c = live.classifier.classify(&facts.ivr_path, facts.ruri_user.as_deref());
            let detail = json!({
                "source": actor,
                "event": ev.kind.as_str(),
                "queue": facts.queue,
                "wait_seconds": facts.wait_seconds,
                "ivr_path": facts.ivr_path,
                "caller_known": !facts.caller.is_empty(),
            });
            let new = self.new_incident(&facts, ev.source, &c, detail);
            // What the call's later events need: where, the path so far, and
            // (for a join) when, for the wait of a later abandon. Who: by
            // pseudonym only (the script keeps it with the call).
            let mut state: Vec<(&'static str, String)> =
                [("queue", facts.queue.clone()), ("ivr_path", facts.ivr_path.to_string())]
                    .into_iter()
                    .filter(|(_, v)| !v.is_empty())
                    .collect();
            if ev.kind == EventKind::QueueJoin {
                state.push(("joined_ms", now.to_string()));
            }
            let o = self.store.open(&new, &Rules::new(&live.correlation), &state, at).await?;
            self.opened(&o, &new, &c);
            return Ok(Outcome { incident: Some(o.id), duplicate: false });
        }

        let mut w = EventWrite {
            call_key: ev.call_ref.clone(),
            source: actor.into(),
            pseudonym: self.pseudonym_of(&ev.caller),
            dedup: ev.dedup.clone(),
            ..EventWrite::default()
        };
        let remember = |w: &mut EventWrite, k: &'static str, v: &str| {
            if !v.is_empty() {
                w.state.push((k, v.to_string()));
            }
        };
        remember(&mut w, "queue", &ev.queue);
        let entry = |event: Event, detail: serde_json::Value| Entry::new(event, actor, detail);
        let mut callback_class = None;
        match ev.kind {
            EventKind::Incident => unreachable!("opened above"),
            EventKind::Ivr | EventKind::Dtmf => {
                let input = match ev.kind {
                    EventKind::Dtmf => json!({"digit": ev.ivr_path.selections().first(), "ivr_path": facts.ivr_path}),
                    _ => json!({"ivr_path": facts.ivr_path}),
                };
                self.reclassify(&mut w, &facts, ev.source, input);
            }
            EventKind::QueueJoin => {
                w.state.push(("joined_ms", now.to_string()));
                w.entries = vec![entry(Event::Note, json!({"event": "queue_join", "queue": facts.queue}))];
            }
            EventKind::QueueAbandon => {
                let wait = waited(&ev, &state, now);
                let mut detail = json!({"queue": facts.queue, "wait_seconds": wait});
                if !ev.reason.is_empty() {
                    detail["reason"] = json!(ev.reason);
                }
                w.entries = vec![entry(Event::Abandoned, detail)];
                let cb = &live.correlation.callback;
                let long_wait = wait.is_some_and(|s| Duration::from_secs(u64::from(s)) > cb.abandon_after);
                if cb.enabled && long_wait && existing.is_none() && !facts.caller.is_empty() {
                    let (new, c) = self.callback_incident(&facts, ev.source, wait, cb.severity);
                    w.callback = Some((new, Rules::new(&live.correlation)));
                    callback_class = Some(c);
                }
                let st = &live.correlation.abandon_storm;
                if st.enabled && !facts.queue.is_empty() {
                    w.storm = Some(Storm {
                        queue: facts.queue.clone(),
                        count: st.count,
                        window_ms: u64::try_from(st.window.as_millis()).unwrap_or(u64::MAX),
                        severity: st.severity,
                        wait_seconds: wait,
                    });
                }
            }
            EventKind::AgentConnect => {
                let mut detail = json!({"queue": facts.queue, "agent": ev.agent});
                if let Some(wait) = waited(&ev, &state, now) {
                    detail["wait_seconds"] = json!(wait);
                }
                w.entries = vec![entry(Event::AnsweredElsewhere, detail)];
            }
            EventKind::AgentComplete => {
                w.entries = vec![entry(
                    Event::Note,
                    json!({"event": "agent_complete", "queue": facts.queue, "reason": ev.reason}),
                )];
            }
            EventKind::Hangup => {
                let mut detail = json!({"source": actor});
                if !ev.reason.is_empty() {
                    detail["cause"] = json!(ev.reason);
                }
                w.entries = vec![entry(Event::CallerHangup, detail)];
            }
        }
        let applied = self.store.apply_event(&w, at).await?;
        if applied.duplicate {
            tracing::debug!(event = ev.kind.as_str(), "call event already applied");
        }
        if let (Some(cb), Some((new, _)), Some(c)) = (&applied.callback, &w.callback, &callback_class) {
            if cb.created == 1 {
                metrics::counter!(metric::CORRELATIONS, "rule" => "callback").increment(1);
            }
            self.opened(cb, new, c);
        }
        if applied.storm_created {
            metrics::counter!(metric::CORRELATIONS, "rule" => "abandon_storm").increment(1);
            let severity = applied.storm_severity.map(Severity::as_str).unwrap_or("");
            tracing::warn!(incident_id = applied.storm.as_deref().unwrap_or(""), queue = %facts.queue, severity, "abandon storm: major incident declared");
            self.woke();
        }
        let incident = (!applied.id.is_empty()).then(|| applied.id.clone());
        if let Some(id) = &incident {
            tracing::info!(incident_id = %id, event = ev.kind.as_str(), source = actor, "call event applied");
        }
        Ok(Outcome { incident, duplicate: applied.duplicate })
    }

    /// A `callback` incident for a caller who gave up waiting.
    fn callback_incident(
        &self,
        facts: &CallFacts,
        source: Source,
        wait: Option<u32>,
        severity: Severity,
    ) -> (NewIncident, Classification) {
        let c = Classification {
            category: "callback".into(),
            severity,
            instructions: "Call the caller back: they abandoned the queue after a long wait.".into(),
            rule: "callback".into(),
        };
        let mut facts = facts.clone();
        facts.wait_seconds = wait;
        let detail = json!({"source": source.as_str(), "rule": "callback", "queue": facts.queue, "wait_seconds": wait});
        let mut new = self.new_incident(&facts, source, &c, detail);
        new.summary = format!(
            "callback: caller abandoned queue {} after {}s",
            if facts.queue.is_empty() { "?" } else { &facts.queue },
            wait.unwrap_or(0)
        );
        (new, c)
    }
}
