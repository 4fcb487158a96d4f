//! PBX event feeds → [`CallEvent`]s: the call's life in the contact centre
//! (queue joins and abandons, agents answering, IVR choices, hang-ups).
//!
//! Three sources speak these events: out-of-dialog SIP MESSAGE from the
//! dialplan (`sip/uas.rs`, `X-Event: …`), the Asterisk Manager Interface
//! (`ami` for the wire, `asterisk` for the connection) and the FreeSWITCH
//! event socket (`esl`, `freeswitch`). Each turns its protocol into the same
//! plain values; `intake::Intake::apply` does the rest (correlation included),
//! so a rule behaves the same whichever PBX reported the call.

pub mod ami;
pub mod asterisk;
pub mod esl;
pub mod freeswitch;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::incident::Source;
use crate::intake::Intake;
use crate::telemetry::metric;

/// Starts the PBX feeds configured under `[acd]` (`[acd.asterisk]`,
/// `[acd.freeswitch]`); each runs until `token` is cancelled, reconnecting on
/// its own. Addresses and credentials are read once: a SIGHUP does not move a
/// running feed (restart the daemon for that).
pub fn spawn(settings: &Settings, intake: Arc<Intake>, token: CancellationToken) {
    let acd = &settings.acd;
    if let Some(a) = &acd.asterisk {
        feed::set_connected(Source::Ami, false);
        tokio::spawn(asterisk::run(a.clone(), acd.max_backoff, intake.clone(), token.clone()));
    }
    if let Some(f) = &acd.freeswitch {
        feed::set_connected(Source::Esl, false);
        tokio::spawn(freeswitch::run(f.clone(), acd.max_backoff, intake, token));
    }
}

/// What the two connection loops share: reconnect backoff, connecting with
/// TCP keepalive, delivering an event to intake until it is stored, and the
/// feed's metrics.
pub(crate) mod feed {
    use super::*;

    /// First reconnect delay; doubles up to `acd.max_backoff`.
    pub const FIRST_BACKOFF: Duration = Duration::from_millis(250);
    /// Giving up on a TCP connect (or the login's answer) after this long.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(10);
    /// Silence after which the peer is probed (AMI `Ping`, ESL `api uptime`);
    /// silence for as long again after the probe means the peer is gone.
    pub const KEEPALIVE: Duration = Duration::from_secs(20);
    /// Longest pause between two attempts to store one event while Redis is away.
    const STORE_RETRY_MAX: Duration = Duration::from_secs(2);

    /// Why a connection ended (or never got going).
    #[derive(Debug, thiserror::Error)]
    pub enum FeedError {
        #[error("connect failed: {0}")]
        Connect(std::io::Error),
        #[error("connect timed out")]
        ConnectTimeout,
        #[error("login refused: {0}")]
        LoginRefused(String),
        #[error("no answer to the login")]
        LoginTimeout,
        #[error("event subscription refused: {0}")]
        Subscribe(String),
        #[error("connection closed by the PBX")]
        Closed,
        #[error("connection failed: {0}")]
        Io(std::io::Error),
        #[error("no answer to the keepalive probe")]
        Dead,
        #[error("stream can no longer be framed ({0})")]
        Framing(&'static str),
    }

    impl FeedError {
        /// The `reason` label of `dispatchd_acd_errors_total`.
        pub fn reason(&self) -> &'static str {
            match self {
                FeedError::Connect(_) | FeedError::ConnectTimeout => "connect",
                FeedError::LoginRefused(_) | FeedError::LoginTimeout => "login",
                FeedError::Subscribe(_) => "subscribe",
                FeedError::Closed | FeedError::Io(_) => "disconnect",
                FeedError::Dead => "keepalive",
                FeedError::Framing(_) => "framing",
            }
        }
    }

    /// Runs one connection after another until `token` is cancelled: each
    /// failure is counted and logged, then waited out with `backoff`. A session
    /// gets its attempt number (and resets `backoff` after a login), and
    /// answers `Ok` only when shutdown came.
    pub async fn reconnecting<F: Future<Output = Result<(), FeedError>>>(
        source: Source,
        address: &str,
        backoff: &Backoff,
        token: &CancellationToken,
        mut session: impl FnMut(u64) -> F,
    ) {
        let name = source.as_str().to_uppercase();
        let mut attempt: u64 = 0;
        loop {
            attempt = attempt.wrapping_add(1);
            let result = tokio::select! {
                _ = token.cancelled() => Ok(()),
                r = session(attempt) => r,
            };
            set_connected(source, false);
            if let Err(e) = result {
                count_error(source, e.reason());
                tracing::warn!(%address, reason = e.reason(), error = %e, "{name} connection lost; reconnecting");
                if !cancelled_during(backoff.next_delay(), token).await {
                    continue;
                }
            }
            tracing::info!(%address, "{name} feed stopped");
            return;
        }
    }

    /// Delays of 250ms, 500ms, 1s, … up to `max`. A feed's loop and its session
    /// share one (the session resets it after a login).
    pub struct Backoff {
        next_ms: std::sync::atomic::AtomicU64,
        max: Duration,
    }

    impl Backoff {
        pub fn new(max: Duration) -> Backoff {
            Backoff { next_ms: (FIRST_BACKOFF.as_millis() as u64).into(), max: max.max(FIRST_BACKOFF) }
        }

        pub fn reset(&self) {
            self.next_ms.store(FIRST_BACKOFF.as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
        }

        /// The delay to wait now; the following one is twice as long (capped).
        pub fn next_delay(&self) -> Duration {
            let max = self.max.as_millis() as u64;
            let ms = self.next_ms.load(std::sync::atomic::Ordering::Relaxed);
            self.next_ms.store(ms.saturating_mul(2).min(max), std::sync::atomic::Ordering::Relaxed);
            Duration::from_millis(ms)
        }
    }

    /// Sleeps `d`; true when shutdown came first.
    pub async fn cancelled_during(d: Duration, token: &CancellationToken) -> bool {
        tokio::select! {
            _ = token.cancelled() => true,
            _ = tokio::time::sleep(d) => false,
        }
    }

    /// TCP connect with a timeout, and TCP keepalive on (a second line of
    /// defence under the protocol probes: it also ends a connection whose
    /// peer vanished while we were not reading, e.g. while Redis was away).
    pub async fn connect(address: &str) -> Result<TcpStream, FeedError> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
            .await
            .map_err(|_| FeedError::ConnectTimeout)?
            .map_err(FeedError::Connect)?;
        let ka =
            socket2::TcpKeepalive::new().with_time(KEEPALIVE).with_interval(Duration::from_secs(5)).with_retries(3);
        if let Err(e) = socket2::SockRef::from(&stream).set_tcp_keepalive(&ka) {
            tracing::debug!(error = %e, "TCP keepalive not set");
        }
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    pub fn set_connected(source: Source, up: bool) {
        metrics::gauge!(metric::ACD_CONNECTED, "source" => source.as_str()).set(if up { 1.0 } else { 0.0 });
    }

    pub fn count_error(source: Source, reason: &'static str) {
        metrics::counter!(metric::ACD_ERRORS, "source" => source.as_str(), "reason" => reason).increment(1);
    }

    /// Hands `ev` to intake until it is stored, retrying while Redis does not
    /// answer — without reading further from the PBX meanwhile, so the feed
    /// is held back rather than events lost. False when shutdown came first.
    /// The event is never logged: it may carry the caller's number.
    ///
    /// Each event gets a dedup key of its own, so a retry after an attempt
    /// whose script did run (the answer was what got lost) changes nothing:
    /// a digit is not appended twice.
    pub async fn deliver(intake: &Intake, mut ev: CallEvent, token: &CancellationToken) -> bool {
        let source = ev.source.as_str();
        if ev.dedup.is_none() {
            ev.dedup = Some(delivery_key(source));
        }
        let event = ev.kind.as_str();
        let retry = Backoff::new(STORE_RETRY_MAX);
        let mut failures = 0u32;
        loop {
            match intake.apply(ev.clone()).await {
                Ok(_) => {
                    if failures > 0 {
                        tracing::info!(source, event, failures, "call event applied; PBX feed resumed");
                    }
                    return true;
                }
                Err(e) if !e.is_unavailable() => {
                    // Not Redis being away: trying again would block the feed for good.
                    tracing::error!(source, event, error = %e, "call event dropped");
                    count_error(ev.source, "store");
                    return true;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    if failures == 1 {
                        tracing::warn!(source, event, error = %e, "call event not stored, retrying; PBX feed paused");
                    } else {
                        tracing::debug!(source, event, failures, error = %e, "call event still not stored");
                    }
                }
            }
            if cancelled_during(retry.next_delay(), token).await {
                return false;
            }
        }
    }

    /// `<source>:<random per process>:<sequence>`: unique across restarts and daemons.
    fn delivery_key(source: &str) -> String {
        use std::sync::OnceLock;
        use std::sync::atomic::{AtomicU64, Ordering};
        static BOOT: OnceLock<u64> = OnceLock::new();
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let boot = *BOOT.get_or_init(rand::random::<u64>);
        format!("{source}:{boot:016x}:{}", SEQ.fetch_add(1, Ordering::Relaxed))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn delivery_keys_are_distinct_and_fit_a_call_key() {
            let a = delivery_key("ami");
            let b = delivery_key("ami");
            assert_ne!(a, b);
            assert!(a.starts_with("ami:"));
            assert_eq!(call_key(&a), a, "kept as it is, not hashed");
        }

        #[test]
        fn backoff_doubles_to_the_cap_and_resets() {
            let b = Backoff::new(Duration::from_secs(2));
            let seen: Vec<u64> = (0..6).map(|_| b.next_delay().as_millis() as u64).collect();
            assert_eq!(seen, [250, 500, 1000, 2000, 2000, 2000]);
            b.reset();
            assert_eq!(b.next_delay(), FIRST_BACKOFF);
            let tiny = Backoff::new(Duration::from_millis(1));
            assert_eq!(tiny.next_delay(), FIRST_BACKOFF);
            assert_eq!(tiny.next_delay(), FIRST_BACKOFF);
        }

        #[test]
        fn error_reasons() {
            assert_eq!(FeedError::LoginRefused("x".into()).reason(), "login");
            assert_eq!(FeedError::Closed.reason(), "disconnect");
            assert_eq!(FeedError::Dead.reason(), "keepalive");
            assert_eq!(FeedError::Framing("x").reason(), "framing");
        }
    }
}

/// What happened to a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The caller reported an incident (`X-Event: incident`, or a join of one of
    /// `acd.incident_queues`): opens the call's incident, or finds it.
    Incident,
    /// The IVR path chosen so far (`X-Event: ivr`, `X-IVR-Path`); replaces the call's path.
    Ivr,
    /// One key pressed (AMI `DTMFEnd`, ESL `DTMF`); appended to the call's path.
    Dtmf,
    /// The caller entered an ACD queue.
    QueueJoin,
    /// The caller left the queue without reaching an agent.
    QueueAbandon,
    /// An agent answered the caller.
    AgentConnect,
    /// The agent's conversation ended (AMI `AgentComplete`).
    AgentComplete,
    /// The caller's channel hung up.
    Hangup,
}

impl EventKind {
    /// The `X-Event` name, also the `event` label of `dispatchd_call_events_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Incident => "incident",
            EventKind::Ivr => "ivr",
            EventKind::Dtmf => "dtmf",
            EventKind::QueueJoin => "queue-join",
            EventKind::QueueAbandon => "queue-abandon",
            EventKind::AgentConnect => "agent-connect",
            EventKind::AgentComplete => "agent-complete",
            EventKind::Hangup => "hangup",
        }
    }

    /// The kinds a SIP MESSAGE may name in `X-Event` (issue 5 lists six).
    pub fn from_x_event(s: &str) -> Option<EventKind> {
        let s = s.trim();
        [
            EventKind::Incident,
            EventKind::Ivr,
            EventKind::QueueJoin,
            EventKind::QueueAbandon,
            EventKind::AgentConnect,
            EventKind::Hangup,
        ]
        .into_iter()
        .find(|k| k.as_str().eq_ignore_ascii_case(s))
    }

    pub const ALL: [EventKind; 8] = [
        EventKind::Incident,
        EventKind::Ivr,
        EventKind::Dtmf,
        EventKind::QueueJoin,
        EventKind::QueueAbandon,
        EventKind::AgentConnect,
        EventKind::AgentComplete,
        EventKind::Hangup,
    ];
}

/// One event of one call. Adapters fill what their protocol carries and
/// leave the rest empty; every string is bounded by [`CallEvent::clean`]
/// before intake sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct CallEvent {
    pub source: Source,
    pub kind: EventKind,
    /// The call's correlation key: `X-Call-Ref`, AMI `Linkedid`, the FreeSWITCH
    /// caller's UUID. Events with the same key belong to one call and one incident.
    pub call_ref: String,
    /// The protocol's own id of the message (SIP Call-ID) for the record; may be empty.
    pub call_id: String,
    pub caller: String,
    pub caller_name: String,
    pub queue: String,
    /// `Ivr`: the whole path; `Dtmf`: the one key.
    pub ivr_path: Vec<String>,
    pub wait_seconds: Option<u32>,
    /// `AgentConnect`: who answered (agent name or interface).
    pub agent: String,
    /// Free detail from the PBX: hang-up cause, abandon reason, completion reason.
    pub reason: String,
    /// The Request-URI user of a SIP MESSAGE (`incident-<category>`), as for an INVITE.
    pub ruri_user: Option<String>,
    /// Set by sources that may deliver one message twice (SIP MESSAGE: Call-ID
    /// and CSeq): an event whose key was applied before is not applied again.
    pub dedup: Option<String>,
}

/// Longest caller number, queue, agent or reason kept.
const MAX_SHORT: usize = 64;
/// Longest display name kept.
const MAX_NAME: usize = 128;
/// Longest call reference kept as it is; longer ones are hashed.
const MAX_REF: usize = 128;

/// Printable characters only, at most `max` of them, trimmed.
pub fn clean(s: &str, max: usize) -> String {
    s.chars().filter(|c| !c.is_control()).take(max).collect::<String>().trim().to_string()
}

/// A call reference fit for a Redis key: printable ASCII up to 128 bytes, else its SHA-256.
pub fn call_key(raw: &str) -> String {
    let raw = raw.trim();
    if !raw.is_empty() && raw.len() <= MAX_REF && raw.bytes().all(|b| b.is_ascii_graphic()) {
        raw.to_string()
    } else {
        use sha2::Digest;
        format!("h:{}", hex::encode(sha2::Sha256::digest(raw.as_bytes())))
    }
}

impl CallEvent {
    /// An event with only its kind, source and call reference set.
    pub fn new(source: Source, kind: EventKind, call_ref: &str) -> CallEvent {
        CallEvent {
            source,
            kind,
            call_ref: call_ref.to_string(),
            call_id: String::new(),
            caller: String::new(),
            caller_name: String::new(),
            queue: String::new(),
            ivr_path: Vec::new(),
            wait_seconds: None,
            agent: String::new(),
            reason: String::new(),
            ruri_user: None,
            dedup: None,
        }
    }

    /// Bounds every field (all of them come from the PBX, some from the caller).
    pub fn clean(mut self) -> CallEvent {
        self.call_ref = call_key(&self.call_ref);
        self.call_id = clean(&self.call_id, 256);
        self.caller = clean(&self.caller, MAX_SHORT);
        self.caller_name = clean(self.caller_name.trim_matches('"'), MAX_NAME);
        self.queue = clean(&self.queue, MAX_SHORT);
        self.agent = clean(&self.agent, MAX_SHORT);
        self.reason = clean(&self.reason, MAX_SHORT);
        self.ivr_path = crate::sip::call::parse_ivr_path(&self.ivr_path.join(","));
        self.dedup = self.dedup.map(|d| call_key(&d));
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x_event_names() {
        assert_eq!(EventKind::from_x_event("Queue-Abandon"), Some(EventKind::QueueAbandon));
        assert_eq!(EventKind::from_x_event(" incident "), Some(EventKind::Incident));
        assert_eq!(EventKind::from_x_event("dtmf"), None, "not one of the MESSAGE kinds");
        assert_eq!(EventKind::from_x_event("bogus"), None);
    }

    #[test]
    fn hostile_fields_are_bounded() {
        let mut e = CallEvent::new(Source::Ami, EventKind::QueueJoin, &"x".repeat(500));
        e.caller = format!("+44\r\n{}", "9".repeat(500));
        e.caller_name = "\"Jane\"".into();
        e.ivr_path = vec!["2".into(), "evil".into(), "1".into()];
        e.dedup = Some("a b".into());
        let e = e.clean();
        assert!(e.call_ref.starts_with("h:") && e.call_ref.len() == 66);
        assert_eq!(e.caller.len(), MAX_SHORT);
        assert!(!e.caller.contains('\n'));
        assert_eq!(e.caller_name, "Jane");
        assert_eq!(e.ivr_path, vec!["2", "1"]);
        assert!(e.dedup.unwrap().starts_with("h:"));
        assert_eq!(call_key("1700000000.42"), "1700000000.42");
        assert!(call_key("").starts_with("h:"));
    }
}
