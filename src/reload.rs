//! SIGHUP: read the configuration file again and apply what can change
//! without a restart — the IVR map, the roster, and the settings the API
//! reads — without dropping a call or a websocket.
//!
//! - An invalid file is refused: an `error` line names the key, and nothing
//!   changes.
//! - Settings bound at startup (listen addresses, Redis, SIP behaviour,
//!   heartbeats, escalation policy, the admin token, the caller key, logging)
//!   keep their old values; a `warn` line names each one that changed and
//!   needs a restart.
//! - Around it systemd hears `RELOADING=1` (with `MONOTONIC_USEC`) and `READY=1`.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::signal::unix::Signal;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::{ResponderConfig, Settings};
use crate::dispatcher::Dispatch;
use crate::dispatcher::RosterRow;
use crate::intake::Intake;
use crate::responders::Roster;
use crate::responders::Sessions;
use crate::systemd;
use crate::tls::Tls;

/// What a reload will put in force, worked out from the old and the new settings.
#[derive(Debug)]
pub struct Plan {
    /// The settings in force afterwards: the new file, except the
    /// restart-only settings, which keep their old values.
    pub settings: Settings,
    /// Restart-only keys whose value changed in the file (kept as they were).
    pub needs_restart: Vec<&'static str>,
    pub responders_added: Vec<String>,
    pub responders_removed: Vec<String>,
    /// Same id, another tier, skills, name or token.
    pub responders_changed: Vec<String>,
    pub ivr_rules_before: usize,
    pub ivr_rules_after: usize,
    /// `[[ivr]]`, `[ivr_default]` or `[categories]` differ.
    pub ivr_changed: bool,
}

fn differs<T: Debug>(a: &T, b: &T) -> bool {
    format!("{a:?}") != format!("{b:?}")
}

/// The restart-only keys that differ between `old` and `new`.
fn restart_only_changes(old: &Settings, new: &Settings) -> Vec<&'static str> {
    let mut keys = Vec::new();
    let mut check = |key: &'static str, changed: bool| {
        if changed {
            keys.push(key);
        }
    };
    let (o, n) = (&old.sip, &new.sip);
    check("sip.udp", o.udp != n.udp);
    check("sip.tcp", o.tcp != n.tcp);
    check("sip.allow", o.allow != n.allow);
    check("sip.mode", o.mode != n.mode);
    check("sip.decline_status", o.decline_status != n.decline_status);
    check("sip.max_ring", o.max_ring != n.max_ring);
    check("sip.tcp_max_connections", o.tcp_max_connections != n.tcp_max_connections);
    check("sip.tcp_idle_timeout", o.tcp_idle_timeout != n.tcp_idle_timeout);
    check("sip.max_inflight", o.max_inflight != n.max_inflight);
    check("sip.retry_after_s", o.retry_after_s != n.retry_after_s);
    check("sip.udp_recv_buffer", o.udp_recv_buffer != n.udp_recv_buffer);
    check("sip.tls", o.tls != n.tls);
    check("sip.rate_limit", o.rate_limit != n.rate_limit);
    let (o, n) = (&old.redis, &new.redis);
    check("redis.url", o.url.expose() != n.url.expose());
    check("redis.prefix", o.prefix != n.prefix);
    check("redis.timeout", o.timeout != n.timeout);
    check("responders.listen", old.responders.listen != new.responders.listen);
    check("responders.heartbeat", old.responders.heartbeat != new.responders.heartbeat);
    check("http.listen", old.http.listen != new.http.listen);
    check("http.admin_token_sha256", old.http.admin_token_sha256 != new.http.admin_token_sha256);
    check("privacy.caller_key", old.privacy.caller_key.expose() != new.privacy.caller_key.expose());
    check("log.format", old.log.format != new.log.format);
    check("log.level", old.log.level != new.log.level);
    check("runtime.worker_threads", old.runtime.worker_threads != new.runtime.worker_threads);
    let (o, n) = (&old.escalation, &new.escalation);
    check("escalation.critical", differs(&o.critical, &n.critical));
    check("escalation.high", differs(&o.high, &n.high));
    check("escalation.medium", differs(&o.medium, &n.medium));
    check("escalation.low", differs(&o.low, &n.low));
    // Keys added to these sections later are kept too; name the section.
    for (section, changed) in [
        ("sip", differs(&old.sip, &new.sip)),
        ("redis", differs(&old.redis, &new.redis)),
        ("responders", differs(&old.responders, &new.responders)),
        ("http", differs(&old.http, &new.http)),
        ("log", differs(&old.log, &new.log)),
        // The feeds connect at start-up.
        ("acd", differs(&old.acd, &new.acd)),
        // Where the certificate and key are read from (the files themselves are read again).
        ("tls", differs(&old.tls, &new.tls)),
        // The channels' timings, order and secret.
        (
            "fallback",
            differs(&old.fallback, &new.fallback) || old.fallback.webhook_secret != new.fallback.webhook_secret,
        ),
    ] {
        if changed && !keys.iter().any(|k| k.starts_with(section) && k.as_bytes().get(section.len()) == Some(&b'.')) {
            keys.push(section);
        }
    }
    keys
}

fn roster_map(r: &[ResponderConfig]) -> BTreeMap<&str, &ResponderConfig> {
    r.iter().map(|c| (c.id.as_str(), c)).collect()
}

impl Plan {
    pub fn new(old: &Settings, new: Settings) -> Plan {
        let needs_restart = restart_only_changes(old, &new);
        let mut settings = new;
        settings.sip = old.sip.clone();
        settings.redis = old.redis.clone();
        settings.responders = old.responders.clone();
        settings.http = old.http.clone();
        settings.privacy.caller_key = old.privacy.caller_key.clone();
        settings.log = old.log.clone();
        settings.acd = old.acd.clone();
        settings.tls = old.tls.clone();
        settings.fallback = old.fallback.clone();
        settings.escalation = old.escalation.clone();

        let (before, after) = (roster_map(&old.roster), roster_map(&settings.roster));
        let responders_added = after.keys().filter(|k| !before.contains_key(*k)).map(|k| k.to_string()).collect();
        let responders_removed = before.keys().filter(|k| !after.contains_key(*k)).map(|k| k.to_string()).collect();
        let responders_changed = after
            .iter()
            .filter(|(k, a)| {
                before.get(*k).is_some_and(|b| {
                    b.tier != a.tier
                        || b.skills != a.skills
                        || b.name != a.name
                        || b.token_sha256 != a.token_sha256
                        || b.phone != a.phone
                        || b.sip_uri != a.sip_uri
                        || b.webhook != a.webhook
                })
            })
            .map(|(k, _)| k.to_string())
            .collect();
        let ivr_changed = differs(&old.ivr, &settings.ivr)
            || differs(&old.ivr_default, &settings.ivr_default)
            || old.categories != settings.categories;
        Plan {
            needs_restart,
            responders_added,
            responders_removed,
            responders_changed,
            ivr_rules_before: old.ivr.len(),
            ivr_rules_after: settings.ivr.len(),
            ivr_changed,
            settings,
        }
    }

    fn roster_changed(&self) -> bool {
        !(self.responders_added.is_empty() && self.responders_removed.is_empty() && self.responders_changed.is_empty())
    }
}

/// The parts of the running daemon a reload replaces.
pub struct Reloader {
    pub config_path: Option<PathBuf>,
    pub intake: Arc<Intake>,
    /// Read by responder sessions when they authenticate.
    pub roster: Arc<RwLock<Roster>>,
    /// The settings in force, as the API reads them (and the drain at shutdown).
    pub settings: Arc<RwLock<Arc<Settings>>>,
    /// Where the roster is written (for the matcher).
    pub dispatch: Arc<Dispatch>,
    /// The responders connected here.
    pub sessions: Arc<Sessions>,
    /// The TLS configuration of the listeners, read again on every reload.
    pub tls: Option<Arc<Tls>>,
    /// Bumped on every applied reload, so an older roster retry gives up.
    generation: Arc<std::sync::atomic::AtomicU64>,
}

/// The roster as `Dispatch::sync_roster` takes it.
pub fn roster_rows(settings: &Settings) -> Vec<RosterRow> {
    settings
        .roster
        .iter()
        .map(|r| RosterRow {
            id: r.id.clone(),
            tier: r.tier,
            skills: r.skills.clone(),
            channels: r.channels(&settings.fallback.order),
        })
        .collect()
}

/// A one-line summary for systemd's `STATUS=`.
pub fn status_line(settings: &Settings) -> String {
    format!(
        "ready: {} responders in the roster, {} IVR rules, sip mode {}",
        settings.roster.len(),
        settings.ivr.len(),
        settings.sip.mode.as_str()
    )
}

impl Reloader {
    pub fn new(
        config_path: Option<PathBuf>,
        intake: Arc<Intake>,
        roster: Arc<RwLock<Roster>>,
        settings: Arc<RwLock<Arc<Settings>>>,
        dispatch: Arc<Dispatch>,
        sessions: Arc<Sessions>,
        tls: Option<Arc<Tls>>,
    ) -> Reloader {
        Reloader { config_path, intake, roster, settings, dispatch, sessions, tls, generation: Arc::default() }
    }

    /// The settings in force.
    pub fn current(&self) -> Arc<Settings> {
        match self.settings.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Reloads on every SIGHUP until shutdown.
    pub async fn run(self, mut hangups: Signal, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                s = hangups.recv() => if s.is_none() { return },
            }
            if shutdown.is_cancelled() {
                return;
            }
            tracing::info!(signal = "SIGHUP", "reloading the configuration");
            systemd::reloading();
            let applied = self.reload(&shutdown).await;
            let current = self.current();
            let status = if applied {
                status_line(&current)
            } else {
                format!("{} (last reload refused: invalid configuration)", status_line(&current))
            };
            systemd::ready(&status);
        }
    }

    /// Loads, validates and applies the file. False when it was refused.
    pub async fn reload(&self, shutdown: &CancellationToken) -> bool {
        let path = self.config_path.clone();
        let loaded = tokio::task::spawn_blocking(move || crate::config::load(path.as_deref())).await;
        let new = match loaded {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::error!(
                    key = %e.key,
                    error = %e.message,
                    config = ?self.config_path,
                    "configuration reload refused: {e}; the configuration in force is unchanged"
                );
                return false;
            }
            Err(e) => {
                tracing::error!(error = %e, "configuration reload failed; the configuration in force is unchanged");
                return false;
            }
        };
        let old = self.current();
        let plan = Plan::new(&old, new);
        self.apply(plan, shutdown).await;
        true
    }

    async fn apply(&self, plan: Plan, shutdown: &CancellationToken) {
        for key in &plan.needs_restart {
            tracing::warn!(key = %key, "changed in the configuration file, but takes effect only after a restart; the old value stays in force");
        }
        let settings = Arc::new(plan.settings.clone());

        // The IVR map: calls classified from now on use the new one; calls
        // already being stored keep the map they started with.
        self.intake.reconfigure(&settings);
        // The responders' phones, SIP URIs and webhooks.
        self.dispatch.reach.set_roster(&settings);
        // The certificate and key: new handshakes use them, open connections keep theirs.
        if let Some(tls) = &self.tls {
            match tls.reload() {
                Ok(()) => tracing::info!("TLS certificate and key read again"),
                Err(e) => {
                    tracing::error!(key = e.key, error = %e.message, "TLS files not reloaded; the old certificate stays")
                }
            }
        }
        // Tokens: checked when a responder connects; an open connection whose
        // token the new roster no longer gives to that responder is closed (4401).
        let roster = Roster::new(&settings.roster);
        for rid in self.sessions.revoke(&roster) {
            tracing::warn!(responder = %rid, "token revoked by the reload: closing its connection");
        }
        match self.roster.write() {
            Ok(mut r) => *r = roster,
            Err(p) => *p.into_inner() = roster,
        }
        match self.settings.write() {
            Ok(mut s) => *s = settings.clone(),
            Err(p) => *p.into_inner() = settings.clone(),
        }
        // Tiers and skills live in Redis, where the dispatch rules read them:
        // written now, or retried in the background while Redis is away.
        if plan.roster_changed() {
            let generation = self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            let rows = roster_rows(&settings);
            match self.dispatch.sync_roster(&rows).await {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "roster not written to Redis yet; retrying in the background");
                    tokio::spawn(sync_roster(
                        self.dispatch.clone(),
                        rows,
                        self.generation.clone(),
                        generation,
                        shutdown.clone(),
                    ));
                }
            }
        }
        // Out of the roster: no more offers (the Lua rules check the roster)
        // and no new connections. An open connection stays until it closes.
        for rid in plan.responders_removed.iter().filter(|r| self.sessions.is_connected(r)) {
            tracing::info!(responder = %rid, "removed from the roster while connected: closing its connection");
            self.sessions.close(rid, 4403, "removed from roster");
        }
        tracing::info!(
            ivr_rules_before = plan.ivr_rules_before,
            ivr_rules = plan.ivr_rules_after,
            ivr_changed = plan.ivr_changed,
            categories = settings.categories.len(),
            responders = settings.roster.len(),
            responders_added = plan.responders_added.len(),
            responders_removed = plan.responders_removed.len(),
            responders_changed = plan.responders_changed.len(),
            needs_restart = plan.needs_restart.len(),
            "configuration reloaded"
        );
    }
}

/// Writes the roster to Redis, retrying while Redis is away, until a newer
/// reload supersedes it or the daemon stops.
async fn sync_roster(
    dispatch: Arc<Dispatch>,
    rows: Vec<RosterRow>,
    generation: Arc<std::sync::atomic::AtomicU64>,
    mine: u64,
    shutdown: CancellationToken,
) {
    let backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        if generation.load(std::sync::atomic::Ordering::SeqCst) != mine {
            return;
        }
        match dispatch.sync_roster(&rows).await {
            Ok(()) => {
                tracing::info!(responders = rows.len(), "roster written to Redis");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "roster not written to Redis yet; retrying"),
        }
        if backoff.wait(&shutdown).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{IvrRule, ResponderConfig, SipMode};
    use crate::domain::incident::Severity;

    fn responder(id: &str, tier: u32) -> ResponderConfig {
        ResponderConfig {
            id: id.into(),
            name: id.into(),
            token_sha256: "0".repeat(64),
            skills: vec!["*".into()],
            tier,
            phone: None,
            sip_uri: None,
            webhook: None,
        }
    }

    #[test]
    fn live_settings_change_restart_only_ones_stay() {
        let old = Settings { roster: vec![responder("a", 1), responder("b", 1)], ..Settings::default() };
        let mut new = old.clone();
        new.roster = vec![responder("a", 2), responder("c", 1)];
        new.ivr.push(IvrRule {
            path: "7".into(),
            category: "flood".into(),
            severity: Severity::Critical,
            instructions: String::new(),
        });
        new.sip.mode = SipMode::Shadow;
        new.http.listen = "127.0.0.1:1".into();
        new.shutdown.drain = Duration::from_secs(3);

        let plan = Plan::new(&old, new);
        assert_eq!(plan.needs_restart, vec!["sip.mode", "http.listen"]);
        assert_eq!(plan.settings.sip.mode, SipMode::Decline);
        assert_eq!(plan.settings.http.listen, old.http.listen);
        assert_eq!(plan.settings.shutdown.drain, Duration::from_secs(3));
        assert_eq!(plan.settings.ivr.len(), 1);
        assert!(plan.ivr_changed);
        assert_eq!(plan.responders_added, vec!["c"]);
        assert_eq!(plan.responders_removed, vec!["b"]);
        assert_eq!(plan.responders_changed, vec!["a"]);
    }

    #[test]
    fn nothing_changed_is_quiet() {
        let old = Settings::default();
        let plan = Plan::new(&old, old.clone());
        assert!(plan.needs_restart.is_empty());
        assert!(!plan.ivr_changed);
        assert!(!plan.roster_changed());
    }

    #[test]
    fn secrets_are_compared_but_not_shown() {
        let old = Settings::default();
        let mut new = old.clone();
        new.redis.url = serde_json::from_str("\"redis://10.0.0.1:6379/0\"").unwrap();
        let plan = Plan::new(&old, new);
        assert_eq!(plan.needs_restart, vec!["redis.url"]);
        assert_eq!(plan.settings.redis.url.expose(), old.redis.url.expose());
    }
}
