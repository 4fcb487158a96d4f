//! The incident line: SIP over UDP and TCP (contract §3).
//!
//! bytes → `wire` (frame, check, 400) → `transport` (allow list, limits) →
//! `uas` (transactions, dialogs, answers) → `call` facts → intake.
pub mod call;
pub mod message;
pub mod transport;
pub mod uas;
pub mod wire;
