//! The Asterisk Manager Interface connection: connect, log in, read events,
//! hand them to intake; reconnect when anything goes wrong.
//!
//! One loop per configured `[acd.asterisk]`:
//! 1. TCP connect (5 s timeout, TCP keepalive on), send `Action: Login` with an
//!    `ActionID` and `Events: call,agent,dtmf`, wait up to 10 s for its answer
//!    (`Response: Success`; `Response: Error` / `Message: Authentication
//!    failed` is a login failure).
//! 2. Read → [`AmiReader`] → [`ami::map_event`] → [`Intake::apply`], one event
//!    at a time. When apply fails (Redis does not answer) the same event is
//!    retried with backoff and nothing more is read meanwhile: the kernel's
//!    socket buffers, then Asterisk, hold the rest (see the README on
//!    `writetimeout`), and no event is lost or reordered.
//! 3. A framing error (over-long line or message) drops that one message; the
//!    reader resynchronises at the next blank line and the connection stays.
//! 4. EOF, a socket error, a failed login or a dead peer: logged (never the
//!    secret, never an event's fields), counted in
//!    `dispatchd_acd_errors_total{source="ami",reason}`,
//!    `dispatchd_acd_connected{source="ami"}` goes to 0, and the next attempt
//!    waits 250 ms, doubling up to `acd.max_backoff`; a successful login
//!    resets the delay.
//!
//! # Dead peers
//!
//! A quiet call centre sends no events for a long time, and a PBX that
//! vanished (power, network partition) sends no FIN either. After 20 s
//! without a byte the loop sends `Action: Ping`; Asterisk answers at once
//! (`Response: Success`, `Ping: Pong`), and any byte counts as an answer.
//! Another 20 s of silence after the probe ends the connection. The probe
//! costs one small action per idle 20 s, needs no extra manager permission,
//! and detects a hung Asterisk too, which TCP keepalive (also on, for the
//! time spent not reading while Redis is away) would not.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::ami::{self, AmiReader, LoginOutcome};
use super::feed::{self, Backoff, FeedError};
use crate::config::AsteriskSettings;
use crate::dispatcher::pager::{Command, Pager, Report};
use crate::domain::incident::Source;
use crate::intake::Intake;

const SOURCE: Source = Source::Ami;
/// Bytes read per call (one AMI line is at most [`ami::MAX_LINE`]).
const READ_CHUNK: usize = 8 * 1024;

/// Runs the AMI feed until `token` is cancelled.
pub async fn run(
    cfg: AsteriskSettings,
    max_backoff: Duration,
    intake: Arc<Intake>,
    pager: Arc<Pager>,
    token: CancellationToken,
) {
    let backoff = feed::reconnect_backoff(max_backoff);
    feed::reconnecting(SOURCE, &cfg.address, &intake, &backoff, &token, |attempt| {
        session(&cfg, &intake, &pager, &token, &backoff, attempt, feed::KEEPALIVE)
    })
    .await
}

/// One connection. `Ok` only when shutdown came.
async fn session(
    cfg: &AsteriskSettings,
    intake: &Intake,
    pager: &Pager,
    token: &CancellationToken,
    backoff: &Backoff,
    attempt: u64,
    keepalive: Duration,
) -> Result<(), FeedError> {
    let mut stream = feed::connect(&cfg.address).await?;
    let mut reader = AmiReader::new();
    let mut buf = vec![0u8; READ_CHUNK];

    let login_id = format!("dispatchd-login-{attempt}");
    stream
        .write_all(ami::login(&cfg.username, cfg.secret.expose(), &login_id).as_bytes())
        .await
        .map_err(FeedError::Io)?;
    let deadline = tokio::time::Instant::now() + feed::LOGIN_TIMEOUT;
    'login: loop {
        while let Some(m) = reader.next_message() {
            match m {
                Ok(msg) => match ami::login_response(&msg, &login_id) {
                    Some(LoginOutcome::Accepted) => break 'login,
                    Some(LoginOutcome::Rejected { message }) => {
                        return Err(FeedError::LoginRefused(crate::domain::call::clean(&message, 80)));
                    }
                    None => {}
                },
                Err(e) => framing(&e),
            }
        }
        let n = tokio::time::timeout_at(deadline, stream.read(&mut buf))
            .await
            .map_err(|_| FeedError::LoginTimeout)?
            .map_err(FeedError::Io)?;
        if n == 0 {
            return Err(FeedError::Closed);
        }
        reader.push(&buf[..n]);
    }

    feed::set_connected(SOURCE, true);
    backoff.reset();
    tracing::info!(
        address = %cfg.address,
        version = reader.banner_version().map(|v| crate::domain::call::clean(v, 32)).unwrap_or_default(),
        "AMI logged in"
    );

    // Page calls (contract §11) go out on this connection while it lasts.
    let (commands, mut to_place) = mpsc::channel::<Command>(32);
    let _attached = feed::Attached::new(pager, SOURCE, commands);
    // Channel names of our page calls, to hang them up by name.
    let mut page_channels: HashMap<String, String> = HashMap::new();

    let mut probed = false;
    let mut pings: u64 = 0;
    loop {
        // Everything already received first (the login answer may have come with events).
        while let Some(m) = reader.next_message() {
            match m {
                Ok(msg) => {
                    if let Some((id, name)) = ami::page_channel(&msg)
                        && pager.is_call(&id)
                    {
                        // Only calls still waited for: the map stays as small as they are.
                        page_channels.retain(|id, _| pager.is_call(id));
                        page_channels.insert(id, name);
                    }
                    if let Some((id, report)) = ami::page_report(&msg) {
                        if matches!(report, Report::Hangup(_) | Report::Failed(_)) {
                            page_channels.remove(&id);
                        }
                        pager.report(&id, report);
                    }
                    if let Some(ev) = ami::map_event(&msg)
                        && !feed::deliver(intake, ev, token).await
                    {
                        return Ok(());
                    }
                }
                Err(e) => framing(&e),
            }
        }
        tokio::select! {
            read = tokio::time::timeout(keepalive, stream.read(&mut buf)) => match read {
                Err(_) if probed => return Err(FeedError::Dead),
                Err(_) => {
                    pings = pings.wrapping_add(1);
                    write(&mut stream, &ami::ping(&format!("dispatchd-ping-{pings}"))).await?;
                    probed = true;
                }
                Ok(Ok(0)) => return Err(FeedError::Closed),
                Ok(Ok(n)) => {
                    probed = false;
                    reader.push(&buf[..n]);
                }
                Ok(Err(e)) => return Err(FeedError::Io(e)),
            },
            Some(cmd) = to_place.recv() => match cmd {
                Command::Originate { id, phone, context, ring, vars } => {
                    write(&mut stream, &ami::originate(&id, &phone, &context, ring, &vars)).await?;
                }
                Command::Hangup { id } => {
                    if let Some(name) = page_channels.remove(&id) {
                        write(&mut stream, &ami::hangup(&name, &id)).await?;
                    }
                }
            },
        }
    }
}

async fn write(stream: &mut TcpStream, text: &str) -> Result<(), FeedError> {
    stream.write_all(text.as_bytes()).await.map_err(FeedError::Io)
}

/// One message dropped; the reader resynchronises by itself.
fn framing(e: &ami::AmiError) {
    feed::count_error(SOURCE, "framing");
    tracing::warn!(error = %e, "AMI message dropped");
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::TcpListener;

    /// An intake whose Redis is never reached (no event is delivered here).
    pub(crate) fn idle_intake() -> Intake {
        let mut settings = crate::config::Settings::default();
        settings.redis.url = crate::config::Secret::new("redis://127.0.0.1:1/0");
        settings.redis.timeout = Duration::from_millis(100);
        Intake::new(crate::store::Store::from_settings(&settings.redis).expect("store"), &settings)
    }

    /// A listener for the in-test PBX, and the settings that reach it.
    async fn pbx() -> (TcpListener, AsteriskSettings) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = l.local_addr().expect("addr").to_string();
        let cfg = serde_json::from_value(serde_json::json!({"address": address, "username": "u", "secret": "pw"}))
            .expect("settings");
        (l, cfg)
    }

    /// One action's lines; empty at EOF.
    async fn action(r: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).await.expect("read") == 0 {
                return lines;
            }
            let line = line.trim_end().to_string();
            if line.is_empty() {
                return lines;
            }
            lines.push(line);
        }
    }

    #[tokio::test]
    async fn a_silent_peer_is_pinged_once_then_dropped() {
        let (l, cfg) = pbx().await;
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.expect("accept");
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"Asterisk Call Manager/5.0.2\r\n").await.expect("banner");
            let login = action(&mut r).await;
            assert!(login.contains(&"Action: Login".to_string()), "{login:?}");
            assert!(login.contains(&"ActionID: dispatchd-login-1".to_string()), "{login:?}");
            w.write_all(
                b"Response: Success\r\nActionID: dispatchd-login-1\r\nMessage: Authentication accepted\r\n\r\n",
            )
            .await
            .expect("answer");
            // Then silence: every action until the client hangs up.
            let mut actions = Vec::new();
            loop {
                let a = action(&mut r).await;
                if a.is_empty() {
                    return actions;
                }
                actions.push(a);
            }
        });
        let token = CancellationToken::new();
        let backoff = feed::reconnect_backoff(Duration::from_secs(1));
        let intake = idle_intake();
        let r = session(&cfg, &intake, &Pager::default(), &token, &backoff, 1, Duration::from_millis(200)).await;
        assert!(matches!(r, Err(FeedError::Dead)), "{r:?}");
        let actions = server.await.expect("server");
        assert_eq!(actions.len(), 1, "one probe, then the connection is given up: {actions:?}");
        assert_eq!(actions[0], ["Action: Ping", "ActionID: dispatchd-ping-1"]);
    }

    #[tokio::test]
    async fn a_refused_login_and_a_closed_socket_are_errors() {
        let (l, cfg) = pbx().await;
        let server = tokio::spawn(async move {
            for answer in
                [&b"Response: Error\r\nActionID: dispatchd-login-1\r\nMessage: Authentication failed\r\n\r\n"[..], b""]
            {
                let (s, _) = l.accept().await.expect("accept");
                let (r, mut w) = s.into_split();
                let mut r = BufReader::new(r);
                let _ = action(&mut r).await;
                w.write_all(answer).await.expect("answer");
            }
        });
        let token = CancellationToken::new();
        let backoff = feed::reconnect_backoff(Duration::from_secs(1));
        let intake = idle_intake();
        let r = session(&cfg, &intake, &Pager::default(), &token, &backoff, 1, Duration::from_secs(5)).await;
        assert!(matches!(&r, Err(FeedError::LoginRefused(m)) if m == "Authentication failed"), "{r:?}");
        let r = session(&cfg, &intake, &Pager::default(), &token, &backoff, 1, Duration::from_secs(5)).await;
        assert!(matches!(r, Err(FeedError::Closed)), "{r:?}");
        server.await.expect("server");
    }
}
