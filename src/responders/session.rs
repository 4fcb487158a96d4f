//! One responder connection, from handshake to close.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::wire::{self, Inbound};
use super::{Out, Roster, Sessions};
use crate::dispatcher::Dispatch;
use crate::domain::dispatch::Answer;
use crate::domain::ids::normalize_id;

pub const PATH: &str = "/v1/responders/ws";
const HELLO_WITHIN: Duration = Duration::from_secs(5);
const HANDSHAKE_WITHIN: Duration = Duration::from_secs(10);

/// Small buffers: thousands of idle responders must be cheap.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(0)
        .max_write_buffer_size(256 * 1024)
        // Frames up to 1 MiB are read and answered with an error when over
        // wire::MAX_FRAME; only beyond that is the connection dropped.
        .max_message_size(Some(1024 * 1024))
        .max_frame_size(Some(1024 * 1024))
}

/// What every session needs: the dispatcher (the door for answers), the
/// registry of sessions here, the roster's tokens, the heartbeat.
pub struct Gateway {
    pub dispatch: Arc<Dispatch>,
    pub sessions: Arc<Sessions>,
    pub roster: Arc<RwLock<Roster>>,
    pub heartbeat: Duration,
}

/// Accepts responder connections until shutdown.
pub async fn serve(listener: TcpListener, gw: Arc<Gateway>, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "responder accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (task_gw, shutdown) = (gw.clone(), shutdown.clone());
        gw.sessions.tasks.spawn(async move { session(stream, task_gw, shutdown).await });
    }
}

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame { code: CloseCode::from(code), reason: reason.into() }))
}

async fn session(stream: TcpStream, gw: Arc<Gateway>, shutdown: CancellationToken) {
    let (ctx, heartbeat) = (&gw.dispatch, gw.heartbeat);
    let _ = stream.set_nodelay(true);
    let mut header_token: Option<String> = None;
    // The callback's signature is tungstenite's.
    #[allow(clippy::result_large_err)]
    let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != PATH {
            let mut r = ErrorResponse::new(Some("not found".into()));
            *r.status_mut() = StatusCode::NOT_FOUND;
            return Err(r);
        }
        header_token = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.strip_prefix("Bearer ").unwrap_or(v).trim().to_string());
        Ok(resp)
    };
    let handshake = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ws_config()));
    let Ok(Ok(ws)) = tokio::time::timeout(HANDSHAKE_WITHIN, handshake).await else { return };
    let (mut sink, mut frames) = ws.split();

    let authenticate = |token: &str| gw.roster.read().ok().and_then(|r| r.authenticate(token));
    let rid = match header_token {
        Some(t) => authenticate(&t),
        None => match tokio::time::timeout(HELLO_WITHIN, frames.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => match wire::parse(t.as_str()) {
                Ok((_, Inbound::Hello { token })) => authenticate(&token),
                _ => None,
            },
            _ => None,
        },
    };
    let Some(rid) = rid else {
        // Nothing else is sent first (contract §4).
        let _ = sink.send(close(4401, "unauthorized")).await;
        return;
    };

    let span = tracing::info_span!("responder", responder = %rid);
    async {
        let (tx, mut rx) = mpsc::channel::<Out>(64);
        let conn = gw.sessions.register(&rid, tx);
        tracing::info!("responder connected");
        if sink.send(Message::text(wire::welcome(&rid, heartbeat.as_secs().max(1)))).await.is_err() {
            gw.sessions.unregister(&rid, conn);
            return;
        }
        // Presence, and the offer it has not answered sent again on (re)connect.
        if let Err(e) = ctx.connected(&rid).await {
            tracing::warn!(error = %e, "presence not stored");
        }

        let mut last_seen = Instant::now();
        let mut last_ping = Instant::now();
        let mut tick = tokio::time::interval(heartbeat / 4);
        loop {
            tokio::select! {
                frame = frames.next() => {
                    let reply = match frame {
                        None | Some(Err(_)) => break,
                        Some(Ok(Message::Close(_))) => break,
                        Some(Ok(Message::Text(t))) => handle(ctx, &rid, t.as_str()).await,
                        Some(Ok(Message::Binary(_))) => wire::error(None, "bad_request", "binary frames are not accepted"),
                        Some(Ok(_)) => String::new(), // ping/pong: tungstenite answers pings itself
                    };
                    last_seen = Instant::now();
                    if !reply.is_empty() && sink.send(Message::text(reply)).await.is_err() {
                        break;
                    }
                }
                out = rx.recv() => match out {
                    Some(Out::Text(t)) => {
                        if sink.send(Message::text(t)).await.is_err() {
                            break;
                        }
                    }
                    Some(Out::Close(code, reason)) => {
                        let _ = sink.send(close(code, reason)).await;
                        break;
                    }
                    None => break,
                },
                _ = tick.tick() => {
                    if last_seen.elapsed() >= heartbeat * 2 {
                        tracing::info!("responder silent for two heartbeats; closing");
                        break;
                    }
                    if last_ping.elapsed() >= heartbeat {
                        last_ping = Instant::now();
                        if sink.send(Message::Ping(Default::default())).await.is_err() {
                            break;
                        }
                    }
                }
                _ = shutdown.cancelled() => {
                    let _ = sink.send(close(1001, "going away")).await;
                    break;
                }
            }
        }
        if gw.sessions.unregister(&rid, conn)
            && let Err(e) = ctx.disconnected(&rid).await {
                tracing::warn!(error = %e, "disconnect not stored");
            }
        tracing::info!("responder disconnected");
    }
    .instrument(span)
    .await
}

/// Answers one text frame from an authenticated responder.
async fn handle(ctx: &Dispatch, rid: &str, text: &str) -> String {
    let (reference, msg) = match wire::parse(text) {
        Ok(v) => v,
        Err(r) => return wire::error(r.reference.as_ref(), "bad_request", &r.message),
    };
    let r = reference.as_ref();
    let unavailable = |e: crate::dispatcher::Error| {
        tracing::warn!(error = %e, "responder frame not applied");
        wire::error(r, "unavailable", "try again")
    };
    let refused = |code: &str| wire::error(r, code, "not an offer open to you");
    match msg {
        Inbound::Hello { .. } => wire::ok(r),
        Inbound::Ack { dispatch_id } => match ctx.ack(rid, &dispatch_id).await {
            Ok(Answer::Acknowledged { .. }) => wire::ok(r),
            Ok(Answer::Refused(code)) => refused(&code),
            Ok(Answer::Declined(_)) => wire::error(r, "bad_request", "unexpected"),
            Err(e) => unavailable(e),
        },
        Inbound::Decline { dispatch_id, reason } => match ctx.decline(rid, &dispatch_id, &reason).await {
            Ok(Answer::Declined(_)) => wire::ok(r),
            Ok(Answer::Refused(code)) => refused(&code),
            Ok(Answer::Acknowledged { .. }) => wire::error(r, "stale_dispatch", "already acknowledged"),
            Err(e) => unavailable(e),
        },
        Inbound::Status { incident_id, status, note, eta_s } => {
            let id = normalize_id(&incident_id).unwrap_or(incident_id);
            match ctx.status(rid, &id, status, &note, eta_s).await {
                Ok(Ok(())) => wire::ok(r),
                Ok(Err(code)) => wire::error(r, &code, "not your incident, or not a step forward"),
                Err(e) => unavailable(e),
            }
        }
        Inbound::Availability { status } => match ctx.availability(rid, status).await {
            Ok(()) => wire::ok(r),
            Err(e) => unavailable(e),
        },
    }
}
