//! Startup in order — metrics, Redis, bind, spawn, READY — then drain on SIGTERM.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::{self, ApiState};
use crate::config::Settings;
use crate::dispatcher::Dispatch;
use crate::incident::Severity;
use crate::intake::Intake;
use crate::responders::{self, Roster};
use crate::sip::transport::{self, AllowList, TcpLimits};
use crate::sip::uas::Uas;
use crate::store::Store;
use crate::telemetry::{self, metric};
use crate::{shutdown, systemd};

/// Runs the daemon until SIGTERM/SIGINT. Logging is already set up.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    let metrics = telemetry::init_metrics().context("installing the metrics recorder")?;
    let token = CancellationToken::new();
    shutdown::watch_signals(token.clone()).context("installing signal handlers")?;

    let store = Store::new(settings.redis.url.expose(), &settings.redis.prefix, settings.redis.timeout)
        .context("redis.url")?;
    if !wait_for_redis(&store, &token).await {
        return Ok(());
    }
    let redis_up = Arc::new(AtomicBool::new(true));
    let listening = Arc::new(AtomicBool::new(false));

    let dispatch = Dispatch::new(store.clone(), &settings);
    let roster: Vec<(String, u32, Vec<String>)> =
        settings.roster.iter().map(|r| (r.id.clone(), r.tier, r.skills.clone())).collect();
    store.sync_roster(&roster).await.context("writing the roster to Redis")?;
    let wake = dispatch.clone();
    let intake = Arc::new(Intake::new(store.clone(), &settings).on_open(move || wake.wake()));
    let uas = Uas::new(&settings.sip, intake.clone(), redis_up.clone(), token.clone());
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
    let ws = TcpListener::bind(&settings.responders.listen)
        .await
        .with_context(|| format!("binding responders {}", settings.responders.listen))?;
    tracing::info!(addr = %ws.local_addr()?, path = responders::session::PATH, "responder websocket listening");
    let http = TcpListener::bind(&settings.http.listen)
        .await
        .with_context(|| format!("binding HTTP {}", settings.http.listen))?;
    tracing::info!(addr = %http.local_addr()?, "HTTP listening");

    if let Some(sock) = udp {
        for _ in 0..std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) {
            tokio::spawn(transport::serve_udp(sock.clone(), allow.clone(), uas.clone(), token.clone()));
        }
    }
    if let Some(l) = tcp {
        let limits = TcpLimits {
            max_connections: settings.sip.tcp_max_connections,
            idle_timeout: settings.sip.tcp_idle_timeout,
        };
        tokio::spawn(transport::serve_tcp(l, allow.clone(), uas.clone(), limits, token.clone()));
    }
    let admin_sha256 = api::admin_hash(&settings.http.admin_token_sha256);
    if admin_sha256.is_none() {
        tracing::warn!("http.admin_token_sha256 is not set: the /v1 API refuses every request");
    }
    let router = api::router(ApiState {
        store: store.clone(),
        metrics,
        listening: listening.clone(),
        redis_up: redis_up.clone(),
        admin_sha256,
    });
    let http_token = token.clone();
    let http_task = tokio::spawn(async move {
        axum::serve(http, router)
            .with_graceful_shutdown(async move { http_token.cancelled().await })
            .await
    });
    let roster = Arc::new(std::sync::RwLock::new(Roster::new(&settings.roster)));
    tokio::spawn(responders::serve(ws, dispatch.clone(), roster, settings.responders.heartbeat, token.clone()));
    tokio::spawn(dispatch.clone().run(token.clone()));
    tokio::spawn(dispatch.clone().listen(token.clone()));
    tokio::spawn(health_loop(store.clone(), redis_up.clone(), uas.clone(), token.clone()));

    listening.store(true, Ordering::Relaxed);
    systemd::ready();
    tracing::info!(mode = settings.sip.mode.as_str(), version = env!("CARGO_PKG_VERSION"), "dispatchd ready");

    token.cancelled().await;
    systemd::stopping();
    listening.store(false, Ordering::Relaxed);
    // New INVITEs now get 503 (the UAS sees the token); ringing calls end;
    // incidents being written are finished before we exit.
    uas.end_ringing();
    // Sessions see the token too and close with 1001; wait for their close frames.
    dispatch.sessions.close_all(1001, "going away");
    dispatch.sessions_tasks.close();
    uas.tasks().close();
    if tokio::time::timeout(settings.shutdown.drain, uas.tasks().wait()).await.is_err() {
        tracing::warn!("drain deadline passed with work in flight");
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), dispatch.sessions_tasks.wait()).await;
    let _ = tokio::time::timeout(Duration::from_secs(1), http_task).await;
    tracing::info!("dispatchd stopped");
    Ok(())
}

/// Waits until Redis answers; false when shutdown came first.
async fn wait_for_redis(store: &Store, token: &CancellationToken) -> bool {
    let mut delay = Duration::from_millis(100);
    loop {
        match store.ping().await {
            Ok(()) => return true,
            Err(e) => tracing::warn!(error = %e, "waiting for Redis"),
        }
        tokio::select! {
            _ = token.cancelled() => return false,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
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
        if up {
            if let Ok(depths) = store.queue_depths().await {
                for (s, n) in depths {
                    metrics::gauge!(metric::QUEUE_DEPTH, "severity" => Severity::as_str(s)).set(n as f64);
                }
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
