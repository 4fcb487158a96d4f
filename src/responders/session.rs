//! One responder connection, from accept to close.
//!
//! Before a connection has signed in it costs little and cannot hold much:
//! at most [`MAX_PREAUTH`] such connections at once (and [`MAX_PREAUTH_PER_IP`]
//! from one address), [`PREAUTH_BYTES`] read in all, and [`PREAUTH_WITHIN`]
//! from accept to `welcome`. After `welcome`, frames up to 1 MiB are read; a
//! write the peer does not take within [`write_within`] ends the session, and
//! however a session ends, its [`Registration`] takes it out of the registry.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::wire::{self, Inbound};
use super::{Out, Registration, Roster, Sessions};
use crate::dispatcher::Dispatch;
use crate::domain::dispatch::Answer;
use crate::domain::ids::normalize_id;
use crate::telemetry::metric;

pub const PATH: &str = "/v1/responders/ws";
/// From accept to `welcome`: the upgrade, and the `hello` frame when the token
/// is not in a header (contract §4: within 5 s).
pub const PREAUTH_WITHIN: Duration = Duration::from_secs(5);
/// Connections not signed in yet, at most, and from one address.
pub const MAX_PREAUTH: usize = 256;
pub const MAX_PREAUTH_PER_IP: usize = 16;
/// Bytes read from a connection before it has signed in: the upgrade request
/// and a `hello` frame fit many times over; a 1 MiB frame does not.
pub const PREAUTH_BYTES: usize = 16 * 1024;
/// Longest first request head (the upgrade, or a request for a console file).
const MAX_HEAD: usize = 8 * 1024;
/// Console (HTTP) connections at once.
pub const MAX_CONSOLE_CONNECTIONS: usize = 256;

/// How long one write to a peer may take before the session ends: one
/// heartbeat, between 1 and 15 s.
fn write_within(heartbeat: Duration) -> Duration {
    heartbeat.clamp(Duration::from_secs(1), Duration::from_secs(15))
}

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
    pub preauth: PreAuth,
    /// wss:// (and https://) when set.
    pub tls: Option<Arc<crate::tls::Tls>>,
    /// Places for console (HTTP) connections.
    pub console_slots: Arc<tokio::sync::Semaphore>,
}

/// Admission of connections that have not signed in yet.
#[derive(Default)]
pub struct PreAuth {
    by_ip: Mutex<HashMap<IpAddr, usize>>,
    total: AtomicUsize,
}

/// A place among the connections not signed in; given back when dropped.
pub struct Admitted<'a> {
    preauth: &'a PreAuth,
    ip: IpAddr,
}

impl PreAuth {
    /// A place for a new connection from `ip`, unless the caps are reached.
    pub fn admit(&self, ip: IpAddr) -> Option<Admitted<'_>> {
        let mut m = self.by_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= MAX_PREAUTH_PER_IP || self.total.load(Ordering::Relaxed) >= MAX_PREAUTH {
            if *n == 0 {
                m.remove(&ip);
            }
            return None;
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Some(Admitted { preauth: self, ip })
    }
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        let mut m = self.preauth.by_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
        self.preauth.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A stream that reads at most a budget of bytes until the budget is lifted
/// (after `welcome`): a peer that has not signed in cannot make us read much.
pub struct Metered<S> {
    inner: S,
    budget: Arc<AtomicUsize>,
}

const UNMETERED: usize = usize::MAX;

impl<S> Metered<S> {
    pub fn new(inner: S, budget: usize) -> (Metered<S>, Arc<AtomicUsize>) {
        let b = Arc::new(AtomicUsize::new(budget));
        (Metered { inner, budget: b.clone() }, b)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let left = self.budget.load(Ordering::Relaxed);
        if left == 0 {
            return Poll::Ready(Err(io::Error::other("too much read before signing in")));
        }
        if buf.remaining() <= left {
            let before = buf.filled().len();
            let r = Pin::new(&mut self.inner).poll_read(cx, buf);
            let n = buf.filled().len() - before;
            if left != UNMETERED {
                self.budget.fetch_sub(n, Ordering::Relaxed);
            }
            return r;
        }
        // Less budget than room: read only what the budget allows.
        let mut tmp = vec![0u8; left];
        let mut limited = ReadBuf::new(&mut tmp);
        let r = Pin::new(&mut self.inner).poll_read(cx, &mut limited);
        let n = limited.filled().len();
        buf.put_slice(limited.filled());
        self.budget.fetch_sub(n, Ordering::Relaxed);
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Accepts responder connections until shutdown.
pub async fn serve(listener: TcpListener, gw: Arc<Gateway>, shutdown: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "responder accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (gw2, shutdown) = (gw.clone(), shutdown.clone());
        gw.sessions.tasks.spawn(async move {
            let Some(admitted) = gw2.preauth.admit(peer.ip()) else {
                metrics::counter!(metric::CONNECTIONS_REFUSED, "listener" => "responders", "reason" => "preauth_limit")
                    .increment(1);
                return;
            };
            let deadline = tokio::time::Instant::now() + PREAUTH_WITHIN;
            match &gw2.tls {
                None => {
                    let (stream, budget) = Metered::new(stream, PREAUTH_BYTES);
                    route(stream, budget, admitted, deadline, &gw2, shutdown).await
                }
                Some(tls) => {
                    let handshake = tokio::time::timeout_at(deadline, tls.acceptor().accept(stream));
                    let Ok(Ok(stream)) = handshake.await else { return };
                    let (stream, budget) = Metered::new(stream, PREAUTH_BYTES);
                    route(stream, budget, admitted, deadline, &gw2, shutdown).await
                }
            }
        });
    }
}

/// A stream whose first bytes were already read: they are read again first.
pub struct Rewind<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Rewind<S> {
        Rewind { prefix, at: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = buf.remaining().min(self.prefix.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            if self.at == self.prefix.len() {
                // Replayed: free it (an idle responder keeps its connection for hours).
                self.prefix = Vec::new();
                self.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Reads until the end of the first request head (or `limit` bytes), by `deadline`.
async fn read_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: usize,
    deadline: tokio::time::Instant,
) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() >= limit {
            return None;
        }
        let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await.ok()?.ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&chunk[..n]);
    }
    Some(head)
}

/// The path of a request head's request line (without the query).
fn request_path(head: &[u8]) -> Option<String> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    req.parse(head).ok()?;
    Some(req.path?.split('?').next().unwrap_or("").to_string())
}

/// One connection on the responders' port: the websocket (`/v1/responders/ws`)
/// or the console's files (anything else, over HTTP/1.1).
async fn route<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    mut stream: S,
    budget: Arc<AtomicUsize>,
    admitted: Admitted<'_>,
    deadline: tokio::time::Instant,
    gw: &Gateway,
    shutdown: CancellationToken,
) {
    let Some(head) = read_head(&mut stream, MAX_HEAD, deadline).await else { return };
    if request_path(&head).as_deref() == Some(PATH) {
        return session(Rewind::new(head, stream), budget, admitted, deadline, gw, shutdown).await;
    }
    // The console: files anyone may fetch, under the console's own limits.
    drop(admitted);
    let Ok(_slot) = gw.console_slots.clone().try_acquire_owned() else {
        metrics::counter!(metric::CONNECTIONS_REFUSED, "listener" => "responders", "reason" => "console_limit")
            .increment(1);
        return;
    };
    budget.store(UNMETERED, Ordering::Relaxed);
    super::console::serve(Rewind::new(head, stream), shutdown).await;
}

fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame { code: CloseCode::from(code), reason: reason.into() }))
}

/// The upgrade, then the token (header, or a `hello` frame), both by
/// `deadline`: the responder and its token's SHA-256 (None: refused), and the
/// socket; None when the upgrade itself did not happen in time.
async fn sign_in<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    gw: &Gateway,
    deadline: tokio::time::Instant,
) -> Option<(Option<(String, [u8; 32])>, WebSocketStream<S>)> {
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
    let upgrade = tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(ws_config()));
    let mut ws = tokio::time::timeout_at(deadline, upgrade).await.ok()?.ok()?;
    let authenticate = |token: &str| gw.roster.read().ok().and_then(|r| r.authenticate(token));
    let who = match header_token {
        Some(t) => authenticate(&t),
        None => match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => match wire::parse(t.as_str()) {
                Ok((_, Inbound::Hello { token })) => authenticate(&token),
                _ => None,
            },
            _ => None,
        },
    };
    Some((who, ws))
}

async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    budget: Arc<AtomicUsize>,
    admitted: Admitted<'_>,
    deadline: tokio::time::Instant,
    gw: &Gateway,
    shutdown: CancellationToken,
) {
    let (ctx, heartbeat) = (&gw.dispatch, gw.heartbeat);
    let write_within = write_within(heartbeat);
    let Some((who, ws)) = sign_in(stream, gw, deadline).await else { return };
    let (mut sink, mut frames) = ws.split();
    let Some((rid, token)) = who else {
        // Nothing else is sent first (contract §4).
        send(&mut sink, close(4401, "unauthorized"), write_within).await;
        return;
    };
    // Signed in: the caps of the unauthenticated no longer apply.
    drop(admitted);
    budget.store(UNMETERED, Ordering::Relaxed);

    let span = tracing::info_span!("responder", responder = %rid);
    async {
        let (tx, mut rx) = mpsc::channel::<Out>(64);
        let mut reg: Registration = gw.sessions.register(&rid, token, tx);
        // However the session ends (a close, an error, a panic in a handler),
        // dropping `reg` takes it out of the registry and stores that it left.
        let (d, rt) = (gw.dispatch.clone(), tokio::runtime::Handle::current());
        reg.on_leave(move |rid| {
            rt.spawn(async move {
                if let Err(e) = d.disconnected(&rid).await {
                    tracing::warn!(responder = %rid, error = %e, "disconnect not stored");
                }
            });
        });
        tracing::info!("responder connected");
        let welcome = Message::text(wire::welcome(&rid, heartbeat.as_secs().max(1)));
        if !send(&mut sink, welcome, write_within).await {
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
                    reg.seen();
                    if !reply.is_empty() && !send(&mut sink, Message::text(reply), write_within).await {
                        break;
                    }
                }
                out = rx.recv() => match out {
                    Some(Out::Text(t)) => {
                        if !send(&mut sink, Message::text(t), write_within).await {
                            tracing::info!("responder not reading; closing");
                            break;
                        }
                    }
                    Some(Out::Close(code, reason)) => {
                        let _ = send(&mut sink, close(code, reason), write_within).await;
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
                        if !send(&mut sink, Message::Ping(Default::default()), write_within).await {
                            break;
                        }
                    }
                }
                _ = shutdown.cancelled() => {
                    let _ = send(&mut sink, close(1001, "going away"), write_within).await;
                    break;
                }
            }
        }
        drop(reg);
        tracing::info!("responder disconnected");
    }
    .instrument(span)
    .await
}

/// Writes one message; false when it failed or the peer did not take it within `within`.
async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    sink: &mut SplitSink<WebSocketStream<S>, Message>,
    m: Message,
    within: Duration,
) -> bool {
    matches!(tokio::time::timeout(within, sink.send(m)).await, Ok(Ok(())))
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn preauth_caps_per_address_and_overall() {
        let p = PreAuth::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let held: Vec<_> = (0..MAX_PREAUTH_PER_IP).map(|_| p.admit(a).expect("under the cap")).collect();
        assert!(p.admit(a).is_none(), "one address is capped");
        assert!(p.admit("192.0.2.2".parse().unwrap()).is_some(), "another address is not");
        drop(held);
        assert!(p.admit(a).is_some(), "places come back when connections end");
        let mut many = Vec::new();
        for i in 0..=MAX_PREAUTH {
            let ip = IpAddr::from([10, 0, (i / 250) as u8, (i % 250) as u8]);
            match p.admit(ip) {
                Some(g) => many.push(g),
                None => break,
            }
        }
        assert_eq!(many.len(), MAX_PREAUTH, "overall cap");
    }

    #[tokio::test]
    async fn metered_stream_stops_at_its_budget_until_lifted() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let (mut m, budget) = Metered::new(server, 10);
        tokio::io::AsyncWriteExt::write_all(&mut client, &[7u8; 100]).await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(m.read(&mut buf).await.unwrap(), 10);
        assert!(m.read(&mut buf).await.is_err(), "over the budget");
        budget.store(UNMETERED, Ordering::Relaxed);
        assert_eq!(m.read(&mut buf).await.unwrap(), 64);
    }
}
