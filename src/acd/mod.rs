//! PBX event feeds → `CallEvent`s: the call's life in the contact centre
//! (queue joins and abandons, agents answering, IVR choices, hang-ups).
//!
//! Three sources speak these events: out-of-dialog SIP MESSAGE from the
//! dialplan (`sip/message.rs`, `X-Event: …`), the Asterisk Manager Interface
//! (`ami` for the wire, `asterisk` for the connection) and the FreeSWITCH
//! event socket (`esl`, `freeswitch`). Each turns its protocol into the same
//! plain values (`domain::call::CallEvent`); `intake::Intake::apply` does the
//! rest (correlation included), so a rule behaves the same whichever PBX
//! reported the call. `feed` is what the two connection loops share.

pub mod ami;
pub mod asterisk;
pub mod esl;
pub mod feed;
pub mod freeswitch;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::dispatcher::Pager;
use crate::domain::incident::Source;
use crate::intake::Intake;

/// Starts the PBX feeds configured under `[acd]` (`[acd.asterisk]`,
/// `[acd.freeswitch]`); each runs until `token` is cancelled, reconnecting on
/// its own. Addresses and credentials are read once: a SIGHUP does not move a
/// running feed (restart the daemon for that).
/// A feed that holds its PBX connection serves `pager` (page calls, contract §11).
pub fn spawn(settings: &Settings, intake: Arc<Intake>, pager: Arc<Pager>, token: CancellationToken) {
    let acd = &settings.acd;
    if let Some(a) = &acd.asterisk {
        feed::set_connected(Source::Ami, false);
        tokio::spawn(asterisk::run(a.clone(), acd.max_backoff, intake.clone(), pager.clone(), token.clone()));
    }
    if let Some(f) = &acd.freeswitch {
        feed::set_connected(Source::Esl, false);
        tokio::spawn(freeswitch::run(f.clone(), acd.max_backoff, intake, pager, token));
    }
}
