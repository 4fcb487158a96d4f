//! Settings: built-in defaults → TOML file → `DISPATCHD__SECTION__KEY` environment.
//!
//! Unknown keys are an error, and every value is validated before the daemon
//! starts, so `dispatchd check-config` can name the offending key (exit 78).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

pub use crate::domain::classify::{IvrDefault, IvrRule, is_category_name};
use crate::domain::dispatch::Channel;
use crate::domain::incident::Severity;
use crate::domain::ivr::IvrPath;
use crate::domain::policy::duration;
pub use crate::domain::policy::{
    CallbackRule, CorrelationSettings, EscalationPolicy, EscalationSettings, RepeatRule, StormRule, SurgeRule,
    parse_duration,
};

/// A configuration error: the dotted key it concerns and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

fn err(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError { key: key.into(), message: message.into() }
}

/// A secret string whose `Debug` never shows the value.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SipMode {
    Decline,
    Shadow,
}

impl SipMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SipMode::Decline => "decline",
            SipMode::Shadow => "shadow",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SipSettings {
    /// UDP listen address; "" disables UDP.
    pub udp: String,
    /// TCP listen address; "" disables TCP.
    pub tcp: String,
    /// Source networks allowed to talk SIP to us (CIDR or plain address).
    pub allow: Vec<String>,
    pub mode: SipMode,
    pub decline_status: u16,
    #[serde(deserialize_with = "duration")]
    pub max_ring: Duration,
    /// Extension: TCP connections open at once, at most.
    pub tcp_max_connections: usize,
    /// Extension: a TCP connection silent this long is closed.
    #[serde(deserialize_with = "duration")]
    pub tcp_idle_timeout: Duration,
    /// Extension: INVITEs being written to Redis at once; beyond that, 503.
    pub max_inflight: usize,
    /// Extension: `Retry-After` seconds sent with 503.
    pub retry_after_s: u32,
    /// Extension: SO_RCVBUF asked for the UDP socket, bytes.
    pub udp_recv_buffer: usize,
    /// SIP over TLS (contract §9), framed like TCP; "" disables. Needs `[tls]`.
    pub tls: String,
    /// Extension: new INVITE and MESSAGE transactions per second from one
    /// source address (a burst of one second's worth is allowed); beyond it,
    /// 503 + Retry-After. 0 = no limit.
    pub rate_limit: u32,
}

impl Default for SipSettings {
    fn default() -> Self {
        SipSettings {
            udp: "0.0.0.0:5060".into(),
            tcp: "0.0.0.0:5060".into(),
            allow: vec!["127.0.0.0/8".into(), "::1/128".into()],
            mode: SipMode::Decline,
            decline_status: 603,
            max_ring: Duration::from_secs(600),
            tcp_max_connections: 256,
            tcp_idle_timeout: Duration::from_secs(660),
            max_inflight: 2048,
            retry_after_s: 5,
            udp_recv_buffer: 8 * 1024 * 1024,
            rate_limit: 1000,
            tls: String::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisSettings {
    /// The Redis to use; with `sentinels`, only its credentials and database
    /// count (the address is the primary's, found through the Sentinels).
    pub url: Secret,
    pub prefix: String,
    /// Extension: one Redis command (or script) taking longer fails.
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    /// Contract §12: Sentinel addresses (`host:port`); set = the primary is
    /// found through them, and found again after a failover.
    pub sentinels: Vec<String>,
    /// The name the Sentinels monitor the primary under.
    pub master_name: String,
    /// Replicas that must have a write before an answer promising it
    /// (180/603/202, `ok` to an ack) is sent (`WAIT`); 0 = do not wait.
    pub min_replicas_ack: u32,
    /// No replica acknowledgement in this time: 503 + Retry-After (or
    /// `error` `unavailable`), nothing promised.
    #[serde(deserialize_with = "duration")]
    pub replicas_timeout: Duration,
    /// Extension: how long an incident's opening waits for others to share
    /// its script call. 0 (the default): it shares it only with those already
    /// waiting, which under load is most of them. A wait saves Redis CPU at
    /// low rates and adds up to twice as much to every answer (the timer's
    /// resolution is 1 ms). At most 10 ms.
    #[serde(deserialize_with = "duration")]
    pub batch_wait: Duration,
}

impl Default for RedisSettings {
    fn default() -> Self {
        RedisSettings {
            url: Secret("redis://127.0.0.1:6379/0".into()),
            prefix: "dispatchd".into(),
            timeout: Duration::from_millis(1500),
            sentinels: Vec::new(),
            master_name: "dispatchd".into(),
            min_replicas_ack: 0,
            replicas_timeout: Duration::from_millis(250),
            batch_wait: Duration::ZERO,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RespondersSettings {
    pub listen: String,
    /// wss:// and https:// on `listen` (contract §9); default: on when `[tls]` is set.
    pub tls: Option<bool>,
    /// Extension: websocket ping interval; a responder silent for two is dropped.
    #[serde(deserialize_with = "duration")]
    pub heartbeat: Duration,
}

impl Default for RespondersSettings {
    fn default() -> Self {
        RespondersSettings { listen: "0.0.0.0:8080".into(), tls: None, heartbeat: Duration::from_secs(15) }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    pub listen: String,
    /// Hex SHA-256 of the admin bearer token; empty = the /v1 API refuses everyone.
    pub admin_token_sha256: String,
    /// https:// on `listen` (contract §9); needs `[tls]`.
    pub tls: bool,
    /// Extension: connections open at once, at most; more are closed at once.
    pub max_connections: usize,
    /// Extension: a connection that sends no complete request head for this
    /// long (a slow client, or an idle keep-alive) is closed.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
}

impl Default for HttpSettings {
    fn default() -> Self {
        HttpSettings {
            listen: "127.0.0.1:9090".into(),
            admin_token_sha256: String::new(),
            tls: false,
            max_connections: 256,
            idle_timeout: Duration::from_secs(30),
        }
    }
}

/// `[tls]` (contract §9): the certificate chain and key of every TLS listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrivacySettings {
    pub caller_key: Secret,
    #[serde(deserialize_with = "duration")]
    pub retention: Duration,
}

impl Default for PrivacySettings {
    fn default() -> Self {
        PrivacySettings { caller_key: Secret::default(), retention: Duration::from_secs(90 * 86_400) }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings { format: LogFormat::Json, level: "info".into() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownSettings {
    /// How long SIGTERM waits for in-flight work before exiting.
    #[serde(deserialize_with = "duration")]
    pub drain: Duration,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        ShutdownSettings { drain: Duration::from_secs(10) }
    }
}

/// Extension (issue 14): the async runtime, read at start.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeSettings {
    /// Threads that run the daemon's tasks. One by default: a call's
    /// datagram, its batch's round trip to Redis and its answer then never
    /// hop between threads, which costs less CPU per call than spreading
    /// them (README "Measured"), and one thread carries thousands of calls a
    /// second. Reports are computed on a pool of their own; more threads
    /// help where many TLS handshakes arrive at once.
    pub worker_threads: usize,
}

impl Default for RuntimeSettings {
    fn default() -> Self {
        RuntimeSettings { worker_threads: 1 }
    }
}

/// One member of the roster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponderConfig {
    pub id: String,
    #[serde(default)]
    pub name: String,
    pub token_sha256: String,
    pub skills: Vec<String>,
    #[serde(default = "one")]
    pub tier: u32,
    /// Contract §11: a call through the PBX (e.g. `PJSIP/1001`, `sofia/internal/1001`).
    #[serde(default)]
    pub phone: Option<String>,
    /// A SIP MESSAGE to this URI (`sip:1001@10.0.0.30`, `;transport=tcp|tls`).
    #[serde(default)]
    pub sip_uri: Option<String>,
    /// A signed JSON POST to this URL (http or https).
    #[serde(default)]
    pub webhook: Option<String>,
}

fn one() -> u32 {
    1
}

impl ResponderConfig {
    /// The channels this responder has, in `order`.
    pub fn channels(&self, order: &[Channel]) -> Vec<Channel> {
        order
            .iter()
            .copied()
            .filter(|c| match c {
                Channel::PbxCall => self.phone.is_some(),
                Channel::SipMessage => self.sip_uri.is_some(),
                Channel::Webhook => self.webhook.is_some(),
            })
            .collect()
    }
}

/// `[fallback]` (contract §11): reaching a responder besides its websocket.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FallbackSettings {
    /// An offer not acknowledged this long after it was made goes out on the
    /// responder's other channels (at once when it has no open websocket).
    #[serde(deserialize_with = "duration")]
    pub after: Duration,
    pub order: Vec<Channel>,
    /// HMAC-SHA256 key of the webhook body (hex in `X-Dispatchd-Signature`).
    pub webhook_secret: Secret,
    /// The PBX context / dialplan that speaks the offer and reads one digit.
    pub page_context: String,
    /// Extension: a SIP MESSAGE without a final answer this long is failed
    /// (RFC 3261 Timer F is 32 s; an offer cannot wait that long).
    #[serde(deserialize_with = "duration")]
    pub message_timeout: Duration,
    /// Extension: one webhook POST without an answer this long is failed.
    #[serde(deserialize_with = "duration")]
    pub webhook_timeout: Duration,
    /// Extension: webhook tries after the first, on a failure or timeout.
    pub webhook_retries: u32,
}

impl Default for FallbackSettings {
    fn default() -> Self {
        FallbackSettings {
            after: Duration::from_secs(15),
            order: vec![Channel::SipMessage, Channel::PbxCall, Channel::Webhook],
            webhook_secret: Secret::default(),
            page_context: "dispatchd-page".into(),
            message_timeout: Duration::from_secs(8),
            webhook_timeout: Duration::from_secs(5),
            webhook_retries: 2,
        }
    }
}

/// Extension: the service-level target of one severity, for the report
/// (`[targets.<severity>]`): at least `percent` % of incidents acknowledged
/// within `ack_within` of the call.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetPolicy {
    #[serde(deserialize_with = "duration")]
    pub ack_within: Duration,
    /// 1 to 100.
    pub percent: u32,
}

/// Extension: `[targets.<severity>]`; a severity without a table has no target.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TargetsSettings {
    pub critical: Option<TargetPolicy>,
    pub high: Option<TargetPolicy>,
    pub medium: Option<TargetPolicy>,
    pub low: Option<TargetPolicy>,
}

impl TargetsSettings {
    pub fn for_severity(&self, s: Severity) -> Option<&TargetPolicy> {
        match s {
            Severity::Critical => self.critical.as_ref(),
            Severity::High => self.high.as_ref(),
            Severity::Medium => self.medium.as_ref(),
            Severity::Low => self.low.as_ref(),
        }
    }
}

/// `[acd.asterisk]`: the Asterisk Manager Interface feed (issue 5).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AsteriskSettings {
    /// `host:port` of the AMI listener (Asterisk's default is 5038).
    pub address: String,
    pub username: String,
    pub secret: Secret,
}

/// `[acd.freeswitch]`: the FreeSWITCH event socket feed (inbound mode).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FreeswitchSettings {
    /// `host:port` of mod_event_socket (FreeSWITCH's default is 8021).
    pub address: String,
    pub password: Secret,
}

/// `[acd]`: PBX event feeds. Each feed is off unless its table is present.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AcdSettings {
    pub asterisk: Option<AsteriskSettings>,
    pub freeswitch: Option<FreeswitchSettings>,
    /// A caller joining one of these queues opens an incident (as `X-Event:
    /// incident` does); other queues' calls are only followed. `["*"]` = every queue.
    pub incident_queues: Vec<String>,
    /// Longest wait between two connection attempts (the backoff doubles from 250ms up to this).
    #[serde(deserialize_with = "duration")]
    pub max_backoff: Duration,
}

impl Default for AcdSettings {
    fn default() -> Self {
        AcdSettings {
            asterisk: None,
            freeswitch: None,
            incident_queues: Vec::new(),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl AcdSettings {
    /// Whether a caller joining `queue` opens an incident.
    pub fn opens_incident(&self, queue: &str) -> bool {
        self.incident_queues.iter().any(|q| q == "*" || q == queue)
    }
}

/// Everything the daemon reads from its configuration.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub sip: SipSettings,
    pub redis: RedisSettings,
    pub responders: RespondersSettings,
    pub http: HttpSettings,
    /// TLS for the listeners (absent: plain TCP/UDP as in v1).
    pub tls: Option<TlsSettings>,
    pub privacy: PrivacySettings,
    pub log: LogSettings,
    pub shutdown: ShutdownSettings,
    pub runtime: RuntimeSettings,
    #[serde(rename = "responder")]
    pub roster: Vec<ResponderConfig>,
    pub ivr: Vec<IvrRule>,
    pub ivr_default: IvrDefault,
    /// Extension: default severity of a category named in the Request-URI
    /// (`incident-<category>`). A category listed only in `[[ivr]]` defaults
    /// to the most severe of its rows.
    pub categories: BTreeMap<String, Severity>,
    pub escalation: EscalationSettings,
    /// Extension: service-level targets reported by `dispatchd report` and `/v1/report`.
    pub targets: TargetsSettings,
    /// PBX event feeds (AMI, ESL).
    pub acd: AcdSettings,
    /// Correlation rules: repeat callers, callbacks, abandon storms, surges.
    pub correlation: CorrelationSettings,
    /// Reaching responders on other channels (contract §11).
    pub fallback: FallbackSettings,
}

/// Reads and validates the configuration. `path` may be absent (defaults and environment only).
pub fn load(path: Option<&Path>) -> Result<Settings, ConfigError> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    load_from(path, env)
}

/// [`load`] with the environment given explicitly (for tests).
pub fn load_from(path: Option<&Path>, env: Vec<(String, String)>) -> Result<Settings, ConfigError> {
    let mut builder = config::Config::builder();
    let mut file_text = None;
    if let Some(path) = path {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err("--config", format!("cannot read {}: {e}", path.display())))?;
        builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
        file_text = Some(text);
    }
    // DISPATCHD__SECTION__KEY. Only keys with this prefix count; list values are comma-separated.
    let env_map: std::collections::HashMap<String, String> =
        env.into_iter().filter(|(k, _)| k.starts_with("DISPATCHD__")).collect();
    builder = builder.add_source(
        config::Environment::with_prefix("DISPATCHD")
            .prefix_separator("__")
            .separator("__")
            .list_separator(",")
            .with_list_parse_key("sip.allow")
            .with_list_parse_key("skills")
            .with_list_parse_key("acd.incident_queues")
            .with_list_parse_key("redis.sentinels")
            .try_parsing(true)
            .source(Some(env_map)),
    );
    let raw = builder.build().map_err(|e| match &file_text {
        // A value the TOML parser refuses (an integer beyond 64 bits, …): name its key.
        Some(text) => file_error(text).unwrap_or_else(|| from_config_error(&e)),
        None => from_config_error(&e),
    })?;
    let settings: Settings = serde_path_to_error::deserialize(raw).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        from_config_error_at(&path, &inner)
    })?;
    settings.validate()?;
    Ok(settings)
}

/// The file's parse error named by the key on the line it points at
/// (`section.key`, `ivr[1].path`), when the TOML parser says where it is.
fn file_error(text: &str) -> Option<ConfigError> {
    let e = toml::from_str::<toml::Table>(text).err()?;
    let at = e.span()?.start;
    let line_no = text.get(..at)?.matches('\n').count();
    let mut section = String::new();
    let mut arrays: HashMap<String, usize> = HashMap::new();
    for line in text.lines().take(line_no) {
        let l = line.trim();
        if let Some(name) = l.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_string();
            let n = arrays.entry(name.clone()).and_modify(|n| *n += 1).or_insert(0);
            section = format!("{name}[{n}]");
        } else if let Some(name) = l.strip_prefix('[').and_then(|r| r.split(']').next()) {
            section = name.trim().to_string();
        }
    }
    let (key, _) = text.lines().nth(line_no)?.split_once('=')?;
    let key = key.trim().trim_matches('"');
    if key.is_empty() || key.starts_with('#') {
        return None;
    }
    let key = if section.is_empty() { key.to_string() } else { format!("{section}.{key}") };
    Some(err(key, e.message().to_string()))
}

fn from_config_error(e: &config::ConfigError) -> ConfigError {
    // Parse errors of the file: keep the first line only.
    let msg = e.to_string();
    err("config", msg.lines().next().unwrap_or("invalid configuration").to_string())
}

fn from_config_error_at(path: &str, e: &config::ConfigError) -> ConfigError {
    let msg = e.to_string();
    let first = msg.lines().next().unwrap_or("invalid value");
    let path = if path == "." { String::new() } else { path.to_string() };
    // "unknown field `foo`, expected one of …" names the key one level below `path`.
    if let Some(rest) = first.strip_prefix("unknown field `")
        && let Some(end) = rest.find('`')
    {
        let field = &rest[..end];
        // The path already ends with the unknown field itself.
        let key = if path.is_empty() || !path.ends_with(field) { join(&path, field) } else { path };
        return err(key, "unknown key");
    }
    if let Some(rest) = first.strip_prefix("missing field `")
        && let Some(end) = rest.find('`')
    {
        return err(join(&path, &rest[..end]), "missing");
    }
    // config wraps some errors as "… for key `x.y`"; strip to keep one clean line.
    let message = match first.find(" for key `") {
        Some(i) => first[..i].to_string(),
        None => first.to_string(),
    };
    err(if path.is_empty() { "config".to_string() } else { path }, message)
}

fn join(path: &str, field: &str) -> String {
    if path.is_empty() { field.to_string() } else { format!("{path}.{field}") }
}

/// SHA-256 of the empty string: a token nobody should be able to sign in with.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn is_hex_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn check_listen(key: &str, value: &str, may_be_empty: bool) -> Result<(), ConfigError> {
    if value.is_empty() && may_be_empty {
        return Ok(());
    }
    value.parse::<SocketAddr>().map(|_| ()).map_err(|_| err(key, format!("{value:?} is not an address:port")))
}

/// `host:port` with a port: an address, or a name resolved when connecting.
fn check_host_port(key: &str, value: &str) -> Result<(), ConfigError> {
    let ok = match value.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) && !host.chars().any(|c| c.is_whitespace())
        }
        None => false,
    };
    if ok { Ok(()) } else { Err(err(key, format!("{value:?} is not host:port"))) }
}

/// Parses one `sip.allow` entry: a CIDR or a bare address.
pub fn parse_net(s: &str) -> Option<IpNet> {
    let s = s.trim();
    s.parse::<IpNet>().ok().or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

impl Settings {
    /// Checks every value that serde alone cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let sip = &self.sip;
        check_listen("sip.udp", &sip.udp, true)?;
        check_listen("sip.tcp", &sip.tcp, true)?;
        if sip.udp.is_empty() && sip.tcp.is_empty() {
            return Err(err("sip.udp", "both sip.udp and sip.tcp are disabled"));
        }
        for (i, a) in sip.allow.iter().enumerate() {
            if parse_net(a).is_none() {
                return Err(err(format!("sip.allow[{i}]"), format!("{a:?} is not a CIDR or address")));
            }
        }
        if !(400..=699).contains(&sip.decline_status) {
            return Err(err("sip.decline_status", "must be a final error status, 400 to 699"));
        }
        if sip.max_ring.is_zero() {
            return Err(err("sip.max_ring", "must be more than zero"));
        }
        if sip.tcp_max_connections == 0 {
            return Err(err("sip.tcp_max_connections", "must be at least 1"));
        }
        if sip.max_inflight == 0 {
            return Err(err("sip.max_inflight", "must be at least 1"));
        }
        if sip.tcp_idle_timeout.is_zero() {
            return Err(err("sip.tcp_idle_timeout", "must be more than zero"));
        }
        check_listen("sip.tls", &sip.tls, true)?;
        if let Some(t) = &self.tls {
            crate::tls::server_config(&t.cert, &t.key).map_err(|e| err(e.key, e.message))?;
        }
        let no_tls = self.tls.is_none();
        if no_tls && !sip.tls.is_empty() {
            return Err(err("sip.tls", "needs [tls] (cert and key)"));
        }
        if no_tls && self.responders.tls == Some(true) {
            return Err(err("responders.tls", "needs [tls] (cert and key)"));
        }
        if no_tls && self.http.tls {
            return Err(err("http.tls", "needs [tls] (cert and key)"));
        }

        let url = self.redis.url.expose();
        if redis::Client::open(url).is_err() {
            return Err(err("redis.url", "not a valid redis:// URL"));
        }
        let p = &self.redis.prefix;
        if p.is_empty()
            || p.len() > 64
            || p.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b == b'{' || b == b'}')
        {
            return Err(err("redis.prefix", "must be 1 to 64 characters without spaces or braces"));
        }
        if self.redis.sentinels.len() > 32 {
            return Err(err("redis.sentinels", "at most 32 Sentinels"));
        }
        for (i, a) in self.redis.sentinels.iter().enumerate() {
            // A host name (at most 253 ASCII characters) or an IP address, then a port.
            let ok = a.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty()
                    && host.len() <= 253
                    && host.bytes().all(|b| b.is_ascii_graphic())
                    && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !ok {
                return Err(err(format!("redis.sentinels[{i}]"), "must be host:port"));
            }
        }
        let name = &self.redis.master_name;
        if !self.redis.sentinels.is_empty()
            && (name.is_empty() || name.len() > 128 || name.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(err("redis.master_name", "must be 1 to 128 characters without spaces"));
        }
        if self.redis.batch_wait > Duration::from_millis(10) {
            return Err(err("redis.batch_wait", "must be at most 10ms"));
        }
        if self.redis.min_replicas_ack > 64 {
            return Err(err("redis.min_replicas_ack", "must be at most 64"));
        }
        if self.redis.min_replicas_ack > 0
            && (self.redis.replicas_timeout.is_zero() || self.redis.replicas_timeout >= self.redis.timeout)
        {
            return Err(err("redis.replicas_timeout", "must be more than zero and less than redis.timeout"));
        }
        if self.redis.timeout.is_zero() {
            return Err(err("redis.timeout", "must be more than zero"));
        }

        check_listen("responders.listen", &self.responders.listen, false)?;
        if self.responders.heartbeat < Duration::from_millis(100) {
            return Err(err("responders.heartbeat", "must be at least 100ms"));
        }
        check_listen("http.listen", &self.http.listen, false)?;
        if self.http.max_connections == 0 {
            return Err(err("http.max_connections", "must be at least 1"));
        }
        if self.http.idle_timeout < Duration::from_millis(100) {
            return Err(err("http.idle_timeout", "must be at least 100ms"));
        }
        let admin = &self.http.admin_token_sha256;
        if !admin.is_empty() && !is_hex_sha256(admin) {
            return Err(err("http.admin_token_sha256", "must be 64 hex digits (sha256 of the token)"));
        }
        if admin.eq_ignore_ascii_case(EMPTY_SHA256) {
            return Err(err("http.admin_token_sha256", "is the SHA-256 of the empty token"));
        }

        if self.privacy.caller_key.expose().len() < 16 {
            return Err(err("privacy.caller_key", "must be set, at least 16 characters"));
        }
        if self.privacy.retention.is_zero() {
            return Err(err("privacy.retention", "must be more than zero"));
        }

        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(err("log.level", format!("{:?} is not a level or filter", self.log.level)));
        }
        if !(1..=64).contains(&self.runtime.worker_threads) {
            return Err(err("runtime.worker_threads", "must be 1 to 64"));
        }
        if self.shutdown.drain.is_zero() {
            return Err(err("shutdown.drain", "must be more than zero"));
        }

        let mut ids = HashSet::new();
        let mut hashes = std::collections::HashMap::new();
        for (i, r) in self.roster.iter().enumerate() {
            let k = |f: &str| format!("responder[{i}].{f}");
            if r.id.is_empty() || r.id.len() > 64 || r.id.bytes().any(|b| !b.is_ascii_graphic()) {
                return Err(err(k("id"), "must be 1 to 64 visible characters"));
            }
            if !ids.insert(r.id.as_str()) {
                return Err(err(k("id"), format!("duplicate responder id {:?}", r.id)));
            }
            if !is_hex_sha256(&r.token_sha256) {
                return Err(err(k("token_sha256"), "must be 64 hex digits (sha256 of the token)"));
            }
            let hash = r.token_sha256.to_ascii_lowercase();
            if hash == EMPTY_SHA256 {
                return Err(err(k("token_sha256"), "is the SHA-256 of the empty token"));
            }
            if hash == admin.to_ascii_lowercase() {
                return Err(err(k("token_sha256"), "is the admin token's hash (http.admin_token_sha256)"));
            }
            if let Some(other) = hashes.insert(hash, r.id.as_str()) {
                return Err(err(k("token_sha256"), format!("the same token as responder {other:?}")));
            }
            if r.skills.is_empty() {
                return Err(err(k("skills"), "must list at least one category, or \"*\""));
            }
            if let Some(s) = r.skills.iter().find(|s| s.as_str() != "*" && !is_category_name(s)) {
                return Err(err(k("skills"), format!("{s:?} is not a category name")));
            }
            if r.tier == 0 {
                return Err(err(k("tier"), "tiers start at 1"));
            }
            let bad_text = |v: &str| v.is_empty() || v.len() > 256 || v.chars().any(char::is_control);
            if let Some(phone) = &r.phone {
                if bad_text(phone) || phone.contains(' ') {
                    return Err(err(k("phone"), "must be a dial string like PJSIP/1001, without spaces"));
                }
                if self.acd.asterisk.is_none() && self.acd.freeswitch.is_none() {
                    return Err(err(
                        k("phone"),
                        "needs a PBX feed to place the call ([acd.asterisk] or [acd.freeswitch])",
                    ));
                }
            }
            if let Some(uri) = &r.sip_uri
                && (bad_text(uri) || crate::domain::contact::sip_target(uri).is_none())
            {
                return Err(err(k("sip_uri"), "must be a SIP URI like sip:1001@10.0.0.30"));
            }
            if let Some(url) = &r.webhook {
                let ok = !bad_text(url)
                    && url.parse::<axum::http::Uri>().is_ok_and(|u| {
                        matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some_and(|h| !h.is_empty())
                    });
                if !ok {
                    return Err(err(k("webhook"), "must be an http:// or https:// URL"));
                }
                if self.fallback.webhook_secret.expose().len() < 16 {
                    return Err(err(
                        "fallback.webhook_secret",
                        "must be set (at least 16 characters) to sign webhooks",
                    ));
                }
            }
        }

        let mut paths = HashSet::new();
        for (i, rule) in self.ivr.iter().enumerate() {
            let k = |f: &str| format!("ivr[{i}].{f}");
            let Some(path) = IvrPath::strict(&rule.path) else {
                return Err(err(k("path"), format!("{:?} is not an IVR path like \"2,1\"", rule.path)));
            };
            if !paths.insert(path) {
                return Err(err(k("path"), format!("duplicate IVR path {:?}", rule.path)));
            }
            if !is_category_name(&rule.category) {
                return Err(err(k("category"), "lowercase letters, digits, '-' and '_' only"));
            }
        }
        if !is_category_name(&self.ivr_default.category) {
            return Err(err("ivr_default.category", "lowercase letters, digits, '-' and '_' only"));
        }
        if let Some(name) = self.categories.keys().find(|c| !is_category_name(c)) {
            return Err(err(format!("categories.{name}"), "not a valid category name"));
        }

        for (name, p) in [
            ("critical", &self.escalation.critical),
            ("high", &self.escalation.high),
            ("medium", &self.escalation.medium),
            ("low", &self.escalation.low),
        ] {
            if p.ack_timeout.is_zero() {
                return Err(err(format!("escalation.{name}.ack_timeout"), "must be more than zero"));
            }
            if p.max_rounds == 0 {
                return Err(err(format!("escalation.{name}.max_rounds"), "must be at least 1"));
            }
            if p.en_route_within.is_some_and(|d| d.is_zero()) {
                return Err(err(format!("escalation.{name}.en_route_within"), "must be more than zero"));
            }
            if p.on_scene_within.is_some_and(|d| d.is_zero()) {
                return Err(err(format!("escalation.{name}.on_scene_within"), "must be more than zero"));
            }
            if p.release_after == 0 {
                return Err(err(format!("escalation.{name}.release_after"), "must be at least 1"));
            }
        }
        if let Some(a) = &self.acd.asterisk {
            check_host_port("acd.asterisk.address", &a.address)?;
            if a.username.is_empty() || a.username.chars().any(char::is_control) {
                return Err(err("acd.asterisk.username", "must be set, without control characters"));
            }
            if a.secret.expose().chars().any(char::is_control) {
                return Err(err("acd.asterisk.secret", "must not contain control characters"));
            }
        }
        if let Some(f) = &self.acd.freeswitch {
            check_host_port("acd.freeswitch.address", &f.address)?;
            if f.password.expose().is_empty() || f.password.expose().chars().any(|c| c.is_control() || c == ' ') {
                return Err(err("acd.freeswitch.password", "must be set, without spaces or control characters"));
            }
        }
        if let Some(q) = self.acd.incident_queues.iter().find(|q| q.is_empty() || q.len() > 64) {
            return Err(err("acd.incident_queues", format!("{q:?} is not a queue name (1 to 64 characters)")));
        }
        if self.acd.max_backoff < Duration::from_millis(250) {
            return Err(err("acd.max_backoff", "must be at least 250ms"));
        }
        let f = &self.fallback;
        if f.after.is_zero() {
            return Err(err("fallback.after", "must be more than zero"));
        }
        let distinct: HashSet<&Channel> = f.order.iter().collect();
        if distinct.len() != f.order.len() {
            return Err(err("fallback.order", "names a channel twice"));
        }
        let pc = &f.page_context;
        if pc.is_empty() || pc.len() > 64 || pc.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(err("fallback.page_context", "must be a context name without spaces"));
        }
        if f.message_timeout < Duration::from_millis(500) || f.webhook_timeout < Duration::from_millis(100) {
            return Err(err(
                "fallback.message_timeout",
                "timeouts must be at least 500ms (message) and 100ms (webhook)",
            ));
        }
        if f.webhook_retries > 10 {
            return Err(err("fallback.webhook_retries", "at most 10"));
        }
        let c = &self.correlation;
        if c.repeat.enabled && c.repeat.window.is_zero() {
            return Err(err("correlation.repeat.window", "must be more than zero"));
        }
        let bursts = [
            ("abandon_storm", c.abandon_storm.enabled, c.abandon_storm.count, c.abandon_storm.window),
            ("surge", c.surge.enabled, c.surge.count, c.surge.window),
        ];
        for (name, enabled, count, window) in bursts {
            if enabled && count < 2 {
                return Err(err(format!("correlation.{name}.count"), "must be at least 2"));
            }
            if enabled && window.is_zero() {
                return Err(err(format!("correlation.{name}.window"), "must be more than zero"));
            }
        }
        for s in Severity::ALL {
            if let Some(t) = self.targets.for_severity(s) {
                if t.ack_within.is_zero() {
                    return Err(err(format!("targets.{s}.ack_within"), "must be more than zero"));
                }
                if !(1..=100).contains(&t.percent) {
                    return Err(err(format!("targets.{s}.percent"), "must be 1 to 100"));
                }
            }
        }
        Ok(())
    }

    /// Whether the responders' listener speaks TLS (wss, https): as set, else when `[tls]` is.
    pub fn responders_tls(&self) -> bool {
        self.responders.tls.unwrap_or(self.tls.is_some())
    }

    /// The parsed `sip.allow` networks (validated already).
    pub fn allow_nets(&self) -> Vec<IpNet> {
        self.sip.allow.iter().filter_map(|a| parse_net(a)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "DISPATCHD__PRIVACY__CALLER_KEY";

    fn load_str(toml: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.toml");
        std::fs::write(&path, toml).unwrap();
        let mut env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        if !env.iter().any(|(k, _)| k == KEY) {
            env.push((KEY.into(), "0123456789abcdef0123".into()));
        }
        load_from(Some(&path), env)
    }

    #[test]
    fn defaults_are_valid_and_per_severity() {
        let s = load_str("", &[]).unwrap();
        assert_eq!(s.sip.mode, SipMode::Decline);
        assert_eq!(s.escalation.critical.ack_timeout, Duration::from_secs(30));
        assert_eq!(s.escalation.low.ack_timeout, Duration::from_secs(300));
        assert_eq!(s.privacy.retention, Duration::from_secs(90 * 86400));
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = load_str("[sip]\nudpp = \"1\"\n", &[]).unwrap_err();
        assert_eq!(e.key, "sip.udpp");
        let e = load_str("[nonsense]\na = 1\n", &[]).unwrap_err();
        assert_eq!(e.key, "nonsense");
        let e = load_str("", &[("DISPATCHD__SIP__BOGUS", "1")]).unwrap_err();
        assert_eq!(e.key, "sip.bogus");
    }

    #[test]
    fn bad_values_are_named() {
        let e = load_str("[[ivr]]\npath = \"1\"\ncategory = \"x\"\nseverity = \"urgent\"\n", &[]).unwrap_err();
        assert!(e.key.starts_with("ivr"), "{e}");
        assert!(e.message.contains("urgent"), "{e}");
        let e = load_str("[sip]\nmax_ring = \"ten minutes\"\n", &[]).unwrap_err();
        assert_eq!(e.key, "sip.max_ring");
        let e = load_str("[sip]\nallow = [\"10.0.0.0/33\"]\n", &[]).unwrap_err();
        assert_eq!(e.key, "sip.allow[0]");
        let e = load_str("[[ivr]]\npath = \"2,x\"\ncategory = \"a\"\nseverity = \"low\"\n", &[]).unwrap_err();
        assert_eq!(e.key, "ivr[0].path");
        let e = load_str("", &[(KEY, "short")]).unwrap_err();
        assert_eq!(e.key, "privacy.caller_key");
    }

    #[test]
    fn environment_overrides_file() {
        let s = load_str(
            "[redis]\nurl = \"redis://127.0.0.1:1/0\"\n",
            &[("DISPATCHD__REDIS__URL", "redis://127.0.0.1:2/0"), ("DISPATCHD__SIP__ALLOW", "10.0.0.0/8,192.0.2.1")],
        )
        .unwrap();
        assert_eq!(s.redis.url.expose(), "redis://127.0.0.1:2/0");
        assert_eq!(s.sip.allow, vec!["10.0.0.0/8", "192.0.2.1"]);
        assert_eq!(s.allow_nets().len(), 2);
    }

    #[test]
    fn targets_are_per_severity_and_checked() {
        let s = load_str("[targets.critical]\nack_within = \"60s\"\npercent = 90\n", &[]).unwrap();
        let t = s.targets.for_severity(Severity::Critical).unwrap();
        assert_eq!((t.ack_within, t.percent), (Duration::from_secs(60), 90));
        assert!(s.targets.for_severity(Severity::Low).is_none());
        assert!(load_str("", &[]).unwrap().targets.high.is_none());
        for (toml, key) in [
            ("[targets.high]\nack_within = \"60s\"\npercent = 0\n", "targets.high.percent"),
            ("[targets.high]\nack_within = \"60s\"\npercent = 101\n", "targets.high.percent"),
            ("[targets.low]\nack_within = \"0s\"\npercent = 50\n", "targets.low.ack_within"),
            ("[targets.low]\nack_within = \"soon\"\npercent = 50\n", "targets.low.ack_within"),
            ("[targets.low]\npercent = 50\n", "targets.low.ack_within"),
            ("[targets.low]\nack_within = \"1m\"\npercent = 50\nextra = 1\n", "targets.low.extra"),
            ("[targets.urgent]\nack_within = \"1m\"\npercent = 50\n", "targets.urgent"),
        ] {
            let e = load_str(toml, &[]).unwrap_err();
            assert!(e.key.starts_with("targets.") && e.to_string().contains(key), "{toml}: {e}");
        }
        let s =
            load_str("", &[("DISPATCHD__TARGETS__LOW__ACK_WITHIN", "5m"), ("DISPATCHD__TARGETS__LOW__PERCENT", "75")])
                .unwrap();
        assert_eq!(s.targets.low, Some(TargetPolicy { ack_within: Duration::from_secs(300), percent: 75 }));
    }

    #[test]
    fn acd_and_correlation_keys_default_and_are_checked() {
        let s = load_str("", &[]).unwrap();
        assert!(s.acd.asterisk.is_none() && s.acd.freeswitch.is_none());
        assert!(s.correlation.repeat.enabled && s.correlation.surge.enabled);
        assert_eq!(s.correlation.repeat.window, Duration::from_secs(1800));
        assert_eq!((s.correlation.abandon_storm.count, s.correlation.surge.count), (10, 5));
        assert_eq!(s.correlation.callback.abandon_after, Duration::from_secs(60));
        // A table with one key keeps the rule's own defaults for the others.
        let s =
            load_str("[correlation.surge]\nenabled = false\n[correlation.abandon_storm]\ncount = 3\n", &[]).unwrap();
        assert!(!s.correlation.surge.enabled);
        assert_eq!(s.correlation.surge.severity, Severity::Critical);
        assert_eq!(s.correlation.abandon_storm.window, Duration::from_secs(300));
        assert_eq!(s.correlation.abandon_storm.severity, Severity::High);
        let s = load_str(
            "[acd]\nincident_queues = [\"incident\"]\n[acd.asterisk]\naddress = \"pbx.example:5038\"\nusername = \"d\"\nsecret = \"s3cret\"\n",
            &[],
        )
        .unwrap();
        assert!(s.acd.opens_incident("incident") && !s.acd.opens_incident("sales"));
        assert!(!format!("{s:?}").contains("s3cret"));
        let s = load_str("", &[("DISPATCHD__ACD__INCIDENT_QUEUES", "a,b")]).unwrap();
        assert_eq!(s.acd.incident_queues, vec!["a", "b"]);
        for (toml, key) in [
            ("[acd.asterisk]\naddress = \"nohost\"\nusername = \"d\"\nsecret = \"s\"\n", "acd.asterisk.address"),
            ("[acd.asterisk]\naddress = \"h:5038\"\nsecret = \"s\"\n", "acd.asterisk.username"),
            ("[acd.freeswitch]\naddress = \"h:0\"\npassword = \"p\"\n", "acd.freeswitch.address"),
            ("[acd.freeswitch]\naddress = \"h:8021\"\npassword = \"\"\n", "acd.freeswitch.password"),
            ("[acd]\nmax_backoff = \"1ms\"\n", "acd.max_backoff"),
            ("[correlation.surge]\ncount = 1\n", "correlation.surge.count"),
            ("[correlation.abandon_storm]\nwindow = \"0s\"\n", "correlation.abandon_storm.window"),
            ("[correlation.repeat]\nwindw = \"1m\"\n", "correlation.repeat.windw"),
            ("[correlation.callback]\nseverity = \"urgent\"\n", "correlation.callback.severity"),
            ("[correlation.nonsense]\nenabled = true\n", "correlation.nonsense"),
        ] {
            let e = load_str(toml, &[]).unwrap_err();
            assert!(e.key.starts_with("acd") || e.key.starts_with("correlation"), "{toml}: {e}");
            assert!(e.to_string().contains(key), "{toml}: {e}");
        }
    }

    #[test]
    fn secrets_do_not_debug_print() {
        let s = load_str("", &[]).unwrap();
        assert!(!format!("{s:?}").contains("0123456789abcdef0123"));
    }
}
