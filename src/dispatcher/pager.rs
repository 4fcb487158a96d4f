//! Page calls (contract §11): a call to the responder's `phone` through the
//! PBX dispatchd already holds a feed to — Asterisk (AMI `Originate`, async,
//! with an `ActionID` and a `ChannelId` per attempt) or FreeSWITCH (`bgapi
//! originate {origination_uuid=…}`) — into the dialplan
//! `fallback.page_context`, which speaks the offer and reads one digit.
//!
//! Only the digit the PBX reports back counts (AMI `UserEvent: DispatchdPage`,
//! ESL `CUSTOM dispatchd::page`, headers `Incident`, `Dispatch`, `Choice`):
//! `1` acknowledges, `2` declines. A busy line, no answer, an originate that
//! failed, or an answered call that hung up without a digit is an outcome,
//! and the chain goes on. A call still ringing when the offer was answered
//! elsewhere or moved on is hung up.
//!
//! [`Pager`] is the door between the two sides: the PBX feed session (an
//! adapter in, `acd/`) attaches its command queue and reports what it hears;
//! the PBX-call channel (`notify/`) places calls through it and waits for
//! their outcome. Neither side knows the other.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::domain::dispatch::{Attempt, Outcome};
use crate::domain::incident::Source;

/// What the feed session is asked to do on the PBX.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Place a call: `id` is the channel's id (AMI `ChannelId`, ESL
    /// `origination_uuid`), `vars` the channel variables.
    Originate { id: String, phone: String, context: String, ring: Duration, vars: Vec<(&'static str, String)> },
    /// Hang the call `id` up.
    Hangup { id: String },
}

/// What the PBX said about a page call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// The digit pressed (the dialplan's `UserEvent` / `event`).
    Digit(char),
    /// The call was answered (AMI `OriginateResponse: Success`, ESL the
    /// originate's `+OK`).
    Answered,
    /// The call could not be placed or was not answered.
    Failed(Outcome),
    /// The call's channel hung up; the outcome is what that means when the
    /// call was never answered (the PBX's cause: busy, no answer, …). After
    /// an answer it is a hang-up without a digit.
    Hangup(Outcome),
}

/// Page calls in progress, and the feeds that can place them.
#[derive(Default)]
pub struct Pager {
    feeds: Mutex<Vec<(Source, mpsc::Sender<Command>)>>,
    calls: Mutex<HashMap<String, mpsc::Sender<Report>>>,
}

/// A fresh channel id in UUID form (FreeSWITCH wants one; Asterisk takes it too).
fn new_id() -> String {
    let h = hex::encode(rand::random::<[u8; 16]>());
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// A value fit for a channel variable on both PBXs: one line, no commas
/// (AMI splits `Variable` on them), no quotes or braces (ESL's `{…}`).
pub fn variable_value(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() || matches!(c, ',' | '\'' | '"' | '{' | '}' | '[' | ']' | '|') { ' ' } else { c })
        .collect::<String>()
        .trim()
        .chars()
        .take(500)
        .collect()
}

impl Pager {
    /// The feed session of `source` can place calls now (it holds the PBX connection).
    pub fn attach(&self, source: Source, tx: mpsc::Sender<Command>) {
        let mut f = self.feeds.lock().unwrap_or_else(|p| p.into_inner());
        f.retain(|(s, _)| *s != source);
        f.push((source, tx));
    }

    pub fn detach(&self, source: Source) {
        self.feeds.lock().unwrap_or_else(|p| p.into_inner()).retain(|(s, _)| *s != source);
    }

    /// Whether this daemon can place a PBX call now.
    pub fn available(&self) -> bool {
        !self.feeds.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    /// Whether `id` is one of our calls (the feed keeps what it needs of those only).
    pub fn is_call(&self, id: &str) -> bool {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).contains_key(id)
    }

    /// What the PBX said about the call `id` (ignored when it is not ours).
    pub fn report(&self, id: &str, r: Report) {
        if let Some(tx) = self.calls.lock().unwrap_or_else(|p| p.into_inner()).get(id) {
            let _ = tx.try_send(r);
        }
    }

    fn feed(&self) -> Option<mpsc::Sender<Command>> {
        self.feeds.lock().unwrap_or_else(|p| p.into_inner()).first().map(|(_, tx)| tx.clone())
    }

    /// Places the page call of attempt `a` to `phone` and waits for what
    /// became of it: the digit, a failure, a hang-up without a digit, or
    /// `stop` (the call is then hung up). It rings at most `ring`.
    pub async fn call(
        &self,
        a: &Attempt,
        phone: &str,
        text: &str,
        context: &str,
        ring: Duration,
        stop: impl Future<Output = ()>,
    ) -> Outcome {
        let Some(feed) = self.feed() else { return Outcome::Failed("no_pbx_feed".into()) };
        let id = new_id();
        let (tx, mut rx) = mpsc::channel(8);
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone(), tx);
        let vars = vec![
            ("DISPATCHD_INCIDENT", variable_value(&a.offer.incident_id)),
            ("DISPATCHD_DISPATCH", variable_value(&a.offer.dispatch_id)),
            ("DISPATCHD_TEXT", variable_value(text)),
        ];
        let originate =
            Command::Originate { id: id.clone(), phone: phone.to_string(), context: context.to_string(), ring, vars };
        let outcome = if feed.send(originate).await.is_err() {
            Outcome::Failed("no_pbx_feed".into())
        } else {
            tokio::pin!(stop);
            // Ringing, then the prompt and the digit: allow a minute after the ring.
            let give_up = tokio::time::sleep(ring + Duration::from_secs(60));
            tokio::pin!(give_up);
            let mut answered = false;
            loop {
                tokio::select! {
                    r = rx.recv() => match r {
                        Some(Report::Digit('1')) => break Outcome::Acknowledged,
                        Some(Report::Digit('2')) => break Outcome::Declined,
                        Some(Report::Digit(_)) => continue,
                        Some(Report::Answered) => answered = true,
                        Some(Report::Failed(o)) => break o,
                        // The PBX hangs a failed call up before it says why
                        // the originate failed: the cause tells.
                        Some(Report::Hangup(_)) if answered => break Outcome::NoDigit,
                        Some(Report::Hangup(o)) => break o,
                        None => break Outcome::Failed("no_pbx_feed".into()),
                    },
                    _ = &mut stop => {
                        let _ = feed.send(Command::Hangup { id: id.clone() }).await;
                        break Outcome::Stopped;
                    }
                    _ = &mut give_up => {
                        let _ = feed.send(Command::Hangup { id: id.clone() }).await;
                        break Outcome::NoAnswer;
                    }
                }
            }
        };
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variable_values_are_one_safe_line() {
        assert_eq!(
            variable_value("CRITICAL outage, isolate {it}\r\nnow 'please'"),
            "CRITICAL outage  isolate  it   now  please"
        );
        assert_eq!(variable_value(&"é".repeat(900)).chars().count(), 500);
        let id = new_id();
        assert_eq!(id.len(), 36);
        assert_eq!(id.matches('-').count(), 4);
    }
}
