//! The incident line: SIP over UDP and TCP (contract §3).
//!
//! bytes → `wire` (frame, check, 400) → `transport` (allow list, limits) →
//! `transaction` (RFC 3261 server transactions, retransmissions, early
//! dialogs) → `line` (admission and the answers of the incident line) →
//! `call` / `message` (SIP → call facts and events) → intake.
pub mod call;
pub mod line;
pub mod message;
pub mod rate;
pub mod transaction;
pub mod transport;
pub mod wire;
