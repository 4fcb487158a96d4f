//! The dispatcher: who is offered what, and when (contract §4).
//!
//! The rules themselves run in Redis (`store/scripts/dispatch.lua`), so that
//! several daemons sharing one Redis never offer an incident twice; this loop
//! decides when to run them and delivers what they decide:
//!
//! - on every wake-up (a new incident, a responder free again, an answer) and
//!   at least every 500 ms: withdraw offers past their deadline (`cancel` to
//!   that responder), then pair the queue with free responders (`dispatch`);
//! - every 2 s: send again any offer a connected responder has not received
//!   (offers made by another daemon, or lost in transit), and renew the
//!   presence leases of the responders connected here.
//!
//! Pub/sub only speeds things up between daemons; nothing depends on it.
//! The systemd watchdog is pinged from this loop, so a stuck core stops it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures_util::StreamExt;
use serde_json::json;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::incident::{Severity, TimelineEntry, mask, timestamp_ms};
use crate::responders::{Sessions, wire};
use crate::store::Store;
use crate::store::dispatch::{Cancel, OfferDetails, Policy};
use crate::systemd;
use crate::telemetry::metric;

/// Offers made in one pass of the matcher, at most.
const MATCH_BATCH: usize = 64;
const MAX_SLEEP: Duration = Duration::from_millis(500);
const RESYNC_EVERY: Duration = Duration::from_secs(2);

/// Shared by the dispatcher loop and the responder sessions.
pub struct Dispatch {
    pub store: Store,
    pub sessions: Sessions,
    /// This daemon's name in Redis (host, pid and a random part).
    pub daemon: String,
    pub policy: Policy,
    pub heartbeat: Duration,
    wake: Notify,
    /// Another daemon made an offer that may be for one of ours: resync now.
    resync_soon: AtomicBool,
    /// Responder sessions, waited for on shutdown (their 1001 close frames).
    pub sessions_tasks: TaskTracker,
}

impl Dispatch {
    pub fn new(store: Store, settings: &Settings) -> Arc<Dispatch> {
        let e = &settings.escalation;
        let policies = Severity::ALL.map(|s| e.for_severity(s));
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        Arc::new(Dispatch {
            store,
            sessions: Sessions::default(),
            daemon: format!("{}-{}-{:04x}", host.trim(), std::process::id(), rand::random::<u16>()),
            policy: Policy {
                ack_timeout_ms: policies.map(|p| p.ack_timeout.as_millis() as u64),
                max_rounds: policies.map(|p| p.max_rounds),
            },
            heartbeat: settings.responders.heartbeat,
            wake: Notify::new(),
            resync_soon: AtomicBool::new(false),
            sessions_tasks: TaskTracker::new(),
        })
    }

    /// Something changed: run the matcher soon.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Until when a presence lease written now holds.
    pub fn lease_until(&self, heartbeat: Duration) -> i64 {
        Utc::now().timestamp_millis() + 3 * heartbeat.as_millis() as i64
    }

    /// Writes the `dispatch` frame of `incident` to `rid` (see [`Dispatch::deliver_many`]).
    pub async fn deliver(&self, rid: &str, incident: &str) {
        self.deliver_many(&[(rid.to_string(), incident.to_string())]).await;
    }

    /// Writes each `dispatch` frame whose incident is still offered to that
    /// responder and which its connection does not have yet (offers made by
    /// another daemon, or sent again after a reconnect). `delivered` is
    /// recorded first, in one round trip for all, so the timeline never shows
    /// an acknowledgement before the delivery it answers.
    pub async fn deliver_many(&self, offers: &[(String, String)]) {
        if offers.is_empty() {
            return;
        }
        let ids: Vec<String> = offers.iter().map(|(_, i)| i.clone()).collect();
        let details = match self.store.offer_details(&ids).await {
            Ok(v) => v,
            Err(e) => return tracing::warn!(error = %e, "offers not read"),
        };
        let now = Utc::now();
        let mut due = Vec::new();
        let mut entries = Vec::new();
        for ((rid, _), d) in offers.iter().zip(details) {
            let Some(d) = d else { continue };
            if d.state != "offered" || d.assigned_to != *rid || self.sessions.has_dispatch(rid, &d.dispatch_id) {
                continue;
            }
            let detail = json!({"responder": rid, "dispatch_id": d.dispatch_id});
            entries.push((d.incident_id.clone(), TimelineEntry::new(now, "delivered", "dispatchd", detail)));
            due.push((rid.clone(), d));
        }
        if let Err(e) = self.store.append_many(&entries).await {
            tracing::warn!(error = %e, "deliveries not recorded");
        }
        for (rid, d) in &due {
            self.send_offer(rid, d);
        }
    }

    /// Writes one `dispatch` frame (unless the connection has it) and times it.
    fn send_offer(&self, rid: &str, d: &OfferDetails) {
        let frame = json!({
            "type": "dispatch",
            "dispatch_id": d.dispatch_id,
            "incident_id": d.incident_id,
            "attempt": d.attempt,
            "severity": d.severity,
            "category": d.category,
            "summary": d.summary,
            "instructions": d.instructions,
            "caller": mask(&d.caller),
            "queue": d.queue,
            "opened_at": timestamp_ms(d.opened_ms),
            "ack_by": timestamp_ms(d.ack_by_ms),
            // Extension: a major incident (surge or abandon storm).
            "major": d.major,
        });
        if self.sessions.send_dispatch(rid, &d.dispatch_id, frame.to_string()) {
            let secs = (Utc::now().timestamp_millis() - d.opened_ms).max(0) as f64 / 1000.0;
            metrics::histogram!(metric::CALL_TO_OFFER).record(secs);
        }
    }

    fn send_cancel(&self, c: &Cancel) {
        let frame = wire::cancel(&c.dispatch_id, &c.reason);
        if !self.sessions.send(&c.responder, frame) && !c.daemon.is_empty() && c.daemon != self.daemon {
            let store = self.store.clone();
            let payload = format!("{}\t{}\t{}", c.responder, c.dispatch_id, c.reason);
            tokio::spawn(async move { store.publish("cancel", &payload).await });
        }
    }

    /// One pass: deadlines, then offers. Returns when the next deadline falls.
    async fn step(&self) -> Option<i64> {
        loop {
            let step = match self.store.step(MATCH_BATCH, &self.policy, &self.daemon).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "dispatch step failed");
                    return None;
                }
            };
            for c in &step.cancels {
                metrics::counter!(metric::DISPATCH_OFFERS, "outcome" => "ack_timeout").increment(1);
                tracing::info!(responder = %c.responder, dispatch_id = %c.dispatch_id, "no acknowledgement in time; offer withdrawn");
                self.send_cancel(c);
            }
            let mut remote = false;
            for (o, details) in &step.offers {
                metrics::counter!(metric::DISPATCH_OFFERS, "outcome" => "offered").increment(1);
                if o.escalated {
                    metrics::counter!(metric::ESCALATIONS, "severity" => o.severity.as_str()).increment(1);
                }
                tracing::info!(incident_id = %o.incident_id, responder = %o.responder, dispatch_id = %o.dispatch_id, escalated = o.escalated, "offered");
                if o.daemon == self.daemon {
                    // `delivered` was recorded by the script itself.
                    self.send_offer(&o.responder, details);
                } else {
                    remote = true;
                }
            }
            for (id, severity) in &step.exhausted {
                metrics::counter!(metric::DISPATCH_OFFERS, "outcome" => "exhausted").increment(1);
                tracing::warn!(incident_id = %id, severity = %severity, "nobody acknowledged in max_rounds passes; back in the queue, flagged exhausted");
            }
            if remote {
                self.store.publish("wake", &self.daemon).await;
            }
            if step.offers.len() < MATCH_BATCH {
                return step.next_deadline_ms;
            }
        }
    }

    /// Offers the connected responders should have; leases.
    async fn resync(&self, renew_leases: bool) {
        let rids = self.sessions.connected();
        if renew_leases
            && let Err(e) = self.store.refresh_leases(&self.daemon, self.lease_until(self.heartbeat), &rids).await
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
        let mut next_deadline: Option<i64> = None;
        loop {
            let sleep = match next_deadline {
                Some(ms) => {
                    let left = ms - Utc::now().timestamp_millis();
                    Duration::from_millis(left.clamp(0, MAX_SLEEP.as_millis() as i64) as u64)
                }
                None => MAX_SLEEP,
            };
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
        let mut delay = Duration::from_millis(200);
        loop {
            if let Err(e) = self.listen_once(&shutdown).await {
                tracing::debug!(error = %e, "pub/sub connection lost");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    async fn listen_once(&self, shutdown: &CancellationToken) -> redis::RedisResult<()> {
        let client = redis::Client::open(self.store.client_url())?;
        let mut pubsub = client.get_async_pubsub().await?;
        let (wake_ch, cancel_ch) = (self.store.channel("wake"), self.store.channel("cancel"));
        pubsub.subscribe(&[&wake_ch, &cancel_ch]).await?;
        let mut stream = pubsub.on_message();
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                m = stream.next() => match m { Some(m) => m, None => return Ok(()) },
            };
            let payload: String = msg.get_payload().unwrap_or_default();
            if msg.get_channel_name() == cancel_ch {
                let mut parts = payload.splitn(3, '\t');
                if let (Some(rid), Some(dispatch_id), Some(reason)) = (parts.next(), parts.next(), parts.next()) {
                    self.sessions.send(rid, wire::cancel(dispatch_id, reason));
                }
            } else if payload != self.daemon {
                self.resync_soon.store(true, Ordering::Relaxed);
                self.wake();
            }
        }
    }
}
