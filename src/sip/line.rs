//! The incident line: what the UAS answers (contract §3), on top of the
//! transaction layer (`transaction.rs`).
//!
//! - admission: a request that stores something (INVITE, MESSAGE) needs Redis
//!   up, no drain under way and a permit (`sip.max_inflight`), else 503 +
//!   Retry-After;
//! - INVITE: 100 at once; the answer that says an incident exists (180 in
//!   shadow mode, the decline status in decline mode) only after intake
//!   returned, i.e. after the record is in Redis; shadow mode keeps an early
//!   dialog for INFO (DTMF), BYE and CANCEL, and ends the ring with 480 after
//!   `sip.max_ring`; anything in a dialog we do not know gets 481;
//! - out-of-dialog MESSAGE carries a call event (`X-Event`, see `message.rs`):
//!   400 when a header it needs is missing, 202 only after intake stored it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::call::{DtmfError, dtmf_digit, facts_of_invite};
use super::message::event_of;
use super::rate::RateLimit;
use super::transaction::{
    DialogKey, Peer, Transactions, TxKey, build, dialog_key, method_label, new_tag, tag_of, tx_key,
};
use super::wire::{Message, Reply};
use crate::config::{SipMode, SipSettings};
use crate::domain::call::{CallEnd, CallFacts};
use crate::intake::Intake;
use crate::telemetry::metric;

pub const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, INFO, OPTIONS, MESSAGE";
const ACCEPT_INFO: &str = "application/dtmf-relay, application/dtmf";

/// What the line keeps of a call while its INVITE transaction lives.
#[derive(Default)]
struct Call {
    /// Set when CANCEL or BYE arrived while the incident was still being stored.
    ended: Option<CallEnd>,
    incident: Option<String>,
}

/// What the line keeps of an early dialog (shadow mode).
struct Ringing {
    incident: String,
    /// The call's facts; the IVR path grows with each INFO digit.
    facts: CallFacts,
    /// Serialises INFO handling, so digits are applied in order.
    lock: Arc<tokio::sync::Mutex<()>>,
}

/// The SIP user agent server of the incident line.
pub struct Uas {
    txs: Transactions<Call, Ringing>,
    intake: Arc<Intake>,
    mode: SipMode,
    decline_status: u16,
    max_ring: Duration,
    retry_after: String,
    permits: Arc<Semaphore>,
    rate: RateLimit,
    redis_up: Arc<AtomicBool>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// `Reason: SIP;cause=200` on a CANCEL: the call was answered elsewhere.
fn answered_elsewhere(msg: &Message) -> bool {
    msg.headers("reason").flat_map(|v| v.split(',')).any(|r| {
        let mut parts = r.split(';').map(str::trim);
        parts.next().is_some_and(|p| p.eq_ignore_ascii_case("SIP"))
            && parts.any(|p| {
                p.split_once('=').is_some_and(|(k, v)| k.trim().eq_ignore_ascii_case("cause") && v.trim() == "200")
            })
    })
}

impl Uas {
    pub fn new(
        settings: &SipSettings,
        intake: Arc<Intake>,
        redis_up: Arc<AtomicBool>,
        shutdown: CancellationToken,
    ) -> Arc<Uas> {
        Arc::new(Uas {
            txs: Transactions::default(),
            intake,
            mode: settings.mode,
            decline_status: settings.decline_status,
            max_ring: settings.max_ring,
            retry_after: settings.retry_after_s.to_string(),
            permits: Arc::new(Semaphore::new(settings.max_inflight)),
            rate: RateLimit::new(settings.rate_limit),
            redis_up,
            tasks: TaskTracker::new(),
            shutdown,
        })
    }

    /// In-flight work (Redis writes) to wait for on shutdown.
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }

    /// Handles one checked request.
    pub fn handle(self: &Arc<Self>, msg: Message, peer: Peer) {
        let Some(method) = msg.method().map(str::to_string) else { return };
        metrics::counter!(metric::SIP_REQUESTS, "method" => method_label(&method)).increment(1);
        match method.as_str() {
            "ACK" => return self.txs.ack(&msg),
            "CANCEL" => return self.on_cancel(&msg, &peer),
            _ => {}
        }
        let key = tx_key(&msg, &method);
        if self.txs.absorb(&key, &peer) {
            return;
        }
        let reply = msg.reply();
        // RFC 3261 §8.2.2.3: we support no extensions, so any Require is refused.
        let required: Vec<&str> =
            msg.headers("require").flat_map(|v| v.split(',')).map(str::trim).filter(|t| !t.is_empty()).collect();
        if !required.is_empty() {
            let unsupported = required.join(", ");
            let r = build(&reply, 420, "Bad Extension", Some(&new_tag()), &[("Unsupported", unsupported.as_str())]);
            return self.txs.finish(key, &peer, r);
        }
        if matches!(method.as_str(), "INVITE" | "MESSAGE") && !self.rate.allow(peer.addr().ip(), Instant::now()) {
            metrics::counter!(metric::SIP_DROPPED, "reason" => "rate_limit").increment(1);
            return self.txs.finish(key, &peer, self.unavailable(&reply, Some(&new_tag())));
        }
        match method.as_str() {
            "INVITE" => self.on_invite(msg, peer, key),
            "OPTIONS" => {
                let r = build(&reply, 200, "OK", Some(&new_tag()), &[("Allow", ALLOW), ("Accept", "application/sdp")]);
                self.txs.finish(key, &peer, r);
            }
            "INFO" => self.on_info(msg, peer, key),
            "BYE" => self.on_bye(&msg, &peer, key),
            "MESSAGE" => self.on_message(&msg, peer, key),
            _ => {
                let r = build(&reply, 405, "Method Not Allowed", Some(&new_tag()), &[("Allow", ALLOW)]);
                self.txs.finish(key, &peer, r);
            }
        }
    }

    /// A permit to store something in Redis now, or None when the answer must
    /// be 503: Redis is away, we are shutting down, or too much is in flight.
    fn admit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        if !self.redis_up.load(Ordering::Relaxed) || self.shutdown.is_cancelled() {
            return None;
        }
        let permit = self.permits.clone().try_acquire_owned().ok();
        if permit.is_none() {
            tracing::warn!("too many calls being stored at once; answering 503");
        }
        permit
    }

    /// `503` + `Retry-After`.
    fn unavailable(&self, reply: &Reply, to_tag: Option<&str>) -> Bytes {
        build(reply, 503, "Service Unavailable", to_tag, &[("Retry-After", &self.retry_after)])
    }

    fn final_unavailable(&self, key: &TxKey) {
        self.final_invite(key, 503, "Service Unavailable", &[("Retry-After", &self.retry_after)]);
    }

    /// The final response of an INVITE; its early dialog (if any) ends with it.
    fn final_invite(&self, key: &TxKey, status: u16, reason: &str, extra: &[(&str, &str)]) {
        self.txs.final_invite(key, status, reason, extra);
    }

    fn on_invite(self: &Arc<Self>, msg: Message, peer: Peer, key: TxKey) {
        let reply = msg.reply();
        if msg.to_tag().is_some() {
            // A re-INVITE: we never establish a confirmed dialog.
            let known = dialog_key(&msg).is_some_and(|k| self.txs.lock().dialogs.contains_key(&k));
            let r = if known {
                build(&reply, 488, "Not Acceptable Here", None, &[])
            } else {
                build(&reply, 481, "Call/Transaction Does Not Exist", None, &[])
            };
            return self.txs.finish(key, &peer, r);
        }
        if msg.header("max-forwards").is_some_and(|m| m.trim() == "0") {
            let r = build(&reply, 483, "Too Many Hops", Some(&new_tag()), &[]);
            return self.txs.finish(key, &peer, r);
        }
        let trying = build(&reply, 100, "Trying", None, &[]);
        peer.send(&trying);
        if !self.txs.begin_invite(key.clone(), peer.clone(), reply.clone(), trying, self.max_ring, Call::default()) {
            return peer.send(&self.unavailable(&reply, Some(&new_tag())));
        }
        let Some(permit) = self.admit() else { return self.final_unavailable(&key) };
        let facts = facts_of_invite(&msg);
        let span = tracing::info_span!("call", call_id = %facts.call_id, incident_id = tracing::field::Empty);
        let this = self.clone();
        let received = std::time::Instant::now();
        self.tasks.spawn(
            async move {
                this.open_and_answer(key, facts, peer.transport(), received).await;
                drop(permit);
            }
            .instrument(span),
        );
    }

    /// Stores the incident, then gives the answer that says it exists.
    async fn open_and_answer(
        self: &Arc<Self>,
        key: TxKey,
        facts: CallFacts,
        transport: &'static str,
        received: std::time::Instant,
    ) {
        let opened = match self.intake.open_call(&facts, received.elapsed(), transport).await {
            Ok(o) => {
                metrics::histogram!(metric::INTAKE_SECONDS).record(received.elapsed().as_secs_f64());
                o
            }
            Err(e) => {
                tracing::warn!(error = %e, "incident not stored; answering 503");
                return self.final_unavailable(&key);
            }
        };
        tracing::Span::current().record("incident_id", opened.id.as_str());
        let id_hdr = [("X-Incident-Id", opened.id.as_str())];
        let ended = {
            let mut guard = self.txs.lock();
            let st = &mut *guard;
            let Some(tx) = st.invite(&key) else { return };
            tx.call.incident = Some(opened.id.clone());
            match tx.call.ended {
                Some(how) => Some((how, tx.received.elapsed())),
                None if self.mode == SipMode::Shadow => {
                    let dk = DialogKey {
                        call_id: facts.call_id.clone(),
                        local_tag: tx.to_tag.clone(),
                        remote_tag: tx.reply.from.as_deref().map(tag_of).unwrap_or_default(),
                    };
                    let contact = format!("<{}>", contact_uri(&facts, transport));
                    let ringing = build(
                        &tx.reply,
                        180,
                        "Ringing",
                        Some(&tx.to_tag),
                        &[("X-Incident-Id", opened.id.as_str()), ("Contact", contact.as_str())],
                    );
                    tx.peer.send(&ringing);
                    tx.last = ringing;
                    tx.dialog = Some(dk.clone());
                    let data = Ringing { incident: opened.id.clone(), facts: facts.clone(), lock: Arc::default() };
                    st.dialogs.insert(dk, super::transaction::Dialog { invite: key.clone(), data });
                    None
                }
                None => None,
            }
        };
        match (ended, self.mode) {
            (Some((how, rung)), _) => {
                self.final_invite(&key, 487, "Request Terminated", &id_hdr);
                self.record_end(opened.id, how, rung);
            }
            (None, SipMode::Decline) => {
                self.final_invite(&key, self.decline_status, decline_reason(self.decline_status), &id_hdr)
            }
            (None, SipMode::Shadow) => self.ring_limit(key, opened.id),
        }
    }

    /// Ends a ringing shadow-mode call with 480 after `sip.max_ring`.
    fn ring_limit(self: &Arc<Self>, key: TxKey, id: String) {
        let this = self.clone();
        let max_ring = self.max_ring;
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(max_ring) => {}
                _ = this.shutdown.cancelled() => return,
            }
            let ringing = this.txs.lock().invite(&key).is_some_and(|t| !t.final_sent);
            if ringing {
                this.final_invite(&key, 480, "Temporarily Unavailable", &[]);
                this.record_end(id, CallEnd::RingLimit, max_ring);
            }
        });
    }

    fn record_end(self: &Arc<Self>, id: String, how: CallEnd, rung: Duration) {
        let this = self.clone();
        let span = tracing::info_span!("call", incident_id = %id);
        self.tasks.spawn(
            async move {
                if let Err(e) = this.intake.call_ended(&id, how, rung).await {
                    tracing::warn!(error = %e, "call end not recorded");
                }
            }
            .instrument(span),
        );
    }

    fn on_cancel(self: &Arc<Self>, msg: &Message, peer: &Peer) {
        let key = tx_key(msg, "CANCEL");
        if self.txs.absorb(&key, peer) {
            return;
        }
        let reply = msg.reply();
        let how = if answered_elsewhere(msg) { CallEnd::AnsweredElsewhere } else { CallEnd::Abandoned };
        let invite_key = key.invite();
        let (resp, end_now) = {
            let mut st = self.txs.lock();
            match st.invite(&invite_key) {
                Some(tx) => {
                    let resp = build(&reply, 200, "OK", Some(&tx.to_tag), &[]);
                    if tx.final_sent || tx.call.ended.is_some() {
                        (resp, None)
                    } else if let Some(id) = tx.call.incident.clone() {
                        (resp, Some((id, tx.received.elapsed())))
                    } else {
                        // Still being stored: open_and_answer answers 487 and records it.
                        tx.call.ended = Some(how);
                        (resp, None)
                    }
                }
                None => (build(&reply, 481, "Call/Transaction Does Not Exist", Some(&new_tag()), &[]), None),
            }
        };
        self.txs.finish(key, peer, resp);
        if let Some((id, rung)) = end_now {
            self.final_invite(&invite_key, 487, "Request Terminated", &[]);
            self.record_end(id, how, rung);
        }
    }

    fn on_bye(self: &Arc<Self>, msg: &Message, peer: &Peer, key: TxKey) {
        let reply = msg.reply();
        let found = dialog_key(msg).and_then(|dk| {
            let mut st = self.txs.lock();
            let d = st.dialogs.remove(&dk)?;
            let rung = st.invite(&d.invite).map(|t| t.received.elapsed()).unwrap_or_default();
            Some((d, rung))
        });
        let Some((dialog, rung)) = found else {
            let r = build(&reply, 481, "Call/Transaction Does Not Exist", None, &[]);
            return self.txs.finish(key, peer, r);
        };
        self.txs.finish(key, peer, build(&reply, 200, "OK", None, &[]));
        self.final_invite(&dialog.invite, 487, "Request Terminated", &[]);
        self.record_end(dialog.data.incident, CallEnd::CallerHangup, rung);
    }

    fn on_info(self: &Arc<Self>, msg: Message, peer: Peer, key: TxKey) {
        let reply = msg.reply();
        let dialog = dialog_key(&msg).and_then(|dk| {
            let st = self.txs.lock();
            st.dialogs.get(&dk).map(|d| (dk, d.data.lock.clone()))
        });
        let Some((dk, dlock)) = dialog else {
            let r = build(&reply, 481, "Call/Transaction Does Not Exist", None, &[]);
            return self.txs.finish(key, &peer, r);
        };
        let digit = match dtmf_digit(msg.header("content-type"), &msg.body) {
            Ok(Some(d)) => d,
            Ok(None) => return self.txs.finish(key, &peer, build(&reply, 200, "OK", None, &[])),
            Err(DtmfError::UnsupportedType) => {
                let r = build(&reply, 415, "Unsupported Media Type", None, &[("Accept", ACCEPT_INFO)]);
                return self.txs.finish(key, &peer, r);
            }
            Err(DtmfError::BadBody) => {
                return self.txs.finish(key, &peer, build(&reply, 400, "Bad DTMF Body", None, &[]));
            }
        };
        // Admitted like an INVITE: Redis up, not draining, a permit.
        let Some(permit) = self.admit() else {
            return self.txs.finish(key, &peer, self.unavailable(&reply, None));
        };
        // Absorb retransmissions while the digit is being stored.
        if !self.txs.working(key.clone()) {
            return peer.send(&self.unavailable(&reply, None));
        }
        let this = self.clone();
        self.tasks.spawn(async move {
            let _permit = permit;
            let _serial = dlock.lock().await;
            let current = {
                let st = this.txs.lock();
                st.dialogs.get(&dk).map(|d| (d.data.incident.clone(), d.data.facts.clone()))
            };
            let resp = match current {
                // The dialog ended while we waited.
                None => build(&reply, 481, "Call/Transaction Does Not Exist", None, &[]),
                Some((id, facts)) => match this.intake.ivr_digit(&id, &facts, digit).await {
                    Ok(facts) => {
                        if let Some(d) = this.txs.lock().dialogs.get_mut(&dk) {
                            d.data.facts = facts;
                        }
                        build(&reply, 200, "OK", None, &[])
                    }
                    Err(e) => {
                        tracing::warn!(incident_id = %id, error = %e, "IVR digit not stored; answering 503");
                        this.unavailable(&reply, None)
                    }
                },
            };
            this.txs.finish(key, &peer, resp);
        });
    }

    /// An out-of-dialog MESSAGE: a call event from the dialplan. Answered 202
    /// only once intake has stored it; 503 + Retry-After while it cannot be.
    fn on_message(self: &Arc<Self>, msg: &Message, peer: Peer, key: TxKey) {
        let reply = msg.reply();
        if msg.to_tag().is_some() {
            // We never establish a dialog a MESSAGE could belong to.
            let r = build(&reply, 481, "Call/Transaction Does Not Exist", None, &[]);
            return self.txs.finish(key, &peer, r);
        }
        let ev = match event_of(msg) {
            Ok(ev) => ev,
            Err(bad) => {
                tracing::debug!(header = bad.header(), "MESSAGE refused");
                let (reason, warning) = (bad.reason(), bad.warning());
                let r = build(&reply, 400, &reason, Some(&new_tag()), &[("Warning", warning.as_str())]);
                return self.txs.finish(key, &peer, r);
            }
        };
        let Some(permit) = self.admit() else {
            return self.txs.finish(key, &peer, self.unavailable(&reply, Some(&new_tag())));
        };
        // Absorb retransmissions while the event is being stored.
        if !self.txs.working(key.clone()) {
            return peer.send(&self.unavailable(&reply, Some(&new_tag())));
        }
        let span = tracing::info_span!("call", call_id = %ev.call_id, event = ev.kind.as_str());
        let this = self.clone();
        self.tasks.spawn(
            async move {
                let resp = match this.intake.apply(ev).await {
                    Ok(o) => match &o.incident {
                        Some(id) => build(&reply, 202, "Accepted", Some(&new_tag()), &[("X-Incident-Id", id.as_str())]),
                        None => build(&reply, 202, "Accepted", Some(&new_tag()), &[]),
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "call event not stored; answering 503");
                        this.unavailable(&reply, Some(&new_tag()))
                    }
                };
                drop(permit);
                this.txs.finish(key, &peer, resp);
            }
            .instrument(span),
        );
    }

    /// Resends unacknowledged final responses until shutdown (see `RESEND_TICK`).
    pub async fn resend_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(super::transaction::RESEND_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.txs.resend_due(),
            }
        }
    }

    /// Forgets finished transactions and idle sources; run every second.
    pub fn sweep(&self) {
        self.txs.sweep();
        self.rate.sweep(Instant::now());
    }

    /// On shutdown: end every ringing call with 503, so no PBX leg rings on.
    pub fn end_ringing(&self) {
        for k in self.txs.pending_invites(|c| c.incident.is_some()) {
            self.final_unavailable(&k);
        }
    }
}

/// The Contact of our 180: where the PBX reached us, so in-dialog requests come back here.
fn contact_uri(facts: &CallFacts, transport: &str) -> String {
    let user = facts.ruri_user.as_deref().unwrap_or("dispatchd");
    let host = facts.ruri_host.as_deref().unwrap_or("127.0.0.1");
    match transport {
        "tcp" | "tls" => format!("sip:{user}@{host};transport={transport}"),
        _ => format!("sip:{user}@{host}"),
    }
}

fn decline_reason(status: u16) -> &'static str {
    match status {
        603 => "Decline",
        486 => "Busy Here",
        480 => "Temporarily Unavailable",
        404 => "Not Found",
        600 => "Busy Everywhere",
        _ => "Declined",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::wire::{Verdict, parse_datagram};

    fn msg(extra: &str) -> Message {
        let raw = format!(
            "CANCEL sip:x@192.0.2.1 SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKa\r\nFrom: <sip:a@b>;tag=f\r\n\
             To: <sip:x@192.0.2.1>\r\nCall-ID: c\r\nCSeq: 1 CANCEL\r\n{extra}Content-Length: 0\r\n\r\n"
        );
        match parse_datagram(raw.as_bytes()) {
            Verdict::Ok(m) => m,
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn reason_cause_200_means_answered_elsewhere() {
        assert!(answered_elsewhere(&msg("Reason: SIP;cause=200;text=\"Call completed elsewhere\"\r\n")));
        assert!(answered_elsewhere(&msg("Reason: Q.850;cause=16, SIP ; cause = 200\r\n")));
        assert!(!answered_elsewhere(&msg("Reason: Q.850;cause=200\r\n")));
        assert!(!answered_elsewhere(&msg("Reason: SIP;cause=487\r\n")));
        assert!(!answered_elsewhere(&msg("")));
    }
}
