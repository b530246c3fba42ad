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

use crate::state::Shared;
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
