//! dispatchd — incident intake and responder dispatch beside a contact centre PBX.
//!
//! Data flows one way: adapters in → the two doors of the core → store → out
//! through the dispatcher's notifiers.
//!
//! ```text
//!  PBX ──SIP──▶ sip/ ─┐                                      ┌─▶ Notifier: responders/ (websockets) ──ws──▶ crews
//!  PBX ─AMI/ESL▶ acd/ ┼─▶ domain::CallFacts/CallEvent ─▶ intake ─┐     │
//!  ops ──HTTP─▶ api/ ─┘   (resolve, cancel, roster) ─▶ dispatcher ◀─┘── store (Redis: records, queue,
//!                                                        ▲           deadlines, Lua rules, pub/sub)
//!  crews ──ws──▶ responders/ (ack, decline, status) ─────┘
//! ```
//!
//! - **Adapters** speak one wire protocol each and turn it into domain values:
//!   `sip/` (the incident line: `wire` → `transport` → `transaction` → `line`,
//!   with `call`/`message` mapping SIP to call facts and events), `acd/` (PBX
//!   feeds: `ami`/`esl` wire parsers, `asterisk`/`freeswitch` connections,
//!   `feed` the loop they share), `responders/` (the websocket gateway) and
//!   `api/` (health, metrics, `/v1`). They call intake or the dispatcher —
//!   never the store, never each other.
//! - **The doors:** `intake` (call facts and events → incidents, with the
//!   correlation rules; incidents opened by hand; records read and erased) and
//!   `dispatcher` (offers, answers, progress, deadlines, closing by hand; it
//!   hands what the rules decide to a [`dispatcher::Notifier`]).
//! - **Domain** (`domain/`): pure values and rules — incident, timeline
//!   events, call facts and events, the IVR path, classification, ids,
//!   escalation and correlation policy, what an offer carries. No tokio, no
//!   redis, no clock reads.
//! - **Store** (`store/`): the only module that talks to Redis. Every atomic
//!   change is one operation of a Lua script (`intake.lua`, `dispatch.lua`,
//!   `admin.lua`, sharing `common.lua` and a prelude generated from the Rust
//!   vocabulary); every operation takes its time as a value (Redis's `TIME` in
//!   the daemon, an explicit one in `tests/store_rules.rs`).
//! - Around them: `app` (startup order and drain), `reload` (SIGHUP), `cli`
//!   (report, review), `report` (the review report, pure), `config`,
//!   `telemetry`, `shutdown`, `systemd`, `backoff` (the one retry delay).
//!
//! Where this departs from `architecture.md`'s starting map: the `Notifier`
//! trait lives in `dispatcher/notify.rs` and its implementations beside their
//! transport (the websocket one is `responders::Sessions`), because a channel
//! is an adapter like any other; and `intake`/`dispatcher` are folders (one
//! file per group of use cases).
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
pub mod notify;
pub mod reload;
pub mod report;
pub mod responders;
pub mod shutdown;
pub mod sip;
pub mod store;
pub mod systemd;
pub mod telemetry;
pub mod tls;
