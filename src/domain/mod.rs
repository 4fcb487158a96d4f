//! The words of the domain, once: pure values and rules, no I/O.
//!
//! Nothing here imports tokio or redis or reads a clock: times come in as
//! values (milliseconds since the epoch, judged by Redis's `TIME`, see
//! `store`), so every rule is testable without a runtime.
//!
//! - `incident` — Severity (its one rank), State (its allowed moves), Source,
//!   the record served by `/v1/incidents/{id}`, what an incident is opened with;
//! - `timeline` — every event name of contract §5 (and the extensions) as one enum;
//! - `call` — a call's facts and events, bounded;
//! - `ivr` — the one IVR-path grammar and its limits;
//! - `classify` — IVR path → category and severity;
//! - `ids` — incident ids, their normalisation, caller pseudonyms and masks;
//! - `policy` — the escalation and correlation policies as values;
//! - `dispatch` — what the dispatcher hands a responder's channel (offer, cancel, attempt, reminder);
//! - `contact` — where a responder's SIP MESSAGE goes.

pub mod call;
pub mod classify;
pub mod contact;
pub mod dispatch;
pub mod ids;
pub mod incident;
pub mod ivr;
pub mod policy;
pub mod timeline;
