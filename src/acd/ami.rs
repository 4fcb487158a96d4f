//! Asterisk Manager Interface (AMI): the pure part — framing, the login
//! action, and mapping queue/channel events to [`CallEvent`]s.
//!
//! Wire format (Asterisk 18/20 AMI): after connecting the server sends one
//! banner line `Asterisk Call Manager/X.Y.Z` (no blank line after it); every
//! later message is `Key: Value` lines ending in CRLF, and a message ends with
//! an empty line. Keys are case-insensitive, values may be empty, and the same
//! key may repeat. [`AmiReader`] accepts bytes as they arrive, in any split,
//! and never holds more than about one line ([`MAX_LINE`]) of unparsed input
//! plus one message ([`MAX_MESSAGE`]) of parsed fields, provided the caller
//! drains [`AmiReader::next_message`] after each [`AmiReader::push`].
//!
//! Field names follow the Asterisk 18/20 event docs (QueueCallerJoin,
//! QueueCallerAbandon, AgentConnect, AgentComplete, DTMFEnd, Hangup); every
//! event there carries the channel snapshot (`Uniqueid`, `Linkedid`,
//! `CallerIDNum`, `CallerIDName`, …) of the caller's channel.

use std::fmt;

use crate::domain::call::{CallEvent, EventKind};
use crate::domain::incident::Source;
use crate::domain::ivr::IvrPath;

/// Largest message (all its lines, terminators included) the reader keeps.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Longest line (without its terminator) the reader accepts.
pub const MAX_LINE: usize = 8 * 1024;

/// The banner's prefix, sent once right after connecting.
pub const BANNER_PREFIX: &str = "Asterisk Call Manager/";

/// A framing error for one message. The reader has already dropped that
/// message and resynchronises at the next blank line; keep reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AmiError {
    /// A line longer than [`MAX_LINE`].
    LineTooLong,
    /// A message larger than [`MAX_MESSAGE`].
    MessageTooLarge,
}

impl fmt::Display for AmiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AmiError::LineTooLong => write!(f, "AMI line longer than {MAX_LINE} bytes"),
            AmiError::MessageTooLarge => write!(f, "AMI message larger than {MAX_MESSAGE} bytes"),
        }
    }
}

impl std::error::Error for AmiError {}

/// One AMI message: its fields in wire order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmiMessage {
    fields: Vec<(String, String)>,
}

/// What a message is: an `Event: <name>`, a `Response: <status>`, or neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind<'a> {
    Event(&'a str),
    Response(&'a str),
    Other,
}

impl AmiMessage {
    /// A message from `(key, value)` pairs, in order (tests, in-test servers).
    pub fn from_pairs<K: AsRef<str>, V: AsRef<str>>(pairs: &[(K, V)]) -> Self {
        AmiMessage { fields: pairs.iter().map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned())).collect() }
    }

    /// The first value of `key`, compared case-insensitively.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v.as_str())
    }

    /// Every value of `key` (AMI repeats keys, e.g. `Variable`).
    pub fn get_all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.fields.iter().filter(move |(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v.as_str())
    }

    /// All fields in wire order.
    pub fn fields(&self) -> &[(String, String)] {
        &self.fields
    }

    /// `Event` wins over `Response` (an event answering an action carries
    /// both `Event` and `ActionID`, never `Response`).
    pub fn kind(&self) -> MessageKind<'_> {
        if let Some(name) = self.get("Event") {
            MessageKind::Event(name)
        } else if let Some(status) = self.get("Response") {
            MessageKind::Response(status)
        } else {
            MessageKind::Other
        }
    }

    /// True for `Event: <name>` (case-insensitive).
    pub fn is_event(&self, name: &str) -> bool {
        matches!(self.kind(), MessageKind::Event(n) if n.eq_ignore_ascii_case(name))
    }
}

/// Streaming AMI frame reader. Feed it with [`push`](Self::push), then call
/// [`next_message`](Self::next_message) until it answers `None`.
#[derive(Debug)]
pub struct AmiReader {
    /// Unparsed input; `buf[start..]` is live.
    buf: Vec<u8>,
    start: usize,
    /// Fields of the message being assembled.
    fields: Vec<(String, String)>,
    /// Bytes (terminators included) of the message being assembled.
    msg_bytes: usize,
    /// After an error: drop lines until the next blank line.
    discarding: bool,
    /// Dropping the rest of an over-long line until its LF.
    skipping_line: bool,
    /// The next line is the first of the connection.
    first_line: bool,
    banner: Option<String>,
}

impl Default for AmiReader {
    fn default() -> Self {
        Self::new()
    }
}

impl AmiReader {
    /// A reader for a fresh connection (expects the banner first, tolerates
    /// its absence). Use a new reader per connection.
    pub fn new() -> Self {
        AmiReader {
            buf: Vec::new(),
            start: 0,
            fields: Vec::new(),
            msg_bytes: 0,
            discarding: false,
            skipping_line: false,
            first_line: true,
            banner: None,
        }
    }

    /// The banner line (`Asterisk Call Manager/X.Y.Z`), once seen.
    pub fn banner(&self) -> Option<&str> {
        self.banner.as_deref()
    }

    /// The protocol version from the banner (`X.Y.Z`), once seen.
    pub fn banner_version(&self) -> Option<&str> {
        self.banner.as_deref().and_then(|b| b.strip_prefix(BANNER_PREFIX))
    }

    /// Append bytes as they arrived from the socket.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet parsed into lines (for tests and metrics).
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete message, a framing error for one message, or `None`
    /// when more bytes are needed.
    pub fn next_message(&mut self) -> Option<Result<AmiMessage, AmiError>> {
        loop {
            let live = &self.buf[self.start..];
            let Some(lf) = live.iter().position(|&b| b == b'\n') else {
                return self.need_more();
            };
            let line_end = self.start + lf;
            let mut content_end = line_end;
            if content_end > self.start && self.buf[content_end - 1] == b'\r' {
                content_end -= 1;
            }
            let line_start = self.start;
            self.start = line_end + 1;

            if self.skipping_line {
                // The tail of a line already reported as too long.
                self.skipping_line = false;
                continue;
            }
            let len = content_end - line_start;
            if len > MAX_LINE {
                self.first_line = false;
                if let Some(err) = self.fail(AmiError::LineTooLong) {
                    return Some(Err(err));
                }
                continue;
            }
            let line = String::from_utf8_lossy(&self.buf[line_start..content_end]).into_owned();
            self.msg_bytes += self.start - line_start;

            if self.first_line {
                self.first_line = false;
                if line.starts_with(BANNER_PREFIX) {
                    self.banner = Some(line.trim_end().to_owned());
                    self.msg_bytes = 0;
                    continue;
                }
            }

            if line.trim().is_empty() {
                // End of a message (or a stray blank line).
                let was_discarding = self.discarding;
                self.discarding = false;
                self.msg_bytes = 0;
                if was_discarding || self.fields.is_empty() {
                    self.fields.clear();
                    continue;
                }
                let fields = std::mem::take(&mut self.fields);
                return Some(Ok(AmiMessage { fields }));
            }
            if self.discarding {
                continue;
            }
            if self.msg_bytes > MAX_MESSAGE {
                if let Some(err) = self.fail(AmiError::MessageTooLarge) {
                    return Some(Err(err));
                }
                continue;
            }
            // `Key: Value`; a line without a colon (or with an empty key) is skipped.
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let key = key.trim();
            if key.is_empty() {
                continue;
            }
            self.fields.push((key.to_owned(), value.trim().to_owned()));
        }
    }

    /// No LF in the live input: bound it, compact, and ask for more.
    fn need_more(&mut self) -> Option<Result<AmiMessage, AmiError>> {
        let pending = self.buf.len() - self.start;
        // `+ 1`: a line of exactly MAX_LINE may wait here with its CR.
        if pending > MAX_LINE + 1 || (self.skipping_line && pending > 0) {
            self.buf.clear();
            self.start = 0;
            if !self.skipping_line {
                self.skipping_line = true;
                self.first_line = false;
                if let Some(err) = self.fail(AmiError::LineTooLong) {
                    return Some(Err(err));
                }
            }
            return None;
        }
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        None
    }

    /// Drop the current message; report `err` unless it is already dropped.
    fn fail(&mut self, err: AmiError) -> Option<AmiError> {
        self.fields.clear();
        self.msg_bytes = 0;
        if self.discarding {
            None
        } else {
            self.discarding = true;
            Some(err)
        }
    }
}

/// The event classes dispatchd asks for: queue events are class AGENT,
/// `Hangup` class CALL, `DTMFEnd` class DTMF.
pub const LOGIN_EVENTS: &str = "call,agent,dtmf,user";

/// The `Login` action (plain-text secret), ready to write to the socket.
/// CR and LF are removed from the values so they cannot inject lines.
pub fn login(username: &str, secret: &str, action_id: &str) -> String {
    format!(
        "Action: Login\r\nActionID: {}\r\nUsername: {}\r\nSecret: {}\r\nEvents: {}\r\n\r\n",
        one_line(action_id),
        one_line(username),
        one_line(secret),
        LOGIN_EVENTS,
    )
}

fn one_line(value: &str) -> String {
    value.chars().filter(|c| *c != '\r' && *c != '\n').collect()
}

/// The answer to [`login`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginOutcome {
    /// `Response: Success` (`Message: Authentication accepted`).
    Accepted,
    /// `Response: Error` (`Message: Authentication failed`); Asterisk closes
    /// the connection after it.
    Rejected { message: String },
}

/// Whether `msg` answers the login sent with `action_id`: `None` for any
/// other message (events, other actions). A response without an ActionID is
/// taken as the answer (it is the only action in flight during login).
pub fn login_response(msg: &AmiMessage, action_id: &str) -> Option<LoginOutcome> {
    let MessageKind::Response(status) = msg.kind() else {
        return None;
    };
    if msg.get("ActionID").is_some_and(|id| id != action_id) {
        return None;
    }
    if status.eq_ignore_ascii_case("Success") {
        Some(LoginOutcome::Accepted)
    } else {
        Some(LoginOutcome::Rejected { message: msg.get("Message").unwrap_or_default().to_owned() })
    }
}

/// The ActionID prefix of page calls: `dispatchd-page-<channel id>`.
const PAGE_ACTION: &str = "dispatchd-page-";

/// The `Originate` of a page call (contract §11): async, into `context` at
/// `s`, with `ChannelId` = `id` (the channel's Uniqueid, by which its events
/// are told apart) and the variables. Values are one line each.
pub fn originate(id: &str, phone: &str, context: &str, ring: std::time::Duration, vars: &[(&str, String)]) -> String {
    let mut a = format!(
        "Action: Originate\r\nActionID: {PAGE_ACTION}{id}\r\nChannel: {}\r\nContext: {}\r\nExten: s\r\nPriority: 1\r\n\
         Timeout: {}\r\nCallerID: \"dispatchd\" <dispatchd>\r\nAsync: true\r\nChannelId: {id}\r\n",
        one_line(phone),
        one_line(context),
        ring.as_millis(),
        id = one_line(id),
    );
    for (k, v) in vars {
        a.push_str(&format!("Variable: {}={}\r\n", one_line(k), one_line(v)));
    }
    a.push_str("\r\n");
    a
}

/// The `Hangup` of a page call's channel (by its name).
pub fn hangup(channel: &str, id: &str) -> String {
    format!(
        "Action: Hangup\r\nActionID: dispatchd-hangup-{}\r\nChannel: {}\r\nCause: 16\r\n\r\n",
        one_line(id),
        one_line(channel)
    )
}

/// What an AMI message says about a page call: the call's id and what
/// happened. `UserEvent: DispatchdPage` (`Choice`: the digit) on the call's
/// channel; `OriginateResponse` of our ActionID (a failure: busy, no answer);
/// `Hangup` of the call's channel.
pub fn page_report(msg: &AmiMessage) -> Option<(String, crate::dispatcher::pager::Report)> {
    use crate::dispatcher::pager::Report;
    use crate::domain::dispatch::Outcome;
    if msg.is_event("UserEvent") && msg.get("UserEvent").is_some_and(|u| u.eq_ignore_ascii_case("DispatchdPage")) {
        let digit = msg.get("Choice")?.trim().chars().next()?;
        return Some((msg.get("Uniqueid")?.trim().to_string(), Report::Digit(digit)));
    }
    if msg.is_event("OriginateResponse") {
        let id = msg.get("ActionID")?.strip_prefix(PAGE_ACTION)?.to_string();
        if msg.get("Response").is_some_and(|r| r.eq_ignore_ascii_case("Success")) {
            return Some((id, Report::Answered));
        }
        let outcome = match msg.get("Reason").map(str::trim) {
            Some("5") => Outcome::Busy,
            Some("1" | "3") => Outcome::NoAnswer,
            Some("8") => Outcome::Failed("congestion".into()),
            _ => Outcome::Failed("originate_failed".into()),
        };
        return Some((id, Report::Failed(outcome)));
    }
    if msg.is_event("Hangup") {
        // Q.850: 17 user busy, 18 no user responding, 19 no answer.
        let unanswered = match msg.get("Cause").map(str::trim) {
            Some("17") => Outcome::Busy,
            Some("18" | "19") => Outcome::NoAnswer,
            _ => Outcome::Failed("not_answered".into()),
        };
        return Some((msg.get("Uniqueid")?.trim().to_string(), Report::Hangup(unanswered)));
    }
    None
}

/// The channel name an event gives for the page call `id` (Newchannel,
/// OriginateResponse), to hang it up by name.
pub fn page_channel(msg: &AmiMessage) -> Option<(String, String)> {
    let id = if msg.is_event("OriginateResponse") {
        msg.get("ActionID")?.strip_prefix(PAGE_ACTION)?.to_string()
    } else if msg.is_event("Newchannel") {
        msg.get("Uniqueid")?.trim().to_string()
    } else {
        return None;
    };
    Some((id, msg.get("Channel")?.trim().to_string()))
}

/// A `Ping` action (the dead-peer probe); Asterisk answers `Response: Success`
/// with `Ping: Pong` and the same ActionID.
pub fn ping(action_id: &str) -> String {
    format!("Action: Ping\r\nActionID: {}\r\n\r\n", one_line(action_id))
}

/// Map an AMI event to a [`CallEvent`] (source `ami`); `None` for other
/// messages, for events without a `Linkedid`/`Uniqueid` (nothing to correlate
/// them by), and for `Hangup`/`DTMFEnd` of a channel other than the caller's.
/// Other missing fields stay empty.
///
/// - `QueueCallerJoin` → `QueueJoin` (`Queue`, `CallerIDNum`, `CallerIDName`);
/// - `QueueCallerAbandon` → `QueueAbandon` (wait from `HoldTime`);
/// - `AgentConnect` → `AgentConnect` (agent = `MemberName`, else `Interface`);
/// - `AgentComplete` → `AgentComplete` (`Reason`: caller, agent, transfer);
/// - `DTMFEnd` with `Direction: Received` → `Dtmf` (the one `Digit`);
/// - `Hangup` → `Hangup` (`reason` = the Q.850 `Cause`).
///
/// `call_ref` is the `Linkedid` (else the `Uniqueid`): every channel of one
/// call shares it, agent legs included. That is why `Hangup` and `DTMFEnd`
/// count only for the caller's own channel (`Uniqueid == Linkedid`, or no
/// `Linkedid`): an agent leg hanging up is not the caller hanging up, and a
/// digit relayed through Local channels would otherwise be counted twice.
/// The queue and agent events carry the caller's channel snapshot unprefixed
/// (the agent's is `Dest…`), so `CallerIDNum` there is the caller.
pub fn map_event(msg: &AmiMessage) -> Option<CallEvent> {
    let MessageKind::Event(name) = msg.kind() else {
        return None;
    };
    let call_ref = call_ref(msg)?;
    let text = |key: &str| msg.get(key).unwrap_or_default().trim().to_owned();
    let is = |n: &str| name.eq_ignore_ascii_case(n);
    let kind = if is("QueueCallerJoin") {
        EventKind::QueueJoin
    } else if is("QueueCallerAbandon") {
        EventKind::QueueAbandon
    } else if is("AgentConnect") {
        EventKind::AgentConnect
    } else if is("AgentComplete") {
        EventKind::AgentComplete
    } else if is("DTMFEnd") {
        EventKind::Dtmf
    } else if is("Hangup") {
        EventKind::Hangup
    } else {
        return None;
    };
    let mut ev = CallEvent::new(Source::Ami, kind, &call_ref);
    ev.caller = caller_id(msg.get("CallerIDNum"));
    ev.caller_name = caller_id(msg.get("CallerIDName"));
    ev.queue = text("Queue");
    match kind {
        EventKind::QueueAbandon => ev.wait_seconds = msg.get("HoldTime").and_then(|v| v.trim().parse::<u32>().ok()),
        EventKind::AgentConnect => {
            ev.agent = [msg.get("MemberName"), msg.get("Interface")]
                .into_iter()
                .flatten()
                .map(str::trim)
                .find(|v| !v.is_empty())
                .unwrap_or_default()
                .to_owned();
        }
        EventKind::AgentComplete => ev.reason = text("Reason"),
        EventKind::Dtmf => {
            if !own_channel(msg) || !msg.get("Direction").is_some_and(|d| d.trim().eq_ignore_ascii_case("Received")) {
                return None;
            }
            let digit = text("Digit");
            if digit.is_empty() {
                return None;
            }
            ev.ivr_path = IvrPath::from_selections([digit]);
        }
        EventKind::Hangup => {
            if !own_channel(msg) {
                return None;
            }
            // The Q.850 code; `Cause-txt` is its English name.
            ev.reason =
                msg.get("Cause").and_then(|v| v.trim().parse::<u16>().ok()).map(|c| c.to_string()).unwrap_or_default();
        }
        _ => {}
    }
    Some(ev)
}

fn nonempty<'a>(msg: &'a AmiMessage, key: &str) -> Option<&'a str> {
    msg.get(key).map(str::trim).filter(|v| !v.is_empty())
}

fn call_ref(msg: &AmiMessage) -> Option<String> {
    nonempty(msg, "Linkedid").or_else(|| nonempty(msg, "Uniqueid")).map(str::to_owned)
}

/// The event is about the call's first channel (the caller's), not a leg
/// linked to it later (agents, Local channels).
fn own_channel(msg: &AmiMessage) -> bool {
    match (nonempty(msg, "Uniqueid"), nonempty(msg, "Linkedid")) {
        (_, None) => true,
        (Some(u), Some(l)) => u == l,
        (None, Some(_)) => false,
    }
}

/// Asterisk writes `<unknown>` for an absent caller ID.
fn caller_id(value: Option<&str>) -> String {
    match value.map(str::trim) {
        Some(v) if !v.eq_ignore_ascii_case("<unknown>") => v.to_owned(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session as the Asterisk 18/20 docs describe it: banner, login
    /// answer, then a queued call that is answered, talks and hangs up.
    const TRANSCRIPT: &str = "Asterisk Call Manager/7.0.3\r\n\
Response: Success\r\n\
ActionID: login-1\r\n\
Message: Authentication accepted\r\n\
\r\n\
Event: FullyBooted\r\n\
Privilege: system,all\r\n\
Uptime: 3310\r\n\
LastReload: 3310\r\n\
Status: Fully Booted\r\n\
\r\n\
Event: QueueCallerJoin\r\n\
Privilege: agent,all\r\n\
Channel: PJSIP/trunk-00000012\r\n\
ChannelState: 6\r\n\
ChannelStateDesc: Up\r\n\
CallerIDNum: +441632960123\r\n\
CallerIDName: <unknown>\r\n\
ConnectedLineNum: <unknown>\r\n\
ConnectedLineName: <unknown>\r\n\
Language: en\r\n\
AccountCode: \r\n\
Context: emergency\r\n\
Exten: 999\r\n\
Priority: 3\r\n\
Uniqueid: 1700000000.18\r\n\
Linkedid: 1700000000.18\r\n\
Queue: triage\r\n\
Position: 1\r\n\
Count: 1\r\n\
\r\n\
Event: DTMFEnd\r\n\
Privilege: dtmf,all\r\n\
Channel: PJSIP/trunk-00000012\r\n\
Uniqueid: 1700000000.18\r\n\
Linkedid: 1700000000.18\r\n\
Digit: 2\r\n\
DurationMs: 120\r\n\
Direction: Received\r\n\
\r\n\
Event: AgentConnect\r\n\
Privilege: agent,all\r\n\
Channel: PJSIP/trunk-00000012\r\n\
CallerIDNum: +441632960123\r\n\
Uniqueid: 1700000000.18\r\n\
Linkedid: 1700000000.18\r\n\
DestChannel: PJSIP/agent7-00000013\r\n\
DestUniqueid: 1700000014.19\r\n\
DestLinkedid: 1700000000.18\r\n\
Queue: triage\r\n\
MemberName: Agent Seven\r\n\
Interface: PJSIP/agent7\r\n\
HoldTime: 14\r\n\
RingTime: 3\r\n\
\r\n\
Event: AgentComplete\r\n\
Privilege: agent,all\r\n\
Channel: PJSIP/trunk-00000012\r\n\
Uniqueid: 1700000000.18\r\n\
Linkedid: 1700000000.18\r\n\
Queue: triage\r\n\
MemberName: Agent Seven\r\n\
Interface: PJSIP/agent7\r\n\
HoldTime: 14\r\n\
TalkTime: 95\r\n\
Reason: caller\r\n\
\r\n\
Event: Hangup\r\n\
Privilege: call,all\r\n\
Channel: PJSIP/trunk-00000012\r\n\
Uniqueid: 1700000000.18\r\n\
Linkedid: 1700000000.18\r\n\
Cause: 16\r\n\
Cause-txt: Normal Clearing\r\n\
\r\n";

    fn drain(r: &mut AmiReader) -> Vec<Result<AmiMessage, AmiError>> {
        let mut out = Vec::new();
        while let Some(m) = r.next_message() {
            out.push(m);
        }
        out
    }

    fn read_chunked(bytes: &[u8], chunk: usize) -> (Vec<Result<AmiMessage, AmiError>>, AmiReader) {
        let mut r = AmiReader::new();
        let mut out = Vec::new();
        for c in bytes.chunks(chunk.max(1)) {
            r.push(c);
            out.extend(drain(&mut r));
        }
        (out, r)
    }

    fn read_split(bytes: &[u8], at: usize) -> Vec<Result<AmiMessage, AmiError>> {
        let mut r = AmiReader::new();
        r.push(&bytes[..at]);
        let mut out = drain(&mut r);
        r.push(&bytes[at..]);
        out.extend(drain(&mut r));
        out
    }

    fn ok(msgs: Vec<Result<AmiMessage, AmiError>>) -> Vec<AmiMessage> {
        msgs.into_iter()
            .map(|m| match m {
                Ok(m) => m,
                Err(e) => panic!("unexpected error {e}"),
            })
            .collect()
    }

    #[test]
    fn transcript_parses_with_banner() {
        let (msgs, r) = read_chunked(TRANSCRIPT.as_bytes(), usize::MAX);
        let msgs = ok(msgs);
        assert_eq!(r.banner(), Some("Asterisk Call Manager/7.0.3"));
        assert_eq!(r.banner_version(), Some("7.0.3"));
        assert_eq!(r.buffered(), 0);
        let kinds: Vec<_> = msgs.iter().map(|m| m.kind()).collect();
        assert_eq!(
            kinds,
            vec![
                MessageKind::Response("Success"),
                MessageKind::Event("FullyBooted"),
                MessageKind::Event("QueueCallerJoin"),
                MessageKind::Event("DTMFEnd"),
                MessageKind::Event("AgentConnect"),
                MessageKind::Event("AgentComplete"),
                MessageKind::Event("Hangup"),
            ]
        );
        assert_eq!(login_response(&msgs[0], "login-1"), Some(LoginOutcome::Accepted));
        // Case-insensitive keys, empty values, order kept.
        assert_eq!(msgs[2].get("linkedid"), Some("1700000000.18"));
        assert_eq!(msgs[2].get("ACCOUNTCODE"), Some(""));
        assert_eq!(msgs[2].fields()[0].0, "Event");
        assert_eq!(msgs[6].get("cause-TXT"), Some("Normal Clearing"));

        let events: Vec<_> = msgs.iter().filter_map(map_event).collect();
        let id = "1700000000.18";
        let caller = |mut e: CallEvent| {
            e.caller = "+441632960123".into();
            e.queue = "triage".into();
            e
        };
        assert_eq!(
            events,
            vec![
                caller(call(EventKind::QueueJoin, id, |_| {})),
                call(EventKind::Dtmf, id, |e| e.ivr_path = IvrPath::from_selections(["2"])),
                caller(call(EventKind::AgentConnect, id, |e| e.agent = "Agent Seven".into())),
                call(EventKind::AgentComplete, id, |e| {
                    e.queue = "triage".into();
                    e.reason = "caller".into();
                }),
                call(EventKind::Hangup, id, |e| e.reason = "16".into()),
            ]
        );
        assert!(events.iter().all(|e| e.source == Source::Ami));
    }

    #[test]
    fn every_split_and_chunk_size_gives_the_same_messages() {
        let bytes = TRANSCRIPT.as_bytes();
        let (whole, _) = read_chunked(bytes, usize::MAX);
        let whole = ok(whole);
        for chunk in [1, 7] {
            let (msgs, r) = read_chunked(bytes, chunk);
            assert_eq!(ok(msgs), whole, "chunk {chunk}");
            assert_eq!(r.banner(), Some("Asterisk Call Manager/7.0.3"));
        }
        for at in 0..=bytes.len() {
            assert_eq!(ok(read_split(bytes, at)), whole, "split at {at}");
        }
    }

    #[test]
    fn bare_lf_and_mixed_endings() {
        let crlf = TRANSCRIPT.as_bytes();
        let lf = TRANSCRIPT.replace("\r\n", "\n");
        let (a, _) = read_chunked(crlf, usize::MAX);
        let (b, r) = read_chunked(lf.as_bytes(), 3);
        assert_eq!(ok(a), ok(b));
        assert_eq!(r.banner(), Some("Asterisk Call Manager/7.0.3"));

        let mut r = AmiReader::new();
        r.push(b"Event: Hangup\nUniqueid: 1.1\r\nCause: 16\n\r\n");
        let m = ok(drain(&mut r));
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].get("cause"), Some("16"));
    }

    #[test]
    fn no_banner_is_fine_and_a_later_banner_like_line_is_just_skipped() {
        let mut r = AmiReader::new();
        r.push(b"Event: Hangup\r\nUniqueid: 1.1\r\n\r\nAsterisk Call Manager/9\r\nEvent: X\r\n\r\n");
        let m = ok(drain(&mut r));
        assert_eq!(r.banner(), None);
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].fields().len(), 1);
    }

    #[test]
    fn garbage_lines_are_skipped() {
        let input = "Asterisk Call Manager/5.0.2\r\n\
\r\n\
\r\n\
this line has no colon\r\n\
: empty key\r\n\
Event: Hangup\r\n\
\u{1}\u{2}binary junk\r\n\
Uniqueid: 1700000001.5\r\n\
Weird:value:with:colons\r\n\
Cause: notanumber\r\n\
\r\n\
junk only\r\n\
\r\n";
        let (msgs, r) = read_chunked(input.as_bytes(), 5);
        let msgs = ok(msgs);
        assert_eq!(r.banner_version(), Some("5.0.2"));
        assert_eq!(msgs.len(), 1, "blank lines and all-garbage blocks yield nothing");
        assert_eq!(msgs[0].get("weird"), Some("value:with:colons"));
        assert_eq!(map_event(&msgs[0]), Some(call(EventKind::Hangup, "1700000001.5", |_| {})));
        // Invalid UTF-8 does not stop the reader.
        let mut r = AmiReader::new();
        r.push(b"Event: Hangup\r\nCallerIDName: \xff\xfe\r\nUniqueid: 2.2\r\n\r\n");
        let m = ok(drain(&mut r));
        assert_eq!(m[0].get("uniqueid"), Some("2.2"));
    }

    fn oversized_then_good(line_len: usize, lines: usize) -> Vec<u8> {
        let mut v = b"Asterisk Call Manager/7.0.3\r\nEvent: Big\r\n".to_vec();
        for i in 0..lines {
            v.extend_from_slice(format!("Variable{i}: ").as_bytes());
            v.extend(std::iter::repeat_n(b'x', line_len));
            v.extend_from_slice(b"\r\n");
        }
        v.extend_from_slice(b"Tail: still the big one\r\n\r\nEvent: Hangup\r\nUniqueid: 3.3\r\n\r\n");
        v
    }

    fn assert_error_then_resync(bytes: &[u8], want: AmiError) {
        for chunk in [1, 7, 4096, usize::MAX] {
            let mut r = AmiReader::new();
            let mut out = Vec::new();
            let mut peak = 0;
            for c in bytes.chunks(chunk.min(bytes.len())) {
                r.push(c);
                peak = peak.max(r.buffered());
                out.extend(drain(&mut r));
                peak = peak.max(r.buffered());
                assert!(r.fields.len() * 2 <= MAX_MESSAGE, "fields bounded");
            }
            assert_eq!(out.len(), 2, "chunk {chunk}: {out:?}");
            assert_eq!(out[0], Err(want.clone()), "chunk {chunk}");
            match &out[1] {
                Ok(m) => assert!(m.is_event("hangup"), "chunk {chunk}"),
                Err(e) => panic!("chunk {chunk}: {e}"),
            }
            if chunk <= 4096 {
                assert!(peak <= MAX_LINE + 1 + chunk, "chunk {chunk}: buffered {peak}");
            }
        }
    }

    #[test]
    fn oversized_message_is_one_error_then_resync() {
        // 20 lines of 4 KiB: every line fits, the message does not.
        assert_error_then_resync(&oversized_then_good(4096, 20), AmiError::MessageTooLarge);
    }

    #[test]
    fn overlong_line_is_one_error_then_resync() {
        // One 100 KiB line, more than a whole message too: reported once.
        assert_error_then_resync(&oversized_then_good(100 * 1024, 1), AmiError::LineTooLong);
        // Just over the line limit.
        assert_error_then_resync(&oversized_then_good(MAX_LINE, 1), AmiError::LineTooLong);
    }

    #[test]
    fn line_of_exactly_max_line_is_accepted_in_any_split() {
        let value = "y".repeat(MAX_LINE - "K: ".len());
        let input = format!("Event: Ok\r\nK: {value}\r\nUniqueid: 4.4\r\n\r\n");
        for chunk in [1, 7, usize::MAX] {
            let (msgs, _) = read_chunked(input.as_bytes(), chunk);
            let msgs = ok(msgs);
            assert_eq!(msgs.len(), 1, "chunk {chunk}");
            assert_eq!(msgs[0].get("k").map(str::len), Some(value.len()));
        }
    }

    #[test]
    fn endless_line_without_lf_stays_bounded() {
        let mut r = AmiReader::new();
        let mut errors = 0;
        for _ in 0..1000 {
            r.push(&[b'z'; 1000]);
            for m in drain(&mut r) {
                assert_eq!(m, Err(AmiError::LineTooLong));
                errors += 1;
            }
            assert!(r.buffered() <= MAX_LINE + 1000);
        }
        assert_eq!(errors, 1);
        r.push(b"\r\n\r\nEvent: Hangup\r\nUniqueid: 5.5\r\n\r\n");
        let m = ok(drain(&mut r));
        assert_eq!(m.len(), 1);
        assert!(m[0].is_event("Hangup"));
    }

    #[test]
    fn login_action_text() {
        assert_eq!(
            login("dispatchd", "s3cret", "login-1"),
            "Action: Login\r\nActionID: login-1\r\nUsername: dispatchd\r\n\
Secret: s3cret\r\nEvents: call,agent,dtmf,user\r\n\r\n"
        );
        // No line injection through the values.
        let text = login("a\r\nAction: Originate", "b\n", "c\r");
        assert_eq!(text.matches("\r\n").count(), 6);
        assert!(text.contains("Username: aAction: Originate\r\n"));
        // The action reads back as one message with the expected fields.
        let mut r = AmiReader::new();
        r.push(login("u", "p", "id-9").as_bytes());
        let m = ok(drain(&mut r));
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].get("action"), Some("Login"));
        assert_eq!(m[0].get("events"), Some(LOGIN_EVENTS));
        assert_eq!(m[0].kind(), MessageKind::Other);
    }

    #[test]
    fn login_failure_response() {
        let input = "Asterisk Call Manager/7.0.3\r\n\
Response: Error\r\n\
ActionID: login-1\r\n\
Message: Authentication failed\r\n\
\r\n";
        for chunk in [1, 7, usize::MAX] {
            let (msgs, _) = read_chunked(input.as_bytes(), chunk);
            let msgs = ok(msgs);
            assert_eq!(msgs.len(), 1);
            assert_eq!(
                login_response(&msgs[0], "login-1"),
                Some(LoginOutcome::Rejected { message: "Authentication failed".into() })
            );
        }
        let other_id = AmiMessage::from_pairs(&[("Response", "Success"), ("ActionID", "x")]);
        assert_eq!(login_response(&other_id, "login-1"), None);
        let no_id = AmiMessage::from_pairs(&[("Response", "Error")]);
        assert_eq!(login_response(&no_id, "login-1"), Some(LoginOutcome::Rejected { message: String::new() }));
        let event = AmiMessage::from_pairs(&[("Event", "FullyBooted")]);
        assert_eq!(login_response(&event, "login-1"), None);
    }

    /// An expected event: `kind` for `call_ref`, then `f` fills the rest.
    fn call(kind: EventKind, call_ref: &str, f: impl FnOnce(&mut CallEvent)) -> CallEvent {
        let mut e = CallEvent::new(Source::Ami, kind, call_ref);
        f(&mut e);
        e
    }

    fn ev(pairs: &[(&str, &str)]) -> Option<CallEvent> {
        map_event(&AmiMessage::from_pairs(pairs))
    }

    #[test]
    fn queue_join_mapping_and_missing_fields() {
        assert_eq!(
            ev(&[
                ("Event", "QueueCallerJoin"),
                ("Uniqueid", "9.1"),
                ("Linkedid", "9.0"),
                ("Queue", "triage"),
                ("CallerIDNum", "07700900123"),
                ("CallerIDName", "A Caller"),
            ]),
            Some(call(EventKind::QueueJoin, "9.0", |e| {
                e.queue = "triage".into();
                e.caller = "07700900123".into();
                e.caller_name = "A Caller".into();
            }))
        );
        // Only Uniqueid; caller ID unknown; no queue.
        assert_eq!(
            ev(&[("event", "queuecallerjoin"), ("Linkedid", ""), ("Uniqueid", "9.1"), ("CallerIDNum", "<unknown>"),]),
            Some(call(EventKind::QueueJoin, "9.1", |_| {}))
        );
        // Nothing to correlate by.
        assert_eq!(ev(&[("Event", "QueueCallerJoin"), ("Queue", "triage")]), None);
        assert_eq!(ev(&[("Event", "QueueCallerJoin"), ("Linkedid", "  "), ("Uniqueid", "")]), None);
    }

    #[test]
    fn abandon_mapping_and_missing_fields() {
        assert_eq!(
            ev(&[
                ("Event", "QueueCallerAbandon"),
                ("Uniqueid", "9.0"),
                ("Linkedid", "9.0"),
                ("CallerIDNum", "07700900123"),
                ("Queue", "triage"),
                ("Position", "2"),
                ("OriginalPosition", "3"),
                ("HoldTime", "47"),
            ]),
            Some(call(EventKind::QueueAbandon, "9.0", |e| {
                e.queue = "triage".into();
                e.caller = "07700900123".into();
                e.wait_seconds = Some(47);
            }))
        );
        for hold in [None, Some(""), Some("-3"), Some("soon"), Some("99999999999")] {
            let mut pairs = vec![("Event", "QueueCallerAbandon"), ("Uniqueid", "9.1")];
            if let Some(h) = hold {
                pairs.push(("HoldTime", h));
            }
            assert_eq!(ev(&pairs), Some(call(EventKind::QueueAbandon, "9.1", |_| {})), "{hold:?}");
        }
    }

    #[test]
    fn agent_connect_mapping_and_missing_fields() {
        assert_eq!(
            ev(&[
                ("Event", "AgentConnect"),
                ("Linkedid", "9.0"),
                ("Queue", "triage"),
                ("MemberName", ""),
                ("Interface", "PJSIP/agent7"),
                ("HoldTime", "8"),
                ("RingTime", "2"),
            ]),
            Some(call(EventKind::AgentConnect, "9.0", |e| {
                e.queue = "triage".into();
                e.agent = "PJSIP/agent7".into();
            }))
        );
        assert_eq!(
            ev(&[("Event", "AgentConnect"), ("Uniqueid", "9.1"), ("MemberName", "Agent Seven"), ("Interface", "x")]),
            Some(call(EventKind::AgentConnect, "9.1", |e| e.agent = "Agent Seven".into()))
        );
        assert_eq!(
            ev(&[("Event", "AgentConnect"), ("Uniqueid", "9.1")]),
            Some(call(EventKind::AgentConnect, "9.1", |_| {}))
        );
    }

    #[test]
    fn agent_complete_mapping_and_missing_fields() {
        assert_eq!(
            ev(&[
                ("Event", "AgentComplete"),
                ("Linkedid", "9.0"),
                ("Queue", "triage"),
                ("HoldTime", "8"),
                ("TalkTime", "61"),
                ("Reason", "agent"),
            ]),
            Some(call(EventKind::AgentComplete, "9.0", |e| {
                e.queue = "triage".into();
                e.reason = "agent".into();
            }))
        );
        assert_eq!(
            ev(&[("Event", "AgentComplete"), ("Uniqueid", "9.1"), ("TalkTime", "")]),
            Some(call(EventKind::AgentComplete, "9.1", |_| {}))
        );
    }

    #[test]
    fn dtmf_mapping_only_received_on_the_callers_channel_with_a_digit() {
        let base = [("Event", "DTMFEnd"), ("Uniqueid", "9.0"), ("Linkedid", "9.0"), ("Digit", "#")];
        let with = |dir: Option<&str>| {
            let mut p = base.to_vec();
            if let Some(d) = dir {
                p.push(("Direction", d));
            }
            ev(&p)
        };
        assert_eq!(
            with(Some("Received")),
            Some(call(EventKind::Dtmf, "9.0", |e| e.ivr_path = IvrPath::from_selections(["#"])))
        );
        assert_eq!(with(Some("Sent")), None);
        assert_eq!(with(None), None);
        assert_eq!(ev(&[("Event", "DTMFEnd"), ("Linkedid", "9.0"), ("Direction", "Received")]), None);
        assert_eq!(ev(&[("Event", "DTMFBegin"), ("Linkedid", "9.0"), ("Digit", "1"), ("Direction", "Received")]), None);
        // The agent's (or a Local channel's) leg of the same call.
        let leg =
            [("Event", "DTMFEnd"), ("Uniqueid", "9.3"), ("Linkedid", "9.0"), ("Digit", "1"), ("Direction", "Received")];
        assert_eq!(ev(&leg), None);
    }

    #[test]
    fn hangup_only_of_the_callers_channel() {
        assert_eq!(
            ev(&[
                ("Event", "Hangup"),
                ("Uniqueid", "9.0"),
                ("Linkedid", "9.0"),
                ("Cause", "17"),
                ("Cause-txt", "User busy")
            ]),
            Some(call(EventKind::Hangup, "9.0", |e| e.reason = "17".into()))
        );
        assert_eq!(ev(&[("Event", "Hangup"), ("Uniqueid", "9.1")]), Some(call(EventKind::Hangup, "9.1", |_| {})));
        assert_eq!(
            ev(&[("Event", "Hangup"), ("Uniqueid", "9.1"), ("Linkedid", "")]),
            Some(call(EventKind::Hangup, "9.1", |_| {}))
        );
        // The agent leg shares the caller's Linkedid: not the caller hanging up.
        assert_eq!(ev(&[("Event", "Hangup"), ("Uniqueid", "9.4"), ("Linkedid", "9.0"), ("Cause", "16")]), None);
        // Whose channel it is cannot be told.
        assert_eq!(ev(&[("Event", "Hangup"), ("Linkedid", "9.0")]), None);
    }

    #[test]
    fn other_messages_map_to_nothing() {
        assert_eq!(ev(&[("Event", "Hangup")]), None);
        assert_eq!(ev(&[("Event", "Newchannel"), ("Uniqueid", "9.1")]), None);
        assert_eq!(ev(&[("Event", "QueueCallerLeave"), ("Uniqueid", "9.1"), ("Queue", "q")]), None);
        assert_eq!(ev(&[("Response", "Success"), ("Uniqueid", "9.1")]), None);
        assert_eq!(ev(&[]), None);
    }

    #[test]
    fn ping_action_text() {
        assert_eq!(ping("ping-3"), "Action: Ping\r\nActionID: ping-3\r\n\r\n");
        assert_eq!(ping("a\r\nAction: Logoff"), "Action: Ping\r\nActionID: aAction: Logoff\r\n\r\n");
    }

    #[test]
    fn page_reports_digit_answer_failure_and_hangup() {
        use crate::dispatcher::pager::Report;
        use crate::domain::dispatch::Outcome;
        let m = |pairs: &[(&str, &str)]| page_report(&AmiMessage::from_pairs(pairs));
        let digit = [("Event", "UserEvent"), ("UserEvent", "DispatchdPage"), ("Uniqueid", "u-1"), ("Choice", " 1 ")];
        assert_eq!(m(&digit), Some(("u-1".into(), Report::Digit('1'))));
        // Another UserEvent, an empty choice, no channel: nothing.
        assert_eq!(m(&[("Event", "UserEvent"), ("UserEvent", "Other"), ("Uniqueid", "u-1"), ("Choice", "1")]), None);
        assert_eq!(
            m(&[("Event", "UserEvent"), ("UserEvent", "DispatchdPage"), ("Uniqueid", "u-1"), ("Choice", "")]),
            None
        );
        assert_eq!(m(&[("Event", "UserEvent"), ("UserEvent", "DispatchdPage"), ("Choice", "1")]), None);
        // Non-ASCII in the choice is a digit that means nothing (the pager ignores it).
        let odd = [("Event", "UserEvent"), ("UserEvent", "DispatchdPage"), ("Uniqueid", "u-1"), ("Choice", "١")];
        assert_eq!(m(&odd), Some(("u-1".into(), Report::Digit('١'))));

        let resp = |r: &str, reason: &str| {
            m(&[
                ("Event", "OriginateResponse"),
                ("ActionID", "dispatchd-page-u-2"),
                ("Response", r),
                ("Reason", reason),
            ])
        };
        assert_eq!(resp("Success", "4"), Some(("u-2".into(), Report::Answered)));
        assert_eq!(resp("Failure", "5"), Some(("u-2".into(), Report::Failed(Outcome::Busy))));
        assert_eq!(resp("Failure", "3"), Some(("u-2".into(), Report::Failed(Outcome::NoAnswer))));
        assert_eq!(resp("Failure", "8"), Some(("u-2".into(), Report::Failed(Outcome::Failed("congestion".into())))));
        assert_eq!(
            resp("Failure", "x"),
            Some(("u-2".into(), Report::Failed(Outcome::Failed("originate_failed".into()))))
        );
        // Someone else's originate.
        assert_eq!(m(&[("Event", "OriginateResponse"), ("ActionID", "other-1"), ("Response", "Failure")]), None);

        let hangup = |cause: &str| m(&[("Event", "Hangup"), ("Uniqueid", "u-3"), ("Cause", cause)]);
        assert_eq!(hangup("17"), Some(("u-3".into(), Report::Hangup(Outcome::Busy))));
        assert_eq!(hangup("19"), Some(("u-3".into(), Report::Hangup(Outcome::NoAnswer))));
        assert_eq!(hangup("16"), Some(("u-3".into(), Report::Hangup(Outcome::Failed("not_answered".into())))));
    }

    #[test]
    fn originate_and_hangup_actions_stay_one_action() {
        let vars = [("DISPATCHD_TEXT", "x\r\nAction: Command\r\nCommand: core stop now".to_string())];
        let a = originate(
            "id-1\r\nAction: Logoff",
            "PJSIP/1001\r\n\r\nAction: Hangup",
            "page",
            std::time::Duration::from_secs(30),
            &vars,
        );
        assert_eq!(a.matches("\r\n\r\n").count(), 1, "{a}");
        assert!(a.ends_with("\r\n\r\n"));
        assert_eq!(a.lines().filter(|l| l.starts_with("Action:")).count(), 1, "{a}");
        assert!(a.contains("Timeout: 30000\r\n") && a.contains("ActionID: dispatchd-page-id-1Action: Logoff\r\n"));
        let h = hangup("PJSIP/1001-0001\r\n\r\nAction: Logoff", "id-1");
        assert_eq!(h.matches("\r\n\r\n").count(), 1, "{h}");
    }
}
