//! The systemd notify protocol: READY, WATCHDOG, STOPPING. No-ops outside systemd.

use std::time::Duration;

fn notify(state: &[sd_notify::NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        if let Err(e) = sd_notify::notify(state) {
            tracing::warn!(error = %e, "systemd notify failed");
        }
    }
}

pub fn ready() {
    notify(&[sd_notify::NotifyState::Ready]);
}

pub fn stopping() {
    notify(&[sd_notify::NotifyState::Stopping]);
}

pub fn watchdog() {
    notify(&[sd_notify::NotifyState::Watchdog]);
}

/// Half the watchdog interval systemd asked for, if it asked.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}
