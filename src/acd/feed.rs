//! What the two PBX connection loops share: one reader per feed across
//! daemons (a lease in Redis), reconnecting with backoff, connecting with TCP
//! keepalive, delivering an event to intake until it is stored, and the
//! feed's metrics.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

pub use crate::backoff::Backoff;
use crate::backoff::cancelled_during;
use crate::dispatcher::pager::{Command, Pager};
use crate::domain::call::CallEvent;
use crate::domain::incident::Source;
use crate::intake::Intake;
use crate::telemetry::metric;

/// First reconnect delay; doubles up to `acd.max_backoff`.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// The reconnect backoff of a feed: 250ms, 500ms, 1s, … up to `max`.
pub fn reconnect_backoff(max: Duration) -> Backoff {
    Backoff::new(FIRST_BACKOFF, max)
}
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

/// How long a feed's lease holds without renewal; it is renewed every
/// [`LEASE_RENEW`], and a standby daemon tries to take it every
/// [`LEASE_POLL`]: a feed whose daemon died is read again within
/// `LEASE_TTL + LEASE_POLL` (9 s).
pub const LEASE_TTL: Duration = Duration::from_secs(8);
pub const LEASE_RENEW: Duration = Duration::from_secs(2);
pub const LEASE_POLL: Duration = Duration::from_secs(1);

/// Runs one feed until `token` is cancelled. Several daemons may be
/// configured with the same PBX: only the one holding the feed's lease in
/// Redis reads it, so each event is applied once; when that daemon dies,
/// another takes the lease within [`LEASE_TTL`] and connects.
///
/// While it holds the lease: one connection after another, each failure
/// counted and logged, then waited out with `backoff`. A session gets its
/// attempt number (and resets `backoff` after a login), and answers `Ok`
/// only when shutdown came.
pub async fn reconnecting<F: Future<Output = Result<(), FeedError>>>(
    source: Source,
    address: &str,
    intake: &Intake,
    backoff: &Backoff,
    token: &CancellationToken,
    mut session: impl FnMut(u64) -> F,
) {
    let name = source.as_str().to_uppercase();
    let lease = format!("{}:{address}", source.as_str());
    let mut attempt: u64 = 0;
    loop {
        if !take_lease(intake, &lease, &name, token).await {
            break;
        }
        tracing::info!(%address, "{name} feed taken: this daemon reads it");
        let held = tokio::select! {
            lost = keep_lease(intake, &lease, token) => lost,
            _ = async {
                loop {
                    attempt = attempt.wrapping_add(1);
                    let result = session(attempt).await;
                    set_connected(source, false);
                    match result {
                        Ok(()) => return,
                        Err(e) => {
                            count_error(source, e.reason());
                            tracing::warn!(%address, reason = e.reason(), error = %e, "{name} connection lost; reconnecting");
                            if backoff.wait(token).await {
                                return;
                            }
                        }
                    }
                }
            } => false,
        };
        set_connected(source, false);
        if !held {
            // Shutdown: give the feed to another daemon at once.
            let _ = intake.release_feed(&lease).await;
            break;
        }
        tracing::warn!(%address, "{name} feed lease lost to another daemon; disconnected");
    }
    tracing::info!(%address, "{name} feed stopped");
}

/// Waits until this daemon holds the lease; false when shutdown came first.
async fn take_lease(intake: &Intake, lease: &str, name: &str, token: &CancellationToken) -> bool {
    let mut waiting = false;
    loop {
        match intake.hold_feed(lease, LEASE_TTL).await {
            Ok(true) => return true,
            Ok(false) if !waiting => {
                waiting = true;
                tracing::info!("{name} feed is read by another daemon; standing by");
            }
            Ok(false) => {}
            Err(e) => tracing::debug!(error = %e, "{name} feed lease not checked"),
        }
        if cancelled_during(LEASE_POLL, token).await {
            return false;
        }
    }
}

/// Renews the lease until another daemon holds it (returns true) or shutdown
/// (false). While Redis cannot be asked, the lease is kept: nobody can take
/// it then, and no event could be stored anyway.
async fn keep_lease(intake: &Intake, lease: &str, token: &CancellationToken) -> bool {
    loop {
        if cancelled_during(LEASE_RENEW, token).await {
            return false;
        }
        match intake.hold_feed(lease, LEASE_TTL).await {
            Ok(true) => {}
            Ok(false) => return true,
            Err(e) => tracing::debug!(error = %e, "feed lease not renewed"),
        }
    }
}

/// A feed session's place in the pager while it holds the PBX connection:
/// page calls go out on it; dropped with the session, and then they cannot.
pub struct Attached<'a> {
    pager: &'a Pager,
    source: Source,
}

impl<'a> Attached<'a> {
    pub fn new(pager: &'a Pager, source: Source, commands: tokio::sync::mpsc::Sender<Command>) -> Attached<'a> {
        pager.attach(source, commands);
        Attached { pager, source }
    }
}

impl Drop for Attached<'_> {
    fn drop(&mut self) {
        self.pager.detach(self.source);
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
    let ka = socket2::TcpKeepalive::new().with_time(KEEPALIVE).with_interval(Duration::from_secs(5)).with_retries(3);
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
    let retry = Backoff::new(FIRST_BACKOFF, STORE_RETRY_MAX);
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
        if retry.wait(token).await {
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
        assert_eq!(crate::domain::call::call_key(&a), a, "kept as it is, not hashed");
    }

    #[test]
    fn error_reasons() {
        assert_eq!(FeedError::LoginRefused("x".into()).reason(), "login");
        assert_eq!(FeedError::Closed.reason(), "disconnect");
        assert_eq!(FeedError::Dead.reason(), "keepalive");
        assert_eq!(FeedError::Framing("x").reason(), "framing");
    }
}
