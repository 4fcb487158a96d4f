//! Intake: the one door for reports and records. Call facts from an adapter
//! become a classified incident in the store; call events (IVR choices, queue
//! joins and abandons, agents answering, hang-ups) go onto its timeline with
//! the correlation rules; incidents opened by hand come in here too; and the
//! records are read (and erased, contract §7) through here.
//!
//! Adapters (SIP INVITE/INFO/CANCEL/BYE, SIP MESSAGE, AMI, ESL, the API) call
//! this; it is the one place that logs "incident opened" and counts it, and it
//! never logs a caller number in clear.
//!
//! - this file: opening incidents, IVR digits, call ends, reading records;
//! - `events.rs`: applying call events from any source.
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

mod events;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde_json::json;

use crate::config::{AcdSettings, Settings};
use crate::domain::call::{CallEnd, CallFacts, EventKind};
use crate::domain::classify::{Classification, Classifier};
use crate::domain::ids::pseudonym;
use crate::domain::incident::{Incident, ListFilter, NewIncident, Severity, Source, State};
use crate::domain::policy::CorrelationSettings;
use crate::domain::timeline::{Entry, Event};
use crate::report::Facts;
pub use crate::store::StoreError as Error;
use crate::store::intake::{self as writes, EventWrite, Rules};
use crate::store::{At, Store};
use crate::telemetry::metric;
pub use events::Outcome;

pub type Result<T> = std::result::Result<T, Error>;

/// The outcome of opening an incident.
#[derive(Debug, Clone)]
pub struct Opened {
    pub id: String,
    /// False when the call key was seen before and the existing incident was returned.
    pub created: bool,
}

/// What a caller can be told of their newest open incident (contract §6 extension).
#[derive(Debug, Clone, PartialEq)]
pub struct CallerStatus {
    pub incident_id: String,
    pub state: State,
    /// Seconds until the responder en route expects to arrive, when one gave an ETA.
    pub eta_s: Option<i64>,
}

fn end_event(how: CallEnd) -> Event {
    match how {
        CallEnd::AnsweredElsewhere => Event::AnsweredElsewhere,
        CallEnd::Abandoned => Event::Abandoned,
        CallEnd::CallerHangup => Event::CallerHangup,
        CallEnd::RingLimit => Event::Note,
    }
}

/// The settings intake works with; replaced as a whole on SIGHUP.
struct Live {
    classifier: Classifier,
    correlation: CorrelationSettings,
    acd: AcdSettings,
}

impl Live {
    fn new(settings: &Settings) -> Live {
        Live {
            classifier: Classifier::new(&settings.ivr, &settings.categories, &settings.ivr_default),
            correlation: settings.correlation.clone(),
            acd: settings.acd.clone(),
        }
    }
}

pub struct Intake {
    store: Store,
    /// This daemon's name in Redis (a PBX feed's lease holder).
    daemon: String,
    /// Called when an incident is opened (the dispatcher's wake-up).
    on_open: Option<Box<dyn Fn() + Send + Sync>>,
    live: RwLock<Arc<Live>>,
    caller_key: String,
}

/// A one-line description for lists and responders; no caller number in it.
fn summary(c: &Classification, facts: &CallFacts) -> String {
    let mut s = format!("{} reported by phone", c.category);
    if !facts.ivr_path.is_empty() {
        s.push_str(&format!(", IVR {}", facts.ivr_path));
    }
    if !facts.queue.is_empty() {
        s.push_str(&format!(", queue {}", facts.queue));
    }
    if let Some(w) = facts.wait_seconds {
        s.push_str(&format!(", waited {w}s"));
    }
    s
}

fn classified_entry(actor: &str, c: &Classification, facts: &CallFacts) -> Entry {
    Entry::new(
        Event::Classified,
        actor,
        json!({"category": c.category, "severity": c.severity, "rule": c.rule, "ivr_path": facts.ivr_path}),
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
            daemon: crate::dispatcher::daemon_name(),
            on_open: None,
            live: RwLock::new(Arc::new(Live::new(settings))),
            caller_key: settings.privacy.caller_key.expose().to_string(),
        }
    }

    /// Intake on its own store (the CLI's `report` and `review`), its
    /// primary found (through the Sentinels, when there are any).
    pub async fn connect(settings: &Settings) -> Result<Intake> {
        let store = Store::from_settings(&settings.redis)?;
        store.primary().find_once().await.map_err(crate::store::StoreError::Redis)?;
        Ok(Intake::new(store, settings))
    }

    /// This daemon's name in Redis (shared with the dispatcher).
    pub fn daemon(mut self, name: &str) -> Self {
        self.daemon = name.to_string();
        self
    }

    /// Takes or keeps the lease of the PBX feed `name` (one daemon reads a
    /// feed, however many are configured with it); true while this daemon holds it.
    pub async fn hold_feed(&self, name: &str, ttl: Duration) -> Result<bool> {
        self.store.feed_lease(name, &self.daemon, ttl, false).await
    }

    /// Gives the feed's lease up (at shutdown), so another daemon takes it at once.
    pub async fn release_feed(&self, name: &str) -> Result<()> {
        self.store.feed_lease(name, &self.daemon, Duration::ZERO, true).await.map(|_| ())
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

    fn woke(&self) {
        if let Some(f) = &self.on_open {
            f();
        }
    }

    // ---- opening ------------------------------------------------------------

    /// Opens (or finds) the incident of a call that arrived `age` ago. On `Ok`
    /// it is durably in Redis.
    pub async fn open_call(&self, facts: &CallFacts, age: Duration, transport: &str) -> Result<Opened> {
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
        let mut new = self.new_incident(facts, Source::Sip, &c, detail);
        new.age_ms = u64::try_from(age.as_millis()).unwrap_or(0);
        self.open(&new, &c, &Rules::new(&live.correlation), &[]).await
    }

    /// Opens an incident by hand (`POST /v1/incidents`). Incidents opened by
    /// hand count towards a surge of their category too.
    pub async fn open_manual(&self, category: &str, severity: Severity, summary: &str) -> Result<Opened> {
        let call_key = format!("api:{:032x}", rand::random::<u128>());
        let c = Classification {
            category: category.to_string(),
            severity,
            instructions: String::new(),
            rule: "api".into(),
        };
        let new = NewIncident {
            call_key: call_key.clone(),
            call_id: call_key,
            source: Source::Api,
            caller: String::new(),
            caller_name: String::new(),
            caller_pseudonym: String::new(),
            ivr_path: Default::default(),
            queue: String::new(),
            wait_seconds: None,
            category: c.category.clone(),
            severity,
            summary: summary.to_string(),
            instructions: String::new(),
            age_ms: 0,
            timeline: vec![
                Entry::new(Event::Opened, "api", json!({"source": "api"})),
                Entry::new(
                    Event::Classified,
                    "api",
                    json!({"category": category, "severity": severity, "rule": "api"}),
                ),
                Entry::new(Event::Queued, "dispatchd", json!({"severity": severity})),
            ],
            generic: false,
        };
        self.open(&new, &c, &Rules::new(&self.live().correlation), &[]).await
    }

    /// The incident a call's facts describe, classified as `c`.
    fn new_incident(
        &self,
        facts: &CallFacts,
        source: Source,
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
            age_ms: 0,
            timeline: vec![
                Entry::new(Event::Opened, actor, opened_detail),
                classified_entry(actor, c, facts),
                Entry::new(Event::Queued, "dispatchd", json!({"severity": c.severity})),
            ],
            generic: c.rule == Classification::DEFAULT_RULE,
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
    ) -> Result<Opened> {
        let o = self.store.open(new, rules, state, At::Server).await?;
        self.opened(&o, new, c);
        Ok(Opened { id: o.id, created: o.created == 1 })
    }

    /// The log lines, metrics and wake-ups of one `open`.
    fn opened(&self, o: &writes::Opened, new: &NewIncident, c: &Classification) {
        // A pass only when it could offer something: a responder idle now. One
        // who becomes free later runs a pass of its own and finds the queue.
        let wake = (o.created == 1 || o.raised.is_some() || o.major_created) && o.idle;
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
            if let Some(other) = &o.related {
                metrics::counter!(metric::CORRELATIONS, "rule" => "related").increment(1);
                tracing::info!(incident_id = %o.id, related = %other, caller = %new.caller_pseudonym, "the caller's open incident is of another category: both linked as related");
            }
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
        if o.major_created
            && let Some(major) = &o.major
        {
            metrics::counter!(metric::CORRELATIONS, "rule" => "surge").increment(1);
            let severity = o.major_severity.map(Severity::as_str).unwrap_or("");
            tracing::warn!(incident_id = %major, members = o.members, severity, source = new.source.as_str(), "surge: major incident declared");
        } else if let Some(major) = &o.major {
            tracing::info!(incident_id = %o.id, major_incident = %major, "incident linked to the open major incident");
        }
        if wake {
            self.woke();
        }
    }

    // ---- a call in the incident line ---------------------------------------

    /// A DTMF key pressed in the early dialog: appended to the call's path,
    /// then the incident is reclassified (category, severity, instructions and
    /// summary follow) unless it is one this call was attached to as a repeat.
    /// Returns the call's facts with the new path.
    pub async fn ivr_digit(&self, id: &str, facts: &CallFacts, digit: char) -> Result<CallFacts> {
        let mut facts = facts.clone();
        facts.ivr_path.push_key(digit);
        let input = json!({"digit": digit.to_string(), "ivr_path": facts.ivr_path});
        let mut w = EventWrite { call_key: facts.call_key.clone(), source: "sip".into(), ..EventWrite::default() };
        let c = self.reclassify(&mut w, &facts, Source::Sip, input);
        let applied = self.store.apply_event(&w, At::Server).await?;
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
        let actor = source.as_str();
        let c = self.live().classifier.classify(&facts.ivr_path, facts.ruri_user.as_deref());
        let path = facts.ivr_path.to_string();
        w.state.push(("ivr_path", path.clone()));
        w.entries.push(Entry::new(Event::IvrInput, actor, input));
        w.own_entries.push(classified_entry(actor, &c, facts));
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
    pub async fn call_ended(&self, id: &str, how: CallEnd, rung: Duration) -> Result<()> {
        let rung_s = (rung.as_millis() as f64 / 1000.0 * 10.0).round() / 10.0;
        let detail = match how {
            CallEnd::RingLimit => json!({"reason": "max_ring", "rung_s": rung_s}),
            _ => json!({"rung_s": rung_s}),
        };
        let event = end_event(how);
        self.store.append(&[(id.to_string(), Entry::new(event, "sip", detail))], At::Server).await?;
        tracing::info!(incident_id = %id, event = event.as_str(), rung_s, "call ended");
        Ok(())
    }

    // ---- records ------------------------------------------------------------

    /// One incident with its timeline.
    pub async fn incident(&self, id: &str) -> Result<Option<Incident>> {
        self.store.get(id).await
    }

    /// Newest first, without timelines.
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<Incident>> {
        self.store.list(filter).await
    }

    /// What the review report needs of the incidents opened in `[since, until)` (ms).
    pub async fn report_facts(&self, since_ms: i64, until_ms: i64) -> Result<Vec<Facts>> {
        self.store.report_facts(since_ms, until_ms).await
    }

    /// Erases a caller's number and name from every record (contract §7).
    /// Returns how many records changed.
    pub async fn erase_caller(&self, number: &str) -> Result<u64> {
        let ps = pseudonym(&self.caller_key, number);
        let n = self.store.erase_caller(number, &ps, At::Server).await?;
        tracing::info!(caller = %ps, erased = n, actor = "api", "caller erased");
        Ok(n)
    }

    /// The caller's newest open incident, in a form an IVR can speak.
    pub async fn caller_status(&self, number: &str) -> Result<Option<CallerStatus>> {
        let (found, now) = self.store.caller_open_incident(&pseudonym(&self.caller_key, number)).await?;
        Ok(found.map(|(incident_id, state, eta_ms)| CallerStatus {
            incident_id,
            state,
            eta_s: eta_ms.filter(|_| state == State::EnRoute).map(|ms| ((ms - now).max(0) + 999) / 1000),
        }))
    }
}
