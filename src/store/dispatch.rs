//! The dispatch half of the store: responders' presence, offers, answers,
//! deadlines — each one operation of `scripts/dispatch.lua`, atomic in Redis.

use chrono::{DateTime, Utc};
use redis::AsyncCommands;

use super::{Result, Store, StoreError};
use crate::incident::{Severity, timestamp};

/// Acknowledgement deadline and passes over all tiers, per severity
/// (index = `Severity::rank`).
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub ack_timeout_ms: [u64; 4],
    pub max_rounds: [u32; 4],
}

/// An offer the matcher made: deliver a `dispatch` frame to `responder`.
#[derive(Debug, Clone, PartialEq)]
pub struct Offer {
    pub incident_id: String,
    pub responder: String,
    pub dispatch_id: String,
    /// The daemon the responder is connected to.
    pub daemon: String,
    pub severity: Severity,
    pub escalated: bool,
}

/// An offer taken back: deliver a `cancel` frame to `responder`.
#[derive(Debug, Clone, PartialEq)]
pub struct Cancel {
    pub responder: String,
    pub dispatch_id: String,
    pub daemon: String,
    pub reason: String,
}

/// What one pass of the dispatcher decided.
#[derive(Debug, Clone, Default)]
pub struct Step {
    /// Offers withdrawn at their deadline.
    pub cancels: Vec<Cancel>,
    /// New offers, with what their `dispatch` frames carry.
    pub offers: Vec<(Offer, OfferDetails)>,
    /// Incidents that went `max_rounds` passes without an acknowledgement.
    pub exhausted: Vec<(String, Severity)>,
    pub next_deadline_ms: Option<i64>,
}

/// What became of an `ack` or `decline`.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Acknowledged now (with the offer time, for the offer → ack histogram),
    /// or again (a repeated ack of the same dispatch).
    Acknowledged {
        offered_ms: Option<i64>,
        repeated: bool,
    },
    Declined(Cancel),
    /// `unknown_dispatch` or `stale_dispatch`.
    Refused(String),
}

/// What a `dispatch` frame carries about its incident.
#[derive(Debug, Clone)]
pub struct OfferDetails {
    pub incident_id: String,
    pub dispatch_id: String,
    pub attempt: u32,
    pub state: String,
    pub assigned_to: String,
    pub severity: String,
    pub category: String,
    pub summary: String,
    pub instructions: String,
    pub caller: String,
    pub queue: String,
    pub opened_ms: i64,
    pub ack_by_ms: i64,
    /// A major incident (surge or abandon storm): offered to the highest tier first.
    pub major: bool,
}

fn cancel_row(row: &[String]) -> Option<Cancel> {
    match row {
        [kind, rid, dispatch_id, daemon, reason, ..] if kind == "cancel" => Some(Cancel {
            responder: rid.clone(),
            dispatch_id: dispatch_id.clone(),
            daemon: daemon.clone(),
            reason: reason.clone(),
        }),
        _ => None,
    }
}

impl Store {
    pub(super) fn dispatch_op(&self, op: &str, now: DateTime<Utc>) -> redis::ScriptInvocation<'_> {
        let mut inv = self.dispatch.prepare_invoke();
        inv.arg(op).arg(&self.prefix).arg(now.timestamp_millis()).arg(timestamp(now));
        inv
    }

    async fn run<T: redis::FromRedisValue>(&self, inv: &redis::ScriptInvocation<'_>) -> Result<T> {
        let mut c = self.conn.clone();
        Self::counted(inv.invoke_async(&mut c).await)
    }

    /// Writes the roster (tier and skills of each responder) for the matcher.
    pub async fn sync_roster(&self, roster: &[(String, u32, Vec<String>)]) -> Result<()> {
        let mut inv = self.dispatch_op("roster", Utc::now());
        inv.arg(roster.len());
        for (id, tier, skills) in roster {
            let skills =
                if skills.iter().any(|s| s == "*") { "*".to_string() } else { format!(",{},", skills.join(",")) };
            inv.arg(id).arg(tier).arg(skills);
        }
        self.run::<i64>(&inv).await.map(|_| ())
    }

    /// A responder connected here. Returns the incident offered to it and not yet answered.
    pub async fn connect(&self, rid: &str, daemon: &str, lease_until_ms: i64) -> Result<Option<String>> {
        let mut inv = self.dispatch_op("connect", Utc::now());
        inv.arg(rid).arg(daemon).arg(lease_until_ms);
        let offer: String = self.run(&inv).await?;
        Ok((!offer.is_empty()).then_some(offer))
    }

    /// Extends the lease of the responders connected to this daemon.
    pub async fn refresh_leases(&self, daemon: &str, lease_until_ms: i64, rids: &[String]) -> Result<()> {
        if rids.is_empty() {
            return Ok(());
        }
        let mut inv = self.dispatch_op("lease", Utc::now());
        inv.arg(daemon).arg(lease_until_ms);
        for r in rids {
            inv.arg(r);
        }
        self.run::<i64>(&inv).await.map(|_| ())
    }

    pub async fn disconnect(&self, rid: &str, daemon: &str) -> Result<()> {
        let mut inv = self.dispatch_op("disconnect", Utc::now());
        inv.arg(rid).arg(daemon);
        self.run::<i64>(&inv).await.map(|_| ())
    }

    pub async fn set_availability(&self, rid: &str, status: &str) -> Result<()> {
        let mut inv = self.dispatch_op("availability", Utc::now());
        inv.arg(rid).arg(status);
        self.run::<i64>(&inv).await.map(|_| ())
    }

    /// One pass of the dispatcher: withdraw offers past their deadline, pair
    /// waiting incidents with free responders (at most `max` offers), and say
    /// when the next deadline falls. One round trip.
    pub async fn step(&self, max: usize, policy: &Policy, daemon: &str) -> Result<Step> {
        let now = Utc::now();
        let mut inv = self.dispatch_op("step", now);
        inv.arg(max);
        for ms in policy.ack_timeout_ms {
            inv.arg(ms);
        }
        for ms in policy.ack_timeout_ms {
            inv.arg(timestamp(now + chrono::Duration::milliseconds(ms as i64)));
        }
        for r in policy.max_rounds {
            inv.arg(r);
        }
        inv.arg(daemon);
        let rows: Vec<Vec<String>> = self.run(&inv).await?;
        let bad = || StoreError::Corrupt("step".into(), "unexpected row");
        let mut step = Step::default();
        for row in rows {
            match row.as_slice() {
                [
                    k,
                    id,
                    rid,
                    dispatch_id,
                    daemon,
                    sev,
                    esc,
                    attempt,
                    category,
                    summary,
                    instructions,
                    caller,
                    queue,
                    opened,
                    ack_by,
                    major,
                ] if k == "offer" => {
                    let offer = Offer {
                        incident_id: id.clone(),
                        responder: rid.clone(),
                        dispatch_id: dispatch_id.clone(),
                        daemon: daemon.clone(),
                        severity: Severity::parse(sev).ok_or_else(bad)?,
                        escalated: esc == "1",
                    };
                    let details = OfferDetails {
                        incident_id: id.clone(),
                        dispatch_id: dispatch_id.clone(),
                        attempt: attempt.parse().unwrap_or(0),
                        state: "offered".into(),
                        assigned_to: rid.clone(),
                        severity: sev.clone(),
                        category: category.clone(),
                        summary: summary.clone(),
                        instructions: instructions.clone(),
                        caller: caller.clone(),
                        queue: queue.clone(),
                        opened_ms: opened.parse().unwrap_or(0),
                        ack_by_ms: ack_by.parse().unwrap_or(0),
                        major: major == "1",
                    };
                    step.offers.push((offer, details));
                }
                [k, id, sev] if k == "exhausted" => {
                    step.exhausted.push((id.clone(), Severity::parse(sev).ok_or_else(bad)?))
                }
                [k, ms] if k == "next" => step.next_deadline_ms = ms.parse::<f64>().ok().map(|v| v as i64),
                other => step.cancels.push(cancel_row(other).ok_or_else(bad)?),
            }
        }
        Ok(step)
    }

    /// A responder's `ack` (`ack = true`) or `decline` of a dispatch.
    pub async fn answer(&self, rid: &str, dispatch_id: &str, ack: bool, reason: &str) -> Result<Answer> {
        let mut inv = self.dispatch_op("answer", Utc::now());
        inv.arg(rid).arg(dispatch_id).arg(if ack { "ack" } else { "decline" }).arg(reason);
        let row: Vec<String> = self.run(&inv).await?;
        Ok(match row.as_slice() {
            [k, offered, rest @ ..] if k == "acknowledged" => {
                Answer::Acknowledged { offered_ms: offered.parse().ok(), repeated: !rest.is_empty() }
            }
            [k, code] if k == "error" => Answer::Refused(code.clone()),
            other => match cancel_row(other) {
                Some(c) => Answer::Declined(c),
                None => return Err(StoreError::Corrupt(dispatch_id.into(), "unexpected answer")),
            },
        })
    }

    /// A status update from a responder; `Err(code)` when it is not allowed.
    pub async fn status(
        &self,
        rid: &str,
        incident_id: &str,
        status: &str,
        note: &str,
        eta_s: Option<u32>,
    ) -> Result<std::result::Result<(), String>> {
        let mut inv = self.dispatch_op("status", Utc::now());
        inv.arg(rid).arg(incident_id).arg(status).arg(note).arg(eta_s.map(|e| e.to_string()).unwrap_or_default());
        let row: Vec<String> = self.run(&inv).await?;
        Ok(match row.as_slice() {
            [k, _] if k == "ok" => Ok(()),
            [_, code] => Err(code.clone()),
            _ => Err("not_allowed".into()),
        })
    }

    /// The incidents currently offered to these responders (empty string = none).
    pub async fn current_offers(&self, rids: &[String]) -> Result<Vec<Option<String>>> {
        if rids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for r in rids {
            pipe.hget(self.key(&["resp", r]), "offer");
        }
        let mut c = self.conn.clone();
        let v: Vec<Option<String>> = Self::counted(pipe.query_async(&mut c).await)?;
        Ok(v.into_iter().map(|o| o.filter(|s| !s.is_empty())).collect())
    }

    /// What the `dispatch` frames of these incidents carry.
    pub async fn offer_details(&self, ids: &[String]) -> Result<Vec<Option<OfferDetails>>> {
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.hgetall(self.key(&["inc", id]));
        }
        let mut c = self.conn.clone();
        let recs: Vec<std::collections::HashMap<String, String>> = Self::counted(pipe.query_async(&mut c).await)?;
        Ok(ids
            .iter()
            .zip(recs)
            .map(|(id, mut f)| {
                if f.is_empty() {
                    return None;
                }
                let mut take = |k: &str| f.remove(k).unwrap_or_default();
                let dispatch_id = take("dispatch_id");
                Some(OfferDetails {
                    incident_id: id.clone(),
                    attempt: take("attempts").parse().unwrap_or(0),
                    state: take("state"),
                    assigned_to: take("assigned_to"),
                    severity: take("severity"),
                    category: take("category"),
                    summary: take("summary"),
                    instructions: take("instructions"),
                    caller: take("caller"),
                    queue: take("queue"),
                    opened_ms: take("opened_ms").parse().unwrap_or(0),
                    ack_by_ms: take("ack_by_ms").parse().unwrap_or(0),
                    major: take("major") == "1",
                    dispatch_id,
                })
            })
            .collect())
    }

    /// Pub/sub channel names: wake-ups and cancels for other daemons.
    pub fn channel(&self, name: &str) -> String {
        self.key(&["ch", name])
    }

    /// Best-effort notice to other daemons; nothing depends on its arrival.
    pub async fn publish(&self, channel: &str, payload: &str) {
        let mut c = self.conn.clone();
        let _: std::result::Result<i64, _> = c.publish(self.channel(channel), payload).await;
    }

    pub fn client_url(&self) -> &str {
        &self.url
    }
}
