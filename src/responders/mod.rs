//! The responder gateway (contract §4): websockets on `responders.listen`,
//! path `/v1/responders/ws`.
//!
//! - `Sessions` is the registry of responders connected to this daemon; it is
//!   the dispatcher's first [`Notifier`]: offers and cancels reach the
//!   websockets through it.
//! - `serve` accepts connections; `session` runs one: authentication (header
//!   or `hello` within 5 s, else close 4401), `welcome`, heartbeats, frames.
//!
//! Buffers are small on purpose: an idle responder costs a task, a socket and
//! a few kilobytes (see the README for the measured figure).

pub mod console;
pub mod session;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use crate::config::ResponderConfig;
use crate::dispatcher::Notifier;
use crate::domain::dispatch::{Offer, Reminder};
use crate::telemetry::metric;

/// What a session's writer sends.
#[derive(Debug)]
pub enum Out {
    Text(String),
    /// Close with this code and reason, then end the session.
    Close(u16, &'static str),
}

struct Handle {
    conn: u64,
    tx: mpsc::Sender<Out>,
    /// Dispatch ids already written to this connection.
    sent: HashSet<String>,
    /// The SHA-256 of the token it signed in with: a reload that takes the
    /// token away closes the connection.
    token: [u8; 32],
    /// When the peer was last heard from (ms since `Sessions::epoch`).
    seen: Arc<AtomicU64>,
}

/// Responders connected to this daemon.
pub struct Sessions {
    map: Mutex<HashMap<String, Handle>>,
    next: AtomicU64,
    /// The session tasks, waited for on shutdown (their 1001 close frames).
    pub tasks: TaskTracker,
    /// A connection not heard from for this long is not reachable: its
    /// presence lease is not renewed, so no offer waits on it.
    alive_within: Duration,
    epoch: Instant,
}

/// One connection's place in [`Sessions`]; it leaves when this is dropped,
/// however its session ended.
pub struct Registration {
    sessions: Arc<Sessions>,
    pub rid: String,
    pub conn: u64,
    seen: Arc<AtomicU64>,
    /// Run once when the registration was the current one of its responder.
    on_leave: Option<Box<dyn FnOnce(String) + Send>>,
}

impl Registration {
    /// The peer was heard from now.
    pub fn seen(&self) {
        self.seen.store(self.sessions.now_ms(), Ordering::Relaxed);
    }

    /// What to do once this connection has left (store that the responder
    /// is gone), unless a newer connection of the same responder replaced it.
    pub fn on_leave(&mut self, f: impl FnOnce(String) + Send + 'static) {
        self.on_leave = Some(Box::new(f));
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if self.sessions.unregister(&self.rid, self.conn)
            && let Some(f) = self.on_leave.take()
        {
            f(std::mem::take(&mut self.rid));
        }
    }
}

impl Sessions {
    /// `heartbeat`: a connection silent for two of them is no longer counted as reachable.
    pub fn new(heartbeat: Duration) -> Sessions {
        Sessions {
            map: Mutex::default(),
            next: AtomicU64::new(0),
            tasks: TaskTracker::new(),
            alive_within: heartbeat * 2,
            epoch: Instant::now(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Handle>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Registers a new connection of `rid`, signed in with the token whose
    /// SHA-256 is `token`; an older one of the same responder is closed.
    pub fn register(self: &Arc<Self>, rid: &str, token: [u8; 32], tx: mpsc::Sender<Out>) -> Registration {
        let conn = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let seen = Arc::new(AtomicU64::new(self.now_ms()));
        let handle = Handle { conn, tx, sent: HashSet::new(), token, seen: seen.clone() };
        let old = self.lock().insert(rid.to_string(), handle);
        match old {
            Some(h) => {
                let _ = h.tx.try_send(Out::Close(4409, "replaced by a newer connection"));
            }
            None => metrics::gauge!(metric::RESPONDERS_CONNECTED).increment(1.0),
        }
        Registration { sessions: self.clone(), rid: rid.to_string(), conn, seen, on_leave: None }
    }

    /// Forgets a connection (only if it is still the current one). True when it was.
    fn unregister(&self, rid: &str, conn: u64) -> bool {
        let mut m = self.lock();
        if m.get(rid).is_some_and(|h| h.conn == conn) {
            m.remove(rid);
            metrics::gauge!(metric::RESPONDERS_CONNECTED).decrement(1.0);
            true
        } else {
            false
        }
    }

    pub fn is_connected(&self, rid: &str) -> bool {
        self.lock().contains_key(rid)
    }

    pub fn connected(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Writes a frame; false when the responder is not connected here or its queue is full.
    pub fn send(&self, rid: &str, text: String) -> bool {
        self.lock().get(rid).is_some_and(|h| h.tx.try_send(Out::Text(text)).is_ok())
    }

    /// Writes a `dispatch` frame unless this connection already has it.
    /// Returns true when it was written now.
    pub fn send_dispatch(&self, rid: &str, dispatch_id: &str, text: String) -> bool {
        let mut m = self.lock();
        let Some(h) = m.get_mut(rid) else { return false };
        if h.sent.contains(dispatch_id) {
            return false;
        }
        if h.tx.try_send(Out::Text(text)).is_err() {
            return false;
        }
        // Only the current offer matters; keep the set small.
        h.sent.clear();
        h.sent.insert(dispatch_id.to_string());
        true
    }

    /// Closes one responder's connection here; false when it is not connected.
    pub fn close(&self, rid: &str, code: u16, reason: &'static str) -> bool {
        self.lock().get(rid).is_some_and(|h| h.tx.try_send(Out::Close(code, reason)).is_ok())
    }

    /// Closes every connection (shutdown: 1001 going away).
    pub fn close_all(&self, code: u16, reason: &'static str) {
        for h in self.lock().values() {
            let _ = h.tx.try_send(Out::Close(code, reason));
        }
    }

    /// Closes (4401) every connection whose token `roster` no longer gives to
    /// its responder: a token revoked or replaced by a reload. Returns them.
    pub fn revoke(&self, roster: &Roster) -> Vec<String> {
        let m = self.lock();
        let revoked: Vec<String> =
            m.iter().filter(|(rid, h)| roster.holder(&h.token) != Some(rid.as_str())).map(|(r, _)| r.clone()).collect();
        for rid in &revoked {
            if let Some(h) = m.get(rid) {
                let _ = h.tx.try_send(Out::Close(4401, "token revoked"));
            }
        }
        revoked
    }
}

impl Notifier for Sessions {
    /// Connections heard from within two heartbeats: a session that stopped
    /// reading (or a task that is gone) is not kept alive by its lease.
    fn reachable(&self) -> Vec<String> {
        let since = self.now_ms().saturating_sub(u64::try_from(self.alive_within.as_millis()).unwrap_or(u64::MAX));
        self.lock().iter().filter(|(_, h)| h.seen.load(Ordering::Relaxed) >= since).map(|(r, _)| r.clone()).collect()
    }

    fn has_offer(&self, rid: &str, dispatch_id: &str) -> bool {
        self.lock().get(rid).is_some_and(|h| h.sent.contains(dispatch_id))
    }

    fn offer(&self, offer: &Offer) -> bool {
        self.send_dispatch(&offer.responder, &offer.dispatch_id, wire::dispatch(offer))
    }

    fn cancel(&self, rid: &str, dispatch_id: &str, reason: &str) -> bool {
        self.send(rid, wire::cancel(dispatch_id, reason))
    }

    fn remind(&self, r: &Reminder) -> bool {
        self.send(&r.responder, wire::reminder(r))
    }
}

/// Token → responder, from the roster (tokens are compared by their SHA-256).
#[derive(Debug, Clone, Default)]
pub struct Roster {
    by_hash: HashMap<[u8; 32], String>,
}

impl Roster {
    pub fn new(roster: &[ResponderConfig]) -> Roster {
        let by_hash = roster
            .iter()
            .filter_map(|r| {
                let h: [u8; 32] = hex::decode(&r.token_sha256).ok()?.try_into().ok()?;
                Some((h, r.id.clone()))
            })
            .collect();
        Roster { by_hash }
    }

    /// The responder a token belongs to, and the token's SHA-256.
    pub fn authenticate(&self, token: &str) -> Option<(String, [u8; 32])> {
        let h: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.by_hash.get(&h).map(|rid| (rid.clone(), h))
    }

    /// The responder whose token has this SHA-256.
    pub fn holder(&self, token_sha256: &[u8; 32]) -> Option<&str> {
        self.by_hash.get(token_sha256).map(String::as_str)
    }
}

pub use session::{Gateway, serve};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_leave_when_dropped_and_only_live_ones_are_reachable() {
        let sessions = Arc::new(Sessions::new(Duration::from_millis(50)));
        let (tx, _rx) = mpsc::channel(4);
        let left = Arc::new(Mutex::new(Vec::new()));
        let mut reg = sessions.register("r-a", [1; 32], tx.clone());
        let l = left.clone();
        reg.on_leave(move |rid| l.lock().unwrap().push(rid));
        assert_eq!(sessions.reachable(), ["r-a"]);
        // Not heard from for two heartbeats: registered, but not reachable (no lease renewal).
        std::thread::sleep(Duration::from_millis(120));
        assert!(sessions.is_connected("r-a") && sessions.reachable().is_empty());
        reg.seen();
        assert_eq!(sessions.reachable(), ["r-a"]);
        // A newer connection replaces it: the old one's drop does not report a leave.
        let newer = sessions.register("r-a", [1; 32], tx);
        drop(reg);
        assert!(sessions.is_connected("r-a") && left.lock().unwrap().is_empty());
        drop(newer);
        assert!(!sessions.is_connected("r-a"));
    }

    #[test]
    fn a_reload_revokes_connections_whose_token_changed_hands() {
        let sessions = Arc::new(Sessions::new(Duration::from_secs(15)));
        let (ta, mut ra) = mpsc::channel(4);
        let (tb, mut rb) = mpsc::channel(4);
        let token = |t: &str| -> [u8; 32] { Sha256::digest(t.as_bytes()).into() };
        let _a = sessions.register("r-a", token("ta"), ta);
        let _b = sessions.register("r-b", token("tb"), tb);
        let cfg = |id: &str, t: &str| ResponderConfig {
            id: id.into(),
            name: String::new(),
            token_sha256: hex::encode(token(t)),
            skills: vec!["*".into()],
            tier: 1,
            phone: None,
            sip_uri: None,
            webhook: None,
        };
        let revoked = sessions.revoke(&Roster::new(&[cfg("r-a", "new"), cfg("r-b", "tb")]));
        assert_eq!(revoked, ["r-a"]);
        assert!(matches!(ra.try_recv(), Ok(Out::Close(4401, _))));
        assert!(rb.try_recv().is_err());
    }
}
