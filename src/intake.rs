//! Intake: call facts from an adapter → a classified incident in the store,
//! and call events (IVR choices, queue joins and abandons, agents answering,
//! hang-ups) onto its timeline, with the correlation rules.
//!
//! Adapters (SIP INVITE/INFO/CANCEL/BYE, SIP MESSAGE, AMI, ESL) call this; it
//! is the one place that logs "incident opened" and counts it, and it never
//! logs a caller number in clear.
//!
//! The correlation rules (`[correlation.*]`) run inside Redis
//! (`store/scripts/intake.lua`), so several daemons agree on them:
//! - repeat: a caller with an open incident who calls again within
//!   `repeat.window` is attached to it (`repeat_call`), and every
//!   `raise_after`-th repeat raises its severity one level;
//! - callback: a caller without an incident who abandoned a queue after waiting
//!   longer than `callback.abandon_after` gets a `callback` incident;
//! - abandon storm: `count` abandons on one queue within `window` open one
//!   major incident for that queue (later abandons go onto its timeline);
//! - surge: `count` new incidents of one category within `window` declare a
//!   major incident linked to them (and to later ones while it is open),
//!   offered to the highest tier first.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::acd::{CallEvent, EventKind};
use crate::classify::{Classification, Classifier, split_path};
use crate::config::{AcdSettings, CorrelationSettings, Settings};
use crate::incident::{Severity, Source, TimelineEntry, pseudonym};
use crate::sip::call::{CallFacts, MAX_IVR_SELECTIONS};
use crate::store::intake::{self as writes, EventWrite, Rules, Storm};
use crate::store::{NewIncident, Store, StoreError};
use crate::telemetry::metric;

/// The outcome of opening an incident for a call.
#[derive(Debug, Clone)]
pub struct Opened {
    pub id: String,
    /// False when the call key was seen before and the existing incident was returned.
    pub created: bool,
}

/// How a ringing call ended without being answered by us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallEnd {
    /// CANCEL with `Reason: SIP;cause=200`: someone else answered.
    AnsweredElsewhere,
    /// CANCEL without it: the caller gave up.
    Abandoned,
    /// BYE in the dialog.
    CallerHangup,
    /// We ended the ring after `sip.max_ring` (480).
    RingLimit,
}

impl CallEnd {
    fn event(self) -> &'static str {
        match self {
            CallEnd::AnsweredElsewhere => "answered_elsewhere",
            CallEnd::Abandoned => "abandoned",
            CallEnd::CallerHangup => "caller_hangup",
            CallEnd::RingLimit => "note",
        }
    }
}

/// What applying a call event did.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The call's incident, when it has one (after this event).
    pub incident: Option<String>,
    /// The event was applied before (a re-sent MESSAGE): nothing changed.
    pub duplicate: bool,
}

/// The settings intake works with; replaced as a whole on SIGHUP.
struct Live {
    classifier: Classifier,
    correlation: CorrelationSettings,
    acd: AcdSettings,
}

pub struct Intake {
    store: Store,
    /// Called when an incident is opened (the dispatcher's wake-up).
    on_open: Option<Box<dyn Fn() + Send + Sync>>,
    live: RwLock<Arc<Live>>,
    caller_key: String,
}

/// Logs and counts what the surge rule did when an incident was opened.
pub fn log_major(o: &writes::Opened, source: Source) {
    if o.major_created
        && let Some(major) = &o.major
    {
        metrics::counter!(metric::CORRELATIONS, "rule" => "surge").increment(1);
        let severity = o.major_severity.map(Severity::as_str).unwrap_or("");
        tracing::warn!(incident_id = %major, members = o.members, severity, source = source.as_str(), "surge: major incident declared");
    } else if let Some(major) = &o.major {
        tracing::info!(incident_id = %o.id, major_incident = %major, "incident linked to the open major incident");
    }
}

/// A one-line description for lists and responders; no caller number in it.
fn summary(c: &Classification, facts: &CallFacts) -> String {
    let mut s = format!("{} reported by phone", c.category);
    if !facts.ivr_path.is_empty() {
        s.push_str(&format!(", IVR {}", facts.ivr_path.join(",")));
    }
    if !facts.queue.is_empty() {
        s.push_str(&format!(", queue {}", facts.queue));
    }
    if let Some(w) = facts.wait_seconds {
        s.push_str(&format!(", waited {w}s"));
    }
    s
}

fn classified_entry(at: DateTime<Utc>, actor: &str, c: &Classification, path: &[String]) -> TimelineEntry {
    TimelineEntry::new(
        at,
        "classified",
        actor,
        json!({"category": c.category, "severity": c.severity, "rule": c.rule, "ivr_path": path}),
    )
}

impl Intake {
    pub fn new(store: Store, settings: &Settings) -> Intake {
        // Every configured classification is a series from the start (zero until used).
        let d = &settings.ivr_default;
        let pairs = settings.ivr.iter().map(|r| (r.severity, &r.category)).chain([(d.severity, &d.category)]);
        for (severity, category) in pairs {
            metrics::counter!(metric::INCIDENTS_OPENED, "severity" => severity.as_str(), "category" => category.clone())
                .absolute(0);
        }
        for source in [Source::Sip, Source::Ami, Source::Esl] {
            for kind in EventKind::ALL {
                metrics::counter!(metric::CALL_EVENTS, "source" => source.as_str(), "event" => kind.as_str())
                    .absolute(0);
            }
        }
        Intake {
            store,
            on_open: None,
            live: RwLock::new(Arc::new(Live::new(settings))),
            caller_key: settings.privacy.caller_key.expose().to_string(),
        }
    }

    /// Runs `f` after every newly opened incident.
    pub fn on_open(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_open = Some(Box::new(f));
        self
    }

    fn live(&self) -> Arc<Live> {
        match self.live.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replaces the IVR map and the correlation rules (SIGHUP reload).
    pub fn reconfigure(&self, settings: &Settings) {
        let live = Arc::new(Live::new(settings));
        match self.live.write() {
            Ok(mut g) => *g = live,
            Err(p) => *p.into_inner() = live,
        }
    }

    fn pseudonym_of(&self, caller: &str) -> String {
        if caller.is_empty() { String::new() } else { pseudonym(&self.caller_key, caller) }
    }

    /// Opens (or finds) the incident of a call. On `Ok` it is durably in Redis.
    pub async fn open_call(
        &self,
        facts: &CallFacts,
        received_at: DateTime<Utc>,
        transport: &str,
    ) -> Result<Opened, StoreError> {
        let live = self.live();
        let c = live.classifier.classify(&facts.ivr_path, facts.ruri_user.as_deref());
        let detail = json!({
            "source": "sip",
            "transport": transport,
            "queue": facts.queue,
            "wait_seconds": facts.wait_seconds,
            "ivr_path": facts.ivr_path,
            "caller_known": !facts.caller.is_empty(),
        });
        let new = self.new_incident(facts, Source::Sip, received_at, &c, detail);
        self.open(&new, &c, &Rules::new(&live.correlation), &[]).await
    }

    /// The incident a call's facts describe, classified as `c`.
    fn new_incident(
        &self,
        facts: &CallFacts,
        source: Source,
        at: DateTime<Utc>,
        c: &Classification,
        opened_detail: serde_json::Value,
    ) -> NewIncident {
        let actor = source.as_str();
        NewIncident {
            call_key: facts.call_key.clone(),
            call_id: facts.call_id.clone(),
            source,
            caller: facts.caller.clone(),
            caller_name: facts.caller_name.clone(),
            caller_pseudonym: self.pseudonym_of(&facts.caller),
            ivr_path: facts.ivr_path.clone(),
            queue: facts.queue.clone(),
            wait_seconds: facts.wait_seconds,
            category: c.category.clone(),
            severity: c.severity,
            summary: summary(c, facts),
            instructions: c.instructions.clone(),
            opened_at: at,
            timeline: vec![
                TimelineEntry::new(at, "opened", actor, opened_detail),
                classified_entry(at, actor, c, &facts.ivr_path),
                TimelineEntry::new(at, "queued", "dispatchd", json!({"severity": c.severity})),
            ],
        }
    }

    /// Writes a new incident (or finds the call's, or attaches it to the
    /// caller's open one), then logs and counts what happened.
    async fn open(
        &self,
        new: &NewIncident,
        c: &Classification,
        rules: &Rules,
        state: &[(&'static str, String)],
    ) -> Result<Opened, StoreError> {
        let o = self.store.open(new, rules, state).await?;
        self.opened(&o, new, c);
        Ok(Opened { id: o.id, created: o.created == 1 })
    }

    /// The log lines, metrics and wake-ups of one `open`.
    fn opened(&self, o: &writes::Opened, new: &NewIncident, c: &Classification) {
        let wake = o.created == 1 || o.raised.is_some() || o.major_created;
        if o.created == 1 {
            metrics::counter!(metric::INCIDENTS_OPENED, "severity" => c.severity.as_str(), "category" => c.category.clone())
                .increment(1);
            tracing::info!(
                incident_id = %o.id,
                severity = %c.severity,
                category = %c.category,
                rule = %c.rule,
                source = new.source.as_str(),
                caller = %new.caller_pseudonym,
                "incident opened"
            );
        } else if let Some(n) = o.repeat_calls {
            metrics::counter!(metric::CORRELATIONS, "rule" => "repeat_call").increment(1);
            tracing::info!(incident_id = %o.id, repeat_calls = n, caller = %new.caller_pseudonym, "repeat call attached to the caller's open incident");
            if let Some(to) = o.raised {
                metrics::counter!(metric::CORRELATIONS, "rule" => "severity_raised").increment(1);
                tracing::warn!(incident_id = %o.id, severity = %to, repeat_calls = n, "severity raised: the caller keeps calling");
            }
        } else {
            tracing::debug!(incident_id = %o.id, "call already has an incident");
        }
        log_major(o, new.source);
        if wake && let Some(f) = &self.on_open {
            f();
        }
    }

    /// A DTMF key pressed in the early dialog: appended to the call's path,
    /// then the incident is reclassified (category, severity, instructions and
    /// summary follow) unless it is one this call was attached to as a repeat.
    /// Returns the call's facts with the new path.
    pub async fn ivr_digit(&self, id: &str, facts: &CallFacts, digit: char) -> Result<CallFacts, StoreError> {
        let mut facts = facts.clone();
        if facts.ivr_path.len() < MAX_IVR_SELECTIONS {
            facts.ivr_path.push(digit.to_string());
        }
        let input = json!({"digit": digit.to_string(), "ivr_path": facts.ivr_path});
        let mut w = EventWrite { call_key: facts.call_key.clone(), source: "sip".into(), ..EventWrite::default() };
        let c = self.reclassify(&mut w, &facts, Source::Sip, input);
        let applied = self.store.apply_event(&w).await?;
        if applied.own {
            tracing::info!(incident_id = %id, severity = %c.severity, category = %c.category, "incident reclassified");
        }
        Ok(facts)
    }

    /// Fills `w` with what a new IVR path does: the call remembers it, the
    /// timeline gets `ivr_input`, and (for the call's own incident) the
    /// classification and what follows from it change.
    fn reclassify(
        &self,
        w: &mut EventWrite,
        facts: &CallFacts,
        source: Source,
        input: serde_json::Value,
    ) -> Classification {
        let now = Utc::now();
        let actor = source.as_str();
        let c = self.live().classifier.classify(&facts.ivr_path, facts.ruri_user.as_deref());
        let path = facts.ivr_path.join(",");
        w.state.push(("ivr_path", path.clone()));
        w.entries.push(TimelineEntry::new(now, "ivr_input", actor, input));
        w.own_entries.push(classified_entry(now, actor, &c, &facts.ivr_path));
        w.changes = vec![
            ("severity", c.severity.as_str().to_string()),
            ("category", c.category.clone()),
            ("ivr_path", path),
            ("instructions", c.instructions.clone()),
            ("summary", summary(&c, facts)),
        ];
        c
    }

    /// The ringing leg ended: timeline entry with the seconds rung.
    pub async fn call_ended(&self, id: &str, how: CallEnd, rung: Duration) -> Result<(), StoreError> {
        let rung_s = (rung.as_millis() as f64 / 1000.0 * 10.0).round() / 10.0;
        let detail = match how {
            CallEnd::RingLimit => json!({"reason": "max_ring", "rung_s": rung_s}),
            _ => json!({"rung_s": rung_s}),
        };
        let entry = TimelineEntry::new(Utc::now(), how.event(), "sip", detail);
        self.store.append_many(&[(id.to_string(), entry)]).await?;
        tracing::info!(incident_id = %id, event = how.event(), rung_s, "call ended");
        Ok(())
    }
}

impl Live {
    fn new(settings: &Settings) -> Live {
        Live {
            classifier: Classifier::new(settings),
            correlation: settings.correlation.clone(),
            acd: settings.acd.clone(),
        }
    }
}

/// The call's facts from an event and what was remembered of the call before.
fn facts_of(ev: &CallEvent, state: &HashMap<String, String>) -> CallFacts {
    let pick = |own: &str, key: &str| {
        if own.is_empty() { state.get(key).cloned().unwrap_or_default() } else { own.to_string() }
    };
    let ivr_path = match ev.kind {
        EventKind::Dtmf => {
            let mut p = state.get("ivr_path").map(|p| split_path(p)).unwrap_or_default();
            if p.len() < MAX_IVR_SELECTIONS {
                p.extend(ev.ivr_path.iter().take(1).cloned());
            }
            p
        }
        _ if !ev.ivr_path.is_empty() => ev.ivr_path.clone(),
        _ => state.get("ivr_path").map(|p| split_path(p)).unwrap_or_default(),
    };
    CallFacts {
        call_id: if ev.call_id.is_empty() { ev.call_ref.clone() } else { ev.call_id.clone() },
        call_key: ev.call_ref.clone(),
        caller: pick(&ev.caller, "caller"),
        caller_name: pick(&ev.caller_name, "caller_name"),
        ivr_path,
        queue: pick(&ev.queue, "queue"),
        wait_seconds: ev.wait_seconds,
        ruri_user: ev.ruri_user.clone(),
        ruri_host: None,
    }
}

/// Seconds waited in the queue: as the PBX said, else since the join we heard.
fn waited(ev: &CallEvent, state: &HashMap<String, String>, now: DateTime<Utc>) -> Option<u32> {
    ev.wait_seconds.or_else(|| {
        let joined: i64 = state.get("joined_ms")?.parse().ok()?;
        u32::try_from((now.timestamp_millis() - joined).max(0) / 1000).ok()
    })
}

impl Intake {
    /// Applies one call event from any source. On `Ok` it is durably in Redis
    /// (for SIP MESSAGE: the 202 may be sent).
    pub async fn apply(&self, ev: CallEvent) -> Result<Outcome, StoreError> {
        let (source, kind) = (ev.source, ev.kind);
        let out = self.apply_once(ev.clean()).await?;
        if !out.duplicate {
            metrics::counter!(metric::CALL_EVENTS, "source" => source.as_str(), "event" => kind.as_str()).increment(1);
        }
        Ok(out)
    }

    async fn apply_once(&self, ev: CallEvent) -> Result<Outcome, StoreError> {
        let live = self.live();
        let now = Utc::now();
        let (mut state, existing) = self.store.call_state(&ev.call_ref).await?;
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
            let new = self.new_incident(&facts, ev.source, now, &c, detail);
            // What the call's later events need: who, where, the path so far,
            // and (for a join) when, for the wait of a later abandon.
            let mut state: Vec<(&'static str, String)> = [
                ("caller", facts.caller.clone()),
                ("caller_name", facts.caller_name.clone()),
                ("queue", facts.queue.clone()),
                ("ivr_path", facts.ivr_path.join(",")),
            ]
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .collect();
            if ev.kind == EventKind::QueueJoin {
                state.push(("joined_ms", now.timestamp_millis().to_string()));
            }
            let o = self.open(&new, &c, &Rules::new(&live.correlation), &state).await?;
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
        remember(&mut w, "caller", &ev.caller);
        remember(&mut w, "caller_name", &ev.caller_name);
        remember(&mut w, "queue", &ev.queue);
        let entry = |event: &str, detail: serde_json::Value| TimelineEntry::new(now, event, actor, detail);
        let mut callback_class = None;
        match ev.kind {
            EventKind::Incident => unreachable!("opened above"),
            EventKind::Ivr | EventKind::Dtmf => {
                let input = match ev.kind {
                    EventKind::Dtmf => json!({"digit": ev.ivr_path.first(), "ivr_path": facts.ivr_path}),
                    _ => json!({"ivr_path": facts.ivr_path}),
                };
                self.reclassify(&mut w, &facts, ev.source, input);
            }
            EventKind::QueueJoin => {
                w.state.push(("joined_ms", now.timestamp_millis().to_string()));
                w.entries = vec![entry("note", json!({"event": "queue_join", "queue": facts.queue}))];
            }
            EventKind::QueueAbandon => {
                let wait = waited(&ev, &state, now);
                let mut detail = json!({"queue": facts.queue, "wait_seconds": wait});
                if !ev.reason.is_empty() {
                    detail["reason"] = json!(ev.reason);
                }
                w.entries = vec![entry("abandoned", detail)];
                let cb = &live.correlation.callback;
                let long_wait = wait.is_some_and(|s| Duration::from_secs(u64::from(s)) > cb.abandon_after);
                if cb.enabled && long_wait && existing.is_none() && !facts.caller.is_empty() {
                    let (new, c) = self.callback_incident(&facts, ev.source, now, wait, cb.severity);
                    w.callback = Some((new, Rules::new(&live.correlation)));
                    callback_class = Some(c);
                }
                let st = &live.correlation.abandon_storm;
                if st.enabled && !facts.queue.is_empty() {
                    w.storm = Some(Storm {
                        queue: facts.queue.clone(),
                        count: st.count,
                        window_ms: st.window.as_millis() as u64,
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
                w.entries = vec![entry("answered_elsewhere", detail)];
            }
            EventKind::AgentComplete => {
                w.entries =
                    vec![entry("note", json!({"event": "agent_complete", "queue": facts.queue, "reason": ev.reason}))];
            }
            EventKind::Hangup => {
                let mut detail = json!({"source": actor});
                if !ev.reason.is_empty() {
                    detail["cause"] = json!(ev.reason);
                }
                w.entries = vec![entry("caller_hangup", detail)];
            }
        }
        let applied = self.store.apply_event(&w).await?;
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
            if let Some(f) = &self.on_open {
                f();
            }
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
        now: DateTime<Utc>,
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
        let mut new = self.new_incident(&facts, source, now, &c, detail);
        new.summary = format!(
            "callback: caller abandoned queue {} after {}s",
            if facts.queue.is_empty() { "?" } else { &facts.queue },
            wait.unwrap_or(0)
        );
        (new, c)
    }
}
