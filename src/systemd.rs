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

/// Pings the watchdog at half the interval systemd asked for, if it asked.
pub fn spawn_watchdog() {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let every = Duration::from_micros(usec / 2);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
        }
    });
}
