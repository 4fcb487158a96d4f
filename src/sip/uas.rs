//! The incident line's user agent server: transactions, early dialogs, and the
//! answers of contract §3.
//!
//! Why not rsipstack's transaction layer: its transports drop what they cannot
//! parse and cannot represent unknown methods, so they can never answer 400 or
//! 405, apply the allow list before anything is sent, or bound TCP framing. We
//! use rsipstack's SIP types (see `call.rs`) and keep this UAS-only layer small:
//!
//! - server transactions keyed by top Via branch and method (ACK and CANCEL
//!   find their INVITE by the same branch); the last response is kept and sent
//!   again for a retransmitted request, so a retransmission never reaches intake;
//! - a final response to an INVITE over UDP is retransmitted (Timer G, T1..T2)
//!   until the ACK or Timer H (64·T1);
//! - early dialogs (shadow mode) keyed by Call-ID and both tags, for INFO, BYE
//!   and CANCEL; anything in a dialog we do not know gets 481;
//! - out-of-dialog MESSAGE carries a call event (`X-Event`, see `message.rs`):
//!   400 when a header it needs is missing, 202 only after intake stored it;
//! - finished transactions are forgotten after 32 s by a sweeper.
//!
//! The answer that says an incident exists (180, or the decline status) is
//! sent only after intake returned, i.e. after the record is in Redis.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use tokio::net::UdpSocket;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::call::{CallFacts, DtmfError, dtmf_digit};
use super::message::event_of;
use super::wire::{Message, Reply, response};
use crate::config::{SipMode, SipSettings};
use crate::intake::{CallEnd, Intake};
use crate::telemetry::metric;

/// RFC 3261 timers.
const T1: Duration = Duration::from_millis(500);
const T2: Duration = Duration::from_secs(4);
const T4: Duration = Duration::from_secs(5);
/// How long a finished transaction is remembered (Timer H / Timer J, 64·T1).
const LINGER: Duration = Duration::from_secs(32);
/// Transactions remembered at once, at most; beyond that new INVITEs get 503.
const MAX_TRANSACTIONS: usize = 500_000;

pub const ALLOW: &str = "INVITE, ACK, CANCEL, BYE, INFO, OPTIONS, MESSAGE";
const ACCEPT_INFO: &str = "application/dtmf-relay, application/dtmf";

/// Where a response goes: back the way the request came.
#[derive(Clone, Debug)]
pub enum Peer {
    Udp { sock: Arc<UdpSocket>, addr: SocketAddr },
    Tcp { tx: mpsc::Sender<Bytes>, addr: SocketAddr },
}

impl Peer {
    fn reliable(&self) -> bool {
        matches!(self, Peer::Tcp { .. })
    }

    pub fn transport(&self) -> &'static str {
        match self {
            Peer::Udp { .. } => "udp",
            Peer::Tcp { .. } => "tcp",
        }
    }

    /// Sends bytes without waiting; a full socket or a closed connection loses them
    /// (UDP retransmissions and the peer's own timers cover that).
    pub fn send(&self, bytes: &Bytes) {
        match self {
            Peer::Udp { sock, addr } => {
                let _ = sock.try_send_to(bytes, *addr);
            }
            Peer::Tcp { tx, .. } => {
                let _ = tx.try_send(bytes.clone());
            }
        }
    }
}

/// Builds a response and counts it.
pub fn build(reply: &Reply, status: u16, reason: &str, to_tag: Option<&str>, extra: &[(&str, &str)]) -> Bytes {
    metrics::counter!(metric::SIP_RESPONSES, "status" => status.to_string()).increment(1);
    Bytes::from(response(reply, status, reason, to_tag, extra, b""))
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TxKey {
    branch: String,
    method: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct DialogKey {
    call_id: String,
    local_tag: String,
    remote_tag: String,
}

struct InviteTx {
    peer: Peer,
    reply: Reply,
    to_tag: String,
    last: Bytes,
    final_sent: bool,
    /// Set when CANCEL or BYE arrived while the incident was still being stored.
    ended: Option<CallEnd>,
    acked: Arc<AtomicBool>,
    received: Instant,
    incident: Option<String>,
    dialog: Option<DialogKey>,
    expires: Instant,
}

struct OtherTx {
    /// None while the request is being worked on (retransmissions are then ignored).
    last: Option<Bytes>,
    expires: Instant,
}

// Most transactions are INVITEs: boxing them would add an allocation per call.
#[allow(clippy::large_enum_variant)]
enum Tx {
    Invite(InviteTx),
    Other(OtherTx),
}

struct Dialog {
    incident: String,
    invite: TxKey,
    /// The call's facts; the IVR path grows with each INFO digit.
    facts: CallFacts,
    /// Serialises INFO handling, so digits are applied in order.
    lock: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Default)]
struct State {
    txs: HashMap<TxKey, Tx>,
    dialogs: HashMap<DialogKey, Dialog>,
}

/// The SIP user agent server of the incident line.
pub struct Uas {
    state: Mutex<State>,
    intake: Arc<Intake>,
    mode: SipMode,
    decline_status: u16,
    max_ring: Duration,
    retry_after: String,
    permits: Arc<Semaphore>,
    redis_up: Arc<AtomicBool>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// RFC 3261 §17.2.3: a request matches a server transaction by the top Via's
/// branch *and* sent-by, and the method (ACK and CANCEL find their INVITE).
fn tx_key(msg: &Message, method: &str) -> TxKey {
    let branch = match msg.top_via_branch() {
        Some(b) if b.starts_with("z9hG4bK") => format!("{b}|{}", msg.top_via_sent_by().unwrap_or_default()),
        // RFC 2543 peers: no magic cookie, so key by what identifies the request.
        _ => format!(
            "2543|{}|{}|{}|{}",
            msg.call_id(),
            msg.cseq().0,
            msg.from_tag().unwrap_or(""),
            msg.header("via").unwrap_or("")
        ),
    };
    TxKey { branch, method: method.to_string() }
}

fn dialog_key(msg: &Message) -> Option<DialogKey> {
    Some(DialogKey {
        call_id: msg.call_id().to_string(),
        local_tag: msg.to_tag()?.to_string(),
        remote_tag: msg.from_tag().unwrap_or("").to_string(),
    })
}

fn new_tag() -> String {
    format!("{:016x}", rand::random::<u64>())
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

fn method_label(m: &str) -> &'static str {
    match m {
        "INVITE" => "INVITE",
        "ACK" => "ACK",
        "CANCEL" => "CANCEL",
        "BYE" => "BYE",
        "INFO" => "INFO",
        "OPTIONS" => "OPTIONS",
        "REGISTER" => "REGISTER",
        "MESSAGE" => "MESSAGE",
        "SUBSCRIBE" => "SUBSCRIBE",
        "NOTIFY" => "NOTIFY",
        "PRACK" => "PRACK",
        "UPDATE" => "UPDATE",
        "REFER" => "REFER",
        "PUBLISH" => "PUBLISH",
        _ => "other",
    }
}

impl Uas {
    pub fn new(
        settings: &SipSettings,
        intake: Arc<Intake>,
        redis_up: Arc<AtomicBool>,
        shutdown: CancellationToken,
    ) -> Arc<Uas> {
        Arc::new(Uas {
            state: Mutex::new(State::default()),
            intake,
            mode: settings.mode,
            decline_status: settings.decline_status,
            max_ring: settings.max_ring,
            retry_after: settings.retry_after_s.to_string(),
            permits: Arc::new(Semaphore::new(settings.max_inflight)),
            redis_up,
            tasks: TaskTracker::new(),
            shutdown,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock must not take the line down with it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
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
            "ACK" => return self.on_ack(&msg),
            "CANCEL" => return self.on_cancel(&msg, &peer),
            _ => {}
        }
        let key = tx_key(&msg, &method);
        {
            let st = self.lock();
            match st.txs.get(&key) {
                Some(Tx::Invite(t)) => return peer.send(&t.last),
                Some(Tx::Other(t)) => {
                    if let Some(last) = &t.last {
                        peer.send(last);
                    }
                    return;
                }
                None => {}
            }
        }
        let reply = msg.reply();
        // RFC 3261 §8.2.2.3: we support no extensions, so any Require is refused.
        let required: Vec<&str> =
            msg.headers("require").flat_map(|v| v.split(',')).map(str::trim).filter(|t| !t.is_empty()).collect();
        if !required.is_empty() {
            let unsupported = required.join(", ");
            let r = build(&reply, 420, "Bad Extension", Some(&new_tag()), &[("Unsupported", unsupported.as_str())]);
            return self.finish_other(key, &peer, r);
        }
        match method.as_str() {
            "INVITE" => self.on_invite(msg, peer, key),
            "OPTIONS" => {
                let r = build(&reply, 200, "OK", Some(&new_tag()), &[("Allow", ALLOW), ("Accept", "application/sdp")]);
                self.finish_other(key, &peer, r);
            }
            "INFO" => self.on_info(msg, peer, key),
            "BYE" => self.on_bye(&msg, &peer, key),
            "MESSAGE" => self.on_message(&msg, peer, key),
            _ => {
                let r = build(&reply, 405, "Method Not Allowed", Some(&new_tag()), &[("Allow", ALLOW)]);
                self.finish_other(key, &peer, r);
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

    /// `503` + `Retry-After` for a non-INVITE request.
    fn unavailable(&self, reply: &Reply, to_tag: Option<&str>) -> Bytes {
        build(reply, 503, "Service Unavailable", to_tag, &[("Retry-After", &self.retry_after)])
    }

    /// Sends the final response of a non-INVITE transaction and remembers it.
    fn finish_other(&self, key: TxKey, peer: &Peer, resp: Bytes) {
        peer.send(&resp);
        let expires = Instant::now() + if peer.reliable() { Duration::ZERO } else { LINGER };
        self.lock().txs.insert(key, Tx::Other(OtherTx { last: Some(resp), expires }));
    }

    fn on_invite(self: &Arc<Self>, msg: Message, peer: Peer, key: TxKey) {
        let reply = msg.reply();
        if msg.to_tag().is_some() {
            // A re-INVITE: we never establish a confirmed dialog.
            let known = dialog_key(&msg).is_some_and(|k| self.lock().dialogs.contains_key(&k));
            let r = if known {
                build(&reply, 488, "Not Acceptable Here", None, &[])
            } else {
                build(&reply, 481, "Call/Transaction Does Not Exist", None, &[])
            };
            return self.finish_other(key, &peer, r);
        }
        if msg.header("max-forwards").is_some_and(|m| m.trim() == "0") {
            let r = build(&reply, 483, "Too Many Hops", Some(&new_tag()), &[]);
            return self.finish_other(key, &peer, r);
        }
        let received = Instant::now();
        let trying = build(&reply, 100, "Trying", None, &[]);
        peer.send(&trying);
        let to_tag = new_tag();
        {
            let mut st = self.lock();
            if st.txs.len() >= MAX_TRANSACTIONS {
                drop(st);
                let r = build(&reply, 503, "Service Unavailable", Some(&to_tag), &[("Retry-After", &self.retry_after)]);
                peer.send(&r);
                return;
            }
            st.txs.insert(
                key.clone(),
                Tx::Invite(InviteTx {
                    peer: peer.clone(),
                    reply,
                    to_tag,
                    last: trying,
                    final_sent: false,
                    ended: None,
                    acked: Arc::new(AtomicBool::new(false)),
                    received,
                    incident: None,
                    dialog: None,
                    expires: received + self.max_ring + 2 * LINGER,
                }),
            );
        }
        let Some(permit) = self.admit() else {
            return self.final_invite(&key, 503, "Service Unavailable", &[("Retry-After", &self.retry_after)]);
        };
        let facts = CallFacts::from_invite(&msg);
        let span = tracing::info_span!("call", call_id = %facts.call_id, incident_id = tracing::field::Empty);
        let this = self.clone();
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
        received: Instant,
    ) {
        let received_at = Utc::now() - received.elapsed();
        let opened = match self.intake.open_call(&facts, received_at, transport).await {
            Ok(o) => {
                metrics::histogram!(metric::INTAKE_SECONDS).record(received.elapsed().as_secs_f64());
                o
            }
            Err(e) => {
                tracing::warn!(error = %e, "incident not stored; answering 503");
                return self.final_invite(&key, 503, "Service Unavailable", &[("Retry-After", &self.retry_after)]);
            }
        };
        tracing::Span::current().record("incident_id", opened.id.as_str());
        let id_hdr = [("X-Incident-Id", opened.id.as_str())];
        let ended = {
            let mut st = self.lock();
            let Some(Tx::Invite(tx)) = st.txs.get_mut(&key) else { return };
            tx.incident = Some(opened.id.clone());
            match tx.ended {
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
                    st.dialogs.insert(
                        dk,
                        Dialog {
                            incident: opened.id.clone(),
                            invite: key.clone(),
                            facts: facts.clone(),
                            lock: Arc::default(),
                        },
                    );
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
            let ringing = matches!(this.lock().txs.get(&key), Some(Tx::Invite(t)) if !t.final_sent);
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

    /// Sends the final response of an INVITE transaction (once), ends its
    /// early dialog, and retransmits over UDP until the ACK.
    fn final_invite(&self, key: &TxKey, status: u16, reason: &str, extra: &[(&str, &str)]) {
        let (peer, bytes, acked) = {
            let mut st = self.lock();
            let Some(Tx::Invite(tx)) = st.txs.get_mut(key) else { return };
            if tx.final_sent {
                return;
            }
            let bytes = build(&tx.reply, status, reason, Some(&tx.to_tag), extra);
            tx.final_sent = true;
            tx.last = bytes.clone();
            tx.expires = Instant::now() + LINGER;
            let dialog = tx.dialog.take();
            let out = (tx.peer.clone(), bytes, tx.acked.clone());
            if let Some(d) = dialog {
                st.dialogs.remove(&d);
            }
            out
        };
        peer.send(&bytes);
        if !peer.reliable() {
            tokio::spawn(async move {
                let deadline = Instant::now() + LINGER;
                let mut g = T1;
                loop {
                    tokio::time::sleep(g).await;
                    if acked.load(Ordering::Relaxed) || Instant::now() >= deadline {
                        break;
                    }
                    peer.send(&bytes);
                    g = (g * 2).min(T2);
                }
            });
        }
    }

    fn on_ack(&self, msg: &Message) {
        let key = tx_key(msg, "INVITE");
        if let Some(Tx::Invite(tx)) = self.lock().txs.get_mut(&key)
            && tx.final_sent
        {
            tx.acked.store(true, Ordering::Relaxed);
            // Confirmed: absorb ACK retransmissions for Timer I (T4), then forget.
            tx.expires = tx.expires.min(Instant::now() + T4);
        }
    }

    fn on_cancel(self: &Arc<Self>, msg: &Message, peer: &Peer) {
        let key = tx_key(msg, "CANCEL");
        let reply = msg.reply();
        let how = if answered_elsewhere(msg) { CallEnd::AnsweredElsewhere } else { CallEnd::Abandoned };
        let mut st = self.lock();
        if let Some(Tx::Other(t)) = st.txs.get(&key) {
            if let Some(last) = &t.last {
                peer.send(last);
            }
            return;
        }
        let invite_key = TxKey { branch: key.branch.clone(), method: "INVITE".into() };
        let (resp, end_now) = match st.txs.get_mut(&invite_key) {
            Some(Tx::Invite(tx)) => {
                let resp = build(&reply, 200, "OK", Some(&tx.to_tag), &[]);
                if tx.final_sent || tx.ended.is_some() {
                    (resp, None)
                } else if let Some(id) = tx.incident.clone() {
                    (resp, Some((id, tx.received.elapsed())))
                } else {
                    // Still being stored: open_and_answer answers 487 and records it.
                    tx.ended = Some(how);
                    (resp, None)
                }
            }
            _ => (build(&reply, 481, "Call/Transaction Does Not Exist", Some(&new_tag()), &[]), None),
        };
        drop(st);
        self.finish_other(key, peer, resp);
        if let Some((id, rung)) = end_now {
            self.final_invite(&invite_key, 487, "Request Terminated", &[]);
            self.record_end(id, how, rung);
        }
    }

    fn on_bye(self: &Arc<Self>, msg: &Message, peer: &Peer, key: TxKey) {
        let reply = msg.reply();
        let found = dialog_key(msg).and_then(|dk| {
            let mut st = self.lock();
            let d = st.dialogs.remove(&dk)?;
            let rung = match st.txs.get(&d.invite) {
                Some(Tx::Invite(t)) => t.received.elapsed(),
                _ => Duration::ZERO,
            };
            Some((d, rung))
        });
        let Some((dialog, rung)) = found else {
            let r = build(&reply, 481, "Call/Transaction Does Not Exist", None, &[]);
            return self.finish_other(key, peer, r);
        };
        self.finish_other(key, peer, build(&reply, 200, "OK", None, &[]));
        self.final_invite(&dialog.invite, 487, "Request Terminated", &[]);
        self.record_end(dialog.incident, CallEnd::CallerHangup, rung);
    }

    fn on_info(self: &Arc<Self>, msg: Message, peer: Peer, key: TxKey) {
        let reply = msg.reply();
        let dialog = dialog_key(&msg).and_then(|dk| {
            let st = self.lock();
            st.dialogs.get(&dk).map(|d| (dk, d.lock.clone()))
        });
        let Some((dk, dlock)) = dialog else {
            let r = build(&reply, 481, "Call/Transaction Does Not Exist", None, &[]);
            return self.finish_other(key, &peer, r);
        };
        let digit = match dtmf_digit(msg.header("content-type"), &msg.body) {
            Ok(Some(d)) => d,
            Ok(None) => return self.finish_other(key, &peer, build(&reply, 200, "OK", None, &[])),
            Err(DtmfError::UnsupportedType) => {
                let r = build(&reply, 415, "Unsupported Media Type", None, &[("Accept", ACCEPT_INFO)]);
                return self.finish_other(key, &peer, r);
            }
            Err(DtmfError::BadBody) => {
                return self.finish_other(key, &peer, build(&reply, 400, "Bad DTMF Body", None, &[]));
            }
        };
        // Absorb retransmissions while the digit is being stored.
        self.lock().txs.insert(key.clone(), Tx::Other(OtherTx { last: None, expires: Instant::now() + LINGER }));
        let this = self.clone();
        self.tasks.spawn(async move {
            let _serial = dlock.lock().await;
            let current = {
                let st = this.lock();
                st.dialogs.get(&dk).map(|d| (d.incident.clone(), d.facts.clone()))
            };
            let resp = match current {
                // The dialog ended while we waited.
                None => build(&reply, 481, "Call/Transaction Does Not Exist", None, &[]),
                Some((id, facts)) => match this.intake.ivr_digit(&id, &facts, digit).await {
                    Ok(facts) => {
                        if let Some(d) = this.lock().dialogs.get_mut(&dk) {
                            d.facts = facts;
                        }
                        build(&reply, 200, "OK", None, &[])
                    }
                    Err(e) => {
                        tracing::warn!(incident_id = %id, error = %e, "IVR digit not stored; answering 503");
                        this.unavailable(&reply, None)
                    }
                },
            };
            this.finish_other(key, &peer, resp);
        });
    }

    /// An out-of-dialog MESSAGE: a call event from the dialplan. Answered 202
    /// only once intake has stored it; 503 + Retry-After while it cannot be.
    fn on_message(self: &Arc<Self>, msg: &Message, peer: Peer, key: TxKey) {
        let reply = msg.reply();
        if msg.to_tag().is_some() {
            // We never establish a dialog a MESSAGE could belong to.
            let r = build(&reply, 481, "Call/Transaction Does Not Exist", None, &[]);
            return self.finish_other(key, &peer, r);
        }
        let ev = match event_of(msg) {
            Ok(ev) => ev,
            Err(bad) => {
                tracing::debug!(header = bad.header(), "MESSAGE refused");
                let (reason, warning) = (bad.reason(), bad.warning());
                let r = build(&reply, 400, &reason, Some(&new_tag()), &[("Warning", warning.as_str())]);
                return self.finish_other(key, &peer, r);
            }
        };
        let Some(permit) = self.admit() else {
            return self.finish_other(key, &peer, self.unavailable(&reply, Some(&new_tag())));
        };
        {
            let mut st = self.lock();
            if st.txs.len() >= MAX_TRANSACTIONS {
                drop(st);
                return peer.send(&self.unavailable(&reply, Some(&new_tag())));
            }
            // Absorb retransmissions while the event is being stored.
            st.txs.insert(key.clone(), Tx::Other(OtherTx { last: None, expires: Instant::now() + LINGER }));
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
                this.finish_other(key, &peer, resp);
            }
            .instrument(span),
        );
    }

    /// Forgets finished transactions; run every second.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut st = self.lock();
        st.txs.retain(|_, t| match t {
            Tx::Invite(t) => t.expires > now,
            Tx::Other(t) => t.expires > now,
        });
    }

    /// On shutdown: end every ringing call with 503, so no PBX leg rings on.
    pub fn end_ringing(&self) {
        let ringing: Vec<TxKey> = {
            let st = self.lock();
            st.txs
                .iter()
                .filter(|(_, t)| matches!(t, Tx::Invite(t) if !t.final_sent && t.incident.is_some()))
                .map(|(k, _)| k.clone())
                .collect()
        };
        for k in ringing {
            self.final_invite(&k, 503, "Service Unavailable", &[("Retry-After", &self.retry_after)]);
        }
    }
}

fn tag_of(name_addr: &str) -> String {
    name_addr.split(';').skip(1).find_map(|p| p.trim().strip_prefix("tag=").map(str::to_string)).unwrap_or_default()
}

/// The Contact of our 180: where the PBX reached us, so in-dialog requests come back here.
fn contact_uri(facts: &CallFacts, transport: &str) -> String {
    let user = facts.ruri_user.as_deref().unwrap_or("dispatchd");
    let host = facts.ruri_host.as_deref().unwrap_or("127.0.0.1");
    if transport == "tcp" { format!("sip:{user}@{host};transport=tcp") } else { format!("sip:{user}@{host}") }
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

    #[test]
    fn tags_and_keys() {
        assert_eq!(tag_of("<sip:a@b>;tag=xyz;foo=1"), "xyz");
        assert_eq!(tag_of("<sip:a@b>"), "");
        let m = msg("");
        assert_eq!(tx_key(&m, "INVITE").branch, "z9hG4bKa|h");
        assert_eq!(method_label("NEWMETHOD"), "other");
        // Same branch from another host is another transaction (RFC 3261 §17.2.3).
        let other =
            msg("").headers.iter().map(|(k, v)| (k.clone(), v.replace("UDP h;", "UDP Other.Example:5070;"))).collect();
        let m2 = Message { headers: other, ..msg("") };
        assert_eq!(m2.top_via_sent_by().as_deref(), Some("other.example:5070"));
        assert_ne!(tx_key(&m2, "INVITE"), tx_key(&m, "INVITE"));
    }
}
