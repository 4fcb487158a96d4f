//! Intake: call facts from an adapter → a classified incident in the store,
//! and later call events (IVR digits, hang-ups) onto its timeline.
//!
//! Adapters (SIP today) call this; it is the one place that logs "incident
//! opened" and counts it, and it never logs a caller number in clear.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;

use crate::classify::{Classification, Classifier};
use crate::config::Settings;
use crate::incident::{Source, TimelineEntry, pseudonym};
use crate::sip::call::{CallFacts, MAX_IVR_SELECTIONS};
use crate::store::{Changes, NewIncident, Store, StoreError};
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

pub struct Intake {
    store: Store,
    /// Called when an incident is opened (the dispatcher's wake-up).
    on_open: Option<Box<dyn Fn() + Send + Sync>>,
    classifier: RwLock<Arc<Classifier>>,
    caller_key: String,
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
        Intake {
            store,
            on_open: None,
            classifier: RwLock::new(Arc::new(Classifier::new(settings))),
            caller_key: settings.privacy.caller_key.expose().to_string(),
        }
    }

    /// Runs `f` after every newly opened incident.
    pub fn on_open(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.on_open = Some(Box::new(f));
        self
    }

    fn classifier(&self) -> Arc<Classifier> {
        match self.classifier.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replaces the IVR map (SIGHUP reload).
    pub fn set_classifier(&self, c: Classifier) {
        match self.classifier.write() {
            Ok(mut g) => *g = Arc::new(c),
            Err(p) => *p.into_inner() = Arc::new(c),
        }
    }

    /// Opens (or finds) the incident of a call. On `Ok` it is durably in Redis.
    pub async fn open_call(
        &self,
        facts: &CallFacts,
        received_at: DateTime<Utc>,
        transport: &str,
    ) -> Result<Opened, StoreError> {
        let c = self.classifier().classify(&facts.ivr_path, facts.ruri_user.as_deref());
        let initial = json!({
            "source": "sip",
            "transport": transport,
            "queue": facts.queue,
            "wait_seconds": facts.wait_seconds,
            "ivr_path": facts.ivr_path,
            "caller_known": !facts.caller.is_empty(),
        });
        let new = NewIncident {
            call_key: facts.call_key.clone(),
            call_id: facts.call_id.clone(),
            source: Source::Sip,
            caller: facts.caller.clone(),
            caller_name: facts.caller_name.clone(),
            caller_pseudonym: if facts.caller.is_empty() {
                String::new()
            } else {
                pseudonym(&self.caller_key, &facts.caller)
            },
            ivr_path: facts.ivr_path.clone(),
            queue: facts.queue.clone(),
            wait_seconds: facts.wait_seconds,
            category: c.category.clone(),
            severity: c.severity,
            summary: summary(&c, facts),
            instructions: c.instructions.clone(),
            opened_at: received_at,
            timeline: vec![
                TimelineEntry::new(received_at, "opened", "sip", initial),
                classified_entry(received_at, "sip", &c, &facts.ivr_path),
                TimelineEntry::new(received_at, "queued", "dispatchd", json!({"severity": c.severity})),
            ],
        };
        let (id, created) = self.store.open(&new).await?;
        if created {
            if let Some(f) = &self.on_open {
                f();
            }
            metrics::counter!(metric::INCIDENTS_OPENED, "severity" => c.severity.as_str(), "category" => c.category.clone())
                .increment(1);
            tracing::info!(
                incident_id = %id,
                severity = %c.severity,
                category = %c.category,
                rule = %c.rule,
                caller = %pseudonym(&self.caller_key, &facts.caller),
                "incident opened"
            );
        } else {
            tracing::debug!(incident_id = %id, "call already has an incident");
        }
        Ok(Opened { id, created })
    }

    /// A DTMF key pressed in the early dialog: appended to the call's path,
    /// then the incident is reclassified (category, severity, instructions and
    /// summary follow). Returns the call's facts with the new path.
    pub async fn ivr_digit(&self, id: &str, facts: &CallFacts, digit: char) -> Result<CallFacts, StoreError> {
        let mut facts = facts.clone();
        if facts.ivr_path.len() < MAX_IVR_SELECTIONS {
            facts.ivr_path.push(digit.to_string());
        }
        let now = Utc::now();
        let c = self.classifier().classify(&facts.ivr_path, facts.ruri_user.as_deref());
        let changes = Changes {
            severity: Some(c.severity),
            category: Some(c.category.clone()),
            ivr_path: Some(facts.ivr_path.clone()),
            instructions: Some(c.instructions.clone()),
            summary: Some(summary(&c, &facts)),
        };
        let entries = [
            TimelineEntry::new(
                now,
                "ivr_input",
                "sip",
                json!({"digit": digit.to_string(), "ivr_path": facts.ivr_path}),
            ),
            classified_entry(now, "sip", &c, &facts.ivr_path),
        ];
        self.store.update(id, &changes, &entries).await?;
        tracing::info!(incident_id = %id, severity = %c.severity, category = %c.category, "incident reclassified");
        Ok(facts)
    }

    /// The ringing leg ended: timeline entry with the seconds rung.
    pub async fn call_ended(&self, id: &str, how: CallEnd, rung: Duration) -> Result<(), StoreError> {
        let rung_s = (rung.as_millis() as f64 / 1000.0 * 10.0).round() / 10.0;
        let detail = match how {
            CallEnd::RingLimit => json!({"reason": "max_ring", "rung_s": rung_s}),
            _ => json!({"rung_s": rung_s}),
        };
        let entry = TimelineEntry::new(Utc::now(), how.event(), "sip", detail);
        self.store.update(id, &Changes::default(), &[entry]).await?;
        tracing::info!(incident_id = %id, event = how.event(), rung_s, "call ended");
        Ok(())
    }
}
