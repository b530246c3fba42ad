//! The data path: everything a client connection touches, from the listening
//! socket to the last forwarded byte. It reads the policy (`crate::policy`)
//! and never imports the control plane (`crate::control`).

pub mod classify;
pub mod conn;
pub mod forward;
pub mod listener;
pub mod proxy_header;
pub mod registry;
pub mod rewind;
pub mod session;
pub mod state;
pub mod tls;
