//! systemd `Type=notify` integration: READY, RELOADING (with MONOTONIC_USEC),
//! STOPPING and watchdog pings. Every call is a no-op without NOTIFY_SOCKET.

use sd_notify::NotifyState;
use std::time::Duration;

pub fn ready() {
    let _ = sd_notify::notify(false, &[NotifyState::Ready]);
}

pub fn reloading() {
    let mut states = vec![NotifyState::Reloading];
    if let Ok(m) = NotifyState::monotonic_usec_now() {
        states.push(m);
    }
    let _ = sd_notify::notify(false, &states);
}

pub fn stopping() {
    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
}

/// The watchdog interval systemd asked for: `WATCHDOG_USEC`, for this
/// process (`WATCHDOG_PID` unset or ours, as `sd_watchdog_enabled(3)` says).
fn watchdog_usec() -> Option<u64> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    match std::env::var("WATCHDOG_PID") {
        Ok(pid) if pid.trim().parse::<u32>().ok() != Some(std::process::id()) => None,
        _ => (usec > 0).then_some(usec),
    }
}

/// Pings the watchdog at half the interval systemd asked for, if it asked.
pub fn spawn_watchdog() {
    let Some(usec) = watchdog_usec() else { return };
    let every = Duration::from_micros(usec / 2).max(Duration::from_millis(1));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
        }
    });
}
