//! moat: a network-edge firewall and TLS-terminating TCP proxy for MongoDB
//! hosts. The binary (`src/main.rs`) is a thin command line over this crate.
#![forbid(unsafe_code)]

pub mod access;
pub mod addr;
pub mod admin;
pub mod admission;
pub mod api;
pub mod classify;
pub mod config;
pub mod conn;
pub mod control;
pub mod daemon;
#[cfg(feature = "aws")]
pub mod ec2;
pub mod fleet;
pub mod forward;
pub mod groups;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod proxy_header;
pub mod registry;
pub mod reload;
pub mod rewind;
pub mod rules;
pub mod session;
pub mod snapshot;
pub mod state;
pub mod systemd;
pub mod tls;
pub mod watch;
