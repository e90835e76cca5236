//! `keel-agent`: the node-side program. It reports the node's measured boot state and runs
//! containers that the operator signed, only on machines the operator enrolled.

pub mod boot_state;
pub mod cli;
pub mod containers;
pub mod network;
pub mod spool;
pub mod systemd;
#[cfg(test)]
pub(crate) mod testkit;
pub mod tpm;
