//! The seam between the dispatcher's rules and the channels that reach a
//! responder. The dispatcher decides; a [`Notifier`] delivers to the
//! responder's open connection here (the websocket gateway,
//! `responders::Sessions`, which the console uses too). The channels that
//! reach a responder without one — a PBX call, a SIP MESSAGE, a webhook —
//! are attempts with an outcome, made by `crate::notify::Channels`.

use std::future::Future;
use std::pin::Pin;

use crate::config::Settings;
use crate::domain::dispatch::{Attempt, Offer, Outcome, Reminder};

pub trait Notifier: Send + Sync {
    /// The responders this channel can reach from this daemon now (their
    /// presence leases are renewed, and their pending offers sent again).
    fn reachable(&self) -> Vec<String>;

    /// Whether `responder`'s channel already has this dispatch (it is not sent twice).
    fn has_offer(&self, responder: &str, dispatch_id: &str) -> bool;

    /// Hands an offer (caller already masked) to its responder's channel;
    /// true when it went out now.
    fn offer(&self, offer: &Offer) -> bool;

    /// Tells `responder` an offer was taken back (`reason`: `ack_timeout`,
    /// `declined`, `incident_cancelled`, …); false when it cannot be reached here.
    fn cancel(&self, responder: &str, dispatch_id: &str, reason: &str) -> bool;

    /// Reminds `r.responder` that its acknowledged incident waits for progress
    /// (contract §11); false when it cannot be reached here.
    fn remind(&self, r: &Reminder) -> bool;
}

/// A future an implementation returns from a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The channels that reach a responder without an open connection (contract
/// §11: a PBX call, a SIP MESSAGE, a webhook). The rules claim an attempt;
/// an implementation makes it and says what became of it.
pub trait Reach: Send + Sync {
    /// Makes attempt `a`; `stop` resolves when it is no longer wanted (a
    /// ringing call is then hung up).
    fn attempt<'a>(&'a self, a: &'a Attempt, stop: BoxFuture<'a, ()>) -> BoxFuture<'a, Outcome>;

    /// The roster's contact details changed (SIGHUP).
    fn set_roster(&self, settings: &Settings);
}
