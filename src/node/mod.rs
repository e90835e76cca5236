//! Code that runs on the node: `keel-agent` (boot state, signed containers, first-boot
//! provisioning in the initrd) and `keel-net` (the overlay network). It may use the shared
//! modules at the top of the crate, never [`crate::host`].

pub mod agent;
pub mod attest;
pub mod net;
pub mod provision;
pub mod update;
