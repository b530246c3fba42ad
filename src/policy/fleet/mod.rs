//! The fleet store (SPEC 7): etcd as the source of access-list entries that
//! every host of a fleet enforces. `view` is the store as applied, `client`
//! talks to etcd, `sync` keeps the daemon's snapshot following it, `cache`
//! keeps the last applied state on disk for a start while etcd is down, and
//! `write` makes the transactional changes of the API and the CLI.

pub mod cache;
pub mod client;
pub mod sync;
#[cfg(test)]
mod testing;
pub mod view;
pub mod write;

pub use sync::{run, start, Initial};
pub use view::View;
pub use write::{WriteError, Writer};

use crate::data::state::Shared;
use tokio::time::Instant;

/// Waits until this host enforces store revision `revision` (its snapshot
/// applied it), or `deadline` passes; returns whether it does.
pub async fn enforced(shared: &Shared, revision: i64, deadline: Instant) -> bool {
    let mut generation = shared.generation.subscribe();
    loop {
        if shared.live.load().snap.store.revision >= revision {
            return true;
        }
        match tokio::time::timeout_at(deadline, generation.changed()).await {
            Ok(Ok(())) => {}
            _ => return shared.live.load().snap.store.revision >= revision,
        }
    }
}

/// Whether `snap` enforces `entry` as a fleet-store entry of `deployment`
/// (the API's per-entry status: ACTIVE, else PENDING).
pub fn enforces(
    snap: &crate::policy::snapshot::Snapshot,
    deployment: &str,
    entry: &crate::policy::access::Entry,
) -> bool {
    let Ok(valid) = entry.validate(None) else {
        return false;
    };
    let Ok(want) = view::parse_value(&serde_json::to_vec(entry).unwrap_or_default()) else {
        return false;
    };
    snap.store.of(deployment).iter().any(|r| {
        r.target == valid.rule.target
            && r.expires == want.expires
            && r.description == want.description
    })
}

/// Runs one store operation from the command line (no daemon): its own
/// small runtime, bounded in time. `moat access-list` exits once etcd has
/// accepted the change.
pub fn block_on<T>(
    work: impl std::future::Future<Output = Result<T, WriteError>>,
) -> Result<T, WriteError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| WriteError::Unreachable(format!("cannot start a runtime: {e}")))?;
    rt.block_on(async {
        tokio::time::timeout(CLI_TIMEOUT, work)
            .await
            .unwrap_or_else(|_| {
                Err(WriteError::Unreachable(format!(
                    "no answer within {}s",
                    CLI_TIMEOUT.as_secs()
                )))
            })
    })
}

/// Bound on one `moat access-list` command against etcd.
const CLI_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
