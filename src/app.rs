//! Startup in order — metrics, Redis, bind, spawn, READY — then reloads on
//! SIGHUP and a drain on SIGTERM.
//!
//! The drain (contract §1): new INVITEs get 503 while the SIP sockets keep
//! reading (so ACKs and CANCELs still match), ringing calls end, incidents
//! being written are finished, websockets close with 1001 — all within
//! `shutdown.drain`, then exit 0.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiState};
use crate::backoff::Backoff;
use crate::config::Settings;
use crate::dispatcher::Dispatch;
use crate::domain::incident::Severity;
use crate::intake::Intake;
use crate::responders::{self, Gateway, Roster, Sessions};
use crate::sip::line::Uas;
use crate::sip::transport::{self, AllowList, TcpLimits};
use crate::store::{Store, StoreError};
use crate::telemetry::{self, metric};
use crate::tls::Tls;
use crate::{reload, shutdown, systemd};

/// Runs the daemon until SIGTERM/SIGINT. Logging is already set up.
/// `config_path` is the file read again on SIGHUP.
pub async fn run(settings: Settings, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let metrics = telemetry::init_metrics().context("installing the metrics recorder")?;
    let token = CancellationToken::new();
    shutdown::watch_signals(token.clone()).context("installing signal handlers")?;
    // From here on a SIGHUP waits for the reloader instead of killing us.
    let hangups = shutdown::hangups().context("installing the SIGHUP handler")?;
    systemd::status("starting: waiting for Redis");

    let store = Store::from_settings(&settings.redis).context("redis.url")?;
    tokio::spawn(store.primary().clone().watch(token.clone()));
    if !wait_for_redis(&store, &token).await? {
        systemd::stopping();
        tracing::info!("dispatchd stopped before it was ready");
        return Ok(());
    }
    let redis_up = Arc::new(AtomicBool::new(true));
    let listening = Arc::new(AtomicBool::new(false));

    let sessions = Arc::new(Sessions::new(settings.responders.heartbeat));
    let pager = Arc::new(crate::dispatcher::Pager::default());
    let channels = Arc::new(crate::notify::Channels::new(&settings, pager.clone()));
    let dispatch = Dispatch::new(store.clone(), &settings, sessions.clone(), channels, pager.clone());
    dispatch.sync_roster(&reload::roster_rows(&settings)).await.context("writing the roster to Redis")?;
    let wake = dispatch.clone();
    let intake = Arc::new(Intake::new(store.clone(), &settings).daemon(&dispatch.daemon).on_open(move || wake.wake()));
    let uas = Uas::new(&settings.sip, intake.clone(), redis_up.clone(), token.clone());
    crate::acd::spawn(&settings, intake.clone(), pager, token.clone());
    let allow = Arc::new(AllowList::new(settings.allow_nets()));

    // Bind everything before READY; a failure here is fatal and names the address.
    let udp = match settings.sip.udp.as_str() {
        "" => None,
        a => {
            let addr: SocketAddr = a.parse().context("sip.udp")?;
            let sock = transport::bind_udp(addr, settings.sip.udp_recv_buffer)
                .with_context(|| format!("binding SIP UDP {addr}"))?;
            tracing::info!(addr = %sock.local_addr()?, "SIP UDP listening");
            Some(Arc::new(sock))
        }
    };
    let tcp = match settings.sip.tcp.as_str() {
        "" => None,
        a => {
            let l = TcpListener::bind(a).await.with_context(|| format!("binding SIP TCP {a}"))?;
            tracing::info!(addr = %l.local_addr()?, "SIP TCP listening");
            Some(l)
        }
    };
    let tls = match &settings.tls {
        Some(t) => Some(Tls::new(&t.cert, &t.key).context("tls")?),
        None => None,
    };
    let sip_tls = match settings.sip.tls.as_str() {
        "" => None,
        a => {
            let l = TcpListener::bind(a).await.with_context(|| format!("binding SIP TLS {a}"))?;
            tracing::info!(addr = %l.local_addr()?, "SIP TLS listening");
            Some(l)
        }
    };
    let ws = TcpListener::bind(&settings.responders.listen)
        .await
        .with_context(|| format!("binding responders {}", settings.responders.listen))?;
    tracing::info!(addr = %ws.local_addr()?, path = responders::session::PATH, "responder websocket listening");
    let http = TcpListener::bind(&settings.http.listen)
        .await
        .with_context(|| format!("binding HTTP {}", settings.http.listen))?;
    tracing::info!(addr = %http.local_addr()?, "HTTP listening");

    // The SIP sockets outlive `token`: during the drain they keep reading, so
    // new INVITEs get 503 and ACKs stop retransmissions; closed after it.
    let sip_token = CancellationToken::new();
    tokio::spawn(uas.clone().resend_loop(sip_token.clone()));
    if let Some(sock) = udp {
        // One reader per runtime thread: more would only take turns.
        for _ in 0..settings.runtime.worker_threads {
            tokio::spawn(transport::serve_udp(sock.clone(), allow.clone(), uas.clone(), sip_token.clone()));
        }
    }
    if let Some(l) = tcp {
        let limits = TcpLimits {
            max_connections: settings.sip.tcp_max_connections,
            idle_timeout: settings.sip.tcp_idle_timeout,
        };
        tokio::spawn(transport::serve_tcp(l, allow.clone(), uas.clone(), limits, None, sip_token.clone()));
    }
    if let Some(l) = sip_tls {
        let limits = TcpLimits {
            max_connections: settings.sip.tcp_max_connections,
            idle_timeout: settings.sip.tcp_idle_timeout,
        };
        tokio::spawn(transport::serve_tcp(l, allow.clone(), uas.clone(), limits, tls.clone(), sip_token.clone()));
    }
    let admin_sha256 = api::admin_hash(&settings.http.admin_token_sha256);
    if admin_sha256.is_none() {
        tracing::warn!("http.admin_token_sha256 is not set: the /v1 API refuses every request");
    }
    // The settings in force: replaced on SIGHUP, read by the API and the drain.
    let in_force = Arc::new(std::sync::RwLock::new(Arc::new(settings.clone())));
    let router = api::router(ApiState {
        intake: intake.clone(),
        dispatch: dispatch.clone(),
        settings: in_force.clone(),
        metrics,
        listening: listening.clone(),
        redis_up: redis_up.clone(),
        admin_sha256,
    });
    let limits = api::server::Limits {
        max_connections: settings.http.max_connections,
        idle_timeout: settings.http.idle_timeout,
    };
    let http_tls = if settings.http.tls { tls.clone() } else { None };
    let http_task = tokio::spawn(api::server::serve(http, router, http_tls, limits, token.clone()));
    let roster = Arc::new(std::sync::RwLock::new(Roster::new(&settings.roster)));
    let gateway = Arc::new(Gateway {
        dispatch: dispatch.clone(),
        sessions: sessions.clone(),
        roster: roster.clone(),
        heartbeat: settings.responders.heartbeat,
        preauth: Default::default(),
        tls: if settings.responders_tls() { tls.clone() } else { None },
        console_slots: Arc::new(tokio::sync::Semaphore::new(responders::session::MAX_CONSOLE_CONNECTIONS)),
    });
    tokio::spawn(responders::serve(ws, gateway, token.clone()));
    let dispatcher_task = tokio::spawn(dispatch.clone().run(token.clone()));
    tokio::spawn(dispatch.clone().listen(token.clone()));
    tokio::spawn(health_loop(store.clone(), redis_up.clone(), uas.clone(), token.clone()));
    tokio::spawn(retention_loop(store.clone(), in_force.clone(), token.clone()));

    // Every listener is bound and Redis answered: ready (and /readyz agrees).
    listening.store(true, Ordering::Relaxed);
    systemd::ready(&reload::status_line(&settings));
    tracing::info!(mode = settings.sip.mode.as_str(), version = env!("CARGO_PKG_VERSION"), "dispatchd ready");

    // Reloads start only now, so RELOADING/READY never precede the first READY.
    let reloader = reload::Reloader::new(
        config_path,
        intake.clone(),
        roster,
        in_force.clone(),
        dispatch.clone(),
        sessions.clone(),
        tls.clone(),
    );
    tokio::spawn(reloader.run(hangups, token.clone()));

    token.cancelled().await;
    let drain = in_force.read().map(|s| s.shutdown.drain).unwrap_or(settings.shutdown.drain);
    let deadline = tokio::time::Instant::now() + drain;
    systemd::stopping();
    tracing::info!(drain_s = drain.as_secs_f64(), "draining");
    listening.store(false, Ordering::Relaxed);
    // New INVITEs now get 503 (the UAS sees the token); ringing calls end.
    uas.end_ringing();
    // Sessions see the token too and close with 1001; wait for their close frames.
    sessions.close_all(1001, "going away");
    sessions.tasks.close();
    // Incidents being written (and timeline entries of calls ending) are finished.
    uas.tasks().close();
    let mut complete = tokio::time::timeout_at(deadline, uas.tasks().wait()).await.is_ok();
    // Calls whose incident was stored during the drain (shadow mode) stop ringing too.
    uas.end_ringing();
    // The dispatcher finishes the pass it is in (one Lua script at a time).
    complete &= tokio::time::timeout_at(deadline, dispatcher_task).await.is_ok();
    complete &= tokio::time::timeout_at(deadline, sessions.tasks.wait()).await.is_ok();
    complete &= tokio::time::timeout_at(deadline, http_task).await.is_ok();
    sip_token.cancel();
    if complete {
        tracing::info!("dispatchd stopped");
    } else {
        tracing::warn!(in_flight = uas.tasks().len(), "drain deadline passed with work in flight; dispatchd stopped");
    }
    Ok(())
}

/// Waits until Redis answers and has the scripts loaded; false when shutdown
/// came first, an error when this Redis cannot run them.
async fn wait_for_redis(store: &Store, token: &CancellationToken) -> anyhow::Result<bool> {
    let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match store.load_library().await {
            Ok(()) => match store.migrate_layout().await {
                Ok(_) => return Ok(true),
                Err(e) => tracing::warn!(error = %e, "moving the keys to the hash-tagged layout"),
            },
            Err(e @ StoreError::TooOld) => return Err(e.into()),
            Err(e) => tracing::warn!(error = %e, "waiting for Redis"),
        }
        if backoff.wait(token).await {
            return Ok(false);
        }
    }
}

/// Every minute: incidents resolved or cancelled longer than `privacy.retention`
/// ago are removed (contract §7). The retention in force is re-read each time,
/// so a SIGHUP reload applies to it.
async fn retention_loop(store: Store, in_force: Arc<std::sync::RwLock<Arc<Settings>>>, token: CancellationToken) {
    loop {
        let retention = in_force.read().map(|s| s.privacy.retention).unwrap_or(Duration::from_secs(90 * 86_400));
        match store.expire_closed(retention).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "expired incidents removed"),
            Err(e) => tracing::warn!(error = %e, "retention sweep failed"),
        }
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
    }
}

/// Every second: is Redis there, how deep are the queues; forget old SIP
/// transactions. (The watchdog is the dispatcher's.)
async fn health_loop(store: Store, redis_up: Arc<AtomicBool>, uas: Arc<Uas>, token: CancellationToken) {
    loop {
        let up = store.ping().await.is_ok();
        if up != redis_up.swap(up, Ordering::Relaxed) {
            if up {
                tracing::info!("Redis answers again");
            } else {
                tracing::error!("Redis does not answer; new calls get 503");
            }
        }
        metrics::gauge!(metric::REDIS_UP).set(if up { 1.0 } else { 0.0 });
        if up && let Ok(depths) = store.queue_depths().await {
            for (s, n) in depths {
                metrics::gauge!(metric::QUEUE_DEPTH, "severity" => Severity::as_str(s)).set(n as f64);
            }
        }
        uas.sweep();
        // Look again soon while Redis is away, so calls resume quickly.
        let pause = if up { Duration::from_secs(1) } else { Duration::from_millis(250) };
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}
