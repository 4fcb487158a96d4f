//! FreeSWITCH event socket (ESL, inbound mode): the pure wire part.
//!
//! No I/O here. The connection loop (`acd::freeswitch`) reads from the socket, hands the
//! bytes to [`EslReader::push`], drains [`EslReader::next_message`] until it
//! answers `Ok(None)`, writes [`auth_command`] when it sees
//! [`EslMessage::AuthRequest`], checks the reply with [`auth_result`], writes
//! [`EVENT_SUBSCRIPTION`], and turns every [`EslMessage::Event`] into a
//! [`CallEvent`] with [`map_event`]. Any `Err` from the reader means the stream can no
//! longer be framed: close the connection and reconnect.
//!
//! # Wire format (mod_event_socket)
//!
//! Every message is a header block: `Key: Value` lines ending in LF, closed by
//! an empty line. If the block has `Content-Length: N`, exactly N bytes of body
//! follow. The `Content-Type` says what it is:
//!
//! - `auth/request` — the greeting; answer with `auth <password>\n\n`.
//! - `command/reply` — `Reply-Text: +OK accepted` or `-ERR invalid` (and
//!   `+OK event listener enabled plain` for the subscription).
//! - `text/event-plain` — the body is itself a header block of event fields
//!   whose values are URL-encoded (`Caller-Caller-ID-Name: Jane%20Doe`),
//!   optionally followed by the event's own body (when the event carries a
//!   `Content-Length` field).
//! - `text/disconnect-notice` — FreeSWITCH is closing the socket.
//! - `text/rude-rejection` — the ACL refused us (sent before the greeting).
//!
//! Envelope header values are not URL-encoded; event field values are.
//!
//! # Subscription order matters
//!
//! mod_event_socket's `event` command treats **every** token after `CUSTOM`
//! as a subclass name, so `event plain CUSTOM callcenter::info CHANNEL_HANGUP
//! DTMF` (the order written in issue 5) would subscribe to subclasses called
//! `CHANNEL_HANGUP` and `DTMF` and never deliver hangups or digits. The plain
//! event names therefore come first: see [`EVENT_SUBSCRIPTION`].
//!
//! # Correlation
//!
//! `call_ref` is the UUID of the caller's channel:
//! - mod_callcenter events: `CC-Member-Session-UUID` (the member's channel).
//!   `Unique-ID` is *not* used for `bridge-agent-start`/`agent-offering`,
//!   because mod_callcenter fills the channel fields of `bridge-agent-start`
//!   from the *agent's* channel. For `member-queue-start`/`member-queue-end`
//!   the channel fields are the member's, so `Unique-ID` is the fallback there.
//! - `CHANNEL_HANGUP` and `DTMF`: `Unique-ID` (the channel the event is about),
//!   which for the caller's leg is the same UUID as `CC-Member-Session-UUID`.
//!   Agent legs hang up too; they carry their own UUID and simply match no
//!   queued call.
//!
//! Field names follow mod_callcenter.c (`CC-Queue`, `CC-Action`, `CC-Cause`,
//! `CC-Cancel-Reason`, `CC-Agent`, `CC-Member-Session-UUID`,
//! `CC-Member-CID-Number`, `CC-Member-CID-Name`, `CC-Member-Joined-Time`,
//! `CC-Member-Leaving-Time`) and the FreeSWITCH event model (`Event-Name`,
//! `Event-Subclass`, `Unique-ID`, `Caller-Caller-ID-Number`, `Hangup-Cause`,
//! `DTMF-Digit`).

use std::fmt;

use crate::domain::call::{CallEvent, EventKind};
use crate::domain::incident::Source;
use crate::domain::ivr::IvrPath;

/// Largest envelope header block accepted (a real one is ~100 bytes).
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;
/// Largest `Content-Length` accepted (a plain channel event is a few KiB).
pub const MAX_BODY: usize = 1024 * 1024;
/// Largest chunk [`EslReader::push`] expects per call; the buffer limit leaves
/// this much room above one maximal message.
pub const MAX_PUSH: usize = 64 * 1024;
/// Hard cap on buffered bytes; [`EslReader::push`] refuses to grow past it.
pub const MAX_BUFFERED: usize = MAX_HEADER_BLOCK + MAX_BODY + MAX_PUSH;

/// The subscription this adapter needs. Plain event names first, then
/// `CUSTOM` and its subclass (everything after `CUSTOM` is a subclass).
pub const EVENT_SUBSCRIPTION: &str =
    "event plain CHANNEL_HANGUP DTMF BACKGROUND_JOB CUSTOM callcenter::info dispatchd::page\n\n";

/// Why the byte stream can no longer be framed. After any of these the reader
/// stays failed; the connection must be closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EslError {
    #[error("ESL header block exceeds {MAX_HEADER_BLOCK} bytes without an end")]
    HeaderTooLarge,
    #[error("ESL Content-Length {0} exceeds the {MAX_BODY}-byte limit")]
    BodyTooLarge(usize),
    #[error("ESL Content-Length is not a number: {0:?}")]
    BadContentLength(String),
    #[error("ESL header line is not `Key: Value`: {0:?}")]
    MalformedHeader(String),
    #[error("ESL buffer would exceed {MAX_BUFFERED} bytes (messages not drained?)")]
    BufferFull,
}

/// An ordered list of header fields. Lookups are ASCII-case-insensitive and
/// return the first match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v.as_str())
    }

    /// The value, trimmed, or `None` when absent or blank.
    pub fn get_nonempty(&self, key: &str) -> Option<&str> {
        self.get(key).map(str::trim).filter(|v| !v.is_empty())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Headers {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Headers(iter.into_iter().map(|(k, v)| (k.into(), v.into())).collect())
    }
}

/// One FreeSWITCH event (from a `text/event-plain` body), values decoded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EslEvent {
    pub fields: Headers,
    /// The event's own body, when it has one (e.g. `BACKGROUND_JOB`).
    pub body: Option<String>,
}

impl EslEvent {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key)
    }

    fn field(&self, key: &str) -> Option<&str> {
        self.fields.get_nonempty(key)
    }

    /// `Event-Name`, e.g. `CUSTOM`, `CHANNEL_HANGUP`, `DTMF`.
    pub fn name(&self) -> Option<&str> {
        self.field("Event-Name")
    }

    /// `Event-Subclass`, e.g. `callcenter::info` (CUSTOM events only).
    pub fn subclass(&self) -> Option<&str> {
        self.field("Event-Subclass")
    }
}

/// A `command/reply`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandReply {
    /// `Reply-Text`, e.g. `+OK accepted`, `-ERR invalid`; empty if missing.
    pub reply_text: String,
    pub headers: Headers,
}

impl CommandReply {
    pub fn is_ok(&self) -> bool {
        self.reply_text.trim_start().starts_with("+OK")
    }
}

/// One framed ESL message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EslMessage {
    /// `auth/request`: send [`auth_command`].
    AuthRequest,
    CommandReply(CommandReply),
    Event(EslEvent),
    /// `text/disconnect-notice` with its body text.
    DisconnectNotice(String),
    /// `text/rude-rejection` (ACL refusal) with its body text.
    RudeRejection(String),
    /// Anything else (`api/response`, `log/data`, no Content-Type, ...).
    Other {
        content_type: Option<String>,
        headers: Headers,
        body: Vec<u8>,
    },
}

/// Incremental framer: feed bytes as they arrive, take messages as they
/// complete. Messages may be split across pushes or arrive several per push.
#[derive(Debug, Default)]
pub struct EslReader {
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed (compacted lazily on `push`).
    start: usize,
    /// Offset (from `start`) up to which the current header block was scanned
    /// for its end without finding it, so 1-byte pushes stay linear.
    scanned: usize,
    /// Header block parsed, waiting for this many body bytes.
    pending: Option<(Headers, usize)>,
    failed: Option<EslError>,
}

impl EslReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes received but not yet returned as messages.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Append received bytes. Fails (and poisons the reader) rather than grow
    /// past [`MAX_BUFFERED`]; with `next_message` drained after every push and
    /// chunks of at most [`MAX_PUSH`] bytes this never happens on valid input.
    pub fn push(&mut self, data: &[u8]) -> Result<(), EslError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.buffered().saturating_add(data.len()) > MAX_BUFFERED {
            return Err(self.fail(EslError::BufferFull));
        }
        if self.start > 0 && (self.start >= self.buf.len() / 2 || self.buf.len() + data.len() > self.buf.capacity()) {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// The next complete message, `Ok(None)` if more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<EslMessage>, EslError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        loop {
            if let Some((_, len)) = &self.pending {
                let len = *len;
                if self.buffered() < len {
                    return Ok(None);
                }
                let body = self.buf[self.start..self.start + len].to_vec();
                self.start += len;
                let headers = self.pending.take().map(|(h, _)| h).unwrap_or_default();
                return Ok(Some(classify(headers, body)));
            }

            // Stray blank lines between messages are skipped.
            while self.start < self.buf.len() && matches!(self.buf[self.start], b'\n' | b'\r') {
                self.start += 1;
                self.scanned = 0;
            }
            let avail = &self.buf[self.start..];
            let Some(end) = find_block_end(avail, self.scanned) else {
                if avail.len() > MAX_HEADER_BLOCK {
                    return Err(self.fail(EslError::HeaderTooLarge));
                }
                // Resume next time just before the last (possibly partial) line end.
                self.scanned = avail.len().saturating_sub(2);
                return Ok(None);
            };
            if end.block_len > MAX_HEADER_BLOCK {
                return Err(self.fail(EslError::HeaderTooLarge));
            }
            let block = &avail[..end.block_len];
            let headers = match parse_envelope(block) {
                Ok(h) => h,
                Err(e) => return Err(self.fail(e)),
            };
            let len = match headers.get("Content-Length") {
                None => 0,
                Some(v) => match v.trim().parse::<usize>() {
                    Ok(n) if n > MAX_BODY => return Err(self.fail(EslError::BodyTooLarge(n))),
                    Ok(n) => n,
                    Err(_) => return Err(self.fail(EslError::BadContentLength(v.to_string()))),
                },
            };
            self.start += end.total_len;
            self.scanned = 0;
            self.pending = Some((headers, len));
        }
    }

    fn fail(&mut self, e: EslError) -> EslError {
        self.failed = Some(e.clone());
        self.pending = None;
        self.buf = Vec::new();
        self.start = 0;
        e
    }
}

struct BlockEnd {
    /// Bytes of header lines (up to and including the last line's LF).
    block_len: usize,
    /// `block_len` plus the terminating empty line.
    total_len: usize,
}

/// Finds the empty line that closes a header block: `\n\n` (or `\n\r\n`).
fn find_block_end(buf: &[u8], from: usize) -> Option<BlockEnd> {
    let mut i = from;
    while let Some(off) = buf.get(i..)?.iter().position(|&b| b == b'\n') {
        let lf = i + off;
        match buf.get(lf + 1) {
            Some(b'\n') => return Some(BlockEnd { block_len: lf + 1, total_len: lf + 2 }),
            Some(b'\r') if buf.get(lf + 2) == Some(&b'\n') => {
                return Some(BlockEnd { block_len: lf + 1, total_len: lf + 3 });
            }
            Some(_) => i = lf + 1,
            None => return None,
        }
    }
    None
}

/// Splits a `Key: Value` line. The key must be non-empty and free of spaces.
fn split_header(line: &str) -> Option<(&str, &str)> {
    let (k, v) = line.split_once(':')?;
    if k.is_empty() || k.contains(char::is_whitespace) {
        return None;
    }
    Some((k, v.trim_start_matches(' ')))
}

fn lines(block: &[u8]) -> impl Iterator<Item = &[u8]> {
    block.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l)).filter(|l| !l.is_empty())
}

/// The envelope is strict: a line that is not `Key: Value` means we have lost
/// the framing.
fn parse_envelope(block: &[u8]) -> Result<Headers, EslError> {
    let mut out = Vec::new();
    for raw in lines(block) {
        let line = std::str::from_utf8(raw)
            .map_err(|_| EslError::MalformedHeader(String::from_utf8_lossy(raw).chars().take(80).collect()))?;
        let (k, v) = split_header(line).ok_or_else(|| EslError::MalformedHeader(line.chars().take(80).collect()))?;
        out.push((k.to_string(), v.to_string()));
    }
    Ok(Headers(out))
}

fn classify(headers: Headers, body: Vec<u8>) -> EslMessage {
    let content_type = headers.get("Content-Type").map(|s| s.trim().to_ascii_lowercase());
    match content_type.as_deref() {
        Some("auth/request") => EslMessage::AuthRequest,
        Some("command/reply") => EslMessage::CommandReply(CommandReply {
            reply_text: headers.get("Reply-Text").unwrap_or("").trim().to_string(),
            headers,
        }),
        Some("text/event-plain") => EslMessage::Event(parse_event_plain(&body)),
        Some("text/disconnect-notice") => EslMessage::DisconnectNotice(String::from_utf8_lossy(&body).into_owned()),
        Some("text/rude-rejection") => EslMessage::RudeRejection(String::from_utf8_lossy(&body).into_owned()),
        _ => EslMessage::Other { content_type: headers.get("Content-Type").map(str::to_string), headers, body },
    }
}

/// Parses a `text/event-plain` body. Lenient: the body length is known, so a
/// bad field costs only that field, never the framing. Lines without a colon
/// are skipped; values are percent-decoded.
pub fn parse_event_plain(body: &[u8]) -> EslEvent {
    let (block, rest) = match find_block_end(body, 0) {
        Some(end) => (&body[..end.block_len], &body[end.total_len..]),
        None => (body, &body[body.len()..]),
    };
    let mut fields = Vec::new();
    for raw in lines(block) {
        let line = String::from_utf8_lossy(raw);
        if let Some((k, v)) = split_header(&line) {
            fields.push((k.to_string(), percent_decode(v)));
        }
    }
    let fields = Headers(fields);
    let body = fields
        .get("Content-Length")
        .and_then(|v| v.trim().parse::<usize>().ok())
        .map(|n| String::from_utf8_lossy(&rest[..n.min(rest.len())]).into_owned());
    EslEvent { fields, body }
}

/// `%XX` → byte; anything else (including `+`, which starts E.164 numbers and
/// stray `%`) is kept literally. Invalid UTF-8 is replaced, not rejected.
pub fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) =
                (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex))
        {
            out.push((h << 4) | l);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

// ---------------------------------------------------------------- commands

/// A value inside `{…}` of an originate: quoted, without what would end it.
fn fs_value(v: &str) -> String {
    let clean: String = v.chars().filter(|c| !c.is_control() && !matches!(c, '\'' | '{' | '}' | ',' | '\\')).collect();
    format!("'{clean}'")
}

/// The page call of contract §11: `bgapi originate` with `origination_uuid` =
/// `id` (and `Job-UUID` = `id`, so the job's result names the call), ringing
/// at most `ring`, into extension `s` of the XML dialplan context `context`.
pub fn originate(id: &str, phone: &str, context: &str, ring: std::time::Duration, vars: &[(&str, String)]) -> String {
    let one = |v: &str| v.chars().filter(|c| !c.is_control() && *c != ' ').collect::<String>();
    let mut vs = vec![
        format!("origination_uuid={}", one(id)),
        format!("originate_timeout={}", ring.as_secs().max(1)),
        "origination_caller_id_name=dispatchd".to_string(),
    ];
    vs.extend(vars.iter().map(|(k, v)| format!("{}={}", k.to_ascii_lowercase(), fs_value(v))));
    format!("bgapi originate {{{}}}{} s XML {}\nJob-UUID: {}\n\n", vs.join(","), one(phone), one(context), one(id))
}

/// Hangs the page call `id` up.
pub fn hangup(id: &str) -> String {
    let id: String = id.chars().filter(|c| c.is_ascii_hexdigit() || *c == '-').collect();
    format!("bgapi uuid_kill {id}\n\n")
}

/// What a FreeSWITCH hang-up cause means for a page call never answered.
fn unanswered(cause: &str, other: &str) -> crate::domain::dispatch::Outcome {
    use crate::domain::dispatch::Outcome;
    match cause {
        "USER_BUSY" => Outcome::Busy,
        "NO_ANSWER" | "NO_USER_RESPONSE" | "ORIGINATOR_CANCEL" | "RECOVERY_ON_TIMER_EXPIRE" => Outcome::NoAnswer,
        _ => Outcome::Failed(other.into()),
    }
}

/// What an event says about a page call: `CUSTOM dispatchd::page` (`Choice`:
/// the digit) on the call's channel; the `BACKGROUND_JOB` of its originate (`+OK`:
/// answered, `-ERR`: busy, no answer, …); `CHANNEL_HANGUP` of its channel.
pub fn page_report(ev: &EslEvent) -> Option<(String, crate::dispatcher::pager::Report)> {
    use crate::dispatcher::pager::Report;
    match ev.name()? {
        "CUSTOM" if ev.subclass() == Some("dispatchd::page") => {
            let digit = ev.get("Choice")?.trim().chars().next()?;
            Some((ev.get("Unique-ID")?.trim().to_string(), Report::Digit(digit)))
        }
        "BACKGROUND_JOB" => {
            let id = ev.get("Job-UUID")?.trim().to_string();
            let body = ev.body.as_deref().unwrap_or("").trim();
            if body.starts_with("+OK") {
                return Some((id, Report::Answered));
            }
            let cause = body.strip_prefix("-ERR")?.trim();
            Some((id, Report::Failed(unanswered(cause, "originate_failed"))))
        }
        "CHANNEL_HANGUP" => {
            let cause = ev.get("Hangup-Cause").unwrap_or("").trim();
            Some((ev.get("Unique-ID")?.trim().to_string(), Report::Hangup(unanswered(cause, "not_answered"))))
        }
        _ => None,
    }
}

/// The password would break out of the command line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ESL password must not contain line breaks")]
pub struct BadPassword;

/// `auth <password>\n\n`. Refuses passwords with CR/LF, which would end the
/// command early and inject another one.
pub fn auth_command(password: &str) -> Result<String, BadPassword> {
    if password.contains(['\n', '\r']) {
        return Err(BadPassword);
    }
    Ok(format!("auth {password}\n\n"))
}

/// FreeSWITCH refused our login (or the ACL refused the connection).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("FreeSWITCH refused the login: {0}")]
pub struct LoginFailed(pub String);

/// Interprets the message that follows `auth`: `+OK accepted` → `Ok`;
/// `-ERR invalid` (or any non-`+OK` reply), a rude rejection or a disconnect
/// notice → `LoginFailed`. Other messages are not an answer: `Ok(None)`
/// (keep reading).
pub fn auth_result(msg: &EslMessage) -> Result<Option<()>, LoginFailed> {
    match msg {
        EslMessage::CommandReply(r) if r.is_ok() => Ok(Some(())),
        EslMessage::CommandReply(r) => Err(LoginFailed(if r.reply_text.is_empty() {
            "command/reply without Reply-Text".to_string()
        } else {
            r.reply_text.clone()
        })),
        EslMessage::RudeRejection(text) => Err(LoginFailed(format!("rude rejection: {}", text.trim()))),
        EslMessage::DisconnectNotice(text) => Err(LoginFailed(format!("disconnected: {}", text.trim()))),
        _ => Ok(None),
    }
}

// ---------------------------------------------------------------- mapping

/// Why a caller left a queue without an agent (`CC-Cancel-Reason`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelReason {
    /// The caller hung up or left the queue (`BREAK_OUT`).
    BreakOut,
    /// `max-wait-time` reached (`TIMEOUT`).
    Timeout,
    /// `max-wait-time-with-no-agent` reached (`NO_AGENT_TIMEOUT`).
    NoAgentTimeout,
    /// The caller pressed the queue's exit key (`EXIT_WITH_KEY`).
    ExitWithKey,
    /// Missing, `NONE`, or a value this version does not know (kept verbatim).
    Other(String),
}

impl CancelReason {
    pub fn parse(s: &str) -> Self {
        match s.trim() {
            "BREAK_OUT" => Self::BreakOut,
            "TIMEOUT" => Self::Timeout,
            "NO_AGENT_TIMEOUT" => Self::NoAgentTimeout,
            "EXIT_WITH_KEY" => Self::ExitWithKey,
            other => Self::Other(other.to_string()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::BreakOut => "BREAK_OUT",
            Self::Timeout => "TIMEOUT",
            Self::NoAgentTimeout => "NO_AGENT_TIMEOUT",
            Self::ExitWithKey => "EXIT_WITH_KEY",
            Self::Other(s) => s,
        }
    }
}

impl fmt::Display for CancelReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Maps one event to a [`CallEvent`] (source `esl`), or `None` when it is not
/// one we use or lacks a field we cannot do without (`call_ref`, `queue`,
/// `agent`, digit).
///
/// - `CUSTOM` / `callcenter::info`, by `CC-Action`:
///   - `member-queue-start` → `QueueJoin` (caller from `CC-Member-CID-Number`,
///     else `Caller-Caller-ID-Number`; name likewise from `CC-Member-CID-Name`
///     / `Caller-Caller-ID-Name`);
///   - `member-queue-end` with `CC-Cause: Cancel` → `QueueAbandon` (`reason` =
///     `CC-Cancel-Reason`, wait = leaving − joined time); with `CC-Cause:
///     Terminated` the call was served and completed: `None` (the agent
///     connect and the hangup already say so);
///   - `bridge-agent-start` → `AgentConnect` (`agent` = `CC-Agent`);
///   - `agent-offering` → `None`: the agent is only being rung, which is not a
///     connect (it is recognised, not forgotten);
///   - other actions (agent status, members-count, ...) → `None`.
/// - `CHANNEL_HANGUP` → `Hangup` (`Unique-ID`, `reason` = `Hangup-Cause`).
/// - `DTMF` → `Dtmf` (`Unique-ID`, first char of `DTMF-Digit`).
///
/// See the module docs for which UUID is the `call_ref`.
pub fn map_event(ev: &EslEvent) -> Option<CallEvent> {
    let caller = |e: &mut CallEvent| {
        e.caller = ev.field("Caller-Caller-ID-Number").unwrap_or_default().to_string();
        e.caller_name = ev.field("Caller-Caller-ID-Name").unwrap_or_default().to_string();
    };
    match ev.name()? {
        "CHANNEL_HANGUP" => {
            let mut e = CallEvent::new(Source::Esl, EventKind::Hangup, ev.field("Unique-ID")?);
            caller(&mut e);
            e.reason = ev.field("Hangup-Cause").unwrap_or_default().to_string();
            Some(e)
        }
        "DTMF" => {
            let digit = ev.field("DTMF-Digit")?.chars().next()?;
            let mut e = CallEvent::new(Source::Esl, EventKind::Dtmf, ev.field("Unique-ID")?);
            caller(&mut e);
            e.ivr_path = IvrPath::from_selections([digit.to_string()]);
            Some(e)
        }
        "CUSTOM" if ev.subclass() == Some("callcenter::info") => map_callcenter(ev),
        _ => None,
    }
}

fn map_callcenter(ev: &EslEvent) -> Option<CallEvent> {
    let member_uuid = || ev.field("CC-Member-Session-UUID");
    // member-queue-* carry the member's channel fields, so Unique-ID is theirs.
    let member_uuid_or_channel = || member_uuid().or_else(|| ev.field("Unique-ID"));
    let queue = ev.field("CC-Queue")?;
    let member = |kind: EventKind, call_ref: &str| {
        let mut e = CallEvent::new(Source::Esl, kind, call_ref);
        e.queue = queue.to_string();
        e
    };
    // The member's caller ID, else the channel's.
    let with_caller = |e: &mut CallEvent| {
        let either = |a: &str, b: &str| ev.field(a).or_else(|| ev.field(b)).unwrap_or_default().to_string();
        e.caller = either("CC-Member-CID-Number", "Caller-Caller-ID-Number");
        e.caller_name = either("CC-Member-CID-Name", "Caller-Caller-ID-Name");
    };
    match ev.field("CC-Action")? {
        "member-queue-start" => {
            let mut e = member(EventKind::QueueJoin, member_uuid_or_channel()?);
            with_caller(&mut e);
            Some(e)
        }
        "member-queue-end" => match ev.field("CC-Cause")? {
            "Cancel" => {
                let mut e = member(EventKind::QueueAbandon, member_uuid_or_channel()?);
                let epoch = |k: &str| ev.field(k).and_then(|v| v.parse::<u64>().ok());
                e.wait_seconds = match (epoch("CC-Member-Joined-Time"), epoch("CC-Member-Leaving-Time")) {
                    (Some(joined), Some(left)) if joined > 0 => u32::try_from(left.saturating_sub(joined)).ok(),
                    _ => None,
                };
                e.reason = CancelReason::parse(ev.field("CC-Cancel-Reason").unwrap_or("")).as_str().to_string();
                // The callback rule needs to know who to call back.
                with_caller(&mut e);
                Some(e)
            }
            _ => None, // "Terminated": served and completed
        },
        "bridge-agent-start" => {
            let mut e = member(EventKind::AgentConnect, member_uuid()?);
            e.agent = ev.field("CC-Agent")?.to_string();
            Some(e)
        }
        _ => None, // agent-offering, bridge-agent-end/fail, agent-*-change, members-count, ...
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CALLER: &str = "5c4bd4f6-2b6b-4b2c-9a53-6f0f4b3f1c11";
    const AGENT_LEG: &str = "9e1d0f2a-8b7c-4d6e-a5f4-3b2c1d0e9f8a";

    /// An expected event of the caller's call: `kind`, then `f` fills the rest.
    fn call(kind: EventKind, f: impl FnOnce(&mut CallEvent)) -> CallEvent {
        let mut e = CallEvent::new(Source::Esl, kind, CALLER);
        f(&mut e);
        e
    }

    fn abandon(reason: &str, wait: Option<u32>) -> CallEvent {
        call(EventKind::QueueAbandon, |e| {
            e.queue = "support@default".into();
            e.caller = "+4930123456".into();
            e.wait_seconds = wait;
            e.reason = reason.into();
        })
    }

    fn dtmf(call_ref: &str, digit: &str) -> CallEvent {
        let mut e = CallEvent::new(Source::Esl, EventKind::Dtmf, call_ref);
        e.ivr_path = IvrPath::from_selections([digit]);
        e
    }

    /// Wraps an event body (fields already URL-encoded) in its envelope.
    fn event_frame(fields: &[(&str, &str)]) -> String {
        let mut body = String::new();
        for (k, v) in fields {
            body.push_str(&format!("{k}: {v}\n"));
        }
        body.push('\n');
        format!("Content-Length: {}\nContent-Type: text/event-plain\n\n{body}", body.len())
    }

    fn join_fields() -> Vec<(&'static str, &'static str)> {
        vec![
            ("Event-Name", "CUSTOM"),
            ("Core-UUID", "2130a7d1-c1f7-44cd-8fae-8ed5946f3cec"),
            ("FreeSWITCH-Hostname", "pbx1"),
            ("Event-Date-Local", "2026-11-23%2010%3A12%3A01"),
            ("Event-Calling-Function", "cc_queue_member_add"),
            ("Event-Subclass", "callcenter%3A%3Ainfo"),
            ("Unique-ID", CALLER),
            ("Caller-Caller-ID-Name", "Jane%20D%C3%B6e"),
            ("Caller-Caller-ID-Number", "%2B4930123456"),
            ("CC-Queue", "support%40default"),
            ("CC-Action", "member-queue-start"),
            ("CC-Member-UUID", "7a0d6f8e-1111-4c3b-9a1e-0c8d2b7e5f40"),
            ("CC-Member-Session-UUID", CALLER),
            ("CC-Member-CID-Name", "Jane%20D%C3%B6e"),
            ("CC-Member-CID-Number", "%2B4930123456"),
        ]
    }

    fn abandon_fields() -> Vec<(&'static str, &'static str)> {
        vec![
            ("Event-Name", "CUSTOM"),
            ("Event-Subclass", "callcenter%3A%3Ainfo"),
            ("Unique-ID", CALLER),
            ("CC-Queue", "support%40default"),
            ("CC-Action", "member-queue-end"),
            ("CC-Member-Leaving-Time", "1795428801"),
            ("CC-Member-Joined-Time", "1795428721"),
            ("CC-Cause", "Cancel"),
            ("CC-Cancel-Reason", "BREAK_OUT"),
            ("CC-Member-UUID", "7a0d6f8e-1111-4c3b-9a1e-0c8d2b7e5f40"),
            ("CC-Member-Session-UUID", CALLER),
            ("CC-Member-CID-Number", "%2B4930123456"),
        ]
    }

    fn bridge_fields() -> Vec<(&'static str, &'static str)> {
        vec![
            ("Event-Name", "CUSTOM"),
            ("Event-Subclass", "callcenter%3A%3Ainfo"),
            // bridge-agent-start carries the agent channel's fields.
            ("Unique-ID", AGENT_LEG),
            ("CC-Queue", "support%40default"),
            ("CC-Action", "bridge-agent-start"),
            ("CC-Agent", "1000%40default"),
            ("CC-Agent-System", "single_box"),
            ("CC-Agent-UUID", AGENT_LEG),
            ("CC-Agent-Called-Time", "1795428730"),
            ("CC-Agent-Answered-Time", "1795428735"),
            ("CC-Member-Joined-Time", "1795428721"),
            ("CC-Member-UUID", "7a0d6f8e-1111-4c3b-9a1e-0c8d2b7e5f40"),
            ("CC-Member-Session-UUID", CALLER),
            ("CC-Member-CID-Number", "%2B4930123456"),
        ]
    }

    fn hangup_fields() -> Vec<(&'static str, &'static str)> {
        vec![
            ("Event-Name", "CHANNEL_HANGUP"),
            ("Unique-ID", CALLER),
            ("Channel-Name", "sofia%2Finternal%2F%2B4930123456%40203.0.113.7"),
            ("Hangup-Cause", "NORMAL_CLEARING"),
            ("Caller-Caller-ID-Number", "%2B4930123456"),
        ]
    }

    fn dtmf_fields() -> Vec<(&'static str, &'static str)> {
        vec![("Event-Name", "DTMF"), ("Unique-ID", CALLER), ("DTMF-Digit", "%23"), ("DTMF-Duration", "2000")]
    }

    fn transcript() -> String {
        let mut t = String::new();
        t.push_str("Content-Type: auth/request\n\n");
        t.push_str("Content-Type: command/reply\nReply-Text: +OK accepted\n\n");
        t.push_str("Content-Type: command/reply\nReply-Text: +OK event listener enabled plain\n\n");
        t.push_str(&event_frame(&join_fields()));
        t.push_str(&event_frame(&bridge_fields()));
        t.push_str(&event_frame(&dtmf_fields()));
        t.push_str(&event_frame(&abandon_fields()));
        t.push_str(&event_frame(&hangup_fields()));
        let bye = "Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n";
        t.push_str(&format!("Content-Type: text/disconnect-notice\nContent-Length: {}\n\n{bye}", bye.len()));
        t
    }

    /// Feeds `input` in `chunk`-byte pieces, draining after every push.
    fn feed(input: &[u8], chunk: usize) -> Result<Vec<EslMessage>, EslError> {
        let mut r = EslReader::new();
        let mut out = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            r.push(piece)?;
            while let Some(m) = r.next_message()? {
                out.push(m);
            }
        }
        assert_eq!(r.buffered(), 0, "left-over bytes after chunk size {chunk}");
        Ok(out)
    }

    #[test]
    fn transcript_frames_identically_at_every_chunk_size() {
        let t = transcript();
        let whole = feed(t.as_bytes(), t.len()).expect("valid transcript");
        assert_eq!(whole.len(), 9);
        for chunk in [1, 2, 3, 7, 64, 500] {
            assert_eq!(feed(t.as_bytes(), chunk).expect("valid transcript"), whole, "chunk size {chunk}");
        }

        assert_eq!(whole[0], EslMessage::AuthRequest);
        assert_eq!(auth_result(&whole[1]), Ok(Some(())));
        assert!(matches!(&whole[2], EslMessage::CommandReply(r) if r.is_ok()));
        let EslMessage::DisconnectNotice(text) = &whole[8] else {
            panic!("expected disconnect notice, got {:?}", whole[8]);
        };
        assert!(text.starts_with("Disconnected, goodbye."));

        let events: Vec<CallEvent> = whole
            .iter()
            .filter_map(|m| match m {
                EslMessage::Event(e) => map_event(e),
                _ => None,
            })
            .collect();
        assert_eq!(
            events,
            vec![
                call(EventKind::QueueJoin, |e| {
                    e.queue = "support@default".into();
                    e.caller = "+4930123456".into();
                    e.caller_name = "Jane Döe".into();
                }),
                call(EventKind::AgentConnect, |e| {
                    e.queue = "support@default".into();
                    e.agent = "1000@default".into();
                }),
                call(EventKind::Dtmf, |e| e.ivr_path = IvrPath::from_selections(["#"])),
                abandon("BREAK_OUT", Some(80)),
                call(EventKind::Hangup, |e| {
                    e.caller = "+4930123456".into();
                    e.reason = "NORMAL_CLEARING".into();
                }),
            ]
        );
        assert!(events.iter().all(|e| e.source == Source::Esl));
    }

    #[test]
    fn event_values_are_percent_decoded_and_names_kept() {
        let t = event_frame(&hangup_fields());
        let msgs = feed(t.as_bytes(), 7).expect("valid");
        let [EslMessage::Event(ev)] = msgs.as_slice() else {
            panic!("expected one event, got {msgs:?}");
        };
        assert_eq!(ev.get("Channel-Name"), Some("sofia/internal/+4930123456@203.0.113.7"));
        assert_eq!(ev.get("channel-name"), ev.get("Channel-Name"), "case-insensitive lookup");
        assert_eq!(ev.name(), Some("CHANNEL_HANGUP"));
        assert_eq!(ev.body, None);
    }

    #[test]
    fn percent_decode_edge_cases() {
        assert_eq!(percent_decode("+49%20301"), "+49 301", "plus stays a plus");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz%4"), "%zz%4");
        assert_eq!(percent_decode("%C3%B6"), "ö");
        assert_eq!(percent_decode("%FF"), "\u{FFFD}");
    }

    #[test]
    fn event_with_its_own_body() {
        let inner = "+OK 7f4de4bc-17d7-11dd-b7a0-db4edd065621\n";
        let body =
            format!("Event-Name: BACKGROUND_JOB\nJob-UUID: 7f4de4bc\nContent-Length: {}\n\n{inner}", inner.len());
        let t = format!("Content-Length: {}\nContent-Type: text/event-plain\n\n{body}", body.len());
        let msgs = feed(t.as_bytes(), 1).expect("valid");
        let [EslMessage::Event(ev)] = msgs.as_slice() else {
            panic!("expected one event, got {msgs:?}");
        };
        assert_eq!(ev.body.as_deref(), Some(inner));
        assert_eq!(map_event(ev), None);
    }

    #[test]
    fn err_auth_is_a_login_failure() {
        let t = "Content-Type: auth/request\n\nContent-Type: command/reply\nReply-Text: -ERR invalid\n\n\
                 Content-Type: text/disconnect-notice\nContent-Length: 67\n\n\
                 Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n";
        let msgs = feed(t.as_bytes(), 7).expect("valid");
        assert_eq!(msgs.len(), 3);
        assert_eq!(auth_result(&msgs[0]), Ok(None), "greeting is not an answer");
        assert_eq!(auth_result(&msgs[1]), Err(LoginFailed("-ERR invalid".into())));
        assert!(auth_result(&msgs[2]).is_err());

        let rude = "Content-Type: text/rude-rejection\nContent-Length: 34\n\nAccess Denied, go away.\n0123456789";
        let msgs = feed(rude.as_bytes(), 1).expect("valid");
        assert!(matches!(auth_result(&msgs[0]), Err(LoginFailed(_))));

        let empty = feed(b"Content-Type: command/reply\n\n", 3).expect("valid");
        assert!(auth_result(&empty[0]).is_err(), "no Reply-Text is not +OK");
    }

    #[test]
    fn commands() {
        assert_eq!(auth_command("ClueCon").as_deref(), Ok("auth ClueCon\n\n"));
        assert_eq!(auth_command("a\n\napi shutdown"), Err(BadPassword));
        assert_eq!(auth_command("x\r"), Err(BadPassword));
        assert_eq!(
            EVENT_SUBSCRIPTION,
            "event plain CHANNEL_HANGUP DTMF BACKGROUND_JOB CUSTOM callcenter::info dispatchd::page\n\n"
        );
        let custom_at = EVENT_SUBSCRIPTION.find("CUSTOM").unwrap_or(0);
        assert!(EVENT_SUBSCRIPTION.find("CHANNEL_HANGUP").is_some_and(|i| i < custom_at));
        assert!(EVENT_SUBSCRIPTION.find("DTMF").is_some_and(|i| i < custom_at));
    }

    #[test]
    fn garbage_is_a_framing_error_and_sticks() {
        let mut r = EslReader::new();
        r.push(b"HTTP/1.1 400 Bad Request\nServer: nginx\n\n").expect("room");
        let err = r.next_message().expect_err("not ESL");
        assert!(matches!(err, EslError::MalformedHeader(_)), "{err:?}");
        assert_eq!(r.next_message(), Err(err.clone()), "reader stays failed");
        assert_eq!(r.push(b"Content-Type: auth/request\n\n"), Err(err));

        let mut r = EslReader::new();
        r.push(b"\xff\xfe: \x00\n\n").expect("room");
        assert!(matches!(r.next_message(), Err(EslError::MalformedHeader(_))));

        let mut r = EslReader::new();
        r.push(b"Content-Type: text/event-plain\nContent-Length: twelve\n\n").expect("room");
        assert_eq!(r.next_message(), Err(EslError::BadContentLength("twelve".into())));
    }

    #[test]
    fn garbage_inside_an_event_body_costs_only_that_line() {
        let body = "Event-Name: DTMF\nno colon here\n: empty key\nUnique-ID: abc\nDTMF-Digit: 5\n\n";
        let t = format!("Content-Type: text/event-plain\nContent-Length: {}\n\n{body}", body.len());
        let msgs = feed(t.as_bytes(), 7).expect("valid framing");
        let [EslMessage::Event(ev)] = msgs.as_slice() else {
            panic!("expected one event, got {msgs:?}");
        };
        assert_eq!(ev.fields.len(), 3);
        assert_eq!(map_event(ev), Some(dtmf("abc", "5")));
    }

    #[test]
    fn stray_blank_lines_and_crlf_are_tolerated() {
        let t =
            "\n\nContent-Type: auth/request\r\n\r\n\nContent-Type: command/reply\r\nReply-Text: +OK accepted\r\n\r\n";
        let msgs = feed(t.as_bytes(), 1).expect("valid");
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[0], EslMessage::AuthRequest);
        assert_eq!(auth_result(&msgs[1]), Ok(Some(())));
    }

    #[test]
    fn content_length_longer_than_data_waits() {
        let mut r = EslReader::new();
        let body = "Event-Name: DTMF\nUnique-ID: abc\nDTMF-Digit: 1\n\n";
        let (first, rest) = body.split_at(17);
        let head = format!("Content-Type: text/event-plain\nContent-Length: {}\n\n{first}", body.len());
        r.push(head.as_bytes()).expect("room");
        assert_eq!(r.next_message(), Ok(None));
        assert_eq!(r.next_message(), Ok(None), "still waiting, no error");
        r.push(rest.as_bytes()).expect("room");
        let Some(EslMessage::Event(ev)) = r.next_message().expect("complete") else {
            panic!("expected the event once all body bytes are in");
        };
        assert_eq!(map_event(&ev), Some(dtmf("abc", "1")));
        assert_eq!(r.next_message(), Ok(None));
        assert_eq!(r.buffered(), 0);
    }

    #[test]
    fn huge_content_length_is_refused_at_once() {
        let mut r = EslReader::new();
        r.push(b"Content-Type: text/event-plain\nContent-Length: 99999999999\n\n").expect("room");
        assert_eq!(r.next_message(), Err(EslError::BodyTooLarge(99_999_999_999)));

        let mut r = EslReader::new();
        let over = format!("Content-Length: {}\n\n", MAX_BODY + 1);
        r.push(over.as_bytes()).expect("room");
        assert_eq!(r.next_message(), Err(EslError::BodyTooLarge(MAX_BODY + 1)));

        // Exactly MAX_BODY is accepted.
        let mut r = EslReader::new();
        let at = format!("Content-Type: log/data\nContent-Length: {MAX_BODY}\n\n");
        r.push(at.as_bytes()).expect("room");
        assert_eq!(r.next_message(), Ok(None));
        let body = vec![b'x'; MAX_BODY];
        for piece in body.chunks(MAX_PUSH) {
            r.push(piece).expect("room for one maximal message");
        }
        let Some(EslMessage::Other { body, .. }) = r.next_message().expect("complete") else {
            panic!("expected the log/data message");
        };
        assert_eq!(body.len(), MAX_BODY);

        let mut r = EslReader::new();
        r.push(b"Content-Length: 18446744073709551616000\n\n").expect("room");
        assert!(matches!(r.next_message(), Err(EslError::BadContentLength(_))));
    }

    #[test]
    fn endless_header_block_is_bounded() {
        let mut r = EslReader::new();
        let line = b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n";
        let mut result = Ok(None);
        for _ in 0..(2 * MAX_HEADER_BLOCK / line.len()) {
            if let Err(e) = r.push(line) {
                result = Err(e);
                break;
            }
            result = r.next_message();
            if result.is_err() {
                break;
            }
        }
        assert_eq!(result, Err(EslError::HeaderTooLarge));
        assert!(r.buffered() <= MAX_HEADER_BLOCK);
    }

    #[test]
    fn undrained_pushes_cannot_grow_without_bound() {
        let mut r = EslReader::new();
        let chunk = vec![b'a'; MAX_PUSH];
        let mut refused = false;
        for _ in 0..(MAX_BUFFERED / MAX_PUSH + 2) {
            if r.push(&chunk).is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused);
        assert!(r.buffered() <= MAX_BUFFERED);
    }

    #[test]
    fn several_messages_in_one_push_and_buffer_reuse() {
        let one = event_frame(&dtmf_fields());
        let many = one.repeat(200);
        let msgs = feed(many.as_bytes(), 4096).expect("valid");
        assert_eq!(msgs.len(), 200);
        assert!(msgs.iter().all(|m| m == &msgs[0]));
    }

    // ------------------------------------------------------ mapping

    fn ev(fields: &[(&str, &str)]) -> EslEvent {
        let t = event_frame(fields);
        match feed(t.as_bytes(), t.len()).expect("valid").pop() {
            Some(EslMessage::Event(e)) => e,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    fn without(fields: &[(&'static str, &'static str)], drop: &[&str]) -> Vec<(&'static str, &'static str)> {
        fields.iter().filter(|(k, _)| !drop.contains(k)).copied().collect()
    }

    fn with(
        fields: &[(&'static str, &'static str)],
        key: &'static str,
        value: &'static str,
    ) -> Vec<(&'static str, &'static str)> {
        let mut out = without(fields, &[key]);
        out.push((key, value));
        out
    }

    #[test]
    fn join_falls_back_to_channel_fields_and_needs_ref_and_queue() {
        let f = without(&join_fields(), &["CC-Member-Session-UUID", "CC-Member-CID-Number", "CC-Member-CID-Name"]);
        assert_eq!(
            map_event(&ev(&f)),
            Some(call(EventKind::QueueJoin, |e| {
                e.queue = "support@default".into();
                e.caller = "+4930123456".into();
                e.caller_name = "Jane Döe".into();
            }))
        );
        let bare = without(&f, &["Caller-Caller-ID-Number", "Caller-Caller-ID-Name"]);
        assert_eq!(map_event(&ev(&bare)), Some(call(EventKind::QueueJoin, |e| e.queue = "support@default".into())));
        assert_eq!(map_event(&ev(&without(&f, &["Unique-ID"]))), None, "no call ref");
        assert_eq!(map_event(&ev(&without(&join_fields(), &["CC-Queue"]))), None, "no queue");
        assert_eq!(map_event(&ev(&with(&join_fields(), "CC-Queue", "%20"))), None, "blank queue");
        assert_eq!(map_event(&ev(&without(&join_fields(), &["CC-Action"]))), None);
        assert_eq!(map_event(&ev(&without(&join_fields(), &["Event-Subclass"]))), None);
        assert_eq!(map_event(&ev(&with(&join_fields(), "Event-Subclass", "conference%3A%3Amaintenance"))), None);
        assert_eq!(map_event(&ev(&without(&join_fields(), &["Event-Name"]))), None);
    }

    #[test]
    fn abandon_reasons_wait_and_missing_fields() {
        for (raw, reason) in [
            ("BREAK_OUT", CancelReason::BreakOut),
            ("TIMEOUT", CancelReason::Timeout),
            ("NO_AGENT_TIMEOUT", CancelReason::NoAgentTimeout),
            ("EXIT_WITH_KEY", CancelReason::ExitWithKey),
            ("NONE", CancelReason::Other("NONE".into())),
        ] {
            let got = map_event(&ev(&with(&abandon_fields(), "CC-Cancel-Reason", raw)));
            assert_eq!(got, Some(abandon(raw, Some(80))), "{raw}");
            assert_eq!(reason.as_str(), raw);
        }
        let no_reason = map_event(&ev(&without(&abandon_fields(), &["CC-Cancel-Reason"])));
        assert_eq!(no_reason, Some(abandon("", Some(80))));

        let wait = |fields: Vec<(&'static str, &'static str)>| map_event(&ev(&fields)).and_then(|e| e.wait_seconds);
        assert_eq!(wait(without(&abandon_fields(), &["CC-Member-Joined-Time"])), None);
        assert_eq!(wait(with(&abandon_fields(), "CC-Member-Joined-Time", "0")), None);
        assert_eq!(wait(with(&abandon_fields(), "CC-Member-Leaving-Time", "soon")), None);
        assert_eq!(wait(with(&abandon_fields(), "CC-Member-Leaving-Time", "1795428700")), Some(0), "clock skew");
        assert_eq!(wait(with(&abandon_fields(), "CC-Member-Leaving-Time", "99999999999999")), None, "absurd");

        let terminated = with(&abandon_fields(), "CC-Cause", "Terminated");
        assert_eq!(map_event(&ev(&terminated)), None, "served call is not an abandon");
        assert_eq!(map_event(&ev(&without(&abandon_fields(), &["CC-Cause"]))), None);
        assert_eq!(map_event(&ev(&without(&abandon_fields(), &["CC-Queue"]))), None);
        let no_ref = without(&abandon_fields(), &["CC-Member-Session-UUID", "Unique-ID"]);
        assert_eq!(map_event(&ev(&no_ref)), None);
    }

    #[test]
    fn agent_connect_uses_member_uuid_never_agent_leg() {
        let got = map_event(&ev(&bridge_fields()));
        assert_eq!(
            got,
            Some(call(EventKind::AgentConnect, |e| {
                e.queue = "support@default".into();
                e.agent = "1000@default".into();
            }))
        );
        assert_eq!(map_event(&ev(&without(&bridge_fields(), &["CC-Member-Session-UUID"]))), None);
        assert_eq!(map_event(&ev(&without(&bridge_fields(), &["CC-Agent"]))), None);
        assert_eq!(map_event(&ev(&without(&bridge_fields(), &["CC-Queue"]))), None);
        let offering = with(&bridge_fields(), "CC-Action", "agent-offering");
        assert_eq!(map_event(&ev(&offering)), None, "ringing an agent is not a connect");
        let other = with(&bridge_fields(), "CC-Action", "agent-status-change");
        assert_eq!(map_event(&ev(&other)), None);
    }

    #[test]
    fn hangup_and_dtmf_missing_fields() {
        assert_eq!(
            map_event(&ev(&without(&hangup_fields(), &["Hangup-Cause"]))),
            Some(call(EventKind::Hangup, |e| e.caller = "+4930123456".into()))
        );
        assert_eq!(map_event(&ev(&without(&hangup_fields(), &["Unique-ID"]))), None);
        assert_eq!(map_event(&ev(&without(&dtmf_fields(), &["DTMF-Digit"]))), None);
        assert_eq!(map_event(&ev(&with(&dtmf_fields(), "DTMF-Digit", ""))), None);
        assert_eq!(map_event(&ev(&without(&dtmf_fields(), &["Unique-ID"]))), None);
        let other = with(&hangup_fields(), "Event-Name", "CHANNEL_HANGUP_COMPLETE");
        assert_eq!(map_event(&ev(&other)), None);
    }

    #[test]
    fn page_reports_digit_job_and_hangup() {
        use crate::dispatcher::pager::Report;
        use crate::domain::dispatch::Outcome;
        let digit =
            [("Event-Name", "CUSTOM"), ("Event-Subclass", "dispatchd::page"), ("Unique-ID", "u-1"), ("Choice", "2")];
        assert_eq!(page_report(&ev(&digit)), Some(("u-1".into(), Report::Digit('2'))));
        let other =
            [("Event-Name", "CUSTOM"), ("Event-Subclass", "callcenter::info"), ("Unique-ID", "u-1"), ("Choice", "2")];
        assert_eq!(page_report(&ev(&other)), None);
        let blank =
            [("Event-Name", "CUSTOM"), ("Event-Subclass", "dispatchd::page"), ("Unique-ID", "u-1"), ("Choice", " ")];
        assert_eq!(page_report(&ev(&blank)), None);

        let job = |result: &str| EslEvent {
            fields: [("Event-Name", "BACKGROUND_JOB"), ("Job-UUID", "u-2")].into_iter().collect(),
            body: Some(format!("{result}\n")),
        };
        assert_eq!(page_report(&job("+OK u-2")), Some(("u-2".into(), Report::Answered)));
        assert_eq!(page_report(&job("-ERR USER_BUSY")), Some(("u-2".into(), Report::Failed(Outcome::Busy))));
        assert_eq!(page_report(&job("-ERR NO_ANSWER")), Some(("u-2".into(), Report::Failed(Outcome::NoAnswer))));
        let odd = page_report(&job("-ERR ÜBER\u{0}"));
        assert_eq!(odd, Some(("u-2".into(), Report::Failed(Outcome::Failed("originate_failed".into())))));
        assert_eq!(page_report(&job("garbage")), None);

        let hangup =
            |cause: &str| ev(&[("Event-Name", "CHANNEL_HANGUP"), ("Unique-ID", "u-3"), ("Hangup-Cause", cause)]);
        assert_eq!(page_report(&hangup("USER_BUSY")), Some(("u-3".into(), Report::Hangup(Outcome::Busy))));
        let normal = page_report(&hangup("NORMAL_CLEARING"));
        assert_eq!(normal, Some(("u-3".into(), Report::Hangup(Outcome::Failed("not_answered".into())))));
    }

    #[test]
    fn originate_and_kill_stay_one_command() {
        let vars = [("DISPATCHD_TEXT", "it's {x},y\n\nexit\n\n".to_string())];
        let c = originate(
            "u-1\n\napi shutdown",
            "user/1001\n\nexit",
            "dispatchd-page",
            std::time::Duration::from_secs(25),
            &vars,
        );
        assert_eq!(c.matches("\n\n").count(), 1, "{c}");
        assert!(c.ends_with("\n\n"));
        assert!(c.contains("originate_timeout=25,") && c.contains("dispatchd_text='its xyexit'"), "{c}");
        assert_eq!(hangup("u-1\n\napi shutdown"), "bgapi uuid_kill -1ad\n\n");
    }
}
