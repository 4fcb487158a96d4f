//! dispatchd — incident intake and responder dispatch beside a contact centre PBX.
//!
//! Data flows one way: adapters in → core → adapters out.
//!
//! ```text
//!  PBX ──SIP──▶ sip/ ─▶ CallFacts ─▶ intake ─▶ store (Redis) ─▶ dispatcher ─▶ responders/ ──ws──▶ crews
//!                                   (classify)  queue, records,   (offers,       └─▶ api/ (/metrics, /v1)
//!                                               timelines, Lua    deadlines)
//! ```
//!
//! - `sip/` — the incident line: `wire` (framing, sanity checks, responses),
//!   `transport` (UDP/TCP, allow list, limits), `uas` (transactions, early
//!   dialogs, the answers of contract §3), `call` (SIP → call facts).
//! - `intake` — call facts → classified incident; call events → timeline.
//! - `classify`, `incident` — pure domain values and rules.
//! - `store` — the only module that talks to Redis; Lua scripts in `store/scripts/`.
//! - `dispatcher` — when to run the offer rules (which live in Lua, in Redis) and
//!   delivering what they decide; `responders/` — the websocket gateway.
//! - `api` — health, metrics, `/v1`.
//! - `app` — startup order and drain; `config`, `telemetry`, `shutdown`, `systemd`.
#![forbid(unsafe_code)]

pub mod acd;
pub mod api;
pub mod app;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod dispatcher;
pub mod domain;
pub mod intake;
pub mod reload;
pub mod report;
pub mod responders;
pub mod shutdown;
pub mod sip;
pub mod store;
pub mod systemd;
pub mod telemetry;
