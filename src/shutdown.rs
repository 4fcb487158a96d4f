//! Signals: SIGTERM / SIGINT → one CancellationToken that every task watches;
//! SIGHUP → a configuration reload (see `reload`).

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGTERM or SIGINT. Later ones are caught
/// (and logged) so they cannot cut the drain short.
pub fn watch_signals(token: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
            _ = int.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
            _ = token.cancelled() => {}
        }
        token.cancel();
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("already shutting down; waiting for in-flight work");
        }
    });
    Ok(())
}

/// SIGHUP, installed at startup: from then on a SIGHUP no longer kills the
/// process (its default action) but waits here until the reloader reads it.
pub fn hangups() -> std::io::Result<Signal> {
    signal(SignalKind::hangup())
}
