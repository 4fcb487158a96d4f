//! The SIP transaction layer of a UAS (RFC 3261 §17.2), with no policy in it:
//! matching requests to server transactions, absorbing retransmissions with
//! the last response, the INVITE final response's retransmission until the
//! ACK (Timer G, T1..T2, up to Timer H), ACK matching, early dialogs by
//! Call-ID and tags, and forgetting finished transactions (Timer J/I).
//!
//! Why not rsipstack's transaction layer: its transports drop what they cannot
//! parse and cannot represent unknown methods, so they can never answer 400 or
//! 405, apply the allow list before anything is sent, or bound TCP framing. We
//! use rsipstack's SIP types (see `call.rs`) and keep this layer small.
//!
//! What the incident line keeps per call (`C`, on an INVITE transaction) and
//! per early dialog (`D`) is its own business (`line.rs`); it works on the
//! table under the one lock this layer holds.

use std::collections::{BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::wire::{Message, Reply, response};
use crate::telemetry::metric;

/// RFC 3261 timers.
const T1: Duration = Duration::from_millis(500);
const T2: Duration = Duration::from_secs(4);
const T4: Duration = Duration::from_secs(5);
/// How long a finished transaction is remembered (Timer H / Timer J, 64·T1).
pub const LINGER: Duration = Duration::from_secs(32);
/// INVITE transactions remembered at once, at most; beyond that new ones get 503.
const MAX_TRANSACTIONS: usize = 500_000;
/// Non-INVITE transactions (OPTIONS, BYE, CANCEL, INFO, MESSAGE, 405s …)
/// remembered at once, and the bytes of their responses: beyond either, a
/// new one is still answered but not remembered (a retransmission is then
/// answered afresh; a MESSAGE is not applied twice, by its dedup key).
const MAX_OTHER: usize = 100_000;
const MAX_OTHER_BYTES: usize = 32 << 20;

/// Where a response goes: back the way the request came.
#[derive(Clone, Debug)]
pub enum Peer {
    Udp {
        sock: Arc<UdpSocket>,
        addr: SocketAddr,
    },
    /// A stream connection: TCP, or TLS when `tls`.
    Tcp {
        tx: mpsc::Sender<Bytes>,
        addr: SocketAddr,
        tls: bool,
    },
}

impl Peer {
    /// Where the request came from.
    pub fn addr(&self) -> SocketAddr {
        match self {
            Peer::Udp { addr, .. } | Peer::Tcp { addr, .. } => *addr,
        }
    }

    pub fn reliable(&self) -> bool {
        matches!(self, Peer::Tcp { .. })
    }

    pub fn transport(&self) -> &'static str {
        match self {
            Peer::Udp { .. } => "udp",
            Peer::Tcp { tls: false, .. } => "tcp",
            Peer::Tcp { tls: true, .. } => "tls",
        }
    }

    /// Sends bytes without waiting; a full socket or a closed connection loses them
    /// (UDP retransmissions and the peer's own timers cover that).
    pub fn send(&self, bytes: &Bytes) {
        match self {
            Peer::Udp { sock, addr } => {
                let _ = sock.try_send_to(bytes, *addr);
            }
            Peer::Tcp { tx, .. } => {
                let _ = tx.try_send(bytes.clone());
            }
        }
    }
}

/// Builds a response and counts it.
pub fn build(reply: &Reply, status: u16, reason: &str, to_tag: Option<&str>, extra: &[(&str, &str)]) -> Bytes {
    metrics::counter!(metric::SIP_RESPONSES, "status" => status_label(status)).increment(1);
    Bytes::from(response(reply, status, reason, to_tag, extra, b""))
}

/// A status as a metric label: the ones the line sends without a text made
/// per response (two on every call), any other as its digits.
fn status_label(status: u16) -> std::borrow::Cow<'static, str> {
    let known = match status {
        100 => "100",
        180 => "180",
        200 => "200",
        202 => "202",
        400 => "400",
        404 => "404",
        405 => "405",
        415 => "415",
        420 => "420",
        480 => "480",
        481 => "481",
        483 => "483",
        486 => "486",
        487 => "487",
        488 => "488",
        503 => "503",
        600 => "600",
        603 => "603",
        _ => return status.to_string().into(),
    };
    known.into()
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TxKey {
    branch: String,
    method: String,
}

impl TxKey {
    /// The INVITE transaction a CANCEL (or ACK) of the same branch belongs to.
    pub fn invite(&self) -> TxKey {
        TxKey { branch: self.branch.clone(), method: "INVITE".into() }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DialogKey {
    pub call_id: String,
    pub local_tag: String,
    pub remote_tag: String,
}

pub struct InviteTx<C> {
    pub peer: Peer,
    pub reply: Reply,
    pub to_tag: String,
    pub last: Bytes,
    pub final_sent: bool,
    acked: Arc<AtomicBool>,
    pub received: Instant,
    /// The early dialog this INVITE made, ended with its final response.
    pub dialog: Option<DialogKey>,
    expires: Instant,
    /// What the line keeps of the call.
    pub call: C,
}

pub struct OtherTx {
    /// None while the request is being worked on (retransmissions are then ignored).
    last: Option<Bytes>,
    expires: Instant,
}

// Most transactions are INVITEs: boxing them would add an allocation per call.
#[allow(clippy::large_enum_variant)]
pub enum Tx<C> {
    Invite(InviteTx<C>),
    Other(OtherTx),
}

pub struct Dialog<D> {
    /// The INVITE transaction that made it.
    pub invite: TxKey,
    pub data: D,
}

pub struct Table<C, D> {
    pub txs: HashMap<TxKey, Tx<C>>,
    pub dialogs: HashMap<DialogKey, Dialog<D>>,
    /// Non-INVITE transactions in `txs`, and the bytes of their responses.
    others: usize,
    other_bytes: usize,
}

impl<C, D> Table<C, D> {
    /// Remembers a non-INVITE transaction (its response, if it has one yet)
    /// within the bounds; false (and nothing remembered) beyond them.
    fn put_other(&mut self, key: TxKey, last: Option<Bytes>, expires: Instant) -> bool {
        let size = |l: &Option<Bytes>| l.as_ref().map_or(0, Bytes::len);
        let (others, bytes) = match self.txs.get(&key) {
            Some(Tx::Other(old)) => (self.others, self.other_bytes - size(&old.last)),
            Some(Tx::Invite(_)) => return false,
            None => (self.others + 1, self.other_bytes),
        };
        if others > MAX_OTHER || bytes + size(&last) > MAX_OTHER_BYTES {
            if let Some(Tx::Other(old)) = self.txs.remove(&key) {
                self.others -= 1;
                self.other_bytes -= size(&old.last);
            }
            return false;
        }
        self.other_bytes = bytes + size(&last);
        self.others = others;
        self.txs.insert(key, Tx::Other(OtherTx { last, expires }));
        true
    }

    pub fn invite(&mut self, key: &TxKey) -> Option<&mut InviteTx<C>> {
        match self.txs.get_mut(key) {
            Some(Tx::Invite(t)) => Some(t),
            _ => None,
        }
    }

    pub fn is_full(&self) -> bool {
        self.txs.len() >= MAX_TRANSACTIONS
    }
}

/// RFC 3261 §17.2.3: a request matches a server transaction by the top Via's
/// branch *and* sent-by, and the method (ACK and CANCEL find their INVITE).
pub fn tx_key(msg: &Message, method: &str) -> TxKey {
    let branch = match msg.top_via_branch() {
        Some(b) if b.starts_with("z9hG4bK") => format!("{b}|{}", msg.top_via_sent_by().unwrap_or_default()),
        // RFC 2543 peers: no magic cookie, so key by what identifies the request.
        _ => format!(
            "2543|{}|{}|{}|{}",
            msg.call_id(),
            msg.cseq().0,
            msg.from_tag().unwrap_or(""),
            msg.header("via").unwrap_or("")
        ),
    };
    TxKey { branch, method: method.to_string() }
}

pub fn dialog_key(msg: &Message) -> Option<DialogKey> {
    Some(DialogKey {
        call_id: msg.call_id().to_string(),
        local_tag: msg.to_tag()?.to_string(),
        remote_tag: msg.from_tag().unwrap_or("").to_string(),
    })
}

pub fn new_tag() -> String {
    format!("{:016x}", rand::random::<u64>())
}

pub fn tag_of(name_addr: &str) -> String {
    name_addr.split(';').skip(1).find_map(|p| p.trim().strip_prefix("tag=").map(str::to_string)).unwrap_or_default()
}

/// The `method` label of `dispatchd_sip_requests_total`.
pub fn method_label(m: &str) -> &'static str {
    match m {
        "INVITE" => "INVITE",
        "ACK" => "ACK",
        "CANCEL" => "CANCEL",
        "BYE" => "BYE",
        "INFO" => "INFO",
        "OPTIONS" => "OPTIONS",
        "REGISTER" => "REGISTER",
        "MESSAGE" => "MESSAGE",
        "SUBSCRIBE" => "SUBSCRIBE",
        "NOTIFY" => "NOTIFY",
        "PRACK" => "PRACK",
        "UPDATE" => "UPDATE",
        "REFER" => "REFER",
        "PUBLISH" => "PUBLISH",
        _ => "other",
    }
}

/// The server transactions and early dialogs of one UAS.
pub struct Transactions<C, D> {
    table: Mutex<Table<C, D>>,
    /// Final responses to INVITEs over UDP awaiting their ACK, soonest first:
    /// one schedule run by [`Transactions::resend_due`], not a timer per call.
    resends: Mutex<BinaryHeap<Resend>>,
}

/// A final response to resend at `due` unless acknowledged (Timer G), until `until` (Timer H).
struct Resend {
    due: Instant,
    every: Duration,
    until: Instant,
    peer: Peer,
    bytes: Bytes,
    acked: Arc<AtomicBool>,
}

impl PartialEq for Resend {
    fn eq(&self, other: &Self) -> bool {
        self.due == other.due
    }
}

impl Eq for Resend {}

impl PartialOrd for Resend {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Resend {
    /// Reversed: the heap's top is the soonest.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.due.cmp(&self.due)
    }
}

/// How often [`Transactions::resend_due`] should run: Timer G's first
/// interval (T1, 500 ms) is then kept to within this.
pub const RESEND_TICK: Duration = Duration::from_millis(20);

impl<C, D> Default for Transactions<C, D> {
    fn default() -> Self {
        let table = Table { txs: HashMap::new(), dialogs: HashMap::new(), others: 0, other_bytes: 0 };
        Transactions { table: Mutex::new(table), resends: Mutex::default() }
    }
}

impl<C: Send + 'static, D> Transactions<C, D> {
    pub fn lock(&self) -> MutexGuard<'_, Table<C, D>> {
        // A panic while holding the lock must not take the line down with it.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A retransmission of a request whose transaction exists: its last
    /// response goes out again (nothing while it is being worked on). False
    /// when the request is new.
    pub fn absorb(&self, key: &TxKey, peer: &Peer) -> bool {
        let st = self.lock();
        match st.txs.get(key) {
            Some(Tx::Invite(t)) => peer.send(&t.last),
            Some(Tx::Other(t)) => {
                if let Some(last) = &t.last {
                    peer.send(last);
                }
            }
            None => return false,
        }
        true
    }

    /// Sends the final response of a non-INVITE transaction and remembers it
    /// (Timer J: for retransmissions over UDP).
    pub fn finish(&self, key: TxKey, peer: &Peer, resp: Bytes) {
        // Remembered before it is sent: a retransmission that crosses the
        // response must find it, not the transaction still at work.
        let expires = Instant::now() + if peer.reliable() { Duration::ZERO } else { LINGER };
        self.lock().put_other(key, Some(resp.clone()), expires);
        peer.send(&resp);
    }

    /// A non-INVITE request that takes a while: retransmissions are absorbed
    /// (without an answer) until [`Transactions::finish`]. False when the
    /// table is full.
    pub fn working(&self, key: TxKey) -> bool {
        self.lock().put_other(key, None, Instant::now() + LINGER)
    }

    /// A new INVITE transaction whose provisional response `last` was sent,
    /// kept until `ring_limit` + 2·LINGER at most. False when the table is full.
    pub fn begin_invite(
        &self,
        key: TxKey,
        peer: Peer,
        reply: Reply,
        last: Bytes,
        ring_limit: Duration,
        call: C,
    ) -> bool {
        let mut st = self.lock();
        if st.is_full() {
            return false;
        }
        let received = Instant::now();
        let tx = InviteTx {
            peer,
            reply,
            to_tag: new_tag(),
            last,
            final_sent: false,
            acked: Arc::new(AtomicBool::new(false)),
            received,
            dialog: None,
            expires: received + ring_limit + 2 * LINGER,
            call,
        };
        st.txs.insert(key, Tx::Invite(tx));
        true
    }

    /// Sends the final response of an INVITE transaction (once), ends its
    /// early dialog, and retransmits over UDP until the ACK (Timer G, up to
    /// Timer H). Returns the dialog's data when it had one.
    pub fn final_invite(&self, key: &TxKey, status: u16, reason: &str, extra: &[(&str, &str)]) -> Option<D> {
        let (peer, bytes, acked, dialog) = {
            let mut st = self.lock();
            let tx = st.invite(key)?;
            if tx.final_sent {
                return None;
            }
            let bytes = build(&tx.reply, status, reason, Some(&tx.to_tag), extra);
            tx.final_sent = true;
            tx.last = bytes.clone();
            tx.expires = Instant::now() + LINGER;
            let out = (tx.peer.clone(), bytes, tx.acked.clone(), tx.dialog.take());
            let dialog = out.3.as_ref().and_then(|d| st.dialogs.remove(d)).map(|d| d.data);
            (out.0, out.1, out.2, dialog)
        };
        peer.send(&bytes);
        if !peer.reliable() {
            let now = Instant::now();
            let r = Resend { due: now + T1, every: T1, until: now + LINGER, peer, bytes, acked };
            self.resends.lock().unwrap_or_else(|p| p.into_inner()).push(r);
        }
        dialog
    }

    /// Resends the final responses that are due and not yet acknowledged,
    /// each again after twice the interval (at most T2) until Timer H; run
    /// every [`RESEND_TICK`].
    pub fn resend_due(&self) {
        let now = Instant::now();
        let mut due = Vec::new();
        {
            let mut heap = self.resends.lock().unwrap_or_else(|p| p.into_inner());
            while heap.peek().is_some_and(|r| r.due <= now) {
                due.extend(heap.pop());
            }
        }
        due.retain_mut(|r| {
            if r.acked.load(Ordering::Relaxed) || now >= r.until {
                return false;
            }
            r.peer.send(&r.bytes);
            r.every = (r.every * 2).min(T2);
            r.due = now + r.every;
            true
        });
        if !due.is_empty() {
            self.resends.lock().unwrap_or_else(|p| p.into_inner()).extend(due);
        }
    }

    /// An ACK: the final response's retransmissions stop.
    pub fn ack(&self, msg: &Message) {
        let key = tx_key(msg, "INVITE");
        if let Some(tx) = self.lock().invite(&key)
            && tx.final_sent
        {
            tx.acked.store(true, Ordering::Relaxed);
            // Confirmed: absorb ACK retransmissions for Timer I (T4), then forget.
            tx.expires = tx.expires.min(Instant::now() + T4);
        }
    }

    /// Forgets finished transactions; run every second.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut st = self.lock();
        let (mut others, mut bytes) = (0, 0);
        st.txs.retain(|_, t| match t {
            Tx::Invite(t) => t.expires > now,
            Tx::Other(t) => {
                let keep = t.expires > now;
                if keep {
                    others += 1;
                    bytes += t.last.as_ref().map_or(0, Bytes::len);
                }
                keep
            }
        });
        st.others = others;
        st.other_bytes = bytes;
        metrics::gauge!(metric::SIP_TRANSACTIONS).set(st.txs.len() as f64);
    }

    /// INVITE transactions still without a final response for which `f` holds.
    pub fn pending_invites(&self, f: impl Fn(&C) -> bool) -> Vec<TxKey> {
        self.lock()
            .txs
            .iter()
            .filter(|(_, t)| matches!(t, Tx::Invite(t) if !t.final_sent && f(&t.call)))
            .map(|(k, _)| k.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sip::wire::{Verdict, parse_datagram};

    fn msg() -> Message {
        let raw = "CANCEL sip:x@192.0.2.1 SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKa\r\nFrom: <sip:a@b>;tag=f\r\n\
             To: <sip:x@192.0.2.1>\r\nCall-ID: c\r\nCSeq: 1 CANCEL\r\nContent-Length: 0\r\n\r\n";
        match parse_datagram(raw.as_bytes()) {
            Verdict::Ok(m) => m,
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn non_invite_transactions_are_bounded_by_count_and_bytes() {
        let t: Transactions<(), ()> = Transactions::default();
        let key = |i: usize| TxKey { branch: format!("b{i}"), method: "OPTIONS".into() };
        let big = Bytes::from(vec![b'x'; 1 << 20]);
        let later = Instant::now() + LINGER;
        let mut st = t.lock();
        let kept = (0..64).filter(|i| st.put_other(key(*i), Some(big.clone()), later)).count();
        assert_eq!(kept, MAX_OTHER_BYTES >> 20, "bytes bound");
        assert!(st.other_bytes <= MAX_OTHER_BYTES);
        // Working entries (no response yet) count too, and a finished one replaces its entry.
        assert!(st.put_other(key(1000), None, later));
        assert!(!st.put_other(key(1000), Some(big.clone()), later), "over the bytes: forgotten");
        assert!(!st.txs.contains_key(&key(1000)));
        drop(st);
        t.sweep();
        let st = t.lock();
        assert_eq!((st.others, st.other_bytes), (kept, kept << 20), "the sweep recounts");
    }

    #[test]
    fn tags_and_keys() {
        assert_eq!(tag_of("<sip:a@b>;tag=xyz;foo=1"), "xyz");
        assert_eq!(tag_of("<sip:a@b>"), "");
        let m = msg();
        assert_eq!(tx_key(&m, "INVITE").branch, "z9hG4bKa|h");
        assert_eq!(tx_key(&m, "CANCEL").invite(), tx_key(&m, "INVITE"));
        assert_eq!(method_label("NEWMETHOD"), "other");
        // Same branch from another host is another transaction (RFC 3261 §17.2.3).
        let other =
            msg().headers.iter().map(|(k, v)| (k.clone(), v.replace("UDP h;", "UDP Other.Example:5070;"))).collect();
        let m2 = Message { headers: other, ..msg() };
        assert_eq!(m2.top_via_sent_by().as_deref(), Some("other.example:5070"));
        assert_ne!(tx_key(&m2, "INVITE"), tx_key(&m, "INVITE"));
    }
}
