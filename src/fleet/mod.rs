//! The fleet store (SPEC 7): etcd as the source of access-list entries that
//! every host of a fleet enforces. `view` is the store as applied, `client`
//! talks to etcd, `sync` keeps the daemon's snapshot following it, `cache`
//! keeps the last applied state on disk for a start while etcd is down.

pub mod cache;
pub mod client;
pub mod sync;
pub mod view;

pub use sync::{run, start, Initial};
pub use view::View;
