//! `moat run`: load, bind, serve, reload, drain. One signal fans out as the
//! `Phase` watch; the drain is bounded by `shutdown_grace`.

use crate::config::{self, Diagnostic};
use crate::control::gauges;
use crate::control::reload::{self, Reloader, Reloads};
use crate::data::conn::Phase;
use crate::data::listener::Listeners;
use crate::data::state::{Live, Shared};
use crate::policy::snapshot::Snapshot;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::signal::unix::{signal, SignalKind};

/// Runs the daemon; returns the process exit status.
pub fn run(path: &Path) -> i32 {
    let config = match config::load(path, SystemTime::now()) {
        Ok(c) => c,
        Err(e) => {
            print_diagnostics(&e.errors);
            print_diagnostics(&e.warnings);
            eprintln!("moat: the configuration is invalid; nothing was started (run `moat check -c {}` after fixing it)", path.display());
            return 1;
        }
    };
    crate::logging::init(config.server.log_format);
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("moat-worker")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return 1;
        }
    };
    runtime.block_on(serve(config, path))
}

pub fn print_diagnostics(ds: &[Diagnostic]) {
    for d in ds {
        eprintln!("{d}");
    }
}

async fn serve(config: config::Config, path: &Path) -> i32 {
    crate::metrics::init();
    // Handlers first: a SIGHUP or SIGTERM during start-up must not kill us.
    let (mut hup, mut term, mut int) = match (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(h), Ok(t), Ok(i)) => (h, t, i),
        _ => {
            tracing::error!("cannot install signal handlers");
            return 1;
        }
    };
    let config = Arc::new(config);
    // The fleet store's entries are in force before any listener is bound.
    let store = match &config.store {
        Some(s) => Some(crate::policy::fleet::start(s).await),
        None => None,
    };
    let entries = store
        .as_ref()
        .map(|s| Arc::new(s.view.entries()))
        .unwrap_or_default();
    let snap = Snapshot::compile(config.clone(), Arc::default(), entries, SystemTime::now());
    let live = Live::build(snap, &[]);
    gauges::update(&live);
    let shared = Shared::new(live);
    let mut listeners = Listeners::default();
    match listeners.prepare(&config.listeners) {
        Ok(p) => listeners.commit(&shared, p, &config.listeners),
        Err(e) => {
            tracing::error!("{e}; is another process using the address?");
            return 1;
        }
    }
    if let Some(addr) = config.server.admin_listen {
        if let Err(e) = crate::control::admin::start(addr, shared.clone()) {
            tracing::error!("cannot serve admin_listen {addr}: {e}");
            return 1;
        }
    }
    // Asked by the API after a write: reload now, without the watcher's settle.
    let reload_now = Arc::new(tokio::sync::Notify::new());
    if let Some(api) = &config.api {
        if let Err(e) =
            crate::control::api::start(api.listen, path, shared.clone(), reload_now.clone())
        {
            tracing::error!("cannot serve [api] listen {}: {e}", api.listen);
            return 1;
        }
    }
    gauges::mark_success();
    shared.ready.store(true, Ordering::Release);
    crate::control::systemd::ready();
    crate::control::systemd::spawn_watchdog();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        deployments = config.deployments.len(),
        "moat is ready"
    );

    let reloads = Reloads::start(Reloader::new(shared.clone(), path.to_path_buf(), listeners));
    crate::control::watch::spawn(shared.clone(), reloads.clone());
    tokio::spawn(reload::expire_rules(shared.clone(), reloads.clone()));
    tokio::spawn(reload::summarise_refusals(shared.clone()));
    tokio::spawn(crate::policy::groups::refresh_loop(
        shared.clone(),
        reloads.clone(),
    ));
    tokio::spawn(crate::policy::fleet::run(
        shared.clone(),
        reloads.clone(),
        store,
    ));
    {
        let reloads = reloads.clone();
        tokio::spawn(async move {
            loop {
                reload_now.notified().await;
                reloads.reload(false, "API write").await;
            }
        });
    }
    {
        let reloads = reloads.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                reloads.request(true, "SIGHUP");
            }
        });
    }
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }

    // Drain: stop accepting at once, let connections finish within the grace.
    let grace = shared.live.load().snap.config.server.shutdown_grace;
    tracing::info!(grace = %humantime::format_duration(grace), active = shared.active_connections(), "shutting down: no longer accepting");
    crate::control::systemd::stopping();
    shared.phase.send_replace(Phase::Draining);
    reloads.stop().await;
    let deadline = Instant::now() + grace;
    let mut second_signal = false;
    while shared.active_connections() > 0 && Instant::now() < deadline {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = term.recv() => { second_signal = true; break }
            _ = int.recv() => { second_signal = true; break }
        }
    }
    shared.phase.send_replace(Phase::Closing);
    if !second_signal {
        // Give the closing connections a moment to log and count.
        let closing = Instant::now();
        while shared.active_connections() > 0 && closing.elapsed() < Duration::from_secs(1) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    tracing::info!(
        left = shared.active_connections(),
        immediate = second_signal,
        "moat stopped"
    );
    0
}
