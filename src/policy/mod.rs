//! The policy: who may reach which deployment. Addresses, the compiled rule
//! tables and the snapshot that holds them, the one admission decision,
//! access-list entries, and the sources of rules beyond the config file
//! (security-group members from EC2, entries from the etcd fleet store).

pub mod access;
pub mod addr;
pub mod admission;
#[cfg(feature = "aws")]
pub mod ec2;
pub mod fleet;
pub mod groups;
pub mod rules;
pub mod snapshot;
