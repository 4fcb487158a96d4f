//! The seam between the dispatcher's rules and the channels that reach a
//! responder. The dispatcher decides; a [`Notifier`] delivers. The first
//! implementation is the websocket gateway (`responders::Sessions`); the
//! console and other channels plug in here without touching the rules.

use crate::domain::dispatch::Offer;

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
}
