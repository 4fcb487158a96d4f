//! The administration half of the store: incidents resolved or cancelled by
//! hand, caller erasure and retention — each change one operation of
//! `scripts/admin.lua`, atomic in Redis.

use std::time::Duration;

use serde::Deserialize;

use super::keys::{Family, Key};
use super::prelude::Script;
use super::{At, Result, Store, StoreError};
use crate::domain::dispatch::Release;
use crate::domain::incident::State;

/// How many records the erasure reads, newest first, looking for a number
/// the caller index does not know (records opened before it existed).
const ERASE_SCAN_MAX: isize = 100_000;
/// Incidents one sweep step handles, and steps per sweep.
const SWEEP_BATCH: usize = 500;
const SWEEP_STEPS: usize = 20;

/// What became of a resolve or cancel.
#[derive(Debug, Clone, PartialEq)]
pub enum Closed {
    /// Done. `held`: the responder it was offered to or in the hands of, now free.
    Done {
        held: Option<Release>,
    },
    NotFound,
    /// Already resolved or cancelled.
    Conflict,
}

#[derive(Deserialize)]
struct CloseRow {
    #[serde(default)]
    ok: bool,
    #[serde(default)]
    held: Option<Release>,
    #[serde(default)]
    error: Option<String>,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Store {
    /// Resolves or cancels an incident by hand: out of the queue and its
    /// deadline, its responder (if any) freed, and its record set to expire
    /// `retention` from now.
    pub async fn close(&self, id: &str, to: State, note: &str, retention: Duration, at: At) -> Result<Closed> {
        if !to.is_closed() {
            return Err(StoreError::Corrupt(id.into(), "close to an open state"));
        }
        let mut inv = self.op(Script::Admin, "close", at);
        inv.arg(id).arg(to.as_str()).arg(note).arg(millis(retention));
        let row: CloseRow = self.run_json(&inv, id).await?;
        Ok(match row {
            CloseRow { ok: true, held, .. } => Closed::Done { held: held.filter(|h| !h.responder.is_empty()) },
            CloseRow { error: Some(e), .. } if e == "not_found" => Closed::NotFound,
            CloseRow { error: Some(e), .. } if e == "conflict" => Closed::Conflict,
            _ => return Err(StoreError::Corrupt(id.into(), "unexpected close result")),
        })
    }

    /// Erases a caller's number and name from every record that has it
    /// (found through the index by pseudonym, and by reading the newest
    /// records). Returns how many records changed.
    pub async fn erase_caller(&self, number: &str, pseudonym: &str, at: At) -> Result<u64> {
        let mut c = self.conn()?;
        let mut found = Vec::new();
        let page: isize = 1000;
        let mut start: isize = 0;
        while start < ERASE_SCAN_MAX {
            let ids: Vec<String> = self.counted(
                redis::cmd("ZREVRANGE")
                    .arg(self.key(Key::Incidents))
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
                pipe.hget(self.of(Family::Inc, id), "caller");
            }
            let callers: Vec<Option<String>> = self.counted(pipe.query_async(&mut c).await)?;
            found.extend(ids.into_iter().zip(callers).filter(|(_, n)| n.as_deref() == Some(number)).map(|(id, _)| id));
            start += page;
        }
        let mut inv = self.op(Script::Admin, "erase", at);
        inv.arg(number).arg(pseudonym);
        for id in &found {
            inv.arg(id);
        }
        self.run(&inv).await
    }

    /// The retention sweep, to run every minute or so: records closed more
    /// than `retention` ago are removed (with their place in the incident
    /// list), and records closed without an expiry (resolved by a responder)
    /// get one. Returns how many records were removed.
    pub async fn expire_closed(&self, retention: Duration) -> Result<u64> {
        self.sweep(retention, At::Server).await
    }

    /// [`Store::expire_closed`] at a given time.
    pub async fn sweep(&self, retention: Duration, at: At) -> Result<u64> {
        let mut removed = 0;
        for _ in 0..SWEEP_STEPS {
            let mut inv = self.op(Script::Admin, "sweep", at);
            inv.arg(millis(retention)).arg(SWEEP_BATCH);
            let (gone, _set, more): (u64, u64, u64) = self.run(&inv).await?;
            removed += gone;
            if more == 0 {
                break;
            }
        }
        Ok(removed)
    }
}
