//! moat: a network-edge firewall and TLS-terminating TCP proxy for MongoDB
//! hosts. The binary (`src/main.rs`) is a thin command line over this crate.
//!
//! The folders are the architecture:
//! - [`data`]: the data path (listeners, connection set-up, TLS, forwarding);
//! - [`policy`]: rules, admission, snapshots, security groups, the fleet store;
//! - [`control`]: reloads, the access-list API and CLI, the admin endpoint;
//! - [`config`]: the config file, its validation and diagnostics;
//! - [`metrics`] and [`logging`]: what every room reports through;
//! - [`daemon`]: `moat run`, which starts them all.
#![forbid(unsafe_code)]

pub mod config;
pub mod control;
pub mod daemon;
pub mod data;
pub mod logging;
pub mod metrics;
pub mod policy;
