//! Redis: the only module that talks to it.
//!
//! Keys, all under `redis.prefix`, are named once in [`keys`]; what each holds
//! is described there and in the scripts that change it:
//! `scripts/intake.lua` (opening incidents, call events, the correlation
//! rules), `scripts/dispatch.lua` (presence, offers, answers, deadlines) and
//! `scripts/admin.lua` (resolve and cancel by hand, caller erasure, the
//! retention sweep). Every change that must be atomic is one script
//! operation; the scripts share `scripts/common.lua` and a prelude generated
//! from the Rust types ([`prelude`]).
//!
//! One clock: every operation takes its time as an [`At`] — `At::Server`, the
//! Redis server's `TIME`, read inside the script, so every daemon sharing this
//! Redis judges deadlines and leases alike however skewed its own clock; or
//! `At::Ms`, an explicit time, which the rule tests use. No method here reads
//! the local clock.
//!
//! The connection manager reconnects by itself; every failed command counts in
//! `dispatchd_redis_errors_total` here and nowhere else.

use std::collections::BTreeMap;
use std::time::Duration;

use redis::aio::ConnectionManager;
use std::sync::Arc;

use redis::AsyncCommands;
use serde::de::DeserializeOwned;

use crate::domain::incident::{Incident, ListFilter, Severity, Source, State};
use crate::domain::ivr::IvrPath;
use crate::domain::timeline::{TimelineEntry, timestamp_ms};
use crate::telemetry::metric;

pub mod admin;
pub mod batch;
pub mod dispatch;
pub mod durable;
pub mod intake;
pub mod keys;
pub mod prelude;
pub mod primary;
pub mod pubsub;
pub mod report;

use keys::{Family, Key, Keys};
use prelude::{Library, Script};
use primary::Primary;

/// How long a call key keeps pointing at its incident (re-sends of an INVITE come within this).
const CALL_KEY_TTL_S: u64 = 86_400;
/// How long what intake remembers of a call (caller, queue, IVR path) is kept.
const CALL_STATE_TTL_S: u64 = 6 * 3600;
/// How long an applied call event (SIP MESSAGE, PBX feed delivery) is remembered,
/// so a re-sent one is not applied twice. Re-sends come within seconds.
const DEDUP_TTL_S: u64 = 600;
/// How many records a filtered list reads at most to fill one page.
const LIST_SCAN_MAX: isize = 5_000;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("corrupt record {0}: {1}")]
    Corrupt(String, &'static str),
    #[error("this Redis has no function libraries (FUNCTION LOAD): dispatchd needs Redis 7.0 or later")]
    TooOld,
    #[error("no Redis primary known (the Sentinels are being asked)")]
    NoPrimary,
    #[error("fewer replicas than redis.min_replicas_ack acknowledged the write in time")]
    ReplicasShort,
    #[error("the connection failed during a durable write: {0}")]
    Lost(String),
}

impl StoreError {
    /// True when Redis could not be reached or did not answer (in time): the
    /// same request may succeed later. False for an answer that will not change
    /// on a retry (a script error, an unreadable record).
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Redis(e) => {
                e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || !matches!(e.retry_method(), redis::RetryMethod::NoRetry)
                    // Out of memory, failing to persist, busy with a script: it passes.
                    || matches!(e.code(), Some("OOM" | "MISCONF" | "BUSY" | "LOADING" | "READONLY"))
            }
            StoreError::NoPrimary | StoreError::ReplicasShort | StoreError::Lost(_) => true,
            StoreError::Corrupt(..) | StoreError::TooOld => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// The time an operation happens at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum At {
    /// The Redis server's clock (`TIME`), read when the operation runs.
    Server,
    /// This time, in ms since the epoch (tests; or a time read from Redis before).
    Ms(i64),
}

impl At {
    fn arg(self) -> String {
        match self {
            At::Server => String::new(),
            At::Ms(ms) => ms.to_string(),
        }
    }
}

/// `s` as a literal in a SCAN MATCH pattern.
fn glob_escape(s: &str) -> String {
    s.chars().fold(String::new(), |mut out, c| {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
        out
    })
}

/// The queue orders by this score: severity rank, then opening time in ms
/// (13 digits until the year 2286, so the sum is exact in a double).
pub fn queue_score(severity: Severity, opened_ms: i64) -> String {
    format!("{}{:013}", severity.rank(), opened_ms.max(0))
}

#[derive(Clone)]
pub struct Store {
    primary: Arc<Primary>,
    keys: Keys,
    lib: Arc<Library>,
    /// `(min_replicas_ack, replicas_timeout)` when answers wait for replicas.
    wait: Option<(u32, Duration)>,
    /// The group-commit task of those writes, started on first use.
    durable: Arc<std::sync::OnceLock<durable::Durable>>,
    /// `redis.batch_wait` when openings are batched (the daemon; see [`batch`]).
    batch_wait: Option<Duration>,
    /// The batching task, started on first use.
    batcher: Arc<std::sync::OnceLock<batch::Batcher>>,
}

impl Store {
    /// A store on the one Redis at `url`; the connection is made lazily and
    /// remade after failures.
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<Store> {
        Ok(Store::on(Primary::new(url, &[], "", timeout)?, prefix))
    }

    /// The store `[redis]` describes: one server, or the primary of a
    /// Sentinel-monitored set (then [`Store::primary`]'s `watch` finds it).
    pub fn from_settings(r: &crate::config::RedisSettings) -> Result<Store> {
        let mut store = Store::on(Primary::new(r.url.expose(), &r.sentinels, &r.master_name, r.timeout)?, &r.prefix);
        if r.min_replicas_ack > 0 {
            store.wait = Some((r.min_replicas_ack, r.replicas_timeout));
        }
        store.batch_wait = Some(r.batch_wait);
        Ok(store)
    }

    fn on(primary: Primary, prefix: &str) -> Store {
        Store {
            primary: Arc::new(primary),
            keys: Keys::new(prefix),
            lib: Arc::new(Library::new()),
            wait: None,
            durable: Arc::default(),
            batch_wait: None,
            batcher: Arc::default(),
        }
    }

    /// The task that opens concurrent calls' incidents together, when this
    /// store batches them (started in the current runtime on first use).
    fn batcher(&self) -> Option<&batch::Batcher> {
        let wait = self.batch_wait?;
        // Without replicas to wait for, a batch's cycle is one script call: one
        // batch in Redis at a time lets the next one fill meanwhile. With
        // `min_replicas_ack`, each also waits for the replicas' ack.
        let in_flight = if self.wait.is_some() { batch::IN_FLIGHT_ACKED } else { 1 };
        Some(self.batcher.get_or_init(|| batch::Batcher::start(self.clone(), wait, in_flight)))
    }

    /// Where the primary is (its watcher is run by the daemon).
    pub fn primary(&self) -> &Arc<Primary> {
        &self.primary
    }

    fn key(&self, k: Key) -> String {
        self.keys.key(k)
    }

    fn of(&self, f: Family, id: &str) -> String {
        self.keys.of(f, id)
    }

    /// A command's result: a failure counts, and one a failover explains
    /// sends the store looking for the primary again.
    fn counted<T>(&self, r: std::result::Result<T, redis::RedisError>) -> Result<T> {
        r.map_err(|e| {
            metrics::counter!(metric::REDIS_ERRORS).increment(1);
            self.primary.saw(&e);
            StoreError::Redis(e)
        })
    }

    /// The connection to the primary in use.
    fn conn(&self) -> Result<ConnectionManager> {
        self.primary.node().map(|n| n.conn.clone()).ok_or(StoreError::NoPrimary)
    }

    /// One value of a pipeline's answer, decoded.
    fn decode<T: redis::FromRedisValue>(v: redis::Value) -> Result<T> {
        redis::from_redis_value(v).map_err(|e| {
            metrics::counter!(metric::REDIS_ERRORS).increment(1);
            StoreError::Redis(redis::RedisError::from(e))
        })
    }

    /// A call of `script`'s operation `op` at `at`; the op's own arguments follow.
    fn op(&self, script: Script, op: &str, at: At) -> redis::Cmd {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(self.lib.function(script)).arg(0).arg(op).arg(self.keys.prefix()).arg(at.arg());
        cmd
    }

    /// Runs a call of the library, loading the library first when this Redis
    /// does not have it (a new server, a flushed one, another version's).
    async fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T> {
        let mut c = self.conn()?;
        match cmd.query_async(&mut c).await {
            Err(e) if e.to_string().contains("Function not found") => {
                self.load_library().await?;
                self.counted(cmd.query_async(&mut c).await)
            }
            r => self.counted(r),
        }
    }

    /// Runs an operation whose answer is a JSON object, decoded as `T`.
    async fn run_json<T: DeserializeOwned>(&self, cmd: &redis::Cmd, what: &str) -> Result<T> {
        let text: String = self.run(cmd).await?;
        serde_json::from_str(&text).map_err(|_| StoreError::Corrupt(what.to_string(), "unexpected script answer"))
    }

    /// Runs a write an answer will promise: with `min_replicas_ack`, only
    /// `Ok` once that many replicas have it (see [`durable`]).
    async fn run_durable<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T> {
        let Some((replicas, timeout)) = self.wait else { return self.run(cmd).await };
        let d = self.durable.get_or_init(|| durable::Durable::start(self.primary.clone(), replicas, timeout));
        let v = match d.run(cmd.clone()).await {
            Err(StoreError::Redis(e)) if e.to_string().contains("Function not found") => {
                self.load_library().await?;
                d.run(cmd.clone()).await?
            }
            r => r?,
        };
        Self::decode(v)
    }

    /// [`Store::run_durable`] for an operation answering a JSON object.
    async fn run_json_durable<T: DeserializeOwned>(&self, cmd: &redis::Cmd, what: &str) -> Result<T> {
        let text: String = self.run_durable(cmd).await?;
        serde_json::from_str(&text).map_err(|_| StoreError::Corrupt(what.to_string(), "unexpected script answer"))
    }

    /// Loads the scripts into Redis (at startup; again whenever a call finds
    /// them missing). Redis 7.0 or later is needed for function libraries.
    pub async fn load_library(&self) -> Result<()> {
        let mut c = self.conn()?;
        let mut load = redis::cmd("FUNCTION");
        load.arg("LOAD").arg("REPLACE").arg(&self.lib.code);
        match load.query_async::<String>(&mut c).await {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().to_ascii_lowercase().contains("unknown command") => Err(StoreError::TooOld),
            Err(e) => self.counted(Err(e)),
        }
    }

    /// Moves a deployment's keys from the layout before the hash tag
    /// (`<prefix>:…`) to `{<prefix>}:…`, once: when the old layout has an
    /// incident counter and the new one has none. Under a lock, so one daemon
    /// moves them while the others wait; the counter moves last, so its
    /// presence in the new layout means the move is complete (a move cut off
    /// half-way is finished by the next start). Returns the keys moved.
    pub async fn migrate_layout(&self) -> Result<u64> {
        let mut c = self.conn()?;
        let (old_seq, new_seq) = (format!("{}:seq", self.keys.bare()), self.key(Key::Seq));
        let lock = format!("{}:migrating", self.keys.prefix());
        let mut moved = 0u64;
        loop {
            let (old, new): (bool, bool) =
                self.counted(redis::pipe().exists(&old_seq).exists(&new_seq).query_async(&mut c).await)?;
            if !old || new {
                return Ok(moved);
            }
            let mine: Option<String> = self.counted(
                redis::cmd("SET").arg(&lock).arg("1").arg("NX").arg("PX").arg(60_000).query_async(&mut c).await,
            )?;
            if mine.is_none() {
                // Another daemon is moving them: wait for the counter to arrive.
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            let pattern = format!("{}:*", glob_escape(self.keys.bare()));
            let mut cursor: u64 = 0;
            loop {
                let (next, batch): (u64, Vec<String>) = self.counted(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut c)
                        .await,
                )?;
                let mut pipe = redis::pipe();
                for k in batch.iter().filter(|k| **k != old_seq) {
                    let to = format!("{}{}", self.keys.prefix(), &k[self.keys.bare().len()..]);
                    pipe.cmd("RENAMENX").arg(k).arg(to).ignore();
                    moved += 1;
                }
                self.counted(pipe.query_async::<()>(&mut c).await)?;
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
            let _: i64 = self.counted(redis::cmd("RENAMENX").arg(&old_seq).arg(&new_seq).query_async(&mut c).await)?;
            let _: i64 = self.counted(redis::cmd("DEL").arg(&lock).query_async(&mut c).await)?;
            moved += 1;
            tracing::warn!(keys = moved, from = %format!("{}:", self.keys.bare()), to = %format!("{}:", self.keys.prefix()), "moved the keys to the hash-tagged layout");
        }
    }

    /// Whether Redis answers right now.
    pub async fn ping(&self) -> Result<()> {
        let mut c = self.conn()?;
        self.counted(redis::cmd("PING").query_async::<String>(&mut c).await).map(|_| ())
    }

    /// The Redis server's clock, ms since the epoch.
    pub async fn server_ms(&self) -> Result<i64> {
        let mut c = self.conn()?;
        let (s, us): (i64, i64) = self.counted(redis::cmd("TIME").query_async(&mut c).await)?;
        Ok(s * 1000 + us / 1000)
    }

    /// One incident with its timeline.
    pub async fn get(&self, id: &str) -> Result<Option<Incident>> {
        let mut c = self.conn()?;
        type Parts = (Vec<(String, String)>, Vec<String>, Vec<String>, Vec<String>, BTreeMap<String, u64>);
        let (fields, tl, mut members, mut related, omitted): Parts = self.counted(
            redis::pipe()
                .hgetall(self.of(Family::Inc, id))
                .lrange(self.of(Family::Timeline, id), 0, -1)
                .smembers(self.of(Family::Members, id))
                .smembers(self.of(Family::Related, id))
                .hgetall(self.of(Family::Omitted, id))
                .query_async(&mut c)
                .await,
        )?;
        if fields.is_empty() {
            return Ok(None);
        }
        let mut inc = record(id, fields)?;
        members.sort();
        inc.members = members;
        related.sort();
        inc.related = related;
        inc.timeline_omitted = omitted;
        let timeline = tl
            .iter()
            .map(|t| serde_json::from_str(t).map_err(|_| StoreError::Corrupt(id.to_string(), "timeline entry")))
            .collect::<Result<Vec<TimelineEntry>>>()?;
        inc.timeline = Some(timeline);
        Ok(Some(inc))
    }

    /// Newest first, without timelines.
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<Incident>> {
        let limit = filter.limit.clamp(1, 500);
        let mut c = self.conn()?;
        let mut out = Vec::new();
        let page: isize = 200;
        let mut start: isize = 0;
        while out.len() < limit && start < LIST_SCAN_MAX {
            let ids: Vec<String> =
                self.counted(c.zrevrange(self.key(Key::Incidents), start, start + page - 1).await)?;
            if ids.is_empty() {
                break;
            }
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.hgetall(self.of(Family::Inc, id));
            }
            let recs: Vec<Vec<(String, String)>> = self.counted(pipe.query_async(&mut c).await)?;
            for (id, fields) in ids.iter().zip(recs) {
                if fields.is_empty() {
                    continue; // expired record
                }
                let inc = record(id, fields)?;
                if filter.state.is_some_and(|s| s != inc.state) || filter.severity.is_some_and(|s| s != inc.severity) {
                    continue;
                }
                out.push(inc);
                if out.len() == limit {
                    break;
                }
            }
            start += page;
        }
        Ok(out)
    }

    /// Waiting incidents per severity (for `dispatchd_queue_depth`).
    pub async fn queue_depths(&self) -> Result<Vec<(Severity, u64)>> {
        let mut c = self.conn()?;
        let key = self.key(Key::Queue);
        let mut pipe = redis::pipe();
        for s in Severity::ALL {
            // Scores of one severity lie in [rank·10¹³, (rank+1)·10¹³).
            let lo = queue_score(s, 0);
            let hi = format!("({}", u64::from(s.rank() + 1) * 10_000_000_000_000);
            pipe.zcount(&key, lo, hi);
        }
        let counts: Vec<u64> = self.counted(pipe.query_async(&mut c).await)?;
        Ok(Severity::ALL.into_iter().zip(counts).collect())
    }
}

/// Reads a list a script answered: cjson writes an empty one as `{}`.
fn seq<'de, D: serde::Deserializer<'de>, T: serde::Deserialize<'de>>(d: D) -> std::result::Result<Vec<T>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Either<T> {
        List(Vec<T>),
        Empty(serde::de::IgnoredAny),
    }
    Ok(match Either::deserialize(d)? {
        Either::List(v) => v,
        Either::Empty(_) => Vec::new(),
    })
}
use serde::Deserialize as _;

/// Builds an [`Incident`] from its hash fields.
fn record(id: &str, fields: Vec<(String, String)>) -> Result<Incident> {
    let corrupt = |what| StoreError::Corrupt(id.to_string(), what);
    let mut inc = Incident {
        id: id.to_string(),
        state: State::Queued,
        severity: Severity::Medium,
        category: String::new(),
        summary: String::new(),
        source: Source::Sip,
        call_id: String::new(),
        caller: String::new(),
        caller_name: String::new(),
        ivr_path: Vec::new(),
        queue: String::new(),
        wait_seconds: None,
        opened_at: String::new(),
        assigned_to: None,
        attempts: 0,
        exhausted: false,
        major: false,
        major_incident: None,
        members: Vec::new(),
        repeat_calls: 0,
        related: Vec::new(),
        timeline: None,
        timeline_omitted: BTreeMap::new(),
    };
    for (k, v) in fields {
        match k.as_str() {
            "state" => inc.state = State::parse(&v).ok_or_else(|| corrupt("state"))?,
            "severity" => inc.severity = Severity::parse(&v).ok_or_else(|| corrupt("severity"))?,
            "category" => inc.category = v,
            "summary" => inc.summary = v,
            "source" => inc.source = Source::parse(&v).ok_or_else(|| corrupt("source"))?,
            "call_id" => inc.call_id = v,
            "caller" => inc.caller = v,
            "caller_name" => inc.caller_name = v,
            "ivr_path" => inc.ivr_path = IvrPath::lenient(&v).into_vec(),
            "queue" => inc.queue = v,
            "wait_seconds" => inc.wait_seconds = v.parse().ok(),
            "opened_ms" => inc.opened_at = timestamp_ms(v.parse().map_err(|_| corrupt("opened_ms"))?),
            "assigned_to" if !v.is_empty() => inc.assigned_to = Some(v),
            "attempts" => inc.attempts = v.parse().unwrap_or(0),
            "exhausted" => inc.exhausted = v == "1",
            "major" => inc.major = v == "1",
            "major_incident" if !v.is_empty() => inc.major_incident = Some(v),
            "repeat_calls" => inc.repeat_calls = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    Ok(inc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unavailable_is_told_from_an_answer_that_will_not_change() {
        let refused: redis::RedisError = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused").into();
        assert!(StoreError::Redis(refused).is_unavailable());
        let loading: redis::RedisError =
            (redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading), "loading").into();
        assert!(StoreError::Redis(loading).is_unavailable());
        let script: redis::RedisError =
            (redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError), "user_script:1: bad").into();
        assert!(!StoreError::Redis(script).is_unavailable());
        assert!(!StoreError::Corrupt("INC-1".into(), "state").is_unavailable());
    }

    #[test]
    fn glob_patterns_take_a_prefix_literally() {
        assert_eq!(glob_escape("dispatchd"), "dispatchd");
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }

    #[test]
    fn queue_score_orders_severity_then_age() {
        let a = queue_score(Severity::Critical, 1_800_000_000_000);
        let b = queue_score(Severity::High, 1_000_000_000_000);
        let c = queue_score(Severity::High, 1_000_000_000_001);
        let (a, b, c): (f64, f64, f64) = (a.parse().unwrap(), b.parse().unwrap(), c.parse().unwrap());
        assert!(a < b && b < c);
        assert_eq!(c - b, 1.0, "exact in a double");
    }

    #[test]
    fn script_lists_read_empty_objects_as_empty() {
        #[derive(serde::Deserialize)]
        struct T {
            #[serde(deserialize_with = "seq")]
            v: Vec<u32>,
        }
        assert!(serde_json::from_str::<T>(r#"{"v":{}}"#).unwrap().v.is_empty());
        assert_eq!(serde_json::from_str::<T>(r#"{"v":[1,2]}"#).unwrap().v, [1, 2]);
    }
}
