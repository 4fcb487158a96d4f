//! The FreeSWITCH event socket connection (inbound mode): connect, `auth`,
//! subscribe, read events, hand them to intake; reconnect when anything goes
//! wrong.
//!
//! One loop per configured `[acd.freeswitch]`:
//! 1. TCP connect (5 s timeout, TCP keepalive on); wait for `Content-Type:
//!    auth/request`, send `auth <password>`, expect `+OK accepted` (`-ERR
//!    invalid` or a `text/rude-rejection` is a login failure), then send
//!    [`esl::EVENT_SUBSCRIPTION`] and expect its `+OK`. The whole handshake
//!    has 10 s.
//! 2. Read → [`EslReader`] → [`esl::map_event`] → [`Intake::apply`], one event
//!    at a time. When apply fails (Redis does not answer) the same event is
//!    retried with backoff and nothing more is read meanwhile, so FreeSWITCH's
//!    event queue for this socket holds the rest and nothing is lost.
//! 3. A framing error ends the connection: ESL frames by `Content-Length`, so
//!    once a header block is unreadable there is no safe place to resume (the
//!    reader stays failed by design). Junk *inside* an event body costs only
//!    that field. A `text/disconnect-notice` ends it too.
//! 4. EOF, a socket error, a failed login or a dead peer: logged (never the
//!    password, never an event's fields), counted in
//!    `dispatchd_acd_errors_total{source="esl",reason}`,
//!    `dispatchd_acd_connected{source="esl"}` goes to 0, and the next attempt
//!    waits 250 ms, doubling up to `acd.max_backoff`; a successful
//!    subscription resets the delay.
//!
//! # Dead peers
//!
//! After 20 s without a byte the loop sends `api uptime` (cheap: one number
//! back as `api/response`); any byte counts as an answer, another 20 s of
//! silence ends the connection. `HEARTBEAT` events would do the same but need
//! a change to the subscription, whose word order is delicate (see `esl`);
//! TCP keepalive alone would miss a FreeSWITCH that is up but hung. TCP
//! keepalive is on as well, for the time spent not reading while Redis is away.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::esl::{self, EslError, EslMessage, EslReader};
use super::feed::{self, Backoff, FeedError};
use crate::config::FreeswitchSettings;
use crate::dispatcher::pager::{Command, Pager};
use crate::domain::incident::Source;
use crate::intake::Intake;

const SOURCE: Source = Source::Esl;
/// Bytes read per call; at most [`esl::MAX_PUSH`].
const READ_CHUNK: usize = 16 * 1024;
/// The keepalive probe.
const PROBE: &str = "api uptime\n\n";

/// Runs the ESL feed until `token` is cancelled.
pub async fn run(
    cfg: FreeswitchSettings,
    max_backoff: Duration,
    intake: Arc<Intake>,
    pager: Arc<Pager>,
    token: CancellationToken,
) {
    let backoff = feed::reconnect_backoff(max_backoff);
    feed::reconnecting(SOURCE, &cfg.address, &intake, &backoff, &token, |_attempt| {
        session(&cfg, &intake, &pager, &token, &backoff, feed::KEEPALIVE)
    })
    .await
}

/// The socket, its reader and the read buffer of one connection.
struct Conn {
    stream: TcpStream,
    reader: EslReader,
    buf: Vec<u8>,
}

impl Conn {
    /// The next message, reading as needed until `deadline`.
    async fn next_by(&mut self, deadline: Instant) -> Result<EslMessage, FeedError> {
        loop {
            if let Some(m) = self.reader.next_message().map_err(framing)? {
                return Ok(m);
            }
            let n = tokio::time::timeout_at(deadline, self.stream.read(&mut self.buf))
                .await
                .map_err(|_| FeedError::LoginTimeout)?
                .map_err(FeedError::Io)?;
            self.received(n)?;
        }
    }

    fn received(&mut self, n: usize) -> Result<(), FeedError> {
        if n == 0 {
            return Err(FeedError::Closed);
        }
        self.reader.push(&self.buf[..n]).map_err(framing)
    }

    async fn write(&mut self, text: &str) -> Result<(), FeedError> {
        self.stream.write_all(text.as_bytes()).await.map_err(FeedError::Io)
    }
}

/// One connection. `Ok` only when shutdown came.
async fn session(
    cfg: &FreeswitchSettings,
    intake: &Intake,
    pager: &Pager,
    token: &CancellationToken,
    backoff: &Backoff,
    keepalive: Duration,
) -> Result<(), FeedError> {
    let stream = feed::connect(&cfg.address).await?;
    let mut c = Conn { stream, reader: EslReader::new(), buf: vec![0u8; READ_CHUNK] };
    let deadline = Instant::now() + feed::LOGIN_TIMEOUT;

    loop {
        match c.next_by(deadline).await? {
            EslMessage::AuthRequest => break,
            EslMessage::RudeRejection(_) => return Err(FeedError::LoginRefused("rude rejection (ACL)".into())),
            EslMessage::DisconnectNotice(_) => return Err(FeedError::Closed),
            _ => {}
        }
    }
    let auth = esl::auth_command(cfg.password.expose())
        .map_err(|_| FeedError::LoginRefused("the password contains a line break".into()))?;
    c.write(&auth).await?;
    loop {
        let m = c.next_by(deadline).await?;
        match esl::auth_result(&m) {
            Ok(Some(())) => break,
            Ok(None) => {}
            Err(esl::LoginFailed(text)) => return Err(FeedError::LoginRefused(crate::domain::call::clean(&text, 80))),
        }
    }
    c.write(esl::EVENT_SUBSCRIPTION).await?;
    loop {
        match c.next_by(deadline).await? {
            EslMessage::CommandReply(r) if r.is_ok() => break,
            EslMessage::CommandReply(r) => {
                return Err(FeedError::Subscribe(crate::domain::call::clean(&r.reply_text, 80)));
            }
            EslMessage::DisconnectNotice(_) => return Err(FeedError::Closed),
            _ => {}
        }
    }

    feed::set_connected(SOURCE, true);
    backoff.reset();
    tracing::info!(address = %cfg.address, "ESL logged in and subscribed");

    // Page calls (contract §11) go out on this connection while it lasts.
    let (commands, mut to_place) = mpsc::channel::<Command>(32);
    let _attached = feed::Attached::new(pager, SOURCE, commands);

    let mut probed = false;
    loop {
        while let Some(m) = c.reader.next_message().map_err(framing)? {
            match m {
                EslMessage::Event(ev) => {
                    if let Some((id, report)) = esl::page_report(&ev) {
                        pager.report(&id, report);
                    }
                    if let Some(ev) = esl::map_event(&ev)
                        && !feed::deliver(intake, ev, token).await
                    {
                        return Ok(());
                    }
                }
                EslMessage::DisconnectNotice(_) => return Err(FeedError::Closed),
                _ => {} // api/response to the probe, log/data, ...
            }
        }
        tokio::select! {
            read = tokio::time::timeout(keepalive, c.stream.read(&mut c.buf)) => match read {
                Err(_) if probed => return Err(FeedError::Dead),
                Err(_) => {
                    c.write(PROBE).await?;
                    probed = true;
                }
                Ok(Ok(n)) => {
                    probed = false;
                    c.received(n)?;
                }
                Ok(Err(e)) => return Err(FeedError::Io(e)),
            },
            Some(cmd) = to_place.recv() => match cmd {
                Command::Originate { id, phone, context, ring, vars } => {
                    c.write(&esl::originate(&id, &phone, &context, ring, &vars)).await?;
                }
                Command::Hangup { id } => c.write(&esl::hangup(&id)).await?,
            },
        }
    }
}

/// The reader's error as a label: its text may quote the line, and that line
/// may hold a caller's number.
fn framing(e: EslError) -> FeedError {
    FeedError::Framing(match e {
        EslError::HeaderTooLarge => "header block too large",
        EslError::BodyTooLarge(_) => "Content-Length too large",
        EslError::BadContentLength(_) => "bad Content-Length",
        EslError::MalformedHeader(_) => "malformed header line",
        EslError::BufferFull => "buffer full",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// Reads one command (up to its blank line); empty at EOF.
    async fn command(s: &mut TcpStream, buf: &mut Vec<u8>) -> String {
        loop {
            if let Some(i) = buf.windows(2).position(|w| w == b"\n\n") {
                let c = String::from_utf8_lossy(&buf[..i]).into_owned();
                buf.drain(..i + 2);
                return c;
            }
            let mut chunk = [0u8; 1024];
            let n = s.read(&mut chunk).await.expect("read");
            if n == 0 {
                return String::new();
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// A listener for the in-test PBX, and the settings that reach it.
    async fn pbx() -> (TcpListener, FreeswitchSettings) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = l.local_addr().expect("addr").to_string();
        let cfg =
            serde_json::from_value(serde_json::json!({"address": address, "password": "ClueCon"})).expect("settings");
        (l, cfg)
    }

    #[tokio::test]
    async fn a_silent_peer_is_probed_once_then_dropped() {
        let (l, cfg) = pbx().await;
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut buf = Vec::new();
            s.write_all(b"Content-Type: auth/request\n\n").await.expect("greeting");
            assert_eq!(command(&mut s, &mut buf).await, "auth ClueCon");
            s.write_all(b"Content-Type: command/reply\nReply-Text: +OK accepted\n\n").await.expect("reply");
            assert_eq!(format!("{}\n\n", command(&mut s, &mut buf).await), esl::EVENT_SUBSCRIPTION);
            s.write_all(b"Content-Type: command/reply\nReply-Text: +OK event listener enabled plain\n\n")
                .await
                .expect("reply");
            let mut commands = Vec::new();
            loop {
                let c = command(&mut s, &mut buf).await;
                if c.is_empty() {
                    return commands;
                }
                commands.push(c);
            }
        });
        let token = CancellationToken::new();
        let backoff = feed::reconnect_backoff(Duration::from_secs(1));
        let intake = crate::acd::asterisk::tests::idle_intake();
        let r = session(&cfg, &intake, &Pager::default(), &token, &backoff, Duration::from_millis(200)).await;
        assert!(matches!(r, Err(FeedError::Dead)), "{r:?}");
        assert_eq!(server.await.expect("server"), ["api uptime"]);
    }

    #[tokio::test]
    async fn refused_auth_and_subscription_are_errors() {
        let (l, cfg) = pbx().await;
        let server = tokio::spawn(async move {
            // -ERR invalid to the auth; then a refused subscription; then an ACL rejection.
            for round in 0..3 {
                let (mut s, _) = l.accept().await.expect("accept");
                let mut buf = Vec::new();
                if round == 2 {
                    let _ = s
                        .write_all(
                            b"Content-Type: text/rude-rejection\nContent-Length: 24\n\nAccess Denied, go away.\n",
                        )
                        .await;
                    continue;
                }
                s.write_all(b"Content-Type: auth/request\n\n").await.expect("greeting");
                let _ = command(&mut s, &mut buf).await;
                if round == 0 {
                    s.write_all(b"Content-Type: command/reply\nReply-Text: -ERR invalid\n\n").await.expect("reply");
                    continue;
                }
                s.write_all(b"Content-Type: command/reply\nReply-Text: +OK accepted\n\n").await.expect("reply");
                let _ = command(&mut s, &mut buf).await;
                s.write_all(b"Content-Type: command/reply\nReply-Text: -ERR no keywords supplied\n\n")
                    .await
                    .expect("reply");
            }
        });
        let token = CancellationToken::new();
        let backoff = feed::reconnect_backoff(Duration::from_secs(1));
        let intake = crate::acd::asterisk::tests::idle_intake();
        let keepalive = Duration::from_secs(5);
        let r = session(&cfg, &intake, &Pager::default(), &token, &backoff, keepalive).await;
        assert!(matches!(&r, Err(FeedError::LoginRefused(m)) if m == "-ERR invalid"), "{r:?}");
        let r = session(&cfg, &intake, &Pager::default(), &token, &backoff, keepalive).await;
        assert!(matches!(&r, Err(FeedError::Subscribe(m)) if m.starts_with("-ERR")), "{r:?}");
        let r = session(&cfg, &intake, &Pager::default(), &token, &backoff, keepalive).await;
        assert!(matches!(&r, Err(FeedError::LoginRefused(_))), "{r:?}");
        server.await.expect("server");
    }
}
