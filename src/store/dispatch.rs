//! The dispatch half of the store: responders' presence, offers, answers,
//! deadlines — each one operation of `scripts/dispatch.lua`, atomic in Redis.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::json;

use super::keys::Family;
use super::prelude::Script;
use super::{At, Result, Store, StoreError, seq};
use crate::domain::dispatch::{Answer, Attempt, Channel, Offer, Outcome, Purpose, Release, Reminder};
use crate::domain::incident::{Severity, State};
use crate::domain::policy::Escalation;

/// An offer the matcher made, with where its responder is connected.
#[derive(Debug, Clone, Deserialize)]
pub struct Offered {
    #[serde(flatten)]
    pub offer: Offer,
    /// The daemon the responder is connected to.
    pub daemon: String,
    /// Offered to a higher tier than the last offer.
    pub escalated: bool,
}

/// An incident that went `max_rounds` passes without an acknowledgement.
#[derive(Debug, Clone, Deserialize)]
pub struct Exhausted {
    pub incident_id: String,
    pub severity: Severity,
}

/// What one pass of the dispatcher decided.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Step {
    /// Offers withdrawn at their deadline.
    #[serde(deserialize_with = "seq")]
    pub releases: Vec<Release>,
    #[serde(deserialize_with = "seq")]
    pub offers: Vec<Offered>,
    #[serde(deserialize_with = "seq")]
    pub exhausted: Vec<Exhausted>,
    /// Attempts on the responders' other channels this daemon claimed (contract §11).
    #[serde(deserialize_with = "seq", default)]
    pub attempts: Vec<Attempt>,
    /// Reminders of acknowledged incidents without progress.
    #[serde(deserialize_with = "seq", default)]
    pub reminders: Vec<Reminder>,
    /// When the next deadline falls (ms), if any incident is offered.
    #[serde(default)]
    pub next_deadline_ms: Option<i64>,
    /// The time the pass ran at (ms, the store's clock).
    pub now: i64,
}

#[derive(Deserialize)]
struct AnswerRow {
    #[serde(default)]
    acknowledged: bool,
    #[serde(default)]
    offer_age_ms: Option<i64>,
    #[serde(default)]
    repeated: bool,
    #[serde(default)]
    release: Option<Release>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct StatusRow {
    #[serde(default)]
    ok: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

/// One roster member as the matcher reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RosterRow {
    pub id: String,
    pub tier: u32,
    pub skills: Vec<String>,
    /// Its other channels, in `fallback.order` (empty: the websocket only).
    pub channels: Vec<Channel>,
}

/// What the dispatch rules need beyond the escalation matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepPolicy {
    /// `fallback.after`, ms.
    pub after_ms: u64,
    /// This daemon can place PBX calls now (it holds the AMI/ESL feed).
    pub pbx: bool,
}

/// A roster member's presence as written by the daemons.
#[derive(Debug, Clone, PartialEq)]
pub struct Presence {
    /// A daemon holds a live lease for it.
    pub connected: bool,
    /// `available`, `busy`, `off_duty`; None if it never connected.
    pub availability: Option<String>,
}

impl Store {
    fn dispatch_op(&self, op: &str, at: At) -> redis::Cmd {
        self.op(Script::Dispatch, op, at)
    }

    /// Writes the roster (tier, skills and other channels of each responder) for the matcher.
    pub async fn sync_roster(&self, roster: &[RosterRow]) -> Result<()> {
        let mut inv = self.dispatch_op("roster", At::Server);
        inv.arg(roster.len());
        for r in roster {
            let skills =
                if r.skills.iter().any(|s| s == "*") { "*".to_string() } else { format!(",{},", r.skills.join(",")) };
            let channels: Vec<&str> = r.channels.iter().map(|c| c.as_str()).collect();
            inv.arg(&r.id).arg(r.tier).arg(skills).arg(channels.join(","));
        }
        self.run::<i64>(&inv).await.map(|_| ())
    }

    /// A responder connected to `daemon`, its lease good for `lease_ms` from
    /// `at`. Returns the incident offered to it and not yet answered.
    pub async fn connect(&self, rid: &str, daemon: &str, lease_ms: u64, at: At) -> Result<Option<String>> {
        let mut inv = self.dispatch_op("connect", at);
        inv.arg(rid).arg(daemon).arg(lease_ms);
        let offer: String = self.run(&inv).await?;
        Ok((!offer.is_empty()).then_some(offer))
    }

    /// Extends the lease of the responders connected to this daemon to `lease_ms` from `at`.
    pub async fn refresh_leases(&self, daemon: &str, lease_ms: u64, rids: &[String], at: At) -> Result<()> {
        if rids.is_empty() {
            return Ok(());
        }
        let mut inv = self.dispatch_op("lease", at);
        inv.arg(daemon).arg(lease_ms);
        for r in rids {
            inv.arg(r);
        }
        self.run::<i64>(&inv).await.map(|_| ())
    }

    pub async fn disconnect(&self, rid: &str, daemon: &str, at: At) -> Result<()> {
        let mut inv = self.dispatch_op("disconnect", at);
        inv.arg(rid).arg(daemon);
        self.run::<i64>(&inv).await.map(|_| ())
    }

    pub async fn set_availability(&self, rid: &str, status: &str, at: At) -> Result<()> {
        let mut inv = self.dispatch_op("availability", at);
        inv.arg(rid).arg(status);
        self.run::<i64>(&inv).await.map(|_| ())
    }

    /// One pass of the dispatcher: withdraw offers past their deadline, pair
    /// waiting incidents with free responders (at most `max` offers), and say
    /// when the next deadline falls. One round trip.
    pub async fn step(&self, max: usize, policy: &Escalation, more: StepPolicy, daemon: &str, at: At) -> Result<Step> {
        let mut inv = self.dispatch_op("step", at);
        let pol = json!({
            "max": max,
            "ack_timeout_ms": policy.ack_timeout_ms,
            "max_rounds": policy.max_rounds,
            "en_route_within_ms": policy.en_route_within_ms,
            "on_scene_within_ms": policy.on_scene_within_ms,
            "release_after": policy.release_after,
            "after_ms": more.after_ms,
            "pbx": more.pbx,
            "daemon": daemon,
        });
        inv.arg(pol.to_string());
        self.run_json(&inv, "step").await
    }

    /// A responder's `ack` (`ack = true`) or `decline` of a dispatch, on its
    /// websocket (`channel` None) or another channel (a PBX call's digit).
    #[allow(clippy::too_many_arguments)] // one per argument of the script's op
    pub async fn answer(
        &self,
        rid: &str,
        dispatch_id: &str,
        ack: bool,
        reason: &str,
        channel: Option<Channel>,
        policy: &Escalation,
        at: At,
    ) -> Result<Answer> {
        let mut inv = self.dispatch_op("answer", at);
        inv.arg(rid).arg(dispatch_id).arg(if ack { "ack" } else { "decline" }).arg(reason);
        inv.arg(channel.map(Channel::as_str).unwrap_or(""));
        for ms in policy.en_route_within_ms {
            inv.arg(ms);
        }
        let row: AnswerRow = self.run_json_durable(&inv, dispatch_id).await?;
        Ok(match row {
            AnswerRow { error: Some(code), .. } => Answer::Refused(code),
            AnswerRow { release: Some(r), .. } => Answer::Declined(r),
            AnswerRow { acknowledged: true, offer_age_ms, repeated, .. } => {
                Answer::Acknowledged { offer_age_ms, repeated }
            }
            _ => return Err(StoreError::Corrupt(dispatch_id.into(), "unexpected answer")),
        })
    }

    /// A status update from a responder; `Err(code)` when it is not allowed.
    #[allow(clippy::too_many_arguments)] // one per argument of the script's op
    pub async fn status(
        &self,
        rid: &str,
        incident_id: &str,
        status: State,
        note: &str,
        eta_s: Option<u32>,
        policy: &Escalation,
        at: At,
    ) -> Result<std::result::Result<(), String>> {
        let mut inv = self.dispatch_op("status", at);
        inv.arg(rid)
            .arg(incident_id)
            .arg(status.as_str())
            .arg(note)
            .arg(eta_s.map(|e| e.to_string()).unwrap_or_default());
        for ms in policy.on_scene_within_ms {
            inv.arg(ms);
        }
        let row: StatusRow = self.run_json_durable(&inv, incident_id).await?;
        Ok(match row {
            StatusRow { ok: Some(_), .. } => Ok(()),
            StatusRow { error: Some(code), .. } => Err(code),
            _ => Err("not_allowed".into()),
        })
    }

    /// Records what became of an attempt on a channel (`contacted` in the
    /// timeline); a failure moves the chain to the next channel at once.
    pub async fn contacted(&self, attempt: &Attempt, outcome: &Outcome, at: At) -> Result<()> {
        let mut inv = self.dispatch_op("contacted", at);
        let purpose = match attempt.purpose {
            Purpose::Offer => "offer",
            Purpose::Reminder => "reminder",
        };
        inv.arg(&attempt.offer.incident_id)
            .arg(&attempt.offer.dispatch_id)
            .arg(attempt.channel.as_str())
            .arg(outcome.as_str())
            .arg(purpose)
            .arg(if outcome.next_at_once() { "1" } else { "0" });
        self.run::<i64>(&inv).await.map(|_| ())
    }

    /// Whether attempt `a` is still wanted: its offer still stands (for a
    /// reminder: the incident still waits for progress from that responder).
    pub async fn still_wanted(&self, a: &Attempt) -> Result<bool> {
        let mut c = self.conn()?;
        let (state, assigned, dispatch): (Option<String>, Option<String>, Option<String>) = self.counted(
            redis::cmd("HMGET")
                .arg(self.of(Family::Inc, &a.offer.incident_id))
                .arg("state")
                .arg("assigned_to")
                .arg("dispatch_id")
                .query_async(&mut c)
                .await,
        )?;
        let state = state.as_deref().and_then(State::parse);
        let same = assigned.as_deref() == Some(a.offer.responder.as_str())
            && dispatch.as_deref() == Some(a.offer.dispatch_id.as_str());
        Ok(same
            && match a.purpose {
                Purpose::Offer => state == Some(State::Offered),
                Purpose::Reminder => matches!(state, Some(State::Acknowledged | State::EnRoute)),
            })
    }

    /// The incidents currently offered to these responders (None = none).
    pub async fn current_offers(&self, rids: &[String]) -> Result<Vec<Option<String>>> {
        if rids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for r in rids {
            pipe.hget(self.of(Family::Resp, r), "offer");
        }
        let mut c = self.conn()?;
        let v: Vec<Option<String>> = self.counted(pipe.query_async(&mut c).await)?;
        Ok(v.into_iter().map(|o| o.filter(|s| !s.is_empty())).collect())
    }

    /// The offers these incidents stand in now, and the store's time: each
    /// `(incident, responder)` whose incident is still offered to that
    /// responder, with what its `dispatch` frame carries (caller unmasked).
    pub async fn offers_of(&self, pairs: &[(String, String)]) -> Result<(Vec<Offer>, i64)> {
        let mut pipe = redis::pipe();
        pipe.cmd("TIME");
        for (_, id) in pairs {
            pipe.hgetall(self.of(Family::Inc, id));
        }
        let mut c = self.conn()?;
        let (time, recs): ((i64, i64), Vec<HashMap<String, String>>) = {
            let mut v: Vec<redis::Value> = self.counted(pipe.query_async(&mut c).await)?;
            if v.is_empty() {
                return Err(StoreError::Corrupt("TIME".into(), "no answer"));
            }
            let time = Self::decode(v.remove(0))?;
            let recs = v.into_iter().map(Self::decode).collect::<Result<Vec<_>>>()?;
            (time, recs)
        };
        let now = time.0 * 1000 + time.1 / 1000;
        let offers = pairs
            .iter()
            .zip(recs)
            .filter_map(|((rid, id), mut f)| {
                let mut take = |k: &str| f.remove(k).unwrap_or_default();
                if take("state") != State::Offered.as_str() || take("assigned_to") != *rid {
                    return None;
                }
                Some(Offer {
                    incident_id: id.clone(),
                    dispatch_id: take("dispatch_id"),
                    responder: rid.clone(),
                    attempt: take("attempts").parse().unwrap_or(0),
                    severity: Severity::parse(&take("severity"))?,
                    category: take("category"),
                    summary: take("summary"),
                    instructions: take("instructions"),
                    caller: take("caller"),
                    queue: take("queue"),
                    opened_ms: take("opened_ms").parse().unwrap_or(0),
                    ack_by_ms: take("ack_by_ms").parse().unwrap_or(0),
                    major: take("major") == "1",
                })
            })
            .collect();
        Ok((offers, now))
    }

    /// Presence of each of these responders (connected to any daemon), judged
    /// by the store's clock.
    pub async fn presence(&self, rids: &[String]) -> Result<Vec<Presence>> {
        if rids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        pipe.cmd("TIME");
        for r in rids {
            pipe.cmd("HMGET").arg(self.of(Family::Resp, r)).arg("lease").arg("availability");
        }
        let mut c = self.conn()?;
        let mut v: Vec<redis::Value> = self.counted(pipe.query_async(&mut c).await)?;
        if v.is_empty() {
            return Err(StoreError::Corrupt("TIME".into(), "no answer"));
        }
        let (s, us): (i64, i64) = Self::decode(v.remove(0))?;
        let now = s * 1000 + us / 1000;
        let rows: Vec<(Option<String>, Option<String>)> = v.into_iter().map(Self::decode).collect::<Result<_>>()?;
        Ok(rows
            .into_iter()
            .map(|(lease, availability)| Presence {
                connected: lease.and_then(|l| l.parse::<f64>().ok()).is_some_and(|l| l as i64 > now),
                availability: availability.filter(|a| !a.is_empty()),
            })
            .collect())
    }
}
