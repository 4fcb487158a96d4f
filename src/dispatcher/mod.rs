//! The dispatcher: who is offered what, and when (contract §4) — the one door
//! for everything a responder or a supervisor does to an offer or an
//! assignment.
//!
//! The rules themselves run in Redis (`store/scripts/dispatch.lua`), so that
//! several daemons sharing one Redis never offer an incident twice; this
//! module decides when to run them and hands what they decide to a
//! [`Notifier`] (today the websocket sessions):
//!
//! - on every wake-up (a new incident, a responder free again, an answer) and
//!   at least every 500 ms: withdraw offers past their deadline (`cancel` to
//!   that responder), then pair the queue with free responders (`dispatch`);
//! - every 2 s: send again any offer a reachable responder has not received
//!   (offers made by another daemon, or lost in transit), and renew the
//!   presence leases of the responders reachable here;
//! - the answers: `ack`, `decline`, `status`, `availability` from responders;
//!   resolve and cancel from the API. An offer taken back is released in one
//!   place ([`Dispatch::release`]): the local channel, else the daemon the
//!   responder is connected to, through pub/sub.
//!
//! Deadlines and leases are judged by Redis's clock (see `store`). Pub/sub
//! only speeds things up between daemons; nothing depends on it. The systemd
//! watchdog is pinged from this loop, so a stuck core stops it.

pub mod notify;
pub mod pager;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::Settings;
use crate::domain::dispatch::{Answer, Attempt, Availability, Channel, Offer, Outcome, Purpose, Release, Reminder};
use crate::domain::ids::mask;
use crate::domain::incident::State;
use crate::domain::policy::Escalation;
use crate::domain::timeline::{Entry, Event};
pub use crate::store::StoreError as Error;
pub use crate::store::admin::Closed;
use crate::store::dispatch::StepPolicy;
pub use crate::store::dispatch::{Presence, RosterRow};
use crate::store::pubsub::Notice;
use crate::store::{At, Store};
use crate::systemd;
use crate::telemetry::metric;
pub use notify::{Notifier, Reach};
pub use pager::Pager;

/// Offers made in one pass of the matcher, at most.
const MATCH_BATCH: usize = 64;
const MAX_SLEEP: Duration = Duration::from_millis(500);
const RESYNC_EVERY: Duration = Duration::from_secs(2);

pub type Result<T> = std::result::Result<T, Error>;

pub struct Dispatch {
    store: Store,
    notifier: Arc<dyn Notifier>,
    /// The other channels (PBX call, SIP MESSAGE, webhook), contract §11.
    pub reach: Arc<dyn Reach>,
    /// Page calls through the PBX feed this daemon holds, if any.
    pub pager: Arc<Pager>,
    /// `fallback.after`, ms.
    after_ms: u64,
    /// This daemon's name in Redis (host, pid and a random part).
    pub daemon: String,
    policy: Escalation,
    heartbeat: Duration,
    wake: Notify,
    /// Another daemon made an offer that may be for one of ours: resync now.
    resync_soon: AtomicBool,
}

/// A name for this daemon in Redis: host, pid and a random part.
pub fn daemon_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    format!("{}-{}-{:04x}", host.trim(), std::process::id(), rand::random::<u16>())
}

impl Dispatch {
    pub fn new(
        store: Store,
        settings: &Settings,
        notifier: Arc<dyn Notifier>,
        reach: Arc<dyn Reach>,
        pager: Arc<Pager>,
    ) -> Arc<Dispatch> {
        Arc::new(Dispatch {
            store,
            notifier,
            reach,
            pager,
            after_ms: u64::try_from(settings.fallback.after.as_millis()).unwrap_or(u64::MAX),
            daemon: daemon_name(),
            policy: settings.escalation.matrix(),
            heartbeat: settings.responders.heartbeat,
            wake: Notify::new(),
            resync_soon: AtomicBool::new(false),
        })
    }

    /// Something changed: run the matcher soon.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// How long a presence lease written now holds: three heartbeats.
    fn lease_ms(&self) -> u64 {
        3 * u64::try_from(self.heartbeat.as_millis()).unwrap_or(u64::MAX / 4)
    }

    // ---- the door: responders ---------------------------------------------

    /// A responder's channel opened here: its presence is stored, and the
    /// offer it has not answered (if any) is sent again.
    pub async fn connected(&self, rid: &str) -> Result<()> {
        let pending = self.store.connect(rid, &self.daemon, self.lease_ms(), At::Server).await?;
        if let Some(incident) = pending {
            self.deliver_many(&[(rid.to_string(), incident)]).await;
        }
        self.wake();
        Ok(())
    }

    /// A responder's channel here closed (for good: not replaced by a newer one).
    pub async fn disconnected(&self, rid: &str) -> Result<()> {
        self.store.disconnect(rid, &self.daemon, At::Server).await
    }

    /// An `ack` of a dispatch (on the websocket, or by `channel`: a PBX call's digit).
    pub async fn ack(&self, rid: &str, dispatch_id: &str) -> Result<Answer> {
        self.ack_on(rid, dispatch_id, None).await
    }

    pub async fn ack_on(&self, rid: &str, dispatch_id: &str, channel: Option<Channel>) -> Result<Answer> {
        let a = self.store.answer(rid, dispatch_id, true, "", channel, &self.policy, At::Server).await?;
        if let Answer::Acknowledged { offer_age_ms, repeated: false } = &a {
            metrics::counter!(metric::DISPATCH_OFFERS, "outcome" => "acknowledged").increment(1);
            if let Some(ms) = offer_age_ms {
                metrics::histogram!(metric::OFFER_TO_ACK).record((*ms).max(0) as f64 / 1000.0);
            }
            let channel = channel.map_or("websocket", Channel::as_str);
            tracing::info!(responder = %rid, dispatch_id = %dispatch_id, channel, "dispatch acknowledged");
            self.wake();
        }
        Ok(a)
    }

    /// A `decline` of a dispatch: the offer is taken back and goes on.
    pub async fn decline(&self, rid: &str, dispatch_id: &str, reason: &str) -> Result<Answer> {
        self.decline_on(rid, dispatch_id, reason, None).await
    }

    pub async fn decline_on(
        &self,
        rid: &str,
        dispatch_id: &str,
        reason: &str,
        channel: Option<Channel>,
    ) -> Result<Answer> {
        let a = self.store.answer(rid, dispatch_id, false, reason, channel, &self.policy, At::Server).await?;
        if let Answer::Declined(r) = &a {
            metrics::counter!(metric::DISPATCH_OFFERS, "outcome" => "declined").increment(1);
            let channel = channel.map_or("websocket", Channel::as_str);
            tracing::info!(responder = %rid, dispatch_id = %dispatch_id, channel, "dispatch declined");
            self.release(r);
            self.wake();
        }
        Ok(a)
    }

    /// A progress report (`en_route`, `on_scene`, `resolved`); `Err(code)` when
    /// it is not this responder's incident or not a step forward.
    pub async fn status(
        &self,
        rid: &str,
        incident_id: &str,
        to: State,
        note: &str,
        eta_s: Option<u32>,
    ) -> Result<std::result::Result<(), String>> {
        let r = self.store.status(rid, incident_id, to, note, eta_s, &self.policy, At::Server).await?;
        if r.is_ok() {
            tracing::info!(responder = %rid, incident_id = %incident_id, state = to.as_str(), "progress reported");
            if to == State::Resolved {
                self.wake();
            }
        }
        Ok(r)
    }

    pub async fn availability(&self, rid: &str, a: Availability) -> Result<()> {
        self.store.set_availability(rid, a.as_str(), At::Server).await?;
        self.wake();
        Ok(())
    }

    // ---- the door: supervisors --------------------------------------------

    /// Resolves or cancels an incident by hand; whoever held it is told and free again.
    pub async fn close(&self, id: &str, to: State, note: &str, retention: Duration) -> Result<Closed> {
        let closed = self.store.close(id, to, note, retention, At::Server).await?;
        if let Closed::Done { held } = &closed {
            if let Some(r) = held {
                self.release(r);
                tracing::info!(incident_id = %id, responder = %r.responder, dispatch_id = %r.dispatch_id, "responder released");
            }
            self.wake();
            tracing::info!(incident_id = %id, state = to.as_str(), actor = "api", "incident closed");
        }
        Ok(closed)
    }

    /// Presence of these roster members, wherever they are connected.
    pub async fn presence(&self, rids: &[String]) -> Result<Vec<Presence>> {
        self.store.presence(rids).await
    }

    /// Writes the roster (id, tier, skills, other channels) for the matcher.
    pub async fn sync_roster(&self, rows: &[RosterRow]) -> Result<()> {
        self.store.sync_roster(rows).await?;
        self.wake();
        Ok(())
    }

    // ---- delivering what the rules decided --------------------------------

    /// Tells a responder its offer was taken back: on its channel here, else
    /// through the daemon it is connected to.
    pub fn release(&self, r: &Release) {
        if self.notifier.cancel(&r.responder, &r.dispatch_id, &r.reason) {
            return;
        }
        if !r.daemon.is_empty() && r.daemon != self.daemon {
            let (store, r) = (self.store.clone(), r.clone());
            tokio::spawn(async move { store.publish_cancel(&r).await });
        }
    }

    /// Hands an offer to the notifier, caller masked, and times it.
    fn send_offer(&self, mut offer: Offer, now_ms: i64) {
        offer.caller = mask(&offer.caller);
        if self.notifier.offer(&offer) {
            let secs = (now_ms - offer.opened_ms).max(0) as f64 / 1000.0;
            metrics::histogram!(metric::CALL_TO_OFFER).record(secs);
        }
    }

    /// Sends each `(responder, incident)` offer that still stands and which the
    /// responder's channel does not have yet (offers made by another daemon,
    /// or sent again after a reconnect). `delivered` is recorded first, in one
    /// round trip for all, so the timeline never shows an acknowledgement
    /// before the delivery it answers.
    async fn deliver_many(&self, pending: &[(String, String)]) {
        if pending.is_empty() {
            return;
        }
        let (offers, now) = match self.store.offers_of(pending).await {
            Ok(v) => v,
            Err(e) => return tracing::warn!(error = %e, "offers not read"),
        };
        let due: Vec<Offer> =
            offers.into_iter().filter(|o| !self.notifier.has_offer(&o.responder, &o.dispatch_id)).collect();
        let entries: Vec<(String, Entry)> = due
            .iter()
            .map(|o| {
                let detail = json!({"responder": o.responder, "dispatch_id": o.dispatch_id});
                (o.incident_id.clone(), Entry::new(Event::Delivered, "dispatchd", detail))
            })
            .collect();
        if let Err(e) = self.store.append(&entries, At::Ms(now)).await {
            tracing::warn!(error = %e, "deliveries not recorded");
        }
        for o in due {
            self.send_offer(o, now);
        }
    }

    /// One pass: deadlines, reminders, offers, attempts on other channels.
    /// Returns how long until the next thing falls due.
    async fn step(self: &Arc<Self>) -> Option<Duration> {
        let more = StepPolicy { after_ms: self.after_ms, pbx: self.pager.available() };
        loop {
            let step = match self.store.step(MATCH_BATCH, &self.policy, more, &self.daemon, At::Server).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "dispatch step failed");
                    return None;
                }
            };
            for r in &step.releases {
                if r.reason == "released" {
                    metrics::counter!(metric::RELEASES).increment(1);
                    tracing::warn!(responder = %r.responder, dispatch_id = %r.dispatch_id, "no progress after the reminders; released and offered again");
                } else {
                    metrics::counter!(metric::DISPATCH_OFFERS, "outcome" => "ack_timeout").increment(1);
                    tracing::info!(responder = %r.responder, dispatch_id = %r.dispatch_id, "no acknowledgement in time; offer withdrawn");
                }
                self.release(r);
            }
            for r in &step.reminders {
                metrics::counter!(metric::REMINDERS, "due" => r.due.clone()).increment(1);
                tracing::warn!(incident_id = %r.incident_id, responder = %r.responder, due = %r.due, "no progress reported; reminder sent");
                self.remind(r);
            }
            let mut remote = false;
            let full = step.offers.len() >= MATCH_BATCH;
            for o in step.offers {
                metrics::counter!(metric::DISPATCH_OFFERS, "outcome" => "offered").increment(1);
                if o.escalated {
                    metrics::counter!(metric::ESCALATIONS, "severity" => o.offer.severity.as_str()).increment(1);
                }
                tracing::info!(incident_id = %o.offer.incident_id, responder = %o.offer.responder, dispatch_id = %o.offer.dispatch_id, escalated = o.escalated, "offered");
                if o.daemon == self.daemon {
                    // `delivered` was recorded by the script itself.
                    self.send_offer(o.offer, step.now);
                } else if !o.daemon.is_empty() {
                    remote = true;
                }
            }
            for x in &step.exhausted {
                metrics::counter!(metric::DISPATCH_OFFERS, "outcome" => "exhausted").increment(1);
                tracing::warn!(incident_id = %x.incident_id, severity = %x.severity, "nobody acknowledged in max_rounds passes; back in the queue, flagged exhausted");
            }
            for a in step.attempts {
                self.clone().attempt(a);
            }
            if remote {
                self.store.publish_wake(&self.daemon).await;
            }
            if !full {
                return step.next_deadline_ms.map(|ms| Duration::from_millis((ms - step.now).max(0) as u64));
            }
        }
    }

    /// Makes one attempt on a channel (in the background), records what
    /// became of it, and applies a PBX call's digit as the responder's answer.
    fn attempt(self: Arc<Self>, a: Attempt) {
        metrics::counter!(metric::CONTACT_ATTEMPTS, "channel" => a.channel.as_str()).increment(1);
        tracing::info!(incident_id = %a.offer.incident_id, responder = %a.offer.responder, channel = a.channel.as_str(), "reaching the responder on another channel");
        tokio::spawn(async move {
            let stop = Box::pin(self.clone().until_settled(a.clone()));
            let outcome = self.reach.attempt(&a, stop).await;
            metrics::counter!(metric::CONTACT_OUTCOMES, "channel" => a.channel.as_str(), "outcome" => outcome.label())
                .increment(1);
            tracing::info!(incident_id = %a.offer.incident_id, responder = %a.offer.responder, channel = a.channel.as_str(), outcome = outcome.as_str(), "attempt ended");
            if let Err(e) = self.store.contacted(&a, &outcome, At::Server).await {
                tracing::warn!(error = %e, "attempt's outcome not recorded");
            }
            let (rid, did) = (&a.offer.responder, &a.offer.dispatch_id);
            let answered = match (a.purpose, &outcome) {
                (Purpose::Offer, Outcome::Acknowledged) => Some(self.ack_on(rid, did, Some(a.channel)).await),
                (Purpose::Offer, Outcome::Declined) => {
                    Some(self.decline_on(rid, did, "declined on the page call", Some(a.channel)).await)
                }
                _ => None,
            };
            if let Some(Err(e)) = answered {
                tracing::warn!(error = %e, "answer by PBX call not stored");
            }
            if outcome.next_at_once() {
                self.wake();
            }
        });
    }

    /// Resolves when attempt `a` is no longer wanted: its offer was answered
    /// or moved on (or, for a reminder, progress was reported).
    async fn until_settled(self: Arc<Self>, a: Attempt) {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Ok(false) = self.store.still_wanted(&a).await {
                return;
            }
        }
    }

    /// Tells a responder its acknowledged incident waits for progress: on its
    /// websocket here, else through the daemon it is connected to.
    fn remind(&self, r: &Reminder) {
        if self.notifier.remind(r) {
            return;
        }
        if !r.daemon.is_empty() && r.daemon != self.daemon {
            let (store, r) = (self.store.clone(), r.clone());
            tokio::spawn(async move { store.publish_reminder(&r).await });
        }
    }

    /// Offers the reachable responders should have; leases.
    async fn resync(&self, renew_leases: bool) {
        let rids = self.notifier.reachable();
        if renew_leases
            && let Err(e) = self.store.refresh_leases(&self.daemon, self.lease_ms(), &rids, At::Server).await
        {
            tracing::warn!(error = %e, "leases not renewed");
        }
        if let Ok(offers) = self.store.current_offers(&rids).await {
            let pending: Vec<(String, String)> =
                rids.into_iter().zip(offers).filter_map(|(rid, offer)| Some((rid, offer?))).collect();
            self.deliver_many(&pending).await;
        }
    }

    /// The dispatcher loop; ends at shutdown.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let watchdog = systemd::watchdog_interval().is_some();
        let mut last_resync = Instant::now();
        let mut last_lease = Instant::now();
        let mut next_deadline: Option<Duration> = None;
        loop {
            let sleep = next_deadline.map_or(MAX_SLEEP, |d| d.min(MAX_SLEEP));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(sleep) => {}
            }
            if watchdog {
                systemd::watchdog();
            }
            next_deadline = self.step().await;
            if self.resync_soon.swap(false, Ordering::Relaxed) || last_resync.elapsed() >= RESYNC_EVERY {
                let renew = last_lease.elapsed() >= self.heartbeat / 2;
                self.resync(renew).await;
                last_resync = Instant::now();
                if renew {
                    last_lease = Instant::now();
                }
            }
        }
    }

    /// Listens to the other daemons (wake-ups, cancels for our responders),
    /// reconnecting with backoff. Best effort by design.
    pub async fn listen(self: Arc<Self>, shutdown: CancellationToken) {
        let backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            let on = |n: Notice| match n {
                Notice::Cancel(r) => {
                    self.notifier.cancel(&r.responder, &r.dispatch_id, &r.reason);
                }
                Notice::Remind(r) => {
                    self.notifier.remind(&r);
                }
                Notice::Wake(from) if from != self.daemon => {
                    self.resync_soon.store(true, Ordering::Relaxed);
                    self.wake();
                }
                Notice::Wake(_) => {}
            };
            match self.store.listen(shutdown.cancelled(), on).await {
                Ok(()) if shutdown.is_cancelled() => return,
                Ok(()) => {}
                Err(e) => tracing::debug!(error = %e, "pub/sub connection lost"),
            }
            if backoff.wait(&shutdown).await {
                return;
            }
        }
    }
}
