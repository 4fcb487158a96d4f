//! Reaching a responder besides its websocket (contract §11): the channels
//! the dispatcher's rules hand attempts to. One file per channel:
//!
//! - a call through the PBX (AMI Originate / ESL originate) that speaks the
//!   offer and reads one digit: placed through the dispatcher's
//!   [`Pager`](crate::dispatcher::Pager), which the PBX feed serves;
//! - `sip_message.rs` — a SIP MESSAGE (RFC 3428) to the responder's `sip_uri`,
//!   over UDP (Timer E retransmissions), TCP or TLS;
//! - `webhook.rs` — a signed JSON POST to the responder's `webhook`;
//! - `client.rs` — the TLS client configuration both of the last two use.
//!
//! The rules (`store/scripts/dispatch.lua`) decide which channel is next and
//! when, so that each attempt is made once however many daemons share Redis;
//! [`Channels::attempt`] makes one and says what became of it.

pub mod client;
pub mod sip_message;
pub mod webhook;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::config::{FallbackSettings, ResponderConfig, Settings};
use crate::domain::dispatch::{Attempt, Channel, Outcome, Purpose};
use crate::domain::timeline::timestamp_ms;

use crate::dispatcher::notify::BoxFuture;
use crate::dispatcher::{Pager, Reach};

/// The text an attempt carries (a spoken prompt, a MESSAGE body): what, how
/// urgent, what to do, and how to answer.
pub fn text_of(a: &Attempt) -> String {
    let o = &a.offer;
    let mut t = match a.purpose {
        Purpose::Offer => format!("{} {} incident {}", o.severity.as_str().to_uppercase(), o.category, o.incident_id),
        Purpose::Reminder => format!("Reminder: incident {} is waiting for your progress", o.incident_id),
    };
    if o.major {
        t.insert_str(0, "MAJOR INCIDENT. ");
    }
    for part in [&o.summary, &o.instructions] {
        if !part.is_empty() {
            t.push_str(". ");
            t.push_str(part);
        }
    }
    if a.purpose == Purpose::Offer && o.ack_by_ms > 0 {
        t.push_str(&format!(". Answer by {}", timestamp_ms(o.ack_by_ms)));
    }
    t.chars().filter(|c| !c.is_control()).take(600).collect()
}

/// This machine's clock, ms (how long a page call may ring: the offer's
/// deadline is in Redis's clock; a skew of a second or two only changes that).
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The channels of this daemon, with the roster's contact details (replaced on reload).
pub struct Channels {
    pub pager: Arc<Pager>,
    sip: sip_message::SipMessage,
    webhook: webhook::Webhook,
    page_context: String,
    contacts: RwLock<HashMap<String, ResponderConfig>>,
}

impl Channels {
    pub fn new(settings: &Settings, pager: Arc<Pager>) -> Channels {
        let f: &FallbackSettings = &settings.fallback;
        let c = Channels {
            pager,
            sip: sip_message::SipMessage::new(f.message_timeout),
            webhook: webhook::Webhook::new(f),
            page_context: f.page_context.clone(),
            contacts: RwLock::default(),
        };
        c.set_roster(settings);
        c
    }

    fn contact(&self, rid: &str) -> Option<ResponderConfig> {
        match self.contacts.read() {
            Ok(c) => c.get(rid).cloned(),
            Err(p) => p.into_inner().get(rid).cloned(),
        }
    }

    /// Makes one attempt. `stop` resolves when the attempt is no longer
    /// wanted (the offer was answered or moved on): a ringing call is hung up.
    async fn reach(&self, a: &Attempt, stop: BoxFuture<'_, ()>) -> Outcome {
        let Some(who) = self.contact(&a.offer.responder) else { return Outcome::Failed("not_in_roster".into()) };
        match a.channel {
            Channel::PbxCall => match &who.phone {
                Some(phone) => {
                    // Ring until the offer's deadline (a reminder: a minute).
                    let ring = match a.purpose {
                        Purpose::Offer => {
                            Duration::from_millis(u64::try_from(a.offer.ack_by_ms - now_ms()).unwrap_or(0))
                        }
                        Purpose::Reminder => Duration::from_secs(60),
                    }
                    .clamp(Duration::from_secs(5), Duration::from_secs(300));
                    self.pager.call(a, phone, &text_of(a), &self.page_context, ring, stop).await
                }
                None => Outcome::Failed("no_phone".into()),
            },
            Channel::SipMessage => match &who.sip_uri {
                Some(uri) => self.sip.send(uri, a, &text_of(a)).await,
                None => Outcome::Failed("no_sip_uri".into()),
            },
            Channel::Webhook => match &who.webhook {
                Some(url) => self.webhook.post(url, a, &text_of(a)).await,
                None => Outcome::Failed("no_webhook".into()),
            },
        }
    }
}

impl Reach for Channels {
    fn attempt<'a>(&'a self, a: &'a Attempt, stop: BoxFuture<'a, ()>) -> BoxFuture<'a, Outcome> {
        Box::pin(self.reach(a, stop))
    }

    /// The roster's contact details (SIGHUP).
    fn set_roster(&self, settings: &Settings) {
        let map = settings.roster.iter().map(|r| (r.id.clone(), r.clone())).collect();
        match self.contacts.write() {
            Ok(mut c) => *c = map,
            Err(p) => *p.into_inner() = map,
        }
    }
}
