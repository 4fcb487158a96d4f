//! The ops plane's accept loop: HTTP/1.1 with hyper, plain or TLS, with the
//! limits a slow or hostile client meets (issue 10): at most
//! `http.max_connections` at once (more are closed at once), a request head
//! must arrive within `http.idle_timeout` (which also closes an idle
//! keep-alive connection), and a request is answered within
//! [`REQUEST_WITHIN`] or gets 503. On shutdown, connections finish the request
//! they are in and close.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::telemetry::metric;
use crate::tls::Tls;

/// Longest a request may take, its body included.
pub const REQUEST_WITHIN: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub idle_timeout: Duration,
}

/// Middleware: a request not answered within [`REQUEST_WITHIN`] gets 503.
pub async fn within_time(req: Request, next: Next) -> Response {
    match tokio::time::timeout(REQUEST_WITHIN, next.run(req)).await {
        Ok(r) => r,
        Err(_) => super::error(StatusCode::SERVICE_UNAVAILABLE, "timeout"),
    }
}

/// Serves `router` on `listener` until `shutdown`, then lets the open
/// connections finish the request they are in.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    tls: Option<Arc<Tls>>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let conns = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!(metric::CONNECTIONS_REFUSED, "listener" => "http", "reason" => "limit").increment(1);
            continue;
        };
        let (router, tls, shutdown) = (router.clone(), tls.clone(), shutdown.clone());
        conns.spawn(async move {
            let _slot = slot;
            let _ = stream.set_nodelay(true);
            match tls {
                Some(tls) => {
                    if let Some(s) = tls.accept(stream).await {
                        connection(s, router, limits.idle_timeout, 64 * 1024, shutdown).await;
                    }
                }
                None => connection(stream, router, limits.idle_timeout, 64 * 1024, shutdown).await,
            }
        });
    }
    conns.close();
    conns.wait().await;
}

/// Serves `router` on one HTTP/1.1 connection until it closes, sends no
/// request head within `idle`, or shutdown (then gracefully); at most
/// `max_buf` bytes buffered for a request head.
pub async fn connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: S,
    router: Router,
    idle: Duration,
    max_buf: usize,
    shutdown: CancellationToken,
) {
    let service = TowerToHyperService::new(router);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(idle).max_buf_size(max_buf);
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
