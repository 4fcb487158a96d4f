//! SIP transports: UDP datagrams and TCP streams → checked messages → the UAS.
//!
//! The allow list is applied first: a source outside `sip.allow` gets nothing,
//! not even a TCP connection that stays open (nor a TLS handshake). TCP and
//! TLS are framed by Content-Length with a 64 KiB limit, an idle timeout and a
//! connection limit (one limit for both).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::line::Uas;
use super::transaction::{Peer, build};
use super::wire::{self, Frame, MAX_MESSAGE, Verdict};
use crate::telemetry::metric;
use crate::tls::Tls;

/// Source networks allowed to talk to us.
#[derive(Debug, Clone)]
pub struct AllowList(Vec<IpNet>);

impl AllowList {
    pub fn new(nets: Vec<IpNet>) -> Self {
        AllowList(nets)
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        // An IPv4 peer on a dual-stack socket shows up as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.0.iter().any(|n| n.contains(&ip))
    }
}

fn dropped(reason: &'static str) {
    metrics::counter!(metric::SIP_DROPPED, "reason" => reason).increment(1);
}

/// Hands one checked message to the UAS, answers a rejected one, drops the rest.
fn deliver(verdict: Verdict, peer: Peer, uas: &Arc<Uas>) {
    match verdict {
        Verdict::Ok(msg) if msg.method().is_some() => match msg.defect() {
            // Well-formed but unusable (a mandatory header missing or repeated): 400, never an ACK.
            Some(reason) if msg.method() != Some("ACK") => {
                dropped("malformed");
                peer.send(&build(&msg.reply(), 400, reason, None, &[]));
            }
            Some(_) => dropped("malformed"),
            None => uas.handle(msg, peer),
        },
        Verdict::Ok(_) => dropped("response"),
        Verdict::Reject { status, reason, reply } => {
            dropped("malformed");
            peer.send(&build(&reply, status, reason, None, &[]));
        }
        Verdict::Drop(reason) => dropped(match reason {
            "keepalive" => "keepalive",
            "response" => "response",
            "oversized" => "oversized",
            _ => "unparseable",
        }),
    }
}

/// Binds the UDP socket with a large receive buffer (bursts of calls on loopback
/// overflow the default one).
pub fn bind_udp(addr: SocketAddr, recv_buffer: usize) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let Err(e) = sock.set_recv_buffer_size(recv_buffer) {
        tracing::warn!(error = %e, "could not enlarge the UDP receive buffer");
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    UdpSocket::from_std(sock.into())
}

/// Reads datagrams until shutdown. Run one per core on the same socket.
pub async fn serve_udp(sock: Arc<UdpSocket>, allow: Arc<AllowList>, uas: Arc<Uas>, shutdown: CancellationToken) {
    // Larger than any datagram, so nothing is silently truncated.
    let mut buf = vec![0u8; 65_536];
    loop {
        let (n, src) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = sock.recv_from(&mut buf) => match r {
                Ok(v) => v,
                Err(e) => {
                    // ICMP errors from earlier sends surface here on some systems.
                    tracing::debug!(error = %e, "udp receive error");
                    continue;
                }
            },
        };
        if !allow.allows(src.ip()) {
            dropped("not_allowed");
            continue;
        }
        let Some(data) = buf.get(..n) else { continue };
        let peer = Peer::Udp { sock: sock.clone(), addr: src };
        deliver(wire::parse_datagram(data), peer, &uas);
    }
}

/// TCP limits.
#[derive(Debug, Clone, Copy)]
pub struct TcpLimits {
    pub max_connections: usize,
    pub idle_timeout: Duration,
}

/// Accepts connections until shutdown; with `tls`, SIP over TLS (RFC 3261
/// §26, framed like TCP): the allow list first, then the handshake.
pub async fn serve_tcp(
    listener: TcpListener,
    allow: Arc<AllowList>,
    uas: Arc<Uas>,
    limits: TcpLimits,
    tls: Option<Arc<Tls>>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let (stream, src) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "tcp accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        if !allow.allows(src.ip()) {
            dropped("not_allowed");
            drop(stream);
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            dropped("tcp_connection_limit");
            drop(stream);
            continue;
        };
        let (uas, tls, shutdown) = (uas.clone(), tls.clone(), shutdown.clone());
        tokio::spawn(async move {
            metrics::gauge!(metric::SIP_TCP_CONNECTIONS).increment(1.0);
            let _ = stream.set_nodelay(true);
            match tls {
                None => connection(stream, src, false, uas, limits.idle_timeout, shutdown).await,
                Some(tls) => match tls.accept(stream).await {
                    Some(s) => connection(s, src, true, uas, limits.idle_timeout, shutdown).await,
                    None => dropped("tls_handshake"),
                },
            }
            metrics::gauge!(metric::SIP_TCP_CONNECTIONS).decrement(1.0);
            drop(slot);
        });
    }
}

/// One TCP (or TLS) connection: a writer task fed by a bounded channel, and this reader.
async fn connection<S: AsyncRead + AsyncWrite + Send + 'static>(
    stream: S,
    src: SocketAddr,
    tls: bool,
    uas: Arc<Uas>,
    idle: Duration,
    shutdown: CancellationToken,
) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Bytes>(256);
    let writer = tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            if wr.write_all(&b).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let peer = Peer::Tcp { tx: tx.clone(), addr: src, tls };
    let mut buf = BytesMut::with_capacity(4096);
    let mut framer = wire::Framer::default();
    'conn: loop {
        let read = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = tokio::time::timeout(idle, rd.read_buf(&mut buf)) => r,
        };
        match read {
            Err(_) => {
                dropped("tcp_idle");
                break;
            }
            Ok(Err(_)) | Ok(Ok(0)) => break,
            Ok(Ok(_)) => {}
        }
        loop {
            match framer.next(&buf) {
                Ok(None) => {
                    if buf.len() > MAX_MESSAGE {
                        dropped("oversized");
                        break 'conn;
                    }
                    break;
                }
                Ok(Some(Frame::KeepAlive(k))) => {
                    // RFC 5626: a CRLFCRLF ping gets a CRLF pong.
                    if buf.get(..k).is_some_and(|b| b.starts_with(b"\r\n\r\n")) {
                        let _ = tx.try_send(Bytes::from_static(b"\r\n"));
                    }
                    buf.advance(k.min(buf.len()));
                }
                Ok(Some(Frame::Message(n))) => {
                    let n = n.min(buf.len());
                    let msg = buf.split_to(n);
                    deliver(wire::parse_stream_message(&msg), peer.clone(), &uas);
                }
                Err(_) => {
                    dropped("bad_framing");
                    break 'conn;
                }
            }
        }
    }
    drop(peer);
    drop(tx);
    let _ = writer.await;
}
