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

pub mod session;
pub mod wire;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use crate::config::ResponderConfig;
use crate::dispatcher::Notifier;
use crate::domain::dispatch::Offer;
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
}

/// Responders connected to this daemon.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Handle>>,
    next: AtomicU64,
    /// The session tasks, waited for on shutdown (their 1001 close frames).
    pub tasks: TaskTracker,
}

impl Sessions {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Handle>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new connection of `rid`; an older one of the same responder is closed.
    pub fn register(&self, rid: &str, tx: mpsc::Sender<Out>) -> u64 {
        let conn = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let old = self.lock().insert(rid.to_string(), Handle { conn, tx, sent: HashSet::new() });
        match old {
            Some(h) => {
                let _ = h.tx.try_send(Out::Close(4409, "replaced by a newer connection"));
            }
            None => metrics::gauge!(metric::RESPONDERS_CONNECTED).increment(1.0),
        }
        conn
    }

    /// Forgets a connection (only if it is still the current one). True when it was.
    pub fn unregister(&self, rid: &str, conn: u64) -> bool {
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
}

impl Notifier for Sessions {
    fn reachable(&self) -> Vec<String> {
        self.connected()
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

    /// The responder a token belongs to.
    pub fn authenticate(&self, token: &str) -> Option<String> {
        let h: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        self.by_hash.get(&h).cloned()
    }
}

pub use session::{Gateway, serve};
