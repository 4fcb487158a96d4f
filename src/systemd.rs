//! The systemd notify protocol (contract §1): READY, WATCHDOG, STOPPING,
//! RELOADING, STATUS. No-ops outside systemd (no `NOTIFY_SOCKET`).
//!
//! Datagrams are sent by hand rather than through `sd_notify::notify` so that
//! abstract-namespace sockets (`NOTIFY_SOCKET=@name`) work too.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

/// Sends one notify datagram with these lines. Errors are logged, never fatal.
fn notify(state: &[NotifyState]) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let mut msg = String::new();
    for s in state {
        msg.push_str(&s.to_string());
        msg.push('\n');
    }
    if let Err(e) = send(&path, msg.as_bytes()) {
        tracing::warn!(error = %e, "systemd notify failed");
    }
}

fn send(path: &std::ffi::OsStr, msg: &[u8]) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixDatagram;
    let sock = UnixDatagram::unbound()?;
    // A manager that does not read must not stall the caller (the dispatch loop).
    sock.set_nonblocking(true)?;
    let bytes = path.as_bytes();
    match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(msg, &addr)?;
        }
        None => {
            sock.send_to(msg, std::path::Path::new(path))?;
        }
    }
    Ok(())
}

/// `STATUS=…` rides along when given (empty = none).
fn with_status<'a>(mut v: Vec<NotifyState<'a>>, status: &'a str) -> Vec<NotifyState<'a>> {
    if !status.is_empty() {
        v.push(NotifyState::Status(status));
    }
    v
}

/// `READY=1`: every listener is bound and Redis answers (or a reload is done).
pub fn ready(status: &str) {
    notify(&with_status(vec![NotifyState::Ready], status));
}

/// `RELOADING=1` with `MONOTONIC_USEC`, before a SIGHUP reload; end it with [`ready`].
pub fn reloading() {
    let mut v = vec![NotifyState::Reloading];
    if let Ok(m) = NotifyState::monotonic_usec_now() {
        v.push(m);
    }
    v.push(NotifyState::Status("reloading the configuration"));
    notify(&v);
}

/// `STOPPING=1`: shutdown has begun.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

/// A `STATUS=…` line on its own.
pub fn status(text: &str) {
    notify(&[NotifyState::Status(text)]);
}

/// `WATCHDOG=1`. Called from the dispatcher loop, possibly many times a
/// second under load: sent at most every quarter of the watchdog interval.
pub fn watchdog() {
    static START: OnceLock<Instant> = OnceLock::new();
    static LAST_MS: AtomicU64 = AtomicU64::new(0);
    let Some(every) = watchdog_interval() else { return };
    let start = *START.get_or_init(Instant::now);
    // +1 so that the very first call (0 ms after START) always sends.
    let now_ms = start.elapsed().as_millis() as u64 + 1;
    let last = LAST_MS.load(Ordering::Relaxed);
    let min_gap = (every / 2).as_millis() as u64;
    if last != 0 && now_ms.saturating_sub(last) < min_gap {
        return;
    }
    if LAST_MS.compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
        notify(&[NotifyState::Watchdog]);
    }
}

/// Half the watchdog interval systemd asked for, if it asked (and asked this
/// process: `WATCHDOG_PID`, when set, must be ours).
pub fn watchdog_interval() -> Option<Duration> {
    static INTERVAL: OnceLock<Option<Duration>> = OnceLock::new();
    *INTERVAL.get_or_init(|| {
        let usec = sd_notify::watchdog_enabled()?;
        (!usec.is_zero()).then(|| usec / 2)
    })
}
