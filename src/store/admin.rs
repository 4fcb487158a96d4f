//! The administration half of the store: incidents resolved or cancelled by
//! hand, caller erasure, retention, and the roster's presence — each change
//! one operation of `scripts/dispatch.lua`, atomic in Redis.

use std::time::Duration;

use chrono::Utc;

use super::{Result, Store, StoreError};
use crate::incident::State;

/// How many records the erasure reads, newest first, looking for a number
/// the caller index does not know (records opened before it existed).
const ERASE_SCAN_MAX: isize = 100_000;
/// Incidents one sweep step handles, and steps per sweep.
const SWEEP_BATCH: usize = 500;
const SWEEP_STEPS: usize = 20;

/// What became of a resolve or cancel.
#[derive(Debug, Clone, PartialEq)]
pub enum Closed {
    /// Done. `held` is the responder it was offered to or in the hands of,
    /// now free: (responder, dispatch id, its daemon).
    Done {
        held: Option<(String, String, String)>,
    },
    NotFound,
    /// Already resolved or cancelled.
    Conflict,
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
    /// Resolves or cancels an incident by hand: out of the queue and its
    /// deadline, its responder (if any) freed, and its record set to expire
    /// `retention` from now.
    pub async fn close(&self, id: &str, to: State, note: &str, retention: Duration) -> Result<Closed> {
        if !matches!(to, State::Resolved | State::Cancelled) {
            return Err(StoreError::Corrupt(id.into(), "close to an open state"));
        }
        let mut inv = self.dispatch_op("close", Utc::now());
        inv.arg(id).arg(to.as_str()).arg(note).arg(retention.as_millis().max(1) as u64);
        let mut c = self.conn.clone();
        let row: Vec<String> = Self::counted(inv.invoke_async(&mut c).await)?;
        Ok(match row.as_slice() {
            [k, rid, dispatch_id, daemon] if k == "ok" => {
                Closed::Done { held: (!rid.is_empty()).then(|| (rid.clone(), dispatch_id.clone(), daemon.clone())) }
            }
            [_, code] if code == "not_found" => Closed::NotFound,
            [_, code] if code == "conflict" => Closed::Conflict,
            _ => return Err(StoreError::Corrupt(id.into(), "unexpected close result")),
        })
    }

    /// Erases a caller's number and name from every record that has it
    /// (found through the index by pseudonym, and by reading the newest
    /// records). Returns how many records changed.
    pub async fn erase_caller(&self, number: &str, pseudonym: &str) -> Result<u64> {
        let mut c = self.conn.clone();
        let mut found = Vec::new();
        let page: isize = 1000;
        let mut start: isize = 0;
        while start < ERASE_SCAN_MAX {
            let ids: Vec<String> = Self::counted(
                redis::cmd("ZREVRANGE")
                    .arg(self.key(&["incidents"]))
                    .arg(start)
                    .arg(start + page - 1)
                    .query_async(&mut c)
                    .await,
            )?;
            if ids.is_empty() {
                break;
            }
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.hget(self.key(&["inc", id]), "caller");
            }
            let callers: Vec<Option<String>> = Self::counted(pipe.query_async(&mut c).await)?;
            found.extend(ids.into_iter().zip(callers).filter(|(_, n)| n.as_deref() == Some(number)).map(|(id, _)| id));
            start += page;
        }
        let mut inv = self.dispatch_op("erase", Utc::now());
        inv.arg(number).arg(pseudonym);
        for id in &found {
            inv.arg(id);
        }
        Self::counted(inv.invoke_async(&mut c).await)
    }

    /// The retention sweep, to run every minute or so: records closed more
    /// than `retention` ago are removed (with their place in the incident
    /// list), and records closed without an expiry (resolved by a responder)
    /// get one. Returns how many records were removed.
    pub async fn expire_closed(&self, retention: Duration) -> Result<u64> {
        let mut c = self.conn.clone();
        let mut removed = 0;
        for _ in 0..SWEEP_STEPS {
            let mut inv = self.dispatch_op("sweep", Utc::now());
            inv.arg(retention.as_millis().max(1) as u64).arg(SWEEP_BATCH);
            let (gone, _set, more): (u64, u64, u64) = Self::counted(inv.invoke_async(&mut c).await)?;
            removed += gone;
            if more == 0 {
                break;
            }
        }
        Ok(removed)
    }

    /// Presence of each of these responders (connected to any daemon).
    pub async fn presence(&self, rids: &[String]) -> Result<Vec<Presence>> {
        if rids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for r in rids {
            pipe.cmd("HMGET").arg(self.key(&["resp", r])).arg("lease").arg("availability");
        }
        let mut c = self.conn.clone();
        let rows: Vec<(Option<String>, Option<String>)> = Self::counted(pipe.query_async(&mut c).await)?;
        let now = Utc::now().timestamp_millis();
        Ok(rows
            .into_iter()
            .map(|(lease, availability)| Presence {
                connected: lease.and_then(|l| l.parse::<f64>().ok()).is_some_and(|l| l as i64 > now),
                availability: availability.filter(|a| !a.is_empty()),
            })
            .collect())
    }
}
