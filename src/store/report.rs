//! Reading incidents for the report (`GET /v1/report`, `dispatchd report`).

use redis::AsyncCommands;

use super::keys::{Family, Key};
use super::{Result, Store};
use crate::domain::incident::Severity;
use crate::domain::timeline::TimelineEntry;
use crate::report::Facts;

/// Incidents read per pipelined round trip.
const BATCH: usize = 200;

impl Store {
    /// The incidents opened in `[since_ms, until_ms)` (by `p:incidents`), oldest
    /// first, with their timelines; records that have expired are skipped.
    pub async fn report_facts(&self, since_ms: i64, until_ms: i64) -> Result<Vec<Facts>> {
        let mut c = self.conn()?;
        let ids: Vec<String> =
            self.counted(c.zrangebyscore(self.key(Key::Incidents), since_ms, format!("({until_ms}")).await)?;
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(BATCH) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.cmd("HMGET").arg(self.of(Family::Inc, id)).arg(&["severity", "category", "opened_ms"]);
                pipe.lrange(self.of(Family::Timeline, id), 0, -1);
            }
            // HMGET and LRANGE both answer arrays of (nil or) strings.
            let replies: Vec<Vec<Option<String>>> = self.counted(pipe.query_async(&mut c).await)?;
            for (id, pair) in chunk.iter().zip(replies.chunks(2)) {
                let [fields, timeline] = pair else { continue };
                let (Some(Some(severity)), Some(category), Some(Some(opened))) =
                    (fields.first(), fields.get(1), fields.get(2))
                else {
                    continue; // expired (or never written): not in the report
                };
                let (Some(severity), Ok(opened_ms)) = (Severity::parse(severity), opened.parse::<i64>()) else {
                    tracing::warn!(incident_id = %id, "record left out of the report: bad severity or opened_ms");
                    continue;
                };
                let timeline: Vec<TimelineEntry> =
                    timeline.iter().flatten().filter_map(|t| serde_json::from_str(t).ok()).collect();
                out.push(Facts {
                    id: id.clone(),
                    severity,
                    category: category.clone().unwrap_or_default(),
                    opened_ms,
                    timeline,
                });
            }
        }
        Ok(out)
    }
}
